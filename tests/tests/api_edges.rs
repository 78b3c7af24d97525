//! Behaviour at the edges: bad input gets a clear error with a stable code and writes
//! nothing; limits are enforced; internal errors say nothing about SQL.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use reservoir_tests::app::{ADMIN_TOKEN, App, code};
use reservoir_tests::{Fixture, TEST_MODEL, TestDb, fund, money_row_counts};
use serde_json::{Value, json};

const RECORD: &str =
    "mutation($input: RecordUsageInput!) { recordUsage(input: $input) { id cost } }";

fn usage(ws: &str, request_id: &str, prompt_tokens: Value, model: &str) -> Value {
    json!({ "input": { "workspaceId": ws, "modelId": model, "promptTokens": prompt_tokens, "completionTokens": 0, "requestId": request_id } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_code_and_writes_nothing() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    let token = billing::accounts::create_user_token(&t.db, f.owner_id, "t", now).await?;
    let app = App::start(&t).await?;
    let ws = f.ws_a.to_string();
    let before = money_row_counts(&t.db).await?;

    // Negative tokens, an unknown model, a huge token count, an empty request id.
    for (vars, expected) in [
        (usage(&ws, "neg", json!(-1), TEST_MODEL), "INVALID_INPUT"),
        (
            usage(&ws, "unknown", json!(10), "nope/unknown-model"),
            "INVALID_INPUT",
        ),
        (
            usage(&ws, "huge", json!(2_000_000_000), TEST_MODEL),
            "INVALID_INPUT",
        ),
        (usage(&ws, "", json!(10), TEST_MODEL), "INVALID_INPUT"),
        // A string where an Int belongs, and a float.
        (usage(&ws, "str", json!("10"), TEST_MODEL), "INVALID_INPUT"),
        (usage(&ws, "float", json!(1.5), TEST_MODEL), "INVALID_INPUT"),
    ] {
        let response = app.gql(Some(&token), RECORD, vars.clone()).await?;
        assert_eq!(code(&response), Some(expected), "{vars} -> {response}");
        assert!(
            response["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }

    // Credits: a 10-fractional-digit amount, and a JSON number where a string belongs.
    let transfer =
        "mutation($input: TransferCreditsInput!) { transferCredits(input: $input) { id } }";
    for amount in [
        json!("1.0000000001"),
        json!(1.5),
        json!(1),
        json!("1e3"),
        json!("-0.5"),
    ] {
        let vars = json!({ "input": { "fromWorkspaceId": ws, "toWorkspaceId": f.ws_b.to_string(), "amount": amount, "idempotencyKey": "k" } });
        let response = app.gql(Some(&token), transfer, vars).await?;
        assert_eq!(
            code(&response),
            Some("INVALID_INPUT"),
            "amount {amount}: {response}"
        );
    }

    // A batch over the limit is refused as a whole.
    let batch: Vec<Value> = (0..1_001)
        .map(|i| json!({ "workspaceId": ws, "modelId": TEST_MODEL, "promptTokens": 1, "completionTokens": 0, "requestId": format!("b{i}") }))
        .collect();
    let response = app
        .gql(Some(&token), "mutation($inputs: [RecordUsageInput!]!) { recordUsageBatch(inputs: $inputs) { errorCode } }", json!({ "inputs": batch }))
        .await?;
    assert_eq!(code(&response), Some("LIMIT_EXCEEDED"), "{response}");

    // A page larger than the maximum.
    let page = app
        .gql(
            Some(&token),
            "query($id: ID!) { workspace(id: $id) { ledger(first: 1000) { edges { cursor } } } }",
            json!({ "id": ws }),
        )
        .await?;
    assert_eq!(code(&page), Some("LIMIT_EXCEEDED"), "{page}");

    // A deeply nested query.
    let mut deep = String::from("id");
    for _ in 0..15 {
        deep = format!("workspace {{ account {{ workspaces {{ {deep} }} }} }}");
    }
    let query = format!("query($id: ID!) {{ workspace(id: $id) {{ projects {{ {deep} }} }} }}");
    let response = app.gql(Some(&token), &query, json!({ "id": ws })).await?;
    assert_eq!(code(&response), Some("LIMIT_EXCEEDED"), "{response}");

    // Malformed JSON and a body over the size limit.
    let (status, body) = app.raw(&token, "{ not json".into()).await?;
    assert!(status == 400 || body.contains("errors"), "{status} {body}");
    let big = format!(
        "{{\"query\": \"{{ viewer {{ accounts {{ id }} }} }}\", \"variables\": {{\"pad\": \"{}\"}}}}",
        "x".repeat(3 * 1024 * 1024)
    );
    let (status, _) = app.raw(&token, big).await?;
    assert_eq!(status, 413, "a body over the limit is refused");

    assert_eq!(
        money_row_counts(&t.db).await?,
        before,
        "nothing was written"
    );
    app.stop().await;
    t.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_error_hides_its_cause_and_carries_a_request_id() -> anyhow::Result<()> {
    use billing::sea_orm::{ConnectionTrait, Statement};
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    let token = billing::accounts::create_user_token(&t.db, f.owner_id, "t", now).await?;
    let app = App::start(&t).await?;
    // Break the database under the app: the rollup table disappears.
    t.db.execute_raw(Statement::from_string(
        t.db.get_database_backend(),
        "DROP TABLE usage_daily",
    ))
    .await?;
    let response = app
        .gql(
            Some(&token),
            RECORD,
            usage(&f.ws_a.to_string(), "r1", json!(10), TEST_MODEL),
        )
        .await?;
    assert_eq!(code(&response), Some("INTERNAL"), "{response}");
    let message = response["errors"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    let request_id = response["errors"][0]["extensions"]["requestId"]
        .as_str()
        .unwrap_or_default();
    assert!(
        !request_id.is_empty() && message.contains(request_id),
        "{response}"
    );
    for leak in [
        "usage_daily",
        "sql",
        "table",
        "insert",
        "postgres",
        "sqlite",
    ] {
        assert!(
            !message.contains(leak),
            "the message leaks {leak:?}: {message}"
        );
    }
    // The failed debit wrote nothing.
    assert_eq!(
        reservoir_tests::workspace(&t.db, f.ws_a)
            .await?
            .balance_nanos,
        10_000_000_000
    );
    app.stop().await;
    Ok(()) // the schema is broken on purpose: no invariant check
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_endpoints_answer() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    let app = App::start(&t).await?;
    let ws = f.ws_a.to_string();
    app.gql(
        Some(ADMIN_TOKEN),
        RECORD,
        usage(&ws, "ok", json!(10), TEST_MODEL),
    )
    .await?;
    app.gql(
        Some(ADMIN_TOKEN),
        RECORD,
        usage(&ws, "big", json!(50_000_000), TEST_MODEL),
    )
    .await?;
    app.gql(Some(ADMIN_TOKEN), "{ nope }", json!({})).await?;
    let metrics = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains(
            "reservoir_graphql_requests_total{operation=\"recordUsage\",outcome=\"ok\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("reservoir_graphql_requests_total{operation=\"recordUsage\",outcome=\"INSUFFICIENT_CREDITS\"} 1"), "{metrics}");
    assert!(
        metrics.contains("reservoir_usage_debits_total{outcome=\"admitted\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("reservoir_graphql_request_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(metrics.contains("reservoir_subscribers 0"), "{metrics}");
    // A request refused by validation is counted under its final code.
    let refused =
        "reservoir_graphql_requests_total{operation=\"other\",outcome=\"INVALID_INPUT\"} 1";
    assert!(metrics.contains(refused), "{metrics}");
    app.stop().await;
    t.finish().await
}

/// `/metrics` reads the background work's backlog from the database: e-mails due and
/// not sent (with how long the oldest has been due), DEAD ones, and zero for kinds with
/// nothing waiting.
#[tokio::test]
async fn metrics_show_the_job_backlog() -> anyhow::Result<()> {
    use billing::policies::notifications::{self as notes, LowBalanceAlert, NotificationPayload};
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let owner = ["owner@test.example".to_owned()];
    let mut ids = Vec::new();
    for key in ["waiting", "dead"] {
        let payload = NotificationPayload::LowBalanceAlert(LowBalanceAlert {
            workspace_id: f.ws_a,
            workspace_name: "A".into(),
            severity: billing::entity::enums::AlertSeverity::Warning,
            threshold: billing::Credits::from_nanos(1),
            balance: billing::Credits::from_nanos(0),
            projected_depletion_at: None,
        });
        let written = notes::enqueue_notification(
            &t.db,
            Some(f.account_id),
            Some(f.ws_a),
            &owner,
            &payload,
            key,
            now - chrono::Duration::minutes(10),
        )
        .await?;
        ids.push(written.ok_or_else(|| anyhow::anyhow!("not written"))?);
    }
    let one = billing::retry::RetryPolicy {
        attempts_max: 1,
        ..billing::retry::RetryPolicy::NOTIFICATIONS
    };
    notes::record_failure(&t.db, ids[1], "550", &one, now).await?;
    let app = App::start(&t).await?;
    let metrics = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await?
        .text()
        .await?;
    let value = |line: &str| -> Option<f64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line))
            .and_then(|v| v.trim().parse().ok())
    };
    assert_eq!(
        value("reservoir_jobs_waiting{kind=\"email\"}"),
        Some(1.0),
        "{metrics}"
    );
    let oldest = value("reservoir_jobs_oldest_waiting_seconds{kind=\"email\"}").unwrap_or(0.0);
    assert!((600.0..900.0).contains(&oldest), "{metrics}");
    assert_eq!(value("reservoir_jobs_dead{kind=\"email\"}"), Some(1.0));
    assert_eq!(value("reservoir_jobs_waiting{kind=\"capture\"}"), Some(0.0));
    assert_eq!(
        value("reservoir_jobs_oldest_waiting_seconds{kind=\"webhook\"}"),
        Some(0.0)
    );
    assert!(
        metrics.contains("reservoir_job_runs_total{kind=\"email\",outcome=\"done\"}"),
        "{metrics}"
    );
    app.stop().await;
    t.finish().await
}
