//! Real card payments (Stripe): one gateway Customer per account, each card's
//! fingerprint (the same card added twice is one card), purchases that end
//! REQUIRES_ACTION (3-D Secure needed while nobody is there), disputes recorded on the
//! purchase, and the gateway's webhook events, each recorded once.
//!
//! SQLite cannot alter a CHECK constraint, so the `purchases` table is rebuilt there
//! (its own DDL with the new status list, every row copied, its indexes re-created),
//! inside this migration's transaction; no table has a foreign key to `purchases`.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261202_000005_stripe_cards"
    }
}

const OLD_STATUSES: &str = "'PENDING', 'SUCCEEDED', 'FAILED'";
const NEW_STATUSES: &str = "'PENDING', 'SUCCEEDED', 'FAILED', 'REQUIRES_ACTION'";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// The SQLite rebuild must be all or nothing.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        match m.get_database_backend() {
            DbBackend::Sqlite => rebuild_purchases_sqlite(m, OLD_STATUSES, NEW_STATUSES).await?,
            _ => replace_status_check_pg(m, NEW_STATUSES).await?,
        }
        add_column(m, "accounts", string_null("gateway_customer_id")).await?;
        add_column(m, "payment_methods", string_null("fingerprint")).await?;
        add_column(m, "purchases", timestamp_with_time_zone_null("disputed_at")).await?;
        add_column(m, "purchases", string_null("dispute_reason")).await?;
        m.create_index(
            Index::create()
                .name("ix_payment_methods_fingerprint")
                .table("payment_methods")
                .col("account_id")
                .col("fingerprint")
                .to_owned(),
        )
        .await?;
        // Webhooks name a purchase by its gateway charge (the PaymentIntent id).
        m.create_index(
            Index::create()
                .name("ix_purchases_gateway_charge")
                .table("purchases")
                .col("gateway_charge_id")
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table("gateway_events")
                // The gateway's event id (`evt_…`): an event is acted on once.
                .col(string("id").primary_key())
                .col(string("kind"))
                .col(uuid_null("purchase_id"))
                .col(timestamp_with_time_zone("received_at"))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table("gateway_events").to_owned())
            .await?;
        m.drop_index(
            Index::drop()
                .name("ix_purchases_gateway_charge")
                .table("purchases")
                .to_owned(),
        )
        .await?;
        m.drop_index(
            Index::drop()
                .name("ix_payment_methods_fingerprint")
                .table("payment_methods")
                .to_owned(),
        )
        .await?;
        for (table, col) in [
            ("purchases", "dispute_reason"),
            ("purchases", "disputed_at"),
            ("payment_methods", "fingerprint"),
            ("accounts", "gateway_customer_id"),
        ] {
            m.alter_table(
                Table::alter()
                    .table(table)
                    .drop_column(Alias::new(col))
                    .to_owned(),
            )
            .await?;
        }
        match m.get_database_backend() {
            DbBackend::Sqlite => rebuild_purchases_sqlite(m, NEW_STATUSES, OLD_STATUSES).await,
            _ => replace_status_check_pg(m, OLD_STATUSES).await,
        }
    }
}

async fn add_column(m: &SchemaManager<'_>, table: &str, col: ColumnDef) -> Result<(), DbErr> {
    m.alter_table(
        Table::alter()
            .table(Alias::new(table))
            .add_column(col)
            .to_owned(),
    )
    .await
}

/// PostgreSQL named the inline CHECK itself: find it by its text, replace it.
async fn replace_status_check_pg(m: &SchemaManager<'_>, statuses: &str) -> Result<(), DbErr> {
    let c = m.get_connection();
    c.execute_unprepared(
        "DO $$ DECLARE c text; BEGIN \
           FOR c IN SELECT conname FROM pg_constraint \
             WHERE conrelid = 'purchases'::regclass AND contype = 'c' \
               AND pg_get_constraintdef(oid) LIKE '%status%PENDING%' \
           LOOP EXECUTE format('ALTER TABLE purchases DROP CONSTRAINT %I', c); END LOOP; \
         END $$",
    )
    .await?;
    c.execute_unprepared(&format!(
        "ALTER TABLE purchases ADD CONSTRAINT ck_purchases_status CHECK (status IN ({statuses}))"
    ))
    .await?;
    Ok(())
}

/// SQLite's documented way to change a constraint: a new table from the old DDL with
/// the one change, the rows copied, the old table dropped, the new one renamed, and
/// the indexes re-created from their own DDL.
async fn rebuild_purchases_sqlite(
    m: &SchemaManager<'_>,
    from: &str,
    to: &str,
) -> Result<(), DbErr> {
    let c = m.get_connection();
    let backend = c.get_database_backend();
    let table_sql = c
        .query_one_raw(Statement::from_string(
            backend,
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'purchases'",
        ))
        .await?
        .ok_or_else(|| DbErr::Migration("no purchases table".into()))?
        .try_get::<String>("", "sql")?;
    if !table_sql.contains(from) {
        return Err(DbErr::Migration(format!(
            "purchases has no status CHECK of ({from})"
        )));
    }
    let index_sqls: Vec<String> = c
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'purchases' \
             AND sql IS NOT NULL",
        ))
        .await?
        .into_iter()
        .map(|row| row.try_get::<String>("", "sql"))
        .collect::<Result<_, _>>()?;
    let new_sql = table_sql
        .replacen("\"purchases\"", "\"purchases_rebuilt\"", 1)
        .replace(from, to);
    if !new_sql.contains("purchases_rebuilt") {
        return Err(DbErr::Migration(format!(
            "unexpected DDL of purchases: {table_sql}"
        )));
    }
    c.execute_unprepared(&new_sql).await?;
    c.execute_unprepared("INSERT INTO purchases_rebuilt SELECT * FROM purchases")
        .await?;
    c.execute_unprepared("DROP TABLE purchases").await?;
    c.execute_unprepared("ALTER TABLE purchases_rebuilt RENAME TO purchases")
        .await?;
    for sql in index_sqls {
        c.execute_unprepared(&sql).await?;
    }
    Ok(())
}
