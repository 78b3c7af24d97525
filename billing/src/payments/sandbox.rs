//! The sandbox gateway: deterministic test cards by client token, charges kept in
//! memory. The embedded default and the tests use it; it never charges anyone.
//!
//! Each test card has a legacy token (`tok_visa`) and a Stripe-style PaymentMethod id
//! (`pm_card_visa`), so frontend code written for Stripe runs against the sandbox too.
//! Customers and SetupIntents are made up (nothing is stored); the sandbox has no
//! webhooks.

use super::*;
use entity::enums::CardBrand;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// How long a `tok_hang` charge stalls by default: longer than any job timeout.
pub const SANDBOX_HANG_DEFAULT: Duration = Duration::from_secs(120);
/// Expiry of every sandbox card (a fixed date in the future).
pub const SANDBOX_EXP_MONTH: i32 = 12;
pub const SANDBOX_EXP_YEAR: i32 = 2034;
const SANDBOX_TOKEN_PREFIX: &str = "pm_sandbox_";

/// The sandbox's deterministic test cards, by client token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SandboxScenario {
    /// `tok_visa`: VISA 4242, charges succeed.
    Visa,
    /// `tok_mastercard`: MASTERCARD 4444, charges succeed.
    Mastercard,
    /// `tok_amex`: AMEX 8431, charges succeed.
    Amex,
    /// `tok_chargeDeclined`: attaches; charges are declined `card_declined`.
    Declined,
    /// `tok_chargeDeclinedInsufficientFunds`: attaches; declined `insufficient_funds`.
    InsufficientFunds,
    /// `tok_processingError`: attaches; charges fail transiently.
    ProcessingError,
    /// `tok_hang`: attaches; a charge stalls (see [`SandboxGateway::with_hang`]), then
    /// fails transiently.
    Hang,
    /// `tok_authenticationRequired`: attaches; an off-session charge needs 3-D Secure
    /// (`RequiresAction`).
    AuthenticationRequired,
}

impl SandboxScenario {
    pub const ALL: [Self; 8] = [
        Self::Visa,
        Self::Mastercard,
        Self::Amex,
        Self::Declined,
        Self::InsufficientFunds,
        Self::ProcessingError,
        Self::Hang,
        Self::AuthenticationRequired,
    ];

    /// The client token that selects this scenario.
    pub const fn client_token(self) -> &'static str {
        match self {
            Self::Visa => "tok_visa",
            Self::Mastercard => "tok_mastercard",
            Self::Amex => "tok_amex",
            Self::Declined => "tok_chargeDeclined",
            Self::InsufficientFunds => "tok_chargeDeclinedInsufficientFunds",
            Self::ProcessingError => "tok_processingError",
            Self::Hang => "tok_hang",
            Self::AuthenticationRequired => "tok_authenticationRequired",
        }
    }

    /// The Stripe-style PaymentMethod id of this test card (`pm_card_<scenario>`).
    pub fn payment_method_id(self) -> String {
        format!("pm_card_{}", self.slug())
    }

    /// The scenario's name inside a gateway token (no underscore).
    const fn slug(self) -> &'static str {
        match self {
            Self::Visa => "visa",
            Self::Mastercard => "mastercard",
            Self::Amex => "amex",
            Self::Declined => "chargeDeclined",
            Self::InsufficientFunds => "chargeDeclinedInsufficientFunds",
            Self::ProcessingError => "processingError",
            Self::Hang => "hang",
            Self::AuthenticationRequired => "authenticationRequired",
        }
    }

    pub const fn card(self) -> (CardBrand, &'static str) {
        match self {
            Self::Visa => (CardBrand::Visa, "4242"),
            Self::Mastercard => (CardBrand::Mastercard, "4444"),
            Self::Amex => (CardBrand::Amex, "8431"),
            Self::Declined => (CardBrand::Visa, "0002"),
            Self::InsufficientFunds => (CardBrand::Visa, "9995"),
            Self::ProcessingError => (CardBrand::Visa, "0119"),
            Self::Hang => (CardBrand::Visa, "0077"),
            Self::AuthenticationRequired => (CardBrand::Visa, "3184"),
        }
    }

    /// The scenario of a legacy token (`tok_visa`) or a PaymentMethod id (`pm_card_visa`).
    pub fn from_client_token(token: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|s| s.client_token() == token || s.payment_method_id() == token)
    }

    /// The scenario a sandbox gateway token (`pm_sandbox_<scenario>_<random>`) encodes.
    pub fn from_gateway_token(token: &str) -> Option<Self> {
        let (slug, random) = token.strip_prefix(SANDBOX_TOKEN_PREFIX)?.rsplit_once('_')?;
        if random.is_empty() || !random.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Self::ALL.into_iter().find(|s| s.slug() == slug)
    }
}

/// A charge the sandbox processed (one per idempotency key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxCharge {
    pub idempotency_key: String,
    pub amount_cents: i64,
    pub currency: String,
    pub gateway_token: String,
    pub description: String,
    pub outcome: ChargeOutcome,
}

#[derive(Default)]
struct SandboxState {
    by_key: HashMap<String, usize>,
    charges: Vec<SandboxCharge>,
}

/// A deterministic in-memory gateway for development and tests. It honours
/// idempotency keys like a real gateway: the first processed outcome (success or
/// decline) of a key is kept and returned again for every repeat; a repeat with other
/// parameters is refused as Invalid. Transient failures are not kept, so a retry
/// gets another try.
pub struct SandboxGateway {
    hang: Duration,
    state: Mutex<SandboxState>,
    calls: AtomicU64,
}

impl Default for SandboxGateway {
    fn default() -> Self {
        Self::new()
    }
}

impl SandboxGateway {
    pub fn new() -> Self {
        Self::with_hang(SANDBOX_HANG_DEFAULT)
    }

    /// A sandbox whose `tok_hang` charges stall for `hang` before failing.
    pub fn with_hang(hang: Duration) -> Self {
        Self {
            hang,
            state: Mutex::new(SandboxState::default()),
            calls: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SandboxState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Charges processed (succeeded or declined); each idempotency key counts once.
    pub fn charge_count(&self) -> usize {
        self.state().charges.len()
    }

    /// The processed charges, oldest first.
    pub fn charges(&self) -> Vec<SandboxCharge> {
        self.state().charges.clone()
    }

    /// Every `charge` call, including repeats and transient failures.
    pub fn call_count(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn attach_now(client_token: &str) -> GatewayResult<AttachedCard> {
        let scenario = SandboxScenario::from_client_token(client_token)
            .ok_or_else(|| GatewayError::Invalid("no such token".into()))?;
        let (brand, last4) = scenario.card();
        Ok(AttachedCard {
            gateway_token: format!(
                "{SANDBOX_TOKEN_PREFIX}{}_{:016x}",
                scenario.slug(),
                rand::random::<u64>()
            ),
            brand,
            last4: last4.to_owned(),
            exp_month: SANDBOX_EXP_MONTH,
            exp_year: SANDBOX_EXP_YEAR,
            // No card numbers here, so no fingerprint: each token is a card of its own.
            fingerprint: None,
        })
    }

    async fn charge_now(&self, req: ChargeRequest) -> GatewayResult<ChargeOutcome> {
        self.calls.fetch_add(1, Ordering::Relaxed);
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
        let scenario = SandboxScenario::from_gateway_token(&req.gateway_token)
            .ok_or_else(|| GatewayError::Invalid("no such payment method".into()))?;
        let outcome = match scenario {
            SandboxScenario::Visa | SandboxScenario::Mastercard | SandboxScenario::Amex => {
                ChargeOutcome::Succeeded {
                    charge_id: format!("ch_sandbox_{:016x}", rand::random::<u64>()),
                }
            }
            SandboxScenario::Declined => ChargeOutcome::Declined {
                reason: "card_declined".into(),
            },
            SandboxScenario::InsufficientFunds => ChargeOutcome::Declined {
                reason: "insufficient_funds".into(),
            },
            SandboxScenario::ProcessingError => {
                return Err(GatewayError::Transient("processing_error".into()));
            }
            SandboxScenario::Hang => {
                tokio::time::sleep(self.hang).await;
                return Err(GatewayError::Transient("gateway timed out".into()));
            }
            SandboxScenario::AuthenticationRequired => ChargeOutcome::RequiresAction {
                charge_id: Some(format!("pi_sandbox_{:016x}", rand::random::<u64>())),
                reason: "authentication_required".into(),
            },
        };
        // Decide under the lock, so that concurrent repeats of a key see one outcome.
        let mut state = self.state();
        if let Some(&i) = state.by_key.get(&req.idempotency_key) {
            let first = &state.charges[i];
            let same = first.amount_cents == req.amount_cents
                && first.currency == req.currency
                && first.gateway_token == req.gateway_token;
            return if same {
                Ok(first.outcome.clone())
            } else {
                Err(GatewayError::Invalid(
                    "idempotency key reused with different parameters".into(),
                ))
            };
        }
        let index = state.charges.len();
        state.by_key.insert(req.idempotency_key.clone(), index);
        state.charges.push(SandboxCharge {
            idempotency_key: req.idempotency_key,
            amount_cents: req.amount_cents,
            currency: req.currency,
            gateway_token: req.gateway_token,
            description: req.description,
            outcome: outcome.clone(),
        });
        Ok(outcome)
    }
}

impl PaymentGateway for SandboxGateway {
    fn create_customer<'a>(&'a self, req: &'a CustomerRequest) -> GatewayFuture<'a, String> {
        // Derived from the account, so a repeat gives the same Customer.
        let id = format!("cus_sandbox_{}", req.account_id.simple());
        Box::pin(async move { Ok(id) })
    }

    fn attach<'a>(
        &'a self,
        _gateway_customer_id: &'a str,
        client_token: &'a str,
    ) -> GatewayFuture<'a, AttachedCard> {
        Box::pin(async move { Self::attach_now(client_token) })
    }

    fn detach<'a>(&'a self, _gateway_token: &'a str) -> GatewayFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn start_card_setup<'a>(
        &'a self,
        _gateway_customer_id: &'a str,
    ) -> GatewayFuture<'a, CardSetup> {
        let id = format!("seti_sandbox_{:016x}", rand::random::<u64>());
        let client_secret = format!("{id}_secret_{:016x}", rand::random::<u64>());
        Box::pin(async move {
            Ok(CardSetup {
                setup_intent_id: id,
                client_secret,
            })
        })
    }

    fn charge(&self, req: ChargeRequest) -> GatewayFuture<'_, ChargeOutcome> {
        Box::pin(self.charge_now(req))
    }

    fn verify_event(
        &self,
        _payload: &[u8],
        _signature: Option<&str>,
        _now: DateTime<Utc>,
    ) -> std::result::Result<GatewayEvent, WebhookError> {
        Err(WebhookError::NotConfigured)
    }
}
