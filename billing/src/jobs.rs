//! Background jobs: their payloads (ids only: the row is the truth, the job a nudge)
//! and the seam through which the API hands work to the queue after a commit.
//!
//! A job is never the only record of work: the state that needs it (a PENDING
//! purchase, an unsent notification) is a row written in the business transaction;
//! the push happens after the commit, and the worker's sweep re-enqueues rows still
//! waiting. So a failed push delays work, never loses it, and every handler is
//! idempotent.

pub mod ops;

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use uuid::Uuid;

/// Queue names are fixed strings, never Rust type names: renaming a struct must not
/// strand queued jobs.
pub const CAPTURE_QUEUE: &str = "reservoir.capture_purchase.v1";
pub const DELIVERY_QUEUE: &str = "reservoir.deliver_notification.v1";
pub const WEBHOOK_QUEUE: &str = "reservoir.deliver_webhook.v1";

/// Capture the payment of a PENDING purchase and credit it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapturePurchase {
    pub purchase_id: Uuid,
}

/// Send one notification's e-mail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverNotification {
    pub notification_id: Uuid,
}

/// Make one attempt of a webhook delivery (the row says when it is due).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverWebhook {
    pub delivery_id: Uuid,
}

pub type PushFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// Where jobs are pushed. Errors are strings: the caller only logs them (the sweep
/// will pick the work up), so there is nothing to match on.
pub trait JobSink: Send + Sync {
    fn capture(&self, job: CapturePurchase) -> PushFuture<'_>;
    fn deliver(&self, job: DeliverNotification) -> PushFuture<'_>;
    /// Pushes nothing unless implemented: the sweep enqueues due deliveries.
    fn deliver_webhook(&self, _job: DeliverWebhook) -> PushFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

/// Whether this process's job workers can take work, for `/readyz`: implemented by
/// the worker, read by the API of an all-in-one process (`reservoir serve`), whose
/// readiness must also cover the workers running inside it.
pub trait WorkerReadiness: Send + Sync {
    /// `None` when every job worker can poll its queue; else why not.
    fn unready(&self) -> Option<String>;
}

/// Work a transaction wrote for the jobs to do (reload purchases to capture,
/// notifications to send, webhook deliveries to POST): pushed right after its commit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WrittenWork {
    pub purchases: Vec<Uuid>,
    pub notifications: Vec<Uuid>,
    pub webhook_deliveries: Vec<Uuid>,
}

impl WrittenWork {
    /// Pushes one job per row. A failed push loses nothing: the rows are PENDING and
    /// the worker's sweep enqueues them.
    pub async fn push(&self, jobs: &dyn JobSink) {
        for &purchase_id in &self.purchases {
            if let Err(e) = jobs.capture(CapturePurchase { purchase_id }).await {
                tracing::warn!(%purchase_id, error = %e, "capture job not pushed");
            }
        }
        for &notification_id in &self.notifications {
            if let Err(e) = jobs.deliver(DeliverNotification { notification_id }).await {
                tracing::warn!(%notification_id, error = %e, "delivery job not pushed");
            }
        }
        crate::webhooks::delivery::push(jobs, self.webhook_deliveries.iter().copied()).await;
    }
}

/// A sink that pushes nothing: the sweep does all the enqueueing (tests, tools).
pub struct NoQueue;

impl JobSink for NoQueue {
    fn capture(&self, _job: CapturePurchase) -> PushFuture<'_> {
        Box::pin(async { Ok(()) })
    }
    fn deliver(&self, _job: DeliverNotification) -> PushFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}
