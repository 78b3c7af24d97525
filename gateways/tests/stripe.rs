//! The Stripe adapter against wiremock fixtures shaped like Stripe's real answers.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::entity::enums::CardBrand;
use billing::payments::{AttachedCard, ChargeOutcome, ChargeRequest, GatewayError, PaymentGateway};
use gateways::{STRIPE_API_VERSION, StripeGateway};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use wiremock::matchers::{body_string_contains, header, method, path, path_regex};
use wiremock::{Match, Mock, MockServer, Request, ResponseTemplate};

const KEY: &str = "sk_test_51Reservoir0000secret";
const CUSTOMER: &str = "cus_QFakeAccount";
const PURCHASE_ID: &str = "0192f3a4-5b6c-7d8e-9f00-112233445566";
/// Short, so that the timeout test is quick.
const TIMEOUT_MS: u64 = 300;

fn gateway(server: &MockServer) -> StripeGateway {
    StripeGateway::new(KEY.into(), server.uri(), TIMEOUT_MS).expect("gateway")
}

fn charge_request() -> ChargeRequest {
    ChargeRequest {
        amount_cents: 2_500,
        currency: "usd".into(),
        gateway_token: "pm_1QFakeVisa4242".into(),
        gateway_customer_id: Some(CUSTOMER.into()),
        idempotency_key: PURCHASE_ID.into(),
        description: format!("Reservoir credits: 25 (purchase {PURCHASE_ID})"),
    }
}

/// The decoded `application/x-www-form-urlencoded` pairs of a request body.
fn form(request: &Request) -> Vec<(String, String)> {
    let body = String::from_utf8(request.body.clone()).expect("utf-8 body");
    reqwest::Url::parse(&format!("http://form.invalid/?{body}"))
        .expect("form body")
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Matches a form-encoded body holding every one of the given pairs.
struct FormHas(Vec<(&'static str, String)>);

impl Match for FormHas {
    fn matches(&self, request: &Request) -> bool {
        let pairs = form(request);
        self.0
            .iter()
            .all(|(k, v)| pairs.iter().any(|(pk, pv)| pk == k && pv == v))
    }
}

fn authenticated(m: wiremock::MockBuilder) -> wiremock::MockBuilder {
    m.and(header("Authorization", format!("Bearer {KEY}").as_str()))
        .and(header("Stripe-Version", STRIPE_API_VERSION))
}

// --- fixtures (trimmed copies of Stripe's documented bodies) -------------------------

fn payment_method_card(id: &str, brand: &str, last4: &str) -> Value {
    json!({
        "id": id,
        "object": "payment_method",
        "allow_redisplay": "unspecified",
        "billing_details": {
            "address": {"city": null, "country": null, "line1": null, "line2": null,
                        "postal_code": null, "state": null},
            "email": null, "name": null, "phone": null
        },
        "card": {
            "brand": brand,
            "checks": {"address_line1_check": null, "address_postal_code_check": null,
                       "cvc_check": "unchecked"},
            "country": "US",
            "display_brand": brand,
            "exp_month": 8,
            "exp_year": 2031,
            "fingerprint": "Xt5EWLLDS7FJjR1c",
            "funding": "credit",
            "generated_from": null,
            "last4": last4,
            "networks": {"available": [brand], "preferred": null},
            "three_d_secure_usage": {"supported": true},
            "wallet": null
        },
        "created": 1_726_673_582,
        "customer": null,
        "livemode": false,
        "metadata": {},
        "type": "card"
    })
}

fn payment_intent(id: &str, status: &str, last_payment_error: Value) -> Value {
    json!({
        "id": id,
        "object": "payment_intent",
        "amount": 2500,
        "amount_capturable": 0,
        "amount_received": if status == "succeeded" { 2500 } else { 0 },
        "capture_method": "automatic_async",
        "client_secret": format!("{id}_secret_4ds8fJ2kS"),
        "confirmation_method": "automatic",
        "created": 1_726_673_600,
        "currency": "usd",
        "customer": null,
        "description": format!("Reservoir credits: 25 (purchase {PURCHASE_ID})"),
        "last_payment_error": last_payment_error,
        "latest_charge": if status == "succeeded" { json!("ch_3QFakeCharge") } else { Value::Null },
        "livemode": false,
        "metadata": {"reservoir_idempotency_key": PURCHASE_ID},
        "next_action": if status == "requires_action" {
            json!({"type": "use_stripe_sdk", "use_stripe_sdk": {"type": "three_d_secure_redirect"}})
        } else { Value::Null },
        "payment_method": "pm_1QFakeVisa4242",
        "payment_method_types": ["card"],
        "status": status
    })
}

fn stripe_error(kind: &str, code: &str, message: &str) -> Value {
    json!({
        "error": {
            "code": code,
            "doc_url": format!("https://stripe.com/docs/error-codes/{}", code.replace('_', "-")),
            "message": message,
            "request_log_url": "https://dashboard.stripe.com/test/logs/req_FakeLog",
            "type": kind
        }
    })
}

fn card_declined(decline_code: &str, message: &str) -> Value {
    json!({
        "error": {
            "charge": "ch_3QFakeDeclined",
            "code": "card_declined",
            "decline_code": decline_code,
            "doc_url": "https://stripe.com/docs/error-codes/card-declined",
            "message": message,
            "payment_intent": payment_intent("pi_3QFakeDeclined", "requires_payment_method", Value::Null),
            "request_log_url": "https://dashboard.stripe.com/test/logs/req_FakeLog",
            "type": "card_error"
        }
    })
}

/// The PaymentMethod as Stripe answers after attaching it to [`CUSTOMER`].
fn attached(mut method: Value) -> Value {
    method["customer"] = json!(CUSTOMER);
    method
}

/// Mounts Stripe's attach endpoint, answering `method` attached to [`CUSTOMER`].
async fn mount_attach(server: &MockServer, method_json: Value) {
    authenticated(Mock::given(method("POST")).and(path_regex(r"^/v1/payment_methods/\w+/attach$")))
        .and(FormHas(vec![("customer", CUSTOMER.into())]))
        .respond_with(ResponseTemplate::new(200).set_body_json(attached(method_json)))
        .expect(1)
        .named("attach payment method")
        .mount(server)
        .await;
}

async fn charge_answered(template: ResponseTemplate) -> Result<ChargeOutcome, GatewayError> {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(template)
        .expect(1)
        .mount(&server)
        .await;
    gateway(&server).charge(charge_request()).await
}

// --- attach --------------------------------------------------------------------------

#[tokio::test]
async fn attach_creates_a_payment_method_from_the_token() {
    let server = MockServer::start().await;
    authenticated(Mock::given(method("POST")).and(path("/v1/payment_methods")))
        .and(header("Content-Type", "application/x-www-form-urlencoded"))
        .and(FormHas(vec![
            ("type", "card".into()),
            ("card[token]", "tok_visa".into()),
        ]))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("Request-Id", "req_FakeAttach")
                .set_body_json(payment_method_card("pm_1QFakeVisa4242", "visa", "4242")),
        )
        .expect(1)
        .named("create payment method")
        .mount(&server)
        .await;
    mount_attach(
        &server,
        payment_method_card("pm_1QFakeVisa4242", "visa", "4242"),
    )
    .await;
    let card = gateway(&server)
        .attach(CUSTOMER, "tok_visa")
        .await
        .expect("attached");
    assert_eq!(
        card,
        AttachedCard {
            gateway_token: "pm_1QFakeVisa4242".into(),
            brand: CardBrand::Visa,
            last4: "4242".into(),
            exp_month: 8,
            exp_year: 2031,
            fingerprint: Some("Xt5EWLLDS7FJjR1c".into()),
        }
    );
    let requests = server.received_requests().await.expect("recording");
    let request = &requests[0];
    assert_eq!(
        request
            .headers
            .get("Authorization")
            .map(|v| v.to_str().ok()),
        Some(Some(format!("Bearer {KEY}").as_str()))
    );
    assert_eq!(
        request
            .headers
            .get("Stripe-Version")
            .map(|v| v.to_str().ok()),
        Some(Some(STRIPE_API_VERSION))
    );
}

#[tokio::test]
async fn attach_maps_brands() {
    for (brand, expected) in [
        ("mastercard", CardBrand::Mastercard),
        ("amex", CardBrand::Amex),
        ("discover", CardBrand::Discover),
        ("jcb", CardBrand::Other),
        ("unionpay", CardBrand::Other),
    ] {
        let server = MockServer::start().await;
        authenticated(Mock::given(method("POST")).and(path("/v1/payment_methods")))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(payment_method_card("pm_x", brand, "0005")),
            )
            .expect(1)
            .mount(&server)
            .await;
        mount_attach(&server, payment_method_card("pm_x", brand, "0005")).await;
        let card = gateway(&server)
            .attach(CUSTOMER, "tok_x")
            .await
            .expect("attached");
        assert_eq!(card.brand, expected, "{brand}");
        assert_eq!(card.last4, "0005");
    }
}

#[tokio::test]
async fn attach_with_an_unknown_token_is_invalid() {
    let server = MockServer::start().await;
    authenticated(Mock::given(method("POST")).and(path("/v1/payment_methods")))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "error": {
                "code": "resource_missing",
                "doc_url": "https://stripe.com/docs/error-codes/resource-missing",
                "message": "No such token: 'tok_bogus'",
                "param": "card[token]",
                "request_log_url": "https://dashboard.stripe.com/test/logs/req_FakeLog",
                "type": "invalid_request_error"
            }
        })))
        .expect(1)
        .mount(&server)
        .await;
    match gateway(&server).attach(CUSTOMER, "tok_bogus").await {
        Err(GatewayError::Invalid(m)) => assert!(m.contains("resource_missing"), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn attach_failures_by_kind() {
    let cases = [
        (
            ResponseTemplate::new(402).set_body_json(stripe_error(
                "card_error",
                "expired_card",
                "Your card has expired.",
            )),
            "invalid",
        ),
        (
            ResponseTemplate::new(429).set_body_json(stripe_error(
                "invalid_request_error",
                "rate_limit",
                "Too many requests hit the API too quickly.",
            )),
            "transient",
        ),
        (
            ResponseTemplate::new(503).set_body_string("upstream unavailable"),
            "transient",
        ),
    ];
    for (template, expected) in cases {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/payment_methods"))
            .respond_with(template)
            .expect(1)
            .mount(&server)
            .await;
        let got = gateway(&server).attach(CUSTOMER, "tok_x").await;
        let kind = match &got {
            Err(GatewayError::Invalid(_)) => "invalid",
            Err(GatewayError::Transient(_)) => "transient",
            Ok(_) => "ok",
        };
        assert_eq!(kind, expected, "{got:?}");
    }
}

// --- charge --------------------------------------------------------------------------

#[tokio::test]
async fn charge_success_sends_a_confirmed_off_session_payment_intent() {
    let server = MockServer::start().await;
    authenticated(Mock::given(method("POST")).and(path("/v1/payment_intents")))
        .and(header("Idempotency-Key", PURCHASE_ID))
        .and(header("Content-Type", "application/x-www-form-urlencoded"))
        .and(FormHas(vec![
            ("amount", "2500".into()),
            ("currency", "usd".into()),
            ("payment_method", "pm_1QFakeVisa4242".into()),
            ("confirm", "true".into()),
            ("off_session", "true".into()),
            ("customer", CUSTOMER.into()),
            (
                "description",
                format!("Reservoir credits: 25 (purchase {PURCHASE_ID})"),
            ),
        ]))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("Request-Id", "req_FakeCharge")
                .set_body_json(payment_intent(
                    "pi_3QFakeSucceeded",
                    "succeeded",
                    Value::Null,
                )),
        )
        .expect(1)
        .mount(&server)
        .await;
    let outcome = gateway(&server)
        .charge(charge_request())
        .await
        .expect("charged");
    assert_eq!(
        outcome,
        ChargeOutcome::Succeeded {
            charge_id: "pi_3QFakeSucceeded".into()
        }
    );

    // The exact request, field by field.
    let requests = server.received_requests().await.expect("recording");
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    let pairs = form(request);
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(pk, _)| pk == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("amount"), Some("2500"), "amount in cents");
    assert_eq!(get("currency"), Some("usd"));
    assert_eq!(get("payment_method"), Some("pm_1QFakeVisa4242"));
    assert_eq!(get("confirm"), Some("true"));
    assert_eq!(get("off_session"), Some("true"));
    assert_eq!(get("payment_method_types[0]"), Some("card"));
    let header_of = |name: &str| {
        request
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header_of("Idempotency-Key").as_deref(), Some(PURCHASE_ID));
    assert_eq!(header_of("Authorization"), Some(format!("Bearer {KEY}")));
    assert_eq!(
        header_of("Stripe-Version").as_deref(),
        Some(STRIPE_API_VERSION)
    );
}

#[tokio::test]
async fn a_402_card_declined_is_a_decline_with_the_decline_code() {
    let got = charge_answered(ResponseTemplate::new(402).set_body_json(card_declined(
        "insufficient_funds",
        "Your card has insufficient funds.",
    )))
    .await;
    assert_eq!(
        got,
        Ok(ChargeOutcome::Declined {
            reason: "insufficient_funds".into()
        })
    );
}

#[tokio::test]
async fn a_402_without_a_decline_code_gives_the_code() {
    let got = charge_answered(ResponseTemplate::new(402).set_body_json(stripe_error(
        "card_error",
        "expired_card",
        "Your card has expired.",
    )))
    .await;
    assert_eq!(
        got,
        Ok(ChargeOutcome::Declined {
            reason: "expired_card".into()
        })
    );
}

#[tokio::test]
async fn a_processing_error_is_transient() {
    let got = charge_answered(ResponseTemplate::new(402).set_body_json(stripe_error(
        "card_error",
        "processing_error",
        "An error occurred while processing your card. Try again in a little bit.",
    )))
    .await;
    assert!(matches!(got, Err(GatewayError::Transient(_))), "{got:?}");
}

#[tokio::test]
async fn a_500_is_transient() {
    let got = charge_answered(ResponseTemplate::new(500).set_body_json(stripe_error(
        "api_error",
        "",
        "An unknown error occurred",
    )))
    .await;
    assert!(matches!(got, Err(GatewayError::Transient(_))), "{got:?}");
}

#[tokio::test]
async fn a_5xx_without_a_json_body_is_transient() {
    let got =
        charge_answered(ResponseTemplate::new(502).set_body_string("<html>Bad Gateway</html>"))
            .await;
    assert!(matches!(got, Err(GatewayError::Transient(_))), "{got:?}");
}

#[tokio::test]
async fn a_429_is_transient() {
    let got = charge_answered(ResponseTemplate::new(429).set_body_json(stripe_error(
        "invalid_request_error",
        "rate_limit",
        "Too many requests hit the API too quickly.",
    )))
    .await;
    assert!(matches!(got, Err(GatewayError::Transient(_))), "{got:?}");
}

#[tokio::test]
async fn a_409_concurrent_request_with_the_same_key_is_transient() {
    let got = charge_answered(ResponseTemplate::new(409).set_body_json(stripe_error(
        "idempotency_error",
        "",
        "There is currently another in-progress request using this Idempotent Key (that probably means you submitted twice, and the other request is still going through): 0192f3a4. Please try again later.",
    )))
    .await;
    assert!(matches!(got, Err(GatewayError::Transient(_))), "{got:?}");
}

#[tokio::test]
async fn a_400_is_invalid() {
    for body in [
        stripe_error(
            "invalid_request_error",
            "resource_missing",
            "No such PaymentMethod: 'pm_1QFakeVisa4242'",
        ),
        stripe_error(
            "idempotency_error",
            "",
            "Keys for idempotent requests can only be used with the same parameters they were first used with.",
        ),
    ] {
        let got = charge_answered(ResponseTemplate::new(400).set_body_json(body)).await;
        assert!(matches!(got, Err(GatewayError::Invalid(_))), "{got:?}");
    }
}

#[tokio::test]
async fn a_refused_key_is_invalid_and_not_echoed() {
    let got = charge_answered(ResponseTemplate::new(401).set_body_json(json!({
        "error": {
            "message": "Invalid API Key provided: sk_test_****cret",
            "type": "invalid_request_error"
        }
    })))
    .await;
    match got {
        Err(GatewayError::Invalid(m)) => assert!(!m.contains("sk_"), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn a_response_slower_than_the_timeout_is_transient() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(payment_intent("pi_late", "succeeded", Value::Null))
                .set_delay(Duration::from_secs(5)),
        )
        .mount(&server)
        .await;
    let started = Instant::now();
    let got = gateway(&server).charge(charge_request()).await;
    let took = started.elapsed();
    assert!(matches!(got, Err(GatewayError::Transient(_))), "{got:?}");
    assert!(
        took >= Duration::from_millis(TIMEOUT_MS) && took < Duration::from_secs(3),
        "gave up after {took:?}"
    );
}

#[tokio::test]
async fn a_connection_refused_is_transient() {
    // A port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let g = StripeGateway::new(KEY.into(), format!("http://127.0.0.1:{port}"), TIMEOUT_MS)
        .expect("gateway");
    let got = g.charge(charge_request()).await;
    assert!(matches!(got, Err(GatewayError::Transient(_))), "{got:?}");
    let got = g.attach(CUSTOMER, "tok_visa").await;
    assert!(matches!(got, Err(GatewayError::Transient(_))), "{got:?}");
}

#[tokio::test]
async fn requires_action_needs_the_cardholder() {
    let got = charge_answered(ResponseTemplate::new(200).set_body_json(payment_intent(
        "pi_3QFake3ds",
        "requires_action",
        Value::Null,
    )))
    .await;
    assert_eq!(
        got,
        Ok(ChargeOutcome::RequiresAction {
            charge_id: Some("pi_3QFake3ds".into()),
            reason: "authentication_required".into()
        })
    );
}

/// Stripe's real answer to an off-session charge of a card that needs 3-D Secure:
/// 402 `authentication_required`, with the PaymentIntent in the error.
#[tokio::test]
async fn a_402_authentication_required_needs_the_cardholder() {
    let mut body = card_declined(
        "authentication_required",
        "Your card was declined. This transaction requires authentication.",
    );
    body["error"]["code"] = json!("authentication_required");
    body["error"]["payment_intent"]["id"] = json!("pi_3QFakeAuth");
    let got = charge_answered(ResponseTemplate::new(402).set_body_json(body)).await;
    assert_eq!(
        got,
        Ok(ChargeOutcome::RequiresAction {
            charge_id: Some("pi_3QFakeAuth".into()),
            reason: "authentication_required".into()
        })
    );
}

// --- customers, PaymentMethod ids, setup, detach -------------------------------------

#[tokio::test]
async fn a_customer_is_created_with_its_own_idempotency_key() {
    let server = MockServer::start().await;
    authenticated(Mock::given(method("POST")).and(path("/v1/customers")))
        .and(header("Idempotency-Key", "customer:acct-1"))
        .and(FormHas(vec![("name", "Acme".into())]))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": CUSTOMER, "object": "customer", "name": "Acme"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let req = billing::payments::CustomerRequest {
        account_id: uuid::Uuid::nil(),
        name: "Acme".into(),
        idempotency_key: "customer:acct-1".into(),
    };
    assert_eq!(
        gateway(&server).create_customer(&req).await.as_deref(),
        Ok(CUSTOMER)
    );
}

#[tokio::test]
async fn a_payment_method_id_is_read_then_attached_unless_already_ours() {
    let server = MockServer::start().await;
    authenticated(Mock::given(method("GET")).and(path("/v1/payment_methods/pm_1QFromElements")))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(payment_method_card(
                "pm_1QFromElements",
                "visa",
                "4242",
            )),
        )
        .expect(1)
        .mount(&server)
        .await;
    mount_attach(
        &server,
        payment_method_card("pm_1QFromElements", "visa", "4242"),
    )
    .await;
    let card = gateway(&server)
        .attach(CUSTOMER, "pm_1QFromElements")
        .await
        .expect("attached");
    assert_eq!(card.gateway_token, "pm_1QFromElements");

    // Already attached to this Customer (a SetupIntent did it): no second attach.
    let server = MockServer::start().await;
    authenticated(Mock::given(method("GET")).and(path("/v1/payment_methods/pm_1QSetUp")))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(attached(payment_method_card(
                "pm_1QSetUp",
                "mastercard",
                "4444",
            ))),
        )
        // Once here, once more for the other Customer below.
        .expect(2)
        .mount(&server)
        .await;
    let card = gateway(&server)
        .attach(CUSTOMER, "pm_1QSetUp")
        .await
        .expect("attached");
    assert_eq!(card.brand, CardBrand::Mastercard);
    assert_eq!(server.received_requests().await.map(|r| r.len()), Some(1));

    // Another Customer's card, or an id that cannot be one, is refused.
    let g = gateway(&server);
    let got = g.attach("cus_QSomeoneElse", "pm_1QSetUp").await;
    assert!(matches!(got, Err(GatewayError::Invalid(_))), "{got:?}");
    let got = g.attach(CUSTOMER, "pm_../../v1/customers").await;
    assert!(matches!(got, Err(GatewayError::Invalid(_))), "{got:?}");
}

#[tokio::test]
async fn card_setup_and_detach() {
    let server = MockServer::start().await;
    authenticated(Mock::given(method("POST")).and(path("/v1/setup_intents")))
        .and(FormHas(vec![
            ("customer", CUSTOMER.into()),
            ("usage", "off_session".into()),
            ("payment_method_types[0]", "card".into()),
        ]))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": "seti_1QFake", "object": "setup_intent",
            "client_secret": "seti_1QFake_secret_abc", "status": "requires_payment_method",
            "usage": "off_session", "customer": CUSTOMER
        })))
        .expect(1)
        .mount(&server)
        .await;
    authenticated(Mock::given(method("POST")).and(path("/v1/payment_methods/pm_1QOld/detach")))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(payment_method_card("pm_1QOld", "visa", "4242")),
        )
        .expect(1)
        .mount(&server)
        .await;
    let g = gateway(&server);
    let setup = g.start_card_setup(CUSTOMER).await.expect("setup");
    assert_eq!(setup.setup_intent_id, "seti_1QFake");
    assert_eq!(setup.client_secret, "seti_1QFake_secret_abc");
    assert_eq!(g.detach("pm_1QOld").await, Ok(()));
}

#[tokio::test]
async fn requires_payment_method_is_a_decline_with_the_last_error() {
    let got = charge_answered(ResponseTemplate::new(200).set_body_json(payment_intent(
        "pi_3QFakeRpm",
        "requires_payment_method",
        json!({
            "code": "card_declined",
            "decline_code": "do_not_honor",
            "message": "Your card was declined.",
            "type": "card_error"
        }),
    )))
    .await;
    assert_eq!(
        got,
        Ok(ChargeOutcome::Declined {
            reason: "do_not_honor".into()
        })
    );
}

#[tokio::test]
async fn processing_is_read_again_by_id() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(ResponseTemplate::new(200).set_body_json(payment_intent(
            "pi_3QFakeSlow",
            "processing",
            Value::Null,
        )))
        .expect(2)
        .mount(&server)
        .await;
    let reread =
        authenticated(Mock::given(method("GET")).and(path("/v1/payment_intents/pi_3QFakeSlow")))
            .respond_with(ResponseTemplate::new(200).set_body_json(payment_intent(
                "pi_3QFakeSlow",
                "processing",
                Value::Null,
            )))
            .up_to_n_times(1)
            .expect(1)
            .mount_as_scoped(&server)
            .await;
    let g = gateway(&server);
    let got = g.charge(charge_request()).await;
    assert!(matches!(got, Err(GatewayError::Transient(_))), "{got:?}");
    drop(reread);

    // A retry replays the saved `processing`; the fresh read shows the result.
    authenticated(Mock::given(method("GET")).and(path("/v1/payment_intents/pi_3QFakeSlow")))
        .respond_with(ResponseTemplate::new(200).set_body_json(payment_intent(
            "pi_3QFakeSlow",
            "succeeded",
            Value::Null,
        )))
        .expect(1)
        .mount(&server)
        .await;
    assert_eq!(
        g.charge(charge_request()).await,
        Ok(ChargeOutcome::Succeeded {
            charge_id: "pi_3QFakeSlow".into()
        })
    );
}

#[tokio::test]
async fn bad_requests_are_refused_without_calling_stripe() {
    let server = MockServer::start().await;
    Mock::given(body_string_contains(""))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&server)
        .await;
    let g = gateway(&server);
    for req in [
        ChargeRequest {
            idempotency_key: String::new(),
            ..charge_request()
        },
        ChargeRequest {
            amount_cents: 0,
            ..charge_request()
        },
        ChargeRequest {
            currency: "eur".into(),
            ..charge_request()
        },
    ] {
        let got = g.charge(req).await;
        assert!(matches!(got, Err(GatewayError::Invalid(_))), "{got:?}");
    }
}
