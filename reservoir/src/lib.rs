#![doc = include_str!("../README.md")]

pub mod config;
pub mod jobs;

use anyhow::Context as _;
use billing::db::{self, PoolLimits};
use billing::payments::{PaymentGateway, SandboxGateway};
use billing::sea_orm::DatabaseConnection;
use config::{Backend, Config, DatabaseConfig};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

/// Time allowed for in-flight requests and sweeps to finish after SIGTERM.
pub const SHUTDOWN_TIMEOUT_MS: u64 = 10_000;

/// Connects to the configured database; every error names the URL (password
/// redacted), and a SQLite file whose folder is missing is named before trying.
pub async fn connect(config: &DatabaseConfig) -> anyhow::Result<DatabaseConnection> {
    let url = redact(&config.database_url);
    if config.backend == Backend::Sqlite {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating the data folder {}", config.data_dir.display()))?;
        if let Some(folder) = sqlite_folder(&config.database_url)
            && !folder.is_dir()
        {
            anyhow::bail!(
                "connecting to the database {url}: the folder {} does not exist",
                folder.display()
            );
        }
    }
    let limits = PoolLimits {
        connections_max: config.db_connections_max,
        acquire_timeout_ms: config.db_acquire_timeout_ms,
    };
    // Requests fail fast on an unreachable database (the acquire timeout), but a
    // process started alongside its database server, or on a busy machine, waits for it.
    let started = std::time::Instant::now();
    loop {
        match db::connect(&config.database_url, limits).await {
            // A SQLite file opens or it does not: only a server is waited for.
            Err(e)
                if config.backend == Backend::Postgres
                    && e.code() == billing::ErrorCode::Unavailable
                    && started.elapsed() < Duration::from_millis(STARTUP_DATABASE_WAIT_MS) =>
            {
                tracing::warn!(database = %url, error = %e, "the database is not reachable yet; waiting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            result => return result.with_context(|| format!("connecting to the database {url}")),
        }
    }
}

/// How long a starting process waits for its database before giving up.
pub const STARTUP_DATABASE_WAIT_MS: u64 = 30_000;

/// The folder of a SQLite database file named by a `sqlite:` URL (None for an
/// in-memory database or a bare file name).
fn sqlite_folder(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let path = rest.strip_prefix("//").unwrap_or(rest);
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path.starts_with(":memory:") {
        return None;
    }
    let parent = std::path::Path::new(path).parent()?;
    (!parent.as_os_str().is_empty()).then(|| parent.to_path_buf())
}

pub async fn migrate(db: &DatabaseConnection) -> anyhow::Result<()> {
    db::migrate(db).await.context("applying migrations")
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown requested");
}

/// The payment gateway the configuration names.
pub fn gateway(config: &Config) -> anyhow::Result<Arc<dyn PaymentGateway>> {
    Ok(match &config.payment_gateway {
        config::PaymentGateway::Sandbox => Arc::new(SandboxGateway::new()),
        config::PaymentGateway::Stripe {
            secret_key,
            base_url,
            webhook_secret,
        } => {
            if webhook_secret.is_none() {
                tracing::warn!(
                    "RESERVOIR_STRIPE_WEBHOOK_SECRET is not set: POST /webhooks/stripe refuses \
                     every event, so a charge whose answer was lost waits for the capture retries"
                );
            }
            Arc::new(
                gateways::StripeGateway::new(
                    secret_key.clone(),
                    base_url.clone(),
                    gateways::DEFAULT_TIMEOUT_MS,
                )
                .context("configuring the Stripe gateway")?
                .with_webhook_secret(webhook_secret.as_deref().unwrap_or_default()),
            )
        }
    })
}

/// Which parts of the system a process runs, and its one-off start-up choices.
#[derive(Clone, Copy, Debug, Default)]
pub struct Process {
    pub api: bool,
    pub worker: bool,
    /// Mint a new demo token instead of keeping the last start's.
    pub rotate_demo_token: bool,
}

/// Runs the API and/or the worker, as `process` says, until a shutdown signal.
pub async fn run(config: Config, process: Process) -> anyhow::Result<()> {
    let (with_api, with_worker) = (process.api, process.worker);
    let db = connect(&config.database()).await?;
    migrate(&db).await?;
    let queue = worker::queue::Queue::connect(&config.queue_url)
        .await
        .context("connecting to the job queue")?;
    let gateway = gateway(&config)?;
    let mailer = mailer(&config)?;
    let listener = if with_api {
        Some(
            TcpListener::bind(config.listen)
                .with_context(|| format!("binding {}", config.listen))?,
        )
    } else {
        None
    };
    if with_api {
        print_banner(
            &config,
            &db,
            gateway.as_ref(),
            listener.as_ref(),
            process.rotate_demo_token,
        )
        .await?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // What `/readyz` reads about the job workers (the API's in `serve`, the worker's own
    // listener in `worker`).
    let worker_health = with_worker.then(worker::health::WorkerHealth::new);
    let worker = worker_health.clone().map(|health| {
        let (db, queue, gateway) = (db.clone(), queue.clone(), gateway.clone());
        let email_from = config.email_from.clone();
        let mut stop = stop_rx.clone();
        let shutdown = async move {
            let _ = stop.changed().await;
        };
        let deps = (db, queue, gateway, mailer, email_from);
        tokio::spawn(run_worker(deps, health, shutdown))
    });
    let server = match listener {
        Some(listener) => {
            let mut api_config = api_config(&config, &db, &gateway, &queue)?;
            api_config.worker_readiness = worker_health
                .clone()
                .map(|h| h as Arc<dyn billing::jobs::WorkerReadiness>);
            Some(api::spawn(listener, db.clone(), api_config)?)
        }
        None => None,
    };
    let ops = match (&server, &worker_health, config.worker_listen) {
        (None, Some(health), Some(addr)) => Some(worker_ops(&db, health, addr)?),
        _ => None,
    };
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    let timeout = Duration::from_millis(SHUTDOWN_TIMEOUT_MS);
    if let Some((handle, _, join)) = server {
        handle.stop(true).await;
        let _ = tokio::time::timeout(timeout, join).await;
    }
    stop_worker(ops, worker, timeout).await;
    db.close().await.ok();
    Ok(())
}

/// After the stop signal: the worker-only process's listener stopped, then the worker
/// waited for, each for at most `timeout`.
async fn stop_worker(
    ops: Option<(
        api::ServerHandle,
        tokio::task::JoinHandle<std::io::Result<()>>,
    )>,
    worker: Option<tokio::task::JoinHandle<()>>,
    timeout: Duration,
) {
    if let Some((handle, join)) = ops {
        handle.stop(true).await;
        let _ = tokio::time::timeout(timeout, join).await;
    }
    if let Some(worker) = worker
        && tokio::time::timeout(timeout, worker).await.is_err()
    {
        tracing::warn!(
            timeout_ms = SHUTDOWN_TIMEOUT_MS,
            "worker did not stop in time"
        );
    }
}

/// The mailer the configuration names (SMTP, or the outbox folder), after checking the
/// sender address, so a bad one stops the start-up rather than every send.
fn mailer(config: &Config) -> anyhow::Result<worker::email::Mailer> {
    worker::email::check_sender(&config.email_from)
        .map_err(anyhow::Error::msg)
        .context("RESERVOIR_EMAIL_FROM")?;
    Ok(match &config.smtp_url {
        Some(url) => worker::email::Mailer::from_url(url).context("configuring SMTP")?,
        None => worker::email::Mailer::outbox(config.data_dir.join("outbox")),
    })
}

/// What the worker runs on: the database, the queue, the gateway, the mailer and the
/// sender address.
type WorkerDeps = (
    DatabaseConnection,
    worker::queue::Queue,
    Arc<dyn PaymentGateway>,
    worker::email::Mailer,
    String,
);

/// The worker until `shutdown` resolves, reporting to `health`; a failure is logged,
/// the API keeps serving.
async fn run_worker(
    (db, queue, gateway, mailer, email_from): WorkerDeps,
    health: Arc<worker::health::WorkerHealth>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let config = worker::WorkerConfig {
        health: Some(health),
        ..Default::default()
    };
    if let Err(e) = worker::run(db, queue, gateway, mailer, email_from, config, shutdown).await {
        tracing::error!(error = %e, "worker failed");
    }
}

/// A worker-only process's `/healthz`, `/readyz` and `/metrics` on `addr`
/// (`RESERVOIR_WORKER_LISTEN`), in the background.
fn worker_ops(
    db: &DatabaseConnection,
    health: &Arc<worker::health::WorkerHealth>,
    addr: std::net::SocketAddr,
) -> anyhow::Result<(
    api::ServerHandle,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    let listener = TcpListener::bind(addr)
        .with_context(|| format!("binding RESERVOIR_WORKER_LISTEN {addr}"))?;
    let readiness: Arc<dyn billing::jobs::WorkerReadiness> = health.clone();
    let (handle, bound, join) = api::worker_ops::spawn(listener, db.clone(), readiness)?;
    tracing::info!(addr = %bound, "worker health and metrics listening");
    Ok((handle, join))
}

/// The API's configuration: the group-commit writer's settings (the backend's
/// defaults, with the configured overrides, validated), credentials and the queue.
fn api_config(
    config: &Config,
    db: &DatabaseConnection,
    gateway: &Arc<dyn PaymentGateway>,
    queue: &worker::queue::Queue,
) -> anyhow::Result<api::ApiConfig> {
    let defaults = billing::debits::writer::WriterConfig::for_backend(db.get_database_backend());
    let writer = billing::debits::writer::WriterConfig {
        lanes: config.writer_lanes.unwrap_or(defaults.lanes),
        batch_ops_max: config
            .writer_batch_ops_max
            .unwrap_or(defaults.batch_ops_max),
        window_us: config.writer_window_us.unwrap_or(defaults.window_us),
        queue_ops_max: defaults.queue_ops_max,
        in_flight: config.writer_in_flight.unwrap_or(defaults.in_flight),
        pipeline: config.writer_pipeline.unwrap_or(defaults.pipeline),
    };
    writer.validate()?;
    Ok(api::ApiConfig {
        admin_token: Some(config.admin_token.value.clone()),
        gateway: gateway.clone(),
        jobs: Arc::new(queue.clone()),
        writer: Some(writer),
        credential_cache_ttl_ms: config.credential_cache_ttl_ms,
        introspection: config.introspection,
        webhook_urls: billing::webhooks::endpoints::UrlPolicy {
            allow_http: config.webhooks_allow_http,
        },
        rate_limits: api::rate_limit::RateLimits {
            usage_per_second: config.rate_limit_usage_per_second,
            auth_failures_per_minute: config.rate_limit_auth_failures_per_minute,
        },
        ..Default::default()
    })
}

async fn print_banner(
    config: &Config,
    db: &DatabaseConnection,
    gateway: &dyn PaymentGateway,
    listener: Option<&TcpListener>,
    rotate_demo_token: bool,
) -> anyhow::Result<()> {
    let addr = match listener {
        Some(l) => l.local_addr()?,
        None => config.listen,
    };
    println!("Reservoir is running.");
    println!("  GraphiQL:  http://{addr}/");
    println!("  GraphQL:   http://{addr}/graphql");
    println!("  Dashboard: http://{addr}/dashboard");
    println!("  Database:  {}", redact(&config.database_url));
    if config.admin_token.generated {
        println!(
            "  Platform admin token (generated for this run): {}",
            config.admin_token.value
        );
    }
    if config.demo_seed {
        print_demo(config, db, gateway, addr, rotate_demo_token).await?;
    }
    Ok(())
}

/// Where the demo owner's token is kept between starts (in the data folder, readable
/// by its owner only), so a header saved in GraphiQL keeps working after a restart.
pub fn demo_token_path(config: &Config) -> std::path::PathBuf {
    config.data_dir.join("demo-token")
}

/// Seeds the demo account on an empty database and prints how to use it, keeping
/// the token of the last start unless asked to rotate it.
async fn print_demo(
    config: &Config,
    db: &DatabaseConnection,
    gateway: &dyn PaymentGateway,
    addr: std::net::SocketAddr,
    rotate: bool,
) -> anyhow::Result<()> {
    let path = demo_token_path(config);
    let kept = match rotate {
        true => None,
        false => std::fs::read_to_string(&path)
            .ok()
            .map(|t| t.trim().to_owned()),
    };
    let Some(demo) = billing::seed::ensure_demo(db, gateway, kept.as_deref(), chrono::Utc::now())
        .await
        .context("seeding the demo account")?
    else {
        println!("  Demo seed skipped: the database already holds other accounts.");
        return Ok(());
    };
    if !demo.token_kept {
        write_private(&path, &demo.token)
            .with_context(|| format!("keeping the demo token in {}", path.display()))?;
    }
    let state = if demo.created {
        "just seeded"
    } else {
        "already present"
    };
    println!(
        "  Demo account {} ({state}): owner {}",
        demo.account_id,
        billing::seed::DEMO_OWNER_EMAIL
    );
    for (name, id) in &demo.workspaces {
        println!("    workspace {name}: {id}");
    }
    let kept_note = match demo.token_kept {
        true => "kept from the last start",
        false => "new; kept across restarts",
    };
    println!("  Demo token ({kept_note}; `--rotate-demo-token` for a new one):");
    println!("    {}", demo.token);
    println!(
        "  Open the dashboard signed in:  http://{addr}/dashboard#token={}",
        demo.token
    );
    println!(
        "  Try it in GraphiQL with the header  {{\"Authorization\": \"Bearer {}\"}}",
        demo.token
    );
    Ok(())
}

/// Writes a secret to a file only its owner can read.
fn write_private(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    writeln!(file, "{secret}")
}

/// A database URL without its password, for logs and banners.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Connects for a command that reads the schema (`check`, `jobs`): a database with
/// pending migrations is refused with "run `reservoir migrate` first" rather than a
/// "no such table" later.
async fn connect_migrated(config: &DatabaseConfig) -> anyhow::Result<DatabaseConnection> {
    let db = connect(config).await?;
    let pending = db::pending_migrations(&db)
        .await
        .context("reading the migration state")?;
    if pending > 0 {
        anyhow::bail!(
            "the database {} lacks {pending} migration(s): run `reservoir migrate` first",
            redact(&config.database_url)
        );
    }
    Ok(db)
}

/// `reservoir jobs`: reads only the database settings (and the queue URL), like
/// `check`; a database with pending migrations is refused.
pub async fn jobs(config: &DatabaseConfig, action: jobs::Action) -> anyhow::Result<()> {
    let db = connect_migrated(config).await?;
    let queue_url = config::queue_url_from_env(config)?;
    let result = jobs::run(&db, &queue_url, action).await;
    db.close().await.ok();
    result
}

/// Runs the invariant checks and prints the report; Ok(false) when any failed.
pub async fn check(config: &DatabaseConfig) -> anyhow::Result<bool> {
    let db = connect_migrated(config).await?;
    let report = billing::ledger::invariants::check(&db).await?;
    println!(
        "{} invariant checks run, {} violations",
        report.checks_run,
        report.violations.len()
    );
    for v in &report.violations {
        println!("  VIOLATION {v}");
    }
    Ok(report.is_ok())
}

/// The GraphQL schema in SDL.
pub fn export_schema() -> String {
    api::schema_sdl(DatabaseConnection::default())
}
