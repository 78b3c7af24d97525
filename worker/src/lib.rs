#![doc = include_str!("../README.md")]

pub mod email;
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
    pub webhook_retry: billing::webhooks::delivery::RetryPolicy,
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
            webhook_retry: billing::webhooks::delivery::RetryPolicy::default(),
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
    /// Delivered by the sweep itself (the fallback for notifications the queue left).
    pub notifications_delivered: u64,
    /// Capture attempts made by the sweep itself (the fallback for purchases the queue left).
    pub purchases_captured_directly: u64,
    pub reloads_repaired: u64,
    pub webhooks_requeued: u64,
}

/// Delivers notifications left unsent past `direct_delivery_after_ms`: e-mail must not
/// depend on the queue alone. Delivery is claim-based and idempotent, so racing the
/// queue's job is harmless.
async fn deliver_overdue(deps: &jobs::Deps, config: &WorkerConfig) -> billing::Result<u64> {
    let now = chrono::Utc::now();
    let after = i64::try_from(config.direct_delivery_after_ms).unwrap_or(i64::MAX);
    let overdue = billing::policies::notifications::due_notifications(
        &deps.db,
        now - chrono::Duration::milliseconds(after),
        REQUEUE_BATCH_MAX,
    )
    .await?;
    let mut delivered = 0;
    for id in overdue {
        match email::deliver(&deps.db, &deps.mailer, id, &deps.email_from, now).await {
            Ok(email::DeliveryOutcome::Sent) => delivered += 1,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(notification_id = %id, error = %e, "direct delivery failed; retried later")
            }
        }
    }
    Ok(delivered)
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
        notifications_delivered: 0,
        purchases_captured_directly: 0,
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

/// Captures purchases left PENDING past `direct_capture_after_ms`: payments must not
/// depend on the queue alone. Each purchase gets at most one attempt per interval, so
/// the capture backoff still spaces the attempts. Idempotent like the job.
async fn capture_overdue(
    deps: &jobs::Deps,
    config: &WorkerConfig,
    tried: &mut std::collections::HashMap<uuid::Uuid, std::time::Instant>,
) -> billing::Result<u64> {
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
    let mut tried = std::collections::HashMap::new();
    let webhooks_running = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (db, sink) = (deps.db.clone(), deps.queue.clone());
    let mut ticker =
        tokio::time::interval(Duration::from_millis(config.sweep_interval_ms.max(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
            _ = ticker.tick() => match sweep(&db, &sink, &config).await {
                Ok(mut report) => {
                    match capture_overdue(&deps, &config, &mut tried).await {
                        Ok(n) => report.purchases_captured_directly = n,
                        Err(e) => tracing::error!(error = %e, code = %e.code(), "overdue capture failed"),
                    }
                    webhooks::spawn_overdue(
                        db.clone(),
                        deps.webhooks.clone(),
                        Duration::from_millis(config.direct_webhook_after_ms),
                        webhooks_running.clone(),
                    );
                    match deliver_overdue(&deps, &config).await {
                        Ok(n) => report.notifications_delivered = n,
                        Err(e) => tracing::error!(error = %e, code = %e.code(), "overdue delivery failed"),
                    }
                    if report != SweepReport::default() {
                        tracing::info!(
                            reservations_expired = report.reservations_expired,
                            budget_periods_rolled = report.budget_periods_rolled,
                            purchases_requeued = report.purchases_requeued,
                            notifications_requeued = report.notifications_requeued,
                            notifications_delivered = report.notifications_delivered,
                            purchases_captured_directly = report.purchases_captured_directly,
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

/// A worker name unique per process (apalis refuses a name still registered).
fn worker_name(kind: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!("reservoir-{kind}-{host}-{}", std::process::id())
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
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sweeps = tokio::spawn(sweep_loop(deps.clone(), config.clone(), stop_rx));
    let poll = Duration::from_millis(config.poll_interval_ms.max(10));
    let concurrency = config.concurrency.max(1);
    let monitor =
        Monitor::new().shutdown_timeout(Duration::from_millis(config.shutdown_timeout_ms));
    macro_rules! workers {
        ($capture:expr, $delivery:expr, $webhook:expr) => {{
            let (capture, delivery, webhook) = ($capture, $delivery, $webhook);
            let (d1, d2, d3) = (deps.clone(), deps.clone(), deps.clone());
            monitor
                .register(move |_| {
                    WorkerBuilder::new(worker_name("capture"))
                        .backend(capture.clone().poll_with_interval(poll))
                        .data(d1.clone())
                        .concurrency(concurrency)
                        .enable_tracing()
                        .build(jobs::capture_purchase)
                })
                .register(move |_| {
                    WorkerBuilder::new(worker_name("email"))
                        .backend(delivery.clone().poll_with_interval(poll))
                        .data(d2.clone())
                        .concurrency(concurrency)
                        .enable_tracing()
                        .build(jobs::deliver_notification)
                })
                .register(move |_| {
                    WorkerBuilder::new(worker_name("webhook"))
                        .backend(webhook.clone().poll_with_interval(poll))
                        .data(d3.clone())
                        .concurrency(concurrency)
                        .enable_tracing()
                        .build(jobs::deliver_webhook)
                })
        }};
    }
    let monitor = match &queue {
        Queue::Sqlite {
            capture,
            delivery,
            webhook,
        } => workers!(capture.clone(), delivery.clone(), webhook.clone()),
        Queue::Postgres {
            capture,
            delivery,
            webhook,
        } => workers!(capture.clone(), delivery.clone(), webhook.clone()),
    };
    let result = monitor
        .run_with_signal(async move {
            shutdown.await;
            Ok(())
        })
        .await;
    let _ = stop_tx.send(true);
    let _ = sweeps.await;
    tracing::info!("worker stopped");
    result.map_err(|e| anyhow_free::Error(e.to_string()))
}

/// The worker's own error type (no anyhow in libraries).
pub mod anyhow_free {
    #[derive(Debug, thiserror::Error)]
    #[error("worker: {0}")]
    pub struct Error(pub String);
    pub type Result<T> = std::result::Result<T, Error>;
}
