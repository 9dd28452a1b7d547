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

use crate::base::clock::now_ms;
use crate::calls::model::{CallModel, JournalOp, LiveCall, Millis, Output};
use crate::calls::record::{CallRecord, LiveEvent};
use crate::calls::webhook::{WebhookEvent, WebhookModel};
use crate::calls::Classifier;
use crate::calls::ClickToCall;
use crate::config::Config;
use crate::pbx::ami::{Action, AmiClient, AmiEvent, Frame};
use crate::pipeline::gate::Gate;
use crate::store::LiveStore;

/// Calls that ended while the service was not running, from a record the PBX keeps (Asterisk's
/// CDR): those that started at `since` or later, and those in `ended` (calls resumed from the
/// journal whose channels were gone at the first resync), by `external_id`.
pub trait Recovery: Send + Sync + 'static {
    fn calls(&self, since: Millis, ended: &HashSet<String>) -> Vec<CallRecord>;
}

/// The recovery still to do at the first resync.
struct Gap {
    since: Millis,
    recovery: Arc<dyn Recovery>,
}

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

    /// Bumped with every call accepted (the admin page's live updates).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.seen.subscribe()
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
    /// Routing chose this extension for this caller, at this time.
    Routed(String, String, Millis),
    Webhook(Vec<WebhookEvent>, tokio::sync::oneshot::Sender<()>),
}

/// Handle to the tracker task.
#[derive(Clone)]
pub struct CallTracker {
    input: mpsc::Sender<Input>,
    /// The calls in progress, refreshed by the task (at most once a second for AMI calls, at
    /// once for webhooks).
    live: tokio::sync::watch::Receiver<Arc<Vec<LiveCall>>>,
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
    /// Pop-ups dropped because their deadline had passed before the CRM could be asked.
    pub live_events_late: std::sync::atomic::AtomicU64,
    /// Hangups not sent because the call's pop-up never reached the CRM.
    pub hangups_without_popup: std::sync::atomic::AtomicU64,
    /// Live events the CRM took, and those it failed or did not answer in time.
    pub live_events_sent: std::sync::atomic::AtomicU64,
    pub live_events_failed: std::sync::atomic::AtomicU64,
    /// Journal entries written (calls in progress, for restarts).
    pub journal_writes: std::sync::atomic::AtomicU64,
    /// `ami_events` when the journal was last written: everything before is durable.
    pub events_journaled: std::sync::atomic::AtomicU64,
}

impl crate::routing::RouteListener for CallTracker {
    fn routed(&self, phone: &str, code: &str) {
        self.note_route(phone, code);
    }
}

impl CallTracker {
    /// Starts the task. Live events go to `live` (dropped, with a log line, if it is full);
    /// finished calls to `sink`.
    pub fn start(
        config: &Config,
        ami: AmiClient,
        live: mpsc::Sender<(Millis, LiveEvent)>,
        sink: Arc<dyn CallSink>,
        stats: Arc<TrackerStats>,
        journal: Option<LiveStore>,
        recovery: Option<Arc<dyn Recovery>>,
    ) -> (CallTracker, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(1024);
        let mut model = CallModel::new(Classifier::new(config), &config.pbx.system_id);
        let mut web = WebhookModel::new(&config.pbx.system_id);
        if let Some(j) = &journal {
            restore_webhook_calls(j, &mut web);
            restore_ami_calls(j, &mut model);
        }
        // Only a service that ran before has a gap; a first start leaves history to `backfill`.
        let max_gap = i64::try_from(config.backfill.max_gap.as_millis()).unwrap_or(i64::MAX);
        let gap = journal
            .as_ref()
            .and_then(|j| j.last_alive().ok().flatten())
            .zip(recovery)
            .map(|(since, recovery)| Gap {
                since: since.max(now_ms().saturating_sub(max_gap)),
                recovery,
            });
        let gate = Gate::new(config);
        let max_silence = i64::try_from(config.calls.max_silence.as_millis()).unwrap_or(i64::MAX);
        let send_internal = config.calls.send_internal;
        let (live_tx, live_rx) = tokio::sync::watch::channel(Arc::new(Vec::new()));
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
            journal,
            gap,
            live_tx,
        ));
        (
            CallTracker {
                input: tx,
                live: live_rx,
            },
            task,
        )
    }

    /// The calls in progress (a snapshot; see [`CallTracker::live_changes`]).
    pub fn live_calls(&self) -> Arc<Vec<LiveCall>> {
        self.live.borrow().clone()
    }

    /// Changes whenever the calls in progress do.
    pub fn live_changes(&self) -> tokio::sync::watch::Receiver<Arc<Vec<LiveCall>>> {
        self.live.clone()
    }

    /// Announces our own click-to-call before its Originate is sent.
    pub async fn expect_click_to_call(&self, channel_id: &str, c2c: ClickToCall) {
        let _ = self
            .input
            .send(Input::ExpectClickToCall(channel_id.to_string(), c2c))
            .await;
    }

    /// Routing chose `code` for `phone` (never waits: a full queue loses only the hint).
    pub fn note_route(&self, phone: &str, code: &str) {
        let _ = self
            .input
            .try_send(Input::Routed(phone.to_string(), code.to_string(), now_ms()));
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
    live: mpsc::Sender<(Millis, LiveEvent)>,
    sink: Arc<dyn CallSink>,
    stats: Arc<TrackerStats>,
    max_silence: Millis,
    send_internal: bool,
    journal: Option<LiveStore>,
    mut gap: Option<Gap>,
    summary: tokio::sync::watch::Sender<Arc<Vec<LiveCall>>>,
) {
    // Every AMI event, however far behind we are (up to ami.max_backlog); while a session is
    // up, the stream starts with its `Connected`.
    let mut events = ami.event_stream();
    // A resync's answer, applied once the events Asterisk sent before it are handled.
    let mut resync_at: Option<Resync> = None;
    let mut out = Vec::new();
    // Webhook calls touched by the last request: journaled once their outputs are handed on.
    let mut webhook_touched: Vec<String> = Vec::new();
    // AMI calls are journaled once a second, after that second's finished calls are stored.
    let mut journal_due = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    let mut webhook_done: Option<tokio::sync::oneshot::Sender<()>> = None;
    loop {
        tokio::select! {
            // Hints first: a click-to-call is announced before its channels can appear.
            biased;
            msg = input.recv() => match msg {
                Some(Input::ExpectClickToCall(id, c2c)) => model.expect_click_to_call(&id, c2c),
                Some(Input::Routed(phone, code, at)) => gate.note_route(&phone, &code, at),
                Some(Input::Webhook(evs, done)) => {
                    let now = now_ms();
                    for e in &evs {
                        web.apply(e, now, &mut out);
                        if !webhook_touched.contains(&e.call_id) {
                            webhook_touched.push(e.call_id.clone());
                        }
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
                // Every login, the first included: calls resumed from the journal, or that ran
                // on while the link was down, are checked against what Asterisk has now.
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
                journal_due = true;
                // The calls in progress, once a second (unchanged: nobody is told).
                publish_summary(&model, &web, &summary);
                let now = now_ms();
                model.tick(now, &mut out);
                if ticks % 60 == 0 {
                    model.reap(now, max_silence, &mut out);
                    // Reaped calls leave the journal; the others are rewritten (cheap, rare).
                    webhook_touched.extend(web.call_ids());
                    web.reap(now, max_silence, &mut out);
                }
            }
        }
        if resync_at
            .as_ref()
            .is_some_and(|r| events.position() >= r.at)
        {
            if let Some(r) = resync_at.take() {
                apply_resync(r, &mut model, &mut out, &mut gap).await;
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
                    // Stamped now: a pop-up's deadline counts from when the call did it.
                    if live.try_send((now_ms(), e)).is_err() {
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
                    if record.direction != crate::calls::Direction::Internal || send_internal {
                        sink.accept(*record);
                    }
                }
            }
        }
        // After the finished calls went to the sink: a call leaves the journal only once its
        // record is stored (the same store, written in this order).
        if let Some(j) = &journal {
            for id in webhook_touched.drain(..) {
                let key = format!("w:{id}");
                let written = match web.journal_entry(&id) {
                    Some(entry) => j.put(&key, &entry),
                    None => j.remove(&key),
                };
                if let Err(e) = written {
                    tracing::error!(call = %id, error = %e, "journaling a webhook call failed");
                }
            }
        } else {
            webhook_touched.clear();
        }
        if std::mem::take(&mut journal_due) {
            if let Some(j) = &journal {
                write_ami_journal(j, &mut model, &stats);
            }
        }
        if let Some(done) = finished_webhook {
            publish_summary(&model, &web, &summary);
            let _ = done.send(());
        }
    }
    shut_down(
        model,
        gate,
        &live,
        sink.as_ref(),
        &stats,
        send_internal,
        journal.as_ref(),
    );
}

/// Publishes the calls in progress, oldest first (only when they differ from the last).
fn publish_summary(
    model: &CallModel,
    web: &WebhookModel,
    summary: &tokio::sync::watch::Sender<Arc<Vec<LiveCall>>>,
) {
    let mut calls = model.live_summary();
    calls.extend(web.live_summary());
    calls.sort_by(|a, b| (a.start, &a.external_id).cmp(&(b.start, &b.external_id)));
    summary.send_if_modified(|old| {
        if **old == calls {
            return false;
        }
        *old = Arc::new(calls);
        true
    });
}

/// Once the AMI stream has closed (the client stopped, every event it had read handled): calls
/// whose channels have all hung up finish now, without the rest of their grace for late events,
/// and go to the sink; calls still in progress stay in the journal, written a last time, and are
/// resumed at the next start. The store is flushed by whoever stops the service.
fn shut_down(
    mut model: CallModel,
    mut gate: Gate,
    live: &mpsc::Sender<(Millis, LiveEvent)>,
    sink: &dyn CallSink,
    stats: &Arc<TrackerStats>,
    send_internal: bool,
    journal: Option<&LiveStore>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = Vec::new();
    model.flush(&mut out);
    gate.apply(&mut out);
    let mut finished = 0;
    for o in out {
        match o {
            Output::Live(e) => {
                if live.try_send((now_ms(), e)).is_err() {
                    stats.live_events_dropped.fetch_add(1, Relaxed);
                }
            }
            Output::Finished(record) => {
                finished += 1;
                stats.finished.fetch_add(1, Relaxed);
                if record.ignored {
                    stats.ignored.fetch_add(1, Relaxed);
                }
                tracing::info!(id = %record.external_id, direction = ?record.direction, outcome = ?record.outcome,
                    code = ?record.code, wait_s = record.wait_seconds, talk_s = record.talk_seconds,
                    reaped = record.reaped, registration = ?record.registration, "call finished");
                if record.direction != crate::calls::Direction::Internal || send_internal {
                    sink.accept(*record);
                }
            }
        }
    }
    // After the sink: the finished calls leave the journal only once their records are stored.
    if let Some(j) = journal {
        write_ami_journal(j, &mut model, stats);
    }
    tracing::info!(
        finished,
        in_progress = model.live_calls(),
        "call tracker stopped"
    );
}

/// At the first resync after a restart: calls resumed from the journal that ended while we were
/// away get their true times from the PBX's record; calls that started and ended while we were
/// away are added. Each exactly once: the outbox stores a call id once.
async fn recover_gap(gap: Gap, model: &CallModel, out: &mut Vec<Output>, first: usize) {
    let ended: HashSet<String> = out[first..]
        .iter()
        .filter_map(|o| match o {
            Output::Finished(r) if r.reaped => Some(r.external_id.clone()),
            _ => None,
        })
        .collect();
    let (since, recovery, asked) = (gap.since, gap.recovery, ended.clone());
    let found = match tokio::task::spawn_blocking(move || recovery.calls(since, &asked)).await {
        Ok(found) => found,
        Err(e) => {
            tracing::error!(error = %e, "recovering the calls of the gap failed");
            return;
        }
    };
    let mut by_id: std::collections::HashMap<String, CallRecord> = found
        .into_iter()
        .map(|r| (r.external_id.clone(), r))
        .collect();
    let mut corrected = 0;
    for o in out[first..].iter_mut() {
        let Output::Finished(r) = o else { continue };
        let Some(mut true_record) = by_id.remove(&r.external_id) else {
            continue;
        };
        // What only the live model knew: our click-to-call, recordings it saw.
        true_record.user_id = true_record.user_id.or(r.user_id);
        true_record.click_to_call |= r.click_to_call;
        if true_record.external_phone.is_none() {
            true_record.external_phone = r.external_phone.clone();
        }
        for rec in &r.recordings {
            if !true_record.recordings.contains(rec) {
                true_record.recordings.push(rec.clone());
            }
        }
        **r = true_record;
        corrected += 1;
    }
    let mut added = 0;
    let mut missed: Vec<CallRecord> = by_id
        .into_values()
        .filter(|r| !model.knows_call(&r.linkedid))
        .collect();
    missed.sort_by_key(|r| r.start);
    for r in missed {
        out.push(Output::Finished(Box::new(r)));
        added += 1;
    }
    tracing::info!(
        since_ms = since,
        ended_while_away = ended.len(),
        corrected,
        added,
        "calls of the time pbxgate was away recovered from the CDR"
    );
}

/// AMI calls that were in progress when the service stopped (checked by the first resync).
fn restore_ami_calls(journal: &LiveStore, model: &mut CallModel) {
    match journal.all("a:") {
        Ok(entries) => {
            let now = now_ms();
            let mut resumed = 0;
            for (key, entry) in entries {
                match model.restore(&entry, now) {
                    Ok(()) => resumed += 1,
                    Err(e) => {
                        tracing::error!(call = %key, error = %e, "a journaled call cannot be read; dropped from the journal");
                        let _ = journal.remove(&format!("a:{key}"));
                    }
                }
            }
            if resumed > 0 {
                tracing::info!(
                    calls = resumed,
                    "AMI calls in progress resumed from the journal"
                );
            }
        }
        Err(e) => tracing::error!(error = %e, "reading the journal of calls in progress failed"),
    }
}

/// Writes what changed in the AMI calls since the last second, and that the tracker is alive.
fn write_ami_journal(journal: &LiveStore, model: &mut CallModel, stats: &Arc<TrackerStats>) {
    use std::sync::atomic::Ordering::Relaxed;
    let ops = model.journal();
    let changed = !ops.is_empty();
    for op in ops {
        let written = match &op {
            JournalOp::Put(key, entry) => journal.put(&format!("a:{key}"), entry),
            JournalOp::Remove(key) => journal.remove(&format!("a:{key}")),
        };
        match written {
            Ok(()) => {
                stats.journal_writes.fetch_add(1, Relaxed);
            }
            Err(e) => tracing::error!(error = %e, "journaling calls in progress failed"),
        }
    }
    if let Err(e) = journal.set_last_alive(now_ms()) {
        tracing::error!(error = %e, "journaling calls in progress failed");
    }
    // Durable off the event loop; `events_journaled` says how far it is.
    let seen = stats.ami_events.load(Relaxed);
    if !changed && stats.events_journaled.load(Relaxed) == seen {
        return;
    }
    let (journal, stats) = (journal.clone(), stats.clone());
    tokio::spawn(async move {
        match journal.flush().await {
            Ok(()) => {
                stats.events_journaled.fetch_max(seen, Relaxed);
            }
            Err(e) => {
                tracing::error!(error = %e, "flushing the journal of calls in progress failed")
            }
        }
    });
}

/// Webhook calls that were in progress when the service stopped.
fn restore_webhook_calls(journal: &LiveStore, web: &mut WebhookModel) {
    match journal.all("w:") {
        Ok(entries) => {
            let mut resumed = 0;
            for (id, entry) in entries {
                match web.restore(&id, &entry) {
                    Ok(()) => resumed += 1,
                    Err(e) => {
                        tracing::error!(call = %id, error = %e, "a journaled webhook call cannot be read; dropped from the journal");
                        let _ = journal.remove(&format!("w:{id}"));
                    }
                }
            }
            if resumed > 0 {
                tracing::info!(
                    calls = resumed,
                    "webhook calls in progress resumed from the journal"
                );
            }
        }
        Err(e) => tracing::error!(error = %e, "reading the journal of calls in progress failed"),
    }
}

/// Repeated warnings, at most one line per period.
static LAG_LOG: crate::telemetry::RateLimit =
    crate::telemetry::RateLimit::new(Duration::from_secs(10));
static QUEUE_FULL_LOG: crate::telemetry::RateLimit =
    crate::telemetry::RateLimit::new(Duration::from_secs(10));

/// A `CoreShowChannels` answer, to apply once the stream reaches `at` (the events Asterisk sent
/// before it): no call is closed whose hangup is still queued.
struct Resync {
    at: u64,
    rows: Vec<Frame>,
}

/// Asks Asterisk which channels exist.
async fn resync(ami: &AmiClient, stats: &TrackerStats) -> Option<Resync> {
    stats
        .resyncs
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match ami.send(Action::new("CoreShowChannels")).await {
        Ok(reply) => Some(Resync {
            at: reply.events_before,
            rows: reply.events,
        }),
        Err(e) => {
            tracing::warn!(error = %e, "resync failed; stale calls will be reaped");
            None
        }
    }
}

/// Channels we never saw are added and bridged as Asterisk has them; those we track that are
/// gone ended while we were away. After a restart, the first one also recovers the gap.
async fn apply_resync(
    r: Resync,
    model: &mut CallModel,
    out: &mut Vec<Output>,
    gap: &mut Option<Gap>,
) {
    let alive: HashSet<String> = r
        .rows
        .iter()
        .filter_map(|e| e.get("Uniqueid").map(str::to_string))
        .collect();
    let now = now_ms();
    for row in &r.rows {
        model.show_channel(row, now);
    }
    let before = model.live_channels();
    let first = out.len();
    model.resync(&alive, now, out);
    tracing::info!(
        alive = alive.len(),
        tracked_before = before,
        tracked_after = model.live_channels(),
        "calls resynced"
    );
    if let Some(gap) = gap.take() {
        recover_gap(gap, model, out, first).await;
    }
}
