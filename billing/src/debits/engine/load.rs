//! Step 1 of a batch: read what it needs, under its locks. What the operations name
//! is gathered once ([`Named`]); PostgreSQL then reads in one statement (`load_pg`),
//! SQLite in one statement for what every batch reads (`load_sqlite`) and one each
//! for what is rarely needed (holds being settled, and prices, discounts and policy
//! rows when the process's cache does not hold them).
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
    accounts, alert_thresholds, auto_reload_settings, models, reservations as reservation_rows,
};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait, QueryFilter,
    QueryOrder,
};
use std::collections::{BTreeSet, HashMap};
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
    let hits = named.hits(cache);
    let reservations = lock_reservations(tx, &named.reservations).await?;
    let read = read_sqlite(tx, &named, &reservations).await?;
    let version = read.version;
    let hit = |set: &dyn Fn(&Entries) -> bool| hits.version == Some(version) && set(&hits.entries);
    let workspaces: HashMap<Uuid, WorkspaceState> = read
        .workspaces
        .into_iter()
        .map(|row| (row.id, WorkspaceState::new(row)))
        .collect();
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
    let mut workspace_ids = named.workspaces.clone();
    workspace_ids.extend(reservations.values().map(|r| r.workspace_id));
    let policy_ids: BTreeSet<Uuid> = workspace_ids
        .into_iter()
        .filter(|id| !hit(&|e| e.policies.contains_key(id)))
        .collect();
    let (reload_settings, thresholds) = load_policies(tx, &policy_ids).await?;
    let mut state = State {
        workspaces,
        discounts,
        models,
        projects: read
            .projects
            .into_iter()
            .map(|row| (row.id, ProjectState::new(row)))
            .collect(),
        members: read.members.into_iter().collect(),
        reservations,
        used_usage: by_request(read.used_usage, |e| (e.workspace_id, &e.request_id)),
        used_reserve: by_request(read.used_reserve, |r| (r.workspace_id, &r.request_id)),
        reload_settings,
        thresholds,
    };
    super::cache::combine(cache, &mut state, hits, version);
    Ok(state)
}

/// Rows recorded under a request id, keyed as `State` holds them: (workspace, request id).
pub(super) fn by_request<T>(
    rows: Vec<T>,
    key: impl Fn(&T) -> (Uuid, &String),
) -> HashMap<(Uuid, String), T> {
    rows.into_iter()
        .map(|row| {
            let (workspace_id, request_id) = key(&row);
            ((workspace_id, request_id.clone()), row)
        })
        .collect()
}

/// SQLite's one read of what every batch needs (`load_sqlite`): the workspaces named by
/// the operations or by the holds they settle, their projects (by id or tag), the
/// attributed users' memberships, and the request ids already used.
async fn read_sqlite(
    tx: &DatabaseTransaction,
    named: &Named<'_>,
    reservations: &HashMap<Uuid, reservation_rows::Model>,
) -> Result<super::load_sqlite::Read> {
    let mut workspaces = named.workspaces.clone();
    workspaces.extend(reservations.values().map(|r| r.workspace_id));
    let mut projects = named.projects.clone();
    projects.extend(reservations.values().filter_map(|r| r.project_id));
    let mut usage_keys: BTreeSet<&str> = named.usage_requests.iter().map(|(_, k)| *k).collect();
    usage_keys.extend(reservations.values().map(|r| r.request_id.as_str()));
    let reserve_keys: BTreeSet<&str> = named.reserve_requests.iter().map(|(_, k)| *k).collect();
    let ask = super::load_sqlite::Ask {
        workspaces: &workspaces,
        projects: &projects,
        tags: &named.tags,
        users: &named.users,
        usage_keys: &usage_keys,
        reserve_keys: &reserve_keys,
    };
    super::load_sqlite::read(tx, &ask).await
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
