//! Birdeye answer bodies to exact prices.
//!
//! Prices arrive as JSON numbers (floats such as `151.37` or `1.6e-05`). They are taken as the
//! number's text ([`RawValue`]) and converted with [`Decimal::parse_any`], never through `f64`,
//! so `0.1` stays `0.1`. A token whose entry is `null`, has no `value`, or is absent from the
//! answer is reported missing; nothing is ever made up for it.

use std::collections::HashMap;

use mesh_protocol::Decimal;
use mesh_protocol::validate::MAX_CHANGE_24H_LEN;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::Error;

/// One token's price as Birdeye reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPrice {
    /// Chain asked for (`x-chain`).
    pub chain: String,
    /// Token address, as asked for.
    pub address: String,
    /// Price in USD, exactly as the JSON number's text said.
    pub value: Decimal,
    /// 24-hour change in percent, when given and representable within the
    /// [`MAX_CHANGE_24H_LEN`] characters every store holds (a longer fraction is truncated).
    pub change_24h: Option<Decimal>,
    /// Birdeye's `updateUnixTime` (seconds), when given.
    pub update_unix_time: Option<i64>,
    /// Liquidity in USD, when asked for with `include_liquidity=true`.
    pub liquidity: Option<Decimal>,
    /// When this client received the answer (Unix milliseconds): the time the price was
    /// observed.
    pub observed_at_ms: i64,
}

/// Why a token asked for has no price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MissingReason {
    /// Its entry was `null` (unknown token).
    Null,
    /// It was not in the answer at all.
    Absent,
    /// Its entry had `value: null` (for example below `check_liquidity`).
    NoValue,
    /// Its value was zero or negative, which the mesh cannot carry.
    NotPositive,
    /// Its value cannot be held exactly in the mesh's decimal range.
    Unrepresentable,
}

/// A token asked for that got no price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingToken {
    /// Chain asked for.
    pub chain: String,
    /// Token address.
    pub address: String,
    /// Why there is no price.
    pub reason: MissingReason,
}

/// The answer to a price request over one or more chains: what was priced, what was not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceSet {
    /// Tokens with a price, in the order asked for.
    pub prices: Vec<TokenPrice>,
    /// Tokens without one.
    pub missing: Vec<MissingToken>,
}

impl PriceSet {
    /// The price of `address` on `chain`, if it was priced.
    pub fn get(&self, chain: &str, address: &str) -> Option<&TokenPrice> {
        self.prices.iter().find(|p| p.chain == chain && p.address == address)
    }

    /// Appends another set (a further chunk or chain).
    pub fn extend(&mut self, other: PriceSet) {
        self.prices.extend(other.prices);
        self.missing.extend(other.missing);
    }
}

/// `{"success": ..., "message": ..., "data": ...}`.
#[derive(Deserialize)]
struct Envelope<'a> {
    success: Option<bool>,
    message: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// One token's `data` object; the numbers are kept as text.
#[derive(Deserialize)]
struct RawPrice<'a> {
    #[serde(borrow)]
    value: Option<&'a RawValue>,
    #[serde(rename = "priceChange24h", borrow)]
    price_change_24h: Option<&'a RawValue>,
    #[serde(rename = "updateUnixTime", borrow)]
    update_unix_time: Option<&'a RawValue>,
    #[serde(borrow)]
    liquidity: Option<&'a RawValue>,
}

/// The `message` of an error body, shortened, if there is one.
pub(crate) fn error_message(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct ErrorBody {
        message: Option<String>,
    }
    let message = serde_json::from_slice::<ErrorBody>(body).ok()?.message?;
    Some(shorten(&message))
}

fn shorten(message: &str) -> String {
    const MAX: usize = 200;
    if message.len() <= MAX {
        return message.to_owned();
    }
    let mut end = MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

/// Checks `success` and returns `data` (absent or `null` as `None`).
pub(crate) fn envelope_data(body: &[u8]) -> Result<Option<&RawValue>, Error> {
    let envelope: Envelope<'_> = serde_json::from_slice(body)
        .map_err(|e| Error::Decode { reason: format!("answer is not Birdeye JSON: {e}") })?;
    match envelope.success {
        Some(true) => Ok(envelope.data.filter(|d| d.get() != "null")),
        Some(false) => Err(Error::Unsuccessful {
            message: envelope.message.map(|m| shorten(&m)).unwrap_or_else(|| "(no message)".into()),
        }),
        None => Err(Error::Decode { reason: "answer has no \"success\" field".into() }),
    }
}

/// Reads a whole multi-price answer body (`GET`/`POST /defi/multi_price`) for the `requested`
/// addresses of `chain`, as [`BirdeyeClient::multi_price`](super::BirdeyeClient::multi_price)
/// does with each chunk: every requested address ends up once in [`PriceSet::prices`] (in the
/// order asked for) or once in [`PriceSet::missing`]. `observed_at_ms` is when the answer was
/// received.
///
/// It is public so that other programs (and the fuzz targets) can read saved answers; the body
/// may be any bytes: what is not Birdeye's JSON is an [`Error::Decode`], never a panic.
pub fn parse_multi_price_body(
    chain: &str,
    requested: &[String],
    body: &[u8],
    observed_at_ms: i64,
) -> Result<PriceSet, Error> {
    multi_price(chain, requested, envelope_data(body)?, observed_at_ms)
}

/// Reads a whole single-price answer body (`GET /defi/price`) for `address` on `chain`:
/// `Ok(None)` when Birdeye has no usable price for it, as
/// [`BirdeyeClient::price`](super::BirdeyeClient::price) reports.
pub fn parse_price_body(
    chain: &str,
    address: &str,
    body: &[u8],
    observed_at_ms: i64,
) -> Result<Option<TokenPrice>, Error> {
    Ok(single_price(chain, address, envelope_data(body)?, observed_at_ms)?.ok())
}

/// The `data` of a multi-price answer for `requested` addresses of `chain`.
fn multi_price(
    chain: &str,
    requested: &[String],
    data: Option<&RawValue>,
    observed_at_ms: i64,
) -> Result<PriceSet, Error> {
    let entries: HashMap<String, Option<RawPrice<'_>>> = match data {
        Some(data) => serde_json::from_str(data.get()).map_err(|e| Error::Decode {
            reason: format!("multi-price data is not an object of prices: {e}"),
        })?,
        None => HashMap::new(),
    };
    let mut set = PriceSet::default();
    for address in requested {
        // EVM addresses are checksummed; accept an answer keyed in another letter case.
        let entry = entries.get(address).or_else(|| {
            address.starts_with("0x").then(|| {
                entries.iter().find(|(k, _)| k.eq_ignore_ascii_case(address)).map(|(_, v)| v)
            })?
        });
        let outcome = match entry {
            None => Err(MissingReason::Absent),
            Some(None) => Err(MissingReason::Null),
            Some(Some(raw)) => token_price(chain, address, raw, observed_at_ms)?,
        };
        match outcome {
            Ok(price) => set.prices.push(price),
            Err(reason) => set.missing.push(MissingToken {
                chain: chain.to_owned(),
                address: address.clone(),
                reason,
            }),
        }
    }
    Ok(set)
}

/// The `data` of a single-price answer.
fn single_price(
    chain: &str,
    address: &str,
    data: Option<&RawValue>,
    observed_at_ms: i64,
) -> Result<Result<TokenPrice, MissingReason>, Error> {
    let Some(data) = data else {
        return Ok(Err(MissingReason::Null));
    };
    let raw: RawPrice<'_> = serde_json::from_str(data.get())
        .map_err(|e| Error::Decode { reason: format!("price data is not a price object: {e}") })?;
    token_price(chain, address, &raw, observed_at_ms)
}

fn token_price(
    chain: &str,
    address: &str,
    raw: &RawPrice<'_>,
    observed_at_ms: i64,
) -> Result<Result<TokenPrice, MissingReason>, Error> {
    let Some(value) = raw.value.filter(|v| v.get() != "null") else {
        return Ok(Err(MissingReason::NoValue));
    };
    let value = match number(value)? {
        Some(value) => value,
        None => return Ok(Err(MissingReason::Unrepresentable)),
    };
    if !value.is_positive() {
        return Ok(Err(MissingReason::NotPositive));
    }
    // The change is informative only: a strange one is dropped, not fatal, and a long one is
    // brought within what the validator and every store accept, never left to fail a batch.
    let change_24h =
        raw.price_change_24h.and_then(|c| number(c).ok().flatten()).and_then(fit_change);
    let liquidity = raw.liquidity.and_then(|l| number(l).ok().flatten());
    let update_unix_time = raw.update_unix_time.and_then(|t| t.get().parse::<i64>().ok());
    Ok(Ok(TokenPrice {
        chain: chain.to_owned(),
        address: address.to_owned(),
        value,
        change_24h,
        update_unix_time,
        liquidity,
        observed_at_ms,
    }))
}

/// `change` within [`MAX_CHANGE_24H_LEN`] characters: as it is when it fits, its fraction
/// truncated when only the fraction is too long (a percent change loses nothing that matters
/// past 40 decimals), `None` when even its integer part is too long (a 52-digit "percentage"
/// is not a change anyone can use).
fn fit_change(change: Decimal) -> Option<Decimal> {
    let text = change.as_str();
    if text.len() <= MAX_CHANGE_24H_LEN {
        return Some(change);
    }
    let point = text.find('.')?;
    if point >= MAX_CHANGE_24H_LEN - 1 {
        return None;
    }
    // Canonical text is ASCII, so any index is a character boundary.
    let cut = Decimal::parse_any(&text[..MAX_CHANGE_24H_LEN]).ok()?;
    // "-0.000...01" truncated to zero is a change of zero, not a negative one.
    Some(cut)
}

/// A JSON number (or a string holding one) as an exact decimal; `None` when it is a number
/// outside the mesh's decimal range, an error when it is not a number at all.
fn number(raw: &RawValue) -> Result<Option<Decimal>, Error> {
    let text = raw.get();
    let text = if text.starts_with('"') {
        serde_json::from_str::<String>(text)
            .map_err(|e| Error::Decode { reason: format!("bad string number {text}: {e}") })?
    } else {
        text.to_owned()
    };
    let looks_numeric =
        text.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
            && text.bytes().any(|b| b.is_ascii_digit());
    if !looks_numeric {
        return Err(Error::Decode { reason: format!("{} is not a number", shorten(&text)) });
    }
    match Decimal::parse_any(&text) {
        Ok(value) => Ok(Some(value)),
        Err(mesh_protocol::DecimalError::Malformed(_)) => {
            Err(Error::Decode { reason: format!("{} is not a number", shorten(&text)) })
        }
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SOL: &str = "So11111111111111111111111111111111111111112";
    const BONK: &str = "DezXAZ8z7PnrnRJjz3wXBoRgixCa6xjnB7YaB1pPB263";
    const JUP: &str = "JUPyiwrYJFskUPiHa7hkeR8VUtAeFoSYbKedZNsDvCN";
    const UNKNOWN: &str = "Unknown1111111111111111111111111111111111111";

    fn multi(body: &str, requested: &[&str]) -> Result<PriceSet, Error> {
        let requested: Vec<String> = requested.iter().map(|s| s.to_string()).collect();
        let data = envelope_data(body.as_bytes())?;
        multi_price("solana", &requested, data, 1)
    }

    #[test]
    fn float_text_becomes_the_exact_decimal() {
        let body = format!(
            r#"{{"success":true,"data":{{
                "{SOL}":{{"value":151.23456789012345,"priceChange24h":-1.93,"updateUnixTime":1745058945}},
                "{BONK}":{{"value":1.6e-05,"priceChange24h":0.5}},
                "{JUP}":{{"value":0.1}}}}}}"#
        );
        let set = multi(&body, &[SOL, BONK, JUP]).unwrap();
        assert!(set.missing.is_empty());
        let sol = set.get("solana", SOL).unwrap();
        assert_eq!(sol.value.to_string(), "151.23456789012345");
        assert_eq!(sol.change_24h.as_ref().unwrap().to_string(), "-1.93");
        assert_eq!(sol.update_unix_time, Some(1745058945));
        assert_eq!(set.get("solana", BONK).unwrap().value.to_string(), "0.000016");
        // Through f64 0.1 would not be exactly one tenth; as text it is.
        assert_eq!(set.get("solana", JUP).unwrap().value.to_string(), "0.1");
        assert_eq!(
            set.prices.iter().map(|p| p.address.as_str()).collect::<Vec<_>>(),
            [SOL, BONK, JUP]
        );
    }

    #[test]
    fn null_absent_and_valueless_tokens_are_missing_not_invented() {
        let body = format!(
            r#"{{"success":true,"data":{{"{SOL}":{{"value":150.5}},"{UNKNOWN}":null,
                "{JUP}":{{"value":null,"priceChange24h":2.0}},"{BONK}":{{"value":0}}}}}}"#
        );
        let set = multi(&body, &[SOL, UNKNOWN, JUP, BONK, "Absent11111111111111111111111111111"])
            .unwrap();
        assert_eq!(set.prices.len(), 1);
        let reasons: Vec<_> = set.missing.iter().map(|m| m.reason).collect();
        assert_eq!(
            reasons,
            [
                MissingReason::Null,
                MissingReason::NoValue,
                MissingReason::NotPositive,
                MissingReason::Absent
            ]
        );
    }

    #[test]
    fn data_null_or_absent_makes_everything_missing() {
        for body in [
            r#"{"success":true,"data":null}"#,
            r#"{"success":true}"#,
            r#"{"success":true,"data":{}}"#,
        ] {
            let set = multi(body, &[SOL]).unwrap();
            assert!(set.prices.is_empty(), "{body}");
            assert_eq!(set.missing.len(), 1);
        }
    }

    #[test]
    fn success_false_is_an_error_with_the_message() {
        let err =
            multi(r#"{"success":false,"message":"Failed to get price"}"#, &[SOL]).unwrap_err();
        assert!(
            matches!(&err, Error::Unsuccessful { message } if message == "Failed to get price"),
            "{err:?}"
        );
        let err = multi(r#"{"success":false}"#, &[SOL]).unwrap_err();
        assert!(matches!(err, Error::Unsuccessful { .. }));
    }

    #[test]
    fn malformed_answers_are_decode_errors() {
        for body in [
            "not json",
            r#"{"data":{}}"#,
            r#"{"success":true,"data":[1,2]}"#,
            r#"{"success":true,"data":{"So11111111111111111111111111111111111111112":{"value":"abc"}}}"#,
            r#"{"success":true,"data":{"So11111111111111111111111111111111111111112":{"value":true}}}"#,
        ] {
            let err = multi(body, &[SOL]).unwrap_err();
            assert!(matches!(err, Error::Decode { .. }), "{body}: {err:?}");
        }
    }

    #[test]
    fn string_numbers_and_extreme_values() {
        let body = format!(
            r#"{{"success":true,"data":{{"{SOL}":{{"value":"150.25"}},"{BONK}":{{"value":1e-300}}}}}}"#
        );
        let set = multi(&body, &[SOL, BONK]).unwrap();
        assert_eq!(set.get("solana", SOL).unwrap().value.to_string(), "150.25");
        assert_eq!(set.missing[0].reason, MissingReason::Unrepresentable);
    }

    #[test]
    fn extreme_changes_fit_the_stores_or_are_dropped_and_the_price_stays() {
        let long_fraction = format!("-1.{}", "3".repeat(70));
        let body = format!(
            r#"{{"success":true,"data":{{
                "{SOL}":{{"value":1e-40,"priceChange24h":1234567890123456789012345678901234567890123456789012}},
                "{BONK}":{{"value":1e40,"priceChange24h":{long_fraction}}},
                "{JUP}":{{"value":2,"priceChange24h":1e-60}}}}}}"#
        );
        let set = multi(&body, &[SOL, BONK, JUP]).unwrap();
        assert!(set.missing.is_empty(), "{:?}", set.missing);
        let sol = set.get("solana", SOL).unwrap();
        assert_eq!(sol.value.to_string(), format!("0.{}1", "0".repeat(39)));
        assert_eq!(sol.change_24h, None, "a 52-digit change cannot be held");
        let bonk = set.get("solana", BONK).unwrap();
        assert_eq!(bonk.value.to_string(), format!("1{}", "0".repeat(40)));
        let change = bonk.change_24h.as_ref().unwrap().to_string();
        assert_eq!(change, format!("-1.{}", "3".repeat(47)));
        assert_eq!(change.len(), MAX_CHANGE_24H_LEN);
        // 1e-60 is 62 characters: truncated to 50, it is a change of zero.
        assert_eq!(set.get("solana", JUP).unwrap().change_24h.as_ref().unwrap().as_str(), "0");
        for p in &set.prices {
            let update = mesh_protocol::PriceUpdate {
                asset: p.address.clone(),
                blockchain: p.chain.clone(),
                price: p.value.clone(),
                timestamp_ms: 1,
                change_24h: p.change_24h.clone(),
                source_timestamp_ms: None,
            };
            assert_eq!(mesh_protocol::validate::check_price(&update, 1), Ok(()), "{p:?}");
        }
    }

    #[test]
    fn a_change_truncated_to_nothing_is_zero() {
        let tiny = Decimal::parse_any(&format!("-0.{}1", "0".repeat(60))).unwrap();
        assert_eq!(fit_change(tiny).unwrap().to_string(), "0");
        assert_eq!(fit_change("12.5".parse().unwrap()).unwrap().to_string(), "12.5");
        assert_eq!(
            fit_change(Decimal::parse_any(&"9".repeat(50)).unwrap()).unwrap().as_str().len(),
            50
        );
        assert_eq!(fit_change(Decimal::parse_any(&format!("{}.5", "9".repeat(49))).unwrap()), None);
    }

    #[test]
    fn evm_addresses_match_in_any_letter_case() {
        let weth = "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2";
        let body = r#"{"success":true,"data":{"0xc02aaa39b223fe8d0a0e5c4f27ead9083c756cc2":{"value":3521.07}}}"#;
        let requested = vec![weth.to_owned()];
        let set = multi_price("ethereum", &requested, envelope_data(body.as_bytes()).unwrap(), 1)
            .unwrap();
        assert_eq!(set.get("ethereum", weth).unwrap().value.to_string(), "3521.07");
    }

    #[test]
    fn single_price_shapes() {
        let body = br#"{"success":true,"data":{"value":0.3862,"updateUnixTime":1745058945,
            "updateHumanTime":"2025-04-19T10:35:45","priceChange24h":1.93,"priceInNative":0.00278,
            "liquidity":10854103.38,"isScaledUiToken":false}}"#;
        let price = single_price("solana", JUP, envelope_data(body).unwrap(), 1).unwrap().unwrap();
        assert_eq!(price.value.to_string(), "0.3862");
        assert_eq!(price.liquidity.unwrap().to_string(), "10854103.38");
        let none = single_price(
            "solana",
            JUP,
            envelope_data(br#"{"success":true,"data":null}"#).unwrap(),
            1,
        );
        assert_eq!(none.unwrap(), Err(MissingReason::Null));
    }

    #[test]
    fn error_messages_are_read_and_shortened() {
        assert_eq!(
            error_message(br#"{"success":false,"message":"Unauthorized"}"#).as_deref(),
            Some("Unauthorized")
        );
        assert_eq!(error_message(b"<html>"), None);
        let long = format!(r#"{{"message":"{}"}}"#, "x".repeat(500));
        assert_eq!(error_message(long.as_bytes()).unwrap().len(), 203);
    }
}
