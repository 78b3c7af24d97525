//! The debit engine: the one path every usage record, hold, settlement, release and
//! expiry takes, whether it arrives alone or in a group-committed batch.
//!
//! A batch runs in four steps, each in its own module:
//! 1. [`load`]: `BEGIN`, then the rows the batch needs, locked in the global order
//!    (reservations, workspaces, projects, by id), and the prices, discounts,
//!    memberships and request ids already used (prices, discounts and policy rows from
//!    the writer's [`cache`] where it holds them at the version the batch reads).
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

pub mod cache;
mod load;
mod load_pg;
mod load_sqlite;
mod overlay;
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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::oneshot;
use uuid::Uuid;

pub use cache::ConfigCache;
pub(crate) use overlay::Overlay;

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
    /// Speculative batches waiting, once judged, for the previous batch's commit
    /// before they write.
    pub wait_us: AtomicU64,
    /// Batches judged speculatively, on the previous batch's overlay.
    pub speculations: AtomicU64,
    /// Speculative batches that failed and ran again under their locks.
    pub speculations_failed: AtomicU64,
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
    apply_batch_piped(db, batch, stats, Pipe::default(), None).await
}

/// What a lane's batch gets from the batch before it and owes the one after it.
///
/// The lane starts its next batch when this one tells `next`: after taking its locks
/// (without pipelining: the next batch's read queues behind them), or, pipelined,
/// after its write, handing over its [`Overlay`] so the next batch is read without
/// locks and judged while this one commits (see `overlay`). `committed` tells that
/// next batch whether the state it was judged on committed.
#[derive(Default)]
pub(crate) struct Pipe {
    /// The previous batch's overlay and the news of its commit (pipelined only).
    pub previous: Option<(Arc<Overlay>, oneshot::Receiver<bool>)>,
    pub next: Option<oneshot::Sender<Option<Arc<Overlay>>>>,
    pub committed: Option<oneshot::Sender<bool>>,
    pub pipelined: bool,
}

impl Pipe {
    fn tell_next(&mut self, overlay: Option<Overlay>) {
        if let Some(next) = self.next.take() {
            // The lane may have stopped waiting; nothing to tell then.
            let _ = next.send(overlay.map(Arc::new));
        }
    }
}

/// [`apply_batch`] in a lane's pipeline. A batch of usage records with the previous
/// batch's overlay runs speculatively; if that fails (a row moved, the previous batch
/// did not commit, a request id used meanwhile), it runs once more under its locks.
pub(crate) async fn apply_batch_piped(
    db: &DatabaseConnection,
    batch: &[(Op, DateTime<Utc>)],
    stats: &WriterStats,
    mut pipe: Pipe,
    cache: Option<&ConfigCache>,
) -> Result<(Vec<Reply>, FollowUp)> {
    let all_usage = batch.iter().all(|(op, _)| matches!(op, Op::Usage { .. }));
    let previous = pipe.previous.take().filter(|_| all_usage);
    if previous.is_none() {
        return attempt(db, batch, stats, (&mut pipe, cache), None).await;
    }
    match attempt(db, batch, stats, (&mut pipe, cache), previous).await {
        Err(e) if !e.is_unavailable() => {
            if pipe.next.is_none()
                && let Some(committed) = pipe.committed.take()
            {
                // The next batch was judged on what this try wrote: it did not commit.
                let _ = committed.send(false);
            }
            stats.speculations_failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, ops = batch.len(), "speculative debit batch run again under its locks");
            attempt(db, batch, stats, (&mut pipe, cache), None).await
        }
        other => other,
    }
}

/// One try at a batch: read (under locks, or from a snapshot with the previous
/// batch's overlay), judge, write, commit.
async fn attempt(
    db: &DatabaseConnection,
    batch: &[(Op, DateTime<Utc>)],
    stats: &WriterStats,
    (pipe, cache): (&mut Pipe, Option<&ConfigCache>),
    previous: Option<(Arc<Overlay>, oneshot::Receiver<bool>)>,
) -> Result<(Vec<Reply>, FollowUp)> {
    let started = std::time::Instant::now();
    let tx = begin_write(db).await?;
    let (mut state, waits_for) = read(&tx, batch, previous, cache).await?;
    if !pipe.pipelined {
        pipe.tell_next(None);
    }
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
    let judged_at = wait_for_previous(waits_for, stats, judged_at).await?;
    let created = pipe
        .next
        .is_some()
        .then(|| (writes.events.clone(), writes.new_reservations.clone()));
    let (follow_up, posted) = write::write(&tx, &mut state, writes).await?;
    if let Some((events, holds)) = created {
        pipe.tell_next(Some(Overlay::of(&state, events, holds, &posted)));
    }
    for reply in &mut replies {
        reply.stamp_posting(&posted);
    }
    let written_at = add_us(&stats.write_us, judged_at);
    tx.commit().await?;
    if let Some(committed) = pipe.committed.take() {
        let _ = committed.send(true);
    }
    add_us(&stats.commit_us, written_at);
    Ok((replies, follow_up))
}

/// A speculative batch, once judged, waits for the previous batch's commit before it
/// writes; it fails if that batch did not commit (it is then run again under its
/// locks). Waiting before the write, not only before the commit: PostgreSQL checks
/// an UPDATE's condition first against the row version in the statement's snapshot,
/// and a write statement that starts before the previous commit sees the row the
/// previous batch started from, fails `balance_sequence = <after it>` there, and
/// skips the row without waiting for its lock (3-5 % of pipelined batches ran twice
/// for that, docs/BENCHMARKS.md). After the commit, the statement's snapshot has it.
async fn wait_for_previous(
    waits_for: Option<oneshot::Receiver<bool>>,
    stats: &WriterStats,
    since: std::time::Instant,
) -> Result<std::time::Instant> {
    let Some(previous_committed) = waits_for else {
        return Ok(since);
    };
    stats.speculations.fetch_add(1, Ordering::Relaxed);
    let committed = previous_committed.await.unwrap_or(false);
    let now = add_us(&stats.wait_us, since);
    if !committed {
        return Err(BillingError::Internal(
            "the batch this one was judged after did not commit".into(),
        ));
    }
    Ok(now)
}

/// Step 1: the batch's state, and, when it was judged on the previous batch's
/// overlay, the news of that batch's commit to wait for before committing.
async fn read(
    tx: &sea_orm::DatabaseTransaction,
    batch: &[(Op, DateTime<Utc>)],
    previous: Option<(Arc<Overlay>, oneshot::Receiver<bool>)>,
    cache: Option<&ConfigCache>,
) -> Result<(rules::State, Option<oneshot::Receiver<bool>>)> {
    let ops = || batch.iter().map(|(op, _)| op);
    if let Some((overlay, committed)) = previous {
        let mut state = load::load(tx, ops(), false, cache).await?;
        if overlay.apply(&mut state) {
            return Ok((state, Some(committed)));
        }
        // Something else committed since the previous batch read: read again,
        // under the locks, in a new snapshot.
    }
    Ok((load::load(tx, ops(), true, cache).await?, None))
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
