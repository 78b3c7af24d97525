//! The GraphQL schema: thin resolvers over `billing`. Each resolver parses, authorizes,
//! calls one domain function and shapes the result; entities never leak as types.

mod types;

use crate::error::GqlResult;
use crate::scalars::CreditsScalar;
use async_graphql::{Context, EmptySubscription, ID, InputObject, Object, Result, Schema};
use billing::access;
use billing::auth::Principal;
use billing::entity::{credit_packages, models};
use billing::sea_orm::{DatabaseConnection, EntityTrait, QueryOrder};
use billing::usage::{self, ProjectRef, UsageRequest};
use billing::{BillingError, Credits};
pub use types::*;
use uuid::Uuid;

pub type ReservoirSchema = Schema<QueryRoot, MutationRoot, EmptySubscription>;

/// The authenticated caller of one request (absent: unauthenticated).
#[derive(Clone, Debug)]
pub struct Caller(pub Principal);

pub(crate) fn db<'a>(ctx: &Context<'a>) -> &'a DatabaseConnection {
    ctx.data_unchecked::<DatabaseConnection>()
}

pub(crate) fn caller(ctx: &Context<'_>) -> Result<Principal> {
    ctx.data_opt::<Caller>()
        .map(|c| c.0.clone())
        .ok_or(BillingError::Unauthenticated)
        .gql(ctx)
}

pub(crate) fn parse_id(ctx: &Context<'_>, id: &ID, kind: &'static str) -> Result<Uuid> {
    // An id that is not ours cannot name anything: NOT_FOUND, like any unknown id.
    Uuid::parse_str(id.as_str())
        .map_err(|_| BillingError::NotFound(kind))
        .gql(ctx)
}

pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// The authenticated caller.
    async fn viewer(&self, ctx: &Context<'_>) -> Result<Viewer> {
        Ok(Viewer(caller(ctx)?))
    }

    async fn workspace(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Workspace>> {
        let principal = caller(ctx)?;
        let id = parse_id(ctx, &id, "workspace")?;
        match access::workspace_access(db(ctx), &principal, id).await {
            Ok((ws, _)) => Ok(Some(Workspace(ws))),
            Err(BillingError::NotFound(_)) => Ok(None),
            Err(e) => Err(e).gql(ctx),
        }
    }

    /// The model catalog with per-token prices.
    async fn models(&self, ctx: &Context<'_>) -> Result<Vec<Model>> {
        let rows = models::Entity::find()
            .order_by_asc(models::Column::Id)
            .all(db(ctx))
            .await
            .map_err(BillingError::from)
            .gql(ctx)?;
        Ok(rows.into_iter().map(Model).collect())
    }

    /// Credit packages on sale, with their bonus.
    async fn credit_packages(&self, ctx: &Context<'_>) -> Result<Vec<CreditPackage>> {
        let rows = credit_packages::Entity::find()
            .order_by_asc(credit_packages::Column::Position)
            .all(db(ctx))
            .await
            .map_err(BillingError::from)
            .gql(ctx)?;
        Ok(rows
            .into_iter()
            .filter(|p| p.active)
            .map(CreditPackage)
            .collect())
    }
}

#[derive(InputObject)]
pub struct RecordUsageInput {
    /// Optional when the caller is a workspace API key (its workspace is used).
    pub workspace_id: Option<ID>,
    /// The project tag; defaults to the API key's project.
    pub project_tag: Option<String>,
    pub model_id: String,
    pub prompt_tokens: i32,
    pub completion_tokens: i32,
    /// Idempotency key: the same request id is recorded once.
    pub request_id: String,
    /// The member the usage is attributed to; defaults to the caller's user.
    pub user_id: Option<ID>,
}

pub struct MutationRoot;

#[Object]
impl MutationRoot {
    /// Debits the usage cost now; INSUFFICIENT_CREDITS or BUDGET_EXCEEDED and nothing recorded when it does not fit.
    async fn record_usage(&self, ctx: &Context<'_>, input: RecordUsageInput) -> Result<UsageEvent> {
        let principal = caller(ctx)?;
        let workspace_id = match (&input.workspace_id, &principal) {
            (Some(id), _) => parse_id(ctx, id, "workspace")?,
            (None, Principal::ApiKey { workspace_id, .. }) => *workspace_id,
            (None, _) => {
                return Err(BillingError::invalid(
                    "workspaceId is required unless the caller is an API key",
                ))
                .gql(ctx);
            }
        };
        let (_, level) = access::workspace_access(db(ctx), &principal, workspace_id)
            .await
            .gql(ctx)?;
        if !access::may_record_usage(level) {
            return Err(BillingError::Forbidden("viewers cannot record usage")).gql(ctx);
        }
        let (user_id, api_key_id, key_project) = match &principal {
            Principal::User { user_id, .. } => (Some(*user_id), None, None),
            Principal::ApiKey {
                api_key_id,
                project_id,
                ..
            } => (None, Some(*api_key_id), *project_id),
            Principal::PlatformAdmin => (None, None, None),
        };
        let user_id = match &input.user_id {
            Some(id) => Some(parse_id(ctx, id, "user")?),
            None => user_id,
        };
        let project = match (input.project_tag, key_project) {
            (Some(tag), _) => ProjectRef::Tag(tag),
            (None, Some(id)) => ProjectRef::Id(id),
            (None, None) => ProjectRef::None,
        };
        let req = UsageRequest {
            workspace_id,
            project,
            model_id: input.model_id,
            prompt_tokens: i64::from(input.prompt_tokens),
            completion_tokens: i64::from(input.completion_tokens),
            request_id: input.request_id,
            user_id,
            api_key_id,
        };
        let recorded = usage::record_usage(db(ctx), req, chrono::Utc::now())
            .await
            .gql(ctx)?;
        Ok(UsageEvent(recorded.event))
    }
}

pub(crate) fn credits(nanos: i64) -> CreditsScalar {
    CreditsScalar(Credits::from_nanos(nanos))
}

pub fn build_schema(db: DatabaseConnection) -> ReservoirSchema {
    Schema::build(QueryRoot, MutationRoot, EmptySubscription)
        .data(db)
        .finish()
}
