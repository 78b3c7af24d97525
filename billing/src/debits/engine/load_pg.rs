//! Step 1 on PostgreSQL: the batch's reads in one statement.
//!
//! The locks come first, in CTEs evaluated in the global lock order (reservation rows,
//! then workspace rows, then project rows, each `ORDER BY id FOR UPDATE`; the output
//! object is built in that order, so each CTE is materialized, and its rows locked,
//! before the next); then, in the same statement, everything else the batch needs:
//! prices, discounts, memberships, request ids already used and the policy rows (the
//! prices, discounts and policy rows only where the process's `cache` does not already
//! hold them at the configuration version the statement reads: `$11`..`$14`). The
//! result is one JSON document; the arguments are typed arrays (`uuid[]`, `text[]`)
//! bound in binary, one plan for every batch size, `= ANY(...)` so the planner uses
//! the indexes. The request ids already used are probed key by key on the unique
//! `(workspace_id, request_id)` indexes (a LATERAL lookup per key): a filter over the
//! workspace's events instead would read every event of the workspace, and which of
//! the two the planner picks must not depend on fresh statistics.
//!
//! One statement means one snapshot, taken before the locks were granted. The locked
//! rows are read at their latest committed version (PostgreSQL re-reads a row it
//! waited for), so balances, budgets and holds are exact. What else is read may be
//! older than a batch of another process that committed while this one waited for
//! the workspace lock. Of that, only the request ids already used matter for money,
//! and the unique keys on `(workspace_id, request_id)` guard them: a request id that
//! batch used makes this batch's INSERT fail, the batch fails as a whole and every
//! operation is re-run alone, in a new statement that sees the committed row and
//! answers the replay (`engine::run_one`). The policy rows are changed only by
//! conditional UPDATEs (an alert fires only if still armed, a reload starts only from
//! IDLE), which see the latest version.

use super::cache::ConfigCache;
use super::load::Named;
use super::rules::{ProjectState, State, WorkspaceState};
use crate::error::{BillingError, Result};
use crate::money::DiscountBps;
use entity::{
    alert_thresholds, auto_reload_settings, models, projects, reservations as reservation_rows,
    usage_events, workspaces,
};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, Statement};
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use uuid::Uuid;

const LOAD_SQL: &str = r#"
WITH r AS (
  SELECT * FROM reservations WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE),
w AS (
  SELECT * FROM workspaces
  WHERE id = ANY($2::uuid[]) OR id = ANY(ARRAY(SELECT workspace_id FROM r))
  ORDER BY id FOR UPDATE),
p AS (
  SELECT * FROM projects
  WHERE id = ANY($3::uuid[]) OR id = ANY(ARRAY(SELECT project_id FROM r))
     OR (workspace_id = ANY(ARRAY(SELECT id FROM w)) AND tag = ANY($4::text[]))
  ORDER BY id FOR UPDATE),
cv AS (SELECT version FROM config_version WHERE id = 1)
SELECT json_build_object(
  'version', (SELECT version FROM cv),
  'reservations', (SELECT coalesce(json_agg(r), '[]'::json) FROM r),
  'workspaces', (SELECT coalesce(json_agg(w), '[]'::json) FROM w),
  'projects', (SELECT coalesce(json_agg(p), '[]'::json) FROM p),
  'models', (SELECT coalesce(json_agg(m), '[]'::json) FROM models m
    WHERE (m.id = ANY($5::text[]) OR m.id IN (SELECT model_id FROM r))
      AND NOT (m.id = ANY($12::text[]) AND (SELECT version FROM cv) = $11)),
  'accounts', (SELECT coalesce(json_agg(json_build_object('id', a.id,
      'volume_discount_bps', a.volume_discount_bps)), '[]'::json) FROM accounts a
    WHERE a.id = ANY(ARRAY(SELECT account_id FROM w
      WHERE NOT (w.id = ANY($13::uuid[]) AND (SELECT version FROM cv) = $11)))),
  'members', (SELECT coalesce(json_agg(json_build_object('account_id', m.account_id,
      'user_id', m.user_id)), '[]'::json) FROM account_members m
    WHERE m.account_id = ANY(ARRAY(SELECT account_id FROM w)) AND m.user_id = ANY($6::uuid[])),
  'used_usage', (SELECT coalesce(json_agg(e), '[]'::json)
    FROM (SELECT * FROM unnest($7::uuid[], $8::text[]) AS k(workspace_id, request_id)
          UNION SELECT workspace_id, request_id::text FROM r) k
    CROSS JOIN LATERAL (SELECT * FROM usage_events e
      WHERE e.workspace_id = k.workspace_id AND e.request_id = k.request_id) e),
  'used_reserve', (SELECT coalesce(json_agg(x), '[]'::json)
    FROM unnest($9::uuid[], $10::text[]) AS k(workspace_id, request_id)
    CROSS JOIN LATERAL (SELECT * FROM reservations x
      WHERE x.workspace_id = k.workspace_id AND x.request_id = k.request_id) x),
  'settings', (SELECT coalesce(json_agg(s), '[]'::json) FROM auto_reload_settings s
    WHERE s.workspace_id = ANY(ARRAY(SELECT id FROM w
      WHERE NOT (w.id = ANY($14::uuid[]) AND (SELECT version FROM cv) = $11)))),
  'thresholds', (SELECT coalesce(json_agg(t ORDER BY t.amount_nanos DESC), '[]'::json)
    FROM alert_thresholds t WHERE t.workspace_id = ANY(ARRAY(SELECT id FROM w
      WHERE NOT (w.id = ANY($14::uuid[]) AND (SELECT version FROM cv) = $11))))
)::text AS doc
"#;

#[derive(Deserialize)]
struct AccountDiscount {
    id: Uuid,
    volume_discount_bps: i32,
}

#[derive(Deserialize)]
struct Member {
    account_id: Uuid,
    user_id: Uuid,
}

#[derive(Deserialize)]
struct Read {
    version: i64,
    reservations: Vec<reservation_rows::Model>,
    workspaces: Vec<workspaces::Model>,
    projects: Vec<projects::Model>,
    models: Vec<models::Model>,
    accounts: Vec<AccountDiscount>,
    members: Vec<Member>,
    used_usage: Vec<usage_events::Model>,
    used_reserve: Vec<reservation_rows::Model>,
    settings: Vec<auto_reload_settings::Model>,
    thresholds: Vec<alert_thresholds::Model>,
}

fn decode<T: serde::de::DeserializeOwned>(doc: &str) -> Result<T> {
    serde_json::from_str(doc).map_err(|e| BillingError::Internal(format!("batch read: {e}")))
}

fn uuids(ids: &BTreeSet<Uuid>) -> sea_orm::Value {
    ids.iter().copied().collect::<Vec<Uuid>>().into()
}

fn texts(values: &BTreeSet<&str>) -> sea_orm::Value {
    values
        .iter()
        .map(|v| (*v).to_owned())
        .collect::<Vec<String>>()
        .into()
}

/// The workspace ids of (workspace, request id) keys, in the keys' order.
fn uuids_of(keys: &BTreeSet<(Uuid, &str)>) -> sea_orm::Value {
    keys.iter().map(|(id, _)| *id).collect::<Vec<Uuid>>().into()
}

/// The request ids of (workspace, request id) keys, in the keys' order.
fn texts_of(keys: &BTreeSet<(Uuid, &str)>) -> sea_orm::Value {
    keys.iter()
        .map(|(_, key)| (*key).to_owned())
        .collect::<Vec<String>>()
        .into()
}

/// [`LOAD_SQL`] without its locks, for a batch that runs speculatively on the
/// previous batch's overlay (`overlay`): the same reads from one snapshot.
static LOAD_SQL_UNLOCKED: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| LOAD_SQL.replace(" FOR UPDATE", ""));

/// The batch's reads; `locked` takes the row locks in the global order.
pub(super) async fn load(
    tx: &DatabaseTransaction,
    named: &Named<'_>,
    locked: bool,
    cache: Option<&ConfigCache>,
) -> Result<State> {
    let hits = named.hits(cache);
    let cached_ids = |ids: Vec<Uuid>| -> sea_orm::Value { ids.into() };
    let args = [
        uuids(&named.reservations),
        uuids(&named.workspaces),
        uuids(&named.projects),
        texts(&named.tags),
        texts(&named.models),
        uuids(&named.users),
        uuids_of(&named.usage_requests),
        texts_of(&named.usage_requests),
        uuids_of(&named.reserve_requests),
        texts_of(&named.reserve_requests),
        // The cache's version (never a real one when empty) and what it holds.
        hits.version.unwrap_or(-1).into(),
        hits.entries
            .models
            .keys()
            .cloned()
            .collect::<Vec<String>>()
            .into(),
        cached_ids(hits.entries.discounts.keys().copied().collect()),
        cached_ids(hits.entries.policies.keys().copied().collect()),
    ];
    let sql = if locked {
        LOAD_SQL
    } else {
        LOAD_SQL_UNLOCKED.as_str()
    };
    let stmt = Statement::from_sql_and_values(DbBackend::Postgres, sql, args);
    let row = tx
        .query_one_raw(stmt)
        .await?
        .ok_or_else(|| BillingError::Internal("the batch read returned no row".into()))?;
    let read: Read = decode(&row.try_get::<String>("", "doc")?)?;
    let version = read.version;
    let mut state = state(read)?;
    super::cache::combine(cache, &mut state, hits, version);
    Ok(state)
}

fn state(read: Read) -> Result<State> {
    let (workspaces, projects) = (read.workspaces, read.projects);
    let reservations: HashMap<Uuid, reservation_rows::Model> =
        read.reservations.into_iter().map(|r| (r.id, r)).collect();
    let mut discounts = HashMap::new();
    for a in read.accounts {
        let discount = DiscountBps::new(a.volume_discount_bps)
            .map_err(|e| BillingError::Internal(e.to_string()))?;
        discounts.insert(a.id, discount);
    }
    let mut thresholds: HashMap<Uuid, Vec<alert_thresholds::Model>> = HashMap::new();
    for t in read.thresholds {
        thresholds.entry(t.workspace_id).or_default().push(t);
    }
    Ok(State {
        workspaces: workspaces
            .into_iter()
            .map(|w| (w.id, WorkspaceState::new(w)))
            .collect(),
        discounts,
        models: read.models.into_iter().map(|m| (m.id.clone(), m)).collect(),
        projects: projects
            .into_iter()
            .map(|p| (p.id, ProjectState::new(p)))
            .collect(),
        members: read
            .members
            .into_iter()
            .map(|m| (m.account_id, m.user_id))
            .collect(),
        reservations,
        used_usage: super::load::by_request(read.used_usage, |e| (e.workspace_id, &e.request_id)),
        used_reserve: super::load::by_request(read.used_reserve, |r| {
            (r.workspace_id, &r.request_id)
        }),
        reload_settings: read
            .settings
            .into_iter()
            .map(|s| (s.workspace_id, s))
            .collect(),
        thresholds,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_unlocked_read_is_the_locked_one_without_its_three_locks() {
        assert_eq!(super::LOAD_SQL.matches("FOR UPDATE").count(), 3);
        assert!(!super::LOAD_SQL_UNLOCKED.contains("FOR UPDATE"));
        assert_eq!(
            super::LOAD_SQL_UNLOCKED.len() + 3 * " FOR UPDATE".len(),
            super::LOAD_SQL.len()
        );
    }
}
