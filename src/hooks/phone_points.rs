//! The two points that rewrite a number before the CRM sees it, shared by every caller (live
//! events, history, routing, click-to-call):
//! - `process_client_phone`: the customer's number, before any CRM request carries it;
//! - `process_user_phone`: an employee's number (the extension), before a user is looked up
//!   by it or it is sent as the manager's code.
//!
//! Input: `{"phone": "...", "call_full": {...} or null, "call_stage": "..."}`; the hook may
//! return `{"phone": "..."}`. An empty answer, a failure or no hook: the number as it was.

use serde_json::{json, Value};

use super::{FieldKind, HookResult, Hooks, Stage};

pub const PROCESS_CLIENT_PHONE: &str = "process_client_phone";
pub const PROCESS_USER_PHONE: &str = "process_user_phone";

/// What both points may return.
pub const PHONE: &[(&str, FieldKind)] = &[("phone", FieldKind::String)];

/// The input of both points.
pub fn input(phone: &str, call_full: &Value, stage: Stage) -> Value {
    json!({
        "phone": phone,
        "call_full": call_full,
        "call_stage": stage.as_str(),
    })
}

/// `process_client_phone`: the customer's number as the hook leaves it.
pub async fn client_phone(hooks: &Hooks, phone: &str, call_full: &Value, stage: Stage) -> String {
    rewrite(hooks, PROCESS_CLIENT_PHONE, phone, call_full, stage).await
}

/// `process_user_phone`: an employee's number (extension) as the hook leaves it.
pub async fn user_phone(hooks: &Hooks, phone: &str, call_full: &Value, stage: Stage) -> String {
    rewrite(hooks, PROCESS_USER_PHONE, phone, call_full, stage).await
}

async fn rewrite(
    hooks: &Hooks,
    point: &str,
    phone: &str,
    call_full: &Value,
    stage: Stage,
) -> String {
    if !hooks.is_configured(point) || phone.is_empty() {
        return phone.to_string();
    }
    match hooks
        .call(point, input(phone, call_full, stage), PHONE)
        .await
    {
        HookResult::Changed(data) => match data.get("phone").and_then(Value::as_str) {
            Some(p) if !p.trim().is_empty() => p.trim().to_string(),
            Some(_) => {
                tracing::warn!(hook = point, "the hook answered an empty phone; kept");
                phone.to_string()
            }
            None => phone.to_string(),
        },
        _ => phone.to_string(),
    }
}
