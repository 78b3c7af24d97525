//! Auto-reload against a real database (SQLite by default, PostgreSQL with
//! TEST_DATABASE_URL): exactly one reload per crossing under racing debits, the
//! capture outcome, the 24 h cap, backoff and the switch-off after repeated
//! failures, with the admins' notifications.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::debits::reservations::{self, ReserveRequest};
use billing::debits::usage::{self, ProjectRef};
use billing::entity::enums::{
    AutoReloadStatus, PurchaseSource, PurchaseStatus, ReservationStatus, WorkspaceRole,
};
use billing::entity::{auto_reload_settings, ledger_transactions, notifications, purchases};
use billing::payments::{self, ChargeOutcome, ChargeRequest, PaymentGateway, SandboxGateway};
use billing::policies::auto_reload;
use billing::policies::auto_reload_settings::AutoReloadInput;
use billing::policies::notifications::{NotificationPayload, payload_of, recipients_of};
use billing::policies::reload_state::CONSECUTIVE_FAILURES_MAX;
use billing::sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait,
    IntoActiveModel, QueryFilter, QueryOrder,
};
use billing::transfers::{self, TransferRequest};
use billing::{BillingError, Credits};
use chrono::{DateTime, Duration, TimeZone, Utc};
use reservoir_tests::{Fixture, TEST_MODEL, TestDb, fund, usage_req, workspace};
use uuid::Uuid;

const CREDIT: i64 = 1_000_000_000;

/// A fixed instant in whole seconds (both backends store it exactly).
fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 16, 12, 0, 0)
        .single()
        .expect("valid time")
}

fn credits(s: &str) -> Credits {
    Credits::parse(s).expect("valid amount")
}

/// Debits `credits` (a multiple of 0.000001) from the workspace.
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

async fn configure(
    db: &DatabaseConnection,
    ws: Uuid,
    card: Uuid,
    max_reloads_per_day: i32,
    now: DateTime<Utc>,
) -> anyhow::Result<auto_reload_settings::Model> {
    Ok(
        billing::policies::auto_reload_settings::configure_auto_reload(
            db,
            AutoReloadInput {
                workspace_id: ws,
                enabled: true,
                threshold: credits("5"),
                amount: credits("20"),
                payment_method_id: Some(card),
                max_reloads_per_day,
            },
            now,
        )
        .await?,
    )
}

async fn reload_state(
    db: &DatabaseConnection,
    ws: Uuid,
) -> anyhow::Result<auto_reload_settings::Model> {
    auto_reload_settings::Entity::find_by_id(ws)
        .one(db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no auto-reload settings"))
}

/// The workspace's AUTO_RELOAD purchases, oldest first.
async fn reloads(db: &DatabaseConnection, ws: Uuid) -> anyhow::Result<Vec<purchases::Model>> {
    Ok(purchases::Entity::find()
        .filter(purchases::Column::WorkspaceId.eq(ws))
        .filter(purchases::Column::Source.eq(PurchaseSource::AutoReload))
        .order_by_asc(purchases::Column::CreatedAt)
        .order_by_asc(purchases::Column::Id)
        .all(db)
        .await?)
}

/// What the worker's capture job does with the gateway: charge the purchase's price
/// on its card, with the purchase id as the idempotency key.
async fn charge(
    db: &DatabaseConnection,
    gateway: &SandboxGateway,
    purchase: &purchases::Model,
) -> anyhow::Result<ChargeOutcome> {
    let card_id = purchase
        .payment_method_id
        .ok_or_else(|| anyhow::anyhow!("reload without a card"))?;
    let card = payments::cards::load_payment_method(db, card_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no card {card_id}"))?;
    Ok(gateway
        .charge(ChargeRequest::for_purchase(purchase, &card, None)?)
        .await?)
}

/// Charges a reload and reports the outcome as the capture job would.
async fn capture(
    db: &DatabaseConnection,
    gateway: &SandboxGateway,
    purchase: &purchases::Model,
    now: DateTime<Utc>,
) -> anyhow::Result<purchases::Model> {
    Ok(match charge(db, gateway, purchase).await? {
        ChargeOutcome::Succeeded { charge_id } => {
            auto_reload::reload_succeeded(db, purchase.id, &charge_id, now).await?
        }
        ChargeOutcome::Declined { reason } => {
            auto_reload::reload_failed(db, purchase.id, &format!("declined: {reason}"), true, now)
                .await?
        }
        outcome @ ChargeOutcome::RequiresAction { .. } => {
            payments::capture::settle(db, purchase.id, &outcome, now).await?;
            payments::purchases::load_purchase(db, purchase.id).await?
        }
    })
}

async fn notifications_of(
    db: &DatabaseConnection,
    ws: Uuid,
    kind: &str,
) -> anyhow::Result<Vec<notifications::Model>> {
    Ok(notifications::Entity::find()
        .filter(notifications::Column::WorkspaceId.eq(ws))
        .filter(notifications::Column::Kind.eq(kind))
        .order_by_asc(notifications::Column::CreatedAt)
        .order_by_asc(notifications::Column::Id)
        .all(db)
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_debits_start_exactly_one_reload_per_crossing() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = t0();
    let f = Fixture::new(&t.db, now).await?;
    let gateway = SandboxGateway::new();
    let visa =
        payments::cards::add_payment_method(&t.db, &gateway, f.account_id, "tok_visa", true, now)
            .await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    configure(&t.db, f.ws_a, visa.id, 2, now).await?;

    // 300 debits of 0.03 from two pools: 9 credits in all, so every one fits and the
    // balance crosses the 5-credit threshold somewhere in the middle of the race.
    let pools = [t.db.clone(), t.second_pool().await?];
    let mut tasks = Vec::new();
    for i in 0..300 {
        let db = pools[i % 2].clone();
        let ws = f.ws_a;
        tasks.push(tokio::spawn(async move {
            usage::record_usage(&db, usage_req(ws, &format!("race-{i}"), 30_000), now).await
        }));
    }
    for task in tasks {
        task.await??;
    }
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, CREDIT);
    let started = reloads(&t.db, f.ws_a).await?;
    assert_eq!(started.len(), 1, "exactly one reload for one crossing");
    let first = &started[0];
    assert_eq!(first.status, PurchaseStatus::Pending);
    assert_eq!(first.amount_nanos, 20 * CREDIT);
    assert_eq!(first.price_nanos, 20 * CREDIT);
    assert_eq!(first.bonus_nanos, 0);
    assert_eq!(first.payment_method_id, Some(visa.id));
    assert_eq!(
        first.idempotency_key,
        format!("auto-reload:{}:{}", f.ws_a, first.id)
    );
    let state = reload_state(&t.db, f.ws_a).await?;
    assert_eq!(state.status, AutoReloadStatus::Reloading);

    // The capture job charges it once and reports success: credited, IDLE.
    let later = now + Duration::minutes(1);
    let captured = capture(&t.db, &gateway, first, later).await?;
    assert_eq!(captured.status, PurchaseStatus::Succeeded);
    assert!(captured.invoice_id.is_some(), "a PAID invoice");
    assert_eq!(gateway.charge_count(), 1);
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 21 * CREDIT);
    let state = reload_state(&t.db, f.ws_a).await?;
    assert_eq!(state.status, AutoReloadStatus::Idle);
    assert_eq!(state.consecutive_failures, 0);
    assert_eq!(state.last_reload_at, Some(later));
    // The job run again (a retry, a sweep re-enqueue): one charge, one credit.
    let again = capture(&t.db, &gateway, first, later).await?;
    assert_eq!(again.status, PurchaseStatus::Succeeded);
    assert_eq!(gateway.charge_count(), 1);
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 21 * CREDIT);

    // Staying above the threshold starts nothing; the next crossing starts the next.
    debit(&t.db, f.ws_a, "above", "15", later).await?;
    assert_eq!(reloads(&t.db, f.ws_a).await?.len(), 1);
    debit(&t.db, f.ws_a, "cross-2", "1.5", later).await?;
    let started = reloads(&t.db, f.ws_a).await?;
    assert_eq!(started.len(), 2, "a second crossing, a second reload");
    assert_eq!(
        reload_state(&t.db, f.ws_a).await?.status,
        AutoReloadStatus::Reloading
    );
    // More debits while it is in flight start nothing more.
    debit(&t.db, f.ws_a, "in-flight", "1", later).await?;
    assert_eq!(reloads(&t.db, f.ws_a).await?.len(), 2);
    let second_at = later + Duration::minutes(1);
    capture(&t.db, &gateway, &started[1], second_at).await?;
    assert_eq!(gateway.charge_count(), 2);
    assert_eq!(
        workspace(&t.db, f.ws_a).await?.balance_nanos,
        23_500_000_000
    );

    // The cap (2 per 24 h) is reached: a third crossing starts nothing...
    debit(&t.db, f.ws_a, "cross-3", "19", second_at).await?;
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 4_500_000_000);
    assert_eq!(
        reloads(&t.db, f.ws_a).await?.len(),
        2,
        "capped at 2 per 24 h"
    );
    assert_eq!(
        reload_state(&t.db, f.ws_a).await?.status,
        AutoReloadStatus::Idle
    );
    // ... until the first reload is more than 24 h old.
    let day_later = later + Duration::hours(24) + Duration::seconds(1);
    debit(&t.db, f.ws_a, "after-a-day", "0.5", day_later).await?;
    let started = reloads(&t.db, f.ws_a).await?;
    assert_eq!(started.len(), 3);
    capture(&t.db, &gateway, &started[2], day_later).await?;
    assert_eq!(gateway.charge_count(), 3);
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 24 * CREDIT);
    // Three credits, one ledger transaction each.
    let posted = ledger_transactions::Entity::find()
        .filter(ledger_transactions::Column::PurchaseId.is_in(started.iter().map(|p| p.id)))
        .all(&t.db)
        .await?;
    assert_eq!(posted.len(), 3);
    t.finish().await
}

#[tokio::test]
async fn a_declining_card_turns_auto_reload_off_after_three_failures() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = t0();
    let f = Fixture::new(&t.db, now).await?;
    let gateway = SandboxGateway::new();
    let declining = payments::cards::add_payment_method(
        &t.db,
        &gateway,
        f.account_id,
        "tok_chargeDeclined",
        true,
        now,
    )
    .await?;
    let (admin, _) = billing::accounts::add_workspace_member(
        &t.db,
        f.ws_a,
        "ws-admin@test.example",
        None,
        WorkspaceRole::Admin,
        now,
    )
    .await?;
    billing::accounts::add_workspace_member(
        &t.db,
        f.ws_a,
        "member@test.example",
        None,
        WorkspaceRole::Member,
        now,
    )
    .await?;
    let admins = vec![admin.email.clone(), "owner@test.example".to_owned()];
    fund(&t.db, f.ws_a, "100", now).await?;
    configure(&t.db, f.ws_a, declining.id, 24, now).await?;

    // Crossing 1 at t0: declined.
    debit(&t.db, f.ws_a, "d-1", "96", now).await?;
    let started = reloads(&t.db, f.ws_a).await?;
    assert_eq!(started.len(), 1);
    let failed = capture(&t.db, &gateway, &started[0], now).await?;
    assert_eq!(failed.status, PurchaseStatus::Failed);
    assert_eq!(
        failed.failure_reason.as_deref(),
        Some("declined: card_declined")
    );
    let state = reload_state(&t.db, f.ws_a).await?;
    assert_eq!(state.status, AutoReloadStatus::Idle);
    assert_eq!(state.consecutive_failures, 1);
    assert_eq!(
        state.last_failure_reason.as_deref(),
        Some("declined: card_declined")
    );
    assert_eq!(state.next_attempt_at, Some(now + Duration::minutes(1)));
    // Reporting the failure again changes nothing.
    let again = auto_reload::reload_failed(&t.db, started[0].id, "again", true, now).await?;
    assert_eq!(
        again.failure_reason.as_deref(),
        Some("declined: card_declined")
    );
    assert_eq!(reload_state(&t.db, f.ws_a).await?.consecutive_failures, 1);
    let failures = notifications_of(&t.db, f.ws_a, "RELOAD_FAILED").await?;
    assert_eq!(failures.len(), 1);
    assert_eq!(recipients_of(&failures[0]), sorted(&admins));

    // Within the backoff a debit below the threshold starts nothing.
    let t1 = now + Duration::seconds(30);
    debit(&t.db, f.ws_a, "d-2", "0.1", t1).await?;
    assert_eq!(reloads(&t.db, f.ws_a).await?.len(), 1);

    // Crossing 2 after the backoff: declined again, backoff doubles.
    let t2 = now + Duration::seconds(61);
    debit(&t.db, f.ws_a, "d-3", "0.1", t2).await?;
    let started = reloads(&t.db, f.ws_a).await?;
    assert_eq!(started.len(), 2);
    capture(&t.db, &gateway, &started[1], t2).await?;
    let state = reload_state(&t.db, f.ws_a).await?;
    assert_eq!(
        (state.status, state.consecutive_failures),
        (AutoReloadStatus::Idle, 2)
    );
    assert_eq!(state.next_attempt_at, Some(t2 + Duration::minutes(2)));
    debit(&t.db, f.ws_a, "d-4", "0.1", t2 + Duration::seconds(90)).await?;
    assert_eq!(reloads(&t.db, f.ws_a).await?.len(), 2, "still backing off");

    // Crossing 3: the third failure in a row turns auto-reload off.
    let t3 = t2 + Duration::seconds(121);
    debit(&t.db, f.ws_a, "d-5", "0.1", t3).await?;
    let started = reloads(&t.db, f.ws_a).await?;
    assert_eq!(started.len(), 3);
    capture(&t.db, &gateway, &started[2], t3).await?;
    let state = reload_state(&t.db, f.ws_a).await?;
    assert_eq!(state.status, AutoReloadStatus::DisabledAfterFailures);
    assert_eq!(state.consecutive_failures, CONSECUTIVE_FAILURES_MAX);
    assert!(
        state.enabled,
        "the configuration is kept; the status says why it is off"
    );
    assert_eq!(gateway.charge_count(), 3);

    // Nothing was credited: no ledger posting for any of the reloads.
    let posted = ledger_transactions::Entity::find()
        .filter(ledger_transactions::Column::PurchaseId.is_in(started.iter().map(|p| p.id)))
        .all(&t.db)
        .await?;
    assert!(posted.is_empty());
    for p in reloads(&t.db, f.ws_a).await? {
        assert_eq!(p.status, PurchaseStatus::Failed);
    }
    assert_eq!(
        workspace(&t.db, f.ws_a).await?.balance_nanos,
        100 * CREDIT - 96 * CREDIT - 4 * CREDIT / 10
    );

    // The admins heard about every failure and about the switch-off; members did not.
    let failures = notifications_of(&t.db, f.ws_a, "RELOAD_FAILED").await?;
    assert_eq!(failures.len(), 3);
    for (n, p) in failures.iter().zip(&started) {
        assert_eq!(recipients_of(n), sorted(&admins));
        assert_eq!(n.dedupe_key, format!("reload_failed:{}", p.id));
        let NotificationPayload::ReloadFailed(payload) = payload_of(n)? else {
            panic!("not a ReloadFailed payload");
        };
        assert_eq!(payload.purchase_id, p.id);
        assert_eq!(payload.amount, credits("20"));
    }
    let disabled = notifications_of(&t.db, f.ws_a, "AUTO_RELOAD_DISABLED").await?;
    assert_eq!(disabled.len(), 1);
    assert_eq!(recipients_of(&disabled[0]), sorted(&admins));
    let NotificationPayload::AutoReloadDisabled(payload) = payload_of(&disabled[0])? else {
        panic!("not an AutoReloadDisabled payload");
    };
    assert_eq!(payload.consecutive_failures, CONSECUTIVE_FAILURES_MAX);
    assert_eq!(payload.workspace_id, f.ws_a);

    // Switched off: even a day later, debits start nothing.
    let t4 = t3 + Duration::days(1);
    debit(&t.db, f.ws_a, "d-6", "0.1", t4).await?;
    assert_eq!(reloads(&t.db, f.ws_a).await?.len(), 3);

    // Re-enabling (with a working card) is a fresh start.
    let visa =
        payments::cards::add_payment_method(&t.db, &gateway, f.account_id, "tok_visa", true, t4)
            .await?;
    let state = configure(&t.db, f.ws_a, visa.id, 24, t4).await?;
    assert_eq!(state.status, AutoReloadStatus::Idle);
    assert_eq!(state.consecutive_failures, 0);
    assert_eq!(state.next_attempt_at, None);
    debit(&t.db, f.ws_a, "d-7", "0.1", t4).await?;
    let started = reloads(&t.db, f.ws_a).await?;
    assert_eq!(started.len(), 4);
    capture(&t.db, &gateway, &started[3], t4).await?;
    let state = reload_state(&t.db, f.ws_a).await?;
    assert_eq!(
        (state.status, state.consecutive_failures),
        (AutoReloadStatus::Idle, 0)
    );
    assert_eq!(
        workspace(&t.db, f.ws_a).await?.balance_nanos,
        3_400_000_000 + 20 * CREDIT
    );
    t.finish().await
}

fn sorted(emails: &[String]) -> Vec<String> {
    let mut v = emails.to_vec();
    v.sort();
    v
}

#[tokio::test]
async fn a_gateway_outage_backs_off_but_never_switches_off() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = t0();
    let f = Fixture::new(&t.db, now).await?;
    let gateway = SandboxGateway::new();
    let visa =
        payments::cards::add_payment_method(&t.db, &gateway, f.account_id, "tok_visa", true, now)
            .await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    configure(&t.db, f.ws_a, visa.id, 24, now).await?;
    let mut at = now;
    for i in 1..=CONSECUTIVE_FAILURES_MAX + 1 {
        let amount = if i == 1 { "6" } else { "0.01" };
        debit(&t.db, f.ws_a, &format!("o-{i}"), amount, at).await?;
        let started = reloads(&t.db, f.ws_a).await?;
        assert_eq!(started.len(), usize::try_from(i)?);
        let last = started.last().expect("a reload");
        auto_reload::reload_failed(&t.db, last.id, "gateway unavailable", false, at).await?;
        let state = reload_state(&t.db, f.ws_a).await?;
        assert_eq!(state.status, AutoReloadStatus::Idle);
        assert_eq!(state.consecutive_failures, i);
        at = state.next_attempt_at.expect("a backoff") + Duration::seconds(1);
    }
    assert!(
        notifications_of(&t.db, f.ws_a, "AUTO_RELOAD_DISABLED")
            .await?
            .is_empty()
    );
    t.finish().await
}

#[tokio::test]
async fn settlements_and_transfers_out_start_reloads_too() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = t0();
    let f = Fixture::new(&t.db, now).await?;
    let gateway = SandboxGateway::new();
    let visa =
        payments::cards::add_payment_method(&t.db, &gateway, f.account_id, "tok_visa", true, now)
            .await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    fund(&t.db, f.ws_b, "10", now).await?;
    configure(&t.db, f.ws_a, visa.id, 24, now).await?;
    configure(&t.db, f.ws_b, visa.id, 24, now).await?;

    // A settlement crossing the threshold of A.
    let held = reservations::reserve(
        &t.db,
        ReserveRequest {
            workspace_id: f.ws_a,
            project: ProjectRef::None,
            model_id: TEST_MODEL.into(),
            max_prompt_tokens: 6_000_000,
            max_completion_tokens: 0,
            request_id: "hold".into(),
            ttl_seconds: 600,
            user_id: None,
            api_key_id: None,
        },
        now,
    )
    .await?;
    assert!(
        reloads(&t.db, f.ws_a).await?.is_empty(),
        "a hold is not a debit"
    );
    let settled = reservations::settle(&t.db, held.id, 6_000_000, 0, now).await?;
    assert_eq!(settled.reservation.status, ReservationStatus::Settled);
    assert_eq!(reloads(&t.db, f.ws_a).await?.len(), 1);

    // A transfer out of B crossing its threshold; A (receiving) starts nothing more.
    transfers::transfer(
        &t.db,
        TransferRequest {
            from_workspace_id: f.ws_b,
            to_workspace_id: f.ws_a,
            amount: credits("6"),
            memo: None,
            idempotency_key: "move".into(),
            created_by_user_id: None,
        },
        now,
    )
    .await?;
    assert_eq!(reloads(&t.db, f.ws_b).await?.len(), 1);
    assert_eq!(reloads(&t.db, f.ws_a).await?.len(), 1);
    for ws in [f.ws_a, f.ws_b] {
        let p = reloads(&t.db, ws).await?.remove(0);
        capture(&t.db, &gateway, &p, now).await?;
    }
    assert_eq!(gateway.charge_count(), 2);
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 30 * CREDIT);
    assert_eq!(workspace(&t.db, f.ws_b).await?.balance_nanos, 24 * CREDIT);
    t.finish().await
}

#[tokio::test]
async fn a_reload_left_reloading_is_repaired() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = t0();
    let f = Fixture::new(&t.db, now).await?;
    let gateway = SandboxGateway::new();
    let visa =
        payments::cards::add_payment_method(&t.db, &gateway, f.account_id, "tok_visa", true, now)
            .await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    configure(&t.db, f.ws_a, visa.id, 24, now).await?;
    debit(&t.db, f.ws_a, "cross", "6", now).await?;
    let started = reloads(&t.db, f.ws_a).await?;
    assert_eq!(started.len(), 1);

    // PENDING: in flight, nothing to repair.
    assert_eq!(auto_reload::repair_stuck_reloads(&t.db, now).await?, 0);
    assert_eq!(
        reload_state(&t.db, f.ws_a).await?.status,
        AutoReloadStatus::Reloading
    );

    // The purchase failed without the reload bookkeeping (a crash, an old worker):
    // the repair counts the failure and frees the state.
    let mut row = started[0].clone().into_active_model();
    row.status = Set(PurchaseStatus::Failed);
    row.failure_reason = Set(Some("declined: card_declined".into()));
    row.completed_at = Set(Some(now));
    row.update(&t.db).await?;
    let later = now + Duration::minutes(5);
    assert_eq!(auto_reload::repair_stuck_reloads(&t.db, later).await?, 1);
    let state = reload_state(&t.db, f.ws_a).await?;
    assert_eq!(state.status, AutoReloadStatus::Idle);
    assert_eq!(state.consecutive_failures, 1);
    assert_eq!(state.next_attempt_at, Some(later + Duration::minutes(1)));
    assert_eq!(auto_reload::repair_stuck_reloads(&t.db, later).await?, 0);
    assert_eq!(
        notifications_of(&t.db, f.ws_a, "RELOAD_FAILED")
            .await?
            .len(),
        1
    );

    // A reload credited by a path that knows nothing of auto-reload is repaired too.
    let t1 = later + Duration::minutes(2);
    debit(&t.db, f.ws_a, "cross-again", "0.5", t1).await?;
    let started = reloads(&t.db, f.ws_a).await?;
    assert_eq!(started.len(), 2);
    billing::payments::purchases::capture_succeeded(&t.db, started[1].id, "ch_manual", t1).await?;
    assert_eq!(
        reload_state(&t.db, f.ws_a).await?.status,
        AutoReloadStatus::Idle,
        "capture_succeeded finishes an AUTO_RELOAD purchase's reload itself"
    );
    // Leave it RELOADING by hand with the purchase already SUCCEEDED.
    settings_status_to(&t.db, f.ws_a, AutoReloadStatus::Reloading).await?;
    assert_eq!(auto_reload::repair_stuck_reloads(&t.db, t1).await?, 1);
    let state = reload_state(&t.db, f.ws_a).await?;
    assert_eq!(
        (
            state.status,
            state.consecutive_failures,
            state.last_reload_at
        ),
        (AutoReloadStatus::Idle, 0, Some(t1))
    );
    // Its outcome is final: reporting a failure now is refused.
    let err = auto_reload::reload_failed(&t.db, started[1].id, "late", true, t1).await;
    assert!(matches!(err, Err(BillingError::InvalidInput(_))));
    t.finish().await
}

async fn settings_status_to(
    db: &DatabaseConnection,
    ws: Uuid,
    status: AutoReloadStatus,
) -> anyhow::Result<()> {
    let mut row = reload_state(db, ws).await?.into_active_model();
    row.status = Set(status);
    row.update(db).await?;
    Ok(())
}
