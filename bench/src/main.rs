#![doc = include_str!("../README.md")]
#![allow(
    clippy::too_many_lines,
    reason = "a load generator, not the product: each scenario reads top to bottom"
)]

mod dashboard;
mod fixtures;
mod followups;
mod hist;
mod load;
mod sinks;
mod subscribe;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use load::{Kind, Load, Stats, Window};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Most invariant violations listed in the report (all are counted).
const VIOLATIONS_LISTED: usize = 100;
/// Longest wait for every subscriber to receive its first event.
const SUBSCRIBE_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait, after the load, for subscribers to receive the last event.
const SUBSCRIBE_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Parser)]
#[command(
    name = "reservoir-bench",
    version,
    about = "Load generator for a running Reservoir server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one scenario against a running server; JSON report on stdout, human one on stderr.
    Run(RunArgs),
    /// Seeds an account with usage history for the `dashboard` scenario.
    SeedDashboard(SeedArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    UsageHot,
    UsageBatch,
    UsageSpread,
    ReserveSettle,
    Subscribe,
    Dashboard,
    Followups,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::UsageHot => "usage-hot",
            Self::UsageBatch => "usage-batch",
            Self::UsageSpread => "usage-spread",
            Self::ReserveSettle => "reserve-settle",
            Self::Subscribe => "subscribe",
            Self::Dashboard => "dashboard",
            Self::Followups => "followups",
        }
    }
}

#[derive(Parser)]
struct RunArgs {
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// The server's base URL (POST <url>/graphql, WebSocket ws://…/graphql).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The server's database (sqlite://… or postgres://…).
    #[arg(long)]
    database_url: String,
    /// Concurrent HTTP clients (default 64; 8 for dashboard).
    #[arg(long)]
    clients: Option<usize>,
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// Items per recordUsageBatch call (usage-batch).
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Workspaces, each with its own API key (usage-spread).
    #[arg(long, default_value_t = 1000)]
    workspaces: usize,
    /// WebSocket subscribers (subscribe).
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<String>,
    /// dashboard: the seeded account (default: from ./bench-dashboard.json).
    #[arg(long)]
    account_id: Option<Uuid>,
    /// dashboard: a token that can read the account (default: from ./bench-dashboard.json).
    #[arg(long)]
    token: Option<String>,
    /// followups: the `reservoir` binary run as the worker (default: next to this one).
    /// Its configuration is this process's environment (the server's), plus the SMTP URL.
    #[arg(long)]
    worker_bin: Option<std::path::PathBuf>,
    /// followups: card purchases per second (on the hot workspace, as its owner).
    #[arg(long, default_value_t = 2.0)]
    purchases_per_s: f64,
    /// followups: low-balance alert crossings per second (one alert workspace each).
    #[arg(long, default_value_t = 2.0)]
    alerts_per_s: f64,
    /// followups: when in the measured window to SIGKILL the worker (0 to 1); negative: never.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    kill_at: f64,
    /// followups: seconds the killed worker stays down before it is started again.
    #[arg(long, default_value_t = 2.0)]
    worker_down_s: f64,
    /// followups: longest wait after the load for every follow-up to arrive (a job cut
    /// off by the kill waits for its claim's lease: 300 s for an e-mail).
    #[arg(long, default_value_t = 420.0)]
    drain_s: f64,
}

#[derive(Parser)]
struct SeedArgs {
    #[arg(long)]
    database_url: String,
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    #[arg(long, default_value_t = 30)]
    days: u32,
}

fn main() -> std::process::ExitCode {
    match main_inner() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reservoir-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn main_inner() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Two workers: the machine has two cores, shared with the server and the database.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::SeedDashboard(args) => seed_dashboard(args).await,
        }
    })
}

async fn seed_dashboard(args: SeedArgs) -> anyhow::Result<()> {
    let db = fixtures::connect(&args.database_url).await?;
    let seeded = dashboard::seed(&db, &args.database_url, args.events, args.days).await?;
    let text = serde_json::to_string(&seeded)?;
    std::fs::write(dashboard::SEED_FILE, format!("{text}\n"))
        .with_context(|| format!("writing {}", dashboard::SEED_FILE))?;
    let (ok, violations) = fixtures::invariants(&db).await?;
    eprintln!(
        "seed-dashboard: {} events in {:.1} s; invariants {}; wrote ./{}",
        seeded.events,
        seeded.seconds,
        if ok {
            "ok".to_owned()
        } else {
            format!("VIOLATED ({})", violations.len())
        },
        dashboard::SEED_FILE
    );
    for v in violations.iter().take(VIOLATIONS_LISTED) {
        eprintln!("  VIOLATION {v}");
    }
    println!("{text}");
    db.close().await?;
    anyhow::ensure!(ok, "invariants violated after seeding");
    Ok(())
}

fn secs(s: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .with_context(|| format!("--{what} must be a non-negative number of seconds"))
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let scenario = args.scenario;
    let clients = args
        .clients
        .unwrap_or(if scenario == Scenario::Dashboard {
            8
        } else {
            64
        })
        .max(1);
    let warmup = secs(args.warmup_s, "warmup-s")?;
    let duration = secs(args.duration_s, "duration-s")?;
    anyhow::ensure!(args.duration_s > 0.0, "--duration-s must be positive");
    anyhow::ensure!(
        (1..=1000).contains(&args.batch_size),
        "--batch-size must be 1 to 1000 (the server's limit)"
    );
    let backend = fixtures::backend_of(&args.database_url);
    let base = args.url.trim_end_matches('/').to_owned();
    if scenario == Scenario::Subscribe {
        subscribe::check_open_files(args.subscribers as u64 + clients as u64 + 128)?;
    }
    let db = fixtures::connect(&args.database_url).await?;
    let client = load::http_client(clients)?;
    let mut extra = serde_json::Map::new();

    // Fixtures: a fresh account per run (the dashboard reads the seeded one).
    let (account_id, load, usage_before) = if scenario == Scenario::Dashboard {
        let (account_id, token) = match (args.account_id, args.token.clone()) {
            (Some(id), Some(token)) => (id, token),
            (None, None) => {
                let seeded = dashboard::Seeded::load(Path::new(dashboard::SEED_FILE))?;
                extra.insert("seeded_events".into(), json!(seeded.events));
                (seeded.account_id, seeded.token)
            }
            _ => anyhow::bail!("give both --account-id and --token, or neither"),
        };
        let body: &'static str =
            Box::leak(dashboard::body(account_id, chrono::Utc::now())?.into_boxed_str());
        let auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))?;
        let load = Load::new(client, &base, Kind::Query { body }, vec![auth], "unused")?;
        let first = load
            .query_once()
            .await
            .context("the first dashboard query")?;
        anyhow::ensure!(
            first["errors"].is_null() && first["data"]["account"].is_object(),
            "the dashboard query failed: {first}"
        );
        let workspaces = first["data"]["account"]["workspaces"]
            .as_array()
            .map_or(0, Vec::len);
        extra.insert("account_id".into(), json!(account_id));
        extra.insert("dashboard_workspaces".into(), json!(workspaces));
        let before = fixtures::usage_posted(&db, account_id).await?;
        (account_id, load, before)
    } else {
        let workspaces = if scenario == Scenario::UsageSpread {
            args.workspaces.max(1)
        } else {
            1
        };
        eprintln!(
            "{}: setting up {workspaces} workspace(s) in the database…",
            scenario.name()
        );
        let fx = fixtures::setup(&db, scenario.name(), workspaces).await?;
        extra.insert("setup_s".into(), json!(round3(fx.setup_s)));
        extra.insert("workspaces".into(), json!(workspaces));
        extra.insert("model".into(), json!(fx.model_id));
        let kind = match scenario {
            Scenario::UsageBatch => {
                extra.insert("batch_size".into(), json!(args.batch_size));
                Kind::Batch {
                    size: args.batch_size,
                }
            }
            Scenario::ReserveSettle => Kind::ReserveSettle,
            _ => Kind::Usage,
        };
        let auths = fx.tenants.iter().map(|t| t.auth.clone()).collect();
        let load = Load::new(client, &base, kind, auths, &fx.model_id)?;
        if scenario == Scenario::Followups {
            let opts = followups::Options {
                worker_bin: args
                    .worker_bin
                    .clone()
                    .unwrap_or_else(sinks::default_worker_bin),
                database_url: args.database_url.clone(),
                purchases_per_s: args.purchases_per_s,
                alerts_per_s: args.alerts_per_s,
                kill_at: (args.kill_at >= 0.0).then_some(args.kill_at),
                worker_down: secs(args.worker_down_s, "worker-down-s")?,
                drain: secs(args.drain_s, "drain-s")?,
            };
            let (stats, more) = followups::run(
                &db,
                &base,
                &fx,
                Arc::new(load),
                clients,
                warmup,
                duration,
                &opts,
            )
            .await?;
            extra.extend(more);
            return finish(
                &args,
                scenario,
                backend,
                clients,
                &db,
                fx.account_id,
                0,
                stats,
                extra,
            )
            .await;
        }
        if scenario == Scenario::Subscribe {
            let (stats, sub) = run_subscribe(
                &db,
                &base,
                &fx,
                Arc::new(load),
                clients,
                warmup,
                duration,
                args.subscribers,
            )
            .await?;
            extra.extend(sub);
            return finish(
                &args,
                scenario,
                backend,
                clients,
                &db,
                fx.account_id,
                0,
                stats,
                extra,
            )
            .await;
        }
        (fx.account_id, load, 0)
    };

    eprintln!(
        "{}: {clients} clients, {:.1} s warm-up + {:.1} s measured against {base}",
        scenario.name(),
        warmup.as_secs_f64(),
        duration.as_secs_f64()
    );
    let stats = load::run(Arc::new(load), clients, Window::after(warmup, duration)).await?;
    finish(
        &args,
        scenario,
        backend,
        clients,
        &db,
        account_id,
        usage_before,
        stats,
        extra,
    )
    .await
}

/// The subscribe scenario: K subscribers on the hot workspace, woken by probe debits,
/// then usage-hot load; returns the load's counters and the subscribers' fields.
#[allow(clippy::too_many_arguments)]
async fn run_subscribe(
    db: &billing::sea_orm::DatabaseConnection,
    base: &str,
    fx: &fixtures::Fixture,
    load: Arc<Load>,
    clients: usize,
    warmup: Duration,
    duration: Duration,
    subscribers: usize,
) -> anyhow::Result<(Stats, serde_json::Map<String, Value>)> {
    let tenant = fx.tenants.first().context("no workspace")?;
    let ws_url = format!(
        "{}/graphql",
        base.replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1)
    );
    eprintln!("subscribe: opening {subscribers} WebSocket subscriptions at {ws_url}…");
    let opened = std::time::Instant::now();
    let subs = subscribe::open(&ws_url, &tenant.secret, tenant.workspace_id, subscribers).await?;
    // A subscription is registered asynchronously after `subscribe`: debit (one at a
    // time) until every subscriber has received an event.
    let mut probes = Stats::default();
    let deadline = tokio::time::Instant::now() + SUBSCRIBE_START_TIMEOUT;
    while subs.started() < subs.len() && tokio::time::Instant::now() < deadline {
        load.probe_usage(&mut probes).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = subs.started();
    if started < subs.len() {
        eprintln!(
            "subscribe: only {started} of {} subscribers received an event within {:?}; running anyway",
            subs.len(),
            SUBSCRIBE_START_TIMEOUT
        );
    }
    eprintln!(
        "subscribe: {started} subscribers live after {:.1} s ({} probe debits); {clients} clients, {:.1} s warm-up + {:.1} s measured",
        opened.elapsed().as_secs_f64(),
        probes.calls_whole_run,
        warmup.as_secs_f64(),
        duration.as_secs_f64()
    );
    let window = Window::after(warmup, duration);
    subs.set_window(window);
    let mut stats = load::run(load, clients, window).await?;
    stats.merge(probes);
    // Let the last events arrive (the SQLite hub polls; PostgreSQL is notified).
    let last = fixtures::balance_sequence(db, tenant.workspace_id).await?;
    let drain = tokio::time::Instant::now() + SUBSCRIBE_DRAIN_TIMEOUT;
    while subs.caught_up(last) < subs.len() && tokio::time::Instant::now() < drain {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = subs.finish(last).await?;
    let mut extra = serde_json::Map::new();
    extra.insert("subscribers".into(), json!(report.subscribers));
    extra.insert("subscribers_started".into(), json!(started));
    extra.insert("delivery_ms".into(), json!(report.latency.summary_ms()));
    extra.insert("delivered".into(), json!(report.delivered));
    extra.insert("expected".into(), json!(report.expected));
    extra.insert("gaps".into(), json!(report.gaps));
    extra.insert("out_of_order".into(), json!(report.out_of_order));
    extra.insert("undelivered_tail".into(), json!(report.undelivered_tail));
    extra.insert("subscriptions_ended".into(), json!(report.ended));
    extra.insert("last_sequence".into(), json!(last));
    Ok((stats, extra))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Counts, checks and reports.
#[allow(clippy::too_many_arguments)]
async fn finish(
    args: &RunArgs,
    scenario: Scenario,
    backend: &str,
    clients: usize,
    db: &billing::sea_orm::DatabaseConnection,
    account_id: Uuid,
    usage_before: u64,
    stats: Stats,
    extra: serde_json::Map<String, Value>,
) -> anyhow::Result<()> {
    let ledger = fixtures::usage_posted(db, account_id)
        .await?
        .saturating_sub(usage_before);
    let (invariants_ok, violations) = fixtures::invariants(db).await?;
    let duration_s = args.duration_s;
    let ops_per_s = stats.ops as f64 / duration_s;
    let requests_per_s = stats.requests as f64 / duration_s;
    let latency = stats.latency.summary_ms();
    let mut report = json!({
        "scenario": scenario.name(),
        "backend": backend,
        "clients": clients,
        "duration_s": duration_s,
        "warmup_s": args.warmup_s,
        "requests": stats.requests,
        "ops": stats.ops,
        "ops_per_s": round3(ops_per_s),
        "requests_per_s": round3(requests_per_s),
        "latency_ms": latency,
        "latency_samples": stats.latency.count(),
        "errors": stats.errors,
        "errors_whole_run": stats.errors_whole_run,
        "admitted": stats.admitted,
        "ambiguous": stats.ambiguous,
        "ledger_posted_events": ledger,
        "admitted_matches_ledger": stats.admitted == ledger,
        "invariants_ok": invariants_ok,
        "invariant_violation_count": violations.len(),
        "invariant_violations": violations.iter().take(VIOLATIONS_LISTED).collect::<Vec<_>>(),
    });
    if let Value::Object(map) = &mut report {
        map.extend(extra.clone());
    }
    eprintln!("{}", human(&report, &stats.errors));
    let line = report.to_string();
    if let Some(path) = &args.json_out {
        std::fs::write(path, format!("{line}\n")).with_context(|| format!("writing {path}"))?;
    }
    println!("{line}");
    Ok(())
}

fn human(r: &Value, errors: &BTreeMap<String, u64>) -> String {
    let mut out = String::new();
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    out.push_str(&format!(
        "== {} on {}: {} clients, {} s warm-up + {} s measured\n",
        r["scenario"].as_str().unwrap_or("?"),
        r["backend"].as_str().unwrap_or("?"),
        r["clients"],
        r["warmup_s"],
        r["duration_s"],
    ));
    out.push_str(&format!(
        "   requests  {} ({:.1}/s)    ops {} ({:.1}/s)\n",
        r["requests"],
        f(&r["requests_per_s"]),
        r["ops"],
        f(&r["ops_per_s"]),
    ));
    let l = &r["latency_ms"];
    out.push_str(&format!(
        "   latency   p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms\n",
        f(&l["p50"]),
        f(&l["p99"]),
        f(&l["max"])
    ));
    let list = |m: &BTreeMap<String, u64>| {
        if m.is_empty() {
            "none".to_owned()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    out.push_str(&format!("   errors    {}\n", list(errors)));
    if r["scenario"] == "subscribe" {
        let d = &r["delivery_ms"];
        out.push_str(&format!(
            "   delivery  p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms\n",
            f(&d["p50"]),
            f(&d["p99"]),
            f(&d["max"])
        ));
        out.push_str(&format!(
            "   subscribers {} (started {}): delivered {} of expected {}, gaps {}, out of order {}, undelivered tail {}, ended {}\n",
            r["subscribers"],
            r["subscribers_started"],
            r["delivered"],
            r["expected"],
            r["gaps"],
            r["out_of_order"],
            r["undelivered_tail"],
            r["subscriptions_ended"],
        ));
    }
    if r["scenario"] == "followups" {
        out.push_str(&followups::human(r));
    }
    out.push_str(&format!(
        "   admitted  {} (whole run, {} unknown) vs usage events posted to the ledger {}: {}\n",
        r["admitted"],
        r["ambiguous"],
        r["ledger_posted_events"],
        if r["admitted_matches_ledger"] == true {
            "match"
        } else {
            "MISMATCH"
        }
    ));
    if r["invariants_ok"] == true {
        out.push_str("   invariants ok");
    } else {
        out.push_str(&format!(
            "   invariants VIOLATED ({}):",
            r["invariant_violation_count"]
        ));
        if let Some(list) = r["invariant_violations"].as_array() {
            for v in list {
                out.push_str(&format!("\n     {}", v.as_str().unwrap_or("?")));
            }
        }
    }
    out
}
