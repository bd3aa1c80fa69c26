//! Length-prefixed JSON frames on a byte stream: a 4-byte big-endian length, then a JSON
//! document. A length above the reader's limit is refused before anything is allocated.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Error;

/// Largest frame a client accepts from the node (a full snapshot of a large price book).
pub const MAX_RESPONSE_LEN: usize = 16 * 1024 * 1024;
/// Largest frame the node accepts from a client.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;

/// Reads one frame and decodes it; `Ok(None)` at a clean end of stream.
pub async fn read<T: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
    max_len: usize,
) -> Result<Option<T>, Error> {
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
    serde_json::from_slice(&buf).map(Some).map_err(|e| Error::Malformed(e.to_string()))
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
