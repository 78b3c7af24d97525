//! Who may do what. Account OWNER/ADMIN are admins of every workspace of their
//! account; a workspace API key acts only on its own workspace's usage; anything in
//! another account is NOT_FOUND, never FORBIDDEN (no hint that it exists).

use crate::auth::Principal;
use crate::error::{BillingError, Result};
use entity::enums::{AccountRole, WorkspaceRole};
use entity::{account_members, workspace_members, workspaces};
use sea_orm::{ConnectionTrait, EntityTrait};
use uuid::Uuid;

/// What the caller may do in one workspace, from weakest to strongest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum WorkspaceAccess {
    /// A workspace API key: record usage, reserve, settle, read the workspace.
    ApiKey,
    Viewer,
    Member,
    Admin,
    /// The platform admin token.
    Platform,
}

/// The caller's access to a workspace, or NOT_FOUND when it has none (or the
/// workspace does not exist).
pub async fn workspace_access<C: ConnectionTrait>(
    c: &C,
    principal: &Principal,
    workspace_id: Uuid,
) -> Result<(workspaces::Model, WorkspaceAccess)> {
    let ws = workspaces::Entity::find_by_id(workspace_id)
        .one(c)
        .await?
        .ok_or(BillingError::NotFound("workspace"))?;
    let access = match principal {
        Principal::PlatformAdmin => Some(WorkspaceAccess::Platform),
        Principal::ApiKey {
            workspace_id: own, ..
        } => (*own == workspace_id).then_some(WorkspaceAccess::ApiKey),
        Principal::User { user_id, .. } => {
            let account_role = account_members::Entity::find_by_id((ws.account_id, *user_id))
                .one(c)
                .await?
                .map(|m| m.role);
            match account_role {
                Some(AccountRole::Owner | AccountRole::Admin) => Some(WorkspaceAccess::Admin),
                Some(AccountRole::Member) => {
                    workspace_members::Entity::find_by_id((workspace_id, *user_id))
                        .one(c)
                        .await?
                        .map(|m| match m.role {
                            WorkspaceRole::Admin => WorkspaceAccess::Admin,
                            WorkspaceRole::Member => WorkspaceAccess::Member,
                            WorkspaceRole::Viewer => WorkspaceAccess::Viewer,
                        })
                }
                None => None,
            }
        }
    };
    access
        .map(|a| (ws, a))
        .ok_or(BillingError::NotFound("workspace"))
}

/// Requires at least `needed` in the workspace; weaker access is FORBIDDEN (the caller
/// can see the workspace, so its existence is no secret to them).
pub async fn require_workspace<C: ConnectionTrait>(
    c: &C,
    principal: &Principal,
    workspace_id: Uuid,
    needed: WorkspaceAccess,
) -> Result<workspaces::Model> {
    let (ws, access) = workspace_access(c, principal, workspace_id).await?;
    if access < needed {
        return Err(BillingError::Forbidden(
            "this needs a stronger role in the workspace",
        ));
    }
    Ok(ws)
}

/// Usage may be recorded by the workspace's API keys and by its members and admins
/// (not viewers).
pub fn may_record_usage(access: WorkspaceAccess) -> bool {
    matches!(
        access,
        WorkspaceAccess::ApiKey
            | WorkspaceAccess::Member
            | WorkspaceAccess::Admin
            | WorkspaceAccess::Platform
    )
}

/// The accounts a caller can see: every account for the platform admin, the API key's
/// account, or the accounts the user is a member of.
pub async fn visible_accounts<C: ConnectionTrait>(
    c: &C,
    principal: &Principal,
) -> Result<Vec<entity::accounts::Model>> {
    use entity::accounts;
    use sea_orm::{ColumnTrait, QueryFilter, QueryOrder};
    let query = accounts::Entity::find().order_by_asc(accounts::Column::Name);
    let rows = match principal {
        Principal::PlatformAdmin => query.all(c).await?,
        Principal::ApiKey { workspace_id, .. } => {
            let ws = workspaces::Entity::find_by_id(*workspace_id)
                .one(c)
                .await?
                .ok_or(BillingError::NotFound("workspace"))?;
            query
                .filter(accounts::Column::Id.eq(ws.account_id))
                .all(c)
                .await?
        }
        Principal::User { user_id, .. } => {
            let ids: Vec<Uuid> = account_members::Entity::find()
                .filter(account_members::Column::UserId.eq(*user_id))
                .all(c)
                .await?
                .into_iter()
                .map(|m| m.account_id)
                .collect();
            query.filter(accounts::Column::Id.is_in(ids)).all(c).await?
        }
    };
    Ok(rows)
}
