//! What the call model produces: live events (pop-ups) and finished call records.

use serde::{Deserialize, Serialize};

use super::model::{ClickToCall, Millis};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
    Internal,
}

/// How a call ended (each CRM adapter maps it to its own terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Answered,
    NoAnswer,
    Busy,
    Failed,
    NotAllowed,
    Unknown,
}

/// One extension rung during the call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    pub extension: String,
    pub start: Millis,
    pub end: Option<Millis>,
    /// Final DialStatus (ANSWER, CANCEL, NOANSWER, BUSY, ...), None while ringing.
    pub status: Option<String>,
}

/// A span during which the customer was connected with an extension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TalkSegment {
    pub extension: String,
    pub start: Millis,
    pub end: Option<Millis>,
    pub customer_channel: String,
    pub extension_channel: String,
    /// Time within the segment that either party was on hold.
    #[serde(default)]
    pub hold_ms: Millis,
}

/// A finished call, ready for the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    /// Stable id: `<pbx.system_id>-<linkedid>`; `externalId` / `callExternalId` in the CRM.
    pub external_id: String,
    pub linkedid: String,
    pub direction: Direction,
    /// Inbound: the caller; outbound: the number dialled; internal: the calling extension.
    pub customer_number: String,
    /// Inbound: the number the customer dialled.
    pub did: Option<String>,
    /// The manager: who talked last, else who placed (out) or the only one rung (in).
    pub code: Option<String>,
    pub user_id: Option<i64>,
    pub external_phone: Option<String>,
    pub start: Millis,
    pub answer: Option<Millis>,
    pub end: Millis,
    /// Until answered (or until the end, if never answered).
    pub wait_seconds: u64,
    /// From the first answer to the end.
    pub talk_seconds: u64,
    /// Time actually connected with a manager: the talk segments without hold.
    pub connected_seconds: u64,
    pub outcome: Outcome,
    pub answered_by: Option<String>,
    pub final_extension: Option<String>,
    pub placed_by: Option<String>,
    pub click_to_call: bool,
    pub rings: Vec<Ring>,
    pub talk: Vec<TalkSegment>,
    pub recordings: Vec<String>,
    pub customer_dial_status: Option<String>,
    /// Closed by the reaper or a resync, not by its own hangups: details may be incomplete.
    pub reaped: bool,
    /// The carrier channel without its sequence (`PJSIP/trunk`), when the call used one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trunk: Option<String>,
    /// The customer's number as the PBX gave it, when normalisation changed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_original: Option<String>,
    /// How the registration rules decided (`register by default`, `ignore by rules[1]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<String>,
    /// The call must not reach the CRM (a registration rule, an employee's mobile).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignored: bool,
}

/// Live events for the CRM's pop-ups.
#[derive(Debug, Clone, PartialEq)]
pub enum LiveEvent {
    /// Inbound: these extensions started ringing.
    Ringing {
        external_id: String,
        phone: String,
        did: Option<String>,
        codes: Vec<String>,
        trunk: Option<String>,
    },
    /// Outbound: an extension (or our click-to-call) is dialling the customer.
    Dialing {
        external_id: String,
        phone: String,
        codes: Vec<String>,
        click_to_call: Option<ClickToCall>,
        trunk: Option<String>,
    },
    /// The call ended.
    Hangup {
        external_id: String,
        phone: String,
        direction: Direction,
        codes: Vec<String>,
        outcome: Outcome,
    },
}

impl LiveEvent {
    /// The call's `externalId`.
    pub fn external_id(&self) -> &str {
        match self {
            LiveEvent::Ringing { external_id, .. }
            | LiveEvent::Dialing { external_id, .. }
            | LiveEvent::Hangup { external_id, .. } => external_id,
        }
    }

    /// The event's kind, for log lines.
    pub fn kind(&self) -> &'static str {
        match self {
            LiveEvent::Ringing { .. } => "ringing",
            LiveEvent::Dialing { .. } => "dialing",
            LiveEvent::Hangup { .. } => "hangup",
        }
    }
}

impl CallRecord {
    /// Who the `hangup` event is for: the manager, else every extension that rang (each had a
    /// pop-up).
    pub fn hangup_codes(&self) -> Vec<String> {
        if let Some(code) = &self.code {
            return vec![code.clone()];
        }
        let mut codes: Vec<String> = Vec::new();
        for r in &self.rings {
            if !codes.contains(&r.extension) {
                codes.push(r.extension.clone());
            }
        }
        codes
    }

    /// The extension an unanswered call rang first, last, or `preferred` if it rang.
    pub fn rung(
        &self,
        owner: crate::config::MissedOwner,
        preferred: Option<&str>,
    ) -> Option<String> {
        use crate::config::MissedOwner;
        let mut rings: Vec<&Ring> = self.rings.iter().collect();
        // Stable: rings that started together keep the order the PBX dialled them in.
        rings.sort_by_key(|r| r.start);
        let pick = match owner {
            MissedOwner::Responsible => preferred
                .and_then(|p| rings.iter().find(|r| r.extension == p))
                .or_else(|| rings.first()),
            MissedOwner::FirstRung => rings.first(),
            MissedOwner::LastRung => rings.last(),
        };
        pick.map(|r| r.extension.clone())
    }

    /// A finished inbound call from +79991234567 answered by 101 (for tests and benchmarks).
    #[doc(hidden)]
    pub fn sample(id: &str) -> CallRecord {
        CallRecord {
            external_id: id.into(),
            linkedid: id.into(),
            direction: Direction::In,
            customer_number: "+79991234567".into(),
            did: None,
            code: Some("101".into()),
            user_id: None,
            external_phone: None,
            start: 1_795_255_200_000,
            answer: Some(1_795_255_205_000),
            end: 1_795_255_265_000,
            wait_seconds: 5,
            talk_seconds: 60,
            connected_seconds: 60,
            outcome: Outcome::Answered,
            answered_by: Some("101".into()),
            final_extension: Some("101".into()),
            placed_by: None,
            click_to_call: false,
            rings: vec![],
            talk: vec![],
            recordings: vec![],
            customer_dial_status: None,
            reaped: false,
            trunk: None,
            phone_original: None,
            registration: None,
            ignored: false,
        }
    }
}
