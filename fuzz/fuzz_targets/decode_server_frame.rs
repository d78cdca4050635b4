//! Server frame bodies: what a client library (or a forwarding follower) decodes from a node.
//! A successful decode must be canonical: re-encoding gives back exactly the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_codec::{encode, wire};

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = wire::decode_server(data) {
        assert_eq!(encode(&env), data, "decode_server accepted a non-canonical encoding");
    }
});
