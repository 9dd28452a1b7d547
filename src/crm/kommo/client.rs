//! Kommo API v4 client: `get` (`None` for 204, Kommo's "nothing found"), `post`, `patch`.
//!
//! Transport: JSON to `{base}{path}` with `Authorization: Bearer` — a private integration's
//! long-lived token (never refreshed), or an OAuth access token from [`super::oauth`] (refreshed
//! ahead of its expiry, and once after a 401, then the request is sent once more). Answers are
//! read up to [`MAX_ANSWER_BYTES`] and turned into a typed [`KommoError`].
//!
//! Pace: every request waits for its slot in [`super::limiter`] (below `kommo.rps`); a 429
//! pauses everything for at least a second, then the request is retried on the shared
//! schedule. Transient failures (no answer, 429, 5xx) are retried at most `crm.max_retries`
//! times; nothing else is.
//!
//! Alarm instead of hammering: Kommo blocks accounts that keep sending after being refused. A
//! 402 (unpaid) or an HTML 403 (the account or our IP blocked) raises the alarm: [`alarm`]
//! says why, `/ready` and the dashboard show it, and every request fails at once, without
//! being sent, until the cooldown ([`BLOCK_COOLDOWN`]) has passed; then one request goes out
//! as a probe. Its success (or any answer but a block) clears the alarm; another block starts
//! the cooldown again.
//!
//! Logs and errors name the account's origin and the path, never a token or the client
//! secret.
//!
//! [`alarm`]: KommoClient::alarm

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::Method;
use serde_json::Value;

use super::error::{describe, says_entity_not_found, validation_issues, KommoError, DETAIL_MAX};
use super::limiter::Window;
use super::oauth::Keeper;
use crate::base::backoff::backoff;
use crate::base::latency::CrmRequests;
use crate::base::secret::Secret;
use crate::config::Config;
use crate::store::crm_state::CrmState;
use crate::telemetry::one_line;

/// Answers larger than this are refused rather than buffered.
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// How long nothing is sent after Kommo said the account is blocked or unpaid.
pub const BLOCK_COOLDOWN: Duration = Duration::from_secs(600);

/// The least a 429 pauses every request for.
pub const RATE_LIMIT_PAUSE: Duration = Duration::from_secs(1);

pub(super) const USER_AGENT: &str = concat!("pbxgate/", env!("CARGO_PKG_VERSION"));

/// Parameters one request may carry in its query.
const QUERY_MAX: usize = 50;

/// Cheap to clone; clones share the rate limit, the tokens and the alarm.
#[derive(Clone)]
pub struct KommoClient {
    inner: Arc<Inner>,
}

enum Login {
    None,
    /// A private integration's long-lived token.
    LongLived(Secret),
    OAuth(Box<Keeper>),
}

struct Inner {
    http: reqwest::Client,
    auth: Login,
    /// The account's origin (`https://acme.kommo.com`).
    base: String,
    /// `kommo.client_id` (sent as `X-Client-UUID`, as Kommo's own library does), or empty.
    client_id: String,
    window: Window,
    max_retries: u32,
    retry_base: Duration,
    retry_max: Duration,
    /// Scrubbed from every message that could carry them: the long-lived token, the client
    /// secret.
    secrets: Vec<String>,
    /// Bumped by every successful request: whoever backs off after a failure can stop waiting
    /// once the account answers again.
    successes: tokio::sync::watch::Sender<u64>,
    /// Timings by path and status; whether Kommo refuses our credentials or the account.
    requests: CrmRequests,
    alarm: Mutex<Option<Alarm>>,
    /// [`BLOCK_COOLDOWN`], unless changed.
    cooldown_ms: AtomicU64,
}

/// Kommo refused the account: nothing is sent before `until`, then one probe.
#[derive(Debug)]
struct Alarm {
    /// What Kommo said, with what to do.
    reason: String,
    until: Instant,
    /// The probe is out.
    probing: bool,
}

/// Retries of failed requests are logged at most this often (with the number held back).
static RETRY_LOG: crate::telemetry::RateLimit =
    crate::telemetry::RateLimit::new(Duration::from_secs(10));

impl std::fmt::Debug for KommoClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = match self.inner.auth {
            Login::None => "none",
            Login::LongLived(_) => "long-lived token",
            Login::OAuth(_) => "oauth",
        };
        f.debug_struct("KommoClient")
            .field("base", &self.inner.base)
            .field("auth", &auth)
            .finish()
    }
}

/// What one HTTP exchange brought back.
pub(super) struct Answer {
    pub(super) status: u16,
    pub(super) body: Vec<u8>,
    /// The body is an HTML page (by its type or its first byte).
    pub(super) html: bool,
    retry_after: Option<Duration>,
    /// A redirect's target (its origin only).
    location: Option<String>,
}

/// A failed attempt: the error, and the access token it was sent with (OAuth).
struct Failed {
    error: KommoError,
    token: Option<String>,
    retry_after: Option<Duration>,
}

impl From<KommoError> for Failed {
    fn from(error: KommoError) -> Failed {
        Failed {
            error,
            token: None,
            retry_after: None,
        }
    }
}

impl KommoClient {
    /// A client for `config.kommo` (timeouts and retries from `config.crm`). `state` keeps the
    /// OAuth tokens; without it OAuth cannot be used.
    pub fn new(config: &Config, state: Option<CrmState>) -> Result<KommoClient, KommoError> {
        let kommo = &config.kommo;
        let mut secrets = Vec::new();
        let auth = if !kommo.long_lived_token.is_empty() {
            secrets.push(kommo.long_lived_token.expose().to_string());
            Login::LongLived(kommo.long_lived_token.clone())
        } else if kommo.uses_oauth() {
            Login::OAuth(Box::new(Keeper::new(config, state)))
        } else {
            Login::None
        };
        if !kommo.client_secret.is_empty() {
            secrets.push(kommo.client_secret.expose().to_string());
        }
        secrets.retain(|s| s.len() >= 4);
        Ok(KommoClient {
            inner: Arc::new(Inner {
                http: http_client(config.crm.timeout)?,
                auth,
                base: kommo.origin(),
                client_id: kommo.client_id.clone(),
                window: Window::new(kommo.rps),
                max_retries: config.crm.max_retries,
                retry_base: config.crm.retry_base,
                retry_max: config.crm.retry_max,
                secrets,
                successes: tokio::sync::watch::Sender::new(0),
                requests: CrmRequests::default(),
                alarm: Mutex::new(None),
                cooldown_ms: AtomicU64::new(millis(BLOCK_COOLDOWN)),
            }),
        })
    }

    /// How long nothing is sent after a block (instead of [`BLOCK_COOLDOWN`]); for every clone.
    pub fn with_block_cooldown(self, cooldown: Duration) -> KommoClient {
        self.inner
            .cooldown_ms
            .store(millis(cooldown), Ordering::Relaxed);
        self
    }

    pub fn is_configured(&self) -> bool {
        !matches!(self.inner.auth, Login::None)
    }

    /// Whether the client authenticates with OAuth tokens (else a long-lived token).
    pub fn uses_oauth(&self) -> bool {
        matches!(self.inner.auth, Login::OAuth(_))
    }

    /// The account's origin.
    pub fn base(&self) -> &str {
        &self.inner.base
    }

    /// `GET {base}{path}?{query}`: the JSON answer, `None` for 204 (nothing found).
    pub async fn get(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Option<Value>, KommoError> {
        let (status, value) = self.request(Method::GET, path, query, None).await?;
        Ok((status != 204).then_some(value))
    }

    /// `POST {base}{path}` with a JSON body: the JSON answer (`{}` for 202, `null` for 204).
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, KommoError> {
        let (_, value) = self.request(Method::POST, path, &[], Some(body)).await?;
        Ok(value)
    }

    /// `PATCH {base}{path}` with a JSON body.
    pub async fn patch(&self, path: &str, body: &Value) -> Result<Value, KommoError> {
        let (_, value) = self.request(Method::PATCH, path, &[], Some(body)).await?;
        Ok(value)
    }

    /// Changes whenever a request succeeds. After an outage, the first request to get through
    /// tells the others that Kommo is back, so that backlogs do not wait out their backoff.
    pub fn successes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.successes.subscribe()
    }

    /// Every request's time by path and HTTP status, and whether Kommo refuses our
    /// credentials or the account. `None` when nothing is configured (no request is sent).
    pub fn requests(&self) -> Option<&CrmRequests> {
        self.is_configured().then_some(&self.inner.requests)
    }

    /// Why sending is stopped until an operator acts (the account blocked or unpaid), if it is.
    pub fn alarm(&self) -> Option<String> {
        self.inner.lock_alarm().as_ref().map(|a| a.reason.clone())
    }

    // -----------------------------------------------------------------------------------------
    // Transport

    /// Sends the request until it is answered: the status and the JSON body (`Null` when
    /// there is none).
    async fn request(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<(u16, Value), KommoError> {
        let inner = &*self.inner;
        check_path(path)?;
        check_query(query)?;
        if !self.is_configured() {
            return Err(KommoError::NotConfigured);
        }
        let endpoint = endpoint(path);
        let mut probe = inner.gate()?;
        let mut attempt = 0;
        let mut refreshed = false;
        let mut others_ok = inner.successes.subscribe();
        loop {
            if probe.is_none() {
                // Another request raised the alarm while this one waited.
                inner.halted()?;
            }
            let outcome = self
                .attempt(&method, path, endpoint, query, body, &mut others_ok)
                .await;
            let failed = match outcome {
                Ok(answered) => {
                    if let Some(p) = probe.take() {
                        p.clear();
                    }
                    if inner.lock_alarm().is_none() {
                        inner.requests.set_rejected(None);
                    }
                    inner.successes.send_modify(|n| *n = n.wrapping_add(1));
                    return Ok(answered);
                }
                Err(failed) => failed,
            };
            let e = failed.error;
            if e.is_account_block() {
                inner.raise(&e, path);
                return Err(e);
            }
            if probe.is_some() && e.status().is_some() {
                // The account answers: whatever this is, it is not the block any more.
                if let Some(p) = probe.take() {
                    p.clear();
                }
            }
            // An OAuth access token refused: refresh it once, send again.
            if let (Login::OAuth(keeper), KommoError::Unauthorized { .. }, Some(stale), false) =
                (&inner.auth, &e, &failed.token, refreshed)
            {
                tracing::debug!(base = %inner.base, path, "Kommo refused the access token, refreshing");
                match keeper.refresh(stale, &inner.http, &inner.requests).await {
                    Ok(_) => {
                        refreshed = true;
                        continue;
                    }
                    Err(refresh_failed) => {
                        if refresh_failed.is_account_block() {
                            inner.raise(&refresh_failed, path);
                            return Err(refresh_failed);
                        }
                        self.give_up_or_wait(
                            &refresh_failed,
                            &mut attempt,
                            &mut others_ok,
                            None,
                            path,
                        )
                        .await?;
                        continue;
                    }
                }
            }
            // Kommo does not deduplicate: a POST that may have been carried out (no answer in
            // time, a server error) goes back to the caller, which knows whether sending it
            // again is safe. Only what certainly did nothing is sent again here.
            if method == Method::POST && !post_may_retry(&e) {
                tracing::debug!(base = %inner.base, path, error = %e, "Kommo request failed");
                return Err(e);
            }
            self.give_up_or_wait(&e, &mut attempt, &mut others_ok, failed.retry_after, path)
                .await?;
        }
    }

    /// One try: the token, a slot in the window, the exchange and what it means.
    async fn attempt(
        &self,
        method: &Method,
        path: &str,
        endpoint: &'static str,
        query: &[(&str, String)],
        body: Option<&Value>,
        others_ok: &mut tokio::sync::watch::Receiver<u64>,
    ) -> Result<(u16, Value), Failed> {
        let inner = &*self.inner;
        let (token, oauth) = match &inner.auth {
            Login::None => return Err(KommoError::NotConfigured.into()),
            Login::LongLived(token) => (token.expose().to_string(), false),
            Login::OAuth(keeper) => {
                let tokens = keeper.current(&inner.http, &inner.requests).await?;
                (tokens.access_token, true)
            }
        };
        inner.window.acquire().await;
        others_ok.mark_unchanged();
        let secrets: Vec<&str> = inner
            .secrets
            .iter()
            .map(String::as_str)
            .chain(oauth.then_some(token.as_str()))
            .collect();
        let failed = |error: KommoError, retry_after| Failed {
            error,
            token: oauth.then(|| token.clone()),
            retry_after,
        };
        let answer = self
            .exchange(method, path, endpoint, query, body, &token, &secrets)
            .await
            .map_err(|e| failed(e, None))?;
        interpret(path, &answer, !oauth, &secrets).map_err(|e| failed(e, answer.retry_after))
    }

    /// After a failure: `Err` to give up with, or `Ok` once it waited for the next attempt.
    async fn give_up_or_wait(
        &self,
        e: &KommoError,
        attempt: &mut u32,
        others_ok: &mut tokio::sync::watch::Receiver<u64>,
        retry_after: Option<Duration>,
        path: &str,
    ) -> Result<(), KommoError> {
        let inner = &*self.inner;
        if e.is_refusal() {
            inner.requests.set_rejected(Some(e.with_hint()));
        }
        if !e.is_retriable() || *attempt >= inner.max_retries {
            tracing::debug!(base = %inner.base, path, error = %e, "Kommo request failed");
            return Err(e.clone());
        }
        let rate_limited = matches!(e, KommoError::RateLimited { .. });
        let mut delay = backoff(*attempt, inner.retry_base, inner.retry_max);
        if rate_limited {
            // Whoever went over, everyone waits: at least a second, longer if Kommo says so
            // (bounded by crm.retry_max).
            let pause = retry_after
                .map_or(RATE_LIMIT_PAUSE, |after| {
                    after.min(inner.retry_max.max(RATE_LIMIT_PAUSE))
                })
                .max(RATE_LIMIT_PAUSE);
            inner.window.pause(pause);
            delay = delay.max(pause);
        }
        if let Some(suppressed) = RETRY_LOG.check() {
            tracing::warn!(base = %inner.base, path, attempt = *attempt + 1,
                delay_ms = delay.as_millis() as u64, error = %e, suppressed,
                "Kommo request failed, retrying");
        } else {
            tracing::debug!(base = %inner.base, path, attempt = *attempt + 1, error = %e,
                "Kommo request failed, retrying");
        }
        // Another request getting through ends the wait (not a rate limit's).
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            Ok(()) = others_ok.changed(), if !rate_limited => {}
        }
        *attempt += 1;
        Ok(())
    }

    /// One HTTP request, timed for `/metrics` by path and status.
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        method: &Method,
        path: &str,
        endpoint: &'static str,
        query: &[(&str, String)],
        body: Option<&Value>,
        token: &str,
        secrets: &[&str],
    ) -> Result<Answer, KommoError> {
        let inner = &*self.inner;
        let started = std::time::Instant::now();
        let mut req = inner
            .http
            .request(method.clone(), format!("{}{path}", inner.base))
            .header(ACCEPT, "application/json")
            .header(AUTHORIZATION, format!("Bearer {token}"));
        if !query.is_empty() {
            req = req.query(query);
        }
        if !inner.client_id.is_empty() {
            req = req.header("X-Client-UUID", &inner.client_id);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                inner.requests.observe(endpoint, None, started.elapsed());
                return Err(transport(e, secrets));
            }
        };
        let answer = read_answer(resp, secrets).await;
        inner.requests.observe(
            endpoint,
            answer.as_ref().ok().map(|a| a.status),
            started.elapsed(),
        );
        answer
    }
}

impl Inner {
    fn lock_alarm(&self) -> std::sync::MutexGuard<'_, Option<Alarm>> {
        self.alarm.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cooldown(&self) -> Duration {
        Duration::from_millis(self.cooldown_ms.load(Ordering::Relaxed))
    }

    /// Whether this request may go: `Ok(None)` without an alarm, `Ok(Some(probe))` when it is
    /// the one probe after the cooldown, the alarm's error otherwise.
    fn gate(&self) -> Result<Option<Probe<'_>>, KommoError> {
        let mut slot = self.lock_alarm();
        let Some(alarm) = slot.as_mut() else {
            return Ok(None);
        };
        let now = Instant::now();
        if alarm.probing || now < alarm.until {
            return Err(halted(alarm, now));
        }
        alarm.probing = true;
        tracing::info!(base = %self.base, "Kommo: trying whether the account's block is lifted");
        Ok(Some(Probe { inner: self }))
    }

    /// The alarm's error, if one is raised.
    fn halted(&self) -> Result<(), KommoError> {
        match self.lock_alarm().as_ref() {
            Some(alarm) => Err(halted(alarm, Instant::now())),
            None => Ok(()),
        }
    }

    /// Kommo refused the account: stop sending for the cooldown.
    fn raise(&self, e: &KommoError, path: &str) {
        let reason = e.with_hint();
        let cooldown = self.cooldown();
        *self.lock_alarm() = Some(Alarm {
            reason: reason.clone(),
            until: Instant::now() + cooldown,
            probing: false,
        });
        self.requests.set_rejected(Some(reason));
        tracing::error!(base = %self.base, path, error = %e,
            cooldown_s = cooldown.as_secs(), "Kommo refuses the account: nothing is sent until the cooldown has passed, then one request tries again");
    }
}

/// A failed POST that certainly changed nothing: the rate limit, or a connection that was
/// never made (a refused connection, not a timeout).
fn post_may_retry(e: &KommoError) -> bool {
    matches!(
        e,
        KommoError::RateLimited { .. } | KommoError::Transport { timeout: false, .. }
    )
}

fn halted(alarm: &Alarm, now: Instant) -> KommoError {
    let left = alarm.until.saturating_duration_since(now);
    KommoError::Halted {
        reason: alarm.reason.clone(),
        probe_in_secs: if alarm.probing {
            0
        } else {
            left.as_secs() + u64::from(left.subsec_nanos() > 0)
        },
    }
}

/// The one request let through after the cooldown. Dropped without [`Probe::clear`] (no
/// answer, or the request given up): the next request probes again.
struct Probe<'a> {
    inner: &'a Inner,
}

impl Probe<'_> {
    /// The account answers again.
    fn clear(self) {
        let was = self.inner.lock_alarm().take();
        if was.is_some() {
            self.inner.requests.set_rejected(None);
            tracing::info!(base = %self.inner.base, "Kommo answers again: sending resumed");
        }
    }
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if let Some(alarm) = self.inner.lock_alarm().as_mut() {
            alarm.probing = false;
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What an answer means: the status and JSON of a success, or a typed error.
fn interpret(
    path: &str,
    answer: &Answer,
    long_lived: bool,
    secrets: &[&str],
) -> Result<(u16, Value), KommoError> {
    let status = answer.status;
    let blank = answer.body.iter().all(u8::is_ascii_whitespace);
    if (200..300).contains(&status) {
        if status == 204 || blank {
            return Ok((status, if status == 202 { empty() } else { Value::Null }));
        }
        return match serde_json::from_slice(&answer.body) {
            Ok(v) => Ok((status, v)),
            // Kommo's library takes any 202 for a success.
            Err(_) if status == 202 => Ok((status, empty())),
            Err(_) => Err(KommoError::Decode {
                status,
                reason: format!(
                    "the answer is not JSON; it starts with: {}",
                    scrub(&body_prefix(&answer.body), secrets)
                ),
            }),
        };
    }
    if (300..400).contains(&status) {
        return Err(KommoError::Api {
            status,
            detail: format!(
                "redirected to {} (check kommo.base_url: the account's own address, not www)",
                answer
                    .location
                    .as_deref()
                    .unwrap_or("an address it did not give")
            ),
        });
    }
    let parsed: Option<Value> = if answer.html {
        None
    } else {
        serde_json::from_slice(&answer.body).ok()
    };
    let detail = match &parsed {
        Some(v) => describe(v),
        None if answer.html => html_title(&answer.body),
        None => body_prefix(&answer.body),
    };
    let detail = scrub(&detail, secrets);
    Err(match status {
        401 => KommoError::Unauthorized { long_lived, detail },
        402 => KommoError::PaymentRequired { detail },
        403 if parsed.as_ref().is_some_and(Value::is_object) => KommoError::Forbidden { detail },
        403 => KommoError::AccountBlocked { detail },
        404 => KommoError::NotFound { detail },
        429 => KommoError::RateLimited { detail },
        400 if is_calls(path) && parsed.as_ref().is_some_and(says_entity_not_found) => {
            KommoError::EntityNotFound
        }
        400 | 422 => KommoError::Validation {
            status,
            detail,
            issues: parsed
                .as_ref()
                .map(validation_issues)
                .unwrap_or_default()
                .into_iter()
                .map(|mut i| {
                    i.detail = scrub(&i.detail, secrets);
                    i
                })
                .collect(),
        },
        _ => KommoError::Api { status, detail },
    })
}

fn empty() -> Value {
    Value::Object(serde_json::Map::new())
}

fn is_calls(path: &str) -> bool {
    path.trim_end_matches('/') == "/api/v4/calls"
}

/// A path as Kommo's API has them (`/api/v4/leads/123/notes`): nothing that could change the
/// host or escape the API.
fn check_path(path: &str) -> Result<(), KommoError> {
    let ok = path.starts_with('/')
        && path.len() <= 512
        && !path.contains("//")
        && !path.split('/').any(|s| s == "." || s == "..")
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(KommoError::BadRequest {
            reason: format!("{:?} is not a Kommo API path", one_line(path, 64)),
        })
    }
}

fn check_query(query: &[(&str, String)]) -> Result<(), KommoError> {
    if query.len() > QUERY_MAX {
        return Err(KommoError::BadRequest {
            reason: format!("at most {QUERY_MAX} query parameters"),
        });
    }
    for (k, v) in query {
        if k.is_empty() || k.len() > 128 || v.len() > 2048 {
            return Err(KommoError::BadRequest {
                reason: format!(
                    "query parameter {:?}: names are 1 to 128 bytes, values at most 2048",
                    one_line(k, 64)
                ),
            });
        }
    }
    Ok(())
}

/// The path as a bounded metrics label: the known templates (ids as `{id}`), the rest `other`.
pub(super) fn endpoint(path: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "/api/v4/calls",
        "/api/v4/leads/unsorted/sip",
        "/api/v4/leads/unsorted",
        "/api/v2/events",
        "/api/v4/account",
        "/api/v4/users",
        "/api/v4/users/{id}",
        "/api/v4/contacts",
        "/api/v4/contacts/{id}",
        "/api/v4/companies",
        "/api/v4/companies/{id}",
        "/api/v4/leads",
        "/api/v4/leads/{id}",
        "/api/v4/customers",
        "/api/v4/tasks",
        "/api/v4/tasks/{id}",
        "/api/v4/leads/notes",
        "/api/v4/contacts/notes",
        "/api/v4/companies/notes",
        "/api/v4/leads/{id}/notes",
        "/api/v4/contacts/{id}/notes",
        "/api/v4/companies/{id}/notes",
        "/oauth2/access_token",
        "/private/api/v2/json/contacts/list",
    ];
    let path = path.trim_end_matches('/');
    KNOWN
        .iter()
        .find(|k| {
            let mut given = path.split('/');
            let mut template = k.split('/');
            loop {
                match (given.next(), template.next()) {
                    (None, None) => return true,
                    (Some(g), Some("{id}"))
                        if !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()) => {}
                    (Some(g), Some(t)) if g == t => {}
                    _ => return false,
                }
            }
        })
        .copied()
        .unwrap_or("other")
}

/// An HTML page's `<title>` (nginx's "403 Forbidden"), or its first words.
pub(super) fn html_title(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]);
    let lower = text.to_ascii_lowercase();
    if let (Some(start), Some(end)) = (lower.find("<title>"), lower.find("</title>")) {
        if start + 7 <= end {
            return one_line(text[start + 7..end].trim(), 200);
        }
    }
    body_prefix(body)
}

/// The first 200 bytes of a body on one line.
pub(super) fn body_prefix(body: &[u8]) -> String {
    let cut = body.len().min(200);
    one_line(String::from_utf8_lossy(&body[..cut]).trim(), 200)
}

pub(super) fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if !s.is_empty() && out.contains(s) {
            out = out.replace(s, "***");
        }
    }
    out
}

pub(super) fn http_client(timeout: Duration) -> Result<reqwest::Client, KommoError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .user_agent(USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| transport(e, &[]))
}

/// A transport failure, without the URL or any of `secrets`.
pub(super) fn transport(e: reqwest::Error, secrets: &[&str]) -> KommoError {
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    KommoError::Transport {
        message: one_line(&scrub(&message, secrets), DETAIL_MAX),
        timeout,
    }
}

/// The answer's status, headers that matter and body (refused beyond [`MAX_ANSWER_BYTES`]).
pub(super) async fn read_answer(
    mut resp: reqwest::Response,
    secrets: &[&str],
) -> Result<Answer, KommoError> {
    let status = resp.status().as_u16();
    let header = |name| {
        resp.headers()
            .get(name)
            .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let html_type = header(CONTENT_TYPE).is_some_and(|t| t.to_ascii_lowercase().contains("html"));
    let retry_after = header(RETRY_AFTER)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let location = header(LOCATION)
        .and_then(|v| url::Url::parse(&v).ok())
        .map(|u| u.origin().ascii_serialization());
    let too_large = || KommoError::Decode {
        status,
        reason: format!("answer larger than {MAX_ANSWER_BYTES} bytes"),
    };
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| transport(e, secrets))? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    let html = html_type
        || body
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'<');
    Ok(Answer {
        status,
        body,
        html,
        retry_after,
        location,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(status: u16, body: &str, html: bool) -> Answer {
        Answer {
            status,
            body: body.as_bytes().to_vec(),
            html,
            retry_after: None,
            location: None,
        }
    }

    #[test]
    fn paths_are_checked_and_bounded_as_labels() {
        assert!(check_path("/api/v4/leads/12/notes").is_ok());
        for bad in [
            "",
            "api/v4",
            "//evil.example/x",
            "/api/../oauth2",
            "/a?b",
            "/a b",
            "/a#",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        assert_eq!(
            endpoint("/api/v4/leads/12/notes"),
            "/api/v4/leads/{id}/notes"
        );
        assert_eq!(endpoint("/api/v4/calls/"), "/api/v4/calls");
        assert_eq!(endpoint("/api/v4/leads/x/notes"), "other");
        assert_eq!(endpoint("/api/v4/something"), "other");
    }

    #[test]
    fn answers_are_typed() {
        let s = &[];
        assert_eq!(
            interpret("/api/v4/x", &answer(204, "", false), true, s).unwrap(),
            (204, Value::Null)
        );
        assert_eq!(
            interpret("/api/v2/events", &answer(202, "accepted", false), true, s).unwrap(),
            (202, json!({}))
        );
        let e = interpret(
            "/api/v4/x",
            &answer(
                403,
                "<html><head><title>403 Forbidden</title></head></html>",
                true,
            ),
            true,
            s,
        )
        .unwrap_err();
        assert_eq!(
            e,
            KommoError::AccountBlocked {
                detail: "403 Forbidden".into()
            }
        );
        let e = interpret(
            "/api/v4/users",
            &answer(
                403,
                r#"{"title":"Forbidden","detail":"Access denied"}"#,
                false,
            ),
            true,
            s,
        )
        .unwrap_err();
        assert!(matches!(e, KommoError::Forbidden { .. }), "{e:?}");
        let body = r#"{"_total_items":0,"errors":[{"title":"Entity not found"}]}"#;
        assert!(
            interpret("/api/v4/calls", &answer(400, body, false), true, s)
                .unwrap_err()
                .is_entity_not_found()
        );
        assert!(matches!(
            interpret("/api/v4/leads/notes", &answer(400, body, false), true, s).unwrap_err(),
            KommoError::Validation { .. }
        ));
        let e = interpret(
            "/api/v4/x",
            &answer(
                401,
                r#"{"title":"Unauthorized","detail":"bad tok-9999"}"#,
                false,
            ),
            false,
            &["tok-9999"],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Kommo refused the OAuth access token (HTTP 401): Unauthorized: bad ***"
        );
        let e = interpret("/api/v4/x", &answer(200, "<html>", false), true, s).unwrap_err();
        assert!(matches!(e, KommoError::Decode { status: 200, .. }), "{e:?}");
    }
}
