//! Payments: the [`PaymentGateway`] port (the sandbox here; Stripe lives in
//! `gateways`), stored cards (`cards`), purchases and their invoices (`purchases`) and
//! the capture job's rules (`capture`).
//!
//! Card numbers never reach the server: the browser turns a card into a one-time
//! client token at the gateway, [`cards::add_payment_method`] exchanges it for a stored
//! card (the gateway's reference, brand, last four digits and expiry) and keeps only
//! that.

pub mod capture;
pub mod cards;
pub mod purchases;
mod sandbox;

use crate::error::{BillingError, Result};
use crate::money::Credits;
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
    pub idempotency_key: String,
    pub description: String,
}

impl ChargeRequest {
    /// The charge that captures a purchase: its price, on its card, with the purchase
    /// id as the idempotency key (so retries of one purchase never charge twice).
    pub fn for_purchase(
        purchase: &purchase_rows::Model,
        method: &payment_methods::Model,
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
/// The boxed future of a gateway call (keeps the trait object-safe without a macro).
pub type GatewayFuture<'a, T> = Pin<Box<dyn Future<Output = GatewayResult<T>> + Send + 'a>>;

/// The payment gateway as the domain sees it. Implementations: [`SandboxGateway`]
/// here; real gateways live with the `gateways` crate's adapters. Used as `&dyn PaymentGateway`
/// or `Arc<dyn PaymentGateway>`.
pub trait PaymentGateway: Send + Sync {
    /// Exchanges a one-time client token for a stored card.
    fn attach<'a>(&'a self, client_token: &'a str) -> GatewayFuture<'a, AttachedCard>;
    /// Charges a stored card. The same idempotency key never charges twice: a repeat
    /// returns the first outcome.
    fn charge(&self, req: ChargeRequest) -> GatewayFuture<'_, ChargeOutcome>;
}
