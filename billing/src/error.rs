//! Typed errors with stable machine codes (the contract's `extensions.code`).

use crate::money::{Credits, MoneyError};
use crate::pricing::PricingError;
use sea_orm::DbErr;

/// The stable codes of the API contract. Never rename one: clients match on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Unauthenticated,
    Forbidden,
    NotFound,
    InvalidInput,
    InsufficientCredits,
    BudgetExceeded,
    IdempotencyConflict,
    PaymentFailed,
    LimitExceeded,
    /// Too many requests from one credential or address; retry after a wait.
    RateLimited,
    Internal,
}

impl ErrorCode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::Forbidden => "FORBIDDEN",
            Self::NotFound => "NOT_FOUND",
            Self::InvalidInput => "INVALID_INPUT",
            Self::InsufficientCredits => "INSUFFICIENT_CREDITS",
            Self::BudgetExceeded => "BUDGET_EXCEEDED",
            Self::IdempotencyConflict => "IDEMPOTENCY_CONFLICT",
            Self::PaymentFailed => "PAYMENT_FAILED",
            Self::LimitExceeded => "LIMIT_EXCEEDED",
            Self::RateLimited => "RATE_LIMITED",
            Self::Internal => "INTERNAL",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("authentication required")]
    Unauthenticated,
    #[error("not allowed: {0}")]
    Forbidden(&'static str),
    /// The thing (its kind) does not exist, or is not visible to the caller.
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    InvalidInput(String),
    #[error("insufficient credits: {available} available")]
    InsufficientCredits { available: Credits },
    #[error("project budget exceeded: {available} left in the current period")]
    BudgetExceeded { available: Credits },
    #[error("idempotency key already used with a different request")]
    IdempotencyConflict,
    #[error("payment failed: {0}")]
    PaymentFailed(String),
    #[error("{0}")]
    LimitExceeded(String),
    #[error("too many requests; retry in {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u64 },
    #[error("database error: {0}")]
    Database(#[from] DbErr),
    /// A broken internal assumption (an invariant); never shown to callers verbatim.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = BillingError> = std::result::Result<T, E>;

impl BillingError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Unauthenticated => ErrorCode::Unauthenticated,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::InvalidInput(_) => ErrorCode::InvalidInput,
            Self::InsufficientCredits { .. } => ErrorCode::InsufficientCredits,
            Self::BudgetExceeded { .. } => ErrorCode::BudgetExceeded,
            Self::IdempotencyConflict => ErrorCode::IdempotencyConflict,
            Self::PaymentFailed(_) => ErrorCode::PaymentFailed,
            Self::LimitExceeded(_) => ErrorCode::LimitExceeded,
            Self::RateLimited { .. } => ErrorCode::RateLimited,
            Self::Database(_) | Self::Internal(_) => ErrorCode::Internal,
        }
    }

    /// Credits still available, for the two refusals that carry it.
    pub fn available(&self) -> Option<Credits> {
        match self {
            Self::InsufficientCredits { available } | Self::BudgetExceeded { available } => {
                Some(*available)
            }
            _ => None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidInput(message.into())
    }

    /// True when the database refused a row because a unique key already exists.
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, Self::Database(e) if is_unique_violation(e))
    }
}

pub fn is_unique_violation(e: &DbErr) -> bool {
    matches!(
        e.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    )
}

impl From<MoneyError> for BillingError {
    fn from(e: MoneyError) -> Self {
        match e {
            MoneyError::Overflow => Self::LimitExceeded("amount out of range".into()),
            other => Self::InvalidInput(other.to_string()),
        }
    }
}

impl From<PricingError> for BillingError {
    fn from(e: PricingError) -> Self {
        match e {
            PricingError::TokensOutOfRange { .. } => Self::InvalidInput(e.to_string()),
            PricingError::NegativePrice => Self::Internal(e.to_string()),
            PricingError::Overflow => Self::LimitExceeded(e.to_string()),
        }
    }
}
