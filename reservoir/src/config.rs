//! Configuration from environment variables (and an optional `.env`), typed and
//! validated once at start-up. Unsafe production combinations are refused here, so a
//! misconfigured process never starts.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{var}: {message}")]
    Invalid { var: &'static str, message: String },
    #[error("refusing to start: {0}")]
    Unsafe(String),
}

fn invalid(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var,
        message: message.into(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PaymentGateway {
    /// Deterministic test cards, no money moves. The default on the embedded setup.
    Sandbox,
    Stripe {
        secret_key: String,
        base_url: String,
        /// The webhook endpoint's signing secret (`whsec_…`); None: every webhook is
        /// refused (a start-up warning says so).
        webhook_secret: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminToken {
    pub value: String,
    /// Generated at start-up because none was configured (embedded default only).
    pub generated: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub data_dir: PathBuf,
    pub database_url: String,
    pub backend: Backend,
    pub queue_url: String,
    pub listen: SocketAddr,
    /// Where a worker-only process (`reservoir worker`) serves `/healthz`, `/readyz`
    /// and `/metrics`; None: it serves nothing.
    pub worker_listen: Option<SocketAddr>,
    pub admin_token: AdminToken,
    /// None: emails are written as .eml files under `<data dir>/outbox`.
    pub smtp_url: Option<String>,
    pub email_from: String,
    pub payment_gateway: PaymentGateway,
    pub demo_seed: bool,
    pub db_connections_max: u32,
    pub db_acquire_timeout_ms: u64,
    pub log_format: LogFormat,
    /// Group-commit writer overrides (None: the backend's defaults).
    pub writer_lanes: Option<usize>,
    pub writer_batch_ops_max: Option<usize>,
    pub writer_window_us: Option<u64>,
    /// Batches of one lane in flight at once (1–4; None: 2 on PostgreSQL, 1 on SQLite).
    pub writer_in_flight: Option<usize>,
    /// Pipelined batches (None: on for PostgreSQL, off for SQLite).
    pub writer_pipeline: Option<bool>,
    pub credential_cache_ttl_ms: u64,
    /// Answer introspection queries (GraphiQL, code generators); off in production if
    /// the schema is not to be browsable.
    pub introspection: bool,
    /// Accept `http://` webhook endpoints on PostgreSQL too (always accepted on SQLite).
    pub webhooks_allow_http: bool,
    /// Usage events per second per credential (0: no limit).
    pub rate_limit_usage_per_second: u32,
    /// Failed authentications per minute per client address (0: no limit).
    pub rate_limit_auth_failures_per_minute: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Every variable this file reads, for `.env.example` and the README.
pub const VARIABLES: &[&str] = &[
    "RESERVOIR_DATA_DIR",
    "RESERVOIR_DATABASE_URL",
    "RESERVOIR_QUEUE_URL",
    "RESERVOIR_LISTEN",
    "RESERVOIR_WORKER_LISTEN",
    "RESERVOIR_ADMIN_TOKEN",
    "RESERVOIR_SMTP_URL",
    "RESERVOIR_EMAIL_FROM",
    "RESERVOIR_PAYMENT_GATEWAY",
    "RESERVOIR_STRIPE_SECRET_KEY",
    "RESERVOIR_STRIPE_BASE_URL",
    "RESERVOIR_STRIPE_WEBHOOK_SECRET",
    "RESERVOIR_DEMO_SEED",
    "RESERVOIR_ALLOW_SANDBOX_WITH_POSTGRES",
    "RESERVOIR_WEBHOOKS_ALLOW_HTTP",
    "RESERVOIR_DB_CONNECTIONS_MAX",
    "RESERVOIR_DB_ACQUIRE_TIMEOUT_MS",
    "RESERVOIR_LOG_FORMAT",
    "RESERVOIR_LOG",
    "RESERVOIR_WRITER_LANES",
    "RESERVOIR_WRITER_BATCH_OPS_MAX",
    "RESERVOIR_WRITER_WINDOW_US",
    "RESERVOIR_WRITER_IN_FLIGHT",
    "RESERVOIR_CREDENTIAL_CACHE_TTL_MS",
    "RESERVOIR_INTROSPECTION",
    "RESERVOIR_RATE_LIMIT_USAGE_PER_SECOND",
    "RESERVOIR_RATE_LIMIT_AUTH_FAILURES_PER_MINUTE",
];

/// Bounds of `RESERVOIR_DB_ACQUIRE_TIMEOUT_MS`: below 100 ms a healthy but busy
/// database would be reported unavailable; above a minute callers hang through outages.
pub const ACQUIRE_TIMEOUT_MS_MIN: u64 = 100;
pub const ACQUIRE_TIMEOUT_MS_MAX: u64 = 60_000;

/// The shortest admin token accepted: it is the key to every account.
pub const ADMIN_TOKEN_LEN_MIN: usize = 32;

fn parse_bool(var: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        other => Err(invalid(
            var,
            format!("expected true or false, got {other:?}"),
        )),
    }
}

/// https anywhere; plain http only to this machine (a local test double).
fn stripe_base_url_ok(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => authority,
    };
    matches!(host, "localhost" | "127.0.0.1" | "[::1]")
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// Builds the configuration from a variable lookup (tests pass a map). Each step
    /// validates its own variables, in this order, so the first bad one is reported.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get: Lookup<'_> = &get;
        let DatabaseConfig {
            data_dir,
            database_url,
            backend,
            db_connections_max,
            db_acquire_timeout_ms,
        } = DatabaseConfig::from_lookup(get)?;
        let queue_url = queue_url(get, &backend, &data_dir, &database_url)?;
        let listen = listen_addr(
            "RESERVOIR_LISTEN",
            &get("RESERVOIR_LISTEN").unwrap_or_else(|| "127.0.0.1:8000".into()),
        )?;
        let worker_listen = get("RESERVOIR_WORKER_LISTEN")
            .map(|v| listen_addr("RESERVOIR_WORKER_LISTEN", &v))
            .transpose()?;
        let admin_token = admin_token(get, &backend)?;
        let (smtp_url, email_from) = email(get)?;
        let payment_gateway = payment_gateway(get)?;
        let allow_sandbox = sandbox_allowed(get, &backend, &payment_gateway)?;
        let demo_seed = demo_seed(get, &backend, allow_sandbox)?;
        let log_format = LogFormat::from_lookup(get)?;
        let writer_lanes = number(get, "RESERVOIR_WRITER_LANES", 64)?.map(|n| n as usize);
        let writer_batch_ops_max =
            number(get, "RESERVOIR_WRITER_BATCH_OPS_MAX", 4_096)?.map(|n| n as usize);
        let writer_window_us = number(get, "RESERVOIR_WRITER_WINDOW_US", 100_000)?;
        let writer_in_flight = number(get, "RESERVOIR_WRITER_IN_FLIGHT", 4)?.map(|n| n as usize);
        let writer_pipeline = flag(get, "RESERVOIR_WRITER_PIPELINE")?;
        let credential_cache_ttl_ms =
            number(get, "RESERVOIR_CREDENTIAL_CACHE_TTL_MS", 60_000)?.unwrap_or(2_000);
        let introspection = flag(get, "RESERVOIR_INTROSPECTION")?.unwrap_or(true);
        let webhooks_allow_http = flag(get, "RESERVOIR_WEBHOOKS_ALLOW_HTTP")?.unwrap_or(false);
        let rate_limit_usage_per_second =
            number(get, "RESERVOIR_RATE_LIMIT_USAGE_PER_SECOND", 1_000_000)?.map_or(5_000, as_u32);
        let rate_limit_auth_failures_per_minute = number(
            get,
            "RESERVOIR_RATE_LIMIT_AUTH_FAILURES_PER_MINUTE",
            100_000,
        )?
        .map_or(60, as_u32);
        Ok(Self {
            data_dir,
            database_url,
            backend,
            queue_url,
            listen,
            worker_listen,
            admin_token,
            smtp_url,
            email_from,
            payment_gateway,
            demo_seed,
            db_connections_max,
            db_acquire_timeout_ms,
            log_format,
            writer_lanes,
            writer_batch_ops_max,
            writer_window_us,
            writer_in_flight,
            writer_pipeline,
            credential_cache_ttl_ms,
            introspection,
            webhooks_allow_http,
            rate_limit_usage_per_second,
            rate_limit_auth_failures_per_minute,
        })
    }

    /// The database part alone (what `migrate` and `check` need).
    pub fn database(&self) -> DatabaseConfig {
        DatabaseConfig {
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            backend: self.backend.clone(),
            db_connections_max: self.db_connections_max,
            db_acquire_timeout_ms: self.db_acquire_timeout_ms,
        }
    }
}

/// Where the data lives: all that `reservoir migrate` and `reservoir check` read, so
/// they run with only the database URL set (no admin token, no gateway).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseConfig {
    pub data_dir: PathBuf,
    pub database_url: String,
    pub backend: Backend,
    pub db_connections_max: u32,
    /// How long a request waits for a database connection before UNAVAILABLE.
    pub db_acquire_timeout_ms: u64,
}

impl DatabaseConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    pub fn from_lookup(get: Lookup<'_>) -> Result<Self, ConfigError> {
        let data_dir = PathBuf::from(get("RESERVOIR_DATA_DIR").unwrap_or_else(|| "./data".into()));
        let database_url = get("RESERVOIR_DATABASE_URL")
            .unwrap_or_else(|| format!("sqlite://{}/reservoir.db", data_dir.display()));
        let backend = backend_of(&database_url)?;
        let db_connections_max = match get("RESERVOIR_DB_CONNECTIONS_MAX") {
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=1_000).contains(n))
                .ok_or_else(|| invalid("RESERVOIR_DB_CONNECTIONS_MAX", "must be 1 to 1000"))?,
            None => 16,
        };
        let db_acquire_timeout_ms = match get("RESERVOIR_DB_ACQUIRE_TIMEOUT_MS") {
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| (ACQUIRE_TIMEOUT_MS_MIN..=ACQUIRE_TIMEOUT_MS_MAX).contains(n))
                .ok_or_else(|| {
                    invalid(
                        "RESERVOIR_DB_ACQUIRE_TIMEOUT_MS",
                        format!("must be {ACQUIRE_TIMEOUT_MS_MIN} to {ACQUIRE_TIMEOUT_MS_MAX}"),
                    )
                })?,
            None => billing::db::ACQUIRE_TIMEOUT_MS_DEFAULT,
        };
        Ok(Self {
            data_dir,
            database_url,
            backend,
            db_connections_max,
            db_acquire_timeout_ms,
        })
    }
}

impl LogFormat {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    fn from_lookup(get: Lookup<'_>) -> Result<Self, ConfigError> {
        match get("RESERVOIR_LOG_FORMAT").as_deref().unwrap_or("json") {
            "json" => Ok(Self::Json),
            "pretty" => Ok(Self::Pretty),
            other => Err(invalid(
                "RESERVOIR_LOG_FORMAT",
                format!("expected json or pretty, got {other:?}"),
            )),
        }
    }
}

/// `RESERVOIR_LISTEN` (or `RESERVOIR_WORKER_LISTEN`, named by `var`): an `ip:port`, or
/// a `host:port` whose host resolves (such as `localhost:8001`; the first address it
/// resolves to is used).
fn listen_addr(var: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bad = |why: String| invalid(var, format!("expected host:port, got {value:?} ({why})"));
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
        _ => return Err(bad("no port".into())),
    }
    std::net::ToSocketAddrs::to_socket_addrs(value)
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("the host resolves to no address".into()))
}

/// The variable lookup [`Config::from_lookup`] hands to each of its steps.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

fn backend_of(database_url: &str) -> Result<Backend, ConfigError> {
    if database_url.starts_with("sqlite:") {
        Ok(Backend::Sqlite)
    } else if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        Ok(Backend::Postgres)
    } else {
        Err(invalid(
            "RESERVOIR_DATABASE_URL",
            "must start with sqlite:// or postgres://",
        ))
    }
}

/// The queue's URL as `RESERVOIR_QUEUE_URL` (or its default beside the database)
/// names it, for the commands that read only the database settings (`jobs`).
pub fn queue_url_from_env(db: &DatabaseConfig) -> Result<String, ConfigError> {
    let get = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    queue_url(&get, &db.backend, &db.data_dir, &db.database_url)
}

fn queue_url(
    get: Lookup<'_>,
    backend: &Backend,
    data_dir: &std::path::Path,
    database_url: &str,
) -> Result<String, ConfigError> {
    let queue_url = get("RESERVOIR_QUEUE_URL").unwrap_or_else(|| match backend {
        // Its own file: the SQLite queue tunes its connection for speed, never the
        // money database (STACK.md, trap 8).
        Backend::Sqlite => format!("sqlite://{}/queue.db", data_dir.display()),
        Backend::Postgres => database_url.to_owned(),
    });
    // Redis is a planned optional backend; until it is built, say so at start-up
    // rather than fail later.
    let queue_schemes = ["sqlite:", "postgres://", "postgresql://"];
    if !queue_schemes
        .iter()
        .any(|scheme| queue_url.starts_with(scheme))
    {
        return Err(invalid(
            "RESERVOIR_QUEUE_URL",
            "must be a sqlite:// or postgres:// URL (a Redis backend is not built yet)",
        ));
    }
    Ok(queue_url)
}

/// The configured token, or (embedded setup only) a generated one: on PostgreSQL the
/// server is shared, so a token nobody chose is refused.
fn admin_token(get: Lookup<'_>, backend: &Backend) -> Result<AdminToken, ConfigError> {
    match get("RESERVOIR_ADMIN_TOKEN") {
        Some(value) if value.len() < ADMIN_TOKEN_LEN_MIN => Err(invalid(
            "RESERVOIR_ADMIN_TOKEN",
            format!("must be at least {ADMIN_TOKEN_LEN_MIN} characters"),
        )),
        Some(value) => Ok(AdminToken {
            value,
            generated: false,
        }),
        None if *backend == Backend::Sqlite => Ok(AdminToken {
            value: billing::accounts::auth::generate_secret("rsv_admin_"),
            generated: true,
        }),
        None => Err(ConfigError::Unsafe(
            "RESERVOIR_ADMIN_TOKEN must be set when running on PostgreSQL".into(),
        )),
    }
}

/// The SMTP server (None: the outbox folder) and the sender address.
fn email(get: Lookup<'_>) -> Result<(Option<String>, String), ConfigError> {
    let smtp_url = get("RESERVOIR_SMTP_URL");
    if let Some(url) = &smtp_url
        && !(url.starts_with("smtp://") || url.starts_with("smtps://"))
    {
        return Err(invalid(
            "RESERVOIR_SMTP_URL",
            "must start with smtp:// (STARTTLS) or smtps:// (TLS)",
        ));
    }
    let email_from = get("RESERVOIR_EMAIL_FROM")
        .unwrap_or_else(|| "Reservoir <billing@reservoir.localhost>".into());
    if !email_from.contains('@') {
        return Err(invalid(
            "RESERVOIR_EMAIL_FROM",
            "must contain an e-mail address",
        ));
    }
    Ok((smtp_url, email_from))
}

fn payment_gateway(get: Lookup<'_>) -> Result<PaymentGateway, ConfigError> {
    match get("RESERVOIR_PAYMENT_GATEWAY")
        .as_deref()
        .unwrap_or("sandbox")
    {
        "sandbox" => Ok(PaymentGateway::Sandbox),
        "stripe" => stripe(get),
        other => Err(invalid(
            "RESERVOIR_PAYMENT_GATEWAY",
            format!("expected sandbox or stripe, got {other:?}"),
        )),
    }
}

/// The Stripe gateway's key and base URL, checked for shape here so a typo fails at
/// start-up rather than at the first charge.
fn stripe(get: Lookup<'_>) -> Result<PaymentGateway, ConfigError> {
    let secret_key = get("RESERVOIR_STRIPE_SECRET_KEY").ok_or_else(|| {
        invalid(
            "RESERVOIR_STRIPE_SECRET_KEY",
            "is required with RESERVOIR_PAYMENT_GATEWAY=stripe: set it to the secret API key \
             from the Stripe dashboard (Developers > API keys: sk_live_…, or a restricted rk_live_…)",
        )
    })?;
    if !(secret_key.starts_with("sk_") || secret_key.starts_with("rk_")) {
        return Err(invalid(
            "RESERVOIR_STRIPE_SECRET_KEY",
            "must be a Stripe secret (sk_…) or restricted (rk_…) key",
        ));
    }
    let base_url =
        get("RESERVOIR_STRIPE_BASE_URL").unwrap_or_else(|| "https://api.stripe.com".into());
    if !stripe_base_url_ok(&base_url) {
        return Err(invalid(
            "RESERVOIR_STRIPE_BASE_URL",
            "must be https (plain http only to localhost or 127.0.0.1, for tests)",
        ));
    }
    let webhook_secret = get("RESERVOIR_STRIPE_WEBHOOK_SECRET");
    if webhook_secret
        .as_deref()
        .is_some_and(|s| !s.starts_with("whsec_"))
    {
        return Err(invalid(
            "RESERVOIR_STRIPE_WEBHOOK_SECRET",
            "must be the webhook endpoint's signing secret (whsec_…), shown by Stripe for the \
             endpoint https://<your API host>/webhooks/stripe",
        ));
    }
    Ok(PaymentGateway::Stripe {
        secret_key,
        base_url,
        webhook_secret,
    })
}

/// On PostgreSQL the sandbox gateway, which grants credits without charging anyone, is
/// refused unless RESERVOIR_ALLOW_SANDBOX_WITH_POSTGRES says this is a staging setup.
/// Returns that allowance, which the demo seed needs too.
fn sandbox_allowed(
    get: Lookup<'_>,
    backend: &Backend,
    payment_gateway: &PaymentGateway,
) -> Result<bool, ConfigError> {
    let allow_sandbox = get("RESERVOIR_ALLOW_SANDBOX_WITH_POSTGRES")
        .map(|v| parse_bool("RESERVOIR_ALLOW_SANDBOX_WITH_POSTGRES", &v))
        .transpose()?
        .unwrap_or(false);
    if *backend == Backend::Postgres
        && *payment_gateway == PaymentGateway::Sandbox
        && !allow_sandbox
    {
        return Err(ConfigError::Unsafe(
            "the sandbox payment gateway grants credits without charging anyone; on PostgreSQL \
             set RESERVOIR_PAYMENT_GATEWAY=stripe, or RESERVOIR_ALLOW_SANDBOX_WITH_POSTGRES=true for a staging setup"
                .into(),
        ));
    }
    Ok(allow_sandbox)
}

/// Whether to seed the demo account: by default on SQLite only.
fn demo_seed(get: Lookup<'_>, backend: &Backend, allow_sandbox: bool) -> Result<bool, ConfigError> {
    let demo_seed = get("RESERVOIR_DEMO_SEED")
        .map(|v| parse_bool("RESERVOIR_DEMO_SEED", &v))
        .transpose()?
        .unwrap_or(*backend == Backend::Sqlite);
    if demo_seed && *backend == Backend::Postgres && !allow_sandbox {
        // The demo account is given credits nobody paid for.
        return Err(ConfigError::Unsafe(
            "RESERVOIR_DEMO_SEED on PostgreSQL needs RESERVOIR_ALLOW_SANDBOX_WITH_POSTGRES=true"
                .into(),
        ));
    }
    Ok(demo_seed)
}

/// A number [`number`] bounded to at most a million, as u32.
fn as_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// An optional number from 0 to `max` (the writer and cache tuning knobs).
/// A boolean variable, if set.
fn flag(get: Lookup<'_>, var: &'static str) -> Result<Option<bool>, ConfigError> {
    get(var).map(|v| parse_bool(var, &v)).transpose()
}

fn number(get: Lookup<'_>, var: &'static str, max: u64) -> Result<Option<u64>, ConfigError> {
    get(var)
        .map(|v| {
            v.parse::<u64>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| invalid(var, format!("must be a number from 0 to {max}")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn env_example_lists_every_variable() {
        let example = include_str!("../../.env.example");
        for var in VARIABLES {
            assert!(example.contains(var), ".env.example does not mention {var}");
        }
    }

    #[test]
    fn env_example_loads_as_copied() {
        let example = include_str!("../../.env.example");
        let vars: HashMap<String, String> = dotenvy::from_read_iter(example.as_bytes())
            .collect::<Result<_, _>>()
            .expect(".env.example parses as a .env file");
        assert!(vars.contains_key("RESERVOIR_EMAIL_FROM"));
        let c = Config::from_lookup(|k| vars.get(k).cloned()).expect(".env.example is valid");
        assert_eq!(c.email_from, "Reservoir <billing@reservoir.localhost>");
    }

    #[test]
    fn listen_takes_host_names() {
        let c = config(&[("RESERVOIR_LISTEN", "localhost:8001")]).expect("a host name");
        assert_eq!(c.listen.port(), 8001);
        assert!(c.listen.ip().is_loopback());
        for bad in [
            "localhost",
            ":8001",
            "localhost:http",
            "no-such-host.invalid:80",
        ] {
            let err = config(&[("RESERVOIR_LISTEN", bad)]).expect_err(bad);
            assert!(err.to_string().contains("RESERVOIR_LISTEN"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_worker_listens_only_when_told_where() {
        assert_eq!(config(&[]).expect("defaults").worker_listen, None);
        let c = config(&[("RESERVOIR_WORKER_LISTEN", "127.0.0.1:9100")]).expect("an address");
        assert_eq!(c.worker_listen.map(|a| a.port()), Some(9100));
        let err = config(&[("RESERVOIR_WORKER_LISTEN", "localhost")]).expect_err("no port");
        assert!(err.to_string().contains("RESERVOIR_WORKER_LISTEN"), "{err}");
    }

    #[test]
    fn embedded_defaults() {
        let c = config(&[]).expect("defaults are valid");
        assert_eq!(c.database_url, "sqlite://./data/reservoir.db");
        assert_eq!(c.queue_url, "sqlite://./data/queue.db");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8000");
        assert!(c.admin_token.generated && c.admin_token.value.len() >= ADMIN_TOKEN_LEN_MIN);
        assert_eq!(c.payment_gateway, PaymentGateway::Sandbox);
        assert!(c.demo_seed);
        assert_eq!(c.smtp_url, None);
        assert_eq!(c.db_acquire_timeout_ms, 1_500);
        let short = config(&[("RESERVOIR_DB_ACQUIRE_TIMEOUT_MS", "250")]).expect("250 ms");
        assert_eq!(short.database().db_acquire_timeout_ms, 250);
    }

    #[test]
    fn postgres_needs_an_admin_token_and_a_real_gateway() {
        let pg = ("RESERVOIR_DATABASE_URL", "postgres://db/reservoir");
        let token = ("RESERVOIR_ADMIN_TOKEN", "0123456789abcdef0123456789abcdef");
        assert!(matches!(config(&[pg]), Err(ConfigError::Unsafe(_))));
        assert!(
            matches!(config(&[pg, token]), Err(ConfigError::Unsafe(_))),
            "sandbox on postgres"
        );
        let allowed = config(&[pg, token, ("RESERVOIR_ALLOW_SANDBOX_WITH_POSTGRES", "true")])
            .expect("allowed");
        assert_eq!(allowed.queue_url, "postgres://db/reservoir");
        assert!(!allowed.demo_seed);
        let stripe_key = ("RESERVOIR_STRIPE_SECRET_KEY", "sk_x");
        let demo_on_pg = config(&[
            pg,
            token,
            ("RESERVOIR_PAYMENT_GATEWAY", "stripe"),
            stripe_key,
            ("RESERVOIR_DEMO_SEED", "true"),
        ]);
        assert!(
            matches!(demo_on_pg, Err(ConfigError::Unsafe(_))),
            "free demo credits on postgres"
        );
        assert!(stripe_base_url_ok("http://127.0.0.1:12345/v1"));
        let stripe = config(&[
            pg,
            token,
            ("RESERVOIR_PAYMENT_GATEWAY", "stripe"),
            ("RESERVOIR_STRIPE_SECRET_KEY", "sk_live_x"),
        ])
        .expect("stripe");
        assert_eq!(
            stripe.payment_gateway,
            PaymentGateway::Stripe {
                secret_key: "sk_live_x".into(),
                base_url: "https://api.stripe.com".into(),
                webhook_secret: None,
            }
        );
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (vars, var) in [
            (vec![("RESERVOIR_LISTEN", "nope")], "RESERVOIR_LISTEN"),
            (
                vec![("RESERVOIR_DATABASE_URL", "mysql://x")],
                "RESERVOIR_DATABASE_URL",
            ),
            (
                vec![("RESERVOIR_ADMIN_TOKEN", "short")],
                "RESERVOIR_ADMIN_TOKEN",
            ),
            (
                vec![("RESERVOIR_SMTP_URL", "http://mail")],
                "RESERVOIR_SMTP_URL",
            ),
            (
                vec![("RESERVOIR_PAYMENT_GATEWAY", "paypal")],
                "RESERVOIR_PAYMENT_GATEWAY",
            ),
            (
                vec![("RESERVOIR_PAYMENT_GATEWAY", "stripe")],
                "RESERVOIR_STRIPE_SECRET_KEY",
            ),
            (
                vec![("RESERVOIR_DEMO_SEED", "maybe")],
                "RESERVOIR_DEMO_SEED",
            ),
            (
                vec![("RESERVOIR_DB_CONNECTIONS_MAX", "0")],
                "RESERVOIR_DB_CONNECTIONS_MAX",
            ),
            (
                vec![("RESERVOIR_DB_ACQUIRE_TIMEOUT_MS", "99")],
                "RESERVOIR_DB_ACQUIRE_TIMEOUT_MS",
            ),
            (
                vec![("RESERVOIR_DB_ACQUIRE_TIMEOUT_MS", "1.5s")],
                "RESERVOIR_DB_ACQUIRE_TIMEOUT_MS",
            ),
            (
                vec![
                    ("RESERVOIR_PAYMENT_GATEWAY", "stripe"),
                    ("RESERVOIR_STRIPE_SECRET_KEY", "sk_test_x"),
                    ("RESERVOIR_STRIPE_BASE_URL", "http://localhost.evil.example"),
                ],
                "RESERVOIR_STRIPE_BASE_URL",
            ),
            (
                vec![("RESERVOIR_QUEUE_URL", "postgresfoo://x")],
                "RESERVOIR_QUEUE_URL",
            ),
            (
                vec![
                    ("RESERVOIR_PAYMENT_GATEWAY", "stripe"),
                    ("RESERVOIR_STRIPE_SECRET_KEY", "sk_test_x"),
                    ("RESERVOIR_STRIPE_WEBHOOK_SECRET", "sk_test_x"),
                ],
                "RESERVOIR_STRIPE_WEBHOOK_SECRET",
            ),
        ] {
            match config(&vars) {
                Err(ConfigError::Invalid { var: v, .. }) => assert_eq!(v, var),
                other => panic!("{vars:?}: expected an error about {var}, got {other:?}"),
            }
        }
    }
}
