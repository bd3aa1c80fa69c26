//! Codec properties: every wire type round-trips, and hostile bytes never panic nor make the
//! decoder allocate more than a frame.
#![allow(unsafe_code)] // the counting allocator below
#![allow(clippy::unwrap_used)] // test data generators

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use mesh_protocol::{
    Body, Decimal, Envelope, Identity, MAX_FRAME_LEN, NodeId, Payload, PriceUpdate, codec,
    decode_frame,
};
use proptest::prelude::*;

/// Records the largest single allocation made while `TRACKING` is set on this thread's test.
struct CountingAlloc;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on the thread whose allocations are measured: the other tests of this binary run
    /// on other threads at the same time, and their allocations must not count.
    static TRACKING: Cell<bool> = const { Cell::new(false) };
}

fn record(size: usize) {
    // `try_with`: the thread-local may be gone while a thread exits.
    if TRACKING.try_with(Cell::get).unwrap_or(false) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call unchanged to the system allocator; only records sizes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn decimal() -> impl Strategy<Value = Decimal> {
    ("-?[0-9]{1,20}", proptest::option::of("[0-9]{1,18}")).prop_map(|(int, frac)| {
        let text = match frac {
            Some(f) => format!("{int}.{f}"),
            None => int,
        };
        text.parse().unwrap()
    })
}

fn price_update() -> impl Strategy<Value = PriceUpdate> {
    (
        "[ -~]{0,60}",
        "[a-z]{0,12}",
        decimal(),
        any::<i64>(),
        proptest::option::of(decimal()),
        proptest::option::of(any::<i64>()),
    )
        .prop_map(
            |(asset, blockchain, price, timestamp_ms, change_24h, source_timestamp_ms)| {
                PriceUpdate {
                    asset,
                    blockchain,
                    price,
                    timestamp_ms,
                    change_24h,
                    source_timestamp_ms,
                }
            },
        )
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        (any::<u64>(), proptest::collection::vec(price_update(), 0..20))
            .prop_map(|(round, prices)| Payload::PriceBatch { round, prices }),
        (any::<u32>(), any::<u32>(), any::<u64>()).prop_map(
            |(fetch_interval_secs, assets, round)| Payload::ProviderAnnounce {
                fetch_interval_secs,
                assets,
                round
            }
        ),
    ]
}

fn body() -> impl Strategy<Value = Body> {
    (any::<[u8; 32]>(), any::<[u8; 32]>(), any::<i64>(), payload()).prop_map(
        |(origin_seed, origin_key, created_at_ms, payload)| Body {
            origin: NodeId::from_public_key(&origin_seed),
            origin_key,
            created_at_ms,
            payload,
        },
    )
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (any::<u8>(), any::<u8>(), any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300))
        .prop_map(|(version, ttl, hop_count, body)| {
            let mut signature = [0u8; 64];
            signature[..body.len().min(64)].copy_from_slice(&body[..body.len().min(64)]);
            Envelope { version, ttl, hop_count, body, signature }
        })
}

proptest! {
    #[test]
    fn price_update_round_trips(p in price_update()) {
        let body = Body {
            origin: NodeId::from_public_key(&[1; 32]),
            origin_key: [1; 32],
            created_at_ms: 5,
            payload: Payload::PriceBatch { round: 1, prices: vec![p] },
        };
        let bytes = codec::encode_body(&body).unwrap();
        prop_assert_eq!(codec::decode_body(&bytes).unwrap(), body);
    }

    #[test]
    fn body_round_trips(b in body()) {
        let bytes = codec::encode_body(&b).unwrap();
        prop_assert_eq!(codec::decode_body(&bytes).unwrap(), b);
    }

    #[test]
    fn envelope_round_trips(e in envelope()) {
        let bytes = codec::encode_envelope(&e).unwrap();
        prop_assert_eq!(codec::decode_envelope(&bytes).unwrap(), e);
    }

    #[test]
    fn decimal_text_round_trips(d in decimal()) {
        let again: Decimal = d.to_string().parse().unwrap();
        prop_assert_eq!(again, d);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = codec::decode_envelope(&bytes);
        let _ = codec::decode_body(&bytes);
        let _ = decode_frame(&bytes);
    }

    #[test]
    fn mutated_valid_frames_never_panic(seed in any::<[u8; 32]>(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let id = Identity::from_seed(seed);
        let body = Body::new(&id, 1, Payload::PriceBatch { round: 1, prices: vec![PriceUpdate {
            asset: "a".into(), blockchain: "b".into(), price: "1".parse().unwrap(), timestamp_ms: 1, change_24h: None, source_timestamp_ms: None,
        }]});
        let mut frame = codec::encode_envelope(&Envelope::seal(&id, &body, 5).unwrap()).unwrap();
        let mut inner = Envelope::seal(&id, &body, 5).unwrap().body;
        for (pos, byte) in flips {
            let i = pos % frame.len();
            frame[i] ^= byte;
            let j = pos % inner.len();
            inner[j] ^= byte;
        }
        let _ = codec::decode_envelope(&frame);
        let _ = codec::decode_body(&inner);
    }
}

/// LEB128-style bincode varint for `u64` lengths: 253 = u16, 254 = u32, 255 = u64 follows.
fn varint_u64(value: u64) -> Vec<u8> {
    let mut out = vec![255u8];
    out.extend_from_slice(&value.to_le_bytes());
    out
}

/// Forged length prefixes (up to 2^63 and u64::MAX) in every length-prefixed position fail
/// cleanly, and no allocation larger than a frame is attempted while decoding them.
#[test]
fn forged_length_prefixes_are_rejected_without_large_allocations() {
    let lengths = [1u64 << 16, 1 << 20, 1 << 32, 1 << 63, u64::MAX];
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for len in lengths {
        // Envelope: version, ttl, hop_count, then the body length.
        let mut f = vec![1, 5, 1];
        f.extend(varint_u64(len));
        f.extend([0u8; 64]);
        frames.push(f);
        // Body: origin (16-byte uuid as bytes: length 16 first), key, created_at, payload
        // variant 0 (PriceBatch), round, then the prices vector length.
        let mut b = vec![16];
        b.extend([0u8; 16]);
        b.extend([0u8; 32]);
        b.push(0); // created_at_ms = 0
        b.push(0); // variant PriceBatch
        b.push(1); // round
        b.extend(varint_u64(len));
        frames.push(b.clone());
        // ... and a string length inside the first price update.
        let mut s = b[..b.len() - 9].to_vec();
        s.push(1);
        s.extend(varint_u64(len));
        s.extend(b"abc");
        frames.push(s);
    }
    // The forged bodies above follow the real layout: check it against a real encoding.
    let real = codec::encode_body(&Body {
        origin: NodeId::from_uuid(uuid_nil()),
        origin_key: [0; 32],
        created_at_ms: 0,
        payload: Payload::PriceBatch { round: 1, prices: vec![] },
    })
    .unwrap();
    let forged_body = &frames[1];
    assert_eq!(real[..real.len() - 1], forged_body[..forged_body.len() - 9]);
    assert_eq!(real.last(), Some(&0), "empty prices vector length");

    LARGEST.store(0, Ordering::Relaxed);
    TRACKING.with(|t| t.set(true));
    let mut refused = true;
    for f in &frames {
        refused &= codec::decode_envelope(f).is_err() && codec::decode_body(f).is_err();
    }
    TRACKING.with(|t| t.set(false));
    assert!(refused, "a forged frame was decoded");
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest <= MAX_FRAME_LEN, "an allocation of {largest} bytes was attempted");
}

fn uuid_nil() -> uuid::Uuid {
    uuid::Uuid::nil()
}

/// A valid encoding of a huge vector cannot exist within a frame; an oversized buffer is
/// refused before the decoder looks at it.
#[test]
fn frames_over_the_limit_are_refused() {
    let big = vec![0u8; MAX_FRAME_LEN + 1];
    assert!(matches!(
        codec::decode_envelope(&big),
        Err(codec::CodecError::FrameTooLarge(n)) if n == MAX_FRAME_LEN + 1
    ));
}
