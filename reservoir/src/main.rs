//! `reservoir`: one binary for every process of the system.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use reservoir::config::{Config, LogFormat};

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
    Serve,
    /// The GraphQL API only.
    Api,
    /// The background worker only.
    Worker,
    /// Apply database migrations and exit.
    Migrate,
    /// Check the ledger invariants; exits 1 on any violation.
    Check,
    /// Print the GraphQL schema (SDL), or write it to a file.
    ExportSchema {
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
    // A missing .env is normal; a malformed one is an error worth stopping for.
    match dotenvy::dotenv() {
        Ok(_) | Err(dotenvy::Error::Io(_)) => {}
        Err(e) => return Err(e).context("reading .env"),
    }
    let config = Config::from_env()?;
    init_logging(config.log_format);
    match cli.command {
        Command::Serve => reservoir::run(config, true, true).await,
        Command::Api => reservoir::run(config, true, false).await,
        Command::Worker => reservoir::run(config, false, true).await,
        Command::Migrate => {
            let db = reservoir::connect(&config).await?;
            reservoir::migrate(&db).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Check => {
            if reservoir::check(&config).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::ExportSchema { .. } => Ok(()),
    }
}
