//! Mutations: parse, authorize, call one `billing` function, shape the result.

use super::types::*;
use super::webhooks::{
    CreateWebhookEndpointInput, WebhookDelivery, WebhookEndpoint, WebhookEndpointSecretPayload,
    events_of,
};
use super::{caller, db, parse_id};
use crate::error::GqlResult;
use crate::scalars::{CreditsScalar, DecimalScalar};
use async_graphql::{Context, ID, InputObject, Object, Result, SimpleObject};
use billing::accounts::access::{self, WorkspaceAccess};
use billing::accounts::auth::Principal;
use billing::debits::writer::DebitWriter;
use billing::debits::{self, ReserveCall, UsageCall};
use billing::payments::PaymentGateway;
use billing::payments::purchases::{PurchaseCreditsRequest, PurchaseItem};
use billing::webhooks::endpoints::{self, NewEndpoint, UrlPolicy};
use billing::{BillingError, ErrorCode, accounts, transfers};
use chrono::Utc;
use std::sync::Arc;
use uuid::Uuid;

/// Largest `recordUsageBatch` (the limit is billing's).
pub use billing::debits::USAGE_BATCH_MAX;

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

/// What a frontend needs to collect a card with Stripe.js: confirm `clientSecret`
/// with `stripe.confirmCardSetup`, then pass the resulting PaymentMethod id to
/// `addPaymentMethod`.
#[derive(SimpleObject)]
pub struct CardSetup {
    /// The SetupIntent (`seti_…`, usage off_session, on the account's Customer).
    pub setup_intent_id: String,
    /// For Stripe.js only; it confirms this one SetupIntent and nothing else.
    pub client_secret: String,
}

#[derive(InputObject)]
pub struct AddPaymentMethodInput {
    pub account_id: ID,
    /// A PaymentMethod id from the gateway's client-side card form (Stripe.js: "pm_…", e.g. from a confirmed startCardSetup) or a legacy token ("tok_visa"); card numbers never reach this server.
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
    /// Idempotency key: the same request id reserves once, and the settlement records its usage under it.
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
    /// Reload when the balance drops below this.
    pub threshold: CreditsScalar,
    /// Credits bought per reload.
    pub amount: CreditsScalar,
    /// Defaults to the account's default payment method.
    pub payment_method_id: Option<ID>,
    #[graphql(default_with = "Some(3)")]
    pub max_reloads_per_day: Option<i32>,
}

#[derive(InputObject)]
pub struct AlertThresholdInput {
    /// The threshold (named `amount` in the contract): alert when the balance falls below it.
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

fn opt_id(ctx: &Context<'_>, id: &Option<ID>, kind: &'static str) -> Result<Option<Uuid>> {
    id.as_ref().map(|id| parse_id(ctx, id, kind)).transpose()
}

/// The process's group-commit writer (absent only in a schema built without a server).
fn writer<'a>(ctx: &Context<'a>) -> Option<&'a DebitWriter> {
    ctx.data_opt::<DebitWriter>()
}

/// Charges `events` usage events to the caller's rate limit (when the server has one).
fn rate_limit(ctx: &Context<'_>, principal: &Principal, events: usize) -> Result<()> {
    match ctx.data_opt::<std::sync::Arc<crate::rate_limit::RateLimiter>>() {
        Some(limiter) => limiter.usage(principal, events).gql(ctx),
        None => Ok(()),
    }
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

impl RecordUsageInput {
    /// The call as sent; billing parses its ids after authorizing the workspace.
    fn call(self) -> UsageCall {
        UsageCall {
            request_id: self.request_id,
            workspace_id: self.workspace_id.map(|id| id.0),
            user_id: self.user_id.map(|id| id.0),
            project_tag: self.project_tag,
            model_id: self.model_id,
            prompt_tokens: i64::from(self.prompt_tokens),
            completion_tokens: i64::from(self.completion_tokens),
        }
    }
}

impl RecordUsageResult {
    /// One item's answer: the usage, or the refusal's code and message (an INTERNAL
    /// error goes to the log once and the caller gets only its code).
    fn new(ctx: &Context<'_>, result: billing::Result<UsageEvent>) -> Self {
        match result {
            Ok(usage) => Self {
                usage: Some(usage),
                error_code: None,
                error_message: None,
            },
            Err(e) => {
                let code = e.code();
                let message = match code {
                    ErrorCode::Internal => {
                        crate::error::log_internal(&e, ctx.data_opt());
                        "internal error".to_owned()
                    }
                    ErrorCode::Unavailable => crate::error::UNAVAILABLE_MESSAGE.to_owned(),
                    _ => e.to_string(),
                };
                Self {
                    usage: None,
                    error_code: Some(code.as_str().to_owned()),
                    error_message: Some(message),
                }
            }
        }
    }
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
        let revoked = accounts::revoke_api_key_as(db(ctx), &caller(ctx)?, id, Utc::now())
            .await
            .gql(ctx)?;
        // This process's credential cache must not keep accepting the key.
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

    /// Starts saving a card for later off-session charges: a SetupIntent on the account's payment-gateway Customer. Confirm its clientSecret with Stripe.js, then call addPaymentMethod with the PaymentMethod id.
    async fn start_card_setup(&self, ctx: &Context<'_>, account_id: ID) -> Result<CardSetup> {
        let account_id = parse_id(ctx, &account_id, "account")?;
        access::require_account_admin(db(ctx), &caller(ctx)?, account_id)
            .await
            .gql(ctx)?;
        let setup =
            billing::payments::cards::start_card_setup(db(ctx), gateway(ctx).as_ref(), account_id)
                .await
                .gql(ctx)?;
        Ok(CardSetup {
            setup_intent_id: setup.setup_intent_id,
            client_secret: setup.client_secret,
        })
    }

    async fn remove_payment_method(&self, ctx: &Context<'_>, id: ID) -> Result<ID> {
        let method_id = parse_id(ctx, &id, "payment method")?;
        billing::payments::cards::remove_payment_method_as(
            db(ctx),
            gateway(ctx).as_ref(),
            &caller(ctx)?,
            method_id,
            Utc::now(),
        )
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
        let req = PurchaseCreditsRequest {
            workspace_id,
            item,
            payment_method_id: opt_id(ctx, &input.payment_method_id, "payment method")?,
            pay_by_invoice: input.pay_by_invoice.unwrap_or(false),
            idempotency_key: input.idempotency_key,
            created_by_user_id: principal.user_id(),
        };
        let jobs = ctx
            .data_opt::<Arc<dyn billing::jobs::JobSink>>()
            .map(AsRef::as_ref);
        let purchased = billing::payments::purchases::buy_credits(db(ctx), jobs, req, Utc::now())
            .await
            .gql(ctx)?;
        Ok(Purchase(purchased.purchase))
    }

    /// Debits the usage cost now; INSUFFICIENT_CREDITS or BUDGET_EXCEEDED and nothing recorded when it does not fit.
    async fn record_usage(&self, ctx: &Context<'_>, input: RecordUsageInput) -> Result<UsageEvent> {
        let principal = caller(ctx)?;
        rate_limit(ctx, &principal, 1)?;
        let recorded =
            debits::record_usage(db(ctx), writer(ctx), &principal, input.call(), Utc::now())
                .await
                .map(|r| UsageEvent(r.event));
        count_debit(ctx, &recorded);
        recorded.gql(ctx)
    }

    /// Many usage records in one call, each admitted or refused on its own, in order.
    async fn record_usage_batch(
        &self,
        ctx: &Context<'_>,
        inputs: Vec<RecordUsageInput>,
    ) -> Result<Vec<RecordUsageResult>> {
        let principal = caller(ctx)?;
        rate_limit(ctx, &principal, inputs.len())?;
        let calls = inputs.into_iter().map(RecordUsageInput::call).collect();
        let answers =
            debits::record_usage_batch(db(ctx), writer(ctx), &principal, calls, Utc::now())
                .await
                .gql(ctx)?;
        Ok(answers
            .into_iter()
            .map(|answer| {
                let answer = answer.map(|r| UsageEvent(r.event));
                count_debit(ctx, &answer);
                RecordUsageResult::new(ctx, answer)
            })
            .collect())
    }

    /// Reserves the worst-case cost of a request in flight: a HELD reservation whose amount counts as reserved credits until it is settled, released or expires.
    async fn reserve_credits(
        &self,
        ctx: &Context<'_>,
        input: ReserveCreditsInput,
    ) -> Result<Reservation> {
        let principal = caller(ctx)?;
        rate_limit(ctx, &principal, 1)?;
        let call = ReserveCall {
            request_id: input.request_id,
            ttl_seconds: i64::from(input.ttl_seconds.unwrap_or(600)),
            workspace_id: input.workspace_id.map(|id| id.0),
            project_tag: input.project_tag,
            model_id: input.model_id,
            max_prompt_tokens: i64::from(input.max_prompt_tokens),
            max_completion_tokens: i64::from(input.max_completion_tokens),
        };
        let reservation = debits::reserve(db(ctx), writer(ctx), &principal, call, Utc::now())
            .await
            .gql(ctx)?;
        Ok(Reservation(reservation))
    }

    /// Debits the actual cost (which may exceed the reserved amount) and frees the reservation's reserved credits.
    async fn settle_reservation(
        &self,
        ctx: &Context<'_>,
        input: SettleReservationInput,
    ) -> Result<UsageEvent> {
        let principal = caller(ctx)?;
        rate_limit(ctx, &principal, 1)?;
        let id = parse_id(ctx, &input.reservation_id, "reservation")?;
        let settled = debits::settle(
            db(ctx),
            writer(ctx),
            &principal,
            id,
            i64::from(input.prompt_tokens),
            i64::from(input.completion_tokens),
            Utc::now(),
        )
        .await
        .gql(ctx)?;
        Ok(UsageEvent(settled.event))
    }

    /// Frees the reservation's reserved credits without a charge; idempotent.
    async fn release_reservation(&self, ctx: &Context<'_>, id: ID) -> Result<Reservation> {
        let principal = caller(ctx)?;
        let id = parse_id(ctx, &id, "reservation")?;
        let released = debits::release(db(ctx), writer(ctx), &principal, id, Utc::now())
            .await
            .gql(ctx)?;
        Ok(Reservation(released))
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
        let req = transfers::TransferRequest {
            from_workspace_id: from,
            to_workspace_id: to,
            amount: input.amount.0,
            memo: input.memo,
            idempotency_key: input.idempotency_key,
            created_by_user_id: principal.user_id(),
        };
        let jobs = ctx
            .data_opt::<Arc<dyn billing::jobs::JobSink>>()
            .map(AsRef::as_ref);
        Ok(Transfer(
            transfers::transfer_credits(db(ctx), jobs, req, Utc::now())
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
        let updated = accounts::set_project_budget_as(
            db(ctx),
            &caller(ctx)?,
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
            billing::policies::auto_reload_settings::configure_auto_reload(
                db(ctx),
                req,
                Utc::now(),
            )
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
        let saved = billing::policies::alert_thresholds::set_alert_thresholds(
            db(ctx),
            workspace_id,
            thresholds,
            Utc::now(),
        )
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
        let jobs = ctx.data_opt::<Arc<dyn billing::jobs::JobSink>>();
        Ok(Invoice(
            billing::payments::purchases::pay_invoice(
                db(ctx),
                jobs.map(|j| j.as_ref()),
                invoice_id,
                Utc::now(),
            )
            .await
            .gql(ctx)?,
        ))
    }

    /// Account OWNER/ADMIN: registers a webhook endpoint; its signing secret is in
    /// this answer only.
    async fn create_webhook_endpoint(
        &self,
        ctx: &Context<'_>,
        input: CreateWebhookEndpointInput,
    ) -> Result<WebhookEndpointSecretPayload> {
        let new = NewEndpoint {
            account_id: parse_id(ctx, &input.account_id, "account")?,
            url: input.url,
            events: events_of(input.events),
        };
        let policy = ctx.data_opt::<UrlPolicy>().copied().unwrap_or_default();
        let created = endpoints::create_endpoint(db(ctx), &caller(ctx)?, policy, new, Utc::now())
            .await
            .gql(ctx)?;
        Ok(WebhookEndpointSecretPayload {
            endpoint: created.endpoint.into(),
            secret: created.secret,
        })
    }

    /// Account OWNER/ADMIN: stops (`false`) or resumes (`true`) deliveries to an endpoint.
    async fn set_webhook_endpoint_enabled(
        &self,
        ctx: &Context<'_>,
        id: ID,
        enabled: bool,
    ) -> Result<WebhookEndpoint> {
        let id = parse_id(ctx, &id, "webhook endpoint")?;
        let endpoint = endpoints::set_enabled(db(ctx), &caller(ctx)?, id, enabled, Utc::now())
            .await
            .gql(ctx)?;
        Ok(endpoint.into())
    }

    /// Account OWNER/ADMIN: deletes an endpoint and its deliveries; returns its id.
    async fn delete_webhook_endpoint(&self, ctx: &Context<'_>, id: ID) -> Result<ID> {
        let id = parse_id(ctx, &id, "webhook endpoint")?;
        let deleted = endpoints::delete_endpoint(db(ctx), &caller(ctx)?, id)
            .await
            .gql(ctx)?;
        Ok(ID(deleted.to_string()))
    }

    /// Account OWNER/ADMIN: replaces an endpoint's signing secret at once; the new
    /// secret is in this answer only.
    async fn rotate_webhook_secret(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> Result<WebhookEndpointSecretPayload> {
        let id = parse_id(ctx, &id, "webhook endpoint")?;
        let rotated = endpoints::rotate_secret(db(ctx), &caller(ctx)?, id, Utc::now())
            .await
            .gql(ctx)?;
        Ok(WebhookEndpointSecretPayload {
            endpoint: rotated.endpoint.into(),
            secret: rotated.secret,
        })
    }

    /// Account OWNER/ADMIN: attempts a DEAD delivery again, with a fresh attempt budget.
    async fn retry_webhook_delivery(&self, ctx: &Context<'_>, id: ID) -> Result<WebhookDelivery> {
        let id = parse_id(ctx, &id, "webhook delivery")?;
        let jobs = ctx.data_opt::<Arc<dyn billing::jobs::JobSink>>();
        let delivery = billing::webhooks::delivery::retry_dead(
            db(ctx),
            jobs.map(|j| j.as_ref()),
            &caller(ctx)?,
            id,
            Utc::now(),
        )
        .await
        .gql(ctx)?;
        Ok(delivery.into())
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
