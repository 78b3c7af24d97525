//! The billing dashboard in a real browser: Debian's chromium driven by playwright-core
//! (`tests/browser/dashboard.mjs`) against the API and the worker started here, on this
//! test's own database (SQLite, or PostgreSQL with TEST_DATABASE_URL).
//!
//! Without node, `/usr/bin/chromium` or `tests/browser/node_modules` (run `npm ci` there)
//! the test prints why and passes, unless RESERVOIR_REQUIRE_BROWSER=1 (CI), where it fails.
//! RESERVOIR_SCREENSHOTS=<dir> saves the main views as PNG files there.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::accounts;
use billing::debits::usage::{self, ProjectRef, UsageRequest};
use billing::entity::enums::{BudgetPeriod, WorkspaceRole};
use billing::payments::{PaymentGateway, SandboxGateway};
use chrono::{Duration as Days, Utc};
use reservoir_tests::app::ADMIN_TOKEN;
use reservoir_tests::{TestDb, fund};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const CHROMIUM: &str = "/usr/bin/chromium";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// Why the browser test cannot run here, if it cannot.
fn missing_tools() -> Option<String> {
    let chromium = std::env::var("RESERVOIR_CHROMIUM").unwrap_or_else(|_| CHROMIUM.into());
    if !Path::new(&chromium).exists() {
        return Some(format!(
            "{chromium} is missing (apt-get install -y chromium)"
        ));
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Some("node is missing".into());
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        return Some(
            "tests/browser/node_modules is missing (run `npm ci` in tests/browser)".into(),
        );
    }
    None
}

struct Seeded {
    account_id: uuid::Uuid,
    production: uuid::Uuid,
    staging: uuid::Uuid,
    owner_token: String,
    viewer_token: String,
    member_token: String,
}

/// An account like a real one: two workspaces, three projects (one with a budget), a
/// member and a viewer, and 30 days of usage by several models and people.
async fn seed(t: &TestDb) -> anyhow::Result<Seeded> {
    let db = &t.db;
    let now = Utc::now();
    let start = now - Days::days(31);
    let created =
        accounts::create_account(db, "Acme Labs", "ada@acme.test", "Ada Lovelace", start).await?;
    let account_id = created.account.id;
    let production = accounts::create_workspace(db, account_id, "Production", start)
        .await?
        .id;
    let staging = accounts::create_workspace(db, account_id, "Staging", start)
        .await?
        .id;
    let chatbot =
        accounts::create_project(db, production, "Support chatbot", "chatbot", start).await?;
    accounts::create_project(db, production, "Search", "search", start).await?;
    accounts::create_project(db, staging, "Experiments", "experiments", start).await?;
    let budget = billing::Credits::from_whole_credits(400)?;
    accounts::set_project_budget(db, chatbot.id, Some(budget), BudgetPeriod::Monthly, now).await?;
    let (member, _) = accounts::add_workspace_member(
        db,
        production,
        "grace@acme.test",
        Some("Grace Hopper"),
        WorkspaceRole::Member,
        start,
    )
    .await?;
    let (viewer, _) = accounts::add_workspace_member(
        db,
        production,
        "alan@acme.test",
        Some("Alan Turing"),
        WorkspaceRole::Viewer,
        start,
    )
    .await?;
    fund(db, production, "900", start).await?;
    fund(db, staging, "120", start).await?;
    let calls = [
        (
            "chatbot",
            "openai/gpt-4o-mini",
            400_000,
            120_000,
            created.owner.id,
        ),
        (
            "chatbot",
            "anthropic/claude-sonnet-4.5",
            150_000,
            40_000,
            member.id,
        ),
        (
            "search",
            "google/gemini-2.5-flash",
            900_000,
            30_000,
            member.id,
        ),
        (
            "search",
            "openai/gpt-4.1-mini",
            250_000,
            60_000,
            created.owner.id,
        ),
    ];
    for day in 0..30_i64 {
        let at = now - Days::days(29 - day) - Days::hours(1);
        for (i, (tag, model, prompt, completion, user)) in calls.iter().enumerate() {
            // A weekly rhythm, so the chart has a shape.
            let scale = 1 + (day % 7) + i64::try_from(i)? % 2;
            let request = UsageRequest {
                workspace_id: production,
                project: ProjectRef::Tag((*tag).into()),
                model_id: (*model).into(),
                prompt_tokens: prompt * scale,
                completion_tokens: completion * scale,
                request_id: format!("seed-{day}-{i}"),
                user_id: Some(*user),
                api_key_id: None,
            };
            usage::record_usage(db, request, at).await?;
        }
        let staging_use = UsageRequest {
            workspace_id: staging,
            project: ProjectRef::Tag("experiments".into()),
            model_id: "openai/gpt-4o-mini".into(),
            prompt_tokens: 200_000,
            completion_tokens: 50_000,
            request_id: format!("seed-staging-{day}"),
            user_id: Some(created.owner.id),
            api_key_id: None,
        };
        usage::record_usage(db, staging_use, now - Days::days(29 - day)).await?;
    }
    Ok(Seeded {
        account_id,
        production,
        staging,
        owner_token: created.owner_token,
        viewer_token: accounts::create_user_token(db, viewer.id, "browser test", now).await?,
        member_token: accounts::create_user_token(db, member.id, "browser test", now).await?,
    })
}

struct System {
    base: String,
    handle: api::ApiHandle,
    stop: tokio::sync::watch::Sender<bool>,
    worker: tokio::task::JoinHandle<()>,
    _outbox: tempfile::TempDir,
}

/// The API and the worker (which captures card purchases), as `reservoir serve` runs them.
async fn start(t: &TestDb) -> anyhow::Result<System> {
    let gateway = Arc::new(SandboxGateway::new());
    let queue = worker::queue::Queue::connect(&t.queue_url()).await?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let config = api::ApiConfig {
        admin_token: Some(ADMIN_TOKEN.into()),
        workers: 2,
        gateway: gateway.clone(),
        jobs: Arc::new(queue.clone()),
        ..Default::default()
    };
    let (handle, addr, _join) = api::spawn(listener, t.second_pool().await?, config)?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let worker_config = worker::WorkerConfig {
        poll_interval_ms: 50,
        sweep_interval_ms: 200,
        direct_capture_after_ms: 1_000,
        ..Default::default()
    };
    let outbox = tempfile::tempdir()?;
    let mailer = worker::email::Mailer::outbox(outbox.path());
    let db = t.second_pool().await?;
    let gw: Arc<dyn PaymentGateway> = gateway;
    let worker = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.changed().await;
        };
        let from = "Reservoir <billing@reservoir.test>".to_owned();
        if let Err(e) = worker::run(db, queue, gw, mailer, from, worker_config, shutdown).await {
            panic!("worker failed: {e}");
        }
    });
    Ok(System {
        base: format!("http://{addr}"),
        handle,
        stop,
        worker,
        _outbox: outbox,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_in_a_real_browser() -> anyhow::Result<()> {
    if let Some(why) = missing_tools() {
        let required = std::env::var("RESERVOIR_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "RESERVOIR_REQUIRE_BROWSER=1 but the browser test cannot run: {why}"
        );
        eprintln!(
            "\n!!! SKIPPED dashboard_in_a_real_browser: {why}\n!!! (set RESERVOIR_REQUIRE_BROWSER=1 to make this a failure)\n"
        );
        return Ok(());
    }
    let t = TestDb::new().await?;
    let seeded = seed(&t).await?;
    let system = start(&t).await?;
    let fixture = serde_json::json!({
        "base": system.base,
        "backend": reservoir_tests::backend_name(),
        "accountId": seeded.account_id,
        "production": seeded.production,
        "staging": seeded.staging,
        "ownerToken": seeded.owner_token,
        "viewerToken": seeded.viewer_token,
        "memberToken": seeded.member_token,
        "screenshots": std::env::var("RESERVOIR_SCREENSHOTS").ok(),
    });
    let output = tokio::process::Command::new("node")
        .arg(browser_dir().join("dashboard.mjs"))
        .env("RESERVOIR_BROWSER_FIXTURE", fixture.to_string())
        .current_dir(browser_dir())
        .kill_on_drop(true)
        .output()
        .await?;
    println!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    system.handle.stop(true).await;
    let _ = system.stop.send(true);
    let _ = system.worker.await;
    assert!(
        output.status.success(),
        "the browser checks failed (see above)"
    );
    t.finish().await
}
