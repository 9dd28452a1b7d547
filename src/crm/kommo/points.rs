//! Kommo's own customisation points, on the API's bodies themselves (Kommo's field names):
//! - `process_contact_creation_params`: the contact created for an unknown caller
//!   (`kommo.unknown_caller = "contact"`, and the contact of an incoming lead);
//! - `process_lead_creation_params`: the lead of an incoming lead;
//! - `process_unsorted_params`: the `leads/unsorted/sip` item as a whole (`source_uid` and
//!   `metadata.uniq` are read-only: they tie the incoming lead to the call);
//! - `process_contact_update_params` / `process_lead_update_params`: after the call was
//!   logged, fields of the contact and of the lead it was attached to (`PATCH`); nothing is
//!   sent unless the hook gives some.
//!
//! (`process_call_params`, the CRM-neutral point, shapes the call itself before it is mapped.)
//! Kommo refuses `null`s, so a hook's answer with one is refused as a whole (the default
//! applies). A field name must look like Kommo's (lower-case letters, digits, `_`, or `_embedded`);
//! others are dropped with a warn line.

use serde_json::{json, Map, Value};

use crate::hooks::{FieldKind, HookResult, Hooks, Stage};

pub const PROCESS_CONTACT_CREATION_PARAMS: &str = "process_contact_creation_params";
pub const PROCESS_LEAD_CREATION_PARAMS: &str = "process_lead_creation_params";
pub const PROCESS_UNSORTED_PARAMS: &str = "process_unsorted_params";
pub const PROCESS_CONTACT_UPDATE_PARAMS: &str = "process_contact_update_params";
pub const PROCESS_LEAD_UPDATE_PARAMS: &str = "process_lead_update_params";

/// Any field (checked by name below), never `null`.
const ANY: &[(&str, FieldKind)] = &[("*", FieldKind::Any)];

fn field_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Calls `point` with `body` (and `extra`, `call_full`, `call_stage`) and applies what it
/// returns to `body`: `read_only` fields stay.
async fn through(
    hooks: &Hooks,
    point: &str,
    id: &str,
    mut body: Map<String, Value>,
    extra: Map<String, Value>,
    read_only: &[&str],
    full: impl FnOnce() -> Value,
) -> Map<String, Value> {
    if !hooks.is_configured(point) {
        return body;
    }
    let mut input = body.clone();
    input.extend(extra);
    input.insert("call_full".into(), full());
    input.insert("call_stage".into(), json!(Stage::CallEnded.as_str()));
    if let HookResult::Changed(data) = hooks.call(point, Value::Object(input), ANY).await {
        for (k, v) in data {
            if read_only.contains(&k.as_str()) || !field_name_ok(k.trim_start_matches('_')) {
                tracing::warn!(hook = point, id, field = %k, "field refused: read-only or not a Kommo field");
                continue;
            }
            body.insert(k, v);
        }
    }
    body
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// A creation point (`process_contact_creation_params`, `process_lead_creation_params`).
pub async fn creation(
    hooks: &Hooks,
    point: &str,
    id: &str,
    body: Value,
    full: impl FnOnce() -> Value,
) -> Value {
    Value::Object(through(hooks, point, id, object(body), Map::new(), &[], full).await)
}

/// `process_unsorted_params`: `source_uid` stays, and so does `metadata.uniq`.
pub async fn unsorted(hooks: &Hooks, id: &str, body: Value, full: impl FnOnce() -> Value) -> Value {
    let uniq = body["metadata"]["uniq"].clone();
    let read_only = ["source_uid", "request_id"];
    let mut out = through(
        hooks,
        PROCESS_UNSORTED_PARAMS,
        id,
        object(body),
        Map::new(),
        &read_only,
        full,
    )
    .await;
    if let Some(meta) = out.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("uniq".into(), uniq);
    }
    Value::Object(out)
}

/// An update point: the fields to `PATCH` (empty: nothing to do). `about` tells the hook which
/// record (`{"id": .., "type": "contacts" | "leads"}`).
pub async fn update(
    hooks: &Hooks,
    point: &str,
    id: &str,
    about: Value,
    full: impl FnOnce() -> Value,
) -> Map<String, Value> {
    if !hooks.is_configured(point) {
        return Map::new();
    }
    let mut extra = Map::new();
    extra.insert("entity".into(), about);
    through(hooks, point, id, Map::new(), extra, &["id", "entity"], full).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kommo_field_names_only() {
        assert!(field_name_ok("responsible_user_id"));
        assert!(field_name_ok("custom_fields_values"));
        assert!(!field_name_ok("Bad Field"));
        assert!(!field_name_ok(""));
    }
}
