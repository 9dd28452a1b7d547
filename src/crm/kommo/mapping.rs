//! pbxgate's calls in Kommo's terms: the `/api/v4/calls` item, the incoming lead of an unknown
//! caller (`leads/unsorted/sip`), the contact created for one, the pop-up event. Pure
//! functions. Kommo refuses explicit `null`s, so absent values are left out, never sent empty.
//!
//! `call_status` by outcome: answered `4` (had a conversation), no answer `6` (no
//! connection), busy `7` (line busy), failed `5` (invalid number); declined and unknown
//! outcomes `6`. `call_result` says the same in words.

use serde_json::{json, Map, Value};

use crate::calls::{CallRecord, Direction, Outcome};

/// What the call item carries besides the record itself.
pub struct CallContext<'a> {
    pub source: &'a str,
    pub link: Option<&'a str>,
    /// The Kommo user the call belongs to (`responsible_user_id`, `created_by`).
    pub user_id: Option<i64>,
}

pub fn call_status(o: Outcome) -> i64 {
    match o {
        Outcome::Answered => 4,
        Outcome::Busy => 7,
        Outcome::Failed => 5,
        Outcome::NoAnswer | Outcome::NotAllowed | Outcome::Unknown => 6,
    }
}

fn call_result(r: &CallRecord) -> &'static str {
    match (r.direction, r.outcome) {
        (_, Outcome::Answered) => "Answered",
        (Direction::Out, Outcome::Busy) => "Busy",
        (Direction::Out, Outcome::Failed) => "Failed",
        (Direction::Out, _) => "Not answered",
        (_, _) => "Missed",
    }
}

pub fn direction(r: &CallRecord) -> &'static str {
    if r.direction == Direction::Out {
        "outbound"
    } else {
        "inbound"
    }
}

/// Seconds of talk (0 for an unanswered call).
pub fn duration(r: &CallRecord) -> u64 {
    if r.outcome == Outcome::Answered {
        r.talk_seconds
    } else {
        0
    }
}

/// The `/api/v4/calls` item.
pub fn call_item(r: &CallRecord, cx: &CallContext<'_>) -> Value {
    let mut m = Map::new();
    m.insert("direction".into(), json!(direction(r)));
    m.insert("uniq".into(), json!(r.external_id));
    m.insert("duration".into(), json!(duration(r)));
    m.insert("source".into(), json!(cx.source));
    m.insert("phone".into(), json!(r.customer_number));
    m.insert("call_status".into(), json!(call_status(r.outcome)));
    m.insert("call_result".into(), json!(call_result(r)));
    if let Some(link) = cx.link.filter(|l| !l.is_empty()) {
        m.insert("link".into(), json!(link));
    }
    if let Some(user) = cx.user_id.filter(|u| *u > 0) {
        m.insert("responsible_user_id".into(), json!(user));
        m.insert("created_by".into(), json!(user));
    }
    m.insert("created_at".into(), json!(r.start.div_euclid(1000)));
    m.insert("request_id".into(), json!("0"));
    Value::Object(m)
}

/// A contact for an unknown caller: named after the number, with it as a work phone.
pub fn contact_for(phone: &str, user_id: Option<i64>) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(format!("Contact {phone}")));
    if let Some(user) = user_id.filter(|u| *u > 0) {
        m.insert("responsible_user_id".into(), json!(user));
    }
    m.insert(
        "custom_fields_values".into(),
        json!([{"field_code": "PHONE", "values": [{"value": phone, "enum_code": "WORK"}]}]),
    );
    Value::Object(m)
}

/// The lead of an incoming lead: `<phone> - incoming call` (`missed incoming call`).
pub fn lead_for(r: &CallRecord, user_id: Option<i64>) -> Value {
    let what = if r.outcome == Outcome::Answered {
        "incoming call"
    } else {
        "missed incoming call"
    };
    let mut m = Map::new();
    m.insert(
        "name".into(),
        json!(format!("{} - {what}", r.customer_number)),
    );
    if let Some(user) = user_id.filter(|u| *u > 0) {
        m.insert("responsible_user_id".into(), json!(user));
    }
    Value::Object(m)
}

/// The `leads/unsorted/sip` item of an unknown inbound caller: the call is its event
/// (`is_call_event_needed`), the lead and the contact come with it.
pub fn unsorted_item(r: &CallRecord, cx: &CallContext<'_>, lead: Value, contact: Value) -> Value {
    let ours = r
        .did
        .clone()
        .or_else(|| r.external_phone.clone())
        .or_else(|| r.code.clone())
        .unwrap_or_else(|| cx.source.to_string());
    let mut meta = Map::new();
    meta.insert("uniq".into(), json!(r.external_id));
    meta.insert("from".into(), json!(r.customer_number));
    meta.insert("phone".into(), json!(ours));
    meta.insert("called_at".into(), json!(r.start.div_euclid(1000)));
    meta.insert("duration".into(), json!(duration(r)));
    if let Some(link) = cx.link.filter(|l| !l.is_empty()) {
        meta.insert("link".into(), json!(link));
    }
    meta.insert("service_code".into(), json!(cx.source));
    meta.insert("is_call_event_needed".into(), json!(true));
    json!({
        "source_uid": r.external_id,
        "source_name": cx.source,
        "created_at": r.start.div_euclid(1000),
        "metadata": meta,
        "_embedded": {"leads": [lead], "contacts": [contact]},
        "request_id": "0",
    })
}

/// The digits of a number, last `n` of them (Kommo matches calls on the last 10).
pub fn tail_digits(phone: &str, n: usize) -> String {
    let digits: Vec<char> = phone.chars().filter(char::is_ascii_digit).collect();
    digits[digits.len().saturating_sub(n)..].iter().collect()
}

/// Whether a contact (as `GET /api/v4/contacts` gives it) has `phone` among its PHONE values.
pub fn contact_has(contact: &Value, phone: &str) -> bool {
    let want = tail_digits(phone, 10);
    if want.len() < 7 {
        return false;
    }
    let fields = contact["custom_fields_values"].as_array();
    fields.into_iter().flatten().any(|f| {
        f["field_code"] == "PHONE"
            && f["values"].as_array().into_iter().flatten().any(|v| {
                v["value"]
                    .as_str()
                    .is_some_and(|p| tail_digits(p, 10) == want)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_item_has_no_nulls_and_the_start_time() {
        let mut r = CallRecord::sample("pbx-1");
        let cx = CallContext {
            source: "pbxgate",
            link: None,
            user_id: None,
        };
        let item = call_item(&r, &cx);
        assert!(
            item.as_object().unwrap().values().all(|v| !v.is_null()),
            "{item}"
        );
        assert!(item.get("link").is_none() && item.get("responsible_user_id").is_none());
        assert_eq!(item["created_at"], 1_795_255_200);
        assert_eq!(
            (item["call_status"].as_i64(), item["duration"].as_u64()),
            (Some(4), Some(60))
        );
        r.outcome = Outcome::Busy;
        r.direction = Direction::Out;
        let item = call_item(&r, &cx);
        assert_eq!(
            (item["call_status"].as_i64(), item["duration"].as_u64()),
            (Some(7), Some(0))
        );
        assert_eq!(item["direction"], "outbound");
    }

    #[test]
    fn phones_are_compared_on_their_last_ten_digits() {
        let c = json!({"custom_fields_values": [{"field_code": "PHONE", "values": [{"value": "8 (999) 123-45-67"}]}]});
        assert!(contact_has(&c, "+79991234567"));
        assert!(!contact_has(&c, "+79991234568"));
        assert_eq!(tail_digits("+7 999 123 45 67", 10), "9991234567");
    }
}
