//! `config_version`: one row whose `version` moves, in the same transaction, with every
//! change to what a debit batch reads but rarely changes (model prices, account
//! discounts, memberships, auto-reload settings, alert thresholds) and to the
//! credentials the API caches (a revoked API key or user token). Each process's debit writer
//! caches those rows under the version it read them at, and a batch that reads another
//! version drops the cache (`billing::debits::engine::cache`): a price change applies to
//! the next batch in every process.
//!
//! The version is moved by triggers, not by the code that changes those tables, so no
//! path (an admin mutation, the worker re-arming an alert, a hand-written UPDATE in an
//! incident) can change a price and forget to tell the caches. Row-level triggers fire
//! only for rows that changed: a conditional UPDATE that matched nothing (an alert
//! already disarmed) moves nothing.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261206_000013_config_version"
    }
}

/// The tables whose every change moves the version, and on accounts the one column
/// a batch reads (its name or billing details changing must not empty every cache).
const WATCHED: [(&str, &str); 7] = [
    ("models", "INSERT OR UPDATE OR DELETE"),
    ("accounts", "UPDATE OF volume_discount_bps"),
    ("api_keys", "UPDATE OF revoked_at"),
    ("user_tokens", "UPDATE OF revoked_at"),
    ("account_members", "INSERT OR UPDATE OR DELETE"),
    ("auto_reload_settings", "INSERT OR UPDATE OR DELETE"),
    ("alert_thresholds", "INSERT OR UPDATE OR DELETE"),
];

const BUMP: &str = "UPDATE config_version SET version = version + 1 WHERE id = 1";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let c = m.get_connection();
        c.execute_unprepared(
            "CREATE TABLE config_version (\
               id SMALLINT PRIMARY KEY CHECK (id = 1), \
               version BIGINT NOT NULL CHECK (version >= 0))",
        )
        .await?;
        c.execute_unprepared("INSERT INTO config_version (id, version) VALUES (1, 0)")
            .await?;
        for statement in triggers(m.get_database_backend()) {
            c.execute_unprepared(&statement).await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let c = m.get_connection();
        let pg = m.get_database_backend() == DbBackend::Postgres;
        for (table, events) in WATCHED {
            for (suffix, _) in sqlite_events(events) {
                let name = trigger_name(table, if pg { "" } else { suffix });
                let on = if pg {
                    format!(" ON {table}")
                } else {
                    String::new()
                };
                c.execute_unprepared(&format!("DROP TRIGGER IF EXISTS {name}{on}"))
                    .await?;
                if pg {
                    break;
                }
            }
        }
        if pg {
            c.execute_unprepared("DROP FUNCTION IF EXISTS bump_config_version()")
                .await?;
        }
        c.execute_unprepared("DROP TABLE config_version").await?;
        Ok(())
    }
}

fn trigger_name(table: &str, suffix: &str) -> String {
    format!("{table}_bump_config_version{suffix}")
}

/// SQLite has one event per trigger: (name suffix, event) for each of `events`.
fn sqlite_events(events: &str) -> Vec<(&'static str, String)> {
    if let Some(column) = events.strip_prefix("UPDATE OF ") {
        return vec![("_update", format!("UPDATE OF {column}"))];
    }
    vec![
        ("_insert", "INSERT".to_owned()),
        ("_update", "UPDATE".to_owned()),
        ("_delete", "DELETE".to_owned()),
    ]
}

fn triggers(backend: DbBackend) -> Vec<String> {
    let mut out = Vec::new();
    if backend == DbBackend::Postgres {
        out.push(format!(
            "CREATE FUNCTION bump_config_version() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN {BUMP}; RETURN NULL; END $$"
        ));
        for (table, events) in WATCHED {
            out.push(format!(
                "CREATE TRIGGER {} AFTER {events} ON {table} FOR EACH ROW \
                 EXECUTE FUNCTION bump_config_version()",
                trigger_name(table, "")
            ));
        }
        return out;
    }
    for (table, events) in WATCHED {
        for (suffix, event) in sqlite_events(events) {
            out.push(format!(
                "CREATE TRIGGER {} AFTER {event} ON {table} FOR EACH ROW BEGIN {BUMP}; END",
                trigger_name(table, suffix)
            ));
        }
    }
    out
}
