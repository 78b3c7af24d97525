//! The worker as a real process: SIGKILLed while a charge is in flight at the gateway,
//! then started again. The job the killed worker held runs again once its heartbeat is
//! missed, and the purchase completes exactly once: one charge (every request
//! the gateway saw carries the purchase id as its idempotency key, which a real
//! gateway dedupes), credited once, and the ledger invariants hold.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::entity::enums::{CardBrand, PurchaseStatus};
use billing::entity::payment_methods;
use billing::payments::purchases::{self, PurchaseCreditsRequest, PurchaseItem};
use billing::sea_orm::{ActiveValue::Set, EntityTrait};
use reservoir_tests::{Fixture, TestDb, workspace};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The capture queue's job rows, counted by apalis state.
async fn capture_rows(queue: &worker::queue::Queue) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(queue
        .counts()
        .await?
        .into_iter()
        .filter(|c| c.queue == billing::jobs::CAPTURE_QUEUE)
        .map(|c| (c.status, c.count))
        .collect())
}

fn start_worker(
    t: &TestDb,
    gateway_url: &str,
    data_dir: &std::path::Path,
    log: &std::path::Path,
) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Ok(Command::new(env!("CARGO_BIN_EXE_reservoir"))
        .arg("worker")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RESERVOIR_DATABASE_URL", &t.url)
        .env("RESERVOIR_QUEUE_URL", t.queue_url())
        .env("RESERVOIR_DATA_DIR", data_dir)
        .env(
            "RESERVOIR_ADMIN_TOKEN",
            "crash-test-admin-token-0123456789abcdef",
        )
        .env("RESERVOIR_PAYMENT_GATEWAY", "stripe")
        .env("RESERVOIR_STRIPE_SECRET_KEY", "sk_test_crash")
        .env("RESERVOIR_STRIPE_BASE_URL", gateway_url)
        .env("RESERVOIR_DEMO_SEED", "false")
        .env("RESERVOIR_LOG_FORMAT", "pretty")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?)
}

const SUCCEEDED: &str = r#"{"id":"pi_crash_1","object":"payment_intent","status":"succeeded","amount":2500,"currency":"usd"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_charge_completes_the_purchase_exactly_once() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let card = payment_methods::Entity::insert(payment_methods::ActiveModel {
        id: Set(uuid::Uuid::now_v7()),
        account_id: Set(f.account_id),
        gateway_token: Set("pm_card_visa".into()),
        brand: Set(CardBrand::Visa),
        last4: Set("4242".into()),
        exp_month: Set(12),
        exp_year: Set(2034),
        is_default: Set(true),
        created_at: Set(now),
        removed_at: Set(None),
        fingerprint: Set(None),
    })
    .exec(&t.db)
    .await?
    .last_insert_id;

    // The gateway: the first charge hangs far longer than the test waits; any later
    // one succeeds at once.
    let gateway = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_string(SUCCEEDED)
                .set_delay(Duration::from_secs(600)),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&gateway)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(ResponseTemplate::new(200).set_body_string(SUCCEEDED))
        .with_priority(2)
        .mount(&gateway)
        .await;

    let purchase = purchases::purchase_credits(
        &t.db,
        PurchaseCreditsRequest {
            workspace_id: f.ws_a,
            item: PurchaseItem::Package("pkg_25".into()),
            payment_method_id: Some(card),
            pay_by_invoice: false,
            idempotency_key: "crash-1".into(),
            created_by_user_id: None,
        },
        now,
    )
    .await?
    .purchase;
    let queue = worker::queue::Queue::connect(&t.queue_url()).await?;
    queue
        .push_capture(
            billing::jobs::CapturePurchase {
                purchase_id: purchase.id,
            },
            None,
        )
        .await
        .map_err(anyhow::Error::msg)?;

    let dir = tempfile::tempdir()?;
    let log = dir.path().join("worker.log");
    let mut first = start_worker(&t, &gateway.uri(), dir.path(), &log)?;
    // Wait until the charge is in flight at the gateway, then kill the worker hard.
    let mut in_flight = false;
    for _ in 0..300 {
        if !gateway
            .received_requests()
            .await
            .unwrap_or_default()
            .is_empty()
        {
            in_flight = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        in_flight,
        "the worker never called the gateway: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    first.kill()?; // SIGKILL
    first.wait()?;
    assert_eq!(
        purchases::load_purchase(&t.db, purchase.id).await?.status,
        PurchaseStatus::Pending
    );

    let mut second = start_worker(&t, &gateway.uri(), dir.path(), &log)?;
    let mut done = None;
    for _ in 0..600 {
        let p = purchases::load_purchase(&t.db, purchase.id).await?;
        if p.status != PurchaseStatus::Pending {
            done = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The killed worker's job itself ran again: the new worker's heartbeat found it
    // orphaned (its worker silent for 3 beats of 2 s) and put it back, so the sweep
    // never had to push another (it would after 30 s: two capture job rows). Its
    // acknowledgement follows the commit that credited the purchase.
    let mut captures = Vec::new();
    for _ in 0..100 {
        captures = capture_rows(&queue).await?;
        if captures.iter().all(|(status, _)| status == "Done") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(captures, vec![("Done".to_owned(), 1)], "capture job rows");
    second.kill()?;
    second.wait()?;
    let done = done.ok_or_else(|| {
        anyhow::anyhow!(
            "never completed: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    })?;
    assert_eq!(done.status, PurchaseStatus::Succeeded);
    assert_eq!(done.gateway_charge_id.as_deref(), Some("pi_crash_1"));

    assert_eq!(
        workspace(&t.db, f.ws_a).await?.balance_nanos,
        25_000_000_000,
        "credited once"
    );

    // Every charge request carried the purchase id as its idempotency key.
    let requests = gateway.received_requests().await.unwrap_or_default();
    assert!(requests.len() >= 2, "{} requests", requests.len());
    for r in &requests {
        let key = r
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok());
        assert_eq!(key, Some(purchase.id.to_string().as_str()));
    }

    // SIGTERM: a worker stops gracefully, within its shutdown timeout.
    let mut third = start_worker(&t, &gateway.uri(), dir.path(), &log)?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(third.id().to_string())
        .status()?;
    assert!(status.success());
    let mut exited = None;
    for _ in 0..150 {
        if let Some(code) = third.try_wait()? {
            exited = Some(code);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(code) = exited else {
        third.kill()?;
        anyhow::bail!(
            "the worker ignored SIGTERM: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    assert!(
        code.success(),
        "exit status {code}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    t.finish().await
}
