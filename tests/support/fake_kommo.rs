//! An in-process fake Kommo (amoCRM) account on 127.0.0.1:0: API v4 (and `/api/v2/events`),
//! its OAuth server, and a minter of the widget's `X-Auth-Token` JWTs.
//!
//! Design: one actix-web server answers `/api/...` and `/oauth2/access_token` from a `State`
//! behind an `Arc<Mutex<..>>` that is never held across an await. It follows §9 of
//! shared/reference/kommo-api.md and answers like the real account:
//! - Gate of every `/api` request, in order: IP block (`set_blocked`: 403 nginx HTML), outage
//!   (503 nginx HTML), a sliding 1-second window of admitted requests (default 7 → 429,
//!   problem+json or, with `set_rate_limit_html`, an HTML page; refused requests do not fill the
//!   window), Bearer auth (the long-lived token, or an OAuth access token until it expires or is
//!   revoked; else 401 problem+json), unpaid account (402), then `fail_next` faults.
//! - Bodies: POST/PATCH must be `application/json`; batch methods take a top-level array
//!   (anything else, or an empty one, is a validation error); an explicit `null` anywhere is
//!   400 `NotNullable` (except `custom_fields_values[].values` in a PATCH: Kommo's way to clear
//!   a field); unknown fields are 400 `FieldExtra`. Every error of every item is reported in
//!   `validation-errors[{request_id, errors[{code, path, detail}]}]`; nothing of a batch with a
//!   validation error is created. `request_id` defaults to the item's index, as a string.
//!   The codes `NotNullable` and `NotSupportedChoice` are Kommo's (GH#383, GH#115); the others
//!   (`FieldMissing`, `FieldExtra`, `InvalidType`, `NotBlank`, `InvalidRange`) are our guesses.
//! - Success is `application/hal+json` with `_embedded`; lists page with `page`/`limit` (≤ 250,
//!   more is a 400), `_links.next` when more; **an empty list is 204 with no body**, and so is an
//!   unknown id of `GET /api/v4/{contacts|leads|companies}/{id}`.
//! - `/api/v4/calls` matches a contact, then a company, by the **last 10 digits** of the phone;
//!   a single active lead of it takes the call, else the contact/company itself. No match: 400
//!   `{"_total_items": 0, "_embedded": {"calls": []}, "errors": [{"title": "Entity not found", ..}]}`
//!   (GH#52). A mixed batch (unknown to Kommo, §10.1) creates the matched items and still
//!   answers 400, `_total_items` counting the created ones. No dedup on `uniq`. `entity_type` in
//!   answers is the plural (`leads`, `contacts`, `companies`), as tasks and notes take it.
//! - `leads/unsorted/sip` requires `source_uid`, `source_name` and `metadata` {`uniq`, `from`,
//!   `phone`, `called_at`, `duration`, `service_code`, `is_call_event_needed`}; `link` is optional
//!   (a missed call has no recording). The incoming lead and its contacts stay hidden (not
//!   searchable, not matched by calls) until `POST .../unsorted/{uid}/accept`.
//! - `GET /api/v4/contacts?query=` is a case-insensitive **substring** search over the name and
//!   the raw stored custom-field values, like the real text search: `+7 999 123-45-67` is not
//!   found by `79991234567`. Contacts of a pending incoming lead are hidden until it is accepted.
//! - OAuth (`POST /oauth2/access_token`, JSON or form): the client id, secret and redirect URI
//!   must match; a code works once (20 min); a refresh token works once (again: 401
//!   `"hint": "Token has been revoked"`) and revokes the access token it came with; every grant
//!   gives a new pair. Access tokens look like Kommo's (RS256-looking JWTs, opaque to us).
//! - Widget tokens: HS256 with CLIENT_SECRET, the claims of §4.
//!
//! Every request is recorded (`requests()`), refused ones too. Left out: host routing per
//! subdomain (one account), customers, pipelines other than one, companies' creation over the
//! API (`add_company` only), `GET` of notes, `If-Modified-Since`, the legacy
//! `/private/api/v2/json/contacts/list`, the unsorted "duplicate data" error (script it with
//! `fail_next`), `X-Context-User-ID`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::TcpListener;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha2::Sha256;

pub const LONG_LIVED_TOKEN: &str = "fake-kommo-long-lived-token-0123456789";
pub const CLIENT_ID: &str = "0d1e2f3a-4b5c-6d7e-8f90-a1b2c3d4e5f6";
pub const CLIENT_SECRET: &str = "fakekommoclientsecret0123456789abcdefABCDEF0123456789";
pub const REDIRECT_URI: &str = "https://pbx.example.com/kommo/oauth";
pub const ACCOUNT_ID: i64 = 29_000_001;
pub const SUBDOMAIN: &str = "pbxgatetest";

/// The default users: Anna is the admin (the long-lived token acts as her).
pub const ANNA: i64 = 8_320_148;
pub const BORIS: i64 = 8_320_149;
pub const VERA: i64 = 8_320_150;

/// The one pipeline and its stages; 142/143 are Kommo's fixed "won"/"lost".
pub const PIPELINE_ID: i64 = 7_700_001;
/// "Incoming leads": the stage of a pending `leads/unsorted` lead.
pub const STATUS_INCOMING: i64 = 77_000_000;
pub const STATUS_NEW: i64 = 77_000_001;
pub const STATUS_IN_WORK: i64 = 77_000_002;
pub const STATUS_WON: i64 = 142;
pub const STATUS_LOST: i64 = 143;

pub const PHONE_FIELD_ID: i64 = 264_911;
pub const EMAIL_FIELD_ID: i64 = 264_913;
pub const POSITION_FIELD_ID: i64 = 264_915;

pub const DEFAULT_RATE: u32 = 7;
pub const MAX_LIMIT: usize = 250;
pub const DEFAULT_LIMIT: usize = 50;
pub const WIDGET_TOKEN_TTL: Duration = Duration::from_secs(30 * 60);
pub const CODE_TTL: Duration = Duration::from_secs(20 * 60);
pub const DEFAULT_ACCESS_TTL: Duration = Duration::from_secs(86_400);

const OAUTH_PROBLEM: &str = "https://developers.amocrm.ru/v3/errors/OAuthProblemJson";

const NGINX_403: &str = "<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n<center><h1>403 Forbidden</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
const NGINX_404: &str = "<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
const NGINX_429: &str = "<html>\r\n<head><title>429 Too Many Requests</title></head>\r\n<body>\r\n<center><h1>429 Too Many Requests</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
const NGINX_503: &str = "<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

/// One HTTP request as the fake saw it.
#[derive(Debug, Clone)]
pub struct KommoRequest {
    pub method: String,
    pub path: String,
    /// The raw query string.
    pub query: String,
    /// The body: parsed JSON, a form as an object of strings, other text as a string, or null.
    pub body: Value,
    /// The Bearer token, if an `Authorization: Bearer` header came.
    pub auth: Option<String>,
    pub content_type: Option<String>,
    pub status: u16,
    pub at: Instant,
}

// ---- the account's content -------------------------------------------------------------------

#[derive(Debug, Clone)]
struct User {
    id: i64,
    name: String,
    email: String,
    is_admin: bool,
}

/// A contact or a company.
#[derive(Debug, Clone)]
struct Party {
    id: i64,
    name: String,
    first_name: String,
    last_name: String,
    responsible_user_id: i64,
    created_by: i64,
    updated_by: i64,
    created_at: i64,
    updated_at: i64,
    /// Normalized `custom_fields_values` (`field_id`, `field_name`, `field_code`, `field_type`,
    /// `values[{value, enum_id, enum_code}]`).
    cfv: Vec<Value>,
    /// Hidden until its incoming lead is accepted.
    unsorted: bool,
    company_id: Option<i64>,
}

impl Party {
    fn phones(&self) -> impl Iterator<Item = &str> {
        self.cfv
            .iter()
            .filter(|f| f["field_code"] == "PHONE")
            .flat_map(|f| f["values"].as_array().into_iter().flatten())
            .filter_map(|v| v["value"].as_str())
    }

    fn texts(&self) -> impl Iterator<Item = &str> {
        self.cfv
            .iter()
            .flat_map(|f| f["values"].as_array().into_iter().flatten())
            .filter_map(|v| v["value"].as_str())
    }
}

#[derive(Debug, Clone)]
struct Lead {
    id: i64,
    name: String,
    price: i64,
    responsible_user_id: i64,
    status_id: i64,
    pipeline_id: i64,
    contacts: Vec<i64>,
    company_id: Option<i64>,
    created_by: i64,
    updated_by: i64,
    created_at: i64,
    updated_at: i64,
    closed_at: Option<i64>,
}

impl Lead {
    fn is_active(&self) -> bool {
        !matches!(self.status_id, STATUS_WON | STATUS_LOST | STATUS_INCOMING)
    }
}

#[derive(Debug, Clone)]
struct Unsorted {
    uid: String,
    item: Value,
    lead_id: i64,
    contact_ids: Vec<i64>,
    /// "pending", "accepted" or "declined".
    state: &'static str,
    created_at: i64,
}

struct FieldDef {
    id: i64,
    code: &'static str,
    name: &'static str,
    ty: &'static str,
    enums: &'static [(i64, &'static str)],
}

const FIELDS: [FieldDef; 3] = [
    FieldDef {
        id: PHONE_FIELD_ID,
        code: "PHONE",
        name: "Phone",
        ty: "multitext",
        enums: &[
            (183_001, "WORK"),
            (183_003, "WORKDD"),
            (183_005, "MOB"),
            (183_007, "FAX"),
            (183_009, "HOME"),
            (183_011, "OTHER"),
        ],
    },
    FieldDef {
        id: EMAIL_FIELD_ID,
        code: "EMAIL",
        name: "Email",
        ty: "multitext",
        enums: &[(183_013, "WORK"), (183_015, "PRIV"), (183_017, "OTHER")],
    },
    FieldDef {
        id: POSITION_FIELD_ID,
        code: "POSITION",
        name: "Position",
        ty: "text",
        enums: &[],
    },
];

fn phone_field(value: &str, enum_code: &str) -> Value {
    let d = &FIELDS[0];
    let en = d
        .enums
        .iter()
        .find(|e| e.1 == enum_code)
        .unwrap_or(&d.enums[0]);
    json!({"field_id": d.id, "field_name": d.name, "field_code": d.code, "field_type": d.ty,
           "values": [{"value": value, "enum_id": en.0, "enum_code": en.1}]})
}

// ---- tokens ----------------------------------------------------------------------------------

struct AccessToken {
    user_id: i64,
    expires_at: Instant,
    expired: bool,
    revoked: bool,
}

struct RefreshToken {
    user_id: i64,
    used: bool,
    access: String,
}

struct Code {
    user_id: i64,
    expires_at: Instant,
    used: bool,
}

struct Fault {
    path: String,
    status: u16,
    body: Value,
}

struct State {
    url: String,
    users: BTreeMap<i64, User>,
    contacts: Vec<Party>,
    companies: Vec<Party>,
    leads: Vec<Lead>,
    calls: Vec<Value>,
    unsorted: Vec<Unsorted>,
    tasks: Vec<Value>,
    events: Vec<Value>,
    notes: Vec<Value>,
    requests: Vec<KommoRequest>,
    rejected: usize,
    rate: u32,
    window: VecDeque<Instant>,
    rate_html: bool,
    blocked: bool,
    unpaid: bool,
    outage: bool,
    long_lived_revoked: bool,
    faults: VecDeque<Fault>,
    codes: HashMap<String, Code>,
    access: HashMap<String, AccessToken>,
    refresh: HashMap<String, RefreshToken>,
    access_ttl: Duration,
    refreshes: usize,
    next_contact: i64,
    next_company: i64,
    next_lead: i64,
    next_call: i64,
    next_task: i64,
    next_note: i64,
}

impl State {
    fn new(url: String) -> State {
        let mut users = BTreeMap::new();
        for (id, name, admin) in [
            (ANNA, "Anna", true),
            (BORIS, "Boris", false),
            (VERA, "Vera", false),
        ] {
            users.insert(
                id,
                User {
                    id,
                    name: name.into(),
                    email: format!("{}@example.com", name.to_lowercase()),
                    is_admin: admin,
                },
            );
        }
        State {
            url,
            users,
            contacts: Vec::new(),
            companies: Vec::new(),
            leads: Vec::new(),
            calls: Vec::new(),
            unsorted: Vec::new(),
            tasks: Vec::new(),
            events: Vec::new(),
            notes: Vec::new(),
            requests: Vec::new(),
            rejected: 0,
            rate: DEFAULT_RATE,
            window: VecDeque::new(),
            rate_html: false,
            blocked: false,
            unpaid: false,
            outage: false,
            long_lived_revoked: false,
            faults: VecDeque::new(),
            codes: HashMap::new(),
            access: HashMap::new(),
            refresh: HashMap::new(),
            access_ttl: DEFAULT_ACCESS_TTL,
            refreshes: 0,
            next_contact: 21_000_001,
            next_company: 41_000_001,
            next_lead: 31_000_001,
            next_call: 51_000_001,
            next_task: 61_000_001,
            next_note: 71_000_001,
        }
    }

    fn new_party(&mut self, company: bool, name: &str, responsible: i64, cfv: Vec<Value>) -> i64 {
        let id = if company {
            self.next_company += 1;
            self.next_company - 1
        } else {
            self.next_contact += 1;
            self.next_contact - 1
        };
        let now = unix_now();
        let p = Party {
            id,
            name: name.to_string(),
            first_name: String::new(),
            last_name: String::new(),
            responsible_user_id: responsible,
            created_by: 0,
            updated_by: 0,
            created_at: now,
            updated_at: now,
            cfv,
            unsorted: false,
            company_id: None,
        };
        if company {
            self.companies.push(p);
        } else {
            self.contacts.push(p);
        }
        id
    }

    fn new_lead(&mut self, name: Option<&str>, responsible: i64, status_id: i64) -> &mut Lead {
        let id = self.next_lead;
        self.next_lead += 1;
        let now = unix_now();
        self.leads.push(Lead {
            id,
            name: name.map_or_else(|| format!("Lead #{id}"), str::to_string),
            price: 0,
            responsible_user_id: responsible,
            status_id,
            pipeline_id: PIPELINE_ID,
            contacts: Vec::new(),
            company_id: None,
            created_by: 0,
            updated_by: 0,
            created_at: now,
            updated_at: now,
            closed_at: None,
        });
        self.leads.last_mut().unwrap()
    }

    fn contact(&self, id: i64) -> Option<&Party> {
        self.contacts.iter().find(|c| c.id == id)
    }

    fn company(&self, id: i64) -> Option<&Party> {
        self.companies.iter().find(|c| c.id == id)
    }

    fn lead(&self, id: i64) -> Option<&Lead> {
        self.leads.iter().find(|l| l.id == id)
    }

    fn entity_exists(&self, kind: &str, id: i64) -> bool {
        match kind {
            "leads" => self.lead(id).is_some(),
            "contacts" => self.contact(id).is_some(),
            "companies" => self.company(id).is_some(),
            _ => false,
        }
    }

    /// Where Kommo attaches a call for `phone`: (entity_type, entity_id).
    fn call_target(&self, phone: &str) -> Option<(&'static str, i64)> {
        let want = last10(phone);
        if want.is_empty() {
            return None;
        }
        let has = |p: &Party| !p.unsorted && p.phones().any(|x| last10(x) == want);
        if let Some(c) = self.contacts.iter().find(|c| has(c)) {
            let active: Vec<&Lead> = self
                .leads
                .iter()
                .filter(|l| l.is_active() && l.contacts.contains(&c.id))
                .collect();
            return Some(match active.as_slice() {
                [one] => ("leads", one.id),
                _ => ("contacts", c.id),
            });
        }
        if let Some(c) = self.companies.iter().find(|c| has(c)) {
            let active: Vec<&Lead> = self
                .leads
                .iter()
                .filter(|l| l.is_active() && l.company_id == Some(c.id))
                .collect();
            return Some(match active.as_slice() {
                [one] => ("leads", one.id),
                _ => ("companies", c.id),
            });
        }
        None
    }

    fn issue_pair(&mut self, user_id: i64) -> (String, String, u64) {
        let ttl = self.access_ttl;
        let now = unix_now();
        let host = self.url.trim_start_matches("http://").to_string();
        let claims = json!({
            "aud": CLIENT_ID,
            "jti": uuid(),
            "iat": now,
            "nbf": now,
            "exp": now + ttl.as_secs() as i64,
            "sub": user_id.to_string(),
            "grant_type": "",
            "account_id": ACCOUNT_ID,
            "base_domain": "kommo.com",
            "version": 2,
            "scopes": ["crm", "notifications"],
            "api_domain": host,
            "hash_uuid": uuid(),
        });
        let sig: Vec<u8> = (0..64).map(|_| rand::random::<u8>()).collect();
        let access = format!(
            "{}.{}.{}",
            b64(br#"{"typ":"JWT","alg":"RS256","jti":"fake"}"#),
            b64(claims.to_string().as_bytes()),
            b64(&sig)
        );
        let refresh = format!(
            "def50200{:032x}{:032x}{:032x}",
            rand::random::<u128>(),
            rand::random::<u128>(),
            rand::random::<u128>()
        );
        self.access.insert(
            access.clone(),
            AccessToken {
                user_id,
                expires_at: Instant::now() + ttl,
                expired: false,
                revoked: false,
            },
        );
        self.refresh.insert(
            refresh.clone(),
            RefreshToken {
                user_id,
                used: false,
                access: access.clone(),
            },
        );
        (access, refresh, ttl.as_secs())
    }

    fn is_admin(&self, user: i64) -> bool {
        self.users.get(&user).is_some_and(|u| u.is_admin)
    }

    fn href(&self, path: &str) -> Value {
        json!({"self": {"href": format!("{}{path}", self.url)}})
    }

    fn render_party(&self, p: &Party, kind: &str, with_leads: bool) -> Value {
        let mut emb = Map::new();
        emb.insert("tags".into(), json!([]));
        if kind == "contacts" {
            let companies: Vec<Value> = p
                .company_id
                .iter()
                .map(|c| json!({"id": c, "_links": self.href(&format!("/api/v4/companies/{c}"))}))
                .collect();
            emb.insert("companies".into(), json!(companies));
        }
        if with_leads {
            let leads: Vec<Value> = self
                .leads
                .iter()
                .filter(|l| {
                    if kind == "contacts" {
                        l.contacts.contains(&p.id)
                    } else {
                        l.company_id == Some(p.id)
                    }
                })
                .map(|l| json!({"id": l.id, "_links": self.href(&format!("/api/v4/leads/{}", l.id))}))
                .collect();
            emb.insert("leads".into(), json!(leads));
        }
        let mut v = json!({
            "id": p.id,
            "name": p.name,
            "responsible_user_id": p.responsible_user_id,
            "group_id": 0,
            "created_by": p.created_by,
            "updated_by": p.updated_by,
            "created_at": p.created_at,
            "updated_at": p.updated_at,
            "closest_task_at": null,
            "is_deleted": false,
            "custom_fields_values": if p.cfv.is_empty() { Value::Null } else { json!(p.cfv) },
            "account_id": ACCOUNT_ID,
            "_links": self.href(&format!("/api/v4/{kind}/{}", p.id)),
            "_embedded": emb,
        });
        if kind == "contacts" {
            v["first_name"] = json!(p.first_name);
            v["last_name"] = json!(p.last_name);
            v["is_unsorted"] = json!(p.unsorted);
        }
        v
    }

    fn render_lead(&self, l: &Lead, with_contacts: bool) -> Value {
        let mut emb = Map::new();
        emb.insert("tags".into(), json!([]));
        let companies: Vec<Value> = l
            .company_id
            .iter()
            .map(|c| json!({"id": c, "_links": self.href(&format!("/api/v4/companies/{c}"))}))
            .collect();
        emb.insert("companies".into(), json!(companies));
        if with_contacts {
            let contacts: Vec<Value> = l
                .contacts
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    json!({"id": c, "is_main": i == 0,
                           "_links": self.href(&format!("/api/v4/contacts/{c}"))})
                })
                .collect();
            emb.insert("contacts".into(), json!(contacts));
        }
        json!({
            "id": l.id,
            "name": l.name,
            "price": l.price,
            "responsible_user_id": l.responsible_user_id,
            "group_id": 0,
            "status_id": l.status_id,
            "pipeline_id": l.pipeline_id,
            "loss_reason_id": null,
            "created_by": l.created_by,
            "updated_by": l.updated_by,
            "created_at": l.created_at,
            "updated_at": l.updated_at,
            "closed_at": l.closed_at,
            "closest_task_at": null,
            "is_deleted": false,
            "custom_fields_values": null,
            "score": null,
            "account_id": ACCOUNT_ID,
            "labor_cost": null,
            "_links": self.href(&format!("/api/v4/leads/{}", l.id)),
            "_embedded": emb,
        })
    }

    fn render_user(&self, u: &User) -> Value {
        let all = json!({"view": "A", "edit": "A", "add": "A", "delete": "A", "export": "A"});
        json!({
            "id": u.id,
            "name": u.name,
            "email": u.email,
            "lang": "en",
            "rights": {
                "leads": all, "contacts": all, "companies": all,
                "tasks": {"edit": "A", "delete": "A"},
                "mail_access": false, "catalog_access": false, "status_rights": [],
                "is_admin": u.is_admin, "is_free": false, "is_active": true,
                "group_id": null, "role_id": null,
            },
            "_links": self.href(&format!("/api/v4/users/{}", u.id)),
        })
    }
}

struct Shared {
    state: Arc<Mutex<State>>,
}

/// A fake Kommo account. `url` is its `base_url`.
pub struct FakeKommo {
    /// `http://127.0.0.1:PORT`: the account's address (API at `/api/v4`, OAuth at `/oauth2`).
    pub url: String,
    state: Arc<Mutex<State>>,
    http: reqwest::Client,
    handle: ServerHandle,
}

impl FakeKommo {
    pub async fn start() -> FakeKommo {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake Kommo");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::new(url.clone())));
        let shared = web::Data::new(Shared {
            state: state.clone(),
        });
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .app_data(web::PayloadConfig::new(4 * 1024 * 1024))
                .default_service(web::to(dispatch))
        })
        .workers(2)
        .disable_signals()
        .listen(listener)
        .expect("listen fake Kommo")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .user_agent("Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0")
            .build()
            .unwrap();
        FakeKommo {
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

    // ---- account content ------------------------------------------------------------------

    /// Adds (or replaces) a user.
    pub fn add_user(&self, id: i64, name: &str, is_admin: bool) {
        self.lock().users.insert(
            id,
            User {
                id,
                name: name.into(),
                email: format!("{}@example.com", name.to_lowercase()),
                is_admin,
            },
        );
    }

    /// Users as `GET /api/v4/users` shows them.
    pub fn users(&self) -> Vec<Value> {
        let st = self.lock();
        st.users.values().map(|u| st.render_user(u)).collect()
    }

    /// A contact with `phone` as its PHONE (enum WORK), stored exactly as given; its id.
    pub fn add_contact(&self, name: &str, phone: &str, responsible_user_id: i64) -> i64 {
        self.lock().new_party(
            false,
            name,
            responsible_user_id,
            vec![phone_field(phone, "WORK")],
        )
    }

    /// A company with `phone` as its PHONE (enum WORK); its id.
    pub fn add_company(&self, name: &str, phone: &str, responsible_user_id: i64) -> i64 {
        self.lock().new_party(
            true,
            name,
            responsible_user_id,
            vec![phone_field(phone, "WORK")],
        )
    }

    /// An active lead (stage STATUS_NEW) bound to the contact; its id.
    pub fn add_lead_for(&self, contact_id: i64, responsible_user_id: i64) -> i64 {
        let mut st = self.lock();
        assert!(
            st.contact(contact_id).is_some(),
            "fake Kommo: no contact {contact_id}"
        );
        let lead = st.new_lead(None, responsible_user_id, STATUS_NEW);
        lead.contacts.push(contact_id);
        lead.id
    }

    /// Moves a lead to "won" (142) or "lost" (143): it is no longer active.
    pub fn close_lead(&self, lead_id: i64, won: bool) {
        let mut st = self.lock();
        let l = st
            .leads
            .iter_mut()
            .find(|l| l.id == lead_id)
            .unwrap_or_else(|| panic!("fake Kommo: no lead {lead_id}"));
        l.status_id = if won { STATUS_WON } else { STATUS_LOST };
        l.closed_at = Some(unix_now());
    }

    /// Contacts as `GET /api/v4/contacts?with=leads` shows them, hidden (unsorted) ones too.
    pub fn contacts(&self) -> Vec<Value> {
        let st = self.lock();
        st.contacts
            .iter()
            .map(|c| st.render_party(c, "contacts", true))
            .collect()
    }

    pub fn contact(&self, id: i64) -> Option<Value> {
        let st = self.lock();
        st.contact(id).map(|c| st.render_party(c, "contacts", true))
    }

    pub fn companies(&self) -> Vec<Value> {
        let st = self.lock();
        st.companies
            .iter()
            .map(|c| st.render_party(c, "companies", true))
            .collect()
    }

    /// Leads as `GET /api/v4/leads?with=contacts` shows them, incoming (unsorted) ones too.
    pub fn leads(&self) -> Vec<Value> {
        let st = self.lock();
        st.leads.iter().map(|l| st.render_lead(l, true)).collect()
    }

    pub fn lead(&self, id: i64) -> Option<Value> {
        let st = self.lock();
        st.lead(id).map(|l| st.render_lead(l, true))
    }

    // ---- what was sent --------------------------------------------------------------------

    /// Every accepted `/api/v4/calls` item as sent, plus `id`, `entity_id`, `entity_type`
    /// (duplicates kept).
    pub fn calls(&self) -> Vec<Value> {
        self.lock().calls.clone()
    }

    /// Accepted `leads/unsorted/sip` items as sent, plus `uid`.
    pub fn unsorted(&self) -> Vec<Value> {
        self.lock()
            .unsorted
            .iter()
            .map(|u| {
                let mut v = u.item.clone();
                v["uid"] = json!(u.uid);
                v
            })
            .collect()
    }

    /// Accepted tasks as sent, plus `id` (and later PATCHes merged in).
    pub fn tasks(&self) -> Vec<Value> {
        self.lock().tasks.clone()
    }

    /// Accepted `/api/v2/events` items (`phone_call`) as sent.
    pub fn events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    /// Accepted notes as sent, plus `id`, `entity_id`, `entity_type` (PATCHes merged in).
    pub fn notes(&self) -> Vec<Value> {
        self.lock().notes.clone()
    }

    /// Every request in arrival order, refused ones included.
    pub fn requests(&self) -> Vec<KommoRequest> {
        self.lock().requests.clone()
    }

    /// Requests of one path (trailing `/` ignored).
    pub fn requests_to(&self, path: &str) -> Vec<KommoRequest> {
        let want = path.trim_end_matches('/');
        self.lock()
            .requests
            .iter()
            .filter(|r| r.path.trim_end_matches('/') == want)
            .cloned()
            .collect()
    }

    /// How many 429 were answered.
    pub fn rejected(&self) -> usize {
        self.lock().rejected
    }

    // ---- faults ---------------------------------------------------------------------------

    /// Admitted API requests per sliding second (default 7); more get 429.
    pub fn set_rate_limit(&self, per_second: u32) {
        let mut st = self.lock();
        st.rate = per_second;
        st.window.clear();
    }

    /// While on, a 429 comes as an nginx HTML page instead of problem+json.
    pub fn set_rate_limit_html(&self, on: bool) {
        self.lock().rate_html = on;
    }

    /// While on, every API request gets the nginx 403 HTML page (IP blocked).
    pub fn set_blocked(&self, on: bool) {
        self.lock().blocked = on;
    }

    /// While on, every API request gets 402 problem+json (account not paid).
    pub fn set_unpaid(&self, on: bool) {
        self.lock().unpaid = on;
    }

    /// While on, every API request gets 503 (nginx HTML).
    pub fn set_outage(&self, on: bool) {
        self.lock().outage = on;
    }

    /// The next request to `path` (exact, trailing `/` ignored; `/oauth2/access_token` too)
    /// that passes the gate gets `status` with `body`: a JSON string is sent as text/html,
    /// anything else as JSON (problem+json for statuses ≥ 400). Several can be queued.
    pub fn fail_next(&self, path: &str, status: u16, body: Value) {
        self.lock().faults.push_back(Fault {
            path: path.trim_end_matches('/').to_string(),
            status,
            body,
        });
    }

    /// While on, the long-lived token is refused (401), as after the admin revoked it.
    pub fn set_long_lived_revoked(&self, on: bool) {
        self.lock().long_lived_revoked = on;
    }

    /// Polls `f` every 10 ms until it gives something; after `within`, panics naming `what`
    /// with a dump of the requests and of what was logged.
    pub async fn wait_for<T>(
        &self,
        within: Duration,
        what: &str,
        f: impl Fn(&FakeKommo) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            if let Some(t) = f(self) {
                return t;
            }
            if Instant::now() >= deadline {
                panic!("fake Kommo: no {what} within {within:?}\n{}", self.dump());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Requests (method, path, status), calls, unsorted, tasks and events, for failure messages.
    pub fn dump(&self) -> String {
        let st = self.lock();
        let reqs: Vec<String> = st
            .requests
            .iter()
            .map(|r| format!("  {} {} -> {} {}", r.method, r.path, r.status, r.body))
            .collect();
        let unsorted: Vec<&Value> = st.unsorted.iter().map(|u| &u.item).collect();
        format!(
            "requests:\n{}\ncalls: {:#}\nunsorted: {:#}\ntasks: {:#}\nevents: {:#}\nnotes: {:#}",
            reqs.join("\n"),
            json!(st.calls),
            json!(unsorted),
            json!(st.tasks),
            json!(st.events),
            json!(st.notes)
        )
    }

    // ---- OAuth ----------------------------------------------------------------------------

    /// A one-shot authorization code (20 min) for the admin, Anna.
    pub fn issue_code(&self) -> String {
        self.issue_code_for(ANNA)
    }

    /// A one-shot authorization code whose tokens act as `user_id`.
    pub fn issue_code_for(&self, user_id: i64) -> String {
        let code = format!(
            "def50200{:032x}{:032x}",
            rand::random::<u128>(),
            rand::random::<u128>()
        );
        self.lock().codes.insert(
            code.clone(),
            Code {
                user_id,
                expires_at: Instant::now() + CODE_TTL,
                used: false,
            },
        );
        code
    }

    /// A valid (access, refresh) pair for Anna without going through the OAuth server.
    pub fn issue_tokens(&self) -> (String, String) {
        let (a, r, _) = self.lock().issue_pair(ANNA);
        (a, r)
    }

    /// `expires_in` of access tokens issued from now on (default 86400 s).
    pub fn set_access_ttl(&self, ttl: Duration) {
        self.lock().access_ttl = ttl;
    }

    /// Every OAuth access token issued so far gets 401 (refresh tokens still work).
    pub fn expire_access_tokens(&self) {
        for t in self.lock().access.values_mut() {
            t.expired = true;
        }
    }

    /// Every OAuth access and refresh token issued so far is revoked (integration disconnected).
    pub fn revoke_oauth_tokens(&self) {
        let mut st = self.lock();
        for t in st.access.values_mut() {
            t.revoked = true;
        }
        for t in st.refresh.values_mut() {
            t.used = true;
        }
    }

    /// Successful refresh_token grants.
    pub fn refreshes(&self) -> usize {
        self.lock().refreshes
    }

    // ---- widget tokens --------------------------------------------------------------------

    /// The claims Kommo puts in the widget's `X-Auth-Token` for `user_id`, issued now.
    pub fn widget_claims(&self, user_id: i64) -> Map<String, Value> {
        let is_admin = self.lock().is_admin(user_id);
        let now = unix_now();
        let aud = url::Url::parse(REDIRECT_URI)
            .unwrap()
            .origin()
            .ascii_serialization();
        let v = json!({
            "iss": self.url,
            "aud": aud,
            "jti": uuid(),
            "iat": now,
            "nbf": now,
            "exp": now + WIDGET_TOKEN_TTL.as_secs() as i64,
            "account_id": ACCOUNT_ID,
            "subdomain": SUBDOMAIN,
            "user_id": user_id,
            "client_uuid": CLIENT_ID,
            "is_admin": is_admin,
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    /// A valid widget token (HS256 with CLIENT_SECRET) for `user_id`.
    pub fn widget_token(&self, user_id: i64) -> String {
        sign_hs256(&self.widget_claims(user_id), CLIENT_SECRET)
    }

    /// A widget token whose claims `tweak` changed, signed with `secret`: expired, foreign
    /// `aud`/`iss`/`account_id`, forged (another secret) variants.
    pub fn widget_token_with(
        &self,
        user_id: i64,
        tweak: impl FnOnce(&mut Map<String, Value>),
        secret: &str,
    ) -> String {
        let mut claims = self.widget_claims(user_id);
        tweak(&mut claims);
        sign_hs256(&claims, secret)
    }

    // ---- the browser ----------------------------------------------------------------------

    /// GETs a call's `link` like a browser playing it (no auth header, redirects followed):
    /// (status, content-type, body length); (0, "", 0) when it cannot be reached.
    pub async fn fetch_link(&self, url: &str) -> (u16, String, usize) {
        let r = self
            .http
            .get(url)
            .header(
                "accept",
                "audio/webm,audio/ogg,audio/wav,audio/*;q=0.9,application/ogg;q=0.7,video/*;q=0.6,*/*;q=0.5",
            )
            .header("referer", format!("{}/leads/", self.url))
            .send()
            .await;
        let Ok(r) = r else {
            return (0, String::new(), 0);
        };
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let len = r.bytes().await.map(|b| b.len()).unwrap_or(0);
        (status, ct, len)
    }
}

/// A compact HS256 JWT of `claims`.
pub fn sign_hs256(claims: &Map<String, Value>, secret: &str) -> String {
    let header = b64(br#"{"typ":"JWT","alg":"HS256"}"#);
    let payload = b64(&serde_json::to_vec(claims).unwrap());
    let input = format!("{header}.{payload}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", b64(&mac.finalize().into_bytes()))
}

// ---- small helpers ---------------------------------------------------------------------------

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn uuid() -> String {
    let h = format!("{:032x}", rand::random::<u128>());
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// The last 10 digits of a number (all of them when fewer).
pub fn last10(s: &str) -> String {
    let d: Vec<char> = s.chars().filter(char::is_ascii_digit).collect();
    d[d.len().saturating_sub(10)..].iter().collect()
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

// ---- answers ---------------------------------------------------------------------------------

enum Out {
    /// application/hal+json
    Json(u16, Value),
    /// application/problem+json
    Problem(u16, Value),
    Empty(u16),
    Html(u16, String),
}

impl Out {
    fn status(&self) -> u16 {
        match self {
            Out::Json(s, _) | Out::Problem(s, _) | Out::Empty(s) | Out::Html(s, _) => *s,
        }
    }

    fn response(self) -> HttpResponse {
        let code = |s: u16| StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        match self {
            Out::Json(s, v) => HttpResponse::build(code(s))
                .content_type("application/hal+json")
                .body(v.to_string()),
            Out::Problem(s, v) => HttpResponse::build(code(s))
                .content_type("application/problem+json")
                .body(v.to_string()),
            Out::Empty(s) => HttpResponse::build(code(s)).finish(),
            Out::Html(s, b) => HttpResponse::build(code(s))
                .content_type("text/html; charset=utf-8")
                .body(b),
        }
    }
}

fn title_of(status: u16) -> &'static str {
    StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

fn problem(status: u16, detail: &str) -> Out {
    Out::Problem(
        status,
        json!({"title": title_of(status), "type": format!("https://httpstatus.es/{status}"),
               "status": status, "detail": detail}),
    )
}

fn validation(items: Vec<Value>) -> Out {
    Out::Problem(
        400,
        json!({"validation-errors": items, "title": "Bad Request",
               "type": "https://httpstatus.es/400", "status": 400,
               "detail": "Request validation failed"}),
    )
}

/// A validation error of the whole body.
fn invalid_body(code: &str, detail: &str) -> Out {
    validation(vec![
        json!({"request_id": "0", "errors": [{"code": code, "path": "", "detail": detail}]}),
    ])
}

fn oauth_error(status: u16, kind: &str, hint: Option<&str>) -> Out {
    let (title, detail) = match kind {
        "invalid_client" => ("Invalid client", "Client authentication failed"),
        "unsupported_grant_type" => (
            "Unsupported grant type",
            "The authorization grant type is not supported by the authorization server.",
        ),
        _ => (
            "Invalid request",
            "The request is missing a required parameter, includes an invalid parameter value, includes a parameter more than once, or is otherwise malformed.",
        ),
    };
    let mut v = json!({"title": title, "type": OAUTH_PROBLEM, "status": status, "detail": detail});
    if let Some(h) = hint {
        v["hint"] = json!(h);
    }
    Out::Problem(status, v)
}

// ---- validation ------------------------------------------------------------------------------

#[derive(Default)]
struct Errs(Vec<Value>);

impl Errs {
    fn push(&mut self, code: &str, path: &str, detail: &str) {
        self.0
            .push(json!({"code": code, "path": path, "detail": detail}));
    }
    fn missing(&mut self, p: &str) {
        self.push("FieldMissing", p, "This field is missing.");
    }
    fn null(&mut self, p: &str) {
        self.push("NotNullable", p, "This value should not be null.");
    }
    fn choice(&mut self, p: &str) {
        self.push(
            "NotSupportedChoice",
            p,
            "The value you selected is not a valid choice.",
        );
    }
    fn ty(&mut self, p: &str, ty: &str) {
        self.push(
            "InvalidType",
            p,
            &format!("This value should be of type {ty}."),
        );
    }
    fn blank(&mut self, p: &str) {
        self.push("NotBlank", p, "This value should not be blank.");
    }
    fn extra(&mut self, p: &str) {
        self.push("FieldExtra", p, "This field was not expected.");
    }
    fn range(&mut self, p: &str, detail: &str) {
        self.push("InvalidRange", p, detail);
    }
}

/// Reports every `null` under `v`; `custom_fields_values.N.values` may be null when
/// `cfv_clear` (a PATCH clearing a field).
fn no_nulls(v: &Value, path: &str, cfv_clear: bool, e: &mut Errs) {
    match v {
        Value::Null => {
            let clearing = cfv_clear
                && {
                    let parts: Vec<&str> = path.split('.').collect();
                    matches!(parts.as_slice(), ["custom_fields_values", n, "values"] if n.parse::<usize>().is_ok())
                };
            if !clearing {
                e.null(path);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                no_nulls(x, &join(path, &i.to_string()), cfv_clear, e);
            }
        }
        Value::Object(m) => {
            for (k, x) in m {
                no_nulls(x, &join(path, k), cfv_clear, e);
            }
        }
        _ => {}
    }
}

/// Typed access to the fields of one object; a null reads as absent (`no_nulls` reported it).
struct Obj<'a> {
    m: &'a Map<String, Value>,
    prefix: String,
}

impl<'a> Obj<'a> {
    fn of(v: &'a Value, prefix: &str, e: &mut Errs) -> Option<Obj<'a>> {
        match v.as_object() {
            Some(m) => Some(Obj {
                m,
                prefix: prefix.to_string(),
            }),
            None => {
                if !v.is_null() {
                    e.ty(prefix, "object");
                }
                None
            }
        }
    }

    fn path(&self, key: &str) -> String {
        join(&self.prefix, key)
    }

    fn has(&self, key: &str) -> bool {
        self.m.get(key).is_some_and(|v| !v.is_null())
    }

    fn raw(&self, key: &str, required: bool, e: &mut Errs) -> Option<&'a Value> {
        match self.m.get(key) {
            None => {
                if required {
                    e.missing(&self.path(key));
                }
                None
            }
            Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    fn str(&self, key: &str, required: bool, e: &mut Errs) -> Option<&'a str> {
        let v = self.raw(key, required, e)?;
        match v.as_str() {
            Some(s) => Some(s),
            None => {
                e.ty(&self.path(key), "string");
                None
            }
        }
    }

    /// A string that must not be blank.
    fn text(&self, key: &str, required: bool, e: &mut Errs) -> Option<&'a str> {
        let s = self.str(key, required, e)?;
        if s.trim().is_empty() {
            e.blank(&self.path(key));
            return None;
        }
        Some(s)
    }

    fn int(&self, key: &str, required: bool, e: &mut Errs) -> Option<i64> {
        let v = self.raw(key, required, e)?;
        match v.as_i64() {
            Some(i) => Some(i),
            None => {
                e.ty(&self.path(key), "int");
                None
            }
        }
    }

    fn non_negative(&self, key: &str, required: bool, e: &mut Errs) -> Option<i64> {
        let i = self.int(key, required, e)?;
        if i < 0 {
            e.range(
                &self.path(key),
                "This value should be greater than or equal to 0.",
            );
            return None;
        }
        Some(i)
    }

    fn bool(&self, key: &str, required: bool, e: &mut Errs) -> Option<bool> {
        let v = self.raw(key, required, e)?;
        match v.as_bool() {
            Some(b) => Some(b),
            None => {
                e.ty(&self.path(key), "bool");
                None
            }
        }
    }

    fn obj(&self, key: &str, required: bool, e: &mut Errs) -> Option<Obj<'a>> {
        let v = self.raw(key, required, e)?;
        Obj::of(v, &self.path(key), e)
    }

    fn arr(&self, key: &str, required: bool, e: &mut Errs) -> Option<&'a Vec<Value>> {
        let v = self.raw(key, required, e)?;
        match v.as_array() {
            Some(a) => Some(a),
            None => {
                e.ty(&self.path(key), "array");
                None
            }
        }
    }

    fn only(&self, allowed: &[&str], e: &mut Errs) {
        for k in self.m.keys() {
            if !allowed.contains(&k.as_str()) {
                e.extra(&self.path(k));
            }
        }
    }

    /// A user id that must be one of the account's users.
    fn user(&self, st: &State, key: &str, e: &mut Errs) -> Option<i64> {
        let id = self.int(key, false, e)?;
        if st.users.contains_key(&id) {
            Some(id)
        } else {
            e.push("NotSupportedChoice", &self.path(key), "User not found");
            None
        }
    }

    /// A string or an integer (given as a string).
    fn str_or_int(&self, key: &str, required: bool, e: &mut Errs) -> Option<String> {
        let v = self.raw(key, required, e)?;
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
            _ => {
                e.ty(&self.path(key), "string");
                None
            }
        }
    }
}

fn request_id(item: &Value, i: usize) -> String {
    match item.get("request_id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => i.to_string(),
    }
}

/// Validates every item; all of them pass, or a 400 lists every error of every item.
fn validate_all<T>(
    items: &[Value],
    cfv_clear: bool,
    mut f: impl FnMut(&Obj<'_>, &mut Errs) -> Option<T>,
) -> Result<Vec<(String, T)>, Out> {
    let mut bad = Vec::new();
    let mut ok = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let rid = request_id(item, i);
        let mut e = Errs::default();
        let r = match Obj::of(item, "", &mut e) {
            Some(o) => {
                no_nulls(item, "", cfv_clear, &mut e);
                if let Some(Value::Number(_)) | Some(Value::Bool(_)) = item.get("request_id") {
                    e.ty("request_id", "string");
                }
                f(&o, &mut e)
            }
            None => {
                if item.is_null() {
                    e.null("");
                }
                None
            }
        };
        if !e.0.is_empty() {
            bad.push(json!({"request_id": rid, "errors": e.0}));
        } else if let Some(t) = r {
            ok.push((rid, t));
        }
    }
    if bad.is_empty() {
        Ok(ok)
    } else {
        Err(validation(bad))
    }
}

/// `custom_fields_values` of a contact/company: (field id, the normalized field, or None to
/// clear it).
fn check_cfv(v: &Value, path: &str, patch: bool, e: &mut Errs) -> Vec<(i64, Option<Value>)> {
    let Some(arr) = v.as_array() else {
        e.ty(path, "array");
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, f) in arr.iter().enumerate() {
        let p = format!("{path}.{i}");
        let Some(o) = Obj::of(f, &p, e) else {
            continue;
        };
        o.only(&["field_id", "field_code", "values"], e);
        let def = match (o.int("field_id", false, e), o.str("field_code", false, e)) {
            (Some(id), _) => {
                let d = FIELDS.iter().find(|d| d.id == id);
                if d.is_none() {
                    e.choice(&o.path("field_id"));
                }
                d
            }
            (None, Some(code)) => {
                let d = FIELDS.iter().find(|d| d.code == code);
                if d.is_none() {
                    e.choice(&o.path("field_code"));
                }
                d
            }
            (None, None) => {
                if !o.m.contains_key("field_id") && !o.m.contains_key("field_code") {
                    e.missing(&o.path("field_id"));
                }
                None
            }
        };
        match f.get("values") {
            None => e.missing(&o.path("values")),
            Some(Value::Null) => {
                if let (true, Some(d)) = (patch, def) {
                    out.push((d.id, None));
                }
            }
            Some(vals) => {
                let Some(list) = vals.as_array() else {
                    e.ty(&o.path("values"), "array");
                    continue;
                };
                let mut norm = Vec::new();
                for (j, x) in list.iter().enumerate() {
                    let Some(vo) = Obj::of(x, &format!("{p}.values.{j}"), e) else {
                        continue;
                    };
                    vo.only(&["value", "enum_code", "enum_id"], e);
                    let value = vo.str("value", true, e);
                    let code = vo.str("enum_code", false, e);
                    let id = vo.int("enum_id", false, e);
                    let Some(d) = def else {
                        continue;
                    };
                    if d.enums.is_empty() {
                        if vo.has("enum_code") {
                            e.extra(&vo.path("enum_code"));
                        }
                        if vo.has("enum_id") {
                            e.extra(&vo.path("enum_id"));
                        }
                        if let Some(v) = value {
                            norm.push(json!({"value": v}));
                        }
                        continue;
                    }
                    let en = match (id, code) {
                        (Some(id), _) => {
                            let en = d.enums.iter().find(|x| x.0 == id);
                            if en.is_none() {
                                e.choice(&vo.path("enum_id"));
                            }
                            en
                        }
                        (None, Some(c)) => {
                            let en = d.enums.iter().find(|x| x.1 == c);
                            if en.is_none() {
                                e.choice(&vo.path("enum_code"));
                            }
                            en
                        }
                        (None, None) => Some(&d.enums[0]),
                    };
                    if let (Some(v), Some(en)) = (value, en) {
                        norm.push(json!({"value": v, "enum_id": en.0, "enum_code": en.1}));
                    }
                }
                if let Some(d) = def {
                    if norm.is_empty() {
                        out.push((d.id, None));
                    } else {
                        out.push((
                            d.id,
                            Some(json!({"field_id": d.id, "field_name": d.name,
                                        "field_code": d.code, "field_type": d.ty,
                                        "values": norm})),
                        ));
                    }
                }
            }
        }
    }
    out
}

fn apply_cfv(cfv: &mut Vec<Value>, changes: Vec<(i64, Option<Value>)>) {
    for (id, field) in changes {
        cfv.retain(|f| f["field_id"] != id);
        if let Some(f) = field {
            cfv.push(f);
        }
    }
}

/// `_embedded.tags` / `tags_to_add` / `tags_to_delete`: accepted, not kept.
fn check_tags(o: &Obj<'_>, key: &str, e: &mut Errs) {
    if let Some(tags) = o.arr(key, false, e) {
        for (i, t) in tags.iter().enumerate() {
            if let Some(to) = Obj::of(t, &format!("{}.{i}", o.path(key)), e) {
                to.only(&["id", "name"], e);
                to.int("id", false, e);
                to.str("name", false, e);
            }
        }
    }
}

// ---- the HTTP side ---------------------------------------------------------------------------

fn record_body(body: &[u8], ct: Option<&str>) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    let ct = ct.unwrap_or("").to_ascii_lowercase();
    if ct.starts_with("application/x-www-form-urlencoded") {
        if let Ok(pairs) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(body) {
            return Value::Object(pairs.into_iter().map(|(k, v)| (k, json!(v))).collect());
        }
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

async fn dispatch(req: HttpRequest, body: web::Bytes, sh: web::Data<Shared>) -> HttpResponse {
    let path = req.path().to_string();
    let method = req.method().as_str().to_string();
    let query = req.query_string().to_string();
    let ct = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string());
    let mut st = sh.state.lock().unwrap();
    st.requests.push(KommoRequest {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        body: record_body(&body, ct.as_deref()),
        auth: auth.clone(),
        content_type: ct.clone(),
        status: 0,
        at: Instant::now(),
    });
    let index = st.requests.len() - 1;
    let out = if path.starts_with("/api/") {
        let cx = Ctx {
            method: &method,
            path: path.trim_end_matches('/'),
            segs: path.trim_matches('/').split('/').collect(),
            query: serde_urlencoded::from_str(&query).unwrap_or_default(),
            content_type: ct.as_deref(),
            body: &body,
            user: 0,
        };
        api(&mut st, cx, auth.as_deref())
    } else if path.trim_end_matches('/') == "/oauth2/access_token" {
        oauth(&mut st, &method, ct.as_deref(), &body)
    } else {
        Out::Html(404, NGINX_404.into())
    };
    st.requests[index].status = out.status();
    drop(st);
    out.response()
}

fn take_fault(st: &mut State, path: &str) -> Option<Out> {
    let path = path.trim_end_matches('/');
    let i = st.faults.iter().position(|f| f.path == path)?;
    let f = st.faults.remove(i).unwrap();
    Some(match f.body {
        Value::String(s) => Out::Html(f.status, s),
        v if f.status >= 400 => Out::Problem(f.status, v),
        v => Out::Json(f.status, v),
    })
}

struct Ctx<'a> {
    method: &'a str,
    /// Without a trailing `/`.
    path: &'a str,
    segs: Vec<&'a str>,
    query: Vec<(String, String)>,
    content_type: Option<&'a str>,
    body: &'a [u8],
    /// The user the token acts as.
    user: i64,
}

impl Ctx<'_> {
    fn q(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn with(&self, what: &str) -> bool {
        self.q("with")
            .is_some_and(|w| w.split(',').any(|x| x.trim() == what))
    }

    /// Values of `filter[name]`, `filter[name][]`, `filter[name][N]`.
    fn filter(&self, name: &str) -> Vec<&str> {
        let base = format!("filter[{name}]");
        self.query
            .iter()
            .filter(|(k, _)| {
                k == &base
                    || k.strip_prefix(&base).is_some_and(|rest| {
                        rest.starts_with('[')
                            && rest.ends_with(']')
                            && rest[1..rest.len() - 1].chars().all(|c| c.is_ascii_digit())
                    })
            })
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect()
    }

    fn json(&self) -> Result<Value, Out> {
        let ct = self.content_type.unwrap_or("").to_ascii_lowercase();
        if !ct.starts_with("application/json") {
            return Err(problem(400, "Content-Type must be application/json"));
        }
        if self.body.is_empty() {
            return Err(invalid_body("NotBlank", "The request body is empty."));
        }
        serde_json::from_slice(self.body).map_err(|_| problem(400, "Syntax error"))
    }

    fn batch(&self) -> Result<Vec<Value>, Out> {
        match self.json()? {
            Value::Array(a) if a.is_empty() => Err(invalid_body(
                "NotBlank",
                "This collection should contain 1 element or more.",
            )),
            Value::Array(a) => Ok(a),
            _ => Err(invalid_body(
                "InvalidType",
                "This value should be of type array.",
            )),
        }
    }

    fn page_limit(&self) -> Result<(usize, usize), Out> {
        let mut e = Errs::default();
        let parse = |key: &str, default: usize, e: &mut Errs| match self.q(key) {
            None => default,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n >= 1 => n,
                _ => {
                    e.push(
                        "InvalidType",
                        key,
                        "This value should be a positive integer.",
                    );
                    default
                }
            },
        };
        let page = parse("page", 1, &mut e);
        let limit = parse("limit", DEFAULT_LIMIT, &mut e);
        if limit > MAX_LIMIT {
            e.range("limit", "This value should be less than or equal to 250.");
        }
        if e.0.is_empty() {
            Ok((page, limit))
        } else {
            Err(validation(vec![json!({"request_id": "0", "errors": e.0})]))
        }
    }

    fn link(&self, st: &State, page: usize, limit: usize) -> Value {
        let mut pairs: Vec<(String, String)> = self
            .query
            .iter()
            .filter(|(k, _)| k != "page" && k != "limit")
            .cloned()
            .collect();
        pairs.push(("page".into(), page.to_string()));
        pairs.push(("limit".into(), limit.to_string()));
        let q = serde_urlencoded::to_string(&pairs).unwrap_or_default();
        json!({"href": format!("{}{}?{q}", st.url, self.path)})
    }

    /// A HAL page of `items`; 204 when the page is empty.
    fn page(
        &self,
        st: &State,
        entity: &str,
        items: Vec<Value>,
        extra: Map<String, Value>,
    ) -> Result<Out, Out> {
        let (page, limit) = self.page_limit()?;
        let total = items.len();
        let start = (page - 1).saturating_mul(limit);
        let slice: Vec<Value> = items.into_iter().skip(start).take(limit).collect();
        if slice.is_empty() {
            return Ok(Out::Empty(204));
        }
        let mut links = Map::new();
        links.insert("self".into(), self.link(st, page, limit));
        if start + limit < total {
            links.insert("next".into(), self.link(st, page + 1, limit));
        }
        if page > 1 {
            links.insert("prev".into(), self.link(st, page - 1, limit));
        }
        let mut body = extra;
        body.insert("_page".into(), json!(page));
        body.insert("_links".into(), Value::Object(links));
        body.insert("_embedded".into(), json!({ entity: slice }));
        Ok(Out::Json(200, Value::Object(body)))
    }
}

fn api(st: &mut State, mut cx: Ctx<'_>, auth: Option<&str>) -> Out {
    if st.blocked {
        return Out::Html(403, NGINX_403.into());
    }
    if st.outage {
        return Out::Html(503, NGINX_503.into());
    }
    let now = Instant::now();
    while st
        .window
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
    {
        st.window.pop_front();
    }
    if st.window.len() >= st.rate as usize {
        st.rejected += 1;
        return if st.rate_html {
            Out::Html(429, NGINX_429.into())
        } else {
            problem(429, "Too many requests")
        };
    }
    st.window.push_back(now);
    cx.user = match authenticate(st, auth) {
        Ok(u) => u,
        Err(o) => return o,
    };
    if st.unpaid {
        return problem(402, "Payment required: the account is not paid");
    }
    if let Some(f) = take_fault(st, cx.path) {
        return f;
    }
    match route(st, &cx) {
        Ok(o) | Err(o) => o,
    }
}

fn authenticate(st: &State, auth: Option<&str>) -> Result<i64, Out> {
    let Some(token) = auth.filter(|t| !t.is_empty()) else {
        return Err(problem(401, "Unauthorized"));
    };
    if token == LONG_LIVED_TOKEN {
        return if st.long_lived_revoked {
            Err(problem(401, "Token has been revoked"))
        } else {
            Ok(ANNA)
        };
    }
    match st.access.get(token) {
        None => Err(problem(401, "Unauthorized")),
        Some(t) if t.revoked => Err(problem(401, "Token has been revoked")),
        Some(t) if t.expired || Instant::now() >= t.expires_at => {
            Err(problem(401, "Token has expired"))
        }
        Some(t) => Ok(t.user_id),
    }
}

fn route(st: &mut State, cx: &Ctx<'_>) -> Result<Out, Out> {
    let segs = cx.segs.clone();
    match (cx.method, segs.as_slice()) {
        ("GET", ["api", "v4", "account"]) => Ok(account(st, cx)),
        ("GET", ["api", "v4", "users"]) => users_list(st, cx),
        ("GET", ["api", "v4", "users", id]) => {
            let id = parse_id(id)?;
            if !st.is_admin(cx.user) && id != cx.user {
                return Err(problem(403, "Access denied"));
            }
            match st.users.get(&id) {
                Some(u) => Ok(Out::Json(200, st.render_user(u))),
                None => Ok(Out::Empty(204)),
            }
        }
        (_, ["api", "v4", "calls", ..]) => match (cx.method, segs.len()) {
            ("POST", 3) => add_calls(st, cx),
            _ => Err(problem(405, "Method Not Allowed")),
        },
        (_, ["api", "v4", "leads", "unsorted", rest @ ..]) => unsorted_route(st, cx, rest),
        ("POST", ["api", "v2", "events"]) => add_events(st, cx),
        ("GET", ["api", "v4", kind @ ("contacts" | "companies" | "leads")]) => list(st, cx, kind),
        ("GET", ["api", "v4", kind @ ("contacts" | "companies" | "leads"), id]) => {
            let id = parse_id(id)?;
            let v = match *kind {
                "leads" => st.lead(id).map(|l| st.render_lead(l, cx.with("contacts"))),
                "contacts" => st
                    .contact(id)
                    .filter(|c| !c.unsorted)
                    .map(|c| st.render_party(c, "contacts", cx.with("leads"))),
                _ => st
                    .company(id)
                    .map(|c| st.render_party(c, "companies", cx.with("leads"))),
            };
            Ok(v.map_or(Out::Empty(204), |v| Out::Json(200, v)))
        }
        ("POST", ["api", "v4", "contacts"]) => add_contacts(st, cx),
        ("POST", ["api", "v4", "leads"]) => add_leads(st, cx),
        ("PATCH", ["api", "v4", kind @ ("leads" | "contacts" | "companies"), "notes"]) => {
            patch_notes(st, cx, kind)
        }
        ("PATCH", ["api", "v4", "contacts"]) => patch_contacts(st, cx, None),
        ("PATCH", ["api", "v4", "contacts", id]) => {
            let id = parse_id(id)?;
            patch_contacts(st, cx, Some(id))
        }
        ("PATCH", ["api", "v4", "leads"]) => patch_leads(st, cx, None),
        ("PATCH", ["api", "v4", "leads", id]) => {
            let id = parse_id(id)?;
            patch_leads(st, cx, Some(id))
        }
        ("POST", ["api", "v4", "tasks"]) => add_tasks(st, cx),
        ("PATCH", ["api", "v4", "tasks"]) => patch_tasks(st, cx, None),
        ("PATCH", ["api", "v4", "tasks", id]) => {
            let id = parse_id(id)?;
            patch_tasks(st, cx, Some(id))
        }
        ("GET", ["api", "v4", "tasks"]) => list_tasks(st, cx),
        ("POST", ["api", "v4", kind @ ("leads" | "contacts" | "companies"), "notes"]) => {
            add_notes(st, cx, kind, None)
        }
        ("POST", ["api", "v4", kind @ ("leads" | "contacts" | "companies"), id, "notes"]) => {
            let id = parse_id(id)?;
            add_notes(st, cx, kind, Some(id))
        }
        (
            _,
            ["api", "v4", "account" | "users" | "contacts" | "companies" | "leads" | "tasks", ..]
            | ["api", "v2", "events"],
        ) => Err(problem(405, "Method Not Allowed")),
        _ => Err(problem(404, "Not Found")),
    }
}

fn parse_id(s: &str) -> Result<i64, Out> {
    s.parse::<i64>().map_err(|_| problem(404, "Not Found"))
}

fn account(st: &State, cx: &Ctx<'_>) -> Out {
    Out::Json(
        200,
        json!({
            "id": ACCOUNT_ID,
            "name": "pbxgate test account",
            "subdomain": SUBDOMAIN,
            "created_at": 1_700_000_000,
            "created_by": ANNA,
            "updated_at": 1_700_000_000,
            "updated_by": ANNA,
            "current_user_id": cx.user,
            "country": "US",
            "currency": "USD",
            "currency_symbol": "$",
            "customers_mode": "disabled",
            "is_unsorted_on": true,
            "mobile_feature_version": 0,
            "is_loss_reason_enabled": true,
            "is_helpbot_enabled": false,
            "is_technical_account": false,
            "contact_name_display_order": 1,
            "_links": st.href("/api/v4/account"),
        }),
    )
}

fn users_list(st: &State, cx: &Ctx<'_>) -> Result<Out, Out> {
    if !st.is_admin(cx.user) {
        return Err(problem(
            403,
            "Access denied: the users list is for administrators",
        ));
    }
    let (_, limit) = cx.page_limit()?;
    let users: Vec<Value> = st.users.values().map(|u| st.render_user(u)).collect();
    let mut extra = Map::new();
    extra.insert("_total_items".into(), json!(users.len()));
    extra.insert("_page_count".into(), json!(users.len().div_ceil(limit)));
    cx.page(st, "users", users, extra)
}

fn list(st: &State, cx: &Ctx<'_>, kind: &str) -> Result<Out, Out> {
    let query = cx
        .q("query")
        .map(str::to_lowercase)
        .filter(|q| !q.is_empty());
    let ids: Vec<i64> = cx
        .filter("id")
        .iter()
        .filter_map(|v| v.parse().ok())
        .collect();
    let id_ok = |id: i64| ids.is_empty() || ids.contains(&id);
    let items: Vec<Value> = match kind {
        "leads" => st
            .leads
            .iter()
            .filter(|l| l.status_id != STATUS_INCOMING && id_ok(l.id))
            .filter(|l| {
                query
                    .as_ref()
                    .is_none_or(|q| l.name.to_lowercase().contains(q))
            })
            .map(|l| st.render_lead(l, cx.with("contacts")))
            .collect(),
        _ => {
            let parties = if kind == "contacts" {
                &st.contacts
            } else {
                &st.companies
            };
            parties
                .iter()
                .filter(|p| !p.unsorted && id_ok(p.id))
                .filter(|p| {
                    query.as_ref().is_none_or(|q| {
                        p.name.to_lowercase().contains(q)
                            || p.texts().any(|t| t.to_lowercase().contains(q))
                    })
                })
                .map(|p| st.render_party(p, kind, cx.with("leads")))
                .collect()
        }
    };
    cx.page(st, kind, items, Map::new())
}

// ---- calls -----------------------------------------------------------------------------------

const CALL_FIELDS: &[&str] = &[
    "direction",
    "uniq",
    "duration",
    "source",
    "link",
    "phone",
    "call_result",
    "call_status",
    "call_responsible",
    "responsible_user_id",
    "created_by",
    "updated_by",
    "created_at",
    "updated_at",
    "request_id",
];

/// The checks of call params shared by `/api/v4/calls` items and call notes.
fn check_call_params(st: &State, o: &Obj<'_>, e: &mut Errs) {
    o.str("uniq", false, e);
    o.non_negative("duration", true, e);
    o.text("source", true, e);
    o.str("link", false, e);
    o.text("phone", true, e);
    o.str("call_result", false, e);
    if let Some(s) = o.int("call_status", false, e) {
        if !(1..=7).contains(&s) {
            e.choice(&o.path("call_status"));
        }
    }
    if let Some(v) = o.raw("call_responsible", false, e) {
        match v {
            Value::String(_) => {}
            Value::Number(n) if n.is_i64() => {
                if !st.users.contains_key(&n.as_i64().unwrap()) {
                    e.push(
                        "NotSupportedChoice",
                        &o.path("call_responsible"),
                        "User not found",
                    );
                }
            }
            _ => e.ty(&o.path("call_responsible"), "int|string"),
        }
    }
}

fn add_calls(st: &mut State, cx: &Ctx<'_>) -> Result<Out, Out> {
    let items = cx.batch()?;
    let ok = validate_all(&items, false, |o, e| {
        o.only(CALL_FIELDS, e);
        if let Some(d) = o.text("direction", true, e) {
            if d != "inbound" && d != "outbound" {
                e.choice(&o.path("direction"));
            }
        }
        check_call_params(st, o, e);
        o.user(st, "responsible_user_id", e);
        o.user(st, "created_by", e);
        o.user(st, "updated_by", e);
        o.non_negative("created_at", false, e);
        o.non_negative("updated_at", false, e);
        o.str("request_id", false, e);
        Some(Value::Object(o.m.clone()))
    })?;
    let mut created = Vec::new();
    let mut errors = Vec::new();
    for (rid, item) in ok {
        let phone = item["phone"].as_str().unwrap_or("");
        match st.call_target(phone) {
            Some((etype, eid)) => {
                let id = st.next_call;
                st.next_call += 1;
                let mut stored = item.clone();
                stored["id"] = json!(id);
                stored["entity_id"] = json!(eid);
                stored["entity_type"] = json!(etype);
                st.calls.push(stored);
                created.push(json!({
                    "id": id,
                    "entity_id": eid,
                    "entity_type": etype,
                    "account_id": ACCOUNT_ID,
                    "request_id": rid,
                    "_embedded": {"entity": {"id": eid,
                        "_links": st.href(&format!("/api/v4/{etype}/{eid}"))}},
                }));
            }
            None => errors.push(json!({
                "request_id": rid,
                "title": "Entity not found",
                "type": "https://httpstatus.es/400",
                "status": 400,
                "detail": format!("No contact or company with the phone {phone}"),
            })),
        }
    }
    let status = if errors.is_empty() { 200 } else { 400 };
    let mut body = json!({
        "_total_items": created.len(),
        "_links": st.href("/api/v4/calls"),
        "_embedded": {"calls": created},
    });
    if !errors.is_empty() {
        body["errors"] = json!(errors);
    }
    Ok(Out::Json(status, body))
}

// ---- unsorted --------------------------------------------------------------------------------

const UNSORTED_FIELDS: &[&str] = &[
    "source_uid",
    "source_name",
    "pipeline_id",
    "created_at",
    "metadata",
    "_embedded",
    "request_id",
];
const SIP_META_FIELDS: &[&str] = &[
    "uniq",
    "from",
    "phone",
    "called_at",
    "duration",
    "link",
    "service_code",
    "is_call_event_needed",
    "call_responsible",
];

struct NewParty {
    name: String,
    first_name: String,
    last_name: String,
    responsible: Option<i64>,
    created_by: i64,
    cfv: Vec<(i64, Option<Value>)>,
    company: Option<i64>,
}

const CONTACT_FIELDS: &[&str] = &[
    "name",
    "first_name",
    "last_name",
    "responsible_user_id",
    "created_by",
    "updated_by",
    "created_at",
    "updated_at",
    "custom_fields_values",
    "tags_to_add",
    "_embedded",
    "request_id",
];

fn check_contact(st: &State, o: &Obj<'_>, e: &mut Errs) -> NewParty {
    o.only(CONTACT_FIELDS, e);
    let first = o.str("first_name", false, e).unwrap_or("").to_string();
    let last = o.str("last_name", false, e).unwrap_or("").to_string();
    let name = o
        .str("name", false, e)
        .map(str::to_string)
        .unwrap_or_else(|| format!("{first} {last}").trim().to_string());
    let responsible = o.user(st, "responsible_user_id", e);
    let created_by = o.user(st, "created_by", e).unwrap_or(0);
    o.user(st, "updated_by", e);
    o.non_negative("created_at", false, e);
    o.non_negative("updated_at", false, e);
    o.str("request_id", false, e);
    let cfv = o
        .raw("custom_fields_values", false, e)
        .map(|v| check_cfv(v, &o.path("custom_fields_values"), false, e))
        .unwrap_or_default();
    check_tags(o, "tags_to_add", e);
    let mut company = None;
    if let Some(emb) = o.obj("_embedded", false, e) {
        emb.only(&["tags", "companies"], e);
        check_tags(&emb, "tags", e);
        if let Some(list) = emb.arr("companies", false, e) {
            for (i, c) in list.iter().enumerate() {
                if let Some(co) = Obj::of(c, &format!("{}.{i}", emb.path("companies")), e) {
                    co.only(&["id"], e);
                    if let Some(id) = co.int("id", true, e) {
                        if st.company(id).is_some() {
                            company = Some(id);
                        } else {
                            e.push("NotSupportedChoice", &co.path("id"), "Company not found");
                        }
                    }
                }
            }
        }
    }
    NewParty {
        name,
        first_name: first,
        last_name: last,
        responsible,
        created_by,
        cfv,
        company,
    }
}

fn create_contact(st: &mut State, p: NewParty, user: i64, unsorted: bool) -> i64 {
    let id = st.new_party(false, &p.name, p.responsible.unwrap_or(user), Vec::new());
    let c = st.contacts.last_mut().unwrap();
    c.first_name = p.first_name;
    c.last_name = p.last_name;
    c.created_by = if p.created_by == 0 {
        user
    } else {
        p.created_by
    };
    c.unsorted = unsorted;
    c.company_id = p.company;
    apply_cfv(&mut c.cfv, p.cfv);
    id
}

struct NewLead {
    name: Option<String>,
    price: i64,
    responsible: Option<i64>,
    status_id: Option<i64>,
    created_by: i64,
    contacts: Vec<i64>,
    company: Option<i64>,
}

const LEAD_FIELDS: &[&str] = &[
    "name",
    "price",
    "status_id",
    "pipeline_id",
    "created_by",
    "updated_by",
    "created_at",
    "updated_at",
    "closed_at",
    "loss_reason_id",
    "responsible_user_id",
    "custom_fields_values",
    "tags_to_add",
    "_embedded",
    "request_id",
];

const LEAD_STATUSES: [i64; 4] = [STATUS_NEW, STATUS_IN_WORK, STATUS_WON, STATUS_LOST];

/// A lead to add; `embedded_links` allows `_embedded.contacts/companies` (not in unsorted).
fn check_lead(st: &State, o: &Obj<'_>, embedded_links: bool, e: &mut Errs) -> NewLead {
    o.only(LEAD_FIELDS, e);
    let name = o.str("name", false, e).map(str::to_string);
    let price = o.non_negative("price", false, e).unwrap_or(0);
    let status_id = o.int("status_id", false, e);
    if let Some(s) = status_id {
        if !LEAD_STATUSES.contains(&s) {
            e.choice(&o.path("status_id"));
        }
    }
    if let Some(p) = o.int("pipeline_id", false, e) {
        if p != PIPELINE_ID {
            e.choice(&o.path("pipeline_id"));
        }
    }
    let responsible = o.user(st, "responsible_user_id", e);
    let created_by = o.user(st, "created_by", e).unwrap_or(0);
    o.user(st, "updated_by", e);
    o.non_negative("created_at", false, e);
    o.non_negative("updated_at", false, e);
    o.non_negative("closed_at", false, e);
    o.int("loss_reason_id", false, e);
    o.str("request_id", false, e);
    if let Some(cfv) = o.arr("custom_fields_values", false, e) {
        // Leads have no custom fields in this account.
        for i in 0..cfv.len() {
            e.choice(&format!("{}.{i}.field_id", o.path("custom_fields_values")));
        }
    }
    check_tags(o, "tags_to_add", e);
    let mut contacts = Vec::new();
    let mut company = None;
    if let Some(emb) = o.obj("_embedded", false, e) {
        if embedded_links {
            emb.only(&["tags", "contacts", "companies"], e);
        } else {
            emb.only(&["tags"], e);
        }
        check_tags(&emb, "tags", e);
        for (key, is_company) in [("contacts", false), ("companies", true)] {
            if !embedded_links {
                continue;
            }
            let Some(list) = emb.arr(key, false, e) else {
                continue;
            };
            for (i, c) in list.iter().enumerate() {
                let Some(co) = Obj::of(c, &format!("{}.{i}", emb.path(key)), e) else {
                    continue;
                };
                co.only(&["id", "is_main"], e);
                co.bool("is_main", false, e);
                let Some(id) = co.int("id", true, e) else {
                    continue;
                };
                let exists = if is_company {
                    st.company(id).is_some()
                } else {
                    st.contact(id).is_some()
                };
                if !exists {
                    e.push("NotSupportedChoice", &co.path("id"), "Entity not found");
                } else if is_company {
                    company = Some(id);
                } else {
                    contacts.push(id);
                }
            }
        }
    }
    NewLead {
        name,
        price,
        responsible,
        status_id,
        created_by,
        contacts,
        company,
    }
}

fn create_lead(st: &mut State, l: NewLead, user: i64, status: i64) -> i64 {
    let lead = st.new_lead(l.name.as_deref(), l.responsible.unwrap_or(user), status);
    lead.price = l.price;
    lead.created_by = if l.created_by == 0 {
        user
    } else {
        l.created_by
    };
    lead.contacts = l.contacts;
    lead.company_id = l.company;
    if matches!(status, STATUS_WON | STATUS_LOST) {
        lead.closed_at = Some(unix_now());
    }
    lead.id
}

struct NewUnsorted {
    item: Value,
    from: String,
    lead: Option<NewLead>,
    contacts: Vec<NewParty>,
}

fn unsorted_route(st: &mut State, cx: &Ctx<'_>, rest: &[&str]) -> Result<Out, Out> {
    match (cx.method, rest) {
        ("POST", ["sip"]) => add_unsorted(st, cx),
        ("GET", []) => {
            let cats = cx.filter("category");
            if cats.iter().any(|c| *c != "sip" && *c != "forms") {
                return Err(validation(vec![json!({"request_id": "0", "errors": [
                    {"code": "NotSupportedChoice", "path": "filter.category",
                     "detail": "The value you selected is not a valid choice."}]})]));
            }
            let items: Vec<Value> = if !cats.is_empty() && !cats.contains(&"sip") {
                Vec::new()
            } else {
                st.unsorted
                    .iter()
                    .filter(|u| u.state == "pending")
                    .map(|u| render_unsorted(st, u))
                    .collect()
            };
            cx.page(st, "unsorted", items, Map::new())
        }
        ("POST", [uid, "accept"]) => {
            let (user, status) = match cx.body.is_empty() {
                true => (None, None),
                false => {
                    let b = cx.json()?;
                    let mut e = Errs::default();
                    let o = Obj::of(&b, "", &mut e);
                    let mut user = None;
                    let mut status = None;
                    if let Some(o) = o {
                        no_nulls(&b, "", false, &mut e);
                        o.only(&["user_id", "status_id"], &mut e);
                        user = o.user(st, "user_id", &mut e);
                        status = o.int("status_id", false, &mut e);
                        if status.is_some_and(|s| !LEAD_STATUSES.contains(&s)) {
                            e.choice("status_id");
                        }
                    }
                    if !e.0.is_empty() {
                        return Err(validation(vec![json!({"request_id": "0", "errors": e.0})]));
                    }
                    (user, status)
                }
            };
            let u = pending_unsorted(st, uid)?;
            let (lead_id, contacts) = (u.lead_id, u.contact_ids.clone());
            u.state = "accepted";
            if let Some(l) = st.leads.iter_mut().find(|l| l.id == lead_id) {
                l.status_id = status.unwrap_or(STATUS_NEW);
                if let Some(user) = user {
                    l.responsible_user_id = user;
                }
                l.updated_at = unix_now();
            }
            for c in st.contacts.iter_mut().filter(|c| contacts.contains(&c.id)) {
                c.unsorted = false;
            }
            Ok(Out::Json(200, unsorted_answer(uid, lead_id, &contacts)))
        }
        ("DELETE", [uid, "decline"]) => {
            let u = pending_unsorted(st, uid)?;
            let (lead_id, contacts) = (u.lead_id, u.contact_ids.clone());
            u.state = "declined";
            st.leads.retain(|l| l.id != lead_id);
            st.contacts.retain(|c| !contacts.contains(&c.id));
            Ok(Out::Json(200, unsorted_answer(uid, lead_id, &contacts)))
        }
        _ => Err(problem(405, "Method Not Allowed")),
    }
}

fn pending_unsorted<'a>(st: &'a mut State, uid: &str) -> Result<&'a mut Unsorted, Out> {
    match st.unsorted.iter_mut().find(|u| u.uid == uid) {
        None => Err(problem(404, "Unsorted not found")),
        Some(u) if u.state != "pending" => Err(problem(400, "Unsorted is already processed")),
        Some(u) => Ok(u),
    }
}

fn unsorted_answer(uid: &str, lead_id: i64, contacts: &[i64]) -> Value {
    let contacts: Vec<Value> = contacts.iter().map(|c| json!({"id": c})).collect();
    json!({"uid": uid, "type": "sip", "account_id": ACCOUNT_ID,
           "_embedded": {"leads": [{"id": lead_id}], "contacts": contacts}})
}

fn render_unsorted(st: &State, u: &Unsorted) -> Value {
    let contacts: Vec<Value> = u
        .contact_ids
        .iter()
        .filter_map(|c| st.contact(*c))
        .map(|c| st.render_party(c, "contacts", false))
        .collect();
    let leads: Vec<Value> = st
        .lead(u.lead_id)
        .map(|l| st.render_lead(l, false))
        .into_iter()
        .collect();
    json!({
        "uid": u.uid,
        "source_uid": u.item["source_uid"],
        "source_name": u.item["source_name"],
        "category": "sip",
        "pipeline_id": PIPELINE_ID,
        "created_at": u.created_at,
        "metadata": u.item["metadata"],
        "account_id": ACCOUNT_ID,
        "_links": st.href(&format!("/api/v4/leads/unsorted/{}", u.uid)),
        "_embedded": {"leads": leads, "contacts": contacts, "companies": []},
    })
}

fn add_unsorted(st: &mut State, cx: &Ctx<'_>) -> Result<Out, Out> {
    let items = cx.batch()?;
    let ok = validate_all(&items, false, |o, e| {
        o.only(UNSORTED_FIELDS, e);
        o.text("source_uid", true, e);
        o.text("source_name", true, e);
        if let Some(p) = o.int("pipeline_id", false, e) {
            if p != PIPELINE_ID {
                e.choice(&o.path("pipeline_id"));
            }
        }
        o.non_negative("created_at", false, e);
        o.str("request_id", false, e);
        let mut from = String::new();
        if let Some(m) = o.obj("metadata", true, e) {
            m.only(SIP_META_FIELDS, e);
            m.text("uniq", true, e);
            from = m.str_or_int("from", true, e).unwrap_or_default();
            m.str_or_int("phone", true, e);
            m.non_negative("called_at", true, e);
            m.non_negative("duration", true, e);
            m.str("link", false, e);
            m.text("service_code", true, e);
            m.bool("is_call_event_needed", true, e);
            if let Some(v) = m.raw("call_responsible", false, e) {
                if !(v.is_string() || v.is_i64()) {
                    e.ty(&m.path("call_responsible"), "int|string");
                }
            }
        }
        let mut lead = None;
        let mut contacts = Vec::new();
        if let Some(emb) = o.obj("_embedded", false, e) {
            emb.only(&["leads", "contacts", "companies"], e);
            if let Some(list) = emb.arr("leads", false, e) {
                if list.len() > 1 {
                    e.range(
                        &emb.path("leads"),
                        "This collection should contain 1 element or less.",
                    );
                }
                if let Some(l) = list.first() {
                    if let Some(lo) = Obj::of(l, &format!("{}.0", emb.path("leads")), e) {
                        lead = Some(check_lead(st, &lo, false, e));
                    }
                }
            }
            if let Some(list) = emb.arr("contacts", false, e) {
                for (i, c) in list.iter().enumerate() {
                    if let Some(co) = Obj::of(c, &format!("{}.{i}", emb.path("contacts")), e) {
                        contacts.push(check_contact(st, &co, e));
                    }
                }
            }
            if let Some(list) = emb.arr("companies", false, e) {
                if !list.is_empty() {
                    e.choice(&emb.path("companies"));
                }
            }
        }
        Some(NewUnsorted {
            item: Value::Object(o.m.clone()),
            from,
            lead,
            contacts,
        })
    })?;
    let user = cx.user;
    let mut answers = Vec::new();
    for (rid, u) in ok {
        let contact_ids: Vec<i64> = u
            .contacts
            .into_iter()
            .map(|p| create_contact(st, p, user, true))
            .collect();
        let lead = u.lead.unwrap_or(NewLead {
            name: None,
            price: 0,
            responsible: None,
            status_id: None,
            created_by: 0,
            contacts: Vec::new(),
            company: None,
        });
        let lead = NewLead {
            name: lead
                .name
                .or_else(|| Some(format!("Incoming call {}", u.from))),
            contacts: contact_ids.clone(),
            ..lead
        };
        let lead_id = create_lead(st, lead, user, STATUS_INCOMING);
        let uid = format!(
            "{:032x}{:08x}",
            rand::random::<u128>(),
            rand::random::<u32>()
        );
        st.unsorted.push(Unsorted {
            uid: uid.clone(),
            item: u.item,
            lead_id,
            contact_ids: contact_ids.clone(),
            state: "pending",
            created_at: unix_now(),
        });
        let contacts: Vec<Value> = contact_ids.iter().map(|c| json!({"id": c})).collect();
        answers.push(json!({
            "uid": uid,
            "account_id": ACCOUNT_ID,
            "request_id": rid,
            "_links": st.href(&format!("/api/v4/leads/unsorted/{uid}")),
            "_embedded": {"leads": [{"id": lead_id}], "contacts": contacts, "companies": []},
        }));
    }
    Ok(Out::Json(
        200,
        json!({"_total_items": answers.len(), "_embedded": {"unsorted": answers}}),
    ))
}

// ---- events ----------------------------------------------------------------------------------

fn add_events(st: &mut State, cx: &Ctx<'_>) -> Result<Out, Out> {
    let body = cx.json()?;
    let mut e = Errs::default();
    let mut accepted = Vec::new();
    match Obj::of(&body, "", &mut e) {
        None => {}
        Some(o) => {
            no_nulls(&body, "", false, &mut e);
            o.only(&["add"], &mut e);
            if let Some(list) = o.arr("add", true, &mut e) {
                if list.is_empty() {
                    e.blank("add");
                }
                for (i, item) in list.iter().enumerate() {
                    let Some(io) = Obj::of(item, &format!("add.{i}"), &mut e) else {
                        continue;
                    };
                    io.only(&["type", "phone_number", "users"], &mut e);
                    if let Some(t) = io.text("type", true, &mut e) {
                        if t != "phone_call" {
                            e.choice(&io.path("type"));
                        }
                    }
                    io.text("phone_number", true, &mut e);
                    if let Some(users) = io.raw("users", false, &mut e) {
                        let list: Vec<(String, &Value)> = match users {
                            Value::Array(a) => a
                                .iter()
                                .enumerate()
                                .map(|(j, v)| (format!("{}.{j}", io.path("users")), v))
                                .collect(),
                            v => vec![(io.path("users"), v)],
                        };
                        for (p, v) in list {
                            let id = match v {
                                Value::Number(n) => n.as_i64(),
                                Value::String(s) => s.parse().ok(),
                                _ => None,
                            };
                            match id {
                                None => e.ty(&p, "int"),
                                Some(id) if !st.users.contains_key(&id) => {
                                    e.push("NotSupportedChoice", &p, "User not found")
                                }
                                _ => {}
                            }
                        }
                    }
                    accepted.push(item.clone());
                }
            }
        }
    }
    if !e.0.is_empty() {
        return Err(validation(vec![json!({"request_id": "0", "errors": e.0})]));
    }
    st.events.extend(accepted);
    Ok(Out::Json(202, json!({})))
}

// ---- contacts and leads ----------------------------------------------------------------------

fn add_contacts(st: &mut State, cx: &Ctx<'_>) -> Result<Out, Out> {
    let items = cx.batch()?;
    let ok = validate_all(&items, false, |o, e| Some(check_contact(st, o, e)))?;
    let mut out = Vec::new();
    for (rid, p) in ok {
        let id = create_contact(st, p, cx.user, false);
        out.push(
            json!({"id": id, "is_deleted": false, "is_unsorted": false, "request_id": rid,
                         "_links": st.href(&format!("/api/v4/contacts/{id}"))}),
        );
    }
    Ok(Out::Json(
        200,
        json!({"_links": st.href("/api/v4/contacts"), "_embedded": {"contacts": out}}),
    ))
}

fn add_leads(st: &mut State, cx: &Ctx<'_>) -> Result<Out, Out> {
    let items = cx.batch()?;
    let ok = validate_all(&items, false, |o, e| Some(check_lead(st, o, true, e)))?;
    let mut out = Vec::new();
    for (rid, l) in ok {
        let status = l.status_id.unwrap_or(STATUS_NEW);
        let id = create_lead(st, l, cx.user, status);
        out.push(json!({"id": id, "request_id": rid,
                         "_links": st.href(&format!("/api/v4/leads/{id}"))}));
    }
    Ok(Out::Json(
        200,
        json!({"_links": st.href("/api/v4/leads"), "_embedded": {"leads": out}}),
    ))
}

/// The items of a PATCH: the array, or the one object of `PATCH /{entity}/{id}` (its id put in).
fn patch_items(cx: &Ctx<'_>, one: Option<i64>) -> Result<Vec<Value>, Out> {
    match one {
        None => cx.batch(),
        Some(id) => match cx.json()? {
            Value::Object(mut m) => {
                m.entry("id").or_insert(json!(id));
                Ok(vec![Value::Object(m)])
            }
            _ => Err(invalid_body(
                "InvalidType",
                "This value should be of type object.",
            )),
        },
    }
}

fn patch_answer(st: &State, kind: &str, one: bool, out: Vec<Value>) -> Out {
    if one {
        return Out::Json(200, out.into_iter().next().unwrap_or(json!({})));
    }
    Out::Json(
        200,
        json!({"_links": st.href(&format!("/api/v4/{kind}")), "_embedded": {kind: out}}),
    )
}

const CONTACT_PATCH_FIELDS: &[&str] = &[
    "id",
    "name",
    "first_name",
    "last_name",
    "responsible_user_id",
    "updated_by",
    "updated_at",
    "custom_fields_values",
    "tags_to_add",
    "tags_to_delete",
    "_embedded",
    "request_id",
];

fn patch_contacts(st: &mut State, cx: &Ctx<'_>, one: Option<i64>) -> Result<Out, Out> {
    let items = patch_items(cx, one)?;
    type Change = (i64, Map<String, Value>, Vec<(i64, Option<Value>)>);
    let ok = validate_all(&items, true, |o, e| -> Option<Change> {
        o.only(CONTACT_PATCH_FIELDS, e);
        let id = o.int("id", true, e)?;
        if st.contact(id).is_none() {
            e.push("NotSupportedChoice", "id", "Entity not found");
        }
        o.str("name", false, e);
        o.str("first_name", false, e);
        o.str("last_name", false, e);
        o.user(st, "responsible_user_id", e);
        o.user(st, "updated_by", e);
        o.non_negative("updated_at", false, e);
        o.str("request_id", false, e);
        check_tags(o, "tags_to_add", e);
        check_tags(o, "tags_to_delete", e);
        if let Some(emb) = o.obj("_embedded", false, e) {
            emb.only(&["tags"], e);
            check_tags(&emb, "tags", e);
        }
        let cfv = o
            .raw("custom_fields_values", false, e)
            .map(|v| check_cfv(v, &o.path("custom_fields_values"), true, e))
            .unwrap_or_default();
        Some((id, o.m.clone(), cfv))
    })?;
    let mut out = Vec::new();
    let url = st.url.clone();
    for (rid, (id, m, cfv)) in ok {
        let c = st.contacts.iter_mut().find(|c| c.id == id).unwrap();
        if let Some(s) = m.get("name").and_then(Value::as_str) {
            c.name = s.into();
        }
        if let Some(s) = m.get("first_name").and_then(Value::as_str) {
            c.first_name = s.into();
        }
        if let Some(s) = m.get("last_name").and_then(Value::as_str) {
            c.last_name = s.into();
        }
        if let Some(u) = m.get("responsible_user_id").and_then(Value::as_i64) {
            c.responsible_user_id = u;
        }
        c.updated_by = m
            .get("updated_by")
            .and_then(Value::as_i64)
            .unwrap_or(cx.user);
        c.updated_at = m
            .get("updated_at")
            .and_then(Value::as_i64)
            .unwrap_or_else(unix_now);
        apply_cfv(&mut c.cfv, cfv);
        out.push(
            json!({"id": id, "name": c.name, "updated_at": c.updated_at, "request_id": rid,
                         "_links": {"self": {"href": format!("{url}/api/v4/contacts/{id}")}}}),
        );
    }
    Ok(patch_answer(st, "contacts", one.is_some(), out))
}

const LEAD_PATCH_FIELDS: &[&str] = &[
    "id",
    "name",
    "price",
    "status_id",
    "pipeline_id",
    "responsible_user_id",
    "updated_by",
    "updated_at",
    "closed_at",
    "loss_reason_id",
    "custom_fields_values",
    "tags_to_add",
    "tags_to_delete",
    "_embedded",
    "request_id",
];

fn patch_leads(st: &mut State, cx: &Ctx<'_>, one: Option<i64>) -> Result<Out, Out> {
    let items = patch_items(cx, one)?;
    let ok = validate_all(&items, true, |o, e| {
        o.only(LEAD_PATCH_FIELDS, e);
        let id = o.int("id", true, e)?;
        if st.lead(id).is_none() {
            e.push("NotSupportedChoice", "id", "Entity not found");
        }
        o.str("name", false, e);
        o.non_negative("price", false, e);
        if let Some(s) = o.int("status_id", false, e) {
            if !LEAD_STATUSES.contains(&s) {
                e.choice(&o.path("status_id"));
            }
        }
        if let Some(p) = o.int("pipeline_id", false, e) {
            if p != PIPELINE_ID {
                e.choice(&o.path("pipeline_id"));
            }
        }
        o.user(st, "responsible_user_id", e);
        o.user(st, "updated_by", e);
        o.non_negative("updated_at", false, e);
        o.non_negative("closed_at", false, e);
        o.int("loss_reason_id", false, e);
        o.str("request_id", false, e);
        if let Some(cfv) = o.arr("custom_fields_values", false, e) {
            for i in 0..cfv.len() {
                e.choice(&format!("{}.{i}.field_id", o.path("custom_fields_values")));
            }
        }
        check_tags(o, "tags_to_add", e);
        check_tags(o, "tags_to_delete", e);
        if let Some(emb) = o.obj("_embedded", false, e) {
            emb.only(&["tags"], e);
            check_tags(&emb, "tags", e);
        }
        Some((id, o.m.clone()))
    })?;
    let mut out = Vec::new();
    let url = st.url.clone();
    for (rid, (id, m)) in ok {
        let l = st.leads.iter_mut().find(|l| l.id == id).unwrap();
        if let Some(s) = m.get("name").and_then(Value::as_str) {
            l.name = s.into();
        }
        if let Some(p) = m.get("price").and_then(Value::as_i64) {
            l.price = p;
        }
        if let Some(s) = m.get("status_id").and_then(Value::as_i64) {
            l.status_id = s;
            l.closed_at = matches!(s, STATUS_WON | STATUS_LOST).then(unix_now);
        }
        if let Some(u) = m.get("responsible_user_id").and_then(Value::as_i64) {
            l.responsible_user_id = u;
        }
        l.updated_by = m
            .get("updated_by")
            .and_then(Value::as_i64)
            .unwrap_or(cx.user);
        l.updated_at = m
            .get("updated_at")
            .and_then(Value::as_i64)
            .unwrap_or_else(unix_now);
        out.push(
            json!({"id": id, "updated_at": l.updated_at, "request_id": rid,
                         "_links": {"self": {"href": format!("{url}/api/v4/leads/{id}")}}}),
        );
    }
    Ok(patch_answer(st, "leads", one.is_some(), out))
}

// ---- tasks -----------------------------------------------------------------------------------

const TASK_FIELDS: &[&str] = &[
    "text",
    "complete_till",
    "task_type_id",
    "entity_id",
    "entity_type",
    "responsible_user_id",
    "is_completed",
    "duration",
    "result",
    "created_by",
    "updated_by",
    "created_at",
    "updated_at",
    "request_id",
];

fn check_task(st: &State, o: &Obj<'_>, patch: bool, e: &mut Errs) {
    o.text("text", !patch, e);
    o.non_negative("complete_till", !patch, e);
    if let Some(t) = o.int("task_type_id", false, e) {
        if t != 1 && t != 2 {
            e.choice(&o.path("task_type_id"));
        }
    }
    let etype = o.str("entity_type", false, e);
    let eid = o.int("entity_id", false, e);
    if let Some(t) = etype {
        if !matches!(t, "leads" | "contacts" | "companies" | "customers") {
            e.choice(&o.path("entity_type"));
        }
    }
    match (eid, etype, o.has("entity_id"), o.has("entity_type")) {
        (Some(id), Some(t), _, _)
            if matches!(t, "leads" | "contacts" | "companies" | "customers")
                && !st.entity_exists(t, id) =>
        {
            e.push(
                "NotSupportedChoice",
                &o.path("entity_id"),
                "Entity not found",
            );
        }
        (Some(_), Some(_), _, _) => {}
        (_, _, true, false) => e.missing(&o.path("entity_type")),
        (_, _, false, true) => e.missing(&o.path("entity_id")),
        _ => {}
    }
    o.user(st, "responsible_user_id", e);
    o.bool("is_completed", false, e);
    o.non_negative("duration", false, e);
    if let Some(r) = o.obj("result", false, e) {
        r.only(&["text"], e);
        r.str("text", true, e);
    }
    o.user(st, "created_by", e);
    o.user(st, "updated_by", e);
    o.non_negative("created_at", false, e);
    o.non_negative("updated_at", false, e);
    o.str("request_id", false, e);
}

fn add_tasks(st: &mut State, cx: &Ctx<'_>) -> Result<Out, Out> {
    let items = cx.batch()?;
    let ok = validate_all(&items, false, |o, e| {
        o.only(TASK_FIELDS, e);
        check_task(st, o, false, e);
        Some(o.m.clone())
    })?;
    let mut out = Vec::new();
    for (rid, m) in ok {
        let id = st.next_task;
        st.next_task += 1;
        let mut stored = Value::Object(m);
        stored["id"] = json!(id);
        st.tasks.push(stored);
        out.push(json!({"id": id, "request_id": rid,
                         "_links": st.href(&format!("/api/v4/tasks/{id}"))}));
    }
    Ok(Out::Json(
        200,
        json!({"_links": st.href("/api/v4/tasks"), "_embedded": {"tasks": out}}),
    ))
}

fn patch_tasks(st: &mut State, cx: &Ctx<'_>, one: Option<i64>) -> Result<Out, Out> {
    let items = patch_items(cx, one)?;
    let ok = validate_all(&items, false, |o, e| {
        let mut allowed = TASK_FIELDS.to_vec();
        allowed.push("id");
        o.only(&allowed, e);
        let id = o.int("id", true, e)?;
        if !st.tasks.iter().any(|t| t["id"] == id) {
            e.push("NotSupportedChoice", "id", "Entity not found");
        }
        check_task(st, o, true, e);
        Some((id, o.m.clone()))
    })?;
    let mut out = Vec::new();
    let url = st.url.clone();
    for (rid, (id, m)) in ok {
        let t = st.tasks.iter_mut().find(|t| t["id"] == id).unwrap();
        for (k, v) in m {
            if k != "request_id" {
                t[k.as_str()] = v;
            }
        }
        out.push(
            json!({"id": id, "updated_at": unix_now(), "request_id": rid,
                         "_links": {"self": {"href": format!("{url}/api/v4/tasks/{id}")}}}),
        );
    }
    Ok(patch_answer(st, "tasks", one.is_some(), out))
}

fn list_tasks(st: &State, cx: &Ctx<'_>) -> Result<Out, Out> {
    let etypes = cx.filter("entity_type");
    let eids: Vec<i64> = cx
        .filter("entity_id")
        .iter()
        .filter_map(|v| v.parse().ok())
        .collect();
    let done = cx.filter("is_completed");
    let kinds: Vec<i64> = cx
        .filter("task_type")
        .iter()
        .filter_map(|v| v.parse().ok())
        .collect();
    let users: Vec<i64> = cx
        .filter("responsible_user_id")
        .iter()
        .filter_map(|v| v.parse().ok())
        .collect();
    let items: Vec<Value> = st
        .tasks
        .iter()
        .filter(|t| etypes.is_empty() || etypes.iter().any(|x| t["entity_type"] == *x))
        .filter(|t| eids.is_empty() || eids.iter().any(|x| t["entity_id"] == *x))
        .filter(|t| {
            done.is_empty() || {
                let is = t["is_completed"].as_bool().unwrap_or(false);
                done.iter().any(|d| (*d == "1" || *d == "true") == is)
            }
        })
        .filter(|t| {
            kinds.is_empty()
                || kinds
                    .iter()
                    .any(|x| t["task_type_id"].as_i64().unwrap_or(1) == *x)
        })
        .filter(|t| {
            users.is_empty()
                || users
                    .iter()
                    .any(|x| t["responsible_user_id"].as_i64().unwrap_or(ANNA) == *x)
        })
        .cloned()
        .collect();
    cx.page(st, "tasks", items, Map::new())
}

// ---- notes -----------------------------------------------------------------------------------

const NOTE_FIELDS: &[&str] = &[
    "id",
    "entity_id",
    "note_type",
    "params",
    "responsible_user_id",
    "created_by",
    "updated_by",
    "created_at",
    "updated_at",
    "request_id",
    "is_need_to_trigger_digital_pipeline",
];
const NOTE_TYPES: &[&str] = &[
    "common",
    "call_in",
    "call_out",
    "service_message",
    "extended_service_message",
    "message_cashier",
    "geolocation",
    "sms_in",
    "sms_out",
    "attachment",
];
const CALL_NOTE_PARAMS: &[&str] = &[
    "uniq",
    "duration",
    "source",
    "link",
    "phone",
    "call_result",
    "call_status",
    "call_responsible",
];

fn check_note(
    st: &State,
    kind: &str,
    o: &Obj<'_>,
    path_id: Option<i64>,
    patch: bool,
    e: &mut Errs,
) {
    o.only(NOTE_FIELDS, e);
    let eid = o.int("entity_id", path_id.is_none() && !patch, e);
    if let Some(id) = eid.or(path_id) {
        if !st.entity_exists(kind, id) {
            e.push(
                "NotSupportedChoice",
                &o.path("entity_id"),
                "Entity not found",
            );
        }
    }
    let ntype = o.str("note_type", !patch, e);
    if let Some(t) = ntype {
        if !NOTE_TYPES.contains(&t) {
            e.choice(&o.path("note_type"));
        }
    }
    let ntype = ntype.or_else(|| {
        let id = o.m.get("id")?.as_i64()?;
        st.notes.iter().find(|n| n["id"] == id)?["note_type"].as_str()
    });
    match ntype {
        Some("call_in" | "call_out") => {
            if let Some(p) = o.obj("params", !patch, e) {
                p.only(CALL_NOTE_PARAMS, e);
                if patch {
                    // A PATCH may change some params only.
                    p.str("uniq", false, e);
                    p.non_negative("duration", false, e);
                    p.str("source", false, e);
                    p.str("link", false, e);
                    p.str("phone", false, e);
                    p.str("call_result", false, e);
                    if let Some(s) = p.int("call_status", false, e) {
                        if !(1..=7).contains(&s) {
                            e.choice(&p.path("call_status"));
                        }
                    }
                } else {
                    p.text("uniq", true, e);
                    check_call_params(st, &p, e);
                }
            }
        }
        Some("common") => {
            if let Some(p) = o.obj("params", !patch, e) {
                p.only(&["text"], e);
                p.text("text", !patch, e);
            }
        }
        _ => {
            o.obj("params", false, e);
        }
    }
    o.user(st, "responsible_user_id", e);
    o.user(st, "created_by", e);
    o.user(st, "updated_by", e);
    o.non_negative("created_at", false, e);
    o.non_negative("updated_at", false, e);
    o.bool("is_need_to_trigger_digital_pipeline", false, e);
    o.str("request_id", false, e);
}

fn add_notes(st: &mut State, cx: &Ctx<'_>, kind: &str, path_id: Option<i64>) -> Result<Out, Out> {
    let items = cx.batch()?;
    let ok = validate_all(&items, false, |o, e| {
        check_note(st, kind, o, path_id, false, e);
        Some(o.m.clone())
    })?;
    let mut out = Vec::new();
    for (rid, m) in ok {
        let id = st.next_note;
        st.next_note += 1;
        let mut stored = Value::Object(m);
        if let Some(pid) = path_id {
            stored["entity_id"] = json!(pid);
        }
        stored["id"] = json!(id);
        stored["entity_type"] = json!(kind);
        let eid = stored["entity_id"].clone();
        st.notes.push(stored);
        out.push(json!({"id": id, "entity_id": eid, "request_id": rid,
                         "_links": st.href(&format!("/api/v4/{kind}/{eid}/notes/{id}"))}));
    }
    Ok(Out::Json(
        200,
        json!({"_links": st.href(cx.path), "_embedded": {"notes": out}}),
    ))
}

fn patch_notes(st: &mut State, cx: &Ctx<'_>, kind: &str) -> Result<Out, Out> {
    let items = cx.batch()?;
    let ok = validate_all(&items, false, |o, e| {
        let id = o.int("id", true, e)?;
        if !st
            .notes
            .iter()
            .any(|n| n["id"] == id && n["entity_type"] == kind)
        {
            e.push("NotSupportedChoice", "id", "Entity not found");
        }
        check_note(st, kind, o, None, true, e);
        Some((id, o.m.clone()))
    })?;
    let mut out = Vec::new();
    for (rid, (id, m)) in ok {
        let n = st.notes.iter_mut().find(|n| n["id"] == id).unwrap();
        for (k, v) in m {
            match (k.as_str(), v) {
                ("request_id", _) => {}
                ("params", Value::Object(p)) => {
                    if !n["params"].is_object() {
                        n["params"] = json!({});
                    }
                    for (pk, pv) in p {
                        n["params"][pk.as_str()] = pv;
                    }
                }
                (k, v) => n[k] = v,
            }
        }
        out.push(
            json!({"id": id, "entity_id": n["entity_id"], "updated_at": unix_now(),
                         "request_id": rid}),
        );
    }
    Ok(Out::Json(200, json!({"_embedded": {"notes": out}})))
}

// ---- OAuth server ----------------------------------------------------------------------------

fn oauth(st: &mut State, method: &str, ct: Option<&str>, body: &[u8]) -> Out {
    if let Some(f) = take_fault(st, "/oauth2/access_token") {
        return f;
    }
    if method != "POST" {
        return problem(405, "Method Not Allowed");
    }
    let ct = ct.unwrap_or("").to_ascii_lowercase();
    let params: Map<String, Value> = if ct.starts_with("application/json") {
        match serde_json::from_slice(body) {
            Ok(Value::Object(m)) => m,
            _ => {
                return oauth_error(
                    400,
                    "invalid_request",
                    Some("The body must be a JSON object"),
                )
            }
        }
    } else if ct.starts_with("application/x-www-form-urlencoded") {
        serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, json!(v)))
            .collect()
    } else {
        return oauth_error(400, "invalid_request", Some("Unsupported content type"));
    };
    let p = |k: &str| params.get(k).and_then(Value::as_str).unwrap_or("");
    let grant = p("grant_type");
    if grant.is_empty() {
        return oauth_error(
            400,
            "invalid_request",
            Some("Check the `grant_type` parameter"),
        );
    }
    if !matches!(grant, "authorization_code" | "refresh_token") {
        return oauth_error(400, "unsupported_grant_type", None);
    }
    if p("client_id") != CLIENT_ID || p("client_secret") != CLIENT_SECRET {
        return oauth_error(401, "invalid_client", None);
    }
    if p("redirect_uri") != REDIRECT_URI {
        return oauth_error(401, "invalid_client", None);
    }
    let user = if grant == "authorization_code" {
        let code = p("code");
        if code.is_empty() {
            return oauth_error(400, "invalid_request", Some("Check the `code` parameter"));
        }
        match st.codes.get_mut(code) {
            None => {
                return oauth_error(
                    400,
                    "invalid_request",
                    Some("Cannot decrypt the authorization code"),
                )
            }
            Some(c) if c.used => {
                return oauth_error(
                    400,
                    "invalid_request",
                    Some("Authorization code has been revoked"),
                )
            }
            Some(c) if Instant::now() >= c.expires_at => {
                return oauth_error(
                    400,
                    "invalid_request",
                    Some("Authorization code has expired"),
                )
            }
            Some(c) => {
                c.used = true;
                c.user_id
            }
        }
    } else {
        let token = p("refresh_token");
        if token.is_empty() {
            return oauth_error(
                400,
                "invalid_request",
                Some("Check the `refresh_token` parameter"),
            );
        }
        let (user, old_access) = match st.refresh.get_mut(token) {
            None => {
                return oauth_error(
                    401,
                    "invalid_request",
                    Some("Cannot decrypt the refresh token"),
                )
            }
            Some(r) if r.used => {
                return oauth_error(401, "invalid_request", Some("Token has been revoked"))
            }
            Some(r) => {
                r.used = true;
                (r.user_id, r.access.clone())
            }
        };
        if let Some(a) = st.access.get_mut(&old_access) {
            a.revoked = true;
        }
        st.refreshes += 1;
        user
    };
    let (access, refresh, ttl) = st.issue_pair(user);
    Out::Json(
        200,
        json!({
            "token_type": "Bearer",
            "expires_in": ttl,
            "server_time": unix_now(),
            "access_token": access,
            "refresh_token": refresh,
        }),
    )
}
