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
//! # Guarantees (the same as the one-transaction-per-call path in `usage` and
//! `reservations`, which stays as the fallback)
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
//!
//! # Locks and lanes
//!
//! Locks are taken in one global order: reservation rows by id, then workspace rows
//! by id, then project rows by id; the per-call path takes them in the same order, so
//! batches from several processes never deadlock. Each process runs `lanes` writer tasks;
//! a workspace always maps to the same lane, so two lanes of one process never wait
//! on each other's rows while batches for different workspaces commit in parallel.
//!
//! A batch writes one balance event per workspace it changed (the balance sequence
//! moves once per batch): subscribers see every committed state, coalesced per
//! commit, with no gaps in `sequence`. Ledger entries keep one running
//! `balance_after` per operation.

use crate::debits::budget;
use crate::db::begin_write;
use crate::error::{BillingError, Result};
use crate::ids::{IdempotencyKey, new_id};
use crate::jobs::{CapturePurchase, DeliverNotification, JobSink};
use crate::ledger::{self, BALANCE_EVENTS_CHANNEL, system_account};
use crate::money::{Credits, DiscountBps};
use crate::pricing::{self, TokenPrice};
use crate::debits::reservations::{self, ReserveRequest, Settled, settle_hash};
use crate::debits::usage::{self, ProjectRef, Recorded, UsageRequest, usage_description};
use chrono::{DateTime, Duration, Utc};
use entity::enums::{BalanceChangeCause, LedgerEntryKind, ReservationStatus};
use entity::{
    account_members, accounts, balance_events, ledger_entries, ledger_transactions, models,
    projects, reservations as reservation_rows, usage_events, workspaces,
};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection,
    DatabaseTransaction, DbBackend, EntityTrait, IntoActiveModel, QueryFilter, QueryOrder,
    QuerySelect,
};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Upper bounds on the configuration (TigerBeetle style: limits on everything).
pub const LANES_MAX: usize = 64;
pub const BATCH_OPS_MAX: usize = 4_096;
pub const WINDOW_US_MAX: u64 = 100_000;
/// Rows per INSERT statement: under SQLite's 32,766 bound variables with the widest
/// row (usage events, 14 columns) and PostgreSQL's 65,535.
const INSERT_ROWS_MAX: usize = 1_000;

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
        if self.queue_ops_max < self.batch_ops_max {
            return Err(BillingError::invalid(
                "queue_ops_max must be at least batch_ops_max",
            ));
        }
        Ok(())
    }
}

/// Settle a reservation at its actual token counts.
#[derive(Clone, Debug)]
pub struct SettleRequest {
    pub reservation_id: Uuid,
    /// The reservation's workspace (which lane it goes to).
    pub workspace_id: Uuid,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

#[derive(Clone, Debug)]
enum Op {
    Usage { req: UsageRequest, hash: String },
    Reserve { req: ReserveRequest, hash: String },
    Settle(SettleRequest),
    Release { reservation_id: Uuid },
}

#[derive(Debug)]
enum Reply {
    Usage(Result<Recorded>),
    Reserve(Result<reservation_rows::Model>),
    Settle(Box<Result<Settled>>),
    Release(Result<reservation_rows::Model>),
}

struct Pending {
    op: Op,
    now: DateTime<Utc>,
    reply: oneshot::Sender<Reply>,
}

/// What the batch decided for one operation.
#[allow(clippy::large_enum_variant)] // short-lived, one per operation of a batch
enum Outcome {
    Done(Reply),
    /// Answer it alone through the per-call path after the batch (rare cases, such
    /// as replaying a settled reservation, that need rows the batch did not load).
    Alone,
}

/// Cumulative counters of a process's writer, for `/metrics` and the benchmarks'
/// profile: where a batch's time goes (reading under the locks, writing, committing).
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

/// The process's group-commit writer. Cheap to clone; dropping every clone stops the
/// lanes once their queues drain.
#[derive(Clone)]
pub struct DebitWriter {
    lanes: Arc<[mpsc::Sender<Pending>]>,
    stats: Arc<WriterStats>,
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
        let mut lanes = Vec::with_capacity(config.lanes);
        for lane in 0..config.lanes {
            let (tx, rx) = mpsc::channel(config.queue_ops_max);
            let lane_state = Lane {
                index: lane,
                db: db.clone(),
                config,
                jobs: jobs.clone(),
                stats: stats.clone(),
            };
            tokio::spawn(lane_state.run(rx));
            lanes.push(tx);
        }
        Ok(Self {
            lanes: lanes.into(),
            stats,
        })
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    fn lane(&self, workspace_id: Uuid) -> &mpsc::Sender<Pending> {
        // The low bits of a v7 UUID are random: an even spread over lanes.
        let index = (workspace_id.as_u128() % self.lanes.len() as u128) as usize;
        &self.lanes[index]
    }

    async fn submit(&self, workspace_id: Uuid, op: Op, now: DateTime<Utc>) -> Result<Reply> {
        let (reply, answer) = oneshot::channel();
        self.lane(workspace_id)
            .send(Pending { op, now, reply })
            .await
            .map_err(|_| BillingError::Internal("debit writer stopped".into()))?;
        answer
            .await
            .map_err(|_| BillingError::Internal("debit writer dropped a request".into()))
    }

    /// [`usage::record_usage`], group-committed.
    pub async fn record_usage(&self, req: UsageRequest, now: DateTime<Utc>) -> Result<Recorded> {
        IdempotencyKey::parse("requestId", &req.request_id)?;
        let hash = usage::usage_hash(&req);
        match self
            .submit(req.workspace_id, Op::Usage { req, hash }, now)
            .await?
        {
            Reply::Usage(result) => result,
            other => Err(mismatch(&other)),
        }
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

    /// [`reservations::reserve`], group-committed.
    pub async fn reserve(
        &self,
        req: ReserveRequest,
        now: DateTime<Utc>,
    ) -> Result<reservation_rows::Model> {
        IdempotencyKey::parse("requestId", &req.request_id)?;
        reservations::check_ttl(req.ttl_seconds)?;
        let hash = reservations::reserve_hash(&req);
        match self
            .submit(req.workspace_id, Op::Reserve { req, hash }, now)
            .await?
        {
            Reply::Reserve(result) => result,
            other => Err(mismatch(&other)),
        }
    }

    /// [`reservations::settle`], group-committed.
    pub async fn settle(&self, req: SettleRequest, now: DateTime<Utc>) -> Result<Settled> {
        match self.submit(req.workspace_id, Op::Settle(req), now).await? {
            Reply::Settle(result) => *result,
            other => Err(mismatch(&other)),
        }
    }

    /// [`reservations::release`], group-committed.
    pub async fn release(
        &self,
        workspace_id: Uuid,
        reservation_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<reservation_rows::Model> {
        match self
            .submit(workspace_id, Op::Release { reservation_id }, now)
            .await?
        {
            Reply::Release(result) => result,
            other => Err(mismatch(&other)),
        }
    }
}

fn mismatch(reply: &Reply) -> BillingError {
    BillingError::Internal(format!("debit writer answered with {reply:?}"))
}

struct Lane {
    index: usize,
    db: DatabaseConnection,
    config: WriterConfig,
    jobs: Option<Arc<dyn JobSink>>,
    stats: Arc<WriterStats>,
}

impl Lane {
    async fn run(self, mut rx: mpsc::Receiver<Pending>) {
        let config = self.config;
        let mut batch: Vec<Pending> = Vec::with_capacity(config.batch_ops_max);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            if config.window_us > 0 {
                let deadline = tokio::time::Instant::now()
                    + std::time::Duration::from_micros(config.window_us);
                while batch.len() < config.batch_ops_max {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(p)) => batch.push(p),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            while batch.len() < config.batch_ops_max {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let size = batch.len();
            self.run_batch(std::mem::take(&mut batch)).await;
            tracing::trace!(lane = self.index, ops = size, "debit batch done");
        }
    }

    async fn run_batch(&self, batch: Vec<Pending>) {
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .ops
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        match apply_batch(&self.db, &batch, &self.stats).await {
            Ok((outcomes, follow_up)) => {
                for (pending, outcome) in batch.into_iter().zip(outcomes) {
                    match outcome {
                        Outcome::Done(reply) => {
                            // A caller that went away (timeout, disconnect) has nothing to
                            // receive; its operation is committed all the same.
                            let _ = pending.reply.send(reply);
                        }
                        Outcome::Alone => alone(&self.db, pending),
                    }
                }
                if let Some(jobs) = &self.jobs {
                    follow_up.push(jobs.as_ref()).await;
                }
            }
            Err(e) => {
                // Nothing of the batch was written (or, if COMMIT itself failed, it may
                // have been: the per-call path is idempotent and answers with replays).
                self.stats.batches_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(lane = self.index, error = %e, ops = batch.len(), "debit batch failed; retrying its operations one by one");
                for pending in batch {
                    alone(&self.db, pending);
                }
            }
        }
    }
}

/// Runs one operation through the per-call path and answers its caller.
fn alone(db: &DatabaseConnection, pending: Pending) {
    let db = db.clone();
    tokio::spawn(async move {
        let Pending { op, now, reply } = pending;
        let answer = match op {
            Op::Usage { req, .. } => Reply::Usage(usage::record_usage(&db, req, now).await),
            Op::Reserve { req, .. } => Reply::Reserve(reservations::reserve(&db, req, now).await),
            Op::Settle(req) => Reply::Settle(Box::new(
                reservations::settle(
                    &db,
                    req.reservation_id,
                    req.prompt_tokens,
                    req.completion_tokens,
                    now,
                )
                .await,
            )),
            Op::Release { reservation_id } => {
                Reply::Release(reservations::release(&db, reservation_id, now).await)
            }
        };
        let _ = reply.send(answer);
    });
}

/// Work to hand to the queue after the commit.
#[derive(Default)]
struct FollowUp {
    purchases: Vec<Uuid>,
    notifications: Vec<Uuid>,
}

impl FollowUp {
    async fn push(self, jobs: &dyn JobSink) {
        for purchase_id in self.purchases {
            if let Err(e) = jobs.capture(CapturePurchase { purchase_id }).await {
                // Not lost: the row is PENDING and the worker's sweep enqueues it.
                tracing::warn!(%purchase_id, error = %e, "capture job not pushed");
            }
        }
        for notification_id in self.notifications {
            if let Err(e) = jobs.deliver(DeliverNotification { notification_id }).await {
                tracing::warn!(%notification_id, error = %e, "delivery job not pushed");
            }
        }
    }
}

/// A workspace row as the batch found it and as it is now.
struct WorkspaceState {
    row: workspaces::Model,
    sequence_before: i64,
    balance_before: i64,
    reserved_before: i64,
    cause: Option<BalanceChangeCause>,
}

struct ProjectState {
    row: projects::Model,
    before: projects::Model,
}

/// One operation's ledger transaction, before it has an id.
struct Posting {
    idempotency_key: String,
    usage_event_id: Uuid,
    entries: Vec<ledger_entries::ActiveModel>,
    now: DateTime<Utc>,
}

/// Everything the batch read, under its locks.
struct Loaded {
    workspaces: HashMap<Uuid, WorkspaceState>,
    discounts: HashMap<Uuid, DiscountBps>,
    models: HashMap<String, models::Model>,
    projects: HashMap<Uuid, ProjectState>,
    members: HashSet<(Uuid, Uuid)>,
    reservations: HashMap<Uuid, reservation_rows::Model>,
    /// (workspace, request id) -> request hash of a recorded usage event.
    used_usage_keys: HashMap<(Uuid, String), String>,
    /// (workspace, request id) -> the reservation made with it.
    used_reserve_keys: HashMap<(Uuid, String), reservation_rows::Model>,
}

fn is_postgres(c: &DatabaseTransaction) -> bool {
    c.get_database_backend() == DbBackend::Postgres
}

async fn load(tx: &DatabaseTransaction, batch: &[Pending]) -> Result<Loaded> {
    let ops = || batch.iter().map(|p| &p.op);
    let pg = is_postgres(tx);
    // 1. Reservation rows, locked by id.
    let reservation_ids: BTreeSet<Uuid> = ops()
        .filter_map(|op| match op {
            Op::Settle(s) => Some(s.reservation_id),
            Op::Release { reservation_id } => Some(*reservation_id),
            _ => None,
        })
        .collect();
    let mut reservations = HashMap::new();
    if !reservation_ids.is_empty() {
        let mut q = reservation_rows::Entity::find()
            .filter(reservation_rows::Column::Id.is_in(reservation_ids.iter().copied()))
            .order_by_asc(reservation_rows::Column::Id);
        if pg {
            q = q.lock_exclusive();
        }
        for r in q.all(tx).await? {
            reservations.insert(r.id, r);
        }
    }
    // 2. Workspace rows, locked by id.
    let mut workspace_ids: BTreeSet<Uuid> = ops()
        .filter_map(|op| match op {
            Op::Usage { req, .. } => Some(req.workspace_id),
            Op::Reserve { req, .. } => Some(req.workspace_id),
            _ => None,
        })
        .collect();
    workspace_ids.extend(reservations.values().map(|r| r.workspace_id));
    let mut q = workspaces::Entity::find()
        .filter(workspaces::Column::Id.is_in(workspace_ids.iter().copied()))
        .order_by_asc(workspaces::Column::Id);
    if pg {
        q = q.lock_exclusive();
    }
    let workspaces: HashMap<Uuid, WorkspaceState> = q
        .all(tx)
        .await?
        .into_iter()
        .map(|row| {
            let state = WorkspaceState {
                sequence_before: row.balance_sequence,
                balance_before: row.balance_nanos,
                reserved_before: row.reserved_nanos,
                row,
                cause: None,
            };
            (state.row.id, state)
        })
        .collect();
    // 3. Project rows (named by id or by tag), locked by id.
    let mut project_ids: BTreeSet<Uuid> =
        reservations.values().filter_map(|r| r.project_id).collect();
    let mut tags: BTreeSet<&str> = BTreeSet::new();
    for op in ops() {
        let project = match op {
            Op::Usage { req, .. } => &req.project,
            Op::Reserve { req, .. } => &req.project,
            _ => continue,
        };
        match project {
            ProjectRef::None => {}
            ProjectRef::Id(id) => {
                project_ids.insert(*id);
            }
            ProjectRef::Tag(tag) => {
                tags.insert(tag.as_str());
            }
        }
    }
    let mut projects = HashMap::new();
    if !project_ids.is_empty() || !tags.is_empty() {
        let mut condition = sea_orm::Condition::any();
        if !project_ids.is_empty() {
            condition = condition.add(projects::Column::Id.is_in(project_ids.iter().copied()));
        }
        if !tags.is_empty() {
            condition = condition.add(
                sea_orm::Condition::all()
                    .add(projects::Column::WorkspaceId.is_in(workspace_ids.iter().copied()))
                    .add(projects::Column::Tag.is_in(tags.iter().copied())),
            );
        }
        let mut q = projects::Entity::find()
            .filter(condition)
            .order_by_asc(projects::Column::Id);
        if pg {
            q = q.lock_exclusive();
        }
        for row in q.all(tx).await? {
            projects.insert(
                row.id,
                ProjectState {
                    before: row.clone(),
                    row,
                },
            );
        }
    }
    // 4. Prices, discounts and memberships: read, not locked (as in the per-call path,
    //    the prices in force when the batch runs apply).
    let model_ids: BTreeSet<String> = ops()
        .filter_map(|op| match op {
            Op::Usage { req, .. } => Some(req.model_id.clone()),
            Op::Reserve { req, .. } => Some(req.model_id.clone()),
            _ => None,
        })
        .chain(reservations.values().map(|r| r.model_id.clone()))
        .collect();
    let models: HashMap<String, models::Model> = models::Entity::find()
        .filter(models::Column::Id.is_in(model_ids))
        .all(tx)
        .await?
        .into_iter()
        .map(|m| (m.id.clone(), m))
        .collect();
    let account_ids: BTreeSet<Uuid> = workspaces.values().map(|w| w.row.account_id).collect();
    let mut discounts = HashMap::new();
    for account in accounts::Entity::find()
        .filter(accounts::Column::Id.is_in(account_ids.iter().copied()))
        .all(tx)
        .await?
    {
        let discount = DiscountBps::new(account.volume_discount_bps)
            .map_err(|e| BillingError::Internal(e.to_string()))?;
        discounts.insert(account.id, discount);
    }
    let user_ids: BTreeSet<Uuid> = ops()
        .filter_map(|op| match op {
            Op::Usage { req, .. } => req.user_id,
            Op::Reserve { req, .. } => req.user_id,
            _ => None,
        })
        .collect();
    let mut members = HashSet::new();
    if !user_ids.is_empty() {
        for m in account_members::Entity::find()
            .filter(account_members::Column::UserId.is_in(user_ids))
            .filter(account_members::Column::AccountId.is_in(account_ids))
            .all(tx)
            .await?
        {
            members.insert((m.account_id, m.user_id));
        }
    }
    // 5. Request ids already used, read after the workspace locks: a batch of another
    //    process that used one of them has committed (and is seen) or is still waiting.
    let mut usage_keys: BTreeSet<&str> = BTreeSet::new();
    let mut reserve_keys: BTreeSet<&str> = BTreeSet::new();
    for op in ops() {
        match op {
            Op::Usage { req, .. } => {
                usage_keys.insert(&req.request_id);
            }
            Op::Reserve { req, .. } => {
                usage_keys.insert(&req.request_id);
                reserve_keys.insert(&req.request_id);
            }
            _ => {}
        }
    }
    for r in reservations.values() {
        usage_keys.insert(&r.request_id);
    }
    let mut used_usage_keys = HashMap::new();
    if !usage_keys.is_empty() {
        let rows: Vec<(Uuid, String, String)> = usage_events::Entity::find()
            .select_only()
            .column(usage_events::Column::WorkspaceId)
            .column(usage_events::Column::RequestId)
            .column(usage_events::Column::RequestHash)
            .filter(usage_events::Column::WorkspaceId.is_in(workspace_ids.iter().copied()))
            .filter(usage_events::Column::RequestId.is_in(usage_keys))
            .into_tuple()
            .all(tx)
            .await?;
        for (workspace_id, request_id, hash) in rows {
            used_usage_keys.insert((workspace_id, request_id), hash);
        }
    }
    let mut used_reserve_keys = HashMap::new();
    if !reserve_keys.is_empty() {
        for r in reservation_rows::Entity::find()
            .filter(reservation_rows::Column::WorkspaceId.is_in(workspace_ids.iter().copied()))
            .filter(reservation_rows::Column::RequestId.is_in(reserve_keys))
            .all(tx)
            .await?
        {
            used_reserve_keys.insert((r.workspace_id, r.request_id.clone()), r);
        }
    }
    Ok(Loaded {
        workspaces,
        discounts,
        models,
        projects,
        members,
        reservations,
        used_usage_keys,
        used_reserve_keys,
    })
}

/// The writes the batch has decided on, applied after every operation was judged.
#[derive(Default)]
struct Writes {
    events: Vec<usage_events::Model>,
    postings: Vec<Posting>,
    new_reservations: Vec<reservation_rows::Model>,
    /// (row after, status before).
    resolved_reservations: Vec<(reservation_rows::Model, ReservationStatus)>,
    /// Usage recorded by this batch, for replays inside it: (ws, request id) -> event index.
    recorded: HashMap<(Uuid, String), usize>,
    /// Reservations made by this batch: (ws, request id) -> index.
    reserved: HashMap<(Uuid, String), usize>,
}

fn price_of(model: &models::Model) -> TokenPrice {
    TokenPrice {
        prompt_per_million: Credits::from_nanos(model.prompt_price_per_million_nanos),
        completion_per_million: Credits::from_nanos(model.completion_price_per_million_nanos),
    }
}

/// Rolls a project's budget period in memory when a new one has begun.
fn roll(project: &mut projects::Model, now: DateTime<Utc>) {
    let start = budget::period_start(project.budget_period, now, project.budget_period_start);
    if start > project.budget_period_start {
        project.budget_spent_nanos = 0;
        project.budget_period_start = start;
    }
}

/// Looks a project up as the per-call path does (NOT_FOUND unless it belongs to the
/// workspace).
fn find_project(loaded: &Loaded, workspace_id: Uuid, project: &ProjectRef) -> Result<Option<Uuid>> {
    let found = match project {
        ProjectRef::None => return Ok(None),
        ProjectRef::Id(id) => loaded.projects.get(id).map(|p| &p.row),
        ProjectRef::Tag(tag) => loaded
            .projects
            .values()
            .map(|p| &p.row)
            .find(|p| p.workspace_id == workspace_id && p.tag == *tag),
    };
    match found {
        Some(p) if p.workspace_id == workspace_id => Ok(Some(p.id)),
        _ => Err(BillingError::NotFound("project")),
    }
}

/// Price, workspace, project and attribution checks shared by usage and holds, in
/// the per-call path's order, so both paths refuse a bad request the same way.
fn judge_common(
    loaded: &Loaded,
    workspace_id: Uuid,
    model_id: &str,
    project: &ProjectRef,
    user_id: Option<Uuid>,
    prompt_tokens: i64,
    completion_tokens: i64,
) -> Result<(Credits, Option<Uuid>)> {
    let ws = loaded
        .workspaces
        .get(&workspace_id)
        .ok_or(BillingError::NotFound("workspace"))?;
    let discount = *loaded
        .discounts
        .get(&ws.row.account_id)
        .ok_or(BillingError::NotFound("account"))?;
    let model = match loaded.models.get(model_id) {
        Some(m) if m.active => m,
        Some(_) => {
            return Err(BillingError::invalid(format!(
                "model {model_id} is no longer available"
            )));
        }
        None => return Err(BillingError::invalid(format!("unknown model {model_id}"))),
    };
    let project_id = find_project(loaded, workspace_id, project)?;
    if let Some(user_id) = user_id
        && !loaded.members.contains(&(ws.row.account_id, user_id))
    {
        return Err(BillingError::NotFound("user"));
    }
    let cost =
        pricing::usage_cost(price_of(model), prompt_tokens, completion_tokens, discount)?.total;
    Ok((cost, project_id))
}

/// The two guards of a debit or hold, against the rows as this batch has left them:
/// the workspace's available credits, then the project's cap (after rolling its period).
/// Changes nothing but the roll, so a refusal leaves the batch's state as it was.
fn admit(
    loaded: &mut Loaded,
    workspace_id: Uuid,
    project_id: Option<Uuid>,
    amount: Credits,
    now: DateTime<Utc>,
) -> Result<()> {
    let ws = loaded
        .workspaces
        .get(&workspace_id)
        .ok_or(BillingError::NotFound("workspace"))?;
    let available = ledger::available(&ws.row);
    if available < amount {
        return Err(BillingError::InsufficientCredits { available });
    }
    if let Some(project_id) = project_id {
        let project = loaded
            .projects
            .get_mut(&project_id)
            .ok_or(BillingError::NotFound("project"))?;
        roll(&mut project.row, now);
        check_budget(&project.row, amount)?;
    }
    Ok(())
}

/// Admits `needed` under a project's cap (spent + held + needed <= limit).
fn check_budget(project: &projects::Model, needed: Credits) -> Result<()> {
    let Some(limit) = project.budget_limit_nanos else {
        return Ok(());
    };
    let used = project
        .budget_spent_nanos
        .saturating_add(project.budget_reserved_nanos)
        .saturating_add(needed.nanos());
    if used <= limit {
        Ok(())
    } else {
        Err(BillingError::BudgetExceeded {
            available: usage::budget_remaining(project),
        })
    }
}

fn usage_entries(
    workspace_id: Uuid,
    charge: Credits,
    cost: Credits,
    shortfall: Credits,
    balance_after: i64,
    description: &str,
    now: DateTime<Utc>,
) -> Result<Vec<ledger_entries::ActiveModel>> {
    let entry = |workspace_id: Option<Uuid>,
                 system: Option<&str>,
                 amount: Credits,
                 balance_after: Option<i64>,
                 description: String| ledger_entries::ActiveModel {
        workspace_id: Set(workspace_id),
        system_account: Set(system.map(str::to_owned)),
        kind: Set(LedgerEntryKind::Usage),
        amount_nanos: Set(amount.nanos()),
        balance_after_nanos: Set(balance_after),
        description: Set(description),
        created_at: Set(now),
        ..Default::default()
    };
    let mut entries = vec![
        entry(
            Some(workspace_id),
            None,
            charge.checked_neg()?,
            Some(balance_after),
            description.to_owned(),
        ),
        entry(
            None,
            Some(system_account::USAGE_REVENUE),
            cost,
            None,
            description.to_owned(),
        ),
    ];
    if !shortfall.is_zero() {
        entries.push(entry(
            None,
            Some(system_account::USAGE_SHORTFALL),
            shortfall.checked_neg()?,
            None,
            format!("uncollected: {description}"),
        ));
    }
    let total = entries
        .iter()
        .map(|e| match &e.amount_nanos {
            Set(n) => *n,
            _ => 0,
        })
        .try_fold(0i64, i64::checked_add);
    if total != Some(0) {
        return Err(BillingError::Internal(format!(
            "unbalanced usage posting for {workspace_id}"
        )));
    }
    Ok(entries)
}

fn judge_usage(
    loaded: &mut Loaded,
    writes: &mut Writes,
    req: &UsageRequest,
    hash: &str,
    now: DateTime<Utc>,
) -> Result<Outcome> {
    let key = (req.workspace_id, req.request_id.clone());
    if let Some(index) = writes.recorded.get(&key) {
        let event = &writes.events[*index];
        return if event.request_hash == hash {
            Ok(Outcome::Done(Reply::Usage(Ok(Recorded {
                event: event.clone(),
                replayed: true,
            }))))
        } else {
            Err(BillingError::IdempotencyConflict)
        };
    }
    if let Some(found) = loaded.used_usage_keys.get(&key) {
        // Recorded by an earlier commit: the per-call path loads and replays it (or
        // answers IDEMPOTENCY_CONFLICT) without taking the write lock.
        return if found == hash {
            Ok(Outcome::Alone)
        } else {
            Err(BillingError::IdempotencyConflict)
        };
    }
    let (cost, project_id) = judge_common(
        loaded,
        req.workspace_id,
        &req.model_id,
        &req.project,
        req.user_id,
        req.prompt_tokens,
        req.completion_tokens,
    )?;
    admit(loaded, req.workspace_id, project_id, cost, now)?;
    if let Some(project) = project_id.and_then(|id| loaded.projects.get_mut(&id)) {
        project.row.budget_spent_nanos =
            project
                .row
                .budget_spent_nanos
                .checked_add(cost.nanos())
                .ok_or_else(|| BillingError::LimitExceeded("project spend out of range".into()))?;
    }
    let ws = loaded
        .workspaces
        .get_mut(&req.workspace_id)
        .ok_or(BillingError::NotFound("workspace"))?;
    ws.row.balance_nanos -= cost.nanos();
    ws.cause = Some(BalanceChangeCause::Usage);
    let event = usage_events::Model {
        id: new_id(),
        workspace_id: req.workspace_id,
        project_id,
        user_id: req.user_id,
        api_key_id: req.api_key_id,
        model_id: req.model_id.clone(),
        prompt_tokens: req.prompt_tokens,
        completion_tokens: req.completion_tokens,
        cost_nanos: cost.nanos(),
        shortfall_nanos: 0,
        request_id: req.request_id.clone(),
        request_hash: hash.to_owned(),
        reservation_id: None,
        created_at: now,
    };
    let description = usage_description(&event);
    writes.postings.push(Posting {
        idempotency_key: format!("usage:{}", event.id),
        usage_event_id: event.id,
        entries: usage_entries(
            req.workspace_id,
            cost,
            cost,
            Credits::ZERO,
            ws.row.balance_nanos,
            &description,
            now,
        )?,
        now,
    });
    writes.recorded.insert(key, writes.events.len());
    writes.events.push(event.clone());
    Ok(Outcome::Done(Reply::Usage(Ok(Recorded {
        event,
        replayed: false,
    }))))
}

fn judge_reserve(
    loaded: &mut Loaded,
    writes: &mut Writes,
    req: &ReserveRequest,
    hash: &str,
    now: DateTime<Utc>,
) -> Result<Outcome> {
    let key = (req.workspace_id, req.request_id.clone());
    let earlier = writes
        .reserved
        .get(&key)
        .map(|i| &writes.new_reservations[*i])
        .or_else(|| loaded.used_reserve_keys.get(&key));
    if let Some(r) = earlier {
        return if r.request_hash == hash {
            Ok(Outcome::Done(Reply::Reserve(Ok(r.clone()))))
        } else {
            Err(BillingError::IdempotencyConflict)
        };
    }
    // A request id already recorded as direct usage cannot be held and settled again.
    if loaded.used_usage_keys.contains_key(&key) || writes.recorded.contains_key(&key) {
        return Err(BillingError::IdempotencyConflict);
    }
    let (hold, project_id) = judge_common(
        loaded,
        req.workspace_id,
        &req.model_id,
        &req.project,
        req.user_id,
        req.max_prompt_tokens,
        req.max_completion_tokens,
    )?;
    admit(loaded, req.workspace_id, project_id, hold, now)?;
    if let Some(project) = project_id.and_then(|id| loaded.projects.get_mut(&id)) {
        project.row.budget_reserved_nanos += hold.nanos();
    }
    let ws = loaded
        .workspaces
        .get_mut(&req.workspace_id)
        .ok_or(BillingError::NotFound("workspace"))?;
    ws.row.reserved_nanos += hold.nanos();
    ws.cause = Some(BalanceChangeCause::Reservation);
    let reservation = reservation_rows::Model {
        id: new_id(),
        workspace_id: req.workspace_id,
        project_id,
        user_id: req.user_id,
        api_key_id: req.api_key_id,
        model_id: req.model_id.clone(),
        request_id: req.request_id.clone(),
        request_hash: hash.to_owned(),
        amount_nanos: hold.nanos(),
        status: ReservationStatus::Held,
        expires_at: now + Duration::seconds(req.ttl_seconds),
        usage_event_id: None,
        created_at: now,
        resolved_at: None,
    };
    writes.reserved.insert(key, writes.new_reservations.len());
    writes.new_reservations.push(reservation.clone());
    Ok(Outcome::Done(Reply::Reserve(Ok(reservation))))
}

fn judge_settle(
    loaded: &mut Loaded,
    writes: &mut Writes,
    req: &SettleRequest,
    now: DateTime<Utc>,
) -> Result<Outcome> {
    let Some(reservation) = loaded.reservations.get(&req.reservation_id) else {
        return Err(BillingError::NotFound("reservation"));
    };
    let from = reservation.status;
    if !matches!(from, ReservationStatus::Held | ReservationStatus::Expired) {
        // Settled already (a retry) or released: the per-call path answers with the
        // replay or the error, reading the usage event this batch did not load.
        return Ok(Outcome::Alone);
    }
    let hash = settle_hash(reservation, req.prompt_tokens, req.completion_tokens);
    let key = (reservation.workspace_id, reservation.request_id.clone());
    if loaded.used_usage_keys.contains_key(&key) || writes.recorded.contains_key(&key) {
        // The request id was already used by a direct recordUsage.
        return Err(BillingError::IdempotencyConflict);
    }
    // The model may have been retired since the hold; it is still priced.
    let model = loaded
        .models
        .get(&reservation.model_id)
        .ok_or(BillingError::NotFound("model"))?;
    let ws = loaded
        .workspaces
        .get(&reservation.workspace_id)
        .ok_or(BillingError::NotFound("workspace"))?;
    let discount = *loaded
        .discounts
        .get(&ws.row.account_id)
        .ok_or(BillingError::NotFound("account"))?;
    let cost = pricing::usage_cost(
        price_of(model),
        req.prompt_tokens,
        req.completion_tokens,
        discount,
    )?
    .total;
    let hold = match from {
        ReservationStatus::Held => Credits::from_nanos(reservation.amount_nanos),
        _ => Credits::ZERO,
    };
    let mut resolved = reservation.clone();
    let event_id = new_id();
    resolved.status = ReservationStatus::Settled;
    resolved.usage_event_id = Some(event_id);
    resolved.resolved_at = Some(now);
    let ws = loaded
        .workspaces
        .get_mut(&resolved.workspace_id)
        .ok_or(BillingError::NotFound("workspace"))?;
    // Free the hold, then charge what is available: the cost, or all that is left.
    ws.row.reserved_nanos -= hold.nanos();
    let charge = cost.min(ledger::available(&ws.row));
    let shortfall = cost.checked_sub(charge)?;
    ws.row.balance_nanos -= charge.nanos();
    ws.cause = Some(BalanceChangeCause::Usage);
    let balance_after = ws.row.balance_nanos;
    if let Some(project_id) = resolved.project_id {
        let project = loaded
            .projects
            .get_mut(&project_id)
            .ok_or(BillingError::NotFound("project"))?;
        roll(&mut project.row, now);
        project.row.budget_spent_nanos += cost.nanos();
        project.row.budget_reserved_nanos -= hold.nanos();
    }
    let event = usage_events::Model {
        id: event_id,
        workspace_id: resolved.workspace_id,
        project_id: resolved.project_id,
        user_id: resolved.user_id,
        api_key_id: resolved.api_key_id,
        model_id: resolved.model_id.clone(),
        prompt_tokens: req.prompt_tokens,
        completion_tokens: req.completion_tokens,
        cost_nanos: cost.nanos(),
        shortfall_nanos: shortfall.nanos(),
        request_id: resolved.request_id.clone(),
        request_hash: hash,
        reservation_id: Some(resolved.id),
        created_at: now,
    };
    let description = usage_description(&event);
    writes.postings.push(Posting {
        idempotency_key: format!("usage:{event_id}"),
        usage_event_id: event_id,
        entries: usage_entries(
            resolved.workspace_id,
            charge,
            cost,
            shortfall,
            balance_after,
            &description,
            now,
        )?,
        now,
    });
    writes.recorded.insert(key, writes.events.len());
    writes.events.push(event.clone());
    loaded.reservations.insert(resolved.id, resolved.clone());
    writes.resolved_reservations.push((resolved.clone(), from));
    Ok(Outcome::Done(Reply::Settle(Box::new(Ok(Settled {
        event,
        reservation: resolved,
        replayed: false,
    })))))
}

fn judge_release(
    loaded: &mut Loaded,
    writes: &mut Writes,
    reservation_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Outcome> {
    let Some(reservation) = loaded.reservations.get(&reservation_id) else {
        return Err(BillingError::NotFound("reservation"));
    };
    match reservation.status {
        ReservationStatus::Held => {}
        ReservationStatus::Released | ReservationStatus::Expired => {
            return Ok(Outcome::Done(Reply::Release(Ok(reservation.clone()))));
        }
        ReservationStatus::Settled => {
            return Err(BillingError::invalid("reservation is already settled"));
        }
    }
    let hold = reservation.amount_nanos;
    let mut resolved = reservation.clone();
    resolved.status = ReservationStatus::Released;
    resolved.resolved_at = Some(now);
    let ws = loaded
        .workspaces
        .get_mut(&resolved.workspace_id)
        .ok_or(BillingError::NotFound("workspace"))?;
    ws.row.reserved_nanos -= hold;
    ws.cause = Some(BalanceChangeCause::Release);
    if let Some(project_id) = resolved.project_id {
        let project = loaded
            .projects
            .get_mut(&project_id)
            .ok_or(BillingError::NotFound("project"))?;
        roll(&mut project.row, now);
        project.row.budget_reserved_nanos -= hold;
    }
    loaded.reservations.insert(resolved.id, resolved.clone());
    writes
        .resolved_reservations
        .push((resolved.clone(), ReservationStatus::Held));
    Ok(Outcome::Done(Reply::Release(Ok(resolved))))
}

/// Applies a batch in one transaction; on Ok, it has committed.
async fn apply_batch(
    db: &DatabaseConnection,
    batch: &[Pending],
    stats: &WriterStats,
) -> Result<(Vec<Outcome>, FollowUp)> {
    let started = std::time::Instant::now();
    let tx = begin_write(db).await?;
    let mut loaded = load(&tx, batch).await?;
    let loaded_at = add_us(&stats.load_us, started);
    let mut writes = Writes::default();
    let mut outcomes = Vec::with_capacity(batch.len());
    for Pending { op, now, .. } in batch {
        let now = *now;
        let judged = match op {
            Op::Usage { req, hash } => judge_usage(&mut loaded, &mut writes, req, hash, now)
                .map_err(|e| Reply::Usage(Err(e))),
            Op::Reserve { req, hash } => judge_reserve(&mut loaded, &mut writes, req, hash, now)
                .map_err(|e| Reply::Reserve(Err(e))),
            Op::Settle(req) => judge_settle(&mut loaded, &mut writes, req, now)
                .map_err(|e| Reply::Settle(Box::new(Err(e)))),
            Op::Release { reservation_id } => {
                judge_release(&mut loaded, &mut writes, *reservation_id, now)
                    .map_err(|e| Reply::Release(Err(e)))
            }
        };
        outcomes.push(judged.unwrap_or_else(Outcome::Done));
    }
    let judged_at = add_us(&stats.judge_us, loaded_at);
    let follow_up = write(&tx, &mut loaded, writes).await?;
    let written_at = add_us(&stats.write_us, judged_at);
    tx.commit().await?;
    add_us(&stats.commit_us, written_at);
    Ok((outcomes, follow_up))
}

async fn write(tx: &DatabaseTransaction, loaded: &mut Loaded, writes: Writes) -> Result<FollowUp> {
    let Writes {
        events,
        postings,
        new_reservations,
        resolved_reservations,
        ..
    } = writes;
    // Usage events first: the unique (workspace, request id) key is the last line of
    // defence against a double debit; a violation fails the whole batch.
    for chunk in events.chunks(INSERT_ROWS_MAX) {
        usage_events::Entity::insert_many(
            chunk
                .iter()
                .map(|e| e.clone().into_active_model().reset_all()),
        )
        .exec_without_returning(tx)
        .await?;
    }
    post_all(tx, &postings).await?;
    ledger::add_to_rollups(tx, &events).await?;
    for chunk in new_reservations.chunks(INSERT_ROWS_MAX) {
        reservation_rows::Entity::insert_many(
            chunk
                .iter()
                .map(|r| r.clone().into_active_model().reset_all()),
        )
        .exec_without_returning(tx)
        .await?;
    }
    for (resolved, from) in &resolved_reservations {
        use reservation_rows::Column as R;
        let changed = reservation_rows::Entity::update_many()
            .col_expr(R::Status, Expr::value(resolved.status.as_str()))
            .col_expr(R::UsageEventId, Expr::value(resolved.usage_event_id))
            .col_expr(R::ResolvedAt, Expr::value(resolved.resolved_at))
            .filter(R::Id.eq(resolved.id))
            .filter(R::Status.eq(*from))
            .exec(tx)
            .await?;
        if changed.rows_affected != 1 {
            return Err(BillingError::Internal(format!(
                "reservation {} changed under its lock",
                resolved.id
            )));
        }
    }
    for project in loaded.projects.values() {
        if project.row == project.before {
            continue;
        }
        use projects::Column as P;
        let changed = projects::Entity::update_many()
            .col_expr(
                P::BudgetSpentNanos,
                Expr::value(project.row.budget_spent_nanos),
            )
            .col_expr(
                P::BudgetReservedNanos,
                Expr::value(project.row.budget_reserved_nanos),
            )
            .col_expr(
                P::BudgetPeriodStart,
                Expr::value(project.row.budget_period_start),
            )
            .filter(P::Id.eq(project.row.id))
            .filter(P::BudgetSpentNanos.eq(project.before.budget_spent_nanos))
            .filter(P::BudgetReservedNanos.eq(project.before.budget_reserved_nanos))
            .filter(P::BudgetPeriodStart.eq(project.before.budget_period_start))
            .exec(tx)
            .await?;
        if changed.rows_affected != 1 {
            return Err(BillingError::Internal(format!(
                "project {} changed under its lock",
                project.row.id
            )));
        }
    }
    let mut follow_up = FollowUp::default();
    let mut changed_workspaces: Vec<&mut WorkspaceState> = loaded
        .workspaces
        .values_mut()
        .filter(|w| w.cause.is_some())
        .collect();
    changed_workspaces.sort_by_key(|w| w.row.id);
    for ws in &mut changed_workspaces {
        use workspaces::Column as W;
        let balance_delta = ws.row.balance_nanos - ws.balance_before;
        let reserved_delta = ws.row.reserved_nanos - ws.reserved_before;
        // Deltas plus the sequence we started from: under the lock the sequence
        // cannot have moved; if it did, the batch fails rather than overwrite.
        let updated = workspaces::Entity::update_many()
            .col_expr(
                W::BalanceNanos,
                Expr::col(W::BalanceNanos).add(balance_delta),
            )
            .col_expr(
                W::ReservedNanos,
                Expr::col(W::ReservedNanos).add(reserved_delta),
            )
            .col_expr(W::BalanceSequence, Expr::col(W::BalanceSequence).add(1))
            .filter(W::Id.eq(ws.row.id))
            .filter(W::BalanceSequence.eq(ws.sequence_before))
            .exec_with_returning(tx)
            .await?
            .pop();
        let expected = workspaces::Model {
            balance_sequence: ws.sequence_before + 1,
            ..ws.row.clone()
        };
        match updated {
            Some(row) if row == expected => ws.row = row,
            _ => {
                return Err(BillingError::Internal(format!(
                    "workspace {} changed under its lock",
                    ws.row.id
                )));
            }
        }
        let now = Utc::now();
        if let Some(purchase) = crate::policies::auto_reload::after_balance_change(tx, &ws.row, now).await? {
            follow_up.purchases.push(purchase.id);
        }
        follow_up
            .notifications
            .extend(crate::policies::alerts::after_balance_change(tx, &ws.row, now).await?);
    }
    // Balance events last, stamped as late as possible: `at` is when the batch went to
    // commit, which is what a subscriber measures its delivery delay from.
    if !changed_workspaces.is_empty() {
        let at = Utc::now();
        let rows = changed_workspaces
            .iter()
            .map(|ws| balance_events::ActiveModel {
                workspace_id: Set(ws.row.id),
                sequence: Set(ws.row.balance_sequence),
                balance_nanos: Set(ws.row.balance_nanos),
                reserved_nanos: Set(ws.row.reserved_nanos),
                cause: Set(ws.cause.unwrap_or(BalanceChangeCause::Usage)),
                created_at: Set(at),
                ..Default::default()
            });
        balance_events::Entity::insert_many(rows)
            .exec_without_returning(tx)
            .await?;
        if is_postgres(tx) {
            tx.execute_unprepared(&format!("SELECT pg_notify('{BALANCE_EVENTS_CHANNEL}', '')"))
                .await?;
        }
    }
    Ok(follow_up)
}

/// Inserts the batch's ledger transactions and their entries: two statements per
/// thousand postings instead of two per posting.
async fn post_all(tx: &DatabaseTransaction, postings: &[Posting]) -> Result<()> {
    for chunk in postings.chunks(INSERT_ROWS_MAX / 3) {
        let headers = chunk.iter().map(|p| ledger_transactions::ActiveModel {
            kind: Set("USAGE".to_owned()),
            idempotency_key: Set(p.idempotency_key.clone()),
            usage_event_id: Set(Some(p.usage_event_id)),
            purchase_id: Set(None),
            transfer_id: Set(None),
            created_at: Set(p.now),
            ..Default::default()
        });
        let inserted = ledger_transactions::Entity::insert_many(headers)
            .exec_with_returning(tx)
            .await?;
        let ids: HashMap<&str, i64> = inserted
            .iter()
            .map(|t| (t.idempotency_key.as_str(), t.id))
            .collect();
        let mut entries = Vec::with_capacity(chunk.len() * 3);
        for p in chunk {
            let id = *ids.get(p.idempotency_key.as_str()).ok_or_else(|| {
                BillingError::Internal(format!("no id returned for {}", p.idempotency_key))
            })?;
            for e in &p.entries {
                let mut e = e.clone();
                e.transaction_id = Set(id);
                entries.push(e);
            }
        }
        ledger_entries::Entity::insert_many(entries)
            .exec_without_returning(tx)
            .await?;
    }
    Ok(())
}
