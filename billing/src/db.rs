//! Connecting to the database, migrating it, and opening write transactions.

use crate::error::{BillingError, Result};
use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx::{self, postgres::PgPoolOptions, sqlite::SqlitePoolOptions};
use sea_orm::{
    DatabaseConnection, DatabaseTransaction, DbBackend, SqliteTransactionMode,
    SqlxPostgresConnector, SqlxSqliteConnector, TransactionOptions, TransactionTrait,
};
use std::str::FromStr;
use std::time::Duration;

/// Pool limits. SQLite has one writer at a time whatever the pool size, so a small
/// pool suffices there; PostgreSQL gets enough connections for the API's concurrency.
#[derive(Clone, Copy, Debug)]
pub struct PoolLimits {
    pub connections_max: u32,
    /// How long a request waits for a live connection (which, while the server is
    /// down, includes retrying the connect) before it fails with UNAVAILABLE.
    pub acquire_timeout_ms: u64,
}

/// The default acquire timeout: short, so that during a database outage a caller
/// learns it within a couple of seconds (and may retry elsewhere) instead of holding
/// its connection and a server task for the whole outage.
pub const ACQUIRE_TIMEOUT_MS_DEFAULT: u64 = 1_500;

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            connections_max: 16,
            acquire_timeout_ms: ACQUIRE_TIMEOUT_MS_DEFAULT,
        }
    }
}

/// Prepared statements kept per connection. The debit writer's multi-row INSERTs and
/// IN lists take a different shape per batch size (up to the batch limit), so the default
/// of 100 would re-prepare (an extra round trip, and a parse and plan) most of them.
const STATEMENT_CACHE_CAPACITY: usize = 2_048;

/// How long a SQLite writer waits for the lock before failing. Generous, because the
/// alternative to waiting is refusing a customer's request.
const SQLITE_BUSY_TIMEOUT_MS: u64 = 30_000;

pub async fn connect(url: &str, limits: PoolLimits) -> Result<DatabaseConnection> {
    let acquire_timeout = Duration::from_millis(limits.acquire_timeout_ms);
    if url.starts_with("sqlite:") {
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
            .map_err(|e| BillingError::invalid(format!("bad SQLite URL: {e}")))?
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            // FULL: a committed debit survives a power cut, not only a process crash.
            .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
            .busy_timeout(Duration::from_millis(SQLITE_BUSY_TIMEOUT_MS))
            // 64 MiB of page cache per connection (the default is 2 MiB): the hot
            // indexes of usage events and the ledger stay in memory under load.
            .pragma("cache_size", "-65536")
            .statement_cache_capacity(STATEMENT_CACHE_CAPACITY)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(limits.connections_max.min(8))
            .acquire_timeout(acquire_timeout)
            .connect_with(options)
            .await
            .map_err(conn_err)?;
        Ok(SqlxSqliteConnector::from_sqlx_sqlite_pool(pool))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let options = sqlx::postgres::PgConnectOptions::from_str(url)
            .map_err(|e| BillingError::invalid(format!("bad PostgreSQL URL: {e}")))?
            .statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        let pool = PgPoolOptions::new()
            .max_connections(limits.connections_max)
            .acquire_timeout(acquire_timeout)
            .connect_with(options)
            .await
            .map_err(conn_err)?;
        Ok(SqlxPostgresConnector::from_sqlx_postgres_pool(pool))
    } else {
        Err(BillingError::invalid(
            "database URL must start with sqlite: or postgres:",
        ))
    }
}

/// Applies every pending migration.
pub async fn migrate(db: &DatabaseConnection) -> Result<()> {
    Migrator::up(db, None).await?;
    Ok(())
}

/// How many migrations the database has not had yet (all of them on an empty one):
/// commands that read the schema say "run migrate" rather than "no such table".
pub async fn pending_migrations(db: &DatabaseConnection) -> Result<usize> {
    Ok(Migrator::get_pending_migrations(db).await?.len())
}

/// Whether the database answers (a readiness probe): one trivial statement.
pub async fn ping(db: &DatabaseConnection) -> Result<()> {
    use sea_orm::ConnectionTrait;
    db.execute_unprepared("SELECT 1").await?;
    Ok(())
}

/// [`ping`] bounded by `timeout`, whatever the pool's acquire timeout: a health check
/// must answer on its own schedule. Running out of time is UNAVAILABLE.
pub async fn ping_within(db: &DatabaseConnection, timeout: Duration) -> Result<()> {
    match tokio::time::timeout(timeout, ping(db)).await {
        Ok(answer) => answer,
        Err(_) => Err(BillingError::Unavailable(format!(
            "no answer to a ping within {} ms",
            timeout.as_millis()
        ))),
    }
}

/// Opens a transaction that will write. On SQLite it is `BEGIN IMMEDIATE`: the write
/// lock is taken up front, so the busy timeout applies; a deferred transaction that
/// reads first and then writes fails at once with SQLITE_BUSY when another writer
/// committed in between. On PostgreSQL it is a plain READ COMMITTED transaction: money
/// rows are changed by conditional single-statement updates, which lock and re-check.
pub async fn begin_write(db: &DatabaseConnection) -> Result<DatabaseTransaction> {
    let options = TransactionOptions {
        sqlite_transaction_mode: (db.get_database_backend() == DbBackend::Sqlite)
            .then_some(SqliteTransactionMode::Immediate),
        ..Default::default()
    };
    Ok(db.begin_with_options(options).await?)
}

fn conn_err(e: sqlx::Error) -> BillingError {
    BillingError::Database(sea_orm::DbErr::Conn(sea_orm::RuntimeErr::SqlxError(
        e.into(),
    )))
}
