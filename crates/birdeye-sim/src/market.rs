//! The simulated market: tokens, their seeded random walks, and how prices are written as JSON
//! numbers.
//!
//! Prices live as `f64` here on purpose: the real API emits floats, and the point of the simulator
//! is to produce the float text a client must convert exactly (`0.000016`, `1.6e-05`,
//! `151.23456789012345`).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The chains the simulator accepts in `x-chain` (and lists at `/defi/networks`).
pub const CHAINS: &[&str] = &[
    "solana",
    "ethereum",
    "arbitrum",
    "avalanche",
    "bsc",
    "optimism",
    "polygon",
    "base",
    "zksync",
    "sui",
];

/// One token the simulator knows, with the magnitude its price walks around.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSpec {
    /// Chain it lives on (`solana`, `ethereum`, ...).
    pub chain: String,
    /// Its address, as Birdeye writes it (EVM addresses checksummed).
    pub address: String,
    /// Ticker, for humans.
    pub symbol: String,
    /// Price the walk starts from and reverts to.
    pub base_price: f64,
    /// Largest relative move of one step (0.002 = 0.2 %).
    pub volatility: f64,
    /// Liquidity in USD, reported with `include_liquidity=true` and checked by `check_liquidity`.
    pub liquidity: f64,
    /// A `priceChange24h` reported instead of the walk's (for odd upstream answers such as a
    /// 52-digit change); `None` reports the walk's change.
    pub change_24h: Option<f64>,
}

impl TokenSpec {
    /// A token of `chain` at `address` whose price walks around `base_price`.
    pub fn new(chain: &str, address: &str, symbol: &str, base_price: f64) -> Self {
        Self {
            chain: chain.to_owned(),
            address: address.to_owned(),
            symbol: symbol.to_owned(),
            base_price,
            volatility: 0.002,
            liquidity: 1_000_000.0,
            change_24h: None,
        }
    }

    /// Reports `percent` as the 24-hour change, whatever the walk does.
    pub fn change_24h(mut self, percent: f64) -> Self {
        self.change_24h = Some(percent);
        self
    }

    /// Sets the largest relative move of one step.
    pub fn volatility(mut self, volatility: f64) -> Self {
        self.volatility = volatility;
        self
    }

    /// Sets the liquidity in USD.
    pub fn liquidity(mut self, liquidity: f64) -> Self {
        self.liquidity = liquidity;
        self
    }
}

/// The fixture tokens of BIRDEYE.md with realistic magnitudes.
pub fn fixture_tokens() -> Vec<TokenSpec> {
    vec![
        TokenSpec::new("solana", "So11111111111111111111111111111111111111112", "SOL", 151.37)
            .liquidity(1.2e9),
        TokenSpec::new("solana", "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v", "USDC", 1.0)
            .volatility(0.0002)
            .liquidity(9.5e8),
        TokenSpec::new("solana", "Es9vMFrzaCERmJfrF4H2FYD4KCoNkY11McCe8BenwNYB", "USDT", 1.0)
            .volatility(0.0002)
            .liquidity(4.1e8),
        TokenSpec::new("solana", "DezXAZ8z7PnrnRJjz3wXBoRgixCa6xjnB7YaB1pPB263", "BONK", 0.000016)
            .volatility(0.004)
            .liquidity(2.3e7),
        // mSOL follows SOL at about 1.13 x (see `Market::PEGS`).
        TokenSpec::new("solana", "mSoLzYCxHdYgdzU16g5QSh3i5K3z3KZK7ytfqcJm7So", "mSOL", 171.05)
            .volatility(0.0005)
            .liquidity(6.0e7),
        TokenSpec::new("solana", "JUPyiwrYJFskUPiHa7hkeR8VUtAeFoSYbKedZNsDvCN", "JUP", 0.4)
            .volatility(0.003)
            .liquidity(8.8e7),
        TokenSpec::new("ethereum", "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2", "WETH", 3521.07)
            .liquidity(3.4e9),
        TokenSpec::new("ethereum", "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48", "USDC", 1.0)
            .volatility(0.0002)
            .liquidity(2.6e9),
        TokenSpec::new("ethereum", "0xdAC17F958D2ee523a2206206994597C13D831ec7", "USDT", 1.0)
            .volatility(0.0002)
            .liquidity(1.9e9),
    ]
}

/// How prices are written as JSON numbers. Every style writes the shortest text that reads back
/// as the same `f64`; they differ in when they switch to exponent notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NumberStyle {
    /// Like Python's `repr`: exponent below 1e-4 or from 1e16, two-digit exponent
    /// (`1.6e-05`, `151.37`).
    #[default]
    Python,
    /// Like JavaScript's `JSON.stringify`: exponent below 1e-6 or from 1e21 (`0.000016`).
    JavaScript,
    /// Never an exponent (`0.000016`).
    Plain,
}

impl std::str::FromStr for NumberStyle {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "python" => Ok(Self::Python),
            "javascript" | "js" => Ok(Self::JavaScript),
            "plain" => Ok(Self::Plain),
            other => Err(format!("{other:?} is not a number style (python, javascript, plain)")),
        }
    }
}

impl NumberStyle {
    /// The JSON number text of `value` (finite) in this style.
    pub fn format(self, value: f64) -> String {
        // `{:e}` gives the shortest round-trip digits: "1.6e-5", "1.5137e2", "1e0".
        let sci = format!("{value:e}");
        let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let (negative, mantissa) = match mantissa.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, mantissa),
        };
        let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
        let use_exponent = match self {
            NumberStyle::Python => !(-4..16).contains(&exp),
            NumberStyle::JavaScript => !(-6..21).contains(&exp),
            NumberStyle::Plain => false,
        };
        let sign = if negative { "-" } else { "" };
        if use_exponent {
            let (first, rest) = digits.split_at(1);
            let fraction = if rest.is_empty() { String::new() } else { format!(".{rest}") };
            let exp_text = match self {
                NumberStyle::Python => {
                    format!("{}{:02}", if exp < 0 { '-' } else { '+' }, exp.unsigned_abs())
                }
                _ => format!("{}{}", if exp < 0 { "-" } else { "+" }, exp.unsigned_abs()),
            };
            format!("{sign}{first}{fraction}e{exp_text}")
        } else {
            format!("{sign}{}", plain_digits(&digits, exp))
        }
    }
}

/// Writes `d.ddd x 10^exp` (digits without the point) in plain notation.
fn plain_digits(digits: &str, exp: i32) -> String {
    let point = exp + 1; // digits before the decimal point
    if point <= 0 {
        format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}", "0".repeat(point as usize - digits.len()))
    } else {
        let (int, frac) = digits.split_at(point as usize);
        format!("{int}.{frac}")
    }
}

#[derive(Debug, Clone)]
struct Token {
    spec: TokenSpec,
    price: f64,
    open_24h: f64,
}

/// The prices of all tokens, walking one step per tick unless frozen.
#[derive(Debug)]
pub(crate) struct Market {
    tokens: Vec<Token>,
    rng: StdRng,
    steps_done: u64,
}

impl Market {
    /// (follower, leader, ratio): the follower's price is the leader's times the ratio.
    const PEGS: &'static [(&'static str, &'static str, f64)] = &[(
        "mSoLzYCxHdYgdzU16g5QSh3i5K3z3KZK7ytfqcJm7So",
        "So11111111111111111111111111111111111111112",
        1.13,
    )];

    pub(crate) fn new(specs: Vec<TokenSpec>, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let tokens = specs
            .into_iter()
            .map(|spec| {
                // Start somewhere near the base, and pretend the day opened a little apart.
                let start = spec.base_price * (1.0 + rng.gen_range(-0.01..0.01));
                let open = start * (1.0 + rng.gen_range(-0.05..0.05));
                Token { spec, price: start, open_24h: open }
            })
            .collect();
        let mut market = Self { tokens, rng, steps_done: 0 };
        market.apply_pegs();
        market
    }

    /// Walks every price forward to step `target` (a count of ticks since start), at most
    /// `MAX_CATCH_UP` steps at once so a long pause cannot stall a request.
    pub(crate) fn advance_to(&mut self, target: u64) {
        const MAX_CATCH_UP: u64 = 1_000;
        if target <= self.steps_done {
            return;
        }
        let steps = (target - self.steps_done).min(MAX_CATCH_UP);
        for _ in 0..steps {
            for token in &mut self.tokens {
                let vol = token.spec.volatility;
                let shock = if vol > 0.0 { self.rng.gen_range(-vol..=vol) } else { 0.0 };
                // Mild pull back to the base keeps the walk around the realistic magnitude.
                let pull = 0.01 * (token.spec.base_price / token.price - 1.0);
                token.price *= 1.0 + shock + pull;
            }
            self.apply_pegs();
        }
        self.steps_done = target;
    }

    fn apply_pegs(&mut self) {
        for (follower, leader, ratio) in Self::PEGS {
            let Some(leader_price) =
                self.tokens.iter().find(|t| t.spec.address == *leader).map(|t| t.price)
            else {
                continue;
            };
            // A follower trades within 0.05 % of its peg.
            let deviation = self.rng.gen_range(-0.0005..=0.0005);
            if let Some(t) = self.tokens.iter_mut().find(|t| t.spec.address == *follower) {
                t.price = leader_price * ratio * (1.0 + deviation);
            }
        }
    }

    /// The token of `chain` at `address` (exact match, or case-insensitive for EVM addresses).
    pub(crate) fn quote(&self, chain: &str, address: &str) -> Option<Quote> {
        let token = self.tokens.iter().find(|t| {
            t.spec.chain == chain
                && (t.spec.address == address
                    || (address.starts_with("0x") && t.spec.address.eq_ignore_ascii_case(address)))
        })?;
        let native = match chain {
            "solana" => "So11111111111111111111111111111111111111112",
            "ethereum" => "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2",
            _ => "",
        };
        let native_price = self
            .tokens
            .iter()
            .find(|t| t.spec.chain == chain && t.spec.address == native)
            .map(|t| t.price);
        Some(Quote {
            price: token.price,
            change_24h_percent: token
                .spec
                .change_24h
                .unwrap_or((token.price / token.open_24h - 1.0) * 100.0),
            native_price,
            liquidity: token.spec.liquidity,
        })
    }
}

/// One token's state at the time of a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Quote {
    pub(crate) price: f64,
    pub(crate) change_24h_percent: f64,
    pub(crate) native_price: Option<f64>,
    pub(crate) liquidity: f64,
}

/// Ticks between `start` and now, for [`Market::advance_to`].
pub(crate) fn ticks(elapsed: Duration, tick: Duration) -> u64 {
    if tick.is_zero() {
        return 0;
    }
    (elapsed.as_nanos() / tick.as_nanos()) as u64
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn python_style_matches_python_repr() {
        let cases = [
            (0.000016, "1.6e-05"),
            (0.0001, "0.0001"),
            (151.37, "151.37"),
            (1.0, "1.0"),
            (3521.07, "3521.07"),
            (1e16, "1e+16"),
            (1.5e-7, "1.5e-07"),
        ];
        for (value, text) in cases {
            // Python writes 1.0 as "1.0"; the simulator writes "1", also a valid JSON number.
            let expected = if text == "1.0" { "1" } else { text };
            assert_eq!(NumberStyle::Python.format(value), expected, "{value}");
        }
    }

    #[test]
    fn javascript_and_plain_styles() {
        assert_eq!(NumberStyle::JavaScript.format(0.000016), "0.000016");
        assert_eq!(NumberStyle::JavaScript.format(1.5e-7), "1.5e-7");
        assert_eq!(NumberStyle::Plain.format(1.5e-7), "0.00000015");
        assert_eq!(NumberStyle::Plain.format(120.0), "120");
        assert_eq!(NumberStyle::Plain.format(-2.5), "-2.5");
    }

    #[test]
    fn every_style_reads_back_as_the_same_float() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..2_000 {
            let value: f64 =
                rng.gen_range(1e-9..1e6) * if rng.r#gen::<bool>() { 1.0 } else { -1.0 };
            for style in [NumberStyle::Python, NumberStyle::JavaScript, NumberStyle::Plain] {
                let text = style.format(value);
                assert_eq!(text.parse::<f64>().unwrap(), value, "{style:?} {text}");
                assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok(), "{text}");
            }
        }
    }

    #[test]
    fn walk_is_seeded_and_stays_near_the_magnitude() {
        let mut a = Market::new(fixture_tokens(), 42);
        let mut b = Market::new(fixture_tokens(), 42);
        a.advance_to(500);
        b.advance_to(500);
        for spec in fixture_tokens() {
            let qa = a.quote(&spec.chain, &spec.address).unwrap();
            let qb = b.quote(&spec.chain, &spec.address).unwrap();
            assert_eq!(qa.price, qb.price);
            let ratio = qa.price / spec.base_price;
            assert!((0.8..1.25).contains(&ratio), "{} at {} ({ratio})", spec.symbol, qa.price);
        }
        let sol = a.quote("solana", "So11111111111111111111111111111111111111112").unwrap();
        let msol = a.quote("solana", "mSoLzYCxHdYgdzU16g5QSh3i5K3z3KZK7ytfqcJm7So").unwrap();
        assert!((msol.price / sol.price - 1.13).abs() < 0.01);
    }

    #[test]
    fn tokens_are_per_chain_and_evm_lookup_ignores_case() {
        let m = Market::new(fixture_tokens(), 1);
        assert!(m.quote("ethereum", "So11111111111111111111111111111111111111112").is_none());
        assert!(m.quote("ethereum", "0xc02aaa39b223fe8d0a0e5c4f27ead9083c756cc2").is_some());
        assert!(m.quote("solana", "so11111111111111111111111111111111111111112").is_none());
    }
}
