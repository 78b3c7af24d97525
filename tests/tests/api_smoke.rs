//! The API app as the launcher builds it, bound to port 0, driven over real HTTP.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::accounts;
use reservoir_tests::app::{ADMIN_TOKEN, App, code};
use reservoir_tests::{Fixture, TEST_MODEL, TestDb, fund};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_answers_health_auth_reads_and_usage() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    let token = accounts::create_user_token(&t.db, f.owner_id, "test", now).await?;
    let app = App::start(&t).await?;

    let health = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await?;
    assert!(health.status().is_success());
    let ready = app
        .client
        .get(format!("{}/readyz", app.base))
        .send()
        .await?;
    assert!(ready.status().is_success());

    // No token, or a wrong one: UNAUTHENTICATED.
    let anonymous = app
        .gql(None, "{ viewer { accounts { id } } }", json!({}))
        .await?;
    assert_eq!(code(&anonymous), Some("UNAUTHENTICATED"));
    let wrong = app
        .gql(Some("rsv_u_not-a-token"), "{ models { id } }", json!({}))
        .await?;
    assert_eq!(code(&wrong), Some("UNAUTHENTICATED"));

    let me = app
        .gql(
            Some(&token),
            "{ viewer { user { email } accounts { totalBalance workspaces { name balance } } } }",
            json!({}),
        )
        .await?;
    assert_eq!(me["data"]["viewer"]["user"]["email"], "owner@test.example");
    assert_eq!(me["data"]["viewer"]["accounts"][0]["totalBalance"], "5");
    // Using a token records when it was last used (at most once a minute).
    use billing::sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    let used = billing::entity::user_tokens::Entity::find()
        .filter(
            billing::entity::user_tokens::Column::TokenHash
                .eq(billing::accounts::auth::hash_secret(&token)),
        )
        .one(&t.db)
        .await?
        .and_then(|row| row.last_used_at);
    assert!(used.is_some(), "lastUsedAt recorded");

    let record =
        "mutation($input: RecordUsageInput!) { recordUsage(input: $input) { requestId cost } }";
    let input = |request_id: &str, tokens: i32| json!({ "input": { "workspaceId": f.ws_a.to_string(), "modelId": TEST_MODEL, "promptTokens": tokens, "completionTokens": 0, "requestId": request_id } });
    let ok = app.gql(Some(&token), record, input("r1", 1_500)).await?;
    assert_eq!(ok["data"]["recordUsage"]["cost"], "0.0015", "{ok}");
    let refused = app
        .gql(Some(&token), record, input("r2", 5_000_000))
        .await?;
    assert_eq!(code(&refused), Some("INSUFFICIENT_CREDITS"));
    assert_eq!(refused["errors"][0]["extensions"]["available"], "4.9985");

    // Another account's workspace does not exist for this caller.
    let other =
        accounts::create_account(&t.db, "Other", "other@test.example", "Other", now).await?;
    let theirs = accounts::create_workspace(&t.db, other.account.id, "Theirs", now).await?;
    let probe = app
        .gql(
            Some(&token),
            "query($id: ID!) { workspace(id: $id) { balance } }",
            json!({ "id": theirs.id.to_string() }),
        )
        .await?;
    assert_eq!(probe["data"]["workspace"], Value::Null);
    let write = app.gql(Some(&token), record, json!({ "input": { "workspaceId": theirs.id.to_string(), "modelId": TEST_MODEL, "promptTokens": 1, "completionTokens": 0, "requestId": "x" } })).await?;
    assert_eq!(code(&write), Some("NOT_FOUND"));

    // The platform admin token sees every account.
    let admin = app
        .gql(
            Some(ADMIN_TOKEN),
            "{ viewer { accounts { name } } }",
            json!({}),
        )
        .await?;
    assert_eq!(
        admin["data"]["viewer"]["accounts"].as_array().map(Vec::len),
        Some(2)
    );

    app.handle.stop(true).await;
    t.finish().await
}

#[tokio::test]
async fn credit_packages_are_listed_with_exact_amounts() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let app = App::start(&t).await?;
    let response = app
        .gql(
            Some(ADMIN_TOKEN),
            "{ creditPackages { id amount price bonus } }",
            json!({}),
        )
        .await?;
    let packages = response["data"]["creditPackages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(packages.len(), 6);
    assert_eq!(
        packages[2],
        json!({ "id": "pkg_50", "amount": "50", "price": "50", "bonus": "5" })
    );
    app.handle.stop(true).await;
    t.finish().await
}

#[test]
fn schema_graphql_matches_the_code() {
    let generated = api::schema_sdl(billing::sea_orm::DatabaseConnection::default());
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../schema.graphql");
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        generated == checked_in,
        "schema.graphql is out of date: run `cargo run -- export-schema --out schema.graphql`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_pages_follow_cursors_and_estimates_apply_the_discount() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    for i in 0..7 {
        let req = billing::debits::usage::UsageRequest {
            workspace_id: f.ws_a,
            project: billing::debits::usage::ProjectRef::None,
            model_id: TEST_MODEL.into(),
            prompt_tokens: 100 * (i + 1),
            completion_tokens: 0,
            request_id: format!("p{i}"),
            user_id: None,
            api_key_id: None,
        };
        billing::debits::usage::record_usage(&t.db, req, now).await?;
    }
    let token = accounts::create_user_token(&t.db, f.owner_id, "t", now).await?;
    let app = App::start(&t).await?;
    let page = "query($id: ID!, $after: String) { workspace(id: $id) { ledger(first: 3, after: $after) { edges { cursor node { kind amount balanceAfter usage { requestId } } } pageInfo { hasNextPage endCursor } } } }";
    let mut after = Value::Null;
    let mut seen = Vec::new();
    loop {
        let r = app
            .gql(
                Some(&token),
                page,
                json!({ "id": f.ws_a.to_string(), "after": after }),
            )
            .await?;
        let ledger = &r["data"]["workspace"]["ledger"];
        for edge in ledger["edges"].as_array().cloned().unwrap_or_default() {
            seen.push((
                edge["node"]["kind"].as_str().unwrap_or_default().to_owned(),
                edge["node"]["amount"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ));
        }
        if ledger["pageInfo"]["hasNextPage"] != true {
            break;
        }
        after = ledger["pageInfo"]["endCursor"].clone();
    }
    // Newest first: 7 usage debits, then the purchase.
    assert_eq!(seen.len(), 8, "{seen:?}");
    assert_eq!(seen[0], ("USAGE".to_owned(), "-0.0007".to_owned()));
    assert_eq!(seen[7], ("PURCHASE".to_owned(), "5".to_owned()));
    let bad = app
        .gql(
            Some(&token),
            page,
            json!({ "id": f.ws_a.to_string(), "after": "garbage" }),
        )
        .await?;
    assert_eq!(code(&bad), Some("INVALID_INPUT"));

    // A 12.5 % discount, agreed by the platform admin, applies to estimates with a workspace.
    let agree = "mutation($input: SetPricingAgreementInput!) { setPricingAgreement(input: $input) { volumeDiscountPercent } }";
    let input = json!({ "input": { "accountId": f.account_id.to_string(), "verified": true, "volumeDiscountPercent": "12.5", "paymentTermsDays": 30 } });
    let r = app.gql(Some(ADMIN_TOKEN), agree, input.clone()).await?;
    assert_eq!(
        r["data"]["setPricingAgreement"]["volumeDiscountPercent"], "12.5",
        "{r}"
    );
    assert_eq!(
        code(&app.gql(Some(&token), agree, input).await?),
        Some("FORBIDDEN")
    );
    let estimate = "query($ws: ID) { estimateCost(modelId: \"test/linear\", promptTokens: 1000, completionTokens: 1000, workspaceId: $ws) { promptCost completionCost discount total affordable model { id } } }";
    let list = app
        .gql(Some(&token), estimate, json!({ "ws": Value::Null }))
        .await?;
    assert_eq!(
        list["data"]["estimateCost"],
        json!({ "promptCost": "0.001", "completionCost": "0.002", "discount": "0", "total": "0.003", "affordable": null, "model": { "id": TEST_MODEL } })
    );
    let discounted = app
        .gql(Some(&token), estimate, json!({ "ws": f.ws_a.to_string() }))
        .await?;
    assert_eq!(
        discounted["data"]["estimateCost"]["total"], "0.002625",
        "{discounted}"
    );
    assert_eq!(discounted["data"]["estimateCost"]["discount"], "0.000375");
    assert_eq!(discounted["data"]["estimateCost"]["affordable"], true);
    app.stop().await;
    t.finish().await
}

/// A ledger entry that posts a debit batch's events of its workspace lists them, oldest
/// first, page by page; a one-event entry keeps its `usage` (docs/LEDGER.md §3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_entry_lists_the_usage_events_it_posts() -> anyhow::Result<()> {
    use billing::debits::writer::{DebitWriter, WriterConfig};
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    // A long window: the three debits land in one batch, in this order.
    let config = WriterConfig {
        window_us: 50_000,
        ..WriterConfig::for_backend(t.db.get_database_backend())
    };
    let writer = DebitWriter::start(t.db.clone(), config, None)?;
    let ids = ["b0", "b1", "b2"];
    let sent = ids
        .iter()
        .map(|id| writer.record_usage(reservoir_tests::usage_req(f.ws_a, id, 1_000), now));
    for recorded in futures::future::join_all(sent).await {
        recorded?;
    }
    let lone = reservoir_tests::usage_req(f.ws_a, "lone", 2_000);
    billing::debits::usage::record_usage(&t.db, lone, now).await?;

    let token = accounts::create_user_token(&t.db, f.owner_id, "t", now).await?;
    let app = App::start(&t).await?;
    let query = "query($id: ID!, $after: String) { workspace(id: $id) { ledger(first: 2) { edges { node { kind amount description usage { requestId } usageEvents(first: 2, after: $after) { edges { node { requestId } } pageInfo { hasNextPage endCursor } } } } } } }";
    let ask = |after: Value| {
        app.gql(
            Some(&token),
            query,
            json!({ "id": f.ws_a.to_string(), "after": after }),
        )
    };
    let first = ask(Value::Null).await?;
    let entries = &first["data"]["workspace"]["ledger"]["edges"];
    // Newest first: the lone debit, then the batch.
    let lone = &entries[0]["node"];
    assert_eq!(lone["usage"]["requestId"], "lone", "{first}");
    assert_eq!(lone["amount"], "-0.002");
    assert_eq!(lone["usageEvents"]["edges"][0]["node"]["requestId"], "lone");
    let batch = &entries[1]["node"];
    assert_eq!(batch["kind"], "USAGE");
    assert_eq!(batch["amount"], "-0.003");
    assert_eq!(batch["description"], "usage of 3 requests");
    assert_eq!(batch["usage"], Value::Null);
    let page = &batch["usageEvents"];
    let request_ids = |page: &Value| -> Vec<String> {
        page["edges"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|e| {
                e["node"]["requestId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(request_ids(page), ["b0", "b1"]);
    assert_eq!(page["pageInfo"]["hasNextPage"], true);
    let second = ask(page["pageInfo"]["endCursor"].clone()).await?;
    let rest = &second["data"]["workspace"]["ledger"]["edges"][1]["node"]["usageEvents"];
    assert_eq!(request_ids(rest), ["b2"]);
    assert_eq!(rest["pageInfo"]["hasNextPage"], false);
    app.stop().await;
    t.finish().await
}

/// In `reservoir serve` the API's `/readyz` also covers the job workers running in the
/// process: 503 with their reason while they cannot poll, 200 once they can (read per
/// request from the workers' state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_covers_the_job_workers_of_the_process() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    struct Workers(AtomicBool);
    impl billing::jobs::WorkerReadiness for Workers {
        fn unready(&self) -> Option<String> {
            (!self.0.load(Ordering::SeqCst)).then(|| "job workers down: email".to_owned())
        }
    }
    let t = TestDb::new().await?;
    let workers = Arc::new(Workers(AtomicBool::new(false)));
    let config = api::ApiConfig {
        workers: 1,
        worker_readiness: Some(workers.clone()),
        ..Default::default()
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let (handle, addr, _join) = api::spawn(listener, t.second_pool().await?, config)?;
    let client = reservoir_tests::app::http_client();
    let readyz = || async {
        let r = client.get(format!("http://{addr}/readyz")).send().await?;
        anyhow::Ok((r.status().as_u16(), r.text().await?))
    };
    // Until the first database ping answers, the database is the reason.
    let mut answer = readyz().await?;
    for _ in 0..100 {
        if answer.1 != "database unreachable" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        answer = readyz().await?;
    }
    assert_eq!(answer, (503, "job workers down: email".to_owned()));
    workers.0.store(true, Ordering::SeqCst);
    assert_eq!(readyz().await?, (200, "ready".to_owned()));
    handle.stop(true).await;
    Ok(())
}

/// An API key revoked by another process is refused here as soon as one of this
/// process's debit batches has read the configuration version the revocation moved,
/// even though the credential cache would trust the key for another minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_elsewhere_is_refused_after_the_next_batch() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    let pool = t.second_pool().await?;
    let app = App::start_configured(&pool, |c| c.credential_cache_ttl_ms = 60_000).await?;
    let key = accounts::create_api_key(&t.db, f.ws_a, "gateway", None, now).await?;
    let other = accounts::create_api_key(&t.db, f.ws_a, "other", None, now).await?;
    let record = "mutation($input: RecordUsageInput!) { recordUsage(input: $input) { requestId } }";
    let input = |request_id: &str| json!({ "input": { "workspaceId": f.ws_a.to_string(), "modelId": TEST_MODEL, "promptTokens": 10, "completionTokens": 0, "requestId": request_id } });
    let ok = app.gql(Some(&key.secret), record, input("k1")).await?;
    assert_eq!(ok["data"]["recordUsage"]["requestId"], "k1", "{ok}");
    // Another process revokes the key (the test's own pool, not the app's).
    accounts::revoke_api_key(&t.db, key.api_key.id, chrono::Utc::now()).await?;
    let ok = app.gql(Some(&other.secret), record, input("o1")).await?;
    assert_eq!(ok["data"]["recordUsage"]["requestId"], "o1", "{ok}");
    let refused = app.gql(Some(&key.secret), record, input("k2")).await?;
    assert_eq!(code(&refused), Some("UNAUTHENTICATED"), "{refused}");
    app.stop().await;
    t.finish().await
}
