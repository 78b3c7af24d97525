//! GraphQL subscriptions over WebSocket (`graphql-transport-ws`, and the older
//! `graphql-ws`), driven by a loop of our own over actix-ws rather than
//! async-graphql-actix-web's actor: this process decides how a connection ends. On
//! shutdown every open connection gets a close frame (1001, going away) at once, so a
//! client reconnects elsewhere instead of waiting for the server's drain timeout.

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, Session};
use async_graphql::http::{ALL_WEBSOCKET_PROTOCOLS, WebSocket, WebSocketProtocols, WsMessage};
use futures::{SinkExt as _, StreamExt as _};
use std::str::FromStr as _;
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

/// Upgrades the request and runs the connection on this worker's event loop until
/// the client leaves, the protocol ends it, or the process shuts down. `guard` is
/// held for as long as the connection is open (the connection-count slot).
pub fn serve<E, OnInit, InitFut>(
    http: &HttpRequest,
    payload: web::Payload,
    executor: E,
    on_init: OnInit,
    closing: Closing,
    guard: impl Send + 'static,
) -> actix_web::Result<HttpResponse>
where
    E: async_graphql::Executor,
    OnInit: FnOnce(serde_json::Value) -> InitFut + Send + 'static,
    InitFut: Future<Output = async_graphql::Result<async_graphql::Data>> + Send + 'static,
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
    // Client messages reach async-graphql's protocol machine through a channel, so
    // the loop below owns the socket and can close it whatever the machine is doing.
    let (to_graphql, from_client) = futures::channel::mpsc::channel::<Vec<u8>>(16);
    let graphql = WebSocket::new(executor, from_client, protocol).on_connection_init(on_init);
    actix_web::rt::spawn(async move {
        let _guard = guard;
        run(session, messages, to_graphql, graphql, protocol, closing).await;
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
    protocol: WebSocketProtocols,
    mut closing: Closing,
) {
    let mut graphql = std::pin::pin!(graphql);
    // Only the current protocol's handshake is policed; the legacy one keeps
    // async-graphql's behaviour.
    let mut handshake = (protocol == WebSocketProtocols::GraphQLWS).then(Handshake::default);
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
                if let Some((code, why)) = handshake.as_mut().and_then(|h| refuse(h, &bytes)) {
                    break close_reason(code, why);
                }
                if to_graphql.send(bytes).await.is_err() {
                    break None;
                }
            }
            to_client = graphql.next() => match to_client {
                Some(WsMessage::Text(text)) => {
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
