//! Step 1 on PostgreSQL: the batch's reads in two statements instead of up to ten.
//!
//! 1. The locks: reservation rows, then workspace rows, then project rows, each
//!    `ORDER BY id FOR UPDATE` in CTEs of one statement (its output is built in that
//!    order, so every batch takes them in the global lock order), returned as JSON.
//! 2. Everything else, read after the locks are held (a new statement, so a new
//!    snapshot: a batch of another process that used one of our request ids has
//!    committed and is seen): prices, discounts, memberships, request ids already
//!    used, and the policy rows, as one JSON document.
//!
//! The arguments travel as one JSON document too (`= ANY(ARRAY(...))` over its
//! arrays, which the planner turns into index scans): one plan for every batch.

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
use serde_json::json;
use std::collections::{BTreeSet, HashMap};
use uuid::Uuid;

const LOCK_SQL: &str = r#"
WITH r AS (
  SELECT * FROM reservations
  WHERE id = ANY(ARRAY(SELECT x::uuid FROM jsonb_array_elements_text($1::jsonb->'reservations') x))
  ORDER BY id FOR UPDATE),
w AS (
  SELECT * FROM workspaces
  WHERE id = ANY(ARRAY(SELECT x::uuid FROM jsonb_array_elements_text($1::jsonb->'workspaces') x))
     OR id IN (SELECT workspace_id FROM r)
  ORDER BY id FOR UPDATE),
p AS (
  SELECT * FROM projects
  WHERE id = ANY(ARRAY(SELECT x::uuid FROM jsonb_array_elements_text($1::jsonb->'projects') x))
     OR id IN (SELECT project_id FROM r)
     OR (workspace_id IN (SELECT id FROM w)
         AND tag = ANY(ARRAY(SELECT x FROM jsonb_array_elements_text($1::jsonb->'tags') x)))
  ORDER BY id FOR UPDATE)
SELECT json_build_object(
  'reservations', (SELECT coalesce(json_agg(r), '[]'::json) FROM r),
  'workspaces', (SELECT coalesce(json_agg(w), '[]'::json) FROM w),
  'projects', (SELECT coalesce(json_agg(p), '[]'::json) FROM p))::text AS doc
"#;

const READ_SQL: &str = r#"
SELECT json_build_object(
  'models', (SELECT coalesce(json_agg(m), '[]'::json) FROM models m
    WHERE m.id = ANY(ARRAY(SELECT x FROM jsonb_array_elements_text($1::jsonb->'models') x))),
  'accounts', (SELECT coalesce(json_agg(json_build_object('id', a.id,
      'volume_discount_bps', a.volume_discount_bps)), '[]'::json) FROM accounts a
    WHERE a.id = ANY(ARRAY(SELECT x::uuid FROM jsonb_array_elements_text($1::jsonb->'accounts') x))),
  'members', (SELECT coalesce(json_agg(json_build_object('account_id', m.account_id,
      'user_id', m.user_id)), '[]'::json) FROM account_members m
    WHERE m.account_id = ANY(ARRAY(SELECT x::uuid FROM jsonb_array_elements_text($1::jsonb->'accounts') x))
      AND m.user_id = ANY(ARRAY(SELECT x::uuid FROM jsonb_array_elements_text($1::jsonb->'users') x))),
  'used_usage', (SELECT coalesce(json_agg(e), '[]'::json) FROM usage_events e
    WHERE e.workspace_id = ANY(ARRAY(SELECT x::uuid FROM jsonb_array_elements_text($1::jsonb->'workspaces') x))
      AND e.request_id = ANY(ARRAY(SELECT x FROM jsonb_array_elements_text($1::jsonb->'usage_keys') x))),
  'used_reserve', (SELECT coalesce(json_agg(r), '[]'::json) FROM reservations r
    WHERE r.workspace_id = ANY(ARRAY(SELECT x::uuid FROM jsonb_array_elements_text($1::jsonb->'workspaces') x))
      AND r.request_id = ANY(ARRAY(SELECT x FROM jsonb_array_elements_text($1::jsonb->'reserve_keys') x))),
  'settings', (SELECT coalesce(json_agg(s), '[]'::json) FROM auto_reload_settings s
    WHERE s.workspace_id = ANY(ARRAY(SELECT x::uuid FROM jsonb_array_elements_text($1::jsonb->'workspaces') x))),
  'thresholds', (SELECT coalesce(json_agg(t ORDER BY t.amount_nanos DESC), '[]'::json)
    FROM alert_thresholds t
    WHERE t.workspace_id = ANY(ARRAY(SELECT x::uuid FROM jsonb_array_elements_text($1::jsonb->'workspaces') x)))
)::text AS doc
"#;

#[derive(Deserialize)]
struct Locked {
    reservations: Vec<reservation_rows::Model>,
    workspaces: Vec<workspaces::Model>,
    projects: Vec<projects::Model>,
}

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
    models: Vec<models::Model>,
    accounts: Vec<AccountDiscount>,
    members: Vec<Member>,
    used_usage: Vec<usage_events::Model>,
    used_reserve: Vec<reservation_rows::Model>,
    settings: Vec<auto_reload_settings::Model>,
    thresholds: Vec<alert_thresholds::Model>,
}

async fn query_doc(tx: &DatabaseTransaction, sql: &str, args: serde_json::Value) -> Result<String> {
    let stmt = Statement::from_sql_and_values(DbBackend::Postgres, sql, [args.into()]);
    let row = tx
        .query_one_raw(stmt)
        .await?
        .ok_or_else(|| BillingError::Internal("a batch read returned no row".into()))?;
    Ok(row.try_get::<String>("", "doc")?)
}

fn decode<T: serde::de::DeserializeOwned>(doc: &str) -> Result<T> {
    serde_json::from_str(doc).map_err(|e| BillingError::Internal(format!("batch read: {e}")))
}

pub(super) async fn load(tx: &DatabaseTransaction, named: &Named<'_>) -> Result<State> {
    let lock_args = json!({
        "reservations": named.reservations, "workspaces": named.workspaces,
        "projects": named.projects, "tags": named.tags,
    });
    let locked: Locked = decode(&query_doc(tx, LOCK_SQL, lock_args).await?)?;
    let reservations: HashMap<Uuid, reservation_rows::Model> =
        locked.reservations.into_iter().map(|r| (r.id, r)).collect();
    let mut models = named.models.clone();
    models.extend(reservations.values().map(|r| r.model_id.as_str()));
    let mut usage_keys = named.usage_keys.clone();
    usage_keys.extend(reservations.values().map(|r| r.request_id.as_str()));
    let workspace_ids: BTreeSet<Uuid> = locked.workspaces.iter().map(|w| w.id).collect();
    let account_ids: BTreeSet<Uuid> = locked.workspaces.iter().map(|w| w.account_id).collect();
    let read_args = json!({
        "models": models, "accounts": account_ids, "users": named.users,
        "workspaces": workspace_ids, "usage_keys": usage_keys,
        "reserve_keys": named.reserve_keys,
    });
    let read: Read = decode(&query_doc(tx, READ_SQL, read_args).await?)?;
    state(locked.workspaces, locked.projects, reservations, read)
}

fn state(
    workspaces: Vec<workspaces::Model>,
    projects: Vec<projects::Model>,
    reservations: HashMap<Uuid, reservation_rows::Model>,
    read: Read,
) -> Result<State> {
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
        used_usage: read
            .used_usage
            .into_iter()
            .map(|e| ((e.workspace_id, e.request_id.clone()), e))
            .collect(),
        used_reserve: read
            .used_reserve
            .into_iter()
            .map(|r| ((r.workspace_id, r.request_id.clone()), r))
            .collect(),
        reload_settings: read
            .settings
            .into_iter()
            .map(|s| (s.workspace_id, s))
            .collect(),
        thresholds,
    })
}
