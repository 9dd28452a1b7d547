//! Click-to-call: retailCRM's `makeCallUrl` becomes an AMI Originate that rings the manager's
//! extension first and then dials the customer.
//!
//! Protections: the same (extension, number) within `click_to_call.dedupe_window` is answered but
//! dialled once (users double-click); per-extension and global limits per minute answer 429.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::base::ident::{mask_number, ExtensionCode, PhoneNumber};
use crate::config::Config;
use crate::pbx::ami::{Action, AmiClient, AmiError, AmiEvent};
use crate::pipeline::CallTracker;

/// Prefix of the ChannelId (Uniqueid) we give every click-to-call, so it is known before it rings.
pub const CHANNEL_ID_PREFIX: &str = "pbxgate-c2c-";
/// How long an originate is remembered to match its OriginateResponse.
const REMEMBER_FOR: Duration = Duration::from_secs(300);

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
            .replace("{code}", req.code.as_str())
            .replace("{ami.internal_context}", &ami.internal_context)
            .replace("{context}", &ami.internal_context);
        let mut action = Action::new("Originate")
            .header("Channel", channel)
            .header("Context", &ami.outbound_context)
            .header("Exten", req.phone.as_str())
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
    pub async fn call(&self, req: MakeCall) -> Result<Outcome, ClickToCallError> {
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
                code: req.code.as_str().to_string(),
                phone: req.phone.as_str().to_string(),
                user_id: req.user_id,
                external_phone: req.external_phone.as_ref().map(|p| p.as_str().to_string()),
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
