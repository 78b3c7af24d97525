//! The account's stored payment methods: the account's gateway Customer, card setup
//! (SetupIntent), add (attached to the Customer through the gateway), default, remove
//! (detached at the gateway), resolve.
//!
//! Lock order: the account row (a no-op UPDATE that serialises default changes per
//! account) → payment-method rows. Whoever points an auto-reload at a card must take
//! that card's row lock in its transaction ([`lock_active_payment_method`]), so that a
//! removal cannot slip in between.

use super::{AttachedCard, CardSetup, CustomerRequest, PaymentGateway};
use crate::db::begin_write;
use crate::error::{BillingError, Result};
use crate::ids::new_id;
use chrono::{DateTime, Datelike, Utc};
use entity::{accounts, auto_reload_settings, payment_methods};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait,
    IntoActiveModel, PaginatorTrait, QueryFilter, QueryOrder,
};
use std::collections::HashMap;
use uuid::Uuid;

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

/// Longest gateway Customer id stored.
pub const GATEWAY_CUSTOMER_ID_LEN_MAX: usize = 255;

/// The idempotency key of an account's Customer at the gateway.
pub fn customer_key(account_id: Uuid) -> String {
    format!("customer:{account_id}")
}

/// The account's Customer at the gateway, created the first time it is needed. The
/// creation has its own idempotency key (`customer:<account id>`), so racing requests
/// get one Customer; only the first stored id is kept (a conditional UPDATE), and that
/// is the one returned. NOT_FOUND when there is no such account; PAYMENT_FAILED when
/// the gateway is unavailable (try again).
pub async fn ensure_customer(
    db: &DatabaseConnection,
    gateway: &dyn PaymentGateway,
    account_id: Uuid,
) -> Result<String> {
    let account = accounts::Entity::find_by_id(account_id)
        .one(db)
        .await?
        .ok_or(BillingError::NotFound("account"))?;
    if let Some(id) = account.gateway_customer_id {
        return Ok(id);
    }
    let req = CustomerRequest {
        account_id,
        name: account.name,
        idempotency_key: customer_key(account_id),
    };
    let id = gateway.create_customer(&req).await?;
    if id.is_empty() || id.len() > GATEWAY_CUSTOMER_ID_LEN_MAX {
        return Err(BillingError::Internal(format!(
            "the payment gateway returned an unusable customer id {id:?}"
        )));
    }
    accounts::Entity::update_many()
        .col_expr(accounts::Column::GatewayCustomerId, Expr::value(id.clone()))
        .filter(accounts::Column::Id.eq(account_id))
        .filter(accounts::Column::GatewayCustomerId.is_null())
        .exec(db)
        .await?;
    accounts::Entity::find_by_id(account_id)
        .one(db)
        .await?
        .and_then(|a| a.gateway_customer_id)
        .ok_or(BillingError::NotFound("account"))
}

/// Starts collecting a card the way the gateway recommends for charging it later
/// without the cardholder (a SetupIntent, `usage=off_session`, on the account's
/// Customer): the frontend confirms it with the gateway's form (Stripe.js
/// `confirmCardSetup`), which authenticates the card once (3-D Secure), then hands the
/// resulting PaymentMethod id to [`add_payment_method`]. Writes nothing but the
/// account's Customer id.
pub async fn start_card_setup(
    db: &DatabaseConnection,
    gateway: &dyn PaymentGateway,
    account_id: Uuid,
) -> Result<CardSetup> {
    if active_count(db, account_id).await? >= PAYMENT_METHODS_PER_ACCOUNT_MAX {
        return Err(too_many_methods());
    }
    let customer = ensure_customer(db, gateway, account_id).await?;
    Ok(gateway.start_card_setup(&customer).await?)
}

/// Stores a card: the client token (a PaymentMethod id `pm_…`, or a legacy `tok_…`)
/// is attached to the account's Customer at the gateway (outside any transaction),
/// then the method is written. The same card added again (same fingerprint) is the
/// card already stored: it is returned (made the default if asked) and the new copy is
/// detached at the gateway. A new card becomes the default when asked, or when the
/// account has no default yet (so the first card is the default); making it the
/// default clears the others in the same transaction.
///
/// Refusals: INVALID_INPUT (malformed token, or the gateway refuses it, e.g. declined
/// when attached), PAYMENT_FAILED (gateway unavailable: try again), NOT_FOUND
/// (account), LIMIT_EXCEEDED (too many cards). A refusal writes nothing but the
/// account's Customer id.
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
    let customer = ensure_customer(db, gateway, account_id).await?;
    let card = gateway.attach(&customer, client_token).await?;
    check_attached(&card)?;
    let new_token = card.gateway_token.clone();
    let stored = match store_card(db, account_id, card, make_default, now).await {
        Ok(stored) => stored,
        Err(e) => {
            // Attached at the gateway but not stored here: take it back, unless a
            // stored card already is this very PaymentMethod.
            if !is_stored(db, &new_token).await? {
                detach_quietly(gateway, &new_token).await;
            }
            return Err(e);
        }
    };
    match stored {
        Stored::New(method) => Ok(method),
        Stored::Duplicate(existing) => {
            if existing.gateway_token != new_token {
                detach_quietly(gateway, &new_token).await;
            }
            if make_default && !existing.is_default {
                return set_default_payment_method(db, existing.id, now).await;
            }
            Ok(existing)
        }
    }
}

/// Whether an active stored card is this gateway PaymentMethod.
async fn is_stored(db: &DatabaseConnection, gateway_token: &str) -> Result<bool> {
    Ok(payment_methods::Entity::find()
        .filter(payment_methods::Column::GatewayToken.eq(gateway_token))
        .filter(payment_methods::Column::RemovedAt.is_null())
        .count(db)
        .await?
        > 0)
}

enum Stored {
    New(payment_methods::Model),
    /// An active card of the account has the same fingerprint: this one.
    Duplicate(payment_methods::Model),
}

/// Writes an attached card in one transaction (see [`add_payment_method`]).
async fn store_card(
    db: &DatabaseConnection,
    account_id: Uuid,
    card: AttachedCard,
    make_default: bool,
    now: DateTime<Utc>,
) -> Result<Stored> {
    let tx = begin_write(db).await?;
    lock_account(&tx, account_id).await?;
    if let Some(fingerprint) = &card.fingerprint {
        let existing = payment_methods::Entity::find()
            .filter(payment_methods::Column::AccountId.eq(account_id))
            .filter(payment_methods::Column::RemovedAt.is_null())
            .filter(payment_methods::Column::Fingerprint.eq(fingerprint.as_str()))
            .one(&tx)
            .await?;
        if let Some(existing) = existing {
            tx.rollback().await?;
            return Ok(Stored::Duplicate(existing));
        }
    }
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
        fingerprint: card.fingerprint,
    };
    payment_methods::Entity::insert(method.clone().into_active_model().reset_all())
        .exec_without_returning(&tx)
        .await?;
    tx.commit().await?;
    Ok(Stored::New(method))
}

/// Detaches a card at the gateway after it was removed here. A failure is only
/// logged: the card is never charged by Reservoir again either way, and Stripe lets a
/// detached card be detached again, so nothing is left inconsistent here.
async fn detach_quietly(gateway: &dyn PaymentGateway, gateway_token: &str) {
    if let Err(e) = gateway.detach(gateway_token).await {
        tracing::warn!(gateway_token, error = %e, "card not detached at the gateway");
    }
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

/// Removes a card (soft: `removed_at` is set, purchases keep pointing at it), then
/// detaches it from the Customer at the gateway. A default that is removed leaves the
/// account without a default: no other card is charged without being chosen. Refused
/// with INVALID_INPUT while an enabled auto-reload pays with it. Removing a removed
/// method returns it unchanged.
pub async fn remove_payment_method(
    db: &DatabaseConnection,
    gateway: &dyn PaymentGateway,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<payment_methods::Model> {
    let method = load_payment_method(db, id)
        .await?
        .ok_or(BillingError::NotFound("payment method"))?;
    if method.removed_at.is_some() {
        return Ok(method);
    }
    let removed = remove_stored(db, id, now).await?;
    detach_quietly(gateway, &removed.gateway_token).await;
    Ok(removed)
}

/// The removal's transaction (see [`remove_payment_method`]).
async fn remove_stored(
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

/// [`remove_payment_method`] for a caller, who must be OWNER/ADMIN of the card's
/// account. A card the caller cannot see is NOT_FOUND, exactly as an unknown one.
pub async fn remove_payment_method_as(
    db: &DatabaseConnection,
    gateway: &dyn PaymentGateway,
    principal: &crate::accounts::auth::Principal,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<payment_methods::Model> {
    use crate::accounts::access;
    let Some(card) = load_payment_method(db, id).await? else {
        return Err(BillingError::NotFound("payment method"));
    };
    let admin = access::require_account_admin(db, principal, card.account_id).await;
    access::hidden_as("payment method", admin)?;
    remove_payment_method(db, gateway, id, now).await
}
