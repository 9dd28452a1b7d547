//! An in-process fake retailCRM (API v5 telephony surface) on 127.0.0.1:0.
//!
//! It speaks the real wire format: `X-API-KEY` (or `apiKey`) is enforced, POST bodies must be
//! form-encoded with a JSON string in the named field, JSON fields and enums are validated the
//! way the real one does (a 51-call batch, an unknown `result` are rejected), answers use the
//! `{"success": ...}` envelope. Every request is recorded for assertions, and the fake can be told
//! to fail: 503/500, HTML pages, raw bodies, slow answers, or a real rate limit.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Value};
use tokio::sync::watch;

pub const API_KEY: &str = "fake-crm-api-key-0123456789";

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub api_key: Option<String>,
    pub content_type: Option<String>,
    pub form: BTreeMap<String, String>,
    pub at: Instant,
    pub status: u16,
}

impl Recorded {
    /// The JSON string carried in a form field, parsed.
    pub fn form_json(&self, field: &str) -> Value {
        let raw = self
            .form
            .get(field)
            .unwrap_or_else(|| panic!("no form field {field} in {self:?}"));
        serde_json::from_str(raw)
            .unwrap_or_else(|e| panic!("form field {field} is not JSON ({e}): {raw}"))
    }
}

/// A scripted misbehaviour for the next matching request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// A JSON error answer with this status (503 → the real rate-limit text).
    Status(u16),
    /// An HTML page with this status, like a wrong account URL.
    Html(u16),
    /// Exactly this answer.
    Raw {
        status: u16,
        content_type: &'static str,
        body: String,
    },
    /// Wait, then answer normally.
    Delay(Duration),
}

#[derive(Default)]
struct State {
    api_key: String,
    requests: Vec<Recorded>,
    faults: VecDeque<(Option<String>, Fault)>,
    /// Until lifted, every request (to this path, if one is given) gets the fault.
    outage: Option<(Option<String>, Fault)>,
    /// (general rps, telephony rps) enforced with a sliding one-second window.
    rate_limit: Option<(usize, usize)>,
    window_general: VecDeque<Instant>,
    window_telephony: VecDeque<Instant>,
    rate_limited: usize,
    module: Option<Value>,
    users: BTreeSet<i64>,
    sites: BTreeSet<String>,
    managers: HashMap<String, Value>,
    calls: BTreeMap<String, Value>,
    events: Vec<Value>,
    statuses: Vec<(i64, String)>,
    scopes: Vec<String>,
    timezone: String,
    /// Every request to these paths is answered this much later.
    slow: HashMap<String, Duration>,
    /// externalId → how many times it was uploaded (duplicates included).
    upload_counts: BTreeMap<String, usize>,
    /// Tasks created through `tasks/create`, in order (each with its `id`).
    tasks: Vec<Value>,
    /// While set, `tasks/create` answers 503 (the other methods work).
    tasks_down: bool,
}

pub struct FakeCrm {
    pub url: String,
    state: Arc<Mutex<State>>,
    seen: watch::Sender<usize>,
    handle: ServerHandle,
}

impl FakeCrm {
    pub async fn start() -> FakeCrm {
        let state = Arc::new(Mutex::new(State {
            api_key: API_KEY.to_string(),
            users: [1, 2, 3, 7].into_iter().collect(),
            sites: ["shop1", "shop2"].into_iter().map(String::from).collect(),
            timezone: "Europe/Moscow".into(),
            scopes: [
                "integration_read",
                "integration_write",
                "telephony_read",
                "telephony_write",
                "user_write",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            ..State::default()
        }));
        let seen = watch::Sender::new(0usize);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake CRM");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = web::Data::new(Shared {
            state: state.clone(),
            seen: seen.clone(),
        });
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .app_data(web::PayloadConfig::new(8 * 1024 * 1024))
                .default_service(web::to(dispatch))
        })
        .workers(2)
        .disable_signals()
        .listen(listener)
        .expect("listen fake CRM")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        FakeCrm {
            url,
            state,
            seen,
            handle,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    pub fn api_key(&self) -> &'static str {
        API_KEY
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// Requests whose path equals `path`.
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Waits (at most `within`) until an uploaded call with this `externalId` is stored: it,
    /// or `None`.
    pub async fn wait_for_call(&self, id: &str, within: Duration) -> Option<Value> {
        let mut rx = self.seen.subscribe();
        let state = self.state.clone();
        let _ = tokio::time::timeout(
            within,
            rx.wait_for(|_| state.lock().unwrap().calls.contains_key(id)),
        )
        .await;
        self.calls().get(id).cloned()
    }

    /// Waits (at most 10 s, then panics) until `n` requests to `path` have been answered.
    pub async fn wait_for_requests(&self, path: &str, n: usize) -> Vec<Recorded> {
        let mut rx = self.seen.subscribe();
        let state = self.state.clone();
        let ok = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|_| {
                state
                    .lock()
                    .unwrap()
                    .requests
                    .iter()
                    .filter(|r| r.path == path)
                    .count()
                    >= n
            }),
        )
        .await;
        assert!(
            ok.is_ok(),
            "fake CRM: fewer than {n} requests to {path} within 10 s: {:#?}",
            self.requests()
        );
        self.requests_to(path)
    }

    /// The next request (to any path) gets `fault`.
    pub fn fail_next(&self, fault: Fault) {
        self.lock().faults.push_back((None, fault));
    }

    /// The next request to `path` gets `fault`.
    pub fn fail_next_on(&self, path: &str, fault: Fault) {
        self.lock()
            .faults
            .push_back((Some(path.to_string()), fault));
    }

    /// Every request gets `fault` until [`FakeCrm::end_outage`].
    pub fn start_outage(&self, fault: Fault) {
        self.lock().outage = Some((None, fault));
    }

    /// Every request to `path` gets `fault` until [`FakeCrm::end_outage`]; others are answered.
    pub fn start_outage_on(&self, path: &str, fault: Fault) {
        self.lock().outage = Some((Some(path.to_string()), fault));
    }

    pub fn end_outage(&self) {
        self.lock().outage = None;
    }

    /// Enforce retailCRM's limits: more than `general` (or `telephony` for `/telephony/*`)
    /// requests in any one-second window → 503.
    pub fn enforce_rate_limit(&self, general: usize, telephony: usize) {
        self.lock().rate_limit = Some((general, telephony));
    }

    pub fn rate_limited_count(&self) -> usize {
        self.lock().rate_limited
    }

    pub fn set_users(&self, ids: &[i64]) {
        self.lock().users = ids.iter().copied().collect();
    }

    pub fn set_sites(&self, sites: &[&str]) {
        self.lock().sites = sites.iter().map(|s| s.to_string()).collect();
    }

    pub fn set_scopes(&self, scopes: &[&str]) {
        self.lock().scopes = scopes.iter().map(|s| s.to_string()).collect();
    }

    /// `telephony/manager?phone=<phone>` answers this manager.
    pub fn set_manager(&self, phone: &str, id: i64, code: &str) {
        self.lock().managers.insert(
            phone.to_string(),
            json!({"id": id, "firstName": "Test", "lastName": "Manager", "email": "m@example.org", "code": code}),
        );
    }

    /// The `externalId`s of every call uploaded so far, in upload order.
    pub fn uploaded_ids(&self) -> Vec<String> {
        self.requests_to("/api/v5/telephony/calls/upload")
            .iter()
            .flat_map(|r| {
                r.form_json("calls")
                    .as_array()
                    .map(|calls| {
                        calls
                            .iter()
                            .filter_map(|c| c["externalId"].as_str().map(str::to_string))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            })
            .collect()
    }

    /// The registered module, as last received.
    pub fn module(&self) -> Option<Value> {
        self.lock().module.clone()
    }

    /// Uploaded calls by externalId.
    pub fn calls(&self) -> BTreeMap<String, Value> {
        self.lock().calls.clone()
    }

    /// externalId → times uploaded (more than 1 = delivered again and reported as duplicate).
    pub fn upload_counts(&self) -> BTreeMap<String, usize> {
        self.lock().upload_counts.clone()
    }

    /// Every request to `path` waits `delay` before it is handled.
    pub fn slow_down(&self, path: &str, delay: Duration) {
        self.lock().slow.insert(path.to_string(), delay);
    }

    pub fn set_timezone(&self, tz: &str) {
        self.lock().timezone = tz.to_string();
    }

    pub fn events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    pub fn statuses(&self) -> Vec<(i64, String)> {
        self.lock().statuses.clone()
    }

    /// Tasks created so far (`tasks/create`), each as received plus its `id`.
    pub fn tasks(&self) -> Vec<Value> {
        self.lock().tasks.clone()
    }

    /// While `down`, `tasks/create` fails transiently (503, the rate-limit answer).
    pub fn set_tasks_down(&self, down: bool) {
        self.lock().tasks_down = down;
    }

    /// Waits (at most `within`) until `n` tasks exist; the tasks then.
    pub async fn wait_for_tasks(&self, n: usize, within: Duration) -> Vec<Value> {
        let mut rx = self.seen.subscribe();
        let state = self.state.clone();
        let _ = tokio::time::timeout(
            within,
            rx.wait_for(|_| state.lock().unwrap().tasks.len() >= n),
        )
        .await;
        self.tasks()
    }

    pub async fn stop(&self) {
        self.handle.stop(false).await;
    }
}

struct Shared {
    state: Arc<Mutex<State>>,
    seen: watch::Sender<usize>,
}

fn answer(status: u16, body: Value) -> HttpResponse {
    HttpResponse::build(StatusCode::from_u16(status).unwrap()).json(body)
}

fn error(status: u16, msg: &str) -> (u16, Value) {
    (status, json!({"success": false, "errorMsg": msg}))
}

fn validation(errors: Value) -> (u16, Value) {
    (
        400,
        json!({"success": false, "errorMsg": "Errors in the entity format", "errors": errors}),
    )
}

async fn dispatch(req: HttpRequest, body: web::Bytes, shared: web::Data<Shared>) -> HttpResponse {
    let method = req.method().as_str().to_string();
    let path = req.path().to_string();
    let query: BTreeMap<String, String> =
        serde_urlencoded::from_str(req.query_string()).unwrap_or_default();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let is_form = content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    let form: BTreeMap<String, String> = if is_form {
        serde_urlencoded::from_bytes(&body).unwrap_or_default()
    } else {
        BTreeMap::new()
    };
    let api_key = req
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .or_else(|| query.get("apiKey").cloned())
        .or_else(|| form.get("apiKey").cloned());
    let mut record = Recorded {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        api_key: api_key.clone(),
        content_type,
        form: form.clone(),
        at: Instant::now(),
        status: 0,
    };

    let slow = shared.state.lock().unwrap().slow.get(&path).copied();
    if let Some(d) = slow {
        tokio::time::sleep(d).await;
    }
    let fault = {
        let mut st = shared.state.lock().unwrap();
        let pos = st
            .faults
            .iter()
            .position(|(p, _)| p.as_deref().is_none_or(|p| p == path));
        pos.and_then(|i| st.faults.remove(i))
            .map(|(_, f)| f)
            .or_else(|| match &st.outage {
                Some((p, f)) if p.as_deref().is_none_or(|p| p == path) => Some(f.clone()),
                _ => None,
            })
    };
    let mut response = None;
    match fault {
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::Status(503)) => response = Some(answer(503, json!({"success": false, "errorMsg": "Service temporary unavailable"}))),
        Some(Fault::Status(s)) => response = Some(answer(s, json!({"success": false, "errorMsg": "Internal error"}))),
        Some(Fault::Html(s)) => {
            response = Some(
                HttpResponse::build(StatusCode::from_u16(s).unwrap())
                    .content_type("text/html; charset=utf-8")
                    .body("<!DOCTYPE html><html><head><title>Account not found</title></head><body>No such account</body></html>"),
            )
        }
        Some(Fault::Raw { status, content_type, body }) => {
            response = Some(HttpResponse::build(StatusCode::from_u16(status).unwrap()).content_type(content_type).body(body))
        }
        None => {}
    }

    let response = match response {
        Some(r) => r,
        None => {
            let mut st = shared.state.lock().unwrap();
            let (status, body) = handle(
                &mut st,
                &method,
                &path,
                &query,
                &form,
                api_key.as_deref(),
                is_form,
            );
            answer(status, body)
        }
    };
    record.status = response.status().as_u16();
    shared.state.lock().unwrap().requests.push(record);
    shared.seen.send_modify(|n| *n += 1);
    response
}

fn handle(
    st: &mut State,
    method: &str,
    path: &str,
    query: &BTreeMap<String, String>,
    form: &BTreeMap<String, String>,
    api_key: Option<&str>,
    is_form: bool,
) -> (u16, Value) {
    if let Some((general, telephony)) = st.rate_limit {
        let now = Instant::now();
        let telephony_route = path.starts_with("/api/v5/telephony/");
        let (window, limit) = if telephony_route {
            (&mut st.window_telephony, telephony)
        } else {
            (&mut st.window_general, general)
        };
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            window.pop_front();
        }
        if window.len() >= limit {
            st.rate_limited += 1;
            return error(503, "Service temporary unavailable");
        }
        window.push_back(now);
    }

    match api_key {
        None | Some("") => return error(401, "\"apiKey\" is missing."),
        Some(k) if k != st.api_key => return error(403, "Wrong \"apiKey\" value."),
        _ => {}
    }
    if method == "POST" && !is_form {
        return error(400, "Errors in the input parameters");
    }

    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("GET", ["api", "credentials"]) => (
            200,
            json!({"success": true, "credentials": [], "scopes": st.scopes, "siteAccess": "access_full",
                   "sitesAvailable": st.sites.iter().collect::<Vec<_>>()}),
        ),
        ("GET", ["api", "v5", "settings"]) => (
            200,
            json!({"success": true, "settings": {"default_currency": {"value": "RUB"}, "timezone": {"value": st.timezone}}}),
        ),
        ("POST", ["api", "v5", "integration-modules", code, "edit"]) => module_edit(st, code, form),
        ("GET", ["api", "v5", "integration-modules", code]) => match &st.module {
            Some(m) if m.get("code").and_then(Value::as_str) == Some(*code) => {
                let mut m = m.clone();
                m["freeze"] = json!(false);
                m["native"] = json!(false);
                (200, json!({"success": true, "integrationModule": m}))
            }
            _ => error(404, "Not found"),
        },
        ("GET", ["api", "v5", "telephony", "manager"]) => {
            match query.get("phone").filter(|p| !p.is_empty()) {
                None => error(400, "Parameter 'phone' is missing"),
                Some(phone) => match st.managers.get(phone) {
                    Some(m) => (200, json!({"success": true, "manager": m})),
                    None => (200, json!({"success": true})),
                },
            }
        }
        ("POST", ["api", "v5", "telephony", "call", "event"]) => call_event(st, form),
        ("POST", ["api", "v5", "telephony", "calls", "upload"]) => calls_upload(st, form),
        ("POST", ["api", "v5", "tasks", "create"]) => task_create(st, form),
        ("POST", ["api", "v5", "users", id, "status"]) => {
            let Ok(id) = id.parse::<i64>() else {
                return error(404, "Not found");
            };
            if !st.users.contains(&id) {
                return error(404, "Not found");
            }
            match form.get("status").map(String::as_str) {
                None => error(400, "Parameter 'status' is missing"),
                Some(s @ ("free" | "busy" | "dinner" | "break")) => {
                    st.statuses.push((id, s.to_string()));
                    (200, json!({"success": true}))
                }
                Some(_) => {
                    validation(json!({"status": "The value you selected is not a valid choice."}))
                }
            }
        }
        _ => error(404, "API method not found"),
    }
}

fn json_field(form: &BTreeMap<String, String>, field: &str) -> Result<Value, (u16, Value)> {
    let raw = form
        .get(field)
        .ok_or_else(|| error(400, &format!("Parameter '{field}' is missing")))?;
    serde_json::from_str(raw)
        .map_err(|_| validation(json!({field: "This value is not valid JSON."})))
}

fn is_url(v: &Value) -> bool {
    v.as_str()
        .and_then(|s| url::Url::parse(s).ok())
        .is_some_and(|u| matches!(u.scheme(), "http" | "https"))
}

fn module_edit(st: &mut State, code: &str, form: &BTreeMap<String, String>) -> (u16, Value) {
    let m = match json_field(form, "integrationModule") {
        Ok(m) => m,
        Err(e) => return e,
    };
    let mut errors = serde_json::Map::new();
    if m.get("code").and_then(Value::as_str) != Some(code) {
        errors.insert(
            "code".into(),
            json!("The code must match the code in the URL."),
        );
    }
    for key in ["integrationCode", "name", "clientId"] {
        if m.get(key).is_some_and(|v| !v.is_string()) {
            errors.insert(key.into(), json!("This value should be of type string."));
        }
    }
    if m.get("active").is_some_and(|v| !v.is_boolean()) {
        errors.insert("active".into(), json!("This value should be of type bool."));
    }
    for key in ["baseUrl", "logo"] {
        if m.get(key).is_some_and(|v| !is_url(v)) {
            errors.insert(key.into(), json!("This value is not a valid URL."));
        }
    }
    let telephony = &m["integrations"]["telephony"];
    for key in ["makeCallUrl", "changeUserStatusUrl"] {
        if telephony.get(key).is_some_and(|v| !is_url(v)) {
            errors.insert(
                format!("integrations[telephony][{key}]"),
                json!("This value is not a valid URL."),
            );
        }
    }
    let mut missing_users = Vec::new();
    for (i, c) in telephony["additionalCodes"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        match (
            c.get("userId").and_then(Value::as_i64),
            c.get("code").and_then(Value::as_str),
        ) {
            (Some(id), Some(_)) => {
                if !st.users.contains(&id) {
                    missing_users.push(id);
                }
            }
            _ => {
                errors.insert(
                    format!("integrations[telephony][additionalCodes][{i}]"),
                    json!("userId and code are required."),
                );
            }
        }
    }
    let mut missing_sites = Vec::new();
    for (i, p) in telephony["externalPhones"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        match (
            p.get("siteCode").and_then(Value::as_str),
            p.get("externalPhone").and_then(Value::as_str),
        ) {
            (Some(site), Some(_)) => {
                if !st.sites.contains(site) {
                    missing_sites.push(site.to_string());
                }
            }
            _ => {
                errors.insert(
                    format!("integrations[telephony][externalPhones][{i}]"),
                    json!("siteCode and externalPhone are required."),
                );
            }
        }
    }
    if !errors.is_empty() {
        return validation(Value::Object(errors));
    }
    let created = st.module.is_none();
    st.module = Some(m);
    // Like PHP, an empty info is an empty array.
    let info = if missing_users.is_empty() && missing_sites.is_empty() {
        json!([])
    } else {
        json!({"notExistUsersIds": missing_users, "notExistSiteCodes": missing_sites})
    };
    (
        if created { 201 } else { 200 },
        json!({"success": true, "info": info}),
    )
}

fn known_codes(st: &State) -> BTreeSet<String> {
    st.module
        .as_ref()
        .and_then(|m| {
            m["integrations"]["telephony"]["additionalCodes"]
                .as_array()
                .cloned()
        })
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("code").and_then(Value::as_str).map(String::from))
        .collect()
}

fn call_event(st: &mut State, form: &BTreeMap<String, String>) -> (u16, Value) {
    let e = match json_field(form, "event") {
        Ok(e) => e,
        Err(e) => return e,
    };
    let mut errors = serde_json::Map::new();
    if !has_text(&e, "phone") {
        errors.insert("phone".into(), json!("This value should not be blank."));
    }
    if !matches!(
        e.get("type").and_then(Value::as_str),
        Some("in" | "out" | "hangup")
    ) {
        errors.insert(
            "type".into(),
            json!("The value you selected is not a valid choice."),
        );
    }
    if let Some(h) = e.get("hangupStatus") {
        if !matches!(
            h.as_str(),
            Some("answered" | "busy" | "cancel" | "failed" | "no answered")
        ) {
            errors.insert(
                "hangupStatus".into(),
                json!("The value you selected is not a valid choice."),
            );
        }
    }
    if e.get("codes")
        .is_some_and(|c| !c.as_array().is_some_and(|a| a.iter().all(Value::is_string)))
    {
        errors.insert(
            "codes".into(),
            json!("This value should be of type string[]."),
        );
    }
    if e.get("userIds")
        .is_some_and(|c| !c.as_array().is_some_and(|a| a.iter().all(Value::is_i64)))
    {
        errors.insert(
            "userIds".into(),
            json!("This value should be of type int[]."),
        );
    }
    if !errors.is_empty() {
        return validation(Value::Object(errors));
    }
    let codes = known_codes(st);
    let not_exist_codes: Vec<&str> = e["codes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|c| !codes.contains(*c))
        .collect();
    let not_exist_users: Vec<i64> = e["userIds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_i64)
        .filter(|u| !st.users.contains(u))
        .collect();
    let body = json!({"success": true, "notExistCodes": not_exist_codes, "notExistUsers": not_exist_users});
    st.events.push(e);
    (200, body)
}

/// A non-empty string field.
fn has_text(v: &Value, key: &str) -> bool {
    v.get(key)
        .and_then(Value::as_str)
        .is_some_and(|p| !p.is_empty())
}

fn is_crm_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 19
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b' ',
            13 | 16 => *c == b':',
            _ => c.is_ascii_digit(),
        })
}

fn calls_upload(st: &mut State, form: &BTreeMap<String, String>) -> (u16, Value) {
    let calls = match json_field(form, "calls") {
        Ok(c) => c,
        Err(e) => return e,
    };
    let Some(calls) = calls.as_array() else {
        return validation(json!({"calls": "This value should be of type array."}));
    };
    if calls.len() > 50 {
        return validation(json!({"calls": "This collection should contain 50 elements or less."}));
    }
    let mut errors = serde_json::Map::new();
    for (i, c) in calls.iter().enumerate() {
        let mut bad = |field: &str, msg: &str| {
            errors.insert(format!("calls[{i}][{field}]"), json!(msg));
        };
        if !c
            .get("date")
            .and_then(Value::as_str)
            .is_some_and(is_crm_date)
        {
            bad("date", "This value is not a valid datetime (Y-m-d H:i:s).");
        }
        if !matches!(c.get("type").and_then(Value::as_str), Some("in" | "out")) {
            bad("type", "The value you selected is not a valid choice.");
        }
        if !has_text(c, "phone") {
            bad("phone", "This value should not be blank.");
        }
        if !matches!(
            c.get("result").and_then(Value::as_str),
            Some("answered" | "busy" | "failed" | "no answer" | "not allowed" | "unknown")
        ) {
            bad("result", "The value you selected is not a valid choice.");
        }
        for key in ["duration", "durationWaiting"] {
            if c.get(key).is_some_and(|v| v.as_u64().is_none()) {
                bad(key, "This value should be a non-negative integer.");
            }
        }
        if c.get("userId").is_some_and(|v| !v.is_i64()) {
            bad("userId", "This value should be of type int.");
        }
        if !has_text(c, "code") && c.get("userId").is_none_or(Value::is_null) {
            bad("code", "Either 'code' or 'userId' should be given");
        }
    }
    if !errors.is_empty() {
        return validation(Value::Object(errors));
    }
    let mut duplicates = Vec::new();
    let mut processed = 0;
    for c in calls {
        let id = c
            .get("externalId")
            .and_then(Value::as_str)
            .map(String::from);
        if let Some(id) = &id {
            *st.upload_counts.entry(id.clone()).or_default() += 1;
        }
        match id {
            Some(id) if st.calls.contains_key(&id) => duplicates.push(id),
            Some(id) => {
                st.calls.insert(id, c.clone());
                processed += 1;
            }
            None => {
                st.calls
                    .insert(format!("crm-{}", st.calls.len() + 1), c.clone());
                processed += 1;
            }
        }
    }
    (
        200,
        json!({"success": true, "processedCallsCount": processed, "duplicateCalls": duplicates}),
    )
}

/// `Y-m-d H:i`.
fn is_task_datetime(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 16
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b' ',
            13 => *c == b':',
            _ => c.is_ascii_digit(),
        })
}

/// The fields of a task retailCRM's clients send (`Task` of the PHP client).
const TASK_FIELDS: &[&str] = &[
    "text",
    "commentary",
    "datetime",
    "performerId",
    "customer",
    "order",
    "phone",
    "phoneSite",
    "complete",
];

fn task_create(st: &mut State, form: &BTreeMap<String, String>) -> (u16, Value) {
    if st.tasks_down {
        return error(503, "Service temporary unavailable");
    }
    let task = match json_field(form, "task") {
        Ok(t) => t,
        Err(e) => return e,
    };
    let Some(fields) = task.as_object() else {
        return validation(json!({"task": "This value should be of type object."}));
    };
    let mut errors = serde_json::Map::new();
    for key in fields.keys() {
        if !TASK_FIELDS.contains(&key.as_str()) {
            errors.insert(key.clone(), json!("This field was not expected."));
        }
    }
    if !has_text(&task, "text") {
        errors.insert("text".into(), json!("This value should not be blank."));
    }
    match task.get("performerId") {
        None | Some(Value::Null) => {
            errors.insert(
                "performerId".into(),
                json!("This value should not be blank."),
            );
        }
        Some(v) => match v.as_i64() {
            None => {
                errors.insert(
                    "performerId".into(),
                    json!("This value should be of type int."),
                );
            }
            Some(id) if !st.users.contains(&id) => {
                errors.insert("performerId".into(), json!("User not found."));
            }
            Some(_) => {}
        },
    }
    if task
        .get("datetime")
        .is_some_and(|d| !d.as_str().is_some_and(is_task_datetime))
    {
        errors.insert(
            "datetime".into(),
            json!("This value is not a valid datetime (Y-m-d H:i)."),
        );
    }
    for key in ["commentary", "phone", "phoneSite"] {
        if task.get(key).is_some_and(|v| !v.is_string()) {
            errors.insert(key.into(), json!("This value should be of type string."));
        }
    }
    if let Some(c) = task.get("customer") {
        let by_id = c.get("id").is_some_and(Value::is_i64);
        let by_external = c.get("externalId").is_some_and(Value::is_string);
        if !(by_id || by_external) {
            errors.insert(
                "customer".into(),
                json!("Customer must be given by id or externalId."),
            );
        }
    }
    if !errors.is_empty() {
        return validation(Value::Object(errors));
    }
    let id = st.tasks.len() as i64 + 1;
    let mut stored = task.clone();
    stored["id"] = json!(id);
    st.tasks.push(stored);
    (201, json!({"success": true, "id": id}))
}
