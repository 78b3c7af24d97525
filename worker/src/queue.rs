//! The durable job queue (apalis): SQLite in its own file on the embedded default,
//! PostgreSQL in the database itself in production. One storage per job type, each
//! with a fixed queue name.

use apalis::prelude::*;
use apalis_postgres::PostgresStorage;
use apalis_sqlite::SqliteStorage;
use billing::jobs::{
    CAPTURE_QUEUE, CapturePurchase, DELIVERY_QUEUE, DeliverNotification, DeliverWebhook, JobSink,
    PushFuture, WEBHOOK_QUEUE,
};
use billing::sea_orm::sqlx;
use std::str::FromStr;
use std::time::Duration;

/// Attempts apalis itself makes for a job that returns an error (the handlers retry
/// transient payment failures themselves, durably, with their own backoff).
pub const JOB_ATTEMPTS_MAX: usize = 3;

/// How often each job worker tells the queue it is alive. apalis's default is 30 s.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// Heartbeats a job worker may miss before the jobs it had fetched count as orphaned:
/// any other job worker of the queue puts them back to Pending on its next heartbeat.
/// 2 s × 3: a job fetched by a worker that was killed (SIGKILL, a crash) runs again
/// about 6 s later, instead of waiting for the sweep's re-push (`stale_after_ms`, 30 s)
/// or apalis's defaults (60 s on SQLite, 300 s on PostgreSQL). A live worker that
/// misses three beats (a queue database stalled for 6 s) may see a job it holds run
/// again elsewhere: every handler is idempotent (the capture's idempotency key and
/// status guard, the notification and delivery claims).
pub const MISSED_HEARTBEATS: usize = 3;

#[derive(Clone)]
pub enum Queue {
    Sqlite {
        capture: SqliteStorage<CapturePurchase>,
        delivery: SqliteStorage<DeliverNotification>,
        webhook: SqliteStorage<DeliverWebhook>,
    },
    Postgres {
        capture: PostgresStorage<CapturePurchase>,
        delivery: PostgresStorage<DeliverNotification>,
        webhook: PostgresStorage<DeliverWebhook>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue URL: {0}")]
    Url(String),
    #[error("queue database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("queue setup: {0}")]
    Setup(String),
}

fn sqlite_config(queue: &str) -> apalis_sqlite::Config {
    apalis_sqlite::Config::default()
        .queue(queue)
        .heartbeat_interval(HEARTBEAT_INTERVAL)
        .missed_heartbeats(MISSED_HEARTBEATS)
}

fn postgres_config(queue: &str) -> apalis_postgres::Config {
    apalis_postgres::Config::default()
        .queue(queue)
        .heartbeat_interval(HEARTBEAT_INTERVAL)
        .missed_heartbeats(MISSED_HEARTBEATS)
}

impl Queue {
    /// One round trip to the queue's database over the job workers' pool (the
    /// readiness probe, `crate::health`): an error when it cannot be reached.
    pub async fn ping(&self) -> Result<(), QueueError> {
        match self {
            Self::Sqlite { capture, .. } => {
                sqlx::query("SELECT 1").execute(capture.pool()).await?;
            }
            Self::Postgres { capture, .. } => {
                sqlx::query("SELECT 1").execute(capture.pool()).await?;
            }
        }
        Ok(())
    }

    /// Connects to the queue and creates its tables if needed.
    pub async fn connect(url: &str) -> Result<Self, QueueError> {
        if url.starts_with("sqlite:") {
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                .map_err(|e| QueueError::Url(e.to_string()))?
                .create_if_missing(true)
                .busy_timeout(Duration::from_secs(30));
            // The queue's own pool: apalis tunes it for speed (synchronous=OFF), which
            // must never apply to the money database (STACK.md, trap 8).
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(options)
                .await?;
            SqliteStorage::<()>::setup(&pool)
                .await
                .map_err(|e| QueueError::Setup(e.to_string()))?;
            Ok(Self::Sqlite {
                capture: SqliteStorage::new(&pool).with_config(sqlite_config(CAPTURE_QUEUE)),
                delivery: SqliteStorage::new(&pool).with_config(sqlite_config(DELIVERY_QUEUE)),
                webhook: SqliteStorage::new(&pool).with_config(sqlite_config(WEBHOOK_QUEUE)),
            })
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .connect(url)
                .await?;
            PostgresStorage::<()>::setup(&pool)
                .await
                .map_err(|e| QueueError::Setup(e.to_string()))?;
            Ok(Self::Postgres {
                capture: PostgresStorage::new(&pool).with_config(postgres_config(CAPTURE_QUEUE)),
                delivery: PostgresStorage::new(&pool).with_config(postgres_config(DELIVERY_QUEUE)),
                webhook: PostgresStorage::new(&pool).with_config(postgres_config(WEBHOOK_QUEUE)),
            })
        } else {
            Err(QueueError::Url(
                "the queue must be a sqlite:// or postgres:// URL".into(),
            ))
        }
    }

    /// Pushes a capture job, optionally delayed (a durable retry with backoff).
    pub async fn push_capture(
        &self,
        job: CapturePurchase,
        delay: Option<Duration>,
    ) -> Result<(), String> {
        let task = build(job, delay);
        match self {
            Self::Sqlite { capture, .. } => capture
                .clone()
                .push_task(task)
                .await
                .map_err(|e| e.to_string()),
            Self::Postgres { capture, .. } => capture
                .clone()
                .push_task(task)
                .await
                .map_err(|e| e.to_string()),
        }
    }

    pub async fn push_delivery(
        &self,
        job: DeliverNotification,
        delay: Option<Duration>,
    ) -> Result<(), String> {
        let task = build(job, delay);
        match self {
            Self::Sqlite { delivery, .. } => delivery
                .clone()
                .push_task(task)
                .await
                .map_err(|e| e.to_string()),
            Self::Postgres { delivery, .. } => delivery
                .clone()
                .push_task(task)
                .await
                .map_err(|e| e.to_string()),
        }
    }
}

impl Queue {
    /// Pushes a webhook attempt, optionally delayed (the retry schedule's wait).
    pub async fn push_webhook(
        &self,
        job: DeliverWebhook,
        delay: Option<Duration>,
    ) -> Result<(), String> {
        let task = build(job, delay);
        match self {
            Self::Sqlite { webhook, .. } => webhook
                .clone()
                .push_task(task)
                .await
                .map_err(|e| e.to_string()),
            Self::Postgres { webhook, .. } => webhook
                .clone()
                .push_task(task)
                .await
                .map_err(|e| e.to_string()),
        }
    }
}

fn build<T>(job: T, delay: Option<Duration>) -> Task<T> {
    let builder = TaskBuilder::new(job).max_attempts(JOB_ATTEMPTS_MAX);
    match delay {
        Some(d) => builder.run_after(d).build(),
        None => builder.build(),
    }
}

impl JobSink for Queue {
    fn capture(&self, job: CapturePurchase) -> PushFuture<'_> {
        Box::pin(self.push_capture(job, None))
    }
    fn deliver(&self, job: DeliverNotification) -> PushFuture<'_> {
        Box::pin(self.push_delivery(job, None))
    }
    fn deliver_webhook(&self, job: DeliverWebhook) -> PushFuture<'_> {
        Box::pin(self.push_webhook(job, None))
    }
}

/// How many of the queue's job rows of one queue are in one apalis state, and the
/// earliest `run_at` among them (unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueCount {
    pub queue: String,
    pub status: String,
    pub count: i64,
    pub earliest_run_at: Option<i64>,
}

/// A job worker as the queue knows it: its name, its queue, and its last heartbeat
/// (unix seconds; every `HEARTBEAT_INTERVAL` while the worker runs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerSeen {
    pub name: String,
    pub queue: String,
    pub last_seen: i64,
}

impl Queue {
    /// The queue's job rows counted by queue and apalis state (Pending, Queued,
    /// Running, Done, Failed, Killed), with the earliest `run_at` of each.
    pub async fn counts(&self) -> Result<Vec<QueueCount>, QueueError> {
        let rows: Vec<(String, String, i64, Option<i64>)> = match self {
            Self::Sqlite { capture, .. } => {
                sqlx::query_as(
                    "SELECT job_type, status, COUNT(*), MIN(run_at) FROM Jobs \
                     GROUP BY job_type, status ORDER BY job_type, status",
                )
                .fetch_all(capture.pool())
                .await?
            }
            Self::Postgres { capture, .. } => {
                sqlx::query_as(
                    "SELECT job_type, status, COUNT(*)::BIGINT, \
                     EXTRACT(EPOCH FROM MIN(run_at))::BIGINT FROM apalis.jobs \
                     GROUP BY job_type, status ORDER BY job_type, status",
                )
                .fetch_all(capture.pool())
                .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(queue, status, count, earliest_run_at)| QueueCount {
                queue,
                status,
                count,
                earliest_run_at,
            })
            .collect())
    }

    /// The job workers the queue has heard from since `since` (unix seconds), the most
    /// recently seen first.
    pub async fn workers_seen(&self, since: i64) -> Result<Vec<WorkerSeen>, QueueError> {
        let rows: Vec<(String, String, i64)> = match self {
            Self::Sqlite { capture, .. } => {
                sqlx::query_as(
                    "SELECT id, worker_type, last_seen FROM Workers \
                     WHERE last_seen >= ?1 ORDER BY last_seen DESC, id",
                )
                .bind(since)
                .fetch_all(capture.pool())
                .await?
            }
            Self::Postgres { capture, .. } => {
                sqlx::query_as(
                    "SELECT id, worker_type, EXTRACT(EPOCH FROM last_seen)::BIGINT \
                     FROM apalis.workers WHERE last_seen >= to_timestamp($1) \
                     ORDER BY last_seen DESC, id",
                )
                .bind(since)
                .fetch_all(capture.pool())
                .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(name, queue, last_seen)| WorkerSeen {
                name,
                queue,
                last_seen,
            })
            .collect())
    }

    /// Deletes finished job rows (done, killed, or failed with no attempt left) that
    /// finished before `before` (unix seconds); how many. The rows that needed the
    /// work (purchases, notifications, deliveries) are untouched.
    pub async fn purge_finished(&self, before: i64) -> Result<u64, QueueError> {
        let done = match self {
            Self::Sqlite { capture, .. } => sqlx::query(
                "DELETE FROM Jobs WHERE (status IN ('Done', 'Killed') \
                     OR (status = 'Failed' AND attempts >= max_attempts)) \
                     AND done_at IS NOT NULL AND done_at < ?1",
            )
            .bind(before)
            .execute(capture.pool())
            .await?
            .rows_affected(),
            Self::Postgres { capture, .. } => sqlx::query(
                "DELETE FROM apalis.jobs WHERE (status IN ('Done', 'Killed') \
                     OR (status = 'Failed' AND attempts >= max_attempts)) \
                     AND done_at IS NOT NULL AND done_at < to_timestamp($1)",
            )
            .bind(before)
            .execute(capture.pool())
            .await?
            .rows_affected(),
        };
        Ok(done)
    }
}

/// How a job worker is woken to look for due jobs: every `interval`, reliably.
///
/// apalis's own `IntervalStrategy` (`poll_with_interval`) re-arms its timer after a
/// tick without polling it, so the new timer holds no waker; whether the worker looks
/// again then depends on something else waking it. Under a burst of jobs on
/// PostgreSQL it was seen to stop looking until its 30 s heartbeat (the pickup stall;
/// `tests/tests/worker_pickup.rs`). This one polls its new timer at once, so every
/// tick wakes the worker.
pub struct Every {
    interval: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Every {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            sleep: Box::pin(tokio::time::sleep(interval)),
        }
    }
}

impl PollStrategy for Every {
    fn poll_drive(
        &mut self,
        cx: &mut std::task::Context<'_>,
        _snapshot: &PollSnapshot,
    ) -> std::task::Poll<Option<()>> {
        use std::future::Future as _;
        if self.sleep.as_mut().poll(cx).is_pending() {
            return std::task::Poll::Pending;
        }
        self.sleep
            .as_mut()
            .reset(tokio::time::Instant::now() + self.interval);
        // Arms the waker for the next tick (not due yet, so this is Pending).
        let _ = self.sleep.as_mut().poll(cx);
        std::task::Poll::Ready(Some(()))
    }
}
