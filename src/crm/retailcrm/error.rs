//! Typed errors of the retailCRM client and the classification of error answers.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use super::lenient;
use crate::telemetry::one_line;

/// How many bytes of an unparseable body an error carries.
pub const BODY_PREFIX: usize = 200;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CrmError {
    /// Connection refused, reset, DNS, TLS, or no answer within the timeout.
    #[error("CRM unreachable{}: {message}", if *.timeout { " (timeout)" } else { "" })]
    Transport { message: String, timeout: bool },
    /// 503 or 429: the account's rate limit.
    #[error("CRM rate limit (HTTP {status})")]
    RateLimited {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// `apiKey` missing or wrong, or the key lacks access.
    #[error("CRM refused the API key (HTTP {status}): {message}")]
    Auth { status: u16, message: String },
    /// The account URL does not point at an existing account (HTML page or "Account does not exist").
    #[error("CRM account not found at this URL (HTTP {status}): {body}")]
    AccountNotFound { status: u16, body: String },
    /// The request was understood and rejected; `errors` names the fields.
    #[error("CRM validation error (HTTP {status}): {message}{}", fields_suffix(.errors))]
    Validation {
        status: u16,
        message: String,
        errors: BTreeMap<String, String>,
    },
    /// 5xx other than 503.
    #[error("CRM server error (HTTP {status}): {message}")]
    Server { status: u16, message: String },
    /// Any other error answer (404 "Not found", "Telephony not enabled", ...).
    #[error("CRM error (HTTP {status}): {message}{}", fields_suffix(.errors))]
    Api {
        status: u16,
        message: String,
        errors: BTreeMap<String, String>,
    },
    /// The answer did not parse as what the method returns.
    #[error("CRM answer not understood (HTTP {status}): {reason}; body starts with: {body}")]
    Decode {
        status: u16,
        reason: String,
        body: String,
    },
    /// Refused before sending: more calls than one upload may carry.
    #[error("calls/upload takes at most {max} calls, got {got}")]
    TooManyCalls { got: usize, max: usize },
    /// `crm.api_key` is empty.
    #[error("CRM is not configured: crm.api_key is empty")]
    NotConfigured,
}

fn fields_suffix(errors: &BTreeMap<String, String>) -> String {
    if errors.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(" ({})", parts.join("; "))
}

impl CrmError {
    /// Whether sending the same request again later may succeed.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            CrmError::Transport { .. } | CrmError::RateLimited { .. } | CrmError::Server { .. }
        )
    }

    /// The HTTP status, when there was an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            CrmError::RateLimited { status, .. }
            | CrmError::Auth { status, .. }
            | CrmError::AccountNotFound { status, .. }
            | CrmError::Validation { status, .. }
            | CrmError::Server { status, .. }
            | CrmError::Api { status, .. }
            | CrmError::Decode { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub(crate) fn from_reqwest(e: &reqwest::Error) -> CrmError {
        // reqwest's Display includes the URL; ours carry no secret (the key travels in a header).
        let mut message = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        CrmError::Transport {
            message,
            timeout: e.is_timeout(),
        }
    }
}

/// How many bytes of the CRM's `errorMsg` an error carries.
pub const MESSAGE_MAX: usize = 500;

/// The first [`BODY_PREFIX`] bytes of a body, cut on a character boundary, on one line: CR,
/// LF and other control characters are escaped (an HTML error page must not spread over log
/// lines or forge one).
pub fn body_prefix(body: &[u8]) -> String {
    let cut = body.len().min(BODY_PREFIX);
    let text = String::from_utf8_lossy(&body[..cut]);
    let text = if cut < body.len() {
        text.trim_end_matches('\u{FFFD}')
    } else {
        &text
    };
    one_line(text, usize::MAX)
}

/// Turns an error answer (any status ≥ 400, or `success: false`) into a typed error.
/// Classification follows the official clients: by `errorMsg` first, then by status.
pub fn classify(
    status: u16,
    body: &[u8],
    parsed: Option<&Value>,
    retry_after: Option<Duration>,
) -> CrmError {
    if status == 503 || status == 429 {
        return CrmError::RateLimited {
            status,
            retry_after,
        };
    }
    let looks_html = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'<');
    let Some(Value::Object(obj)) = parsed else {
        if status >= 500 {
            return CrmError::Server {
                status,
                message: body_prefix(body),
            };
        }
        if looks_html || status == 404 {
            return CrmError::AccountNotFound {
                status,
                body: body_prefix(body),
            };
        }
        return CrmError::Decode {
            status,
            reason: "error answer is not JSON".into(),
            body: body_prefix(body),
        };
    };
    let message = one_line(
        obj.get("errorMsg").and_then(Value::as_str).unwrap_or(""),
        MESSAGE_MAX,
    );
    let errors = lenient::errors_map(obj.get("errors"))
        .into_iter()
        .map(|(k, v)| (one_line(&k, BODY_PREFIX), one_line(&v, BODY_PREFIX)))
        .collect::<BTreeMap<_, _>>();
    let lower = message.to_ascii_lowercase();

    if lower.contains("apikey") || lower.starts_with("access denied") || status == 401 {
        return CrmError::Auth { status, message };
    }
    if lower.contains("account does not exist") {
        return CrmError::AccountNotFound {
            status,
            body: message,
        };
    }
    if status >= 500 {
        return CrmError::Server { status, message };
    }
    let validation = lower.contains("validation")
        || lower.contains("errors in the entity format")
        || lower.contains("errors in the input parameters")
        || (lower.starts_with("parameter '") && lower.ends_with("is missing"))
        || (status == 400 && !errors.is_empty());
    if validation {
        return CrmError::Validation {
            status,
            message,
            errors,
        };
    }
    CrmError::Api {
        status,
        message,
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn c(status: u16, v: Value) -> CrmError {
        let body = v.to_string();
        classify(status, body.as_bytes(), Some(&v), None)
    }

    #[test]
    fn classification_by_message_then_status() {
        assert!(matches!(
            c(503, json!({})),
            CrmError::RateLimited { status: 503, .. }
        ));
        assert!(matches!(
            c(429, json!({})),
            CrmError::RateLimited { status: 429, .. }
        ));
        assert!(matches!(
            c(403, json!({"errorMsg": "Wrong \"apiKey\" value."})),
            CrmError::Auth { .. }
        ));
        assert!(matches!(
            c(400, json!({"errorMsg": "\"apiKey\" is missing."})),
            CrmError::Auth { .. }
        ));
        assert!(matches!(
            c(403, json!({"errorMsg": "Access denied."})),
            CrmError::Auth { .. }
        ));
        assert!(matches!(
            c(404, json!({"errorMsg": "Account does not exist."})),
            CrmError::AccountNotFound { .. }
        ));
        assert!(matches!(
            c(500, json!({"errorMsg": "boom"})),
            CrmError::Server { .. }
        ));
        assert!(matches!(
            c(
                400,
                json!({"errorMsg": "Errors in the entity format", "errors": {"phone": "x"}})
            ),
            CrmError::Validation { .. }
        ));
        assert!(matches!(
            c(400, json!({"errorMsg": "Parameter 'phone' is missing"})),
            CrmError::Validation { .. }
        ));
        assert!(matches!(
            c(404, json!({"errorMsg": "Not found"})),
            CrmError::Api { status: 404, .. }
        ));
        assert!(matches!(
            c(400, json!({"errorMsg": "Telephony not enabled"})),
            CrmError::Api { .. }
        ));
    }

    #[test]
    fn non_json_answers() {
        let html = b"<html><body>No such account</body></html>";
        assert!(matches!(
            classify(405, html, None, None),
            CrmError::AccountNotFound { status: 405, .. }
        ));
        assert!(matches!(
            classify(502, b"Bad gateway", None, None),
            CrmError::Server { status: 502, .. }
        ));
        let long = vec![b'x'; 1000];
        match classify(418, &long, None, None) {
            CrmError::Decode { status, body, .. } => {
                assert_eq!(status, 418);
                assert_eq!(body.len(), BODY_PREFIX);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bodies_and_messages_from_the_crm_stay_on_one_line() {
        let page = format!(
            "<html>\r\n<body>\r\nINFO pbxgate: forged\r\n{}</body></html>",
            "é".repeat(300)
        );
        let CrmError::AccountNotFound { body, .. } = classify(404, page.as_bytes(), None, None)
        else {
            panic!("not classified as a missing account")
        };
        assert!(!body.contains(['\r', '\n']), "{body}");
        assert!(body.starts_with("<html>\\r\\n<body>\\r\\nINFO pbxgate: forged\\r\\n"));
        assert!(body.ends_with('é') && !body.contains("</body>"), "{body}");
        let v = serde_json::json!({"errorMsg": format!("bad\n{}", "x".repeat(2000)), "errors": {"a\nb": "c\rd"}});
        let CrmError::Api {
            message, errors, ..
        } = c(418, v)
        else {
            panic!()
        };
        assert!(message.starts_with("bad\\nxxx") && message.len() < MESSAGE_MAX + 10);
        assert_eq!(errors.get("a\\nb").map(String::as_str), Some("c\\rd"));
    }

    #[test]
    fn retriable_set() {
        assert!(CrmError::Transport {
            message: String::new(),
            timeout: true
        }
        .is_retriable());
        assert!(CrmError::RateLimited {
            status: 503,
            retry_after: None
        }
        .is_retriable());
        assert!(CrmError::Server {
            status: 500,
            message: String::new()
        }
        .is_retriable());
        assert!(!CrmError::Auth {
            status: 403,
            message: String::new()
        }
        .is_retriable());
        assert!(!CrmError::Validation {
            status: 400,
            message: String::new(),
            errors: BTreeMap::new()
        }
        .is_retriable());
        assert!(!CrmError::TooManyCalls { got: 51, max: 50 }.is_retriable());
    }
}
