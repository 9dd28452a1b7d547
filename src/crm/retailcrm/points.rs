//! retailCRM's own customisation points, on the wire forms themselves (fields under retailCRM's
//! names, as the API documents them):
//! - `process_call_event_params`: a live event about to go to `telephony/call/event`
//!   (`call_stage` `conversation_requested` for `in` / `out`, `call_ended` for `hangup`;
//!   `call_full` is null: the call has no record yet). The hook may change `phone`, `type`,
//!   `codes`, `userIds`, `site`, `hangupStatus`, `externalPhone`, `webAnalyticsData`;
//!   `callExternalId` is read-only.
//! - `process_upload_params`: one `telephony/calls/upload` item (`call_stage` `call_ended`,
//!   `call_full` the finished call). The hook may change every field but `externalId`, which
//!   ties the call to its events and keeps re-uploads duplicates: returning it is an unknown
//!   field, and the whole answer is refused.
//!
//! A change is kept only if the result is still a valid item, as strict as what is checked
//! before every upload (an invalid change is dropped with a warn line, the other changes
//! stay): a hook cannot make retailCRM refuse a batch.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use super::wire::{Call, CallEvent, CallEventType};
use crate::hooks::{FieldKind, HookResult, Hooks, Stage};

pub const PROCESS_CALL_EVENT_PARAMS: &str = "process_call_event_params";
pub const PROCESS_UPLOAD_PARAMS: &str = "process_upload_params";

/// What the hook may change, and the read-only fields it is shown too.
const EVENT_FIELDS: &[(&str, FieldKind)] = &[
    ("phone", FieldKind::String),
    ("type", FieldKind::String),
    ("codes", FieldKind::Array),
    ("userIds", FieldKind::Array),
    ("site", FieldKind::OptString),
    ("hangupStatus", FieldKind::OptString),
    ("externalPhone", FieldKind::OptString),
    ("webAnalyticsData", FieldKind::OptObject),
];
const EVENT_READ_ONLY: &[&str] = &["callExternalId"];

const UPLOAD_FIELDS: &[(&str, FieldKind)] = &[
    ("date", FieldKind::String),
    ("type", FieldKind::String),
    ("phone", FieldKind::String),
    ("code", FieldKind::OptString),
    ("userId", FieldKind::OptInteger),
    ("result", FieldKind::String),
    ("duration", FieldKind::OptInteger),
    ("durationWaiting", FieldKind::OptInteger),
    ("recordUrl", FieldKind::OptString),
    ("source", FieldKind::OptObject),
    ("externalPhone", FieldKind::OptString),
    ("site", FieldKind::OptString),
    ("clientId", FieldKind::OptString),
];
const UPLOAD_READ_ONLY: &[&str] = &["externalId"];

/// `process_call_event_params`: the event as the hook leaves it.
pub async fn call_event_params(hooks: &Hooks, event: CallEvent) -> CallEvent {
    if !hooks.is_configured(PROCESS_CALL_EVENT_PARAMS) {
        return event;
    }
    let stage = match event.kind {
        CallEventType::In | CallEventType::Out => Stage::ConversationRequested,
        CallEventType::Hangup => Stage::CallEnded,
    };
    let id = event.call_external_id.clone().unwrap_or_default();
    let input = input_of(&event, EVENT_FIELDS, EVENT_READ_ONLY, Value::Null, stage);
    match hooks
        .call(PROCESS_CALL_EVENT_PARAMS, input, EVENT_FIELDS)
        .await
    {
        HookResult::Changed(data) => {
            apply(PROCESS_CALL_EVENT_PARAMS, &id, &event, data, event_problem)
        }
        _ => event,
    }
}

/// `process_upload_params`: the upload item as the hook leaves it. `call_full` is built only
/// when the hook is configured.
pub async fn upload_params(hooks: &Hooks, call: Call, call_full: impl FnOnce() -> Value) -> Call {
    if !hooks.is_configured(PROCESS_UPLOAD_PARAMS) {
        return call;
    }
    let input = input_of(
        &call,
        UPLOAD_FIELDS,
        UPLOAD_READ_ONLY,
        call_full(),
        Stage::CallEnded,
    );
    match hooks
        .call(PROCESS_UPLOAD_PARAMS, input, UPLOAD_FIELDS)
        .await
    {
        HookResult::Changed(data) => {
            let id = call.external_id.clone();
            apply(PROCESS_UPLOAD_PARAMS, &id, &call, data, upload_problem)
        }
        _ => call,
    }
}

/// The wire form with every field named (null when not sent), `call_full` and `call_stage`.
fn input_of<T: Serialize>(
    item: &T,
    fields: &[(&str, FieldKind)],
    read_only: &[&str],
    call_full: Value,
    stage: Stage,
) -> Value {
    let mut map = match serde_json::to_value(item) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    for name in fields
        .iter()
        .map(|(n, _)| *n)
        .chain(read_only.iter().copied())
    {
        map.entry(name).or_insert(Value::Null);
    }
    map.insert("call_full".into(), call_full);
    map.insert("call_stage".into(), Value::String(stage.as_str().into()));
    Value::Object(map)
}

/// Applies the changes: all together if that gives a valid item, else one by one, dropping
/// with a warn line each change that does not give a valid item (a wrong value of an enum, a
/// negative duration, a date not `Y-m-d H:i:s`, a call left without phone or manager). A
/// change that repairs an invalid item is kept.
fn apply<T: Serialize + DeserializeOwned + Clone>(
    point: &str,
    id: &str,
    original: &T,
    data: Map<String, Value>,
    problem: fn(&T) -> Option<String>,
) -> T {
    let Ok(Value::Object(mut current)) = serde_json::to_value(original) else {
        return original.clone();
    };
    let with = |base: &Map<String, Value>, field: &str, value: &Value| {
        let mut changed = base.clone();
        if value.is_null() {
            changed.remove(field);
        } else {
            changed.insert(field.to_string(), value.clone());
        }
        changed
    };
    let before = problem(original);
    let mut all = current.clone();
    for (field, value) in &data {
        all = with(&all, field, value);
    }
    if let Ok(changed) = serde_json::from_value::<T>(Value::Object(all)) {
        let now = problem(&changed);
        if now.is_none() || now == before {
            return changed;
        }
    }
    let mut item = original.clone();
    for (field, value) in data {
        let candidate = with(&current, &field, &value);
        match serde_json::from_value::<T>(Value::Object(candidate.clone())) {
            Ok(changed) => {
                let now = problem(&changed);
                if now.is_none() || now == problem(&item) {
                    current = candidate;
                    item = changed;
                } else {
                    tracing::warn!(hook = point, %id, field = %field, reason = %now.unwrap_or_default(),
                        "the hook's change would make retailCRM refuse the call; kept");
                }
            }
            Err(e) => {
                tracing::warn!(hook = point, %id, field = %field, reason = %e,
                    "the hook's value is not one retailCRM takes; kept");
            }
        }
    }
    item
}

fn event_problem(e: &CallEvent) -> Option<String> {
    if e.phone.trim().is_empty() {
        return Some("phone: must not be empty".into());
    }
    None
}

/// What is checked before every upload, and the date's exact form.
pub(super) fn upload_problem(c: &Call) -> Option<String> {
    if let Some(why) = c.problem() {
        return Some(why);
    }
    if jiff::civil::DateTime::strptime("%Y-%m-%d %H:%M:%S", &c.date).is_err() {
        return Some("date: must be Y-m-d H:i:s".into());
    }
    if let Some(url) = &c.record_url {
        let ok = url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
        if !ok {
            return Some("recordUrl: must be an http(s) URL".into());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crm::retailcrm::wire::{CallResult, CallType};
    use serde_json::json;

    fn call() -> Call {
        Call {
            date: "2026-11-21 13:00:00".into(),
            kind: CallType::In,
            phone: "+79991234567".into(),
            code: Some("101".into()),
            user_id: None,
            result: CallResult::NoAnswer,
            duration: Some(0),
            duration_waiting: Some(12),
            external_id: "pbx-1".into(),
            record_url: None,
            source: None,
            external_phone: None,
            site: Some("shop1".into()),
            client_id: None,
        }
    }

    fn changes(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn valid_changes_are_kept_and_invalid_ones_dropped() {
        let c = call();
        let out = apply(
            PROCESS_UPLOAD_PARAMS,
            "pbx-1",
            &c,
            changes(json!({
                "site": "shop2",
                "result": "declined",
                "duration": -1,
                "date": "21.11.2026 13:00",
                "userId": 7,
                "recordUrl": "file:///etc/passwd",
                "durationWaiting": 3,
            })),
            upload_problem,
        );
        assert_eq!(out.site.as_deref(), Some("shop2"));
        assert_eq!(out.result, CallResult::NoAnswer);
        assert_eq!(out.duration, Some(0));
        assert_eq!(out.date, "2026-11-21 13:00:00");
        assert_eq!((out.code.as_deref(), out.user_id), (Some("101"), Some(7)));
        assert_eq!(out.record_url, None);
        assert_eq!(out.duration_waiting, Some(3));
        assert_eq!(out.external_id, "pbx-1");
    }

    #[test]
    fn a_change_may_not_leave_a_call_without_a_manager_but_may_give_it_one() {
        let c = call();
        let out = apply(
            PROCESS_UPLOAD_PARAMS,
            "pbx-1",
            &c,
            changes(json!({"code": null})),
            upload_problem,
        );
        assert_eq!(out.code.as_deref(), Some("101"));
        // Together with a user id, the code may go.
        let out = apply(
            PROCESS_UPLOAD_PARAMS,
            "pbx-1",
            &c,
            changes(json!({"code": null, "userId": 7})),
            upload_problem,
        );
        assert_eq!((out.code, out.user_id), (None, Some(7)));
        let orphan = Call {
            code: None,
            ..call()
        };
        assert!(upload_problem(&orphan).is_some());
        let out = apply(
            PROCESS_UPLOAD_PARAMS,
            "pbx-1",
            &orphan,
            changes(json!({"code": "105"})),
            upload_problem,
        );
        assert_eq!(out.code.as_deref(), Some("105"));
    }

    #[test]
    fn the_event_input_names_every_field() {
        let e = CallEvent::new(CallEventType::Hangup, "+79991234567");
        let input = input_of(
            &e,
            EVENT_FIELDS,
            EVENT_READ_ONLY,
            Value::Null,
            Stage::CallEnded,
        );
        for (name, _) in EVENT_FIELDS {
            assert!(input.get(name).is_some(), "{name}");
        }
        assert_eq!(input["callExternalId"], Value::Null);
        assert_eq!(input["call_stage"], "call_ended");
        assert_eq!(input["type"], "hangup");
        let out = apply(
            PROCESS_CALL_EVENT_PARAMS,
            "x",
            &e,
            changes(json!({"type": "ringing", "phone": "", "hangupStatus": "no answered"})),
            event_problem,
        );
        assert_eq!(out.kind, CallEventType::Hangup);
        assert_eq!(out.phone, "+79991234567");
        assert_eq!(
            out.hangup_status,
            Some(crate::crm::retailcrm::wire::HangupStatus::NoAnswered)
        );
    }
}
