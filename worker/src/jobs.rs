//! Job handlers: thin, over `billing`. Each loads its row, does its one outside call
//! (the gateway, the mail server), and hands the outcome back to the domain.

use crate::queue::Queue;
use apalis::prelude::{BoxDynError, Data};
use billing::jobs::ops::{JOB_STATS, JobOutcome, WorkKind};
use billing::jobs::{CapturePurchase, DeliverNotification, DeliverWebhook};
use billing::payments::capture::{self, Next, Verdict};
use billing::payments::{GatewayError, PaymentGateway};
use billing::policies::notifications;
use billing::sea_orm::DatabaseConnection;
use chrono::Utc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest a charge may take before it counts as a transient failure (retried with
/// the same idempotency key, so a charge that did go through is not made twice).
pub const CHARGE_TIMEOUT_MS: u64 = 30_000;

/// What the handlers share.
pub struct Deps {
    pub db: DatabaseConnection,
    pub queue: Queue,
    pub gateway: Arc<dyn PaymentGateway>,
    pub charge_timeout: Duration,
    pub mailer: crate::email::Mailer,
    /// The From: of every e-mail.
    pub email_from: String,
    pub webhooks: crate::webhooks::Sender,
    /// When failed e-mail deliveries are retried, and how many attempts are made.
    pub notification_retry: billing::retry::RetryPolicy,
}

/// One capture attempt: charge through the gateway (bounded by the charge timeout) and
/// apply the outcome. Returns the backoff before the next attempt after a transient
/// failure, None when the purchase is settled either way.
pub async fn capture_once(
    deps: &Deps,
    purchase_id: uuid::Uuid,
) -> Result<Option<Duration>, BoxDynError> {
    let Next::Charge(request) = capture::prepare(&deps.db, purchase_id, Utc::now()).await? else {
        return Ok(None);
    };
    let outcome =
        match tokio::time::timeout(deps.charge_timeout, deps.gateway.charge(request)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(GatewayError::Transient(
                "the gateway did not answer in time".into(),
            )),
        };
    Ok(
        match capture::apply(&deps.db, purchase_id, outcome, Utc::now()).await? {
            Verdict::Done => {
                push_notifications(deps, purchase_id).await;
                None
            }
            Verdict::RetryAfter(delay) => Some(delay),
        },
    )
}

/// Pushes the e-mails a settled purchase wrote (receipt, reload failure) to the queue
/// right after the settlement committed. A failed push is only logged: the sweep
/// re-enqueues PENDING notifications, so the e-mail is late, never lost.
async fn push_notifications(deps: &Deps, purchase_id: uuid::Uuid) {
    let ids = match notifications::pending_for_purchase(&deps.db, purchase_id).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!(%purchase_id, error = %e, "could not list the purchase's e-mails; the sweep will send them");
            return;
        }
    };
    for notification_id in ids {
        if let Err(e) = deps
            .queue
            .push_delivery(DeliverNotification { notification_id }, None)
            .await
        {
            tracing::warn!(%notification_id, error = %e, "push failed; the sweep will send it");
        }
    }
}

/// Counts a job run in this process's `JOB_STATS` (shown on `/metrics`).
fn record<T, E>(kind: WorkKind, started: Instant, result: &Result<Option<T>, E>) {
    let outcome = match result {
        Ok(None) => JobOutcome::Done,
        Ok(Some(_)) => JobOutcome::Retry,
        Err(_) => JobOutcome::Error,
    };
    JOB_STATS.record(kind, outcome, started.elapsed());
}

pub async fn capture_purchase(
    job: CapturePurchase,
    deps: Data<Arc<Deps>>,
) -> Result<(), BoxDynError> {
    let started = Instant::now();
    let result = capture_once(&deps, job.purchase_id).await;
    record(WorkKind::Capture, started, &result);
    if let Some(delay) = result? {
        tracing::warn!(purchase_id = %job.purchase_id, delay_ms = delay.as_millis() as u64, "charge failed transiently; retrying");
        deps.queue.push_capture(job, Some(delay)).await?;
    }
    // The capture's transaction wrote webhook events (purchase, invoice, reload);
    // push their deliveries now rather than wait for the sweep.
    billing::webhooks::delivery::push_due(&deps.db, &deps.queue, Utc::now()).await;
    Ok(())
}

/// One delivery attempt of a notification, as the job and the sweep's fallback make
/// it; returns the wait before the next attempt when it failed and is to be retried.
pub async fn deliver_once(
    deps: &Deps,
    id: uuid::Uuid,
) -> Result<Option<Duration>, crate::email::DeliveryError> {
    let now = Utc::now();
    let outcome = crate::email::deliver_with(
        &deps.db,
        &deps.mailer,
        id,
        &deps.email_from,
        &deps.notification_retry,
        now,
    )
    .await;
    match outcome {
        // A job early for its row (a queue whose clock has whole seconds runs a
        // delayed job up to a second early) waits out the rest: dropping it would
        // leave the retry to the sweep.
        Ok(crate::email::DeliveryOutcome::NotDue { due_at }) => {
            Ok(Some((due_at - now).to_std().unwrap_or_default()))
        }
        Ok(outcome) => {
            tracing::debug!(notification_id = %id, ?outcome, "notification handled");
            Ok(None)
        }
        // Recorded on the row (attempts, last error, next attempt or DEAD).
        Err(crate::email::DeliveryError::Failed { retry_after, .. }) => Ok(retry_after),
        Err(e) => Err(e),
    }
}

pub async fn deliver_notification(
    job: DeliverNotification,
    deps: Data<Arc<Deps>>,
) -> Result<(), BoxDynError> {
    let id = job.notification_id;
    let started = Instant::now();
    let result = deliver_once(&deps, id).await;
    record(WorkKind::Email, started, &result);
    match result {
        // The retry is durable twice: this delayed job, and the row's
        // next_attempt_at, which the sweep reads if the job is lost.
        Ok(Some(delay)) => {
            deps.queue.push_delivery(job, Some(delay)).await?;
            Ok(())
        }
        Ok(None) => Ok(()),
        // The database could not be reached: apalis tries the job again, and the
        // sweep re-enqueues the row if the job's attempts run out first.
        Err(e) if e.is_retryable() => Err(e.into()),
        Err(e) => {
            tracing::error!(notification_id = %id, error = %e, "e-mail not deliverable");
            Err(apalis::prelude::AbortError::new(e).into())
        }
    }
}

pub async fn deliver_webhook(
    job: DeliverWebhook,
    deps: Data<Arc<Deps>>,
) -> Result<(), BoxDynError> {
    let id = job.delivery_id;
    let started = Instant::now();
    let result = crate::webhooks::attempt(&deps.db, &deps.webhooks, id).await;
    record(WorkKind::Webhook, started, &result);
    if let Some(delay) = result? {
        // The retry is durable twice: this delayed job, and the row's next_attempt_at,
        // which the sweep reads if the job is lost.
        deps.queue.push_webhook(job, Some(delay)).await?;
    }
    Ok(())
}
