//! What the `followups` scenario delivers to, inside the bench process: a real SMTP
//! server (mailin-embedded, as the tests use) and a real HTTP receiver (HTTP/1.1 over
//! tokio), each recording when it accepted what; and the worker as a child process
//! that can be SIGKILLed and started again.

use anyhow::Context;
use chrono::{DateTime, Utc};
use mailin_embedded::{Handler, Response, Server, response};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

/// One message accepted: the id in its `Message-ID` (the notification's id; `None`
/// when it is not one), or the webhook's event id; and when it was accepted.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub id: Option<Uuid>,
    pub at: DateTime<Utc>,
}

type Inbox = Arc<Mutex<Vec<Arrival>>>;

fn push(inbox: &Inbox, arrival: Arrival) {
    if let Ok(mut list) = inbox.lock() {
        list.push(arrival);
    }
}

fn snapshot(inbox: &Inbox) -> Vec<Arrival> {
    inbox.lock().map(|list| list.clone()).unwrap_or_default()
}

/// mailin clones the handler per connection: the message being received is the
/// connection's, the inbox is shared.
#[derive(Clone, Default)]
struct Capture {
    inbox: Inbox,
    current: Vec<u8>,
}

impl Handler for Capture {
    fn data_start(
        &mut self,
        _domain: &str,
        _from: &str,
        _is8bit: bool,
        _to: &[String],
    ) -> Response {
        self.current.clear();
        response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.current.extend_from_slice(buf);
        Ok(())
    }

    /// The 250 that follows is the acceptance the worker waits for before marking SENT.
    fn data_end(&mut self) -> Response {
        let id = message_id(&self.current);
        push(&self.inbox, Arrival { id, at: Utc::now() });
        self.current.clear();
        response::OK
    }
}

/// The notification id in `Message-ID: <id@domain>` (the worker's format).
fn message_id(data: &[u8]) -> Option<Uuid> {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        if line.is_empty() {
            break; // the end of the headers
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("message-id")
        {
            let value = value.trim().trim_start_matches('<');
            return value
                .split('@')
                .next()
                .and_then(|s| Uuid::parse_str(s).ok());
        }
    }
    None
}

pub struct SmtpSink {
    port: u16,
    inbox: Inbox,
}

impl SmtpSink {
    /// Serves on its own threads until the process exits (mailin has no shutdown).
    pub fn start() -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let capture = Capture::default();
        let inbox = capture.inbox.clone();
        let mut server = Server::new(capture);
        server
            .with_name("smtp.bench")
            // More than the worker's SMTP pool holds open, so no connection waits.
            .with_num_threads(32)
            .with_tcp_listener(listener);
        std::thread::spawn(move || {
            if let Err(e) = server.serve() {
                eprintln!("bench SMTP server stopped: {e}");
            }
        });
        Ok(Self { port, inbox })
    }

    /// `RESERVOIR_SMTP_URL` for the worker.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}?tls=none", self.port)
    }

    pub fn received(&self) -> Vec<Arrival> {
        snapshot(&self.inbox)
    }
}

/// An HTTP/1.1 receiver that answers 200 to every request (keep-alive) and records
/// the `id` of each JSON body when the body has been read in full.
pub struct HookSink {
    port: u16,
    inbox: Inbox,
}

impl HookSink {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let inbox = Inbox::default();
        let shared = inbox.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let inbox = shared.clone();
                tokio::spawn(async move {
                    let _ = serve_connection(stream, inbox).await;
                });
            }
        });
        Ok(Self { port, inbox })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks", self.port)
    }

    pub fn received(&self) -> Vec<Arrival> {
        snapshot(&self.inbox)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

/// Requests one after another on one connection until the peer closes it.
async fn serve_connection(mut stream: tokio::net::TcpStream, inbox: Inbox) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let length = content_length(&String::from_utf8_lossy(&buf[..head_end]));
        while buf.len() < head_end + length {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let at = Utc::now();
        let id = serde_json::from_slice::<serde_json::Value>(&buf[head_end..head_end + length])
            .ok()
            .and_then(|body| body["id"].as_str().and_then(|s| Uuid::parse_str(s).ok()));
        push(&inbox, Arrival { id, at });
        buf.drain(..head_end + length);
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await?;
    }
}

/// `reservoir worker` as a child process; its stderr is appended to `log`. The rest
/// of its configuration is the bench's own environment (run-scenario.sh passes the
/// server's), plus the SMTP server's URL.
pub struct WorkerProcess {
    child: Child,
}

impl WorkerProcess {
    pub fn start(
        bin: &Path,
        database_url: &str,
        smtp_url: &str,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = Command::new(bin)
            .arg("worker")
            .env("RESERVOIR_DATABASE_URL", database_url)
            .env("RESERVOIR_SMTP_URL", smtp_url)
            .env("RESERVOIR_DEMO_SEED", "false")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {} worker", bin.display()))?;
        Ok(Self { child })
    }

    /// SIGKILL (no graceful stop: jobs in flight are cut off), and reap it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then SIGKILL if it has not stopped within `grace`.
    pub async fn stop(mut self, grace: Duration) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.kill()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `reservoir` next to the running bench binary (both are built together).
pub fn default_worker_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("reservoir")))
        .unwrap_or_else(|| PathBuf::from("reservoir"))
}
