//! Live balances: GraphQL subscriptions over WebSocket (`graphql-transport-ws`), with
//! two API processes (each its own pool, hence its own balance-event tailer) on one
//! database; and the hub itself (slow subscribers, limits, out-of-order commits).
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use api::events::{BalanceHub, BalanceStream, HubConfig, SubscriberTooSlow};
use billing::accounts;
use billing::debits::usage::{self, ProjectRef, UsageRequest};
use billing::entity::enums::WorkspaceRole;
use billing::sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};
use futures::{SinkExt, StreamExt};
use reservoir_tests::{Fixture, TEST_MODEL, TestDb, backend_name, fund, workspace};
use serde_json::{Value, json};
use std::net::TcpListener;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef0123";
const WAIT: Duration = Duration::from_secs(20);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Server {
    base: String,
    ws_url: String,
    client: reqwest::Client,
    handle: api::ApiHandle,
}

impl Server {
    async fn start(db: DatabaseConnection) -> anyhow::Result<Self> {
        Self::start_with(db, api::ApiConfig::default()).await
    }

    async fn start_with(db: DatabaseConnection, config: api::ApiConfig) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let config = api::ApiConfig {
            admin_token: Some(ADMIN_TOKEN.into()),
            workers: 1,
            ..config
        };
        let (handle, addr, _join) = api::spawn(listener, db, config)?;
        Ok(Self {
            base: format!("http://{addr}"),
            ws_url: format!("ws://{addr}/graphql"),
            client: reservoir_tests::app::http_client(),
            handle,
        })
    }

    async fn gql(&self, token: &str, query: &str, variables: Value) -> anyhow::Result<Value> {
        Ok(self
            .client
            .post(format!("{}/graphql", self.base))
            .bearer_auth(token)
            .json(&json!({ "query": query, "variables": variables }))
            .send()
            .await?
            .json()
            .await?)
    }

    /// Debits `prompt_tokens` × 1,000 nanocredits through `recordUsage` over HTTP.
    async fn record_usage(
        &self,
        token: &str,
        workspace_id: Uuid,
        request_id: &str,
        prompt_tokens: i32,
    ) -> anyhow::Result<()> {
        let response = self
            .gql(
                token,
                "mutation($input: RecordUsageInput!) { recordUsage(input: $input) { cost } }",
                json!({ "input": {
                    "workspaceId": workspace_id.to_string(),
                    "modelId": TEST_MODEL,
                    "promptTokens": prompt_tokens,
                    "completionTokens": 0,
                    "requestId": request_id,
                } }),
            )
            .await?;
        anyhow::ensure!(
            response["data"]["recordUsage"]["cost"].is_string(),
            "recordUsage failed: {response}"
        );
        Ok(())
    }

    async fn ws_connect(&self) -> Result<Ws, tungstenite::Error> {
        self.ws_connect_with("graphql-transport-ws").await
    }

    async fn ws_connect_with(&self, protocol: &'static str) -> Result<Ws, tungstenite::Error> {
        let mut request = self.ws_url.as_str().into_client_request()?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(protocol));
        Ok(tokio_tungstenite::connect_async(request).await?.0)
    }

    /// A connection initialised with the token, after its `connection_ack`.
    async fn ws(&self, token: &str) -> anyhow::Result<Ws> {
        self.ws_with("graphql-transport-ws", token).await
    }

    /// The same on `protocol` (`graphql-ws` is the legacy one).
    async fn ws_with(&self, protocol: &'static str, token: &str) -> anyhow::Result<Ws> {
        let mut ws = self.ws_connect_with(protocol).await?;
        send(
            &mut ws,
            json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {token}") } }),
        )
        .await?;
        let ack = next_json(&mut ws, WAIT).await?;
        anyhow::ensure!(
            matches!(&ack, Some(m) if m["type"] == "connection_ack"),
            "expected connection_ack, got {ack:?}"
        );
        Ok(ws)
    }

    async fn stop(self) {
        self.handle.stop(true).await;
    }
}

async fn send(ws: &mut Ws, message: Value) -> anyhow::Result<()> {
    ws.send(Message::text(message.to_string())).await?;
    Ok(())
}

async fn subscribe(ws: &mut Ws, id: &str, query: &str, variables: Value) -> anyhow::Result<()> {
    send(
        ws,
        json!({ "id": id, "type": "subscribe", "payload": { "query": query, "variables": variables } }),
    )
    .await
}

/// The next protocol message (None: the server closed the connection). Errors on timeout.
async fn next_json(ws: &mut Ws, wait: Duration) -> anyhow::Result<Option<Value>> {
    tokio::time::timeout(wait, async {
        while let Some(message) = ws.next().await {
            match message? {
                Message::Text(text) => {
                    let value: Value = serde_json::from_str(text.as_str())?;
                    if value["type"] == "ping" {
                        send(ws, json!({ "type": "pong" })).await?;
                        continue;
                    }
                    return Ok(Some(value));
                }
                Message::Close(_) => return Ok(None),
                _ => {}
            }
        }
        Ok(None)
    })
    .await
    .map_err(|_| anyhow::anyhow!("no WebSocket message within {wait:?}"))?
}

/// The payload of the next `next` message of subscription `id` (errors included).
async fn next_payload(ws: &mut Ws, id: &str, wait: Duration) -> anyhow::Result<Option<Value>> {
    loop {
        let Some(message) = next_json(ws, wait).await? else {
            return Ok(None);
        };
        if message["id"] != id {
            continue;
        }
        match message["type"].as_str() {
            // `data` on the legacy graphql-ws protocol.
            Some("next" | "data") => return Ok(Some(message["payload"].clone())),
            Some("error") => return Ok(Some(json!({ "errors": message["payload"] }))),
            Some("complete") => return Ok(None),
            _ => anyhow::bail!("unexpected message {message}"),
        }
    }
}

/// Keeps debiting (one small usage at a time) until the subscriber sees an event: the
/// subscription is registered asynchronously after `subscribe` is sent.
async fn until_subscribed(
    server: &Server,
    token: &str,
    workspace_id: Uuid,
    ws: &mut Ws,
    id: &str,
) -> anyhow::Result<Value> {
    for i in 0..100 {
        server
            .record_usage(token, workspace_id, &format!("warm-{id}-{i}"), 1)
            .await?;
        match tokio::time::timeout(Duration::from_millis(500), next_payload(ws, id, WAIT)).await {
            Ok(payload) => {
                return payload?.ok_or_else(|| anyhow::anyhow!("subscription ended"));
            }
            Err(_) => continue,
        }
    }
    anyhow::bail!("the subscription never delivered")
}

fn code(payload: &Value) -> Option<&str> {
    payload["errors"][0]["extensions"]["code"].as_str()
}

fn nanos(credits: &Value) -> i64 {
    billing::Credits::parse(credits.as_str().unwrap_or_default())
        .map(|c| c.nanos())
        .unwrap_or(i64::MIN)
}

const BALANCE_CHANGED: &str = "subscription($id: ID!) { balanceChanged(workspaceId: $id) { \
    workspace { id balance } balance reserved available cause sequence at } }";

const ACCOUNT_BALANCE_CHANGED: &str = "subscription($id: ID!) { accountBalanceChanged(accountId: $id) { \
    account { id } change { workspace { id } balance sequence cause } totalBalance } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debits_on_one_server_reach_a_subscriber_on_another_in_order() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    let token = accounts::create_user_token(&t.db, f.owner_id, "test", now).await?;
    // Two API processes, each with its own pool (hence its own tailer). Neither uses
    // `t.db`: connections a server opens belong to its worker's runtime, which ends
    // with the server, and `t.finish()` still needs its pool afterwards.
    let one = Server::start(t.second_pool().await?).await?;
    let two = Server::start(t.second_pool().await?).await?;

    let mut ws = one.ws(&token).await?;
    subscribe(
        &mut ws,
        "1",
        BALANCE_CHANGED,
        json!({ "id": f.ws_a.to_string() }),
    )
    .await?;
    let first = until_subscribed(&two, &token, f.ws_a, &mut ws, "1").await?;
    let mut changes = vec![first];

    // 50 debits through the other server, 8 at a time.
    let debits = futures::stream::iter(0..50)
        .map(|i| {
            let (two, token) = (&two, &token);
            async move {
                two.record_usage(token, f.ws_a, &format!("debit-{i}"), 1_000)
                    .await
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for debit in debits {
        debit?;
    }
    let final_balance = workspace(&t.db, f.ws_a).await?.balance_nanos;
    while nanos(&changes[changes.len() - 1]["data"]["balanceChanged"]["balance"]) != final_balance {
        let payload = next_payload(&mut ws, "1", WAIT)
            .await?
            .ok_or_else(|| anyhow::anyhow!("subscription ended early"))?;
        changes.push(payload);
    }

    let changes: Vec<&Value> = changes
        .iter()
        .map(|p| {
            assert!(p["errors"].is_null(), "{p}");
            &p["data"]["balanceChanged"]
        })
        .collect();
    // Debits that commit together (group commit) arrive as one change: at least one
    // change after the first, at most one per debit, and never a gap.
    assert!(
        (2..=51).contains(&changes.len()),
        "{} changes",
        changes.len()
    );
    for pair in changes.windows(2) {
        let (a, b) = (pair[0]["sequence"].as_i64(), pair[1]["sequence"].as_i64());
        assert_eq!(
            b,
            a.map(|a| a + 1),
            "sequence strictly increasing without gaps"
        );
        assert!(nanos(&pair[1]["balance"]) < nanos(&pair[0]["balance"]));
    }
    for c in &changes {
        assert_eq!(c["cause"], "USAGE");
        assert_eq!(c["workspace"]["id"], f.ws_a.to_string());
        assert_eq!(c["workspace"]["balance"], c["balance"]);
        assert_eq!(c["reserved"], "0");
        assert_eq!(c["available"], c["balance"]);
        assert!(c["at"].is_string());
    }
    let last = changes[changes.len() - 1];
    assert_eq!(nanos(&last["balance"]), final_balance);
    assert_eq!(
        last["sequence"].as_i64(),
        Some(workspace(&t.db, f.ws_a).await?.balance_sequence)
    );

    send(&mut ws, json!({ "id": "1", "type": "complete" })).await?;
    drop(ws);
    one.stop().await;
    two.stop().await;
    t.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_changes_carry_the_total_of_its_workspaces() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "5", now).await?;
    fund(&t.db, f.ws_b, "6", now).await?;
    let token = accounts::create_user_token(&t.db, f.owner_id, "test", now).await?;
    // Two API processes, each with its own pool (hence its own tailer). Neither uses
    // `t.db`: connections a server opens belong to its worker's runtime, which ends
    // with the server, and `t.finish()` still needs its pool afterwards.
    let one = Server::start(t.second_pool().await?).await?;
    let two = Server::start(t.second_pool().await?).await?;
    let total = |balances: &[i64]| balances.iter().sum::<i64>();

    let mut ws = one.ws(&token).await?;
    let account = json!({ "id": f.account_id.to_string() });
    subscribe(&mut ws, "acc", ACCOUNT_BALANCE_CHANGED, account).await?;
    let mut latest = until_subscribed(&two, &token, f.ws_b, &mut ws, "acc").await?;
    // Drain what the warm-up produced: the last change of B carries B's balance now.
    let b_now = workspace(&t.db, f.ws_b).await?.balance_nanos;
    while nanos(&latest["data"]["accountBalanceChanged"]["change"]["balance"]) != b_now {
        latest = next_payload(&mut ws, "acc", WAIT)
            .await?
            .ok_or_else(|| anyhow::anyhow!("ended"))?;
    }
    let a_now = workspace(&t.db, f.ws_a).await?.balance_nanos;
    let change = &latest["data"]["accountBalanceChanged"];
    assert_eq!(change["account"]["id"], f.account_id.to_string());
    assert_eq!(nanos(&change["totalBalance"]), total(&[a_now, b_now]));

    // A debit of A through the other server.
    two.record_usage(&token, f.ws_a, "a-1", 250_000).await?;
    let payload = next_payload(&mut ws, "acc", WAIT)
        .await?
        .ok_or_else(|| anyhow::anyhow!("ended"))?;
    let change = &payload["data"]["accountBalanceChanged"];
    let a_now = workspace(&t.db, f.ws_a).await?.balance_nanos;
    assert_eq!(change["change"]["workspace"]["id"], f.ws_a.to_string());
    assert_eq!(change["change"]["cause"], "USAGE");
    assert_eq!(nanos(&change["change"]["balance"]), a_now);
    assert_eq!(nanos(&change["totalBalance"]), total(&[a_now, b_now]));

    // A workspace created after the subscription, funded by a purchase.
    let c = accounts::create_workspace(&t.db, f.account_id, "C", now).await?;
    fund(&t.db, c.id, "7", now).await?;
    let payload = next_payload(&mut ws, "acc", WAIT)
        .await?
        .ok_or_else(|| anyhow::anyhow!("ended"))?;
    let change = &payload["data"]["accountBalanceChanged"];
    assert_eq!(change["change"]["workspace"]["id"], c.id.to_string());
    assert_eq!(change["change"]["cause"], "PURCHASE");
    assert_eq!(
        nanos(&change["totalBalance"]),
        total(&[a_now, b_now, 7_000_000_000])
    );

    // A plain account MEMBER (a viewer of A only) sees the changes of A, with the
    // account's whole total, and not those of B.
    let (member, _) = accounts::add_workspace_member(
        &t.db,
        f.ws_a,
        "viewer@test.example",
        Some("Viewer"),
        WorkspaceRole::Viewer,
        now,
    )
    .await?;
    let member_token = accounts::create_user_token(&t.db, member.id, "test", now).await?;
    let mut viewer = one.ws(&member_token).await?;
    let account = json!({ "id": f.account_id.to_string() });
    subscribe(&mut viewer, "m", ACCOUNT_BALANCE_CHANGED, account).await?;
    let mut latest = until_subscribed(&two, &token, f.ws_a, &mut viewer, "m").await?;
    let a_now = workspace(&t.db, f.ws_a).await?.balance_nanos;
    while nanos(&latest["data"]["accountBalanceChanged"]["change"]["balance"]) != a_now {
        latest = next_payload(&mut viewer, "m", WAIT)
            .await?
            .ok_or_else(|| anyhow::anyhow!("ended"))?;
    }
    two.record_usage(&token, f.ws_b, "b-hidden", 100_000)
        .await?;
    two.record_usage(&token, f.ws_a, "a-2", 100_000).await?;
    let payload = next_payload(&mut viewer, "m", WAIT)
        .await?
        .ok_or_else(|| anyhow::anyhow!("ended"))?;
    let change = &payload["data"]["accountBalanceChanged"];
    assert_eq!(
        change["change"]["workspace"]["id"],
        f.ws_a.to_string(),
        "{payload}"
    );
    let mut all = Vec::new();
    for id in [f.ws_a, f.ws_b, c.id] {
        all.push(workspace(&t.db, id).await?.balance_nanos);
    }
    assert_eq!(nanos(&change["totalBalance"]), total(&all));

    drop(viewer);
    drop(ws);
    one.stop().await;
    two.stop().await;
    t.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_caller_cannot_see_is_not_found_and_bad_tokens_are_refused() -> anyhow::Result<()>
{
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let token = accounts::create_user_token(&t.db, f.owner_id, "test", now).await?;
    let other =
        accounts::create_account(&t.db, "Other", "other@test.example", "Other", now).await?;
    let theirs = accounts::create_workspace(&t.db, other.account.id, "Theirs", now).await?;
    let key = accounts::create_api_key(&t.db, f.ws_a, "gateway", None, now).await?;
    let server = Server::start_with(
        t.second_pool().await?,
        api::ApiConfig {
            websocket_connections_max: 2,
            ..Default::default()
        },
    )
    .await?;

    let mut ws = server.ws(&token).await?;
    for (id, query, target) in [
        ("ws", BALANCE_CHANGED, theirs.id),
        ("acc", ACCOUNT_BALANCE_CHANGED, other.account.id),
        ("acc-by-ws-id", ACCOUNT_BALANCE_CHANGED, f.ws_a),
        ("unknown", BALANCE_CHANGED, Uuid::new_v4()),
    ] {
        subscribe(&mut ws, id, query, json!({ "id": target.to_string() })).await?;
        let payload = next_payload(&mut ws, id, WAIT).await?;
        let payload = payload.ok_or_else(|| anyhow::anyhow!("{id}: no answer"))?;
        assert_eq!(code(&payload), Some("NOT_FOUND"), "{id}: {payload}");
        assert!(payload["data"].is_null(), "{id}: {payload}");
    }
    subscribe(
        &mut ws,
        "bad-id",
        BALANCE_CHANGED,
        json!({ "id": "not-a-uuid" }),
    )
    .await?;
    let payload = next_payload(&mut ws, "bad-id", WAIT)
        .await?
        .unwrap_or_default();
    assert_eq!(code(&payload), Some("NOT_FOUND"), "{payload}");
    // The connection is still usable for what the caller can see.
    subscribe(
        &mut ws,
        "mine",
        BALANCE_CHANGED,
        json!({ "id": f.ws_a.to_string() }),
    )
    .await?;

    // A workspace API key sees its own workspace, not the account stream.
    let mut by_key = server.ws(&key.secret).await?;
    subscribe(
        &mut by_key,
        "acc",
        ACCOUNT_BALANCE_CHANGED,
        json!({ "id": f.account_id.to_string() }),
    )
    .await?;
    let payload = next_payload(&mut by_key, "acc", WAIT)
        .await?
        .unwrap_or_default();
    assert_eq!(code(&payload), Some("NOT_FOUND"), "{payload}");

    // Two connections are open: a third is refused with 503.
    match server.ws_connect().await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503);
            let body: Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default())?;
            assert_eq!(code(&body), Some("LIMIT_EXCEEDED"), "{body}");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    drop(by_key);

    // A bad token in connection_init: closed with an error, never acknowledged. (The
    // slot of the dropped connection is free again, possibly after a moment.)
    let mut bad = None;
    for _ in 0..50 {
        match server.ws_connect().await {
            Ok(ws) => {
                bad = Some(ws);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let mut bad = bad.ok_or_else(|| anyhow::anyhow!("the connection slot was never released"))?;
    send(
        &mut bad,
        json!({ "type": "connection_init", "payload": { "authorization": "Bearer rsv_u_not-a-token" } }),
    )
    .await?;
    let mut closed = None;
    while let Some(message) = tokio::time::timeout(WAIT, bad.next()).await? {
        match message {
            Ok(Message::Close(frame)) => {
                closed = frame;
                break;
            }
            Ok(Message::Text(text)) => panic!("unexpected message {text}"),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let frame = closed.ok_or_else(|| anyhow::anyhow!("no close frame"))?;
    // graphql-transport-ws: a refused connection_init closes with 4403 Forbidden.
    assert_eq!(u16::from(frame.code), 4403);
    assert!(
        frame.reason.as_str().contains("authentication"),
        "{}",
        frame.reason
    );

    drop(bad);

    // Without the subprotocol the upgrade is refused with 400 (STACK.md trap 13).
    let mut status = None;
    for _ in 0..50 {
        let plain = server.ws_url.as_str().into_client_request()?;
        match tokio_tungstenite::connect_async(plain).await {
            Err(tungstenite::Error::Http(r)) if r.status().as_u16() == 503 => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(tungstenite::Error::Http(r)) => {
                status = Some(r.status().as_u16());
                break;
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(status, Some(400));

    drop(ws);
    server.stop().await;
    t.finish().await
}

fn debit(workspace_id: Uuid, request_id: String) -> UsageRequest {
    UsageRequest {
        workspace_id,
        project: ProjectRef::None,
        model_id: TEST_MODEL.into(),
        prompt_tokens: 1_000,
        completion_tokens: 0,
        request_id,
        user_id: None,
        api_key_id: None,
    }
}

async fn next_event(
    stream: &mut BalanceStream,
) -> anyhow::Result<Option<Result<std::sync::Arc<api::events::BalanceEvent>, SubscriberTooSlow>>> {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .map_err(|_| anyhow::anyhow!("no event within {WAIT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_is_dropped_and_the_others_keep_receiving()
-> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    let hub = BalanceHub::start(
        t.db.clone(),
        HubConfig {
            subscriber_buffer: 2,
            subscribers_max: 3,
            poll_interval_ms: 10,
            ..Default::default()
        },
    );
    let mut fast = hub.subscribe_workspace(f.ws_a)?;
    // The tailer starts at the end of the table in the background: debit until the
    // fast subscriber sees something (then drain it), then one debit at a time.
    let mut seen = Vec::new();
    for i in 0..100 {
        usage::record_usage(&t.db, debit(f.ws_a, format!("warm-{i}")), now).await?;
        if let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(300), fast.next()).await
        {
            seen.push(event?.sequence);
            break;
        }
    }
    assert_eq!(seen.len(), 1, "the hub never delivered");
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(200), fast.next()).await
    {
        seen.push(event?.sequence);
    }
    let mut slow = hub.subscribe_workspace(f.ws_a)?;
    let mut account = hub.subscribe_account(f.account_id)?;
    assert_eq!(hub.subscriber_count(), 3);
    let refused = hub.subscribe_workspace(f.ws_b).expect_err("over the limit");
    assert_eq!(refused.code(), billing::ErrorCode::LimitExceeded);
    for i in 0..4 {
        usage::record_usage(&t.db, debit(f.ws_a, format!("d-{i}")), now).await?;
        let event = next_event(&mut fast)
            .await?
            .ok_or_else(|| anyhow::anyhow!("ended"))??;
        seen.push(event.sequence);
        // The account subscriber reads too, so it is never dropped.
        let by_account = next_event(&mut account)
            .await?
            .ok_or_else(|| anyhow::anyhow!("ended"))??;
        assert_eq!(by_account.workspace_id, f.ws_a);
        assert_eq!(by_account.account_id, Some(f.account_id));
    }
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
    assert_eq!(hub.subscriber_count(), 2, "the slow subscriber was dropped");

    // The slow one gets what it had buffered, one error, then the end.
    let mut got = Vec::new();
    while let Some(item) = next_event(&mut slow).await? {
        got.push(item.map(|e| e.sequence));
    }
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got[..2].iter().all(Result::is_ok), "{got:?}");
    assert_eq!(got[2], Err(SubscriberTooSlow));
    assert_eq!(
        SubscriberTooSlow.to_string(),
        "subscriber too slow; resubscribe"
    );

    // Its slot is free again; a dropped stream frees its slot too.
    let again = hub.subscribe_workspace(f.ws_b)?;
    assert_eq!(hub.subscriber_count(), 3);
    drop(again);
    assert_eq!(hub.subscriber_count(), 2);

    // Shutdown ends every stream and refuses new subscribers.
    hub.shutdown();
    assert!(next_event(&mut fast).await?.is_none());
    assert!(next_event(&mut account).await?.is_none());
    assert!(hub.subscribe_workspace(f.ws_a).is_err());
    assert_eq!(hub.subscriber_count(), 0);

    // Dropping the last handle stops a hub too.
    let hub = BalanceHub::start(t.db.clone(), HubConfig::default());
    let mut orphan = hub.subscribe_workspace(f.ws_a)?;
    drop(hub);
    assert!(next_event(&mut orphan).await?.is_none());
    t.finish().await
}

/// PostgreSQL assigns ids at INSERT, not at commit: a transaction holding a lower id
/// that commits after a higher one must still be delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_after_a_later_id_is_still_delivered() -> anyhow::Result<()> {
    if backend_name() != "postgres" {
        return Ok(()); // one writer at a time on SQLite: ids become visible in order
    }
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    let other_pool = t.second_pool().await?;
    let hub = BalanceHub::start(t.db.clone(), HubConfig::default());
    let mut a = hub.subscribe_workspace(f.ws_a)?;
    let mut b = hub.subscribe_workspace(f.ws_b)?;
    for i in 0..100 {
        usage::record_usage(&other_pool, debit(f.ws_a, format!("warm-{i}")), now).await?;
        if tokio::time::timeout(Duration::from_millis(300), a.next())
            .await
            .is_ok()
        {
            break;
        }
    }

    // A transaction takes an id for a balance event of B (a sequence bump: no money
    // moves) and stays open...
    let held = t.db.begin().await?;
    held.execute_unprepared(&format!(
        "WITH w AS (UPDATE workspaces SET balance_sequence = balance_sequence + 1 \
                    WHERE id = '{}' RETURNING id, balance_sequence, balance_nanos, reserved_nanos) \
         INSERT INTO balance_events (workspace_id, sequence, balance_nanos, reserved_nanos, cause, created_at) \
         SELECT id, balance_sequence, balance_nanos, reserved_nanos, 'ADJUSTMENT', now() FROM w",
        f.ws_b
    ))
    .await?;
    held.execute_unprepared("SELECT pg_notify('reservoir_balance_events', '')")
        .await?;
    // ...while a debit of A takes a higher id and commits first.
    usage::record_usage(&other_pool, debit(f.ws_a, "after".into()), now).await?;
    let later = next_event(&mut a)
        .await?
        .ok_or_else(|| anyhow::anyhow!("ended"))??;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b.next())
            .await
            .is_err(),
        "nothing of B is committed yet"
    );
    held.commit().await?;
    let late = next_event(&mut b)
        .await?
        .ok_or_else(|| anyhow::anyhow!("ended"))??;
    assert!(late.id < later.id, "{} < {}", late.id, later.id);
    assert_eq!(
        late.sequence,
        workspace(&t.db, f.ws_b).await?.balance_sequence
    );

    // A rolled-back id is given up, and later events still flow.
    let rolled = t.db.begin().await?;
    rolled
        .execute_unprepared(&format!(
            "INSERT INTO balance_events (workspace_id, sequence, balance_nanos, reserved_nanos, cause, created_at) \
             VALUES ('{}', 999999, 0, 0, 'ADJUSTMENT', now())",
            f.ws_b
        ))
        .await?;
    rolled.rollback().await?;
    usage::record_usage(&other_pool, debit(f.ws_a, "after-rollback".into()), now).await?;
    let next = next_event(&mut a)
        .await?
        .ok_or_else(|| anyhow::anyhow!("ended"))??;
    assert_eq!(next.sequence, later.sequence + 1);

    drop(hub);
    other_pool.close().await?;
    t.finish().await
}

/// The bench's kind of document: only fields that do not depend on the caller, so
/// identical subscriptions share one execution per process (`api::shared_feed`).
const SHARED_BALANCE: &str =
    "subscription($id: ID!) { balanceChanged(workspaceId: $id) { sequence balance at } }";

/// Not shareable (`workspace.name` is read when a subscription starts), so executed per
/// subscriber by async-graphql as before; the same first line as `SHARED_BALANCE`.
const UNSHARED_BALANCE: &str = "subscription($id: ID!) { balanceChanged(workspaceId: $id) { \
    workspace { id name } sequence balance at } }";

/// A sample of the server's `/metrics` (0 when absent).
async fn metric(server: &Server, sample: &str) -> anyhow::Result<i64> {
    let text = server
        .client
        .get(format!("{}/metrics", server.base))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as i64))
}

/// Waits (up to 10 s) for a sample of `/metrics` to read `value`, and returns what it read
/// last (subscribers come and go asynchronously).
async fn metric_becomes(server: &Server, sample: &str, value: i64) -> anyhow::Result<i64> {
    let mut read = metric(server, sample).await?;
    for _ in 0..200 {
        if read == value {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        read = metric(server, sample).await?;
    }
    Ok(read)
}

const EXECUTIONS: &str = "reservoir_subscription_executions_total{field=\"balanceChanged\"}";

/// Reads one connection until each of `ids` has seen `through` (a sequence), and
/// returns the sequences each saw above `above`, in order. A message for any other
/// id, an error or an early end fails.
async fn read_through(
    ws: &mut Ws,
    ids: &[&str],
    above: i64,
    through: i64,
) -> anyhow::Result<std::collections::HashMap<String, Vec<i64>>> {
    let mut seen: std::collections::HashMap<String, Vec<i64>> = ids
        .iter()
        .map(|id| ((*id).to_owned(), Vec::new()))
        .collect();
    let mut last: std::collections::HashMap<String, i64> =
        ids.iter().map(|id| ((*id).to_owned(), i64::MIN)).collect();
    while last.values().any(|l| *l < through) {
        let message = next_json(ws, WAIT)
            .await?
            .ok_or_else(|| anyhow::anyhow!("closed"))?;
        let id = message["id"].as_str().unwrap_or_default().to_owned();
        anyhow::ensure!(
            matches!(message["type"].as_str(), Some("next" | "data")),
            "unexpected {message}"
        );
        let payload = &message["payload"];
        anyhow::ensure!(payload["errors"].is_null(), "{payload}");
        let sequence = payload["data"]["balanceChanged"]["sequence"]
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("no sequence: {message}"))?;
        let previous = last
            .get_mut(&id)
            .ok_or_else(|| anyhow::anyhow!("a message for another id: {message}"))?;
        anyhow::ensure!(sequence > *previous, "{id}: {sequence} after {previous}");
        *previous = sequence;
        if sequence > above {
            seen.entry(id).or_default().push(sequence);
        }
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_subscriptions_share_one_execution_and_each_gets_every_event()
-> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    let token = accounts::create_user_token(&t.db, f.owner_id, "test", now).await?;
    let server = Server::start(t.second_pool().await?).await?;
    let vars = json!({ "id": f.ws_a.to_string() });

    // Two subscriptions on one connection, one on another, one on the legacy protocol.
    let mut one = server.ws(&token).await?;
    subscribe(&mut one, "a", SHARED_BALANCE, vars.clone()).await?;
    subscribe(&mut one, "b", SHARED_BALANCE, vars.clone()).await?;
    let mut two = server.ws(&token).await?;
    // Formatted differently: the same feed.
    let reformatted = SHARED_BALANCE.replace(" { ", "\n{\n  ").replace(' ', "  ");
    subscribe(&mut two, "c", &reformatted, vars.clone()).await?;
    let mut legacy = server.ws_with("graphql-ws", &token).await?;
    send(
        &mut legacy,
        json!({ "id": "d", "type": "start", "payload": { "query": SHARED_BALANCE, "variables": vars } }),
    )
    .await?;
    // Every subscriber is live once it has seen an event.
    until_subscribed(&server, &token, f.ws_a, &mut one, "a").await?;
    until_subscribed(&server, &token, f.ws_a, &mut one, "b").await?;
    until_subscribed(&server, &token, f.ws_a, &mut two, "c").await?;
    until_subscribed(&server, &token, f.ws_a, &mut legacy, "d").await?;
    let fence = workspace(&t.db, f.ws_a).await?.balance_sequence;
    read_through(&mut one, &["a", "b"], fence, fence).await?;
    read_through(&mut two, &["c"], fence, fence).await?;
    read_through(&mut legacy, &["d"], fence, fence).await?;
    assert_eq!(metric(&server, "reservoir_shared_subscriptions").await?, 1);
    assert_eq!(metric(&server, "reservoir_subscribers").await?, 4);
    let executed = metric(&server, EXECUTIONS).await?;

    for i in 0..6 {
        server
            .record_usage(&token, f.ws_a, &format!("shared-{i}"), 1_000)
            .await?;
    }
    let last = workspace(&t.db, f.ws_a).await?.balance_sequence;
    let every: Vec<i64> = (fence + 1..=last).collect();
    assert_eq!(every.len(), 6);
    let mut seen = read_through(&mut one, &["a", "b"], fence, last).await?;
    seen.extend(read_through(&mut two, &["c"], fence, last).await?);
    seen.extend(read_through(&mut legacy, &["d"], fence, last).await?);
    for id in ["a", "b", "c", "d"] {
        assert_eq!(seen[id], every, "{id}");
    }
    // Executed once per event, not once per subscriber (the old way: 4 × 6).
    assert_eq!(metric(&server, EXECUTIONS).await? - executed, 6);

    // `complete` ends that subscriber only.
    send(&mut one, json!({ "id": "a", "type": "complete" })).await?;
    let answer = next_json(&mut one, WAIT).await?;
    assert_eq!(
        answer,
        Some(json!({ "type": "complete", "id": "a" })),
        "{answer:?}"
    );
    assert_eq!(
        metric_becomes(&server, "reservoir_subscribers", 3).await?,
        3
    );
    server
        .record_usage(&token, f.ws_a, "after-complete", 1_000)
        .await?;
    let after = workspace(&t.db, f.ws_a).await?.balance_sequence;
    assert_eq!(
        read_through(&mut one, &["b"], last, after).await?["b"],
        vec![after]
    );
    assert_eq!(
        read_through(&mut two, &["c"], last, after).await?["c"],
        vec![after]
    );
    assert_eq!(
        read_through(&mut legacy, &["d"], last, after).await?["d"],
        vec![after]
    );
    assert_eq!(metric(&server, EXECUTIONS).await? - executed, 7);

    // The feed ends with its last subscriber.
    drop(one);
    drop(two);
    drop(legacy);
    let feeds = metric_becomes(&server, "reservoir_shared_subscriptions", 0).await?;
    assert_eq!(feeds, 0);
    assert_eq!(
        metric_becomes(&server, "reservoir_subscribers", 0).await?,
        0
    );
    server.stop().await;
    t.finish().await
}

/// The first answer to a subscription and the `complete` after it.
async fn refusal(ws: &mut Ws, id: &str, query: &str, variables: Value) -> anyhow::Result<Value> {
    subscribe(ws, id, query, variables).await?;
    let payload = next_payload(ws, id, WAIT)
        .await?
        .ok_or_else(|| anyhow::anyhow!("{id}: no answer"))?;
    let end = next_json(ws, WAIT).await?;
    anyhow::ensure!(
        end == Some(json!({ "type": "complete", "id": id })),
        "{id}: {end:?}"
    );
    Ok(payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_is_refused_per_subscriber_exactly_as_an_unshared_one()
-> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    let token = accounts::create_user_token(&t.db, f.owner_id, "test", now).await?;
    let other =
        accounts::create_account(&t.db, "Other", "other@test.example", "Other", now).await?;
    let outsider = accounts::create_user_token(&t.db, other.owner.id, "test", now).await?;
    let server = Server::start_with(
        t.second_pool().await?,
        api::ApiConfig {
            balance_hub: HubConfig {
                subscribers_max: 2,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await?;
    let vars = json!({ "id": f.ws_a.to_string() });
    let mut mine = server.ws(&token).await?;
    subscribe(&mut mine, "mine", SHARED_BALANCE, vars.clone()).await?;
    until_subscribed(&server, &token, f.ws_a, &mut mine, "mine").await?;

    // The same document and variables from a caller who may not read the workspace, an
    // anonymous one, and a bad id: refused with what the unshared path answers (the
    // documents share their first line, so even the locations agree).
    let mut theirs = server.ws(&outsider).await?;
    let mut anonymous = server.ws_connect().await?;
    send(&mut anonymous, json!({ "type": "connection_init" })).await?;
    let ack = next_json(&mut anonymous, WAIT).await?;
    assert!(
        matches!(&ack, Some(m) if m["type"] == "connection_ack"),
        "{ack:?}"
    );
    let bad_id = json!({ "id": "not-a-uuid" });
    for (ws, who, vars, expected) in [
        (&mut theirs, "outsider", vars.clone(), "NOT_FOUND"),
        (&mut anonymous, "anonymous", vars.clone(), "UNAUTHENTICATED"),
        (&mut mine, "bad-id", bad_id, "NOT_FOUND"),
    ] {
        let shared = refusal(ws, &format!("{who}-s"), SHARED_BALANCE, vars.clone()).await?;
        let unshared = refusal(ws, &format!("{who}-u"), UNSHARED_BALANCE, vars).await?;
        assert_eq!(code(&shared), Some(expected), "{who}: {shared}");
        assert!(shared["data"].is_null(), "{who}: {shared}");
        assert_eq!(shared["errors"][0]["path"], json!(["balanceChanged"]));
        assert_eq!(shared, unshared, "{who}");
    }
    // Shared subscribers count against the hub's limit as unshared ones do.
    subscribe(&mut mine, "second", SHARED_BALANCE, vars.clone()).await?;
    // Admitted asynchronously: wait for its seat before the next one.
    assert_eq!(
        metric_becomes(&server, "reservoir_subscribers", 2).await?,
        2
    );
    let mut third = server.ws(&token).await?;
    let shared = refusal(&mut third, "third-s", SHARED_BALANCE, vars.clone()).await?;
    let unshared = refusal(&mut third, "third-u", UNSHARED_BALANCE, vars.clone()).await?;
    assert_eq!(code(&shared), Some("LIMIT_EXCEEDED"), "{shared}");
    assert_eq!(shared, unshared);
    assert_eq!(metric(&server, "reservoir_subscribers").await?, 2);

    // The authorized subscriber is served throughout.
    let before = workspace(&t.db, f.ws_a).await?.balance_sequence;
    server.record_usage(&token, f.ws_a, "served", 1_000).await?;
    let payload = next_payload(&mut mine, "mine", WAIT)
        .await?
        .ok_or_else(|| anyhow::anyhow!("ended"))?;
    assert!(payload["errors"].is_null(), "{payload}");
    assert!(payload["data"]["balanceChanged"]["sequence"].as_i64() > Some(before));

    drop((mine, theirs, anonymous, third));
    server.stop().await;
    t.finish().await
}

/// A shared subscriber whose channel fills is dropped as a hub subscriber is: what was
/// buffered, the "too slow" error (as async-graphql renders it for the document), the
/// end; the others keep receiving from the same execution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscriber_that_falls_behind_is_dropped_and_the_others_keep_receiving()
-> anyhow::Result<()> {
    use api::shared_feed::{self, Eligible, Execute, SharedFeeds};
    let t = TestDb::new().await?;
    let now = chrono::Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    fund(&t.db, f.ws_a, "10", now).await?;
    let hub = BalanceHub::start(
        t.db.clone(),
        HubConfig {
            poll_interval_ms: 10,
            ..Default::default()
        },
    );
    let schema = api::schema::schema_builder(
        t.db.clone(),
        std::sync::Arc::new(billing::payments::SandboxGateway::new()),
        None,
    )
    .data(hub.clone())
    .finish();
    let mut session = async_graphql::Data::default();
    session.insert(api::schema::Caller(
        billing::accounts::auth::Principal::PlatformAdmin,
    ));
    let session = std::sync::Arc::new(session);
    let execute: Execute = std::sync::Arc::new(move |request| {
        async_graphql::Executor::execute_stream(&schema, request, Some(session.clone()))
    });
    let request = async_graphql::Request::new(SHARED_BALANCE).variables(
        async_graphql::Variables::from_json(json!({ "id": f.ws_a.to_string() })),
    );
    let eligible = Eligible::of(&request).ok_or_else(|| anyhow::anyhow!("not eligible"))?;
    let feeds = SharedFeeds::new(2);
    let mut fast = shared_feed::subscribe(feeds.clone(), eligible.clone(), execute.clone());
    let mut slow = shared_feed::subscribe(feeds.clone(), eligible, execute);
    let sequence = |payload: &str| -> anyhow::Result<i64> {
        let value: Value = serde_json::from_str(payload)?;
        value["data"]["balanceChanged"]["sequence"]
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("{value}"))
    };
    // Both joined once both have seen an event; then drain.
    let (mut fast_seen, mut slow_seen) = (false, false);
    for i in 0..100 {
        usage::record_usage(&t.db, debit(f.ws_a, format!("warm-{i}")), now).await?;
        let wait = Duration::from_millis(300);
        fast_seen |= matches!(tokio::time::timeout(wait, fast.next()).await, Ok(Some(_)));
        slow_seen |= matches!(tokio::time::timeout(wait, slow.next()).await, Ok(Some(_)));
        if fast_seen && slow_seen {
            break;
        }
    }
    assert!(fast_seen && slow_seen, "the feed never delivered");
    let quiet = Duration::from_millis(300);
    while let Ok(Some(_)) = tokio::time::timeout(quiet, fast.next()).await {}
    while let Ok(Some(_)) = tokio::time::timeout(quiet, slow.next()).await {}
    assert_eq!(feeds.feed_count(), 1);
    assert_eq!(hub.subscriber_count(), 2);

    let mut seen = Vec::new();
    for i in 0..4 {
        usage::record_usage(&t.db, debit(f.ws_a, format!("d-{i}")), now).await?;
        let payload = tokio::time::timeout(WAIT, fast.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("ended"))?;
        seen.push(sequence(&payload)?);
    }
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
    assert_eq!(hub.subscriber_count(), 1, "the slow subscriber was dropped");

    let mut got = Vec::new();
    while let Some(payload) = tokio::time::timeout(WAIT, slow.next()).await? {
        got.push(serde_json::from_str::<Value>(&payload)?);
    }
    assert_eq!(got.len(), 3, "{got:?}");
    for (value, expected) in got[..2].iter().zip(&seen) {
        assert_eq!(
            value["data"]["balanceChanged"]["sequence"].as_i64(),
            Some(*expected)
        );
    }
    let error = &got[2]["errors"][0];
    assert_eq!(error["message"], "subscriber too slow; resubscribe");
    assert_eq!(error["extensions"]["code"], "LIMIT_EXCEEDED");
    assert_eq!(error["path"], json!(["balanceChanged"]));

    // The feed lives on for the fast one, and ends with it.
    drop(fast);
    assert_eq!(feeds.feed_count(), 0);
    assert_eq!(hub.subscriber_count(), 0);
    hub.shutdown();
    t.finish().await
}
