//! Settings that shape how money moves without moving any: an account's pricing
//! agreement, the model catalog, API key revocation, a workspace's auto-reload and
//! low-balance alerts, and cost estimates.
//!
//! Every function validates its input before it writes anything and reports a bad
//! field as INVALID_INPUT with a message naming the field and the allowed range. Writes that read before they write run in one
//! [`begin_write`] transaction and lock the workspace row first (then the settings
//! rows), the same order the usage path takes, so they serialise with debits
//! instead of deadlocking against them.

use crate::accounts::Name;
use crate::budget;
use crate::db::begin_write;
use crate::error::{BillingError, Result};
use crate::ids::new_id;
use crate::ledger::{self, load_workspace};
use crate::money::{Credits, DiscountBps, NANOS_PER_CREDIT};
use crate::pricing::{self, CostBreakdown, TokenPrice};
use crate::purchases::{CUSTOM_AMOUNT_CREDITS_MAX, CUSTOM_AMOUNT_CREDITS_MIN};
use crate::usage::{ProjectRef, account_discount, active_model, budget_remaining, resolve_project};
use chrono::{DateTime, Utc};
use entity::enums::{AccountRole, AlertSeverity, AutoReloadStatus};
use entity::{
    account_members, accounts, alert_recipients, alert_thresholds, api_keys, auto_reload_settings,
    models, payment_methods, workspace_members, workspaces,
};
use sea_orm::sea_query::{Expr, OnConflict, Query};
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection,
    EntityTrait, IntoActiveModel, QueryFilter, QueryOrder, QuerySelect,
};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

// --- pricing agreement -------------------------------------------------------------

/// Longest payment term for invoice billing, in days. A year covers every real
/// enterprise contract (net 30/60/90 are usual); anything longer is a typo or credit
/// the platform would never extend.
pub const PAYMENT_TERMS_DAYS_MAX: i32 = 365;

/// Sets an account's enterprise terms: verification (which allows invoice billing),
/// the volume discount taken off every usage charge, and the payment terms of its
/// invoices (0..=[`PAYMENT_TERMS_DAYS_MAX`] days; 0 means due on issue).
///
/// The new discount applies to usage priced from now on; charges already recorded
/// keep their price. NOT_FOUND for an unknown account. One conditional UPDATE, so
/// there is nothing to race with.
pub async fn set_pricing_agreement(
    db: &DatabaseConnection,
    account_id: Uuid,
    verified: bool,
    volume_discount: DiscountBps,
    payment_terms_days: i32,
    _now: DateTime<Utc>,
) -> Result<accounts::Model> {
    if !(0..=PAYMENT_TERMS_DAYS_MAX).contains(&payment_terms_days) {
        return Err(BillingError::invalid(format!(
            "paymentTermsDays must be between 0 and {PAYMENT_TERMS_DAYS_MAX}, \
             got {payment_terms_days}"
        )));
    }
    use accounts::Column as A;
    let mut rows = accounts::Entity::update_many()
        .col_expr(A::Verified, Expr::value(verified))
        .col_expr(
            A::VolumeDiscountBps,
            Expr::value(i32::from(volume_discount.bps())),
        )
        .col_expr(A::PaymentTermsDays, Expr::value(payment_terms_days))
        .filter(A::Id.eq(account_id))
        .exec_with_returning(db)
        .await?;
    rows.pop().ok_or(BillingError::NotFound("account"))
}

// --- model catalog -----------------------------------------------------------------

/// Longest model id. Ids are what the gateway sends with every usage record and
/// what appears on invoices, so they stay short and printable.
pub const MODEL_ID_LEN_MAX: usize = 100;

/// Highest price per million tokens of either kind: 10 000 credits. Real prices are
/// a few credits to a few hundred; the cap catches a price entered in nanocredits or
/// per token instead of per million before it drains customers' balances.
pub const MODEL_PRICE_PER_MILLION_MAX: Credits = Credits::from_nanos(10_000 * NANOS_PER_CREDIT);

/// A model as the platform admin describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInput {
    /// e.g. `"openai/gpt-4o"`: 1..=[`MODEL_ID_LEN_MAX`] characters of `a-z 0-9 . _ - / :`.
    pub id: String,
    /// Display name, 1..=[`crate::accounts::NAME_LEN_MAX`] characters (trimmed).
    pub name: String,
    pub prompt_price_per_million: Credits,
    pub completion_price_per_million: Credits,
    /// False retires the model: it takes no new usage but keeps its history.
    pub active: bool,
}

/// Checks a model id. Upper case is refused rather than folded: the id is matched
/// exactly when usage is recorded, so silently storing another spelling than the one
/// the admin typed would make the gateway's requests fail as "unknown model".
fn check_model_id(id: &str) -> Result<()> {
    let allowed = |c: char| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/' | ':')
    };
    if id.is_empty() || id.len() > MODEL_ID_LEN_MAX || !id.chars().all(allowed) {
        return Err(BillingError::invalid(format!(
            "model id must be 1 to {MODEL_ID_LEN_MAX} characters of lowercase letters, \
             digits and . _ - / :"
        )));
    }
    Ok(())
}

fn check_model_price(field: &str, price: Credits) -> Result<()> {
    if price.is_negative() || price > MODEL_PRICE_PER_MILLION_MAX {
        return Err(BillingError::invalid(format!(
            "{field} must be between 0 and {MODEL_PRICE_PER_MILLION_MAX} credits, got {price}"
        )));
    }
    Ok(())
}

/// Creates a model or updates the one with this id (name, prices, active flag,
/// `updated_at`; `created_at` is kept). Deactivating (`active = false`) keeps the row,
/// so past usage, reservations and rollups still point at it; new usage of it is
/// refused by [`crate::usage`]. New prices apply to usage priced from now on.
///
/// One `INSERT … ON CONFLICT (id) DO UPDATE … RETURNING`, so concurrent upserts of
/// the same id cannot fail on the primary key.
pub async fn upsert_model(
    db: &DatabaseConnection,
    input: ModelInput,
    now: DateTime<Utc>,
) -> Result<models::Model> {
    check_model_id(&input.id)?;
    let name = Name::parse("name", &input.name)?;
    check_model_price("promptPricePerMillion", input.prompt_price_per_million)?;
    check_model_price(
        "completionPricePerMillion",
        input.completion_price_per_million,
    )?;
    use models::Column as M;
    let row = models::ActiveModel {
        id: Set(input.id),
        name: Set(name.as_str().to_owned()),
        prompt_price_per_million_nanos: Set(input.prompt_price_per_million.nanos()),
        completion_price_per_million_nanos: Set(input.completion_price_per_million.nanos()),
        active: Set(input.active),
        created_at: Set(now),
        updated_at: Set(now),
    };
    let model = models::Entity::insert(row)
        .on_conflict(
            OnConflict::column(M::Id)
                .update_columns([
                    M::Name,
                    M::PromptPricePerMillionNanos,
                    M::CompletionPricePerMillionNanos,
                    M::Active,
                    M::UpdatedAt,
                ])
                .to_owned(),
        )
        .exec_with_returning(db)
        .await?;
    Ok(model)
}

/// The catalog ordered by id (byte order, sorted here rather than in SQL so the
/// order is the same on every backend and collation); retired models only with
/// `include_inactive`.
pub async fn list_models(
    db: &DatabaseConnection,
    include_inactive: bool,
) -> Result<Vec<models::Model>> {
    let mut query = models::Entity::find();
    if !include_inactive {
        query = query.filter(models::Column::Active.eq(true));
    }
    let mut rows = query.all(db).await?;
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(rows)
}

// --- API keys ----------------------------------------------------------------------

/// Revokes a workspace API key: it authenticates nothing from now on. Idempotent:
/// revoking a revoked key changes nothing and returns it with its original
/// `revoked_at`, so a retried request reports when the key actually stopped working.
/// NOT_FOUND for an unknown key.
pub async fn revoke_api_key(
    db: &DatabaseConnection,
    api_key_id: Uuid,
    now: DateTime<Utc>,
) -> Result<api_keys::Model> {
    use api_keys::Column as K;
    api_keys::Entity::update_many()
        .col_expr(K::RevokedAt, Expr::value(now))
        .filter(K::Id.eq(api_key_id))
        .filter(K::RevokedAt.is_null())
        .exec(db)
        .await?;
    api_keys::Entity::find_by_id(api_key_id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("API key"))
}

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

// --- low-balance alerts ------------------------------------------------------------

/// Most alert thresholds per workspace. A handful (say "warning at 100, urgent at
/// 20") is the real need; the cap keeps the per-debit check and the emails bounded.
pub const ALERT_THRESHOLDS_MAX: usize = 10;

/// Most recipients of one alert threshold: a team, not a mailing list (each one is an
/// address on every alert email).
pub const ALERT_RECIPIENTS_MAX: usize = 20;

/// Highest alert amount, in credits; far above any working balance, and it catches
/// an amount typed in nanocredits.
pub const ALERT_AMOUNT_CREDITS_MAX: i64 = 1_000_000;

/// One low-balance alert as the workspace admin describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertThresholdInput {
    /// Fires when the balance falls below this (> 0).
    pub amount: Credits,
    pub severity: AlertSeverity,
    /// Members of the workspace who get the email (duplicates are ignored).
    pub recipient_ids: Vec<Uuid>,
}

/// A threshold with its recipients' user ids (sorted).
pub type ThresholdWithRecipients = (alert_thresholds::Model, Vec<Uuid>);

/// Validates the list as a whole and returns each threshold's recipients without
/// duplicates (first occurrence kept).
fn check_alert_thresholds(thresholds: &[AlertThresholdInput]) -> Result<Vec<Vec<Uuid>>> {
    if thresholds.len() > ALERT_THRESHOLDS_MAX {
        return Err(BillingError::invalid(format!(
            "at most {ALERT_THRESHOLDS_MAX} alert thresholds per workspace, got {}",
            thresholds.len()
        )));
    }
    let amount_max = Credits::from_whole_credits(ALERT_AMOUNT_CREDITS_MAX)?;
    let mut amounts = HashSet::new();
    let mut recipients = Vec::with_capacity(thresholds.len());
    for t in thresholds {
        if !t.amount.is_positive() || t.amount > amount_max {
            return Err(BillingError::invalid(format!(
                "alert amount must be greater than 0 and at most {amount_max} credits, got {}",
                t.amount
            )));
        }
        if !amounts.insert(t.amount) {
            return Err(BillingError::invalid(format!(
                "alert amounts must be distinct: {} appears more than once",
                t.amount
            )));
        }
        if t.recipient_ids.len() > ALERT_RECIPIENTS_MAX {
            return Err(BillingError::invalid(format!(
                "at most {ALERT_RECIPIENTS_MAX} recipients per alert threshold, got {}",
                t.recipient_ids.len()
            )));
        }
        let mut seen = HashSet::new();
        let mut unique: Vec<Uuid> = t
            .recipient_ids
            .iter()
            .copied()
            .filter(|id| seen.insert(*id))
            .collect();
        unique.sort_unstable();
        recipients.push(unique);
    }
    Ok(recipients)
}

/// Refuses, naming the first offender in input order, any recipient who is not a
/// member of the workspace: someone with a workspace membership (any role), or an
/// OWNER/ADMIN of the workspace's account (who administer every workspace of it).
async fn check_recipients<C: ConnectionTrait>(
    c: &C,
    ws: &workspaces::Model,
    thresholds: &[AlertThresholdInput],
) -> Result<()> {
    let wanted: Vec<Uuid> = thresholds
        .iter()
        .flat_map(|t| t.recipient_ids.iter().copied())
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let unique: HashSet<Uuid> = wanted.iter().copied().collect();
    let mut members: HashSet<Uuid> = workspace_members::Entity::find()
        .filter(workspace_members::Column::WorkspaceId.eq(ws.id))
        .filter(workspace_members::Column::UserId.is_in(unique.iter().copied()))
        .all(c)
        .await?
        .into_iter()
        .map(|m| m.user_id)
        .collect();
    members.extend(
        account_members::Entity::find()
            .filter(account_members::Column::AccountId.eq(ws.account_id))
            .filter(account_members::Column::UserId.is_in(unique.iter().copied()))
            .filter(account_members::Column::Role.is_in([AccountRole::Owner, AccountRole::Admin]))
            .all(c)
            .await?
            .into_iter()
            .map(|m| m.user_id),
    );
    match wanted.into_iter().find(|id| !members.contains(id)) {
        Some(outsider) => Err(BillingError::invalid(format!(
            "recipient {outsider} is not a member of the workspace"
        ))),
        None => Ok(()),
    }
}

/// Replaces a workspace's low-balance alerts with `thresholds`, in one transaction:
/// the old thresholds and their recipients are deleted and the new ones inserted
/// (an empty list removes them all). Returns them by amount, highest first.
///
/// At most [`ALERT_THRESHOLDS_MAX`], amounts distinct and within
/// 0 < amount <= [`ALERT_AMOUNT_CREDITS_MAX`] credits, at most
/// [`ALERT_RECIPIENTS_MAX`] recipients each, every recipient a member of the
/// workspace (INVALID_INPUT naming the first who is not).
///
/// A new threshold starts **armed** unless the balance is already below its amount;
/// then it starts **disarmed**, as if it had fired. An alert reports a crossing, and
/// that crossing happened before the threshold existed: arming it would email
/// everybody on the next debit, however small, for news that is old. It re-arms when
/// the balance rises back to or above the amount, like any fired threshold. A
/// replaced threshold with the same amount passes on its `last_triggered_at`, so
/// editing recipients does not erase when the alert last fired.
///
/// The workspace row is locked first, so the balance compared here is the one the
/// next debit will start from, and no debit's alert check sees half the new list.
pub async fn set_alert_thresholds(
    db: &DatabaseConnection,
    workspace_id: Uuid,
    thresholds: Vec<AlertThresholdInput>,
    now: DateTime<Utc>,
) -> Result<Vec<ThresholdWithRecipients>> {
    let recipients = check_alert_thresholds(&thresholds)?;
    let tx = begin_write(db).await?;
    let ws = lock_workspace(&tx, workspace_id).await?;
    check_recipients(&tx, &ws, &thresholds).await?;

    use alert_thresholds::Column as T;
    let old = alert_thresholds::Entity::find()
        .filter(T::WorkspaceId.eq(workspace_id))
        .all(&tx)
        .await?;
    let last_triggered: HashMap<i64, DateTime<Utc>> = old
        .iter()
        .filter_map(|t| t.last_triggered_at.map(|at| (t.amount_nanos, at)))
        .collect();
    if !old.is_empty() {
        alert_recipients::Entity::delete_many()
            .filter(alert_recipients::Column::AlertThresholdId.is_in(old.iter().map(|t| t.id)))
            .exec(&tx)
            .await?;
        alert_thresholds::Entity::delete_many()
            .filter(T::WorkspaceId.eq(workspace_id))
            .exec(&tx)
            .await?;
    }

    let mut saved: Vec<ThresholdWithRecipients> = thresholds
        .iter()
        .zip(recipients)
        .map(|(t, users)| {
            let row = alert_thresholds::Model {
                id: new_id(),
                workspace_id,
                amount_nanos: t.amount.nanos(),
                severity: t.severity,
                armed: ws.balance_nanos >= t.amount.nanos(),
                last_triggered_at: last_triggered.get(&t.amount.nanos()).copied(),
                created_at: now,
            };
            (row, users)
        })
        .collect();
    if !saved.is_empty() {
        alert_thresholds::Entity::insert_many(
            saved
                .iter()
                .map(|(row, _)| row.clone().into_active_model().reset_all()),
        )
        .exec_without_returning(&tx)
        .await?;
        let links: Vec<alert_recipients::ActiveModel> = saved
            .iter()
            .flat_map(|(row, users)| {
                users.iter().map(|&user_id| alert_recipients::ActiveModel {
                    alert_threshold_id: Set(row.id),
                    user_id: Set(user_id),
                })
            })
            .collect();
        if !links.is_empty() {
            alert_recipients::Entity::insert_many(links)
                .exec_without_returning(&tx)
                .await?;
        }
    }
    tx.commit().await?;
    saved.sort_by_key(|(threshold, _)| std::cmp::Reverse(threshold.amount_nanos));
    Ok(saved)
}

/// The alert thresholds of many workspaces in two queries (for DataLoaders), each
/// workspace's list by amount, highest first, with sorted recipient ids. Every
/// requested id is in the map (an empty list when it has none).
pub async fn alert_thresholds_for(
    db: &DatabaseConnection,
    workspace_ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<ThresholdWithRecipients>>> {
    let mut out: HashMap<Uuid, Vec<ThresholdWithRecipients>> =
        workspace_ids.iter().map(|&id| (id, Vec::new())).collect();
    if workspace_ids.is_empty() {
        return Ok(out);
    }
    use alert_thresholds::Column as T;
    let rows = alert_thresholds::Entity::find()
        .filter(T::WorkspaceId.is_in(workspace_ids.iter().copied()))
        .order_by_desc(T::AmountNanos)
        .all(db)
        .await?;
    // The recipients of the same thresholds, selected by workspace in a subquery so
    // the parameter count does not grow with the number of thresholds.
    let links = alert_recipients::Entity::find()
        .filter(
            alert_recipients::Column::AlertThresholdId.in_subquery(
                Query::select()
                    .column(T::Id)
                    .from(alert_thresholds::Entity)
                    .and_where(T::WorkspaceId.is_in(workspace_ids.iter().copied()))
                    .to_owned(),
            ),
        )
        .order_by_asc(alert_recipients::Column::UserId)
        .all(db)
        .await?;
    let mut by_threshold: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    for link in links {
        by_threshold
            .entry(link.alert_threshold_id)
            .or_default()
            .push(link.user_id);
    }
    for row in rows {
        let mut users = by_threshold.remove(&row.id).unwrap_or_default();
        // Sorted here too: UUID order in SQL differs between backends (text on
        // SQLite, bytes on PostgreSQL), and callers compare lists.
        users.sort_unstable();
        out.entry(row.workspace_id).or_default().push((row, users));
    }
    Ok(out)
}

// --- cost estimates ----------------------------------------------------------------

/// What a request would cost, before it is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub model: models::Model,
    /// List prices, the discount taken off and the total that would be charged.
    pub breakdown: CostBreakdown,
    /// With a workspace: whether the charge fits its available credits (and its
    /// project's remaining budget) right now. None without a workspace.
    pub affordable: Option<bool>,
}

/// Prices `prompt_tokens` + `completion_tokens` on an active model exactly as
/// recording the usage would (same rounding, same token limits).
///
/// Without a workspace: list price, no discount, `affordable` None. With a
/// workspace (and optionally one of its projects): the account's volume discount
/// applies and `affordable` says whether the total fits the workspace's available
/// credits (balance − reserved) and, for a capped project, what is left of its
/// budget this period. A project whose period has ended counts its spend as zero
/// (the next debit would roll it over); held credits still count. Reads only: a
/// quote never rolls a period or writes anything.
///
/// Errors: INVALID_INPUT for an unknown or retired model or token counts out of
/// range; NOT_FOUND for an unknown workspace or a project not in it.
pub async fn estimate_cost(
    db: &DatabaseConnection,
    model_id: &str,
    prompt_tokens: i64,
    completion_tokens: i64,
    workspace: Option<(Uuid, Option<Uuid>)>,
    now: DateTime<Utc>,
) -> Result<Estimate> {
    let model = active_model(db, model_id).await?;
    let price = TokenPrice {
        prompt_per_million: Credits::from_nanos(model.prompt_price_per_million_nanos),
        completion_per_million: Credits::from_nanos(model.completion_price_per_million_nanos),
    };
    let Some((workspace_id, project_id)) = workspace else {
        let breakdown =
            pricing::usage_cost(price, prompt_tokens, completion_tokens, DiscountBps::ZERO)?;
        return Ok(Estimate {
            model,
            breakdown,
            affordable: None,
        });
    };
    let ws = load_workspace(db, workspace_id).await?;
    let project = match project_id {
        Some(id) => resolve_project(db, workspace_id, &ProjectRef::Id(id)).await?,
        None => None,
    };
    let discount = account_discount(db, ws.account_id).await?;
    let breakdown = pricing::usage_cost(price, prompt_tokens, completion_tokens, discount)?;
    let mut affordable = breakdown.total <= ledger::available(&ws);
    if let Some(mut project) = project {
        let start = budget::period_start(project.budget_period, now, project.budget_period_start);
        if start > project.budget_period_start {
            project.budget_spent_nanos = 0;
        }
        affordable &= breakdown.total <= budget_remaining(&project);
    }
    Ok(Estimate {
        model,
        breakdown,
        affordable: Some(affordable),
    })
}

// --- helpers -----------------------------------------------------------------------

/// Loads a workspace, locking its row on PostgreSQL (`FOR UPDATE`; SQLite's
/// `BEGIN IMMEDIATE` already holds the database's write lock). NOT_FOUND if absent.
async fn lock_workspace<C: ConnectionTrait>(c: &C, id: Uuid) -> Result<workspaces::Model> {
    workspaces::Entity::find_by_id(id)
        .lock_exclusive()
        .one(c)
        .await?
        .ok_or(BillingError::NotFound("workspace"))
}
