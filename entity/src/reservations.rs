//! Table `reservations`.

use crate::enums::ReservationStatus;
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, serde::Deserialize)]
#[sea_orm(table_name = "reservations")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub workspace_id: Uuid,
    pub project_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub api_key_id: Option<Uuid>,
    pub model_id: String,
    /// The usage idempotency key; unique per workspace.
    pub request_id: String,
    pub request_hash: String,
    /// The reserved credits (the worst-case cost); counted in `workspaces.reserved_nanos`
    /// while the status is HELD.
    pub amount_nanos: i64,
    pub status: ReservationStatus,
    pub expires_at: DateTimeUtc,
    pub usage_event_id: Option<Uuid>,
    pub created_at: DateTimeUtc,
    pub resolved_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
