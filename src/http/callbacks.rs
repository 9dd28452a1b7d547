//! Endpoints retailCRM calls: the module's activity, click-to-call, user status. Each reads and
//! checks retailCRM's parameters here, then hands a plain request to its feature.

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::error::ApiError;
use super::params::Params;
use super::AppState;
use crate::base::ident::{normalize_number, ExtensionCode, PhoneNumber};
use crate::click_to_call::{MakeCall, Outcome};
use crate::crm::retailcrm::lenient::value_to_bool;
use crate::crm::UserStatus;
use crate::manager_status::StatusChange;
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
    let call = make_call_request(&params)?;
    let answer = match state.click_to_call.call(call).await? {
        Outcome::Originated { call_id } => json!({"success": true, "callId": call_id}),
        Outcome::Duplicate => json!({"success": true, "duplicate": true}),
    };
    Ok(HttpResponse::Ok().json(answer))
}

/// Reads and checks `makeCallUrl`'s parameters (`code`, `phone`, `userId`, optional
/// `externalPhone`); every problem is reported with its field, the first one per field.
fn make_call_request(params: &Params) -> Result<MakeCall, ApiError> {
    let mut errors = BTreeMap::new();
    let mut need = |key: &str| match params.get(key).map(str::trim).filter(|v| !v.is_empty()) {
        Some(v) => Some(v.to_string()),
        None => {
            errors.insert(key.to_string(), "is required".to_string());
            None
        }
    };
    let code = need("code");
    let phone = need("phone");
    let user_id = need("userId");
    let code = code.and_then(|c| match ExtensionCode::parse(&c) {
        Ok(code) => Some(code),
        Err(e) => {
            errors.insert("code".into(), e.to_string());
            None
        }
    });
    let phone = phone.and_then(|p| match PhoneNumber::parse(&normalize_number(&p)) {
        Ok(phone) => Some(phone),
        Err(e) => {
            errors.insert("phone".into(), e.to_string());
            None
        }
    });
    let user_id = user_id.and_then(|u| match u.parse::<i64>() {
        Ok(id) if id >= 1 => Some(id),
        _ => {
            errors.insert("userId".into(), "must be a positive integer".into());
            None
        }
    });
    let external_phone = match params
        .get("externalPhone")
        .map(normalize_number)
        .filter(|p| !p.is_empty())
    {
        None => None,
        Some(p) => match PhoneNumber::parse(&p) {
            Ok(phone) => Some(phone),
            Err(e) => {
                errors.insert("externalPhone".into(), e.to_string());
                None
            }
        },
    };
    match (code, phone, user_id) {
        (Some(code), Some(phone), Some(user_id)) if errors.is_empty() => Ok(MakeCall {
            code,
            phone,
            user_id,
            external_phone,
            context: None,
        }),
        _ => Err(ApiError::fields(StatusCode::BAD_REQUEST, errors)),
    }
}

/// `changeUserStatusUrl` — a manager's status changed in the CRM: stored, then mirrored on the PBX.
pub async fn user_status(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let params = Params::from_request(&req, &body)?;
    params.check_client_id(&state.client_id)?;
    let change = status_change(&params)?;
    state.manager_status.change(change).await?;
    Ok(HttpResponse::Ok().json(json!({"success": true})))
}

/// Reads and checks `changeUserStatusUrl`'s parameters (`userId`, `code`, `status`); every
/// problem is reported with its field.
fn status_change(params: &Params) -> Result<StatusChange, ApiError> {
    let mut errors = BTreeMap::new();
    let user_id = match params
        .get("userId")
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        None => {
            errors.insert("userId".to_string(), "is required".to_string());
            None
        }
        Some(v) => match v.parse::<i64>() {
            Ok(id) if id > 0 => Some(id),
            _ => {
                errors.insert("userId".into(), "must be a positive integer".into());
                None
            }
        },
    };
    let code = params.get("code").map(str::trim).unwrap_or_default();
    let code = if code.is_empty() {
        errors.insert("code".into(), "is required".into());
        None
    } else {
        match ExtensionCode::parse(code) {
            Ok(code) => Some(code),
            Err(e) => {
                errors.insert("code".into(), e.to_string());
                None
            }
        }
    };
    let status = match params
        .get("status")
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        None => {
            errors.insert("status".into(), "is required".into());
            None
        }
        Some(s) => {
            let parsed = UserStatus::parse(s);
            if parsed.is_none() {
                errors.insert(
                    "status".into(),
                    "must be one of free, busy, dinner, break".into(),
                );
            }
            parsed
        }
    };
    match (user_id, code, status) {
        (Some(user_id), Some(code), Some(status)) if errors.is_empty() => Ok(StatusChange {
            user_id,
            code,
            status,
        }),
        _ => Err(ApiError::fields(StatusCode::BAD_REQUEST, errors)),
    }
}
