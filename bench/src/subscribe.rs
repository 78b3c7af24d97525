//! `balanceChanged` subscribers over WebSocket (`graphql-transport-ws`): one
//! lightweight reader task per connection, checking that sequences are consecutive
//! and measuring delivery latency (receive time − the event's `at`).

use crate::hist::Histogram;
use crate::load::Window;
use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connections opened at once.
const CONNECT_IN_FLIGHT: usize = 32;
/// Longest wait for the upgrade and the `connection_ack`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A sequence not seen yet.
const NONE: i64 = i64::MIN;

const QUERY: &str = "subscription($w: ID!) { balanceChanged(workspaceId: $w) { sequence at } }";

/// What one subscriber saw.
#[derive(Debug, Default)]
struct SubStats {
    first: Option<i64>,
    last: Option<i64>,
    delivered: u64,
    /// Jumps of more than one between consecutive sequences.
    gaps: u64,
    /// A sequence not above the previous one.
    out_of_order: u64,
    /// Deliveries received inside the measured window.
    latency: Histogram,
    /// Why the subscription ended early (None: still live when the bench stopped).
    ended: Option<String>,
}

struct Shared {
    started: AtomicUsize,
    last: Vec<AtomicI64>,
    ended: Vec<AtomicBool>,
    window: OnceLock<Window>,
}

pub struct Subscribers {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<SubStats>>,
    shared: Arc<Shared>,
}

/// Totals over every subscriber.
#[derive(Debug, Default)]
pub struct SubReport {
    pub subscribers: usize,
    pub delivered: u64,
    /// Σ (last − first + 1) over subscribers that received anything.
    pub expected: u64,
    pub gaps: u64,
    pub out_of_order: u64,
    pub latency: Histogram,
    /// Early ends by reason (`WS_LIMIT_EXCEEDED` for a subscriber the server dropped
    /// as too slow, `WS_CLOSED`, `WS_ERROR`, `WS_COMPLETE`).
    pub ended: BTreeMap<String, u64>,
    /// Σ (final sequence − last received) over subscribers: events never delivered.
    pub undelivered_tail: u64,
}

/// The soft open-files limit of this process (from /proc/self/limits), if known.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Fails early, with the fix, when the open-files limit cannot hold the connections.
pub fn check_open_files(needed: u64) -> anyhow::Result<()> {
    if let Some(limit) = open_files_limit()
        && limit < needed
    {
        bail!(
            "the open-files limit is {limit}, but this run needs about {needed} descriptors; \
             raise it first with `ulimit -n 4096` (or more) in this shell, and start the \
             server from a shell with the same limit"
        );
    }
    Ok(())
}

fn emfile_hint(e: tungstenite::Error) -> anyhow::Error {
    if let tungstenite::Error::Io(io) = &e
        && io.raw_os_error() == Some(24)
    {
        return anyhow::anyhow!(
            "too many open files (EMFILE) while opening WebSocket connections: \
             run `ulimit -n 4096` (or more) first, for the bench and the server"
        );
    }
    e.into()
}

/// Opens `n` connections, each authenticated with `token` and subscribed to the
/// workspace's balance changes, and starts their readers.
pub async fn open(
    ws_url: &str,
    token: &str,
    workspace_id: Uuid,
    n: usize,
) -> anyhow::Result<Subscribers> {
    let init = json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {token}") } })
        .to_string();
    let subscribe = json!({
        "id": "1", "type": "subscribe",
        "payload": { "query": QUERY, "variables": { "w": workspace_id.to_string() } }
    })
    .to_string();
    let connections: Vec<Ws> = futures::stream::iter(0..n)
        .map(|_| connect_one(ws_url, &init, &subscribe))
        .buffer_unordered(CONNECT_IN_FLIGHT)
        .try_collect()
        .await?;
    let shared = Arc::new(Shared {
        started: AtomicUsize::new(0),
        last: (0..n).map(|_| AtomicI64::new(NONE)).collect(),
        ended: (0..n).map(|_| AtomicBool::new(false)).collect(),
        window: OnceLock::new(),
    });
    let (stop, stop_rx) = watch::channel(false);
    let tasks = connections
        .into_iter()
        .enumerate()
        .map(|(i, ws)| tokio::spawn(read(ws, i, shared.clone(), stop_rx.clone())))
        .collect();
    Ok(Subscribers {
        stop,
        tasks,
        shared,
    })
}

async fn connect_one(url: &str, init: &str, subscribe: &str) -> anyhow::Result<Ws> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("graphql-transport-ws"),
    );
    let (mut ws, _) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_tungstenite::connect_async(request))
            .await
            .context("WebSocket upgrade timed out")?
            .map_err(emfile_hint)?;
    ws.send(Message::text(init)).await?;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        while let Some(message) = ws.next().await {
            if let Message::Text(text) = message? {
                let value: Value = serde_json::from_str(text.as_str())?;
                match value["type"].as_str() {
                    Some("connection_ack") => return Ok(()),
                    Some("ping") => {
                        ws.send(Message::text(r#"{"type":"pong"}"#)).await?;
                    }
                    _ => bail!("expected connection_ack, got {value}"),
                }
            }
        }
        bail!("the server closed the connection before connection_ack (bad token?)")
    })
    .await
    .context("no connection_ack")??;
    ws.send(Message::text(subscribe)).await?;
    Ok(ws)
}

#[derive(Deserialize)]
struct NextMessage<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(borrow)]
    payload: Option<NextPayload<'a>>,
}

#[derive(Deserialize)]
struct NextPayload<'a> {
    #[serde(borrow)]
    data: Option<NextData<'a>>,
}

#[derive(Deserialize)]
struct NextData<'a> {
    #[serde(rename = "balanceChanged", borrow)]
    change: Option<Change<'a>>,
}

#[derive(Deserialize)]
struct Change<'a> {
    sequence: i64,
    at: &'a str,
}

/// What a text frame means to a reader.
enum Frame {
    Change {
        sequence: i64,
        at: DateTime<Utc>,
    },
    Ping,
    /// The subscription ended, with this reason.
    End(String),
    Ignore,
}

fn parse_frame(text: &str) -> Frame {
    // The fast path: a `next` with data.
    if let Ok(m) = serde_json::from_str::<NextMessage<'_>>(text)
        && m.kind == "next"
        && let Some(change) = m.payload.and_then(|p| p.data).and_then(|d| d.change)
    {
        return match DateTime::parse_from_rfc3339(change.at) {
            Ok(at) => Frame::Change {
                sequence: change.sequence,
                at: at.with_timezone(&Utc),
            },
            Err(_) => Frame::End("WS_BAD_TIMESTAMP".into()),
        };
    }
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return Frame::End("WS_BAD_MESSAGE".into());
    };
    let code = |errors: &Value| {
        errors[0]["extensions"]["code"]
            .as_str()
            .unwrap_or("GRAPHQL_ERROR")
            .to_owned()
    };
    match value["type"].as_str() {
        Some("ping") => Frame::Ping,
        Some("pong") => Frame::Ignore,
        // A `next` without data carries the error that ends the stream (e.g. a
        // subscriber the hub dropped as too slow: LIMIT_EXCEEDED), then `complete`.
        Some("next") => Frame::End(format!("WS_{}", code(&value["payload"]["errors"]))),
        Some("error") => Frame::End(format!("WS_{}", code(&value["payload"]))),
        Some("complete") => Frame::End("WS_COMPLETE".into()),
        _ => Frame::Ignore,
    }
}

async fn read(
    mut ws: Ws,
    i: usize,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> SubStats {
    let mut s = SubStats::default();
    loop {
        let message = tokio::select! {
            biased;
            _ = stop.changed() => break,
            m = ws.next() => m,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | None => {
                s.ended = Some("WS_CLOSED".into());
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) => {
                s.ended = Some("WS_ERROR".into());
                break;
            }
        };
        let received = Instant::now();
        match parse_frame(text.as_str()) {
            Frame::Change { sequence, at } => {
                let latency_us = (Utc::now() - at).num_microseconds().unwrap_or(0).max(0);
                if let Some(window) = shared.window.get()
                    && window.holds(received)
                {
                    s.latency.record_us(latency_us as u64);
                }
                match s.last {
                    None => {
                        s.first = Some(sequence);
                        shared.started.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(last) if sequence > last + 1 => s.gaps += 1,
                    Some(last) if sequence <= last => s.out_of_order += 1,
                    Some(_) => {}
                }
                s.last = Some(s.last.map_or(sequence, |l| l.max(sequence)));
                s.delivered += 1;
                shared.last[i].store(s.last.unwrap_or(NONE), Ordering::Relaxed);
            }
            Frame::Ping => {
                if ws.send(Message::text(r#"{"type":"pong"}"#)).await.is_err() {
                    s.ended = Some("WS_ERROR".into());
                    break;
                }
            }
            Frame::End(reason) => {
                s.ended = Some(reason);
                break;
            }
            Frame::Ignore => {}
        }
    }
    shared.ended[i].store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    s
}

impl Subscribers {
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Subscribers that have received at least one event.
    pub fn started(&self) -> usize {
        self.shared.started.load(Ordering::Relaxed)
    }

    /// Latency is recorded for deliveries received inside this window.
    pub fn set_window(&self, window: Window) {
        let _ = self.shared.window.set(window);
    }

    /// Subscribers that are done: they have seen `sequence`, or they ended.
    pub fn caught_up(&self, sequence: i64) -> usize {
        (0..self.len())
            .filter(|&i| {
                self.shared.ended[i].load(Ordering::Relaxed)
                    || self.shared.last[i].load(Ordering::Relaxed) >= sequence
            })
            .count()
    }

    /// Stops the readers and adds up what they saw; `final_sequence` is the
    /// workspace's last balance sequence.
    pub async fn finish(self, final_sequence: i64) -> anyhow::Result<SubReport> {
        let _ = self.stop.send(true);
        let mut report = SubReport {
            subscribers: self.tasks.len(),
            ..SubReport::default()
        };
        for task in self.tasks {
            let s = task.await?;
            report.delivered += s.delivered;
            report.gaps += s.gaps;
            report.out_of_order += s.out_of_order;
            report.latency.merge(&s.latency);
            if let (Some(first), Some(last)) = (s.first, s.last) {
                report.expected += u64::try_from(last - first + 1).unwrap_or(0);
                report.undelivered_tail += u64::try_from(final_sequence - last).unwrap_or(0);
            }
            if let Some(reason) = s.ended {
                *report.ended.entry(reason).or_default() += 1;
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        let next = r#"{"id":"1","type":"next","payload":{"data":{"balanceChanged":{"sequence":7,"at":"2026-01-02T03:04:05.123456Z"}}}}"#;
        assert!(matches!(
            parse_frame(next),
            Frame::Change { sequence: 7, .. }
        ));
        let dropped = r#"{"id":"1","type":"next","payload":{"data":null,"errors":[{"message":"subscriber too slow; resubscribe","extensions":{"code":"LIMIT_EXCEEDED"}}]}}"#;
        assert!(matches!(parse_frame(dropped), Frame::End(r) if r == "WS_LIMIT_EXCEEDED"));
        assert!(matches!(parse_frame(r#"{"type":"ping"}"#), Frame::Ping));
        assert!(
            matches!(parse_frame(r#"{"id":"1","type":"complete"}"#), Frame::End(r) if r == "WS_COMPLETE")
        );
    }
}
