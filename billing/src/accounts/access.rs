//! Who may do what. Account OWNER/ADMIN are admins of every workspace of their
//! account; a workspace API key acts only on its own workspace's usage; anything in
//! another account is NOT_FOUND, never FORBIDDEN (no hint that it exists).

use crate::accounts::auth::Principal;
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

/// The account, when the caller may see all of it: a member (any role) or the platform
/// admin. Anyone else, a workspace API key included, gets NOT_FOUND.
pub async fn account_access<C: ConnectionTrait>(
    c: &C,
    principal: &Principal,
    account_id: Uuid,
) -> Result<(entity::accounts::Model, Option<AccountRole>)> {
    let account = entity::accounts::Entity::find_by_id(account_id)
        .one(c)
        .await?
        .ok_or(BillingError::NotFound("account"))?;
    match principal {
        Principal::PlatformAdmin => Ok((account, None)),
        Principal::User { user_id, .. } => {
            account_members::Entity::find_by_id((account_id, *user_id))
                .one(c)
                .await?
                .map(|m| (account, Some(m.role)))
                .ok_or(BillingError::NotFound("account"))
        }
        Principal::ApiKey { .. } => Err(BillingError::NotFound("account")),
    }
}

/// Requires the account's OWNER or ADMIN role, or the platform admin. A MEMBER can see
/// the account, so the refusal is FORBIDDEN; a stranger gets NOT_FOUND.
pub async fn require_account_admin<C: ConnectionTrait>(
    c: &C,
    principal: &Principal,
    account_id: Uuid,
) -> Result<entity::accounts::Model> {
    let (account, role) = account_access(c, principal, account_id).await?;
    match role {
        None | Some(AccountRole::Owner | AccountRole::Admin) => Ok(account),
        Some(AccountRole::Member) => Err(BillingError::Forbidden(
            "this needs the account's OWNER or ADMIN role",
        )),
    }
}

/// Calls reserved to the platform (creating accounts, pricing agreements, invoices
/// paid, the model catalog).
pub fn require_platform_admin(principal: &Principal) -> Result<()> {
    match principal {
        Principal::PlatformAdmin => Ok(()),
        _ => Err(BillingError::Forbidden(
            "only the platform admin token may do this",
        )),
    }
}

/// The caller's access to many workspaces at once, in three statements whatever their
/// number (dashboards resolve nested workspaces through this). Workspaces the caller
/// cannot see are absent from the map.
pub async fn workspace_access_batch<C: ConnectionTrait>(
    c: &C,
    principal: &Principal,
    workspace_ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, (workspaces::Model, WorkspaceAccess)>> {
    use sea_orm::{ColumnTrait, QueryFilter};
    use std::collections::HashMap;
    let rows = workspaces::Entity::find()
        .filter(workspaces::Column::Id.is_in(workspace_ids.iter().copied()))
        .all(c)
        .await?;
    let mut out = HashMap::new();
    match principal {
        Principal::PlatformAdmin => {
            for ws in rows {
                out.insert(ws.id, (ws, WorkspaceAccess::Platform));
            }
        }
        Principal::ApiKey { workspace_id, .. } => {
            for ws in rows.into_iter().filter(|ws| ws.id == *workspace_id) {
                out.insert(ws.id, (ws, WorkspaceAccess::ApiKey));
            }
        }
        Principal::User { user_id, .. } => {
            let account_roles: HashMap<Uuid, AccountRole> = account_members::Entity::find()
                .filter(account_members::Column::UserId.eq(*user_id))
                .all(c)
                .await?
                .into_iter()
                .map(|m| (m.account_id, m.role))
                .collect();
            let workspace_roles: HashMap<Uuid, WorkspaceRole> = workspace_members::Entity::find()
                .filter(workspace_members::Column::UserId.eq(*user_id))
                .filter(workspace_members::Column::WorkspaceId.is_in(workspace_ids.iter().copied()))
                .all(c)
                .await?
                .into_iter()
                .map(|m| (m.workspace_id, m.role))
                .collect();
            for ws in rows {
                let access = match account_roles.get(&ws.account_id) {
                    Some(AccountRole::Owner | AccountRole::Admin) => Some(WorkspaceAccess::Admin),
                    Some(AccountRole::Member) => {
                        workspace_roles.get(&ws.id).map(|role| match role {
                            WorkspaceRole::Admin => WorkspaceAccess::Admin,
                            WorkspaceRole::Member => WorkspaceAccess::Member,
                            WorkspaceRole::Viewer => WorkspaceAccess::Viewer,
                        })
                    }
                    None => None,
                };
                if let Some(access) = access {
                    out.insert(ws.id, (ws, access));
                }
            }
        }
    }
    Ok(out)
}

/// The workspaces of an account the caller can see: all of them for the platform admin
/// and the account's OWNER/ADMIN, the ones a MEMBER belongs to, none for a stranger.
pub async fn visible_workspaces<C: ConnectionTrait>(
    c: &C,
    principal: &Principal,
    account_ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, Vec<workspaces::Model>>> {
    use sea_orm::{ColumnTrait, QueryFilter, QueryOrder};
    let all = workspaces::Entity::find()
        .filter(workspaces::Column::AccountId.is_in(account_ids.iter().copied()))
        .order_by_asc(workspaces::Column::Name)
        .all(c)
        .await?;
    let ids: Vec<Uuid> = all.iter().map(|w| w.id).collect();
    let visible = workspace_access_batch(c, principal, &ids).await?;
    let mut out: std::collections::HashMap<Uuid, Vec<workspaces::Model>> =
        account_ids.iter().map(|id| (*id, Vec::new())).collect();
    for ws in all.into_iter().filter(|w| visible.contains_key(&w.id)) {
        out.entry(ws.account_id).or_default().push(ws);
    }
    Ok(out)
}

/// Who may mint a token for a user: the user themself, an OWNER/ADMIN of an account the
/// user belongs to, or the platform admin. Anyone else gets NOT_FOUND.
pub async fn require_user_manager<C: ConnectionTrait>(
    c: &C,
    principal: &Principal,
    target_user_id: Uuid,
) -> Result<()> {
    use sea_orm::{ColumnTrait, QueryFilter};
    match principal {
        Principal::PlatformAdmin => return Ok(()),
        Principal::ApiKey { .. } => return Err(BillingError::NotFound("user")),
        Principal::User { user_id, .. } if *user_id == target_user_id => return Ok(()),
        Principal::User { .. } => {}
    }
    let Principal::User { user_id, .. } = principal else {
        return Err(BillingError::NotFound("user"));
    };
    let target_accounts: Vec<Uuid> = account_members::Entity::find()
        .filter(account_members::Column::UserId.eq(target_user_id))
        .all(c)
        .await?
        .into_iter()
        .map(|m| m.account_id)
        .collect();
    let managing = account_members::Entity::find()
        .filter(account_members::Column::UserId.eq(*user_id))
        .filter(account_members::Column::AccountId.is_in(target_accounts))
        .all(c)
        .await?;
    if managing.is_empty() {
        return Err(BillingError::NotFound("user"));
    }
    if managing
        .iter()
        .any(|m| matches!(m.role, AccountRole::Owner | AccountRole::Admin))
    {
        Ok(())
    } else {
        Err(BillingError::Forbidden(
            "only the user or an account OWNER/ADMIN may do this",
        ))
    }
}
