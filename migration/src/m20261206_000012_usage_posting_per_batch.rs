//! Usage posted once per (debit batch, workspace): `usage_events.ledger_transaction_id`
//! names the USAGE ledger transaction that posted the event. A transaction of a batch
//! with one event of the workspace is what every usage transaction was before (key
//! `usage:<event>`, `usage_event_id` set); a batch with several posts them together
//! (key `usage-batch:<first event>`, no `usage_event_id`), its entries carrying the
//! sums (docs/LEDGER.md §3).
//!
//! Existing data migrates forward: every event gets the id of the transaction that
//! names it in `usage_event_id` (one statement, a join, not a lookup per row). The
//! column stays nullable because neither backend can add a NOT NULL column without a
//! default to a filled table; `reservoir check` (rule 7) reports an event without it.
//! The foreign key is declared with the column (SQLite allows that for a NULL default).

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261206_000012_usage_posting_per_batch"
    }
}

const INDEX: &str = "ix_usage_events_ledger_transaction";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// The column and its backfill land together or not at all.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let c = m.get_connection();
        c.execute_unprepared(
            "ALTER TABLE usage_events ADD COLUMN ledger_transaction_id BIGINT \
             REFERENCES ledger_transactions (id) ON DELETE RESTRICT",
        )
        .await?;
        c.execute_unprepared(
            "UPDATE usage_events SET ledger_transaction_id = t.id \
             FROM ledger_transactions AS t WHERE t.usage_event_id = usage_events.id",
        )
        .await?;
        // The events a batch posted, for `LedgerEntry.usageEvents` and rule 7.
        m.create_index(
            Index::create()
                .name(INDEX)
                .table("usage_events")
                .col("ledger_transaction_id")
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(Index::drop().name(INDEX).table("usage_events").to_owned())
            .await?;
        m.get_connection()
            .execute_unprepared("ALTER TABLE usage_events DROP COLUMN ledger_transaction_id")
            .await?;
        Ok(())
    }
}
