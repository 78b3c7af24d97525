//! Table `gateway_events`: each webhook event of the payment gateway, recorded once.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "gateway_events")]
pub struct Model {
    /// The gateway's event id (`evt_…`).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The event's type (`payment_intent.succeeded`, …).
    pub kind: String,
    /// The purchase it concerned, when there was one.
    pub purchase_id: Option<Uuid>,
    pub received_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
