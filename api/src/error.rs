//! Domain errors as GraphQL errors: `extensions.code` always set, `available` on the
//! two refusals, `retryable: true` on UNAVAILABLE, and INTERNAL errors reduced to a
//! request id (the detail is logged, as is an UNAVAILABLE error's cause).

use async_graphql::{Error, ErrorExtensions};
use billing::{BillingError, ErrorCode};
use std::borrow::Borrow;

/// The id of the HTTP request (or WebSocket connection) being served: `extensions.requestId`
/// of an INTERNAL error, and the `http_request_id` log field. Not a usage `requestId`.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// What a caller is told when the database cannot be reached.
pub const UNAVAILABLE_MESSAGE: &str = "the database is unavailable; try again";

/// The GraphQL error for a domain error, owned or shared: a DataLoader hands the same
/// error (an `Arc`) to every key of a failed batch, and each keeps the error's code.
pub fn to_gql(e: impl Borrow<BillingError>, http_request_id: Option<&RequestId>) -> Error {
    let e = e.borrow();
    let code = e.code();
    let message = match code {
        ErrorCode::Internal => {
            log_internal(e, http_request_id);
            let id = http_request_id.map(|r| r.0.as_str()).unwrap_or("-");
            format!("internal error; quote request id {id}")
        }
        ErrorCode::Unavailable => {
            // The cause (host, driver detail) is for the operator, not the caller.
            let id = http_request_id.map(|r| r.0.as_str()).unwrap_or("-");
            tracing::warn!(http_request_id = id, error = %e, "database unavailable");
            UNAVAILABLE_MESSAGE.to_owned()
        }
        _ => e.to_string(),
    };
    Error::new(message).extend_with(|_, ext| {
        ext.set("code", code.as_str());
        if code.is_retryable() {
            ext.set("retryable", true);
        }
        if let Some(available) = e.available() {
            ext.set("available", available.to_string());
        }
        if let BillingError::RateLimited { retry_after_ms } = e {
            ext.set("retryAfterMs", *retry_after_ms);
        }
        if code == ErrorCode::Internal
            && let Some(id) = http_request_id
        {
            ext.set("requestId", id.0.clone());
        }
    })
}

/// `?` on a domain result inside a resolver.
pub trait GqlResult<T> {
    fn gql(self, ctx: &async_graphql::Context<'_>) -> async_graphql::Result<T>;
}

impl<T> GqlResult<T> for Result<T, BillingError> {
    fn gql(self, ctx: &async_graphql::Context<'_>) -> async_graphql::Result<T> {
        self.map_err(|e| to_gql(e, ctx.data_opt::<RequestId>()))
    }
}

/// Logs an INTERNAL error once, where it is handled, when the caller gets only its code.
pub fn log_internal(e: &BillingError, http_request_id: Option<&RequestId>) {
    let id = http_request_id.map(|r| r.0.as_str()).unwrap_or("-");
    tracing::error!(http_request_id = id, error = %e, "internal error");
}

/// Gives every error of a response a stable `extensions.code`: errors raised before
/// any resolver ran (parse and validation errors, a JSON number where a Credits string
/// belongs, a missing argument) are INVALID_INPUT; the depth, complexity and size
/// limits are LIMIT_EXCEEDED.
pub struct ErrorCodes;

impl async_graphql::extensions::ExtensionFactory for ErrorCodes {
    fn create(&self) -> std::sync::Arc<dyn async_graphql::extensions::Extension> {
        std::sync::Arc::new(ErrorCodesExtension)
    }
}

struct ErrorCodesExtension;

/// Errors kept in one response (one more says how many were left out).
pub const ERRORS_MAX: usize = 20;

/// Messages of async-graphql's own limit checks.
const LIMIT_MESSAGES: &[&str] = &[
    "Query is too complex",
    "Query is nested too deep",
    "recursion depth",
    "too many directives",
    "number of directives",
];

#[async_graphql::async_trait::async_trait]
impl async_graphql::extensions::Extension for ErrorCodesExtension {
    async fn request(
        &self,
        ctx: &async_graphql::extensions::ExtensionContext<'_>,
        next: async_graphql::extensions::NextRequest<'_>,
    ) -> async_graphql::Response {
        let mut response = next.run(ctx).await;
        if response.errors.len() > ERRORS_MAX {
            // A document can produce an error per field or directive; the first few
            // say what is wrong, the rest only make the response large.
            let omitted = response.errors.len().saturating_sub(ERRORS_MAX);
            response.errors.truncate(ERRORS_MAX);
            let mut more =
                async_graphql::ServerError::new(format!("{omitted} more errors omitted"), None);
            more.extensions
                .get_or_insert_with(Default::default)
                .set("code", ErrorCode::LimitExceeded.as_str());
            response.errors.push(more);
        }
        for error in &mut response.errors {
            let has_code = error
                .extensions
                .as_ref()
                .is_some_and(|ext| ext.get("code").is_some());
            if has_code {
                continue;
            }
            let code = if LIMIT_MESSAGES.iter().any(|m| error.message.contains(m)) {
                ErrorCode::LimitExceeded
            } else {
                ErrorCode::InvalidInput
            };
            error
                .extensions
                .get_or_insert_with(Default::default)
                .set("code", code.as_str());
        }
        response
    }
}
