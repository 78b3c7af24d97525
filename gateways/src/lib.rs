//! Payment gateway adapters: real gateways behind [`billing::payments::PaymentGateway`].
//!
//! [`StripeGateway`] talks to the Stripe API (PaymentMethods and PaymentIntents) over
//! form-encoded HTTPS posts. The deterministic sandbox stays in
//! `billing::payments::SandboxGateway`.

pub mod stripe;

pub use stripe::{
    DEFAULT_BASE_URL, DEFAULT_TIMEOUT_MS, STRIPE_API_VERSION, StripeGateway, StripeSetupError,
};
