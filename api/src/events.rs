//! Live balances: one [`BalanceHub`] per API process tails the `balance_events` table
//! and fans each new event out to the process's subscribers.
//!
//! # Tailing
//!
//! The tailer reads committed rows in id order. It is woken on PostgreSQL by
//! `LISTEN reservoir_balance_events` (every committed balance event NOTIFYs that
//! channel at commit, see [`billing::ledger::BALANCE_EVENTS_CHANNEL`]), with a fallback
//! poll in case a notification is lost (the listener reconnects with a backoff); on
//! SQLite by a short poll.
//!
//! ## Ids are not commit order (PostgreSQL)
//!
//! `balance_events.id` comes from a sequence at INSERT time, not at commit. Two
//! transactions holding ids 10 and 11 may commit 11 first: a reader that saw 11 and
//! moved its cursor to 11 would never read 10. So the tailer keeps
//!
//! - `cursor`: every id `<= cursor` has been delivered or given up;
//! - `high`: the highest id delivered;
//! - `gaps`: the ids between `cursor` and `high` not seen yet, each with the moment it
//!   was first missed.
//!
//! Each pass reads the rows of the missing ids (`id IN gaps`) and the rows after `high`
//! (`id > high ORDER BY id LIMIT batch_max`). Together that is exactly "every row with
//! `id > cursor` not delivered yet": re-querying from the cursor without reading the
//! delivered rows again. A missing id whose row appears is delivered then (late, but
//! per workspace still in order, see below). A gap still empty after
//! `gap_timeout_ms` is taken as permanent (a rolled-back transaction's id, or a
//! sequence jump after a crash) and given up; the cursor then moves past it. A
//! transaction that stays open longer than that and then commits is not delivered:
//! its subscribers see a jump in `sequence` (the contract's gap detection).
//!
//! Per workspace, delivery order is sequence order: a balance event is inserted right
//! after the UPDATE of its workspace row, which holds the row lock until commit, so a
//! later event of the same workspace gets a higher id and commits later. A row that
//! fills a gap can therefore never belong to a workspace whose later event was already
//! delivered.
//!
//! At start the tailer takes the current maximum id (subscribers see changes from then
//! on) and treats the ids missing just below it as gaps, so a transaction already in
//! flight at start is still delivered.
//!
//! On SQLite there is one writer at a time and a rolled-back id is reused, so rows
//! become visible in id order and there are never gaps; the same code runs.
//!
//! # Fan-out
//!
//! Subscribers register per workspace or per account (the tailer maps workspace →
//! account through the `workspaces` table, cached; a workspace it has not seen yet is
//! resolved on first sight). Each subscriber has a bounded channel. The tailer only
//! ever `try_send`s: a subscriber whose channel is full is dropped at once (its stream
//! yields what was buffered, then one "subscriber too slow; resubscribe" error, then
//! ends), so a slow client never blocks the tailer or the other subscribers.
//!
//! The hub stops when its last `Arc` is dropped or on [`BalanceHub::shutdown`]; the
//! subscribers' streams then end.

use billing::BillingError;
use billing::entity::balance_events;
use billing::entity::enums::BalanceChangeCause;
use billing::ledger::tail;
use billing::sea_orm::{DatabaseConnection, DbBackend};
use chrono::{DateTime, Utc};
use futures::Stream;
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use uuid::Uuid;

/// Settings of a [`BalanceHub`].
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// SQLite: how often the tailer looks for new rows.
    pub poll_interval_ms: u64,
    /// PostgreSQL: a read at least this often even without a notification (a lost
    /// notification, a listener reconnecting).
    pub fallback_poll_ms: u64,
    /// How long a missing id is waited for before it is taken as rolled back.
    pub gap_timeout_ms: u64,
    /// Rows read per query.
    pub batch_max: u64,
    /// Events buffered per subscriber; a subscriber that falls this far behind is dropped.
    pub subscriber_buffer: usize,
    /// Subscribers per process; more are refused with LIMIT_EXCEEDED.
    pub subscribers_max: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            poll_interval_ms: 25,
            fallback_poll_ms: 1_000,
            gap_timeout_ms: 2_000,
            batch_max: 256,
            subscriber_buffer: 256,
            subscribers_max: 10_000,
        }
    }
}

/// Ids just below the maximum checked at start for transactions still in flight.
const START_WINDOW: i64 = 256;
/// Most missing ids tracked at once; beyond that the oldest are given up at once.
/// Real gaps are bounded by the transactions in flight across all processes.
const GAPS_MAX: usize = 4_096;
/// Most missing ids asked for in one query.
const GAP_QUERY_MAX: usize = 512;
/// Longest wait between two attempts to (re)connect the PostgreSQL listener.
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Wait after a failed read before the next one.
const READ_RETRY: Duration = Duration::from_millis(500);

/// One committed balance change, as delivered to subscribers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalanceEvent {
    /// The row id in `balance_events` (delivery order, not a contract field).
    pub id: i64,
    pub workspace_id: Uuid,
    /// The workspace's account; None only if the workspace row could not be found.
    pub account_id: Option<Uuid>,
    /// Strictly increasing, gap-free per workspace.
    pub sequence: i64,
    pub balance_nanos: i64,
    pub reserved_nanos: i64,
    pub cause: BalanceChangeCause,
    pub created_at: DateTime<Utc>,
}

/// What a subscriber is told when it was dropped for falling behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("subscriber too slow; resubscribe")]
pub struct SubscriberTooSlow;

impl From<SubscriberTooSlow> for BillingError {
    fn from(e: SubscriberTooSlow) -> Self {
        BillingError::LimitExceeded(e.to_string())
    }
}

/// The process's balance-event tailer and its subscribers.
pub struct BalanceHub {
    shared: Arc<Shared>,
    /// Dropping it (with the hub) stops the tailer; `shutdown` sends `true`.
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for BalanceHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalanceHub")
            .field("subscribers", &self.subscriber_count())
            .finish_non_exhaustive()
    }
}

impl BalanceHub {
    /// Starts the tailer on the current tokio runtime.
    pub fn start(db: DatabaseConnection, config: HubConfig) -> Arc<BalanceHub> {
        let shared = Arc::new(Shared {
            config: config.clone(),
            registry: Mutex::new(Registry::default()),
            next_id: AtomicU64::new(1),
        });
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(run_tailer(shared.clone(), db, config, stop_rx));
        Arc::new(BalanceHub { shared, stop })
    }

    /// Events of one workspace from now on. The caller authorizes first.
    pub fn subscribe_workspace(&self, workspace_id: Uuid) -> Result<BalanceStream, BillingError> {
        self.shared.subscribe(Key::Workspace(workspace_id))
    }

    /// Events of every workspace of one account from now on (workspaces created later
    /// included). The caller authorizes first.
    pub fn subscribe_account(&self, account_id: Uuid) -> Result<BalanceStream, BillingError> {
        self.shared.subscribe(Key::Account(account_id))
    }

    /// Events of one workspace for a shared subscription (`crate::shared_feed`): not
    /// counted against `subscribers_max`, since each of its subscribers holds a
    /// [`Seat`] instead. The caller authorizes first.
    pub fn subscribe_workspace_shared(
        &self,
        workspace_id: Uuid,
    ) -> Result<BalanceStream, BillingError> {
        self.shared
            .subscribe_with(Key::Workspace(workspace_id), Counted::No)
    }

    /// One subscriber's place under `subscribers_max` without a channel of its own (a
    /// subscriber of a shared subscription): refused exactly as `subscribe_workspace`
    /// would be, counted in `subscriber_count` until dropped.
    pub fn reserve_seat(&self) -> Result<Seat, BillingError> {
        self.shared.admit(1)?;
        Ok(Seat {
            shared: Arc::downgrade(&self.shared),
        })
    }

    /// Subscribers registered now (for metrics): channels and seats.
    pub fn subscriber_count(&self) -> usize {
        self.shared.lock().count
    }

    /// Stops the tailer and ends every subscriber's stream; later subscriptions fail.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
        self.shared.close();
    }
}

/// A subscriber's events. Dropping it unregisters the subscriber.
pub struct BalanceStream {
    rx: mpsc::Receiver<Arc<BalanceEvent>>,
    too_slow: Arc<AtomicBool>,
    finished: bool,
    _registration: Registration,
}

impl std::fmt::Debug for BalanceStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalanceStream")
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl Stream for BalanceStream {
    type Item = Result<Arc<BalanceEvent>, SubscriberTooSlow>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(event)) => Poll::Ready(Some(Ok(event))),
            Poll::Ready(None) => {
                // The hub let go of our sender: dropped for being too slow (the flag is
                // set before the sender is dropped), or the hub stopped.
                self.finished = true;
                if self.too_slow.load(Ordering::SeqCst) {
                    Poll::Ready(Some(Err(SubscriberTooSlow)))
                } else {
                    Poll::Ready(None)
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A subscriber of a shared subscription, counted as one hub subscriber until dropped.
#[derive(Debug)]
pub struct Seat {
    shared: Weak<Shared>,
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            let mut registry = shared.lock();
            // After `close` the count was reset; a seat given back then is not counted.
            if !registry.closed {
                registry.count = registry.count.saturating_sub(1);
            }
        }
    }
}

/// Whether a channel counts as a subscriber (a shared subscription's does not: its
/// subscribers hold seats).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counted {
    Yes,
    No,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    Workspace(Uuid),
    Account(Uuid),
}

struct Slot {
    tx: mpsc::Sender<Arc<BalanceEvent>>,
    too_slow: Arc<AtomicBool>,
    counted: Counted,
}

#[derive(Default)]
struct Registry {
    subscribers: HashMap<Key, HashMap<u64, Slot>>,
    count: usize,
    closed: bool,
}

impl Registry {
    /// Offers the event to every subscriber of `key`; drops the full and the gone ones.
    fn fan_out(&mut self, key: Key, event: &Arc<BalanceEvent>) {
        let Some(slots) = self.subscribers.get_mut(&key) else {
            return;
        };
        let mut dropped = 0;
        slots.retain(|id, slot| {
            let keep = match slot.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    slot.too_slow.store(true, Ordering::SeqCst);
                    tracing::info!(
                        subscriber = id,
                        ?key,
                        "dropping a balance subscriber that fell behind"
                    );
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            };
            if !keep && slot.counted == Counted::Yes {
                dropped += 1;
            }
            keep
        });
        self.count -= dropped;
        if slots.is_empty() {
            self.subscribers.remove(&key);
        }
    }
}

struct Shared {
    config: HubConfig,
    registry: Mutex<Registry>,
    next_id: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        // The registry stays consistent even if a holder panicked (no await inside).
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Checks that `more` subscribers fit, under the lock, and counts them.
    fn admit_locked(&self, registry: &mut Registry, more: usize) -> Result<(), BillingError> {
        if registry.closed {
            return Err(BillingError::Internal("the balance hub has stopped".into()));
        }
        if registry.count + more > self.config.subscribers_max {
            return Err(BillingError::LimitExceeded(format!(
                "too many live subscriptions on this server (at most {}); try again later",
                self.config.subscribers_max
            )));
        }
        registry.count += more;
        Ok(())
    }

    fn admit(&self, more: usize) -> Result<(), BillingError> {
        let mut registry = self.lock();
        self.admit_locked(&mut registry, more)
    }

    fn subscribe(self: &Arc<Self>, key: Key) -> Result<BalanceStream, BillingError> {
        self.subscribe_with(key, Counted::Yes)
    }

    fn subscribe_with(
        self: &Arc<Self>,
        key: Key,
        counted: Counted,
    ) -> Result<BalanceStream, BillingError> {
        let (tx, rx) = mpsc::channel(self.config.subscriber_buffer.max(1));
        let too_slow = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut registry = self.lock();
            let more = usize::from(counted == Counted::Yes);
            self.admit_locked(&mut registry, more)?;
            registry.subscribers.entry(key).or_default().insert(
                id,
                Slot {
                    tx,
                    too_slow: too_slow.clone(),
                    counted,
                },
            );
        }
        Ok(BalanceStream {
            rx,
            too_slow,
            finished: false,
            _registration: Registration {
                shared: Arc::downgrade(self),
                key,
                id,
            },
        })
    }

    fn unregister(&self, key: Key, id: u64) {
        let mut registry = self.lock();
        if let Some(slots) = registry.subscribers.get_mut(&key)
            && let Some(slot) = slots.remove(&id)
        {
            if slots.is_empty() {
                registry.subscribers.remove(&key);
            }
            if slot.counted == Counted::Yes {
                registry.count -= 1;
            }
        }
    }

    fn deliver(&self, events: &[Arc<BalanceEvent>]) {
        if events.is_empty() {
            return;
        }
        let mut registry = self.lock();
        if registry.subscribers.is_empty() {
            return;
        }
        for event in events {
            registry.fan_out(Key::Workspace(event.workspace_id), event);
            if let Some(account_id) = event.account_id {
                registry.fan_out(Key::Account(account_id), event);
            }
        }
    }

    /// Drops every sender (the streams end) and refuses new subscribers.
    fn close(&self) {
        let mut registry = self.lock();
        registry.closed = true;
        registry.subscribers.clear();
        registry.count = 0;
    }
}

struct Registration {
    shared: Weak<Shared>,
    key: Key,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.unregister(self.key, self.id);
        }
    }
}

/// The tailer's position (see the module docs).
struct Tail {
    /// Every id `<= cursor` has been delivered or given up.
    cursor: i64,
    /// The highest id delivered (`>= cursor`).
    high: i64,
    /// Ids in `(cursor, high)` not seen yet, with when they were first missed.
    gaps: BTreeMap<i64, Instant>,
    /// Workspace → account, filled on first sight of a workspace.
    accounts: HashMap<Uuid, Uuid>,
    gap_timeout: Duration,
    batch_max: u64,
}

impl Tail {
    fn new(config: &HubConfig) -> Self {
        Self {
            cursor: 0,
            high: 0,
            gaps: BTreeMap::new(),
            accounts: HashMap::new(),
            gap_timeout: Duration::from_millis(config.gap_timeout_ms),
            batch_max: config.batch_max.max(1),
        }
    }

    /// Starts at the current maximum id; ids missing just below it may be transactions
    /// in flight, so they are gaps to wait for.
    async fn start_at_end(&mut self, db: &DatabaseConnection) -> Result<(), BillingError> {
        let Some(max) = tail::latest_event_id(db).await? else {
            return Ok(());
        };
        let present = tail::event_ids_above(db, max - START_WINDOW).await?;
        let present: std::collections::HashSet<i64> = present.into_iter().collect();
        let now = Instant::now();
        let low = (max - START_WINDOW).max(0);
        for id in (low + 1)..max {
            if !present.contains(&id) {
                self.gaps.insert(id, now);
            }
        }
        self.high = max;
        self.cursor = self.gaps.keys().next().map_or(max, |first| first - 1);
        tracing::debug!(
            start_id = max,
            gaps = self.gaps.len(),
            "balance-event tailer started"
        );
        Ok(())
    }

    /// Reads and delivers everything committed since the last pass.
    async fn catch_up(
        &mut self,
        db: &DatabaseConnection,
        shared: &Shared,
    ) -> Result<(), BillingError> {
        loop {
            let mut rows = Vec::new();
            if !self.gaps.is_empty() {
                let missing: Vec<i64> = self.gaps.keys().take(GAP_QUERY_MAX).copied().collect();
                rows = tail::events_by_ids(db, &missing).await?;
            }
            let fresh = tail::events_after(db, self.high, self.batch_max).await?;
            let more = fresh.len() as u64 >= self.batch_max;
            rows.extend(fresh);
            rows.sort_by_key(|r| r.id);
            self.resolve_accounts(db, &rows).await?;

            // Only now (nothing can fail any more) is the position moved.
            let now = Instant::now();
            let mut events = Vec::with_capacity(rows.len());
            for row in rows {
                if row.id > self.high {
                    // Ids skipped between the last one seen and this one: in flight or
                    // rolled back. Far below this one they are given up at once.
                    let from = (self.high + 1).max(row.id - GAPS_MAX as i64);
                    for missing in from..row.id {
                        self.gaps.insert(missing, now);
                    }
                    self.high = row.id;
                } else if self.gaps.remove(&row.id).is_none() {
                    continue; // already delivered
                }
                events.push(Arc::new(BalanceEvent {
                    id: row.id,
                    workspace_id: row.workspace_id,
                    account_id: self.accounts.get(&row.workspace_id).copied(),
                    sequence: row.sequence,
                    balance_nanos: row.balance_nanos,
                    reserved_nanos: row.reserved_nanos,
                    cause: row.cause,
                    created_at: row.created_at,
                }));
            }
            shared.deliver(&events);
            self.settle(now);
            if !more {
                return Ok(());
            }
        }
    }

    /// Gives up the gaps waited for long enough and moves the cursor to just below the
    /// first gap left (or to `high`).
    fn settle(&mut self, now: Instant) {
        let timeout = self.gap_timeout;
        let before = self.gaps.len();
        self.gaps
            .retain(|_, since| now.saturating_duration_since(*since) < timeout);
        while self.gaps.len() > GAPS_MAX {
            self.gaps.pop_first();
        }
        if self.gaps.len() < before {
            tracing::debug!(
                given_up = before - self.gaps.len(),
                "balance-event ids taken as rolled back"
            );
        }
        self.cursor = self.gaps.keys().next().map_or(self.high, |first| first - 1);
    }

    /// When the oldest open gap times out (the tailer must look again by then even
    /// without a notification).
    fn next_deadline(&self) -> Option<Instant> {
        self.gaps
            .values()
            .min()
            .map(|since| *since + self.gap_timeout)
    }

    async fn resolve_accounts(
        &mut self,
        db: &DatabaseConnection,
        rows: &[balance_events::Model],
    ) -> Result<(), BillingError> {
        let mut unknown: Vec<Uuid> = rows
            .iter()
            .map(|r| r.workspace_id)
            .filter(|id| !self.accounts.contains_key(id))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort_unstable();
        unknown.dedup();
        let found = billing::accounts::lookups::account_ids_of_workspaces(db, &unknown).await?;
        self.accounts.extend(found);
        Ok(())
    }
}

async fn run_tailer(
    shared: Arc<Shared>,
    db: DatabaseConnection,
    config: HubConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut tail = Tail::new(&config);
    let postgres = db.get_database_backend() == DbBackend::Postgres;
    // Find the end of the table, retrying while the database is unreachable.
    loop {
        if *stop.borrow() {
            return;
        }
        match tail.start_at_end(&db).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "balance-event tailer cannot read its start; retrying");
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(READ_RETRY) => {}
                }
            }
        }
    }
    let wake = Arc::new(Notify::new());
    let idle = if postgres {
        tokio::spawn(listen(db.clone(), wake.clone(), stop.clone()));
        Duration::from_millis(config.fallback_poll_ms.max(1))
    } else {
        Duration::from_millis(config.poll_interval_ms.max(1))
    };
    loop {
        if *stop.borrow() {
            break;
        }
        let mut until = Instant::now() + idle;
        match tail.catch_up(&db, &shared).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "balance-event tailer read failed; retrying");
                until = Instant::now() + READ_RETRY;
            }
        }
        if let Some(deadline) = tail.next_deadline() {
            until = until.min(deadline);
        }
        tokio::select! {
            _ = stop.changed() => break,
            () = wake.notified() => {}
            () = tokio::time::sleep_until(until) => {}
        }
    }
    shared.close();
    tracing::debug!("balance-event tailer stopped");
}

/// PostgreSQL: LISTENs on the balance-events channel on a dedicated connection (not
/// one of the pool's) and wakes the tailer on each notification, and after every
/// (re)connection since notifications sent in between are lost.
async fn listen(db: DatabaseConnection, wake: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = tokio::select! {
            _ = stop.changed() => return,
            r = tail::listen(&db) => r,
        };
        match connected {
            Ok(mut listener) => {
                backoff = Duration::from_millis(100);
                wake.notify_one();
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        r = listener.try_recv() => match r {
                            // A notification, or the connection was lost and re-established
                            // (notifications may have been missed): either way, read.
                            Ok(_) => wake.notify_one(),
                            Err(e) => {
                                tracing::warn!(error = %e, "balance-event listener lost; reconnecting");
                                break;
                            }
                        },
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "balance-event listener cannot connect; polling meanwhile");
            }
        }
        wake.notify_one();
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail() -> Tail {
        Tail::new(&HubConfig {
            gap_timeout_ms: 1_000,
            ..Default::default()
        })
    }

    #[test]
    fn the_cursor_stays_below_the_first_gap_until_it_times_out() {
        let mut t = tail();
        let start = Instant::now();
        t.high = 9;
        t.cursor = 9;
        // 11 commits before 10.
        t.gaps.insert(10, start);
        t.high = 11;
        t.settle(start);
        assert_eq!(t.cursor, 9);
        assert_eq!(
            t.next_deadline(),
            Some(start + Duration::from_millis(1_000))
        );
        // 10 appears: the cursor catches up.
        t.gaps.remove(&10);
        t.settle(start);
        assert_eq!(t.cursor, 11);
        // 12 never commits: given up after the timeout.
        t.gaps.insert(12, start);
        t.high = 13;
        t.settle(start + Duration::from_millis(999));
        assert_eq!(t.cursor, 11);
        t.settle(start + Duration::from_millis(1_000));
        assert_eq!(t.cursor, 13);
        assert!(t.gaps.is_empty());
    }
}
