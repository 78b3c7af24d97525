//! The double-entry ledger and the cached balances it feeds.
//!
//! Every money movement is one ledger transaction whose entries sum to zero across
//! ledger accounts: each workspace's pool, plus system accounts that keep no cached
//! balance (so they are never a hot row). The workspace row caches its balance and
//! reserved credits; both change only through [`change_workspace`], a single
//! conditional UPDATE, inside the same database transaction as the entries.

use crate::error::{BillingError, Result};
use crate::money::Credits;
use chrono::{DateTime, Utc};
use entity::enums::{BalanceChangeCause, LedgerEntryKind};
use entity::{
    balance_events, ledger_entries, ledger_transactions, usage_daily, usage_events, workspaces,
};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};
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

/// Adds a usage event to its daily rollup row (one row per workspace, UTC day and
/// dimension combination; the nil UUID stands for "none").
pub(crate) async fn add_to_rollup<C: ConnectionTrait>(
    c: &C,
    event: &usage_events::Model,
) -> Result<()> {
    use usage_daily::Column as D;
    let add = |col: D, n: i64| (col, Expr::col((usage_daily::Entity, col)).add(n));
    let row = usage_daily::ActiveModel {
        workspace_id: Set(event.workspace_id),
        day: Set(event.created_at.date_naive()),
        project_id: Set(event.project_id.unwrap_or(Uuid::nil())),
        user_id: Set(event.user_id.unwrap_or(Uuid::nil())),
        api_key_id: Set(event.api_key_id.unwrap_or(Uuid::nil())),
        model_id: Set(event.model_id.clone()),
        requests: Set(1),
        prompt_tokens: Set(event.prompt_tokens),
        completion_tokens: Set(event.completion_tokens),
        cost_nanos: Set(event.cost_nanos),
        ..Default::default()
    };
    let on_conflict = OnConflict::columns([
        D::WorkspaceId,
        D::Day,
        D::ProjectId,
        D::UserId,
        D::ApiKeyId,
        D::ModelId,
    ])
    .values([
        add(D::Requests, 1),
        add(D::PromptTokens, event.prompt_tokens),
        add(D::CompletionTokens, event.completion_tokens),
        add(D::CostNanos, event.cost_nanos),
    ])
    .to_owned();
    usage_daily::Entity::insert(row)
        .on_conflict(on_conflict)
        .exec_without_returning(c)
        .await?;
    Ok(())
}
