//! Bitrix24 REST client. (Interface; the implementation follows.)

use std::collections::BTreeMap;

use serde_json::Value;

use super::error::B24Error;
use crate::config::Config;
use crate::store::crm_state::CrmState;

/// A list method's page: `result`, `total`, and `next` (the `start` of the next page) when
/// there are more.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub result: Value,
    pub total: Option<u64>,
    pub next: Option<u64>,
}

/// What a `batch` came to: each command's `result` or error, by the command's key.
#[derive(Debug, Clone, Default)]
pub struct BatchResult {
    pub results: BTreeMap<String, Value>,
    pub errors: BTreeMap<String, B24Error>,
}

/// Cheap to clone; clones share the leaky bucket and the tokens.
#[derive(Clone)]
pub struct B24Client {
    _inner: std::sync::Arc<()>,
}

impl B24Client {
    /// A client for `config.bitrix24` (timeouts and retries from `config.crm`). `state` keeps
    /// the OAuth tokens; without it OAuth cannot be used.
    pub fn new(_config: &Config, _state: Option<CrmState>) -> Result<B24Client, B24Error> {
        Ok(B24Client {
            _inner: std::sync::Arc::new(()),
        })
    }

    pub fn is_configured(&self) -> bool {
        false
    }

    /// The portal's origin, never with a secret.
    pub fn portal(&self) -> &str {
        ""
    }

    /// Calls `method` with `params` (a JSON object) and returns its `result`.
    pub async fn call(&self, _method: &str, _params: Value) -> Result<Value, B24Error> {
        Err(B24Error::NotConfigured)
    }

    /// A list method's page.
    pub async fn call_page(&self, _method: &str, _params: Value) -> Result<Page, B24Error> {
        Err(B24Error::NotConfigured)
    }

    /// Up to 50 commands `(key, method, params)` in one request (one for the leaky bucket).
    pub async fn batch(
        &self,
        _cmds: &[(String, String, Value)],
        _halt: bool,
    ) -> Result<BatchResult, B24Error> {
        Err(B24Error::NotConfigured)
    }

    /// Passes `method` with `params` through and returns the portal's answer as it came
    /// (status and body).
    pub async fn raw(&self, _method: &str, _params: Value) -> Result<(u16, Vec<u8>), B24Error> {
        Err(B24Error::NotConfigured)
    }

    pub fn successes(&self) -> tokio::sync::watch::Receiver<u64> {
        tokio::sync::watch::Sender::new(0).subscribe()
    }

    pub fn requests(&self) -> Option<&crate::base::latency::CrmRequests> {
        None
    }
}
