//! A workspace's auto-reload configuration: threshold, amount, card and daily cap.
//!
//! Writes run in one [`begin_write`] transaction and lock the workspace row first
//! (then the settings row), the same order the usage path takes, so they serialise
//! with debits instead of deadlocking against them.

use crate::db::begin_write;
use crate::error::{BillingError, Result};
use crate::money::{Credits, NANOS_PER_CREDIT};
use crate::payments::purchases::{CUSTOM_AMOUNT_CREDITS_MAX, CUSTOM_AMOUNT_CREDITS_MIN};
use chrono::{DateTime, Utc};
use entity::enums::AutoReloadStatus;
use entity::{auto_reload_settings, payment_methods};
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection,
    EntityTrait, IntoActiveModel, QueryFilter, QueryOrder, QuerySelect,
};
use std::collections::HashMap;
use uuid::Uuid;

use crate::ledger::lock_workspace;

// --- auto-reload -------------------------------------------------------------------

/// Most automatic reloads per rolling 24 hours. One an hour is far more than any
/// healthy workspace needs; the cap bounds what a runaway loop (or a stolen key
/// burning credits) can charge to a card in a day.
pub const MAX_RELOADS_PER_DAY_MAX: i32 = 24;

/// Reloads per day of a workspace that never configured auto-reload (the contract's
/// and the table's default).
pub const MAX_RELOADS_PER_DAY_DEFAULT: i32 = 3;

/// Highest auto-reload threshold, in credits: ten times the largest reload. A
/// threshold far above anything a reload can restore would fire a reload on every
/// debit; the cap also catches an amount typed in nanocredits.
pub const AUTO_RELOAD_THRESHOLD_CREDITS_MAX: i64 = 1_000_000;

/// What a workspace wants done when its balance runs low.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AutoReloadInput {
    pub workspace_id: Uuid,
    pub enabled: bool,
    /// Reload when the balance drops below this (0..=[`AUTO_RELOAD_THRESHOLD_CREDITS_MAX`]).
    pub threshold: Credits,
    /// Credits bought per reload: whole cents within the custom purchase bounds.
    pub amount: Credits,
    /// The card to charge; None means the account's default card.
    pub payment_method_id: Option<Uuid>,
    /// 1..=[`MAX_RELOADS_PER_DAY_MAX`].
    pub max_reloads_per_day: i32,
}

fn check_auto_reload(input: &AutoReloadInput) -> Result<()> {
    let threshold_max = Credits::from_whole_credits(AUTO_RELOAD_THRESHOLD_CREDITS_MAX)?;
    if input.threshold.is_negative() || input.threshold > threshold_max {
        return Err(BillingError::invalid(format!(
            "threshold must be between 0 and {threshold_max} credits, got {}",
            input.threshold
        )));
    }
    // The same bounds as a custom purchase: a reload *is* a purchase, and the worker
    // must never be handed one that purchases would refuse.
    let min = Credits::from_whole_credits(CUSTOM_AMOUNT_CREDITS_MIN)?;
    let max = Credits::from_whole_credits(CUSTOM_AMOUNT_CREDITS_MAX)?;
    if input.amount < min || input.amount > max {
        return Err(BillingError::invalid(format!(
            "amount must be between {min} and {max} credits, got {}",
            input.amount
        )));
    }
    if input.amount.to_cents_exact().is_none() {
        return Err(BillingError::invalid(
            "amount must be a whole number of cents",
        ));
    }
    if !(1..=MAX_RELOADS_PER_DAY_MAX).contains(&input.max_reloads_per_day) {
        return Err(BillingError::invalid(format!(
            "maxReloadsPerDay must be between 1 and {MAX_RELOADS_PER_DAY_MAX}, got {}",
            input.max_reloads_per_day
        )));
    }
    Ok(())
}

/// The settings of a workspace that never configured auto-reload: off, no card,
/// threshold zero, the smallest purchase as the amount and the default daily cap.
/// Never stored; `updated_at` is the Unix epoch to say "never configured".
pub fn default_auto_reload(workspace_id: Uuid) -> auto_reload_settings::Model {
    auto_reload_settings::Model {
        workspace_id,
        enabled: false,
        threshold_nanos: 0,
        amount_nanos: CUSTOM_AMOUNT_CREDITS_MIN.saturating_mul(NANOS_PER_CREDIT),
        payment_method_id: None,
        max_reloads_per_day: MAX_RELOADS_PER_DAY_DEFAULT,
        status: AutoReloadStatus::Idle,
        consecutive_failures: 0,
        last_reload_at: None,
        last_failure_reason: None,
        next_attempt_at: None,
        updated_at: DateTime::<Utc>::UNIX_EPOCH,
    }
}

/// The card a configuration will charge: the given one, which must be a live card of
/// the workspace's account (anything else is NOT_FOUND, as a card of another account
/// must not be confirmed to exist), or else the account's default card, if any.
async fn resolve_payment_method<C: ConnectionTrait>(
    c: &C,
    account_id: Uuid,
    given: Option<Uuid>,
) -> Result<Option<Uuid>> {
    use payment_methods::Column as PM;
    if let Some(id) = given {
        return payment_methods::Entity::find_by_id(id)
            .one(c)
            .await?
            .filter(|pm| pm.account_id == account_id && pm.removed_at.is_none())
            .map(|pm| Some(pm.id))
            .ok_or(BillingError::NotFound("payment method"));
    }
    Ok(payment_methods::Entity::find()
        .filter(PM::AccountId.eq(account_id))
        .filter(PM::IsDefault.eq(true))
        .filter(PM::RemovedAt.is_null())
        .order_by_desc(PM::CreatedAt)
        .one(c)
        .await?
        .map(|pm| pm.id))
}

/// Sets a workspace's auto-reload (one row per workspace, created on first use).
///
/// Enabling needs a card: `payment_method_id`, or the account's default card when it
/// is None (no card at all: INVALID_INPUT "add a payment method first"). A disabled
/// configuration may have none; it still stores the card it would use.
///
/// State rules:
/// - Enabling a configuration that was off, or that the system turned off after
///   repeated failures (DISABLED_AFTER_FAILURES), is a fresh start: status IDLE,
///   no consecutive failures, no backoff. This is the only way out of
///   DISABLED_AFTER_FAILURES.
/// - While a reload is in flight (RELOADING) the status is never changed here:
///   the worker that owns that purchase moves it on when the payment settles, and
///   resetting it would allow a second reload for the same crossing.
/// - Any other change keeps status, failures, backoff and history as they are.
///
/// Locks the workspace row, then the settings row (the usage path's order), so it
/// serialises with a debit that is flipping the status to RELOADING.
pub async fn configure_auto_reload(
    db: &DatabaseConnection,
    input: AutoReloadInput,
    now: DateTime<Utc>,
) -> Result<auto_reload_settings::Model> {
    check_auto_reload(&input)?;
    let tx = begin_write(db).await?;
    let ws = lock_workspace(&tx, input.workspace_id).await?;
    let payment_method_id =
        resolve_payment_method(&tx, ws.account_id, input.payment_method_id).await?;
    if input.enabled && payment_method_id.is_none() {
        return Err(BillingError::invalid(
            "add a payment method first: auto-reload needs a card to charge",
        ));
    }
    let existing = auto_reload_settings::Entity::find_by_id(input.workspace_id)
        .lock_exclusive()
        .one(&tx)
        .await?;
    let saved = match existing {
        None => {
            let row = auto_reload_settings::Model {
                enabled: input.enabled,
                threshold_nanos: input.threshold.nanos(),
                amount_nanos: input.amount.nanos(),
                payment_method_id,
                max_reloads_per_day: input.max_reloads_per_day,
                updated_at: now,
                ..default_auto_reload(input.workspace_id)
            };
            auto_reload_settings::Entity::insert(row.clone().into_active_model().reset_all())
                .exec_without_returning(&tx)
                .await?;
            row
        }
        Some(current) => {
            let reenabling = input.enabled
                && (!current.enabled || current.status == AutoReloadStatus::DisabledAfterFailures);
            let in_flight = current.status == AutoReloadStatus::Reloading;
            let mut row = current.into_active_model();
            row.enabled = Set(input.enabled);
            row.threshold_nanos = Set(input.threshold.nanos());
            row.amount_nanos = Set(input.amount.nanos());
            row.payment_method_id = Set(payment_method_id);
            row.max_reloads_per_day = Set(input.max_reloads_per_day);
            row.updated_at = Set(now);
            if reenabling {
                if !in_flight {
                    row.status = Set(AutoReloadStatus::Idle);
                }
                row.consecutive_failures = Set(0);
                row.next_attempt_at = Set(None);
            }
            row.update(&tx).await?
        }
    };
    tx.commit().await?;
    Ok(saved)
}

/// The auto-reload settings of many workspaces in one query (for DataLoaders). Every
/// requested id is in the map: one without a row gets [`default_auto_reload`].
pub async fn auto_reload_for(
    db: &DatabaseConnection,
    workspace_ids: &[Uuid],
) -> Result<HashMap<Uuid, auto_reload_settings::Model>> {
    let mut found: HashMap<Uuid, auto_reload_settings::Model> = if workspace_ids.is_empty() {
        HashMap::new()
    } else {
        auto_reload_settings::Entity::find()
            .filter(auto_reload_settings::Column::WorkspaceId.is_in(workspace_ids.iter().copied()))
            .all(db)
            .await?
            .into_iter()
            .map(|row| (row.workspace_id, row))
            .collect()
    };
    for &id in workspace_ids {
        found.entry(id).or_insert_with(|| default_auto_reload(id));
    }
    Ok(found)
}
