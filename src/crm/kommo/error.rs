//! Typed errors of the Kommo client, classified for the CRM port.
//!
//! Kommo answers errors as `application/problem+json` (`title`, `detail`, `hint`, `status`),
//! validation errors with a `validation-errors` list, and some refusals as plain HTML (an
//! nginx page when the account or our IP is blocked). Each answer becomes one variant that
//! says what happened in words an operator can act on ([`KommoError::operator_hint`] adds what
//! to do). Messages never carry a token or the client secret: the client scrubs what it puts
//! in them, and bounds them.

use std::fmt;

use serde_json::Value;

use crate::crm::port::{CrmFailure, FailureKind};
use crate::telemetry::one_line;

/// How many bytes of an answer's description an error carries.
pub const DETAIL_MAX: usize = 500;

/// How many entries of a `validation-errors` list an error keeps.
pub const ISSUES_MAX: usize = 10;

/// One entry of a 400's `validation-errors`: which item of the request (`request_id`), which
/// field (`path`, e.g. `params.link`), Kommo's code (`NotNullable`) and its words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationIssue {
    pub request_id: String,
    pub path: String,
    pub code: String,
    pub detail: String,
}

impl fmt::Display for ValidationIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.request_id.is_empty() {
            write!(f, "[{}] ", self.request_id)?;
        }
        let path = if self.path.is_empty() {
            "(request)"
        } else {
            &self.path
        };
        write!(f, "{path}")?;
        if !self.code.is_empty() {
            write!(f, ": {}", self.code)?;
        }
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KommoError {
    #[error("Kommo is not configured: set kommo.long_lived_token (or client_id, client_secret, redirect_uri)")]
    NotConfigured,
    #[error("Kommo OAuth has no tokens yet: run `pbxgate kommo auth --code ...`")]
    NotAuthorized,
    /// Connection refused, reset, DNS, TLS, or no answer within the timeout.
    #[error("Kommo unreachable{}: {message}", if *.timeout { " (timeout)" } else { "" })]
    Transport { message: String, timeout: bool },
    /// `/api/v4/calls` found no contact or company with the number (400 "Entity not found").
    #[error("Kommo has no contact with this number")]
    EntityNotFound,
    /// 401: the token is refused (for OAuth: still after a refresh).
    #[error("Kommo refused the {} (HTTP 401){}", if *.long_lived { "long-lived token" } else { "OAuth access token" }, with_detail(.detail))]
    Unauthorized { long_lived: bool, detail: String },
    /// The OAuth server refused the refresh token or the authorisation code (used already,
    /// revoked, expired).
    #[error("the Kommo OAuth grant is no longer valid (HTTP {status}){}: run `pbxgate kommo auth --code CODE` with a new code", with_detail(.detail))]
    GrantRevoked { status: u16, detail: String },
    /// The OAuth server refused the integration itself (`client_id`, `client_secret`,
    /// `redirect_uri`).
    #[error("the Kommo OAuth server refused the integration (HTTP {status}){}", with_detail(.detail))]
    ClientRefused { status: u16, detail: String },
    /// 402: the account is not paid for, or its API access is off.
    #[error("Kommo refuses the account (HTTP 402 Payment Required){}", with_detail(.detail))]
    PaymentRequired { detail: String },
    /// 403 with an HTML page: the account or our IP address is blocked.
    #[error("Kommo blocked the account or this server's IP address (HTTP 403, an HTML page){}", with_detail(.detail))]
    AccountBlocked { detail: String },
    /// 403 problem+json: the token's user lacks the rights for this request.
    #[error("Kommo denies the token's user this request (HTTP 403){}", with_detail(.detail))]
    Forbidden { detail: String },
    /// 404: an unknown id or path.
    #[error("Kommo has no such thing (HTTP 404){}", with_detail(.detail))]
    NotFound { detail: String },
    /// 400 (or 422): the request was refused as invalid.
    #[error("Kommo refused the request as invalid (HTTP {status}){}{}", with_detail(.detail), listed(.issues))]
    Validation {
        status: u16,
        detail: String,
        issues: Vec<ValidationIssue>,
    },
    /// 429: above the account's request limit.
    #[error("Kommo's request limit was exceeded (HTTP 429){}", with_detail(.detail))]
    RateLimited { detail: String },
    /// Any other error answer (5xx, 405, ...).
    #[error("Kommo error (HTTP {status}){}", with_detail(.detail))]
    Api { status: u16, detail: String },
    /// A success whose body is not what it should be (not JSON, too large).
    #[error("Kommo answer not understood (HTTP {status}): {reason}")]
    Decode { status: u16, reason: String },
    /// Not sent: the account was blocked or unpaid a moment ago, and pbxgate waits before it
    /// tries again rather than hammering it.
    #[error("Kommo requests are stopped: {reason}; {}", next_try(*.probe_in_secs))]
    Halted { reason: String, probe_in_secs: u64 },
    /// Not sent: a path or parameters that cannot be sent.
    #[error("Kommo request not sent: {reason}")]
    BadRequest { reason: String },
    /// The OAuth tokens could not be read from or written to the store.
    #[error("Kommo OAuth tokens: {message}")]
    Store { message: String },
}

fn with_detail(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

fn listed(list: &[ValidationIssue]) -> String {
    if list.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
    format!("; {}", shown.join("; "))
}

fn next_try(secs: u64) -> String {
    if secs == 0 {
        "one request is trying whether it is lifted".to_string()
    } else {
        format!("the next request tries again in {secs} s")
    }
}

impl KommoError {
    pub fn is_entity_not_found(&self) -> bool {
        matches!(self, KommoError::EntityNotFound)
    }

    /// The HTTP status, when there was an answer.
    pub fn status(&self) -> Option<u16> {
        Some(match self {
            KommoError::EntityNotFound => 400,
            KommoError::Unauthorized { .. } => 401,
            KommoError::PaymentRequired { .. } => 402,
            KommoError::AccountBlocked { .. } | KommoError::Forbidden { .. } => 403,
            KommoError::NotFound { .. } => 404,
            KommoError::RateLimited { .. } => 429,
            KommoError::GrantRevoked { status, .. }
            | KommoError::ClientRefused { status, .. }
            | KommoError::Validation { status, .. }
            | KommoError::Api { status, .. }
            | KommoError::Decode { status, .. } => *status,
            _ => return None,
        })
    }

    /// The validation errors of a 400, if it had any.
    pub fn validation_issues(&self) -> &[ValidationIssue] {
        match self {
            KommoError::Validation { issues, .. } => issues,
            _ => &[],
        }
    }

    /// Whether sending the same request again later may succeed: no answer, the rate limit, a
    /// server error. Everything else needs a change of the request, the credentials or the
    /// account.
    pub fn is_retriable(&self) -> bool {
        match self {
            KommoError::Transport { .. } | KommoError::RateLimited { .. } => true,
            KommoError::Api { status, .. } | KommoError::Decode { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// The account is blocked or unpaid: pbxgate stops sending for a while (the alarm).
    pub fn is_account_block(&self) -> bool {
        matches!(
            self,
            KommoError::AccountBlocked { .. } | KommoError::PaymentRequired { .. }
        )
    }

    /// Our credentials or the account are refused: `/ready` and the dashboard say so.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            KommoError::Unauthorized { .. }
                | KommoError::GrantRevoked { .. }
                | KommoError::ClientRefused { .. }
                | KommoError::PaymentRequired { .. }
                | KommoError::AccountBlocked { .. }
                | KommoError::NotAuthorized
        )
    }

    /// What the operator should do about it, when that is not obvious from the message.
    pub fn operator_hint(&self) -> Option<&'static str> {
        Some(match self {
            KommoError::NotConfigured => {
                "set kommo.base_url and kommo.long_lived_token (a private integration's \
                 long-lived token, from its Keys and scopes tab), or kommo.client_id, \
                 client_secret and redirect_uri for OAuth"
            }
            KommoError::NotAuthorized | KommoError::GrantRevoked { .. } => {
                "with the service stopped, run `pbxgate kommo auth` and follow what it says \
                 (a new authorization code from the integration's page in Kommo), then start \
                 the service"
            }
            KommoError::Unauthorized {
                long_lived: true, ..
            } => {
                "the long-lived token expired or was revoked: generate a new one in the private \
                 integration's Keys and scopes tab and put it in kommo.long_lived_token"
            }
            KommoError::Unauthorized {
                long_lived: false, ..
            } => {
                "the integration was disconnected or its access revoked: run `pbxgate kommo \
                 auth` (with the service stopped) for a new authorisation"
            }
            KommoError::ClientRefused { .. } => {
                "check kommo.client_id, kommo.client_secret and kommo.redirect_uri against the \
                 integration's Keys and scopes tab (the redirect URI must be exactly the \
                 registered one)"
            }
            KommoError::PaymentRequired { .. } => {
                "the Kommo account's subscription is unpaid or its API access is off: renew \
                 it; pbxgate tries again by itself every few minutes"
            }
            KommoError::AccountBlocked { .. } => {
                "Kommo blocks the account's API or this server's IP (too many requests?): \
                 contact Kommo support to lift it; pbxgate sends nothing meanwhile and tries \
                 again by itself every few minutes"
            }
            KommoError::Forbidden { .. } => {
                "the token's user lacks rights: issue the token as an account administrator \
                 (or give its user the rights the request needs)"
            }
            KommoError::RateLimited { .. } => {
                "other integrations share the account's request limit: lower kommo.rps"
            }
            KommoError::Store { .. } => {
                "check that storage.path is writable and the disk is not full"
            }
            KommoError::Validation { detail, .. } if detail.contains("244") => {
                "Kommo's code 244 means missing rights or an expired subscription"
            }
            _ => return None,
        })
    }

    /// How the CRM port sees it.
    pub fn failure(&self) -> CrmFailure {
        let kind = match self {
            KommoError::NotConfigured => FailureKind::NotConfigured,
            KommoError::NotAuthorized
            | KommoError::Unauthorized { .. }
            | KommoError::GrantRevoked { .. }
            | KommoError::ClientRefused { .. }
            | KommoError::PaymentRequired { .. }
            | KommoError::AccountBlocked { .. }
            | KommoError::Forbidden { .. }
            | KommoError::Halted { .. } => FailureKind::Blocked,
            KommoError::Transport { .. }
            | KommoError::RateLimited { .. }
            | KommoError::Store { .. } => FailureKind::Transient,
            KommoError::EntityNotFound
            | KommoError::NotFound { .. }
            | KommoError::Validation { .. }
            | KommoError::BadRequest { .. } => FailureKind::Refused,
            KommoError::Api { status, .. } | KommoError::Decode { status, .. } => {
                if *status >= 500 || *status == 429 {
                    FailureKind::Transient
                } else {
                    FailureKind::Refused
                }
            }
        };
        CrmFailure {
            kind,
            message: self.with_hint(),
        }
    }

    /// The message with what to do, unless the message says it already.
    pub fn with_hint(&self) -> String {
        match self.operator_hint() {
            Some(hint)
                if !matches!(
                    self,
                    KommoError::NotAuthorized | KommoError::GrantRevoked { .. }
                ) =>
            {
                format!("{self}; {hint}")
            }
            _ => self.to_string(),
        }
    }
}

/// What an error answer's body says, on one line and bounded: problem+json's `title`,
/// `detail` and `hint` (the ones that add something), or a body's first words.
pub fn describe(body: &Value) -> String {
    let Some(obj) = body.as_object() else {
        return String::new();
    };
    let mut parts: Vec<String> = Vec::new();
    for key in ["title", "detail", "hint"] {
        let text = match obj.get(key) {
            Some(Value::String(s)) => s.trim().to_string(),
            Some(Value::Number(n)) => n.to_string(),
            _ => continue,
        };
        if !text.is_empty() && !parts.iter().any(|p| p.eq_ignore_ascii_case(&text)) {
            parts.push(text);
        }
    }
    // `{"response": {"error": ..., "error_code": ...}}` (the older API) and `errors: [...]`.
    if parts.is_empty() {
        if let Some(e) = obj
            .get("response")
            .and_then(|r| r.get("error"))
            .and_then(Value::as_str)
        {
            parts.push(e.to_string());
        }
    }
    one_line(&parts.join(": "), DETAIL_MAX)
}

/// The `validation-errors` of a 400: `[{request_id, errors: [{code, path, detail}]}]`.
pub fn validation_issues(body: &Value) -> Vec<ValidationIssue> {
    let field = |v: &Value, key: &str, max: usize| -> String {
        match v.get(key) {
            Some(Value::String(s)) => one_line(s, max),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        }
    };
    let mut out = Vec::new();
    let Some(groups) = body.get("validation-errors").and_then(Value::as_array) else {
        return out;
    };
    for group in groups {
        let request_id = field(group, "request_id", 64);
        let errors = group.get("errors").and_then(Value::as_array);
        for e in errors.into_iter().flatten() {
            if out.len() >= ISSUES_MAX {
                return out;
            }
            out.push(ValidationIssue {
                request_id: request_id.clone(),
                path: field(e, "path", 100),
                code: field(e, "code", 64),
                detail: field(e, "detail", 200),
            });
        }
    }
    out
}

/// Whether a 400 of `/api/v4/calls` says that no contact or company has the number: a title
/// (of the answer or of one of its `errors`) "Entity not found".
pub fn says_entity_not_found(body: &Value) -> bool {
    let is_it = |v: &Value| {
        ["title", "detail"].iter().any(|k| {
            v.get(*k)
                .and_then(Value::as_str)
                .is_some_and(|s| s.trim().eq_ignore_ascii_case("Entity not found"))
        })
    };
    is_it(body)
        || body
            .get("errors")
            .and_then(Value::as_array)
            .is_some_and(|list| list.iter().any(is_it))
        || body
            .get("_embedded")
            .and_then(|e| e.get("errors"))
            .and_then(Value::as_array)
            .is_some_and(|list| list.iter().any(is_it))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_validation_error_names_each_field() {
        let body = json!({"validation-errors": [{"request_id": "0", "errors": [
                {"code": "NotNullable", "path": "params.link", "detail": "This value should not be null."},
                {"code": "NotSupportedChoice", "path": "direction", "detail": "The value you selected is not a valid choice."}
            ]}],
            "title": "Bad Request", "type": "https://httpstatus.es/400", "status": 400,
            "detail": "Request validation failed"});
        let e = KommoError::Validation {
            status: 400,
            detail: describe(&body),
            issues: validation_issues(&body),
        };
        assert_eq!(
            e.to_string(),
            "Kommo refused the request as invalid (HTTP 400): Bad Request: Request validation \
             failed; [0] params.link: NotNullable (This value should not be null.); [0] \
             direction: NotSupportedChoice (The value you selected is not a valid choice.)"
        );
        assert_eq!(e.validation_issues()[1].path, "direction");
        assert!(!e.is_retriable());
        assert_eq!(e.failure().kind, FailureKind::Refused);
    }

    #[test]
    fn problem_json_is_described_without_repeats() {
        let body = json!({"hint": "Token has been revoked", "title": "Unauthorized",
                          "type": "https://developers.amocrm.ru/v3/errors/OAuthProblemJson",
                          "status": 401, "detail": "Unauthorized"});
        assert_eq!(describe(&body), "Unauthorized: Token has been revoked");
        assert_eq!(describe(&json!([1])), "");
    }

    #[test]
    fn entity_not_found_is_recognised_in_its_shapes() {
        assert!(says_entity_not_found(
            &json!({"_total_items": 0, "errors": [{"title": "Entity not found"}]})
        ));
        assert!(says_entity_not_found(&json!({"title": "Entity not found"})));
        assert!(!says_entity_not_found(
            &json!({"title": "Bad Request", "detail": "Request validation failed"})
        ));
    }

    #[test]
    fn blocks_and_refusals_need_an_operator_and_transients_do_not() {
        let blocked = KommoError::AccountBlocked {
            detail: String::new(),
        };
        assert!(blocked.is_account_block() && blocked.is_refusal());
        assert_eq!(blocked.failure().kind, FailureKind::Blocked);
        assert!(blocked.failure().message.contains("Kommo support"));
        let revoked = KommoError::GrantRevoked {
            status: 401,
            detail: "Token has been revoked".into(),
        };
        assert!(revoked.to_string().contains("pbxgate kommo auth --code"));
        assert_eq!(revoked.failure().message, revoked.to_string());
        for e in [
            KommoError::RateLimited {
                detail: String::new(),
            },
            KommoError::Api {
                status: 503,
                detail: String::new(),
            },
            KommoError::Transport {
                message: String::new(),
                timeout: true,
            },
        ] {
            assert!(e.is_retriable(), "{e}");
            assert_eq!(e.failure().kind, FailureKind::Transient);
        }
        assert!(!KommoError::Api {
            status: 405,
            detail: String::new()
        }
        .is_retriable());
        let halted = KommoError::Halted {
            reason: blocked.to_string(),
            probe_in_secs: 42,
        };
        assert!(
            halted.to_string().ends_with("tries again in 42 s"),
            "{halted}"
        );
    }
}
