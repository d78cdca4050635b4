//! Fixed-size identifiers. Each is a newtype so a digest can't be passed where a key is meant.

use crate::CodecError;
use borsh::{BorshDeserialize, BorshSerialize};
use std::fmt;

macro_rules! bytes_newtype {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, BorshSerialize, BorshDeserialize)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            pub const LEN: usize = $len;

            /// Parses lowercase or uppercase hex of exactly the right length.
            ///
            /// # Errors
            /// [`CodecError::BadHex`] naming the expected length.
            pub fn from_hex(s: &str) -> Result<Self, CodecError> {
                let mut out = [0u8; $len];
                hex::decode_to_slice(s.trim(), &mut out).map_err(|e| {
                    CodecError::BadHex(format!("{} must be {} hex digits: {e}", stringify!($name), 2 * $len))
                })?;
                Ok(Self(out))
            }

            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.to_hex()[..16.min(2 * $len)])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
    };
}

bytes_newtype!(
    /// blake3 output.
    Digest, 32
);
bytes_newtype!(
    /// blake3 of a request's signing bytes; the exactly-once key.
    RequestId, 32
);
bytes_newtype!(
    /// An ed25519 verifying key: an account, a document owner, or the operator.
    PublicKey, 32
);
bytes_newtype!(
    /// An ed25519 signature.
    Signature, 64
);
bytes_newtype!(
    /// Names one cluster; requests and peers carry it so nothing crosses clusters.
    ClusterId, 16
);

impl Digest {
    pub const ZERO: Digest = Digest([0; 32]);
}

/// Zeros: the hash before the first header, the state digest before the first batch.
impl Default for Digest {
    fn default() -> Self {
        Digest::ZERO
    }
}

/// A document key: always a UUID version 4 (RFC 4122 variant).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, BorshSerialize, BorshDeserialize)]
pub struct DocKey(pub [u8; 16]);

impl DocKey {
    /// Parses the hyphenated (or simple) UUID text form.
    ///
    /// # Errors
    /// [`CodecError::NotUuid4`] for anything that is not a version-4, RFC 4122 UUID.
    pub fn parse(s: &str) -> Result<Self, CodecError> {
        let u = uuid::Uuid::parse_str(s.trim()).map_err(|_| CodecError::NotUuid4)?;
        let key = DocKey(*u.as_bytes());
        if key.is_uuid4() {
            Ok(key)
        } else {
            Err(CodecError::NotUuid4)
        }
    }

    /// Version nibble 4 and variant bits 10xx.
    pub fn is_uuid4(&self) -> bool {
        (self.0[6] >> 4) == 4 && (self.0[8] & 0xC0) == 0x80
    }

    /// Builds a valid UUID4 from 16 random bytes (sets version and variant bits).
    pub fn from_random(mut bytes: [u8; 16]) -> Self {
        bytes[6] = (bytes[6] & 0x0F) | 0x40;
        bytes[8] = (bytes[8] & 0x3F) | 0x80;
        DocKey(bytes)
    }
}

impl fmt::Display for DocKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", uuid::Uuid::from_bytes(self.0).hyphenated())
    }
}

impl fmt::Debug for DocKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid4_parsing() {
        assert!(DocKey::parse("0d5d3807-5fbf-4228-a657-5a091c4e497f").is_ok());
        assert_eq!(DocKey::parse("12345"), Err(CodecError::NotUuid4));
        // Version 1 UUID.
        assert_eq!(DocKey::parse("6ba7b810-9dad-11d1-80b4-00c04fd430c8"), Err(CodecError::NotUuid4));
        // Version 4 nibble but wrong variant.
        assert_eq!(DocKey::parse("0d5d3807-5fbf-4228-c657-5a091c4e497f"), Err(CodecError::NotUuid4));
        let k = DocKey::from_random([0xff; 16]);
        assert!(k.is_uuid4());
        assert_eq!(DocKey::parse(&k.to_string()), Ok(k));
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let p = PublicKey([7; 32]);
        assert_eq!(PublicKey::from_hex(&p.to_hex()), Ok(p));
        assert!(matches!(PublicKey::from_hex("abcd"), Err(CodecError::BadHex(_))));
    }
}
