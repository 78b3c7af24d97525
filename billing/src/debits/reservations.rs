//! Reservations: reserve the worst-case cost of a call in flight, then settle it at the
//! actual cost, release it, or let it expire.
//!
//! A reservation's amount is reserved credits: it raises the workspace's `reserved`
//! (and the project's `budget_reserved`) without touching the balance or the ledger:
//! `available = balance - reserved`. Settling frees the reserved credits and debits the
//! actual cost; a cost above what is available after freeing them (the only way past
//! zero) is charged down to zero and the rest is recorded as shortfall, on the usage
//! event and in the ledger. Other reservations' reserved credits stay covered:
//! `0 <= reserved <= balance` always holds.

use crate::debits::engine::{self, Op, SettleRequest};
use crate::debits::usage::ProjectRef;
use crate::error::{BillingError, Result};
use crate::ids::{opt_uuid_str, request_hash};
use chrono::{DateTime, Utc};
use entity::enums::ReservationStatus;
use entity::{reservations, usage_events};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

/// Bounds on a reservation's lifetime: long enough for a slow completion, short enough that
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

pub(crate) fn check_ttl(ttl_seconds: i64) -> Result<()> {
    if !(TTL_SECONDS_MIN..=TTL_SECONDS_MAX).contains(&ttl_seconds) {
        return Err(BillingError::invalid(format!(
            "ttlSeconds must be between {TTL_SECONDS_MIN} and {TTL_SECONDS_MAX}"
        )));
    }
    Ok(())
}

/// Reserves the worst-case cost (max tokens at current prices, after discount) against
/// the workspace's available credits and the project's budget. Idempotent on the
/// request id.
pub async fn reserve(
    db: &DatabaseConnection,
    req: ReserveRequest,
    now: DateTime<Utc>,
) -> Result<reservations::Model> {
    engine::run_one(db, Op::reserve(req)?, now, None)
        .await?
        .into_reserve()
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

/// Settles a HELD reservation at its actual token counts: frees its reserved credits and
/// debits the actual cost, which may exceed them. Settling again with the same counts
/// returns the same usage event; with other counts it is IDEMPOTENCY_CONFLICT.
pub async fn settle(
    db: &DatabaseConnection,
    reservation_id: Uuid,
    prompt_tokens: i64,
    completion_tokens: i64,
    now: DateTime<Utc>,
) -> Result<Settled> {
    let workspace_id = load_reservation(db, reservation_id).await?.workspace_id;
    let req = SettleRequest {
        reservation_id,
        workspace_id,
        prompt_tokens,
        completion_tokens,
    };
    engine::run_one(db, Op::Settle(req), now, None)
        .await?
        .into_settle()
}

/// Releases a HELD reservation without charging it. Releasing a released or expired
/// reservation returns it unchanged; a settled one cannot be released.
pub async fn release(
    db: &DatabaseConnection,
    reservation_id: Uuid,
    now: DateTime<Utc>,
) -> Result<reservations::Model> {
    let op = Op::Release {
        reservation_id,
        to: ReservationStatus::Released,
    };
    engine::run_one(db, op, now, None).await?.into_release()
}

/// Expires HELD reservations past their TTL (the worker's sweep). Returns how many.
pub async fn expire_due(db: &DatabaseConnection, now: DateTime<Utc>) -> Result<u64> {
    let due: Vec<Uuid> = reservations::Entity::find()
        .select_only()
        .column(reservations::Column::Id)
        .filter(reservations::Column::Status.eq(ReservationStatus::Held))
        .filter(reservations::Column::ExpiresAt.lt(now))
        .order_by_asc(reservations::Column::ExpiresAt)
        .limit(EXPIRE_BATCH_MAX)
        .into_tuple()
        .all(db)
        .await?;
    // One batch: the engine locks them all in order and skips any that a settlement
    // or release resolved since they were read.
    let batch: Vec<_> = due
        .into_iter()
        .map(|reservation_id| {
            let to = ReservationStatus::Expired;
            (Op::Release { reservation_id, to }, now)
        })
        .collect();
    if batch.is_empty() {
        return Ok(0);
    }
    let stats = engine::WriterStats::default();
    let (replies, _) = engine::apply_batch(db, &batch, &stats).await?;
    let expired = replies
        .into_iter()
        .filter_map(|r| r.into_release().ok())
        .filter(|r| r.status == ReservationStatus::Expired && r.resolved_at == Some(now))
        .count();
    Ok(u64::try_from(expired).unwrap_or(u64::MAX))
}
