//! The worker process: background work over `billing`. Today it runs the periodic
//! sweeps (expired reservations, budget periods); payment capture, auto-reload and
//! emails on the durable queue build on the same loop.

use billing::sea_orm::DatabaseConnection;
use std::future::Future;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Time between two sweeps.
    pub sweep_interval_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            sweep_interval_ms: 5_000,
        }
    }
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub reservations_expired: u64,
    pub budget_periods_rolled: u64,
}

/// One pass of every sweep. Each step is idempotent, so several workers sweeping at
/// once (or a sweep repeated after a crash) change nothing twice.
pub async fn sweep(db: &DatabaseConnection) -> billing::Result<SweepReport> {
    let now = chrono::Utc::now();
    Ok(SweepReport {
        reservations_expired: billing::reservations::expire_due(db, now).await?,
        budget_periods_rolled: billing::usage::roll_budget_periods(db, now).await?,
    })
}

/// Runs the sweeps until `shutdown` resolves; a sweep in progress finishes first.
pub async fn run(db: DatabaseConnection, config: WorkerConfig, shutdown: impl Future<Output = ()>) {
    let mut ticker =
        tokio::time::interval(Duration::from_millis(config.sweep_interval_ms.max(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = ticker.tick() => match sweep(&db).await {
                Ok(report) if report != SweepReport::default() => tracing::info!(
                    reservations_expired = report.reservations_expired,
                    budget_periods_rolled = report.budget_periods_rolled,
                    "sweep"
                ),
                Ok(_) => {}
                // Logged here, where it is handled: the next tick tries again.
                Err(e) => tracing::error!(error = %e, code = %e.code(), "sweep failed"),
            },
        }
    }
    tracing::info!("worker stopped");
}
