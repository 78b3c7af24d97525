//! Low-balance alerts against a real database (SQLite by default, PostgreSQL with
//! TEST_DATABASE_URL): a threshold fires once when the balance falls below it, to its
//! own recipients only, however many debits race, and re-arms when the balance is
//! back at or above it.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::Credits;
use billing::debits::usage::{self};
use billing::entity::enums::{AlertSeverity, WorkspaceRole};
use billing::entity::{alert_thresholds, notifications};
use billing::policies::alert_thresholds::AlertThresholdInput;
use billing::policies::alerts;
use billing::policies::notifications::{
    LowBalanceAlert, NotificationPayload, payload_of, recipients_of,
};
use billing::sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder};
use billing::transfers::{self, TransferRequest};
use chrono::{DateTime, Duration, TimeZone, Utc};
use reservoir_tests::{Fixture, TestDb, fund, usage_req, workspace};
use uuid::Uuid;

const CREDIT: i64 = 1_000_000_000;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 16, 12, 0, 0)
        .single()
        .expect("valid time")
}

fn credits(s: &str) -> Credits {
    Credits::parse(s).expect("valid amount")
}

async fn debit(
    db: &DatabaseConnection,
    ws: Uuid,
    request_id: &str,
    credits: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let tokens = Credits::parse(credits)?.nanos() / 1_000;
    usage::record_usage(db, usage_req(ws, request_id, tokens), now).await?;
    Ok(())
}

/// The workspace's low-balance notifications, oldest first.
async fn alerts_sent(
    db: &DatabaseConnection,
    ws: Uuid,
) -> anyhow::Result<Vec<(notifications::Model, LowBalanceAlert)>> {
    let rows = notifications::Entity::find()
        .filter(notifications::Column::WorkspaceId.eq(ws))
        .filter(notifications::Column::Kind.eq("LOW_BALANCE_ALERT"))
        .order_by_asc(notifications::Column::CreatedAt)
        .order_by_asc(notifications::Column::Id)
        .all(db)
        .await?;
    rows.into_iter()
        .map(|n| match payload_of(&n)? {
            NotificationPayload::LowBalanceAlert(p) => Ok((n, p)),
            other => anyhow::bail!("unexpected payload {other:?}"),
        })
        .collect()
}

/// (amount in credits, armed) of every threshold, highest first.
async fn armed(db: &DatabaseConnection, ws: Uuid) -> anyhow::Result<Vec<(i64, bool)>> {
    Ok(alert_thresholds::Entity::find()
        .filter(alert_thresholds::Column::WorkspaceId.eq(ws))
        .order_by_desc(alert_thresholds::Column::AmountNanos)
        .all(db)
        .await?
        .into_iter()
        .map(|t| (t.amount_nanos / CREDIT, t.armed))
        .collect())
}

struct Setup {
    t: TestDb,
    f: Fixture,
    warning_to: Vec<String>,
    urgent_to: Vec<String>,
    warning_id: Uuid,
    urgent_id: Uuid,
}

/// Workspace A with 10 credits and two thresholds: WARNING at 8 (to one member) and
/// URGENT at 3 (to another member and the owner).
async fn setup() -> anyhow::Result<Setup> {
    let t = TestDb::new().await?;
    let now = t0();
    let f = Fixture::new(&t.db, now).await?;
    let mut members = Vec::new();
    for email in ["dev@test.example", "lead@test.example"] {
        let (user, _) = billing::accounts::add_workspace_member(
            &t.db,
            f.ws_a,
            email,
            None,
            WorkspaceRole::Member,
            now,
        )
        .await?;
        members.push(user);
    }
    fund(&t.db, f.ws_a, "10", now).await?;
    let saved = billing::policies::alert_thresholds::set_alert_thresholds(
        &t.db,
        f.ws_a,
        vec![
            AlertThresholdInput {
                amount: credits("8"),
                severity: AlertSeverity::Warning,
                recipient_ids: vec![members[0].id],
            },
            AlertThresholdInput {
                amount: credits("3"),
                severity: AlertSeverity::Urgent,
                recipient_ids: vec![members[1].id, f.owner_id],
            },
        ],
        now,
    )
    .await?;
    assert!(saved.iter().all(|(t, _)| t.armed));
    let id_of = |amount: i64| {
        saved
            .iter()
            .find(|(t, _)| t.amount_nanos == amount * CREDIT)
            .map(|(t, _)| t.id)
            .expect("saved threshold")
    };
    let (warning_id, urgent_id) = (id_of(8), id_of(3));
    let mut urgent_to = vec![members[1].email.clone(), "owner@test.example".to_owned()];
    urgent_to.sort();
    Ok(Setup {
        warning_to: vec![members[0].email.clone()],
        urgent_to,
        warning_id,
        urgent_id,
        t,
        f,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thresholds_fire_once_to_their_own_recipients_and_rearm() -> anyhow::Result<()> {
    let Setup {
        t,
        f,
        warning_to,
        urgent_to,
        warning_id,
        urgent_id,
    } = setup().await?;
    let ws = f.ws_a;
    let now = t0() + Duration::minutes(1);

    // Above both: nothing.
    debit(&t.db, ws, "above", "1", now).await?;
    assert!(alerts_sent(&t.db, ws).await?.is_empty());

    // 9 → 7.5 crosses 8: one alert, to the WARNING recipients only; disarmed.
    debit(&t.db, ws, "cross-8", "1.5", now).await?;
    let sent = alerts_sent(&t.db, ws).await?;
    assert_eq!(sent.len(), 1);
    let (row, alert) = &sent[0];
    assert_eq!(recipients_of(row), warning_to);
    assert_eq!(row.account_id, Some(f.account_id));
    assert_eq!(alert.workspace_id, ws);
    assert_eq!(alert.workspace_name, "A");
    assert_eq!(alert.severity, AlertSeverity::Warning);
    assert_eq!(alert.threshold, credits("8"));
    assert_eq!(alert.balance, credits("7.5"));
    // 2.5 credits spent today, averaged over 7 days: 7.5 credits last 21 days
    // (to within the nanocredit rounding of the average).
    let depletion = alert.projected_depletion_at.expect("a projection");
    let expected = now + Duration::days(21);
    assert!(
        depletion >= expected && depletion - expected < Duration::seconds(1),
        "projected depletion {depletion}"
    );
    assert_eq!(armed(&t.db, ws).await?, vec![(8, false), (3, true)]);
    let fired = alert_thresholds::Entity::find_by_id(warning_id)
        .one(&t.db)
        .await?
        .expect("threshold");
    assert_eq!(fired.last_triggered_at, Some(now));

    // Further debits below 8 (still above 3) fire nothing more.
    for i in 0..3 {
        debit(&t.db, ws, &format!("below-8-{i}"), "0.5", now).await?;
    }
    assert_eq!(alerts_sent(&t.db, ws).await?.len(), 1);
    assert_eq!(workspace(&t.db, ws).await?.balance_nanos, 6 * CREDIT);

    // 100 concurrent debits of 0.04 (6 → 2) from two pools cross 3 once.
    let pools = [t.db.clone(), t.second_pool().await?];
    let mut tasks = Vec::new();
    for i in 0..100 {
        let db = pools[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            usage::record_usage(&db, usage_req(ws, &format!("race-{i}"), 40_000), now).await
        }));
    }
    for task in tasks {
        task.await??;
    }
    assert_eq!(workspace(&t.db, ws).await?.balance_nanos, 2 * CREDIT);
    let sent = alerts_sent(&t.db, ws).await?;
    assert_eq!(sent.len(), 2, "the URGENT threshold fired exactly once");
    let (row, alert) = &sent[1];
    assert_eq!(recipients_of(row), urgent_to);
    assert_eq!(alert.severity, AlertSeverity::Urgent);
    assert_eq!(alert.threshold, credits("3"));
    assert!(alert.balance < credits("3"));
    assert_eq!(armed(&t.db, ws).await?, vec![(8, false), (3, false)]);

    // A purchase back to 7 re-arms URGENT (7 ≥ 3) but not WARNING (7 < 8); no alert.
    let later = now + Duration::hours(1);
    fund(&t.db, ws, "5", later).await?;
    assert_eq!(armed(&t.db, ws).await?, vec![(8, false), (3, true)]);
    assert_eq!(alerts_sent(&t.db, ws).await?.len(), 2);
    // A transfer in, back to exactly 8, re-arms WARNING (at the amount is not below).
    fund(&t.db, f.ws_b, "5", later).await?;
    transfers::transfer(
        &t.db,
        TransferRequest {
            from_workspace_id: f.ws_b,
            to_workspace_id: ws,
            amount: credits("1"),
            memo: None,
            idempotency_key: "top-up".into(),
            created_by_user_id: None,
        },
        later,
    )
    .await?;
    assert_eq!(workspace(&t.db, ws).await?.balance_nanos, 8 * CREDIT);
    assert_eq!(armed(&t.db, ws).await?, vec![(8, true), (3, true)]);

    // One debit crossing both fires both, each to its own recipients.
    debit(&t.db, ws, "cross-both", "5.5", later).await?;
    let sent = alerts_sent(&t.db, ws).await?;
    assert_eq!(sent.len(), 4);
    let mut new: Vec<(Credits, Vec<String>)> = sent[2..]
        .iter()
        .map(|(row, alert)| (alert.threshold, recipients_of(row)))
        .collect();
    new.sort();
    assert_eq!(
        new,
        vec![
            (credits("3"), urgent_to.clone()),
            (credits("8"), warning_to.clone())
        ]
    );
    // Each firing has its own dedupe key.
    let keys: std::collections::BTreeSet<&str> = sent
        .iter()
        .map(|(row, _)| row.dedupe_key.as_str())
        .collect();
    assert_eq!(keys.len(), 4);
    assert!(sent.iter().all(|(row, _)| {
        row.dedupe_key.starts_with(&format!("alert:{warning_id}:"))
            || row.dedupe_key.starts_with(&format!("alert:{urgent_id}:"))
    }));
    t.finish().await
}

#[tokio::test]
async fn transfers_fire_and_rearm_alerts_on_both_sides() -> anyhow::Result<()> {
    let Setup {
        t, f, warning_to, ..
    } = setup().await?;
    let now = t0() + Duration::minutes(1);
    let transfer = |from: Uuid, to: Uuid, amount: &str, key: &str| TransferRequest {
        from_workspace_id: from,
        to_workspace_id: to,
        amount: credits(amount),
        memo: None,
        idempotency_key: key.into(),
        created_by_user_id: None,
    };
    // Out of A: 10 → 7 crosses 8.
    transfers::transfer(&t.db, transfer(f.ws_a, f.ws_b, "3", "out"), now).await?;
    let sent = alerts_sent(&t.db, f.ws_a).await?;
    assert_eq!(sent.len(), 1);
    assert_eq!(recipients_of(&sent[0].0), warning_to);
    assert_eq!(armed(&t.db, f.ws_a).await?, vec![(8, false), (3, true)]);
    // Back into A: 7 → 9 re-arms it.
    transfers::transfer(&t.db, transfer(f.ws_b, f.ws_a, "2", "back"), now).await?;
    assert_eq!(armed(&t.db, f.ws_a).await?, vec![(8, true), (3, true)]);
    assert_eq!(alerts_sent(&t.db, f.ws_a).await?.len(), 1);
    t.finish().await
}

#[tokio::test]
async fn a_threshold_without_recipients_still_disarms() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = t0();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    billing::policies::alert_thresholds::set_alert_thresholds(
        &t.db,
        f.ws_a,
        vec![AlertThresholdInput {
            amount: credits("5"),
            severity: AlertSeverity::Warning,
            recipient_ids: vec![],
        }],
        now,
    )
    .await?;
    debit(&t.db, f.ws_a, "cross", "6", now).await?;
    assert_eq!(armed(&t.db, f.ws_a).await?, vec![(5, false)]);
    assert!(alerts_sent(&t.db, f.ws_a).await?.is_empty());
    // The check itself, called directly on an unchanged row, changes nothing more.
    let ws = workspace(&t.db, f.ws_a).await?;
    assert!(alerts::after_balance_change(&t.db, &ws, now).await? == alerts::Crossings::default());
    t.finish().await
}

/// The per-call debit path pushes the jobs of what it wrote after its commit, by the
/// group-commit writer's rule: the alert e-mail of a crossing is pushed at once, not
/// left to the worker's sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_call_path_pushes_the_alert_it_wrote() -> anyhow::Result<()> {
    use billing::jobs::{CapturePurchase, DeliverNotification, JobSink, PushFuture};
    #[derive(Default)]
    struct Pushed(std::sync::Mutex<Vec<Uuid>>);
    impl JobSink for Pushed {
        fn capture(&self, _job: CapturePurchase) -> PushFuture<'_> {
            Box::pin(async { Ok(()) })
        }
        fn deliver(&self, job: DeliverNotification) -> PushFuture<'_> {
            if let Ok(mut pushed) = self.0.lock() {
                pushed.push(job.notification_id);
            }
            Box::pin(async { Ok(()) })
        }
    }
    let s = setup().await?;
    let sink = Pushed::default();
    // 10 → 7.5 credits: below the WARNING threshold at 8.
    let tokens = credits("2.5").nanos() / 1_000;
    let req = usage_req(s.f.ws_a, "per-call-cross", tokens);
    usage::record_usage_then_push(&s.t.db, &sink, req, t0()).await?;
    let sent = alerts_sent(&s.t.db, s.f.ws_a).await?;
    assert_eq!(sent.len(), 1, "one crossing, one alert");
    let pushed = sink.0.lock().map(|p| p.clone()).unwrap_or_default();
    assert_eq!(
        pushed,
        vec![sent[0].0.id],
        "its job pushed after the commit"
    );
    Ok(())
}
