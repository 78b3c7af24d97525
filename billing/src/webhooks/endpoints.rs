//! Webhook endpoints: registered, listed, disabled, enabled, deleted and given a new
//! secret by the account's OWNER and ADMIN members (and the platform admin).
//!
//! The secret is stored (every delivery is signed with it) but returned only by
//! [`create_endpoint`] and [`rotate_secret`]; no read of an endpoint carries it.

use super::WebhookEventType;
use super::signing::new_secret;
use crate::accounts::access::require_account_admin;
use crate::accounts::auth::Principal;
use crate::error::{BillingError, Result};
use crate::ids::new_id;
use chrono::{DateTime, Utc};
use entity::webhook_endpoints;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend,
    EntityTrait, IntoActiveModel, PaginatorTrait as _, QueryFilter, QueryOrder,
};
use std::collections::BTreeSet;
use uuid::Uuid;

/// Longest endpoint URL.
pub const URL_LEN_MAX: usize = 2_048;
/// Most endpoints one account may register.
pub const ENDPOINTS_PER_ACCOUNT_MAX: usize = 20;

/// Where plain `http://` endpoints are allowed: always on SQLite (the embedded
/// default, a developer's machine), on PostgreSQL only with the explicit switch
/// (`RESERVOIR_WEBHOOKS_ALLOW_HTTP=true`): production money events travel over TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UrlPolicy {
    pub allow_http: bool,
}

impl UrlPolicy {
    fn http_allowed(self, backend: DbBackend) -> bool {
        self.allow_http || backend == DbBackend::Sqlite
    }
}

/// An endpoint as every read shows it: without its secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub id: Uuid,
    pub account_id: Uuid,
    pub url: String,
    pub events: Vec<WebhookEventType>,
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Endpoint {
    pub(crate) fn of(row: &webhook_endpoints::Model) -> Self {
        Self {
            id: row.id,
            account_id: row.account_id,
            url: row.url.clone(),
            events: parse_events(&row.events),
            enabled: row.enabled,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }

    pub fn subscribes_to(&self, event_type: WebhookEventType) -> bool {
        self.events.contains(&event_type)
    }
}

/// The stored list, skipping names this build does not know (an older binary
/// reading a newer row must not fail).
pub(crate) fn parse_events(stored: &str) -> Vec<WebhookEventType> {
    stored
        .split(',')
        .filter_map(|name| name.trim().parse().ok())
        .collect()
}

/// An endpoint with its secret: only the answer of a create or a rotation.
#[derive(Clone, Debug)]
pub struct EndpointWithSecret {
    pub endpoint: Endpoint,
    pub secret: String,
}

/// Checks an endpoint URL: `http` or `https` (http only where `http_allowed`), a host,
/// no user name or password, no whitespace or control characters, at most
/// [`URL_LEN_MAX`] bytes. Returns it trimmed.
pub fn validate_url(url: &str, http_allowed: bool) -> Result<String> {
    let url = url.trim();
    if url.is_empty() || url.len() > URL_LEN_MAX {
        return Err(BillingError::invalid(format!(
            "url must be 1 to {URL_LEN_MAX} characters"
        )));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(BillingError::invalid(
            "url must not contain spaces or control characters",
        ));
    }
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| BillingError::invalid("url must start with https:// or http://"))?;
    match scheme.to_ascii_lowercase().as_str() {
        "https" => {}
        "http" if http_allowed => {}
        "http" => {
            return Err(BillingError::invalid(
                "url must be https:// (http:// needs RESERVOIR_WEBHOOKS_ALLOW_HTTP=true)",
            ));
        }
        _ => {
            return Err(BillingError::invalid(
                "url must start with https:// or http://",
            ));
        }
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(BillingError::invalid(
            "url must not contain a user name or password",
        ));
    }
    let host = match authority.rsplit_once(':') {
        // An IPv6 literal keeps its colons inside brackets.
        Some((host, port)) if !port.contains(']') => {
            if port.is_empty() || port.parse::<u16>().is_err() {
                return Err(BillingError::invalid("url has an invalid port"));
            }
            host
        }
        _ => authority,
    };
    if host.is_empty() || host == "[]" {
        return Err(BillingError::invalid("url must name a host"));
    }
    Ok(url.to_owned())
}

/// Checks the subscribed events: at least one, each once (sorted).
pub fn validate_events(events: &[WebhookEventType]) -> Result<Vec<WebhookEventType>> {
    let set: BTreeSet<WebhookEventType> = events.iter().copied().collect();
    if set.is_empty() {
        return Err(BillingError::invalid(
            "events must name at least one event type",
        ));
    }
    Ok(set.into_iter().collect())
}

fn stored_events(events: &[WebhookEventType]) -> String {
    events
        .iter()
        .map(|e| e.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// What `createWebhookEndpoint` asks for.
#[derive(Clone, Debug)]
pub struct NewEndpoint {
    pub account_id: Uuid,
    pub url: String,
    pub events: Vec<WebhookEventType>,
}

/// Registers an endpoint (enabled) with a new secret, returned this once.
pub async fn create_endpoint(
    db: &DatabaseConnection,
    principal: &Principal,
    policy: UrlPolicy,
    input: NewEndpoint,
    now: DateTime<Utc>,
) -> Result<EndpointWithSecret> {
    require_account_admin(db, principal, input.account_id).await?;
    let url = validate_url(&input.url, policy.http_allowed(db.get_database_backend()))?;
    let events = validate_events(&input.events)?;
    let existing = webhook_endpoints::Entity::find()
        .filter(webhook_endpoints::Column::AccountId.eq(input.account_id))
        .count(db)
        .await?;
    if existing >= ENDPOINTS_PER_ACCOUNT_MAX as u64 {
        return Err(BillingError::LimitExceeded(format!(
            "an account has at most {ENDPOINTS_PER_ACCOUNT_MAX} webhook endpoints"
        )));
    }
    let row = webhook_endpoints::Model {
        id: new_id(),
        account_id: input.account_id,
        url,
        events: stored_events(&events),
        secret: new_secret(),
        enabled: true,
        created_at: now,
        updated_at: now,
    };
    webhook_endpoints::Entity::insert(row.clone().into_active_model().reset_all())
        .exec_without_returning(db)
        .await?;
    tracing::info!(endpoint_id = %row.id, account_id = %row.account_id, "webhook endpoint created");
    Ok(EndpointWithSecret {
        endpoint: Endpoint::of(&row),
        secret: row.secret,
    })
}

/// The account's endpoints, oldest first (account admins only).
pub async fn list_endpoints(
    db: &DatabaseConnection,
    principal: &Principal,
    account_id: Uuid,
) -> Result<Vec<Endpoint>> {
    require_account_admin(db, principal, account_id).await?;
    account_endpoints(db, account_id).await
}

pub(crate) async fn account_endpoints<C: ConnectionTrait>(
    c: &C,
    account_id: Uuid,
) -> Result<Vec<Endpoint>> {
    Ok(webhook_endpoints::Entity::find()
        .filter(webhook_endpoints::Column::AccountId.eq(account_id))
        .order_by_asc(webhook_endpoints::Column::CreatedAt)
        .order_by_asc(webhook_endpoints::Column::Id)
        .all(c)
        .await?
        .iter()
        .map(Endpoint::of)
        .collect())
}

/// Loads an endpoint the caller administers (NOT_FOUND to anyone who may not see it).
pub(crate) async fn admin_endpoint_of(
    db: &DatabaseConnection,
    principal: &Principal,
    endpoint_id: Uuid,
) -> Result<webhook_endpoints::Model> {
    let row = webhook_endpoints::Entity::find_by_id(endpoint_id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("webhook endpoint"))?;
    require_account_admin(db, principal, row.account_id).await?;
    Ok(row)
}

/// An endpoint, for an account admin.
pub async fn endpoint(
    db: &DatabaseConnection,
    principal: &Principal,
    endpoint_id: Uuid,
) -> Result<Endpoint> {
    Ok(Endpoint::of(
        &admin_endpoint_of(db, principal, endpoint_id).await?,
    ))
}

/// Disables or enables an endpoint. A disabled endpoint gets no deliveries for events
/// written while it is disabled; its pending deliveries wait (they are not attempted)
/// until it is enabled again.
pub async fn set_enabled(
    db: &DatabaseConnection,
    principal: &Principal,
    endpoint_id: Uuid,
    enabled: bool,
    now: DateTime<Utc>,
) -> Result<Endpoint> {
    let mut row = admin_endpoint_of(db, principal, endpoint_id).await?;
    webhook_endpoints::Entity::update_many()
        .col_expr(webhook_endpoints::Column::Enabled, Expr::value(enabled))
        .col_expr(webhook_endpoints::Column::UpdatedAt, Expr::value(now))
        .filter(webhook_endpoints::Column::Id.eq(endpoint_id))
        .exec(db)
        .await?;
    row.enabled = enabled;
    row.updated_at = now;
    Ok(Endpoint::of(&row))
}

/// Deletes an endpoint and its deliveries (the database cascades). Returns its id.
pub async fn delete_endpoint(
    db: &DatabaseConnection,
    principal: &Principal,
    endpoint_id: Uuid,
) -> Result<Uuid> {
    let row = admin_endpoint_of(db, principal, endpoint_id).await?;
    entity::webhook_deliveries::Entity::delete_many()
        .filter(entity::webhook_deliveries::Column::EndpointId.eq(row.id))
        .exec(db)
        .await?;
    webhook_endpoints::Entity::delete_by_id(row.id)
        .exec(db)
        .await?;
    tracing::info!(endpoint_id = %row.id, "webhook endpoint deleted");
    Ok(row.id)
}

/// Replaces the endpoint's secret at once (attempts from now on are signed with the
/// new one) and returns it this once.
pub async fn rotate_secret(
    db: &DatabaseConnection,
    principal: &Principal,
    endpoint_id: Uuid,
    now: DateTime<Utc>,
) -> Result<EndpointWithSecret> {
    let mut row = admin_endpoint_of(db, principal, endpoint_id).await?;
    let secret = new_secret();
    webhook_endpoints::Entity::update_many()
        .col_expr(
            webhook_endpoints::Column::Secret,
            Expr::value(secret.clone()),
        )
        .col_expr(webhook_endpoints::Column::UpdatedAt, Expr::value(now))
        .filter(webhook_endpoints::Column::Id.eq(endpoint_id))
        .exec(db)
        .await?;
    row.updated_at = now;
    tracing::info!(endpoint_id = %row.id, "webhook secret rotated");
    Ok(EndpointWithSecret {
        endpoint: Endpoint::of(&row),
        secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(validate_url("https://hooks.example.com/reservoir", false).is_ok());
        assert!(validate_url("https://[::1]:8443/x", false).is_ok());
        assert!(validate_url("http://127.0.0.1:9000/x", true).is_ok());
        for bad in [
            "http://example.com/x",
            "ftp://example.com/x",
            "https://user:pw@example.com/x",
            "https://user@example.com/x",
            "https:///x",
            "https://example.com:99999/x",
            "https://exa mple.com/",
            "example.com/x",
            "",
        ] {
            assert!(validate_url(bad, false).is_err(), "{bad}");
        }
        let long = format!("https://example.com/{}", "a".repeat(URL_LEN_MAX));
        assert!(validate_url(&long, true).is_err());
    }

    #[test]
    fn events_need_one() {
        assert!(validate_events(&[]).is_err());
        assert_eq!(
            validate_events(&[WebhookEventType::InvoicePaid, WebhookEventType::InvoicePaid])
                .map(|e| e.len())
                .ok(),
            Some(1)
        );
    }
}
