//! Outbound webhooks end to end: endpoints registered through the API, events written
//! by real business flows (a sandbox card purchase captured by the worker, its PAID
//! invoice), delivered by the worker to a real HTTP receiver (wiremock) that checks
//! every signature; a receiver that fails then recovers; a delivery that goes DEAD
//! and is retried by the mutation; URL refusals, roles, and the secret never read back.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::entity::enums::AccountRole;
use billing::entity::{account_members, users};
use billing::payments::{PaymentGateway, SandboxGateway};
use billing::retry::RetryPolicy;
use billing::sea_orm::{DatabaseConnection, EntityTrait, Set};
use billing::webhooks::signing;
use reservoir_tests::app::{ADMIN_TOKEN, code};
use reservoir_tests::{Fixture, TestDb};
use serde_json::{Value, json};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use uuid::Uuid;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers};

/// Answers 500 to the first `fail_first` requests (or, with `hang`, answers them only
/// after the 10 s attempt timeout), then 200.
struct Flaky {
    seen: AtomicUsize,
    fail_first: usize,
    hang: bool,
}

impl Respond for Flaky {
    fn respond(&self, _request: &Request) -> ResponseTemplate {
        if self.seen.fetch_add(1, Ordering::SeqCst) < self.fail_first {
            if self.hang {
                return ResponseTemplate::new(200).set_delay(Duration::from_secs(12));
            }
            ResponseTemplate::new(500).set_body_string("receiver down")
        } else {
            ResponseTemplate::new(200)
        }
    }
}

async fn receiver(fail_first: usize) -> MockServer {
    receiver_with(fail_first, false).await
}

async fn receiver_with(fail_first: usize, hang: bool) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(matchers::method("POST"))
        .respond_with(Flaky {
            seen: AtomicUsize::new(0),
            fail_first,
            hang,
        })
        .mount(&server)
        .await;
    server
}

/// Every request the receiver got, each signature checked with `secret`; returns the
/// bodies.
async fn received(server: &MockServer, secret: &str) -> Vec<Value> {
    let now = chrono::Utc::now().timestamp();
    let requests = server.received_requests().await.unwrap_or_default();
    requests
        .iter()
        .map(|r| {
            let header = r
                .headers
                .get(signing::SIGNATURE_HEADER)
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default();
            assert!(
                signing::verify(
                    secret,
                    header,
                    &r.body,
                    now,
                    signing::RECEIVER_TOLERANCE_SECS
                ),
                "bad signature {header}"
            );
            serde_json::from_slice(&r.body).unwrap_or(Value::Null)
        })
        .collect()
}

struct System {
    base: String,
    client: reqwest::Client,
    handle: api::ApiHandle,
    stop: tokio::sync::watch::Sender<bool>,
    worker: tokio::task::JoinHandle<()>,
}

impl System {
    async fn start(t: &TestDb, policy: RetryPolicy) -> anyhow::Result<Self> {
        let queue = worker::queue::Queue::connect(&t.queue_url()).await?;
        let gateway = Arc::new(SandboxGateway::new());
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let config = api::ApiConfig {
            admin_token: Some(ADMIN_TOKEN.into()),
            workers: 1,
            gateway: gateway.clone(),
            jobs: Arc::new(queue.clone()),
            webhook_urls: billing::webhooks::endpoints::UrlPolicy { allow_http: true },
            ..Default::default()
        };
        let (handle, addr, _join) = api::spawn(listener, t.second_pool().await?, config)?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let worker_config = worker::WorkerConfig {
            poll_interval_ms: 50,
            sweep_interval_ms: 200,
            stale_after_ms: 0,
            direct_capture_after_ms: 500,
            direct_webhook_after_ms: 300,
            webhook_retry: policy,
            ..Default::default()
        };
        let outbox = std::env::temp_dir().join(format!("webhooks-outbox-{}", Uuid::now_v7()));
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

const CREATE: &str = "mutation($input: CreateWebhookEndpointInput!) { createWebhookEndpoint(input: $input) { secret endpoint { id url events enabled } } }";
const ADD_CARD: &str =
    "mutation($input: AddPaymentMethodInput!) { addPaymentMethod(input: $input) { id } }";
const BUY: &str =
    "mutation($input: PurchaseCreditsInput!) { purchaseCredits(input: $input) { id status } }";
const DELIVERIES: &str = "query($a: ID!) { account(id: $a) { webhookEndpoints { id url deliveries(first: 50) { edges { node { id eventId eventType status attempts lastResponseCode lastError nextAttemptAt } } pageInfo { hasNextPage } } } } }";
const ALL_EVENTS: [&str; 8] = [
    "BALANCE_LOW",
    "BALANCE_RECOVERED",
    "PURCHASE_SUCCEEDED",
    "PURCHASE_FAILED",
    "AUTO_RELOAD_FAILED",
    "AUTO_RELOAD_DISABLED",
    "INVOICE_CREATED",
    "INVOICE_PAID",
];

async fn account_user(
    db: &DatabaseConnection,
    account_id: Uuid,
    email: &str,
    role: AccountRole,
) -> anyhow::Result<Uuid> {
    let now = chrono::Utc::now();
    let id = Uuid::now_v7();
    users::Entity::insert(users::ActiveModel {
        id: Set(id),
        email: Set(email.to_owned()),
        name: Set("user".to_owned()),
        created_at: Set(now),
    })
    .exec_without_returning(db)
    .await?;
    account_members::Entity::insert(account_members::ActiveModel {
        account_id: Set(account_id),
        user_id: Set(id),
        role: Set(role),
        created_at: Set(now),
    })
    .exec_without_returning(db)
    .await?;
    Ok(id)
}

async fn create_endpoint(
    system: &System,
    token: &str,
    account_id: Uuid,
    url: &str,
) -> anyhow::Result<(String, String)> {
    let input = json!({ "input": { "accountId": account_id.to_string(), "url": url, "events": ALL_EVENTS } });
    let created = system.gql(token, CREATE, input).await?;
    let payload = &created["data"]["createWebhookEndpoint"];
    let secret = payload["secret"].as_str().unwrap_or_default().to_owned();
    assert!(secret.starts_with(signing::SECRET_PREFIX), "{created}");
    Ok((
        payload["endpoint"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        secret,
    ))
}

async fn buy_with_card(system: &System, token: &str, f: &Fixture, key: &str) -> anyhow::Result<()> {
    let card = json!({ "input": { "accountId": f.account_id.to_string(), "token": "tok_visa" } });
    let added = system.gql(token, ADD_CARD, card).await?;
    assert!(added["errors"].is_null(), "{added}");
    let buy = json!({ "input": { "workspaceId": f.ws_a.to_string(), "packageId": "pkg_50", "idempotencyKey": key } });
    let bought = system.gql(token, BUY, buy.clone()).await?;
    assert_eq!(
        bought["data"]["purchaseCredits"]["status"], "PENDING",
        "{bought}"
    );
    // A replayed call writes no second event.
    let again = system.gql(token, BUY, buy).await?;
    assert!(again["errors"].is_null(), "{again}");
    Ok(())
}

/// Waits until the receiver has seen `types` (each at least once), answering 2xx.
async fn wait_for_types(server: &MockServer, secret: &str, types: &[&str]) -> Vec<Value> {
    for _ in 0..300 {
        let bodies = received(server, secret).await;
        if types.iter().all(|t| bodies.iter().any(|b| b["type"] == *t)) {
            return bodies;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    received(server, secret).await
}

/// Polls the endpoint's deliveries until `n` are in `status`; returns those.
async fn wait_for_status(
    system: &System,
    token: &str,
    account_id: Uuid,
    status: &str,
    n: usize,
) -> anyhow::Result<Vec<Value>> {
    let mut found = Vec::new();
    for _ in 0..400 {
        let read = system
            .gql(token, DELIVERIES, json!({ "a": account_id.to_string() }))
            .await?;
        let edges = read["data"]["account"]["webhookEndpoints"][0]["deliveries"]["edges"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        found = edges
            .into_iter()
            .filter(|e| e["node"]["status"] == status)
            .collect();
        if found.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(found)
}

fn short_policy(attempts_max: i32) -> RetryPolicy {
    RetryPolicy {
        base: Duration::from_millis(100),
        cap: Duration::from_millis(300),
        attempts_max,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_card_purchase_is_told_to_the_receiver_signed() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let token = billing::accounts::create_user_token(&t.db, f.owner_id, "t", now).await?;
    let system = System::start(&t, short_policy(5)).await?;
    let server = receiver(0).await;
    let (endpoint_id, secret) = create_endpoint(
        &system,
        &token,
        f.account_id,
        &format!("{}/hooks", server.uri()),
    )
    .await?;
    buy_with_card(&system, &token, &f, "buy-1").await?;
    let want = ["purchase.succeeded", "invoice.created", "invoice.paid"];
    let bodies = wait_for_types(&server, &secret, &want).await;
    for t in want {
        let of_type: Vec<_> = bodies.iter().filter(|b| b["type"] == t).collect();
        assert_eq!(of_type.len(), 1, "{t}: {bodies:?}");
        let b = of_type[0];
        assert_eq!(b["accountId"], f.account_id.to_string());
        assert_eq!(b["workspaceId"], f.ws_a.to_string());
        assert!(b["id"].is_string() && b["createdAt"].is_string() && b["data"].is_object());
    }
    // The deliveries read back as DELIVERED, with a 200, and no secret anywhere.
    let read = system
        .gql(&token, DELIVERIES, json!({ "a": f.account_id.to_string() }))
        .await?;
    let endpoints = &read["data"]["account"]["webhookEndpoints"];
    assert_eq!(endpoints[0]["id"], endpoint_id, "{read}");
    let edges = endpoints[0]["deliveries"]["edges"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(edges.len(), 3, "{read}");
    for e in &edges {
        assert_eq!(e["node"]["status"], "DELIVERED", "{read}");
        assert_eq!(e["node"]["lastResponseCode"], 200);
    }
    assert!(!read.to_string().contains(&secret));
    system.stop().await;
    t.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_receiver_gets_every_event_once_it_recovers() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let token = billing::accounts::create_user_token(&t.db, f.owner_id, "t", now).await?;
    let system = System::start(&t, short_policy(20)).await?;
    // Three events, nine failures: each delivery fails a few times first.
    let server = receiver(9).await;
    let (_, secret) = create_endpoint(
        &system,
        &token,
        f.account_id,
        &format!("{}/hooks", server.uri()),
    )
    .await?;
    buy_with_card(&system, &token, &f, "buy-2").await?;
    let want = ["purchase.succeeded", "invoice.created", "invoice.paid"];
    let mut delivered = 0;
    for _ in 0..400 {
        let read = system
            .gql(&token, DELIVERIES, json!({ "a": f.account_id.to_string() }))
            .await?;
        let edges = read["data"]["account"]["webhookEndpoints"][0]["deliveries"]["edges"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        delivered = edges
            .iter()
            .filter(|e| e["node"]["status"] == "DELIVERED")
            .count();
        if delivered == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(delivered, 3);
    let bodies = received(&server, &secret).await;
    assert!(bodies.len() >= 12, "{}", bodies.len());
    for t in want {
        let ids: std::collections::BTreeSet<String> = bodies
            .iter()
            .filter(|b| b["type"] == t)
            .map(|b| b["id"].as_str().unwrap_or_default().to_owned())
            .collect();
        // Every attempt of one event carries the same event id.
        assert_eq!(ids.len(), 1, "{t}");
    }
    system.stop().await;
    t.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_delivery_is_retried_by_the_mutation() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let token = billing::accounts::create_user_token(&t.db, f.owner_id, "t", now).await?;
    let system = System::start(&t, short_policy(2)).await?;
    // Two attempts each for three deliveries: all six fail, then the receiver is fine.
    let server = receiver(6).await;
    let (_, secret) = create_endpoint(
        &system,
        &token,
        f.account_id,
        &format!("{}/hooks", server.uri()),
    )
    .await?;
    buy_with_card(&system, &token, &f, "buy-3").await?;
    let mut dead = Vec::new();
    for _ in 0..400 {
        let read = system
            .gql(&token, DELIVERIES, json!({ "a": f.account_id.to_string() }))
            .await?;
        let edges = read["data"]["account"]["webhookEndpoints"][0]["deliveries"]["edges"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        dead = edges
            .iter()
            .filter(|e| e["node"]["status"] == "DEAD")
            .cloned()
            .collect();
        if dead.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead.len(), 3, "{dead:?}");
    for d in &dead {
        assert_eq!(d["node"]["attempts"], 2);
        assert_eq!(d["node"]["lastResponseCode"], 500);
        assert!(
            d["node"]["lastError"]
                .as_str()
                .unwrap_or_default()
                .contains("500")
        );
    }
    const RETRY: &str =
        "mutation($id: ID!) { retryWebhookDelivery(id: $id) { id status attempts } }";
    for d in &dead {
        let id = d["node"]["id"].clone();
        let retried = system.gql(&token, RETRY, json!({ "id": id })).await?;
        assert_eq!(
            retried["data"]["retryWebhookDelivery"]["status"], "PENDING",
            "{retried}"
        );
        // Only a DEAD delivery can be retried.
        let again = system
            .gql(&token, RETRY, json!({ "id": d["node"]["id"] }))
            .await?;
        assert!(
            code(&again) == Some("INVALID_INPUT") || again["errors"].is_null(),
            "{again}"
        );
    }
    let delivered = wait_for_status(&system, &token, f.account_id, "DELIVERED", 3).await?;
    assert_eq!(delivered.len(), 3);
    for d in &delivered {
        assert_eq!(d["node"]["attempts"], 1, "a fresh budget: {d}");
    }
    let bodies = received(&server, &secret).await;
    assert_eq!(bodies.len(), 9, "{}", bodies.len());
    system.stop().await;
    t.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_roles_and_secrets_are_guarded() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let owner = billing::accounts::create_user_token(&t.db, f.owner_id, "t", now).await?;
    let member_id = account_user(
        &t.db,
        f.account_id,
        "member@test.example",
        AccountRole::Member,
    )
    .await?;
    let member = billing::accounts::create_user_token(&t.db, member_id, "t", now).await?;
    let app = reservoir_tests::app::App::start(&t).await?;
    let input = |url: &str| json!({ "input": { "accountId": f.account_id.to_string(), "url": url, "events": ["INVOICE_PAID"] } });
    for bad in [
        "ftp://example.com/x",
        "https://user:pw@example.com/x",
        "https://",
        "not a url",
    ] {
        let refused = app.gql(Some(&owner), CREATE, input(bad)).await?;
        assert_eq!(code(&refused), Some("INVALID_INPUT"), "{bad}: {refused}");
    }
    let long = format!("https://example.com/{}", "a".repeat(3000));
    assert_eq!(
        code(&app.gql(Some(&owner), CREATE, input(&long)).await?),
        Some("INVALID_INPUT")
    );
    // http is refused on PostgreSQL without the switch (the test app leaves it off).
    let http = app
        .gql(Some(&owner), CREATE, input("http://127.0.0.1:9/x"))
        .await?;
    if reservoir_tests::backend_name() == "postgres" {
        assert_eq!(code(&http), Some("INVALID_INPUT"), "{http}");
    } else {
        assert!(http["errors"].is_null(), "{http}");
    }
    let no_events = json!({ "input": { "accountId": f.account_id.to_string(), "url": "https://example.com/x", "events": [] } });
    assert_eq!(
        code(&app.gql(Some(&owner), CREATE, no_events).await?),
        Some("INVALID_INPUT")
    );
    // A MEMBER can neither create nor list.
    let denied = app
        .gql(Some(&member), CREATE, input("https://example.com/m"))
        .await?;
    assert_eq!(code(&denied), Some("FORBIDDEN"), "{denied}");
    let list = "query($a: ID!) { account(id: $a) { webhookEndpoints { id } } }";
    let listed = app
        .gql(
            Some(&member),
            list,
            json!({ "a": f.account_id.to_string() }),
        )
        .await?;
    assert_eq!(code(&listed), Some("FORBIDDEN"), "{listed}");
    // The secret is in the create answer only; rotation returns a new one once.
    let created = app
        .gql(Some(&owner), CREATE, input("https://example.com/ok"))
        .await?;
    let secret = created["data"]["createWebhookEndpoint"]["secret"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let id = created["data"]["createWebhookEndpoint"]["endpoint"]["id"].clone();
    const ROTATE: &str =
        "mutation($id: ID!) { rotateWebhookSecret(id: $id) { secret endpoint { id } } }";
    let rotated = app.gql(Some(&owner), ROTATE, json!({ "id": id })).await?;
    let new_secret = rotated["data"]["rotateWebhookSecret"]["secret"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        new_secret.starts_with("whsec_") && new_secret != secret,
        "{rotated}"
    );
    assert_eq!(
        code(&app.gql(Some(&member), ROTATE, json!({ "id": id })).await?),
        Some("FORBIDDEN")
    );
    let read = app
        .gql(
            Some(&owner),
            DELIVERIES,
            json!({ "a": f.account_id.to_string() }),
        )
        .await?;
    assert!(read["errors"].is_null(), "{read}");
    assert!(!read.to_string().contains(&secret) && !read.to_string().contains(&new_secret));
    // Disable, enable, delete.
    const ENABLE: &str = "mutation($id: ID!, $on: Boolean!) { setWebhookEndpointEnabled(id: $id, enabled: $on) { enabled } }";
    let off = app
        .gql(Some(&owner), ENABLE, json!({ "id": id, "on": false }))
        .await?;
    assert_eq!(
        off["data"]["setWebhookEndpointEnabled"]["enabled"], false,
        "{off}"
    );
    let on = app
        .gql(Some(&owner), ENABLE, json!({ "id": id, "on": true }))
        .await?;
    assert_eq!(on["data"]["setWebhookEndpointEnabled"]["enabled"], true);
    const DELETE: &str = "mutation($id: ID!) { deleteWebhookEndpoint(id: $id) }";
    assert_eq!(
        code(&app.gql(Some(&member), DELETE, json!({ "id": id })).await?),
        Some("FORBIDDEN")
    );
    let deleted = app.gql(Some(&owner), DELETE, json!({ "id": id })).await?;
    assert_eq!(deleted["data"]["deleteWebhookEndpoint"], id, "{deleted}");
    app.stop().await;
    t.finish().await
}

/// The domain's business flows, as the API and the worker drive them, each writing
/// its events: an alert crossing and its recovery, three declined auto-reloads (the
/// last turning auto-reload off), a purchase paid by invoice and the invoice paid.
/// Dated in the past, so every delivery is due at once; the worker delivers them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_type_comes_from_a_business_flow() -> anyhow::Result<()> {
    use billing::accounts::auth::Principal;
    use billing::payments::purchases::{PurchaseCreditsRequest, PurchaseItem};
    use billing::payments::{ChargeOutcome, ChargeRequest};
    use billing::policies::alert_thresholds::AlertThresholdInput;
    use billing::policies::auto_reload;
    use billing::webhooks::WebhookEventType as E;
    use billing::webhooks::endpoints::{NewEndpoint, UrlPolicy};
    use chrono::{Duration as Td, TimeZone, Utc};

    let t = TestDb::new().await?;
    let t0 = Utc
        .with_ymd_and_hms(2026, 11, 16, 12, 0, 0)
        .single()
        .ok_or_else(|| anyhow::anyhow!("time"))?;
    let f = Fixture::new(&t.db, t0).await?;
    let server = receiver(0).await;
    let created = billing::webhooks::endpoints::create_endpoint(
        &t.db,
        &Principal::PlatformAdmin,
        UrlPolicy { allow_http: true },
        NewEndpoint {
            account_id: f.account_id,
            url: format!("{}/hooks", server.uri()),
            events: E::ALL.to_vec(),
        },
        t0,
    )
    .await?;
    let secret = created.secret;
    let debit = |id: &'static str, credits: &'static str, at| {
        let db = t.db.clone();
        let ws = f.ws_a;
        async move {
            let tokens = billing::Credits::parse(credits)?.nanos() / 1_000;
            billing::debits::usage::record_usage(
                &db,
                reservoir_tests::usage_req(ws, id, tokens),
                at,
            )
            .await?;
            anyhow::Ok(())
        }
    };

    // Alerts: 10 → 4 crosses 5 (balance.low); funding back to 9 re-arms it.
    reservoir_tests::fund(&t.db, f.ws_a, "10", t0).await?;
    billing::policies::alert_thresholds::set_alert_thresholds(
        &t.db,
        f.ws_a,
        vec![AlertThresholdInput {
            amount: billing::Credits::parse("5")?,
            severity: billing::entity::enums::AlertSeverity::Warning,
            recipient_ids: vec![],
        }],
        t0,
    )
    .await?;
    debit("a-1", "6", t0).await?;
    reservoir_tests::fund(&t.db, f.ws_a, "5", t0).await?;

    // Auto-reload on a declining card: three failed reloads, the third turns it off.
    let gateway = SandboxGateway::new();
    let declining = billing::payments::cards::add_payment_method(
        &t.db,
        &gateway,
        f.account_id,
        "tok_chargeDeclined",
        true,
        t0,
    )
    .await?;
    billing::policies::auto_reload_settings::configure_auto_reload(
        &t.db,
        billing::policies::auto_reload_settings::AutoReloadInput {
            workspace_id: f.ws_a,
            enabled: true,
            threshold: billing::Credits::parse("8")?,
            amount: billing::Credits::parse("20")?,
            payment_method_id: Some(declining.id),
            max_reloads_per_day: 24,
        },
        t0,
    )
    .await?;
    let card = billing::payments::cards::load_payment_method(&t.db, declining.id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no card"))?;
    let mut at = t0;
    for (n, wait) in [(1, 0), (2, 61), (3, 121)] {
        at += Td::seconds(wait);
        // 9 → 7.5 crosses the reload threshold of 8; then it stays below.
        let amount = if n == 1 { "1.5" } else { "0.1" };
        debit(["r-1", "r-2", "r-3"][n - 1], amount, at).await?;
        let reload = billing::entity::purchases::Entity::find()
            .all(&t.db)
            .await?
            .into_iter()
            .filter(|p| p.source == billing::entity::enums::PurchaseSource::AutoReload)
            .rfind(|p| p.status == billing::entity::enums::PurchaseStatus::Pending)
            .ok_or_else(|| anyhow::anyhow!("reload {n} not started"))?;
        let ChargeOutcome::Declined { reason } = gateway
            .charge(ChargeRequest::for_purchase(&reload, &card, None)?)
            .await?
        else {
            anyhow::bail!("the declining card was charged");
        };
        auto_reload::reload_failed(&t.db, reload.id, &reason, true, at).await?;
        // A replayed failure writes no second event.
        auto_reload::reload_failed(&t.db, reload.id, &reason, true, at).await?;
    }

    // Paid by invoice (a verified account), then the invoice paid.
    let account = billing::entity::accounts::Entity::find_by_id(f.account_id)
        .one(&t.db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no account"))?;
    let mut active: billing::entity::accounts::ActiveModel = account.into();
    active.verified = Set(true);
    billing::sea_orm::ActiveModelTrait::update(active, &t.db).await?;
    let bought = billing::payments::purchases::purchase_credits(
        &t.db,
        PurchaseCreditsRequest {
            workspace_id: f.ws_b,
            item: PurchaseItem::Package("pkg_100".into()),
            payment_method_id: None,
            pay_by_invoice: true,
            idempotency_key: "inv-1".into(),
            created_by_user_id: None,
        },
        at,
    )
    .await?;
    let invoice_id = bought
        .purchase
        .invoice_id
        .ok_or_else(|| anyhow::anyhow!("no invoice"))?;
    billing::payments::purchases::mark_invoice_paid(&t.db, invoice_id, at).await?;
    billing::payments::purchases::mark_invoice_paid(&t.db, invoice_id, at).await?;

    // The worker delivers all of it (its sweep finds the due deliveries).
    let system = System::start(&t, short_policy(5)).await?;
    let want: Vec<&str> = E::ALL.iter().map(|e| e.as_str()).collect();
    let mut bodies = wait_for_types(&server, &secret, &want).await;
    // 3 purchase.succeeded, 3 purchase.failed, 3 auto_reload.failed and one of each other.
    for _ in 0..200 {
        if bodies.len() >= 14 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        bodies = received(&server, &secret).await;
    }
    let count = |ty: &str| bodies.iter().filter(|b| b["type"] == ty).count();
    assert_eq!(count("balance.low"), 1, "{bodies:?}");
    assert!(count("balance.recovered") >= 1, "{bodies:?}");
    assert_eq!(count("auto_reload.failed"), 3, "{bodies:?}");
    assert_eq!(count("auto_reload.disabled"), 1, "{bodies:?}");
    assert_eq!(count("purchase.failed"), 3, "{bodies:?}");
    assert_eq!(count("invoice.paid"), 1, "{bodies:?}");
    assert_eq!(count("invoice.created"), 1, "{bodies:?}");
    // Manual fundings and the invoice purchase.
    assert_eq!(count("purchase.succeeded"), 3, "{bodies:?}");
    let ids: std::collections::BTreeSet<&str> =
        bodies.iter().filter_map(|b| b["id"].as_str()).collect();
    assert_eq!(ids.len(), bodies.len(), "each event delivered once");
    let paid = bodies
        .iter()
        .find(|b| b["type"] == "invoice.paid")
        .cloned()
        .unwrap_or_default();
    assert_eq!(paid["data"]["invoiceId"], invoice_id.to_string());
    assert_eq!(paid["workspaceId"], f.ws_b.to_string());
    system.stop().await;
    t.finish().await
}

/// A receiver that does not answer within 10 s: the attempt fails ("no answer") and is
/// retried with the same event id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_that_times_out_is_retried() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let token = billing::accounts::create_user_token(&t.db, f.owner_id, "t", now).await?;
    let system = System::start(&t, short_policy(5)).await?;
    let server = receiver_with(1, true).await;
    let (_, secret) = create_endpoint(
        &system,
        &token,
        f.account_id,
        &format!("{}/hooks", server.uri()),
    )
    .await?;
    // Only invoice.paid events: one delivery, its first attempt timing out.
    let deliveries = billing::webhooks::events::invoice_event(
        &t.db,
        &billing::entity::invoices::Model {
            id: Uuid::now_v7(),
            account_id: f.account_id,
            sequence: 1,
            number: "INV-000001".into(),
            purchase_id: None,
            total_nanos: 0,
            status: billing::entity::enums::InvoiceStatus::Paid,
            issued_at: now,
            due_at: None,
            paid_at: Some(now),
        },
        None,
        billing::webhooks::WebhookEventType::InvoicePaid,
        now,
    )
    .await?;
    assert_eq!(deliveries.len(), 1);
    let mut done = Vec::new();
    for _ in 0..20 {
        done = wait_for_status(&system, &token, f.account_id, "DELIVERED", 1).await?;
        if !done.is_empty() {
            break;
        }
    }
    assert_eq!(done.len(), 1, "never delivered");
    assert_eq!(done[0]["node"]["attempts"], 2, "{:?}", done[0]);
    let bodies = received(&server, &secret).await;
    assert_eq!(bodies.len(), 2);
    assert_eq!(bodies[0]["id"], bodies[1]["id"]);
    system.stop().await;
    t.finish().await
}
