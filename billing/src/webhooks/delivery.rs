//! The delivery state machine, driven by the worker:
//!
//! `PENDING` (due at `next_attempt_at`) → `DELIVERED` (a 2xx answer within the
//! timeout) or, after a failed attempt, `PENDING` again at the next time of the
//! [`RetryPolicy`] (`RetryPolicy::WEBHOOKS` unless the worker is told otherwise), until its attempts run out: `DEAD`, with the last error kept.
//! [`retry_dead`] puts a DEAD delivery back to PENDING with a fresh budget.
//!
//! An attempt first *claims* the row ([`claim`]): `locked_until` is set to a lease
//! ([`LEASE_SECS`], longer than any attempt may take), so a job and a sweep handed
//! the same delivery at once do not both POST it. A worker that crashes mid-attempt
//! leaves a lease that lapses; the delivery is then attempted again, which is why
//! delivery is at least once and receivers deduplicate on the event id.

use super::WebhookEventType;
use super::endpoints::admin_endpoint_of;
use crate::accounts::auth::Principal;
use crate::error::{BillingError, Result};
use crate::jobs::{DeliverWebhook, JobSink};
use crate::reports::history::{Page, PageRequest};
use crate::retry::RetryPolicy;
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use entity::enums::WebhookDeliveryStatus;
use entity::{webhook_deliveries, webhook_endpoints, webhook_events};
use sea_orm::sea_query::{Condition, Expr, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;
use uuid::Uuid;

/// How long a claim holds off other attempts: far longer than [`ATTEMPT_TIMEOUT`].
pub const LEASE_SECS: i64 = 60;
/// An attempt that has no 2xx answer within this failed.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `last_error` kept.
pub const LAST_ERROR_LEN_MAX: usize = 500;
/// Most ids one call of [`due`] returns.
pub const DUE_BATCH_MAX: u64 = 500;

/// One attempt the worker is to make: POST `body` to `url` with the signature made
/// from `secret`.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub delivery_id: Uuid,
    pub event_id: Uuid,
    pub url: String,
    pub secret: String,
    pub body: String,
}

/// What the receiver did with an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Any answer: 2xx is success, anything else a failure.
    Answered { status: u16, error: Option<String> },
    /// No answer (connection refused, timed out, TLS, a bad URL).
    NoAnswer { error: String },
}

/// What follows an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    Delivered,
    RetryAfter(Duration),
    Dead,
    /// Not ours to record (the delivery was deleted, or settled elsewhere).
    Gone,
}

/// The body every attempt of an event's deliveries POSTs, byte for byte.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    id: Uuid,
    #[serde(rename = "type")]
    event_type: &'a str,
    created_at: String,
    account_id: Uuid,
    workspace_id: Option<Uuid>,
    data: serde_json::Value,
}

/// The JSON body of an event.
pub fn body_of(event: &webhook_events::Model) -> Result<String> {
    let data: serde_json::Value = serde_json::from_str(&event.data)
        .map_err(|e| BillingError::Internal(format!("webhook data: {e}")))?;
    serde_json::to_string(&Body {
        id: event.id,
        event_type: &event.event_type,
        created_at: event
            .created_at
            .to_rfc3339_opts(SecondsFormat::Millis, true),
        account_id: event.account_id,
        workspace_id: event.workspace_id,
        data,
    })
    .map_err(|e| BillingError::Internal(format!("webhook body: {e}")))
}

/// Deliveries that may be attempted now: PENDING, due, not claimed, endpoint enabled.
fn attemptable(now: DateTime<Utc>) -> Condition {
    use webhook_deliveries::Column as D;
    Condition::all()
        .add(D::Status.eq(WebhookDeliveryStatus::Pending))
        .add(D::NextAttemptAt.lte(now))
        .add(
            Condition::any()
                .add(D::LockedUntil.is_null())
                .add(D::LockedUntil.lt(now)),
        )
        .add(
            D::EndpointId.in_subquery(
                Query::select()
                    .column(webhook_endpoints::Column::Id)
                    .from(webhook_endpoints::Entity)
                    .and_where(webhook_endpoints::Column::Enabled.eq(true))
                    .to_owned(),
            ),
        )
}

/// Claims a delivery for one attempt: `None` when it is not attemptable now (settled,
/// not yet due, claimed by another worker, its endpoint disabled or deleted).
pub async fn claim(
    db: &DatabaseConnection,
    delivery_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<Attempt>> {
    use webhook_deliveries::Column as D;
    let claimed = webhook_deliveries::Entity::update_many()
        .col_expr(
            D::LockedUntil,
            Expr::value(now + TimeDelta::seconds(LEASE_SECS)),
        )
        .filter(D::Id.eq(delivery_id))
        .filter(attemptable(now))
        .exec_with_returning(db)
        .await?
        .pop();
    let Some(delivery) = claimed else {
        return Ok(None);
    };
    let event = webhook_events::Entity::find_by_id(delivery.event_id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("webhook event"))?;
    let endpoint = webhook_endpoints::Entity::find_by_id(delivery.endpoint_id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("webhook endpoint"))?;
    Ok(Some(Attempt {
        delivery_id,
        event_id: event.id,
        url: endpoint.url,
        secret: endpoint.secret,
        body: body_of(&event)?,
    }))
}

/// When a PENDING delivery becomes due, if that is still after `now`: a job that
/// arrives early (a queue that keeps whole seconds runs a delayed job up to a second
/// early) waits for it rather than leave the retry to the sweep.
pub async fn not_due_until(
    db: &DatabaseConnection,
    delivery_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>> {
    Ok(webhook_deliveries::Entity::find_by_id(delivery_id)
        .one(db)
        .await?
        .filter(|d| d.status == WebhookDeliveryStatus::Pending)
        .and_then(|d| d.next_attempt_at)
        .filter(|at| *at > now))
}

fn clip(error: &str) -> String {
    error.chars().take(LAST_ERROR_LEN_MAX).collect()
}

/// Records an attempt's outcome on its (claimed) delivery and says what follows.
pub async fn record(
    db: &DatabaseConnection,
    delivery_id: Uuid,
    outcome: &AttemptOutcome,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
) -> Result<Next> {
    use webhook_deliveries::Column as D;
    let Some(row) = webhook_deliveries::Entity::find_by_id(delivery_id)
        .one(db)
        .await?
        .filter(|d| d.status == WebhookDeliveryStatus::Pending)
    else {
        return Ok(Next::Gone);
    };
    let attempts = row.attempts.saturating_add(1);
    let (code, error) = match outcome {
        AttemptOutcome::Answered { status, .. } if (200..300).contains(status) => {
            (Some(i32::from(*status)), None)
        }
        AttemptOutcome::Answered { status, error } => (
            Some(i32::from(*status)),
            Some(clip(
                error
                    .as_deref()
                    .unwrap_or("the receiver answered with an error status"),
            )),
        ),
        AttemptOutcome::NoAnswer { error } => (None, Some(clip(error))),
    };
    let (status, next_attempt_at, next) = match (&error, policy.after_failure(attempts)) {
        (None, _) => (WebhookDeliveryStatus::Delivered, None, Next::Delivered),
        (Some(_), None) => (WebhookDeliveryStatus::Dead, None, Next::Dead),
        (Some(_), Some(delay)) => {
            let at = now + TimeDelta::from_std(delay).unwrap_or(TimeDelta::MAX);
            (
                WebhookDeliveryStatus::Pending,
                Some(at),
                Next::RetryAfter(delay),
            )
        }
    };
    let updated = webhook_deliveries::Entity::update_many()
        .col_expr(D::Status, Expr::value(status.as_str()))
        .col_expr(D::Attempts, Expr::value(attempts))
        .col_expr(D::LastResponseCode, Expr::value(code))
        .col_expr(D::LastError, Expr::value(error.clone()))
        .col_expr(D::NextAttemptAt, Expr::value(next_attempt_at))
        .col_expr(D::LockedUntil, Expr::value(Option::<DateTime<Utc>>::None))
        .col_expr(
            D::DeliveredAt,
            Expr::value((status == WebhookDeliveryStatus::Delivered).then_some(now)),
        )
        .filter(D::Id.eq(delivery_id))
        .filter(D::Status.eq(WebhookDeliveryStatus::Pending))
        .filter(D::Attempts.eq(row.attempts))
        .exec(db)
        .await?;
    if updated.rows_affected != 1 {
        return Ok(Next::Gone);
    }
    match next {
        Next::Dead => {
            tracing::warn!(%delivery_id, attempts, error = error.as_deref().unwrap_or(""), "webhook delivery dead")
        }
        Next::RetryAfter(d) => {
            tracing::info!(%delivery_id, attempts, delay_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX), error = error.as_deref().unwrap_or(""), "webhook attempt failed; retrying")
        }
        Next::Delivered | Next::Gone => {}
    }
    Ok(next)
}

/// Deliveries attemptable at `before` (the sweep passes a time in the past, so that
/// only deliveries the queue left behind are re-enqueued), at most `limit`.
pub async fn due<C: ConnectionTrait>(
    c: &C,
    before: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<Uuid>> {
    Ok(webhook_deliveries::Entity::find()
        .select_only()
        .column(webhook_deliveries::Column::Id)
        .filter(attemptable(before))
        .order_by_asc(webhook_deliveries::Column::NextAttemptAt)
        .limit(limit.min(DUE_BATCH_MAX))
        .into_tuple()
        .all(c)
        .await?)
}

/// Pushes one job per delivery; a failed push is only logged (the sweep finds the
/// row: it is PENDING and due).
pub async fn push(jobs: &dyn JobSink, delivery_ids: impl IntoIterator<Item = Uuid>) {
    for delivery_id in delivery_ids {
        if let Err(e) = jobs.deliver_webhook(DeliverWebhook { delivery_id }).await {
            tracing::warn!(%delivery_id, error = %e, "webhook job not pushed");
        }
    }
}

/// Pushes every delivery due now: for callers whose transaction wrote events deep
/// inside (the capture path) and do not carry the ids out.
pub async fn push_due(db: &DatabaseConnection, jobs: &dyn JobSink, now: DateTime<Utc>) {
    match due(db, now, DUE_BATCH_MAX).await {
        Ok(ids) => push(jobs, ids).await,
        Err(e) => tracing::warn!(error = %e, "due webhook deliveries not read; the sweep retries"),
    }
}

/// A delivery as account admins read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryView {
    pub id: Uuid,
    pub endpoint_id: Uuid,
    pub event_id: Uuid,
    pub event_type: Option<WebhookEventType>,
    pub status: WebhookDeliveryStatus,
    pub attempts: i32,
    pub last_response_code: Option<i32>,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

impl DeliveryView {
    fn of(row: webhook_deliveries::Model, event_type: Option<WebhookEventType>) -> Self {
        Self {
            id: row.id,
            endpoint_id: row.endpoint_id,
            event_id: row.event_id,
            event_type,
            status: row.status,
            attempts: row.attempts,
            last_response_code: row.last_response_code,
            last_error: row.last_error,
            next_attempt_at: row.next_attempt_at,
            created_at: row.created_at,
            delivered_at: row.delivered_at,
        }
    }
}

async fn event_types<C: ConnectionTrait>(
    c: &C,
    event_ids: impl IntoIterator<Item = Uuid>,
) -> Result<HashMap<Uuid, Option<WebhookEventType>>> {
    let rows: Vec<(Uuid, String)> = webhook_events::Entity::find()
        .select_only()
        .column(webhook_events::Column::Id)
        .column(webhook_events::Column::EventType)
        .filter(webhook_events::Column::Id.is_in(event_ids))
        .into_tuple()
        .all(c)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, t)| (id, t.parse().ok()))
        .collect())
}

/// An endpoint's deliveries, newest first (account admins only).
pub async fn deliveries_page(
    db: &DatabaseConnection,
    principal: &Principal,
    endpoint_id: Uuid,
    page: &PageRequest,
) -> Result<Page<DeliveryView>> {
    admin_endpoint_of(db, principal, endpoint_id).await?;
    let rows = crate::reports::history::webhook_deliveries_page(db, endpoint_id, page).await?;
    let types = event_types(db, rows.rows.iter().map(|(_, d)| d.event_id)).await?;
    Ok(Page {
        has_next_page: rows.has_next_page,
        rows: rows
            .rows
            .into_iter()
            .map(|(cursor, d)| {
                let t = types.get(&d.event_id).copied().flatten();
                (cursor, DeliveryView::of(d, t))
            })
            .collect(),
    })
}

/// `retryWebhookDelivery`: a DEAD delivery back to PENDING, due now, with a fresh
/// attempt budget (its last error kept until the next attempt), and its job pushed.
/// Retrying a delivery that is not DEAD is INVALID_INPUT.
pub async fn retry_dead(
    db: &DatabaseConnection,
    jobs: Option<&dyn JobSink>,
    principal: &Principal,
    delivery_id: Uuid,
    now: DateTime<Utc>,
) -> Result<DeliveryView> {
    let row = webhook_deliveries::Entity::find_by_id(delivery_id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("webhook delivery"))?;
    admin_endpoint_of(db, principal, row.endpoint_id)
        .await
        .map_err(|e| match e {
            BillingError::NotFound(_) => BillingError::NotFound("webhook delivery"),
            other => other,
        })?;
    let revived = revive(db, jobs, delivery_id, now).await?;
    let types = event_types(db, [revived.event_id]).await?;
    let t = types.get(&revived.event_id).copied().flatten();
    Ok(DeliveryView::of(revived, t))
}

/// A DEAD delivery back to PENDING, due now, with a fresh attempt budget, and its job
/// pushed; no access check (the mutation checks, an operator's CLI needs none).
/// NOT_FOUND for an unknown id, INVALID_INPUT when it is not DEAD.
pub async fn revive(
    db: &DatabaseConnection,
    jobs: Option<&dyn JobSink>,
    delivery_id: Uuid,
    now: DateTime<Utc>,
) -> Result<webhook_deliveries::Model> {
    use webhook_deliveries::Column as D;
    let row = webhook_deliveries::Entity::find_by_id(delivery_id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("webhook delivery"))?;
    let revived = webhook_deliveries::Entity::update_many()
        .col_expr(
            D::Status,
            Expr::value(WebhookDeliveryStatus::Pending.as_str()),
        )
        .col_expr(D::Attempts, Expr::value(0))
        .col_expr(D::NextAttemptAt, Expr::value(now))
        .col_expr(D::LockedUntil, Expr::value(Option::<DateTime<Utc>>::None))
        .filter(D::Id.eq(delivery_id))
        .filter(D::Status.eq(WebhookDeliveryStatus::Dead))
        .exec_with_returning(db)
        .await?
        .pop()
        .ok_or_else(|| {
            BillingError::invalid(format!(
                "delivery is {}; only a DEAD delivery can be retried",
                row.status.as_str()
            ))
        })?;
    if let Some(jobs) = jobs {
        push(jobs, [delivery_id]).await;
    }
    Ok(revived)
}
