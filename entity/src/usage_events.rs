//! Table `usage_events`.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, serde::Deserialize)]
#[sea_orm(table_name = "usage_events")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub workspace_id: Uuid,
    pub project_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub api_key_id: Option<Uuid>,
    pub model_id: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_nanos: i64,
    pub shortfall_nanos: i64,
    /// The usage idempotency key; unique per workspace.
    pub request_id: String,
    pub request_hash: String,
    pub reservation_id: Option<Uuid>,
    /// The USAGE ledger transaction that posted this event: its own, or its batch's
    /// for the workspace (docs/LEDGER.md §3). Set by the debit engine's write.
    pub ledger_transaction_id: Option<i64>,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
