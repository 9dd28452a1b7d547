//! The AMI client: one supervisor task owns the connection; callers hold a cloneable handle.
//!
//! ```text
//!  handle.send(action) ──mpsc──► supervisor ──write──► socket ──► Asterisk
//!                                    │ registers pending[ActionID]
//!  oneshot ◄── reader task ◄──read── socket ◄── Asterisk
//!              │ responses/list items → pending[ActionID]
//!              ├ events → EventStream (the call tracker: every event, up to ami.max_backlog waiting)
//!              └ events → broadcast (bounded; a slow subscriber gets Lagged, the reader never waits)
//! ```
//!
//! The reader drains the socket continuously (Asterisk drops a client that stalls its writes past
//! `writetimeout`) and never waits for a subscriber. An [`EventStream`] queues every event for
//! its subscriber however far behind it is, up to `ami.max_backlog` events; only past that are
//! events dropped (until half of the backlog is handled), and the subscriber is told where, as
//! `Lagged(n)`, to resync. Broadcast subscribers keep `ami.event_buffer` events. Actions in
//! flight when the link drops fail with [`AmiError::Disconnected`] and are never re-sent: a
//! re-sent Originate rings a phone twice. Reconnects use capped exponential backoff with jitter,
//! one at a time, and every new session is announced as [`AmiEvent::Connected`] so state owners
//! can resync. A link that delivers bytes is alive, even while a `Pong` is late behind a burst.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};

use super::frame::{Frame, Item, Limits, Parser};
use crate::config::{AmiAuth, AmiConfig};

/// Most events collected for one event-list action.
const MAX_LIST_ITEMS: usize = 100_000;

/// An action to send: its name and headers, in order.
#[derive(Debug, Clone)]
pub struct Action {
    name: String,
    headers: Vec<(String, String)>,
}

impl Action {
    pub fn new(name: &str) -> Action {
        Action {
            name: name.to_string(),
            headers: Vec::new(),
        }
    }

    /// Adds a header. CR and LF are removed from keys and values: they would end the header
    /// (or the whole action) early and let a value inject headers.
    pub fn header(mut self, key: &str, value: impl AsRef<str>) -> Action {
        let clean = |s: &str| {
            s.chars()
                .filter(|c| *c != '\r' && *c != '\n')
                .collect::<String>()
        };
        self.headers.push((clean(key), clean(value.as_ref())));
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    fn to_wire(&self, action_id: &str) -> String {
        let mut out = format!("Action: {}\r\nActionID: {action_id}\r\n", self.name);
        for (k, v) in &self.headers {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        out
    }
}

/// The answer to an action: the response frame and, for event-list actions, the list items
/// (without the closing `...Complete` event, which is in `complete`).
#[derive(Debug, Clone)]
pub struct Reply {
    pub action_id: String,
    pub response: Frame,
    pub events: Vec<Frame>,
    pub complete: Option<Frame>,
    /// Events published before the answer was complete: an [`EventStream`] whose
    /// [`EventStream::position`] has reached it has seen everything Asterisk sent before it.
    pub events_before: u64,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AmiError {
    #[error("AMI link is down: {0}")]
    NotConnected(String),
    #[error(
        "AMI link dropped before the answer; the action's outcome is unknown (it is not re-sent)"
    )]
    Disconnected,
    #[error("no answer from Asterisk within {0:?}")]
    Timeout(Duration),
    #[error("Asterisk refused the action: {0}")]
    Refused(String),
    #[error("AMI login refused: {0}")]
    Auth(String),
    #[error("AMI connection failed: {0}")]
    Io(String),
    #[error("{0} is not an Asterisk manager (first line: {1:?})")]
    NotAmi(String, String),
    #[error("AMI client stopped")]
    Stopped,
}

/// What subscribers receive, in arrival order.
#[derive(Debug, Clone)]
pub enum AmiEvent {
    /// A new session is logged in (the first one or after a reconnect): resync now.
    Connected {
        session: u64,
    },
    /// The session ended; events in between are lost.
    Disconnected {
        reason: String,
    },
    Event(Arc<Frame>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Connecting {
        attempt: u32,
        last_error: Option<String>,
    },
    Connected {
        session: u64,
        banner: String,
        since: Instant,
    },
    Stopped,
}

impl LinkState {
    pub fn is_connected(&self) -> bool {
        matches!(self, LinkState::Connected { .. })
    }
}

struct Pending {
    reply: oneshot::Sender<Result<Reply, AmiError>>,
    response: Option<Frame>,
    events: Vec<Frame>,
    deadline: Instant,
    timeout: Duration,
}

type PendingMap = Arc<Mutex<HashMap<String, Pending>>>;

struct Command {
    action: Action,
    reply: oneshot::Sender<Result<Reply, AmiError>>,
    timeout: Duration,
}

/// A cloneable handle to the AMI connection.
#[derive(Clone)]
pub struct AmiClient {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<AmiEvent>,
    state: watch::Receiver<LinkState>,
    action_timeout: Duration,
    stop: Arc<watch::Sender<bool>>,
    counters: Arc<Counters>,
    shared: Arc<Shared>,
}

/// Counters for `/ready` and logs.
#[derive(Debug, Default)]
pub struct Counters {
    pub sessions: AtomicU64,
    /// Events read and published to subscribers.
    pub events: AtomicU64,
    pub skipped_frames: AtomicU64,
    /// Connection or login attempts that failed.
    pub connect_failures: AtomicU64,
    /// Sessions that were up and got lost.
    pub disconnects: AtomicU64,
    /// Unix ms of the last change between up and down (the start counts as going down).
    pub link_changed_at: std::sync::atomic::AtomicI64,
}

impl Counters {
    fn link_changed(&self) {
        self.link_changed_at
            .store(crate::base::clock::now_ms(), Ordering::Relaxed);
    }
}

/// The event streams' backlog, summed over them (there is one: the call tracker's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backlog {
    /// Events read and not handled yet.
    pub waiting: u64,
    /// The most that ever waited.
    pub peak: u64,
    /// The bound (`ami.max_backlog`).
    pub max: u64,
    /// Events dropped because the backlog was full.
    pub dropped: u64,
    /// How often it filled up.
    pub overflows: u64,
}

/// Overflows of an event stream are logged at most this often.
static OVERFLOW_LOG: crate::telemetry::RateLimit =
    crate::telemetry::RateLimit::new(Duration::from_secs(10));
/// Unreadable data is logged at most this often.
static SKIPPED_LOG: crate::telemetry::RateLimit =
    crate::telemetry::RateLimit::new(Duration::from_secs(10));

/// Every event and link change, in order, for one subscriber that must not miss any (the call
/// tracker). See [`AmiClient::event_stream`].
pub struct EventStream {
    tap: Arc<Tap>,
    /// Taken from the tap in one go, handed out one by one.
    taken: VecDeque<TapItem>,
    position: u64,
}

impl EventStream {
    /// The next event or link change. `Err(Lagged(n))`: `n` events were dropped here because
    /// the backlog was full (resync); `Err(Closed)`: the client stopped.
    pub async fn recv(&mut self) -> Result<AmiEvent, RecvError> {
        loop {
            if let Some(item) = self.next_taken() {
                return item;
            }
            // After a burst the buffers do not keep their peak size.
            if self.taken.capacity() > 64 * 1024 {
                self.taken.shrink_to(4096);
            }
            let ready = self.tap.ready.notified();
            {
                let mut q = self.tap.queue.lock().unwrap_or_else(|p| p.into_inner());
                if !q.items.is_empty() {
                    std::mem::swap(&mut q.items, &mut self.taken);
                    self.tap.taken.store(self.taken.len(), Ordering::Relaxed);
                    continue;
                }
                if q.lost > 0 {
                    let n = std::mem::take(&mut q.lost);
                    self.position += n;
                    return Err(RecvError::Lagged(n));
                }
                if q.closed {
                    return Err(RecvError::Closed);
                }
            }
            ready.await;
        }
    }

    /// An event already taken from the tap, without waiting.
    fn next_taken(&mut self) -> Option<Result<AmiEvent, RecvError>> {
        let item = self.taken.pop_front()?;
        self.tap.taken.store(self.taken.len(), Ordering::Relaxed);
        Some(match item {
            TapItem::Event(e) => {
                if matches!(e, AmiEvent::Event(_)) {
                    self.position += 1;
                }
                Ok(e)
            }
            TapItem::Gap(n) => {
                self.position += n;
                Err(RecvError::Lagged(n))
            }
        })
    }

    /// How many of the client's events this stream has handed out (dropped ones included): the
    /// point in the event stream its subscriber has reached.
    pub fn position(&self) -> u64 {
        self.position
    }
}

enum TapItem {
    Event(AmiEvent),
    /// Events dropped here.
    Gap(u64),
}

/// The client's side of an [`EventStream`].
#[derive(Default)]
struct Tap {
    queue: Mutex<TapQueue>,
    ready: Notify,
    /// Taken by the subscriber and not handed out yet (part of the backlog).
    taken: AtomicUsize,
}

#[derive(Default)]
struct TapQueue {
    items: VecDeque<TapItem>,
    /// Dropped since the subscriber was last told.
    lost: u64,
    /// Full: dropping until half of the backlog is handled.
    dropping: bool,
    closed: bool,
    peak: u64,
    dropped: u64,
    overflows: u64,
}

impl Tap {
    fn push_events(&self, frames: &[Arc<Frame>], max: usize) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let taken = self.taken.load(Ordering::Relaxed);
        let mut overflowed = false;
        for f in frames {
            let waiting = q.items.len() + taken;
            if q.dropping {
                if waiting > max / 2 {
                    q.lost += 1;
                    q.dropped += 1;
                    continue;
                }
                q.dropping = false;
                if q.lost > 0 {
                    let n = std::mem::take(&mut q.lost);
                    q.items.push_back(TapItem::Gap(n));
                }
            } else if waiting >= max {
                q.dropping = true;
                q.overflows += 1;
                q.lost += 1;
                q.dropped += 1;
                overflowed = true;
                continue;
            }
            q.items
                .push_back(TapItem::Event(AmiEvent::Event(f.clone())));
            q.peak = q.peak.max(waiting as u64 + 1);
        }
        let (dropped, overflows) = (q.dropped, q.overflows);
        drop(q);
        self.ready.notify_one();
        if overflowed {
            if let Some(suppressed) = OVERFLOW_LOG.check() {
                tracing::warn!(max_backlog = max, dropped, overflows, suppressed,
                    "AMI events arrive faster than the call tracker handles them: ami.max_backlog reached, events dropped until half of it is handled, then calls are resynced");
            }
        }
    }

    fn push_link(&self, event: &AmiEvent) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.lost > 0 {
            let n = std::mem::take(&mut q.lost);
            q.items.push_back(TapItem::Gap(n));
        }
        q.items.push_back(TapItem::Event(event.clone()));
        drop(q);
        self.ready.notify_one();
    }

    fn close(&self) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.ready.notify_one();
    }
}

/// The event streams and what a new one starts with.
#[derive(Default)]
struct Taps {
    list: Vec<Arc<Tap>>,
    /// The session logged in now: a new stream starts with its `Connected`.
    session: Option<u64>,
}

impl std::fmt::Debug for AmiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmiClient")
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl AmiClient {
    /// Starts the supervisor; it connects, logs in and keeps the link up until [`AmiClient::stop`].
    pub fn start(cfg: AmiConfig) -> AmiClient {
        Self::start_supervised(cfg).0
    }

    /// Like [`AmiClient::start`], with the supervisor's task: it ends only once stopped (its
    /// event streams are closed by then).
    pub fn start_supervised(cfg: AmiConfig) -> (AmiClient, tokio::task::JoinHandle<()>) {
        let (commands, rx) = mpsc::channel(1024);
        let (events, _) = broadcast::channel(cfg.event_buffer.max(16));
        let (state_tx, state) = watch::channel(LinkState::Connecting {
            attempt: 0,
            last_error: None,
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        counters.link_changed();
        let shared = Shared::new(events.clone(), counters.clone(), cfg.max_backlog);
        let client = AmiClient {
            commands,
            events,
            state,
            action_timeout: cfg.action_timeout,
            stop: Arc::new(stop_tx),
            counters,
            shared: shared.clone(),
        };
        let task = tokio::spawn(supervise(cfg, rx, shared, state_tx, stop_rx));
        (client, task)
    }

    /// Sends an action and waits for its answer (and, for event lists, all items).
    /// `Response: Error` becomes [`AmiError::Refused`] with Asterisk's message.
    pub async fn send(&self, action: Action) -> Result<Reply, AmiError> {
        self.send_with_timeout(action, self.action_timeout).await
    }

    pub async fn send_with_timeout(
        &self,
        action: Action,
        timeout: Duration,
    ) -> Result<Reply, AmiError> {
        if !self.state.borrow().is_connected() {
            return Err(AmiError::NotConnected(self.describe_down()));
        }
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command {
                action,
                reply: tx,
                timeout,
            })
            .await
            .map_err(|_| AmiError::Stopped)?;
        rx.await.unwrap_or(Err(AmiError::Disconnected))
    }

    fn describe_down(&self) -> String {
        match &*self.state.borrow() {
            LinkState::Connecting {
                last_error: Some(e),
                ..
            } => e.clone(),
            LinkState::Connecting { .. } => "connecting".into(),
            LinkState::Stopped => "stopped".into(),
            LinkState::Connected { .. } => "connected".into(),
        }
    }

    /// Events and link changes, in order. A subscriber that falls behind gets
    /// `RecvError::Lagged(n)` and should resync.
    pub fn subscribe(&self) -> broadcast::Receiver<AmiEvent> {
        self.events.subscribe()
    }

    /// Every event and link change from now on, in order, however far behind the subscriber
    /// is, up to `ami.max_backlog` events waiting (see [`EventStream`]). While a session is up,
    /// the stream starts with its `Connected`.
    pub fn event_stream(&self) -> EventStream {
        self.shared.event_stream()
    }

    /// The event streams' backlog.
    pub fn backlog(&self) -> Backlog {
        self.shared.backlog()
    }

    pub fn state(&self) -> LinkState {
        self.state.borrow().clone()
    }

    /// Link state changes, for whoever wants to wait on them.
    pub fn watch_state(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Waits until a session is logged in.
    pub async fn wait_connected(&self) {
        let mut rx = self.state.clone();
        let _ = rx.wait_for(LinkState::is_connected).await;
    }

    /// Waits until the link is not connected (after a drop).
    pub async fn wait_disconnected(&self) {
        let mut rx = self.state.clone();
        let _ = rx.wait_for(|s| !s.is_connected()).await;
    }

    /// Stops the supervisor; pending actions fail.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Connects once, logs in, logs off: for `pbxgate check`. Returns the banner.
    pub async fn probe(cfg: &AmiConfig) -> Result<String, AmiError> {
        let shared = Shared::new(broadcast::channel(16).0, Arc::default(), 16);
        let (mut session, banner) = Session::open(cfg, &shared, 0).await?;
        let _ = session
            .request(&shared, Action::new("Logoff"), cfg.action_timeout)
            .await;
        session.close().await;
        Ok(banner)
    }
}

/// What the reader task and the supervisor share for one client.
struct Shared {
    pending: PendingMap,
    events: broadcast::Sender<AmiEvent>,
    taps: Mutex<Taps>,
    max_backlog: usize,
    /// When the reader last got bytes, in ms since `started`.
    read_at: AtomicU64,
    started: Instant,
    next_id: AtomicU64,
    prefix: String,
    counters: Arc<Counters>,
}

impl Shared {
    fn new(
        events: broadcast::Sender<AmiEvent>,
        counters: Arc<Counters>,
        max_backlog: usize,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            pending: Arc::default(),
            events,
            taps: Mutex::default(),
            max_backlog: max_backlog.max(2),
            read_at: AtomicU64::new(0),
            started: Instant::now(),
            next_id: AtomicU64::new(1),
            prefix: format!("pbxgate-{:08x}", rand::random::<u32>()),
            counters,
        })
    }

    fn event_stream(&self) -> EventStream {
        let tap = Arc::new(Tap::default());
        let mut taps = self.taps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(session) = taps.session {
            tap.push_link(&AmiEvent::Connected { session });
        }
        // Events are counted under this lock: the stream starts exactly here.
        let position = self.counters.events.load(Ordering::Relaxed);
        taps.list.push(tap.clone());
        EventStream {
            tap,
            taken: VecDeque::new(),
            position,
        }
    }

    fn backlog(&self) -> Backlog {
        let taps = self.taps.lock().unwrap_or_else(|p| p.into_inner());
        let mut b = Backlog {
            max: self.max_backlog as u64,
            ..Backlog::default()
        };
        for tap in &taps.list {
            let q = tap.queue.lock().unwrap_or_else(|p| p.into_inner());
            b.waiting += (q.items.len() + tap.taken.load(Ordering::Relaxed)) as u64;
            b.peak = b.peak.max(q.peak);
            b.dropped += q.dropped;
            b.overflows += q.overflows;
        }
        b
    }

    fn mark_read(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.read_at.store(ms, Ordering::Relaxed);
    }

    /// Whether the reader got bytes within `within`.
    fn read_within(&self, within: Duration) -> bool {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let within = u64::try_from(within.as_millis()).unwrap_or(u64::MAX);
        now.saturating_sub(self.read_at.load(Ordering::Relaxed)) <= within
    }

    /// Hands events read off the socket to every subscriber, in order; never waits.
    fn publish(&self, batch: &mut Vec<Arc<Frame>>) {
        if batch.is_empty() {
            return;
        }
        let mut taps = self.taps.lock().unwrap_or_else(|p| p.into_inner());
        self.counters
            .events
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        // A stream nobody holds any more is forgotten.
        taps.list.retain(|tap| Arc::strong_count(tap) > 1);
        for tap in &taps.list {
            tap.push_events(batch, self.max_backlog);
        }
        drop(taps);
        for frame in batch.drain(..) {
            let _ = self.events.send(AmiEvent::Event(frame));
        }
    }

    /// A session began or ended.
    fn publish_link(&self, event: AmiEvent) {
        let mut taps = self.taps.lock().unwrap_or_else(|p| p.into_inner());
        taps.session = match event {
            AmiEvent::Connected { session } => Some(session),
            _ => None,
        };
        for tap in &taps.list {
            tap.push_link(&event);
        }
        drop(taps);
        let _ = self.events.send(event);
    }

    fn close_streams(&self) {
        let mut taps = self.taps.lock().unwrap_or_else(|p| p.into_inner());
        taps.session = None;
        for tap in taps.list.drain(..) {
            tap.close();
        }
    }

    fn action_id(&self) -> String {
        format!(
            "{}-{}",
            self.prefix,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Records a pending action and appends its wire form to `wire`; returns its ActionID.
    fn register(
        &self,
        action: &Action,
        reply: oneshot::Sender<Result<Reply, AmiError>>,
        timeout: Duration,
        wire: &mut String,
    ) -> String {
        let id = self.action_id();
        let pending = Pending {
            reply,
            response: None,
            events: Vec::new(),
            deadline: Instant::now() + timeout,
            timeout,
        };
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), pending);
        wire.push_str(&action.to_wire(&id));
        id
    }

    fn fail_all(&self, err: AmiError) {
        let drained: Vec<Pending> = {
            let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            map.drain().map(|(_, p)| p).collect()
        };
        for p in drained {
            let _ = p.reply.send(Err(err.clone()));
        }
    }

    fn expire(&self, now: Instant) {
        let expired: Vec<(String, Pending)> = {
            let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let ids: Vec<String> = map
                .iter()
                .filter(|(_, p)| p.deadline <= now)
                .map(|(k, _)| k.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| map.remove(&id).map(|p| (id, p)))
                .collect()
        };
        for (id, p) in expired {
            tracing::warn!(action_id = %id, "AMI action timed out");
            let _ = p.reply.send(Err(AmiError::Timeout(p.timeout)));
        }
    }

    /// Routes one frame: answers and list items to their pending action, events to `batch`
    /// (published before any answer, so that subscribers get them in the order they came).
    fn dispatch(&self, frame: Frame, batch: &mut Vec<Arc<Frame>>) {
        let id = frame.action_id().map(str::to_string);
        if frame.event().is_some() {
            if let Some(id) = &id {
                let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                let in_list = map
                    .get(id)
                    .is_some_and(|p| is_list_start(p.response.as_ref()));
                if in_list {
                    let done = frame.get("EventList").is_some_and(|v| {
                        v.eq_ignore_ascii_case("Complete") || v.eq_ignore_ascii_case("cancelled")
                    });
                    if done {
                        if let Some(p) = map.remove(id) {
                            drop(map);
                            self.publish(batch);
                            let response = p
                                .response
                                .unwrap_or_else(|| Frame::from_pairs::<&str, &str>([]));
                            let reply = Reply {
                                action_id: id.clone(),
                                response,
                                events: p.events,
                                complete: Some(frame),
                                events_before: self.counters.events.load(Ordering::Relaxed),
                            };
                            let _ = p.reply.send(Ok(reply));
                        }
                    } else if let Some(p) = map.get_mut(id) {
                        if p.events.len() < MAX_LIST_ITEMS {
                            p.events.push(frame);
                        }
                    }
                    return;
                }
            }
            // OriginateResponse carries our ActionID but is an event: it goes to subscribers.
            batch.push(Arc::new(frame));
            return;
        }
        let Some(id) = id else {
            tracing::debug!(?frame, "AMI frame without ActionID ignored");
            return;
        };
        let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let Some(p) = map.get_mut(&id) else {
            tracing::debug!(action_id = %id, "AMI answer to no pending action");
            return;
        };
        if frame
            .get("EventList")
            .is_some_and(|v| v.eq_ignore_ascii_case("start"))
        {
            p.response = Some(frame);
            return;
        }
        let Some(p) = map.remove(&id) else { return };
        drop(map);
        self.publish(batch);
        let result = match frame.response() {
            Some(r) if r.eq_ignore_ascii_case("Error") => Err(AmiError::Refused(
                frame.get("Message").unwrap_or("no message").to_string(),
            )),
            _ => Ok(Reply {
                action_id: id,
                response: frame,
                events: Vec::new(),
                complete: None,
                events_before: self.counters.events.load(Ordering::Relaxed),
            }),
        };
        let _ = p.reply.send(result);
    }
}

fn is_list_start(response: Option<&Frame>) -> bool {
    response.is_some_and(|r| {
        r.get("EventList")
            .is_some_and(|v| v.eq_ignore_ascii_case("start"))
    })
}

/// One logged-in connection: the write half plus the reader task.
struct Session {
    write: OwnedWriteHalf,
    reader: tokio::task::JoinHandle<()>,
    /// Fires when the reader stops (EOF, error).
    closed: oneshot::Receiver<String>,
}

impl Session {
    /// Connects, reads the banner and logs in.
    async fn open(
        cfg: &AmiConfig,
        shared: &Arc<Shared>,
        session_no: u64,
    ) -> Result<(Session, String), AmiError> {
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let stream = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| AmiError::Io(format!("connect to {addr}: timed out")))?
            .map_err(|e| AmiError::Io(format!("connect to {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let (banner_tx, banner_rx) = oneshot::channel();
        let (closed_tx, closed) = oneshot::channel();
        let reader = tokio::spawn(read_loop(
            read,
            shared.clone(),
            banner_tx,
            closed_tx,
            session_no,
        ));
        let mut session = Session {
            write,
            reader,
            closed,
        };

        let banner = match tokio::time::timeout(cfg.connect_timeout, banner_rx).await {
            Ok(Ok(Ok(b))) => b,
            Ok(Ok(Err(first_line))) => {
                session.close().await;
                return Err(AmiError::NotAmi(addr, first_line));
            }
            _ => {
                session.close().await;
                return Err(AmiError::Io(format!(
                    "{addr}: no AMI banner within {:?}",
                    cfg.connect_timeout
                )));
            }
        };

        let login = match cfg.auth {
            AmiAuth::Plain => Action::new("Login")
                .header("Username", &cfg.username)
                .header("Secret", cfg.secret.expose())
                .header("Events", &cfg.events),
            AmiAuth::Md5 => {
                let challenge = session
                    .request(
                        shared,
                        Action::new("Challenge").header("AuthType", "MD5"),
                        cfg.action_timeout,
                    )
                    .await;
                let challenge = match challenge {
                    Ok(r) => r.response.get("Challenge").unwrap_or_default().to_string(),
                    Err(e) => {
                        session.close().await;
                        return Err(AmiError::Auth(format!("MD5 challenge: {e}")));
                    }
                };
                let key = hex(&Md5::digest(
                    format!("{challenge}{}", cfg.secret.expose()).as_bytes(),
                ));
                Action::new("Login")
                    .header("AuthType", "MD5")
                    .header("Username", &cfg.username)
                    .header("Key", key)
                    .header("Events", &cfg.events)
            }
        };
        match session.request(shared, login, cfg.action_timeout).await {
            Ok(_) => Ok((session, banner)),
            Err(e) => {
                session.close().await;
                Err(match e {
                    AmiError::Refused(msg) => AmiError::Auth(msg),
                    AmiError::Disconnected => {
                        AmiError::Auth("connection closed during login".into())
                    }
                    other => other,
                })
            }
        }
    }

    /// Registers, writes and awaits one action (used for login before the supervisor loop).
    async fn request(
        &mut self,
        shared: &Shared,
        action: Action,
        timeout: Duration,
    ) -> Result<Reply, AmiError> {
        let (tx, rx) = oneshot::channel();
        let id = self.write_action(shared, &action, tx, timeout).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(r) => r.unwrap_or(Err(AmiError::Disconnected)),
            Err(_) => {
                shared
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                Err(AmiError::Timeout(timeout))
            }
        }
    }

    async fn write_action(
        &mut self,
        shared: &Shared,
        action: &Action,
        reply: oneshot::Sender<Result<Reply, AmiError>>,
        timeout: Duration,
    ) -> Result<String, AmiError> {
        let mut wire = String::new();
        let id = shared.register(action, reply, timeout, &mut wire);
        self.write_batch(shared, &wire, std::slice::from_ref(&id))
            .await?;
        Ok(id)
    }

    /// Writes already-registered actions in one go; on failure their callers learn at once.
    async fn write_batch(
        &mut self,
        shared: &Shared,
        wire: &str,
        ids: &[String],
    ) -> Result<(), AmiError> {
        if let Err(e) = self.write.write_all(wire.as_bytes()).await {
            let mut map = shared.pending.lock().unwrap_or_else(|p| p.into_inner());
            let failed: Vec<Pending> = ids.iter().filter_map(|id| map.remove(id)).collect();
            drop(map);
            for p in failed {
                let _ = p.reply.send(Err(AmiError::Disconnected));
            }
            return Err(AmiError::Io(format!("write: {e}")));
        }
        Ok(())
    }

    async fn close(mut self) {
        let _ = self.write.shutdown().await;
        self.reader.abort();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn read_loop(
    mut read: tokio::net::tcp::OwnedReadHalf,
    shared: Arc<Shared>,
    banner: oneshot::Sender<Result<String, String>>,
    closed: oneshot::Sender<String>,
    session_no: u64,
) {
    let mut parser = Parser::new(Limits::default());
    let mut banner = Some(banner);
    let mut buf = vec![0u8; 64 * 1024];
    let mut batch = Vec::new();
    let reason = loop {
        let n = match read.read(&mut buf).await {
            Ok(0) => break "closed by Asterisk".to_string(),
            Ok(n) => n,
            Err(e) => break format!("read: {e}"),
        };
        shared.mark_read();
        parser.push(&buf[..n]);
        while let Some(item) = parser.next_item() {
            match item {
                Item::Banner(b) => {
                    if let Some(tx) = banner.take() {
                        let ok = b.starts_with("Asterisk Call Manager/");
                        let _ = tx.send(if ok { Ok(b) } else { Err(b) });
                    }
                }
                Item::Frame(frame) => {
                    if let Some(tx) = banner.take() {
                        // A frame before any banner: not an AMI server (or a broken one).
                        let _ = tx.send(Err(frame
                            .to_wire()
                            .lines()
                            .next()
                            .unwrap_or_default()
                            .to_string()));
                        break;
                    }
                    shared.dispatch(frame, &mut batch);
                }
                Item::Skipped { reason, bytes } => {
                    let skipped = shared
                        .counters
                        .skipped_frames
                        .fetch_add(1, Ordering::Relaxed)
                        + 1;
                    if let Some(suppressed) = SKIPPED_LOG.check() {
                        tracing::warn!(session = session_no, bytes, reason = %reason, skipped, suppressed, "AMI: skipped unreadable data");
                    }
                }
            }
        }
        shared.publish(&mut batch);
    };
    let _ = closed.send(reason);
}

async fn supervise(
    cfg: AmiConfig,
    mut commands: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    state: watch::Sender<LinkState>,
    mut stop: watch::Receiver<bool>,
) {
    let counters = shared.counters.clone();
    let mut attempt: u32 = 0;
    let mut session_no: u64 = 0;
    loop {
        if *stop.borrow() {
            break;
        }
        let opened = tokio::select! {
            r = Session::open(&cfg, &shared, session_no + 1) => r,
            _ = stop.changed() => break,
        };
        match opened {
            Ok((session, banner)) => {
                session_no += 1;
                counters.sessions.fetch_add(1, Ordering::Relaxed);
                counters.link_changed();
                let since = Instant::now();
                tracing::info!(session = session_no, banner = %banner, host = %cfg.host, port = cfg.port, "AMI connected");
                state.send_replace(LinkState::Connected {
                    session: session_no,
                    banner,
                    since,
                });
                shared.publish_link(AmiEvent::Connected {
                    session: session_no,
                });
                let reason = run_session(&cfg, session, &shared, &mut commands, &mut stop).await;
                shared.fail_all(AmiError::Disconnected);
                shared.publish_link(AmiEvent::Disconnected {
                    reason: reason.clone(),
                });
                if *stop.borrow() {
                    break;
                }
                counters.disconnects.fetch_add(1, Ordering::Relaxed);
                counters.link_changed();
                tracing::warn!(session = session_no, reason = %reason, "AMI link lost; reconnecting");
                // A session that stayed up a while resets the backoff.
                if since.elapsed() >= Duration::from_secs(30) {
                    attempt = 0;
                }
                state.send_replace(LinkState::Connecting {
                    attempt,
                    last_error: Some(reason),
                });
            }
            Err(e) => {
                counters.connect_failures.fetch_add(1, Ordering::Relaxed);
                let delay = retry_delay(&cfg, &e, attempt);
                let text = if matches!(e, AmiError::Auth(_)) {
                    let text = format!(
                        "{e}; next try in {} (ami.auth_retry: repeated failed logins get this \
                         host banned by fail2ban); check ami.username and ami.secret{}",
                        humantime::format_duration(delay),
                        if cfg.secret.expose().is_empty() {
                            " (ami.secret is empty)"
                        } else {
                            ""
                        }
                    );
                    tracing::error!(error = %text, "AMI login refused");
                    text
                } else {
                    tracing::warn!(error = %e, attempt, "AMI connection attempt failed");
                    e.to_string()
                };
                state.send_replace(LinkState::Connecting {
                    attempt,
                    last_error: Some(text),
                });
                attempt = attempt.saturating_add(1);
                pause(delay, &mut stop, &mut commands).await;
                continue;
            }
        }
        let delay = crate::base::backoff::backoff(attempt, cfg.reconnect_min, cfg.reconnect_max)
            .max(cfg.reconnect_min / 2);
        attempt = attempt.saturating_add(1);
        pause(delay, &mut stop, &mut commands).await;
    }
    shared.fail_all(AmiError::Stopped);
    shared.close_streams();
    state.send_replace(LinkState::Stopped);
    while let Ok(c) = commands.try_recv() {
        let _ = c.reply.send(Err(AmiError::Stopped));
    }
}

/// How long to wait before the next connection attempt after `error`: a refused login waits
/// `ami.auth_retry` (another wrong login soon would only bring a ban closer), anything else
/// backs off between `reconnect_min` and `reconnect_max`.
fn retry_delay(cfg: &AmiConfig, error: &AmiError, attempt: u32) -> Duration {
    match error {
        AmiError::Auth(_) => cfg.auth_retry,
        _ => crate::base::backoff::backoff(attempt, cfg.reconnect_min, cfg.reconnect_max)
            .max(cfg.reconnect_min / 2),
    }
}

/// Waits `delay` (or until stopped). While down, actions fail at once rather than queueing (a
/// late Originate is worse than none).
async fn pause(
    delay: Duration,
    stop: &mut watch::Receiver<bool>,
    commands: &mut mpsc::Receiver<Command>,
) {
    let wake = tokio::time::sleep(delay);
    tokio::pin!(wake);
    loop {
        tokio::select! {
            _ = &mut wake => return,
            _ = stop.changed() => return,
            cmd = commands.recv() => match cmd {
                Some(c) => { let _ = c.reply.send(Err(AmiError::NotConnected("reconnecting".into()))); }
                None => return,
            },
        }
    }
}

/// Runs one logged-in session until it ends; returns why.
async fn run_session(
    cfg: &AmiConfig,
    mut session: Session,
    shared: &Arc<Shared>,
    commands: &mut mpsc::Receiver<Command>,
    stop: &mut watch::Receiver<bool>,
) -> String {
    let mut ping = tokio::time::interval(cfg.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut sweep = tokio::time::interval(Duration::from_millis(250));
    let mut pong: Option<oneshot::Receiver<Result<Reply, AmiError>>> = None;
    let mut pong_deadline = tokio::time::Instant::now();

    let reason = loop {
        tokio::select! {
            why = &mut session.closed => break why.unwrap_or_else(|_| "reader stopped".into()),
            _ = stop.changed() => {
                let _ = session.write.write_all(b"Action: Logoff\r\nActionID: pbxgate-logoff\r\n\r\n").await;
                break "stopped".into();
            }
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break "client dropped".into() };
                // Under load, several actions wait: write them with one syscall.
                let mut wire = String::new();
                let mut ids = vec![shared.register(&cmd.action, cmd.reply, cmd.timeout, &mut wire)];
                while ids.len() < 64 {
                    let Ok(more) = commands.try_recv() else { break };
                    ids.push(shared.register(&more.action, more.reply, more.timeout, &mut wire));
                }
                if let Err(e) = session.write_batch(shared, &wire, &ids).await {
                    break e.to_string();
                }
            }
            _ = ping.tick() => {
                if pong.is_some() {
                    continue;
                }
                let (tx, rx) = oneshot::channel();
                if let Err(e) = session.write_action(shared, &Action::new("Ping"), tx, cfg.ping_timeout).await {
                    break e.to_string();
                }
                pong = Some(rx);
                pong_deadline = tokio::time::Instant::now() + cfg.ping_timeout;
            }
            _ = sweep.tick() => {
                shared.expire(Instant::now());
                if let Some(rx) = &mut pong {
                    let late = match rx.try_recv() {
                        Ok(Ok(_)) => { pong = None; false }
                        Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => true,
                        Err(oneshot::error::TryRecvError::Empty) => tokio::time::Instant::now() >= pong_deadline,
                    };
                    if late {
                        // A Pong queued behind a burst of events is late, not lost: the link is
                        // dead when nothing arrives at all.
                        if !shared.read_within(cfg.ping_timeout) {
                            break format!("no answer to Ping within {:?}", cfg.ping_timeout);
                        }
                        pong = None;
                    }
                }
            }
        }
    };
    session.close().await;
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(from: usize, n: usize) -> Vec<Arc<Frame>> {
        (from..from + n)
            .map(|i| {
                Arc::new(Frame::from_pairs([
                    ("Event", "Test"),
                    ("N", &i.to_string()),
                ]))
            })
            .collect()
    }

    async fn next(stream: &mut EventStream) -> Result<String, RecvError> {
        match stream.recv().await? {
            AmiEvent::Event(f) => Ok(f.get("N").unwrap().to_string()),
            AmiEvent::Connected { session } => Ok(format!("connected {session}")),
            AmiEvent::Disconnected { .. } => Ok("disconnected".into()),
        }
    }

    #[tokio::test]
    async fn a_full_stream_drops_until_half_is_handled_and_says_where() {
        let shared = Shared::new(broadcast::channel(16).0, Arc::default(), 10);
        shared.publish(&mut events(0, 3));
        let mut stream = shared.event_stream();
        assert_eq!(stream.position(), 3, "starts after what came before");
        shared.publish_link(AmiEvent::Connected { session: 1 });
        // 1 link event + 9 events fit; the other 6 are dropped.
        shared.publish(&mut events(3, 15));
        assert_eq!(next(&mut stream).await.unwrap(), "connected 1");
        for i in 3..6 {
            assert_eq!(next(&mut stream).await.unwrap(), i.to_string());
        }
        // 6 wait: more than half, still dropping.
        shared.publish(&mut events(18, 1));
        for i in 6..8 {
            assert_eq!(next(&mut stream).await.unwrap(), i.to_string());
        }
        // 4 wait: half is handled, events are taken again, after the gap.
        shared.publish(&mut events(19, 2));
        for i in 8..12 {
            assert_eq!(next(&mut stream).await.unwrap(), i.to_string());
        }
        assert_eq!(stream.position(), 12);
        assert!(matches!(next(&mut stream).await, Err(RecvError::Lagged(7))));
        assert_eq!(stream.position(), 19);
        assert_eq!(next(&mut stream).await.unwrap(), "19");
        assert_eq!(next(&mut stream).await.unwrap(), "20");
        let b = shared.backlog();
        assert_eq!((b.waiting, b.peak, b.dropped, b.overflows), (0, 10, 7, 1));

        // Dropped at the end of a burst: told once the rest is handled.
        shared.publish(&mut events(21, 12));
        for i in 21..31 {
            assert_eq!(next(&mut stream).await.unwrap(), i.to_string());
        }
        assert!(matches!(next(&mut stream).await, Err(RecvError::Lagged(2))));
        assert_eq!(stream.position(), 33);
        shared.close_streams();
        assert!(matches!(next(&mut stream).await, Err(RecvError::Closed)));
    }

    #[tokio::test]
    async fn a_stream_opened_during_a_session_starts_with_it_and_a_dropped_one_is_forgotten() {
        let shared = Shared::new(broadcast::channel(16).0, Arc::default(), 100);
        shared.publish_link(AmiEvent::Connected { session: 4 });
        let mut stream = shared.event_stream();
        let gone = shared.event_stream();
        drop(gone);
        shared.publish(&mut events(0, 1));
        assert_eq!(next(&mut stream).await.unwrap(), "connected 4");
        assert_eq!(next(&mut stream).await.unwrap(), "0");
        assert_eq!(shared.taps.lock().unwrap().list.len(), 1);
    }
}
