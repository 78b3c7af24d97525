//! Shared balance subscriptions: identical `balanceChanged` subscriptions of one
//! process share one execution.
//!
//! With a thousand subscribers of one workspace, async-graphql would resolve and
//! serialise each balance event a thousand times, once per subscriber's stream. A
//! subscription whose document is *eligible* (see [`Eligible::of`]) is instead run by
//! the WebSocket loop (`crate::websocket`) in three steps:
//!
//! 1. **Admission, per subscriber.** The document is executed by async-graphql with the
//!    subscriber's own connection data and [`SharedRun::Admit`]: the resolver parses,
//!    authorizes and takes the subscriber's place under the hub's `subscribers_max`
//!    (a [`Seat`]) exactly as an unshared subscription does, then returns an empty
//!    stream. Any response (a parse or validation error, NOT_FOUND, UNAUTHENTICATED,
//!    LIMIT_EXCEEDED) is the refusal, sent as async-graphql would have sent it.
//! 2. **Joining the feed.** Admitted subscribers join the process-wide feed of
//!    their [`FeedKey`] (normalized document, operation name, variables), creating it
//!    if needed. A feed is one async-graphql execution of the document
//!    ([`SharedRun::Feed`]: its hub channel is not counted, its subscribers' seats
//!    are); each response is serialised once, and every subscriber's channel gets
//!    the same bytes.
//! 3. **Delivery.** The loop frames the shared bytes with the subscriber's own id.
//!
//! Only caller-independent fields are eligible ([`SHAREABLE_FIELDS`], and
//! [`SHAREABLE_WORKSPACE_FIELDS`] under `workspace`): the feed runs
//! with the connection data of the subscriber that created it, so a field whose value
//! depends on who asks (`workspace { account … }`, `members`, `apiKeys`: guarded) must
//! never be shared. Everything else goes to async-graphql's protocol machine as before.
//!
//! Ordering and lag are the hub's: each subscriber has a bounded channel of
//! `subscriber_buffer` events, only ever `try_send`-ed; a subscriber whose channel is
//! full is dropped, gets what was buffered, then the "subscriber too slow;
//! resubscribe" error (rendered by async-graphql, [`SharedRun::TooSlow`]), then
//! `complete`. A feed ends when its last subscriber leaves, or when its execution
//! ends (the hub stopped, or the feed's own hub channel fell behind: its subscribers
//! then get the error it got, and `complete`).

use crate::events::Seat;
use async_graphql::parser::types::{DocumentOperations, OperationType, Selection};
use async_graphql::{Request, Response, Variables};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use tokio::sync::{Notify, mpsc};

/// The root field whose subscriptions are shared.
pub const SHARED_ROOT_FIELD: &str = "balanceChanged";

/// `BalanceChange` fields whose values depend only on the event, never on the caller.
pub const SHAREABLE_FIELDS: &[&str] = &[
    "balance",
    "reserved",
    "available",
    "cause",
    "sequence",
    "at",
    "__typename",
];

/// `Workspace` fields a shared subscription may select under `workspace`: the id, and
/// the balance columns, which `BalanceChange` takes from the event (the name, read
/// when the feed started, could be older than a later subscriber's start).
pub const SHAREABLE_WORKSPACE_FIELDS: &[&str] =
    &["id", "balance", "reserved", "available", "__typename"];

/// Request data telling `balanceChanged` which part of a shared subscription it runs.
pub enum SharedRun {
    /// Authorize the subscriber, take its seat (left in the admission), deliver nothing.
    Admit(Arc<Admission>),
    /// The feed's one execution: its hub channel is not counted as a subscriber.
    Feed,
    /// Yield the "subscriber too slow" error, as an unshared subscription would.
    TooSlow,
}

/// Where the resolver leaves an admitted subscriber's seat.
#[derive(Default)]
pub struct Admission {
    seat: Mutex<Option<Seat>>,
}

impl Admission {
    pub fn admit(&self, seat: Seat) {
        *lock(&self.seat) = Some(seat);
    }

    fn take(&self) -> Option<Seat> {
        lock(&self.seat).take()
    }
}

/// A mutex whose data stays consistent even if a holder panicked (no await inside).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What identifies identical subscriptions.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FeedKey {
    document: String,
    operation_name: Option<String>,
    /// The variables as JSON (a different key order only costs sharing).
    variables: String,
}

/// A subscription the loop runs itself: its request's parts and its feed's key.
#[derive(Clone, Debug)]
pub struct Eligible {
    query: String,
    operation_name: Option<String>,
    variables: Variables,
    key: FeedKey,
}

impl Eligible {
    /// Some when the request is one operation, a subscription whose only root field is
    /// `balanceChanged` selecting only [`SHAREABLE_FIELDS`] (and `workspace` with only
    /// [`SHAREABLE_WORKSPACE_FIELDS`]), without fragments, directives or request
    /// extensions. Anything else is left to async-graphql.
    pub fn of(request: &Request) -> Option<Self> {
        if !request.extensions.0.is_empty() {
            return None;
        }
        let document = async_graphql::parser::parse_query(&request.query).ok()?;
        if !document.fragments.is_empty() {
            return None;
        }
        let operation = match &document.operations {
            DocumentOperations::Single(op) => op,
            DocumentOperations::Multiple(ops) if ops.len() == 1 => {
                let (name, op) = ops.iter().next()?;
                // No name picks the only operation, as async-graphql does.
                if request
                    .operation_name
                    .as_deref()
                    .is_some_and(|wanted| wanted != name.as_str())
                {
                    return None;
                }
                op
            }
            DocumentOperations::Multiple(_) => return None,
        };
        let operation = &operation.node;
        if operation.ty != OperationType::Subscription
            || !operation.directives.is_empty()
            || !shareable_root(&operation.selection_set.node.items)
        {
            return None;
        }
        let key = FeedKey {
            document: normalize(&request.query),
            operation_name: request.operation_name.clone(),
            variables: serde_json::to_string(&request.variables).ok()?,
        };
        Some(Self {
            query: request.query.clone(),
            operation_name: request.operation_name.clone(),
            variables: request.variables.clone(),
            key,
        })
    }

    /// The request again, with `run` as its data.
    fn request(&self, run: SharedRun) -> Request {
        let mut request = Request::new(self.query.clone()).variables(self.variables.clone());
        if let Some(name) = &self.operation_name {
            request = request.operation_name(name.clone());
        }
        request.data(run)
    }
}

/// One `balanceChanged` field (any alias and arguments) selecting shareable leaves.
fn shareable_root(items: &[async_graphql::Positioned<Selection>]) -> bool {
    let [item] = items else {
        return false;
    };
    let Selection::Field(root) = &item.node else {
        return false;
    };
    let root = &root.node;
    root.name.node == SHARED_ROOT_FIELD
        && root.directives.is_empty()
        && !root.selection_set.node.items.is_empty()
        && root.selection_set.node.items.iter().all(|item| {
            let Selection::Field(field) = &item.node else {
                return false;
            };
            let field = &field.node;
            let items = &field.selection_set.node.items;
            let shareable = if field.name.node == "workspace" {
                !items.is_empty() && items.iter().all(|i| leaf(i, SHAREABLE_WORKSPACE_FIELDS))
            } else {
                SHAREABLE_FIELDS.contains(&field.name.node.as_str()) && items.is_empty()
            };
            shareable && field.arguments.is_empty() && field.directives.is_empty()
        })
}

/// A field among `names`, without arguments, directives or selections.
fn leaf(item: &async_graphql::Positioned<Selection>, names: &[&str]) -> bool {
    let Selection::Field(field) = &item.node else {
        return false;
    };
    let field = &field.node;
    names.contains(&field.name.node.as_str())
        && field.arguments.is_empty()
        && field.directives.is_empty()
        && field.selection_set.node.items.is_empty()
}

/// The document with every run of ignored tokens (white space, commas, comments)
/// outside strings made one space, so that formatting does not split a feed. String
/// contents are kept byte for byte: two different literals never share a key.
pub fn normalize(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    let mut chars = query.chars().peekable();
    let mut pending_space = false;
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' | '\r' | ',' | '\u{feff}' => pending_space = true,
            '#' => {
                pending_space = true;
                while chars.next_if(|c| *c != '\n' && *c != '\r').is_some() {}
            }
            _ => {
                if pending_space && !out.is_empty() {
                    out.push(' ');
                }
                pending_space = false;
                out.push(c);
                if c == '"' {
                    copy_string(&mut chars, &mut out);
                }
            }
        }
    }
    out
}

/// Copies a string literal whose opening quote was just copied, through its closing
/// quote (a block string `"""…"""` when two more quotes follow).
fn copy_string(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, out: &mut String) {
    let block = chars.next_if_eq(&'"').is_some();
    if block {
        out.push('"');
        if chars.next_if_eq(&'"').is_none() {
            return; // `""`: the empty string, already closed
        }
        out.push('"');
    }
    let mut quotes = 0;
    while let Some(c) = chars.next() {
        out.push(c);
        match c {
            '\\' if block => {
                // `\"""` is an escaped triple quote inside a block string.
                quotes = 0;
                if chars.peek() == Some(&'"') {
                    for _ in 0..3 {
                        if let Some(q) = chars.next_if_eq(&'"') {
                            out.push(q);
                        }
                    }
                }
            }
            '\\' => {
                if let Some(escaped) = chars.next() {
                    out.push(escaped);
                }
            }
            '"' if !block => return,
            '"' => {
                quotes += 1;
                if quotes == 3 {
                    return;
                }
            }
            _ => quotes = 0,
        }
    }
}

/// Runs a request through async-graphql with the connection's data.
pub type Execute = Arc<dyn Fn(Request) -> BoxStream<'static, Response> + Send + Sync>;

/// The process's shared subscriptions.
pub struct SharedFeeds {
    feeds: Mutex<HashMap<FeedKey, Arc<Feed>>>,
    /// Events buffered per subscriber (the hub's `subscriber_buffer`).
    buffer: usize,
    next_id: AtomicU64,
}

impl std::fmt::Debug for SharedFeeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedFeeds")
            .field("feeds", &self.feed_count())
            .finish_non_exhaustive()
    }
}

/// One shared execution and its subscribers.
struct Feed {
    state: Mutex<FeedState>,
    /// Wakes the execution's task when the last subscriber left.
    stop: Notify,
}

#[derive(Default)]
struct FeedState {
    subscribers: HashMap<u64, Slot>,
    /// No subscriber may join any more (ended, or its last subscriber left).
    closed: bool,
}

struct Slot {
    tx: mpsc::Sender<Arc<str>>,
    too_slow: Arc<AtomicBool>,
    /// The subscriber's place under the hub's limit, given back with the slot (when
    /// it leaves or is dropped for falling behind, as a hub channel would be).
    _seat: Seat,
}

impl Feed {
    /// Offers one serialised response to every subscriber; drops the full and the gone
    /// ones. False when none is left.
    fn fan_out(&self, payload: &Arc<str>) -> bool {
        let mut state = lock(&self.state);
        state
            .subscribers
            .retain(|id, slot| match slot.tx.try_send(payload.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    slot.too_slow.store(true, Ordering::SeqCst);
                    tracing::info!(
                        subscriber = id,
                        "dropping a shared balance subscriber that fell behind"
                    );
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        if state.subscribers.is_empty() {
            state.closed = true;
        }
        !state.closed
    }

    /// Ends every subscriber's channel; nobody joins any more.
    fn close(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        state.subscribers.clear();
    }
}

impl SharedFeeds {
    pub fn new(buffer: usize) -> Arc<Self> {
        Arc::new(Self {
            feeds: Mutex::new(HashMap::new()),
            buffer: buffer.max(1),
            next_id: AtomicU64::new(1),
        })
    }

    /// Feeds running now (each one execution, whatever its number of subscribers).
    pub fn feed_count(&self) -> usize {
        lock(&self.feeds).len()
    }

    /// Joins the feed of `eligible` (starting it through `execute` if there is none);
    /// the subscriber receives every response the feed serialises from now on.
    fn join(self: &Arc<Self>, eligible: &Eligible, execute: &Execute, seat: Seat) -> Member {
        let (tx, rx) = mpsc::channel(self.buffer);
        let too_slow = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            tx,
            too_slow: too_slow.clone(),
            _seat: seat,
        };
        let mut feeds = lock(&self.feeds);
        if let Some(feed) = feeds.get(&eligible.key) {
            let mut state = lock(&feed.state);
            if !state.closed {
                state.subscribers.insert(id, slot);
                drop(state);
                return Member::new(rx, too_slow, self, &eligible.key, feed, id);
            }
        }
        let feed = Arc::new(Feed {
            state: Mutex::new(FeedState::default()),
            stop: Notify::new(),
        });
        lock(&feed.state).subscribers.insert(id, slot);
        feeds.insert(eligible.key.clone(), feed.clone());
        drop(feeds);
        let responses = execute(eligible.request(SharedRun::Feed));
        let task = FeedTask {
            feeds: Arc::downgrade(self),
            key: eligible.key.clone(),
            feed: feed.clone(),
        };
        tokio::spawn(task.run(responses));
        Member::new(rx, too_slow, self, &eligible.key, &feed, id)
    }

    /// Forgets `feed` under `key`, unless another feed has taken its place.
    fn remove(&self, key: &FeedKey, feed: &Arc<Feed>) {
        let mut feeds = lock(&self.feeds);
        if feeds.get(key).is_some_and(|f| Arc::ptr_eq(f, feed)) {
            feeds.remove(key);
        }
    }
}

/// The task running one feed's execution; dropping it (the execution ended, the last
/// subscriber left, or the runtime stopped) ends the feed.
struct FeedTask {
    feeds: Weak<SharedFeeds>,
    key: FeedKey,
    feed: Arc<Feed>,
}

impl FeedTask {
    async fn run(self, mut responses: BoxStream<'static, Response>) {
        loop {
            let response = tokio::select! {
                () = self.feed.stop.notified() => break,
                response = responses.next() => response,
            };
            let Some(response) = response else { break };
            // The one serialisation of this event for every subscriber.
            let payload: Arc<str> = match serde_json::to_string(&response) {
                Ok(json) => json.into(),
                Err(e) => {
                    tracing::error!(error = %e, "a shared subscription response did not serialize");
                    break;
                }
            };
            if !self.feed.fan_out(&payload) {
                break;
            }
        }
    }
}

impl Drop for FeedTask {
    fn drop(&mut self) {
        self.feed.close();
        if let Some(feeds) = self.feeds.upgrade() {
            feeds.remove(&self.key, &self.feed);
        }
    }
}

/// One subscriber's place in a feed; leaving (drop) ends the feed if it was the last.
struct Member {
    rx: mpsc::Receiver<Arc<str>>,
    too_slow: Arc<AtomicBool>,
    feeds: Weak<SharedFeeds>,
    key: FeedKey,
    feed: Arc<Feed>,
    id: u64,
}

impl Member {
    fn new(
        rx: mpsc::Receiver<Arc<str>>,
        too_slow: Arc<AtomicBool>,
        feeds: &Arc<SharedFeeds>,
        key: &FeedKey,
        feed: &Arc<Feed>,
        id: u64,
    ) -> Self {
        Self {
            rx,
            too_slow,
            feeds: Arc::downgrade(feeds),
            key: key.clone(),
            feed: feed.clone(),
            id,
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let last = {
            let mut state = lock(&self.feed.state);
            state.subscribers.remove(&self.id);
            let last = state.subscribers.is_empty() && !state.closed;
            if last {
                state.closed = true;
            }
            last
        };
        if last {
            // The feed's lock is released first: `join` takes the feeds' lock, then a
            // feed's.
            self.feed.stop.notify_one();
            if let Some(feeds) = self.feeds.upgrade() {
                feeds.remove(&self.key, &self.feed);
            }
        }
    }
}

/// A shared subscription, from one subscriber's side: the payloads (serialised
/// GraphQL responses) to send it, in order; the end of the stream is `complete`.
pub fn subscribe(
    feeds: Arc<SharedFeeds>,
    eligible: Eligible,
    execute: Execute,
) -> BoxStream<'static, Arc<str>> {
    futures::stream::once(admit_and_join(feeds, eligible, execute))
        .flatten()
        .boxed()
}

async fn admit_and_join(
    feeds: Arc<SharedFeeds>,
    eligible: Eligible,
    execute: Execute,
) -> BoxStream<'static, Arc<str>> {
    let admission = Arc::new(Admission::default());
    let refusal: Vec<Response> = execute(eligible.request(SharedRun::Admit(admission.clone())))
        .collect()
        .await;
    let seat = admission.take();
    let Some(seat) = seat.filter(|_| refusal.is_empty()) else {
        // Refused (or, without a seat, nothing to join): what async-graphql answered.
        return futures::stream::iter(refusal.iter().filter_map(serialize).collect::<Vec<_>>())
            .boxed();
    };
    let member = feeds.join(&eligible, &execute, seat);
    Joined {
        member,
        eligible,
        execute,
        tail: None,
        ended: false,
    }
    .boxed()
}

/// An admitted subscriber: the feed's payloads as they come, then, if it was dropped
/// for falling behind, the error an unshared subscription gets.
struct Joined {
    member: Member,
    eligible: Eligible,
    execute: Execute,
    /// The "too slow" error's response, once dropped.
    tail: Option<BoxStream<'static, Arc<str>>>,
    ended: bool,
}

impl futures::Stream for Joined {
    type Item = Arc<str>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Arc<str>>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.tail.is_none() && !this.ended {
            match this.member.rx.poll_recv(cx) {
                Poll::Ready(Some(payload)) => return Poll::Ready(Some(payload)),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.ended = true;
                    if this.member.too_slow.load(Ordering::SeqCst) {
                        this.tail = Some(this.too_slow_error());
                    }
                }
            }
        }
        let Some(tail) = &mut this.tail else {
            return Poll::Ready(None);
        };
        let next = tail.poll_next_unpin(cx);
        if let Poll::Ready(None) = next {
            this.tail = None; // never polled again once it ended
        }
        next
    }
}

impl Joined {
    /// The "subscriber too slow; resubscribe" error, rendered by async-graphql for this
    /// document (its path and location), as an unshared subscription would send it.
    fn too_slow_error(&self) -> BoxStream<'static, Arc<str>> {
        self.execute.as_ref()(self.eligible.request(SharedRun::TooSlow))
            .filter_map(|response| std::future::ready(serialize(&response)))
            .boxed()
    }
}

fn serialize(response: &Response) -> Option<Arc<str>> {
    match serde_json::to_string(response) {
        Ok(json) => Some(json.into()),
        Err(e) => {
            tracing::error!(error = %e, "a subscription response did not serialize");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "subscription($w: ID!) { balanceChanged(workspaceId: $w) { sequence at } }";

    #[test]
    fn formatting_does_not_split_a_feed_and_strings_are_kept() {
        assert_eq!(
            normalize(
                "subscription($w: ID!)\n{\n  balanceChanged(workspaceId: $w) {\n sequence, at } # c\n}"
            ),
            normalize(DOC)
        );
        assert_ne!(
            normalize(r#"{ f(a: "x  y") }"#),
            normalize(r#"{ f(a: "x y") }"#)
        );
        assert_eq!(
            normalize(r#"{ f(a: "x,  \" #y") }"#),
            r#"{ f(a: "x,  \" #y") }"#
        );
        assert_eq!(
            normalize("{ f(a: \"\"\"x  \\\"\"\" ,y\"\"\") g }"),
            "{ f(a: \"\"\"x  \\\"\"\" ,y\"\"\") g }"
        );
        assert_eq!(normalize("{ f(a: \"\"  ,  b: 1) }"), "{ f(a: \"\" b: 1) }");
    }

    #[test]
    fn only_caller_independent_balance_subscriptions_are_shared() {
        let eligible = |query: &str| Eligible::of(&Request::new(query)).is_some();
        assert!(eligible(DOC));
        assert!(eligible(
            "subscription S { b: balanceChanged(workspaceId: \"x\") { balance __typename } }"
        ));
        // The dashboard's document.
        assert!(eligible(
            "subscription($id: ID!) { balanceChanged(workspaceId: $id) { \
             workspace { id } balance reserved available sequence at } }"
        ));
        for query in [
            "subscription { balanceChanged(workspaceId: \"x\") { workspace { name } sequence } }",
            "subscription { balanceChanged(workspaceId: \"x\") { workspace { account { id } } } }",
            "subscription { balanceChanged(workspaceId: \"x\") { workspace { id members { role } } } }",
            "subscription { balanceChanged(workspaceId: \"x\") { workspace } }",
            "subscription { balanceChanged(workspaceId: \"x\") { sequence { x } } }",
            "subscription { balanceChanged(workspaceId: \"x\") { ...F } } fragment F on BalanceChange { sequence }",
            "subscription { balanceChanged(workspaceId: \"x\") { ... on BalanceChange { sequence } } }",
            "subscription { balanceChanged(workspaceId: \"x\") @skip(if: false) { sequence } }",
            "subscription { balanceChanged(workspaceId: \"x\") { sequence @include(if: true) } }",
            "subscription { accountBalanceChanged(accountId: \"x\") { totalBalance } }",
            "subscription { a: balanceChanged(workspaceId: \"x\") { sequence } b: balanceChanged(workspaceId: \"y\") { sequence } }",
            "query { balanceChanged(workspaceId: \"x\") { sequence } }",
            "subscription { balanceChanged(workspaceId: \"x\") { sequence }",
        ] {
            assert!(!eligible(query), "{query}");
        }
        // Named operations: the one named, only.
        let two = "subscription A { balanceChanged(workspaceId: \"x\") { sequence } } \
                   subscription B { balanceChanged(workspaceId: \"x\") { at } }";
        assert!(Eligible::of(&Request::new(two).operation_name("A")).is_none());
        let one = "subscription A { balanceChanged(workspaceId: \"x\") { sequence } }";
        assert!(Eligible::of(&Request::new(one).operation_name("A")).is_some());
        assert!(Eligible::of(&Request::new(one)).is_some());
        assert!(Eligible::of(&Request::new(one).operation_name("B")).is_none());
    }

    #[test]
    fn the_key_tells_variables_and_names_apart() {
        let key = |w: &str| {
            let request =
                Request::new(DOC).variables(Variables::from_json(serde_json::json!({ "w": w })));
            Eligible::of(&request).map(|e| e.key)
        };
        assert_eq!(key("a"), key("a"));
        assert_ne!(key("a"), key("b"));
    }
}
