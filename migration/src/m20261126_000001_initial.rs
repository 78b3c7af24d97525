//! The whole data model, created at once so that later work adds behaviour, not
//! tables. Every money column is a BIGINT count of nanocredits (`*_nanos`); every
//! invariant the domain crate asserts is also a CHECK or UNIQUE constraint here,
//! so a bug in code is stopped by the database as well.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261126_000001_initial"
    }
}

fn fk(
    from_table: &'static str,
    from_col: &'static str,
    to_table: &'static str,
) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .name(format!("fk_{from_table}_{from_col}"))
        .from(from_table, from_col)
        .to(to_table, "id")
        .on_delete(ForeignKeyAction::Restrict)
        .to_owned()
}

fn created_at() -> ColumnDef {
    timestamp_with_time_zone("created_at")
}

fn unique_index(
    table: &'static str,
    name: &'static str,
    cols: &[&'static str],
) -> IndexCreateStatement {
    let mut index = Index::create();
    index.name(name).table(table).unique();
    for col in cols {
        index.col(*col);
    }
    index.to_owned()
}

fn plain_index(
    table: &'static str,
    name: &'static str,
    cols: &[&'static str],
) -> IndexCreateStatement {
    let mut index = Index::create();
    index.name(name).table(table);
    for col in cols {
        index.col(*col);
    }
    index.to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    #[expect(
        clippy::too_many_lines,
        reason = "the initial schema is one migration, table by table; splitting it buys nothing"
    )]
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // --- accounts, people, roles -------------------------------------------------
        m.create_table(
            Table::create()
                .table("accounts")
                .col(uuid("id").primary_key())
                .col(string("name"))
                .col(boolean("verified").default(false))
                // Volume discount in basis points (1250 = 12.5 %).
                .col(integer("volume_discount_bps").default(0))
                .col(integer("payment_terms_days").default(30))
                // Last invoice number issued for this account (numbers are sequential per account).
                .col(big_integer("invoice_sequence").default(0))
                .col(created_at())
                .check(Expr::cust("volume_discount_bps BETWEEN 0 AND 10000"))
                .check(Expr::cust("payment_terms_days BETWEEN 0 AND 365"))
                .check(Expr::cust("invoice_sequence >= 0"))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table("users")
                .col(uuid("id").primary_key())
                .col(string_uniq("email"))
                .col(string("name"))
                .col(created_at())
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table("account_members")
                .col(uuid("account_id"))
                .col(uuid("user_id"))
                .col(string("role"))
                .col(created_at())
                .primary_key(Index::create().col("account_id").col("user_id"))
                .foreign_key(&mut fk("account_members", "account_id", "accounts"))
                .foreign_key(&mut fk("account_members", "user_id", "users"))
                .check(Expr::cust("role IN ('OWNER', 'ADMIN', 'MEMBER')"))
                .to_owned(),
        )
        .await?;
        m.create_index(plain_index(
            "account_members",
            "ix_account_members_user",
            &["user_id"],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table("workspaces")
                .col(uuid("id").primary_key())
                .col(uuid("account_id"))
                .col(string("name"))
                // Cached sum of this workspace's ledger entries; `reserved_nanos` is the sum of
                // its HELD reservations. Both are updated in the same transaction as the rows
                // they summarise, and `reservoir check` proves it.
                .col(big_integer("balance_nanos").default(0))
                .col(big_integer("reserved_nanos").default(0))
                // Sequence of the last balance event (strictly increasing per workspace).
                .col(big_integer("balance_sequence").default(0))
                .col(created_at())
                .foreign_key(&mut fk("workspaces", "account_id", "accounts"))
                // available = balance - reserved never goes below zero, so neither does balance.
                .check(Expr::cust(
                    "reserved_nanos >= 0 AND balance_nanos >= reserved_nanos",
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(unique_index(
            "workspaces",
            "ux_workspaces_account_name",
            &["account_id", "name"],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table("workspace_members")
                .col(uuid("workspace_id"))
                .col(uuid("user_id"))
                .col(string("role"))
                .col(created_at())
                .primary_key(Index::create().col("workspace_id").col("user_id"))
                .foreign_key(&mut fk("workspace_members", "workspace_id", "workspaces"))
                .foreign_key(&mut fk("workspace_members", "user_id", "users"))
                .check(Expr::cust("role IN ('ADMIN', 'MEMBER', 'VIEWER')"))
                .to_owned(),
        )
        .await?;
        m.create_index(plain_index(
            "workspace_members",
            "ix_workspace_members_user",
            &["user_id"],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table("projects")
                .col(uuid("id").primary_key())
                .col(uuid("workspace_id"))
                .col(string("name"))
                .col(string("tag"))
                // Null: no spending cap.
                .col(big_integer_null("budget_limit_nanos"))
                .col(string("budget_period").default("MONTHLY"))
                .col(timestamp_with_time_zone("budget_period_start"))
                // Spent in the current period, and held by open reservations of this project.
                .col(big_integer("budget_spent_nanos").default(0))
                .col(big_integer("budget_reserved_nanos").default(0))
                .col(created_at())
                .foreign_key(&mut fk("projects", "workspace_id", "workspaces"))
                .check(Expr::cust(
                    "budget_period IN ('DAILY', 'WEEKLY', 'MONTHLY', 'LIFETIME')",
                ))
                .check(Expr::cust(
                    "budget_spent_nanos >= 0 AND budget_reserved_nanos >= 0 \
                     AND (budget_limit_nanos IS NULL OR budget_limit_nanos >= 0)",
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(unique_index(
            "projects",
            "ux_projects_workspace_tag",
            &["workspace_id", "tag"],
        ))
        .await?;

        // --- credentials -------------------------------------------------------------
        m.create_table(
            Table::create()
                .table("user_tokens")
                .col(uuid("id").primary_key())
                .col(uuid("user_id"))
                .col(string("name"))
                // SHA-256 of the token, hex; the token itself is shown once and never stored.
                .col(string_uniq("token_hash"))
                .col(created_at())
                .col(timestamp_with_time_zone_null("last_used_at"))
                .col(timestamp_with_time_zone_null("revoked_at"))
                .foreign_key(&mut fk("user_tokens", "user_id", "users"))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table("api_keys")
                .col(uuid("id").primary_key())
                .col(uuid("workspace_id"))
                .col(uuid_null("project_id"))
                .col(string("name"))
                .col(string("prefix"))
                .col(string_uniq("secret_hash"))
                .col(created_at())
                .col(timestamp_with_time_zone_null("last_used_at"))
                .col(timestamp_with_time_zone_null("revoked_at"))
                .foreign_key(&mut fk("api_keys", "workspace_id", "workspaces"))
                .foreign_key(&mut fk("api_keys", "project_id", "projects"))
                .to_owned(),
        )
        .await?;
        m.create_index(plain_index(
            "api_keys",
            "ix_api_keys_workspace",
            &["workspace_id"],
        ))
        .await?;

        // --- catalog -----------------------------------------------------------------
        m.create_table(
            Table::create()
                .table("models")
                .col(string("id").primary_key())
                .col(string("name"))
                .col(big_integer("prompt_price_per_million_nanos"))
                .col(big_integer("completion_price_per_million_nanos"))
                .col(boolean("active").default(true))
                .col(created_at())
                .col(timestamp_with_time_zone("updated_at"))
                .check(Expr::cust(
                    "prompt_price_per_million_nanos >= 0 AND completion_price_per_million_nanos >= 0",
                ))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table("credit_packages")
                .col(string("id").primary_key())
                .col(big_integer("amount_nanos"))
                .col(big_integer("price_nanos"))
                .col(big_integer("bonus_nanos").default(0))
                .col(boolean("active").default(true))
                .col(integer("position"))
                .check(Expr::cust(
                    "amount_nanos > 0 AND price_nanos > 0 AND bonus_nanos >= 0",
                ))
                // Card charges are whole cents.
                .check(Expr::cust("price_nanos % 10000000 = 0"))
                .to_owned(),
        )
        .await?;

        // --- payments ----------------------------------------------------------------
        m.create_table(
            Table::create()
                .table("payment_methods")
                .col(uuid("id").primary_key())
                .col(uuid("account_id"))
                // The gateway's reference to the stored card; card numbers never reach us.
                .col(string("gateway_token"))
                .col(string("brand"))
                .col(string_len("last4", 4))
                .col(integer("exp_month"))
                .col(integer("exp_year"))
                .col(boolean("is_default").default(false))
                .col(created_at())
                .col(timestamp_with_time_zone_null("removed_at"))
                .foreign_key(&mut fk("payment_methods", "account_id", "accounts"))
                .check(Expr::cust(
                    "brand IN ('VISA', 'MASTERCARD', 'AMEX', 'DISCOVER', 'OTHER')",
                ))
                .check(Expr::cust("exp_month BETWEEN 1 AND 12"))
                .to_owned(),
        )
        .await?;
        m.create_index(plain_index(
            "payment_methods",
            "ix_payment_methods_account",
            &["account_id"],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table("invoices")
                .col(uuid("id").primary_key())
                .col(uuid("account_id"))
                .col(big_integer("sequence"))
                .col(string("number"))
                .col(uuid_null("purchase_id"))
                .col(big_integer("total_nanos"))
                .col(string("status"))
                .col(timestamp_with_time_zone("issued_at"))
                .col(timestamp_with_time_zone_null("due_at"))
                .col(timestamp_with_time_zone_null("paid_at"))
                .foreign_key(&mut fk("invoices", "account_id", "accounts"))
                .check(Expr::cust("status IN ('OPEN', 'PAID', 'VOID')"))
                .check(Expr::cust("total_nanos >= 0 AND sequence > 0"))
                .to_owned(),
        )
        .await?;
        m.create_index(unique_index(
            "invoices",
            "ux_invoices_account_sequence",
            &["account_id", "sequence"],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table("invoice_lines")
                .col(uuid("id").primary_key())
                .col(uuid("invoice_id"))
                .col(integer("position"))
                .col(string("description"))
                .col(big_integer("amount_nanos"))
                .foreign_key(&mut fk("invoice_lines", "invoice_id", "invoices"))
                .to_owned(),
        )
        .await?;
        m.create_index(unique_index(
            "invoice_lines",
            "ux_invoice_lines_position",
            &["invoice_id", "position"],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table("purchases")
                .col(uuid("id").primary_key())
                .col(uuid("workspace_id"))
                .col(string_null("package_id"))
                .col(big_integer("amount_nanos"))
                .col(big_integer("bonus_nanos").default(0))
                .col(big_integer("price_nanos"))
                .col(string("status"))
                .col(string("source"))
                .col(uuid_null("payment_method_id"))
                .col(string("idempotency_key"))
                // SHA-256 of the request's payload: the same key with another payload is a conflict.
                .col(string("request_hash"))
                .col(string_null("failure_reason"))
                .col(string_null("gateway_charge_id"))
                .col(integer("attempts").default(0))
                .col(uuid_null("invoice_id"))
                .col(uuid_null("created_by_user_id"))
                .col(created_at())
                .col(timestamp_with_time_zone_null("completed_at"))
                .foreign_key(&mut fk("purchases", "workspace_id", "workspaces"))
                .foreign_key(&mut fk("purchases", "package_id", "credit_packages"))
                .foreign_key(&mut fk("purchases", "payment_method_id", "payment_methods"))
                .foreign_key(&mut fk("purchases", "invoice_id", "invoices"))
                .check(Expr::cust("status IN ('PENDING', 'SUCCEEDED', 'FAILED')"))
                .check(Expr::cust("source IN ('MANUAL', 'AUTO_RELOAD', 'INVOICE')"))
                .check(Expr::cust(
                    "amount_nanos > 0 AND bonus_nanos >= 0 AND price_nanos > 0",
                ))
                .check(Expr::cust("price_nanos % 10000000 = 0"))
                .to_owned(),
        )
        .await?;
        m.create_index(unique_index(
            "purchases",
            "ux_purchases_idempotency",
            &["workspace_id", "idempotency_key"],
        ))
        .await?;
        m.create_index(plain_index(
            "purchases",
            "ix_purchases_status",
            &["status", "created_at"],
        ))
        .await?;

        // --- usage, reservations, transfers ------------------------------------------
        m.create_table(
            Table::create()
                .table("reservations")
                .col(uuid("id").primary_key())
                .col(uuid("workspace_id"))
                .col(uuid_null("project_id"))
                .col(uuid_null("user_id"))
                .col(uuid_null("api_key_id"))
                .col(string("model_id"))
                .col(string("request_id"))
                .col(string("request_hash"))
                .col(big_integer("amount_nanos"))
                .col(string("status"))
                .col(timestamp_with_time_zone("expires_at"))
                .col(uuid_null("usage_event_id"))
                .col(created_at())
                .col(timestamp_with_time_zone_null("resolved_at"))
                .foreign_key(&mut fk("reservations", "workspace_id", "workspaces"))
                .foreign_key(&mut fk("reservations", "project_id", "projects"))
                .foreign_key(&mut fk("reservations", "model_id", "models"))
                .check(Expr::cust(
                    "status IN ('HELD', 'SETTLED', 'RELEASED', 'EXPIRED')",
                ))
                .check(Expr::cust("amount_nanos >= 0"))
                .to_owned(),
        )
        .await?;
        m.create_index(unique_index(
            "reservations",
            "ux_reservations_request",
            &["workspace_id", "request_id"],
        ))
        .await?;
        m.create_index(plain_index(
            "reservations",
            "ix_reservations_status_expiry",
            &["status", "expires_at"],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table("usage_events")
                .col(uuid("id").primary_key())
                .col(uuid("workspace_id"))
                .col(uuid_null("project_id"))
                .col(uuid_null("user_id"))
                .col(uuid_null("api_key_id"))
                .col(string("model_id"))
                .col(big_integer("prompt_tokens"))
                .col(big_integer("completion_tokens"))
                // The priced cost; `shortfall_nanos` is the part a settlement could not collect.
                .col(big_integer("cost_nanos"))
                .col(big_integer("shortfall_nanos").default(0))
                .col(string("request_id"))
                .col(string("request_hash"))
                .col(uuid_null("reservation_id"))
                .col(created_at())
                .foreign_key(&mut fk("usage_events", "workspace_id", "workspaces"))
                .foreign_key(&mut fk("usage_events", "project_id", "projects"))
                .foreign_key(&mut fk("usage_events", "model_id", "models"))
                .check(Expr::cust(
                    "prompt_tokens >= 0 AND completion_tokens >= 0 AND cost_nanos >= 0 \
                     AND shortfall_nanos BETWEEN 0 AND cost_nanos",
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(unique_index(
            "usage_events",
            "ux_usage_events_request",
            &["workspace_id", "request_id"],
        ))
        .await?;
        m.create_index(plain_index(
            "usage_events",
            "ix_usage_events_created",
            &["workspace_id", "created_at"],
        ))
        .await?;

        // Daily rollups. The dimension columns use the nil UUID for "none" instead of NULL,
        // because NULLs are distinct in a unique index on both backends and the upsert needs
        // one row per (workspace, day, project, user, api key, model).
        m.create_table(
            Table::create()
                .table("usage_daily")
                .col(big_integer("id").auto_increment().primary_key())
                .col(uuid("workspace_id"))
                .col(date("day"))
                .col(uuid("project_id"))
                .col(uuid("user_id"))
                .col(uuid("api_key_id"))
                .col(string("model_id"))
                .col(big_integer("requests").default(0))
                .col(big_integer("prompt_tokens").default(0))
                .col(big_integer("completion_tokens").default(0))
                .col(big_integer("cost_nanos").default(0))
                .foreign_key(&mut fk("usage_daily", "workspace_id", "workspaces"))
                .check(Expr::cust("requests >= 0 AND prompt_tokens >= 0 AND completion_tokens >= 0 AND cost_nanos >= 0"))
                .to_owned(),
        )
        .await?;
        m.create_index(unique_index(
            "usage_daily",
            "ux_usage_daily_dims",
            &[
                "workspace_id",
                "day",
                "project_id",
                "user_id",
                "api_key_id",
                "model_id",
            ],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table("transfers")
                .col(uuid("id").primary_key())
                .col(uuid("account_id"))
                .col(uuid("from_workspace_id"))
                .col(uuid("to_workspace_id"))
                .col(big_integer("amount_nanos"))
                .col(string_null("memo"))
                .col(uuid_null("created_by_user_id"))
                .col(string("idempotency_key"))
                .col(string("request_hash"))
                .col(created_at())
                .foreign_key(&mut fk("transfers", "account_id", "accounts"))
                .foreign_key(&mut fk("transfers", "from_workspace_id", "workspaces"))
                .foreign_key(&mut fk("transfers", "to_workspace_id", "workspaces"))
                .check(Expr::cust(
                    "amount_nanos > 0 AND from_workspace_id <> to_workspace_id",
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(unique_index(
            "transfers",
            "ux_transfers_idempotency",
            &["account_id", "idempotency_key"],
        ))
        .await?;

        // --- the ledger --------------------------------------------------------------
        m.create_table(
            Table::create()
                .table("ledger_transactions")
                .col(big_integer("id").auto_increment().primary_key())
                .col(string("kind"))
                // One posting per business operation, enforced by the database:
                // "usage:<id>", "purchase:<id>", "transfer:<id>", ...
                .col(string_uniq("idempotency_key"))
                .col(uuid_null("usage_event_id"))
                .col(uuid_null("purchase_id"))
                .col(uuid_null("transfer_id"))
                .col(created_at())
                .check(Expr::cust(
                    "kind IN ('USAGE', 'PURCHASE', 'TRANSFER', 'ADJUSTMENT')",
                ))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table("ledger_entries")
                .col(big_integer("id").auto_increment().primary_key())
                .col(big_integer("transaction_id"))
                // Exactly one of: a workspace's pool, or a system account by name.
                .col(uuid_null("workspace_id"))
                .col(string_null("system_account"))
                .col(string("kind"))
                .col(big_integer("amount_nanos"))
                // The workspace's balance right after this entry (null for system accounts).
                .col(big_integer_null("balance_after_nanos"))
                .col(string("description"))
                .col(created_at())
                .foreign_key(&mut fk("ledger_entries", "transaction_id", "ledger_transactions"))
                .foreign_key(&mut fk("ledger_entries", "workspace_id", "workspaces"))
                .check(Expr::cust(
                    "(workspace_id IS NULL AND system_account IS NOT NULL AND balance_after_nanos IS NULL) \
                     OR (workspace_id IS NOT NULL AND system_account IS NULL \
                         AND balance_after_nanos IS NOT NULL AND balance_after_nanos >= 0)",
                ))
                .check(Expr::cust(
                    "kind IN ('PURCHASE', 'BONUS', 'USAGE', 'TRANSFER_IN', 'TRANSFER_OUT', 'ADJUSTMENT')",
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(plain_index(
            "ledger_entries",
            "ix_ledger_entries_workspace",
            &["workspace_id", "id"],
        ))
        .await?;
        m.create_index(plain_index(
            "ledger_entries",
            "ix_ledger_entries_transaction",
            &["transaction_id"],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table("balance_events")
                .col(big_integer("id").auto_increment().primary_key())
                .col(uuid("workspace_id"))
                .col(big_integer("sequence"))
                .col(big_integer("balance_nanos"))
                .col(big_integer("reserved_nanos"))
                .col(string("cause"))
                .col(created_at())
                .foreign_key(&mut fk("balance_events", "workspace_id", "workspaces"))
                .check(Expr::cust(
                    "cause IN ('PURCHASE', 'BONUS', 'USAGE', 'TRANSFER_IN', 'TRANSFER_OUT', \
                     'ADJUSTMENT', 'RESERVATION', 'RELEASE') AND sequence > 0 \
                     AND reserved_nanos >= 0 AND balance_nanos >= reserved_nanos",
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(unique_index(
            "balance_events",
            "ux_balance_events_sequence",
            &["workspace_id", "sequence"],
        ))
        .await?;

        // --- auto-reload, alerts, notifications --------------------------------------
        m.create_table(
            Table::create()
                .table("auto_reload_settings")
                .col(uuid("workspace_id").primary_key())
                .col(boolean("enabled").default(false))
                .col(big_integer("threshold_nanos"))
                .col(big_integer("amount_nanos"))
                .col(uuid_null("payment_method_id"))
                .col(integer("max_reloads_per_day").default(3))
                .col(string("status").default("IDLE"))
                .col(integer("consecutive_failures").default(0))
                .col(timestamp_with_time_zone_null("last_reload_at"))
                .col(string_null("last_failure_reason"))
                // Backoff after a failure: no new reload before this.
                .col(timestamp_with_time_zone_null("next_attempt_at"))
                .col(timestamp_with_time_zone("updated_at"))
                .foreign_key(&mut fk(
                    "auto_reload_settings",
                    "workspace_id",
                    "workspaces",
                ))
                .foreign_key(&mut fk(
                    "auto_reload_settings",
                    "payment_method_id",
                    "payment_methods",
                ))
                .check(Expr::cust(
                    "status IN ('IDLE', 'RELOADING', 'DISABLED_AFTER_FAILURES')",
                ))
                .check(Expr::cust(
                    "threshold_nanos >= 0 AND amount_nanos > 0 AND max_reloads_per_day >= 1",
                ))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table("alert_thresholds")
                .col(uuid("id").primary_key())
                .col(uuid("workspace_id"))
                .col(big_integer("amount_nanos"))
                .col(string("severity"))
                .col(boolean("armed").default(true))
                .col(timestamp_with_time_zone_null("last_triggered_at"))
                .col(created_at())
                .foreign_key(&mut fk("alert_thresholds", "workspace_id", "workspaces"))
                .check(Expr::cust(
                    "severity IN ('WARNING', 'URGENT') AND amount_nanos > 0",
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(unique_index(
            "alert_thresholds",
            "ux_alert_thresholds_amount",
            &["workspace_id", "amount_nanos"],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table("alert_recipients")
                .col(uuid("alert_threshold_id"))
                .col(uuid("user_id"))
                .primary_key(Index::create().col("alert_threshold_id").col("user_id"))
                .foreign_key(&mut fk(
                    "alert_recipients",
                    "alert_threshold_id",
                    "alert_thresholds",
                ))
                .foreign_key(&mut fk("alert_recipients", "user_id", "users"))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table("notifications")
                .col(uuid("id").primary_key())
                .col(string("kind"))
                .col(uuid_null("account_id"))
                .col(uuid_null("workspace_id"))
                // Comma-separated addresses, fixed when the notification is written.
                .col(text("recipients"))
                // What the template needs, as JSON (ids and amounts as strings).
                .col(text("payload"))
                // Dedupe: the business event that caused it, e.g. "receipt:<purchase id>".
                .col(string_uniq("dedupe_key"))
                .col(string("status").default("PENDING"))
                .col(integer("attempts").default(0))
                .col(string_null("last_error"))
                .col(created_at())
                .col(timestamp_with_time_zone_null("sent_at"))
                .check(Expr::cust("status IN ('PENDING', 'SENT', 'FAILED')"))
                .to_owned(),
        )
        .await?;
        m.create_index(plain_index(
            "notifications",
            "ix_notifications_status",
            &["status", "created_at"],
        ))
        .await?;

        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            "notifications",
            "alert_recipients",
            "alert_thresholds",
            "auto_reload_settings",
            "balance_events",
            "ledger_entries",
            "ledger_transactions",
            "transfers",
            "usage_daily",
            "usage_events",
            "reservations",
            "purchases",
            "invoice_lines",
            "invoices",
            "payment_methods",
            "credit_packages",
            "models",
            "api_keys",
            "user_tokens",
            "projects",
            "workspace_members",
            "workspaces",
            "account_members",
            "users",
            "accounts",
        ] {
            m.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        Ok(())
    }
}
