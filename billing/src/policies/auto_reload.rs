//! Auto-reload: when a debit leaves a workspace's balance below its threshold, the
//! same transaction flips the reload state IDLE → RELOADING and writes the
//! AUTO_RELOAD purchase (PENDING). The worker's capture job charges it; the outcome
//! comes back through [`reload_succeeded`] / [`reload_failed`] (or, equally, through
//! `purchases::capture_succeeded` / `purchases::fail_purchase`, which apply the same
//! bookkeeping to AUTO_RELOAD purchases in their own transaction).
//!
//! Exactly one reload per crossing: the flip is a conditional UPDATE (`status =
//! 'IDLE'`) made while the debit holds the workspace row (PostgreSQL's row lock,
//! SQLite's `BEGIN IMMEDIATE`), so of any number of racing debits one flips and the
//! others see RELOADING. While RELOADING nothing else is started; the outcome puts it
//! back to IDLE (or, after [`CONSECUTIVE_FAILURES_MAX`] failures in a row,
//! DISABLED_AFTER_FAILURES, which only `crate::policies::auto_reload_settings::configure_auto_reload` undoes).
//!
//! Lock order: purchase row (outcomes) → workspace row (debits, repair) → settings row.

use crate::db::begin_write;
use crate::error::{BillingError, Result};
use crate::ids::new_id;
use crate::money::Credits;
use crate::payments::purchases::{self, PurchaseItem, PurchaseRequest};
use crate::policies::reload_state::{mark_reloaded, on_reload_failed};
use chrono::{DateTime, TimeDelta, Utc};
use entity::enums::{AutoReloadStatus, PurchaseSource, PurchaseStatus};
use entity::{auto_reload_settings, purchases as purchase_rows, workspaces};
use sea_orm::sea_query::{Condition, Expr};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use uuid::Uuid;

/// The window of `max_reloads_per_day`.
pub const RELOAD_WINDOW_HOURS: i64 = 24;
/// Workspaces repaired per [`repair_stuck_reloads`] call.
pub const REPAIR_BATCH_MAX: u64 = 500;

/// The idempotency key of a reload purchase: unique per reload (it holds the id).
pub fn reload_key(workspace_id: Uuid, purchase_id: Uuid) -> String {
    format!("auto-reload:{workspace_id}:{purchase_id}")
}

/// Whether the settings alone allow a reload for this balance now.
fn wants_reload(
    settings: &auto_reload_settings::Model,
    ws: &workspaces::Model,
    now: DateTime<Utc>,
) -> bool {
    settings.enabled
        && settings.status == AutoReloadStatus::Idle
        && settings.payment_method_id.is_some()
        && ws.balance_nanos < settings.threshold_nanos
        && settings.next_attempt_at.is_none_or(|at| at <= now)
}

/// Called in the transaction of every debit (usage, settlement, transfer out), with
/// the workspace row as the debit left it (the row is locked by that debit). When
/// auto-reload is enabled and IDLE, the balance is below the threshold, no backoff
/// is pending, fewer than `max_reloads_per_day` reloads succeeded in the last 24 h
/// and none is PENDING, it flips IDLE → RELOADING (conditional: 0 rows means another
/// debit won, and nothing happens) and writes the AUTO_RELOAD purchase: PENDING, the
/// configured amount at list price (no bonus), the configured card, key
/// `auto-reload:<workspace>:<purchase id>`. Returns that purchase, for the caller to
/// enqueue after commit (the worker's sweep finds it otherwise).
///
/// Cost on the hot path: one primary-key SELECT; more only below the threshold.
/// A configuration that purchases would refuse (it cannot be stored, but an old row
/// might hold one) skips the reload with a warning instead of failing the debit.
pub async fn after_balance_change<C: ConnectionTrait>(
    c: &C,
    ws: &workspaces::Model,
    now: DateTime<Utc>,
) -> Result<Option<purchase_rows::Model>> {
    let settings = auto_reload_settings::Entity::find_by_id(ws.id)
        .one(c)
        .await?;
    after_balance_change_with(c, ws, settings.as_ref(), now).await
}

/// [`after_balance_change`] with the workspace's settings row already read (the debit
/// engine reads every workspace's of a batch at once, under the workspace locks).
pub(crate) async fn after_balance_change_with<C: ConnectionTrait>(
    c: &C,
    ws: &workspaces::Model,
    settings: Option<&auto_reload_settings::Model>,
    now: DateTime<Utc>,
) -> Result<Option<purchase_rows::Model>> {
    let Some(settings) = settings else {
        return Ok(None);
    };
    if !wants_reload(settings, ws, now) {
        return Ok(None);
    }
    if !under_daily_cap(c, settings, now).await? {
        return Ok(None);
    }
    let id = new_id();
    let req = PurchaseRequest {
        workspace_id: ws.id,
        item: PurchaseItem::Amount(Credits::from_nanos(settings.amount_nanos)),
        source: PurchaseSource::AutoReload,
        payment_method_id: settings.payment_method_id,
        idempotency_key: reload_key(ws.id, id),
        created_by_user_id: None,
    };
    let row = match purchases::new_pending_row(c, id, &req, now).await {
        Ok(row) => row,
        Err(e @ BillingError::Database(_)) => return Err(e),
        Err(e) => {
            tracing::warn!(workspace_id = %ws.id, error = %e, "auto-reload skipped: invalid settings");
            return Ok(None);
        }
    };
    use auto_reload_settings::Column as S;
    let flipped = auto_reload_settings::Entity::update_many()
        .col_expr(S::Status, Expr::value(AutoReloadStatus::Reloading.as_str()))
        .col_expr(S::UpdatedAt, Expr::value(now))
        .filter(S::WorkspaceId.eq(ws.id))
        .filter(S::Enabled.eq(true))
        .filter(S::Status.eq(AutoReloadStatus::Idle))
        .filter(S::ThresholdNanos.gt(ws.balance_nanos))
        .exec(c)
        .await?;
    if flipped.rows_affected != 1 {
        return Ok(None);
    }
    purchase_rows::Entity::insert(<purchase_rows::ActiveModel as From<_>>::from(row.clone()))
        .exec_without_returning(c)
        .await?;
    tracing::info!(workspace_id = %ws.id, purchase_id = %row.id, "auto-reload started");
    Ok(Some(row))
}

/// Fewer than `max_reloads_per_day` AUTO_RELOAD purchases SUCCEEDED in the last
/// 24 hours, and none is PENDING. One query; its rows are bounded by the cap.
async fn under_daily_cap<C: ConnectionTrait>(
    c: &C,
    settings: &auto_reload_settings::Model,
    now: DateTime<Utc>,
) -> Result<bool> {
    use purchase_rows::Column as P;
    let since = now - TimeDelta::hours(RELOAD_WINDOW_HOURS);
    let recent: Vec<PurchaseStatus> = purchase_rows::Entity::find()
        .select_only()
        .column(P::Status)
        .filter(P::WorkspaceId.eq(settings.workspace_id))
        .filter(P::Source.eq(PurchaseSource::AutoReload))
        .filter(
            Condition::any()
                .add(P::Status.eq(PurchaseStatus::Pending))
                .add(
                    Condition::all()
                        .add(P::Status.eq(PurchaseStatus::Succeeded))
                        .add(P::CompletedAt.gt(since)),
                ),
        )
        .into_tuple()
        .all(c)
        .await?;
    let pending = recent.contains(&PurchaseStatus::Pending);
    let succeeded = recent.len();
    Ok(!pending && succeeded < usize::try_from(settings.max_reloads_per_day).unwrap_or(0))
}

/// The capture job's success: credits the reload exactly as
/// `purchases::capture_succeeded` does (SUCCEEDED, credits, PAID invoice), and in the
/// same transaction the reload state goes back to IDLE with no failures and
/// `last_reload_at = now`. Idempotent: a purchase already SUCCEEDED is returned
/// unchanged; a FAILED one is INVALID_INPUT.
pub async fn reload_succeeded(
    db: &DatabaseConnection,
    purchase_id: Uuid,
    gateway_charge_id: &str,
    now: DateTime<Utc>,
) -> Result<purchase_rows::Model> {
    purchases::capture_succeeded(db, purchase_id, gateway_charge_id, now).await
}

/// The capture job's failure: the purchase becomes FAILED with `reason` (nothing is
/// credited) and, in the same transaction, the reload counts one more consecutive
/// failure, keeps the reason, backs off ([`backoff`]) and goes back to IDLE, or to
/// DISABLED_AFTER_FAILURES at [`CONSECUTIVE_FAILURES_MAX`]. The admins get a
/// ReloadFailed notification for every failure and an AutoReloadDisabled one when it
/// turns off. `permanent` is false for a gateway outage (retries used up): it backs
/// off but never turns auto-reload off, since the card is not at fault.
/// Idempotent: a purchase already FAILED is returned unchanged; a SUCCEEDED one is
/// INVALID_INPUT.
pub async fn reload_failed(
    db: &DatabaseConnection,
    purchase_id: Uuid,
    reason: &str,
    permanent: bool,
    now: DateTime<Utc>,
) -> Result<purchase_rows::Model> {
    purchases::fail_purchase_with(db, purchase_id, reason, permanent, now).await
}

/// The worker's sweep: puts right workspaces left RELOADING although no AUTO_RELOAD
/// purchase of theirs is PENDING any more (its outcome was recorded without the
/// reload bookkeeping, e.g. by a crash between steps, or an older code path). The
/// latest reload purchase decides: SUCCEEDED → IDLE as after a success; FAILED →
/// counted as a failure (as [`reload_failed`], permanent); none → IDLE. One
/// transaction per workspace, holding its row lock, so no debit can start a new
/// reload in between. Returns how many were repaired.
pub async fn repair_stuck_reloads(db: &DatabaseConnection, now: DateTime<Utc>) -> Result<u64> {
    use auto_reload_settings::Column as S;
    let stuck: Vec<Uuid> = auto_reload_settings::Entity::find()
        .select_only()
        .column(S::WorkspaceId)
        .filter(S::Status.eq(AutoReloadStatus::Reloading))
        .limit(REPAIR_BATCH_MAX)
        .into_tuple()
        .all(db)
        .await?;
    let mut repaired = 0;
    for workspace_id in stuck {
        if repair_one(db, workspace_id, now).await? {
            repaired += 1;
        }
    }
    Ok(repaired)
}

async fn repair_one(
    db: &DatabaseConnection,
    workspace_id: Uuid,
    now: DateTime<Utc>,
) -> Result<bool> {
    use purchase_rows::Column as P;
    let tx = begin_write(db).await?;
    // The debit path's first lock: no reload can start while this runs.
    workspaces::Entity::find_by_id(workspace_id)
        .lock_exclusive()
        .one(&tx)
        .await?;
    let settings = auto_reload_settings::Entity::find_by_id(workspace_id)
        .lock_exclusive()
        .one(&tx)
        .await?;
    if settings.is_none_or(|s| s.status != AutoReloadStatus::Reloading) {
        tx.rollback().await?;
        return Ok(false);
    }
    let latest = purchase_rows::Entity::find()
        .filter(P::WorkspaceId.eq(workspace_id))
        .filter(P::Source.eq(PurchaseSource::AutoReload))
        .order_by_desc(P::CreatedAt)
        .order_by_desc(P::Id)
        .one(&tx)
        .await?;
    let pending = purchase_rows::Entity::find()
        .filter(P::WorkspaceId.eq(workspace_id))
        .filter(P::Source.eq(PurchaseSource::AutoReload))
        .filter(P::Status.eq(PurchaseStatus::Pending))
        .one(&tx)
        .await?;
    if pending.is_some() {
        // In flight: the capture job (or the sweep that re-enqueues it) owns it.
        tx.rollback().await?;
        return Ok(false);
    }
    match latest {
        Some(p) if p.status == PurchaseStatus::Succeeded => {
            mark_reloaded(&tx, workspace_id, p.completed_at.unwrap_or(now), now).await?;
        }
        Some(p)
            if matches!(
                p.status,
                PurchaseStatus::Failed | PurchaseStatus::RequiresAction
            ) =>
        {
            on_reload_failed(&tx, &p, true, now).await?;
        }
        _ => {
            use auto_reload_settings::Column as S;
            auto_reload_settings::Entity::update_many()
                .col_expr(S::Status, Expr::value(AutoReloadStatus::Idle.as_str()))
                .col_expr(S::UpdatedAt, Expr::value(now))
                .filter(S::WorkspaceId.eq(workspace_id))
                .filter(S::Status.eq(AutoReloadStatus::Reloading))
                .exec(&tx)
                .await?;
        }
    }
    tx.commit().await?;
    tracing::warn!(%workspace_id, "repaired an auto-reload left RELOADING");
    Ok(true)
}
