//! Step 3 of a batch: write what the rules decided, with a few set-based statements,
//! then run the balance-change policies (auto-reload, alerts) and write one balance
//! event per workspace changed.
//!
//! Every UPDATE is conditional on the values the batch locked, so a row that moved
//! under its lock (a broken assumption) fails the whole batch instead of being
//! overwritten; the CHECK constraints back the balance rules up.

#![deny(clippy::arithmetic_side_effects)]

use super::FollowUp;
use super::load::is_postgres;
use super::posting::{self, Posting};
use super::rules::{State, WorkspaceState, Writes};
use crate::error::{BillingError, Result};
use crate::ledger::{self, BALANCE_EVENTS_CHANNEL};
use chrono::Utc;
use entity::enums::{BalanceChangeCause, ReservationStatus};
use entity::{
    balance_events, ledger_entries, ledger_transactions, projects,
    reservations as reservation_rows, usage_events, workspaces,
};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseTransaction,
    EntityTrait, IntoActiveModel, QueryFilter,
};
use std::collections::HashMap;
use uuid::Uuid;

/// Rows per INSERT statement: under SQLite's 32,766 bound variables with the widest
/// row (usage events, 14 columns) and PostgreSQL's 65,535.
const INSERT_ROWS_MAX: usize = 1_000;
/// Ledger transactions per statement pair: each has up to three entries.
const POSTINGS_PER_INSERT_MAX: usize = 333;

/// Writes the batch; returns its follow-up work and each new usage event's ledger
/// transaction id.
pub(super) async fn write(
    tx: &DatabaseTransaction,
    state: &mut State,
    writes: Writes,
) -> Result<(FollowUp, HashMap<Uuid, i64>)> {
    let pg = is_postgres(tx);
    let postings = posting::per_workspace(writes.postings)?;
    let posted = if pg {
        super::write_pg::write_money(tx, state, &writes.events, &postings).await?
    } else {
        // The transactions first, for the events' foreign key. The unique (workspace,
        // request id) key on the events is still the last line of defence against a
        // double debit: a violation fails the whole batch.
        let posted = post_all(tx, &postings).await?;
        insert_events(tx, &writes.events, &posted).await?;
        ledger::add_to_rollups(tx, &writes.events).await?;
        posted
    };
    insert_reservations(tx, &writes.new_reservations).await?;
    resolve_reservations(tx, &writes.resolved_reservations).await?;
    if !pg {
        update_projects(tx, state).await?;
    }
    let State {
        workspaces,
        reload_settings,
        thresholds,
        ..
    } = state;
    let mut changed: Vec<&mut WorkspaceState> = workspaces
        .values_mut()
        .filter(|w| w.cause.is_some())
        .collect();
    changed.sort_by_key(|w| w.row.id);
    let mut follow_up = FollowUp::default();
    for ws in &mut changed {
        if !pg {
            update_workspace(tx, ws).await?;
        }
        let id = ws.row.id;
        let rows = (
            reload_settings.get(&id),
            thresholds.get(&id).map_or(&[][..], Vec::as_slice),
        );
        run_policies(tx, ws, rows, &mut follow_up).await?;
    }
    if !pg {
        insert_balance_events(tx, &changed).await?;
    }
    Ok((follow_up, posted))
}

/// Auto-reload and alerts, judged on the row as the batch left it, with the policy
/// rows the batch loaded.
async fn run_policies(
    tx: &DatabaseTransaction,
    ws: &WorkspaceState,
    (settings, thresholds): PolicyRows<'_>,
    follow_up: &mut FollowUp,
) -> Result<()> {
    use crate::policies::{alerts, auto_reload};
    let now = ws.changed_at.unwrap_or_else(Utc::now);
    if let Some(purchase) =
        auto_reload::after_balance_change_with(tx, &ws.row, settings, now).await?
    {
        follow_up.purchases.push(purchase.id);
    }
    let alerts = alerts::after_balance_change_with(tx, &ws.row, thresholds, now).await?;
    follow_up.notifications.extend(alerts.notifications);
    follow_up
        .webhook_deliveries
        .extend(alerts.webhook_deliveries);
    Ok(())
}

type PolicyRows<'a> = (
    Option<&'a entity::auto_reload_settings::Model>,
    &'a [entity::alert_thresholds::Model],
);

/// The events, each with the id of the transaction that posts it.
async fn insert_events(
    tx: &DatabaseTransaction,
    events: &[usage_events::Model],
    posted: &HashMap<Uuid, i64>,
) -> Result<()> {
    for chunk in events.chunks(INSERT_ROWS_MAX) {
        let mut rows = Vec::with_capacity(chunk.len());
        for event in chunk {
            let id = posted.get(&event.id).copied().ok_or_else(|| {
                BillingError::Internal(format!("usage event {} has no posting", event.id))
            })?;
            let row = usage_events::Model {
                ledger_transaction_id: Some(id),
                ..event.clone()
            };
            rows.push(row.into_active_model().reset_all());
        }
        usage_events::Entity::insert_many(rows)
            .exec_without_returning(tx)
            .await?;
    }
    Ok(())
}

/// Inserts the batch's ledger transactions (one per workspace) and their entries:
/// two statements per few hundred transactions. Returns each event's transaction id.
async fn post_all(tx: &DatabaseTransaction, postings: &[Posting]) -> Result<HashMap<Uuid, i64>> {
    let mut ids: HashMap<String, i64> = HashMap::with_capacity(postings.len());
    for chunk in postings.chunks(POSTINGS_PER_INSERT_MAX) {
        let headers = chunk.iter().map(|p| ledger_transactions::ActiveModel {
            kind: Set("USAGE".to_owned()),
            idempotency_key: Set(p.idempotency_key()),
            usage_event_id: Set(p.usage_event_id()),
            purchase_id: Set(None),
            transfer_id: Set(None),
            created_at: Set(p.now),
            ..Default::default()
        });
        let inserted = ledger_transactions::Entity::insert_many(headers)
            .exec_with_returning(tx)
            .await?;
        ids.extend(inserted.into_iter().map(|t| (t.idempotency_key, t.id)));
        let mut entries = Vec::with_capacity(chunk.len().saturating_mul(3));
        for p in chunk {
            let key = p.idempotency_key();
            let id = *ids
                .get(&key)
                .ok_or_else(|| BillingError::Internal(format!("no id returned for {key}")))?;
            entries.extend(p.entries()?.into_iter().map(|mut e| {
                e.transaction_id = Set(id);
                e
            }));
        }
        ledger_entries::Entity::insert_many(entries)
            .exec_without_returning(tx)
            .await?;
    }
    event_postings(postings, &ids)
}

/// Each event's transaction id, from the transactions' ids by key: INTERNAL if a
/// posting's transaction was not written.
pub(super) fn event_postings(
    postings: &[Posting],
    ids: &HashMap<String, i64>,
) -> Result<HashMap<Uuid, i64>> {
    let mut posted = HashMap::new();
    for p in postings {
        let key = p.idempotency_key();
        let id = *ids
            .get(&key)
            .ok_or_else(|| BillingError::Internal(format!("{key} was not posted")))?;
        posted.extend(p.event_ids.iter().map(|event| (*event, id)));
    }
    Ok(posted)
}

async fn insert_reservations(
    tx: &DatabaseTransaction,
    reservations: &[reservation_rows::Model],
) -> Result<()> {
    for chunk in reservations.chunks(INSERT_ROWS_MAX) {
        let rows = chunk
            .iter()
            .map(|r| r.clone().into_active_model().reset_all());
        reservation_rows::Entity::insert_many(rows)
            .exec_without_returning(tx)
            .await?;
    }
    Ok(())
}

async fn resolve_reservations(
    tx: &DatabaseTransaction,
    resolved: &[(reservation_rows::Model, ReservationStatus)],
) -> Result<()> {
    use reservation_rows::Column as R;
    for (row, from) in resolved {
        let changed = reservation_rows::Entity::update_many()
            .col_expr(R::Status, Expr::value(row.status.as_str()))
            .col_expr(R::UsageEventId, Expr::value(row.usage_event_id))
            .col_expr(R::ResolvedAt, Expr::value(row.resolved_at))
            .filter(R::Id.eq(row.id))
            .filter(R::Status.eq(*from))
            .exec(tx)
            .await?;
        if changed.rows_affected != 1 {
            return Err(BillingError::Internal(format!(
                "reservation {} changed under its lock",
                row.id
            )));
        }
    }
    Ok(())
}

async fn update_projects(tx: &DatabaseTransaction, state: &State) -> Result<()> {
    use projects::Column as P;
    for project in state.projects.values().filter(|p| p.row != p.before) {
        let (row, before) = (&project.row, &project.before);
        let changed = projects::Entity::update_many()
            .col_expr(P::BudgetSpentNanos, Expr::value(row.budget_spent_nanos))
            .col_expr(
                P::BudgetReservedNanos,
                Expr::value(row.budget_reserved_nanos),
            )
            .col_expr(P::BudgetPeriodStart, Expr::value(row.budget_period_start))
            .filter(P::Id.eq(row.id))
            .filter(P::BudgetSpentNanos.eq(before.budget_spent_nanos))
            .filter(P::BudgetReservedNanos.eq(before.budget_reserved_nanos))
            .filter(P::BudgetPeriodStart.eq(before.budget_period_start))
            .exec(tx)
            .await?;
        if changed.rows_affected != 1 {
            return Err(BillingError::Internal(format!(
                "project {} changed under its lock",
                row.id
            )));
        }
    }
    Ok(())
}

/// The batch's net change to one workspace row, plus one step of its sequence,
/// conditional on the sequence it locked.
async fn update_workspace(tx: &DatabaseTransaction, ws: &mut WorkspaceState) -> Result<()> {
    use workspaces::Column as W;
    let balance_delta = ws.balance_delta()?;
    let reserved_delta = ws.reserved_delta()?;
    let sequence_after = super::write_pg::sequence_after(ws)?;
    let updated = workspaces::Entity::update_many()
        .col_expr(
            W::BalanceNanos,
            Expr::col(W::BalanceNanos).add(balance_delta),
        )
        .col_expr(
            W::ReservedNanos,
            Expr::col(W::ReservedNanos).add(reserved_delta),
        )
        .col_expr(W::BalanceSequence, Expr::value(sequence_after))
        .filter(W::Id.eq(ws.row.id))
        .filter(W::BalanceSequence.eq(ws.before.balance_sequence))
        .exec_with_returning(tx)
        .await?
        .pop();
    let expected = workspaces::Model {
        balance_sequence: sequence_after,
        ..ws.row.clone()
    };
    match updated {
        Some(row) if row == expected => {
            ws.row = row;
            Ok(())
        }
        _ => Err(BillingError::Internal(format!(
            "workspace {} changed under its lock",
            ws.row.id
        ))),
    }
}

/// Balance events last, stamped as late as possible: `at` is when the batch went to
/// commit, which is what a subscriber measures its delivery delay from.
async fn insert_balance_events(
    tx: &DatabaseTransaction,
    changed: &[&mut WorkspaceState],
) -> Result<()> {
    if changed.is_empty() {
        return Ok(());
    }
    let at = Utc::now();
    let rows = changed.iter().map(|ws| balance_events::ActiveModel {
        workspace_id: Set(ws.row.id),
        sequence: Set(ws.row.balance_sequence),
        balance_nanos: Set(ws.row.balance_nanos),
        reserved_nanos: Set(ws.row.reserved_nanos),
        cause: Set(ws.cause.unwrap_or(BalanceChangeCause::Usage)),
        created_at: Set(at),
        ..Default::default()
    });
    balance_events::Entity::insert_many(rows)
        .exec_without_returning(tx)
        .await?;
    if is_postgres(tx) {
        tx.execute_unprepared(&format!("SELECT pg_notify('{BALANCE_EVENTS_CHANNEL}', '')"))
            .await?;
    }
    Ok(())
}
