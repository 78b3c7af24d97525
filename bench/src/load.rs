//! The HTTP load loop: `clients` tasks over one keep-alive `reqwest::Client`, each
//! looping request → response until the measured window ends. Request bodies are
//! pre-built strings in which only the request id is substituted; responses are
//! checked for `"errors"` and parsed only as far as needed.

use crate::hist::Histogram;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

/// Tokens of every usage call (and of every settlement).
pub const PROMPT_TOKENS: u32 = 100;
pub const COMPLETION_TOKENS: u32 = 50;
/// The worst case reserved by `reserveCredits`.
const MAX_PROMPT_TOKENS: u32 = 200;
const MAX_COMPLETION_TOKENS: u32 = 100;
/// A call that takes longer than this is a TRANSPORT error (and its outcome unknown).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The measured window: warm-up ends at `start`, the run at `end`.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub start: Instant,
    pub end: Instant,
}

impl Window {
    pub fn after(warmup: Duration, duration: Duration) -> Self {
        let start = Instant::now() + warmup;
        Self {
            start,
            end: start + duration,
        }
    }

    /// A window that has not begun (for calls made before a run: nothing is measured).
    pub fn never() -> Self {
        let start = Instant::now() + Duration::from_secs(365 * 86_400);
        Self { start, end: start }
    }

    pub fn holds(&self, t: Instant) -> bool {
        t >= self.start && t <= self.end
    }
}

/// What one client saw. Merged over clients at the end.
#[derive(Debug, Default)]
pub struct Stats {
    /// HTTP calls completed inside the window.
    pub requests: u64,
    /// Usage events (or batch items, or reserve+settle pairs, or dashboard queries)
    /// completed inside the window, admitted or refused.
    pub ops: u64,
    /// Calls that started and ended inside the window.
    pub latency: Histogram,
    /// Error codes of calls completed inside the window.
    pub errors: BTreeMap<String, u64>,
    /// Error codes over the whole run (warm-up and tail included).
    pub errors_whole_run: BTreeMap<String, u64>,
    /// Debits the server confirmed, over the whole run.
    pub admitted: u64,
    /// Debits whose outcome is unknown (transport failure): they may have been admitted.
    pub ambiguous: u64,
    /// HTTP calls over the whole run.
    pub calls_whole_run: u64,
}

/// The result of one HTTP call, as far as the counters are concerned.
#[derive(Debug, Default)]
struct Outcome {
    ops: u64,
    admitted: u64,
    ambiguous: u64,
    errors: Vec<(String, u64)>,
}

impl Outcome {
    fn ok(ops: u64, admitted: u64) -> Self {
        Self {
            ops,
            admitted,
            ..Self::default()
        }
    }

    fn error(code: String, ops: u64) -> Self {
        Self {
            ops,
            errors: vec![(code, 1)],
            ..Self::default()
        }
    }
}

impl Stats {
    fn call(&mut self, window: &Window, t0: Instant, t1: Instant, outcome: Outcome) {
        self.calls_whole_run += 1;
        self.admitted += outcome.admitted;
        self.ambiguous += outcome.ambiguous;
        let completed_in_window = window.holds(t1);
        if completed_in_window {
            self.requests += 1;
            self.ops += outcome.ops;
            if window.holds(t0) {
                self.latency.record(t1 - t0);
            }
        }
        for (code, n) in outcome.errors {
            if completed_in_window {
                *self.errors.entry(code.clone()).or_default() += n;
            }
            *self.errors_whole_run.entry(code).or_default() += n;
        }
    }

    pub fn merge(&mut self, other: Stats) {
        self.requests += other.requests;
        self.ops += other.ops;
        self.latency.merge(&other.latency);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in other.errors_whole_run {
            *self.errors_whole_run.entry(k).or_default() += v;
        }
        self.admitted += other.admitted;
        self.ambiguous += other.ambiguous;
        self.calls_whole_run += other.calls_whole_run;
    }
}

#[derive(Debug)]
pub enum Kind {
    /// One `recordUsage` per iteration (usage-hot, usage-spread, subscribe).
    Usage,
    /// One `recordUsageBatch` of `size` items per iteration.
    Batch { size: usize },
    /// `reserveCredits` then `settleReservation`.
    ReserveSettle,
    /// A fixed read-only query (the dashboard).
    Query { body: &'static str },
}

pub struct Load {
    client: reqwest::Client,
    endpoint: String,
    kind: Kind,
    /// Credentials; a usage call picks one at random (one for every scenario but
    /// usage-spread).
    auths: Vec<HeaderValue>,
    t: Templates,
}

/// Body pieces around the request id (or reservation id).
#[derive(Default)]
struct Templates {
    usage: (String, String),
    batch: (String, String),
    batch_item: (String, String),
    reserve: (String, String),
    settle: (String, String),
}

/// A body prefix `{"query":<q>,"variables":{"<var>":"` and its suffix `"}}`.
fn around(query: &str, var: &str) -> anyhow::Result<(String, String)> {
    Ok((
        format!(
            r#"{{"query":{},"variables":{{"{var}":""#,
            serde_json::to_string(query)?
        ),
        r#""}}"#.to_owned(),
    ))
}

impl Load {
    pub fn new(
        client: reqwest::Client,
        base_url: &str,
        kind: Kind,
        auths: Vec<HeaderValue>,
        model_id: &str,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!auths.is_empty(), "no credentials to load with");
        let model = serde_json::to_string(model_id)?;
        let usage = around(
            &format!(
                "mutation($r: String!) {{ recordUsage(input: {{modelId: {model}, \
                 promptTokens: {PROMPT_TOKENS}, completionTokens: {COMPLETION_TOKENS}, \
                 requestId: $r}}) {{ id cost }} }}"
            ),
            "r",
        )?;
        let batch_query = serde_json::to_string(
            "mutation($i: [RecordUsageInput!]!) { recordUsageBatch(inputs: $i) { usage { id } errorCode } }",
        )?;
        let batch = (
            format!(r#"{{"query":{batch_query},"variables":{{"i":["#),
            "]}}".to_owned(),
        );
        let batch_item = (
            format!(
                r#"{{"modelId":{model},"promptTokens":{PROMPT_TOKENS},"completionTokens":{COMPLETION_TOKENS},"requestId":""#
            ),
            r#""}"#.to_owned(),
        );
        let reserve = around(
            &format!(
                "mutation($r: String!) {{ reserveCredits(input: {{modelId: {model}, \
                 maxPromptTokens: {MAX_PROMPT_TOKENS}, maxCompletionTokens: {MAX_COMPLETION_TOKENS}, \
                 requestId: $r}}) {{ id }} }}"
            ),
            "r",
        )?;
        let settle = around(
            &format!(
                "mutation($id: ID!) {{ settleReservation(input: {{reservationId: $id, \
                 promptTokens: {PROMPT_TOKENS}, completionTokens: {COMPLETION_TOKENS}}}) {{ id cost }} }}"
            ),
            "id",
        )?;
        Ok(Self {
            client,
            endpoint: format!("{}/graphql", base_url.trim_end_matches('/')),
            kind,
            auths,
            t: Templates {
                usage,
                batch,
                batch_item,
                reserve,
                settle,
            },
        })
    }

    async fn post(
        &self,
        auth: &HeaderValue,
        body: reqwest::Body,
    ) -> Result<(u16, Vec<u8>), reqwest::Error> {
        let response = self
            .client
            .post(&self.endpoint)
            .header(AUTHORIZATION, auth.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        Ok((status, bytes.to_vec()))
    }

    fn pick_auth(&self, rng: &mut Rng) -> &HeaderValue {
        let n = self.auths.len();
        let i = if n == 1 {
            0
        } else {
            (rng.next() % n as u64) as usize
        };
        &self.auths[i]
    }

    /// One iteration of the scenario: one or two HTTP calls, recorded into `stats`.
    async fn iteration(&self, rng: &mut Rng, stats: &mut Stats, window: &Window) {
        match &self.kind {
            Kind::Usage => {
                let auth = self.pick_auth(rng);
                let (t0, result, t1) = self.timed(auth, fill(&self.t.usage, &rid())).await;
                stats.call(window, t0, t1, usage_outcome(result));
            }
            Kind::Batch { size } => {
                let auth = self.pick_auth(rng);
                let (pre, post) = &self.t.batch;
                let (ipre, ipost) = &self.t.batch_item;
                let mut body =
                    String::with_capacity(pre.len() + post.len() + size * (ipre.len() + 40));
                body.push_str(pre);
                for i in 0..*size {
                    if i > 0 {
                        body.push(',');
                    }
                    body.push_str(ipre);
                    body.push_str(&rid());
                    body.push_str(ipost);
                }
                body.push_str(post);
                let (t0, result, t1) = self.timed(auth, body).await;
                stats.call(window, t0, t1, batch_outcome(result, *size as u64));
            }
            Kind::ReserveSettle => {
                let auth = self.pick_auth(rng);
                let (t0, result, t1) = self.timed(auth, fill(&self.t.reserve, &rid())).await;
                let reservation = match reserve_outcome(result) {
                    Ok(id) => {
                        stats.call(window, t0, t1, Outcome::ok(0, 0));
                        id
                    }
                    Err(outcome) => {
                        stats.call(window, t0, t1, outcome);
                        return;
                    }
                };
                let (t0, result, t1) = self.timed(auth, fill(&self.t.settle, &reservation)).await;
                stats.call(window, t0, t1, usage_outcome(result));
            }
            Kind::Query { body } => {
                let auth = self.pick_auth(rng);
                let t0 = Instant::now();
                let result = self.post(auth, reqwest::Body::from(*body)).await;
                let t1 = Instant::now();
                let outcome = match classify(result) {
                    Ok(_) => Outcome::ok(1, 0),
                    Err((code, _)) => Outcome::error(code, 1),
                };
                stats.call(window, t0, t1, outcome);
            }
        }
    }

    async fn timed(
        &self,
        auth: &HeaderValue,
        body: String,
    ) -> (Instant, Result<(u16, Vec<u8>), reqwest::Error>, Instant) {
        let t0 = Instant::now();
        let result = self.post(auth, reqwest::Body::from(body)).await;
        (t0, result, Instant::now())
    }

    /// One `recordUsage` outside any window (used to wake subscribers before a run).
    pub async fn probe_usage(&self, stats: &mut Stats) {
        let window = Window::never();
        let (t0, result, t1) = self
            .timed(&self.auths[0], fill(&self.t.usage, &rid()))
            .await;
        stats.call(&window, t0, t1, usage_outcome(result));
    }

    /// A single call of the fixed query, returning the body (to check it before a run).
    pub async fn query_once(&self) -> anyhow::Result<serde_json::Value> {
        let Kind::Query { body } = &self.kind else {
            anyhow::bail!("not a query load");
        };
        let (status, bytes) = self
            .post(&self.auths[0], reqwest::Body::from(*body))
            .await?;
        anyhow::ensure!(
            (200..300).contains(&status),
            "HTTP {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// Runs `clients` loops until the window ends; returns the merged counters.
pub async fn run(load: Arc<Load>, clients: usize, window: Window) -> anyhow::Result<Stats> {
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let load = load.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(i as u64);
            let mut stats = Stats::default();
            while Instant::now() < window.end {
                load.iteration(&mut rng, &mut stats, &window).await;
            }
            stats
        }));
    }
    let mut total = Stats::default();
    for task in tasks {
        total.merge(task.await?);
    }
    Ok(total)
}

pub fn http_client(pool: usize) -> anyhow::Result<reqwest::Client> {
    // Harmless when reqwest has no rustls; needed when feature unification gives it
    // `rustls-no-provider` (the bench only speaks plain HTTP).
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(pool)
        .tcp_nodelay(true)
        .timeout(REQUEST_TIMEOUT)
        .build()?)
}

/// A fresh request id (UUID v4, 32 hex digits).
fn rid() -> String {
    Uuid::new_v4().simple().to_string()
}

fn fill((pre, post): &(String, String), value: &str) -> String {
    let mut body = String::with_capacity(pre.len() + value.len() + post.len());
    body.push_str(pre);
    body.push_str(value);
    body.push_str(post);
    body
}

#[derive(Deserialize)]
struct GqlErrors {
    #[serde(default)]
    errors: Vec<GqlError>,
}

#[derive(Deserialize)]
struct GqlError {
    #[serde(default)]
    extensions: Option<Extensions>,
}

#[derive(Deserialize)]
struct Extensions {
    #[serde(default)]
    code: Option<String>,
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The first error's code of a GraphQL response body, if it has errors.
fn first_error_code(body: &[u8]) -> Option<String> {
    if !contains(body, br#""errors""#) {
        return None;
    }
    match serde_json::from_slice::<GqlErrors>(body) {
        Ok(parsed) => Some(
            parsed
                .errors
                .into_iter()
                .next()
                .and_then(|e| e.extensions.and_then(|x| x.code))
                .unwrap_or_else(|| "GRAPHQL_ERROR".to_owned()),
        ),
        Err(_) => Some("BAD_RESPONSE".to_owned()),
    }
}

/// The body of a successful call, or (error code, transport failure?).
fn classify(result: Result<(u16, Vec<u8>), reqwest::Error>) -> Result<Vec<u8>, (String, bool)> {
    match result {
        // A refused connection sent nothing; any other failure may have been processed.
        Err(e) => Err(("TRANSPORT".to_owned(), !e.is_connect())),
        Ok((status, body)) if !(200..300).contains(&status) => {
            // The GraphQL layer answers 200 even for errors; other statuses are refusals
            // before it (413, a bad token, a 503 from a proxy) and keep their code if any.
            Err((
                first_error_code(&body).unwrap_or_else(|| format!("HTTP_{status}")),
                false,
            ))
        }
        Ok((_, body)) => match first_error_code(&body) {
            Some(code) => Err((code, false)),
            None => Ok(body),
        },
    }
}

fn usage_outcome(result: Result<(u16, Vec<u8>), reqwest::Error>) -> Outcome {
    match classify(result) {
        Ok(_) => Outcome::ok(1, 1),
        Err((code, transport)) => Outcome {
            ambiguous: u64::from(transport),
            ..Outcome::error(code, 1)
        },
    }
}

#[derive(Deserialize)]
struct BatchResponse {
    data: Option<BatchData>,
}

#[derive(Deserialize)]
struct BatchData {
    #[serde(rename = "recordUsageBatch")]
    items: Vec<BatchItem>,
}

#[derive(Deserialize)]
struct BatchItem {
    #[serde(rename = "errorCode")]
    error_code: Option<String>,
}

/// Items admitted and refused; a whole-call failure counts once under its code, and
/// all its items as refused (or unknown on a transport failure).
fn batch_outcome(result: Result<(u16, Vec<u8>), reqwest::Error>, size: u64) -> Outcome {
    let (status, body) = match result {
        Err(e) => {
            return Outcome {
                ambiguous: if e.is_connect() { 0 } else { size },
                ..Outcome::error("TRANSPORT".to_owned(), size)
            };
        }
        Ok(x) => x,
    };
    let items = serde_json::from_slice::<BatchResponse>(&body)
        .ok()
        .and_then(|r| r.data)
        .map(|d| d.items);
    let Some(items) = items.filter(|_| (200..300).contains(&status)) else {
        let code = first_error_code(&body).unwrap_or_else(|| format!("HTTP_{status}"));
        return Outcome::error(code, size);
    };
    let mut outcome = Outcome::ok(items.len() as u64, 0);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for item in items {
        match item.error_code {
            None => outcome.admitted += 1,
            Some(code) => *errors.entry(code).or_default() += 1,
        }
    }
    outcome.errors = errors.into_iter().collect();
    outcome
}

#[derive(Deserialize)]
struct ReserveResponse {
    data: Option<ReserveData>,
}

#[derive(Deserialize)]
struct ReserveData {
    #[serde(rename = "reserveCredits")]
    reservation: IdOnly,
}

#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

/// The reservation id, or the failed pair's outcome (one op, refused).
fn reserve_outcome(result: Result<(u16, Vec<u8>), reqwest::Error>) -> Result<String, Outcome> {
    match classify(result) {
        Ok(body) => serde_json::from_slice::<ReserveResponse>(&body)
            .ok()
            .and_then(|r| r.data)
            .map(|d| d.reservation.id)
            .ok_or_else(|| Outcome::error("BAD_RESPONSE".to_owned(), 1)),
        // A reservation whose outcome is unknown reserves credits but is never a debit.
        Err((code, _)) => Err(Outcome::error(code, 1)),
    }
}

/// SplitMix64: a tiny per-task generator for picking workspaces.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes() {
        assert_eq!(
            first_error_code(br#"{"data":{"recordUsage":{"id":"x"}}}"#),
            None
        );
        assert_eq!(
            first_error_code(
                br#"{"data":null,"errors":[{"message":"m","extensions":{"code":"INSUFFICIENT_CREDITS"}}]}"#
            )
            .as_deref(),
            Some("INSUFFICIENT_CREDITS")
        );
    }

    #[test]
    fn batch_items_are_counted() {
        let body = br#"{"data":{"recordUsageBatch":[{"usage":{"id":"a"},"errorCode":null},{"usage":null,"errorCode":"BUDGET_EXCEEDED"}]}}"#;
        let outcome = batch_outcome(Ok((200, body.to_vec())), 2);
        assert_eq!(outcome.ops, 2);
        assert_eq!(outcome.admitted, 1);
        assert_eq!(outcome.errors, vec![("BUDGET_EXCEEDED".to_owned(), 1)]);
    }

    #[test]
    fn templates_are_json() -> anyhow::Result<()> {
        let load = Load::new(
            http_client(1)?,
            "http://x",
            Kind::Usage,
            vec![HeaderValue::from_static("Bearer x")],
            "openai/gpt-4o-mini",
        )?;
        for t in [&load.t.usage, &load.t.reserve, &load.t.settle] {
            let v: serde_json::Value = serde_json::from_str(&fill(t, "abc"))?;
            assert!(v["query"].is_string());
        }
        let (pre, post) = &load.t.batch;
        let body = format!("{pre}{}{post}", fill(&load.t.batch_item, "r1"));
        let v: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(v["variables"]["i"][0]["requestId"], "r1");
        Ok(())
    }
}
