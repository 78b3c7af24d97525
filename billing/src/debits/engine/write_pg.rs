//! Step 3 on PostgreSQL: the batch's money rows in one statement.
//!
//! Usage events, ledger transactions and their entries, both daily rollups, the
//! project and workspace counters and the balance events go in as typed arrays, one
//! per column (`$1`..`$63`), unpacked by `unnest` in data-modifying CTEs, with
//! `pg_notify` in the same statement. One plan whatever the batch size, one round trip
//! instead of a dozen, and every value bound in binary: a `uuid[]` or `int8[]`
//! argument reaches the executor without a text parser (the JSON document this
//! replaced sent every field through `uuid_in`, `int8in`, `timestamptz_in`, and cost
//! the server a document to build). The UPDATEs stay conditional on what the batch
//! locked; the counts they return are checked, so a row that moved under its lock
//! fails the batch. Foreign keys are checked at the end of the statement, so rows of
//! one CTE may reference rows of another. The projects' UPDATE reads the workspaces'
//! first, so a pipelined batch, whose locks are taken here rather than by its read,
//! takes them in the global order too (workspaces, then projects).
//!
//! Array elements cannot be NULL through the driver's array binds, so optional
//! columns travel with a sentinel that no row can hold and `NULLIF` turns back into
//! NULL: the nil UUID (ids are v7/v4, never nil), the empty string (a system account
//! is never empty) and `i64::MIN` (a balance is never negative: CHECK constraint).

#![deny(clippy::arithmetic_side_effects)]

use super::posting::Posting;
use super::rules::{State, WorkspaceState};
use crate::error::{BillingError, Result};
use crate::ledger::{self, BALANCE_EVENTS_CHANNEL};
use chrono::{DateTime, NaiveDate, Utc};
use entity::{ledger_entries, usage_events};
use sea_orm::ActiveValue;
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, Statement};
use std::collections::HashMap;
use uuid::Uuid;

const WRITE_SQL: &str = r#"
WITH tx AS (
  INSERT INTO ledger_transactions (kind, idempotency_key, usage_event_id, created_at)
  SELECT 'USAGE', x.idempotency_key,
    NULLIF(x.usage_event_id, '00000000-0000-0000-0000-000000000000'), x.created_at
  FROM unnest($1::text[], $2::uuid[], $3::timestamptz[])
    AS x(idempotency_key, usage_event_id, created_at)
  RETURNING id, idempotency_key),
ev AS (
  INSERT INTO usage_events (id, workspace_id, project_id, user_id, api_key_id, model_id,
    prompt_tokens, completion_tokens, cost_nanos, shortfall_nanos, request_id, request_hash,
    reservation_id, created_at, ledger_transaction_id)
  SELECT x.id, x.workspace_id, NULLIF(x.project_id, '00000000-0000-0000-0000-000000000000'),
    NULLIF(x.user_id, '00000000-0000-0000-0000-000000000000'),
    NULLIF(x.api_key_id, '00000000-0000-0000-0000-000000000000'), x.model_id,
    x.prompt_tokens, x.completion_tokens, x.cost_nanos, x.shortfall_nanos, x.request_id,
    x.request_hash, NULLIF(x.reservation_id, '00000000-0000-0000-0000-000000000000'),
    x.created_at, tx.id
  FROM unnest($4::uuid[], $5::uuid[], $6::uuid[], $7::uuid[], $8::uuid[], $9::text[],
    $10::int8[], $11::int8[], $12::int8[], $13::int8[], $14::text[], $15::text[], $16::uuid[],
    $17::timestamptz[], $18::text[]) AS x(id, workspace_id, project_id, user_id, api_key_id,
    model_id, prompt_tokens, completion_tokens, cost_nanos, shortfall_nanos, request_id,
    request_hash, reservation_id, created_at, ledger_key)
  JOIN tx ON tx.idempotency_key = x.ledger_key
  RETURNING 1),
en AS (
  INSERT INTO ledger_entries (transaction_id, workspace_id, system_account, kind,
    amount_nanos, balance_after_nanos, description, created_at)
  SELECT tx.id, NULLIF(x.workspace_id, '00000000-0000-0000-0000-000000000000'),
    NULLIF(x.system_account, ''), x.kind, x.amount_nanos,
    NULLIF(x.balance_after_nanos, -9223372036854775808), x.description, x.created_at
  FROM unnest($19::text[], $20::uuid[], $21::text[], $22::text[], $23::int8[], $24::int8[],
    $25::text[], $26::timestamptz[]) AS x(ledger_key, workspace_id, system_account,
    kind, amount_nanos, balance_after_nanos, description, created_at)
  JOIN tx ON tx.idempotency_key = x.ledger_key
  RETURNING 1),
daily AS (
  INSERT INTO usage_daily AS d (workspace_id, day, project_id, user_id, api_key_id, model_id,
    requests, prompt_tokens, completion_tokens, cost_nanos)
  SELECT * FROM unnest($27::uuid[], $28::date[], $29::uuid[], $30::uuid[], $31::uuid[],
    $32::text[], $33::int8[], $34::int8[], $35::int8[], $36::int8[])
  ON CONFLICT (workspace_id, day, project_id, user_id, api_key_id, model_id) DO UPDATE SET
    requests = d.requests + EXCLUDED.requests,
    prompt_tokens = d.prompt_tokens + EXCLUDED.prompt_tokens,
    completion_tokens = d.completion_tokens + EXCLUDED.completion_tokens,
    cost_nanos = d.cost_nanos + EXCLUDED.cost_nanos
  RETURNING 1),
daily_by AS (
  INSERT INTO usage_daily_by AS d (workspace_id, dimension, day, dim_uuid, dim_model,
    requests, prompt_tokens, completion_tokens, cost_nanos)
  SELECT * FROM unnest($37::uuid[], $38::text[], $39::date[], $40::uuid[], $41::text[],
    $42::int8[], $43::int8[], $44::int8[], $45::int8[])
  ON CONFLICT (workspace_id, dimension, day, dim_uuid, dim_model) DO UPDATE SET
    requests = d.requests + EXCLUDED.requests,
    prompt_tokens = d.prompt_tokens + EXCLUDED.prompt_tokens,
    completion_tokens = d.completion_tokens + EXCLUDED.completion_tokens,
    cost_nanos = d.cost_nanos + EXCLUDED.cost_nanos
  RETURNING 1),
ws AS (
  UPDATE workspaces AS w SET balance_nanos = w.balance_nanos + x.balance_delta,
    reserved_nanos = w.reserved_nanos + x.reserved_delta, balance_sequence = x.sequence_after
  FROM unnest($53::uuid[], $54::int8[], $55::int8[], $56::int8[], $57::int8[])
    AS x(id, balance_delta, reserved_delta, sequence_before, sequence_after)
  WHERE w.id = x.id AND w.balance_sequence = x.sequence_before
  RETURNING 1),
pr AS (
  UPDATE projects AS p SET budget_spent_nanos = x.spent_after,
    budget_reserved_nanos = x.reserved_after, budget_period_start = x.period_start_after
  FROM unnest($46::uuid[], $47::int8[], $48::int8[], $49::timestamptz[], $50::int8[],
    $51::int8[], $52::timestamptz[]) AS x(id, spent_before, reserved_before,
    period_start_before, spent_after, reserved_after, period_start_after)
    CROSS JOIN (SELECT count(*) FROM ws) AS workspaces_first
  WHERE p.id = x.id AND p.budget_spent_nanos = x.spent_before
    AND p.budget_reserved_nanos = x.reserved_before
    AND p.budget_period_start = x.period_start_before
  RETURNING 1),
be AS (
  INSERT INTO balance_events (workspace_id, sequence, balance_nanos, reserved_nanos, cause,
    created_at)
  SELECT * FROM unnest($58::uuid[], $59::int8[], $60::int8[], $61::int8[], $62::text[],
    $63::timestamptz[])
  RETURNING 1)
SELECT (SELECT count(*) FROM ev) AS events, (SELECT count(*) FROM en) AS entries,
  (SELECT count(*) FROM pr) AS projects, (SELECT count(*) FROM ws) AS workspaces,
  (SELECT count(*) FROM be) AS balance_events,
  CASE WHEN (SELECT count(*) FROM be) > 0 THEN pg_notify($64, '') END::text AS notified,
  (SELECT COALESCE(array_agg(id ORDER BY idempotency_key), '{}') FROM tx) AS posted_ids,
  (SELECT COALESCE(array_agg(idempotency_key ORDER BY idempotency_key), '{}') FROM tx)
    AS posted_keys
"#;

/// The statement's arguments, column by column in parameter order.
#[derive(Default)]
struct Args(Vec<sea_orm::Value>);

impl Args {
    fn col<T>(&mut self, values: Vec<T>) -> &mut Self
    where
        Vec<T>: Into<sea_orm::Value>,
    {
        self.0.push(values.into());
        self
    }
}

/// The nil UUID for "none" (see the module docs).
fn or_nil(id: Option<Uuid>) -> Uuid {
    id.unwrap_or(Uuid::nil())
}

fn set<T: Clone + Into<sea_orm::Value>>(v: &ActiveValue<T>) -> Option<T> {
    match v {
        ActiveValue::Set(x) | ActiveValue::Unchanged(x) => Some(x.clone()),
        ActiveValue::NotSet => None,
    }
}

/// `ledger_transactions`: `$1`..`$3`, one per (batch, workspace) (see `posting`).
fn transaction_columns(args: &mut Args, postings: &[Posting]) {
    args.col(
        postings
            .iter()
            .map(Posting::idempotency_key)
            .collect::<Vec<_>>(),
    )
    .col(
        postings
            .iter()
            .map(|p| or_nil(p.usage_event_id()))
            .collect::<Vec<_>>(),
    )
    .col(postings.iter().map(|p| p.now).collect::<Vec<_>>());
}

/// `usage_events`: `$4`..`$18`; the last is the key of the transaction that posts
/// the event, which the statement turns into its `ledger_transaction_id`.
fn event_columns(args: &mut Args, events: &[usage_events::Model], keys: &HashMap<Uuid, String>) {
    let each = |f: fn(&usage_events::Model) -> Uuid| events.iter().map(f).collect::<Vec<_>>();
    let ints = |f: fn(&usage_events::Model) -> i64| events.iter().map(f).collect::<Vec<_>>();
    let texts =
        |f: fn(&usage_events::Model) -> &str| events.iter().map(|e| f(e).to_owned()).collect();
    args.col(each(|e| e.id))
        .col(each(|e| e.workspace_id))
        .col(each(|e| or_nil(e.project_id)))
        .col(each(|e| or_nil(e.user_id)))
        .col(each(|e| or_nil(e.api_key_id)))
        .col::<String>(texts(|e| &e.model_id))
        .col(ints(|e| e.prompt_tokens))
        .col(ints(|e| e.completion_tokens))
        .col(ints(|e| e.cost_nanos))
        .col(ints(|e| e.shortfall_nanos))
        .col::<String>(texts(|e| &e.request_id))
        .col::<String>(texts(|e| &e.request_hash))
        .col(each(|e| or_nil(e.reservation_id)))
        .col(events.iter().map(|e| e.created_at).collect::<Vec<_>>())
        // An event without a posting gets the empty key, which joins no
        // transaction: the statement then inserts fewer events than it was given,
        // and the count check fails the batch.
        .col(
            events
                .iter()
                .map(|e| keys.get(&e.id).cloned().unwrap_or_default())
                .collect::<Vec<_>>(),
        );
}

/// `ledger_entries`: `$19`..`$26`, each with its transaction's key. Returns how many.
fn entry_columns(args: &mut Args, postings: &[Posting]) -> Result<usize> {
    let mut entries: Vec<(String, ledger_entries::ActiveModel)> = Vec::new();
    for p in postings {
        let key = p.idempotency_key();
        entries.extend(p.entries()?.into_iter().map(|e| (key.clone(), e)));
    }
    // The columns below fall back to a default only for optional values: an entry
    // without its kind, amount, description or time fails the batch, as a NULL in a
    // NOT NULL column would.
    let complete = |e: &ledger_entries::ActiveModel| {
        e.kind.is_set()
            && e.amount_nanos.is_set()
            && e.description.is_set()
            && e.created_at.is_set()
    };
    if !entries.iter().all(|(_, e)| complete(e)) {
        return Err(BillingError::Internal(
            "a usage ledger entry without its kind, amount, description or time".into(),
        ));
    }
    let col = |f: &dyn Fn(&ledger_entries::ActiveModel) -> Option<String>| -> Vec<String> {
        entries
            .iter()
            .map(|(_, e)| f(e).unwrap_or_default())
            .collect()
    };
    let (system, kind, description) = (
        col(&|e| set(&e.system_account).flatten()),
        col(&|e| set(&e.kind).map(|k| k.as_str().to_owned())),
        col(&|e| set(&e.description)),
    );
    args.col(entries.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())
        .col(
            entries
                .iter()
                .map(|(_, e)| or_nil(set(&e.workspace_id).flatten()))
                .collect::<Vec<_>>(),
        )
        .col(system)
        .col(kind)
        .col(
            entries
                .iter()
                .map(|(_, e)| set(&e.amount_nanos).unwrap_or_default())
                .collect::<Vec<_>>(),
        )
        .col(
            entries
                .iter()
                .map(|(_, e)| set(&e.balance_after_nanos).flatten().unwrap_or(i64::MIN))
                .collect::<Vec<_>>(),
        )
        .col(description)
        .col(
            entries
                .iter()
                .map(|(_, e)| set(&e.created_at).unwrap_or_default())
                .collect::<Vec<_>>(),
        );
    Ok(entries.len())
}

/// `usage_daily` (`$27`..`$36`) and `usage_daily_by` (`$37`..`$45`).
fn rollup_columns(args: &mut Args, events: &[usage_events::Model]) {
    let (daily, daily_by) = ledger::rollup_rows(events);
    let uuids = |f: fn(&ledger::DailyRow) -> Uuid| daily.iter().map(f).collect::<Vec<_>>();
    args.col(uuids(|r| r.0.0))
        .col(daily.iter().map(|r| r.0.1).collect::<Vec<NaiveDate>>())
        .col(uuids(|r| r.0.2))
        .col(uuids(|r| r.0.3))
        .col(uuids(|r| r.0.4))
        .col(daily.iter().map(|r| r.0.5.clone()).collect::<Vec<_>>());
    sums(args, &daily.iter().map(|r| r.1).collect::<Vec<_>>());
    args.col(daily_by.iter().map(|r| r.0.0).collect::<Vec<_>>())
        .col(
            daily_by
                .iter()
                .map(|r| r.0.1.to_owned())
                .collect::<Vec<_>>(),
        )
        .col(daily_by.iter().map(|r| r.0.2).collect::<Vec<NaiveDate>>())
        .col(daily_by.iter().map(|r| r.0.3).collect::<Vec<_>>())
        .col(daily_by.iter().map(|r| r.0.4.clone()).collect::<Vec<_>>());
    sums(args, &daily_by.iter().map(|r| r.1).collect::<Vec<_>>());
}

/// A rollup's four sums, as four columns.
fn sums(args: &mut Args, rows: &[ledger::Sums]) {
    let col = |f: fn(&ledger::Sums) -> i64| rows.iter().map(f).collect::<Vec<_>>();
    args.col(col(|s| s.requests))
        .col(col(|s| s.prompt_tokens))
        .col(col(|s| s.completion_tokens))
        .col(col(|s| s.cost_nanos));
}

/// The changed projects (`$46`..`$52`): before (the condition) and after.
fn project_columns(args: &mut Args, state: &State) {
    let changed: Vec<_> = state
        .projects
        .values()
        .filter(|p| p.row != p.before)
        .collect();
    let ints = |f: &dyn Fn(&super::rules::ProjectState) -> i64| {
        changed.iter().map(|p| f(p)).collect::<Vec<_>>()
    };
    let times = |f: &dyn Fn(&super::rules::ProjectState) -> DateTime<Utc>| {
        changed.iter().map(|p| f(p)).collect::<Vec<_>>()
    };
    args.col(changed.iter().map(|p| p.row.id).collect::<Vec<_>>())
        .col(ints(&|p| p.before.budget_spent_nanos))
        .col(ints(&|p| p.before.budget_reserved_nanos))
        .col(times(&|p| p.before.budget_period_start))
        .col(ints(&|p| p.row.budget_spent_nanos))
        .col(ints(&|p| p.row.budget_reserved_nanos))
        .col(times(&|p| p.row.budget_period_start));
}

/// The changed workspaces (`$53`..`$57`) and their balance events (`$58`..`$63`).
fn workspace_columns(args: &mut Args, changed: &[&WorkspaceState]) -> Result<()> {
    let mut deltas = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ws in changed {
        deltas.0.push(ws.balance_delta()?);
        deltas.1.push(ws.reserved_delta()?);
        deltas.2.push(ws.before.balance_sequence);
        deltas.3.push(sequence_after(ws)?);
    }
    let ids: Vec<Uuid> = changed.iter().map(|w| w.row.id).collect();
    let sequences = deltas.3.clone();
    args.col(ids.clone())
        .col(deltas.0)
        .col(deltas.1)
        .col(deltas.2)
        .col(deltas.3);
    // Balance events stamped as late as possible: `at` is when the batch went to
    // commit, which is what a subscriber measures its delivery delay from.
    let at = Utc::now();
    let causes = changed
        .iter()
        .map(|w| w.cause.map(|c| c.as_str().to_owned()).unwrap_or_default());
    args.col(ids)
        .col(sequences)
        .col(
            changed
                .iter()
                .map(|w| w.row.balance_nanos)
                .collect::<Vec<_>>(),
        )
        .col(
            changed
                .iter()
                .map(|w| w.row.reserved_nanos)
                .collect::<Vec<_>>(),
        )
        .col(causes.collect::<Vec<_>>())
        .col(vec![at; changed.len()]);
    Ok(())
}

/// The statement's arguments and the counts it must report back.
fn arguments(
    state: &State,
    events: &[usage_events::Model],
    postings: &[Posting],
) -> Result<(Vec<sea_orm::Value>, [i64; 4])> {
    let mut args = Args::default();
    transaction_columns(&mut args, postings);
    let keys: HashMap<Uuid, String> = postings
        .iter()
        .flat_map(|p| {
            let key = p.idempotency_key();
            p.event_ids.iter().map(move |id| (*id, key.clone()))
        })
        .collect();
    event_columns(&mut args, events, &keys);
    let entries = entry_columns(&mut args, postings)?;
    rollup_columns(&mut args, events);
    project_columns(&mut args, state);
    let mut changed: Vec<&WorkspaceState> = state
        .workspaces
        .values()
        .filter(|w| w.cause.is_some())
        .collect();
    changed.sort_by_key(|w| w.row.id);
    workspace_columns(&mut args, &changed)?;
    args.0.push(BALANCE_EVENTS_CHANNEL.into());
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let projects = state
        .projects
        .values()
        .filter(|p| p.row != p.before)
        .count();
    let expected = [
        count(events.len()),
        count(entries),
        count(projects),
        count(changed.len()),
    ];
    Ok((args.0, expected))
}

pub(super) fn sequence_after(ws: &WorkspaceState) -> Result<i64> {
    ws.before
        .balance_sequence
        .checked_add(1)
        .ok_or_else(|| BillingError::Internal("balance sequence out of range".into()))
}

/// Writes the batch's money rows in one statement and moves the changed workspace
/// rows in memory to what the statement made of them. Returns each event's ledger
/// transaction id.
pub(super) async fn write_money(
    tx: &DatabaseTransaction,
    state: &mut State,
    events: &[usage_events::Model],
    postings: &[Posting],
) -> Result<HashMap<Uuid, i64>> {
    let (args, expected) = arguments(state, events, postings)?;
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
    let ids: Vec<i64> = row.try_get("", "posted_ids")?;
    let keys: Vec<String> = row.try_get("", "posted_keys")?;
    let by_key: HashMap<String, i64> = keys.into_iter().zip(ids).collect();
    super::write::event_postings(postings, &by_key)
}
