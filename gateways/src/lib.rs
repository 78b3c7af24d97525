#![doc = include_str!("../README.md")]

pub mod stripe;
pub mod stripe_webhook;

pub use stripe::{
    DEFAULT_BASE_URL, DEFAULT_TIMEOUT_MS, STRIPE_API_VERSION, StripeGateway, StripeSetupError,
};
