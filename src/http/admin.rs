//! `/admin/...`: the dashboard's API, its live updates (Server-Sent Events), the login form's
//! cookie, and the dashboard's assets. What the operations do is in [`crate::admin`].
//!
//! Access ([`crate::admin::access`]): with `admin.token` set, every admin route wants
//! `Authorization: Bearer <token>` or the cookie `POST /admin/login` sets (HttpOnly,
//! SameSite=Strict, derived from the token). Without a token the routes are open while
//! `http.listen` is a loopback address, and answer 403 otherwise.
//!
//! Cross-site requests: a POST that is not authorised by a Bearer token (the cookie, or the
//! open loopback mode) must carry the header `X-Pbxgate-Admin: 1`. A page of another site
//! cannot add a custom header without a CORS preflight, which pbxgate never allows, so it
//! cannot make a browser act on the admin API.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, CacheControl, CacheDirective};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::admin::{session_value, Access, Admin, OpError};
use crate::base::secret::Secret;

const DASHBOARD_JS: &str = include_str!("../../static/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("../../static/dashboard.css");

/// The login form's cookie.
pub const COOKIE: &str = "pbxgate_admin";
/// The header state-changing requests without a Bearer token must carry.
pub const CSRF_HEADER: &str = "x-pbxgate-admin";
/// Most live-update streams open at once; more are refused with 503.
pub const MAX_STREAMS: usize = 32;
/// A snapshot at least this often, and a keep-alive comment with it.
const STREAM_PERIOD: Duration = Duration::from_secs(3);
/// A stream ends after this long; the browser reconnects by itself.
const STREAM_LIFETIME: Duration = Duration::from_secs(600);
/// Finished calls in each live snapshot.
const SNAPSHOT_RECENT: usize = 100;

/// The open live-update streams (shared by the server's workers).
#[derive(Debug, Default)]
pub struct Streams(Arc<AtomicUsize>);

struct StreamSlot(Arc<AtomicUsize>);

impl Streams {
    fn admit(&self) -> Option<StreamSlot> {
        let n = self.0.fetch_add(1, Ordering::SeqCst);
        if n >= MAX_STREAMS {
            self.0.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(StreamSlot(self.0.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/static/dashboard.js").route(web::get().to(dashboard_js)))
        .service(web::resource("/static/dashboard.css").route(web::get().to(dashboard_css)))
        .service(web::resource("/admin/login").route(web::post().to(login)))
        .service(web::resource("/admin/logout").route(web::post().to(logout)))
        .service(web::resource("/admin/events").route(web::get().to(events)))
        .service(web::resource("/admin/api/status").route(web::get().to(status)))
        .service(web::resource("/admin/api/config").route(web::get().to(config)))
        .service(web::resource("/admin/api/calls").route(web::get().to(calls)))
        .service(web::resource("/admin/api/queue").route(web::get().to(queue)))
        .service(web::resource("/admin/api/queue/retry-dead").route(web::post().to(retry_dead)))
        .service(web::resource("/admin/api/queue/{external_id}/retry").route(web::post().to(retry)))
        .service(
            web::resource("/admin/api/queue/{external_id}/discard").route(web::post().to(discard)),
        )
        .service(
            web::resource("/admin/api/calls/{external_id}/resend").route(web::post().to(resend)),
        )
        .service(web::resource("/admin/api/register").route(web::post().to(register)))
        .service(web::resource("/admin/api/check").route(web::post().to(check)))
        .service(web::resource("/admin/api/call").route(web::post().to(call)));
}

fn admin(state: &AppState) -> Admin {
    Admin {
        config: state.config.clone(),
        store: state.store.clone(),
        crm: state.crm.clone(),
        registration: state.registration.clone(),
        tracker: state.tracker.clone(),
        recent_calls: state.recent_calls.clone(),
        outbox: state.outbox.clone(),
        records: state.records.clone(),
    }
}

fn access(state: &AppState) -> Access {
    crate::admin::access(&state.config.http.listen, &state.config.admin.token)
}

fn cookie<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Lets the request through, or says why not. `changes`: the request changes something (a
/// POST): without a Bearer token it must carry [`CSRF_HEADER`].
fn authorize(req: &HttpRequest, state: &AppState, changes: bool) -> Result<(), ApiError> {
    let token = &state.config.admin.token;
    let by_bearer = match access(state) {
        Access::Refused(why) => return Err(ApiError::new(StatusCode::FORBIDDEN, why)),
        Access::Open => false,
        Access::Token => {
            if bearer(req).is_some_and(|t| token.matches(t)) {
                true
            } else if cookie(req, COOKIE)
                .is_some_and(|c| Secret::new(session_value(token)).matches(c))
            {
                false
            } else {
                let mut e = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "the admin token is required (Authorization: Bearer <admin.token>, or log in at /)",
                );
                e.errors.insert("token".into(), "missing or wrong".into());
                return Err(e);
            }
        }
    };
    if changes && !by_bearer && req.headers().get(CSRF_HEADER).is_none_or(|v| v != "1") {
        return Err(ApiError::field(
            StatusCode::FORBIDDEN,
            CSRF_HEADER,
            "required (value 1) on requests without a Bearer token",
        ));
    }
    Ok(())
}

fn op_error(e: OpError) -> ApiError {
    match e {
        OpError::NotFound(m) => ApiError::field(StatusCode::NOT_FOUND, "external_id", m),
        OpError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
        OpError::Failed(m) => ApiError::new(StatusCode::BAD_GATEWAY, m),
    }
}

/// `/ready`'s body.
async fn ready_body(state: web::Data<AppState>) -> Value {
    let res = super::status::ready(state).await;
    match actix_web::body::to_bytes(res.into_body()).await {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

fn no_store(mut res: HttpResponse) -> HttpResponse {
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    res
}

fn asset(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(CacheControl(vec![CacheDirective::NoCache]))
        .body(body)
}

async fn dashboard_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS)
}

async fn dashboard_css() -> HttpResponse {
    asset("text/css; charset=utf-8", DASHBOARD_CSS)
}

#[derive(serde::Deserialize)]
struct Login {
    token: String,
}

/// `POST /admin/login` with `{"token": ...}` (or a form field `token`): sets the cookie.
async fn login(state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    let token = match access(&state) {
        Access::Refused(why) => return Err(ApiError::new(StatusCode::FORBIDDEN, why)),
        Access::Open => return Ok(HttpResponse::Ok().json(json!({"access": "open"}))),
        Access::Token => &state.config.admin.token,
    };
    let given: Login = serde_json::from_slice(&body)
        .ok()
        .or_else(|| serde_urlencoded::from_bytes(&body).ok())
        .ok_or_else(|| ApiError::bad_field("token", "required: {\"token\": \"...\"}"))?;
    if !token.matches(&given.token) {
        return Err(ApiError::field(
            StatusCode::UNAUTHORIZED,
            "token",
            "not the admin token",
        ));
    }
    let secure = if state.config.http.public_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    tracing::info!("admin login");
    Ok(no_store(
        HttpResponse::Ok()
            .insert_header((
                header::SET_COOKIE,
                format!(
                    "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{secure}",
                    session_value(token)
                ),
            ))
            .json(json!({"access": "token"})),
    ))
}

/// `POST /admin/logout`: clears the cookie.
async fn logout() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
        ))
        .json(json!({"access": "logged out"}))
}

async fn status(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, false)?;
    Ok(no_store(HttpResponse::Ok().json(ready_body(state).await)))
}

async fn config(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, false)?;
    Ok(no_store(
        HttpResponse::Ok().json(admin(&state).config_view()),
    ))
}

async fn calls(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, false)?;
    let calls = admin(&state).calls(usize::MAX);
    Ok(no_store(HttpResponse::Ok().json(json!({"calls": calls}))))
}

async fn queue(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, false)?;
    let query = super::params::unique_query(req.query_string())?;
    let only = match query.get("state").map(String::as_str) {
        None => None,
        Some("pending") => Some(crate::outbox::store::State::Pending),
        Some("dead") => Some(crate::outbox::store::State::Dead),
        Some(_) => return Err(ApiError::bad_field("state", "must be pending or dead")),
    };
    let limit = match query.get("limit") {
        None => crate::admin::QUEUE_LIMIT,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=crate::admin::QUEUE_MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_field(
                    "limit",
                    format!(
                        "must be a number from 1 to {}",
                        crate::admin::QUEUE_MAX_LIMIT
                    ),
                )
            })?,
    };
    let queue = admin(&state).queue_of(only, limit).map_err(op_error)?;
    Ok(no_store(HttpResponse::Ok().json(queue)))
}

/// `POST /admin/api/queue/retry-dead`: every dead record back to pending.
async fn retry_dead(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, true)?;
    let done = admin(&state).retry_dead().await.map_err(op_error)?;
    Ok(HttpResponse::Ok().json(done))
}

fn external_id(path: &str) -> Result<&str, ApiError> {
    if path.is_empty() || path.len() > 200 || path.chars().any(char::is_control) {
        return Err(ApiError::bad_field(
            "external_id",
            "must be 1 to 200 printable characters",
        ));
    }
    Ok(path)
}

async fn retry(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, true)?;
    let done = admin(&state)
        .retry(external_id(&path)?)
        .await
        .map_err(op_error)?;
    Ok(HttpResponse::Ok().json(done))
}

async fn discard(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, true)?;
    let done = admin(&state)
        .discard(external_id(&path)?)
        .await
        .map_err(op_error)?;
    Ok(HttpResponse::Ok().json(done))
}

async fn resend(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, true)?;
    let done = admin(&state)
        .resend(external_id(&path)?)
        .await
        .map_err(op_error)?;
    Ok(HttpResponse::Ok().json(done))
}

async fn register(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, true)?;
    let done = admin(&state).register().await.map_err(op_error)?;
    Ok(HttpResponse::Ok().json(done))
}

async fn check(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, true)?;
    let lines = admin(&state).check().await;
    let ok = lines.iter().all(|l| l.ok);
    Ok(HttpResponse::Ok().json(json!({"ok": ok, "lines": lines})))
}

/// Click-to-call from the dashboard: `{"code": "101", "phone": "+4930555123", "userId": 7}`
/// (`userId` optional: the CRM user of that extension). The same originate as the CRM's
/// `makeCallUrl`, with its limits and deduplication.
async fn call(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    use crate::base::ident::{normalize_number, ExtensionCode, PhoneNumber};
    use crate::click_to_call::{MakeCall, Outcome};
    authorize(&req, &state, true)?;
    let bad =
        |field: &str, problem: String| ApiError::field(StatusCode::BAD_REQUEST, field, problem);
    let body: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
        )
    })?;
    let text = |key: &str| {
        body.get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .unwrap_or("")
    };
    let code = ExtensionCode::parse(text("code")).map_err(|e| bad("code", e.to_string()))?;
    let phone = PhoneNumber::parse(&normalize_number(text("phone")))
        .map_err(|e| bad("phone", e.to_string()))?;
    let user_id = match body.get("userId") {
        None | Some(Value::Null) => state
            .crm
            .directory()
            .into_iter()
            .find(|d| d.code == code.as_str())
            .map(|d| d.user_id)
            .ok_or_else(|| {
                bad(
                    "userId",
                    format!("no CRM user has extension {}: give userId", code.as_str()),
                )
            })?,
        Some(v) => v
            .as_i64()
            .filter(|id| *id >= 1)
            .ok_or_else(|| bad("userId", "must be a positive integer".into()))?,
    };
    let request = MakeCall {
        code,
        phone,
        user_id,
        external_phone: None,
        context: None,
    };
    let answer = match state.click_to_call.call(request).await? {
        Outcome::Originated { call_id } => json!({"success": true, "callId": call_id}),
        Outcome::Duplicate => json!({"success": true, "duplicate": true}),
    };
    Ok(HttpResponse::Ok().json(answer))
}

/// What each live update carries.
async fn snapshot(state: &web::Data<AppState>) -> Value {
    let admin = admin(state);
    let calls = admin.calls(SNAPSHOT_RECENT);
    json!({
        "status": ready_body(state.clone()).await,
        "calls": calls,
        "queue": admin.queue().unwrap_or_else(|e| json!({"status": state.outbox.status(), "error": e.to_string()})),
    })
}

/// A change of `rx`; never, once its sender is gone (the service is stopping).
async fn changed<T>(rx: &mut tokio::sync::watch::Receiver<T>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn event(data: &Value) -> web::Bytes {
    web::Bytes::from(format!("event: snapshot\ndata: {data}\n\n"))
}

/// `GET /admin/events`: a snapshot now, then whenever calls or the queue change (at most a few
/// a second) and every few seconds, each after a keep-alive comment.
async fn events(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state, false)?;
    let Some(slot) = state.admin_streams.admit() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many live-update streams open (at most {MAX_STREAMS})"),
        ));
    };
    struct Feed {
        state: web::Data<AppState>,
        recent: tokio::sync::watch::Receiver<u64>,
        live: tokio::sync::watch::Receiver<Arc<Vec<crate::calls::LiveCall>>>,
        queue: tokio::sync::watch::Receiver<u64>,
        first: bool,
        until: tokio::time::Instant,
        _slot: StreamSlot,
    }
    let feed = Feed {
        recent: state.recent_calls.subscribe(),
        live: state.tracker.live_changes(),
        queue: state.outbox.subscribe_changes(),
        state: state.clone(),
        first: true,
        until: tokio::time::Instant::now() + STREAM_LIFETIME,
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(feed, |mut f| async move {
        if f.first {
            f.first = false;
            let mut bytes = b"retry: 2000\n\n".to_vec();
            bytes.extend_from_slice(&event(&snapshot(&f.state).await));
            return Some((Ok::<_, actix_web::Error>(web::Bytes::from(bytes)), f));
        }
        if tokio::time::Instant::now() >= f.until {
            return None;
        }
        let periodic = tokio::select! {
            _ = changed(&mut f.recent) => false,
            _ = changed(&mut f.live) => false,
            _ = changed(&mut f.queue) => false,
            _ = tokio::time::sleep(STREAM_PERIOD) => true,
        };
        if !periodic {
            // Several changes in a row make one update.
            tokio::time::sleep(Duration::from_millis(100)).await;
            f.recent.mark_unchanged();
            f.live.mark_unchanged();
            f.queue.mark_unchanged();
        }
        let mut bytes = if periodic {
            b": keep-alive\n\n".to_vec()
        } else {
            Vec::new()
        };
        bytes.extend_from_slice(&event(&snapshot(&f.state).await));
        Some((Ok(web::Bytes::from(bytes)), f))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(CacheControl(vec![CacheDirective::NoCache]))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(stream))
}
