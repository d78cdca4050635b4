//! The one record format of the log and the segment files, and the one poisoning rule.
//!
//! ```text
//!   record = u32 len(data) ‖ u32 crc32(prefix ‖ data) ‖ prefix ‖ data      (little-endian)
//! ```
//! The prefix has a fixed size per file kind: 16 bytes (`u64 index ‖ u64 term`) in the log,
//! none in the segment files.

use crate::StoreError;
use tally_codec::limits::ENTRY_BYTES_MAX;

/// Bytes before the prefix: len and crc.
pub const HEADER_BYTES: u64 = 8;

/// The checksum of a record.
pub fn checksum(prefix: &[u8], data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(prefix);
    h.update(data);
    h.finalize()
}

/// Appends one record to `out`.
pub fn encode(prefix: &[u8], data: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(data.len()).expect("record data is bounded by ENTRY_BYTES_MAX");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(prefix, data).to_le_bytes());
    out.extend_from_slice(prefix);
    out.extend_from_slice(data);
}

/// The size of a record with a `prefix_len`-byte prefix and `data_len` bytes of data.
pub fn size(prefix_len: usize, data_len: usize) -> u64 {
    HEADER_BYTES + prefix_len as u64 + data_len as u64
}

/// One record read and checked.
pub struct Parsed {
    pub prefix: Vec<u8>,
    pub data: Vec<u8>,
    /// Offset of the next record.
    pub next: u64,
}

/// Reads the record at `offset` of a file of `file_len` bytes through `read_at`, with a prefix
/// of `prefix_len` bytes. `Ok(Err(reason))` when it is truncated, oversized or fails its
/// checksum; `Err` only for I/O errors.
pub fn parse(
    read_at: impl Fn(&mut [u8], u64) -> std::io::Result<()>,
    file_len: u64,
    offset: u64,
    prefix_len: usize,
) -> std::io::Result<Result<Parsed, String>> {
    let head = HEADER_BYTES + prefix_len as u64;
    if file_len.saturating_sub(offset) < head {
        return Ok(Err("truncated record header".into()));
    }
    let mut header = vec![0u8; head as usize];
    read_at(&mut header, offset)?;
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    if len as usize > ENTRY_BYTES_MAX {
        return Ok(Err(format!("record length {len} over the limit of {ENTRY_BYTES_MAX}")));
    }
    let next = offset + head + u64::from(len);
    if next > file_len {
        return Ok(Err(format!("record of {len} bytes runs past the end of the file")));
    }
    let mut data = vec![0u8; len as usize];
    read_at(&mut data, offset + head)?;
    let prefix = header.split_off(HEADER_BYTES as usize);
    if u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) != checksum(&prefix, &data) {
        return Ok(Err("checksum mismatch".into()));
    }
    Ok(Ok(Parsed { prefix, data, next }))
}

/// Checks a record held in memory (a mapped segment) whose data is `len` bytes.
pub fn check_mapped(record: &[u8], prefix_len: usize) -> Result<&[u8], String> {
    let head = HEADER_BYTES as usize + prefix_len;
    let header = record.get(..head).ok_or("truncated record header")?;
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let data = record.get(head..head + len).ok_or("record runs past the end of the file")?;
    if u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) != checksum(&header[HEADER_BYTES as usize..], data)
    {
        return Err("checksum mismatch".into());
    }
    Ok(data)
}

/// The poisoning rule of every append-only file here: after a failed write or fsync the state
/// on disk is unknown (fsyncgate), so nothing more is written or read through this handle; the
/// replica restarts and recovers from what the disk really holds.
#[derive(Debug, Default)]
pub struct Poison {
    poisoned: bool,
}

impl Poison {
    /// # Errors
    /// [`StoreError::Poisoned`] once poisoned.
    pub fn check(&self) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        Ok(())
    }

    /// Poisons when `r` failed; passes `r` on.
    pub fn on_err<T>(&mut self, what: &str, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e) = &r {
            tracing::error!(error = %e, "{what} poisoned after a failed write or fsync");
            self.poisoned = true;
        }
        r
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    #[cfg(test)]
    pub fn set_for_test(&mut self) {
        self.poisoned = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_named() {
        let mut buf = Vec::new();
        encode(&[1; 16], b"payload", &mut buf);
        encode(&[], b"", &mut buf);
        let read = |b: &[u8]| {
            let b = b.to_vec();
            move |out: &mut [u8], off: u64| {
                out.copy_from_slice(&b[off as usize..off as usize + out.len()]);
                Ok(())
            }
        };
        let p = parse(read(&buf), buf.len() as u64, 0, 16).expect("io").expect("valid");
        assert_eq!((p.prefix, p.data.as_slice()), (vec![1; 16], &b"payload"[..]));
        assert_eq!(size(16, 7), p.next);
        assert_eq!(check_mapped(&buf[..p.next as usize], 16), Ok(&b"payload"[..]));
        let mut bad = buf.clone();
        bad[10] ^= 1; // inside the prefix: covered by the checksum
        assert_eq!(parse(read(&bad), bad.len() as u64, 0, 16).expect("io").err().as_deref(), Some("checksum mismatch"));
        assert!(parse(read(&buf), 30, 0, 16).expect("io").is_err_and(|r| r.contains("past the end")));
        assert!(parse(read(&buf), 20, 0, 16).expect("io").is_err_and(|r| r.contains("truncated")));
        assert!(check_mapped(&buf[..10], 16).is_err());
    }
}
