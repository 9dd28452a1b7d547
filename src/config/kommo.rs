//! `[kommo]`: the Kommo (amoCRM) account (`crm.kind = "kommo"`): its address, how pbxgate
//! authenticates (a private integration's long-lived token, or OAuth), what happens to callers
//! no contact has, the missed-call tasks, and the request limit.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use validator::{Validate, ValidationError};

use super::checks::{http_url, problem};
use crate::base::secret::Secret;

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct KommoConfig {
    /// The account's address (`https://acme.kommo.com`, `https://acme.amocrm.ru`).
    #[validate(custom(function = "http_url"))]
    pub base_url: String,
    /// A private integration's long-lived token (Bearer). Empty: OAuth (`client_id`,
    /// `client_secret`, `redirect_uri`), or nothing is sent.
    pub long_lived_token: Secret,
    /// The integration's id and secret. The secret also verifies the widget's `X-Auth-Token`
    /// (HS256), so it is needed with a long-lived token too for click-to-call.
    pub client_id: String,
    pub client_secret: Secret,
    /// OAuth: the integration's redirect URI, as registered in Kommo.
    #[validate(custom(function = "optional_url"))]
    pub redirect_uri: String,
    /// A caller no contact has: `unsorted` (an incoming lead in `leads/unsorted/sip`, inbound
    /// calls; outbound ones get a contact), `contact` (a contact is created first), or `skip`
    /// (not sent; a log line says so).
    pub unknown_caller: UnknownCaller,
    /// An inbound call nobody answered becomes a follow-up task for the responsible user.
    pub missed_call_tasks: bool,
    /// The task's text; `{phone}` is the customer's number.
    #[validate(length(min = 1, max = 1000, message = "must be 1 to 1000 characters"))]
    pub missed_call_task_text: String,
    /// How long after the call the task is due.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "task_due"))]
    pub missed_call_task_due: Duration,
    /// The name calls carry as their `source` (shown in the feed).
    #[validate(length(min = 1, max = 64, message = "must be 1 to 64 characters"))]
    pub source: String,
    /// Requests per second (Kommo allows 7).
    #[validate(range(min = 1, max = 50, message = "must be between 1 and 50"))]
    pub rps: u32,
    /// The Kommo user calls with no known manager belong to (`responsible_user_id`); 0: none
    /// (Kommo picks the token's user).
    #[validate(range(min = 0, message = "must be 0 or a Kommo user id"))]
    pub default_user_id: i64,
    /// The account id the widget's tokens must carry (`account_id`); 0: not checked (the
    /// token's issuer must still be `base_url`).
    #[validate(range(min = 0, message = "must be 0 or the Kommo account id"))]
    pub account_id: i64,
}

impl Default for KommoConfig {
    fn default() -> Self {
        KommoConfig {
            base_url: "https://example.kommo.com".into(),
            long_lived_token: Secret::default(),
            client_id: String::new(),
            client_secret: Secret::default(),
            redirect_uri: String::new(),
            unknown_caller: UnknownCaller::Unsorted,
            missed_call_tasks: true,
            missed_call_task_text: "Missed call from {phone}".into(),
            missed_call_task_due: Duration::from_secs(3600),
            source: "pbxgate".into(),
            rps: 7,
            default_user_id: 0,
            account_id: 0,
        }
    }
}

impl KommoConfig {
    /// OAuth is configured (and no long-lived token).
    pub fn uses_oauth(&self) -> bool {
        self.long_lived_token.is_empty()
            && !self.client_id.is_empty()
            && !self.client_secret.is_empty()
            && !self.redirect_uri.is_empty()
    }

    /// Credentials of either kind are configured.
    pub fn is_configured(&self) -> bool {
        !self.long_lived_token.is_empty() || self.uses_oauth()
    }

    /// The account's origin (`https://acme.kommo.com`).
    pub fn origin(&self) -> String {
        url::Url::parse(&self.base_url)
            .map(|u| u.origin().ascii_serialization())
            .unwrap_or_else(|_| self.base_url.trim_end_matches('/').to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownCaller {
    Unsorted,
    Contact,
    Skip,
}

fn optional_url(value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Ok(());
    }
    http_url(value)
}

fn task_due(value: &Duration) -> Result<(), ValidationError> {
    if *value > Duration::from_secs(30 * 24 * 3600) {
        return Err(problem("must be at most 30 days (720h)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, CrmKind, UnknownCaller};

    #[test]
    fn the_issue_example_loads() {
        let c = Config::from_toml_and_env(
            r#"
[crm]
kind = "kommo"
[kommo]
base_url = "https://acme.kommo.com"
long_lived_token = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.topsecretvalue"
unknown_caller = "unsorted"
missed_call_tasks = true
[[users]]
user_id = 8320148
code = "101"
"#,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(c.crm.kind, CrmKind::Kommo);
        assert_eq!(c.kommo.unknown_caller, UnknownCaller::Unsorted);
        assert_eq!(c.kommo.origin(), "https://acme.kommo.com");
        assert!(c.kommo.is_configured() && !c.kommo.uses_oauth());
        assert!(!format!("{c:?}").contains("topsecretvalue"));
    }

    #[test]
    fn a_wrong_unknown_caller_is_named() {
        let e = Config::from_toml_and_env("[kommo]\nunknown_caller = \"lead\"\n", Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown_caller"), "{e}");
    }
}
