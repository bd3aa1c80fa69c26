//! `mesh-provider`: the Birdeye price API client and the provider round loop of the mesh
//! price network (ARCHITECTURE section 7).
//!
//! - [`BirdeyeClient`] talks to Birdeye (or `birdeye-sim`): multi-price in chunks of at most
//!   100 addresses per chain, single price, networks, [`BirdeyeClient::validate_key`]. Prices
//!   are exact decimals taken from the JSON number's text; unknown tokens are reported missing,
//!   never invented. It works on its own in any Rust program.
//! - [`Provider`] runs the round loop: it asks [`mesh_coordination::RoundPlanner`] whether this
//!   node fetches the round, fetches, signs one `PriceBatch` and hands it to a [`Broadcast`].
//! - [`Config`] holds the guide's variables (`BIRDEYE_API_KEY`, `MESH_PROVIDER_ASSETS`,
//!   `MESH_PROVIDER_FETCH_INTERVAL_SECS`, ...), validated with every error at once.
//!
//! The API key is an [`ApiKey`], whose `Debug` is redacted: it never reaches a log line or an
//! error message. This crate emits `tracing` events and `metrics` but installs neither.
//!
//! ```no_run
//! use std::sync::Arc;
//! use mesh_protocol::Identity;
//! use mesh_provider::{ApiKey, BirdeyeClient, ChannelBroadcast, Config, Provider};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // The client alone.
//! let client = BirdeyeClient::new(ApiKey::new("my-key"))?;
//! let prices = client.prices(mesh_provider::Assets::default().as_slice()).await?;
//! for price in &prices.prices {
//!     println!("{}:{} = {}", price.chain, price.address, price.value);
//! }
//!
//! // The provider loop, from the environment, handing batches to a channel.
//! let config = Config::from_lookup(|name| std::env::var(name).ok())?;
//! let (broadcast, mut batches) = ChannelBroadcast::new(16, 1);
//! let provider = Provider::builder(Identity::generate(), config.settings(), Arc::new(broadcast))
//!     .build();
//! provider.enable(ApiKey::new("my-key")).await?;
//! let first = batches.recv().await;
//! println!("{:?} {:?}", first, provider.status());
//! provider.shutdown().await;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod assets;
pub mod broadcast;
pub mod client;
pub mod config;
pub mod provider;
pub mod telemetry;

pub use assets::{Asset, AssetError, Assets};
pub use broadcast::{Broadcast, BroadcastError, ChannelBroadcast};
pub use client::{
    ApiKey, BirdeyeClient, ClientConfig, MissingReason, MissingToken, MultiPriceMethod, PriceSet,
    RetryPolicy, ServerDate, TokenPrice,
};
pub use config::{Config, ConfigError, ConfigErrors, Settings};
pub use provider::{FetchOutcome, Provider, ProviderBuilder, ProviderStatus};

/// The client's error, by the name other crates use for it.
pub use client::Error as BirdeyeError;

/// What went wrong in provider mode.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Birdeye failed (after the client's retries).
    #[error(transparent)]
    Birdeye(#[from] client::Error),
    /// The configuration is invalid.
    #[error("invalid provider configuration: {0}")]
    Config(#[from] ConfigErrors),
    /// The round timing is unusable.
    #[error("invalid round timing: {0}")]
    Coordination(#[from] mesh_coordination::Error),
    /// The batch could not be encoded for signing.
    #[error("cannot encode the price batch: {0}")]
    Seal(#[from] mesh_protocol::CodecError),
    /// The broadcaster refused the batch.
    #[error(transparent)]
    Broadcast(#[from] BroadcastError),
    /// The round ended before Birdeye answered (with retries): nothing was sent for it.
    #[error("round {round} ended before Birdeye answered")]
    RoundOver {
        /// The round.
        round: u64,
    },
    /// Birdeye had a price for none of the configured assets.
    #[error("Birdeye had no price for any configured asset in round {round}")]
    NoPrices {
        /// The round.
        round: u64,
    },
    /// The provider was shut down.
    #[error("the provider is shut down")]
    ShutDown,
    /// This node's clock is off by more than the allowed skew: the batch was not sent.
    #[error(
        "wall clock is off by {offset_ms} ms, more than MESH_MAX_CLOCK_SKEW_SECS allows ({max_ms} ms)"
    )]
    ClockSkew {
        /// The estimated offset (local minus references), ms.
        offset_ms: i64,
        /// The allowed skew, ms.
        max_ms: i64,
    },
}

impl Error {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Birdeye(e) => e.kind(),
            Error::Config(_) => "config",
            Error::Coordination(_) => "coordination",
            Error::Seal(_) => "seal",
            Error::Broadcast(_) => "broadcast",
            Error::RoundOver { .. } => "round_over",
            Error::NoPrices { .. } => "no_prices",
            Error::ShutDown => "shut_down",
            Error::ClockSkew { .. } => "clock_skew",
        }
    }
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
