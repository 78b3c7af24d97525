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
    /// The database cannot be reached right now (pool timed out, connection refused
    /// or terminated): nothing was decided, and the same request may be sent again.
    Unavailable,
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
            Self::Unavailable => "UNAVAILABLE",
            Self::RateLimited => "RATE_LIMITED",
            Self::Internal => "INTERNAL",
        }
    }

    /// Whether sending the same request again later can succeed (the GraphQL
    /// `extensions.retryable`). A retried debit is safe: its request id or idempotency
    /// key makes it a replay if the first attempt did commit.
    pub const fn is_retryable(self) -> bool {
        matches!(self, Self::Unavailable)
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
    /// The database could not be reached (the cause, for the log).
    #[error("database unavailable: {0}")]
    Unavailable(String),
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
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Database(e) if is_unavailable(e) => ErrorCode::Unavailable,
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

    /// True when the database could not be reached ([`ErrorCode::Unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        self.code() == ErrorCode::Unavailable
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

/// Whether a database error means the database cannot be reached, rather than that it
/// refused this statement: the pool found no live connection within its acquire
/// timeout, the socket failed or was closed, the server is shutting down or starting
/// (PostgreSQL class 08 and 57P01-57P03, 53300 too many connections), or SQLite could
/// not open its file or take its lock within the busy timeout.
pub fn is_unavailable(e: &DbErr) -> bool {
    match e {
        DbErr::ConnectionAcquire(_) => true,
        DbErr::Conn(runtime) | DbErr::Exec(runtime) | DbErr::Query(runtime) => {
            matches!(runtime, sea_orm::RuntimeErr::SqlxError(e) if sqlx_unavailable(e))
        }
        _ => false,
    }
}

fn sqlx_unavailable(e: &sea_orm::sqlx::Error) -> bool {
    use sea_orm::sqlx::Error;
    match e {
        Error::PoolTimedOut
        | Error::PoolClosed
        | Error::Io(_)
        | Error::Tls(_)
        | Error::WorkerCrashed => true,
        Error::Database(db) => {
            let Some(code) = db.code() else {
                return false;
            };
            if db
                .try_downcast_ref::<sea_orm::sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                pg_unavailable(&code)
            } else {
                sqlite_unavailable(&code)
            }
        }
        _ => false,
    }
}

/// SQLSTATEs that say "not reachable now" rather than "refused": connection
/// exceptions, the server shutting down, crashed or starting, too many connections.
fn pg_unavailable(sqlstate: &str) -> bool {
    sqlstate.starts_with("08") || matches!(sqlstate, "57P01" | "57P02" | "57P03" | "53300")
}

/// SQLite result codes (an extended code carries its primary code in the low byte):
/// BUSY (the lock not had within the busy timeout) and CANTOPEN (the file).
fn sqlite_unavailable(code: &str) -> bool {
    const SQLITE_BUSY: i64 = 5;
    const SQLITE_CANTOPEN: i64 = 14;
    code.parse::<i64>()
        .is_ok_and(|code| matches!(code & 0xff, SQLITE_BUSY | SQLITE_CANTOPEN))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_failures_are_unavailable_and_retryable() {
        let timeout = DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::Timeout);
        let e = BillingError::Database(timeout);
        assert_eq!(e.code(), ErrorCode::Unavailable);
        assert!(e.code().is_retryable());
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let io = DbErr::Exec(sea_orm::RuntimeErr::SqlxError(std::sync::Arc::new(
            sea_orm::sqlx::Error::Io(refused),
        )));
        assert!(is_unavailable(&io));
        assert_eq!(
            BillingError::Unavailable("x".into()).code().as_str(),
            "UNAVAILABLE"
        );
        assert!(!ErrorCode::Internal.is_retryable());
        let other = BillingError::Database(DbErr::Custom("bad".into()));
        assert_eq!(other.code(), ErrorCode::Internal);
    }

    #[test]
    fn codes_of_an_unreachable_database() {
        for sqlstate in ["08006", "08001", "57P01", "57P02", "57P03", "53300"] {
            assert!(pg_unavailable(sqlstate), "{sqlstate}");
        }
        for sqlstate in ["23505", "22021", "40001", "42P01"] {
            assert!(!pg_unavailable(sqlstate), "{sqlstate}");
        }
        // BUSY, BUSY_SNAPSHOT (517), CANTOPEN; not CONSTRAINT_UNIQUE (2067) or FULL (13).
        for code in ["5", "517", "14"] {
            assert!(sqlite_unavailable(code), "{code}");
        }
        for code in ["2067", "13", "1"] {
            assert!(!sqlite_unavailable(code), "{code}");
        }
    }
}
