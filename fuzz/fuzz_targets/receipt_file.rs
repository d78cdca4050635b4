//! Receipt files as `tally verify` reads them (client `receipt_file.rs` `verify_receipt_file`):
//! UTF-8 text ─▶ `serde_json::from_str::<ReceiptFile>` ─▶ `.decode()` (hex ─▶ borsh `Receipt`,
//! readable fields cross-checked) ─▶ `Receipt::verify` against a fixed operator key.
//! Receipts also come from a node (`ServerMessage::Receipt`), so the hex-decoded bytes are also
//! checked directly as a receipt, whatever the readable fields say.
//!
//! Properties: no panic (every step returns errors); a verified receipt's hex is canonical.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tally_client::ReceiptFile;
use tally_codec::{limits, PublicKey, Receipt};

/// The operator key the seed receipts are signed with (`[1; 32]`, as in the client's tests).
fn operator() -> &'static PublicKey {
    static KEY: OnceLock<PublicKey> = OnceLock::new();
    KEY.get_or_init(|| PublicKey(SigningKey::from_bytes(&[1; 32]).verifying_key().to_bytes()))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(file) = serde_json::from_str::<ReceiptFile>(text) else { return };
    match file.decode() {
        Ok(receipt) => {
            if receipt.verify(operator()).is_ok() {
                assert_eq!(tally_codec::encode(&receipt), hex::decode(file.receipt.trim()).expect("decoded hex"));
            }
        }
        Err(_) => {
            // Straight to the receipt check, as a client does with a node's reply.
            if let Ok(bytes) = hex::decode(file.receipt.trim()) {
                if let Ok(r) = tally_codec::decode::<Receipt>(&bytes, limits::FRAME_BYTES_MAX) {
                    let _ = r.verify(operator());
                }
            }
        }
    }
});
