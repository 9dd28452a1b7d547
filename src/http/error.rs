//! The one error body every endpoint answers with:
//! `{"success": false, "errorMsg": "...", "errors": {"field": "message"}}`.

use std::collections::BTreeMap;

use actix_web::dev::ServiceResponse;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::middleware::ErrorHandlerResponse;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub success: bool,
    pub error_msg: String,
    pub errors: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub errors: BTreeMap<String, String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            errors: BTreeMap::new(),
        }
    }

    /// A problem with one named field.
    pub fn field(status: StatusCode, field: &str, problem: impl Into<String>) -> Self {
        let problem = problem.into();
        ApiError {
            status,
            message: format!("{field}: {problem}"),
            errors: BTreeMap::from([(field.to_string(), problem)]),
        }
    }

    /// Several fields at once; the message lists them all.
    pub fn fields(status: StatusCode, errors: BTreeMap<String, String>) -> Self {
        let message = errors
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; ");
        ApiError {
            status,
            message,
            errors,
        }
    }

    pub fn bad_field(field: &str, problem: impl Into<String>) -> Self {
        Self::field(StatusCode::BAD_REQUEST, field, problem)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    fn body(&self) -> ErrorBody {
        ErrorBody {
            success: false,
            error_msg: self.message.clone(),
            errors: self.errors.clone(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    /// Not logged here: the request's one log line (in [`super::server`]) carries the reason.
    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status).json(self.body())
    }
}

/// Middleware hook: any 4xx/5xx that is not already JSON (a 404 from routing, a 413 from the
/// payload limit, a 405) gets the standard JSON body, so clients can always parse errors.
pub fn json_error_body<B>(res: ServiceResponse<B>) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let message = match status {
        StatusCode::NOT_FOUND => "no such endpoint".to_string(),
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this endpoint".to_string(),
        StatusCode::PAYLOAD_TOO_LARGE => "request body too large".to_string(),
        other => other.canonical_reason().unwrap_or("error").to_string(),
    };
    let body = ErrorBody {
        success: false,
        error_msg: message,
        errors: BTreeMap::new(),
    };
    let json = serde_json::to_string(&body).unwrap_or_else(|_| "{\"success\":false}".into());
    let (req, mut res) = res.into_parts();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let res = res.set_body(json).map_into_boxed_body();
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, res).map_into_right_body(),
    ))
}

/// Rate limits answer 429 (the extension's naming `code`); what the PBX did answers 502/504/503;
/// a call `process_originate_params` refused answers 403 with the hook's reason as `errorMsg`.
impl From<crate::click_to_call::ClickToCallError> for ApiError {
    fn from(e: crate::click_to_call::ClickToCallError) -> Self {
        use crate::click_to_call::ClickToCallError as E;
        let status = match &e {
            E::ExtensionRateLimit { .. } => {
                return ApiError::field(StatusCode::TOO_MANY_REQUESTS, "code", e.to_string())
            }
            E::GlobalRateLimit { .. } => StatusCode::TOO_MANY_REQUESTS,
            E::Refused(_) => StatusCode::BAD_GATEWAY,
            E::Timeout => StatusCode::GATEWAY_TIMEOUT,
            E::Disconnected | E::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::Declined(_) => StatusCode::FORBIDDEN,
        };
        ApiError::new(status, e.to_string())
    }
}

/// A status that cannot be stored is a 500: the CRM should send it again.
impl From<crate::manager_status::ManagerStatusError> for ApiError {
    fn from(e: crate::manager_status::ManagerStatusError) -> Self {
        match e {
            crate::manager_status::ManagerStatusError::Store(e) => {
                ApiError::internal(e.to_string())
            }
        }
    }
}

/// Unknown or forged links and unavailable files are 404, expired links 410, an unsatisfiable
/// range 416 (its `Content-Range` is added by the handler), the store failing 500.
impl From<crate::records::serve::ServeError> for ApiError {
    fn from(e: crate::records::serve::ServeError) -> Self {
        use crate::records::serve::ServeError as E;
        use crate::records::LinkError;
        let status = match &e {
            E::Link(LinkError::NotFound(_)) | E::Unavailable => StatusCode::NOT_FOUND,
            E::Link(LinkError::Expired) => StatusCode::GONE,
            E::Link(LinkError::Store(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            E::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
        };
        ApiError::new(status, e.to_string())
    }
}
