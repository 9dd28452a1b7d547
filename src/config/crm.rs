//! `[crm]`: which CRM (`kind`), the retailCRM account, the module registered in it, and the
//! client's timeouts, rate limits and retries, and the follow-up tasks of missed calls.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use validator::Validate;

use super::checks::{
    backoff, client_id, http_url, module_code, problem, request_timeout, timezone,
};
use crate::base::secret::Secret;

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct CrmConfig {
    /// Which CRM pbxgate talks to: `retailcrm` (the default), `bitrix24` (`[bitrix24]`) or
    /// `kommo` (`[kommo]`).
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
    /// An inbound call nobody answered becomes a follow-up task in the CRM (once per call).
    pub missed_call_tasks: bool,
    /// The CRM user the tasks are for; 0: the call's manager (its user, or the user of its
    /// extension in `[[users]]`).
    #[validate(range(min = 0, message = "must be 0 (the call's manager) or a CRM user id"))]
    pub missed_call_task_performer: i64,
    /// The task's text; `{phone}` is the customer's number.
    #[validate(custom(function = "task_text"))]
    pub missed_call_task_text: String,
    /// How long after the call ended the task is due.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "task_due"))]
    pub missed_call_task_due: Duration,
}

fn task_text(value: &str) -> Result<(), validator::ValidationError> {
    if value.trim().is_empty() || value.chars().count() > 1000 {
        return Err(problem("must be 1 to 1000 characters, not only spaces"));
    }
    Ok(())
}

fn task_due(value: &Duration) -> Result<(), validator::ValidationError> {
    if *value > Duration::from_secs(30 * 24 * 3600) {
        return Err(problem("must be at most 30 days (720h)"));
    }
    Ok(())
}

/// The CRM adapters pbxgate has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CrmKind {
    /// retailCRM API v5 (telephony integration module).
    #[default]
    #[serde(rename = "retailcrm")]
    RetailCrm,
    /// Bitrix24 external telephony REST (`[bitrix24]`).
    #[serde(rename = "bitrix24")]
    Bitrix24,
    /// Kommo (amoCRM) API v4 (`[kommo]`).
    #[serde(rename = "kommo")]
    Kommo,
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
            missed_call_tasks: false,
            missed_call_task_performer: 0,
            missed_call_task_text: "Missed call from {phone}".into(),
            missed_call_task_due: Duration::from_secs(3600),
        }
    }
}
