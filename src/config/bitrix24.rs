//! `[bitrix24]`: the Bitrix24 portal (`crm.kind = "bitrix24"`): how pbxgate authenticates (an
//! inbound webhook, or OAuth as a local application), how events posted to it are verified,
//! when call cards pop up, and the portal's request limits.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use validator::{Validate, ValidationError};

use super::checks::{http_url, problem};
use crate::base::secret::Secret;

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct Bitrix24Config {
    /// An inbound webhook (`https://<portal>/rest/<user id>/<secret>/`, scopes `telephony`,
    /// `crm`, `user`). Empty: OAuth (`portal`, `client_id`, `client_secret`), or nothing is sent.
    #[validate(custom(function = "webhook_url"))]
    pub webhook_url: Secret,
    /// Verifies the events Bitrix24 posts to `{http.public_url}/bitrix24/events`
    /// (`auth[application_token]`). Empty: every event is refused.
    pub application_token: Secret,
    /// When a manager's call card pops up: `ringing` (as soon as their phone rings), `answered`
    /// (once they pick up), `none` (never; the call is still registered and finished).
    pub show_card: ShowCard,
    /// Unknown numbers become a lead (`CRM_CREATE`).
    pub crm_create: bool,
    /// OAuth: the portal's address (`https://acme.bitrix24.ru`).
    #[validate(custom(function = "optional_url"))]
    pub portal: String,
    /// OAuth: the local application's `client_id` and `client_secret`.
    pub client_id: String,
    pub client_secret: Secret,
    /// OAuth: the authorisation server (`https://oauth.bitrix.info` for .com portals,
    /// `https://oauth.bitrix24.tech` for .ru ones); replaced by what the server reports.
    #[validate(custom(function = "http_url"))]
    pub oauth_server: String,
    /// The Bitrix24 user that calls with no known manager belong to (an IVR-only call, an
    /// extension without a user); 0: the webhook's own user (the id in `webhook_url`).
    #[validate(range(min = 0, message = "must be 0 or a Bitrix24 user id"))]
    pub default_user_id: i64,
    /// The portal's leaky bucket: requests per second it drains (2 on most plans, 5 on
    /// Enterprise) and how many it holds (50, or 250 on Enterprise). pbxgate stays under it.
    #[validate(range(min = 1, max = 100, message = "must be between 1 and 100"))]
    pub rps: u32,
    #[validate(range(min = 1, max = 1000, message = "must be between 1 and 1000"))]
    pub burst: u32,
    /// How often the user directory (`user.get`: `UF_PHONE_INNER` = the extension) is reloaded.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "users_refresh"))]
    pub users_refresh: Duration,
    /// Recordings are attached as our signed link (`url`: the portal downloads it, so
    /// `http.public_url` must be reachable from Bitrix24) or sent as the file itself (`file`,
    /// base64, up to `record_max_bytes`; larger files are sent as the link).
    pub record_upload: RecordUpload,
    #[validate(range(
        min = 1024,
        max = 104857600,
        message = "must be between 1 KiB and 100 MiB"
    ))]
    pub record_max_bytes: u64,
}

impl Default for Bitrix24Config {
    fn default() -> Self {
        Bitrix24Config {
            webhook_url: Secret::default(),
            application_token: Secret::default(),
            show_card: ShowCard::Ringing,
            crm_create: true,
            portal: String::new(),
            client_id: String::new(),
            client_secret: Secret::default(),
            oauth_server: "https://oauth.bitrix.info".into(),
            default_user_id: 0,
            rps: 2,
            burst: 50,
            users_refresh: Duration::from_secs(600),
            record_upload: RecordUpload::Url,
            record_max_bytes: 20 * 1024 * 1024,
        }
    }
}

impl Bitrix24Config {
    /// OAuth is configured (a portal and an application).
    pub fn uses_oauth(&self) -> bool {
        self.webhook_url.is_empty()
            && !self.portal.is_empty()
            && !self.client_id.is_empty()
            && !self.client_secret.is_empty()
    }

    /// Credentials of either kind are configured.
    pub fn is_configured(&self) -> bool {
        !self.webhook_url.is_empty() || self.uses_oauth()
    }

    /// The user id in `webhook_url` (`/rest/<id>/<secret>/`).
    pub fn webhook_user(&self) -> Option<i64> {
        webhook_parts(self.webhook_url.expose()).map(|p| p.1)
    }

    /// The portal's origin (`https://acme.bitrix24.ru`), never with a secret.
    pub fn portal_origin(&self) -> String {
        if let Some((origin, _, _)) = webhook_parts(self.webhook_url.expose()) {
            return origin;
        }
        self.portal.trim_end_matches('/').to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShowCard {
    Ringing,
    Answered,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordUpload {
    Url,
    File,
}

/// `(origin, user id, path prefix up to and with the secret + '/')` of an inbound webhook URL.
pub fn webhook_parts(value: &str) -> Option<(String, i64, String)> {
    let url = url::Url::parse(value).ok()?;
    let segments: Vec<&str> = url.path_segments()?.filter(|s| !s.is_empty()).collect();
    let [prefix @ .., "rest", user, secret] = segments.as_slice() else {
        return None;
    };
    let user: i64 = user.parse().ok().filter(|u| *u > 0)?;
    if secret.is_empty() || !secret.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    let origin = url.origin().ascii_serialization();
    let mut path = String::from("/");
    for p in prefix {
        path.push_str(p);
        path.push('/');
    }
    path.push_str(&format!("rest/{user}/{secret}/"));
    Some((origin, user, path))
}

fn webhook_url(value: &Secret) -> Result<(), ValidationError> {
    let raw = value.expose();
    if raw.is_empty() {
        return Ok(());
    }
    // Never echo the value: it carries the webhook's secret.
    let url = url::Url::parse(raw).map_err(|_| problem("is not an absolute URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(problem("must start with https://"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(problem("must not have a query or a fragment"));
    }
    if webhook_parts(raw).is_none() {
        return Err(problem(
            "must look like https://<portal>/rest/<user id>/<secret>/ (as Bitrix24 shows it)",
        ));
    }
    Ok(())
}

fn optional_url(value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Ok(());
    }
    http_url(value)
}

fn users_refresh(value: &Duration) -> Result<(), ValidationError> {
    if *value < Duration::from_secs(10) || *value > Duration::from_secs(7 * 24 * 3600) {
        return Err(problem("must be between 10s and 7 days"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn a_webhook_url_is_split_into_its_parts() {
        let (origin, user, path) =
            webhook_parts("https://acme.bitrix24.ru/rest/1/abcdef0123456789/").unwrap();
        assert_eq!(
            (origin.as_str(), user, path.as_str()),
            ("https://acme.bitrix24.ru", 1, "/rest/1/abcdef0123456789/")
        );
        assert!(webhook_parts("https://acme.bitrix24.ru/rest/abc/x/").is_none());
        assert!(webhook_parts("https://acme.bitrix24.ru/rest/1/").is_none());
    }

    #[test]
    fn a_wrong_webhook_url_is_named_without_its_secret() {
        let e = Config::from_toml_and_env(
            "[bitrix24]\nwebhook_url = \"https://acme.bitrix24.ru/api/secretvalue42\"\n",
            Vec::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bitrix24.webhook_url: must look like"), "{e}");
        assert!(!e.contains("secretvalue42"), "{e}");
    }

    #[test]
    fn the_issue_example_loads() {
        let c = Config::from_toml_and_env(
            r#"
[crm]
kind = "bitrix24"
[bitrix24]
webhook_url = "https://acme.bitrix24.ru/rest/1/abcdef0123456789/"
application_token = ""
show_card = "ringing"
crm_create = true
"#,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(c.crm.kind, crate::config::CrmKind::Bitrix24);
        assert_eq!(c.bitrix24.webhook_user(), Some(1));
        assert_eq!(c.bitrix24.show_card, ShowCard::Ringing);
        assert!(!format!("{c:?}").contains("abcdef0123456789"));
    }
}
