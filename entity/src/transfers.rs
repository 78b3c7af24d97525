//! Table `transfers`.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "transfers")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub account_id: Uuid,
    pub from_workspace_id: Uuid,
    pub to_workspace_id: Uuid,
    pub amount_nanos: i64,
    pub memo: Option<String>,
    pub created_by_user_id: Option<Uuid>,
    pub idempotency_key: String,
    pub request_hash: String,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
