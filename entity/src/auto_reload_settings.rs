//! Table `auto_reload_settings`.

use crate::enums::AutoReloadStatus;
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, serde::Deserialize)]
#[sea_orm(table_name = "auto_reload_settings")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub workspace_id: Uuid,
    pub enabled: bool,
    pub threshold_nanos: i64,
    pub amount_nanos: i64,
    pub payment_method_id: Option<Uuid>,
    pub max_reloads_per_day: i32,
    pub status: AutoReloadStatus,
    pub consecutive_failures: i32,
    pub last_reload_at: Option<DateTimeUtc>,
    pub last_failure_reason: Option<String>,
    pub next_attempt_at: Option<DateTimeUtc>,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
