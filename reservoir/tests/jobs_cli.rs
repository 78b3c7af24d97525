//! `reservoir jobs`, run as the binary against a database with work in every state:
//! the listing counts it by kind and state with the oldest's age and shows the queue's
//! job rows and the workers' heartbeats; `show` prints one row; `retry` puts a DEAD
//! notification back to PENDING and pushes its job (and refuses one that is not DEAD);
//! `purge` deletes the queue's finished job rows. SQLite by default, PostgreSQL with
//! TEST_DATABASE_URL.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::Credits;
use billing::entity::enums::{AlertSeverity, NotificationStatus};
use billing::policies::notifications::{self as notes, LowBalanceAlert, NotificationPayload};
use billing::retry::RetryPolicy;
use reservoir_tests::{Fixture, TestDb};
use std::process::Command;
use std::time::Duration;

struct Cli<'a> {
    t: &'a TestDb,
    data_dir: &'a std::path::Path,
}

impl Cli<'_> {
    /// Runs `reservoir jobs <args>`: exit success, stdout, stderr.
    fn run(&self, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        let out = Command::new(env!("CARGO_BIN_EXE_reservoir"))
            .arg("jobs")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RESERVOIR_DATA_DIR", self.data_dir)
            .env("RESERVOIR_DATABASE_URL", &self.t.url)
            .env("RESERVOIR_QUEUE_URL", self.t.queue_url())
            .env("RESERVOIR_LOG_FORMAT", "pretty")
            .env("RESERVOIR_LOG", "warn")
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let (ok, stdout, stderr) = self.run(args)?;
        anyhow::ensure!(ok, "jobs {args:?} failed:\n{stdout}\n{stderr}");
        Ok(stdout)
    }
}

/// The listing's row for a kind and state, as its whitespace-separated words.
fn row<'a>(listing: &'a str, kind: &str, state: &str) -> Option<Vec<&'a str>> {
    listing
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.first() == Some(&kind) && w.get(1) == Some(&state))
}

fn alert(f: &Fixture, balance: i64) -> NotificationPayload {
    NotificationPayload::LowBalanceAlert(LowBalanceAlert {
        workspace_id: f.ws_a,
        workspace_name: "A".into(),
        severity: AlertSeverity::Warning,
        threshold: Credits::from_nanos(20_000_000_000),
        balance: Credits::from_nanos(balance),
        projected_depletion_at: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_lists_shows_retries_and_purges() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let owner = ["owner@test.example".to_owned()];
    let write = |key: &'static str, balance: i64| {
        let payload = alert(&f, balance);
        let db = t.db.clone();
        let owner = owner.clone();
        async move {
            notes::enqueue_notification(
                &db,
                Some(f.account_id),
                Some(f.ws_a),
                &owner,
                &payload,
                key,
                now - chrono::Duration::minutes(5),
            )
            .await?
            .ok_or_else(|| anyhow::anyhow!("not written"))
        }
    };
    // One PENDING notification, one DEAD (its only attempt failed).
    let pending = write("pending", 1).await?;
    let dead = write("dead", 2).await?;
    let one = RetryPolicy {
        attempts_max: 1,
        ..RetryPolicy::NOTIFICATIONS
    };
    notes::claim_for_delivery(&t.db, dead, now).await?;
    notes::record_failure(&t.db, dead, "550 mailbox unavailable", &one, now).await?;
    // One job in the queue.
    let queue = worker::queue::Queue::connect(&t.queue_url()).await?;
    queue
        .push_delivery(
            billing::jobs::DeliverNotification {
                notification_id: pending,
            },
            None,
        )
        .await
        .map_err(anyhow::Error::msg)?;

    let dir = tempfile::tempdir()?;
    let cli = Cli {
        t: &t,
        data_dir: dir.path(),
    };
    let listing = cli.ok(&["list"])?;
    eprintln!("{listing}");
    let p = row(&listing, "email", "PENDING").ok_or_else(|| anyhow::anyhow!("{listing}"))?;
    assert_eq!(p[2], "1", "{listing}");
    assert!(
        p[3].ends_with('m') || p[3].contains('m'),
        "5 minutes old: {p:?}"
    );
    let d = row(&listing, "email", "DEAD").ok_or_else(|| anyhow::anyhow!("{listing}"))?;
    assert_eq!(d[2], "1");
    let q = row(&listing, billing::jobs::DELIVERY_QUEUE, "Pending")
        .ok_or_else(|| anyhow::anyhow!("{listing}"))?;
    assert_eq!(q[2], "1", "{listing}");

    let shown = cli.ok(&["show", &dead.to_string()])?;
    assert!(shown.contains("kind: email"), "{shown}");
    assert!(shown.contains("status: DEAD"), "{shown}");
    assert!(shown.contains("550 mailbox unavailable"), "{shown}");
    let (ok, _, stderr) = cli.run(&["show", &uuid::Uuid::now_v7().to_string()])?;
    assert!(!ok && stderr.contains("not found"), "{stderr}");

    // Retry the DEAD one: PENDING again with a fresh budget, and a job pushed.
    let retried = cli.ok(&["retry", &dead.to_string()])?;
    assert!(retried.contains("status: PENDING"), "{retried}");
    let r = notes::load_notification(&t.db, dead).await?;
    assert_eq!((r.status, r.attempts), (NotificationStatus::Pending, 0));
    let listing = cli.ok(&["list"])?;
    assert!(row(&listing, "email", "DEAD").is_none(), "{listing}");
    let q = row(&listing, billing::jobs::DELIVERY_QUEUE, "Pending")
        .ok_or_else(|| anyhow::anyhow!("{listing}"))?;
    assert_eq!(q[2], "2", "the retry pushed a job: {listing}");
    // Only a DEAD one can be retried.
    let (ok, _, stderr) = cli.run(&["retry", &dead.to_string()])?;
    assert!(!ok && stderr.contains("only a DEAD"), "{stderr}");

    // A worker runs the jobs (into an outbox): the listing shows it, and its finished
    // job rows are purged.
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let (db, q, outbox) = (
        t.second_pool().await?,
        queue.clone(),
        dir.path().join("outbox"),
    );
    let gateway: std::sync::Arc<dyn billing::payments::PaymentGateway> =
        std::sync::Arc::new(billing::payments::SandboxGateway::new());
    let config = worker::WorkerConfig {
        poll_interval_ms: 50,
        ..Default::default()
    };
    let worker = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.changed().await;
        };
        let mailer = worker::email::Mailer::outbox(outbox);
        let from = "Reservoir <billing@reservoir.test>".to_owned();
        worker::run(db, q, gateway, mailer, from, config, shutdown).await
    });
    for _ in 0..300 {
        let mut all = true;
        for id in [pending, dead] {
            all &= notes::load_notification(&t.db, id).await?.status == NotificationStatus::Sent;
        }
        if all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listing = cli.ok(&["list"])?;
    eprintln!("{listing}");
    let s = row(&listing, "email", "SENT").ok_or_else(|| anyhow::anyhow!("{listing}"))?;
    assert_eq!(s[2], "2", "{listing}");
    assert!(
        listing.contains("reservoir-email-"),
        "the running worker's heartbeat: {listing}"
    );
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(15), worker).await;
    // done_at is in whole seconds on SQLite: let the second pass.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let done: i64 = row(&listing, billing::jobs::DELIVERY_QUEUE, "Done")
        .and_then(|w| w.get(2).and_then(|n| n.parse().ok()))
        .ok_or_else(|| anyhow::anyhow!("no Done job rows: {listing}"))?;
    // The two pushes, and the sweep's re-enqueue of the notification due 5 min ago.
    assert!(done >= 2, "{listing}");
    let purged = cli.ok(&["purge", "--older-than-days", "0"])?;
    assert!(purged.starts_with(&format!("{done} finished")), "{purged}");
    let kept = cli.ok(&["purge", "--older-than-days", "1"])?;
    assert!(kept.starts_with("0 finished"), "{kept}");
    let listing = cli.ok(&["list"])?;
    assert!(
        row(&listing, billing::jobs::DELIVERY_QUEUE, "Done").is_none(),
        "{listing}"
    );
    t.finish().await
}
