//! The ledger core against a real database (SQLite by default, PostgreSQL with
//! TEST_DATABASE_URL): concurrency, idempotency, budgets, reservations, purchases.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::debits::reservations::{self, ReserveRequest};
use billing::debits::usage::{self, ProjectRef, UsageRequest};
use billing::entity::enums::{BudgetPeriod, LedgerEntryKind, ReservationStatus};
use billing::entity::{ledger_entries, usage_events};
use billing::sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder};
use billing::transfers::{self, TransferRequest};
use billing::{BillingError, Credits, ErrorCode};
use chrono::{Duration, TimeZone, Utc};
use rand::Rng;
use reservoir_tests::{
    Fixture, TEST_MODEL, TestDb, count, fund, money_row_counts, usage_req, workspace,
};
use uuid::Uuid;

/// Cost of `prompt_tokens` on the test model: 1,000 nanocredits per token.
fn cost(prompt_tokens: i64) -> i64 {
    prompt_tokens * 1_000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_usage_never_overdraws_across_two_pools() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    let start = workspace(&t.db, f.ws_a).await?.balance_nanos;
    let pools = [t.db.clone(), t.second_pool().await?];

    // 200 requests of up to 0.05 credits each (~5 credits expected in all on top of
    // the mean): only some of them fit in the 5-credit balance.
    let mut rng = rand::rng();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let db: DatabaseConnection = pools[i % 2].clone();
        let tokens = rng.random_range(1..=60_000);
        let ws = f.ws_a;
        tasks.push(tokio::spawn(async move {
            let result =
                usage::record_usage(&db, usage_req(ws, &format!("req-{i}"), tokens), Utc::now())
                    .await;
            (tokens, result)
        }));
    }
    let mut admitted_cost = 0i64;
    let (mut admitted, mut refused) = (0, 0);
    for task in tasks {
        let (tokens, result) = task.await?;
        match result {
            Ok(recorded) => {
                assert!(!recorded.replayed);
                assert_eq!(recorded.event.cost_nanos, cost(tokens));
                admitted_cost += cost(tokens);
                admitted += 1;
            }
            Err(BillingError::InsufficientCredits { available }) => {
                assert!(
                    available.nanos() < cost(tokens),
                    "refused although {available} was available"
                );
                refused += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(
        admitted > 0 && refused > 0,
        "the scenario must both admit and refuse ({admitted}/{refused})"
    );
    let ws = workspace(&t.db, f.ws_a).await?;
    assert_eq!(ws.balance_nanos, start - admitted_cost);
    assert!(ws.balance_nanos >= 0);
    assert_eq!(count(&t.db, "usage_events").await?, admitted);
    // The balance events of the workspace are gap-free: one per change.
    assert_eq!(ws.balance_sequence, count(&t.db, "balance_events").await?);
    t.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transfers_both_ways_conserve_the_total() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    fund(&t.db, f.ws_b, "10", now).await?;
    let pools = [t.db.clone(), t.second_pool().await?];
    let mut rng = rand::rng();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let db = pools[i % 2].clone();
        let (from, to) = if rng.random_bool(0.5) {
            (f.ws_a, f.ws_b)
        } else {
            (f.ws_b, f.ws_a)
        };
        let amount = Credits::from_nanos(rng.random_range(1..=3_000_000_000));
        tasks.push(tokio::spawn(async move {
            let req = TransferRequest {
                from_workspace_id: from,
                to_workspace_id: to,
                amount,
                memo: None,
                idempotency_key: format!("t-{i}"),
                created_by_user_id: None,
            };
            transfers::transfer(&db, req, Utc::now()).await
        }));
    }
    let (mut done, mut refused) = (0, 0);
    for task in tasks {
        match task.await? {
            Ok(_) => done += 1,
            Err(BillingError::InsufficientCredits { .. }) => refused += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(done > 0);
    let (a, b) = (
        workspace(&t.db, f.ws_a).await?,
        workspace(&t.db, f.ws_b).await?,
    );
    assert_eq!(
        a.balance_nanos + b.balance_nanos,
        20_000_000_000,
        "total conserved"
    );
    assert!(a.balance_nanos >= 0 && b.balance_nanos >= 0);
    assert_eq!(count(&t.db, "transfers").await?, done);
    eprintln!("transfers: {done} done, {refused} refused");
    t.finish().await
}

fn reserve_req(workspace_id: Uuid, request_id: &str, max_prompt_tokens: i64) -> ReserveRequest {
    ReserveRequest {
        workspace_id,
        project: ProjectRef::None,
        model_id: TEST_MODEL.into(),
        max_prompt_tokens,
        max_completion_tokens: 0,
        request_id: request_id.into(),
        ttl_seconds: 600,
        user_id: None,
        api_key_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reservations_racing_settlements_and_releases() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    let pools = [t.db.clone(), t.second_pool().await?];

    // 100 concurrent holds of 0.1 credits: only 50 fit in 5 credits.
    let mut tasks = Vec::new();
    for i in 0..100 {
        let db = pools[i % 2].clone();
        let ws = f.ws_a;
        tasks.push(tokio::spawn(async move {
            reservations::reserve(&db, reserve_req(ws, &format!("r-{i}"), 100_000), Utc::now())
                .await
        }));
    }
    let mut held = Vec::new();
    for task in tasks {
        match task.await? {
            Ok(r) => held.push(r),
            Err(BillingError::InsufficientCredits { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(held.len(), 50);
    assert_eq!(
        workspace(&t.db, f.ws_a).await?.reserved_nanos,
        50 * cost(100_000)
    );

    // Each hold is settled and released at the same time, from both pools; exactly one
    // of the two wins. Settlements cost 0.08 (below the hold) or 0.14 (above it).
    let mut rng = rand::rng();
    let mut tasks = Vec::new();
    for (i, r) in held.iter().enumerate() {
        let tokens = if rng.random_bool(0.5) {
            80_000
        } else {
            140_000
        };
        let (db1, db2) = (pools[i % 2].clone(), pools[(i + 1) % 2].clone());
        let id = r.id;
        tasks.push(tokio::spawn(async move {
            let settle =
                tokio::spawn(
                    async move { reservations::settle(&db1, id, tokens, 0, Utc::now()).await },
                );
            let release =
                tokio::spawn(async move { reservations::release(&db2, id, Utc::now()).await });
            (settle.await, release.await)
        }));
    }
    let (mut settled, mut released) = (0, 0);
    for task in tasks {
        let (settle, release) = task.await?;
        match (settle?, release?) {
            (Ok(s), Err(e)) => {
                assert_eq!(
                    e.code(),
                    ErrorCode::InvalidInput,
                    "release after settle: {e}"
                );
                assert_eq!(s.reservation.status, ReservationStatus::Settled);
                settled += 1;
            }
            (Err(e), Ok(r)) => {
                assert_eq!(
                    e.code(),
                    ErrorCode::InvalidInput,
                    "settle after release: {e}"
                );
                assert_eq!(r.status, ReservationStatus::Released);
                released += 1;
            }
            (s, r) => panic!("both or neither won: {s:?} / {r:?}"),
        }
    }
    assert_eq!(settled + released, 50);
    let ws = workspace(&t.db, f.ws_a).await?;
    assert_eq!(ws.reserved_nanos, 0);
    let charged: i64 = usage_events::Entity::find()
        .all(&t.db)
        .await?
        .iter()
        .map(|e| e.cost_nanos - e.shortfall_nanos)
        .sum();
    assert_eq!(ws.balance_nanos, 5_000_000_000 - charged);
    assert_eq!(count(&t.db, "usage_events").await?, settled);
    t.finish().await
}

#[tokio::test]
async fn settlement_above_the_hold_stops_at_zero_and_records_the_shortfall() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    // Hold 4 credits, then another 1: the pool is fully held.
    let big = reservations::reserve(&t.db, reserve_req(f.ws_a, "big", 4_000_000), now).await?;
    let other = reservations::reserve(&t.db, reserve_req(f.ws_a, "other", 1_000_000), now).await?;
    // The big call really cost 6 credits: 4 are collected (its own hold), the other
    // reservation's credit stays covered, and 2 are recorded as shortfall.
    let settled = reservations::settle(&t.db, big.id, 6_000_000, 0, now).await?;
    assert_eq!(settled.event.cost_nanos, 6_000_000_000);
    assert_eq!(settled.event.shortfall_nanos, 2_000_000_000);
    let ws = workspace(&t.db, f.ws_a).await?;
    assert_eq!(
        (ws.balance_nanos, ws.reserved_nanos),
        (1_000_000_000, 1_000_000_000)
    );
    let shortfall: Vec<_> = ledger_entries::Entity::find()
        .filter(ledger_entries::Column::SystemAccount.eq("usage_shortfall"))
        .all(&t.db)
        .await?;
    assert_eq!(shortfall.len(), 1);
    assert_eq!(shortfall[0].amount_nanos, -2_000_000_000);
    // Settling again with the same counts is a replay; with others a conflict.
    let again = reservations::settle(&t.db, big.id, 6_000_000, 0, now).await?;
    assert!(again.replayed);
    assert_eq!(again.event.id, settled.event.id);
    let conflict = reservations::settle(&t.db, big.id, 5_000_000, 0, now).await;
    assert!(matches!(conflict, Err(BillingError::IdempotencyConflict)));
    // The other hold expires after its TTL and frees its credit.
    assert_eq!(
        reservations::expire_due(&t.db, now + Duration::seconds(599)).await?,
        0
    );
    assert_eq!(
        reservations::expire_due(&t.db, now + Duration::seconds(601)).await?,
        1
    );
    let other = reservations::load_reservation(&t.db, other.id).await?;
    assert_eq!(other.status, ReservationStatus::Expired);
    assert_eq!(workspace(&t.db, f.ws_a).await?.reserved_nanos, 0);
    // A call that reports back after its hold expired is still recorded, charged from
    // what is available now.
    let late =
        reservations::settle(&t.db, other.id, 500_000, 0, now + Duration::seconds(700)).await?;
    assert_eq!(
        (late.event.cost_nanos, late.event.shortfall_nanos),
        (500_000_000, 0)
    );
    assert_eq!(late.reservation.status, ReservationStatus::Settled);
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 500_000_000);
    // Releasing a settled reservation is refused.
    let err = reservations::release(&t.db, other.id, now)
        .await
        .expect_err("settled");
    assert_eq!(err.code(), ErrorCode::InvalidInput);
    t.finish().await
}

#[tokio::test]
async fn the_same_request_id_records_once_and_a_different_payload_conflicts() -> anyhow::Result<()>
{
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    let first = usage::record_usage(&t.db, usage_req(f.ws_a, "same", 1_000), now).await?;
    let second = usage::record_usage(&t.db, usage_req(f.ws_a, "same", 1_000), now).await?;
    assert!(!first.replayed && second.replayed);
    assert_eq!(first.event.id, second.event.id);
    let before = money_row_counts(&t.db).await?;
    let conflict = usage::record_usage(&t.db, usage_req(f.ws_a, "same", 2_000), now).await;
    assert_eq!(
        conflict.map(|_| ()).map_err(|e| e.code()),
        Err(ErrorCode::IdempotencyConflict)
    );
    assert_eq!(money_row_counts(&t.db).await?, before);
    // The same request id in another workspace is another request.
    fund(&t.db, f.ws_b, "5", now).await?;
    assert!(
        !usage::record_usage(&t.db, usage_req(f.ws_b, "same", 1_000), now)
            .await?
            .replayed
    );

    // 20 concurrent deliveries of one request id: recorded once, charged once.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let db = t.db.clone();
        let ws = f.ws_a;
        tasks.push(tokio::spawn(async move {
            usage::record_usage(&db, usage_req(ws, "burst", 500), Utc::now()).await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        ids.insert(task.await??.event.id);
    }
    assert_eq!(ids.len(), 1);
    let ws = workspace(&t.db, f.ws_a).await?;
    assert_eq!(ws.balance_nanos, 5_000_000_000 - cost(1_000) - cost(500));

    // A request id recorded as direct usage cannot be reserved afterwards.
    let reserve_again = reservations::reserve(&t.db, reserve_req(f.ws_a, "same", 10), now).await;
    assert!(matches!(
        reserve_again,
        Err(BillingError::IdempotencyConflict)
    ));
    // Usage can only be attributed to a member of the account.
    let stranger = UsageRequest {
        user_id: Some(Uuid::now_v7()),
        ..usage_req(f.ws_a, "stranger", 10)
    };
    let err = usage::record_usage(&t.db, stranger, now)
        .await
        .expect_err("not a member");
    assert_eq!(err.code(), ErrorCode::NotFound);
    let owned = UsageRequest {
        user_id: Some(f.owner_id),
        ..usage_req(f.ws_a, "owned", 10)
    };
    assert_eq!(
        usage::record_usage(&t.db, owned, now).await?.event.user_id,
        Some(f.owner_id)
    );

    // Transfers and purchases are idempotent on their keys too.
    let req = TransferRequest {
        from_workspace_id: f.ws_a,
        to_workspace_id: f.ws_b,
        amount: Credits::parse("0.1")?,
        memo: Some("rebalance".into()),
        idempotency_key: "tk".into(),
        created_by_user_id: None,
    };
    let t1 = transfers::transfer(&t.db, req.clone(), now).await?;
    let t2 = transfers::transfer(&t.db, req.clone(), now).await?;
    assert!(!t1.replayed && t2.replayed && t1.transfer.id == t2.transfer.id);
    let other = TransferRequest {
        amount: Credits::parse("0.2")?,
        ..req
    };
    assert!(matches!(
        transfers::transfer(&t.db, other, now).await,
        Err(BillingError::IdempotencyConflict)
    ));
    t.finish().await
}

#[tokio::test]
async fn a_refused_request_writes_nothing() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "0.001", now).await.ok(); // below the purchase minimum: refused
    fund(&t.db, f.ws_a, "5", now).await?;
    let before = money_row_counts(&t.db).await?;
    let ws_before = workspace(&t.db, f.ws_a).await?;
    let refused = usage::record_usage(&t.db, usage_req(f.ws_a, "too-big", 5_000_001), now).await;
    match refused {
        Err(BillingError::InsufficientCredits { available }) => {
            assert_eq!(available, Credits::parse("5")?)
        }
        other => panic!("expected INSUFFICIENT_CREDITS, got {other:?}"),
    }
    for bad in [
        UsageRequest {
            model_id: "nope/unknown".into(),
            ..usage_req(f.ws_a, "x1", 1)
        },
        UsageRequest {
            prompt_tokens: -1,
            ..usage_req(f.ws_a, "x2", 1)
        },
        UsageRequest {
            completion_tokens: 100_000_001,
            ..usage_req(f.ws_a, "x3", 1)
        },
        usage_req(f.ws_a, "", 1),
        usage_req(f.ws_a, "has space", 1),
        UsageRequest {
            project: ProjectRef::Tag("missing".into()),
            ..usage_req(f.ws_a, "x4", 1)
        },
    ] {
        let err = usage::record_usage(&t.db, bad.clone(), now)
            .await
            .expect_err("must be refused");
        assert!(
            matches!(err.code(), ErrorCode::InvalidInput | ErrorCode::NotFound),
            "{bad:?}: {err}"
        );
    }
    assert_eq!(money_row_counts(&t.db).await?, before);
    assert_eq!(workspace(&t.db, f.ws_a).await?, ws_before);
    // Exactly the available amount is admitted.
    usage::record_usage(&t.db, usage_req(f.ws_a, "exact", 5_000_000), now).await?;
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 0);
    t.finish().await
}

#[tokio::test]
async fn a_project_budget_refuses_the_crossing_request_and_resets_each_period() -> anyhow::Result<()>
{
    let t = TestDb::new().await?;
    let day1 = Utc
        .with_ymd_and_hms(2026, 3, 10, 12, 0, 0)
        .single()
        .expect("date");
    let f = Fixture::new(&t.db, day1).await?;
    fund(&t.db, f.ws_a, "100", day1).await?;
    let project = billing::accounts::create_project(&t.db, f.ws_a, "Bot", "bot", day1).await?;
    billing::accounts::set_project_budget(
        &t.db,
        project.id,
        Some(Credits::parse("1")?),
        BudgetPeriod::Monthly,
        day1,
    )
    .await?;
    let tagged = |id: &str, tokens: i64| UsageRequest {
        project: ProjectRef::Tag("bot".into()),
        ..usage_req(f.ws_a, id, tokens)
    };

    usage::record_usage(&t.db, tagged("m1", 600_000), day1).await?; // 0.6
    let before = money_row_counts(&t.db).await?;
    match usage::record_usage(&t.db, tagged("m2", 500_000), day1).await {
        Err(BillingError::BudgetExceeded { available }) => {
            assert_eq!(available, Credits::parse("0.4")?)
        }
        other => panic!("expected BUDGET_EXCEEDED, got {other:?}"),
    }
    assert_eq!(
        money_row_counts(&t.db).await?,
        before,
        "a refusal writes nothing"
    );
    usage::record_usage(&t.db, tagged("m3", 400_000), day1).await?; // exactly to the cap
    // Untagged usage is not limited by the project's cap.
    usage::record_usage(&t.db, usage_req(f.ws_a, "free", 500_000), day1).await?;
    // A hold counts against the cap too.
    let day2 = day1 + Duration::days(25); // April 4th: a new month
    let hold = reservations::reserve(
        &t.db,
        ReserveRequest {
            project: ProjectRef::Tag("bot".into()),
            ..reserve_req(f.ws_a, "h1", 700_000)
        },
        day2,
    )
    .await?;
    assert!(matches!(
        usage::record_usage(&t.db, tagged("m4", 400_000), day2).await,
        Err(BillingError::BudgetExceeded { .. })
    ));
    reservations::release(&t.db, hold.id, day2).await?;
    usage::record_usage(&t.db, tagged("m4", 400_000), day2).await?;
    let p = billing::entity::projects::Entity::find_by_id(project.id)
        .one(&t.db)
        .await?
        .expect("project");
    assert_eq!(p.budget_spent_nanos, 400_000_000);
    assert_eq!(
        p.budget_period_start,
        Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0)
            .single()
            .expect("date")
    );
    t.finish().await
}

#[tokio::test]
async fn a_purchase_credits_amount_and_bonus_once() -> anyhow::Result<()> {
    use billing::payments::purchases::{self, PurchaseItem, PurchaseRequest};
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let req = PurchaseRequest {
        workspace_id: f.ws_a,
        item: PurchaseItem::Package("pkg_100".into()),
        source: billing::entity::enums::PurchaseSource::Manual,
        payment_method_id: None,
        idempotency_key: "buy-1".into(),
        created_by_user_id: Some(f.owner_id),
    };
    let p = purchases::create_purchase(&t.db, req.clone(), now).await?;
    assert!(
        purchases::create_purchase(&t.db, req.clone(), now)
            .await?
            .replayed
    );
    let other = PurchaseRequest {
        item: PurchaseItem::Package("pkg_50".into()),
        ..req
    };
    assert!(matches!(
        purchases::create_purchase(&t.db, other, now).await,
        Err(BillingError::IdempotencyConflict)
    ));
    // Credit twice, concurrently: credited once.
    let (a, b) = tokio::join!(
        purchases::credit_purchase(&t.db, p.purchase.id, Some("ch_1".into()), now),
        purchases::credit_purchase(&t.db, p.purchase.id, Some("ch_1".into()), now)
    );
    a?;
    b?;
    let ws = workspace(&t.db, f.ws_a).await?;
    assert_eq!(ws.balance_nanos, 115_000_000_000);
    let entries = ledger_entries::Entity::find()
        .filter(ledger_entries::Column::WorkspaceId.eq(f.ws_a))
        .order_by_asc(ledger_entries::Column::Id)
        .all(&t.db)
        .await?;
    let shape: Vec<_> = entries
        .iter()
        .map(|e| (e.kind, e.amount_nanos, e.balance_after_nanos))
        .collect();
    assert_eq!(
        shape,
        vec![
            (
                LedgerEntryKind::Purchase,
                100_000_000_000,
                Some(100_000_000_000)
            ),
            (
                LedgerEntryKind::Bonus,
                15_000_000_000,
                Some(115_000_000_000)
            ),
        ]
    );
    // A custom amount must be whole cents and within bounds.
    for bad in ["10.001", "4.99", "100001", "-5"] {
        let req = PurchaseRequest {
            workspace_id: f.ws_a,
            item: PurchaseItem::Amount(Credits::parse(bad)?),
            source: billing::entity::enums::PurchaseSource::Manual,
            payment_method_id: None,
            idempotency_key: format!("bad-{bad}"),
            created_by_user_id: None,
        };
        let err = purchases::create_purchase(&t.db, req, now)
            .await
            .expect_err(bad);
        assert_eq!(err.code(), ErrorCode::InvalidInput, "{bad}");
    }
    t.finish().await
}

#[tokio::test]
async fn the_invariant_check_catches_a_tampered_balance() -> anyhow::Result<()> {
    use billing::sea_orm::{ConnectionTrait, Statement};
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    usage::record_usage(&t.db, usage_req(f.ws_a, "u1", 1_000), now).await?;
    assert!(billing::ledger::invariants::check(&t.db).await?.is_ok());
    // A cached balance that drifts from its entries (what a lost update would leave).
    let backend = t.db.get_database_backend();
    t.db.execute_raw(Statement::from_string(
        backend,
        "UPDATE workspaces SET balance_nanos = balance_nanos + 1 WHERE name = 'A'",
    ))
    .await?;
    let report = billing::ledger::invariants::check(&t.db).await?;
    let broken: Vec<_> = report.violations.iter().map(|v| v.invariant).collect();
    assert!(
        broken.contains(&"cached balance equals the sum of the workspace's ledger entries"),
        "{broken:?}"
    );
    // A negative balance is refused by the database itself.
    let negative =
        t.db.execute_raw(Statement::from_string(
            backend,
            "UPDATE workspaces SET balance_nanos = -1 WHERE name = 'A'",
        ))
        .await;
    assert!(
        negative.is_err(),
        "the CHECK constraint must refuse a negative balance"
    );
    // Put it back so that finish() passes.
    t.db.execute_raw(Statement::from_string(
        backend,
        "UPDATE workspaces SET balance_nanos = balance_nanos - 1 WHERE name = 'A'",
    ))
    .await?;
    t.finish().await
}

#[tokio::test]
async fn names_with_control_characters_are_invalid_input_on_both_backends() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    let before = money_row_counts(&t.db).await?;
    let nul_model = UsageRequest {
        model_id: "a\u{0}b".into(),
        ..usage_req(f.ws_a, "nul-model", 1)
    };
    let nul_tag = UsageRequest {
        project: ProjectRef::Tag("a\u{0}b".into()),
        ..usage_req(f.ws_a, "nul-tag", 1)
    };
    let long_model = UsageRequest {
        model_id: "m".repeat(101),
        ..usage_req(f.ws_a, "long-model", 1)
    };
    for (bad, field) in [
        (nul_model, "modelId"),
        (nul_tag, "projectTag"),
        (long_model, "modelId"),
    ] {
        let err = usage::record_usage(&t.db, bad.clone(), now)
            .await
            .expect_err("must be refused");
        assert_eq!(err.code(), ErrorCode::InvalidInput, "{bad:?}: {err}");
        assert!(err.to_string().contains(field), "{err}");
        let held = reservations::reserve(
            &t.db,
            ReserveRequest {
                model_id: bad.model_id.clone(),
                project: bad.project.clone(),
                ..reserve_req(f.ws_a, &format!("r-{}", bad.request_id), 1)
            },
            now,
        )
        .await
        .expect_err("must be refused");
        assert_eq!(held.code(), ErrorCode::InvalidInput, "{held}");
    }
    assert_eq!(money_row_counts(&t.db).await?, before);
    t.finish().await
}
