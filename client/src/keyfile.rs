//! Signing-key files: `{"public": "<hex>", "secret": "<hex seed>"}`, mode 0600.
//!
//! The same format is used by `tally keygen`, the default per-user key, and the funded account
//! keys that `tally cluster init` writes, so any of them can be passed to `--key`.

use crate::error::ClientError;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use tally_codec::PublicKey;

/// On-disk form of a key; public is stored too so a file can be checked and shared by eye.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFile {
    /// Hex ed25519 public key.
    pub public: String,
    /// Hex 32-byte ed25519 seed.
    pub secret: String,
}

/// A fresh random signing key (OS randomness), so every caller gets keys the same way.
pub fn generate_key() -> SigningKey {
    SigningKey::generate(&mut rand_core::OsRng)
}

/// The public key in tally's newtype, for requests and balances.
pub fn public_of(key: &SigningKey) -> PublicKey {
    PublicKey(key.verifying_key().to_bytes())
}

/// Writes `bytes` to a new file readable only by its owner; refuses to overwrite, because
/// silently replacing a key loses the money or documents it owns.
///
/// # Errors
/// [`ClientError::File`] when the file exists or can't be written.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), ClientError> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| ClientError::file(parent, e))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| ClientError::file(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| ClientError::file(path, e))
}

/// Writes a key file for `key`.
///
/// # Errors
/// See [`write_private_file`].
pub fn save_key(path: &Path, key: &SigningKey) -> Result<(), ClientError> {
    let file = KeyFile { public: public_of(key).to_hex(), secret: hex::encode(key.to_bytes()) };
    let mut json = serde_json::to_string_pretty(&file).map_err(|e| ClientError::Invalid(e.to_string()))?;
    json.push('\n');
    write_private_file(path, json.as_bytes())
}

/// Generates a key and writes it to `path` (`tally keygen`).
///
/// # Errors
/// See [`write_private_file`].
pub fn keygen(path: &Path) -> Result<SigningKey, ClientError> {
    let key = generate_key();
    save_key(path, &key)?;
    Ok(key)
}

/// Largest key file read (one small JSON object).
pub const KEY_FILE_BYTES_MAX: usize = 64 * 1024;

/// Reads a key file and checks that its public half matches its secret half.
///
/// # Errors
/// [`ClientError::KeyFile`] naming what is wrong with the file.
pub fn load_key(path: &Path) -> Result<SigningKey, ClientError> {
    let bad = |reason: String| ClientError::KeyFile { path: path.display().to_string(), reason };
    let text = crate::receipt_file::read_text_at_most(path, KEY_FILE_BYTES_MAX, "key file").map_err(|e| match e {
        ClientError::File { source, .. } => bad(source.to_string()),
        other => bad(other.to_string()),
    })?;
    let file: KeyFile = serde_json::from_str(&text).map_err(|e| bad(format!("not a tally key file: {e}")))?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(file.secret.trim(), &mut seed)
        .map_err(|e| bad(format!("secret must be 64 hex digits: {e}")))?;
    let key = SigningKey::from_bytes(&seed);
    let public = PublicKey::from_hex(&file.public).map_err(|e| bad(e.to_string()))?;
    if public != public_of(&key) {
        return Err(bad("public key does not belong to the secret key".into()));
    }
    Ok(key)
}

/// Where the per-user key lives when `--key` is not given.
///
/// # Errors
/// [`ClientError::Invalid`] when the platform has no config directory.
pub fn default_key_path() -> Result<PathBuf, ClientError> {
    dirs::config_dir()
        .map(|d| d.join("tally").join("key.json"))
        .ok_or_else(|| ClientError::Invalid("no user config directory; pass --key FILE".into()))
}

/// Loads the key at `path`, or the default key, creating the default on first use.
/// An explicit path is never created: a typo must not silently make a new identity.
///
/// # Errors
/// [`ClientError::KeyFile`] or [`ClientError::File`].
pub fn load_or_create(path: Option<&Path>) -> Result<SigningKey, ClientError> {
    match path {
        Some(p) => load_key(p),
        None => {
            let p = default_key_path()?;
            if p.exists() {
                load_key(&p)
            } else {
                let key = keygen(&p)?;
                eprintln!("Created a new signing key in {}", p.display());
                Ok(key)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key file is small: a huge one is refused by its size before it is read whole.
    #[test]
    fn an_oversize_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.json");
        std::fs::write(&path, vec![b' '; KEY_FILE_BYTES_MAX + 1]).expect("write");
        let err = load_key(&path).expect_err("over the bound").to_string();
        assert!(err.contains(&format!("a key file is at most {KEY_FILE_BYTES_MAX} bytes")), "{err}");
    }
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_file_round_trip_with_private_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/key.json");
        let key = keygen(&path).expect("keygen");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = load_key(&path).expect("load");
        assert_eq!(back.to_bytes(), key.to_bytes());
        let text = std::fs::read_to_string(&path).expect("read");
        let file: KeyFile = serde_json::from_str(&text).expect("json");
        assert_eq!(file.public, public_of(&key).to_hex());
        // Never overwrite an existing key.
        assert!(keygen(&path).is_err());
        assert_eq!(load_key(&path).expect("still there").to_bytes(), key.to_bytes());
    }

    #[test]
    fn mismatched_or_garbage_key_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.json");
        let a = generate_key();
        let b = generate_key();
        let file = KeyFile { public: public_of(&a).to_hex(), secret: hex::encode(b.to_bytes()) };
        std::fs::write(&path, serde_json::to_string(&file).expect("json")).expect("write");
        let err = load_key(&path).expect_err("mismatch");
        assert!(err.to_string().contains("does not belong"), "{err}");
        std::fs::write(&path, "hello").expect("write");
        assert!(load_key(&path).expect_err("garbage").to_string().contains("not a tally key file"));
        assert!(load_key(&dir.path().join("missing.json")).is_err());
    }
}
