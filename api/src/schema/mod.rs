//! The GraphQL schema: thin resolvers over `billing`. Each resolver parses, authorizes,
//! calls one domain function and shapes the result; entities never leak as types.

pub mod loaders;
mod mutation;
mod purchase_feed;
mod query;
mod subscription;
mod types;
mod webhooks;

use crate::error::GqlResult;
use crate::scalars::CreditsScalar;
use async_graphql::{Context, ID, Result, Schema, SchemaBuilder};
use billing::accounts::auth::Principal;
use billing::payments::{PaymentGateway, SandboxGateway};
use billing::sea_orm::DatabaseConnection;
use billing::{BillingError, Credits};
pub use mutation::*;
pub use query::*;
use std::sync::Arc;
pub use subscription::*;
pub use types::*;
use uuid::Uuid;

pub type ReservoirSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

/// The complexity limit; depth, aliases and money fields are limited per document in
/// `crate::limits` (which leaves introspection out of the depth).
pub const QUERY_COMPLEXITY_MAX: usize = 5_000;
pub use crate::limits::QUERY_DEPTH_MAX;

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
    billing::ids::parse_uuid(kind, id.as_str()).gql(ctx)
}

pub(crate) fn credits(nanos: i64) -> CreditsScalar {
    CreditsScalar(Credits::from_nanos(nanos))
}

/// The schema with the sandbox gateway and no subscriptions hub (export, tests).
pub fn build_schema(db: DatabaseConnection) -> ReservoirSchema {
    schema_builder(db, Arc::new(SandboxGateway::new()), None).finish()
}

/// The schema with its shared data, before `finish`: the server adds the process's
/// `events::BalanceHub` (without it, subscriptions fail) and its metrics.
pub fn schema_builder(
    db: DatabaseConnection,
    gateway: Arc<dyn PaymentGateway>,
    metrics: Option<crate::metrics::Metrics>,
) -> SchemaBuilder<QueryRoot, MutationRoot, SubscriptionRoot> {
    let mut builder = Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .data(db)
        .data(gateway)
        .limit_depth(crate::limits::SCHEMA_DEPTH_MAX)
        .limit_directives(crate::limits::DIRECTIVES_PER_FIELD_MAX)
        .limit_complexity(QUERY_COMPLEXITY_MAX)
        .extension(crate::limits::DocumentLimits);
    // Registered before ErrorCodes, so that it wraps it and counts every refusal
    // (parse, validation, limits) under its final code.
    if let Some(metrics) = metrics {
        builder = builder
            .data(metrics.clone())
            .extension(crate::metrics::RequestMetrics(metrics));
    }
    // Innermost parse hook: the extensions above see every document, cached or not.
    builder
        .extension(crate::error::ErrorCodes)
        .extension(crate::document_cache::DocumentCache::default())
}
