//! Usage analytics over the daily rollups (SQLite by default, PostgreSQL with
//! TEST_DATABASE_URL): reports by every dimension, day boundaries, batching, spend
//! averages and projections, and the limits.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use billing::debits::usage::{self, ProjectRef, UsageRequest};
use billing::entity::enums::WorkspaceRole;
use billing::entity::{models, usage_daily, usage_daily_by};
use billing::reports::analytics::{
    self, BATCH_MAX, DayRange, RANGE_DAYS_MAX, UsageDimension as Dim, UsageReport, UsageRow,
    UsageScope, UsageTotals,
};
use billing::sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter,
};
use billing::{BillingError, Credits};
use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use reservoir_tests::{Fixture, TEST_MODEL, TestDb, fund, workspace};
use uuid::Uuid;

/// A second model: 3,000 nanocredits per prompt token, 5,000 per completion token.
const OTHER_MODEL: &str = "test/other";

fn at(d: u32, h: u32, m: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, d, h, m, s)
        .single()
        .expect("valid test time")
}

fn day(d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 3, d).expect("valid test date")
}

fn totals(requests: i64, prompt_tokens: i64, completion_tokens: i64, cost: i64) -> UsageTotals {
    UsageTotals {
        requests,
        prompt_tokens,
        completion_tokens,
        cost: Credits::from_nanos(cost),
    }
}

/// A row with no dimension set; fill in the grouped ones with struct update syntax.
fn row(totals: UsageTotals) -> UsageRow {
    UsageRow {
        project_id: None,
        user_id: None,
        model_id: None,
        api_key_id: None,
        day: None,
        totals,
    }
}

fn model(id: &str) -> Option<String> {
    Some(id.to_owned())
}

/// A report's totals always equal the sum of its rows (when it has rows).
fn assert_totals_are_sum(report: &UsageReport) {
    if report.rows.is_empty() {
        return;
    }
    let mut sum = UsageTotals::default();
    for r in &report.rows {
        sum.requests += r.totals.requests;
        sum.prompt_tokens += r.totals.prompt_tokens;
        sum.completion_tokens += r.totals.completion_tokens;
        sum.cost = sum.cost.checked_add(r.totals.cost).expect("no overflow");
    }
    assert_eq!(sum, report.totals, "totals are not the sum of rows");
}

/// The usage recorded for the tests: workspace A with projects, members, a key and two
/// models over four days; workspace B with none; workspace C with one request.
struct Scenario {
    t: TestDb,
    ws_a: Uuid,
    ws_b: Uuid,
    ws_c: Uuid,
    p1: Uuid,
    p2: Uuid,
    u1: Uuid,
    u2: Uuid,
    k1: Uuid,
}

struct Event {
    at: DateTime<Utc>,
    project: Option<Uuid>,
    user: Option<Uuid>,
    key: Option<Uuid>,
    model: &'static str,
    prompt: i64,
    completion: i64,
    cost: i64,
}

impl Scenario {
    async fn new() -> anyhow::Result<Self> {
        let t = TestDb::new().await?;
        let setup = Utc
            .with_ymd_and_hms(2026, 2, 20, 9, 0, 0)
            .single()
            .expect("valid time");
        let f = Fixture::new(&t.db, setup).await?;
        models::Entity::insert(models::ActiveModel {
            id: Set(OTHER_MODEL.into()),
            name: Set("Other test model".into()),
            prompt_price_per_million_nanos: Set(3_000_000_000),
            completion_price_per_million_nanos: Set(5_000_000_000),
            active: Set(true),
            created_at: Set(setup),
            updated_at: Set(setup),
        })
        .exec_without_returning(&t.db)
        .await?;
        let (ws_a, ws_b) = (f.ws_a, f.ws_b);
        let ws_c = billing::accounts::create_workspace(&t.db, f.account_id, "C", setup)
            .await?
            .id;
        fund(&t.db, ws_a, "100", setup).await?;
        fund(&t.db, ws_c, "5", setup).await?;
        let p1 = billing::accounts::create_project(&t.db, ws_a, "Alpha", "alpha", setup)
            .await?
            .id;
        let p2 = billing::accounts::create_project(&t.db, ws_a, "Beta", "beta", setup)
            .await?
            .id;
        let u1 = f.owner_id;
        let (dev, _) = billing::accounts::add_workspace_member(
            &t.db,
            ws_a,
            "dev@test.example",
            Some("Dev"),
            WorkspaceRole::Member,
            setup,
        )
        .await?;
        let u2 = dev.id;
        let k1 = billing::accounts::create_api_key(&t.db, ws_a, "gateway", None, setup)
            .await?
            .api_key
            .id;

        let (m1, m2) = (TEST_MODEL, OTHER_MODEL);
        #[rustfmt::skip]
        let events = [
            // e1, e2: the same rollup row (day 1, P1, U1, K1, M1).
            Event { at: at(1, 10, 0, 0), project: Some(p1), user: Some(u1), key: Some(k1), model: m1, prompt: 100, completion: 10, cost: 120_000 },
            Event { at: at(1, 11, 0, 0), project: Some(p1), user: Some(u1), key: Some(k1), model: m1, prompt: 200, completion: 0, cost: 200_000 },
            Event { at: at(1, 12, 0, 0), project: Some(p2), user: Some(u2), key: None, model: m2, prompt: 10, completion: 10, cost: 80_000 },
            Event { at: at(2, 9, 0, 0), project: None, user: None, key: None, model: m1, prompt: 50, completion: 25, cost: 100_000 },
            Event { at: at(2, 18, 0, 0), project: Some(p1), user: Some(u2), key: None, model: m2, prompt: 100, completion: 0, cost: 300_000 },
            Event { at: at(3, 10, 0, 0), project: Some(p2), user: Some(u1), key: Some(k1), model: m1, prompt: 1, completion: 1, cost: 3_000 },
            // The last instant of day 3 and the first of day 4.
            Event { at: at(3, 23, 59, 59) + Duration::milliseconds(999), project: Some(p1), user: Some(u1), key: None, model: m1, prompt: 7, completion: 0, cost: 7_000 },
            Event { at: at(4, 0, 0, 0), project: Some(p2), user: None, key: None, model: m2, prompt: 0, completion: 1, cost: 5_000 },
        ];
        for (i, e) in events.iter().enumerate() {
            let recorded = usage::record_usage(
                &t.db,
                UsageRequest {
                    workspace_id: ws_a,
                    project: e.project.map_or(ProjectRef::None, ProjectRef::Id),
                    model_id: e.model.into(),
                    prompt_tokens: e.prompt,
                    completion_tokens: e.completion,
                    request_id: format!("a-{i}"),
                    user_id: e.user,
                    api_key_id: e.key,
                },
                e.at,
            )
            .await?;
            assert_eq!(recorded.event.cost_nanos, e.cost, "cost of event {i}");
        }
        let recorded = usage::record_usage(
            &t.db,
            UsageRequest {
                workspace_id: ws_c,
                project: ProjectRef::None,
                model_id: TEST_MODEL.into(),
                prompt_tokens: 1_000,
                completion_tokens: 0,
                request_id: "c-0".into(),
                user_id: None,
                api_key_id: None,
            },
            at(2, 12, 0, 0),
        )
        .await?;
        assert_eq!(recorded.event.cost_nanos, 1_000_000);
        Ok(Self {
            t,
            ws_a,
            ws_b,
            ws_c,
            p1,
            p2,
            u1,
            u2,
            k1,
        })
    }

    /// Days 1 to 3 (to = midnight of day 4, exclusive).
    fn days_1_to_3() -> DayRange {
        DayRange::new(at(1, 0, 0, 0), at(4, 0, 0, 0)).expect("valid range")
    }

    async fn report(
        &self,
        scope: UsageScope,
        range: &DayRange,
        group_by: &[Dim],
    ) -> anyhow::Result<UsageReport> {
        let mut reports =
            analytics::usage_reports(&self.t.db, std::slice::from_ref(&scope), range, group_by)
                .await?;
        assert_eq!(reports.len(), 1);
        let report = reports.remove(&scope).expect("the requested scope");
        assert_totals_are_sum(&report);
        Ok(report)
    }
}

/// Workspace A over days 1–3.
fn a_totals() -> UsageTotals {
    totals(7, 468, 46, 810_000)
}

#[tokio::test]
async fn reports_by_each_dimension() -> anyhow::Result<()> {
    let s = Scenario::new().await?;
    let (p1, p2, u1, u2, k1) = (s.p1, s.p2, s.u1, s.u2, s.k1);
    let range = Scenario::days_1_to_3();
    let a = UsageScope::Workspace(s.ws_a);

    // No breakdown: totals only.
    let report = s.report(a.clone(), &range, &[]).await?;
    assert_eq!(
        report,
        UsageReport {
            totals: a_totals(),
            rows: vec![]
        }
    );

    let report = s.report(a.clone(), &range, &[Dim::Project]).await?;
    assert_eq!(report.totals, a_totals());
    assert_eq!(
        report.rows,
        vec![
            UsageRow {
                project_id: Some(p1),
                ..row(totals(4, 407, 10, 627_000))
            },
            UsageRow {
                project_id: None,
                ..row(totals(1, 50, 25, 100_000))
            },
            UsageRow {
                project_id: Some(p2),
                ..row(totals(2, 11, 11, 83_000))
            },
        ]
    );

    let report = s.report(a.clone(), &range, &[Dim::Member]).await?;
    assert_eq!(report.totals, a_totals());
    assert_eq!(
        report.rows,
        vec![
            UsageRow {
                user_id: Some(u2),
                ..row(totals(2, 110, 10, 380_000))
            },
            UsageRow {
                user_id: Some(u1),
                ..row(totals(4, 308, 11, 330_000))
            },
            UsageRow {
                user_id: None,
                ..row(totals(1, 50, 25, 100_000))
            },
        ]
    );

    // Duplicated dimensions count once.
    let report = s
        .report(a.clone(), &range, &[Dim::Model, Dim::Model])
        .await?;
    assert_eq!(report.totals, a_totals());
    assert_eq!(
        report.rows,
        vec![
            UsageRow {
                model_id: model(TEST_MODEL),
                ..row(totals(5, 358, 36, 430_000))
            },
            UsageRow {
                model_id: model(OTHER_MODEL),
                ..row(totals(2, 110, 10, 380_000))
            },
        ]
    );

    let report = s.report(a.clone(), &range, &[Dim::ApiKey]).await?;
    assert_eq!(report.totals, a_totals());
    assert_eq!(
        report.rows,
        vec![
            UsageRow {
                api_key_id: None,
                ..row(totals(4, 167, 35, 487_000))
            },
            UsageRow {
                api_key_id: Some(k1),
                ..row(totals(3, 301, 11, 323_000))
            },
        ]
    );

    // Days 1 and 2 cost the same: equal costs fall back to the day, ascending.
    let report = s.report(a.clone(), &range, &[Dim::Day]).await?;
    assert_eq!(report.totals, a_totals());
    assert_eq!(
        report.rows,
        vec![
            UsageRow {
                day: Some(day(1)),
                ..row(totals(3, 310, 20, 400_000))
            },
            UsageRow {
                day: Some(day(2)),
                ..row(totals(2, 150, 25, 400_000))
            },
            UsageRow {
                day: Some(day(3)),
                ..row(totals(2, 8, 1, 10_000))
            },
        ]
    );

    s.t.finish().await
}

#[tokio::test]
async fn reports_by_combined_dimensions() -> anyhow::Result<()> {
    let s = Scenario::new().await?;
    let (p1, p2, u1, u2, k1) = (s.p1, s.p2, s.u1, s.u2, s.k1);
    let range = Scenario::days_1_to_3();
    let a = UsageScope::Workspace(s.ws_a);
    let (m1, m2) = (model(TEST_MODEL), model(OTHER_MODEL));

    let report = s
        .report(a.clone(), &range, &[Dim::Project, Dim::Model])
        .await?;
    assert_eq!(report.totals, a_totals());
    assert_eq!(
        report.rows,
        vec![
            UsageRow {
                project_id: Some(p1),
                model_id: m1.clone(),
                ..row(totals(3, 307, 10, 327_000))
            },
            UsageRow {
                project_id: Some(p1),
                model_id: m2.clone(),
                ..row(totals(1, 100, 0, 300_000))
            },
            UsageRow {
                project_id: None,
                model_id: m1.clone(),
                ..row(totals(1, 50, 25, 100_000))
            },
            UsageRow {
                project_id: Some(p2),
                model_id: m2.clone(),
                ..row(totals(1, 10, 10, 80_000))
            },
            UsageRow {
                project_id: Some(p2),
                model_id: m1.clone(),
                ..row(totals(1, 1, 1, 3_000))
            },
        ]
    );

    // Every dimension: one row per rollup row (e1 and e2 share one).
    let all = [Dim::Day, Dim::Project, Dim::Member, Dim::ApiKey, Dim::Model];
    let report = s.report(a.clone(), &range, &all).await?;
    assert_eq!(report.totals, a_totals());
    let full = |d, p, u, k, m: &Option<String>, t| UsageRow {
        day: Some(day(d)),
        project_id: p,
        user_id: u,
        api_key_id: k,
        model_id: m.clone(),
        totals: t,
    };
    assert_eq!(
        report.rows,
        vec![
            full(
                1,
                Some(p1),
                Some(u1),
                Some(k1),
                &m1,
                totals(2, 300, 10, 320_000)
            ),
            full(2, Some(p1), Some(u2), None, &m2, totals(1, 100, 0, 300_000)),
            full(2, None, None, None, &m1, totals(1, 50, 25, 100_000)),
            full(1, Some(p2), Some(u2), None, &m2, totals(1, 10, 10, 80_000)),
            full(3, Some(p1), Some(u1), None, &m1, totals(1, 7, 0, 7_000)),
            full(3, Some(p2), Some(u1), Some(k1), &m1, totals(1, 1, 1, 3_000)),
        ]
    );

    s.t.finish().await
}

#[tokio::test]
async fn day_boundaries_are_half_open() -> anyhow::Result<()> {
    let s = Scenario::new().await?;
    let a = UsageScope::Workspace(s.ws_a);

    // `to` at midnight of day 4 leaves out the event at exactly that midnight...
    let report = s.report(a.clone(), &Scenario::days_1_to_3(), &[]).await?;
    assert_eq!(report.totals, a_totals());
    // ...a millisecond later takes in all of day 4.
    let range = DayRange::new(at(1, 0, 0, 0), at(4, 0, 0, 0) + Duration::milliseconds(1))?;
    assert_eq!((range.first, range.end), (day(1), day(5)));
    let report = s.report(a.clone(), &range, &[]).await?;
    assert_eq!(report.totals, totals(8, 468, 47, 815_000));

    // Day 4 alone holds only the midnight event.
    let range = DayRange::new(at(4, 0, 0, 0), at(4, 0, 0, 1))?;
    let report = s.report(a.clone(), &range, &[Dim::Day]).await?;
    assert_eq!(
        report.rows,
        vec![UsageRow {
            day: Some(day(4)),
            ..row(totals(1, 0, 1, 5_000))
        }]
    );

    // A mid-day window covers its whole day: 10:00 and 23:59:59.999 of day 3.
    let range = DayRange::new(at(3, 12, 0, 0), at(3, 13, 0, 0))?;
    assert_eq!((range.first, range.end, range.days()), (day(3), day(4), 1));
    let report = s.report(a.clone(), &range, &[]).await?;
    assert_eq!(report.totals, totals(2, 8, 1, 10_000));

    // `from` mid-day on day 2 floors to day 2, leaving day 1 out.
    let range = DayRange::new(at(2, 17, 0, 0), at(4, 0, 0, 0))?;
    let report = s.report(a.clone(), &range, &[Dim::Day]).await?;
    assert_eq!(
        report.rows,
        vec![
            UsageRow {
                day: Some(day(2)),
                ..row(totals(2, 150, 25, 400_000))
            },
            UsageRow {
                day: Some(day(3)),
                ..row(totals(2, 8, 1, 10_000))
            },
        ]
    );

    // Before any usage: empty.
    let range = DayRange::new(at(1, 0, 0, 0) - Duration::days(10), at(1, 0, 0, 0))?;
    let report = s.report(a, &range, &[Dim::Model]).await?;
    assert_eq!(report, UsageReport::default());

    s.t.finish().await
}

/// Counts the SQL statements a connection runs.
fn counting(db: &DatabaseConnection) -> (DatabaseConnection, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let mut counted = db.clone();
    let c = count.clone();
    counted.set_metric_callback(move |_| {
        c.fetch_add(1, Ordering::SeqCst);
    });
    (counted, count)
}

#[tokio::test]
async fn many_scopes_in_one_statement() -> anyhow::Result<()> {
    let s = Scenario::new().await?;
    let (counted, statements) = counting(&s.t.db);
    let range = Scenario::days_1_to_3();
    let scopes = [
        UsageScope::Workspace(s.ws_a),
        UsageScope::Workspace(s.ws_b),
        UsageScope::Workspace(s.ws_c),
        UsageScope::Project(s.p1),
        UsageScope::Project(s.p2),
        // The nil UUID means "no project": never every workspace's unattributed usage.
        UsageScope::Project(Uuid::nil()),
        UsageScope::Project(Uuid::new_v4()),
        UsageScope::Workspace(s.ws_a),
    ];
    let reports = analytics::usage_reports(&counted, &scopes, &range, &[Dim::Model]).await?;
    assert_eq!(statements.load(Ordering::SeqCst), 1, "one SQL statement");
    for report in reports.values() {
        assert_totals_are_sum(report);
    }
    let (m1, m2) = (model(TEST_MODEL), model(OTHER_MODEL));
    let expected: HashMap<UsageScope, UsageReport> = [
        (
            UsageScope::Workspace(s.ws_a),
            UsageReport {
                totals: a_totals(),
                rows: vec![
                    UsageRow {
                        model_id: m1.clone(),
                        ..row(totals(5, 358, 36, 430_000))
                    },
                    UsageRow {
                        model_id: m2.clone(),
                        ..row(totals(2, 110, 10, 380_000))
                    },
                ],
            },
        ),
        (UsageScope::Workspace(s.ws_b), UsageReport::default()),
        (
            UsageScope::Workspace(s.ws_c),
            UsageReport {
                totals: totals(1, 1_000, 0, 1_000_000),
                rows: vec![UsageRow {
                    model_id: m1.clone(),
                    ..row(totals(1, 1_000, 0, 1_000_000))
                }],
            },
        ),
        (
            UsageScope::Project(s.p1),
            UsageReport {
                totals: totals(4, 407, 10, 627_000),
                rows: vec![
                    UsageRow {
                        model_id: m1.clone(),
                        ..row(totals(3, 307, 10, 327_000))
                    },
                    UsageRow {
                        model_id: m2.clone(),
                        ..row(totals(1, 100, 0, 300_000))
                    },
                ],
            },
        ),
        (
            UsageScope::Project(s.p2),
            UsageReport {
                totals: totals(2, 11, 11, 83_000),
                rows: vec![
                    UsageRow {
                        model_id: m2.clone(),
                        ..row(totals(1, 10, 10, 80_000))
                    },
                    UsageRow {
                        model_id: m1.clone(),
                        ..row(totals(1, 1, 1, 3_000))
                    },
                ],
            },
        ),
        (UsageScope::Project(Uuid::nil()), UsageReport::default()),
        (scopes[6].clone(), UsageReport::default()),
    ]
    .into_iter()
    .collect();
    assert_eq!(reports, expected);

    // Only workspaces, totals only: still one statement, same totals.
    statements.store(0, Ordering::SeqCst);
    let ws_only = [
        UsageScope::Workspace(s.ws_a),
        UsageScope::Workspace(s.ws_b),
        UsageScope::Workspace(s.ws_c),
    ];
    let reports = analytics::usage_reports(&counted, &ws_only, &range, &[]).await?;
    assert_eq!(statements.load(Ordering::SeqCst), 1, "one SQL statement");
    assert_eq!(reports.len(), 3);
    assert_eq!(reports[&ws_only[0]].totals, a_totals());
    assert_eq!(reports[&ws_only[1]], UsageReport::default());
    assert_eq!(
        reports[&ws_only[2]],
        UsageReport {
            totals: totals(1, 1_000, 0, 1_000_000),
            rows: vec![]
        }
    );

    // Nothing asked, nothing run.
    statements.store(0, Ordering::SeqCst);
    let reports = analytics::usage_reports(&counted, &[], &range, &[Dim::Day]).await?;
    assert!(reports.is_empty());
    assert_eq!(statements.load(Ordering::SeqCst), 0);

    s.t.finish().await
}

/// A dashboard's loader batch: every workspace's totals and breakdowns by project,
/// member, model and key, over two windows, beside project reports and a
/// two-dimension report. The one-dimension workspace reports of a window are ONE
/// statement whatever their dimensions, and every report is exactly what
/// `usage_reports` answers for it alone.
#[tokio::test]
async fn breakdowns_in_one_statement_match_one_statement_each() -> anyhow::Result<()> {
    let s = Scenario::new().await?;
    let (counted, statements) = counting(&s.t.db);
    let windows = [
        (at(1, 0, 0, 0), at(4, 0, 0, 0)),
        (at(2, 12, 0, 0), at(5, 0, 0, 0)),
    ];
    let groupings: [&[Dim]; 7] = [
        &[],
        &[Dim::Project],
        &[Dim::Member],
        &[Dim::Model],
        &[Dim::ApiKey],
        &[Dim::Model, Dim::Model],
        &[Dim::Project, Dim::Model],
    ];
    let scopes = [
        UsageScope::Workspace(s.ws_a),
        UsageScope::Workspace(s.ws_b),
        UsageScope::Workspace(s.ws_c),
        UsageScope::Project(s.p1),
    ];
    let mut requests = Vec::new();
    for (from, to) in windows {
        for group_by in groupings {
            for scope in &scopes {
                requests.push(analytics::ReportRequest {
                    scope: scope.clone(),
                    from,
                    to,
                    group_by: group_by.to_vec(),
                });
            }
        }
    }
    let reports = analytics::usage_reports_for(&counted, &requests).await?;
    // Per window: one statement for the workspaces' one-dimension reports; for the
    // rest one per grouping (the project scope's 6 distinct, the two-dimension one).
    assert_eq!(statements.load(Ordering::SeqCst), 2 * (1 + 6 + 1));
    assert_eq!(reports.len(), requests.len());
    let mut rows = 0;
    for request in &requests {
        let range = DayRange::new(request.from, request.to)?;
        let alone = analytics::usage_reports(
            &s.t.db,
            std::slice::from_ref(&request.scope),
            &range,
            &request.group_by,
        )
        .await?;
        assert_eq!(
            reports.get(request),
            alone.get(&request.scope),
            "{request:?}"
        );
        rows += alone.get(&request.scope).map_or(0, |r| r.rows.len());
    }
    assert!(rows > 40, "the scenario has rows to compare: {rows}");
    s.t.finish().await
}

#[tokio::test]
async fn project_scope() -> anyhow::Result<()> {
    let s = Scenario::new().await?;
    let range = DayRange::new(at(1, 0, 0, 0), at(5, 0, 0, 0))?;

    // Grouping a project scope by project gives the one project.
    let report = s
        .report(UsageScope::Project(s.p1), &range, &[Dim::Project])
        .await?;
    assert_eq!(
        report.rows,
        vec![UsageRow {
            project_id: Some(s.p1),
            ..row(totals(4, 407, 10, 627_000))
        }]
    );

    // Days 1 to 4 of project 2 by day and member.
    let report = s
        .report(UsageScope::Project(s.p2), &range, &[Dim::Day, Dim::Member])
        .await?;
    assert_eq!(report.totals, totals(3, 11, 12, 88_000));
    assert_eq!(
        report.rows,
        vec![
            UsageRow {
                day: Some(day(1)),
                user_id: Some(s.u2),
                ..row(totals(1, 10, 10, 80_000))
            },
            UsageRow {
                day: Some(day(4)),
                user_id: None,
                ..row(totals(1, 0, 1, 5_000))
            },
            UsageRow {
                day: Some(day(3)),
                user_id: Some(s.u1),
                ..row(totals(1, 1, 1, 3_000))
            },
        ]
    );

    s.t.finish().await
}

#[tokio::test]
async fn average_daily_spend_and_depletion() -> anyhow::Result<()> {
    let s = Scenario::new().await?;
    let (counted, statements) = counting(&s.t.db);
    let ids = [s.ws_a, s.ws_b, s.ws_c, s.ws_a];
    let now = at(4, 15, 0, 0);
    let spend = |days| analytics::average_daily_spend(&counted, &ids, days, now);
    let nanos = |m: HashMap<Uuid, Credits>| {
        let mut v: Vec<(Uuid, i64)> = m.into_iter().map(|(k, c)| (k, c.nanos())).collect();
        v.sort();
        v
    };
    let expect = |a: i64, b: i64, c: i64| {
        let mut v = vec![(s.ws_a, a), (s.ws_b, b), (s.ws_c, c)];
        v.sort();
        v
    };

    // Today only (day 4): A's midnight event.
    assert_eq!(nanos(spend(1).await?), expect(5_000, 0, 0));
    assert_eq!(statements.load(Ordering::SeqCst), 1, "one SQL statement");
    // Days 2–4: (400 000 + 10 000 + 5 000) / 3 = 138 333.33… rounds down.
    assert_eq!(nanos(spend(3).await?), expect(138_333, 0, 333_333));
    // Days 1–4: 815 000 / 4 and 1 000 000 / 4.
    let four = spend(4).await?;
    assert_eq!(nanos(four.clone()), expect(203_750, 0, 250_000));
    // The longest window still works: the sum over a year, divided by 365.
    assert_eq!(
        nanos(spend(analytics::SPEND_WINDOW_DAYS_MAX).await?),
        expect(815_000 / 365, 0, 1_000_000 / 365)
    );
    // At midnight, "today" is the new day: nothing spent yet.
    let midnight = analytics::average_daily_spend(&s.t.db, &ids, 1, at(5, 0, 0, 0)).await?;
    assert_eq!(nanos(midnight), expect(0, 0, 0));

    for days in [0, -1, analytics::SPEND_WINDOW_DAYS_MAX + 1, i64::MIN] {
        let err = spend(days).await.expect_err("days out of range");
        assert!(matches!(err, BillingError::InvalidInput(_)), "{err:?}");
    }
    assert!(
        analytics::average_daily_spend(&s.t.db, &[], 7, now)
            .await?
            .is_empty()
    );

    // C holds 5 − 0.001 = 4.999 credits and spends 0.00025 a day: 19 996 days.
    let balance = Credits::from_nanos(workspace(&s.t.db, s.ws_c).await?.balance_nanos);
    assert_eq!(balance, Credits::parse("4.999")?);
    assert_eq!(
        analytics::projected_depletion_at(balance, four[&s.ws_c], now),
        Some(now + Duration::days(19_996))
    );
    assert_eq!(
        analytics::projected_depletion_at(balance, four[&s.ws_b], now),
        None
    );

    s.t.finish().await
}

#[tokio::test]
async fn range_and_limit_errors() -> anyhow::Result<()> {
    let s = Scenario::new().await?;
    let a = [UsageScope::Workspace(s.ws_a)];

    let err = DayRange::new(at(4, 0, 0, 0), at(1, 0, 0, 0)).expect_err("reversed");
    assert!(matches!(err, BillingError::InvalidInput(_)), "{err:?}");
    let err = DayRange::new(at(1, 0, 0, 0), at(1, 0, 0, 0)).expect_err("empty");
    assert!(matches!(err, BillingError::InvalidInput(_)), "{err:?}");

    let from = at(1, 0, 0, 0);
    let longest = DayRange::new(from, from + Duration::days(RANGE_DAYS_MAX))?;
    let reports = analytics::usage_reports(&s.t.db, &a, &longest, &[]).await?;
    assert_eq!(reports[&a[0]].totals, totals(8, 468, 47, 815_000));
    let err = DayRange::new(from, from + Duration::days(RANGE_DAYS_MAX + 1))
        .expect_err("one day too many");
    assert!(matches!(err, BillingError::LimitExceeded(_)), "{err:?}");

    // A hand-built range is checked too.
    let reversed = DayRange {
        first: day(4),
        end: day(1),
    };
    let err = analytics::usage_reports(&s.t.db, &a, &reversed, &[])
        .await
        .expect_err("reversed");
    assert!(matches!(err, BillingError::InvalidInput(_)), "{err:?}");
    let too_long = DayRange {
        first: day(1),
        end: day(1) + Duration::days(RANGE_DAYS_MAX + 1),
    };
    let err = analytics::usage_reports(&s.t.db, &a, &too_long, &[])
        .await
        .expect_err("too long");
    assert!(matches!(err, BillingError::LimitExceeded(_)), "{err:?}");

    // Too many scopes in one batch.
    let many: Vec<UsageScope> = (0..=BATCH_MAX)
        .map(|_| UsageScope::Workspace(Uuid::new_v4()))
        .collect();
    let err = analytics::usage_reports(&s.t.db, &many, &longest, &[])
        .await
        .expect_err("too many scopes");
    assert!(matches!(err, BillingError::LimitExceeded(_)), "{err:?}");
    let ids: Vec<Uuid> = (0..=BATCH_MAX).map(|_| Uuid::new_v4()).collect();
    let err = analytics::average_daily_spend(&s.t.db, &ids, 7, at(4, 0, 0, 0))
        .await
        .expect_err("too many workspaces");
    assert!(matches!(err, BillingError::LimitExceeded(_)), "{err:?}");

    s.t.finish().await
}

/// Sums that do not fit in i64 are LIMIT_EXCEEDED, whether the database (one group)
/// or the report totals (across groups) overflow. The rollup rows are written by hand
/// (no real usage is that large) and removed before the invariant check.
#[tokio::test]
async fn overflowing_sums_are_limit_exceeded() -> anyhow::Result<()> {
    let s = Scenario::new().await?;
    let big = |project_id: Uuid, cost: i64| usage_daily::ActiveModel {
        workspace_id: Set(s.ws_b),
        day: Set(day(2)),
        project_id: Set(project_id),
        user_id: Set(Uuid::nil()),
        api_key_id: Set(Uuid::nil()),
        model_id: Set(TEST_MODEL.into()),
        requests: Set(1),
        prompt_tokens: Set(1),
        completion_tokens: Set(0),
        cost_nanos: Set(cost),
        ..Default::default()
    };
    let project = Uuid::new_v4();
    usage_daily::Entity::insert_many([big(Uuid::nil(), i64::MAX - 10), big(project, 20)])
        .exec_without_returning(&s.t.db)
        .await?;
    // The one-dimension rollups as the writer would hold them (the model's on two days,
    // since one row could not hold the overflowing sum).
    let by = |dimension: &str, d: u32, dim_uuid: Uuid, dim_model: &str, cost: i64| {
        usage_daily_by::ActiveModel {
            workspace_id: Set(s.ws_b),
            dimension: Set(dimension.into()),
            day: Set(day(d)),
            dim_uuid: Set(dim_uuid),
            dim_model: Set(dim_model.into()),
            requests: Set(1),
            prompt_tokens: Set(1),
            completion_tokens: Set(0),
            cost_nanos: Set(cost),
            ..Default::default()
        }
    };
    usage_daily_by::Entity::insert_many([
        by("project", 2, Uuid::nil(), "", i64::MAX - 10),
        by("project", 2, project, "", 20),
        by("model", 2, Uuid::nil(), TEST_MODEL, i64::MAX - 10),
        by("model", 3, Uuid::nil(), TEST_MODEL, 20),
    ])
    .exec_without_returning(&s.t.db)
    .await?;
    let b = [UsageScope::Workspace(s.ws_b)];
    let range = Scenario::days_1_to_3();

    // One group (the model, or the whole workspace): the database sum overflows.
    for group_by in [&[Dim::Model][..], &[]] {
        let err = analytics::usage_reports(&s.t.db, &b, &range, group_by)
            .await
            .expect_err("sum overflows");
        assert!(
            matches!(&err, BillingError::LimitExceeded(m) if m.contains("sum")),
            "{err:?}"
        );
    }
    // Two groups that each fit: the report's totals overflow.
    let err = analytics::usage_reports(&s.t.db, &b, &range, &[Dim::Project])
        .await
        .expect_err("totals overflow");
    assert!(
        matches!(&err, BillingError::LimitExceeded(m) if m.contains("totals")),
        "{err:?}"
    );
    let err = analytics::average_daily_spend(&s.t.db, &[s.ws_b], 3, at(3, 12, 0, 0))
        .await
        .expect_err("sum overflows");
    assert!(matches!(err, BillingError::LimitExceeded(_)), "{err:?}");
    // Other workspaces are unaffected.
    let a = [UsageScope::Workspace(s.ws_a)];
    let reports = analytics::usage_reports(&s.t.db, &a, &range, &[]).await?;
    assert_eq!(reports[&a[0]].totals, a_totals());

    usage_daily::Entity::delete_many()
        .filter(usage_daily::Column::WorkspaceId.eq(s.ws_b))
        .exec(&s.t.db)
        .await?;
    usage_daily_by::Entity::delete_many()
        .filter(usage_daily_by::Column::WorkspaceId.eq(s.ws_b))
        .exec(&s.t.db)
        .await?;
    s.t.finish().await
}
