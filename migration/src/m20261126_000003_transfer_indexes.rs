//! Indexes for a workspace's transfer history (both directions), which
//! `billing::history::transfers_page` filters on.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261126_000003_transfer_indexes"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for (name, col) in [
            ("ix_transfers_from_workspace", "from_workspace_id"),
            ("ix_transfers_to_workspace", "to_workspace_id"),
        ] {
            m.create_index(
                Index::create()
                    .name(name)
                    .table("transfers")
                    .col(col)
                    .col("id")
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for name in ["ix_transfers_from_workspace", "ix_transfers_to_workspace"] {
            m.drop_index(Index::drop().name(name).table("transfers").to_owned())
                .await?;
        }
        Ok(())
    }
}
