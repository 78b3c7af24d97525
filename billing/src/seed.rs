//! The demo account seeded on an empty embedded database, so that a first start has
//! something to look at: two workspaces with projects, a sandbox card, a month of usage
//! history, a transfer, an alert threshold and auto-reload, and a member and a viewer.

use crate::accounts;
use crate::debits::usage::{self, ProjectRef, UsageRequest};
use crate::error::Result;
use crate::money::Credits;
use crate::payments::PaymentGateway;
use crate::payments::cards;
use crate::payments::purchases::{self, PurchaseItem, PurchaseRequest};
use crate::policies::alert_thresholds::{self, AlertThresholdInput};
use crate::policies::auto_reload_settings::{self, AutoReloadInput};
use crate::transfers::{self, TransferRequest};
use chrono::{DateTime, Duration, Utc};
use entity::enums::{AlertSeverity, BudgetPeriod, PurchaseSource, WorkspaceRole};
use entity::{account_members, accounts as accounts_entity, users, workspaces};
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
};
use uuid::Uuid;

pub const DEMO_OWNER_EMAIL: &str = "owner@demo.reservoir.dev";
pub const DEMO_MEMBER_EMAIL: &str = "dev@demo.reservoir.dev";
pub const DEMO_VIEWER_EMAIL: &str = "finance@demo.reservoir.dev";
/// Name of the demo owner's token; a rotation revokes the older ones.
const DEMO_TOKEN_NAME: &str = "demo (printed at start-up)";
/// Days of usage history the demo starts with (the dashboards' 30-day views).
const HISTORY_DAYS: i64 = 30;
/// The sandbox test card the demo account holds.
const DEMO_CARD_TOKEN: &str = "tok_visa";

#[derive(Clone, Debug)]
pub struct Demo {
    pub account_id: Uuid,
    pub owner_id: Uuid,
    /// The demo workspaces, by name, for the banner.
    pub workspaces: Vec<(String, Uuid)>,
    /// True when this call created the demo data.
    pub created: bool,
    /// The demo owner's user token.
    pub token: String,
    /// True when `token` is the kept token of an earlier start, false when minted now.
    pub token_kept: bool,
}

/// Seeds the demo account when the database has no account at all. Keeps the demo
/// owner's token across restarts: `kept_token` (what the caller stored at the last
/// start) is returned as it is while it still authenticates as the demo owner;
/// otherwise (None, revoked, another database) a new one is minted and the older demo
/// tokens are revoked. Returns None when the database holds accounts but no demo
/// account (a real deployment).
pub async fn ensure_demo(
    db: &DatabaseConnection,
    gateway: &dyn PaymentGateway,
    kept_token: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Option<Demo>> {
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
            let (account_id, owner_id) = seed_demo(db, gateway, now).await?;
            (account_id, owner_id, true)
        }
        None => return Ok(None),
    };
    let (token, token_kept) = demo_token(db, owner_id, kept_token, now).await?;
    let workspaces = workspaces::Entity::find()
        .filter(workspaces::Column::AccountId.eq(account_id))
        .order_by_asc(workspaces::Column::CreatedAt)
        .order_by_asc(workspaces::Column::Name)
        .all(db)
        .await?
        .into_iter()
        .map(|w| (w.name, w.id))
        .collect();
    Ok(Some(Demo {
        account_id,
        owner_id,
        workspaces,
        created,
        token,
        token_kept,
    }))
}

/// The kept token when it still authenticates as the demo owner, else a new one.
async fn demo_token(
    db: &DatabaseConnection,
    owner_id: Uuid,
    kept_token: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(String, bool)> {
    if let Some(kept) = kept_token {
        let principal = accounts::auth::authenticate(db, kept, None, now).await;
        if matches!(principal, Ok(p) if p.user_id() == Some(owner_id)) {
            return Ok((kept.to_owned(), true));
        }
    }
    accounts::revoke_user_tokens_named(db, owner_id, DEMO_TOKEN_NAME, now).await?;
    let token = accounts::create_user_token(db, owner_id, DEMO_TOKEN_NAME, now).await?;
    Ok((token, false))
}

struct Seeded {
    owner_id: Uuid,
    production: Uuid,
    staging: Uuid,
    chatbot: Uuid,
}

async fn seed_demo(
    db: &DatabaseConnection,
    gateway: &dyn PaymentGateway,
    now: DateTime<Utc>,
) -> Result<(Uuid, Uuid)> {
    let start = now - Duration::days(HISTORY_DAYS);
    let created =
        accounts::create_account(db, "Demo Inc.", DEMO_OWNER_EMAIL, "Demo Owner", start).await?;
    let account_id = created.account.id;
    let production = accounts::create_workspace(db, account_id, "Production", start).await?;
    let staging = accounts::create_workspace(db, account_id, "Staging", start).await?;
    let chatbot =
        accounts::create_project(db, production.id, "Support chatbot", "chatbot", start).await?;
    accounts::create_project(db, production.id, "Search", "search", start).await?;
    accounts::create_project(db, staging.id, "Experiments", "experiments", start).await?;
    let seeded = Seeded {
        owner_id: created.owner.id,
        production: production.id,
        staging: staging.id,
        chatbot: chatbot.id,
    };
    let member_id = seed_people(db, &seeded, start).await?;
    let card_id = seed_money(db, gateway, account_id, &seeded, start).await?;
    seed_history(db, &seeded, member_id, now).await?;
    seed_policies(db, &seeded, card_id.is_some(), now).await?;
    Ok((account_id, seeded.owner_id))
}

/// A member who uses Production and a viewer from finance, so roles show.
async fn seed_people(db: &DatabaseConnection, s: &Seeded, at: DateTime<Utc>) -> Result<Uuid> {
    let (member, _) = accounts::add_workspace_member(
        db,
        s.production,
        DEMO_MEMBER_EMAIL,
        Some("Dana Developer"),
        WorkspaceRole::Member,
        at,
    )
    .await?;
    for workspace_id in [s.production, s.staging] {
        accounts::add_workspace_member(
            db,
            workspace_id,
            DEMO_VIEWER_EMAIL,
            Some("Finn Finance"),
            WorkspaceRole::Viewer,
            at,
        )
        .await?;
    }
    Ok(member.id)
}

/// The sandbox card (when the gateway takes it) and one package bought per workspace
/// at the start of the history.
async fn seed_money(
    db: &DatabaseConnection,
    gateway: &dyn PaymentGateway,
    account_id: Uuid,
    s: &Seeded,
    at: DateTime<Utc>,
) -> Result<Option<Uuid>> {
    // A real gateway in live mode refuses test cards: the demo then has no card, which
    // is worth a warning, not a failed start.
    let card = cards::add_payment_method(db, gateway, account_id, DEMO_CARD_TOKEN, true, at).await;
    let card_id = match card {
        Ok(card) => Some(card.id),
        Err(e) => {
            tracing::warn!(error = %e, "demo seed: the gateway refused the test card; no card seeded");
            None
        }
    };
    for (workspace_id, package) in [(s.production, "pkg_100"), (s.staging, "pkg_25")] {
        let purchase = purchases::create_purchase(
            db,
            PurchaseRequest {
                workspace_id,
                item: PurchaseItem::Package(package.into()),
                source: PurchaseSource::Manual,
                payment_method_id: card_id,
                idempotency_key: format!("demo-seed-{package}"),
                created_by_user_id: Some(s.owner_id),
            },
            at,
        )
        .await?;
        purchases::credit_purchase(db, purchase.purchase.id, Some("demo-seed".into()), at).await?;
    }
    Ok(card_id)
}

/// One of the demo's daily calls: project tag, model, prompt and completion tokens.
type Call = (&'static str, &'static str, i64, i64);

/// The calls of day `day` of the history: about 1.5 credits a day in Production with
/// a weekly rhythm, a little in Staging, so charts and projections have a shape.
fn calls_of_day(day: i64) -> [Call; 5] {
    let wave = (day * 7) % 11; // 0..=10, deterministic
    let weekend = matches!(day % 7, 5 | 6);
    let load = if weekend { 4 } else { 10 };
    [
        (
            "chatbot",
            "anthropic/claude-sonnet-4.5",
            (12 + wave) * 10_000 * load / 10,
            25_000,
        ),
        (
            "chatbot",
            "openai/gpt-4o-mini",
            500_000 * load / 10,
            100_000,
        ),
        (
            "search",
            "google/gemini-2.5-flash",
            (30 + wave) * 10_000,
            20_000,
        ),
        (
            "search",
            "openai/gpt-4.1-mini",
            200_000,
            (3 + wave) * 10_000,
        ),
        (
            "experiments",
            "openai/gpt-5-mini",
            50_000 + wave * 5_000,
            10_000,
        ),
    ]
}

async fn seed_history(
    db: &DatabaseConnection,
    s: &Seeded,
    member_id: Uuid,
    now: DateTime<Utc>,
) -> Result<()> {
    for day in 0..HISTORY_DAYS {
        let at = now - Duration::days(HISTORY_DAYS - day) + Duration::hours(9);
        for (i, (tag, model, prompt_tokens, completion_tokens)) in
            calls_of_day(day).into_iter().enumerate()
        {
            let staging = tag == "experiments";
            // The member's calls and the owner's alternate, so usage by member shows both.
            let by_owner = staging || (day + i as i64) % 2 == 0;
            let user_id = if by_owner { s.owner_id } else { member_id };
            let offset = Duration::minutes(i as i64 * 37);
            usage::record_usage(
                db,
                UsageRequest {
                    workspace_id: if staging { s.staging } else { s.production },
                    project: ProjectRef::Tag(tag.into()),
                    model_id: model.into(),
                    prompt_tokens,
                    completion_tokens,
                    request_id: format!("demo-seed-{day}-{i}"),
                    user_id: Some(user_id),
                    api_key_id: None,
                },
                at + offset,
            )
            .await?;
        }
        if day == 20 {
            move_to_staging(db, s, at).await?;
        }
    }
    Ok(())
}

async fn move_to_staging(db: &DatabaseConnection, s: &Seeded, at: DateTime<Utc>) -> Result<()> {
    transfers::transfer(
        db,
        TransferRequest {
            from_workspace_id: s.production,
            to_workspace_id: s.staging,
            amount: Credits::from_whole_credits(5)?,
            memo: Some("top up staging for the load test".into()),
            idempotency_key: "demo-seed-transfer".into(),
            created_by_user_id: Some(s.owner_id),
        },
        at,
    )
    .await?;
    Ok(())
}

/// A budget on the chatbot, a low-balance alert on Production for the owner, and
/// auto-reload on Production when the card was seeded.
async fn seed_policies(
    db: &DatabaseConnection,
    s: &Seeded,
    has_card: bool,
    now: DateTime<Utc>,
) -> Result<()> {
    let budget = Credits::from_whole_credits(50)?;
    accounts::set_project_budget(db, s.chatbot, Some(budget), BudgetPeriod::Monthly, now).await?;
    alert_thresholds::set_alert_thresholds(
        db,
        s.production,
        vec![AlertThresholdInput {
            amount: Credits::from_whole_credits(20)?,
            severity: AlertSeverity::Warning,
            recipient_ids: vec![s.owner_id],
        }],
        now,
    )
    .await?;
    auto_reload_settings::configure_auto_reload(
        db,
        AutoReloadInput {
            workspace_id: s.production,
            enabled: has_card,
            threshold: Credits::from_whole_credits(10)?,
            amount: Credits::from_whole_credits(50)?,
            payment_method_id: None,
            max_reloads_per_day: 3,
        },
        now,
    )
    .await?;
    Ok(())
}
