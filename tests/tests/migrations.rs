//! Migration steps that move existing data forward, on SQLite and PostgreSQL: rows
//! written the way the code before a step wrote them, then the step, then the
//! invariants and today's code on the result.

use billing::entity::{ledger_entries, usage_events};
use billing::sea_orm::sea_query::{Alias, Expr, ExprTrait as _, Query, SimpleExpr};
use billing::sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};
use chrono::Utc;
use migration::MigratorTrait as _;
use reservoir_tests::{Fixture, TEST_MODEL, TestDb, fund, usage_req, workspace};
use uuid::Uuid;

/// Steps before `m20261206_000012_usage_posting_per_batch`.
const BEFORE_USAGE_POSTING_PER_BATCH: u32 = 7;

/// A usage event posted as every one was before step 12: its own transaction
/// `usage:<event>` naming it in `usage_event_id`, two entries, the balance moved and a
/// balance event. Returns the event's id and its transaction's id.
async fn old_usage(t: &TestDb, ws: Uuid, cost_nanos: i64) -> anyhow::Result<(Uuid, i64)> {
    let (db, now, event_id) = (&t.db, Utc::now(), Uuid::now_v7());
    let before = workspace(db, ws).await?;
    let balance_after = before.balance_nanos - cost_nanos;
    let sequence = before.balance_sequence + 1;
    let insert = |table: &str, columns: &[&str], rows: Vec<Vec<SimpleExpr>>| {
        let mut q = Query::insert();
        q.into_table(Alias::new(table))
            .columns(columns.iter().map(|c| Alias::new(*c)));
        for row in rows {
            q.values_panic(row);
        }
        q
    };
    let event_columns = [
        "id",
        "workspace_id",
        "model_id",
        "prompt_tokens",
        "completion_tokens",
        "cost_nanos",
        "shortfall_nanos",
        "request_id",
        "request_hash",
        "created_at",
    ];
    db.execute(&insert(
        "usage_events",
        &event_columns,
        vec![vec![
            event_id.into(),
            ws.into(),
            TEST_MODEL.into(),
            1_i64.into(),
            0_i64.into(),
            cost_nanos.into(),
            0_i64.into(),
            "old-1".into(),
            "h".into(),
            now.into(),
        ]],
    ))
    .await?;
    let tx_columns = ["kind", "idempotency_key", "usage_event_id", "created_at"];
    let key = format!("usage:{event_id}");
    let mut tx_insert = insert(
        "ledger_transactions",
        &tx_columns,
        vec![vec![
            "USAGE".into(),
            key.into(),
            event_id.into(),
            now.into(),
        ]],
    );
    tx_insert.returning_col(Alias::new("id"));
    let tx = db
        .query_one(&tx_insert)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no transaction id"))?
        .try_get::<i64>("", "id")?;
    let entry_columns = [
        "transaction_id",
        "workspace_id",
        "system_account",
        "kind",
        "amount_nanos",
        "balance_after_nanos",
        "description",
        "created_at",
    ];
    let revenue = Some("usage_revenue".to_owned());
    db.execute(&insert(
        "ledger_entries",
        &entry_columns,
        vec![
            vec![
                tx.into(),
                Some(ws).into(),
                None::<String>.into(),
                "USAGE".into(),
                (-cost_nanos).into(),
                Some(balance_after).into(),
                "old".into(),
                now.into(),
            ],
            vec![
                tx.into(),
                None::<Uuid>.into(),
                revenue.into(),
                "USAGE".into(),
                cost_nanos.into(),
                None::<i64>.into(),
                "old".into(),
                now.into(),
            ],
        ],
    ))
    .await?;
    db.execute(
        Query::update()
            .table(Alias::new("workspaces"))
            .value(Alias::new("balance_nanos"), balance_after)
            .value(Alias::new("balance_sequence"), sequence)
            .and_where(Expr::col(Alias::new("id")).eq(ws)),
    )
    .await?;
    let event_columns = [
        "workspace_id",
        "sequence",
        "balance_nanos",
        "reserved_nanos",
        "cause",
        "created_at",
    ];
    db.execute(&insert(
        "balance_events",
        &event_columns,
        vec![vec![
            ws.into(),
            sequence.into(),
            balance_after.into(),
            0_i64.into(),
            "USAGE".into(),
            now.into(),
        ]],
    ))
    .await?;
    Ok((event_id, tx))
}

#[tokio::test]
async fn usage_posted_before_batching_migrates_forward() -> anyhow::Result<()> {
    let t = TestDb::migrated(Some(BEFORE_USAGE_POSTING_PER_BATCH)).await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    let (event_id, tx) = old_usage(&t, f.ws_a, 250_000_000).await?;

    migration::Migrator::up(&t.db, None).await?;
    let event = usage_events::Entity::find_by_id(event_id)
        .one(&t.db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the event survives"))?;
    assert_eq!(event.ledger_transaction_id, Some(tx), "backfilled");
    // Today's code goes on from there, and the ledger's rules hold for both.
    let recorded =
        billing::debits::usage::record_usage(&t.db, usage_req(f.ws_a, "new-1", 1_000), now).await?;
    let new_tx = recorded.event.ledger_transaction_id.expect("posted");
    assert_ne!(new_tx, tx);
    let entries = ledger_entries::Entity::find()
        .filter(ledger_entries::Column::TransactionId.is_in([tx, new_tx]))
        .all(&t.db)
        .await?;
    assert_eq!(entries.len(), 4);
    t.finish().await
}
