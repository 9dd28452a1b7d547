//! `[crm]`: which CRM (`kind`), the retailCRM account, the module registered in it, and the
//! client's timeouts, rate limits and retries.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use validator::Validate;

use super::checks::{backoff, client_id, http_url, module_code, request_timeout, timezone};
use crate::base::secret::Secret;

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct CrmConfig {
    /// Which CRM pbxgate talks to: `retailcrm` (the default, and the only one for now).
    pub kind: CrmKind,
    #[validate(custom(function = "http_url"))]
    pub url: String,
    /// Empty: the CRM is not contacted (the service still runs, records and queues).
    pub api_key: Secret,
    #[validate(custom(function = "module_code"))]
    pub module_code: String,
    #[validate(length(min = 1, max = 255, message = "must be 1 to 255 characters"))]
    pub module_name: String,
    /// Empty: generated once and kept in the store.
    #[validate(custom(function = "client_id"))]
    pub client_id: Secret,
    pub site: String,
    pub register_on_start: bool,
    /// The account's time zone for call dates (e.g. `Europe/Moscow`); empty = ask the CRM.
    #[validate(custom(function = "timezone"))]
    pub timezone: String,
    /// `false`: the module's settings can be changed only through the API.
    pub allow_edit: bool,
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub timeout: Duration,
    /// Requests per second per API key, general routes.
    #[validate(range(min = 1, max = 1000, message = "must be between 1 and 1000"))]
    pub rps: u32,
    /// Requests per second per API key, `/api/v5/telephony/*`.
    #[validate(range(min = 1, max = 1000, message = "must be between 1 and 1000"))]
    pub telephony_rps: u32,
    /// Retries after the first attempt for 503/429/5xx/timeouts.
    #[validate(range(max = 20, message = "must be at most 20"))]
    pub max_retries: u32,
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub retry_base: Duration,
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub retry_max: Duration,
}

/// The CRM adapters pbxgate has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CrmKind {
    /// retailCRM API v5 (telephony integration module).
    #[default]
    #[serde(rename = "retailcrm")]
    RetailCrm,
}

impl Default for CrmConfig {
    fn default() -> Self {
        CrmConfig {
            kind: CrmKind::RetailCrm,
            url: "https://example.retailcrm.ru".into(),
            api_key: Secret::default(),
            module_code: "pbxgate".into(),
            module_name: "pbxgate".into(),
            client_id: Secret::default(),
            site: String::new(),
            register_on_start: true,
            timezone: String::new(),
            allow_edit: false,
            timeout: Duration::from_secs(10),
            rps: 10,
            telephony_rps: 40,
            max_retries: 4,
            retry_base: Duration::from_millis(250),
            retry_max: Duration::from_secs(10),
        }
    }
}
