//! One signed request, as stored content-addressed and as hashed into its id. A successful
//! decode must be canonical, or two byte strings could name one request with two ids.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_codec::SignedRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = SignedRequest::decode(data) {
        assert_eq!(r.encode(), data, "SignedRequest::decode accepted a non-canonical encoding");
        // The id is a pure function of the bytes: computing it must not panic either.
        let _ = r.id();
    }
});
