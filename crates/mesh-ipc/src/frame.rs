//! Length-prefixed JSON frames on a byte stream: a 4-byte big-endian length, then a JSON
//! document. A length above the reader's limit is refused before anything is allocated.
//!
//! # Long price lists travel in parts
//!
//! A price book holds up to 100,000 assets whose names may be 255 characters long: its
//! snapshot is about 75 MB of JSON, far above [`MAX_RESPONSE_LEN`]. So no frame ever carries
//! more than [`PART_PRICES`] prices. A longer list is sent as consecutive frames on the same
//! connection, nothing else between them:
//!
//! ```text
//! {"type":"snapshot_part","data":[<first 1,000 prices>]}
//! {"type":"snapshot_part","data":[<next 1,000 prices>]}
//! {"type":"snapshot","data":{"prices":[<the rest>],"network":{..},"provider":{..}}}
//! ```
//!
//! and likewise `prices_part` frames before the final `prices` answer to `get_prices`. The
//! receiver appends the parts in order and puts them before the final frame's prices;
//! [`crate::Client`] and [`crate::Subscription`] do it, so their callers see one
//! [`crate::Event::Snapshot`] or one price list. A list of at most [`PART_PRICES`] prices is a
//! single frame exactly as before, and the frame format itself is unchanged. A receiver joins
//! at most [`MAX_JOINED_PRICES`] prices, so a faulty sender cannot make it grow without bound.
//!
//! Why 1,000 prices always fit: a [`crate::PriceView`] is at most about 2 KiB of JSON (a
//! 255-character asset of 4-byte characters is 1,020 bytes, a 50-character chain 200, the
//! two decimals 80 characters each, the rest fixed-size), so a part stays under 2 MiB, an
//! eighth of the limit.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Error;

/// Largest frame a client accepts from the node (a full snapshot of a large price book).
pub const MAX_RESPONSE_LEN: usize = 16 * 1024 * 1024;
/// Largest frame the node accepts from a client.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// Most prices in one frame; longer lists are sent in parts (see the module docs).
pub const PART_PRICES: usize = 1_000;
/// Most prices a receiver joins from parts: ten times the price book's asset limit.
pub const MAX_JOINED_PRICES: usize = 1_000_000;

/// Reads one frame and decodes it; `Ok(None)` at a clean end of stream.
pub async fn read<T: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
    max_len: usize,
) -> Result<Option<T>, Error> {
    match read_body(reader, max_len).await? {
        Some(body) => decode(&body).map(Some),
        None => Ok(None),
    }
}

/// Reads one frame's body, undecoded; `Ok(None)` at a clean end of stream.
pub async fn read_body<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_len: usize,
) -> Result<Option<Vec<u8>>, Error> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(Error::Io(e)),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max_len {
        return Err(Error::FrameTooLarge { len, max: max_len });
    }
    let mut buf = vec![0u8; len];
    reader.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// Decodes a frame's body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::Malformed(e.to_string()))
}

/// Encodes and writes one frame, then flushes.
pub async fn write<T: Serialize, W: AsyncWrite + Unpin>(
    writer: &mut W,
    value: &T,
) -> Result<(), Error> {
    let body = serde_json::to_vec(value).map_err(|e| Error::Malformed(e.to_string()))?;
    let len = u32::try_from(body.len())
        .map_err(|_| Error::FrameTooLarge { len: body.len(), max: u32::MAX as usize })?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    writer.write_all(&frame).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{PriceFilter, Request};

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let mut buf = Vec::new();
        let req =
            Request::GetPrices(PriceFilter { blockchain: Some("solana".into()), asset: None });
        write(&mut buf, &req).await.unwrap();
        write(&mut buf, &Request::Subscribe).await.unwrap();
        let mut r = buf.as_slice();
        assert_eq!(read::<Request, _>(&mut r, MAX_REQUEST_LEN).await.unwrap(), Some(req));
        assert_eq!(
            read::<Request, _>(&mut r, MAX_REQUEST_LEN).await.unwrap(),
            Some(Request::Subscribe)
        );
        assert_eq!(read::<Request, _>(&mut r, MAX_REQUEST_LEN).await.unwrap(), None);

        let mut forged: &[u8] = &u32::MAX.to_be_bytes();
        assert!(matches!(
            read::<Request, _>(&mut forged, MAX_REQUEST_LEN).await,
            Err(Error::FrameTooLarge { .. })
        ));
        let mut garbage = Vec::new();
        garbage.extend_from_slice(&3u32.to_be_bytes());
        garbage.extend_from_slice(b"{x}");
        assert!(matches!(
            read::<Request, _>(&mut garbage.as_slice(), MAX_REQUEST_LEN).await,
            Err(Error::Malformed(_))
        ));
    }
}
