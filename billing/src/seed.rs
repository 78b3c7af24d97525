//! The demo account seeded on an empty embedded database, so that a first start has
//! something to look at.

use crate::accounts;
use crate::debits::usage::{self, ProjectRef, UsageRequest};
use crate::error::Result;
use crate::payments::purchases::{self, PurchaseItem, PurchaseRequest};
use chrono::{DateTime, Utc};
use entity::enums::{BudgetPeriod, PurchaseSource};
use entity::{account_members, accounts as accounts_entity, users};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter};
use uuid::Uuid;

pub const DEMO_OWNER_EMAIL: &str = "owner@demo.reservoir.dev";
/// Name of the token minted at every start; older ones are revoked.
const DEMO_TOKEN_NAME: &str = "demo (printed at start-up)";

#[derive(Clone, Debug)]
pub struct Demo {
    pub account_id: Uuid,
    pub owner_id: Uuid,
    /// True when this call created the demo data.
    pub created: bool,
    /// A fresh user token for the demo owner.
    pub token: String,
}

/// Seeds the demo account when the database has no account at all, and mints a fresh
/// owner token either way (the previous start's token is revoked). Returns None when
/// the database holds accounts but no demo account (a real deployment).
pub async fn ensure_demo(db: &DatabaseConnection, now: DateTime<Utc>) -> Result<Option<Demo>> {
    let owner = users::Entity::find()
        .filter(users::Column::Email.eq(DEMO_OWNER_EMAIL))
        .one(db)
        .await?;
    let (account_id, owner_id, created) = match owner {
        Some(owner) => {
            let membership = account_members::Entity::find()
                .filter(account_members::Column::UserId.eq(owner.id))
                .one(db)
                .await?;
            let Some(membership) = membership else {
                return Ok(None);
            };
            (membership.account_id, owner.id, false)
        }
        None if accounts_entity::Entity::find().count(db).await? == 0 => {
            let (account_id, owner_id) = seed_demo(db, now).await?;
            (account_id, owner_id, true)
        }
        None => return Ok(None),
    };
    accounts::revoke_user_tokens_named(db, owner_id, DEMO_TOKEN_NAME, now).await?;
    let token = accounts::create_user_token(db, owner_id, DEMO_TOKEN_NAME, now).await?;
    Ok(Some(Demo {
        account_id,
        owner_id,
        created,
        token,
    }))
}

async fn seed_demo(db: &DatabaseConnection, now: DateTime<Utc>) -> Result<(Uuid, Uuid)> {
    let created =
        accounts::create_account(db, "Demo Inc.", DEMO_OWNER_EMAIL, "Demo Owner", now).await?;
    let account_id = created.account.id;
    let production = accounts::create_workspace(db, account_id, "Production", now).await?;
    let staging = accounts::create_workspace(db, account_id, "Staging", now).await?;
    let chatbot =
        accounts::create_project(db, production.id, "Support chatbot", "chatbot", now).await?;
    accounts::create_project(db, production.id, "Search", "search", now).await?;
    accounts::create_project(db, staging.id, "Experiments", "experiments", now).await?;
    let budget = crate::money::Credits::from_whole_credits(50)?;
    accounts::set_project_budget(db, chatbot.id, Some(budget), BudgetPeriod::Monthly, now).await?;
    for (workspace_id, package) in [(production.id, "pkg_100"), (staging.id, "pkg_25")] {
        let purchase = purchases::create_purchase(
            db,
            PurchaseRequest {
                workspace_id,
                item: PurchaseItem::Package(package.into()),
                source: PurchaseSource::Manual,
                payment_method_id: None,
                idempotency_key: format!("demo-seed-{package}"),
                created_by_user_id: Some(created.owner.id),
            },
            now,
        )
        .await?;
        purchases::credit_purchase(db, purchase.purchase.id, Some("demo-seed".into()), now).await?;
    }
    let calls = [
        ("chatbot", "openai/gpt-4o-mini", 1_200, 350),
        ("chatbot", "anthropic/claude-sonnet-4.5", 3_000, 800),
        ("search", "google/gemini-2.5-flash", 8_000, 200),
        ("search", "openai/gpt-4.1-mini", 2_500, 600),
    ];
    for (i, (tag, model, prompt_tokens, completion_tokens)) in calls.into_iter().enumerate() {
        usage::record_usage(
            db,
            UsageRequest {
                workspace_id: production.id,
                project: ProjectRef::Tag(tag.into()),
                model_id: model.into(),
                prompt_tokens,
                completion_tokens,
                request_id: format!("demo-seed-{i}"),
                user_id: Some(created.owner.id),
                api_key_id: None,
            },
            now,
        )
        .await?;
    }
    Ok((account_id, created.owner.id))
}
