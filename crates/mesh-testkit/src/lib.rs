//! Test harness for the mesh: many real relays in one process (libp2p memory transport, or
//! TCP on 127.0.0.1), linked in a chosen topology, with one tracing span per node, waits that
//! poll instead of sleeping, node stop/start with the same key, and links that can be cut and
//! healed to make partitions.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use mesh_protocol::Identity;
//! use mesh_testkit::{TestNet, Topology, price_batch, now_ms};
//!
//! let net = TestNet::builder().nodes(20).topology(Topology::Line).build().await?;
//! let provider = Identity::generate();
//! let message = price_batch(&provider, 1, now_ms(), 50, 20)?;
//! net.publish(0, &message).await?;
//! net.wait_delivered_everywhere(&message.message_id()).await?;
//! # Ok(()) }
//! ```

pub mod demo;
pub mod eventually;
pub mod hostile;
pub mod local;
pub mod messages;
pub mod net;
pub mod topology;

pub use eventually::{eventually, eventually_async};
pub use hostile::{HostileConfig, HostilePeer};
pub use local::{DEMO_API_KEY, LocalMesh, LocalMeshBuilder};
pub use messages::{now_ms, price_batch};
pub use net::{Received, TestNet, TestNetBuilder, TestNode, Transport, WAIT, test_config};
pub use topology::Topology;
