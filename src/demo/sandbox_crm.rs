//! The sandbox CRM: a small retailCRM-compatible API (v5, the methods pbxgate calls) that
//! checks the API key, answers like retailCRM and keeps what it received (the last
//! [`KEEP`] requests, calls and call events) for the dashboard and the demo's tests.
//!
//! It is served on pbxgate's own HTTP server under [`BASE_PATH`] while `pbxgate demo` runs
//! (`crm.url` points there), and what it received under [`RECEIVED_PATH`]. The HTTP side is
//! in `http::sandbox`; this is the CRM's behaviour.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{json, Value};

use crate::base::secret::Secret;

/// Where the sandbox's API lives on pbxgate's server: `crm.url` is `{public_url}{BASE_PATH}`.
pub const BASE_PATH: &str = "/sandbox/crm";
/// `GET`: what the sandbox received (`?since=SEQ` for newer entries only).
pub const RECEIVED_PATH: &str = "/sandbox/received";
/// Most requests, calls and events kept (older ones are forgotten).
pub const KEEP: usize = 200;

/// One request as the sandbox saw it (the API key never kept).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Received {
    pub seq: u64,
    /// RFC 3339.
    pub at: String,
    pub method: String,
    /// The API path (without [`BASE_PATH`]).
    pub path: String,
    pub status: u16,
    /// The JSON the request carried (`calls`, `event`, `integrationModule`, `task`, ...) or
    /// its query parameters; the module's `clientId` masked.
    pub body: Value,
    /// What the sandbox answered.
    pub answer: Value,
}

#[derive(Default)]
struct State {
    seq: u64,
    requests: VecDeque<Received>,
    /// Calls uploaded (`telephony/calls/upload`), each with the `seq` of its request.
    calls: VecDeque<Value>,
    /// Call events (`telephony/call/event`).
    events: VecDeque<Value>,
    counts: BTreeMap<String, u64>,
    module: Option<Value>,
    uploaded: std::collections::HashSet<String>,
}

/// The sandbox's state; cheap to clone.
#[derive(Clone)]
pub struct SandboxCrm {
    api_key: Secret,
    state: Arc<Mutex<State>>,
}

static INSTALLED: OnceLock<SandboxCrm> = OnceLock::new();

/// Makes `sandbox` the one pbxgate's HTTP server serves (once per process: `pbxgate demo`).
/// Must be called before the server starts; `false` if one was installed already.
pub fn install(sandbox: SandboxCrm) -> bool {
    INSTALLED.set(sandbox).is_ok()
}

/// The installed sandbox, if the process runs the demo.
pub fn installed() -> Option<SandboxCrm> {
    INSTALLED.get().cloned()
}

/// A request to the sandbox's API, as the HTTP side read it.
pub struct Request<'a> {
    pub method: &'a str,
    /// The path under [`BASE_PATH`] (`/api/v5/telephony/call/event`).
    pub path: &'a str,
    pub query: &'a [(String, String)],
    /// Form fields of a POST body.
    pub form: &'a [(String, String)],
    /// `X-API-KEY`, if given.
    pub api_key_header: Option<&'a str>,
}

impl SandboxCrm {
    pub fn new(api_key: Secret) -> SandboxCrm {
        SandboxCrm {
            api_key,
            state: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers one API request like retailCRM (status, JSON body) and records it.
    pub fn handle(&self, req: &Request<'_>) -> (u16, Value) {
        let key = req.api_key_header.or_else(|| param(req, "apiKey"));
        let mut st = self.lock();
        let mut body = Value::Null;
        let (status, answer) = match key {
            None | Some("") => error(401, "\"apiKey\" is missing."),
            Some(k) if !self.api_key.matches(k) => error(403, "Wrong \"apiKey\" value."),
            Some(_) => {
                let (status, answer, carried) = route(&mut st, req);
                body = carried;
                (status, answer)
            }
        };
        if body.is_null() {
            body = Value::Object(
                req.query
                    .iter()
                    .filter(|(k, _)| k != "apiKey")
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            );
        }
        st.seq += 1;
        let seq = st.seq;
        *st.counts.entry(req.path.to_string()).or_default() += 1;
        let received = Received {
            seq,
            at: jiff::Timestamp::now().to_string(),
            method: req.method.to_string(),
            path: req.path.to_string(),
            status,
            body,
            answer: answer.clone(),
        };
        if status < 300 {
            if req.path == "/api/v5/telephony/calls/upload" {
                for call in received.body.as_array().into_iter().flatten() {
                    let mut call = call.clone();
                    call["seq"] = json!(seq);
                    push(&mut st.calls, call);
                }
            } else if req.path == "/api/v5/telephony/call/event" {
                let mut event = received.body.clone();
                event["seq"] = json!(seq);
                push(&mut st.events, event);
            }
        }
        push(&mut st.requests, received);
        (status, answer)
    }

    /// What was received after `since` (0: all kept), as `GET /sandbox/received` shows it.
    pub fn received(&self, since: u64) -> Value {
        let st = self.lock();
        let newer = |v: &Value| v["seq"].as_u64().is_some_and(|s| s > since);
        json!({
            "success": true,
            "last": st.seq,
            "counts": st.counts,
            "module": st.module.as_ref().map(masked_module),
            "calls": st.calls.iter().filter(|c| newer(c)).collect::<Vec<_>>(),
            "events": st.events.iter().filter(|e| newer(e)).collect::<Vec<_>>(),
            "requests": st.requests.iter().filter(|r| r.seq > since).collect::<Vec<_>>(),
        })
    }
}

fn push<T>(q: &mut VecDeque<T>, item: T) {
    if q.len() >= KEEP {
        q.pop_front();
    }
    q.push_back(item);
}

fn error(status: u16, message: &str) -> (u16, Value) {
    (status, json!({"success": false, "errorMsg": message}))
}

fn validation(errors: Value) -> (u16, Value) {
    (
        400,
        json!({"success": false, "errorMsg": "Errors in the input parameters", "errors": errors}),
    )
}

/// The module as the sandbox shows it: `clientId` masked.
fn masked_module(m: &Value) -> Value {
    let mut m = m.clone();
    if m.get("clientId").is_some() {
        m["clientId"] = json!("***");
    }
    m
}

/// Answers an authorised request: (status, answer, the JSON it carried).
/// A parameter of the body or the query string.
fn param<'a>(req: &Request<'a>, name: &str) -> Option<&'a str> {
    req.form
        .iter()
        .chain(req.query)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn route(st: &mut State, req: &Request<'_>) -> (u16, Value, Value) {
    let param = |name: &str| param(req, name);
    let json_field = |name: &str| -> Result<Value, (u16, Value)> {
        let raw =
            param(name).ok_or_else(|| error(400, &format!("Parameter '{name}' is missing")))?;
        serde_json::from_str(raw)
            .map_err(|_| validation(json!({name: "This value is not valid JSON."})))
    };
    let segments: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let done = |r: (u16, Value)| (r.0, r.1, Value::Null);
    match (req.method, segments.as_slice()) {
        ("GET", ["api", "credentials"]) => done((
            200,
            json!({"success": true, "credentials": [], "siteAccess": "access_full", "sitesAvailable": ["demo"],
                   "scopes": ["integration_read", "integration_write", "telephony_read", "telephony_write", "user_write", "task_write"]}),
        )),
        ("GET", ["api", "v5", "settings"]) => done((
            200,
            json!({"success": true, "settings": {"default_currency": {"value": "EUR"}, "timezone": {"value": "UTC"}}}),
        )),
        ("GET", ["api", "v5", "reference", "sites"]) => done((
            200,
            json!({"success": true, "sites": {"demo": {"code": "demo", "name": "Demo shop", "url": "http://127.0.0.1"}}}),
        )),
        ("POST", ["api", "v5", "integration-modules", code, "edit"]) => {
            match json_field("integrationModule") {
                Err(e) => done(e),
                Ok(m) if m.get("code").and_then(Value::as_str) != Some(*code) => {
                    let carried = masked_module(&m);
                    let e = validation(json!({"code": "The code must match the code in the URL."}));
                    (e.0, e.1, carried)
                }
                Ok(m) => {
                    let created = st.module.is_none();
                    let carried = masked_module(&m);
                    st.module = Some(m);
                    (
                        if created { 201 } else { 200 },
                        json!({"success": true, "info": []}),
                        carried,
                    )
                }
            }
        }
        ("GET", ["api", "v5", "integration-modules", code]) => match &st.module {
            Some(m) if m.get("code").and_then(Value::as_str) == Some(*code) => {
                let mut m = m.clone();
                m["freeze"] = json!(false);
                m["native"] = json!(false);
                done((200, json!({"success": true, "integrationModule": m})))
            }
            _ => done(error(404, "Not found")),
        },
        ("GET", ["api", "v5", "telephony", "manager"]) => {
            match param("phone").filter(|p| !p.is_empty()) {
                None => done(error(400, "Parameter 'phone' is missing")),
                // Nobody is responsible for the demo's customers: pbxgate's own rules decide.
                Some(_) => done((200, json!({"success": true}))),
            }
        }
        ("POST", ["api", "v5", "telephony", "call", "event"]) => match json_field("event") {
            Err(e) => done(e),
            Ok(e) => {
                let ok_type = matches!(
                    e.get("type").and_then(Value::as_str),
                    Some("in" | "out" | "hangup")
                );
                let has_phone = e
                    .get("phone")
                    .and_then(Value::as_str)
                    .is_some_and(|p| !p.is_empty());
                if !ok_type || !has_phone {
                    let field = if ok_type { "phone" } else { "type" };
                    let r = validation(json!({field: "This value is not valid."}));
                    return (r.0, r.1, e);
                }
                (
                    200,
                    json!({"success": true, "notExistCodes": [], "notExistUsers": []}),
                    e,
                )
            }
        },
        ("POST", ["api", "v5", "telephony", "calls", "upload"]) => match json_field("calls") {
            Err(e) => done(e),
            Ok(calls) => {
                let Some(list) = calls.as_array() else {
                    return done(validation(
                        json!({"calls": "This value should be of type array."}),
                    ));
                };
                if list.len() > 50 {
                    let r = validation(
                        json!({"calls": "This collection should contain 50 elements or less."}),
                    );
                    return (r.0, r.1, calls);
                }
                let mut errors = serde_json::Map::new();
                for (i, c) in list.iter().enumerate() {
                    if !matches!(c.get("type").and_then(Value::as_str), Some("in" | "out")) {
                        errors.insert(
                            format!("calls[{i}][type]"),
                            json!("The value you selected is not a valid choice."),
                        );
                    }
                    if c.get("phone")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                    {
                        errors.insert(
                            format!("calls[{i}][phone]"),
                            json!("This value should not be blank."),
                        );
                    }
                    let has_code = c
                        .get("code")
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty());
                    if !has_code && c.get("userId").is_none_or(Value::is_null) {
                        errors.insert(
                            format!("calls[{i}][code]"),
                            json!("Either 'code' or 'userId' should be given"),
                        );
                    }
                }
                if !errors.is_empty() {
                    let r = validation(Value::Object(errors));
                    return (r.0, r.1, calls);
                }
                let mut duplicates = Vec::new();
                let mut processed = 0;
                for c in list {
                    match c.get("externalId").and_then(Value::as_str) {
                        Some(id) if !st.uploaded.insert(id.to_string()) => {
                            duplicates.push(id.to_string())
                        }
                        _ => processed += 1,
                    }
                }
                (
                    200,
                    json!({"success": true, "processedCallsCount": processed, "duplicateCalls": duplicates}),
                    calls,
                )
            }
        },
        ("POST", ["api", "v5", "tasks", "create"]) => match json_field("task") {
            Err(e) => done(e),
            Ok(task) => (201, json!({"success": true, "id": st.seq + 1}), task),
        },
        ("POST", ["api", "v5", "users", id, "status"]) => {
            match (id.parse::<i64>(), param("status")) {
                (Err(_), _) => done(error(404, "Not found")),
                (_, Some("free" | "busy" | "dinner" | "break")) => {
                    done((200, json!({"success": true})))
                }
                _ => done(validation(
                    json!({"status": "The value you selected is not a valid choice."}),
                )),
            }
        }
        _ => done(error(404, "API method not found")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn post(s: &SandboxCrm, path: &str, key: Option<&str>, body: &[(&str, &str)]) -> (u16, Value) {
        s.handle(&Request {
            method: "POST",
            path,
            query: &[],
            form: &form(body),
            api_key_header: key,
        })
    }

    #[test]
    fn the_key_is_checked_and_what_came_is_kept_without_it() {
        let s = SandboxCrm::new(Secret::new("demo-key"));
        let upload = "/api/v5/telephony/calls/upload";
        let call = r#"[{"externalId":"pbx-1","type":"in","phone":"+4917012","code":"101","result":"answered"}]"#;
        assert_eq!(post(&s, upload, None, &[("calls", call)]).0, 401);
        assert_eq!(post(&s, upload, Some("nope"), &[("calls", call)]).0, 403);
        let (status, answer) = post(&s, upload, Some("demo-key"), &[("calls", call)]);
        assert_eq!((status, &answer["processedCallsCount"]), (200, &json!(1)));
        let (_, again) = post(&s, upload, Some("demo-key"), &[("calls", call)]);
        assert_eq!(again["duplicateCalls"], json!(["pbx-1"]));
        let bad = r#"[{"externalId":"pbx-2","type":"sideways","phone":""}]"#;
        assert_eq!(post(&s, upload, Some("demo-key"), &[("calls", bad)]).0, 400);

        let r = s.received(0);
        assert_eq!(r["calls"].as_array().unwrap().len(), 2, "{r}");
        assert_eq!(r["calls"][0]["externalId"], "pbx-1");
        assert_eq!(r["requests"].as_array().unwrap().len(), 5);
        assert!(!r.to_string().contains("demo-key"));
        let newer = s.received(r["requests"][3]["seq"].as_u64().unwrap());
        assert_eq!(newer["requests"].as_array().unwrap().len(), 1);
        assert_eq!(newer["calls"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn the_module_is_kept_with_its_client_id_masked_and_memory_is_bounded() {
        let s = SandboxCrm::new(Secret::new("k"));
        let m = r#"{"code":"pbxgate","clientId":"very-secret-client-id","active":true}"#;
        let edit = "/api/v5/integration-modules/pbxgate/edit";
        assert_eq!(
            post(&s, edit, Some("k"), &[("integrationModule", m)]).0,
            201
        );
        assert_eq!(
            post(&s, edit, Some("k"), &[("integrationModule", m)]).0,
            200
        );
        let r = s.received(0);
        assert_eq!(r["module"]["clientId"], "***");
        assert!(!r.to_string().contains("very-secret-client-id"));
        for _ in 0..KEEP + 10 {
            post(
                &s,
                "/api/v5/telephony/call/event",
                Some("k"),
                &[("event", r#"{"type":"in","phone":"+1"}"#)],
            );
        }
        let r = s.received(0);
        assert_eq!(r["events"].as_array().unwrap().len(), KEEP);
        assert_eq!(r["requests"].as_array().unwrap().len(), KEEP);
    }
}
