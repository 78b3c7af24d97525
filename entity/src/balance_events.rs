//! Table `balance_events`.

use crate::enums::BalanceChangeCause;
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "balance_events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub workspace_id: Uuid,
    pub sequence: i64,
    pub balance_nanos: i64,
    pub reserved_nanos: i64,
    pub cause: BalanceChangeCause,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
