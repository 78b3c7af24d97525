//! Step 1 on SQLite: the reads every batch makes, in one statement.
//!
//! The configuration version, the workspaces, the projects, the memberships of the
//! attributed users and the request ids already used come back as one row of JSON
//! arrays built by SQLite (`json_group_array`), decoded into the entities' models. On
//! SQLite each statement is a hop to the connection's thread and back, and under load
//! each hop waits for a core: the five statements this replaces cost the single writer
//! ~2.4 ms per batch of ~31 debits (docs/BENCHMARKS.md, 2026-12-07). The rarely read
//! rows (holds being settled, prices, discounts and policies the cache does not hold)
//! keep their own statements in `load`.
//!
//! Arguments are JSON arrays (`json_each`), so the statement's text, and its cached
//! plan, are the same for every batch. Ids are stored as 16-byte blobs: they travel as
//! hex (`unhex` in, `hex` out), and every lookup stays on an index (`id IN (SELECT
//! unhex(value) …)`, the unique `(workspace_id, request_id)` keys). `BEGIN IMMEDIATE`
//! already holds the database's write lock, so nothing here needs a row lock.

use crate::error::{BillingError, Result};
use entity::{projects, reservations as reservation_rows, usage_events, workspaces};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, Statement};
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use uuid::Uuid;

const LOAD_SQL: &str = r#"
SELECT
  (SELECT version FROM config_version WHERE id = 1) AS version,
  (SELECT json_group_array(json_object('id', lower(hex(id)),
     'account_id', lower(hex(account_id)), 'name', name, 'balance_nanos', balance_nanos,
     'reserved_nanos', reserved_nanos, 'balance_sequence', balance_sequence,
     'created_at', created_at))
   FROM workspaces WHERE id IN (SELECT unhex(value) FROM json_each(?1))) AS workspaces,
  (SELECT json_group_array(json_object('id', lower(hex(id)),
     'workspace_id', lower(hex(workspace_id)), 'name', name, 'tag', tag,
     'budget_limit_nanos', budget_limit_nanos, 'budget_period', budget_period,
     'budget_period_start', budget_period_start, 'budget_spent_nanos', budget_spent_nanos,
     'budget_reserved_nanos', budget_reserved_nanos, 'created_at', created_at))
   FROM projects
   WHERE id IN (SELECT unhex(value) FROM json_each(?2))
      OR (workspace_id IN (SELECT unhex(value) FROM json_each(?1))
          AND tag IN (SELECT value FROM json_each(?3)))) AS projects,
  (SELECT json_group_array(json_array(lower(hex(account_id)), lower(hex(user_id))))
   FROM account_members
   WHERE user_id IN (SELECT unhex(value) FROM json_each(?4))
     AND account_id IN (SELECT account_id FROM workspaces
                        WHERE id IN (SELECT unhex(value) FROM json_each(?1)))) AS members,
  (SELECT json_group_array(json_object('id', lower(hex(id)),
     'workspace_id', lower(hex(workspace_id)), 'project_id', nullif(lower(hex(project_id)), ''),
     'user_id', nullif(lower(hex(user_id)), ''), 'api_key_id', nullif(lower(hex(api_key_id)), ''),
     'model_id', model_id, 'prompt_tokens', prompt_tokens,
     'completion_tokens', completion_tokens, 'cost_nanos', cost_nanos,
     'shortfall_nanos', shortfall_nanos, 'request_id', request_id, 'request_hash', request_hash,
     'reservation_id', nullif(lower(hex(reservation_id)), ''),
     'ledger_transaction_id', ledger_transaction_id, 'created_at', created_at))
   FROM usage_events
   WHERE workspace_id IN (SELECT unhex(value) FROM json_each(?1))
     AND request_id IN (SELECT value FROM json_each(?5))) AS used_usage,
  (SELECT json_group_array(json_object('id', lower(hex(id)),
     'workspace_id', lower(hex(workspace_id)), 'project_id', nullif(lower(hex(project_id)), ''),
     'user_id', nullif(lower(hex(user_id)), ''), 'api_key_id', nullif(lower(hex(api_key_id)), ''),
     'model_id', model_id, 'request_id', request_id, 'request_hash', request_hash,
     'amount_nanos', amount_nanos, 'status', status, 'expires_at', expires_at,
     'usage_event_id', nullif(lower(hex(usage_event_id)), ''), 'created_at', created_at,
     'resolved_at', resolved_at))
   FROM reservations
   WHERE workspace_id IN (SELECT unhex(value) FROM json_each(?1))
     AND request_id IN (SELECT value FROM json_each(?6))) AS used_reserve
"#;

/// What the statement is asked for.
pub(super) struct Ask<'a> {
    pub workspaces: &'a BTreeSet<Uuid>,
    pub projects: &'a BTreeSet<Uuid>,
    pub tags: &'a BTreeSet<&'a str>,
    pub users: &'a BTreeSet<Uuid>,
    pub usage_keys: &'a BTreeSet<&'a str>,
    pub reserve_keys: &'a BTreeSet<&'a str>,
}

/// What it read.
pub(super) struct Read {
    pub version: i64,
    pub workspaces: Vec<workspaces::Model>,
    pub projects: Vec<projects::Model>,
    /// (account, user) pairs.
    pub members: Vec<(Uuid, Uuid)>,
    pub used_usage: Vec<usage_events::Model>,
    pub used_reserve: Vec<reservation_rows::Model>,
}

fn hex_ids(ids: &BTreeSet<Uuid>) -> String {
    let hex: Vec<String> = ids.iter().map(|id| id.simple().to_string()).collect();
    serde_json::Value::from(hex).to_string()
}

fn texts(values: &BTreeSet<&str>) -> String {
    serde_json::Value::from(values.iter().copied().collect::<Vec<&str>>()).to_string()
}

fn decode<T: DeserializeOwned>(row: &sea_orm::QueryResult, column: &str) -> Result<Vec<T>> {
    let text: String = row.try_get("", column)?;
    serde_json::from_str(&text)
        .map_err(|e| BillingError::Internal(format!("decoding the batch's {column}: {e}")))
}

/// Runs the one read statement.
pub(super) async fn read(tx: &DatabaseTransaction, ask: &Ask<'_>) -> Result<Read> {
    let args: Vec<sea_orm::Value> = vec![
        hex_ids(ask.workspaces).into(),
        hex_ids(ask.projects).into(),
        texts(ask.tags).into(),
        hex_ids(ask.users).into(),
        texts(ask.usage_keys).into(),
        texts(ask.reserve_keys).into(),
    ];
    let stmt = Statement::from_sql_and_values(DbBackend::Sqlite, LOAD_SQL, args);
    let row = tx
        .query_one_raw(stmt)
        .await?
        .ok_or_else(|| BillingError::Internal("the batch's read returned no row".into()))?;
    let version: Option<i64> = row.try_get("", "version")?;
    Ok(Read {
        version: version
            .ok_or_else(|| BillingError::Internal("config_version has no row".into()))?,
        workspaces: decode(&row, "workspaces")?,
        projects: decode(&row, "projects")?,
        members: decode(&row, "members")?,
        used_usage: decode(&row, "used_usage")?,
        used_reserve: decode(&row, "used_reserve")?,
    })
}
