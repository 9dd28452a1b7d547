//! Typed errors of the Kommo client, classified for the CRM port. (Interface; completed with
//! the client.)

use crate::crm::port::{CrmFailure, FailureKind};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KommoError {
    #[error("Kommo is not configured: set kommo.long_lived_token (or client_id, client_secret, redirect_uri)")]
    NotConfigured,
    #[error("Kommo OAuth has no tokens yet: run `pbxgate kommo auth --code ...`")]
    NotAuthorized,
    #[error("Kommo unreachable{}: {message}", if *.timeout { " (timeout)" } else { "" })]
    Transport { message: String, timeout: bool },
    /// `/api/v4/calls` found no contact or company with the number (400 "Entity not found").
    #[error("Kommo has no contact with this number")]
    EntityNotFound,
    /// Any other error answer.
    #[error("Kommo error (HTTP {status}): {detail}")]
    Api { status: u16, detail: String },
}

impl KommoError {
    pub fn is_entity_not_found(&self) -> bool {
        matches!(self, KommoError::EntityNotFound)
    }

    pub fn failure(&self) -> CrmFailure {
        let kind = match self {
            KommoError::NotConfigured => FailureKind::NotConfigured,
            KommoError::NotAuthorized => FailureKind::Blocked,
            KommoError::Transport { .. } => FailureKind::Transient,
            KommoError::EntityNotFound => FailureKind::Refused,
            KommoError::Api { status, .. } => match status {
                401..=403 => FailureKind::Blocked,
                429 => FailureKind::Transient,
                s if *s >= 500 => FailureKind::Transient,
                _ => FailureKind::Refused,
            },
        };
        CrmFailure {
            kind,
            message: self.to_string(),
        }
    }
}
