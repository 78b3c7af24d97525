//! The settings functions of `billing` (`catalog`, `accounts::revoke_api_key`,
//! `policies::auto_reload_settings`, `policies::alert_thresholds`) against a real
//! database (SQLite by default, PostgreSQL with TEST_DATABASE_URL): pricing agreements,
//! the model catalog, API key revocation, auto-reload configuration, alert thresholds
//! and cost estimates.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::accounts;
use billing::catalog::{
    MODEL_ID_LEN_MAX, MODEL_PRICE_PER_MILLION_MAX, ModelInput, PAYMENT_TERMS_DAYS_MAX,
};
use billing::debits::reservations::{self, ReserveRequest};
use billing::debits::usage::{self, ProjectRef, UsageRequest};
use billing::entity::enums::{
    AccountRole, AlertSeverity, AutoReloadStatus, BudgetPeriod, CardBrand, WorkspaceRole,
};
use billing::entity::{
    account_members, alert_thresholds, auto_reload_settings, models, payment_methods, projects,
};
use billing::policies::alert_thresholds::{
    ALERT_AMOUNT_CREDITS_MAX, ALERT_RECIPIENTS_MAX, ALERT_THRESHOLDS_MAX, AlertThresholdInput,
};
use billing::policies::auto_reload_settings::{
    AUTO_RELOAD_THRESHOLD_CREDITS_MAX, AutoReloadInput, MAX_RELOADS_PER_DAY_MAX,
};
use billing::sea_orm::{
    ActiveModelTrait, ActiveValue::Set, DatabaseConnection, EntityTrait, IntoActiveModel,
};
use billing::{BillingError, Credits, DiscountBps, ErrorCode};
use chrono::{DateTime, Duration, TimeZone, Utc};
use reservoir_tests::{Fixture, TEST_MODEL, TestDb, count, fund, usage_req, workspace};
use uuid::Uuid;

/// A fixed instant (whole seconds, so both backends store it exactly), mid-month so
/// budget periods are easy to reason about.
fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 16, 12, 0, 0)
        .single()
        .expect("valid time")
}

fn credits(s: &str) -> Credits {
    Credits::parse(s).expect("valid amount")
}

fn nanos(n: i64) -> Credits {
    Credits::from_nanos(n)
}

/// Asserts an INVALID_INPUT whose message contains `needle`.
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, BillingError>, needle: &str) {
    match result {
        Err(BillingError::InvalidInput(message)) => assert!(
            message.contains(needle),
            "message {message:?} does not mention {needle:?}"
        ),
        other => panic!("expected INVALID_INPUT mentioning {needle:?}, got {other:?}"),
    }
}

#[track_caller]
fn assert_code<T: std::fmt::Debug>(result: Result<T, BillingError>, code: ErrorCode) {
    match result {
        Err(e) => assert_eq!(e.code(), code, "{e}"),
        Ok(v) => panic!("expected {code}, got {v:?}"),
    }
}

/// A stored card of `account_id`, inserted directly (the payments module is not
/// needed to configure auto-reload).
async fn add_card(
    db: &DatabaseConnection,
    account_id: Uuid,
    is_default: bool,
    removed: bool,
) -> anyhow::Result<Uuid> {
    let id = Uuid::now_v7();
    payment_methods::Entity::insert(payment_methods::ActiveModel {
        id: Set(id),
        account_id: Set(account_id),
        gateway_token: Set(format!("tok_{}", id.simple())),
        brand: Set(CardBrand::Visa),
        last4: Set("4242".into()),
        exp_month: Set(12),
        exp_year: Set(2030),
        is_default: Set(is_default),
        created_at: Set(t0()),
        removed_at: Set(removed.then(t0)),
        fingerprint: Set(None),
    })
    .exec_without_returning(db)
    .await?;
    Ok(id)
}

fn reload(workspace_id: Uuid) -> AutoReloadInput {
    AutoReloadInput {
        workspace_id,
        enabled: true,
        threshold: credits("10"),
        amount: credits("50"),
        payment_method_id: None,
        max_reloads_per_day: 3,
    }
}

fn alert(amount: &str, recipient_ids: Vec<Uuid>) -> AlertThresholdInput {
    AlertThresholdInput {
        amount: credits(amount),
        severity: AlertSeverity::Warning,
        recipient_ids,
    }
}

fn model_input(id: &str, prompt: &str, completion: &str) -> ModelInput {
    ModelInput {
        id: id.into(),
        name: "Some model".into(),
        prompt_price_per_million: credits(prompt),
        completion_price_per_million: credits(completion),
        active: true,
    }
}

// --- pricing agreement -------------------------------------------------------------

#[tokio::test]
async fn pricing_agreement_sets_terms_and_validates() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, t0()).await?;
    let discount = DiscountBps::parse_percent("12.5")?;

    let account =
        billing::catalog::set_pricing_agreement(&t.db, f.account_id, true, discount, 60, t0())
            .await?;
    assert!(account.verified);
    assert_eq!(account.volume_discount_bps, 1250);
    assert_eq!(account.payment_terms_days, 60);
    assert_eq!(account.id, f.account_id);

    // Both ends of the range are allowed.
    for days in [0, PAYMENT_TERMS_DAYS_MAX] {
        let a = billing::catalog::set_pricing_agreement(
            &t.db,
            f.account_id,
            false,
            DiscountBps::ZERO,
            days,
            t0(),
        )
        .await?;
        assert_eq!(
            (a.verified, a.volume_discount_bps, a.payment_terms_days),
            (false, 0, days)
        );
    }
    for days in [-1, PAYMENT_TERMS_DAYS_MAX + 1, i32::MIN, i32::MAX] {
        assert_invalid(
            billing::catalog::set_pricing_agreement(
                &t.db,
                f.account_id,
                true,
                discount,
                days,
                t0(),
            )
            .await,
            "paymentTermsDays must be between 0 and 365",
        );
    }
    assert_code(
        billing::catalog::set_pricing_agreement(&t.db, Uuid::now_v7(), true, discount, 30, t0())
            .await,
        ErrorCode::NotFound,
    );
    // The refused calls changed nothing.
    let stored = billing::entity::accounts::Entity::find_by_id(f.account_id)
        .one(&t.db)
        .await?
        .expect("account");
    assert_eq!(stored.payment_terms_days, PAYMENT_TERMS_DAYS_MAX);
    t.finish().await
}

// --- model catalog -----------------------------------------------------------------

#[tokio::test]
async fn model_catalog_upsert_list_and_deactivate() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, t0()).await?;
    fund(&t.db, f.ws_a, "10", t0()).await?;

    let created = billing::catalog::upsert_model(
        &t.db,
        ModelInput {
            name: "  GPT-4o  ".into(),
            ..model_input("acme/model-x", "2.5", "10")
        },
        t0(),
    )
    .await?;
    assert_eq!(created.id, "acme/model-x");
    assert_eq!(created.name, "GPT-4o");
    assert_eq!(created.prompt_price_per_million_nanos, 2_500_000_000);
    assert_eq!(created.completion_price_per_million_nanos, 10_000_000_000);
    assert!(created.active);
    assert_eq!((created.created_at, created.updated_at), (t0(), t0()));

    // Updating keeps created_at and moves updated_at.
    let later = t0() + Duration::hours(1);
    let updated = billing::catalog::upsert_model(
        &t.db,
        ModelInput {
            name: "GPT-4o (2026)".into(),
            ..model_input("acme/model-x", "2", "8.5")
        },
        later,
    )
    .await?;
    assert_eq!(updated.name, "GPT-4o (2026)");
    assert_eq!(updated.prompt_price_per_million_nanos, 2_000_000_000);
    assert_eq!(updated.completion_price_per_million_nanos, 8_500_000_000);
    assert_eq!((updated.created_at, updated.updated_at), (t0(), later));
    let stored = models::Entity::find_by_id("acme/model-x".to_owned())
        .one(&t.db)
        .await?
        .expect("model");
    assert_eq!(stored, updated);

    // Free models and the maximum price are fine; ids use the whole alphabet.
    let edge_id = "a.b_c-d/e:f0";
    let edge = billing::catalog::upsert_model(
        &t.db,
        ModelInput {
            prompt_price_per_million: Credits::ZERO,
            completion_price_per_million: MODEL_PRICE_PER_MILLION_MAX,
            ..model_input(edge_id, "0", "0")
        },
        t0(),
    )
    .await?;
    assert_eq!(
        edge.completion_price_per_million_nanos,
        10_000 * 1_000_000_000
    );
    let longest = "x".repeat(MODEL_ID_LEN_MAX);
    billing::catalog::upsert_model(&t.db, model_input(&longest, "1", "1"), t0()).await?;

    // Usage recorded before deactivation stays; new usage is refused.
    usage::record_usage(&t.db, usage_req(f.ws_a, "before", 1_000), t0()).await?;
    let retired = billing::catalog::upsert_model(
        &t.db,
        ModelInput {
            active: false,
            name: "Linear test model".into(),
            ..model_input(TEST_MODEL, "1", "2")
        },
        later,
    )
    .await?;
    assert!(!retired.active);
    assert_invalid(
        usage::record_usage(&t.db, usage_req(f.ws_a, "after", 1_000), later).await,
        "no longer available",
    );
    assert_eq!(count(&t.db, "usage_events").await?, 1);
    assert!(
        models::Entity::find_by_id(TEST_MODEL.to_owned())
            .one(&t.db)
            .await?
            .is_some()
    );

    // Listing: by id; the retired model only on request. (The catalog also holds the
    // models seeded by the migrations.)
    let active: Vec<String> = billing::catalog::list_models(&t.db, false)
        .await?
        .into_iter()
        .map(|m| m.id)
        .collect();
    let all: Vec<String> = billing::catalog::list_models(&t.db, true)
        .await?
        .into_iter()
        .map(|m| m.id)
        .collect();
    for id in [edge_id, "acme/model-x", longest.as_str()] {
        assert!(active.iter().any(|a| a == id) && all.iter().any(|a| a == id));
    }
    assert!(!active.iter().any(|a| a == TEST_MODEL));
    assert!(all.iter().any(|a| a == TEST_MODEL));
    assert_eq!(all.len(), active.len() + 1);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "ordered by id");

    // A seeded model is updated in place: its creation time is kept.
    let seeded = models::Entity::find_by_id("openai/gpt-4o".to_owned())
        .one(&t.db)
        .await?
        .expect("seeded model");
    let repriced = billing::catalog::upsert_model(
        &t.db,
        ModelInput {
            name: "GPT-4o".into(),
            ..model_input("openai/gpt-4o", "2", "8")
        },
        later,
    )
    .await?;
    assert_eq!(repriced.created_at, seeded.created_at);
    assert_eq!(repriced.updated_at, later);
    assert_eq!(repriced.prompt_price_per_million_nanos, 2_000_000_000);

    // Reactivating lets usage through again.
    billing::catalog::upsert_model(
        &t.db,
        ModelInput {
            name: "Linear test model".into(),
            ..model_input(TEST_MODEL, "1", "2")
        },
        later,
    )
    .await?;
    usage::record_usage(&t.db, usage_req(f.ws_a, "after", 1_000), later).await?;
    t.finish().await
}

#[tokio::test]
async fn model_input_validation() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let models_before = count(&t.db, "models").await?;
    let id_rule = "model id must be 1 to 100 characters";
    let too_long = "x".repeat(MODEL_ID_LEN_MAX + 1);
    for bad in [
        "",
        too_long.as_str(),
        "OpenAI/gpt-4o",
        "openai/gpt 4o",
        " openai/gpt-4o",
        "openai/gpt-4o\n",
        "openai/gpt-4ö",
        "openai\\gpt",
        "openai/gpt-4o?",
    ] {
        assert_invalid(
            billing::catalog::upsert_model(&t.db, model_input(bad, "1", "1"), t0()).await,
            id_rule,
        );
    }
    for bad_name in ["", "   ", &"n".repeat(101), "tab\tname"] {
        assert_invalid(
            billing::catalog::upsert_model(
                &t.db,
                ModelInput {
                    name: bad_name.to_owned(),
                    ..model_input("ok/model", "1", "1")
                },
                t0(),
            )
            .await,
            "name must be 1 to 100 characters",
        );
    }
    let over = MODEL_PRICE_PER_MILLION_MAX.checked_add(nanos(1))?;
    for (prompt, completion, field) in [
        (nanos(-1), Credits::ZERO, "promptPricePerMillion"),
        (over, Credits::ZERO, "promptPricePerMillion"),
        (Credits::ZERO, nanos(-1), "completionPricePerMillion"),
        (Credits::ZERO, over, "completionPricePerMillion"),
        (Credits::MIN, Credits::MAX, "promptPricePerMillion"),
    ] {
        assert_invalid(
            billing::catalog::upsert_model(
                &t.db,
                ModelInput {
                    prompt_price_per_million: prompt,
                    completion_price_per_million: completion,
                    ..model_input("ok/model", "0", "0")
                },
                t0(),
            )
            .await,
            &format!("{field} must be between 0 and 10000 credits"),
        );
    }
    assert_eq!(
        count(&t.db, "models").await?,
        models_before,
        "refusals wrote nothing"
    );
    t.finish().await
}

// --- API keys ----------------------------------------------------------------------

#[tokio::test]
async fn revoking_an_api_key_is_idempotent() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, t0()).await?;
    let created = accounts::create_api_key(&t.db, f.ws_a, "gateway", None, t0()).await?;
    let other = accounts::create_api_key(&t.db, f.ws_a, "other", None, t0()).await?;
    let before = billing::accounts::auth::authenticate(&t.db, &created.secret, None, t0()).await?;
    assert!(matches!(
        before,
        billing::accounts::auth::Principal::ApiKey { .. }
    ));

    let first_at = t0() + Duration::minutes(5);
    let revoked = accounts::revoke_api_key(&t.db, created.api_key.id, first_at).await?;
    assert_eq!(revoked.id, created.api_key.id);
    assert_eq!(revoked.revoked_at, Some(first_at));

    // Again, later: still the first revocation time.
    let again =
        accounts::revoke_api_key(&t.db, created.api_key.id, first_at + Duration::hours(1)).await?;
    assert_eq!(again.revoked_at, Some(first_at));
    assert_eq!(again, revoked);

    assert_code(
        billing::accounts::auth::authenticate(&t.db, &created.secret, None, first_at).await,
        ErrorCode::Unauthenticated,
    );
    // Other keys are untouched.
    billing::accounts::auth::authenticate(&t.db, &other.secret, None, first_at).await?;
    assert_code(
        accounts::revoke_api_key(&t.db, Uuid::now_v7(), first_at).await,
        ErrorCode::NotFound,
    );
    t.finish().await
}

// --- auto-reload -------------------------------------------------------------------

#[tokio::test]
async fn auto_reload_input_validation() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, t0()).await?;
    add_card(&t.db, f.account_id, true, false).await?;
    let ws = f.ws_a;
    let threshold_over =
        Credits::from_whole_credits(AUTO_RELOAD_THRESHOLD_CREDITS_MAX)?.checked_add(nanos(1))?;
    let cases: Vec<(AutoReloadInput, &str)> = vec![
        (
            AutoReloadInput {
                threshold: nanos(-1),
                ..reload(ws)
            },
            "threshold must be between 0 and 1000000 credits",
        ),
        (
            AutoReloadInput {
                threshold: threshold_over,
                ..reload(ws)
            },
            "threshold must be between 0 and 1000000 credits",
        ),
        (
            AutoReloadInput {
                amount: credits("4.99"),
                ..reload(ws)
            },
            "amount must be between 5 and 100000 credits",
        ),
        (
            AutoReloadInput {
                amount: Credits::ZERO,
                ..reload(ws)
            },
            "amount must be between 5 and 100000 credits",
        ),
        (
            AutoReloadInput {
                amount: credits("100000.01"),
                ..reload(ws)
            },
            "amount must be between 5 and 100000 credits",
        ),
        (
            AutoReloadInput {
                amount: credits("20.005"),
                ..reload(ws)
            },
            "amount must be a whole number of cents",
        ),
        (
            AutoReloadInput {
                max_reloads_per_day: 0,
                ..reload(ws)
            },
            "maxReloadsPerDay must be between 1 and 24",
        ),
        (
            AutoReloadInput {
                max_reloads_per_day: MAX_RELOADS_PER_DAY_MAX + 1,
                ..reload(ws)
            },
            "maxReloadsPerDay must be between 1 and 24",
        ),
    ];
    for (input, message) in cases {
        assert_invalid(
            billing::policies::auto_reload_settings::configure_auto_reload(&t.db, input, t0())
                .await,
            message,
        );
    }
    // Disabled configurations are validated the same way.
    assert_invalid(
        billing::policies::auto_reload_settings::configure_auto_reload(
            &t.db,
            AutoReloadInput {
                enabled: false,
                amount: credits("1"),
                ..reload(ws)
            },
            t0(),
        )
        .await,
        "amount must be between",
    );
    assert_eq!(count(&t.db, "auto_reload_settings").await?, 0);

    // The bounds themselves are accepted.
    let edge = billing::policies::auto_reload_settings::configure_auto_reload(
        &t.db,
        AutoReloadInput {
            threshold: Credits::from_whole_credits(AUTO_RELOAD_THRESHOLD_CREDITS_MAX)?,
            amount: credits("100000"),
            max_reloads_per_day: MAX_RELOADS_PER_DAY_MAX,
            ..reload(ws)
        },
        t0(),
    )
    .await?;
    assert_eq!(edge.max_reloads_per_day, 24);
    let edge = billing::policies::auto_reload_settings::configure_auto_reload(
        &t.db,
        AutoReloadInput {
            threshold: Credits::ZERO,
            amount: credits("5"),
            max_reloads_per_day: 1,
            ..reload(ws)
        },
        t0(),
    )
    .await?;
    assert_eq!(
        (edge.threshold_nanos, edge.amount_nanos),
        (0, 5_000_000_000)
    );

    assert_code(
        billing::policies::auto_reload_settings::configure_auto_reload(
            &t.db,
            reload(Uuid::now_v7()),
            t0(),
        )
        .await,
        ErrorCode::NotFound,
    );
    t.finish().await
}

#[tokio::test]
async fn auto_reload_payment_methods() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, t0()).await?;
    let other =
        accounts::create_account(&t.db, "Other Co", "owner@other.example", "Other", t0()).await?;

    // No card at all: enabling is refused, a disabled configuration is fine.
    assert_invalid(
        billing::policies::auto_reload_settings::configure_auto_reload(&t.db, reload(f.ws_a), t0())
            .await,
        "add a payment method first",
    );
    let off = billing::policies::auto_reload_settings::configure_auto_reload(
        &t.db,
        AutoReloadInput {
            enabled: false,
            ..reload(f.ws_a)
        },
        t0(),
    )
    .await?;
    assert!(!off.enabled);
    assert_eq!(off.payment_method_id, None);
    assert_eq!(off.status, AutoReloadStatus::Idle);

    // Cards that are not this account's live cards are NOT_FOUND, enabled or not.
    let foreign = add_card(&t.db, other.account.id, true, false).await?;
    let removed = add_card(&t.db, f.account_id, false, true).await?;
    for card in [foreign, removed, Uuid::now_v7()] {
        for enabled in [true, false] {
            assert_code(
                billing::policies::auto_reload_settings::configure_auto_reload(
                    &t.db,
                    AutoReloadInput {
                        enabled,
                        payment_method_id: Some(card),
                        ..reload(f.ws_a)
                    },
                    t0(),
                )
                .await,
                ErrorCode::NotFound,
            );
        }
    }
    // A removed default card is no default; another account's default neither.
    add_card(&t.db, f.account_id, true, true).await?;
    assert_invalid(
        billing::policies::auto_reload_settings::configure_auto_reload(&t.db, reload(f.ws_a), t0())
            .await,
        "add a payment method first",
    );

    // A non-default card can be named explicitly ...
    let spare = add_card(&t.db, f.account_id, false, false).await?;
    let on = billing::policies::auto_reload_settings::configure_auto_reload(
        &t.db,
        AutoReloadInput {
            payment_method_id: Some(spare),
            ..reload(f.ws_a)
        },
        t0(),
    )
    .await?;
    assert!(on.enabled);
    assert_eq!(on.payment_method_id, Some(spare));
    // ... and without one, the account's default card is used.
    assert_invalid(
        billing::policies::auto_reload_settings::configure_auto_reload(&t.db, reload(f.ws_b), t0())
            .await,
        "add a payment method first",
    );
    let default = add_card(&t.db, f.account_id, true, false).await?;
    let on_b =
        billing::policies::auto_reload_settings::configure_auto_reload(&t.db, reload(f.ws_b), t0())
            .await?;
    assert_eq!(on_b.payment_method_id, Some(default));
    assert_eq!(on_b.threshold_nanos, 10_000_000_000);
    assert_eq!(on_b.amount_nanos, 50_000_000_000);
    assert_eq!(on_b.max_reloads_per_day, 3);
    assert_eq!(on_b.updated_at, t0());
    let on_a =
        billing::policies::auto_reload_settings::configure_auto_reload(&t.db, reload(f.ws_a), t0())
            .await?;
    assert_eq!(on_a.payment_method_id, Some(default));
    assert_eq!(count(&t.db, "auto_reload_settings").await?, 2);
    t.finish().await
}

/// Moves a settings row into a state only the worker produces.
async fn force_state(
    db: &DatabaseConnection,
    workspace_id: Uuid,
    enabled: bool,
    status: AutoReloadStatus,
    failures: i32,
) -> anyhow::Result<()> {
    let row = auto_reload_settings::Entity::find_by_id(workspace_id)
        .one(db)
        .await?
        .expect("settings row");
    let mut row = row.into_active_model();
    row.enabled = Set(enabled);
    row.status = Set(status);
    row.consecutive_failures = Set(failures);
    row.last_failure_reason = Set(Some("card declined".into()));
    row.next_attempt_at = Set(Some(t0() + Duration::hours(2)));
    row.update(db).await?;
    Ok(())
}

#[tokio::test]
async fn auto_reload_status_rules_and_batched_read() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, t0()).await?;
    add_card(&t.db, f.account_id, true, false).await?;
    let later = t0() + Duration::hours(3);
    billing::policies::auto_reload_settings::configure_auto_reload(&t.db, reload(f.ws_a), t0())
        .await?;

    // Turned off by the system after failures: re-enabling is a fresh start.
    force_state(
        &t.db,
        f.ws_a,
        false,
        AutoReloadStatus::DisabledAfterFailures,
        3,
    )
    .await?;
    let fresh = billing::policies::auto_reload_settings::configure_auto_reload(
        &t.db,
        reload(f.ws_a),
        later,
    )
    .await?;
    assert!(fresh.enabled);
    assert_eq!(fresh.status, AutoReloadStatus::Idle);
    assert_eq!(fresh.consecutive_failures, 0);
    assert_eq!(fresh.next_attempt_at, None);
    assert_eq!(fresh.updated_at, later);
    // The reason stays as history.
    assert_eq!(fresh.last_failure_reason.as_deref(), Some("card declined"));

    // Still flagged enabled but DISABLED_AFTER_FAILURES: enabling resets it too.
    force_state(
        &t.db,
        f.ws_a,
        true,
        AutoReloadStatus::DisabledAfterFailures,
        5,
    )
    .await?;
    let fresh = billing::policies::auto_reload_settings::configure_auto_reload(
        &t.db,
        reload(f.ws_a),
        later,
    )
    .await?;
    assert_eq!(
        (
            fresh.status,
            fresh.consecutive_failures,
            fresh.next_attempt_at
        ),
        (AutoReloadStatus::Idle, 0, None)
    );

    // A change while enabled and IDLE keeps failures and backoff.
    force_state(&t.db, f.ws_a, true, AutoReloadStatus::Idle, 2).await?;
    let changed = billing::policies::auto_reload_settings::configure_auto_reload(
        &t.db,
        AutoReloadInput {
            threshold: credits("25"),
            ..reload(f.ws_a)
        },
        later,
    )
    .await?;
    assert_eq!(changed.threshold_nanos, 25_000_000_000);
    assert_eq!(changed.status, AutoReloadStatus::Idle);
    assert_eq!(changed.consecutive_failures, 2);
    assert!(changed.next_attempt_at.is_some());

    // A reload in flight stays RELOADING through any change ...
    force_state(&t.db, f.ws_a, true, AutoReloadStatus::Reloading, 1).await?;
    let changed = billing::policies::auto_reload_settings::configure_auto_reload(
        &t.db,
        AutoReloadInput {
            amount: credits("75.25"),
            ..reload(f.ws_a)
        },
        later,
    )
    .await?;
    assert_eq!(changed.amount_nanos, 75_250_000_000);
    assert_eq!(changed.status, AutoReloadStatus::Reloading);
    assert_eq!(changed.consecutive_failures, 1);
    // ... including disabling ...
    let off = billing::policies::auto_reload_settings::configure_auto_reload(
        &t.db,
        AutoReloadInput {
            enabled: false,
            ..reload(f.ws_a)
        },
        later,
    )
    .await?;
    assert!(!off.enabled);
    assert_eq!(off.status, AutoReloadStatus::Reloading);
    // ... and re-enabling, which still clears failures and backoff.
    let on = billing::policies::auto_reload_settings::configure_auto_reload(
        &t.db,
        reload(f.ws_a),
        later,
    )
    .await?;
    assert_eq!(
        (on.status, on.consecutive_failures, on.next_attempt_at),
        (AutoReloadStatus::Reloading, 0, None)
    );

    // Disabling leaves DISABLED_AFTER_FAILURES visible (it says why it is off).
    force_state(
        &t.db,
        f.ws_a,
        false,
        AutoReloadStatus::DisabledAfterFailures,
        3,
    )
    .await?;
    let still_off = billing::policies::auto_reload_settings::configure_auto_reload(
        &t.db,
        AutoReloadInput {
            enabled: false,
            ..reload(f.ws_a)
        },
        later,
    )
    .await?;
    assert_eq!(
        (still_off.status, still_off.consecutive_failures),
        (AutoReloadStatus::DisabledAfterFailures, 3)
    );

    // Batched read: stored rows, and a default for workspaces without one.
    let missing = Uuid::now_v7();
    let map =
        billing::policies::auto_reload_settings::auto_reload_for(&t.db, &[f.ws_a, f.ws_b, missing])
            .await?;
    assert_eq!(map.len(), 3);
    assert_eq!(map[&f.ws_a], still_off);
    for id in [f.ws_b, missing] {
        let d = &map[&id];
        assert_eq!(d.workspace_id, id);
        assert!(!d.enabled);
        assert_eq!(d.status, AutoReloadStatus::Idle);
        assert_eq!(d.payment_method_id, None);
        assert_eq!(d.max_reloads_per_day, 3);
        assert_eq!(d.consecutive_failures, 0);
        assert_eq!(
            *d,
            billing::policies::auto_reload_settings::default_auto_reload(id)
        );
    }
    assert!(
        billing::policies::auto_reload_settings::auto_reload_for(&t.db, &[])
            .await?
            .is_empty()
    );
    t.finish().await
}

// --- alert thresholds --------------------------------------------------------------

/// The fixture's owner plus: a workspace-A viewer, a member of workspace B only, and
/// an account ADMIN with no workspace membership.
struct People {
    owner: Uuid,
    viewer_a: Uuid,
    member_b: Uuid,
    account_admin: Uuid,
}

async fn people(db: &DatabaseConnection, f: &Fixture) -> anyhow::Result<People> {
    let (viewer_a, _) = accounts::add_workspace_member(
        db,
        f.ws_a,
        "viewer@test.example",
        None,
        WorkspaceRole::Viewer,
        t0(),
    )
    .await?;
    let (member_b, _) = accounts::add_workspace_member(
        db,
        f.ws_b,
        "member@test.example",
        None,
        WorkspaceRole::Member,
        t0(),
    )
    .await?;
    // Made an account ADMIN: admin of every workspace, without a membership row in A.
    let (admin, _) = accounts::add_workspace_member(
        db,
        f.ws_b,
        "admin@test.example",
        None,
        WorkspaceRole::Viewer,
        t0(),
    )
    .await?;
    let mut role = account_members::Entity::find_by_id((f.account_id, admin.id))
        .one(db)
        .await?
        .expect("account member")
        .into_active_model();
    role.role = Set(AccountRole::Admin);
    role.update(db).await?;
    Ok(People {
        owner: f.owner_id,
        viewer_a: viewer_a.id,
        member_b: member_b.id,
        account_admin: admin.id,
    })
}

#[tokio::test]
async fn alert_threshold_validation() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, t0()).await?;
    let p = people(&t.db, &f).await?;
    let ws = f.ws_a;

    let eleven: Vec<_> = (1..=ALERT_THRESHOLDS_MAX + 1)
        .map(|i| alert(&i.to_string(), vec![]))
        .collect();
    assert_invalid(
        billing::policies::alert_thresholds::set_alert_thresholds(&t.db, ws, eleven, t0()).await,
        "at most 10 alert thresholds per workspace",
    );
    let amount_rule = "alert amount must be greater than 0 and at most 1000000 credits";
    let over = Credits::from_whole_credits(ALERT_AMOUNT_CREDITS_MAX)?.checked_add(nanos(1))?;
    for amount in [Credits::ZERO, nanos(-1), over] {
        let input = AlertThresholdInput {
            amount,
            ..alert("1", vec![])
        };
        assert_invalid(
            billing::policies::alert_thresholds::set_alert_thresholds(&t.db, ws, vec![input], t0())
                .await,
            amount_rule,
        );
    }
    assert_invalid(
        billing::policies::alert_thresholds::set_alert_thresholds(
            &t.db,
            ws,
            vec![
                alert("20", vec![]),
                alert("5", vec![]),
                alert("20.0", vec![]),
            ],
            t0(),
        )
        .await,
        "alert amounts must be distinct: 20 appears more than once",
    );
    let crowd: Vec<Uuid> = (0..=ALERT_RECIPIENTS_MAX).map(|_| p.owner).collect();
    assert_invalid(
        billing::policies::alert_thresholds::set_alert_thresholds(
            &t.db,
            ws,
            vec![alert("20", crowd)],
            t0(),
        )
        .await,
        "at most 20 recipients per alert threshold",
    );
    // Not members of workspace A: a member of B only, a stranger, an unknown id.
    let stranger = accounts::create_account(
        &t.db,
        "Other Co",
        "stranger@other.example",
        "Stranger",
        t0(),
    )
    .await?
    .owner
    .id;
    for outsider in [p.member_b, stranger, Uuid::now_v7()] {
        assert_invalid(
            billing::policies::alert_thresholds::set_alert_thresholds(
                &t.db,
                ws,
                vec![
                    alert("50", vec![p.owner]),
                    alert("20", vec![p.viewer_a, outsider]),
                ],
                t0(),
            )
            .await,
            &format!("recipient {outsider} is not a member of the workspace"),
        );
    }
    assert_code(
        billing::policies::alert_thresholds::set_alert_thresholds(
            &t.db,
            Uuid::now_v7(),
            vec![alert("5", vec![])],
            t0(),
        )
        .await,
        ErrorCode::NotFound,
    );
    assert_eq!(
        count(&t.db, "alert_thresholds").await?,
        0,
        "refusals wrote nothing"
    );

    // The limits themselves, and every kind of member, are accepted: a workspace
    // member (even a viewer), the account owner and an account admin.
    let ten: Vec<_> = (1..=ALERT_THRESHOLDS_MAX)
        .map(|i| alert(&i.to_string(), vec![p.viewer_a]))
        .collect();
    assert_eq!(
        billing::policies::alert_thresholds::set_alert_thresholds(&t.db, ws, ten, t0())
            .await?
            .len(),
        10
    );
    let mut twenty = vec![p.owner; ALERT_RECIPIENTS_MAX - 3];
    twenty.extend([p.viewer_a, p.account_admin, p.viewer_a]);
    let saved = billing::policies::alert_thresholds::set_alert_thresholds(
        &t.db,
        ws,
        vec![AlertThresholdInput {
            amount: Credits::from_whole_credits(ALERT_AMOUNT_CREDITS_MAX)?,
            ..alert("1", twenty)
        }],
        t0(),
    )
    .await?;
    let mut expected = vec![p.owner, p.viewer_a, p.account_admin];
    expected.sort();
    assert_eq!(saved[0].1, expected, "duplicates ignored, ids sorted");
    // B's member is fine in B.
    billing::policies::alert_thresholds::set_alert_thresholds(
        &t.db,
        f.ws_b,
        vec![alert("5", vec![p.member_b])],
        t0(),
    )
    .await?;
    t.finish().await
}

#[tokio::test]
async fn alert_thresholds_replace_and_start_disarmed_below_balance() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, t0()).await?;
    let p = people(&t.db, &f).await?;
    fund(&t.db, f.ws_a, "50", t0()).await?;

    let saved = billing::policies::alert_thresholds::set_alert_thresholds(
        &t.db,
        f.ws_a,
        vec![
            AlertThresholdInput {
                severity: AlertSeverity::Urgent,
                ..alert("20", vec![p.owner])
            },
            // Exactly the balance: not below it, so armed.
            alert("50", vec![p.viewer_a, p.owner]),
            // Already below: starts disarmed, it must not fire for an old crossing.
            alert("100", vec![]),
        ],
        t0(),
    )
    .await?;
    let summary: Vec<_> = saved
        .iter()
        .map(|(th, users)| (th.amount_nanos, th.severity, th.armed, users.len()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (100_000_000_000, AlertSeverity::Warning, false, 0),
            (50_000_000_000, AlertSeverity::Warning, true, 2),
            (20_000_000_000, AlertSeverity::Urgent, true, 1),
        ]
    );
    for (th, _) in &saved {
        assert_eq!(th.workspace_id, f.ws_a);
        assert_eq!(th.created_at, t0());
        assert_eq!(th.last_triggered_at, None);
    }

    // The batched read returns the same thing, plus empty lists for the others.
    let missing = Uuid::now_v7();
    let map = billing::policies::alert_thresholds::alert_thresholds_for(
        &t.db,
        &[f.ws_a, f.ws_b, missing],
    )
    .await?;
    assert_eq!(map.len(), 3);
    assert_eq!(map[&f.ws_a], saved);
    assert!(map[&f.ws_b].is_empty() && map[&missing].is_empty());
    assert!(
        billing::policies::alert_thresholds::alert_thresholds_for(&t.db, &[])
            .await?
            .is_empty()
    );

    // Spend down to 30: the 50 threshold would fire in the alerts flow. Simulate that
    // it fired, then replace the list: the same amount keeps when it last fired.
    usage::record_usage(&t.db, usage_req(f.ws_a, "spend", 20_000_000), t0()).await?;
    assert_eq!(
        workspace(&t.db, f.ws_a).await?.balance_nanos,
        30_000_000_000
    );
    let fired_at = t0() + Duration::minutes(1);
    let fifty = saved[1].0.clone();
    let mut fired = fifty.clone().into_active_model();
    fired.armed = Set(false);
    fired.last_triggered_at = Set(Some(fired_at));
    fired.update(&t.db).await?;

    let later = t0() + Duration::hours(1);
    let replaced = billing::policies::alert_thresholds::set_alert_thresholds(
        &t.db,
        f.ws_a,
        vec![
            alert("50", vec![p.account_admin]),
            alert("25", vec![p.owner]),
        ],
        later,
    )
    .await?;
    assert_eq!(replaced.len(), 2);
    let (new_fifty, fifty_users) = &replaced[0];
    assert_ne!(new_fifty.id, fifty.id, "a new row");
    assert_eq!(new_fifty.amount_nanos, 50_000_000_000);
    assert!(!new_fifty.armed, "balance 30 is below 50");
    assert_eq!(new_fifty.last_triggered_at, Some(fired_at));
    assert_eq!(new_fifty.created_at, later);
    assert_eq!(fifty_users, &vec![p.account_admin]);
    let (twenty_five, _) = &replaced[1];
    assert!(twenty_five.armed, "balance 30 is above 25");
    assert_eq!(twenty_five.last_triggered_at, None);
    assert_eq!(count(&t.db, "alert_thresholds").await?, 2);
    assert_eq!(count(&t.db, "alert_recipients").await?, 2);
    assert!(
        alert_thresholds::Entity::find_by_id(fifty.id)
            .one(&t.db)
            .await?
            .is_none()
    );

    // Workspace B is independent; an empty list removes A's alerts.
    billing::policies::alert_thresholds::set_alert_thresholds(
        &t.db,
        f.ws_b,
        vec![alert("1", vec![p.member_b])],
        later,
    )
    .await?;
    assert!(
        billing::policies::alert_thresholds::set_alert_thresholds(&t.db, f.ws_a, vec![], later)
            .await?
            .is_empty()
    );
    assert_eq!(count(&t.db, "alert_thresholds").await?, 1);
    assert_eq!(count(&t.db, "alert_recipients").await?, 1);
    let map =
        billing::policies::alert_thresholds::alert_thresholds_for(&t.db, &[f.ws_a, f.ws_b]).await?;
    assert!(map[&f.ws_a].is_empty());
    assert_eq!(map[&f.ws_b][0].1, vec![p.member_b]);
    t.finish().await
}

// --- cost estimates ----------------------------------------------------------------

#[tokio::test]
async fn estimate_with_and_without_workspace_discount() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, t0()).await?;
    billing::catalog::upsert_model(&t.db, model_input("test/mini", "0.15", "0.6"), t0()).await?;
    billing::catalog::upsert_model(&t.db, model_input("test/per-token", "0.001", "0"), t0())
        .await?;
    fund(&t.db, f.ws_a, "10", t0()).await?;

    // No workspace: list price, no discount, no affordability.
    let e = billing::catalog::estimate_cost(&t.db, "test/mini", 1000, 1000, None, t0()).await?;
    assert_eq!(e.model.id, "test/mini");
    assert_eq!(e.breakdown.prompt_cost, nanos(150_000));
    assert_eq!(e.breakdown.completion_cost, nanos(600_000));
    assert_eq!(e.breakdown.discount, Credits::ZERO);
    assert_eq!(e.breakdown.total, nanos(750_000));
    assert_eq!(e.affordable, None);

    // A workspace whose account has no discount: same price, affordable.
    let e =
        billing::catalog::estimate_cost(&t.db, "test/mini", 1000, 1000, Some((f.ws_a, None)), t0())
            .await?;
    assert_eq!(e.breakdown.total, nanos(750_000));
    assert_eq!(e.affordable, Some(true));

    // 12.5 % off: 750 000 × 0.875 = 656 250 exactly.
    billing::catalog::set_pricing_agreement(
        &t.db,
        f.account_id,
        false,
        DiscountBps::parse_percent("12.5")?,
        30,
        t0(),
    )
    .await?;
    let e =
        billing::catalog::estimate_cost(&t.db, "test/mini", 1000, 1000, Some((f.ws_a, None)), t0())
            .await?;
    assert_eq!(e.breakdown.prompt_cost, nanos(150_000));
    assert_eq!(e.breakdown.completion_cost, nanos(600_000));
    assert_eq!(e.breakdown.discount, nanos(93_750));
    assert_eq!(e.breakdown.total, nanos(656_250));
    assert_eq!(e.affordable, Some(true));
    // Rounded up once, after the discount: 7 nanocredits × 0.875 = 6.125 → 7; 8 → 7.
    let e =
        billing::catalog::estimate_cost(&t.db, "test/per-token", 7, 0, Some((f.ws_a, None)), t0())
            .await?;
    assert_eq!(
        (e.breakdown.total, e.breakdown.discount),
        (nanos(7), Credits::ZERO)
    );
    let e =
        billing::catalog::estimate_cost(&t.db, "test/per-token", 8, 0, Some((f.ws_a, None)), t0())
            .await?;
    assert_eq!(
        (e.breakdown.total, e.breakdown.discount),
        (nanos(7), nanos(1))
    );
    // Without a workspace the discount still does not apply.
    let e = billing::catalog::estimate_cost(&t.db, "test/per-token", 8, 0, None, t0()).await?;
    assert_eq!(e.breakdown.total, nanos(8));

    // The estimate is what recording the usage actually charges.
    let e = billing::catalog::estimate_cost(&t.db, TEST_MODEL, 1234, 0, Some((f.ws_a, None)), t0())
        .await?;
    let recorded = usage::record_usage(&t.db, usage_req(f.ws_a, "r1", 1234), t0()).await?;
    assert_eq!(recorded.event.cost_nanos, e.breakdown.total.nanos());
    assert_eq!(e.breakdown.total, nanos(1_079_750)); // 1 234 000 × 0.875

    // Errors: unknown or retired model, tokens out of range, unknown workspace, a
    // project from another workspace.
    assert_invalid(
        billing::catalog::estimate_cost(&t.db, "nope/model", 1, 1, None, t0()).await,
        "unknown model nope/model",
    );
    billing::catalog::upsert_model(
        &t.db,
        ModelInput {
            active: false,
            ..model_input("test/per-token", "0.001", "0")
        },
        t0(),
    )
    .await?;
    assert_invalid(
        billing::catalog::estimate_cost(&t.db, "test/per-token", 1, 1, Some((f.ws_a, None)), t0())
            .await,
        "model test/per-token is no longer available",
    );
    assert_invalid(
        billing::catalog::estimate_cost(&t.db, TEST_MODEL, -1, 0, None, t0()).await,
        "promptTokens must be between 0 and",
    );
    assert_invalid(
        billing::catalog::estimate_cost(
            &t.db,
            TEST_MODEL,
            0,
            100_000_001,
            Some((f.ws_a, None)),
            t0(),
        )
        .await,
        "completionTokens must be between 0 and",
    );
    assert_code(
        billing::catalog::estimate_cost(
            &t.db,
            TEST_MODEL,
            1,
            1,
            Some((Uuid::now_v7(), None)),
            t0(),
        )
        .await,
        ErrorCode::NotFound,
    );
    let project_b = accounts::create_project(&t.db, f.ws_b, "B", "b", t0()).await?;
    assert_code(
        billing::catalog::estimate_cost(
            &t.db,
            TEST_MODEL,
            1,
            1,
            Some((f.ws_a, Some(project_b.id))),
            t0(),
        )
        .await,
        ErrorCode::NotFound,
    );
    t.finish().await
}

#[tokio::test]
async fn estimate_affordability_by_balance_and_budget() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let f = Fixture::new(&t.db, t0()).await?;
    fund(&t.db, f.ws_a, "5", t0()).await?;
    let affordable = |prompt_tokens: i64, project: Option<Uuid>, at: DateTime<Utc>| {
        let db = t.db.clone();
        let ws = f.ws_a;
        async move {
            billing::catalog::estimate_cost(
                &db,
                TEST_MODEL,
                prompt_tokens,
                0,
                Some((ws, project)),
                at,
            )
            .await
            .map(|e| e.affordable)
        }
    };

    // Balance 5 credits = 5 000 000 prompt tokens at 1 000 nanocredits each.
    assert_eq!(affordable(5_000_000, None, t0()).await?, Some(true));
    assert_eq!(affordable(5_000_001, None, t0()).await?, Some(false));
    // An empty workspace affords only free requests.
    let e = billing::catalog::estimate_cost(&t.db, TEST_MODEL, 0, 0, Some((f.ws_b, None)), t0())
        .await?;
    assert_eq!(e.affordable, Some(true));
    let e = billing::catalog::estimate_cost(&t.db, TEST_MODEL, 1, 0, Some((f.ws_b, None)), t0())
        .await?;
    assert_eq!(e.affordable, Some(false));

    // Held credits are not available: hold 1 credit, 4 are left.
    reservations::reserve(
        &t.db,
        ReserveRequest {
            workspace_id: f.ws_a,
            project: ProjectRef::None,
            model_id: TEST_MODEL.into(),
            max_prompt_tokens: 1_000_000,
            max_completion_tokens: 0,
            request_id: "hold".into(),
            ttl_seconds: 600,
            user_id: None,
            api_key_id: None,
        },
        t0(),
    )
    .await?;
    assert_eq!(affordable(4_000_000, None, t0()).await?, Some(true));
    assert_eq!(affordable(4_000_001, None, t0()).await?, Some(false));

    // A project capped at 1 credit a month, 0.6 of it spent this month.
    let project = accounts::create_project(&t.db, f.ws_a, "Bot", "bot", t0()).await?;
    accounts::set_project_budget(
        &t.db,
        project.id,
        Some(credits("1")),
        BudgetPeriod::Monthly,
        t0(),
    )
    .await?;
    usage::record_usage(
        &t.db,
        UsageRequest {
            project: ProjectRef::Id(project.id),
            ..usage_req(f.ws_a, "spend", 600_000)
        },
        t0(),
    )
    .await?;
    let pid = Some(project.id);
    assert_eq!(affordable(400_000, pid, t0()).await?, Some(true));
    assert_eq!(affordable(400_001, pid, t0()).await?, Some(false));
    // The same request is affordable for the workspace outside the project.
    assert_eq!(affordable(400_001, None, t0()).await?, Some(true));
    // The budget and the balance both have to allow it: 3.4 credits are available.
    assert_eq!(workspace(&t.db, f.ws_a).await?.balance_nanos, 4_400_000_000);

    // Next month the period has ended: the full limit counts, nothing is written.
    let next_month = Utc
        .with_ymd_and_hms(2026, 12, 2, 9, 0, 0)
        .single()
        .expect("valid time");
    let before = projects::Entity::find_by_id(project.id)
        .one(&t.db)
        .await?
        .expect("project");
    assert_eq!(affordable(1_000_000, pid, next_month).await?, Some(true));
    assert_eq!(affordable(1_000_001, pid, next_month).await?, Some(false));
    let after = projects::Entity::find_by_id(project.id)
        .one(&t.db)
        .await?
        .expect("project");
    assert_eq!(before, after, "an estimate writes nothing");
    assert_eq!(after.budget_spent_nanos, 600_000_000);

    // A project without a cap: only the balance matters (3.4 available).
    let free = accounts::create_project(&t.db, f.ws_a, "Free", "free", t0()).await?;
    assert_eq!(
        affordable(3_400_000, Some(free.id), t0()).await?,
        Some(true)
    );
    assert_eq!(
        affordable(3_400_001, Some(free.id), t0()).await?,
        Some(false)
    );
    t.finish().await
}
