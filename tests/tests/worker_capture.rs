//! Purchases end to end: the API writes a PENDING purchase and pushes a capture job;
//! the worker charges the card through the gateway and credits the workspace once.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::entity::enums::PurchaseStatus;
use billing::payments::{PaymentGateway, SandboxGateway};
use billing::sea_orm::EntityTrait;
use reservoir_tests::app::{ADMIN_TOKEN, code};
use reservoir_tests::{Fixture, TestDb, workspace};
use serde_json::{Value, json};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

struct System {
    base: String,
    client: reqwest::Client,
    handle: api::ApiHandle,
    stop: tokio::sync::watch::Sender<bool>,
    worker: tokio::task::JoinHandle<()>,
}

impl System {
    async fn start(
        t: &TestDb,
        gateway: Arc<SandboxGateway>,
        outbox: &std::path::Path,
        worker_config: worker::WorkerConfig,
    ) -> anyhow::Result<Self> {
        let queue = worker::queue::Queue::connect(&t.queue_url()).await?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let config = api::ApiConfig {
            admin_token: Some(ADMIN_TOKEN.into()),
            workers: 1,
            gateway: gateway.clone(),
            jobs: Arc::new(queue.clone()),
            ..Default::default()
        };
        let (handle, addr, _join) = api::spawn(listener, t.second_pool().await?, config)?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let mailer = worker::email::Mailer::outbox(outbox);
        let db = t.second_pool().await?;
        let gw: Arc<dyn PaymentGateway> = gateway;
        let worker = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.changed().await;
            };
            let from = "Reservoir <billing@reservoir.test>".to_owned();
            if let Err(e) = worker::run(db, queue, gw, mailer, from, worker_config, shutdown).await
            {
                panic!("worker failed: {e}");
            }
        });
        Ok(Self {
            base: format!("http://{addr}"),
            client: reservoir_tests::app::http_client(),
            handle,
            stop,
            worker,
        })
    }

    async fn gql(&self, token: &str, query: &str, variables: Value) -> anyhow::Result<Value> {
        let req = self
            .client
            .post(format!("{}/graphql", self.base))
            .bearer_auth(token)
            .json(&json!({ "query": query, "variables": variables }));
        Ok(req.send().await?.json().await?)
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(15), self.worker).await;
        self.handle.stop(true).await;
    }
}

async fn wait_for_status(
    t: &TestDb,
    purchase_id: &str,
    status: PurchaseStatus,
) -> anyhow::Result<billing::entity::purchases::Model> {
    let id = uuid::Uuid::parse_str(purchase_id)?;
    for _ in 0..200 {
        let p = billing::payments::purchases::load_purchase(&t.db, id).await?;
        if p.status == status {
            return Ok(p);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("purchase {purchase_id} never became {status:?}")
}

const ADD_CARD: &str = "mutation($input: AddPaymentMethodInput!) { addPaymentMethod(input: $input) { id brand last4 isDefault } }";
const BUY: &str = "mutation($input: PurchaseCreditsInput!) { purchaseCredits(input: $input) { id status amount bonus price } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_card_purchase_is_captured_and_credited_once() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let token = billing::accounts::create_user_token(&t.db, f.owner_id, "t", now).await?;
    let gateway = Arc::new(SandboxGateway::new());
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,sqlx=warn")
        .with_test_writer()
        .try_init();
    let outbox = tempfile::tempdir()?;
    // Sweep often and at once: this test is about the capture, not the push.
    let worker_config = worker::WorkerConfig {
        poll_interval_ms: 50,
        sweep_interval_ms: 200,
        stale_after_ms: 0,
        direct_delivery_after_ms: 0,
        direct_capture_after_ms: 500,
        ..Default::default()
    };
    let system = System::start(&t, gateway.clone(), outbox.path(), worker_config).await?;

    let card = system
        .gql(
            &token,
            ADD_CARD,
            json!({ "input": { "accountId": f.account_id.to_string(), "token": "tok_visa" } }),
        )
        .await?;
    assert_eq!(card["data"]["addPaymentMethod"]["brand"], "VISA", "{card}");
    assert_eq!(card["data"]["addPaymentMethod"]["isDefault"], true);
    let input = json!({ "input": { "workspaceId": f.ws_a.to_string(), "packageId": "pkg_50", "idempotencyKey": "buy-1" } });
    let bought = system.gql(&token, BUY, input.clone()).await?;
    assert_eq!(
        bought["data"]["purchaseCredits"]["status"], "PENDING",
        "{bought}"
    );
    let id = bought["data"]["purchaseCredits"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // A retry of the same request is the same purchase.
    let again = system.gql(&token, BUY, input).await?;
    assert_eq!(again["data"]["purchaseCredits"]["id"], id.as_str());

    let done = wait_for_status(&t, &id, PurchaseStatus::Succeeded).await?;
    assert!(done.invoice_id.is_some());
    assert_eq!(
        workspace(&t.db, f.ws_a).await?.balance_nanos,
        55_000_000_000,
        "50 + 5 bonus"
    );
    // One charge of $50.00 at the gateway, keyed by the purchase id.
    let charges = gateway.charges();
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0].amount_cents, 5_000);
    assert_eq!(charges[0].idempotency_key, id);

    // A declined card fails the purchase with the reason and credits nothing.
    let declined = system.gql(&token, ADD_CARD, json!({ "input": { "accountId": f.account_id.to_string(), "token": "tok_chargeDeclinedInsufficientFunds", "makeDefault": true } })).await?;
    assert!(declined["errors"].is_null(), "{declined}");
    let bought = system.gql(&token, BUY, json!({ "input": { "workspaceId": f.ws_a.to_string(), "amount": "20", "idempotencyKey": "buy-2" } })).await?;
    let id2 = bought["data"]["purchaseCredits"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let failed = wait_for_status(&t, &id2, PurchaseStatus::Failed).await?;
    assert!(
        failed
            .failure_reason
            .unwrap_or_default()
            .contains("insufficient_funds")
    );
    assert_eq!(
        workspace(&t.db, f.ws_a).await?.balance_nanos,
        55_000_000_000
    );

    // Viewing the purchase with its invoice through the API.
    let view = system
        .gql(&token, "query($id: ID!) { workspace(id: $id) { purchases { edges { node { status failureReason invoice { number status total lines { description amount } } } } } } }", json!({ "id": f.ws_a.to_string() }))
        .await?;
    let edges = view["data"]["workspace"]["purchases"]["edges"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(edges.len(), 2, "{view}");
    assert_eq!(edges[1]["node"]["invoice"]["number"], "INV-000001");
    assert_eq!(edges[1]["node"]["invoice"]["status"], "PAID");
    assert_eq!(edges[1]["node"]["invoice"]["total"], "50");
    assert!(code(&view).is_none());

    // The receipt e-mail, with the invoice, lands in the outbox once.
    let mut receipts = Vec::new();
    // Normally well under a second; the bound is generous because a delivery job stuck
    // behind the SQLite write lock waits out its busy timeout (see the worker notes).
    for _ in 0..450 {
        receipts = std::fs::read_dir(outbox.path())?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        if !receipts.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = billing::entity::notifications::Entity::find()
        .all(&t.db)
        .await?;
    assert_eq!(receipts.len(), 1, "one receipt; notifications: {rows:?}");
    let mail = std::fs::read_to_string(&receipts[0])?;
    assert!(
        mail.contains("INV-000001") && mail.contains("owner@test.example"),
        "{mail}"
    );
    // The worker's runs show on the process's /metrics (tests share the counters, so
    // at least these).
    let metrics = system
        .client
        .get(format!("{}/metrics", system.base))
        .send()
        .await?
        .text()
        .await?;
    for (kind, at_least) in [("capture", 2.0), ("email", 1.0)] {
        let runs = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "reservoir_job_runs_total{{kind=\"{kind}\",outcome=\"done\"}}"
                ))
            })
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(runs >= at_least, "{kind}: {metrics}");
    }
    system.stop().await;
    t.finish().await
}

/// E-mails within seconds, with the worker's production settings: the capture job
/// pushes the receipt it just wrote instead of leaving it for the sweep, which only
/// re-enqueues notifications 30 s old (the receipt once took 35 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_receipt_is_pushed_right_after_the_capture() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let token = billing::accounts::create_user_token(&t.db, f.owner_id, "t", now).await?;
    let outbox = tempfile::tempdir()?;
    let defaults = worker::WorkerConfig::default();
    let system =
        System::start(&t, Arc::new(SandboxGateway::new()), outbox.path(), defaults).await?;
    let card = json!({ "input": { "accountId": f.account_id.to_string(), "token": "tok_visa" } });
    assert!(system.gql(&token, ADD_CARD, card).await?["errors"].is_null());
    let buy = json!({ "input": { "workspaceId": f.ws_a.to_string(), "packageId": "pkg_10", "idempotencyKey": "push-1" } });
    let bought = system.gql(&token, BUY, buy).await?;
    assert!(bought["errors"].is_null(), "{bought}");
    let started = std::time::Instant::now();
    let mut sent = false;
    // The sweep's own re-enqueue would come after `stale_after_ms` = 30 s: a receipt
    // well before that was pushed.
    while started.elapsed() < Duration::from_secs(15) {
        sent = std::fs::read_dir(outbox.path())?
            .filter_map(Result::ok)
            .any(|e| e.path().extension().is_some_and(|x| x == "eml"));
        if sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sent, "no receipt within 15 s");
    eprintln!(
        "receipt in the outbox {:?} after purchaseCredits",
        started.elapsed()
    );
    system.stop().await;
    t.finish().await
}

/// A transfer that takes a workspace below an alert threshold has its e-mail pushed
/// right after the commit (through the API, the worker's production settings): in the
/// outbox within seconds, not at the sweep's 30 s re-enqueue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transfer_pushes_the_alert_it_caused() -> anyhow::Result<()> {
    use billing::entity::enums::AlertSeverity;
    use billing::policies::alert_thresholds::{AlertThresholdInput, set_alert_thresholds};
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let token = billing::accounts::create_user_token(&t.db, f.owner_id, "t", now).await?;
    reservoir_tests::fund(&t.db, f.ws_a, "100", now).await?;
    set_alert_thresholds(
        &t.db,
        f.ws_a,
        vec![AlertThresholdInput {
            amount: billing::Credits::from_nanos(50_000_000_000),
            severity: AlertSeverity::Warning,
            recipient_ids: vec![f.owner_id],
        }],
        now,
    )
    .await?;
    let outbox = tempfile::tempdir()?;
    let defaults = worker::WorkerConfig::default();
    let system =
        System::start(&t, Arc::new(SandboxGateway::new()), outbox.path(), defaults).await?;
    let moved = system
        .gql(
            &token,
            "mutation($input: TransferCreditsInput!) { transferCredits(input: $input) { id } }",
            json!({ "input": { "fromWorkspaceId": f.ws_a.to_string(), "toWorkspaceId": f.ws_b.to_string(), "amount": "60", "idempotencyKey": "t-1" } }),
        )
        .await?;
    assert!(moved["errors"].is_null(), "{moved}");
    let started = std::time::Instant::now();
    let mut sent = false;
    while started.elapsed() < Duration::from_secs(15) {
        sent = std::fs::read_dir(outbox.path())?
            .filter_map(Result::ok)
            .any(|e| e.path().extension().is_some_and(|x| x == "eml"));
        if sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sent, "no alert e-mail within 15 s");
    eprintln!(
        "alert in the outbox {:?} after transferCredits answered",
        started.elapsed()
    );
    system.stop().await;
    t.finish().await
}
