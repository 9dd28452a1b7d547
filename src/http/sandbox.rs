//! The sandbox CRM's routes on pbxgate's own server, mounted only while `pbxgate demo` runs
//! (see [`crate::demo::sandbox_crm`]): retailCRM's API under `/sandbox/crm/api/...`, and
//! `GET /sandbox/received` (what it received, `?since=SEQ` for newer entries only).

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};

use super::error::ApiError;
use crate::demo::sandbox_crm::{self, Request, SandboxCrm};

/// Adds the sandbox's routes when the process runs the demo; nothing otherwise.
pub fn routes(cfg: &mut web::ServiceConfig) {
    let Some(sandbox) = sandbox_crm::installed() else {
        return;
    };
    cfg.app_data(web::Data::new(sandbox))
        .service(web::resource(sandbox_crm::RECEIVED_PATH).route(web::get().to(received)))
        .service(
            web::resource(format!("{}/{{tail:.*}}", sandbox_crm::BASE_PATH))
                .route(web::get().to(api))
                .route(web::post().to(api)),
        );
}

fn pairs(text: &str, what: &str) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str(text).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{what} is not valid URL encoding"),
        )
    })
}

async fn api(
    sandbox: web::Data<SandboxCrm>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let query = pairs(req.query_string(), "query string")?;
    let form = match std::str::from_utf8(&body) {
        Ok(text) => pairs(text, "body")?,
        Err(_) => return Err(ApiError::new(StatusCode::BAD_REQUEST, "body is not UTF-8")),
    };
    let path = req
        .path()
        .strip_prefix(sandbox_crm::BASE_PATH)
        .unwrap_or(req.path());
    let api_key = req.headers().get("X-API-KEY").and_then(|v| v.to_str().ok());
    let (status, answer) = sandbox.handle(&Request {
        method: req.method().as_str(),
        path,
        query: &query,
        form: &form,
        api_key_header: api_key,
    });
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok(HttpResponse::build(status).json(answer))
}

async fn received(
    sandbox: web::Data<SandboxCrm>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let query = super::params::unique_query(req.query_string())?;
    let since = match query.get("since") {
        None => 0,
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| ApiError::bad_field("since", "must be a non-negative integer"))?,
    };
    Ok(HttpResponse::Ok().json(sandbox.received(since)))
}
