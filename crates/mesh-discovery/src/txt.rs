//! The TXT record of a mesh mDNS advertisement: encoding within DNS limits, and a parser for
//! whatever the network sends.
//!
//! | key | value | |
//! |---|---|---|
//! | `txtvers` | `1` | format version; absent means 1, anything else is refused |
//! | `peer_id` | base58 libp2p peer id | required |
//! | `role` | `provider` or `consumer` | required |
//! | `hop` | hop distance to the nearest provider, `0`..=`255` | absent or empty: unknown |
//! | `addr0` .. `addr15` | one listen multiaddr each, without `/p2p/<peer id>` | |
//!
//! Each `key=value` string is at most 255 bytes (one length byte in DNS), the whole record at
//! most [`MAX_TXT_BYTES`], so the advertisement fits in one mDNS packet; addresses that do not
//! fit are left out. Keys are case-insensitive and, as RFC 6763 section 6.4 asks, only the first
//! copy of a key counts. Unknown keys are ignored (room for later versions). An address that
//! does not parse, or names another peer, is skipped without refusing the record.

use std::str::FromStr;

use libp2p_identity::PeerId;
use multiaddr::Multiaddr;

use crate::addrs::split_p2p;
use crate::event::Role;

/// `txtvers` value of this format.
pub const TXT_VERSION: &str = "1";
/// Key of the format version.
pub const KEY_VERSION: &str = "txtvers";
/// Key of the peer id.
pub const KEY_PEER_ID: &str = "peer_id";
/// Key of the role.
pub const KEY_ROLE: &str = "role";
/// Key of the hop distance.
pub const KEY_HOP: &str = "hop";
/// Prefix of the address keys (`addr0`, `addr1`, ...).
pub const KEY_ADDR_PREFIX: &str = "addr";
/// Most addresses in one advertisement (keys `addr0` to `addr15`).
pub const MAX_ADDRS: usize = 16;
/// Longest `key=value` string of a TXT record (one length byte).
pub const MAX_TXT_STRING: usize = 255;
/// Largest TXT record we send, length bytes included; leaves room for the PTR, SRV and address
/// records in one 1452-byte mDNS packet.
pub const MAX_TXT_BYTES: usize = 900;
/// TXT strings looked at when parsing; the rest of an oversized record is ignored.
pub const MAX_PARSED_PAIRS: usize = 64;

/// What a node advertises about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertisement {
    /// Its libp2p peer id.
    pub peer_id: PeerId,
    /// Provider or consumer.
    pub role: Role,
    /// Hop distance to the nearest provider (0 for a provider), when known.
    pub hop_distance: Option<u8>,
    /// Listen addresses, without `/p2p` suffix.
    pub addrs: Vec<Multiaddr>,
}

/// An advertisement as TXT strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedTxt {
    /// `(key, value)` pairs in record order.
    pub properties: Vec<(String, String)>,
    /// Addresses left out because they did not fit ([`MAX_ADDRS`], [`MAX_TXT_STRING`] or
    /// [`MAX_TXT_BYTES`]).
    pub dropped_addrs: usize,
}

impl EncodedTxt {
    /// Size of the TXT record on the wire (one length byte per string).
    pub fn wire_len(&self) -> usize {
        self.properties.iter().map(|(k, v)| 1 + k.len() + 1 + v.len()).sum()
    }
}

/// Why a TXT record is not a mesh advertisement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxtError {
    /// `txtvers` is not [`TXT_VERSION`].
    #[error("unsupported txtvers {0:?}")]
    UnsupportedVersion(String),
    /// No `peer_id` key, or no value.
    #[error("no peer_id")]
    MissingPeerId,
    /// `peer_id` is not a libp2p peer id.
    #[error("peer_id {0:?} is not a libp2p peer id")]
    BadPeerId(String),
    /// No `role` key, or no value.
    #[error("no role")]
    MissingRole,
    /// `role` is neither `provider` nor `consumer`.
    #[error("role {0:?} is neither provider nor consumer")]
    BadRole(String),
    /// `hop` is not a number from 0 to 255.
    #[error("hop {0:?} is not a number 0..=255")]
    BadHop(String),
}

/// A bounded, printable excerpt of untrusted bytes for error messages and logs.
fn excerpt(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(64)]).into_owned()
}

impl Advertisement {
    /// Encodes the advertisement as TXT strings within the limits of the module docs; the
    /// addresses that do not fit are counted in [`EncodedTxt::dropped_addrs`].
    pub fn to_txt(&self) -> EncodedTxt {
        let mut properties = vec![
            (KEY_VERSION.to_owned(), TXT_VERSION.to_owned()),
            (KEY_PEER_ID.to_owned(), self.peer_id.to_base58()),
            (KEY_ROLE.to_owned(), self.role.as_str().to_owned()),
        ];
        if let Some(hop) = self.hop_distance {
            properties.push((KEY_HOP.to_owned(), hop.to_string()));
        }
        let mut size: usize = properties.iter().map(|(k, v)| 2 + k.len() + v.len()).sum();
        let mut dropped_addrs = 0;
        let mut index = 0;
        for addr in &self.addrs {
            let (addr, _) = split_p2p(addr);
            let key = format!("{KEY_ADDR_PREFIX}{index}");
            let value = addr.to_string();
            let len = key.len() + 1 + value.len();
            if index >= MAX_ADDRS || len > MAX_TXT_STRING || size + 1 + len > MAX_TXT_BYTES {
                dropped_addrs += 1;
                continue;
            }
            size += 1 + len;
            properties.push((key, value));
            index += 1;
        }
        EncodedTxt { properties, dropped_addrs }
    }

    /// Parses TXT strings as `(key, value)` pairs (`None`: a key without `=`). Never panics and
    /// looks at no more than [`MAX_PARSED_PAIRS`] strings and [`MAX_ADDRS`] addresses, of which
    /// it keeps at most `max_addrs` (in key order), whatever the input.
    pub fn from_txt<'a, I>(pairs: I, max_addrs: usize) -> Result<Self, TxtError>
    where
        I: IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    {
        let mut version = None;
        let mut peer = None;
        let mut role = None;
        let mut hop = None;
        let mut addrs: [Option<&[u8]>; MAX_ADDRS] = [None; MAX_ADDRS];
        for (key, value) in pairs.into_iter().take(MAX_PARSED_PAIRS) {
            let value = value.unwrap_or_default();
            let slot = if key.eq_ignore_ascii_case(KEY_VERSION) {
                &mut version
            } else if key.eq_ignore_ascii_case(KEY_PEER_ID) {
                &mut peer
            } else if key.eq_ignore_ascii_case(KEY_ROLE) {
                &mut role
            } else if key.eq_ignore_ascii_case(KEY_HOP) {
                &mut hop
            } else {
                match addr_index(key) {
                    Some(i) => &mut addrs[i],
                    None => continue,
                }
            };
            if slot.is_none() {
                *slot = Some(value);
            }
        }
        if let Some(v) = version
            && v != TXT_VERSION.as_bytes()
        {
            return Err(TxtError::UnsupportedVersion(excerpt(v)));
        }
        let peer_id = match peer {
            None | Some([]) => return Err(TxtError::MissingPeerId),
            Some(bytes) => std::str::from_utf8(bytes)
                .ok()
                .and_then(|s| PeerId::from_str(s).ok())
                .ok_or_else(|| TxtError::BadPeerId(excerpt(bytes)))?,
        };
        let role = match role {
            None | Some([]) => return Err(TxtError::MissingRole),
            Some(bytes) => std::str::from_utf8(bytes)
                .ok()
                .and_then(|s| Role::from_str(s).ok())
                .ok_or_else(|| TxtError::BadRole(excerpt(bytes)))?,
        };
        let hop_distance = match hop {
            None | Some([]) => None,
            Some(bytes) => Some(
                std::str::from_utf8(bytes)
                    .ok()
                    .filter(|s| s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u8>().ok())
                    .ok_or_else(|| TxtError::BadHop(excerpt(bytes)))?,
            ),
        };
        let addrs = addrs
            .iter()
            .flatten()
            .filter_map(|bytes| parse_addr(bytes, &peer_id))
            .take(max_addrs)
            .collect();
        Ok(Advertisement { peer_id, role, hop_distance, addrs })
    }
}

/// `addr0`..`addr15` (case-insensitive, no leading zeros) to 0..=15.
fn addr_index(key: &str) -> Option<usize> {
    let prefix = key.get(..KEY_ADDR_PREFIX.len())?;
    if !prefix.eq_ignore_ascii_case(KEY_ADDR_PREFIX) {
        return None;
    }
    let digits = &key[KEY_ADDR_PREFIX.len()..];
    let canonical = matches!(digits.len(), 1 | 2)
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !(digits.len() == 2 && digits.starts_with('0'));
    let index: usize = if canonical { digits.parse().ok()? } else { return None };
    (index < MAX_ADDRS).then_some(index)
}

/// One advertised address; `None` when it does not parse or names another peer.
fn parse_addr(bytes: &[u8], peer_id: &PeerId) -> Option<Multiaddr> {
    let addr = Multiaddr::from_str(std::str::from_utf8(bytes).ok()?).ok()?;
    match split_p2p(&addr) {
        (base, Some(id)) if id == *peer_id && !base.is_empty() => Some(base),
        (_, Some(_)) => None,
        (addr, None) if !addr.is_empty() => Some(addr),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parse(pairs: &[(&str, Option<&str>)]) -> Result<Advertisement, TxtError> {
        Advertisement::from_txt(pairs.iter().map(|(k, v)| (*k, v.map(str::as_bytes))), MAX_ADDRS)
    }

    fn parse_encoded(txt: &EncodedTxt) -> Result<Advertisement, TxtError> {
        Advertisement::from_txt(
            txt.properties.iter().map(|(k, v)| (k.as_str(), Some(v.as_bytes()))),
            MAX_ADDRS,
        )
    }

    fn sample(addrs: usize) -> Advertisement {
        Advertisement {
            peer_id: PeerId::random(),
            role: Role::Provider,
            hop_distance: Some(0),
            addrs: (0..addrs)
                .map(|i| format!("/ip4/192.168.1.{i}/tcp/{}", 4000 + i).parse().unwrap())
                .collect(),
        }
    }

    #[test]
    fn encode_then_parse_gives_the_advertisement_back() {
        for (role, hop) in
            [(Role::Provider, Some(0)), (Role::Consumer, Some(7)), (Role::Consumer, None)]
        {
            let adv = Advertisement { role, hop_distance: hop, ..sample(3) };
            let txt = adv.to_txt();
            assert_eq!(txt.dropped_addrs, 0);
            assert_eq!(parse_encoded(&txt).unwrap(), adv);
            let keys: Vec<&str> = txt.properties.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys.contains(&"hop"), hop.is_some(), "hop is absent when unknown");
        }
    }

    #[test]
    fn encoding_stays_within_dns_limits() {
        // Long IPv6 + QUIC addresses: the record is cut at MAX_TXT_BYTES, never beyond.
        let mut adv = sample(0);
        adv.addrs = (0..40)
            .map(|i| {
                format!("/ip6/2001:db8:aaaa:bbbb:cccc:dddd:eeee:{i:x}/udp/65000/quic-v1")
                    .parse()
                    .unwrap()
            })
            .collect();
        let txt = adv.to_txt();
        assert!(txt.wire_len() <= MAX_TXT_BYTES, "{}", txt.wire_len());
        assert!(txt.properties.iter().all(|(k, v)| k.len() + 1 + v.len() <= MAX_TXT_STRING));
        let kept = txt.properties.iter().filter(|(k, _)| k.starts_with("addr")).count();
        assert!(kept > 0 && kept <= MAX_ADDRS);
        assert_eq!(kept + txt.dropped_addrs, 40);
        // Short addresses: cut at MAX_ADDRS.
        let txt = sample(20).to_txt();
        assert_eq!(txt.dropped_addrs, 4);
        assert_eq!(parse_encoded(&txt).unwrap().addrs.len(), MAX_ADDRS);
    }

    #[test]
    fn an_address_longer_than_a_txt_string_is_left_out() {
        let mut adv = sample(1);
        let long = format!("/dns4/{}.example/tcp/1", "a".repeat(240));
        adv.addrs.insert(0, long.parse().unwrap());
        let txt = adv.to_txt();
        assert_eq!(txt.dropped_addrs, 1);
        assert_eq!(parse_encoded(&txt).unwrap().addrs, adv.addrs[1..].to_vec());
    }

    #[test]
    fn required_fields_and_bad_values_are_refused() {
        let peer = PeerId::random().to_base58();
        let p = Some(peer.as_str());
        assert_eq!(parse(&[("role", Some("provider"))]), Err(TxtError::MissingPeerId));
        assert_eq!(
            parse(&[("peer_id", Some("")), ("role", Some("provider"))]),
            Err(TxtError::MissingPeerId)
        );
        assert_eq!(parse(&[("peer_id", p)]), Err(TxtError::MissingRole));
        assert!(matches!(
            parse(&[("peer_id", Some("xyz")), ("role", Some("provider"))]),
            Err(TxtError::BadPeerId(_))
        ));
        assert!(matches!(
            parse(&[("peer_id", p), ("role", Some("boss"))]),
            Err(TxtError::BadRole(_))
        ));
        for bad in ["256", "-1", "+1", "0x1", "1 ", "0001", "abc"] {
            assert!(
                matches!(
                    parse(&[("peer_id", p), ("role", Some("consumer")), ("hop", Some(bad))]),
                    Err(TxtError::BadHop(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            parse(&[("txtvers", Some("2")), ("peer_id", p), ("role", Some("consumer"))]),
            Err(TxtError::UnsupportedVersion(_))
        ));
        let ok = parse(&[("peer_id", p), ("role", Some("consumer")), ("hop", Some(""))]).unwrap();
        assert_eq!(ok.hop_distance, None, "an empty hop is unknown");
        let ok = parse(&[("peer_id", p), ("role", Some("consumer")), ("hop", None)]).unwrap();
        assert_eq!(ok.hop_distance, None);
    }

    #[test]
    fn first_copy_of_a_key_wins_and_keys_are_case_insensitive() {
        let a = PeerId::random().to_base58();
        let b = PeerId::random().to_base58();
        let adv = parse(&[
            ("PEER_ID", Some(a.as_str())),
            ("peer_id", Some(b.as_str())),
            ("Role", Some("provider")),
            ("role", Some("consumer")),
            ("ADDR1", Some("/ip4/10.0.0.2/tcp/2")),
            ("addr0", Some("/ip4/10.0.0.1/tcp/1")),
            ("addr0", Some("/ip4/10.0.0.9/tcp/9")),
        ])
        .unwrap();
        assert_eq!(adv.peer_id.to_base58(), a);
        assert_eq!(adv.role, Role::Provider);
        let expected: Vec<Multiaddr> =
            vec!["/ip4/10.0.0.1/tcp/1".parse().unwrap(), "/ip4/10.0.0.2/tcp/2".parse().unwrap()];
        assert_eq!(adv.addrs, expected, "address keys are read in index order");
    }

    #[test]
    fn bad_or_foreign_addresses_are_skipped_not_fatal() {
        let me = PeerId::random();
        let other = PeerId::random();
        let mine = format!("/ip4/10.0.0.1/tcp/1/p2p/{me}");
        let theirs = format!("/ip4/10.0.0.2/tcp/2/p2p/{other}");
        let bare = format!("/p2p/{me}");
        let adv = parse(&[
            ("peer_id", Some(me.to_base58().as_str())),
            ("role", Some("consumer")),
            ("addr0", Some("not an address")),
            ("addr1", Some(mine.as_str())),
            ("addr2", Some(theirs.as_str())),
            ("addr3", Some(bare.as_str())),
            ("addr4", None),
            ("addr16", Some("/ip4/10.0.0.16/tcp/16")),
            ("addr05", Some("/ip4/10.0.0.5/tcp/5")),
        ])
        .unwrap();
        assert_eq!(adv.addrs, vec!["/ip4/10.0.0.1/tcp/1".parse::<Multiaddr>().unwrap()]);
    }

    #[test]
    fn max_addrs_caps_what_is_kept() {
        let adv = sample(10);
        let txt = adv.to_txt();
        let parsed = Advertisement::from_txt(
            txt.properties.iter().map(|(k, v)| (k.as_str(), Some(v.as_bytes()))),
            3,
        )
        .unwrap();
        assert_eq!(parsed.addrs, adv.addrs[..3].to_vec());
    }

    fn key_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("peer_id".to_owned()),
            Just("role".to_owned()),
            Just("hop".to_owned()),
            Just("txtvers".to_owned()),
            (0usize..20).prop_map(|i| format!("addr{i}")),
            any::<String>(),
        ]
    }

    fn value_strategy() -> impl Strategy<Value = Option<Vec<u8>>> {
        prop_oneof![
            Just(None),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Some),
            Just(Some(PeerId::random().to_base58().into_bytes())),
            Just(Some(b"provider".to_vec())),
            Just(Some(b"/ip4/1.2.3.4/tcp/5".to_vec())),
            (0u16..300).prop_map(|n| Some(n.to_string().into_bytes())),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_txt_never_panics_and_stays_bounded(
            pairs in proptest::collection::vec((key_strategy(), value_strategy()), 0..200),
            max_addrs in 0usize..20,
        ) {
            let result = Advertisement::from_txt(
                pairs.iter().map(|(k, v)| (k.as_str(), v.as_deref())),
                max_addrs,
            );
            if let Ok(adv) = result {
                prop_assert!(adv.addrs.len() <= max_addrs.min(MAX_ADDRS));
                prop_assert!(adv.addrs.iter().all(|a| !a.is_empty()));
            }
        }

        #[test]
        fn arbitrary_advertisements_round_trip(
            hop in proptest::option::of(any::<u8>()),
            provider in any::<bool>(),
            ports in proptest::collection::vec(1u16..u16::MAX, 0..20),
        ) {
            let adv = Advertisement {
                peer_id: PeerId::random(),
                role: if provider { Role::Provider } else { Role::Consumer },
                hop_distance: hop,
                addrs: ports.iter().map(|p| format!("/ip4/10.1.2.3/udp/{p}/quic-v1").parse().unwrap()).collect(),
            };
            let txt = adv.to_txt();
            prop_assert!(txt.wire_len() <= MAX_TXT_BYTES);
            let parsed = parse_encoded(&txt).unwrap();
            let kept = adv.addrs.len() - txt.dropped_addrs;
            prop_assert_eq!(&parsed.addrs[..], &adv.addrs[..kept]);
            prop_assert_eq!(parsed, Advertisement { addrs: adv.addrs[..kept].to_vec(), ..adv });
        }
    }
}
