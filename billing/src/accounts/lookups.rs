//! Batched reads of accounts, people, workspaces, projects and API keys (the API's
//! DataLoaders): one statement per batch of ids, whatever its size.

use crate::batch;
use crate::error::Result;
use entity::enums::{AccountRole, WorkspaceRole};
use entity::{account_members, accounts, api_keys, projects, users, workspace_members, workspaces};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};
use std::collections::HashMap;
use uuid::Uuid;

batch::rows_by_ids!(accounts_by_ids, accounts);
batch::rows_by_ids!(users_by_ids, users);
batch::rows_by_ids!(projects_by_ids, projects);
batch::rows_by_ids!(
    /// Revoked keys included (usage keeps pointing at its key).
    api_keys_by_ids,
    api_keys
);

/// Each workspace's projects by name.
pub async fn projects_by_workspace<C: ConnectionTrait>(
    c: &C,
    workspace_ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<projects::Model>>> {
    use projects::Column as P;
    batch::grouped::<projects::Entity, _>(c, P::WorkspaceId, workspace_ids, P::Name, |r| {
        r.workspace_id
    })
    .await
}

/// Each workspace's API keys, oldest first, revoked ones included.
pub async fn api_keys_by_workspace<C: ConnectionTrait>(
    c: &C,
    workspace_ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<api_keys::Model>>> {
    use api_keys::Column as K;
    batch::grouped::<api_keys::Entity, _>(c, K::WorkspaceId, workspace_ids, K::CreatedAt, |r| {
        r.workspace_id
    })
    .await
}

/// Each workspace's members with their workspace role, in the order they joined.
pub async fn workspace_members_by_workspace<C: ConnectionTrait>(
    c: &C,
    workspace_ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<(users::Model, WorkspaceRole)>>> {
    use workspace_members::Column as M;
    let rows = workspace_members::Entity::find()
        .filter(M::WorkspaceId.is_in(workspace_ids.iter().copied()))
        .find_also_related(users::Entity)
        .order_by_asc(M::CreatedAt)
        .all(c)
        .await?;
    let rows = rows.into_iter().map(|(m, u)| (m.workspace_id, u, m.role));
    Ok(by_parent(workspace_ids, rows))
}

/// Each account's members with their account role, in the order they joined.
pub async fn account_members_by_account<C: ConnectionTrait>(
    c: &C,
    account_ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<(users::Model, AccountRole)>>> {
    let rows = account_members::Entity::find()
        .filter(account_members::Column::AccountId.is_in(account_ids.iter().copied()))
        .find_also_related(users::Entity)
        .order_by_asc(account_members::Column::CreatedAt)
        .all(c)
        .await?;
    let rows = rows.into_iter().map(|(m, u)| (m.account_id, u, m.role));
    Ok(by_parent(account_ids, rows))
}

/// Membership rows (parent, user, role) grouped by parent; every requested parent
/// gets a list. A membership whose user row is missing is left out.
fn by_parent<R>(
    parents: &[Uuid],
    rows: impl Iterator<Item = (Uuid, Option<users::Model>, R)>,
) -> HashMap<Uuid, Vec<(users::Model, R)>> {
    let mut out: HashMap<Uuid, Vec<(users::Model, R)>> =
        parents.iter().map(|p| (*p, Vec::new())).collect();
    for (parent, user, role) in rows {
        if let Some(user) = user {
            out.entry(parent).or_default().push((user, role));
        }
    }
    out
}

/// The account of each workspace; unknown workspaces are absent.
pub async fn account_ids_of_workspaces<C: ConnectionTrait>(
    c: &C,
    workspace_ids: &[Uuid],
) -> Result<HashMap<Uuid, Uuid>> {
    let rows =
        batch::by_keys::<workspaces::Entity, _, _>(c, workspaces::Column::Id, workspace_ids, |r| {
            r.id
        })
        .await?;
    Ok(rows
        .into_values()
        .map(|ws| (ws.id, ws.account_id))
        .collect())
}
