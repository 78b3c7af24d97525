//! A workspace's low-balance alert thresholds and the members each one e-mails.
//!
//! Writes run in one [`begin_write`] transaction and lock the workspace row first
//! (then the threshold rows), the same order the usage path takes.

use crate::db::begin_write;
use crate::error::{BillingError, Result};
use crate::ids::new_id;
use crate::money::Credits;
use chrono::{DateTime, Utc};
use entity::enums::{AccountRole, AlertSeverity};
use entity::{account_members, alert_recipients, alert_thresholds, workspace_members, workspaces};
use sea_orm::sea_query::Query;
use sea_orm::{
    ActiveModelTrait as _, ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection,
    EntityTrait, IntoActiveModel, QueryFilter, QueryOrder,
};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

use crate::ledger::lock_workspace;

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
    /// The threshold (named `amount`, as in the contract): fires when the balance falls
    /// below it (> 0).
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
