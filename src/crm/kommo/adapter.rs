//! Kommo behind the CRM port (API v4).
//!
//! - **History**: each finished call becomes one `POST /api/v4/calls` item (one call per
//!   request: how Kommo answers a batch mixing known and unknown numbers is not documented),
//!   with our externalId as `uniq`, the talk seconds, the signed recording link, the start as
//!   `created_at`, and the call's Kommo user as `responsible_user_id` and `created_by`. The
//!   outbox hands a call over once its recording settled, so the link is final: a Kommo call
//!   cannot be changed later.
//! - **Unknown callers**: Kommo refuses a call whose number no contact or company has (400
//!   "Entity not found"). Then, per `kommo.unknown_caller`: `unsorted` — an inbound call
//!   becomes an incoming lead (`leads/unsorted/sip`, the call as its event, a lead and a
//!   contact with it); `contact` (and outbound calls under `unsorted`) — a contact with the
//!   number is created (its id kept, so a retry does not create a second), then the call is
//!   logged again; `skip` — the call is held, with a log line.
//! - **Exactly once**: Kommo does not deduplicate. What it accepted is written and flushed to
//!   the adapter's state right after its answer (`kommo:call:<externalId>`); a delivery of a
//!   call already there is a duplicate and sends nothing. A call is marked `sending` (flushed)
//!   before its request: when a crash or a lost answer leaves that mark, the call is sent
//!   again with a warn line (a lost call is worse than a rare double).
//! - **Missed calls** (`kommo.missed_call_tasks`): an inbound call nobody answered gets one
//!   follow-up task (`POST /api/v4/tasks`, type 1) on the lead or contact the call went to, for
//!   the call's user; marked `owed` before and `done` after; a transient failure is retried by
//!   [`Crm::maintain`], given up after a day.
//! - **Pop-ups** without the widget: `POST /api/v2/events` `phone_call` to the users whose
//!   extensions ring (`[[users]]`).
//! - **Routing**: `GET /api/v4/contacts?query=` (the number, then its last 10 digits: the search
//!   is textual), keeping only contacts whose PHONE values end in the same 10 digits; their
//!   `responsible_user_id` → the extension in `[[users]]`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::mapping::{
    call_item, contact_for, contact_has, lead_for, tail_digits, unsorted_item, CallContext,
};
use super::points;
use super::{KommoClient, KommoError};
use crate::base::clock::now_ms;
use crate::calls::full::call_full;
use crate::calls::{CallRecord, Direction, LiveEvent};
use crate::config::{Config, CrmConfig, UnknownCaller};
use crate::crm::port::{
    Crm, CrmFailure, Delivery, DirectoryEntry, FailureKind, Finished, Published, Responsible,
};
use crate::crm::tasks;
use crate::hooks::Hooks;
use crate::phone::PhoneBook;
use crate::store::crm_state::CrmState;

const CALL_PREFIX: &str = "kommo:call:";
const CONTACT_PREFIX: &str = "kommo:contact:";
const TASK_PREFIX: &str = "kommo:task:";
const TASK_RETRY_PREFIX: &str = "kommo:task-retry:";
/// A task that could not be created for this long is given up (an error line).
const TASK_GIVE_UP_MS: i64 = 24 * 3600 * 1000;
const TASKS_PER_SWEEP: usize = 20;
/// Calls per delivery (each is its own request).
const CALLS_PER_DELIVERY: usize = 10;

/// What Kommo took for a call.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Logged {
    /// `sending` (a request went out, no answer yet), `call` or `unsorted`.
    state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entity_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entity_type: Option<String>,
    #[serde(default)]
    at: i64,
}

/// A task waiting to be created again.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TaskRetry {
    body: Value,
    attempts: u32,
    since: i64,
    next_at: i64,
}

pub struct Kommo {
    inner: Arc<Inner>,
}

struct Inner {
    client: KommoClient,
    config: Arc<Config>,
    state: Option<CrmState>,
    hooks: Hooks,
    phones: PhoneBook,
    origin: String,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// One sweep of owed tasks at a time.
    tasks_turn: tokio::sync::Mutex<()>,
}

impl Kommo {
    pub fn new(
        config: Arc<Config>,
        state: Option<CrmState>,
        hooks: Hooks,
    ) -> Result<Kommo, CrmFailure> {
        let client = KommoClient::new(&config, state.clone()).map_err(|e| e.failure())?;
        Ok(Kommo {
            inner: Arc::new(Inner {
                client,
                origin: config.kommo.origin(),
                phones: PhoneBook::new(&config.phone),
                config,
                state,
                hooks,
                locks: Mutex::default(),
                tasks_turn: tokio::sync::Mutex::new(()),
            }),
        })
    }
}

/// Runs `f` in a task of its own and waits for it: dropping the waiter does not cancel it.
async fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, CrmFailure>> + Send + 'static,
) -> Result<T, CrmFailure> {
    tokio::spawn(f).await.unwrap_or_else(|e| {
        Err(CrmFailure {
            kind: FailureKind::Transient,
            message: format!("Kommo task ended: {e}"),
        })
    })
}

fn store_failure(e: crate::store::StoreError) -> CrmFailure {
    CrmFailure {
        kind: FailureKind::Transient,
        message: format!("cannot keep what Kommo took: {e}"),
    }
}

fn delivery_of(f: CrmFailure) -> Delivery {
    match f.kind {
        FailureKind::Transient => Delivery::RetryLater(f.message),
        FailureKind::Blocked | FailureKind::NotConfigured => Delivery::Blocked(f.message),
        FailureKind::Refused => Delivery::Rejected(f.message),
    }
}

/// The first item of `_embedded.<list>` of an answer.
fn first<'a>(answer: &'a Value, list: &str) -> &'a Value {
    &answer["_embedded"][list][0]
}

fn id_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .filter(|id| *id > 0)
}

impl Inner {
    fn users(&self) -> impl Iterator<Item = (i64, &str)> {
        self.config.users.iter().map(|u| {
            (
                i64::try_from(u.user_id).unwrap_or(i64::MAX),
                u.code.as_str(),
            )
        })
    }

    fn user_of(&self, code: &str) -> Option<i64> {
        self.users().find(|(_, c)| *c == code).map(|(u, _)| u)
    }

    fn code_of(&self, user: i64) -> Option<String> {
        self.users()
            .find(|(u, _)| *u == user)
            .map(|(_, c)| c.to_string())
    }

    /// The Kommo user a call belongs to: who talked last, else the missed call's owner, else
    /// the record's user, else `kommo.default_user_id`.
    fn user_for(&self, r: &CallRecord) -> Option<i64> {
        let code = r
            .code
            .clone()
            .or_else(|| r.rung(self.config.calls.missed_owner, None));
        code.and_then(|c| self.user_of(&c))
            .or(r.user_id.filter(|u| *u > 0))
            .or(Some(self.config.kommo.default_user_id).filter(|u| *u > 0))
    }

    fn full(&self, r: &CallRecord) -> Value {
        call_full(r, &self.phones, &jiff::tz::TimeZone::system())
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

    fn get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        let bytes = self.state.as_ref()?.get(key).ok().flatten()?;
        serde_json::from_slice(&bytes).ok()
    }

    async fn put(&self, key: &str, value: &impl Serialize) -> Result<(), CrmFailure> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        state.put(key, &bytes).map_err(store_failure)?;
        state.flush().await.map_err(store_failure)
    }

    async fn mark(
        &self,
        id: &str,
        state: &str,
        entity: Option<(i64, String)>,
    ) -> Result<(), CrmFailure> {
        let logged = Logged {
            state: state.to_string(),
            entity_id: entity.as_ref().map(|e| e.0),
            entity_type: entity.map(|e| e.1),
            at: now_ms(),
        };
        self.put(&format!("{CALL_PREFIX}{id}"), &logged).await
    }

    async fn deliver_one(&self, r: &CallRecord, url: Option<&str>) -> Delivery {
        let id = &r.external_id;
        let _turn = self.lock(id).await;
        let key = format!("{CALL_PREFIX}{id}");
        match self.get::<Logged>(&key) {
            Some(l) if l.state != "sending" => {
                // Taken before; the task may still be owed (a crash between the two).
                let entity = l.entity_id.zip(l.entity_type.clone());
                self.task_for(r, entity).await;
                return Delivery::Duplicate;
            }
            Some(_) => {
                tracing::warn!(id = %id, "a request for this call went out before without an answer; sending it again (Kommo may show it twice)");
            }
            None => {}
        }
        let user = self.user_for(r);
        let cx = CallContext {
            source: &self.config.kommo.source,
            link: url,
            user_id: user,
        };
        if let Err(f) = self.mark(id, "sending", None).await {
            return delivery_of(f);
        }
        let item = call_item(r, &cx);
        // Whether a failed request may still have been carried out (no answer in time, a
        // server error): then the mark stays, and the next attempt says it may double.
        let mut maybe_taken = false;
        let outcome = match self.client.post("/api/v4/calls", &json!([item])).await {
            Ok(answer) => Ok(self.logged_call(&answer)),
            Err(e) if e.is_entity_not_found() => self.unknown_caller(r, &cx, &item).await,
            Err(e) => {
                maybe_taken = matches!(e, KommoError::Transport { timeout: true, .. })
                    || e.status().is_some_and(|s| s >= 500);
                Err(e.failure())
            }
        };
        match outcome {
            Ok(Some((how, entity))) => {
                if let Err(f) = self.mark(id, how, entity.clone()).await {
                    tracing::error!(id = %id, error = %f, "Kommo took the call but it could not be noted; a retry may show it twice");
                }
                tracing::info!(id = %id, how, "call logged in Kommo");
                self.after_call(r, entity.clone()).await;
                self.task_for(r, entity).await;
                Delivery::Delivered
            }
            Ok(None) => {
                let _ = self.state.as_ref().map(|s| s.remove(&key));
                let why =
                    "no contact has the number and kommo.unknown_caller = \"skip\"".to_string();
                tracing::info!(id = %id, "{why}: the call is kept, not sent");
                Delivery::Held(why)
            }
            Err(f) => {
                tracing::warn!(id = %id, error = %f, "Kommo did not take the call");
                if !maybe_taken {
                    let _ = self.state.as_ref().map(|s| s.remove(&key));
                }
                delivery_of(f)
            }
        }
    }

    /// The lead or contact `/api/v4/calls` attached the call to.
    fn logged_call(&self, answer: &Value) -> Option<(&'static str, Option<(i64, String)>)> {
        let call = first(answer, "calls");
        let entity =
            id_of(&call["entity_id"]).zip(call["entity_type"].as_str().map(str::to_string));
        Some(("call", entity))
    }

    /// A call Kommo refused for its unknown number: an incoming lead, a new contact, or
    /// nothing (`None`), per `kommo.unknown_caller`.
    async fn unknown_caller(
        &self,
        r: &CallRecord,
        cx: &CallContext<'_>,
        item: &Value,
    ) -> Result<Option<(&'static str, Option<(i64, String)>)>, CrmFailure> {
        let id = &r.external_id;
        let mode = self.config.kommo.unknown_caller;
        match mode {
            UnknownCaller::Skip => Ok(None),
            UnknownCaller::Unsorted if r.direction != Direction::Out => {
                let full = || self.full(r);
                let contact = contact_for(&r.customer_number, cx.user_id);
                let contact = points::creation(
                    &self.hooks,
                    points::PROCESS_CONTACT_CREATION_PARAMS,
                    id,
                    contact,
                    full,
                )
                .await;
                let lead = points::creation(
                    &self.hooks,
                    points::PROCESS_LEAD_CREATION_PARAMS,
                    id,
                    lead_for(r, cx.user_id),
                    full,
                )
                .await;
                let body = unsorted_item(r, cx, lead, contact);
                let body = points::unsorted(&self.hooks, id, body, full).await;
                let answer = self
                    .client
                    .post("/api/v4/leads/unsorted/sip", &json!([body]))
                    .await
                    .map_err(|e| e.failure())?;
                let unsorted = first(&answer, "unsorted");
                let lead = id_of(&unsorted["_embedded"]["leads"][0]["id"]);
                Ok(Some(("unsorted", lead.map(|l| (l, "leads".to_string())))))
            }
            UnknownCaller::Unsorted | UnknownCaller::Contact => {
                let key = format!("{CONTACT_PREFIX}{id}");
                if self.get::<i64>(&key).is_none() {
                    let body = contact_for(&r.customer_number, cx.user_id);
                    let body = points::creation(
                        &self.hooks,
                        points::PROCESS_CONTACT_CREATION_PARAMS,
                        id,
                        body,
                        || self.full(r),
                    )
                    .await;
                    let answer = self
                        .client
                        .post("/api/v4/contacts", &json!([body]))
                        .await
                        .map_err(|e| e.failure())?;
                    let contact = id_of(&first(&answer, "contacts")["id"]).unwrap_or(0);
                    self.put(&key, &contact).await?;
                    tracing::info!(id = %id, contact, "a contact was created in Kommo for an unknown caller");
                }
                match self.client.post("/api/v4/calls", &json!([item])).await {
                    Ok(answer) => {
                        let _ = self.state.as_ref().map(|s| s.remove(&key));
                        Ok(self.logged_call(&answer))
                    }
                    Err(e) if e.is_entity_not_found() => Err(CrmFailure {
                        kind: FailureKind::Transient,
                        message: "Kommo does not find the new contact by its number yet".into(),
                    }),
                    Err(e) => Err(e.failure()),
                }
            }
        }
    }

    /// `process_contact_update_params` / `process_lead_update_params` on the record the call
    /// went to.
    async fn after_call(&self, r: &CallRecord, entity: Option<(i64, String)>) {
        let Some((entity_id, kind)) = entity else {
            return;
        };
        match kind.as_str() {
            "contacts" | "contact" => {
                self.update(
                    r,
                    points::PROCESS_CONTACT_UPDATE_PARAMS,
                    "/api/v4/contacts",
                    entity_id,
                    "contacts",
                )
                .await
            }
            "leads" | "lead" => {
                self.update(
                    r,
                    points::PROCESS_LEAD_UPDATE_PARAMS,
                    "/api/v4/leads",
                    entity_id,
                    "leads",
                )
                .await;
                // The lead's main contact gets its own point.
                if !self
                    .hooks
                    .is_configured(points::PROCESS_CONTACT_UPDATE_PARAMS)
                {
                    return;
                }
                let lead = self
                    .client
                    .get(
                        &format!("/api/v4/leads/{entity_id}"),
                        &[("with", "contacts".into())],
                    )
                    .await;
                let contacts = match &lead {
                    Ok(Some(l)) => l["_embedded"]["contacts"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default(),
                    _ => Vec::new(),
                };
                let main = contacts
                    .iter()
                    .find(|c| c["is_main"] == true)
                    .or(contacts.first())
                    .and_then(|c| id_of(&c["id"]));
                if let Some(contact) = main {
                    self.update(
                        r,
                        points::PROCESS_CONTACT_UPDATE_PARAMS,
                        "/api/v4/contacts",
                        contact,
                        "contacts",
                    )
                    .await;
                }
            }
            _ => {}
        }
    }

    /// One update point on one record: `PATCH` with what the hook gives, if anything.
    async fn update(&self, r: &CallRecord, point: &str, path: &str, entity_id: i64, kind: &str) {
        let about = json!({"id": entity_id, "type": kind});
        let mut fields =
            points::update(&self.hooks, point, &r.external_id, about, || self.full(r)).await;
        if fields.is_empty() {
            return;
        }
        fields.insert("id".into(), json!(entity_id));
        if let Err(e) = self.client.patch(path, &json!([fields])).await {
            tracing::warn!(id = %r.external_id, hook = point, error = %e, "Kommo refused the update");
        }
    }

    /// The follow-up task of a missed inbound call, once.
    async fn task_for(&self, r: &CallRecord, entity: Option<(i64, String)>) {
        let k = &self.config.kommo;
        if !k.missed_call_tasks || !tasks::is_missed(r) || self.state.is_none() {
            return;
        }
        let key = format!("{TASK_PREFIX}{}", r.external_id);
        if self.get::<String>(&key).is_some() {
            return;
        }
        let like = CrmConfig {
            missed_call_task_text: k.missed_call_task_text.clone(),
            missed_call_task_due: k.missed_call_task_due,
            missed_call_task_performer: 0,
            ..CrmConfig::default()
        };
        let draft = tasks::draft(&like, r, &r.customer_number, self.user_for(r));
        let full = self.full(r);
        let Some(task) =
            tasks::task_creation_params(&self.hooks, draft, &full, &r.external_id).await
        else {
            let _ = self.put(&key, &"done").await;
            return;
        };
        let mut body = Map::new();
        body.insert("text".into(), json!(task.text));
        body.insert("complete_till".into(), json!(task.due.as_second()));
        body.insert("task_type_id".into(), json!(1));
        if let Some(user) = task.responsible_id {
            body.insert("responsible_user_id".into(), json!(user));
        }
        if let Some((id, kind)) = entity {
            body.insert("entity_id".into(), json!(id));
            body.insert(
                "entity_type".into(),
                json!(if kind.ends_with('s') {
                    kind
                } else {
                    format!("{kind}s")
                }),
            );
        }
        body.insert("request_id".into(), json!("0"));
        let body = Value::Object(body);
        // The task is kept to be retried before it is sent: a crash now leaves it to the
        // sweep (after a minute, so it does not race this attempt), never forgotten.
        let retry_key = format!("{TASK_RETRY_PREFIX}{}", r.external_id);
        let now = now_ms();
        let mut retry = TaskRetry {
            body: body.clone(),
            attempts: 1,
            since: now,
            next_at: now + 60_000,
        };
        if self.put(&retry_key, &retry).await.is_err() || self.put(&key, &"owed").await.is_err() {
            return;
        }
        match self.client.post("/api/v4/tasks", &json!([body])).await {
            Ok(_) => {
                let _ = self.state.as_ref().map(|s| s.remove(&retry_key));
                let _ = self.put(&key, &"done").await;
                tracing::info!(id = %r.external_id, "missed-call task created in Kommo");
            }
            Err(e) if e.failure().is_retriable() => {
                retry.next_at = now_ms() + 1000;
                let _ = self.put(&retry_key, &retry).await;
                tracing::warn!(id = %r.external_id, error = %e, "missed-call task not created yet; will retry");
            }
            Err(e) => {
                let _ = self.state.as_ref().map(|s| s.remove(&retry_key));
                let _ = self.put(&key, &"done").await;
                tracing::warn!(id = %r.external_id, error = %e, "Kommo refused the missed-call task");
            }
        }
    }

    /// Tries the tasks that failed for a transient reason again.
    async fn retry_tasks(&self) {
        let Some(state) = &self.state else {
            return;
        };
        let _turn = self.tasks_turn.lock().await;
        let Ok(all) = state.all(TASK_RETRY_PREFIX) else {
            return;
        };
        let now = now_ms();
        for (key, bytes) in all.into_iter().take(TASKS_PER_SWEEP) {
            let id = key.trim_start_matches(TASK_RETRY_PREFIX).to_string();
            let Ok(mut retry) = serde_json::from_slice::<TaskRetry>(&bytes) else {
                let _ = state.remove(&key);
                continue;
            };
            if retry.next_at > now {
                continue;
            }
            match self
                .client
                .post("/api/v4/tasks", &json!([retry.body]))
                .await
            {
                Ok(_) => {
                    let _ = state.remove(&key);
                    let _ = self.put(&format!("{TASK_PREFIX}{id}"), &"done").await;
                    tracing::info!(id = %id, attempts = retry.attempts + 1, "missed-call task created in Kommo");
                }
                Err(e) if e.failure().is_retriable() && now - retry.since < TASK_GIVE_UP_MS => {
                    retry.attempts += 1;
                    let delay = crate::base::backoff::backoff(
                        retry.attempts,
                        std::time::Duration::from_secs(1),
                        std::time::Duration::from_secs(600),
                    );
                    retry.next_at = now + delay.as_millis() as i64;
                    let _ = self.put(&key, &retry).await;
                }
                Err(e) => {
                    let _ = state.remove(&key);
                    let _ = self.put(&format!("{TASK_PREFIX}{id}"), &"done").await;
                    tracing::error!(id = %id, error = %e, "missed-call task given up");
                }
            }
        }
    }

    async fn publish(&self, e: &LiveEvent) -> Result<Published, CrmFailure> {
        let LiveEvent::Ringing { phone, codes, .. } = e else {
            return Ok(Published::Skipped);
        };
        let users: Vec<i64> = codes.iter().filter_map(|c| self.user_of(c)).collect();
        if users.is_empty() {
            return Ok(Published::Skipped);
        }
        let body = json!({"add": [{"type": "phone_call", "phone_number": phone, "users": users}]});
        self.client
            .post("/api/v2/events", &body)
            .await
            .map_err(|e| e.failure())?;
        Ok(Published::Sent)
    }

    async fn responsible(&self, phone: &str) -> Result<Option<Responsible>, KommoError> {
        let tail = tail_digits(phone, 10);
        let mut queries = vec![phone.to_string()];
        if !tail.is_empty() && tail != phone {
            queries.push(tail);
        }
        for q in queries {
            let found = self
                .client
                .get("/api/v4/contacts", &[("query", q), ("limit", "50".into())])
                .await?;
            let Some(found) = found else {
                continue;
            };
            let contacts = found["_embedded"]["contacts"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if let Some(c) = contacts.iter().find(|c| contact_has(c, phone)) {
                let user = id_of(&c["responsible_user_id"]);
                return Ok(Some(Responsible {
                    code: user.and_then(|u| self.code_of(u)),
                    user_id: user,
                }));
            }
        }
        Ok(None)
    }
}

impl Crm for Kommo {
    fn name(&self) -> &'static str {
        "Kommo"
    }

    fn url(&self) -> &str {
        &self.inner.origin
    }

    fn is_configured(&self) -> bool {
        self.inner.client.is_configured()
    }

    fn unconfigured(&self) -> &'static str {
        "kommo.long_lived_token is empty (or, for OAuth, kommo.client_id, client_secret, redirect_uri)"
    }

    fn successes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.client.successes()
    }

    fn publish<'a>(&'a self, event: &'a LiveEvent) -> BoxFuture<'a, Result<Published, CrmFailure>> {
        // In a task of its own, as every request that may refresh the OAuth pair: a caller
        // that stops waiting (the live deadline) must not cut a refresh off between Kommo
        // rotating the pair and pbxgate writing it down (a refresh token works once).
        let inner = self.inner.clone();
        let event = event.clone();
        detached(async move { inner.publish(&event).await }).boxed()
    }

    fn batch_limit(&self) -> usize {
        CALLS_PER_DELIVERY
    }

    fn deliver<'a>(&'a self, calls: &'a [Finished<'a>]) -> BoxFuture<'a, Vec<Delivery>> {
        let owned: Vec<(CallRecord, Option<String>)> = calls
            .iter()
            .map(|f| (f.record.clone(), f.record_url.map(str::to_string)))
            .collect();
        let inner = self.inner.clone();
        let n = owned.len();
        // In a task of its own: a cancelled delivery never stops between Kommo's answer and
        // writing it down.
        let task = tokio::spawn(async move {
            let mut out = Vec::with_capacity(owned.len());
            for (r, url) in &owned {
                if r.direction == Direction::Internal {
                    out.push(Delivery::Rejected(
                        "internal calls are not sent to Kommo".into(),
                    ));
                    continue;
                }
                out.push(inner.deliver_one(r, url.as_deref()).await);
            }
            out
        });
        async move {
            task.await
                .unwrap_or_else(|e| vec![Delivery::RetryLater(format!("Kommo task ended: {e}")); n])
        }
        .boxed()
    }

    fn shape(&self) -> String {
        let c = &self.inner.config;
        format!(
            "{:?}|{:?}|{:?}|{}|{}",
            c.users,
            c.phone,
            c.kommo.unknown_caller,
            c.kommo.default_user_id,
            c.kommo.origin()
        )
    }

    fn timezone(&self) -> BoxFuture<'_, jiff::tz::TimeZone> {
        let name = self.inner.config.crm.timezone.trim().to_string();
        async move {
            if name.is_empty() {
                return jiff::tz::TimeZone::UTC;
            }
            jiff::tz::TimeZone::get(&name).unwrap_or(jiff::tz::TimeZone::UTC)
        }
        .boxed()
    }

    fn responsible<'a>(
        &'a self,
        phone: &'a str,
        _ignore_status: bool,
    ) -> BoxFuture<'a, Result<Option<Responsible>, CrmFailure>> {
        let inner = self.inner.clone();
        let phone = phone.to_string();
        detached(async move { inner.responsible(&phone).await.map_err(|e| e.failure()) }).boxed()
    }

    fn directory(&self) -> Vec<DirectoryEntry> {
        self.inner
            .users()
            .map(|(user_id, code)| DirectoryEntry {
                user_id,
                code: code.to_string(),
            })
            .collect()
    }

    fn register(&self) -> BoxFuture<'_, Result<(), CrmFailure>> {
        async move {
            let inner = &self.inner;
            let account = inner
                .client
                .get("/api/v4/account", &[])
                .await
                .map_err(|e| e.failure())?
                .unwrap_or(Value::Null);
            let expected = inner.config.kommo.account_id;
            if expected > 0 && id_of(&account["id"]) != Some(expected) {
                return Err(CrmFailure {
                    kind: FailureKind::Blocked,
                    message: format!(
                        "the token belongs to account {}, not kommo.account_id = {expected}",
                        account["id"]
                    ),
                });
            }
            Ok(())
        }
        .boxed()
    }

    fn check(&self) -> BoxFuture<'_, Result<String, String>> {
        async move {
            let inner = &self.inner;
            let origin = &inner.origin;
            if !self.is_configured() {
                return Err(format!("Kommo {origin}: {}", self.unconfigured()));
            }
            self.register().await.map_err(|e| format!("Kommo {origin}: {e}"))?;
            let users = inner
                .client
                .get("/api/v4/users", &[("limit", "250".into())])
                .await
                .map_err(|e| format!("Kommo {origin}: {e}"))?
                .unwrap_or(Value::Null);
            let known: Vec<i64> = users["_embedded"]["users"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|u| id_of(&u["id"]))
                .collect();
            let unknown: Vec<i64> = inner
                .users()
                .map(|(u, _)| u)
                .filter(|u| !known.contains(u))
                .collect();
            if !unknown.is_empty() {
                return Err(format!("Kommo {origin} reachable; [[users]] names users Kommo does not have: {unknown:?}"));
            }
            Ok(format!(
                "Kommo {origin} reachable, token accepted; {} [[users]] known",
                inner.users().count()
            ))
        }
        .boxed()
    }

    fn maintain(&self) -> BoxFuture<'_, ()> {
        self.inner.retry_tasks().boxed()
    }

    fn requests(&self) -> Option<&crate::base::latency::CrmRequests> {
        self.inner.client.requests()
    }
}
