//! retailCRM API v5 client: typed methods for the telephony surface, the exact wire format
//! (`X-API-KEY` header; POST bodies form-encoded with a JSON string in one named field), lenient
//! answer parsing, typed errors, a per-key rate limiter and retries for transient failures.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderValue, RETRY_AFTER};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::error::{body_prefix, classify};
use super::lenient;
use super::limiter::RateLimiter;
use super::wire::*;
use super::CrmError;
use crate::base::backoff::backoff;
use crate::base::secret::Secret;
use crate::config::CrmConfig;

/// Answers larger than this are refused rather than buffered.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// Cheap to clone; clones share the rate limiters (they are per API key).
#[derive(Clone)]
pub struct CrmClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: String,
    api_key: Secret,
    general: RateLimiter,
    telephony: RateLimiter,
    max_retries: u32,
    retry_base: Duration,
    retry_max: Duration,
    /// Bumped by every successful request: whoever backs off after a failure can stop waiting
    /// once the CRM answers again.
    successes: tokio::sync::watch::Sender<u64>,
    /// Timings by endpoint and status; whether the CRM refuses the key.
    requests: crate::base::latency::CrmRequests,
}

/// Retries of failed requests are logged at most this often (with the number held back).
static RETRY_LOG: crate::telemetry::RateLimit =
    crate::telemetry::RateLimit::new(Duration::from_secs(10));

impl std::fmt::Debug for CrmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrmClient")
            .field("base", &self.inner.base)
            .field("api_key", &self.inner.api_key)
            .finish()
    }
}

type Params<'a> = [(&'a str, String)];

impl CrmClient {
    pub fn new(cfg: &CrmConfig) -> Result<Self, CrmError> {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("pbxgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CrmError::from_reqwest(&e))?;
        Ok(CrmClient {
            inner: Arc::new(Inner {
                http,
                base: cfg.url.trim_end_matches('/').to_string(),
                api_key: cfg.api_key.clone(),
                general: RateLimiter::per_second(cfg.rps),
                telephony: RateLimiter::per_second(cfg.telephony_rps),
                max_retries: cfg.max_retries,
                retry_base: cfg.retry_base,
                retry_max: cfg.retry_max,
                successes: tokio::sync::watch::Sender::new(0),
                requests: crate::base::latency::CrmRequests::default(),
            }),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.inner.base
    }

    pub fn is_configured(&self) -> bool {
        !self.inner.api_key.is_empty()
    }

    /// Changes whenever a request succeeds. After an outage, the first request to get through
    /// (a live event, a routing lookup) tells the others that the CRM is back, so that backlogs
    /// do not wait out their backoff.
    pub fn successes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.successes.subscribe()
    }

    /// Every request's time by endpoint template and HTTP status, and whether the CRM's last
    /// answer refused the key or the account.
    pub fn requests(&self) -> &crate::base::latency::CrmRequests {
        &self.inner.requests
    }

    // -----------------------------------------------------------------------------------------
    // Methods

    /// `POST /api/v5/integration-modules/{code}/edit` (creates or updates the module).
    pub async fn integration_module_edit(
        &self,
        module: &IntegrationModule,
    ) -> Result<ModuleEditResponse, CrmError> {
        let code = module.code.as_deref().unwrap_or_default();
        let path = format!("/api/v5/integration-modules/{}/edit", path_segment(code));
        self.post(&path, &[("integrationModule", to_json(module)?)])
            .await
    }

    /// `GET /api/v5/integration-modules/{code}`.
    pub async fn integration_module(
        &self,
        code: &str,
    ) -> Result<Option<IntegrationModule>, CrmError> {
        let path = format!("/api/v5/integration-modules/{}", path_segment(code));
        let r: ModuleGetResponse = self.get(&path, &[]).await?;
        Ok(r.integration_module)
    }

    /// `GET /api/v5/telephony/manager`: the manager responsible for a customer's phone.
    pub async fn telephony_manager(
        &self,
        phone: &str,
        details: bool,
        ignore_status: bool,
    ) -> Result<ManagerResponse, CrmError> {
        let query = [
            ("phone", phone.to_string()),
            ("details", flag(details)),
            ("ignoreStatus", flag(ignore_status)),
        ];
        self.get("/api/v5/telephony/manager", &query).await
    }

    /// `POST /api/v5/telephony/call/event`: a pop-up or a hangup.
    pub async fn call_event(&self, event: &CallEvent) -> Result<CallEventResponse, CrmError> {
        self.post(
            "/api/v5/telephony/call/event",
            &[("event", to_json(event)?)],
        )
        .await
    }

    /// `POST /api/v5/telephony/calls/upload`: at most [`MAX_CALLS_PER_UPLOAD`] calls.
    pub async fn calls_upload(&self, calls: &[Call]) -> Result<CallsUploadResponse, CrmError> {
        if calls.len() > MAX_CALLS_PER_UPLOAD {
            return Err(CrmError::TooManyCalls {
                got: calls.len(),
                max: MAX_CALLS_PER_UPLOAD,
            });
        }
        if calls.is_empty() {
            return Ok(CallsUploadResponse {
                processed_calls_count: Some(0),
                duplicate_calls: Vec::new(),
            });
        }
        self.post(
            "/api/v5/telephony/calls/upload",
            &[("calls", to_json(calls)?)],
        )
        .await
    }

    /// `POST /api/v5/tasks/create`: a follow-up task; its id in the CRM.
    pub async fn tasks_create(&self, task: &Task) -> Result<TaskCreateResponse, CrmError> {
        self.post("/api/v5/tasks/create", &[("task", to_json(task)?)])
            .await
    }

    /// `POST /api/v5/users/{id}/status`.
    pub async fn user_status(&self, user_id: i64, status: UserStatus) -> Result<(), CrmError> {
        let path = format!("/api/v5/users/{user_id}/status");
        let _: Empty = self
            .post(&path, &[("status", status.as_str().to_string())])
            .await?;
        Ok(())
    }

    /// `GET /api/v5/settings`: the account's settings (its time zone).
    pub async fn settings(&self) -> Result<SettingsResponse, CrmError> {
        self.get("/api/v5/settings", &[]).await
    }

    /// `GET /api/credentials`: what this key may do.
    pub async fn credentials(&self) -> Result<Credentials, CrmError> {
        self.get("/api/credentials", &[]).await
    }

    // -----------------------------------------------------------------------------------------
    // Transport

    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &Params<'_>,
    ) -> Result<T, CrmError> {
        self.request(Method::GET, path, query, None).await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        form: &Params<'_>,
    ) -> Result<T, CrmError> {
        self.request(Method::POST, path, &[], Some(form)).await
    }

    async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &Params<'_>,
        form: Option<&Params<'_>>,
    ) -> Result<T, CrmError> {
        let inner = &self.inner;
        if inner.api_key.is_empty() {
            return Err(CrmError::NotConfigured);
        }
        let limiter = if path.starts_with("/api/v5/telephony/") {
            &inner.telephony
        } else {
            &inner.general
        };
        let mut attempt = 0;
        let mut others_ok = inner.successes.subscribe();
        loop {
            limiter.acquire().await;
            others_ok.mark_unchanged();
            let sent = self.send_once(method.clone(), path, query, form).await;
            match &sent {
                Ok(_) => inner.requests.set_rejected(None),
                Err(e @ (CrmError::Auth { .. } | CrmError::AccountNotFound { .. })) => {
                    inner.requests.set_rejected(Some(e.to_string()))
                }
                Err(_) => {}
            }
            match sent {
                Err(e) if e.is_retriable() && attempt < inner.max_retries => {
                    let mut delay = backoff(attempt, inner.retry_base, inner.retry_max);
                    let rate_limited = matches!(e, CrmError::RateLimited { .. });
                    if let CrmError::RateLimited {
                        retry_after: Some(after),
                        ..
                    } = &e
                    {
                        delay = delay.max((*after).min(inner.retry_max));
                    }
                    if let Some(suppressed) = RETRY_LOG.check() {
                        tracing::warn!(%method, path, attempt = attempt + 1, delay_ms = delay.as_millis() as u64,
                            error = %e, suppressed, "CRM request failed, retrying");
                    } else {
                        tracing::debug!(%method, path, attempt = attempt + 1, error = %e, "CRM request failed, retrying");
                    }
                    // Another request getting through ends the wait (not a rate limit's).
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        Ok(()) = others_ok.changed(), if !rate_limited => {}
                    }
                    attempt += 1;
                }
                Err(e) => {
                    tracing::debug!(%method, path, error = %e, "CRM request failed");
                    return Err(e);
                }
                Ok(v) => {
                    inner.successes.send_modify(|n| *n = n.wrapping_add(1));
                    return Ok(v);
                }
            }
        }
    }

    /// One request, timed for `/metrics` (by its path template and the HTTP status).
    async fn send_once<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &Params<'_>,
        form: Option<&Params<'_>>,
    ) -> Result<T, CrmError> {
        let started = std::time::Instant::now();
        let mut status = None;
        let result = self.exchange(method, path, query, form, &mut status).await;
        self.inner
            .requests
            .observe(endpoint(path), status, started.elapsed());
        result
    }

    async fn exchange<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &Params<'_>,
        form: Option<&Params<'_>>,
        answered: &mut Option<u16>,
    ) -> Result<T, CrmError> {
        let inner = &self.inner;
        let mut key =
            HeaderValue::from_str(inner.api_key.expose()).map_err(|_| CrmError::Auth {
                status: 0,
                message: "crm.api_key is not a valid header value".into(),
            })?;
        key.set_sensitive(true);
        let mut req = inner
            .http
            .request(method, format!("{}{}", inner.base, path))
            .header("X-API-KEY", key);
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(form) = form {
            req = req.form(form);
        }
        let mut resp = req.send().await.map_err(|e| CrmError::from_reqwest(&e))?;
        let status = resp.status().as_u16();
        *answered = Some(status);
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);

        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| CrmError::from_reqwest(&e))? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(CrmError::Decode {
                    status,
                    reason: format!("answer larger than {MAX_ANSWER_BYTES} bytes"),
                    body: body_prefix(&body),
                });
            }
            body.extend_from_slice(&chunk);
        }

        let parsed: Option<Value> = serde_json::from_slice(&body).ok();
        let success = parsed
            .as_ref()
            .and_then(|v| v.get("success"))
            .and_then(lenient::value_to_bool);
        if status >= 400 || success == Some(false) {
            return Err(classify(status, &body, parsed.as_ref(), retry_after));
        }
        let Some(value) = parsed else {
            return Err(CrmError::Decode {
                status,
                reason: "answer is not JSON".into(),
                body: body_prefix(&body),
            });
        };
        serde_json::from_value(value).map_err(|e| CrmError::Decode {
            status,
            reason: e.to_string(),
            body: body_prefix(&body),
        })
    }
}

/// A request's path as a template: ids and codes in it become `:placeholders` (no braces,
/// which naive text-format parsers take for the end of the labels), so that the
/// endpoint label stays bounded (and never carries more than the path names).
fn endpoint(path: &str) -> &'static str {
    const FIXED: [&str; 6] = [
        "/api/v5/telephony/manager",
        "/api/v5/telephony/call/event",
        "/api/v5/telephony/calls/upload",
        "/api/v5/tasks/create",
        "/api/v5/settings",
        "/api/credentials",
    ];
    if let Some(fixed) = FIXED.iter().find(|f| **f == path) {
        return fixed;
    }
    if let Some(rest) = path.strip_prefix("/api/v5/integration-modules/") {
        return if rest.ends_with("/edit") {
            "/api/v5/integration-modules/:code/edit"
        } else {
            "/api/v5/integration-modules/:code"
        };
    }
    if path.starts_with("/api/v5/users/") && path.ends_with("/status") {
        return "/api/v5/users/:id/status";
    }
    "other"
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String, CrmError> {
    serde_json::to_string(value).map_err(|e| CrmError::Decode {
        status: 0,
        reason: e.to_string(),
        body: String::new(),
    })
}

fn flag(b: bool) -> String {
    if b { "1" } else { "0" }.to_string()
}

/// Percent-encodes one path segment (module codes are validated, but never trust a path).
fn path_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::endpoint;

    #[test]
    fn endpoints_are_path_templates() {
        assert_eq!(
            endpoint("/api/v5/telephony/calls/upload"),
            "/api/v5/telephony/calls/upload"
        );
        assert_eq!(
            endpoint("/api/v5/integration-modules/pbxgate-abc/edit"),
            "/api/v5/integration-modules/:code/edit"
        );
        assert_eq!(
            endpoint("/api/v5/integration-modules/pbxgate-abc"),
            "/api/v5/integration-modules/:code"
        );
        assert_eq!(
            endpoint("/api/v5/users/42/status"),
            "/api/v5/users/:id/status"
        );
        assert_eq!(endpoint("/api/v5/unheard-of?apiKey=x"), "other");
    }
}
