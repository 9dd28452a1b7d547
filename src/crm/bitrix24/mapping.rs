//! pbxgate's calls in Bitrix24's terms: the parameters of `telephony.externalcall.register`
//! and `.finish`, the `STATUS_CODE` of an outcome, the date format. Pure functions.
//!
//! `STATUS_CODE` by outcome:
//!
//! | call | outcome | code |
//! |---|---|---|
//! | any | answered | `200` |
//! | inbound | not answered (any reason) | `304` (missed: starts Bitrix24's missed-call handling) |
//! | outbound | no answer | `480`, or `603-S` when our side gave up (`CANCEL`) |
//! | outbound | busy | `486` |
//! | outbound | declined, barred | `603` |
//! | outbound | failed (congestion, unreachable) | `503` |
//! | outbound | unknown | `OTHER` |

use serde_json::{json, Map, Value};

use crate::base::clock::Millis;
use crate::calls::{CallRecord, Direction, Outcome};

/// Bitrix24's call types (`TYPE`).
pub const TYPE_OUTGOING: i64 = 1;
pub const TYPE_INCOMING: i64 = 2;
pub const TYPE_CALLBACK: i64 = 4;

/// `LINE_NUMBER` is cut to this many characters by the portal; we cut it first.
const MAX_LINE: usize = 50;

/// What `register` is called with: before the hook `process_registration_params` sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub user_id: i64,
    pub phone: String,
    pub kind: i64,
    pub start: Millis,
    pub crm_create: bool,
    pub line: Option<String>,
    pub show: bool,
    /// Our externalId: unique per physical call, so that the portal never folds two calls
    /// into one `CALL_ID`.
    pub external_id: String,
}

impl Registration {
    pub fn params(&self, tz: &jiff::tz::TimeZone) -> Value {
        let mut p = Map::new();
        p.insert("USER_ID".into(), json!(self.user_id));
        p.insert("PHONE_NUMBER".into(), json!(phone_number(&self.phone)));
        p.insert("TYPE".into(), json!(self.kind));
        p.insert("CALL_START_DATE".into(), json!(date(self.start, tz)));
        p.insert("CRM_CREATE".into(), json!(u8::from(self.crm_create)));
        if let Some(line) = self.line.as_deref().filter(|l| !l.is_empty()) {
            p.insert(
                "LINE_NUMBER".into(),
                json!(line.chars().take(MAX_LINE).collect::<String>()),
            );
        }
        p.insert("SHOW".into(), json!(u8::from(self.show)));
        p.insert("EXTERNAL_CALL_ID".into(), json!(self.external_id));
        Value::Object(p)
    }
}

/// The number as the portal takes it: it keeps `0-9 # * + , ;` only and refuses an empty
/// one, so a hidden caller ID becomes `anonymous`'s placeholder `0`.
pub fn phone_number(raw: &str) -> String {
    let kept: String = raw
        .chars()
        .filter(|c| c.is_ascii_digit() || matches!(c, '#' | '*' | '+' | ',' | ';'))
        .collect();
    if kept.chars().any(|c| c.is_ascii_digit()) {
        kept
    } else {
        "0".into()
    }
}

/// RFC 3339 with the offset (`2026-11-21T13:00:00+03:00`): a date without one would be read
/// in the portal server's zone.
pub fn date(at: Millis, tz: &jiff::tz::TimeZone) -> String {
    jiff::Timestamp::from_millisecond(at)
        .map(|t| {
            t.to_zoned(tz.clone())
                .strftime("%Y-%m-%dT%H:%M:%S%:z")
                .to_string()
        })
        .unwrap_or_default()
}

/// The call's `STATUS_CODE` (see the module's table).
pub fn status_code(r: &CallRecord) -> &'static str {
    match (r.direction, r.outcome) {
        (_, Outcome::Answered) => "200",
        (Direction::In | Direction::Internal, _) => "304",
        (Direction::Out, Outcome::NoAnswer) => {
            if r.customer_dial_status.as_deref() == Some("CANCEL") {
                "603-S"
            } else {
                "480"
            }
        }
        (Direction::Out, Outcome::Busy) => "486",
        (Direction::Out, Outcome::NotAllowed) => "603",
        (Direction::Out, Outcome::Failed) => "503",
        (Direction::Out, Outcome::Unknown) => "OTHER",
    }
}

/// `finish`'s parameters: the user who talked last (or owns the missed call), the talk time.
pub fn finish_params(call_id: &str, user_id: i64, r: &CallRecord) -> Value {
    let duration = if r.outcome == Outcome::Answered {
        r.talk_seconds.max(1)
    } else {
        0
    };
    json!({
        "CALL_ID": call_id,
        "USER_ID": user_id,
        "DURATION": duration,
        "STATUS_CODE": status_code(r),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_carry_their_offset() {
        let tz = jiff::tz::TimeZone::get("Europe/Moscow").unwrap();
        assert_eq!(date(1_795_255_200_000, &tz), "2026-11-21T13:00:00+03:00");
        assert_eq!(
            date(1_795_255_200_000, &jiff::tz::TimeZone::UTC),
            "2026-11-21T10:00:00+00:00"
        );
    }

    #[test]
    fn numbers_keep_what_the_portal_keeps_and_never_go_empty() {
        assert_eq!(phone_number("+7 (999) 123-45-67"), "+79991234567");
        assert_eq!(phone_number("anonymous"), "0");
        assert_eq!(phone_number(""), "0");
    }

    #[test]
    fn outcomes_give_status_codes() {
        let mut r = CallRecord::sample("x");
        assert_eq!(status_code(&r), "200");
        r.outcome = Outcome::Busy;
        assert_eq!(status_code(&r), "304");
        r.direction = Direction::Out;
        assert_eq!(status_code(&r), "486");
        r.outcome = Outcome::NoAnswer;
        assert_eq!(status_code(&r), "480");
        r.customer_dial_status = Some("CANCEL".into());
        assert_eq!(status_code(&r), "603-S");
        r.outcome = Outcome::Failed;
        assert_eq!(status_code(&r), "503");
        r.outcome = Outcome::NotAllowed;
        assert_eq!(status_code(&r), "603");
    }

    #[test]
    fn registration_sends_integers_for_flags_and_cuts_the_line() {
        let reg = Registration {
            user_id: 11,
            phone: "+7 999 123".into(),
            kind: TYPE_INCOMING,
            start: 1_795_255_200_000,
            crm_create: true,
            line: Some("7".repeat(60)),
            show: false,
            external_id: "pbx-1.2".into(),
        };
        let p = reg.params(&jiff::tz::TimeZone::UTC);
        assert_eq!(p["SHOW"], 0);
        assert_eq!(p["CRM_CREATE"], 1);
        assert_eq!(p["PHONE_NUMBER"], "+7999123");
        assert_eq!(p["LINE_NUMBER"].as_str().unwrap().len(), 50);
        assert_eq!(p["EXTERNAL_CALL_ID"], "pbx-1.2");
    }
}
