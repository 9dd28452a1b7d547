//! Live call events to the CRM (through the port): pop-ups while phones ring, hangups.
//! A pop-up is useless late: each event gets a short deadline (retries within the CRM rate
//! limit included), then it is dropped with a log line. Nothing is sent while the module is
//! inactive or frozen, or without an API key.
//!
//! Without hooks, events go out one at a time, in the order they happened. With hooks, each
//! call gets a task of its own that runs its events through the points in order
//! (`need_registration` at the first one, `process_client_phone` for the customer's number,
//! `process_user_phone` for each extension), so a slow hook holds back only its own call.
//! The points of one event get at most half of what is left of its deadline (a hangup: half of
//! the whole deadline, which it always gets); past that the event goes out as it is, and a
//! call `need_registration` did not answer in time is registered (the CRM was told of it).
//! Only the live points start these tasks: `need_registration`, `post_registration`, the two
//! phone points and the adapter's own (`process_call_event_params`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::base::clock::now_ms;
use crate::calls::full::call_full_live;
use crate::calls::model::Millis;
use crate::calls::record::{Direction, LiveEvent};
use crate::config::Config;
use crate::crm::{Crm, Published};
use crate::hooks::phone_points::{
    client_phone, user_phone, PROCESS_CLIENT_PHONE, PROCESS_USER_PHONE,
};
use crate::hooks::{Hooks, Stage};
use crate::phone::PhoneBook;
use crate::pipeline::registration_points::{
    need_registration, post_registration, Verdicts, NEED_REGISTRATION, POST_REGISTRATION,
};
use crate::pipeline::tracker::TrackerStats;
use crate::store::Store;

/// The points the live path calls (directly, or through the adapter's `publish`).
const LIVE_POINTS: &[&str] = &[
    NEED_REGISTRATION,
    POST_REGISTRATION,
    PROCESS_CLIENT_PHONE,
    PROCESS_USER_PHONE,
    crate::crm::retailcrm::points::PROCESS_CALL_EVENT_PARAMS,
];

/// How many calls whose pop-up reached the CRM are remembered until their hangup.
const ANNOUNCED_KEPT: usize = 16_384;
/// A call's task ends after this long without an event (its hangup ends it sooner).
const CALL_IDLE: Duration = Duration::from_secs(3600);
/// Past this many calls with a task, the ended ones are forgotten.
const TASKS_PRUNED_AT: usize = 4096;

/// The calls whose `in`/`out` reached the CRM: only they get a `hangup`.
#[derive(Default)]
struct Announced {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Announced {
    fn insert(&mut self, id: &str) {
        if self.ids.insert(id.to_string()) {
            self.order.push_back(id.to_string());
            while self.order.len() > ANNOUNCED_KEPT {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }

    fn take(&mut self, id: &str) -> bool {
        // The order queue keeps the id until it is evicted: harmless, bounded.
        self.ids.remove(id)
    }
}

/// What the live path needs of the customisation points.
pub struct LiveHooks {
    pub hooks: Hooks,
    pub verdicts: Verdicts,
    pub phones: PhoneBook,
}

struct Sender {
    crm: Arc<dyn Crm>,
    store: Store,
    config: Arc<Config>,
    stats: Arc<TrackerStats>,
    announced: Mutex<Announced>,
    hooks: Option<LiveHooks>,
}

/// Sends live events. Each was stamped when it happened (`at`, Unix ms) and gets
/// `calls.live_event_deadline` from then: a pop-up the CRM cannot have in time is dropped
/// (counted) rather than shown after the call; a hangup goes only to calls whose pop-up got
/// through, and always gets the whole deadline (it closes a card a manager sees).
pub async fn run(
    mut rx: mpsc::Receiver<(Millis, LiveEvent)>,
    crm: Arc<dyn Crm>,
    store: Store,
    config: Arc<Config>,
    stats: Arc<TrackerStats>,
    hooks: Option<LiveHooks>,
) {
    let hooks = hooks.filter(|h| LIVE_POINTS.iter().any(|p| h.hooks.is_configured(p)));
    let with_hooks = hooks.is_some();
    let sender = Arc::new(Sender {
        crm,
        store,
        config,
        stats,
        announced: Mutex::default(),
        hooks,
    });
    if !with_hooks {
        while let Some((at, e)) = rx.recv().await {
            sender.send(at, e).await;
        }
        return;
    }
    let mut calls: HashMap<String, mpsc::UnboundedSender<(Millis, LiveEvent)>> = HashMap::new();
    while let Some((at, e)) = rx.recv().await {
        let id = e.external_id().to_string();
        let last = matches!(e, LiveEvent::Hangup { .. });
        let mut item = (at, e);
        loop {
            let tx = calls.entry(id.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(sender.clone().call_task(rx));
                tx
            });
            match tx.send(item) {
                Ok(()) => break,
                // That call's task ended (idle): a new one takes the event.
                Err(mpsc::error::SendError(back)) => {
                    calls.remove(&id);
                    item = back;
                }
            }
        }
        if last {
            calls.remove(&id);
        }
        if calls.len() > TASKS_PRUNED_AT {
            calls.retain(|_, tx| !tx.is_closed());
        }
    }
}

impl Sender {
    /// One call's events, in order, through the points.
    async fn call_task(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<(Millis, LiveEvent)>) {
        let mut register: Option<bool> = None;
        while let Ok(Some((at, e))) = tokio::time::timeout(CALL_IDLE, rx.recv()).await {
            let hangup = matches!(e, LiveEvent::Hangup { .. });
            // When nothing would go out, the points are not asked: no key, the module off, an
            // internal call's hangup, a hangup whose pop-up never reached the CRM.
            let unsent = !self.may_send()
                || self.internal_unsent(&e)
                || (hangup && !self.announced().ids.contains(e.external_id()));
            if unsent {
                // `send` counts and logs what it drops.
                self.send(at, e).await;
            } else if let Some(e) = self.through_points(at, e, &mut register).await {
                self.send(at, e).await;
            }
            if hangup {
                return;
            }
        }
    }

    /// The event as the points leave it, or None when `need_registration` refused the call.
    async fn through_points(
        &self,
        at: Millis,
        mut e: LiveEvent,
        register: &mut Option<bool>,
    ) -> Option<LiveEvent> {
        let Some(h) = &self.hooks else {
            return Some(e);
        };
        let deadline = self.config.calls.live_event_deadline;
        let age = Duration::from_millis(u64::try_from(now_ms() - at).unwrap_or(0));
        let (stage, budget) = match e {
            LiveEvent::Hangup { .. } => (Stage::CallEnded, deadline / 2),
            _ => (
                Stage::ConversationRequested,
                deadline.saturating_sub(age) / 2,
            ),
        };
        let tz = jiff::tz::TimeZone::system();
        let full = call_full_live(&e, at, &self.config.pbx.system_id, &h.phones, &tz);
        let id = e.external_id().to_string();
        let points = async {
            if register.is_none() && h.hooks.is_configured(NEED_REGISTRATION) {
                let ask = || need_registration(&h.hooks, full.clone(), stage);
                *register = Some(h.verdicts.decide(&id, ask).await);
            }
            if *register == Some(false) {
                return;
            }
            let (phone, codes) = match &mut e {
                LiveEvent::Ringing { phone, codes, .. }
                | LiveEvent::Dialing { phone, codes, .. }
                | LiveEvent::Hangup { phone, codes, .. } => (phone, codes),
                // Not a stage of its own: sent as the call's state is.
                LiveEvent::Progress { .. } => return,
            };
            *phone = client_phone(&h.hooks, phone, &full, stage).await;
            let rewritten = futures_util::future::join_all(
                codes.iter().map(|c| user_phone(&h.hooks, c, &full, stage)),
            )
            .await;
            *codes = rewritten;
        };
        if tokio::time::timeout(budget, points).await.is_err() {
            tracing::warn!(id = %id, budget_ms = budget.as_millis() as u64,
                "the hooks of a live call event did not answer in time: the event goes out as it is");
            // Once the CRM was told of a call, its history follows (registered by default).
            if register.is_none() && h.hooks.is_configured(NEED_REGISTRATION) {
                h.verdicts.set(&id, true);
                *register = h.verdicts.get(&id);
            }
            return Some(e);
        }
        if *register == Some(false) {
            tracing::debug!(id = %id, "need_registration: the call is not sent to the CRM");
            return None;
        }
        Some(e)
    }

    /// The hangup of an internal call, when the CRM does not get internal calls.
    fn internal_unsent(&self, e: &LiveEvent) -> bool {
        matches!(
            e,
            LiveEvent::Hangup {
                direction: Direction::Internal,
                ..
            }
        ) && !self.config.calls.send_internal
    }

    async fn send(&self, at: Millis, e: LiveEvent) {
        let config = &self.config;
        let stats = &self.stats;
        if self.internal_unsent(&e) {
            return;
        }
        if !self.may_send() {
            return;
        }
        let deadline: Duration = config.calls.live_event_deadline;
        let id = e.external_id();
        let kind = e.kind();
        let hangup = matches!(e, LiveEvent::Hangup { .. });
        let progress = matches!(e, LiveEvent::Progress { .. });
        if progress && !self.announced().ids.contains(id) {
            // The call's pop-up never reached the CRM: nothing to update.
            return;
        }
        if hangup && !self.announced().take(id) {
            stats.hangups_without_popup.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                id,
                "hangup not sent: the call's pop-up never reached the CRM"
            );
            return;
        }
        // A hangup closes a pop-up the manager sees: late is better than never.
        let age = Duration::from_millis(u64::try_from(now_ms() - at).unwrap_or(0));
        let left = if hangup {
            Some(deadline)
        } else {
            deadline.checked_sub(age).filter(|d| !d.is_zero())
        };
        let Some(left) = left else {
            stats.live_events_late.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(kind = %kind, id = %id, age_ms = age.as_millis() as u64,
                "live call event dropped: older than calls.live_event_deadline");
            return;
        };
        match tokio::time::timeout(left, self.crm.publish(&e)).await {
            Ok(Ok(Published::Sent)) => {
                stats.live_events_sent.fetch_add(1, Ordering::Relaxed);
                if !hangup && !progress {
                    let first = !self.announced().ids.contains(id);
                    self.announced().insert(id);
                    if let (true, Some(h)) = (first, &self.hooks) {
                        post_registration(
                            &h.hooks,
                            || {
                                let tz = jiff::tz::TimeZone::system();
                                call_full_live(&e, at, &self.config.pbx.system_id, &h.phones, &tz)
                            },
                            Stage::ConversationRequested,
                        );
                    }
                }
            }
            Ok(Ok(Published::Skipped)) => {}
            Ok(Err(err)) => {
                stats.live_events_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(kind = %kind, id = %id, error = %err, "live call event dropped");
            }
            Err(_) => {
                stats.live_events_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(kind = %kind, id = %id, deadline_ms = deadline.as_millis() as u64,
                    "live call event dropped: the CRM did not take it in time");
            }
        }
    }

    /// The CRM can take live events now (an API key, the module active and not frozen).
    fn may_send(&self) -> bool {
        if !self.crm.is_configured() {
            return false;
        }
        if !self.store.activity().map(|a| a.may_push()).unwrap_or(true) {
            tracing::debug!("module inactive or frozen: live call event not sent");
            return false;
        }
        true
    }

    fn announced(&self) -> std::sync::MutexGuard<'_, Announced> {
        self.announced.lock().unwrap_or_else(|p| p.into_inner())
    }
}
