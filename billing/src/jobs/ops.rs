//! What operators see and do with the background work (`reservoir jobs`): the rows
//! that need work are the truth (a PENDING purchase to capture, a notification to
//! e-mail, a webhook delivery to POST), so the listing counts them by kind and state
//! with the age of the oldest, `find` shows one, and `retry_dead` puts a DEAD
//! notification or webhook delivery back to PENDING. The queue's own job rows (apalis)
//! are the worker's to list and purge.

use super::JobSink;
use crate::error::{BillingError, Result};
use chrono::{DateTime, Utc};
use entity::{notifications, purchases, webhook_deliveries};
use sea_orm::sea_query::{Expr, Func};
use sea_orm::{DatabaseConnection, EntityTrait, QuerySelect};
use uuid::Uuid;

/// The kinds of work, as the CLI and the metrics name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkKind {
    /// Card purchases, captured by the capture job.
    Capture,
    /// Notifications, delivered by the e-mail job.
    Email,
    /// Webhook deliveries, POSTed by the webhook job.
    Webhook,
}

impl WorkKind {
    pub const ALL: [Self; 3] = [Self::Capture, Self::Email, Self::Webhook];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Capture => "capture",
            Self::Email => "email",
            Self::Webhook => "webhook",
        }
    }
}

/// How many rows of one kind are in one state, and since when the oldest is there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateCount {
    pub kind: WorkKind,
    pub state: String,
    pub count: i64,
    /// When the oldest of them was written.
    pub oldest_created_at: Option<DateTime<Utc>>,
}

type Grouped = Vec<(String, i64, Option<DateTime<Utc>>)>;

/// Every kind's rows counted by state, with the oldest one's creation time; kinds in
/// [`WorkKind::ALL`] order, states by name.
pub async fn summary(db: &DatabaseConnection) -> Result<Vec<StateCount>> {
    let count = || Expr::cust("COUNT(*)");
    let capture: Grouped = purchases::Entity::find()
        .select_only()
        .column(purchases::Column::Status)
        .expr(count())
        .expr(Func::min(Expr::col(purchases::Column::CreatedAt)))
        .group_by(purchases::Column::Status)
        .into_tuple()
        .all(db)
        .await?;
    let email: Grouped = notifications::Entity::find()
        .select_only()
        .column(notifications::Column::Status)
        .expr(count())
        .expr(Func::min(Expr::col(notifications::Column::CreatedAt)))
        .group_by(notifications::Column::Status)
        .into_tuple()
        .all(db)
        .await?;
    let webhook: Grouped = webhook_deliveries::Entity::find()
        .select_only()
        .column(webhook_deliveries::Column::Status)
        .expr(count())
        .expr(Func::min(Expr::col(webhook_deliveries::Column::CreatedAt)))
        .group_by(webhook_deliveries::Column::Status)
        .into_tuple()
        .all(db)
        .await?;
    let mut out = Vec::new();
    for (kind, rows) in [
        (WorkKind::Capture, capture),
        (WorkKind::Email, email),
        (WorkKind::Webhook, webhook),
    ] {
        let mut rows = rows;
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(rows.into_iter().map(|(state, count, oldest)| StateCount {
            kind,
            state,
            count,
            oldest_created_at: oldest,
        }));
    }
    Ok(out)
}

/// One piece of work, found by its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Work {
    Capture(purchases::Model),
    Email(notifications::Model),
    Webhook(webhook_deliveries::Model),
}

/// The purchase, notification or webhook delivery with this id; NOT_FOUND if none.
pub async fn find(db: &DatabaseConnection, id: Uuid) -> Result<Work> {
    if let Some(n) = notifications::Entity::find_by_id(id).one(db).await? {
        return Ok(Work::Email(n));
    }
    if let Some(d) = webhook_deliveries::Entity::find_by_id(id).one(db).await? {
        return Ok(Work::Webhook(d));
    }
    if let Some(p) = purchases::Entity::find_by_id(id).one(db).await? {
        return Ok(Work::Capture(p));
    }
    Err(BillingError::NotFound("job"))
}

/// A DEAD notification or webhook delivery back to PENDING, due now, with a fresh
/// attempt budget, and its job pushed. NOT_FOUND for an unknown id; INVALID_INPUT
/// for anything else (a purchase, or a row that is not DEAD).
pub async fn retry_dead(
    db: &DatabaseConnection,
    jobs: &dyn JobSink,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<Work> {
    match find(db, id).await? {
        Work::Email(_) => {
            let row = crate::policies::notifications::retry_dead(db, Some(jobs), id, now).await?;
            Ok(Work::Email(row))
        }
        Work::Webhook(_) => {
            let row = crate::webhooks::delivery::revive(db, Some(jobs), id, now).await?;
            Ok(Work::Webhook(row))
        }
        Work::Capture(_) => Err(BillingError::invalid(
            "a purchase is never DEAD: only a notification or a webhook delivery can be retried",
        )),
    }
}

/// The work of one kind waiting now: how many rows are due and not done, since when
/// the longest-waiting one has been due, and how many are DEAD (given up, waiting for
/// someone to retry them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backlog {
    pub kind: WorkKind,
    pub waiting: i64,
    pub oldest_due_at: Option<DateTime<Utc>>,
    pub dead: i64,
}

type CountSince = Option<(i64, Option<DateTime<Utc>>)>;

/// Every kind's backlog at `now` (for `/metrics`): PENDING purchases (due since they
/// were written); PENDING notifications and webhook deliveries whose next attempt is
/// due; DEAD notifications and deliveries.
pub async fn backlog(db: &DatabaseConnection, now: DateTime<Utc>) -> Result<Vec<Backlog>> {
    use entity::enums::{NotificationStatus, PurchaseStatus, WebhookDeliveryStatus};
    use sea_orm::{ColumnTrait, PaginatorTrait, QueryFilter};
    let count = || Expr::cust("COUNT(*)");
    let capture: CountSince = purchases::Entity::find()
        .select_only()
        .expr(count())
        .expr(Func::min(Expr::col(purchases::Column::CreatedAt)))
        .filter(purchases::Column::Status.eq(PurchaseStatus::Pending))
        .into_tuple()
        .one(db)
        .await?;
    let email: CountSince = notifications::Entity::find()
        .select_only()
        .expr(count())
        .expr(Func::min(Expr::col(notifications::Column::NextAttemptAt)))
        .filter(notifications::Column::Status.eq(NotificationStatus::Pending))
        .filter(notifications::Column::NextAttemptAt.lte(now))
        .into_tuple()
        .one(db)
        .await?;
    let webhook: CountSince = webhook_deliveries::Entity::find()
        .select_only()
        .expr(count())
        .expr(Func::min(Expr::col(
            webhook_deliveries::Column::NextAttemptAt,
        )))
        .filter(webhook_deliveries::Column::Status.eq(WebhookDeliveryStatus::Pending))
        .filter(webhook_deliveries::Column::NextAttemptAt.lte(now))
        .into_tuple()
        .one(db)
        .await?;
    let dead_email = notifications::Entity::find()
        .filter(notifications::Column::Status.eq(NotificationStatus::Dead))
        .count(db)
        .await?;
    let dead_webhook = webhook_deliveries::Entity::find()
        .filter(webhook_deliveries::Column::Status.eq(WebhookDeliveryStatus::Dead))
        .count(db)
        .await?;
    let of = |kind, row: CountSince, dead: u64| {
        let (waiting, oldest_due_at) = row.unwrap_or((0, None));
        Backlog {
            kind,
            waiting,
            oldest_due_at,
            dead: i64::try_from(dead).unwrap_or(i64::MAX),
        }
    };
    Ok(vec![
        of(WorkKind::Capture, capture, 0),
        of(WorkKind::Email, email, dead_email),
        of(WorkKind::Webhook, webhook, dead_webhook),
    ])
}

/// How a job ended: its work done (or nothing left to do), a retry scheduled, or an
/// error (the database could not be reached; the queue or the sweep tries again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    Done,
    Retry,
    Error,
}

impl JobOutcome {
    pub const ALL: [Self; 3] = [Self::Done, Self::Retry, Self::Error];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Retry => "retry",
            Self::Error => "error",
        }
    }
}

/// This process's job counters: runs by kind and outcome, and the time they took.
/// One per process ([`JOB_STATS`]): the worker records, `/metrics` of the same
/// process (`reservoir serve`) reads.
pub struct JobStats {
    runs: [[std::sync::atomic::AtomicU64; 3]; 3],
    micros: [std::sync::atomic::AtomicU64; 3],
}

pub static JOB_STATS: JobStats = JobStats {
    runs: [const { [const { std::sync::atomic::AtomicU64::new(0) }; 3] }; 3],
    micros: [const { std::sync::atomic::AtomicU64::new(0) }; 3],
};

const fn kind_index(kind: WorkKind) -> usize {
    match kind {
        WorkKind::Capture => 0,
        WorkKind::Email => 1,
        WorkKind::Webhook => 2,
    }
}

const fn outcome_index(outcome: JobOutcome) -> usize {
    match outcome {
        JobOutcome::Done => 0,
        JobOutcome::Retry => 1,
        JobOutcome::Error => 2,
    }
}

impl JobStats {
    /// Counts one job run.
    pub fn record(&self, kind: WorkKind, outcome: JobOutcome, took: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.runs[kind_index(kind)][outcome_index(outcome)].fetch_add(1, Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.micros[kind_index(kind)].fetch_add(micros, Relaxed);
    }

    /// Runs of a kind that ended so.
    pub fn runs(&self, kind: WorkKind, outcome: JobOutcome) -> u64 {
        self.runs[kind_index(kind)][outcome_index(outcome)]
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Time spent in runs of a kind.
    pub fn seconds(&self, kind: WorkKind) -> f64 {
        self.micros[kind_index(kind)].load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6
    }
}
