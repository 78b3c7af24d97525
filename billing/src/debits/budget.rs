//! Project budget periods: when the current period started and when it resets.

use crate::debits::usage::budget_remaining;
use crate::money::Credits;
use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use entity::enums::BudgetPeriod;
use entity::projects;

fn midnight(date: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).unwrap_or_default())
}

/// Start of the period containing `now` (UTC calendar periods; weeks start on Monday).
/// A LIFETIME budget never resets: its period starts when the budget was created.
pub fn period_start(
    period: BudgetPeriod,
    now: DateTime<Utc>,
    lifetime_start: DateTime<Utc>,
) -> DateTime<Utc> {
    let today = now.date_naive();
    match period {
        BudgetPeriod::Daily => midnight(today),
        BudgetPeriod::Weekly => {
            midnight(today - Duration::days(i64::from(today.weekday().num_days_from_monday())))
        }
        BudgetPeriod::Monthly => midnight(today.with_day(1).unwrap_or(today)),
        BudgetPeriod::Lifetime => lifetime_start,
    }
}

/// When the period starting at `start` ends; None for LIFETIME.
pub fn period_end(period: BudgetPeriod, start: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match period {
        BudgetPeriod::Daily => Some(start + Duration::days(1)),
        BudgetPeriod::Weekly => Some(start + Duration::days(7)),
        BudgetPeriod::Monthly => {
            let date = start.date_naive();
            let (year, month) = if date.month() == 12 {
                (date.year() + 1, 1)
            } else {
                (date.year(), date.month() + 1)
            };
            NaiveDate::from_ymd_opt(year, month, 1).map(midnight)
        }
        BudgetPeriod::Lifetime => None,
    }
}

/// A project's budget as a dashboard shows it at `now`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetStatus {
    pub limit: Credits,
    pub period: BudgetPeriod,
    /// Spent in the current period.
    pub spent: Credits,
    /// What is left under the cap (zero when over it), reserved credits counted.
    pub remaining: Credits,
    pub period_start: DateTime<Utc>,
    /// None for LIFETIME.
    pub resets_at: Option<DateTime<Utc>>,
}

/// The budget of a capped project (None without a cap) in the period containing `now`.
/// A period that has ended but not yet been rolled in the database has spent nothing
/// (the next debit rolls it); reads only.
pub fn budget_status(project: &projects::Model, now: DateTime<Utc>) -> Option<BudgetStatus> {
    let limit = project.budget_limit_nanos?;
    let mut current = project.clone();
    let start = period_start(project.budget_period, now, project.budget_period_start);
    if start > project.budget_period_start {
        current.budget_spent_nanos = 0;
        current.budget_period_start = start;
    }
    Some(BudgetStatus {
        limit: Credits::from_nanos(limit),
        period: current.budget_period,
        spent: Credits::from_nanos(current.budget_spent_nanos),
        remaining: budget_remaining(&current),
        period_start: current.budget_period_start,
        resets_at: period_end(current.budget_period, current.budget_period_start),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|d| d.with_timezone(&Utc))
            .expect("timestamp")
    }

    #[test]
    fn calendar_periods() {
        let now = at("2026-11-26T17:55:00Z"); // a Thursday
        let origin = at("2020-01-01T00:00:00Z");
        assert_eq!(
            period_start(BudgetPeriod::Daily, now, origin),
            at("2026-11-26T00:00:00Z")
        );
        assert_eq!(
            period_start(BudgetPeriod::Weekly, now, origin),
            at("2026-11-23T00:00:00Z")
        );
        assert_eq!(
            period_start(BudgetPeriod::Monthly, now, origin),
            at("2026-11-01T00:00:00Z")
        );
        assert_eq!(period_start(BudgetPeriod::Lifetime, now, origin), origin);
        assert_eq!(
            period_end(BudgetPeriod::Monthly, at("2026-12-01T00:00:00Z")),
            Some(at("2027-01-01T00:00:00Z"))
        );
        assert_eq!(
            period_end(BudgetPeriod::Weekly, at("2026-11-23T00:00:00Z")),
            Some(at("2026-11-30T00:00:00Z"))
        );
        assert_eq!(period_end(BudgetPeriod::Lifetime, origin), None);
    }
}
