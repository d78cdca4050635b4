//! Receipt files: what `--receipt FILE` and `tally receipt --out FILE` write, and exactly what
//! `tally verify` reads.
//!
//! ```json
//! {"receipt": "<hex of borsh(Receipt)>", "request_id": "<hex>", "height": 12,
//!  "outcome": "DocCreated { revision: 1 }", "operator_key_hint": "<hex or null>"}
//! ```
//! Only `receipt` is trusted input to the check; the other fields are for people and must agree
//! with it, so a hand-edited file is caught rather than misleading: `request_id`, `height` and
//! `outcome` must be what the receipt says, `operator_key_hint` (when present) must name the key
//! the receipt verified against, and a field the format does not have is refused.

use crate::error::ClientError;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tally_codec::{limits, ClusterId, PublicKey, Receipt};

/// Largest receipt file `tally verify` reads (163,840 bytes): the hex of a receipt of
/// `RECEIPT_BYTES_MAX` bytes, with 16 KiB for the readable fields and the JSON around them. A
/// bigger file is refused before it is read whole.
pub const RECEIPT_FILE_BYTES_MAX: usize = 2 * limits::RECEIPT_BYTES_MAX + 16 * 1024;

/// The JSON form of a receipt file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptFile {
    /// Hex of the canonical (borsh) receipt: the only field `verify` relies on.
    pub receipt: String,
    pub request_id: String,
    pub height: u64,
    /// Debug form of the outcome, for reading by eye.
    pub outcome: String,
    /// The operator key the node reported; a hint only: verify against a key you trust.
    pub operator_key_hint: Option<String>,
}

impl ReceiptFile {
    /// Builds the file form of `receipt`.
    pub fn new(receipt: &Receipt, operator_key_hint: Option<PublicKey>) -> Self {
        ReceiptFile {
            receipt: hex::encode(tally_codec::encode(receipt)),
            request_id: receipt.request_id().to_hex(),
            height: receipt.header.height,
            outcome: format!("{:?}", receipt.outcome),
            operator_key_hint: operator_key_hint.map(|k| k.to_hex()),
        }
    }

    /// Decodes the receipt and checks the readable fields agree with it (the operator key hint
    /// only for being a key: [`verify_receipt_file`] compares it with the key it verifies
    /// against).
    ///
    /// # Errors
    /// [`ClientError::Invalid`] naming the field that is wrong.
    pub fn decode(&self) -> Result<Receipt, ClientError> {
        let bytes = hex::decode(self.receipt.trim())
            .map_err(|e| ClientError::Invalid(format!("receipt field is not hex: {e}")))?;
        // Bounded in size (RECEIPT_BYTES_MAX) and in depth (a transaction outcome may not hold
        // one): a crafted receipt is refused with the bound it broke, never a stack overflow.
        let receipt: Receipt = tally_codec::decode(&bytes, limits::RECEIPT_BYTES_MAX)
            .map_err(|e| ClientError::Invalid(format!("receipt field is not a tally receipt: {e}")))?;
        let id = receipt.request_id().to_hex();
        if id != self.request_id.trim().to_lowercase() {
            return Err(ClientError::Invalid(format!(
                "request_id field says '{}' but the receipt says '{id}'",
                self.request_id
            )));
        }
        if receipt.header.height != self.height {
            return Err(ClientError::Invalid(format!(
                "height field says {} but the receipt says {}",
                self.height, receipt.header.height
            )));
        }
        let outcome = format!("{:?}", receipt.outcome);
        if self.outcome.trim() != outcome {
            return Err(ClientError::Invalid(format!(
                "outcome field says '{}' but the receipt says '{outcome}'",
                self.outcome
            )));
        }
        self.operator_key_hint()?;
        Ok(receipt)
    }

    /// The operator key hint, if the file has one.
    ///
    /// # Errors
    /// [`ClientError::Invalid`] when it is not a public key.
    pub fn operator_key_hint(&self) -> Result<Option<PublicKey>, ClientError> {
        self.operator_key_hint
            .as_deref()
            .map(|h| {
                PublicKey::from_hex(h)
                    .map_err(|e| ClientError::Invalid(format!("operator_key_hint field is not a public key: {e}")))
            })
            .transpose()
    }
}

/// Writes a receipt file (readable JSON, one object).
///
/// # Errors
/// [`ClientError::File`] when the file can't be written.
pub fn save_receipt(path: &Path, receipt: &Receipt, operator_key_hint: Option<PublicKey>) -> Result<(), ClientError> {
    let file = ReceiptFile::new(receipt, operator_key_hint);
    let mut json = serde_json::to_string_pretty(&file).map_err(|e| ClientError::Invalid(e.to_string()))?;
    json.push('\n');
    std::fs::write(path, json).map_err(|e| ClientError::file(path, e))
}

/// Reads a receipt file written by [`save_receipt`].
///
/// # Errors
/// [`ClientError::File`] or [`ClientError::Invalid`].
pub fn load_receipt(path: &Path) -> Result<Receipt, ClientError> {
    read_receipt_file(path)?.decode()
}

/// Reads and parses a receipt file, refusing one over [`RECEIPT_FILE_BYTES_MAX`] before reading
/// it whole. The JSON is one flat object (serde_json's own nesting bound is 128 levels).
fn read_receipt_file(path: &Path) -> Result<ReceiptFile, ClientError> {
    let text = read_text_at_most(path, RECEIPT_FILE_BYTES_MAX, "receipt file").map_err(|e| match e {
        ClientError::Invalid(m) => ClientError::Invalid(format!("{} is not a tally receipt file: {m}", path.display())),
        other => other,
    })?;
    serde_json::from_str(&text)
        .map_err(|e| ClientError::Invalid(format!("{} is not a tally receipt file: {e}", path.display())))
}

/// Reads a text file of at most `bytes_max` bytes, refusing a longer one before reading it
/// whole: what a user is handed may be anything.
///
/// # Errors
/// [`ClientError::File`] when it can't be read; [`ClientError::Invalid`] when it is too long
/// (naming `what` and the bound) or not UTF-8.
pub fn read_text_at_most(path: &Path, bytes_max: usize, what: &str) -> Result<String, ClientError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| ClientError::file(path, e))?;
    let mut bytes = Vec::new();
    file.take(bytes_max as u64 + 1).read_to_end(&mut bytes).map_err(|e| ClientError::file(path, e))?;
    if bytes.len() > bytes_max {
        return Err(ClientError::Invalid(format!(
            "it is over {bytes_max} bytes, and a {what} is at most {bytes_max} bytes"
        )));
    }
    String::from_utf8(bytes).map_err(|_| ClientError::Invalid(format!("the {what} is not UTF-8 text")))
}

/// Accepts a hex operator key, or the path of a file holding one (like `operator.pub`).
///
/// # Errors
/// [`ClientError::Invalid`] when it is neither.
pub fn parse_operator_key(arg: &str) -> Result<PublicKey, ClientError> {
    let trimmed = arg.trim();
    if trimmed.len() == 2 * PublicKey::LEN && trimmed.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(PublicKey::from_hex(trimmed)?);
    }
    let path = Path::new(trimmed);
    if !path.exists() {
        return Err(ClientError::Invalid(format!(
            "operator key '{arg}' is neither 64 hex digits nor a file that holds them"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| ClientError::file(path, e))?;
    PublicKey::from_hex(text.trim())
        .map_err(|e| ClientError::Invalid(format!("{} does not hold an operator public key: {e}", path.display())))
}

/// Accepts a cluster id as `tally cluster init` and `tally status` print it (32 hex digits).
///
/// # Errors
/// [`ClientError::Invalid`] when it is not one.
pub fn parse_cluster_id(arg: &str) -> Result<ClusterId, ClientError> {
    ClusterId::from_hex(arg)
        .map_err(|_| ClientError::Invalid(format!("cluster id '{arg}' is not {} hex digits", 2 * ClusterId::LEN)))
}

/// The offline check behind `tally verify` without `--cluster-id`: see
/// [`verify_receipt_file_for`].
///
/// # Errors
/// [`ClientError::Invalid`] or [`ClientError::Codec`] saying which check failed.
pub fn verify_receipt_file(path: &Path, operator: &PublicKey) -> Result<Receipt, ClientError> {
    verify_receipt_file_for(path, operator, None)
}

/// The offline check behind `tally verify`: the file is well formed, its readable fields agree
/// with the receipt, the receipt verifies against `operator` and, when `cluster_id` is given,
/// it is a receipt of that cluster (clusters may share an operator key).
///
/// # Errors
/// [`ClientError::Invalid`] or [`ClientError::Codec`] saying which check failed.
pub fn verify_receipt_file_for(
    path: &Path,
    operator: &PublicKey,
    cluster_id: Option<&ClusterId>,
) -> Result<Receipt, ClientError> {
    let file = read_receipt_file(path)?;
    let receipt = file.decode()?;
    match cluster_id {
        Some(c) => receipt.verify_for_cluster(operator, c)?,
        None => receipt.verify(operator)?,
    }
    // Checked last: against a wrong key, the failed signature is the error to report.
    if let Some(hint) = file.operator_key_hint()? {
        if hint != *operator {
            return Err(ClientError::Invalid(format!(
                "operator_key_hint field names operator {hint}, but the receipt is signed by {operator}"
            )));
        }
    }
    Ok(receipt)
}

/// What `tally verify` prints for a receipt that verified.
pub fn verified_summary(receipt: &Receipt, operator: &PublicKey) -> String {
    format!(
        "Valid receipt: request {} at height {} of cluster {} (term {}), outcome {:?}, signed by operator {}",
        receipt.request_id(),
        receipt.header.height,
        receipt.header.cluster_id,
        receipt.header.term,
        receipt.outcome,
        operator
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::sample_receipt;
    use ed25519_dalek::SigningKey;
    use tally_codec::{ClusterId, Outcome};

    #[test]
    fn receipt_file_round_trip_and_verify() {
        let dir = tempfile::tempdir().expect("tempdir");
        let operator = SigningKey::from_bytes(&[1; 32]);
        let op_pub = crate::keyfile::public_of(&operator);
        let receipt = sample_receipt(&operator);
        let path = dir.path().join("r.json");
        save_receipt(&path, &receipt, Some(op_pub)).expect("save");
        assert_eq!(load_receipt(&path).expect("load"), receipt);
        verify_receipt_file(&path, &op_pub).expect("valid receipt verifies");

        // The operator key may be given as a file, like operator.pub.
        let pub_path = dir.path().join("operator.pub");
        std::fs::write(&pub_path, format!("{}\n", op_pub.to_hex())).expect("write");
        assert_eq!(parse_operator_key(pub_path.to_str().expect("utf8")).expect("file key"), op_pub);
        assert_eq!(parse_operator_key(&op_pub.to_hex()).expect("hex key"), op_pub);
        assert!(parse_operator_key("nope").is_err());

        // Another operator key fails.
        let other = crate::keyfile::public_of(&SigningKey::from_bytes(&[2; 32]));
        let err = verify_receipt_file(&path, &other).expect_err("wrong key");
        assert!(err.to_string().contains("header signature"), "{err}");
    }

    #[test]
    fn tampered_receipts_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let operator = SigningKey::from_bytes(&[1; 32]);
        let op_pub = crate::keyfile::public_of(&operator);
        let mut receipt = sample_receipt(&operator);
        receipt.outcome = Outcome::DocCreated { revision: 2 };
        let path = dir.path().join("tampered.json");
        save_receipt(&path, &receipt, None).expect("save");
        let err = verify_receipt_file(&path, &op_pub).expect_err("tampered outcome");
        assert!(err.to_string().contains("Merkle proof"), "{err}");

        // Editing a readable field without the receipt is caught too.
        let good = sample_receipt(&operator);
        let mut file = ReceiptFile::new(&good, None);
        file.height = 8;
        std::fs::write(&path, serde_json::to_string(&file).expect("json")).expect("write");
        assert!(verify_receipt_file(&path, &op_pub).expect_err("height").to_string().contains("height"));

        // A flipped byte in the receipt hex.
        let mut file = ReceiptFile::new(&good, None);
        let mut bytes = hex::decode(&file.receipt).expect("hex");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        file.receipt = hex::encode(bytes);
        std::fs::write(&path, serde_json::to_string(&file).expect("json")).expect("write");
        assert!(verify_receipt_file(&path, &op_pub).is_err());
    }

    /// Writes `file`, then `tally verify`'s check of it against `operator`.
    fn verify_file(file: &ReceiptFile, operator: &PublicKey) -> Result<Receipt, ClientError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.json");
        std::fs::write(&path, serde_json::to_string_pretty(file).expect("json")).expect("write");
        verify_receipt_file(&path, operator)
    }

    /// (b) Every readable field must agree with the signed bytes: an edited outcome is refused
    /// although the receipt itself is intact.
    #[test]
    fn edited_outcome_field_is_refused() {
        let operator = SigningKey::from_bytes(&[1; 32]);
        let op_pub = crate::keyfile::public_of(&operator);
        let good = sample_receipt(&operator);
        verify_file(&ReceiptFile::new(&good, Some(op_pub)), &op_pub).expect("untouched file verifies");

        let mut file = ReceiptFile::new(&good, Some(op_pub));
        file.outcome = "DocCreated { revision: 2 }".into();
        let err = verify_file(&file, &op_pub).expect_err("edited outcome");
        assert_eq!(
            err.to_string(),
            "outcome field says 'DocCreated { revision: 2 }' but the receipt says 'DocCreated { revision: 1 }'"
        );
        let mut file = ReceiptFile::new(&good, Some(op_pub));
        file.outcome = "Rejected(InsufficientFunds)".into();
        assert!(verify_file(&file, &op_pub).expect_err("edited outcome").to_string().contains("outcome field"));
    }

    /// (b) The operator key hint is readable too: one naming another key than the one the
    /// receipt verified against is misleading, so it is refused; a missing hint is fine.
    #[test]
    fn operator_key_hint_must_name_the_verifying_key() {
        let operator = SigningKey::from_bytes(&[1; 32]);
        let op_pub = crate::keyfile::public_of(&operator);
        let other = crate::keyfile::public_of(&SigningKey::from_bytes(&[2; 32]));
        let good = sample_receipt(&operator);
        verify_file(&ReceiptFile::new(&good, None), &op_pub).expect("no hint");
        let err = verify_file(&ReceiptFile::new(&good, Some(other)), &op_pub).expect_err("hint names another key");
        assert!(err.to_string().contains("operator_key_hint field"), "{err}");
        let mut file = ReceiptFile::new(&good, None);
        file.operator_key_hint = Some("not a key".into());
        let err = verify_file(&file, &op_pub).expect_err("hint is not a key");
        assert!(err.to_string().contains("operator_key_hint field"), "{err}");
    }

    /// (b) A field the format does not have would be read by people but checked by nobody.
    #[test]
    fn unknown_readable_fields_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let operator = SigningKey::from_bytes(&[1; 32]);
        let op_pub = crate::keyfile::public_of(&operator);
        let good = sample_receipt(&operator);
        let mut doc = serde_json::to_value(ReceiptFile::new(&good, Some(op_pub))).expect("json");
        doc["amount"] = serde_json::Value::from(1_000_000u64);
        let path = dir.path().join("extra.json");
        std::fs::write(&path, doc.to_string()).expect("write");
        let err = verify_receipt_file(&path, &op_pub).expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `amount`"), "{err}");
    }

    /// Writes a receipt file whose `receipt` field is the hex of `bytes`, readable fields
    /// made up (decoding comes first).
    fn file_with_receipt_bytes(dir: &Path, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.join("crafted.json");
        let file = ReceiptFile {
            receipt: hex::encode(bytes),
            request_id: "00".repeat(32),
            height: 1,
            outcome: "DocDeleted".into(),
            operator_key_hint: None,
        };
        std::fs::write(&path, serde_json::to_string(&file).expect("json")).expect("write");
        path
    }

    /// A receipt whose outcome nests `TxnApplied` 15,000 levels deep, signed or not, made
    /// `tally verify` abort on its stack. Now a nested outcome is refused naming the nesting
    /// bound (2 and 10,000 levels), and one too deep to fit the file bound by its size.
    #[test]
    fn deeply_nested_receipts_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let operator = SigningKey::from_bytes(&[1; 32]);
        let op_pub = crate::keyfile::public_of(&operator);
        let good = sample_receipt(&operator);
        for depth in [2usize, 10_000, 15_000, 100_000] {
            let mut bytes = tally_codec::encode(&good.request);
            for _ in 1..depth {
                bytes.extend_from_slice(&[11, 1, 1, 0, 0, 0]); // TxnApplied { then: true, [..] }
            }
            bytes.extend_from_slice(&[11, 1, 0, 0, 0, 0]);
            bytes.extend_from_slice(&good.leaf_index.to_le_bytes());
            bytes.extend_from_slice(&0u32.to_le_bytes());
            bytes.extend_from_slice(&tally_codec::encode(&good.header));
            bytes.extend_from_slice(&good.signature.0);
            let path = file_with_receipt_bytes(dir.path(), &bytes);
            let err = verify_receipt_file(&path, &op_pub).expect_err("nested outcome");
            let text = err.to_string();
            let reason = if 12 * depth < RECEIPT_FILE_BYTES_MAX {
                "nested deeper than the limit of 1 level".to_string()
            } else {
                format!("a receipt file is at most {RECEIPT_FILE_BYTES_MAX} bytes")
            };
            assert!(text.contains(&reason), "depth {depth}: {text}");
        }
    }

    /// A receipt file, or the receipt in it, over its bound is refused by its size before it is
    /// read whole or decoded.
    #[test]
    fn oversize_receipt_files_are_refused_by_their_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let op_pub = crate::keyfile::public_of(&SigningKey::from_bytes(&[1; 32]));
        let path = dir.path().join("huge.json");
        let mut f = std::fs::File::create(&path).expect("create");
        std::io::Write::write_all(&mut f, b"{\"receipt\": \"").expect("write");
        std::io::Write::write_all(&mut f, &vec![b'0'; 20 << 20]).expect("write");
        drop(f);
        let err = verify_receipt_file(&path, &op_pub).expect_err("20 MB file");
        assert!(
            err.to_string().contains(&format!("a receipt file is at most {RECEIPT_FILE_BYTES_MAX} bytes")),
            "{err}"
        );
        // Within the file bound, but the receipt is over its own.
        let path = file_with_receipt_bytes(dir.path(), &vec![0; limits::RECEIPT_BYTES_MAX + 1]);
        let err = verify_receipt_file(&path, &op_pub).expect_err("receipt over its bound");
        assert!(err.to_string().contains(&format!("over the limit of {} bytes", limits::RECEIPT_BYTES_MAX)), "{err}");
    }

    /// (d) Two clusters sharing an operator key: `--cluster-id` binds the receipt to one.
    #[test]
    fn cluster_id_binds_the_receipt_to_its_cluster() {
        let dir = tempfile::tempdir().expect("tempdir");
        let operator = SigningKey::from_bytes(&[1; 32]);
        let op_pub = crate::keyfile::public_of(&operator);
        let receipt = sample_receipt(&operator);
        let own = receipt.header.cluster_id;
        let other = ClusterId([4; 16]);
        let path = dir.path().join("r.json");
        save_receipt(&path, &receipt, Some(op_pub)).expect("save");

        verify_receipt_file_for(&path, &op_pub, Some(&own)).expect("its own cluster");
        let err = verify_receipt_file_for(&path, &op_pub, Some(&other)).expect_err("another cluster");
        assert_eq!(
            err.to_string(),
            format!("receipt does not verify: it is a receipt of cluster {own}, not of cluster {other}")
        );
        assert_eq!(parse_cluster_id(&own.to_hex()).expect("hex"), own);
        assert!(parse_cluster_id("03").expect_err("short").to_string().contains("32 hex digits"));

        // The success line names the cluster it verified.
        let line = verified_summary(&receipt, &op_pub);
        assert!(
            line.starts_with(&format!("Valid receipt: request {} at height 7 of cluster {own}", receipt.request_id()))
        );
    }
}
