//! Output types: wrappers over domain rows that decide what the API shows, and who
//! may see it. Relations go through the request's DataLoaders.

use super::loaders::{LazyLoaders, LoadError, Loaders};
use super::{caller, credits, db};
use crate::error::{GqlResult, to_gql};
use crate::scalars::{BigInt, CreditsScalar, DecimalScalar};
use async_graphql::dataloader::{DataLoader, Loader};
use async_graphql::{Context, Enum, ID, Object, Result, SimpleObject};
use billing::accounts::access::{self, WorkspaceAccess};
use billing::accounts::auth::Principal;
use billing::debits::budget;
use billing::entity::{
    accounts, alert_thresholds, api_keys, auto_reload_settings, credit_packages, invoice_lines,
    invoices, ledger_entries, models, payment_methods, projects, purchases, reservations,
    transfers, usage_events, users, workspaces,
};
use billing::reports::analytics::{
    self, ReportRequest, UsageDimension as Dim, UsageReport as Report, UsageRow as Row, UsageScope,
};
use billing::reports::history::{Page, PageRequest};
use billing::{BillingError, Credits, DiscountBps};
use chrono::{DateTime, Utc};
use std::hash::Hash;
use std::sync::Arc;
use uuid::Uuid;

// --- enums (the contract's names; same values as the database) --------------------

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "billing::entity::enums::AccountRole")]
pub enum AccountRole {
    Owner,
    Admin,
    Member,
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "billing::entity::enums::WorkspaceRole")]
pub enum WorkspaceRole {
    Admin,
    Member,
    Viewer,
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "billing::entity::enums::BudgetPeriod")]
pub enum BudgetPeriod {
    Daily,
    Weekly,
    Monthly,
    Lifetime,
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "billing::entity::enums::CardBrand")]
pub enum CardBrand {
    Visa,
    Mastercard,
    Amex,
    Discover,
    Other,
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "billing::entity::enums::PurchaseStatus")]
pub enum PurchaseStatus {
    Pending,
    Succeeded,
    Failed,
    /// The card's bank asked the cardholder to authenticate (3-D Secure) and nobody was there: nothing charged or credited, never retried; the admins were e-mailed what to do (see failureReason).
    RequiresAction,
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "billing::entity::enums::PurchaseSource")]
pub enum PurchaseSource {
    Manual,
    AutoReload,
    Invoice,
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "billing::entity::enums::InvoiceStatus")]
pub enum InvoiceStatus {
    Open,
    Paid,
    Void,
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "billing::entity::enums::LedgerEntryKind")]
pub enum LedgerEntryKind {
    Purchase,
    Bonus,
    Usage,
    TransferIn,
    TransferOut,
    Adjustment,
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "billing::entity::enums::ReservationStatus")]
pub enum ReservationStatus {
    /// Open: its amount counts towards the workspace's reserved credits.
    Held,
    /// Charged at its actual cost; its reserved credits are freed.
    Settled,
    /// Freed without a charge.
    Released,
    /// Not resolved before `expiresAt`: its reserved credits are freed, and it can still be settled.
    Expired,
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "billing::entity::enums::AutoReloadStatus")]
pub enum AutoReloadStatus {
    Idle,
    Reloading,
    /// Turned off by the system after repeated payment failures; re-enable with configureAutoReload.
    DisabledAfterFailures,
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "billing::entity::enums::AlertSeverity")]
pub enum AlertSeverity {
    Warning,
    Urgent,
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "billing::reports::analytics::UsageDimension")]
pub enum UsageDimension {
    Project,
    Member,
    Model,
    ApiKey,
    Day,
}

// --- helpers -------------------------------------------------------------------------

/// The request's loaders; a subscription event (no per-request loaders) gets fresh ones.
pub(crate) fn loaders(ctx: &Context<'_>) -> Result<Arc<Loaders>> {
    if let Some(l) = ctx.data_opt::<Arc<LazyLoaders>>() {
        return Ok(l.get());
    }
    // No per-request loaders (a subscription's event): fresh ones for this caller.
    // Without a caller, nothing: access never defaults to more than the caller has.
    let principal = caller(ctx)?;
    Ok(Arc::new(Loaders::new(db(ctx), &principal, Utc::now())))
}

/// A loader's error, shared by every key of the failed batch, with its own code.
fn load_err(ctx: &Context<'_>, e: LoadError) -> async_graphql::Error {
    to_gql(e, ctx.data_opt())
}

pub(crate) async fn load_one<K, L>(
    ctx: &Context<'_>,
    loader: &DataLoader<L>,
    key: K,
) -> Result<Option<L::Value>>
where
    K: Send + Sync + Hash + Eq + Clone + 'static,
    L: Loader<K, Error = LoadError>,
{
    loader.load_one(key).await.map_err(|e| load_err(ctx, e))
}

fn id(uuid: Uuid) -> ID {
    ID(uuid.to_string())
}

/// The caller's access to a workspace (batched per request).
pub(crate) async fn workspace_access(
    ctx: &Context<'_>,
    workspace_id: Uuid,
) -> Result<Option<WorkspaceAccess>> {
    let l = loaders(ctx)?;
    Ok(load_one(ctx, &l.workspace_access, workspace_id)
        .await?
        .map(|(_, a)| a))
}

async fn require_workspace_level(
    ctx: &Context<'_>,
    workspace_id: Uuid,
    needed: WorkspaceAccess,
) -> Result<()> {
    let level = workspace_access(ctx, workspace_id).await?;
    access::require_level(level, needed).gql(ctx)
}

/// API keys act on their workspace's usage only: nothing about people or the account.
fn refuse_api_key(ctx: &Context<'_>) -> Result<()> {
    access::forbid_api_key(&caller(ctx)?).gql(ctx)
}

/// Whether the caller may see people (users, members): not an API key.
fn sees_people(ctx: &Context<'_>) -> Result<bool> {
    Ok(access::may_see_people(&caller(ctx)?))
}

/// OWNER/ADMIN of the account, or the platform admin.
async fn require_account_admin(ctx: &Context<'_>, account_id: Uuid) -> Result<()> {
    let principal = caller(ctx)?;
    // Only a user's role is looked up (in the batched members); the platform admin and
    // an API key are decided without a read.
    let members = match principal {
        Principal::User { .. } => {
            let l = loaders(ctx)?;
            load_one(ctx, &l.account_members, account_id)
                .await?
                .unwrap_or_default()
        }
        Principal::PlatformAdmin | Principal::ApiKey { .. } => Vec::new(),
    };
    access::require_account_admin_among(&principal, &members).gql(ctx)
}

/// `first` as given, or the field's default when the client sent null.
fn page_request(
    ctx: &Context<'_>,
    first: Option<i32>,
    default: i32,
    after: Option<String>,
) -> Result<PageRequest> {
    PageRequest::new(first.unwrap_or(default), after).gql(ctx)
}

#[derive(SimpleObject)]
pub struct PageInfo {
    pub has_next_page: bool,
    pub end_cursor: Option<String>,
}

fn page_info<T>(page: &Page<T>) -> PageInfo {
    PageInfo {
        has_next_page: page.has_next_page,
        end_cursor: page.end_cursor().map(str::to_owned),
    }
}

// --- viewer, people -----------------------------------------------------------------

pub struct Viewer(pub Principal);

#[Object]
impl Viewer {
    /// The user behind a user token; null for a workspace API key or the platform admin token.
    async fn user(&self, ctx: &Context<'_>) -> Result<Option<User>> {
        let Principal::User { user_id, .. } = &self.0 else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.users, *user_id).await?.map(User))
    }

    /// The API key behind the call, if the caller is a workspace API key.
    async fn api_key(&self, ctx: &Context<'_>) -> Result<Option<ApiKey>> {
        let Principal::ApiKey { api_key_id, .. } = &self.0 else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.api_keys, *api_key_id).await?.map(ApiKey))
    }

    /// Accounts the caller can see.
    async fn accounts(&self, ctx: &Context<'_>) -> Result<Vec<Account>> {
        if !access::may_see_people(&self.0) {
            return Ok(Vec::new());
        }
        let rows = access::visible_accounts(db(ctx), &self.0).await.gql(ctx)?;
        Ok(rows.into_iter().map(Account).collect())
    }
}

pub struct User(pub users::Model);

#[Object]
impl User {
    async fn id(&self) -> ID {
        id(self.0.id)
    }
    async fn email(&self) -> &str {
        &self.0.email
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
}

#[derive(SimpleObject)]
pub struct AccountMember {
    pub user: User,
    pub role: AccountRole,
}

#[derive(SimpleObject)]
pub struct WorkspaceMember {
    pub user: User,
    pub role: WorkspaceRole,
}

// --- account ------------------------------------------------------------------------

pub struct Account(pub accounts::Model);

#[Object]
impl Account {
    async fn id(&self) -> ID {
        id(self.0.id)
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    /// Verified accounts may buy credits against an invoice with payment terms.
    async fn verified(&self) -> bool {
        self.0.verified
    }
    /// Volume discount applied to every usage cost of this account's workspaces, in percent.
    async fn volume_discount_percent(&self, ctx: &Context<'_>) -> Result<DecimalScalar> {
        DiscountBps::new(self.0.volume_discount_bps)
            .map(DecimalScalar)
            .map_err(|e| BillingError::Internal(e.to_string()))
            .gql(ctx)
    }
    /// Days to pay an invoice-billed purchase.
    async fn payment_terms_days(&self) -> i32 {
        self.0.payment_terms_days
    }
    /// Sum of the balances of all workspaces of the account.
    async fn total_balance(&self, ctx: &Context<'_>) -> Result<CreditsScalar> {
        let l = loaders(ctx)?;
        Ok(CreditsScalar(
            load_one(ctx, &l.account_totals, self.0.id)
                .await?
                .unwrap_or_default(),
        ))
    }
    /// The workspaces the caller can see.
    async fn workspaces(&self, ctx: &Context<'_>) -> Result<Vec<Workspace>> {
        let l = loaders(ctx)?;
        let rows = load_one(ctx, &l.visible_workspaces, self.0.id)
            .await?
            .unwrap_or_default();
        Ok(rows.into_iter().map(Workspace).collect())
    }
    async fn members(&self, ctx: &Context<'_>) -> Result<Vec<AccountMember>> {
        let l = loaders(ctx)?;
        let rows = load_one(ctx, &l.account_members, self.0.id)
            .await?
            .unwrap_or_default();
        Ok(rows
            .into_iter()
            .map(|(user, role)| AccountMember {
                user: User(user),
                role: role.into(),
            })
            .collect())
    }
    /// Cards on file (OWNER/ADMIN).
    async fn payment_methods(&self, ctx: &Context<'_>) -> Result<Vec<PaymentMethod>> {
        require_account_admin(ctx, self.0.id).await?;
        let rows = billing::payments::cards::list_payment_methods(db(ctx), &[self.0.id])
            .await
            .gql(ctx)?;
        Ok(rows.into_values().flatten().map(PaymentMethod).collect())
    }
    /// Webhook endpoints, oldest first (OWNER/ADMIN); never with their secrets.
    async fn webhook_endpoints(
        &self,
        ctx: &Context<'_>,
    ) -> Result<Vec<super::webhooks::WebhookEndpoint>> {
        let endpoints =
            billing::webhooks::endpoints::list_endpoints(db(ctx), &caller(ctx)?, self.0.id)
                .await
                .gql(ctx)?;
        Ok(endpoints.into_iter().map(Into::into).collect())
    }
    /// Invoices, newest first (OWNER/ADMIN).
    async fn invoices(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 20)] first: Option<i32>,
        after: Option<String>,
    ) -> Result<InvoiceConnection> {
        require_account_admin(ctx, self.0.id).await?;
        let page = billing::reports::history::invoices_page(
            db(ctx),
            self.0.id,
            &page_request(ctx, first, 20, after)?,
        )
        .await
        .gql(ctx)?;
        Ok(InvoiceConnection {
            page_info: page_info(&page),
            edges: page
                .rows
                .into_iter()
                .map(|(cursor, node)| InvoiceEdge {
                    cursor,
                    node: Invoice(node),
                })
                .collect(),
        })
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

// --- workspace ----------------------------------------------------------------------

pub struct Workspace(pub workspaces::Model);

#[Object]
impl Workspace {
    async fn id(&self) -> ID {
        id(self.0.id)
    }
    async fn account(&self, ctx: &Context<'_>) -> Result<Account> {
        refuse_api_key(ctx)?;
        let l = loaders(ctx)?;
        load_one(ctx, &l.accounts, self.0.account_id)
            .await?
            .map(Account)
            .ok_or(BillingError::NotFound("account"))
            .gql(ctx)
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    /// Credits in the pool, including the reserved credits of open (HELD) reservations.
    async fn balance(&self) -> CreditsScalar {
        credits(self.0.balance_nanos)
    }
    /// Reserved credits: the sum of the amounts of the workspace's open (HELD) reservations.
    async fn reserved(&self) -> CreditsScalar {
        credits(self.0.reserved_nanos)
    }
    /// balance - reserved: what new usage can draw on.
    async fn available(&self) -> CreditsScalar {
        CreditsScalar(billing::ledger::available(&self.0))
    }
    async fn projects(&self, ctx: &Context<'_>) -> Result<Vec<Project>> {
        let l = loaders(ctx)?;
        let rows = load_one(ctx, &l.projects_by_workspace, self.0.id)
            .await?
            .unwrap_or_default();
        Ok(rows.into_iter().map(Project).collect())
    }
    async fn members(&self, ctx: &Context<'_>) -> Result<Vec<WorkspaceMember>> {
        refuse_api_key(ctx)?;
        let l = loaders(ctx)?;
        let rows = load_one(ctx, &l.workspace_members, self.0.id)
            .await?
            .unwrap_or_default();
        Ok(rows
            .into_iter()
            .map(|(user, role)| WorkspaceMember {
                user: User(user),
                role: role.into(),
            })
            .collect())
    }
    /// The workspace's API keys (workspace ADMIN).
    async fn api_keys(&self, ctx: &Context<'_>) -> Result<Vec<ApiKey>> {
        require_workspace_level(ctx, self.0.id, WorkspaceAccess::Admin).await?;
        let l = loaders(ctx)?;
        let rows = load_one(ctx, &l.api_keys_by_workspace, self.0.id)
            .await?
            .unwrap_or_default();
        Ok(rows.into_iter().map(ApiKey).collect())
    }
    async fn auto_reload(&self, ctx: &Context<'_>) -> Result<AutoReload> {
        refuse_api_key(ctx)?;
        let mut rows =
            billing::policies::auto_reload_settings::auto_reload_for(db(ctx), &[self.0.id])
                .await
                .gql(ctx)?;
        rows.remove(&self.0.id)
            .map(AutoReload)
            .ok_or(BillingError::NotFound("workspace"))
            .gql(ctx)
    }
    async fn alert_thresholds(&self, ctx: &Context<'_>) -> Result<Vec<AlertThreshold>> {
        refuse_api_key(ctx)?;
        let mut rows =
            billing::policies::alert_thresholds::alert_thresholds_for(db(ctx), &[self.0.id])
                .await
                .gql(ctx)?;
        Ok(rows
            .remove(&self.0.id)
            .unwrap_or_default()
            .into_iter()
            .map(|(threshold, recipients)| AlertThreshold {
                threshold,
                recipients,
            })
            .collect())
    }
    /// Burn rate and projected depletion.
    async fn spend(&self) -> SpendSummary {
        SpendSummary {
            workspace_id: self.0.id,
            balance: Credits::from_nanos(self.0.balance_nanos),
        }
    }
    /// Usage in [from, to), optionally broken down.
    async fn usage(
        &self,
        ctx: &Context<'_>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        #[graphql(default_with = "Some(Vec::new())")] group_by: Option<Vec<UsageDimension>>,
    ) -> Result<UsageReport> {
        usage_report(
            ctx,
            UsageScope::Workspace(self.0.id),
            from,
            to,
            group_by.unwrap_or_default(),
        )
        .await
    }
    /// The workspace's ledger, newest first.
    async fn ledger(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 50)] first: Option<i32>,
        after: Option<String>,
    ) -> Result<LedgerEntryConnection> {
        refuse_api_key(ctx)?;
        let page = billing::reports::history::ledger_page(
            db(ctx),
            self.0.id,
            &page_request(ctx, first, 50, after)?,
        )
        .await
        .gql(ctx)?;
        Ok(LedgerEntryConnection {
            page_info: page_info(&page),
            edges: page
                .rows
                .into_iter()
                .map(|(cursor, node)| LedgerEntryEdge {
                    cursor,
                    node: LedgerEntry(node),
                })
                .collect(),
        })
    }
    async fn purchases(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 20)] first: Option<i32>,
        after: Option<String>,
    ) -> Result<PurchaseConnection> {
        refuse_api_key(ctx)?;
        let page = billing::reports::history::purchases_page(
            db(ctx),
            self.0.id,
            &page_request(ctx, first, 20, after)?,
        )
        .await
        .gql(ctx)?;
        Ok(PurchaseConnection {
            page_info: page_info(&page),
            edges: page
                .rows
                .into_iter()
                .map(|(cursor, node)| PurchaseEdge {
                    cursor,
                    node: Purchase(node),
                })
                .collect(),
        })
    }
    async fn transfers(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 20)] first: Option<i32>,
        after: Option<String>,
    ) -> Result<TransferConnection> {
        refuse_api_key(ctx)?;
        let page = billing::reports::history::transfers_page(
            db(ctx),
            self.0.id,
            &page_request(ctx, first, 20, after)?,
        )
        .await
        .gql(ctx)?;
        Ok(TransferConnection {
            page_info: page_info(&page),
            edges: page
                .rows
                .into_iter()
                .map(|(cursor, node)| TransferEdge {
                    cursor,
                    node: Transfer(node),
                })
                .collect(),
        })
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

async fn workspace_by_id(ctx: &Context<'_>, workspace_id: Uuid) -> Result<Workspace> {
    let l = loaders(ctx)?;
    load_one(ctx, &l.workspace_access, workspace_id)
        .await?
        .map(|(ws, _)| Workspace(ws))
        .ok_or(BillingError::NotFound("workspace"))
        .gql(ctx)
}

async fn usage_report(
    ctx: &Context<'_>,
    scope: UsageScope,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    group_by: Vec<UsageDimension>,
) -> Result<UsageReport> {
    let mut group_by: Vec<Dim> = group_by.into_iter().map(Into::into).collect();
    group_by.dedup();
    let l = loaders(ctx)?;
    let report = load_one(
        ctx,
        &l.usage,
        ReportRequest {
            scope,
            from,
            to,
            group_by,
        },
    )
    .await?
    .unwrap_or_default();
    Ok(UsageReport(report))
}

// --- projects and budgets -----------------------------------------------------------

pub struct Project(pub projects::Model);

#[Object]
impl Project {
    async fn id(&self) -> ID {
        id(self.0.id)
    }
    async fn workspace(&self, ctx: &Context<'_>) -> Result<Workspace> {
        workspace_by_id(ctx, self.0.workspace_id).await
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    /// The identifier usage is tagged with; unique within its workspace.
    async fn tag(&self) -> &str {
        &self.0.tag
    }
    /// Null when the project has no spending cap.
    async fn budget(&self) -> Option<ProjectBudget> {
        budget::budget_status(&self.0, Utc::now()).map(ProjectBudget)
    }
    async fn usage(
        &self,
        ctx: &Context<'_>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        #[graphql(default_with = "Some(Vec::new())")] group_by: Option<Vec<UsageDimension>>,
    ) -> Result<UsageReport> {
        usage_report(
            ctx,
            UsageScope::Project(self.0.id),
            from,
            to,
            group_by.unwrap_or_default(),
        )
        .await
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

pub struct ProjectBudget(pub budget::BudgetStatus);

#[Object]
impl ProjectBudget {
    async fn limit(&self) -> CreditsScalar {
        CreditsScalar(self.0.limit)
    }
    async fn period(&self) -> BudgetPeriod {
        self.0.period.into()
    }
    /// Spent in the current period.
    async fn spent(&self) -> CreditsScalar {
        CreditsScalar(self.0.spent)
    }
    async fn remaining(&self) -> CreditsScalar {
        CreditsScalar(self.0.remaining)
    }
    async fn period_start(&self) -> DateTime<Utc> {
        self.0.period_start
    }
    /// Null for LIFETIME.
    async fn resets_at(&self) -> Option<DateTime<Utc>> {
        self.0.resets_at
    }
}

// --- catalog ------------------------------------------------------------------------

pub struct Model(pub models::Model);

#[Object]
impl Model {
    /// e.g. "openai/gpt-4o".
    async fn id(&self) -> &str {
        &self.0.id
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn prompt_price_per_million(&self) -> CreditsScalar {
        credits(self.0.prompt_price_per_million_nanos)
    }
    async fn completion_price_per_million(&self) -> CreditsScalar {
        credits(self.0.completion_price_per_million_nanos)
    }
    async fn active(&self) -> bool {
        self.0.active
    }
}

pub struct CreditPackage(pub credit_packages::Model);

#[Object]
impl CreditPackage {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    /// Credits bought.
    async fn amount(&self) -> CreditsScalar {
        credits(self.0.amount_nanos)
    }
    /// Charged to the card, in US dollars.
    async fn price(&self) -> CreditsScalar {
        credits(self.0.price_nanos)
    }
    /// Bonus credits added on top of amount.
    async fn bonus(&self) -> CreditsScalar {
        credits(self.0.bonus_nanos)
    }
}

#[derive(SimpleObject)]
pub struct CostEstimate {
    pub model: Model,
    pub prompt_cost: CreditsScalar,
    pub completion_cost: CreditsScalar,
    /// Volume discount taken off (zero without a workspace).
    pub discount: CreditsScalar,
    pub total: CreditsScalar,
    /// Whether the workspace's available credits and the budget cap allow it now; null without a workspace.
    pub affordable: Option<bool>,
}

// --- payments -----------------------------------------------------------------------

pub struct PaymentMethod(pub payment_methods::Model);

#[Object]
impl PaymentMethod {
    async fn id(&self) -> ID {
        id(self.0.id)
    }
    async fn brand(&self) -> CardBrand {
        self.0.brand.into()
    }
    async fn last4(&self) -> &str {
        &self.0.last4
    }
    async fn exp_month(&self) -> i32 {
        self.0.exp_month
    }
    async fn exp_year(&self) -> i32 {
        self.0.exp_year
    }
    async fn is_default(&self) -> bool {
        self.0.is_default
    }
}

pub struct Purchase(pub purchases::Model);

#[Object]
impl Purchase {
    async fn id(&self) -> ID {
        id(self.0.id)
    }
    async fn workspace(&self, ctx: &Context<'_>) -> Result<Workspace> {
        workspace_by_id(ctx, self.0.workspace_id).await
    }
    /// Credits bought.
    async fn amount(&self) -> CreditsScalar {
        credits(self.0.amount_nanos)
    }
    async fn bonus(&self) -> CreditsScalar {
        credits(self.0.bonus_nanos)
    }
    /// Charged, in US dollars.
    async fn price(&self) -> CreditsScalar {
        credits(self.0.price_nanos)
    }
    async fn status(&self) -> PurchaseStatus {
        self.0.status.into()
    }
    async fn source(&self) -> PurchaseSource {
        self.0.source.into()
    }
    async fn payment_method(&self, ctx: &Context<'_>) -> Result<Option<PaymentMethod>> {
        let Some(pm) = self.0.payment_method_id else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.payment_methods, pm)
            .await?
            .map(PaymentMethod))
    }
    async fn failure_reason(&self) -> Option<&str> {
        self.0.failure_reason.as_deref()
    }
    async fn invoice(&self, ctx: &Context<'_>) -> Result<Option<Invoice>> {
        let Some(invoice_id) = self.0.invoice_id else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.invoices, invoice_id).await?.map(Invoice))
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    async fn completed_at(&self) -> Option<DateTime<Utc>> {
        self.0.completed_at
    }
    /// When the cardholder disputed the charge (a chargeback), if they did. Account OWNER/ADMIN only.
    async fn disputed_at(&self, ctx: &Context<'_>) -> Result<Option<DateTime<Utc>>> {
        self.require_account_admin(ctx).await?;
        Ok(self.0.disputed_at)
    }
    /// The card network's reason for the dispute (e.g. "fraudulent"). Account OWNER/ADMIN only.
    async fn dispute_reason(&self, ctx: &Context<'_>) -> Result<Option<&str>> {
        self.require_account_admin(ctx).await?;
        Ok(self.0.dispute_reason.as_deref())
    }
}

impl Purchase {
    async fn require_account_admin(&self, ctx: &Context<'_>) -> Result<()> {
        let ws = workspace_by_id(ctx, self.0.workspace_id).await?;
        require_account_admin(ctx, ws.0.account_id).await
    }
}

#[derive(SimpleObject)]
pub struct InvoiceLine {
    pub description: String,
    pub amount: CreditsScalar,
}

pub struct Invoice(pub invoices::Model);

#[Object]
impl Invoice {
    async fn id(&self) -> ID {
        id(self.0.id)
    }
    /// Sequential per account, e.g. "INV-000042".
    async fn number(&self) -> &str {
        &self.0.number
    }
    async fn account(&self, ctx: &Context<'_>) -> Result<Account> {
        let l = loaders(ctx)?;
        load_one(ctx, &l.accounts, self.0.account_id)
            .await?
            .map(Account)
            .ok_or(BillingError::NotFound("account"))
            .gql(ctx)
    }
    async fn purchase(&self, ctx: &Context<'_>) -> Result<Option<Purchase>> {
        let Some(purchase_id) = self.0.purchase_id else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.purchases, purchase_id)
            .await?
            .map(Purchase))
    }
    async fn lines(&self, ctx: &Context<'_>) -> Result<Vec<InvoiceLine>> {
        let l = loaders(ctx)?;
        let rows: Vec<invoice_lines::Model> = load_one(ctx, &l.lines_by_invoice, self.0.id)
            .await?
            .unwrap_or_default();
        Ok(rows
            .into_iter()
            .map(|line| InvoiceLine {
                description: line.description,
                amount: credits(line.amount_nanos),
            })
            .collect())
    }
    async fn total(&self) -> CreditsScalar {
        credits(self.0.total_nanos)
    }
    async fn status(&self) -> InvoiceStatus {
        self.0.status.into()
    }
    async fn issued_at(&self) -> DateTime<Utc> {
        self.0.issued_at
    }
    async fn due_at(&self) -> Option<DateTime<Utc>> {
        self.0.due_at
    }
    async fn paid_at(&self) -> Option<DateTime<Utc>> {
        self.0.paid_at
    }
}

// --- ledger, usage, reservations, transfers ------------------------------------------

pub struct LedgerEntry(pub ledger_entries::Model);

#[Object]
impl LedgerEntry {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn kind(&self) -> LedgerEntryKind {
        self.0.kind.into()
    }
    /// Signed: positive adds credits, negative takes them.
    async fn amount(&self) -> CreditsScalar {
        credits(self.0.amount_nanos)
    }
    async fn balance_after(&self) -> CreditsScalar {
        credits(self.0.balance_after_nanos.unwrap_or_default())
    }
    async fn description(&self) -> &str {
        &self.0.description
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    /// The usage event of a USAGE entry that posts one event. An entry that posts a
    /// debit batch's events of its workspace (description "usage of N requests") has
    /// none here: see `usageEvents`.
    async fn usage(&self, ctx: &Context<'_>) -> Result<Option<UsageEvent>> {
        let tx = ledger_transaction(ctx, self.0.transaction_id).await?;
        let Some(event_id) = tx.and_then(|t| t.usage_event_id) else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.usage_events, event_id)
            .await?
            .map(UsageEvent))
    }
    /// Every usage event a USAGE entry posts, in the order they were recorded (empty for
    /// other kinds). Its `amount` is their cost (less shortfall, on the workspace's entry).
    async fn usage_events(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 50)] first: Option<i32>,
        after: Option<String>,
    ) -> Result<UsageEventConnection> {
        let page = page_request(ctx, first, 50, after)?;
        let page =
            billing::reports::history::posted_usage_page(db(ctx), self.0.transaction_id, &page)
                .await
                .gql(ctx)?;
        Ok(UsageEventConnection {
            page_info: page_info(&page),
            edges: page
                .rows
                .into_iter()
                .map(|(cursor, node)| UsageEventEdge {
                    cursor,
                    node: UsageEvent(node),
                })
                .collect(),
        })
    }
    async fn purchase(&self, ctx: &Context<'_>) -> Result<Option<Purchase>> {
        let tx = ledger_transaction(ctx, self.0.transaction_id).await?;
        let Some(purchase_id) = tx.and_then(|t| t.purchase_id) else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.purchases, purchase_id)
            .await?
            .map(Purchase))
    }
    async fn transfer(&self, ctx: &Context<'_>) -> Result<Option<Transfer>> {
        let tx = ledger_transaction(ctx, self.0.transaction_id).await?;
        let Some(transfer_id) = tx.and_then(|t| t.transfer_id) else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.transfers, transfer_id)
            .await?
            .map(Transfer))
    }
}

async fn ledger_transaction(
    ctx: &Context<'_>,
    id: i64,
) -> Result<Option<billing::entity::ledger_transactions::Model>> {
    let l = loaders(ctx)?;
    load_one(ctx, &l.ledger_transactions, id).await
}

pub struct UsageEvent(pub usage_events::Model);

#[Object]
impl UsageEvent {
    async fn id(&self) -> ID {
        id(self.0.id)
    }
    /// The caller's request id, the usage idempotency key: recording the same request id twice records it once.
    async fn request_id(&self) -> &str {
        &self.0.request_id
    }
    async fn model(&self, ctx: &Context<'_>) -> Result<Model> {
        let l = loaders(ctx)?;
        load_one(ctx, &l.models, self.0.model_id.clone())
            .await?
            .map(Model)
            .ok_or(BillingError::NotFound("model"))
            .gql(ctx)
    }
    async fn project(&self, ctx: &Context<'_>) -> Result<Option<Project>> {
        let Some(project_id) = self.0.project_id else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.projects, project_id).await?.map(Project))
    }
    async fn user(&self, ctx: &Context<'_>) -> Result<Option<User>> {
        // People are not an API key's business (as for Workspace.members).
        if !sees_people(ctx)? {
            return Ok(None);
        }
        let Some(user_id) = self.0.user_id else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.users, user_id).await?.map(User))
    }
    async fn api_key(&self, ctx: &Context<'_>) -> Result<Option<ApiKey>> {
        let Some(key_id) = self.0.api_key_id else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.api_keys, key_id).await?.map(ApiKey))
    }
    async fn prompt_tokens(&self) -> i32 {
        i32::try_from(self.0.prompt_tokens).unwrap_or(i32::MAX)
    }
    async fn completion_tokens(&self) -> i32 {
        i32::try_from(self.0.completion_tokens).unwrap_or(i32::MAX)
    }
    async fn cost(&self) -> CreditsScalar {
        credits(self.0.cost_nanos)
    }
    /// The part of the cost that could not be collected (a settlement above what was left).
    async fn shortfall(&self) -> CreditsScalar {
        credits(self.0.shortfall_nanos)
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

pub struct Reservation(pub reservations::Model);

/// Credits reserved for a request in flight, settled at its actual cost. While its status is HELD, its `amount` counts towards the workspace's `reserved` credits.
#[Object]
impl Reservation {
    async fn id(&self) -> ID {
        id(self.0.id)
    }
    /// The usage idempotency key given to reserveCredits; the settlement's usage event carries it.
    async fn request_id(&self) -> &str {
        &self.0.request_id
    }
    async fn workspace(&self, ctx: &Context<'_>) -> Result<Workspace> {
        workspace_by_id(ctx, self.0.workspace_id).await
    }
    async fn project(&self, ctx: &Context<'_>) -> Result<Option<Project>> {
        let Some(project_id) = self.0.project_id else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.projects, project_id).await?.map(Project))
    }
    /// The reserved credits: the worst-case cost of the request, at the prices when it was reserved.
    async fn amount(&self) -> CreditsScalar {
        credits(self.0.amount_nanos)
    }
    async fn status(&self) -> ReservationStatus {
        self.0.status.into()
    }
    async fn expires_at(&self) -> DateTime<Utc> {
        self.0.expires_at
    }
    async fn usage(&self, ctx: &Context<'_>) -> Result<Option<UsageEvent>> {
        let Some(event_id) = self.0.usage_event_id else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.usage_events, event_id)
            .await?
            .map(UsageEvent))
    }
}

pub struct Transfer(pub transfers::Model);

#[Object]
impl Transfer {
    async fn id(&self) -> ID {
        id(self.0.id)
    }
    async fn from(&self, ctx: &Context<'_>) -> Result<Workspace> {
        workspace_by_id(ctx, self.0.from_workspace_id).await
    }
    async fn to(&self, ctx: &Context<'_>) -> Result<Workspace> {
        workspace_by_id(ctx, self.0.to_workspace_id).await
    }
    async fn amount(&self) -> CreditsScalar {
        credits(self.0.amount_nanos)
    }
    async fn memo(&self) -> Option<&str> {
        self.0.memo.as_deref()
    }
    async fn created_by(&self, ctx: &Context<'_>) -> Result<Option<User>> {
        let Some(user_id) = self.0.created_by_user_id else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.users, user_id).await?.map(User))
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

// --- auto-reload, alerts, spend, usage -----------------------------------------------

pub struct AutoReload(pub auto_reload_settings::Model);

#[Object]
impl AutoReload {
    async fn enabled(&self) -> bool {
        self.0.enabled
    }
    /// Reload when the balance drops below this.
    async fn threshold(&self) -> CreditsScalar {
        credits(self.0.threshold_nanos)
    }
    /// Credits bought per reload.
    async fn amount(&self) -> CreditsScalar {
        credits(self.0.amount_nanos)
    }
    async fn payment_method(&self, ctx: &Context<'_>) -> Result<Option<PaymentMethod>> {
        let Some(pm) = self.0.payment_method_id else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.payment_methods, pm)
            .await?
            .map(PaymentMethod))
    }
    /// Safety cap on successful reloads per rolling 24 hours.
    async fn max_reloads_per_day(&self) -> i32 {
        self.0.max_reloads_per_day
    }
    async fn status(&self) -> AutoReloadStatus {
        self.0.status.into()
    }
    async fn consecutive_failures(&self) -> i32 {
        self.0.consecutive_failures
    }
    async fn last_reload_at(&self) -> Option<DateTime<Utc>> {
        self.0.last_reload_at
    }
    async fn last_failure_reason(&self) -> Option<&str> {
        self.0.last_failure_reason.as_deref()
    }
}

pub struct AlertThreshold {
    pub threshold: alert_thresholds::Model,
    pub recipients: Vec<Uuid>,
}

#[Object]
impl AlertThreshold {
    async fn id(&self) -> ID {
        id(self.threshold.id)
    }
    /// The threshold (named `amount` in the contract): the alert fires when the balance falls below it.
    async fn amount(&self) -> CreditsScalar {
        credits(self.threshold.amount_nanos)
    }
    async fn severity(&self) -> AlertSeverity {
        self.threshold.severity.into()
    }
    async fn recipients(&self, ctx: &Context<'_>) -> Result<Vec<User>> {
        let l = loaders(ctx)?;
        let users = l
            .users
            .load_many(self.recipients.iter().copied())
            .await
            .map_err(|e| load_err(ctx, e))?;
        Ok(self
            .recipients
            .iter()
            .filter_map(|id| users.get(id).cloned())
            .map(User)
            .collect())
    }
    async fn armed(&self) -> bool {
        self.threshold.armed
    }
    async fn last_triggered_at(&self) -> Option<DateTime<Utc>> {
        self.threshold.last_triggered_at
    }
}

pub struct SpendSummary {
    workspace_id: Uuid,
    balance: Credits,
}

/// Trailing window used by projectedDepletionAt.
const DEPLETION_WINDOW_DAYS: i64 = 7;

#[Object]
impl SpendSummary {
    /// Average spend per day over the trailing window.
    async fn average_daily_spend(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 7)] days: Option<i32>,
    ) -> Result<CreditsScalar> {
        let days = days.unwrap_or(7);
        let l = loaders(ctx)?;
        Ok(CreditsScalar(
            load_one(ctx, &l.spend, (self.workspace_id, i64::from(days)))
                .await?
                .unwrap_or_default(),
        ))
    }
    /// When the balance reaches zero at the current burn rate (the last 7 days; ignoring auto-reload); null with no spend.
    async fn projected_depletion_at(&self, ctx: &Context<'_>) -> Result<Option<DateTime<Utc>>> {
        let l = loaders(ctx)?;
        let avg = load_one(ctx, &l.spend, (self.workspace_id, DEPLETION_WINDOW_DAYS))
            .await?
            .unwrap_or_default();
        Ok(analytics::projected_depletion_at(
            self.balance,
            avg,
            Utc::now(),
        ))
    }
}

pub struct UsageRow(pub Row);

#[Object]
impl UsageRow {
    /// Set when grouped by PROJECT.
    async fn project(&self, ctx: &Context<'_>) -> Result<Option<Project>> {
        let Some(project_id) = self.0.project_id else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.projects, project_id).await?.map(Project))
    }
    /// Set when grouped by MEMBER.
    async fn user(&self, ctx: &Context<'_>) -> Result<Option<User>> {
        // People are not an API key's business (as for Workspace.members).
        if !sees_people(ctx)? {
            return Ok(None);
        }
        let Some(user_id) = self.0.user_id else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.users, user_id).await?.map(User))
    }
    /// Set when grouped by MODEL.
    async fn model(&self, ctx: &Context<'_>) -> Result<Option<Model>> {
        let Some(model_id) = self.0.model_id.clone() else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.models, model_id).await?.map(Model))
    }
    /// Set when grouped by API_KEY.
    async fn api_key(&self, ctx: &Context<'_>) -> Result<Option<ApiKey>> {
        let Some(key_id) = self.0.api_key_id else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.api_keys, key_id).await?.map(ApiKey))
    }
    /// Set when grouped by DAY (UTC midnight).
    async fn day(&self) -> Option<DateTime<Utc>> {
        self.0
            .day
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|d| d.and_utc())
    }
    async fn requests(&self) -> BigInt {
        BigInt(self.0.totals.requests)
    }
    async fn prompt_tokens(&self) -> BigInt {
        BigInt(self.0.totals.prompt_tokens)
    }
    async fn completion_tokens(&self) -> BigInt {
        BigInt(self.0.totals.completion_tokens)
    }
    async fn cost(&self) -> CreditsScalar {
        CreditsScalar(self.0.totals.cost)
    }
}

pub struct UsageReport(pub Report);

#[Object]
impl UsageReport {
    async fn requests(&self) -> BigInt {
        BigInt(self.0.totals.requests)
    }
    async fn prompt_tokens(&self) -> BigInt {
        BigInt(self.0.totals.prompt_tokens)
    }
    async fn completion_tokens(&self) -> BigInt {
        BigInt(self.0.totals.completion_tokens)
    }
    async fn cost(&self) -> CreditsScalar {
        CreditsScalar(self.0.totals.cost)
    }
    async fn rows(&self) -> Vec<UsageRow> {
        self.0.rows.iter().cloned().map(UsageRow).collect()
    }
}

pub struct ApiKey(pub api_keys::Model);

#[Object]
impl ApiKey {
    async fn id(&self) -> ID {
        id(self.0.id)
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    /// The first characters of the key, to recognise it.
    async fn prefix(&self) -> &str {
        &self.0.prefix
    }
    async fn workspace(&self, ctx: &Context<'_>) -> Result<Workspace> {
        workspace_by_id(ctx, self.0.workspace_id).await
    }
    /// Usage recorded with this key is tagged with this project when the call names none.
    async fn project(&self, ctx: &Context<'_>) -> Result<Option<Project>> {
        let Some(project_id) = self.0.project_id else {
            return Ok(None);
        };
        let l = loaders(ctx)?;
        Ok(load_one(ctx, &l.projects, project_id).await?.map(Project))
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    async fn last_used_at(&self) -> Option<DateTime<Utc>> {
        self.0.last_used_at
    }
    async fn revoked_at(&self) -> Option<DateTime<Utc>> {
        self.0.revoked_at
    }
}

// --- connections --------------------------------------------------------------------

macro_rules! connection {
    ($conn:ident, $edge:ident, $node:ident) => {
        #[derive(SimpleObject)]
        pub struct $edge {
            pub cursor: String,
            pub node: $node,
        }
        #[derive(SimpleObject)]
        pub struct $conn {
            pub edges: Vec<$edge>,
            pub page_info: PageInfo,
        }
    };
}

connection!(InvoiceConnection, InvoiceEdge, Invoice);
connection!(LedgerEntryConnection, LedgerEntryEdge, LedgerEntry);
connection!(PurchaseConnection, PurchaseEdge, Purchase);
connection!(TransferConnection, TransferEdge, Transfer);
connection!(UsageEventConnection, UsageEventEdge, UsageEvent);
