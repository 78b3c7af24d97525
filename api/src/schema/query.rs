//! Top-level queries.

use super::types::*;
use super::{caller, db, parse_id};
use crate::error::GqlResult;
use async_graphql::{Context, ID, Object, Result};
use billing::BillingError;
use billing::accounts::access;

pub struct QueryRoot;

/// NOT_FOUND from a lookup becomes a null result (the contract's nullable getters).
fn found<T>(ctx: &Context<'_>, result: billing::Result<T>) -> Result<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(BillingError::NotFound(_)) => Ok(None),
        Err(e) => Err(e).gql(ctx),
    }
}

#[Object]
impl QueryRoot {
    /// The authenticated caller.
    async fn viewer(&self, ctx: &Context<'_>) -> Result<Viewer> {
        Ok(Viewer(caller(ctx)?))
    }

    async fn account(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Account>> {
        let principal = caller(ctx)?;
        let Ok(id) = parse_id(ctx, &id, "account") else {
            return Ok(None);
        };
        let account = found(ctx, access::account_access(db(ctx), &principal, id).await)?;
        Ok(account.map(|(a, _)| Account(a)))
    }

    async fn workspace(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Workspace>> {
        let principal = caller(ctx)?;
        let Ok(id) = parse_id(ctx, &id, "workspace") else {
            return Ok(None);
        };
        let ws = found(ctx, access::workspace_access(db(ctx), &principal, id).await)?;
        Ok(ws.map(|(ws, _)| Workspace(ws)))
    }

    async fn project(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Project>> {
        let principal = caller(ctx)?;
        let Ok(id) = parse_id(ctx, &id, "project") else {
            return Ok(None);
        };
        let project = found(ctx, access::visible_project(db(ctx), &principal, id).await)?;
        Ok(project.map(Project))
    }

    /// The model catalog with per-token prices.
    async fn models(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = false)] include_inactive: bool,
    ) -> Result<Vec<Model>> {
        caller(ctx)?;
        let rows = billing::catalog::list_models(db(ctx), include_inactive)
            .await
            .gql(ctx)?;
        Ok(rows.into_iter().map(Model).collect())
    }

    /// Credit packages on sale, with their bonus.
    async fn credit_packages(&self, ctx: &Context<'_>) -> Result<Vec<CreditPackage>> {
        caller(ctx)?;
        let rows = billing::catalog::packages_on_sale(db(ctx)).await.gql(ctx)?;
        Ok(rows.into_iter().map(CreditPackage).collect())
    }

    /// What a request would cost before it is sent; with a workspace, after its account's discount and whether it can afford it now.
    async fn estimate_cost(
        &self,
        ctx: &Context<'_>,
        model_id: String,
        prompt_tokens: i32,
        completion_tokens: i32,
        workspace_id: Option<ID>,
    ) -> Result<CostEstimate> {
        let principal = caller(ctx)?;
        let workspace = match &workspace_id {
            Some(id) => {
                let id = parse_id(ctx, id, "workspace")?;
                access::workspace_access(db(ctx), &principal, id)
                    .await
                    .gql(ctx)?;
                Some((id, None))
            }
            None => None,
        };
        let estimate = billing::catalog::estimate_cost(
            db(ctx),
            &model_id,
            i64::from(prompt_tokens),
            i64::from(completion_tokens),
            workspace,
            chrono::Utc::now(),
        )
        .await
        .gql(ctx)?;
        Ok(CostEstimate {
            model: Model(estimate.model),
            prompt_cost: estimate.breakdown.prompt_cost.into(),
            completion_cost: estimate.breakdown.completion_cost.into(),
            discount: estimate.breakdown.discount.into(),
            total: estimate.breakdown.total.into(),
            affordable: estimate.affordable,
        })
    }
}
