//! The events of each business change, as [`outbox::emit`] writes them, called by
//! the domain code that makes the change, inside its transaction. `data` carries ids
//! and amounts (credits as decimal strings, as everywhere in the API).

use super::WebhookEventType as T;
use super::outbox::{self, NewEvent, dedupe};
use crate::error::Result;
use crate::money::Credits;
use chrono::{DateTime, Utc};
use entity::{alert_thresholds, invoices, purchases, workspaces};
use sea_orm::ConnectionTrait;
use serde_json::json;
use uuid::Uuid;

fn credits(nanos: i64) -> Credits {
    Credits::from_nanos(nanos)
}

/// A threshold crossed downwards (`balance.low`) or re-armed (`balance.recovered`).
pub async fn threshold_crossed<C: ConnectionTrait>(
    c: &C,
    ws: &workspaces::Model,
    threshold: &alert_thresholds::Model,
    event_type: T,
    now: DateTime<Utc>,
) -> Result<Vec<Uuid>> {
    let data = json!({
        "workspaceId": ws.id,
        "thresholdId": threshold.id,
        "severity": threshold.severity.as_str(),
        "threshold": credits(threshold.amount_nanos),
        "balance": credits(ws.balance_nanos),
    });
    let event = NewEvent {
        event_type,
        account_id: ws.account_id,
        workspace_id: Some(ws.id),
        data,
        dedupe_key: dedupe::crossing(event_type, threshold.id, ws.balance_sequence),
    };
    outbox::emit(c, event, now).await
}

fn purchase_data(p: &purchases::Model) -> serde_json::Value {
    json!({
        "purchaseId": p.id,
        "workspaceId": p.workspace_id,
        "status": p.status.as_str(),
        "source": p.source.as_str(),
        "amount": credits(p.amount_nanos),
        "bonus": credits(p.bonus_nanos),
        "price": credits(p.price_nanos),
        "invoiceId": p.invoice_id,
        "failureReason": p.failure_reason,
    })
}

/// `purchase.succeeded` or `purchase.failed`, by the purchase's status.
pub async fn purchase_settled<C: ConnectionTrait>(
    c: &C,
    purchase: &purchases::Model,
    account_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Vec<Uuid>> {
    let event_type = match purchase.status {
        entity::enums::PurchaseStatus::Succeeded => T::PurchaseSucceeded,
        _ => T::PurchaseFailed,
    };
    let event = NewEvent {
        event_type,
        account_id,
        workspace_id: Some(purchase.workspace_id),
        data: purchase_data(purchase),
        dedupe_key: dedupe::of(event_type, purchase.id),
    };
    outbox::emit(c, event, now).await
}

/// `invoice.created`, and `invoice.paid` too when it was issued paid (a card
/// purchase's invoice).
pub async fn invoice_issued<C: ConnectionTrait>(
    c: &C,
    invoice: &invoices::Model,
    workspace_id: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<Vec<Uuid>> {
    let mut ids = invoice_event(c, invoice, workspace_id, T::InvoiceCreated, now).await?;
    if invoice.status == entity::enums::InvoiceStatus::Paid {
        ids.extend(invoice_event(c, invoice, workspace_id, T::InvoicePaid, now).await?);
    }
    Ok(ids)
}

/// `invoice.paid` (or `invoice.created`) of one invoice.
pub async fn invoice_event<C: ConnectionTrait>(
    c: &C,
    invoice: &invoices::Model,
    workspace_id: Option<Uuid>,
    event_type: T,
    now: DateTime<Utc>,
) -> Result<Vec<Uuid>> {
    let data = json!({
        "invoiceId": invoice.id,
        "number": invoice.number,
        "status": invoice.status.as_str(),
        "total": credits(invoice.total_nanos),
        "purchaseId": invoice.purchase_id,
        "issuedAt": invoice.issued_at,
        "dueAt": invoice.due_at,
        "paidAt": invoice.paid_at,
    });
    let event = NewEvent {
        event_type,
        account_id: invoice.account_id,
        workspace_id,
        data,
        dedupe_key: dedupe::of(event_type, invoice.id),
    };
    outbox::emit(c, event, now).await
}

/// An auto-reload's failure (`auto_reload.failed`), as recorded on its settings.
pub struct ReloadFailure<'a> {
    pub purchase: &'a purchases::Model,
    pub reason: &'a str,
    pub consecutive_failures: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// This failure turned auto-reload off: `auto_reload.disabled` too.
    pub turned_off: bool,
}

pub async fn reload_failed<C: ConnectionTrait>(
    c: &C,
    ws: &workspaces::Model,
    f: &ReloadFailure<'_>,
    now: DateTime<Utc>,
) -> Result<Vec<Uuid>> {
    let failed = NewEvent {
        event_type: T::AutoReloadFailed,
        account_id: ws.account_id,
        workspace_id: Some(ws.id),
        data: json!({
            "workspaceId": ws.id,
            "purchaseId": f.purchase.id,
            "amount": credits(f.purchase.amount_nanos),
            "reason": f.reason,
            "consecutiveFailures": f.consecutive_failures,
            "nextAttemptAt": f.next_attempt_at,
            "balance": credits(ws.balance_nanos),
        }),
        dedupe_key: dedupe::of(T::AutoReloadFailed, f.purchase.id),
    };
    let mut ids = outbox::emit(c, failed, now).await?;
    if f.turned_off {
        let disabled = NewEvent {
            event_type: T::AutoReloadDisabled,
            account_id: ws.account_id,
            workspace_id: Some(ws.id),
            data: json!({
                "workspaceId": ws.id,
                "purchaseId": f.purchase.id,
                "consecutiveFailures": f.consecutive_failures,
                "lastFailureReason": f.reason,
                "balance": credits(ws.balance_nanos),
            }),
            dedupe_key: dedupe::of(T::AutoReloadDisabled, f.purchase.id),
        };
        ids.extend(outbox::emit(c, disabled, now).await?);
    }
    Ok(ids)
}
