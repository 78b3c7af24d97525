//! Accounts, people, workspaces, projects and their credentials.

pub mod access;
pub mod auth;
pub mod lookups;

use crate::accounts::auth::{API_KEY_PREFIX, API_KEY_VISIBLE_PREFIX_CHARS, USER_TOKEN_PREFIX};
use crate::debits::budget;
use crate::error::{BillingError, Result};
use crate::ids::new_id;
use crate::money::Credits;
use chrono::{DateTime, Utc};
use entity::enums::{AccountRole, BudgetPeriod, WorkspaceRole};
use entity::{
    account_members, accounts, api_keys, projects, user_tokens, users, workspace_members,
    workspaces,
};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection,
    EntityTrait, IntoActiveModel, QueryFilter,
};
use uuid::Uuid;

/// Longest display name (accounts, workspaces, projects, people, credentials).
pub const NAME_LEN_MAX: usize = 100;
/// Longest project tag.
pub const TAG_LEN_MAX: usize = 64;
/// Longest e-mail address (RFC 5321's path limit).
pub const EMAIL_LEN_MAX: usize = 254;

/// A trimmed, non-empty display name of at most NAME_LEN_MAX characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Name(String);

impl Name {
    pub fn parse(field: &'static str, value: &str) -> Result<Self> {
        let value = value.trim();
        if value.is_empty()
            || value.chars().count() > NAME_LEN_MAX
            || value.chars().any(char::is_control)
        {
            return Err(BillingError::invalid(format!(
                "{field} must be 1 to {NAME_LEN_MAX} characters without control characters"
            )));
        }
        Ok(Self(value.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A lower-cased e-mail address with one `@` and a dotted domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(value: &str) -> Result<Self> {
        let value = value.trim().to_lowercase();
        let valid = value.len() <= EMAIL_LEN_MAX
            && value.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty()
                    && domain.contains('.')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
                    && !domain.contains('@')
            })
            && !value.chars().any(|c| c.is_whitespace() || c.is_control());
        if !valid {
            return Err(BillingError::invalid("email is not a valid address"));
        }
        Ok(Self(value))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A project tag: 1..=64 of `a-z 0-9 - _ .`, the identifier usage is tagged with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tag(String);

impl Tag {
    pub fn parse(value: &str) -> Result<Self> {
        let ok = !value.is_empty()
            && value.len() <= TAG_LEN_MAX
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !ok {
            return Err(BillingError::invalid(format!(
                "tag must be 1 to {TAG_LEN_MAX} characters of a-z, 0-9, '-', '_' or '.'"
            )));
        }
        Ok(Self(value.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Clone, Debug)]
pub struct CreatedAccount {
    pub account: accounts::Model,
    pub owner: users::Model,
    /// Shown once; only its hash is stored.
    pub owner_token: String,
}

/// Finds the user with this address or creates them.
async fn user_by_email<C: ConnectionTrait>(
    c: &C,
    email: &Email,
    name: Option<&Name>,
    now: DateTime<Utc>,
) -> Result<users::Model> {
    if let Some(user) = users::Entity::find()
        .filter(users::Column::Email.eq(email.as_str()))
        .one(c)
        .await?
    {
        return Ok(user);
    }
    let name = match name {
        Some(name) => name.clone(),
        None => Name::parse("name", email.as_str().split('@').next().unwrap_or("member"))?,
    };
    let user = users::Model {
        id: new_id(),
        email: email.as_str().to_owned(),
        name: name.as_str().to_owned(),
        created_at: now,
    };
    // Two requests may create the same new user at once: the loser inserts nothing and
    // reads the winner's row (a failed INSERT would abort a PostgreSQL transaction).
    users::Entity::insert(user.clone().into_active_model().reset_all())
        .on_conflict(
            sea_orm::sea_query::OnConflict::column(users::Column::Email)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(c)
        .await?;
    users::Entity::find()
        .filter(users::Column::Email.eq(email.as_str()))
        .one(c)
        .await?
        .ok_or_else(|| BillingError::Internal("user vanished after insert".into()))
}

/// Creates an account with its owner (a new or existing user) and an owner token.
pub async fn create_account(
    db: &DatabaseConnection,
    name: &str,
    owner_email: &str,
    owner_name: &str,
    now: DateTime<Utc>,
) -> Result<CreatedAccount> {
    let name = Name::parse("name", name)?;
    let email = Email::parse(owner_email)?;
    let owner_name = Name::parse("ownerName", owner_name)?;
    let tx = crate::db::begin_write(db).await?;
    let account = accounts::Model {
        id: new_id(),
        name: name.as_str().to_owned(),
        verified: false,
        volume_discount_bps: 0,
        payment_terms_days: 30,
        invoice_sequence: 0,
        gateway_customer_id: None,
        created_at: now,
    };
    accounts::Entity::insert(account.clone().into_active_model().reset_all())
        .exec_without_returning(&tx)
        .await?;
    let owner = user_by_email(&tx, &email, Some(&owner_name), now).await?;
    account_members::ActiveModel {
        account_id: Set(account.id),
        user_id: Set(owner.id),
        role: Set(AccountRole::Owner),
        created_at: Set(now),
    }
    .insert(&tx)
    .await?;
    let owner_token = mint_user_token(&tx, owner.id, "owner", now).await?;
    tx.commit().await?;
    Ok(CreatedAccount {
        account,
        owner,
        owner_token,
    })
}

async fn mint_user_token<C: ConnectionTrait>(
    c: &C,
    user_id: Uuid,
    name: &str,
    now: DateTime<Utc>,
) -> Result<String> {
    let token = auth::generate_secret(USER_TOKEN_PREFIX);
    user_tokens::Entity::insert(user_tokens::ActiveModel {
        id: Set(new_id()),
        user_id: Set(user_id),
        name: Set(name.to_owned()),
        token_hash: Set(auth::hash_secret(&token)),
        created_at: Set(now),
        last_used_at: Set(None),
        revoked_at: Set(None),
    })
    .exec_without_returning(c)
    .await?;
    Ok(token)
}

/// A new bearer token for a user; shown once.
pub async fn create_user_token(
    db: &DatabaseConnection,
    user_id: Uuid,
    name: &str,
    now: DateTime<Utc>,
) -> Result<String> {
    let name = Name::parse("name", name)?;
    users::Entity::find_by_id(user_id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("user"))?;
    mint_user_token(db, user_id, name.as_str(), now).await
}

/// Revokes every token of a user with this name (used to rotate the demo token).
pub async fn revoke_user_tokens_named(
    db: &DatabaseConnection,
    user_id: Uuid,
    name: &str,
    now: DateTime<Utc>,
) -> Result<u64> {
    use sea_orm::sea_query::Expr;
    let result = user_tokens::Entity::update_many()
        .col_expr(user_tokens::Column::RevokedAt, Expr::value(now))
        .filter(user_tokens::Column::UserId.eq(user_id))
        .filter(user_tokens::Column::Name.eq(name))
        .filter(user_tokens::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

pub async fn create_workspace(
    db: &DatabaseConnection,
    account_id: Uuid,
    name: &str,
    now: DateTime<Utc>,
) -> Result<workspaces::Model> {
    let name = Name::parse("name", name)?;
    accounts::Entity::find_by_id(account_id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("account"))?;
    let ws = workspaces::Model {
        id: new_id(),
        account_id,
        name: name.as_str().to_owned(),
        balance_nanos: 0,
        reserved_nanos: 0,
        balance_sequence: 0,
        created_at: now,
    };
    workspaces::Entity::insert(ws.clone().into_active_model().reset_all())
        .exec_without_returning(db)
        .await
        .map_err(|e| {
            unique_as_invalid(
                e,
                "a workspace with this name already exists in the account",
            )
        })?;
    Ok(ws)
}

fn unique_as_invalid(e: sea_orm::DbErr, message: &str) -> BillingError {
    if crate::error::is_unique_violation(&e) {
        BillingError::invalid(message)
    } else {
        e.into()
    }
}

pub async fn create_project(
    db: &DatabaseConnection,
    workspace_id: Uuid,
    name: &str,
    tag: &str,
    now: DateTime<Utc>,
) -> Result<projects::Model> {
    let name = Name::parse("name", name)?;
    let tag = Tag::parse(tag)?;
    workspaces::Entity::find_by_id(workspace_id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("workspace"))?;
    let project = projects::Model {
        id: new_id(),
        workspace_id,
        name: name.as_str().to_owned(),
        tag: tag.as_str().to_owned(),
        budget_limit_nanos: None,
        budget_period: BudgetPeriod::Monthly,
        budget_period_start: budget::period_start(BudgetPeriod::Monthly, now, now),
        budget_spent_nanos: 0,
        budget_reserved_nanos: 0,
        created_at: now,
    };
    projects::Entity::insert(project.clone().into_active_model().reset_all())
        .exec_without_returning(db)
        .await
        .map_err(|e| {
            unique_as_invalid(e, "a project with this tag already exists in the workspace")
        })?;
    Ok(project)
}

/// Sets or removes (None) a project's spending cap. Changing the period starts a new
/// period now (spend back to zero); keeping the period keeps the current spend.
pub async fn set_project_budget(
    db: &DatabaseConnection,
    project_id: Uuid,
    limit: Option<Credits>,
    period: BudgetPeriod,
    now: DateTime<Utc>,
) -> Result<projects::Model> {
    if limit.is_some_and(|l| l.is_negative()) {
        return Err(BillingError::invalid("limit must not be negative"));
    }
    let tx = crate::db::begin_write(db).await?;
    let project = projects::Entity::find_by_id(project_id)
        .one(&tx)
        .await?
        .ok_or(BillingError::NotFound("project"))?;
    let mut active = project.clone().into_active_model();
    active.budget_limit_nanos = Set(limit.map(Credits::nanos));
    if project.budget_period != period {
        active.budget_period = Set(period);
        active.budget_period_start = Set(budget::period_start(period, now, now));
        active.budget_spent_nanos = Set(0);
    }
    let updated = active.update(&tx).await?;
    tx.commit().await?;
    Ok(updated)
}

pub async fn add_workspace_member(
    db: &DatabaseConnection,
    workspace_id: Uuid,
    email: &str,
    name: Option<&str>,
    role: WorkspaceRole,
    now: DateTime<Utc>,
) -> Result<(users::Model, WorkspaceRole)> {
    let email = Email::parse(email)?;
    let name = name.map(|n| Name::parse("name", n)).transpose()?;
    let tx = crate::db::begin_write(db).await?;
    let ws = workspaces::Entity::find_by_id(workspace_id)
        .one(&tx)
        .await?
        .ok_or(BillingError::NotFound("workspace"))?;
    let user = user_by_email(&tx, &email, name.as_ref(), now).await?;
    let in_account = account_members::Entity::find_by_id((ws.account_id, user.id))
        .one(&tx)
        .await?;
    if in_account.is_none() {
        account_members::ActiveModel {
            account_id: Set(ws.account_id),
            user_id: Set(user.id),
            role: Set(AccountRole::Member),
            created_at: Set(now),
        }
        .insert(&tx)
        .await?;
    }
    match workspace_members::Entity::find_by_id((workspace_id, user.id))
        .one(&tx)
        .await?
    {
        Some(existing) => {
            let mut active = existing.into_active_model();
            active.role = Set(role);
            active.update(&tx).await?;
        }
        None => {
            workspace_members::ActiveModel {
                workspace_id: Set(workspace_id),
                user_id: Set(user.id),
                role: Set(role),
                created_at: Set(now),
            }
            .insert(&tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok((user, role))
}

#[derive(Clone, Debug)]
pub struct CreatedApiKey {
    pub api_key: api_keys::Model,
    /// Shown once; only its hash is stored.
    pub secret: String,
}

pub async fn create_api_key(
    db: &DatabaseConnection,
    workspace_id: Uuid,
    name: &str,
    project_id: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<CreatedApiKey> {
    let name = Name::parse("name", name)?;
    workspaces::Entity::find_by_id(workspace_id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("workspace"))?;
    if let Some(project_id) = project_id {
        let project = projects::Entity::find_by_id(project_id).one(db).await?;
        if project.is_none_or(|p| p.workspace_id != workspace_id) {
            return Err(BillingError::NotFound("project"));
        }
    }
    let secret = auth::generate_secret(API_KEY_PREFIX);
    let api_key = api_keys::Model {
        id: new_id(),
        workspace_id,
        project_id,
        name: name.as_str().to_owned(),
        prefix: secret.chars().take(API_KEY_VISIBLE_PREFIX_CHARS).collect(),
        secret_hash: auth::hash_secret(&secret),
        created_at: now,
        last_used_at: None,
        revoked_at: None,
    };
    api_keys::Entity::insert(api_key.clone().into_active_model().reset_all())
        .exec_without_returning(db)
        .await?;
    Ok(CreatedApiKey { api_key, secret })
}

// --- API keys ----------------------------------------------------------------------

/// Revokes a workspace API key: it authenticates nothing from now on. Idempotent:
/// revoking a revoked key changes nothing and returns it with its original
/// `revoked_at`, so a retried request reports when the key actually stopped working.
/// NOT_FOUND for an unknown key.
pub async fn revoke_api_key(
    db: &DatabaseConnection,
    api_key_id: Uuid,
    now: DateTime<Utc>,
) -> Result<api_keys::Model> {
    use api_keys::Column as K;
    api_keys::Entity::update_many()
        .col_expr(K::RevokedAt, Expr::value(now))
        .filter(K::Id.eq(api_key_id))
        .filter(K::RevokedAt.is_null())
        .exec(db)
        .await?;
    api_keys::Entity::find_by_id(api_key_id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("API key"))
}

// --- on behalf of a caller -----------------------------------------------------------

/// [`revoke_api_key`] for a caller, who must be ADMIN of the key's workspace. A key the
/// caller cannot see is NOT_FOUND, exactly as an unknown one.
pub async fn revoke_api_key_as(
    db: &DatabaseConnection,
    principal: &auth::Principal,
    api_key_id: Uuid,
    now: DateTime<Utc>,
) -> Result<api_keys::Model> {
    let key = api_keys::Entity::find_by_id(api_key_id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("API key"))?;
    let admin = access::require_workspace(
        db,
        principal,
        key.workspace_id,
        access::WorkspaceAccess::Admin,
    )
    .await;
    access::hidden_as("API key", admin)?;
    revoke_api_key(db, api_key_id, now).await
}

/// [`set_project_budget`] for a caller, who must be ADMIN of the project's workspace
/// (a project the caller cannot see is NOT_FOUND).
pub async fn set_project_budget_as(
    db: &DatabaseConnection,
    principal: &auth::Principal,
    project_id: Uuid,
    limit: Option<Credits>,
    period: BudgetPeriod,
    now: DateTime<Utc>,
) -> Result<projects::Model> {
    access::project_for(db, principal, project_id, access::WorkspaceAccess::Admin).await?;
    set_project_budget(db, project_id, limit, period, now).await
}
