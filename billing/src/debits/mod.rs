//! Debits: everything that draws on a workspace's pool per model call. Usage
//! (`usage`), reservations and their settlement (`reservations`), project budgets
//! (`budget`), and the group-commit writer that runs them in batches (`writer`).

pub mod budget;
pub(crate) mod engine;
pub mod reservations;
pub mod usage;
pub mod writer;

use crate::accounts::access;
use crate::accounts::auth::Principal;
use crate::error::{BillingError, Result};
use crate::ids::parse_uuid;
use chrono::{DateTime, Utc};
use entity::{reservations as reservation_rows, usage_events};
use reservations::{ReserveRequest, Settled};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use usage::{Recorded, UsageRequest};
use uuid::Uuid;
use writer::{DebitWriter, SettleRequest};

// --- entry points for callers (the API) ----------------------------------------------
//
// Each authorizes the caller and runs the operation through the process's group-commit
// writer when there is one (every server), or alone through the per-call path when
// there is none (a schema built for export or tests): the same engine either way.

/// Largest `recordUsageBatch`: bounds one request's work and response size.
pub const USAGE_BATCH_MAX: usize = 1_000;

/// A usage record as the caller sent it, before authorization. Ids are parsed here,
/// in order (the workspace, then the attributed user once the caller is authorized).
#[derive(Clone, Debug)]
pub struct UsageCall {
    /// The idempotency key of the record.
    pub request_id: String,
    /// None: the caller's own workspace (an API key's).
    pub workspace_id: Option<String>,
    /// The member the usage is attributed to; None: the caller's user.
    pub user_id: Option<String>,
    /// None: the API key's project, if it has one.
    pub project_tag: Option<String>,
    pub model_id: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// Authorizes a usage call and makes it the domain request.
pub async fn usage_request<C: ConnectionTrait>(
    c: &C,
    principal: &Principal,
    call: UsageCall,
) -> Result<UsageRequest> {
    let workspace_id = parse_opt("workspace", call.workspace_id.as_deref())?;
    let who = access::usage_caller(c, principal, workspace_id).await?;
    let user_id = parse_opt("user", call.user_id.as_deref())?;
    Ok(UsageRequest {
        workspace_id: who.workspace_id,
        project: who.project(call.project_tag),
        model_id: call.model_id,
        prompt_tokens: call.prompt_tokens,
        completion_tokens: call.completion_tokens,
        request_id: call.request_id,
        user_id: user_id.or(who.user_id),
        api_key_id: who.api_key_id,
    })
}

fn parse_opt(kind: &'static str, id: Option<&str>) -> Result<Option<Uuid>> {
    id.map(|id| parse_uuid(kind, id)).transpose()
}

/// `recordUsage`: authorizes and records one usage call.
pub async fn record_usage(
    db: &DatabaseConnection,
    writer: Option<&DebitWriter>,
    principal: &Principal,
    call: UsageCall,
    now: DateTime<Utc>,
) -> Result<Recorded> {
    let req = usage_request(db, principal, call).await?;
    match writer {
        Some(writer) => writer.record_usage(req, now).await,
        None => usage::record_usage(db, req, now).await,
    }
}

/// `recordUsageBatch`: every call authorized first, then the admitted ones recorded
/// together (with a writer they share one commit), each admitted or refused on its
/// own, in order. Answers keep the input order. More than [`USAGE_BATCH_MAX`] calls
/// is LIMIT_EXCEEDED and records nothing.
pub async fn record_usage_batch(
    db: &DatabaseConnection,
    writer: Option<&DebitWriter>,
    principal: &Principal,
    calls: Vec<UsageCall>,
    now: DateTime<Utc>,
) -> Result<Vec<Result<Recorded>>> {
    if calls.len() > USAGE_BATCH_MAX {
        return Err(BillingError::LimitExceeded(format!(
            "at most {USAGE_BATCH_MAX} usage records per batch"
        )));
    }
    let mut admitted = Vec::with_capacity(calls.len());
    let mut refusals = Vec::with_capacity(calls.len());
    for call in calls {
        match usage_request(db, principal, call).await {
            Ok(req) => {
                admitted.push(req);
                refusals.push(None);
            }
            Err(e) => refusals.push(Some(e)),
        }
    }
    let mut recorded = record_many(db, writer, admitted, now).await.into_iter();
    let missing = || Err(BillingError::Internal("missing batch answer".into()));
    Ok(refusals
        .into_iter()
        .map(|refusal| match refusal {
            Some(e) => Err(e),
            None => recorded.next().unwrap_or_else(missing),
        })
        .collect())
}

async fn record_many(
    db: &DatabaseConnection,
    writer: Option<&DebitWriter>,
    reqs: Vec<UsageRequest>,
    now: DateTime<Utc>,
) -> Vec<Result<Recorded>> {
    if let Some(writer) = writer {
        return writer.record_usage_many(reqs, now).await;
    }
    let mut out = Vec::with_capacity(reqs.len());
    for req in reqs {
        out.push(usage::record_usage(db, req, now).await);
    }
    out
}

/// A reservation as the caller asked for it, before authorization (ids as sent).
#[derive(Clone, Debug)]
pub struct ReserveCall {
    /// The idempotency key of the reservation (and of its settlement's usage).
    pub request_id: String,
    pub ttl_seconds: i64,
    /// None: the caller's own workspace (an API key's).
    pub workspace_id: Option<String>,
    /// None: the API key's project, if it has one.
    pub project_tag: Option<String>,
    pub model_id: String,
    pub max_prompt_tokens: i64,
    pub max_completion_tokens: i64,
}

/// `reserveCredits`: authorizes the caller and reserves the call's worst-case cost.
pub async fn reserve(
    db: &DatabaseConnection,
    writer: Option<&DebitWriter>,
    principal: &Principal,
    call: ReserveCall,
    now: DateTime<Utc>,
) -> Result<reservation_rows::Model> {
    let workspace_id = parse_opt("workspace", call.workspace_id.as_deref())?;
    let who = access::usage_caller(db, principal, workspace_id).await?;
    let req = ReserveRequest {
        workspace_id: who.workspace_id,
        project: who.project(call.project_tag),
        model_id: call.model_id,
        max_prompt_tokens: call.max_prompt_tokens,
        max_completion_tokens: call.max_completion_tokens,
        request_id: call.request_id,
        ttl_seconds: call.ttl_seconds,
        user_id: who.user_id,
        api_key_id: who.api_key_id,
    };
    match writer {
        Some(writer) => writer.reserve(req, now).await,
        None => reservations::reserve(db, req, now).await,
    }
}

/// `settleReservation`: settles a reservation of a workspace where the caller may
/// record usage (any other is NOT_FOUND, as an unknown one).
pub async fn settle(
    db: &DatabaseConnection,
    writer: Option<&DebitWriter>,
    principal: &Principal,
    reservation_id: Uuid,
    prompt_tokens: i64,
    completion_tokens: i64,
    now: DateTime<Utc>,
) -> Result<Settled> {
    let reservation = usable_reservation(db, principal, reservation_id).await?;
    let Some(writer) = writer else {
        return reservations::settle(db, reservation_id, prompt_tokens, completion_tokens, now)
            .await;
    };
    let req = SettleRequest {
        reservation_id,
        workspace_id: reservation.workspace_id,
        prompt_tokens,
        completion_tokens,
    };
    writer.settle(req, now).await
}

/// `releaseReservation`: releases a reservation of a workspace where the caller may
/// record usage (any other is NOT_FOUND, as an unknown one).
pub async fn release(
    db: &DatabaseConnection,
    writer: Option<&DebitWriter>,
    principal: &Principal,
    reservation_id: Uuid,
    now: DateTime<Utc>,
) -> Result<reservation_rows::Model> {
    let reservation = usable_reservation(db, principal, reservation_id).await?;
    match writer {
        Some(writer) => {
            writer
                .release(reservation.workspace_id, reservation_id, now)
                .await
        }
        None => reservations::release(db, reservation_id, now).await,
    }
}

/// A reservation the caller may settle or release: a usage-level caller of its
/// workspace.
async fn usable_reservation(
    db: &DatabaseConnection,
    principal: &Principal,
    reservation_id: Uuid,
) -> Result<reservation_rows::Model> {
    let reservation = reservations::load_reservation(db, reservation_id).await?;
    let who = access::usage_caller(db, principal, Some(reservation.workspace_id)).await;
    access::hidden_as("reservation", who)?;
    Ok(reservation)
}

// --- batched reads (the API's DataLoaders) -------------------------------------------

crate::batch::rows_by_ids!(usage_events_by_ids, usage_events);
