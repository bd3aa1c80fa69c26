//! `birdeye-sim`: a Birdeye-compatible price API on loopback, with simulated prices and faults
//! injected on demand, for tests, the demo and benchmarks (the machines that build this project
//! have no internet).
//!
//! It speaks the contract of BIRDEYE.md: `GET /defi/price`, `GET`/`POST /defi/multi_price` (at
//! most 100 addresses), `GET /defi/networks`, the `X-API-KEY` and `x-chain` headers, and the
//! `{"success": false, "message": ...}` error bodies with 400/401/403/429/5xx. Prices walk
//! (seeded) around the realistic magnitudes of the fixture tokens and are written as JSON float
//! text (`151.37`, `1.6e-05`), so clients must convert them exactly. `GET /sim/stats` counts the
//! requests of every key, so tests can count upstream calls.
//!
//! It depends on no crate of the mesh workspace.
//!
//! ```no_run
//! use std::time::Duration;
//! use birdeye_sim::{Failure, Simulator};
//!
//! # async fn demo() -> birdeye_sim::Result<()> {
//! let sim = Simulator::builder()
//!     .keys(["test-key"])
//!     .forbidden_key("banned-key")
//!     .rate_limit(15)
//!     .latency(Duration::from_millis(20))
//!     .seed(7)
//!     .spawn("127.0.0.1:0")
//!     .await?;
//! println!("Birdeye on {}", sim.base_url());
//! sim.fail_next(2, Failure::status(503)); // the next two calls fail
//! sim.set_offset_percent(3.0); // this instance now quotes 3 % higher
//! let calls = sim.stats().key("test-key").multi_price;
//! # let _ = calls;
//! sim.shutdown().await;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod market;
mod server;
pub mod simulator;

pub use market::{CHAINS, NumberStyle, TokenSpec, fixture_tokens};
pub use server::MAX_ADDRESSES;
pub use simulator::{
    Endpoint, Failure, KeyStats, RequestRecord, Simulator, SimulatorBuilder, SimulatorHandle,
    Stats, UnknownTokens,
};

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A builder option is out of range.
    #[error("invalid simulator option: {0}")]
    InvalidOption(String),
}

/// Result of the simulator's fallible calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;
