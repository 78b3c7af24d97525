//! The domain crate: every rule about money lives here. Resolvers and job handlers
//! parse input, call one function of this crate and shape its result.
//!
//! Every operation that moves money is one database transaction that writes the
//! ledger entries (summing to zero), the cached balance, the daily rollup and a
//! balance event together, and is idempotent on its key.

pub mod access;
pub mod accounts;
pub mod alerts;
pub mod analytics;
pub mod auth;
pub mod auto_reload;
pub mod budget;
pub mod capture;
pub mod db;
pub mod error;
pub mod history;
pub mod ids;
pub mod invariants;
pub mod jobs;
pub mod ledger;
pub mod money;
pub mod notifications;
pub mod payments;
pub mod pricing;
pub mod purchases;
pub mod reservations;
pub mod seed;
pub mod settings;
pub mod transfers;
pub mod usage;
pub mod writer;

pub use entity;
pub use error::{BillingError, ErrorCode, Result};
pub use money::{Credits, DiscountBps};
pub use sea_orm;
