//! The worker as a real process survives its database going away. A `reservoir
//! worker` captures a purchase and sends its receipt to a real SMTP server; then the
//! database goes away for longer than any pool or busy timeout, and comes back. The
//! same worker process, never restarted, then captures a new purchase and has its
//! receipt accepted by the SMTP server, through the queue (well before the sweep's
//! 30 s re-enqueue), not through the sweep's fallback.
//!
//! - PostgreSQL: a scratch cluster (its own `initdb`, on a free port; the shared
//!   server is never stopped) is stopped with `pg_ctl -m fast` for 35 s: open
//!   sessions end with 57P01, and the queue's pool times out (PoolTimedOut). Both once
//!   ended the apalis workers for good.
//! - SQLite: the queue file is held locked by another connection (an exclusive write
//!   transaction) for 35 s, longer than the queue's 30 s busy timeout.
//!
//! Runs on every `cargo test`, whatever `TEST_DATABASE_URL` says.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::db::{self, PoolLimits};
use billing::entity::enums::{CardBrand, PurchaseStatus};
use billing::entity::payment_methods;
use billing::payments::purchases::{self, PurchaseCreditsRequest, PurchaseItem};
use billing::sea_orm::{ActiveValue::Set, DatabaseConnection, EntityTrait, sqlx};
use reservoir_tests::Fixture;
use reservoir_tests::scratch_pg::ScratchPg;
use reservoir_tests::smtp::SmtpServer;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Longer than the queue pool's 30 s acquire timeout and the SQLite queue's 30 s busy
/// timeout, so every way the old worker died is exercised.
const OUTAGE: Duration = Duration::from_secs(35);
/// A purchase pushed after the outage is captured and its receipt accepted within
/// this: shorter than the sweep's re-enqueue (`stale_after_ms` = 30 s), so it was the
/// queue's doing. Normally a second or two.
const AFTER_OUTAGE_BOUND: Duration = Duration::from_secs(28);

struct Worker {
    child: Child,
    log: std::path::PathBuf,
}

impl Worker {
    fn start(
        env: &[(&str, String)],
        data_dir: &std::path::Path,
        smtp: &SmtpServer,
    ) -> anyhow::Result<Self> {
        let log = data_dir.join("worker.log");
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_reservoir"));
        cmd.arg("worker")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RESERVOIR_DATA_DIR", data_dir)
            .env(
                "RESERVOIR_ADMIN_TOKEN",
                "outage-test-admin-token-0123456789abcdef",
            )
            .env("RESERVOIR_PAYMENT_GATEWAY", "sandbox")
            .env("RESERVOIR_ALLOW_SANDBOX_WITH_POSTGRES", "true")
            .env("RESERVOIR_DEMO_SEED", "false")
            .env("RESERVOIR_SMTP_URL", smtp.url())
            .env("RESERVOIR_LOG_FORMAT", "pretty")
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Ok(Self {
            child: cmd.spawn()?,
            log,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process is still the one started (it did not exit).
    fn assert_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("the worker exited with {status}:\n{}", self.log());
        }
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sandbox Visa card of the fixture's account (the token carries the scenario, so
/// the worker's own sandbox charges it).
async fn add_card(db: &DatabaseConnection, f: &Fixture) -> anyhow::Result<Uuid> {
    Ok(
        payment_methods::Entity::insert(payment_methods::ActiveModel {
            id: Set(Uuid::now_v7()),
            account_id: Set(f.account_id),
            gateway_token: Set("pm_sandbox_visa_0a1b2c3d".into()),
            brand: Set(CardBrand::Visa),
            last4: Set("4242".into()),
            exp_month: Set(12),
            exp_year: Set(2034),
            is_default: Set(true),
            created_at: Set(chrono::Utc::now()),
            removed_at: Set(None),
            fingerprint: Set(None),
        })
        .exec(db)
        .await?
        .last_insert_id,
    )
}

/// Writes a PENDING card purchase and pushes its capture job, as `purchaseCredits`
/// does; retried while the database is still coming back.
async fn buy(
    db: &DatabaseConnection,
    queue_url: &str,
    f: &Fixture,
    card: Uuid,
    key: &str,
) -> anyhow::Result<Uuid> {
    let started = Instant::now();
    loop {
        let attempt = async {
            let purchase = purchases::purchase_credits(
                db,
                PurchaseCreditsRequest {
                    workspace_id: f.ws_a,
                    item: PurchaseItem::Package("pkg_10".into()),
                    payment_method_id: Some(card),
                    pay_by_invoice: false,
                    idempotency_key: key.into(),
                    created_by_user_id: None,
                },
                chrono::Utc::now(),
            )
            .await?
            .purchase;
            let queue = worker::queue::Queue::connect(queue_url).await?;
            queue
                .push_capture(
                    billing::jobs::CapturePurchase {
                        purchase_id: purchase.id,
                    },
                    None,
                )
                .await
                .map_err(anyhow::Error::msg)?;
            anyhow::Ok(purchase.id)
        };
        match attempt.await {
            Ok(id) => return Ok(id),
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                eprintln!("buying {key}: {e:#}; trying again");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits until the purchase is SUCCEEDED and a receipt naming its invoice reached the
/// SMTP server; the time it took.
async fn captured_and_mailed(
    db: &DatabaseConnection,
    smtp: &SmtpServer,
    purchase_id: Uuid,
    bound: Duration,
    worker: &Worker,
) -> anyhow::Result<(Duration, Duration)> {
    let started = Instant::now();
    let mut captured_after = None;
    while started.elapsed() < bound {
        if captured_after.is_none()
            && let Ok(p) = purchases::load_purchase(db, purchase_id).await
        {
            anyhow::ensure!(
                p.status != PurchaseStatus::Failed,
                "the purchase failed: {p:?}"
            );
            if p.status == PurchaseStatus::Succeeded {
                captured_after = Some(started.elapsed());
            }
        }
        if let Some(captured) = captured_after {
            let invoice = purchases::load_purchase(db, purchase_id)
                .await?
                .invoice_id
                .ok_or_else(|| anyhow::anyhow!("no invoice"))?;
            let number = billing::entity::invoices::Entity::find_by_id(invoice)
                .one(db)
                .await?
                .map(|i| i.number)
                .unwrap_or_default();
            let mailed = smtp
                .received()
                .iter()
                .any(|m| String::from_utf8_lossy(&m.data).contains(&number));
            if mailed {
                return Ok((captured, started.elapsed()));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!(
        "purchase {purchase_id} not captured and mailed within {bound:?} (captured after {captured_after:?}); {} messages at the SMTP server; worker log:\n{}",
        smtp.received().len(),
        worker.log()
    )
}

/// How the database goes away and comes back.
enum Outage {
    /// Stop the scratch cluster; start it again.
    Postgres(std::sync::Arc<std::sync::Mutex<ScratchPg>>),
    /// Hold the queue file's write lock.
    SqliteQueueLock(String),
}

impl Outage {
    async fn run(&self, length: Duration) -> anyhow::Result<()> {
        match self {
            Self::Postgres(pg) => {
                let pg_stop = pg.clone();
                tokio::task::spawn_blocking(move || {
                    pg_stop
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .stop()
                })
                .await??;
                tokio::time::sleep(length).await;
                let pg_start = pg.clone();
                tokio::task::spawn_blocking(move || {
                    pg_start
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .start_again()
                })
                .await??;
            }
            Self::SqliteQueueLock(url) => {
                use sqlx::Connection as _;
                let mut lock = sqlx::SqliteConnection::connect(url).await?;
                sqlx::query("BEGIN EXCLUSIVE").execute(&mut lock).await?;
                tokio::time::sleep(length).await;
                sqlx::query("ROLLBACK").execute(&mut lock).await?;
                lock.close().await?;
            }
        }
        Ok(())
    }
}

async fn survives(
    db: &DatabaseConnection,
    env: &[(&str, String)],
    queue_url: &str,
    data_dir: &std::path::Path,
    outage: Outage,
) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    let f = Fixture::new(db, now).await?;
    let card = add_card(db, &f).await?;
    let smtp = SmtpServer::start()?;
    let mut worker = Worker::start(env, data_dir, &smtp)?;

    // Before: the pipeline works.
    let first = buy(db, queue_url, &f, card, "before-outage").await?;
    let (captured, mailed) =
        captured_and_mailed(db, &smtp, first, Duration::from_secs(60), &worker).await?;
    eprintln!("before the outage: captured after {captured:?}, receipt accepted after {mailed:?}");

    outage.run(OUTAGE).await?;
    worker.assert_alive()?;

    // After: the same process, never restarted, captures and mails again.
    let back = Instant::now();
    let second = buy(db, queue_url, &f, card, "after-outage").await?;
    let pushed_after = back.elapsed();
    let (captured, mailed) =
        captured_and_mailed(db, &smtp, second, AFTER_OUTAGE_BOUND, &worker).await?;
    eprintln!(
        "after the outage: pushed {pushed_after:?} after the database was back; captured after {captured:?}, receipt accepted after {mailed:?}"
    );
    worker.assert_alive()?;
    let log = worker.log();
    eprintln!(
        "job worker restarts logged: {}",
        log.matches("job worker failed; restarting").count()
    );
    let p = purchases::load_purchase(db, second).await?;
    assert_eq!(p.status, PurchaseStatus::Succeeded);
    assert_eq!(smtp.received().len(), 2, "one receipt per purchase");
    let report = billing::ledger::invariants::check(db).await?;
    assert!(report.is_ok(), "{:#?}", report.violations);
    Ok(())
}

fn limits() -> PoolLimits {
    PoolLimits {
        connections_max: 4,
        acquire_timeout_ms: 5_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_survives_a_postgres_stop() -> anyhow::Result<()> {
    let pg = tokio::task::spawn_blocking(ScratchPg::start).await??;
    let url = pg.url();
    let db = db::connect(&url, limits()).await?;
    db::migrate(&db).await?;
    let dir = tempfile::tempdir()?;
    let env = [("RESERVOIR_DATABASE_URL", url.clone())];
    let pg = std::sync::Arc::new(std::sync::Mutex::new(pg));
    let result = survives(&db, &env, &url, dir.path(), Outage::Postgres(pg.clone())).await;
    db.close().await.ok();
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_survives_a_locked_sqlite_queue() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}/reservoir.db", dir.path().display());
    let db = db::connect(&url, limits()).await?;
    db::migrate(&db).await?;
    let queue_url = format!("sqlite://{}/queue.db", dir.path().display());
    // The queue file exists (with its tables) before the worker starts.
    drop(worker::queue::Queue::connect(&queue_url).await?);
    let env = [("RESERVOIR_QUEUE_URL", queue_url.clone())];
    let outage = Outage::SqliteQueueLock(queue_url.clone());
    let result = survives(&db, &env, &queue_url, dir.path(), outage).await;
    db.close().await.ok();
    result
}
