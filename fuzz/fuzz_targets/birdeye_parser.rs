//! The provider's Birdeye answer parser (`parse_multi_price_body`, `parse_price_body`), two ways:
//! arbitrary bytes as the body, and JSON shaped like Birdeye's answers whose numbers are
//! arbitrary texts (huge exponents, signs, strings, non-numbers), which is where exact decimal
//! conversion can go wrong.
//!
//! Beyond "no panic": every address asked for ends up exactly once, priced or missing, in the
//! order asked for; every price is positive, on the chain asked for, and its text is the
//! canonical plain decimal the mesh carries.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use mesh_protocol::Decimal;
use mesh_provider::client::{parse_multi_price_body, parse_price_body};
use mesh_provider::{PriceSet, TokenPrice};

const CHAIN: &str = "solana";
/// Addresses the shaped answers use (an EVM one to reach the letter-case matching).
const ADDRESSES: [&str; 4] = [
    "So11111111111111111111111111111111111111112",
    "DezXAZ8z7PnrnRJjz3wXBoRgixCa6xjnB7YaB1pPB263",
    "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2",
    "0xc02aaa39b223fe8d0a0e5c4f27ead9083c756cc2",
];

#[derive(Debug, Arbitrary)]
enum Input<'a> {
    Raw { body: &'a [u8], requested: Vec<&'a str> },
    Shaped { success: Option<bool>, entries: Vec<(Address<'a>, Entry<'a>)>, requested: Vec<u8> },
}

#[derive(Debug, Arbitrary)]
enum Address<'a> {
    Known(u8),
    Any(&'a str),
}

impl Address<'_> {
    fn text(&self) -> String {
        match self {
            Address::Known(i) => ADDRESSES[usize::from(*i) % ADDRESSES.len()].to_owned(),
            Address::Any(s) => (*s).to_owned(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Entry<'a> {
    Null,
    Price {
        value: Option<Number<'a>>,
        change_24h: Option<Number<'a>>,
        update_unix_time: Option<Number<'a>>,
        liquidity: Option<Number<'a>>,
    },
}

/// A JSON value where Birdeye puts a number.
#[derive(Debug, Arbitrary)]
enum Number<'a> {
    /// `[-]int[.frac][e[-]exp]`: a JSON number, exponents up to the i64 range.
    Scientific {
        negative: bool,
        int: u64,
        frac: Option<u64>,
        exp: Option<i64>,
    },
    /// The same kinds of text, as a JSON string.
    Quoted {
        negative: bool,
        int: u64,
        frac: Option<u64>,
        exp: Option<i64>,
    },
    /// Any text, as a JSON string.
    Text(&'a str),
    /// Any JSON token as it is (may make the document invalid).
    Token(&'a str),
    Null,
    Bool(bool),
}

impl Number<'_> {
    fn json(&self) -> String {
        let numeric = |negative: bool, int: u64, frac: Option<u64>, exp: Option<i64>| {
            let mut text = if negative { format!("-{int}") } else { int.to_string() };
            if let Some(frac) = frac {
                text.push_str(&format!(".{frac}"));
            }
            if let Some(exp) = exp {
                text.push_str(&format!("e{exp}"));
            }
            text
        };
        match self {
            Number::Scientific { negative, int, frac, exp } => {
                numeric(*negative, *int, *frac, *exp)
            }
            Number::Quoted { negative, int, frac, exp } => {
                format!("\"{}\"", numeric(*negative, *int, *frac, *exp))
            }
            Number::Text(text) => serde_json::Value::from(*text).to_string(),
            Number::Token(token) => (*token).to_owned(),
            Number::Null => "null".to_owned(),
            Number::Bool(b) => b.to_string(),
        }
    }
}

fuzz_target!(|input: Input<'_>| {
    match input {
        Input::Raw { body, requested } => {
            let requested: Vec<String> =
                requested.iter().take(8).map(|s| (*s).to_owned()).collect();
            parse(body, &requested);
        }
        Input::Shaped { success, entries, requested } => {
            let mut body = String::from("{");
            if let Some(success) = success {
                body.push_str(&format!("\"success\":{success},"));
            }
            let data: Vec<String> = entries
                .iter()
                .take(8)
                .map(|(address, entry)| {
                    let key = serde_json::Value::from(address.text()).to_string();
                    format!("{key}:{}", entry_json(entry))
                })
                .collect();
            body.push_str(&format!("\"data\":{{{}}}}}", data.join(",")));
            let mut requested: Vec<String> = requested
                .iter()
                .take(6)
                .map(|i| ADDRESSES[usize::from(*i) % ADDRESSES.len()].to_owned())
                .collect();
            requested.extend(entries.iter().take(2).map(|(address, _)| address.text()));
            parse(body.as_bytes(), &requested);
            // The single-price endpoint's `data` is one entry.
            if let Some((_, entry)) = entries.first() {
                let single = format!("{{\"success\":true,\"data\":{}}}", entry_json(entry));
                check_single(parse_price_body(CHAIN, ADDRESSES[0], single.as_bytes(), 1));
            }
        }
    }
});

fn entry_json(entry: &Entry<'_>) -> String {
    match entry {
        Entry::Null => "null".to_owned(),
        Entry::Price { value, change_24h, update_unix_time, liquidity } => {
            let fields: Vec<String> = [
                ("value", value),
                ("priceChange24h", change_24h),
                ("updateUnixTime", update_unix_time),
                ("liquidity", liquidity),
            ]
            .iter()
            .filter_map(|(name, number)| {
                number.as_ref().map(|n| format!("\"{name}\":{}", n.json()))
            })
            .collect();
            format!("{{{}}}", fields.join(","))
        }
    }
}

fn parse(body: &[u8], requested: &[String]) {
    if let Ok(set) = parse_multi_price_body(CHAIN, requested, body, 1) {
        check_set(&set, requested);
    }
    if let Some(address) = requested.first() {
        check_single(parse_price_body(CHAIN, address, body, 1));
    }
}

fn check_set(set: &PriceSet, requested: &[String]) {
    assert_eq!(
        set.prices.len() + set.missing.len(),
        requested.len(),
        "an address lost or invented"
    );
    let mut asked = requested.iter();
    for price in &set.prices {
        assert!(asked.any(|a| *a == price.address), "{} out of order or not asked", price.address);
        check_price(price);
    }
    for missing in &set.missing {
        assert!(requested.contains(&missing.address));
        assert_eq!(missing.chain, CHAIN);
    }
}

fn check_single(result: Result<Option<TokenPrice>, mesh_provider::BirdeyeError>) {
    if let Ok(Some(price)) = result {
        check_price(&price);
    }
}

fn check_price(price: &TokenPrice) {
    assert_eq!(price.chain, CHAIN);
    assert!(price.value.is_positive(), "non-positive price {}", price.value);
    // What every store holds (the guide's change_24h is VARCHAR(50)).
    assert!(price.change_24h.as_ref().is_none_or(|c| c.as_str().len() <= 50), "long change");
    for value in [Some(&price.value), price.change_24h.as_ref(), price.liquidity.as_ref()]
        .into_iter()
        .flatten()
    {
        // What the mesh carries: canonical plain text that the strict wire parser takes back.
        let text = value.as_str();
        assert!(text.len() <= Decimal::MAX_LEN, "{text} is too long for the wire");
        assert_eq!(text.parse::<Decimal>().as_ref(), Ok(value), "{text} is not canonical");
    }
}
