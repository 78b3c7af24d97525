//! DataLoaders: every relation of the schema is fetched in batches, so the number of
//! SQL statements of a request does not grow with the number of rows it returns.
//! One set of loaders is made per request (their caches must not outlive it).

use async_graphql::dataloader::{DataLoader, Loader};
use billing::accounts::access::{self, WorkspaceAccess};
use billing::reports::analytics::{self, DayRange, UsageDimension, UsageReport, UsageScope};
use billing::accounts::auth::Principal;
use billing::entity::enums::{AccountRole, WorkspaceRole};
use billing::entity::{
    account_members, accounts, api_keys, credit_packages, invoice_lines, invoices,
    ledger_transactions, models, payment_methods, projects, purchases, reservations, transfers,
    usage_events, users, workspace_members, workspaces,
};
use billing::sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder};
use billing::{BillingError, Credits};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

/// Loader errors must be cloneable; the original error is kept for its code.
pub type LoadError = Arc<BillingError>;

fn db_err(e: billing::sea_orm::DbErr) -> LoadError {
    Arc::new(BillingError::from(e))
}

/// Rows by primary key.
macro_rules! by_id_loader {
    ($name:ident, $entity:ident, $key:ty) => {
        pub struct $name(pub DatabaseConnection);
        impl Loader<$key> for $name {
            type Value = $entity::Model;
            type Error = LoadError;
            async fn load(&self, keys: &[$key]) -> Result<HashMap<$key, Self::Value>, Self::Error> {
                let rows = $entity::Entity::find()
                    .filter($entity::Column::Id.is_in(keys.iter().cloned()))
                    .all(&self.0)
                    .await
                    .map_err(db_err)?;
                Ok(rows.into_iter().map(|r| (r.id.clone(), r)).collect())
            }
        }
    };
}

/// Rows grouped by a parent key, in a stable order; every requested key gets a list.
macro_rules! group_loader {
    ($name:ident, $entity:ident, $column:ident, $field:ident, $order:ident) => {
        pub struct $name(pub DatabaseConnection);
        impl Loader<Uuid> for $name {
            type Value = Vec<$entity::Model>;
            type Error = LoadError;
            async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Self::Value>, Self::Error> {
                let rows = $entity::Entity::find()
                    .filter($entity::Column::$column.is_in(keys.iter().copied()))
                    .order_by_asc($entity::Column::$order)
                    .all(&self.0)
                    .await
                    .map_err(db_err)?;
                let mut out: HashMap<Uuid, Self::Value> =
                    keys.iter().map(|k| (*k, Vec::new())).collect();
                for row in rows {
                    out.entry(row.$field).or_default().push(row);
                }
                Ok(out)
            }
        }
    };
}

by_id_loader!(AccountLoader, accounts, Uuid);
by_id_loader!(UserLoader, users, Uuid);
by_id_loader!(ProjectLoader, projects, Uuid);
by_id_loader!(ApiKeyLoader, api_keys, Uuid);
by_id_loader!(ModelLoader, models, String);
by_id_loader!(PaymentMethodLoader, payment_methods, Uuid);
by_id_loader!(PurchaseLoader, purchases, Uuid);
by_id_loader!(TransferLoader, transfers, Uuid);
by_id_loader!(InvoiceLoader, invoices, Uuid);
by_id_loader!(UsageEventLoader, usage_events, Uuid);
by_id_loader!(ReservationLoader, reservations, Uuid);
by_id_loader!(PackageLoader, credit_packages, String);
by_id_loader!(LedgerTransactionLoader, ledger_transactions, i64);
group_loader!(
    ProjectsByWorkspace,
    projects,
    WorkspaceId,
    workspace_id,
    Name
);
group_loader!(
    ApiKeysByWorkspace,
    api_keys,
    WorkspaceId,
    workspace_id,
    CreatedAt
);
group_loader!(
    LinesByInvoice,
    invoice_lines,
    InvoiceId,
    invoice_id,
    Position
);

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

/// Members of each workspace with their role.
pub struct WorkspaceMembersLoader(pub DatabaseConnection);

impl Loader<Uuid> for WorkspaceMembersLoader {
    type Value = Vec<(users::Model, WorkspaceRole)>;
    type Error = LoadError;
    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Self::Value>, Self::Error> {
        let rows = workspace_members::Entity::find()
            .filter(workspace_members::Column::WorkspaceId.is_in(keys.iter().copied()))
            .find_also_related(users::Entity)
            .order_by_asc(workspace_members::Column::CreatedAt)
            .all(&self.0)
            .await
            .map_err(db_err)?;
        let mut out: HashMap<Uuid, Self::Value> = keys.iter().map(|k| (*k, Vec::new())).collect();
        for (member, user) in rows {
            if let Some(user) = user {
                out.entry(member.workspace_id)
                    .or_default()
                    .push((user, member.role));
            }
        }
        Ok(out)
    }
}

/// Members of each account with their role.
pub struct AccountMembersLoader(pub DatabaseConnection);

impl Loader<Uuid> for AccountMembersLoader {
    type Value = Vec<(users::Model, AccountRole)>;
    type Error = LoadError;
    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Self::Value>, Self::Error> {
        let rows = account_members::Entity::find()
            .filter(account_members::Column::AccountId.is_in(keys.iter().copied()))
            .find_also_related(users::Entity)
            .order_by_asc(account_members::Column::CreatedAt)
            .all(&self.0)
            .await
            .map_err(db_err)?;
        let mut out: HashMap<Uuid, Self::Value> = keys.iter().map(|k| (*k, Vec::new())).collect();
        for (member, user) in rows {
            if let Some(user) = user {
                out.entry(member.account_id)
                    .or_default()
                    .push((user, member.role));
            }
        }
        Ok(out)
    }
}

/// Total balance of each account (the sum of its workspaces' cached balances).
pub struct AccountTotalLoader(pub DatabaseConnection);

impl Loader<Uuid> for AccountTotalLoader {
    type Value = Credits;
    type Error = LoadError;
    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Self::Value>, Self::Error> {
        let rows = workspaces::Entity::find()
            .filter(workspaces::Column::AccountId.is_in(keys.iter().copied()))
            .all(&self.0)
            .await
            .map_err(db_err)?;
        let mut out: HashMap<Uuid, Credits> = keys.iter().map(|k| (*k, Credits::ZERO)).collect();
        for ws in rows {
            let total = out.entry(ws.account_id).or_default();
            *total = total
                .checked_add(Credits::from_nanos(ws.balance_nanos))
                .map_err(|e| Arc::new(BillingError::from(e)))?;
        }
        Ok(out)
    }
}

/// A usage report request: a scope, a day range and a grouping.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UsageKey {
    pub scope: UsageScope,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub group_by: Vec<UsageDimension>,
}

/// Usage reports, one statement per distinct (range, grouping) in the request.
pub struct UsageLoader(pub DatabaseConnection);

impl Loader<UsageKey> for UsageLoader {
    type Value = UsageReport;
    type Error = LoadError;
    async fn load(&self, keys: &[UsageKey]) -> Result<HashMap<UsageKey, Self::Value>, Self::Error> {
        // One statement per distinct (from, to, grouping); scopes batched within it.
        type Group = (DateTime<Utc>, DateTime<Utc>, Vec<UsageDimension>);
        let mut groups: HashMap<Group, Vec<UsageScope>> = HashMap::new();
        for key in keys {
            groups
                .entry((key.from, key.to, key.group_by.clone()))
                .or_default()
                .push(key.scope.clone());
        }
        let mut out = HashMap::new();
        for ((from, to, group_by), scopes) in groups {
            let range = DayRange::new(from, to).map_err(Arc::new)?;
            let reports = analytics::usage_reports(&self.0, &scopes, &range, &group_by)
                .await
                .map_err(Arc::new)?;
            for (scope, report) in reports {
                out.insert(
                    UsageKey {
                        scope,
                        from,
                        to,
                        group_by: group_by.clone(),
                    },
                    report,
                );
            }
        }
        Ok(out)
    }
}

/// Average daily spend of each workspace over a window of days.
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
        let mut by_days: HashMap<i64, Vec<Uuid>> = HashMap::new();
        for (ws, days) in keys {
            by_days.entry(*days).or_default().push(*ws);
        }
        let mut out = HashMap::new();
        for (days, ids) in by_days {
            let spend = analytics::average_daily_spend(&self.db, &ids, days, self.now)
                .await
                .map_err(Arc::new)?;
            for (ws, avg) in spend {
                out.insert((ws, days), avg);
            }
        }
        Ok(out)
    }
}

/// Every loader of one request.
pub struct Loaders {
    pub accounts: DataLoader<AccountLoader>,
    pub users: DataLoader<UserLoader>,
    pub projects: DataLoader<ProjectLoader>,
    pub api_keys: DataLoader<ApiKeyLoader>,
    pub models: DataLoader<ModelLoader>,
    pub payment_methods: DataLoader<PaymentMethodLoader>,
    pub purchases: DataLoader<PurchaseLoader>,
    pub transfers: DataLoader<TransferLoader>,
    pub invoices: DataLoader<InvoiceLoader>,
    pub usage_events: DataLoader<UsageEventLoader>,
    pub reservations: DataLoader<ReservationLoader>,
    pub packages: DataLoader<PackageLoader>,
    pub ledger_transactions: DataLoader<LedgerTransactionLoader>,
    pub projects_by_workspace: DataLoader<ProjectsByWorkspace>,
    pub api_keys_by_workspace: DataLoader<ApiKeysByWorkspace>,
    pub lines_by_invoice: DataLoader<LinesByInvoice>,
    pub workspace_access: DataLoader<WorkspaceAccessLoader>,
    pub visible_workspaces: DataLoader<VisibleWorkspacesLoader>,
    pub workspace_members: DataLoader<WorkspaceMembersLoader>,
    pub account_members: DataLoader<AccountMembersLoader>,
    pub account_totals: DataLoader<AccountTotalLoader>,
    pub usage: DataLoader<UsageLoader>,
    pub spend: DataLoader<SpendLoader>,
}

impl Loaders {
    pub fn new(db: &DatabaseConnection, principal: &Principal, now: DateTime<Utc>) -> Self {
        fn dl<T: Send + Sync + 'static>(loader: T) -> DataLoader<T> {
            DataLoader::new(loader, tokio::spawn)
        }
        let d = || db.clone();
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
            reservations: dl(ReservationLoader(d())),
            packages: dl(PackageLoader(d())),
            ledger_transactions: dl(LedgerTransactionLoader(d())),
            projects_by_workspace: dl(ProjectsByWorkspace(d())),
            api_keys_by_workspace: dl(ApiKeysByWorkspace(d())),
            lines_by_invoice: dl(LinesByInvoice(d())),
            workspace_access: dl(WorkspaceAccessLoader {
                db: d(),
                principal: principal.clone(),
            }),
            visible_workspaces: dl(VisibleWorkspacesLoader {
                db: d(),
                principal: principal.clone(),
            }),
            workspace_members: dl(WorkspaceMembersLoader(d())),
            account_members: dl(AccountMembersLoader(d())),
            account_totals: dl(AccountTotalLoader(d())),
            usage: dl(UsageLoader(d())),
            spend: dl(SpendLoader { db: d(), now }),
        }
    }
}
