//! Transfers: instant, fee-free moves of credits between workspaces of one account.

use crate::db::begin_write;
use crate::error::{BillingError, Result};
use crate::ids::{IdempotencyKey, new_id, request_hash};
use crate::jobs::{JobSink, WrittenWork};
use crate::ledger::{self, EntrySpec, Guard, LedgerAccount, PostingRefs};
use crate::money::Credits;
use chrono::{DateTime, Utc};
use entity::enums::{BalanceChangeCause, LedgerEntryKind};
use entity::{transfers, workspaces};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait, DatabaseConnection, DatabaseTransaction, EntityTrait,
    IntoActiveModel, QueryFilter,
};
use uuid::Uuid;

/// Longest memo kept with a transfer.
pub const MEMO_LEN_MAX: usize = 500;

#[derive(Clone, Debug)]
pub struct TransferRequest {
    pub from_workspace_id: Uuid,
    pub to_workspace_id: Uuid,
    pub amount: Credits,
    pub memo: Option<String>,
    pub idempotency_key: String,
    pub created_by_user_id: Option<Uuid>,
}

#[derive(Clone, Debug)]
pub struct Transferred {
    pub transfer: transfers::Model,
    pub replayed: bool,
    /// What the transfer started (a reload of the paying workspace, alerts of either),
    /// for the queue; empty for a replay.
    pub written: WrittenWork,
}

/// `transfer`, then the jobs of the work it started (an auto-reload, low-balance
/// e-mails, webhook deliveries) pushed right after its commit, when a queue is given.
pub async fn transfer_credits(
    db: &DatabaseConnection,
    jobs: Option<&dyn JobSink>,
    req: TransferRequest,
    now: DateTime<Utc>,
) -> Result<Transferred> {
    let done = transfer(db, req, now).await?;
    if let Some(jobs) = jobs {
        done.written.push(jobs).await;
    }
    Ok(done)
}

async fn existing_transfer(
    db: &DatabaseConnection,
    account_id: Uuid,
    key: &str,
    hash: &str,
) -> Result<Option<transfers::Model>> {
    let found = transfers::Entity::find()
        .filter(transfers::Column::AccountId.eq(account_id))
        .filter(transfers::Column::IdempotencyKey.eq(key))
        .one(db)
        .await?;
    match found {
        Some(t) if t.request_hash == hash => Ok(Some(t)),
        Some(_) => Err(BillingError::IdempotencyConflict),
        None => Ok(None),
    }
}

/// Moves `amount` from one workspace's available credits to another's, both sides in
/// one transaction. Idempotent on the key within the account.
pub async fn transfer(
    db: &DatabaseConnection,
    req: TransferRequest,
    now: DateTime<Utc>,
) -> Result<Transferred> {
    let key = IdempotencyKey::parse("idempotencyKey", &req.idempotency_key)?;
    let memo = checked_memo(&req)?;
    let from = ledger::load_workspace(db, req.from_workspace_id).await?;
    let to = ledger::load_workspace(db, req.to_workspace_id).await?;
    if from.account_id != to.account_id {
        // Never a hint that a workspace of another account exists.
        return Err(BillingError::NotFound("workspace"));
    }
    let hash = request_hash(&[
        "transfer",
        &from.id.to_string(),
        &to.id.to_string(),
        &req.amount.to_string(),
        memo.as_deref().unwrap_or_default(),
    ]);
    if let Some(transfer) = existing_transfer(db, from.account_id, key.as_str(), &hash).await? {
        return Ok(Transferred {
            transfer,
            replayed: true,
            written: WrittenWork::default(),
        });
    }
    let transfer = transfers::Model {
        id: new_id(),
        account_id: from.account_id,
        from_workspace_id: from.id,
        to_workspace_id: to.id,
        amount_nanos: req.amount.nanos(),
        memo,
        created_by_user_id: req.created_by_user_id,
        idempotency_key: key.as_str().to_owned(),
        request_hash: hash.clone(),
        created_at: now,
    };
    let tx = begin_write(db).await?;
    match transfer_in(&tx, &from, &to, &transfer, now).await {
        Ok(written) => {
            tx.commit().await?;
            Ok(Transferred {
                transfer,
                replayed: false,
                written,
            })
        }
        Err(e) => {
            tx.rollback().await?;
            if e.is_unique_violation()
                && let Some(transfer) =
                    existing_transfer(db, from.account_id, key.as_str(), &hash).await?
            {
                return Ok(Transferred {
                    transfer,
                    replayed: true,
                    written: WrittenWork::default(),
                });
            }
            Err(e)
        }
    }
}

/// Checks the request's own fields (before any read, so bad input costs nothing) and
/// returns its memo, trimmed (None when blank).
fn checked_memo(req: &TransferRequest) -> Result<Option<String>> {
    if !req.amount.is_positive() {
        return Err(BillingError::invalid("amount must be greater than zero"));
    }
    if req.from_workspace_id == req.to_workspace_id {
        return Err(BillingError::invalid(
            "cannot transfer a workspace's credits to itself",
        ));
    }
    let memo = req
        .memo
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_owned);
    if memo
        .as_ref()
        .is_some_and(|m| m.chars().count() > MEMO_LEN_MAX)
    {
        return Err(BillingError::invalid(format!(
            "memo is longer than {MEMO_LEN_MAX} characters"
        )));
    }
    // Line breaks and tabs are text; NUL and the other control characters are not
    // (PostgreSQL refuses NUL outright, SQLite would store it: the backends must agree).
    if memo
        .as_ref()
        .is_some_and(|m| m.chars().any(|c| c.is_control() && c != '\n' && c != '\t'))
    {
        return Err(BillingError::invalid(
            "memo must not contain control characters (other than line breaks and tabs)",
        ));
    }
    Ok(memo)
}

async fn transfer_in(
    tx: &DatabaseTransaction,
    from: &workspaces::Model,
    to: &workspaces::Model,
    transfer: &transfers::Model,
    now: DateTime<Utc>,
) -> Result<WrittenWork> {
    let amount = Credits::from_nanos(transfer.amount_nanos);
    let (from_after, to_after) = move_credits(tx, from.id, to.id, amount).await?;
    transfers::Entity::insert(transfer.clone().into_active_model().reset_all())
        .exec_without_returning(tx)
        .await?;
    let memo = transfer
        .memo
        .as_deref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    ledger::post(
        tx,
        "TRANSFER",
        format!("transfer:{}", transfer.id),
        PostingRefs {
            transfer_id: Some(transfer.id),
            ..Default::default()
        },
        &[
            EntrySpec {
                account: LedgerAccount::Workspace(from.id),
                kind: LedgerEntryKind::TransferOut,
                amount: amount.checked_neg()?,
                balance_after: Some(Credits::from_nanos(from_after.balance_nanos)),
                description: format!("transfer to {}{memo}", to.name),
            },
            EntrySpec {
                account: LedgerAccount::Workspace(to.id),
                kind: LedgerEntryKind::TransferIn,
                amount,
                balance_after: Some(Credits::from_nanos(to_after.balance_nanos)),
                description: format!("transfer from {}{memo}", from.name),
            },
        ],
        now,
    )
    .await?;
    ledger::balance_event(tx, &from_after, BalanceChangeCause::TransferOut, now).await?;
    ledger::balance_event(tx, &to_after, BalanceChangeCause::TransferIn, now).await?;
    let mut written = WrittenWork::default();
    let reload = crate::policies::auto_reload::after_balance_change(tx, &from_after, now).await?;
    written.purchases.extend(reload.map(|p| p.id));
    for ws in [&from_after, &to_after] {
        let crossed = crate::policies::alerts::after_balance_change(tx, ws, now).await?;
        written.notifications.extend(crossed.notifications);
        written
            .webhook_deliveries
            .extend(crossed.webhook_deliveries);
    }
    Ok(written)
}

/// Debits `from` (only if it has `amount` available) and credits `to`; returns both
/// workspaces after the change.
async fn move_credits(
    tx: &DatabaseTransaction,
    from: Uuid,
    to: Uuid,
    amount: Credits,
) -> Result<(workspaces::Model, workspaces::Model)> {
    // Rows are always locked in id order, so two opposite transfers cannot deadlock.
    let debit_first = from < to;
    let mut from_after = None;
    let mut to_after = None;
    for step in 0..2 {
        if (step == 0) == debit_first {
            let ws = ledger::change_workspace(
                tx,
                from,
                amount.checked_neg()?,
                Credits::ZERO,
                Guard::AvailableAtLeast(amount),
                true,
            )
            .await?;
            let Some(ws) = ws else {
                let ws = ledger::load_workspace(tx, from).await?;
                return Err(BillingError::InsufficientCredits {
                    available: ledger::available(&ws),
                });
            };
            from_after = Some(ws);
        } else {
            to_after =
                ledger::change_workspace(tx, to, amount, Credits::ZERO, Guard::None, true).await?;
        }
    }
    let (Some(from_after), Some(to_after)) = (from_after, to_after) else {
        return Err(BillingError::NotFound("workspace"));
    };
    Ok((from_after, to_after))
}

crate::batch::rows_by_ids!(transfers_by_ids, transfers);
