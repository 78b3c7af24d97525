//! A short-lived per-process cache of authenticated bearer tokens.
//!
//! The gateway sends thousands of requests a second with the same API key; looking
//! the key up for each one costs a database round trip per debit. A hit here is
//! served from memory for at most `ttl`, and only while the configuration version
//! this process has seen is the one the entry was cached at. Revocation takes effect
//! at once in the process that revoked (the entry is dropped); in the others, once
//! one of their debit batches has read the version the revocation moved (a trigger
//! moves it in the revoking transaction: `billing::debits::engine::cache`), and at
//! the latest after `ttl`.

use billing::accounts::auth::{self, Principal};
use billing::sea_orm::DatabaseConnection;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bounds: entries kept (the map is cleared when full: simple, and a refill costs one
/// lookup per token) and the longest time a revoked credential may still be accepted.
pub const ENTRIES_MAX: usize = 10_000;
pub const TTL_MS_MAX: u64 = 60_000;

/// The newest configuration version the process has seen (None: none yet).
pub type VersionSource = Box<dyn Fn() -> Option<i64> + Send + Sync>;

pub struct CredentialCache {
    ttl: Duration,
    version: VersionSource,
    /// SHA-256 of the token (never the token itself) -> its entry.
    entries: Mutex<HashMap<String, Entry>>,
}

/// Who a token is, since when, and the configuration version seen then.
struct Entry {
    principal: Principal,
    at: Instant,
    version: Option<i64>,
}

impl CredentialCache {
    pub fn new(ttl_ms: u64, version: VersionSource) -> Self {
        Self {
            ttl: Duration::from_millis(ttl_ms.min(TTL_MS_MAX)),
            version,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Resolves a bearer token, from the cache when fresh. The platform admin token
    /// is compared every time (cheap, and never stored).
    pub async fn authenticate(
        &self,
        db: &DatabaseConnection,
        token: &str,
        admin_token: Option<&str>,
    ) -> billing::Result<Principal> {
        let now = chrono::Utc::now();
        if self.ttl.is_zero()
            || token.len() > auth::TOKEN_LEN_MAX
            || admin_token.is_some_and(|admin| auth::secrets_equal(admin, token))
        {
            return auth::authenticate(db, token, admin_token, now).await;
        }
        let key = auth::hash_secret(token);
        // Read before the lookup: an entry is never newer than the version it claims.
        let version = (self.version)();
        if let Some(principal) = self.fresh(&key, version) {
            return Ok(principal);
        }
        let principal = auth::authenticate(db, token, admin_token, now).await?;
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= ENTRIES_MAX {
                entries.clear();
            }
            let entry = Entry {
                principal: principal.clone(),
                at: Instant::now(),
                version,
            };
            entries.insert(key, entry);
        }
        Ok(principal)
    }

    fn fresh(&self, key: &str, version: Option<i64>) -> Option<Principal> {
        let entries = self.entries.lock().ok()?;
        let entry = entries.get(key)?;
        (entry.at.elapsed() < self.ttl && entry.version == version).then(|| entry.principal.clone())
    }

    /// Drops every cached entry of an API key (after it is revoked in this process).
    pub fn forget_api_key(&self, api_key_id: uuid::Uuid) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|_, e| {
                !matches!(e.principal, Principal::ApiKey { api_key_id: id, .. } if id == api_key_id)
            });
        }
    }
}
