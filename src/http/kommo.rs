//! `/kommo/...`: what the pbxgate widget inside Kommo asks from the user's browser.
//!
//! - `POST /kommo/call` (`phone` in a JSON or form body) with the `X-Auth-Token` Kommo's
//!   `$authorizedAjax` adds: the token's user's extension calls the number (click-to-call).
//! - `POST /kommo/stream` with the token: a one-time ticket (`{"ticket", "expiresIn"}`) for…
//! - `GET /kommo/events?ticket=…`: Server-Sent Events, the user's call card now and on every
//!   change, a keep-alive comment in between (an `EventSource` cannot send the token).
//!
//! The token is checked by [`crate::crm::kommo::widget::verify`]; without a valid one the answer
//! is 401 naming `X-Auth-Token` and why, and nothing is originated. CORS: the preflight and
//! the answers carry `Access-Control-Allow-Origin` only for the account's own origin
//! (`kommo.base_url`); a request from any other origin is refused with 403 and gets no CORS
//! header. Only with `crm.kind = "kommo"`; otherwise these paths answer 404.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::{self, CacheControl, CacheDirective, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde_json::json;

use super::params::{unique_query, Params};
use super::{ApiError, AppState};
use crate::base::ident::{normalize_number, ExtensionCode, PhoneNumber};
use crate::click_to_call::{MakeCall, Outcome};
use crate::config::CrmKind;
use crate::crm::kommo::widget::{self, TicketHolder, Tickets, WidgetUser};

pub const CALL: &str = "/kommo/call";
pub const STREAM: &str = "/kommo/stream";
pub const EVENTS: &str = "/kommo/events";
/// The header Kommo's `$authorizedAjax` sends the token in.
pub const TOKEN_HEADER: &str = "X-Auth-Token";
/// Most call-card streams open at once; more are refused with 503.
pub const MAX_STREAMS: usize = 256;
/// A keep-alive comment at least this often.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// A stream ends after this long; the widget gets a new ticket and opens another.
const STREAM_LIFETIME: Duration = Duration::from_secs(600);

/// The widget's tickets and open streams (shared by the server's workers).
#[derive(Default)]
pub struct WidgetState {
    tickets: Tickets,
    streams: Arc<AtomicUsize>,
}

struct StreamSlot(Arc<AtomicUsize>);

impl WidgetState {
    fn admit(&self) -> Option<StreamSlot> {
        let n = self.streams.fetch_add(1, Ordering::SeqCst);
        if n >= MAX_STREAMS {
            self.streams.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(StreamSlot(self.streams.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource(CALL)
            .route(web::post().to(call))
            .route(web::method(actix_web::http::Method::OPTIONS).to(preflight)),
    )
    .service(
        web::resource(STREAM)
            .route(web::post().to(stream_ticket))
            .route(web::method(actix_web::http::Method::OPTIONS).to(preflight)),
    )
    .service(web::resource(EVENTS).route(web::get().to(events)));
}

/// The request's `Origin` is the account's (compared as serialised origins).
fn origin_allowed(req: &HttpRequest, state: &AppState) -> Option<Result<HeaderValue, ()>> {
    let origin = req.headers().get(header::ORIGIN)?;
    let ours = state.config.kommo.origin();
    let given = origin
        .to_str()
        .ok()
        .and_then(|o| url::Url::parse(o).ok())
        .map(|u| u.origin().ascii_serialization());
    Some(match given {
        Some(g) if g == ours => HeaderValue::from_str(&ours).map_err(|_| ()),
        _ => Err(()),
    })
}

/// Adds the CORS headers for the account's origin (and `Vary: Origin` to every answer).
fn with_cors(req: &HttpRequest, state: &AppState, mut res: HttpResponse) -> HttpResponse {
    let h = res.headers_mut();
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(Ok(origin)) = origin_allowed(req, state) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    res
}

fn answer(
    req: &HttpRequest,
    state: &AppState,
    result: Result<HttpResponse, ApiError>,
) -> HttpResponse {
    let res = result.unwrap_or_else(|e| e.error_response());
    with_cors(req, state, res)
}

/// Kommo is the CRM, and the request does not come from another site.
fn admit(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    if state.config.crm.kind != CrmKind::Kommo {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "the Kommo widget's endpoints are on with crm.kind = \"kommo\" only",
        ));
    }
    if let Some(Err(())) = origin_allowed(req, state) {
        return Err(ApiError::field(
            StatusCode::FORBIDDEN,
            "Origin",
            format!(
                "not the Kommo account's origin ({})",
                state.config.kommo.origin()
            ),
        ));
    }
    Ok(())
}

/// The token's user, and their extension.
fn authenticate(req: &HttpRequest, state: &AppState) -> Result<(WidgetUser, String), ApiError> {
    admit(req, state)?;
    let token = req
        .headers()
        .get(TOKEN_HEADER)
        .map(|v| v.to_str().unwrap_or("\u{0}"))
        .unwrap_or("");
    let now = i64::try_from(crate::base::clock::unix_now()).unwrap_or(i64::MAX);
    let user = widget::verify(token, &state.config.kommo, now).map_err(|problem| {
        let status = match problem {
            widget::TokenProblem::NoSecret => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        };
        ApiError::field(status, TOKEN_HEADER, problem.to_string())
    })?;
    let extension =
        widget::extension_of(&state.crm.directory(), user.user_id).ok_or_else(|| {
            ApiError::field(
                StatusCode::CONFLICT,
                "user_id",
                format!(
                    "Kommo user {} has no extension in pbxgate's [[users]]",
                    user.user_id
                ),
            )
        })?;
    Ok((user, extension))
}

/// `OPTIONS` on the widget's endpoints: allowed for the account's origin only.
async fn preflight(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let result = admit(&req, &state).map(|()| match origin_allowed(&req, &state) {
        Some(Ok(_)) => HttpResponse::NoContent()
            .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, "POST, OPTIONS"))
            .insert_header((
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                "X-Auth-Token, Content-Type",
            ))
            .insert_header((header::ACCESS_CONTROL_MAX_AGE, "600"))
            .finish(),
        _ => HttpResponse::NoContent().finish(),
    });
    answer(&req, &state, result)
}

/// `POST /kommo/call`: the token's user calls `phone` from their extension.
async fn call(req: HttpRequest, state: web::Data<AppState>, body: web::Bytes) -> HttpResponse {
    let result = async {
        let (user, extension) = authenticate(&req, &state)?;
        let params = Params::from_request(&req, &body)?;
        let phone = PhoneNumber::parse(&normalize_number(params.require("phone")?))
            .map_err(|e| ApiError::bad_field("phone", e.to_string()))?;
        let code = ExtensionCode::parse(&extension).map_err(|e| {
            ApiError::field(
                StatusCode::CONFLICT,
                "user_id",
                format!("the extension configured for this user is not valid: {e}"),
            )
        })?;
        let request = MakeCall {
            code,
            phone,
            user_id: user.user_id,
            external_phone: None,
            context: None,
        };
        let answer = match state.click_to_call.call(request).await? {
            Outcome::Originated { call_id } => json!({"success": true, "callId": call_id}),
            Outcome::Duplicate => json!({"success": true, "duplicate": true}),
        };
        Ok(HttpResponse::Ok().json(answer))
    }
    .await;
    answer(&req, &state, result)
}

/// `POST /kommo/stream`: a ticket to open the user's call-card stream with.
async fn stream_ticket(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let result = authenticate(&req, &state).and_then(|(user, extension)| {
        let holder = TicketHolder {
            user_id: user.user_id,
            extension,
        };
        let ticket = state
            .kommo
            .tickets
            .issue(holder, Instant::now())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many stream tickets waiting; try again in a minute",
                )
            })?;
        Ok(HttpResponse::Ok()
            .insert_header(CacheControl(vec![CacheDirective::NoStore]))
            .json(json!({"ticket": ticket, "expiresIn": widget::TICKET_TTL.as_secs()})))
    });
    answer(&req, &state, result)
}

fn card_event(card: &widget::Card) -> String {
    let data = serde_json::to_string(card).unwrap_or_else(|_| "{}".into());
    format!("event: card\ndata: {data}\n\n")
}

/// `GET /kommo/events?ticket=…`: the user's card now, then on every change of it.
async fn events(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let result = (|| {
        admit(&req, &state)?;
        let query = unique_query(req.query_string())?;
        let holder = query
            .get("ticket")
            .filter(|t| t.len() <= 128)
            .and_then(|t| state.kommo.tickets.redeem(t, Instant::now()))
            .ok_or_else(|| {
                ApiError::field(
                    StatusCode::UNAUTHORIZED,
                    "ticket",
                    "unknown, used or expired: ask POST /kommo/stream for a new one",
                )
            })?;
        let slot = state.kommo.admit().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("too many call-card streams open (at most {MAX_STREAMS})"),
            )
        })?;
        Ok(stream(&state, holder, slot))
    })();
    answer(&req, &state, result)
}

fn stream(state: &AppState, holder: TicketHolder, slot: StreamSlot) -> HttpResponse {
    struct Feed {
        live: tokio::sync::watch::Receiver<Arc<Vec<crate::calls::LiveCall>>>,
        extension: String,
        origin: String,
        last: Option<Vec<(String, widget::CardState)>>,
        until: tokio::time::Instant,
        _slot: StreamSlot,
    }
    impl Feed {
        /// The card now, and whether it differs from the last one sent.
        fn card(&mut self) -> (widget::Card, bool) {
            let calls = self.live.borrow_and_update().clone();
            let card = widget::card(
                &calls,
                &self.extension,
                &self.origin,
                crate::base::clock::now_ms(),
            );
            let key: Vec<_> = card
                .key()
                .into_iter()
                .map(|(id, s)| (id.to_string(), s))
                .collect();
            let changed = self.last.as_ref() != Some(&key);
            self.last = Some(key);
            (card, changed)
        }
    }
    tracing::debug!(
        user_id = holder.user_id,
        extension = %holder.extension,
        "kommo widget stream opened"
    );
    let feed = Feed {
        live: state.tracker.live_changes(),
        extension: holder.extension,
        origin: state.config.kommo.origin(),
        last: None,
        until: tokio::time::Instant::now() + STREAM_LIFETIME,
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(feed, |mut f| async move {
        if f.last.is_none() {
            let (card, _) = f.card();
            let bytes = format!("retry: 3000\n\n{}", card_event(&card));
            return Some((Ok::<_, actix_web::Error>(web::Bytes::from(bytes)), f));
        }
        loop {
            let left = f
                .until
                .saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let wait = KEEP_ALIVE.min(left);
            let changed = tokio::select! {
                r = f.live.changed() => r.is_ok(),
                _ = tokio::time::sleep(wait) => false,
            };
            if !changed {
                if tokio::time::Instant::now() >= f.until {
                    return None;
                }
                if f.live.has_changed().is_err() {
                    // The tracker is gone: the service is stopping.
                    return None;
                }
                return Some((Ok(web::Bytes::from_static(b": keep-alive\n\n")), f));
            }
            // Several changes in a row make one update.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (card, changed) = f.card();
            if changed {
                return Some((Ok(web::Bytes::from(card_event(&card))), f));
            }
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(CacheControl(vec![CacheDirective::NoCache]))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(stream)
}
