//! Whether this process's job workers can poll their queues, for `/readyz` (the
//! worker-only process's own, and `reservoir serve`'s, which also covers its API).
//!
//! Two signals, both kept up to date in the background so that a probe request only
//! reads them and never waits on a database:
//! - a probe task pings the queue's pool and the money database every
//!   [`PROBE_INTERVAL`], each ping bounded by [`PROBE_TIMEOUT`]; a success older than
//!   [`STALE_AFTER`] no longer counts (a stopped server, a pool that cannot connect,
//!   or the probe task gone);
//! - each job worker's supervisor marks its kind down from the moment the apalis
//!   worker ends on an error until it is started again (during the restart backoff
//!   nobody polls that queue).

use crate::queue::Queue;
use billing::sea_orm::DatabaseConnection;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

/// How often the queue and the database are pinged.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// The longest a ping may take before it counts as a failure.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// A success older than this no longer counts.
pub const STALE_AFTER: Duration = Duration::from_millis(1_000);

/// The job workers' last known ability to poll, shared by the supervisors, the probe
/// task and whoever answers `/readyz`.
#[derive(Debug)]
pub struct WorkerHealth {
    started: Instant,
    /// When the last successful ping ended, in ms since `started`, plus one (0: never).
    queue_ok_at: AtomicU64,
    database_ok_at: AtomicU64,
    /// Job worker kinds that ended on an error and wait to be started again.
    down: Mutex<BTreeSet<&'static str>>,
}

/// What `/readyz` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub queue: bool,
    pub database: bool,
    pub workers_down: Vec<&'static str>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.queue && self.database && self.workers_down.is_empty()
    }
}

impl WorkerHealth {
    /// Not ready until the first pings answer.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            queue_ok_at: AtomicU64::new(0),
            database_ok_at: AtomicU64::new(0),
            down: Mutex::new(BTreeSet::new()),
        })
    }

    fn now_mark(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    fn fresh(&self, ok_at: &AtomicU64) -> bool {
        let at = ok_at.load(Ordering::Acquire);
        at != 0 && self.now_mark().saturating_sub(at) < STALE_AFTER.as_millis() as u64
    }

    pub fn readiness(&self) -> Readiness {
        Readiness {
            queue: self.fresh(&self.queue_ok_at),
            database: self.fresh(&self.database_ok_at),
            workers_down: self
                .down
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .copied()
                .collect(),
        }
    }

    /// A supervisor's report: its job worker ended on an error (`true`), or was
    /// started (again).
    pub(crate) fn set_down(&self, kind: &'static str, down: bool) {
        let mut set = self.down.lock().unwrap_or_else(PoisonError::into_inner);
        if down {
            set.insert(kind);
        } else {
            set.remove(kind);
        }
    }

    fn record(&self, ok_at: &AtomicU64, ok: bool) {
        if ok {
            ok_at.store(self.now_mark(), Ordering::Release);
        }
    }
}

impl billing::jobs::WorkerReadiness for WorkerHealth {
    fn unready(&self) -> Option<String> {
        let r = self.readiness();
        if r.is_ready() {
            return None;
        }
        let mut why = Vec::new();
        if !r.queue {
            why.push("job queue unreachable".to_owned());
        }
        if !r.database {
            why.push("database unreachable".to_owned());
        }
        if !r.workers_down.is_empty() {
            why.push(format!("job workers down: {}", r.workers_down.join(", ")));
        }
        Some(why.join("; "))
    }
}

/// Pings until `stop` is set or the last `Arc` of the state is gone; a stopped
/// worker is therefore unready within [`STALE_AFTER`].
pub(crate) async fn probe_loop(
    db: DatabaseConnection,
    queue: Queue,
    health: Weak<WorkerHealth>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    // After a slow ping, carry on from now rather than firing the missed ticks at once.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
            _ = ticks.tick() => {}
        }
        let (queue_ok, database_ok) = tokio::join!(
            tokio::time::timeout(PROBE_TIMEOUT, queue.ping()),
            billing::db::ping_within(&db, PROBE_TIMEOUT),
        );
        let Some(health) = health.upgrade() else {
            return;
        };
        let queue_ok = matches!(queue_ok, Ok(Ok(())));
        if !queue_ok {
            tracing::debug!("queue readiness ping failed");
        }
        health.record(&health.queue_ok_at, queue_ok);
        health.record(&health.database_ok_at, database_ok.is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use billing::jobs::WorkerReadiness as _;

    #[test]
    fn unready_until_pinged_and_while_a_worker_is_down() {
        let h = WorkerHealth::new();
        assert!(h.unready().is_some(), "never pinged");
        h.record(&h.queue_ok_at, true);
        h.record(&h.database_ok_at, true);
        assert_eq!(h.unready(), None);
        h.set_down("email", true);
        let why = h.unready().unwrap_or_default();
        assert!(why.contains("job workers down: email"), "{why}");
        h.set_down("email", false);
        assert_eq!(h.unready(), None);
    }
}
