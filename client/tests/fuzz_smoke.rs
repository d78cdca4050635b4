//! A stable-toolchain smoke fuzzer for receipt files, as `tally verify` reads them (the nightly,
//! coverage-guided version is `fuzz/fuzz_targets/receipt_file.rs`): UTF-8 text ─▶
//! `serde_json::from_str::<ReceiptFile>` ─▶ `.decode()` ─▶ `Receipt::verify` against a fixed
//! operator key. Inputs are seeded random bytes and mutations (`codec/tests/mutate/`) of valid
//! files, mutated as text or inside the receipt's hex.
//!
//! Any panic fails the test, as does a valid file that does not decode and verify.
//!
//! ```text
//! TALLY_FUZZ_ITERS (default 5_000)  TALLY_FUZZ_SECS (default 5)  TALLY_FUZZ_SEED (replay)
//! TALLY_FUZZ_WRITE_SEEDS=fuzz/seeds  write a starting corpus for the cargo-fuzz target instead
//! cargo test -p tally-client --test fuzz_smoke -- --nocapture
//! ```
#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

#[path = "../../codec/tests/mutate/mod.rs"]
mod mutate;

use ed25519_dalek::SigningKey;
use mutate::{env_or, input, write_seeds, Rng};
use std::time::{Duration, Instant};
use tally_client::ReceiptFile;
use tally_codec::merkle::{leaf_hash, Tree};
use tally_codec::{PublicKey, Receipt};

fn operator_key() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}

fn operator_public() -> PublicKey {
    PublicKey(operator_key().verifying_key().to_bytes())
}

/// A receipt that verifies against [`operator_public`] (as in `codec/tests/fuzz_smoke.rs`).
fn signed_receipt(rng: &mut Rng) -> Receipt {
    let user = SigningKey::from_bytes(&rng.bytes());
    let mut request = mutate::request(rng);
    request.request.signer = PublicKey(user.verifying_key().to_bytes());
    let request = request.request.sign(&user);
    let n = 1 + rng.below(5);
    let at = rng.below(n);
    let outcome = mutate::outcome(rng);
    let leaves: Vec<[u8; 32]> =
        (0..n).map(|i| if i == at { leaf_hash(&request.id(), &outcome) } else { rng.bytes() }).collect();
    let tree = Tree::from_leaves(&leaves);
    let mut header = mutate::header(rng);
    header.cluster_id = request.request.cluster_id;
    header.merkle_root = tree.root();
    header.leaf_count = n as u32;
    // An honest operator never signs a request that expired before its batch.
    header.time_ms = header.time_ms.min(request.request.expires_at_ms);
    let signature = header.sign(&operator_key());
    Receipt { request, outcome, leaf_index: at as u32, proof: tree.proof(at), header, signature }
}

/// A receipt file as `save_receipt` writes it (pretty or compact JSON, with or without a hint).
fn receipt_file(rng: &mut Rng) -> Vec<u8> {
    let hint = rng.chance(2).then(operator_public);
    let file = ReceiptFile::new(&signed_receipt(rng), hint);
    let json = if rng.chance(2) { serde_json::to_string_pretty(&file) } else { serde_json::to_string(&file) };
    let mut json = json.unwrap();
    json.push('\n');
    json.into_bytes()
}

/// Returns whether the file decoded and verified.
fn target(bytes: &[u8], valid: bool) -> bool {
    let verified = (|| {
        let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
        let file: ReceiptFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let receipt = file.decode().map_err(|e| e.to_string())?;
        receipt.verify(&operator_public()).map_err(|e| e.to_string())
    })();
    assert!(!valid || verified.is_ok(), "a valid receipt file was refused: {verified:?}");
    verified.is_ok()
}

#[test]
fn fuzz_smoke() {
    let iters_max: u64 = env_or("TALLY_FUZZ_ITERS", 5_000);
    let secs: u64 = env_or("TALLY_FUZZ_SECS", 5);
    let seed: u64 = env_or(
        "TALLY_FUZZ_SEED",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
    );
    let mut rng = Rng(seed);
    if write_seeds("receipt_file", 16, &mut rng, &mut receipt_file) {
        return;
    }
    println!("fuzz_smoke: seed {seed} (replay with TALLY_FUZZ_SEED={seed}), up to {iters_max} iterations / {secs} s");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut iters, mut accepted) = (0u64, 0u64);
    while iters < iters_max && Instant::now() < deadline {
        for _ in 0..64.min(iters_max - iters) {
            iters += 1;
            let (bytes, valid) = if rng.chance(2) {
                input(&mut rng, &mut receipt_file)
            } else {
                // Mutate the borsh receipt inside a well-formed file: reaches decode and verify.
                let (receipt, valid) = input(&mut rng, &mut |r| tally_codec::encode(&signed_receipt(r)));
                let mut file = ReceiptFile::new(&signed_receipt(&mut rng), None);
                file.receipt = hex::encode(&receipt);
                if let Ok(r) = tally_codec::decode::<Receipt>(&receipt, usize::MAX) {
                    // Keep the readable fields in step, so the check reaches `verify`.
                    file = ReceiptFile::new(&r, None);
                    file.receipt = hex::encode(&receipt);
                }
                (serde_json::to_vec(&file).unwrap(), valid)
            };
            accepted += u64::from(target(&bytes, valid));
        }
    }
    println!("fuzz_smoke: seed {seed}: {iters} iterations, {accepted} files verified, no panics");
    assert!(iters > 0);
}
