//! Domain errors as GraphQL errors: `extensions.code` always set, `available` on the
//! two refusals, and INTERNAL errors reduced to a request id (the detail is logged).

use async_graphql::{Error, ErrorExtensions};
use billing::{BillingError, ErrorCode};

/// The id of the HTTP request being served, for INTERNAL errors and logs.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

pub fn to_gql(e: BillingError, request_id: Option<&RequestId>) -> Error {
    let code = e.code();
    let message = match code {
        ErrorCode::Internal => {
            let id = request_id.map(|r| r.0.as_str()).unwrap_or("-");
            tracing::error!(request_id = id, error = %e, "internal error");
            format!("internal error; quote request id {id}")
        }
        _ => e.to_string(),
    };
    Error::new(message).extend_with(|_, ext| {
        ext.set("code", code.as_str());
        if let Some(available) = e.available() {
            ext.set("available", available.to_string());
        }
        if code == ErrorCode::Internal
            && let Some(id) = request_id
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
