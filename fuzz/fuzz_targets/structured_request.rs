//! One signed request, built by shape (`tally_fuzz::Req`: any operation, transactions wide past
//! their item bound, values up to and past the request bound) or as a nesting shape 2 to
//! 200,000 levels deep, then maybe mutated. Decoded as the store and the client port do:
//! `SignedRequest::decode` (the whole input within `REQUEST_BYTES_MAX`) and `decode` without an
//! outer bound (the request's own budget must hold inside any container).
//!
//! Properties: a valid request decodes to itself; one over the bound is refused
//! `RequestTooLarge`; a nested one `TooDeep`; after a mutation, no panic and canonical if
//! accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_codec::{encode, limits, CodecError, SignedRequest};
use tally_fuzz::{check_any, check_decode, request_refusal, Budget, Deep, Mutation, Req};

#[derive(arbitrary::Arbitrary, Debug)]
enum Shape {
    Value(Req),
    Deep(Deep),
}

#[derive(arbitrary::Arbitrary, Debug)]
struct Input {
    shape: Shape,
    mutation: Mutation,
}

fuzz_target!(|input: Input| {
    let mut budget = Budget::default();
    let (value, mut bytes) = match &input.shape {
        Shape::Value(r) => {
            let v = r.build(&mut budget);
            let b = encode(&v);
            (Some(v), b)
        }
        Shape::Deep(d) => (None, d.request_bytes()),
    };
    if input.mutation.apply(&mut bytes) {
        check_any(&bytes, SignedRequest::decode(&bytes));
        check_any(&bytes, tally_codec::decode::<SignedRequest>(&bytes, usize::MAX));
        return;
    }
    match (&value, &input.shape) {
        (Some(v), _) => {
            check_decode(&bytes, SignedRequest::decode(&bytes), v, request_refusal(v));
            check_decode(&bytes, tally_codec::decode::<SignedRequest>(&bytes, usize::MAX), v, request_refusal(v));
            if request_refusal(v).is_none() {
                let _ = v.id();
            }
        }
        (None, Shape::Deep(d)) => {
            let alone = SignedRequest::decode(&bytes);
            if bytes.len() > limits::REQUEST_BYTES_MAX {
                assert_eq!(alone.err(), Some(CodecError::RequestTooLarge { max: limits::REQUEST_BYTES_MAX }));
            } else {
                assert_eq!(alone.err(), Some(d.request_refusal()));
            }
            let inside = tally_codec::decode::<SignedRequest>(&bytes, usize::MAX);
            assert_eq!(inside.err(), Some(d.request_refusal()), "{} levels", d.levels());
        }
        (None, Shape::Value(_)) => unreachable!("a value shape builds a value"),
    }
});
