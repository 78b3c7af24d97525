//! Webhook delivery: one attempt per job. The handler claims the delivery, POSTs the
//! event's body signed with the endpoint's secret, and hands the outcome to
//! `billing::webhooks::delivery`, which decides what follows (delivered, a retry at
//! the policy's next time, or DEAD); a retry is pushed as a delayed job. Runs in its
//! own apalis worker, so a slow receiver never delays the sweeps.

use billing::retry::RetryPolicy;
use billing::webhooks::delivery::{self, ATTEMPT_TIMEOUT, AttemptOutcome, Next};
use billing::webhooks::signing;
use chrono::Utc;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Longest part of a receiver's error answer kept as `last_error`.
const ANSWER_EXCERPT_MAX: usize = 200;
const USER_AGENT: &str = concat!("Reservoir-Webhooks/", env!("CARGO_PKG_VERSION"));

/// What sending needs: the HTTP client and the retry schedule.
#[derive(Clone)]
pub struct Sender {
    http: reqwest::Client,
    pub policy: RetryPolicy,
}

impl Sender {
    pub fn new(policy: RetryPolicy) -> crate::anyhow_free::Result<Self> {
        let failed = |e: String| crate::anyhow_free::Error(format!("webhook client: {e}"));
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config().map_err(failed)?)
            .user_agent(USER_AGENT)
            .timeout(ATTEMPT_TIMEOUT)
            .connect_timeout(ATTEMPT_TIMEOUT)
            // A redirect is an answer that is not 2xx: the receiver must fix its URL.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| failed(e.to_string()))?;
        Ok(Self { http, policy })
    }

    /// One POST: the outcome as the domain reads it.
    pub async fn post(
        &self,
        url: &str,
        secret: &str,
        event_id: Uuid,
        body: String,
    ) -> AttemptOutcome {
        let header = signing::header_value(secret, Utc::now().timestamp(), body.as_bytes());
        let sent = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(signing::SIGNATURE_HEADER, header)
            .header("Reservoir-Event-Id", event_id.to_string())
            .body(body)
            .send()
            .await;
        match sent {
            Ok(answer) if answer.status().is_success() => AttemptOutcome::Answered {
                status: answer.status().as_u16(),
                error: None,
            },
            Ok(answer) => {
                let status = answer.status().as_u16();
                let excerpt: String = answer
                    .text()
                    .await
                    .unwrap_or_default()
                    .chars()
                    .take(ANSWER_EXCERPT_MAX)
                    .collect();
                AttemptOutcome::Answered {
                    status,
                    error: Some(format!("HTTP {status}: {excerpt}")),
                }
            }
            Err(e) if e.is_timeout() => AttemptOutcome::NoAnswer {
                error: format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs()),
            },
            Err(e) => AttemptOutcome::NoAnswer {
                error: format!("request failed: {e}"),
            },
        }
    }
}

/// rustls with the ring provider and the webpki roots, handed to reqwest ready made
/// (STACK.md, trap 15), as the Stripe adapter does.
fn tls_config() -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots: rustls::RootCertStore = webpki_roots::TLS_SERVER_ROOTS.iter().cloned().collect();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// One attempt of a delivery; returns the wait before the next one when it failed
/// and is to be retried.
pub async fn attempt(
    db: &billing::sea_orm::DatabaseConnection,
    sender: &Sender,
    delivery_id: Uuid,
) -> billing::Result<Option<Duration>> {
    let now = Utc::now();
    let Some(attempt) = delivery::claim(db, delivery_id, now).await? else {
        let early = delivery::not_due_until(db, delivery_id, now).await?;
        return Ok(early.map(|at| (at - now).to_std().unwrap_or_default()));
    };
    let outcome = sender
        .post(
            &attempt.url,
            &attempt.secret,
            attempt.event_id,
            attempt.body,
        )
        .await;
    match delivery::record(db, delivery_id, &outcome, &sender.policy, Utc::now()).await? {
        Next::RetryAfter(delay) => Ok(Some(delay)),
        Next::Delivered | Next::Dead | Next::Gone => Ok(None),
    }
}

/// Attempts deliveries left due past `after` by the queue (the fallback for jobs the
/// queue did not run), in a task of its own so that a slow receiver never delays the
/// sweeps; at most one such task runs at a time. Claim-based, so racing the queue's
/// jobs is harmless.
pub fn spawn_overdue(
    db: billing::sea_orm::DatabaseConnection,
    sender: Sender,
    after: Duration,
    running: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    if running.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async move {
        let before = Utc::now() - chrono::Duration::from_std(after).unwrap_or_default();
        match delivery::due(&db, before, delivery::DUE_BATCH_MAX).await {
            Ok(ids) => {
                for id in ids {
                    if let Err(e) = attempt(&db, &sender, id).await {
                        tracing::warn!(delivery_id = %id, error = %e, "direct webhook attempt failed");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "overdue webhook deliveries not read"),
        }
        running.store(false, Ordering::Release);
    });
}
