//! The API app started on port 0 for a test, and a small GraphQL client.

use serde_json::{Value, json};
use std::net::TcpListener;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef0123";

pub struct App {
    pub base: String,
    pub client: reqwest::Client,
    pub handle: api::ApiHandle,
}

impl App {
    /// Starts the app on its own connection pool: connections opened by the server's
    /// worker threads die with them, so the test's own pool must not be shared.
    pub async fn start(t: &crate::TestDb) -> anyhow::Result<Self> {
        Self::start_with(&t.second_pool().await?).await
    }

    /// Starts the app on a given pool (one the test instruments).
    pub async fn start_with(db: &billing::sea_orm::DatabaseConnection) -> anyhow::Result<Self> {
        Self::start_configured(db, |_| {}).await
    }

    /// Starts the app with the test defaults changed by `adjust` (limits, switches).
    pub async fn start_configured(
        db: &billing::sea_orm::DatabaseConnection,
        adjust: impl FnOnce(&mut api::ApiConfig),
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let mut config = api::ApiConfig {
            admin_token: Some(ADMIN_TOKEN.into()),
            workers: 1,
            ..Default::default()
        };
        adjust(&mut config);
        let (handle, addr, _join) = api::spawn(listener, db.clone(), config)?;
        Ok(Self {
            base: format!("http://{addr}"),
            client: http_client(),
            handle,
        })
    }

    pub async fn gql(
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

    /// Posts a raw body (for malformed JSON and oversized requests).
    pub async fn raw(&self, token: &str, body: String) -> anyhow::Result<(u16, String)> {
        let response = self
            .client
            .post(format!("{}/graphql", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        Ok((response.status().as_u16(), response.text().await?))
    }

    pub async fn stop(self) {
        self.handle.stop(true).await;
    }
}

/// An HTTP client for tests. reqwest is built with `rustls-no-provider` in this
/// workspace (the Stripe adapter hands it a configured provider), so a plain client
/// needs a process-wide crypto provider installed first (STACK.md, trap 15).
pub fn http_client() -> reqwest::Client {
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::new()
}

/// The first error's `extensions.code`.
pub fn code(response: &Value) -> Option<&str> {
    response["errors"][0]["extensions"]["code"].as_str()
}
