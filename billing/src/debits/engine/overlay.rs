//! Pipelining on PostgreSQL: what a batch leaves behind for the next batch of its
//! lane, so that batch can be read and judged while this one commits.
//!
//! # Why
//!
//! A batch holds the hot workspace's row lock from its read to its commit. Without
//! pipelining, the next batch's read waits for that lock, and only then are its rows
//! read, judged and written: the lock chain per batch is read + judge + write +
//! commit. With it, the next batch reads without locks (a snapshot that does not yet
//! see this batch), takes this batch's rows as it left them from the [`Overlay`], is
//! judged, and writes as soon as this batch has committed: the chain is write +
//! commit, and the read and judgement overlap it.
//!
//! # Why it is safe
//!
//! - Every UPDATE of the write is conditional on the values judged against (the
//!   workspace's balance sequence, the project's counters; `write_pg`), so a row that
//!   is not what the overlay said (another process's batch, a purchase, a rollback of
//!   this batch) fails the speculative batch, which is then run again under its locks.
//! - [`Overlay::apply`] refuses to combine a snapshot with an overlay when the
//!   snapshot's row is neither the one this batch started from nor the one it left
//!   (something else committed in between): the batch is read again under its locks.
//!   So a refusal (insufficient credits, a cap) is never judged on a stale row.
//! - The next batch writes (and so commits and answers) only once this batch's commit
//!   is known to have succeeded (`engine::wait_for_previous`); otherwise it is run
//!   again under its locks. A refusal or a replay decided on this batch's state is never answered if
//!   that state did not commit.
//! - Request ids this batch used are in the overlay, so the next batch answers their
//!   replays; one used by another process since the snapshot is caught by the unique
//!   `(workspace_id, request_id)` key, which fails the batch (run again, it replays).
//!
//! Only batches of usage records run speculatively: holds, settlements and releases
//! touch reservation rows the overlay does not carry, and are read under their locks.

#![deny(clippy::arithmetic_side_effects)]

use super::rules::{ProjectState, State, WorkspaceState};
use entity::{projects, reservations as reservation_rows, usage_events, workspaces};
use std::collections::HashMap;
use uuid::Uuid;

/// A batch's rows as it left them, before its commit.
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    /// Workspace id → (the balance sequence the batch started from, the row after).
    workspaces: HashMap<Uuid, (i64, workspaces::Model)>,
    /// Project id → (the row the batch started from, the row after).
    projects: HashMap<Uuid, (projects::Model, projects::Model)>,
    used_usage: HashMap<(Uuid, String), usage_events::Model>,
    used_reserve: HashMap<(Uuid, String), reservation_rows::Model>,
}

impl Overlay {
    /// The overlay of a written batch: its changed workspace and project rows, and
    /// the usage events and holds it created (events with their ledger transaction).
    pub(crate) fn of(
        state: &State,
        events: Vec<usage_events::Model>,
        new_reservations: Vec<reservation_rows::Model>,
        posted: &HashMap<Uuid, i64>,
    ) -> Self {
        let workspaces = state
            .workspaces
            .values()
            .filter(|w| w.cause.is_some())
            .map(|w| (w.row.id, (w.before.balance_sequence, w.row.clone())))
            .collect();
        let projects = state
            .projects
            .values()
            .filter(|p| p.row != p.before)
            .map(|p| (p.row.id, (p.before.clone(), p.row.clone())))
            .collect();
        let used_usage = events
            .into_iter()
            .map(|mut e| {
                e.ledger_transaction_id = posted.get(&e.id).copied();
                ((e.workspace_id, e.request_id.clone()), e)
            })
            .collect();
        let used_reserve = new_reservations
            .into_iter()
            .map(|r| ((r.workspace_id, r.request_id.clone()), r))
            .collect();
        Self {
            workspaces,
            projects,
            used_usage,
            used_reserve,
        }
    }

    /// Lays the overlay over a snapshot read without locks. False when a row of the
    /// snapshot is neither what the previous batch started from nor what it left:
    /// the state must then be read again under the locks.
    pub(crate) fn apply(&self, state: &mut State) -> bool {
        for ws in state.workspaces.values_mut() {
            let Some((before_sequence, after)) = self.workspaces.get(&ws.row.id) else {
                continue;
            };
            let found = ws.row.balance_sequence;
            if found == after.balance_sequence {
                continue; // the previous batch has committed: the snapshot has it
            }
            if found != *before_sequence {
                return false;
            }
            // The snapshot's other columns are as fresh; only the money moved.
            let mut row = ws.row.clone();
            row.balance_nanos = after.balance_nanos;
            row.reserved_nanos = after.reserved_nanos;
            row.balance_sequence = after.balance_sequence;
            *ws = WorkspaceState::new(row);
        }
        for project in state.projects.values_mut() {
            let Some((before, after)) = self.projects.get(&project.row.id) else {
                continue;
            };
            if project.row == *after {
                continue;
            }
            if project.row != *before {
                return false;
            }
            *project = ProjectState::new(after.clone());
        }
        for (key, event) in &self.used_usage {
            state.used_usage.insert(key.clone(), event.clone());
        }
        for (key, hold) in &self.used_reserve {
            state.used_reserve.insert(key.clone(), hold.clone());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn workspace(sequence: i64, balance_nanos: i64) -> workspaces::Model {
        workspaces::Model {
            id: Uuid::from_u128(7),
            account_id: Uuid::from_u128(1),
            name: "main".into(),
            balance_nanos,
            reserved_nanos: 0,
            balance_sequence: sequence,
            created_at: Utc::now(),
        }
    }

    fn state_with(row: workspaces::Model) -> State {
        State {
            workspaces: HashMap::from([(row.id, WorkspaceState::new(row))]),
            discounts: HashMap::new(),
            models: HashMap::new(),
            projects: HashMap::new(),
            members: Default::default(),
            reservations: HashMap::new(),
            used_usage: HashMap::new(),
            used_reserve: HashMap::new(),
            reload_settings: HashMap::new(),
            thresholds: HashMap::new(),
        }
    }

    /// A batch that moved the workspace from sequence 4 to 5.
    fn overlay() -> Overlay {
        let mut previous = state_with(workspace(4, 100));
        if let Some(ws) = previous.workspaces.get_mut(&Uuid::from_u128(7)) {
            ws.row = workspace(5, 60);
            ws.cause = Some(entity::enums::BalanceChangeCause::Usage);
        }
        Overlay::of(&previous, Vec::new(), Vec::new(), &HashMap::new())
    }

    fn balance(state: &State) -> (i64, i64) {
        let ws = &state.workspaces[&Uuid::from_u128(7)];
        (ws.row.balance_sequence, ws.row.balance_nanos)
    }

    #[test]
    fn an_uncommitted_batch_is_laid_over_the_snapshot() {
        let mut state = state_with(workspace(4, 100));
        assert!(overlay().apply(&mut state));
        assert_eq!(balance(&state), (5, 60));
        let ws = &state.workspaces[&Uuid::from_u128(7)];
        assert_eq!(
            ws.before, ws.row,
            "the next write is conditional on sequence 5"
        );
    }

    #[test]
    fn a_committed_batch_is_already_in_the_snapshot() {
        let mut state = state_with(workspace(5, 60));
        assert!(overlay().apply(&mut state));
        assert_eq!(balance(&state), (5, 60));
    }

    #[test]
    fn anything_else_committed_in_between_is_refused() {
        for (sequence, balance_nanos) in [(3, 100), (6, 1_000)] {
            let mut state = state_with(workspace(sequence, balance_nanos));
            assert!(!overlay().apply(&mut state), "sequence {sequence}");
        }
    }
}
