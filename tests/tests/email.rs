//! E-mail notifications end to end (SQLite by default, PostgreSQL with
//! TEST_DATABASE_URL): notifications written through `billing::policies::notifications`,
//! delivered by `worker::email` to a real SMTP server running inside the test
//! (mailin-embedded) or into an outbox folder, and read back as a mail client would.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::entity::enums::{AlertSeverity, NotificationStatus, PurchaseSource, WorkspaceRole};
use billing::entity::notifications as rows;
use billing::payments::purchases::{self, PurchaseItem, PurchaseRequest};
use billing::policies::notifications::{
    self as notes, AutoReloadDisabled, LowBalanceAlert, NotificationPayload, ReloadFailed,
};
use billing::retry::RetryPolicy;
use billing::sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait,
    IntoActiveModel, QueryFilter,
};
use billing::{Credits, ErrorCode};
use chrono::{DateTime, Duration, SubsecRound, TimeZone, Utc};
use reservoir_tests::smtp::{Received, SmtpServer};
use reservoir_tests::{Fixture, TestDb, count};
use std::net::TcpListener;
use uuid::Uuid;
use worker::email::{self, DeliveryError, DeliveryOutcome, Mailer};

const FROM: &str = "Reservoir <billing@reservoir.test>";
const OWNER: &str = "owner@test.example";

/// A port nothing listens on.
fn closed_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

// --- reading a message back (a minimal MIME reader) -----------------------------------

#[derive(Debug)]
struct Mail {
    headers: String,
    subject: String,
    to: String,
    message_id: String,
    text: String,
    html: String,
}

fn split_head(part: &str) -> (&str, &str) {
    part.split_once("\r\n\r\n")
        .or_else(|| part.split_once("\n\n"))
        .unwrap_or((part, ""))
}

fn unfold(headers: &str) -> String {
    headers
        .replace("\r\n ", " ")
        .replace("\r\n\t", " ")
        .replace("\n ", " ")
}

fn header(headers: &str, name: &str) -> Option<String> {
    let prefix = format!("{}:", name.to_ascii_lowercase());
    unfold(headers).lines().find_map(|line| {
        line.to_ascii_lowercase()
            .starts_with(&prefix)
            .then(|| line[prefix.len()..].trim().to_owned())
    })
}

fn base64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    out
}

fn quoted_printable_decode(s: &str) -> Vec<u8> {
    let s = s.replace("=\r\n", "").replace("=\n", "");
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'='
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Decodes RFC 2047 encoded words (`=?utf-8?b?…?=`); whitespace between two encoded
/// words is dropped.
fn decode_words(value: &str) -> String {
    let mut out: Vec<u8> = Vec::new();
    let mut pending_space = String::new();
    let mut last_was_word = false;
    for token in value.split(' ') {
        let word = token
            .strip_prefix("=?")
            .and_then(|t| t.strip_suffix("?="))
            .and_then(|t| {
                let mut parts = t.splitn(3, '?');
                let (_charset, enc, text) = (parts.next()?, parts.next()?, parts.next()?);
                Some(match enc {
                    "b" | "B" => base64_decode(text),
                    _ => quoted_printable_decode(&text.replace('_', " ")),
                })
            });
        match word {
            Some(bytes) => {
                if !last_was_word {
                    out.extend_from_slice(pending_space.as_bytes());
                }
                out.extend_from_slice(&bytes);
                last_was_word = true;
            }
            None => {
                out.extend_from_slice(pending_space.as_bytes());
                out.extend_from_slice(token.as_bytes());
                last_was_word = false;
            }
        }
        pending_space = " ".to_owned();
    }
    String::from_utf8(out).expect("utf-8 header")
}

fn decode_body(headers: &str, body: &str) -> String {
    let encoding = header(headers, "Content-Transfer-Encoding")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let bytes = match encoding.as_str() {
        "base64" => base64_decode(body),
        "quoted-printable" => quoted_printable_decode(body),
        _ => body.as_bytes().to_vec(),
    };
    String::from_utf8(bytes)
        .expect("utf-8 body")
        .replace("\r\n", "\n")
}

fn parse_mail(raw: &[u8]) -> Mail {
    let raw = String::from_utf8_lossy(raw).into_owned();
    let (headers, body) = split_head(&raw);
    let content_type = header(headers, "Content-Type").expect("Content-Type");
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .expect("multipart boundary")
        .trim_matches('"')
        .to_owned();
    let (mut text, mut html) = (String::new(), String::new());
    for part in body.split(&format!("--{boundary}")) {
        let part = part.trim_start_matches(['\r', '\n']);
        let (part_headers, part_body) = split_head(part);
        let kind = header(part_headers, "Content-Type").unwrap_or_default();
        if kind.starts_with("text/plain") {
            text = decode_body(part_headers, part_body);
        } else if kind.starts_with("text/html") {
            html = decode_body(part_headers, part_body);
        }
    }
    Mail {
        headers: unfold(headers),
        subject: decode_words(&header(headers, "Subject").expect("Subject")),
        to: header(headers, "To").expect("To"),
        message_id: header(headers, "Message-ID").expect("Message-ID"),
        text,
        html,
    }
}

/// The message of a notification, found by its Message-ID.
fn mail_of(received: &[Received], notification_id: Uuid) -> (Received, Mail) {
    let wanted = format!("<{notification_id}@reservoir.test>");
    let found: Vec<_> = received
        .iter()
        .map(|r| (r.clone(), parse_mail(&r.data)))
        .filter(|(_, m)| m.message_id == wanted)
        .collect();
    assert_eq!(found.len(), 1, "one message {wanted} expected");
    found.into_iter().next().expect("one")
}

// --- fixtures ---------------------------------------------------------------------------

fn nanos(credits: &str) -> Credits {
    Credits::parse(credits).expect("amount")
}

fn at(seconds: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + seconds, 0)
        .single()
        .expect("time")
}

fn alert(workspace_id: Uuid, name: &str, balance: &str) -> NotificationPayload {
    NotificationPayload::LowBalanceAlert(LowBalanceAlert {
        workspace_id,
        workspace_name: name.into(),
        severity: AlertSeverity::Urgent,
        threshold: nanos("20"),
        balance: nanos(balance),
        projected_depletion_at: Some(at(3 * 86_400 + 3_600)),
    })
}

/// Writes a notification on its own (autocommit).
async fn enqueue(
    db: &DatabaseConnection,
    f: &Fixture,
    recipients: &[&str],
    payload: &NotificationPayload,
    key: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<Uuid> {
    let recipients: Vec<String> = recipients.iter().map(|r| (*r).to_owned()).collect();
    notes::enqueue_notification(
        db,
        Some(f.account_id),
        Some(f.ws_a),
        &recipients,
        payload,
        key,
        now,
    )
    .await?
    .ok_or_else(|| anyhow::anyhow!("notification {key} not written"))
}

async fn row(db: &DatabaseConnection, id: Uuid) -> anyhow::Result<rows::Model> {
    Ok(notes::load_notification(db, id).await?)
}

/// A captured card purchase of the 100-credit package (15 bonus), with its PAID
/// invoice.
async fn captured_purchase(
    db: &DatabaseConnection,
    workspace_id: Uuid,
    now: DateTime<Utc>,
) -> anyhow::Result<Uuid> {
    let p = purchases::create_purchase(
        db,
        PurchaseRequest {
            workspace_id,
            item: PurchaseItem::Package("pkg_100".into()),
            source: PurchaseSource::Manual,
            payment_method_id: None,
            idempotency_key: format!("buy-{}", Uuid::new_v4()),
            created_by_user_id: None,
        },
        now,
    )
    .await?;
    purchases::capture_succeeded(db, p.purchase.id, "ch_email_test", now).await?;
    Ok(p.purchase.id)
}

// --- tests ------------------------------------------------------------------------------

#[tokio::test]
async fn every_kind_is_delivered_with_its_recipients_subject_and_exact_amounts()
-> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now().trunc_subsecs(3);
    let f = Fixture::new(&t.db, now).await?;
    billing::accounts::add_workspace_member(
        &t.db,
        f.ws_a,
        "ws-admin@test.example",
        None,
        WorkspaceRole::Admin,
        now,
    )
    .await?;
    billing::accounts::add_workspace_member(
        &t.db,
        f.ws_a,
        "member@test.example",
        None,
        WorkspaceRole::Member,
        now,
    )
    .await?;
    billing::accounts::add_workspace_member(
        &t.db,
        f.ws_b,
        "other-admin@test.example",
        None,
        WorkspaceRole::Admin,
        now,
    )
    .await?;
    let admins = notes::workspace_admin_emails(&t.db, f.ws_a).await?;
    assert_eq!(admins, [OWNER, "ws-admin@test.example"]);
    assert_eq!(
        notes::account_admin_emails(&t.db, f.account_id).await?,
        [OWNER]
    );
    let admin_refs: Vec<&str> = admins.iter().map(String::as_str).collect();

    let smtp = SmtpServer::start()?;
    let mailer = smtp.mailer();

    // A low-balance alert to the workspace's admins (a non-ASCII name on purpose).
    let alert_id = enqueue(
        &t.db,
        &f,
        &admin_refs,
        &alert(f.ws_a, "Zürich lab", "12.500000001"),
        "alert:1",
        now,
    )
    .await?;
    // The receipt of a captured purchase, written by billing from the invoice.
    let purchase_id = captured_purchase(&t.db, f.ws_a, now).await?;
    // capture_succeeded writes the receipt in its own transaction; find it by its key.
    let receipt_id = billing::entity::notifications::Entity::find()
        .filter(
            billing::entity::notifications::Column::DedupeKey
                .eq(notes::dedupe::receipt(purchase_id)),
        )
        .one(&t.db)
        .await?
        .map(|n| n.id)
        .expect("receipt written with the capture");
    // Auto-reload failed, then turned off.
    let failed_id = enqueue(
        &t.db,
        &f,
        &admin_refs,
        &NotificationPayload::ReloadFailed(ReloadFailed {
            workspace_id: f.ws_a,
            workspace_name: "A".into(),
            purchase_id,
            amount: nanos("50.25"),
            reason: "card_declined".into(),
            consecutive_failures: 2,
            next_attempt_at: Some(at(600)),
            balance: Some(nanos("0.000000001")),
        }),
        &notes::dedupe::reload_failed(purchase_id),
        now,
    )
    .await?;
    let disabled_id = enqueue(
        &t.db,
        &f,
        &admin_refs,
        &NotificationPayload::AutoReloadDisabled(AutoReloadDisabled {
            workspace_id: f.ws_a,
            workspace_name: "A".into(),
            consecutive_failures: 3,
            last_failure_reason: Some("card_declined".into()),
            balance: Some(nanos("7.3")),
        }),
        &notes::dedupe::auto_reload_disabled(purchase_id),
        now,
    )
    .await?;

    let sent_at = now + Duration::seconds(1);
    for id in [alert_id, receipt_id, failed_id, disabled_id] {
        assert_eq!(
            email::deliver(&t.db, &mailer, id, FROM, sent_at).await?,
            DeliveryOutcome::Sent
        );
        let r = row(&t.db, id).await?;
        assert_eq!(r.status, NotificationStatus::Sent);
        assert_eq!(r.sent_at, Some(sent_at));
        assert_eq!(r.attempts, 0);
    }
    let received = smtp.received();
    assert_eq!(received.len(), 4);

    let (envelope, mail) = mail_of(&received, alert_id);
    assert_eq!(envelope.mail_from, "billing@reservoir.test");
    assert_eq!(envelope.rcpt_to, [OWNER, "ws-admin@test.example"]);
    assert!(mail.to.contains(OWNER) && mail.to.contains("ws-admin@test.example"));
    assert!(!mail.headers.contains("member@test.example"));
    assert_eq!(
        mail.subject,
        "[URGENT] Low balance in Zürich lab: 12.500000001 credits left"
    );
    for needle in [
        "Severity: URGENT",
        "Balance: 12.500000001 credits",
        "Alert threshold: 20 credits",
        "Projected depletion: 2027-01-18 09:00 UTC",
        &format!("Workspace id: {}", f.ws_a),
    ] {
        assert!(mail.text.contains(needle), "{needle:?} in {}", mail.text);
    }
    assert!(mail.html.contains("<strong>12.500000001 credits</strong>"));
    assert!(mail.html.contains(&f.ws_a.to_string()));

    let (envelope, mail) = mail_of(&received, receipt_id);
    assert_eq!(envelope.rcpt_to, [OWNER], "receipts go to account admins");
    assert_eq!(mail.subject, "Receipt INV-000001: 115 credits added to A");
    for needle in [
        "Invoice: INV-000001 (PAID)",
        "- 100 credits (pkg_100 package): 100 credits\n\
         - Bonus credits (free): 15 credits: 0 credits\n\
         Total: 100 credits",
        "Credits added to the workspace: 115 credits",
        &format!("Purchase id: {purchase_id}"),
    ] {
        assert!(mail.text.contains(needle), "{needle:?} in {}", mail.text);
    }
    assert!(
        mail.html
            .contains("<td>100 credits (pkg_100 package)</td><td align=\"right\">100 credits</td>")
    );
    assert!(mail.html.contains("<strong>100 credits</strong>"));

    let (envelope, mail) = mail_of(&received, failed_id);
    assert_eq!(envelope.rcpt_to, [OWNER, "ws-admin@test.example"]);
    assert_eq!(mail.subject, "Auto-reload failed for A");
    for needle in [
        "An automatic reload of 50.25 credits for workspace A failed: card_declined",
        "Failures in a row: 2",
        "Next attempt: 2027-01-15 08:10 UTC",
        "Balance: 0.000000001 credits",
    ] {
        assert!(mail.text.contains(needle), "{needle:?} in {}", mail.text);
    }

    let (_, mail) = mail_of(&received, disabled_id);
    assert_eq!(mail.subject, "Auto-reload turned off for A");
    for needle in [
        "after 3 failed reloads in a row",
        "Last failure: card_declined",
        "Balance: 7.3 credits",
    ] {
        assert!(mail.text.contains(needle), "{needle:?} in {}", mail.text);
    }
    t.finish().await
}

#[tokio::test]
async fn writing_is_idempotent_on_the_dedupe_key_inside_a_transaction() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now().trunc_subsecs(3);
    let f = Fixture::new(&t.db, now).await?;
    let to = vec![OWNER.to_owned()];
    let payload = alert(f.ws_a, "A", "1");

    // In one transaction: the duplicate writes nothing and does not abort the
    // transaction (it would on PostgreSQL with a failing INSERT).
    let tx = billing::db::begin_write(&t.db).await?;
    let first =
        notes::enqueue_notification(&tx, None, Some(f.ws_a), &to, &payload, "k1", now).await?;
    assert!(first.is_some());
    let again =
        notes::enqueue_notification(&tx, None, Some(f.ws_a), &to, &payload, "k1", now).await?;
    assert_eq!(again, None);
    let other =
        notes::enqueue_notification(&tx, None, Some(f.ws_a), &to, &payload, "k2", now).await?;
    assert!(other.is_some());
    tx.commit().await?;
    assert_eq!(count(&t.db, "notifications").await?, 2);
    // And again after the commit, from another transaction.
    let later =
        notes::enqueue_notification(&t.db, None, Some(f.ws_a), &to, &payload, "k1", now).await?;
    assert_eq!(later, None);

    let stored = row(&t.db, first.expect("first")).await?;
    assert_eq!(stored.kind, "LOW_BALANCE_ALERT");
    assert_eq!(stored.status, NotificationStatus::Pending);
    assert_eq!(stored.attempts, 0);
    assert_eq!(notes::payload_of(&stored)?, payload);
    assert_eq!(notes::recipients_of(&stored), [OWNER]);

    // Recipients are validated and normalised; nobody to tell writes nothing.
    let mixed = vec![
        "B@Test.Example".to_owned(),
        "a@test.example".into(),
        "b@test.example".into(),
    ];
    let id = notes::enqueue_notification(&t.db, None, None, &mixed, &payload, "k3", now)
        .await?
        .expect("written");
    assert_eq!(
        row(&t.db, id).await?.recipients,
        "a@test.example,b@test.example"
    );
    let none = notes::enqueue_notification(&t.db, None, None, &[], &payload, "k4", now).await?;
    assert_eq!(none, None);
    let bad = vec!["not an address".to_owned()];
    let err = notes::enqueue_notification(&t.db, None, None, &bad, &payload, "k5", now)
        .await
        .expect_err("bad address");
    assert_eq!(err.code(), ErrorCode::InvalidInput);
    assert_eq!(count(&t.db, "notifications").await?, 3);

    // A receipt is written once per purchase, and only for a SUCCEEDED one.
    let purchase_id = captured_purchase(&t.db, f.ws_a, now).await?;
    // The capture already wrote it (same transaction as the credit): writing again is a no-op.
    assert_eq!(
        notes::receipt_for_purchase(&t.db, purchase_id, now).await?,
        None
    );
    let pending = purchases::create_purchase(
        &t.db,
        PurchaseRequest {
            workspace_id: f.ws_a,
            item: PurchaseItem::Package("pkg_10".into()),
            source: PurchaseSource::Manual,
            payment_method_id: None,
            idempotency_key: "pending".into(),
            created_by_user_id: None,
        },
        now,
    )
    .await?;
    let err = notes::receipt_for_purchase(&t.db, pending.purchase.id, now)
        .await
        .expect_err("pending purchase");
    assert_eq!(err.code(), ErrorCode::InvalidInput);
    let err = notes::receipt_for_purchase(&t.db, Uuid::now_v7(), now)
        .await
        .expect_err("unknown purchase");
    assert_eq!(err.code(), ErrorCode::NotFound);
    assert_eq!(count(&t.db, "notifications").await?, 4);
    t.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_notification_is_never_sent_twice() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now().trunc_subsecs(3);
    let f = Fixture::new(&t.db, now).await?;
    let smtp = SmtpServer::start()?;
    let mailer = smtp.mailer();

    // One after the other.
    let id = enqueue(&t.db, &f, &[OWNER], &alert(f.ws_a, "A", "3"), "a", now).await?;
    let first = email::deliver(&t.db, &mailer, id, FROM, now).await?;
    let second = email::deliver(&t.db, &mailer, id, FROM, now + Duration::hours(1)).await?;
    assert_eq!(
        (first, second),
        (DeliveryOutcome::Sent, DeliveryOutcome::AlreadySent)
    );
    assert_eq!(smtp.received().len(), 1);
    assert_eq!(
        row(&t.db, id).await?.sent_at,
        Some(now),
        "the first send's time"
    );

    // At the same time, from two pools (two workers): one sends, the other is
    // turned away by the claim (or finds it sent).
    let other_pool = t.second_pool().await?;
    let id = enqueue(&t.db, &f, &[OWNER], &alert(f.ws_a, "A", "2"), "b", now).await?;
    let (a, b) = tokio::join!(
        email::deliver(&t.db, &mailer, id, FROM, now),
        email::deliver(&other_pool, &mailer, id, FROM, now)
    );
    let mut outcomes = [a?, b?];
    outcomes.sort_by_key(|o| *o != DeliveryOutcome::Sent);
    assert_eq!(outcomes[0], DeliveryOutcome::Sent);
    assert!(
        matches!(
            outcomes[1],
            DeliveryOutcome::Busy | DeliveryOutcome::AlreadySent
        ),
        "{outcomes:?}"
    );
    assert_eq!(smtp.received().len(), 2);
    other_pool.close().await?;

    // A live claim keeps other deliveries off until it lapses (its holder crashed).
    let id = enqueue(&t.db, &f, &[OWNER], &alert(f.ws_a, "A", "1"), "c", now).await?;
    let claimed = notes::claim_for_delivery(&t.db, id, now).await?;
    assert!(claimed.is_some());
    assert_eq!(notes::claim_for_delivery(&t.db, id, now).await?, None);
    let soon = now + Duration::seconds(notes::DELIVERY_LEASE_SECS - 1);
    assert_eq!(
        email::deliver(&t.db, &mailer, id, FROM, soon).await?,
        DeliveryOutcome::Busy
    );
    assert_eq!(smtp.received().len(), 2);
    let lapsed = now + Duration::seconds(notes::DELIVERY_LEASE_SECS + 1);
    assert_eq!(
        email::deliver(&t.db, &mailer, id, FROM, lapsed).await?,
        DeliveryOutcome::Sent
    );
    assert_eq!(smtp.received().len(), 3);
    // The crashed holder's late mark changes nothing; SENT is never claimed again.
    assert!(!notes::mark_sent(&t.db, id, now).await?);
    assert_eq!(
        notes::claim_for_delivery(&t.db, id, lapsed + Duration::days(1)).await?,
        None
    );
    let r = row(&t.db, id).await?;
    assert_eq!(
        (r.status, r.sent_at),
        (NotificationStatus::Sent, Some(lapsed))
    );

    // An unknown notification is NOT_FOUND.
    let err = email::deliver(&t.db, &mailer, Uuid::now_v7(), FROM, now)
        .await
        .expect_err("unknown");
    assert!(matches!(&err, DeliveryError::Billing(e) if e.code() == ErrorCode::NotFound));
    assert!(!err.is_retryable());
    t.finish().await
}

#[tokio::test]
async fn a_failed_smtp_delivery_is_recorded_and_retried() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now().trunc_subsecs(3);
    let f = Fixture::new(&t.db, now).await?;
    let id = enqueue(&t.db, &f, &[OWNER], &alert(f.ws_a, "A", "4.5"), "a", now).await?;
    let policy = RetryPolicy::NOTIFICATIONS;

    // No server at all: the attempt is recorded and the next one scheduled 30 s
    // (plus up to a quarter of jitter) later.
    let nowhere = Mailer::plain("127.0.0.1", closed_port()?);
    let first = now + Duration::seconds(1);
    let err = email::deliver(&t.db, &nowhere, id, FROM, first)
        .await
        .expect_err("connection refused");
    assert!(err.is_retryable(), "{err}");
    let DeliveryError::Failed {
        id: failed,
        attempts: 1,
        retry_after: Some(wait),
        ..
    } = err
    else {
        panic!("{err}");
    };
    assert_eq!(failed, id);
    assert!(wait >= policy.base_delay(1) && wait <= policy.base_delay(1) * 5 / 4);
    let r = row(&t.db, id).await?;
    assert_eq!(
        (r.status, r.attempts, r.sent_at),
        (NotificationStatus::Pending, 1, None)
    );
    assert!(r.last_error.is_some());
    let due_at = r.next_attempt_at.expect("a next attempt");
    assert_eq!(due_at, first + Duration::from_std(wait)?);
    // Not due before its time: neither the sweep nor a delivery touches it.
    assert!(
        notes::due_notifications(&t.db, due_at - Duration::milliseconds(1), 10)
            .await?
            .is_empty()
    );
    let smtp = SmtpServer::start()?;
    let mailer = smtp.mailer();
    assert_eq!(
        email::deliver(&t.db, &mailer, id, FROM, first + Duration::seconds(2)).await?,
        DeliveryOutcome::NotDue { due_at }
    );
    assert!(smtp.received().is_empty());
    assert_eq!(
        notes::due_notifications(&t.db, due_at, 10).await?,
        [id],
        "the sweep finds it once due"
    );

    // A server that refuses (451, temporary): the second wait doubles.
    smtp.set_rejecting(true);
    let second = due_at;
    let err = email::deliver(&t.db, &mailer, id, FROM, second)
        .await
        .expect_err("refused");
    let DeliveryError::Failed {
        attempts: 2,
        retry_after: Some(wait),
        ..
    } = err
    else {
        panic!("{err}");
    };
    assert!(wait >= policy.base_delay(2), "{wait:?}");
    let r = row(&t.db, id).await?;
    assert_eq!((r.status, r.attempts), (NotificationStatus::Pending, 2));
    assert!(
        r.last_error.as_deref().is_some_and(|e| e.contains("451")),
        "{r:?}"
    );
    assert!(smtp.received().is_empty());

    // The retry succeeds once the server accepts.
    smtp.set_rejecting(false);
    let later = r.next_attempt_at.expect("a next attempt");
    assert_eq!(
        email::deliver(&t.db, &mailer, id, FROM, later).await?,
        DeliveryOutcome::Sent
    );
    let r = row(&t.db, id).await?;
    assert_eq!(
        (r.status, r.attempts, r.sent_at, r.next_attempt_at),
        (NotificationStatus::Sent, 2, Some(later), None)
    );
    assert_eq!(smtp.received().len(), 1);
    assert!(notes::due_notifications(&t.db, later, 10).await?.is_empty());
    // A failure reported late for a SENT notification changes nothing.
    assert_eq!(
        notes::record_failure(&t.db, id, "late", &policy, later).await?,
        None
    );
    assert_eq!(row(&t.db, id).await?.status, NotificationStatus::Sent);

    // After its last attempt a notification is DEAD with its last error, never sent;
    // a retry on request puts it back, due at once, with a fresh budget.
    let two = RetryPolicy {
        attempts_max: 2,
        ..policy
    };
    let id = enqueue(&t.db, &f, &[OWNER], &alert(f.ws_a, "A", "4"), "b", now).await?;
    let r = notes::record_failure(&t.db, id, "timeout", &two, now)
        .await?
        .expect("pending");
    assert_eq!(
        (r.row.status, r.row.attempts),
        (NotificationStatus::Pending, 1)
    );
    assert!(r.retry_after.is_some());
    let r = notes::record_failure(&t.db, id, "timeout", &two, now)
        .await?
        .expect("pending");
    assert_eq!(
        (r.row.status, r.row.attempts),
        (NotificationStatus::Dead, 2)
    );
    assert_eq!((r.retry_after, r.row.next_attempt_at), (None, None));
    assert!(
        r.row
            .last_error
            .as_deref()
            .is_some_and(|e| e.ends_with(": timeout"))
    );
    assert_eq!(
        email::deliver(&t.db, &mailer, id, FROM, later).await?,
        DeliveryOutcome::Dead
    );
    assert_eq!(smtp.received().len(), 1);
    assert!(notes::due_notifications(&t.db, later, 10).await?.is_empty());
    let pending_again = notes::retry_dead(&t.db, None, id, later).await?;
    assert_eq!(
        (
            pending_again.status,
            pending_again.attempts,
            pending_again.next_attempt_at
        ),
        (NotificationStatus::Pending, 0, Some(later))
    );
    assert!(pending_again.last_error.is_some(), "the last error is kept");
    assert_eq!(
        email::deliver(&t.db, &mailer, id, FROM, later).await?,
        DeliveryOutcome::Sent
    );
    assert_eq!(smtp.received().len(), 2);
    let again = notes::retry_dead(&t.db, None, id, later).await;
    assert!(
        matches!(&again, Err(e) if e.code() == ErrorCode::InvalidInput),
        "only a DEAD notification is retried: {again:?}"
    );
    let unknown = notes::retry_dead(&t.db, None, Uuid::now_v7(), later).await;
    assert!(matches!(&unknown, Err(e) if e.code() == ErrorCode::NotFound));

    // A bad sender address is a configuration error: nothing is recorded.
    let id = enqueue(&t.db, &f, &[OWNER], &alert(f.ws_a, "A", "3"), "c", now).await?;
    let err = email::deliver(&t.db, &mailer, id, "not an address", later)
        .await
        .expect_err("bad from");
    assert!(matches!(err, DeliveryError::Config(_)) && !err.is_retryable());
    let r = row(&t.db, id).await?;
    assert_eq!(
        (r.status, r.attempts, r.sent_at),
        (NotificationStatus::Pending, 0, None)
    );
    t.finish().await
}

#[tokio::test]
async fn the_outbox_writes_one_eml_per_notification_and_never_twice() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now().trunc_subsecs(3);
    let f = Fixture::new(&t.db, now).await?;
    let dir = tempfile::tempdir()?;
    let outbox = dir.path().join("data").join("outbox");
    let mailer = Mailer::from_url(&format!("file://{}", outbox.display()))?;

    let a = enqueue(&t.db, &f, &[OWNER], &alert(f.ws_a, "A", "9.99"), "a", now).await?;
    let b = enqueue(&t.db, &f, &[OWNER], &alert(f.ws_a, "A", "0.5"), "b", now).await?;
    for id in [a, b] {
        assert_eq!(
            email::deliver(&t.db, &mailer, id, FROM, now).await?,
            DeliveryOutcome::Sent
        );
    }
    let mut names: Vec<String> = std::fs::read_dir(&outbox)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    let mut expected = vec![format!("{a}.eml"), format!("{b}.eml")];
    expected.sort();
    assert_eq!(names, expected, "one file each, no temporary files left");

    let path = email::outbox_path(&outbox, a);
    let written = std::fs::read(&path)?;
    let mail = parse_mail(&written);
    assert_eq!(mail.subject, "[URGENT] Low balance in A: 9.99 credits left");
    assert_eq!(mail.to, OWNER);
    assert_eq!(mail.message_id, format!("<{a}@reservoir.test>"));
    assert!(mail.text.contains("Balance: 9.99 credits"));

    // Sent is sent.
    assert_eq!(
        email::deliver(&t.db, &mailer, a, FROM, now + Duration::hours(1)).await?,
        DeliveryOutcome::AlreadySent
    );
    // A crash after the file was written but before the row was marked: the retry
    // finds the file, writes nothing and marks the row.
    let mut reset = row(&t.db, a).await?.into_active_model();
    reset.status = Set(NotificationStatus::Pending);
    reset.sent_at = Set(None);
    reset.update(&t.db).await?;
    let later = now + Duration::hours(2);
    assert_eq!(
        email::deliver(&t.db, &mailer, a, FROM, later).await?,
        DeliveryOutcome::Sent
    );
    assert_eq!(std::fs::read(&path)?, written, "the file is not rewritten");
    assert_eq!(row(&t.db, a).await?.status, NotificationStatus::Sent);
    assert_eq!(std::fs::read_dir(&outbox)?.count(), 2);
    t.finish().await
}

/// The worker in-process over a real queue, sending to `smtp` with a short retry
/// schedule; stopped by the returned sender.
async fn start_worker(
    t: &TestDb,
    smtp: &SmtpServer,
    retry: RetryPolicy,
) -> anyhow::Result<(
    worker::queue::Queue,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
)> {
    let queue = worker::queue::Queue::connect(&t.queue_url()).await?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let config = worker::WorkerConfig {
        poll_interval_ms: 50,
        sweep_interval_ms: 200,
        notification_retry: retry,
        ..Default::default()
    };
    let (db, q, mailer) = (t.second_pool().await?, queue.clone(), smtp.mailer());
    let gateway: std::sync::Arc<dyn billing::payments::PaymentGateway> =
        std::sync::Arc::new(billing::payments::SandboxGateway::new());
    let handle = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.changed().await;
        };
        if let Err(e) = worker::run(db, q, gateway, mailer, FROM.into(), config, shutdown).await {
            panic!("worker failed: {e}");
        }
    });
    Ok((queue, stop, handle))
}

async fn wait_for_status(
    db: &DatabaseConnection,
    id: Uuid,
    status: NotificationStatus,
    bound: std::time::Duration,
) -> anyhow::Result<rows::Model> {
    let started = std::time::Instant::now();
    loop {
        let r = row(db, id).await?;
        if r.status == status {
            return Ok(r);
        }
        anyhow::ensure!(
            started.elapsed() < bound,
            "not {status:?} within {bound:?}: {r:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Through the worker: a mail server that refuses for a while gets the e-mail once it
/// accepts again (retried with backoff, not at every poll); one that never accepts
/// leaves the notification DEAD with its last error after the bounded attempts, and a
/// DEAD notification retried on request is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_worker_retries_with_backoff_then_gives_up_dead() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let now = Utc::now();
    let f = Fixture::new(&t.db, now).await?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("TEST_LOG").unwrap_or_else(|_| "off".into()))
        .with_test_writer()
        .try_init();
    let smtp = SmtpServer::start()?;
    smtp.set_rejecting(true);
    let retry = RetryPolicy {
        base: std::time::Duration::from_millis(200),
        cap: std::time::Duration::from_millis(800),
        attempts_max: 6,
    };
    let (queue, stop, handle) = start_worker(&t, &smtp, retry).await?;
    use billing::jobs::JobSink as _;

    // Refused for about 1.5 s, then accepted: sent once, after a few spaced attempts.
    let id = enqueue(&t.db, &f, &[OWNER], &alert(f.ws_a, "A", "4"), "r1", now).await?;
    let pushed = std::time::Instant::now();
    queue
        .deliver(billing::jobs::DeliverNotification {
            notification_id: id,
        })
        .await
        .map_err(anyhow::Error::msg)?;
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let refused = row(&t.db, id).await?;
    assert_eq!(refused.status, NotificationStatus::Pending, "{refused:?}");
    // Attempts at 0 and at least 0.2, 0.6 and 1.4 s (jitter only adds): at most 4 in
    // 1.5 s, where a retry at every 250 ms poll would have made 6 or more.
    assert!(
        (1..=4).contains(&refused.attempts),
        "backoff spaces the attempts: {refused:?}"
    );
    smtp.set_rejecting(false);
    let sent = wait_for_status(
        &t.db,
        id,
        NotificationStatus::Sent,
        std::time::Duration::from_secs(30),
    )
    .await?;
    eprintln!(
        "sent after {} failed attempts, {:?} after the push",
        sent.attempts,
        pushed.elapsed()
    );
    assert_eq!(smtp.received().len(), 1, "sent once");

    // Never accepted: DEAD after 6 attempts, the last error kept, nothing sent.
    smtp.set_rejecting(true);
    let id = enqueue(&t.db, &f, &[OWNER], &alert(f.ws_a, "A", "3"), "r2", now).await?;
    queue
        .deliver(billing::jobs::DeliverNotification {
            notification_id: id,
        })
        .await
        .map_err(anyhow::Error::msg)?;
    let dead = wait_for_status(
        &t.db,
        id,
        NotificationStatus::Dead,
        std::time::Duration::from_secs(60),
    )
    .await?;
    assert_eq!(dead.attempts, 6);
    assert!(
        dead.last_error
            .as_deref()
            .is_some_and(|e| e.contains("451")),
        "{dead:?}"
    );
    assert_eq!(smtp.received().len(), 1);

    // Retried on request once the server accepts: sent.
    smtp.set_rejecting(false);
    notes::retry_dead(&t.db, Some(&queue), id, Utc::now()).await?;
    wait_for_status(
        &t.db,
        id,
        NotificationStatus::Sent,
        std::time::Duration::from_secs(30),
    )
    .await?;
    assert_eq!(smtp.received().len(), 2);

    let _ = stop.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(15), handle).await;
    t.finish().await
}
