//! Length-prefixed frames on a libp2p stream: a 4-byte big-endian length, then the frame.
//! A length above [`MAX_FRAME_LEN`] is refused before anything is allocated.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use mesh_protocol::MAX_FRAME_LEN;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream ended or failed.
    #[error("stream: {0}")]
    Io(#[from] io::Error),
    /// The length prefix announces more than a frame may hold.
    #[error("frame of {0} bytes announced; at most {MAX_FRAME_LEN} allowed")]
    TooLarge(u32),
}

/// Reads one frame into `buf` (reused between calls).
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(), ReadError> {
    let mut len = [0u8; 4];
    reader.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len);
    if len as usize > MAX_FRAME_LEN {
        return Err(ReadError::TooLarge(len));
    }
    buf.clear();
    buf.resize(len as usize, 0);
    reader.read_exact(buf).await?;
    Ok(())
}

/// Whether `buffered` begins with a whole frame, prefix and bytes: reading it needs no I/O.
pub fn whole_frame_buffered(buffered: &[u8]) -> bool {
    buffered
        .first_chunk::<4>()
        .is_some_and(|len| buffered.len() - 4 >= u32::from_be_bytes(*len) as usize)
}

/// Appends `frame` with its length prefix to `out`: a writer batches several frames into one
/// buffer and one write, since every write on a yamux stream becomes a yamux frame (and, once
/// flushed, a noise message) of its own.
pub fn put_frame(out: &mut Vec<u8>, frame: &[u8]) -> io::Result<()> {
    let len =
        u32::try_from(frame.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(frame);
    Ok(())
}

/// Writes one frame (prefix and bytes in a single write).
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, frame: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(4 + frame.len());
    put_frame(&mut out, frame)?;
    writer.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[tokio::test]
    async fn frames_round_trip_and_oversized_lengths_are_refused() {
        let mut out = Vec::new();
        write_frame(&mut out, b"hello").await.unwrap();
        write_frame(&mut out, b"").await.unwrap();
        let mut r = Cursor::new(out);
        let mut buf = Vec::new();
        read_frame(&mut r, &mut buf).await.unwrap();
        assert_eq!(buf, b"hello");
        read_frame(&mut r, &mut buf).await.unwrap();
        assert!(buf.is_empty());
        assert!(matches!(read_frame(&mut r, &mut buf).await, Err(ReadError::Io(_))));

        let mut forged = Cursor::new(u32::MAX.to_be_bytes().to_vec());
        assert!(matches!(
            read_frame(&mut forged, &mut buf).await,
            Err(ReadError::TooLarge(u32::MAX))
        ));
        assert!(buf.capacity() < 1024, "nothing allocated for a refused frame");
    }

    #[test]
    fn a_whole_frame_is_seen_in_a_buffer() {
        let mut out = Vec::new();
        put_frame(&mut out, b"hello").unwrap();
        assert!(whole_frame_buffered(&out));
        assert!(!whole_frame_buffered(&out[..out.len() - 1]), "one byte short");
        assert!(!whole_frame_buffered(&out[..3]), "prefix cut");
        assert!(!whole_frame_buffered(&[]));
        assert!(whole_frame_buffered(&[0, 0, 0, 0]), "an empty frame is whole");
        assert!(!whole_frame_buffered(&u32::MAX.to_be_bytes()));
    }
}
