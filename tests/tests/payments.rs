//! Cards, the sandbox gateway, purchases by card and by invoice, invoices (SQLite by
//! default, PostgreSQL with TEST_DATABASE_URL).
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::entity::enums::{
    AutoReloadStatus, CardBrand, InvoiceStatus, LedgerEntryKind, PurchaseSource, PurchaseStatus,
};
use billing::entity::{accounts, auto_reload_settings, invoices, ledger_entries, payment_methods};
use billing::payments::purchases::{self, PurchaseCreditsRequest, PurchaseItem, Purchased};
use billing::payments::{
    self, AttachedCard, CardSetup, ChargeOutcome, ChargeRequest, CustomerRequest, GatewayError,
    GatewayEvent, GatewayFuture, PaymentGateway, SandboxGateway, SandboxScenario, WebhookError,
};
use billing::sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait,
    IntoActiveModel, QueryFilter, QueryOrder,
};
use billing::{BillingError, Credits, ErrorCode};
use chrono::{DateTime, Duration, SubsecRound, Utc};
use reservoir_tests::{Fixture, TestDb, count, money_row_counts, workspace};
use std::time::{Duration as StdDuration, Instant};
use uuid::Uuid;

const CREDIT: i64 = 1_000_000_000;

fn charge_req(token: &str, key: &str, cents: i64) -> ChargeRequest {
    ChargeRequest {
        amount_cents: cents,
        currency: "usd".into(),
        gateway_token: token.into(),
        gateway_customer_id: None,
        idempotency_key: key.into(),
        description: "test".into(),
    }
}

fn card_req(workspace_id: Uuid, key: &str, pm: Option<Uuid>) -> PurchaseCreditsRequest {
    PurchaseCreditsRequest {
        workspace_id,
        item: PurchaseItem::Package("pkg_100".into()),
        payment_method_id: pm,
        pay_by_invoice: false,
        idempotency_key: key.into(),
        created_by_user_id: None,
    }
}

fn invoice_req(workspace_id: Uuid, key: &str, item: PurchaseItem) -> PurchaseCreditsRequest {
    PurchaseCreditsRequest {
        workspace_id,
        item,
        payment_method_id: None,
        pay_by_invoice: true,
        idempotency_key: key.into(),
        created_by_user_id: None,
    }
}

async fn set_verified(db: &DatabaseConnection, account_id: Uuid) -> anyhow::Result<()> {
    let account = accounts::Entity::find_by_id(account_id)
        .one(db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no account"))?;
    let mut active = account.into_active_model();
    active.verified = Set(true);
    active.update(db).await?;
    Ok(())
}

async fn invoice(db: &DatabaseConnection, p: &Purchased) -> anyhow::Result<invoices::Model> {
    let id = p
        .purchase
        .invoice_id
        .ok_or_else(|| anyhow::anyhow!("purchase has no invoice"))?;
    Ok(purchases::load_invoice(db, id).await?)
}

/// Row counts of everything a purchase or a card could write.
async fn payment_row_counts(db: &DatabaseConnection) -> anyhow::Result<Vec<(String, i64)>> {
    let mut counts = money_row_counts(db).await?;
    for table in ["purchases", "invoices", "invoice_lines", "payment_methods"] {
        counts.push((table.to_owned(), count(db, table).await?));
    }
    Ok(counts)
}

/// A gateway whose attach always fails transiently (and proves the trait is object-safe).
struct DownGateway;

impl PaymentGateway for DownGateway {
    fn create_customer<'a>(&'a self, _req: &'a CustomerRequest) -> GatewayFuture<'a, String> {
        Box::pin(async { Ok("cus_down".into()) })
    }
    fn attach<'a>(
        &'a self,
        _gateway_customer_id: &'a str,
        _client_token: &'a str,
    ) -> GatewayFuture<'a, AttachedCard> {
        Box::pin(async { Err(GatewayError::Transient("connection reset".into())) })
    }
    fn detach<'a>(&'a self, _gateway_token: &'a str) -> GatewayFuture<'a, ()> {
        Box::pin(async { Err(GatewayError::Transient("connection reset".into())) })
    }
    fn start_card_setup<'a>(&'a self, _customer: &'a str) -> GatewayFuture<'a, CardSetup> {
        Box::pin(async { Err(GatewayError::Transient("connection reset".into())) })
    }
    fn charge(&self, _req: ChargeRequest) -> GatewayFuture<'_, ChargeOutcome> {
        Box::pin(async { Err(GatewayError::Transient("connection reset".into())) })
    }
    fn verify_event(
        &self,
        _payload: &[u8],
        _signature: Option<&str>,
        _now: DateTime<Utc>,
    ) -> Result<GatewayEvent, WebhookError> {
        Err(WebhookError::NotConfigured)
    }
}

#[tokio::test]
async fn sandbox_tokens_are_deterministic_and_charges_idempotent() -> anyhow::Result<()> {
    let gw = SandboxGateway::with_hang(StdDuration::from_millis(50));
    let gateway: &dyn PaymentGateway = &gw;
    let expected = [
        ("tok_visa", CardBrand::Visa, "4242"),
        ("tok_mastercard", CardBrand::Mastercard, "4444"),
        ("tok_amex", CardBrand::Amex, "8431"),
    ];
    for (token, brand, last4) in expected {
        let card = gateway.attach("cus_test", token).await?;
        assert_eq!((card.brand, card.last4.as_str()), (brand, last4), "{token}");
        assert!(card.gateway_token.starts_with("pm_sandbox_"), "{card:?}");
        assert!(card.exp_year >= 2030 && (1..=12).contains(&card.exp_month));
        let outcome = gateway
            .charge(charge_req(
                &card.gateway_token,
                &format!("k-{token}"),
                1_000,
            ))
            .await?;
        assert!(
            matches!(&outcome, ChargeOutcome::Succeeded { charge_id } if charge_id.starts_with("ch_")),
            "{token}: {outcome:?}"
        );
    }
    // Two attachments of one token are two cards.
    let a = gateway.attach("cus_test", "tok_visa").await?;
    let b = gateway.attach("cus_test", "tok_visa").await?;
    assert_ne!(a.gateway_token, b.gateway_token);

    for (token, reason) in [
        ("tok_chargeDeclined", "card_declined"),
        ("tok_chargeDeclinedInsufficientFunds", "insufficient_funds"),
    ] {
        let card = gateway.attach("cus_test", token).await?;
        let outcome = gateway
            .charge(charge_req(&card.gateway_token, &format!("k-{token}"), 500))
            .await?;
        assert_eq!(
            outcome,
            ChargeOutcome::Declined {
                reason: reason.into()
            }
        );
    }
    let failing = gateway.attach("cus_test", "tok_processingError").await?;
    let err = gateway
        .charge(charge_req(&failing.gateway_token, "k-err", 500))
        .await
        .expect_err("processing error");
    assert!(err.is_transient(), "{err:?}");
    // Transient failures are not remembered: a retry tries again (and fails again).
    let again = gateway
        .charge(charge_req(&failing.gateway_token, "k-err", 500))
        .await;
    assert!(matches!(again, Err(GatewayError::Transient(_))));

    let hang = gateway.attach("cus_test", "tok_hang").await?;
    let started = Instant::now();
    let err = gateway
        .charge(charge_req(&hang.gateway_token, "k-hang", 500))
        .await
        .expect_err("hang");
    assert!(err.is_transient());
    assert!(started.elapsed() >= StdDuration::from_millis(50));
    // The default stall outlasts any job timeout.
    let default_gw = SandboxGateway::new();
    let stalled = tokio::time::timeout(
        StdDuration::from_millis(100),
        default_gw.charge(charge_req(&hang.gateway_token, "k-hang-2", 500)),
    )
    .await;
    assert!(stalled.is_err(), "a tok_hang charge must stall");

    // Unknown tokens: refused at attach; a charge to an unknown card is Invalid.
    for bad in ["tok_unknown", "", "pm_sandbox_visa_0123"] {
        assert!(matches!(
            gateway.attach("cus_test", bad).await,
            Err(GatewayError::Invalid(_))
        ));
    }
    assert!(matches!(
        gateway.charge(charge_req("pm_other_x", "k-x", 500)).await,
        Err(GatewayError::Invalid(_))
    ));
    assert!(matches!(
        gateway
            .charge(charge_req(&a.gateway_token, "k-zero", 0))
            .await,
        Err(GatewayError::Invalid(_))
    ));

    // Idempotency: same key, same outcome, one charge; another payload is refused.
    let before = gw.charge_count();
    let first = gateway
        .charge(charge_req(&a.gateway_token, "idem-1", 2_500))
        .await?;
    let second = gateway
        .charge(charge_req(&a.gateway_token, "idem-1", 2_500))
        .await?;
    assert_eq!(first, second);
    assert_eq!(gw.charge_count(), before + 1);
    assert!(matches!(
        gateway
            .charge(charge_req(&a.gateway_token, "idem-1", 2_600))
            .await,
        Err(GatewayError::Invalid(_))
    ));
    assert_eq!(gw.charge_count(), before + 1);
    let recorded = gw.charges();
    let last = recorded.last().expect("a charge");
    assert_eq!(
        (last.idempotency_key.as_str(), last.amount_cents),
        ("idem-1", 2_500)
    );
    // Concurrent repeats of one key charge once.
    let futures: Vec<_> = (0..8)
        .map(|_| gateway.charge(charge_req(&b.gateway_token, "idem-2", 100)))
        .collect();
    let outcomes = futures::future::try_join_all(futures).await?;
    assert!(outcomes.iter().all(|o| *o == outcomes[0]));
    assert_eq!(gw.charge_count(), before + 2);
    assert!(gw.call_count() >= 10);
    assert_eq!(
        SandboxScenario::from_gateway_token(&b.gateway_token),
        Some(SandboxScenario::Visa)
    );
    Ok(())
}

#[tokio::test]
async fn payment_methods_add_default_and_remove() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now().trunc_subsecs(3);
    let f = Fixture::new(&t.db, now).await?;
    let gw = SandboxGateway::new();
    let acct = f.account_id;

    let visa =
        payments::cards::add_payment_method(&t.db, &gw, acct, "tok_visa", false, now).await?;
    assert!(visa.is_default, "the first card becomes the default");
    assert_eq!((visa.brand, visa.last4.as_str()), (CardBrand::Visa, "4242"));
    let mc =
        payments::cards::add_payment_method(&t.db, &gw, acct, "tok_mastercard", false, now).await?;
    assert!(!mc.is_default);
    let amex = payments::cards::add_payment_method(&t.db, &gw, acct, "tok_amex", true, now).await?;
    assert!(amex.is_default);
    let listed = payments::cards::list_payment_methods(&t.db, &[acct]).await?;
    let ids: Vec<_> = listed[&acct].iter().map(|m| (m.id, m.is_default)).collect();
    assert_eq!(
        ids,
        vec![(amex.id, true), (visa.id, false), (mc.id, false)],
        "one default, listed first"
    );

    // Refusals write nothing.
    let before = payment_row_counts(&t.db).await?;
    let too_long = "t".repeat(payments::cards::CLIENT_TOKEN_LEN_MAX + 1);
    for bad in ["tok_nope", "", "tok visa", too_long.as_str()] {
        let err = payments::cards::add_payment_method(&t.db, &gw, acct, bad, false, now)
            .await
            .expect_err(bad);
        assert_eq!(err.code(), ErrorCode::InvalidInput, "{bad}: {err}");
    }
    let err =
        payments::cards::add_payment_method(&t.db, &DownGateway, acct, "tok_visa", false, now)
            .await
            .expect_err("gateway down");
    assert_eq!(err.code(), ErrorCode::PaymentFailed, "{err}");
    let err =
        payments::cards::add_payment_method(&t.db, &gw, Uuid::now_v7(), "tok_visa", false, now)
            .await
            .expect_err("no account");
    assert_eq!(err.code(), ErrorCode::NotFound);
    assert_eq!(payment_row_counts(&t.db).await?, before);

    // Switching the default.
    let visa2 = payments::cards::set_default_payment_method(&t.db, visa.id, now).await?;
    assert!(visa2.is_default);
    let defaults = payment_methods::Entity::find()
        .filter(payment_methods::Column::AccountId.eq(acct))
        .filter(payment_methods::Column::IsDefault.eq(true))
        .all(&t.db)
        .await?;
    assert_eq!(defaults.len(), 1);
    assert_eq!(defaults[0].id, visa.id);

    // Removing the default leaves no default.
    let removed = payments::cards::remove_payment_method(
        &t.db,
        &billing::payments::SandboxGateway::new(),
        visa.id,
        now,
    )
    .await?;
    assert!(removed.removed_at.is_some() && !removed.is_default);
    let again = payments::cards::remove_payment_method(
        &t.db,
        &billing::payments::SandboxGateway::new(),
        visa.id,
        now,
    )
    .await?;
    assert_eq!(
        again.removed_at, removed.removed_at,
        "removal is idempotent"
    );
    let listed = payments::cards::list_payment_methods(&t.db, &[acct]).await?;
    assert_eq!(listed[&acct].len(), 2);
    assert!(listed[&acct].iter().all(|m| !m.is_default));
    let err = purchases::purchase_credits(&t.db, card_req(f.ws_a, "no-default", None), now)
        .await
        .expect_err("no default");
    assert_eq!(err.code(), ErrorCode::InvalidInput);
    assert_eq!(
        payments::cards::set_default_payment_method(&t.db, visa.id, now)
            .await
            .expect_err("removed")
            .code(),
        ErrorCode::NotFound
    );

    // A card paying for an enabled auto-reload cannot be removed.
    auto_reload_settings::ActiveModel {
        workspace_id: Set(f.ws_a),
        enabled: Set(true),
        threshold_nanos: Set(10 * CREDIT),
        amount_nanos: Set(50 * CREDIT),
        payment_method_id: Set(Some(mc.id)),
        max_reloads_per_day: Set(3),
        status: Set(AutoReloadStatus::Idle),
        consecutive_failures: Set(0),
        last_reload_at: Set(None),
        last_failure_reason: Set(None),
        next_attempt_at: Set(None),
        updated_at: Set(now),
    }
    .insert(&t.db)
    .await?;
    let err = payments::cards::remove_payment_method(
        &t.db,
        &billing::payments::SandboxGateway::new(),
        mc.id,
        now,
    )
    .await
    .expect_err("used by auto-reload");
    assert_eq!(err.code(), ErrorCode::InvalidInput, "{err}");
    let still = payments::cards::load_payment_method(&t.db, mc.id)
        .await?
        .expect("card");
    assert!(still.removed_at.is_none());
    let settings = auto_reload_settings::Entity::find_by_id(f.ws_a)
        .one(&t.db)
        .await?
        .expect("settings");
    let mut off = settings.into_active_model();
    off.enabled = Set(false);
    off.update(&t.db).await?;
    payments::cards::remove_payment_method(
        &t.db,
        &billing::payments::SandboxGateway::new(),
        mc.id,
        now,
    )
    .await?;

    // A new card on an account without a default becomes the default.
    let mc2 =
        payments::cards::add_payment_method(&t.db, &gw, acct, "tok_mastercard", false, now).await?;
    assert!(mc2.is_default);
    let listed = payments::cards::list_payment_methods(&t.db, &[acct, Uuid::nil()]).await?;
    assert_eq!(
        listed[&acct].iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![mc2.id, amex.id]
    );
    assert!(listed[&Uuid::nil()].is_empty());
    let by_id = payments::cards::payment_methods_by_ids(&t.db, &[visa.id, mc2.id]).await?;
    assert_eq!(by_id.len(), 2, "removed cards are still loadable by id");
    assert_eq!(
        payments::cards::remove_payment_method(
            &t.db,
            &billing::payments::SandboxGateway::new(),
            Uuid::now_v7(),
            now
        )
        .await
        .expect_err("unknown")
        .code(),
        ErrorCode::NotFound
    );
    t.finish().await
}

#[tokio::test]
async fn a_card_purchase_resolves_the_default_method() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now().trunc_subsecs(3);
    let f = Fixture::new(&t.db, now).await?;
    let gw = SandboxGateway::new();
    let other =
        billing::accounts::create_account(&t.db, "Other Co", "other@test.example", "O", now)
            .await?;
    let foreign =
        payments::cards::add_payment_method(&t.db, &gw, other.account.id, "tok_visa", false, now)
            .await?;

    // No card at all.
    let before = payment_row_counts(&t.db).await?;
    let err = purchases::purchase_credits(&t.db, card_req(f.ws_a, "buy-0", None), now)
        .await
        .expect_err("no card");
    assert_eq!(err.code(), ErrorCode::InvalidInput);
    assert!(
        err.to_string().contains("add a payment method first"),
        "{err}"
    );
    // Another account's card is not found.
    let err = purchases::purchase_credits(&t.db, card_req(f.ws_a, "buy-0", Some(foreign.id)), now)
        .await
        .expect_err("foreign card");
    assert_eq!(err.code(), ErrorCode::NotFound);
    let err =
        purchases::purchase_credits(&t.db, card_req(f.ws_a, "buy-0", Some(Uuid::now_v7())), now)
            .await
            .expect_err("unknown card");
    assert_eq!(err.code(), ErrorCode::NotFound);
    assert_eq!(payment_row_counts(&t.db).await?, before);

    let visa =
        payments::cards::add_payment_method(&t.db, &gw, f.account_id, "tok_visa", false, now)
            .await?;
    let mc =
        payments::cards::add_payment_method(&t.db, &gw, f.account_id, "tok_mastercard", false, now)
            .await?;
    let p = purchases::purchase_credits(&t.db, card_req(f.ws_a, "buy-1", None), now).await?;
    assert!(!p.replayed);
    assert_eq!(p.purchase.status, PurchaseStatus::Pending);
    assert_eq!(p.purchase.source, PurchaseSource::Manual);
    assert_eq!(p.purchase.payment_method_id, Some(visa.id));
    assert_eq!(p.purchase.price_nanos, 100 * CREDIT);
    assert_eq!(p.purchase.bonus_nanos, 15 * CREDIT);
    assert_eq!(
        workspace(&t.db, f.ws_a).await?.balance_nanos,
        0,
        "PENDING credits nothing"
    );

    // A replay stays a replay after the default changes.
    payments::cards::set_default_payment_method(&t.db, mc.id, now).await?;
    let replay = purchases::purchase_credits(&t.db, card_req(f.ws_a, "buy-1", None), now).await?;
    assert!(replay.replayed);
    assert_eq!(replay.purchase.id, p.purchase.id);
    let replay =
        purchases::purchase_credits(&t.db, card_req(f.ws_a, "buy-1", Some(visa.id)), now).await?;
    assert!(replay.replayed);
    for conflicting in [
        card_req(f.ws_a, "buy-1", Some(mc.id)),
        PurchaseCreditsRequest {
            item: PurchaseItem::Package("pkg_50".into()),
            ..card_req(f.ws_a, "buy-1", None)
        },
        invoice_req(f.ws_a, "buy-1", PurchaseItem::Package("pkg_100".into())),
    ] {
        let err = purchases::purchase_credits(&t.db, conflicting, now)
            .await
            .expect_err("conflict");
        assert!(matches!(err, BillingError::IdempotencyConflict), "{err}");
    }
    // The new default is used for new purchases; an explicit card wins.
    let p2 = purchases::purchase_credits(&t.db, card_req(f.ws_b, "buy-2", None), now).await?;
    assert_eq!(p2.purchase.payment_method_id, Some(mc.id));
    let p3 = purchases::purchase_credits(
        &t.db,
        PurchaseCreditsRequest {
            item: PurchaseItem::Amount(Credits::parse("12.34")?),
            ..card_req(f.ws_b, "buy-3", Some(visa.id))
        },
        now,
    )
    .await?;
    assert_eq!(p3.purchase.payment_method_id, Some(visa.id));
    assert_eq!(p3.purchase.price_nanos, 12_340_000_000);
    // A removed card is not found.
    payments::cards::remove_payment_method(
        &t.db,
        &billing::payments::SandboxGateway::new(),
        visa.id,
        now,
    )
    .await?;
    let err = purchases::purchase_credits(&t.db, card_req(f.ws_b, "buy-4", Some(visa.id)), now)
        .await
        .expect_err("removed card");
    assert_eq!(err.code(), ErrorCode::NotFound);
    t.finish().await
}

#[tokio::test]
async fn a_captured_card_purchase_is_credited_and_invoiced_once() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now().trunc_subsecs(3);
    let f = Fixture::new(&t.db, now).await?;
    let gw = SandboxGateway::new();
    let visa =
        payments::cards::add_payment_method(&t.db, &gw, f.account_id, "tok_visa", false, now)
            .await?;
    let p = purchases::purchase_credits(&t.db, card_req(f.ws_a, "buy-1", None), now).await?;

    // The worker's capture: charge with the purchase id as the key (twice: once).
    let charge = ChargeRequest::for_purchase(&p.purchase, &visa, None)?;
    assert_eq!(charge.amount_cents, 10_000);
    assert_eq!(charge.idempotency_key, p.purchase.id.to_string());
    let first = gw.charge(charge.clone()).await?;
    let second = gw.charge(charge).await?;
    assert_eq!(first, second);
    assert_eq!(gw.charge_count(), 1);
    let ChargeOutcome::Succeeded { charge_id } = first else {
        panic!("declined: {first:?}");
    };
    let later = now + Duration::seconds(5);
    let (a, b) = tokio::join!(
        purchases::capture_succeeded(&t.db, p.purchase.id, &charge_id, later),
        purchases::capture_succeeded(&t.db, p.purchase.id, &charge_id, later)
    );
    let (a, b) = (a?, b?);
    let c = purchases::capture_succeeded(&t.db, p.purchase.id, &charge_id, later).await?;
    for got in [&a, &b, &c] {
        assert_eq!(got.status, PurchaseStatus::Succeeded);
        assert_eq!(got.gateway_charge_id.as_deref(), Some(charge_id.as_str()));
        assert!(got.invoice_id.is_some());
    }
    assert_eq!(a.invoice_id, c.invoice_id);
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 115 * CREDIT);
    assert_eq!(count(&t.db, "invoices").await?, 1);
    assert_eq!(count(&t.db, "ledger_transactions").await?, 1);
    let invoice = purchases::load_invoice(&t.db, c.invoice_id.expect("invoice")).await?;
    assert_eq!(invoice.status, InvoiceStatus::Paid);
    assert_eq!(invoice.number, "INV-000001");
    assert_eq!(invoice.total_nanos, 100 * CREDIT);
    assert_eq!(invoice.purchase_id, Some(p.purchase.id));
    assert!(invoice.due_at.is_none());
    assert!(invoice.paid_at.is_some());
    let lines = purchases::invoice_lines_by_invoice(&t.db, &[invoice.id]).await?;
    let lines: Vec<_> = lines[&invoice.id]
        .iter()
        .map(|l| (l.position, l.amount_nanos))
        .collect();
    assert_eq!(lines, vec![(1, 100 * CREDIT), (2, 0)]);
    // Card money is posted against card_payments.
    let system: Vec<_> = ledger_entries::Entity::find()
        .filter(ledger_entries::Column::SystemAccount.is_not_null())
        .order_by_asc(ledger_entries::Column::Id)
        .all(&t.db)
        .await?
        .into_iter()
        .map(|e| (e.system_account.unwrap_or_default(), e.amount_nanos))
        .collect();
    assert_eq!(
        system,
        vec![
            ("card_payments".to_owned(), -100 * CREDIT),
            ("promotions".to_owned(), -15 * CREDIT)
        ]
    );

    // A failed purchase cannot be captured; an unknown one is not found.
    let declined = purchases::purchase_credits(&t.db, card_req(f.ws_a, "buy-2", None), now).await?;
    purchases::fail_purchase(&t.db, declined.purchase.id, "card_declined", now).await?;
    let err = purchases::capture_succeeded(&t.db, declined.purchase.id, "ch_x", now)
        .await
        .expect_err("failed purchase");
    assert_eq!(err.code(), ErrorCode::InvalidInput);
    let err = purchases::capture_succeeded(&t.db, Uuid::now_v7(), "ch_x", now)
        .await
        .expect_err("unknown purchase");
    assert_eq!(err.code(), ErrorCode::NotFound);
    assert_eq!(count(&t.db, "invoices").await?, 1);
    t.finish().await
}

#[tokio::test]
async fn paying_by_invoice_needs_a_verified_account_and_credits_at_once() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now().trunc_subsecs(3);
    let f = Fixture::new(&t.db, now).await?;
    let pkg = || PurchaseItem::Package("pkg_100".into());

    let before = payment_row_counts(&t.db).await?;
    let err = purchases::purchase_credits(&t.db, invoice_req(f.ws_a, "inv-1", pkg()), now)
        .await
        .expect_err("unverified");
    assert_eq!(err.code(), ErrorCode::Forbidden);
    assert!(err.to_string().contains("verified"), "{err}");
    let err = purchases::purchase_credits(
        &t.db,
        PurchaseCreditsRequest {
            payment_method_id: Some(Uuid::now_v7()),
            ..invoice_req(f.ws_a, "inv-1", pkg())
        },
        now,
    )
    .await
    .expect_err("both");
    assert_eq!(err.code(), ErrorCode::InvalidInput);
    assert_eq!(payment_row_counts(&t.db).await?, before);

    set_verified(&t.db, f.account_id).await?;
    let p1 = purchases::purchase_credits(&t.db, invoice_req(f.ws_a, "inv-1", pkg()), now).await?;
    assert!(!p1.replayed);
    assert_eq!(p1.purchase.status, PurchaseStatus::Succeeded);
    assert_eq!(p1.purchase.source, PurchaseSource::Invoice);
    assert_eq!(p1.purchase.completed_at, Some(now));
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 115 * CREDIT);
    let inv1 = invoice(&t.db, &p1).await?;
    assert_eq!(inv1.number, "INV-000001");
    assert_eq!(inv1.sequence, 1);
    assert_eq!(inv1.status, InvoiceStatus::Open);
    assert_eq!(inv1.total_nanos, 100 * CREDIT);
    assert_eq!(inv1.account_id, f.account_id);
    assert_eq!(inv1.purchase_id, Some(p1.purchase.id));
    assert_eq!(inv1.issued_at, now);
    assert_eq!(inv1.due_at, Some(now + Duration::days(30)));
    assert!(inv1.paid_at.is_none());
    let lines = purchases::invoice_lines_by_invoice(&t.db, &[inv1.id]).await?;
    let lines: Vec<_> = lines[&inv1.id]
        .iter()
        .map(|l| (l.position, l.description.clone(), l.amount_nanos))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!((lines[0].0, lines[0].2), (1, 100 * CREDIT));
    assert_eq!((lines[1].0, lines[1].2), (2, 0));
    assert!(lines[1].1.starts_with("Bonus credits (free)"), "{lines:?}");
    // Posted against invoice receivables (and promotions for the bonus).
    let entries: Vec<_> = ledger_entries::Entity::find()
        .order_by_asc(ledger_entries::Column::Id)
        .all(&t.db)
        .await?
        .into_iter()
        .map(|e| (e.kind, e.system_account, e.amount_nanos))
        .collect();
    assert_eq!(
        entries,
        vec![
            (LedgerEntryKind::Purchase, None, 100 * CREDIT),
            (
                LedgerEntryKind::Purchase,
                Some("invoice_receivables".into()),
                -100 * CREDIT
            ),
            (LedgerEntryKind::Bonus, None, 15 * CREDIT),
            (
                LedgerEntryKind::Bonus,
                Some("promotions".into()),
                -15 * CREDIT
            ),
        ]
    );

    // Replay: the same purchase, no second credit or invoice; other payload: conflict.
    let replay =
        purchases::purchase_credits(&t.db, invoice_req(f.ws_a, "inv-1", pkg()), now).await?;
    assert!(replay.replayed);
    assert_eq!(replay.purchase, p1.purchase);
    let err = purchases::purchase_credits(
        &t.db,
        invoice_req(f.ws_a, "inv-1", PurchaseItem::Package("pkg_50".into())),
        now,
    )
    .await
    .expect_err("conflict");
    assert_eq!(err.code(), ErrorCode::IdempotencyConflict);
    let err = purchases::purchase_credits(&t.db, card_req(f.ws_a, "inv-1", None), now)
        .await
        .expect_err("conflict with card");
    assert_eq!(err.code(), ErrorCode::IdempotencyConflict);
    assert_eq!(count(&t.db, "invoices").await?, 1);
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 115 * CREDIT);

    // The next invoice of the account (another workspace, custom amount, no bonus).
    let p2 = purchases::purchase_credits(
        &t.db,
        invoice_req(
            f.ws_b,
            "inv-2",
            PurchaseItem::Amount(Credits::parse("1234.56")?),
        ),
        now,
    )
    .await?;
    let inv2 = invoice(&t.db, &p2).await?;
    assert_eq!(inv2.number, "INV-000002");
    assert_eq!(inv2.total_nanos, 1_234_560_000_000);
    assert_eq!(
        purchases::invoice_lines_by_invoice(&t.db, &[inv2.id]).await?[&inv2.id].len(),
        1
    );
    assert_eq!(
        workspace(&t.db, f.ws_b).await?.balance_nanos,
        1_234_560_000_000
    );

    // Paying an invoice posts nothing and is idempotent.
    let ledger_before = money_row_counts(&t.db).await?;
    let paid_at = now + Duration::days(3);
    let paid = purchases::mark_invoice_paid(&t.db, inv1.id, paid_at).await?;
    assert_eq!(paid.status, InvoiceStatus::Paid);
    assert_eq!(paid.paid_at, Some(paid_at));
    let again = purchases::mark_invoice_paid(&t.db, inv1.id, paid_at + Duration::days(1)).await?;
    assert_eq!(again, paid);
    assert_eq!(money_row_counts(&t.db).await?, ledger_before);
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 115 * CREDIT);
    // A VOID invoice cannot be paid; an unknown one is not found.
    let mut void = inv2.clone().into_active_model();
    void.status = Set(InvoiceStatus::Void);
    void.update(&t.db).await?;
    let err = purchases::mark_invoice_paid(&t.db, inv2.id, now)
        .await
        .expect_err("void");
    assert_eq!(err.code(), ErrorCode::InvalidInput);
    let err = purchases::mark_invoice_paid(&t.db, Uuid::now_v7(), now)
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), ErrorCode::NotFound);

    // Batched loaders.
    let by_id = purchases::invoices_by_ids(&t.db, &[inv1.id, inv2.id, Uuid::nil()]).await?;
    assert_eq!(by_id.len(), 2);
    assert_eq!(by_id[&inv1.id].status, InvoiceStatus::Paid);
    let by_account = purchases::invoices_by_account(&t.db, &[f.account_id]).await?;
    assert_eq!(
        by_account[&f.account_id]
            .iter()
            .map(|i| i.number.as_str())
            .collect::<Vec<_>>(),
        vec!["INV-000002", "INV-000001"]
    );
    assert!(purchases::invoices_by_ids(&t.db, &[]).await?.is_empty());
    t.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_invoices_get_distinct_consecutive_numbers() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now().trunc_subsecs(3);
    let f = Fixture::new(&t.db, now).await?;
    set_verified(&t.db, f.account_id).await?;
    let gw = SandboxGateway::new();
    payments::cards::add_payment_method(&t.db, &gw, f.account_id, "tok_visa", false, now).await?;
    let pools = [t.db.clone(), t.second_pool().await?];

    // Card purchases to capture while invoice purchases race: they share the numbering.
    let mut pending = Vec::new();
    for i in 0..4 {
        let ws = if i % 2 == 0 { f.ws_a } else { f.ws_b };
        let p = purchases::purchase_credits(&t.db, card_req(ws, &format!("card-{i}"), None), now)
            .await?;
        pending.push(p.purchase.id);
    }
    let mut tasks = Vec::new();
    for i in 0..16 {
        let db = pools[i % 2].clone();
        let ws = if (i / 2) % 3 == 0 { f.ws_b } else { f.ws_a };
        // Each key is sent twice: a duplicate must neither credit nor invoice twice.
        let key = format!("inv-{}", i / 2);
        tasks.push(tokio::spawn(async move {
            purchases::purchase_credits(
                &db,
                invoice_req(ws, &key, PurchaseItem::Package("pkg_50".into())),
                Utc::now(),
            )
            .await
            .map(|p| p.purchase)
        }));
    }
    for (i, id) in pending.iter().enumerate() {
        let db = pools[i % 2].clone();
        let id = *id;
        tasks.push(tokio::spawn(async move {
            purchases::capture_succeeded(&db, id, &format!("ch_{i}"), Utc::now()).await
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        match task.await? {
            Ok(p) => results.push(p),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    let invoices = invoices::Entity::find()
        .filter(invoices::Column::AccountId.eq(f.account_id))
        .order_by_asc(invoices::Column::Sequence)
        .all(&t.db)
        .await?;
    let numbers: Vec<_> = invoices.iter().map(|i| i.number.clone()).collect();
    let expected: Vec<_> = (1..=invoices.len() as i64)
        .map(purchases::invoice_number)
        .collect();
    assert_eq!(numbers, expected, "gap-free and distinct");
    let purchases_count = count(&t.db, "purchases").await?;
    assert_eq!(purchases_count, 4 + 8);
    assert_eq!(
        invoices.len() as i64,
        purchases_count,
        "one invoice per purchase"
    );
    let account = accounts::Entity::find_by_id(f.account_id)
        .one(&t.db)
        .await?
        .expect("account");
    assert_eq!(account.invoice_sequence, invoices.len() as i64);
    // Every answered purchase points at its invoice, and every invoice at its purchase.
    for p in &results {
        let invoice = invoices
            .iter()
            .find(|i| Some(i.id) == p.invoice_id)
            .expect("an invoice for the purchase");
        assert_eq!(invoice.purchase_id, Some(p.id));
    }
    // Balances: each purchase credited once (pkg_50: 55; pkg_100 by card: 115).
    let total = workspace(&t.db, f.ws_a).await?.balance_nanos
        + workspace(&t.db, f.ws_b).await?.balance_nanos;
    let invoiced = purchases_count - 4;
    assert_eq!(total, invoiced * 55 * CREDIT + 4 * 115 * CREDIT);
    assert_eq!(count(&t.db, "ledger_transactions").await?, purchases_count);
    t.finish().await
}

#[tokio::test]
async fn invoice_due_dates_follow_the_account_terms() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now: DateTime<Utc> = Utc::now().trunc_subsecs(3);
    let f = Fixture::new(&t.db, now).await?;
    let account = accounts::Entity::find_by_id(f.account_id)
        .one(&t.db)
        .await?
        .expect("account");
    let mut active = account.into_active_model();
    active.verified = Set(true);
    active.payment_terms_days = Set(0);
    // The volume discount applies to usage, not to purchases.
    active.volume_discount_bps = Set(2_500);
    active.update(&t.db).await?;
    let p = purchases::purchase_credits(
        &t.db,
        invoice_req(f.ws_a, "inv-1", PurchaseItem::Package("pkg_10".into())),
        now,
    )
    .await?;
    assert_eq!(p.purchase.price_nanos, 10 * CREDIT);
    let inv = invoice(&t.db, &p).await?;
    assert_eq!(inv.due_at, Some(now));
    assert_eq!(inv.total_nanos, 10 * CREDIT);
    t.finish().await
}

#[tokio::test]
async fn the_sandbox_takes_stripe_style_payment_method_ids_and_3ds_cards() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let gw = SandboxGateway::new();
    // The same frontend code as for Stripe: a SetupIntent, then a PaymentMethod id.
    let setup = payments::cards::start_card_setup(&t.db, &gw, f.account_id).await?;
    assert!(setup.setup_intent_id.starts_with("seti_"), "{setup:?}");
    assert!(setup.client_secret.starts_with(&setup.setup_intent_id));
    let customer = payments::cards::ensure_customer(&t.db, &gw, f.account_id).await?;
    assert!(customer.starts_with("cus_sandbox_"), "{customer}");
    let visa =
        payments::cards::add_payment_method(&t.db, &gw, f.account_id, "pm_card_visa", true, now)
            .await?;
    assert_eq!((visa.brand, visa.last4.as_str()), (CardBrand::Visa, "4242"));
    assert_eq!(
        payments::cards::ensure_customer(&t.db, &gw, f.account_id).await?,
        customer,
        "one Customer per account"
    );

    // A card that needs 3-D Secure: REQUIRES_ACTION, nothing credited, never retried.
    let secure = payments::cards::add_payment_method(
        &t.db,
        &gw,
        f.account_id,
        "tok_authenticationRequired",
        true,
        now,
    )
    .await?;
    let p = purchases::purchase_credits(&t.db, card_req(f.ws_a, "3ds", Some(secure.id)), now)
        .await?
        .purchase;
    let payments::capture::Next::Charge(request) =
        payments::capture::prepare(&t.db, p.id, now).await?
    else {
        anyhow::bail!("nothing to charge");
    };
    assert_eq!(
        request.gateway_customer_id.as_deref(),
        Some(customer.as_str())
    );
    let outcome = gw.charge(request).await;
    assert!(
        matches!(outcome, Ok(ChargeOutcome::RequiresAction { .. })),
        "{outcome:?}"
    );
    payments::capture::apply(&t.db, p.id, outcome, now).await?;
    let p = purchases::load_purchase(&t.db, p.id).await?;
    assert_eq!(p.status, PurchaseStatus::RequiresAction);
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 0);
    assert!(matches!(
        payments::capture::prepare(&t.db, p.id, now).await?,
        payments::capture::Next::Done
    ));
    t.finish().await
}
