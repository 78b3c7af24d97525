//! Table `ledger_entries`.

use crate::enums::LedgerEntryKind;
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "ledger_entries")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub transaction_id: i64,
    pub workspace_id: Option<Uuid>,
    pub system_account: Option<String>,
    pub kind: LedgerEntryKind,
    pub amount_nanos: i64,
    pub balance_after_nanos: Option<i64>,
    pub description: String,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
