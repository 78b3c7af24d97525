//! Recording usage: price a model call and debit it, or refuse it and write nothing.

use crate::debits::budget;
use crate::db::begin_write;
use crate::error::{BillingError, Result};
use crate::ids::{IdempotencyKey, new_id, opt_uuid_str, request_hash};
use crate::ledger::{self, EntrySpec, Guard, LedgerAccount, PostingRefs, system_account};
use crate::money::{Credits, DiscountBps};
use crate::pricing::{self, CostBreakdown, TokenPrice};
use chrono::{DateTime, Utc};
use entity::enums::{BalanceChangeCause, LedgerEntryKind};
use entity::{accounts, models, projects, usage_events};
use sea_orm::sea_query::{Condition, Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    EntityTrait, IntoActiveModel, QueryFilter,
};
use uuid::Uuid;

/// Which project a usage record is tagged with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ProjectRef {
    #[default]
    None,
    Id(Uuid),
    Tag(String),
}

#[derive(Clone, Debug)]
pub struct UsageRequest {
    pub workspace_id: Uuid,
    pub project: ProjectRef,
    pub model_id: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// The caller's request id: the idempotency key of this record.
    pub request_id: String,
    /// The member the usage is attributed to.
    pub user_id: Option<Uuid>,
    /// The workspace API key that sent it.
    pub api_key_id: Option<Uuid>,
}

/// A recorded usage event; `replayed` when the request id had been recorded before.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub event: usage_events::Model,
    pub replayed: bool,
}

/// Everything needed to price a call against a workspace, read before the write
/// transaction (prices and the discount in force when the request arrives).
#[derive(Clone, Debug)]
pub(crate) struct PricingContext {
    pub account_id: Uuid,
    pub discount: DiscountBps,
    pub model: models::Model,
    pub project: Option<projects::Model>,
}

impl PricingContext {
    pub fn price(&self) -> TokenPrice {
        TokenPrice {
            prompt_per_million: Credits::from_nanos(self.model.prompt_price_per_million_nanos),
            completion_per_million: Credits::from_nanos(
                self.model.completion_price_per_million_nanos,
            ),
        }
    }

    pub fn cost(&self, prompt_tokens: i64, completion_tokens: i64) -> Result<CostBreakdown> {
        Ok(pricing::usage_cost(
            self.price(),
            prompt_tokens,
            completion_tokens,
            self.discount,
        )?)
    }
}

pub(crate) async fn account_discount<C: ConnectionTrait>(
    c: &C,
    account_id: Uuid,
) -> Result<DiscountBps> {
    let account = accounts::Entity::find_by_id(account_id)
        .one(c)
        .await?
        .ok_or(BillingError::NotFound("account"))?;
    DiscountBps::new(account.volume_discount_bps).map_err(|e| BillingError::Internal(e.to_string()))
}

/// A model that can be used now (inactive models keep their history but take no new usage).
pub(crate) async fn active_model<C: ConnectionTrait>(
    c: &C,
    model_id: &str,
) -> Result<models::Model> {
    match models::Entity::find_by_id(model_id.to_owned())
        .one(c)
        .await?
    {
        Some(model) if model.active => Ok(model),
        Some(_) => Err(BillingError::invalid(format!(
            "model {model_id} is no longer available"
        ))),
        None => Err(BillingError::invalid(format!("unknown model {model_id}"))),
    }
}

pub(crate) async fn resolve_project<C: ConnectionTrait>(
    c: &C,
    workspace_id: Uuid,
    project: &ProjectRef,
) -> Result<Option<projects::Model>> {
    let found = match project {
        ProjectRef::None => return Ok(None),
        ProjectRef::Id(id) => projects::Entity::find_by_id(*id).one(c).await?,
        ProjectRef::Tag(tag) => {
            projects::Entity::find()
                .filter(projects::Column::WorkspaceId.eq(workspace_id))
                .filter(projects::Column::Tag.eq(tag.as_str()))
                .one(c)
                .await?
        }
    };
    match found {
        Some(p) if p.workspace_id == workspace_id => Ok(Some(p)),
        _ => Err(BillingError::NotFound("project")),
    }
}

pub(crate) async fn pricing_context<C: ConnectionTrait>(
    c: &C,
    workspace_id: Uuid,
    model_id: &str,
    project: &ProjectRef,
) -> Result<PricingContext> {
    let workspace = ledger::load_workspace(c, workspace_id).await?;
    let discount = account_discount(c, workspace.account_id).await?;
    let model = active_model(c, model_id).await?;
    let project = resolve_project(c, workspace_id, project).await?;
    Ok(PricingContext {
        account_id: workspace.account_id,
        discount,
        model,
        project,
    })
}

/// The request's payload as sent (the project as named, not as resolved), so that a
/// retry is recognised before anything is looked up: a retry after the model was
/// deactivated or the project renamed still gets its original answer.
pub(crate) fn usage_hash(req: &UsageRequest) -> String {
    request_hash(&[
        "usage",
        &req.model_id,
        &req.prompt_tokens.to_string(),
        &req.completion_tokens.to_string(),
        &req.project.fingerprint(),
        &opt_uuid_str(req.user_id),
    ])
}

impl ProjectRef {
    /// A stable text form for request fingerprints.
    pub(crate) fn fingerprint(&self) -> String {
        match self {
            Self::None => String::new(),
            Self::Id(id) => format!("id:{id}"),
            Self::Tag(tag) => format!("tag:{tag}"),
        }
    }
}

/// Usage may only be attributed to a member of the workspace's account.
pub(crate) async fn check_attributed_user<C: ConnectionTrait>(
    c: &C,
    account_id: Uuid,
    user_id: Option<Uuid>,
) -> Result<()> {
    let Some(user_id) = user_id else {
        return Ok(());
    };
    entity::account_members::Entity::find_by_id((account_id, user_id))
        .one(c)
        .await?
        .map(|_| ())
        .ok_or(BillingError::NotFound("user"))
}

/// The earlier result for a request id, or IDEMPOTENCY_CONFLICT when its payload differs.
pub(crate) async fn existing_usage<C: ConnectionTrait>(
    c: &C,
    workspace_id: Uuid,
    request_id: &str,
    hash: &str,
) -> Result<Option<usage_events::Model>> {
    let found = usage_events::Entity::find()
        .filter(usage_events::Column::WorkspaceId.eq(workspace_id))
        .filter(usage_events::Column::RequestId.eq(request_id))
        .one(c)
        .await?;
    match found {
        Some(event) if event.request_hash == hash => Ok(Some(event)),
        Some(_) => Err(BillingError::IdempotencyConflict),
        None => Ok(None),
    }
}

/// Prices one model call and debits it from the workspace's available credits and
/// its project's budget for the current period, in one transaction: usage event,
/// ledger entries, cached balance, project spend, daily rollup and balance event. A
/// call that does not fit is refused with INSUFFICIENT_CREDITS or BUDGET_EXCEEDED and
/// writes nothing. The same request id twice records once.
pub async fn record_usage(
    db: &DatabaseConnection,
    req: UsageRequest,
    now: DateTime<Utc>,
) -> Result<Recorded> {
    let request_id = IdempotencyKey::parse("requestId", &req.request_id)?;
    let hash = usage_hash(&req);
    // Fast path for retries: no write lock taken for a request already recorded.
    if let Some(event) = existing_usage(db, req.workspace_id, request_id.as_str(), &hash).await? {
        return Ok(Recorded {
            event,
            replayed: true,
        });
    }
    let ctx = pricing_context(db, req.workspace_id, &req.model_id, &req.project).await?;
    check_attributed_user(db, ctx.account_id, req.user_id).await?;
    let cost = ctx.cost(req.prompt_tokens, req.completion_tokens)?.total;
    let project_id = ctx.project.as_ref().map(|p| p.id);

    let event = usage_events::Model {
        id: new_id(),
        workspace_id: req.workspace_id,
        project_id,
        user_id: req.user_id,
        api_key_id: req.api_key_id,
        model_id: ctx.model.id.clone(),
        prompt_tokens: req.prompt_tokens,
        completion_tokens: req.completion_tokens,
        cost_nanos: cost.nanos(),
        shortfall_nanos: 0,
        request_id: request_id.as_str().to_owned(),
        request_hash: hash.clone(),
        reservation_id: None,
        created_at: now,
    };
    let tx = begin_write(db).await?;
    match debit_usage(&tx, &ctx, &event, now).await {
        Ok(()) => {
            tx.commit().await?;
            Ok(Recorded {
                event,
                replayed: false,
            })
        }
        Err(e) => {
            tx.rollback().await?;
            // Lost a race with the same request id: answer as a replay.
            if e.is_unique_violation()
                && let Some(event) =
                    existing_usage(db, req.workspace_id, request_id.as_str(), &hash).await?
            {
                return Ok(Recorded {
                    event,
                    replayed: true,
                });
            }
            Err(e)
        }
    }
}

/// The writes of one admitted usage record, inside the caller's transaction. The
/// workspace row is locked first and the project row second, always in that order.
async fn debit_usage(
    tx: &DatabaseTransaction,
    ctx: &PricingContext,
    event: &usage_events::Model,
    now: DateTime<Utc>,
) -> Result<()> {
    let cost = Credits::from_nanos(event.cost_nanos);
    let ws = ledger::change_workspace(
        tx,
        event.workspace_id,
        cost.checked_neg()?,
        Credits::ZERO,
        Guard::AvailableAtLeast(cost),
        true,
    )
    .await?;
    let Some(ws) = ws else {
        let ws = ledger::load_workspace(tx, event.workspace_id).await?;
        return Err(BillingError::InsufficientCredits {
            available: ledger::available(&ws),
        });
    };
    if let Some(project) = &ctx.project {
        charge_project(tx, project, cost, Credits::ZERO, Some(cost), now).await?;
    }
    usage_events::Entity::insert(event.clone().into_active_model().reset_all())
        .exec_without_returning(tx)
        .await?;
    let balance_after = Credits::from_nanos(ws.balance_nanos);
    ledger::post(
        tx,
        "USAGE",
        format!("usage:{}", event.id),
        PostingRefs {
            usage_event_id: Some(event.id),
            ..Default::default()
        },
        &[
            EntrySpec {
                account: LedgerAccount::Workspace(event.workspace_id),
                kind: LedgerEntryKind::Usage,
                amount: cost.checked_neg()?,
                balance_after: Some(balance_after),
                description: usage_description(event),
            },
            EntrySpec {
                account: LedgerAccount::System(system_account::USAGE_REVENUE),
                kind: LedgerEntryKind::Usage,
                amount: cost,
                balance_after: None,
                description: usage_description(event),
            },
        ],
        now,
    )
    .await?;
    ledger::add_to_rollup(tx, event).await?;
    ledger::balance_event(tx, &ws, BalanceChangeCause::Usage, now).await?;
    crate::policies::auto_reload::after_balance_change(tx, &ws, now).await?;
    crate::policies::alerts::after_balance_change(tx, &ws, now).await?;
    Ok(())
}

pub(crate) fn usage_description(event: &usage_events::Model) -> String {
    format!(
        "{}: {} prompt + {} completion tokens",
        event.model_id, event.prompt_tokens, event.completion_tokens
    )
}

/// Moves a project's budget counters: `spent_delta` to the current period's spend and
/// `reserved_delta` to its held credits. With `admit = Some(n)`, refuses with
/// BUDGET_EXCEEDED unless `n` more fits under the cap (spent + held + n <= limit).
/// Rolls the period over first when a new one has begun.
pub(crate) async fn charge_project<C: ConnectionTrait>(
    c: &C,
    project: &projects::Model,
    spent_delta: Credits,
    reserved_delta: Credits,
    admit: Option<Credits>,
    now: DateTime<Utc>,
) -> Result<()> {
    use projects::Column as P;
    roll_budget_period(c, project, now).await?;
    let mut update = projects::Entity::update_many()
        .col_expr(
            P::BudgetSpentNanos,
            Expr::col(P::BudgetSpentNanos).add(spent_delta.nanos()),
        )
        .col_expr(
            P::BudgetReservedNanos,
            Expr::col(P::BudgetReservedNanos).add(reserved_delta.nanos()),
        )
        .filter(P::Id.eq(project.id));
    if let Some(needed) = admit {
        update = update.filter(
            Condition::any().add(P::BudgetLimitNanos.is_null()).add(
                Expr::col(P::BudgetSpentNanos)
                    .add(Expr::col(P::BudgetReservedNanos))
                    .add(needed.nanos())
                    .lte(Expr::col(P::BudgetLimitNanos)),
            ),
        );
    }
    if update.exec(c).await?.rows_affected == 1 {
        return Ok(());
    }
    let current = projects::Entity::find_by_id(project.id)
        .one(c)
        .await?
        .ok_or(BillingError::NotFound("project"))?;
    Err(BillingError::BudgetExceeded {
        available: budget_remaining(&current),
    })
}

/// What is left under a project's cap in the current period (zero when over it).
pub fn budget_remaining(project: &projects::Model) -> Credits {
    let limit = project.budget_limit_nanos.unwrap_or(i64::MAX);
    let used = project
        .budget_spent_nanos
        .saturating_add(project.budget_reserved_nanos);
    Credits::from_nanos(Ord::max(limit.saturating_sub(used), 0))
}

/// Starts a new budget period when the stored one has ended: spend back to zero.
/// Conditional on the stored start, so concurrent rollers reset it exactly once.
pub(crate) async fn roll_budget_period<C: ConnectionTrait>(
    c: &C,
    project: &projects::Model,
    now: DateTime<Utc>,
) -> Result<bool> {
    use projects::Column as P;
    let start = budget::period_start(project.budget_period, now, project.budget_period_start);
    if start <= project.budget_period_start {
        return Ok(false);
    }
    let result = projects::Entity::update_many()
        .col_expr(P::BudgetSpentNanos, Expr::value(0i64))
        .col_expr(P::BudgetPeriodStart, Expr::value(start))
        .filter(P::Id.eq(project.id))
        .filter(P::BudgetPeriod.eq(project.budget_period))
        .filter(P::BudgetPeriodStart.lt(start))
        .exec(c)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Rolls every project whose calendar budget period has ended (the worker's periodic
/// sweep; usage also rolls lazily, so this keeps dashboards current). One conditional
/// UPDATE per period kind, so it is cheap and idempotent. Returns how many rolled.
pub async fn roll_budget_periods(db: &DatabaseConnection, now: DateTime<Utc>) -> Result<u64> {
    use entity::enums::BudgetPeriod;
    use projects::Column as P;
    let mut rolled = 0;
    for period in [
        BudgetPeriod::Daily,
        BudgetPeriod::Weekly,
        BudgetPeriod::Monthly,
    ] {
        let start = budget::period_start(period, now, now);
        let tx = begin_write(db).await?;
        let result = projects::Entity::update_many()
            .col_expr(P::BudgetSpentNanos, Expr::value(0i64))
            .col_expr(P::BudgetPeriodStart, Expr::value(start))
            .filter(P::BudgetPeriod.eq(period))
            .filter(P::BudgetPeriodStart.lt(start))
            .exec(&tx)
            .await?;
        tx.commit().await?;
        rolled += result.rows_affected;
    }
    Ok(rolled)
}
