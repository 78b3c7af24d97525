//! Cards: the [`PaymentGateway`] port (sandbox here; Stripe lives in the worker's
//! adapters), and the account's stored payment methods.
//!
//! Card numbers never reach the server: the browser turns a card into a one-time
//! client token at the gateway, [`add_payment_method`] exchanges it for a stored card
//! (the gateway's reference, brand, last four digits and expiry) and keeps only that.
//!
//! Lock order of the payment-method operations: the account row (a no-op UPDATE that
//! serialises default changes per account) → payment-method rows. Whoever points an
//! auto-reload at a card must take that card's row lock in its transaction
//! ([`lock_active_payment_method`]), so that a removal cannot slip in between.

use crate::db::begin_write;
use crate::error::{BillingError, Result};
use crate::ids::new_id;
use crate::money::Credits;
use chrono::{DateTime, Datelike, Utc};
use entity::enums::CardBrand;
use entity::{accounts, auto_reload_settings, payment_methods, purchases};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait,
    IntoActiveModel, PaginatorTrait, QueryFilter, QueryOrder,
};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use uuid::Uuid;

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
        purchase: &purchases::Model,
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

// --- the sandbox gateway -----------------------------------------------------------

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
}

impl SandboxScenario {
    pub const ALL: [Self; 7] = [
        Self::Visa,
        Self::Mastercard,
        Self::Amex,
        Self::Declined,
        Self::InsufficientFunds,
        Self::ProcessingError,
        Self::Hang,
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
        }
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
        }
    }

    pub fn from_client_token(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.client_token() == token)
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
    fn attach<'a>(&'a self, client_token: &'a str) -> GatewayFuture<'a, AttachedCard> {
        Box::pin(async move { Self::attach_now(client_token) })
    }

    fn charge(&self, req: ChargeRequest) -> GatewayFuture<'_, ChargeOutcome> {
        Box::pin(self.charge_now(req))
    }
}

// --- payment methods ---------------------------------------------------------------

/// Longest client token accepted from a caller.
pub const CLIENT_TOKEN_LEN_MAX: usize = 200;
/// Longest gateway token stored.
pub const GATEWAY_TOKEN_LEN_MAX: usize = 255;
/// Active payment methods per account.
pub const PAYMENT_METHODS_PER_ACCOUNT_MAX: u64 = 20;
/// Ids per query in the batched loaders.
const LOADER_CHUNK: usize = 500;

fn parse_client_token(token: &str) -> Result<&str> {
    if token.is_empty() || token.len() > CLIENT_TOKEN_LEN_MAX {
        return Err(BillingError::invalid(format!(
            "token must be 1 to {CLIENT_TOKEN_LEN_MAX} characters"
        )));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(BillingError::invalid(
            "token must be printable ASCII without spaces",
        ));
    }
    Ok(token)
}

/// Refuses what a gateway adapter should never return (it would break a CHECK).
fn check_attached(card: &AttachedCard) -> Result<()> {
    let ok = !card.gateway_token.is_empty()
        && card.gateway_token.len() <= GATEWAY_TOKEN_LEN_MAX
        && card.last4.len() == 4
        && card.last4.bytes().all(|b| b.is_ascii_digit())
        && (1..=12).contains(&card.exp_month)
        && (2000..=9999).contains(&card.exp_year);
    if ok {
        Ok(())
    } else {
        Err(BillingError::Internal(format!(
            "the payment gateway returned an unusable card: {:?} {} {}/{}",
            card.brand, card.last4, card.exp_month, card.exp_year
        )))
    }
}

/// True when the card's expiry month is over.
pub fn is_expired(method: &payment_methods::Model, now: DateTime<Utc>) -> bool {
    let (year, month) = (now.year(), i32::try_from(now.month()).unwrap_or(12));
    (method.exp_year, method.exp_month) < (year, month)
}

/// Takes the account row's lock (a no-op UPDATE) so that default changes of one
/// account are serialised on every backend. NOT_FOUND when there is no such account.
async fn lock_account<C: ConnectionTrait>(c: &C, account_id: Uuid) -> Result<()> {
    let locked = accounts::Entity::update_many()
        .col_expr(
            accounts::Column::InvoiceSequence,
            Expr::col(accounts::Column::InvoiceSequence),
        )
        .filter(accounts::Column::Id.eq(account_id))
        .exec(c)
        .await?;
    if locked.rows_affected == 0 {
        return Err(BillingError::NotFound("account"));
    }
    Ok(())
}

async fn active_count<C: ConnectionTrait>(c: &C, account_id: Uuid) -> Result<u64> {
    Ok(payment_methods::Entity::find()
        .filter(payment_methods::Column::AccountId.eq(account_id))
        .filter(payment_methods::Column::RemovedAt.is_null())
        .count(c)
        .await?)
}

fn too_many_methods() -> BillingError {
    BillingError::LimitExceeded(format!(
        "an account can keep at most {PAYMENT_METHODS_PER_ACCOUNT_MAX} payment methods"
    ))
}

/// Stores a card: the client token is exchanged at the gateway (outside any
/// transaction), then the method is written. It becomes the default when asked, or
/// when the account has no default yet (so the first card is the default); making it
/// the default clears the others in the same transaction.
///
/// Refusals: INVALID_INPUT (malformed token, or the gateway refuses it), PAYMENT_FAILED
/// (gateway unavailable: try again), NOT_FOUND (account), LIMIT_EXCEEDED (too many
/// cards). A refusal writes nothing.
pub async fn add_payment_method(
    db: &DatabaseConnection,
    gateway: &dyn PaymentGateway,
    account_id: Uuid,
    client_token: &str,
    make_default: bool,
    now: DateTime<Utc>,
) -> Result<payment_methods::Model> {
    let client_token = parse_client_token(client_token)?;
    accounts::Entity::find_by_id(account_id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("account"))?;
    if active_count(db, account_id).await? >= PAYMENT_METHODS_PER_ACCOUNT_MAX {
        return Err(too_many_methods());
    }
    let card = gateway.attach(client_token).await?;
    check_attached(&card)?;

    let tx = begin_write(db).await?;
    lock_account(&tx, account_id).await?;
    if active_count(&tx, account_id).await? >= PAYMENT_METHODS_PER_ACCOUNT_MAX {
        tx.rollback().await?;
        return Err(too_many_methods());
    }
    let has_default = payment_methods::Entity::find()
        .filter(payment_methods::Column::AccountId.eq(account_id))
        .filter(payment_methods::Column::RemovedAt.is_null())
        .filter(payment_methods::Column::IsDefault.eq(true))
        .count(&tx)
        .await?
        > 0;
    let is_default = make_default || !has_default;
    if is_default && has_default {
        clear_default(&tx, account_id).await?;
    }
    let method = payment_methods::Model {
        id: new_id(),
        account_id,
        gateway_token: card.gateway_token,
        brand: card.brand,
        last4: card.last4,
        exp_month: card.exp_month,
        exp_year: card.exp_year,
        is_default,
        created_at: now,
        removed_at: None,
    };
    payment_methods::Entity::insert(method.clone().into_active_model().reset_all())
        .exec_without_returning(&tx)
        .await?;
    tx.commit().await?;
    Ok(method)
}

async fn clear_default<C: ConnectionTrait>(c: &C, account_id: Uuid) -> Result<()> {
    payment_methods::Entity::update_many()
        .col_expr(payment_methods::Column::IsDefault, Expr::value(false))
        .filter(payment_methods::Column::AccountId.eq(account_id))
        .filter(payment_methods::Column::IsDefault.eq(true))
        .exec(c)
        .await?;
    Ok(())
}

/// Makes an active method its account's default (the others lose it), in one
/// transaction. NOT_FOUND when it does not exist or was removed.
pub async fn set_default_payment_method(
    db: &DatabaseConnection,
    id: Uuid,
    _now: DateTime<Utc>,
) -> Result<payment_methods::Model> {
    let method = load_payment_method(db, id)
        .await?
        .filter(|m| m.removed_at.is_none())
        .ok_or(BillingError::NotFound("payment method"))?;
    if method.is_default {
        return Ok(method);
    }
    let tx = begin_write(db).await?;
    lock_account(&tx, method.account_id).await?;
    clear_default(&tx, method.account_id).await?;
    let updated = payment_methods::Entity::update_many()
        .col_expr(payment_methods::Column::IsDefault, Expr::value(true))
        .filter(payment_methods::Column::Id.eq(id))
        .filter(payment_methods::Column::RemovedAt.is_null())
        .exec_with_returning(&tx)
        .await?
        .pop();
    let Some(updated) = updated else {
        tx.rollback().await?;
        return Err(BillingError::NotFound("payment method"));
    };
    tx.commit().await?;
    Ok(updated)
}

/// Removes a card (soft: `removed_at` is set, purchases keep pointing at it). A
/// default that is removed leaves the account without a default: no other card is
/// charged without being chosen. Refused with INVALID_INPUT while an enabled
/// auto-reload pays with it. Removing a removed method returns it unchanged.
pub async fn remove_payment_method(
    db: &DatabaseConnection,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<payment_methods::Model> {
    let method = load_payment_method(db, id)
        .await?
        .ok_or(BillingError::NotFound("payment method"))?;
    if method.removed_at.is_some() {
        return Ok(method);
    }
    let tx = begin_write(db).await?;
    lock_account(&tx, method.account_id).await?;
    // Take the method's row lock first: an auto-reload being pointed at it right now
    // holds that lock until it commits, and the check below then sees it.
    let locked = lock_active(&tx, None, id).await?;
    if locked.is_none() {
        tx.rollback().await?;
        return load_payment_method(db, id)
            .await?
            .ok_or(BillingError::NotFound("payment method"));
    }
    let reloads = auto_reload_settings::Entity::find()
        .filter(auto_reload_settings::Column::PaymentMethodId.eq(id))
        .filter(auto_reload_settings::Column::Enabled.eq(true))
        .count(&tx)
        .await?;
    if reloads > 0 {
        tx.rollback().await?;
        return Err(BillingError::invalid(
            "this card pays for an auto-reload; turn it off or give it another card first",
        ));
    }
    let removed = payment_methods::Entity::update_many()
        .col_expr(payment_methods::Column::RemovedAt, Expr::value(now))
        .col_expr(payment_methods::Column::IsDefault, Expr::value(false))
        .filter(payment_methods::Column::Id.eq(id))
        .exec_with_returning(&tx)
        .await?
        .pop()
        .ok_or(BillingError::NotFound("payment method"))?;
    tx.commit().await?;
    Ok(removed)
}

async fn lock_active<C: ConnectionTrait>(
    c: &C,
    account_id: Option<Uuid>,
    id: Uuid,
) -> Result<Option<payment_methods::Model>> {
    let mut update = payment_methods::Entity::update_many()
        .col_expr(
            payment_methods::Column::RemovedAt,
            Expr::col(payment_methods::Column::RemovedAt),
        )
        .filter(payment_methods::Column::Id.eq(id))
        .filter(payment_methods::Column::RemovedAt.is_null());
    if let Some(account_id) = account_id {
        update = update.filter(payment_methods::Column::AccountId.eq(account_id));
    }
    Ok(update.exec_with_returning(c).await?.pop())
}

/// For code that points something at a card inside its own transaction (auto-reload
/// settings): takes the method's row lock and checks that it is active and belongs to
/// the account, so a concurrent removal either waits for that transaction or has
/// already made this fail with NOT_FOUND.
pub async fn lock_active_payment_method<C: ConnectionTrait>(
    c: &C,
    account_id: Uuid,
    id: Uuid,
) -> Result<payment_methods::Model> {
    lock_active(c, Some(account_id), id)
        .await?
        .ok_or(BillingError::NotFound("payment method"))
}

/// One method, active or removed (None when there is no such id).
pub async fn load_payment_method<C: ConnectionTrait>(
    c: &C,
    id: Uuid,
) -> Result<Option<payment_methods::Model>> {
    Ok(payment_methods::Entity::find_by_id(id).one(c).await?)
}

/// The card a purchase will be charged to: the given one (it must belong to the
/// account and not be removed, else NOT_FOUND), or the account's default. INVALID_INPUT
/// when none is given and there is no default, or when the card has expired.
pub async fn resolve_payment_method<C: ConnectionTrait>(
    c: &C,
    account_id: Uuid,
    payment_method_id: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<payment_methods::Model> {
    let method = match payment_method_id {
        Some(id) => load_payment_method(c, id)
            .await?
            .filter(|m| m.account_id == account_id && m.removed_at.is_none())
            .ok_or(BillingError::NotFound("payment method"))?,
        None => {
            let active = payment_methods::Entity::find()
                .filter(payment_methods::Column::AccountId.eq(account_id))
                .filter(payment_methods::Column::RemovedAt.is_null())
                .order_by_desc(payment_methods::Column::IsDefault)
                .one(c)
                .await?;
            match active {
                Some(m) if m.is_default => m,
                Some(_) => {
                    return Err(BillingError::invalid(
                        "the account has no default payment method; choose one",
                    ));
                }
                None => return Err(BillingError::invalid("add a payment method first")),
            }
        }
    };
    if is_expired(&method, now) {
        return Err(BillingError::invalid(format!(
            "the card ending in {} has expired",
            method.last4
        )));
    }
    Ok(method)
}

/// Active payment methods per account, default first, then oldest first; every
/// requested account has an entry. One query per 500 accounts.
pub async fn list_payment_methods(
    db: &DatabaseConnection,
    account_ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<payment_methods::Model>>> {
    let mut out: HashMap<Uuid, Vec<payment_methods::Model>> =
        account_ids.iter().map(|id| (*id, Vec::new())).collect();
    for chunk in account_ids.chunks(LOADER_CHUNK) {
        let rows = payment_methods::Entity::find()
            .filter(payment_methods::Column::AccountId.is_in(chunk.iter().copied()))
            .filter(payment_methods::Column::RemovedAt.is_null())
            .order_by_desc(payment_methods::Column::IsDefault)
            .order_by_asc(payment_methods::Column::CreatedAt)
            .order_by_asc(payment_methods::Column::Id)
            .all(db)
            .await?;
        for row in rows {
            out.entry(row.account_id).or_default().push(row);
        }
    }
    Ok(out)
}

/// Payment methods by id, removed ones included (a purchase keeps its card). Ids
/// that do not exist are absent.
pub async fn payment_methods_by_ids(
    db: &DatabaseConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, payment_methods::Model>> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(LOADER_CHUNK) {
        let rows = payment_methods::Entity::find()
            .filter(payment_methods::Column::Id.is_in(chunk.iter().copied()))
            .all(db)
            .await?;
        out.extend(rows.into_iter().map(|m| (m.id, m)));
    }
    Ok(out)
}
