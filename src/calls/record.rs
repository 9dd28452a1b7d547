//! What the call model produces: live events (pop-ups) and finished call records.
//!
//! A [`CallRecord`] is CRM-neutral: besides what retailCRM's history needs it carries what the
//! customisation hooks (`call_full`) and other CRMs need: the call's main channel, one
//! [`Conversation`] per extension leg (and per span the customer spent parked), the numbers as
//! the PBX gave them and a SIP-style result ([`Outcome::sip_code`]). Records are stored as JSON
//! (outbox envelopes): every field added after the first version has a serde default, so a record
//! written by an older version still loads.

use serde::{Deserialize, Serialize};

use crate::base::clock::Millis;

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

impl Outcome {
    /// The call's result as a SIP status code (`call_full.result`):
    ///
    /// | outcome | code |
    /// |---|---|
    /// | answered | 200 OK |
    /// | busy | 486 Busy Here |
    /// | no answer (incl. missed, abandoned) | 480 Temporarily Unavailable |
    /// | not allowed (declined, barred) | 603 Decline |
    /// | failed (congestion, unreachable, bad number) | 503 Service Unavailable |
    /// | unknown | 0: no status is known (not a SIP code, so never mistaken for one) |
    pub fn sip_code(self) -> u16 {
        match self {
            Outcome::Answered => 200,
            Outcome::Busy => 486,
            Outcome::NoAnswer => 480,
            Outcome::NotAllowed => 603,
            Outcome::Failed => 503,
            Outcome::Unknown => 0,
        }
    }
}

/// What a channel is for its call (`call_full` `channel.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    /// From an external number to an extension.
    Incoming,
    /// From an extension to an external number.
    Outgoing,
    /// From an extension to an extension.
    Local,
    /// Cannot be told (no extension and no customer seen).
    #[default]
    Unknown,
}

impl From<Direction> for ChannelKind {
    fn from(d: Direction) -> ChannelKind {
        match d {
            Direction::In => ChannelKind::Incoming,
            Direction::Out => ChannelKind::Outgoing,
            Direction::Internal => ChannelKind::Local,
        }
    }
}

/// The call's main channel: the one whose Uniqueid is the call's Linkedid (the first channel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MainChannel {
    /// Uniqueid (= the call's Linkedid).
    pub id: String,
    /// Channel name as the PBX gave it (`PJSIP/trunk-00000005`); empty if unknown.
    #[serde(default)]
    pub name: String,
    /// The call's type as seen from this channel.
    #[serde(default, rename = "type")]
    pub kind: ChannelKind,
    /// When the channel was created.
    pub start: Millis,
    /// When the channel itself was answered (state Up); None if it never was. A channel can be
    /// up before anyone talks (an IVR or a queue answers it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<Millis>,
    /// When it hung up; None if that was not seen (a reaped call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Millis>,
}

/// One conversation: an extension's leg of the call, from the moment it was asked for (its
/// ring) to its end, answered or not; or a span the customer spent parked (`parked`, no
/// extension). Itgrix's `call_full.conversations` and Bitrix24's register/finish are per
/// conversation. Ordered by `start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// Uniqueid of the extension's channel (of the parked channel for a parking span); empty
    /// when the source does not know it (webhooks, the CDR of a dialled phone).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub channel: String,
    /// Name of that channel (`PJSIP/102-00000007`); empty if unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub channel_name: String,
    /// Uniqueid of the customer-side channel it was connected with; empty if unknown or never
    /// connected.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub customer_channel: String,
    /// The extension; None for a parking span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension: Option<String>,
    /// Asked for: the extension started ringing (or was connected without ringing); the call
    /// was parked.
    pub start: Millis,
    /// Connected with the customer (the first time); None if never (and for a parking span).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<Millis>,
    /// Ended: its last connection ended, its ring ended, the call left the parking lot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Millis>,
    /// The customer sat in a parking lot (AMI `ParkedCall` until `UnParkedCall`,
    /// `ParkedCallGiveUp` or `ParkedCallTimeOut`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub parked: bool,
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
    /// The main channel (Uniqueid = Linkedid), when the source knows it (AMI, CDR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_channel: Option<MainChannel>,
    /// Every conversation of the call (one per extension leg, one per parking span), by start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conversations: Vec<Conversation>,
    /// The calling number as the PBX gave it, never normalised: inbound the caller ID,
    /// outbound the extension that placed it, internal the calling extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_number: Option<String>,
    /// The called number as the PBX gave it, never normalised: inbound the DID, outbound the
    /// number dialled towards the carrier, internal the extension called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_number: Option<String>,
}

/// A click-to-call we placed, announced before its first channel appears.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClickToCall {
    pub code: String,
    pub phone: String,
    pub user_id: i64,
    pub external_phone: Option<String>,
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
    /// Who rings and who talks changed (a ring ended, an answer, a transfer): the state after
    /// the change, for a call already announced by `Ringing` or `Dialing`. CRMs that keep call
    /// cards per manager (Bitrix24) show and hide them from it; others ignore it.
    Progress {
        external_id: String,
        phone: String,
        direction: Direction,
        /// Extensions ringing now.
        ringing: Vec<String>,
        /// Extensions talking with the customer now.
        talking: Vec<String>,
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
            | LiveEvent::Progress { external_id, .. }
            | LiveEvent::Hangup { external_id, .. } => external_id,
        }
    }

    /// The event's kind, for log lines.
    pub fn kind(&self) -> &'static str {
        match self {
            LiveEvent::Ringing { .. } => "ringing",
            LiveEvent::Dialing { .. } => "dialing",
            LiveEvent::Progress { .. } => "progress",
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
            main_channel: Some(MainChannel {
                id: id.into(),
                name: "PJSIP/trunk-00000001".into(),
                kind: ChannelKind::Incoming,
                start: 1_795_255_200_000,
                answer: Some(1_795_255_205_000),
                end: Some(1_795_255_265_000),
            }),
            conversations: vec![Conversation {
                channel: "1795255200.2".into(),
                channel_name: "PJSIP/101-00000002".into(),
                customer_channel: id.into(),
                extension: Some("101".into()),
                start: 1_795_255_200_000,
                answer: Some(1_795_255_205_000),
                end: Some(1_795_255_265_000),
                parked: false,
            }],
            from_number: Some("+79991234567".into()),
            to_number: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as the version before `main_channel`, `conversations`, `from_number` and
    /// `to_number` wrote it (the blind transfer of capture 07, serialised by that version).
    const PREVIOUS_SHAPE: &str = r#"{"external_id":"lab-1795264605.55","linkedid":"1795264605.55","direction":"in","customer_number":"+491701234567","did":"+4930111101","code":"102","user_id":null,"external_phone":"+4930111101","start":1795264605423,"answer":1795264607435,"end":1795264625443,"wait_seconds":2,"talk_seconds":18,"connected_seconds":15,"outcome":"answered","answered_by":"101","final_extension":"102","placed_by":null,"click_to_call":false,"rings":[{"extension":"101","start":1795264605425,"end":1795264607435,"status":"ANSWER"},{"extension":"102","start":1795264612441,"end":1795264615449,"status":"ANSWER"}],"talk":[{"extension":"101","start":1795264607435,"end":1795264612437,"customer_channel":"1795264605.55","extension_channel":"1795264605.56","hold_ms":0},{"extension":"102","start":1795264615450,"end":1795264625443,"customer_channel":"1795264605.55","extension_channel":"1795264612.57","hold_ms":0}],"recordings":["/var/spool/asterisk/monitor/20261121-123645_in_+491701234567_to_+4930111101_1795264605.55.wav","/var/spool/asterisk/monitor/20261121-123652_internal_+491701234567_to_102_1795264605.55.wav"],"customer_dial_status":null,"reaped":false,"trunk":"PJSIP/trunk"}"#;

    #[test]
    fn a_record_of_the_previous_shape_loads_with_the_new_fields_empty() {
        let r: CallRecord = serde_json::from_str(PREVIOUS_SHAPE).unwrap();
        assert_eq!(r.main_channel, None);
        assert!(r.conversations.is_empty());
        assert_eq!((r.from_number, r.to_number), (None, None));
        // What it had is all there.
        assert_eq!(
            (
                r.final_extension.as_deref(),
                r.talk.len(),
                r.trunk.as_deref()
            ),
            (Some("102"), 2, Some("PJSIP/trunk"))
        );
        assert_eq!(r.talk[1].extension_channel, "1795264612.57");
    }

    #[test]
    fn empty_new_fields_are_not_written() {
        let mut r: CallRecord = serde_json::from_str(PREVIOUS_SHAPE).unwrap();
        let json = serde_json::to_string(&r).unwrap();
        for field in ["main_channel", "conversations", "from_number", "to_number"] {
            assert!(!json.contains(field), "{field} in {json}");
        }
        r.conversations.push(Conversation {
            channel: String::new(),
            channel_name: String::new(),
            customer_channel: String::new(),
            extension: Some("101".into()),
            start: 1,
            answer: None,
            end: None,
            parked: false,
        });
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["conversations"],
            serde_json::json!([{"extension": "101", "start": 1}])
        );
    }

    #[test]
    fn the_sample_round_trips_with_its_channels() {
        let r = CallRecord::sample("pbx-1");
        let back: CallRecord = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let main = back.main_channel.unwrap();
        assert_eq!(
            (main.id.as_str(), main.kind),
            ("pbx-1", ChannelKind::Incoming)
        );
        let json = serde_json::to_value(CallRecord::sample("pbx-1")).unwrap();
        assert_eq!(json["main_channel"]["type"], "incoming");
    }

    #[test]
    fn outcomes_map_to_sip_codes() {
        let codes: Vec<u16> = [
            Outcome::Answered,
            Outcome::Busy,
            Outcome::NoAnswer,
            Outcome::NotAllowed,
            Outcome::Failed,
            Outcome::Unknown,
        ]
        .into_iter()
        .map(Outcome::sip_code)
        .collect();
        assert_eq!(codes, vec![200, 486, 480, 603, 503, 0]);
    }

    #[test]
    fn directions_give_channel_types() {
        let kinds: Vec<ChannelKind> = [Direction::In, Direction::Out, Direction::Internal]
            .into_iter()
            .map(ChannelKind::from)
            .collect();
        assert_eq!(
            kinds,
            vec![
                ChannelKind::Incoming,
                ChannelKind::Outgoing,
                ChannelKind::Local
            ]
        );
    }
}
