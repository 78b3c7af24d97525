//! Mutations: parse, authorize, call one `billing` function, shape the result.

use super::types::*;
use super::{caller, db, parse_id};
use crate::error::GqlResult;
use crate::scalars::{CreditsScalar, DecimalScalar};
use async_graphql::{Context, ID, InputObject, Object, Result, SimpleObject};
use billing::accounts::access::{self, WorkspaceAccess};
use billing::accounts::auth::Principal;
use billing::entity::{api_keys, payment_methods, projects};
use billing::payments::PaymentGateway;
use billing::payments::purchases::{PurchaseCreditsRequest, PurchaseItem};
use billing::debits::reservations::{self, ReserveRequest};
use billing::sea_orm::{DatabaseConnection, EntityTrait};
use billing::debits::usage::{self, ProjectRef, UsageRequest};
use billing::debits::writer::{DebitWriter, SettleRequest};
use billing::{BillingError, ErrorCode, accounts, transfers};
use chrono::Utc;
use std::sync::Arc;
use uuid::Uuid;

/// Largest `recordUsageBatch`: bounds one request's work and response size.
pub const USAGE_BATCH_MAX: usize = 1_000;

// --- inputs (the contract's shapes) --------------------------------------------------

#[derive(InputObject)]
pub struct CreateAccountInput {
    pub name: String,
    pub owner_email: String,
    pub owner_name: String,
}

#[derive(SimpleObject)]
pub struct CreateAccountPayload {
    pub account: Account,
    pub owner: User,
    /// The owner's user token; shown once, stored only as a hash.
    pub owner_token: String,
}

#[derive(InputObject)]
pub struct CreateUserTokenInput {
    pub user_id: ID,
    pub name: String,
}

#[derive(SimpleObject)]
pub struct CreateUserTokenPayload {
    /// Shown once, stored only as a hash.
    pub token: String,
}

#[derive(InputObject)]
pub struct CreateWorkspaceInput {
    pub account_id: ID,
    pub name: String,
}

#[derive(InputObject)]
pub struct CreateProjectInput {
    pub workspace_id: ID,
    pub name: String,
    pub tag: String,
}

#[derive(InputObject)]
pub struct AddWorkspaceMemberInput {
    pub workspace_id: ID,
    /// Creates the user (as an account MEMBER) if the email is new to the account.
    pub email: String,
    pub name: Option<String>,
    pub role: WorkspaceRole,
}

#[derive(InputObject)]
pub struct CreateApiKeyInput {
    pub workspace_id: ID,
    pub name: String,
    pub project_id: Option<ID>,
}

#[derive(SimpleObject)]
pub struct CreateApiKeyPayload {
    pub api_key: ApiKey,
    /// The secret; shown once, stored only as a hash.
    pub secret: String,
}

#[derive(InputObject)]
pub struct AddPaymentMethodInput {
    pub account_id: ID,
    /// A token from the payment gateway's client-side card form (e.g. "tok_visa"); card numbers never reach this server.
    pub token: String,
    #[graphql(default_with = "Some(false)")]
    pub make_default: Option<bool>,
}

#[derive(InputObject)]
pub struct PurchaseCreditsInput {
    pub workspace_id: ID,
    /// Buy a package (with its bonus) ...
    pub package_id: Option<ID>,
    /// ... or a custom amount of credits (at most 2 fractional digits); exactly one of packageId and amount.
    pub amount: Option<CreditsScalar>,
    /// Defaults to the account's default payment method.
    pub payment_method_id: Option<ID>,
    /// Charge against an invoice with payment terms instead of a card (verified accounts only).
    #[graphql(default_with = "Some(false)")]
    pub pay_by_invoice: Option<bool>,
    /// Retrying with the same key returns the same purchase and never charges twice.
    pub idempotency_key: String,
}

#[derive(InputObject, Clone)]
pub struct RecordUsageInput {
    /// Optional when the caller is a workspace API key (its workspace is used).
    pub workspace_id: Option<ID>,
    /// The project tag; defaults to the API key's project.
    pub project_tag: Option<String>,
    pub model_id: String,
    pub prompt_tokens: i32,
    pub completion_tokens: i32,
    /// Idempotency key: the same request id is recorded once.
    pub request_id: String,
    /// The member the usage is attributed to; defaults to the caller's user.
    pub user_id: Option<ID>,
}

#[derive(SimpleObject)]
pub struct RecordUsageResult {
    /// Null when this item failed.
    pub usage: Option<UsageEvent>,
    /// Null when this item succeeded; otherwise one of the error codes.
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

#[derive(InputObject)]
pub struct ReserveCreditsInput {
    pub workspace_id: Option<ID>,
    pub project_tag: Option<String>,
    pub model_id: String,
    pub max_prompt_tokens: i32,
    pub max_completion_tokens: i32,
    pub request_id: String,
    #[graphql(default_with = "Some(600)")]
    pub ttl_seconds: Option<i32>,
}

#[derive(InputObject)]
pub struct SettleReservationInput {
    pub reservation_id: ID,
    pub prompt_tokens: i32,
    pub completion_tokens: i32,
}

#[derive(InputObject)]
pub struct TransferCreditsInput {
    pub from_workspace_id: ID,
    pub to_workspace_id: ID,
    pub amount: CreditsScalar,
    pub memo: Option<String>,
    pub idempotency_key: String,
}

#[derive(InputObject)]
pub struct SetProjectBudgetInput {
    pub project_id: ID,
    /// Null removes the cap.
    pub limit: Option<CreditsScalar>,
    #[graphql(default_with = "Some(BudgetPeriod::Monthly)")]
    pub period: Option<BudgetPeriod>,
}

#[derive(InputObject)]
pub struct ConfigureAutoReloadInput {
    pub workspace_id: ID,
    pub enabled: bool,
    pub threshold: CreditsScalar,
    pub amount: CreditsScalar,
    /// Defaults to the account's default payment method.
    pub payment_method_id: Option<ID>,
    #[graphql(default_with = "Some(3)")]
    pub max_reloads_per_day: Option<i32>,
}

#[derive(InputObject)]
pub struct AlertThresholdInput {
    pub amount: CreditsScalar,
    pub severity: AlertSeverity,
    /// Members of the workspace who get the email.
    pub recipient_ids: Vec<ID>,
}

#[derive(InputObject)]
pub struct SetAlertThresholdsInput {
    pub workspace_id: ID,
    /// Replaces the workspace's thresholds.
    pub thresholds: Vec<AlertThresholdInput>,
}

#[derive(InputObject)]
pub struct SetPricingAgreementInput {
    pub account_id: ID,
    pub verified: bool,
    pub volume_discount_percent: DecimalScalar,
    pub payment_terms_days: i32,
}

#[derive(InputObject)]
pub struct UpsertModelInput {
    /// e.g. "openai/gpt-4o".
    pub id: String,
    pub name: String,
    pub prompt_price_per_million: CreditsScalar,
    pub completion_price_per_million: CreditsScalar,
    /// False retires the model: no new usage, history kept.
    #[graphql(default = true)]
    pub active: bool,
}

// --- helpers -------------------------------------------------------------------------

fn gateway<'a>(ctx: &Context<'a>) -> &'a Arc<dyn PaymentGateway> {
    ctx.data_unchecked::<Arc<dyn PaymentGateway>>()
}

async fn require_workspace(
    ctx: &Context<'_>,
    principal: &Principal,
    id: Uuid,
    level: WorkspaceAccess,
) -> Result<()> {
    access::require_workspace(db(ctx), principal, id, level)
        .await
        .gql(ctx)
        .map(|_| ())
}

/// For an object looked up by its own id: a caller who may not see its workspace or
/// account gets the same NOT_FOUND (same message) as for an id that does not exist.
fn hide_as<T>(kind: &'static str, result: billing::Result<T>) -> billing::Result<T> {
    result.map_err(|e| match e {
        BillingError::NotFound(_) => BillingError::NotFound(kind),
        other => other,
    })
}

fn opt_id(ctx: &Context<'_>, id: &Option<ID>, kind: &'static str) -> Result<Option<Uuid>> {
    id.as_ref().map(|id| parse_id(ctx, id, kind)).transpose()
}

/// Who the usage is charged to and attributed to, and which workspace (parsed and authorized).
struct UsageCaller {
    workspace_id: Uuid,
    user_id: Option<Uuid>,
    api_key_id: Option<Uuid>,
    key_project: Option<Uuid>,
}

async fn usage_caller(
    db: &DatabaseConnection,
    principal: &Principal,
    workspace_id: Option<Uuid>,
) -> billing::Result<UsageCaller> {
    let workspace_id = match (workspace_id, principal) {
        (Some(id), _) => id,
        (None, Principal::ApiKey { workspace_id, .. }) => *workspace_id,
        (None, _) => {
            return Err(BillingError::invalid(
                "workspaceId is required unless the caller is an API key",
            ));
        }
    };
    let level = match principal {
        // An API key is bound to its workspace (and its row to the key's): no lookup
        // on the hot path. Any other workspace is NOT_FOUND, as for a stranger.
        Principal::ApiKey {
            workspace_id: own, ..
        } if *own == workspace_id => WorkspaceAccess::ApiKey,
        Principal::ApiKey { .. } => return Err(BillingError::NotFound("workspace")),
        _ => {
            access::workspace_access(db, principal, workspace_id)
                .await?
                .1
        }
    };
    if !access::may_record_usage(level) {
        return Err(BillingError::Forbidden("viewers cannot record usage"));
    }
    let (user_id, api_key_id, key_project) = match principal {
        Principal::User { user_id, .. } => (Some(*user_id), None, None),
        Principal::ApiKey {
            api_key_id,
            project_id,
            ..
        } => (None, Some(*api_key_id), *project_id),
        Principal::PlatformAdmin => (None, None, None),
    };
    Ok(UsageCaller {
        workspace_id,
        user_id,
        api_key_id,
        key_project,
    })
}

fn project_ref(tag: Option<String>, key_project: Option<Uuid>) -> ProjectRef {
    match (tag, key_project) {
        (Some(tag), _) => ProjectRef::Tag(tag),
        (None, Some(id)) => ProjectRef::Id(id),
        (None, None) => ProjectRef::None,
    }
}

fn parse_uuid(id: &Option<ID>, kind: &'static str) -> billing::Result<Option<Uuid>> {
    id.as_ref()
        .map(|id| Uuid::parse_str(id.as_str()).map_err(|_| BillingError::NotFound(kind)))
        .transpose()
}

/// The domain request for one usage input, authorized.
async fn usage_request(
    db: &DatabaseConnection,
    principal: &Principal,
    input: RecordUsageInput,
) -> billing::Result<UsageRequest> {
    let who = usage_caller(db, principal, parse_uuid(&input.workspace_id, "workspace")?).await?;
    Ok(UsageRequest {
        workspace_id: who.workspace_id,
        project: project_ref(input.project_tag, who.key_project),
        model_id: input.model_id,
        prompt_tokens: i64::from(input.prompt_tokens),
        completion_tokens: i64::from(input.completion_tokens),
        request_id: input.request_id,
        user_id: parse_uuid(&input.user_id, "user")?.or(who.user_id),
        api_key_id: who.api_key_id,
    })
}

/// The process's group-commit writer (absent only in a schema built without a server).
fn writer<'a>(ctx: &Context<'a>) -> Option<&'a DebitWriter> {
    ctx.data_opt::<DebitWriter>()
}

async fn record_one(
    ctx: &Context<'_>,
    principal: &Principal,
    input: RecordUsageInput,
) -> billing::Result<UsageEvent> {
    let req = usage_request(db(ctx), principal, input).await?;
    let recorded = match writer(ctx) {
        Some(writer) => writer.record_usage(req, Utc::now()).await?,
        None => usage::record_usage(db(ctx), req, Utc::now()).await?,
    };
    Ok(UsageEvent(recorded.event))
}

/// Counts a usage debit in the process metrics: admitted, or the refusal's code.
fn count_debit<T>(ctx: &Context<'_>, result: &billing::Result<T>) {
    if let Some(metrics) = ctx.data_opt::<crate::metrics::Metrics>() {
        match result {
            Ok(_) => metrics.debit("admitted"),
            Err(e) => metrics.debit(e.code().as_str()),
        }
    }
}

/// A reservation the caller may settle or release (a usage-level caller of its workspace).
async fn reservation_for_usage(
    ctx: &Context<'_>,
    principal: &Principal,
    id: &ID,
) -> Result<billing::entity::reservations::Model> {
    let id = parse_id(ctx, id, "reservation")?;
    let reservation = reservations::load_reservation(db(ctx), id).await.gql(ctx)?;
    hide_as(
        "reservation",
        usage_caller(db(ctx), principal, Some(reservation.workspace_id)).await,
    )
    .gql(ctx)?;
    Ok(reservation)
}

pub struct MutationRoot;

#[Object]
impl MutationRoot {
    /// Platform admin only.
    async fn create_account(
        &self,
        ctx: &Context<'_>,
        input: CreateAccountInput,
    ) -> Result<CreateAccountPayload> {
        access::require_platform_admin(&caller(ctx)?).gql(ctx)?;
        let created = accounts::create_account(
            db(ctx),
            &input.name,
            &input.owner_email,
            &input.owner_name,
            Utc::now(),
        )
        .await
        .gql(ctx)?;
        Ok(CreateAccountPayload {
            account: Account(created.account),
            owner: User(created.owner),
            owner_token: created.owner_token,
        })
    }

    /// The user themself or an account owner/admin.
    async fn create_user_token(
        &self,
        ctx: &Context<'_>,
        input: CreateUserTokenInput,
    ) -> Result<CreateUserTokenPayload> {
        let principal = caller(ctx)?;
        let user_id = parse_id(ctx, &input.user_id, "user")?;
        access::require_user_manager(db(ctx), &principal, user_id)
            .await
            .gql(ctx)?;
        let token = accounts::create_user_token(db(ctx), user_id, &input.name, Utc::now())
            .await
            .gql(ctx)?;
        Ok(CreateUserTokenPayload { token })
    }

    async fn create_workspace(
        &self,
        ctx: &Context<'_>,
        input: CreateWorkspaceInput,
    ) -> Result<Workspace> {
        let account_id = parse_id(ctx, &input.account_id, "account")?;
        access::require_account_admin(db(ctx), &caller(ctx)?, account_id)
            .await
            .gql(ctx)?;
        let ws = accounts::create_workspace(db(ctx), account_id, &input.name, Utc::now())
            .await
            .gql(ctx)?;
        Ok(Workspace(ws))
    }

    async fn create_project(
        &self,
        ctx: &Context<'_>,
        input: CreateProjectInput,
    ) -> Result<Project> {
        let workspace_id = parse_id(ctx, &input.workspace_id, "workspace")?;
        require_workspace(ctx, &caller(ctx)?, workspace_id, WorkspaceAccess::Admin).await?;
        let project =
            accounts::create_project(db(ctx), workspace_id, &input.name, &input.tag, Utc::now())
                .await
                .gql(ctx)?;
        Ok(Project(project))
    }

    async fn add_workspace_member(
        &self,
        ctx: &Context<'_>,
        input: AddWorkspaceMemberInput,
    ) -> Result<WorkspaceMember> {
        let workspace_id = parse_id(ctx, &input.workspace_id, "workspace")?;
        require_workspace(ctx, &caller(ctx)?, workspace_id, WorkspaceAccess::Admin).await?;
        let (user, role) = accounts::add_workspace_member(
            db(ctx),
            workspace_id,
            &input.email,
            input.name.as_deref(),
            input.role.into(),
            Utc::now(),
        )
        .await
        .gql(ctx)?;
        Ok(WorkspaceMember {
            user: User(user),
            role: role.into(),
        })
    }

    async fn create_api_key(
        &self,
        ctx: &Context<'_>,
        input: CreateApiKeyInput,
    ) -> Result<CreateApiKeyPayload> {
        let workspace_id = parse_id(ctx, &input.workspace_id, "workspace")?;
        require_workspace(ctx, &caller(ctx)?, workspace_id, WorkspaceAccess::Admin).await?;
        let project_id = opt_id(ctx, &input.project_id, "project")?;
        let created =
            accounts::create_api_key(db(ctx), workspace_id, &input.name, project_id, Utc::now())
                .await
                .gql(ctx)?;
        Ok(CreateApiKeyPayload {
            api_key: ApiKey(created.api_key),
            secret: created.secret,
        })
    }

    async fn revoke_api_key(&self, ctx: &Context<'_>, id: ID) -> Result<ApiKey> {
        let id = parse_id(ctx, &id, "API key")?;
        let key = api_keys::Entity::find_by_id(id)
            .one(db(ctx))
            .await
            .map_err(BillingError::from)
            .and_then(|k| k.ok_or(BillingError::NotFound("API key")))
            .gql(ctx)?;
        hide_as(
            "API key",
            access::require_workspace(
                db(ctx),
                &caller(ctx)?,
                key.workspace_id,
                WorkspaceAccess::Admin,
            )
            .await,
        )
        .gql(ctx)?;
        let revoked = accounts::revoke_api_key(db(ctx), id, Utc::now())
            .await
            .gql(ctx)?;
        if let Some(cache) = ctx.data_opt::<Arc<crate::credentials::CredentialCache>>() {
            cache.forget_api_key(id);
        }
        Ok(ApiKey(revoked))
    }

    async fn add_payment_method(
        &self,
        ctx: &Context<'_>,
        input: AddPaymentMethodInput,
    ) -> Result<PaymentMethod> {
        let account_id = parse_id(ctx, &input.account_id, "account")?;
        access::require_account_admin(db(ctx), &caller(ctx)?, account_id)
            .await
            .gql(ctx)?;
        let method = billing::payments::cards::add_payment_method(
            db(ctx),
            gateway(ctx).as_ref(),
            account_id,
            &input.token,
            input.make_default.unwrap_or(false),
            Utc::now(),
        )
        .await
        .gql(ctx)?;
        Ok(PaymentMethod(method))
    }

    async fn remove_payment_method(&self, ctx: &Context<'_>, id: ID) -> Result<ID> {
        let method_id = parse_id(ctx, &id, "payment method")?;
        let method = payment_methods::Entity::find_by_id(method_id)
            .one(db(ctx))
            .await
            .map_err(BillingError::from)
            .and_then(|m| m.ok_or(BillingError::NotFound("payment method")))
            .gql(ctx)?;
        hide_as(
            "payment method",
            access::require_account_admin(db(ctx), &caller(ctx)?, method.account_id).await,
        )
        .gql(ctx)?;
        billing::payments::cards::remove_payment_method(db(ctx), method_id, Utc::now())
            .await
            .gql(ctx)?;
        Ok(id)
    }

    /// Creates a PENDING purchase; the worker captures the payment and credits the workspace (or FAILED).
    async fn purchase_credits(
        &self,
        ctx: &Context<'_>,
        input: PurchaseCreditsInput,
    ) -> Result<Purchase> {
        let principal = caller(ctx)?;
        let workspace_id = parse_id(ctx, &input.workspace_id, "workspace")?;
        require_workspace(ctx, &principal, workspace_id, WorkspaceAccess::Admin).await?;
        let item = match (input.package_id, input.amount) {
            (Some(package), None) => PurchaseItem::Package(package.0),
            (None, Some(amount)) => PurchaseItem::Amount(amount.0),
            _ => {
                return Err(BillingError::invalid(
                    "give exactly one of packageId and amount",
                ))
                .gql(ctx);
            }
        };
        let created_by_user_id = match principal {
            Principal::User { user_id, .. } => Some(user_id),
            _ => None,
        };
        let req = PurchaseCreditsRequest {
            workspace_id,
            item,
            payment_method_id: opt_id(ctx, &input.payment_method_id, "payment method")?,
            pay_by_invoice: input.pay_by_invoice.unwrap_or(false),
            idempotency_key: input.idempotency_key,
            created_by_user_id,
        };
        let purchased = billing::payments::purchases::purchase_credits(db(ctx), req, Utc::now())
            .await
            .gql(ctx)?;
        if purchased.purchase.status == billing::entity::enums::PurchaseStatus::Pending
            && let Some(jobs) = ctx.data_opt::<Arc<dyn billing::jobs::JobSink>>()
        {
            let job = billing::jobs::CapturePurchase {
                purchase_id: purchased.purchase.id,
            };
            if let Err(e) = jobs.capture(job).await {
                // Not lost: the purchase row is PENDING and the worker's sweep re-enqueues it.
                tracing::warn!(purchase_id = %purchased.purchase.id, error = %e, "capture job not pushed");
            }
        }
        Ok(Purchase(purchased.purchase))
    }

    /// Debits the usage cost now; INSUFFICIENT_CREDITS or BUDGET_EXCEEDED and nothing recorded when it does not fit.
    async fn record_usage(&self, ctx: &Context<'_>, input: RecordUsageInput) -> Result<UsageEvent> {
        let principal = caller(ctx)?;
        let result = record_one(ctx, &principal, input).await;
        count_debit(ctx, &result);
        result.gql(ctx)
    }

    /// Many usage records in one call, each admitted or refused on its own, in order.
    async fn record_usage_batch(
        &self,
        ctx: &Context<'_>,
        inputs: Vec<RecordUsageInput>,
    ) -> Result<Vec<RecordUsageResult>> {
        let principal = caller(ctx)?;
        if inputs.len() > USAGE_BATCH_MAX {
            return Err(BillingError::LimitExceeded(format!(
                "at most {USAGE_BATCH_MAX} usage records per batch"
            )))
            .gql(ctx);
        }
        // Authorize and parse every item first, then hand the admitted ones to the
        // writer together so that they share one commit; answers keep input order.
        let mut requests = Vec::with_capacity(inputs.len());
        for input in inputs {
            requests.push(usage_request(db(ctx), &principal, input).await);
        }
        let now = Utc::now();
        let mut recorded = match writer(ctx) {
            Some(writer) => {
                let valid = requests
                    .iter()
                    .filter_map(|r| r.as_ref().ok().cloned())
                    .collect();
                writer.record_usage_many(valid, now).await
            }
            None => {
                let mut out = Vec::new();
                for req in requests.iter().filter_map(|r| r.as_ref().ok().cloned()) {
                    out.push(usage::record_usage(db(ctx), req, now).await);
                }
                out
            }
        }
        .into_iter();
        let mut results = Vec::with_capacity(requests.len());
        for request in requests {
            let result = match request {
                Ok(_) => recorded
                    .next()
                    .unwrap_or_else(|| Err(BillingError::Internal("missing batch answer".into())))
                    .map(|r| UsageEvent(r.event)),
                Err(e) => Err(e),
            };
            count_debit(ctx, &result);
            results.push(match result {
                Ok(usage) => RecordUsageResult {
                    usage: Some(usage),
                    error_code: None,
                    error_message: None,
                },
                Err(e) => {
                    let code = e.code();
                    let message = match code {
                        ErrorCode::Internal => {
                            // The whole error goes to the log once; the caller gets the code.
                            crate::error::log_internal(&e, ctx.data_opt());
                            "internal error".to_owned()
                        }
                        _ => e.to_string(),
                    };
                    RecordUsageResult {
                        usage: None,
                        error_code: Some(code.as_str().to_owned()),
                        error_message: Some(message),
                    }
                }
            });
        }
        Ok(results)
    }

    /// Holds the worst-case cost of a request in flight.
    async fn reserve_credits(
        &self,
        ctx: &Context<'_>,
        input: ReserveCreditsInput,
    ) -> Result<Reservation> {
        let principal = caller(ctx)?;
        let who = usage_caller(
            db(ctx),
            &principal,
            opt_id(ctx, &input.workspace_id, "workspace")?,
        )
        .await
        .gql(ctx)?;
        let req = ReserveRequest {
            workspace_id: who.workspace_id,
            project: project_ref(input.project_tag, who.key_project),
            model_id: input.model_id,
            max_prompt_tokens: i64::from(input.max_prompt_tokens),
            max_completion_tokens: i64::from(input.max_completion_tokens),
            request_id: input.request_id,
            ttl_seconds: i64::from(input.ttl_seconds.unwrap_or(600)),
            user_id: who.user_id,
            api_key_id: who.api_key_id,
        };
        let reservation = match writer(ctx) {
            Some(writer) => writer.reserve(req, Utc::now()).await,
            None => reservations::reserve(db(ctx), req, Utc::now()).await,
        };
        Ok(Reservation(reservation.gql(ctx)?))
    }

    /// Debits the actual cost (which may exceed the hold) and frees the hold.
    async fn settle_reservation(
        &self,
        ctx: &Context<'_>,
        input: SettleReservationInput,
    ) -> Result<UsageEvent> {
        let principal = caller(ctx)?;
        let reservation = reservation_for_usage(ctx, &principal, &input.reservation_id).await?;
        let (prompt_tokens, completion_tokens) = (
            i64::from(input.prompt_tokens),
            i64::from(input.completion_tokens),
        );
        let settled = match writer(ctx) {
            Some(writer) => {
                let req = SettleRequest {
                    reservation_id: reservation.id,
                    workspace_id: reservation.workspace_id,
                    prompt_tokens,
                    completion_tokens,
                };
                writer.settle(req, Utc::now()).await
            }
            None => {
                reservations::settle(
                    db(ctx),
                    reservation.id,
                    prompt_tokens,
                    completion_tokens,
                    Utc::now(),
                )
                .await
            }
        };
        Ok(UsageEvent(settled.gql(ctx)?.event))
    }

    async fn release_reservation(&self, ctx: &Context<'_>, id: ID) -> Result<Reservation> {
        let principal = caller(ctx)?;
        let reservation = reservation_for_usage(ctx, &principal, &id).await?;
        let released = match writer(ctx) {
            Some(writer) => {
                writer
                    .release(reservation.workspace_id, reservation.id, Utc::now())
                    .await
            }
            None => reservations::release(db(ctx), reservation.id, Utc::now()).await,
        };
        Ok(Reservation(released.gql(ctx)?))
    }

    /// Instant, fee-free, between workspaces of one account.
    async fn transfer_credits(
        &self,
        ctx: &Context<'_>,
        input: TransferCreditsInput,
    ) -> Result<Transfer> {
        let principal = caller(ctx)?;
        let from = parse_id(ctx, &input.from_workspace_id, "workspace")?;
        let to = parse_id(ctx, &input.to_workspace_id, "workspace")?;
        require_workspace(ctx, &principal, from, WorkspaceAccess::Admin).await?;
        require_workspace(ctx, &principal, to, WorkspaceAccess::Admin).await?;
        let created_by_user_id = match principal {
            Principal::User { user_id, .. } => Some(user_id),
            _ => None,
        };
        let req = transfers::TransferRequest {
            from_workspace_id: from,
            to_workspace_id: to,
            amount: input.amount.0,
            memo: input.memo,
            idempotency_key: input.idempotency_key,
            created_by_user_id,
        };
        Ok(Transfer(
            transfers::transfer(db(ctx), req, Utc::now())
                .await
                .gql(ctx)?
                .transfer,
        ))
    }

    async fn set_project_budget(
        &self,
        ctx: &Context<'_>,
        input: SetProjectBudgetInput,
    ) -> Result<Project> {
        let project_id = parse_id(ctx, &input.project_id, "project")?;
        let project = projects::Entity::find_by_id(project_id)
            .one(db(ctx))
            .await
            .map_err(BillingError::from)
            .and_then(|p| p.ok_or(BillingError::NotFound("project")))
            .gql(ctx)?;
        hide_as(
            "project",
            access::require_workspace(
                db(ctx),
                &caller(ctx)?,
                project.workspace_id,
                WorkspaceAccess::Admin,
            )
            .await,
        )
        .gql(ctx)?;
        let updated = accounts::set_project_budget(
            db(ctx),
            project_id,
            input.limit.map(|l| l.0),
            input.period.unwrap_or(BudgetPeriod::Monthly).into(),
            Utc::now(),
        )
        .await
        .gql(ctx)?;
        Ok(Project(updated))
    }

    async fn configure_auto_reload(
        &self,
        ctx: &Context<'_>,
        input: ConfigureAutoReloadInput,
    ) -> Result<AutoReload> {
        let workspace_id = parse_id(ctx, &input.workspace_id, "workspace")?;
        require_workspace(ctx, &caller(ctx)?, workspace_id, WorkspaceAccess::Admin).await?;
        let req = billing::policies::auto_reload_settings::AutoReloadInput {
            workspace_id,
            enabled: input.enabled,
            threshold: input.threshold.0,
            amount: input.amount.0,
            payment_method_id: opt_id(ctx, &input.payment_method_id, "payment method")?,
            max_reloads_per_day: input
                .max_reloads_per_day
                .unwrap_or(billing::policies::auto_reload_settings::MAX_RELOADS_PER_DAY_DEFAULT),
        };
        Ok(AutoReload(
            billing::policies::auto_reload_settings::configure_auto_reload(db(ctx), req, Utc::now())
                .await
                .gql(ctx)?,
        ))
    }

    async fn set_alert_thresholds(
        &self,
        ctx: &Context<'_>,
        input: SetAlertThresholdsInput,
    ) -> Result<Vec<AlertThreshold>> {
        let workspace_id = parse_id(ctx, &input.workspace_id, "workspace")?;
        require_workspace(ctx, &caller(ctx)?, workspace_id, WorkspaceAccess::Admin).await?;
        let mut thresholds = Vec::with_capacity(input.thresholds.len());
        for t in input.thresholds {
            let recipient_ids = t
                .recipient_ids
                .iter()
                .map(|id| {
                    Uuid::parse_str(id.as_str()).map_err(|_| {
                        BillingError::invalid(format!(
                            "{} is not a member of the workspace",
                            id.as_str()
                        ))
                    })
                })
                .collect::<billing::Result<Vec<_>>>()
                .gql(ctx)?;
            thresholds.push(billing::policies::alert_thresholds::AlertThresholdInput {
                amount: t.amount.0,
                severity: t.severity.into(),
                recipient_ids,
            });
        }
        let saved = billing::policies::alert_thresholds::set_alert_thresholds(db(ctx), workspace_id, thresholds, Utc::now())
            .await
            .gql(ctx)?;
        Ok(saved
            .into_iter()
            .map(|(threshold, recipients)| AlertThreshold {
                threshold,
                recipients,
            })
            .collect())
    }

    /// Platform admin only: enterprise verification, volume discount and payment terms.
    async fn set_pricing_agreement(
        &self,
        ctx: &Context<'_>,
        input: SetPricingAgreementInput,
    ) -> Result<Account> {
        access::require_platform_admin(&caller(ctx)?).gql(ctx)?;
        let account_id = parse_id(ctx, &input.account_id, "account")?;
        let account = billing::catalog::set_pricing_agreement(
            db(ctx),
            account_id,
            input.verified,
            input.volume_discount_percent.0,
            input.payment_terms_days,
            Utc::now(),
        )
        .await
        .gql(ctx)?;
        Ok(Account(account))
    }

    /// Platform admin only: records payment of an OPEN invoice.
    async fn mark_invoice_paid(&self, ctx: &Context<'_>, id: ID) -> Result<Invoice> {
        access::require_platform_admin(&caller(ctx)?).gql(ctx)?;
        let invoice_id = parse_id(ctx, &id, "invoice")?;
        Ok(Invoice(
            billing::payments::purchases::mark_invoice_paid(db(ctx), invoice_id, Utc::now())
                .await
                .gql(ctx)?,
        ))
    }

    /// Platform admin only: adds or changes a model of the catalog; `active: false` retires it (its history stays).
    async fn upsert_model(&self, ctx: &Context<'_>, input: UpsertModelInput) -> Result<Model> {
        access::require_platform_admin(&caller(ctx)?).gql(ctx)?;
        let model = billing::catalog::upsert_model(
            db(ctx),
            billing::catalog::ModelInput {
                id: input.id,
                name: input.name,
                prompt_price_per_million: input.prompt_price_per_million.0,
                completion_price_per_million: input.completion_price_per_million.0,
                active: input.active,
            },
            Utc::now(),
        )
        .await
        .gql(ctx)?;
        Ok(Model(model))
    }
}
