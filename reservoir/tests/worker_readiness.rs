//! A worker-only process (`reservoir worker` with `RESERVOIR_WORKER_LISTEN`) answers
//! `/readyz` for its job workers: ready once they can poll, 503 while its database (a
//! scratch PostgreSQL cluster, which the queue lives in) is stopped, ready again once it
//! is back, the same process never restarted; `/metrics` carries the same as a gauge.
//!
//! Runs on every `cargo test`, whatever `TEST_DATABASE_URL` says (the shared server is
//! never stopped).
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use reservoir_tests::scratch_pg::ScratchPg;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `/readyz`'s status and body (status 0: no answer).
async fn readyz(client: &reqwest::Client, base: &str) -> (u16, String) {
    let asked = client
        .get(format!("{base}/readyz"))
        .timeout(Duration::from_secs(5))
        .send();
    match asked.await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// Asks until `/readyz` answers `status` (at most `bound`: a generous limit for a state
/// that normally comes within a second or two, not a speed check); its body.
async fn until_status(
    client: &reqwest::Client,
    base: &str,
    status: u16,
    bound: Duration,
    worker: &mut Worker,
    log: &std::path::Path,
) -> anyhow::Result<String> {
    let started = Instant::now();
    let mut last = (0, String::new());
    while started.elapsed() < bound {
        if let Some(exit) = worker.0.try_wait()? {
            anyhow::bail!(
                "the worker exited with {exit}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        last = readyz(client, base).await;
        if last.0 == status {
            return Ok(last.1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!(
        "/readyz never answered {status} within {bound:?}; last {last:?}; worker log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_readyz_follows_its_database() -> anyhow::Result<()> {
    let pg = tokio::task::spawn_blocking(ScratchPg::start).await??;
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = dir.path().join("worker.log");
    let mut worker = Worker(
        Command::new(env!("CARGO_BIN_EXE_reservoir"))
            .arg("worker")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RESERVOIR_DATA_DIR", dir.path())
            .env("RESERVOIR_DATABASE_URL", pg.url())
            .env(
                "RESERVOIR_ADMIN_TOKEN",
                "readiness-test-admin-token-0123456789abcdef",
            )
            .env("RESERVOIR_ALLOW_SANDBOX_WITH_POSTGRES", "true")
            .env("RESERVOIR_DEMO_SEED", "false")
            .env("RESERVOIR_WORKER_LISTEN", format!("127.0.0.1:{port}"))
            .env("RESERVOIR_LOG_FORMAT", "pretty")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reservoir_tests::app::http_client();

    until_status(
        &client,
        &base,
        200,
        Duration::from_secs(60),
        &mut worker,
        &log,
    )
    .await?;
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("reservoir_worker_ready 1"),
        "metrics: {metrics}"
    );
    assert!(
        metrics.contains("reservoir_jobs_waiting"),
        "metrics: {metrics}"
    );

    let pg = tokio::task::spawn_blocking(move || {
        let mut pg = pg;
        pg.stop().map(|()| pg)
    })
    .await??;
    let why = until_status(
        &client,
        &base,
        503,
        Duration::from_secs(30),
        &mut worker,
        &log,
    )
    .await?;
    assert!(why.contains("unreachable"), "the reason: {why}");
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("reservoir_worker_ready 0"),
        "metrics: {metrics}"
    );

    let pg = tokio::task::spawn_blocking(move || {
        let mut pg = pg;
        pg.start_again().map(|()| pg)
    })
    .await??;
    // The job workers that failed meanwhile wait out their restart backoff (at most
    // 30 s) before they poll again.
    until_status(
        &client,
        &base,
        200,
        Duration::from_secs(90),
        &mut worker,
        &log,
    )
    .await?;
    drop(worker);
    drop(pg);
    Ok(())
}
