//! The outbox: an event is a row written inside the business transaction that
//! causes it, with one PENDING delivery per enabled endpoint of the account
//! subscribed to its type at that moment. Idempotent on the event's dedupe key (the
//! business event, e.g. `purchase.succeeded:<purchase id>`): a replayed or racing
//! writer of the same event writes nothing more.
//!
//! The insert is `ON CONFLICT (dedupe_key) DO NOTHING`, never a failing INSERT,
//! which would abort a PostgreSQL transaction. An account without a subscribed
//! endpoint gets no row at all, so the hot path (an alert crossing inside a debit
//! batch) pays one indexed SELECT and nothing more.

use super::WebhookEventType;
use super::endpoints::account_endpoints;
use crate::error::{BillingError, Result};
use crate::ids::new_id;
use chrono::{DateTime, Utc};
use entity::enums::WebhookDeliveryStatus;
use entity::{webhook_deliveries, webhook_events};
use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveModelTrait as _, ConnectionTrait, DbErr, EntityTrait, IntoActiveModel};
use uuid::Uuid;

/// Largest `data` (JSON) of one event.
pub const DATA_BYTES_MAX: usize = 32 * 1024;

/// An event about to be written.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub event_type: WebhookEventType,
    pub account_id: Uuid,
    pub workspace_id: Option<Uuid>,
    pub data: serde_json::Value,
    /// Names the business event; see [`dedupe`].
    pub dedupe_key: String,
}

/// Dedupe keys: the event type and the id of what happened.
pub mod dedupe {
    use super::WebhookEventType;
    use uuid::Uuid;

    pub fn of(event_type: WebhookEventType, subject: Uuid) -> String {
        format!("{event_type}:{subject}")
    }

    /// A threshold crossing: the threshold and the balance sequence of the change
    /// that crossed it (a threshold crossed again later is a new event).
    pub fn crossing(event_type: WebhookEventType, threshold_id: Uuid, sequence: i64) -> String {
        format!("{event_type}:{threshold_id}:{sequence}")
    }
}

/// Writes the event and its deliveries in the caller's transaction. Returns the ids
/// of the deliveries written (empty when nobody subscribes or the event was already
/// written), for the caller to push after its commit.
pub async fn emit<C: ConnectionTrait>(
    c: &C,
    event: NewEvent,
    now: DateTime<Utc>,
) -> Result<Vec<Uuid>> {
    let endpoints: Vec<Uuid> = account_endpoints(c, event.account_id)
        .await?
        .into_iter()
        .filter(|e| e.enabled && e.subscribes_to(event.event_type))
        .map(|e| e.id)
        .collect();
    if endpoints.is_empty() {
        return Ok(Vec::new());
    }
    let data = serde_json::to_string(&event.data)
        .map_err(|e| BillingError::Internal(format!("webhook data: {e}")))?;
    if data.len() > DATA_BYTES_MAX {
        return Err(BillingError::Internal(format!(
            "webhook data is larger than {DATA_BYTES_MAX} bytes"
        )));
    }
    let row = webhook_events::Model {
        id: new_id(),
        event_type: event.event_type.as_str().to_owned(),
        account_id: event.account_id,
        workspace_id: event.workspace_id,
        data,
        dedupe_key: event.dedupe_key,
        created_at: now,
    };
    let inserted = webhook_events::Entity::insert(row.clone().into_active_model().reset_all())
        .on_conflict(
            OnConflict::column(webhook_events::Column::DedupeKey)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(c)
        .await;
    match inserted {
        Ok(0) | Err(DbErr::RecordNotInserted) => return Ok(Vec::new()),
        Ok(_) => {}
        Err(e) => return Err(e.into()),
    }
    let deliveries: Vec<webhook_deliveries::Model> = endpoints
        .into_iter()
        .map(|endpoint_id| webhook_deliveries::Model {
            id: new_id(),
            event_id: row.id,
            endpoint_id,
            status: WebhookDeliveryStatus::Pending,
            attempts: 0,
            last_response_code: None,
            last_error: None,
            next_attempt_at: Some(now),
            locked_until: None,
            created_at: now,
            delivered_at: None,
        })
        .collect();
    let ids = deliveries.iter().map(|d| d.id).collect();
    webhook_deliveries::Entity::insert_many(
        deliveries
            .into_iter()
            .map(|d| d.into_active_model().reset_all()),
    )
    .exec_without_returning(c)
    .await?;
    tracing::debug!(event_id = %row.id, event_type = %row.event_type, "webhook event written");
    Ok(ids)
}
