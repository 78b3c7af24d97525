//! The Stripe adapter: [`StripeGateway`] implements [`PaymentGateway`] over Stripe's
//! form-encoded REST API.
//!
//! - `create_customer(req)`: `POST /v1/customers` with `name` and
//!   `metadata[account_id]`, `Idempotency-Key: customer:<account id>`. One per account.
//! - `attach(customer, token)`: a PaymentMethod id (`pm_…`, what Stripe.js and
//!   Elements produce) is read (`GET /v1/payment_methods/{id}`); a legacy token
//!   (`tok_…`) is first turned into a PaymentMethod (`POST /v1/payment_methods` with
//!   `type=card`, `card[token]`). Unless it already belongs to the Customer, it is then
//!   attached (`POST /v1/payment_methods/{id}/attach`, `customer`): Stripe lets a
//!   PaymentMethod that belongs to no Customer pay one PaymentIntent only. The id
//!   becomes the stored `gateway_token`, with brand, last4, expiry and fingerprint. A
//!   card of another Customer is refused.
//! - `detach(token)`: `POST /v1/payment_methods/{id}/detach`.
//! - `start_card_setup(customer)`: `POST /v1/setup_intents` with `customer`,
//!   `usage=off_session`, `payment_method_types[0]=card`; the client secret goes to
//!   Stripe.js (`confirmCardSetup`), which authenticates the card once.
//! - `charge(req)`: `POST /v1/payment_intents` with `amount` (cents), `currency`,
//!   `customer`, `payment_method`, `payment_method_types[0]=card` (so Stripe never asks
//!   for a `return_url`), `confirm=true`, `off_session=true`, `description`,
//!   `metadata[reservoir_idempotency_key]`, and the `Idempotency-Key` header set to
//!   `req.idempotency_key` (the purchase id).
//! - `verify_event`: the `Stripe-Signature` of a webhook request (`stripe_webhook`).
//!
//! How Stripe's answers map onto the port:
//!
//! | Stripe answer | result |
//! |---|---|
//! | 200, PaymentIntent `succeeded` | `Succeeded { charge_id: <PaymentIntent id> }` |
//! | 200, `requires_payment_method` | `Declined` (`last_payment_error`'s decline code or code, else the status); `RequiresAction` when that is `authentication_required` |
//! | 200, `requires_action` | `RequiresAction { "authentication_required" }`: nobody is present to complete 3-D Secure |
//! | 200, `requires_confirmation`, `canceled` | `Declined` with the status |
//! | 200, `processing` | the PaymentIntent is read again once (`GET`); still `processing` → `Transient` |
//! | 200, `requires_capture` or unknown status, or an unreadable 200 body | `Transient` (never a success without proof, never a decline that may have been charged) |
//! | 402 (or any `card_error`) | `Declined` with `decline_code`, else `code` (`card_declined`, `expired_card`, …); `RequiresAction` for `authentication_required` (Stripe's answer to an off-session charge that needs 3-D Secure) |
//! | `card_error` with code `processing_error` | `Transient` (as the sandbox's `tok_processingError`) |
//! | 409 (`idempotency_error`: a request with the same key is still running; or a lock timeout) | `Transient`: retry with the same key later gets the first request's outcome |
//! | 429, 5xx, timeouts, connection errors | `Transient` |
//! | other 4xx (`invalid_request_error`, 400 `idempotency_error` for a key reused with other parameters, 401/403 bad key, 404 no such payment method) | `Invalid` |
//!
//! `attach` maps the same way, except that a card error is `Invalid` (there is no
//! decline outcome for attaching).
//!
//! Stripe saves the first response to an idempotency key for 24 hours and replays it to
//! every repeat (its documentation: "including 500 errors"). A `Transient` retry
//! therefore gets another try only when the first attempt never reached Stripe's
//! executing stage (timeouts, connection errors, 429, 409); otherwise it replays the
//! same answer. That is why a `processing` PaymentIntent is read again by id rather
//! than by repeating the POST.
//!
//! The secret key travels only in the `Authorization` header, marked sensitive; it is
//! never logged and [`StripeGateway`]'s `Debug` leaves it out.

use crate::stripe_webhook::AUTHENTICATION_REQUIRED;
use billing::entity::enums::CardBrand;
use billing::payments::{
    AttachedCard, CURRENCY, CardSetup, ChargeOutcome, ChargeRequest, CustomerRequest, GatewayError,
    GatewayEvent, GatewayFuture, GatewayResult, PaymentGateway, WebhookError,
};
use chrono::{DateTime, Utc};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The Stripe API version every request pins (`Stripe-Version`), so that a change of
/// the account's default version cannot change the shapes parsed here.
pub const STRIPE_API_VERSION: &str = "2024-06-20";
/// The production API.
pub const DEFAULT_BASE_URL: &str = "https://api.stripe.com";
/// Default whole-request timeout (connect, send, read the body).
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// Upper bound of the connect timeout (lower when the request timeout is lower).
pub const CONNECT_TIMEOUT_MAX_MS: u64 = 10_000;

const USER_AGENT: &str = concat!("reservoir-gateways/", env!("CARGO_PKG_VERSION"));
/// Longest Stripe message copied into an error (they are short; this is a guard).
const MESSAGE_LEN_MAX: usize = 300;
/// The PaymentIntent metadata key that carries the charge's idempotency key (the
/// purchase id), so a webhook can name the purchase even when the synchronous answer
/// was lost.
pub(crate) const IDEMPOTENCY_KEY_METADATA: &str = "reservoir_idempotency_key";
/// [`IDEMPOTENCY_KEY_METADATA`] as a form field.
const IDEMPOTENCY_KEY_METADATA_FORM: &str = "metadata[reservoir_idempotency_key]";

/// Why a [`StripeGateway`] could not be built (a configuration problem).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StripeSetupError {
    #[error("the Stripe secret key is empty or not a valid header value")]
    SecretKey,
    #[error("the Stripe base URL is not an http(s) URL: {0}")]
    BaseUrl(String),
    #[error("the Stripe request timeout must be at least 1 ms")]
    Timeout,
    #[error("could not build the Stripe HTTP client: {0}")]
    Client(String),
}

/// A [`PaymentGateway`] backed by Stripe (PaymentMethods + PaymentIntents).
///
/// Build one per process and share it as `Arc<dyn PaymentGateway>`: its HTTP client
/// pools connections.
pub struct StripeGateway {
    http: reqwest::Client,
    /// `…/v1`, without a trailing slash.
    api: String,
    timeout: Duration,
    /// The webhook endpoint's signing secret (`whsec_…`); None refuses every webhook.
    webhook_secret: Option<String>,
}

impl fmt::Debug for StripeGateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeGateway")
            .field("api", &self.api)
            .field("timeout", &self.timeout)
            .field("secret_key", &"<redacted>")
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl StripeGateway {
    /// A gateway for `base_url` (`https://api.stripe.com`, or a test double; a trailing
    /// `/v1` is accepted) authenticating with `secret_key` (`sk_…`/`rk_…`), whose
    /// requests give up after `timeout_ms` ([`DEFAULT_TIMEOUT_MS`] in production).
    pub fn new(
        secret_key: String,
        base_url: String,
        timeout_ms: u64,
    ) -> Result<Self, StripeSetupError> {
        if timeout_ms == 0 {
            return Err(StripeSetupError::Timeout);
        }
        let api = api_root(&base_url)?;
        let timeout = Duration::from_millis(timeout_ms);
        let connect_timeout = Duration::from_millis(timeout_ms.min(CONNECT_TIMEOUT_MAX_MS));

        let secret_key = secret_key.trim();
        if secret_key.is_empty() {
            return Err(StripeSetupError::SecretKey);
        }
        let mut auth = HeaderValue::from_str(&format!("Bearer {secret_key}"))
            .map_err(|_| StripeSetupError::SecretKey)?;
        auth.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);
        headers.insert(
            "Stripe-Version",
            HeaderValue::from_static(STRIPE_API_VERSION),
        );

        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config()?)
            .default_headers(headers)
            .user_agent(USER_AGENT)
            .timeout(timeout)
            .connect_timeout(connect_timeout)
            // A redirected POST would turn into a GET elsewhere: never follow.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| StripeSetupError::Client(e.to_string()))?;
        Ok(Self {
            http,
            api,
            timeout,
            webhook_secret: None,
        })
    }

    /// The same gateway, verifying webhooks with the endpoint's signing secret
    /// (`RESERVOIR_STRIPE_WEBHOOK_SECRET`, `whsec_…`). An empty secret leaves webhooks
    /// refused.
    #[must_use]
    pub fn with_webhook_secret(mut self, secret: &str) -> Self {
        let secret = secret.trim();
        self.webhook_secret = (!secret.is_empty()).then(|| secret.to_owned());
        self
    }

    /// The request timeout in force.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn create_customer_now(&self, req: &CustomerRequest) -> GatewayResult<String> {
        let account_id = req.account_id.to_string();
        let form = [
            ("name", req.name.as_str()),
            ("metadata[account_id]", account_id.as_str()),
        ];
        let request = self
            .http
            .post(format!("{}/customers", self.api))
            .header("Idempotency-Key", req.idempotency_key.as_str())
            .form(&form);
        let reply = send(request, "customer").await?;
        if !reply.status.is_success() {
            return Err(refusal(&reply, "customer").into_error());
        }
        let customer: Created = reply.parse("customer")?;
        tracing::info!(
            gateway_customer_id = %customer.id,
            %account_id,
            stripe_request_id = reply.stripe_request_id.as_deref().unwrap_or(""),
            "stripe: customer created"
        );
        Ok(customer.id)
    }

    async fn attach_now(&self, customer: &str, client_token: &str) -> GatewayResult<AttachedCard> {
        if client_token.is_empty() || customer.is_empty() {
            return Err(GatewayError::Invalid("no such token".into()));
        }
        let method = if client_token.starts_with("tok_") {
            let form = [("type", "card"), ("card[token]", client_token)];
            let request = self
                .http
                .post(format!("{}/payment_methods", self.api))
                .form(&form);
            method_call(request, "attach").await?
        } else {
            let id = path_id(client_token)?;
            let request = self.http.get(format!("{}/payment_methods/{id}", self.api));
            method_call(request, "attach").await?
        };
        let method = match method.customer.as_deref() {
            Some(owner) if owner == customer => method,
            Some(_) => {
                return Err(GatewayError::Invalid(
                    "the card belongs to another Stripe customer".into(),
                ));
            }
            None => {
                let request = self
                    .http
                    .post(format!(
                        "{}/payment_methods/{}/attach",
                        self.api,
                        path_id(&method.id)?
                    ))
                    .form(&[("customer", customer)]);
                method_call(request, "attach").await?
            }
        };
        let card = method.card.ok_or_else(|| {
            GatewayError::Invalid(format!("payment method {} is not a card", method.id))
        })?;
        tracing::info!(payment_method = %method.id, gateway_customer_id = %customer, brand = %card.brand, "stripe: card attached");
        Ok(AttachedCard {
            gateway_token: method.id,
            brand: card_brand(&card.brand),
            last4: card.last4,
            exp_month: card.exp_month,
            exp_year: card.exp_year,
            fingerprint: card.fingerprint.filter(|f| !f.is_empty()),
        })
    }

    async fn detach_now(&self, gateway_token: &str) -> GatewayResult<()> {
        let id = path_id(gateway_token)?;
        let request = self
            .http
            .post(format!("{}/payment_methods/{id}/detach", self.api));
        method_call(request, "detach").await?;
        tracing::info!(payment_method = %id, "stripe: card detached");
        Ok(())
    }

    async fn start_card_setup_now(&self, customer: &str) -> GatewayResult<CardSetup> {
        let form = [
            ("customer", customer),
            ("usage", "off_session"),
            ("payment_method_types[0]", "card"),
        ];
        let request = self
            .http
            .post(format!("{}/setup_intents", self.api))
            .form(&form);
        let reply = send(request, "card setup").await?;
        if !reply.status.is_success() {
            return Err(refusal(&reply, "card setup").into_error());
        }
        let intent: SetupIntent = reply.parse("card setup")?;
        Ok(CardSetup {
            setup_intent_id: intent.id,
            client_secret: intent.client_secret,
        })
    }

    async fn charge_now(&self, req: ChargeRequest) -> GatewayResult<ChargeOutcome> {
        check_charge(&req)?;
        let amount = req.amount_cents.to_string();
        let mut form = vec![
            ("amount", amount.as_str()),
            ("currency", req.currency.as_str()),
            ("payment_method", req.gateway_token.as_str()),
            ("payment_method_types[0]", "card"),
            ("confirm", "true"),
            ("off_session", "true"),
            ("description", req.description.as_str()),
            (IDEMPOTENCY_KEY_METADATA_FORM, req.idempotency_key.as_str()),
        ];
        if let Some(customer) = &req.gateway_customer_id {
            form.push(("customer", customer.as_str()));
        }
        let request = self
            .http
            .post(format!("{}/payment_intents", self.api))
            .header("Idempotency-Key", req.idempotency_key.as_str())
            .form(&form);
        let reply = send(request, "charge").await?;
        if !reply.status.is_success() {
            return charge_refused(&reply, &req.idempotency_key);
        }
        let intent: PaymentIntent = reply.parse("charge")?;
        let intent = if intent.status == "processing" {
            self.reread(intent).await?
        } else {
            intent
        };
        let outcome = intent_outcome(intent);
        if let Ok(ChargeOutcome::Succeeded { charge_id }) = &outcome {
            tracing::info!(
                idempotency_key = %req.idempotency_key,
                payment_intent = %charge_id,
                stripe_request_id = reply.stripe_request_id.as_deref().unwrap_or(""),
                "stripe: charge succeeded"
            );
        }
        outcome
    }

    /// Reads a `processing` PaymentIntent again by id (a repeated POST would only replay
    /// the saved `processing` answer).
    async fn reread(&self, intent: PaymentIntent) -> GatewayResult<PaymentIntent> {
        if intent.id.is_empty()
            || !intent
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Ok(intent);
        }
        let request = self
            .http
            .get(format!("{}/payment_intents/{}", self.api, intent.id));
        let reply = send(request, "charge status").await?;
        if !reply.status.is_success() {
            return Err(match refusal(&reply, "charge status") {
                Refusal::Card { reason, .. } => GatewayError::Transient(reason),
                Refusal::Error(GatewayError::Invalid(m)) => GatewayError::Transient(m),
                Refusal::Error(e) => e,
            });
        }
        reply.parse("charge status")
    }
}

/// Refuses what Stripe would refuse anyway, without a request.
fn check_charge(req: &ChargeRequest) -> GatewayResult<()> {
    if req.idempotency_key.is_empty() {
        return Err(GatewayError::Invalid(
            "an idempotency key is required".into(),
        ));
    }
    if req.amount_cents <= 0 {
        return Err(GatewayError::Invalid("amount must be positive".into()));
    }
    if req.currency != CURRENCY {
        return Err(GatewayError::Invalid(format!(
            "unsupported currency {}",
            req.currency
        )));
    }
    if req.gateway_token.is_empty() {
        return Err(GatewayError::Invalid("no such payment method".into()));
    }
    Ok(())
}

/// A charge's non-2xx answer: a decline, 3-D Secure needed, or an error.
fn charge_refused(reply: &Reply, idempotency_key: &str) -> GatewayResult<ChargeOutcome> {
    let stripe_request_id = reply.stripe_request_id.as_deref().unwrap_or("");
    match refusal(reply, "charge") {
        Refusal::Card {
            reason,
            payment_intent,
        } if reason == AUTHENTICATION_REQUIRED => {
            tracing::info!(
                idempotency_key,
                stripe_request_id,
                "stripe: charge needs 3-D Secure"
            );
            Ok(ChargeOutcome::RequiresAction {
                charge_id: payment_intent,
                reason,
            })
        }
        Refusal::Card { reason, .. } => {
            tracing::info!(
                idempotency_key,
                reason = %reason,
                stripe_request_id,
                "stripe: charge declined"
            );
            Ok(ChargeOutcome::Declined { reason })
        }
        Refusal::Error(e) => Err(e),
    }
}

impl PaymentGateway for StripeGateway {
    fn create_customer<'a>(&'a self, req: &'a CustomerRequest) -> GatewayFuture<'a, String> {
        Box::pin(self.create_customer_now(req))
    }

    fn attach<'a>(
        &'a self,
        gateway_customer_id: &'a str,
        client_token: &'a str,
    ) -> GatewayFuture<'a, AttachedCard> {
        Box::pin(self.attach_now(gateway_customer_id, client_token))
    }

    fn detach<'a>(&'a self, gateway_token: &'a str) -> GatewayFuture<'a, ()> {
        Box::pin(self.detach_now(gateway_token))
    }

    fn start_card_setup<'a>(
        &'a self,
        gateway_customer_id: &'a str,
    ) -> GatewayFuture<'a, CardSetup> {
        Box::pin(self.start_card_setup_now(gateway_customer_id))
    }

    fn charge(&self, req: ChargeRequest) -> GatewayFuture<'_, ChargeOutcome> {
        Box::pin(self.charge_now(req))
    }

    fn verify_event(
        &self,
        payload: &[u8],
        signature: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<GatewayEvent, WebhookError> {
        let secret = self
            .webhook_secret
            .as_deref()
            .ok_or(WebhookError::NotConfigured)?;
        crate::stripe_webhook::verify(secret, payload, signature, now)
    }
}

/// An id that is safe inside a URL path (Stripe's ids are `[A-Za-z0-9_]`); anything
/// else cannot be a card of ours.
fn path_id(id: &str) -> GatewayResult<&str> {
    if !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Ok(id)
    } else {
        Err(GatewayError::Invalid("no such payment method".into()))
    }
}

/// A PaymentMethod call: its answer, or the refusal (a card error is Invalid here:
/// attaching and detaching have no decline outcome).
async fn method_call(request: reqwest::RequestBuilder, op: &str) -> GatewayResult<PaymentMethod> {
    let reply = send(request, op).await?;
    if !reply.status.is_success() {
        return Err(refusal(&reply, op).into_error());
    }
    reply.parse(op)
}

// --- transport -------------------------------------------------------------------------

/// rustls with the ring provider and the webpki (Mozilla) roots, handed to reqwest ready
/// made: no process-wide default provider is needed (STACK.md, trap 15).
fn tls_config() -> Result<rustls::ClientConfig, StripeSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots: rustls::RootCertStore = webpki_roots::TLS_SERVER_ROOTS.iter().cloned().collect();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StripeSetupError::Client(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // This reqwest build speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// `<base>/v1` from a configured base URL (with or without the `/v1`).
fn api_root(base_url: &str) -> Result<String, StripeSetupError> {
    let bad = || StripeSetupError::BaseUrl(base_url.to_owned());
    let url = Url::parse(base_url.trim()).map_err(|_| bad())?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none()
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return Err(bad());
    }
    let root = url.as_str().trim_end_matches('/');
    Ok(if root.ends_with("/v1") {
        root.to_owned()
    } else {
        format!("{root}/v1")
    })
}

/// A response read to the end.
struct Reply {
    status: StatusCode,
    stripe_request_id: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    /// A 2xx body as `T`. An unreadable success is Transient: it may stand for a charge
    /// that happened, so it must be neither a success nor a decline.
    fn parse<T: for<'de> Deserialize<'de>>(&self, op: &str) -> GatewayResult<T> {
        serde_json::from_slice(&self.body).map_err(|e| {
            tracing::error!(
                op,
                status = self.status.as_u16(),
                stripe_request_id = self.stripe_request_id.as_deref().unwrap_or(""),
                error = %e,
                "stripe: unreadable response"
            );
            GatewayError::Transient(format!("unreadable Stripe response ({e})"))
        })
    }
}

async fn send(request: reqwest::RequestBuilder, op: &str) -> GatewayResult<Reply> {
    let transport = |e: reqwest::Error| {
        let kind = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "connection failed"
        } else {
            "request failed"
        };
        // The URL holds no secret; the key is only in a header.
        tracing::warn!(op, error = %e, "stripe: {kind}");
        GatewayError::Transient(format!("Stripe {kind}"))
    };
    let response = request.send().await.map_err(transport)?;
    let status = response.status();
    let stripe_request_id = response
        .headers()
        .get("Request-Id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.bytes().await.map_err(transport)?.to_vec();
    Ok(Reply {
        status,
        stripe_request_id,
        body,
    })
}

// --- errors ----------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ApiError,
}

#[derive(Debug, Default, Deserialize)]
struct ApiError {
    /// The PaymentIntent a card error concerns.
    #[serde(default)]
    payment_intent: Option<Created>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    decline_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

enum Refusal {
    /// The card was refused: a decline for a charge.
    Card {
        reason: String,
        payment_intent: Option<String>,
    },
    Error(GatewayError),
}

impl Refusal {
    /// Where a refusal has no decline outcome (attach, customers, setup).
    fn into_error(self) -> GatewayError {
        match self {
            Self::Card { reason, .. } => GatewayError::Invalid(reason),
            Self::Error(e) => e,
        }
    }
}

/// Classifies a non-2xx answer (see the table in the module documentation).
fn refusal(reply: &Reply, op: &str) -> Refusal {
    let status = reply.status;
    let error = serde_json::from_slice::<ErrorBody>(&reply.body)
        .map(|b| b.error)
        .unwrap_or_default();
    let kind = error.kind.as_deref().unwrap_or("");
    let code = error.code.as_deref().unwrap_or("");
    let summary = summary(status, &error);
    let stripe_request_id = reply.stripe_request_id.as_deref().unwrap_or("");

    let transient = status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::CONFLICT
        || !status.is_client_error()
        || (kind == "card_error" && code == "processing_error");
    if transient {
        tracing::warn!(
            op,
            status = status.as_u16(),
            kind,
            code,
            stripe_request_id,
            "stripe: transient failure"
        );
        return Refusal::Error(GatewayError::Transient(summary));
    }
    if status == StatusCode::PAYMENT_REQUIRED || kind == "card_error" {
        let payment_intent = error.payment_intent.map(|pi| pi.id);
        let reason = error
            .decline_code
            .or(error.code)
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "card_declined".to_owned());
        return Refusal::Card {
            reason,
            payment_intent,
        };
    }
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        // Stripe's message would echo part of the key: keep it out.
        tracing::error!(
            op,
            status = status.as_u16(),
            stripe_request_id,
            "stripe: the API key was refused; check RESERVOIR_STRIPE_SECRET_KEY"
        );
        return Refusal::Error(GatewayError::Invalid(format!(
            "Stripe refused the API key ({})",
            status.as_u16()
        )));
    }
    tracing::warn!(
        op,
        status = status.as_u16(),
        kind,
        code,
        stripe_request_id,
        "stripe: request refused"
    );
    Refusal::Error(GatewayError::Invalid(summary))
}

/// `"<code>: <message>"`, or the HTTP status when Stripe said nothing useful.
fn summary(status: StatusCode, error: &ApiError) -> String {
    let code = error
        .code
        .as_deref()
        .or(error.kind.as_deref())
        .filter(|c| !c.is_empty());
    let message: Option<String> = error
        .message
        .as_deref()
        .filter(|m| !m.is_empty())
        .map(|m| m.chars().take(MESSAGE_LEN_MAX).collect());
    match (code, message) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.to_owned(),
        (None, Some(m)) => m,
        (None, None) => format!("Stripe answered HTTP {}", status.as_u16()),
    }
}

// --- resources -------------------------------------------------------------------------

/// Any created object, by its id (a Customer, the PaymentIntent of an error).
#[derive(Debug, Default, Deserialize)]
struct Created {
    id: String,
}

#[derive(Debug, Deserialize)]
struct SetupIntent {
    id: String,
    client_secret: String,
}

#[derive(Debug, Deserialize)]
struct PaymentMethod {
    id: String,
    #[serde(default)]
    customer: Option<String>,
    #[serde(default)]
    card: Option<Card>,
}

#[derive(Debug, Deserialize)]
struct Card {
    brand: String,
    last4: String,
    exp_month: i32,
    exp_year: i32,
    #[serde(default)]
    fingerprint: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PaymentIntent {
    id: String,
    status: String,
    #[serde(default)]
    last_payment_error: Option<ApiError>,
}

/// Stripe's `card.brand` → the stored brand.
fn card_brand(brand: &str) -> CardBrand {
    match brand.to_ascii_lowercase().as_str() {
        "visa" => CardBrand::Visa,
        "mastercard" => CardBrand::Mastercard,
        "amex" | "american_express" => CardBrand::Amex,
        "discover" => CardBrand::Discover,
        _ => CardBrand::Other,
    }
}

/// A 200 PaymentIntent → the port's outcome (see the module documentation).
fn intent_outcome(intent: PaymentIntent) -> GatewayResult<ChargeOutcome> {
    let declined = |reason: &str| {
        Ok(ChargeOutcome::Declined {
            reason: reason.to_owned(),
        })
    };
    match intent.status.as_str() {
        "succeeded" => Ok(ChargeOutcome::Succeeded {
            charge_id: intent.id,
        }),
        "requires_payment_method" => {
            let reason = intent
                .last_payment_error
                .and_then(|e| e.decline_code.or(e.code))
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| intent.status.clone());
            if reason == AUTHENTICATION_REQUIRED {
                return Ok(ChargeOutcome::RequiresAction {
                    charge_id: Some(intent.id),
                    reason,
                });
            }
            declined(&reason)
        }
        // Off-session: nobody is there to complete 3-D Secure.
        "requires_action" => Ok(ChargeOutcome::RequiresAction {
            charge_id: Some(intent.id),
            reason: AUTHENTICATION_REQUIRED.to_owned(),
        }),
        "requires_confirmation" | "canceled" => declined(&intent.status),
        "processing" => Err(GatewayError::Transient(format!(
            "payment {} is still processing",
            intent.id
        ))),
        other => {
            tracing::error!(payment_intent = %intent.id, status = other, "stripe: unexpected PaymentIntent status");
            Err(GatewayError::Transient(format!(
                "payment {} has the unexpected status {other}",
                intent.id
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_root_accepts_a_base_with_or_without_v1() {
        for (base, api) in [
            ("https://api.stripe.com", "https://api.stripe.com/v1"),
            ("https://api.stripe.com/", "https://api.stripe.com/v1"),
            ("http://127.0.0.1:12345/v1", "http://127.0.0.1:12345/v1"),
            ("http://localhost:8080/v1/", "http://localhost:8080/v1"),
            (
                "http://localhost:8080/stripe",
                "http://localhost:8080/stripe/v1",
            ),
        ] {
            assert_eq!(api_root(base).as_deref(), Ok(api), "{base}");
        }
        for bad in [
            "",
            "api.stripe.com",
            "ftp://x",
            "https://u:p@x",
            "https://x/?a=b",
        ] {
            assert!(api_root(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn brands() {
        assert_eq!(card_brand("visa"), CardBrand::Visa);
        assert_eq!(card_brand("mastercard"), CardBrand::Mastercard);
        assert_eq!(card_brand("amex"), CardBrand::Amex);
        assert_eq!(card_brand("discover"), CardBrand::Discover);
        for other in ["jcb", "diners", "unionpay", "unknown", ""] {
            assert_eq!(card_brand(other), CardBrand::Other, "{other}");
        }
    }

    #[test]
    fn setup_errors() {
        let new = |k: &str, u: &str, t| StripeGateway::new(k.into(), u.into(), t).map(|_| ());
        assert_eq!(
            new("", DEFAULT_BASE_URL, 1000),
            Err(StripeSetupError::SecretKey)
        );
        assert_eq!(
            new("sk_test_\nx", DEFAULT_BASE_URL, 1000),
            Err(StripeSetupError::SecretKey)
        );
        assert_eq!(
            new("sk_test_x", DEFAULT_BASE_URL, 0),
            Err(StripeSetupError::Timeout)
        );
        assert!(matches!(
            new("sk_test_x", "nope", 1000),
            Err(StripeSetupError::BaseUrl(_))
        ));
        // The https client builds without any process-wide crypto provider installed.
        new("sk_test_x", DEFAULT_BASE_URL, DEFAULT_TIMEOUT_MS).expect("https client");
    }

    #[test]
    fn debug_hides_the_key() {
        let g = StripeGateway::new("sk_test_secret123".into(), DEFAULT_BASE_URL.into(), 1000)
            .expect("gateway");
        let shown = format!("{g:?}");
        assert!(!shown.contains("secret123"), "{shown}");
    }
}
