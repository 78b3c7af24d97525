//! The API app as the launcher builds it, bound to port 0, driven over real HTTP.

use billing::accounts;
use reservoir_tests::{Fixture, TEST_MODEL, TestDb, fund};
use serde_json::{Value, json};
use std::net::TcpListener;

const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef0123";

struct App {
    base: String,
    client: reqwest::Client,
    handle: actix_web::dev::ServerHandle,
}

impl App {
    async fn start(t: &TestDb) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let config = api::ApiConfig {
            admin_token: Some(ADMIN_TOKEN.into()),
            workers: 1,
            ..Default::default()
        };
        let (handle, addr, _join) = api::spawn(listener, t.db.clone(), config)?;
        Ok(Self {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            handle,
        })
    }

    async fn gql(
        &self,
        token: Option<&str>,
        query: &str,
        variables: Value,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .client
            .post(format!("{}/graphql", self.base))
            .json(&json!({ "query": query, "variables": variables }));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        Ok(req.send().await?.json().await?)
    }
}

fn code(response: &Value) -> Option<&str> {
    response["errors"][0]["extensions"]["code"].as_str()
}

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
