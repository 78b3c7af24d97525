//! GraphQL subscriptions over WebSocket (`graphql-transport-ws`, and the older
//! `graphql-ws`), driven by a loop of our own over actix-ws rather than
//! async-graphql-actix-web's actor: this process decides how a connection ends. On
//! shutdown every open connection gets a close frame (1001, going away) at once, so a
//! client reconnects elsewhere instead of waiting for the server's drain timeout.
//!
//! The loop also answers shareable `balanceChanged` subscriptions itself (`Own`,
//! `crate::shared_feed`): identical ones of the process share one execution, and each
//! subscriber only gets the shared payload framed with its own id. Every other client
//! message goes to async-graphql's protocol machine, as before.

use crate::shared_feed::{self, Eligible, Execute, SharedFeeds};
use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, Session};
use async_graphql::http::{ALL_WEBSOCKET_PROTOCOLS, WebSocket, WebSocketProtocols, WsMessage};
use futures::stream::{AbortHandle, Abortable, BoxStream, SelectAll};
use futures::{SinkExt as _, StreamExt as _};
use std::collections::{HashMap, HashSet};
use std::str::FromStr as _;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often the server pings a quiet client, and how long it waits for any sign of
/// life before closing (what async-graphql-actix-web's actor did).
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest message a client may send (a subscribe with its query and variables).
const CLIENT_MESSAGE_BYTES_MAX: usize = 256 * 1024;

/// The process-wide shutdown signal every connection watches.
#[derive(Clone)]
pub struct Closing(watch::Receiver<bool>);

/// Flips [`Closing`] for every connection at once.
pub struct CloseAll(watch::Sender<bool>);

pub fn closing() -> (CloseAll, Closing) {
    let (tx, rx) = watch::channel(false);
    (CloseAll(tx), Closing(rx))
}

impl CloseAll {
    /// Asks every open connection to send its close frame and end.
    pub fn close_all(&self) {
        self.0.send_replace(true);
    }
}

impl Closing {
    async fn wait(&mut self) {
        // An error means the sender is gone: the server is being torn down anyway.
        let _ = self.0.wait_for(|closing| *closing).await;
    }
}

/// What `connection_init` established: handed to async-graphql's protocol machine as
/// its connection data, and kept by the loop for the subscriptions it runs itself
/// (`crate::shared_feed`), so both see the same caller.
pub trait SessionData: Send + 'static {
    fn to_data(&self) -> async_graphql::Data;
}

/// Upgrades the request and runs the connection on this worker's event loop until
/// the client leaves, the protocol ends it, or the process shuts down. `guard` is
/// held for as long as the connection is open (the connection-count slot).
/// Subscriptions `crate::shared_feed` can share join `feeds`; the others go to
/// async-graphql's machine.
pub fn serve<E, S, OnInit, InitFut>(
    http: &HttpRequest,
    payload: web::Payload,
    executor: E,
    on_init: OnInit,
    feeds: Arc<SharedFeeds>,
    closing: Closing,
    guard: impl Send + 'static,
) -> actix_web::Result<HttpResponse>
where
    E: async_graphql::Executor,
    S: SessionData,
    OnInit: FnOnce(serde_json::Value) -> InitFut + Send + 'static,
    InitFut: Future<Output = async_graphql::Result<S>> + Send + 'static,
{
    let protocol = http
        .headers()
        .get(actix_web::http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|value| value.to_str().ok())
        .and_then(|offered| {
            offered
                .split(',')
                .find_map(|p| WebSocketProtocols::from_str(p.trim()).ok())
        })
        .ok_or_else(|| {
            actix_web::error::ErrorBadRequest(
                "Sec-WebSocket-Protocol must offer graphql-transport-ws or graphql-ws",
            )
        })?;
    let (response, session, messages) =
        actix_ws::handle_with_protocols(http, payload, &ALL_WEBSOCKET_PROTOCOLS)?;
    let messages = messages
        .max_frame_size(CLIENT_MESSAGE_BYTES_MAX)
        .aggregate_continuations()
        .max_continuation_size(CLIENT_MESSAGE_BYTES_MAX);
    // The session data is kept here too, once connection_init succeeded.
    let established = Arc::new(OnceLock::<Arc<async_graphql::Data>>::new());
    let keep = established.clone();
    let on_init = move |init| {
        let init = on_init(init);
        async move {
            let session = init.await?;
            let _ = keep.set(Arc::new(session.to_data()));
            Ok(session.to_data())
        }
    };
    // Client messages reach async-graphql's protocol machine through a channel, so
    // the loop below owns the socket and can close it whatever the machine is doing.
    let (to_graphql, from_client) = futures::channel::mpsc::channel::<Vec<u8>>(16);
    let graphql =
        WebSocket::new(executor.clone(), from_client, protocol).on_connection_init(on_init);
    let own = Own::new(protocol, executor, established, feeds);
    actix_web::rt::spawn(async move {
        let _guard = guard;
        run(session, messages, to_graphql, graphql, own, closing).await;
    });
    Ok(response)
}

/// Where a `graphql-transport-ws` connection is in its handshake. The protocol's close
/// codes are decided here, before a message reaches async-graphql (which would treat a
/// malformed init as anonymous and a subscribe before init as an internal error).
#[derive(Default)]
struct Handshake {
    init_seen: bool,
    acked: bool,
}

/// The close code and reason for a client message the protocol forbids; None when the
/// message may go on. See the graphql-transport-ws spec (PROTOCOL.md, "Connection init"
/// and "Subscribe").
fn refuse(handshake: &mut Handshake, bytes: &[u8]) -> Option<(CloseCode, &'static str)> {
    let invalid = (CloseCode::Other(4400), "Invalid message received");
    let Ok(message) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Some(invalid);
    };
    match message.get("type").and_then(serde_json::Value::as_str) {
        Some("connection_init") => {
            if handshake.init_seen {
                return Some((CloseCode::Other(4429), "Too many initialisation requests"));
            }
            handshake.init_seen = true;
            let payload_ok = match message.get("payload") {
                None | Some(serde_json::Value::Null) => true,
                Some(serde_json::Value::Object(fields)) => ["authorization", "Authorization"]
                    .iter()
                    .filter_map(|key| fields.get(*key))
                    .all(serde_json::Value::is_string),
                Some(_) => false,
            };
            (!payload_ok).then_some(invalid)
        }
        Some("subscribe") if !handshake.acked => Some((CloseCode::Other(4401), "Unauthorized")),
        Some(_) => None,
        None => Some(invalid),
    }
}

/// What ended a connection, and the close frame it gets.
fn close_reason(code: CloseCode, why: &str) -> Option<CloseReason> {
    Some(CloseReason {
        code,
        description: Some(why.to_owned()),
    })
}

async fn run(
    mut session: Session,
    mut messages: actix_ws::AggregatedMessageStream,
    mut to_graphql: futures::channel::mpsc::Sender<Vec<u8>>,
    graphql: impl futures::Stream<Item = WsMessage>,
    mut own: Own,
    mut closing: Closing,
) {
    let mut graphql = std::pin::pin!(graphql);
    // Only the current protocol's handshake is policed; the legacy one keeps
    // async-graphql's behaviour.
    let mut handshake = (own.protocol == WebSocketProtocols::GraphQLWS).then(Handshake::default);
    let first_beat = tokio::time::Instant::now() + HEARTBEAT_INTERVAL;
    let mut heartbeat = tokio::time::interval_at(first_beat, HEARTBEAT_INTERVAL);
    let mut last_heard = Instant::now();
    let reason = loop {
        tokio::select! {
            () = closing.wait() => {
                break close_reason(CloseCode::Away, "server shutting down");
            }
            from_client = messages.next() => {
                last_heard = Instant::now();
                let bytes = match from_client {
                    Some(Ok(AggregatedMessage::Text(text))) => text.into_bytes().to_vec(),
                    Some(Ok(AggregatedMessage::Binary(bytes))) => bytes.to_vec(),
                    Some(Ok(AggregatedMessage::Ping(bytes))) => {
                        if session.pong(&bytes).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => continue,
                    Some(Ok(AggregatedMessage::Close(reason))) => break reason,
                    Some(Err(e)) => break close_reason(CloseCode::Protocol, &e.to_string()),
                    None => return,
                };
                match dispatch(bytes, &mut session, handshake.as_mut(), &mut own, &mut to_graphql).await {
                    Step::Go => {}
                    Step::Close(reason) => break reason,
                    Step::Gone => return,
                }
            }
            to_client = graphql.next() => match to_client {
                Some(WsMessage::Text(text)) => {
                    own.machine_sent(&text);
                    if let Some(h) = handshake.as_mut().filter(|h| !h.acked) {
                        h.acked = text.contains("\"connection_ack\"");
                    }
                    if session.text(text).await.is_err() {
                        return;
                    }
                }
                // async-graphql answers a refused connection_init with 1002; the
                // protocol says 4403 Forbidden.
                Some(WsMessage::Close(1002, why)) if handshake.as_ref().is_some_and(|h| !h.acked) => {
                    break close_reason(CloseCode::Other(4403), &format!("Forbidden: {why}"));
                }
                Some(WsMessage::Close(code, why)) => break close_reason(code.into(), &why),
                None => break None,
            },
            Some(text) = own.next() => {
                if session.text(text).await.is_err() {
                    return;
                }
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > CLIENT_TIMEOUT {
                    break close_reason(CloseCode::Away, "no answer to pings");
                }
                if session.ping(b"").await.is_err() {
                    return;
                }
            }
        }
    };
    // An error here means the client is already gone: nothing left to tell it.
    let _ = session.close(reason).await;
}

/// What the connection does after a client message.
enum Step {
    /// Goes on.
    Go,
    /// Ends with this close frame.
    Close(Option<CloseReason>),
    /// The client is gone: nothing left to tell it.
    Gone,
}

/// A client's text or binary message: refused by the handshake, answered here (a
/// shared subscription, `crate::shared_feed`), or handed to async-graphql's machine.
async fn dispatch(
    bytes: Vec<u8>,
    session: &mut Session,
    handshake: Option<&mut Handshake>,
    own: &mut Own,
    to_graphql: &mut futures::channel::mpsc::Sender<Vec<u8>>,
) -> Step {
    if let Some((code, why)) = handshake.and_then(|h| refuse(h, &bytes)) {
        return Step::Close(close_reason(code, why));
    }
    match own.take(&bytes) {
        Taken::No => {}
        Taken::Yes => return Step::Go,
        Taken::Answer(text) => {
            return match session.text(text).await {
                Ok(()) => Step::Go,
                Err(_) => Step::Gone,
            };
        }
    }
    match to_graphql.send(bytes).await {
        Ok(()) => Step::Go,
        Err(_) => Step::Close(None),
    }
}

/// What the loop does with a client message.
enum Taken {
    /// Not ours: async-graphql's machine handles it.
    No,
    /// Handled here, nothing to answer now.
    Yes,
    /// Handled here; this is the answer.
    Answer(String),
}

/// A client message as far as the loop reads it.
#[derive(serde::Deserialize)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    id: Option<String>,
    payload: Option<serde_json::Value>,
}

/// An item of one of the loop's own subscriptions.
enum OwnItem {
    /// A message to send as is.
    Text(String),
    /// The subscription `id` (of generation `generation`) ended: `complete`.
    End(String, u64),
}

/// The subscriptions this connection runs itself (shared balance subscriptions), and
/// the ids of those async-graphql's machine runs (so an id is never live in both).
struct Own {
    protocol: WebSocketProtocols,
    executor: Execute,
    /// The connection data, once connection_init succeeded.
    established: Arc<OnceLock<Arc<async_graphql::Data>>>,
    feeds: Arc<SharedFeeds>,
    running: HashMap<String, (u64, AbortHandle)>,
    streams: SelectAll<BoxStream<'static, OwnItem>>,
    generation: u64,
    machine_ids: HashSet<String>,
}

impl Own {
    fn new<E: async_graphql::Executor>(
        protocol: WebSocketProtocols,
        executor: E,
        established: Arc<OnceLock<Arc<async_graphql::Data>>>,
        feeds: Arc<SharedFeeds>,
    ) -> Self {
        let data = established.clone();
        let execute: Execute =
            Arc::new(move |request| executor.execute_stream(request, data.get().cloned()));
        Self {
            protocol,
            executor: execute,
            established,
            feeds,
            running: HashMap::new(),
            streams: SelectAll::new(),
            generation: 0,
            machine_ids: HashSet::new(),
        }
    }

    /// Takes a `subscribe` this loop can share and a `complete` of one of its own;
    /// notes the ids of the subscriptions it leaves to async-graphql's machine.
    fn take(&mut self, bytes: &[u8]) -> Taken {
        let Ok(message) = serde_json::from_slice::<ClientMessage>(bytes) else {
            return Taken::No;
        };
        let Some(id) = message.id else {
            return Taken::No;
        };
        match message.kind.as_str() {
            "subscribe" | "start" => self.take_subscribe(id, message.payload),
            "complete" | "stop" => {
                self.machine_ids.remove(&id);
                match self.running.remove(&id) {
                    Some((_, abort)) => {
                        abort.abort();
                        // What async-graphql's machine answers to a `complete` too.
                        Taken::Answer(complete_message(&id))
                    }
                    None => Taken::No,
                }
            }
            _ => Taken::No,
        }
    }

    fn take_subscribe(&mut self, id: String, payload: Option<serde_json::Value>) -> Taken {
        // Before connection_init succeeded, the machine answers as it always did.
        let eligible = self
            .established
            .get()
            .filter(|_| !self.machine_ids.contains(&id))
            .and(payload)
            .and_then(|p| serde_json::from_value::<async_graphql::Request>(p).ok())
            .and_then(|request| Eligible::of(&request));
        // A new subscription under a live id replaces it, as in the machine.
        if let Some((_, abort)) = self.running.remove(&id) {
            abort.abort();
        }
        let Some(eligible) = eligible else {
            self.machine_ids.insert(id);
            return Taken::No;
        };
        self.start(id, eligible);
        Taken::Yes
    }

    fn start(&mut self, id: String, eligible: Eligible) {
        self.generation += 1;
        let generation = self.generation;
        let next = match self.protocol {
            WebSocketProtocols::GraphQLWS => "next",
            WebSocketProtocols::SubscriptionsTransportWS => "data",
        };
        let prefix = format!(
            "{{\"type\":\"{next}\",\"id\":{},\"payload\":",
            json_string(&id)
        );
        let payloads = shared_feed::subscribe(self.feeds.clone(), eligible, self.executor.clone())
            .map(move |payload| {
                // The shared bytes, framed with this subscriber's id.
                let mut text = String::with_capacity(prefix.len() + payload.len() + 1);
                text.push_str(&prefix);
                text.push_str(&payload);
                text.push('}');
                OwnItem::Text(text)
            });
        let end = futures::stream::once(std::future::ready(OwnItem::End(id.clone(), generation)));
        let (abort, registration) = AbortHandle::new_pair();
        self.running.insert(id, (generation, abort));
        self.streams
            .push(Abortable::new(payloads.chain(end), registration).boxed());
    }

    /// Notes a subscription of the machine that ended.
    fn machine_sent(&mut self, text: &str) {
        if self.machine_ids.is_empty() || !text.starts_with("{\"type\":\"complete\"") {
            return;
        }
        if let Ok(ClientMessage { id: Some(id), .. }) = serde_json::from_str(text) {
            self.machine_ids.remove(&id);
        }
    }

    /// The next message of the loop's own subscriptions; pending while there is none.
    async fn next(&mut self) -> Option<String> {
        loop {
            if self.streams.is_empty() {
                return std::future::pending().await;
            }
            match self.streams.next().await? {
                OwnItem::Text(text) => return Some(text),
                OwnItem::End(id, generation) => {
                    if self.running.get(&id).is_some_and(|(g, _)| *g == generation) {
                        self.running.remove(&id);
                        return Some(complete_message(&id));
                    }
                }
            }
        }
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

fn complete_message(id: &str) -> String {
    format!("{{\"type\":\"complete\",\"id\":{}}}", json_string(id))
}
