//! BLE discovery: the mesh service UUID and the advertisement payload, plus (with the `ble`
//! feature) a btleplug scanner.
//!
//! btleplug is central-only: it scans but cannot advertise. A mesh node found over BLE is one
//! advertised by another stack or a beacon, as service data under [`SERVICE_UUID`] in this
//! format (all integers unsigned, big-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | version, [`PAYLOAD_VERSION`] |
//! | 1 | 1 | flags: bit 0 provider, bit 1 hop distance known; other bits reserved (sent as 0, ignored) |
//! | 2 | 1 | hop distance to the nearest provider (meaningful with flag bit 1) |
//! | 3 | 1 | `L`, length of the peer id, 1..=[`MAX_PEER_ID_LEN`] |
//! | 4 | `L` | the libp2p peer id in its binary (multihash) form |
//! | 4 + `L` | | up to [`MAX_PAYLOAD_ADDRS`] addresses, each one length byte (1..=[`MAX_ADDR_LEN`]) and a binary multiaddr without `/p2p` |
//!
//! The whole payload is at most [`MAX_PAYLOAD_LEN`] bytes and nothing may follow the last
//! address. An ed25519 peer id takes 38 bytes, so the payload needs a BLE 5 extended
//! advertisement: a legacy 31-byte advertisement has no room for it.

use libp2p_identity::PeerId;
use multiaddr::Multiaddr;
use uuid::Uuid;

use crate::addrs::split_p2p;
use crate::event::Role;

#[cfg(feature = "ble")]
pub(crate) mod scanner;

/// The mesh's 128-bit BLE service UUID, `e3687b61-4cb2-4f2b-907c-c7ba6102ccdb` (random, v4).
pub const SERVICE_UUID: Uuid = Uuid::from_u128(0xe368_7b61_4cb2_4f2b_907c_c7ba_6102_ccdb);
/// Version byte of this payload format.
pub const PAYLOAD_VERSION: u8 = 1;
/// Longest payload (fits the service data of one BLE 5 extended advertisement).
pub const MAX_PAYLOAD_LEN: usize = 240;
/// Longest binary peer id.
pub const MAX_PEER_ID_LEN: usize = 64;
/// Longest binary address.
pub const MAX_ADDR_LEN: usize = 64;
/// Most addresses in one payload.
pub const MAX_PAYLOAD_ADDRS: usize = 4;

const FLAG_PROVIDER: u8 = 0b01;
const FLAG_HOP: u8 = 0b10;
const HEADER_LEN: usize = 4;

/// What a BLE advertisement of a mesh node carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlePayload {
    /// The node's libp2p peer id.
    pub peer_id: PeerId,
    /// Provider or consumer.
    pub role: Role,
    /// Hop distance to the nearest provider, when known.
    pub hop_distance: Option<u8>,
    /// Addresses to dial it on (may be empty: the peer id alone is still news).
    pub addrs: Vec<Multiaddr>,
}

/// Why bytes are not a mesh BLE payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Longer than [`MAX_PAYLOAD_LEN`].
    #[error("payload of {0} bytes exceeds {MAX_PAYLOAD_LEN}")]
    TooLong(usize),
    /// Ends inside a field.
    #[error("payload truncated at byte {0}")]
    Truncated(usize),
    /// Not [`PAYLOAD_VERSION`].
    #[error("unsupported payload version {0}")]
    UnsupportedVersion(u8),
    /// A peer id length of 0 or above [`MAX_PEER_ID_LEN`].
    #[error("peer id length {0} is not in 1..={MAX_PEER_ID_LEN}")]
    PeerIdLength(usize),
    /// Bytes that are not a peer id.
    #[error("the peer id bytes are not a libp2p peer id")]
    BadPeerId,
    /// An address length of 0 or above [`MAX_ADDR_LEN`].
    #[error("address {index} has length {len}, not in 1..={MAX_ADDR_LEN}")]
    AddrLength {
        /// Which address.
        index: usize,
        /// Its length byte.
        len: usize,
    },
    /// Bytes that are not a multiaddr, or one naming another peer.
    #[error("address {0} is not a multiaddr of this peer")]
    BadAddr(usize),
    /// More than [`MAX_PAYLOAD_ADDRS`] addresses.
    #[error("more than {MAX_PAYLOAD_ADDRS} addresses")]
    TooManyAddrs,
}

/// Reads a payload. Never panics; looks at no more than [`MAX_PAYLOAD_LEN`] bytes.
pub fn parse_payload(bytes: &[u8]) -> Result<BlePayload, PayloadError> {
    if bytes.len() > MAX_PAYLOAD_LEN {
        return Err(PayloadError::TooLong(bytes.len()));
    }
    let header = bytes.get(..HEADER_LEN).ok_or(PayloadError::Truncated(bytes.len()))?;
    let (version, flags, hop, id_len) = (header[0], header[1], header[2], usize::from(header[3]));
    if version != PAYLOAD_VERSION {
        return Err(PayloadError::UnsupportedVersion(version));
    }
    if !(1..=MAX_PEER_ID_LEN).contains(&id_len) {
        return Err(PayloadError::PeerIdLength(id_len));
    }
    let mut at = HEADER_LEN;
    let id_bytes = bytes.get(at..at + id_len).ok_or(PayloadError::Truncated(bytes.len()))?;
    let peer_id = PeerId::from_bytes(id_bytes).map_err(|_| PayloadError::BadPeerId)?;
    at += id_len;
    let mut addrs = Vec::new();
    while at < bytes.len() {
        let index = addrs.len();
        if index == MAX_PAYLOAD_ADDRS {
            return Err(PayloadError::TooManyAddrs);
        }
        let len = usize::from(bytes[at]);
        if !(1..=MAX_ADDR_LEN).contains(&len) {
            return Err(PayloadError::AddrLength { index, len });
        }
        at += 1;
        let raw = bytes.get(at..at + len).ok_or(PayloadError::Truncated(bytes.len()))?;
        let addr = Multiaddr::try_from(raw.to_vec()).map_err(|_| PayloadError::BadAddr(index))?;
        match split_p2p(&addr) {
            (base, None) => addrs.push(base),
            (base, Some(id)) if id == peer_id && !base.is_empty() => addrs.push(base),
            _ => return Err(PayloadError::BadAddr(index)),
        }
        at += len;
    }
    Ok(BlePayload {
        peer_id,
        role: if flags & FLAG_PROVIDER != 0 { Role::Provider } else { Role::Consumer },
        hop_distance: (flags & FLAG_HOP != 0).then_some(hop),
        addrs,
    })
}

/// Writes a payload (for beacons and tests). Fails when a field is beyond the limits above.
pub fn encode_payload(payload: &BlePayload) -> Result<Vec<u8>, PayloadError> {
    let id = payload.peer_id.to_bytes();
    if !(1..=MAX_PEER_ID_LEN).contains(&id.len()) {
        return Err(PayloadError::PeerIdLength(id.len()));
    }
    if payload.addrs.len() > MAX_PAYLOAD_ADDRS {
        return Err(PayloadError::TooManyAddrs);
    }
    let mut flags = 0;
    if payload.role == Role::Provider {
        flags |= FLAG_PROVIDER;
    }
    if payload.hop_distance.is_some() {
        flags |= FLAG_HOP;
    }
    let mut out = vec![PAYLOAD_VERSION, flags, payload.hop_distance.unwrap_or(0)];
    out.push(id.len() as u8); // at most MAX_PEER_ID_LEN (64), checked above
    out.extend_from_slice(&id);
    for (index, addr) in payload.addrs.iter().enumerate() {
        let raw = split_p2p(addr).0.to_vec();
        if !(1..=MAX_ADDR_LEN).contains(&raw.len()) {
            return Err(PayloadError::AddrLength { index, len: raw.len() });
        }
        out.push(raw.len() as u8); // at most MAX_ADDR_LEN (64), checked above
        out.extend_from_slice(&raw);
    }
    if out.len() > MAX_PAYLOAD_LEN {
        return Err(PayloadError::TooLong(out.len()));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A peer id as mesh nodes have them: from an ed25519 key (38 bytes).
    fn ed25519_peer() -> PeerId {
        libp2p_identity::Keypair::generate_ed25519().public().to_peer_id()
    }

    fn sample() -> BlePayload {
        BlePayload {
            peer_id: ed25519_peer(),
            role: Role::Provider,
            hop_distance: Some(0),
            addrs: vec![
                "/ip4/192.168.1.20/tcp/4001".parse().unwrap(),
                "/ip6/2001:db8::20/udp/4001/quic-v1".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn the_uuid_is_the_documented_one() {
        assert_eq!(SERVICE_UUID.to_string(), "e3687b61-4cb2-4f2b-907c-c7ba6102ccdb");
    }

    #[test]
    fn encode_then_parse_gives_the_payload_back() {
        let payload = sample();
        let bytes = encode_payload(&payload).unwrap();
        assert_eq!(bytes[0], PAYLOAD_VERSION);
        assert_eq!(bytes[1], 0b11);
        assert_eq!(usize::from(bytes[3]), 38, "an ed25519 peer id is 38 bytes");
        assert_eq!(parse_payload(&bytes).unwrap(), payload);
        let bare =
            BlePayload { role: Role::Consumer, hop_distance: None, addrs: vec![], ..payload };
        let bytes = encode_payload(&bare).unwrap();
        assert_eq!(bytes.len(), 4 + 38);
        assert_eq!(parse_payload(&bytes).unwrap(), bare);
    }

    #[test]
    fn malformed_payloads_are_refused_with_a_reason() {
        let good = encode_payload(&sample()).unwrap();
        assert_eq!(parse_payload(&[]), Err(PayloadError::Truncated(0)));
        assert_eq!(parse_payload(&good[..3]), Err(PayloadError::Truncated(3)));
        assert_eq!(parse_payload(&good[..20]), Err(PayloadError::Truncated(20)));
        assert_eq!(
            parse_payload(&good[..good.len() - 1]),
            Err(PayloadError::Truncated(good.len() - 1))
        );
        let mut v2 = good.clone();
        v2[0] = 2;
        assert_eq!(parse_payload(&v2), Err(PayloadError::UnsupportedVersion(2)));
        let mut no_id = good.clone();
        no_id[3] = 0;
        assert_eq!(parse_payload(&no_id), Err(PayloadError::PeerIdLength(0)));
        let mut bad_id = good.clone();
        bad_id[4] ^= 0xff;
        assert_eq!(parse_payload(&bad_id), Err(PayloadError::BadPeerId));
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(parse_payload(&trailing), Err(PayloadError::AddrLength { index: 2, len: 0 }));
        assert_eq!(parse_payload(&[0; 241]), Err(PayloadError::TooLong(241)));
        // An address naming another peer.
        let mut foreign = sample();
        let other = PeerId::random();
        foreign.addrs = vec![format!("/ip4/10.0.0.1/tcp/1/p2p/{other}").parse().unwrap()];
        let mut bytes = encode_payload(&BlePayload { addrs: vec![], ..foreign.clone() }).unwrap();
        let raw = foreign.addrs[0].to_vec();
        bytes.push(raw.len() as u8);
        bytes.extend_from_slice(&raw);
        assert_eq!(parse_payload(&bytes), Err(PayloadError::BadAddr(0)));
        // Too many addresses.
        let mut many = good;
        let extra = "/ip4/10.0.0.1/tcp/1".parse::<Multiaddr>().unwrap().to_vec();
        for _ in 0..3 {
            many.push(extra.len() as u8);
            many.extend_from_slice(&extra);
        }
        assert_eq!(parse_payload(&many), Err(PayloadError::TooManyAddrs));
    }

    #[test]
    fn reserved_flag_bits_are_ignored() {
        let clean = encode_payload(&sample()).unwrap();
        let mut noisy = clean.clone();
        noisy[1] |= 0b1111_1100;
        assert_eq!(parse_payload(&noisy), parse_payload(&clean));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(payload) = parse_payload(&bytes) {
                prop_assert!(bytes.len() <= MAX_PAYLOAD_LEN);
                prop_assert!(payload.addrs.len() <= MAX_PAYLOAD_ADDRS);
            }
        }

        #[test]
        fn valid_prefix_with_arbitrary_tail_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = encode_payload(&BlePayload { addrs: vec![], ..sample() }).unwrap();
            bytes.extend_from_slice(&tail);
            let _ = parse_payload(&bytes);
        }

        #[test]
        fn payloads_round_trip(hop in proptest::option::of(any::<u8>()), provider in any::<bool>(), ports in proptest::collection::vec(any::<u16>(), 0..=4)) {
            let payload = BlePayload {
                peer_id: PeerId::random(),
                role: if provider { Role::Provider } else { Role::Consumer },
                hop_distance: hop,
                addrs: ports.iter().map(|p| format!("/ip4/10.0.0.1/tcp/{p}").parse().unwrap()).collect(),
            };
            let bytes = encode_payload(&payload).unwrap();
            prop_assert_eq!(parse_payload(&bytes).unwrap(), payload);
        }
    }
}
