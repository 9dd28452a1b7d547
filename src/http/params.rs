//! Parameters of retailCRM's callbacks: they may come in the query string or in a form (or JSON)
//! body (retailCRM's own bundle reads `clientId` from either). Each parameter is given once: a
//! name repeated in one place, or given in both, is refused with 400 naming it, never resolved by
//! taking one of the values.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fmt;

use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::HttpRequest;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

use super::error::ApiError;
use crate::base::secret::Secret;

/// Most parameters one callback may carry.
const MAX_PARAMS: usize = 64;
/// Longest value of one parameter.
const MAX_VALUE_LEN: usize = 8 * 1024;
/// Longest parameter name (names are quoted in answers and logs).
const MAX_NAME_LEN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Query,
    Body,
}

#[derive(Debug, Default)]
pub struct Params(BTreeMap<String, (String, Source)>);

impl Params {
    /// Reads the query string and, when present, a form-encoded or JSON-object body.
    pub fn from_request(req: &HttpRequest, body: &[u8]) -> Result<Params, ApiError> {
        let mut params = Params::default();
        let query: Vec<(String, String)> =
            serde_urlencoded::from_str(req.query_string()).map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "query string is not valid URL encoding",
                )
            })?;
        params.add(query, Source::Query)?;

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
                params.add(form, Source::Body)?;
            } else if content_type.starts_with("application/json") {
                let JsonPairs(pairs) = serde_json::from_slice(body).map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("body is not a JSON object: {e}"),
                    )
                })?;
                let pairs = pairs.into_iter().filter_map(|(k, v)| match v {
                    serde_json::Value::String(s) => Some((k, s)),
                    serde_json::Value::Null => None,
                    other => Some((k, other.to_string())),
                });
                params.add(pairs, Source::Body)?;
            } else {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "body must be application/x-www-form-urlencoded or application/json",
                ));
            }
        }

        if let Some((k, _)) = params.0.iter().find(|(_, (v, _))| v.len() > MAX_VALUE_LEN) {
            return Err(ApiError::bad_field(
                k,
                format!("longer than {MAX_VALUE_LEN} bytes"),
            ));
        }
        Ok(params)
    }

    /// Adds parameters from one place; a name already given (here or elsewhere) is refused.
    fn add(
        &mut self,
        pairs: impl IntoIterator<Item = (String, String)>,
        source: Source,
    ) -> Result<(), ApiError> {
        for (name, value) in pairs {
            if name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "a parameter name is longer than {MAX_NAME_LEN} bytes or not printable"
                    ),
                ));
            }
            match self.0.entry(name) {
                Entry::Vacant(e) => {
                    e.insert((value, source));
                }
                Entry::Occupied(e) => {
                    let problem = if e.get().1 == source {
                        "is given more than once"
                    } else {
                        "is given both in the query string and in the body"
                    };
                    return Err(ApiError::bad_field(e.key(), problem));
                }
            }
            if self.0.len() > MAX_PARAMS {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("more than {MAX_PARAMS} parameters"),
                ));
            }
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|(v, _)| v.as_str())
    }

    /// A required parameter, trimmed; missing or blank → 400 naming it.
    pub fn require(&self, key: &str) -> Result<&str, ApiError> {
        match self.get(key).map(str::trim) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(ApiError::bad_field(key, "is required")),
        }
    }

    /// Checks `clientId` against ours in constant time, exactly as given: missing → 400, with
    /// white space around it → 400, wrong → 403.
    pub fn check_client_id(&self, ours: &Secret) -> Result<(), ApiError> {
        let given = match self.get("clientId") {
            Some(v) if !v.is_empty() => v,
            _ => return Err(ApiError::bad_field("clientId", "is required")),
        };
        if given.trim() != given {
            return Err(ApiError::bad_field(
                "clientId",
                "has white space before or after it",
            ));
        }
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

/// A query string's parameters, each given once (a repeated name → 400 naming it).
pub fn unique_query(query: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "malformed query string"))?;
    let mut params = Params::default();
    params.add(pairs, Source::Query)?;
    Ok(params.0.into_iter().map(|(k, (v, _))| (k, v)).collect())
}

/// A JSON object's members in order, repeated names kept (`serde_json::Map` keeps the last).
struct JsonPairs(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for JsonPairs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = JsonPairs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonPairs, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(JsonPairs(members))
            }
        }
        deserializer.deserialize_map(Members)
    }
}
