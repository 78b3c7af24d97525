//! The payment gateway's webhooks (Stripe's `POST /webhooks/stripe`): verified by the
//! gateway adapter (signature and timestamp), then acted on here, each event once.
//!
//! - A charge's outcome (`payment_intent.succeeded`, `payment_intent.payment_failed`)
//!   settles its purchase through [`capture::settle_in`], the capture job's own code:
//!   a purchase whose synchronous answer was lost (a timeout) completes or fails from
//!   the webhook, and one the job already settled is left as it is.
//! - A dispute (`charge.dispute.created`) is recorded on the purchase it concerns.
//! - Every event id is written to `gateway_events` in the same transaction as its
//!   effect, so a replay (Stripe retries, or an attacker resending a captured request
//!   within the signature's tolerance) changes nothing.

use super::capture;
use super::purchases;
use super::{EventEffect, GatewayEvent, PaymentGateway};
use crate::db::begin_write;
use crate::error::Result;
use chrono::{DateTime, Utc};
use entity::gateway_events;
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveModelTrait as _, DatabaseConnection, DatabaseTransaction, DbErr, EntityTrait,
    IntoActiveModel,
};
use uuid::Uuid;

/// Longest event id or type kept (Stripe's are far shorter).
const EVENT_FIELD_LEN_MAX: usize = 255;

/// What a webhook request did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// Recorded and acted on; the purchase it concerned, if any, and whether that
    /// purchase changed.
    Applied {
        purchase_id: Option<Uuid>,
        changed: bool,
    },
    /// This event id was already recorded: nothing done.
    Replayed,
}

/// Verifies and acts on one webhook request: `signature` is the request's signature
/// header, `payload` its raw body. A bad signature, a stale timestamp or an unreadable
/// body is INVALID_INPUT (answered 400) and writes nothing.
pub async fn receive(
    db: &DatabaseConnection,
    gateway: &dyn PaymentGateway,
    payload: &[u8],
    signature: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Received> {
    let event = gateway.verify_event(payload, signature, now)?;
    if event.id.is_empty()
        || event.id.len() > EVENT_FIELD_LEN_MAX
        || event.kind.len() > EVENT_FIELD_LEN_MAX
    {
        return Err(super::WebhookError::Malformed("event id or type".into()).into());
    }
    let purchase_id = match &event.effect {
        EventEffect::Charge {
            idempotency_key,
            charge_id,
            ..
        } => purchases::purchase_for_charge(db, idempotency_key.as_deref(), charge_id)
            .await?
            .map(|p| p.id),
        EventEffect::Dispute { charge_id, .. } => {
            purchases::purchase_for_charge(db, None, charge_id)
                .await?
                .map(|p| p.id)
        }
        EventEffect::Ignored => None,
    };
    let tx = begin_write(db).await?;
    if !record(&tx, &event, purchase_id, now).await? {
        tx.rollback().await?;
        tracing::info!(event_id = %event.id, kind = %event.kind, "webhook replayed; ignored");
        return Ok(Received::Replayed);
    }
    let changed = match (&event.effect, purchase_id) {
        (EventEffect::Charge { outcome, .. }, Some(id)) => {
            capture::settle_in(&tx, id, outcome, now).await?.is_some()
        }
        (EventEffect::Dispute { charge_id, reason }, Some(_)) => {
            purchases::record_dispute_in(&tx, charge_id, reason, now)
                .await?
                .is_some()
        }
        _ => false,
    };
    tx.commit().await?;
    tracing::info!(
        event_id = %event.id,
        kind = %event.kind,
        purchase_id = ?purchase_id,
        changed,
        "webhook received"
    );
    Ok(Received::Applied {
        purchase_id,
        changed,
    })
}

/// Writes the event's id once (`ON CONFLICT DO NOTHING`, which never aborts a
/// PostgreSQL transaction). False when it was already there.
async fn record(
    tx: &DatabaseTransaction,
    event: &GatewayEvent,
    purchase_id: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<bool> {
    let row = gateway_events::Model {
        id: event.id.clone(),
        kind: event.kind.clone(),
        purchase_id,
        received_at: now,
    };
    let inserted = gateway_events::Entity::insert(row.into_active_model().reset_all())
        .on_conflict(
            OnConflict::column(gateway_events::Column::Id)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(tx)
        .await;
    match inserted {
        Ok(0) | Err(DbErr::RecordNotInserted) => Ok(false),
        Ok(_) => Ok(true),
        Err(e) => Err(e.into()),
    }
}
