//! Click-to-call: retailCRM's `makeCallUrl` becomes an AMI Originate that rings the manager's
//! extension first and then dials the customer.
//!
//! Protections: the same (extension, number) within `click_to_call.dedupe_window` is answered but
//! dialled once (users double-click); per-extension and global limits per minute answer 429.
//!
//! `process_originate_params`, called once the request passed those checks and before the
//! Originate, sees the Originate's fields ([`OriginateParams`]) with the request (`code`,
//! `phone`, `user_id`, `external_phone`, `call_id`, read-only) and may change any of them, or
//! refuse the call (`refuse`: the reason, answered to the CRM as the error). A hook that fails
//! leaves the default fields: the call still goes out, later by at most the hook's timeout.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::base::ident::{mask_number, ExtensionCode, PhoneNumber};
use crate::config::Config;
use crate::hooks::{FieldKind, HookResult, Hooks, Stage};
use crate::pbx::ami::{Action, AmiClient, AmiError, AmiEvent};
use crate::pipeline::CallTracker;

/// Prefix of the ChannelId (Uniqueid) we give every click-to-call, so it is known before it rings.
pub const CHANNEL_ID_PREFIX: &str = "pbxgate-c2c-";
/// How long an originate is remembered to match its OriginateResponse.
const REMEMBER_FOR: Duration = Duration::from_secs(300);

pub const PROCESS_ORIGINATE_PARAMS: &str = "process_originate_params";

const ORIGINATE_PARAMS: &[(&str, FieldKind)] = &[
    ("channel", FieldKind::String),
    ("context", FieldKind::String),
    ("exten", FieldKind::String),
    ("caller_id", FieldKind::String),
    ("timeout", FieldKind::Integer),
    ("variables", FieldKind::StringMap),
    ("refuse", FieldKind::String),
];

/// The ring time a hook may give the manager's phone, in milliseconds.
pub const ORIGINATE_TIMEOUT_MS: std::ops::RangeInclusive<i64> = 1_000..=600_000;
/// Longest channel, context, extension or caller id a hook may give.
const MAX_PARAM: usize = 256;
/// Longest refusal reason answered to the CRM (longer is cut).
const MAX_REASON: usize = 200;

/// The fields of the Originate a hook sees and may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginateParams {
    /// The manager's leg, from `ami.originate_channel`.
    pub channel: String,
    /// Where the customer is dialled once the manager answers (`ami.outbound_context`).
    pub context: String,
    /// The number dialled in `context`: the customer's.
    pub exten: String,
    /// The `CallerID` header as a whole (`"name" <number>`): what the manager's phone shows.
    pub caller_id: String,
    /// How long the manager's phone rings, in milliseconds (`Timeout`; `ami.originate_timeout`).
    pub timeout_ms: u64,
    /// Channel variables set besides pbxgate's own `__PBXGATE_*` (which are always set and
    /// cannot be replaced): none unless a hook adds some; `__NAME` is inherited by every
    /// channel of the call.
    pub variables: BTreeMap<String, String>,
}

/// A click-to-call request, its fields already checked by whoever received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MakeCall {
    /// The manager's extension, rung first.
    pub code: ExtensionCode,
    /// The customer's number, dialled once the manager answers.
    pub phone: PhoneNumber,
    /// The CRM user who asked (positive).
    pub user_id: i64,
    /// The company number the call is made on behalf of, if the CRM named one.
    pub external_phone: Option<PhoneNumber>,
    /// The dialplan context the customer is dialled in, instead of `ami.outbound_context`
    /// (CallGate's `sip_context`); checked by whoever received it.
    pub context: Option<String>,
}

/// Why a click-to-call was not placed.
#[derive(Debug, thiserror::Error)]
pub enum ClickToCallError {
    /// `click_to_call.per_extension_per_minute` reached for this extension.
    #[error("more than {limit} calls per minute from this extension")]
    ExtensionRateLimit { limit: usize },
    /// `click_to_call.global_per_minute` reached.
    #[error("more than {limit} click-to-calls per minute")]
    GlobalRateLimit { limit: usize },
    /// Asterisk answered the Originate with an error.
    #[error("Asterisk refused the call: {0}")]
    Refused(String),
    #[error("Asterisk did not answer the Originate in time")]
    Timeout,
    /// The link dropped with the Originate unanswered: the call may or may not ring.
    #[error("the PBX link dropped while placing the call; it may or may not ring")]
    Disconnected,
    /// No AMI link to send the Originate on.
    #[error("PBX unavailable: {0}")]
    Unavailable(#[source] AmiError),
    /// `process_originate_params` refused the call; the hook's reason.
    #[error("{0}")]
    Declined(String),
}

impl From<AmiError> for ClickToCallError {
    fn from(e: AmiError) -> Self {
        match e {
            AmiError::Refused(msg) => ClickToCallError::Refused(msg),
            AmiError::Timeout(_) => ClickToCallError::Timeout,
            AmiError::Disconnected => ClickToCallError::Disconnected,
            other => ClickToCallError::Unavailable(other),
        }
    }
}

/// A fresh ChannelId for a click-to-call.
fn new_call_id() -> String {
    format!(
        "{CHANNEL_ID_PREFIX}{}-{:08x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
        rand::random::<u32>()
    )
}

/// The history record of a call the CRM asked for that was never placed: outbound, failed,
/// no time spent.
fn unplaced_call(
    external_id: &str,
    code: Option<&str>,
    phone: &str,
    user_id: i64,
    reason: &str,
) -> crate::calls::CallRecord {
    use crate::calls::{CallRecord, Direction, Outcome as CallOutcome};
    let now = crate::base::clock::now_ms();
    tracing::warn!(id = external_id, code = code.unwrap_or(""), phone = %mask_number(phone), %reason,
        "the call the CRM asked for was not placed; it is finished as failed");
    CallRecord {
        external_id: external_id.to_string(),
        linkedid: external_id.to_string(),
        direction: Direction::Out,
        customer_number: phone.to_string(),
        did: None,
        code: code.map(str::to_string),
        user_id: Some(user_id),
        external_phone: None,
        start: now,
        answer: None,
        end: now,
        wait_seconds: 0,
        talk_seconds: 0,
        connected_seconds: 0,
        outcome: CallOutcome::Failed,
        answered_by: None,
        final_extension: None,
        placed_by: code.map(str::to_string),
        click_to_call: true,
        rings: Vec::new(),
        talk: Vec::new(),
        recordings: Vec::new(),
        customer_dial_status: None,
        reaped: false,
        trunk: None,
        phone_original: None,
        registration: Some(format!("not placed: {reason}")),
        ignored: false,
        main_channel: None,
        conversations: Vec::new(),
        from_number: code.map(str::to_string),
        to_number: Some(phone.to_string()),
    }
}

/// What the endpoint answers on success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Asterisk accepted the Originate; `call_id` is the ChannelId of the manager's leg.
    Originated { call_id: String },
    /// The same call was asked for moments ago; not dialled again.
    Duplicate,
}

struct Limiter {
    recent: HashMap<(String, String), Instant>,
    per_extension: HashMap<String, VecDeque<Instant>>,
    global: VecDeque<Instant>,
    /// ActionID → (call id, code, masked number), to log the OriginateResponse.
    in_flight: HashMap<String, (String, String, String, Instant)>,
    /// The CRM's ids of calls it asked for lately (its events arrive twice).
    crm_refs: HashMap<String, Instant>,
}

#[derive(Clone)]
pub struct ClickToCall {
    config: Arc<Config>,
    ami: AmiClient,
    /// Told about each call before it is placed, so the call model attributes it.
    tracker: Option<CallTracker>,
    hooks: Hooks,
    state: Arc<Mutex<Limiter>>,
}

impl ClickToCall {
    pub fn new(
        config: Arc<Config>,
        ami: AmiClient,
        tracker: Option<CallTracker>,
        hooks: Hooks,
    ) -> ClickToCall {
        ClickToCall {
            config,
            ami,
            tracker,
            hooks,
            state: Arc::new(Mutex::new(Limiter {
                recent: HashMap::new(),
                per_extension: HashMap::new(),
                global: VecDeque::new(),
                in_flight: HashMap::new(),
                crm_refs: HashMap::new(),
            })),
        }
    }

    /// The Originate's fields for a request, before any hook.
    pub fn default_params(&self, req: &MakeCall) -> OriginateParams {
        let ami = &self.config.ami;
        let channel = ami
            .originate_channel
            .replace("{code}", req.code.as_str())
            .replace("{ami.internal_context}", &ami.internal_context)
            .replace("{context}", &ami.internal_context);
        OriginateParams {
            channel,
            context: req
                .context
                .clone()
                .unwrap_or_else(|| ami.outbound_context.clone()),
            exten: req.phone.as_str().to_string(),
            caller_id: format!("\"{}\" <{}>", req.phone, req.phone),
            timeout_ms: u64::try_from(ami.originate_timeout.as_millis()).unwrap_or(u64::MAX),
            variables: BTreeMap::new(),
        }
    }

    /// The Originate for a request with the default fields (public for tests and
    /// documentation).
    pub fn originate_action(&self, req: &MakeCall, call_id: &str) -> Action {
        originate(&self.default_params(req), req, call_id)
    }

    /// `process_originate_params`: the fields as the hook leaves them, or its refusal.
    async fn customize(
        &self,
        req: &MakeCall,
        call_id: &str,
        params: OriginateParams,
    ) -> Result<OriginateParams, String> {
        if !self.hooks.is_configured(PROCESS_ORIGINATE_PARAMS) {
            return Ok(params);
        }
        let input = json!({
            "call_full": null,
            "call_stage": Stage::ConversationRequested.as_str(),
            "channel": params.channel,
            "context": params.context,
            "exten": params.exten,
            "caller_id": params.caller_id,
            "timeout": params.timeout_ms,
            "variables": params.variables,
            "code": req.code.as_str(),
            "phone": req.phone.as_str(),
            "user_id": req.user_id,
            "external_phone": req.external_phone.as_ref().map(|p| p.as_str()),
            "call_id": call_id,
        });
        match self
            .hooks
            .call(PROCESS_ORIGINATE_PARAMS, input, ORIGINATE_PARAMS)
            .await
        {
            HookResult::Changed(data) => apply_hook(&data, params),
            _ => Ok(params),
        }
    }
}

/// The Originate action of `params` for `req`, with pbxgate's own variables.
fn originate(params: &OriginateParams, req: &MakeCall, call_id: &str) -> Action {
    let mut action = Action::new("Originate")
        .header("Channel", &params.channel)
        .header("Context", &params.context)
        .header("Exten", &params.exten)
        .header("Priority", "1")
        .header("CallerID", &params.caller_id)
        .header("Timeout", params.timeout_ms.to_string())
        .header("Async", "true")
        .header("ChannelId", call_id)
        // `__` makes the variables inherited by every channel the call creates.
        .header("Variable", "__PBXGATE_C2C=1")
        .header("Variable", format!("__PBXGATE_CALL_ID={call_id}"))
        .header("Variable", format!("__PBXGATE_USER_ID={}", req.user_id))
        .header("Variable", format!("__PBXGATE_CODE={}", req.code));
    if let Some(ext) = &req.external_phone {
        action = action.header("Variable", format!("__PBXGATE_EXTERNAL_PHONE={ext}"));
    }
    for (name, value) in &params.variables {
        action = action.header("Variable", format!("{name}={value}"));
    }
    action
}

/// What a `process_originate_params` hook answered, checked, applied to `params`; a
/// non-empty `refuse` is the refusal. A value that does not pass its check is logged and the
/// default kept for that field.
fn apply_hook(
    data: &Map<String, Value>,
    mut params: OriginateParams,
) -> Result<OriginateParams, String> {
    let point = PROCESS_ORIGINATE_PARAMS;
    if let Some(reason) = data.get("refuse").and_then(Value::as_str) {
        let reason = plain(reason, MAX_REASON);
        if !reason.is_empty() {
            return Err(reason);
        }
    }
    for (field, target) in [
        ("channel", &mut params.channel),
        ("context", &mut params.context),
        ("exten", &mut params.exten),
        ("caller_id", &mut params.caller_id),
    ] {
        let Some(value) = data.get(field).and_then(Value::as_str) else {
            continue;
        };
        let value = value.trim();
        if value.is_empty() || value.len() > MAX_PARAM || value.chars().any(char::is_control) {
            tracing::warn!(
                hook = point,
                field,
                "must be 1 to {MAX_PARAM} bytes without control characters; the default kept"
            );
        } else {
            *target = value.to_string();
        }
    }
    if let Some(ms) = data.get("timeout").and_then(Value::as_i64) {
        match u64::try_from(ms) {
            Ok(ms) if ORIGINATE_TIMEOUT_MS.contains(&(ms as i64)) => params.timeout_ms = ms,
            _ => tracing::warn!(
                hook = point,
                field = "timeout",
                "must be {} to {} milliseconds; the default kept",
                ORIGINATE_TIMEOUT_MS.start(),
                ORIGINATE_TIMEOUT_MS.end()
            ),
        }
    }
    if let Some(vars) = data.get("variables").and_then(Value::as_object) {
        params.variables = vars
            .iter()
            .filter_map(|(name, value)| {
                let value = value.as_str().unwrap_or_default();
                // Asterisk splits a `Variable:` header at commas (and `|`): a value with one
                // would set further variables, pbxgate's own among them.
                let ok = variable_name_ok(name)
                    && value.len() <= MAX_PARAM
                    && !value.chars().any(|c| c.is_control() || c == ',' || c == '|');
                if !ok {
                    tracing::warn!(hook = point, variable = %plain(name, 80),
                        "not a variable pbxgate sets (a name of letters, digits and '_', not PBXGATE_*, a value of at most {MAX_PARAM} bytes without control characters, ',' or '|'); left out");
                }
                ok.then(|| (name.clone(), value.to_string()))
            })
            .collect();
    }
    Ok(params)
}

/// A channel variable's name a hook may set: letters, digits and `_` (an optional `_`/`__`
/// prefix for inheritance), at most 80, not one of pbxgate's own (`PBXGATE_*`).
fn variable_name_ok(name: &str) -> bool {
    let bare = name.trim_start_matches('_');
    name.len() <= 80
        && name.len() - bare.len() <= 2
        && bare.starts_with(|c: char| c.is_ascii_alphabetic())
        && bare.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !bare.to_ascii_uppercase().starts_with("PBXGATE_")
}

/// `text` on one line (control characters as spaces), trimmed, at most `max` characters.
fn plain(text: &str, max: usize) -> String {
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    line.trim().to_string()
}

impl ClickToCall {
    /// Deduplicates, rate-limits and originates.
    pub async fn call(&self, req: MakeCall) -> Result<Outcome, ClickToCallError> {
        self.call_as(req, new_call_id()).await
    }

    /// A call the CRM registered itself under `crm_ref` and asks us to place (Bitrix24's
    /// `ONEXTERNALCALLSTART`; an empty `crm_ref`: a callback it has no id for yet). The CRM's
    /// id is handed to the CRM adapter durably before the Originate, so the call that follows
    /// is finished under it; a call that cannot be placed is finished too (a failed outbound
    /// call through the history), so no card stays open in the CRM. The same `crm_ref` again
    /// within [`REMEMBER_FOR`] is a repeated event: answered, nothing placed.
    pub async fn call_for_crm(
        &self,
        req: MakeCall,
        crm_ref: &str,
        crm: &dyn crate::crm::Crm,
        outbox: &crate::outbox::Outbox,
    ) -> Result<Outcome, ClickToCallError> {
        if !crm_ref.is_empty() {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            st.crm_refs
                .retain(|_, at| now.duration_since(*at) < REMEMBER_FOR);
            if st.crm_refs.insert(crm_ref.to_string(), now).is_some() {
                tracing::info!(crm_ref, "the CRM asked for this call again; placed once");
                return Ok(Outcome::Duplicate);
            }
        }
        let call_id = new_call_id();
        let external_id = format!("{}-{call_id}", self.config.pbx.system_id);
        if let Err(e) = crm.adopt(&external_id, crm_ref, req.user_id).await {
            // Without the CRM's id the call would be registered twice: not placed.
            tracing::error!(crm_ref, error = %e, "cannot keep the CRM's call id; the call is not placed");
            return Err(ClickToCallError::Declined(format!(
                "cannot keep the CRM's call id: {e}"
            )));
        }
        let placed = self.call_as(req.clone(), call_id).await;
        let reason = match &placed {
            Ok(Outcome::Originated { .. }) => return placed,
            // A repeated callback: the first one is the call.
            Ok(Outcome::Duplicate) if crm_ref.is_empty() => return placed,
            Ok(Outcome::Duplicate) => "the same call was placed moments ago".to_string(),
            // It may ring after all: its own history (if any) finishes the CRM's call.
            Err(ClickToCallError::Timeout | ClickToCallError::Disconnected) => {
                tracing::warn!(crm_ref, "the Originate's answer was lost; if the call never rings, the CRM's card stays open");
                return placed;
            }
            Err(e) => e.to_string(),
        };
        let record = unplaced_call(
            &external_id,
            Some(req.code.as_str()),
            req.phone.as_str(),
            req.user_id,
            &reason,
        );
        if let Err(e) = outbox.enqueue(record).await {
            tracing::error!(crm_ref, error = %e, "cannot queue the unplaced call; its CRM card stays open");
        }
        placed
    }

    /// A call the CRM registered under `crm_ref` that cannot be placed at all (its user has
    /// no extension): finished as a failed outbound call, so its card does not stay open.
    pub async fn refuse_for_crm(
        &self,
        crm_ref: &str,
        phone: &str,
        user_id: i64,
        reason: &str,
        crm: &dyn crate::crm::Crm,
        outbox: &crate::outbox::Outbox,
    ) {
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st
                .crm_refs
                .insert(crm_ref.to_string(), Instant::now())
                .is_some()
            {
                return;
            }
        }
        let external_id = format!("{}-{}", self.config.pbx.system_id, new_call_id());
        if let Err(e) = crm.adopt(&external_id, crm_ref, user_id).await {
            tracing::error!(crm_ref, error = %e, "cannot keep the CRM's call id; its card stays open");
            return;
        }
        let record = unplaced_call(&external_id, None, phone, user_id, reason);
        if let Err(e) = outbox.enqueue(record).await {
            tracing::error!(crm_ref, error = %e, "cannot queue the unplaced call; its CRM card stays open");
        }
    }

    /// [`ClickToCall::call`] with the ChannelId given.
    async fn call_as(&self, req: MakeCall, call_id: String) -> Result<Outcome, ClickToCallError> {
        let key = (
            req.code.as_str().to_string(),
            req.phone.as_str().to_string(),
        );
        let masked = mask_number(req.phone.as_str());
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let window = self.config.click_to_call.dedupe_window;
            st.recent.retain(|_, at| now.duration_since(*at) < window);
            if st.recent.contains_key(&key) {
                tracing::info!(user_id = req.user_id, code = %req.code, phone = %masked,
                    "click-to-call repeated within the dedupe window; not dialled again");
                return Ok(Outcome::Duplicate);
            }
            let minute = Duration::from_secs(60);
            let per_ext_limit = self.config.click_to_call.per_extension_per_minute as usize;
            let global_limit = self.config.click_to_call.global_per_minute as usize;
            st.global.retain(|t| now.duration_since(*t) < minute);
            st.per_extension.retain(|_, q| {
                q.retain(|t| now.duration_since(*t) < minute);
                !q.is_empty()
            });
            let ext_count = st
                .per_extension
                .get(req.code.as_str())
                .map_or(0, VecDeque::len);
            if per_ext_limit > 0 && ext_count >= per_ext_limit {
                tracing::warn!(user_id = req.user_id, code = %req.code, phone = %masked, "click-to-call refused: extension rate limit");
                return Err(ClickToCallError::ExtensionRateLimit {
                    limit: per_ext_limit,
                });
            }
            if global_limit > 0 && st.global.len() >= global_limit {
                tracing::warn!(user_id = req.user_id, code = %req.code, phone = %masked, "click-to-call refused: global rate limit");
                return Err(ClickToCallError::GlobalRateLimit {
                    limit: global_limit,
                });
            }
            st.recent.insert(key.clone(), now);
            st.per_extension
                .entry(req.code.as_str().to_string())
                .or_default()
                .push_back(now);
            st.global.push_back(now);
        }

        let params = match self
            .customize(&req, &call_id, self.default_params(&req))
            .await
        {
            Ok(params) => params,
            Err(reason) => {
                // Nothing rang: a click after the hook changed its mind is asked again.
                self.state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .recent
                    .remove(&key);
                tracing::info!(user_id = req.user_id, code = %req.code, phone = %masked, %reason,
                    "click-to-call refused by process_originate_params");
                return Err(ClickToCallError::Declined(reason));
            }
        };
        if let Some(tracker) = &self.tracker {
            let hint = crate::calls::ClickToCall {
                code: req.code.as_str().to_string(),
                phone: req.phone.as_str().to_string(),
                user_id: req.user_id,
                external_phone: req.external_phone.as_ref().map(|p| p.as_str().to_string()),
            };
            tracker.expect_click_to_call(&call_id, hint).await;
        }
        let result = self.ami.send(originate(&params, &req, &call_id)).await;
        match result {
            Ok(reply) => {
                tracing::info!(user_id = req.user_id, code = %req.code, phone = %masked, call_id = %call_id,
                    "click-to-call originate accepted by Asterisk");
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                st.in_flight
                    .retain(|_, v| now.duration_since(v.3) < REMEMBER_FOR);
                st.in_flight.insert(
                    reply.action_id,
                    (call_id.clone(), req.code.as_str().to_string(), masked, now),
                );
                Ok(Outcome::Originated { call_id })
            }
            Err(e) => {
                // Let the user try again at once: this attempt did not ring anything (or we cannot tell).
                self.state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .recent
                    .remove(&key);
                tracing::warn!(user_id = req.user_id, code = %req.code, phone = %masked, error = %e, "click-to-call failed");
                Err(e.into())
            }
        }
    }

    /// Logs the outcome of our originates (OriginateResponse, matched by ActionID) until the AMI
    /// client stops. The events stay on the AMI bus for the call tracker.
    pub async fn log_outcomes(self) {
        let mut rx = self.ami.subscribe();
        loop {
            match rx.recv().await {
                Ok(AmiEvent::Event(frame)) if frame.event() == Some("OriginateResponse") => {
                    let Some(id) = frame.action_id() else {
                        continue;
                    };
                    let entry = self
                        .state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .in_flight
                        .remove(id);
                    if let Some((call_id, code, masked, _)) = entry {
                        let response = frame.get("Response").unwrap_or("?");
                        let reason = frame.get("Reason").unwrap_or("?");
                        if response.eq_ignore_ascii_case("Success") {
                            tracing::info!(call_id = %call_id, code = %code, phone = %masked, "click-to-call: manager answered, dialling the customer");
                        } else {
                            tracing::warn!(call_id = %call_id, code = %code, phone = %masked, reason, reason_text = originate_reason(reason),
                                "click-to-call: the manager's leg failed");
                        }
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    static LAG_LOG: crate::telemetry::RateLimit =
                        crate::telemetry::RateLimit::new(std::time::Duration::from_secs(10));
                    if let Some(suppressed) = LAG_LOG.check() {
                        tracing::warn!(
                            missed = n,
                            suppressed,
                            "click-to-call outcome logger lagged"
                        );
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// OriginateResponse `Reason` codes (AST_CONTROL_*).
pub fn originate_reason(reason: &str) -> &'static str {
    match reason {
        "0" => "failed (no such extension or channel)",
        "1" => "hung up before answer",
        "3" => "rang, no answer",
        "4" => "answered",
        "5" => "busy",
        "8" => "congestion or rejected",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> OriginateParams {
        OriginateParams {
            channel: "Local/101@from-internal".into(),
            context: "from-internal".into(),
            exten: "+79991234567".into(),
            caller_id: "\"+79991234567\" <+79991234567>".into(),
            timeout_ms: 30_000,
            variables: BTreeMap::new(),
        }
    }

    fn data(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_hook_changes_only_valid_fields() {
        let p = apply_hook(
            &data(json!({
                "channel": " PJSIP/101 ",
                "exten": "",
                "caller_id": "a\nb",
                "timeout": 15000,
                "variables": {"__SHOP": "1", "X-Y": "2", "__PBXGATE_CODE": "999", "OK": "a\rb", "___A": "3",
                    "SMUGGLE": "1,__PBXGATE_USER_ID=5", "PIPE": "1|__PBXGATE_CODE=9"},
            })),
            defaults(),
        )
        .unwrap();
        assert_eq!(p.channel, "PJSIP/101");
        assert_eq!(p.exten, defaults().exten);
        assert_eq!(p.caller_id, defaults().caller_id);
        assert_eq!(p.timeout_ms, 15_000);
        assert_eq!(
            p.variables,
            BTreeMap::from([("__SHOP".to_string(), "1".to_string())])
        );
        for bad in [0, 999, 600_001, -5] {
            let p = apply_hook(&data(json!({"timeout": bad})), defaults()).unwrap();
            assert_eq!(p.timeout_ms, 30_000, "{bad}");
        }
    }

    #[test]
    fn a_non_empty_refusal_wins() {
        assert_eq!(
            apply_hook(
                &data(json!({"refuse": " not\nnow ", "exten": "1"})),
                defaults()
            ),
            Err("not now".to_string())
        );
        assert_eq!(
            apply_hook(&data(json!({"refuse": "  "})), defaults()),
            Ok(defaults())
        );
        let long = "x".repeat(500);
        assert_eq!(
            apply_hook(&data(json!({ "refuse": long })), defaults())
                .unwrap_err()
                .len(),
            MAX_REASON
        );
    }
}
