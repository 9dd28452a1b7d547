//! Follow-up tasks for missed calls, in CRM-neutral terms: which calls get one, the task's
//! default text, responsible and due time (from `[crm]`), and the customisation point
//! `process_task_creation_params` that may change them or decide there is no task. Each adapter
//! turns the result into its CRM's task and keeps the task to once per call.
//!
//! The point's fields, given and returned under these names: `text`, `commentary` (string or
//! null), `responsible_id` (the CRM user id, or null), `due` (`YYYY-MM-DD HH:MM:SS`, the PBX
//! host's local time, like the times in `call_full`), `phone` (string or null), and, returned
//! only, `create` (`false`: no task). `call_stage` is `call_ended`.

use std::time::Duration;

use serde_json::{json, Value};

use crate::calls::{CallRecord, Direction, Outcome};
use crate::config::CrmConfig;
use crate::hooks::{FieldKind, HookResult, Hooks, Stage};

pub const PROCESS_TASK_CREATION_PARAMS: &str = "process_task_creation_params";

/// What `process_task_creation_params` may return.
pub const TASK_PARAMS: &[(&str, FieldKind)] = &[
    ("text", FieldKind::String),
    ("commentary", FieldKind::OptString),
    ("responsible_id", FieldKind::OptInteger),
    ("due", FieldKind::String),
    ("phone", FieldKind::OptString),
    ("create", FieldKind::Bool),
];

/// How `due` is written at the point.
const DUE_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

/// A call that gets a follow-up task: inbound, and nobody answered it — no answer, busy or
/// failed. Calls refused by policy (`not allowed`) and calls of unknown outcome get none.
pub fn is_missed(r: &CallRecord) -> bool {
    r.direction == Direction::In
        && matches!(
            r.outcome,
            Outcome::NoAnswer | Outcome::Busy | Outcome::Failed
        )
}

/// A task about to be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskDraft {
    pub text: String,
    pub commentary: Option<String>,
    /// The CRM user the task is for; `None`: nobody, so no task.
    pub responsible_id: Option<i64>,
    pub due: jiff::Timestamp,
    /// The customer's number.
    pub phone: Option<String>,
}

/// The result's words in the default commentary.
fn result_words(o: Outcome) -> &'static str {
    match o {
        Outcome::Answered => "answered",
        Outcome::NoAnswer => "no answer",
        Outcome::Busy => "busy",
        Outcome::Failed => "failed",
        Outcome::NotAllowed => "not allowed",
        Outcome::Unknown => "unknown",
    }
}

/// The task `[crm]` describes for a missed call: `crm.missed_call_task_text` with `{phone}`,
/// due `crm.missed_call_task_due` after the call ended, for `crm.missed_call_task_performer`
/// or else `manager` (the call's user as the CRM knows it).
pub fn draft(c: &CrmConfig, r: &CallRecord, phone: &str, manager: Option<i64>) -> TaskDraft {
    let performer = Some(c.missed_call_task_performer).filter(|id| *id > 0);
    let mut commentary = format!(
        "Inbound call {}: {}, waited {} s",
        r.external_id,
        result_words(r.outcome),
        r.wait_seconds
    );
    if let Some(line) = r.external_phone.as_deref().filter(|l| !l.is_empty()) {
        commentary.push_str(&format!(", line {line}"));
    }
    TaskDraft {
        text: c.missed_call_task_text.replace("{phone}", phone),
        commentary: Some(commentary),
        responsible_id: performer.or(manager),
        due: due_after(r.end, c.missed_call_task_due),
        phone: Some(phone.to_string()).filter(|p| !p.is_empty()),
    }
}

fn due_after(end_ms: i64, after: Duration) -> jiff::Timestamp {
    let end = jiff::Timestamp::from_millisecond(end_ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let after = jiff::SignedDuration::try_from(after).unwrap_or(jiff::SignedDuration::ZERO);
    end.checked_add(after).unwrap_or(end)
}

/// `due` as the point gives it.
pub fn local_due(due: jiff::Timestamp, tz: &jiff::tz::TimeZone) -> String {
    due.to_zoned(tz.clone()).strftime(DUE_FORMAT).to_string()
}

fn parse_due(text: &str, tz: &jiff::tz::TimeZone) -> Option<jiff::Timestamp> {
    let civil = jiff::civil::DateTime::strptime(DUE_FORMAT, text.trim()).ok()?;
    civil.to_zoned(tz.clone()).ok().map(|z| z.timestamp())
}

/// The point's input for `draft`.
pub fn task_input(draft: &TaskDraft, call_full: &Value) -> Value {
    json!({
        "call_full": call_full,
        "call_stage": Stage::CallEnded.as_str(),
        "text": draft.text,
        "commentary": draft.commentary,
        "responsible_id": draft.responsible_id,
        "due": local_due(draft.due, &jiff::tz::TimeZone::system()),
        "phone": draft.phone,
    })
}

/// `process_task_creation_params`: the task as the hook leaves it, or `None` when the hook
/// answered `create: false`. A failed hook, or none: the draft as it is.
pub async fn task_creation_params(
    hooks: &Hooks,
    draft: TaskDraft,
    call_full: &Value,
    id: &str,
) -> Option<TaskDraft> {
    if !hooks.is_configured(PROCESS_TASK_CREATION_PARAMS) {
        return Some(draft);
    }
    let tz = jiff::tz::TimeZone::system();
    let input = task_input(&draft, call_full);
    let HookResult::Changed(data) = hooks
        .call(PROCESS_TASK_CREATION_PARAMS, input, TASK_PARAMS)
        .await
    else {
        return Some(draft);
    };
    if data.get("create").and_then(Value::as_bool) == Some(false) {
        tracing::info!(hook = PROCESS_TASK_CREATION_PARAMS, %id, "the hook decided: no task for this call");
        return None;
    }
    let point = PROCESS_TASK_CREATION_PARAMS;
    let mut task = draft;
    let text = |v: &Value| v.as_str().map(str::to_string);
    for (field, value) in &data {
        match field.as_str() {
            "text" => match value.as_str().map(str::trim) {
                Some(t) if !t.is_empty() => task.text = t.to_string(),
                _ => tracing::warn!(hook = point, %id, "text must not be empty; kept"),
            },
            "commentary" => task.commentary = text(value),
            "responsible_id" => match value.as_i64() {
                Some(n) if n <= 0 => {
                    tracing::warn!(hook = point, %id, "responsible_id must be a user id (> 0); kept")
                }
                n => task.responsible_id = n,
            },
            "due" => match value.as_str().and_then(|d| parse_due(d, &tz)) {
                Some(due) => task.due = due,
                None => {
                    tracing::warn!(hook = point, %id, "due must be YYYY-MM-DD HH:MM:SS; kept")
                }
            },
            "phone" => task.phone = text(value).filter(|p| !p.trim().is_empty()),
            _ => {}
        }
    }
    Some(task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_inbound_calls_nobody_answered_are_missed() {
        let mut r = CallRecord::sample("x");
        assert!(!is_missed(&r));
        for (o, missed) in [
            (Outcome::NoAnswer, true),
            (Outcome::Busy, true),
            (Outcome::Failed, true),
            (Outcome::NotAllowed, false),
            (Outcome::Unknown, false),
        ] {
            r.outcome = o;
            assert_eq!(is_missed(&r), missed, "{o:?}");
        }
        r.outcome = Outcome::NoAnswer;
        r.direction = Direction::Out;
        assert!(!is_missed(&r));
    }

    #[test]
    fn the_default_task_follows_the_config() {
        let mut c = CrmConfig::default();
        let r = CallRecord {
            outcome: Outcome::NoAnswer,
            ..CallRecord::sample("pbx-1")
        };
        let d = draft(&c, &r, "+79991234567", Some(7));
        assert_eq!(d.text, "Missed call from +79991234567");
        assert_eq!(d.responsible_id, Some(7));
        assert_eq!(d.due.as_millisecond(), r.end + 3_600_000);
        c.missed_call_task_performer = 3;
        assert_eq!(draft(&c, &r, "1", None).responsible_id, Some(3));
    }

    #[test]
    fn due_round_trips_through_its_local_text() {
        let tz = jiff::tz::TimeZone::get("Europe/Moscow").unwrap();
        let t = jiff::Timestamp::from_second(1_795_255_200).unwrap();
        let text = local_due(t, &tz);
        assert_eq!(text, "2026-11-21 13:00:00");
        assert_eq!(parse_due(&text, &tz), Some(t));
        assert_eq!(parse_due("2026-11-21 13:00", &tz), None);
    }
}
