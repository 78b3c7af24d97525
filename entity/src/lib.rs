//! SeaORM entities: table shapes only. Money columns are `i64` nanocredits; the
//! `billing` crate owns every rule about them.

pub mod account_members;
pub mod accounts;
pub mod alert_recipients;
pub mod alert_thresholds;
pub mod api_keys;
pub mod auto_reload_settings;
pub mod balance_events;
pub mod credit_packages;
pub mod enums;
pub mod invoice_lines;
pub mod invoices;
pub mod ledger_entries;
pub mod ledger_transactions;
pub mod models;
pub mod notifications;
pub mod payment_methods;
pub mod projects;
pub mod purchases;
pub mod reservations;
pub mod transfers;
pub mod usage_daily;
pub mod usage_daily_by;
pub mod usage_events;
pub mod user_tokens;
pub mod users;
pub mod workspace_members;
pub mod workspaces;
