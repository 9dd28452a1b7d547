//! `[ami]`: the Asterisk Manager Interface connection (login, keepalive, reconnect, buffers)
//! and the dialplan names click-to-call originates into.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use validator::Validate;

use super::checks::problem;
use super::checks::{ami_events, backoff, channel_template, dialplan_name, request_timeout};
use crate::base::secret::Secret;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AmiAuth {
    /// `Login` with `Secret`.
    #[default]
    Plain,
    /// `Challenge` then `Login` with `Key = md5(challenge + secret)`: the secret never crosses the wire.
    Md5,
}

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct AmiConfig {
    #[validate(length(min = 1, max = 255, message = "must not be empty"))]
    pub host: String,
    #[validate(range(min = 1, message = "must be between 1 and 65535"))]
    pub port: u16,
    #[validate(length(min = 1, max = 80, message = "must be 1 to 80 characters"))]
    pub username: String,
    pub secret: Secret,
    pub auth: AmiAuth,
    /// The `Events:` value at login: `on`, `off`, or a class list such as `call,agent,cdr,system`.
    #[validate(custom(function = "ami_events"))]
    pub events: String,
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub connect_timeout: Duration,
    /// Time allowed for Asterisk to answer an action.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub action_timeout: Duration,
    /// Keepalive: a `Ping` this often; no answer within `ping_timeout` means the link is dead.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub ping_timeout: Duration,
    /// Reconnect backoff: exponential with jitter between these bounds.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub reconnect_max: Duration,
    /// After Asterisk refused the login (a wrong or empty secret) the next try waits this long:
    /// repeated failed logins get the host banned (fail2ban reads Asterisk's security log).
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub auth_retry: Duration,
    /// Events buffered per subscriber before it is told it lagged.
    #[validate(range(min = 16, max = 1048576, message = "must be between 16 and 1048576"))]
    pub event_buffer: usize,
    /// Events that may wait for the call tracker (about 1 KB each). Below this nothing is
    /// dropped, however fast Asterisk sends; past it events are dropped until half of it is
    /// handled, then the calls are resynced.
    #[validate(range(
        min = 1000,
        max = 50000000,
        message = "must be between 1000 and 50000000"
    ))]
    pub max_backlog: usize,
    /// Context where managers' extensions are dialled (`{context}` in `originate_channel`).
    #[validate(custom(function = "dialplan_name"))]
    pub internal_context: String,
    /// Context where the customer's number is dialled.
    #[validate(custom(function = "dialplan_name"))]
    pub outbound_context: String,
    /// The manager's leg of a click-to-call: `{code}` is the extension, `{context}` the
    /// internal context. E.g. `Local/{code}@{context}` or `PJSIP/{code}`.
    #[validate(custom(function = "channel_template"))]
    pub originate_channel: String,
    /// How long the manager's phone rings before the click-to-call gives up.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub originate_timeout: Duration,
    /// How long the link may be down (or not up yet) before `/ready` answers 503.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "ready_grace"))]
    pub ready_grace: Duration,
}

fn ready_grace(value: &Duration) -> Result<(), validator::ValidationError> {
    if *value < Duration::from_millis(100) || *value > Duration::from_secs(86400) {
        return Err(problem("must be between 100ms and 1d"));
    }
    Ok(())
}

impl Default for AmiConfig {
    fn default() -> Self {
        AmiConfig {
            host: "127.0.0.1".into(),
            port: 5038,
            username: "pbxgate".into(),
            secret: Secret::default(),
            auth: AmiAuth::Plain,
            events: "on".into(),
            connect_timeout: Duration::from_secs(5),
            action_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            auth_retry: Duration::from_secs(300),
            event_buffer: 8192,
            max_backlog: 1_000_000,
            internal_context: "from-internal".into(),
            outbound_context: "from-internal".into(),
            originate_channel: "Local/{code}@{context}".into(),
            originate_timeout: Duration::from_secs(30),
            ready_grace: Duration::from_secs(30),
        }
    }
}
