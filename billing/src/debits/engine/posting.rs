//! The ledger side of usage: what a batch posts for the usage events it recorded.
//!
//! Each recorded event yields a [`Posting`] (its workspace pool −charge,
//! `usage_revenue` +cost, `usage_shortfall` −shortfall). Before the write,
//! [`per_workspace`] folds a batch's postings into one per workspace: one ledger
//! transaction whose entries carry the sums, and whose id every event it covers keeps
//! in `usage_events.ledger_transaction_id`. A debit then writes one heap row (its
//! event) instead of four, and the ledger keeps its rules (docs/LEDGER.md §3):
//! each transaction sums to zero, each workspace entry's `balance_after` is the
//! running sum (the batch holds the workspace's lock, so no other entry interleaves,
//! and only usage moves a balance inside a batch), and a workspace's USAGE entries
//! total −Σ(cost − shortfall) of its events.
//!
//! A transaction of one event is exactly what every usage transaction was before
//! batching (key `usage:<event>`, `usage_event_id` set, the event's own description),
//! so a lone debit, and every row written before this change, reads the same.

#![deny(clippy::arithmetic_side_effects)]

use crate::debits::usage::usage_description;
use crate::error::{BillingError, Result};
use crate::ledger::system_account;
use crate::money::Credits;
use chrono::{DateTime, Utc};
use entity::enums::LedgerEntryKind;
use entity::{ledger_entries, usage_events};
use sea_orm::ActiveValue::Set;
use std::collections::HashMap;
use uuid::Uuid;

/// The usage a batch posts to one workspace, before it has a transaction id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Posting {
    pub workspace_id: Uuid,
    /// The usage events it posts, in the order they were judged (never empty).
    pub event_ids: Vec<Uuid>,
    /// Taken from the workspace's pool: Σ(cost − shortfall).
    pub charge: Credits,
    /// Σ priced cost, what `usage_revenue` earns.
    pub cost: Credits,
    /// Σ shortfall, posted against `usage_shortfall`.
    pub shortfall: Credits,
    /// The workspace's balance after the last of the events.
    pub balance_after_nanos: i64,
    /// What the entries say: the event's own description while it is alone.
    pub description: String,
    /// When the last of the events was judged; the transaction's time.
    pub now: DateTime<Utc>,
}

impl Posting {
    /// One event's posting: `charge` is what its workspace paid, the rest of its cost
    /// is its shortfall.
    pub(crate) fn of_event(
        event: &usage_events::Model,
        charge: Credits,
        balance_after_nanos: i64,
        now: DateTime<Utc>,
    ) -> Result<Self> {
        let (cost, shortfall) = (
            Credits::from_nanos(event.cost_nanos),
            Credits::from_nanos(event.shortfall_nanos),
        );
        if charge.checked_add(shortfall)? != cost {
            return Err(BillingError::Internal(format!(
                "usage posting of {} does not cover its cost",
                event.id
            )));
        }
        Ok(Posting {
            workspace_id: event.workspace_id,
            event_ids: vec![event.id],
            charge,
            cost,
            shortfall,
            balance_after_nanos,
            description: usage_description(event),
            now,
        })
    }

    /// The transaction's unique key: `usage:<event>` for one event (as before
    /// batching), `usage-batch:<first event>` for several. An event is posted by one
    /// transaction only, so the first event names the transaction.
    pub(crate) fn idempotency_key(&self) -> String {
        let first = self.event_ids.first().copied().unwrap_or_default();
        if self.event_ids.len() == 1 {
            format!("usage:{first}")
        } else {
            format!("usage-batch:{first}")
        }
    }

    /// `ledger_transactions.usage_event_id`: the event, when there is only one.
    pub(crate) fn usage_event_id(&self) -> Option<Uuid> {
        match self.event_ids.as_slice() {
            [only] => Some(*only),
            _ => None,
        }
    }

    /// Adds a later event of the same workspace in the same batch.
    fn absorb(&mut self, later: Posting) -> Result<()> {
        debug_assert_eq!(self.workspace_id, later.workspace_id);
        self.charge = self.charge.checked_add(later.charge)?;
        self.cost = self.cost.checked_add(later.cost)?;
        self.shortfall = self.shortfall.checked_add(later.shortfall)?;
        self.balance_after_nanos = later.balance_after_nanos;
        self.now = later.now;
        self.event_ids.extend(later.event_ids);
        self.description = format!("usage of {} requests", self.event_ids.len());
        Ok(())
    }

    /// The transaction's entries: the pool −charge, `usage_revenue` +cost, and
    /// `usage_shortfall` −shortfall when there is one. INTERNAL if they do not sum to
    /// zero (they always do: charge + shortfall = cost is checked per event).
    pub(crate) fn entries(&self) -> Result<Vec<ledger_entries::ActiveModel>> {
        let entry = |workspace_id: Option<Uuid>,
                     system: Option<&str>,
                     amount: Credits,
                     description: String| ledger_entries::ActiveModel {
            workspace_id: Set(workspace_id),
            system_account: Set(system.map(str::to_owned)),
            kind: Set(LedgerEntryKind::Usage),
            amount_nanos: Set(amount.nanos()),
            balance_after_nanos: Set(workspace_id.map(|_| self.balance_after_nanos)),
            description: Set(description),
            created_at: Set(self.now),
            ..Default::default()
        };
        let revenue = Some(system_account::USAGE_REVENUE);
        let mut entries = vec![
            entry(
                Some(self.workspace_id),
                None,
                self.charge.checked_neg()?,
                self.description.clone(),
            ),
            entry(None, revenue, self.cost, self.description.clone()),
        ];
        if !self.shortfall.is_zero() {
            let uncollected = format!("uncollected: {}", self.description);
            let system = Some(system_account::USAGE_SHORTFALL);
            entries.push(entry(
                None,
                system,
                self.shortfall.checked_neg()?,
                uncollected,
            ));
        }
        let total = Credits::checked_sum([
            self.charge.checked_neg()?,
            self.cost,
            self.shortfall.checked_neg()?,
        ])?;
        if !total.is_zero() {
            return Err(BillingError::Internal(format!(
                "unbalanced usage posting for {}",
                self.workspace_id
            )));
        }
        Ok(entries)
    }
}

/// One posting per workspace, in the order each workspace first appears; each one's
/// events in the order they were judged.
pub(crate) fn per_workspace(postings: Vec<Posting>) -> Result<Vec<Posting>> {
    let mut merged: Vec<Posting> = Vec::new();
    let mut index: HashMap<Uuid, usize> = HashMap::new();
    for posting in postings {
        match index.get(&posting.workspace_id) {
            Some(&i) => {
                let into = merged
                    .get_mut(i)
                    .ok_or_else(|| BillingError::Internal("posting index out of range".into()))?;
                into.absorb(posting)?;
            }
            None => {
                index.insert(posting.workspace_id, merged.len());
                merged.push(posting);
            }
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(workspace_id: Uuid, cost_nanos: i64, shortfall_nanos: i64) -> usage_events::Model {
        usage_events::Model {
            id: Uuid::now_v7(),
            workspace_id,
            project_id: None,
            user_id: None,
            api_key_id: None,
            model_id: "m".into(),
            prompt_tokens: 1,
            completion_tokens: 2,
            cost_nanos,
            shortfall_nanos,
            request_id: "r".into(),
            request_hash: "h".into(),
            reservation_id: None,
            ledger_transaction_id: None,
            created_at: Utc::now(),
        }
    }

    fn posting(e: &usage_events::Model, balance_after: i64) -> Posting {
        let cost = Credits::from_nanos(e.cost_nanos);
        let charge = cost
            .checked_sub(Credits::from_nanos(e.shortfall_nanos))
            .expect("shortfall within the cost");
        Posting::of_event(e, charge, balance_after, e.created_at).expect("balanced")
    }

    fn amounts(p: &Posting) -> Vec<(Option<String>, i64, Option<i64>)> {
        p.entries()
            .expect("balanced")
            .into_iter()
            .map(|e| {
                let system = e.system_account.clone().unwrap();
                (
                    system,
                    e.amount_nanos.unwrap(),
                    e.balance_after_nanos.unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn one_event_posts_as_before_batching() {
        let e = event(Uuid::now_v7(), 700, 0);
        let merged = per_workspace(vec![posting(&e, 300)]).expect("merged");
        let [p] = merged.as_slice() else {
            panic!("one posting expected")
        };
        assert_eq!(p.idempotency_key(), format!("usage:{}", e.id));
        assert_eq!(p.usage_event_id(), Some(e.id));
        assert_eq!(p.description, usage_description(&e));
        assert_eq!(
            amounts(p),
            vec![
                (None, -700, Some(300)),
                (Some("usage_revenue".into()), 700, None)
            ]
        );
    }

    #[test]
    fn a_batch_posts_once_per_workspace_with_the_sums() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let (a1, b1, a2, a3) = (
            event(a, 100, 0),
            event(b, 50, 0),
            event(a, 30, 0),
            event(a, 40, 15),
        );
        let postings = vec![
            posting(&a1, 900),
            posting(&b1, 450),
            posting(&a2, 870),
            posting(&a3, 845),
        ];
        let merged = per_workspace(postings).expect("merged");
        assert_eq!(merged.len(), 2);
        let (pa, pb) = (&merged[0], &merged[1]);
        assert_eq!(pa.event_ids, vec![a1.id, a2.id, a3.id]);
        assert_eq!(pa.idempotency_key(), format!("usage-batch:{}", a1.id));
        assert_eq!(pa.usage_event_id(), None);
        assert_eq!(pa.description, "usage of 3 requests");
        assert_eq!(
            amounts(pa),
            vec![
                (None, -155, Some(845)),
                (Some("usage_revenue".into()), 170, None),
                (Some("usage_shortfall".into()), -15, None),
            ]
        );
        assert_eq!(pb.idempotency_key(), format!("usage:{}", b1.id));
        assert_eq!(amounts(pb).iter().map(|e| e.1).sum::<i64>(), 0);
    }

    #[test]
    fn a_charge_that_does_not_cover_the_cost_is_refused() {
        let e = event(Uuid::now_v7(), 100, 10);
        let wrong = Posting::of_event(&e, Credits::from_nanos(100), 0, e.created_at);
        assert!(matches!(wrong, Err(BillingError::Internal(_))));
    }
}
