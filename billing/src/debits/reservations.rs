//! Reservations: hold the worst-case cost of a call in flight, then settle it at the
//! actual cost, release it, or let it expire.
//!
//! A hold raises the workspace's `reserved` (and the project's held budget) without
//! touching the balance or the ledger: `available = balance - reserved`. Settling
//! frees the hold and debits the actual cost; a cost above what is available after
//! freeing the hold (the only way past zero) is charged down to zero and the rest is
//! recorded as shortfall, on the usage event and in the ledger. Other reservations'
//! holds stay covered: `0 <= reserved <= balance` always holds.

use crate::db::begin_write;
use crate::error::{BillingError, Result};
use crate::ids::{IdempotencyKey, new_id, opt_uuid_str, request_hash};
use crate::ledger::{self, EntrySpec, Guard, LedgerAccount, PostingRefs, system_account};
use crate::money::Credits;
use crate::debits::usage::{self, ProjectRef, charge_project, pricing_context, usage_description};
use chrono::{DateTime, Duration, Utc};
use entity::enums::{BalanceChangeCause, LedgerEntryKind, ReservationStatus};
use entity::{projects, reservations, usage_events};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait, DatabaseConnection, DatabaseTransaction, EntityTrait,
    IntoActiveModel, QueryFilter, QueryOrder, QuerySelect,
};
use uuid::Uuid;

/// Bounds on a hold's lifetime: long enough for a slow completion, short enough that
/// a crashed gateway does not freeze credits for long.
pub const TTL_SECONDS_MIN: i64 = 1;
pub const TTL_SECONDS_MAX: i64 = 86_400;
/// Reservations expired per sweep transaction batch.
pub const EXPIRE_BATCH_MAX: u64 = 500;

#[derive(Clone, Debug)]
pub struct ReserveRequest {
    pub workspace_id: Uuid,
    pub project: ProjectRef,
    pub model_id: String,
    pub max_prompt_tokens: i64,
    pub max_completion_tokens: i64,
    pub request_id: String,
    pub ttl_seconds: i64,
    pub user_id: Option<Uuid>,
    pub api_key_id: Option<Uuid>,
}

/// The request as sent (see `usage_hash`): a retry is recognised before any lookup.
pub(crate) fn reserve_hash(req: &ReserveRequest) -> String {
    request_hash(&[
        "reserve",
        &req.model_id,
        &req.max_prompt_tokens.to_string(),
        &req.max_completion_tokens.to_string(),
        &req.ttl_seconds.to_string(),
        &req.project.fingerprint(),
        &opt_uuid_str(req.user_id),
    ])
}

async fn existing_reservation(
    db: &DatabaseConnection,
    workspace_id: Uuid,
    request_id: &str,
    hash: &str,
) -> Result<Option<reservations::Model>> {
    let found = reservations::Entity::find()
        .filter(reservations::Column::WorkspaceId.eq(workspace_id))
        .filter(reservations::Column::RequestId.eq(request_id))
        .one(db)
        .await?;
    match found {
        Some(r) if r.request_hash == hash => Ok(Some(r)),
        Some(_) => Err(BillingError::IdempotencyConflict),
        None => Ok(None),
    }
}

pub(crate) fn check_ttl(ttl_seconds: i64) -> Result<()> {
    if !(TTL_SECONDS_MIN..=TTL_SECONDS_MAX).contains(&ttl_seconds) {
        return Err(BillingError::invalid(format!(
            "ttlSeconds must be between {TTL_SECONDS_MIN} and {TTL_SECONDS_MAX}"
        )));
    }
    Ok(())
}

/// Holds the worst-case cost (max tokens at current prices, after discount) against
/// the workspace's available credits and the project's budget. Idempotent on the
/// request id.
pub async fn reserve(
    db: &DatabaseConnection,
    req: ReserveRequest,
    now: DateTime<Utc>,
) -> Result<reservations::Model> {
    let request_id = IdempotencyKey::parse("requestId", &req.request_id)?;
    check_ttl(req.ttl_seconds)?;
    let hash = reserve_hash(&req);
    if let Some(r) = existing_reservation(db, req.workspace_id, request_id.as_str(), &hash).await? {
        return Ok(r);
    }
    // A request id already recorded as direct usage cannot be held and settled again:
    // refuse now rather than strand a hold whose settlement must conflict.
    let recorded = usage_events::Entity::find()
        .filter(usage_events::Column::WorkspaceId.eq(req.workspace_id))
        .filter(usage_events::Column::RequestId.eq(request_id.as_str()))
        .one(db)
        .await?;
    if recorded.is_some() {
        return Err(BillingError::IdempotencyConflict);
    }
    let ctx = pricing_context(db, req.workspace_id, &req.model_id, &req.project).await?;
    usage::check_attributed_user(db, ctx.account_id, req.user_id).await?;
    let hold = ctx
        .cost(req.max_prompt_tokens, req.max_completion_tokens)?
        .total;
    let project_id = ctx.project.as_ref().map(|p| p.id);
    let reservation = reservations::Model {
        id: new_id(),
        workspace_id: req.workspace_id,
        project_id,
        user_id: req.user_id,
        api_key_id: req.api_key_id,
        model_id: ctx.model.id.clone(),
        request_id: request_id.as_str().to_owned(),
        request_hash: hash.clone(),
        amount_nanos: hold.nanos(),
        status: ReservationStatus::Held,
        expires_at: now + Duration::seconds(req.ttl_seconds),
        usage_event_id: None,
        created_at: now,
        resolved_at: None,
    };
    let tx = begin_write(db).await?;
    let result: Result<()> = async {
        let ws = ledger::change_workspace(
            &tx,
            req.workspace_id,
            Credits::ZERO,
            hold,
            Guard::AvailableAtLeast(hold),
            true,
        )
        .await?;
        let Some(ws) = ws else {
            let ws = ledger::load_workspace(&tx, req.workspace_id).await?;
            return Err(BillingError::InsufficientCredits {
                available: ledger::available(&ws),
            });
        };
        if let Some(project) = &ctx.project {
            charge_project(&tx, project, Credits::ZERO, hold, Some(hold), now).await?;
        }
        reservations::Entity::insert(reservation.clone().into_active_model().reset_all())
            .exec_without_returning(&tx)
            .await?;
        ledger::balance_event(&tx, &ws, BalanceChangeCause::Reservation, now).await?;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            tx.commit().await?;
            Ok(reservation)
        }
        Err(e) => {
            tx.rollback().await?;
            if e.is_unique_violation()
                && let Some(r) =
                    existing_reservation(db, req.workspace_id, request_id.as_str(), &hash).await?
            {
                return Ok(r);
            }
            Err(e)
        }
    }
}

pub async fn load_reservation(db: &DatabaseConnection, id: Uuid) -> Result<reservations::Model> {
    reservations::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("reservation"))
}

/// The request fingerprint of a settlement (a retry with other counts conflicts).
pub(crate) fn settle_hash(
    reservation: &reservations::Model,
    prompt_tokens: i64,
    completion_tokens: i64,
) -> String {
    request_hash(&[
        "settle",
        &reservation.model_id,
        &prompt_tokens.to_string(),
        &completion_tokens.to_string(),
        &opt_uuid_str(reservation.project_id),
        &opt_uuid_str(reservation.user_id),
    ])
}

/// The settlement of a reservation: its usage event.
#[derive(Clone, Debug)]
pub struct Settled {
    pub event: usage_events::Model,
    pub reservation: reservations::Model,
    pub replayed: bool,
}

/// Settles a HELD reservation at its actual token counts: frees the hold and debits
/// the actual cost, which may exceed the hold. Settling again with the same counts
/// returns the same usage event; with other counts it is IDEMPOTENCY_CONFLICT.
pub async fn settle(
    db: &DatabaseConnection,
    reservation_id: Uuid,
    prompt_tokens: i64,
    completion_tokens: i64,
    now: DateTime<Utc>,
) -> Result<Settled> {
    let reservation = load_reservation(db, reservation_id).await?;
    let hash = settle_hash(&reservation, prompt_tokens, completion_tokens);
    // A HELD reservation is settled against its hold. An EXPIRED one (the call outlived
    // its TTL) is still settled: the usage happened and must be recorded; its hold was
    // already given back, so it is charged from what is available now.
    if !matches!(
        reservation.status,
        ReservationStatus::Held | ReservationStatus::Expired
    ) {
        return settled_replay(db, reservation, &hash).await;
    }
    // The model may have been deactivated since the hold; it is still priced.
    let model = entity::models::Entity::find_by_id(reservation.model_id.clone())
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("model"))?;
    let project = match reservation.project_id {
        Some(id) => projects::Entity::find_by_id(id).one(db).await?,
        None => None,
    };
    let workspace = ledger::load_workspace(db, reservation.workspace_id).await?;
    let discount = usage::account_discount(db, workspace.account_id).await?;
    let ctx = usage::PricingContext {
        account_id: workspace.account_id,
        discount,
        model,
        project,
    };
    let cost = ctx.cost(prompt_tokens, completion_tokens)?.total;
    let event_id = new_id();
    let tx = begin_write(db).await?;
    match settle_in(
        &tx,
        &ctx,
        &reservation,
        event_id,
        prompt_tokens,
        completion_tokens,
        cost,
        hash.clone(),
        now,
    )
    .await
    {
        Ok(Some(settled)) => {
            tx.commit().await?;
            Ok(settled)
        }
        Ok(None) => {
            // Someone else resolved it between our read and our write.
            tx.rollback().await?;
            let reservation = load_reservation(db, reservation_id).await?;
            settled_replay(db, reservation, &hash).await
        }
        Err(e) => {
            tx.rollback().await?;
            Err(e)
        }
    }
}

async fn settled_replay(
    db: &DatabaseConnection,
    reservation: reservations::Model,
    hash: &str,
) -> Result<Settled> {
    match (reservation.status, reservation.usage_event_id) {
        (ReservationStatus::Settled, Some(event_id)) => {
            let event = usage_events::Entity::find_by_id(event_id)
                .one(db)
                .await?
                .ok_or_else(|| {
                    BillingError::Internal("settled reservation without usage event".into())
                })?;
            if event.request_hash != hash {
                return Err(BillingError::IdempotencyConflict);
            }
            Ok(Settled {
                event,
                reservation,
                replayed: true,
            })
        }
        (status, _) => Err(BillingError::invalid(format!(
            "reservation is {}; only a HELD reservation can be settled",
            status.as_str()
        ))),
    }
}

#[allow(clippy::too_many_arguments)]
async fn settle_in(
    tx: &DatabaseTransaction,
    ctx: &usage::PricingContext,
    reservation: &reservations::Model,
    event_id: Uuid,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost: Credits,
    hash: String,
    now: DateTime<Utc>,
) -> Result<Option<Settled>> {
    let from = reservation.status;
    let hold = match from {
        ReservationStatus::Held => Credits::from_nanos(reservation.amount_nanos),
        _ => Credits::ZERO,
    };
    // Claim the reservation first (HELD/EXPIRED -> SETTLED, conditional): whoever flips it owns
    // the hold. Every path locks the reservation row before the workspace row, and the
    // workspace row before the project row, so racing settle/release cannot deadlock.
    let resolved = reservations::Entity::update_many()
        .col_expr(
            reservations::Column::Status,
            Expr::value(ReservationStatus::Settled.as_str()),
        )
        .col_expr(reservations::Column::UsageEventId, Expr::value(event_id))
        .col_expr(reservations::Column::ResolvedAt, Expr::value(now))
        .filter(reservations::Column::Id.eq(reservation.id))
        .filter(reservations::Column::Status.eq(from))
        .exec_with_returning(tx)
        .await?
        .pop();
    let Some(resolved) = resolved else {
        return Ok(None);
    };
    // Free the hold, then charge what is available: the cost, or all that is left.
    let freed = ledger::change_workspace(
        tx,
        reservation.workspace_id,
        Credits::ZERO,
        hold.checked_neg()?,
        Guard::None,
        false,
    )
    .await?
    .ok_or(BillingError::NotFound("workspace"))?;
    let charge = cost.min(ledger::available(&freed));
    let shortfall = cost.checked_sub(charge)?;
    let ws = ledger::change_workspace(
        tx,
        reservation.workspace_id,
        charge.checked_neg()?,
        Credits::ZERO,
        Guard::AvailableAtLeast(charge),
        true,
    )
    .await?
    .ok_or_else(|| BillingError::Internal("available credits changed under the row lock".into()))?;
    if let Some(project) = &ctx.project {
        charge_project(tx, project, cost, hold.checked_neg()?, None, now).await?;
    }
    let event = usage_events::Model {
        id: event_id,
        workspace_id: reservation.workspace_id,
        project_id: reservation.project_id,
        user_id: reservation.user_id,
        api_key_id: reservation.api_key_id,
        model_id: reservation.model_id.clone(),
        prompt_tokens,
        completion_tokens,
        cost_nanos: cost.nanos(),
        shortfall_nanos: shortfall.nanos(),
        request_id: reservation.request_id.clone(),
        request_hash: hash,
        reservation_id: Some(reservation.id),
        created_at: now,
    };
    usage_events::Entity::insert(event.clone().into_active_model().reset_all())
        .exec_without_returning(tx)
        .await
        .map_err(|e| {
            if crate::error::is_unique_violation(&e) {
                // The request id was already used by a direct recordUsage.
                BillingError::IdempotencyConflict
            } else {
                e.into()
            }
        })?;
    let description = usage_description(&event);
    let mut entries = vec![
        EntrySpec {
            account: LedgerAccount::Workspace(reservation.workspace_id),
            kind: LedgerEntryKind::Usage,
            amount: charge.checked_neg()?,
            balance_after: Some(Credits::from_nanos(ws.balance_nanos)),
            description: description.clone(),
        },
        EntrySpec {
            account: LedgerAccount::System(system_account::USAGE_REVENUE),
            kind: LedgerEntryKind::Usage,
            amount: cost,
            balance_after: None,
            description: description.clone(),
        },
    ];
    if !shortfall.is_zero() {
        entries.push(EntrySpec {
            account: LedgerAccount::System(system_account::USAGE_SHORTFALL),
            kind: LedgerEntryKind::Usage,
            amount: shortfall.checked_neg()?,
            balance_after: None,
            description: format!("uncollected: {description}"),
        });
    }
    ledger::post(
        tx,
        "USAGE",
        format!("usage:{event_id}"),
        PostingRefs {
            usage_event_id: Some(event_id),
            ..Default::default()
        },
        &entries,
        now,
    )
    .await?;
    ledger::add_to_rollup(tx, &event).await?;
    ledger::balance_event(tx, &ws, BalanceChangeCause::Usage, now).await?;
    crate::policies::auto_reload::after_balance_change(tx, &ws, now).await?;
    crate::policies::alerts::after_balance_change(tx, &ws, now).await?;
    Ok(Some(Settled {
        event,
        reservation: resolved,
        replayed: false,
    }))
}

/// Releases a HELD reservation without charging it. Releasing a released or expired
/// reservation returns it unchanged; a settled one cannot be released.
pub async fn release(
    db: &DatabaseConnection,
    reservation_id: Uuid,
    now: DateTime<Utc>,
) -> Result<reservations::Model> {
    let reservation = load_reservation(db, reservation_id).await?;
    if let Some(done) = resolved_for_release(reservation.clone())? {
        return Ok(done);
    }
    match free_hold(db, &reservation, ReservationStatus::Released, now).await? {
        Some(r) => Ok(r),
        None => {
            resolved_for_release(load_reservation(db, reservation_id).await?)?.ok_or_else(|| {
                BillingError::Internal("reservation still held after losing a race".into())
            })
        }
    }
}

fn resolved_for_release(r: reservations::Model) -> Result<Option<reservations::Model>> {
    match r.status {
        ReservationStatus::Held => Ok(None),
        ReservationStatus::Released | ReservationStatus::Expired => Ok(Some(r)),
        ReservationStatus::Settled => Err(BillingError::invalid("reservation is already settled")),
    }
}

/// HELD -> `status` and the hold given back, in one transaction; None if it was no
/// longer HELD. Locks the reservation row, then the workspace row, as settlement does.
async fn free_hold(
    db: &DatabaseConnection,
    reservation: &reservations::Model,
    status: ReservationStatus,
    now: DateTime<Utc>,
) -> Result<Option<reservations::Model>> {
    let hold = Credits::from_nanos(reservation.amount_nanos);
    let tx = begin_write(db).await?;
    let resolved = reservations::Entity::update_many()
        .col_expr(reservations::Column::Status, Expr::value(status.as_str()))
        .col_expr(reservations::Column::ResolvedAt, Expr::value(now))
        .filter(reservations::Column::Id.eq(reservation.id))
        .filter(reservations::Column::Status.eq(ReservationStatus::Held))
        .exec_with_returning(&tx)
        .await?
        .pop();
    let Some(resolved) = resolved else {
        tx.rollback().await?;
        return Ok(None);
    };
    let ws = ledger::change_workspace(
        &tx,
        reservation.workspace_id,
        Credits::ZERO,
        hold.checked_neg()?,
        Guard::None,
        true,
    )
    .await?
    .ok_or(BillingError::NotFound("workspace"))?;
    if let Some(project_id) = resolved.project_id {
        let project = projects::Entity::find_by_id(project_id)
            .one(&tx)
            .await?
            .ok_or(BillingError::NotFound("project"))?;
        charge_project(&tx, &project, Credits::ZERO, hold.checked_neg()?, None, now).await?;
    }
    ledger::balance_event(&tx, &ws, BalanceChangeCause::Release, now).await?;
    tx.commit().await?;
    Ok(Some(resolved))
}

/// Expires HELD reservations past their TTL (the worker's sweep). Returns how many.
pub async fn expire_due(db: &DatabaseConnection, now: DateTime<Utc>) -> Result<u64> {
    let due = reservations::Entity::find()
        .filter(reservations::Column::Status.eq(ReservationStatus::Held))
        .filter(reservations::Column::ExpiresAt.lt(now))
        .order_by_asc(reservations::Column::ExpiresAt)
        .limit(EXPIRE_BATCH_MAX)
        .all(db)
        .await?;
    let mut expired = 0;
    for reservation in due {
        if free_hold(db, &reservation, ReservationStatus::Expired, now)
            .await?
            .is_some()
        {
            expired += 1;
        }
    }
    Ok(expired)
}
