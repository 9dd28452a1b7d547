//! OAuth tokens of a Kommo integration: the first grant (`pbxgate kommo auth --code` exchanges
//! the authorization code Kommo hands out), their place in the store, and their refresh.
//!
//! Kommo's refresh tokens rotate and work once: reusing one answers 401 "Token has been
//! revoked", and a refresh that loses its answer, or two refreshes at once, lock the
//! integration out until an operator gets a new code. So exactly one refresh runs at a time
//! (a caller that waited for it re-reads the stored pair instead of refreshing again), and a
//! new pair is written and flushed to the store before anything uses it; a pair the store
//! refused waits in memory and is written first thing next time, before any other refresh.
//! Tokens are refreshed when less than [`REFRESH_AHEAD`] is left, or after a 401.
//!
//! The grant goes to `POST {base}/oauth2/access_token` (JSON `client_id`, `client_secret`,
//! `grant_type`, `code` or `refresh_token`, `redirect_uri`). Only the access token goes to the
//! API; none of them, nor the client secret, is ever logged or put in a message.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::client::{
    body_prefix, endpoint, html_title, http_client, read_answer, scrub, transport,
};
use super::error::{describe, KommoError};
use crate::base::latency::CrmRequests;
use crate::base::secret::Secret;
use crate::config::Config;
use crate::store::crm_state::CrmState;

/// Where the tokens live in the CRM adapter's state tree.
pub const TOKENS_KEY: &str = "kommo:oauth";

/// Tokens are refreshed ahead when less than this is left of the access token.
pub const REFRESH_AHEAD: Duration = Duration::from_secs(300);

/// The token endpoint, under the account's origin.
pub const TOKEN_PATH: &str = "/oauth2/access_token";

/// The longest token or code we accept (Kommo's access tokens are JWTs of a kilobyte or so).
const TOKEN_MAX: usize = 8192;

/// How long an access token lasts when the answer does not say (Kommo's last a day).
const DEFAULT_LIFETIME: i64 = 86_400;

/// A stored grant: the access and refresh tokens and when the access token expires. `Debug`
/// never shows the tokens.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub(crate) access_token: String,
    pub(crate) refresh_token: String,
    /// Unix seconds when the access token expires.
    pub expires_at: i64,
}

impl std::fmt::Debug for TokenInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenInfo")
            .field("access_token", &"***")
            .field("refresh_token", &"***")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl TokenInfo {
    /// Seconds the access token has left at `now` (unix seconds; negative: expired).
    pub fn seconds_left(&self, now: i64) -> i64 {
        self.expires_at - now
    }

    /// When the access token expires, as an RFC 3339 timestamp (UTC).
    pub fn expiry(&self) -> String {
        jiff::Timestamp::from_second(self.expires_at)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| self.expires_at.to_string())
    }

    /// The token endpoint's answer to a grant, checked. `now`: unix seconds.
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
        let lifetime = match obj.get("expires_in") {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        }
        .filter(|s| *s > 0 && *s <= 10 * 365 * 86_400)
        .unwrap_or(DEFAULT_LIFETIME);
        Ok(TokenInfo {
            access_token,
            refresh_token,
            expires_at: now + lifetime,
        })
    }
}

pub(super) fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// The stored grant, if there is one.
pub fn stored(state: &CrmState) -> Result<Option<TokenInfo>, KommoError> {
    let Some(bytes) = state.get(TOKENS_KEY).map_err(store_error)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| KommoError::Store {
            message: format!("cannot decode {TOKENS_KEY}: {e}"),
        })
}

/// Writes the grant and makes it durable.
async fn save(state: &CrmState, tokens: &TokenInfo) -> Result<(), KommoError> {
    let bytes = serde_json::to_vec(tokens).map_err(|e| KommoError::Store {
        message: e.to_string(),
    })?;
    state.put(TOKENS_KEY, &bytes).map_err(store_error)?;
    state.flush().await.map_err(store_error)
}

fn store_error(e: crate::store::StoreError) -> KommoError {
    KommoError::Store {
        message: e.to_string(),
    }
}

/// Exchanges an authorization code (`grant_type=authorization_code`) for the first tokens and
/// stores them (written and flushed) in `state`.
pub async fn exchange_code(
    config: &Config,
    state: &CrmState,
    code: &str,
) -> Result<TokenInfo, KommoError> {
    let kommo = &config.kommo;
    if !kommo.uses_oauth() {
        return Err(KommoError::NotConfigured);
    }
    if code.is_empty() || code.len() > TOKEN_MAX || !code.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(KommoError::BadRequest {
            reason: format!("the authorization code must be 1 to {TOKEN_MAX} printable characters"),
        });
    }
    let http = http_client(config.crm.timeout)?;
    let body = json!({
        "client_id": kommo.client_id,
        "client_secret": kommo.client_secret.expose(),
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": kommo.redirect_uri,
    });
    let tokens = grant(
        &http,
        &kommo.origin(),
        &body,
        &[kommo.client_secret.expose(), code],
        None,
    )
    .await?;
    save(state, &tokens).await?;
    Ok(tokens)
}

/// One request to the token endpoint: the grant it answers, checked.
async fn grant(
    http: &reqwest::Client,
    base: &str,
    body: &Value,
    secrets: &[&str],
    requests: Option<&CrmRequests>,
) -> Result<TokenInfo, KommoError> {
    let started = std::time::Instant::now();
    let label = endpoint(TOKEN_PATH);
    let sent = http
        .post(format!("{base}{TOKEN_PATH}"))
        .header(reqwest::header::ACCEPT, "application/json")
        .json(body)
        .send()
        .await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            if let Some(r) = requests {
                r.observe(label, None, started.elapsed());
            }
            return Err(transport(e, secrets));
        }
    };
    let answer = read_answer(resp, secrets).await;
    if let Some(r) = requests {
        r.observe(
            label,
            answer.as_ref().ok().map(|a| a.status),
            started.elapsed(),
        );
    }
    let answer = answer?;
    let status = answer.status;
    let parsed: Option<Value> = if answer.html {
        None
    } else {
        serde_json::from_slice(&answer.body).ok()
    };
    if (200..300).contains(&status) {
        let grant = parsed.ok_or_else(|| KommoError::Decode {
            status,
            reason: "the token endpoint's answer is not JSON".into(),
        })?;
        return TokenInfo::from_answer(&grant, unix_now()).map_err(|reason| KommoError::Decode {
            status,
            reason: format!("the token endpoint's grant: {reason}"),
        });
    }
    let detail = match &parsed {
        Some(v) => describe(v),
        None if answer.html => html_title(&answer.body),
        None => body_prefix(&answer.body),
    };
    let detail = scrub(&detail, secrets);
    let json_object = parsed.as_ref().is_some_and(Value::is_object);
    Err(match status {
        402 => KommoError::PaymentRequired { detail },
        403 if !json_object => KommoError::AccountBlocked { detail },
        429 => KommoError::RateLimited { detail },
        400 | 401 | 403 if refuses_the_client(parsed.as_ref(), &detail) => {
            KommoError::ClientRefused { status, detail }
        }
        // A used, revoked or expired refresh token or code: "Token has been revoked".
        400 | 401 | 403 => KommoError::GrantRevoked { status, detail },
        _ => KommoError::Api { status, detail },
    })
}

/// The token endpoint refused the integration's keys (`invalid_client`, "Client authentication
/// failed"), not the grant.
fn refuses_the_client(parsed: Option<&Value>, detail: &str) -> bool {
    let code = parsed
        .and_then(|v| v.get("error"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    code == "invalid_client"
        || detail
            .to_ascii_lowercase()
            .contains("client authentication failed")
}

/// Keeps the grant of a running client: reads it from the store, refreshes it once at a time.
pub(super) struct Keeper {
    state: Option<CrmState>,
    /// The account's origin: the token endpoint is under it.
    base: String,
    client_id: String,
    client_secret: Secret,
    redirect_uri: String,
    /// Held while refreshing, and while writing a pair the store refused before.
    refreshing: tokio::sync::Mutex<()>,
    /// A refreshed pair that could not be stored yet (the old one is dead already).
    unsaved: std::sync::Mutex<Option<TokenInfo>>,
}

impl Keeper {
    pub(super) fn new(config: &Config, state: Option<CrmState>) -> Keeper {
        let kommo = &config.kommo;
        Keeper {
            state,
            base: kommo.origin(),
            client_id: kommo.client_id.clone(),
            client_secret: kommo.client_secret.clone(),
            redirect_uri: kommo.redirect_uri.clone(),
            refreshing: tokio::sync::Mutex::new(()),
            unsaved: std::sync::Mutex::new(None),
        }
    }

    fn state(&self) -> Result<&CrmState, KommoError> {
        self.state.as_ref().ok_or(KommoError::NotAuthorized)
    }

    fn has_unsaved(&self) -> bool {
        self.unsaved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Writes a pair the store refused before (call with `refreshing` held).
    async fn save_unsaved(&self) -> Result<(), KommoError> {
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

    async fn persist(&self, tokens: TokenInfo) -> Result<(), KommoError> {
        if let Err(e) = save(self.state()?, &tokens).await {
            tracing::error!(error = %e, "cannot store the refreshed Kommo tokens; keeping them in memory until the store takes them");
            *self.unsaved.lock().unwrap_or_else(|p| p.into_inner()) = Some(tokens);
            return Err(e);
        }
        Ok(())
    }

    /// The stored grant (a pair waiting in memory is stored first).
    async fn load(&self) -> Result<TokenInfo, KommoError> {
        if self.has_unsaved() {
            let _held = self.refreshing.lock().await;
            self.save_unsaved().await?;
        }
        stored(self.state()?)?.ok_or(KommoError::NotAuthorized)
    }

    /// The grant to send a request with, refreshed first when it is about to expire.
    pub(super) async fn current(
        &self,
        http: &reqwest::Client,
        requests: &CrmRequests,
    ) -> Result<TokenInfo, KommoError> {
        let tokens = self.load().await?;
        let left = tokens.seconds_left(unix_now());
        if left >= REFRESH_AHEAD.as_secs() as i64 {
            return Ok(tokens);
        }
        match self.refresh(&tokens.access_token, http, requests).await {
            Ok(fresh) => Ok(fresh),
            // The token endpoint is down: the old token still works for a while.
            Err(e) if e.is_retriable() && left > 5 => {
                tracing::warn!(error = %e, seconds_left = left, "cannot refresh the Kommo token ahead; using it until it expires");
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
    ) -> Result<TokenInfo, KommoError> {
        let _held = self.refreshing.lock().await;
        self.save_unsaved().await?;
        let tokens = stored(self.state()?)?.ok_or(KommoError::NotAuthorized)?;
        if tokens.access_token != stale {
            return Ok(tokens);
        }
        let body = json!({
            "client_id": self.client_id,
            "client_secret": self.client_secret.expose(),
            "grant_type": "refresh_token",
            "refresh_token": tokens.refresh_token,
            "redirect_uri": self.redirect_uri,
        });
        let fresh = grant(
            http,
            &self.base,
            &body,
            &[
                self.client_secret.expose(),
                &tokens.refresh_token,
                &tokens.access_token,
            ],
            Some(requests),
        )
        .await?;
        self.persist(fresh.clone()).await?;
        tracing::info!(base = %self.base, expires = %fresh.expiry(), "refreshed the Kommo OAuth token");
        Ok(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_is_read_leniently_but_checked() {
        let now = 1_800_000_000;
        let t = TokenInfo::from_answer(
            &json!({"token_type": "Bearer", "expires_in": 86400, "server_time": now,
                    "access_token": "tok-secret-a", "refresh_token": "tok-secret-r"}),
            now,
        )
        .unwrap();
        assert_eq!(t.expires_at, now + 86400);
        assert_eq!(t.seconds_left(now + 400), 86000);
        assert!(!format!("{t:?}").contains("tok-secret"), "{t:?}");
        let stored = serde_json::to_value(&t).unwrap();
        assert_eq!(
            stored,
            json!({"access_token": "tok-secret-a", "refresh_token": "tok-secret-r",
                   "expires_at": now + 86400})
        );

        let t = TokenInfo::from_answer(
            &json!({"access_token": "a", "refresh_token": "r", "expires_in": "-5"}),
            now,
        )
        .unwrap();
        assert_eq!(t.expires_at, now + DEFAULT_LIFETIME);
        assert!(TokenInfo::from_answer(&json!({"access_token": "a"}), now).is_err());
        assert!(
            TokenInfo::from_answer(&json!({"access_token": "a b", "refresh_token": "r"}), now)
                .is_err()
        );
    }

    #[test]
    fn the_client_is_told_from_the_grant() {
        assert!(refuses_the_client(
            Some(&json!({"error": "invalid_client"})),
            ""
        ));
        assert!(refuses_the_client(
            None,
            "Unauthorized: Client authentication failed"
        ));
        // The invalid_grant wording names the client and the redirection URI too.
        assert!(!refuses_the_client(
            None,
            "The provided authorization grant is invalid, expired, revoked, does not match the \
             redirection URI used in the authorization request, or was issued to another client."
        ));
    }
}
