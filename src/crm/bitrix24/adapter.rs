//! Bitrix24 behind the CRM port (external telephony).
//!
//! One physical call is one Bitrix24 call (`CALL_ID`):
//! - **register** when the first extension rings (inbound) or the customer is dialled
//!   (outbound), for the user of that extension, with our externalId as `EXTERNAL_CALL_ID`
//!   (unique per call, so the portal's 30-minute folding of "the same" calls never joins two).
//!   The `CALL_ID` is written and flushed to the adapter's state before anything else uses it;
//! - **cards** follow `Progress` events: with `show_card = "ringing"` every ringing or talking
//!   extension's user sees the card, with `"answered"` only those talking; cards of users who
//!   stop ringing are hidden. Several users' cards go in one request;
//! - **finish** comes from the outbox, once per call: one `batch` per delivery hides every card
//!   but the finisher's, finishes with the user who talked last (`DURATION` = talk seconds,
//!   `STATUS_CODE` from the outcome) and attaches the recording (answered calls with audio);
//! - a transfer keeps the one `CALL_ID`: cards move to whoever talks, and the call is finished
//!   with the last one. (A register per conversation would give each leg its own card and
//!   record, but a CRM activity per leg and orphan legs finished as missed are what users of
//!   such connectors complain about; one call, one activity, one record, the full duration.)
//! - a call whose register failed live (outage) is registered by the history path with
//!   `SHOW = 0`, then finished the same way;
//! - a click-to-call Bitrix24 asked for was registered by the portal itself: its `CALL_ID` is
//!   adopted before the Originate and the call is finished under it, never registered again.
//!
//! Crash safety: the `CALL_ID` is flushed before the finish is sent, and `finished` after the
//! portal took it. A finish answered "Call is not found" for a call we registered means an
//! earlier attempt got through (the answer was lost): it counts as done. A register whose
//! answer was lost is sent again with the same user, number, type, line and
//! `EXTERNAL_CALL_ID`, which the portal folds into the first (within 30 minutes).
//!
//! Requests to the portal are paced by the client's leaky bucket; each call costs one
//! register, the card changes, and a share of one `batch` at the end.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::directory::{id_of, Directory};
use super::mapping::{finish_params, Registration, TYPE_CALLBACK, TYPE_INCOMING, TYPE_OUTGOING};
use super::points;
use super::{B24Client, B24Error};
use crate::base::clock::now_ms;
use crate::calls::full::{call_full, call_full_live};
use crate::calls::{CallRecord, Direction, LiveEvent, Outcome};
use crate::config::{Config, RecordUpload, ShowCard};
use crate::crm::port::{
    Crm, CrmFailure, Delivery, DirectoryEntry, FailureKind, Finished, Published, Responsible,
};
use crate::hooks::Hooks;
use crate::hooks::Stage;
use crate::phone::PhoneBook;
use crate::store::crm_state::CrmState;

const CALL_PREFIX: &str = "bitrix24:call:";
/// Calls per delivery: each takes up to three commands of one `batch` (hide, finish, record).
const CALLS_PER_DELIVERY: usize = 16;
/// Most entries kept in memory (the state tree has them all).
const MAX_CACHED: usize = 4096;
/// Entries of calls done are kept this long (a late duplicate delivery is recognised).
const KEEP_DONE_MS: i64 = 7 * 24 * 3600 * 1000;

/// What the adapter remembers of a call (state key `bitrix24:call:<externalId>`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Entry {
    /// Bitrix24's `CALL_ID`; empty for a callback not dialled yet.
    #[serde(default)]
    call_id: String,
    /// The user it was registered for.
    user_id: i64,
    /// Registered by the portal (a click-to-call it asked for).
    #[serde(default)]
    by_portal: bool,
    /// A callback the portal asked for: registered with `TYPE = 4` when it dials.
    #[serde(default)]
    callback: bool,
    /// Users whose card is open.
    #[serde(default)]
    shown: BTreeSet<i64>,
    #[serde(default)]
    finished: bool,
    /// The recording was attached (or there was none to attach).
    #[serde(default)]
    record_done: bool,
    /// When the entry was last written (unix ms).
    #[serde(default)]
    at: i64,
}

pub struct Bitrix24 {
    inner: Arc<Inner>,
}

struct Inner {
    client: B24Client,
    config: Arc<Config>,
    state: Option<CrmState>,
    /// Bitrix24's own customisation points (see [`points`]).
    hooks: Hooks,
    /// For `call_full`.
    phones: PhoneBook,
    portal: String,
    directory: Directory,
    /// One task at a time per call: live events and the delivery never register twice.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Entries of calls in progress, as last written.
    entries: Mutex<HashMap<String, Entry>>,
    /// Bumped whenever a call gets its `CALL_ID` (for `call_ref`).
    registered: tokio::sync::watch::Sender<u64>,
}

impl Bitrix24 {
    pub fn new(
        config: Arc<Config>,
        state: Option<CrmState>,
        hooks: Hooks,
    ) -> Result<Bitrix24, CrmFailure> {
        let client = B24Client::new(&config, state.clone()).map_err(|e| e.failure())?;
        Ok(Bitrix24 {
            inner: Arc::new(Inner {
                client,
                portal: config.bitrix24.portal_origin(),
                directory: Directory::new(&config.users, state.clone()),
                phones: PhoneBook::new(&config.phone),
                config,
                state,
                hooks,
                locks: Mutex::default(),
                entries: Mutex::default(),
                registered: tokio::sync::watch::Sender::new(0),
            }),
        })
    }
}

fn key(external_id: &str) -> String {
    format!("{CALL_PREFIX}{external_id}")
}

impl Inner {
    fn tz(&self) -> jiff::tz::TimeZone {
        let name = self.config.crm.timezone.trim();
        if name.is_empty() {
            return jiff::tz::TimeZone::UTC;
        }
        jiff::tz::TimeZone::get(name).unwrap_or(jiff::tz::TimeZone::UTC)
    }

    async fn lock(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            if locks.len() > 1024 {
                locks.retain(|_, m| Arc::strong_count(m) > 1);
            }
            locks.entry(id.to_string()).or_default().clone()
        };
        m.lock_owned().await
    }

    fn entry(&self, id: &str) -> Option<Entry> {
        if let Some(e) = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return Some(e.clone());
        }
        let state = self.state.as_ref()?;
        let bytes = state.get(&key(id)).ok().flatten()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Writes the entry; `flush`: durable before this returns.
    async fn save(&self, id: &str, mut entry: Entry, flush: bool) -> Result<(), CrmFailure> {
        entry.at = now_ms();
        let done = entry.finished && entry.record_done;
        {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if done {
                entries.remove(id);
            } else {
                // Only a cache of the state tree: calls that never finish (refused) must not
                // make it grow without end.
                if entries.len() >= MAX_CACHED {
                    entries.clear();
                }
                entries.insert(id.to_string(), entry.clone());
            }
        }
        let Some(state) = &self.state else {
            return Ok(());
        };
        let store_failure = |e: crate::store::StoreError| CrmFailure {
            kind: FailureKind::Transient,
            message: format!("cannot keep the Bitrix24 call id: {e}"),
        };
        let bytes = serde_json::to_vec(&entry).unwrap_or_default();
        state.put(&key(id), &bytes).map_err(store_failure)?;
        if flush {
            state.flush().await.map_err(store_failure)?;
        }
        Ok(())
    }

    /// The user of an extension; an unknown one asks the portal's directory again (once a
    /// minute at most, in the background).
    fn user_of(self: &Arc<Self>, code: &str) -> Option<i64> {
        let found = self.directory.user_of(code);
        if found.is_none() && self.directory.ask_reload() {
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.directory.reload(&me.client).await {
                    tracing::warn!(error = %e, "cannot reload the Bitrix24 user directory");
                }
            });
        }
        found
    }

    /// Who calls with no known manager belong to.
    fn default_user(&self) -> Option<i64> {
        let b = &self.config.bitrix24;
        Some(b.default_user_id)
            .filter(|u| *u > 0)
            .or_else(|| b.webhook_user())
    }

    fn users_of<'a>(
        self: &Arc<Self>,
        codes: impl IntoIterator<Item = &'a String>,
    ) -> BTreeSet<i64> {
        codes.into_iter().filter_map(|c| self.user_of(c)).collect()
    }

    async fn register(
        self: &Arc<Self>,
        id: &str,
        reg: Registration,
        mut entry: Entry,
        full: impl FnOnce() -> Value,
        stage: Stage,
    ) -> Result<Entry, CrmFailure> {
        let params = reg.params(&self.tz());
        let params = points::registration(&self.hooks, id, params, full, stage).await;
        let user_id = params["USER_ID"].as_i64().unwrap_or(reg.user_id);
        let shown = params["SHOW"].as_i64() == Some(1);
        let kind = params["TYPE"].as_i64().unwrap_or(reg.kind);
        let result = self
            .client
            .call("telephony.externalcall.register", params)
            .await
            .map_err(|e| e.failure())?;
        let Some(call_id) = result["CALL_ID"].as_str().filter(|c| !c.is_empty()) else {
            return Err(CrmFailure {
                kind: FailureKind::Transient,
                message: "Bitrix24's register answer has no CALL_ID".into(),
            });
        };
        entry.call_id = call_id.to_string();
        entry.user_id = user_id;
        if shown {
            entry.shown.insert(user_id);
        }
        self.save(id, entry.clone(), true).await?;
        self.registered.send_modify(|n| *n += 1);
        tracing::info!(id, call_id, user_id, kind, "call registered in Bitrix24");
        Ok(entry)
    }

    fn live_full(&self, e: &LiveEvent) -> Value {
        let tz = jiff::tz::TimeZone::system();
        call_full_live(e, now_ms(), &self.config.pbx.system_id, &self.phones, &tz)
    }

    fn full(&self, r: &CallRecord) -> Value {
        call_full(r, &self.phones, &jiff::tz::TimeZone::system())
    }

    /// `customize_show_call_card` decides every card, the first one too: then `register` shows
    /// none (`SHOW = 0`) and the cards follow in their own requests.
    fn card_hook(&self) -> bool {
        self.hooks.is_configured(points::CUSTOMIZE_SHOW_CALL_CARD)
    }

    /// The users to show a card to, as `customize_show_call_card` leaves them.
    async fn card_users(
        &self,
        call_id: &str,
        users: BTreeSet<i64>,
        e: &LiveEvent,
    ) -> BTreeSet<i64> {
        if !self.hooks.is_configured(points::CUSTOMIZE_SHOW_CALL_CARD) {
            return users;
        }
        let stage = match e {
            LiveEvent::Progress { talking, .. } if !talking.is_empty() => {
                Stage::ConversationAccepted
            }
            _ => Stage::ConversationRequested,
        };
        let mut out = BTreeSet::new();
        for u in users {
            let full = || self.live_full(e);
            out.insert(
                points::show_card(&self.hooks, e.external_id(), call_id, u, full, stage).await,
            );
        }
        out
    }

    /// Shows the card to `show` and hides it from `hide` (one request when both).
    async fn cards(
        &self,
        call_id: &str,
        show: &BTreeSet<i64>,
        hide: &BTreeSet<i64>,
    ) -> Result<(), B24Error> {
        let cmd = |method: &str, users: &BTreeSet<i64>| {
            (
                method.to_string(),
                json!({"CALL_ID": call_id, "USER_ID": users.iter().collect::<Vec<_>>()}),
            )
        };
        let mut cmds = Vec::new();
        if !hide.is_empty() {
            cmds.push(cmd("telephony.externalcall.hide", hide));
        }
        if !show.is_empty() {
            cmds.push(cmd("telephony.externalcall.show", show));
        }
        match cmds.len() {
            0 => Ok(()),
            1 => {
                let (method, params) = cmds.remove(0);
                self.client.call(&method, params).await.map(|_| ())
            }
            _ => {
                let keyed: Vec<(String, String, Value)> = cmds
                    .into_iter()
                    .enumerate()
                    .map(|(i, (m, p))| (format!("c{i}"), m, p))
                    .collect();
                let answer = self.client.batch(&keyed, false).await?;
                match answer.errors.into_values().next() {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            }
        }
    }

    /// Loads the user directory if it never was (a call right after start): otherwise its
    /// first event would go to the default user.
    async fn ensure_directory(&self) {
        if self.directory.never_loaded() && self.directory.ask_reload() {
            if let Err(e) = self.directory.reload(&self.client).await {
                tracing::warn!(error = %e, "cannot load the Bitrix24 user directory");
            }
        }
    }

    async fn publish(self: Arc<Self>, event: LiveEvent) -> Result<Published, CrmFailure> {
        let id = event.external_id().to_string();
        self.ensure_directory().await;
        let _turn = self.lock(&id).await;
        let show_card = self.config.bitrix24.show_card;
        let existing = self.entry(&id);
        match &event {
            LiveEvent::Ringing {
                phone, did, codes, ..
            } => {
                let users = self.users_of(codes);
                match existing.filter(|e| !e.call_id.is_empty()) {
                    None => {
                        let user = users.iter().next().copied().or_else(|| self.default_user());
                        let Some(user_id) = user else {
                            return Err(no_user(codes));
                        };
                        let known = users.contains(&user_id);
                        let reg = Registration {
                            user_id,
                            phone: phone.clone(),
                            kind: TYPE_INCOMING,
                            start: now_ms(),
                            crm_create: self.config.bitrix24.crm_create,
                            line: did.clone(),
                            show: show_card == ShowCard::Ringing && known && !self.card_hook(),
                            external_id: id.clone(),
                        };
                        let full = || self.live_full(&event);
                        let entry = self
                            .register(
                                &id,
                                reg,
                                Entry::default(),
                                full,
                                Stage::ConversationRequested,
                            )
                            .await?;
                        let rest: BTreeSet<i64> = users.difference(&entry.shown).copied().collect();
                        if show_card == ShowCard::Ringing && !rest.is_empty() {
                            self.show_more(&id, entry, rest, &event).await?;
                        }
                    }
                    Some(entry) => {
                        let rest: BTreeSet<i64> = users.difference(&entry.shown).copied().collect();
                        if show_card == ShowCard::Ringing && !rest.is_empty() && !entry.finished {
                            self.show_more(&id, entry, rest, &event).await?;
                        }
                    }
                }
                Ok(Published::Sent)
            }
            LiveEvent::Dialing {
                phone,
                codes,
                click_to_call,
                ..
            } => {
                let users = self.users_of(codes);
                let entry = match existing {
                    Some(e) if !e.call_id.is_empty() => e,
                    other => {
                        let callback = other.as_ref().is_some_and(|e| e.callback);
                        let user = users
                            .iter()
                            .next()
                            .copied()
                            .or(click_to_call.as_ref().map(|c| c.user_id))
                            .or(other.as_ref().map(|e| e.user_id).filter(|u| *u > 0))
                            .or_else(|| self.default_user());
                        let Some(user_id) = user else {
                            return Err(no_user(codes));
                        };
                        let reg = Registration {
                            user_id,
                            phone: phone.clone(),
                            kind: if callback {
                                TYPE_CALLBACK
                            } else {
                                TYPE_OUTGOING
                            },
                            start: now_ms(),
                            crm_create: self.config.bitrix24.crm_create,
                            line: click_to_call
                                .as_ref()
                                .and_then(|c| c.external_phone.clone()),
                            show: show_card == ShowCard::Ringing && !self.card_hook(),
                            external_id: id.clone(),
                        };
                        let full = || self.live_full(&event);
                        let stage = Stage::ConversationRequested;
                        self.register(&id, reg, other.unwrap_or_default(), full, stage)
                            .await?
                    }
                };
                let want: BTreeSet<i64> = if show_card == ShowCard::Ringing {
                    users.iter().copied().chain([entry.user_id]).collect()
                } else {
                    BTreeSet::new()
                };
                let rest: BTreeSet<i64> = want.difference(&entry.shown).copied().collect();
                if !rest.is_empty() && !entry.finished {
                    self.show_more(&id, entry, rest, &event).await?;
                }
                Ok(Published::Sent)
            }
            LiveEvent::Progress {
                ringing, talking, ..
            } => {
                let Some(mut entry) = existing.filter(|e| !e.call_id.is_empty() && !e.finished)
                else {
                    return Ok(Published::Skipped);
                };
                let want: BTreeSet<i64> = match show_card {
                    ShowCard::Ringing => self.users_of(ringing.iter().chain(talking)),
                    ShowCard::Answered => self.users_of(talking),
                    ShowCard::None => BTreeSet::new(),
                };
                let show: BTreeSet<i64> = want.difference(&entry.shown).copied().collect();
                let show = self.card_users(&entry.call_id, show, &event).await;
                let hide: BTreeSet<i64> = entry
                    .shown
                    .difference(&want)
                    .filter(|u| !show.contains(u))
                    .copied()
                    .collect();
                if show.is_empty() && hide.is_empty() {
                    return Ok(Published::Skipped);
                }
                self.cards(&entry.call_id, &show, &hide)
                    .await
                    .map_err(|e| e.failure())?;
                entry.shown.retain(|u| !hide.contains(u));
                entry.shown.extend(show);
                self.save(&id, entry, false).await?;
                Ok(Published::Sent)
            }
            // The finish (with the cards it closes) goes through the outbox.
            LiveEvent::Hangup { .. } => Ok(Published::Skipped),
        }
    }

    async fn show_more(
        &self,
        id: &str,
        mut entry: Entry,
        users: BTreeSet<i64>,
        event: &LiveEvent,
    ) -> Result<(), CrmFailure> {
        let users = self.card_users(&entry.call_id, users, event).await;
        self.cards(&entry.call_id, &users, &BTreeSet::new())
            .await
            .map_err(|e| e.failure())?;
        entry.shown.extend(users);
        self.save(id, entry, false).await
    }

    /// The user a finished call is finished with: who talked last, else the missed call's
    /// owner (`calls.missed_owner`), else the user it was registered for.
    fn finisher(self: &Arc<Self>, r: &CallRecord, entry: &Entry) -> i64 {
        let code = r
            .code
            .clone()
            .or_else(|| r.rung(self.config.calls.missed_owner, None));
        code.and_then(|c| self.user_of(&c))
            .filter(|u| *u > 0)
            .unwrap_or(entry.user_id)
    }

    /// Registers, from the history, a call whose live register never happened (`SHOW = 0`).
    async fn register_late(self: &Arc<Self>, r: &CallRecord) -> Result<Entry, CrmFailure> {
        let first = match r.direction {
            Direction::Out => r.placed_by.clone().or_else(|| r.code.clone()),
            _ => {
                let mut rings: Vec<_> = r.rings.iter().collect();
                rings.sort_by_key(|x| x.start);
                rings
                    .first()
                    .map(|x| x.extension.clone())
                    .or_else(|| r.code.clone())
            }
        };
        let user = first
            .and_then(|c| self.user_of(&c))
            .or_else(|| r.user_id.filter(|u| *u > 0))
            .or_else(|| self.default_user());
        let Some(user_id) = user else {
            return Err(CrmFailure {
                kind: FailureKind::Blocked,
                message: "no Bitrix24 user for this call: set bitrix24.default_user_id".into(),
            });
        };
        let reg = Registration {
            user_id,
            phone: r.customer_number.clone(),
            kind: if r.direction == Direction::Out {
                TYPE_OUTGOING
            } else {
                TYPE_INCOMING
            },
            start: r.start,
            crm_create: self.config.bitrix24.crm_create,
            // As the live register had it, so that the portal folds a repeat into it.
            line: if r.direction == Direction::Out {
                r.external_phone.clone()
            } else {
                r.did.clone()
            },
            show: false,
            external_id: r.external_id.clone(),
        };
        let full = || self.full(r);
        self.register(
            &r.external_id,
            reg,
            Entry::default(),
            full,
            Stage::CallEnded,
        )
        .await
    }

    async fn deliver(self: Arc<Self>, calls: Vec<(CallRecord, Option<String>)>) -> Vec<Delivery> {
        self.ensure_directory().await;
        let mut out: Vec<Option<Delivery>> = vec![None; calls.len()];
        let mut guards = Vec::with_capacity(calls.len());
        // (index, entry) of the calls that get commands in the batch.
        let mut todo: Vec<(usize, Entry)> = Vec::new();
        for (i, (r, _)) in calls.iter().enumerate() {
            if r.direction == Direction::Internal {
                out[i] = Some(Delivery::Rejected(
                    "internal calls are not sent to Bitrix24".into(),
                ));
                continue;
            }
            guards.push(self.lock(&r.external_id).await);
            let entry = match self.entry(&r.external_id) {
                Some(e) if e.finished && e.record_done => {
                    out[i] = Some(Delivery::Duplicate);
                    continue;
                }
                Some(e) if !e.call_id.is_empty() => e,
                _ => match self.register_late(r).await {
                    Ok(e) => e,
                    Err(f) => {
                        out[i] = Some(delivery_of(f));
                        continue;
                    }
                },
            };
            todo.push((i, entry));
        }
        let mut cmds: Vec<(String, String, Value)> = Vec::new();
        // One recording sent as the file per request (16 of them would make one huge body);
        // the others go as links.
        let mut inline_left = 1usize;
        for (i, entry) in &todo {
            let (r, url) = &calls[*i];
            let finisher = self.finisher(r, entry);
            if !entry.finished {
                let finish = finish_params(&entry.call_id, finisher, r);
                let finish =
                    points::final_params(&self.hooks, &r.external_id, finish, || self.full(r))
                        .await;
                let finisher = finish["USER_ID"].as_i64().unwrap_or(finisher);
                let mut hide: BTreeSet<i64> = entry.shown.clone();
                hide.extend(self.users_of(r.rings.iter().map(|x| &x.extension)));
                hide.extend(self.users_of(r.talk.iter().map(|x| &x.extension)));
                hide.remove(&finisher);
                if !hide.is_empty() {
                    cmds.push((
                        format!("h{i}"),
                        "telephony.externalcall.hide".into(),
                        json!({"CALL_ID": entry.call_id, "USER_ID": hide.iter().collect::<Vec<_>>()}),
                    ));
                }
                cmds.push((
                    format!("f{i}"),
                    "telephony.externalcall.finish".into(),
                    finish,
                ));
            }
            if let Some(record) = self
                .record_params(entry, r, url.as_deref(), &mut inline_left)
                .await
            {
                let record =
                    points::record(&self.hooks, &r.external_id, record, || self.full(r)).await;
                cmds.push((
                    format!("r{i}"),
                    "telephony.externalCall.attachRecord".into(),
                    record,
                ));
            }
        }
        let answer = if cmds.is_empty() {
            Ok(Default::default())
        } else {
            self.client.batch(&cmds, false).await
        };
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                let failure = e.failure();
                tracing::warn!(error = %failure, calls = todo.len(), "Bitrix24 finish batch failed");
                for (i, _) in &todo {
                    out[*i] = Some(delivery_of(failure.clone()));
                }
                return finish_out(out);
            }
        };
        for (i, mut entry) in todo {
            let (r, _) = &calls[i];
            let id = &r.external_id;
            if !entry.finished {
                match answer.errors.get(&format!("f{i}")) {
                    None => {
                        entry.finished = true;
                        if let Some(row) = answer.results.get(&format!("f{i}")) {
                            self.after_finish(r, row).await;
                        }
                    }
                    Some(e) if e.is_call_not_found() => {
                        tracing::info!(id = %id, "Bitrix24 had finished this call already (an earlier answer was lost)");
                        entry.finished = true;
                    }
                    Some(e) => {
                        let failure = e.failure();
                        tracing::warn!(id = %id, error = %failure, "Bitrix24 refused the finish");
                        out[i] = Some(delivery_of(failure));
                        continue;
                    }
                }
                entry.shown.clear();
            }
            let wanted_record = cmds.iter().any(|c| c.0 == format!("r{i}"));
            if !wanted_record {
                entry.record_done = true;
            } else {
                match answer.errors.get(&format!("r{i}")) {
                    None => entry.record_done = true,
                    Some(e) => {
                        let failure = e.failure();
                        if failure.is_retriable() {
                            tracing::warn!(id = %id, error = %failure, "recording not attached yet; will retry");
                        } else {
                            tracing::warn!(id = %id, error = %failure,
                                "Bitrix24 refused the recording; the call stays without it");
                            entry.record_done = true;
                        }
                    }
                }
            }
            let done = entry.record_done;
            let saved = self.save(id, entry, true).await;
            out[i] = Some(match (saved, done) {
                (Err(f), _) => delivery_of(f),
                (Ok(()), true) => Delivery::Delivered,
                (Ok(()), false) => Delivery::RetryLater("recording not attached yet".into()),
            });
        }
        drop(guards);
        finish_out(out)
    }

    /// `customize_activity` and `customize_entity`, once the portal finished the call: the
    /// fields they give are written to the call's activity and to its lead, contact or
    /// company. A failure is logged; the call stays delivered.
    async fn after_finish(&self, r: &CallRecord, row: &Value) {
        let id = &r.external_id;
        if let Some(activity) = id_of(&row["CRM_ACTIVITY_ID"]) {
            let about = json!({"id": activity, "type": "activity", "raw": row});
            let fields =
                points::update_fields(&self.hooks, points::CUSTOMIZE_ACTIVITY, id, about, || {
                    self.full(r)
                })
                .await;
            if !fields.is_empty() {
                let params = json!({"id": activity, "fields": fields});
                if let Err(e) = self.client.call("crm.activity.update", params).await {
                    tracing::warn!(id = %id, error = %e, "customize_activity: Bitrix24 refused the update");
                }
            }
        }
        let kind = row["CRM_ENTITY_TYPE"]
            .as_str()
            .unwrap_or("")
            .to_ascii_lowercase();
        if let (Some(entity), true) = (
            id_of(&row["CRM_ENTITY_ID"]),
            matches!(kind.as_str(), "lead" | "contact" | "company"),
        ) {
            let about = json!({"id": entity, "type": kind});
            let fields =
                points::update_fields(&self.hooks, points::CUSTOMIZE_ENTITY, id, about, || {
                    self.full(r)
                })
                .await;
            if !fields.is_empty() {
                let params = json!({"id": entity, "fields": fields});
                if let Err(e) = self
                    .client
                    .call(&format!("crm.{kind}.update"), params)
                    .await
                {
                    tracing::warn!(id = %id, error = %e, "customize_entity: Bitrix24 refused the update");
                }
            }
        }
    }

    /// `attachRecord`'s parameters, for an answered call with audio whose record is due.
    async fn record_params(
        &self,
        entry: &Entry,
        r: &CallRecord,
        url: Option<&str>,
        inline_left: &mut usize,
    ) -> Option<Value> {
        if entry.record_done || r.outcome != Outcome::Answered {
            return None;
        }
        let url = url?;
        let name = record_name(r, url);
        if self.config.bitrix24.record_upload == RecordUpload::File && *inline_left > 0 {
            if let Some(content) = self.record_file(r).await {
                *inline_left -= 1;
                return Some(json!({
                    "CALL_ID": entry.call_id,
                    "FILENAME": name,
                    "FILE_CONTENT": content,
                }));
            }
        }
        Some(json!({"CALL_ID": entry.call_id, "FILENAME": name, "RECORD_URL": url}))
    }

    /// The recording as base64, when it is a wav or mp3 file within `record_max_bytes`.
    async fn record_file(&self, r: &CallRecord) -> Option<String> {
        use base64::Engine;
        let path = r.recordings.last()?;
        let lower = path.to_ascii_lowercase();
        if !(lower.ends_with(".wav") || lower.ends_with(".mp3")) {
            return None;
        }
        let meta = tokio::fs::metadata(path).await.ok()?;
        if meta.len() > self.config.bitrix24.record_max_bytes {
            return None;
        }
        let bytes = tokio::fs::read(path).await.ok()?;
        Some(base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    /// Forgets calls done long ago.
    fn prune(&self) {
        let Some(state) = &self.state else {
            return;
        };
        let Ok(all) = state.all(CALL_PREFIX) else {
            return;
        };
        let now = now_ms();
        for (k, v) in all {
            let Ok(e) = serde_json::from_slice::<Entry>(&v) else {
                let _ = state.remove(&k);
                continue;
            };
            if now - e.at > KEEP_DONE_MS && (e.finished || now - e.at > 2 * KEEP_DONE_MS) {
                let _ = state.remove(&k);
            }
        }
    }
}

/// The file name Bitrix24 shows (it wants `.wav` or `.mp3`).
fn record_name(r: &CallRecord, url: &str) -> String {
    let from_path = r
        .recordings
        .last()
        .and_then(|p| std::path::Path::new(p).file_name())
        .map(|n| n.to_string_lossy().into_owned());
    let name = from_path.unwrap_or_else(|| format!("{}.mp3", r.external_id));
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".wav") || lower.ends_with(".mp3") {
        return name;
    }
    // A converted recording is served as mp3.
    let ext = if url.contains(".wav") { "wav" } else { "mp3" };
    format!(
        "{}.{ext}",
        name.rsplit_once('.').map_or(name.as_str(), |p| p.0)
    )
}

fn finish_out(out: Vec<Option<Delivery>>) -> Vec<Delivery> {
    out.into_iter()
        .map(|d| d.unwrap_or(Delivery::RetryLater("not attempted".into())))
        .collect()
}

fn delivery_of(f: CrmFailure) -> Delivery {
    match f.kind {
        FailureKind::Transient => Delivery::RetryLater(f.message),
        FailureKind::Blocked | FailureKind::NotConfigured => Delivery::Blocked(f.message),
        FailureKind::Refused => Delivery::Rejected(f.message),
    }
}

fn no_user(codes: &[String]) -> CrmFailure {
    CrmFailure {
        kind: FailureKind::Refused,
        message: format!(
            "no Bitrix24 user has extension(s) {codes:?} and bitrix24.default_user_id is not set"
        ),
    }
}

impl Crm for Bitrix24 {
    fn name(&self) -> &'static str {
        "Bitrix24"
    }

    fn url(&self) -> &str {
        &self.inner.portal
    }

    fn is_configured(&self) -> bool {
        self.inner.client.is_configured()
    }

    fn unconfigured(&self) -> &'static str {
        "bitrix24.webhook_url is empty (or, for OAuth, bitrix24.portal, client_id, client_secret)"
    }

    fn successes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.client.successes()
    }

    fn publish<'a>(&'a self, event: &'a LiveEvent) -> BoxFuture<'a, Result<Published, CrmFailure>> {
        // In a task of its own: a caller that stops waiting (the live deadline) does not cut
        // a register off between the portal's answer and writing the CALL_ID down.
        let task = tokio::spawn(self.inner.clone().publish(event.clone()));
        async move {
            task.await.unwrap_or_else(|e| {
                Err(CrmFailure {
                    kind: FailureKind::Transient,
                    message: format!("Bitrix24 event task ended: {e}"),
                })
            })
        }
        .boxed()
    }

    fn batch_limit(&self) -> usize {
        CALLS_PER_DELIVERY
    }

    fn deliver<'a>(&'a self, calls: &'a [Finished<'a>]) -> BoxFuture<'a, Vec<Delivery>> {
        let owned: Vec<(CallRecord, Option<String>)> = calls
            .iter()
            .map(|f| (f.record.clone(), f.record_url.map(str::to_string)))
            .collect();
        let n = owned.len();
        let task = tokio::spawn(self.inner.clone().deliver(owned));
        async move {
            task.await.unwrap_or_else(|e| {
                vec![Delivery::RetryLater(format!("Bitrix24 task ended: {e}")); n]
            })
        }
        .boxed()
    }

    fn shape(&self) -> String {
        let c = &self.inner.config;
        format!(
            "{:?}|{:?}|{}|{:?}|{}",
            c.users,
            c.phone,
            c.bitrix24.default_user_id,
            c.bitrix24.record_upload,
            c.bitrix24.portal_origin()
        )
    }

    fn timezone(&self) -> BoxFuture<'_, jiff::tz::TimeZone> {
        let tz = self.inner.tz();
        async move { tz }.boxed()
    }

    fn responsible<'a>(
        &'a self,
        phone: &'a str,
        _ignore_status: bool,
    ) -> BoxFuture<'a, Result<Option<Responsible>, CrmFailure>> {
        // Detached: the router's deadline must not cut an OAuth refresh off half-way.
        let inner = self.inner.clone();
        let phone = phone.to_string();
        detached(async move {
            let found = inner
                .client
                .call(
                    "telephony.externalCall.searchCrmEntities",
                    json!({"PHONE_NUMBER": phone}),
                )
                .await
                .map_err(|e| e.failure())?;
            let Some(first) = found
                .as_array()
                .and_then(|a| a.iter().find(|e| id_of(&e["ASSIGNED_BY_ID"]).is_some()))
            else {
                return Ok(None);
            };
            let user_id = id_of(&first["ASSIGNED_BY_ID"]);
            let inner_phone = first["ASSIGNED_BY"]["USER_PHONE_INNER"]
                .as_str()
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_string);
            let code = user_id
                .and_then(|u| inner.directory.code_of(u))
                .or(inner_phone);
            Ok(Some(Responsible { code, user_id }))
        })
        .boxed()
    }

    fn directory(&self) -> Vec<DirectoryEntry> {
        self.inner
            .directory
            .entries()
            .into_iter()
            .map(|(user_id, code)| DirectoryEntry { user_id, code })
            .collect()
    }

    fn register(&self) -> BoxFuture<'_, Result<(), CrmFailure>> {
        async move {
            let inner = &self.inner;
            let scopes = inner
                .client
                .call("scope", json!({}))
                .await
                .map_err(|e| e.failure())?;
            let granted: Vec<&str> = scopes
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let missing: Vec<&str> = ["telephony", "crm", "user"]
                .into_iter()
                .filter(|s| {
                    !granted
                        .iter()
                        .any(|g| g == s || g.starts_with(&format!("{s}_")))
                })
                .collect();
            if !missing.is_empty() {
                return Err(CrmFailure {
                    kind: FailureKind::Blocked,
                    message: format!(
                        "the Bitrix24 webhook or application lacks the scopes {}",
                        missing.join(", ")
                    ),
                });
            }
            inner
                .directory
                .reload(&inner.client)
                .await
                .map_err(|e| e.failure())?;
            Ok(())
        }
        .boxed()
    }

    fn check(&self) -> BoxFuture<'_, Result<String, String>> {
        async move {
            let portal = &self.inner.portal;
            if !self.is_configured() {
                return Err("Bitrix24: not configured (bitrix24.webhook_url, or portal, client_id and client_secret)".into());
            }
            match self.register().await {
                Ok(()) => Ok(format!(
                    "Bitrix24 {portal} reachable, credentials accepted; scopes telephony, crm, user; {} users with extensions",
                    self.inner.directory.entries().len()
                )),
                Err(e) => Err(format!("Bitrix24 {portal}: {e}")),
            }
        }
        .boxed()
    }

    fn maintain(&self) -> BoxFuture<'_, ()> {
        async move {
            let inner = &self.inner;
            if inner.client.is_configured()
                && inner.directory.stale(inner.config.bitrix24.users_refresh)
            {
                if let Err(e) = inner.directory.reload(&inner.client).await {
                    tracing::warn!(error = %e, "cannot reload the Bitrix24 user directory; keeping the last one");
                }
            }
            inner.prune();
        }
        .boxed()
    }

    fn requests(&self) -> Option<&crate::base::latency::CrmRequests> {
        self.inner.client.requests()
    }

    fn pacing(&self) -> Duration {
        self.inner.client.pacing()
    }

    fn call_ref<'a>(
        &'a self,
        external_id: &'a str,
        within: Duration,
    ) -> BoxFuture<'a, Option<String>> {
        async move {
            let mut rx = self.inner.registered.subscribe();
            let wait = async {
                loop {
                    if let Some(e) = self
                        .inner
                        .entry(external_id)
                        .filter(|e| !e.call_id.is_empty())
                    {
                        return e.call_id;
                    }
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            };
            tokio::time::timeout(within, wait).await.ok()
        }
        .boxed()
    }

    fn adopt<'a>(
        &'a self,
        external_id: &'a str,
        crm_ref: &'a str,
        user_id: i64,
    ) -> BoxFuture<'a, Result<(), CrmFailure>> {
        async move {
            let inner = &self.inner;
            let _turn = inner.lock(external_id).await;
            let entry = Entry {
                call_id: crm_ref.to_string(),
                user_id,
                by_portal: !crm_ref.is_empty(),
                callback: crm_ref.is_empty(),
                // The portal opened its card when it registered the call.
                shown: if crm_ref.is_empty() {
                    BTreeSet::new()
                } else {
                    BTreeSet::from([user_id])
                },
                ..Entry::default()
            };
            inner.save(external_id, entry, true).await?;
            inner.registered.send_modify(|n| *n += 1);
            Ok(())
        }
        .boxed()
    }

    fn passthrough<'a>(
        &'a self,
        method: &'a str,
        params: Value,
    ) -> BoxFuture<'a, Result<(u16, Vec<u8>), CrmFailure>> {
        // Detached: a caller that hangs up must not cut an OAuth refresh off half-way.
        let inner = self.inner.clone();
        let method = method.to_string();
        detached(async move {
            inner
                .client
                .raw(&method, params)
                .await
                .map_err(|e| e.failure())
        })
        .boxed()
    }
}

/// Runs `f` in a task of its own and waits for it: dropping the waiter does not cancel it.
async fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, CrmFailure>> + Send + 'static,
) -> Result<T, CrmFailure> {
    tokio::spawn(f).await.unwrap_or_else(|e| {
        Err(CrmFailure {
            kind: FailureKind::Transient,
            message: format!("Bitrix24 task ended: {e}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_end_in_wav_or_mp3() {
        let mut r = CallRecord::sample("pbx-1");
        r.recordings = vec!["/rec/a/call-1.wav".into()];
        assert_eq!(record_name(&r, "https://x/records/1"), "call-1.wav");
        r.recordings = vec!["/rec/a/call-1.gsm".into()];
        assert_eq!(record_name(&r, "https://x/records/1"), "call-1.mp3");
        r.recordings.clear();
        assert_eq!(record_name(&r, "https://x/records/1"), "pbx-1.mp3");
    }

    #[test]
    fn an_entry_of_an_older_shape_loads() {
        let e: Entry =
            serde_json::from_str(r#"{"call_id":"externalCall.1","user_id":11}"#).unwrap();
        assert!(!e.finished && e.shown.is_empty());
    }
}
