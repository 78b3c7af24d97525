//! Group commit for the usage path: record usage, reserve, settle and release.
//!
//! # Why
//!
//! One transaction per debit holds the hot workspace's row lock through its own WAL
//! flush, so every debit of a busy workspace waits for the previous one's fsync and
//! more clients only lengthen the queue. Here a writer task gathers the operations
//! waiting at that moment, applies them in arrival order against the rows it locked
//! once, commits once, and then answers each caller: one fsync and one lock
//! acquisition per batch instead of per debit.
//!
//! # Guarantees (the writer and the per-call functions of `usage` and
//! `reservations` run the same engine, `debits::engine`: a lone call is a batch of one)
//!
//! - Never overdraw: the batch holds the workspace rows (`FOR UPDATE` on PostgreSQL,
//!   the database write lock on SQLite via `BEGIN IMMEDIATE`) and checks every debit
//!   against the running in-memory balance; the final UPDATE re-checks the sequence
//!   it started from, and the CHECK constraints back it up.
//! - Never lose or double an update: each operation keeps its own idempotency key
//!   (usage event, ledger transaction), checked after the locks are taken, so a
//!   concurrent batch in another process has either committed (and is seen) or waits.
//! - Acknowledge only after commit: callers are answered after `COMMIT` returns.
//! - A refusal refuses only its own request: refusals are decided in memory and
//!   write nothing. If the batch as a whole fails (a database error, a broken
//!   assumption), nothing of it was written and every operation is re-run alone
//!   through the per-call path, which is idempotent, so each caller still gets its
//!   own answer.
//! - Fail fast while the database is unreachable: a batch that fails as UNAVAILABLE
//!   (no connection within the acquire timeout, a dropped connection) answers all of
//!   its callers, and those queued behind it, UNAVAILABLE at once instead of re-running
//!   each alone; none of them waits more than about one acquire timeout.
//!
//! # Locks and lanes
//!
//! Locks are taken in one global order: reservation rows by id, then workspace rows
//! by id, then project rows by id; the per-call path takes them in the same order, so
//! batches from several processes never deadlock. Each process runs `lanes` writer tasks;
//! a workspace always maps to the same lane, so two lanes of one process never wait
//! on each other's rows while batches for different workspaces commit in parallel.
//!
//! A lane keeps up to `in_flight` batches going (2 on PostgreSQL), each on its own
//! connection. Without pipelining the next batch starts once the previous one holds
//! its locks, so it queues behind them, and what overlaps is its gathering, `BEGIN`
//! and read request with the previous batch's write and commit. Pipelined (the
//! default on PostgreSQL, `WriterConfig::pipeline`), the next batch of usage records
//! starts once the previous one has written: it is read from a snapshot without
//! locks, with the previous batch's uncommitted rows laid over it, judged, and it
//! writes its conditional UPDATEs once the previous batch has committed, so a hot
//! workspace's lock is held for a batch's write and commit only; if the previous
//! batch did not commit, or a row is not what it was judged on, it runs again under
//! its locks (`engine::overlay` says why that is safe).
//!
//! A batch writes one balance event per workspace it changed (the balance sequence
//! moves once per batch): subscribers see every committed state, coalesced per
//! commit, with no gaps in `sequence`. Ledger entries keep one running
//! `balance_after` per operation.

use crate::debits::engine::{self, ConfigCache, FollowUp, Op, Overlay, Pipe, Reply};
use crate::debits::reservations::{ReserveRequest, Settled};
use crate::debits::usage::{Recorded, UsageRequest};
use crate::error::{BillingError, Result};
use crate::jobs::JobSink;
use chrono::{DateTime, Utc};
use entity::enums::ReservationStatus;
use entity::reservations as reservation_rows;
use sea_orm::{DatabaseConnection, DbBackend};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::{Semaphore, mpsc, oneshot};
use uuid::Uuid;

pub use crate::debits::engine::{SettleRequest, WriterStats};

/// Upper bounds on the configuration (TigerBeetle style: limits on everything).
pub const LANES_MAX: usize = 64;
pub const BATCH_OPS_MAX: usize = 4_096;
pub const WINDOW_US_MAX: u64 = 100_000;
pub const IN_FLIGHT_MAX: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterConfig {
    /// Writer lanes per process (each a task with its own transaction at a time).
    pub lanes: usize,
    /// Most operations applied in one transaction.
    pub batch_ops_max: usize,
    /// After the first operation arrives, how long to wait for more before starting
    /// (0: take only what is already waiting, which under load is everything that
    /// arrived during the previous commit).
    pub window_us: u64,
    /// Operations waiting per lane before callers wait for room (backpressure).
    pub queue_ops_max: usize,
    /// Batches of one lane in flight at once, each on its own connection. The next
    /// batch starts once the previous one holds its locks, so it queues behind them
    /// (operations are still judged in arrival order) while its BEGIN, its read and
    /// the previous batch's answers overlap the previous batch's write and commit.
    /// SQLite has one writer at a time: 1 there.
    pub in_flight: usize,
    /// Pipelining (PostgreSQL): the next batch of usage records starts once this one
    /// has written, is read without locks over this batch's uncommitted rows, judged,
    /// and writes only after this one committed (`engine::overlay`). Off: the next batch starts once this one holds its
    /// locks and reads under them.
    pub pipeline: bool,
}

impl WriterConfig {
    /// Defaults per backend: SQLite has one writer at a time whatever the lanes, so
    /// one lane; PostgreSQL commits lanes in parallel.
    pub fn for_backend(backend: DbBackend) -> Self {
        Self {
            lanes: if backend == DbBackend::Postgres { 4 } else { 1 },
            batch_ops_max: 1_024,
            window_us: 0,
            queue_ops_max: 16_384,
            in_flight: if backend == DbBackend::Postgres { 2 } else { 1 },
            pipeline: backend == DbBackend::Postgres,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(1..=LANES_MAX).contains(&self.lanes) {
            return Err(BillingError::invalid(format!(
                "lanes must be between 1 and {LANES_MAX}"
            )));
        }
        if !(1..=BATCH_OPS_MAX).contains(&self.batch_ops_max) {
            return Err(BillingError::invalid(format!(
                "batch_ops_max must be between 1 and {BATCH_OPS_MAX}"
            )));
        }
        if self.window_us > WINDOW_US_MAX {
            return Err(BillingError::invalid(format!(
                "window_us must be at most {WINDOW_US_MAX}"
            )));
        }
        if !(1..=IN_FLIGHT_MAX).contains(&self.in_flight) {
            return Err(BillingError::invalid(format!(
                "in_flight must be between 1 and {IN_FLIGHT_MAX}"
            )));
        }
        if self.queue_ops_max < self.batch_ops_max {
            return Err(BillingError::invalid(
                "queue_ops_max must be at least batch_ops_max",
            ));
        }
        Ok(())
    }
}

struct Pending {
    op: Op,
    now: DateTime<Utc>,
    reply: oneshot::Sender<Reply>,
}

/// The process's group-commit writer. Cheap to clone; dropping every clone stops the
/// lanes once their queues drain.
#[derive(Clone)]
pub struct DebitWriter {
    lanes: Arc<[mpsc::Sender<Pending>]>,
    stats: Arc<WriterStats>,
    cache: Arc<ConfigCache>,
}

impl std::fmt::Debug for DebitWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebitWriter")
            .field("lanes", &self.lanes.len())
            .finish()
    }
}

impl DebitWriter {
    /// Starts the lanes on the current Tokio runtime. `jobs` receives the reload
    /// purchases and notifications a batch creates, after its commit.
    pub fn start(
        db: DatabaseConnection,
        config: WriterConfig,
        jobs: Option<Arc<dyn JobSink>>,
    ) -> Result<Self> {
        config.validate()?;
        let stats = Arc::new(WriterStats::default());
        let cache = Arc::new(ConfigCache::default());
        let mut lanes = Vec::with_capacity(config.lanes);
        for lane in 0..config.lanes {
            let (tx, rx) = mpsc::channel(config.queue_ops_max);
            let lane_state = Lane {
                index: lane,
                db: db.clone(),
                config,
                jobs: jobs.clone(),
                stats: stats.clone(),
                cache: cache.clone(),
            };
            tokio::spawn(lane_state.run(rx));
            lanes.push(tx);
        }
        Ok(Self {
            lanes: lanes.into(),
            stats,
            cache,
        })
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// The newest configuration version a batch of this process has read (see
    /// `engine::cache`): what the API's credential cache checks its entries against.
    pub fn config_version(&self) -> Option<i64> {
        self.cache.version()
    }

    fn lane(&self, workspace_id: Uuid) -> Result<&mpsc::Sender<Pending>> {
        // The low bits of a v7 UUID are random: an even spread over lanes.
        let lanes = u128::try_from(self.lanes.len()).unwrap_or(1).max(1);
        let index = usize::try_from(workspace_id.as_u128() % lanes).unwrap_or(0);
        self.lanes
            .get(index)
            .ok_or_else(|| BillingError::Internal("debit writer has no lanes".into()))
    }

    async fn submit(&self, workspace_id: Uuid, op: Op, now: DateTime<Utc>) -> Result<Reply> {
        let (reply, answer) = oneshot::channel();
        self.lane(workspace_id)?
            .send(Pending { op, now, reply })
            .await
            .map_err(|_| BillingError::Internal("debit writer stopped".into()))?;
        answer
            .await
            .map_err(|_| BillingError::Internal("debit writer dropped a request".into()))
    }

    /// [`usage::record_usage`](crate::debits::usage::record_usage), group-committed.
    pub async fn record_usage(&self, req: UsageRequest, now: DateTime<Utc>) -> Result<Recorded> {
        let workspace_id = req.workspace_id;
        let op = Op::usage(req)?;
        self.submit(workspace_id, op, now).await?.into_usage()
    }

    /// Many usage records, each admitted or refused on its own, answered in order.
    /// They are queued together, so they usually share one commit.
    pub async fn record_usage_many(
        &self,
        reqs: Vec<UsageRequest>,
        now: DateTime<Utc>,
    ) -> Vec<Result<Recorded>> {
        let pending = reqs.into_iter().map(|req| self.record_usage(req, now));
        futures::future::join_all(pending).await
    }

    /// [`reservations::reserve`](crate::debits::reservations::reserve), group-committed.
    pub async fn reserve(
        &self,
        req: ReserveRequest,
        now: DateTime<Utc>,
    ) -> Result<reservation_rows::Model> {
        let workspace_id = req.workspace_id;
        let op = Op::reserve(req)?;
        self.submit(workspace_id, op, now).await?.into_reserve()
    }

    /// [`reservations::settle`](crate::debits::reservations::settle), group-committed.
    pub async fn settle(&self, req: SettleRequest, now: DateTime<Utc>) -> Result<Settled> {
        self.submit(req.workspace_id, Op::Settle(req), now)
            .await?
            .into_settle()
    }

    /// [`reservations::release`](crate::debits::reservations::release), group-committed.
    pub async fn release(
        &self,
        workspace_id: Uuid,
        reservation_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<reservation_rows::Model> {
        let op = Op::Release {
            reservation_id,
            to: ReservationStatus::Released,
        };
        self.submit(workspace_id, op, now).await?.into_release()
    }
}

#[derive(Clone)]
struct Lane {
    index: usize,
    db: DatabaseConnection,
    config: WriterConfig,
    jobs: Option<Arc<dyn JobSink>>,
    stats: Arc<WriterStats>,
    cache: Arc<ConfigCache>,
}

impl Lane {
    async fn run(self, mut rx: mpsc::Receiver<Pending>) {
        let slots = Arc::new(Semaphore::new(self.config.in_flight));
        let unavailable = Arc::new(AtomicBool::new(false));
        let mut batch: Vec<Pending> = Vec::with_capacity(self.config.batch_ops_max);
        // The last batch's overlay and the news of its commit, when pipelining.
        let mut previous: Option<(Arc<Overlay>, oneshot::Receiver<bool>)> = None;
        while let Some(first) = rx.recv().await {
            // With every slot busy, operations keep queueing and join the next batch.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            batch.push(first);
            if unavailable.swap(false, Ordering::AcqRel) {
                refuse_waiting(&mut rx, std::mem::take(&mut batch), self.index);
                previous = None;
                continue;
            }
            self.gather(&mut rx, &mut batch).await;
            let (next, handed_over) = oneshot::channel();
            let (committed, commit_news) = oneshot::channel();
            let pipe = Pipe {
                previous: previous.take(),
                next: Some(next),
                committed: Some(committed),
                pipelined: self.config.pipeline,
            };
            let (lane, flag) = (self.clone(), unavailable.clone());
            let ops = std::mem::take(&mut batch);
            tokio::spawn(async move {
                let size = ops.len();
                if lane.run_batch(ops, pipe).await {
                    flag.store(true, Ordering::Release);
                }
                tracing::trace!(lane = lane.index, ops = size, "debit batch done");
                drop(slot);
            });
            // An error means the batch ended before handing over: the next one
            // reads under its locks.
            previous = match handed_over.await {
                Ok(Some(overlay)) => Some((overlay, commit_news)),
                Ok(None) | Err(_) => None,
            };
        }
    }

    /// Takes what else is waiting (after the configured window), up to the batch cap.
    async fn gather(&self, rx: &mut mpsc::Receiver<Pending>, batch: &mut Vec<Pending>) {
        let max = self.config.batch_ops_max;
        if self.config.window_us > 0 {
            let window = std::time::Duration::from_micros(self.config.window_us);
            let deadline = tokio::time::Instant::now().checked_add(window);
            while let Some(deadline) = deadline
                && batch.len() < max
            {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(p)) => batch.push(p),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        while batch.len() < max {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
    }

    /// Runs one batch and answers its callers; true when it failed because the
    /// database cannot be reached.
    async fn run_batch(&self, batch: Vec<Pending>, pipe: Pipe) -> bool {
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        let size = u64::try_from(batch.len()).unwrap_or(u64::MAX);
        self.stats.ops.fetch_add(size, Ordering::Relaxed);
        let (ops, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| ((p.op, p.now), p.reply)).unzip();
        let cache = Some(self.cache.as_ref());
        match engine::apply_batch_piped(&self.db, &ops, &self.stats, pipe, cache).await {
            Ok((answers, follow_up)) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    // A caller that went away (timeout, disconnect) has nothing to
                    // receive; its operation is committed all the same.
                    let _ = reply.send(answer);
                }
                self.push(follow_up).await;
                false
            }
            Err(e) if e.is_unavailable() => {
                // Re-running each operation alone would only make every caller wait
                // for another acquire timeout: the database is down, not one operation
                // bad. Nothing was decided, and a retry with the same key is a replay
                // if the COMMIT did land.
                self.stats.batches_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(lane = self.index, error = %e, ops = ops.len(), "debit batch failed: database unavailable");
                let cause = e.to_string();
                for ((op, _), reply) in ops.into_iter().zip(replies) {
                    let _ = reply.send(Reply::refused(
                        &op,
                        BillingError::Unavailable(cause.clone()),
                    ));
                }
                true
            }
            Err(e) => {
                self.stats.batches_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(lane = self.index, error = %e, ops = ops.len(), "debit batch failed; retrying its operations one by one");
                for ((op, now), reply) in ops.into_iter().zip(replies) {
                    alone(&self.db, self.jobs.clone(), op, now, reply);
                }
                false
            }
        }
    }

    async fn push(&self, follow_up: FollowUp) {
        if let Some(jobs) = &self.jobs {
            follow_up.push(jobs.as_ref()).await;
        }
    }
}

/// Answers UNAVAILABLE to what queued up while a batch waited for the database that
/// turned out to be unreachable (`taken`, and what is still queued): those callers
/// have already waited about one acquire timeout, and another would double it.
/// Nothing of theirs was tried.
fn refuse_waiting(rx: &mut mpsc::Receiver<Pending>, taken: Vec<Pending>, lane: usize) {
    let mut refused = 0_usize;
    let mut waiting = taken;
    while let Ok(p) = rx.try_recv() {
        waiting.push(p);
    }
    for p in waiting {
        let e = BillingError::Unavailable("an earlier batch found the database unreachable".into());
        let _ = p.reply.send(Reply::refused(&p.op, e));
        refused += 1;
    }
    if refused > 0 {
        tracing::warn!(lane, refused, "queued debits refused: database unavailable");
    }
}

/// Runs one operation of a failed batch as a batch of its own and answers its
/// caller: a refusal or a database error then reaches only the request it is about.
/// Its follow-up jobs are pushed after its commit, as a batch's are.
fn alone(
    db: &DatabaseConnection,
    jobs: Option<Arc<dyn JobSink>>,
    op: Op,
    now: DateTime<Utc>,
    reply: oneshot::Sender<Reply>,
) {
    let db = db.clone();
    tokio::spawn(async move {
        let answer = match engine::run_one(&db, op.clone(), now, jobs.as_deref()).await {
            Ok(answer) => answer,
            Err(e) => Reply::refused(&op, e),
        };
        let _ = reply.send(answer);
    });
}
