//! Events Bitrix24 posts to `{http.public_url}/bitrix24/events` (form-encoded, PHP-bracket
//! keys: `data[USER_ID]`, `auth[application_token]`): read and checked here, acted on by
//! click-to-call. An event is genuine when its `auth[application_token]` equals
//! `bitrix24.application_token` (compared in constant time); flags are read leniently.

use std::collections::BTreeMap;

use crate::base::secret::Secret;

/// Most fields an event form may have.
pub const MAX_FIELDS: usize = 100;

/// What an event asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A user clicked a number (`ONEXTERNALCALLSTART`): the portal registered `call_id`.
    CallStart {
        user_id: i64,
        phone: String,
        call_id: String,
        line: Option<String>,
    },
    /// A web form asked to be called back (`ONEXTERNALCALLBACKSTART`): nothing registered.
    CallbackStart { phone: String, line: Option<String> },
    /// Anything else: acknowledged, nothing done.
    Other(String),
}

/// A problem with a field of the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadField {
    pub field: &'static str,
    pub problem: String,
}

fn bad(field: &'static str, problem: impl Into<String>) -> BadField {
    BadField {
        field,
        problem: problem.into(),
    }
}

/// The form as a map (the first value of a key wins); refuses a form with too many fields.
pub fn fields(form: Vec<(String, String)>) -> Result<BTreeMap<String, String>, BadField> {
    if form.len() > MAX_FIELDS {
        return Err(bad("body", format!("more than {MAX_FIELDS} fields")));
    }
    let mut map = BTreeMap::new();
    for (k, v) in form {
        map.entry(k).or_insert(v);
    }
    Ok(map)
}

/// Whether the event carries our application token.
pub fn genuine(form: &BTreeMap<String, String>, token: &Secret) -> bool {
    form.get("auth[application_token]")
        .is_some_and(|t| token.matches(t))
}

/// Reads the event.
pub fn parse(form: &BTreeMap<String, String>) -> Result<Event, BadField> {
    let get = |k: &str| form.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let name = get("event").ok_or_else(|| bad("event", "is required"))?;
    let phone = || -> Result<String, BadField> {
        let raw =
            get("data[PHONE_NUMBER]").ok_or_else(|| bad("data[PHONE_NUMBER]", "is required"))?;
        if raw.len() > 64 {
            return Err(bad("data[PHONE_NUMBER]", "is longer than 64 characters"));
        }
        Ok(raw.to_string())
    };
    let line = get("data[LINE_NUMBER]").map(|l| l.chars().take(50).collect());
    match name.to_ascii_uppercase().as_str() {
        "ONEXTERNALCALLSTART" => {
            let user_id = get("data[USER_ID]")
                .ok_or_else(|| bad("data[USER_ID]", "is required"))?
                .parse::<i64>()
                .ok()
                .filter(|u| *u > 0)
                .ok_or_else(|| bad("data[USER_ID]", "must be a positive integer"))?;
            let call_id =
                get("data[CALL_ID]").ok_or_else(|| bad("data[CALL_ID]", "is required"))?;
            if call_id.len() > 128
                || !call_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
            {
                return Err(bad("data[CALL_ID]", "is not a Bitrix24 call id"));
            }
            Ok(Event::CallStart {
                user_id,
                phone: phone()?,
                call_id: call_id.to_string(),
                line,
            })
        }
        "ONEXTERNALCALLBACKSTART" => Ok(Event::CallbackStart {
            phone: phone()?,
            line,
        }),
        other => Ok(Event::Other(other.chars().take(64).collect())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        fields(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn a_call_start_is_read_and_verified() {
        let f = form(&[
            ("event", "ONEXTERNALCALLSTART"),
            ("data[USER_ID]", "11"),
            ("data[PHONE_NUMBER]", "+7 999 123-45-67"),
            ("data[CALL_ID]", "externalCall.0123abcd.1795255200"),
            ("auth[application_token]", "tok-0123456789"),
        ]);
        assert!(genuine(&f, &Secret::new("tok-0123456789")));
        assert!(!genuine(&f, &Secret::new("tok-other")));
        assert!(!genuine(&f, &Secret::default()));
        assert_eq!(
            parse(&f).unwrap(),
            Event::CallStart {
                user_id: 11,
                phone: "+7 999 123-45-67".into(),
                call_id: "externalCall.0123abcd.1795255200".into(),
                line: None
            }
        );
    }

    #[test]
    fn missing_fields_are_named() {
        let f = form(&[("event", "ONEXTERNALCALLSTART"), ("data[USER_ID]", "x")]);
        assert_eq!(parse(&f).unwrap_err().field, "data[USER_ID]");
        let f = form(&[("event", "ONEXTERNALCALLBACKSTART")]);
        assert_eq!(parse(&f).unwrap_err().field, "data[PHONE_NUMBER]");
        assert_eq!(parse(&form(&[])).unwrap_err().field, "event");
    }
}
