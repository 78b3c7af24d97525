//! Table `projects`.

use crate::enums::BudgetPeriod;
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, serde::Deserialize)]
#[sea_orm(table_name = "projects")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub workspace_id: Uuid,
    pub name: String,
    pub tag: String,
    pub budget_limit_nanos: Option<i64>,
    pub budget_period: BudgetPeriod,
    pub budget_period_start: DateTimeUtc,
    pub budget_spent_nanos: i64,
    /// Reserved credits of the project's HELD reservations (they count against the cap).
    pub budget_reserved_nanos: i64,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
