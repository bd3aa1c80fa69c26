//! Prints the identity of a node key file, creating the key (mode 0600) when it is missing.
//!
//! `cargo run -p mesh-protocol --example node-id -- data/node.key`

use std::path::PathBuf;

use mesh_protocol::Identity;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path =
        std::env::args_os().nth(1).map_or_else(|| PathBuf::from("data/node.key"), PathBuf::from);
    let identity = Identity::load_or_create(&path)?;
    println!("key file: {}", path.display());
    println!("node_id:  {}", identity.node_id());
    println!("peer_id:  {}", identity.peer_id());
    Ok(())
}
