//! Migration steps that move existing data forward, on SQLite and PostgreSQL: rows
//! written the way the code before a step wrote them, then the step, then the
//! invariants and today's code on the result.

use billing::entity::{ledger_entries, usage_events};
use billing::sea_orm::sea_query::{
    Alias, Expr, ExprTrait as _, InsertStatement, Query, SimpleExpr,
};
use billing::sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter,
};
use chrono::Utc;
use migration::MigratorTrait as _;
use reservoir_tests::{Fixture, TEST_MODEL, TestDb, fund, usage_req, workspace};
use uuid::Uuid;

/// Steps before `m20261206_000012_usage_posting_per_batch`.
const BEFORE_USAGE_POSTING_PER_BATCH: u32 = 7;

/// A multi-row INSERT of sea-query expressions (rendered for either backend).
fn insert(table: &str, columns: &[&str], rows: Vec<Vec<SimpleExpr>>) -> InsertStatement {
    let mut q = Query::insert();
    q.into_table(Alias::new(table))
        .columns(columns.iter().map(|c| Alias::new(*c)));
    for row in rows {
        q.values_panic(row);
    }
    q
}

/// A usage event posted as every one was before step 12: its own transaction
/// `usage:<event>` naming it in `usage_event_id`, and two entries. Returns the event's
/// id and its transaction's id.
async fn old_usage(
    db: &DatabaseConnection,
    ws: Uuid,
    cost_nanos: i64,
    balance_after: i64,
) -> anyhow::Result<(Uuid, i64)> {
    let (now, event_id) = (Utc::now(), Uuid::now_v7());
    let event: Vec<SimpleExpr> = vec![
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
    ];
    let columns = "id workspace_id model_id prompt_tokens completion_tokens cost_nanos \
                   shortfall_nanos request_id request_hash created_at";
    let columns: Vec<&str> = columns.split_whitespace().collect();
    db.execute(&insert("usage_events", &columns, vec![event]))
        .await?;
    let header = vec![
        "USAGE".into(),
        format!("usage:{event_id}").into(),
        event_id.into(),
        now.into(),
    ];
    let columns = ["kind", "idempotency_key", "usage_event_id", "created_at"];
    let mut header = insert("ledger_transactions", &columns, vec![header]);
    header.returning_col(Alias::new("id"));
    let tx = db
        .query_one(&header)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no transaction id"))?
        .try_get::<i64>("", "id")?;
    let columns = "transaction_id workspace_id system_account kind amount_nanos \
                   balance_after_nanos description created_at";
    let columns: Vec<&str> = columns.split_whitespace().collect();
    let revenue = Some("usage_revenue".to_owned());
    let entries: Vec<Vec<SimpleExpr>> = vec![
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
    ];
    db.execute(&insert("ledger_entries", &columns, entries))
        .await?;
    Ok((event_id, tx))
}

/// The cached balance and a balance event, as the old write moved them.
async fn old_balance_move(
    db: &DatabaseConnection,
    ws: Uuid,
    balance_after: i64,
    sequence: i64,
) -> anyhow::Result<()> {
    db.execute(
        Query::update()
            .table(Alias::new("workspaces"))
            .value(Alias::new("balance_nanos"), balance_after)
            .value(Alias::new("balance_sequence"), sequence)
            .and_where(Expr::col(Alias::new("id")).eq(ws)),
    )
    .await?;
    let columns = "workspace_id sequence balance_nanos reserved_nanos cause created_at";
    let columns: Vec<&str> = columns.split_whitespace().collect();
    let row: Vec<SimpleExpr> = vec![
        ws.into(),
        sequence.into(),
        balance_after.into(),
        0_i64.into(),
        "USAGE".into(),
        Utc::now().into(),
    ];
    db.execute(&insert("balance_events", &columns, vec![row]))
        .await?;
    Ok(())
}

#[tokio::test]
async fn usage_posted_before_batching_migrates_forward() -> anyhow::Result<()> {
    let t = TestDb::migrated(Some(BEFORE_USAGE_POSTING_PER_BATCH)).await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    let (cost_nanos, before) = (250_000_000, workspace(&t.db, f.ws_a).await?);
    let balance_after = before.balance_nanos - cost_nanos;
    let (event_id, tx) = old_usage(&t.db, f.ws_a, cost_nanos, balance_after).await?;
    old_balance_move(&t.db, f.ws_a, balance_after, before.balance_sequence + 1).await?;

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
