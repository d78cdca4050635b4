//! The JSON form of a transaction (`tally txn --file TXN.json`, documented in
//! `docs/coordination.md`):
//!
//! ```json
//! { "compares": [ { "revision": { "key": "UUID4", "revision": 0 } },
//!                 { "exists": "UUID4" },
//!                 { "balance_at_least": { "account": "HEX", "amount": 10 } },
//!                 { "lease_alive": 4194305 } ],
//!   "then": [ { "set": { "key": "UUID4", "value": { "any": "json" }, "if_revision": 1, "lease": 4194305 } },
//!             { "delete": { "key": "UUID4", "if_revision": 2 } },
//!             { "transfer": { "to": "HEX", "amount": 5 } },
//!             { "claim": { "domain": "slots", "slot": 7, "lease": 4194305 } },
//!             { "lease_keepalive": 4194305 }, { "lease_revoke": 4194305 } ],
//!   "else": [] }
//! ```
//! Unknown fields are refused, so a typo never silently drops a condition.

use crate::ClientError;
use serde::Deserialize;
use std::path::Path;
use tally_codec::{Compare, DocKey, Operation, PublicKey, Txn};

/// Largest transaction file read: 32 + 32 operations of up to 64 KiB of JSON each would need
/// more, but their request could not pass `REQUEST_BYTES_MAX` (69,632 bytes) anyway.
pub const TXN_FILE_BYTES_MAX: usize = 1 << 20;

/// Reads a transaction file, refusing one over [`TXN_FILE_BYTES_MAX`] before reading it whole.
///
/// # Errors
/// [`ClientError::File`] or [`ClientError::Invalid`] naming the file and the problem.
pub fn read(path: &Path) -> Result<Txn, ClientError> {
    let named = |e: String| ClientError::Invalid(format!("{}: {e}", path.display()));
    let text =
        crate::receipt_file::read_text_at_most(path, TXN_FILE_BYTES_MAX, "transaction file").map_err(|e| match e {
            ClientError::Invalid(m) => named(m),
            other => other,
        })?;
    parse(&text).map_err(named)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnJson {
    #[serde(default)]
    compares: Vec<CompareJson>,
    #[serde(default)]
    then: Vec<OpJson>,
    #[serde(default, rename = "else")]
    otherwise: Vec<OpJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum CompareJson {
    Revision { key: String, revision: u64 },
    Exists(String),
    BalanceAtLeast { account: String, amount: u64 },
    LeaseAlive(u64),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum OpJson {
    Set {
        key: String,
        value: serde_json::Value,
        #[serde(default)]
        if_revision: Option<u64>,
        #[serde(default)]
        lease: Option<u64>,
    },
    Delete {
        key: String,
        #[serde(default)]
        if_revision: Option<u64>,
    },
    Transfer {
        to: String,
        amount: u64,
    },
    Claim {
        domain: String,
        slot: u64,
        #[serde(default)]
        lease: Option<u64>,
    },
    LeaseKeepalive(u64),
    LeaseRevoke(u64),
}

fn key(s: &str) -> Result<DocKey, String> {
    DocKey::parse(s).map_err(|_| format!("'{s}': Key is not a proper UUID4"))
}

fn pubkey(s: &str) -> Result<PublicKey, String> {
    PublicKey::from_hex(s).map_err(|_| format!("'{s}' is not a public key (64 hex digits)"))
}

fn op(o: OpJson) -> Result<Operation, String> {
    Ok(match o {
        OpJson::Set { key: k, value, if_revision, lease } => {
            Operation::SetIf { key: key(&k)?, value: value.to_string().into_bytes(), if_revision, lease }
        }
        OpJson::Delete { key: k, if_revision } => Operation::DeleteIf { key: key(&k)?, if_revision },
        OpJson::Transfer { to, amount } => Operation::Transfer { to: pubkey(&to)?, amount },
        OpJson::Claim { domain, slot, lease } => Operation::Claim { domain, slot, lease },
        OpJson::LeaseKeepalive(lease) => Operation::LeaseKeepAlive { lease },
        OpJson::LeaseRevoke(lease) => Operation::LeaseRevoke { lease },
    })
}

/// Parses a transaction file.
///
/// # Errors
/// What is wrong and where (serde's line and column, or the bad key).
pub fn parse(text: &str) -> Result<Txn, String> {
    let t: TxnJson = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let compares = t
        .compares
        .into_iter()
        .map(|c| {
            Ok(match c {
                CompareJson::Revision { key: k, revision } => Compare::Revision { key: key(&k)?, revision },
                CompareJson::Exists(k) => Compare::Exists { key: key(&k)? },
                CompareJson::BalanceAtLeast { account, amount } => {
                    Compare::BalanceAtLeast { account: pubkey(&account)?, amount }
                }
                CompareJson::LeaseAlive(lease) => Compare::LeaseAlive { lease },
            })
        })
        .collect::<Result<_, String>>()?;
    let then = t.then.into_iter().map(op).collect::<Result<_, _>>()?;
    let otherwise = t.otherwise.into_iter().map(op).collect::<Result<_, _>>()?;
    Ok(Txn { compares, then, otherwise })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file over the bound is refused by its size, before it is read whole or parsed.
    #[test]
    fn an_oversize_file_is_refused_by_its_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("txn.json");
        std::fs::write(&path, vec![b' '; TXN_FILE_BYTES_MAX + 1]).expect("write");
        let err = read(&path).expect_err("over the bound").to_string();
        assert!(err.contains(&format!("a transaction file is at most {TXN_FILE_BYTES_MAX} bytes")), "{err}");
        std::fs::write(&path, br#"{ "then": [ { "lease_revoke": 9 } ] }"#).expect("write");
        assert_eq!(read(&path).expect("parses").then, vec![Operation::LeaseRevoke { lease: 9 }]);
    }

    const K: &str = "0d5d3807-5fbf-4228-a657-5a091c4e497f";

    #[test]
    fn every_form_parses() {
        let acct = "11".repeat(32);
        let text = format!(
            r#"{{ "compares": [ {{ "revision": {{ "key": "{K}", "revision": 0 }} }}, {{ "exists": "{K}" }},
                 {{ "balance_at_least": {{ "account": "{acct}", "amount": 10 }} }}, {{ "lease_alive": 9 }} ],
               "then": [ {{ "set": {{ "key": "{K}", "value": {{ "a": 1 }}, "lease": 9 }} }},
                         {{ "transfer": {{ "to": "{acct}", "amount": 5 }} }},
                         {{ "claim": {{ "domain": "slots", "slot": 7 }} }}, {{ "lease_keepalive": 9 }} ],
               "else": [ {{ "delete": {{ "key": "{K}", "if_revision": 2 }} }}, {{ "lease_revoke": 9 }} ] }}"#
        );
        let t = parse(&text).expect("parses");
        assert_eq!(t.compares.len(), 4);
        assert_eq!(t.then.len(), 4);
        assert_eq!(t.otherwise.len(), 2);
        let Operation::SetIf { value, lease, if_revision, .. } = &t.then[0] else { panic!("{:?}", t.then[0]) };
        assert_eq!((value.as_slice(), *lease, *if_revision), (br#"{"a":1}"#.as_slice(), Some(9), None));
        assert_eq!(t.compares[3], Compare::LeaseAlive { lease: 9 });
    }

    #[test]
    fn typos_and_bad_keys_are_refused_with_the_reason() {
        let e = parse(r#"{ "compare": [] }"#).expect_err("unknown field");
        assert!(e.contains("unknown field `compare`"), "{e}");
        let e = parse(r#"{ "then": [ { "delete": { "key": "12345" } } ] }"#).expect_err("not a UUID4");
        assert!(e.contains("Key is not a proper UUID4"), "{e}");
        let e = parse(r#"{ "then": [ { "transfr": { "to": "x", "amount": 1 } } ] }"#).expect_err("unknown op");
        assert!(e.contains("unknown variant `transfr`"), "{e}");
    }
}
