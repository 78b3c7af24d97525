//! The read side for dashboards: usage reports and spend projections.
//!
//! Everything here reads the daily rollup tables (`usage_daily`, and `usage_daily_by`
//! for one-dimension workspace reports) and never the raw `usage_events`:
//! `usage_daily` holds one row per (workspace, UTC day, project, user, API key,
//! model), written in the same transaction as the usage it counts, so a report over
//! months costs a few hundred rows instead of millions of events. The
//! price of that is day granularity: every window here is a whole number of UTC days.
//!
//! The batch functions answer many workspaces (or projects) with ONE SQL statement,
//! because they sit behind GraphQL DataLoaders: the number of statements per GraphQL
//! request must not grow with the number of workspaces on the page.
//!
//! Sums are computed by the database and cast to BIGINT: PostgreSQL returns
//! `SUM(bigint)` as NUMERIC, SQLite as INTEGER, and the cast makes both decode as
//! `i64`. A sum beyond `i64` is refused by the database (PostgreSQL: "bigint out of
//! range"; SQLite: "integer overflow") and reported as LIMIT_EXCEEDED, never wrapped.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Days, NaiveDate, NaiveTime, TimeDelta, Utc};
use entity::usage_daily;
use sea_orm::sea_query::{Expr, ExprTrait, Func, Query, SelectStatement, UnionType};
use sea_orm::{ConnectionTrait, DbErr, QueryResult, RuntimeErr};
use uuid::Uuid;

use crate::error::{BillingError, Result};
use crate::money::Credits;

/// The longest report window, in days (a little over a year, so "last 12 months"
/// and year-over-year views fit). Bounds the rows a single report can aggregate.
pub const RANGE_DAYS_MAX: i64 = 400;

/// The longest window [`average_daily_spend`] averages over, in days.
pub const SPEND_WINDOW_DAYS_MAX: i64 = 365;

/// The most distinct scopes (or workspace ids) one batched call accepts. Matches
/// async-graphql's default DataLoader batch size, and keeps the statement's bound
/// parameters far below SQLite's and PostgreSQL's limits. More is LIMIT_EXCEEDED.
pub const BATCH_MAX: usize = 1_000;

/// Nanoseconds in one day, for exact depletion arithmetic.
const NANOS_PER_DAY: i128 = 86_400_000_000_000;

/// Nanoseconds in one second.
const NANOS_PER_SECOND: i128 = 1_000_000_000;

/// A column a usage report can be broken down by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UsageDimension {
    Project,
    /// The workspace member the usage is attributed to.
    Member,
    Model,
    ApiKey,
    /// The UTC day.
    Day,
}

impl UsageDimension {
    fn column(self) -> usage_daily::Column {
        use usage_daily::Column as D;
        match self {
            Self::Project => D::ProjectId,
            Self::Member => D::UserId,
            Self::Model => D::ModelId,
            Self::ApiKey => D::ApiKeyId,
            Self::Day => D::Day,
        }
    }

    /// The result column's name (distinct from every other alias in the query).
    fn alias(self) -> &'static str {
        match self {
            Self::Project => "dim_project_id",
            Self::Member => "dim_user_id",
            Self::Model => "dim_model_id",
            Self::ApiKey => "dim_api_key_id",
            Self::Day => "dim_day",
        }
    }
}

/// Whose usage a report covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum UsageScope {
    Workspace(Uuid),
    Project(Uuid),
}

/// Sums over a set of rollup rows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost: Credits,
}

impl UsageTotals {
    /// Adds `other` into `self`; overflow is LIMIT_EXCEEDED, never a wrap.
    fn checked_add_assign(&mut self, other: &Self) -> Result<()> {
        let overflow = || BillingError::LimitExceeded("usage totals out of range".into());
        self.requests = self
            .requests
            .checked_add(other.requests)
            .ok_or_else(overflow)?;
        self.prompt_tokens = self
            .prompt_tokens
            .checked_add(other.prompt_tokens)
            .ok_or_else(overflow)?;
        self.completion_tokens = self
            .completion_tokens
            .checked_add(other.completion_tokens)
            .ok_or_else(overflow)?;
        self.cost = self.cost.checked_add(other.cost).map_err(|_| overflow())?;
        Ok(())
    }
}

/// One group of a report. Only the dimensions the report was grouped by are set; a
/// grouped dimension is `None` when the usage had no such attribution (no project,
/// no member, no API key: stored as the nil UUID in the rollup).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRow {
    pub project_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub model_id: Option<String>,
    pub api_key_id: Option<Uuid>,
    pub day: Option<NaiveDate>,
    pub totals: UsageTotals,
}

impl UsageRow {
    /// A row with these sums and no dimension set yet.
    fn of(totals: UsageTotals) -> Self {
        Self {
            project_id: None,
            user_id: None,
            model_id: None,
            api_key_id: None,
            day: None,
            totals,
        }
    }

    fn compare(&self, other: &Self, dimension: UsageDimension) -> Ordering {
        match dimension {
            UsageDimension::Project => self.project_id.cmp(&other.project_id),
            UsageDimension::Member => self.user_id.cmp(&other.user_id),
            UsageDimension::Model => self.model_id.cmp(&other.model_id),
            UsageDimension::ApiKey => self.api_key_id.cmp(&other.api_key_id),
            UsageDimension::Day => self.day.cmp(&other.day),
        }
    }
}

/// A scope's usage over a window: the totals, and the rows of the requested breakdown
/// (none when no breakdown was requested).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageReport {
    pub totals: UsageTotals,
    pub rows: Vec<UsageRow>,
}

/// Validated [from, to) window in whole UTC days.
///
/// Rollups have day granularity, so a window can only start and end on a UTC day
/// boundary. [`DayRange::new`] widens the requested instants outwards: `from` is
/// floored to the start of its UTC day and `to` is ceiled to the start of the next
/// one, so every instant asked for is covered (a report never silently drops the
/// partial first or last day). A `to` exactly at midnight stays exclusive: that day
/// is not included.
///
/// The fields are public for reading; [`usage_reports`] re-checks a hand-built range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DayRange {
    /// The first day included.
    pub first: NaiveDate,
    /// The first day NOT included.
    pub end: NaiveDate,
}

impl DayRange {
    /// The whole UTC days covering [from, to).
    ///
    /// `from >= to` is INVALID_INPUT (an empty or reversed window is a caller bug,
    /// not an empty report); a window of more than [`RANGE_DAYS_MAX`] days is
    /// LIMIT_EXCEEDED.
    pub fn new(from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Self> {
        if from >= to {
            return Err(BillingError::invalid("`from` must be before `to`"));
        }
        let first = from.date_naive();
        let end = if to.time() == NaiveTime::MIN {
            to.date_naive()
        } else {
            to.date_naive()
                .succ_opt()
                .ok_or_else(|| BillingError::invalid("`to` is beyond the supported dates"))?
        };
        let range = Self { first, end };
        range.check()?;
        Ok(range)
    }

    /// How many days the window covers.
    pub fn days(&self) -> i64 {
        (self.end - self.first).num_days()
    }

    fn check(&self) -> Result<()> {
        if self.first >= self.end {
            return Err(BillingError::invalid("`from` must be before `to`"));
        }
        if self.days() > RANGE_DAYS_MAX {
            return Err(BillingError::LimitExceeded(format!(
                "a usage report covers at most {RANGE_DAYS_MAX} days"
            )));
        }
        Ok(())
    }
}

/// Usage reports for many scopes over one window, in ONE SQL statement.
///
/// This feeds a GraphQL DataLoader, so the statement count must not depend on how
/// many scopes are asked for: workspace scopes and project scopes are two branches
/// of one `UNION ALL` (a rollup row can count towards both its workspace and its
/// project, so they cannot share one `GROUP BY`). An empty `scopes` runs nothing.
///
/// - Every requested scope gets an entry, an empty report when it had no usage.
/// - Rows are grouped by the requested dimensions (duplicates ignored), ordered by
///   cost descending, then by the dimension values in the requested order, so equal
///   costs still come back in a stable order. An empty `group_by` gives totals only.
/// - Totals are the checked sum of the scope's groups; overflow is LIMIT_EXCEEDED.
/// - `Project(nil)` always gets an empty report: the nil UUID marks usage with *no*
///   project, and matching it would aggregate unattributed usage of every workspace.
///
/// Callers check access to each scope first; this function does not.
pub async fn usage_reports<C: ConnectionTrait>(
    c: &C,
    scopes: &[UsageScope],
    range: &DayRange,
    group_by: &[UsageDimension],
) -> Result<HashMap<UsageScope, UsageReport>> {
    range.check()?;
    let mut reports: HashMap<UsageScope, UsageReport> = HashMap::with_capacity(scopes.len());
    let (mut workspace_ids, mut project_ids) = (Vec::new(), Vec::new());
    for scope in scopes {
        if reports.contains_key(scope) {
            continue;
        }
        if reports.len() == BATCH_MAX {
            return Err(BillingError::LimitExceeded(format!(
                "at most {BATCH_MAX} usage scopes per batch"
            )));
        }
        reports.insert(scope.clone(), UsageReport::default());
        match scope {
            UsageScope::Workspace(id) => workspace_ids.push(*id),
            UsageScope::Project(id) if !id.is_nil() => project_ids.push(*id),
            UsageScope::Project(_) => {}
        }
    }
    let dimensions = dedup(group_by);

    let mut branches = [
        (ScopeKind::Workspace, workspace_ids),
        (ScopeKind::Project, project_ids),
    ]
    .into_iter()
    .filter(|(_, ids)| !ids.is_empty())
    .map(|(kind, ids)| report_branch(kind, ids, range, &dimensions));
    let Some(mut query) = branches.next() else {
        return Ok(reports);
    };
    for branch in branches {
        query.union(UnionType::All, branch);
    }

    let rows = c.query_all(&query).await.map_err(sum_error)?;
    for row in rows {
        let (scope, usage_row) = decode_report_row(&row, &dimensions)?;
        let report = reports.get_mut(&scope).ok_or_else(|| {
            BillingError::Internal(format!(
                "usage report row for an unrequested scope {scope:?}"
            ))
        })?;
        report.totals.checked_add_assign(&usage_row.totals)?;
        if !dimensions.is_empty() {
            report.rows.push(usage_row);
        }
    }
    for report in reports.values_mut() {
        sort_rows(&mut report.rows, &dimensions);
    }
    Ok(reports)
}

/// A report's rows by cost descending, then by the dimension values in the requested
/// order, so equal costs still come back in a stable order.
fn sort_rows(rows: &mut [UsageRow], dimensions: &[UsageDimension]) {
    rows.sort_by(|a, b| {
        b.totals.cost.cmp(&a.totals.cost).then_with(|| {
            dimensions
                .iter()
                .fold(Ordering::Equal, |o, d| o.then_with(|| a.compare(b, *d)))
        })
    });
}

/// Average daily spend of each workspace over the last `days` UTC days, today
/// included (today counts as a whole day, though it is still running).
///
/// The sum is divided by `days` and rounded DOWN to a whole nanocredit. Usage costs
/// round up because they are charges; this is a projection, never a charge, so no
/// money moves on it and the simplest exact rule will do (the error is below one
/// nanocredit per day). `days` must be in `1..=SPEND_WINDOW_DAYS_MAX`, else
/// INVALID_INPUT. One SQL statement for all ids; every id gets an entry, zero when
/// it spent nothing.
pub async fn average_daily_spend<C: ConnectionTrait>(
    c: &C,
    workspace_ids: &[Uuid],
    days: i64,
    now: DateTime<Utc>,
) -> Result<HashMap<Uuid, Credits>> {
    use entity::usage_daily_by::{Column as B, Entity as By};
    if !(1..=SPEND_WINDOW_DAYS_MAX).contains(&days) {
        return Err(BillingError::invalid(format!(
            "days must be between 1 and {SPEND_WINDOW_DAYS_MAX}"
        )));
    }
    let ids: Vec<Uuid> = dedup(workspace_ids);
    if ids.len() > BATCH_MAX {
        return Err(BillingError::LimitExceeded(format!(
            "at most {BATCH_MAX} workspaces per batch"
        )));
    }
    let mut spend: HashMap<Uuid, Credits> = ids.iter().map(|id| (*id, Credits::ZERO)).collect();
    if ids.is_empty() {
        return Ok(spend);
    }
    let today = now.date_naive();
    let out_of_range = || BillingError::invalid("`now` is beyond the supported dates");
    let window = DayRange {
        // `days` is in 1..=SPEND_WINDOW_DAYS_MAX here, so `unsigned_abs` is `days`.
        first: today
            .checked_sub_days(Days::new(days.unsigned_abs() - 1))
            .ok_or_else(out_of_range)?,
        end: today.succ_opt().ok_or_else(out_of_range)?,
    };

    // From the project rows of the one-dimension rollup: every event is in exactly one
    // of them (the nil project for none), so they sum to the workspace's spend (an
    // invariant `reservoir check` proves), in a few rows per day where `usage_daily`
    // has one per combination of every dimension (27 ms a dashboard page at 1,000,000
    // events, docs/BENCHMARKS.md).
    let mut query = Query::select();
    query
        .from(By)
        .expr_as(Expr::col(B::WorkspaceId), "workspace_id")
        .expr_as(
            Func::cast_as(Expr::col(B::CostNanos).sum(), "BIGINT"),
            "cost_nanos",
        )
        .and_where(Expr::col(B::WorkspaceId).is_in(ids))
        .and_where(Expr::col(B::Dimension).eq("project"))
        .and_where(Expr::col(B::Day).gte(window.first))
        .and_where(Expr::col(B::Day).lt(window.end))
        .group_by_col(B::WorkspaceId);
    let rows = c.query_all(&query).await.map_err(sum_error)?;
    for row in rows {
        let id: Uuid = row.try_get("", "workspace_id")?;
        let total: i64 = row.try_get("", "cost_nanos")?;
        let average = Credits::from_nanos(total.div_euclid(days));
        let entry = spend.get_mut(&id).ok_or_else(|| {
            BillingError::Internal(format!("spend row for an unrequested workspace {id}"))
        })?;
        *entry = average;
    }
    Ok(spend)
}

/// When a balance runs out at a constant daily spend: `now + balance / average` days.
///
/// Computed exactly in integer nanoseconds (`balance · 86 400 000 000 000 / average`,
/// in i128, which cannot overflow for any two `i64` amounts), rounded down, so the
/// projection errs early, never late. `None` means "not in sight": no spend (a zero
/// or, defensively, negative average), or a date beyond what `chrono` can represent.
/// A balance at or below zero is already depleted: `Some(now)`.
///
/// Pass the balance the caller means to project (typically `available`, i.e. the
/// balance less reserved credits).
pub fn projected_depletion_at(
    balance: Credits,
    average_daily_spend: Credits,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    if !average_daily_spend.is_positive() {
        return None;
    }
    let balance = i128::from(Ord::max(balance.nanos(), 0));
    let nanos = balance * NANOS_PER_DAY / i128::from(average_daily_spend.nanos());
    let secs = i64::try_from(nanos / NANOS_PER_SECOND).ok()?;
    let subsec = u32::try_from(nanos % NANOS_PER_SECOND).ok()?;
    now.checked_add_signed(TimeDelta::new(secs, subsec)?)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScopeKind {
    Workspace = 1,
    Project = 2,
}

impl ScopeKind {
    fn column(self) -> usage_daily::Column {
        match self {
            Self::Workspace => usage_daily::Column::WorkspaceId,
            Self::Project => usage_daily::Column::ProjectId,
        }
    }

    fn code(self) -> i32 {
        self as i32
    }

    fn decode(code: i32) -> Result<Self> {
        match code {
            1 => Ok(Self::Workspace),
            2 => Ok(Self::Project),
            other => Err(BillingError::Internal(format!(
                "unknown usage scope kind {other}"
            ))),
        }
    }
}

/// `SELECT kind, scope, dims…, sums… FROM usage_daily WHERE scope IN (…) AND day in
/// range GROUP BY scope, dims…` for one kind of scope.
fn report_branch(
    kind: ScopeKind,
    ids: Vec<Uuid>,
    range: &DayRange,
    dimensions: &[UsageDimension],
) -> SelectStatement {
    use usage_daily::Column as D;
    if kind == ScopeKind::Workspace
        && let Some(query) = report_branch_by_dimension(&ids, range, dimensions)
    {
        return query;
    }
    let scope = kind.column();
    let mut query = Query::select();
    query
        .from(usage_daily::Entity)
        .expr_as(Expr::val(kind.code()), "scope_kind")
        .expr_as(Expr::col(scope), "scope_id");
    for dimension in dimensions {
        query.expr_as(Expr::col(dimension.column()), dimension.alias());
    }
    query
        .expr_as(sum(D::Requests), "requests")
        .expr_as(sum(D::PromptTokens), "prompt_tokens")
        .expr_as(sum(D::CompletionTokens), "completion_tokens")
        .expr_as(sum(D::CostNanos), "cost_nanos")
        .and_where(Expr::col(scope).is_in(ids))
        .and_where(Expr::col(D::Day).gte(range.first))
        .and_where(Expr::col(D::Day).lt(range.end))
        .group_by_col(scope);
    for dimension in dimensions {
        // A project scope already groups by project_id.
        if !(kind == ScopeKind::Project && *dimension == UsageDimension::Project) {
            query.group_by_col(dimension.column());
        }
    }
    query
}

/// A workspace report by at most one dimension other than the day, from the
/// one-dimension rollups (`usage_daily_by`): a few rows per day instead of one per
/// combination of every dimension. Totals alone read the project rows (every event is
/// in exactly one of them). Same result columns as the `usage_daily` branch.
fn report_branch_by_dimension(
    ids: &[Uuid],
    range: &DayRange,
    dimensions: &[UsageDimension],
) -> Option<SelectStatement> {
    use entity::usage_daily_by::{Column as B, Entity as By};
    let name = rollup_dimension(dimensions)?;
    let value = match dimensions {
        [] => None,
        [UsageDimension::Model] => Some(B::DimModel),
        [_] => Some(B::DimUuid),
        _ => return None,
    };
    let mut query = Query::select();
    query
        .from(By)
        .expr_as(Expr::val(ScopeKind::Workspace.code()), "scope_kind")
        .expr_as(Expr::col(B::WorkspaceId), "scope_id");
    if let (Some(value), [dimension]) = (value, dimensions) {
        query.expr_as(Expr::col(value), dimension.alias());
    }
    query
        .expr_as(by_sum(B::Requests), "requests")
        .expr_as(by_sum(B::PromptTokens), "prompt_tokens")
        .expr_as(by_sum(B::CompletionTokens), "completion_tokens")
        .expr_as(by_sum(B::CostNanos), "cost_nanos")
        .and_where(Expr::col(B::WorkspaceId).is_in(ids.iter().copied()))
        .and_where(Expr::col(B::Dimension).eq(name))
        .and_where(Expr::col(B::Day).gte(range.first))
        .and_where(Expr::col(B::Day).lt(range.end))
        .group_by_col(B::WorkspaceId);
    if let Some(value) = value {
        query.group_by_col(value);
    }
    Some(query)
}

/// The `usage_daily_by` dimension whose rows answer a workspace report grouped by
/// `dimensions` (deduplicated), if one does. Totals alone read the project rows:
/// every event is in exactly one of them.
fn rollup_dimension(dimensions: &[UsageDimension]) -> Option<&'static str> {
    match dimensions {
        [] | [UsageDimension::Project] => Some("project"),
        [UsageDimension::Member] => Some("member"),
        [UsageDimension::ApiKey] => Some("api_key"),
        [UsageDimension::Model] => Some("model"),
        _ => None,
    }
}

/// `CAST(SUM(col) AS BIGINT)`: one integer type on both backends.
fn sum(column: usage_daily::Column) -> Expr {
    Func::cast_as(Expr::col(column).sum(), "BIGINT").into()
}

/// The same over `usage_daily_by`.
fn by_sum(column: entity::usage_daily_by::Column) -> Expr {
    Func::cast_as(Expr::col(column).sum(), "BIGINT").into()
}

/// The four sums every report statement selects.
fn decode_totals(row: &QueryResult) -> Result<UsageTotals> {
    Ok(UsageTotals {
        requests: row.try_get("", "requests")?,
        prompt_tokens: row.try_get("", "prompt_tokens")?,
        completion_tokens: row.try_get("", "completion_tokens")?,
        cost: Credits::from_nanos(row.try_get("", "cost_nanos")?),
    })
}

fn decode_report_row(
    row: &QueryResult,
    dimensions: &[UsageDimension],
) -> Result<(UsageScope, UsageRow)> {
    let scope_id: Uuid = row.try_get("", "scope_id")?;
    let scope = match ScopeKind::decode(row.try_get("", "scope_kind")?)? {
        ScopeKind::Workspace => UsageScope::Workspace(scope_id),
        ScopeKind::Project => UsageScope::Project(scope_id),
    };
    let mut out = UsageRow::of(decode_totals(row)?);
    let uuid = |d: UsageDimension| -> Result<Option<Uuid>> {
        let id: Uuid = row.try_get("", d.alias())?;
        Ok((!id.is_nil()).then_some(id))
    };
    for dimension in dimensions {
        match dimension {
            UsageDimension::Project => out.project_id = uuid(*dimension)?,
            UsageDimension::Member => out.user_id = uuid(*dimension)?,
            UsageDimension::ApiKey => out.api_key_id = uuid(*dimension)?,
            UsageDimension::Model => out.model_id = Some(row.try_get("", dimension.alias())?),
            UsageDimension::Day => out.day = Some(row.try_get("", dimension.alias())?),
        }
    }
    Ok((scope, out))
}

/// The distinct items, first occurrence first.
fn dedup<T: Copy + Eq + std::hash::Hash>(items: &[T]) -> Vec<T> {
    let mut seen = HashSet::with_capacity(items.len());
    items.iter().copied().filter(|x| seen.insert(*x)).collect()
}

/// A sum the database refused because it does not fit in BIGINT is LIMIT_EXCEEDED
/// (PostgreSQL: SQLSTATE 22003 from the cast; SQLite: "integer overflow" from SUM);
/// anything else stays a database error.
fn sum_error(e: DbErr) -> BillingError {
    let overflow = match &e {
        DbErr::Query(RuntimeErr::SqlxError(inner)) | DbErr::Exec(RuntimeErr::SqlxError(inner)) => {
            match &**inner {
                sea_orm::sqlx::Error::Database(db) => {
                    db.code().as_deref() == Some("22003") || db.message() == "integer overflow"
                }
                _ => false,
            }
        }
        _ => false,
    };
    if overflow {
        BillingError::LimitExceeded("usage sum out of range".into())
    } else {
        e.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, m: u32, d: u32, h: u32, min: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, s)
            .single()
            .expect("valid test time")
    }

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).expect("valid test date")
    }

    #[test]
    fn day_range_floors_from_and_ceils_to() {
        // Both at midnight: exactly [first, end).
        let r = DayRange::new(at(2026, 3, 1, 0, 0, 0), at(2026, 3, 4, 0, 0, 0)).expect("range");
        assert_eq!(
            (r.first, r.end, r.days()),
            (day(2026, 3, 1), day(2026, 3, 4), 3)
        );
        // Mid-day `to` includes that day; mid-day `from` includes its whole day.
        let r = DayRange::new(at(2026, 3, 1, 23, 59, 59), at(2026, 3, 4, 0, 0, 1)).expect("range");
        assert_eq!(
            (r.first, r.end, r.days()),
            (day(2026, 3, 1), day(2026, 3, 5), 4)
        );
        // One nanosecond past midnight already includes the day.
        let to = at(2026, 3, 4, 0, 0, 0) + TimeDelta::nanoseconds(1);
        let r = DayRange::new(at(2026, 3, 3, 0, 0, 0), to).expect("range");
        assert_eq!((r.first, r.end), (day(2026, 3, 3), day(2026, 3, 5)));
        // A window inside one day is that day.
        let r = DayRange::new(at(2026, 3, 3, 10, 0, 0), at(2026, 3, 3, 11, 0, 0)).expect("range");
        assert_eq!(
            (r.first, r.end, r.days()),
            (day(2026, 3, 3), day(2026, 3, 4), 1)
        );
        // Across a year end.
        let r = DayRange::new(at(2025, 12, 31, 12, 0, 0), at(2026, 1, 1, 0, 0, 0)).expect("range");
        assert_eq!(
            (r.first, r.end, r.days()),
            (day(2025, 12, 31), day(2026, 1, 1), 1)
        );
    }

    #[test]
    fn day_range_rejects_empty_and_reversed() {
        let t = at(2026, 3, 1, 12, 0, 0);
        for (from, to) in [(t, t), (t, t - TimeDelta::nanoseconds(1))] {
            let err = DayRange::new(from, to).expect_err("empty or reversed");
            assert!(matches!(err, BillingError::InvalidInput(_)), "{err:?}");
        }
        let hand_built = DayRange {
            first: day(2026, 3, 2),
            end: day(2026, 3, 2),
        };
        assert!(matches!(
            hand_built.check(),
            Err(BillingError::InvalidInput(_))
        ));
    }

    #[test]
    fn day_range_limit() {
        let from = at(2026, 1, 1, 0, 0, 0);
        let max = from + TimeDelta::days(RANGE_DAYS_MAX);
        assert_eq!(DayRange::new(from, max).expect("at the limit").days(), 400);
        // A second more ceils to one more day.
        let err = DayRange::new(from, max + TimeDelta::seconds(1)).expect_err("over the limit");
        assert!(matches!(err, BillingError::LimitExceeded(_)), "{err:?}");
        // Flooring `from` can push a range over the limit too.
        let err = DayRange::new(from + TimeDelta::hours(23), max + TimeDelta::days(1))
            .expect_err("over the limit");
        assert!(matches!(err, BillingError::LimitExceeded(_)), "{err:?}");
        let hand_built = DayRange {
            first: day(2026, 1, 1),
            end: day(2027, 3, 1),
        };
        assert!(matches!(
            hand_built.check(),
            Err(BillingError::LimitExceeded(_))
        ));
    }

    #[test]
    fn day_range_at_the_end_of_time() {
        let last = DateTime::<Utc>::MAX_UTC;
        let err = DayRange::new(last - TimeDelta::days(1), last).expect_err("no next day");
        assert!(matches!(err, BillingError::InvalidInput(_)), "{err:?}");
    }

    #[test]
    fn depletion_basics() {
        let now = at(2026, 3, 1, 12, 0, 0);
        let c = Credits::from_nanos;
        // No spend: never.
        assert_eq!(projected_depletion_at(c(1_000), Credits::ZERO, now), None);
        assert_eq!(projected_depletion_at(c(1_000), c(-5), now), None);
        // Balance equal to one day's spend: exactly one day.
        assert_eq!(
            projected_depletion_at(c(5_000), c(5_000), now),
            Some(now + TimeDelta::days(1))
        );
        // Half a day's spend: twelve hours.
        assert_eq!(
            projected_depletion_at(c(1_000_000_000), c(2_000_000_000), now),
            Some(now + TimeDelta::hours(12))
        );
        // Nothing left: now (a negative balance is treated as empty).
        assert_eq!(projected_depletion_at(Credits::ZERO, c(1), now), Some(now));
        assert_eq!(projected_depletion_at(c(-10), c(1), now), Some(now));
    }

    #[test]
    fn depletion_is_exact_and_rounds_down() {
        let now = at(2026, 3, 1, 0, 0, 0);
        let c = Credits::from_nanos;
        // 1/3 day = 28 800 s exactly.
        assert_eq!(
            projected_depletion_at(c(1), c(3), now),
            Some(now + TimeDelta::seconds(28_800))
        );
        // 1/7 day = 12 342 857 142 857.14… ns: rounded down to a whole nanosecond.
        assert_eq!(
            projected_depletion_at(c(1), c(7), now),
            Some(now + TimeDelta::nanoseconds(12_342_857_142_857))
        );
        // Amounts whose product overflows i64 but not i128 stay exact.
        assert_eq!(
            projected_depletion_at(Credits::MAX, Credits::MAX, now),
            Some(now + TimeDelta::days(1))
        );
        assert_eq!(
            projected_depletion_at(Credits::MAX, c(i64::MAX / 2 + 1), now),
            // MAX / (MAX/2 + 1) days is just under two days.
            Some(now + TimeDelta::nanoseconds(172_799_999_999_999))
        );
    }

    #[test]
    fn depletion_beyond_chrono_is_none() {
        let now = at(2026, 3, 1, 0, 0, 0);
        // ~9.2e18 days: far beyond any representable date.
        assert_eq!(
            projected_depletion_at(Credits::MAX, Credits::from_nanos(1), now),
            None
        );
        // Near the end of chrono's range, even a short projection overflows.
        let late = DateTime::<Utc>::MAX_UTC - TimeDelta::hours(1);
        assert_eq!(
            projected_depletion_at(Credits::from_nanos(2), Credits::from_nanos(1), late),
            None
        );
        assert_eq!(
            projected_depletion_at(Credits::from_nanos(1), Credits::from_nanos(48), late),
            Some(late + TimeDelta::minutes(30))
        );
        // The largest projection that still fits: about 262 000 years.
        let years = 200_000_i64;
        let avg = Credits::from_nanos(1_000);
        let balance = Credits::from_nanos(1_000 * 365 * years);
        assert_eq!(
            projected_depletion_at(balance, avg, now),
            now.checked_add_signed(TimeDelta::days(365 * years))
        );
        assert!(projected_depletion_at(balance, avg, now).is_some());
    }
}

/// One report as a dashboard asks for it: a scope, the instants of its window and
/// its grouping.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReportRequest {
    pub scope: UsageScope,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub group_by: Vec<UsageDimension>,
}

/// Many reports at once (a DataLoader's batch). Workspace reports by at most one
/// dimension take ONE statement per window whatever their dimensions (a dashboard's
/// breakdowns by project, member and model: [`workspace_breakdowns`]); every other
/// report ONE statement per distinct window and grouping, the scopes batched within it
/// (see [`usage_reports`]). A bad window fails with its own code (INVALID_INPUT when
/// reversed, LIMIT_EXCEEDED when too long).
pub async fn usage_reports_for<C: ConnectionTrait>(
    c: &C,
    requests: &[ReportRequest],
) -> Result<HashMap<ReportRequest, UsageReport>> {
    type Shape = (DateTime<Utc>, DateTime<Utc>, Vec<UsageDimension>);
    let mut shapes: HashMap<Shape, Vec<UsageScope>> = HashMap::new();
    let mut breakdowns: HashMap<(DateTime<Utc>, DateTime<Utc>), Vec<ReportRequest>> =
        HashMap::new();
    let mut out = HashMap::with_capacity(requests.len());
    for r in requests {
        if matches!(r.scope, UsageScope::Workspace(_))
            && rollup_dimension(&dedup(&r.group_by)).is_some()
        {
            breakdowns
                .entry((r.from, r.to))
                .or_default()
                .push(r.clone());
            continue;
        }
        shapes
            .entry((r.from, r.to, r.group_by.clone()))
            .or_default()
            .push(r.scope.clone());
    }
    for ((from, to), batch) in breakdowns {
        let range = DayRange::new(from, to)?;
        out.extend(workspace_breakdowns(c, &batch, &range).await?);
    }
    for ((from, to, group_by), scopes) in shapes {
        let range = DayRange::new(from, to)?;
        for (scope, report) in usage_reports(c, &scopes, &range, &group_by).await? {
            let request = ReportRequest {
                scope,
                from,
                to,
                group_by: group_by.clone(),
            };
            out.insert(request, report);
        }
    }
    Ok(out)
}

/// [`average_daily_spend`] for many (workspace, days) pairs at once (a DataLoader's
/// batch): ONE statement per distinct number of days.
pub async fn average_daily_spend_for<C: ConnectionTrait>(
    c: &C,
    keys: &[(Uuid, i64)],
    now: DateTime<Utc>,
) -> Result<HashMap<(Uuid, i64), Credits>> {
    let mut by_days: HashMap<i64, Vec<Uuid>> = HashMap::new();
    for (workspace_id, days) in keys {
        by_days.entry(*days).or_default().push(*workspace_id);
    }
    let mut out = HashMap::with_capacity(keys.len());
    for (days, ids) in by_days {
        for (workspace_id, avg) in average_daily_spend(c, &ids, days, now).await? {
            out.insert((workspace_id, days), avg);
        }
    }
    Ok(out)
}

/// Workspace reports by at most one dimension over one window, whatever dimension
/// each asks for, in ONE statement over the one-dimension rollup (`usage_daily_by`,
/// a branch per dimension grouped by workspace and value): a dashboard page's breakdowns by
/// project, member and model of every workspace on it are one statement, not one per
/// dimension. Same answers as [`usage_reports`] (test `analytics::
/// breakdowns_in_one_statement_match_one_statement_each`).
async fn workspace_breakdowns<C: ConnectionTrait>(
    c: &C,
    requests: &[ReportRequest],
    range: &DayRange,
) -> Result<HashMap<ReportRequest, UsageReport>> {
    type Wanted = Vec<(ReportRequest, Vec<UsageDimension>)>;
    // Rollup dimension → workspace → the reports its rows answer.
    let mut wanted: HashMap<&'static str, HashMap<Uuid, Wanted>> = HashMap::new();
    let mut out = HashMap::with_capacity(requests.len());
    for r in requests {
        let dimensions = dedup(&r.group_by);
        let (UsageScope::Workspace(id), Some(name)) = (&r.scope, rollup_dimension(&dimensions))
        else {
            return Err(BillingError::Internal(format!("not a breakdown: {r:?}")));
        };
        if out.insert(r.clone(), UsageReport::default()).is_none() {
            let by_workspace = wanted.entry(name).or_default();
            by_workspace
                .entry(*id)
                .or_default()
                .push((r.clone(), dimensions));
        }
    }
    let ids: BTreeSet<Uuid> = wanted.values().flat_map(|w| w.keys().copied()).collect();
    if ids.len() > BATCH_MAX {
        return Err(BillingError::LimitExceeded(format!(
            "at most {BATCH_MAX} usage scopes per batch"
        )));
    }
    let Some(query) = breakdowns_query(&wanted, range) else {
        return Ok(out);
    };
    for row in c.query_all(&query).await.map_err(sum_error)? {
        let (id, name): (Uuid, String) = (
            row.try_get("", "workspace_id")?,
            row.try_get("", "dimension")?,
        );
        let Some(targets) = wanted.get(name.as_str()).and_then(|w| w.get(&id)) else {
            return Err(BillingError::Internal(format!(
                "breakdown row for an unrequested {name} of {id}"
            )));
        };
        let totals = decode_totals(&row)?;
        for (request, dimensions) in targets {
            let report = out.get_mut(request).ok_or_else(|| {
                BillingError::Internal(format!("breakdown row for an unrequested {request:?}"))
            })?;
            report.totals.checked_add_assign(&totals)?;
            if let [dimension] = dimensions.as_slice() {
                report
                    .rows
                    .push(breakdown_row(&row, *dimension, totals.clone())?);
            }
        }
    }
    for (request, report) in &mut out {
        sort_rows(&mut report.rows, &dedup(&request.group_by));
    }
    Ok(out)
}

/// The breakdowns statement: one branch per dimension, each the index scan a
/// statement of its own would be (`dimension = …` on the rollup's unique index),
/// joined by UNION ALL: one round trip and one plan, and never a worse plan than the
/// separate statements. None when nothing is wanted.
fn breakdowns_query<T>(
    wanted: &HashMap<&'static str, HashMap<Uuid, T>>,
    range: &DayRange,
) -> Option<SelectStatement> {
    use entity::usage_daily_by::{Column as B, Entity as By};
    let mut names: Vec<&'static str> = wanted.keys().copied().collect();
    names.sort_unstable();
    let mut branches = names.into_iter().map(|name| {
        let ids: BTreeSet<Uuid> = wanted
            .get(name)
            .map(|w| w.keys().copied().collect())
            .unwrap_or_default();
        let mut branch = Query::select();
        branch
            .from(By)
            .columns([B::WorkspaceId, B::Dimension, B::DimUuid, B::DimModel])
            .expr_as(by_sum(B::Requests), "requests")
            .expr_as(by_sum(B::PromptTokens), "prompt_tokens")
            .expr_as(by_sum(B::CompletionTokens), "completion_tokens")
            .expr_as(by_sum(B::CostNanos), "cost_nanos")
            .and_where(Expr::col(B::WorkspaceId).is_in(ids))
            .and_where(Expr::col(B::Dimension).eq(name))
            .and_where(Expr::col(B::Day).gte(range.first))
            .and_where(Expr::col(B::Day).lt(range.end))
            .group_by_columns([B::WorkspaceId, B::Dimension, B::DimUuid, B::DimModel]);
        branch
    });
    let mut query = branches.next()?;
    for branch in branches {
        query.union(UnionType::All, branch);
    }
    Some(query)
}

/// One row of a one-dimension breakdown: the value of `dimension` (the nil UUID is
/// "none", as everywhere in the rollups) and its sums.
fn breakdown_row(
    row: &QueryResult,
    dimension: UsageDimension,
    totals: UsageTotals,
) -> Result<UsageRow> {
    let id: Uuid = row.try_get("", "dim_uuid")?;
    let id = (!id.is_nil()).then_some(id);
    let mut out = UsageRow::of(totals);
    match dimension {
        UsageDimension::Project => out.project_id = id,
        UsageDimension::Member => out.user_id = id,
        UsageDimension::ApiKey => out.api_key_id = id,
        UsageDimension::Model => out.model_id = Some(row.try_get("", "dim_model")?),
        UsageDimension::Day => {
            return Err(BillingError::Internal(
                "no day rollup in usage_daily_by".into(),
            ));
        }
    }
    Ok(out)
}
