//! Low-balance alerts: each threshold of a workspace is armed or fired. A balance
//! change that leaves the balance below an armed threshold fires it once (a
//! LowBalanceAlert notification to its recipients) and disarms it; one that leaves
//! the balance at or above a disarmed threshold re-arms it.
//!
//! [`after_balance_change`] runs inside every transaction that changes a balance
//! (debits and credits), after the workspace row was changed, so the row lock (or
//! SQLite's write lock) orders the checks of one workspace; the disarm is also a
//! conditional UPDATE (`armed = true`), so racing debits fire a threshold once.

use crate::error::Result;
use crate::money::Credits;
use crate::policies::notifications::{self, LowBalanceAlert, NotificationPayload};
use crate::reports::analytics;
use crate::webhooks::WebhookEventType;
use crate::webhooks::events as webhooks;
use chrono::{DateTime, Utc};
use entity::{alert_recipients, alert_thresholds, users, workspaces};
use sea_orm::sea_query::{Expr, Query};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

/// The window of the average daily spend behind an alert's projected depletion.
pub const SPEND_WINDOW_DAYS: i64 = 7;

/// The dedupe key of one firing: the threshold and the workspace's balance sequence
/// at the change that crossed it (unique per balance change, so a threshold that
/// re-arms and fires again gets a new key, even within one clock tick).
pub fn alert_dedupe_key(threshold_id: Uuid, balance_sequence: i64) -> String {
    format!("alert:{threshold_id}:{balance_sequence}")
}

/// Checks the workspace's thresholds against its balance as `ws` shows it (the row
/// as the caller's change left it), inside the caller's transaction: fires (and
/// disarms) armed thresholds above the balance, re-arms fired ones at or below it.
/// Also writes the `balance.low` / `balance.recovered` webhook events. Returns the
/// ids of the notifications and webhook deliveries written, for the caller to
/// enqueue after commit (the worker's sweep finds them otherwise).
///
/// Cost: one indexed SELECT of the workspace's thresholds (a handful of rows); writes
/// only on a crossing.
pub async fn after_balance_change<C: ConnectionTrait>(
    c: &C,
    ws: &workspaces::Model,
    now: DateTime<Utc>,
) -> Result<Crossings> {
    use alert_thresholds::Column as T;
    let thresholds = alert_thresholds::Entity::find()
        .filter(T::WorkspaceId.eq(ws.id))
        .order_by_desc(T::AmountNanos)
        .all(c)
        .await?;
    after_balance_change_with(c, ws, &thresholds, now).await
}

/// [`after_balance_change`] with the workspace's thresholds already read, highest
/// first (the debit engine reads every workspace's of a batch at once, under the
/// workspace locks, and only these functions and threshold changes, which also take
/// the workspace lock, change them).
pub(crate) async fn after_balance_change_with<C: ConnectionTrait>(
    c: &C,
    ws: &workspaces::Model,
    thresholds: &[alert_thresholds::Model],
    now: DateTime<Utc>,
) -> Result<Crossings> {
    use alert_thresholds::Column as T;
    let mut crossings = Crossings::default();
    for threshold in thresholds {
        let below = ws.balance_nanos < threshold.amount_nanos;
        if threshold.armed && below {
            let disarmed = alert_thresholds::Entity::update_many()
                .col_expr(T::Armed, Expr::value(false))
                .col_expr(T::LastTriggeredAt, Expr::value(now))
                .filter(T::Id.eq(threshold.id))
                .filter(T::Armed.eq(true))
                .exec(c)
                .await?;
            if disarmed.rows_affected == 1 {
                crossings.webhook_deliveries.extend(
                    webhooks::threshold_crossed(
                        c,
                        ws,
                        threshold,
                        WebhookEventType::BalanceLow,
                        now,
                    )
                    .await?,
                );
                if let Some(id) = fire(c, ws, threshold, now).await? {
                    crossings.notifications.push(id);
                }
            }
        } else if !threshold.armed && !below {
            let rearmed = alert_thresholds::Entity::update_many()
                .col_expr(T::Armed, Expr::value(true))
                .filter(T::Id.eq(threshold.id))
                .filter(T::Armed.eq(false))
                .exec(c)
                .await?;
            if rearmed.rows_affected == 1 {
                crossings.webhook_deliveries.extend(
                    webhooks::threshold_crossed(
                        c,
                        ws,
                        threshold,
                        WebhookEventType::BalanceRecovered,
                        now,
                    )
                    .await?,
                );
            }
        }
    }
    Ok(crossings)
}

/// What a balance change's threshold checks wrote, to push after the commit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Crossings {
    pub notifications: Vec<Uuid>,
    pub webhook_deliveries: Vec<Uuid>,
}

/// The e-mail addresses of a threshold's recipients, sorted.
pub async fn recipient_emails<C: ConnectionTrait>(
    c: &C,
    threshold_id: Uuid,
) -> Result<Vec<String>> {
    let emails: Vec<String> = users::Entity::find()
        .select_only()
        .column(users::Column::Email)
        .filter(
            users::Column::Id.in_subquery(
                Query::select()
                    .column(alert_recipients::Column::UserId)
                    .from(alert_recipients::Entity)
                    .and_where(alert_recipients::Column::AlertThresholdId.eq(threshold_id))
                    .to_owned(),
            ),
        )
        .order_by_asc(users::Column::Email)
        .into_tuple()
        .all(c)
        .await?;
    Ok(emails)
}

/// Writes the LowBalanceAlert of a threshold that just fired.
async fn fire<C: ConnectionTrait>(
    c: &C,
    ws: &workspaces::Model,
    threshold: &alert_thresholds::Model,
    now: DateTime<Utc>,
) -> Result<Option<Uuid>> {
    let recipients = recipient_emails(c, threshold.id).await?;
    if recipients.is_empty() {
        return Ok(None);
    }
    let balance = Credits::from_nanos(ws.balance_nanos);
    let spend = analytics::average_daily_spend(c, &[ws.id], SPEND_WINDOW_DAYS, now)
        .await?
        .get(&ws.id)
        .copied()
        .unwrap_or(Credits::ZERO);
    let payload = NotificationPayload::LowBalanceAlert(LowBalanceAlert {
        workspace_id: ws.id,
        workspace_name: ws.name.clone(),
        severity: threshold.severity,
        threshold: Credits::from_nanos(threshold.amount_nanos),
        balance,
        projected_depletion_at: analytics::projected_depletion_at(balance, spend, now),
    });
    notifications::enqueue_notification(
        c,
        Some(ws.account_id),
        Some(ws.id),
        &recipients,
        &payload,
        &alert_dedupe_key(threshold.id, ws.balance_sequence),
        now,
    )
    .await
}
