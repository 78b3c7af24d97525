//! The group-commit writer (`billing::debits::writer`) against a real database: two writers
//! on two pools stand for two API processes; batches must never overdraw, never lose
//! or double a debit, and answer every caller with its own result.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::accounts;
use billing::debits::reservations::ReserveRequest;
use billing::debits::usage::ProjectRef;
use billing::debits::writer::{DebitWriter, SettleRequest, WriterConfig};
use billing::entity::enums::{BudgetPeriod, ReservationStatus};
use billing::entity::{ledger_entries, ledger_transactions, projects, usage_events};
use billing::sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
};
use billing::{BillingError, Credits, ErrorCode};
use chrono::Utc;
use rand::Rng;
use reservoir_tests::{Fixture, TEST_MODEL, TestDb, count, fund, usage_req, workspace};
use std::collections::HashSet;
use uuid::Uuid;

fn writer(db: &DatabaseConnection, window_us: u64) -> anyhow::Result<DebitWriter> {
    let config = WriterConfig {
        window_us,
        ..WriterConfig::for_backend(db.get_database_backend())
    };
    Ok(DebitWriter::start(db.clone(), config, None)?)
}

async fn project_row(db: &DatabaseConnection, id: Uuid) -> anyhow::Result<projects::Model> {
    projects::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no project {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_writers_never_overdraw_and_never_double() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    let project = accounts::create_project(&t.db, f.ws_a, "Capped", "capped", now).await?;
    accounts::set_project_budget(
        &t.db,
        project.id,
        Some(Credits::parse("0.3")?),
        BudgetPeriod::Monthly,
        now,
    )
    .await?;
    let start = workspace(&t.db, f.ws_a).await?.balance_nanos;
    let second = t.second_pool().await?;
    let writers = [writer(&t.db, 0)?, writer(&second, 0)?];

    // 400 requests of up to 0.08 credits (about 16 credits asked of 5), half of them
    // against a project capped at 0.3 credits, and every fifth one sent twice at once
    // through the other writer: a retry racing its original.
    let mut rng = rand::rng();
    let mut tasks = Vec::new();
    for i in 0..400usize {
        let tokens = rng.random_range(1..=80_000);
        let mut req = usage_req(f.ws_a, &format!("req-{i}"), tokens);
        if i % 2 == 0 {
            req.project = ProjectRef::Tag("capped".into());
        }
        let copies = if i % 5 == 0 { 2 } else { 1 };
        for copy in 0..copies {
            let w = writers[(i + copy) % 2].clone();
            let req = req.clone();
            tasks.push(tokio::spawn(async move {
                (i, tokens, w.record_usage(req, Utc::now()).await)
            }));
        }
    }
    let mut events: std::collections::HashMap<usize, Uuid> = Default::default();
    let (mut admitted_cost, mut project_cost) = (0i64, 0i64);
    let (mut insufficient, mut over_budget) = (0, 0);
    for task in tasks {
        let (i, tokens, result) = task.await?;
        match result {
            Ok(recorded) => {
                assert_eq!(recorded.event.cost_nanos, tokens * 1_000);
                // A request and its retry answer with the same event.
                match events.get(&i) {
                    Some(id) => assert_eq!(*id, recorded.event.id, "req-{i} recorded twice"),
                    None => {
                        events.insert(i, recorded.event.id);
                        admitted_cost += tokens * 1_000;
                        if i % 2 == 0 {
                            project_cost += tokens * 1_000;
                        }
                    }
                }
            }
            Err(BillingError::InsufficientCredits { available }) => {
                assert!(available.nanos() < tokens * 1_000);
                insufficient += 1;
            }
            Err(BillingError::BudgetExceeded { .. }) => over_budget += 1,
            Err(e) => panic!("unexpected error for req-{i}: {e}"),
        }
    }
    assert!(
        insufficient > 0 && over_budget > 0 && !events.is_empty(),
        "admitted {}, insufficient {insufficient}, over budget {over_budget}",
        events.len()
    );
    let ws = workspace(&t.db, f.ws_a).await?;
    assert_eq!(ws.balance_nanos, start - admitted_cost);
    assert!(ws.balance_nanos >= 0);
    assert_eq!(count(&t.db, "usage_events").await?, events.len() as i64);
    let project = project_row(&t.db, project.id).await?;
    assert_eq!(project.budget_spent_nanos, project_cost);
    assert!(project_cost <= 300_000_000);
    // One balance event per commit, gap-free.
    assert_eq!(ws.balance_sequence, count(&t.db, "balance_events").await?);
    t.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_answers_each_request_on_its_own() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    let before = workspace(&t.db, f.ws_a).await?;
    // A long window: everything sent below lands in one batch, in this order
    // (`join_all` polls, hence queues, its futures in order).
    let w = writer(&t.db, 50_000)?;
    let mut unknown_model = usage_req(f.ws_a, "model", 1);
    unknown_model.model_id = "nope/none".into();
    let mut unknown_project = usage_req(f.ws_a, "project", 1);
    unknown_project.project = ProjectRef::Tag("missing".into());
    let requests = vec![
        usage_req(f.ws_a, "fits", 4_000_000),    // 4 credits
        usage_req(f.ws_a, "too-big", 1_500_000), // 1.5 of the 1 left
        usage_req(f.ws_a, "fits", 4_000_000),    // a retry
        usage_req(f.ws_a, "fits", 1),            // the same id, another payload
        unknown_model,
        unknown_project,
        usage_req(f.ws_a, "small", 500_000), // 0.5: fits after the refusal
    ];
    let answers = futures::future::join_all(
        requests
            .into_iter()
            .map(|req| w.record_usage(req, Utc::now())),
    )
    .await;
    let [
        fits,
        too_big,
        retry,
        conflict,
        unknown_model,
        unknown_project,
        small,
    ]: [_; 7] = answers
        .try_into()
        .map_err(|_| anyhow::anyhow!("seven answers"))?;

    let fits = fits?;
    assert!(!fits.replayed);
    match too_big {
        Err(BillingError::InsufficientCredits { available }) => {
            assert_eq!(available, Credits::parse("1")?);
        }
        other => panic!("expected INSUFFICIENT_CREDITS, got {other:?}"),
    }
    let retry = retry?;
    assert!(retry.replayed);
    assert_eq!(retry.event.id, fits.event.id);
    let code = |r: billing::Result<_>| r.err().map(|e: BillingError| e.code());
    assert_eq!(code(conflict), Some(ErrorCode::IdempotencyConflict));
    assert_eq!(code(unknown_model), Some(ErrorCode::InvalidInput));
    assert_eq!(code(unknown_project), Some(ErrorCode::NotFound));
    small?;

    let after = workspace(&t.db, f.ws_a).await?;
    assert_eq!(
        after.balance_nanos,
        before.balance_nanos - 4_500_000_000,
        "only the two admitted debits"
    );
    assert_eq!(
        after.balance_sequence,
        before.balance_sequence + 1,
        "one commit, one balance event"
    );
    let events = usage_events::Entity::find()
        .filter(usage_events::Column::WorkspaceId.eq(f.ws_a))
        .all(&t.db)
        .await?;
    let ids: HashSet<&str> = events.iter().map(|e| e.request_id.as_str()).collect();
    assert_eq!(ids, HashSet::from(["fits", "small"]));
    t.finish().await
}

/// One batch posts one USAGE ledger transaction per workspace it debited, whose entries
/// carry the sums and whose id each event keeps; a workspace debited once in the batch
/// gets the transaction it always had (docs/LEDGER.md §3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_posts_once_per_workspace() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    fund(&t.db, f.ws_b, "5", now).await?;
    // A long window: the four debits land in one batch (as above).
    let w = writer(&t.db, 50_000)?;
    let requests = vec![
        usage_req(f.ws_a, "a1", 1_000_000),
        usage_req(f.ws_b, "b1", 2_000_000),
        usage_req(f.ws_a, "a2", 300_000),
        usage_req(f.ws_a, "a3", 40_000),
    ];
    let answers = futures::future::join_all(
        requests
            .into_iter()
            .map(|req| w.record_usage(req, Utc::now())),
    )
    .await;
    let recorded = answers.into_iter().collect::<Result<Vec<_>, _>>()?;
    let (a1, b1, a2, a3) = (
        &recorded[0].event,
        &recorded[1].event,
        &recorded[2].event,
        &recorded[3].event,
    );
    let batch_id = a1
        .ledger_transaction_id
        .expect("the answer names its posting");
    assert_eq!(a2.ledger_transaction_id, Some(batch_id));
    assert_eq!(a3.ledger_transaction_id, Some(batch_id));
    let own_id = b1
        .ledger_transaction_id
        .expect("the answer names its posting");
    assert_ne!(own_id, batch_id);

    let tx = |id: i64| ledger_transactions::Entity::find_by_id(id).one(&t.db);
    let batch = tx(batch_id).await?.expect("the batch's transaction");
    assert_eq!(batch.idempotency_key, format!("usage-batch:{}", a1.id));
    assert_eq!(batch.usage_event_id, None);
    let own = tx(own_id).await?.expect("b's transaction");
    assert_eq!(own.idempotency_key, format!("usage:{}", b1.id));
    assert_eq!(own.usage_event_id, Some(b1.id));

    let entries = ledger_entries::Entity::find()
        .filter(ledger_entries::Column::TransactionId.eq(batch_id))
        .order_by_asc(ledger_entries::Column::Id)
        .all(&t.db)
        .await?;
    let a_after = workspace(&t.db, f.ws_a).await?;
    let total = 1_340_000_000; // 1 + 0.3 + 0.04 credits
    let shape: Vec<_> = entries
        .iter()
        .map(|e| {
            (
                e.workspace_id,
                e.system_account.as_deref(),
                e.amount_nanos,
                e.balance_after_nanos,
            )
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            (Some(f.ws_a), None, -total, Some(a_after.balance_nanos)),
            (None, Some("usage_revenue"), total, None),
        ]
    );
    assert_eq!(entries[0].description, "usage of 3 requests");

    // The rows carry what the answers said, and a replay answers the same.
    let rows = usage_events::Entity::find()
        .filter(usage_events::Column::LedgerTransactionId.eq(batch_id))
        .all(&t.db)
        .await?;
    assert_eq!(rows.len(), 3);
    let replay = w
        .record_usage(usage_req(f.ws_a, "a2", 300_000), Utc::now())
        .await?;
    assert!(replay.replayed);
    assert_eq!(replay.event.id, a2.id);
    assert_eq!(replay.event.ledger_transaction_id, Some(batch_id));
    t.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_settle_and_release_through_the_writer() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    let w = writer(&t.db, 0)?;
    let hold = |request_id: &str, max_prompt_tokens: i64| ReserveRequest {
        workspace_id: f.ws_a,
        project: ProjectRef::None,
        model_id: TEST_MODEL.into(),
        max_prompt_tokens,
        max_completion_tokens: 0,
        request_id: request_id.into(),
        ttl_seconds: 600,
        user_id: None,
        api_key_id: None,
    };
    let a = w.reserve(hold("a", 1_500_000), Utc::now()).await?; // 1.5 credits
    let b = w.reserve(hold("b", 1_500_000), Utc::now()).await?;
    assert_eq!(w.reserve(hold("a", 1_500_000), Utc::now()).await?.id, a.id);
    assert_eq!(
        w.reserve(hold("a", 1), Utc::now())
            .await
            .err()
            .map(|e| e.code()),
        Some(ErrorCode::IdempotencyConflict)
    );
    match w.reserve(hold("c", 2_500_000), Utc::now()).await {
        Err(BillingError::InsufficientCredits { available }) => {
            assert_eq!(available, Credits::parse("2")?);
        }
        other => panic!("expected INSUFFICIENT_CREDITS, got {other:?}"),
    }
    let ws = workspace(&t.db, f.ws_a).await?;
    assert_eq!(ws.reserved_nanos, 3_000_000_000);

    // Settle `a` above its hold: the hold is freed and the actual cost charged.
    let settle = |id: Uuid, prompt_tokens: i64| SettleRequest {
        reservation_id: id,
        workspace_id: f.ws_a,
        prompt_tokens,
        completion_tokens: 0,
    };
    let settled = w.settle(settle(a.id, 1_750_000), Utc::now()).await?;
    assert_eq!(settled.event.cost_nanos, 1_750_000_000);
    assert_eq!(settled.event.shortfall_nanos, 0);
    assert_eq!(settled.reservation.status, ReservationStatus::Settled);
    // A retry replays; other counts conflict; releasing a settled hold is refused.
    let again = w.settle(settle(a.id, 1_750_000), Utc::now()).await?;
    assert!(again.replayed);
    assert_eq!(again.event.id, settled.event.id);
    assert_eq!(
        w.settle(settle(a.id, 1), Utc::now())
            .await
            .err()
            .map(|e| e.code()),
        Some(ErrorCode::IdempotencyConflict)
    );
    assert_eq!(
        w.release(f.ws_a, a.id, Utc::now())
            .await
            .err()
            .map(|e| e.code()),
        Some(ErrorCode::InvalidInput)
    );
    let released = w.release(f.ws_a, b.id, Utc::now()).await?;
    assert_eq!(released.status, ReservationStatus::Released);
    assert_eq!(
        w.release(f.ws_a, b.id, Utc::now()).await?.status,
        ReservationStatus::Released
    );
    // A settlement costing more than everything available: charged to zero, the rest
    // recorded as shortfall.
    let d = w.reserve(hold("d", 500_000), Utc::now()).await?;
    let big = w.settle(settle(d.id, 10_000_000), Utc::now()).await?;
    assert_eq!(big.event.cost_nanos, 10_000_000_000);
    assert_eq!(big.event.shortfall_nanos, 10_000_000_000 - 3_250_000_000);
    let ws = workspace(&t.db, f.ws_a).await?;
    assert_eq!((ws.balance_nanos, ws.reserved_nanos), (0, 0));
    assert_eq!(
        w.settle(settle(Uuid::now_v7(), 1), Utc::now())
            .await
            .err()
            .map(|e| e.code()),
        Some(ErrorCode::NotFound)
    );
    t.finish().await
}

fn pipelined(db: &DatabaseConnection) -> anyhow::Result<DebitWriter> {
    let config = WriterConfig {
        pipeline: true,
        ..WriterConfig::for_backend(db.get_database_backend())
    };
    Ok(DebitWriter::start(db.clone(), config, None)?)
}

/// A pipelined batch is judged on the previous batch's rows as it left them; a
/// purchase committed since then makes those rows stale. The next debit must be
/// judged on the balance with the purchase (admitted), not refused on the overlay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_batch_sees_what_committed_since_the_last() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    let start = workspace(&t.db, f.ws_a).await?.balance_nanos;
    let w = pipelined(&t.db)?;
    // 4.9 credits: what the next batch's overlay says is left is start - 4.9.
    w.record_usage(usage_req(f.ws_a, "first", 4_900_000), Utc::now())
        .await?;
    fund(&t.db, f.ws_a, "5", Utc::now()).await?;
    let second = w
        .record_usage(usage_req(f.ws_a, "second", 5_000_000), Utc::now())
        .await;
    assert!(
        second.is_ok(),
        "5 credits with {} nanos left after the purchase: {second:?}",
        start - 4_900_000_000 + 5_000_000_000
    );
    // A replay of the first batch's request answers from what it committed.
    let replay = w
        .record_usage(usage_req(f.ws_a, "first", 4_900_000), Utc::now())
        .await?;
    assert!(replay.replayed);
    let ws = workspace(&t.db, f.ws_a).await?;
    assert_eq!(ws.balance_nanos, start + 5_000_000_000 - 9_900_000_000);
    assert_eq!(ws.balance_sequence, count(&t.db, "balance_events").await?);
    t.finish().await
}

/// One process's pipelined writer, alone on a hot workspace with a budgeted project:
/// nothing but its own batches moves the rows, so every speculative batch's overlay is
/// right and none may run twice. (Before a speculative batch waited for the previous
/// commit before writing, 3-5 % did: their write started in a snapshot without the
/// previous batch and PostgreSQL skipped the row; docs/LEDGER.md §4.1.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lone_pipelined_writer_never_runs_a_batch_twice() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "100", now).await?;
    let project = accounts::create_project(&t.db, f.ws_a, "Capped", "capped", now).await?;
    let cap = Credits::parse("50")?;
    accounts::set_project_budget(&t.db, project.id, Some(cap), BudgetPeriod::Monthly, now).await?;
    let start = workspace(&t.db, f.ws_a).await?.balance_nanos;
    let pg = t.db.get_database_backend() == billing::sea_orm::DbBackend::Postgres;
    if pg {
        // Each batch's COMMIT takes 5 ms more (a deferred trigger sleeps in it, with
        // the batch's locks held and its rows not yet visible): the next batch is
        // judged well before the previous one has committed.
        t.db.execute_unprepared(
            "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(0.005); RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON balance_events \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
        )
        .await?;
    }
    let w = pipelined(&t.db)?;
    // 64 clients, each sending its next debit as soon as the last is answered: the
    // lane always has a batch writing or committing when the next one is judged.
    let clients: Vec<_> = (0..64usize)
        .map(|client| {
            let w = w.clone();
            tokio::spawn(async move {
                let mut cost_nanos = 0i64;
                for n in 0..25usize {
                    let mut req = usage_req(f.ws_a, &format!("c{client}-{n}"), 1_000 + n as i64);
                    req.project = ProjectRef::Tag("capped".into());
                    cost_nanos += w.record_usage(req, Utc::now()).await?.event.cost_nanos;
                }
                anyhow::Ok(cost_nanos)
            })
        })
        .collect();
    let mut admitted = 0i64;
    for client in clients {
        admitted += client.await??;
    }
    let stats = w.stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let (speculations, failed) = (load(&stats.speculations), load(&stats.speculations_failed));
    eprintln!("speculative batches: {speculations}, run again: {failed}");
    assert_eq!(failed, 0, "a lone writer's overlay is never stale");
    if pg {
        assert!(
            speculations > 0,
            "pipelining is on by default on PostgreSQL"
        );
    }
    let ws = workspace(&t.db, f.ws_a).await?;
    assert_eq!(ws.balance_nanos, start - admitted);
    assert_eq!(ws.balance_sequence, count(&t.db, "balance_events").await?);
    assert_eq!(
        project_row(&t.db, project.id).await?.budget_spent_nanos,
        admitted
    );
    t.finish().await
}

/// Pipelined debits on one workspace from two processes' writers while transfers
/// and purchases move the same balance outside them: every speculative batch that
/// was judged on rows another transaction moved runs again under its locks, so the
/// balance is exact, never negative, and the sequence has no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_batches_race_transfers_and_purchases() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    fund(&t.db, f.ws_b, "5", now).await?;
    let total = |a: &billing::entity::workspaces::Model, b: &billing::entity::workspaces::Model| {
        a.balance_nanos + b.balance_nanos
    };
    let start = total(
        &workspace(&t.db, f.ws_a).await?,
        &workspace(&t.db, f.ws_b).await?,
    );
    let second = t.second_pool().await?;
    let writers = [pipelined(&t.db)?, pipelined(&second)?];
    let mut debits = Vec::new();
    for i in 0..600usize {
        let w = writers[i % 2].clone();
        let req = usage_req(f.ws_a, &format!("p-{i}"), 40_000 + (i as i64 % 7) * 1_000);
        debits.push(tokio::spawn(async move {
            w.record_usage(req, Utc::now()).await
        }));
    }
    let db = t.db.clone();
    let (ws_a, ws_b) = (f.ws_a, f.ws_b);
    let movers = tokio::spawn(async move {
        let mut funded = 0i64;
        for i in 0..30u32 {
            let (from, to) = if i % 2 == 0 {
                (ws_b, ws_a)
            } else {
                (ws_a, ws_b)
            };
            let req = billing::transfers::TransferRequest {
                from_workspace_id: from,
                to_workspace_id: to,
                amount: Credits::parse("0.05")?,
                memo: None,
                idempotency_key: format!("move-{i}"),
                created_by_user_id: None,
            };
            match billing::transfers::transfer(&db, req, Utc::now()).await {
                Ok(_) | Err(BillingError::InsufficientCredits { .. }) => {}
                Err(e) => anyhow::bail!("transfer {i}: {e}"),
            }
            if i % 5 == 0 {
                fund(&db, ws_a, "5", Utc::now()).await?;
                funded += 5_000_000_000;
            }
            tokio::task::yield_now().await;
        }
        anyhow::Ok(funded)
    });
    let mut admitted = 0i64;
    for task in debits {
        match task.await? {
            Ok(recorded) => admitted += recorded.event.cost_nanos,
            Err(BillingError::InsufficientCredits { .. }) => {}
            Err(e) => panic!("unexpected refusal: {e}"),
        }
    }
    let funded = movers.await??;
    let (a, b) = (
        workspace(&t.db, f.ws_a).await?,
        workspace(&t.db, f.ws_b).await?,
    );
    assert!(a.balance_nanos >= 0 && b.balance_nanos >= 0);
    assert_eq!(total(&a, &b), start + funded - admitted);
    let sum_events: i64 = usage_events::Entity::find()
        .all(&t.db)
        .await?
        .iter()
        .map(|e| e.cost_nanos)
        .sum();
    assert_eq!(sum_events, admitted, "every admitted debit, and only those");
    let retried: u64 = writers
        .iter()
        .map(|w| {
            w.stats()
                .speculations_failed
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    eprintln!("speculative batches run again under their locks: {retried}");
    t.finish().await
}

/// Each writer caches prices and discounts under the configuration version its
/// batches read (`engine::cache`); a trigger moves the version with every change. A
/// price change and a new discount, committed through one pool, apply to the very
/// next batch of the writers of both pools (two processes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_change_applies_to_the_next_batch_in_every_process() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    let second = t.second_pool().await?;
    let writers = [writer(&t.db, 0)?, writer(&second, 0)?];
    let mut n = 0;
    let mut costs = || {
        let (writers, ws) = (writers.clone(), f.ws_a);
        n += 1;
        let round = n;
        async move {
            let mut costs = Vec::new();
            for (i, w) in writers.iter().enumerate() {
                let req = usage_req(ws, &format!("r{round}-w{i}"), 1_000);
                costs.push(w.record_usage(req, Utc::now()).await?.event.cost_nanos);
            }
            anyhow::Ok(costs)
        }
    };
    // 1 credit per million prompt tokens: 1,000 nanocredits a token.
    assert_eq!(costs().await?, [1_000_000, 1_000_000]);
    assert_eq!(
        costs().await?,
        [1_000_000, 1_000_000],
        "served from the caches"
    );
    billing::catalog::upsert_model(
        &t.db,
        billing::catalog::ModelInput {
            id: TEST_MODEL.into(),
            name: "Test model".into(),
            prompt_price_per_million: Credits::parse("2")?,
            completion_price_per_million: Credits::parse("2")?,
            active: true,
        },
        Utc::now(),
    )
    .await?;
    assert_eq!(costs().await?, [2_000_000, 2_000_000], "the new price");
    billing::catalog::set_pricing_agreement(
        &second,
        f.account_id,
        true,
        billing::DiscountBps::new(1_000)?,
        0,
        Utc::now(),
    )
    .await?;
    assert_eq!(
        costs().await?,
        [1_800_000, 1_800_000],
        "the new 10 % discount"
    );
    t.finish().await
}
