//! Credentials: random bearer tokens, shown once, stored as SHA-256 hashes.

use crate::error::{BillingError, Result};
use chrono::{DateTime, Utc};
use entity::{api_keys, user_tokens};
use rand::Rng;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// Prefixes say what a token is when it turns up in a log or a leak scanner.
pub const USER_TOKEN_PREFIX: &str = "rsv_u_";
pub const API_KEY_PREFIX: &str = "rsv_k_";
/// Random characters after the prefix: 43 base62 characters ≈ 256 bits.
const SECRET_CHARS: usize = 43;
/// Characters of an API key kept in clear to recognise it in a list.
pub const API_KEY_VISIBLE_PREFIX_CHARS: usize = 12;
/// Longest bearer token looked up (anything longer is refused before hashing).
pub const TOKEN_LEN_MAX: usize = 256;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

pub fn generate_secret(prefix: &str) -> String {
    let mut rng = rand::rng();
    let mut secret = String::with_capacity(prefix.len() + SECRET_CHARS);
    secret.push_str(prefix);
    for _ in 0..SECRET_CHARS {
        secret.push(char::from(BASE62[rng.random_range(0..BASE62.len())]));
    }
    secret
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares two secrets in constant time (for the configured platform admin token).
pub fn secrets_equal(a: &str, b: &str) -> bool {
    let (ha, hb) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    ha.ct_eq(&hb).into()
}

/// `last_used_at` is refreshed at most this often: a write per request would make
/// every credential a hot row.
pub const LAST_USED_RESOLUTION_SECS: i64 = 60;

fn stale(last_used_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    last_used_at.is_none_or(|at| now - at >= chrono::Duration::seconds(LAST_USED_RESOLUTION_SECS))
}

/// Who a bearer token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    PlatformAdmin,
    User {
        user_id: Uuid,
        token_id: Uuid,
    },
    ApiKey {
        api_key_id: Uuid,
        workspace_id: Uuid,
        project_id: Option<Uuid>,
    },
}

impl Principal {
    /// The user behind a user token (what a write is attributed to); None for an API
    /// key or the platform admin.
    pub fn user_id(&self) -> Option<Uuid> {
        match self {
            Self::User { user_id, .. } => Some(*user_id),
            Self::ApiKey { .. } | Self::PlatformAdmin => None,
        }
    }
}

/// Resolves a bearer token. Lookup is by hash (an index probe, so no timing leak of
/// the stored hash); revoked credentials are refused like unknown ones.
pub async fn authenticate<C: ConnectionTrait>(
    c: &C,
    token: &str,
    admin_token: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Principal> {
    if token.is_empty() || token.len() > TOKEN_LEN_MAX {
        return Err(BillingError::Unauthenticated);
    }
    if admin_token.is_some_and(|admin| secrets_equal(admin, token)) {
        return Ok(Principal::PlatformAdmin);
    }
    let hash = hash_secret(token);
    if token.starts_with(USER_TOKEN_PREFIX) {
        let found = user_tokens::Entity::find()
            .filter(user_tokens::Column::TokenHash.eq(hash))
            .one(c)
            .await?;
        if let Some(t) = found.filter(|t| t.revoked_at.is_none_or(|at| at > now)) {
            if stale(t.last_used_at, now) {
                user_tokens::Entity::update_many()
                    .col_expr(user_tokens::Column::LastUsedAt, Expr::value(now))
                    .filter(user_tokens::Column::Id.eq(t.id))
                    .exec(c)
                    .await?;
            }
            return Ok(Principal::User {
                user_id: t.user_id,
                token_id: t.id,
            });
        }
    } else if token.starts_with(API_KEY_PREFIX) {
        let found = api_keys::Entity::find()
            .filter(api_keys::Column::SecretHash.eq(hash))
            .one(c)
            .await?;
        if let Some(k) = found.filter(|k| k.revoked_at.is_none_or(|at| at > now)) {
            if stale(k.last_used_at, now) {
                api_keys::Entity::update_many()
                    .col_expr(api_keys::Column::LastUsedAt, Expr::value(now))
                    .filter(api_keys::Column::Id.eq(k.id))
                    .exec(c)
                    .await?;
            }
            return Ok(Principal::ApiKey {
                api_key_id: k.id,
                workspace_id: k.workspace_id,
                project_id: k.project_id,
            });
        }
    }
    Err(BillingError::Unauthenticated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_prefixed_and_hashed() {
        let a = generate_secret(USER_TOKEN_PREFIX);
        let b = generate_secret(USER_TOKEN_PREFIX);
        assert_ne!(a, b);
        assert!(a.starts_with(USER_TOKEN_PREFIX));
        assert_eq!(a.len(), USER_TOKEN_PREFIX.len() + SECRET_CHARS);
        assert_eq!(hash_secret(&a).len(), 64);
        assert_ne!(hash_secret(&a), hash_secret(&b));
        assert!(secrets_equal(&a, &a.clone()));
        assert!(!secrets_equal(&a, &b));
    }
}
