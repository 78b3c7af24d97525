//! Closed sets of values stored as strings. The same spelling is used in the
//! database CHECK constraints, in Rust and in the GraphQL enums.

use sea_orm::entity::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum AccountRole {
    #[sea_orm(string_value = "OWNER")]
    Owner,
    #[sea_orm(string_value = "ADMIN")]
    Admin,
    #[sea_orm(string_value = "MEMBER")]
    Member,
}

impl AccountRole {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "OWNER",
            Self::Admin => "ADMIN",
            Self::Member => "MEMBER",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum WorkspaceRole {
    #[sea_orm(string_value = "ADMIN")]
    Admin,
    #[sea_orm(string_value = "MEMBER")]
    Member,
    #[sea_orm(string_value = "VIEWER")]
    Viewer,
}

impl WorkspaceRole {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "ADMIN",
            Self::Member => "MEMBER",
            Self::Viewer => "VIEWER",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum BudgetPeriod {
    #[sea_orm(string_value = "DAILY")]
    Daily,
    #[sea_orm(string_value = "WEEKLY")]
    Weekly,
    #[sea_orm(string_value = "MONTHLY")]
    Monthly,
    #[sea_orm(string_value = "LIFETIME")]
    Lifetime,
}

impl BudgetPeriod {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Daily => "DAILY",
            Self::Weekly => "WEEKLY",
            Self::Monthly => "MONTHLY",
            Self::Lifetime => "LIFETIME",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum CardBrand {
    #[sea_orm(string_value = "VISA")]
    Visa,
    #[sea_orm(string_value = "MASTERCARD")]
    Mastercard,
    #[sea_orm(string_value = "AMEX")]
    Amex,
    #[sea_orm(string_value = "DISCOVER")]
    Discover,
    #[sea_orm(string_value = "OTHER")]
    Other,
}

impl CardBrand {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Visa => "VISA",
            Self::Mastercard => "MASTERCARD",
            Self::Amex => "AMEX",
            Self::Discover => "DISCOVER",
            Self::Other => "OTHER",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum InvoiceStatus {
    #[sea_orm(string_value = "OPEN")]
    Open,
    #[sea_orm(string_value = "PAID")]
    Paid,
    #[sea_orm(string_value = "VOID")]
    Void,
}

impl InvoiceStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Open => "OPEN",
            Self::Paid => "PAID",
            Self::Void => "VOID",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum PurchaseStatus {
    #[sea_orm(string_value = "PENDING")]
    Pending,
    #[sea_orm(string_value = "SUCCEEDED")]
    Succeeded,
    #[sea_orm(string_value = "FAILED")]
    Failed,
    /// The bank wants the cardholder to authenticate (3-D Secure) and nobody was
    /// there: never credited, never retried; the admins are told what to do.
    #[sea_orm(string_value = "REQUIRES_ACTION")]
    RequiresAction,
}

impl PurchaseStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::RequiresAction => "REQUIRES_ACTION",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum PurchaseSource {
    #[sea_orm(string_value = "MANUAL")]
    Manual,
    #[sea_orm(string_value = "AUTO_RELOAD")]
    AutoReload,
    #[sea_orm(string_value = "INVOICE")]
    Invoice,
}

impl PurchaseSource {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Manual => "MANUAL",
            Self::AutoReload => "AUTO_RELOAD",
            Self::Invoice => "INVOICE",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum ReservationStatus {
    #[sea_orm(string_value = "HELD")]
    Held,
    #[sea_orm(string_value = "SETTLED")]
    Settled,
    #[sea_orm(string_value = "RELEASED")]
    Released,
    #[sea_orm(string_value = "EXPIRED")]
    Expired,
}

impl ReservationStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Held => "HELD",
            Self::Settled => "SETTLED",
            Self::Released => "RELEASED",
            Self::Expired => "EXPIRED",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum LedgerEntryKind {
    #[sea_orm(string_value = "PURCHASE")]
    Purchase,
    #[sea_orm(string_value = "BONUS")]
    Bonus,
    #[sea_orm(string_value = "USAGE")]
    Usage,
    #[sea_orm(string_value = "TRANSFER_IN")]
    TransferIn,
    #[sea_orm(string_value = "TRANSFER_OUT")]
    TransferOut,
    #[sea_orm(string_value = "ADJUSTMENT")]
    Adjustment,
}

impl LedgerEntryKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Purchase => "PURCHASE",
            Self::Bonus => "BONUS",
            Self::Usage => "USAGE",
            Self::TransferIn => "TRANSFER_IN",
            Self::TransferOut => "TRANSFER_OUT",
            Self::Adjustment => "ADJUSTMENT",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum BalanceChangeCause {
    #[sea_orm(string_value = "PURCHASE")]
    Purchase,
    #[sea_orm(string_value = "BONUS")]
    Bonus,
    #[sea_orm(string_value = "USAGE")]
    Usage,
    #[sea_orm(string_value = "TRANSFER_IN")]
    TransferIn,
    #[sea_orm(string_value = "TRANSFER_OUT")]
    TransferOut,
    #[sea_orm(string_value = "ADJUSTMENT")]
    Adjustment,
    #[sea_orm(string_value = "RESERVATION")]
    Reservation,
    #[sea_orm(string_value = "RELEASE")]
    Release,
}

impl BalanceChangeCause {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Purchase => "PURCHASE",
            Self::Bonus => "BONUS",
            Self::Usage => "USAGE",
            Self::TransferIn => "TRANSFER_IN",
            Self::TransferOut => "TRANSFER_OUT",
            Self::Adjustment => "ADJUSTMENT",
            Self::Reservation => "RESERVATION",
            Self::Release => "RELEASE",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum AutoReloadStatus {
    #[sea_orm(string_value = "IDLE")]
    Idle,
    #[sea_orm(string_value = "RELOADING")]
    Reloading,
    #[sea_orm(string_value = "DISABLED_AFTER_FAILURES")]
    DisabledAfterFailures,
}

impl AutoReloadStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "IDLE",
            Self::Reloading => "RELOADING",
            Self::DisabledAfterFailures => "DISABLED_AFTER_FAILURES",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum AlertSeverity {
    #[sea_orm(string_value = "WARNING")]
    Warning,
    #[sea_orm(string_value = "URGENT")]
    Urgent,
}

impl AlertSeverity {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Warning => "WARNING",
            Self::Urgent => "URGENT",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum NotificationStatus {
    #[sea_orm(string_value = "PENDING")]
    Pending,
    #[sea_orm(string_value = "SENT")]
    Sent,
    /// Its attempts ran out; the last error is kept. Retried only on request.
    #[sea_orm(string_value = "DEAD")]
    Dead,
}

impl NotificationStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Sent => "SENT",
            Self::Dead => "DEAD",
        }
    }
}

/// A webhook delivery: PENDING (due at `next_attempt_at`), DELIVERED (a 2xx answer) or
/// DEAD (its attempts ran out; retried only on request).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
pub enum WebhookDeliveryStatus {
    #[sea_orm(string_value = "PENDING")]
    Pending,
    #[sea_orm(string_value = "DELIVERED")]
    Delivered,
    #[sea_orm(string_value = "DEAD")]
    Dead,
}

impl WebhookDeliveryStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Delivered => "DELIVERED",
            Self::Dead => "DEAD",
        }
    }
}

/// Reads each of these from its stored spelling (as `row_to_json` writes it), so a row
/// read as JSON (the debit engine's fused reads on PostgreSQL) decodes like one read
/// column by column.
macro_rules! deserialize_from_stored_string {
    ($($enum:ty),* $(,)?) => {$(
        impl<'de> serde::Deserialize<'de> for $enum {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let stored = String::deserialize(d)?;
                <$enum as ActiveEnum>::try_from_value(&stored)
                    .map_err(|_| serde::de::Error::custom(format!("unknown value {stored:?}")))
            }
        }
    )*};
}

deserialize_from_stored_string!(
    BudgetPeriod,
    ReservationStatus,
    AutoReloadStatus,
    AlertSeverity
);
