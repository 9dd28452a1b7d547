//! Kommo API v4 client. (Interface; the implementation follows.)

use serde_json::Value;

use super::error::KommoError;
use crate::config::Config;
use crate::store::crm_state::CrmState;

/// Cheap to clone; clones share the rate limit and the tokens.
#[derive(Clone)]
pub struct KommoClient {
    base: String,
}

impl KommoClient {
    /// A client for `config.kommo` (timeouts and retries from `config.crm`). `state` keeps the
    /// OAuth tokens; without it OAuth cannot be used.
    pub fn new(config: &Config, _state: Option<CrmState>) -> Result<KommoClient, KommoError> {
        Ok(KommoClient {
            base: config.kommo.origin(),
        })
    }

    pub fn is_configured(&self) -> bool {
        false
    }

    /// The account's origin.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET {base}{path}?{query}`: the JSON answer, `None` for 204 (nothing found).
    pub async fn get(
        &self,
        _path: &str,
        _query: &[(&str, String)],
    ) -> Result<Option<Value>, KommoError> {
        Err(KommoError::NotConfigured)
    }

    /// `POST {base}{path}` with a JSON body: the JSON answer (`{}` for 202, `null` for 204).
    pub async fn post(&self, _path: &str, _body: &Value) -> Result<Value, KommoError> {
        Err(KommoError::NotConfigured)
    }

    /// `PATCH {base}{path}` with a JSON body.
    pub async fn patch(&self, _path: &str, _body: &Value) -> Result<Value, KommoError> {
        Err(KommoError::NotConfigured)
    }

    pub fn successes(&self) -> tokio::sync::watch::Receiver<u64> {
        tokio::sync::watch::Sender::new(0).subscribe()
    }

    pub fn requests(&self) -> Option<&crate::base::latency::CrmRequests> {
        None
    }

    /// Why sending is stopped until an operator acts (the account blocked or unpaid), if it is.
    pub fn alarm(&self) -> Option<String> {
        None
    }
}
