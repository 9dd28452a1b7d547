//! Typed errors of the Bitrix24 client, classified for the CRM port.

use crate::crm::port::{CrmFailure, FailureKind};

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
    /// Any error answer: the HTTP status, Bitrix24's `error` (may be empty for telephony
    /// validation errors) and `error_description`.
    #[error("Bitrix24 error (HTTP {status}) {code}: {description}")]
    Api {
        status: u16,
        code: String,
        description: String,
    },
    /// The answer was not the JSON envelope.
    #[error("Bitrix24 answer not understood (HTTP {status}): {reason}")]
    Decode { status: u16, reason: String },
}

impl B24Error {
    /// Bitrix24's error code (`QUERY_LIMIT_EXCEEDED`, `expired_token`, `""`), if it answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            B24Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// `finish` or `show`/`hide` of a call the portal no longer has active (already finished).
    pub fn is_call_not_found(&self) -> bool {
        matches!(self, B24Error::Api { description, .. } if description.starts_with("Call is not found"))
    }

    /// How the CRM port sees it.
    pub fn failure(&self) -> CrmFailure {
        let kind = match self {
            B24Error::NotConfigured => FailureKind::NotConfigured,
            B24Error::NotAuthorized => FailureKind::Blocked,
            B24Error::Transport { .. } | B24Error::Decode { .. } => FailureKind::Transient,
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
        CrmFailure {
            kind,
            message: self.to_string(),
        }
    }
}
