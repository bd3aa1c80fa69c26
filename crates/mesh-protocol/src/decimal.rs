//! Exact decimal numbers that travel as strings.
//!
//! Prices are never floats: on the wire, in the database (`VARCHAR`) and in JSON they are the
//! plain decimal text (`"0.000016"`, `"3521.07"`). Parsing from the wire is strict and bounded:
//! an optional `-`, digits, an optional `.` and digits, at most [`Decimal::MAX_LEN`] characters,
//! so a hostile peer cannot make us build a number with a billion digits.
//!
//! The value is kept as its canonical text (no leading zeros, no trailing fractional zeros,
//! no negative zero), which is what the wire, the tables and JSON carry; the exact numeric
//! value ([`BigDecimal`]) is made only when arithmetic needs it. Relays therefore never pay
//! for big-number conversions on the hot path.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use bigdecimal::BigDecimal;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An exact decimal number in plain notation, kept as canonical text.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Decimal(Box<str>);

/// Why a text is not a decimal number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    /// Longer than [`Decimal::MAX_LEN`].
    #[error("decimal text is {0} characters long; at most {max} allowed", max = Decimal::MAX_LEN)]
    TooLong(usize),
    /// Not of the form `-?digits(.digits)?`.
    #[error("{0:?} is not a plain decimal number")]
    Malformed(String),
    /// The value cannot be written in at most [`Decimal::MAX_LEN`] plain characters.
    #[error("decimal value is out of the representable range")]
    OutOfRange,
}

impl Decimal {
    /// Longest accepted text: enough for 38 significant digits on either side of the point.
    pub const MAX_LEN: usize = 80;

    /// Wraps a [`BigDecimal`] whose plain text fits [`Decimal::MAX_LEN`] characters.
    pub fn new(value: BigDecimal) -> Result<Self, DecimalError> {
        // Bound the exponent before asking for the plain text, which would otherwise allocate
        // one character per unit of exponent. The scale can be anywhere in the i64 range
        // (`1e9223372036854775807` parses), so the length is computed in i128, where neither
        // `scale + 1` nor `digits - scale` can overflow.
        let (digits, scale) = value.as_bigint_and_exponent();
        let digit_count =
            i128::try_from(digits.to_string().trim_start_matches('-').len()).unwrap_or(i128::MAX);
        let scale = i128::from(scale);
        let plain_len = if scale >= 0 { digit_count.max(scale + 1) } else { digit_count - scale };
        if plain_len.saturating_add(2) > Self::MAX_LEN as i128 {
            return Err(DecimalError::OutOfRange);
        }
        Ok(Self(canonical(&value.normalized().to_plain_string())))
    }

    /// Parses a number in any notation BigDecimal accepts (including exponents such as
    /// `1.6e-05`, as JSON numbers from Birdeye have) and stores it exactly.
    pub fn parse_any(text: &str) -> Result<Self, DecimalError> {
        if text.len() > Self::MAX_LEN {
            return Err(DecimalError::TooLong(text.len()));
        }
        let value =
            BigDecimal::from_str(text).map_err(|_| DecimalError::Malformed(text.to_owned()))?;
        Self::new(value)
    }

    /// The exact value, for arithmetic.
    pub fn value(&self) -> BigDecimal {
        // The text was checked to be plain decimal notation when this value was made.
        BigDecimal::from_str(&self.0).unwrap_or_default()
    }

    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `true` when strictly greater than zero.
    pub fn is_positive(&self) -> bool {
        !self.0.starts_with('-') && !self.is_zero()
    }

    /// `true` when zero.
    pub fn is_zero(&self) -> bool {
        &*self.0 == "0"
    }
}

/// Canonical form of text already known to match `-?[0-9]+(\.[0-9]+)?`.
fn canonical(text: &str) -> Box<str> {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    if int == "0" && frac.is_empty() {
        return "0".into();
    }
    let mut out = String::with_capacity(text.len());
    if negative {
        out.push('-');
    }
    out.push_str(int);
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    out.into_boxed_str()
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Decimal {
    /// Numeric order.
    fn cmp(&self, other: &Self) -> Ordering {
        if self.0 == other.0 {
            return Ordering::Equal;
        }
        self.value().cmp(&other.value())
    }
}

impl FromStr for Decimal {
    type Err = DecimalError;

    /// Strict plain notation, as on the wire: `-?[0-9]+(\.[0-9]+)?`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() > Self::MAX_LEN {
            return Err(DecimalError::TooLong(text.len()));
        }
        let unsigned = text.strip_prefix('-').unwrap_or(text);
        let (int, frac) = match unsigned.split_once('.') {
            Some((int, frac)) => (int, Some(frac)),
            None => (unsigned, None),
        };
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(int) || !frac.is_none_or(all_digits) {
            return Err(DecimalError::Malformed(text.to_owned()));
        }
        Ok(Self(canonical(text)))
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Decimal({self})")
    }
}

impl From<u32> for Decimal {
    fn from(value: u32) -> Self {
        Self(value.to_string().into_boxed_str())
    }
}

impl Serialize for Decimal {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Decimal {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DecimalVisitor;
        impl Visitor<'_> for DecimalVisitor {
            type Value = Decimal;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a plain decimal number as a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Decimal, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(DecimalVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_round_trips_exactly() {
        for text in ["0.000016", "3521.07", "1", "-1.93", "120.123456789012345678901234567"] {
            let d: Decimal = text.parse().unwrap();
            assert_eq!(d.to_string(), text);
        }
        // Trailing zeros are not significant.
        assert_eq!("1.500".parse::<Decimal>().unwrap().to_string(), "1.5");
    }

    #[test]
    fn strict_parser_rejects_other_notations() {
        for bad in ["", "-", ".5", "5.", "1e5", "+1", " 1", "1 ", "0x10", "NaN", "1.2.3", "١"] {
            assert!(bad.parse::<Decimal>().is_err(), "{bad:?} accepted");
        }
        assert_eq!("9".repeat(81).parse::<Decimal>(), Err(DecimalError::TooLong(81)));
    }

    #[test]
    fn exponent_notation_is_converted_without_floats() {
        let d = Decimal::parse_any("1.6e-05").unwrap();
        assert_eq!(d.to_string(), "0.000016");
        let d = Decimal::parse_any("0.1").unwrap();
        assert_eq!(d.to_string(), "0.1");
        assert_eq!(Decimal::parse_any("1e-999999999"), Err(DecimalError::OutOfRange));
        assert_eq!(Decimal::parse_any("1e999999999"), Err(DecimalError::OutOfRange));
    }

    #[test]
    fn exponents_at_the_ends_of_the_i64_range_are_out_of_range_not_a_panic() {
        // Found by the birdeye_parser fuzz target: the plain length overflowed i64.
        for text in [
            "1125899906842624e9223372036854775807",
            "1e9223372036854775807",
            "-1e9223372036854775807",
            "1e-9223372036854775807",
            "0e9223372036854775807",
        ] {
            assert_eq!(Decimal::parse_any(text), Err(DecimalError::OutOfRange), "{text}");
        }
        // Where the scale itself would leave i64, BigDecimal refuses the text.
        for text in ["1.5e-9223372036854775807", "1e-9223372036854775809"] {
            assert!(Decimal::parse_any(text).is_err(), "{text}");
        }
    }

    #[test]
    fn sign_checks() {
        assert!("0.0001".parse::<Decimal>().unwrap().is_positive());
        assert!(!"0".parse::<Decimal>().unwrap().is_positive());
        assert!(!"-3".parse::<Decimal>().unwrap().is_positive());
        assert!("0.000".parse::<Decimal>().unwrap().is_zero());
        assert!("-0.0".parse::<Decimal>().unwrap().is_zero());
    }

    #[test]
    fn canonical_text_makes_equal_values_equal() {
        for (a, b) in [("1.50", "1.5"), ("007", "7"), ("-0", "0"), ("0.10", "000.1"), ("5.0", "5")]
        {
            assert_eq!(a.parse::<Decimal>().unwrap(), b.parse::<Decimal>().unwrap(), "{a} {b}");
        }
        assert_eq!("-0.000".parse::<Decimal>().unwrap().to_string(), "0");
    }

    #[test]
    fn order_is_numeric() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        assert!(d("9") < d("10"));
        assert!(d("-2") < d("-1.5"));
        assert!(d("0.000016") < d("0.0001"));
        assert_eq!(d("2.50").value(), BigDecimal::from_str("2.5").unwrap());
    }
}
