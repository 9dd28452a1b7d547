//! The small validators named by `#[validate(custom(function = ...))]` in the sections, and the
//! flattening of the validator's errors into one line per problem. Extension codes and phone
//! numbers are checked by the one rule each in `base::ident`, and say it in its words.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use validator::{ValidationError, ValidationErrors, ValidationErrorsKind};

use crate::base::ident::{ExtensionCode, PhoneNumber};
use crate::base::secret::Secret;

/// Turns the validator's nested errors into lines `key.path: message`.
pub(super) fn flatten_errors(prefix: &str, errors: &ValidationErrors, out: &mut Vec<String>) {
    for (field, kind) in errors.errors() {
        let key = if field == "__all__" {
            prefix.to_string()
        } else if prefix.is_empty() {
            field.to_string()
        } else {
            format!("{prefix}.{field}")
        };
        match kind {
            ValidationErrorsKind::Field(list) => {
                for e in list {
                    let msg = e.message.as_deref().unwrap_or(&e.code);
                    out.push(format!("{key}: {msg}"));
                }
            }
            ValidationErrorsKind::Struct(inner) => flatten_errors(&key, inner, out),
            ValidationErrorsKind::List(items) => {
                for (i, inner) in items {
                    flatten_errors(&format!("{key}[{i}]"), inner, out);
                }
            }
        }
    }
}

pub(super) fn problem(msg: impl Into<String>) -> ValidationError {
    let msg: String = msg.into();
    ValidationError::new("invalid").with_message(msg.into())
}

pub(super) fn non_empty_path(value: &Path) -> Result<(), ValidationError> {
    if value.as_os_str().is_empty() {
        Err(problem("must not be empty"))
    } else {
        Ok(())
    }
}

pub(super) fn socket_addr(value: &str) -> Result<(), ValidationError> {
    value
        .parse::<SocketAddr>()
        .map(|_| ())
        .map_err(|_| problem(format!("{value:?} is not an address like 127.0.0.1:8088")))
}

pub(super) fn optional_socket_addr(value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        Ok(())
    } else {
        socket_addr(value)
    }
}

pub(super) fn route_timeout(value: &Duration) -> Result<(), ValidationError> {
    if *value < Duration::from_millis(10) || *value > Duration::from_secs(30) {
        return Err(problem("must be between 10ms and 30s"));
    }
    Ok(())
}

pub(super) fn http_url(value: &str) -> Result<(), ValidationError> {
    let url = url::Url::parse(value)
        .map_err(|e| problem(format!("{value:?} is not an absolute URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(problem(format!(
            "{value:?} must start with http:// or https://"
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(problem(format!("{value:?} has no host")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(problem(format!(
            "{value:?} must not have a query or a fragment"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(problem("must not contain credentials"));
    }
    Ok(())
}

pub(super) fn module_code(value: &str) -> Result<(), ValidationError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(problem(format!(
            "{value:?} must be 1 to 64 of a-z, A-Z, 0-9, '-', '_'"
        )))
    }
}

pub(super) fn client_id(value: &Secret) -> Result<(), ValidationError> {
    let v = value.expose();
    if v.is_empty() {
        return Ok(());
    }
    if v.len() < 16 || v.len() > 128 || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(problem(
            "must be empty (generated) or 16 to 128 printable ASCII characters without spaces",
        ));
    }
    Ok(())
}

pub(super) fn request_timeout(value: &Duration) -> Result<(), ValidationError> {
    if value.is_zero() || *value > Duration::from_secs(300) {
        return Err(problem("must be more than 0 and at most 5m"));
    }
    Ok(())
}

pub(super) fn client_timeout(value: &Duration) -> Result<(), ValidationError> {
    if *value < Duration::from_millis(100) || *value > Duration::from_secs(60) {
        return Err(problem("must be between 100ms and 1m"));
    }
    Ok(())
}

pub(super) fn backoff(value: &Duration) -> Result<(), ValidationError> {
    if value.is_zero() || *value > Duration::from_secs(3600) {
        return Err(problem("must be more than 0 and at most 1h"));
    }
    Ok(())
}

pub(super) fn token(value: &Secret) -> Result<(), ValidationError> {
    let v = value.expose();
    if v.is_empty() || (16..=256).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(problem(
            "must be empty (off) or 16 to 256 printable ASCII characters",
        ))
    }
}

pub(super) fn link_ttl(value: &Duration) -> Result<(), ValidationError> {
    if *value > Duration::from_secs(36500 * 24 * 3600) {
        return Err(problem("must be at most 36500d (0 = forever)"));
    }
    Ok(())
}

pub(super) fn convert_format(value: &str) -> Result<(), ValidationError> {
    match value {
        "" | "mp3" => Ok(()),
        _ => Err(problem(format!(
            "{value:?} must be \"\" (no conversion) or \"mp3\""
        ))),
    }
}

pub(super) fn timezone(value: &str) -> Result<(), ValidationError> {
    if value.is_empty() || jiff::tz::TimeZone::get(value).is_ok() {
        Ok(())
    } else {
        Err(problem(format!(
            "{value:?} is not a known time zone (e.g. Europe/Moscow)"
        )))
    }
}

pub(super) fn regex_pattern(value: &str) -> Result<(), ValidationError> {
    regex::Regex::new(value)
        .map(|_| ())
        .map_err(|e| problem(format!("{value:?} is not a regular expression ({e})")))
}

pub(super) fn ami_events(value: &str) -> Result<(), ValidationError> {
    let ok = !value.is_empty()
        && value.len() <= 200
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b',' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(problem(format!(
            "{value:?} must be on, off, or a comma-separated class list"
        )))
    }
}

pub(super) fn dialplan_name(value: &str) -> Result<(), ValidationError> {
    let ok = !value.is_empty()
        && value.len() <= 80
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(problem(format!(
            "{value:?} must be 1 to 80 of a-z, A-Z, 0-9, '-', '_', '.'"
        )))
    }
}

pub(super) fn channel_template(value: &str) -> Result<(), ValidationError> {
    if !value.contains("{code}") {
        return Err(problem(format!("{value:?} must contain {{code}}")));
    }
    if !value.contains('/')
        || value.chars().any(|c| c.is_control() || c == ',')
        || value.len() > 200
    {
        return Err(problem(format!(
            "{value:?} must look like TECH/{{code}} (e.g. PJSIP/{{code}})"
        )));
    }
    Ok(())
}

pub(super) fn user_statuses(value: &[String]) -> Result<(), ValidationError> {
    match value
        .iter()
        .find(|s| !matches!(s.as_str(), "free" | "busy" | "dinner" | "break"))
    {
        Some(bad) => Err(problem(format!(
            "{bad:?} is not one of free, busy, dinner, break"
        ))),
        None => Ok(()),
    }
}

pub(super) fn log_filter(value: &str) -> Result<(), ValidationError> {
    tracing_subscriber::EnvFilter::try_new(value)
        .map(|_| ())
        .map_err(|e| problem(format!("{value:?} is not a log filter ({e})")))
}

pub(super) fn log_format(value: &str) -> Result<(), ValidationError> {
    match value {
        "text" | "json" => Ok(()),
        _ => Err(problem(format!("{value:?} must be \"text\" or \"json\""))),
    }
}

pub(super) fn extension_code(value: &str) -> Result<(), ValidationError> {
    if ExtensionCode::is_valid(value) {
        Ok(())
    } else {
        Err(problem(format!("{value:?} {}", ExtensionCode::RULE)))
    }
}

pub(super) fn unassigned_code(value: &str) -> Result<(), ValidationError> {
    let v = value.trim();
    let ok = v.is_empty()
        || ExtensionCode::is_valid(v)
        || v.strip_prefix("user:")
            .and_then(|id| id.parse::<i64>().ok())
            .is_some_and(|id| id > 0);
    if ok {
        Ok(())
    } else {
        let rule = ExtensionCode::RULE.trim_start_matches("must be ");
        Err(problem(format!(
            "{value:?} must be an extension code ({rule}) or user:<CRM user id>"
        )))
    }
}

pub(super) fn phone_number(value: &str) -> Result<(), ValidationError> {
    if PhoneNumber::is_valid(value) {
        Ok(())
    } else {
        Err(problem(format!("{value:?} {}", PhoneNumber::RULE)))
    }
}
