//! retailCRM behind the CRM port: live events are `telephony/call/event`, finished calls go
//! to `telephony/calls/upload` in batches of at most 50 (a batch refused for its content is
//! halved until the refused calls are found; the others go through), the responsible manager
//! is `telephony/manager`, registration is the integration module. With
//! `crm.missed_call_tasks`, an inbound call nobody answered becomes one `tasks/create` task,
//! created after the call was taken, once (markers in the adapter's state tree).

use std::sync::Arc;

use futures_util::future::{join_all, BoxFuture};
use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::OnceCell;

use super::mapping::{to_call, to_call_event};
use super::points;
use super::wire::{Call, Task, MAX_CALLS_PER_UPLOAD};
use super::{registration, CrmClient, CrmError};
use crate::base::secret::Secret;
use crate::calls::full::call_full;
use crate::calls::{CallRecord, LiveEvent};
use crate::config::Config;
use crate::crm::port::{
    Crm, CrmFailure, Delivery, DirectoryEntry, FailureKind, Finished, Published, Responsible,
};
use crate::crm::tasks::{self, PROCESS_TASK_CREATION_PARAMS};
use crate::hooks::Hooks;
use crate::phone::PhoneBook;
use crate::store::crm_state::CrmState;

/// The state tree's key of a call's follow-up task: `owed` until retailCRM took the task,
/// then `done`.
fn task_key(external_id: &str) -> String {
    format!("task:{external_id}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskMark {
    Owed,
    Done,
}

impl TaskMark {
    fn bytes(self) -> &'static [u8] {
        match self {
            TaskMark::Owed => b"owed",
            TaskMark::Done => b"done",
        }
    }
}

/// The state tree's key of a task that failed for a transient reason: what to send again.
fn retry_key(external_id: &str) -> String {
    format!("{RETRY_PREFIX}{external_id}")
}

const RETRY_PREFIX: &str = "task-retry:";
/// A task that could not be created for this long is given up (logged as an error).
const RETRY_GIVE_UP_MS: i64 = 24 * 3600 * 1000;
/// How many owed tasks one sweep tries.
const RETRY_PER_SWEEP: usize = 20;

/// A task waiting to be created again.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct TaskRetry {
    task: Task,
    attempts: u32,
    /// Unix ms of the first failure, and when to try next.
    since: i64,
    next_at: i64,
}

/// What became of a call's follow-up task.
enum TaskOutcome {
    /// Created, or not to be created (the hook said so, nobody to give it to, refused for
    /// good): never tried again.
    Settled,
    /// A transient failure: the task is kept to be tried again by [`RetailCrm::retry_tasks`];
    /// the call itself is delivered.
    Retry(String, Task),
}

/// The retailCRM adapter. Cheap to share.
pub struct RetailCrm {
    client: CrmClient,
    config: Arc<Config>,
    /// The module's clientId, presented back by retailCRM in its callbacks.
    client_id: Secret,
    tz: OnceCell<jiff::tz::TimeZone>,
    /// retailCRM's own customisation points (`process_call_event_params`,
    /// `process_upload_params`) and `process_task_creation_params`.
    hooks: Hooks,
    /// One task creation pass at a time (after an upload, or a sweep of owed tasks): a task
    /// is never sent twice side by side.
    tasks_turn: tokio::sync::Mutex<()>,
    /// Where the follow-up tasks' markers are kept; `None` (one-shot tools): no tasks.
    state: Option<CrmState>,
    /// For `call_full`.
    phones: PhoneBook,
}

impl RetailCrm {
    pub fn new(config: Arc<Config>, client_id: Secret) -> Result<RetailCrm, CrmError> {
        Ok(Self::with_client(
            CrmClient::new(&config.crm)?,
            config,
            client_id,
        ))
    }

    pub fn with_client(client: CrmClient, config: Arc<Config>, client_id: Secret) -> RetailCrm {
        RetailCrm {
            client,
            client_id,
            tz: OnceCell::new(),
            hooks: Hooks::none(),
            tasks_turn: tokio::sync::Mutex::new(()),
            state: None,
            phones: PhoneBook::new(&config.phone),
            config,
        }
    }

    /// Where the adapter remembers what must survive a restart (the follow-up tasks).
    pub fn with_state(mut self, state: Option<CrmState>) -> RetailCrm {
        self.state = state;
        self
    }

    /// The customisation points this adapter calls.
    pub fn with_hooks(mut self, hooks: Hooks) -> RetailCrm {
        self.hooks = hooks;
        self
    }

    /// The API client underneath (the CLI's and the tests' direct calls).
    pub fn client(&self) -> &CrmClient {
        &self.client
    }

    /// The state tree, when missed calls become tasks.
    fn task_state(&self) -> Option<&CrmState> {
        if !self.config.crm.missed_call_tasks {
            return None;
        }
        if self.state.is_none() {
            tracing::debug!("no state tree: no follow-up tasks from this process");
        }
        self.state.as_ref()
    }

    fn task_mark(state: &CrmState, id: &str) -> Option<TaskMark> {
        match state.get(&task_key(id)) {
            Ok(Some(v)) if v == TaskMark::Done.bytes() => Some(TaskMark::Done),
            Ok(Some(_)) => Some(TaskMark::Owed),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(%id, error = %e, "cannot read the follow-up task's marker");
                None
            }
        }
    }

    /// Before the upload, durably: the missed calls of the batch are owed a task (unless one
    /// was created already), so that a crash between the upload and the task loses nothing.
    async fn owe_tasks(&self, records: impl Iterator<Item = &CallRecord>) {
        let Some(state) = self.task_state() else {
            return;
        };
        let mut wrote = false;
        for r in records.filter(|r| tasks::is_missed(r)) {
            if Self::task_mark(state, &r.external_id).is_none() {
                match state.put(&task_key(&r.external_id), TaskMark::Owed.bytes()) {
                    Ok(()) => wrote = true,
                    Err(e) => {
                        tracing::warn!(id = %r.external_id, error = %e, "cannot record the follow-up task as owed")
                    }
                }
            }
        }
        if wrote {
            if let Err(e) = state.flush().await {
                tracing::warn!(error = %e, "cannot flush the follow-up tasks' markers");
            }
        }
    }

    /// After the upload: the tasks owed by the calls the CRM took, side by side. A task that
    /// failed for a transient reason stays owed and is kept to be tried again (by
    /// [`RetailCrm::retry_tasks`], or when its call comes again); its call is delivered all the
    /// same, so that an outage of tasks alone never holds up the history. The markers are
    /// flushed before the deliveries are reported.
    async fn create_tasks(
        &self,
        calls: &[Finished<'_>],
        at: &[usize],
        items: &[Call],
        out: &mut [Option<Delivery>],
        tz: &jiff::tz::TimeZone,
        local: &jiff::tz::TimeZone,
    ) {
        let Some(state) = self.task_state() else {
            return;
        };
        let _turn = self.tasks_turn.lock().await;
        let due: Vec<(usize, &Call)> = at
            .iter()
            .zip(items)
            .filter(|(i, _)| tasks::is_missed(calls[**i].record))
            .filter_map(|(i, item)| {
                let mark = Self::task_mark(state, &item.external_id);
                let owed = match &out[*i] {
                    Some(Delivery::Delivered) => mark != Some(TaskMark::Done),
                    Some(Delivery::Duplicate) => mark == Some(TaskMark::Owed),
                    _ => false,
                };
                owed.then_some((*i, item))
            })
            .collect();
        if due.is_empty() {
            return;
        }
        let outcomes = join_all(
            due.iter()
                .map(|(i, item)| self.missed_call_task(calls[*i].record, item, tz, local)),
        )
        .await;
        for ((_, item), outcome) in due.into_iter().zip(outcomes) {
            let id = &item.external_id;
            let mark = match outcome {
                TaskOutcome::Settled => {
                    let _ = state.remove(&retry_key(id));
                    TaskMark::Done
                }
                TaskOutcome::Retry(why, task) => {
                    tracing::warn!(%id, reason = %why, "follow-up task not created yet; it will be tried again");
                    self.keep_for_retry(state, id, task, None);
                    TaskMark::Owed
                }
            };
            if let Err(e) = state.put(&task_key(id), mark.bytes()) {
                tracing::warn!(%id, error = %e, "cannot record the follow-up task's marker");
            }
        }
        if let Err(e) = state.flush().await {
            tracing::error!(error = %e, "cannot flush the follow-up tasks' markers: a restart may create some again");
        }
    }

    /// Keeps `task` to be tried again (after a backoff), counting the attempt.
    fn keep_for_retry(&self, state: &CrmState, id: &str, task: Task, before: Option<TaskRetry>) {
        let now = crate::base::clock::now_ms();
        let (attempts, since) = before.map_or((0, now), |b| (b.attempts + 1, b.since));
        let h = &self.config.history;
        let wait = crate::base::backoff::backoff(attempts, h.retry_base, h.retry_max);
        let entry = TaskRetry {
            task,
            attempts,
            since,
            next_at: now + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX),
        };
        let stored = serde_json::to_vec(&entry)
            .map_err(|e| e.to_string())
            .and_then(|bytes| state.put(&retry_key(id), &bytes).map_err(|e| e.to_string()));
        if let Err(e) = stored {
            tracing::error!(%id, error = %e, "cannot keep the follow-up task for another try");
        }
    }

    /// Tries again the follow-up tasks that failed for a transient reason and are due (at most
    /// [`RETRY_PER_SWEEP`] per call); one failing for a day is given up with an error line.
    pub async fn retry_tasks(&self) {
        let Some(state) = self.task_state() else {
            return;
        };
        let _turn = self.tasks_turn.lock().await;
        let entries = match state.all(RETRY_PREFIX) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the follow-up tasks to try again");
                return;
            }
        };
        if entries.is_empty() {
            return;
        }
        let now = crate::base::clock::now_ms();
        let mut changed = false;
        // `all` gives the keys without the prefix: the calls' ids.
        for (id, bytes) in entries.into_iter().take(RETRY_PER_SWEEP) {
            let key = retry_key(&id);
            let Ok(entry) = serde_json::from_slice::<TaskRetry>(&bytes) else {
                tracing::warn!(%id, "a follow-up task kept for another try cannot be read; dropped");
                let _ = state.remove(&key);
                changed = true;
                continue;
            };
            if entry.next_at > now {
                continue;
            }
            changed = true;
            match self.client.tasks_create(&entry.task).await {
                Err(e) if e.is_retriable() => {
                    if now - entry.since > RETRY_GIVE_UP_MS {
                        tracing::error!(%id, error = %e, attempts = entry.attempts + 1,
                            "follow-up task given up: retailCRM did not take it for a day");
                        let _ = state.remove(&key);
                        let _ = state.put(&task_key(&id), TaskMark::Done.bytes());
                    } else {
                        tracing::warn!(%id, error = %e, "follow-up task not created yet; it will be tried again");
                        self.keep_for_retry(state, &id, entry.task.clone(), Some(entry));
                    }
                }
                answer => {
                    match answer {
                        Ok(a) => {
                            tracing::info!(%id, task = ?a.id, "follow-up task created for a missed call")
                        }
                        Err(e) => {
                            tracing::error!(%id, error = %e, "follow-up task refused by retailCRM; not retried")
                        }
                    }
                    let _ = state.remove(&key);
                    let _ = state.put(&task_key(&id), TaskMark::Done.bytes());
                }
            }
        }
        if changed {
            if let Err(e) = state.flush().await {
                tracing::error!(error = %e, "cannot flush the follow-up tasks' markers: a restart may create some again");
            }
        }
    }

    /// The retailCRM user a missed call's task is for by default: the call's user, else the
    /// user of its extension (`[[users]]`, the codes retailCRM maps to users).
    fn manager_of(&self, item: &Call) -> Option<i64> {
        item.user_id.or_else(|| {
            let code = item.code.as_deref()?;
            self.config
                .users
                .iter()
                .find(|u| u.code == code)
                .and_then(|u| i64::try_from(u.user_id).ok())
        })
    }

    /// Builds the task of one missed call (through `process_task_creation_params`) and
    /// creates it.
    async fn missed_call_task(
        &self,
        record: &CallRecord,
        item: &Call,
        tz: &jiff::tz::TimeZone,
        local: &jiff::tz::TimeZone,
    ) -> TaskOutcome {
        let id = item.external_id.as_str();
        let draft = tasks::draft(&self.config.crm, record, &item.phone, self.manager_of(item));
        let full = if self.hooks.is_configured(PROCESS_TASK_CREATION_PARAMS) {
            call_full(record, &self.phones, local)
        } else {
            Value::Null
        };
        let Some(task) = tasks::task_creation_params(&self.hooks, draft, &full, id).await else {
            return TaskOutcome::Settled;
        };
        let Some(performer_id) = task.responsible_id else {
            tracing::warn!(%id, code = ?item.code,
                "no follow-up task for this missed call: no retailCRM user for it (no user id, \
                 its extension is not in [[users]]); set crm.missed_call_task_performer");
            return TaskOutcome::Settled;
        };
        let wire = Task {
            text: task.text,
            commentary: task.commentary,
            datetime: Some(
                task.due
                    .to_zoned(tz.clone())
                    .strftime("%Y-%m-%d %H:%M")
                    .to_string(),
            ),
            performer_id,
            phone: task.phone,
        };
        match self.client.tasks_create(&wire).await {
            Err(e) if e.is_retriable() => TaskOutcome::Retry(e.to_string(), wire),
            Ok(answer) => {
                tracing::info!(%id, task = ?answer.id, performer_id, "follow-up task created for a missed call");
                TaskOutcome::Settled
            }
            Err(e @ CrmError::Decode { .. }) => {
                // retailCRM said yes in a form we did not understand: taken as created, since
                // creating it again could give the manager two tasks.
                tracing::warn!(%id, error = %e, "follow-up task: answer not understood; taken as created");
                TaskOutcome::Settled
            }
            Err(e) => {
                tracing::error!(%id, error = %e, "follow-up task refused by retailCRM; not retried");
                TaskOutcome::Settled
            }
        }
    }

    /// Uploads calls that retailCRM should take; on a validation error, halves the batch to
    /// find the calls it refuses.
    fn upload<'a>(&'a self, calls: &'a [Call]) -> BoxFuture<'a, Vec<Delivery>> {
        async move {
            match self.client.calls_upload(calls).await {
                Ok(answer) => {
                    if !answer.duplicate_calls.is_empty() {
                        tracing::info!(
                            duplicates = answer.duplicate_calls.len(),
                            "retailCRM already had some calls of the batch"
                        );
                    }
                    // `duplicateCalls` lists the externalIds retailCRM already had.
                    calls
                        .iter()
                        .map(|c| {
                            if answer.duplicate_calls.contains(&c.external_id) {
                                Delivery::Duplicate
                            } else {
                                Delivery::Delivered
                            }
                        })
                        .collect()
                }
                Err(e @ CrmError::Validation { .. }) => {
                    if calls.len() == 1 {
                        tracing::warn!(id = %calls[0].external_id, error = %e, "call rejected by retailCRM; set aside as dead");
                        return vec![Delivery::Rejected(e.to_string())];
                    }
                    let (left, right) = calls.split_at(calls.len() / 2);
                    let mut out = self.upload(left).await;
                    if out.iter().any(|d| matches!(d, Delivery::RetryLater(_) | Delivery::Blocked(_))) {
                        // The CRM stopped taking calls: the other half waits too.
                        let why = out.iter().find_map(|d| match d {
                            Delivery::RetryLater(w) => Some(Delivery::RetryLater(w.clone())),
                            Delivery::Blocked(w) => Some(Delivery::Blocked(w.clone())),
                            _ => None,
                        });
                        out.extend(right.iter().map(|_| why.clone().unwrap_or(Delivery::RetryLater(String::new()))));
                        return out;
                    }
                    out.extend(self.upload(right).await);
                    out
                }
                Err(
                    e @ (CrmError::Auth { .. }
                    | CrmError::AccountNotFound { .. }
                    | CrmError::NotConfigured
                    | CrmError::Api { .. }),
                ) => vec![Delivery::Blocked(e.to_string()); calls.len()],
                Err(e) => vec![Delivery::RetryLater(e.to_string()); calls.len()],
            }
        }
        .boxed()
    }
}

impl CrmError {
    /// The class of a failure, as the CRM port states it.
    pub fn failure(&self) -> CrmFailure {
        let kind = match self {
            CrmError::NotConfigured => FailureKind::NotConfigured,
            CrmError::Transport { .. } | CrmError::RateLimited { .. } | CrmError::Server { .. } => {
                FailureKind::Transient
            }
            CrmError::Auth { .. } | CrmError::AccountNotFound { .. } | CrmError::Api { .. } => {
                FailureKind::Blocked
            }
            CrmError::Validation { .. }
            | CrmError::Decode { .. }
            | CrmError::TooManyCalls { .. } => FailureKind::Refused,
        };
        CrmFailure {
            kind,
            message: self.to_string(),
        }
    }
}

impl Crm for RetailCrm {
    fn name(&self) -> &'static str {
        "retailCRM"
    }

    fn url(&self) -> &str {
        self.client.base_url()
    }

    fn is_configured(&self) -> bool {
        self.client.is_configured()
    }

    fn successes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.client.successes()
    }

    fn publish<'a>(&'a self, event: &'a LiveEvent) -> BoxFuture<'a, Result<Published, CrmFailure>> {
        async move {
            let Some(event) = to_call_event(&self.config, event) else {
                return Ok(Published::Skipped);
            };
            // The hook gets half of an event's deadline; past it the event goes as mapped.
            let budget = self.config.calls.live_event_deadline / 2;
            let event = if self.hooks.is_configured(points::PROCESS_CALL_EVENT_PARAMS) {
                let hook = points::call_event_params(&self.hooks, event.clone());
                tokio::time::timeout(budget, hook).await.unwrap_or(event)
            } else {
                event
            };
            let answer = self.client.call_event(&event).await.map_err(|e| e.failure())?;
            if !answer.not_exist_codes.is_empty() {
                tracing::warn!(codes = ?answer.not_exist_codes, "retailCRM knows no users with these extension codes");
            }
            Ok(Published::Sent)
        }
        .boxed()
    }

    fn batch_limit(&self) -> usize {
        MAX_CALLS_PER_UPLOAD
    }

    fn deliver<'a>(&'a self, calls: &'a [Finished<'a>]) -> BoxFuture<'a, Vec<Delivery>> {
        async move {
            let tz = self.timezone().await;
            let local = jiff::tz::TimeZone::system();
            // The batch's hooks run side by side; the batch waits for them (each has its timeout).
            let items = join_all(calls.iter().map(|f| {
                let call = to_call(&self.config, f.record, f.record_url, &tz);
                points::upload_params(&self.hooks, call, || {
                    call_full(f.record, &self.phones, &local)
                })
            }))
            .await;
            let mut out: Vec<Option<Delivery>> = vec![None; calls.len()];
            let mut sendable = Vec::with_capacity(calls.len());
            let mut at = Vec::with_capacity(calls.len());
            for (i, (f, call)) in calls.iter().zip(items).enumerate() {
                match call.problem() {
                    Some(why) => {
                        tracing::warn!(id = %f.record.external_id, reason = %why, "call held: retailCRM would reject it");
                        out[i] = Some(Delivery::Held(why));
                    }
                    None => {
                        sendable.push(call);
                        at.push(i);
                    }
                }
            }
            if !sendable.is_empty() {
                self.owe_tasks(at.iter().map(|i| calls[*i].record)).await;
                for (i, d) in at.iter().zip(self.upload(&sendable).await) {
                    out[*i] = Some(d);
                }
                self.create_tasks(calls, &at, &sendable, &mut out, &tz, &local)
                    .await;
            }
            out.into_iter()
                .map(|d| d.unwrap_or(Delivery::RetryLater("not attempted".into())))
                .collect()
        }
        .boxed()
    }

    fn shape(&self) -> String {
        // In this order since the first fingerprints were stored: another order would give
        // every dead call another try at the next start.
        let c = &self.config;
        format!(
            "{:?}|{:?}|{:?}|{}|{}|{}",
            c.users, c.external_phones, c.phone, c.crm.url, c.crm.site, c.crm.module_code
        )
    }

    fn timezone(&self) -> BoxFuture<'_, jiff::tz::TimeZone> {
        async move {
            self.tz
                .get_or_init(|| async {
                    let configured = self.config.crm.timezone.trim();
                    let name = if configured.is_empty() {
                        match self.client.settings().await {
                            Ok(s) => s.timezone().unwrap_or_default(),
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot read the CRM's time zone; using UTC (set crm.timezone)");
                                String::new()
                            }
                        }
                    } else {
                        configured.to_string()
                    };
                    if name.is_empty() {
                        return jiff::tz::TimeZone::UTC;
                    }
                    jiff::tz::TimeZone::get(&name).unwrap_or_else(|e| {
                        tracing::warn!(timezone = %name, error = %e, "unknown time zone; using UTC");
                        jiff::tz::TimeZone::UTC
                    })
                })
                .await
                .clone()
        }
        .boxed()
    }

    fn responsible<'a>(
        &'a self,
        phone: &'a str,
        ignore_status: bool,
    ) -> BoxFuture<'a, Result<Option<Responsible>, CrmFailure>> {
        async move {
            let answer = self
                .client
                .telephony_manager(phone, false, ignore_status)
                .await
                .map_err(|e| e.failure())?;
            Ok(answer.manager.map(|m| Responsible {
                code: m.code.filter(|c| !c.is_empty()),
                user_id: m.id,
            }))
        }
        .boxed()
    }

    fn directory(&self) -> Vec<DirectoryEntry> {
        self.config
            .users
            .iter()
            .map(|u| DirectoryEntry {
                user_id: i64::try_from(u.user_id).unwrap_or(i64::MAX),
                code: u.code.clone(),
            })
            .collect()
    }

    fn register(&self) -> BoxFuture<'_, Result<(), CrmFailure>> {
        async move {
            registration::register(&self.client, &self.config, &self.client_id)
                .await
                .map(|_| ())
                .map_err(|e| e.failure())
        }
        .boxed()
    }

    fn maintain(&self) -> BoxFuture<'_, ()> {
        self.retry_tasks().boxed()
    }

    fn requests(&self) -> Option<&crate::base::latency::CrmRequests> {
        Some(self.client.requests())
    }

    fn check(&self) -> BoxFuture<'_, Result<String, String>> {
        async move {
            let url = &self.config.crm.url;
            if !self.client.is_configured() {
                return Err(format!("CRM {url}: crm.api_key is empty"));
            }
            let c = self
                .client
                .credentials()
                .await
                .map_err(|e| format!("CRM {url}: {e}"))?;
            let mut granted: Vec<&str> = c.scopes.iter().map(String::as_str).collect();
            if granted.is_empty() {
                granted = c.credentials.iter().map(String::as_str).collect();
            }
            let telephony = granted.iter().any(|s| s.contains("telephony"));
            let modules = granted.iter().any(|s| s.contains("integration"));
            let mut text = format!(
                "CRM {url} reachable, key accepted; scopes: {}",
                granted.join(", ")
            );
            if !c.sites_available.is_empty() {
                text.push_str(&format!("; shops: {}", c.sites_available.join(", ")));
            }
            if telephony && modules {
                return Ok(text);
            }
            text.push_str("; missing access to");
            if !telephony {
                text.push_str(" telephony");
            }
            if !modules {
                text.push_str(" integration modules");
            }
            Err(text)
        }
        .boxed()
    }
}
