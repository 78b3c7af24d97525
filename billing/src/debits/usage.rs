//! Recording usage: price a model call and debit it, or refuse it and write nothing.

use crate::db::begin_write;
use crate::debits::budget;
use crate::debits::engine::{self, Op};
use crate::error::{BillingError, Result};
use crate::ids::{opt_uuid_str, request_hash};
use crate::money::{Credits, DiscountBps};
use chrono::{DateTime, Utc};
use entity::{accounts, models, projects, usage_events};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter};
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

/// Prices one model call and debits it from the workspace's available credits and
/// its project's budget for the current period, in one transaction: usage event,
/// ledger entries, cached balance, project spend, daily rollup and balance event. A
/// call that does not fit is refused with INSUFFICIENT_CREDITS or BUDGET_EXCEEDED and
/// writes nothing. The same request id twice records once.
///
/// Pushes no follow-up job (there is no queue here): the reload purchase or alert it
/// may write waits for the worker's sweep. [`record_usage_then_push`] pushes them.
pub async fn record_usage(
    db: &DatabaseConnection,
    req: UsageRequest,
    now: DateTime<Utc>,
) -> Result<Recorded> {
    engine::run_one(db, Op::usage(req)?, now, None)
        .await?
        .into_usage()
}

/// [`record_usage`], then, after its commit, the jobs of what it wrote (a reload
/// purchase, alert e-mails, webhook deliveries) pushed to `jobs`, by the rule the
/// group-commit writer applies to each batch.
pub async fn record_usage_then_push(
    db: &DatabaseConnection,
    jobs: &dyn crate::jobs::JobSink,
    req: UsageRequest,
    now: DateTime<Utc>,
) -> Result<Recorded> {
    engine::run_one(db, Op::usage(req)?, now, Some(jobs))
        .await?
        .into_usage()
}

pub(crate) fn usage_description(event: &usage_events::Model) -> String {
    format!(
        "{}: {} prompt + {} completion tokens",
        event.model_id, event.prompt_tokens, event.completion_tokens
    )
}

/// What is left under a project's cap in the current period (zero when over it).
pub fn budget_remaining(project: &projects::Model) -> Credits {
    let limit = project.budget_limit_nanos.unwrap_or(i64::MAX);
    let used = project
        .budget_spent_nanos
        .saturating_add(project.budget_reserved_nanos);
    Credits::from_nanos(Ord::max(limit.saturating_sub(used), 0))
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
