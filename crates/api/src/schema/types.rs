//! Output types: wrappers over domain rows that decide what the API shows.

use super::{credits, db};
use crate::error::GqlResult;
use crate::scalars::CreditsScalar;
use async_graphql::{Context, ID, Object, Result};
use billing::auth::Principal;
use billing::entity::{accounts, credit_packages, models, usage_events, users, workspaces};
use billing::sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use billing::{BillingError, Credits};
use chrono::{DateTime, Utc};

pub struct Viewer(pub Principal);

#[Object]
impl Viewer {
    /// The user behind a user token; null for a workspace API key or the platform admin token.
    async fn user(&self, ctx: &Context<'_>) -> Result<Option<User>> {
        let Principal::User { user_id, .. } = &self.0 else {
            return Ok(None);
        };
        let user = users::Entity::find_by_id(*user_id)
            .one(db(ctx))
            .await
            .map_err(BillingError::from)
            .gql(ctx)?;
        Ok(user.map(User))
    }

    /// Accounts the caller can see.
    async fn accounts(&self, ctx: &Context<'_>) -> Result<Vec<Account>> {
        let rows = billing::access::visible_accounts(db(ctx), &self.0)
            .await
            .gql(ctx)?;
        Ok(rows.into_iter().map(Account).collect())
    }
}

pub struct User(pub users::Model);

#[Object]
impl User {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn email(&self) -> &str {
        &self.0.email
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
}

pub struct Account(pub accounts::Model);

#[Object]
impl Account {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    /// Verified accounts may buy credits against an invoice with payment terms.
    async fn verified(&self) -> bool {
        self.0.verified
    }
    /// Days to pay an invoice-billed purchase.
    async fn payment_terms_days(&self) -> i32 {
        self.0.payment_terms_days
    }
    /// Sum of the balances of all workspaces of the account.
    async fn total_balance(&self, ctx: &Context<'_>) -> Result<CreditsScalar> {
        let total = Credits::checked_sum(
            self.workspaces_rows(ctx)
                .await?
                .iter()
                .map(|w| Credits::from_nanos(w.balance_nanos)),
        )
        .map_err(BillingError::from)
        .gql(ctx)?;
        Ok(CreditsScalar(total))
    }
    async fn workspaces(&self, ctx: &Context<'_>) -> Result<Vec<Workspace>> {
        Ok(self
            .workspaces_rows(ctx)
            .await?
            .into_iter()
            .map(Workspace)
            .collect())
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

impl Account {
    async fn workspaces_rows(&self, ctx: &Context<'_>) -> Result<Vec<workspaces::Model>> {
        workspaces::Entity::find()
            .filter(workspaces::Column::AccountId.eq(self.0.id))
            .order_by_asc(workspaces::Column::Name)
            .all(db(ctx))
            .await
            .map_err(BillingError::from)
            .gql(ctx)
    }
}

pub struct Workspace(pub workspaces::Model);

#[Object]
impl Workspace {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    /// Credits in the pool, including credits held by open reservations.
    async fn balance(&self) -> CreditsScalar {
        credits(self.0.balance_nanos)
    }
    /// Credits held by open reservations.
    async fn reserved(&self) -> CreditsScalar {
        credits(self.0.reserved_nanos)
    }
    /// balance - reserved: what new usage can draw on.
    async fn available(&self) -> CreditsScalar {
        CreditsScalar(billing::ledger::available(&self.0))
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

pub struct Model(pub models::Model);

#[Object]
impl Model {
    /// e.g. "openai/gpt-4o".
    async fn id(&self) -> &str {
        &self.0.id
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn prompt_price_per_million(&self) -> CreditsScalar {
        credits(self.0.prompt_price_per_million_nanos)
    }
    async fn completion_price_per_million(&self) -> CreditsScalar {
        credits(self.0.completion_price_per_million_nanos)
    }
    async fn active(&self) -> bool {
        self.0.active
    }
}

pub struct CreditPackage(pub credit_packages::Model);

#[Object]
impl CreditPackage {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    /// Credits bought.
    async fn amount(&self) -> CreditsScalar {
        credits(self.0.amount_nanos)
    }
    /// Charged to the card, in US dollars.
    async fn price(&self) -> CreditsScalar {
        credits(self.0.price_nanos)
    }
    /// Bonus credits added on top of amount.
    async fn bonus(&self) -> CreditsScalar {
        credits(self.0.bonus_nanos)
    }
}

pub struct UsageEvent(pub usage_events::Model);

#[Object]
impl UsageEvent {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    /// The caller's request id; recording the same request id twice records it once.
    async fn request_id(&self) -> &str {
        &self.0.request_id
    }
    async fn model_id(&self) -> &str {
        &self.0.model_id
    }
    async fn prompt_tokens(&self) -> i64 {
        self.0.prompt_tokens
    }
    async fn completion_tokens(&self) -> i64 {
        self.0.completion_tokens
    }
    async fn cost(&self) -> CreditsScalar {
        credits(self.0.cost_nanos)
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}
