//! Outbound webhooks: the endpoints an account registers, the events written in the
//! business transactions that cause them (the outbox), and one delivery per (event,
//! endpoint subscribed when the event was written), which the worker POSTs.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261202_000010_webhooks"
    }
}

fn fk(
    from_table: &'static str,
    from_col: &'static str,
    to_table: &'static str,
    on_delete: ForeignKeyAction,
) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .name(format!("fk_{from_table}_{from_col}"))
        .from(from_table, from_col)
        .to(to_table, "id")
        .on_delete(on_delete)
        .to_owned()
}

fn index(table: &'static str, name: &'static str, cols: &[&'static str]) -> IndexCreateStatement {
    let mut index = Index::create();
    index.name(name).table(table);
    for col in cols {
        index.col(*col);
    }
    index.to_owned()
}

async fn create_endpoints(m: &SchemaManager<'_>) -> Result<(), DbErr> {
    m.create_table(
        Table::create()
            .table("webhook_endpoints")
            .col(uuid("id").primary_key())
            .col(uuid("account_id"))
            .col(text("url"))
            // Comma-separated event types the endpoint is subscribed to.
            .col(text("events"))
            // Kept to sign every delivery; never returned after it was shown once.
            .col(string("secret"))
            .col(boolean("enabled").default(true))
            .col(timestamp_with_time_zone("created_at"))
            .col(timestamp_with_time_zone("updated_at"))
            .foreign_key(&mut fk(
                "webhook_endpoints",
                "account_id",
                "accounts",
                ForeignKeyAction::Restrict,
            ))
            .to_owned(),
    )
    .await?;
    m.create_index(index(
        "webhook_endpoints",
        "ix_webhook_endpoints_account",
        &["account_id", "created_at"],
    ))
    .await?;

    Ok(())
}

async fn create_events(m: &SchemaManager<'_>) -> Result<(), DbErr> {
    m.create_table(
        Table::create()
            .table("webhook_events")
            .col(uuid("id").primary_key())
            .col(string("event_type"))
            .col(uuid("account_id"))
            .col(uuid_null("workspace_id"))
            // The event's `data`, as JSON.
            .col(text("data"))
            // The business event that caused it: a replayed call writes no second event.
            .col(string_uniq("dedupe_key"))
            .col(timestamp_with_time_zone("created_at"))
            .to_owned(),
    )
    .await?;

    Ok(())
}

async fn create_deliveries(m: &SchemaManager<'_>) -> Result<(), DbErr> {
    m.create_table(
        Table::create()
            .table("webhook_deliveries")
            .col(uuid("id").primary_key())
            .col(uuid("event_id"))
            .col(uuid("endpoint_id"))
            .col(string("status").default("PENDING"))
            .col(integer("attempts").default(0))
            .col(integer_null("last_response_code"))
            .col(string_null("last_error"))
            // When the next attempt is due (PENDING only).
            .col(timestamp_with_time_zone_null("next_attempt_at"))
            // A claim in progress: no other worker attempts it before this.
            .col(timestamp_with_time_zone_null("locked_until"))
            .col(timestamp_with_time_zone("created_at"))
            .col(timestamp_with_time_zone_null("delivered_at"))
            .foreign_key(&mut fk(
                "webhook_deliveries",
                "event_id",
                "webhook_events",
                ForeignKeyAction::Cascade,
            ))
            .foreign_key(&mut fk(
                "webhook_deliveries",
                "endpoint_id",
                "webhook_endpoints",
                ForeignKeyAction::Cascade,
            ))
            .check(Expr::cust("status IN ('PENDING', 'DELIVERED', 'DEAD')"))
            .to_owned(),
    )
    .await?;
    m.create_index(
        index(
            "webhook_deliveries",
            "ux_webhook_deliveries_event_endpoint",
            &["event_id", "endpoint_id"],
        )
        .unique()
        .to_owned(),
    )
    .await?;
    m.create_index(index(
        "webhook_deliveries",
        "ix_webhook_deliveries_due",
        &["status", "next_attempt_at"],
    ))
    .await?;
    m.create_index(index(
        "webhook_deliveries",
        "ix_webhook_deliveries_endpoint",
        &["endpoint_id", "id"],
    ))
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        create_endpoints(m).await?;
        create_events(m).await?;
        create_deliveries(m).await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for table in ["webhook_deliveries", "webhook_events", "webhook_endpoints"] {
            m.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        Ok(())
    }
}
