//! A real, stateful Stripe fake for a test: `localstripe` (PyPI), started as its own
//! process on a free port through `tests/localstripe_shim.py` (which says exactly where
//! it departs from plain localstripe, and why), stopped when dropped.
//!
//! If `python3 -c 'import localstripe'` fails, it is installed first with
//! `python3 -m pip install --quiet localstripe` (once per test binary), so
//! `cargo test --workspace` works on a fresh machine with network access.

use anyhow::Context as _;
use serde_json::Value;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Any `sk_…` key is accepted by localstripe.
pub const SECRET_KEY: &str = "sk_test_reservoir_localstripe";
/// What Stripe.js sends for calls a browser makes with the publishable key.
pub const PUBLISHABLE_KEY: &str = "pk_test_reservoir_localstripe";
/// The webhook endpoint's signing secret the tests register.
pub const WEBHOOK_SECRET: &str = "whsec_reservoir_localstripe_test";

/// Stripe's public test card numbers, as localstripe knows them.
pub mod cards {
    /// Succeeds.
    pub const VISA: &str = "4242424242424242";
    /// Declined when attached to a Customer (`card_declined`).
    pub const DECLINED_ON_ATTACH: &str = "4000000000000002";
    /// Attaches; every charge is declined (`card_declined`).
    pub const DECLINED_ON_CHARGE: &str = "4000000000000341";
    /// Attaches; every charge needs 3-D Secure.
    pub const THREE_D_SECURE: &str = "4000002760003184";
}

pub struct LocalStripe {
    /// `http://127.0.0.1:<port>` (the gateway's base URL; `/v1` is added by it).
    pub base: String,
    client: reqwest::Client,
    child: Child,
}

impl Drop for LocalStripe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ensure_installed() -> anyhow::Result<()> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let importable = || {
        Command::new("python3")
            .args(["-c", "import localstripe"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    INSTALLED
        .get_or_init(|| {
            if importable() {
                return Ok(());
            }
            let status = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "localstripe"])
                .status()
                .map_err(|e| format!("running pip: {e}"))?;
            if status.success() && importable() {
                Ok(())
            } else {
                Err(format!("pip install localstripe failed ({status})"))
            }
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

impl LocalStripe {
    pub async fn start() -> anyhow::Result<Self> {
        ensure_installed()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let shim = concat!(env!("CARGO_MANIFEST_DIR"), "/localstripe_shim.py");
        let log =
            std::fs::File::create(std::env::temp_dir().join(format!("localstripe-{port}.log")))?;
        let child = Command::new("python3")
            .arg(shim)
            .args(["--port", &port.to_string(), "--from-scratch"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting localstripe")?;
        let fake = Self {
            base: format!("http://127.0.0.1:{port}"),
            client: crate::app::http_client(),
            child,
        };
        let started = Instant::now();
        loop {
            let up = fake
                .client
                .get(format!("{}/v1/customers", fake.base))
                .bearer_auth(SECRET_KEY)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if up {
                return Ok(fake);
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "localstripe did not start on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The Stripe adapter pointed at this fake, verifying webhooks with
    /// [`WEBHOOK_SECRET`].
    pub fn gateway(&self) -> anyhow::Result<gateways::StripeGateway> {
        Ok(
            gateways::StripeGateway::new(SECRET_KEY.into(), self.base.clone(), 10_000)?
                .with_webhook_secret(WEBHOOK_SECRET),
        )
    }

    /// Registers a webhook endpoint (`POST /_config/webhooks/<name>`): localstripe then
    /// signs every event with [`WEBHOOK_SECRET`] and posts it there, about a second
    /// after it happened.
    pub async fn register_webhook(&self, name: &str, url: &str) -> anyhow::Result<()> {
        let response = self
            .client
            .post(format!("{}/_config/webhooks/{name}", self.base))
            .form(&[("url", url), ("secret", WEBHOOK_SECRET)])
            .send()
            .await?;
        anyhow::ensure!(response.status().is_success(), "webhook not registered");
        Ok(())
    }

    /// A PaymentMethod made from a test card number, as Stripe.js makes one in the
    /// browser (`stripe.createPaymentMethod`).
    pub async fn payment_method(&self, number: &str) -> anyhow::Result<String> {
        let pm = self
            .post(
                "/v1/payment_methods",
                &[
                    ("type", "card"),
                    ("card[number]", number),
                    ("card[exp_month]", "12"),
                    ("card[exp_year]", "2031"),
                    ("card[cvc]", "123"),
                ],
            )
            .await?;
        string(&pm, "id")
    }

    /// What Stripe.js `confirmCardSetup(clientSecret, {payment_method: {card}})` does:
    /// confirms the SetupIntent with the publishable key and a new card. Returns the
    /// confirmed SetupIntent.
    pub async fn confirm_card_setup(
        &self,
        setup_intent_id: &str,
        client_secret: &str,
        number: &str,
    ) -> anyhow::Result<Value> {
        let response = self
            .client
            .post(format!(
                "{}/v1/setup_intents/{setup_intent_id}/confirm",
                self.base
            ))
            .form(&[
                ("key", PUBLISHABLE_KEY),
                ("client_secret", client_secret),
                ("payment_method_data[type]", "card"),
                ("payment_method_data[card][number]", number),
                ("payment_method_data[card][exp_month]", "12"),
                ("payment_method_data[card][exp_year]", "2031"),
                ("payment_method_data[card][cvc]", "123"),
            ])
            .send()
            .await?;
        Ok(response.json().await?)
    }

    /// `GET /v1/<path>` with the secret key.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(SECRET_KEY)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        Ok(response.json().await?)
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> anyhow::Result<Value> {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(SECRET_KEY)
            .form(form)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "POST {path}: {}",
            response.status()
        );
        Ok(response.json().await?)
    }
}

/// A string field of a JSON object.
pub fn string(v: &Value, field: &str) -> anyhow::Result<String> {
    v[field]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no {field} in {v}"))
}
