//! Endpoints retailCRM calls: the module's activity, click-to-call, user status.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::error::ApiError;
use super::params::Params;
use super::AppState;
use crate::crm::retailcrm::lenient::value_to_bool;
use crate::store::Activity;

/// `POST {baseUrl}/crm/activity` — form `clientId`, `activity` = `{"active":bool,"freeze":bool}`,
/// optional `systemUrl`. The state is stored durably before we answer.
pub async fn activity(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let params = Params::from_request(&req, &body)?;
    params.check_client_id(&state.client_id)?;

    let raw = params.require("activity")?;
    let value: Value = serde_json::from_str(raw)
        .map_err(|e| ApiError::bad_field("activity", format!("is not JSON: {e}")))?;
    let field = |name: &str| -> Result<bool, ApiError> {
        value
            .get(name)
            .and_then(value_to_bool)
            .ok_or_else(|| ApiError::bad_field("activity", format!("needs a boolean \"{name}\"")))
    };
    let (active, freeze) = (field("active")?, field("freeze")?);

    let system_url = match params
        .get("systemUrl")
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        None => None,
        Some(u) => match url::Url::parse(u) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => Some(u.to_string()),
            _ => return Err(ApiError::bad_field("systemUrl", "is not an http(s) URL")),
        },
    };
    if let Some(u) = &system_url {
        if u.trim_end_matches('/') != state.config.crm.url.trim_end_matches('/') {
            tracing::warn!(system_url = %u, configured = %state.config.crm.url,
                "retailCRM reports a different account URL than crm.url; update the config");
        }
    }

    let previous = state
        .store
        .activity()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let next = Activity::new(active, freeze, system_url);
    state
        .store
        .set_activity(&next)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    // Uploads paused by an inactive module resume by themselves.
    state.outbox.kick();
    if previous.may_push() != next.may_push() {
        tracing::warn!(
            active,
            freeze,
            "module activity changed: pushing to the CRM is now {}",
            if next.may_push() {
                "on"
            } else {
                "paused (calls keep being queued)"
            }
        );
    } else {
        tracing::info!(active, freeze, "module activity confirmed");
    }
    Ok(HttpResponse::Ok().json(json!({"success": true})))
}

/// `makeCallUrl` — click-to-call: check clientId, validate, originate; 200 once Asterisk accepts.
pub async fn make_call(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let params = Params::from_request(&req, &body)?;
    params.check_client_id(&state.client_id)?;
    let answer = crate::click_to_call::handle(&state.click_to_call, &params).await?;
    Ok(HttpResponse::Ok().json(answer))
}

/// `changeUserStatusUrl` — a manager's status changed in the CRM: stored, then mirrored on the PBX.
pub async fn user_status(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let params = Params::from_request(&req, &body)?;
    params.check_client_id(&state.client_id)?;
    let answer = state.manager_status.handle(&params).await?;
    Ok(HttpResponse::Ok().json(answer))
}
