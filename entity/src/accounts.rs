//! Table `accounts`.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "accounts")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub name: String,
    pub verified: bool,
    pub volume_discount_bps: i32,
    pub payment_terms_days: i32,
    pub invoice_sequence: i64,
    /// The account's Customer at the payment gateway (`cus_…`), created once.
    pub gateway_customer_id: Option<String>,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
