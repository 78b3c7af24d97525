//! E-mail notifications retried with backoff: `notifications.next_attempt_at` (when a
//! PENDING notification may be attempted next; a new one is due at once), and the
//! state a notification ends in when its attempts run out is `DEAD` (was `FAILED`),
//! the name webhook deliveries use for the same thing. A DEAD notification keeps its
//! last error and can be retried on request.
//!
//! SQLite cannot alter a CHECK constraint, so `notifications` is rebuilt there (its own
//! DDL with the new status list, every row copied with FAILED renamed DEAD, its indexes
//! re-created), inside this migration's transaction; no table has a foreign key to it.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261206_000011_notification_retries"
    }
}

const OLD_STATUSES: &str = "'PENDING', 'SENT', 'FAILED'";
const NEW_STATUSES: &str = "'PENDING', 'SENT', 'DEAD'";
const DUE_INDEX: &str = "ix_notifications_due";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// The SQLite rebuild must be all or nothing.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("notifications")
                .add_column(timestamp_with_time_zone_null("next_attempt_at"))
                .to_owned(),
        )
        .await?;
        let c = m.get_connection();
        c.execute_unprepared(
            "UPDATE notifications SET next_attempt_at = created_at WHERE status = 'PENDING'",
        )
        .await?;
        match m.get_database_backend() {
            DbBackend::Sqlite => {
                rebuild_sqlite(m, OLD_STATUSES, NEW_STATUSES, ("FAILED", "DEAD")).await?;
            }
            _ => replace_status_check_pg(m, NEW_STATUSES, ("FAILED", "DEAD")).await?,
        }
        m.create_index(
            Index::create()
                .name(DUE_INDEX)
                .table("notifications")
                .col("status")
                .col("next_attempt_at")
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .name(DUE_INDEX)
                .table("notifications")
                .to_owned(),
        )
        .await?;
        match m.get_database_backend() {
            DbBackend::Sqlite => {
                rebuild_sqlite(m, NEW_STATUSES, OLD_STATUSES, ("DEAD", "FAILED")).await?;
            }
            _ => replace_status_check_pg(m, OLD_STATUSES, ("DEAD", "FAILED")).await?,
        }
        m.alter_table(
            Table::alter()
                .table("notifications")
                .drop_column("next_attempt_at")
                .to_owned(),
        )
        .await
    }
}

/// PostgreSQL: drop the status CHECK (found by its text), rename the status, add the
/// new CHECK under a name of ours.
async fn replace_status_check_pg(
    m: &SchemaManager<'_>,
    statuses: &str,
    (from, to): (&str, &str),
) -> Result<(), DbErr> {
    let c = m.get_connection();
    c.execute_unprepared(
        "DO $$ DECLARE c text; BEGIN \
           FOR c IN SELECT conname FROM pg_constraint \
             WHERE conrelid = 'notifications'::regclass AND contype = 'c' \
               AND pg_get_constraintdef(oid) LIKE '%status%PENDING%' \
           LOOP EXECUTE format('ALTER TABLE notifications DROP CONSTRAINT %I', c); END LOOP; \
         END $$",
    )
    .await?;
    c.execute_unprepared(&format!(
        "UPDATE notifications SET status = '{to}' WHERE status = '{from}'"
    ))
    .await?;
    c.execute_unprepared(&format!(
        "ALTER TABLE notifications ADD CONSTRAINT ck_notifications_status \
         CHECK (status IN ({statuses}))"
    ))
    .await?;
    Ok(())
}

/// The columns of `notifications`, in table order, after `next_attempt_at` was added.
const COLUMNS: &str = "id, kind, account_id, workspace_id, recipients, payload, dedupe_key, \
                       status, attempts, last_error, created_at, sent_at, next_attempt_at";

/// SQLite's documented way to change a constraint: a new table from the old DDL with
/// the one change, the rows copied (the status renamed on the way), the old table
/// dropped, the new one renamed, and the indexes re-created from their own DDL.
async fn rebuild_sqlite(
    m: &SchemaManager<'_>,
    from_list: &str,
    to_list: &str,
    (from, to): (&str, &str),
) -> Result<(), DbErr> {
    let c = m.get_connection();
    let backend = c.get_database_backend();
    let table_sql = c
        .query_one_raw(Statement::from_string(
            backend,
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'notifications'",
        ))
        .await?
        .ok_or_else(|| DbErr::Migration("no notifications table".into()))?
        .try_get::<String>("", "sql")?;
    if !table_sql.contains(from_list) {
        return Err(DbErr::Migration(format!(
            "notifications has no status CHECK of ({from_list})"
        )));
    }
    let index_sqls: Vec<String> = c
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'notifications' \
             AND sql IS NOT NULL",
        ))
        .await?
        .into_iter()
        .map(|row| row.try_get::<String>("", "sql"))
        .collect::<Result<_, _>>()?;
    let new_sql = table_sql
        .replacen("\"notifications\"", "\"notifications_rebuilt\"", 1)
        .replace(from_list, to_list);
    if !new_sql.contains("notifications_rebuilt") {
        return Err(DbErr::Migration(format!(
            "unexpected DDL of notifications: {table_sql}"
        )));
    }
    c.execute_unprepared(&new_sql).await?;
    let copied = COLUMNS.replace(
        "status,",
        &format!("CASE status WHEN '{from}' THEN '{to}' ELSE status END,"),
    );
    c.execute_unprepared(&format!(
        "INSERT INTO notifications_rebuilt ({COLUMNS}) SELECT {copied} FROM notifications"
    ))
    .await?;
    c.execute_unprepared("DROP TABLE notifications").await?;
    c.execute_unprepared("ALTER TABLE notifications_rebuilt RENAME TO notifications")
        .await?;
    for sql in index_sqls {
        c.execute_unprepared(&sql).await?;
    }
    Ok(())
}
