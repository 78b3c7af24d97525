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
        Self::start_with_config(db, api::ApiConfig::default()).await
    }

    /// Starts the app with the test defaults changed by `adjust` (limits, switches).
    pub async fn start_configured(
        db: &billing::sea_orm::DatabaseConnection,
        adjust: impl FnOnce(&mut api::ApiConfig),
    ) -> anyhow::Result<Self> {
        let mut config = api::ApiConfig::default();
        adjust(&mut config);
        Self::start_with_config(db, config).await
    }

    /// Starts the app with a configuration of the test's (a gateway, a queue); the
    /// admin token and one worker thread are set here.
    pub async fn start_with_config(
        db: &billing::sea_orm::DatabaseConnection,
        config: api::ApiConfig,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let config = api::ApiConfig {
            admin_token: Some(ADMIN_TOKEN.into()),
            workers: 1,
            ..config
        };
        let (handle, addr, _join) = api::spawn(listener, db.clone(), config)?;
        let app = Self {
            base: format!("http://{addr}"),
            client: http_client(),
            handle,
        };
        app.wait_ready().await?;
        Ok(app)
    }

    /// Waits for `/readyz` to say ready: a new process is not ready until its first
    /// health ping has answered (a few milliseconds).
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        loop {
            let answer = self
                .client
                .get(format!("{}/readyz", self.base))
                .send()
                .await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "the app was not ready within 10 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
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
