//! An in-process fake Bitrix24 portal on 127.0.0.1:0: the REST API (inbound webhook and OAuth
//! app), its OAuth server, and the portal's outgoing events (click-to-call).
//!
//! Design: one actix-web server answers `/rest/...` and `/oauth/token/` from a `State` behind an
//! `Arc<Mutex<..>>` that is never held across an await. It follows the checklist in §8 of
//! shared/reference/bitrix24-telephony-api.md and answers the way the real portal does:
//! - Routes `/rest/{uid}/{secret}/{method}[.json|/]` (webhook) and `/rest/{method}` with `auth=`
//!   (OAuth, token in query, form or JSON body); method names are case-insensitive.
//! - Bodies: GET query, POST form with PHP-bracket keys, POST JSON. A body with any other
//!   content type is not read (PHP would not parse it). Multipart is refused (not implemented).
//! - Envelope `{"result", "time"}` (+ `total`, and `next` only when more pages); errors
//!   `{"error", "error_description"}` with the statuses of §1.6; telephony validation errors with
//!   an **empty** `error` and HTTP 400. Like PHP, an empty map comes back as `[]` (e.g. an empty
//!   `result_error` of a batch), and ids are a mix of strings and numbers.
//! - A leaky bucket per portal (one unit per HTTP request, a batch counts once) answers
//!   503 `QUERY_LIMIT_EXCEEDED`; OAuth-server calls and events do not count.
//! - Telephony state: registered calls with the 30-minute dedup among unfinished calls, cards
//!   visible per user (`open_cards()` tells what a test would see left open), the statistics row
//!   written by `finish`, records attached only after finish (`RECORD_URL` is fetched at once).
//! - CRM matching compares digits only: `8 999 …` and `+7 999 …` are different numbers, as on
//!   a portal whose stored format differs from the caller ID (connectors must try variants).
//! - Dates without an offset are accepted (like PHP's `strtotime`, read in the portal's zone,
//!   UTC+3 here) but flagged on the call (`start_offset_missing`) so tests can insist on offsets.
//!
//! Every REST request is recorded (`requests()`), batch sub-calls too (`in_batch`). Left out:
//! the upload-URL mode of attachRecord (FILENAME without FILE_CONTENT), multipart bodies, the
//! per-method time budget (429), domain moves (302), offline events.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::TcpListener;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::Engine as _;
use serde_json::{json, Map, Value};

pub const WEBHOOK_USER: i64 = 1;
pub const WEBHOOK_SECRET: &str = "fakeb24webhooksecret0123";
/// `auth[application_token]` of the events the fake sends.
pub const APP_TOKEN: &str = "fake-b24-application-token-0123";
pub const CLIENT_ID: &str = "local.fake0123456789.12345678";
pub const CLIENT_SECRET: &str = "fakeb24clientsecret0123456789abc";
pub const MEMBER_ID: &str = "fakememberid0123456789abcdef0123";
/// The OAuth app's id as the portal reports it (`REST_APP_ID`).
pub const APP_ID: i64 = 7;
/// Page size of list methods, and the most sub-calls a batch runs.
pub const PAGE: usize = 50;
pub const BATCH_MAX: usize = 50;
/// The portal server's zone (hours east of UTC): dates without an offset are read in it.
pub const PORTAL_OFFSET_HOURS: i8 = 3;
/// `register` returns an unfinished call of the same user/number/type registered this recently.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(30 * 60);

pub const CALL_NOT_FOUND: &str = "Call is not found (call should be registered prior to finishing";
pub const NOT_IN_STATISTIC: &str =
    "Call is not found in the statistic table. Looks like it is not finished yet.";
pub const USER_NOT_SET: &str = "USER_ID or USER_PHONE_INNER should be set";
pub const USER_NOT_ACTIVE: &str = "User is not found or is not active";

/// One REST request (or batch sub-call) as the fake saw it.
#[derive(Debug, Clone)]
pub struct B24Request {
    /// Lower-case, without a `.json` suffix.
    pub method: String,
    /// The decoded parameters (an object), without `auth`.
    pub params: Value,
    /// `"webhook"`, `"oauth"` (an `auth` token was given) or `"none"`.
    pub auth: &'static str,
    pub status: u16,
    /// The `error` code of an error answer (`Some("")` for telephony validation errors).
    pub error: Option<String>,
    /// The `error_description` of an error answer.
    pub description: Option<String>,
    pub in_batch: bool,
    pub at: Instant,
}

/// A call registered on the portal.
#[derive(Debug, Clone)]
pub struct FakeCall {
    pub call_id: String,
    pub user_id: i64,
    /// As stored after stripping everything but `0-9#*+,;`.
    pub phone: String,
    /// `TYPE`: 1 outgoing, 2 incoming, 3 incoming redirected, 4 callback, 5 info.
    pub kind: i64,
    /// `CALL_START_DATE` as given, or "".
    pub start: String,
    /// A `CALL_START_DATE` was given without a UTC offset (the portal read it in its own zone).
    pub start_offset_missing: bool,
    /// The start as the portal understood it (unix seconds).
    pub start_unix: i64,
    pub crm_create: bool,
    pub line: Option<String>,
    pub external_call_id: Option<String>,
    pub show: bool,
    /// The parameters of the `register` that created it.
    pub registered: Value,
    /// `"webhook"`, `"oauth"` or `"portal"` (registered by `click_to_call`).
    pub registered_via: &'static str,
    pub registered_at: Instant,
    /// Further `register` calls answered with this call (the 30-minute dedup).
    pub dedup_hits: usize,
    /// The PHONE_NUMBER is some user's extension: no CRM search or creation.
    pub internal: bool,
    /// Params of the successful finish.
    pub finished: Option<Value>,
    pub finished_by: Option<i64>,
    pub finished_at: Option<Instant>,
    /// The statistics row `finish` answered with.
    pub statistic: Option<Value>,
    /// `finish` attempts naming this CALL_ID (the successful one and refused later ones).
    pub finish_count: usize,
    /// Users whose card is open now (a card stays open after finish for users other than the
    /// finisher: nothing can hide it any more).
    pub visible: BTreeSet<i64>,
    pub shown_ever: BTreeSet<i64>,
    /// Card operations in order: ("show" | "hide" | "register" | "finish", user).
    pub card_log: Vec<(&'static str, i64)>,
    /// attachRecord params, FILE_CONTENT replaced by `{"bytes": n}`; with RECORD_URL also
    /// `fetched_status`, `fetched_bytes`, `fetched_type`; each has `FILE_ID` and `replaced`
    /// (true once a later attach replaced it).
    pub records: Vec<Value>,
    pub crm_entity: Option<(String, i64)>,
    pub created_lead: Option<i64>,
    /// Registered by `click_to_call` (the portal itself).
    pub by_portal: bool,
}

impl FakeCall {
    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }

    /// The record in force (the last one attached).
    pub fn record(&self) -> Option<&Value> {
        self.records.last()
    }
}

#[derive(Debug, Clone)]
pub struct FakeUser {
    pub id: i64,
    pub name: String,
    pub last_name: String,
    pub extension: Option<String>,
    pub active: bool,
}

#[derive(Debug, Clone)]
pub struct FakeContact {
    pub id: i64,
    pub phone: String,
    pub assigned_by_id: i64,
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct FakeLead {
    pub id: i64,
    pub phone: String,
    pub assigned_by_id: i64,
    pub title: String,
    /// The call whose register created it.
    pub call_id: String,
}

#[derive(Debug, Clone)]
pub struct FakeLine {
    pub id: i64,
    pub number: String,
    pub name: String,
    pub crm_auto_create: bool,
    /// The app it belongs to: "webhook" or "oauth".
    pub app: &'static str,
    /// Created by a register naming an unknown LINE_NUMBER.
    pub auto_created: bool,
}

#[derive(Debug, Clone)]
pub struct FakeBinding {
    pub event: String,
    pub handler: String,
    pub offline: bool,
}

/// One call of the OAuth server.
#[derive(Debug, Clone)]
pub struct OAuthRequest {
    pub http_method: String,
    pub grant_type: String,
    pub status: u16,
    pub error: Option<String>,
    pub at: Instant,
}

#[derive(Debug, Clone)]
struct ApiError {
    status: u16,
    code: String,
    description: String,
}

impl ApiError {
    fn body(&self) -> Value {
        json!({"error": self.code, "error_description": self.description})
    }
}

fn err(status: u16, code: &str, description: &str) -> ApiError {
    ApiError {
        status,
        code: code.into(),
        description: description.into(),
    }
}

/// A telephony validation error: HTTP 400 with an empty `error`.
fn tel(description: &str) -> ApiError {
    err(400, "", description)
}

struct Reply {
    result: Value,
    total: Option<usize>,
    next: Option<usize>,
}

impl From<Value> for Reply {
    fn from(result: Value) -> Reply {
        Reply {
            result,
            total: None,
            next: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Webhook,
    OAuth,
    Portal,
}

impl Caller {
    fn label(self) -> &'static str {
        match self {
            Caller::Webhook => "webhook",
            Caller::OAuth => "oauth",
            Caller::Portal => "portal",
        }
    }
}

struct Bucket {
    capacity: u32,
    drain_per_s: f64,
    level: f64,
    last: Instant,
}

impl Bucket {
    fn admit(&mut self) -> bool {
        let now = Instant::now();
        let drained = now.duration_since(self.last).as_secs_f64() * self.drain_per_s;
        self.level = (self.level - drained).max(0.0);
        self.last = now;
        if self.level + 1.0 > f64::from(self.capacity) {
            false
        } else {
            self.level += 1.0;
            true
        }
    }
}

struct AccessToken {
    expires_at: Instant,
    expired: bool,
}

struct Fault {
    method: String,
    error: ApiError,
}

struct State {
    users: BTreeMap<i64, FakeUser>,
    contacts: Vec<FakeContact>,
    leads: Vec<FakeLead>,
    lines: Vec<FakeLine>,
    bindings: Vec<FakeBinding>,
    calls: Vec<FakeCall>,
    requests: Vec<B24Request>,
    rejected: usize,
    bucket: Bucket,
    outage: bool,
    faults: VecDeque<Fault>,
    strict_auth_type: bool,
    scopes: Vec<String>,
    record_bytes: HashMap<String, Vec<u8>>,
    next_contact: i64,
    next_lead: i64,
    next_stat: i64,
    next_file: i64,
    next_line: i64,
    next_activity: i64,
    /// `crm.<activity|lead|contact|company>.update` taken: (kind, id, fields).
    updates: Vec<(String, i64, Value)>,
    // OAuth server
    codes: HashSet<String>,
    access: HashMap<String, AccessToken>,
    /// refresh token → used
    refresh: HashMap<String, bool>,
    access_ttl: Duration,
    refreshes: usize,
    oauth_log: Vec<OAuthRequest>,
}

impl State {
    fn new() -> State {
        let mut users = BTreeMap::new();
        let people: [(i64, &str, &str, Option<&str>, bool); 6] = [
            (1, "Ivan", "Adminov", Some("100"), true),
            (11, "Anna", "Petrova", Some("101"), true),
            (12, "Boris", "Sidorov", Some("102"), true),
            (13, "Vera", "Orlova", Some("103"), true),
            (14, "Gleb", "Dismissed", Some("104"), false),
            (15, "Daria", "Noext", None, true),
        ];
        for (id, name, last, ext, active) in people {
            users.insert(
                id,
                FakeUser {
                    id,
                    name: name.into(),
                    last_name: last.into(),
                    extension: ext.map(String::from),
                    active,
                },
            );
        }
        State {
            users,
            contacts: Vec::new(),
            leads: Vec::new(),
            lines: Vec::new(),
            bindings: Vec::new(),
            calls: Vec::new(),
            requests: Vec::new(),
            rejected: 0,
            bucket: Bucket {
                capacity: 50,
                drain_per_s: 2.0,
                level: 0.0,
                last: Instant::now(),
            },
            outage: false,
            faults: VecDeque::new(),
            strict_auth_type: false,
            scopes: ["telephony", "crm", "user"].map(String::from).to_vec(),
            record_bytes: HashMap::new(),
            next_contact: 1,
            next_lead: 1,
            next_stat: 1001,
            next_file: 501,
            next_line: 1,
            next_activity: 9001,
            updates: Vec::new(),
            codes: HashSet::new(),
            access: HashMap::new(),
            refresh: HashMap::new(),
            access_ttl: Duration::from_secs(3600),
            refreshes: 0,
            oauth_log: Vec::new(),
        }
    }

    fn active_user(&self, id: i64) -> Option<&FakeUser> {
        self.users.get(&id).filter(|u| u.active)
    }

    fn extension_of(&self, id: i64) -> Option<String> {
        self.users.get(&id).and_then(|u| u.extension.clone())
    }

    /// A fresh access/refresh pair.
    fn issue_tokens(&mut self) -> (String, String) {
        let access = format!("{:032x}", rand::random::<u128>());
        let refresh = format!("{:032x}", rand::random::<u128>());
        self.access.insert(
            access.clone(),
            AccessToken {
                expires_at: Instant::now() + self.access_ttl,
                expired: false,
            },
        );
        self.refresh.insert(refresh.clone(), false);
        (access, refresh)
    }
}

struct Shared {
    state: Arc<Mutex<State>>,
    url: String,
    http: reqwest::Client,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }
}

pub struct FakeBitrix24 {
    /// The portal's origin, `http://127.0.0.1:PORT`; the OAuth server is at `{url}/oauth/token/`.
    pub url: String,
    state: Arc<Mutex<State>>,
    http: reqwest::Client,
    handle: ServerHandle,
}

impl FakeBitrix24 {
    pub async fn start() -> FakeBitrix24 {
        let state = Arc::new(Mutex::new(State::new()));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake Bitrix24");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let shared = web::Data::new(Shared {
            state: state.clone(),
            url: url.clone(),
            http: http.clone(),
        });
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .app_data(web::PayloadConfig::new(32 * 1024 * 1024))
                .default_service(web::to(dispatch))
        })
        .workers(2)
        .disable_signals()
        .listen(listener)
        .expect("listen fake Bitrix24")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        FakeBitrix24 {
            url,
            state,
            http,
            handle,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    pub async fn stop(&self) {
        self.handle.stop(false).await;
    }

    /// `{url}/rest/1/{WEBHOOK_SECRET}/`
    pub fn webhook_url(&self) -> String {
        format!("{}/rest/{WEBHOOK_USER}/{WEBHOOK_SECRET}/", self.url)
    }

    /// `{url}/rest/`: the OAuth `client_endpoint`.
    pub fn client_endpoint(&self) -> String {
        format!("{}/rest/", self.url)
    }

    /// `{url}/oauth/token/`
    pub fn oauth_token_url(&self) -> String {
        format!("{}/oauth/token/", self.url)
    }

    /// `127.0.0.1:PORT`, what `auth[domain]` carries.
    pub fn domain(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }

    // ---- portal content -------------------------------------------------------------------

    /// Adds (or replaces) a user.
    pub fn add_user(&self, id: i64, extension: Option<&str>, active: bool) {
        self.lock().users.insert(
            id,
            FakeUser {
                id,
                name: format!("User{id}"),
                last_name: format!("Last{id}"),
                extension: extension.map(String::from),
                active,
            },
        );
    }

    pub fn users(&self) -> Vec<FakeUser> {
        self.lock().users.values().cloned().collect()
    }

    /// A CONTACT with that PHONE, assigned to `assigned_by_id`; its id.
    pub fn add_contact(&self, phone: &str, assigned_by_id: i64) -> i64 {
        let mut st = self.lock();
        let id = st.next_contact;
        st.next_contact += 1;
        st.contacts.push(FakeContact {
            id,
            phone: phone.to_string(),
            assigned_by_id,
            name: format!("Contact {id}"),
        });
        id
    }

    pub fn contacts(&self) -> Vec<FakeContact> {
        self.lock().contacts.clone()
    }

    /// Leads created by `register` with CRM_CREATE (ASSIGNED_BY_ID follows the finisher).
    pub fn leads(&self) -> Vec<FakeLead> {
        self.lock().leads.clone()
    }

    pub fn lines(&self) -> Vec<FakeLine> {
        self.lock().lines.clone()
    }

    pub fn bindings(&self) -> Vec<FakeBinding> {
        self.lock().bindings.clone()
    }

    /// What `crm.<activity|lead|contact|company>.update` changed: (kind, id, fields).
    pub fn updates(&self) -> Vec<(String, i64, Value)> {
        self.lock().updates.clone()
    }

    /// The scopes `scope` reports and methods are checked against (default telephony, crm,
    /// user); a method outside them gets 403 `insufficient_scope`.
    pub fn set_scopes(&self, scopes: &[&str]) {
        self.lock().scopes = scopes.iter().map(|s| s.to_string()).collect();
    }

    // ---- faults ---------------------------------------------------------------------------

    /// Leaky bucket: `capacity` requests, draining `drain_per_s` per second; resets the level.
    pub fn set_bucket(&self, capacity: u32, drain_per_s: f64) {
        let mut st = self.lock();
        st.bucket = Bucket {
            capacity,
            drain_per_s,
            level: 0.0,
            last: Instant::now(),
        };
    }

    /// While on, every /rest request gets 503 with an HTML page (portal down).
    pub fn set_outage(&self, on: bool) {
        self.lock().outage = on;
    }

    /// The next call of `method` (case-insensitive; batch sub-calls included) gets this error
    /// answer. Several can be queued.
    pub fn fail_next(&self, method: &str, status: u16, error: &str, description: &str) {
        self.lock().faults.push_back(Fault {
            method: normalize_method(method),
            error: err(status, error, description),
        });
    }

    /// While on, webhook calls of register/finish/externalLine.* get 403 WRONG_AUTH_TYPE.
    pub fn set_strict_auth_type(&self, on: bool) {
        self.lock().strict_auth_type = on;
    }

    // ---- what happened --------------------------------------------------------------------

    /// Every REST request in arrival order (a batch, then its sub-calls with `in_batch`).
    pub fn requests(&self) -> Vec<B24Request> {
        self.lock().requests.clone()
    }

    /// Requests (batch sub-calls included) of one method, case-insensitive.
    pub fn requests_of(&self, method: &str) -> Vec<B24Request> {
        let m = normalize_method(method);
        self.lock()
            .requests
            .iter()
            .filter(|r| r.method == m)
            .cloned()
            .collect()
    }

    /// How many 503 QUERY_LIMIT_EXCEEDED were answered.
    pub fn rejected(&self) -> usize {
        self.lock().rejected
    }

    /// Registered calls in order.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    pub fn call(&self, call_id: &str) -> Option<FakeCall> {
        self.lock()
            .calls
            .iter()
            .find(|c| c.call_id == call_id)
            .cloned()
    }

    /// Cards visible now, over all calls: (CALL_ID, user).
    pub fn open_cards(&self) -> Vec<(String, i64)> {
        self.lock()
            .calls
            .iter()
            .flat_map(|c| c.visible.iter().map(|u| (c.call_id.clone(), *u)))
            .collect()
    }

    /// The bytes of the record in force for a call (decoded FILE_CONTENT or the fetched body).
    pub fn record_bytes(&self, call_id: &str) -> Option<Vec<u8>> {
        self.lock().record_bytes.get(call_id).cloned()
    }

    /// Polls `f` every 10 ms until it gives something; after `within`, panics naming `what`
    /// with a dump of `calls()`.
    pub async fn wait_for<T>(
        &self,
        within: Duration,
        what: &str,
        f: impl Fn(&FakeBitrix24) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            if let Some(t) = f(self) {
                return t;
            }
            if Instant::now() >= deadline {
                panic!(
                    "fake Bitrix24: no {what} within {within:?}; calls: {:#?}",
                    self.calls()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // ---- OAuth ----------------------------------------------------------------------------

    /// A one-shot authorization code for CLIENT_ID.
    pub fn issue_code(&self) -> String {
        let code = format!("{:032x}", rand::random::<u128>());
        self.lock().codes.insert(code.clone());
        code
    }

    /// A valid access/refresh pair without going through the OAuth server.
    pub fn issue_tokens(&self) -> (String, String) {
        self.lock().issue_tokens()
    }

    /// Lifetime of access tokens issued from now on (default 3600 s).
    pub fn set_access_ttl(&self, ttl: Duration) {
        self.lock().access_ttl = ttl;
    }

    /// Every access token issued so far is expired (401 expired_token).
    pub fn expire_access_tokens(&self) {
        for t in self.lock().access.values_mut() {
            t.expired = true;
        }
    }

    /// Every access token issued so far is forgotten (401 invalid_token).
    pub fn revoke_access_tokens(&self) {
        self.lock().access.clear();
    }

    /// Successful refresh_token grants.
    pub fn refreshes(&self) -> usize {
        self.lock().refreshes
    }

    pub fn oauth_requests(&self) -> Vec<OAuthRequest> {
        self.lock().oauth_log.clone()
    }

    // ---- calling the fake (for tests) -----------------------------------------------------

    /// POSTs `params` as JSON to `method` over the webhook; (status, body).
    pub async fn call_webhook(&self, method: &str, params: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{method}", self.webhook_url()))
            .json(params)
            .send()
            .await
            .expect("fake Bitrix24 answers");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    // ---- events ---------------------------------------------------------------------------

    /// Builds an event form like the portal's: `event`, `data[..]`, `ts`, `event_handler_id`,
    /// `auth[domain|client_endpoint|server_endpoint|member_id|application_token]`.
    pub fn event_form(
        &self,
        event: &str,
        data: &[(&str, &str)],
        token: &str,
    ) -> Vec<(String, String)> {
        let mut form = vec![("event".to_string(), event.to_string())];
        for (k, v) in data {
            form.push((format!("data[{k}]"), v.to_string()));
        }
        form.push(("ts".into(), unix_now().to_string()));
        form.push(("event_handler_id".into(), "7".into()));
        form.push(("auth[domain]".into(), self.domain()));
        form.push(("auth[client_endpoint]".into(), self.client_endpoint()));
        form.push(("auth[server_endpoint]".into(), self.client_endpoint()));
        form.push(("auth[member_id]".into(), MEMBER_ID.into()));
        form.push(("auth[application_token]".into(), token.into()));
        form
    }

    /// POSTs the form (url-encoded) to `handler`, once, no retry; the handler's status (0 when
    /// it could not be reached).
    pub async fn post_event(&self, handler: &str, form: &[(String, String)]) -> u16 {
        match self.http.post(handler).form(form).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// Like Bitrix24 when a user clicks a number: registers a TYPE 1 call for `user_id` (no
    /// EXTERNAL_CALL_ID, SHOW 1), then posts ONEXTERNALCALLSTART to `handler`.
    pub async fn click_to_call(&self, handler: &str, user_id: i64, phone: &str) -> (String, u16) {
        let (call_id, entity) = {
            let mut st = self.lock();
            let params = json!({"USER_ID": user_id, "PHONE_NUMBER": phone, "TYPE": 1, "SHOW": 1});
            let r = register(&mut st, &params, Caller::Portal).unwrap_or_else(|e| {
                panic!("fake Bitrix24: click_to_call cannot register for user {user_id}: {e:?}")
            });
            let call_id = r["CALL_ID"].as_str().unwrap().to_string();
            let c = st.calls.iter().find(|c| c.call_id == call_id).unwrap();
            (call_id, c.crm_entity.clone())
        };
        let (etype, eid) = entity.unwrap_or_else(|| ("LEAD".into(), 0));
        let intl = international(phone);
        let uid = user_id.to_string();
        let eid = eid.to_string();
        let data = [
            ("PHONE_NUMBER", phone),
            ("PHONE_NUMBER_INTERNATIONAL", intl.as_str()),
            ("EXTENSION", ""),
            ("USER_ID", uid.as_str()),
            ("CALL_ID", call_id.as_str()),
            ("LINE_NUMBER", ""),
            ("CRM_ENTITY_TYPE", etype.as_str()),
            ("CRM_ENTITY_ID", eid.as_str()),
            ("CALL_LIST_ID", "0"),
            ("IS_MOBILE", "0"),
        ];
        let form = self.event_form("ONEXTERNALCALLSTART", &data, APP_TOKEN);
        let status = self.post_event(handler, &form).await;
        (call_id, status)
    }

    /// A CRM web-form callback request: posts ONEXTERNALCALLBACKSTART (no call is registered).
    pub async fn callback_request(&self, handler: &str, phone: &str, line: &str) -> u16 {
        let data = [
            ("PHONE_NUMBER", phone),
            ("LINE_NUMBER", line),
            ("CRM_ENTITY_TYPE", "LEAD"),
            ("CRM_ENTITY_ID", "0"),
            ("TEXT", ""),
            ("VOICE", ""),
        ];
        let form = self.event_form("ONEXTERNALCALLBACKSTART", &data, APP_TOKEN);
        self.post_event(handler, &form).await
    }

    /// Installs the OAuth app on a UI-less handler: posts ONAPPINSTALL with fresh tokens;
    /// (handler status, access token, refresh token).
    pub async fn install_app(&self, handler: &str) -> (u16, String, String) {
        let (access, refresh) = self.issue_tokens();
        let ttl = self.lock().access_ttl.as_secs();
        let form = vec![
            ("event".to_string(), "ONAPPINSTALL".to_string()),
            ("data[VERSION]".into(), "1".into()),
            ("data[LANGUAGE_ID]".into(), "en".into()),
            ("ts".into(), unix_now().to_string()),
            ("auth[access_token]".into(), access.clone()),
            (
                "auth[expires]".into(),
                (unix_now() + ttl as i64).to_string(),
            ),
            ("auth[expires_in]".into(), ttl.to_string()),
            ("auth[scope]".into(), "telephony,crm,user".into()),
            ("auth[domain]".into(), self.domain()),
            ("auth[server_endpoint]".into(), self.client_endpoint()),
            ("auth[status]".into(), "L".into()),
            ("auth[client_endpoint]".into(), self.client_endpoint()),
            ("auth[member_id]".into(), MEMBER_ID.into()),
            ("auth[user_id]".into(), WEBHOOK_USER.to_string()),
            ("auth[refresh_token]".into(), refresh.clone()),
            ("auth[application_token]".into(), APP_TOKEN.into()),
        ];
        (self.post_event(handler, &form).await, access, refresh)
    }
}

// ---- small helpers --------------------------------------------------------------------------

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn now_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn portal_tz() -> jiff::tz::TimeZone {
    jiff::tz::TimeZone::fixed(jiff::tz::Offset::constant(PORTAL_OFFSET_HOURS))
}

/// ISO-8601 with the portal's offset, like `2026-03-07T10:20:30+03:00`.
fn iso(unix: i64) -> String {
    jiff::Timestamp::from_second(unix)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_zoned(portal_tz())
        .strftime("%Y-%m-%dT%H:%M:%S%:z")
        .to_string()
}

fn time_block(start: f64, finish: f64) -> Value {
    json!({
        "start": start,
        "finish": finish,
        "duration": finish - start,
        "processing": finish - start,
        "date_start": iso(start as i64),
        "date_finish": iso(finish as i64),
        "operating": 0,
        "operating_reset_at": start as i64 + 600,
    })
}

/// A CALL_START_DATE: (unix seconds, offset missing), or None for garbage.
fn parse_start(s: &str) -> Option<(i64, bool)> {
    let s = s.trim();
    if let Ok(ts) = s.parse::<jiff::Timestamp>() {
        return Some((ts.as_second(), false));
    }
    let dt = s.parse::<jiff::civil::DateTime>().ok()?;
    let z = dt.to_zoned(portal_tz()).ok()?;
    Some((z.timestamp().as_second(), true))
}

/// What the portal keeps of a phone number: `0-9 # * + , ;`.
pub fn strip_phone(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_digit() || "#*+,;".contains(*c))
        .collect()
}

fn digits(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_digit()).collect()
}

/// Same number when the digits are the same (and there are some).
fn same_number(a: &str, b: &str) -> bool {
    let (a, b) = (digits(a), digits(b));
    !a.is_empty() && a == b
}

/// E.164 the way Bitrix's parser would print a Russian number.
fn international(phone: &str) -> String {
    let d = digits(phone);
    if d.len() == 11 && d.starts_with('8') {
        format!("+7{}", &d[1..])
    } else {
        format!("+{d}")
    }
}

fn normalize_method(m: &str) -> String {
    let m = m.trim().trim_end_matches('/').to_ascii_lowercase();
    m.strip_suffix(".json").map(String::from).unwrap_or(m)
}

/// A parameter, the key compared case-insensitively (the portal upper-cases them).
fn get<'a>(p: &'a Value, key: &str) -> Option<&'a Value> {
    let m = p.as_object()?;
    m.get(key)
        .or_else(|| {
            m.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v)
        })
        .filter(|v| !v.is_null())
}

/// A scalar as PHP turns it into a string; containers and null → None.
fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(true) => Some("1".into()),
        Value::Bool(false) => Some(String::new()),
        _ => None,
    }
}

/// PHP's `(int)`: leading digits of a string (0 when none); None when absent.
fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => {
            let t = s.trim();
            let (sign, rest) = match t.strip_prefix('-') {
                Some(r) => (-1, r),
                None => (1, t.strip_prefix('+').unwrap_or(t)),
            };
            let lead: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            Some(sign * lead.parse::<i64>().unwrap_or(0))
        }
        Value::Bool(b) => Some(i64::from(*b)),
        _ => None,
    }
}

/// PHP's `(bool)`: "0", "", 0, false, empty arrays are false; anything else true.
fn php_bool(v: Option<&Value>, default: bool) -> bool {
    match v {
        None | Some(Value::Null) => default,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => !(s.is_empty() || s == "0"),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

/// A filter flag such as ACTIVE: true / "Y" / "1" / "true".
fn filter_flag(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => matches!(s.to_ascii_lowercase().as_str(), "y" | "1" | "true"),
        _ => false,
    }
}

/// Like PHP's `json_encode` of an array: a list when keyed 0..n-1, an empty array as `[]`.
fn php_map(entries: Vec<(String, Value)>, list: bool) -> Value {
    if entries.is_empty() {
        return json!([]);
    }
    if list
        && entries
            .iter()
            .enumerate()
            .all(|(i, (k, _))| *k == i.to_string())
    {
        return Value::Array(entries.into_iter().map(|(_, v)| v).collect());
    }
    Value::Object(entries.into_iter().collect())
}

// ---- PHP-style parameter decoding -----------------------------------------------------------

enum Node {
    Leaf(String),
    Map(Vec<(String, Node)>),
}

/// `a[b][]` → ["a", "b", ""]; None for a key PHP would drop.
fn split_key(k: &str) -> Option<Vec<String>> {
    let Some(i) = k.find('[') else {
        return (!k.is_empty()).then(|| vec![k.to_string()]);
    };
    if i == 0 {
        return None;
    }
    let mut segs = vec![k[..i].to_string()];
    let mut rest = &k[i..];
    while let Some(r) = rest.strip_prefix('[') {
        match r.find(']') {
            Some(e) => {
                segs.push(r[..e].to_string());
                rest = &r[e + 1..];
            }
            // An unclosed bracket: PHP keeps the name as it is.
            None if segs.len() == 1 => return Some(vec![k.to_string()]),
            None => break,
        }
    }
    Some(segs)
}

fn insert(map: &mut Vec<(String, Node)>, segs: &[String], value: String) {
    let key = if segs[0].is_empty() {
        map.iter()
            .filter_map(|(k, _)| k.parse::<i64>().ok())
            .max()
            .map_or(0, |m| m + 1)
            .to_string()
    } else {
        segs[0].clone()
    };
    let pos = map.iter().position(|(k, _)| *k == key);
    if segs.len() == 1 {
        match pos {
            Some(p) => map[p].1 = Node::Leaf(value),
            None => map.push((key, Node::Leaf(value))),
        }
        return;
    }
    let p = match pos {
        Some(p) => {
            if matches!(map[p].1, Node::Leaf(_)) {
                map[p].1 = Node::Map(Vec::new());
            }
            p
        }
        None => {
            map.push((key, Node::Map(Vec::new())));
            map.len() - 1
        }
    };
    if let Node::Map(inner) = &mut map[p].1 {
        insert(inner, &segs[1..], value);
    }
}

fn node_value(n: Node) -> Value {
    match n {
        Node::Leaf(s) => Value::String(s),
        Node::Map(entries) => {
            let entries: Vec<(String, Value)> = entries
                .into_iter()
                .map(|(k, v)| (k, node_value(v)))
                .collect();
            php_map(entries, true)
        }
    }
}

/// Decodes url-encoded pairs with PHP-bracket keys (`USER_ID[]=1`, `FILTER[ACTIVE]=Y`) into an
/// object; lists keyed 0..n-1 become arrays.
pub fn php_parse(pairs: &[(String, String)]) -> Value {
    let mut root = Vec::new();
    for (k, v) in pairs {
        if let Some(segs) = split_key(k) {
            insert(&mut root, &segs, v.clone());
        }
    }
    Value::Object(root.into_iter().map(|(k, v)| (k, node_value(v))).collect())
}

/// Decodes a query string like the portal does.
pub fn php_parse_query(q: &str) -> Value {
    php_parse(&serde_urlencoded::from_str::<Vec<(String, String)>>(q).unwrap_or_default())
}

/// The keys of `cmd[...]` in the order they came.
fn cmd_order_of(pairs: &[(String, String)]) -> Option<Vec<String>> {
    let mut keys: Vec<String> = Vec::new();
    for (k, _) in pairs {
        if k.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("cmd[")) {
            if let Some(e) = k[4..].find(']') {
                let key = k[4..4 + e].to_string();
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
    }
    (!keys.is_empty()).then_some(keys)
}

/// The keys of a JSON body's `cmd` object in document order (serde_json's map sorts them).
fn json_cmd_order(body: &[u8]) -> Option<Vec<String>> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Keys, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some(k) = m.next_key::<String>()? {
                        m.next_value::<IgnoredAny>()?;
                        keys.push(k);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(V)
        }
    }
    struct Top(Option<Vec<String>>);
    impl<'de> serde::Deserialize<'de> for Top {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Top, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Top;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Top, A::Error> {
                    let mut out = None;
                    while let Some(k) = m.next_key::<String>()? {
                        if k.eq_ignore_ascii_case("cmd") {
                            out = Some(m.next_value::<Keys>()?.0);
                        } else {
                            m.next_value::<IgnoredAny>()?;
                        }
                    }
                    Ok(Top(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Top>(body).ok().and_then(|t| t.0)
}

struct Decoded {
    params: Value,
    cmd_order: Option<Vec<String>>,
}

fn decode(req: &HttpRequest, body: &[u8]) -> Result<Decoded, ApiError> {
    let query: Vec<(String, String)> =
        serde_urlencoded::from_str(req.query_string()).map_err(|_| {
            err(
                400,
                "INVALID_REQUEST",
                "The query string is not url-encoded",
            )
        })?;
    let ctype = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let query_only = || Decoded {
        params: php_parse(&query),
        cmd_order: cmd_order_of(&query),
    };
    if req.method() == actix_web::http::Method::GET || body.is_empty() {
        return Ok(query_only());
    }
    if ctype.starts_with("application/json") {
        let v: Value = serde_json::from_slice(body).map_err(|e| {
            err(
                400,
                "INVALID_REQUEST",
                &format!("The JSON body does not parse: {e}"),
            )
        })?;
        let Value::Object(obj) = v else {
            return Err(err(
                400,
                "INVALID_REQUEST",
                "The JSON body is not an object",
            ));
        };
        let mut params = php_parse(&query);
        let m = params.as_object_mut().unwrap();
        for (k, v) in obj {
            m.insert(k, v);
        }
        return Ok(Decoded {
            params,
            cmd_order: json_cmd_order(body).or_else(|| cmd_order_of(&query)),
        });
    }
    if ctype.starts_with("application/x-www-form-urlencoded") {
        let form: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
            .map_err(|_| err(400, "INVALID_REQUEST", "The form body is not url-encoded"))?;
        let mut all = query.clone();
        all.extend(form);
        return Ok(Decoded {
            params: php_parse(&all),
            cmd_order: cmd_order_of(&all),
        });
    }
    if ctype.starts_with("multipart/") {
        return Err(err(
            400,
            "FAKE_UNSUPPORTED",
            "The fake Bitrix24 does not parse multipart bodies",
        ));
    }
    // PHP reads no other body: only the query string counts.
    Ok(query_only())
}

// ---- HTTP -----------------------------------------------------------------------------------

fn json_answer(status: u16, body: Value) -> HttpResponse {
    HttpResponse::build(StatusCode::from_u16(status).unwrap()).json(body)
}

async fn dispatch(req: HttpRequest, body: web::Bytes, sh: web::Data<Shared>) -> HttpResponse {
    let path = req.path().to_string();
    if path == "/oauth/token/" || path == "/oauth/token" {
        return oauth(&req, &body, &sh);
    }
    if let Some(rest) = path.strip_prefix("/rest/") {
        return rest_call(&req, &body, &sh, rest).await;
    }
    HttpResponse::NotFound()
        .content_type("text/html; charset=utf-8")
        .body("<html><body><h1>404 Not Found</h1></body></html>")
}

enum Route<'a> {
    Webhook(&'a str, &'a str),
    OAuth,
    Bad,
}

async fn rest_call(req: &HttpRequest, body: &[u8], sh: &Shared, rest: &str) -> HttpResponse {
    let t0 = now_f64();
    let segs: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let (route, raw_method) = match segs.as_slice() {
        [m] => (Route::OAuth, *m),
        [uid, secret, m] => (Route::Webhook(uid, secret), *m),
        _ => (Route::Bad, ""),
    };
    let method = normalize_method(raw_method);
    let decoded = decode(req, body);
    let (mut params, cmd_order, decode_error) = match decoded {
        Ok(d) => (d.params, d.cmd_order, None),
        Err(e) => (json!({}), None, Some(e)),
    };
    let token = params
        .as_object_mut()
        .and_then(|m| {
            let key = m.keys().find(|k| k.eq_ignore_ascii_case("auth")).cloned()?;
            m.remove(&key)
        })
        .and_then(|v| text(Some(&v)));
    let label = match route {
        Route::Webhook(..) => "webhook",
        Route::OAuth if token.as_deref().is_some_and(|t| !t.is_empty()) => "oauth",
        _ => "none",
    };
    let index = {
        let mut st = sh.lock();
        st.requests.push(B24Request {
            method: method.clone(),
            params: params.clone(),
            auth: label,
            status: 0,
            error: None,
            description: None,
            in_batch: false,
            at: Instant::now(),
        });
        st.requests.len() - 1
    };

    // The gate: outage, bucket, authentication.
    let gate: Result<Caller, ApiError> = {
        let mut st = sh.lock();
        if st.outage {
            st.requests[index].status = 503;
            return HttpResponse::ServiceUnavailable()
                .content_type("text/html; charset=utf-8")
                .body("<!DOCTYPE html><html><head><title>503 Service Temporarily Unavailable</title></head><body><h1>Service Temporarily Unavailable</h1><p>The portal is under maintenance.</p></body></html>");
        }
        if !st.bucket.admit() {
            st.rejected += 1;
            Err(err(503, "QUERY_LIMIT_EXCEEDED", "Too many requests"))
        } else {
            match route {
                Route::Webhook(uid, secret) => {
                    if uid.parse::<i64>() == Ok(WEBHOOK_USER) && secret == WEBHOOK_SECRET {
                        Ok(Caller::Webhook)
                    } else {
                        Err(err(401, "NO_AUTH_FOUND", "Wrong authorization data"))
                    }
                }
                Route::OAuth => match token.as_deref().filter(|t| !t.is_empty()) {
                    None => Err(err(401, "NO_AUTH_FOUND", "Wrong authorization data")),
                    Some(t) => match st.access.get(t) {
                        None => Err(err(
                            401,
                            "invalid_token",
                            "The access token provided is invalid.",
                        )),
                        Some(a) if a.expired || Instant::now() >= a.expires_at => Err(err(
                            401,
                            "expired_token",
                            "The access token provided has expired.",
                        )),
                        Some(_) => Ok(Caller::OAuth),
                    },
                },
                Route::Bad => Err(err(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")),
            }
        }
    };
    let outcome = match (gate, decode_error) {
        (Err(e), _) | (Ok(_), Some(e)) => Err(e),
        (Ok(caller), None) => {
            if method == "batch" {
                let pre = precheck(&mut sh.lock(), caller, &method);
                match pre {
                    Err(e) => Err(e),
                    Ok(()) => run_batch(sh, caller, label, &params, cmd_order.as_deref()).await,
                }
            } else {
                exec(sh, caller, &method, &params).await
            }
        }
    };
    let failed = outcome.is_err();
    let (status, body) = match outcome {
        Ok(r) => {
            let mut b = Map::new();
            b.insert("result".into(), r.result);
            if let Some(t) = r.total {
                b.insert("total".into(), json!(t));
            }
            if let Some(n) = r.next {
                b.insert("next".into(), json!(n));
            }
            b.insert("time".into(), time_block(t0, now_f64()));
            (200, Value::Object(b))
        }
        Err(e) => (e.status, e.body()),
    };
    {
        let mut st = sh.lock();
        let r = &mut st.requests[index];
        r.status = status;
        if failed {
            r.error = body["error"].as_str().map(String::from);
            r.description = body["error_description"].as_str().map(String::from);
        }
    }
    json_answer(status, body)
}

/// Scripted faults, scopes, the auth-type switch.
fn precheck(st: &mut State, caller: Caller, method: &str) -> Result<(), ApiError> {
    if let Some(i) = st.faults.iter().position(|f| f.method == method) {
        return Err(st.faults.remove(i).unwrap().error);
    }
    let scope = method.split('.').next().unwrap_or("");
    if matches!(scope, "telephony" | "crm" | "user")
        && caller != Caller::Portal
        && !st
            .scopes
            .iter()
            .any(|s| s == scope || (scope == "user" && s.starts_with("user")))
    {
        return Err(err(
            403,
            "insufficient_scope",
            "The request requires higher privileges than provided by the webhook token",
        ));
    }
    let app_only = method == "telephony.externalcall.register"
        || method == "telephony.externalcall.finish"
        || method.starts_with("telephony.externalline.");
    if caller == Caller::Webhook && st.strict_auth_type && app_only {
        return Err(err(
            403,
            "WRONG_AUTH_TYPE",
            "Current authorization type is denied for this method",
        ));
    }
    Ok(())
}

async fn exec(
    sh: &Shared,
    caller: Caller,
    method: &str,
    params: &Value,
) -> Result<Reply, ApiError> {
    precheck(&mut sh.lock(), caller, method)?;
    if method == "telephony.externalcall.attachrecord" {
        return attach_record(sh, params).await.map(Reply::from);
    }
    let mut st = sh.lock();
    let st = &mut *st;
    let p = params;
    let v = match method {
        "batch" => {
            return Err(err(
                405,
                "ERROR_BATCH_METHOD_NOT_ALLOWED",
                "Method is not allowed for batch usage",
            ))
        }
        "telephony.externalcall.register" => register(st, p, caller)?,
        "telephony.externalcall.finish" => finish(st, p, caller)?,
        "telephony.externalcall.show" => show_hide(st, p, true),
        "telephony.externalcall.hide" => show_hide(st, p, false),
        "telephony.externalcall.searchcrmentities" => search_crm_entities(st, p)?,
        "telephony.externalline.add" => line_add(st, p, caller)?,
        "telephony.externalline.get" => line_get(st, caller),
        "telephony.externalline.update" => line_update(st, p, caller)?,
        "telephony.externalline.delete" => line_delete(st, p, caller)?,
        "crm.duplicate.findbycomm" => find_by_comm(st, p)?,
        "crm.contact.get" => contact_get(st, p)?,
        "crm.lead.get" => lead_get(st, p)?,
        "crm.activity.update" => crm_update(st, p, "activity")?,
        "crm.lead.update" => crm_update(st, p, "lead")?,
        "crm.contact.update" => crm_update(st, p, "contact")?,
        "crm.company.update" => crm_update(st, p, "company")?,
        "user.get" => return user_get(st, p),
        "user.current" => user_json(st.users.get(&WEBHOOK_USER).unwrap()),
        "profile" => {
            let u = st.users.get(&WEBHOOK_USER).unwrap();
            json!({"ID": u.id.to_string(), "ADMIN": true, "NAME": u.name, "LAST_NAME": u.last_name,
                   "PERSONAL_GENDER": "", "TIME_ZONE": "", "TIME_ZONE_OFFSET": 10800})
        }
        "scope" => json!(st.scopes),
        "server.time" => json!(iso(unix_now())),
        "app.info" => match caller {
            Caller::Webhook => json!({"SCOPE": st.scopes, "LICENSE": "en_project"}),
            _ => json!({"ID": APP_ID, "CODE": CLIENT_ID, "VERSION": 1, "STATUS": "L",
                        "INSTALLED": true, "PAYMENT_EXPIRED": "N", "DAYS": null,
                        "LICENSE": "en_project", "LICENSE_TYPE": "project", "LICENSE_FAMILY": "project"}),
        },
        "event.bind" => event_bind(st, p, caller)?,
        "event.get" => json!(st
            .bindings
            .iter()
            .map(
                |b| json!({"event": b.event, "handler": b.handler, "auth_type": "0",
                            "offline": i64::from(b.offline)})
            )
            .collect::<Vec<_>>()),
        "event.unbind" => event_unbind(st, p, caller)?,
        _ => return Err(err(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")),
    };
    Ok(v.into())
}

// ---- batch ----------------------------------------------------------------------------------

/// Replaces `$result[key][FIELD]...` in every string with the earlier results.
fn substitute(v: &mut Value, results: &Map<String, Value>) {
    match v {
        Value::String(s) if s.contains("$result[") => *s = substitute_str(s, results),
        Value::Array(a) => a.iter_mut().for_each(|x| substitute(x, results)),
        Value::Object(o) => o.values_mut().for_each(|x| substitute(x, results)),
        _ => {}
    }
}

fn substitute_str(s: &str, results: &Map<String, Value>) -> String {
    const MARK: &str = "$result";
    let mut out = String::new();
    let mut rest = s;
    while let Some(pos) = rest.find("$result[") {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + MARK.len()..];
        let mut segs = Vec::new();
        let mut cur = after;
        while let Some(r) = cur.strip_prefix('[') {
            match r.find(']') {
                Some(e) => {
                    segs.push(&r[..e]);
                    cur = &r[e + 1..];
                }
                None => break,
            }
        }
        let consumed = after.len() - cur.len();
        let found = segs.split_first().and_then(|(first, more)| {
            let mut v = results.get(*first)?;
            for seg in more {
                v = match v {
                    Value::Object(o) => o.get(*seg)?,
                    Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
                    _ => return None,
                };
            }
            match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(if *b { "1".into() } else { String::new() }),
                Value::Null => Some(String::new()),
                _ => None,
            }
        });
        match found {
            Some(t) => out.push_str(&t),
            None => out.push_str(&rest[pos..pos + MARK.len() + consumed]),
        }
        rest = &rest[pos + MARK.len() + consumed..];
    }
    out.push_str(rest);
    out
}

async fn run_batch(
    sh: &Shared,
    caller: Caller,
    label: &'static str,
    params: &Value,
    order: Option<&[String]>,
) -> Result<Reply, ApiError> {
    let halt = php_bool(get(params, "halt"), false);
    let cmd = get(params, "cmd");
    let list = matches!(cmd, Some(Value::Array(_)));
    let items: Vec<(String, Value)> = match cmd {
        Some(Value::Object(m)) => {
            let mut keys: Vec<String> = Vec::new();
            for k in order.unwrap_or(&[]) {
                if m.contains_key(k) && !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
            for k in m.keys() {
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
            keys.into_iter()
                .map(|k| (k.clone(), m[&k].clone()))
                .collect()
        }
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v.clone()))
            .collect(),
        _ => Vec::new(),
    };
    let mut results = Map::new();
    let mut ok: Vec<(String, Value)> = Vec::new();
    let mut errors: Vec<(String, Value)> = Vec::new();
    let mut totals: Vec<(String, Value)> = Vec::new();
    let mut nexts: Vec<(String, Value)> = Vec::new();
    let mut times: Vec<(String, Value)> = Vec::new();
    for (i, (key, item)) in items.into_iter().enumerate() {
        // Non-string items are skipped silently.
        let Value::String(item) = item else { continue };
        let (raw_method, query) = item.split_once('?').unwrap_or((item.as_str(), ""));
        let method = normalize_method(raw_method);
        let mut sub = php_parse_query(query);
        if let Some(m) = sub.as_object_mut() {
            let auth = m.keys().find(|k| k.eq_ignore_ascii_case("auth")).cloned();
            if let Some(a) = auth {
                m.remove(&a);
            }
        }
        substitute(&mut sub, &results);
        let t0 = now_f64();
        let outcome = if i >= BATCH_MAX {
            Err(err(
                400,
                "ERROR_BATCH_LENGTH_EXCEEDED",
                "Max batch length exceeded",
            ))
        } else if method == "batch"
            || method.starts_with("upload")
            || method.starts_with("download")
        {
            Err(err(
                405,
                "ERROR_BATCH_METHOD_NOT_ALLOWED",
                "Method is not allowed for batch usage",
            ))
        } else {
            exec(sh, caller, &method, &sub).await
        };
        let t1 = now_f64();
        let (status, error, description) = match &outcome {
            Ok(_) => (200, None, None),
            Err(e) => (e.status, Some(e.code.clone()), Some(e.description.clone())),
        };
        sh.lock().requests.push(B24Request {
            method,
            params: sub,
            auth: label,
            status,
            error,
            description,
            in_batch: true,
            at: Instant::now(),
        });
        match outcome {
            Ok(r) => {
                results.insert(key.clone(), r.result.clone());
                ok.push((key.clone(), r.result));
                if let Some(t) = r.total {
                    totals.push((key.clone(), json!(t)));
                }
                if let Some(n) = r.next {
                    nexts.push((key.clone(), json!(n)));
                }
                times.push((key, time_block(t0, t1)));
            }
            Err(e) => {
                errors.push((key, e.body()));
                if halt {
                    break;
                }
            }
        }
    }
    Ok(json!({
        "result": php_map(ok, list),
        "result_error": php_map(errors, list),
        "result_total": php_map(totals, list),
        "result_next": php_map(nexts, list),
        "result_time": php_map(times, list),
    })
    .into())
}

// ---- telephony ------------------------------------------------------------------------------

fn non_empty(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| !matches!(v, Value::String(s) if s.trim().is_empty()))
}

/// USER_ID (takes precedence) or USER_PHONE_INNER → a user id (not yet checked for activity).
fn resolve_user(st: &State, p: &Value) -> Result<i64, ApiError> {
    if let Some(v) = non_empty(get(p, "USER_ID")) {
        return Ok(int(Some(v)).unwrap_or(0));
    }
    if let Some(ext) = text(get(p, "USER_PHONE_INNER")).filter(|s| !s.trim().is_empty()) {
        let ext = ext.trim();
        return st
            .users
            .values()
            .find(|u| u.active && u.extension.as_deref() == Some(ext))
            .map(|u| u.id)
            .ok_or_else(|| tel(USER_NOT_ACTIVE));
    }
    Err(tel(USER_NOT_SET))
}

fn register_result(c: &FakeCall) -> Value {
    let created: Vec<Value> = c
        .created_lead
        .map(|id| json!({"ENTITY_TYPE": "LEAD", "ENTITY_ID": id}))
        .into_iter()
        .collect();
    json!({
        "CALL_ID": c.call_id,
        "CRM_CREATED_LEAD": c.created_lead,
        "CRM_CREATED_ENTITIES": created,
        "CRM_ENTITY_TYPE": c.crm_entity.as_ref().map_or("", |(t, _)| t.as_str()),
        "CRM_ENTITY_ID": c.crm_entity.as_ref().map(|(_, id)| *id),
    })
}

fn register(st: &mut State, p: &Value, caller: Caller) -> Result<Value, ApiError> {
    let user_id = resolve_user(st, p)?;
    let kind = int(get(p, "TYPE")).unwrap_or(0);
    if !(1..=5).contains(&kind) {
        return Err(tel("Unknown TYPE"));
    }
    let start = text(get(p, "CALL_START_DATE")).unwrap_or_default();
    let (start_unix, start_offset_missing) = if start.trim().is_empty() {
        (unix_now(), false)
    } else {
        parse_start(&start)
            .ok_or_else(|| tel("CALL_START_DATE should be in the ISO-8601 format"))?
    };
    let phone = strip_phone(&text(get(p, "PHONE_NUMBER")).unwrap_or_default());
    if phone.is_empty() {
        return Err(tel("Unsupported phone number format"));
    }
    if st.active_user(user_id).is_none() {
        return Err(tel(USER_NOT_ACTIVE));
    }
    let line: Option<String> = text(get(p, "LINE_NUMBER"))
        .map(|l| l.trim().chars().take(50).collect::<String>())
        .filter(|l| !l.is_empty());
    let external_call_id = text(get(p, "EXTERNAL_CALL_ID")).filter(|s| !s.is_empty());
    let show = php_bool(get(p, "SHOW"), true);
    let crm_create = php_bool(get(p, "CRM_CREATE"), false);

    let dup = st.calls.iter().position(|c| {
        c.finished.is_none()
            && c.user_id == user_id
            && c.phone == phone
            && c.kind == kind
            && (line.is_none() || c.line == line)
            && (external_call_id.is_none() || c.external_call_id == external_call_id)
            && c.registered_at.elapsed() < DEDUP_WINDOW
    });
    if let Some(i) = dup {
        let c = &mut st.calls[i];
        c.dedup_hits += 1;
        if show {
            c.visible.insert(user_id);
            c.shown_ever.insert(user_id);
            c.card_log.push(("show", user_id));
        }
        return Ok(register_result(c));
    }

    // An unknown line becomes a line of this app.
    if let Some(l) = &line {
        let app = caller.label();
        if caller != Caller::Portal && !st.lines.iter().any(|x| x.number == *l && x.app == app) {
            let id = st.next_line;
            st.next_line += 1;
            st.lines.push(FakeLine {
                id,
                number: l.clone(),
                name: l.clone(),
                crm_auto_create: true,
                app,
                auto_created: true,
            });
        }
    }

    let internal = st
        .users
        .values()
        .any(|u| u.extension.as_deref() == Some(phone.as_str()));
    let call_id = format!(
        "externalCall.{:032x}.{}",
        rand::random::<u128>(),
        unix_now()
    );
    let given_entity = match (
        text(get(p, "CRM_ENTITY_TYPE")).map(|t| t.to_ascii_uppercase()),
        int(get(p, "CRM_ENTITY_ID")),
    ) {
        (Some(t), Some(id)) if matches!(t.as_str(), "CONTACT" | "COMPANY" | "LEAD") && id > 0 => {
            Some((t, id))
        }
        _ => None,
    };
    let mut created_lead = None;
    let crm_entity = if internal {
        None
    } else if given_entity.is_some() {
        given_entity
    } else if let Some(c) = st.contacts.iter().find(|c| same_number(&c.phone, &phone)) {
        Some(("CONTACT".to_string(), c.id))
    } else if let Some(l) = st.leads.iter().find(|l| same_number(&l.phone, &phone)) {
        Some(("LEAD".to_string(), l.id))
    } else if crm_create {
        let id = st.next_lead;
        st.next_lead += 1;
        let dir = if kind == 1 { "Outgoing" } else { "Incoming" };
        st.leads.push(FakeLead {
            id,
            phone: phone.clone(),
            assigned_by_id: user_id,
            title: format!("{phone} - {dir} call"),
            call_id: call_id.clone(),
        });
        created_lead = Some(id);
        Some(("LEAD".to_string(), id))
    } else {
        None
    };
    let mut visible = BTreeSet::new();
    let mut card_log = vec![("register", user_id)];
    if show {
        visible.insert(user_id);
        card_log.push(("show", user_id));
    }
    let call = FakeCall {
        call_id,
        user_id,
        phone,
        kind,
        start,
        start_offset_missing,
        start_unix,
        crm_create,
        line,
        external_call_id,
        show,
        registered: p.clone(),
        registered_via: caller.label(),
        registered_at: Instant::now(),
        dedup_hits: 0,
        internal,
        finished: None,
        finished_by: None,
        finished_at: None,
        statistic: None,
        finish_count: 0,
        shown_ever: visible.clone(),
        visible,
        card_log,
        records: Vec::new(),
        crm_entity,
        created_lead,
        by_portal: caller == Caller::Portal,
    };
    let result = register_result(&call);
    st.calls.push(call);
    Ok(result)
}

fn finish(st: &mut State, p: &Value, caller: Caller) -> Result<Value, ApiError> {
    let call_id = match get(p, "CALL_ID") {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(err(400, "INVALID_ARGUMENT", "CALL_ID should be a string")),
    };
    let user_id = resolve_user(st, p)?;
    let Some(i) = st.calls.iter().position(|c| c.call_id == call_id) else {
        return Err(tel(CALL_NOT_FOUND));
    };
    st.calls[i].finish_count += 1;
    if st.calls[i].finished.is_some() {
        return Err(tel(CALL_NOT_FOUND));
    }
    if st.active_user(user_id).is_none() {
        return Err(tel(USER_NOT_ACTIVE));
    }
    let duration = int(get(p, "DURATION")).unwrap_or(0).max(0);
    let status_code = text(get(p, "STATUS_CODE"))
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| if duration > 0 { "200" } else { "304" }.to_string());
    let cost = get(p, "COST")
        .and_then(|v| match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        })
        .unwrap_or(0.0);
    let vote = int(get(p, "VOTE")).filter(|v| (1..=5).contains(v));
    let stat_id = st.next_stat;
    st.next_stat += 1;
    let activity = st.next_activity;
    st.next_activity += 1;
    let c = &mut st.calls[i];
    let row = json!({
        "ID": stat_id.to_string(),
        "CALL_ID": c.call_id,
        "EXTERNAL_CALL_ID": c.external_call_id,
        "PORTAL_USER_ID": user_id,
        "PHONE_NUMBER": c.phone,
        "PORTAL_NUMBER": c.line.clone().unwrap_or_default(),
        "INCOMING": c.kind.to_string(),
        "CALL_DURATION": duration,
        "CALL_START_DATE": iso(c.start_unix),
        "CALL_STATUS": i64::from(duration > 0),
        "CALL_VOTE": vote,
        "COST": cost,
        "COST_CURRENCY": text(get(p, "COST_CURRENCY")).unwrap_or_else(|| "RUB".into()),
        "CALL_FAILED_CODE": status_code,
        "CALL_FAILED_REASON": text(get(p, "FAILED_REASON")).unwrap_or_default(),
        "REST_APP_ID": if caller == Caller::OAuth { json!(APP_ID) } else { Value::Null },
        "REST_APP_NAME": if caller == Caller::OAuth { json!("pbxgate") } else { Value::Null },
        "CRM_ACTIVITY_ID": if c.internal { Value::Null } else { json!(activity) },
        "COMMENT": null,
        "CRM_ENTITY_TYPE": c.crm_entity.as_ref().map_or("", |(t, _)| t.as_str()),
        "CRM_ENTITY_ID": c.crm_entity.as_ref().map(|(_, id)| *id),
    });
    c.visible.remove(&user_id);
    c.card_log.push(("finish", user_id));
    c.finished = Some(p.clone());
    c.finished_by = Some(user_id);
    c.finished_at = Some(Instant::now());
    c.statistic = Some(row.clone());
    // Entities this call created now belong to the user who handled it.
    if let Some(lead) = c.created_lead {
        if let Some(l) = st.leads.iter_mut().find(|l| l.id == lead) {
            l.assigned_by_id = user_id;
        }
    }
    Ok(row)
}

fn show_hide(st: &mut State, p: &Value, show: bool) -> Value {
    let call_id = text(get(p, "CALL_ID")).unwrap_or_default();
    let Some(c) = st
        .calls
        .iter_mut()
        .find(|c| c.call_id == call_id && c.finished.is_none())
    else {
        return json!(false);
    };
    let users: Vec<i64> = match get(p, "USER_ID") {
        None => vec![c.user_id],
        Some(Value::Array(a)) => a.iter().filter_map(|v| int(Some(v))).collect(),
        Some(Value::Object(o)) => o.values().filter_map(|v| int(Some(v))).collect(),
        Some(v) => int(Some(v)).into_iter().collect(),
    };
    for u in users {
        if show {
            c.visible.insert(u);
            c.shown_ever.insert(u);
            c.card_log.push(("show", u));
        } else {
            c.visible.remove(&u);
            c.card_log.push(("hide", u));
        }
    }
    json!(true)
}

fn check_extension(name: &str) -> Result<(), ApiError> {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    if matches!(ext.as_deref(), Some("wav" | "mp3")) {
        Ok(())
    } else {
        Err(tel("Wrong file extension. Only wav and mp3 are allowed"))
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let engine = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    // Line breaks are tolerated; a space (a '+' that was not url-encoded) is not.
    let cleaned: String = s.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    engine.decode(cleaned).ok()
}

async fn attach_record(sh: &Shared, p: &Value) -> Result<Value, ApiError> {
    let call_id = text(get(p, "CALL_ID")).unwrap_or_default();
    if !sh
        .lock()
        .calls
        .iter()
        .any(|c| c.call_id == call_id && c.finished.is_some())
    {
        return Err(tel(NOT_IN_STATISTIC));
    }
    let filename = text(get(p, "FILENAME")).unwrap_or_default();
    let url = text(get(p, "RECORD_URL")).filter(|u| !u.trim().is_empty());
    let mut record = p.clone();
    let content: Vec<u8> = if let Some(url) = url {
        if !filename.is_empty() {
            check_extension(&filename)?;
        }
        let resp = sh.http.get(url.trim()).send().await.map_err(|e| {
            err(
                400,
                "SERVER_NOT_AVAILABLE",
                &format!("Could not download the record: {e}"),
            )
        })?;
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let bytes = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        if status != 200 {
            return Err(tel(&format!("Server returns HTTP error code {status}")));
        }
        record["fetched_status"] = json!(status);
        record["fetched_bytes"] = json!(bytes.len());
        record["fetched_type"] = json!(ctype);
        bytes
    } else {
        let file_content = get(p, "FILE_CONTENT");
        if filename.trim().is_empty() {
            return Err(tel(if file_content.is_some() {
                "File name is empty"
            } else {
                "Required parameters are not set: RECORD_URL or FILENAME"
            }));
        }
        check_extension(&filename)?;
        let Some(fc) = file_content else {
            return Err(err(
                400,
                "FAKE_UNSUPPORTED",
                "The fake Bitrix24 does not implement the upload-URL mode (FILENAME without FILE_CONTENT)",
            ));
        };
        let fc = text(Some(fc)).unwrap_or_default();
        if fc.is_empty() {
            return Err(tel("File content is empty."));
        }
        let bytes = decode_base64(&fc).ok_or_else(|| {
            tel("File content is not properly encoded. Base64 encoding is expected.")
        })?;
        let key = record
            .as_object()
            .and_then(|m| {
                m.keys()
                    .find(|k| k.eq_ignore_ascii_case("FILE_CONTENT"))
                    .cloned()
            })
            .unwrap();
        record[key.as_str()] = json!({"bytes": bytes.len()});
        bytes
    };
    let mut st = sh.lock();
    let file_id = st.next_file;
    st.next_file += 1;
    record["FILE_ID"] = json!(file_id);
    record["replaced"] = json!(false);
    let Some(c) = st.calls.iter_mut().find(|c| c.call_id == call_id) else {
        return Err(tel(NOT_IN_STATISTIC));
    };
    for r in &mut c.records {
        r["replaced"] = json!(true);
    }
    c.records.push(record);
    st.record_bytes.insert(call_id, content);
    Ok(json!({"FILE_ID": file_id}))
}

fn search_crm_entities(st: &State, p: &Value) -> Result<Value, ApiError> {
    let phone = text(get(p, "PHONE_NUMBER")).unwrap_or_default();
    if phone.trim().is_empty() {
        return Err(tel("PHONE_NUMBER is empty"));
    }
    let assigned = |id: i64| {
        json!({"ID": id.to_string(), "TIMEMAN_STATUS": "UNAVAILABLE",
               "USER_PHONE_INNER": st.extension_of(id).unwrap_or_default(),
               "WORK_PHONE": "", "PERSONAL_PHONE": "", "PERSONAL_MOBILE": ""})
    };
    let mut out = Vec::new();
    for c in st.contacts.iter().filter(|c| same_number(&c.phone, &phone)) {
        out.push(json!({"CRM_ENTITY_TYPE": "CONTACT", "CRM_ENTITY_ID": c.id,
                        "ASSIGNED_BY_ID": c.assigned_by_id.to_string(), "NAME": c.name,
                        "ASSIGNED_BY": assigned(c.assigned_by_id)}));
    }
    for l in st.leads.iter().filter(|l| same_number(&l.phone, &phone)) {
        out.push(json!({"CRM_ENTITY_TYPE": "LEAD", "CRM_ENTITY_ID": l.id,
                        "ASSIGNED_BY_ID": l.assigned_by_id.to_string(), "NAME": l.title,
                        "ASSIGNED_BY": assigned(l.assigned_by_id)}));
    }
    Ok(Value::Array(out))
}

// ---- external lines -------------------------------------------------------------------------

fn line_number(p: &Value) -> Result<String, ApiError> {
    text(get(p, "NUMBER"))
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| tel("NUMBER is empty"))
}

fn line_add(st: &mut State, p: &Value, caller: Caller) -> Result<Value, ApiError> {
    let number = line_number(p)?;
    let app = caller.label();
    if st.lines.iter().any(|l| l.number == number && l.app == app) {
        return Err(tel("Line already exists"));
    }
    let id = st.next_line;
    st.next_line += 1;
    st.lines.push(FakeLine {
        id,
        name: text(get(p, "NAME")).unwrap_or_default(),
        number,
        crm_auto_create: text(get(p, "CRM_AUTO_CREATE")).is_none_or(|v| v == "Y"),
        app,
        auto_created: false,
    });
    Ok(json!({"ID": id}))
}

fn line_get(st: &State, caller: Caller) -> Value {
    let app = caller.label();
    Value::Array(
        st.lines
            .iter()
            .filter(|l| l.app == app)
            .map(|l| {
                json!({"NUMBER": l.number, "NAME": l.name,
                            "CRM_AUTO_CREATE": if l.crm_auto_create { "Y" } else { "N" }})
            })
            .collect(),
    )
}

fn line_update(st: &mut State, p: &Value, caller: Caller) -> Result<Value, ApiError> {
    let number = line_number(p)?;
    let app = caller.label();
    let name = text(get(p, "NAME"));
    let auto = text(get(p, "CRM_AUTO_CREATE"));
    if name.is_none() && auto.is_none() {
        return Err(tel("There are no fields to update"));
    }
    let Some(l) = st
        .lines
        .iter_mut()
        .find(|l| l.number == number && l.app == app)
    else {
        return Err(tel(&format!("Could not find line with number {number}")));
    };
    if let Some(n) = name {
        l.name = n;
    }
    if let Some(a) = auto {
        l.crm_auto_create = a == "Y";
    }
    Ok(json!({"ID": l.id}))
}

fn line_delete(st: &mut State, p: &Value, caller: Caller) -> Result<Value, ApiError> {
    let number = line_number(p)?;
    let app = caller.label();
    let before = st.lines.len();
    st.lines.retain(|l| !(l.number == number && l.app == app));
    if st.lines.len() == before {
        return Err(tel(&format!("Could not find line with number {number}")));
    }
    Ok(json!([]))
}

// ---- CRM ------------------------------------------------------------------------------------

fn find_by_comm(st: &State, p: &Value) -> Result<Value, ApiError> {
    let kind = text(get(p, "type"))
        .unwrap_or_default()
        .to_ascii_uppercase();
    if kind.is_empty() {
        return Err(tel("Communication type is not defined."));
    }
    if kind != "PHONE" && kind != "EMAIL" {
        return Err(tel(&format!(
            "Communication type '{kind}' is not supported in current context."
        )));
    }
    let values: Vec<String> = match get(p, "values") {
        Some(Value::Array(a)) => a.iter().filter_map(|v| text(Some(v))).collect(),
        Some(Value::Object(o)) => o.values().filter_map(|v| text(Some(v))).collect(),
        Some(_) => return Err(tel("Parameter 'values' must be array.")),
        None => return Err(tel("Communication values is not defined.")),
    };
    let entity_type = text(get(p, "entity_type")).map(|t| t.to_ascii_uppercase());
    if let Some(t) = &entity_type {
        if !matches!(t.as_str(), "LEAD" | "CONTACT" | "COMPANY") {
            return Err(tel(&format!(
                "Entity type '{t}' is not supported in current context."
            )));
        }
    }
    let wants = |t: &str| entity_type.as_deref().is_none_or(|e| e == t);
    let mut contacts: Vec<i64> = Vec::new();
    let mut leads: Vec<i64> = Vec::new();
    if kind == "PHONE" {
        for v in values.iter().take(20) {
            if wants("CONTACT") {
                for c in st
                    .contacts
                    .iter()
                    .filter(|c| same_number(&c.phone, v))
                    .take(20)
                {
                    if !contacts.contains(&c.id) {
                        contacts.push(c.id);
                    }
                }
            }
            if wants("LEAD") {
                for l in st
                    .leads
                    .iter()
                    .filter(|l| same_number(&l.phone, v))
                    .take(20)
                {
                    if !leads.contains(&l.id) {
                        leads.push(l.id);
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    if !leads.is_empty() {
        out.push(("LEAD".to_string(), json!(leads)));
    }
    if !contacts.is_empty() {
        out.push(("CONTACT".to_string(), json!(contacts)));
    }
    Ok(php_map(out, false))
}

fn entity_id(p: &Value) -> Result<i64, ApiError> {
    int(get(p, "id"))
        .filter(|id| *id > 0)
        .ok_or_else(|| tel("ID is not defined or invalid."))
}

/// `crm.<kind>.update` `{id, fields}`: the record must exist and `fields` be a non-empty
/// object; the change is kept for the tests.
fn crm_update(st: &mut State, p: &Value, kind: &str) -> Result<Value, ApiError> {
    let id = entity_id(p)?;
    let exists = match kind {
        "activity" => id < st.next_activity,
        "lead" => st.leads.iter().any(|l| l.id == id),
        "contact" => st.contacts.iter().any(|c| c.id == id),
        _ => false,
    };
    if !exists {
        return Err(err(400, "ERROR_CORE", "Not found"));
    }
    let fields = get(p, "fields").cloned().unwrap_or(Value::Null);
    if fields.as_object().is_none_or(|f| f.is_empty()) {
        return Err(err(
            400,
            "ERROR_CORE",
            "The parameter 'fields' must be an array.",
        ));
    }
    st.updates.push((kind.to_string(), id, fields.clone()));
    Ok(json!(true))
}

fn contact_get(st: &State, p: &Value) -> Result<Value, ApiError> {
    let id = entity_id(p)?;
    let c = st
        .contacts
        .iter()
        .find(|c| c.id == id)
        .ok_or_else(|| tel("Not found"))?;
    Ok(json!({
        "ID": c.id.to_string(), "NAME": c.name, "LAST_NAME": "", "HAS_PHONE": "Y",
        "ASSIGNED_BY_ID": c.assigned_by_id.to_string(),
        "PHONE": [{"ID": (c.id * 10).to_string(), "VALUE_TYPE": "WORK", "VALUE": c.phone, "TYPE_ID": "PHONE"}],
    }))
}

fn lead_get(st: &State, p: &Value) -> Result<Value, ApiError> {
    let id = entity_id(p)?;
    let l = st
        .leads
        .iter()
        .find(|l| l.id == id)
        .ok_or_else(|| tel("Not found"))?;
    Ok(json!({
        "ID": l.id.to_string(), "TITLE": l.title, "STATUS_ID": "NEW", "HAS_PHONE": "Y",
        "ASSIGNED_BY_ID": l.assigned_by_id.to_string(),
        "PHONE": [{"ID": (l.id * 10 + 1).to_string(), "VALUE_TYPE": "WORK", "VALUE": l.phone, "TYPE_ID": "PHONE"}],
    }))
}

// ---- users ----------------------------------------------------------------------------------

fn user_json(u: &FakeUser) -> Value {
    json!({
        "ID": u.id.to_string(), "XML_ID": null, "ACTIVE": u.active, "NAME": u.name,
        "LAST_NAME": u.last_name, "SECOND_NAME": "", "EMAIL": format!("user{}@fake-b24.test", u.id),
        "WORK_PHONE": "", "PERSONAL_PHONE": "", "PERSONAL_MOBILE": "",
        "UF_PHONE_INNER": u.extension, "UF_DEPARTMENT": [1], "USER_TYPE": "employee",
        "IS_ONLINE": "N", "TIME_ZONE_OFFSET": "10800",
    })
}

fn user_matches(u: &FakeUser, key: &str, v: &Value) -> bool {
    let (negate, field) = match key.strip_prefix('!') {
        Some(f) => (true, f),
        None => (false, key.strip_prefix('=').unwrap_or(key)),
    };
    let values: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        v => vec![v],
    };
    let hit = match field.to_ascii_uppercase().as_str() {
        "ID" => values.iter().any(|v| int(Some(v)) == Some(u.id)),
        "ACTIVE" => values.iter().any(|v| filter_flag(v) == u.active),
        "UF_PHONE_INNER" => values
            .iter()
            .any(|v| text(Some(v)).as_deref() == u.extension.as_deref()),
        "USER_TYPE" => values
            .iter()
            .any(|v| text(Some(v)).as_deref() == Some("employee")),
        "NAME" => values
            .iter()
            .any(|v| text(Some(v)).as_deref() == Some(u.name.as_str())),
        "LAST_NAME" => values
            .iter()
            .any(|v| text(Some(v)).as_deref() == Some(u.last_name.as_str())),
        _ => true,
    };
    hit != negate
}

const USER_GET_PARAMS: &[&str] = &["FILTER", "SORT", "ORDER", "START", "SELECT", "ADMIN_MODE"];

fn user_get(st: &State, p: &Value) -> Result<Reply, ApiError> {
    let mut filter: Vec<(String, Value)> = Vec::new();
    if let Some(Value::Object(f)) = get(p, "FILTER") {
        filter.extend(f.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    // Old style: filter fields at the top level (`user.get?ID=1`).
    if let Some(m) = p.as_object() {
        for (k, v) in m {
            if !USER_GET_PARAMS.iter().any(|x| k.eq_ignore_ascii_case(x)) {
                filter.push((k.clone(), v.clone()));
            }
        }
    }
    let mut users: Vec<&FakeUser> = st
        .users
        .values()
        .filter(|u| filter.iter().all(|(k, v)| user_matches(u, k, v)))
        .collect();
    let sort = text(get(p, "sort"))
        .unwrap_or_else(|| "ID".into())
        .to_ascii_uppercase();
    let desc = text(get(p, "order")).is_some_and(|o| o.eq_ignore_ascii_case("DESC"));
    if sort == "UF_PHONE_INNER" {
        users.sort_by(|a, b| a.extension.cmp(&b.extension));
    } else {
        users.sort_by_key(|u| u.id);
    }
    if desc {
        users.reverse();
    }
    let total = users.len();
    let start = int(get(p, "start")).unwrap_or(0).max(0) as usize;
    let page: Vec<Value> = users
        .iter()
        .skip(start)
        .take(PAGE)
        .map(|u| user_json(u))
        .collect();
    Ok(Reply {
        result: Value::Array(page),
        total: Some(total),
        next: (start + PAGE < total).then_some(start + PAGE),
    })
}

// ---- events ---------------------------------------------------------------------------------

fn event_bind(st: &mut State, p: &Value, caller: Caller) -> Result<Value, ApiError> {
    if caller == Caller::Webhook {
        return Err(err(
            403,
            "WRONG_AUTH_TYPE",
            "Current authorization type is denied for this method",
        ));
    }
    let event = text(get(p, "event"))
        .unwrap_or_default()
        .to_ascii_uppercase();
    let handler = text(get(p, "handler")).unwrap_or_default();
    if event.is_empty() || !event.starts_with("ON") {
        return Err(err(400, "ERROR_EVENT_NOT_FOUND", "Event not found"));
    }
    let offline = text(get(p, "event_type")).is_some_and(|t| t.eq_ignore_ascii_case("offline"));
    if !offline && handler.is_empty() {
        return Err(tel("Handler not found"));
    }
    if st
        .bindings
        .iter()
        .any(|b| b.event == event && b.handler == handler)
    {
        return Err(tel("Handler already binded"));
    }
    st.bindings.push(FakeBinding {
        event,
        handler,
        offline,
    });
    Ok(json!(true))
}

fn event_unbind(st: &mut State, p: &Value, caller: Caller) -> Result<Value, ApiError> {
    if caller == Caller::Webhook {
        return Err(err(
            403,
            "WRONG_AUTH_TYPE",
            "Current authorization type is denied for this method",
        ));
    }
    let event = text(get(p, "event"))
        .unwrap_or_default()
        .to_ascii_uppercase();
    let handler = text(get(p, "handler"));
    let before = st.bindings.len();
    st.bindings
        .retain(|b| !(b.event == event && handler.as_ref().is_none_or(|h| *h == b.handler)));
    Ok(json!({"count": before - st.bindings.len()}))
}

// ---- OAuth server ---------------------------------------------------------------------------

fn oauth(req: &HttpRequest, body: &[u8], sh: &Shared) -> HttpResponse {
    let mut pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(req.query_string()).unwrap_or_default();
    let is_form = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    if req.method() == actix_web::http::Method::POST && is_form {
        pairs.extend(
            serde_urlencoded::from_bytes::<Vec<(String, String)>>(body).unwrap_or_default(),
        );
    }
    let param = |k: &str| {
        pairs
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let grant = param("grant_type");
    let mut st = sh.lock();
    let outcome: Result<bool, (u16, &str, &str)> = (|| {
        if grant.is_empty() {
            return Err((400, "invalid_request", "grant_type is missing"));
        }
        if param("client_id") != CLIENT_ID || param("client_secret") != CLIENT_SECRET {
            return Err((401, "invalid_client", "Invalid client credentials"));
        }
        match grant.as_str() {
            "authorization_code" => {
                if st.codes.remove(&param("code")) {
                    Ok(false)
                } else {
                    Err((400, "invalid_grant", "Invalid authorization code"))
                }
            }
            "refresh_token" => match st.refresh.get_mut(&param("refresh_token")) {
                Some(used) if !*used => {
                    *used = true;
                    Ok(true)
                }
                _ => Err((400, "invalid_grant", "Invalid refresh token")),
            },
            _ => Err((400, "unsupported_grant_type", "Unsupported grant type")),
        }
    })();
    let (status, body) = match outcome {
        Ok(refreshed) => {
            if refreshed {
                st.refreshes += 1;
            }
            let (access, refresh) = st.issue_tokens();
            let ttl = st.access_ttl.as_secs() as i64;
            let domain = sh.url.trim_start_matches("http://").to_string();
            (
                200,
                json!({
                    "access_token": access,
                    "expires": unix_now() + ttl,
                    "expires_in": ttl,
                    "scope": st.scopes.join(","),
                    "domain": domain,
                    "server_endpoint": format!("{}/rest/", sh.url),
                    "client_endpoint": format!("{}/rest/", sh.url),
                    "member_id": MEMBER_ID,
                    "status": "L",
                    "user_id": WEBHOOK_USER,
                    "refresh_token": refresh,
                }),
            )
        }
        Err((status, code, description)) => (
            status,
            json!({"error": code, "error_description": description}),
        ),
    };
    st.oauth_log.push(OAuthRequest {
        http_method: req.method().to_string(),
        grant_type: grant,
        status,
        error: body["error"].as_str().map(String::from),
        at: Instant::now(),
    });
    json_answer(status, body)
}
