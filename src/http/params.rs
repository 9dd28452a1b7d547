//! Parameters of retailCRM's callbacks: they may come in the query string or in a form body
//! (retailCRM's own bundle reads `clientId` from either), so both are merged, the body winning.

use std::collections::BTreeMap;

use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::HttpRequest;

use super::error::ApiError;
use crate::secret::Secret;

/// Most parameters one callback may carry.
const MAX_PARAMS: usize = 64;
/// Longest value of one parameter.
const MAX_VALUE_LEN: usize = 8 * 1024;

#[derive(Debug, Default)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    /// Reads the query string and, when present, a form-encoded or JSON-object body.
    pub fn from_request(req: &HttpRequest, body: &[u8]) -> Result<Params, ApiError> {
        let mut map = BTreeMap::new();
        let query: Vec<(String, String)> =
            serde_urlencoded::from_str(req.query_string()).map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "query string is not valid URL encoding",
                )
            })?;
        map.extend(query);

        if !body.is_empty() {
            let content_type = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/x-www-form-urlencoded")
                .to_ascii_lowercase();
            if content_type.starts_with("application/x-www-form-urlencoded") {
                let form: Vec<(String, String)> =
                    serde_urlencoded::from_bytes(body).map_err(|_| {
                        ApiError::new(StatusCode::BAD_REQUEST, "body is not valid form encoding")
                    })?;
                map.extend(form);
            } else if content_type.starts_with("application/json") {
                let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)
                    .map_err(|e| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            format!("body is not a JSON object: {e}"),
                        )
                    })?;
                for (k, v) in obj {
                    let v = match v {
                        serde_json::Value::String(s) => s,
                        serde_json::Value::Null => continue,
                        other => other.to_string(),
                    };
                    map.insert(k, v);
                }
            } else {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "body must be application/x-www-form-urlencoded or application/json",
                ));
            }
        }

        if map.len() > MAX_PARAMS {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("more than {MAX_PARAMS} parameters"),
            ));
        }
        if let Some((k, _)) = map.iter().find(|(_, v)| v.len() > MAX_VALUE_LEN) {
            return Err(ApiError::bad_field(
                k,
                format!("longer than {MAX_VALUE_LEN} bytes"),
            ));
        }
        Ok(Params(map))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// A required parameter, trimmed; missing or blank → 400 naming it.
    pub fn require(&self, key: &str) -> Result<&str, ApiError> {
        match self.0.get(key).map(|v| v.trim()) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(ApiError::bad_field(key, "is required")),
        }
    }

    /// Checks `clientId` against ours in constant time: missing → 400, wrong → 403.
    pub fn check_client_id(&self, ours: &Secret) -> Result<(), ApiError> {
        let given = self.require("clientId")?;
        if ours.matches(given) {
            Ok(())
        } else {
            Err(ApiError::field(
                StatusCode::FORBIDDEN,
                "clientId",
                "does not match this module",
            ))
        }
    }
}
