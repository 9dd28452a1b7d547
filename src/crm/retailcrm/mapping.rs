//! pbxgate's neutral calls in retailCRM's terms: a finished call → a `calls/upload` entry, a
//! live event → a `call/event`, an outcome → `result` (uploads) or `hangupStatus` (events),
//! and the shop (`site`) of a call from `[[external_phones]]`.

use super::wire::{Call, CallEvent, CallEventType, CallResult, CallType, HangupStatus};
use crate::calls::{CallRecord, Direction, LiveEvent, Outcome};
use crate::config::Config;

/// The shop of a call: the `[[external_phones]]` entry of its DID, else `crm.site`.
pub fn site_for(config: &Config, did: Option<&str>) -> Option<String> {
    let digits = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
    did.and_then(|d| {
        let d = digits(d);
        config
            .external_phones
            .iter()
            .find(|p| !d.is_empty() && digits(&p.number) == d)
            .map(|p| p.site.clone())
    })
    .or_else(|| Some(config.crm.site.clone()).filter(|s| !s.is_empty()))
}

/// `calls/upload` `result`.
pub fn call_result(outcome: Outcome) -> CallResult {
    match outcome {
        Outcome::Answered => CallResult::Answered,
        Outcome::NoAnswer => CallResult::NoAnswer,
        Outcome::Busy => CallResult::Busy,
        Outcome::Failed => CallResult::Failed,
        Outcome::NotAllowed => CallResult::NotAllowed,
        Outcome::Unknown => CallResult::Unknown,
    }
}

/// `call/event` `hangupStatus` (note `no answered` here vs `no answer` in uploads).
pub fn hangup_status(outcome: Outcome) -> HangupStatus {
    match outcome {
        Outcome::Answered => HangupStatus::Answered,
        Outcome::Busy => HangupStatus::Busy,
        Outcome::NoAnswer => HangupStatus::NoAnswered,
        Outcome::Failed | Outcome::NotAllowed | Outcome::Unknown => HangupStatus::Failed,
    }
}

/// The CRM event for a live event; `None` for what retailCRM has no event for (`Progress`).
pub fn to_call_event(config: &Config, e: &LiveEvent) -> Option<CallEvent> {
    let ev = match e {
        LiveEvent::Ringing {
            external_id,
            phone,
            did,
            codes,
            ..
        } => {
            let mut ev = CallEvent::new(CallEventType::In, phone.clone());
            ev.codes = Some(codes.clone());
            ev.external_phone = did.clone();
            ev.site = site_for(config, did.as_deref());
            ev.call_external_id = Some(external_id.clone());
            ev
        }
        LiveEvent::Dialing {
            external_id,
            phone,
            codes,
            click_to_call,
            ..
        } => {
            let mut ev = CallEvent::new(CallEventType::Out, phone.clone());
            ev.codes = Some(codes.clone());
            if let Some(c2c) = click_to_call {
                ev.user_ids = Some(vec![c2c.user_id]);
                ev.external_phone = c2c.external_phone.clone();
            }
            ev.site = site_for(config, ev.external_phone.as_deref());
            ev.call_external_id = Some(external_id.clone());
            ev
        }
        LiveEvent::Hangup {
            external_id,
            phone,
            codes,
            outcome,
            ..
        } => {
            let mut ev = CallEvent::new(CallEventType::Hangup, phone.clone());
            ev.codes = Some(codes.clone()).filter(|c| !c.is_empty());
            ev.hangup_status = Some(hangup_status(*outcome));
            ev.call_external_id = Some(external_id.clone());
            ev
        }
        LiveEvent::Progress { .. } => return None,
    };
    Some(ev)
}

/// The `calls/upload` entry for a finished call; `date` in the account's time zone.
pub fn to_call(
    config: &Config,
    r: &CallRecord,
    record_url: Option<&str>,
    tz: &jiff::tz::TimeZone,
) -> Call {
    let date = jiff::Timestamp::from_millisecond(r.start)
        .map(|t| {
            t.to_zoned(tz.clone())
                .strftime("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_default();
    Call {
        date,
        kind: if r.direction == Direction::In {
            CallType::In
        } else {
            CallType::Out
        },
        phone: r.customer_number.clone(),
        code: r.code.clone(),
        user_id: r.user_id,
        result: call_result(r.outcome),
        duration: Some(r.talk_seconds),
        duration_waiting: Some(r.wait_seconds),
        external_id: r.external_id.clone(),
        record_url: record_url.map(str::to_string),
        source: None,
        external_phone: r.external_phone.clone(),
        site: site_for(config, r.external_phone.as_deref()),
        client_id: None,
    }
}
