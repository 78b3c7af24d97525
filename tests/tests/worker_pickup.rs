//! The pickup stall, looked for: jobs pushed in bursts (now, and delayed by 1–2 s)
//! through a queue connection of their own while a worker runs, as another process
//! would push them. Every job must be picked up within a few poll intervals, never on
//! apalis's 30 s heartbeat (once seen: `lock_at` on a 30 s cadence). The test stays
//! under the sweep's 30 s re-enqueue, so the sweep cannot hide a stall.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::entity::enums::{AlertSeverity, NotificationStatus};
use billing::policies::notifications::{self as notes, LowBalanceAlert, NotificationPayload};
use reservoir_tests::{Fixture, TestDb};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const BURSTS: usize = 8;
const PER_BURST: usize = 25;
/// Far below the 30 s heartbeat; a healthy pickup takes a poll interval (250 ms) plus
/// the delivery.
const PICKUP_BOUND: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_pushed_while_the_worker_runs_are_picked_up_at_once() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("TEST_LOG").unwrap_or_else(|_| "off".into()))
        .with_test_writer()
        .try_init();
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let outbox = tempfile::tempdir()?;
    // The worker's production settings: 250 ms poll, 30 s before any sweep help.
    let worker_queue = worker::queue::Queue::connect(&t.queue_url()).await?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let (db, mailer) = (
        t.second_pool().await?,
        worker::email::Mailer::outbox(outbox.path()),
    );
    let gateway: std::sync::Arc<dyn billing::payments::PaymentGateway> =
        std::sync::Arc::new(billing::payments::SandboxGateway::new());
    let handle = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.changed().await;
        };
        let from = "Reservoir <billing@reservoir.test>".to_owned();
        let config = worker::WorkerConfig::default();
        worker::run(db, worker_queue, gateway, mailer, from, config, shutdown).await
    });
    // Another process's pushes: a queue connection of its own.
    let pusher = worker::queue::Queue::connect(&t.queue_url()).await?;
    let owner = ["owner@test.example".to_owned()];
    let mut due: HashMap<uuid::Uuid, chrono::DateTime<chrono::Utc>> = HashMap::new();
    let started = Instant::now();
    for burst in 0..BURSTS {
        for n in 0..PER_BURST {
            let payload = NotificationPayload::LowBalanceAlert(LowBalanceAlert {
                workspace_id: f.ws_a,
                workspace_name: "A".into(),
                severity: AlertSeverity::Warning,
                threshold: billing::Credits::from_nanos(1),
                balance: billing::Credits::from_nanos(0),
                projected_depletion_at: None,
            });
            let key = format!("pickup-{burst}-{n}");
            let id = notes::enqueue_notification(
                &t.db,
                Some(f.account_id),
                Some(f.ws_a),
                &owner,
                &payload,
                &key,
                chrono::Utc::now(),
            )
            .await?
            .ok_or_else(|| anyhow::anyhow!("not written"))?;
            // Every other burst delayed by 1–2 s: a due time the worker must notice.
            let delay =
                (burst % 2 == 1).then(|| Duration::from_millis(1_000 + 100 * n as u64 % 1_000));
            pusher
                .push_delivery(
                    billing::jobs::DeliverNotification {
                        notification_id: id,
                    },
                    delay,
                )
                .await
                .map_err(anyhow::Error::msg)?;
            due.insert(
                id,
                chrono::Utc::now() + chrono::Duration::from_std(delay.unwrap_or_default())?,
            );
        }
        tokio::time::sleep(Duration::from_millis(1_200)).await;
    }
    // Wait for all of them; each one's wait is from its due time to its `sent_at`.
    let mut sent_after: HashMap<uuid::Uuid, Duration> = HashMap::new();
    while sent_after.len() < due.len() && started.elapsed() < Duration::from_secs(28) {
        for (id, at) in &due {
            if sent_after.contains_key(id) {
                continue;
            }
            let n = notes::load_notification(&t.db, *id).await?;
            if let (NotificationStatus::Sent, Some(sent_at)) = (n.status, n.sent_at) {
                sent_after.insert(*id, (sent_at - *at).to_std().unwrap_or_default());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(15), handle).await;
    let mut waits: Vec<Duration> = sent_after.values().copied().collect();
    waits.sort();
    let pct = |p: usize| waits.get(waits.len().saturating_sub(1) * p / 100).copied();
    eprintln!(
        "{} of {} jobs done; from due to sent_at: p50 {:?}, p99 {:?}, max {:?}",
        waits.len(),
        due.len(),
        pct(50),
        pct(99),
        waits.last()
    );
    assert_eq!(
        waits.len(),
        due.len(),
        "every job was done before the sweep could help"
    );
    assert!(
        waits.last().is_some_and(|w| *w < PICKUP_BOUND),
        "a job waited {:?} (the 30 s heartbeat?)",
        waits.last()
    );
    t.finish().await
}
