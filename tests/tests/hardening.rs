//! Hostile input, as an attacker would send it: every money and settings mutation fed
//! bad values answers a stable code (never INTERNAL) and writes nothing; documents that
//! amplify (aliases, directives, money fields) are bounded; the WebSocket handshake
//! closes with the protocol's codes; usage and failed logins are rate limited; the full
//! introspection query works (and can be switched off); a fuzz over the scalars and
//! the document limits never panics.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use futures::{SinkExt as _, StreamExt as _};
use proptest::prelude::*;
use reservoir_tests::app::{ADMIN_TOKEN, App, code};
use reservoir_tests::{Fixture, TEST_MODEL, TestDb, count, fund};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// Row counts of every table of the schema: a refusal must leave all of them as
/// they were.
async fn snapshot(db: &DatabaseConnection) -> anyhow::Result<Vec<(String, i64)>> {
    let sql = match db.get_database_backend() {
        billing::sea_orm::DbBackend::Sqlite => {
            "SELECT name AS t FROM sqlite_master WHERE type = 'table' \
             AND name NOT LIKE 'sqlite_%' AND name <> 'seaql_migrations' ORDER BY name"
        }
        _ => {
            "SELECT table_name AS t FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_name <> 'seaql_migrations' ORDER BY table_name"
        }
    };
    let rows = db
        .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await?;
    let mut counts = Vec::new();
    for row in rows {
        let table: String = row.try_get("", "t")?;
        let n = count(db, &table).await?;
        counts.push((table, n));
    }
    Ok(counts)
}

const NUL: &str = "a\u{0}b";
const BELL: &str = "ring\u{7}";

/// One hostile call: a document, its variables, and who sends it.
struct Case {
    what: String,
    query: &'static str,
    vars: Value,
    admin: bool,
}

fn case(what: impl Into<String>, query: &'static str, vars: Value) -> Case {
    Case {
        what: what.into(),
        query,
        vars,
        admin: false,
    }
}

fn admin(what: impl Into<String>, query: &'static str, vars: Value) -> Case {
    Case {
        admin: true,
        ..case(what, query, vars)
    }
}

const CREATE_WORKSPACE: &str =
    "mutation($i: CreateWorkspaceInput!) { createWorkspace(input: $i) { id } }";
const CREATE_PROJECT: &str =
    "mutation($i: CreateProjectInput!) { createProject(input: $i) { id } }";
const ADD_MEMBER: &str =
    "mutation($i: AddWorkspaceMemberInput!) { addWorkspaceMember(input: $i) { role } }";
const CREATE_KEY: &str = "mutation($i: CreateApiKeyInput!) { createApiKey(input: $i) { secret } }";
const CREATE_TOKEN: &str =
    "mutation($i: CreateUserTokenInput!) { createUserToken(input: $i) { token } }";
const ADD_CARD: &str =
    "mutation($i: AddPaymentMethodInput!) { addPaymentMethod(input: $i) { id } }";
const PURCHASE: &str = "mutation($i: PurchaseCreditsInput!) { purchaseCredits(input: $i) { id } }";
const RECORD: &str = "mutation($i: RecordUsageInput!) { recordUsage(input: $i) { id } }";
const RESERVE: &str = "mutation($i: ReserveCreditsInput!) { reserveCredits(input: $i) { id } }";
const SETTLE: &str =
    "mutation($i: SettleReservationInput!) { settleReservation(input: $i) { id } }";
const RELEASE: &str = "mutation($id: ID!) { releaseReservation(id: $id) { id } }";
const TRANSFER: &str = "mutation($i: TransferCreditsInput!) { transferCredits(input: $i) { id } }";
const BUDGET: &str = "mutation($i: SetProjectBudgetInput!) { setProjectBudget(input: $i) { id } }";
const RELOAD: &str =
    "mutation($i: ConfigureAutoReloadInput!) { configureAutoReload(input: $i) { enabled } }";
const ALERTS: &str =
    "mutation($i: SetAlertThresholdsInput!) { setAlertThresholds(input: $i) { amount } }";
const PRICING: &str =
    "mutation($i: SetPricingAgreementInput!) { setPricingAgreement(input: $i) { id } }";
const INVOICE_PAID: &str = "mutation($id: ID!) { markInvoicePaid(id: $id) { id } }";
const MODEL: &str = "mutation($i: UpsertModelInput!) { upsertModel(input: $i) { id } }";
const REVOKE_KEY: &str = "mutation($id: ID!) { revokeApiKey(id: $id) { id } }";
const REMOVE_CARD: &str = "mutation($id: ID!) { removePaymentMethod(id: $id) }";

/// The ids the cases aim at: ours, another account's, and nobody's.
struct Ids {
    account: String,
    ws: String,
    ws_b: String,
    project: String,
    owner: String,
    foreign_account: String,
    foreign_ws: String,
    foreign_user: String,
    unknown: String,
}

fn text_cases(ids: &Ids) -> Vec<Case> {
    let mega = "x".repeat(1024 * 1024);
    let mut cases = Vec::new();
    for (label, bad) in [("NUL", NUL), ("control", BELL), ("1 MB", mega.as_str())] {
        cases.extend([
            case(format!("workspace name {label}"), CREATE_WORKSPACE, json!({"i": {"accountId": ids.account, "name": bad}})),
            case(format!("project name {label}"), CREATE_PROJECT, json!({"i": {"workspaceId": ids.ws, "name": bad, "tag": "t1"}})),
            case(format!("project tag {label}"), CREATE_PROJECT, json!({"i": {"workspaceId": ids.ws, "name": "P", "tag": bad}})),
            case(format!("member email {label}"), ADD_MEMBER, json!({"i": {"workspaceId": ids.ws, "email": bad, "role": "MEMBER"}})),
            case(format!("member name {label}"), ADD_MEMBER, json!({"i": {"workspaceId": ids.ws, "email": "new@x.example", "name": bad, "role": "MEMBER"}})),
            case(format!("key name {label}"), CREATE_KEY, json!({"i": {"workspaceId": ids.ws, "name": bad}})),
            case(format!("token name {label}"), CREATE_TOKEN, json!({"i": {"userId": ids.owner, "name": bad}})),
            case(format!("card token {label}"), ADD_CARD, json!({"i": {"accountId": ids.account, "token": bad}})),
            case(format!("purchase key {label}"), PURCHASE, json!({"i": {"workspaceId": ids.ws, "packageId": "pkg_10", "idempotencyKey": bad}})),
            case(format!("usage model {label}"), RECORD, json!({"i": {"workspaceId": ids.ws, "modelId": bad, "promptTokens": 1, "completionTokens": 0, "requestId": "r1"}})),
            case(format!("usage tag {label}"), RECORD, json!({"i": {"workspaceId": ids.ws, "projectTag": bad, "modelId": TEST_MODEL, "promptTokens": 1, "completionTokens": 0, "requestId": "r2"}})),
            case(format!("usage request id {label}"), RECORD, json!({"i": {"workspaceId": ids.ws, "modelId": TEST_MODEL, "promptTokens": 1, "completionTokens": 0, "requestId": bad}})),
            case(format!("reserve model {label}"), RESERVE, json!({"i": {"workspaceId": ids.ws, "modelId": bad, "maxPromptTokens": 1, "maxCompletionTokens": 1, "requestId": "h1"}})),
            case(format!("transfer memo {label}"), TRANSFER, json!({"i": {"fromWorkspaceId": ids.ws, "toWorkspaceId": ids.ws_b, "amount": "1", "memo": bad, "idempotencyKey": "t1"}})),
            case(format!("transfer key {label}"), TRANSFER, json!({"i": {"fromWorkspaceId": ids.ws, "toWorkspaceId": ids.ws_b, "amount": "1", "idempotencyKey": bad}})),
            admin(format!("model id {label}"), MODEL, json!({"i": {"id": bad, "name": "M", "promptPricePerMillion": "1", "completionPricePerMillion": "1"}})),
            admin(format!("model name {label}"), MODEL, json!({"i": {"id": "x/m", "name": bad, "promptPricePerMillion": "1", "completionPricePerMillion": "1"}})),
        ]);
    }
    cases
}

fn amount_cases(ids: &Ids) -> Vec<Case> {
    let mut cases = Vec::new();
    for zero in ["0", "0.000000000"] {
        cases.extend([
            case(format!("purchase amount {zero}"), PURCHASE, json!({"i": {"workspaceId": ids.ws, "amount": zero, "idempotencyKey": "p-zero"}})),
            case(format!("transfer amount {zero}"), TRANSFER, json!({"i": {"fromWorkspaceId": ids.ws, "toWorkspaceId": ids.ws_b, "amount": zero, "idempotencyKey": "t-zero"}})),
            case(format!("alert amount {zero}"), ALERTS, json!({"i": {"workspaceId": ids.ws, "thresholds": [{"amount": zero, "severity": "WARNING", "recipientIds": [ids.owner]}]}})),
        ]);
    }
    for amount in [
        json!("-1"),
        json!("1.0000000001"),
        json!("99999999999999999999"),
        json!(5),
        json!("1e3"),
        json!(""),
        json!("NaN"),
    ] {
        cases.extend([
            case(format!("purchase amount {amount}"), PURCHASE, json!({"i": {"workspaceId": ids.ws, "amount": amount, "idempotencyKey": "p-amount"}})),
            case(format!("transfer amount {amount}"), TRANSFER, json!({"i": {"fromWorkspaceId": ids.ws, "toWorkspaceId": ids.ws_b, "amount": amount, "idempotencyKey": "t-amount"}})),
            case(format!("budget limit {amount}"), BUDGET, json!({"i": {"projectId": ids.project, "limit": amount}})),
            case(format!("reload threshold {amount}"), RELOAD, json!({"i": {"workspaceId": ids.ws, "enabled": false, "threshold": amount, "amount": "10"}})),
            case(format!("reload amount {amount}"), RELOAD, json!({"i": {"workspaceId": ids.ws, "enabled": false, "threshold": "5", "amount": amount}})),
            case(format!("alert amount {amount}"), ALERTS, json!({"i": {"workspaceId": ids.ws, "thresholds": [{"amount": amount, "severity": "WARNING", "recipientIds": [ids.owner]}]}})),
            admin(format!("model price {amount}"), MODEL, json!({"i": {"id": "x/m", "name": "M", "promptPricePerMillion": amount, "completionPricePerMillion": "1"}})),
        ]);
    }
    for tokens in [json!(-1), json!("10"), json!(1.5), json!(3_000_000_000_u64)] {
        cases.extend([
            case(format!("usage tokens {tokens}"), RECORD, json!({"i": {"workspaceId": ids.ws, "modelId": TEST_MODEL, "promptTokens": tokens, "completionTokens": 0, "requestId": "r-tokens"}})),
            case(format!("reserve tokens {tokens}"), RESERVE, json!({"i": {"workspaceId": ids.ws, "modelId": TEST_MODEL, "maxPromptTokens": tokens, "maxCompletionTokens": 1, "requestId": "h-tokens"}})),
        ]);
    }
    cases.extend([
        case("purchase package and amount", PURCHASE, json!({"i": {"workspaceId": ids.ws, "packageId": "pkg_10", "amount": "10", "idempotencyKey": "p-both"}})),
        case("purchase neither", PURCHASE, json!({"i": {"workspaceId": ids.ws, "idempotencyKey": "p-none"}})),
        case("unknown package", PURCHASE, json!({"i": {"workspaceId": ids.ws, "packageId": "pkg_nope", "idempotencyKey": "p-pkg"}})),
        case("reload per day 0", RELOAD, json!({"i": {"workspaceId": ids.ws, "enabled": false, "threshold": "5", "amount": "10", "maxReloadsPerDay": 0}})),
        case("reload per day 10000", RELOAD, json!({"i": {"workspaceId": ids.ws, "enabled": false, "threshold": "5", "amount": "10", "maxReloadsPerDay": 10_000}})),
        case("reload without a card", RELOAD, json!({"i": {"workspaceId": ids.ws, "enabled": true, "threshold": "5", "amount": "10"}})),
        case("reserve ttl 0", RESERVE, json!({"i": {"workspaceId": ids.ws, "modelId": TEST_MODEL, "maxPromptTokens": 1, "maxCompletionTokens": 1, "requestId": "h-ttl", "ttlSeconds": 0}})),
        case("settle tokens -1", SETTLE, json!({"i": {"reservationId": ids.unknown, "promptTokens": -1, "completionTokens": 0}})),
        case("transfer to itself", TRANSFER, json!({"i": {"fromWorkspaceId": ids.ws, "toWorkspaceId": ids.ws, "amount": "1", "idempotencyKey": "t-self"}})),
        case("transfer more than the balance", TRANSFER, json!({"i": {"fromWorkspaceId": ids.ws, "toWorkspaceId": ids.ws_b, "amount": "1000000", "idempotencyKey": "t-much"}})),
        admin("discount 150 %", PRICING, json!({"i": {"accountId": ids.account, "verified": true, "volumeDiscountPercent": "150", "paymentTermsDays": 30}})),
        admin("discount -1 %", PRICING, json!({"i": {"accountId": ids.account, "verified": true, "volumeDiscountPercent": "-1", "paymentTermsDays": 30}})),
        admin("payment terms -1", PRICING, json!({"i": {"accountId": ids.account, "verified": true, "volumeDiscountPercent": "5", "paymentTermsDays": -1}})),
        admin("payment terms 100000", PRICING, json!({"i": {"accountId": ids.account, "verified": true, "volumeDiscountPercent": "5", "paymentTermsDays": 100_000}})),
    ]);
    cases
}

fn id_cases(ids: &Ids) -> Vec<Case> {
    let mut cases = Vec::new();
    for (label, ws, account) in [
        ("foreign", &ids.foreign_ws, &ids.foreign_account),
        ("unknown", &ids.unknown, &ids.unknown),
        (
            "malformed",
            &"not-a-uuid".to_owned(),
            &"not-a-uuid".to_owned(),
        ),
    ] {
        cases.extend([
            case(format!("{label} account: workspace"), CREATE_WORKSPACE, json!({"i": {"accountId": account, "name": "W"}})),
            case(format!("{label} workspace: project"), CREATE_PROJECT, json!({"i": {"workspaceId": ws, "name": "P", "tag": "p9"}})),
            case(format!("{label} workspace: member"), ADD_MEMBER, json!({"i": {"workspaceId": ws, "email": "m@x.example", "role": "VIEWER"}})),
            case(format!("{label} workspace: key"), CREATE_KEY, json!({"i": {"workspaceId": ws, "name": "k"}})),
            case(format!("{label} account: card"), ADD_CARD, json!({"i": {"accountId": account, "token": "tok_visa"}})),
            case(format!("{label} workspace: purchase"), PURCHASE, json!({"i": {"workspaceId": ws, "packageId": "pkg_10", "idempotencyKey": "p-id"}})),
            case(format!("{label} workspace: usage"), RECORD, json!({"i": {"workspaceId": ws, "modelId": TEST_MODEL, "promptTokens": 1, "completionTokens": 0, "requestId": "r-id"}})),
            case(format!("{label} workspace: reserve"), RESERVE, json!({"i": {"workspaceId": ws, "modelId": TEST_MODEL, "maxPromptTokens": 1, "maxCompletionTokens": 1, "requestId": "h-id"}})),
            case(format!("{label} reservation: settle"), SETTLE, json!({"i": {"reservationId": ws, "promptTokens": 1, "completionTokens": 0}})),
            case(format!("{label} reservation: release"), RELEASE, json!({"id": ws})),
            case(format!("{label} workspace: transfer to"), TRANSFER, json!({"i": {"fromWorkspaceId": ids.ws, "toWorkspaceId": ws, "amount": "1", "idempotencyKey": "t-id"}})),
            case(format!("{label} workspace: transfer from"), TRANSFER, json!({"i": {"fromWorkspaceId": ws, "toWorkspaceId": ids.ws, "amount": "1", "idempotencyKey": "t-id2"}})),
            case(format!("{label} project: budget"), BUDGET, json!({"i": {"projectId": ws, "limit": "5"}})),
            case(format!("{label} workspace: reload"), RELOAD, json!({"i": {"workspaceId": ws, "enabled": false, "threshold": "5", "amount": "10"}})),
            case(format!("{label} card: reload"), RELOAD, json!({"i": {"workspaceId": ids.ws, "enabled": false, "threshold": "5", "amount": "10", "paymentMethodId": ws}})),
            case(format!("{label} workspace: alerts"), ALERTS, json!({"i": {"workspaceId": ws, "thresholds": []}})),
            case(format!("{label} key: revoke"), REVOKE_KEY, json!({"id": ws})),
            case(format!("{label} card: remove"), REMOVE_CARD, json!({"id": ws})),
            admin(format!("{label} invoice: paid"), INVOICE_PAID, json!({"id": ws})),
        ]);
        // The platform admin may set any real account's pricing: only nobody's is refused.
        if label != "foreign" {
            cases.push(admin(format!("{label} account: pricing"), PRICING, json!({"i": {"accountId": account, "verified": true, "volumeDiscountPercent": "5", "paymentTermsDays": 30}})));
        }
    }
    cases.push(case(
        "foreign recipient",
        ALERTS,
        json!({"i": {"workspaceId": ids.ws, "thresholds": [{"amount": "5", "severity": "WARNING", "recipientIds": [ids.foreign_user]}]}}),
    ));
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_money_and_settings_mutation_refuses_bad_input_cleanly() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    let project = billing::accounts::create_project(&t.db, f.ws_a, "P", "p", now).await?;
    let token = billing::accounts::create_user_token(&t.db, f.owner_id, "t", now).await?;
    let other =
        billing::accounts::create_account(&t.db, "Other", "o@other.example", "O", now).await?;
    let other_ws = billing::accounts::create_workspace(&t.db, other.account.id, "OW", now).await?;
    let ids = Ids {
        account: f.account_id.to_string(),
        ws: f.ws_a.to_string(),
        ws_b: f.ws_b.to_string(),
        project: project.id.to_string(),
        owner: f.owner_id.to_string(),
        foreign_account: other.account.id.to_string(),
        foreign_ws: other_ws.id.to_string(),
        foreign_user: other.owner.id.to_string(),
        unknown: uuid::Uuid::now_v7().to_string(),
    };
    let app = App::start(&t).await?;
    let before = snapshot(&t.db).await?;
    let cases: Vec<Case> = [text_cases(&ids), amount_cases(&ids), id_cases(&ids)]
        .into_iter()
        .flatten()
        .collect();
    let refused = [
        "INVALID_INPUT",
        "NOT_FOUND",
        "LIMIT_EXCEEDED",
        "FORBIDDEN",
        "INSUFFICIENT_CREDITS",
    ];
    for c in &cases {
        let token = if c.admin { ADMIN_TOKEN } else { token.as_str() };
        let response = app.gql(Some(token), c.query, c.vars.clone()).await?;
        let got = code(&response);
        assert!(
            got.is_some_and(|code| refused.contains(&code)),
            "{}: expected a refusal with a stable code, got {}",
            c.what,
            response.to_string().chars().take(400).collect::<String>()
        );
    }
    // A batch item is refused on its own, with its code, never INTERNAL.
    let batch = json!({"inputs": [{"workspaceId": ids.ws, "modelId": NUL, "promptTokens": 1, "completionTokens": 0, "requestId": "b1"},
                                  {"workspaceId": ids.ws, "projectTag": NUL, "modelId": TEST_MODEL, "promptTokens": 1, "completionTokens": 0, "requestId": "b2"}]});
    let response = app
        .gql(Some(&token), "mutation($inputs: [RecordUsageInput!]!) { recordUsageBatch(inputs: $inputs) { errorCode } }", batch)
        .await?;
    for item in response["data"]["recordUsageBatch"]
        .as_array()
        .into_iter()
        .flatten()
    {
        assert_eq!(item["errorCode"], "INVALID_INPUT", "{response}");
    }
    assert_eq!(snapshot(&t.db).await?, before, "no refusal wrote anything");
    app.stop().await;
    t.finish().await
}

/// The query GraphiQL and graphql-js's `getIntrospectionQuery()` send.
const FULL_INTROSPECTION: &str = "query IntrospectionQuery { __schema { queryType { name } mutationType { name } subscriptionType { name } types { ...FullType } directives { name description locations args { ...InputValue } } } }
fragment FullType on __Type { kind name description fields(includeDeprecated: true) { name description args { ...InputValue } type { ...TypeRef } isDeprecated deprecationReason } inputFields { ...InputValue } interfaces { ...TypeRef } enumValues(includeDeprecated: true) { name description isDeprecated deprecationReason } possibleTypes { ...TypeRef } }
fragment InputValue on __InputValue { name description type { ...TypeRef } defaultValue }
fragment TypeRef on __Type { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_that_amplify_are_bounded() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    let token = billing::accounts::create_user_token(&t.db, f.owner_id, "t", now).await?;
    let app = App::start(&t).await?;

    let schema = app.gql(Some(&token), FULL_INTROSPECTION, json!({})).await?;
    assert!(schema["errors"].is_null(), "{}", schema["errors"]);
    assert!(
        schema["data"]["__schema"]["types"]
            .as_array()
            .is_some_and(|t| t.len() > 50)
    );

    let flood = format!(
        "{{ viewer {{ id {} }} }}",
        "@include(if: true) ".repeat(5_000)
    );
    let (status, body) = app.raw(&token, json!({"query": flood}).to_string()).await?;
    assert_eq!(status, 200);
    assert!(
        body.len() < 16 * 1024,
        "a flood of directives answers briefly: {} bytes",
        body.len()
    );
    assert!(
        body.contains("LIMIT_EXCEEDED"),
        "{}",
        &body[..body.len().min(300)]
    );

    let aliases: String = (0..100)
        .map(|i| format!("v{i}: viewer {{ id }} "))
        .collect();
    let response = app
        .gql(Some(&token), &format!("{{ {aliases} }}"), json!({}))
        .await?;
    assert_eq!(code(&response), Some("LIMIT_EXCEEDED"), "{response}");

    let before = count(&t.db, "usage_events").await?;
    let debits: String = (0..11)
        .map(|i| format!("u{i}: recordUsage(input: {{workspaceId: \"{}\", modelId: \"{TEST_MODEL}\", promptTokens: 1, completionTokens: 0, requestId: \"alias-{i}\"}}) {{ id }} ", f.ws_a))
        .collect();
    let response = app
        .gql(Some(&token), &format!("mutation {{ {debits} }}"), json!({}))
        .await?;
    assert_eq!(code(&response), Some("LIMIT_EXCEEDED"), "{response}");
    assert!(
        response.to_string().contains("recordUsageBatch"),
        "{response}"
    );
    assert_eq!(
        count(&t.db, "usage_events").await?,
        before,
        "not one of them ran"
    );

    // Many distinct errors in one response are capped.
    let unknown: String = (0..60).map(|i| format!("f{i}: nope{i} ")).collect();
    let response = app
        .gql(Some(&token), &format!("{{ {unknown} }}"), json!({}))
        .await?;
    let errors = response["errors"].as_array().map_or(0, Vec::len);
    assert!(errors <= api::error::ERRORS_MAX + 1, "{errors} errors");
    app.stop().await;

    let closed =
        App::start_configured(&t.second_pool().await?, |c| c.introspection = false).await?;
    let refused = closed
        .gql(Some(&token), FULL_INTROSPECTION, json!({}))
        .await?;
    assert!(
        !refused["errors"].is_null(),
        "introspection is off: {refused}"
    );
    closed.stop().await;
    t.finish().await
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(app: &App) -> anyhow::Result<Ws> {
    let url = app.base.replace("http://", "ws://") + "/graphql";
    let mut request = url.as_str().into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("graphql-transport-ws"),
    );
    Ok(tokio_tungstenite::connect_async(request).await?.0)
}

/// Sends `messages` and returns the close code the server ends with.
async fn closed_with(app: &App, messages: &[Value]) -> anyhow::Result<u16> {
    let mut ws = ws_connect(app).await?;
    for m in messages {
        ws.send(Message::text(m.to_string())).await?;
    }
    loop {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await?;
        match next {
            Some(Ok(Message::Close(Some(frame)))) => return Ok(frame.code.into()),
            Some(Ok(_)) => continue,
            other => anyhow::bail!("no close frame: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_handshake_follows_the_protocol() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let token = billing::accounts::create_user_token(&t.db, f.owner_id, "t", now).await?;
    let app = App::start(&t).await?;
    let subscribe = json!({"id": "1", "type": "subscribe", "payload": {"query": "subscription { balanceChanged(workspaceId: \"x\") { balance } }"}});
    let init = |payload: Value| json!({"type": "connection_init", "payload": payload});
    assert_eq!(
        closed_with(&app, &[init(json!({"authorization": 12345}))]).await?,
        4400
    );
    assert_eq!(closed_with(&app, &[init(json!("Bearer x"))]).await?, 4400);
    assert_eq!(closed_with(&app, &[json!("not an object")]).await?, 4400);
    assert_eq!(
        closed_with(&app, std::slice::from_ref(&subscribe)).await?,
        4401
    );
    assert_eq!(
        closed_with(
            &app,
            &[init(json!({"authorization": "Bearer rsv_u_forged"}))]
        )
        .await?,
        4403
    );
    let good = init(json!({"authorization": format!("Bearer {token}")}));
    assert_eq!(closed_with(&app, &[good.clone(), good]).await?, 4429);
    app.stop().await;
    t.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_failed_logins_are_rate_limited() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    let key = billing::accounts::create_api_key(&t.db, f.ws_a, "gateway", None, now).await?;
    let other = billing::accounts::create_api_key(&t.db, f.ws_a, "other", None, now).await?;
    let app = App::start_configured(&t.second_pool().await?, |c| {
        c.rate_limits = api::rate_limit::RateLimits {
            usage_per_second: 5,
            auth_failures_per_minute: 3,
        };
    })
    .await?;
    let record = |i: usize| json!({"i": {"modelId": TEST_MODEL, "promptTokens": 1, "completionTokens": 0, "requestId": format!("rl-{i}")}});
    let mut limited = None;
    for i in 0..20 {
        let response = app.gql(Some(&key.secret), RECORD, record(i)).await?;
        if code(&response) == Some("RATE_LIMITED") {
            limited = Some((i, response));
            break;
        }
        assert!(response["errors"].is_null(), "{response}");
    }
    let (at, response) = limited.ok_or_else(|| anyhow::anyhow!("never limited"))?;
    assert!(
        at >= 10,
        "a burst of twice the rate is allowed first: limited at {at}"
    );
    assert!(
        response["errors"][0]["extensions"]["retryAfterMs"]
            .as_u64()
            .is_some_and(|ms| ms > 0),
        "{response}"
    );
    let fine = app.gql(Some(&other.secret), RECORD, record(100)).await?;
    assert!(
        fine["errors"].is_null(),
        "another key is not limited: {fine}"
    );

    for _ in 0..3 {
        let response = app
            .gql(Some("rsv_u_guess"), "{ viewer { id } }", json!({}))
            .await?;
        assert_eq!(code(&response), Some("UNAUTHENTICATED"));
    }
    let response = app
        .gql(Some(&other.secret), "{ models { id } }", json!({}))
        .await?;
    assert_eq!(
        code(&response),
        Some("RATE_LIMITED"),
        "the address is limited: {response}"
    );
    app.stop().await;
    t.finish().await
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// Any string is a Credits value or a clean refusal; parsing what it prints
    /// gives the same amount back.
    #[test]
    fn credits_parse_or_refuse_and_round_trip(text in "\\PC{0,40}|-?[0-9]{0,20}(\\.[0-9]{0,12})?") {
        if let Ok(credits) = billing::Credits::parse(&text) {
            let again = billing::Credits::parse(&credits.to_string()).expect("what it prints parses");
            prop_assert_eq!(again, credits);
        }
    }

    /// Any document parses or is refused, and its limits are computed without a panic.
    #[test]
    fn documents_of_any_shape_are_measured(doc in "[{}a-z:.@ ()\"$!,]{0,200}") {
        if let Some(shape) = api::limits::shape_of_query(&doc) {
            let _ = api::limits::check(&shape);
        }
    }
}
