//! The double-entry ledger and the cached balances it feeds.
//!
//! Every money movement is one ledger transaction whose entries sum to zero across
//! ledger accounts: each workspace's pool, plus system accounts that keep no cached
//! balance (so they are never a hot row). The workspace row caches its balance and
//! reserved credits; both change only through [`change_workspace`], a single
//! conditional UPDATE, inside the same database transaction as the entries.

pub mod invariants;
pub mod tail;

use crate::error::{BillingError, Result};
use crate::money::Credits;
use chrono::{DateTime, Utc};
use entity::enums::{BalanceChangeCause, LedgerEntryKind};
use entity::{
    balance_events, ledger_entries, ledger_transactions, usage_daily, usage_daily_by, usage_events,
    workspaces,
};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect,
};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Names of the system ledger accounts.
pub mod system_account {
    /// Money received from cards for purchased credits.
    pub const CARD_PAYMENTS: &str = "card_payments";
    /// Credits granted against an invoice not yet paid.
    pub const INVOICE_RECEIVABLES: &str = "invoice_receivables";
    /// Bonus credits given with packages.
    pub const PROMOTIONS: &str = "promotions";
    /// Credits consumed by model usage.
    pub const USAGE_REVENUE: &str = "usage_revenue";
    /// Usage that a settlement could not collect because the pool ran dry: recorded
    /// here so that revenue shows the full priced cost and nothing is lost.
    pub const USAGE_SHORTFALL: &str = "usage_shortfall";
    /// Manual corrections.
    pub const ADJUSTMENTS: &str = "adjustments";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedgerAccount {
    Workspace(Uuid),
    System(&'static str),
}

/// One entry to post. `balance_after` is required for workspace entries.
#[derive(Clone, Debug)]
pub struct EntrySpec {
    pub account: LedgerAccount,
    pub kind: LedgerEntryKind,
    pub amount: Credits,
    pub balance_after: Option<Credits>,
    pub description: String,
}

/// What a ledger transaction is about.
#[derive(Clone, Copy, Debug, Default)]
pub struct PostingRefs {
    pub usage_event_id: Option<Uuid>,
    pub purchase_id: Option<Uuid>,
    pub transfer_id: Option<Uuid>,
}

/// Writes one balanced ledger transaction. `idempotency_key` is unique in the
/// database, so one business operation can never be posted twice.
pub(crate) async fn post<C: ConnectionTrait>(
    c: &C,
    kind: &str,
    idempotency_key: String,
    refs: PostingRefs,
    entries: &[EntrySpec],
    now: DateTime<Utc>,
) -> Result<i64> {
    let total = Credits::checked_sum(entries.iter().map(|e| e.amount))?;
    if !total.is_zero() || entries.len() < 2 {
        return Err(BillingError::Internal(format!(
            "unbalanced ledger transaction {idempotency_key}: {} entries sum to {total}",
            entries.len()
        )));
    }
    let inserted = ledger_transactions::Entity::insert(ledger_transactions::ActiveModel {
        kind: Set(kind.to_owned()),
        idempotency_key: Set(idempotency_key),
        usage_event_id: Set(refs.usage_event_id),
        purchase_id: Set(refs.purchase_id),
        transfer_id: Set(refs.transfer_id),
        created_at: Set(now),
        ..Default::default()
    })
    .exec(c)
    .await?;
    let transaction_id = inserted.last_insert_id;
    let rows = entries.iter().map(|e| {
        let (workspace_id, system_account) = match e.account {
            LedgerAccount::Workspace(id) => (Some(id), None),
            LedgerAccount::System(name) => (None, Some(name.to_owned())),
        };
        ledger_entries::ActiveModel {
            transaction_id: Set(transaction_id),
            workspace_id: Set(workspace_id),
            system_account: Set(system_account),
            kind: Set(e.kind),
            amount_nanos: Set(e.amount.nanos()),
            balance_after_nanos: Set(e.balance_after.map(Credits::nanos)),
            description: Set(e.description.clone()),
            created_at: Set(now),
            ..Default::default()
        }
    });
    ledger_entries::Entity::insert_many(rows)
        .exec_without_returning(c)
        .await?;
    Ok(transaction_id)
}

/// A condition on the workspace row checked by the same UPDATE that changes it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Guard {
    /// Always apply (credits, releases).
    None,
    /// Apply only if `balance - reserved >= n` before the change.
    AvailableAtLeast(Credits),
}

/// Changes a workspace's cached balance and reserved credits in one conditional
/// statement and returns the row as it is afterwards, or None when the guard failed.
/// On PostgreSQL the UPDATE takes the row lock and re-checks the guard against the
/// latest committed row, so concurrent debits can never overdraw; on SQLite the
/// transaction already holds the database's write lock. The CHECK constraint
/// `0 <= reserved <= balance` backs this up in the database.
pub(crate) async fn change_workspace<C: ConnectionTrait>(
    c: &C,
    workspace_id: Uuid,
    balance_delta: Credits,
    reserved_delta: Credits,
    guard: Guard,
    bump_sequence: bool,
) -> Result<Option<workspaces::Model>> {
    use workspaces::Column as W;
    let mut update = workspaces::Entity::update_many()
        .col_expr(
            W::BalanceNanos,
            Expr::col(W::BalanceNanos).add(balance_delta.nanos()),
        )
        .col_expr(
            W::ReservedNanos,
            Expr::col(W::ReservedNanos).add(reserved_delta.nanos()),
        )
        .filter(W::Id.eq(workspace_id));
    if balance_delta.is_positive() {
        // SQLite turns an overflowing integer into a REAL instead of failing: refuse the
        // change here instead, so a balance is always an exact integer.
        update = update.filter(W::BalanceNanos.lte(i64::MAX - balance_delta.nanos()));
    }
    if reserved_delta.is_positive() {
        update = update.filter(W::ReservedNanos.lte(i64::MAX - reserved_delta.nanos()));
    }
    if bump_sequence {
        update = update.col_expr(W::BalanceSequence, Expr::col(W::BalanceSequence).add(1));
    }
    if let Guard::AvailableAtLeast(needed) = guard {
        update = update.filter(
            Expr::col(W::BalanceNanos)
                .sub(Expr::col(W::ReservedNanos))
                .gte(needed.nanos()),
        );
    }
    let mut rows = update.exec_with_returning(c).await?;
    Ok(rows.pop())
}

/// Loads a workspace (for a refusal's `available`, or to fail with NOT_FOUND).
pub(crate) async fn load_workspace<C: ConnectionTrait>(
    c: &C,
    workspace_id: Uuid,
) -> Result<workspaces::Model> {
    workspaces::Entity::find_by_id(workspace_id)
        .one(c)
        .await?
        .ok_or(BillingError::NotFound("workspace"))
}

pub fn available(ws: &workspaces::Model) -> Credits {
    Credits::from_nanos(ws.balance_nanos.saturating_sub(ws.reserved_nanos))
}

/// Records the workspace's new state as a balance event; its sequence is the one the
/// UPDATE just assigned, so events are gap-free and strictly increasing per workspace.
pub(crate) async fn balance_event<C: ConnectionTrait>(
    c: &C,
    ws: &workspaces::Model,
    cause: BalanceChangeCause,
    now: DateTime<Utc>,
) -> Result<()> {
    balance_events::Entity::insert(balance_events::ActiveModel {
        workspace_id: Set(ws.id),
        sequence: Set(ws.balance_sequence),
        balance_nanos: Set(ws.balance_nanos),
        reserved_nanos: Set(ws.reserved_nanos),
        cause: Set(cause),
        created_at: Set(now),
        ..Default::default()
    })
    .exec_without_returning(c)
    .await?;
    if c.get_database_backend() == sea_orm::DbBackend::Postgres {
        // Delivered at commit (and not at all on rollback): wakes every API process's
        // balance-event tailer at once instead of waiting for its next poll.
        c.execute_unprepared("SELECT pg_notify('reservoir_balance_events', '')")
            .await?;
    }
    Ok(())
}

/// The PostgreSQL channel notified when balance events commit.
pub const BALANCE_EVENTS_CHANNEL: &str = "reservoir_balance_events";

/// Sums of one rollup row.
#[derive(Clone, Copy, Default)]
pub(crate) struct Sums {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_nanos: i64,
}

impl Sums {
    fn add(&mut self, e: &usage_events::Model) {
        self.requests += 1;
        self.prompt_tokens += e.prompt_tokens;
        self.completion_tokens += e.completion_tokens;
        self.cost_nanos += e.cost_nanos;
    }
}

/// Rows per upsert statement (under both backends' bound-variable limits).
const ROLLUP_ROWS_MAX: usize = 1_000;

/// Adds usage events to the daily rollups: `usage_daily` (one row per workspace, UTC day
/// and combination of project, member, key and model; the nil UUID stands for "none")
/// and `usage_daily_by` (one row per workspace, day and value of one dimension). Rows
/// are summed per key first (one row may not be upserted twice in one statement), then
/// upserted in a fixed order, so two writers upserting the same rows cannot deadlock.
pub(crate) async fn add_to_rollups<C: ConnectionTrait>(
    c: &C,
    events: &[usage_events::Model],
) -> Result<()> {
    let (daily, daily_by) = sum_per_row(events);
    // A BTreeMap iterates in key order: the fixed upsert order.
    let daily: Vec<_> = daily.into_iter().collect();
    for chunk in daily.chunks(ROLLUP_ROWS_MAX) {
        upsert_daily(c, chunk).await?;
    }
    let daily_by: Vec<_> = daily_by.into_iter().collect();
    for chunk in daily_by.chunks(ROLLUP_ROWS_MAX) {
        upsert_daily_by(c, chunk).await?;
    }
    Ok(())
}

/// A `usage_daily` row's key: workspace, day, project, member, key, model.
pub(crate) type DailyKey = (Uuid, chrono::NaiveDate, Uuid, Uuid, Uuid, String);
/// A `usage_daily_by` row's key: workspace, dimension, day, and the dimension's value
/// (a UUID, or for "model" the model id with the nil UUID).
pub(crate) type DailyByKey = (Uuid, &'static str, chrono::NaiveDate, Uuid, String);

/// The rollup rows of a batch's events, summed per row and in the fixed upsert order,
/// for the debit engine's one-statement write on PostgreSQL: `usage_daily` rows, then
/// `usage_daily_by` rows.
pub(crate) fn rollup_rows(events: &[usage_events::Model]) -> (Vec<DailyRow>, Vec<DailyByRow>) {
    let (daily, daily_by) = sum_per_row(events);
    (daily.into_iter().collect(), daily_by.into_iter().collect())
}

/// A `usage_daily` row: its key and its sums.
pub(crate) type DailyRow = (DailyKey, Sums);
/// A `usage_daily_by` row: its key and its sums.
pub(crate) type DailyByRow = (DailyByKey, Sums);

/// The events summed per rollup row, each event counted once in `usage_daily` and once
/// per dimension in `usage_daily_by`.
fn sum_per_row(
    events: &[usage_events::Model],
) -> (BTreeMap<DailyKey, Sums>, BTreeMap<DailyByKey, Sums>) {
    let mut daily: BTreeMap<DailyKey, Sums> = BTreeMap::new();
    let mut daily_by: BTreeMap<DailyByKey, Sums> = BTreeMap::new();
    for e in events {
        let day = e.created_at.date_naive();
        let (project, user, key) = (
            e.project_id.unwrap_or(Uuid::nil()),
            e.user_id.unwrap_or(Uuid::nil()),
            e.api_key_id.unwrap_or(Uuid::nil()),
        );
        daily
            .entry((e.workspace_id, day, project, user, key, e.model_id.clone()))
            .or_default()
            .add(e);
        for by_key in [
            (e.workspace_id, "project", day, project, String::new()),
            (e.workspace_id, "member", day, user, String::new()),
            (e.workspace_id, "api_key", day, key, String::new()),
            (
                e.workspace_id,
                "model",
                day,
                Uuid::nil(),
                e.model_id.clone(),
            ),
        ] {
            daily_by.entry(by_key).or_default().add(e);
        }
    }
    (daily, daily_by)
}

/// Upserts one statement's worth of `usage_daily` rows, adding to existing counters.
async fn upsert_daily<C: ConnectionTrait>(c: &C, chunk: &[(DailyKey, Sums)]) -> Result<()> {
    use usage_daily::Column as D;
    let rows = chunk.iter().map(|(k, s)| usage_daily::ActiveModel {
        workspace_id: Set(k.0),
        day: Set(k.1),
        project_id: Set(k.2),
        user_id: Set(k.3),
        api_key_id: Set(k.4),
        model_id: Set(k.5.clone()),
        requests: Set(s.requests),
        prompt_tokens: Set(s.prompt_tokens),
        completion_tokens: Set(s.completion_tokens),
        cost_nanos: Set(s.cost_nanos),
        ..Default::default()
    });
    let on_conflict = OnConflict::columns([
        D::WorkspaceId,
        D::Day,
        D::ProjectId,
        D::UserId,
        D::ApiKeyId,
        D::ModelId,
    ])
    .values(sum_excluded(
        usage_daily::Entity,
        [
            (D::Requests, "requests"),
            (D::PromptTokens, "prompt_tokens"),
            (D::CompletionTokens, "completion_tokens"),
            (D::CostNanos, "cost_nanos"),
        ],
    ))
    .to_owned();
    usage_daily::Entity::insert_many(rows)
        .on_conflict(on_conflict)
        .exec_without_returning(c)
        .await?;
    Ok(())
}

/// Upserts one statement's worth of `usage_daily_by` rows, adding to existing counters.
async fn upsert_daily_by<C: ConnectionTrait>(c: &C, chunk: &[(DailyByKey, Sums)]) -> Result<()> {
    use usage_daily_by::Column as B;
    let rows = chunk.iter().map(|(k, s)| usage_daily_by::ActiveModel {
        workspace_id: Set(k.0),
        dimension: Set(k.1.to_owned()),
        day: Set(k.2),
        dim_uuid: Set(k.3),
        dim_model: Set(k.4.clone()),
        requests: Set(s.requests),
        prompt_tokens: Set(s.prompt_tokens),
        completion_tokens: Set(s.completion_tokens),
        cost_nanos: Set(s.cost_nanos),
        ..Default::default()
    });
    let on_conflict = OnConflict::columns([
        B::WorkspaceId,
        B::Dimension,
        B::Day,
        B::DimUuid,
        B::DimModel,
    ])
    .values(sum_excluded(
        usage_daily_by::Entity,
        [
            (B::Requests, "requests"),
            (B::PromptTokens, "prompt_tokens"),
            (B::CompletionTokens, "completion_tokens"),
            (B::CostNanos, "cost_nanos"),
        ],
    ))
    .to_owned();
    usage_daily_by::Entity::insert_many(rows)
        .on_conflict(on_conflict)
        .exec_without_returning(c)
        .await?;
    Ok(())
}

/// `col = table.col + excluded.col` for each counter of an upsert.
fn sum_excluded<E: sea_orm::EntityTrait, Col: sea_orm::sea_query::IntoIden + Copy + 'static>(
    table: E,
    columns: [(Col, &'static str); 4],
) -> Vec<(Col, sea_orm::sea_query::SimpleExpr)> {
    columns
        .into_iter()
        .map(|(col, name)| {
            (
                col,
                Expr::col((table, col)).add(Expr::cust(format!("excluded.{name}"))),
            )
        })
        .collect()
}

/// Loads a workspace, locking its row on PostgreSQL (`FOR UPDATE`; SQLite's
/// `BEGIN IMMEDIATE` already holds the database's write lock). NOT_FOUND if absent.
pub(crate) async fn lock_workspace<C: ConnectionTrait>(
    c: &C,
    id: Uuid,
) -> Result<workspaces::Model> {
    workspaces::Entity::find_by_id(id)
        .lock_exclusive()
        .one(c)
        .await?
        .ok_or(BillingError::NotFound("workspace"))
}

// --- reads -------------------------------------------------------------------------

/// The consolidated balance of some workspaces (an account's total balance): the sum
/// of their cached balances, LIMIT_EXCEEDED rather than a wrap.
pub fn total_balance<'a>(
    workspaces: impl IntoIterator<Item = &'a workspaces::Model>,
) -> Result<Credits> {
    let balances = workspaces
        .into_iter()
        .map(|w| Credits::from_nanos(w.balance_nanos));
    Ok(Credits::checked_sum(balances)?)
}

/// Each account's [`total_balance`] over all its workspaces; every requested account
/// has one (zero without workspaces).
pub async fn account_totals<C: ConnectionTrait>(
    c: &C,
    account_ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, Credits>> {
    use workspaces::Column as W;
    let by_account =
        crate::batch::grouped::<workspaces::Entity, _>(c, W::AccountId, account_ids, W::Id, |w| {
            w.account_id
        })
        .await?;
    by_account
        .into_iter()
        .map(|(account_id, rows)| Ok((account_id, total_balance(&rows)?)))
        .collect()
}

/// Ledger transactions by id (absent ids are left out).
pub async fn transactions_by_ids<C: ConnectionTrait>(
    c: &C,
    ids: &[i64],
) -> Result<std::collections::HashMap<i64, ledger_transactions::Model>> {
    use ledger_transactions::{Column, Entity};
    crate::batch::by_keys::<Entity, _, _>(c, Column::Id, ids, |t| t.id).await
}
