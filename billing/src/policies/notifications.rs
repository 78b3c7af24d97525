//! Notifications: *what* to tell people and *whom* (never how; rendering and SMTP
//! live in the worker).
//!
//! A notification is a row written inside the business transaction that caused it
//! (a purchase succeeded, a balance crossed an alert threshold, an auto-reload
//! failed), so it is never lost between commit and enqueue: the queue push happens
//! after commit and a sweep ([`due_notifications`]) picks up rows still waiting.
//! Each row is idempotent on its `dedupe_key` (the business event, e.g.
//! `receipt:<purchase id>`): writing the same event twice writes one row.
//!
//! # Delivery states
//!
//! `PENDING` (due at `next_attempt_at`) → `SENT` (the mail server accepted it) or,
//! after a failed attempt, `PENDING` again at the next time of the
//! [`RetryPolicy`] (`RetryPolicy::NOTIFICATIONS` unless the worker is told
//! otherwise), until its attempts run out: `DEAD`, with the last error kept.
//! [`retry_dead`] puts a DEAD notification back to PENDING with a fresh budget.
//!
//! A delivery first *claims* the row ([`claim_for_delivery`]): while a row is
//! `PENDING`, `sent_at` holds the time of the claim in progress (a lease of
//! [`DELIVERY_LEASE_SECS`]), so two workers handed the same notification at once (a
//! job and a sweep, or a redelivered job) do not both send it, and a row whose retry
//! time has not come is not claimed at all. [`mark_sent`] sets `SENT` and the real
//! `sent_at`; [`record_failure`] counts the attempt, schedules the next one and
//! releases the lease. A `SENT` row is never claimed again.

use crate::accounts::Email;
use crate::error::{BillingError, Result};
use crate::ids::new_id;
use crate::jobs::{DeliverNotification, JobSink};
use crate::money::Credits;
use crate::retry::RetryPolicy;
use chrono::{DateTime, TimeDelta, Utc};
use entity::enums::{
    AccountRole, AlertSeverity, NotificationStatus, PurchaseSource, PurchaseStatus, WorkspaceRole,
};
use entity::{
    account_members, invoice_lines, invoices, notifications, payment_methods, purchases, users,
    workspace_members, workspaces,
};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, IntoActiveModel,
    QueryFilter, QueryOrder, QuerySelect,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// Most recipients of one notification (SMTP servers commonly refuse more than 100
/// RCPT commands per message).
pub const RECIPIENTS_MAX: usize = 100;
/// Longest dedupe key.
pub const DEDUPE_KEY_LEN_MAX: usize = 200;
/// Largest payload (JSON) of one notification.
pub const PAYLOAD_BYTES_MAX: usize = 64 * 1024;
/// Longest delivery error kept in `last_error`.
pub const LAST_ERROR_LEN_MAX: usize = 500;
/// How long a claim on a PENDING notification holds off other deliveries. Longer
/// than any single send may take (the worker's SMTP timeouts are far shorter), so a
/// claim only lapses when its holder crashed.
pub const DELIVERY_LEASE_SECS: i64 = 300;
/// Most ids one call of [`due_notifications`] returns.
pub const DUE_BATCH_MAX: u64 = 1_000;

// --- kinds and payloads ------------------------------------------------------------

/// What a notification is about. The names are stored in `notifications.kind`:
/// never rename one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NotificationKind {
    LowBalanceAlert,
    PurchaseReceipt,
    ReloadFailed,
    AutoReloadDisabled,
    PaymentActionRequired,
}

impl NotificationKind {
    pub const ALL: [Self; 5] = [
        Self::LowBalanceAlert,
        Self::PurchaseReceipt,
        Self::ReloadFailed,
        Self::AutoReloadDisabled,
        Self::PaymentActionRequired,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::LowBalanceAlert => "LOW_BALANCE_ALERT",
            Self::PurchaseReceipt => "PURCHASE_RECEIPT",
            Self::ReloadFailed => "RELOAD_FAILED",
            Self::AutoReloadDisabled => "AUTO_RELOAD_DISABLED",
            Self::PaymentActionRequired => "PAYMENT_ACTION_REQUIRED",
        }
    }
}

impl fmt::Display for NotificationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NotificationKind {
    type Err = BillingError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| BillingError::invalid(format!("unknown notification kind {s:?}")))
    }
}

/// Serialises an [`AlertSeverity`] by its stored name (`WARNING`, `URGENT`).
mod severity_name {
    use entity::enums::AlertSeverity;
    use serde::{Deserialize, Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(s: &AlertSeverity, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<AlertSeverity, D::Error> {
        let name = String::deserialize(de)?;
        match name.as_str() {
            "WARNING" => Ok(AlertSeverity::Warning),
            "URGENT" => Ok(AlertSeverity::Urgent),
            other => Err(de::Error::custom(format!("unknown severity {other:?}"))),
        }
    }
}

/// A workspace's balance fell below an armed alert threshold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LowBalanceAlert {
    pub workspace_id: Uuid,
    #[serde(default)]
    pub workspace_name: String,
    #[serde(with = "severity_name")]
    pub severity: AlertSeverity,
    /// The threshold that fired.
    pub threshold: Credits,
    /// The balance right after the debit that crossed it.
    pub balance: Credits,
    /// When the balance runs out at the recent rate of spending; None when it
    /// cannot be projected (no recent usage).
    #[serde(default)]
    pub projected_depletion_at: Option<DateTime<Utc>>,
}

/// One line of an invoice, as shown on a receipt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptLine {
    pub description: String,
    pub amount: Credits,
}

/// A purchase succeeded: the receipt with its invoice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseReceipt {
    pub purchase_id: Uuid,
    pub workspace_id: Uuid,
    #[serde(default)]
    pub workspace_name: String,
    pub invoice_id: Uuid,
    pub invoice_number: String,
    pub lines: Vec<ReceiptLine>,
    /// The invoice total (what was charged).
    pub total: Credits,
    /// Credits added to the workspace (amount + bonus).
    #[serde(default)]
    pub credited: Credits,
    /// `PAID` or `OPEN` (paying by invoice).
    #[serde(default)]
    pub invoice_status: String,
    pub issued_at: DateTime<Utc>,
    /// Set for an OPEN invoice.
    #[serde(default)]
    pub due_at: Option<DateTime<Utc>>,
}

/// An automatic reload's payment failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadFailed {
    pub workspace_id: Uuid,
    #[serde(default)]
    pub workspace_name: String,
    pub purchase_id: Uuid,
    /// The credits the reload tried to buy.
    pub amount: Credits,
    pub reason: String,
    /// Failures in a row so far, this one included.
    #[serde(default)]
    pub consecutive_failures: i32,
    /// When the next reload may be tried; None when auto-reload was turned off.
    #[serde(default)]
    pub next_attempt_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub balance: Option<Credits>,
}

/// Auto-reload turned itself off after repeated failures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoReloadDisabled {
    pub workspace_id: Uuid,
    #[serde(default)]
    pub workspace_name: String,
    pub consecutive_failures: i32,
    #[serde(default)]
    pub last_failure_reason: Option<String>,
    #[serde(default)]
    pub balance: Option<Credits>,
}

/// A card charge needs the cardholder to authenticate (3-D Secure) and nobody was
/// there: the purchase ended REQUIRES_ACTION, nothing was charged or credited.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentActionRequired {
    pub workspace_id: Uuid,
    #[serde(default)]
    pub workspace_name: String,
    pub purchase_id: Uuid,
    /// The credits the purchase tried to buy.
    pub amount: Credits,
    /// The card, as the admins know it: brand and last four digits.
    pub card_brand: String,
    pub card_last4: String,
    /// Whether an auto-reload made the purchase (it counts as a failed reload).
    #[serde(default)]
    pub auto_reload: bool,
    pub reason: String,
}

/// A notification's content: the kind and its typed payload in one value, so they
/// cannot disagree. Stored as the kind's name plus the payload's JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotificationPayload {
    LowBalanceAlert(LowBalanceAlert),
    PurchaseReceipt(PurchaseReceipt),
    ReloadFailed(ReloadFailed),
    AutoReloadDisabled(AutoReloadDisabled),
    PaymentActionRequired(PaymentActionRequired),
}

impl NotificationPayload {
    pub fn kind(&self) -> NotificationKind {
        match self {
            Self::LowBalanceAlert(_) => NotificationKind::LowBalanceAlert,
            Self::PurchaseReceipt(_) => NotificationKind::PurchaseReceipt,
            Self::ReloadFailed(_) => NotificationKind::ReloadFailed,
            Self::AutoReloadDisabled(_) => NotificationKind::AutoReloadDisabled,
            Self::PaymentActionRequired(_) => NotificationKind::PaymentActionRequired,
        }
    }

    /// The payload's JSON (without the kind, which has its own column).
    pub fn to_json(&self) -> Result<String> {
        let json = match self {
            Self::LowBalanceAlert(p) => serde_json::to_string(p),
            Self::PurchaseReceipt(p) => serde_json::to_string(p),
            Self::ReloadFailed(p) => serde_json::to_string(p),
            Self::AutoReloadDisabled(p) => serde_json::to_string(p),
            Self::PaymentActionRequired(p) => serde_json::to_string(p),
        };
        json.map_err(|e| BillingError::Internal(format!("notification payload: {e}")))
    }

    /// Reads a stored payload back.
    pub fn decode(kind: &str, json: &str) -> Result<Self> {
        fn parse<T: serde::de::DeserializeOwned>(json: &str) -> Result<T> {
            serde_json::from_str(json)
                .map_err(|e| BillingError::Internal(format!("notification payload: {e}")))
        }
        Ok(match kind.parse::<NotificationKind>()? {
            NotificationKind::LowBalanceAlert => Self::LowBalanceAlert(parse(json)?),
            NotificationKind::PurchaseReceipt => Self::PurchaseReceipt(parse(json)?),
            NotificationKind::ReloadFailed => Self::ReloadFailed(parse(json)?),
            NotificationKind::AutoReloadDisabled => Self::AutoReloadDisabled(parse(json)?),
            NotificationKind::PaymentActionRequired => Self::PaymentActionRequired(parse(json)?),
        })
    }
}

/// The typed payload of a stored notification.
pub fn payload_of(n: &notifications::Model) -> Result<NotificationPayload> {
    NotificationPayload::decode(&n.kind, &n.payload)
}

/// The recipients of a stored notification.
pub fn recipients_of(n: &notifications::Model) -> Vec<String> {
    n.recipients
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Dedupe keys of the business events that cause notifications. The key names the
/// event, so a retried or concurrent writer of the same event writes nothing more.
pub mod dedupe {
    use uuid::Uuid;

    /// The receipt of a purchase.
    pub fn receipt(purchase_id: Uuid) -> String {
        format!("receipt:{purchase_id}")
    }

    /// The failure of one auto-reload purchase.
    pub fn reload_failed(purchase_id: Uuid) -> String {
        format!("reload_failed:{purchase_id}")
    }

    /// Auto-reload turned off by the failure of this reload purchase.
    pub fn auto_reload_disabled(purchase_id: Uuid) -> String {
        format!("auto_reload_disabled:{purchase_id}")
    }

    /// A purchase that needs the cardholder to authenticate.
    pub fn payment_action_required(purchase_id: Uuid) -> String {
        format!("payment_action_required:{purchase_id}")
    }
}

// --- writing -------------------------------------------------------------------------

/// Writes a PENDING notification inside the caller's transaction (or on a plain
/// connection), idempotent on `dedupe_key`: `Some(id)` when this call wrote it,
/// `None` when a notification with that key already exists (written earlier or by a
/// concurrent transaction) or when there is nobody to tell (no recipients).
///
/// The insert is `INSERT … ON CONFLICT (dedupe_key) DO NOTHING`, never a failing
/// INSERT, which would abort a PostgreSQL transaction. Recipients are validated,
/// lower-cased, de-duplicated and sorted; more than [`RECIPIENTS_MAX`] is
/// LIMIT_EXCEEDED.
pub async fn enqueue_notification<C: ConnectionTrait>(
    c: &C,
    account_id: Option<Uuid>,
    workspace_id: Option<Uuid>,
    recipients: &[String],
    payload: &NotificationPayload,
    dedupe_key: &str,
    now: DateTime<Utc>,
) -> Result<Option<Uuid>> {
    if dedupe_key.is_empty() || dedupe_key.len() > DEDUPE_KEY_LEN_MAX {
        return Err(BillingError::invalid(format!(
            "dedupe key must be 1 to {DEDUPE_KEY_LEN_MAX} characters"
        )));
    }
    let recipients = normalise_recipients(recipients)?;
    if recipients.is_empty() {
        tracing::warn!(
            dedupe_key,
            kind = %payload.kind(),
            "notification has no recipients; nothing written"
        );
        return Ok(None);
    }
    let json = payload.to_json()?;
    if json.len() > PAYLOAD_BYTES_MAX {
        return Err(BillingError::LimitExceeded(format!(
            "notification payload is larger than {PAYLOAD_BYTES_MAX} bytes"
        )));
    }
    let row = notifications::Model {
        id: new_id(),
        kind: payload.kind().as_str().to_owned(),
        account_id,
        workspace_id,
        recipients: recipients.join(","),
        payload: json,
        dedupe_key: dedupe_key.to_owned(),
        status: NotificationStatus::Pending,
        attempts: 0,
        last_error: None,
        created_at: now,
        sent_at: None,
        next_attempt_at: Some(now),
    };
    let inserted = notifications::Entity::insert(row.clone().into_active_model().reset_all())
        .on_conflict(
            OnConflict::column(notifications::Column::DedupeKey)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(c)
        .await;
    match inserted {
        Ok(0) | Err(DbErr::RecordNotInserted) => Ok(None),
        Ok(_) => Ok(Some(row.id)),
        Err(e) => Err(e.into()),
    }
}

fn normalise_recipients(recipients: &[String]) -> Result<Vec<String>> {
    let set = recipients
        .iter()
        .map(|r| Email::parse(r).map(|e| e.as_str().to_owned()))
        .collect::<Result<BTreeSet<_>>>()?;
    if set.len() > RECIPIENTS_MAX {
        return Err(BillingError::LimitExceeded(format!(
            "a notification has at most {RECIPIENTS_MAX} recipients"
        )));
    }
    // The column is comma-separated; Email::parse already refuses whitespace, and a
    // comma inside an address (a quoted local part) is not worth supporting.
    if set.iter().any(|r| r.contains(',')) {
        return Err(BillingError::invalid("email is not a valid address"));
    }
    Ok(set.into_iter().collect())
}

// --- recipients ----------------------------------------------------------------------

/// The e-mail addresses of the given users (unknown ids are left out), sorted.
pub async fn user_emails<C: ConnectionTrait>(c: &C, user_ids: &[Uuid]) -> Result<Vec<String>> {
    let ids: BTreeSet<Uuid> = user_ids.iter().copied().collect();
    let mut emails = BTreeSet::new();
    let ids: Vec<Uuid> = ids.into_iter().collect();
    for chunk in ids.chunks(500) {
        let rows = users::Entity::find()
            .filter(users::Column::Id.is_in(chunk.iter().copied()))
            .all(c)
            .await?;
        emails.extend(rows.into_iter().map(|u| u.email));
    }
    Ok(emails.into_iter().collect())
}

async fn account_admin_ids<C: ConnectionTrait>(c: &C, account_id: Uuid) -> Result<Vec<Uuid>> {
    Ok(account_members::Entity::find()
        .filter(account_members::Column::AccountId.eq(account_id))
        .filter(account_members::Column::Role.is_in([AccountRole::Owner, AccountRole::Admin]))
        .all(c)
        .await?
        .into_iter()
        .map(|m| m.user_id)
        .collect())
}

/// The account's OWNER and ADMIN e-mail addresses, sorted.
pub async fn account_admin_emails<C: ConnectionTrait>(
    c: &C,
    account_id: Uuid,
) -> Result<Vec<String>> {
    let ids = account_admin_ids(c, account_id).await?;
    user_emails(c, &ids).await
}

/// Who hears about a workspace's money: its ADMIN members plus the account's OWNER
/// and ADMIN members (who are admins of every workspace), sorted and de-duplicated.
pub async fn workspace_admin_emails<C: ConnectionTrait>(
    c: &C,
    workspace_id: Uuid,
) -> Result<Vec<String>> {
    let ws = workspaces::Entity::find_by_id(workspace_id)
        .one(c)
        .await?
        .ok_or(BillingError::NotFound("workspace"))?;
    let mut ids = account_admin_ids(c, ws.account_id).await?;
    ids.extend(
        workspace_members::Entity::find()
            .filter(workspace_members::Column::WorkspaceId.eq(workspace_id))
            .filter(workspace_members::Column::Role.eq(WorkspaceRole::Admin))
            .all(c)
            .await?
            .into_iter()
            .map(|m| m.user_id),
    );
    user_emails(c, &ids).await
}

// --- receipts ------------------------------------------------------------------------

/// Writes the receipt of a SUCCEEDED purchase (its invoice's number, lines and
/// total) to the account's OWNER and ADMIN addresses, with the dedupe key
/// `receipt:<purchase id>`: calling it again writes nothing (`None`). Meant to run
/// in the transaction that captured the purchase, or right after it. A purchase
/// that is not SUCCEEDED, or has no invoice yet, is INVALID_INPUT.
pub async fn receipt_for_purchase<C: ConnectionTrait>(
    c: &C,
    purchase_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<Uuid>> {
    let purchase = purchases::Entity::find_by_id(purchase_id)
        .one(c)
        .await?
        .ok_or(BillingError::NotFound("purchase"))?;
    if purchase.status != PurchaseStatus::Succeeded {
        return Err(BillingError::invalid(format!(
            "purchase is {}; only a SUCCEEDED purchase has a receipt",
            purchase.status.as_str()
        )));
    }
    let invoice_id = purchase
        .invoice_id
        .ok_or_else(|| BillingError::invalid("the purchase has no invoice yet"))?;
    let invoice = invoices::Entity::find_by_id(invoice_id)
        .one(c)
        .await?
        .ok_or(BillingError::NotFound("invoice"))?;
    let lines = invoice_lines::Entity::find()
        .filter(invoice_lines::Column::InvoiceId.eq(invoice_id))
        .order_by_asc(invoice_lines::Column::Position)
        .all(c)
        .await?;
    let ws = workspaces::Entity::find_by_id(purchase.workspace_id)
        .one(c)
        .await?
        .ok_or(BillingError::NotFound("workspace"))?;
    let credited = Credits::from_nanos(purchase.amount_nanos)
        .checked_add(Credits::from_nanos(purchase.bonus_nanos))?;
    let payload = NotificationPayload::PurchaseReceipt(PurchaseReceipt {
        purchase_id,
        workspace_id: ws.id,
        workspace_name: ws.name.clone(),
        invoice_id,
        invoice_number: invoice.number.clone(),
        lines: lines
            .into_iter()
            .map(|l| ReceiptLine {
                description: l.description,
                amount: Credits::from_nanos(l.amount_nanos),
            })
            .collect(),
        total: Credits::from_nanos(invoice.total_nanos),
        credited,
        invoice_status: invoice.status.as_str().to_owned(),
        issued_at: invoice.issued_at,
        due_at: invoice.due_at,
    });
    let recipients = account_admin_emails(c, invoice.account_id).await?;
    enqueue_notification(
        c,
        Some(invoice.account_id),
        Some(ws.id),
        &recipients,
        &payload,
        &dedupe::receipt(purchase_id),
        now,
    )
    .await
}

/// Tells the workspace's admins (and the account's owners and admins) that a
/// purchase needs the cardholder to authenticate the card: which card, and what to do.
/// Deduped per purchase. Runs in the transaction that recorded REQUIRES_ACTION.
pub async fn action_required_for_purchase<C: ConnectionTrait>(
    c: &C,
    purchase: &purchases::Model,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<Option<Uuid>> {
    let ws = workspaces::Entity::find_by_id(purchase.workspace_id)
        .one(c)
        .await?
        .ok_or(BillingError::NotFound("workspace"))?;
    let card = match purchase.payment_method_id {
        Some(id) => payment_methods::Entity::find_by_id(id).one(c).await?,
        None => None,
    };
    let payload = NotificationPayload::PaymentActionRequired(PaymentActionRequired {
        workspace_id: ws.id,
        workspace_name: ws.name.clone(),
        purchase_id: purchase.id,
        amount: Credits::from_nanos(purchase.amount_nanos),
        card_brand: card
            .as_ref()
            .map_or_else(|| "card".to_owned(), |m| m.brand.as_str().to_owned()),
        card_last4: card.map_or_else(|| "????".to_owned(), |m| m.last4),
        auto_reload: purchase.source == PurchaseSource::AutoReload,
        reason: reason.to_owned(),
    });
    let recipients = workspace_admin_emails(c, ws.id).await?;
    enqueue_notification(
        c,
        Some(ws.account_id),
        Some(ws.id),
        &recipients,
        &payload,
        &dedupe::payment_action_required(purchase.id),
        now,
    )
    .await
}

// --- delivery ------------------------------------------------------------------------

pub async fn load_notification<C: ConnectionTrait>(
    c: &C,
    id: Uuid,
) -> Result<notifications::Model> {
    notifications::Entity::find_by_id(id)
        .one(c)
        .await?
        .ok_or(BillingError::NotFound("notification"))
}

/// Claims a PENDING notification for one delivery attempt: one conditional UPDATE
/// that succeeds only when it is due (`next_attempt_at` has come) and no other claim
/// is live (none, or older than [`DELIVERY_LEASE_SECS`]). `None`: it is SENT or
/// DEAD, unknown, not due yet, or another delivery holds it right now. The caller sends, then calls [`mark_sent`] or
/// [`record_failure`].
pub async fn claim_for_delivery<C: ConnectionTrait>(
    c: &C,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<notifications::Model>> {
    let lapsed = now - TimeDelta::seconds(DELIVERY_LEASE_SECS);
    Ok(notifications::Entity::update_many()
        .col_expr(notifications::Column::SentAt, Expr::value(now))
        .filter(notifications::Column::Id.eq(id))
        .filter(notifications::Column::Status.eq(NotificationStatus::Pending))
        .filter(due_by(now))
        .filter(
            notifications::Column::SentAt
                .is_null()
                .or(notifications::Column::SentAt.lt(lapsed)),
        )
        .exec_with_returning(c)
        .await?
        .pop())
}

/// PENDING → SENT with `sent_at = now`, once the mail server accepted the message.
/// False when it was not PENDING (already SENT by a delivery whose claim had
/// lapsed, or DEAD): nothing changes.
pub async fn mark_sent<C: ConnectionTrait>(c: &C, id: Uuid, now: DateTime<Utc>) -> Result<bool> {
    let result = notifications::Entity::update_many()
        .col_expr(
            notifications::Column::Status,
            Expr::value(NotificationStatus::Sent.as_str()),
        )
        .col_expr(notifications::Column::SentAt, Expr::value(now))
        .col_expr(
            notifications::Column::NextAttemptAt,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .filter(notifications::Column::Id.eq(id))
        .filter(notifications::Column::Status.eq(NotificationStatus::Pending))
        .exec(c)
        .await?;
    Ok(result.rows_affected == 1)
}

/// A due PENDING notification: its `next_attempt_at` is at or before `at` (a row
/// written before retries existed has none and is due).
fn due_by(at: DateTime<Utc>) -> sea_orm::sea_query::SimpleExpr {
    notifications::Column::NextAttemptAt
        .is_null()
        .or(notifications::Column::NextAttemptAt.lte(at))
}

/// A failed attempt, recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureRecorded {
    /// The row afterwards: PENDING with its next attempt scheduled, or DEAD.
    pub row: notifications::Model,
    /// The wait before the next attempt; None when the notification is DEAD.
    pub retry_after: Option<std::time::Duration>,
}

/// Records a failed delivery attempt of a PENDING notification: `attempts + 1`,
/// `last_error` (timestamped, truncated to [`LAST_ERROR_LEN_MAX`]), the claim
/// released, and either the next attempt scheduled at the policy's next time or,
/// once the attempts ran out, DEAD. `None` when it was not PENDING (a SENT
/// notification is never downgraded) or another attempt was recorded meanwhile.
pub async fn record_failure<C: ConnectionTrait>(
    c: &C,
    id: Uuid,
    error: &str,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
) -> Result<Option<FailureRecorded>> {
    use notifications::Column as N;
    let Some(row) = notifications::Entity::find_by_id(id)
        .one(c)
        .await?
        .filter(|n| n.status == NotificationStatus::Pending)
    else {
        return Ok(None);
    };
    let message = format!("{}: {error}", now.format("%Y-%m-%dT%H:%M:%SZ"));
    let message: String = message.chars().take(LAST_ERROR_LEN_MAX).collect();
    let attempts = row.attempts.saturating_add(1);
    let retry_after = policy.after_failure(attempts);
    let (status, next_attempt_at) = match retry_after {
        Some(delay) => (
            NotificationStatus::Pending,
            Some(now + TimeDelta::from_std(delay).unwrap_or(TimeDelta::MAX)),
        ),
        None => (NotificationStatus::Dead, None),
    };
    let row = notifications::Entity::update_many()
        .col_expr(N::Attempts, Expr::value(attempts))
        .col_expr(N::Status, Expr::value(status.as_str()))
        .col_expr(N::LastError, Expr::value(message))
        .col_expr(N::SentAt, Expr::value(Option::<DateTime<Utc>>::None))
        .col_expr(N::NextAttemptAt, Expr::value(next_attempt_at))
        .filter(N::Id.eq(id))
        .filter(N::Status.eq(NotificationStatus::Pending))
        .filter(N::Attempts.eq(row.attempts))
        .exec_with_returning(c)
        .await?
        .pop();
    Ok(row.map(|row| FailureRecorded { row, retry_after }))
}

/// A DEAD notification back to PENDING, due now, with a fresh attempt budget (its
/// last error kept until the next attempt), and its job pushed when a queue is
/// given. NOT_FOUND for an unknown id; INVALID_INPUT when it is not DEAD.
pub async fn retry_dead(
    c: &sea_orm::DatabaseConnection,
    jobs: Option<&dyn JobSink>,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<notifications::Model> {
    use notifications::Column as N;
    let row = load_notification(c, id).await?;
    let revived = notifications::Entity::update_many()
        .col_expr(N::Status, Expr::value(NotificationStatus::Pending.as_str()))
        .col_expr(N::Attempts, Expr::value(0))
        .col_expr(N::NextAttemptAt, Expr::value(now))
        .col_expr(N::SentAt, Expr::value(Option::<DateTime<Utc>>::None))
        .filter(N::Id.eq(id))
        .filter(N::Status.eq(NotificationStatus::Dead))
        .exec_with_returning(c)
        .await?
        .pop()
        .ok_or_else(|| {
            BillingError::invalid(format!(
                "notification is {}; only a DEAD notification can be retried",
                row.status.as_str()
            ))
        })?;
    if let Some(jobs) = jobs
        && let Err(e) = jobs
            .deliver(DeliverNotification {
                notification_id: id,
            })
            .await
    {
        tracing::warn!(notification_id = %id, error = %e, "push failed; the sweep will send it");
    }
    Ok(revived)
}

/// The PENDING notifications a purchase's settlement wrote (its receipt, or the
/// failure notices of an auto-reload purchase): what the capture job pushes to the
/// queue right after the settlement commits, so they go out at once rather than at
/// the next sweep.
pub async fn pending_for_purchase<C: ConnectionTrait>(
    c: &C,
    purchase_id: Uuid,
) -> Result<Vec<Uuid>> {
    let keys = [
        dedupe::receipt(purchase_id),
        dedupe::reload_failed(purchase_id),
        dedupe::auto_reload_disabled(purchase_id),
    ];
    Ok(notifications::Entity::find()
        .select_only()
        .column(notifications::Column::Id)
        .filter(notifications::Column::DedupeKey.is_in(keys))
        .filter(notifications::Column::Status.eq(NotificationStatus::Pending))
        .into_tuple::<Uuid>()
        .all(c)
        .await?)
}

/// PENDING notifications due at or before `older_than` (written then, or scheduled
/// for a retry then), longest due first, at most `limit` (capped at
/// [`DUE_BATCH_MAX`]): what the sweep re-enqueues. Rows with a live claim are
/// included; delivering them again is refused by the claim.
pub async fn due_notifications<C: ConnectionTrait>(
    c: &C,
    older_than: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<Uuid>> {
    Ok(notifications::Entity::find()
        .select_only()
        .column(notifications::Column::Id)
        .filter(notifications::Column::Status.eq(NotificationStatus::Pending))
        .filter(due_by(older_than))
        .order_by_asc(notifications::Column::NextAttemptAt)
        .order_by_asc(notifications::Column::Id)
        .limit(Ord::min(limit, DUE_BATCH_MAX))
        .into_tuple::<Uuid>()
        .all(c)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for kind in NotificationKind::ALL {
            assert_eq!(kind.as_str().parse::<NotificationKind>().ok(), Some(kind));
        }
        assert!("NOPE".parse::<NotificationKind>().is_err());
    }

    #[test]
    fn payloads_round_trip_and_tolerate_missing_optional_fields() {
        let alert = NotificationPayload::LowBalanceAlert(LowBalanceAlert {
            workspace_id: Uuid::nil(),
            workspace_name: "A".into(),
            severity: AlertSeverity::Urgent,
            threshold: Credits::from_nanos(5_000_000_000),
            balance: Credits::from_nanos(4_250_000_001),
            projected_depletion_at: None,
        });
        let json = alert.to_json().expect("json");
        assert!(json.contains("\"balance\":\"4.250000001\""), "{json}");
        assert!(json.contains("\"severity\":\"URGENT\""), "{json}");
        assert_eq!(
            NotificationPayload::decode("LOW_BALANCE_ALERT", &json).expect("decode"),
            alert
        );
        // An older writer without the optional fields still decodes.
        let old = r#"{"workspace_id":"00000000-0000-0000-0000-000000000000",
            "severity":"WARNING","threshold":"5","balance":"1"}"#;
        let NotificationPayload::LowBalanceAlert(decoded) =
            NotificationPayload::decode("LOW_BALANCE_ALERT", old).expect("decode")
        else {
            panic!("wrong kind");
        };
        assert_eq!(decoded.workspace_name, "");
        assert_eq!(decoded.projected_depletion_at, None);
        // Amounts are strings only.
        let numeric = old.replace("\"5\"", "5");
        assert!(NotificationPayload::decode("LOW_BALANCE_ALERT", &numeric).is_err());
    }

    #[test]
    fn recipients_are_normalised() {
        let got = normalise_recipients(&[
            "B@Example.com".into(),
            "a@example.com".into(),
            "b@example.com".into(),
        ])
        .expect("valid");
        assert_eq!(got, ["a@example.com", "b@example.com"]);
        assert!(normalise_recipients(&["not an address".into()]).is_err());
        let many: Vec<String> = (0..=RECIPIENTS_MAX)
            .map(|i| format!("u{i}@example.com"))
            .collect();
        assert!(matches!(
            normalise_recipients(&many),
            Err(BillingError::LimitExceeded(_))
        ));
    }
}
