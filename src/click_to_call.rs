//! Click-to-call: retailCRM's `makeCallUrl` becomes an AMI Originate that rings the manager's
//! extension first and then dials the customer.
//!
//! Protections: the same (extension, number) within `click_to_call.dedupe_window` is answered but
//! dialled once (users double-click); per-extension and global limits per minute answer 429.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use validator::{Validate, ValidationError};

use crate::base::ident::{mask_number, normalize_number};
use crate::config::Config;
use crate::http::params::Params;
use crate::http::ApiError;
use crate::pbx::ami::{Action, AmiClient, AmiError, AmiEvent};
use crate::pipeline::CallTracker;

/// Prefix of the ChannelId (Uniqueid) we give every click-to-call, so it is known before it rings.
pub const CHANNEL_ID_PREFIX: &str = "pbxgate-c2c-";
/// How long an originate is remembered to match its OriginateResponse.
const REMEMBER_FOR: Duration = Duration::from_secs(300);

/// A validated click-to-call request.
#[derive(Debug, Clone, Validate)]
pub struct MakeCall {
    #[validate(custom(function = "extension_code"))]
    pub code: String,
    /// Normalised: digits with an optional leading `+`.
    #[validate(custom(function = "dial_number"))]
    pub phone: String,
    #[validate(range(min = 1, message = "must be a positive integer"))]
    pub user_id: i64,
    #[validate(custom(function = "dial_number"))]
    pub external_phone: Option<String>,
}

fn extension_code(value: &str) -> Result<(), ValidationError> {
    if crate::config::is_extension_code(value) {
        Ok(())
    } else {
        Err(ValidationError::new("code").with_message("must be 1 to 16 of 0-9, '*', '#'".into()))
    }
}

fn dial_number(value: &str) -> Result<(), ValidationError> {
    let digits = value.strip_prefix('+').unwrap_or(value);
    if (3..=20).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(ValidationError::new("phone")
            .with_message("must be 3 to 20 digits with an optional leading '+'".into()))
    }
}

impl MakeCall {
    /// Reads and validates the parameters; every problem is reported with its field.
    pub fn from_params(params: &Params) -> Result<MakeCall, ApiError> {
        let mut errors = std::collections::BTreeMap::new();
        let mut need = |key: &str| match params.get(key).map(str::trim).filter(|v| !v.is_empty()) {
            Some(v) => Some(v.to_string()),
            None => {
                errors.insert(key.to_string(), "is required".to_string());
                None
            }
        };
        let code = need("code");
        let phone = need("phone");
        let user_id = need("userId");
        let user_id = match user_id.map(|u| u.parse::<i64>()) {
            Some(Ok(id)) => id,
            Some(Err(_)) => {
                errors.insert("userId".into(), "must be a positive integer".into());
                0
            }
            None => 0,
        };
        let external_phone = params
            .get("externalPhone")
            .map(normalize_number)
            .filter(|p| !p.is_empty());
        let req = MakeCall {
            code: code.unwrap_or_default(),
            phone: normalize_number(&phone.unwrap_or_default()),
            user_id,
            external_phone,
        };
        if let Err(e) = req.validate() {
            for (field, list) in e.field_errors() {
                let name = match field.as_ref() {
                    "user_id" => "userId",
                    "external_phone" => "externalPhone",
                    other => other,
                };
                if let Some(first) = list.first() {
                    errors.entry(name.to_string()).or_insert_with(|| {
                        first
                            .message
                            .as_deref()
                            .unwrap_or("is not valid")
                            .to_string()
                    });
                }
            }
        }
        if errors.is_empty() {
            Ok(req)
        } else {
            Err(ApiError::fields(StatusCode::BAD_REQUEST, errors))
        }
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
}

#[derive(Clone)]
pub struct ClickToCall {
    config: Arc<Config>,
    ami: AmiClient,
    /// Told about each call before it is placed, so the call model attributes it.
    tracker: Option<CallTracker>,
    state: Arc<Mutex<Limiter>>,
}

impl ClickToCall {
    pub fn new(config: Arc<Config>, ami: AmiClient, tracker: Option<CallTracker>) -> ClickToCall {
        ClickToCall {
            config,
            ami,
            tracker,
            state: Arc::new(Mutex::new(Limiter {
                recent: HashMap::new(),
                per_extension: HashMap::new(),
                global: VecDeque::new(),
                in_flight: HashMap::new(),
            })),
        }
    }

    /// The Originate for a request (public for tests and documentation).
    pub fn originate_action(&self, req: &MakeCall, call_id: &str) -> Action {
        let ami = &self.config.ami;
        let channel = ami
            .originate_channel
            .replace("{code}", &req.code)
            .replace("{ami.internal_context}", &ami.internal_context)
            .replace("{context}", &ami.internal_context);
        let mut action = Action::new("Originate")
            .header("Channel", channel)
            .header("Context", &ami.outbound_context)
            .header("Exten", &req.phone)
            .header("Priority", "1")
            .header("CallerID", format!("\"{}\" <{}>", req.phone, req.phone))
            .header("Timeout", ami.originate_timeout.as_millis().to_string())
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
        action
    }

    /// Deduplicates, rate-limits and originates.
    pub async fn call(&self, req: MakeCall) -> Result<Outcome, ApiError> {
        let key = (req.code.clone(), req.phone.clone());
        let masked = mask_number(&req.phone);
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
            let ext_count = st.per_extension.get(&req.code).map_or(0, VecDeque::len);
            if per_ext_limit > 0 && ext_count >= per_ext_limit {
                tracing::warn!(user_id = req.user_id, code = %req.code, phone = %masked, "click-to-call refused: extension rate limit");
                return Err(ApiError::field(
                    StatusCode::TOO_MANY_REQUESTS,
                    "code",
                    format!("more than {per_ext_limit} calls per minute from this extension"),
                ));
            }
            if global_limit > 0 && st.global.len() >= global_limit {
                tracing::warn!(user_id = req.user_id, code = %req.code, phone = %masked, "click-to-call refused: global rate limit");
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("more than {global_limit} click-to-calls per minute"),
                ));
            }
            st.recent.insert(key.clone(), now);
            st.per_extension
                .entry(req.code.clone())
                .or_default()
                .push_back(now);
            st.global.push_back(now);
        }

        let call_id = format!(
            "{CHANNEL_ID_PREFIX}{}-{:08x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
            rand::random::<u32>()
        );
        if let Some(tracker) = &self.tracker {
            let hint = crate::calls::ClickToCall {
                code: req.code.clone(),
                phone: req.phone.clone(),
                user_id: req.user_id,
                external_phone: req.external_phone.clone(),
            };
            tracker.expect_click_to_call(&call_id, hint).await;
        }
        let result = self.ami.send(self.originate_action(&req, &call_id)).await;
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
                    (call_id.clone(), req.code.clone(), masked, now),
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
                Err(match e {
                    AmiError::Refused(msg) => ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        format!("Asterisk refused the call: {msg}"),
                    ),
                    AmiError::Timeout(_) => ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "Asterisk did not answer the Originate in time",
                    ),
                    AmiError::Disconnected => ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the PBX link dropped while placing the call; it may or may not ring",
                    ),
                    other => ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("PBX unavailable: {other}"),
                    ),
                })
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

/// The HTTP answer for a click-to-call request.
pub async fn handle(c2c: &ClickToCall, params: &Params) -> Result<serde_json::Value, ApiError> {
    let req = MakeCall::from_params(params)?;
    match c2c.call(req).await? {
        Outcome::Originated { call_id } => {
            Ok(serde_json::json!({"success": true, "callId": call_id}))
        }
        Outcome::Duplicate => Ok(serde_json::json!({"success": true, "duplicate": true})),
    }
}
