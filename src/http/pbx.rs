//! Endpoints the PBX calls: call events posted by PBXs without AMI, and the routing lookup for
//! the dialplan's `CURL()`.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::error::ApiError;
use super::AppState;
use crate::calls::webhook::parse_events;

/// Checks `Authorization: Bearer <pbx.token>` (or, where allowed, `token=` in the query) in
/// constant time.
fn check_token(
    state: &AppState,
    req: &HttpRequest,
    query_token: Option<&str>,
) -> Result<(), ApiError> {
    let token = &state.config.pbx.token;
    if token.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "PBX endpoints are disabled: pbx.token is not set",
        ));
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or(query_token)
        .unwrap_or("");
    if token.matches(given.trim()) {
        Ok(())
    } else {
        Err(ApiError::field(
            StatusCode::UNAUTHORIZED,
            "Authorization",
            "missing or wrong bearer token",
        ))
    }
}

/// `POST /pbx/events`: one event object or an array; 200 once they are queued for the model.
pub async fn events(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    check_token(&state, &req, None)?;
    let events =
        parse_events(&body).map_err(|errors| ApiError::fields(StatusCode::BAD_REQUEST, errors))?;
    let n = events.len();
    if !state.tracker.webhook(events).await {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "call tracker stopped",
        ));
    }
    // Calls these events finished are in the outbox; make them durable before saying yes.
    state
        .outbox
        .store()
        .flush()
        .await
        .map_err(|e| ApiError::internal(format!("store: {e}")))?;
    Ok(HttpResponse::Ok().json(json!({"success": true, "accepted": n})))
}

/// Longest `phone` / `did` accepted by `/pbx/route`.
const MAX_ROUTE_PARAM: usize = 64;

/// `GET /pbx/route?phone=<caller>&did=<dialled>`: the extension that should take the call, as
/// `text/plain` (the code alone, or an empty body), or JSON with `Accept: application/json`.
pub async fn route(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let params = super::params::unique_query(req.query_string())?;
    let get = |name: &str| params.get(name).map(String::as_str);
    check_token(&state, &req, get("token"))?;
    let mut errors = std::collections::BTreeMap::new();
    for name in ["phone", "did"] {
        if let Some(v) = get(name) {
            if v.len() > MAX_ROUTE_PARAM || v.chars().any(char::is_control) {
                errors.insert(
                    name.to_string(),
                    format!("must be at most {MAX_ROUTE_PARAM} printable characters"),
                );
            }
        }
    }
    let Some(phone) = get("phone") else {
        errors.insert(
            "phone".into(),
            "is required (may be empty for an anonymous caller)".into(),
        );
        return Err(ApiError::fields(StatusCode::BAD_REQUEST, errors));
    };
    if !errors.is_empty() {
        return Err(ApiError::fields(StatusCode::BAD_REQUEST, errors));
    }
    let route = state
        .router
        .route(phone, get("did").filter(|d| !d.is_empty()))
        .await;
    let wants_json = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"));
    Ok(if wants_json {
        HttpResponse::Ok().json(&route)
    } else {
        HttpResponse::Ok()
            .content_type("text/plain; charset=utf-8")
            .insert_header(("X-Route-Source", route.source.as_str()))
            .body(route.code.unwrap_or_default())
    })
}
