//! Endpoints the PBX calls: call events posted by PBXs without AMI.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::error::ApiError;
use super::AppState;
use crate::calls::webhook::parse_events;

/// Checks `Authorization: Bearer <pbx.token>` in constant time.
fn check_token(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    let token = &state.config.pbx.token;
    if token.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "PBX events are disabled: pbx.token is not set",
        ));
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
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
    check_token(&state, &req)?;
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
