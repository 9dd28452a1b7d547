//! Bitrix24 REST client: `call` (a method's `result`), `call_page` (a list method's page),
//! `batch` (up to 50 commands in one request), `raw` (a pass-through).
//!
//! Transport: POST JSON to `{webhook_url}{method}` (an inbound webhook), or to
//! `{client_endpoint}{method}` with `"auth": <access token>` in the body (OAuth, tokens from
//! [`super::oauth`]). Every answer is checked for `error`, whatever its status (older portals
//! answer errors with 200), and turned into a typed [`B24Error`]. Requests wait for room in
//! our copy of the portal's leaky bucket ([`super::limiter`]); transient failures (no answer,
//! 5xx, `503 QUERY_LIMIT_EXCEEDED`, `429 OPERATION_TIME_LIMIT`) are retried on the shared
//! schedule, at most `crm.max_retries` times; `expired_token`/`invalid_token` refresh the
//! tokens once and resend. Logs and errors name the portal's origin and the method, never the
//! webhook URL (it carries the secret) or a token.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{ACCEPT, LOCATION, RETRY_AFTER};
use serde_json::{Map, Value};

use super::error::{body_error, classify, B24Error, Credentials, DESCRIPTION_MAX};
use super::limiter::LeakyBucket;
use super::oauth::{unix_now, Keeper, TokenInfo};
use crate::base::backoff::backoff;
use crate::base::latency::CrmRequests;
use crate::base::secret::Secret;
use crate::config::Config;
use crate::store::crm_state::CrmState;
use crate::telemetry::one_line;

/// Answers larger than this are refused rather than buffered.
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// Commands one `batch` may carry.
pub const MAX_BATCH: usize = 50;

pub(super) const USER_AGENT: &str = concat!("pbxgate/", env!("CARGO_PKG_VERSION"));

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
    inner: Arc<Inner>,
}

enum Login {
    None,
    /// The webhook URL, ending with `/`.
    Webhook(Secret),
    OAuth(Box<Keeper>),
}

struct Inner {
    http: reqwest::Client,
    auth: Login,
    /// The portal's origin (no secret in it).
    portal: String,
    bucket: LeakyBucket,
    max_retries: u32,
    retry_base: Duration,
    retry_max: Duration,
    /// Scrubbed from every message that could carry them: the webhook's secret, its URL, the
    /// application's `client_secret`.
    secrets: Vec<String>,
    /// Bumped by every successful request: whoever backs off after a failure can stop waiting
    /// once the portal answers again.
    successes: tokio::sync::watch::Sender<u64>,
    /// Timings by method and status; whether the portal refuses our credentials.
    requests: CrmRequests,
}

/// Retries of failed requests are logged at most this often (with the number held back).
static RETRY_LOG: crate::telemetry::RateLimit =
    crate::telemetry::RateLimit::new(Duration::from_secs(10));

impl std::fmt::Debug for B24Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = match self.inner.auth {
            Login::None => "none",
            Login::Webhook(_) => "webhook",
            Login::OAuth(_) => "oauth",
        };
        f.debug_struct("B24Client")
            .field("portal", &self.inner.portal)
            .field("auth", &auth)
            .finish()
    }
}

/// What one HTTP exchange brought back.
struct Answer {
    status: u16,
    body: Vec<u8>,
    /// `Retry-After`, or `time.operating_reset_at` of a 429.
    retry_after: Option<Duration>,
    /// A redirect's target (its origin only).
    location: Option<String>,
}

/// What a request comes to: an answer and what it means, or no answer at all.
type Outcome = Result<(Answer, Result<Map<String, Value>, B24Error>), B24Error>;

impl B24Client {
    /// A client for `config.bitrix24` (timeouts and retries from `config.crm`). `state` keeps
    /// the OAuth tokens; without it OAuth cannot be used.
    pub fn new(config: &Config, state: Option<CrmState>) -> Result<B24Client, B24Error> {
        let b24 = &config.bitrix24;
        let mut secrets = Vec::new();
        let auth = if !b24.webhook_url.is_empty() {
            let mut url = b24.webhook_url.expose().to_string();
            if !url.ends_with('/') {
                url.push('/');
            }
            secrets.push(url.clone());
            if let Some(secret) = url.trim_end_matches('/').rsplit('/').next() {
                secrets.push(secret.to_string());
            }
            Login::Webhook(Secret::new(url))
        } else if b24.uses_oauth() {
            let keeper = Keeper::new(config, state);
            secrets.push(keeper.client_secret().to_string());
            Login::OAuth(Box::new(keeper))
        } else {
            Login::None
        };
        secrets.retain(|s| s.len() >= 4);
        Ok(B24Client {
            inner: Arc::new(Inner {
                http: super::oauth::http_client(config.crm.timeout)?,
                auth,
                portal: b24.portal_origin(),
                bucket: LeakyBucket::new(b24.rps, b24.burst),
                max_retries: config.crm.max_retries,
                retry_base: config.crm.retry_base,
                retry_max: config.crm.retry_max,
                secrets,
                successes: tokio::sync::watch::Sender::new(0),
                requests: CrmRequests::default(),
            }),
        })
    }

    pub fn is_configured(&self) -> bool {
        !matches!(self.inner.auth, Login::None)
    }

    /// Whether the client authenticates as an OAuth application (else an inbound webhook).
    pub fn uses_oauth(&self) -> bool {
        matches!(self.inner.auth, Login::OAuth(_))
    }

    /// The portal's origin, never with a secret.
    pub fn portal(&self) -> &str {
        &self.inner.portal
    }

    /// Calls `method` with `params` (a JSON object) and returns its `result`.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, B24Error> {
        let mut envelope = self.envelope(method, params).await?;
        Ok(envelope.remove("result").unwrap_or(Value::Null))
    }

    /// A list method's page.
    pub async fn call_page(&self, method: &str, params: Value) -> Result<Page, B24Error> {
        let mut envelope = self.envelope(method, params).await?;
        let number = |v: Option<&Value>| match v? {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        };
        Ok(Page {
            total: number(envelope.get("total")),
            next: number(envelope.get("next")),
            result: envelope.remove("result").unwrap_or(Value::Null),
        })
    }

    /// How long the next request would wait for the portal's bucket.
    pub fn pacing(&self) -> std::time::Duration {
        self.inner.bucket.wait()
    }

    /// Up to 50 commands `(key, method, params)` in one request (one for the leaky bucket).
    /// `halt`: the portal stops at the first failing command.
    pub async fn batch(
        &self,
        cmds: &[(String, String, Value)],
        halt: bool,
    ) -> Result<BatchResult, B24Error> {
        if cmds.len() > MAX_BATCH {
            return Err(B24Error::TooManyCommands {
                got: cmds.len(),
                max: MAX_BATCH,
            });
        }
        if cmds.is_empty() {
            return Ok(BatchResult::default());
        }
        // A list, not an object: the portal runs the commands in the order it reads them, and
        // a JSON object's keys have no order of their own. Answers come back by position.
        let mut cmd: Vec<Value> = Vec::with_capacity(cmds.len());
        let mut keys: Vec<&str> = Vec::with_capacity(cmds.len());
        for (key, method, params) in cmds {
            if key.is_empty() || key.len() > 64 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad_request(format!(
                    "batch key {:?} must be 1 to 64 printable characters",
                    one_line(key, 64)
                )));
            }
            check_method(method)?;
            if method.eq_ignore_ascii_case("batch") {
                return Err(bad_request("a batch cannot contain a batch".into()));
            }
            let params = object(params.clone())?;
            let query = php_query(&Value::Object(params));
            let line = if query.is_empty() {
                method.clone()
            } else {
                format!("{method}?{query}")
            };
            if keys.contains(&key.as_str()) {
                return Err(bad_request(format!("batch key {key:?} is given twice")));
            }
            keys.push(key);
            cmd.push(Value::String(line));
        }
        let key_of = |position: String| -> String {
            position
                .parse::<usize>()
                .ok()
                .and_then(|i| keys.get(i))
                .map_or(position, |k| k.to_string())
        };
        let params = serde_json::json!({"halt": u8::from(halt), "cmd": cmd});
        let result = self.call("batch", params).await?;
        let mut out = BatchResult::default();
        for (key, value) in entries(result.get("result")) {
            out.results.insert(key_of(key), value.clone());
        }
        for (key, value) in entries(result.get("result_error")) {
            let key = key_of(key);
            let (code, description) = body_error(value)
                .unwrap_or_else(|| (String::new(), one_line(&value.to_string(), DESCRIPTION_MAX)));
            out.errors.insert(
                key,
                B24Error::Api {
                    status: item_status(&code),
                    code,
                    description,
                },
            );
        }
        Ok(out)
    }

    /// Passes `method` with `params` through and returns the portal's answer as it came
    /// (status and body). Only what is ours is handled on the way: the credentials (an expired
    /// token is refreshed and the request resent) and the portal's request limit
    /// (`QUERY_LIMIT_EXCEEDED` is retried; the request was not run).
    pub async fn raw(&self, method: &str, params: Value) -> Result<(u16, Vec<u8>), B24Error> {
        let (answer, _) = self.request(method, params, |e| e.is_query_limit()).await?;
        Ok((answer.status, answer.body))
    }

    /// Changes whenever a request succeeds. After an outage, the first request to get through
    /// tells the others that the portal is back, so that backlogs do not wait out their
    /// backoff.
    pub fn successes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.successes.subscribe()
    }

    /// Every request's time by method and HTTP status, and whether the portal's last answer
    /// refused our credentials. `None` when nothing is configured (no request is ever sent).
    pub fn requests(&self) -> Option<&CrmRequests> {
        self.is_configured().then_some(&self.inner.requests)
    }

    // -----------------------------------------------------------------------------------------
    // Transport

    /// The answer's envelope (`result`, `total`, `next`, `time`) of a successful call.
    async fn envelope(&self, method: &str, params: Value) -> Result<Map<String, Value>, B24Error> {
        let (_, verdict) = self.request(method, params, B24Error::is_retriable).await?;
        verdict
    }

    /// Sends `method` until it is answered, refreshing the tokens once if the portal says they
    /// expired and retrying what `retry` says is worth it (at most `crm.max_retries` times).
    async fn request(
        &self,
        method: &str,
        params: Value,
        retry: impl Fn(&B24Error) -> bool,
    ) -> Outcome {
        let inner = &*self.inner;
        check_method(method)?;
        let mut params = object(params)?;
        // Ours to set (OAuth), never the caller's.
        params.remove("auth");
        let endpoint = endpoint(method);
        let mut attempt = 0;
        let mut refreshed = false;
        let mut others_ok = inner.successes.subscribe();
        loop {
            let tokens = match &inner.auth {
                Login::None => return Err(B24Error::NotConfigured),
                Login::Webhook(_) => Ok(None),
                Login::OAuth(keeper) => {
                    keeper.current(&inner.http, &inner.requests).await.map(Some)
                }
            };
            let sent = match tokens {
                Ok(tokens) => {
                    inner.bucket.acquire().await;
                    others_ok.mark_unchanged();
                    self.exchange(method, endpoint, &params, tokens.as_ref())
                        .await
                        .map(|a| (a, tokens))
                }
                Err(e) => Err(e),
            };
            let (answer, tokens, verdict) = match sent {
                Ok((answer, tokens)) => {
                    let verdict = self.interpret(&answer);
                    (Some(answer), tokens, verdict)
                }
                Err(e) => (None, None, Err(e)),
            };
            let e = match verdict {
                Ok(envelope) => {
                    inner.requests.set_rejected(None);
                    inner.successes.send_modify(|n| *n = n.wrapping_add(1));
                    return Ok((answer.expect("an answer"), Ok(envelope)));
                }
                Err(e) => e,
            };
            // The portal no longer takes the access token: refresh it once, send again.
            if let (Login::OAuth(keeper), Some(tokens), false) = (&inner.auth, &tokens, refreshed) {
                if matches!(e.code(), Some("expired_token" | "invalid_token")) {
                    tracing::debug!(portal = %inner.portal, method, code = e.code().unwrap_or_default(),
                        "Bitrix24 token refused, refreshing");
                    match keeper
                        .refresh(&tokens.access_token, &inner.http, &inner.requests)
                        .await
                    {
                        Ok(_) => {
                            refreshed = true;
                            continue;
                        }
                        Err(refresh_failed) => {
                            if let Some(failed) = self
                                .give_up_or_wait(
                                    &refresh_failed,
                                    &retry,
                                    &mut attempt,
                                    &mut others_ok,
                                    None,
                                    method,
                                )
                                .await
                            {
                                return Err(failed);
                            }
                            continue;
                        }
                    }
                }
            }
            let retry_after = answer.as_ref().and_then(|a| a.retry_after);
            if self
                .give_up_or_wait(
                    &e,
                    &retry,
                    &mut attempt,
                    &mut others_ok,
                    retry_after,
                    method,
                )
                .await
                .is_none()
            {
                continue;
            }
            return match answer {
                Some(answer) => Ok((answer, Err(e))),
                None => Err(e),
            };
        }
    }

    /// After a failure: `Some(error)` to give up with, or `None` once it waited for the next
    /// attempt.
    async fn give_up_or_wait(
        &self,
        e: &B24Error,
        retry: &impl Fn(&B24Error) -> bool,
        attempt: &mut u32,
        others_ok: &mut tokio::sync::watch::Receiver<u64>,
        retry_after: Option<Duration>,
        method: &str,
    ) -> Option<B24Error> {
        let inner = &*self.inner;
        if !retry(e) || *attempt >= inner.max_retries {
            if e.refusal().is_some() {
                let why = match e.operator_hint() {
                    Some(hint) if !matches!(e, B24Error::GrantExpired { .. }) => {
                        format!("{e}; {hint}")
                    }
                    _ => e.to_string(),
                };
                inner.requests.set_rejected(Some(why));
            }
            tracing::debug!(portal = %inner.portal, method, error = %e, "Bitrix24 request failed");
            return Some(e.clone());
        }
        let rate_limited = e.is_query_limit() || e.status() == Some(429);
        if e.is_query_limit() {
            // The portal's bucket is full, whoever filled it: go at its drain rate for a while.
            inner.bucket.fill();
        }
        let mut delay = backoff(*attempt, inner.retry_base, inner.retry_max);
        if let Some(after) = retry_after {
            delay = delay.max(after.min(inner.retry_max));
        }
        if let Some(suppressed) = RETRY_LOG.check() {
            tracing::warn!(portal = %inner.portal, method, attempt = *attempt + 1,
                delay_ms = delay.as_millis() as u64, error = %e, suppressed,
                "Bitrix24 request failed, retrying");
        } else {
            tracing::debug!(portal = %inner.portal, method, attempt = *attempt + 1, error = %e,
                "Bitrix24 request failed, retrying");
        }
        // Another request getting through ends the wait (not a rate limit's).
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            Ok(()) = others_ok.changed(), if !rate_limited => {}
        }
        *attempt += 1;
        None
    }

    /// One HTTP request, timed for `/metrics` by method and status.
    async fn exchange(
        &self,
        method: &str,
        endpoint: &'static str,
        params: &Map<String, Value>,
        tokens: Option<&TokenInfo>,
    ) -> Result<Answer, B24Error> {
        let inner = &*self.inner;
        let started = std::time::Instant::now();
        let (url, body, token_secret) = match (&inner.auth, tokens) {
            (Login::Webhook(base), _) => (
                format!("{}{method}", base.expose()),
                Value::Object(params.clone()),
                None,
            ),
            (Login::OAuth(_), Some(t)) => {
                let mut body = params.clone();
                body.insert("auth".into(), Value::String(t.access_token.clone()));
                (
                    format!("{}{method}", t.rest_base(&inner.portal)),
                    Value::Object(body),
                    Some(t.access_token.as_str()),
                )
            }
            _ => return Err(B24Error::NotConfigured),
        };
        let secrets: Vec<&str> = inner
            .secrets
            .iter()
            .map(String::as_str)
            .chain(token_secret)
            .collect();
        let sent = inner
            .http
            .post(url)
            .header(ACCEPT, "application/json")
            .json(&body)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                inner.requests.observe(endpoint, None, started.elapsed());
                return Err(transport(e, &secrets));
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| url::Url::parse(v).ok())
            .map(|u| u.origin().ascii_serialization());
        let body = read_capped(resp, &secrets).await;
        inner
            .requests
            .observe(endpoint, Some(status), started.elapsed());
        let body = body?;
        let retry_after =
            retry_after.or_else(|| (status == 429).then(|| reset_at(&body)).flatten());
        Ok(Answer {
            status,
            body,
            retry_after,
            location,
        })
    }

    /// What an answer means: the envelope of a success, or a typed error.
    fn interpret(&self, answer: &Answer) -> Result<Map<String, Value>, B24Error> {
        let status = answer.status;
        if (300..400).contains(&status) {
            return Err(B24Error::Moved {
                status,
                location: answer
                    .location
                    .clone()
                    .unwrap_or_else(|| "an address it did not give".into()),
            });
        }
        let parsed: Option<Value> = serde_json::from_slice(&answer.body).ok();
        if let Some((code, description)) = parsed.as_ref().and_then(body_error) {
            let by = match self.inner.auth {
                Login::OAuth(_) => Credentials::Token,
                _ => Credentials::Webhook,
            };
            return Err(classify(status, code, self.scrub(&description), by));
        }
        match parsed {
            Some(Value::Object(obj)) if status < 400 && obj.contains_key("result") => Ok(obj),
            Some(Value::Object(_)) if status < 400 => Err(B24Error::Decode {
                status,
                reason: "the answer has neither result nor error".into(),
            }),
            _ => Err(B24Error::Decode {
                status,
                reason: format!(
                    "the answer is not a JSON envelope; it starts with: {}",
                    self.scrub(&body_prefix(&answer.body))
                ),
            }),
        }
    }

    fn scrub(&self, text: &str) -> String {
        scrub(text, self.inner.secrets.iter().map(String::as_str))
    }
}

fn bad_request(reason: String) -> B24Error {
    B24Error::BadRequest { reason }
}

/// A method name as Bitrix24 has them (`telephony.externalcall.register`): nothing that could
/// change the URL it is appended to.
fn check_method(method: &str) -> Result<(), B24Error> {
    let ok = !method.is_empty()
        && method.len() <= 128
        && !method.starts_with('.')
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(bad_request(format!(
            "{:?} is not a Bitrix24 method name",
            one_line(method, 64)
        )))
    }
}

/// Parameters must be a JSON object (or nothing).
fn object(params: Value) -> Result<Map<String, Value>, B24Error> {
    match params {
        Value::Null => Ok(Map::new()),
        Value::Object(map) => Ok(map),
        _ => Err(bad_request("parameters must be a JSON object".into())),
    }
}

/// A batch's per-command map (an object, or a list when PHP saw only numeric keys).
/// The HTTP status a batch item's error would have had on its own (items carry none): a
/// server-side error or a limit inside a batch is as retriable as outside one.
fn item_status(code: &str) -> u16 {
    match code {
        "INTERNAL_SERVER_ERROR" | "ERROR_UNEXPECTED_ANSWER" | "PORTAL_DELETED" => 500,
        "QUERY_LIMIT_EXCEEDED" | "OVERLOAD_LIMIT" => 503,
        "OPERATION_TIME_LIMIT" => 429,
        "expired_token" | "invalid_token" | "NO_AUTH_FOUND" | "method_confirm_waiting" => 401,
        "insufficient_scope"
        | "ACCESS_DENIED"
        | "WRONG_AUTH_TYPE"
        | "INVALID_CREDENTIALS"
        | "user_access_error" => 403,
        "ERROR_METHOD_NOT_FOUND" => 404,
        _ => 400,
    }
}

fn entries(v: Option<&Value>) -> Vec<(String, &Value)> {
    match v {
        Some(Value::Object(map)) => map.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        _ => Vec::new(),
    }
}

/// `time.operating_reset_at` of an answer, from now.
fn reset_at(body: &[u8]) -> Option<Duration> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let at = v.get("time")?.get("operating_reset_at")?;
    let at = at.as_f64().or_else(|| at.as_str()?.parse().ok())?;
    let left = at - unix_now() as f64;
    (left > 0.0 && left.is_finite()).then(|| Duration::from_secs_f64(left.min(3600.0)))
}

/// The first 200 bytes of a body on one line.
fn body_prefix(body: &[u8]) -> String {
    let cut = body.len().min(200);
    one_line(&String::from_utf8_lossy(&body[..cut]), 200)
}

fn scrub<'a>(text: &str, secrets: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if !s.is_empty() && out.contains(s) {
            out = out.replace(s, "***");
        }
    }
    out
}

/// A transport failure, without the URL (a webhook's carries its secret) or any of `secrets`.
pub(super) fn transport(e: reqwest::Error, secrets: &[&str]) -> B24Error {
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    B24Error::Transport {
        message: one_line(&scrub(&message, secrets.iter().copied()), DESCRIPTION_MAX),
        timeout,
    }
}

/// The body of an answer, refused beyond [`MAX_ANSWER_BYTES`].
pub(super) async fn read_capped(
    mut resp: reqwest::Response,
    secrets: &[&str],
) -> Result<Vec<u8>, B24Error> {
    let status = resp.status().as_u16();
    let too_large = || B24Error::Decode {
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
    Ok(body)
}

/// The method as a bounded metrics label: known methods by their lower-case name, the rest
/// `other`.
fn endpoint(method: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "batch",
        "profile",
        "scope",
        "methods",
        "app.info",
        "server.time",
        "user.get",
        "user.current",
        "user.search",
        "telephony.externalcall.register",
        "telephony.externalcall.finish",
        "telephony.externalcall.show",
        "telephony.externalcall.hide",
        "telephony.externalcall.attachrecord",
        "telephony.externalcall.searchcrmentities",
        "telephony.externalline.add",
        "telephony.externalline.get",
        "telephony.externalline.update",
        "telephony.externalline.delete",
        "telephony.call.attachtranscription",
        "crm.duplicate.findbycomm",
        "crm.lead.get",
        "crm.lead.add",
        "crm.contact.get",
        "crm.company.get",
        "crm.deal.get",
        "crm.activity.add",
        "crm.timeline.comment.add",
        "event.bind",
        "event.unbind",
        "event.get",
        "event.offline.get",
        "im.notify.system.add",
    ];
    KNOWN
        .iter()
        .find(|k| k.eq_ignore_ascii_case(method))
        .copied()
        .unwrap_or("other")
}

/// `params` as a PHP-bracket query string, the way Bitrix24 reads a batch command:
/// `USER_ID[0]=1&USER_ID[1]=2&FILTER[ACTIVE]=1`. Booleans become `1`/`0` (PHP would take the
/// string `false` for true), nulls and empty arrays are left out (as PHP's `http_build_query`
/// does), everything but unreserved characters is percent-encoded. `$`, `[` and `]` stay as
/// they are, so that `$result[reg][CALL_ID]` references to earlier commands still work.
pub fn php_query(params: &Value) -> String {
    let mut pairs = Vec::new();
    match params {
        Value::Object(map) => {
            for (k, v) in map {
                php_pairs(&encode(k), v, &mut pairs);
            }
        }
        Value::Null => {}
        other => php_pairs("0", other, &mut pairs),
    }
    pairs.join("&")
}

fn php_pairs(key: &str, value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Null => {}
        Value::Bool(b) => out.push(format!("{key}={}", u8::from(*b))),
        Value::Number(n) => out.push(format!("{key}={n}")),
        Value::String(s) => out.push(format!("{key}={}", encode(s))),
        Value::Array(list) => {
            for (i, v) in list.iter().enumerate() {
                php_pairs(&format!("{key}[{i}]"), v, out);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                php_pairs(&format!("{key}[{}]", encode(k)), v, out);
            }
        }
    }
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'$' | b'[' | b']')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn php_query_nests_with_brackets() {
        assert_eq!(
            php_query(
                &json!({"USER_ID": [1, 2], "FILTER": {"ACTIVE": true, "UF_PHONE_INNER": "101"}})
            ),
            "FILTER[ACTIVE]=1&FILTER[UF_PHONE_INNER]=101&USER_ID[0]=1&USER_ID[1]=2"
        );
        assert_eq!(
            php_query(&json!({"A": {"B": [{"C": false}]}, "D": null, "E": [], "F": 1.5})),
            "A[B][0][C]=0&F=1.5"
        );
        assert_eq!(php_query(&json!({})), "");
        assert_eq!(php_query(&Value::Null), "");
    }

    #[test]
    fn php_query_percent_encodes_what_is_not_unreserved() {
        assert_eq!(
            php_query(&json!({"PHONE_NUMBER": "+7 (999) 123&x=1#", "NAME": "Иван"})),
            "NAME=%D0%98%D0%B2%D0%B0%D0%BD&PHONE_NUMBER=%2B7%20%28999%29%20123%26x%3D1%23"
        );
        assert_eq!(php_query(&json!({"a b": {"c=d": "e"}})), "a%20b[c%3Dd]=e");
        // References to earlier commands' results pass unchanged.
        assert_eq!(
            php_query(&json!({"CALL_ID": "$result[reg][CALL_ID]"})),
            "CALL_ID=$result[reg][CALL_ID]"
        );
    }

    #[test]
    fn php_query_round_trips_through_a_form_decoder() {
        let q = php_query(&json!({"X": "a+b c%&=?/", "Y": [true, "é"]}));
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&q).unwrap();
        assert_eq!(
            pairs,
            vec![
                ("X".to_string(), "a+b c%&=?/".to_string()),
                ("Y[0]".to_string(), "1".to_string()),
                ("Y[1]".to_string(), "é".to_string()),
            ]
        );
    }

    #[test]
    fn method_names_are_checked_and_bounded_as_labels() {
        assert!(check_method("telephony.externalCall.register").is_ok());
        for bad in ["", "a/b", "../profile", "x?y", "a b", ".x"] {
            assert!(check_method(bad).is_err(), "{bad}");
        }
        assert_eq!(
            endpoint("telephony.externalCall.register"),
            "telephony.externalcall.register"
        );
        assert_eq!(endpoint("crm.something.else"), "other");
    }

    #[test]
    fn scrubbing_hides_every_secret() {
        assert_eq!(
            scrub("error for http://x/rest/1/abc123/profile", ["abc123"]),
            "error for http://x/rest/1/***/profile"
        );
    }
}
