//! Step 1 of a batch: read what it needs, under its locks. What the operations name
//! is gathered once ([`Named`]); PostgreSQL then reads in two statements
//! (`load_pg`), SQLite with the statements here.
//!
//! Rows are read in one global order: reservation rows by id, then workspace rows by
//! id, then project rows by id (on PostgreSQL each `FOR UPDATE`; on SQLite the
//! `BEGIN IMMEDIATE` of the batch already holds the database's write lock), so
//! batches from several processes never deadlock. Request ids already used are read
//! after the workspace locks: a batch of another process that used one of them has
//! committed (and is seen) or is still waiting behind us.

use super::Op;
use super::cache::{ConfigCache, Entries, Hits};
use super::rules::{ProjectState, State, WorkspaceState};
use crate::debits::usage::ProjectRef;
use crate::error::{BillingError, Result};
use crate::money::DiscountBps;
use entity::{
    account_members, accounts, alert_thresholds, auto_reload_settings, models, projects,
    reservations as reservation_rows, usage_events, workspaces,
};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait, QueryFilter,
    QueryOrder,
};
use std::collections::{BTreeSet, HashMap, HashSet};
use uuid::Uuid;

pub(super) fn is_postgres(c: &DatabaseTransaction) -> bool {
    c.get_database_backend() == DbBackend::Postgres
}

/// Loads every row the batch's operations name, in lock order. `locked: false`
/// (PostgreSQL only: a speculative batch, see `overlay`) reads the same rows from a
/// snapshot without locking them; SQLite's `BEGIN IMMEDIATE` has locked already.
/// Prices, discounts and policy rows come from `cache` where it holds them at the
/// configuration version this batch reads (`cache`).
pub(super) async fn load<'a>(
    tx: &DatabaseTransaction,
    ops: impl Iterator<Item = &'a Op>,
    locked: bool,
    cache: Option<&ConfigCache>,
) -> Result<State> {
    let named = Named::of(ops);
    if is_postgres(tx) {
        return super::load_pg::load(tx, &named, locked, cache).await;
    }
    let version = config_version(tx).await?;
    let hits = named.hits(cache);
    let hit = |set: &dyn Fn(&Entries) -> bool| hits.version == Some(version) && set(&hits.entries);
    let reservations = lock_reservations(tx, &named.reservations).await?;
    let mut workspace_ids = named.workspaces.clone();
    workspace_ids.extend(reservations.values().map(|r| r.workspace_id));
    let workspaces = lock_workspaces(tx, &workspace_ids).await?;
    let projects = lock_projects(tx, &named, &reservations, &workspace_ids).await?;
    let models_named: BTreeSet<&str> = named
        .models
        .iter()
        .copied()
        .filter(|m| !hit(&|e| e.models.contains_key(*m)))
        .collect();
    let models = load_models(tx, &models_named, &reservations).await?;
    let account_ids: BTreeSet<Uuid> = workspaces
        .values()
        .filter(|w| !hit(&|e| e.discounts.contains_key(&w.row.id)))
        .map(|w| w.row.account_id)
        .collect();
    let discounts = load_discounts(tx, &account_ids).await?;
    let all_accounts: BTreeSet<Uuid> = workspaces.values().map(|w| w.row.account_id).collect();
    let members = load_members(tx, &named.users, &all_accounts).await?;
    let (used_usage, used_reserve) =
        load_used_keys(tx, &named, &reservations, &workspace_ids).await?;
    let policy_ids: BTreeSet<Uuid> = workspace_ids
        .iter()
        .copied()
        .filter(|id| !hit(&|e| e.policies.contains_key(id)))
        .collect();
    let (reload_settings, thresholds) = load_policies(tx, &policy_ids).await?;
    let mut state = State {
        workspaces,
        discounts,
        models,
        projects,
        members,
        reservations,
        used_usage,
        used_reserve,
        reload_settings,
        thresholds,
    };
    super::cache::combine(cache, &mut state, hits, version);
    Ok(state)
}

/// The configuration version, in the batch's transaction (see `cache`).
async fn config_version(tx: &DatabaseTransaction) -> Result<i64> {
    let stmt = sea_orm::Statement::from_string(
        DbBackend::Sqlite,
        "SELECT version FROM config_version WHERE id = 1",
    );
    let row = tx
        .query_one_raw(stmt)
        .await?
        .ok_or_else(|| BillingError::Internal("config_version has no row".into()))?;
    Ok(row.try_get::<i64>("", "version")?)
}

/// What the batch's operations name, before anything is read (both backends' loads
/// start from it).
#[derive(Default)]
pub(super) struct Named<'a> {
    pub reservations: BTreeSet<Uuid>,
    pub workspaces: BTreeSet<Uuid>,
    pub projects: BTreeSet<Uuid>,
    pub tags: BTreeSet<&'a str>,
    pub models: BTreeSet<&'a str>,
    pub users: BTreeSet<Uuid>,
    /// Request ids of usage and holds (a hold's id may not be used by usage), with
    /// their workspace: the keys of the unique `(workspace_id, request_id)` indexes.
    pub usage_requests: BTreeSet<(Uuid, &'a str)>,
    /// Request ids of holds, with their workspace.
    pub reserve_requests: BTreeSet<(Uuid, &'a str)>,
}

impl<'a> Named<'a> {
    /// What the process's cache holds for the models and workspaces named (see
    /// `cache`): usable only if the batch reads the version it comes with.
    pub(super) fn hits(&self, cache: Option<&ConfigCache>) -> Hits {
        cache
            .map(|c| c.lookup(self.models.iter().copied(), self.workspaces.iter().copied()))
            .unwrap_or_default()
    }

    fn of(ops: impl Iterator<Item = &'a Op>) -> Self {
        let mut n = Self::default();
        for op in ops {
            let (workspace_id, project, model_id, user_id, request_id) = match op {
                Op::Usage { req, .. } => (
                    req.workspace_id,
                    &req.project,
                    &req.model_id,
                    req.user_id,
                    &req.request_id,
                ),
                Op::Reserve { req, .. } => {
                    n.reserve_requests
                        .insert((req.workspace_id, req.request_id.as_str()));
                    (
                        req.workspace_id,
                        &req.project,
                        &req.model_id,
                        req.user_id,
                        &req.request_id,
                    )
                }
                Op::Settle(s) => {
                    n.reservations.insert(s.reservation_id);
                    continue;
                }
                Op::Release { reservation_id, .. } => {
                    n.reservations.insert(*reservation_id);
                    continue;
                }
            };
            n.workspaces.insert(workspace_id);
            match project {
                ProjectRef::None => {}
                ProjectRef::Id(id) => {
                    n.projects.insert(*id);
                }
                ProjectRef::Tag(tag) => {
                    n.tags.insert(tag);
                }
            }
            n.models.insert(model_id);
            n.users.extend(user_id);
            n.usage_requests.insert((workspace_id, request_id.as_str()));
        }
        n
    }
}

/// 1. Reservation rows named by settlements and releases, locked by id.
async fn lock_reservations(
    tx: &DatabaseTransaction,
    ids: &BTreeSet<Uuid>,
) -> Result<HashMap<Uuid, reservation_rows::Model>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let q = reservation_rows::Entity::find()
        .filter(reservation_rows::Column::Id.is_in(ids.iter().copied()))
        .order_by_asc(reservation_rows::Column::Id);
    Ok(q.all(tx).await?.into_iter().map(|r| (r.id, r)).collect())
}

/// 2. Workspace rows, locked by id.
async fn lock_workspaces(
    tx: &DatabaseTransaction,
    ids: &BTreeSet<Uuid>,
) -> Result<HashMap<Uuid, WorkspaceState>> {
    let q = workspaces::Entity::find()
        .filter(workspaces::Column::Id.is_in(ids.iter().copied()))
        .order_by_asc(workspaces::Column::Id);
    Ok(q.all(tx)
        .await?
        .into_iter()
        .map(|row| (row.id, WorkspaceState::new(row)))
        .collect())
}

/// 3. Project rows (named by id or by tag, or held by a reservation), locked by id.
async fn lock_projects(
    tx: &DatabaseTransaction,
    named: &Named<'_>,
    reservations: &HashMap<Uuid, reservation_rows::Model>,
    workspace_ids: &BTreeSet<Uuid>,
) -> Result<HashMap<Uuid, ProjectState>> {
    let mut ids = named.projects.clone();
    ids.extend(reservations.values().filter_map(|r| r.project_id));
    let tags = &named.tags;
    if ids.is_empty() && tags.is_empty() {
        return Ok(HashMap::new());
    }
    let mut condition = sea_orm::Condition::any();
    if !ids.is_empty() {
        condition = condition.add(projects::Column::Id.is_in(ids));
    }
    if !tags.is_empty() {
        condition = condition.add(
            sea_orm::Condition::all()
                .add(projects::Column::WorkspaceId.is_in(workspace_ids.iter().copied()))
                .add(projects::Column::Tag.is_in(tags.iter().copied())),
        );
    }
    let q = projects::Entity::find()
        .filter(condition)
        .order_by_asc(projects::Column::Id);
    Ok(q.all(tx)
        .await?
        .into_iter()
        .map(|row| (row.id, ProjectState::new(row)))
        .collect())
}

/// 4a. Prices: read, not locked (the prices in force when the batch runs apply).
async fn load_models(
    tx: &DatabaseTransaction,
    named: &BTreeSet<&str>,
    reservations: &HashMap<Uuid, reservation_rows::Model>,
) -> Result<HashMap<String, models::Model>> {
    let mut ids = named.clone();
    ids.extend(reservations.values().map(|r| r.model_id.as_str()));
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(models::Entity::find()
        .filter(models::Column::Id.is_in(ids.iter().copied()))
        .all(tx)
        .await?
        .into_iter()
        .map(|m| (m.id.clone(), m))
        .collect())
}

/// 4b. Each account's volume discount.
async fn load_discounts(
    tx: &DatabaseTransaction,
    account_ids: &BTreeSet<Uuid>,
) -> Result<HashMap<Uuid, DiscountBps>> {
    let mut discounts = HashMap::new();
    if account_ids.is_empty() {
        return Ok(discounts);
    }
    for account in accounts::Entity::find()
        .filter(accounts::Column::Id.is_in(account_ids.iter().copied()))
        .all(tx)
        .await?
    {
        let discount = DiscountBps::new(account.volume_discount_bps)
            .map_err(|e| BillingError::Internal(e.to_string()))?;
        discounts.insert(account.id, discount);
    }
    Ok(discounts)
}

/// 4c. Which attributed users are members of the workspaces' accounts.
async fn load_members(
    tx: &DatabaseTransaction,
    user_ids: &BTreeSet<Uuid>,
    account_ids: &BTreeSet<Uuid>,
) -> Result<HashSet<(Uuid, Uuid)>> {
    if user_ids.is_empty() || account_ids.is_empty() {
        return Ok(HashSet::new());
    }
    Ok(account_members::Entity::find()
        .filter(account_members::Column::UserId.is_in(user_ids.iter().copied()))
        .filter(account_members::Column::AccountId.is_in(account_ids.iter().copied()))
        .all(tx)
        .await?
        .into_iter()
        .map(|m| (m.account_id, m.user_id))
        .collect())
}

type UsedUsage = HashMap<(Uuid, String), usage_events::Model>;
type UsedReserve = HashMap<(Uuid, String), reservation_rows::Model>;

/// 5. Request ids already used: the usage events (direct or settled) and the
///    reservations recorded under them, whole, so replays are answered from here.
async fn load_used_keys(
    tx: &DatabaseTransaction,
    named: &Named<'_>,
    reservations: &HashMap<Uuid, reservation_rows::Model>,
    workspace_ids: &BTreeSet<Uuid>,
) -> Result<(UsedUsage, UsedReserve)> {
    let mut usage_keys: BTreeSet<&str> = named.usage_requests.iter().map(|(_, k)| *k).collect();
    usage_keys.extend(reservations.values().map(|r| r.request_id.as_str()));
    let reserve_keys: BTreeSet<&str> = named.reserve_requests.iter().map(|(_, k)| *k).collect();
    let mut used_usage = HashMap::new();
    if !usage_keys.is_empty() && !workspace_ids.is_empty() {
        for e in usage_events::Entity::find()
            .filter(usage_events::Column::WorkspaceId.is_in(workspace_ids.iter().copied()))
            .filter(usage_events::Column::RequestId.is_in(usage_keys.iter().copied()))
            .all(tx)
            .await?
        {
            used_usage.insert((e.workspace_id, e.request_id.clone()), e);
        }
    }
    let mut used_reserve = HashMap::new();
    if !reserve_keys.is_empty() && !workspace_ids.is_empty() {
        for r in reservation_rows::Entity::find()
            .filter(reservation_rows::Column::WorkspaceId.is_in(workspace_ids.iter().copied()))
            .filter(reservation_rows::Column::RequestId.is_in(reserve_keys.iter().copied()))
            .all(tx)
            .await?
        {
            used_reserve.insert((r.workspace_id, r.request_id.clone()), r);
        }
    }
    Ok((used_usage, used_reserve))
}

type ReloadSettings = HashMap<Uuid, auto_reload_settings::Model>;
type Thresholds = HashMap<Uuid, Vec<alert_thresholds::Model>>;

/// 6. The balance-change policies' rows: each workspace's auto-reload settings and
///    its alert thresholds, highest first (two statements per batch, not two per
///    workspace changed).
async fn load_policies(
    tx: &DatabaseTransaction,
    workspace_ids: &BTreeSet<Uuid>,
) -> Result<(ReloadSettings, Thresholds)> {
    if workspace_ids.is_empty() {
        return Ok((HashMap::new(), HashMap::new()));
    }
    let ids = || workspace_ids.iter().copied();
    let settings = auto_reload_settings::Entity::find()
        .filter(auto_reload_settings::Column::WorkspaceId.is_in(ids()))
        .all(tx)
        .await?
        .into_iter()
        .map(|s| (s.workspace_id, s))
        .collect();
    let mut thresholds: Thresholds = HashMap::new();
    for t in alert_thresholds::Entity::find()
        .filter(alert_thresholds::Column::WorkspaceId.is_in(ids()))
        .order_by_desc(alert_thresholds::Column::AmountNanos)
        .all(tx)
        .await?
    {
        thresholds.entry(t.workspace_id).or_default().push(t);
    }
    Ok((settings, thresholds))
}
