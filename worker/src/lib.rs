#![doc = include_str!("../README.md")]

pub mod email;
pub mod health;
pub mod jobs;
pub mod queue;
pub mod webhooks;

use apalis::prelude::*;
use billing::jobs::{CapturePurchase, JobSink};
use billing::payments::PaymentGateway;
use billing::sea_orm::DatabaseConnection;
use queue::Queue;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Time between two sweeps.
    pub sweep_interval_ms: u64,
    /// A PENDING purchase older than this is re-enqueued by the sweep.
    pub stale_after_ms: u64,
    /// How often the queue is polled for new jobs (also woken by pushes in-process).
    pub poll_interval_ms: u64,
    /// Jobs run at once per job type.
    pub concurrency: usize,
    /// Longest a charge may take.
    pub charge_timeout_ms: u64,
    /// Time allowed to running jobs after SIGTERM.
    pub shutdown_timeout_ms: u64,
    /// A notification still unsent this long after it was written is delivered by the
    /// sweep itself, not only re-enqueued.
    pub direct_delivery_after_ms: u64,
    /// A purchase still PENDING this long after it was written is captured by the sweep
    /// itself (at most one attempt per purchase per this interval), not only re-enqueued.
    pub direct_capture_after_ms: u64,
    /// A webhook delivery still due this long after its time is attempted by the
    /// sweep's own task, not only re-enqueued.
    pub direct_webhook_after_ms: u64,
    /// When failed webhook attempts are retried, and how many are made.
    pub webhook_retry: billing::retry::RetryPolicy,
    /// When failed e-mail deliveries are retried, and how many are made.
    pub notification_retry: billing::retry::RetryPolicy,
    /// Where the job workers report whether they can poll (read by `/readyz`); none:
    /// a state of their own that nobody reads.
    pub health: Option<Arc<health::WorkerHealth>>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            sweep_interval_ms: 5_000,
            // Longer than a capture's whole backoff (2 + 4 + 8 + 16 s), so the sweep does
            // not hurry retries; a reload started by a debit is picked up from here.
            stale_after_ms: 30_000,
            poll_interval_ms: 250,
            concurrency: 4,
            charge_timeout_ms: jobs::CHARGE_TIMEOUT_MS,
            shutdown_timeout_ms: 10_000,
            direct_delivery_after_ms: 30_000,
            direct_capture_after_ms: 60_000,
            direct_webhook_after_ms: 30_000,
            webhook_retry: billing::retry::RetryPolicy::WEBHOOKS,
            notification_retry: billing::retry::RetryPolicy::NOTIFICATIONS,
            health: None,
        }
    }
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub reservations_expired: u64,
    pub budget_periods_rolled: u64,
    pub purchases_requeued: u64,
    pub notifications_requeued: u64,
    pub reloads_repaired: u64,
    pub webhooks_requeued: u64,
}

/// Delivers notifications left due past `direct_delivery_after_ms`: e-mail must not
/// depend on the queue alone. Delivery is claim-based and idempotent, so racing the
/// queue's job is harmless; a failure schedules the row's next attempt, and a delayed
/// job is pushed for it. Returns how many were sent.
async fn deliver_overdue(deps: &jobs::Deps, config: &WorkerConfig) -> billing::Result<u64> {
    let after = i64::try_from(config.direct_delivery_after_ms).unwrap_or(i64::MAX);
    let overdue = billing::policies::notifications::due_notifications(
        &deps.db,
        chrono::Utc::now() - chrono::Duration::milliseconds(after),
        REQUEUE_BATCH_MAX,
    )
    .await?;
    let mut sent = 0;
    for notification_id in overdue {
        match jobs::deliver_once(deps, notification_id).await {
            Ok(None) => sent += 1,
            Ok(Some(delay)) => {
                let job = billing::jobs::DeliverNotification { notification_id };
                if let Err(e) = deps.queue.push_delivery(job, Some(delay)).await {
                    tracing::warn!(%notification_id, error = %e, "retry not pushed; the sweep re-enqueues it");
                }
            }
            Err(e) => {
                tracing::warn!(%notification_id, error = %e, "direct delivery failed; retried later")
            }
        }
    }
    Ok(sent)
}

/// Runs `work` in a task of its own unless the previous one still runs: the sweep's
/// fallbacks (direct capture and delivery) talk to a gateway or a mail server that
/// may be slow, and must never delay the sweeps.
fn spawn_fallback<F>(name: &'static str, running: &Arc<std::sync::atomic::AtomicBool>, work: F)
where
    F: Future<Output = billing::Result<u64>> + Send + 'static,
{
    use std::sync::atomic::Ordering;
    if running.swap(true, Ordering::AcqRel) {
        return;
    }
    let running = running.clone();
    tokio::spawn(async move {
        match work.await {
            Ok(0) => {}
            Ok(n) => tracing::info!(fallback = name, handled = n, "sweep fallback"),
            Err(e) => {
                tracing::error!(fallback = name, error = %e, code = %e.code(), "sweep fallback failed")
            }
        }
        running.store(false, Ordering::Release);
    });
}

/// Rows re-enqueued per sweep.
const REQUEUE_BATCH_MAX: u64 = 500;

/// One pass of every sweep. Each step is idempotent, so several workers sweeping at
/// once (or a sweep repeated after a crash) change nothing twice.
pub async fn sweep(
    db: &DatabaseConnection,
    sink: &dyn JobSink,
    config: &WorkerConfig,
) -> billing::Result<SweepReport> {
    let now = chrono::Utc::now();
    let stale = billing::payments::capture::stale_pending(
        db,
        chrono::Duration::milliseconds(i64::try_from(config.stale_after_ms).unwrap_or(i64::MAX)),
        now,
        REQUEUE_BATCH_MAX,
    )
    .await?;
    let mut purchases_requeued = 0;
    for purchase_id in stale {
        match sink.capture(CapturePurchase { purchase_id }).await {
            Ok(()) => purchases_requeued += 1,
            Err(e) => {
                tracing::warn!(%purchase_id, error = %e, "re-enqueue failed; next sweep retries")
            }
        }
    }
    let grace =
        chrono::Duration::milliseconds(i64::try_from(config.stale_after_ms).unwrap_or(i64::MAX));
    let due =
        billing::policies::notifications::due_notifications(db, now - grace, REQUEUE_BATCH_MAX)
            .await?;
    let mut notifications_requeued = 0;
    for notification_id in due {
        match sink
            .deliver(billing::jobs::DeliverNotification { notification_id })
            .await
        {
            Ok(()) => notifications_requeued += 1,
            Err(e) => {
                tracing::warn!(%notification_id, error = %e, "re-enqueue failed; next sweep retries")
            }
        }
    }
    let webhooks_requeued = requeue_webhooks(db, sink, now - grace).await?;
    Ok(SweepReport {
        webhooks_requeued,
        reservations_expired: billing::debits::reservations::expire_due(db, now).await?,
        budget_periods_rolled: billing::debits::usage::roll_budget_periods(db, now).await?,
        purchases_requeued,
        notifications_requeued,
        reloads_repaired: billing::policies::auto_reload::repair_stuck_reloads(db, now).await?,
    })
}

/// Re-enqueues webhook deliveries due since before `before` that no job picked up
/// (a lost push, a crashed worker's lapsed claim).
async fn requeue_webhooks(
    db: &DatabaseConnection,
    sink: &dyn JobSink,
    before: chrono::DateTime<chrono::Utc>,
) -> billing::Result<u64> {
    let due = billing::webhooks::delivery::due(db, before, REQUEUE_BATCH_MAX).await?;
    let count = due.len() as u64;
    billing::webhooks::delivery::push(sink, due).await;
    Ok(count)
}

/// When the sweep last attempted each overdue purchase itself.
type Tried = std::collections::HashMap<uuid::Uuid, std::time::Instant>;

/// Captures purchases left PENDING past `direct_capture_after_ms`: payments must not
/// depend on the queue alone. Each purchase gets at most one attempt per interval, so
/// the capture backoff still spaces the attempts. Idempotent like the job.
async fn capture_overdue(
    deps: &jobs::Deps,
    config: &WorkerConfig,
    tried: &tokio::sync::Mutex<Tried>,
) -> billing::Result<u64> {
    let mut tried = tried.lock().await;
    let interval = Duration::from_millis(config.direct_capture_after_ms);
    tried.retain(|_, at| at.elapsed() < interval);
    let after = chrono::Duration::milliseconds(
        i64::try_from(config.direct_capture_after_ms).unwrap_or(i64::MAX),
    );
    let overdue = billing::payments::capture::stale_pending(
        &deps.db,
        after,
        chrono::Utc::now(),
        REQUEUE_BATCH_MAX,
    )
    .await?;
    let mut attempted = 0;
    for purchase_id in overdue {
        if tried.contains_key(&purchase_id) {
            continue;
        }
        tried.insert(purchase_id, std::time::Instant::now());
        attempted += 1;
        if let Err(e) = jobs::capture_once(deps, purchase_id).await {
            tracing::warn!(%purchase_id, error = %e, "direct capture failed; retried later");
        }
    }
    Ok(attempted)
}

async fn sweep_loop(
    deps: Arc<jobs::Deps>,
    config: WorkerConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let tried = Arc::new(tokio::sync::Mutex::new(Tried::new()));
    let running = Fallbacks::default();
    let (db, sink) = (deps.db.clone(), deps.queue.clone());
    let mut ticker =
        tokio::time::interval(Duration::from_millis(config.sweep_interval_ms.max(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
            _ = ticker.tick() => match sweep(&db, &sink, &config).await {
                Ok(report) => {
                    spawn_fallbacks(&deps, &config, &tried, &running);
                    if report != SweepReport::default() {
                        tracing::info!(
                            reservations_expired = report.reservations_expired,
                            budget_periods_rolled = report.budget_periods_rolled,
                            purchases_requeued = report.purchases_requeued,
                            notifications_requeued = report.notifications_requeued,
                            reloads_repaired = report.reloads_repaired,
                            webhooks_requeued = report.webhooks_requeued,
                            "sweep"
                        );
                    }
                }
                // Logged here, where it is handled: the next tick tries again.
                Err(e) => tracing::error!(error = %e, code = %e.code(), "sweep failed"),
            },
        }
    }
}

/// One flag per fallback: set while its task runs.
#[derive(Default)]
struct Fallbacks {
    capture: Arc<std::sync::atomic::AtomicBool>,
    delivery: Arc<std::sync::atomic::AtomicBool>,
    webhooks: Arc<std::sync::atomic::AtomicBool>,
}

/// The sweep's fallbacks for work the queue left behind, each in its own task (one
/// at a time per kind), so a slow gateway, mail server or receiver never delays the
/// next sweep.
fn spawn_fallbacks(
    deps: &Arc<jobs::Deps>,
    config: &WorkerConfig,
    tried: &Arc<tokio::sync::Mutex<Tried>>,
    running: &Fallbacks,
) {
    let (d, c, t) = (deps.clone(), config.clone(), tried.clone());
    spawn_fallback("capture", &running.capture, async move {
        capture_overdue(&d, &c, &t).await
    });
    let (d, c) = (deps.clone(), config.clone());
    spawn_fallback("delivery", &running.delivery, async move {
        deliver_overdue(&d, &c).await
    });
    webhooks::spawn_overdue(
        deps.db.clone(),
        deps.webhooks.clone(),
        Duration::from_millis(config.direct_webhook_after_ms),
        running.webhooks.clone(),
    );
}

/// A worker name unique per process and per restart (apalis refuses a name that is
/// still registered, and a worker that died may still be).
fn worker_name(kind: &str, restarts: u32) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!("reservoir-{kind}-{host}-{}-{restarts}", std::process::id())
}

/// First and longest wait before a job worker that failed is started again.
pub const RESTART_BACKOFF_MS_MIN: u64 = 250;
pub const RESTART_BACKOFF_MS_MAX: u64 = 30_000;

/// The wait before restart number `restarts` (1, 2, …): doubling from the minimum,
/// capped, so a database that is down is not hammered and one that is back is used
/// again within half a minute at most.
pub fn restart_backoff(restarts: u32) -> Duration {
    let doublings = restarts.saturating_sub(1).min(16);
    let ms = RESTART_BACKOFF_MS_MIN
        .saturating_mul(1u64 << doublings)
        .min(RESTART_BACKOFF_MS_MAX);
    Duration::from_millis(ms)
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Runs one kind of job worker until `stop`, starting a new one whenever it ends with
/// an error: a backend error (the database stopped, a connection killed, the pool
/// timed out) ends an apalis worker for good, which once left the queue unserved
/// until the process was restarted. Each failure is logged here, once, and `health`
/// has the kind down until it is started again (nobody polls its queue meanwhile).
async fn supervise<W, Fut>(
    kind: &'static str,
    stop: tokio::sync::watch::Receiver<bool>,
    health: Arc<health::WorkerHealth>,
    start: W,
) where
    W: Fn(String, tokio::sync::watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = Result<(), WorkerError>>,
{
    let mut restarts: u32 = 0;
    loop {
        health.set_down(kind, false);
        let outcome = start(worker_name(kind, restarts), stop.clone()).await;
        if *stop.borrow() {
            return;
        }
        health.set_down(kind, true);
        restarts = restarts.saturating_add(1);
        let wait = restart_backoff(restarts);
        match outcome {
            Ok(()) => tracing::warn!(
                kind,
                restarts,
                wait_ms = wait.as_millis() as u64,
                "job worker stopped unasked; restarting"
            ),
            Err(e) => {
                tracing::error!(kind, restarts, wait_ms = wait.as_millis() as u64, error = %e, "job worker failed; restarting")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(stop.clone()) => return,
        }
    }
}

/// The signal a worker's `run_until` waits for.
async fn until(stop: tokio::sync::watch::Receiver<bool>) -> Result<(), WorkerError> {
    stopped(stop).await;
    Ok(())
}

/// The capture and e-mail workers on one queue backend (whose storage types differ,
/// hence a macro), each under [`supervise`]; their join handles.
macro_rules! spawn_workers {
    ($capture:expr, $delivery:expr, $webhook:expr, $deps:expr, $config:expr, $stop:expr, $health:expr) => {{
        let (capture, delivery, webhook) = ($capture.clone(), $delivery.clone(), $webhook.clone());
        let poll = Duration::from_millis($config.poll_interval_ms.max(10));
        let concurrency = $config.concurrency.max(1);
        let (d1, d2, d3) = ($deps.clone(), $deps.clone(), $deps.clone());
        let capture_worker = move |name: String, stop| {
            WorkerBuilder::new(name)
                .backend(capture.clone().poll_with_strategy(queue::Every::new(poll)))
                .data(d1.clone())
                .concurrency(concurrency)
                .enable_tracing()
                .build(jobs::capture_purchase)
                .run_until(until(stop))
        };
        let delivery_worker = move |name: String, stop| {
            WorkerBuilder::new(name)
                .backend(delivery.clone().poll_with_strategy(queue::Every::new(poll)))
                .data(d2.clone())
                .concurrency(concurrency)
                .enable_tracing()
                .build(jobs::deliver_notification)
                .run_until(until(stop))
        };
        let webhook_worker = move |name: String, stop| {
            WorkerBuilder::new(name)
                .backend(webhook.clone().poll_with_strategy(queue::Every::new(poll)))
                .data(d3.clone())
                .concurrency(concurrency)
                .enable_tracing()
                .build(jobs::deliver_webhook)
                .run_until(until(stop))
        };
        vec![
            tokio::spawn(supervise(
                "capture",
                $stop.clone(),
                $health.clone(),
                capture_worker,
            )),
            tokio::spawn(supervise(
                "email",
                $stop.clone(),
                $health.clone(),
                delivery_worker,
            )),
            tokio::spawn(supervise(
                "webhook",
                $stop.clone(),
                $health.clone(),
                webhook_worker,
            )),
        ]
    }};
}

/// Runs the job workers and the sweeps until `shutdown` resolves; running jobs get
/// `shutdown_timeout_ms` to finish.
pub async fn run(
    db: DatabaseConnection,
    queue: Queue,
    gateway: Arc<dyn PaymentGateway>,
    mailer: email::Mailer,
    email_from: String,
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow_free::Result<()> {
    let deps = Arc::new(jobs::Deps {
        db: db.clone(),
        queue: queue.clone(),
        gateway,
        charge_timeout: Duration::from_millis(config.charge_timeout_ms),
        mailer,
        email_from,
        webhooks: webhooks::Sender::new(config.webhook_retry)?,
        notification_retry: config.notification_retry,
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sweeps = tokio::spawn(sweep_loop(deps.clone(), config.clone(), stop_rx.clone()));
    let poll_health = config
        .health
        .clone()
        .unwrap_or_else(health::WorkerHealth::new);
    let probe = tokio::spawn(health::probe_loop(
        db.clone(),
        queue.clone(),
        Arc::downgrade(&poll_health),
        stop_rx.clone(),
    ));
    let workers = match &queue {
        Queue::Sqlite {
            capture,
            delivery,
            webhook,
        } => spawn_workers!(
            capture,
            delivery,
            webhook,
            deps,
            config,
            stop_rx,
            poll_health
        ),
        Queue::Postgres {
            capture,
            delivery,
            webhook,
        } => spawn_workers!(
            capture,
            delivery,
            webhook,
            deps,
            config,
            stop_rx,
            poll_health
        ),
    };
    shutdown.await;
    let _ = stop_tx.send(true);
    let grace = Duration::from_millis(config.shutdown_timeout_ms);
    for worker in workers {
        if tokio::time::timeout(grace, worker).await.is_err() {
            tracing::warn!(
                timeout_ms = config.shutdown_timeout_ms,
                "a job worker did not stop in time"
            );
        }
    }
    let _ = sweeps.await;
    let _ = probe.await;
    tracing::info!("worker stopped");
    Ok(())
}

/// The worker's own error type (no anyhow in libraries).
pub mod anyhow_free {
    #[derive(Debug, thiserror::Error)]
    #[error("worker: {0}")]
    pub struct Error(pub String);
    pub type Result<T> = std::result::Result<T, Error>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn restart_backoff_doubles_and_is_capped() {
        assert_eq!(restart_backoff(1), Duration::from_millis(250));
        assert_eq!(restart_backoff(2), Duration::from_millis(500));
        assert_eq!(restart_backoff(5), Duration::from_millis(4_000));
        assert_eq!(
            restart_backoff(100),
            Duration::from_millis(RESTART_BACKOFF_MS_MAX)
        );
    }

    /// A worker that fails (as apalis's does when its backend errors) is started
    /// again, under a new name, until the stop; the stop ends the supervisor at once.
    #[tokio::test]
    async fn a_failed_worker_is_started_again_until_the_stop() {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let starts = Arc::new(AtomicU32::new(0));
        let names = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, n) = (starts.clone(), names.clone());
        let health = health::WorkerHealth::new();
        let supervisor = tokio::spawn(supervise("test", stop_rx, health, move |name, stop| {
            let (s, n) = (s.clone(), n.clone());
            async move {
                n.lock().map(|mut n| n.push(name)).ok();
                if s.fetch_add(1, Ordering::SeqCst) < 3 {
                    let lost = std::io::Error::other("connection to the queue lost");
                    return Err(WorkerError::BackendError(Box::new(lost)));
                }
                stopped(stop).await;
                Ok(())
            }
        }));
        // Backoffs of 250, 500 and 1 000 ms: the fourth start is at 1.75 s.
        for _ in 0..100 {
            if starts.load(Ordering::SeqCst) >= 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            starts.load(Ordering::SeqCst),
            4,
            "three failures, three restarts"
        );
        let names = names.lock().map(|n| n.clone()).unwrap_or_default();
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "a new name each time: {names:?}");
        let _ = stop_tx.send(true);
        tokio::time::timeout(Duration::from_secs(1), supervisor)
            .await
            .expect("the stop ends the supervisor")
            .expect("no panic");
    }
}
