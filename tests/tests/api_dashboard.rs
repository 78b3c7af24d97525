//! The dashboard query costs the same number of SQL statements however many
//! workspaces and projects it returns (DataLoaders batch every relation).
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::sea_orm::DatabaseConnection;
use reservoir_tests::app::App;
use reservoir_tests::{TEST_MODEL, TestDb, add_test_model, fund};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

const DASHBOARD: &str = r#"
query($id: ID!, $from: DateTime!, $to: DateTime!) {
  account(id: $id) {
    name totalBalance
    members { user { email } role }
    workspaces {
      id name balance reserved available
      members { user { name } role }
      projects { tag budget { limit spent remaining resetsAt } }
      spend { averageDailySpend(days: 7) projectedDepletionAt }
      usage(from: $from, to: $to, groupBy: [PROJECT, MEMBER, MODEL]) {
        requests cost
        rows { project { tag } user { email } model { id name } requests cost }
      }
    }
  }
}"#;

/// The page `reservoir-bench`'s dashboard scenario reads: three breakdowns, one chart
/// each.
const BREAKDOWNS: &str = r#"
query($id: ID!, $from: DateTime!, $to: DateTime!) {
  account(id: $id) {
    workspaces {
      id
      byProject: usage(from: $from, to: $to, groupBy: [PROJECT]) {
        requests cost
        rows { project { tag } requests cost }
      }
      byMember: usage(from: $from, to: $to, groupBy: [MEMBER]) {
        rows { user { email } requests cost }
      }
      byModel: usage(from: $from, to: $to, groupBy: [MODEL]) {
        rows { model { id name } requests cost }
      }
    }
  }
}"#;

/// The same page with one breakdown.
const ONE_BREAKDOWN: &str = r#"
query($id: ID!, $from: DateTime!, $to: DateTime!) {
  account(id: $id) {
    workspaces {
      id
      byProject: usage(from: $from, to: $to, groupBy: [PROJECT]) {
        requests cost
        rows { project { tag } requests cost }
      }
    }
  }
}"#;

/// Seeds an account with `workspaces` × `projects` and some usage on each project;
/// returns the account id and the owner's token.
async fn seed(
    db: &DatabaseConnection,
    workspaces: usize,
    projects: usize,
) -> anyhow::Result<(String, String)> {
    let now = chrono::Utc::now();
    let created =
        billing::accounts::create_account(db, "Big Co", "owner@big.example", "Owner", now).await?;
    for w in 0..workspaces {
        let ws =
            billing::accounts::create_workspace(db, created.account.id, &format!("ws-{w:02}"), now)
                .await?;
        fund(db, ws.id, "100", now).await?;
        billing::accounts::add_workspace_member(
            db,
            ws.id,
            &format!("m{w}@big.example"),
            None,
            billing::entity::enums::WorkspaceRole::Member,
            now,
        )
        .await?;
        for p in 0..projects {
            let project = billing::accounts::create_project(
                db,
                ws.id,
                &format!("Project {p}"),
                &format!("p{p}"),
                now,
            )
            .await?;
            billing::accounts::set_project_budget(
                db,
                project.id,
                Some(billing::Credits::parse("10")?),
                billing::entity::enums::BudgetPeriod::Monthly,
                now,
            )
            .await?;
            billing::debits::usage::record_usage(
                db,
                billing::debits::usage::UsageRequest {
                    workspace_id: ws.id,
                    project: billing::debits::usage::ProjectRef::Id(project.id),
                    model_id: TEST_MODEL.into(),
                    prompt_tokens: 1_000,
                    completion_tokens: 500,
                    request_id: format!("seed-{w}-{p}"),
                    user_id: Some(created.owner.id),
                    api_key_id: None,
                },
                now,
            )
            .await?;
        }
    }
    Ok((created.account.id.to_string(), created.owner_token))
}

/// Runs the dashboard against a fresh database and counts the SQL statements it took.
async fn statements_for(
    query: &str,
    workspaces: usize,
    projects: usize,
) -> anyhow::Result<(usize, serde_json::Value)> {
    let t = TestDb::new().await?;
    add_test_model(&t.db, chrono::Utc::now()).await?;
    let (account_id, token) = seed(&t.db, workspaces, projects).await?;
    let counter = Arc::new(AtomicUsize::new(0));
    let mut counted = t.second_pool().await?;
    let c = counter.clone();
    let log = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let l = log.clone();
    counted.set_metric_callback(move |info| {
        // The process's balance-event tailer polls on its own schedule: not the request's.
        if info.statement.sql.contains("\"balance_events\"") {
            return;
        }
        c.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut log) = l.lock() {
            log.push(info.statement.sql.chars().take(90).collect());
        }
    });
    let app = App::start_with(&counted).await?;
    let to = chrono::Utc::now() + chrono::Duration::days(1);
    let from = to - chrono::Duration::days(30);
    let vars = json!({ "id": account_id, "from": from.to_rfc3339(), "to": to.to_rfc3339() });
    // Warm-up (the first request may touch the pool differently), then measure.
    app.gql(Some(&token), query, vars.clone()).await?;
    counter.store(0, Ordering::Relaxed);
    if let Ok(mut log) = log.lock() {
        log.clear();
    }
    let response = app.gql(Some(&token), query, vars).await?;
    let statements = counter.load(Ordering::Relaxed);
    if let Ok(log) = log.lock() {
        eprintln!(
            "{workspaces}x{projects}: {statements} statements\n  {}",
            log.join("\n  ")
        );
    }
    app.stop().await;
    t.finish().await?;
    Ok((statements, response))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_query_does_not_grow_with_rows() -> anyhow::Result<()> {
    let (small, small_response) = statements_for(DASHBOARD, 2, 2).await?;
    let (large, large_response) = statements_for(DASHBOARD, 20, 10).await?;
    assert!(small_response["errors"].is_null(), "{small_response}");
    assert!(large_response["errors"].is_null(), "{large_response}");
    let workspaces = large_response["data"]["account"]["workspaces"]
        .as_array()
        .map(Vec::len);
    assert_eq!(workspaces, Some(20));
    let first = &large_response["data"]["account"]["workspaces"][0];
    assert_eq!(first["projects"].as_array().map(Vec::len), Some(10));
    assert_eq!(first["usage"]["requests"], 10);
    assert_eq!(first["usage"]["rows"].as_array().map(Vec::len), Some(10));
    // 1,000 prompt + 500 completion tokens at 1 and 2 credits per million: 0.002 each.
    assert_eq!(first["usage"]["cost"], "0.02");
    assert_eq!(first["projects"][0]["budget"]["spent"], "0.002");
    eprintln!("dashboard statements: 2x2 = {small}, 20x10 = {large}");
    assert_eq!(
        small, large,
        "SQL statements must not grow with the number of workspaces and projects"
    );
    Ok(())
}

/// A page's breakdowns by project, member and model (of every workspace on it) are
/// one SQL statement: the page with three costs what the page with one does, and
/// their figures agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_breakdowns_cost_one_statement() -> anyhow::Result<()> {
    let (one, one_response) = statements_for(ONE_BREAKDOWN, 3, 4).await?;
    let (three, response) = statements_for(BREAKDOWNS, 3, 4).await?;
    assert!(response["errors"].is_null(), "{response}");
    assert!(one_response["errors"].is_null(), "{one_response}");
    // Three breakdowns add the members' and models' lookups for their rows, and not
    // one statement of usage.
    assert_eq!(three, one + 2, "three breakdowns: {three}, one: {one}");
    let first = &response["data"]["account"]["workspaces"][0];
    assert_eq!(
        first["byProject"],
        one_response["data"]["account"]["workspaces"][0]["byProject"]
    );
    assert_eq!(first["byProject"]["requests"], 4);
    assert_eq!(first["byProject"]["rows"].as_array().map(Vec::len), Some(4));
    // Every seeded call was the owner's, on the test model.
    assert_eq!(first["byMember"]["rows"][0]["requests"], 4);
    assert_eq!(
        first["byMember"]["rows"][0]["user"]["email"],
        "owner@big.example"
    );
    assert_eq!(first["byModel"]["rows"][0]["model"]["id"], TEST_MODEL);
    assert_eq!(
        first["byModel"]["rows"][0]["cost"],
        first["byProject"]["cost"]
    );
    Ok(())
}

/// A reversed window asked of two workspaces fails inside one batched loader call,
/// which shares its error between both fields: each keeps the error's own code
/// (INVALID_INPUT), never INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversed_range_over_two_workspaces_is_invalid_input() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    add_test_model(&t.db, chrono::Utc::now()).await?;
    let (account_id, token) = seed(&t.db, 2, 1).await?;
    let app = App::start(&t).await?;
    let from = chrono::Utc::now();
    let to = from - chrono::Duration::days(7);
    let query = r#"query($id: ID!, $from: DateTime!, $to: DateTime!) {
      account(id: $id) { workspaces { id usage(from: $from, to: $to) { requests cost } } }
    }"#;
    let vars = json!({ "id": account_id, "from": from.to_rfc3339(), "to": to.to_rfc3339() });
    let response = app.gql(Some(&token), query, vars).await?;
    app.stop().await;
    let errors = response["errors"].as_array().cloned().unwrap_or_default();
    assert!(!errors.is_empty(), "{response}");
    assert_eq!(reservoir_tests::app::code(&response), Some("INVALID_INPUT"));
    for error in &errors {
        assert_eq!(error["extensions"]["code"], "INVALID_INPUT", "{response}");
        assert_eq!(error["path"][3], "usage", "{response}");
    }
    t.finish().await?;
    Ok(())
}
