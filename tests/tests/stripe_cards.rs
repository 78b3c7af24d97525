//! Real card payments against a stateful Stripe fake (`localstripe`, started per test;
//! see `reservoir_tests::localstripe`), through the Stripe adapter, the domain and the
//! API: cards saved from a PaymentMethod and through a SetupIntent, repeated purchases
//! and auto-reloads on one stored card, declines, 3-D Secure, and webhooks (a lost
//! answer completed, forged and replayed requests refused). SQLite by default,
//! PostgreSQL with TEST_DATABASE_URL.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::entity::enums::{AutoReloadStatus, PurchaseSource, PurchaseStatus};
use billing::entity::{accounts, auto_reload_settings, notifications, payment_methods, purchases};
use billing::payments::capture::{self, Next, Verdict};
use billing::payments::purchases::{PurchaseCreditsRequest, PurchaseItem};
use billing::payments::{
    CardSetup, ChargeOutcome, ChargeRequest, CustomerRequest, GatewayError, GatewayEvent,
    GatewayFuture, PaymentGateway, WebhookError,
};
use billing::policies::auto_reload_settings::AutoReloadInput;
use billing::sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder};
use billing::{Credits, ErrorCode};
use chrono::{DateTime, Utc};
use reservoir_tests::app::{ADMIN_TOKEN, App, code};
use reservoir_tests::localstripe::{LocalStripe, WEBHOOK_SECRET, cards, string};
use reservoir_tests::{Fixture, TestDb, count, money_row_counts, usage_req, workspace};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

const CREDIT: i64 = 1_000_000_000;
const ADD_CARD: &str = "mutation($input: AddPaymentMethodInput!) { addPaymentMethod(input: $input) { id brand last4 expMonth expYear isDefault } }";
const SETUP: &str =
    "mutation($id: ID!) { startCardSetup(accountId: $id) { setupIntentId clientSecret } }";

/// The API, the gateway and the fake for one test.
struct Stripe {
    fake: LocalStripe,
    gateway: Arc<gateways::StripeGateway>,
    app: App,
}

impl Stripe {
    async fn start(t: &TestDb) -> anyhow::Result<Self> {
        let fake = LocalStripe::start().await?;
        let gateway = Arc::new(fake.gateway()?);
        let config = api::ApiConfig {
            gateway: gateway.clone(),
            ..Default::default()
        };
        let app = App::start_with_config(&t.second_pool().await?, config).await?;
        Ok(Self { fake, gateway, app })
    }

    /// `addPaymentMethod` as a frontend calls it.
    async fn add_card(&self, account: Uuid, token: &str) -> anyhow::Result<Value> {
        self.app
            .gql(
                Some(ADMIN_TOKEN),
                ADD_CARD,
                json!({ "input": { "accountId": account.to_string(), "token": token } }),
            )
            .await
    }

    /// A card from a test number, saved the way Stripe.js + `addPaymentMethod` do it.
    async fn saved_card(&self, account: Uuid, number: &str) -> anyhow::Result<Uuid> {
        let pm = self.fake.payment_method(number).await?;
        let added = self.add_card(account, &pm).await?;
        let id = added["data"]["addPaymentMethod"]["id"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("card not added: {added}"))?;
        Ok(Uuid::parse_str(id)?)
    }
}

/// What the worker's capture job does (`worker::jobs::capture_once`, without the
/// queue): prepare, charge through the gateway, apply the outcome.
async fn capture_with(
    db: &DatabaseConnection,
    gateway: &dyn PaymentGateway,
    purchase_id: Uuid,
) -> anyhow::Result<Verdict> {
    let Next::Charge(request) = capture::prepare(db, purchase_id, Utc::now()).await? else {
        return Ok(Verdict::Done);
    };
    let outcome = gateway.charge(request).await;
    Ok(capture::apply(db, purchase_id, outcome, Utc::now()).await?)
}

async fn buy(db: &DatabaseConnection, ws: Uuid, key: &str, credits: &str) -> anyhow::Result<Uuid> {
    let bought = billing::payments::purchases::purchase_credits(
        db,
        PurchaseCreditsRequest {
            workspace_id: ws,
            item: PurchaseItem::Amount(Credits::parse(credits)?),
            payment_method_id: None,
            pay_by_invoice: false,
            idempotency_key: key.into(),
            created_by_user_id: None,
        },
        Utc::now(),
    )
    .await?;
    Ok(bought.purchase.id)
}

async fn purchase(db: &DatabaseConnection, id: Uuid) -> anyhow::Result<purchases::Model> {
    Ok(billing::payments::purchases::load_purchase(db, id).await?)
}

async fn customer_of(db: &DatabaseConnection, account: Uuid) -> anyhow::Result<String> {
    accounts::Entity::find_by_id(account)
        .one(db)
        .await?
        .and_then(|a| a.gateway_customer_id)
        .ok_or_else(|| anyhow::anyhow!("the account has no Customer"))
}

async fn card(db: &DatabaseConnection, id: Uuid) -> anyhow::Result<payment_methods::Model> {
    billing::payments::cards::load_payment_method(db, id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no card {id}"))
}

async fn notifications_of(
    db: &DatabaseConnection,
    ws: Uuid,
    kind: &str,
) -> anyhow::Result<Vec<notifications::Model>> {
    Ok(notifications::Entity::find()
        .filter(notifications::Column::WorkspaceId.eq(ws))
        .filter(notifications::Column::Kind.eq(kind))
        .order_by_asc(notifications::Column::CreatedAt)
        .all(db)
        .await?)
}

async fn configure_reload(db: &DatabaseConnection, ws: Uuid, card: Uuid) -> anyhow::Result<()> {
    billing::policies::auto_reload_settings::configure_auto_reload(
        db,
        AutoReloadInput {
            workspace_id: ws,
            enabled: true,
            threshold: Credits::parse("5")?,
            amount: Credits::parse("20")?,
            payment_method_id: Some(card),
            max_reloads_per_day: 3,
        },
        Utc::now(),
    )
    .await?;
    Ok(())
}

/// Debits `credits` of usage (the test model: 1 000 nanocredits per prompt token) and
/// returns the AUTO_RELOAD purchase it started, if any.
async fn debit(
    db: &DatabaseConnection,
    ws: Uuid,
    request_id: &str,
    credits: &str,
) -> anyhow::Result<Option<Uuid>> {
    let tokens = Credits::parse(credits)?.nanos() / 1_000;
    billing::debits::usage::record_usage(db, usage_req(ws, request_id, tokens), Utc::now()).await?;
    Ok(purchases::Entity::find()
        .filter(purchases::Column::WorkspaceId.eq(ws))
        .filter(purchases::Column::Source.eq(PurchaseSource::AutoReload))
        .filter(purchases::Column::Status.eq(PurchaseStatus::Pending))
        .one(db)
        .await?
        .map(|p| p.id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_saved_from_a_payment_method_and_through_a_setup_intent() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, Utc::now()).await?;
    let s = Stripe::start(&t).await?;

    // Racing first uses make one Customer: the creation has its own idempotency key
    // (Stripe answers a repeat still in flight with 409, PAYMENT_FAILED here: try again).
    let racing = (0..4).map(|_| {
        billing::payments::cards::ensure_customer(&t.db, s.gateway.as_ref(), f.account_id)
    });
    let answers = futures::future::join_all(racing).await;
    let stored =
        billing::payments::cards::ensure_customer(&t.db, s.gateway.as_ref(), f.account_id).await?;
    for answer in answers {
        match answer {
            Ok(id) => assert_eq!(id, stored),
            Err(e) => assert_eq!(e.code(), ErrorCode::PaymentFailed, "{e}"),
        }
    }
    let listed = s.fake.get("/v1/customers").await?;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1), "{listed}");

    // A PaymentMethod made by Stripe.js (`pm_…`): attached to the account's Customer.
    let pm = s.fake.payment_method(cards::VISA).await?;
    let added = s.add_card(f.account_id, &pm).await?;
    let first = &added["data"]["addPaymentMethod"];
    assert_eq!(first["brand"], "VISA", "{added}");
    assert_eq!(first["last4"], "4242");
    assert_eq!(
        (first["expMonth"].as_i64(), first["expYear"].as_i64()),
        (Some(12), Some(2031))
    );
    assert_eq!(first["isDefault"], true);
    let customer = customer_of(&t.db, f.account_id).await?;
    assert!(customer.starts_with("cus_"), "{customer}");
    let at_stripe = s.fake.get(&format!("/v1/payment_methods/{pm}")).await?;
    assert_eq!(
        at_stripe["customer"],
        customer.as_str(),
        "attached to the Customer"
    );
    let first_id = Uuid::parse_str(first["id"].as_str().unwrap_or_default())?;
    let stored = card(&t.db, first_id).await?;
    assert_eq!(stored.gateway_token, pm);
    assert_eq!(
        stored.fingerprint,
        at_stripe["card"]["fingerprint"].as_str().map(str::to_owned)
    );

    // Through a SetupIntent on the same Customer (off_session), confirmed by Stripe.js.
    let setup = s
        .app
        .gql(
            Some(ADMIN_TOKEN),
            SETUP,
            json!({ "id": f.account_id.to_string() }),
        )
        .await?;
    let setup = &setup["data"]["startCardSetup"];
    let (seti, secret) = (
        string(setup, "setupIntentId")?,
        string(setup, "clientSecret")?,
    );
    let intent = s.fake.get(&format!("/v1/setup_intents/{seti}")).await?;
    assert_eq!(intent["customer"], customer.as_str());
    assert_eq!(intent["usage"], "off_session");
    let confirmed = s
        .fake
        .confirm_card_setup(&seti, &secret, "5555555555554444")
        .await?;
    assert_eq!(confirmed["status"], "succeeded", "{confirmed}");
    let setup_pm = string(&confirmed, "payment_method")?;
    let added = s.add_card(f.account_id, &setup_pm).await?;
    let second = &added["data"]["addPaymentMethod"];
    assert_eq!(second["last4"], "4444", "{added}");
    assert_eq!(
        second["isDefault"], false,
        "the first card stays the default"
    );
    let at_stripe = s
        .fake
        .get(&format!("/v1/payment_methods/{setup_pm}"))
        .await?;
    assert_eq!(at_stripe["customer"], customer.as_str());
    assert_eq!(
        customer_of(&t.db, f.account_id).await?,
        customer,
        "one Customer per account"
    );

    // The same card number again is the card already stored; the copy is detached.
    let again = s.fake.payment_method(cards::VISA).await?;
    let added = s.add_card(f.account_id, &again).await?;
    assert_eq!(
        added["data"]["addPaymentMethod"]["id"], first["id"],
        "{added}"
    );
    assert_eq!(count(&t.db, "payment_methods").await?, 2);
    let copy = s.fake.get(&format!("/v1/payment_methods/{again}")).await?;
    assert_eq!(copy["customer"], Value::Null, "the duplicate is detached");

    // Removing a card detaches it at Stripe.
    let removed = s
        .app
        .gql(
            Some(ADMIN_TOKEN),
            "mutation($id: ID!) { removePaymentMethod(id: $id) }",
            json!({ "id": second["id"] }),
        )
        .await?;
    assert!(removed["errors"].is_null(), "{removed}");
    let gone = s
        .fake
        .get(&format!("/v1/payment_methods/{setup_pm}"))
        .await?;
    assert_eq!(gone["customer"], Value::Null);

    // Another Customer's card is refused.
    let other =
        billing::accounts::create_account(&t.db, "Other Co", "o@other.example", "O", Utc::now())
            .await?;
    let theirs = s.saved_card(other.account.id, cards::VISA).await?;
    let theirs = card(&t.db, theirs).await?.gateway_token;
    let refused = s.add_card(f.account_id, &theirs).await?;
    assert_eq!(code(&refused), Some("INVALID_INPUT"), "{refused}");
    s.app.stop().await;
    t.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_purchases_and_two_auto_reloads_charge_one_card_on_the_customer() -> anyhow::Result<()>
{
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, Utc::now()).await?;
    let s = Stripe::start(&t).await?;
    let visa = s.saved_card(f.account_id, cards::VISA).await?;
    let token = card(&t.db, visa).await?.gateway_token;
    let customer = customer_of(&t.db, f.account_id).await?;

    let mut paid = Vec::new();
    for (key, credits) in [("buy-1", "10"), ("buy-2", "25")] {
        let id = buy(&t.db, f.ws_a, key, credits).await?;
        assert_eq!(
            capture_with(&t.db, s.gateway.as_ref(), id).await?,
            Verdict::Done
        );
        paid.push(id);
    }
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 35 * CREDIT);

    // Auto-reload below 5 credits, 20 at a time, on the same stored card, twice.
    configure_reload(&t.db, f.ws_a, visa).await?;
    for round in 0..2 {
        let before = workspace(&t.db, f.ws_a).await?.balance_nanos;
        let to_debit = Credits::from_nanos(before - 4 * CREDIT).to_string();
        let reload = debit(&t.db, f.ws_a, &format!("use-{round}"), &to_debit)
            .await?
            .ok_or_else(|| anyhow::anyhow!("round {round}: no reload started"))?;
        assert_eq!(
            capture_with(&t.db, s.gateway.as_ref(), reload).await?,
            Verdict::Done
        );
        let p = purchase(&t.db, reload).await?;
        assert_eq!(p.status, PurchaseStatus::Succeeded, "round {round}: {p:?}");
        assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 24 * CREDIT);
        paid.push(reload);
    }
    let state = auto_reload_settings::Entity::find_by_id(f.ws_a)
        .one(&t.db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no settings"))?;
    assert_eq!(state.status, AutoReloadStatus::Idle);
    assert_eq!(state.consecutive_failures, 0);

    // Every charge is its own PaymentIntent, on the account's Customer, with the card.
    let mut intents = std::collections::BTreeSet::new();
    for id in &paid {
        let p = purchase(&t.db, *id).await?;
        let pi_id = p.gateway_charge_id.clone().unwrap_or_default();
        let pi = s.fake.get(&format!("/v1/payment_intents/{pi_id}")).await?;
        assert_eq!(pi["status"], "succeeded", "{pi}");
        assert_eq!(pi["customer"], customer.as_str(), "{pi}");
        assert_eq!(pi["payment_method"], token.as_str());
        assert_eq!(
            pi["amount"].as_i64(),
            Some(p.price_nanos / 10_000_000),
            "cents"
        );
        assert_eq!(pi["metadata"]["reservoir_idempotency_key"], id.to_string());
        intents.insert(pi_id);
    }
    assert_eq!(intents.len(), 4);

    // A retried capture of a settled purchase charges nothing more.
    let again = capture_with(&t.db, s.gateway.as_ref(), paid[0]).await?;
    assert_eq!(again, Verdict::Done);
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 24 * CREDIT);
    s.app.stop().await;
    t.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_declined_when_attached_and_one_declined_when_charged() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, Utc::now()).await?;
    let s = Stripe::start(&t).await?;

    let pm = s.fake.payment_method(cards::DECLINED_ON_ATTACH).await?;
    let refused = s.add_card(f.account_id, &pm).await?;
    assert_eq!(
        code(&refused),
        Some(ErrorCode::InvalidInput.as_str()),
        "{refused}"
    );
    let message = refused["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("card_declined"), "{message}");
    assert_eq!(count(&t.db, "payment_methods").await?, 0, "nothing stored");

    s.saved_card(f.account_id, cards::DECLINED_ON_CHARGE)
        .await?;
    let before = money_row_counts(&t.db).await?;
    let id = buy(&t.db, f.ws_a, "buy-declined", "10").await?;
    assert_eq!(
        capture_with(&t.db, s.gateway.as_ref(), id).await?,
        Verdict::Done
    );
    let p = purchase(&t.db, id).await?;
    assert_eq!(p.status, PurchaseStatus::Failed);
    assert_eq!(p.failure_reason.as_deref(), Some("declined: card_declined"));
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 0);
    assert_eq!(money_row_counts(&t.db).await?, before, "no money moved");
    s.app.stop().await;
    t.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3ds_card_ends_requires_action_tells_the_admins_and_fails_the_reload()
-> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, Utc::now()).await?;
    let s = Stripe::start(&t).await?;
    let card_id = s.saved_card(f.account_id, cards::THREE_D_SECURE).await?;

    // A purchase: REQUIRES_ACTION, never credited, never retried.
    let id = buy(&t.db, f.ws_a, "buy-3ds", "10").await?;
    assert_eq!(
        capture_with(&t.db, s.gateway.as_ref(), id).await?,
        Verdict::Done
    );
    let p = purchase(&t.db, id).await?;
    assert_eq!(p.status, PurchaseStatus::RequiresAction, "{p:?}");
    assert_eq!(
        p.failure_reason.as_deref(),
        Some("requires action: authentication_required")
    );
    let pi = s
        .fake
        .get(&format!(
            "/v1/payment_intents/{}",
            p.gateway_charge_id.clone().unwrap_or_default()
        ))
        .await?;
    assert_eq!(pi["status"], "requires_action", "{pi}");
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 0);
    assert_eq!(
        capture_with(&t.db, s.gateway.as_ref(), id).await?,
        Verdict::Done
    );
    assert_eq!(purchase(&t.db, id).await?.attempts, 0, "never retried");
    let status = s
        .app
        .gql(
            Some(ADMIN_TOKEN),
            "query($id: ID!) { workspace(id: $id) { purchases { edges { node { status failureReason } } } } }",
            json!({ "id": f.ws_a.to_string() }),
        )
        .await?;
    assert_eq!(
        status["data"]["workspace"]["purchases"]["edges"][0]["node"]["status"], "REQUIRES_ACTION",
        "{status}"
    );

    // The admins are e-mailed, naming the card and what to do.
    let told = notifications_of(&t.db, f.ws_a, "PAYMENT_ACTION_REQUIRED").await?;
    assert_eq!(told.len(), 1);
    assert!(
        told[0].recipients.contains("owner@test.example"),
        "{:?}",
        told[0]
    );
    let outbox = tempfile::tempdir()?;
    let mailer = worker::email::Mailer::outbox(outbox.path());
    worker::email::deliver(
        &t.db,
        &mailer,
        told[0].id,
        "Reservoir <billing@reservoir.test>",
        Utc::now(),
    )
    .await?;
    assert!(
        worker::email::outbox_path(outbox.path(), told[0].id).exists(),
        "sent"
    );
    let mail = worker::email::render(&billing::policies::notifications::payload_of(&told[0])?)?;
    assert!(
        mail.subject.contains("VISA card ending in 3184"),
        "{}",
        mail.subject
    );
    assert!(mail.text.contains("add the card again"), "{}", mail.text);

    // As an auto-reload: a failed attempt (backoff), with the same e-mail, no credit.
    billing::payments::cards::set_default_payment_method(&t.db, card_id, Utc::now()).await?;
    reservoir_tests::fund(&t.db, f.ws_a, "10", Utc::now()).await?;
    configure_reload(&t.db, f.ws_a, card_id).await?;
    let reload = debit(&t.db, f.ws_a, "use-3ds", "6")
        .await?
        .ok_or_else(|| anyhow::anyhow!("no reload started"))?;
    assert_eq!(
        capture_with(&t.db, s.gateway.as_ref(), reload).await?,
        Verdict::Done
    );
    assert_eq!(
        purchase(&t.db, reload).await?.status,
        PurchaseStatus::RequiresAction
    );
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 4 * CREDIT);
    let state = auto_reload_settings::Entity::find_by_id(f.ws_a)
        .one(&t.db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no settings"))?;
    assert_eq!(state.status, AutoReloadStatus::Idle);
    assert_eq!(state.consecutive_failures, 1);
    assert!(state.next_attempt_at.is_some(), "backed off");
    assert_eq!(
        state.last_failure_reason.as_deref(),
        Some("requires action: authentication_required")
    );
    assert_eq!(
        notifications_of(&t.db, f.ws_a, "PAYMENT_ACTION_REQUIRED")
            .await?
            .len(),
        2
    );
    assert!(
        notifications_of(&t.db, f.ws_a, "RELOAD_FAILED")
            .await?
            .is_empty(),
        "one e-mail, not two"
    );
    s.app.stop().await;
    t.finish().await
}

/// A gateway whose charges reach Stripe but whose answers are lost (a timeout after
/// Stripe processed the request).
struct LostAnswers(Arc<gateways::StripeGateway>);

impl PaymentGateway for LostAnswers {
    fn create_customer<'a>(&'a self, req: &'a CustomerRequest) -> GatewayFuture<'a, String> {
        self.0.create_customer(req)
    }
    fn attach<'a>(
        &'a self,
        customer: &'a str,
        token: &'a str,
    ) -> GatewayFuture<'a, billing::payments::AttachedCard> {
        self.0.attach(customer, token)
    }
    fn detach<'a>(&'a self, token: &'a str) -> GatewayFuture<'a, ()> {
        self.0.detach(token)
    }
    fn start_card_setup<'a>(&'a self, customer: &'a str) -> GatewayFuture<'a, CardSetup> {
        self.0.start_card_setup(customer)
    }
    fn charge(&self, req: ChargeRequest) -> GatewayFuture<'_, ChargeOutcome> {
        Box::pin(async move {
            let _ = self.0.charge(req).await;
            Err(GatewayError::Transient("Stripe timed out".into()))
        })
    }
    fn verify_event(
        &self,
        payload: &[u8],
        signature: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<GatewayEvent, WebhookError> {
        self.0.verify_event(payload, signature, now)
    }
}

async fn post_webhook(app: &App, body: &[u8], signature: &str) -> anyhow::Result<u16> {
    let response = app
        .client
        .post(format!("{}/webhooks/stripe", app.base))
        .header("Content-Type", "application/json")
        .header("Stripe-Signature", signature)
        .body(body.to_vec())
        .send()
        .await?;
    Ok(response.status().as_u16())
}

async fn wait_for(
    db: &DatabaseConnection,
    id: Uuid,
    status: PurchaseStatus,
) -> anyhow::Result<purchases::Model> {
    for _ in 0..300 {
        let p = purchase(db, id).await?;
        if p.status == status {
            return Ok(p);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("purchase {id} never became {status:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_completes_a_lost_answer_and_forged_or_replayed_ones_change_nothing()
-> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, Utc::now()).await?;
    let s = Stripe::start(&t).await?;
    // localstripe posts each event to every registered endpoint: Reservoir's API, and a
    // recorder that keeps the exact signed requests for the replay below.
    let recorder = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(200))
        .mount(&recorder)
        .await;
    s.fake
        .register_webhook("reservoir", &format!("{}/webhooks/stripe", s.app.base))
        .await?;
    s.fake.register_webhook("recorder", &recorder.uri()).await?;
    s.saved_card(f.account_id, cards::VISA).await?;

    // The charge goes through at Stripe, but its answer is lost: the purchase stays
    // PENDING with one attempt counted, and the webhook completes it.
    let id = buy(&t.db, f.ws_a, "buy-lost", "10").await?;
    let lost = LostAnswers(s.gateway.clone());
    let verdict = capture_with(&t.db, &lost, id).await?;
    assert!(matches!(verdict, Verdict::RetryAfter(_)), "{verdict:?}");
    let p = wait_for(&t.db, id, PurchaseStatus::Succeeded).await?;
    assert_eq!(p.attempts, 1);
    let pi_id = p.gateway_charge_id.clone().unwrap_or_default();
    assert!(pi_id.starts_with("pi_"), "{p:?}");
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 10 * CREDIT);
    assert!(p.invoice_id.is_some(), "invoiced as by the capture job");
    assert_eq!(
        notifications_of(&t.db, f.ws_a, "PURCHASE_RECEIPT")
            .await?
            .len(),
        1
    );
    // The job's retry gets Stripe's saved answer for the same key: nothing more.
    assert_eq!(
        capture_with(&t.db, s.gateway.as_ref(), id).await?,
        Verdict::Done
    );
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 10 * CREDIT);

    // The recorded delivery of that event, exactly as localstripe signed it.
    let mut delivered = None;
    for _ in 0..100 {
        let requests = recorder.received_requests().await.unwrap_or_default();
        delivered = requests.into_iter().find(|r| {
            serde_json::from_slice::<Value>(&r.body).is_ok_and(|e| {
                e["type"] == "payment_intent.succeeded"
                    && e["data"]["object"]["id"] == pi_id.as_str()
            })
        });
        if delivered.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered = delivered.ok_or_else(|| anyhow::anyhow!("no webhook delivered"))?;
    let signature = delivered
        .headers
        .get("Stripe-Signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let events = count(&t.db, "gateway_events").await?;
    let money = money_row_counts(&t.db).await?;

    // Replayed: answered 200, nothing changes.
    assert_eq!(
        post_webhook(&s.app, &delivered.body, &signature).await?,
        200
    );
    assert_eq!(count(&t.db, "gateway_events").await?, events);
    assert_eq!(money_row_counts(&t.db).await?, money);
    assert_eq!(purchase(&t.db, id).await?, p);

    // Forged: another body under that signature, a bad signature, none, a wrong secret,
    // a stale timestamp: 400, nothing written.
    let id2 = buy(&t.db, f.ws_a, "buy-forged", "10").await?;
    let forged = String::from_utf8(delivered.body.clone())?
        .replace(&id.to_string(), &id2.to_string())
        .replace(&pi_id, "pi_forged");
    let now = Utc::now().timestamp();
    let stale = gateways::stripe_webhook::sign(WEBHOOK_SECRET, forged.as_bytes(), now - 301);
    let other_secret = gateways::stripe_webhook::sign("whsec_not_ours", forged.as_bytes(), now);
    for (body, sig) in [
        (forged.as_bytes(), signature.as_str()),
        (forged.as_bytes(), "t=1,v1=deadbeef"),
        (forged.as_bytes(), ""),
        (forged.as_bytes(), other_secret.as_str()),
        (forged.as_bytes(), stale.as_str()),
    ] {
        assert_eq!(post_webhook(&s.app, body, sig).await?, 400, "{sig}");
    }
    assert_eq!(
        count(&t.db, "gateway_events").await?,
        events,
        "nothing written"
    );
    assert_eq!(money_row_counts(&t.db).await?, money);
    assert_eq!(purchase(&t.db, id2).await?.status, PurchaseStatus::Pending);
    recorder.reset().await;
    s.app.stop().await;
    t.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispute_is_recorded_on_the_purchase_once() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, Utc::now()).await?;
    let s = Stripe::start(&t).await?;
    s.saved_card(f.account_id, cards::VISA).await?;
    let id = buy(&t.db, f.ws_a, "buy-disputed", "10").await?;
    capture_with(&t.db, s.gateway.as_ref(), id).await?;
    let pi_id = purchase(&t.db, id)
        .await?
        .gateway_charge_id
        .unwrap_or_default();

    // localstripe has no disputes: the event is built as Stripe documents it and
    // signed with the endpoint's secret, as Stripe signs it.
    let event = json!({
        "id": "evt_dispute_1", "object": "event", "type": "charge.dispute.created",
        "data": { "object": {
            "id": "dp_1", "object": "dispute", "amount": 1000, "charge": "ch_1",
            "payment_intent": pi_id, "reason": "fraudulent", "status": "needs_response"
        } }
    });
    let body = serde_json::to_vec(&event)?;
    let signature = gateways::stripe_webhook::sign(WEBHOOK_SECRET, &body, Utc::now().timestamp());
    assert_eq!(post_webhook(&s.app, &body, &signature).await?, 200);
    let disputed = purchase(&t.db, id).await?;
    assert_eq!(disputed.dispute_reason.as_deref(), Some("fraudulent"));
    assert!(disputed.disputed_at.is_some());
    assert_eq!(
        post_webhook(&s.app, &body, &signature).await?,
        200,
        "a replay"
    );
    assert_eq!(purchase(&t.db, id).await?, disputed);
    assert_eq!(
        workspace(&t.db, f.ws_a).await?.balance_nanos,
        10 * CREDIT,
        "no money moved"
    );

    // Visible to the account's admins; a plain member is refused.
    let owner =
        billing::accounts::create_user_token(&t.db, f.owner_id, "owner", Utc::now()).await?;
    let query = "query($id: ID!) { workspace(id: $id) { purchases { edges { node { disputedAt disputeReason } } } } }";
    let seen = s
        .app
        .gql(Some(&owner), query, json!({ "id": f.ws_a.to_string() }))
        .await?;
    let node = &seen["data"]["workspace"]["purchases"]["edges"][0]["node"];
    assert_eq!(node["disputeReason"], "fraudulent", "{seen}");
    let (member, _) = billing::accounts::add_workspace_member(
        &t.db,
        f.ws_a,
        "member@test.example",
        Some("Member"),
        billing::entity::enums::WorkspaceRole::Admin,
        Utc::now(),
    )
    .await?;
    let member_token =
        billing::accounts::create_user_token(&t.db, member.id, "m", Utc::now()).await?;
    let refused = s
        .app
        .gql(
            Some(&member_token),
            query,
            json!({ "id": f.ws_a.to_string() }),
        )
        .await?;
    assert_eq!(code(&refused), Some("FORBIDDEN"), "{refused}");
    s.app.stop().await;
    t.finish().await
}
