//! The tracker task: feeds AMI events and PBX webhooks into the call models, resyncs after AMI
//! reconnects, runs the reaper, and hands live events and finished calls on without ever
//! blocking on the CRM.
//!
//! ```text
//!  AMI bus ──┐                       ┌─► live events (bounded) ─► CRM call/event worker
//!  webhooks ─┼─► tracker task ─► models ┤
//!  c2c hints ┘                       └─► finished calls ─► CallSink (history)
//! ```

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use super::gate::Gate;
use super::model::{CallModel, ClickToCall, Millis, Output};
use super::record::{CallRecord, LiveEvent};
use super::webhook::{WebhookEvent, WebhookModel};
use super::Classifier;
use crate::ami::{Action, AmiClient, AmiEvent};
use crate::config::Config;

/// Where finished calls go. The history outbox implements it; tests use [`RecentCalls`].
pub trait CallSink: Send + Sync + 'static {
    fn accept(&self, record: CallRecord);
}

/// Keeps the last `capacity` finished calls in memory (for `/ready`, the admin page, tests).
#[derive(Clone)]
pub struct RecentCalls {
    inner: Arc<Mutex<VecDeque<CallRecord>>>,
    capacity: usize,
    seen: tokio::sync::watch::Sender<u64>,
}

impl RecentCalls {
    pub fn new(capacity: usize) -> RecentCalls {
        RecentCalls {
            inner: Arc::default(),
            capacity,
            seen: tokio::sync::watch::Sender::new(0),
        }
    }

    pub fn all(&self) -> Vec<CallRecord> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Total accepted so far.
    pub fn count(&self) -> u64 {
        *self.seen.borrow()
    }

    /// Waits until `n` calls were accepted in total.
    pub async fn wait_for(&self, n: u64) {
        let mut rx = self.seen.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }
}

impl CallSink for RecentCalls {
    fn accept(&self, record: CallRecord) {
        let mut q = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= self.capacity {
            q.pop_front();
        }
        q.push_back(record);
        drop(q);
        self.seen.send_modify(|n| *n += 1);
    }
}

enum Input {
    ExpectClickToCall(String, ClickToCall),
    Webhook(Vec<WebhookEvent>, tokio::sync::oneshot::Sender<()>),
}

/// Handle to the tracker task.
#[derive(Clone)]
pub struct CallTracker {
    input: mpsc::Sender<Input>,
}

/// Counters for `/ready`.
#[derive(Debug, Default)]
pub struct TrackerStats {
    pub live_calls: std::sync::atomic::AtomicU64,
    pub finished: std::sync::atomic::AtomicU64,
    pub live_events_dropped: std::sync::atomic::AtomicU64,
    pub resyncs: std::sync::atomic::AtomicU64,
    /// AMI events handled (the reader's count is `ami.events`; the difference waits or was
    /// dropped past `ami.max_backlog`).
    pub ami_events: std::sync::atomic::AtomicU64,
    /// Finished calls the registration rules (or an employee's mobile) kept from the CRM.
    pub ignored: std::sync::atomic::AtomicU64,
}

pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl CallTracker {
    /// Starts the task. Live events go to `live` (dropped, with a log line, if it is full);
    /// finished calls to `sink`.
    pub fn start(
        config: &Config,
        ami: AmiClient,
        live: mpsc::Sender<LiveEvent>,
        sink: Arc<dyn CallSink>,
        stats: Arc<TrackerStats>,
    ) -> (CallTracker, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(1024);
        let model = CallModel::new(Classifier::new(config), &config.pbx.system_id);
        let web = WebhookModel::new(&config.pbx.system_id);
        let gate = Gate::new(config);
        let max_silence = i64::try_from(config.calls.max_silence.as_millis()).unwrap_or(i64::MAX);
        let send_internal = config.calls.send_internal;
        let task = tokio::spawn(run(
            model,
            web,
            gate,
            ami,
            rx,
            live,
            sink,
            stats,
            max_silence,
            send_internal,
        ));
        (CallTracker { input: tx }, task)
    }

    /// Announces our own click-to-call before its Originate is sent.
    pub async fn expect_click_to_call(&self, channel_id: &str, c2c: ClickToCall) {
        let _ = self
            .input
            .send(Input::ExpectClickToCall(channel_id.to_string(), c2c))
            .await;
    }

    /// Feeds webhook events (already validated); returns once the tracker has applied them and
    /// handed any finished call to the sink.
    pub async fn webhook(&self, events: Vec<WebhookEvent>) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.input.send(Input::Webhook(events, tx)).await.is_err() {
            return false;
        }
        rx.await.is_ok()
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    mut model: CallModel,
    mut web: WebhookModel,
    mut gate: Gate,
    ami: AmiClient,
    mut input: mpsc::Receiver<Input>,
    live: mpsc::Sender<LiveEvent>,
    sink: Arc<dyn CallSink>,
    stats: Arc<TrackerStats>,
    max_silence: Millis,
    send_internal: bool,
) {
    // Every AMI event, however far behind we are (up to ami.max_backlog).
    let mut events = ami.event_stream();
    // A resync's answer, applied once the events Asterisk sent before it are handled.
    let mut resync_at: Option<(u64, HashSet<String>)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    let mut out = Vec::new();
    let mut webhook_done: Option<tokio::sync::oneshot::Sender<()>> = None;
    loop {
        tokio::select! {
            // Hints first: a click-to-call is announced before its channels can appear.
            biased;
            msg = input.recv() => match msg {
                Some(Input::ExpectClickToCall(id, c2c)) => model.expect_click_to_call(&id, c2c),
                Some(Input::Webhook(evs, done)) => {
                    let now = now_ms();
                    for e in &evs {
                        web.apply(e, now, &mut out);
                    }
                    webhook_done = Some(done);
                }
                None => break,
            },
            ev = events.recv() => match ev {
                Ok(AmiEvent::Event(frame)) => {
                    model.on_event(&frame, now_ms(), &mut out);
                    stats.ami_events.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                // Every login, the first included: calls may be up that we never saw end.
                Ok(AmiEvent::Connected { .. }) => resync_at = resync(&ami, &stats).await,
                Ok(AmiEvent::Disconnected { .. }) => {}
                Err(RecvError::Lagged(n)) => {
                    if let Some(suppressed) = LAG_LOG.check() {
                        tracing::warn!(missed = n, suppressed, "call tracker fell behind the AMI events past ami.max_backlog; resyncing");
                    }
                    resync_at = resync(&ami, &stats).await;
                }
                Err(RecvError::Closed) => break,
            },
            _ = tick.tick() => {
                ticks += 1;
                let now = now_ms();
                model.tick(now, &mut out);
                if ticks % 60 == 0 {
                    model.reap(now, max_silence, &mut out);
                    web.reap(now, max_silence, &mut out);
                }
            }
        }
        if resync_at
            .as_ref()
            .is_some_and(|(at, _)| events.position() >= *at)
        {
            if let Some((_, alive)) = resync_at.take() {
                let before = model.live_channels();
                model.resync(&alive, now_ms(), &mut out);
                tracing::info!(
                    alive = alive.len(),
                    tracked_before = before,
                    tracked_after = model.live_channels(),
                    "calls resynced"
                );
            }
        }
        stats.live_calls.store(
            (model.live_calls() + web.live_calls()) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let finished_webhook = webhook_done.take();
        gate.apply(&mut out);
        for o in out.drain(..) {
            match o {
                Output::Live(e) => {
                    if live.try_send(e).is_err() {
                        stats
                            .live_events_dropped
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if let Some(suppressed) = QUEUE_FULL_LOG.check() {
                            tracing::warn!(
                                suppressed,
                                "live call event dropped: the CRM event queue is full"
                            );
                        }
                    }
                }
                Output::Finished(record) => {
                    stats
                        .finished
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if record.ignored {
                        stats
                            .ignored
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    tracing::info!(id = %record.external_id, direction = ?record.direction, outcome = ?record.outcome,
                        code = ?record.code, wait_s = record.wait_seconds, talk_s = record.talk_seconds,
                        reaped = record.reaped, registration = ?record.registration, "call finished");
                    // The history gets what the CRM should see: internal calls only if configured.
                    if record.direction != super::Direction::Internal || send_internal {
                        sink.accept(*record);
                    }
                }
            }
        }
        if let Some(done) = finished_webhook {
            let _ = done.send(());
        }
    }
    let mut out = Vec::new();
    model.flush(&mut out);
    gate.apply(&mut out);
    for o in out {
        if let Output::Finished(r) = o {
            if r.direction != super::Direction::Internal || send_internal {
                sink.accept(*r);
            }
        }
    }
}

/// Repeated warnings, at most one line per period.
static LAG_LOG: crate::telemetry::RateLimit =
    crate::telemetry::RateLimit::new(Duration::from_secs(10));
static QUEUE_FULL_LOG: crate::telemetry::RateLimit =
    crate::telemetry::RateLimit::new(Duration::from_secs(10));

/// Asks Asterisk which channels exist: those we track that are gone ended while we were away.
/// Returns the live channels with the stream position they hold at: applied there, no call is
/// closed whose hangup is still queued.
async fn resync(ami: &AmiClient, stats: &TrackerStats) -> Option<(u64, HashSet<String>)> {
    stats
        .resyncs
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match ami.send(Action::new("CoreShowChannels")).await {
        Ok(reply) => {
            let alive = reply
                .events
                .iter()
                .filter_map(|e| e.get("Uniqueid").map(str::to_string))
                .collect();
            Some((reply.events_before, alive))
        }
        Err(e) => {
            tracing::warn!(error = %e, "resync failed; stale calls will be reaped");
            None
        }
    }
}
