//! The customisation points of a call's history, between the call model and the CRM port:
//! each builds its point's input from a neutral record, calls the user's hook through
//! [`Hooks`], and applies what the hook changed. A point that is not configured costs nothing;
//! a hook that fails leaves the default (the runner has logged and counted it).
//!
//! `process_call_params` runs before a finished call goes to the CRM, with the CRM-neutral
//! fields under these names: `direction` (`in`/`out`), `phone`, `code`, `user_id`, `result`
//! (`answered`, `no answer`, `busy`, `failed`, `not allowed`, `unknown`), `duration`,
//! `duration_waiting` (seconds), `record_url`, `external_phone`.

use serde_json::{json, Map, Value};

use crate::calls::full::call_full;
use crate::calls::{CallRecord, Direction, Outcome};
use crate::hooks::{FieldKind, HookResult, Hooks};
use crate::phone::PhoneBook;

pub const PROCESS_CALL_PARAMS: &str = "process_call_params";

pub(crate) const CALL_PARAMS: &[(&str, FieldKind)] = &[
    ("direction", FieldKind::String),
    ("phone", FieldKind::String),
    ("code", FieldKind::OptString),
    ("user_id", FieldKind::OptInteger),
    ("result", FieldKind::String),
    ("duration", FieldKind::Integer),
    ("duration_waiting", FieldKind::Integer),
    ("record_url", FieldKind::OptString),
    ("external_phone", FieldKind::OptString),
];

/// The result's name at the points.
fn result_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Answered => "answered",
        Outcome::NoAnswer => "no answer",
        Outcome::Busy => "busy",
        Outcome::Failed => "failed",
        Outcome::NotAllowed => "not allowed",
        Outcome::Unknown => "unknown",
    }
}

const OUTCOMES: [Outcome; 6] = [
    Outcome::Answered,
    Outcome::NoAnswer,
    Outcome::Busy,
    Outcome::Failed,
    Outcome::NotAllowed,
    Outcome::Unknown,
];

fn outcome_named(name: &str) -> Option<Outcome> {
    OUTCOMES.into_iter().find(|o| result_name(*o) == name)
}

/// `process_call_params`: the record (and its recording link) as the hook leaves them.
pub async fn call_params(
    hooks: &Hooks,
    phones: &PhoneBook,
    r: CallRecord,
    record_url: Option<String>,
) -> (CallRecord, Option<String>) {
    if !hooks.is_configured(PROCESS_CALL_PARAMS) {
        return (r, record_url);
    }
    let input = call_params_input(phones, &r, record_url.as_deref());
    match hooks.call(PROCESS_CALL_PARAMS, input, CALL_PARAMS).await {
        HookResult::Changed(data) => apply_call_params(r, record_url, &data),
        _ => (r, record_url),
    }
}

/// The input of `process_call_params` for a record and its recording link.
pub(crate) fn call_params_input(
    phones: &PhoneBook,
    r: &CallRecord,
    record_url: Option<&str>,
) -> Value {
    json!({
        "call_full": call_full(r, phones, &jiff::tz::TimeZone::system()),
        "call_stage": "call_ended",
        "direction": if r.direction == Direction::In { "in" } else { "out" },
        "phone": r.customer_number,
        "code": r.code,
        "user_id": r.user_id,
        "result": result_name(r.outcome),
        "duration": r.talk_seconds,
        "duration_waiting": r.wait_seconds,
        "record_url": record_url,
        "external_phone": r.external_phone,
    })
}

/// The record and link with the fields a `process_call_params` hook changed.
pub(crate) fn apply_call_params(
    mut r: CallRecord,
    mut record_url: Option<String>,
    data: &Map<String, Value>,
) -> (CallRecord, Option<String>) {
    let text = |v: &Value| v.as_str().map(str::to_string);
    for (field, value) in data {
        let id = &r.external_id;
        match field.as_str() {
            "direction" => match value.as_str() {
                Some("in") => r.direction = Direction::In,
                Some("out") => r.direction = Direction::Out,
                _ => {
                    tracing::warn!(hook = PROCESS_CALL_PARAMS, %id, "direction must be \"in\" or \"out\"; kept")
                }
            },
            "phone" => r.customer_number = text(value).unwrap_or_default(),
            "code" => r.code = text(value),
            "user_id" => r.user_id = value.as_i64(),
            "result" => match value.as_str().and_then(outcome_named) {
                Some(o) => r.outcome = o,
                None => {
                    tracing::warn!(hook = PROCESS_CALL_PARAMS, %id, "result is not one of the results; kept")
                }
            },
            "duration" => match value.as_u64() {
                Some(s) => r.talk_seconds = s,
                None => {
                    tracing::warn!(hook = PROCESS_CALL_PARAMS, %id, "duration must not be negative; kept")
                }
            },
            "duration_waiting" => match value.as_u64() {
                Some(s) => r.wait_seconds = s,
                None => {
                    tracing::warn!(hook = PROCESS_CALL_PARAMS, %id, "duration_waiting must not be negative; kept")
                }
            },
            "record_url" => record_url = text(value),
            "external_phone" => r.external_phone = text(value),
            _ => {}
        }
    }
    (r, record_url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_result_has_a_name_and_back() {
        for o in OUTCOMES {
            assert_eq!(outcome_named(result_name(o)), Some(o));
        }
        assert_eq!(outcome_named("declined"), None);
    }
}
