//! A database outage under load: a scratch PostgreSQL cluster (its own `initdb`, on a
//! free port; the shared server is never stopped) is stopped for 5 s and then for 30 s
//! while clients debit one workspace through the API. During each outage every request
//! fails within the acquire timeout with UNAVAILABLE and `retryable: true` (never hangs,
//! never INTERNAL), and `/readyz` answers at once and says not ready within 1 s. After
//! the cluster is started again the same API process serves again, every refused debit
//! sent again with its payload is admitted (or replayed) once, and nothing acknowledged
//! is lost: the ledger holds exactly the acknowledged debits and the balance is exact.
//! Runs on every `cargo test`, whatever `TEST_DATABASE_URL` says.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::db::{self, ACQUIRE_TIMEOUT_MS_DEFAULT, PoolLimits};
use billing::entity::usage_events;
use billing::sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use reservoir_tests::app::App;
use reservoir_tests::load::{self, Debit, Outcome, Sent};
use reservoir_tests::scratch_pg::ScratchPg;
use reservoir_tests::{Fixture, fund, workspace};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS: usize = 8;
/// A refusal may take the acquire timeout plus this (scheduling on a shared machine).
const SLACK: Duration = Duration::from_millis(1_000);
const READY_WITHIN: Duration = Duration::from_millis(1_000);

/// One `/readyz` answer: when it was asked, the status (0: no answer) and how long
/// the answer took.
#[derive(Clone, Copy, Debug)]
struct Probe {
    at: Instant,
    status: u16,
    took: Duration,
}

#[derive(Default)]
struct Record {
    sent: Mutex<Vec<Sent>>,
    probes: Mutex<Vec<Probe>>,
    stop: AtomicBool,
}

async fn debit_loop(
    client: reqwest::Client,
    base: String,
    token: String,
    id: usize,
    rec: Arc<Record>,
) {
    let mut n = 0_i64;
    while !rec.stop.load(Ordering::Relaxed) {
        let debit = Debit {
            request_id: format!("outage-{id}-{n}"),
            prompt_tokens: 1 + (n * 7 + i64::try_from(id).unwrap_or(0)) % 50,
        };
        let sent = load::record(&client, &base, &token, &debit).await;
        let failed = !matches!(sent.outcome, Outcome::Acknowledged(_));
        if let Ok(mut all) = rec.sent.lock() {
            all.push(sent);
        }
        if failed {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n += 1;
    }
}

async fn readyz_loop(base: String, rec: Arc<Record>) {
    let client = load::client_with_timeout(Duration::from_secs(5));
    while !rec.stop.load(Ordering::Relaxed) {
        let at = Instant::now();
        let status = match client.get(format!("{base}/readyz")).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        if let Ok(mut probes) = rec.probes.lock() {
            probes.push(Probe {
                at,
                status,
                took: at.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one outage looked like from the outside.
#[derive(Debug)]
struct OutageFigures {
    /// From the cluster being gone to the first `/readyz` 503.
    not_ready_after: Duration,
    /// The slowest refusal of a request started during the outage.
    slowest_refusal: Duration,
    refusals: usize,
    /// From the cluster accepting connections again to the first `/readyz` 200 and the
    /// first acknowledged debit started after it.
    ready_again_after: Duration,
    first_debit_after: Duration,
}

async fn outage(
    pg: &Arc<Mutex<ScratchPg>>,
    rec: &Record,
    length: Duration,
) -> anyhow::Result<OutageFigures> {
    let pg_stop = pg.clone();
    tokio::task::spawn_blocking(move || {
        pg_stop
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .stop()
    })
    .await??;
    let down = Instant::now();
    tokio::time::sleep(length).await;
    // A request waiting for a connection may get one as soon as the server listens
    // again, before `pg_ctl start` returns: only what ended before the restart began
    // must have been refused.
    let restarting = Instant::now();
    let pg_start = pg.clone();
    tokio::task::spawn_blocking(move || {
        pg_start
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .start_again()
    })
    .await??;
    let up = Instant::now();
    // Let the API find the database again, and the refusals of the outage finish.
    let deadline = up + Duration::from_secs(20);
    let (ready_again_after, first_debit_after) = loop {
        let ready = first_probe(rec, up, |s| s == 200).map(|p| p.at - up);
        let debit = first_ack_started_after(rec, up);
        if let (Some(r), Some(d)) = (ready, debit) {
            break (r, d);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not recovered 20 s after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let not_ready = first_probe(rec, down, |s| s == 503)
        .ok_or_else(|| anyhow::anyhow!("/readyz never said not ready"))?;
    anyhow::ensure!(
        not_ready.at < up,
        "/readyz said not ready only after the outage"
    );
    // The probe that saw 503 was asked at `at`; the state had turned by then.
    let not_ready_after = not_ready.at.saturating_duration_since(down);

    let acquire = Duration::from_millis(ACQUIRE_TIMEOUT_MS_DEFAULT);
    let sent = rec.sent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let during: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.started >= down && s.started + s.took <= restarting)
        .collect();
    anyhow::ensure!(
        !during.is_empty(),
        "no request was answered during the outage"
    );
    let mut slowest_refusal = Duration::ZERO;
    for s in &during {
        match &s.outcome {
            Outcome::Refused { code, retryable } if code == "UNAVAILABLE" && *retryable => {
                slowest_refusal = slowest_refusal.max(s.took);
            }
            other => anyhow::bail!("during the outage {:?} got {other:?}", s.debit),
        }
        anyhow::ensure!(
            s.took <= acquire + SLACK,
            "{:?} took {:?} to be refused",
            s.debit,
            s.took
        );
    }
    Ok(OutageFigures {
        not_ready_after,
        slowest_refusal,
        refusals: during.len(),
        ready_again_after,
        first_debit_after,
    })
}

fn first_probe(rec: &Record, after: Instant, pred: impl Fn(u16) -> bool) -> Option<Probe> {
    let probes = rec.probes.lock().ok()?;
    probes
        .iter()
        .find(|p| p.at >= after && pred(p.status))
        .copied()
}

fn first_ack_started_after(rec: &Record, after: Instant) -> Option<Duration> {
    let sent = rec.sent.lock().ok()?;
    sent.iter()
        .filter(|s| s.started >= after && matches!(s.outcome, Outcome::Acknowledged(_)))
        .map(|s| s.started + s.took - after)
        .min()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_database_fails_fast_and_recovers_without_a_restart() -> anyhow::Result<()> {
    let pg = tokio::task::spawn_blocking(ScratchPg::start).await??;
    let url = pg.url();
    let pg = Arc::new(Mutex::new(pg));
    let setup = db::connect(&url, PoolLimits::default()).await?;
    db::migrate(&setup).await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&setup, now).await?;
    fund(&setup, f.ws_a, "1000", now).await?;
    let initial = workspace(&setup, f.ws_a).await?.balance_nanos;
    let key = billing::accounts::create_api_key(&setup, f.ws_a, "outage", None, now).await?;
    // The API's own pool, as in production: default limits, so the default acquire
    // timeout is the one measured.
    let api_db = db::connect(&url, PoolLimits::default()).await?;
    let app = App::start_with(&api_db).await?;

    let rec = Arc::new(Record::default());
    let mut tasks = Vec::new();
    for id in 0..CLIENTS {
        // A hang shows up as a timeout here, and fails the run.
        let client = load::client_with_timeout(Duration::from_secs(10));
        tasks.push(tokio::spawn(debit_loop(
            client,
            app.base.clone(),
            key.secret.clone(),
            id,
            rec.clone(),
        )));
    }
    tasks.push(tokio::spawn(readyz_loop(app.base.clone(), rec.clone())));

    tokio::time::sleep(Duration::from_secs(2)).await;
    let short = outage(&pg, &rec, Duration::from_secs(5)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let long = outage(&pg, &rec, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    rec.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }
    eprintln!("5 s outage: {short:?}\n30 s outage: {long:?}");
    for figures in [&short, &long] {
        assert!(
            figures.not_ready_after <= READY_WITHIN,
            "/readyz took {:?} to say not ready",
            figures.not_ready_after
        );
        assert!(figures.refusals > 0, "{figures:?}");
        assert!(
            figures.slowest_refusal <= Duration::from_millis(ACQUIRE_TIMEOUT_MS_DEFAULT) + SLACK,
            "{figures:?}"
        );
        assert!(
            figures.ready_again_after <= Duration::from_secs(5),
            "{figures:?}"
        );
        assert!(
            figures.first_debit_after <= Duration::from_secs(5),
            "{figures:?}"
        );
    }

    let sent = std::mem::take(&mut *rec.sent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let probes = rec
        .probes
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let slowest_probe = probes.iter().map(|p| p.took).max().unwrap_or_default();
    eprintln!(
        "{} /readyz answers, the slowest in {slowest_probe:?}",
        probes.len()
    );
    assert!(
        slowest_probe < READY_WITHIN,
        "/readyz took {slowest_probe:?} to answer"
    );
    assert!(probes.iter().all(|p| p.status == 200 || p.status == 503));

    // Every debit: acknowledged, or refused as UNAVAILABLE and then sent again with its
    // payload, which must now be admitted (or, if its commit did land, replayed).
    let client = load::client_with_timeout(Duration::from_secs(10));
    let mut admitted: HashMap<String, (Debit, String)> = HashMap::new();
    let mut retried = 0_usize;
    for s in sent {
        let id = match s.outcome {
            Outcome::Acknowledged(id) => id,
            Outcome::Refused {
                code,
                retryable: true,
            } if code == "UNAVAILABLE" => {
                retried += 1;
                match load::record(&client, &app.base, &key.secret, &s.debit)
                    .await
                    .outcome
                {
                    Outcome::Acknowledged(id) => id,
                    other => anyhow::bail!("retry of {:?}: {other:?}", s.debit),
                }
            }
            other => anyhow::bail!("{:?} got {other:?}", s.debit),
        };
        admitted.insert(s.debit.request_id.clone(), (s.debit, id));
    }
    eprintln!(
        "{} debits admitted, {retried} of them after an UNAVAILABLE",
        admitted.len()
    );

    let events = usage_events::Entity::find()
        .filter(usage_events::Column::WorkspaceId.eq(f.ws_a))
        .all(&setup)
        .await?;
    assert_eq!(
        events.len(),
        admitted.len(),
        "one usage event per admitted debit"
    );
    for event in &events {
        let (debit, id) = admitted
            .get(&event.request_id)
            .ok_or_else(|| anyhow::anyhow!("unknown usage event {}", event.request_id))?;
        assert_eq!(&event.id.to_string(), id, "{}", event.request_id);
        assert_eq!(event.cost_nanos, debit.cost_nanos(), "{}", event.request_id);
    }
    let spent: i64 = admitted.values().map(|(d, _)| d.cost_nanos()).sum();
    assert_eq!(
        workspace(&setup, f.ws_a).await?.balance_nanos,
        initial - spent
    );
    let report = billing::ledger::invariants::check(&setup).await?;
    assert!(
        report.is_ok(),
        "invariants violated: {:#?}",
        report.violations
    );
    app.stop().await;
    Ok(())
}
