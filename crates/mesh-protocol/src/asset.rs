//! One form per token address.
//!
//! An EVM address (`0x` and 40 hex digits) may be written in lower case or with the EIP-55
//! checksum's mixed case; both name one token. Mesh serves, stores and keys such an address in
//! lower case: the form in which two writings of one token are equal byte for byte. Other
//! addresses (Solana's base58, where case matters) are left exactly as they are.
//!
//! The signed body is never rewritten (that would break its signature): a provider of an
//! older release may sign a checksummed address, and every node canonicalises it when it keys
//! and serves the price.

use std::borrow::Cow;

/// `true` for `0x` (or `0X`) followed by exactly 40 hexadecimal digits.
pub fn is_evm_address(asset: &str) -> bool {
    let bytes = asset.as_bytes();
    bytes.len() == 42
        && bytes[0] == b'0'
        && (bytes[1] == b'x' || bytes[1] == b'X')
        && bytes[2..].iter().all(u8::is_ascii_hexdigit)
}

/// The canonical form of `asset`: an EVM address in lower case, anything else unchanged.
pub fn canonical_asset(asset: &str) -> Cow<'_, str> {
    if is_evm_address(asset) && asset.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(asset.to_ascii_lowercase())
    } else {
        Cow::Borrowed(asset)
    }
}

/// Whether `a` and `b` name the same asset: equal, or the same EVM address in any case.
pub fn same_asset(a: &str, b: &str) -> bool {
    a == b || (is_evm_address(a) && a.eq_ignore_ascii_case(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WETH: &str = "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2";

    #[test]
    fn evm_addresses_are_lower_case_and_nothing_else_changes() {
        assert_eq!(canonical_asset(WETH), "0xc02aaa39b223fe8d0a0e5c4f27ead9083c756cc2");
        assert_eq!(
            canonical_asset("0XC02AAA39B223FE8D0A0E5C4F27EAD9083C756CC2"),
            canonical_asset(WETH)
        );
        assert!(matches!(
            canonical_asset("0xc02aaa39b223fe8d0a0e5c4f27ead9083c756cc2"),
            Cow::Borrowed(_)
        ));
        for other in [
            "So11111111111111111111111111111111111111112",
            "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v",
            "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc", // 39 digits
            "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2A", // 41 digits
            "0xG02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2", // not hex
        ] {
            assert_eq!(canonical_asset(other), other);
        }
        assert!(same_asset(WETH, "0xc02aaa39b223fe8d0a0e5c4f27ead9083c756cc2"));
        assert!(!same_asset(
            "So11111111111111111111111111111111111111112",
            "so11111111111111111111111111111111111111112"
        ));
    }
}
