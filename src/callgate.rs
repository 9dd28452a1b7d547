//! CallGate compatibility: the `/rest/...` methods of CallGate (an HTTPS gateway between a PBX
//! and Bitrix24), so that dialplans written for it keep working when pointed at pbxgate, with
//! any CRM.
//!
//! Design:
//! - The HTTP layer hands over plain parameter maps; every value is bounded and checked here,
//!   and errors name the field. A `{FLAG}` is set by being present (whatever its value); `|`
//!   separates up to [`MAX_VALUES`] values.
//! - `find_assignee` (and `register_call&lookup`) is the router's answer: the same cached,
//!   deadline-bounded one `/pbx/route` gives.
//! - The call methods drive the webhook call model ([`crate::calls::webhook`]) through the
//!   tracker, as `POST /pbx/events` does: `start`, `ringing` per internal phone, `ring_end`
//!   (`telephony_hide`), `answer`, `hangup`. Live events (pop-ups, `Progress`) and the call
//!   history follow as for any other call.
//! - A registry maps CallGate's call ids (ours, the PBX's `external_call_id`, the CRM's own id)
//!   to those calls and remembers when each began (the default duration) and which phones
//!   still ring. It lives in memory, bounded ([`MAX_CALLS`]; finished calls are remembered for
//!   an hour): a restart forgets it, and the calls it knew are then closed by the reaper.
//! - One async lock orders the requests about calls, held while the model is told: what the
//!   registry says and what the model was told never disagree.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::base::clock::now_ms;
use crate::base::ident::{mask_number, ExtensionCode, PhoneNumber};
use crate::calls::webhook::{Kind, WebhookEvent};
use crate::calls::{Direction, Millis, Outcome};
use crate::click_to_call::{ClickToCall, ClickToCallError, MakeCall, Outcome as Placed};
use crate::config::Config;
use crate::crm::port::FailureKind;
use crate::crm::Crm;
use crate::outbox::Outbox;
use crate::pipeline::CallTracker;
use crate::routing::{Route, Router, Source};

/// Most values one `|`-separated parameter may hold.
pub const MAX_VALUES: usize = 20;
/// Longest call id (ours, the PBX's, the CRM's).
pub const MAX_CALL_ID: usize = 128;
/// Longest `bitrix_api` method name.
pub const MAX_METHOD: usize = 100;
/// Largest `bitrix_api` body (the method's JSON parameters).
pub const MAX_API_BODY: usize = 64 * 1024;
/// Calls the registry remembers at most (the oldest are forgotten first).
pub const MAX_CALLS: usize = 10_000;
/// How long the CRM may take to name its own id of a call just started.
pub const CALL_REF_WAIT: Duration = Duration::from_secs(3);
/// How long a finished call is remembered (a repeated finish says so).
const KEEP_FINISHED: Millis = 3_600_000;
const MAX_PHONE_PARAM: usize = 64;
const MAX_TEXT: usize = 2000;
const MAX_RECORD_URL: usize = 2048;
const MAX_TZ: RangeInclusive<i64> = -12..=14;
/// Longest talk `telephony_finish` accepts, in seconds (a day).
const MAX_DURATION: i64 = 86_400;
const CALL_ID_RULE: &str = "must be 1 to 128 of letters, digits and . _ : - @ # * +";

/// What a method answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `application/json`, status 200.
    Json(Value),
    /// `text/plain`, status 200 (`return_only_call_id`).
    Text(String),
    /// `bitrix_api`: the CRM's status and body as it gave them (`application/json`).
    Raw { status: u16, body: Vec<u8> },
}

/// A request refused (CallGate's own results, like `no_internal_numbers`, are [`Reply`]s).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CgError {
    #[error("ukey: missing or wrong")]
    BadUkey,
    #[error("{}", describe(.0))]
    BadParams(BTreeMap<String, String>),
    #[error("body: larger than {MAX_API_BODY} bytes")]
    TooLarge,
    #[error("the call tracker stopped")]
    Unavailable,
    #[error("{0}")]
    Internal(String),
    /// `bitrix_api`: the CRM refused or failed.
    #[error("{message}")]
    Crm { kind: FailureKind, message: String },
    /// `telephony_predial`: the call was not placed.
    #[error("{message}")]
    Originate { status: u16, message: String },
}

fn describe(errors: &BTreeMap<String, String>) -> String {
    errors
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl CgError {
    fn field(name: &str, problem: impl Into<String>) -> CgError {
        CgError::BadParams(BTreeMap::from([(name.to_string(), problem.into())]))
    }

    /// The HTTP status. `bad_ukey` is a 403: Asterisk's `CURL()` hands the body to the
    /// dialplan whatever the status, so CallGate dialplans still read `{"error":"bad_ukey"}`,
    /// while logs, proxies and monitoring see a refusal.
    pub fn status(&self) -> u16 {
        match self {
            CgError::BadUkey => 403,
            CgError::BadParams(_) => 400,
            CgError::TooLarge => 413,
            CgError::Unavailable => 503,
            CgError::Internal(_) => 500,
            CgError::Crm { kind, .. } => match kind {
                FailureKind::NotConfigured | FailureKind::Transient => 503,
                FailureKind::Blocked => 502,
                FailureKind::Refused => 501,
            },
            CgError::Originate { status, .. } => *status,
        }
    }

    /// The JSON body: CallGate's `{"error": "<code>"}`, with a message and the fields at
    /// fault where there are some.
    pub fn body(&self) -> Value {
        match self {
            CgError::BadUkey => json!({"error": "bad_ukey"}),
            CgError::BadParams(errors) => {
                json!({"error": "bad_param", "message": describe(errors), "errors": errors})
            }
            CgError::TooLarge => {
                json!({"error": "bad_param", "message": self.to_string(),
                    "errors": {"body": format!("larger than {MAX_API_BODY} bytes")}})
            }
            CgError::Unavailable => json!({"error": "unavailable", "message": self.to_string()}),
            CgError::Internal(m) => json!({"error": "internal", "message": m}),
            CgError::Crm { kind, message } => {
                let code = match kind {
                    FailureKind::NotConfigured => "not_configured",
                    FailureKind::Transient => "crm_unavailable",
                    // CallGate's name for a grant that lapsed.
                    FailureKind::Blocked => "invalid_grant",
                    FailureKind::Refused => "not_supported",
                };
                json!({"error": code, "message": message})
            }
            CgError::Originate { message, .. } => {
                json!({"error": "originate_failed", "message": message})
            }
        }
    }
}

impl From<ClickToCallError> for CgError {
    fn from(e: ClickToCallError) -> CgError {
        use ClickToCallError as E;
        let status = match &e {
            E::ExtensionRateLimit { .. } | E::GlobalRateLimit { .. } => 429,
            E::Refused(_) => 502,
            E::Timeout => 504,
            E::Disconnected | E::Unavailable(_) => 503,
            E::Declined(_) => 403,
        };
        CgError::Originate {
            status,
            message: e.to_string(),
        }
    }
}

/// Reads a method's parameters, collecting every problem by field.
struct Fields<'a> {
    q: &'a BTreeMap<String, String>,
    errors: BTreeMap<String, String>,
}

impl<'a> Fields<'a> {
    fn new(q: &'a BTreeMap<String, String>) -> Fields<'a> {
        Fields {
            q,
            errors: BTreeMap::new(),
        }
    }

    fn bad(&mut self, name: &str, problem: impl Into<String>) {
        self.errors
            .entry(name.to_string())
            .or_insert_with(|| problem.into());
    }

    fn flag(&self, name: &str) -> bool {
        self.q.contains_key(name)
    }

    /// Trimmed; empty is absent.
    fn text(&mut self, name: &str, max: usize) -> Option<String> {
        let v = self.q.get(name)?.trim();
        if v.is_empty() {
            return None;
        }
        if v.chars().count() > max || v.chars().any(char::is_control) {
            self.bad(name, format!("must be at most {max} printable characters"));
            return None;
        }
        Some(v.to_string())
    }

    fn required(&mut self, name: &str, max: usize) -> Option<String> {
        let v = self.text(name, max);
        if v.is_none() && !self.errors.contains_key(name) {
            self.bad(name, "is required");
        }
        v
    }

    fn ext(&mut self, name: &str) -> Option<String> {
        let v = self.text(name, 16 + 1)?;
        if ExtensionCode::is_valid(&v) {
            Some(v)
        } else {
            self.bad(name, ExtensionCode::RULE);
            None
        }
    }

    /// `101|102`: distinct extensions, at most [`MAX_VALUES`].
    fn exts(&mut self, name: &str) -> Vec<String> {
        let Some(v) = self.text(name, (16 + 2) * MAX_VALUES) else {
            return Vec::new();
        };
        let parts: Vec<&str> = v
            .split('|')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        if parts.len() > MAX_VALUES {
            self.bad(
                name,
                format!("at most {MAX_VALUES} values separated by '|'"),
            );
            return Vec::new();
        }
        let mut out: Vec<String> = Vec::new();
        for p in parts {
            if !ExtensionCode::is_valid(p) {
                self.bad(name, format!("each value {}", ExtensionCode::RULE));
                return Vec::new();
            }
            if !out.iter().any(|o| o == p) {
                out.push(p.to_string());
            }
        }
        out
    }

    fn call_id(&mut self, name: &str) -> Option<String> {
        let v = self.text(name, MAX_CALL_ID)?;
        if is_call_id(&v) {
            Some(v)
        } else {
            self.bad(name, CALL_ID_RULE);
            None
        }
    }

    fn int(&mut self, name: &str, range: RangeInclusive<i64>) -> Option<i64> {
        let v = self.text(name, 21)?;
        match v.strip_prefix('+').unwrap_or(&v).parse::<i64>() {
            Ok(n) if range.contains(&n) => Some(n),
            _ => {
                self.bad(
                    name,
                    format!(
                        "must be an integer from {} to {}",
                        range.start(),
                        range.end()
                    ),
                );
                None
            }
        }
    }

    /// A customer's number as CallGate reads it (digits and a leading `+`).
    fn phone(&mut self, name: &str, required: bool) -> Option<String> {
        let raw = self.q.get(name).map(String::as_str).unwrap_or_default();
        if raw.trim().is_empty() {
            if required {
                self.bad(name, "is required");
            }
            return None;
        }
        if raw.chars().count() > MAX_PHONE_PARAM || raw.chars().any(char::is_control) {
            self.bad(
                name,
                format!("must be at most {MAX_PHONE_PARAM} printable characters"),
            );
            return None;
        }
        let number = customer_number(raw);
        if PhoneNumber::is_valid(&number) {
            Some(number)
        } else {
            self.bad(name, PhoneNumber::RULE);
            None
        }
    }

    /// An http(s) URL, passed to the CRM as it is, or a file on this host (an absolute path),
    /// linked like a webhook's `record`.
    fn record(&mut self, name: &str) -> Option<String> {
        let v = self.text(name, MAX_RECORD_URL)?;
        if v.starts_with('/') {
            return Some(v);
        }
        match url::Url::parse(&v) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(v),
            _ => {
                self.bad(name, "must be an http(s) URL or an absolute path");
                None
            }
        }
    }

    fn done(self) -> Result<(), CgError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(CgError::BadParams(self.errors))
        }
    }
}

/// CallGate's rule for numbers: digits and a leading `+` are kept, the rest is dropped. A
/// single leading space followed by a digit was a `+` that query decoding turned into a space
/// (`?phone=+375...` as CallGate's own examples write it).
pub fn customer_number(raw: &str) -> String {
    let raw = raw.trim_end();
    let rest = raw.trim_start();
    let plus = rest.starts_with('+')
        || (raw.len() - rest.len() == 1
            && raw.starts_with(' ')
            && rest.starts_with(|c: char| c.is_ascii_digit()));
    let digits: String = rest.chars().filter(char::is_ascii_digit).collect();
    if plus && !digits.is_empty() {
        format!("+{digits}")
    } else {
        digits
    }
}

fn is_call_id(v: &str) -> bool {
    (1..=MAX_CALL_ID).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-@#*+".contains(&b))
}

/// A `bitrix_api` method name: `[a-z0-9_.]` (any case), at most [`MAX_METHOD`].
pub fn is_method(v: &str) -> bool {
    (1..=MAX_METHOD).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

fn new_call_id() -> String {
    format!("cg-{:x}-{:08x}", now_ms(), rand::random::<u32>())
}

/// What routing answered, in CallGate's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Assignee {
    Number {
        code: String,
        user_id: Option<i64>,
    },
    /// No entity, or an entity without a manager: `[]`.
    Nobody,
    /// A manager without an extension: `no_internal_numbers`.
    NoExtension {
        user_id: Option<i64>,
    },
}

/// The router's fallback reasons that mean "nobody is responsible"; any other fallback (the
/// CRM failed or was late, the manager is away) answers `routing.fallback_code` when one is set.
use crate::routing::reason::{NOBODY_AT_ALL as NOBODY, NO_EXTENSION};

impl Assignee {
    fn of(route: &Route) -> Assignee {
        let number = || match &route.code {
            Some(code) => Assignee::Number {
                code: code.clone(),
                user_id: route.user_id,
            },
            None => Assignee::Nobody,
        };
        match (route.source, route.reason) {
            (Source::Fallback, Some(NO_EXTENSION)) => Assignee::NoExtension {
                user_id: route.user_id,
            },
            (Source::Fallback, Some(r)) if NOBODY.contains(&r) => Assignee::Nobody,
            _ => number(),
        }
    }

    fn code(&self) -> Option<&str> {
        match self {
            Assignee::Number { code, .. } => Some(code),
            _ => None,
        }
    }

    /// `find_assignee`'s answer; `call_id` when it started a call.
    fn answer(&self, call_id: Option<&str>) -> Value {
        match self {
            Assignee::Number { code, .. } => {
                let mut v = json!({"internal_number": code, "error": 0});
                if let Some(id) = call_id {
                    v["call_id"] = json!(id);
                }
                v
            }
            Assignee::Nobody => json!([]),
            Assignee::NoExtension { .. } => json!({"error": "no_internal_numbers"}),
        }
    }
}

/// `no_notify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quiet {
    All,
    Only(Direction),
}

/// A call the CallGate methods started.
#[derive(Debug)]
struct Entry {
    direction: Direction,
    phone: String,
    /// When it was registered (`find_assignee` / `register_call`).
    started: Millis,
    /// The extensions still ringing, as the model was told.
    ringing: Vec<String>,
    answered: Option<(String, Millis)>,
    finished: Option<Millis>,
    aliases: Vec<String>,
    touched: Millis,
}

impl Entry {
    fn new(direction: Direction, phone: &str, now: Millis) -> Entry {
        Entry {
            direction,
            phone: phone.to_string(),
            started: now,
            ringing: Vec::new(),
            answered: None,
            finished: None,
            aliases: Vec::new(),
            touched: now,
        }
    }
}

#[derive(Default)]
struct Registry {
    calls: HashMap<String, Entry>,
    aliases: HashMap<String, String>,
}

impl Registry {
    /// Our id of the call `id` names (ours or an alias).
    fn resolve(&self, id: &str) -> Option<String> {
        if self.calls.contains_key(id) {
            return Some(id.to_string());
        }
        self.aliases.get(id).cloned()
    }

    fn alias(&mut self, alias: &str, id: &str) {
        if alias == id || self.calls.contains_key(alias) || self.aliases.contains_key(alias) {
            return;
        }
        if let Some(e) = self.calls.get_mut(id) {
            e.aliases.push(alias.to_string());
            self.aliases.insert(alias.to_string(), id.to_string());
        }
    }

    fn remove(&mut self, id: &str) {
        if let Some(e) = self.calls.remove(id) {
            for a in e.aliases {
                self.aliases.remove(&a);
            }
        }
    }

    /// Marks finished the calls the model no longer has (reaped, or hung up through
    /// `/pbx/events`), forgets finished calls after [`KEEP_FINISHED`], and makes room for one
    /// more call.
    fn prune(&mut self, now: Millis, live: &HashSet<String>, system_id: &str) {
        for (id, e) in self.calls.iter_mut() {
            if e.finished.is_none() && !live.contains(&format!("{system_id}-{id}")) {
                e.finished = Some(now);
            }
        }
        let stale: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, e)| e.finished.is_some_and(|f| now - f > KEEP_FINISHED))
            .map(|(k, _)| k.clone())
            .collect();
        for id in stale {
            self.remove(&id);
        }
        while self.calls.len() >= MAX_CALLS {
            let Some(oldest) = self
                .calls
                .iter()
                .min_by_key(|(_, e)| (e.finished.is_none(), e.touched))
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.remove(&oldest);
        }
    }
}

/// What the CallGate methods work with.
pub struct Parts {
    pub config: Arc<Config>,
    pub tracker: CallTracker,
    pub router: Router,
    pub crm: Arc<dyn Crm>,
    pub outbox: Outbox,
}

/// The CallGate methods; one per server.
pub struct CallGate {
    config: Arc<Config>,
    tracker: CallTracker,
    router: Router,
    crm: Arc<dyn Crm>,
    outbox: Outbox,
    click_to_call: ClickToCall,
    registry: tokio::sync::Mutex<Registry>,
}

fn event(call_id: &str, kind: Kind, at: Millis) -> WebhookEvent {
    WebhookEvent {
        call_id: call_id.to_string(),
        kind,
        direction: None,
        phone: None,
        did: None,
        extension: None,
        at: Some(at),
        result: None,
        record: None,
    }
}

fn ring(call_id: &str, code: &str, at: Millis) -> WebhookEvent {
    WebhookEvent {
        extension: Some(code.to_string()),
        ..event(call_id, Kind::Ringing, at)
    }
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Out => "outgoing",
        _ => "incoming",
    }
}

impl CallGate {
    pub(crate) fn new(parts: Parts, click_to_call: ClickToCall) -> CallGate {
        CallGate {
            config: parts.config,
            tracker: parts.tracker,
            router: parts.router,
            crm: parts.crm,
            outbox: parts.outbox,
            click_to_call,
            registry: tokio::sync::Mutex::new(Registry::default()),
        }
    }

    /// Checks `ukey` in constant time; an empty `callgate.ukey` refuses everyone.
    pub fn authorize(&self, ukey: Option<&str>) -> Result<(), CgError> {
        if self.config.callgate.ukey.matches(ukey.unwrap_or_default()) {
            Ok(())
        } else {
            Err(CgError::BadUkey)
        }
    }

    fn external_id(&self, id: &str) -> String {
        format!("{}-{id}", self.config.pbx.system_id)
    }

    /// The registry, pruned against the model's calls in progress (read under the lock, so a
    /// call another request just started is seen).
    async fn registry(&self, now: Millis) -> tokio::sync::MutexGuard<'_, Registry> {
        let mut reg = self.registry.lock().await;
        let live: HashSet<String> = self
            .tracker
            .live_calls()
            .iter()
            .map(|c| c.external_id.clone())
            .collect();
        reg.prune(now, &live, &self.config.pbx.system_id);
        reg
    }

    async fn send(&self, events: Vec<WebhookEvent>) -> Result<(), CgError> {
        if events.is_empty() || self.tracker.webhook(events).await {
            Ok(())
        } else {
            Err(CgError::Unavailable)
        }
    }

    /// A finished call is in the outbox: durable before we answer.
    async fn flush(&self) -> Result<(), CgError> {
        self.outbox
            .store()
            .flush()
            .await
            .map_err(|e| CgError::Internal(format!("store: {e}")))
    }

    /// The CRM's own id of a call (Bitrix24's `CALL_ID`), kept as an alias; `None` when the
    /// CRM has none (or not within [`CALL_REF_WAIT`]).
    async fn crm_ref(&self, id: &str) -> Option<String> {
        let r = self
            .crm
            .call_ref(&self.external_id(id), CALL_REF_WAIT)
            .await?;
        if !is_call_id(&r) {
            tracing::warn!(call = %id, "the CRM's id of the call is not usable as a CallGate call id");
            return None;
        }
        self.registry.lock().await.alias(&r, id);
        Some(r)
    }

    /// `find_assignee`: the responsible manager's extension; with `telephony_show`, an
    /// inbound call starts ringing the internal phones.
    pub async fn find_assignee(&self, q: &BTreeMap<String, String>) -> Result<Reply, CgError> {
        // The call began when the PBX asked, not once routing answered.
        let asked = now_ms();
        let mut f = Fields::new(q);
        let show = f.flag("telephony_show");
        let only_id = f.flag("return_only_call_id");
        if !q.contains_key("phone") {
            f.bad(
                "phone",
                "is required (may be empty for an anonymous caller)",
            );
        }
        let raw = q.get("phone").map(String::as_str).unwrap_or_default();
        if raw.chars().count() > MAX_PHONE_PARAM || raw.chars().any(char::is_control) {
            f.bad(
                "phone",
                format!("must be at most {MAX_PHONE_PARAM} printable characters"),
            );
        }
        // A call needs a customer's number.
        let phone = if show { f.phone("phone", true) } else { None };
        let internal = f.exts("internal_phone");
        let wanted = f.call_id("external_call_id");
        f.done()?;
        let route = self.router.route(&customer_number(raw), None).await;
        let assignee = Assignee::of(&route);
        let mut call_id = None;
        if let Some(phone) = phone {
            let rings: Vec<String> = if internal.is_empty() {
                assignee.code().map(str::to_string).into_iter().collect()
            } else {
                internal
            };
            call_id = Some(self.start_inbound(&phone, &rings, wanted, asked).await?);
        }
        if only_id {
            let text = match &call_id {
                Some(id) => self.crm_ref(id).await.unwrap_or_else(|| id.clone()),
                None => String::new(),
            };
            return Ok(Reply::Text(text));
        }
        Ok(Reply::Json(assignee.answer(call_id.as_deref())))
    }

    async fn start_inbound(
        &self,
        phone: &str,
        rings: &[String],
        wanted: Option<String>,
        asked: Millis,
    ) -> Result<String, CgError> {
        let now = now_ms();
        let mut reg = self.registry(now).await;
        let id = match wanted {
            Some(w) => reg.resolve(&w).unwrap_or(w),
            None => new_call_id(),
        };
        let mut events = Vec::new();
        match reg.calls.get(&id) {
            Some(e) if e.finished.is_some() => {
                tracing::warn!(call = %id, "find_assignee: this call id belongs to a call that has finished; no call started");
                return Ok(id);
            }
            Some(_) => {}
            None => {
                reg.calls
                    .insert(id.clone(), Entry::new(Direction::In, phone, asked));
                events.push(WebhookEvent {
                    direction: Some(Direction::In),
                    phone: Some(phone.to_string()),
                    ..event(&id, Kind::Start, asked)
                });
                tracing::info!(call = %id, phone = %mask_number(phone), rings = ?rings, "callgate: inbound call started");
            }
        }
        let Some(e) = reg.calls.get_mut(&id) else {
            return Err(CgError::Internal("call registry out of step".into()));
        };
        e.touched = now;
        if e.answered.is_none() {
            for code in rings {
                if !e.ringing.contains(code) {
                    e.ringing.push(code.clone());
                    events.push(ring(&id, code, now));
                }
            }
        }
        self.send(events).await?;
        Ok(id)
    }

    /// `register_call`: starts a call (or, with the `call_id` of a known one, updates it);
    /// `lookup` only asks the router.
    pub async fn register_call(&self, q: &BTreeMap<String, String>) -> Result<Reply, CgError> {
        let mut f = Fields::new(q);
        let lookup = f.flag("lookup");
        let phone = f.phone("phone", true);
        let direction = match f.text("direction", 16).as_deref() {
            Some("incoming") => Some(Direction::In),
            Some("outgoing") => Some(Direction::Out),
            None if lookup => Some(Direction::In),
            None => {
                f.bad("direction", "is required (incoming or outgoing)");
                None
            }
            Some(_) => {
                f.bad("direction", "must be incoming or outgoing");
                None
            }
        };
        // Accepted and checked; pbxgate carries no comment and notifies no supervisor.
        let _comment = f.text("comment", MAX_TEXT);
        let _supervisor = f.ext("internal_supervisor");
        // pbxgate stamps every event with its own clock (UTC): no time is read from the PBX.
        let _tz = f
            .int("tz", MAX_TZ)
            .unwrap_or(i64::from(self.config.callgate.tz));
        let internal = f.exts("internal_phone");
        let answered = f.ext("internal_phone_answered");
        let no_answer = f.flag("no_answer");
        let quiet = match f.text("no_notify", 16).as_deref() {
            None => None,
            Some("all") => Some(Quiet::All),
            Some("incoming") => Some(Quiet::Only(Direction::In)),
            Some("outging") | Some("outgoing") => Some(Quiet::Only(Direction::Out)),
            Some(_) => {
                f.bad("no_notify", "must be all, incoming or outging");
                None
            }
        };
        let call_id = f.call_id("call_id");
        if no_answer && answered.is_some() {
            f.bad(
                "no_answer",
                "cannot be combined with internal_phone_answered",
            );
        }
        f.done()?;
        let (Some(phone), Some(direction)) = (phone, direction) else {
            return Err(CgError::field("phone", "is required"));
        };
        if lookup {
            let route = self.router.route(&phone, None).await;
            return Ok(Reply::Json(match Assignee::of(&route) {
                Assignee::Number { code, user_id } => json!({"error": 0, "target": "assignee",
                    "action": "lookup", "id": user_id, "internal_number": code, "call_id": null}),
                Assignee::Nobody => json!([]),
                Assignee::NoExtension { .. } => json!({"error": "no_internal_numbers"}),
            }));
        }
        let silent = match quiet {
            Some(Quiet::All) => true,
            Some(Quiet::Only(d)) => d == direction,
            None => false,
        };
        let now = now_ms();
        let mut reg = self.registry(now).await;
        let known = call_id.as_deref().and_then(|c| reg.resolve(c));
        let (id, new) = match known {
            Some(id) => {
                if reg.calls.get(&id).is_some_and(|e| e.finished.is_some()) {
                    return Ok(Reply::Json(json!({"error": "already_finished"})));
                }
                (id, false)
            }
            None => (call_id.clone().unwrap_or_else(new_call_id), true),
        };
        let mut events = Vec::new();
        if new {
            let mut entry = Entry::new(direction, &phone, now);
            // Outbound: the extension placing the call (its pop-up is the `out` one).
            let placing = (direction == Direction::Out && !silent)
                .then(|| answered.clone().or_else(|| internal.first().cloned()))
                .flatten();
            events.push(WebhookEvent {
                direction: Some(direction),
                phone: Some(phone.clone()),
                extension: placing.clone(),
                ..event(&id, Kind::Start, now)
            });
            entry.ringing.extend(placing);
            reg.calls.insert(id.clone(), entry);
            tracing::info!(call = %id, phone = %mask_number(&phone), direction = direction_name(direction),
                "callgate: call registered");
        }
        let Some(e) = reg.calls.get_mut(&id) else {
            return Err(CgError::Internal("call registry out of step".into()));
        };
        e.touched = now;
        let mut rang = !e.ringing.is_empty();
        if !silent && e.direction == Direction::In && e.answered.is_none() {
            for code in &internal {
                if !e.ringing.contains(code) {
                    e.ringing.push(code.clone());
                    events.push(ring(&id, code, now));
                    rang = true;
                }
            }
        }
        if let Some(a) = &answered {
            if e.answered.as_ref().map(|(x, _)| x) != Some(a) {
                events.push(WebhookEvent {
                    extension: Some(a.clone()),
                    ..event(&id, Kind::Answer, now)
                });
                e.answered = Some((a.clone(), now));
                e.ringing.clear();
            }
        }
        if no_answer {
            events.push(WebhookEvent {
                result: e.answered.is_none().then_some(Outcome::NoAnswer),
                ..event(&id, Kind::Hangup, now)
            });
            e.finished = Some(now);
        }
        self.send(events).await?;
        drop(reg);
        if no_answer {
            self.flush().await?;
        }
        let answer_id = match (&call_id, new && rang && !no_answer) {
            (Some(given), false) => given.clone(),
            (_, true) => self.crm_ref(&id).await.unwrap_or_else(|| id.clone()),
            (None, false) => id.clone(),
        };
        Ok(Reply::Json(json!({
            "error": 0,
            "target": "call",
            "action": if new { "new" } else { "update" },
            "id": self.external_id(&id),
            "call_id": answer_id,
        })))
    }

    /// `telephony_hide`: the listed internal phones (all that ring, when none is listed) stop
    /// ringing, except `internal_phone_answered`. `true`, or `false` when nothing was hidden.
    pub async fn telephony_hide(&self, q: &BTreeMap<String, String>) -> Result<Reply, CgError> {
        let mut f = Fields::new(q);
        let call_id = f.required("call_id", MAX_CALL_ID);
        if call_id.as_deref().is_some_and(|c| !is_call_id(c)) {
            f.bad("call_id", CALL_ID_RULE);
        }
        let listed = f.exts("internal_phone");
        let keep = f.ext("internal_phone_answered");
        f.done()?;
        let call_id = call_id.unwrap_or_default();
        let now = now_ms();
        let mut reg = self.registry(now).await;
        let Some(id) = reg.resolve(&call_id) else {
            return Ok(Reply::Json(json!(false)));
        };
        let Some(e) = reg.calls.get_mut(&id).filter(|e| e.finished.is_none()) else {
            return Ok(Reply::Json(json!(false)));
        };
        let hide: Vec<String> = e
            .ringing
            .iter()
            .filter(|c| listed.is_empty() || listed.contains(c))
            .filter(|c| keep.as_ref() != Some(*c))
            .cloned()
            .collect();
        if hide.is_empty() {
            return Ok(Reply::Json(json!(false)));
        }
        e.touched = now;
        e.ringing.retain(|c| !hide.contains(c));
        let events = hide
            .iter()
            .map(|c| WebhookEvent {
                extension: Some(c.clone()),
                ..event(&id, Kind::RingEnd, now)
            })
            .collect();
        self.send(events).await?;
        Ok(Reply::Json(json!(true)))
    }

    /// `telephony_finish`: the call ends, answered by `internal_phone_answered` with
    /// `duration` seconds of talk (default: since it was registered), with its recording.
    pub async fn telephony_finish(&self, q: &BTreeMap<String, String>) -> Result<Reply, CgError> {
        let mut f = Fields::new(q);
        let call_id = f.required("call_id", MAX_CALL_ID);
        if call_id.as_deref().is_some_and(|c| !is_call_id(c)) {
            f.bad("call_id", CALL_ID_RULE);
        }
        let by = f.ext("internal_phone_answered");
        let duration = f.int("duration", 0..=MAX_DURATION);
        let record = f.record("record_url");
        f.done()?;
        let call_id = call_id.unwrap_or_default();
        let now = now_ms();
        let mut reg = self.registry(now).await;
        let Some(id) = reg.resolve(&call_id) else {
            return Ok(Reply::Json(json!({"error": "call_not_found"})));
        };
        let Some(e) = reg.calls.get_mut(&id) else {
            return Ok(Reply::Json(json!({"error": "call_not_found"})));
        };
        if e.finished.is_some() {
            let mut v = json!({"error": "already_finished"});
            if record.is_some() {
                v["message"] =
                    json!("the call has finished: its recording cannot be attached any more");
            }
            return Ok(Reply::Json(v));
        }
        let life = (now - e.started).max(0);
        // An explicit `duration=0` is a call nobody took.
        let by = by.filter(|_| duration != Some(0));
        let mut events = Vec::new();
        let mut talk_from = None;
        let mut end = now;
        if let Some(a) = &by {
            let from = match &e.answered {
                Some((x, at)) if x == a => *at,
                previous => {
                    // Talk began `duration` ago (default: when the call was registered), not
                    // before the call nor its last answer.
                    let floor = previous.as_ref().map_or(e.started, |(_, at)| *at);
                    let at = (now - duration.map_or(life, |d| d * 1000)).max(floor);
                    events.push(WebhookEvent {
                        extension: Some(a.clone()),
                        ..event(&id, Kind::Answer, at)
                    });
                    e.answered = Some((a.clone(), at));
                    at
                }
            };
            // The PBX's `duration` is the talk time, even when it is longer than the call as
            // pbxgate saw it (registered late): the call then ends that long after the answer.
            if let Some(d) = duration {
                end = from + d * 1000;
            }
            talk_from = Some(from);
        }
        events.push(WebhookEvent {
            record: record.clone(),
            ..event(&id, Kind::Hangup, end)
        });
        e.finished = Some(now);
        e.touched = now;
        e.ringing.clear();
        let answer = json!({
            "error": 0,
            "call_id": call_id,
            "id": self.external_id(&id),
            "phone": e.phone,
            "direction": direction_name(e.direction),
            "internal_phone_answered": e.answered.as_ref().map(|(x, _)| x),
            "status": if e.answered.is_some() { "answered" } else { "no answer" },
            "duration": talk_from.map_or(0, |t| (end - t + 500) / 1000),
            "record": record.is_some(),
        });
        self.send(events).await?;
        drop(reg);
        self.flush().await?;
        tracing::info!(call = %id, answered_by = ?by, "callgate: call finished");
        Ok(Reply::Json(answer))
    }

    /// `telephony_predial`: rings the user's extension (`data[USER_ID]` through the CRM's
    /// directory, else `internal_phone`), then dials `data[PHONE_NUMBER]`.
    pub async fn telephony_predial(&self, p: &BTreeMap<String, String>) -> Result<Reply, CgError> {
        let mut f = Fields::new(p);
        let phone = f.phone("data[PHONE_NUMBER]", true);
        let user_id = f.int("data[USER_ID]", 1..=i64::MAX);
        let internal = f.ext("internal_phone");
        let context = f.text("sip_context", 80);
        if context.as_deref().is_some_and(|c| {
            !c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        }) {
            f.bad(
                "sip_context",
                "must be a dialplan context name (letters, digits, _ - .)",
            );
        }
        f.done()?;
        let phone = phone.unwrap_or_default();
        let directory = self.crm.directory();
        let code = user_id
            .and_then(|u| directory.iter().find(|d| d.user_id == u))
            .map(|d| d.code.clone())
            .or(internal)
            .and_then(|c| ExtensionCode::parse(&c).ok());
        let Some(code) = code else {
            return Ok(Reply::Json(json!({"error": "no_internal_numbers"})));
        };
        let user_id = user_id.or_else(|| {
            directory
                .iter()
                .find(|d| d.code == code.as_str())
                .map(|d| d.user_id)
        });
        let Some(user_id) = user_id else {
            return Err(CgError::field(
                "data[USER_ID]",
                "is required: internal_phone belongs to no CRM user",
            ));
        };
        let phone = PhoneNumber::parse(&phone)
            .map_err(|e| CgError::field("data[PHONE_NUMBER]", e.to_string()))?;
        let call = MakeCall {
            code: code.clone(),
            phone,
            user_id,
            external_phone: None,
            context,
        };
        Ok(Reply::Json(match self.click_to_call.call(call).await? {
            Placed::Originated { call_id } => {
                json!({"error": 0, "call_id": call_id, "internal_number": code.as_str()})
            }
            Placed::Duplicate => {
                json!({"error": 0, "duplicate": true, "internal_number": code.as_str()})
            }
        }))
    }

    /// `bitrix_api`: `method` with the body's JSON parameters, passed through to the CRM; its
    /// status and body come back unchanged.
    pub async fn bitrix_api(
        &self,
        q: &BTreeMap<String, String>,
        body: &[u8],
    ) -> Result<Reply, CgError> {
        let method = q.get("method").map(|m| m.trim()).unwrap_or_default();
        if method.is_empty() {
            return Err(CgError::field("method", "is required"));
        }
        if !is_method(method) {
            return Err(CgError::field(
                "method",
                format!("must be 1 to {MAX_METHOD} of letters, digits, '_' and '.'"),
            ));
        }
        if body.len() > MAX_API_BODY {
            return Err(CgError::TooLarge);
        }
        let params = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            match serde_json::from_slice::<Value>(body) {
                Ok(v @ Value::Object(_)) => v,
                Ok(_) => return Err(CgError::field("body", "must be a JSON object")),
                Err(e) => return Err(CgError::field("body", format!("is not JSON: {e}"))),
            }
        };
        tracing::info!(method, crm = self.crm.name(), "bitrix_api: passed through");
        match self.crm.passthrough(method, params).await {
            Ok((status, body)) => Ok(Reply::Raw { status, body }),
            Err(e) => Err(CgError::Crm {
                kind: e.kind,
                message: e.message,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn numbers_keep_digits_and_a_leading_plus_even_one_decoded_as_a_space() {
        assert_eq!(customer_number("+375 17 555-55-55"), "+375175555555");
        assert_eq!(customer_number(" 375175555555"), "+375175555555");
        assert_eq!(customer_number("  5551155"), "5551155");
        assert_eq!(customer_number("555-11-55"), "5551155");
        assert_eq!(customer_number("+"), "");
    }

    #[test]
    fn multiple_values_are_bounded_and_checked() {
        let many = vec!["1"; MAX_VALUES + 1].join("|");
        let params = q(&[("internal_phone", &many)]);
        let mut f = Fields::new(&params);
        assert!(f.exts("internal_phone").is_empty());
        assert!(f.errors["internal_phone"].contains("at most 20"));

        let params = q(&[("internal_phone", "101| 102|101|")]);
        let mut f = Fields::new(&params);
        assert_eq!(f.exts("internal_phone"), vec!["101", "102"]);
        assert!(f.done().is_ok());

        let params = q(&[("internal_phone", "101|1x2")]);
        let mut f = Fields::new(&params);
        f.exts("internal_phone");
        assert!(f.errors.contains_key("internal_phone"));
    }

    #[test]
    fn a_flag_is_set_by_being_present_whatever_its_value() {
        let params = q(&[("telephony_show", "0"), ("lookup", "")]);
        let f = Fields::new(&params);
        assert!(f.flag("telephony_show") && f.flag("lookup") && !f.flag("no_answer"));
    }

    #[test]
    fn call_ids_methods_and_record_urls_follow_their_rules() {
        assert!(is_call_id(
            "externalCall.274ada6be3914aaaaaaaaaa4e4ab10f0.1000376625"
        ));
        assert!(is_call_id("1795264605.55"));
        assert!(!is_call_id("a b") && !is_call_id("") && !is_call_id(&"x".repeat(129)));
        assert!(is_method("crm.lead.list") && is_method("User.Current"));
        assert!(!is_method("crm/lead") && !is_method(&"a".repeat(101)) && !is_method(""));
        for (v, ok) in [
            ("https://user:pass@site.com/sound.mp3", true),
            ("/var/spool/asterisk/monitor/1.wav", true),
            ("ftp://site.com/a.mp3", false),
            ("sound.mp3", false),
        ] {
            let params = q(&[("record_url", v)]);
            let mut f = Fields::new(&params);
            assert_eq!(f.record("record_url").is_some(), ok, "{v}");
        }
    }

    #[test]
    fn integers_are_ranged_and_errors_name_the_field() {
        let params = q(&[("tz", "+3"), ("duration", "-1")]);
        let mut f = Fields::new(&params);
        assert_eq!(f.int("tz", MAX_TZ), Some(3));
        assert_eq!(f.int("duration", 0..=MAX_DURATION), None);
        let e = f.done().unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.body()["errors"]["duration"].is_string(), "{}", e.body());
    }

    fn route(code: Option<&str>, source: Source, reason: Option<&'static str>) -> Route {
        Route {
            code: code.map(str::to_string),
            user_id: Some(7),
            source,
            manager_status: None,
            reason,
            name: None,
        }
    }

    #[test]
    fn routing_answers_map_onto_callgate_answers() {
        let found = Assignee::of(&route(Some("200"), Source::Crm, None));
        assert_eq!(
            found.answer(None),
            json!({"internal_number": "200", "error": 0})
        );
        let nobody = Assignee::of(&route(
            Some("100"),
            Source::Fallback,
            Some("no responsible manager"),
        ));
        assert_eq!(nobody.answer(None), json!([]));
        let no_ext = Assignee::of(&route(Some("100"), Source::Fallback, Some(NO_EXTENSION)));
        assert_eq!(no_ext.answer(None), json!({"error": "no_internal_numbers"}));
        // The CRM failed: the configured fallback stands, as for /pbx/route.
        let failed = Assignee::of(&route(
            Some("100"),
            Source::Fallback,
            Some("the CRM lookup failed"),
        ));
        assert_eq!(failed.code(), Some("100"));
        let failed = Assignee::of(&route(
            None,
            Source::Fallback,
            Some("the CRM lookup failed"),
        ));
        assert_eq!(failed, Assignee::Nobody);
    }

    #[test]
    fn the_registry_follows_the_model_and_stays_bounded() {
        let mut reg = Registry::default();
        reg.calls
            .insert("a".into(), Entry::new(Direction::In, "+7999", 0));
        reg.calls
            .insert("b".into(), Entry::new(Direction::In, "+7999", 0));
        reg.alias("externalCall.1", "a");
        assert_eq!(reg.resolve("externalCall.1").as_deref(), Some("a"));
        // `b` is gone from the model (reaped): finished, then forgotten with its aliases.
        let live = HashSet::from(["pbx-a".to_string()]);
        reg.prune(10, &live, "pbx");
        assert!(reg.calls["b"].finished.is_some() && reg.calls["a"].finished.is_none());
        reg.prune(10 + KEEP_FINISHED + 1, &live, "pbx");
        assert!(!reg.calls.contains_key("b"));
        reg.calls.get_mut("a").unwrap().finished = Some(0);
        reg.prune(KEEP_FINISHED + 1, &live, "pbx");
        assert!(reg.resolve("externalCall.1").is_none() && reg.calls.is_empty());
        for i in 0..MAX_CALLS {
            reg.calls
                .insert(i.to_string(), Entry::new(Direction::In, "+7999", i as i64));
        }
        let live: HashSet<String> = (0..MAX_CALLS).map(|i| format!("pbx-{i}")).collect();
        reg.prune(0, &live, "pbx");
        assert_eq!(reg.calls.len(), MAX_CALLS - 1);
        assert!(!reg.calls.contains_key("0"), "the oldest goes first");
    }
}
