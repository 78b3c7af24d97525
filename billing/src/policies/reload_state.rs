//! The reload state machine's outcomes: what a captured or failed AUTO_RELOAD
//! purchase does to its workspace's reload settings (back to IDLE, one more failure
//! with backoff, or DISABLED_AFTER_FAILURES), inside the purchase's own transaction.
//!
//! Kept apart from `auto_reload` (which starts reloads by writing purchases) so that
//! `payments::purchases` can call these without the two depending on each other.
//!
//! Lock order: purchase row → settings row.

use crate::error::Result;
use crate::ledger;
use crate::money::Credits;
use crate::policies::notifications::{
    self, AutoReloadDisabled, NotificationPayload, ReloadFailed, dedupe,
};
use chrono::{DateTime, TimeDelta, Utc};
use entity::enums::AutoReloadStatus;
use entity::{auto_reload_settings, purchases as purchase_rows};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect};
use uuid::Uuid;
/// Failed reloads in a row after which auto-reload turns itself off
/// (DISABLED_AFTER_FAILURES) and the workspace admins are told.
pub const CONSECUTIVE_FAILURES_MAX: i32 = 3;
/// Backoff after the first failure; it doubles with each further failure...
pub const BACKOFF_BASE_SECONDS: i64 = 60;
/// ... up to this.
pub const BACKOFF_MAX_SECONDS: i64 = 3_600;

/// How long to wait before the next reload after `failures` failures in a row:
/// 1 min × 2^(failures − 1), capped at [`BACKOFF_MAX_SECONDS`].
pub fn backoff(failures: i32) -> TimeDelta {
    let doublings = failures.clamp(1, 31) - 1;
    let seconds = Ord::min(
        BACKOFF_BASE_SECONDS.saturating_mul(1i64 << doublings),
        BACKOFF_MAX_SECONDS,
    );
    TimeDelta::seconds(seconds)
}

/// After a reload purchase was credited, inside that transaction.
pub(crate) async fn on_reload_captured<C: ConnectionTrait>(
    c: &C,
    purchase: &purchase_rows::Model,
    now: DateTime<Utc>,
) -> Result<()> {
    mark_reloaded(c, purchase.workspace_id, now, now).await
}

pub(crate) async fn mark_reloaded<C: ConnectionTrait>(
    c: &C,
    workspace_id: Uuid,
    reloaded_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<()> {
    use auto_reload_settings::Column as S;
    auto_reload_settings::Entity::update_many()
        .col_expr(
            S::Status,
            Expr::case(
                Expr::col(S::Status).eq(AutoReloadStatus::Reloading.as_str()),
                AutoReloadStatus::Idle.as_str(),
            )
            .finally(Expr::col(S::Status))
            .into(),
        )
        .col_expr(S::ConsecutiveFailures, Expr::value(0))
        .col_expr(S::LastReloadAt, Expr::value(reloaded_at))
        .col_expr(S::NextAttemptAt, Expr::value(Option::<DateTime<Utc>>::None))
        .col_expr(S::UpdatedAt, Expr::value(now))
        .filter(S::WorkspaceId.eq(workspace_id))
        .exec(c)
        .await?;
    Ok(())
}

/// After a reload purchase was marked FAILED, inside that transaction (see
/// [`reload_failed`]). Takes the settings row's lock (after the purchase's).
pub(crate) async fn on_reload_failed<C: ConnectionTrait>(
    c: &C,
    purchase: &purchase_rows::Model,
    permanent: bool,
    now: DateTime<Utc>,
) -> Result<()> {
    on_failure(c, purchase, permanent, true, now).await
}

/// After a reload purchase ended REQUIRES_ACTION (3-D Secure needed, nobody there),
/// inside that transaction: a failed attempt like a decline (backoff, switched off
/// after repeated failures), but the admins already get the e-mail that says what to
/// do with the card, so no second "reload failed" e-mail.
pub(crate) async fn on_reload_needs_action<C: ConnectionTrait>(
    c: &C,
    purchase: &purchase_rows::Model,
    now: DateTime<Utc>,
) -> Result<()> {
    on_failure(c, purchase, true, false, now).await
}

async fn on_failure<C: ConnectionTrait>(
    c: &C,
    purchase: &purchase_rows::Model,
    permanent: bool,
    tell_failure: bool,
    now: DateTime<Utc>,
) -> Result<()> {
    let Some(settings) = auto_reload_settings::Entity::find_by_id(purchase.workspace_id)
        .lock_exclusive()
        .one(c)
        .await?
    else {
        return Ok(());
    };
    let failure = record_failure(c, &settings, purchase, permanent, now).await?;
    tracing::warn!(
        workspace_id = %purchase.workspace_id,
        purchase_id = %purchase.id,
        failures = failure.failures,
        turned_off = failure.turned_off,
        "auto-reload failed: {}",
        failure.reason
    );
    notify_failure(c, purchase, &failure, tell_failure, now).await
}

/// A failed reload as recorded on the workspace's reload settings.
struct RecordedFailure {
    /// Failed reloads in a row, this one included.
    failures: i32,
    /// Auto-reload is off (DISABLED_AFTER_FAILURES) after this failure...
    disabled: bool,
    /// ... and was on before it: the admins are told it switched itself off.
    turned_off: bool,
    reason: String,
    next_attempt_at: DateTime<Utc>,
}

/// Counts the failure on the (locked) settings row: one more in a row, the backoff
/// before the next attempt, and the switch-off once a permanent failure reaches
/// [`CONSECUTIVE_FAILURES_MAX`] (a disabled setting stays disabled).
async fn record_failure<C: ConnectionTrait>(
    c: &C,
    settings: &auto_reload_settings::Model,
    purchase: &purchase_rows::Model,
    permanent: bool,
    now: DateTime<Utc>,
) -> Result<RecordedFailure> {
    use auto_reload_settings::Column as S;
    let failures = settings.consecutive_failures.saturating_add(1);
    let was_disabled = settings.status == AutoReloadStatus::DisabledAfterFailures;
    let disable = was_disabled || (permanent && failures >= CONSECUTIVE_FAILURES_MAX);
    let status = if disable {
        AutoReloadStatus::DisabledAfterFailures
    } else {
        AutoReloadStatus::Idle
    };
    let reason = purchase
        .failure_reason
        .clone()
        .unwrap_or_else(|| "payment failed".to_owned());
    let next_attempt_at = now + backoff(failures);
    auto_reload_settings::Entity::update_many()
        .col_expr(S::Status, Expr::value(status.as_str()))
        .col_expr(S::ConsecutiveFailures, Expr::value(failures))
        .col_expr(S::LastFailureReason, Expr::value(reason.clone()))
        .col_expr(S::NextAttemptAt, Expr::value(next_attempt_at))
        .col_expr(S::UpdatedAt, Expr::value(now))
        .filter(S::WorkspaceId.eq(purchase.workspace_id))
        .exec(c)
        .await?;
    Ok(RecordedFailure {
        failures,
        disabled: disable,
        turned_off: disable && !was_disabled,
        reason,
        next_attempt_at,
    })
}

/// Tells the workspace admins: the failed reload (with the next attempt, unless
/// disabled) and, when this failure turned auto-reload off, the switch-off. Each
/// deduped per purchase, so a retried transaction never sends twice.
async fn notify_failure<C: ConnectionTrait>(
    c: &C,
    purchase: &purchase_rows::Model,
    failure: &RecordedFailure,
    tell_failure: bool,
    now: DateTime<Utc>,
) -> Result<()> {
    let ws = ledger::load_workspace(c, purchase.workspace_id).await?;
    let admins = notifications::workspace_admin_emails(c, ws.id).await?;
    let balance = Some(Credits::from_nanos(ws.balance_nanos));
    let failed = NotificationPayload::ReloadFailed(ReloadFailed {
        workspace_id: ws.id,
        workspace_name: ws.name.clone(),
        purchase_id: purchase.id,
        amount: Credits::from_nanos(purchase.amount_nanos),
        reason: failure.reason.clone(),
        consecutive_failures: failure.failures,
        next_attempt_at: (!failure.disabled).then_some(failure.next_attempt_at),
        balance,
    });
    if tell_failure {
        notifications::enqueue_notification(
            c,
            Some(ws.account_id),
            Some(ws.id),
            &admins,
            &failed,
            &dedupe::reload_failed(purchase.id),
            now,
        )
        .await?;
    }
    if failure.turned_off {
        let disabled = NotificationPayload::AutoReloadDisabled(AutoReloadDisabled {
            workspace_id: ws.id,
            workspace_name: ws.name.clone(),
            consecutive_failures: failure.failures,
            last_failure_reason: Some(failure.reason.clone()),
            balance,
        });
        notifications::enqueue_notification(
            c,
            Some(ws.account_id),
            Some(ws.id),
            &admins,
            &disabled,
            &disabled_dedupe_key(purchase.id),
            now,
        )
        .await?;
    }
    Ok(())
}

/// The dedupe key of the switch-off caused by one failed reload purchase.
pub fn disabled_dedupe_key(purchase_id: Uuid) -> String {
    format!("auto_reload_disabled:{purchase_id}")
}
