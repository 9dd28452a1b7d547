//! The call-history outbox: every finished call is stored durably (sled, see [`store`]) and
//! delivered to the CRM through the port in batches (at most the adapter's limit: 50 for
//! retailCRM's `calls/upload`), right after the call (a short batching window) and by a periodic scheduler that drains
//! whatever is pending (backlogs after an outage). Nothing is lost across crashes, restarts or
//! CRM outages: a record leaves the queue only when the CRM accepted it (or reported it as a
//! duplicate), or is set aside as dead when the CRM rejects it for good.
//!
//! Failure handling, per call as the adapter reports it ([`Delivery`]): a transient failure →
//! the batch stays, retried with capped exponential backoff and jitter; a call the CRM refuses
//! → set aside as dead with the CRM's text while the rest proceed; a call the CRM would refuse
//! → held, never sent, until the settings that shape it change; a wrong key, a missing account
//! or disabled telephony → uploading stops (shown in `/ready`) until it is fixed, with nothing
//! dropped. Nothing is sent while the module is inactive or frozen.

pub mod counts;
pub mod store;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::base::clock::now_ms;
use crate::calls::full::call_full;
use crate::calls::CallRecord;
use crate::config::{Assignee, Config};
use crate::crm::{Crm, Delivery, Finished};
use crate::hooks::phone_points::{
    client_phone, user_phone, PROCESS_CLIENT_PHONE, PROCESS_USER_PHONE,
};
use crate::hooks::Hooks;
use crate::hooks::Stage;
use crate::outbox::store::{Enqueued, Envelope, OutboxStore};
use crate::phone::PhoneBook;
use crate::pipeline::registration_points::{
    need_registration, post_registration, Verdicts, NEED_REGISTRATION,
};
use crate::pipeline::{points, CallSink};
use crate::records::Records;
use crate::store::{Store, StoreError};

/// The longest the uploader waits for the CRM's rate limit before reading a batch.
const PACING_WAIT_MAX: Duration = Duration::from_secs(8);

/// Why a drain stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drain {
    /// Everything ready was uploaded.
    Done,
    /// No API key, the module is inactive/frozen, or pbxgate is stopping: nothing (more) was
    /// tried.
    Paused(&'static str),
    /// A transient failure: try again later.
    Retry(String),
    /// Uploading cannot work until an operator fixes something (key, account, telephony).
    Blocked(String),
}

/// What `/ready` and the CLI show.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub pending: u64,
    pub in_flight: u64,
    pub dead: u64,
    pub done: u64,
    pub uploaded_total: u64,
    pub failed_attempts: u64,
    pub oldest_pending_age_seconds: Option<i64>,
    /// Unix milliseconds.
    pub last_success_at: Option<i64>,
    pub last_error: Option<String>,
    /// Set while uploading is stopped for a reason only an operator can fix.
    pub blocked: Option<String>,
    /// Calls `need_registration` kept from the CRM when their history was due (done, not sent).
    pub not_registered: u64,
    /// How often the upload scheduler woke up (a number that races shows a busy loop).
    pub scheduler_wakeups: u64,
}

#[derive(Default)]
struct Progress {
    in_flight: u64,
    uploaded_total: u64,
    failed_attempts: u64,
    last_success_at: Option<i64>,
    last_error: Option<String>,
    blocked: Option<String>,
    not_registered: u64,
}

struct Inner {
    store: OutboxStore,
    activity: Store,
    crm: Arc<dyn Crm>,
    config: Arc<Config>,
    enqueued: Notify,
    kick: Notify,
    /// A recording held back for conversion is ready.
    ready: Notify,
    /// Unix ms when a call held back by a recording still being written may be ready (the
    /// earliest seen by the last drain).
    recheck_at: Mutex<Option<i64>>,
    /// Recording links for `recordUrl` (None: uploaded without).
    records: Option<Records>,
    /// The customisation points a record passes before it goes to the CRM.
    hooks: Hooks,
    /// What `need_registration` answered for calls (shared with the live path).
    verdicts: Verdicts,
    /// Numbers in every form, for the hooks' `call_full` (only built when a hook is configured).
    phones: std::sync::OnceLock<PhoneBook>,
    progress: Mutex<Progress>,
    /// What became of each call handed to the CRM (for `/metrics`).
    outcomes: counts::UploadCounts,
    /// One drain at a time (the scheduler, an operator's or a test's).
    draining: tokio::sync::Mutex<()>,
    /// Bumped after every batch and every drain: lets callers wait for progress.
    changes: tokio::sync::watch::Sender<u64>,
    /// Scheduler loop iterations.
    wakeups: std::sync::atomic::AtomicU64,
    /// Set at shutdown: a drain returns before its next batch.
    stopping: std::sync::atomic::AtomicBool,
    /// What dead records are judged under: a change gives them another try.
    fingerprint: String,
}

/// A fingerprint of the settings that decide what a call record looks like to the CRM: ours
/// (`[calls]`) and the adapter's.
pub fn config_fingerprint(config: &Config, crm: &dyn Crm) -> String {
    use sha2::Digest;
    let decisive = format!("{:?}|{}", config.calls, crm.shape());
    let digest = sha2::Sha256::digest(decisive.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

enum Stop {
    Retry(String),
    Blocked(String),
    Store(StoreError),
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Stop::Store(e)
    }
}

impl Outbox {
    pub fn new(
        store: OutboxStore,
        activity: Store,
        crm: Arc<dyn Crm>,
        config: Arc<Config>,
    ) -> Outbox {
        let hooks = Hooks::new(&config.hooks, reqwest::Client::new());
        Self::with_records(
            store,
            activity,
            crm,
            config,
            None,
            hooks,
            Verdicts::default(),
        )
    }

    /// With `records`, calls carry a signed `recordUrl` (made durably before the upload), and a
    /// call whose recording is being converted waits for the conversion.
    pub fn with_records(
        store: OutboxStore,
        activity: Store,
        crm: Arc<dyn Crm>,
        config: Arc<Config>,
        records: Option<Records>,
        hooks: Hooks,
        verdicts: Verdicts,
    ) -> Outbox {
        let fingerprint = config_fingerprint(&config, crm.as_ref());
        Outbox {
            inner: Arc::new(Inner {
                store,
                activity,
                crm,
                config,
                enqueued: Notify::new(),
                kick: Notify::new(),
                ready: Notify::new(),
                recheck_at: Mutex::new(None),
                records,
                hooks,
                verdicts,
                phones: std::sync::OnceLock::new(),
                progress: Mutex::default(),
                outcomes: counts::UploadCounts::default(),
                draining: tokio::sync::Mutex::new(()),
                changes: tokio::sync::watch::Sender::new(0),
                wakeups: std::sync::atomic::AtomicU64::new(0),
                stopping: std::sync::atomic::AtomicBool::new(false),
                fingerprint,
            }),
        }
    }

    pub fn store(&self) -> &OutboxStore {
        &self.inner.store
    }

    /// What became of the calls handed to the CRM so far, one count per call.
    pub fn upload_counts(&self) -> &counts::UploadCounts {
        &self.inner.outcomes
    }

    /// Stores a record durably (group commit), then wakes the uploader.
    pub async fn enqueue(&self, record: CallRecord) -> Result<Enqueued, StoreError> {
        let outcome = self.inner.store.insert(record)?;
        self.inner.store.flush().await?;
        self.inner.enqueued.notify_one();
        Ok(outcome)
    }

    /// Shutdown: a drain under way returns after the batch in flight (the rest stays queued).
    pub fn stop_after_batch(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
    }

    /// Something changed that may allow uploading (module activity, an operator's retry).
    pub fn kick(&self) {
        self.inner.kick.notify_one();
    }

    pub fn status(&self) -> Status {
        let c = self.inner.store.counts();
        let p = self
            .inner
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let oldest = self.inner.store.oldest_pending().ok().flatten();
        Status {
            pending: c.pending.load(Ordering::Relaxed),
            in_flight: p.in_flight,
            dead: c.dead.load(Ordering::Relaxed),
            done: c.done.load(Ordering::Relaxed),
            uploaded_total: p.uploaded_total,
            failed_attempts: p.failed_attempts,
            oldest_pending_age_seconds: oldest.map(|t| ((now_ms() - t) / 1000).max(0)),
            last_success_at: p.last_success_at,
            last_error: p.last_error.clone(),
            blocked: p.blocked.clone(),
            not_registered: p.not_registered,
            scheduler_wakeups: self.inner.wakeups.load(Ordering::Relaxed),
        }
    }

    /// Dead records judged under another configuration go back to pending (a held call gets
    /// its chance once `calls.unassigned_code` is set). Returns how many.
    pub async fn revive_changed(&self) -> usize {
        let this = self.clone();
        let revived = tokio::task::spawn_blocking(move || {
            this.inner.store.retry_changed(&this.inner.fingerprint)
        })
        .await;
        match revived {
            Ok(Ok(n)) => {
                if n > 0 {
                    tracing::info!(
                        calls = n,
                        "the configuration changed: calls set aside before are tried again"
                    );
                }
                n
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not re-queue the dead calls");
                0
            }
            Err(e) => {
                tracing::error!(error = %e, "could not re-queue the dead calls");
                0
            }
        }
    }

    /// The upload scheduler: runs until the task is aborted.
    pub async fn run(self) {
        self.run_until(std::future::pending()).await
    }

    /// The upload scheduler, until `stop` resolves: it then returns at its next wait, once the
    /// batch in flight is answered (what is still pending stays queued for the next start).
    pub async fn run_until(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        self.revive_changed().await;
        let h = &self.inner.config.history;
        let mut next_periodic = tokio::time::Instant::now() + h.interval;
        let mut next_purge = tokio::time::Instant::now() + Duration::from_secs(3600);
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut attempt: u32 = 0;
        // When a call held back by its recording may be ready.
        let mut recheck: Option<tokio::time::Instant> = None;
        // Whatever is pending from before a restart goes out at once.
        let mut due = true;
        // Any other CRM request succeeding ends a backoff: the CRM is back. Once per backoff:
        // if that early try fails too, the failure is this endpoint's and the schedule holds.
        let mut crm_ok = self.inner.crm.successes();
        let (mut may_end_early, mut ended_early) = (true, false);
        loop {
            if !due {
                // While backing off only the retry (or the scheduler) wakes the loop: a call
                // waiting for its recording must not shorten an outage's pause, nor spin it.
                let wake_at = match retry_at {
                    Some(r) => r.min(next_periodic),
                    None => recheck.map_or(next_periodic, |c| c.min(next_periodic)),
                };
                tokio::select! {
                    () = &mut stop => return,
                    _ = self.inner.enqueued.notified(), if h.immediate => {
                        // A short window gathers the calls ending together into one batch.
                        if self.inner.store.counts().pending.load(Ordering::Relaxed) < h.batch_size as u64 {
                            tokio::time::sleep(h.batch_window).await;
                        }
                    }
                    _ = self.inner.kick.notified() => { retry_at = None; }
                    _ = self.inner.ready.notified() => {}
                    Ok(()) = crm_ok.changed(), if retry_at.is_some() && may_end_early => {
                        tracing::info!("the CRM answers again: uploading the call history now");
                        retry_at = None;
                        ended_early = true;
                    }
                    _ = tokio::time::sleep_until(wake_at) => {}
                }
            }
            due = false;
            self.inner.wakeups.fetch_add(1, Ordering::Relaxed);
            let now = tokio::time::Instant::now();
            if now >= next_periodic {
                next_periodic = now + h.interval;
            }
            if now >= next_purge {
                next_purge = now + Duration::from_secs(3600);
                let retention = i64::try_from(h.retention.as_millis()).unwrap_or(i64::MAX);
                match self.inner.store.purge_done(retention) {
                    Ok(n) if n > 0 => {
                        tracing::info!(purged = n, "forgot uploaded call ids past the retention")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "purging done call ids failed"),
                }
            }
            if retry_at.is_some_and(|r| now < r) {
                continue; // Backing off: wakes do not shorten an outage's pause.
            }
            let result = self.drain().await;
            if !self.inner.stopping.load(Ordering::Relaxed) {
                self.inner.crm.maintain().await;
            }
            recheck = self.take_recheck();
            // Only successes after this drain may end the next backoff.
            crm_ok.mark_unchanged();
            may_end_early = !std::mem::take(&mut ended_early)
                || matches!(result, Drain::Done | Drain::Paused(_));
            match result {
                Drain::Done | Drain::Paused(_) => {
                    retry_at = None;
                    attempt = 0;
                }
                Drain::Retry(why) => {
                    let delay = crate::base::backoff::backoff(attempt, h.retry_base, h.retry_max)
                        .max(h.retry_base / 2);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(error = %why, retry_in_ms = delay.as_millis() as u64, "call history upload failed; the calls stay queued");
                    retry_at = Some(tokio::time::Instant::now() + delay);
                }
                Drain::Blocked(why) => {
                    tracing::error!(error = %why, "call history upload stopped until this is fixed (nothing is dropped)");
                    retry_at = Some(tokio::time::Instant::now() + h.retry_max);
                }
            }
        }
    }

    /// When the earliest call held back by the last drain may be ready, as a timer deadline.
    fn take_recheck(&self) -> Option<tokio::time::Instant> {
        let at = self
            .inner
            .recheck_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        let wait = u64::try_from(at - now_ms()).unwrap_or(0);
        // A little later than the deadline, so that the file's age has passed it.
        Some(tokio::time::Instant::now() + Duration::from_millis(wait + 50))
    }

    /// Waits until `done` holds for the outbox's status (checked after every batch and drain).
    pub async fn wait_until(&self, mut done: impl FnMut(&Status) -> bool) {
        let mut rx = self.inner.changes.subscribe();
        loop {
            if done(&self.status()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Bumped after every batch and drain (the admin page's live updates).
    pub fn subscribe_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Waits until the queue has changed state `n` times in total (drains and batches).
    pub async fn wait_changes(&self, n: u64) {
        let mut rx = self.inner.changes.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    /// Uploads everything pending and ready, batch by batch.
    pub async fn drain(&self) -> Drain {
        let _exclusive = self.inner.draining.lock().await;
        let result = self.drain_inner().await;
        self.inner.changes.send_modify(|n| *n += 1);
        result
    }

    async fn drain_inner(&self) -> Drain {
        let inner = &self.inner;
        if !inner.crm.is_configured() {
            return Drain::Paused(inner.crm.unconfigured());
        }
        if !inner
            .activity
            .activity()
            .map(|a| a.may_push())
            .unwrap_or(true)
        {
            return Drain::Paused("module inactive or frozen");
        }
        let tz = inner.crm.timezone().await;
        let size = inner
            .config
            .history
            .batch_size
            .clamp(1, inner.crm.batch_limit().max(1));
        let mut after = None;
        loop {
            if inner.stopping.load(Ordering::Relaxed) {
                return Drain::Paused("stopping");
            }
            if after.is_some() {
                self.wait_for_pacing(size).await;
            }
            let now = now_ms();
            // Reading the queue and looking at recording files block: off the async workers.
            let this = self.clone();
            let read = tokio::task::spawn_blocking(move || {
                this.inner
                    .store
                    .pending(after, size, |e| this.is_ready(e, now))
            })
            .await;
            let batch = match read {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => return Drain::Retry(format!("reading the queue: {e}")),
                Err(e) => return Drain::Retry(format!("reading the queue: {e}")),
            };
            let Some(last) = batch.last() else {
                let mut p = inner.progress.lock().unwrap_or_else(|p| p.into_inner());
                p.blocked = None;
                return Drain::Done;
            };
            after = Some(last.seq);
            if let Some(records) = &inner.records {
                // Durable before the upload that carries the links.
                // Not for calls `need_registration` already kept from the CRM.
                let kept = |e: &&Envelope| inner.verdicts.get(&e.id) != Some(false);
                if let Err(e) = records
                    .ensure_links(batch.iter().filter(kept).map(|e| &e.record), &tz)
                    .await
                {
                    return Drain::Retry(format!("recording links: {e}"));
                }
            }
            inner
                .progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .in_flight = batch.len() as u64;
            let result = self.deliver(batch.clone()).await;
            let mut p = inner.progress.lock().unwrap_or_else(|p| p.into_inner());
            p.in_flight = 0;
            match result {
                Ok(()) => {
                    p.blocked = None;
                    drop(p);
                    inner.changes.send_modify(|_| {});
                }
                Err(Stop::Retry(why)) => {
                    p.failed_attempts += 1;
                    p.last_error = Some(why.clone());
                    drop(p);
                    let _ = inner.store.record_failure(&batch, &why);
                    return Drain::Retry(why);
                }
                Err(Stop::Blocked(why)) => {
                    p.failed_attempts += 1;
                    p.last_error = Some(why.clone());
                    p.blocked = Some(why.clone());
                    return Drain::Blocked(why);
                }
                Err(Stop::Store(e)) => return Drain::Retry(format!("store: {e}")),
            }
        }
    }

    /// Before reading a batch that would not be full while the CRM's rate limit holds its
    /// requests back (the CRM is the bottleneck): waits up to [`PACING_WAIT_MAX`] for the batch
    /// to fill (ending early when it does, or when the service stops), so the calls ending
    /// meanwhile share one request instead of each taking a slot of their own. Below the
    /// limit nothing waits.
    async fn wait_for_pacing(&self, size: usize) {
        let inner = &self.inner;
        if inner.crm.pacing().is_zero() {
            return;
        }
        let until = tokio::time::Instant::now() + PACING_WAIT_MAX;
        while tokio::time::Instant::now() < until
            && !inner.stopping.load(Ordering::Relaxed)
            && inner.store.counts().pending.load(Ordering::Relaxed) < size as u64
        {
            tokio::time::sleep(Duration::from_millis(50).min(until - tokio::time::Instant::now()))
                .await;
        }
    }

    /// Delivers one batch and settles each call as the CRM port reports it: delivered calls
    /// are done (durably, before the next batch: a crash re-sends at most the batch in flight),
    /// refused ones dead, held ones set aside; a transient or blocking failure stops the drain.
    async fn deliver(&self, batch: Vec<Envelope>) -> Result<(), Stop> {
        let inner = &self.inner;
        let unassigned = inner.config.calls.unassigned();
        // Recorded before `calls.unassigned_code` was set: it applies now.
        let hooks = &inner.hooks;
        let phones = inner
            .phones
            .get_or_init(|| PhoneBook::new(&inner.config.phone));
        // The batch's hooks run side by side; the batch waits for them (each has its timeout).
        let prepared: Vec<Option<(CallRecord, Option<String>)>> = futures_util::future::join_all(
            batch
                .iter()
                .map(|e| self.through_points(with_unassigned(&e.record, unassigned.as_ref()))),
        )
        .await;
        let finished: Vec<Finished<'_>> = prepared
            .iter()
            .flatten()
            .map(|(record, url)| Finished {
                record,
                record_url: url.as_deref(),
            })
            .collect();
        let mut outcomes = if finished.is_empty() {
            Vec::new().into_iter()
        } else {
            inner.crm.deliver(&finished).await.into_iter()
        };
        let (mut done, mut aside, mut fresh, mut stop) = (Vec::new(), Vec::new(), 0u64, None);
        let mut not_registered = 0u64;
        for (e, prepared) in batch.into_iter().zip(&prepared) {
            let Some((record, _)) = prepared else {
                tracing::info!(id = %e.id, "need_registration: the call's history is not sent to the CRM");
                not_registered += 1;
                inner.outcomes.not_registered();
                done.push(e);
                continue;
            };
            // The adapter answers once per call it was given.
            let outcome = outcomes.next().unwrap_or_else(|| {
                Delivery::RetryLater("the CRM adapter gave no answer for a call".into())
            });
            inner.outcomes.count(&outcome);
            match outcome {
                Delivery::Delivered => {
                    fresh += 1;
                    post_registration(
                        hooks,
                        || call_full(record, phones, &jiff::tz::TimeZone::system()),
                        Stage::CallEnded,
                    );
                    done.push(e);
                }
                Delivery::Duplicate => done.push(e),
                Delivery::Held(why) => {
                    let mut held = e;
                    held.last_error = Some(format!("held by pbxgate: {why}"));
                    held.held = true;
                    aside.push(held);
                }
                Delivery::Rejected(why) => {
                    let mut dead = e;
                    dead.last_error = Some(why);
                    aside.push(dead);
                }
                Delivery::RetryLater(why) => {
                    stop.get_or_insert(Stop::Retry(why));
                }
                Delivery::Blocked(why) => stop = Some(Stop::Blocked(why)),
            }
        }
        // What the CRM took is recorded first: a store failure below re-sends nothing.
        if !done.is_empty() {
            inner.store.mark_done(&done)?;
            inner.store.flush().await?;
            let mut p = inner.progress.lock().unwrap_or_else(|p| p.into_inner());
            p.uploaded_total += fresh;
            p.not_registered += not_registered;
            p.last_success_at = Some(now_ms());
            tracing::debug!(calls = done.len(), "call history uploaded");
        }
        for mut e in aside {
            e.config = Some(inner.fingerprint.clone());
            inner.store.set_aside(e)?;
        }
        stop.map_or(Ok(()), Err)
    }

    /// Only final records go out: a recording still being written (modified within
    /// `history.record_settle`) holds its call back, at most `history.record_wait_max`; then, with
    /// `records.convert`, until its conversion has finished (conversions run one at a time, each
    /// limited to `records.convert_timeout`).
    fn is_ready(&self, e: &Envelope, now: i64) -> bool {
        let h = &self.inner.config.history;
        if e.record.recordings.is_empty() {
            return true;
        }
        let give_up_at = e.enqueued_at + h.record_wait_max.as_millis() as i64;
        let settle_ms = h.record_settle.as_millis() as i64;
        let mut settled_at = now;
        let settled = now >= give_up_at
            || e.record.recordings.iter().all(|path| {
                // A relative path is relative to the recordings directory, as for the links.
                let path = self.inner.config.records.dir.join(path);
                match std::fs::metadata(&path).and_then(|m| m.modified()) {
                    Ok(modified) => match modified.elapsed() {
                        Ok(age) if age >= h.record_settle => true,
                        Ok(age) => {
                            let at = now + settle_ms - age.as_millis() as i64;
                            settled_at = settled_at.max(at.min(give_up_at));
                            false
                        }
                        Err(_) => true,
                    },
                    // Not on this host (or gone): nothing to wait for.
                    Err(_) => true,
                }
            });
        if !settled {
            let mut recheck = self
                .inner
                .recheck_at
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *recheck = Some(recheck.map_or(settled_at, |r| r.min(settled_at)));
            return false;
        }
        match &self.inner.records {
            Some(records) => {
                let inner = Arc::downgrade(&self.inner);
                records.conversion_ready(&e.record, move || {
                    if let Some(inner) = inner.upgrade() {
                        inner.ready.notify_one();
                    }
                })
            }
            None => true,
        }
    }

    /// A record through the points before it goes to the CRM: None when `need_registration`
    /// keeps it from the CRM (asked here when no live answer is known), else the record and its
    /// recording link as `process_client_phone`, `process_user_phone` and `process_call_params`
    /// leave them.
    async fn through_points(&self, mut r: CallRecord) -> Option<(CallRecord, Option<String>)> {
        let inner = &self.inner;
        let hooks = &inner.hooks;
        if !hooks.any_configured() {
            let url = self.record_url(&r);
            return Some((r, url));
        }
        let phones = inner
            .phones
            .get_or_init(|| PhoneBook::new(&inner.config.phone));
        let tz = jiff::tz::TimeZone::system();
        let register = if hooks.is_configured(NEED_REGISTRATION) {
            let ask = || need_registration(hooks, call_full(&r, phones, &tz), Stage::CallEnded);
            inner.verdicts.decide(&r.external_id, ask).await
        } else {
            true
        };
        if !register {
            return None;
        }
        if hooks.is_configured(PROCESS_CLIENT_PHONE) || hooks.is_configured(PROCESS_USER_PHONE) {
            let full = call_full(&r, phones, &tz);
            r.customer_number =
                client_phone(hooks, &r.customer_number, &full, Stage::CallEnded).await;
            if let Some(code) = &r.code {
                r.code = Some(user_phone(hooks, code, &full, Stage::CallEnded).await);
            }
        }
        let url = self.record_url(&r);
        Some(points::call_params(hooks, phones, r, url).await)
    }

    /// The link the CRM plays the recording from (made by the drain before the upload).
    fn record_url(&self, record: &CallRecord) -> Option<String> {
        self.inner.records.as_ref()?.url_for(record)
    }
}

/// A record as it goes out: without a manager, `calls.unassigned_code` stands in.
fn with_unassigned(r: &CallRecord, unassigned: Option<&Assignee>) -> CallRecord {
    let mut r = r.clone();
    match (unassigned, &r.code, r.user_id) {
        (Some(Assignee::Code(c)), None, None) => r.code = Some(c.clone()),
        (Some(Assignee::User(id)), None, None) => r.user_id = Some(*id),
        _ => {}
    }
    r
}

impl CallSink for Outbox {
    /// From the call tracker: stored at once (a crash window of one group commit, a few ms),
    /// then flushed and uploaded in the background.
    fn accept(&self, record: CallRecord) {
        let id = record.external_id.clone();
        if record.ignored {
            tracing::debug!(id = %id, registration = ?record.registration, "call not queued for the CRM");
            return;
        }
        match self.inner.store.insert(record) {
            Ok(_) => {
                let store = self.inner.store.clone();
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.flush().await {
                        tracing::error!(error = %e, "flushing the call history failed");
                    }
                    inner.enqueued.notify_one();
                });
            }
            Err(e) => tracing::error!(id = %id, error = %e, "could not store a finished call"),
        }
    }
}

/// Several sinks at once (the outbox and the in-memory list of recent calls).
pub struct Tee(pub Vec<Arc<dyn CallSink>>);

impl CallSink for Tee {
    fn accept(&self, record: CallRecord) {
        if let Some((last, rest)) = self.0.split_last() {
            for s in rest {
                s.accept(record.clone());
            }
            last.accept(record);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The outbox knows a CRM only through the port: a CRM of the test's own, deciding each
    //! call by its id, shows what becomes of each kind of answer.

    use std::sync::Mutex;

    use futures_util::future::BoxFuture;
    use futures_util::FutureExt;

    use super::*;
    use crate::calls::LiveEvent;
    use crate::crm::port::{CrmFailure, DirectoryEntry, Responsible};
    use crate::crm::Published;
    use crate::outbox::store::State;

    /// Answers by the id's last part: `ok`, `dup`, `held`, `bad`, `down`, `key`.
    #[derive(Default)]
    struct ScriptedCrm {
        batches: Mutex<Vec<Vec<String>>>,
        tx: tokio::sync::watch::Sender<u64>,
    }

    impl Crm for ScriptedCrm {
        fn name(&self) -> &'static str {
            "scripted"
        }
        fn url(&self) -> &str {
            "scripted:"
        }
        fn is_configured(&self) -> bool {
            true
        }
        fn successes(&self) -> tokio::sync::watch::Receiver<u64> {
            self.tx.subscribe()
        }
        fn publish<'a>(&'a self, _: &'a LiveEvent) -> BoxFuture<'a, Result<Published, CrmFailure>> {
            async { Ok(Published::Sent) }.boxed()
        }
        fn batch_limit(&self) -> usize {
            3
        }
        fn deliver<'a>(&'a self, calls: &'a [Finished<'a>]) -> BoxFuture<'a, Vec<Delivery>> {
            let ids: Vec<String> = calls.iter().map(|c| c.record.external_id.clone()).collect();
            self.batches.lock().unwrap().push(ids.clone());
            let out = ids
                .iter()
                .map(|id| match id.rsplit('-').next().unwrap_or("") {
                    "ok" => Delivery::Delivered,
                    "dup" => Delivery::Duplicate,
                    "held" => Delivery::Held("no manager".into()),
                    "bad" => Delivery::Rejected("refused: phone".into()),
                    "down" => Delivery::RetryLater("CRM unreachable".into()),
                    _ => Delivery::Blocked("wrong key".into()),
                })
                .collect();
            async move { out }.boxed()
        }
        fn shape(&self) -> String {
            "scripted".into()
        }
        fn timezone(&self) -> BoxFuture<'_, jiff::tz::TimeZone> {
            async { jiff::tz::TimeZone::UTC }.boxed()
        }
        fn responsible<'a>(
            &'a self,
            _: &'a str,
            _: bool,
        ) -> BoxFuture<'a, Result<Option<Responsible>, CrmFailure>> {
            async { Ok(None) }.boxed()
        }
        fn directory(&self) -> Vec<DirectoryEntry> {
            Vec::new()
        }
        fn register(&self) -> BoxFuture<'_, Result<(), CrmFailure>> {
            async { Ok(()) }.boxed()
        }
        fn check(&self) -> BoxFuture<'_, Result<String, String>> {
            async { Ok("scripted".into()) }.boxed()
        }
    }

    async fn outbox_with(ids: &[&str]) -> (Outbox, Arc<ScriptedCrm>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let crm = Arc::new(ScriptedCrm::default());
        let outbox = Outbox::new(
            OutboxStore::of(&store).unwrap(),
            store,
            crm.clone(),
            Arc::new(Config::default()),
        );
        for id in ids {
            outbox.enqueue(CallRecord::sample(id)).await.unwrap();
        }
        (outbox, crm, dir)
    }

    fn state(outbox: &Outbox, id: &str) -> Option<State> {
        outbox.store().state_of(id).unwrap()
    }

    #[tokio::test]
    async fn each_call_is_settled_as_the_crm_port_reports_it() {
        let ids = ["1-ok", "2-dup", "3-held", "4-bad", "5-ok"];
        let (outbox, crm, _dir) = outbox_with(&ids).await;
        assert_eq!(outbox.drain().await, Drain::Done);
        // Batches of at most the adapter's limit.
        let batches = crm.batches.lock().unwrap().clone();
        assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), [3, 2]);
        assert_eq!(state(&outbox, "1-ok"), Some(State::Done));
        assert_eq!(state(&outbox, "2-dup"), Some(State::Done));
        assert_eq!(state(&outbox, "5-ok"), Some(State::Done));
        assert_eq!(state(&outbox, "3-held"), Some(State::Dead));
        assert_eq!(state(&outbox, "4-bad"), Some(State::Dead));
        let dead = outbox.store().dead(10).unwrap();
        let held = dead.iter().find(|e| e.id == "3-held").unwrap();
        assert!(held.held);
        assert_eq!(
            held.last_error.as_deref(),
            Some("held by pbxgate: no manager")
        );
        let bad = dead.iter().find(|e| e.id == "4-bad").unwrap();
        assert!(!bad.held);
        assert_eq!(bad.last_error.as_deref(), Some("refused: phone"));
        let s = outbox.status();
        // A duplicate is done, but was not uploaded by this attempt.
        assert_eq!((s.pending, s.dead, s.done, s.uploaded_total), (0, 2, 3, 2));
    }

    #[tokio::test]
    async fn need_registration_is_asked_at_call_ended_only_for_calls_without_an_answer() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("asked.json");
        let mut config = Config::default();
        let answer = r#"{"state": "success", "data": {"result": false}}"#;
        config.hooks.0.insert(
            NEED_REGISTRATION.into(),
            crate::config::HookConfig {
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("cat >> '{}'; echo '{answer}'", seen.display()),
                ],
                url: String::new(),
                timeout: Duration::from_secs(10),
            },
        );
        let config = Arc::new(config);
        let store = Store::open(&dir.path().join("db")).unwrap();
        let crm = Arc::new(ScriptedCrm::default());
        let verdicts = Verdicts::default();
        // The live path already had the first call's answer.
        verdicts.set("1-ok", true);
        let outbox = Outbox::with_records(
            OutboxStore::of(&store).unwrap(),
            store,
            crm.clone(),
            config.clone(),
            None,
            Hooks::new(&config.hooks, reqwest::Client::new()),
            verdicts.clone(),
        );
        for id in ["1-ok", "2-ok"] {
            outbox.enqueue(CallRecord::sample(id)).await.unwrap();
        }
        assert_eq!(outbox.drain().await, Drain::Done);
        assert_eq!(
            crm.batches.lock().unwrap().clone(),
            vec![vec!["1-ok".to_string()]]
        );
        assert_eq!(state(&outbox, "2-ok"), Some(State::Done));
        let s = outbox.status();
        assert_eq!(
            (s.pending, s.done, s.uploaded_total, s.not_registered),
            (0, 2, 1, 1)
        );
        let asked: Vec<serde_json::Value> = std::fs::read_to_string(&seen)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(asked.len(), 1, "{asked:?}");
        assert_eq!(asked[0]["call_stage"], "call_ended");
        assert_eq!(
            asked[0]["call_full"]["channel"]["id"],
            CallRecord::sample("2-ok").linkedid
        );
        assert_eq!(verdicts.get("2-ok"), Some(false));
    }

    #[tokio::test]
    async fn at_shutdown_a_drain_stops_before_its_next_batch() {
        let (outbox, crm, _dir) = outbox_with(&["1-ok", "2-ok", "3-ok", "4-ok"]).await;
        outbox.stop_after_batch();
        assert_eq!(outbox.drain().await, Drain::Paused("stopping"));
        assert!(crm.batches.lock().unwrap().is_empty());
        assert_eq!(outbox.status().pending, 4);
    }

    #[test]
    fn dead_calls_fingerprinted_by_the_previous_version_are_not_revived() {
        use sha2::Digest;
        let mut config = Config::default();
        config.crm.site = "shop".into();
        config.users.push(crate::config::UserCode {
            user_id: 7,
            code: "101".into(),
        });
        let config = Arc::new(config);
        let crm = crate::crm::retailcrm::RetailCrm::new(
            config.clone(),
            crate::base::secret::Secret::new(""),
        )
        .unwrap();
        // How the fingerprint was made before the CRM port.
        let before = format!(
            "{:?}|{:?}|{:?}|{:?}|{}|{}|{}",
            config.calls,
            config.users,
            config.external_phones,
            config.phone,
            config.crm.url,
            config.crm.site,
            config.crm.module_code,
        );
        let digest = sha2::Sha256::digest(before.as_bytes());
        let before: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(config_fingerprint(&config, &crm), before);
    }

    #[tokio::test]
    async fn a_transient_failure_keeps_the_calls_and_a_blocking_one_stops_uploading() {
        let (outbox, _crm, _dir) = outbox_with(&["1-ok", "2-down"]).await;
        assert_eq!(outbox.drain().await, Drain::Retry("CRM unreachable".into()));
        assert_eq!(state(&outbox, "1-ok"), Some(State::Done));
        assert_eq!(state(&outbox, "2-down"), Some(State::Pending));
        assert_eq!(
            outbox.status().last_error.as_deref(),
            Some("CRM unreachable")
        );

        let (outbox, _crm, _dir) = outbox_with(&["1-key"]).await;
        assert_eq!(outbox.drain().await, Drain::Blocked("wrong key".into()));
        assert_eq!(state(&outbox, "1-key"), Some(State::Pending));
        assert_eq!(outbox.status().blocked.as_deref(), Some("wrong key"));
    }
}
