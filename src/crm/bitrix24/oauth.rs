//! OAuth tokens of a Bitrix24 local application: the first grant (`pbxgate bitrix24 auth`
//! exchanges the code the portal hands out), their place in the store, and their refresh.
//!
//! Bitrix24's refresh tokens rotate and work once: a refresh that loses its answer, or two
//! refreshes at once, kill the grant. So exactly one refresh runs at a time (a caller that
//! waited for it re-reads the stored pair instead of refreshing again), and a new pair is
//! written and flushed to the store before anything uses it (a pair the store refused waits in
//! memory and is written first thing next time). Tokens are refreshed when less than
//! [`REFRESH_AHEAD`] is left, or after the portal said `expired_token`/`invalid_token`.
//!
//! `client_secret` and the refresh token go to the OAuth server only, never to the portal; the
//! access token goes to the portal's `client_endpoint` only. None of them is ever logged.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::client::{read_capped, transport, USER_AGENT};
use super::error::{body_error, classify, B24Error, Credentials};
use crate::base::latency::CrmRequests;
use crate::base::secret::Secret;
use crate::config::Config;
use crate::store::crm_state::CrmState;

/// Where the tokens live in the CRM adapter's state tree.
pub const TOKENS_KEY: &str = "bitrix24:oauth";

/// Tokens are refreshed ahead when less than this is left of the access token.
pub const REFRESH_AHEAD: Duration = Duration::from_secs(300);

/// The longest token we accept (Bitrix24's are 70 characters or so).
const TOKEN_MAX: usize = 1024;

/// A stored grant: the access and refresh tokens, when the access token expires, where to send
/// requests, and whose grant it is. `Debug` never shows the tokens.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    #[serde(default = "version_1")]
    pub v: u32,
    pub(crate) access_token: String,
    pub(crate) refresh_token: String,
    /// Unix seconds when the access token expires.
    pub expires: i64,
    /// The portal's REST base for this application (`https://acme.bitrix24.ru/rest/`); empty:
    /// `{portal}/rest/`.
    #[serde(default)]
    pub client_endpoint: String,
    /// The OAuth server's REST base (`https://oauth.bitrix.info/rest/`); its origin is where
    /// the next refresh goes. Empty: `bitrix24.oauth_server`.
    #[serde(default)]
    pub server_endpoint: String,
    /// The portal's id (stable when its domain changes).
    #[serde(default)]
    pub member_id: String,
    /// The portal user who authorised the application.
    #[serde(default)]
    pub user_id: Option<i64>,
}

fn version_1() -> u32 {
    1
}

impl std::fmt::Debug for TokenInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenInfo")
            .field("access_token", &"***")
            .field("refresh_token", &"***")
            .field("expires", &self.expires)
            .field("client_endpoint", &self.client_endpoint)
            .field("server_endpoint", &self.server_endpoint)
            .field("member_id", &self.member_id)
            .field("user_id", &self.user_id)
            .finish()
    }
}

impl TokenInfo {
    /// Seconds the access token has left at `now` (unix seconds; negative: expired).
    pub fn seconds_left(&self, now: i64) -> i64 {
        self.expires - now
    }

    /// When the access token expires, as an RFC 3339 timestamp (UTC).
    pub fn expires_at(&self) -> String {
        jiff::Timestamp::from_second(self.expires)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| self.expires.to_string())
    }

    /// The OAuth server's answer to a grant, checked. `now`: unix seconds.
    fn from_answer(answer: &Value, now: i64) -> Result<TokenInfo, String> {
        let obj = answer.as_object().ok_or("not a JSON object")?;
        let token = |name: &str| -> Result<String, String> {
            match obj.get(name).and_then(Value::as_str) {
                Some(t)
                    if !t.is_empty()
                        && t.len() <= TOKEN_MAX
                        && t.bytes().all(|b| b.is_ascii_graphic()) =>
                {
                    Ok(t.to_string())
                }
                Some(_) => Err(format!("{name} is not a token")),
                None => Err(format!("no {name}")),
            }
        };
        let access_token = token("access_token")?;
        let refresh_token = token("refresh_token")?;
        let expires = match (int(obj.get("expires")), int(obj.get("expires_in"))) {
            (Some(at), _) if at > now => at,
            (_, Some(within)) if within > 0 => now + within,
            // Bitrix24's access tokens last an hour.
            _ => now + 3600,
        };
        Ok(TokenInfo {
            v: 1,
            access_token,
            refresh_token,
            expires,
            client_endpoint: endpoint(obj.get("client_endpoint")),
            server_endpoint: endpoint(obj.get("server_endpoint")),
            member_id: obj
                .get("member_id")
                .and_then(Value::as_str)
                .filter(|m| m.len() <= 128 && m.bytes().all(|b| b.is_ascii_alphanumeric()))
                .unwrap_or_default()
                .to_string(),
            user_id: int(obj.get("user_id")),
        })
    }

    /// Where the portal takes this application's requests (ends with `/`).
    pub(super) fn rest_base(&self, portal: &str) -> String {
        if self.client_endpoint.is_empty() {
            format!("{portal}/rest/")
        } else if self.client_endpoint.ends_with('/') {
            self.client_endpoint.clone()
        } else {
            format!("{}/", self.client_endpoint)
        }
    }
}

/// A number, or a string of digits (PHP answers either).
fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// An `http(s)` URL with a host and nothing else, or empty.
fn endpoint(v: Option<&Value>) -> String {
    let Some(s) = v.and_then(Value::as_str) else {
        return String::new();
    };
    match url::Url::parse(s) {
        Ok(u)
            if matches!(u.scheme(), "http" | "https")
                && u.host_str().is_some_and(|h| !h.is_empty())
                && u.username().is_empty()
                && u.password().is_none()
                && u.query().is_none()
                && u.fragment().is_none() =>
        {
            s.to_string()
        }
        _ => String::new(),
    }
}

pub(super) fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// The stored grant, if there is one.
pub fn stored(state: &CrmState) -> Result<Option<TokenInfo>, B24Error> {
    let Some(bytes) = state.get(TOKENS_KEY).map_err(store_error)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| B24Error::Store {
            message: format!("cannot decode {TOKENS_KEY}: {e}"),
        })
}

/// Writes the grant and makes it durable.
async fn save(state: &CrmState, tokens: &TokenInfo) -> Result<(), B24Error> {
    let bytes = serde_json::to_vec(tokens).map_err(|e| B24Error::Store {
        message: e.to_string(),
    })?;
    state.put(TOKENS_KEY, &bytes).map_err(store_error)?;
    state.flush().await.map_err(store_error)
}

fn store_error(e: crate::store::StoreError) -> B24Error {
    B24Error::Store {
        message: e.to_string(),
    }
}

/// The page a portal administrator opens to grant pbxgate access: the portal then redirects
/// to the application's handler with `code` in the query.
pub fn authorize_url(config: &Config) -> String {
    let portal = config.bitrix24.portal.trim_end_matches('/');
    let client_id: String =
        url::form_urlencoded::byte_serialize(config.bitrix24.client_id.as_bytes()).collect();
    format!("{portal}/oauth/authorize/?client_id={client_id}")
}

/// Exchanges an authorisation code (`grant_type=authorization_code`) for the first tokens and
/// stores them (written and flushed) in `state`.
pub async fn exchange_code(
    config: &Config,
    state: &CrmState,
    code: &str,
) -> Result<TokenInfo, B24Error> {
    let b24 = &config.bitrix24;
    if !b24.uses_oauth() {
        return Err(B24Error::NotConfigured);
    }
    if code.is_empty() || code.len() > TOKEN_MAX || !code.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(B24Error::BadRequest {
            reason: "the authorisation code must be 1 to 1024 printable characters".into(),
        });
    }
    let http = http_client(config.crm.timeout)?;
    let server = b24.oauth_server.trim_end_matches('/');
    let tokens = grant(
        &http,
        server,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", &b24.client_id),
            ("client_secret", b24.client_secret.expose()),
            ("code", code),
        ],
        &[b24.client_secret.expose(), code],
        None,
    )
    .await?;
    save(state, &tokens).await?;
    Ok(tokens)
}

pub(super) fn http_client(timeout: Duration) -> Result<reqwest::Client, B24Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .user_agent(USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| transport(e, &[]))
}

/// One request to the OAuth server's `/oauth/token/`: the grant it answers, checked.
async fn grant(
    http: &reqwest::Client,
    server: &str,
    query: &[(&str, &str)],
    secrets: &[&str],
    requests: Option<&CrmRequests>,
) -> Result<TokenInfo, B24Error> {
    let started = std::time::Instant::now();
    let sent = http
        .get(format!("{server}/oauth/token/"))
        .header(reqwest::header::ACCEPT, "application/json")
        .query(query)
        .send()
        .await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            if let Some(r) = requests {
                r.observe("oauth.token", None, started.elapsed());
            }
            return Err(transport(e, secrets));
        }
    };
    let status = resp.status().as_u16();
    let body = read_capped(resp, secrets).await;
    if let Some(r) = requests {
        r.observe("oauth.token", Some(status), started.elapsed());
    }
    let body = body?;
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    if let Some((code, description)) = parsed.as_ref().and_then(body_error) {
        return Err(classify(
            status,
            code,
            description,
            Credentials::Application,
        ));
    }
    if status >= 400 || parsed.is_none() {
        return Err(B24Error::Decode {
            status,
            reason: format!("the OAuth server's answer is not a grant (HTTP {status})"),
        });
    }
    TokenInfo::from_answer(parsed.as_ref().unwrap_or(&Value::Null), unix_now()).map_err(|reason| {
        B24Error::Decode {
            status,
            reason: format!("the OAuth server's grant: {reason}"),
        }
    })
}

/// Keeps the grant of a running client: reads it from the store, refreshes it once at a time.
pub(super) struct Keeper {
    state: Option<CrmState>,
    client_id: String,
    client_secret: Secret,
    /// `bitrix24.oauth_server`, without a trailing `/`.
    oauth_server: String,
    /// Held while refreshing, and while writing a pair the store refused before.
    refreshing: tokio::sync::Mutex<()>,
    /// A refreshed pair that could not be stored yet (the old one is dead already).
    unsaved: std::sync::Mutex<Option<TokenInfo>>,
}

impl Keeper {
    pub(super) fn new(config: &Config, state: Option<CrmState>) -> Keeper {
        let b24 = &config.bitrix24;
        Keeper {
            state,
            client_id: b24.client_id.clone(),
            client_secret: b24.client_secret.clone(),
            oauth_server: b24.oauth_server.trim_end_matches('/').to_string(),
            refreshing: tokio::sync::Mutex::new(()),
            unsaved: std::sync::Mutex::new(None),
        }
    }

    pub(super) fn client_secret(&self) -> &str {
        self.client_secret.expose()
    }

    fn state(&self) -> Result<&CrmState, B24Error> {
        self.state.as_ref().ok_or(B24Error::NotAuthorized)
    }

    fn has_unsaved(&self) -> bool {
        self.unsaved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Writes a pair the store refused before (call with `refreshing` held).
    async fn save_unsaved(&self) -> Result<(), B24Error> {
        let pending = self
            .unsaved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(tokens) = pending {
            self.persist(tokens).await?;
        }
        Ok(())
    }

    async fn persist(&self, tokens: TokenInfo) -> Result<(), B24Error> {
        if let Err(e) = save(self.state()?, &tokens).await {
            tracing::error!(error = %e, "cannot store the refreshed Bitrix24 tokens; keeping them in memory until the store takes them");
            *self.unsaved.lock().unwrap_or_else(|p| p.into_inner()) = Some(tokens);
            return Err(e);
        }
        Ok(())
    }

    /// The stored grant.
    async fn load(&self) -> Result<TokenInfo, B24Error> {
        if self.has_unsaved() {
            let _held = self.refreshing.lock().await;
            self.save_unsaved().await?;
        }
        stored(self.state()?)?.ok_or(B24Error::NotAuthorized)
    }

    /// The grant to send a request with, refreshed first when it is about to expire.
    pub(super) async fn current(
        &self,
        http: &reqwest::Client,
        requests: &CrmRequests,
    ) -> Result<TokenInfo, B24Error> {
        let tokens = self.load().await?;
        let left = tokens.seconds_left(unix_now());
        if left >= REFRESH_AHEAD.as_secs() as i64 {
            return Ok(tokens);
        }
        match self.refresh(&tokens.access_token, http, requests).await {
            Ok(fresh) => Ok(fresh),
            // The OAuth server is down: the old token still works for a while.
            Err(e) if e.is_retriable() && left > 5 => {
                tracing::warn!(error = %e, seconds_left = left, "cannot refresh the Bitrix24 token ahead; using it until it expires");
                Ok(tokens)
            }
            Err(e) => Err(e),
        }
    }

    /// Refreshes the grant whose access token was `stale`, unless someone else did while we
    /// waited for our turn: then their (stored) pair.
    pub(super) async fn refresh(
        &self,
        stale: &str,
        http: &reqwest::Client,
        requests: &CrmRequests,
    ) -> Result<TokenInfo, B24Error> {
        let _held = self.refreshing.lock().await;
        self.save_unsaved().await?;
        let tokens = stored(self.state()?)?.ok_or(B24Error::NotAuthorized)?;
        if tokens.access_token != stale {
            return Ok(tokens);
        }
        let server = oauth_base(&tokens).unwrap_or_else(|| self.oauth_server.clone());
        let fresh = grant(
            http,
            &server,
            &[
                ("grant_type", "refresh_token"),
                ("client_id", &self.client_id),
                ("client_secret", self.client_secret.expose()),
                ("refresh_token", &tokens.refresh_token),
            ],
            &[self.client_secret.expose(), &tokens.refresh_token],
            Some(requests),
        )
        .await?;
        self.persist(fresh.clone()).await?;
        tracing::info!(
            member_id = %fresh.member_id,
            expires = %fresh.expires_at(),
            "refreshed the Bitrix24 OAuth token"
        );
        Ok(fresh)
    }
}

/// The OAuth server the last grant named (`server_endpoint`'s origin), if it named one.
fn oauth_base(tokens: &TokenInfo) -> Option<String> {
    if tokens.server_endpoint.is_empty() {
        return None;
    }
    let url = url::Url::parse(&tokens.server_endpoint).ok()?;
    Some(url.origin().ascii_serialization())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_grant_is_read_leniently_but_checked() {
        let now = 1_800_000_000;
        let t = TokenInfo::from_answer(
            &json!({
                "access_token": "tok-secret-a", "refresh_token": "tok-secret-r", "expires": now + 3600,
                "expires_in": 3600, "client_endpoint": "https://acme.bitrix24.ru/rest/",
                "server_endpoint": "https://oauth.bitrix.info/rest/", "member_id": "abc123",
                "user_id": "7", "status": "L", "domain": "oauth.bitrix.info"
            }),
            now,
        )
        .unwrap();
        assert_eq!(t.expires, now + 3600);
        assert_eq!(t.user_id, Some(7));
        assert_eq!(t.member_id, "abc123");
        assert_eq!(t.rest_base("https://x"), "https://acme.bitrix24.ru/rest/");
        assert_eq!(oauth_base(&t).as_deref(), Some("https://oauth.bitrix.info"));
        assert!(!format!("{t:?}").contains("tok-secret"), "{t:?}");

        let t = TokenInfo::from_answer(
            &json!({"access_token": "a", "refresh_token": "r", "expires_in": 60,
                    "client_endpoint": "javascript:alert(1)"}),
            now,
        )
        .unwrap();
        assert_eq!(t.expires, now + 60);
        assert_eq!(
            t.rest_base("https://acme.bitrix24.ru"),
            "https://acme.bitrix24.ru/rest/"
        );
        assert_eq!(oauth_base(&t), None);

        assert!(TokenInfo::from_answer(&json!({"access_token": "a"}), now).is_err());
        assert!(
            TokenInfo::from_answer(&json!({"access_token": "a b", "refresh_token": "r"}), now)
                .is_err()
        );
    }

    #[test]
    fn the_authorize_url_names_the_application() {
        let mut c = Config::default();
        c.bitrix24.portal = "https://acme.bitrix24.ru/".into();
        c.bitrix24.client_id = "local.abc&1".into();
        assert_eq!(
            authorize_url(&c),
            "https://acme.bitrix24.ru/oauth/authorize/?client_id=local.abc%261"
        );
    }
}
