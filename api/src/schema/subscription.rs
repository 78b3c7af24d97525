//! Subscriptions: live balances over WebSocket (`graphql-transport-ws`), fed by the
//! process's [`BalanceHub`]. Each subscription authorizes once, when it starts; the
//! stream then carries every balance event of its workspace (or account) committed
//! from then on, in sequence order.

use super::{Account, Purchase, Workspace, caller, credits, db, parse_id};
use crate::error::{GqlResult, RequestId, to_gql};
use crate::events::{BalanceEvent, BalanceHub, BalanceStream, SubscriberTooSlow};
use crate::metrics::Metrics;
use crate::scalars::{BigInt, CreditsScalar};
use crate::shared_feed::SharedRun;
use async_graphql::{Context, Enum, ID, Object, Result, Subscription};
use billing::accounts::access;
use billing::accounts::auth::Principal;
use billing::entity::{accounts, workspaces};
use billing::sea_orm::DatabaseConnection;
use billing::{BillingError, Credits};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::BoxStream;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use uuid::Uuid;

/// Why a workspace's balance or reserved credits changed.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
#[graphql(remote = "billing::entity::enums::BalanceChangeCause")]
pub enum BalanceChangeCause {
    Purchase,
    Bonus,
    Usage,
    TransferIn,
    TransferOut,
    Adjustment,
    /// A reservation was made: its amount became reserved credits.
    Reservation,
    /// A reservation was released or expired: its reserved credits were freed.
    Release,
}

/// A workspace's state right after one committed change.
pub struct BalanceChange {
    /// The workspace row as of this change (its cached balance columns replaced by the
    /// event's, so `workspace.balance` agrees with `balance`).
    workspace: workspaces::Model,
    event: Arc<BalanceEvent>,
}

impl BalanceChange {
    fn new(workspace: &workspaces::Model, event: Arc<BalanceEvent>) -> Self {
        let mut workspace = workspace.clone();
        workspace.balance_nanos = event.balance_nanos;
        workspace.reserved_nanos = event.reserved_nanos;
        workspace.balance_sequence = event.sequence;
        Self { workspace, event }
    }
}

#[Object]
impl BalanceChange {
    async fn workspace(&self) -> Workspace {
        Workspace(self.workspace.clone())
    }
    async fn balance(&self) -> CreditsScalar {
        credits(self.event.balance_nanos)
    }
    /// Reserved credits (of HELD reservations) as of this change.
    async fn reserved(&self) -> CreditsScalar {
        credits(self.event.reserved_nanos)
    }
    async fn available(&self) -> CreditsScalar {
        CreditsScalar(billing::ledger::available(&self.workspace))
    }
    async fn cause(&self) -> BalanceChangeCause {
        self.event.cause.into()
    }
    /// Strictly increasing per workspace; a subscriber can detect a gap.
    async fn sequence(&self) -> BigInt {
        BigInt(self.event.sequence)
    }
    async fn at(&self) -> DateTime<Utc> {
        self.event.created_at
    }
}

pub struct AccountBalanceChange {
    account: accounts::Model,
    change: BalanceChange,
    total_balance: Credits,
}

#[Object]
impl AccountBalanceChange {
    async fn account(&self) -> Account {
        Account(self.account.clone())
    }
    /// The workspace that changed.
    async fn change(&self) -> &BalanceChange {
        &self.change
    }
    async fn total_balance(&self) -> CreditsScalar {
        CreditsScalar(self.total_balance)
    }
}

pub struct SubscriptionRoot;

type Changes<T> = BoxStream<'static, Result<T>>;

#[Subscription]
impl SubscriptionRoot {
    /// Each change of a workspace's balance, reserved or available credits, wherever it happened (API or worker). Changes committed together may be coalesced into one; the latest state is always delivered.
    async fn balance_changed(
        &self,
        ctx: &Context<'_>,
        workspace_id: ID,
    ) -> Result<Changes<BalanceChange>> {
        let request_id = ctx.data_opt::<RequestId>().cloned();
        let shared = ctx.data_opt::<SharedRun>();
        if let Some(SharedRun::TooSlow) = shared {
            let too_slow = to_gql(BillingError::from(SubscriberTooSlow), request_id.as_ref());
            return Ok(futures::stream::once(std::future::ready(Err(too_slow))).boxed());
        }
        let principal = caller(ctx)?;
        let workspace_id = parse_id(ctx, &workspace_id, "workspace")?;
        // Any access to the workspace will do, a workspace API key included.
        let (workspace, _) = access::workspace_access(db(ctx), &principal, workspace_id)
            .await
            .gql(ctx)?;
        let events = match shared {
            None => hub(ctx)?.subscribe_workspace(workspace_id).gql(ctx)?,
            // A shared subscription's subscriber: authorized and counted, it receives
            // the feed's events (crate::shared_feed), not a stream of its own.
            Some(SharedRun::Admit(admission)) => {
                admission.admit(hub(ctx)?.reserve_seat().gql(ctx)?);
                return Ok(futures::stream::empty().boxed());
            }
            Some(SharedRun::Feed | SharedRun::TooSlow) => hub(ctx)?
                .subscribe_workspace_shared(workspace_id)
                .gql(ctx)?,
        };
        let metrics = ctx.data_opt::<Metrics>().cloned();
        let mut last_sequence = i64::MIN;
        Ok(events
            .filter_map(move |item| {
                let out = match item {
                    // The hub delivers a workspace's events in sequence order; this only
                    // guards the contract's promise (strictly increasing) for certain.
                    Ok(event) if event.sequence <= last_sequence => None,
                    Ok(event) => {
                        last_sequence = event.sequence;
                        if let Some(metrics) = &metrics {
                            metrics.subscription_execution("balanceChanged");
                        }
                        Some(Ok(BalanceChange::new(&workspace, event)))
                    }
                    Err(too_slow) => Some(Err(to_gql(
                        BillingError::from(too_slow),
                        request_id.as_ref(),
                    ))),
                };
                std::future::ready(out)
            })
            .boxed())
    }

    /// Balance changes across the account's workspaces, with the consolidated total.
    //
    // `totalBalance` is the sum of the account's workspace balances as of that event.
    // It is computed when the event is delivered, from a per-subscription snapshot of
    // the account's workspaces (read once at subscription) that every delivered event
    // updates: an extra query per event and subscriber would cost more, and would
    // give the total as of the moment of delivery (possibly including later changes),
    // not as of the event. Events already contained in the snapshot are skipped.
    async fn account_balance_changed(
        &self,
        ctx: &Context<'_>,
        account_id: ID,
    ) -> Result<Changes<AccountBalanceChange>> {
        let principal = caller(ctx)?;
        let account_id = parse_id(ctx, &account_id, "account")?;
        let (account, _) = access::account_access(db(ctx), &principal, account_id)
            .await
            .gql(ctx)?;
        // Subscribe before reading the snapshot: every event not in the snapshot
        // committed after the read, hence after the subscription, and is delivered.
        let events = hub(ctx)?.subscribe_account(account_id).gql(ctx)?;
        // A plain account MEMBER sees the changes of its own workspaces only (as in
        // `Account.workspaces`); the total covers them all (as `Account.totalBalance`).
        let (rows, visible) = access::account_workspaces(db(ctx), &principal, account_id)
            .await
            .gql(ctx)?;
        let latest: HashMap<Uuid, workspaces::Model> =
            rows.into_iter().map(|w| (w.id, w)).collect();
        let state = AccountState {
            events,
            account,
            latest,
            visible,
            principal,
            db: db(ctx).clone(),
            request_id: ctx.data_opt::<RequestId>().cloned(),
            metrics: ctx.data_opt::<Metrics>().cloned(),
        };
        Ok(futures::stream::unfold(state, |mut state| async move {
            let out = state.next().await?;
            Some((out, state))
        })
        .boxed())
    }

    /// A workspace's purchases as their status changes.
    async fn purchase_updated(
        &self,
        ctx: &Context<'_>,
        workspace_id: ID,
    ) -> Result<Changes<Purchase>> {
        let principal = caller(ctx)?;
        let workspace_id = parse_id(ctx, &workspace_id, "workspace")?;
        access::require_purchase_follower(db(ctx), &principal, workspace_id)
            .await
            .gql(ctx)?;
        Ok(
            super::purchase_feed::purchase_updates(db(ctx).clone(), workspace_id)
                .map(|p| Ok(Purchase(p)))
                .boxed(),
        )
    }
}

/// One `accountBalanceChanged` subscription: its events and the latest known state of
/// each of the account's workspaces.
struct AccountState {
    events: BalanceStream,
    account: accounts::Model,
    latest: HashMap<Uuid, workspaces::Model>,
    /// The workspaces whose changes the caller may see (checked once per workspace).
    visible: HashSet<Uuid>,
    principal: Principal,
    db: DatabaseConnection,
    request_id: Option<RequestId>,
    metrics: Option<Metrics>,
}

impl AccountState {
    async fn next(&mut self) -> Option<Result<AccountBalanceChange>> {
        loop {
            let event = match self.events.next().await? {
                Ok(event) => event,
                Err(too_slow) => return Some(Err(self.error(too_slow.into()))),
            };
            let row = match self.latest.get(&event.workspace_id) {
                // Already contained in the snapshot.
                Some(known) if event.sequence <= known.balance_sequence => continue,
                Some(known) => known.clone(),
                // A workspace created after the snapshot: read it (and whether the
                // caller may see it) once.
                None => {
                    let seen =
                        access::workspace_sighting(&self.db, &self.principal, event.workspace_id)
                            .await;
                    match seen {
                        Ok(Some((row, visible))) => {
                            if visible {
                                self.visible.insert(row.id);
                            }
                            row
                        }
                        Ok(None) => continue, // gone since
                        Err(e) => return Some(Err(self.error(e))),
                    }
                }
            };
            let change = BalanceChange::new(&row, event);
            self.latest.insert(row.id, change.workspace.clone());
            if !self.visible.contains(&row.id) {
                continue; // counted in the total, not shown
            }
            if let Some(metrics) = &self.metrics {
                metrics.subscription_execution("accountBalanceChanged");
            }
            return Some(match billing::ledger::total_balance(self.latest.values()) {
                Ok(total_balance) => Ok(AccountBalanceChange {
                    account: self.account.clone(),
                    change,
                    total_balance,
                }),
                Err(e) => Err(self.error(e)),
            });
        }
    }

    fn error(&self, e: BillingError) -> async_graphql::Error {
        to_gql(e, self.request_id.as_ref())
    }
}

fn hub<'a>(ctx: &Context<'a>) -> Result<&'a Arc<BalanceHub>> {
    ctx.data_opt::<Arc<BalanceHub>>()
        .ok_or_else(|| BillingError::Internal("live balances are not running".into()))
        .gql(ctx)
}
