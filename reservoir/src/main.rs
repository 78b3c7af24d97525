//! `reservoir`: one binary for every process of the system.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use reservoir::Process;
use reservoir::config::{Config, DatabaseConfig, LogFormat};

/// mimalloc instead of glibc's malloc: the request path allocates a lot (HTTP, GraphQL,
/// JSON), and glibc's allocator was ~18 % of the server's CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "reservoir",
    version,
    about = "Prepaid credits for an AI-API platform"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// API and worker in one process (the embedded default).
    Serve {
        /// Mint a new demo token (the old one stops working) instead of keeping it.
        #[arg(long)]
        rotate_demo_token: bool,
    },
    /// The GraphQL API only.
    Api {
        /// Mint a new demo token (the old one stops working) instead of keeping it.
        #[arg(long)]
        rotate_demo_token: bool,
    },
    /// The background worker only.
    Worker,
    /// Apply database migrations and exit.
    Migrate,
    /// Check the ledger invariants; exits 1 on any violation.
    Check,
    /// Background work: counts by kind and state, one job, retry a dead one, purge.
    Jobs {
        #[command(subcommand)]
        action: JobsAction,
    },
    /// Print the GraphQL schema (SDL), or write it to a file.
    ExportSchema {
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum JobsAction {
    /// Purchases, notifications and webhook deliveries counted by kind and state with
    /// the age of the oldest; the queue's job rows by state; the job workers' heartbeats.
    List,
    /// One purchase, notification or webhook delivery, by id.
    Show { id: String },
    /// Put a DEAD notification or webhook delivery back to PENDING and push its job.
    Retry { id: String },
    /// Delete the queue's finished job rows older than this many days.
    Purge {
        #[arg(long, default_value_t = 7)]
        older_than_days: u32,
    },
}

impl From<JobsAction> for reservoir::jobs::Action {
    fn from(action: JobsAction) -> Self {
        match action {
            JobsAction::List => Self::List,
            JobsAction::Show { id } => Self::Show(id),
            JobsAction::Retry { id } => Self::Retry(id),
            JobsAction::Purge { older_than_days } => Self::Purge { older_than_days },
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RESERVOIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,sea_orm=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

/// A `.env` that does not parse stops every command, naming its line; a missing one is
/// normal.
fn load_dotenv() -> anyhow::Result<()> {
    match dotenvy::dotenv() {
        Ok(_) | Err(dotenvy::Error::Io(_)) => Ok(()),
        Err(dotenvy::Error::LineParse(text, index)) => {
            let number = std::fs::read_to_string(".env")
                .ok()
                .and_then(|content| content.lines().position(|l| l.contains(text.trim())))
                .map_or_else(String::new, |i| format!(" {}", i.saturating_add(1)));
            anyhow::bail!(
                ".env line{number}: cannot parse `{text}` (at character {index}); \
                 quote a value with spaces or < >: KEY=\"a <b>\""
            )
        }
        Err(e) => Err(e).context("reading .env"),
    }
}

/// Errors print as one line (the context chain), whatever RUST_BACKTRACE says: a
/// configuration mistake is not a crash.
#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::ExportSchema { out } = &cli.command {
        let sdl = reservoir::export_schema();
        match out {
            Some(path) => {
                std::fs::write(path, sdl).with_context(|| format!("writing {}", path.display()))?
            }
            None => print!("{sdl}"),
        }
        return Ok(());
    }
    load_dotenv()?;
    // migrate and check read the database settings only: a migration needs neither the
    // admin token nor a payment gateway.
    if let Command::Jobs { action } = cli.command {
        init_logging(LogFormat::from_env()?);
        return reservoir::jobs(&DatabaseConfig::from_env()?, action.into()).await;
    }
    if matches!(cli.command, Command::Migrate | Command::Check) {
        init_logging(LogFormat::from_env()?);
        let config = DatabaseConfig::from_env()?;
        if let Command::Migrate = cli.command {
            let db = reservoir::connect(&config).await?;
            reservoir::migrate(&db).await?;
            println!("migrations applied");
            return Ok(());
        }
        return match reservoir::check(&config).await? {
            true => Ok(()),
            false => std::process::exit(1),
        };
    }
    let config = Config::from_env()?;
    init_logging(config.log_format);
    match cli.command {
        Command::Serve { rotate_demo_token } => {
            let process = Process {
                api: true,
                worker: true,
                rotate_demo_token,
            };
            reservoir::run(config, process).await
        }
        Command::Api { rotate_demo_token } => {
            let process = Process {
                api: true,
                rotate_demo_token,
                ..Process::default()
            };
            reservoir::run(config, process).await
        }
        Command::Worker => {
            let process = Process {
                worker: true,
                ..Process::default()
            };
            reservoir::run(config, process).await
        }
        Command::Migrate | Command::Check | Command::Jobs { .. } | Command::ExportSchema { .. } => {
            Ok(())
        }
    }
}
