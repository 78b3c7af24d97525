//! Step 3 on PostgreSQL: the batch's money rows in one statement.
//!
//! Usage events, ledger transactions and their entries, both daily rollups, the
//! project and workspace counters and the balance events go in as one JSON document
//! (one text argument per table, `$1`..`$8`) unpacked by `json_to_recordset` in data-modifying CTEs, with `pg_notify` in
//! the same statement. One bind and one plan whatever the batch size (a VALUES list
//! has one bind per column per row, and a new statement text for every size), and
//! one round trip instead of a dozen. The UPDATEs stay conditional on what the batch
//! locked; the counts they return are checked, so a row that moved under its lock
//! fails the batch. Foreign keys are checked at the end of the statement, so rows of
//! one CTE may reference rows of another.

#![deny(clippy::arithmetic_side_effects)]

use super::rules::{Posting, State, WorkspaceState};
use crate::error::{BillingError, Result};
use crate::ledger::{self, BALANCE_EVENTS_CHANNEL};
use chrono::{DateTime, Utc};
use entity::{ledger_entries, usage_events};
use sea_orm::ActiveValue;
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, Statement};
use serde_json::{Value, json};

const WRITE_SQL: &str = r#"
WITH ev AS (
  INSERT INTO usage_events (id, workspace_id, project_id, user_id, api_key_id, model_id,
    prompt_tokens, completion_tokens, cost_nanos, shortfall_nanos, request_id, request_hash,
    reservation_id, created_at)
  SELECT x.id, x.workspace_id, x.project_id, x.user_id, x.api_key_id, x.model_id,
    x.prompt_tokens, x.completion_tokens, x.cost_nanos, x.shortfall_nanos, x.request_id,
    x.request_hash, x.reservation_id, x.created_at
  FROM json_to_recordset($1::json) AS x(id uuid, workspace_id uuid,
    project_id uuid, user_id uuid, api_key_id uuid, model_id text, prompt_tokens bigint,
    completion_tokens bigint, cost_nanos bigint, shortfall_nanos bigint, request_id text,
    request_hash text, reservation_id uuid, created_at timestamptz)
  RETURNING 1),
tx AS (
  INSERT INTO ledger_transactions (kind, idempotency_key, usage_event_id, created_at)
  SELECT 'USAGE', x.idempotency_key, x.usage_event_id, x.created_at
  FROM json_to_recordset($2::json) AS x(idempotency_key text,
    usage_event_id uuid, created_at timestamptz)
  RETURNING id, usage_event_id),
en AS (
  INSERT INTO ledger_entries (transaction_id, workspace_id, system_account, kind,
    amount_nanos, balance_after_nanos, description, created_at)
  SELECT tx.id, x.workspace_id, x.system_account, x.kind, x.amount_nanos,
    x.balance_after_nanos, x.description, x.created_at
  FROM json_to_recordset($3::json) AS x(usage_event_id uuid,
    workspace_id uuid, system_account text, kind text, amount_nanos bigint,
    balance_after_nanos bigint, description text, created_at timestamptz)
  JOIN tx ON tx.usage_event_id = x.usage_event_id
  RETURNING 1),
daily AS (
  INSERT INTO usage_daily AS d (workspace_id, day, project_id, user_id, api_key_id, model_id,
    requests, prompt_tokens, completion_tokens, cost_nanos)
  SELECT x.workspace_id, x.day, x.project_id, x.user_id, x.api_key_id, x.model_id,
    x.requests, x.prompt_tokens, x.completion_tokens, x.cost_nanos
  FROM json_to_recordset($4::json) AS x(workspace_id uuid, day date,
    project_id uuid, user_id uuid, api_key_id uuid, model_id text, requests bigint,
    prompt_tokens bigint, completion_tokens bigint, cost_nanos bigint)
  ON CONFLICT (workspace_id, day, project_id, user_id, api_key_id, model_id) DO UPDATE SET
    requests = d.requests + EXCLUDED.requests,
    prompt_tokens = d.prompt_tokens + EXCLUDED.prompt_tokens,
    completion_tokens = d.completion_tokens + EXCLUDED.completion_tokens,
    cost_nanos = d.cost_nanos + EXCLUDED.cost_nanos
  RETURNING 1),
daily_by AS (
  INSERT INTO usage_daily_by AS d (workspace_id, dimension, day, dim_uuid, dim_model,
    requests, prompt_tokens, completion_tokens, cost_nanos)
  SELECT x.workspace_id, x.dimension, x.day, x.dim_uuid, x.dim_model, x.requests,
    x.prompt_tokens, x.completion_tokens, x.cost_nanos
  FROM json_to_recordset($5::json) AS x(workspace_id uuid, dimension text,
    day date, dim_uuid uuid, dim_model text, requests bigint, prompt_tokens bigint,
    completion_tokens bigint, cost_nanos bigint)
  ON CONFLICT (workspace_id, dimension, day, dim_uuid, dim_model) DO UPDATE SET
    requests = d.requests + EXCLUDED.requests,
    prompt_tokens = d.prompt_tokens + EXCLUDED.prompt_tokens,
    completion_tokens = d.completion_tokens + EXCLUDED.completion_tokens,
    cost_nanos = d.cost_nanos + EXCLUDED.cost_nanos
  RETURNING 1),
pr AS (
  UPDATE projects AS p SET budget_spent_nanos = x.spent_after,
    budget_reserved_nanos = x.reserved_after, budget_period_start = x.period_start_after
  FROM json_to_recordset($6::json) AS x(id uuid, spent_before bigint,
    reserved_before bigint, period_start_before timestamptz, spent_after bigint,
    reserved_after bigint, period_start_after timestamptz)
  WHERE p.id = x.id AND p.budget_spent_nanos = x.spent_before
    AND p.budget_reserved_nanos = x.reserved_before
    AND p.budget_period_start = x.period_start_before
  RETURNING 1),
ws AS (
  UPDATE workspaces AS w SET balance_nanos = w.balance_nanos + x.balance_delta,
    reserved_nanos = w.reserved_nanos + x.reserved_delta, balance_sequence = x.sequence_after
  FROM json_to_recordset($7::json) AS x(id uuid, balance_delta bigint,
    reserved_delta bigint, sequence_before bigint, sequence_after bigint)
  WHERE w.id = x.id AND w.balance_sequence = x.sequence_before
  RETURNING 1),
be AS (
  INSERT INTO balance_events (workspace_id, sequence, balance_nanos, reserved_nanos, cause,
    created_at)
  SELECT x.workspace_id, x.sequence, x.balance_nanos, x.reserved_nanos, x.cause, x.created_at
  FROM json_to_recordset($8::json) AS x(workspace_id uuid,
    sequence bigint, balance_nanos bigint, reserved_nanos bigint, cause text,
    created_at timestamptz)
  RETURNING 1)
SELECT (SELECT count(*) FROM ev) AS events, (SELECT count(*) FROM en) AS entries,
  (SELECT count(*) FROM pr) AS projects, (SELECT count(*) FROM ws) AS workspaces,
  (SELECT count(*) FROM be) AS balance_events,
  CASE WHEN (SELECT count(*) FROM be) > 0 THEN pg_notify($9, '') END::text AS notified
"#;

fn set<T: Clone + Into<sea_orm::Value>>(v: &ActiveValue<T>) -> Option<T> {
    match v {
        ActiveValue::Set(x) | ActiveValue::Unchanged(x) => Some(x.clone()),
        ActiveValue::NotSet => None,
    }
}

fn entry_record(usage_event_id: uuid::Uuid, e: &ledger_entries::ActiveModel) -> Value {
    json!({
        "usage_event_id": usage_event_id,
        "workspace_id": set(&e.workspace_id).flatten(),
        "system_account": set(&e.system_account).flatten(),
        "kind": set(&e.kind).map(|k| k.as_str().to_owned()),
        "amount_nanos": set(&e.amount_nanos),
        "balance_after_nanos": set(&e.balance_after_nanos).flatten(),
        "description": set(&e.description),
        "created_at": set(&e.created_at),
    })
}

fn ledger_records(postings: &[Posting]) -> (Vec<Value>, Vec<Value>) {
    let transactions = postings
        .iter()
        .map(|p| {
            json!({"idempotency_key": p.idempotency_key, "usage_event_id": p.usage_event_id,
                "created_at": p.now})
        })
        .collect();
    let entries = postings
        .iter()
        .flat_map(|p| p.entries.iter().map(|e| entry_record(p.usage_event_id, e)))
        .collect();
    (transactions, entries)
}

fn event_record(e: &usage_events::Model) -> Value {
    json!({
        "id": e.id, "workspace_id": e.workspace_id, "project_id": e.project_id,
        "user_id": e.user_id, "api_key_id": e.api_key_id, "model_id": e.model_id,
        "prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens,
        "cost_nanos": e.cost_nanos, "shortfall_nanos": e.shortfall_nanos,
        "request_id": e.request_id, "request_hash": e.request_hash,
        "reservation_id": e.reservation_id, "created_at": e.created_at,
    })
}

fn workspace_record(ws: &WorkspaceState, at: DateTime<Utc>) -> Result<(Value, Value)> {
    let sequence_after = sequence_after(ws)?;
    let update = json!({
        "id": ws.row.id,
        "balance_delta": ws.balance_delta()?,
        "reserved_delta": ws.reserved_delta()?,
        "sequence_before": ws.before.balance_sequence,
        "sequence_after": sequence_after,
    });
    let event = json!({
        "workspace_id": ws.row.id, "sequence": sequence_after,
        "balance_nanos": ws.row.balance_nanos, "reserved_nanos": ws.row.reserved_nanos,
        "cause": ws.cause.map(|c| c.as_str().to_owned()), "created_at": at,
    });
    Ok((update, event))
}

pub(super) fn sequence_after(ws: &WorkspaceState) -> Result<i64> {
    ws.before
        .balance_sequence
        .checked_add(1)
        .ok_or_else(|| BillingError::Internal("balance sequence out of range".into()))
}

/// The JSON document of the statement and the counts it must report back.
fn document(
    state: &State,
    events: &[usage_events::Model],
    postings: &[Posting],
) -> Result<([Vec<Value>; 8], [i64; 4])> {
    let (transactions, entries) = ledger_records(postings);
    let (daily, daily_by) = ledger::rollup_records(events);
    let projects: Vec<Value> = state
        .projects
        .values()
        .filter(|p| p.row != p.before)
        .map(|p| {
            json!({"id": p.row.id, "spent_before": p.before.budget_spent_nanos,
                "reserved_before": p.before.budget_reserved_nanos,
                "period_start_before": p.before.budget_period_start,
                "spent_after": p.row.budget_spent_nanos,
                "reserved_after": p.row.budget_reserved_nanos,
                "period_start_after": p.row.budget_period_start})
        })
        .collect();
    let mut changed: Vec<&WorkspaceState> = state
        .workspaces
        .values()
        .filter(|w| w.cause.is_some())
        .collect();
    changed.sort_by_key(|w| w.row.id);
    let at = Utc::now();
    let (workspaces, balance_events): (Vec<Value>, Vec<Value>) = changed
        .iter()
        .map(|w| workspace_record(w, at))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let expected = [
        count(events.len()),
        count(entries.len()),
        count(projects.len()),
        count(workspaces.len()),
    ];
    let events: Vec<Value> = events.iter().map(event_record).collect();
    // In the statement's parameter order ($1..$8).
    let arrays = [
        events,
        transactions,
        entries,
        daily,
        daily_by,
        projects,
        workspaces,
        balance_events,
    ];
    Ok((arrays, expected))
}

/// Writes the batch's money rows in one statement and moves the changed workspace
/// rows in memory to what the statement made of them.
pub(super) async fn write_money(
    tx: &DatabaseTransaction,
    state: &mut State,
    events: &[usage_events::Model],
    postings: &[Posting],
) -> Result<()> {
    let (arrays, expected) = document(state, events, postings)?;
    // Bound as text and cast to `json` in the statement: parsed once, as it streams
    // into the records (a `jsonb` argument would be parsed into a tree first).
    let mut args: Vec<sea_orm::Value> = arrays
        .iter()
        .map(|a| serde_json::to_string(a).map(Into::into))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| BillingError::Internal(format!("batch write: {e}")))?;
    args.push(BALANCE_EVENTS_CHANNEL.into());
    let stmt = Statement::from_sql_and_values(DbBackend::Postgres, WRITE_SQL, args);
    let row = tx
        .query_one_raw(stmt)
        .await?
        .ok_or_else(|| BillingError::Internal("the batch write returned no row".into()))?;
    let mut found = [0i64; 4];
    for (slot, column) in found
        .iter_mut()
        .zip(["events", "entries", "projects", "workspaces"])
    {
        *slot = row.try_get::<i64>("", column)?;
    }
    if found != expected {
        return Err(BillingError::Internal(format!(
            "batch write changed {found:?} rows where {expected:?} were locked"
        )));
    }
    for ws in state.workspaces.values_mut().filter(|w| w.cause.is_some()) {
        ws.row.balance_sequence = sequence_after(ws)?;
    }
    Ok(())
}
