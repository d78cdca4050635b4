//! The genesis file: the cluster id, the operator key and the only money there will ever be.

use crate::{ClusterId, CodecError, PublicKey};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenesisAccount {
    /// Hex ed25519 public key.
    pub key: String,
    pub balance: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Genesis {
    /// Hex, 32 digits.
    pub cluster_id: String,
    /// Hex operator public key.
    pub operator_key: String,
    pub accounts: Vec<GenesisAccount>,
}

/// Largest genesis file a node reads: about 600,000 accounts of 100 bytes each.
pub const GENESIS_BYTES_MAX: usize = 64 << 20;

impl Genesis {
    /// # Errors
    /// [`CodecError::TooLarge`] over [`GENESIS_BYTES_MAX`]; [`CodecError::Malformed`] for bad
    /// JSON, bad hex, duplicate accounts or a total that overflows u64.
    pub fn parse(json: &str) -> Result<Self, CodecError> {
        if json.len() > GENESIS_BYTES_MAX {
            return Err(CodecError::TooLarge { size: json.len(), max: GENESIS_BYTES_MAX });
        }
        let g: Genesis = serde_json::from_str(json).map_err(|e| CodecError::Malformed(format!("genesis: {e}")))?;
        g.cluster()?;
        g.operator()?;
        let accounts = g.balances()?;
        let mut seen = std::collections::HashSet::new();
        let mut total: u64 = 0;
        for (k, b) in &accounts {
            if !seen.insert(*k) {
                return Err(CodecError::Malformed(format!("genesis: account {k} appears twice")));
            }
            total = total
                .checked_add(*b)
                .ok_or_else(|| CodecError::Malformed("genesis: total balance overflows u64".into()))?;
        }
        Ok(g)
    }

    /// # Errors
    /// On bad hex.
    pub fn cluster(&self) -> Result<ClusterId, CodecError> {
        ClusterId::from_hex(&self.cluster_id)
    }

    /// # Errors
    /// On bad hex.
    pub fn operator(&self) -> Result<PublicKey, CodecError> {
        PublicKey::from_hex(&self.operator_key)
    }

    /// # Errors
    /// On bad hex.
    pub fn balances(&self) -> Result<Vec<(PublicKey, u64)>, CodecError> {
        self.accounts.iter().map(|a| Ok((PublicKey::from_hex(&a.key)?, a.balance))).collect()
    }

    pub fn total(&self) -> u64 {
        self.accounts.iter().map(|a| a.balance).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_genesis_over_its_bound_is_refused_by_its_size() {
        let text = " ".repeat(GENESIS_BYTES_MAX + 1);
        assert_eq!(
            Genesis::parse(&text),
            Err(CodecError::TooLarge { size: GENESIS_BYTES_MAX + 1, max: GENESIS_BYTES_MAX })
        );
    }
}
