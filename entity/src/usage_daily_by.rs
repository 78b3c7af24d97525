//! Table `usage_daily_by`: one-dimension daily rollups (see the migration).
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "usage_daily_by")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub workspace_id: Uuid,
    /// `project`, `member`, `api_key` or `model`.
    pub dimension: String,
    pub day: Date,
    /// The project, member or key (nil: none; nil for model rows).
    pub dim_uuid: Uuid,
    /// The model ('' for the other dimensions).
    pub dim_model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_nanos: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
