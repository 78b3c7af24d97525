//! The API as a real process (`reservoir api`), SIGKILLed while 32 clients debit one
//! workspace through an API key, then started again on the same database. Every
//! acknowledged debit is in the ledger once; every debit whose answer was lost, sent
//! again with its payload after the restart, is admitted or replayed exactly once; an
//! acknowledged debit sent again is a replay (the same usage event); `reservoir check`
//! passes; the balance is the initial one minus the sum of the costs. On SQLite, and on
//! PostgreSQL with `TEST_DATABASE_URL`.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::entity::usage_events;
use billing::sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use reservoir_tests::load::{self, Debit, Outcome};
use reservoir_tests::{Fixture, TestDb, fund, workspace};
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const CLIENTS: usize = 32;
/// Acknowledged debits before the kill: enough that many are in flight at that moment.
const ACKED_BEFORE_KILL: usize = 300;

fn reservoir(t: &TestDb, data_dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reservoir"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RESERVOIR_DATABASE_URL", &t.url)
        .env("RESERVOIR_QUEUE_URL", t.queue_url())
        .env("RESERVOIR_DATA_DIR", data_dir)
        .env("RESERVOIR_LOG_FORMAT", "pretty")
        .current_dir(data_dir);
    cmd
}

fn start_api(
    t: &TestDb,
    data_dir: &std::path::Path,
    port: u16,
    log: &std::path::Path,
) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Ok(reservoir(t, data_dir)
        .arg("api")
        .env("RESERVOIR_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "RESERVOIR_ADMIN_TOKEN",
            "crash-test-admin-token-0123456789abcdef",
        )
        .env("RESERVOIR_DEMO_SEED", "false")
        .env("RESERVOIR_ALLOW_SANDBOX_WITH_POSTGRES", "true")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?)
}

/// Waits until `/readyz` says ready.
async fn wait_ready(base: &str, child: &mut Child, log: &std::path::Path) -> anyhow::Result<()> {
    let client = load::client_with_timeout(Duration::from_secs(2));
    let started = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if child.try_wait()?.is_some() || started.elapsed() > Duration::from_secs(60) {
            anyhow::bail!(
                "the API never became ready:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Debits until a call gets no answer (the process is gone), which it returns as the
/// debit to send again; with the acknowledged ones.
async fn client_loop(
    base: String,
    token: String,
    id: usize,
    acked: Arc<AtomicUsize>,
) -> anyhow::Result<(Vec<(Debit, String)>, Option<Debit>)> {
    let client = load::client_with_timeout(Duration::from_secs(30));
    let mut done = Vec::new();
    for n in 0_i64.. {
        let debit = Debit {
            request_id: format!("crash-{id}-{n}"),
            prompt_tokens: 1 + (n * 13 + i64::try_from(id)?) % 97,
        };
        match load::record(&client, &base, &token, &debit).await.outcome {
            Outcome::Acknowledged(usage_id) => {
                done.push((debit, usage_id));
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::NoAnswer(_) => return Ok((done, Some(debit))),
            other => anyhow::bail!("{debit:?} got {other:?}"),
        }
    }
    Ok((done, None))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_killed_under_load_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "1000", now).await?;
    let initial = workspace(&t.db, f.ws_a).await?.balance_nanos;
    let key = billing::accounts::create_api_key(&t.db, f.ws_a, "crash", None, now).await?;

    let dir = tempfile::tempdir()?;
    let log = dir.path().join("api.log");
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let mut first = start_api(&t, dir.path(), port, &log)?;
    wait_ready(&base, &mut first, &log).await?;

    let acked = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(client_loop(
                base.clone(),
                key.secret.clone(),
                id,
                acked.clone(),
            ))
        })
        .collect();
    let started = Instant::now();
    while acked.load(Ordering::Relaxed) < ACKED_BEFORE_KILL {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "only {} debits acknowledged in 60 s:\n{}",
            acked.load(Ordering::Relaxed),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill()?; // SIGKILL, with debits in flight
    first.wait()?;
    let mut acknowledged = Vec::new();
    let mut unanswered = Vec::new();
    for client in clients {
        let (done, lost) = client.await??;
        acknowledged.extend(done);
        unanswered.extend(lost);
    }
    eprintln!(
        "{} debits acknowledged before the kill, {} unanswered",
        acknowledged.len(),
        unanswered.len()
    );
    assert_eq!(unanswered.len(), CLIENTS, "every client lost one answer");

    let mut second = start_api(&t, dir.path(), port, &log)?;
    wait_ready(&base, &mut second, &log).await?;
    let client = load::client_with_timeout(Duration::from_secs(30));
    // The lost answers: each debit sent again is admitted now, or was committed before
    // the kill and is replayed; either way it is acknowledged.
    let mut admitted: HashMap<String, (Debit, String)> = HashMap::new();
    for (debit, usage_id) in acknowledged {
        admitted.insert(debit.request_id.clone(), (debit, usage_id));
    }
    for debit in unanswered {
        match load::record(&client, &base, &key.secret, &debit)
            .await
            .outcome
        {
            Outcome::Acknowledged(usage_id) => {
                admitted.insert(debit.request_id.clone(), (debit, usage_id));
            }
            other => anyhow::bail!("retry of {debit:?}: {other:?}"),
        }
    }
    // Acknowledged debits sent again are replays: the same usage event.
    for (debit, usage_id) in admitted.values().take(CLIENTS) {
        let again = load::record(&client, &base, &key.secret, debit)
            .await
            .outcome;
        assert_eq!(again, Outcome::Acknowledged(usage_id.clone()), "{debit:?}");
    }
    second.kill()?;
    second.wait()?;

    let events = usage_events::Entity::find()
        .filter(usage_events::Column::WorkspaceId.eq(f.ws_a))
        .all(&t.db)
        .await?;
    assert_eq!(events.len(), admitted.len(), "one usage event per debit");
    for event in &events {
        let (debit, usage_id) = admitted
            .get(&event.request_id)
            .ok_or_else(|| anyhow::anyhow!("unknown usage event {}", event.request_id))?;
        assert_eq!(&event.id.to_string(), usage_id, "{}", event.request_id);
        assert_eq!(event.cost_nanos, debit.cost_nanos(), "{}", event.request_id);
    }
    let spent: i64 = admitted.values().map(|(d, _)| d.cost_nanos()).sum();
    assert_eq!(
        workspace(&t.db, f.ws_a).await?.balance_nanos,
        initial - spent,
        "the balance is exact"
    );

    let check = reservoir(&t, dir.path())
        .arg("check")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()?;
    assert!(
        check.status.success(),
        "reservoir check failed:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    t.finish().await
}
