//! Client frames: the bytes any TCP peer can send to stage 1.
//!
//! The input is used twice: as one frame body for `wire::decode_client`, and (after its first
//! byte) as a byte stream for `wire::read_frame`, each body read being decoded too. A successful
//! decode must be canonical: re-encoding gives back exactly the input.
//!
//! The first byte picks the frame limit. `read_frame` allocates the declared length before it
//! reads the body, so with the production limit (`FRAME_BYTES_MAX`, 16 MiB) an input that
//! declares a large frame it doesn't carry costs milliseconds under ASan, and libFuzzer keeps
//! such inputs because the branch is new: runs drop from ~16k/s to ~3k/s. So the production limit
//! is used only when the selector byte is 0, and then the stream stops before any frame that
//! declares a length under the limit that it doesn't carry; that path is covered with 64 KiB.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Cursor;
use tally_codec::{encode, limits, wire};

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = wire::decode_client(data) {
        assert_eq!(encode(&env), data, "decode_client accepted a non-canonical encoding");
    }

    let Some((&selector, stream)) = data.split_first() else { return };
    let frame_bytes_max = if selector == 0 { limits::FRAME_BYTES_MAX } else { 64 * 1024 };
    let mut cursor = Cursor::new(stream);
    let mut buf = Vec::new();
    // Bounded: every successful read consumes at least the 4-byte length prefix.
    for _ in 0..=stream.len() / 4 {
        let start = cursor.position() as usize;
        if frame_bytes_max > 64 * 1024 && declares_missing_body(&stream[start..], frame_bytes_max) {
            break;
        }
        match wire::read_frame(&mut cursor, &mut buf, frame_bytes_max) {
            Ok(true) => {
                let end = cursor.position() as usize;
                assert!(buf.len() <= frame_bytes_max, "read_frame returned a body over the limit");
                let mut again = Vec::new();
                wire::write_frame(&mut again, &buf).expect("a body read under the limit can be written");
                assert_eq!(&again[..], &stream[start..end], "read_frame is not the inverse of write_frame");
                if let Ok(env) = wire::decode_client(&buf) {
                    assert_eq!(encode(&env), buf, "decode_client accepted a non-canonical encoding");
                }
            }
            Ok(false) => {
                assert_eq!(start, stream.len(), "clean end of stream reported before the end");
                break;
            }
            Err(_) => break,
        }
    }
});

/// Whether `rest` starts with a length prefix within `limit` whose body is not all there.
fn declares_missing_body(rest: &[u8], limit: usize) -> bool {
    match rest {
        [a, b, c, d, body @ ..] => {
            let n = u32::from_le_bytes([*a, *b, *c, *d]) as usize;
            n <= limit && n > body.len()
        }
        _ => false,
    }
}
