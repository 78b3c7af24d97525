//! Capturing a purchase's payment: the rules the worker's capture job follows. The
//! job is thin: it loads the work with [`prepare`], calls the gateway, and hands the
//! outcome to [`apply`]. Every step is idempotent, so a job run twice (a retry, a
//! sweep re-enqueue, a restart after a crash) charges once (the gateway's idempotency
//! key is the purchase id) and credits once (the purchase's status guards it).

use crate::db::begin_write;
use crate::error::{BillingError, Result};
use crate::payments::purchases;
use crate::payments::{self, ChargeOutcome, ChargeRequest, GatewayError};
use chrono::{DateTime, Duration, Utc};
use entity::enums::PurchaseStatus;
use entity::purchases as purchase_rows;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ColumnTrait, DatabaseConnection, DatabaseTransaction, EntityTrait, QueryFilter};
use uuid::Uuid;

/// Charge attempts before a purchase whose gateway keeps failing transiently is FAILED.
pub const CAPTURE_ATTEMPTS_MAX: i32 = 5;
/// Backoff between transient failures: 2 s, 4 s, 8 s … capped here.
pub const CAPTURE_BACKOFF_MS_MAX: i64 = 60_000;

/// What the job must do next.
#[derive(Debug)]
pub enum Next {
    /// Nothing: the purchase is no longer PENDING (already captured or failed).
    Done,
    /// Charge this request.
    Charge(ChargeRequest),
}

/// Loads a purchase for capture. A purchase whose card was removed before it could be
/// charged fails here, without a charge.
pub async fn prepare(
    db: &DatabaseConnection,
    purchase_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Next> {
    let purchase = purchases::load_purchase(db, purchase_id).await?;
    if purchase.status != PurchaseStatus::Pending {
        return Ok(Next::Done);
    }
    let method = match purchase.payment_method_id {
        Some(id) => payments::cards::load_payment_method(db, id).await?,
        None => None,
    };
    let Some(method) = method.filter(|m| m.removed_at.is_none()) else {
        fail(
            db,
            &purchase,
            "the payment method was removed before the charge",
            now,
        )
        .await?;
        return Ok(Next::Done);
    };
    // Charged on the account's Customer: Stripe only lets a card that belongs to a
    // Customer be charged off-session more than once.
    let ws = crate::ledger::load_workspace(db, purchase.workspace_id).await?;
    let customer = entity::accounts::Entity::find_by_id(ws.account_id)
        .one(db)
        .await?
        .and_then(|a| a.gateway_customer_id);
    Ok(Next::Charge(ChargeRequest::for_purchase(
        &purchase, &method, customer,
    )?))
}

/// The job's verdict after applying an outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Settled one way or the other.
    Done,
    /// A transient failure: try again after this delay.
    RetryAfter(std::time::Duration),
}

/// Applies the gateway's answer: credit (SUCCEEDED, PAID invoice, receipt), fail with
/// the decline reason, end REQUIRES_ACTION (3-D Secure needed), or count a transient
/// failure and ask for a retry with backoff (FAILED once the attempts are used up).
pub async fn apply(
    db: &DatabaseConnection,
    purchase_id: Uuid,
    outcome: std::result::Result<ChargeOutcome, GatewayError>,
    now: DateTime<Utc>,
) -> Result<Verdict> {
    let purchase = purchases::load_purchase(db, purchase_id).await?;
    if purchase.status != PurchaseStatus::Pending {
        return Ok(Verdict::Done);
    }
    match outcome {
        Ok(outcome) => {
            settle(db, purchase_id, &outcome, now).await?;
            Ok(Verdict::Done)
        }
        Err(GatewayError::Invalid(reason)) => {
            fail(
                db,
                &purchase,
                &format!("refused by the gateway: {reason}"),
                now,
            )
            .await?;
            Ok(Verdict::Done)
        }
        Err(GatewayError::Transient(reason)) => {
            let attempts = count_attempt(db, purchase_id).await?;
            if attempts >= CAPTURE_ATTEMPTS_MAX {
                fail_transient(
                    db,
                    &purchase,
                    &format!("payment failed after {attempts} attempts: {reason}"),
                    now,
                )
                .await?;
                return Ok(Verdict::Done);
            }
            let backoff_ms = Ord::min(
                2_000i64 << (Ord::clamp(attempts, 1, 16) - 1),
                CAPTURE_BACKOFF_MS_MAX,
            );
            Ok(Verdict::RetryAfter(std::time::Duration::from_millis(
                backoff_ms.unsigned_abs(),
            )))
        }
    }
}

/// Applies a charge's outcome in one transaction. The capture job and the gateway's
/// webhooks both come here, so a purchase is settled by the same code whichever
/// answer arrives first; the other finds it settled and changes nothing.
pub async fn settle(
    db: &DatabaseConnection,
    purchase_id: Uuid,
    outcome: &ChargeOutcome,
    now: DateTime<Utc>,
) -> Result<Option<purchase_rows::Model>> {
    let tx = begin_write(db).await?;
    let settled = settle_in(&tx, purchase_id, outcome, now).await?;
    tx.commit().await?;
    Ok(settled)
}

/// [`settle`] inside the caller's transaction. None when the purchase was no longer
/// PENDING (nothing written).
pub(crate) async fn settle_in(
    tx: &DatabaseTransaction,
    purchase_id: Uuid,
    outcome: &ChargeOutcome,
    now: DateTime<Utc>,
) -> Result<Option<purchase_rows::Model>> {
    match outcome {
        ChargeOutcome::Succeeded { charge_id } => {
            purchases::capture_succeeded_in(tx, purchase_id, charge_id, now).await
        }
        ChargeOutcome::Declined { reason } => {
            purchases::fail_in(tx, purchase_id, &format!("declined: {reason}"), true, now).await
        }
        ChargeOutcome::RequiresAction { charge_id, reason } => {
            purchases::require_action_in(tx, purchase_id, charge_id.as_deref(), reason, now).await
        }
    }
}

async fn fail(
    db: &DatabaseConnection,
    purchase: &purchase_rows::Model,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    purchases::fail_purchase(db, purchase.id, reason, now).await?;
    Ok(())
}

/// Fails a purchase whose gateway kept failing transiently. Not the card's fault: an
/// auto-reload counts it as a failure but an outage never turns auto-reload off.
async fn fail_transient(
    db: &DatabaseConnection,
    purchase: &purchase_rows::Model,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    purchases::fail_purchase_with(db, purchase.id, reason, false, now).await?;
    Ok(())
}

/// Counts one transient failure on a PENDING purchase; returns the new count.
async fn count_attempt(db: &DatabaseConnection, purchase_id: Uuid) -> Result<i32> {
    let updated = purchase_rows::Entity::update_many()
        .col_expr(
            purchase_rows::Column::Attempts,
            Expr::col(purchase_rows::Column::Attempts).add(1),
        )
        .filter(purchase_rows::Column::Id.eq(purchase_id))
        .filter(purchase_rows::Column::Status.eq(PurchaseStatus::Pending))
        .exec_with_returning(db)
        .await?
        .pop()
        .ok_or(BillingError::NotFound("purchase"))?;
    Ok(updated.attempts)
}

/// PENDING purchases older than `grace` (the sweep re-enqueues them: a push lost after
/// a commit, or a worker that died mid-job).
pub async fn stale_pending(
    db: &DatabaseConnection,
    grace: Duration,
    now: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<Uuid>> {
    use sea_orm::{QueryOrder, QuerySelect};
    let rows = purchase_rows::Entity::find()
        .filter(purchase_rows::Column::Status.eq(PurchaseStatus::Pending))
        .filter(purchase_rows::Column::CreatedAt.lt(now - grace))
        .order_by_asc(purchase_rows::Column::CreatedAt)
        .limit(limit)
        .all(db)
        .await?;
    Ok(rows.into_iter().map(|p| p.id).collect())
}
