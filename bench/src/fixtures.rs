//! Fixtures written straight into the database through the `billing` crate (fresh per
//! run, so runs are independent), and the checks made there after a run.

use anyhow::{Context, bail};
use billing::Credits;
use billing::db::{self, PoolLimits};
use billing::entity::enums::PurchaseSource;
use billing::entity::{ledger_transactions, models, usage_events, workspaces};
use billing::payments::purchases::{self, PurchaseItem, PurchaseRequest};
use billing::sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use reqwest::header::HeaderValue;
use uuid::Uuid;

/// The model the load scenarios use when it is active (cheap, so funds last).
pub const PREFERRED_MODEL: &str = "openai/gpt-4o-mini";
/// The largest custom purchase `billing::payments::purchases` accepts, in whole credits.
pub const PURCHASE_MAX_CREDITS: i64 = purchases::CUSTOM_AMOUNT_CREDITS_MAX;
/// Workspaces set up at once (each is a handful of small writes).
const SETUP_IN_FLIGHT: usize = 16;

pub fn backend_of(url: &str) -> &'static str {
    if url.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    }
}

pub async fn connect(url: &str) -> anyhow::Result<DatabaseConnection> {
    let db = db::connect(url, PoolLimits::default())
        .await
        .with_context(|| format!("connecting to {}", redact(url)))?;
    // The server migrates at start; the bench never does (its migrations could be
    // older than the server's). A missing catalog means nothing was migrated yet.
    models::Entity::find()
        .limit(1)
        .all(&db)
        .await
        .context("reading the model catalog: is the database migrated? (start the server once, or run `reservoir migrate`)")?;
    Ok(db)
}

/// The URL with any password replaced by `***`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// An active model id: `PREFERRED_MODEL` if active, else the first active one.
pub async fn pick_model(db: &DatabaseConnection) -> anyhow::Result<String> {
    let active = models::Entity::find()
        .filter(models::Column::Active.eq(true))
        .order_by_asc(models::Column::Id)
        .all(db)
        .await?;
    if active.iter().any(|m| m.id == PREFERRED_MODEL) {
        return Ok(PREFERRED_MODEL.to_owned());
    }
    active
        .into_iter()
        .next()
        .map(|m| m.id)
        .context("no active model in the catalog")
}

/// Every active model (for the dashboard seed).
pub async fn active_models(db: &DatabaseConnection) -> anyhow::Result<Vec<models::Model>> {
    let active = models::Entity::find()
        .filter(models::Column::Active.eq(true))
        .order_by_asc(models::Column::Id)
        .all(db)
        .await?;
    if active.is_empty() {
        bail!("no active model in the catalog");
    }
    Ok(active)
}

/// A workspace of the bench with its API key (bound to the workspace's project).
#[derive(Clone, Debug)]
pub struct Tenant {
    pub workspace_id: Uuid,
    /// `Bearer <secret>`, ready for the Authorization header.
    pub auth: HeaderValue,
    pub secret: String,
}

#[derive(Debug)]
pub struct Fixture {
    pub account_id: Uuid,
    /// The account's owner and their user token (`followups` buys and configures as them).
    pub owner_id: Uuid,
    pub owner_token: String,
    pub model_id: String,
    pub tenants: Vec<Tenant>,
    pub setup_s: f64,
}

/// One account with `workspaces` workspaces, each with a project `bench`, an API key
/// bound to it, and `PURCHASE_MAX_CREDITS` credits (a manual purchase, credited).
pub async fn setup(
    db: &DatabaseConnection,
    scenario: &str,
    workspaces: usize,
) -> anyhow::Result<Fixture> {
    let started = std::time::Instant::now();
    let now = Utc::now();
    let model_id = pick_model(db).await?;
    let tag = Uuid::new_v4().simple().to_string();
    let created = billing::accounts::create_account(
        db,
        &format!("bench {scenario} {}", now.format("%Y-%m-%d %H:%M:%S")),
        &format!("bench-{tag}@bench.example"),
        "Bench",
        now,
    )
    .await?;
    let account_id = created.account.id;
    let tenants: Vec<Tenant> = futures::stream::iter(0..workspaces)
        .map(|i| setup_workspace(db, account_id, i, now))
        .buffer_unordered(SETUP_IN_FLIGHT)
        .try_collect()
        .await?;
    Ok(Fixture {
        account_id,
        owner_id: created.owner.id,
        owner_token: created.owner_token,
        model_id,
        tenants,
        setup_s: started.elapsed().as_secs_f64(),
    })
}

pub async fn setup_workspace(
    db: &DatabaseConnection,
    account_id: Uuid,
    index: usize,
    now: DateTime<Utc>,
) -> anyhow::Result<Tenant> {
    let ws =
        billing::accounts::create_workspace(db, account_id, &format!("ws-{index:05}"), now).await?;
    let project = billing::accounts::create_project(db, ws.id, "Bench", "bench", now).await?;
    let key = billing::accounts::create_api_key(db, ws.id, "bench", Some(project.id), now).await?;
    fund(
        db,
        ws.id,
        Credits::from_whole_credits(PURCHASE_MAX_CREDITS)?,
        now,
    )
    .await?;
    Ok(Tenant {
        workspace_id: ws.id,
        auth: HeaderValue::from_str(&format!("Bearer {}", key.secret))?,
        secret: key.secret,
    })
}

/// Credits a workspace through a manual purchase (as `tests/src/lib.rs` `fund()` does).
pub async fn fund(
    db: &DatabaseConnection,
    workspace_id: Uuid,
    amount: Credits,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let purchase = purchases::create_purchase(
        db,
        PurchaseRequest {
            workspace_id,
            item: PurchaseItem::Amount(amount),
            source: PurchaseSource::Manual,
            payment_method_id: None,
            idempotency_key: format!("bench-fund-{}", Uuid::new_v4()),
            created_by_user_id: None,
        },
        now,
    )
    .await?;
    purchases::credit_purchase(db, purchase.purchase.id, None, now).await?;
    Ok(())
}

/// Usage events of the account's workspaces that a USAGE ledger transaction posts
/// (`usage_events.ledger_transaction_id`; one transaction may post a batch's events
/// of one workspace, docs/LEDGER.md §3).
pub async fn usage_posted(db: &DatabaseConnection, account_id: Uuid) -> anyhow::Result<u64> {
    use billing::sea_orm::sea_query::Query;
    let workspace_ids = Query::select()
        .column(workspaces::Column::Id)
        .from(workspaces::Entity)
        .and_where(workspaces::Column::AccountId.eq(account_id))
        .to_owned();
    let usage_transactions = Query::select()
        .column(ledger_transactions::Column::Id)
        .from(ledger_transactions::Entity)
        .and_where(ledger_transactions::Column::Kind.eq("USAGE"))
        .to_owned();
    Ok(usage_events::Entity::find()
        .filter(usage_events::Column::WorkspaceId.in_subquery(workspace_ids))
        .filter(usage_events::Column::LedgerTransactionId.in_subquery(usage_transactions))
        .count(db)
        .await?)
}

/// A workspace's balance sequence (the last balance event's).
pub async fn balance_sequence(db: &DatabaseConnection, workspace_id: Uuid) -> anyhow::Result<i64> {
    Ok(workspaces::Entity::find_by_id(workspace_id)
        .one(db)
        .await?
        .context("bench workspace vanished")?
        .balance_sequence)
}

/// Runs `billing::ledger::invariants::check` over the whole database.
pub async fn invariants(db: &DatabaseConnection) -> anyhow::Result<(bool, Vec<String>)> {
    let report = billing::ledger::invariants::check(db).await?;
    Ok((
        report.is_ok(),
        report.violations.iter().map(ToString::to_string).collect(),
    ))
}
