//! SeaORM entities: table shapes only. Money columns are `i64` nanocredits; the
//! `billing` crate owns every rule about them.

pub mod enums;
pub mod accounts;
pub mod users;
pub mod account_members;
pub mod workspaces;
pub mod workspace_members;
pub mod projects;
pub mod user_tokens;
pub mod api_keys;
pub mod models;
pub mod credit_packages;
pub mod payment_methods;
pub mod invoices;
pub mod invoice_lines;
pub mod purchases;
pub mod reservations;
pub mod usage_events;
pub mod usage_daily;
pub mod transfers;
pub mod ledger_transactions;
pub mod ledger_entries;
pub mod balance_events;
pub mod auto_reload_settings;
pub mod alert_thresholds;
pub mod alert_recipients;
pub mod notifications;
