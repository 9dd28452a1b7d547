//! What the dashboard and the admin API do, without HTTP: who may use them, the views of calls
//! and of the history queue, and the operator's actions (retry, discard, resend, register,
//! check). `http::admin` maps these to routes.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};

use crate::base::ident::mask_number;
use crate::base::secret::Secret;
use crate::calls::{CallRecord, Direction, LiveCall};
use crate::config::Config;
use crate::crm::registration::{RegistrationState, RegistrationStatus};
use crate::crm::Crm;
use crate::outbox::store::{Envelope, Resent, State};
use crate::outbox::Outbox;
use crate::pipeline::{CallTracker, RecentCalls};
use crate::records::Records;
use crate::store::Store;

/// Who may use `/admin/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// No token, listening on loopback only: open to whoever can reach the port (this machine).
    Open,
    /// The token is required (Bearer, or the login form's cookie).
    Token,
    /// No token while listening beyond loopback: every admin route is refused, with this reason.
    Refused(String),
}

/// Decides the admin access from `http.listen` and `admin.token`.
pub fn access(listen: &str, token: &Secret) -> Access {
    if !token.is_empty() {
        return Access::Token;
    }
    match listen.parse::<SocketAddr>() {
        Ok(addr) if addr.ip().is_loopback() => Access::Open,
        _ => Access::Refused(format!(
            "the admin routes are off: http.listen ({listen}) is reachable beyond this machine \
             and admin.token is empty (set it, or PBXGATE__ADMIN__TOKEN, to at least {} \
             characters)",
            crate::config::ADMIN_MIN_TOKEN_LEN
        )),
    }
}

/// The value of the login cookie for `token`: derived from it, so that the token itself is
/// never stored in a browser.
pub fn session_value(token: &Secret) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"pbxgate admin session\0");
    h.update(token.expose().as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Why an operation failed, as the API tells it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Failed(String),
}

fn store_failed(e: impl std::fmt::Display) -> OpError {
    OpError::Failed(format!("store: {e}"))
}

/// What the CRM answered about a call, as far as the history queue knows.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CrmAnswer {
    /// pending, done, dead, discarded, or none (never queued, or forgotten after the retention).
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub attempts: u32,
}

/// A call as the dashboard lists it.
#[derive(Debug, Clone, Serialize)]
pub struct CallView {
    pub external_id: String,
    /// live or finished.
    pub state: &'static str,
    pub direction: Direction,
    pub phone: String,
    pub code: Option<String>,
    /// How a finished call ended.
    pub result: Option<crate::calls::Outcome>,
    /// Unix milliseconds.
    pub started: i64,
    pub answered: Option<i64>,
    /// Finished calls: seconds from start to end.
    pub duration: Option<u64>,
    /// Live calls: the extensions ringing and talking now.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ringing: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub talking: Vec<String>,
    /// How the registration rules and hooks decided.
    pub registration: Option<String>,
    pub ignored: bool,
    pub did: Option<String>,
    pub recording: Option<String>,
    pub crm: Option<CrmAnswer>,
}

/// A queued record as the dashboard lists it.
#[derive(Debug, Clone, Serialize)]
pub struct QueueItem {
    pub external_id: String,
    pub state: &'static str,
    pub enqueued_at: i64,
    pub attempts: u32,
    pub reason: Option<String>,
    pub dead_at: Option<i64>,
    pub held: bool,
    pub direction: Direction,
    pub phone: String,
    pub code: Option<String>,
    pub outcome: crate::calls::Outcome,
}

/// One line of `pbxgate check`, as the API gives it.
#[derive(Debug, Clone, Serialize)]
pub struct CheckView {
    pub ok: bool,
    pub warning: bool,
    pub text: String,
}

/// The admin operations over the running service's parts (cheap to clone).
#[derive(Clone)]
pub struct Admin {
    pub config: Arc<Config>,
    pub store: Store,
    pub crm: Arc<dyn Crm>,
    pub registration: RegistrationStatus,
    pub tracker: CallTracker,
    pub recent_calls: RecentCalls,
    pub outbox: Outbox,
    pub records: Records,
}

/// The most records of each kind the queue view lists.
pub const QUEUE_LIMIT: usize = 200;
/// The most records of one kind a single queue request may ask for (`limit`).
pub const QUEUE_MAX_LIMIT: usize = 10_000;

impl Admin {
    fn phone(&self, number: &str) -> String {
        if self.config.admin.show_numbers {
            number.to_string()
        } else {
            mask_number(number)
        }
    }

    fn crm_answer(&self, id: &str) -> Option<CrmAnswer> {
        let found = self.outbox.store().find(id).ok()?;
        Some(match found {
            None => CrmAnswer {
                state: "none",
                reason: None,
                attempts: 0,
            },
            Some((state, env)) => CrmAnswer {
                state: state_name(state),
                reason: env.as_ref().and_then(|e| e.last_error.clone()),
                attempts: env.as_ref().map_or(0, |e| e.attempts),
            },
        })
    }

    fn live_view(&self, c: &LiveCall) -> CallView {
        CallView {
            external_id: c.external_id.clone(),
            state: "live",
            direction: c.direction,
            phone: self.phone(&c.phone),
            code: c.talking.first().or(c.ringing.first()).cloned(),
            result: None,
            started: c.start,
            answered: c.answered,
            duration: None,
            ringing: c.ringing.clone(),
            talking: c.talking.clone(),
            registration: None,
            ignored: false,
            did: None,
            recording: None,
            crm: None,
        }
    }

    fn finished_view(&self, r: &CallRecord, with_crm: bool) -> CallView {
        CallView {
            external_id: r.external_id.clone(),
            state: "finished",
            direction: r.direction,
            phone: self.phone(&r.customer_number),
            code: r.code.clone(),
            result: Some(r.outcome),
            started: r.start,
            answered: r.answer,
            duration: Some(u64::try_from((r.end - r.start).max(0) / 1000).unwrap_or(0)),
            ringing: Vec::new(),
            talking: Vec::new(),
            registration: r.registration.clone(),
            ignored: r.ignored,
            did: r.did.clone(),
            recording: if r.recordings.is_empty() {
                None
            } else {
                self.records.url_for(r)
            },
            crm: if with_crm {
                self.crm_answer(&r.external_id)
            } else {
                None
            },
        }
    }

    /// Live calls (oldest first), then up to `recent` finished ones (newest first).
    pub fn calls(&self, recent: usize) -> Vec<CallView> {
        let mut out: Vec<CallView> = self
            .tracker
            .live_calls()
            .iter()
            .map(|c| self.live_view(c))
            .collect();
        out.extend(
            self.recent_calls
                .all()
                .iter()
                .rev()
                .take(recent)
                .map(|r| self.finished_view(r, true)),
        );
        out
    }

    fn queue_item(&self, state: State, e: &Envelope) -> QueueItem {
        QueueItem {
            external_id: e.id.clone(),
            state: state_name(state),
            enqueued_at: e.enqueued_at,
            attempts: e.attempts,
            reason: e.last_error.clone(),
            dead_at: e.dead_at,
            held: e.held,
            direction: e.record.direction,
            phone: self.phone(&e.record.customer_number),
            code: e.record.code.clone(),
            outcome: e.record.outcome,
        }
    }

    /// The history queue: its counters, then pending and dead records (oldest first).
    pub fn queue(&self) -> Result<Value, OpError> {
        self.queue_of(None, QUEUE_LIMIT)
    }

    /// The history queue: its counters, then up to `limit` records of `only` (pending or
    /// dead), or of both kinds when `None`, oldest first.
    pub fn queue_of(&self, only: Option<State>, limit: usize) -> Result<Value, OpError> {
        let store = self.outbox.store();
        let pending = match only {
            None | Some(State::Pending) => store.list_pending(limit).map_err(store_failed)?,
            _ => Vec::new(),
        };
        let dead = match only {
            None | Some(State::Dead) => store.dead(limit).map_err(store_failed)?,
            _ => Vec::new(),
        };
        let items: Vec<QueueItem> = pending
            .iter()
            .map(|e| self.queue_item(State::Pending, e))
            .chain(dead.iter().map(|e| self.queue_item(State::Dead, e)))
            .collect();
        Ok(json!({"status": self.outbox.status(), "items": items}))
    }

    /// Every dead record goes back to pending and the uploader is woken.
    pub async fn retry_dead(&self) -> Result<Value, OpError> {
        let moved = self.outbox.store().retry(None).map_err(store_failed)?;
        if moved > 0 {
            self.outbox.store().flush().await.map_err(store_failed)?;
            self.outbox.kick();
            tracing::info!(calls = moved, "dead calls queued again by an operator");
        }
        Ok(json!({"moved": moved}))
    }

    /// A dead record goes back to pending and the uploader is woken.
    pub async fn retry(&self, id: &str) -> Result<Value, OpError> {
        let moved = self.outbox.store().retry(Some(id)).map_err(store_failed)?;
        if moved == 0 {
            return Err(self.not_dead(id));
        }
        self.outbox.store().flush().await.map_err(store_failed)?;
        self.outbox.kick();
        tracing::info!(call = id, "dead call queued again by an operator");
        Ok(json!({"external_id": id, "state": "pending"}))
    }

    fn not_dead(&self, id: &str) -> OpError {
        match self.outbox.store().state_of(id) {
            Ok(Some(state)) => OpError::Conflict(format!(
                "call {id} is {}, not dead: nothing to retry",
                state_name(state)
            )),
            Ok(None) => OpError::NotFound(format!("no call {id} in the history queue")),
            Err(e) => store_failed(e),
        }
    }

    /// A pending or dead record leaves the queue for good (kept as discarded).
    pub async fn discard(&self, id: &str) -> Result<Value, OpError> {
        let store = self.outbox.store();
        match store
            .discard(id, "discarded by an operator")
            .map_err(store_failed)?
        {
            Some(from) => {
                store.flush().await.map_err(store_failed)?;
                tracing::info!(
                    call = id,
                    was = state_name(from),
                    "call discarded from the history queue by an operator"
                );
                Ok(json!({"external_id": id, "state": "discarded", "was": state_name(from)}))
            }
            None => Err(match store.state_of(id) {
                Ok(Some(state)) => OpError::Conflict(format!(
                    "call {id} is {}: only pending or dead calls can be discarded",
                    state_name(state)
                )),
                Ok(None) => OpError::NotFound(format!("no call {id} in the history queue")),
                Err(e) => store_failed(e),
            }),
        }
    }

    /// A finished call from the recent calls is queued again, whatever the CRM said before.
    pub async fn resend(&self, id: &str) -> Result<Value, OpError> {
        let Some(record) = self
            .recent_calls
            .all()
            .into_iter()
            .rev()
            .find(|r| r.external_id == id)
        else {
            return Err(OpError::NotFound(format!(
                "no finished call {id} among the recent calls"
            )));
        };
        let store = self.outbox.store();
        let resent = store.resend(record).map_err(store_failed)?;
        store.flush().await.map_err(store_failed)?;
        self.outbox.kick();
        let how = match resent {
            Resent::Queued(_) => "queued",
            Resent::Retried => "retried",
            Resent::AlreadyPending => "already pending",
        };
        tracing::info!(call = id, how, "call sent again by an operator");
        Ok(json!({"external_id": id, "state": "pending", "how": how}))
    }

    /// Registers the module with the CRM again.
    pub async fn register(&self) -> Result<Value, OpError> {
        if !self.crm.is_configured() {
            return Err(OpError::Conflict(format!(
                "{}: there is nothing to register with",
                self.crm.unconfigured()
            )));
        }
        match self.crm.register().await {
            Ok(()) => {
                self.registration.set(RegistrationState::Registered);
                tracing::info!("module registered again by an operator");
                Ok(json!({"registration": "registered"}))
            }
            Err(e) => {
                let text = e.to_string();
                self.registration
                    .set(RegistrationState::Failed(text.clone()));
                tracing::warn!(error = %text, "registration asked by an operator failed");
                Err(OpError::Failed(format!("registration failed: {text}")))
            }
        }
    }

    /// The lines of `pbxgate check`, against the running service's store and CRM client.
    pub async fn check(&self) -> Vec<CheckView> {
        let mut lines = vec![CheckView {
            ok: true,
            warning: false,
            text: "config valid (the running service's)".into(),
        }];
        for w in crate::check::config_warnings(&self.config) {
            lines.push(CheckView {
                ok: true,
                warning: true,
                text: w,
            });
        }
        let path = self.config.storage.path.display().to_string();
        lines.push(match self.store.check_writable().await {
            Ok(()) => ok_line(format!("store writable ({path})")),
            Err(e) => bad_line(format!("store not writable: {e}")),
        });
        lines.push(match self.crm.check().await {
            Ok(text) => ok_line(text),
            Err(text) => bad_line(text),
        });
        let ami = &self.config.ami;
        let addr = format!("{}:{}", ami.host, ami.port);
        lines.push(match crate::pbx::ami::AmiClient::probe(ami).await {
            Ok(banner) => ok_line(format!(
                "AMI {addr} reachable ({banner}), login accepted for {}",
                ami.username
            )),
            Err(e) => bad_line(format!("AMI {addr}: {e}")),
        });
        lines
    }

    /// The effective configuration; secrets are written as `***`.
    pub fn config_view(&self) -> Value {
        serde_json::to_value(&*self.config).unwrap_or(Value::Null)
    }
}

fn ok_line(text: String) -> CheckView {
    CheckView {
        ok: true,
        warning: false,
        text,
    }
}

fn bad_line(text: String) -> CheckView {
    CheckView {
        ok: false,
        warning: false,
        text,
    }
}

pub fn state_name(state: State) -> &'static str {
    match state {
        State::Pending => "pending",
        State::Done => "done",
        State::Dead => "dead",
        State::Discarded => "discarded",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_is_open_on_loopback_refused_beyond_it_without_a_token() {
        let none = Secret::default();
        let token = Secret::new("0123456789abcdef");
        assert_eq!(access("127.0.0.1:8088", &none), Access::Open);
        assert_eq!(access("[::1]:8088", &none), Access::Open);
        for public in ["0.0.0.0:8088", "[::]:8088", "192.0.2.10:8088"] {
            match access(public, &none) {
                Access::Refused(why) => {
                    assert!(why.contains("admin.token is empty"), "{why}");
                    assert!(why.contains(public), "{why}");
                }
                other => panic!("{public}: {other:?}"),
            }
            assert_eq!(access(public, &token), Access::Token);
        }
        assert_eq!(access("127.0.0.1:8088", &token), Access::Token);
    }

    #[test]
    fn the_session_cookie_is_not_the_token() {
        let token = Secret::new("0123456789abcdef");
        let v = session_value(&token);
        assert_eq!(v.len(), 64);
        assert!(!v.contains("0123456789abcdef"));
        assert_ne!(v, session_value(&Secret::new("0123456789abcdeg")));
    }
}
