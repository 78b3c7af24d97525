//! Table `alert_thresholds`.

use crate::enums::AlertSeverity;
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, serde::Deserialize)]
#[sea_orm(table_name = "alert_thresholds")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub workspace_id: Uuid,
    /// The threshold (named `amount`, as in the contract): the alert fires when the
    /// balance falls below it.
    pub amount_nanos: i64,
    pub severity: AlertSeverity,
    pub armed: bool,
    pub last_triggered_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
