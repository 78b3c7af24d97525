#![doc = include_str!("../README.md")]

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
pub mod retry;
pub mod seed;
pub mod transfers;
pub mod webhooks;

pub use entity;
pub use error::{BillingError, ErrorCode, Result};
pub use money::{Credits, DiscountBps};
pub use sea_orm;
