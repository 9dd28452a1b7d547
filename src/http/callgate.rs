//! The CallGate-compatible PBX API (`/rest/...`, see [`crate::callgate`]): reads the
//! parameters (the query string; `telephony_predial` also a form body and CallGate's
//! `/rest/telephony_predial/&name=value` form), checks `ukey` first, answers as CallGate does.
//! Every path is served with and without its trailing slash.

use std::collections::BTreeMap;

use actix_web::http::header::HeaderValue;
use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};

use super::AppState;
use crate::callgate::{CgError, Reply};

/// Most parameters a `telephony_predial` may carry in all (Bitrix24's event posts ~25).
const MAX_PREDIAL_PARAMS: usize = 100;
/// Longest parameter name or value of a `telephony_predial`.
const MAX_PREDIAL_VALUE: usize = 8 * 1024;

const PREDIAL: &str = "/rest/telephony_predial";

pub fn routes(cfg: &mut web::ServiceConfig) {
    let both = |path: &str| [path.to_string(), format!("{path}/")];
    cfg.service(web::resource(both("/rest/find_assignee")).route(web::get().to(find_assignee)))
        .service(web::resource(both("/rest/register_call")).route(web::get().to(register_call)))
        .service(web::resource(both("/rest/telephony_hide")).route(web::get().to(telephony_hide)))
        .service(
            web::resource(both("/rest/telephony_finish")).route(web::get().to(telephony_finish)),
        )
        .service(
            web::resource([
                PREDIAL.to_string(),
                format!("{PREDIAL}/"),
                format!("{PREDIAL}/{{tail:&.*}}"),
            ])
            .route(web::get().to(telephony_predial))
            .route(web::post().to(telephony_predial)),
        )
        .service(web::resource(both("/rest/bitrix_api")).route(web::post().to(bitrix_api)));
}

impl ResponseError for CgError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// Not logged here: the request's one log line carries the reason.
    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(self.body())
    }
}

fn reply(r: Reply) -> HttpResponse {
    match r {
        Reply::Json(v) => HttpResponse::Ok().json(v),
        Reply::Text(t) => HttpResponse::Ok()
            .content_type("text/plain; charset=utf-8")
            .body(t),
        Reply::Raw { status, body } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut res = HttpResponse::build(status).body(body);
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            res
        }
    }
}

/// The query string's parameters, each given once.
fn query(req: &HttpRequest) -> Result<BTreeMap<String, String>, CgError> {
    super::params::unique_query(req.query_string()).map_err(|e| {
        CgError::BadParams(if e.errors.is_empty() {
            BTreeMap::from([("query".to_string(), e.message)])
        } else {
            e.errors
        })
    })
}

/// The query checked for `ukey`.
fn authorized(state: &AppState, req: &HttpRequest) -> Result<BTreeMap<String, String>, CgError> {
    let q = query(req)?;
    state
        .callgate
        .authorize(q.get("ukey").map(String::as_str))?;
    Ok(q)
}

async fn find_assignee(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, CgError> {
    let q = authorized(&state, &req)?;
    Ok(reply(state.callgate.find_assignee(&q).await?))
}

async fn register_call(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, CgError> {
    let q = authorized(&state, &req)?;
    Ok(reply(state.callgate.register_call(&q).await?))
}

async fn telephony_hide(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, CgError> {
    let q = authorized(&state, &req)?;
    Ok(reply(state.callgate.telephony_hide(&q).await?))
}

async fn telephony_finish(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, CgError> {
    let q = authorized(&state, &req)?;
    Ok(reply(state.callgate.telephony_finish(&q).await?))
}

/// Adds `pairs` from one place; a name given twice (anywhere) is refused, naming it.
fn merge(into: &mut BTreeMap<String, String>, pairs: Vec<(String, String)>) -> Result<(), CgError> {
    for (k, v) in pairs {
        if k.len() > MAX_PREDIAL_VALUE || v.len() > MAX_PREDIAL_VALUE {
            return Err(CgError::BadParams(BTreeMap::from([(
                "body".to_string(),
                format!("a parameter is longer than {MAX_PREDIAL_VALUE} bytes"),
            )])));
        }
        if into.contains_key(&k) {
            let name = crate::telemetry::one_line(&k, 64);
            return Err(CgError::BadParams(BTreeMap::from([(
                name,
                "is given more than once".to_string(),
            )])));
        }
        into.insert(k, v);
        if into.len() > MAX_PREDIAL_PARAMS {
            return Err(CgError::BadParams(BTreeMap::from([(
                "body".to_string(),
                format!("more than {MAX_PREDIAL_PARAMS} parameters"),
            )])));
        }
    }
    Ok(())
}

fn decode(what: &str, bytes: &[u8]) -> Result<Vec<(String, String)>, CgError> {
    serde_urlencoded::from_bytes(bytes).map_err(|_| {
        CgError::BadParams(BTreeMap::from([(
            what.to_string(),
            "is not valid URL encoding".to_string(),
        )]))
    })
}

/// `telephony_predial`: Bitrix24's click-to-call event (a form with `data[PHONE_NUMBER]`,
/// `data[USER_ID]`) or a GET; `ukey`, `internal_phone`, `sip_context` in the query or after
/// the path's `/&`.
async fn telephony_predial(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, CgError> {
    let mut params = BTreeMap::new();
    merge(&mut params, decode("query", req.query_string().as_bytes())?)?;
    let tail = req
        .path()
        .strip_prefix(PREDIAL)
        .and_then(|t| t.strip_prefix("/&"))
        .unwrap_or_default();
    merge(&mut params, decode("path", tail.as_bytes())?)?;
    state
        .callgate
        .authorize(params.get("ukey").map(String::as_str))?;
    if !body.is_empty() {
        let form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/x-www-form-urlencoded")
            .to_ascii_lowercase()
            .starts_with("application/x-www-form-urlencoded");
        if !form {
            return Err(CgError::BadParams(BTreeMap::from([(
                "body".to_string(),
                "must be application/x-www-form-urlencoded".to_string(),
            )])));
        }
        merge(&mut params, decode("body", &body)?)?;
    }
    Ok(reply(state.callgate.telephony_predial(&params).await?))
}

/// `bitrix_api`: `method` in the query, its JSON parameters as the body.
async fn bitrix_api(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, CgError> {
    let q = authorized(&state, &req)?;
    Ok(reply(state.callgate.bitrix_api(&q, &body).await?))
}
