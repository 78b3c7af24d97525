//! The model catalog and its prices, an account's pricing agreement (volume
//! discount and invoice terms), and cost estimates priced exactly as a debit would be.
//!
//! Every function validates its input before it writes anything and reports a bad
//! field as INVALID_INPUT with a message naming the field and the allowed range.

use crate::accounts::Name;
use crate::debits::budget;
use crate::debits::usage::{
    ProjectRef, account_discount, active_model, budget_remaining, resolve_project,
};
use crate::error::{BillingError, Result};
use crate::ledger::{self, load_workspace};
use crate::money::{Credits, DiscountBps, NANOS_PER_CREDIT};
use crate::pricing::{self, CostBreakdown, TokenPrice};
use chrono::{DateTime, Utc};
use entity::{accounts, models};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use uuid::Uuid;

// --- pricing agreement -------------------------------------------------------------

/// Longest payment term for invoice billing, in days. A year covers every real
/// enterprise contract (net 30/60/90 are usual); anything longer is a typo or credit
/// the platform would never extend.
pub const PAYMENT_TERMS_DAYS_MAX: i32 = 365;

/// Sets an account's enterprise terms: verification (which allows invoice billing),
/// the volume discount taken off every usage charge, and the payment terms of its
/// invoices (0..=[`PAYMENT_TERMS_DAYS_MAX`] days; 0 means due on issue).
///
/// The new discount applies to usage priced from now on; charges already recorded
/// keep their price. NOT_FOUND for an unknown account. One conditional UPDATE, so
/// there is nothing to race with.
pub async fn set_pricing_agreement(
    db: &DatabaseConnection,
    account_id: Uuid,
    verified: bool,
    volume_discount: DiscountBps,
    payment_terms_days: i32,
    _now: DateTime<Utc>,
) -> Result<accounts::Model> {
    if !(0..=PAYMENT_TERMS_DAYS_MAX).contains(&payment_terms_days) {
        return Err(BillingError::invalid(format!(
            "paymentTermsDays must be between 0 and {PAYMENT_TERMS_DAYS_MAX}, \
             got {payment_terms_days}"
        )));
    }
    use accounts::Column as A;
    let mut rows = accounts::Entity::update_many()
        .col_expr(A::Verified, Expr::value(verified))
        .col_expr(
            A::VolumeDiscountBps,
            Expr::value(i32::from(volume_discount.bps())),
        )
        .col_expr(A::PaymentTermsDays, Expr::value(payment_terms_days))
        .filter(A::Id.eq(account_id))
        .exec_with_returning(db)
        .await?;
    rows.pop().ok_or(BillingError::NotFound("account"))
}

// --- model catalog -----------------------------------------------------------------

/// Longest model id. Ids are what the gateway sends with every usage record and
/// what appears on invoices, so they stay short and printable.
pub const MODEL_ID_LEN_MAX: usize = 100;

/// Highest price per million tokens of either kind: 10 000 credits. Real prices are
/// a few credits to a few hundred; the cap catches a price entered in nanocredits or
/// per token instead of per million before it drains customers' balances.
pub const MODEL_PRICE_PER_MILLION_MAX: Credits = Credits::from_nanos(10_000 * NANOS_PER_CREDIT);

/// A model as the platform admin describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInput {
    /// e.g. `"openai/gpt-4o"`: 1..=[`MODEL_ID_LEN_MAX`] characters of `a-z 0-9 . _ - / :`.
    pub id: String,
    /// Display name, 1..=[`crate::accounts::NAME_LEN_MAX`] characters (trimmed).
    pub name: String,
    pub prompt_price_per_million: Credits,
    pub completion_price_per_million: Credits,
    /// False retires the model: it takes no new usage but keeps its history.
    pub active: bool,
}

/// Checks a model id. Upper case is refused rather than folded: the id is matched
/// exactly when usage is recorded, so silently storing another spelling than the one
/// the admin typed would make the gateway's requests fail as "unknown model".
fn check_model_id(id: &str) -> Result<()> {
    let allowed = |c: char| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/' | ':')
    };
    if id.is_empty() || id.len() > MODEL_ID_LEN_MAX || !id.chars().all(allowed) {
        return Err(BillingError::invalid(format!(
            "model id must be 1 to {MODEL_ID_LEN_MAX} characters of lowercase letters, \
             digits and . _ - / :"
        )));
    }
    Ok(())
}

fn check_model_price(field: &str, price: Credits) -> Result<()> {
    if price.is_negative() || price > MODEL_PRICE_PER_MILLION_MAX {
        return Err(BillingError::invalid(format!(
            "{field} must be between 0 and {MODEL_PRICE_PER_MILLION_MAX} credits, got {price}"
        )));
    }
    Ok(())
}

/// Creates a model or updates the one with this id (name, prices, active flag,
/// `updated_at`; `created_at` is kept). Deactivating (`active = false`) keeps the row,
/// so past usage, reservations and rollups still point at it; new usage of it is
/// refused by [`crate::debits::usage`]. New prices apply to usage priced from now on.
///
/// One `INSERT … ON CONFLICT (id) DO UPDATE … RETURNING`, so concurrent upserts of
/// the same id cannot fail on the primary key.
pub async fn upsert_model(
    db: &DatabaseConnection,
    input: ModelInput,
    now: DateTime<Utc>,
) -> Result<models::Model> {
    check_model_id(&input.id)?;
    let name = Name::parse("name", &input.name)?;
    check_model_price("promptPricePerMillion", input.prompt_price_per_million)?;
    check_model_price(
        "completionPricePerMillion",
        input.completion_price_per_million,
    )?;
    use models::Column as M;
    let row = models::ActiveModel {
        id: Set(input.id),
        name: Set(name.as_str().to_owned()),
        prompt_price_per_million_nanos: Set(input.prompt_price_per_million.nanos()),
        completion_price_per_million_nanos: Set(input.completion_price_per_million.nanos()),
        active: Set(input.active),
        created_at: Set(now),
        updated_at: Set(now),
    };
    let model = models::Entity::insert(row)
        .on_conflict(
            OnConflict::column(M::Id)
                .update_columns([
                    M::Name,
                    M::PromptPricePerMillionNanos,
                    M::CompletionPricePerMillionNanos,
                    M::Active,
                    M::UpdatedAt,
                ])
                .to_owned(),
        )
        .exec_with_returning(db)
        .await?;
    Ok(model)
}

/// The catalog ordered by id (byte order, sorted here rather than in SQL so the
/// order is the same on every backend and collation); retired models only with
/// `include_inactive`.
pub async fn list_models(
    db: &DatabaseConnection,
    include_inactive: bool,
) -> Result<Vec<models::Model>> {
    let mut query = models::Entity::find();
    if !include_inactive {
        query = query.filter(models::Column::Active.eq(true));
    }
    let mut rows = query.all(db).await?;
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(rows)
}

// --- cost estimates ----------------------------------------------------------------

/// What a request would cost, before it is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub model: models::Model,
    /// List prices, the discount taken off and the total that would be charged.
    pub breakdown: CostBreakdown,
    /// With a workspace: whether the charge fits its available credits (and its
    /// project's remaining budget) right now. None without a workspace.
    pub affordable: Option<bool>,
}

/// Prices `prompt_tokens` + `completion_tokens` on an active model exactly as
/// recording the usage would (same rounding, same token limits).
///
/// Without a workspace: list price, no discount, `affordable` None. With a
/// workspace (and optionally one of its projects): the account's volume discount
/// applies and `affordable` says whether the total fits the workspace's available
/// credits (balance − reserved) and, for a capped project, what is left of its
/// budget this period. A project whose period has ended counts its spend as zero
/// (the next debit would roll it over); reserved credits still count. Reads only: a
/// quote never rolls a period or writes anything.
///
/// Errors: INVALID_INPUT for an unknown or retired model or token counts out of
/// range; NOT_FOUND for an unknown workspace or a project not in it.
pub async fn estimate_cost(
    db: &DatabaseConnection,
    model_id: &str,
    prompt_tokens: i64,
    completion_tokens: i64,
    workspace: Option<(Uuid, Option<Uuid>)>,
    now: DateTime<Utc>,
) -> Result<Estimate> {
    let model = active_model(db, model_id).await?;
    let price = TokenPrice {
        prompt_per_million: Credits::from_nanos(model.prompt_price_per_million_nanos),
        completion_per_million: Credits::from_nanos(model.completion_price_per_million_nanos),
    };
    let Some((workspace_id, project_id)) = workspace else {
        let breakdown =
            pricing::usage_cost(price, prompt_tokens, completion_tokens, DiscountBps::ZERO)?;
        return Ok(Estimate {
            model,
            breakdown,
            affordable: None,
        });
    };
    let ws = load_workspace(db, workspace_id).await?;
    let project = match project_id {
        Some(id) => resolve_project(db, workspace_id, &ProjectRef::Id(id)).await?,
        None => None,
    };
    let discount = account_discount(db, ws.account_id).await?;
    let breakdown = pricing::usage_cost(price, prompt_tokens, completion_tokens, discount)?;
    let mut affordable = breakdown.total <= ledger::available(&ws);
    if let Some(mut project) = project {
        let start = budget::period_start(project.budget_period, now, project.budget_period_start);
        if start > project.budget_period_start {
            project.budget_spent_nanos = 0;
        }
        affordable &= breakdown.total <= budget_remaining(&project);
    }
    Ok(Estimate {
        model,
        breakdown,
        affordable: Some(affordable),
    })
}

// --- reads -------------------------------------------------------------------------

/// Models by id, retired ones included (usage keeps pointing at its model).
pub async fn models_by_ids<C: sea_orm::ConnectionTrait>(
    c: &C,
    ids: &[String],
) -> Result<std::collections::HashMap<String, models::Model>> {
    crate::batch::by_keys::<models::Entity, _, _>(c, models::Column::Id, ids, |m| m.id.clone())
        .await
}

/// The credit packages on sale (active), in display order.
pub async fn packages_on_sale(
    db: &DatabaseConnection,
) -> Result<Vec<entity::credit_packages::Model>> {
    use entity::credit_packages::{Column, Entity};
    use sea_orm::QueryOrder;
    Ok(Entity::find()
        .filter(Column::Active.eq(true))
        .order_by_asc(Column::Position)
        .all(db)
        .await?)
}
