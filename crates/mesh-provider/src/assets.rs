//! The assets a provider fetches: `chain:address` pairs (`MESH_PROVIDER_ASSETS`).

use std::fmt;
use std::str::FromStr;

/// The fixture tokens of BIRDEYE.md: the default `MESH_PROVIDER_ASSETS`.
pub const DEFAULT_ASSETS: &[(&str, &str)] = &[
    ("solana", "So11111111111111111111111111111111111111112"),
    ("solana", "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"),
    ("solana", "Es9vMFrzaCERmJfrF4H2FYD4KCoNkY11McCe8BenwNYB"),
    ("solana", "DezXAZ8z7PnrnRJjz3wXBoRgixCa6xjnB7YaB1pPB263"),
    ("solana", "mSoLzYCxHdYgdzU16g5QSh3i5K3z3KZK7ytfqcJm7So"),
    ("solana", "JUPyiwrYJFskUPiHa7hkeR8VUtAeFoSYbKedZNsDvCN"),
    ("ethereum", "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2"),
    ("ethereum", "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"),
    ("ethereum", "0xdAC17F958D2ee523a2206206994597C13D831ec7"),
];

/// One asset: a token address on a chain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Asset {
    /// Chain (`solana`, `ethereum`, ...), sent as `x-chain`; the price's `blockchain`.
    pub chain: String,
    /// Token address on that chain; the price's `asset`. An EVM address (`0x` and 40 hex
    /// digits) is kept in lower case, whatever case it was configured in.
    pub address: String,
}

/// Why a `chain:address` text is not an asset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssetError {
    /// No `:` between chain and address.
    #[error("{0:?} is not chain:address")]
    NoChain(String),
    /// The chain is empty, too long (over 50) or not lower-case letters, digits and `-`.
    #[error("{0:?} is not a chain name (1..=50 of a-z, 0-9, -)")]
    BadChain(String),
    /// The address is empty, too long (over 255) or not letters and digits.
    #[error("{0:?} is not a token address (1..=255 letters and digits)")]
    BadAddress(String),
    /// The list is empty.
    #[error("the asset list is empty")]
    Empty,
    /// The same asset appears twice.
    #[error("{0} is listed twice")]
    Duplicate(String),
    /// More assets than one price batch may carry.
    #[error("{count} assets; at most {max} fit in one price batch")]
    TooMany {
        /// How many were listed.
        count: usize,
        /// The limit.
        max: usize,
    },
}

impl Asset {
    /// An asset of `chain` at `address`, checked like [`Asset::from_str`].
    pub fn new(chain: &str, address: &str) -> Result<Self, AssetError> {
        let chain_ok = !chain.is_empty()
            && chain.len() <= 50
            && chain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !chain_ok {
            return Err(AssetError::BadChain(chain.to_owned()));
        }
        let address_ok = !address.is_empty()
            && address.len() <= 255
            && address.bytes().all(|b| b.is_ascii_alphanumeric());
        if !address_ok {
            return Err(AssetError::BadAddress(address.to_owned()));
        }
        // One form per address: an EVM address in lower case (Birdeye answers either case).
        let address = mesh_protocol::canonical_asset(address).into_owned();
        Ok(Self { chain: chain.to_owned(), address })
    }
}

impl FromStr for Asset {
    type Err = AssetError;

    /// `chain:address`, surrounding spaces ignored.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (chain, address) =
            text.trim().split_once(':').ok_or_else(|| AssetError::NoChain(text.to_owned()))?;
        Self::new(chain.trim(), address.trim())
    }
}

impl fmt::Display for Asset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.chain, self.address)
    }
}

/// The list of assets a provider fetches: non-empty, no asset twice, at most
/// [`mesh_protocol::MAX_PRICES_PER_BATCH`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assets(Vec<Asset>);

impl Assets {
    /// Checks and wraps a list.
    pub fn new(assets: Vec<Asset>) -> Result<Self, AssetError> {
        if assets.is_empty() {
            return Err(AssetError::Empty);
        }
        let max = mesh_protocol::MAX_PRICES_PER_BATCH;
        if assets.len() > max {
            return Err(AssetError::TooMany { count: assets.len(), max });
        }
        for (i, asset) in assets.iter().enumerate() {
            if assets[..i].contains(asset) {
                return Err(AssetError::Duplicate(asset.to_string()));
            }
        }
        Ok(Self(assets))
    }

    /// The assets, in the configured order.
    pub fn as_slice(&self) -> &[Asset] {
        &self.0
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true for a checked list; present for completeness.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Default for Assets {
    /// The fixture tokens of BIRDEYE.md.
    fn default() -> Self {
        Self(
            DEFAULT_ASSETS
                .iter()
                .map(|(chain, address)| Asset {
                    chain: (*chain).to_owned(),
                    address: mesh_protocol::canonical_asset(address).into_owned(),
                })
                .collect(),
        )
    }
}

impl FromStr for Assets {
    type Err = AssetError;

    /// A comma-separated `chain:address` list; empty items are ignored.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let assets = text
            .split(',')
            .filter(|item| !item.trim().is_empty())
            .map(Asset::from_str)
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(assets)
    }
}

impl fmt::Display for Assets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, asset) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{asset}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_env_var_format() {
        let assets: Assets =
            " solana:So11111111111111111111111111111111111111112 , ethereum:0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2,"
                .parse()
                .unwrap();
        assert_eq!(assets.len(), 2);
        assert_eq!(assets.as_slice()[1].chain, "ethereum");
        let again: Assets = assets.to_string().parse().unwrap();
        assert_eq!(again, assets);
        // One form per address: EVM in lower case, base58 as written.
        assert_eq!(assets.as_slice()[1].address, "0xc02aaa39b223fe8d0a0e5c4f27ead9083c756cc2");
        assert_eq!(assets.as_slice()[0].address, "So11111111111111111111111111111111111111112");
        assert!(Assets::default().as_slice().iter().all(|a| a.address == canonical(&a.address)));
        // Both writings of one token are one asset.
        let twice = "ethereum:0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2,ethereum:0xc02aaa39b223fe8d0a0e5c4f27ead9083c756cc2";
        assert!(matches!(twice.parse::<Assets>(), Err(AssetError::Duplicate(_))));
    }

    fn canonical(address: &str) -> String {
        mesh_protocol::canonical_asset(address).into_owned()
    }

    #[test]
    fn default_is_the_nine_fixture_tokens() {
        let assets = Assets::default();
        assert_eq!(assets.len(), 9);
        assert_eq!(Assets::new(assets.as_slice().to_vec()).unwrap(), assets);
    }

    #[test]
    fn rejects_bad_lists() {
        assert_eq!("".parse::<Assets>(), Err(AssetError::Empty));
        assert!(matches!("So111".parse::<Assets>(), Err(AssetError::NoChain(_))));
        assert!(matches!("Solana:So111".parse::<Assets>(), Err(AssetError::BadChain(_))));
        assert!(matches!("solana:So1 11".parse::<Assets>(), Err(AssetError::BadAddress(_))));
        assert!(matches!("solana:".parse::<Assets>(), Err(AssetError::BadAddress(_))));
        assert!(matches!("solana:A,solana:A".parse::<Assets>(), Err(AssetError::Duplicate(_))));
        let many: Vec<String> = (0..1001).map(|i| format!("solana:A{i}")).collect();
        assert!(matches!(
            many.join(",").parse::<Assets>(),
            Err(AssetError::TooMany { count: 1001, .. })
        ));
    }
}
