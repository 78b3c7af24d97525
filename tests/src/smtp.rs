//! A real SMTP server inside a test (mailin-embedded): it accepts every message into
//! an inbox the test reads, or refuses them all with a temporary failure (451) while
//! told to.
//!
//! mailin blocks and has no shutdown: it serves on its own thread until the test
//! process exits, on a port the test bound itself (STACK.md, trap 17).

use mailin_embedded::{Handler, Response, Server, response};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One message as the server received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    pub data: Vec<u8>,
}

/// mailin clones the handler for every connection: the message being received is
/// per connection, the inbox and the switch are shared.
#[derive(Clone, Default)]
struct Capture {
    inbox: Arc<Mutex<Vec<Received>>>,
    /// When set, every message is refused with 451 (a temporary failure).
    reject: Arc<AtomicBool>,
    current: Option<Received>,
}

impl Handler for Capture {
    fn data_start(&mut self, _domain: &str, from: &str, _is8bit: bool, to: &[String]) -> Response {
        if self.reject.load(Ordering::SeqCst) {
            return response::INTERNAL_ERROR;
        }
        self.current = Some(Received {
            mail_from: from.trim_matches(['<', '>']).to_owned(),
            rcpt_to: to
                .iter()
                .map(|t| t.trim_matches(['<', '>']).to_owned())
                .collect(),
            data: Vec::new(),
        });
        response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if let Some(current) = &mut self.current {
            current.data.extend_from_slice(buf);
        }
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        if let Some(message) = self.current.take()
            && let Ok(mut inbox) = self.inbox.lock()
        {
            inbox.push(message);
        }
        response::OK
    }
}

pub struct SmtpServer {
    pub port: u16,
    capture: Capture,
}

impl SmtpServer {
    pub fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let capture = Capture::default();
        let mut server = Server::new(capture.clone());
        server
            .with_name("smtp.test")
            .with_num_threads(8)
            .with_tcp_listener(listener);
        std::thread::spawn(move || {
            if let Err(e) = server.serve() {
                eprintln!("test SMTP server stopped: {e}");
            }
        });
        Ok(Self { port, capture })
    }

    /// A mailer for this server: plain SMTP, no TLS.
    pub fn mailer(&self) -> worker::email::Mailer {
        worker::email::Mailer::plain("127.0.0.1", self.port)
    }

    /// `RESERVOIR_SMTP_URL` for a `reservoir` process sending here.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}?tls=none", self.port)
    }

    pub fn set_rejecting(&self, reject: bool) {
        self.capture.reject.store(reject, Ordering::SeqCst);
    }

    pub fn received(&self) -> Vec<Received> {
        self.capture
            .inbox
            .lock()
            .map(|inbox| inbox.clone())
            .unwrap_or_default()
    }
}
