//! Who may do what. Account OWNER/ADMIN are admins of every workspace of their
//! account; a workspace API key acts only on its own workspace's usage; anything in
//! another account is NOT_FOUND, never FORBIDDEN (no hint that it exists).

use crate::accounts::auth::Principal;
use crate::debits::usage::ProjectRef;
use crate::error::{BillingError, Result};
use entity::enums::{AccountRole, WorkspaceRole};
use entity::{account_members, projects, workspace_members, workspaces};
use sea_orm::{ConnectionTrait, EntityTrait};
use std::collections::HashSet;
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
    require_level(Some(access), needed)?;
    Ok(ws)
}

/// The rule of [`require_workspace`] over an access already looked up (the API's
/// batched loaders): None (the caller cannot see the workspace) is NOT_FOUND.
pub fn require_level(access: Option<WorkspaceAccess>, needed: WorkspaceAccess) -> Result<()> {
    match access {
        Some(a) if a >= needed => Ok(()),
        Some(_) => Err(BillingError::Forbidden(
            "this needs a stronger role in the workspace",
        )),
        None => Err(BillingError::NotFound("workspace")),
    }
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
    if *principal != Principal::PlatformAdmin {
        admin_role(role)?;
    }
    Ok(account)
}

/// The account-admin rule over the caller's role in the account (None: not a member,
/// so the account is NOT_FOUND to them).
fn admin_role(role: Option<AccountRole>) -> Result<()> {
    match role {
        Some(AccountRole::Owner | AccountRole::Admin) => Ok(()),
        Some(AccountRole::Member) => Err(BillingError::Forbidden(
            "this needs the account's OWNER or ADMIN role",
        )),
        None => Err(BillingError::NotFound("account")),
    }
}

/// [`require_account_admin`] over the account's members already loaded (the API's
/// batched loaders, for an account the caller reached): an API key is FORBIDDEN.
pub fn require_account_admin_among(
    principal: &Principal,
    members: &[(entity::users::Model, AccountRole)],
) -> Result<()> {
    match principal {
        Principal::PlatformAdmin => Ok(()),
        Principal::ApiKey { .. } => forbid_api_key(principal),
        Principal::User { user_id, .. } => admin_role(
            members
                .iter()
                .find(|(user, _)| user.id == *user_id)
                .map(|(_, role)| *role),
        ),
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

/// People and the account are not an API key's business: a key acts on its
/// workspace's usage only, so members, users and accounts are hidden from it.
pub fn may_see_people(principal: &Principal) -> bool {
    !matches!(principal, Principal::ApiKey { .. })
}

/// FORBIDDEN for an API key (see [`may_see_people`]).
pub fn forbid_api_key(principal: &Principal) -> Result<()> {
    if may_see_people(principal) {
        Ok(())
    } else {
        Err(BillingError::Forbidden(
            "an API key can only see its workspace",
        ))
    }
}

/// For an object looked up by its own id: a caller who may not see its workspace or
/// account gets the same NOT_FOUND (same message) as for an id that does not exist.
pub(crate) fn hidden_as<T>(kind: &'static str, result: Result<T>) -> Result<T> {
    result.map_err(|e| match e {
        BillingError::NotFound(_) => BillingError::NotFound(kind),
        other => other,
    })
}

/// A project the caller can see (any access to its workspace); NOT_FOUND otherwise.
pub async fn visible_project<C: ConnectionTrait>(
    c: &C,
    principal: &Principal,
    project_id: Uuid,
) -> Result<projects::Model> {
    project_for(c, principal, project_id, WorkspaceAccess::ApiKey).await
}

/// A project, when the caller has at least `needed` in its workspace: NOT_FOUND when
/// the caller cannot see the workspace (as for an unknown project), FORBIDDEN when
/// their role there is weaker.
pub async fn project_for<C: ConnectionTrait>(
    c: &C,
    principal: &Principal,
    project_id: Uuid,
    needed: WorkspaceAccess,
) -> Result<projects::Model> {
    let project = projects::Entity::find_by_id(project_id)
        .one(c)
        .await?
        .ok_or(BillingError::NotFound("project"))?;
    let allowed = require_workspace(c, principal, project.workspace_id, needed).await;
    hidden_as("project", allowed)?;
    Ok(project)
}

/// A workspace whose purchases the caller may follow: any access but an API key's
/// (purchases are the admins' business, not the gateway's).
pub async fn require_purchase_follower<C: ConnectionTrait>(
    c: &C,
    principal: &Principal,
    workspace_id: Uuid,
) -> Result<workspaces::Model> {
    let (ws, level) = workspace_access(c, principal, workspace_id).await?;
    if level == WorkspaceAccess::ApiKey {
        return Err(BillingError::Forbidden(
            "an API key cannot follow purchases",
        ));
    }
    Ok(ws)
}

/// Every workspace of an account (for its total) and the ids of those the caller may
/// see: a plain account MEMBER sees its own workspaces only.
pub async fn account_workspaces<C: ConnectionTrait>(
    c: &C,
    principal: &Principal,
    account_id: Uuid,
) -> Result<(Vec<workspaces::Model>, HashSet<Uuid>)> {
    use sea_orm::{ColumnTrait, QueryFilter};
    let rows = workspaces::Entity::find()
        .filter(workspaces::Column::AccountId.eq(account_id))
        .all(c)
        .await?;
    let ids: Vec<Uuid> = rows.iter().map(|w| w.id).collect();
    let visible = workspace_access_batch(c, principal, &ids)
        .await?
        .into_keys()
        .collect();
    Ok((rows, visible))
}

/// A workspace first seen after [`account_workspaces`] (created since): its row and
/// whether the caller may see it; None when it is gone.
pub async fn workspace_sighting<C: ConnectionTrait>(
    c: &C,
    principal: &Principal,
    workspace_id: Uuid,
) -> Result<Option<(workspaces::Model, bool)>> {
    match workspace_access(c, principal, workspace_id).await {
        Ok((row, _)) => Ok(Some((row, true))),
        Err(BillingError::NotFound(_)) => Ok(workspaces::Entity::find_by_id(workspace_id)
            .one(c)
            .await?
            .map(|row| (row, false))),
        Err(e) => Err(e),
    }
}

/// Who a usage call is charged to and attributed to, authorized for its workspace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageCaller {
    pub workspace_id: Uuid,
    /// The caller's user (a user token), the default member the usage is attributed to.
    pub user_id: Option<Uuid>,
    pub api_key_id: Option<Uuid>,
    /// The API key's project: usage that names no project is tagged with it.
    pub key_project: Option<Uuid>,
}

impl UsageCaller {
    /// The project a call is tagged with: the one it names, else the API key's.
    pub fn project(&self, tag: Option<String>) -> ProjectRef {
        match (tag, self.key_project) {
            (Some(tag), _) => ProjectRef::Tag(tag),
            (None, Some(id)) => ProjectRef::Id(id),
            (None, None) => ProjectRef::None,
        }
    }
}

/// Authorizes a usage call (record, reserve, settle, release) in a workspace: the
/// named one, or the API key's own when none is named. Viewers are FORBIDDEN.
pub async fn usage_caller<C: ConnectionTrait>(
    c: &C,
    principal: &Principal,
    workspace_id: Option<Uuid>,
) -> Result<UsageCaller> {
    let workspace_id = match (workspace_id, principal) {
        (Some(id), _) => id,
        (None, Principal::ApiKey { workspace_id, .. }) => *workspace_id,
        (None, _) => {
            return Err(BillingError::invalid(
                "workspaceId is required unless the caller is an API key",
            ));
        }
    };
    if !may_record_usage(usage_level(c, principal, workspace_id).await?) {
        return Err(BillingError::Forbidden("viewers cannot record usage"));
    }
    let (api_key_id, key_project) = match principal {
        Principal::ApiKey {
            api_key_id,
            project_id,
            ..
        } => (Some(*api_key_id), *project_id),
        Principal::User { .. } | Principal::PlatformAdmin => (None, None),
    };
    Ok(UsageCaller {
        workspace_id,
        user_id: principal.user_id(),
        api_key_id,
        key_project,
    })
}

/// The caller's access for usage. An API key is bound to its workspace (and its row to
/// the key's): no lookup on the hot path; any other workspace is NOT_FOUND to it, as
/// for a stranger.
async fn usage_level<C: ConnectionTrait>(
    c: &C,
    principal: &Principal,
    workspace_id: Uuid,
) -> Result<WorkspaceAccess> {
    match principal {
        Principal::ApiKey {
            workspace_id: own, ..
        } if *own == workspace_id => Ok(WorkspaceAccess::ApiKey),
        Principal::ApiKey { .. } => Err(BillingError::NotFound("workspace")),
        _ => Ok(workspace_access(c, principal, workspace_id).await?.1),
    }
}
