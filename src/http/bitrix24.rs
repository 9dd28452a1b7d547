//! `POST /bitrix24/events`: what the Bitrix24 portal posts (click-to-call, callbacks). Read and
//! verified here (`auth[application_token]`, constant time: a wrong or missing token is 403 and
//! nothing is placed); the call is placed in the background so the portal gets its answer at
//! once (it does not wait long, and never retries).

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde_json::json;

use super::error::ApiError;
use super::AppState;
use crate::base::ident::{mask_number, normalize_number, ExtensionCode, PhoneNumber};
use crate::click_to_call::MakeCall;
use crate::config::CrmKind;
use crate::crm::bitrix24::events::{self, Event};

/// Largest event body read.
pub const MAX_BODY: usize = 64 * 1024;

pub async fn events(
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    if state.config.crm.kind != CrmKind::Bitrix24 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "Bitrix24 events are taken only with crm.kind = \"bitrix24\"",
        ));
    }
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).map_err(|e| {
        ApiError::field(
            StatusCode::BAD_REQUEST,
            "body",
            format!("is not a form: {e}"),
        )
    })?;
    let form = events::fields(form)
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, e.field, e.problem))?;
    if !events::genuine(&form, &state.config.bitrix24.application_token) {
        tracing::warn!("Bitrix24 event refused: auth[application_token] is missing or wrong");
        return Err(ApiError::field(
            StatusCode::FORBIDDEN,
            "auth[application_token]",
            "does not match bitrix24.application_token",
        ));
    }
    let event = events::parse(&form).map_err(|e| {
        tracing::warn!(field = e.field, problem = %e.problem, "Bitrix24 event refused");
        ApiError::field(StatusCode::BAD_REQUEST, e.field, e.problem)
    })?;
    match event {
        Event::CallStart {
            user_id,
            phone,
            call_id,
            line,
        } => {
            let st = state.clone();
            tokio::spawn(async move { call_start(st, user_id, phone, call_id, line).await });
        }
        Event::CallbackStart { phone, line } => {
            let st = state.clone();
            tokio::spawn(async move { callback_start(st, phone, line).await });
        }
        Event::Other(name) => {
            tracing::info!(event = %name, "Bitrix24 event ignored: pbxgate does not act on it");
        }
    }
    Ok(HttpResponse::Ok().json(json!({"result": true})))
}

/// The number to dial: the digits Bitrix24 gave, with a leading `+` kept.
fn dial_number(raw: &str) -> Option<PhoneNumber> {
    PhoneNumber::parse(&normalize_number(raw)).ok()
}

async fn call_start(
    state: web::Data<AppState>,
    user_id: i64,
    phone: String,
    call_id: String,
    line: Option<String>,
) {
    let crm = state.crm.as_ref();
    let code = crm
        .directory()
        .into_iter()
        .find(|d| d.user_id == user_id)
        .and_then(|d| ExtensionCode::parse(&d.code).ok());
    let (Some(code), Some(number)) = (code, dial_number(&phone)) else {
        let reason = if dial_number(&phone).is_none() {
            "the number cannot be dialled"
        } else {
            "the Bitrix24 user has no extension (UF_PHONE_INNER, or [[users]])"
        };
        tracing::warn!(user_id, phone = %mask_number(&phone), reason, "click-to-call from Bitrix24 not placed");
        state
            .click_to_call
            .refuse_for_crm(&call_id, &phone, user_id, reason, crm, &state.outbox)
            .await;
        return;
    };
    let req = MakeCall {
        code,
        phone: number,
        user_id,
        external_phone: line.and_then(|l| dial_number(&l)),
        context: None,
    };
    if let Err(e) = state
        .click_to_call
        .call_for_crm(req, &call_id, crm, &state.outbox)
        .await
    {
        tracing::warn!(user_id, error = %e, "click-to-call from Bitrix24 failed; the call is finished as failed");
    }
}

async fn callback_start(state: web::Data<AppState>, phone: String, line: Option<String>) {
    let Some(number) = dial_number(&phone) else {
        tracing::warn!(phone = %mask_number(&phone), "Bitrix24 callback not placed: the number cannot be dialled");
        return;
    };
    // Who calls back: the customer's manager, as for an incoming call.
    let route = state.router.route(number.as_str(), line.as_deref()).await;
    let crm = state.crm.as_ref();
    let user = route.user_id.or_else(|| {
        let code = route.code.as_deref()?;
        crm.directory()
            .into_iter()
            .find(|d| d.code == code)
            .map(|d| d.user_id)
    });
    let (Some(code), Some(user_id)) = (
        route
            .code
            .as_deref()
            .and_then(|c| ExtensionCode::parse(c).ok()),
        user,
    ) else {
        tracing::warn!(phone = %mask_number(number.as_str()),
            "Bitrix24 callback not placed: no manager or fallback extension with a Bitrix24 user (routing)");
        return;
    };
    let req = MakeCall {
        code,
        phone: number,
        user_id,
        external_phone: line.and_then(|l| dial_number(&l)),
        context: None,
    };
    if let Err(e) = state
        .click_to_call
        .call_for_crm(req, "", crm, &state.outbox)
        .await
    {
        tracing::warn!(error = %e, "Bitrix24 callback failed");
    }
}
