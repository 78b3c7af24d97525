//! Payments: the [`PaymentGateway`] port (the sandbox here; Stripe lives in
//! `gateways`), stored cards (`cards`), purchases and their invoices (`purchases`) and
//! the capture job's rules (`capture`).
//!
//! Card numbers never reach the server: the browser collects a card with the
//! gateway's own form (Stripe.js: a PaymentMethod `pm_…`, ideally authenticated once
//! through a SetupIntent, [`cards::start_card_setup`]), and
//! [`cards::add_payment_method`] attaches it to the account's gateway Customer and
//! keeps only the gateway's reference, brand, last four digits, expiry and fingerprint.
//! The gateway's signed webhooks come in through [`webhooks::receive`].

pub mod capture;
pub mod cards;
pub mod purchases;
mod sandbox;
pub mod webhooks;

use crate::error::{BillingError, Result};
use crate::money::Credits;
use chrono::{DateTime, Utc};
use entity::enums::CardBrand;
use entity::{payment_methods, purchases as purchase_rows};
pub use sandbox::{
    SANDBOX_EXP_MONTH, SANDBOX_EXP_YEAR, SANDBOX_HANG_DEFAULT, SandboxCharge, SandboxGateway,
    SandboxScenario,
};
use std::future::Future;
use std::pin::Pin;

// --- the gateway port --------------------------------------------------------------

/// A card stored at the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedCard {
    /// The gateway's reference to the stored card, used to charge it.
    pub gateway_token: String,
    pub brand: CardBrand,
    pub last4: String,
    pub exp_month: i32,
    pub exp_year: i32,
    /// The gateway's fingerprint of the card number (None when it gives none): the
    /// same card added twice has the same fingerprint.
    pub fingerprint: Option<String>,
}

/// A Customer to create at the gateway: one per account, created once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustomerRequest {
    pub account_id: uuid::Uuid,
    pub name: String,
    /// `customer:<account id>`: a repeat (a retry, two racing requests) gets the
    /// same Customer back.
    pub idempotency_key: String,
}

/// What a frontend needs to collect and authenticate a card with the gateway's own
/// form (a Stripe SetupIntent with `usage=off_session`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardSetup {
    pub setup_intent_id: String,
    /// Handed to Stripe.js (`confirmCardSetup`); it lets the browser confirm this one
    /// SetupIntent and nothing else.
    pub client_secret: String,
}

/// The only currency charged: one credit is one US dollar.
pub const CURRENCY: &str = "usd";

/// One charge. The gateway never charges twice for one idempotency key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeRequest {
    /// Whole cents, > 0.
    pub amount_cents: i64,
    /// Always [`CURRENCY`].
    pub currency: String,
    pub gateway_token: String,
    /// The account's Customer at the gateway; None for a card stored before
    /// Customers existed (it can be charged once).
    pub gateway_customer_id: Option<String>,
    pub idempotency_key: String,
    pub description: String,
}

impl ChargeRequest {
    /// The charge that captures a purchase: its price, on its card, with the purchase
    /// id as the idempotency key (so retries of one purchase never charge twice).
    pub fn for_purchase(
        purchase: &purchase_rows::Model,
        method: &payment_methods::Model,
        gateway_customer_id: Option<String>,
    ) -> Result<Self> {
        let amount_cents = Credits::from_nanos(purchase.price_nanos)
            .to_cents_exact()
            .filter(|c| *c > 0)
            .ok_or_else(|| {
                BillingError::Internal(format!(
                    "purchase {} has a price that is not a positive number of cents",
                    purchase.id
                ))
            })?;
        Ok(Self {
            amount_cents,
            currency: CURRENCY.to_owned(),
            gateway_token: method.gateway_token.clone(),
            gateway_customer_id,
            idempotency_key: purchase.id.to_string(),
            description: format!(
                "Reservoir credits: {} (purchase {})",
                Credits::from_nanos(purchase.amount_nanos),
                purchase.id
            ),
        })
    }
}

/// What became of a charge that the gateway processed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargeOutcome {
    Succeeded {
        charge_id: String,
    },
    /// Permanent: retrying the same card will not help.
    Declined {
        reason: String,
    },
    /// The bank asks the cardholder to authenticate (3-D Secure) and nobody is there
    /// (an off-session charge): not charged, and retrying will not help until the
    /// cardholder has authenticated the card.
    RequiresAction {
        /// The gateway's payment (PaymentIntent) when one was made.
        charge_id: Option<String>,
        reason: String,
    },
}

/// A gateway call that did not produce an outcome.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// Network trouble, timeouts, gateway errors: retry later (same idempotency key).
    #[error("payment gateway unavailable: {0}")]
    Transient(String),
    /// A bad token or request: permanent.
    #[error("payment gateway refused the request: {0}")]
    Invalid(String),
}

impl GatewayError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }
}

/// Invalid → INVALID_INPUT (the caller's token or card is unusable); Transient →
/// PAYMENT_FAILED (try again later).
impl From<GatewayError> for BillingError {
    fn from(e: GatewayError) -> Self {
        match e {
            GatewayError::Invalid(m) => Self::InvalidInput(format!("card refused: {m}")),
            GatewayError::Transient(m) => Self::PaymentFailed(m),
        }
    }
}

pub type GatewayResult<T> = std::result::Result<T, GatewayError>;

/// A verified webhook event of the gateway, translated into what it means here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayEvent {
    /// The gateway's event id (`evt_…`): each is acted on once.
    pub id: String,
    /// The gateway's event type (`payment_intent.succeeded`, …), kept for the record.
    pub kind: String,
    pub effect: EventEffect,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventEffect {
    /// A charge's outcome (`payment_intent.succeeded` / `payment_intent.payment_failed`),
    /// exactly as a synchronous answer would have given it.
    Charge {
        /// The charge's idempotency key (the purchase id), from the payment's metadata.
        idempotency_key: Option<String>,
        charge_id: String,
        outcome: ChargeOutcome,
    },
    /// The cardholder disputed a charge (`charge.dispute.created`).
    Dispute { charge_id: String, reason: String },
    /// An event type nothing here acts on (recorded, otherwise ignored).
    Ignored,
}

/// Why a webhook request was refused (answered 400; nothing written).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("webhooks are not configured for this gateway")]
    NotConfigured,
    #[error("bad webhook signature: {0}")]
    BadSignature(&'static str),
    #[error("unreadable webhook event: {0}")]
    Malformed(String),
}

impl From<WebhookError> for BillingError {
    fn from(e: WebhookError) -> Self {
        Self::InvalidInput(e.to_string())
    }
}
/// The boxed future of a gateway call (keeps the trait object-safe without a macro).
pub type GatewayFuture<'a, T> = Pin<Box<dyn Future<Output = GatewayResult<T>> + Send + 'a>>;

/// The payment gateway as the domain sees it. Implementations: [`SandboxGateway`]
/// here; real gateways live with the `gateways` crate's adapters. Used as `&dyn PaymentGateway`
/// or `Arc<dyn PaymentGateway>`.
pub trait PaymentGateway: Send + Sync {
    /// Creates the Customer of an account; the same idempotency key gives the same
    /// Customer. Returns its id.
    fn create_customer<'a>(&'a self, req: &'a CustomerRequest) -> GatewayFuture<'a, String>;
    /// Attaches a card collected by the gateway's form (a PaymentMethod id `pm_…`, or a
    /// legacy token `tok_…`) to the Customer, so it can be charged again and again.
    fn attach<'a>(
        &'a self,
        gateway_customer_id: &'a str,
        client_token: &'a str,
    ) -> GatewayFuture<'a, AttachedCard>;
    /// Detaches a stored card from its Customer (it can never be charged again).
    fn detach<'a>(&'a self, gateway_token: &'a str) -> GatewayFuture<'a, ()>;
    /// Starts collecting a card for later off-session charges (a SetupIntent).
    fn start_card_setup<'a>(&'a self, gateway_customer_id: &'a str)
    -> GatewayFuture<'a, CardSetup>;
    /// Charges a stored card. The same idempotency key never charges twice: a repeat
    /// returns the first outcome.
    fn charge(&self, req: ChargeRequest) -> GatewayFuture<'_, ChargeOutcome>;
    /// Verifies a webhook request (its signature header and the raw body) and reads
    /// the event. No I/O.
    fn verify_event(
        &self,
        payload: &[u8],
        signature: Option<&str>,
        now: DateTime<Utc>,
    ) -> std::result::Result<GatewayEvent, WebhookError>;
}
