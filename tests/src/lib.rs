#![doc = include_str!("../README.md")]

pub mod app;
pub mod load;
pub mod localstripe;
pub mod scratch_pg;
pub mod smtp;

use billing::Credits;
use billing::db::{self, PoolLimits};
use billing::entity::{models, workspaces};
use billing::payments::purchases::{self, PurchaseItem, PurchaseRequest};
use billing::sea_orm::{
    ActiveValue::Set, ConnectionTrait, DatabaseConnection, EntityTrait, Statement,
};
use chrono::{DateTime, Utc};
use uuid::Uuid;

pub struct TestDb {
    pub db: DatabaseConnection,
    pub url: String,
    /// Holds the SQLite file's folder until the test ends.
    _dir: Option<tempfile::TempDir>,
    /// PostgreSQL: the per-test database and the server URL to drop it from.
    pg: Option<(String, String)>,
}

/// The pools the harness opens wait this long for a connection, not the production
/// default (`billing::db::ACQUIRE_TIMEOUT_MS_DEFAULT`, 1.5 s): the suites run hundreds
/// of concurrent transactions on one hot row on a shared machine, and a saturated pool
/// is not what they test. The fault tests (`db_outage`, the binary's `api_crash`) use the
/// production default.
pub const HARNESS_ACQUIRE_TIMEOUT_MS: u64 = 30_000;

fn harness_limits() -> PoolLimits {
    PoolLimits {
        acquire_timeout_ms: HARNESS_ACQUIRE_TIMEOUT_MS,
        ..PoolLimits::default()
    }
}

pub fn backend_name() -> &'static str {
    if std::env::var("TEST_DATABASE_URL").is_ok_and(|u| u.starts_with("postgres")) {
        "postgres"
    } else {
        "sqlite"
    }
}

impl TestDb {
    pub async fn new() -> anyhow::Result<Self> {
        Self::migrated(None).await
    }

    /// A database with only the first `steps` migration steps (all when None), to
    /// test how a later step moves existing data forward.
    pub async fn migrated(steps: Option<u32>) -> anyhow::Result<Self> {
        use migration::MigratorTrait as _;
        match std::env::var("TEST_DATABASE_URL") {
            Ok(server) if server.starts_with("postgres") => {
                let name = format!("reservoir_t_{}", Uuid::new_v4().simple());
                let admin = db::connect(
                    &server,
                    PoolLimits {
                        connections_max: 1,
                        ..harness_limits()
                    },
                )
                .await?;
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await?;
                admin.close().await?;
                let url = replace_db_name(&server, &name);
                let db = db::connect(&url, harness_limits()).await?;
                migration::Migrator::up(&db, steps).await?;
                Ok(Self {
                    db,
                    url,
                    _dir: None,
                    pg: Some((server, name)),
                })
            }
            _ => {
                let dir = tempfile::tempdir()?;
                let url = format!("sqlite://{}/reservoir.db", dir.path().display());
                let db = db::connect(&url, harness_limits()).await?;
                migration::Migrator::up(&db, steps).await?;
                Ok(Self {
                    db,
                    url,
                    _dir: Some(dir),
                    pg: None,
                })
            }
        }
    }

    /// The job queue's URL: its own SQLite file beside the database, or the
    /// PostgreSQL database itself.
    pub fn queue_url(&self) -> String {
        match &self._dir {
            Some(dir) => format!("sqlite://{}/queue.db", dir.path().display()),
            None => self.url.clone(),
        }
    }

    /// A second, independent connection pool to the same database (as a second
    /// process would have).
    pub async fn second_pool(&self) -> anyhow::Result<DatabaseConnection> {
        Ok(db::connect(&self.url, harness_limits()).await?)
    }

    /// Asserts every ledger invariant, then drops the per-test PostgreSQL database.
    pub async fn finish(self) -> anyhow::Result<()> {
        let report = billing::ledger::invariants::check(&self.db).await?;
        assert!(
            report.is_ok(),
            "invariants violated: {:#?}",
            report.violations
        );
        self.db.close().await?;
        if let Some((server, name)) = self.pg {
            let admin = db::connect(
                &server,
                PoolLimits {
                    connections_max: 1,
                    ..harness_limits()
                },
            )
            .await?;
            admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await?;
            admin.close().await?;
        }
        Ok(())
    }
}

fn replace_db_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let base = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    format!("{base}/{name}{query}")
}

/// A model whose price makes costs easy to reason about: 1 prompt token costs 1,000
/// nanocredits and 1 completion token 2,000 (1 and 2 credits per million).
pub const TEST_MODEL: &str = "test/linear";

pub async fn add_test_model(db: &DatabaseConnection, now: DateTime<Utc>) -> anyhow::Result<()> {
    models::Entity::insert(models::ActiveModel {
        id: Set(TEST_MODEL.into()),
        name: Set("Linear test model".into()),
        prompt_price_per_million_nanos: Set(1_000_000_000),
        completion_price_per_million_nanos: Set(2_000_000_000),
        active: Set(true),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// An account with two workspaces and the linear test model.
pub struct Fixture {
    pub account_id: Uuid,
    pub owner_id: Uuid,
    pub ws_a: Uuid,
    pub ws_b: Uuid,
}

impl Fixture {
    pub async fn new(db: &DatabaseConnection, now: DateTime<Utc>) -> anyhow::Result<Self> {
        add_test_model(db, now).await?;
        let created =
            billing::accounts::create_account(db, "Test Co", "owner@test.example", "Owner", now)
                .await?;
        let ws_a = billing::accounts::create_workspace(db, created.account.id, "A", now)
            .await?
            .id;
        let ws_b = billing::accounts::create_workspace(db, created.account.id, "B", now)
            .await?
            .id;
        Ok(Self {
            account_id: created.account.id,
            owner_id: created.owner.id,
            ws_a,
            ws_b,
        })
    }
}

/// Credits a workspace through a real purchase (amount only, no bonus).
pub async fn fund(
    db: &DatabaseConnection,
    workspace_id: Uuid,
    credits: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let purchase = purchases::create_purchase(
        db,
        PurchaseRequest {
            workspace_id,
            item: PurchaseItem::Amount(Credits::parse(credits)?),
            source: billing::entity::enums::PurchaseSource::Manual,
            payment_method_id: None,
            idempotency_key: format!("fund-{}", Uuid::new_v4()),
            created_by_user_id: None,
        },
        now,
    )
    .await?;
    purchases::credit_purchase(db, purchase.purchase.id, None, now).await?;
    Ok(())
}

pub async fn workspace(db: &DatabaseConnection, id: Uuid) -> anyhow::Result<workspaces::Model> {
    workspaces::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no workspace {id}"))
}

pub async fn count(db: &DatabaseConnection, table: &str) -> anyhow::Result<i64> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM {table}"),
        ))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no row"))?;
    Ok(row.try_get::<i64>("", "n")?)
}

/// Row counts of every table money touches, to prove a refusal wrote nothing.
pub async fn money_row_counts(db: &DatabaseConnection) -> anyhow::Result<Vec<(String, i64)>> {
    let mut counts = Vec::new();
    for table in [
        "usage_events",
        "ledger_transactions",
        "ledger_entries",
        "usage_daily",
        "balance_events",
        "reservations",
        "transfers",
    ] {
        counts.push((table.to_owned(), count(db, table).await?));
    }
    Ok(counts)
}

/// A usage request on the test model with no project, user or key.
pub fn usage_req(
    workspace_id: Uuid,
    request_id: &str,
    prompt_tokens: i64,
) -> billing::debits::usage::UsageRequest {
    billing::debits::usage::UsageRequest {
        workspace_id,
        project: billing::debits::usage::ProjectRef::None,
        model_id: TEST_MODEL.into(),
        prompt_tokens,
        completion_tokens: 0,
        request_id: request_id.into(),
        user_id: None,
        api_key_id: None,
    }
}
