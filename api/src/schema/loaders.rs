//! DataLoaders: every relation of the schema is fetched in batches, each through one
//! batch function of `billing`, so the number of SQL statements of a request does not
//! grow with the number of rows it returns. One set of loaders is made per request
//! (their caches must not outlive it, and some answer for the request's caller).

use async_graphql::dataloader::{DataLoader, Loader};
use billing::accounts::access::{self, WorkspaceAccess};
use billing::accounts::auth::Principal;
use billing::accounts::lookups;
use billing::entity::enums::{AccountRole, WorkspaceRole};
use billing::entity::{
    accounts, api_keys, invoice_lines, invoices, ledger_transactions, models, payment_methods,
    projects, purchases, transfers, usage_events, users, workspaces,
};
use billing::payments::{cards, purchases as buying};
use billing::reports::analytics::{self, ReportRequest, UsageReport};
use billing::sea_orm::DatabaseConnection;
use billing::{BillingError, Credits};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

/// Loader errors must be cloneable (every key of a failed batch gets one); the shared
/// original keeps its code.
pub type LoadError = Arc<BillingError>;

/// A loader over one batch function of `billing` (`(db, keys)` to rows by key).
macro_rules! batch_loader {
    ($name:ident, $key:ty => $value:ty, $load:path) => {
        pub struct $name(pub DatabaseConnection);
        impl Loader<$key> for $name {
            type Value = $value;
            type Error = LoadError;
            async fn load(&self, keys: &[$key]) -> Result<HashMap<$key, $value>, LoadError> {
                $load(&self.0, keys).await.map_err(Arc::new)
            }
        }
    };
}

batch_loader!(AccountLoader, Uuid => accounts::Model, lookups::accounts_by_ids);
batch_loader!(UserLoader, Uuid => users::Model, lookups::users_by_ids);
batch_loader!(ProjectLoader, Uuid => projects::Model, lookups::projects_by_ids);
batch_loader!(ApiKeyLoader, Uuid => api_keys::Model, lookups::api_keys_by_ids);
batch_loader!(ModelLoader, String => models::Model, billing::catalog::models_by_ids);
batch_loader!(PaymentMethodLoader, Uuid => payment_methods::Model, cards::payment_methods_by_ids);
batch_loader!(PurchaseLoader, Uuid => purchases::Model, buying::purchases_by_ids);
batch_loader!(TransferLoader, Uuid => transfers::Model, billing::transfers::transfers_by_ids);
batch_loader!(InvoiceLoader, Uuid => invoices::Model, buying::invoices_by_ids);
batch_loader!(UsageEventLoader, Uuid => usage_events::Model, billing::debits::usage_events_by_ids);
batch_loader!(
    LedgerTransactionLoader,
    i64 => ledger_transactions::Model,
    billing::ledger::transactions_by_ids
);
batch_loader!(ProjectsByWorkspace, Uuid => Vec<projects::Model>, lookups::projects_by_workspace);
batch_loader!(ApiKeysByWorkspace, Uuid => Vec<api_keys::Model>, lookups::api_keys_by_workspace);
batch_loader!(LinesByInvoice, Uuid => Vec<invoice_lines::Model>, buying::invoice_lines_by_invoice);
batch_loader!(
    WorkspaceMembersLoader,
    Uuid => Vec<(users::Model, WorkspaceRole)>,
    lookups::workspace_members_by_workspace
);
batch_loader!(
    AccountMembersLoader,
    Uuid => Vec<(users::Model, AccountRole)>,
    lookups::account_members_by_account
);
batch_loader!(AccountTotalLoader, Uuid => Credits, billing::ledger::account_totals);
batch_loader!(UsageLoader, ReportRequest => UsageReport, analytics::usage_reports_for);

/// The caller's access to each workspace (absent: not visible to the caller).
pub struct WorkspaceAccessLoader {
    pub db: DatabaseConnection,
    pub principal: Principal,
}

impl Loader<Uuid> for WorkspaceAccessLoader {
    type Value = (workspaces::Model, WorkspaceAccess);
    type Error = LoadError;
    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Self::Value>, Self::Error> {
        access::workspace_access_batch(&self.db, &self.principal, keys)
            .await
            .map_err(Arc::new)
    }
}

/// The workspaces of each account that the caller can see.
pub struct VisibleWorkspacesLoader {
    pub db: DatabaseConnection,
    pub principal: Principal,
}

impl Loader<Uuid> for VisibleWorkspacesLoader {
    type Value = Vec<workspaces::Model>;
    type Error = LoadError;
    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Self::Value>, Self::Error> {
        access::visible_workspaces(&self.db, &self.principal, keys)
            .await
            .map_err(Arc::new)
    }
}

/// Average daily spend of each workspace over a window of days, as of the request.
pub struct SpendLoader {
    pub db: DatabaseConnection,
    pub now: DateTime<Utc>,
}

impl Loader<(Uuid, i64)> for SpendLoader {
    type Value = Credits;
    type Error = LoadError;
    async fn load(
        &self,
        keys: &[(Uuid, i64)],
    ) -> Result<HashMap<(Uuid, i64), Self::Value>, Self::Error> {
        analytics::average_daily_spend_for(&self.db, keys, self.now)
            .await
            .map_err(Arc::new)
    }
}

/// Every loader of one request.
pub struct Loaders {
    pub(crate) accounts: DataLoader<AccountLoader>,
    pub(crate) users: DataLoader<UserLoader>,
    pub(crate) projects: DataLoader<ProjectLoader>,
    pub(crate) api_keys: DataLoader<ApiKeyLoader>,
    pub(crate) models: DataLoader<ModelLoader>,
    pub(crate) payment_methods: DataLoader<PaymentMethodLoader>,
    pub(crate) purchases: DataLoader<PurchaseLoader>,
    pub(crate) transfers: DataLoader<TransferLoader>,
    pub(crate) invoices: DataLoader<InvoiceLoader>,
    pub(crate) usage_events: DataLoader<UsageEventLoader>,
    pub(crate) ledger_transactions: DataLoader<LedgerTransactionLoader>,
    pub(crate) projects_by_workspace: DataLoader<ProjectsByWorkspace>,
    pub(crate) api_keys_by_workspace: DataLoader<ApiKeysByWorkspace>,
    pub(crate) lines_by_invoice: DataLoader<LinesByInvoice>,
    pub(crate) workspace_access: DataLoader<WorkspaceAccessLoader>,
    pub(crate) visible_workspaces: DataLoader<VisibleWorkspacesLoader>,
    pub(crate) workspace_members: DataLoader<WorkspaceMembersLoader>,
    pub(crate) account_members: DataLoader<AccountMembersLoader>,
    pub(crate) account_totals: DataLoader<AccountTotalLoader>,
    pub(crate) usage: DataLoader<UsageLoader>,
    pub(crate) spend: DataLoader<SpendLoader>,
}

/// A request's loaders, built on first use: a `recordUsage` call (the gateway's
/// thousands a second) loads nothing, and building the 21 loaders was a visible part of
/// its CPU (allocations and their drops).
pub struct LazyLoaders {
    db: DatabaseConnection,
    principal: Principal,
    now: DateTime<Utc>,
    built: std::sync::OnceLock<std::sync::Arc<Loaders>>,
}

impl LazyLoaders {
    pub fn new(db: &DatabaseConnection, principal: &Principal, now: DateTime<Utc>) -> Self {
        Self {
            db: db.clone(),
            principal: principal.clone(),
            now,
            built: std::sync::OnceLock::new(),
        }
    }

    /// The request's loaders (the same ones for every resolver of the request).
    pub fn get(&self) -> std::sync::Arc<Loaders> {
        self.built
            .get_or_init(|| std::sync::Arc::new(Loaders::new(&self.db, &self.principal, self.now)))
            .clone()
    }
}

impl Loaders {
    pub fn new(db: &DatabaseConnection, principal: &Principal, now: DateTime<Utc>) -> Self {
        fn dl<T: Send + Sync + 'static>(loader: T) -> DataLoader<T> {
            DataLoader::new(loader, tokio::spawn)
        }
        let d = || db.clone();
        let p = || principal.clone();
        Self {
            accounts: dl(AccountLoader(d())),
            users: dl(UserLoader(d())),
            projects: dl(ProjectLoader(d())),
            api_keys: dl(ApiKeyLoader(d())),
            models: dl(ModelLoader(d())),
            payment_methods: dl(PaymentMethodLoader(d())),
            purchases: dl(PurchaseLoader(d())),
            transfers: dl(TransferLoader(d())),
            invoices: dl(InvoiceLoader(d())),
            usage_events: dl(UsageEventLoader(d())),
            ledger_transactions: dl(LedgerTransactionLoader(d())),
            projects_by_workspace: dl(ProjectsByWorkspace(d())),
            api_keys_by_workspace: dl(ApiKeysByWorkspace(d())),
            lines_by_invoice: dl(LinesByInvoice(d())),
            workspace_access: dl(WorkspaceAccessLoader {
                db: d(),
                principal: p(),
            }),
            visible_workspaces: dl(VisibleWorkspacesLoader {
                db: d(),
                principal: p(),
            }),
            workspace_members: dl(WorkspaceMembersLoader(d())),
            account_members: dl(AccountMembersLoader(d())),
            account_totals: dl(AccountTotalLoader(d())),
            usage: dl(UsageLoader(d())),
            spend: dl(SpendLoader { db: d(), now }),
        }
    }
}
