//! `[calls]`: how calls are recognised and classified, and who is credited with them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use validator::{Validate, ValidationError};

use super::checks::{
    backoff, phone_number, problem, regex_pattern, request_timeout, unassigned_code,
};
use crate::base::ident::PhoneNumber;

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    /// Dialplan contexts where calls from the carrier enter.
    pub inbound_contexts: Vec<String>,
    /// Endpoints (PJSIP/<endpoint>-...) that are carrier trunks.
    pub trunk_endpoints: Vec<String>,
    /// What an internal extension looks like (a regular expression).
    #[validate(custom(function = "regex_pattern"))]
    pub extension_pattern: String,
    /// Calls with no event for this long are closed by the reaper (their channels vanished).
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub max_silence: Duration,
    /// Send extension-to-extension calls to the CRM too (as outgoing calls of the caller).
    pub send_internal: bool,
    /// A live event (pop-up) not delivered within this time is dropped.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub live_event_deadline: Duration,
    /// Who is credited with an inbound call that rang several extensions and nobody answered.
    pub missed_owner: MissedOwner,
    /// The manager of calls no extension touched (hung up in the IVR or a queue, an outbound
    /// call reported without its extension): an extension code, or `user:<id>`. Empty: such
    /// calls are kept locally, held, and never sent (the CRM requires a manager).
    #[validate(custom(function = "unassigned_code"))]
    pub unassigned_code: String,
    /// The company line of outbound calls when the PBX does not show the caller ID it presented:
    /// one number, or a table of trunk → number (`{ trunk = "+74951234567", "*" = "..." }`).
    #[validate(custom(function = "outbound_line"))]
    pub outbound_line: OutboundLine,
}

/// `calls.missed_owner`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissedOwner {
    /// The manager routing chose for the call if that one rang, else the first that rang.
    #[default]
    Responsible,
    FirstRung,
    LastRung,
}

/// `calls.unassigned_code`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignee {
    Code(String),
    User(i64),
}

/// `calls.outbound_line`: empty, one number, or per trunk (`*` for the others).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OutboundLine {
    One(String),
    PerTrunk(BTreeMap<String, String>),
}

impl Default for OutboundLine {
    fn default() -> Self {
        OutboundLine::One(String::new())
    }
}

impl OutboundLine {
    /// The line for a call through `trunk` (`PJSIP/trunk`, or the bare endpoint name).
    pub fn for_trunk(&self, trunk: Option<&str>) -> Option<&str> {
        let found = match self {
            OutboundLine::One(n) => Some(n.as_str()),
            OutboundLine::PerTrunk(map) => {
                let endpoint = trunk.map(|t| t.rsplit('/').next().unwrap_or(t));
                trunk
                    .and_then(|t| map.get(t))
                    .or_else(|| endpoint.and_then(|e| map.get(e)))
                    .or_else(|| map.get("*"))
                    .map(String::as_str)
            }
        };
        found.filter(|n| !n.is_empty())
    }
}

impl CallsConfig {
    /// `unassigned_code` parsed; `None` when empty.
    pub fn unassigned(&self) -> Option<Assignee> {
        let v = self.unassigned_code.trim();
        if v.is_empty() {
            return None;
        }
        match v.strip_prefix("user:") {
            Some(id) => id.parse().ok().map(Assignee::User),
            None => Some(Assignee::Code(v.to_string())),
        }
    }
}

impl Default for CallsConfig {
    fn default() -> Self {
        CallsConfig {
            inbound_contexts: vec![
                "from-trunk".into(),
                "from-pstn".into(),
                "from-did-direct".into(),
                "ext-did".into(),
            ],
            trunk_endpoints: vec!["trunk".into()],
            extension_pattern: "^[0-9]{2,5}$".into(),
            max_silence: Duration::from_secs(3600),
            send_internal: false,
            live_event_deadline: Duration::from_secs(5),
            missed_owner: MissedOwner::Responsible,
            unassigned_code: String::new(),
            outbound_line: OutboundLine::default(),
        }
    }
}

/// `calls.outbound_line`: each number empty or a phone number.
fn outbound_line(value: &OutboundLine) -> Result<(), ValidationError> {
    let check = |n: &str| n.is_empty() || PhoneNumber::is_valid(n);
    match value {
        OutboundLine::One(n) if !check(n) => phone_number(n),
        OutboundLine::PerTrunk(map) => match map.iter().find(|(_, n)| !check(n)) {
            Some((trunk, n)) => Err(problem(format!("{trunk}: {n:?} {}", PhoneNumber::RULE))),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}
