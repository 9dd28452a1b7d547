//! Typed errors of the Bitrix24 client, classified for the CRM port.
//!
//! An answer with `error` (on any HTTP status: older portals answer errors with 200) becomes
//! [`B24Error::Refused`] when the portal or the OAuth server refuses our credentials (the
//! dashboard and `pbxgate check` name the code, [`B24Error::operator_hint`] says what to do),
//! [`B24Error::GrantExpired`] for a dead refresh token, and [`B24Error::Api`] for everything
//! else (rate limits, server errors, method-level validation with its empty `error`). Messages
//! never carry a secret: the client scrubs transport errors of URLs and tokens.

use std::fmt;

use serde_json::Value;

use crate::crm::port::{CrmFailure, FailureKind};
use crate::telemetry::one_line;

/// How many bytes of Bitrix24's `error_description` (or of a body that is not JSON) an error
/// carries.
pub const DESCRIPTION_MAX: usize = 500;

/// What the refused credentials were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials {
    /// The inbound webhook (`bitrix24.webhook_url`).
    Webhook,
    /// The OAuth access token sent to the portal.
    Token,
    /// The local application's keys or refresh token, refused by the OAuth server.
    Application,
}

/// Why the portal (or the OAuth server) refused our credentials, from its `error` code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthRefusal {
    /// `expired_token`: still expired after a refresh.
    ExpiredToken,
    /// `invalid_token`: revoked or unknown, still after a refresh.
    InvalidToken,
    /// `NO_AUTH_FOUND`: a wrong or deleted webhook, a wrong token.
    NoAuthFound,
    /// `insufficient_scope` (or `invalid_scope`).
    InsufficientScope,
    /// `WRONG_AUTH_TYPE`: the method wants application (OAuth) auth.
    WrongAuthType,
    /// `ACCESS_DENIED`, `INVALID_CREDENTIALS`, `user_access_error`.
    AccessDenied,
    /// `method_confirm_waiting`.
    MethodConfirmWaiting,
    /// `invalid_grant`: the refresh token (or authorisation code) is dead.
    InvalidGrant,
    /// `invalid_client`: wrong `client_id`/`client_secret`.
    InvalidClient,
    /// `PAYMENT_REQUIRED`.
    PaymentRequired,
}

impl AuthRefusal {
    /// The refusal an `error` code stands for, if it is one.
    pub fn from_code(code: &str) -> Option<AuthRefusal> {
        Some(match code {
            "expired_token" => AuthRefusal::ExpiredToken,
            "invalid_token" => AuthRefusal::InvalidToken,
            "NO_AUTH_FOUND" => AuthRefusal::NoAuthFound,
            "insufficient_scope" | "invalid_scope" => AuthRefusal::InsufficientScope,
            "WRONG_AUTH_TYPE" => AuthRefusal::WrongAuthType,
            "ACCESS_DENIED" | "INVALID_CREDENTIALS" | "user_access_error" => {
                AuthRefusal::AccessDenied
            }
            "method_confirm_waiting" => AuthRefusal::MethodConfirmWaiting,
            "invalid_grant" => AuthRefusal::InvalidGrant,
            "invalid_client" => AuthRefusal::InvalidClient,
            "PAYMENT_REQUIRED" => AuthRefusal::PaymentRequired,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum B24Error {
    /// Neither a webhook nor OAuth is configured.
    #[error("Bitrix24 is not configured: set bitrix24.webhook_url (or portal, client_id, client_secret)")]
    NotConfigured,
    /// OAuth is configured but no grant is stored yet.
    #[error("Bitrix24 OAuth has no tokens yet: run `pbxgate bitrix24 auth`")]
    NotAuthorized,
    /// Connection refused, reset, DNS, TLS, or no answer within the timeout.
    #[error("Bitrix24 unreachable{}: {message}", if *.timeout { " (timeout)" } else { "" })]
    Transport { message: String, timeout: bool },
    /// Any error answer but a refusal of our credentials: the HTTP status, Bitrix24's `error`
    /// (empty for telephony validation errors) and `error_description`.
    #[error("Bitrix24 error (HTTP {status}) {}: {description}", shown_code(.code))]
    Api {
        status: u16,
        code: String,
        description: String,
    },
    /// The portal or the OAuth server refused the credentials (see [`AuthRefusal`]).
    #[error("{} ({code}){}", refused_by(*.by), with_description(.description))]
    Refused {
        status: u16,
        code: String,
        description: String,
        by: Credentials,
    },
    /// The OAuth server refused the refresh token or the authorisation code (`invalid_grant`).
    #[error("the Bitrix24 OAuth grant is no longer valid (invalid_grant){}: run `pbxgate bitrix24 auth` again", with_description(.description))]
    GrantExpired { description: String },
    /// The portal answered with a redirect: it moved (to `location`'s origin).
    #[error("Bitrix24 portal moved (HTTP {status}) to {location}")]
    Moved { status: u16, location: String },
    /// The answer was not the JSON envelope.
    #[error("Bitrix24 answer not understood (HTTP {status}): {reason}")]
    Decode { status: u16, reason: String },
    /// Refused before sending: more commands than one `batch` may carry.
    #[error("a Bitrix24 batch takes at most {max} commands, got {got}")]
    TooManyCommands { got: usize, max: usize },
    /// Refused before sending: a method name or parameters that cannot be sent.
    #[error("Bitrix24 request not sent: {reason}")]
    BadRequest { reason: String },
    /// The OAuth tokens could not be read from or written to the store.
    #[error("Bitrix24 OAuth tokens: {message}")]
    Store { message: String },
}

fn shown_code(code: &str) -> &str {
    if code.is_empty() {
        "\"\""
    } else {
        code
    }
}

fn refused_by(by: Credentials) -> &'static str {
    match by {
        Credentials::Webhook => "Bitrix24 refused the webhook",
        Credentials::Token => "Bitrix24 refused the OAuth token",
        Credentials::Application => "the Bitrix24 OAuth server refused the application",
    }
}

fn with_description(description: &str) -> String {
    if description.is_empty() {
        String::new()
    } else {
        format!(": {description}")
    }
}

impl B24Error {
    /// Bitrix24's error code (`QUERY_LIMIT_EXCEEDED`, `expired_token`, `""`), if it answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            B24Error::Api { code, .. } | B24Error::Refused { code, .. } => Some(code),
            B24Error::GrantExpired { .. } => Some("invalid_grant"),
            _ => None,
        }
    }

    /// The HTTP status, when there was an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            B24Error::Api { status, .. }
            | B24Error::Refused { status, .. }
            | B24Error::Moved { status, .. }
            | B24Error::Decode { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// `finish` or `show`/`hide` of a call the portal no longer has active (already finished).
    pub fn is_call_not_found(&self) -> bool {
        matches!(self, B24Error::Api { description, .. } if description.starts_with("Call is not found"))
    }

    /// Why our credentials were refused, if they were.
    pub fn refusal(&self) -> Option<AuthRefusal> {
        match self {
            B24Error::Refused { code, .. } => AuthRefusal::from_code(code),
            B24Error::GrantExpired { .. } => Some(AuthRefusal::InvalidGrant),
            _ => None,
        }
    }

    /// The portal's leaky bucket overflowed (`503 QUERY_LIMIT_EXCEEDED`).
    pub fn is_query_limit(&self) -> bool {
        self.code() == Some("QUERY_LIMIT_EXCEEDED")
    }

    /// Whether sending the same request again later may succeed: no answer, a rate limit, a
    /// server error. Everything else needs a change (of the request or of the credentials).
    pub fn is_retriable(&self) -> bool {
        match self {
            B24Error::Transport { .. } => true,
            B24Error::Api { status, code, .. } => {
                *status >= 500 && code != "OVERLOAD_LIMIT" && code != "PORTAL_DELETED"
                    || *status == 429
                    || matches!(
                        code.as_str(),
                        "QUERY_LIMIT_EXCEEDED" | "OPERATION_TIME_LIMIT"
                    )
            }
            B24Error::Decode { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// What the operator should do about it, when that is not obvious from the message.
    pub fn operator_hint(&self) -> Option<&'static str> {
        match self {
            B24Error::NotConfigured => Some(
                "set bitrix24.webhook_url (an inbound webhook with the scopes telephony, crm and \
                 user), or bitrix24.portal, client_id and client_secret for a local application",
            ),
            B24Error::NotAuthorized | B24Error::GrantExpired { .. } => Some(
                "run `pbxgate bitrix24 auth` (with the service stopped) and follow what it says",
            ),
            B24Error::Moved { .. } => Some(
                "the portal's address changed: update bitrix24.webhook_url (or bitrix24.portal)",
            ),
            B24Error::Store { .. } => {
                Some("check that storage.path is writable and the disk is not full")
            }
            B24Error::Refused { code, by, .. } => {
                let webhook = *by == Credentials::Webhook;
                Some(match AuthRefusal::from_code(code)? {
                    AuthRefusal::NoAuthFound if webhook => {
                        "check bitrix24.webhook_url: the inbound webhook was deleted or its \
                         secret changed; copy the URL again from the portal (Developer resources \
                         → Other → Inbound webhook)"
                    }
                    AuthRefusal::NoAuthFound
                    | AuthRefusal::ExpiredToken
                    | AuthRefusal::InvalidToken
                    | AuthRefusal::InvalidGrant => {
                        "the application's authorisation is gone (reinstalled or removed?): run \
                         `pbxgate bitrix24 auth` again"
                    }
                    AuthRefusal::InsufficientScope if webhook => {
                        "edit the inbound webhook in the portal: tick the scopes telephony, crm \
                         and user"
                    }
                    AuthRefusal::InsufficientScope => {
                        "give the local application the scopes telephony, crm and user, then run \
                         `pbxgate bitrix24 auth` again"
                    }
                    AuthRefusal::WrongAuthType => {
                        "the portal wants application auth for this method: create a local \
                         application (bitrix24.portal, client_id, client_secret, an empty \
                         webhook_url) and run `pbxgate bitrix24 auth`"
                    }
                    AuthRefusal::AccessDenied => {
                        "the portal denies the user of the webhook or application: REST may be \
                         off on this plan, or the user lacks rights (use an administrator)"
                    }
                    AuthRefusal::MethodConfirmWaiting => {
                        "a portal administrator must confirm the application's access to the \
                         method"
                    }
                    AuthRefusal::InvalidClient => {
                        "check bitrix24.client_id and bitrix24.client_secret (the local \
                         application's keys) and bitrix24.oauth_server"
                    }
                    AuthRefusal::PaymentRequired => "the application's subscription is unpaid",
                })
            }
            B24Error::Api { code, .. } => match code.as_str() {
                "QUERY_LIMIT_EXCEEDED" => Some(
                    "the portal's request limit is shared with other applications: lower \
                     bitrix24.rps and bitrix24.burst",
                ),
                "OPERATION_TIME_LIMIT" => Some(
                    "a method used up its time budget on the portal; it resets within 10 minutes",
                ),
                "OVERLOAD_LIMIT" => Some("Bitrix24 support blocked the portal's REST access"),
                "PORTAL_DELETED" => Some("the portal no longer exists: check its address"),
                "ERROR_METHOD_NOT_FOUND" => {
                    Some("the portal does not know the method: is telephony available on its plan?")
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// How the CRM port sees it.
    pub fn failure(&self) -> CrmFailure {
        let kind = match self {
            B24Error::NotConfigured => FailureKind::NotConfigured,
            B24Error::NotAuthorized
            | B24Error::Refused { .. }
            | B24Error::GrantExpired { .. }
            | B24Error::Moved { .. } => FailureKind::Blocked,
            B24Error::Transport { .. } | B24Error::Decode { .. } | B24Error::Store { .. } => {
                FailureKind::Transient
            }
            B24Error::TooManyCommands { .. } | B24Error::BadRequest { .. } => FailureKind::Refused,
            B24Error::Api { status, code, .. } => match (code.as_str(), *status) {
                ("QUERY_LIMIT_EXCEEDED" | "OPERATION_TIME_LIMIT" | "expired_token", _) => {
                    FailureKind::Transient
                }
                (
                    "invalid_token"
                    | "NO_AUTH_FOUND"
                    | "insufficient_scope"
                    | "WRONG_AUTH_TYPE"
                    | "ACCESS_DENIED"
                    | "INVALID_CREDENTIALS"
                    | "user_access_error"
                    | "method_confirm_waiting"
                    | "invalid_grant"
                    | "invalid_client"
                    | "PAYMENT_REQUIRED"
                    | "PORTAL_DELETED"
                    | "OVERLOAD_LIMIT"
                    | "ERROR_METHOD_NOT_FOUND",
                    _,
                ) => FailureKind::Blocked,
                (_, 401 | 403) => FailureKind::Blocked,
                (_, s) if s >= 500 || s == 429 => FailureKind::Transient,
                _ => FailureKind::Refused,
            },
        };
        let message = match self.operator_hint() {
            // The invalid_grant message says what to do already.
            Some(hint)
                if !matches!(
                    self,
                    B24Error::GrantExpired { .. } | B24Error::NotAuthorized
                ) =>
            {
                format!("{self}; {hint}")
            }
            _ => self.to_string(),
        };
        CrmFailure { kind, message }
    }
}

/// The error in an answer's body (`{"error": ..., "error_description": ...}`), if it has one:
/// `(code, description)`, both on one line and bounded.
pub fn body_error(body: &Value) -> Option<(String, String)> {
    let obj = body.as_object()?;
    let code = match obj.get("error")? {
        Value::String(s) => s.clone(),
        Value::Null => return None,
        other => other.to_string(),
    };
    let description = match obj.get("error_description") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    Some((
        one_line(&code, 100),
        one_line(&description, DESCRIPTION_MAX),
    ))
}

/// Turns an error answer from the portal into a typed error: a refusal of the credentials
/// (`by` names them), or [`B24Error::Api`].
pub fn classify(status: u16, code: String, description: String, by: Credentials) -> B24Error {
    match AuthRefusal::from_code(&code) {
        Some(AuthRefusal::InvalidGrant) => B24Error::GrantExpired { description },
        Some(_) => B24Error::Refused {
            status,
            code,
            description,
            by,
        },
        None => B24Error::Api {
            status,
            code,
            description,
        },
    }
}

impl fmt::Display for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Credentials::Webhook => "webhook",
            Credentials::Token => "OAuth token",
            Credentials::Application => "OAuth application",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refusals_name_the_code_and_say_what_to_do() {
        let e = classify(
            401,
            "NO_AUTH_FOUND".into(),
            "Wrong authorization data".into(),
            Credentials::Webhook,
        );
        assert_eq!(
            e.to_string(),
            "Bitrix24 refused the webhook (NO_AUTH_FOUND): Wrong authorization data"
        );
        assert_eq!(e.refusal(), Some(AuthRefusal::NoAuthFound));
        assert!(e.operator_hint().unwrap().contains("bitrix24.webhook_url"));
        assert_eq!(e.failure().kind, FailureKind::Blocked);
        assert!(e.failure().message.contains("Inbound webhook"));

        let e = classify(
            403,
            "WRONG_AUTH_TYPE".into(),
            String::new(),
            Credentials::Webhook,
        );
        assert_eq!(
            e.to_string(),
            "Bitrix24 refused the webhook (WRONG_AUTH_TYPE)"
        );
        assert!(e.operator_hint().unwrap().contains("local application"));

        let e = classify(
            400,
            "invalid_grant".into(),
            String::new(),
            Credentials::Application,
        );
        assert!(matches!(e, B24Error::GrantExpired { .. }));
        assert!(
            e.to_string().contains("run `pbxgate bitrix24 auth` again"),
            "{e}"
        );
        assert_eq!(e.code(), Some("invalid_grant"));
        assert!(!e.is_retriable());

        for code in ["insufficient_scope", "invalid_token", "expired_token"] {
            let e = classify(401, code.into(), String::new(), Credentials::Token);
            assert!(matches!(e, B24Error::Refused { .. }), "{code}");
            assert!(e.operator_hint().is_some());
            assert_eq!(e.code(), Some(code));
        }
    }

    #[test]
    fn validation_errors_keep_their_empty_code_and_description() {
        let (code, description) = body_error(&json!({
            "error": "",
            "error_description": "Call is not found (call should be registered prior to finishing"
        }))
        .unwrap();
        let e = classify(400, code, description, Credentials::Webhook);
        assert!(e.is_call_not_found());
        assert_eq!(e.code(), Some(""));
        assert!(!e.is_retriable());
        assert_eq!(e.failure().kind, FailureKind::Refused);
        assert!(e
            .to_string()
            .starts_with("Bitrix24 error (HTTP 400) \"\": Call is not found"));
        assert_eq!(body_error(&json!({"result": 1})), None);
        assert_eq!(body_error(&json!({"error": null, "result": 1})), None);
    }

    #[test]
    fn transient_answers_are_retriable() {
        let api = |status, code: &str| B24Error::Api {
            status,
            code: code.into(),
            description: String::new(),
        };
        assert!(api(503, "QUERY_LIMIT_EXCEEDED").is_retriable());
        assert!(api(503, "QUERY_LIMIT_EXCEEDED").is_query_limit());
        assert!(api(429, "OPERATION_TIME_LIMIT").is_retriable());
        assert!(api(500, "INTERNAL_SERVER_ERROR").is_retriable());
        assert!(!api(503, "OVERLOAD_LIMIT").is_retriable());
        assert!(!api(500, "PORTAL_DELETED").is_retriable());
        assert!(!api(404, "ERROR_METHOD_NOT_FOUND").is_retriable());
        assert!(!api(400, "").is_retriable());
        assert!(B24Error::Transport {
            message: String::new(),
            timeout: true
        }
        .is_retriable());
        assert!(!B24Error::TooManyCommands { got: 51, max: 50 }.is_retriable());
    }
}
