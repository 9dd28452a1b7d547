//! Bitrix24's own customisation points, on the REST parameters themselves (Bitrix24's names):
//! - `process_registration_params`: `register`'s parameters (`USER_ID`, `PHONE_NUMBER`, `TYPE`,
//!   `CALL_START_DATE`, `CRM_CREATE`, `CRM_SOURCE`, `LINE_NUMBER`, `SHOW`); `call_stage`
//!   `conversation_requested` (live) or `call_ended` (a call registered from the history).
//!   `EXTERNAL_CALL_ID` is read-only: it keeps two calls from sharing a `CALL_ID`.
//! - `customize_show_call_card`: before a card is shown: `CALL_ID` (read-only), `USER_ID`.
//! - `process_final_params`: `finish`'s `USER_ID`, `DURATION`, `STATUS_CODE`, `ADD_TO_CHAT`;
//!   `CALL_ID` read-only.
//! - `customize_attach_record_url`: `attachRecord`'s `RECORD_URL` and `FILENAME` (link mode).
//! - `customize_activity`: after the finish, fields of the call's CRM activity
//!   (`crm.activity.update`); `activity.id` tells which.
//! - `customize_entity`: after the finish, fields of the lead, contact or company the call
//!   was bound to (`crm.<type>.update`).
//!
//! A changed value is kept only if it is valid for the method (a wrong type or range is
//! dropped with a warn line, the other changes stay): a hook cannot make the portal refuse
//! the call.

use serde_json::{json, Map, Value};

use crate::hooks::{FieldKind, HookResult, Hooks, Stage};

pub const PROCESS_REGISTRATION_PARAMS: &str = "process_registration_params";
pub const CUSTOMIZE_SHOW_CALL_CARD: &str = "customize_show_call_card";
pub const PROCESS_FINAL_PARAMS: &str = "process_final_params";
pub const CUSTOMIZE_ATTACH_RECORD_URL: &str = "customize_attach_record_url";
pub const CUSTOMIZE_ACTIVITY: &str = "customize_activity";
pub const CUSTOMIZE_ENTITY: &str = "customize_entity";

const REGISTRATION_FIELDS: &[(&str, FieldKind)] = &[
    ("USER_ID", FieldKind::Integer),
    ("PHONE_NUMBER", FieldKind::String),
    ("TYPE", FieldKind::Integer),
    ("CALL_START_DATE", FieldKind::String),
    ("CRM_CREATE", FieldKind::Integer),
    ("CRM_SOURCE", FieldKind::String),
    ("LINE_NUMBER", FieldKind::String),
    ("SHOW", FieldKind::Integer),
];
const CARD_FIELDS: &[(&str, FieldKind)] = &[("USER_ID", FieldKind::Integer)];
const FINAL_FIELDS: &[(&str, FieldKind)] = &[
    ("USER_ID", FieldKind::Integer),
    ("DURATION", FieldKind::Integer),
    ("STATUS_CODE", FieldKind::String),
    ("ADD_TO_CHAT", FieldKind::Integer),
];
const RECORD_FIELDS: &[(&str, FieldKind)] = &[
    ("RECORD_URL", FieldKind::String),
    ("FILENAME", FieldKind::String),
];
/// Any field of an activity or entity (checked by name below).
const ANY_FIELDS: &[(&str, FieldKind)] = &[("*", FieldKind::Any)];

/// Is a changed value valid for the field?
fn valid(field: &str, v: &Value) -> bool {
    let int = v.as_i64();
    match field {
        "USER_ID" => int.is_some_and(|u| u > 0),
        "TYPE" => int.is_some_and(|t| (1..=5).contains(&t)),
        "SHOW" | "CRM_CREATE" | "ADD_TO_CHAT" => int.is_some_and(|b| b == 0 || b == 1),
        "DURATION" => int.is_some_and(|d| (0..=86_400).contains(&d)),
        "PHONE_NUMBER" => v
            .as_str()
            .is_some_and(|p| p.chars().any(|c| c.is_ascii_digit()) && p.len() <= 64),
        "CALL_START_DATE" => v
            .as_str()
            .is_some_and(|d| d.parse::<jiff::Timestamp>().is_ok()),
        "STATUS_CODE" => v.as_str().is_some_and(|s| !s.is_empty() && s.len() <= 16),
        "LINE_NUMBER" | "CRM_SOURCE" => v.as_str().is_some_and(|s| s.len() <= 50),
        "RECORD_URL" => v.as_str().is_some_and(|u| {
            url::Url::parse(u).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
        }),
        "FILENAME" => v.as_str().is_some_and(|n| {
            let n = n.to_ascii_lowercase();
            (n.ends_with(".wav") || n.ends_with(".mp3")) && !n.contains('/') && n.len() <= 200
        }),
        // A CRM field name: upper-case letters, digits and underscores.
        _ => {
            !field.is_empty()
                && field.len() <= 64
                && field
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        }
    }
}

/// Calls `point` with `params` (and `call_full`, `call_stage`) and returns `params` as the
/// hook leaves them: only the allowed, valid changes.
async fn through(
    hooks: &Hooks,
    point: &str,
    id: &str,
    mut params: Map<String, Value>,
    fields: &[(&str, FieldKind)],
    full: impl FnOnce() -> Value,
    stage: Stage,
) -> Map<String, Value> {
    if !hooks.is_configured(point) {
        return params;
    }
    let mut input = params.clone();
    input.insert("call_full".into(), full());
    input.insert("call_stage".into(), json!(stage.as_str()));
    if let HookResult::Changed(data) = hooks.call(point, Value::Object(input), fields).await {
        for (k, v) in data {
            if valid(&k, &v) {
                params.insert(k, v);
            } else {
                tracing::warn!(hook = point, id, field = %k, "hook's value refused: Bitrix24 would not take it");
            }
        }
    }
    params
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// `process_registration_params`.
pub async fn registration(
    hooks: &Hooks,
    id: &str,
    params: Value,
    full: impl FnOnce() -> Value,
    stage: Stage,
) -> Value {
    let p = through(
        hooks,
        PROCESS_REGISTRATION_PARAMS,
        id,
        object(params),
        REGISTRATION_FIELDS,
        full,
        stage,
    )
    .await;
    Value::Object(p)
}

/// `customize_show_call_card`: the user to show the card to.
pub async fn show_card(
    hooks: &Hooks,
    id: &str,
    call_id: &str,
    user_id: i64,
    full: impl FnOnce() -> Value,
    stage: Stage,
) -> i64 {
    let params = object(json!({"CALL_ID": call_id, "USER_ID": user_id}));
    let p = through(
        hooks,
        CUSTOMIZE_SHOW_CALL_CARD,
        id,
        params,
        CARD_FIELDS,
        full,
        stage,
    )
    .await;
    p.get("USER_ID").and_then(Value::as_i64).unwrap_or(user_id)
}

/// `process_final_params`.
pub async fn final_params(
    hooks: &Hooks,
    id: &str,
    params: Value,
    full: impl FnOnce() -> Value,
) -> Value {
    let p = through(
        hooks,
        PROCESS_FINAL_PARAMS,
        id,
        object(params),
        FINAL_FIELDS,
        full,
        Stage::CallEnded,
    )
    .await;
    Value::Object(p)
}

/// `customize_attach_record_url`.
pub async fn record(hooks: &Hooks, id: &str, params: Value, full: impl FnOnce() -> Value) -> Value {
    if object(params.clone()).contains_key("FILE_CONTENT") {
        // The file itself goes: there is no link to customise.
        return params;
    }
    let p = through(
        hooks,
        CUSTOMIZE_ATTACH_RECORD_URL,
        id,
        object(params),
        RECORD_FIELDS,
        full,
        Stage::CallEnded,
    )
    .await;
    Value::Object(p)
}

/// `customize_activity` / `customize_entity`: the fields to update (empty: nothing to do).
pub async fn update_fields(
    hooks: &Hooks,
    point: &str,
    id: &str,
    about: Value,
    full: impl FnOnce() -> Value,
) -> Map<String, Value> {
    if !hooks.is_configured(point) {
        return Map::new();
    }
    let key = if point == CUSTOMIZE_ACTIVITY {
        "activity"
    } else {
        "entity"
    };
    let mut input = Map::new();
    input.insert(key.into(), about);
    input.insert("call_full".into(), full());
    input.insert("call_stage".into(), json!(Stage::CallEnded.as_str()));
    let mut fields = Map::new();
    if let HookResult::Changed(data) = hooks.call(point, Value::Object(input), ANY_FIELDS).await {
        for (k, v) in data {
            if valid(&k, &v) {
                fields.insert(k, v);
            } else {
                tracing::warn!(hook = point, id, field = %k, "not a Bitrix24 field name; dropped");
            }
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_per_field() {
        assert!(valid("USER_ID", &json!(11)));
        assert!(!valid("USER_ID", &json!(0)));
        assert!(!valid("TYPE", &json!(7)));
        assert!(valid(
            "CALL_START_DATE",
            &json!("2026-11-21T13:00:00+03:00")
        ));
        assert!(!valid("CALL_START_DATE", &json!("yesterday")));
        assert!(!valid("FILENAME", &json!("../x.wav")));
        assert!(valid("UF_CRM_SOURCE_1", &json!("x")));
        assert!(!valid("bad field", &json!("x")));
    }
}
