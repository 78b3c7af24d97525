//! The debit engine: the one path every usage record, hold, settlement, release and
//! expiry takes, whether it arrives alone or in a group-committed batch.
//!
//! A batch runs in four steps, each in its own module:
//! 1. [`load`]: `BEGIN`, then the rows the batch needs, locked in the global order
//!    (reservations, workspaces, projects, by id), and the prices, discounts,
//!    memberships and request ids already used.
//! 2. [`rules`]: every operation judged in arrival order against that state, in
//!    memory, with no I/O: admitted (and the state moved on) or refused (and the
//!    state untouched). These functions are the only place the money rules of
//!    debits live.
//! 3. [`write`]: the decided rows written with a few set-based statements.
//! 4. `COMMIT`, then each caller is answered.
//!
//! The per-call functions (`usage::record_usage`, `reservations::settle`, ...) are a
//! batch of one through [`run_one`]; the writer's lanes call [`apply_batch`].

#![deny(clippy::arithmetic_side_effects)]

mod load;
mod load_pg;
mod posting;
pub(crate) mod rules;
mod write;
mod write_pg;

use crate::accounts::TAG_LEN_MAX;
use crate::catalog::MODEL_ID_LEN_MAX;
use crate::db::begin_write;
use crate::debits::reservations::{self, ReserveRequest, Settled};
use crate::debits::usage::{self, ProjectRef, Recorded, UsageRequest};
use crate::error::{BillingError, Result};
use crate::ids::IdempotencyKey;
use crate::jobs::{CapturePurchase, DeliverNotification, JobSink};
use chrono::{DateTime, Utc};
use entity::enums::ReservationStatus;
use entity::reservations as reservation_rows;
use sea_orm::DatabaseConnection;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use uuid::Uuid;

/// Settle a reservation at its actual token counts.
#[derive(Clone, Debug)]
pub struct SettleRequest {
    pub reservation_id: Uuid,
    /// The reservation's workspace (which writer lane it goes to).
    pub workspace_id: Uuid,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// One operation of a batch, validated and fingerprinted (see [`Op::usage`]).
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Usage {
        req: UsageRequest,
        hash: String,
    },
    Reserve {
        req: ReserveRequest,
        hash: String,
    },
    Settle(SettleRequest),
    /// HELD → RELEASED (a caller's release) or HELD → EXPIRED (the sweep).
    Release {
        reservation_id: Uuid,
        to: ReservationStatus,
    },
}

impl Op {
    /// Checks what can be checked without the database, so a malformed request never
    /// reaches a batch, and fingerprints it for replays.
    pub(crate) fn usage(req: UsageRequest) -> Result<Self> {
        IdempotencyKey::parse("requestId", &req.request_id)?;
        check_names(&req.model_id, &req.project)?;
        let hash = usage::usage_hash(&req);
        Ok(Self::Usage { req, hash })
    }

    pub(crate) fn reserve(req: ReserveRequest) -> Result<Self> {
        IdempotencyKey::parse("requestId", &req.request_id)?;
        check_names(&req.model_id, &req.project)?;
        reservations::check_ttl(req.ttl_seconds)?;
        let hash = reservations::reserve_hash(&req);
        Ok(Self::Reserve { req, hash })
    }
}

/// A model id or project tag that no row can have (too long, or with control
/// characters such as NUL, which PostgreSQL cannot even compare) is INVALID_INPUT
/// naming the field, the same on both backends, before any lookup.
fn check_names(model_id: &str, project: &ProjectRef) -> Result<()> {
    let bad = |field: &str, value: &str, max: usize| {
        (value.len() > max || value.chars().any(char::is_control)).then(|| {
            BillingError::invalid(format!(
                "{field} must be at most {max} characters, without control characters"
            ))
        })
    };
    if let Some(e) = bad("modelId", model_id, MODEL_ID_LEN_MAX) {
        return Err(e);
    }
    match project {
        ProjectRef::Tag(tag) => bad("projectTag", tag, TAG_LEN_MAX).map_or(Ok(()), Err),
        _ => Ok(()),
    }
}

/// The answer to one operation.
#[derive(Debug)]
pub(crate) enum Reply {
    Usage(Result<Recorded>),
    Reserve(Result<reservation_rows::Model>),
    Settle(Box<Result<Settled>>),
    Release(Result<reservation_rows::Model>),
}

impl Reply {
    pub(crate) fn refused(op: &Op, e: BillingError) -> Self {
        match op {
            Op::Usage { .. } => Self::Usage(Err(e)),
            Op::Reserve { .. } => Self::Reserve(Err(e)),
            Op::Settle(_) => Self::Settle(Box::new(Err(e))),
            Op::Release { .. } => Self::Release(Err(e)),
        }
    }

    /// Gives a usage event this batch recorded the id of the ledger transaction that
    /// posted it, as its row has it.
    fn stamp_posting(&mut self, posted: &HashMap<Uuid, i64>) {
        let event = match self {
            Self::Usage(Ok(recorded)) => &mut recorded.event,
            Self::Settle(settled) => match settled.as_mut() {
                Ok(settled) => &mut settled.event,
                Err(_) => return,
            },
            _ => return,
        };
        if let Some(id) = posted.get(&event.id) {
            event.ledger_transaction_id = Some(*id);
        }
    }

    pub(crate) fn into_usage(self) -> Result<Recorded> {
        match self {
            Self::Usage(r) => r,
            other => Err(mismatch(&other)),
        }
    }

    pub(crate) fn into_reserve(self) -> Result<reservation_rows::Model> {
        match self {
            Self::Reserve(r) => r,
            other => Err(mismatch(&other)),
        }
    }

    pub(crate) fn into_settle(self) -> Result<Settled> {
        match self {
            Self::Settle(r) => *r,
            other => Err(mismatch(&other)),
        }
    }

    pub(crate) fn into_release(self) -> Result<reservation_rows::Model> {
        match self {
            Self::Release(r) => r,
            other => Err(mismatch(&other)),
        }
    }
}

fn mismatch(reply: &Reply) -> BillingError {
    BillingError::Internal(format!("debit engine answered with {reply:?}"))
}

/// Cumulative counters of a process's debit engine, for `/metrics` and the
/// benchmarks' profile: where a batch's time goes.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub batches: AtomicU64,
    pub ops: AtomicU64,
    /// Batches that failed as a whole (their operations were re-run one by one).
    pub batches_failed: AtomicU64,
    /// BEGIN and the locked reads.
    pub load_us: AtomicU64,
    /// Judging the operations in memory.
    pub judge_us: AtomicU64,
    /// The INSERTs and UPDATEs, the auto-reload and alert checks, the balance events.
    pub write_us: AtomicU64,
    /// COMMIT (the WAL flush).
    pub commit_us: AtomicU64,
}

fn add_us(counter: &AtomicU64, since: std::time::Instant) -> std::time::Instant {
    let now = std::time::Instant::now();
    let us = u64::try_from(now.duration_since(since).as_micros()).unwrap_or(u64::MAX);
    counter.fetch_add(us, Ordering::Relaxed);
    now
}

/// Work to hand to the queue after the commit.
#[derive(Debug, Default)]
pub(crate) struct FollowUp {
    pub purchases: Vec<Uuid>,
    pub notifications: Vec<Uuid>,
    pub webhook_deliveries: Vec<Uuid>,
}

impl FollowUp {
    /// Pushes the jobs. A failed push loses nothing: the rows are PENDING and the
    /// worker's sweep enqueues them.
    pub(crate) async fn push(self, jobs: &dyn JobSink) {
        for purchase_id in self.purchases {
            if let Err(e) = jobs.capture(CapturePurchase { purchase_id }).await {
                tracing::warn!(%purchase_id, error = %e, "capture job not pushed");
            }
        }
        for notification_id in self.notifications {
            if let Err(e) = jobs.deliver(DeliverNotification { notification_id }).await {
                tracing::warn!(%notification_id, error = %e, "delivery job not pushed");
            }
        }
        crate::webhooks::delivery::push(jobs, self.webhook_deliveries).await;
    }
}

/// Applies a batch in one transaction. On Ok it has committed, and the replies are
/// in the operations' order. On Err nothing of it was written (or, if COMMIT itself
/// failed, it may have been: every operation is idempotent, so re-running each alone
/// answers with its replay).
pub(crate) async fn apply_batch(
    db: &DatabaseConnection,
    batch: &[(Op, DateTime<Utc>)],
    stats: &WriterStats,
) -> Result<(Vec<Reply>, FollowUp)> {
    apply_batch_signalling(db, batch, stats, Locked::default()).await
}

/// Told once a batch holds its locks (or has failed before taking them): the writer
/// starts the next batch of the lane then, so the next one queues behind these locks
/// and operations are judged in arrival order.
#[derive(Default)]
pub(crate) struct Locked(Option<tokio::sync::oneshot::Sender<()>>);

impl Locked {
    pub(crate) fn new(signal: tokio::sync::oneshot::Sender<()>) -> Self {
        Self(Some(signal))
    }

    fn tell(&mut self) {
        if let Some(signal) = self.0.take() {
            // The lane may have stopped waiting; nothing to tell then.
            let _ = signal.send(());
        }
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        self.tell();
    }
}

/// [`apply_batch`], telling `locked` when the batch's rows are locked.
pub(crate) async fn apply_batch_signalling(
    db: &DatabaseConnection,
    batch: &[(Op, DateTime<Utc>)],
    stats: &WriterStats,
    mut locked: Locked,
) -> Result<(Vec<Reply>, FollowUp)> {
    let started = std::time::Instant::now();
    let tx = begin_write(db).await?;
    let mut state = load::load(&tx, batch.iter().map(|(op, _)| op)).await?;
    locked.tell();
    let loaded_at = add_us(&stats.load_us, started);
    let mut writes = rules::Writes::default();
    let mut replies: Vec<Reply> = batch
        .iter()
        .map(|(op, now)| {
            rules::judge(&mut state, &mut writes, op, *now)
                .unwrap_or_else(|e| Reply::refused(op, e))
        })
        .collect();
    let judged_at = add_us(&stats.judge_us, loaded_at);
    let (follow_up, posted) = write::write(&tx, &mut state, writes).await?;
    for reply in &mut replies {
        reply.stamp_posting(&posted);
    }
    let written_at = add_us(&stats.write_us, judged_at);
    tx.commit().await?;
    add_us(&stats.commit_us, written_at);
    Ok((replies, follow_up))
}

/// One operation as a batch of its own, for callers without a writer (and for the
/// writer's retries of a failed batch). After the commit, the jobs of the work it
/// wrote (reload purchases, alert e-mails, webhook deliveries) are pushed to `jobs` by
/// the writer's own rule ([`FollowUp::push`]). Without a sink (the per-call functions:
/// tests, tools, seeds) nothing is pushed: the rows are durable and the worker's sweep
/// enqueues them.
///
/// A unique-key violation means another process committed the same request id while
/// this batch waited for its locks (its read came from an earlier snapshot, see
/// `load_pg`): the next attempt sees that row and answers the replay.
pub(crate) async fn run_one(
    db: &DatabaseConnection,
    op: Op,
    now: DateTime<Utc>,
    jobs: Option<&dyn JobSink>,
) -> Result<Reply> {
    let batch = [(op, now)];
    let mut attempts = 0_u32;
    let (mut replies, follow_up) = loop {
        match apply_batch(db, &batch, &WriterStats::default()).await {
            Err(e) if e.is_unique_violation() && attempts < RACE_RETRIES_MAX => {
                attempts = attempts.saturating_add(1);
            }
            other => break other?,
        }
    };
    if let Some(jobs) = jobs {
        follow_up.push(jobs).await;
    }
    replies
        .pop()
        .ok_or_else(|| BillingError::Internal("debit engine gave no answer".into()))
}

/// Attempts after a lost race on a request id (each sees what the previous lost to).
const RACE_RETRIES_MAX: u32 = 2;
