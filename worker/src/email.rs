//! E-mail: rendering notifications (subject, plain text and HTML from templates
//! compiled into the binary) and delivering them, over SMTP (lettre) or into an
//! outbox folder of `.eml` files (the embedded default).
//!
//! # Never sent twice
//!
//! [`deliver`] claims the notification first (`billing::policies::notifications::
//! claim_for_delivery`: only a PENDING row with no live claim), sends, and marks it
//! SENT only after the mail server accepted the message; a SENT notification is never
//! claimed, so never sent, again. A failed send is recorded (attempts + 1,
//! `last_error`, the next attempt scheduled by the retry policy with backoff and
//! jitter) and returned as a [`DeliveryError`] carrying the wait before the next
//! attempt, until the attempts run out and the notification is DEAD.
//!
//! One window remains on SMTP: a crash (or a database outage outlasting a few
//! retries) between the server's acceptance and the SENT mark leaves the row PENDING,
//! and once its claim lapses (`DELIVERY_LEASE_SECS`) it is sent again. Every message
//! carries the notification id as its `Message-ID`, so such a duplicate is
//! recognisable (and collapsed by many mail systems). The outbox has no such window:
//! the file named after the notification is the proof of sending, and a file that
//! already exists is never written again.

use billing::entity::enums::NotificationStatus;
use billing::entity::notifications as rows;
use billing::policies::notifications::{
    self as notes, AutoReloadDisabled, LowBalanceAlert, NotificationKind, NotificationPayload,
    PaymentActionRequired, PurchaseReceipt, ReloadFailed,
};
use billing::retry::RetryPolicy;
use billing::sea_orm::DatabaseConnection;
use billing::{BillingError, Credits, ErrorCode};
use chrono::{DateTime, Utc};
use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::fmt;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

/// Longest wait for the SMTP server on one command (connect, each reply). Far
/// below `DELIVERY_LEASE_SECS`, so a slow send never outlives its claim.
pub const SMTP_TIMEOUT_SECS: u64 = 30;
/// Where the embedded default writes e-mails.
pub const DEFAULT_OUTBOX_DIR: &str = "./data/outbox";
/// Tries at marking a notification SENT after the server accepted it.
const MARK_SENT_TRIES_MAX: u32 = 3;
const MARK_SENT_RETRY_DELAY_MS: u64 = 250;

#[derive(Debug, thiserror::Error)]
pub enum EmailError {
    /// A mailer URL or sender address that cannot work; fix the configuration.
    #[error("e-mail configuration: {0}")]
    Config(String),
    /// A notification that cannot be rendered (unknown kind, bad payload, a template
    /// naming an unknown placeholder).
    #[error("rendering: {0}")]
    Render(String),
    #[error("SMTP: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
    #[error("outbox: {0}")]
    Outbox(#[from] io::Error),
}

// --- rendering -----------------------------------------------------------------------

/// A rendered e-mail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedEmail {
    pub subject: String,
    pub text: String,
    pub html: String,
}

struct Templates {
    subject: &'static str,
    text: &'static str,
    html: &'static str,
}

const LAYOUT_HTML: &str = include_str!("../templates/layout.html");

macro_rules! templates {
    ($name:literal) => {
        Templates {
            subject: include_str!(concat!("../templates/", $name, ".subject.txt")),
            text: include_str!(concat!("../templates/", $name, ".txt")),
            html: include_str!(concat!("../templates/", $name, ".html")),
        }
    };
}

fn templates(kind: NotificationKind) -> Templates {
    match kind {
        NotificationKind::LowBalanceAlert => templates!("low_balance_alert"),
        NotificationKind::PurchaseReceipt => templates!("purchase_receipt"),
        NotificationKind::ReloadFailed => templates!("reload_failed"),
        NotificationKind::AutoReloadDisabled => templates!("auto_reload_disabled"),
        NotificationKind::PaymentActionRequired => templates!("payment_action_required"),
    }
}

/// The values of a template's `{{placeholders}}`: plain values (HTML-escaped in the
/// HTML part) and blocks with a text and a ready-made (already escaped) HTML form.
#[derive(Default)]
struct Vars {
    values: Vec<(&'static str, String)>,
    blocks: Vec<(&'static str, String, String)>,
}

impl Vars {
    fn set(&mut self, name: &'static str, value: impl Into<String>) -> &mut Self {
        self.values.push((name, value.into()));
        self
    }

    fn block(&mut self, name: &'static str, text: String, html: String) -> &mut Self {
        self.blocks.push((name, text, html));
        self
    }

    fn lookup(&self, name: &str, html: bool) -> Option<String> {
        if let Some((_, text, block_html)) = self.blocks.iter().find(|(n, ..)| *n == name) {
            return Some(if html {
                block_html.clone()
            } else {
                text.clone()
            });
        }
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| if html { escape_html(v) } else { v.clone() })
    }
}

/// Replaces each `{{name}}` in one pass (a value is never scanned for placeholders,
/// so a workspace named `{{total}}` stays that text). An unknown name is an error.
fn fill(template: &str, vars: &Vars, html: bool) -> Result<String, EmailError> {
    let mut out = String::with_capacity(template.len() + 256);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| EmailError::Render("unclosed placeholder in a template".into()))?;
        let name = after[..end].trim();
        let value = vars
            .lookup(name, html)
            .ok_or_else(|| EmailError::Render(format!("unknown placeholder {{{{{name}}}}}")))?;
        out.push_str(&value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An amount exactly as stored: the normalised credits string, e.g. "12.5 credits",
/// "0.000000001 credits". Never rounded to cents.
pub fn format_credits(amount: Credits) -> String {
    format!("{amount} credits")
}

fn format_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// The workspace's name, or its id when the payload has no name.
fn workspace_label(name: &str, id: Uuid) -> String {
    if name.trim().is_empty() {
        id.to_string()
    } else {
        name.to_owned()
    }
}

fn optional_credits(amount: Option<Credits>) -> String {
    amount.map_or_else(|| "unknown".to_owned(), format_credits)
}

fn low_balance_vars(p: &LowBalanceAlert) -> Vars {
    let mut v = Vars::default();
    v.set(
        "workspace",
        workspace_label(&p.workspace_name, p.workspace_id),
    )
    .set("workspace_id", p.workspace_id.to_string())
    .set("severity", p.severity.as_str())
    .set("balance", format_credits(p.balance))
    .set("threshold", format_credits(p.threshold))
    .set(
        "projected_depletion",
        p.projected_depletion_at
            .map_or_else(|| "not projected".to_owned(), format_time),
    );
    v
}

fn receipt_vars(p: &PurchaseReceipt) -> Vars {
    let mut v = Vars::default();
    let text_lines = p
        .lines
        .iter()
        .map(|l| format!("- {}: {}", l.description, format_credits(l.amount)))
        .collect::<Vec<_>>()
        .join("\n");
    let html_lines = p
        .lines
        .iter()
        .map(|l| {
            format!(
                "<tr><td>{}</td><td align=\"right\">{}</td></tr>",
                escape_html(&l.description),
                escape_html(&format_credits(l.amount))
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let (due_text, due_html) = match p.due_at {
        Some(due) => (
            format!("\nDue: {}", format_time(due)),
            format!(
                "\n<tr><td>Due</td><td>{}</td></tr>",
                escape_html(&format_time(due))
            ),
        ),
        None => (String::new(), String::new()),
    };
    let status = if p.invoice_status.is_empty() {
        "PAID"
    } else {
        p.invoice_status.as_str()
    };
    v.set(
        "workspace",
        workspace_label(&p.workspace_name, p.workspace_id),
    )
    .set("workspace_id", p.workspace_id.to_string())
    .set("purchase_id", p.purchase_id.to_string())
    .set("invoice_number", p.invoice_number.clone())
    .set("invoice_status", status)
    .set("issued_at", format_time(p.issued_at))
    .set("total", format_credits(p.total))
    .set("credited", format_credits(p.credited))
    .block("lines", text_lines, html_lines)
    .block("due", due_text, due_html);
    v
}

fn reload_failed_vars(p: &ReloadFailed) -> Vars {
    let mut v = Vars::default();
    v.set(
        "workspace",
        workspace_label(&p.workspace_name, p.workspace_id),
    )
    .set("workspace_id", p.workspace_id.to_string())
    .set("purchase_id", p.purchase_id.to_string())
    .set("amount", format_credits(p.amount))
    .set("reason", p.reason.clone())
    .set("consecutive_failures", p.consecutive_failures.to_string())
    .set(
        "next_attempt",
        p.next_attempt_at
            .map_or_else(|| "none scheduled".to_owned(), format_time),
    )
    .set("balance", optional_credits(p.balance));
    v
}

fn auto_reload_disabled_vars(p: &AutoReloadDisabled) -> Vars {
    let mut v = Vars::default();
    v.set(
        "workspace",
        workspace_label(&p.workspace_name, p.workspace_id),
    )
    .set("workspace_id", p.workspace_id.to_string())
    .set("consecutive_failures", p.consecutive_failures.to_string())
    .set(
        "last_failure_reason",
        p.last_failure_reason
            .clone()
            .unwrap_or_else(|| "not recorded".to_owned()),
    )
    .set("balance", optional_credits(p.balance));
    v
}

fn payment_action_required_vars(p: &PaymentActionRequired) -> Vars {
    let mut v = Vars::default();
    v.set(
        "workspace",
        workspace_label(&p.workspace_name, p.workspace_id),
    )
    .set("workspace_id", p.workspace_id.to_string())
    .set("purchase_id", p.purchase_id.to_string())
    .set("amount", format_credits(p.amount))
    .set(
        "card",
        format!("{} card ending in {}", p.card_brand, p.card_last4),
    )
    .set(
        "what",
        if p.auto_reload {
            "an automatic reload"
        } else {
            "a credit purchase"
        },
    )
    .set("reason", p.reason.clone());
    v
}

/// Renders a notification's subject, plain text and HTML.
pub fn render(payload: &NotificationPayload) -> Result<RenderedEmail, EmailError> {
    let vars = match payload {
        NotificationPayload::LowBalanceAlert(p) => low_balance_vars(p),
        NotificationPayload::PurchaseReceipt(p) => receipt_vars(p),
        NotificationPayload::ReloadFailed(p) => reload_failed_vars(p),
        NotificationPayload::AutoReloadDisabled(p) => auto_reload_disabled_vars(p),
        NotificationPayload::PaymentActionRequired(p) => payment_action_required_vars(p),
    };
    let t = templates(payload.kind());
    // A header must be one line: control characters (from names or reasons) become
    // spaces.
    let subject: String = fill(t.subject, &vars, false)?
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = fill(t.text, &vars, false)?;
    let content = fill(t.html, &vars, true)?;
    let mut page = Vars::default();
    page.set("subject", subject.clone())
        .block("content", String::new(), content);
    let html = fill(LAYOUT_HTML, &page, true)?;
    Ok(RenderedEmail {
        subject,
        text,
        html,
    })
}

/// The `Message-ID` of a notification's e-mail: its id at the sender's domain, the
/// same on every attempt, so a duplicate is recognisable.
/// Checks a sender address (`RESERVOIR_EMAIL_FROM`) at start-up, so that a bad one
/// stops the process instead of leaving every notification unsent.
pub fn check_sender(from: &str) -> Result<(), String> {
    from.parse::<Mailbox>()
        .map(|_| ())
        .map_err(|e| format!("{from:?} is not a sender address: {e}"))
}

pub fn message_id(notification_id: Uuid, from: &Mailbox) -> String {
    format!("<{notification_id}@{}>", from.email.domain())
}

/// The e-mail of a stored notification, from `from` to its recipients (in `To:`:
/// they are colleagues in one account), dated `now`.
pub fn build_message(
    n: &rows::Model,
    from: &Mailbox,
    now: DateTime<Utc>,
) -> Result<Message, EmailError> {
    let payload = notes::payload_of(n).map_err(|e| EmailError::Render(e.to_string()))?;
    let rendered = render(&payload)?;
    let recipients = notes::recipients_of(n);
    if recipients.is_empty() {
        return Err(EmailError::Render(
            "the notification has no recipients".into(),
        ));
    }
    let mut builder = Message::builder()
        .from(from.clone())
        .message_id(Some(message_id(n.id, from)))
        .date(now.into())
        .subject(rendered.subject);
    for to in recipients {
        let mailbox: Mailbox = to
            .parse()
            .map_err(|e| EmailError::Render(format!("recipient {to:?}: {e}")))?;
        builder = builder.to(mailbox);
    }
    builder
        .multipart(MultiPart::alternative_plain_html(
            rendered.text,
            rendered.html,
        ))
        .map_err(|e| EmailError::Render(e.to_string()))
}

// --- transports ----------------------------------------------------------------------

/// Where e-mails go.
pub enum Mailer {
    /// An SMTP server (lettre, pooled connections).
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        /// Scheme, host, port and TLS mode, never the credentials.
        description: String,
    },
    /// `<dir>/<notification id>.eml` files (the embedded default).
    Outbox { dir: PathBuf },
}

impl fmt::Debug for Mailer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Smtp { description, .. } => f.debug_tuple("Smtp").field(description).finish(),
            Self::Outbox { dir } => f.debug_tuple("Outbox").field(dir).finish(),
        }
    }
}

/// What a transport did with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// The SMTP server accepted it, or the outbox file was written.
    Accepted,
    /// The outbox already held this notification's file: nothing was written.
    AlreadyInOutbox,
}

impl Mailer {
    /// A mailer from configuration:
    ///
    /// - `smtp://user:pass@host:port` → STARTTLS, required (port 587 by default);
    ///   `?tls=opportunistic` allows a server without STARTTLS (not for production);
    ///   `?tls=none` is unencrypted SMTP (local test servers only).
    /// - `smtps://user:pass@host:port` → implicit TLS (port 465 by default).
    /// - `file://<dir>` (e.g. `file://./data/outbox`) → the outbox folder.
    ///
    /// User and password are percent-decoded; a path segment sets the EHLO name.
    ///
    /// An SMTP mailer must be created (and dropped) inside a Tokio runtime: lettre's
    /// connection pool spawns its reaper task on it. Outside one this is a
    /// configuration error rather than lettre's panic.
    pub fn from_url(url: &str) -> Result<Self, EmailError> {
        if let Some(dir) = url.strip_prefix("file://") {
            if dir.is_empty() {
                return Err(EmailError::Config("file:// needs a folder".into()));
            }
            return Ok(Self::outbox(dir));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(EmailError::Config(
                "an SMTP mailer must be created inside a Tokio runtime".into(),
            ));
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut tls = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("tls", value)) => tls = Some(value),
                _ => {
                    return Err(EmailError::Config(format!(
                        "unknown SMTP URL option {pair:?} (only tls= is understood)"
                    )));
                }
            }
        }
        let (scheme, rest) = base.split_once("://").ok_or_else(|| {
            EmailError::Config("the mailer URL must start with smtp://, smtps:// or file://".into())
        })?;
        let (lettre_url, mode) = match (scheme, tls) {
            ("smtps", None) => (base.to_owned(), "implicit TLS"),
            ("smtp", None | Some("required")) => {
                (format!("{base}?tls=required"), "STARTTLS required")
            }
            ("smtp", Some("opportunistic")) => (
                format!("{base}?tls=opportunistic"),
                "STARTTLS opportunistic",
            ),
            ("smtp", Some("none")) => (base.to_owned(), "unencrypted"),
            (scheme, tls) => {
                return Err(EmailError::Config(format!(
                    "unsupported mailer URL scheme {scheme:?} with tls={tls:?}"
                )));
            }
        };
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(&lettre_url)
            .map_err(|e| EmailError::Config(format!("SMTP URL: {e}")))?
            .timeout(Some(Duration::from_secs(SMTP_TIMEOUT_SECS)))
            .build();
        // host[:port] without the credentials or the EHLO path.
        let authority = rest.split('/').next().unwrap_or_default();
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        Ok(Self::Smtp {
            transport,
            description: format!("{scheme}://{host} ({mode})"),
        })
    }

    /// Unencrypted SMTP without authentication (a server inside a test, a local
    /// relay). Never for a server across a network.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime (lettre's connection pool spawns a task on it).
    pub fn plain(host: &str, port: u16) -> Self {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .timeout(Some(Duration::from_secs(SMTP_TIMEOUT_SECS)))
            .build();
        Self::Smtp {
            transport,
            description: format!("smtp://{host}:{port} (unencrypted)"),
        }
    }

    /// The outbox folder (created on the first write).
    pub fn outbox(dir: impl Into<PathBuf>) -> Self {
        Self::Outbox { dir: dir.into() }
    }

    /// Sends one notification's message.
    pub async fn send(&self, notification_id: Uuid, message: Message) -> Result<Sent, EmailError> {
        match self {
            Self::Smtp { transport, .. } => {
                transport.send(message).await?;
                Ok(Sent::Accepted)
            }
            Self::Outbox { dir } => {
                let dir = dir.clone();
                let bytes = message.formatted();
                let written =
                    tokio::task::spawn_blocking(move || write_once(&dir, notification_id, &bytes))
                        .await
                        .map_err(|e| EmailError::Outbox(io::Error::other(e)))??;
                Ok(if written {
                    Sent::Accepted
                } else {
                    Sent::AlreadyInOutbox
                })
            }
        }
    }
}

/// The outbox file of a notification.
pub fn outbox_path(dir: &Path, notification_id: Uuid) -> PathBuf {
    dir.join(format!("{notification_id}.eml"))
}

/// Writes `<dir>/<id>.eml` unless it exists (then returns false): the bytes go to a
/// temporary file first, synced, then are linked into place (a hard link never
/// replaces an existing file), so a crash leaves either no file or the whole one.
/// Left-over `.tmp` files of a crash are harmless.
fn write_once(dir: &Path, notification_id: Uuid, bytes: &[u8]) -> io::Result<bool> {
    std::fs::create_dir_all(dir)?;
    let target = outbox_path(dir, notification_id);
    if target.try_exists()? {
        return Ok(false);
    }
    let tmp = dir.join(format!(
        ".{notification_id}.{}.tmp",
        Uuid::new_v4().simple()
    ));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        match std::fs::hard_link(&tmp, &target) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            // A file system without hard links: rename (atomic, but replaces a file
            // that appeared meanwhile; the delivery claim makes that a non-event).
            Err(_) => std::fs::rename(&tmp, &target).map(|()| true),
        }
    })();
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %tmp.display(), error = %e, "outbox temp file left"),
    }
    if result.as_ref().is_ok_and(|written| *written) {
        sync_dir(dir);
    }
    result
}

/// Makes the new directory entry durable (best effort: not every platform can open
/// a directory).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "outbox folder not synced");
    }
    #[cfg(not(unix))]
    let _ = dir;
}

// --- delivery ------------------------------------------------------------------------

/// What [`deliver`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// This call sent it (or found its outbox file) and marked it SENT.
    Sent,
    /// It was SENT before: nothing sent.
    AlreadySent,
    /// Another delivery holds its claim right now: nothing sent (that delivery
    /// sends it, or releases it on failure for a retry).
    Busy,
    /// Its next attempt (a retry after a failure) is not due yet: nothing sent.
    NotDue { due_at: DateTime<Utc> },
    /// Its attempts ran out before (DEAD): nothing sent.
    Dead,
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// A sender address (or other setting) that cannot work; nothing was recorded.
    #[error("e-mail configuration: {0}")]
    Config(String),
    /// Rendering or sending failed; the attempt was recorded on the notification.
    /// The next attempt is due after `retry_after`; None: it is DEAD now.
    #[error("delivery of notification {id} failed (attempt {attempts}{}): {error}",
        if retry_after.is_none() { ", dead" } else { ", will retry" })]
    Failed {
        id: Uuid,
        attempts: i32,
        retry_after: Option<Duration>,
        error: String,
    },
    /// The server accepted the message but it could not be marked SENT: it stays
    /// PENDING and may be sent again once its claim lapses (same Message-ID).
    #[error("notification {id} was sent but could not be marked SENT: {error}")]
    NotMarked { id: Uuid, error: BillingError },
    #[error(transparent)]
    Billing(#[from] BillingError),
}

impl DeliveryError {
    /// Whether trying again later can succeed (a job handler retries these and
    /// aborts on the others).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Config(_) => false,
            Self::Failed { retry_after, .. } => retry_after.is_some(),
            Self::NotMarked { .. } => true,
            Self::Billing(e) => matches!(e.code(), ErrorCode::Internal | ErrorCode::Unavailable),
        }
    }
}

/// Delivers one notification: claim, render, send, mark SENT, with the production
/// retry schedule (`RetryPolicy::NOTIFICATIONS`); see [`deliver_with`].
pub async fn deliver(
    db: &DatabaseConnection,
    mailer: &Mailer,
    notification_id: Uuid,
    from: &str,
    now: DateTime<Utc>,
) -> Result<DeliveryOutcome, DeliveryError> {
    deliver_with(
        db,
        mailer,
        notification_id,
        from,
        &RetryPolicy::NOTIFICATIONS,
        now,
    )
    .await
}

/// Delivers one notification: claim, render, send, mark SENT. See the module
/// documentation for the guarantees. `from` is the sender, e.g.
/// `Reservoir <billing@example.com>`; a failure schedules the next attempt by
/// `policy`; `now` dates the message and the row.
pub async fn deliver_with(
    db: &DatabaseConnection,
    mailer: &Mailer,
    notification_id: Uuid,
    from: &str,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
) -> Result<DeliveryOutcome, DeliveryError> {
    let from: Mailbox = from
        .parse()
        .map_err(|e| DeliveryError::Config(format!("sender address {from:?}: {e}")))?;
    let Some(n) = notes::claim_for_delivery(db, notification_id, now).await? else {
        return unclaimed_outcome(db, notification_id, now).await;
    };
    let sent = match build_message(&n, &from, now) {
        Ok(message) => mailer.send(n.id, message).await,
        Err(e) => Err(e),
    };
    match sent {
        Ok(how) => {
            if how == Sent::AlreadyInOutbox {
                tracing::info!(notification_id = %n.id, "already in the outbox; marking it sent");
            }
            mark_sent(db, n.id, now).await?;
            tracing::info!(notification_id = %n.id, kind = %n.kind, mailer = ?mailer, "e-mail sent");
            Ok(DeliveryOutcome::Sent)
        }
        Err(e) => {
            let error = e.to_string();
            let Some(failure) = notes::record_failure(db, n.id, &error, policy, now).await? else {
                // Not PENDING any more: another delivery finished it meanwhile.
                return unclaimed_outcome(db, notification_id, now).await;
            };
            let attempts = failure.row.attempts;
            let retry_after = failure.retry_after;
            tracing::warn!(
                notification_id = %n.id,
                attempts,
                dead = retry_after.is_none(),
                retry_after_ms = retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                error = %error,
                "e-mail delivery failed"
            );
            Err(DeliveryError::Failed {
                id: n.id,
                attempts,
                retry_after,
                error,
            })
        }
    }
}

/// Why a notification could not be claimed.
async fn unclaimed_outcome(
    db: &DatabaseConnection,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<DeliveryOutcome, DeliveryError> {
    let n = notes::load_notification(db, id).await?;
    Ok(match n.status {
        NotificationStatus::Sent => DeliveryOutcome::AlreadySent,
        NotificationStatus::Dead => DeliveryOutcome::Dead,
        NotificationStatus::Pending => match n.next_attempt_at {
            Some(due_at) if due_at > now => DeliveryOutcome::NotDue { due_at },
            _ => DeliveryOutcome::Busy,
        },
    })
}

/// Marks SENT after the server accepted, retrying a failing database briefly: every
/// failure here widens the window in which the e-mail could be sent twice.
async fn mark_sent(
    db: &DatabaseConnection,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<(), DeliveryError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match notes::mark_sent(db, id, now).await {
            Ok(_) => return Ok(()),
            Err(error) if tries >= MARK_SENT_TRIES_MAX => {
                tracing::error!(notification_id = %id, error = %error, "sent but not marked SENT");
                return Err(DeliveryError::NotMarked { id, error });
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(
                    MARK_SENT_RETRY_DELAY_MS * u64::from(tries),
                ))
                .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use billing::entity::enums::AlertSeverity;
    use billing::policies::notifications::ReceiptLine;

    fn ws() -> Uuid {
        Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001)
    }

    #[test]
    fn fill_escapes_html_and_never_rescans_values() {
        let mut v = Vars::default();
        v.set("name", "<b>{{total}}</b> & co")
            .set("total", "1")
            .block("raw", "text".into(), "<i>x</i>".into());
        assert_eq!(
            fill("{{name}}|{{raw}}", &v, true).expect("html"),
            "&lt;b&gt;{{total}}&lt;/b&gt; &amp; co|<i>x</i>"
        );
        assert_eq!(
            fill("{{ name }}|{{raw}}", &v, false).expect("text"),
            "<b>{{total}}</b> & co|text"
        );
        assert!(fill("{{nope}}", &v, false).is_err());
        assert!(fill("{{name", &v, false).is_err());
    }

    #[test]
    fn every_kind_renders_with_exact_amounts() {
        let payloads = [
            NotificationPayload::LowBalanceAlert(LowBalanceAlert {
                workspace_id: ws(),
                workspace_name: "Prod <main>".into(),
                severity: AlertSeverity::Urgent,
                threshold: Credits::from_nanos(20_000_000_000),
                balance: Credits::from_nanos(12_500_000_001),
                projected_depletion_at: None,
            }),
            NotificationPayload::PurchaseReceipt(PurchaseReceipt {
                purchase_id: ws(),
                workspace_id: ws(),
                workspace_name: "Prod".into(),
                invoice_id: ws(),
                invoice_number: "INV-000042".into(),
                lines: vec![ReceiptLine {
                    description: "100 credits".into(),
                    amount: Credits::from_nanos(100_000_000_000),
                }],
                total: Credits::from_nanos(100_000_000_000),
                credited: Credits::from_nanos(115_000_000_000),
                invoice_status: "PAID".into(),
                issued_at: DateTime::UNIX_EPOCH,
                due_at: None,
            }),
            NotificationPayload::ReloadFailed(ReloadFailed {
                workspace_id: ws(),
                workspace_name: String::new(),
                purchase_id: ws(),
                amount: Credits::from_nanos(50_000_000_000),
                reason: "card_declined".into(),
                consecutive_failures: 2,
                next_attempt_at: None,
                balance: None,
            }),
            NotificationPayload::AutoReloadDisabled(AutoReloadDisabled {
                workspace_id: ws(),
                workspace_name: "Prod".into(),
                consecutive_failures: 3,
                last_failure_reason: Some("card_declined".into()),
                balance: Some(Credits::ZERO),
            }),
        ];
        for payload in &payloads {
            let r = render(payload).expect("renders");
            assert!(!r.subject.is_empty() && !r.subject.contains('\n'));
            assert!(!r.text.contains("{{") && !r.html.contains("{{"), "{r:?}");
            assert!(r.text.contains(&ws().to_string()), "{}", r.text);
        }
        let alert = render(&payloads[0]).expect("alert");
        assert_eq!(
            alert.subject,
            "[URGENT] Low balance in Prod <main>: 12.500000001 credits left"
        );
        assert!(alert.text.contains("Balance: 12.500000001 credits"));
        assert!(alert.text.contains("Projected depletion: not projected"));
        assert!(alert.html.contains("Prod &lt;main&gt;"));
        assert!(!alert.html.contains("Prod <main>"));
        let receipt = render(&payloads[1]).expect("receipt");
        assert!(
            receipt
                .text
                .contains("- 100 credits: 100 credits\nTotal: 100 credits")
        );
        assert!(
            receipt
                .html
                .contains("<td align=\"right\">100 credits</td>")
        );
    }

    #[test]
    fn the_payment_action_email_names_the_card_and_what_to_do() {
        let r = render(&NotificationPayload::PaymentActionRequired(
            PaymentActionRequired {
                workspace_id: ws(),
                workspace_name: "Prod".into(),
                purchase_id: ws(),
                amount: Credits::from_nanos(50_000_000_000),
                card_brand: "VISA".into(),
                card_last4: "3184".into(),
                auto_reload: true,
                reason: "authentication_required".into(),
            },
        ))
        .expect("renders");
        assert_eq!(
            r.subject,
            "Action needed: your VISA card ending in 3184 must be confirmed for Prod"
        );
        assert!(r.text.contains("an automatic reload"), "{}", r.text);
        assert!(r.text.contains("add the card again"), "{}", r.text);
        assert!(!r.html.contains("{{"), "{}", r.html);
    }

    #[test]
    fn an_smtp_mailer_outside_a_runtime_is_a_configuration_error() {
        assert!(matches!(
            Mailer::from_url("smtp://127.0.0.1:2525?tls=none"),
            Err(EmailError::Config(_))
        ));
        assert!(Mailer::from_url("file://./outbox").is_ok());
    }

    #[tokio::test]
    async fn mailer_urls() {
        let m = Mailer::from_url("smtp://user:secret@mail.example.com:2525").expect("smtp");
        let shown = format!("{m:?}");
        assert!(
            shown.contains("mail.example.com:2525 (STARTTLS required)"),
            "{shown}"
        );
        assert!(!shown.contains("secret"), "{shown}");
        let m = Mailer::from_url("smtps://u:p@mail.example.com").expect("smtps");
        assert!(format!("{m:?}").contains("implicit TLS"));
        let m = Mailer::from_url("smtp://127.0.0.1:2525?tls=none").expect("plain");
        assert!(format!("{m:?}").contains("unencrypted"));
        let m = Mailer::from_url("file://./data/outbox").expect("outbox");
        assert!(matches!(m, Mailer::Outbox { ref dir } if dir == Path::new("./data/outbox")));
        assert!(Mailer::from_url("http://example.com").is_err());
        assert!(Mailer::from_url("smtp://h?tls=bogus").is_err());
        assert!(Mailer::from_url("smtp://h?foo=1").is_err());
    }
}
