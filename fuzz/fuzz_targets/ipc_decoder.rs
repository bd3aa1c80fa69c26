//! The node <-> API decoder on arbitrary bytes: `mesh_ipc::frame::read` of a stream of frames
//! as the node reads requests (64 KiB limit) and as the API reads events and answers (16 MiB
//! limit), and the JSON decoding of `Request`, `Event` and `Response` on their own. Nothing may
//! panic, and whatever is accepted must be written back by `frame::write` as a frame that reads
//! as the same value.
#![no_main]

use std::fmt::Debug;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mesh_ipc::frame::{self, MAX_REQUEST_LEN, MAX_RESPONSE_LEN};
use mesh_ipc::{Event, Request, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::runtime::Runtime;

/// Most frames read from one input.
const MAX_FRAMES: usize = 16;

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        frames::<Request>(data, MAX_REQUEST_LEN).await;
        frames::<Event>(data, MAX_RESPONSE_LEN).await;
        frames::<Response>(data, MAX_RESPONSE_LEN).await;
    });
    json::<Request>(data);
    json::<Event>(data);
    json::<Response>(data);
});

/// Reads frames until the end, an error or [`MAX_FRAMES`], checking each one read.
async fn frames<T>(data: &[u8], max_len: usize)
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let mut reader = data;
    for _ in 0..MAX_FRAMES {
        let before = reader.len();
        match frame::read::<T, _>(&mut reader, max_len).await {
            Ok(Some(value)) => {
                assert!(before - reader.len() <= 4 + max_len, "read past the frame limit");
                round_trip(&value).await;
            }
            Ok(None) | Err(_) => break,
        }
    }
}

/// The whole input as one JSON document.
fn json<T>(data: &[u8])
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    if let Ok(value) = serde_json::from_slice::<T>(data) {
        runtime().block_on(round_trip(&value));
    }
}

async fn round_trip<T>(value: &T)
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let mut written = Vec::new();
    frame::write(&mut written, value).await.expect("an accepted value is written");
    let mut reader = written.as_slice();
    let back = frame::read::<T, _>(&mut reader, usize::MAX).await.expect("its frame reads back");
    assert_eq!(back.as_ref(), Some(value));
    assert!(reader.is_empty(), "the frame is read whole");
}
