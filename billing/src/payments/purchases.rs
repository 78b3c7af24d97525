//! Buying credits: a PENDING purchase is written first; once the payment is captured
//! it is credited (amount and bonus as separate ledger entries) exactly once, and
//! invoiced. Verified accounts may pay by invoice: credited at once, invoice OPEN.
//!
//! Lock order (as in the ledger): the purchase row (claimed or newly inserted) → the
//! workspace row (credit) → the account row (invoice number).

use crate::db::begin_write;
use crate::error::{BillingError, Result};
use crate::ids::{IdempotencyKey, new_id, opt_uuid_str, request_hash};
use crate::ledger::{self, EntrySpec, Guard, LedgerAccount, PostingRefs, system_account};
use crate::money::Credits;
use crate::payments;
use chrono::{DateTime, TimeDelta, Utc};
use entity::enums::{
    BalanceChangeCause, InvoiceStatus, LedgerEntryKind, PurchaseSource, PurchaseStatus,
};
use entity::{accounts, credit_packages, invoice_lines, invoices, purchases, workspaces};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    EntityTrait, IntoActiveModel, QueryFilter, QueryOrder,
};
use std::collections::HashMap;
use uuid::Uuid;

/// Bounds on a custom purchase, in whole credits: a floor that keeps card fees
/// sensible and a ceiling above which a sales contract (invoice billing) is expected.
pub const CUSTOM_AMOUNT_CREDITS_MIN: i64 = 5;
pub const CUSTOM_AMOUNT_CREDITS_MAX: i64 = 100_000;
/// Longest failure reason kept.
pub const FAILURE_REASON_LEN_MAX: usize = 500;

#[derive(Clone, Debug)]
pub enum PurchaseItem {
    /// A package, with its bonus.
    Package(String),
    /// A custom amount of credits (whole cents), no bonus.
    Amount(Credits),
}

#[derive(Clone, Debug)]
pub struct PurchaseRequest {
    pub workspace_id: Uuid,
    pub item: PurchaseItem,
    pub source: PurchaseSource,
    pub payment_method_id: Option<Uuid>,
    pub idempotency_key: String,
    pub created_by_user_id: Option<Uuid>,
}

#[derive(Clone, Debug)]
pub struct Purchased {
    pub purchase: purchases::Model,
    pub replayed: bool,
}

/// What a request buys: (amount, bonus, price, package id).
async fn price_item<C: ConnectionTrait>(
    db: &C,
    item: &PurchaseItem,
) -> Result<(Credits, Credits, Credits, Option<String>)> {
    match item {
        PurchaseItem::Package(id) => {
            let package = credit_packages::Entity::find_by_id(id.clone())
                .one(db)
                .await?
                .filter(|p| p.active)
                .ok_or(BillingError::NotFound("credit package"))?;
            Ok((
                Credits::from_nanos(package.amount_nanos),
                Credits::from_nanos(package.bonus_nanos),
                Credits::from_nanos(package.price_nanos),
                Some(package.id),
            ))
        }
        PurchaseItem::Amount(amount) => {
            let min = Credits::from_whole_credits(CUSTOM_AMOUNT_CREDITS_MIN)?;
            let max = Credits::from_whole_credits(CUSTOM_AMOUNT_CREDITS_MAX)?;
            if *amount < min || *amount > max {
                return Err(BillingError::invalid(format!(
                    "amount must be between {min} and {max} credits"
                )));
            }
            if amount.to_cents_exact().is_none() {
                return Err(BillingError::invalid(
                    "amount must be a whole number of cents",
                ));
            }
            Ok((*amount, Credits::ZERO, *amount, None))
        }
    }
}

/// The payload fingerprint stored beside a purchase's idempotency key.
fn purchase_hash(
    package_id: Option<&str>,
    amount: Credits,
    source: PurchaseSource,
    payment_method_id: Option<Uuid>,
) -> String {
    request_hash(&[
        "purchase",
        package_id.unwrap_or_default(),
        &amount.to_string(),
        source.as_str(),
        &opt_uuid_str(payment_method_id),
    ])
}

async fn find_by_key(
    db: &DatabaseConnection,
    workspace_id: Uuid,
    key: &IdempotencyKey,
) -> Result<Option<purchases::Model>> {
    Ok(purchases::Entity::find()
        .filter(purchases::Column::WorkspaceId.eq(workspace_id))
        .filter(purchases::Column::IdempotencyKey.eq(key.as_str()))
        .one(db)
        .await?)
}

/// Writes a PENDING purchase (idempotent on the key within the workspace). The
/// payment is captured later, by the worker, with the purchase id as the gateway's
/// idempotency key.
pub async fn create_purchase(
    db: &DatabaseConnection,
    req: PurchaseRequest,
    now: DateTime<Utc>,
) -> Result<Purchased> {
    let key = IdempotencyKey::parse("idempotencyKey", &req.idempotency_key)?;
    ledger::load_workspace(db, req.workspace_id).await?;
    let (amount, bonus, price, package_id) = price_item(db, &req.item).await?;
    let hash = purchase_hash(
        package_id.as_deref(),
        amount,
        req.source,
        req.payment_method_id,
    );
    match find_by_key(db, req.workspace_id, &key).await? {
        Some(p) if p.request_hash == hash => {
            return Ok(Purchased {
                purchase: p,
                replayed: true,
            });
        }
        Some(_) => return Err(BillingError::IdempotencyConflict),
        None => {}
    }
    let priced = (amount, bonus, price, package_id);
    let purchase = pending_row(new_id(), &req, &key, priced, hash, now);
    match purchases::Entity::insert(purchase.clone().into_active_model().reset_all())
        .exec_without_returning(db)
        .await
    {
        Ok(_) => Ok(Purchased {
            purchase,
            replayed: false,
        }),
        Err(e) if crate::error::is_unique_violation(&e) => {
            // A concurrent request with the same key won; answer as it did.
            Box::pin(create_purchase(db, req, now)).await
        }
        Err(e) => Err(e.into()),
    }
}

/// A PENDING purchase row, not yet written.
fn pending_row(
    id: Uuid,
    req: &PurchaseRequest,
    key: &IdempotencyKey,
    (amount, bonus, price, package_id): (Credits, Credits, Credits, Option<String>),
    request_hash: String,
    now: DateTime<Utc>,
) -> purchases::Model {
    purchases::Model {
        id,
        workspace_id: req.workspace_id,
        package_id,
        amount_nanos: amount.nanos(),
        bonus_nanos: bonus.nanos(),
        price_nanos: price.nanos(),
        status: PurchaseStatus::Pending,
        source: req.source,
        payment_method_id: req.payment_method_id,
        idempotency_key: key.as_str().to_owned(),
        request_hash,
        failure_reason: None,
        gateway_charge_id: None,
        attempts: 0,
        invoice_id: None,
        created_by_user_id: req.created_by_user_id,
        created_at: now,
        completed_at: None,
        disputed_at: None,
        dispute_reason: None,
    }
}

/// Validates and prices a request into the PENDING row [`create_purchase`] would
/// write, with the given id, without writing it (only a package lookup reads), for
/// callers that insert it inside their own transaction (auto-reload). There is no
/// replay lookup: the caller's key must be new (e.g. contain `id`).
pub(crate) async fn new_pending_row<C: ConnectionTrait>(
    c: &C,
    id: Uuid,
    req: &PurchaseRequest,
    now: DateTime<Utc>,
) -> Result<purchases::Model> {
    let key = IdempotencyKey::parse("idempotencyKey", &req.idempotency_key)?;
    let priced = price_item(c, &req.item).await?;
    let hash = purchase_hash(
        priced.3.as_deref(),
        priced.0,
        req.source,
        req.payment_method_id,
    );
    Ok(pending_row(id, req, &key, priced, hash, now))
}

pub async fn load_purchase(db: &DatabaseConnection, id: Uuid) -> Result<purchases::Model> {
    purchases::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("purchase"))
}

/// Claims a PENDING purchase for crediting: PENDING → SUCCEEDED (the purchase row's
/// lock, first in the lock order). None when it is not PENDING (any more). A
/// REQUIRES_ACTION purchase can be claimed too: only the gateway's word that the money
/// was captured after all (the cardholder authenticated) leads here, and captured
/// money is always credited.
async fn claim_pending(
    tx: &DatabaseTransaction,
    purchase_id: Uuid,
    gateway_charge_id: Option<String>,
    now: DateTime<Utc>,
) -> Result<Option<purchases::Model>> {
    Ok(purchases::Entity::update_many()
        .col_expr(
            purchases::Column::Status,
            Expr::value(PurchaseStatus::Succeeded.as_str()),
        )
        .col_expr(purchases::Column::CompletedAt, Expr::value(now))
        .col_expr(
            purchases::Column::GatewayChargeId,
            Expr::value(gateway_charge_id),
        )
        .filter(purchases::Column::Id.eq(purchase_id))
        .filter(
            purchases::Column::Status
                .is_in([PurchaseStatus::Pending, PurchaseStatus::RequiresAction]),
        )
        .exec_with_returning(tx)
        .await?
        .pop())
}

/// The answer to crediting a purchase that was not PENDING: SUCCEEDED is returned
/// unchanged (a replay), anything else is refused.
async fn already_resolved(db: &DatabaseConnection, purchase_id: Uuid) -> Result<purchases::Model> {
    let purchase = load_purchase(db, purchase_id).await?;
    match purchase.status {
        PurchaseStatus::Succeeded => Ok(purchase),
        _ => Err(BillingError::invalid(format!(
            "purchase is {}; only a PENDING purchase can be credited",
            purchase.status.as_str()
        ))),
    }
}

/// Credits a purchase that this transaction has just made SUCCEEDED (claimed from
/// PENDING, or inserted SUCCEEDED): the workspace +(amount + bonus) with its balance
/// event, and the ledger transaction `purchase:<id>` (amount against `card_payments`
/// or `invoice_receivables`, bonus against `promotions`). The ledger's unique key
/// makes a second posting of one purchase fail. Returns the workspace afterwards.
pub async fn post_purchase_credit(
    tx: &DatabaseTransaction,
    purchase: &purchases::Model,
    now: DateTime<Utc>,
) -> Result<workspaces::Model> {
    let amount = Credits::from_nanos(purchase.amount_nanos);
    let bonus = Credits::from_nanos(purchase.bonus_nanos);
    let ws = ledger::change_workspace(
        tx,
        purchase.workspace_id,
        amount.checked_add(bonus)?,
        Credits::ZERO,
        Guard::None,
        true,
    )
    .await?
    .ok_or(BillingError::NotFound("workspace"))?;
    let balance = Credits::from_nanos(ws.balance_nanos);
    let counter_account = match purchase.source {
        PurchaseSource::Invoice => system_account::INVOICE_RECEIVABLES,
        PurchaseSource::Manual | PurchaseSource::AutoReload => system_account::CARD_PAYMENTS,
    };
    let mut entries = vec![
        EntrySpec {
            account: LedgerAccount::Workspace(purchase.workspace_id),
            kind: LedgerEntryKind::Purchase,
            amount,
            balance_after: Some(balance.checked_sub(bonus)?),
            description: format!("purchase of {amount} credits"),
        },
        EntrySpec {
            account: LedgerAccount::System(counter_account),
            kind: LedgerEntryKind::Purchase,
            amount: amount.checked_neg()?,
            balance_after: None,
            description: format!("purchase {}", purchase.id),
        },
    ];
    if bonus.is_positive() {
        entries.push(EntrySpec {
            account: LedgerAccount::Workspace(purchase.workspace_id),
            kind: LedgerEntryKind::Bonus,
            amount: bonus,
            balance_after: Some(balance),
            description: format!("bonus of {bonus} credits"),
        });
        entries.push(EntrySpec {
            account: LedgerAccount::System(system_account::PROMOTIONS),
            kind: LedgerEntryKind::Bonus,
            amount: bonus.checked_neg()?,
            balance_after: None,
            description: format!("bonus on purchase {}", purchase.id),
        });
    }
    ledger::post(
        tx,
        "PURCHASE",
        format!("purchase:{}", purchase.id),
        PostingRefs {
            purchase_id: Some(purchase.id),
            ..Default::default()
        },
        &entries,
        now,
    )
    .await?;
    ledger::balance_event(tx, &ws, BalanceChangeCause::Purchase, now).await?;
    crate::policies::alerts::after_balance_change(tx, &ws, now).await?;
    Ok(ws)
}

/// Credits a PENDING purchase whose payment was captured: SUCCEEDED, the amount and
/// the bonus as separate ledger entries, the cached balance and a balance event, in
/// one transaction. Crediting a SUCCEEDED purchase again returns it unchanged. Issues
/// no invoice: the worker's capture path is [`capture_succeeded`].
pub async fn credit_purchase(
    db: &DatabaseConnection,
    purchase_id: Uuid,
    gateway_charge_id: Option<String>,
    now: DateTime<Utc>,
) -> Result<purchases::Model> {
    let tx = begin_write(db).await?;
    let Some(purchase) = claim_pending(&tx, purchase_id, gateway_charge_id, now).await? else {
        tx.rollback().await?;
        return already_resolved(db, purchase_id).await;
    };
    post_purchase_credit(&tx, &purchase, now).await?;
    if purchase.source == PurchaseSource::AutoReload {
        crate::policies::reload_state::on_reload_captured(&tx, &purchase, now).await?;
    }
    tx.commit().await?;
    Ok(purchase)
}

/// What the worker calls when the gateway captured a purchase's charge: in one
/// transaction the purchase becomes SUCCEEDED with the charge id, is credited (as
/// [`credit_purchase`]) and gets its PAID invoice. Idempotent: a purchase already
/// SUCCEEDED is returned unchanged (no second credit, no second invoice); a FAILED
/// one is INVALID_INPUT.
pub async fn capture_succeeded(
    db: &DatabaseConnection,
    purchase_id: Uuid,
    gateway_charge_id: &str,
    now: DateTime<Utc>,
) -> Result<purchases::Model> {
    let tx = begin_write(db).await?;
    let Some(purchase) = capture_succeeded_in(&tx, purchase_id, gateway_charge_id, now).await?
    else {
        tx.rollback().await?;
        return already_resolved(db, purchase_id).await;
    };
    tx.commit().await?;
    Ok(purchase)
}

/// [`capture_succeeded`] inside the caller's transaction (the capture job's and the
/// webhooks' common path). None when the purchase was not PENDING: nothing written.
pub(crate) async fn capture_succeeded_in(
    tx: &DatabaseTransaction,
    purchase_id: Uuid,
    gateway_charge_id: &str,
    now: DateTime<Utc>,
) -> Result<Option<purchases::Model>> {
    let claimed = claim_pending(tx, purchase_id, Some(gateway_charge_id.to_owned()), now).await?;
    let Some(mut purchase) = claimed else {
        return Ok(None);
    };
    let ws = post_purchase_credit(tx, &purchase, now).await?;
    let invoice = issue_invoice(tx, &purchase, ws.account_id, InvoiceStatus::Paid, now).await?;
    purchase.invoice_id = Some(invoice.id);
    if purchase.source == PurchaseSource::AutoReload {
        crate::policies::reload_state::on_reload_captured(tx, &purchase, now).await?;
    }
    // The receipt is written in the same transaction: credited and receipted together.
    crate::policies::notifications::receipt_for_purchase(tx, purchase.id, now).await?;
    Ok(Some(purchase))
}

/// Marks a PENDING purchase FAILED with the gateway's reason; nothing is credited.
/// An AUTO_RELOAD purchase also counts as a failed reload, in the same transaction
/// (as [`crate::policies::auto_reload::reload_failed`] with `permanent`).
pub async fn fail_purchase(
    db: &DatabaseConnection,
    purchase_id: Uuid,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<purchases::Model> {
    fail_purchase_with(db, purchase_id, reason, true, now).await
}

/// [`fail_purchase`], saying whether the failure is permanent (for auto-reloads).
pub(crate) async fn fail_purchase_with(
    db: &DatabaseConnection,
    purchase_id: Uuid,
    reason: &str,
    permanent: bool,
    now: DateTime<Utc>,
) -> Result<purchases::Model> {
    let tx = begin_write(db).await?;
    match fail_in(&tx, purchase_id, reason, permanent, now).await? {
        Some(p) => {
            tx.commit().await?;
            Ok(p)
        }
        None => {
            tx.rollback().await?;
            let purchase = load_purchase(db, purchase_id).await?;
            match purchase.status {
                PurchaseStatus::Failed => Ok(purchase),
                _ => Err(BillingError::invalid(format!(
                    "purchase is {}; only a PENDING purchase can fail",
                    purchase.status.as_str()
                ))),
            }
        }
    }
}

/// [`fail_purchase_with`] inside the caller's transaction: PENDING → FAILED with the
/// reason (and the reload bookkeeping). None when it was not PENDING: nothing written.
pub(crate) async fn fail_in(
    tx: &DatabaseTransaction,
    purchase_id: Uuid,
    reason: &str,
    permanent: bool,
    now: DateTime<Utc>,
) -> Result<Option<purchases::Model>> {
    let reason: String = reason.chars().take(FAILURE_REASON_LEN_MAX).collect();
    let failed = purchases::Entity::update_many()
        .col_expr(
            purchases::Column::Status,
            Expr::value(PurchaseStatus::Failed.as_str()),
        )
        .col_expr(purchases::Column::FailureReason, Expr::value(reason))
        .col_expr(purchases::Column::CompletedAt, Expr::value(now))
        .filter(purchases::Column::Id.eq(purchase_id))
        .filter(purchases::Column::Status.eq(PurchaseStatus::Pending))
        .exec_with_returning(tx)
        .await?
        .pop();
    if let Some(p) = &failed
        && p.source == PurchaseSource::AutoReload
    {
        crate::policies::reload_state::on_reload_failed(tx, p, permanent, now).await?;
    }
    Ok(failed)
}

/// A PENDING purchase whose charge needs the cardholder to authenticate (3-D Secure)
/// while nobody is there: REQUIRES_ACTION with the reason (and the gateway's payment
/// id when there is one), never credited and never retried. In the same transaction
/// the admins get an e-mail naming the card and what to do, and an AUTO_RELOAD
/// purchase counts as a failed reload (backoff; switched off after repeated
/// failures). None when it was not PENDING: nothing written.
pub(crate) async fn require_action_in(
    tx: &DatabaseTransaction,
    purchase_id: Uuid,
    gateway_charge_id: Option<&str>,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<Option<purchases::Model>> {
    let failure_reason: String = format!("requires action: {reason}")
        .chars()
        .take(FAILURE_REASON_LEN_MAX)
        .collect();
    let mut update = purchases::Entity::update_many()
        .col_expr(
            purchases::Column::Status,
            Expr::value(PurchaseStatus::RequiresAction.as_str()),
        )
        .col_expr(
            purchases::Column::FailureReason,
            Expr::value(failure_reason),
        )
        .col_expr(purchases::Column::CompletedAt, Expr::value(now))
        .filter(purchases::Column::Id.eq(purchase_id))
        .filter(purchases::Column::Status.eq(PurchaseStatus::Pending));
    if let Some(charge_id) = gateway_charge_id {
        update = update.col_expr(
            purchases::Column::GatewayChargeId,
            Expr::value(charge_id.to_owned()),
        );
    }
    let Some(purchase) = update.exec_with_returning(tx).await?.pop() else {
        return Ok(None);
    };
    crate::policies::notifications::action_required_for_purchase(tx, &purchase, reason, now)
        .await?;
    if purchase.source == PurchaseSource::AutoReload {
        crate::policies::reload_state::on_reload_needs_action(tx, &purchase, now).await?;
    }
    tracing::warn!(%purchase_id, reason, "purchase needs the cardholder to authenticate");
    Ok(Some(purchase))
}

/// Records a dispute (chargeback) on the purchase paid by this gateway charge, once:
/// `disputed_at` and the reason. None when no purchase has that charge, or it was
/// already recorded. Nothing is posted: the credits stay until someone decides.
pub(crate) async fn record_dispute_in(
    tx: &DatabaseTransaction,
    gateway_charge_id: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<Option<purchases::Model>> {
    let reason: String = reason.chars().take(FAILURE_REASON_LEN_MAX).collect();
    let disputed = purchases::Entity::update_many()
        .col_expr(purchases::Column::DisputedAt, Expr::value(now))
        .col_expr(purchases::Column::DisputeReason, Expr::value(reason))
        .filter(purchases::Column::GatewayChargeId.eq(gateway_charge_id))
        .filter(purchases::Column::DisputedAt.is_null())
        .exec_with_returning(tx)
        .await?
        .pop();
    if let Some(p) = &disputed {
        tracing::warn!(purchase_id = %p.id, gateway_charge_id, "purchase disputed");
    }
    Ok(disputed)
}

/// The purchase a gateway charge paid for: by its idempotency key (the purchase id,
/// carried in the payment's metadata), else by the charge id stored on it.
pub async fn purchase_for_charge<C: ConnectionTrait>(
    c: &C,
    idempotency_key: Option<&str>,
    gateway_charge_id: &str,
) -> Result<Option<purchases::Model>> {
    if let Some(id) = idempotency_key.and_then(|k| Uuid::parse_str(k).ok())
        && let Some(p) = purchases::Entity::find_by_id(id).one(c).await?
    {
        return Ok(Some(p));
    }
    Ok(purchases::Entity::find()
        .filter(purchases::Column::GatewayChargeId.eq(gateway_charge_id))
        .one(c)
        .await?)
}

// --- buying credits the way the API does -------------------------------------------

/// `purchaseCredits`: a card purchase (the given card or the account's default) or,
/// for verified accounts, a purchase paid by invoice.
///
/// Prices are list prices: the account's volume discount does NOT apply to
/// purchases; it applies to usage (see `pricing`), so a discounted account is never
/// discounted twice.
#[derive(Clone, Debug)]
pub struct PurchaseCreditsRequest {
    pub workspace_id: Uuid,
    pub item: PurchaseItem,
    /// None: the account's default card. Must be None when paying by invoice.
    pub payment_method_id: Option<Uuid>,
    pub pay_by_invoice: bool,
    pub idempotency_key: String,
    pub created_by_user_id: Option<Uuid>,
}

/// Buys credits.
///
/// - **Card**: resolves the card (given → it must belong to the workspace's account
///   and not be removed, else NOT_FOUND; none → the account's default; no card at all
///   → INVALID_INPUT "add a payment method first"), then writes a PENDING MANUAL
///   purchase exactly as [`create_purchase`]. The worker captures it later
///   ([`capture_succeeded`] / [`fail_purchase`]).
/// - **Invoice** (verified accounts only, else FORBIDDEN): one transaction writes the
///   purchase SUCCEEDED with source INVOICE, credits it against
///   `invoice_receivables`, and issues its OPEN invoice (next number of the account,
///   due after the account's payment terms).
///
/// Idempotent on the key within the workspace: a replay returns the original
/// purchase (`replayed`), another payload with the key is IDEMPOTENCY_CONFLICT. A
/// card replay that names no card matches the card the original resolved to, so it
/// stays a replay after the default changes. Refusals write nothing.
pub async fn purchase_credits(
    db: &DatabaseConnection,
    req: PurchaseCreditsRequest,
    now: DateTime<Utc>,
) -> Result<Purchased> {
    if req.pay_by_invoice {
        if req.payment_method_id.is_some() {
            return Err(BillingError::invalid(
                "choose either a payment method or payment by invoice, not both",
            ));
        }
        return purchase_by_invoice(db, req, now).await;
    }
    let key = IdempotencyKey::parse("idempotencyKey", &req.idempotency_key)?;
    let ws = ledger::load_workspace(db, req.workspace_id).await?;
    let payment_method_id = match find_by_key(db, ws.id, &key).await? {
        // A replay (create_purchase compares the rest of the payload).
        Some(p)
            if p.source == PurchaseSource::Manual
                && req
                    .payment_method_id
                    .is_none_or(|id| Some(id) == p.payment_method_id) =>
        {
            p.payment_method_id
        }
        Some(_) => return Err(BillingError::IdempotencyConflict),
        None => Some(
            payments::cards::resolve_payment_method(db, ws.account_id, req.payment_method_id, now)
                .await?
                .id,
        ),
    };
    create_purchase(
        db,
        PurchaseRequest {
            workspace_id: req.workspace_id,
            item: req.item,
            source: PurchaseSource::Manual,
            payment_method_id,
            idempotency_key: req.idempotency_key,
            created_by_user_id: req.created_by_user_id,
        },
        now,
    )
    .await
}

async fn purchase_by_invoice(
    db: &DatabaseConnection,
    req: PurchaseCreditsRequest,
    now: DateTime<Utc>,
) -> Result<Purchased> {
    let key = IdempotencyKey::parse("idempotencyKey", &req.idempotency_key)?;
    let ws = ledger::load_workspace(db, req.workspace_id).await?;
    let (amount, bonus, price, package_id) = price_item(db, &req.item).await?;
    let hash = purchase_hash(package_id.as_deref(), amount, PurchaseSource::Invoice, None);
    match find_by_key(db, ws.id, &key).await? {
        Some(p) if p.request_hash == hash => {
            return Ok(Purchased {
                purchase: p,
                replayed: true,
            });
        }
        Some(_) => return Err(BillingError::IdempotencyConflict),
        None => {}
    }
    let account = accounts::Entity::find_by_id(ws.account_id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("account"))?;
    if !account.verified {
        return Err(BillingError::Forbidden(
            "paying by invoice needs a verified account; pay by card or contact sales",
        ));
    }
    let mut purchase = purchases::Model {
        id: new_id(),
        workspace_id: ws.id,
        package_id,
        amount_nanos: amount.nanos(),
        bonus_nanos: bonus.nanos(),
        price_nanos: price.nanos(),
        status: PurchaseStatus::Succeeded,
        source: PurchaseSource::Invoice,
        payment_method_id: None,
        idempotency_key: key.as_str().to_owned(),
        request_hash: hash,
        failure_reason: None,
        gateway_charge_id: None,
        attempts: 0,
        invoice_id: None,
        created_by_user_id: req.created_by_user_id,
        created_at: now,
        completed_at: Some(now),
        disputed_at: None,
        dispute_reason: None,
    };
    // Lock order: the new purchase row → the workspace (credit) → the account
    // (invoice number), as in capture_succeeded.
    let tx = begin_write(db).await?;
    let inserted = purchases::Entity::insert(purchase.clone().into_active_model().reset_all())
        .exec_without_returning(&tx)
        .await;
    match inserted {
        Ok(_) => {}
        Err(e) if crate::error::is_unique_violation(&e) => {
            // A concurrent request with the same key won; answer as it did.
            tx.rollback().await?;
            return Box::pin(purchase_by_invoice(db, req, now)).await;
        }
        Err(e) => return Err(e.into()),
    }
    post_purchase_credit(&tx, &purchase, now).await?;
    let invoice = issue_invoice(&tx, &purchase, ws.account_id, InvoiceStatus::Open, now).await?;
    purchase.invoice_id = Some(invoice.id);
    // The OPEN invoice goes out by e-mail like a card receipt, in the same transaction.
    crate::policies::notifications::receipt_for_purchase(&tx, purchase.id, now).await?;
    tx.commit().await?;
    Ok(Purchased {
        purchase,
        replayed: false,
    })
}

// --- invoices ----------------------------------------------------------------------

/// Formats an invoice number: `INV-000042`.
pub fn invoice_number(sequence: i64) -> String {
    format!("INV-{sequence:06}")
}

/// Issues the invoice of a SUCCEEDED purchase inside the caller's transaction: the
/// account's next number (an atomic `UPDATE … RETURNING` of `invoice_sequence`, so
/// concurrent invoices get distinct consecutive numbers), the invoice, its lines (the
/// credits at their price; the bonus at zero price), and `purchases.invoice_id`.
/// OPEN invoices are due after the account's payment terms; PAID ones are paid now.
async fn issue_invoice(
    tx: &DatabaseTransaction,
    purchase: &purchases::Model,
    account_id: Uuid,
    status: InvoiceStatus,
    now: DateTime<Utc>,
) -> Result<invoices::Model> {
    if purchase.status != PurchaseStatus::Succeeded {
        return Err(BillingError::Internal(format!(
            "purchase {} is {}; only a SUCCEEDED purchase is invoiced",
            purchase.id,
            purchase.status.as_str()
        )));
    }
    let account = next_invoice_number(tx, account_id).await?;
    let (due_at, paid_at) = match status {
        InvoiceStatus::Open => (
            Some(now + TimeDelta::days(i64::from(account.payment_terms_days))),
            None,
        ),
        InvoiceStatus::Paid => (None, Some(now)),
        InvoiceStatus::Void => {
            return Err(BillingError::Internal(
                "an invoice is never issued VOID".into(),
            ));
        }
    };
    let invoice = invoices::Model {
        id: new_id(),
        account_id,
        sequence: account.invoice_sequence,
        number: invoice_number(account.invoice_sequence),
        purchase_id: Some(purchase.id),
        total_nanos: purchase.price_nanos,
        status,
        issued_at: now,
        due_at,
        paid_at,
    };
    invoices::Entity::insert(invoice.clone().into_active_model().reset_all())
        .exec_without_returning(tx)
        .await?;
    insert_invoice_lines(tx, purchase, invoice.id).await?;
    link_invoice(tx, purchase.id, invoice.id).await?;
    Ok(invoice)
}

/// Takes the account's next invoice number: an atomic `UPDATE … RETURNING` of
/// `invoice_sequence`, so concurrent invoices get distinct consecutive numbers.
/// Returns the account as updated (its payment terms date an OPEN invoice).
async fn next_invoice_number(
    tx: &DatabaseTransaction,
    account_id: Uuid,
) -> Result<accounts::Model> {
    accounts::Entity::update_many()
        .col_expr(
            accounts::Column::InvoiceSequence,
            Expr::col(accounts::Column::InvoiceSequence).add(1),
        )
        .filter(accounts::Column::Id.eq(account_id))
        .exec_with_returning(tx)
        .await?
        .pop()
        .ok_or(BillingError::NotFound("account"))
}

/// The invoice's lines: the credits at their price, then any bonus at zero price.
async fn insert_invoice_lines(
    tx: &DatabaseTransaction,
    purchase: &purchases::Model,
    invoice_id: Uuid,
) -> Result<()> {
    let amount = Credits::from_nanos(purchase.amount_nanos);
    let bonus = Credits::from_nanos(purchase.bonus_nanos);
    let mut lines = vec![(
        match &purchase.package_id {
            Some(package) => format!("{amount} credits ({package} package)"),
            None => format!("{amount} credits"),
        },
        purchase.price_nanos,
    )];
    if bonus.is_positive() {
        lines.push((format!("Bonus credits (free): {bonus} credits"), 0));
    }
    let rows = lines
        .into_iter()
        .zip(1..)
        .map(|((description, amount_nanos), position)| {
            invoice_lines::Model {
                id: new_id(),
                invoice_id,
                position,
                description,
                amount_nanos,
            }
            .into_active_model()
            .reset_all()
        });
    invoice_lines::Entity::insert_many(rows)
        .exec_without_returning(tx)
        .await?;
    Ok(())
}

/// Sets `purchases.invoice_id`, only where none is set yet: a purchase is invoiced once.
async fn link_invoice(tx: &DatabaseTransaction, purchase_id: Uuid, invoice_id: Uuid) -> Result<()> {
    let linked = purchases::Entity::update_many()
        .col_expr(purchases::Column::InvoiceId, Expr::value(invoice_id))
        .filter(purchases::Column::Id.eq(purchase_id))
        .filter(purchases::Column::InvoiceId.is_null())
        .exec(tx)
        .await?;
    if linked.rows_affected != 1 {
        return Err(BillingError::Internal(format!(
            "purchase {purchase_id} already has an invoice"
        )));
    }
    Ok(())
}

/// Issues the PAID invoice of a captured card purchase (paid now, no due date) in
/// the caller's transaction. The purchase must be SUCCEEDED; one that already has an
/// invoice gets that invoice back. [`capture_succeeded`] calls this.
pub async fn issue_paid_invoice(
    tx: &DatabaseTransaction,
    purchase: &purchases::Model,
    now: DateTime<Utc>,
) -> Result<invoices::Model> {
    if let Some(invoice_id) = purchase.invoice_id {
        return invoices::Entity::find_by_id(invoice_id)
            .one(tx)
            .await?
            .ok_or(BillingError::NotFound("invoice"));
    }
    let ws = ledger::load_workspace(tx, purchase.workspace_id).await?;
    issue_invoice(tx, purchase, ws.account_id, InvoiceStatus::Paid, now).await
}

/// Records that an OPEN invoice was paid: PAID with `paid_at = now` (one conditional
/// UPDATE). Marking a PAID invoice again returns it unchanged; a VOID one is
/// INVALID_INPUT.
///
/// It posts nothing: the credits were granted (workspace +amount against
/// `invoice_receivables`) when the invoice was issued, and the payment settles that
/// receivable outside the credit pools, so no workspace balance moves. What is still
/// owed is the total of the OPEN invoices.
pub async fn mark_invoice_paid(
    db: &DatabaseConnection,
    invoice_id: Uuid,
    now: DateTime<Utc>,
) -> Result<invoices::Model> {
    let paid = invoices::Entity::update_many()
        .col_expr(
            invoices::Column::Status,
            Expr::value(InvoiceStatus::Paid.as_str()),
        )
        .col_expr(invoices::Column::PaidAt, Expr::value(now))
        .filter(invoices::Column::Id.eq(invoice_id))
        .filter(invoices::Column::Status.eq(InvoiceStatus::Open))
        .exec_with_returning(db)
        .await?
        .pop();
    if let Some(invoice) = paid {
        return Ok(invoice);
    }
    let invoice = load_invoice(db, invoice_id).await?;
    match invoice.status {
        InvoiceStatus::Paid => Ok(invoice),
        InvoiceStatus::Open | InvoiceStatus::Void => Err(BillingError::invalid(format!(
            "invoice {} is {}; only an OPEN invoice can be paid",
            invoice.number,
            invoice.status.as_str()
        ))),
    }
}

pub async fn load_invoice(db: &DatabaseConnection, id: Uuid) -> Result<invoices::Model> {
    invoices::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("invoice"))
}

/// Ids per query in the batched loaders.
const LOADER_CHUNK: usize = 500;

/// Invoices by id (absent ids are left out). One query per 500 ids.
pub async fn invoices_by_ids(
    db: &DatabaseConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, invoices::Model>> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(LOADER_CHUNK) {
        let rows = invoices::Entity::find()
            .filter(invoices::Column::Id.is_in(chunk.iter().copied()))
            .all(db)
            .await?;
        out.extend(rows.into_iter().map(|i| (i.id, i)));
    }
    Ok(out)
}

/// Each invoice's lines, ordered by position; every requested id has an entry.
pub async fn invoice_lines_by_invoice(
    db: &DatabaseConnection,
    invoice_ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<invoice_lines::Model>>> {
    let mut out: HashMap<Uuid, Vec<invoice_lines::Model>> =
        invoice_ids.iter().map(|id| (*id, Vec::new())).collect();
    for chunk in invoice_ids.chunks(LOADER_CHUNK) {
        let rows = invoice_lines::Entity::find()
            .filter(invoice_lines::Column::InvoiceId.is_in(chunk.iter().copied()))
            .order_by_asc(invoice_lines::Column::InvoiceId)
            .order_by_asc(invoice_lines::Column::Position)
            .all(db)
            .await?;
        for row in rows {
            out.entry(row.invoice_id).or_default().push(row);
        }
    }
    Ok(out)
}

/// Each account's invoices, newest (highest number) first; every requested id has
/// an entry.
pub async fn invoices_by_account(
    db: &DatabaseConnection,
    account_ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<invoices::Model>>> {
    let mut out: HashMap<Uuid, Vec<invoices::Model>> =
        account_ids.iter().map(|id| (*id, Vec::new())).collect();
    for chunk in account_ids.chunks(LOADER_CHUNK) {
        let rows = invoices::Entity::find()
            .filter(invoices::Column::AccountId.is_in(chunk.iter().copied()))
            .order_by_desc(invoices::Column::Sequence)
            .all(db)
            .await?;
        for row in rows {
            out.entry(row.account_id).or_default().push(row);
        }
    }
    Ok(out)
}

// --- the API's entry point, reads ----------------------------------------------------

/// [`purchase_credits`], then the capture job handed to the queue (`jobs`; None: the
/// worker's sweep picks the purchase up) when the purchase is left PENDING. A failed
/// push is only logged: the PENDING row is the record of the work, and the sweep
/// re-enqueues it, as for every job (see `jobs`).
pub async fn buy_credits(
    db: &DatabaseConnection,
    jobs: Option<&dyn crate::jobs::JobSink>,
    req: PurchaseCreditsRequest,
    now: DateTime<Utc>,
) -> Result<Purchased> {
    let purchased = purchase_credits(db, req, now).await?;
    if purchased.purchase.status == PurchaseStatus::Pending
        && let Some(jobs) = jobs
    {
        let purchase_id = purchased.purchase.id;
        let job = crate::jobs::CapturePurchase { purchase_id };
        if let Err(e) = jobs.capture(job).await {
            tracing::warn!(%purchase_id, error = %e, "capture job not pushed");
        }
    }
    Ok(purchased)
}

crate::batch::rows_by_ids!(purchases_by_ids, purchases);

/// A workspace's purchases written or completed at or after `from`, oldest first, at
/// most `limit` (the `purchaseUpdated` feed's poll). A purchase changes state at most
/// twice (written PENDING at `created_at`, completed at `completed_at`), so these are
/// exactly the purchases whose status changed since `from`.
pub async fn purchases_changed_since<C: ConnectionTrait>(
    c: &C,
    workspace_id: Uuid,
    from: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<purchases::Model>> {
    use purchases::Column as P;
    use sea_orm::QuerySelect;
    use sea_orm::sea_query::Condition;
    let changed = Condition::any()
        .add(P::CreatedAt.gte(from))
        .add(P::CompletedAt.gte(from));
    Ok(purchases::Entity::find()
        .filter(P::WorkspaceId.eq(workspace_id))
        .filter(changed)
        .order_by_asc(P::CreatedAt)
        .limit(limit)
        .all(c)
        .await?)
}
