//! Outbound webhooks: money events told to the platform's own servers, signed.
//!
//! - [`endpoints`]: what an account's admins register (URL, events, signing secret).
//! - [`outbox`]: events written as rows in the business transaction that causes them,
//!   with one delivery per subscribed endpoint, idempotent on the business event.
//! - [`delivery`]: the delivery state machine the worker drives (claim, outcome,
//!   retry schedule, DEAD) and the manual retry of a dead delivery.
//!
//! Delivery is at least once: a receiver deduplicates on the event id, which every
//! attempt of every delivery of an event carries unchanged. See docs/WEBHOOKS.md.

pub mod delivery;
pub mod endpoints;
pub mod events;
pub mod outbox;
pub mod signing;

use crate::error::{BillingError, Result};
use std::fmt;
use std::str::FromStr;

/// The kinds of event an endpoint can subscribe to. The names are the event's `type`
/// on the wire and are stored in `webhook_events.event_type` and
/// `webhook_endpoints.events`: never rename one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WebhookEventType {
    /// An alert threshold was crossed downwards.
    BalanceLow,
    /// A fired threshold re-armed: the balance rose back to or above it.
    BalanceRecovered,
    PurchaseSucceeded,
    PurchaseFailed,
    AutoReloadFailed,
    AutoReloadDisabled,
    InvoiceCreated,
    InvoicePaid,
}

impl WebhookEventType {
    pub const ALL: [Self; 8] = [
        Self::BalanceLow,
        Self::BalanceRecovered,
        Self::PurchaseSucceeded,
        Self::PurchaseFailed,
        Self::AutoReloadFailed,
        Self::AutoReloadDisabled,
        Self::InvoiceCreated,
        Self::InvoicePaid,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BalanceLow => "balance.low",
            Self::BalanceRecovered => "balance.recovered",
            Self::PurchaseSucceeded => "purchase.succeeded",
            Self::PurchaseFailed => "purchase.failed",
            Self::AutoReloadFailed => "auto_reload.failed",
            Self::AutoReloadDisabled => "auto_reload.disabled",
            Self::InvoiceCreated => "invoice.created",
            Self::InvoicePaid => "invoice.paid",
        }
    }
}

impl fmt::Display for WebhookEventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WebhookEventType {
    type Err = BillingError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| BillingError::invalid(format!("unknown webhook event type {s:?}")))
    }
}
