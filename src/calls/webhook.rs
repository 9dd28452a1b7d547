//! Call events posted by a PBX over HTTP (`POST /pbx/events`), for PBXs without AMI. They feed
//! a small state machine that produces exactly the same live events and call records as the
//! AMI model, so everything downstream is identical.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::base::ident::{normalize_number, ExtensionCode, PhoneNumber};

use super::model::{Millis, Output, GRACE};
use super::record::{CallRecord, Conversation, Direction, LiveEvent, Outcome, Ring, TalkSegment};

/// Most events accepted in one request.
pub const MAX_EVENTS_PER_REQUEST: usize = 100;

/// An `at` before 2000-01-01 is a clock that was never set.
const EARLIEST_AT: Millis = 946_684_800_000;
/// How far ahead of our clock an `at` may be (the PBX's clock drifting).
const MAX_AT_AHEAD: Millis = 3_600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Start,
    Ringing,
    Answer,
    Transfer,
    Hangup,
    /// The extension stopped ringing without answering (its pop-up is closed): CallGate's
    /// `telephony_hide`. Not posted to `/pbx/events`.
    #[serde(rename = "ring_end")]
    RingEnd,
}

/// One event as posted. Validated by [`parse_events`].
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookEvent {
    pub call_id: String,
    pub kind: Kind,
    pub direction: Option<Direction>,
    pub phone: Option<String>,
    pub did: Option<String>,
    pub extension: Option<String>,
    pub at: Option<Millis>,
    pub result: Option<Outcome>,
    pub record: Option<String>,
}

/// Parses a body holding one event object or an array of them. Errors name the field
/// (`[2].extension: is required for ringing`).
pub fn parse_events(body: &[u8]) -> Result<Vec<WebhookEvent>, BTreeMap<String, String>> {
    let one = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| one("body", &format!("is not JSON: {e}")))?;
    let (items, array) = match value {
        serde_json::Value::Array(a) => (a, true),
        v @ serde_json::Value::Object(_) => (vec![v], false),
        _ => return Err(one("body", "must be an event object or an array of them")),
    };
    if items.is_empty() {
        return Err(one("body", "holds no event"));
    }
    if items.len() > MAX_EVENTS_PER_REQUEST {
        return Err(one(
            "body",
            &format!("more than {MAX_EVENTS_PER_REQUEST} events"),
        ));
    }
    let mut errors = BTreeMap::new();
    let mut events = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let prefix = if array {
            format!("[{i}].")
        } else {
            String::new()
        };
        match parse_one(item) {
            Ok(e) => events.push(e),
            Err((field, msg)) => {
                errors.insert(format!("{prefix}{field}"), msg);
            }
        }
    }
    if errors.is_empty() {
        Ok(events)
    } else {
        Err(errors)
    }
}

fn parse_one(v: &serde_json::Value) -> Result<WebhookEvent, (String, String)> {
    let err = |f: &str, m: &str| (f.to_string(), m.to_string());
    let obj = v
        .as_object()
        .ok_or_else(|| err("event", "must be an object"))?;
    let text = |k: &str| -> Result<Option<String>, (String, String)> {
        match obj.get(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s))
                if s.len() <= 256 && !s.chars().any(char::is_control) =>
            {
                Ok(Some(s.trim().to_string()).filter(|s| !s.is_empty()))
            }
            Some(serde_json::Value::String(_)) => {
                Err(err(k, "must be at most 256 printable characters"))
            }
            Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(err(k, "must be a string")),
        }
    };
    let known = [
        "call_id",
        "event",
        "direction",
        "phone",
        "did",
        "extension",
        "at",
        "result",
        "record",
    ];
    if let Some(unknown) = obj.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(err(unknown, "is not a known field"));
    }
    let call_id = text("call_id")?.ok_or_else(|| err("call_id", "is required"))?;
    let kind = match text("event")?.as_deref() {
        None => return Err(err("event", "is required")),
        Some("start") => Kind::Start,
        Some("ringing") => Kind::Ringing,
        Some("answer") => Kind::Answer,
        Some("transfer") => Kind::Transfer,
        Some("hangup") => Kind::Hangup,
        Some(_) => {
            return Err(err(
                "event",
                "must be one of start, ringing, answer, transfer, hangup",
            ))
        }
    };
    let direction = match text("direction")?.as_deref() {
        None => None,
        Some("in") => Some(Direction::In),
        Some("out") => Some(Direction::Out),
        Some(_) => return Err(err("direction", "must be in or out")),
    };
    let extension = text("extension")?;
    match &extension {
        None if matches!(kind, Kind::Ringing | Kind::Answer | Kind::Transfer) => {
            return Err(err(
                "extension",
                "is required for ringing, answer and transfer",
            ))
        }
        Some(e) if !ExtensionCode::is_valid(e) => {
            return Err(err("extension", ExtensionCode::RULE));
        }
        _ => {}
    }
    let phone = text("phone")?.map(|p| normalize_number(&p));
    if let Some(p) = &phone {
        if !PhoneNumber::is_valid(p) {
            return Err(err("phone", PhoneNumber::RULE));
        }
    }
    if kind == Kind::Start && phone.is_none() {
        return Err(err("phone", "is required for start"));
    }
    let at = match text("at")? {
        None => None,
        Some(s) => {
            let t = humantime::parse_rfc3339_weak(&s)
                .map_err(|_| err("at", "must be an RFC 3339 time"))?;
            let ms = t
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .and_then(|d| i64::try_from(d.as_millis()).ok())
                .filter(|ms| *ms >= EARLIEST_AT)
                .ok_or_else(|| err("at", "is before 2000"))?;
            if ms > crate::base::clock::now_ms() + MAX_AT_AHEAD {
                return Err(err("at", "is more than an hour in the future"));
            }
            Some(ms)
        }
    };
    let result = match text("result")?.as_deref() {
        None => None,
        Some("answered") => Some(Outcome::Answered),
        Some("no answer") | Some("no_answer") | Some("missed") => Some(Outcome::NoAnswer),
        Some("busy") => Some(Outcome::Busy),
        Some("failed") => Some(Outcome::Failed),
        Some("not allowed") | Some("not_allowed") => Some(Outcome::NotAllowed),
        Some("unknown") => Some(Outcome::Unknown),
        Some(_) => {
            return Err(err(
                "result",
                "must be one of answered, no answer, busy, failed, not allowed, unknown",
            ))
        }
    };
    Ok(WebhookEvent {
        call_id,
        kind,
        direction,
        phone,
        did: text("did")?,
        extension,
        at,
        result,
        record: text("record")?,
    })
}

/// A call in progress, as kept in memory and in the store's journal (`serde`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebCall {
    direction: Direction,
    phone: String,
    did: Option<String>,
    start: Millis,
    last: Millis,
    rings: Vec<Ring>,
    talk: Vec<TalkSegment>,
    record: Option<String>,
    announced: Vec<String>,
    /// Outbound: the extension that placed the call (`extension` on `start`).
    #[serde(default)]
    placed_by: Option<String>,
    /// The (ringing, talking) extensions last announced by a `Progress` event.
    #[serde(default)]
    progress: (Vec<String>, Vec<String>),
}

/// The state of calls reported by webhooks.
pub struct WebhookModel {
    system_id: String,
    calls: HashMap<String, WebCall>,
}

impl WebhookModel {
    pub fn new(system_id: &str) -> WebhookModel {
        WebhookModel {
            system_id: system_id.to_string(),
            calls: HashMap::new(),
        }
    }

    pub fn live_calls(&self) -> usize {
        self.calls.len()
    }

    /// The calls in progress, as the admin page shows them.
    pub fn live_summary(&self) -> Vec<super::model::LiveCall> {
        self.calls
            .iter()
            .map(|(id, c)| {
                super::model::LiveCall::from_parts(
                    format!("{}-{}", self.system_id, id),
                    c.direction,
                    c.phone.clone(),
                    c.start,
                    &c.rings,
                    &c.talk,
                )
            })
            .collect()
    }

    /// The calls in progress.
    pub fn call_ids(&self) -> Vec<String> {
        self.calls.keys().cloned().collect()
    }

    /// The call as the journal keeps it while it is in progress; `None` once it has finished.
    pub fn journal_entry(&self, call_id: &str) -> Option<Vec<u8>> {
        self.calls
            .get(call_id)
            .and_then(|c| serde_json::to_vec(c).ok())
    }

    /// Resumes a call from its journal entry (after a restart).
    pub fn restore(&mut self, call_id: &str, entry: &[u8]) -> Result<(), serde_json::Error> {
        let call: WebCall = serde_json::from_slice(entry)?;
        self.calls.insert(call_id.to_string(), call);
        Ok(())
    }

    pub fn apply(&mut self, e: &WebhookEvent, now: Millis, out: &mut Vec<Output>) {
        let at = e.at.unwrap_or(now);
        let external_id = format!("{}-{}", self.system_id, e.call_id);
        // Events for an unknown call other than `start` create it: a PBX may lose a message.
        let call = self
            .calls
            .entry(e.call_id.clone())
            .or_insert_with(|| WebCall {
                direction: e.direction.unwrap_or(Direction::In),
                phone: e.phone.clone().unwrap_or_default(),
                did: e.did.clone(),
                start: at,
                last: at,
                rings: Vec::new(),
                talk: Vec::new(),
                record: None,
                announced: Vec::new(),
                placed_by: None,
                progress: Default::default(),
            });
        call.last = call.last.max(at);
        if let Some(d) = e.direction {
            call.direction = d;
        }
        if let Some(p) = &e.phone {
            call.phone = p.clone();
        }
        if e.did.is_some() {
            call.did = e.did.clone();
        }
        if e.record.is_some() {
            call.record = e.record.clone();
        }
        let ext = e.extension.clone().unwrap_or_default();
        // `start` with an extension: outbound, the extension placing the call; inbound, the
        // first one to ring.
        let kind = match e.kind {
            Kind::Start if ext.is_empty() => Kind::Start,
            Kind::Start => Kind::Ringing,
            k => k,
        };
        if call.direction == Direction::Out && !ext.is_empty() && kind == Kind::Ringing {
            call.placed_by.get_or_insert_with(|| ext.clone());
        }
        match kind {
            Kind::Start => {}
            Kind::Ringing => {
                if !call
                    .rings
                    .iter()
                    .any(|r| r.extension == ext && r.end.is_none())
                {
                    call.rings.push(Ring {
                        extension: ext.clone(),
                        start: at,
                        end: None,
                        status: None,
                    });
                }
                if !call.announced.contains(&ext) {
                    call.announced.push(ext.clone());
                    out.push(Output::Live(match call.direction {
                        Direction::Out => LiveEvent::Dialing {
                            external_id,
                            phone: call.phone.clone(),
                            codes: vec![ext],
                            click_to_call: None,
                            trunk: None,
                        },
                        _ => LiveEvent::Ringing {
                            external_id,
                            phone: call.phone.clone(),
                            did: call.did.clone(),
                            codes: vec![ext],
                            trunk: None,
                        },
                    }));
                }
            }
            Kind::Answer | Kind::Transfer => {
                for r in call.rings.iter_mut().filter(|r| r.end.is_none()) {
                    r.end = Some(at);
                    r.status = Some(
                        if r.extension == ext {
                            "ANSWER"
                        } else {
                            "CANCEL"
                        }
                        .into(),
                    );
                }
                if !call.rings.iter().any(|r| r.extension == ext) {
                    call.rings.push(Ring {
                        extension: ext.clone(),
                        start: at,
                        end: Some(at),
                        status: Some("ANSWER".into()),
                    });
                }
                for t in call.talk.iter_mut().filter(|t| t.end.is_none()) {
                    t.end = Some(at);
                }
                call.talk.push(TalkSegment {
                    extension: ext,
                    start: at,
                    end: None,
                    customer_channel: e.call_id.clone(),
                    extension_channel: String::new(),
                    hold_ms: 0,
                });
            }
            Kind::RingEnd => {
                for r in call
                    .rings
                    .iter_mut()
                    .filter(|r| r.end.is_none() && r.extension == ext)
                {
                    r.end = Some(at);
                    r.status = Some("CANCEL".into());
                }
            }
            Kind::Hangup => {
                let mut call = self.calls.remove(&e.call_id).expect("inserted above");
                for r in call.rings.iter_mut().filter(|r| r.end.is_none()) {
                    r.end = Some(at);
                    r.status = Some("CANCEL".into());
                }
                for t in call.talk.iter_mut().filter(|t| t.end.is_none()) {
                    t.end = Some(at);
                }
                out.extend(finish(&self.system_id, &e.call_id, call, at, e.result));
            }
        }
        if let Some(call) = self.calls.get_mut(&e.call_id) {
            let id = format!("{}-{}", self.system_id, e.call_id);
            out.extend(progress(&id, call).map(Output::Live));
        }
    }

    /// Closes calls that saw no event for `max_age` (the PBX lost the hangup).
    pub fn reap(&mut self, now: Millis, max_age: Millis, out: &mut Vec<Output>) {
        let stale: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, c)| now - c.last > max_age.max(GRACE))
            .map(|(k, _)| k.clone())
            .collect();
        for id in stale {
            if let Some(mut call) = self.calls.remove(&id) {
                let end = call.last;
                for t in call.talk.iter_mut().filter(|t| t.end.is_none()) {
                    t.end = Some(end);
                }
                let mut outputs = finish(&self.system_id, &id, call, end, None);
                for o in &mut outputs {
                    if let Output::Finished(r) = o {
                        r.reaped = true;
                    }
                }
                out.extend(outputs);
            }
        }
    }
}

/// A `Progress` event when the extensions ringing or talking changed since the last one, for a
/// call already announced (as the AMI model does); none once nobody rings or talks (the call's
/// `Hangup` follows).
fn progress(external_id: &str, call: &mut WebCall) -> Option<LiveEvent> {
    if call.announced.is_empty() {
        return None;
    }
    let now = super::model::LiveCall::from_parts(
        String::new(),
        call.direction,
        String::new(),
        0,
        &call.rings,
        &call.talk,
    );
    let state = (now.ringing, now.talking);
    if state == call.progress {
        return None;
    }
    call.progress = state.clone();
    if state.0.is_empty() && state.1.is_empty() {
        return None;
    }
    Some(LiveEvent::Progress {
        external_id: external_id.to_string(),
        phone: call.phone.clone(),
        direction: call.direction,
        ringing: state.0,
        talking: state.1,
    })
}

fn finish(
    system_id: &str,
    call_id: &str,
    call: WebCall,
    end: Millis,
    result: Option<Outcome>,
) -> Vec<Output> {
    let answer = call.talk.first().map(|t| t.start);
    let outcome = result.unwrap_or(if answer.is_some() {
        Outcome::Answered
    } else {
        Outcome::NoAnswer
    });
    let final_extension = call.talk.last().map(|t| t.extension.clone());
    let placed_by = (call.direction == Direction::Out)
        .then(|| {
            call.placed_by
                .clone()
                .or_else(|| call.rings.first().map(|r| r.extension.clone()))
        })
        .flatten();
    // An unanswered inbound call is credited by the pipeline (`calls.missed_owner`), the same
    // way as one seen over AMI.
    let code = final_extension.clone().or_else(|| placed_by.clone());
    let external_id = format!("{system_id}-{call_id}");
    let (from_number, to_number) = match call.direction {
        Direction::Out => (placed_by.clone(), Some(call.phone.clone())),
        _ => (Some(call.phone.clone()), call.did.clone()),
    };
    let (from_number, to_number) = (
        from_number.filter(|n| !n.is_empty()),
        to_number.filter(|n| !n.is_empty()),
    );
    let conversations = conversations(&call.rings, &call.talk);
    let record = CallRecord {
        external_id: external_id.clone(),
        linkedid: call_id.to_string(),
        direction: call.direction,
        customer_number: call.phone.clone(),
        did: call.did.clone(),
        code: code.clone(),
        user_id: None,
        external_phone: call.did.clone(),
        start: call.start,
        answer,
        end,
        wait_seconds: u64::try_from((answer.unwrap_or(end) - call.start + 500) / 1000).unwrap_or(0),
        talk_seconds: answer.map_or(0, |a| u64::try_from((end - a + 500) / 1000).unwrap_or(0)),
        connected_seconds: u64::try_from(
            (call
                .talk
                .iter()
                .map(|t| t.end.unwrap_or(t.start) - t.start)
                .sum::<Millis>()
                + 500)
                / 1000,
        )
        .unwrap_or(0),
        outcome,
        answered_by: call.talk.first().map(|t| t.extension.clone()),
        final_extension,
        placed_by,
        click_to_call: false,
        rings: call.rings,
        talk: call.talk,
        recordings: call.record.into_iter().collect(),
        customer_dial_status: None,
        reaped: false,
        trunk: None,
        phone_original: None,
        registration: None,
        ignored: false,
        // Webhooks name no channels.
        main_channel: None,
        conversations,
        from_number,
        to_number,
    };
    vec![
        Output::Live(LiveEvent::Hangup {
            external_id,
            phone: record.customer_number.clone(),
            direction: record.direction,
            codes: record.hangup_codes(),
            outcome,
        }),
        Output::Finished(Box::new(record)),
    ]
}

/// One conversation per ring, answered by the first talk of its extension that began after it;
/// talk left over (none is, as `apply` rings every extension it connects) stands alone.
/// Webhooks name no channels: the channel ids stay empty.
fn conversations(rings: &[Ring], talk: &[TalkSegment]) -> Vec<Conversation> {
    let mut used = vec![false; talk.len()];
    let mut out: Vec<Conversation> = rings
        .iter()
        .map(|r| {
            let t = talk
                .iter()
                .enumerate()
                .find(|(i, t)| !used[*i] && t.extension == r.extension && t.start >= r.start);
            if let Some((i, _)) = t {
                used[i] = true;
            }
            let t = t.map(|(_, t)| t);
            Conversation {
                channel: String::new(),
                channel_name: String::new(),
                customer_channel: String::new(),
                extension: Some(r.extension.clone()),
                start: r.start,
                answer: t.map(|t| t.start),
                end: t.map_or(r.end, |t| t.end),
                parked: false,
            }
        })
        .collect();
    out.extend(
        talk.iter()
            .zip(&used)
            .filter(|(_, u)| !**u)
            .map(|(t, _)| Conversation {
                channel: String::new(),
                channel_name: String::new(),
                customer_channel: String::new(),
                extension: Some(t.extension.clone()),
                start: t.start,
                answer: Some(t.start),
                end: t.end,
                parked: false,
            }),
    );
    out.sort_by_key(|c| c.start);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field() {
        let e = parse_events(br#"{"call_id":"1","event":"ringing","phone":"+7999"}"#).unwrap_err();
        assert!(e.contains_key("extension"), "{e:?}");
        let e = parse_events(
            br#"[{"call_id":"1","event":"start","phone":"+7999"},{"event":"nope","call_id":"2"}]"#,
        )
        .unwrap_err();
        assert!(e.contains_key("[1].event"), "{e:?}");
        let e = parse_events(br#"{"event":"start"}"#).unwrap_err();
        assert!(e.contains_key("call_id"), "{e:?}");
        let e = parse_events(br#"{"call_id":"1","event":"hangup","at":"yesterday"}"#).unwrap_err();
        assert!(e.contains_key("at"), "{e:?}");
        let e = parse_events(br#"{"call_id":"1","event":"hangup","color":"red"}"#).unwrap_err();
        assert!(e.contains_key("color"), "{e:?}");
        assert!(parse_events(b"not json").unwrap_err().contains_key("body"));
    }

    #[test]
    fn an_at_before_2000_or_far_ahead_is_refused() {
        for at in [
            "1999-12-31T23:59:59Z",
            "1970-01-01T00:00:00Z",
            "2999-01-01T00:00:00Z",
        ] {
            let body = format!(r#"{{"call_id":"1","event":"hangup","at":"{at}"}}"#);
            let e = parse_events(body.as_bytes()).unwrap_err();
            assert!(e.contains_key("at"), "{at}: {e:?}");
        }
        assert!(
            parse_events(br#"{"call_id":"1","event":"hangup","at":"2026-11-21T10:00:00Z"}"#)
                .is_ok()
        );
    }

    #[test]
    fn a_bad_extension_is_refused_on_every_event() {
        let e =
            parse_events(br#"{"call_id":"1","event":"start","phone":"+7999","extension":"1x"}"#)
                .unwrap_err();
        assert!(e.contains_key("extension"), "{e:?}");
    }

    #[test]
    fn a_phone_follows_the_one_phone_number_rule() {
        for bad in ["12", "+12", "123456789012345678901", "7999x"] {
            let body = format!(r#"{{"call_id":"1","event":"start","phone":"{bad}"}}"#);
            let e = parse_events(body.as_bytes()).unwrap_err();
            assert_eq!(
                e.get("phone").map(String::as_str),
                Some(PhoneNumber::RULE),
                "{bad}"
            );
        }
        let evs = parse_events(br#"{"call_id":"1","event":"start","phone":"+7 (999) 12"}"#);
        assert_eq!(evs.unwrap()[0].phone.as_deref(), Some("+799912"));
    }

    #[test]
    fn a_transferred_call_is_credited_to_the_last_extension() {
        let evs = parse_events(
            br#"[
            {"call_id":"c1","event":"start","direction":"in","phone":"+491701234567","did":"+4930111101","at":"2026-11-21T12:36:45.423Z"},
            {"call_id":"c1","event":"ringing","extension":"101","at":"2026-11-21T12:36:45.500Z"},
            {"call_id":"c1","event":"answer","extension":"101","at":"2026-11-21T12:36:47.435Z"},
            {"call_id":"c1","event":"transfer","extension":"102","at":"2026-11-21T12:36:55.450Z"},
            {"call_id":"c1","event":"hangup","at":"2026-11-21T12:37:05.443Z","record":"/rec/c1.wav"}
        ]"#,
        )
        .unwrap();
        let mut m = WebhookModel::new("pbx");
        let mut out = Vec::new();
        for e in &evs {
            m.apply(e, 0, &mut out);
        }
        let r = out
            .iter()
            .find_map(|o| {
                if let Output::Finished(r) = o {
                    Some(r)
                } else {
                    None
                }
            })
            .unwrap();
        assert_eq!(
            (r.answered_by.as_deref(), r.final_extension.as_deref()),
            (Some("101"), Some("102"))
        );
        assert_eq!(
            (r.wait_seconds, r.talk_seconds, r.outcome),
            (2, 18, Outcome::Answered)
        );
        assert_eq!(r.recordings, vec!["/rec/c1.wav".to_string()]);
        assert_eq!(r.external_id, "pbx-c1");
        assert_eq!(m.live_calls(), 0);
    }

    #[test]
    fn an_unknown_call_is_created_by_any_event() {
        let evs = parse_events(
            br#"{"call_id":"x","event":"hangup","direction":"in","phone":"+7999","result":"busy"}"#,
        )
        .unwrap();
        let mut m = WebhookModel::new("pbx");
        let mut out = Vec::new();
        m.apply(&evs[0], 1000, &mut out);
        let r = out
            .iter()
            .find_map(|o| {
                if let Output::Finished(r) = o {
                    Some(r)
                } else {
                    None
                }
            })
            .unwrap();
        assert_eq!(
            (r.outcome, r.customer_number.as_str()),
            (Outcome::Busy, "+7999")
        );
    }

    #[test]
    fn a_webhook_record_has_a_conversation_per_extension_and_no_channels() {
        let evs = parse_events(
            br#"[
            {"call_id":"c1","event":"start","direction":"in","phone":"+491701234567","did":"+4930111101","at":"2026-11-21T12:36:45.423Z"},
            {"call_id":"c1","event":"ringing","extension":"101","at":"2026-11-21T12:36:45.500Z"},
            {"call_id":"c1","event":"ringing","extension":"103","at":"2026-11-21T12:36:45.500Z"},
            {"call_id":"c1","event":"answer","extension":"101","at":"2026-11-21T12:36:47.435Z"},
            {"call_id":"c1","event":"transfer","extension":"102","at":"2026-11-21T12:36:55.450Z"},
            {"call_id":"c1","event":"hangup","at":"2026-11-21T12:37:05.443Z"}
        ]"#,
        )
        .unwrap();
        let mut m = WebhookModel::new("pbx");
        let mut out = Vec::new();
        for e in &evs {
            m.apply(e, 0, &mut out);
        }
        let r = out
            .iter()
            .find_map(|o| match o {
                Output::Finished(r) => Some(r),
                _ => None,
            })
            .unwrap();
        let t0 = 1_795_264_605_423;
        let got: Vec<_> = r
            .conversations
            .iter()
            .map(|c| {
                (
                    c.extension.as_deref(),
                    c.start - t0,
                    c.answer.map(|a| a - t0),
                    c.end.map(|e| e - t0),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (Some("101"), 77, Some(2_012), Some(10_027)),
                (Some("103"), 77, None, Some(2_012)),
                (Some("102"), 10_027, Some(10_027), Some(20_020)),
            ]
        );
        assert!(r
            .conversations
            .iter()
            .all(|c| c.channel.is_empty() && c.customer_channel.is_empty() && !c.parked));
        assert_eq!(r.main_channel, None);
        assert_eq!(
            (r.from_number.as_deref(), r.to_number.as_deref()),
            (Some("+491701234567"), Some("+4930111101"))
        );
        assert_eq!(r.outcome.sip_code(), 200);
    }

    #[test]
    fn an_outbound_webhook_call_is_from_its_extension_to_the_customer() {
        let evs = parse_events(
            br#"[
            {"call_id":"o1","event":"start","direction":"out","phone":"+4930123456","extension":"101"},
            {"call_id":"o1","event":"hangup","result":"busy"}
        ]"#,
        )
        .unwrap();
        let mut m = WebhookModel::new("pbx");
        let mut out = Vec::new();
        for e in &evs {
            m.apply(e, 1_000_000, &mut out);
        }
        let r = out
            .iter()
            .find_map(|o| match o {
                Output::Finished(r) => Some(r),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            (r.from_number.as_deref(), r.to_number.as_deref()),
            (Some("101"), Some("+4930123456"))
        );
        assert_eq!(r.outcome.sip_code(), 486);
        assert_eq!(r.conversations.len(), 1);
        assert_eq!(r.conversations[0].answer, None);
    }

    #[test]
    fn progress_follows_rings_ending_and_answers() {
        let ev = |kind: Kind, ext: Option<&str>, at: Millis| WebhookEvent {
            call_id: "p1".into(),
            kind,
            direction: Some(Direction::In),
            phone: Some("+491701234567".into()),
            did: None,
            extension: ext.map(str::to_string),
            at: Some(at),
            result: None,
            record: None,
        };
        let mut m = WebhookModel::new("pbx");
        let mut out = Vec::new();
        m.apply(&ev(Kind::Start, None, 1_000), 1_000, &mut out);
        assert!(out.is_empty(), "nothing announced yet: {out:?}");
        for e in [
            ev(Kind::Ringing, Some("101"), 1_100),
            ev(Kind::Ringing, Some("102"), 1_100),
            ev(Kind::RingEnd, Some("101"), 2_000),
            // Ending a ring that is over already changes nothing.
            ev(Kind::RingEnd, Some("101"), 2_100),
            ev(Kind::Answer, Some("102"), 3_000),
        ] {
            m.apply(&e, 0, &mut out);
        }
        let progress: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Live(LiveEvent::Progress {
                    ringing, talking, ..
                }) => Some((ringing.clone(), talking.clone())),
                _ => None,
            })
            .collect();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            progress,
            vec![
                (s(&["101"]), s(&[])),
                (s(&["101", "102"]), s(&[])),
                (s(&["102"]), s(&[])),
                (s(&[]), s(&["102"])),
            ]
        );
        out.clear();
        m.apply(&ev(Kind::Hangup, None, 10_000), 0, &mut out);
        assert!(
            !out.iter()
                .any(|o| matches!(o, Output::Live(LiveEvent::Progress { .. }))),
            "a call that ends gets its hangup, no progress"
        );
        let r = out
            .iter()
            .find_map(|o| match o {
                Output::Finished(r) => Some(r),
                _ => None,
            })
            .unwrap();
        let rings: Vec<_> = r
            .rings
            .iter()
            .map(|r| (r.extension.as_str(), r.end, r.status.as_deref()))
            .collect();
        assert_eq!(
            rings,
            vec![
                ("101", Some(2_000), Some("CANCEL")),
                ("102", Some(3_000), Some("ANSWER"))
            ]
        );
        assert_eq!((r.answered_by.as_deref(), r.talk_seconds), (Some("102"), 7));
    }
}
