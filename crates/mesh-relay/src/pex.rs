//! Peer exchange (`/mesh/pex/1.0.0`): on request a node answers with up to
//! [`MAX_ENTRIES`] peers it is connected to and their addresses, so that one bootstrap
//! address leads to many peers. The answer is one frame (see [`crate::framing`]):
//! `count: u8`, then per peer `len: u8, peer id bytes, addr count: u8`, then per address
//! `len: u8, multiaddr bytes`. Decoding checks every length and the bounds.

use libp2p::{Multiaddr, PeerId};

/// Most peers in one answer.
pub const MAX_ENTRIES: usize = 32;
/// Most addresses per peer in one answer.
pub const MAX_ADDRS: usize = 4;
/// Largest answer in bytes.
pub const MAX_ANSWER_LEN: usize = 16 * 1024;

/// A peer and its addresses.
pub type Entry = (PeerId, Vec<Multiaddr>);

/// Encodes an answer (entries beyond the bounds are left out).
pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = vec![0u8];
    let mut count = 0u8;
    for (peer, addrs) in entries.iter().take(MAX_ENTRIES) {
        let id = peer.to_bytes();
        let addrs: Vec<Vec<u8>> = addrs
            .iter()
            .map(|a| a.to_vec())
            .filter(|a| a.len() <= usize::from(u8::MAX))
            .take(MAX_ADDRS)
            .collect();
        let size = 2 + id.len() + addrs.iter().map(|a| 1 + a.len()).sum::<usize>();
        if id.len() > usize::from(u8::MAX) || out.len() + size > MAX_ANSWER_LEN {
            continue;
        }
        out.push(id.len() as u8);
        out.extend_from_slice(&id);
        out.push(addrs.len() as u8);
        for a in addrs {
            out.push(a.len() as u8);
            out.extend_from_slice(&a);
        }
        count += 1;
    }
    out[0] = count;
    out
}

/// Why an answer could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed peer-exchange answer")]
pub struct DecodeError;

/// Decodes an answer.
pub fn decode(bytes: &[u8]) -> Result<Vec<Entry>, DecodeError> {
    if bytes.len() > MAX_ANSWER_LEN {
        return Err(DecodeError);
    }
    let mut r = Reader(bytes);
    let count = usize::from(r.byte()?);
    if count > MAX_ENTRIES {
        return Err(DecodeError);
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = usize::from(r.byte()?);
        let peer = PeerId::from_bytes(r.take(len)?).map_err(|_| DecodeError)?;
        let n = usize::from(r.byte()?);
        if n > MAX_ADDRS {
            return Err(DecodeError);
        }
        let mut addrs = Vec::with_capacity(n);
        for _ in 0..n {
            let len = usize::from(r.byte()?);
            addrs.push(Multiaddr::try_from(r.take(len)?.to_vec()).map_err(|_| DecodeError)?);
        }
        entries.push((peer, addrs));
    }
    if !r.0.is_empty() {
        return Err(DecodeError);
    }
    Ok(entries)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self.0.split_first().ok_or(DecodeError)?;
        self.0 = rest;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn answers_round_trip() {
        let entries: Vec<Entry> = (0..3)
            .map(|i| {
                (
                    PeerId::random(),
                    vec![
                        format!("/ip4/127.0.0.1/tcp/{}", 4000 + i).parse().unwrap(),
                        "/memory/7".parse().unwrap(),
                    ],
                )
            })
            .collect();
        assert_eq!(decode(&encode(&entries)).unwrap(), entries);
        assert_eq!(decode(&encode(&[])).unwrap(), vec![]);
    }

    #[test]
    fn bounds_are_applied_when_encoding() {
        let many: Vec<Entry> =
            (0..100).map(|_| (PeerId::random(), vec!["/memory/1".parse().unwrap(); 9])).collect();
        let decoded = decode(&encode(&many)).unwrap();
        assert_eq!(decoded.len(), MAX_ENTRIES);
        assert!(decoded.iter().all(|(_, a)| a.len() == MAX_ADDRS));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&bytes);
        }
    }
}
