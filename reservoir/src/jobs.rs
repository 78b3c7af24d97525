//! `reservoir jobs`: the background work as an operator sees it. The rows that need
//! work (purchases to capture, notifications to e-mail, webhook deliveries) counted by
//! kind and state with the age of the oldest; the queue's own job rows; the job
//! workers' last heartbeats; one row shown; a DEAD one retried; old finished job rows
//! purged. The queries are `billing::jobs::ops` and `worker::queue`.

use anyhow::Context as _;
use billing::jobs::ops::{self, Work};
use billing::sea_orm::DatabaseConnection;
use chrono::{DateTime, Utc};
use worker::queue::Queue;

/// What `reservoir jobs` was asked to do.
#[derive(Clone, Debug)]
pub enum Action {
    List,
    Show(String),
    Retry(String),
    Purge { older_than_days: u32 },
}

/// Job workers whose last heartbeat is older than this are not listed (they beat every
/// `worker::queue::HEARTBEAT_INTERVAL`, 2 s; one not seen for 6 s is gone or stuck, and
/// the jobs it held are put back by the others).
pub const WORKER_SEEN_WITHIN_SECS: i64 = 600;

/// Runs one action against the database and the queue, printing to stdout.
pub async fn run(db: &DatabaseConnection, queue_url: &str, action: Action) -> anyhow::Result<()> {
    let queue = Queue::connect(queue_url)
        .await
        .with_context(|| format!("connecting to the job queue {}", crate::redact(queue_url)))?;
    let now = Utc::now();
    match action {
        Action::List => list(db, &queue, now).await,
        Action::Show(id) => {
            let id = billing::ids::parse_uuid("job", &id)?;
            print_work(&ops::find(db, id).await?, now);
            Ok(())
        }
        Action::Retry(id) => {
            let id = billing::ids::parse_uuid("job", &id)?;
            let work = ops::retry_dead(db, &queue, id, now).await?;
            println!("retried: PENDING again, job pushed");
            print_work(&work, now);
            Ok(())
        }
        Action::Purge { older_than_days } => {
            let before = now - chrono::Duration::days(i64::from(older_than_days));
            let purged = queue.purge_finished(before.timestamp()).await?;
            println!("{purged} finished job rows older than {older_than_days} days purged");
            Ok(())
        }
    }
}

/// `1h02m`, `35s`: how long ago `at` was.
pub fn age(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - at).num_seconds().max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3_600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3_600..86_400 => format!("{}h{:02}m", secs / 3_600, secs % 3_600 / 60),
        _ => format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3_600),
    }
}

fn from_unix(secs: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(secs, 0)
}

async fn list(db: &DatabaseConnection, queue: &Queue, now: DateTime<Utc>) -> anyhow::Result<()> {
    println!("{:<9} {:<16} {:>8}  OLDEST", "KIND", "STATE", "COUNT");
    for row in ops::summary(db).await? {
        let oldest = row
            .oldest_created_at
            .map_or_else(String::new, |at| age(at, now));
        println!(
            "{:<9} {:<16} {:>8}  {oldest}",
            row.kind.as_str(),
            row.state,
            row.count
        );
    }
    println!();
    println!(
        "{:<36} {:<8} {:>8}  EARLIEST RUN_AT",
        "QUEUE", "STATE", "COUNT"
    );
    for row in queue.counts().await? {
        let earliest = row
            .earliest_run_at
            .and_then(from_unix)
            .map_or_else(String::new, |at| age(at, now) + " ago");
        println!(
            "{:<36} {:<8} {:>8}  {earliest}",
            row.queue, row.status, row.count
        );
    }
    println!();
    println!("{:<48} {:<36}  LAST HEARTBEAT", "WORKER", "QUEUE");
    let since = now.timestamp() - WORKER_SEEN_WITHIN_SECS;
    for w in queue.workers_seen(since).await? {
        let seen = from_unix(w.last_seen).map_or_else(String::new, |at| age(at, now) + " ago");
        println!("{:<48} {:<36}  {seen}", w.name, w.queue);
    }
    Ok(())
}

fn when(at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    at.map_or_else(
        || "-".to_owned(),
        |at| {
            let relative = if at > now {
                format!("in {}", age(now, at))
            } else {
                format!("{} ago", age(at, now))
            };
            format!("{} ({relative})", at.to_rfc3339())
        },
    )
}

fn print_work(work: &Work, now: DateTime<Utc>) {
    match work {
        Work::Capture(p) => {
            println!(
                "kind: capture (purchase)\nid: {}\nstatus: {}",
                p.id,
                p.status.as_str()
            );
            println!(
                "attempts: {}\nfailure: {}",
                p.attempts,
                p.failure_reason.as_deref().unwrap_or("-")
            );
            println!("created: {}", when(Some(p.created_at), now));
        }
        Work::Email(n) => {
            println!(
                "kind: email (notification {})\nid: {}\nstatus: {}",
                n.kind,
                n.id,
                n.status.as_str()
            );
            println!(
                "attempts: {}\nlast error: {}",
                n.attempts,
                n.last_error.as_deref().unwrap_or("-")
            );
            println!("next attempt: {}", when(n.next_attempt_at, now));
            println!(
                "created: {}\nrecipients: {}",
                when(Some(n.created_at), now),
                n.recipients
            );
        }
        Work::Webhook(d) => {
            println!(
                "kind: webhook (delivery)\nid: {}\nstatus: {}",
                d.id,
                d.status.as_str()
            );
            println!(
                "attempts: {}\nlast response code: {}",
                d.attempts,
                d.last_response_code
                    .map_or_else(|| "-".into(), |c| c.to_string())
            );
            println!(
                "last error: {}\nnext attempt: {}",
                d.last_error.as_deref().unwrap_or("-"),
                when(d.next_attempt_at, now)
            );
            println!(
                "created: {}\nevent: {}\nendpoint: {}",
                when(Some(d.created_at), now),
                d.event_id,
                d.endpoint_id
            );
        }
    }
}
