//! Readiness from a cached health state: a background task pings the database on a
//! fixed schedule, each ping bounded by its own short timeout, and `/readyz` only
//! reads the last answer. A probe request therefore never waits on the database (a
//! load balancer's 1 s probe timeout is never hit during an outage), and the state
//! turns "not ready" within one interval plus one ping timeout of the database
//! going away.

use billing::sea_orm::DatabaseConnection;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How often the database is pinged.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// The longest a ping may take before it counts as a failure.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// A success older than this no longer counts (the probe task is stuck or gone).
pub const STALE_AFTER: Duration = Duration::from_millis(1_000);

/// The last probe's answer, shared by every HTTP worker of the process.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    ready: AtomicBool,
    /// When the last successful ping ended, in milliseconds since `started`.
    ok_at_ms: AtomicU64,
}

impl Health {
    /// Starts the probe task; it ends when the last `Arc` of the state is dropped.
    /// Until the first ping answers, the process is not ready.
    pub fn start(db: DatabaseConnection) -> Arc<Self> {
        let health = Arc::new(Self {
            started: Instant::now(),
            ready: AtomicBool::new(false),
            ok_at_ms: AtomicU64::new(0),
        });
        tokio::spawn(probe_loop(db, Arc::downgrade(&health)));
        health
    }

    /// Ready: the last ping succeeded, and recently.
    pub fn is_ready(&self) -> bool {
        let ok_at = Duration::from_millis(self.ok_at_ms.load(Ordering::Acquire));
        self.ready.load(Ordering::Acquire)
            && self.started.elapsed().saturating_sub(ok_at) < STALE_AFTER
    }

    fn record(&self, ok: bool) {
        if ok {
            let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.ok_at_ms.store(now, Ordering::Release);
        }
        let was = self.ready.swap(ok, Ordering::AcqRel);
        if was != ok {
            tracing::warn!(ready = ok, "database readiness changed");
        }
    }
}

async fn probe_loop(db: DatabaseConnection, health: Weak<Health>) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    // After a slow ping, carry on from now rather than firing the missed ticks at once.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let answer = billing::db::ping_within(&db, PROBE_TIMEOUT).await;
        let Some(health) = health.upgrade() else {
            return;
        };
        if let Err(e) = &answer {
            tracing::debug!(error = %e, "readiness ping failed");
        }
        health.record(answer.is_ok());
    }
}
