//! The domain crate: every rule about money lives here. Resolvers and job handlers
//! parse input, call one function of this crate and shape its result.
//!
//! Every operation that moves money is one database transaction that writes the
//! ledger entries (summing to zero), the cached balance, the daily rollup and a
//! balance event together, and is idempotent on its key.

pub mod accounts;
mod batch;
pub mod catalog;
pub mod db;
pub mod debits;
pub mod error;
pub mod ids;
pub mod jobs;
pub mod ledger;
pub mod money;
pub mod payments;
pub mod policies;
pub mod pricing;
pub mod reports;
pub mod seed;
pub mod transfers;

pub use entity;
pub use error::{BillingError, ErrorCode, Result};
pub use money::{Credits, DiscountBps};
pub use sea_orm;
