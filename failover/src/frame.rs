//! Peer frames: `u32-le len ‖ bytes`, with an explicit bound on `len` checked before any
//! allocation.

use std::io::{self, Read, Write};

/// Writes one frame.
///
/// # Errors
/// I/O errors; `InvalidInput` for a body over `u32::MAX` bytes.
pub fn write_frame<W: Write>(w: &mut W, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(body)
}

/// Reads one frame of at most `bytes_max` bytes.
///
/// # Errors
/// I/O errors (`UnexpectedEof` on a closed connection); `InvalidData` over the bound.
pub fn read_frame<R: Read>(r: &mut R, bytes_max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > bytes_max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the limit of {bytes_max}"),
        ));
    }
    // Grow as bytes arrive: a 4-byte header from a stranger must not reserve 16 MiB.
    let mut body = Vec::new();
    if r.take(len as u64).read_to_end(&mut body)? < len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated frame"));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bound() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").expect("write");
        write_frame(&mut buf, b"").expect("write");
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r, 5).expect("read"), b"hello");
        assert_eq!(read_frame(&mut r, 5).expect("read"), b"");
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r, 4).expect_err("over").kind(), io::ErrorKind::InvalidData);
        let mut short = &buf[..6];
        assert_eq!(read_frame(&mut short, 5).expect_err("eof").kind(), io::ErrorKind::UnexpectedEof);
    }
}
