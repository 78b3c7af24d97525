//! Identifiers and idempotency keys: parsed once at the edge, trusted after.

use crate::error::{BillingError, Result};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// New primary keys are UUIDv7: time-ordered (friendly to B-tree indexes) and made
/// by the application, so a batch of rows can be inserted without a round trip.
pub fn new_id() -> Uuid {
    Uuid::now_v7()
}

/// Longest accepted request id or idempotency key.
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 200;

/// A caller-chosen key that makes a request idempotent (a usage request id, a
/// purchase or transfer idempotency key): 1..=200 printable ASCII characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(field: &'static str, value: &str) -> Result<Self> {
        if value.is_empty() || value.len() > IDEMPOTENCY_KEY_LEN_MAX {
            return Err(BillingError::invalid(format!(
                "{field} must be 1 to {IDEMPOTENCY_KEY_LEN_MAX} characters"
            )));
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(BillingError::invalid(format!(
                "{field} must be printable ASCII without spaces"
            )));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A fingerprint of a request's payload, stored beside its idempotency key: a replay
/// with the same fingerprint gets the original result; another payload is a conflict.
/// Parts are length-prefixed so that ("ab","c") and ("a","bc") differ.
pub fn request_hash(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hex::encode(hasher.finalize())
}

pub fn opt_uuid_str(id: Option<Uuid>) -> String {
    id.map(|id| id.to_string()).unwrap_or_default()
}

/// An id as a caller sent it. A string that is not a UUID cannot name anything of
/// ours, so it is NOT_FOUND (of `kind`), like any unknown id.
pub fn parse_uuid(kind: &'static str, value: &str) -> Result<Uuid> {
    Uuid::parse_str(value).map_err(|_| BillingError::NotFound(kind))
}
