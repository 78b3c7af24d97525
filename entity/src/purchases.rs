//! Table `purchases`.

use crate::enums::{PurchaseSource, PurchaseStatus};
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "purchases")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub workspace_id: Uuid,
    pub package_id: Option<String>,
    pub amount_nanos: i64,
    pub bonus_nanos: i64,
    pub price_nanos: i64,
    pub status: PurchaseStatus,
    pub source: PurchaseSource,
    pub payment_method_id: Option<Uuid>,
    pub idempotency_key: String,
    pub request_hash: String,
    pub failure_reason: Option<String>,
    pub gateway_charge_id: Option<String>,
    pub attempts: i32,
    pub invoice_id: Option<Uuid>,
    pub created_by_user_id: Option<Uuid>,
    pub created_at: DateTimeUtc,
    pub completed_at: Option<DateTimeUtc>,
    /// When the cardholder disputed the charge (a chargeback), and why.
    pub disputed_at: Option<DateTimeUtc>,
    pub dispute_reason: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
