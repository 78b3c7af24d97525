//! The `purchaseUpdated` feed: a workspace's purchases as their status changes.
//!
//! A purchase changes state at most twice (written PENDING at `created_at`, then
//! SUCCEEDED or FAILED at `completed_at`), so "what changed since t" is the rows with
//! either timestamp after t. Each subscription polls that indexed query; purchases are
//! rare next to usage, so this costs little and needs no extra table. A transaction
//! may commit a little after its timestamp, so each poll looks back `LATE_COMMIT_MS`
//! and drops (purchase, status) pairs already delivered.

use billing::entity::enums::PurchaseStatus;
use billing::entity::purchases;
use billing::payments::purchases::purchases_changed_since;
use billing::sea_orm::DatabaseConnection;
use chrono::{DateTime, Duration, Utc};
use futures::Stream;
use std::collections::{HashMap, VecDeque};
use uuid::Uuid;

/// How often a subscription looks for changes.
pub const POLL_INTERVAL_MS: u64 = 500;
/// How far back each poll looks for transactions that committed late.
const LATE_COMMIT_MS: i64 = 5_000;
/// Rows read per poll.
const ROWS_PER_POLL_MAX: u64 = 200;

struct Feed {
    db: DatabaseConnection,
    workspace_id: Uuid,
    /// Changes at or after this instant (less the look-back) are read.
    since: DateTime<Utc>,
    delivered: HashMap<(Uuid, PurchaseStatus), DateTime<Utc>>,
    ready: VecDeque<purchases::Model>,
}

fn changed_at(p: &purchases::Model) -> DateTime<Utc> {
    p.completed_at.unwrap_or(p.created_at)
}

impl Feed {
    async fn poll(&mut self) -> Result<(), billing::BillingError> {
        let from = self.since - Duration::milliseconds(LATE_COMMIT_MS);
        let rows =
            purchases_changed_since(&self.db, self.workspace_id, from, ROWS_PER_POLL_MAX).await?;
        let mut changes: Vec<_> = rows
            .into_iter()
            .filter(|p| !self.delivered.contains_key(&(p.id, p.status)))
            .collect();
        changes.sort_by_key(changed_at);
        for p in changes {
            let at = changed_at(&p);
            self.since = self.since.max(at);
            self.delivered.insert((p.id, p.status), at);
            self.ready.push_back(p);
        }
        // Forget what can no longer be read again.
        self.delivered.retain(|_, at| *at >= from);
        Ok(())
    }
}

/// Purchases of the workspace whose status changes after now, in order of change.
pub fn purchase_updates(
    db: DatabaseConnection,
    workspace_id: Uuid,
) -> impl Stream<Item = purchases::Model> {
    let now = Utc::now();
    let feed = Feed {
        db,
        workspace_id,
        since: now,
        delivered: HashMap::new(),
        ready: VecDeque::new(),
    };
    futures::stream::unfold((feed, now), |(mut feed, started)| async move {
        loop {
            if let Some(p) = feed.ready.pop_front() {
                // Rows written before the subscription began are not news.
                if changed_at(&p) >= started {
                    return Some((p, (feed, started)));
                }
                continue;
            }
            tokio::time::sleep(std::time::Duration::from_millis(POLL_INTERVAL_MS)).await;
            if let Err(e) = feed.poll().await {
                // Logged here; the next poll tries again.
                tracing::warn!(error = %e, workspace_id = %feed.workspace_id, "purchase feed poll failed");
            }
        }
    })
}
