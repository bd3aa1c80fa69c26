//! The wire decoder on arbitrary bytes: `decode_envelope`, `decode_body` and `decode_frame`
//! must never panic or allocate past the frame, and what they accept must survive a
//! re-encoding (the value read back is the value decoded) and in-place forwarding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_protocol::codec::forward_in_place;
use mesh_protocol::{
    MAX_FRAME_LEN, MAX_TTL, decode_body, decode_envelope, decode_frame, encode_body,
    encode_envelope,
};

fuzz_target!(|data: &[u8]| {
    // The same bytes as a whole frame, as a body, and as the header stage of validation.
    let envelope = decode_envelope(data);
    let frame = decode_frame(data);
    let body = decode_body(data);

    if let Ok(envelope) = &envelope {
        assert!(data.len() <= MAX_FRAME_LEN);
        // Encoding is canonical where decoding may be lenient: the re-encoding is never longer
        // and reads back as the same value.
        let again = encode_envelope(envelope).expect("a decoded envelope encodes");
        assert!(again.len() <= data.len(), "re-encoding grew {} -> {}", data.len(), again.len());
        assert_eq!(decode_envelope(&again).as_ref(), Ok(envelope));
        // Forwarding rewrites the hop fields of the bytes exactly as of the decoded value.
        let mut forwarded = data.to_vec();
        assert!(forward_in_place(&mut forwarded));
        assert_eq!(decode_envelope(&forwarded), Ok(envelope.forwarded()));
        // The body inside an envelope goes through the body decoder as a relay would.
        if let Ok(inner) = decode_body(&envelope.body) {
            let bytes = encode_body(&inner).expect("a decoded body encodes");
            assert_eq!(decode_body(&bytes).as_ref(), Ok(&inner));
        }
    }
    match (&frame, &envelope) {
        (Ok(f), Ok(e)) => {
            assert_eq!(f, e);
            assert!(f.ttl >= 1 && f.ttl <= MAX_TTL);
            assert!(u16::from(f.ttl) + u16::from(f.hop_count) <= u16::from(MAX_TTL) + 1);
        }
        (Ok(_), Err(e)) => panic!("decode_frame accepted what decode_envelope refused: {e}"),
        _ => {}
    }
    if let Ok(body) = &body {
        let bytes = encode_body(body).expect("a decoded body encodes");
        assert!(bytes.len() <= data.len());
        assert_eq!(decode_body(&bytes).as_ref(), Ok(body));
    }
});
