//! Usage debits sent over HTTP the way a gateway sends them (`recordUsage` through an
//! API key), each with the answer it got, for the fault tests: what was acknowledged
//! must be in the ledger once, and what was not may be sent again.

use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Nanocredits per prompt token of [`TEST_MODEL`](crate::TEST_MODEL).
pub const NANOS_PER_PROMPT_TOKEN: i64 = 1_000;

/// One debit's payload: sent again unchanged when its first answer was lost.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Debit {
    pub request_id: String,
    pub prompt_tokens: i64,
}

impl Debit {
    pub fn cost_nanos(&self) -> i64 {
        self.prompt_tokens * NANOS_PER_PROMPT_TOKEN
    }
}

/// What a `recordUsage` call got back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Committed: the usage event's id.
    Acknowledged(String),
    /// An error with this `extensions.code` (and whether it said `retryable`).
    Refused { code: String, retryable: bool },
    /// No GraphQL answer: the connection failed, or the body was not GraphQL JSON.
    NoAnswer(String),
}

/// An answered call and how long it took.
#[derive(Clone, Debug)]
pub struct Sent {
    pub debit: Debit,
    pub outcome: Outcome,
    pub started: Instant,
    pub took: Duration,
}

const RECORD: &str = "mutation($input: RecordUsageInput!) { recordUsage(input: $input) { id } }";

/// Sends one debit with the API key `token` (its workspace is used).
pub async fn record(client: &reqwest::Client, base: &str, token: &str, debit: &Debit) -> Sent {
    let started = Instant::now();
    let body = json!({
        "query": RECORD,
        "variables": { "input": {
            "modelId": crate::TEST_MODEL,
            "promptTokens": debit.prompt_tokens,
            "completionTokens": 0,
            "requestId": debit.request_id,
        } },
    });
    let answer = async {
        let response = client
            .post(format!("{base}/graphql"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await?;
        response.json::<Value>().await
    }
    .await;
    let outcome = match answer {
        Ok(v) => match v["data"]["recordUsage"]["id"].as_str() {
            Some(id) => Outcome::Acknowledged(id.to_owned()),
            None => Outcome::Refused {
                code: v["errors"][0]["extensions"]["code"]
                    .as_str()
                    .unwrap_or("NO_CODE")
                    .to_owned(),
                retryable: v["errors"][0]["extensions"]["retryable"] == json!(true),
            },
        },
        Err(e) => Outcome::NoAnswer(e.to_string()),
    };
    Sent {
        debit: debit.clone(),
        outcome,
        started,
        took: started.elapsed(),
    }
}

/// An HTTP client whose requests give up after `timeout` (a hung request is a failure
/// the fault tests look for, not something to wait out).
pub fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    let _ = crate::app::http_client(); // installs the crypto provider
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .unwrap_or_default()
}
