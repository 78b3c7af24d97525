#![doc = include_str!("../README.md")]

pub use sea_orm_migration::prelude::*;

mod m20261126_000001_initial;
mod m20261126_000002_seed_catalog;
mod m20261126_000003_transfer_indexes;
mod m20261126_000004_usage_daily_by;
mod m20261202_000005_stripe_cards;
mod m20261202_000010_webhooks;
mod m20261206_000011_notification_retries;
mod m20261206_000012_usage_posting_per_batch;
mod m20261206_000013_config_version;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261126_000001_initial::Migration),
            Box::new(m20261126_000002_seed_catalog::Migration),
            Box::new(m20261126_000003_transfer_indexes::Migration),
            Box::new(m20261126_000004_usage_daily_by::Migration),
            Box::new(m20261202_000005_stripe_cards::Migration),
            Box::new(m20261202_000010_webhooks::Migration),
            Box::new(m20261206_000011_notification_retries::Migration),
            Box::new(m20261206_000012_usage_posting_per_batch::Migration),
            Box::new(m20261206_000013_config_version::Migration),
        ]
    }
}
