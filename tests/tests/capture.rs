//! The capture rules the worker's job follows: transient failures retry with a
//! growing backoff and end FAILED after the bounded attempts; a decline fails at once;
//! a removed card fails without a charge.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::entity::enums::PurchaseStatus;
use billing::payments::capture::{self, CAPTURE_ATTEMPTS_MAX, Next, Verdict};
use billing::payments::purchases::{self, PurchaseCreditsRequest, PurchaseItem};
use billing::payments::{ChargeOutcome, GatewayError, PaymentGateway, SandboxGateway};
use reservoir_tests::{Fixture, TestDb, workspace};
use std::time::Duration;

async fn pending_purchase(
    t: &TestDb,
    f: &Fixture,
    token: &str,
    key: &str,
) -> anyhow::Result<uuid::Uuid> {
    let now = chrono::Utc::now();
    let gateway = SandboxGateway::new();
    billing::payments::cards::add_payment_method(&t.db, &gateway, f.account_id, token, true, now)
        .await?;
    let req = PurchaseCreditsRequest {
        workspace_id: f.ws_a,
        item: PurchaseItem::Package("pkg_10".into()),
        payment_method_id: None,
        pay_by_invoice: false,
        idempotency_key: key.into(),
        created_by_user_id: None,
    };
    Ok(purchases::purchase_credits(&t.db, req, now)
        .await?
        .purchase
        .id)
}

#[tokio::test]
async fn transient_failures_back_off_then_fail_after_the_last_attempt() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, chrono::Utc::now()).await?;
    let id = pending_purchase(&t, &f, "tok_processingError", "p1").await?;
    let gateway = SandboxGateway::new();
    let mut delays = Vec::new();
    loop {
        let Next::Charge(request) = capture::prepare(&t.db, id, chrono::Utc::now()).await? else {
            break;
        };
        let outcome = gateway.charge(request).await;
        assert!(matches!(outcome, Err(GatewayError::Transient(_))));
        match capture::apply(&t.db, id, outcome, chrono::Utc::now()).await? {
            Verdict::RetryAfter(delay) => delays.push(delay),
            Verdict::Done => break,
        }
    }
    assert_eq!(delays.len(), (CAPTURE_ATTEMPTS_MAX - 1) as usize);
    assert_eq!(delays[0], Duration::from_secs(2));
    assert!(
        delays.windows(2).all(|w| w[1] >= w[0]),
        "backoff grows: {delays:?}"
    );
    let p = purchases::load_purchase(&t.db, id).await?;
    assert_eq!(p.status, PurchaseStatus::Failed);
    assert_eq!(p.attempts, CAPTURE_ATTEMPTS_MAX);
    assert!(p.failure_reason.unwrap_or_default().contains("attempts"));
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 0);
    // A job arriving after the end does nothing.
    assert!(matches!(
        capture::prepare(&t.db, id, chrono::Utc::now()).await?,
        Next::Done
    ));
    t.finish().await
}

#[tokio::test]
async fn a_decline_fails_at_once_and_a_success_credits_once() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, chrono::Utc::now()).await?;
    let declined = pending_purchase(&t, &f, "tok_chargeDeclined", "d1").await?;
    let outcome = Ok(ChargeOutcome::Declined {
        reason: "card_declined".into(),
    });
    assert_eq!(
        capture::apply(&t.db, declined, outcome, chrono::Utc::now()).await?,
        Verdict::Done
    );
    let p = purchases::load_purchase(&t.db, declined).await?;
    assert_eq!(p.status, PurchaseStatus::Failed);
    assert_eq!(p.attempts, 0, "no retry for a decline");

    let ok = pending_purchase(&t, &f, "tok_visa", "s1").await?;
    for _ in 0..2 {
        let outcome = Ok(ChargeOutcome::Succeeded {
            charge_id: "ch_1".into(),
        });
        assert_eq!(
            capture::apply(&t.db, ok, outcome, chrono::Utc::now()).await?,
            Verdict::Done
        );
    }
    assert_eq!(
        workspace(&t.db, f.ws_a).await?.balance_nanos,
        10_000_000_000,
        "credited once"
    );
    t.finish().await
}

#[tokio::test]
async fn a_card_removed_before_the_charge_fails_the_purchase_without_charging() -> anyhow::Result<()>
{
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, chrono::Utc::now()).await?;
    let id = pending_purchase(&t, &f, "tok_visa", "r1").await?;
    let card = purchases::load_purchase(&t.db, id)
        .await?
        .payment_method_id
        .expect("card");
    billing::payments::cards::remove_payment_method(
        &t.db,
        &billing::payments::SandboxGateway::new(),
        card,
        chrono::Utc::now(),
    )
    .await?;
    assert!(matches!(
        capture::prepare(&t.db, id, chrono::Utc::now()).await?,
        Next::Done
    ));
    let p = purchases::load_purchase(&t.db, id).await?;
    assert_eq!(p.status, PurchaseStatus::Failed);
    assert!(p.failure_reason.unwrap_or_default().contains("removed"));
    t.finish().await
}
