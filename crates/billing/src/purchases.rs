//! Buying credits: a PENDING purchase is written first; once the payment is captured
//! it is credited (amount and bonus as separate ledger entries) exactly once.

use crate::db::begin_write;
use crate::error::{BillingError, Result};
use crate::ids::{IdempotencyKey, new_id, opt_uuid_str, request_hash};
use crate::ledger::{self, EntrySpec, Guard, LedgerAccount, PostingRefs, system_account};
use crate::money::Credits;
use chrono::{DateTime, Utc};
use entity::enums::{BalanceChangeCause, LedgerEntryKind, PurchaseSource, PurchaseStatus};
use entity::{credit_packages, purchases};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait, DatabaseConnection, EntityTrait, IntoActiveModel,
    QueryFilter,
};
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
async fn price_item(
    db: &DatabaseConnection,
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
    let hash = request_hash(&[
        "purchase",
        package_id.as_deref().unwrap_or_default(),
        &amount.to_string(),
        req.source.as_str(),
        &opt_uuid_str(req.payment_method_id),
    ]);
    let existing = purchases::Entity::find()
        .filter(purchases::Column::WorkspaceId.eq(req.workspace_id))
        .filter(purchases::Column::IdempotencyKey.eq(key.as_str()))
        .one(db)
        .await?;
    match existing {
        Some(p) if p.request_hash == hash => {
            return Ok(Purchased {
                purchase: p,
                replayed: true,
            });
        }
        Some(_) => return Err(BillingError::IdempotencyConflict),
        None => {}
    }
    let purchase = purchases::Model {
        id: new_id(),
        workspace_id: req.workspace_id,
        package_id,
        amount_nanos: amount.nanos(),
        bonus_nanos: bonus.nanos(),
        price_nanos: price.nanos(),
        status: PurchaseStatus::Pending,
        source: req.source,
        payment_method_id: req.payment_method_id,
        idempotency_key: key.as_str().to_owned(),
        request_hash: hash,
        failure_reason: None,
        gateway_charge_id: None,
        attempts: 0,
        invoice_id: None,
        created_by_user_id: req.created_by_user_id,
        created_at: now,
        completed_at: None,
    };
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

pub async fn load_purchase(db: &DatabaseConnection, id: Uuid) -> Result<purchases::Model> {
    purchases::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("purchase"))
}

/// Credits a PENDING purchase whose payment was captured: SUCCEEDED, the amount and
/// the bonus as separate ledger entries, the cached balance and a balance event, in
/// one transaction. Crediting a SUCCEEDED purchase again returns it unchanged.
pub async fn credit_purchase(
    db: &DatabaseConnection,
    purchase_id: Uuid,
    gateway_charge_id: Option<String>,
    now: DateTime<Utc>,
) -> Result<purchases::Model> {
    let tx = begin_write(db).await?;
    let succeeded = purchases::Entity::update_many()
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
        .filter(purchases::Column::Status.eq(PurchaseStatus::Pending))
        .exec_with_returning(&tx)
        .await?
        .pop();
    let Some(purchase) = succeeded else {
        tx.rollback().await?;
        let purchase = load_purchase(db, purchase_id).await?;
        return match purchase.status {
            PurchaseStatus::Succeeded => Ok(purchase),
            _ => Err(BillingError::invalid(format!(
                "purchase is {}; only a PENDING purchase can be credited",
                purchase.status.as_str()
            ))),
        };
    };
    let amount = Credits::from_nanos(purchase.amount_nanos);
    let bonus = Credits::from_nanos(purchase.bonus_nanos);
    let ws = ledger::change_workspace(
        &tx,
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
        &tx,
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
    ledger::balance_event(&tx, &ws, BalanceChangeCause::Purchase, now).await?;
    tx.commit().await?;
    Ok(purchase)
}

/// Marks a PENDING purchase FAILED with the gateway's reason; nothing is credited.
pub async fn fail_purchase(
    db: &DatabaseConnection,
    purchase_id: Uuid,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<purchases::Model> {
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
        .exec_with_returning(db)
        .await?
        .pop();
    match failed {
        Some(p) => Ok(p),
        None => {
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
