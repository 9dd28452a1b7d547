//! `call_full`: a finished call as customisation hooks receive it, in the structure the
//! integrators of the reference connectors know (a main channel, every conversation keyed by
//! its channel's Uniqueid, numbers in every form, the result as a SIP status).
//!
//! Times are the PBX host's local time, `YYYY-MM-DD HH:MM:SS`, with `0001-01-01 00:00:00` for
//! what did not happen. What pbxgate does not know (the CRM's entity and deal, the Bitrix24
//! registration) is `null`.

use serde_json::{json, Map, Value};

use super::record::{CallRecord, ChannelKind, Direction, LiveEvent};
use crate::base::clock::Millis;
use crate::phone::PhoneBook;

/// The text of an unset time.
pub const NO_TIME: &str = "0001-01-01 00:00:00";

/// A number in every form, or null.
fn number(phones: &PhoneBook, raw: Option<&str>, trunk: Option<&str>) -> Value {
    match raw.filter(|n| !n.is_empty()) {
        Some(raw) => {
            let n = phones.normalize(raw, trunk);
            json!({
                "original": n.original,
                "base": n.base,
                "custom": n.canonical,
                "variants": n.variants,
                "is_local": n.internal,
            })
        }
        None => Value::Null,
    }
}

/// `call_full` for a call in progress, from one of its live events (stamped `at`): what is
/// known then. The main channel's `id` is the call's key (its Linkedid for AMI calls), `state`
/// `ringing`, `dialing` or `ended`; `conversations` has one entry per extension named by the
/// event (`<key>.<n>`, not yet answered); `user` is null until the call is credited.
pub fn call_full_live(
    e: &LiveEvent,
    at: Millis,
    system_id: &str,
    phones: &PhoneBook,
    tz: &jiff::tz::TimeZone,
) -> Value {
    let id = e.external_id();
    // The externalId is `<system_id>-<key>`.
    let key = id
        .strip_prefix(system_id)
        .and_then(|k| k.strip_prefix('-'))
        .unwrap_or(id);
    let time = |at: Option<Millis>| local_time(at, tz);
    let (kind, state, from, to, trunk, codes, result, answered) = match e {
        LiveEvent::Ringing {
            phone,
            did,
            codes,
            trunk,
            ..
        } => (
            ChannelKind::Incoming,
            "ringing",
            Some(phone.as_str()),
            did.as_deref(),
            trunk.as_deref(),
            codes,
            0,
            false,
        ),
        LiveEvent::Dialing {
            phone,
            codes,
            trunk,
            ..
        } => (
            ChannelKind::Outgoing,
            "dialing",
            codes.first().map(String::as_str),
            Some(phone.as_str()),
            trunk.as_deref(),
            codes,
            0,
            false,
        ),
        LiveEvent::Progress {
            phone,
            direction,
            ringing,
            talking,
            ..
        } => {
            let codes = if talking.is_empty() { ringing } else { talking };
            let (from, to) = match direction {
                Direction::Out => (codes.first().map(String::as_str), Some(phone.as_str())),
                _ => (Some(phone.as_str()), codes.first().map(String::as_str)),
            };
            let state = if talking.is_empty() {
                "ringing"
            } else {
                "talking"
            };
            (
                ChannelKind::from(*direction),
                state,
                from,
                to,
                None,
                codes,
                0,
                !talking.is_empty(),
            )
        }
        LiveEvent::Hangup {
            phone,
            direction,
            codes,
            outcome,
            ..
        } => {
            let (from, to) = match direction {
                Direction::Out => (codes.first().map(String::as_str), Some(phone.as_str())),
                _ => (Some(phone.as_str()), codes.first().map(String::as_str)),
            };
            let answered = *outcome == super::record::Outcome::Answered;
            (
                ChannelKind::from(*direction),
                "ended",
                from,
                to,
                None,
                codes,
                outcome.sip_code(),
                answered,
            )
        }
    };
    let ended = state == "ended";
    let mut conversations = Map::new();
    for (i, code) in codes.iter().enumerate() {
        let key = format!("{key}.{i}");
        conversations.insert(
            key.clone(),
            json!({
                "channel": {
                    "id": key,
                    "name": "",
                    "type": kind,
                    "is_primary": false,
                    "state": state,
                    "start_time": time(Some(at)),
                    "answer_time": NO_TIME,
                    "end_time": if ended { time(Some(at)) } else { NO_TIME.to_string() },
                    "was_answered": false,
                },
                "is_parked": false,
                "user": {"code": code, "user_id": null},
            }),
        );
    }
    json!({
        "active_conversation_id": "",
        "channel": {
            "id": key,
            "name": "",
            "type": kind,
            "is_primary": true,
            "state": state,
            "start_time": if ended { NO_TIME.to_string() } else { time(Some(at)) },
            "answer_time": NO_TIME,
            "end_time": if ended { time(Some(at)) } else { NO_TIME.to_string() },
            "from": number(phones, from, trunk),
            "to": number(phones, to, trunk),
            "trunk": trunk.map_or(Value::Null, |t| json!({"original": t})),
            "was_answered": answered,
        },
        "conversations": conversations,
        "user": null,
        "entity": null,
        "deal": null,
        "registration": null,
        "is_ivr": false,
        "record": "",
        "result": result,
    })
}

/// `call_full` for a finished call.
pub fn call_full(r: &CallRecord, phones: &PhoneBook, tz: &jiff::tz::TimeZone) -> Value {
    let time = |at: Option<Millis>| local_time(at, tz);
    let trunk = r.trunk.as_deref();
    let number = |raw: Option<&str>| number(phones, raw, trunk);
    let (id, name, kind, start, answer, end) = match &r.main_channel {
        Some(m) => (
            m.id.as_str(),
            m.name.as_str(),
            m.kind,
            Some(m.start),
            m.answer,
            m.end,
        ),
        None => (
            r.linkedid.as_str(),
            "",
            ChannelKind::from(r.direction),
            Some(r.start),
            r.answer,
            Some(r.end),
        ),
    };
    let channel = json!({
        "id": id,
        "name": name,
        "type": kind,
        "is_primary": true,
        "state": "ended",
        "start_time": time(start),
        "answer_time": time(answer),
        "end_time": time(end),
        "from": number(r.from_number.as_deref()),
        "to": number(r.to_number.as_deref()),
        "trunk": r.trunk.as_ref().map_or(Value::Null, |t| json!({"original": t})),
        "was_answered": r.answer.is_some(),
    });
    let mut conversations = Map::new();
    for (i, c) in r.conversations.iter().enumerate() {
        let key = if c.channel.is_empty() {
            format!("{}.{i}", r.linkedid)
        } else {
            c.channel.clone()
        };
        let user = c.extension.as_ref().map_or(Value::Null, |code| {
            json!({"code": code, "user_id": if r.code.as_ref() == Some(code) { json!(r.user_id) } else { Value::Null }})
        });
        conversations.insert(
            key.clone(),
            json!({
                "channel": {
                    "id": key,
                    "name": c.channel_name,
                    "type": kind,
                    "is_primary": false,
                    "state": "ended",
                    "start_time": time(Some(c.start)),
                    "answer_time": time(c.answer),
                    "end_time": time(c.end),
                    "was_answered": c.answer.is_some(),
                },
                "is_parked": c.parked,
                "user": user,
            }),
        );
    }
    let user = match (&r.code, r.user_id) {
        (None, None) => Value::Null,
        (code, user_id) => json!({"code": code, "user_id": user_id}),
    };
    json!({
        "active_conversation_id": "",
        "channel": channel,
        "conversations": conversations,
        "user": user,
        "entity": null,
        "deal": null,
        "registration": null,
        "is_ivr": false,
        "record": "",
        "result": r.outcome.sip_code(),
    })
}

/// `YYYY-MM-DD HH:MM:SS` in `tz`, or [`NO_TIME`].
pub fn local_time(at: Option<Millis>, tz: &jiff::tz::TimeZone) -> String {
    at.and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| {
            t.to_zoned(tz.clone())
                .strftime("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|| NO_TIME.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PhoneConfig;

    #[test]
    fn a_finished_call_in_the_call_full_structure() {
        let mut r = CallRecord::sample("pbx-1");
        r.trunk = Some("PJSIP/trunk".into());
        let phones = PhoneBook::new(&PhoneConfig::default());
        let full = call_full(&r, &phones, &jiff::tz::TimeZone::UTC);
        let ch = &full["channel"];
        assert_eq!(ch["is_primary"], true);
        assert_eq!(ch["state"], "ended");
        assert_eq!(ch["type"], "incoming");
        assert_eq!(ch["start_time"].as_str().unwrap().len(), 19);
        assert_eq!(ch["from"]["original"], r.from_number.clone().unwrap());
        assert_eq!(ch["from"]["is_local"], false);
        assert!(ch["from"]["variants"].as_array().is_some());
        assert_eq!(ch["to"], Value::Null);
        assert_eq!(ch["trunk"]["original"], "PJSIP/trunk");
        assert_eq!(full["result"], r.outcome.sip_code());
        assert_eq!(full["entity"], Value::Null);
        assert_eq!(
            full["conversations"].as_object().unwrap().len(),
            r.conversations.len()
        );
    }

    #[test]
    fn a_ringing_call_in_the_call_full_structure() {
        let phones = PhoneBook::new(&PhoneConfig::default());
        let e = LiveEvent::Ringing {
            external_id: "my-pbx-1795264721.70".into(),
            phone: "+79161234567".into(),
            did: Some("+74951112233".into()),
            codes: vec!["101".into(), "102".into()],
            trunk: Some("PJSIP/trunk".into()),
        };
        let tz = jiff::tz::TimeZone::UTC;
        let full = call_full_live(&e, 1_795_264_721_000, "my-pbx", &phones, &tz);
        let ch = &full["channel"];
        assert_eq!(ch["id"], "1795264721.70");
        assert_eq!(ch["type"], "incoming");
        assert_eq!(ch["state"], "ringing");
        assert_eq!(ch["from"]["original"], "+79161234567");
        assert_eq!(ch["to"]["original"], "+74951112233");
        assert_eq!(ch["end_time"], NO_TIME);
        assert_ne!(ch["start_time"], NO_TIME);
        let conv = full["conversations"].as_object().unwrap();
        assert_eq!(conv.len(), 2);
        assert_eq!(conv["1795264721.70.1"]["user"]["code"], "102");
        assert_eq!(full["result"], 0);
    }

    #[test]
    fn unset_times_read_as_the_zero_date() {
        assert_eq!(local_time(None, &jiff::tz::TimeZone::UTC), NO_TIME);
        assert_eq!(
            local_time(Some(0), &jiff::tz::TimeZone::UTC),
            "1970-01-01 00:00:00"
        );
    }
}
