//! The Kommo client against a small local stub of an account (Bearer tokens, problem+json
//! errors, scripted answers incl. nginx's HTML block page, single-use refresh tokens at
//! `/oauth2/access_token`), over real HTTP on loopback, with a real sled store for the
//! tokens; and `pbxgate kommo auth`.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Value};
use tokio::process::Command;

use pbxgate::base::secret::Secret;
use pbxgate::config::Config;
use pbxgate::crm::kommo::oauth::TOKENS_KEY;
use pbxgate::crm::kommo::{KommoClient, KommoError};
use pbxgate::crm::port::FailureKind;
use pbxgate::store::crm_state::CrmState;
use pbxgate::store::Store;

const LONG_LIVED: &str = "llt-eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.secret";
const CLIENT_ID: &str = "2b1f9c2e-0c3e-4c1e-9d7a-3f0f8a1b2c3d";
const CLIENT_SECRET: &str = "clientsecret9876543210";
const REDIRECT: &str = "https://pbx.example/kommo/oauth";

const NGINX_403: &str = "<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n\
                         <center><h1>403 Forbidden</h1></center>\r\n<hr><center>nginx</center>\r\n\
                         </body>\r\n</html>\r\n";

// ---------------------------------------------------------------------------------------------
// The stub

/// One request as the stub saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    bearer: Option<String>,
    body: Value,
    accept: Option<String>,
    user_agent: Option<String>,
    at: Instant,
}

/// A scripted answer: (path, status, content type, body).
type Scripted = (String, u16, &'static str, String);

#[derive(Default)]
struct State {
    seen: Vec<Seen>,
    script: VecDeque<Scripted>,
    /// Bearer tokens the API takes.
    valid: HashSet<String>,
    /// Refresh tokens that still work (once each), and the ones used up.
    refresh: HashSet<String>,
    used: HashSet<String>,
    codes: HashSet<String>,
    issued: u32,
    refreshes: u32,
    /// How long the token endpoint, and the API, take to answer.
    token_delay: Duration,
    api_delay: Duration,
}

struct Stub {
    url: String,
    state: Arc<Mutex<State>>,
    handle: ServerHandle,
}

impl Stub {
    async fn start() -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .default_service(web::to(dispatch))
        })
        .workers(2)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Stub { url, state, handle }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn script(&self, path: &str, status: u16, content_type: &'static str, body: &str) {
        self.lock()
            .script
            .push_back((path.to_string(), status, content_type, body.to_string()));
    }

    fn seen(&self, path: &str) -> Vec<Seen> {
        self.lock()
            .seen
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }

    fn api_requests(&self) -> usize {
        self.lock()
            .seen
            .iter()
            .filter(|s| s.path.starts_with("/api/"))
            .count()
    }

    fn refreshes(&self) -> u32 {
        self.lock().refreshes
    }

    async fn stop(&self) {
        self.handle.stop(false).await;
    }
}

fn answer(status: u16, content_type: &str, body: String) -> HttpResponse {
    HttpResponse::build(StatusCode::from_u16(status).unwrap())
        .content_type(content_type)
        .body(body)
}

fn problem(status: u16, title: &str, detail: &str, hint: Option<&str>) -> HttpResponse {
    let mut body = json!({"title": title, "type": "https://httpstatus.es/".to_string() + &status.to_string(),
                          "status": status, "detail": detail});
    if let Some(hint) = hint {
        body["hint"] = json!(hint);
        body["type"] = json!("https://developers.amocrm.ru/v3/errors/OAuthProblemJson");
    }
    answer(status, "application/problem+json", body.to_string())
}

async fn dispatch(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<Arc<Mutex<State>>>,
) -> HttpResponse {
    let path = req.path().to_string();
    let query: BTreeMap<String, String> =
        serde_urlencoded::from_str(req.query_string()).unwrap_or_default();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let bearer =
        header("authorization").and_then(|a| a.strip_prefix("Bearer ").map(str::to_string));
    let (token_delay, api_delay) = {
        let mut s = state.lock().unwrap();
        s.seen.push(Seen {
            method: req.method().to_string(),
            path: path.clone(),
            query,
            bearer: bearer.clone(),
            body: json.clone(),
            accept: header("accept"),
            user_agent: header("user-agent"),
            at: Instant::now(),
        });
        (s.token_delay, s.api_delay)
    };
    if path == "/oauth2/access_token" {
        tokio::time::sleep(token_delay).await;
        return token(&mut state.lock().unwrap(), &json);
    }
    tokio::time::sleep(api_delay).await;
    let mut s = state.lock().unwrap();
    if let Some(i) = s.script.iter().position(|(p, ..)| *p == path) {
        let (_, status, content_type, body) = s.script.remove(i).unwrap();
        return answer(status, content_type, body);
    }
    if !bearer.as_ref().is_some_and(|b| s.valid.contains(b)) {
        return problem(401, "Unauthorized", "Unauthorized", None);
    }
    match (req.method().as_str(), path.as_str()) {
        ("GET", "/api/v4/account") => answer(
            200,
            "application/hal+json",
            json!({"id": 31000001, "name": "Acme", "subdomain": "acme"}).to_string(),
        ),
        ("GET", "/api/v4/contacts") => HttpResponse::NoContent().finish(),
        ("POST", "/api/v2/events") => answer(202, "application/json", "{}".into()),
        ("POST", "/api/v4/calls") => {
            let calls: Vec<Value> = json
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    json!({"id": 100 + i, "entity_id": 7, "entity_type": "contact",
                                     "request_id": c["request_id"]})
                })
                .collect();
            answer(
                200,
                "application/hal+json",
                json!({"_embedded": {"calls": calls}}).to_string(),
            )
        }
        ("PATCH", "/api/v4/tasks") => answer(
            200,
            "application/hal+json",
            json!({"_embedded": {"tasks": json}}).to_string(),
        ),
        _ => problem(404, "Not Found", "Not found", None),
    }
}

/// The token endpoint: single-use authorization codes and refresh tokens.
fn token(s: &mut State, body: &Value) -> HttpResponse {
    let field = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or_default();
    if field("client_id") != CLIENT_ID
        || field("client_secret") != CLIENT_SECRET
        || field("redirect_uri") != REDIRECT
    {
        return problem(401, "Unauthorized", "Client authentication failed", None);
    }
    let ok = match field("grant_type") {
        "refresh_token" => {
            let r = field("refresh_token");
            if !s.refresh.remove(r) {
                let hint = if s.used.contains(r) {
                    "Token has been revoked"
                } else {
                    "Cannot decrypt the refresh token"
                };
                return problem(
                    401,
                    "Unauthorized",
                    "The refresh token is invalid.",
                    Some(hint),
                );
            }
            s.used.insert(r.to_string());
            s.refreshes += 1;
            true
        }
        "authorization_code" => s.codes.remove(field("code")),
        _ => false,
    };
    if !ok {
        return problem(
            400,
            "Bad Request",
            "The provided authorization grant is invalid, expired, revoked, does not match the \
             redirection URI used in the authorization request, or was issued to another client.",
            Some("Authorization code has been revoked"),
        );
    }
    s.issued += 1;
    let (access, refresh) = (format!("acc-{}", s.issued), format!("ref-{}", s.issued));
    s.valid.insert(access.clone());
    s.refresh.insert(refresh.clone());
    answer(
        200,
        "application/json",
        json!({"token_type": "Bearer", "expires_in": 86400, "server_time": jiff::Timestamp::now().as_second(),
               "access_token": access, "refresh_token": refresh})
        .to_string(),
    )
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn base_config(stub: &Stub) -> Config {
    let mut c = Config::default();
    c.crm.retry_base = Duration::from_millis(5);
    c.crm.retry_max = Duration::from_millis(50);
    c.crm.max_retries = 3;
    c.crm.timeout = Duration::from_secs(5);
    c.kommo.base_url = stub.url.clone();
    c
}

fn long_lived_client(stub: &Stub) -> KommoClient {
    crate::support::init_logs();
    let mut c = base_config(stub);
    c.kommo.long_lived_token = Secret::new(LONG_LIVED);
    stub.lock().valid.insert(LONG_LIVED.into());
    KommoClient::new(&c, None).unwrap()
}

fn oauth_config(stub: &Stub, dir: &tempfile::TempDir) -> Config {
    let mut c = base_config(stub);
    c.kommo.client_id = CLIENT_ID.into();
    c.kommo.client_secret = Secret::new(CLIENT_SECRET);
    c.kommo.redirect_uri = REDIRECT.into();
    c.storage.path = dir.path().join("store");
    c
}

/// An OAuth client whose stored access token expires in `expires_in` seconds by our clock, but
/// which the account no longer takes, with a refresh token that still works once.
fn oauth_setup(
    stub: &Stub,
    dir: &tempfile::TempDir,
    expires_in: i64,
) -> (KommoClient, CrmState, Store) {
    crate::support::init_logs();
    let config = oauth_config(stub, dir);
    let store = Store::open(&config.storage.path).unwrap();
    let state = store.crm_state().unwrap();
    let tokens = json!({"access_token": "acc-old", "refresh_token": "ref-0",
                        "expires_at": jiff::Timestamp::now().as_second() + expires_in});
    state
        .put(TOKENS_KEY, tokens.to_string().as_bytes())
        .unwrap();
    stub.lock().refresh.insert("ref-0".into());
    let client = KommoClient::new(&config, Some(state.clone())).unwrap();
    assert!(client.uses_oauth());
    (client, state, store)
}

fn stored(state: &CrmState) -> Value {
    serde_json::from_slice(&state.get(TOKENS_KEY).unwrap().expect("stored tokens")).unwrap()
}

/// Calls `get` until it is let through (not halted by the alarm), within `limit`.
async fn until_let_through(
    client: &KommoClient,
    limit: Duration,
) -> Result<Option<Value>, KommoError> {
    let started = Instant::now();
    loop {
        match client.get("/api/v4/account", &[]).await {
            Err(KommoError::Halted { .. }) if started.elapsed() < limit => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Long-lived token

#[tokio::test]
async fn a_long_lived_token_is_sent_as_bearer_and_never_refreshed() {
    let stub = Stub::start().await;
    let client = long_lived_client(&stub);
    assert!(client.is_configured() && !client.uses_oauth());
    assert_eq!(client.base(), stub.url);
    assert!(!format!("{client:?}").contains(LONG_LIVED));

    let account = client.get("/api/v4/account", &[]).await.unwrap().unwrap();
    assert_eq!(account["subdomain"], "acme");
    let seen = &stub.seen("/api/v4/account")[0];
    assert_eq!(seen.bearer.as_deref(), Some(LONG_LIVED));
    assert_eq!(seen.accept.as_deref(), Some("application/json"));
    assert!(seen.user_agent.as_deref().unwrap().starts_with("pbxgate/"));

    // 202 {} and a JSON array body.
    assert_eq!(
        client
            .post("/api/v2/events", &json!({"add": [{"type": "phone_call"}]}))
            .await
            .unwrap(),
        json!({})
    );
    let calls = client
        .post(
            "/api/v4/calls",
            &json!([{"direction": "inbound", "phone": "+15550001", "request_id": "c1"}]),
        )
        .await
        .unwrap();
    assert_eq!(calls["_embedded"]["calls"][0]["request_id"], "c1");
    assert_eq!(stub.seen("/api/v4/calls")[0].body[0]["phone"], "+15550001");
    let patched = client
        .patch("/api/v4/tasks", &json!([{"id": 5, "is_completed": true}]))
        .await
        .unwrap();
    assert_eq!(patched["_embedded"]["tasks"][0]["id"], 5);
    assert_eq!(stub.seen("/api/v4/tasks")[0].method, "PATCH");

    // Revoked: a typed error, not retried, never a refresh, never the token in a message.
    stub.lock().valid.clear();
    let e = client.get("/api/v4/account", &[]).await.unwrap_err();
    assert!(
        matches!(
            e,
            KommoError::Unauthorized {
                long_lived: true,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        stub.seen("/api/v4/account").len(),
        2,
        "a 401 is not retried"
    );
    assert!(stub.seen("/oauth2/access_token").is_empty());
    let rejected = client.requests().unwrap().rejected().expect("rejected");
    assert!(rejected.contains("kommo.long_lived_token"), "{rejected}");
    assert_eq!(e.failure().kind, FailureKind::Blocked);
    for text in [
        e.to_string(),
        e.failure().message,
        format!("{e:?}"),
        rejected,
    ] {
        assert!(!text.contains(LONG_LIVED), "{text}");
    }
    stub.lock().valid.insert(LONG_LIVED.into());
    client.get("/api/v4/account", &[]).await.unwrap();
    assert_eq!(
        client.requests().unwrap().rejected(),
        None,
        "cleared by a success"
    );

    let timings = client.requests().unwrap().snapshot();
    assert!(
        timings
            .iter()
            .any(|(p, s, h)| *p == "/api/v4/account" && *s == Some(200) && h.count == 2),
        "{timings:?}"
    );
    assert!(timings
        .iter()
        .any(|(p, s, _)| *p == "/api/v4/account" && *s == Some(401)));
    stub.stop().await;
}

#[tokio::test]
async fn an_empty_list_is_none_and_the_query_is_sent() {
    let stub = Stub::start().await;
    let client = long_lived_client(&stub);
    let found = client
        .get(
            "/api/v4/contacts",
            &[
                ("query", "+1 555 0001".to_string()),
                ("with", "leads".to_string()),
            ],
        )
        .await
        .unwrap();
    assert_eq!(found, None);
    let seen = &stub.seen("/api/v4/contacts")[0];
    assert_eq!(
        seen.query.get("query").map(String::as_str),
        Some("+1 555 0001")
    );
    assert_eq!(seen.query.get("with").map(String::as_str), Some("leads"));

    let e = client
        .get("/api/../oauth2/access_token", &[])
        .await
        .unwrap_err();
    assert!(matches!(e, KommoError::BadRequest { .. }), "{e:?}");
    let e = client.get("/api/v4/nothing", &[]).await.unwrap_err();
    assert!(matches!(e, KommoError::NotFound { .. }), "{e:?}");
    assert_eq!(
        stub.seen("/api/v4/nothing").len(),
        1,
        "a 404 is not retried"
    );
    stub.stop().await;
}

#[tokio::test]
async fn a_429_pauses_at_least_a_second_then_the_request_is_retried() {
    let stub = Stub::start().await;
    let client = long_lived_client(&stub);
    stub.script("/api/v4/account", 429, "text/plain", "Too Many Requests");
    let account = client.get("/api/v4/account", &[]).await.unwrap().unwrap();
    assert_eq!(account["id"], 31000001);
    let seen = stub.seen("/api/v4/account");
    assert_eq!(seen.len(), 2);
    let gap = seen[1].at - seen[0].at;
    // The backoff alone would be at most 5 ms.
    assert!(gap >= Duration::from_secs(1), "{gap:?}");
    assert!(gap < Duration::from_secs(3), "{gap:?}");

    // Server errors: a GET is retried, at most crm.max_retries times; a POST is not (it may
    // have been carried out, and Kommo does not deduplicate): the caller decides.
    for path in ["/api/v4/users", "/api/v4/calls"] {
        for _ in 0..5 {
            stub.script(
                path,
                503,
                "application/problem+json",
                r#"{"title":"Service Unavailable","status":503}"#,
            );
        }
    }
    let e = client.get("/api/v4/users", &[]).await.unwrap_err();
    assert_eq!(e.status(), Some(503), "{e:?}");
    assert_eq!(stub.seen("/api/v4/users").len(), 4);
    let e = client.post("/api/v4/calls", &json!([])).await.unwrap_err();
    assert_eq!(e.status(), Some(503), "{e:?}");
    assert!(e.is_retriable());
    assert_eq!(stub.seen("/api/v4/calls").len(), 1);
    stub.stop().await;
}

#[tokio::test]
async fn a_validation_error_is_not_retried_and_reads_well() {
    let stub = Stub::start().await;
    let client = long_lived_client(&stub);
    let body = json!({"validation-errors": [{"request_id": "0", "errors": [
            {"code": "NotNullable", "path": "params.link", "detail": "This value should not be null."}]}],
        "title": "Bad Request", "type": "https://httpstatus.es/400", "status": 400,
        "detail": "Request validation failed"});
    stub.script(
        "/api/v4/leads/notes",
        400,
        "application/problem+json",
        &body.to_string(),
    );
    let e = client
        .post(
            "/api/v4/leads/notes",
            &json!([{"entity_id": 1, "note_type": "call_in"}]),
        )
        .await
        .unwrap_err();
    assert_eq!(stub.seen("/api/v4/leads/notes").len(), 1);
    assert_eq!(
        e.to_string(),
        "Kommo refused the request as invalid (HTTP 400): Bad Request: Request validation \
         failed; [0] params.link: NotNullable (This value should not be null.)"
    );
    let issue = &e.validation_issues()[0];
    assert_eq!(
        (
            issue.request_id.as_str(),
            issue.path.as_str(),
            issue.code.as_str()
        ),
        ("0", "params.link", "NotNullable")
    );
    assert_eq!(e.failure().kind, FailureKind::Refused);
    assert_eq!(client.requests().unwrap().rejected(), None);
    assert_eq!(client.alarm(), None);
    stub.stop().await;
}

#[tokio::test]
async fn a_call_with_no_contact_is_entity_not_found() {
    let stub = Stub::start().await;
    let client = long_lived_client(&stub);
    stub.script(
        "/api/v4/calls",
        400,
        "application/problem+json",
        r#"{"_total_items":0,"errors":[{"title":"Entity not found","status":400}],"title":"Bad Request","status":400}"#,
    );
    let e = client
        .post(
            "/api/v4/calls",
            &json!([{"direction": "inbound", "phone": "+15550009"}]),
        )
        .await
        .unwrap_err();
    assert!(e.is_entity_not_found(), "{e:?}");
    assert_eq!(e.failure().kind, FailureKind::Refused);
    assert_eq!(stub.seen("/api/v4/calls").len(), 1);
    stub.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The alarm

#[tokio::test]
async fn an_html_403_stops_sending_until_one_probe_after_the_cooldown_gets_through() {
    let stub = Stub::start().await;
    let cooldown = Duration::from_millis(400);
    let client = long_lived_client(&stub).with_block_cooldown(cooldown);
    stub.script("/api/v4/account", 403, "text/html", NGINX_403);
    let blocked_at = Instant::now();
    let e = client.get("/api/v4/account", &[]).await.unwrap_err();
    assert!(matches!(e, KommoError::AccountBlocked { .. }), "{e:?}");
    assert!(e.to_string().contains("403 Forbidden"), "{e}");
    let alarm = client.alarm().expect("the alarm is raised");
    assert!(alarm.contains("Kommo support"), "{alarm}");
    let rejected = client.requests().unwrap().rejected().expect("rejected");
    assert!(rejected.contains("blocked"), "{rejected}");
    assert_eq!(stub.api_requests(), 1);

    // Fail fast, without a request, whatever the request.
    let other = client.clone();
    let started = Instant::now();
    for e in [
        other.get("/api/v4/account", &[]).await.unwrap_err(),
        other.post("/api/v4/calls", &json!([])).await.unwrap_err(),
        other.patch("/api/v4/tasks", &json!([])).await.unwrap_err(),
    ] {
        assert!(
            matches!(
                e,
                KommoError::Halted {
                    probe_in_secs: 1,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("blocked"), "{e}");
        assert_eq!(e.failure().kind, FailureKind::Blocked);
    }
    assert!(started.elapsed() < Duration::from_millis(200));
    assert_eq!(stub.api_requests(), 1, "nothing reached Kommo");

    // After the cooldown, one probe: it is blocked again, and the cooldown starts over.
    stub.script("/api/v4/account", 403, "text/html", NGINX_403);
    let e = until_let_through(&client, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(e, KommoError::AccountBlocked { .. }), "{e:?}");
    let seen = stub.seen("/api/v4/account");
    assert_eq!(seen.len(), 2, "one probe");
    assert!(
        seen[1].at - blocked_at >= cooldown,
        "{:?}",
        seen[1].at - blocked_at
    );
    assert!(client.alarm().is_some());

    // The next probe is slow; the requests meanwhile are not sent either.
    stub.lock().api_delay = Duration::from_millis(300);
    let reblocked = seen[1].at;
    while Instant::now() < reblocked + cooldown {
        assert!(matches!(
            client.get("/api/v4/account", &[]).await,
            Err(KommoError::Halted { .. })
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let probe = tokio::spawn({
        let c = client.clone();
        async move { until_let_through(&c, Duration::from_secs(5)).await }
    });
    // Wait until the probe is at the stub, then ask again.
    let wait = Instant::now();
    while stub.seen("/api/v4/account").len() < 3 {
        assert!(wait.elapsed() < Duration::from_secs(5), "no probe");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let e = client.get("/api/v4/account", &[]).await.unwrap_err();
    assert!(
        matches!(
            e,
            KommoError::Halted {
                probe_in_secs: 0,
                ..
            }
        ),
        "{e:?}"
    );
    let account = probe.await.unwrap().unwrap().unwrap();
    assert_eq!(account["subdomain"], "acme");
    assert_eq!(stub.seen("/api/v4/account").len(), 3);
    assert_eq!(client.alarm(), None, "cleared by the probe's success");
    assert_eq!(client.requests().unwrap().rejected(), None);
    stub.lock().api_delay = Duration::ZERO;
    client.get("/api/v4/account", &[]).await.unwrap();
    stub.stop().await;
}

#[tokio::test]
async fn an_unpaid_account_raises_the_alarm_too() {
    let stub = Stub::start().await;
    let client = long_lived_client(&stub).with_block_cooldown(Duration::from_millis(300));
    stub.script(
        "/api/v4/calls",
        402,
        "application/problem+json",
        r#"{"title":"Payment Required","status":402,"detail":"Account is not paid"}"#,
    );
    let e = client.post("/api/v4/calls", &json!([])).await.unwrap_err();
    assert!(matches!(e, KommoError::PaymentRequired { .. }), "{e:?}");
    assert!(e.to_string().contains("Account is not paid"), "{e}");
    assert!(client.alarm().unwrap().contains("unpaid"));
    assert!(client
        .requests()
        .unwrap()
        .rejected()
        .unwrap()
        .contains("402"));
    let e = client.get("/api/v4/contacts", &[]).await.unwrap_err();
    assert!(matches!(e, KommoError::Halted { .. }), "{e:?}");
    assert_eq!(stub.api_requests(), 1);

    let account = until_let_through(&client, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(account["id"], 31000001);
    assert_eq!(stub.api_requests(), 2, "one probe");
    assert_eq!(client.alarm(), None);
    assert_eq!(client.requests().unwrap().rejected(), None);
    stub.stop().await;
}

#[tokio::test]
async fn a_403_with_problem_json_is_a_missing_right_not_a_block() {
    let stub = Stub::start().await;
    let client = long_lived_client(&stub);
    stub.script(
        "/api/v4/users",
        403,
        "application/problem+json",
        r#"{"title":"Forbidden","status":403,"detail":"Access denied"}"#,
    );
    let e = client.get("/api/v4/users", &[]).await.unwrap_err();
    assert!(matches!(e, KommoError::Forbidden { .. }), "{e:?}");
    assert!(e.operator_hint().unwrap().contains("administrator"));
    assert_eq!(client.alarm(), None);
    client.get("/api/v4/account", &[]).await.unwrap();
    stub.stop().await;
}

#[tokio::test]
async fn requests_stay_below_the_account_limit() {
    let stub = Stub::start().await;
    let client = long_lived_client(&stub);
    let gets = (0..14).map(|_| client.get("/api/v4/account", &[]));
    for r in futures_util::future::join_all(gets).await {
        r.unwrap();
    }
    let times: Vec<Instant> = stub.seen("/api/v4/account").iter().map(|s| s.at).collect();
    assert_eq!(times.len(), 14);
    // Kommo's limit is 7 per second: no second of arrivals holds more (7 per 1.05 s go out).
    let most = times
        .iter()
        .map(|t| {
            times
                .iter()
                .filter(|u| **u >= *t && u.duration_since(*t) < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    assert!(most <= 7, "{most} requests within a second");
    stub.stop().await;
}

// ---------------------------------------------------------------------------------------------
// OAuth

#[tokio::test]
async fn concurrent_requests_with_a_refused_token_refresh_once() {
    let stub = Stub::start().await;
    stub.lock().token_delay = Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    let (client, state, _store) = oauth_setup(&stub, &dir, 3600);
    let other = client.clone();
    let call = json!([{"request_id": "x"}]);
    let (a, b, c) = tokio::join!(
        client.get("/api/v4/account", &[]),
        client.post("/api/v4/calls", &call),
        other.get("/api/v4/contacts", &[]),
    );
    assert_eq!(a.unwrap().unwrap()["subdomain"], "acme");
    assert_eq!(b.unwrap()["_embedded"]["calls"][0]["request_id"], "x");
    assert_eq!(c.unwrap(), None);
    assert_eq!(
        stub.refreshes(),
        1,
        "the refresh token works once: one refresh"
    );
    assert_eq!(stub.seen("/oauth2/access_token").len(), 1);

    let tokens = stored(&state);
    assert_eq!(tokens["access_token"], "acc-1");
    assert_eq!(tokens["refresh_token"], "ref-1");
    let left = tokens["expires_at"].as_i64().unwrap() - jiff::Timestamp::now().as_second();
    assert!((86_300..=86_400).contains(&left), "{left}");

    let refresh = &stub.seen("/oauth2/access_token")[0].body;
    assert_eq!(
        refresh,
        &json!({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "grant_type": "refresh_token",
                "refresh_token": "ref-0", "redirect_uri": REDIRECT})
    );
    // The API saw the old token, then the new one; never the secret or a refresh token.
    for s in stub
        .lock()
        .seen
        .iter()
        .filter(|s| s.path.starts_with("/api/"))
    {
        assert!(
            matches!(s.bearer.as_deref(), Some("acc-old" | "acc-1")),
            "{:?}",
            s.bearer
        );
        let body = s.body.to_string();
        assert!(
            !body.contains(CLIENT_SECRET) && !body.contains("ref-"),
            "{body}"
        );
    }
    client.get("/api/v4/account", &[]).await.unwrap();
    assert_eq!(
        stub.seen("/api/v4/account")
            .last()
            .unwrap()
            .bearer
            .as_deref(),
        Some("acc-1")
    );

    // The old refresh token is dead for good.
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/oauth2/access_token", stub.url))
        .json(
            &json!({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                      "grant_type": "refresh_token", "refresh_token": "ref-0",
                      "redirect_uri": REDIRECT}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["hint"],
        "Token has been revoked"
    );
    assert_eq!(stub.refreshes(), 1);
    stub.stop().await;
}

#[tokio::test]
async fn a_token_about_to_expire_is_refreshed_before_it_is_sent() {
    let stub = Stub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (client, state, _store) = oauth_setup(&stub, &dir, 60);
    let (a, b) = tokio::join!(
        client.get("/api/v4/account", &[]),
        client.get("/api/v4/account", &[])
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(stub.refreshes(), 1);
    let sent: Vec<Option<String>> = stub
        .seen("/api/v4/account")
        .into_iter()
        .map(|s| s.bearer)
        .collect();
    assert_eq!(sent, vec![Some("acc-1".to_string()); 2]);
    assert_eq!(stored(&state)["refresh_token"], "ref-1");
    stub.stop().await;
}

#[tokio::test]
async fn a_used_refresh_token_says_to_run_kommo_auth() {
    let stub = Stub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (client, state, _store) = oauth_setup(&stub, &dir, 3600);
    {
        let mut s = stub.lock();
        s.refresh.clear();
        s.used.insert("ref-0".into());
    }
    let e = client.get("/api/v4/account", &[]).await.unwrap_err();
    assert!(
        matches!(e, KommoError::GrantRevoked { status: 401, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("Token has been revoked"), "{e}");
    assert!(e.to_string().contains("pbxgate kommo auth --code"), "{e}");
    let rejected = client.requests().unwrap().rejected().expect("rejected");
    assert!(rejected.contains("pbxgate kommo auth"), "{rejected}");
    for text in [e.to_string(), format!("{e:?}"), rejected] {
        assert!(
            !text.contains(CLIENT_SECRET) && !text.contains("ref-0"),
            "{text}"
        );
    }
    assert_eq!(stored(&state)["refresh_token"], "ref-0", "nothing to store");
    assert_eq!(stub.seen("/api/v4/account").len(), 1, "not sent again");
    assert_eq!(client.alarm(), None);
    stub.stop().await;
}

#[tokio::test]
async fn oauth_without_tokens_asks_for_a_code() {
    let stub = Stub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = oauth_config(&stub, &dir);
    let store = Store::open(&config.storage.path).unwrap();
    let client = KommoClient::new(&config, Some(store.crm_state().unwrap())).unwrap();
    let e = client.get("/api/v4/account", &[]).await.unwrap_err();
    assert_eq!(e, KommoError::NotAuthorized);
    assert!(stub.lock().seen.is_empty());

    let unconfigured = KommoClient::new(&base_config(&stub), None).unwrap();
    assert!(!unconfigured.is_configured());
    assert!(unconfigured.requests().is_none());
    assert_eq!(
        unconfigured.get("/api/v4/account", &[]).await.unwrap_err(),
        KommoError::NotConfigured
    );
    stub.stop().await;
}

// ---------------------------------------------------------------------------------------------
// `pbxgate kommo auth`

async fn pbxgate(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pbxgate"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .await
        .expect("run pbxgate")
}

#[tokio::test]
async fn the_auth_command_exchanges_a_code_and_stores_the_tokens() {
    let stub = Stub::start().await;
    stub.lock().codes.insert("def502-code".into());
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[crm]\nkind = \"kommo\"\ntimeout = \"5s\"\n\
             [kommo]\nbase_url = \"{url}\"\nclient_id = \"{CLIENT_ID}\"\n\
             client_secret = \"{CLIENT_SECRET}\"\nredirect_uri = \"{REDIRECT}\"\n\
             [storage]\npath = \"{}\"\n",
            store_path.display(),
            url = stub.url
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    let out = pbxgate(dir.path(), &["--config", config, "kommo", "auth"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Keys and scopes"), "{stdout}");
    assert!(
        stdout.contains(REDIRECT) && stdout.contains("--code"),
        "{stdout}"
    );

    // While the service holds the store.
    {
        let held = Store::open(&store_path).unwrap();
        let out = pbxgate(
            dir.path(),
            &["--config", config, "kommo", "auth", "--code", "def502-code"],
        )
        .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("stop the service first"), "{stderr}");
        drop(held);
    }
    assert!(
        stub.seen("/oauth2/access_token").is_empty(),
        "nothing sent while the store is held"
    );

    let redirect = format!("{REDIRECT}?code=def502-code&state=x&referer=127.0.0.1");
    let out = pbxgate(
        dir.path(),
        &["--config", config, "kommo", "auth", "--code", &redirect],
    )
    .await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("valid until"), "{stdout}");
    for text in [&stdout, &stderr] {
        assert!(
            !text.contains("acc-1") && !text.contains("ref-1") && !text.contains(CLIENT_SECRET),
            "{text}"
        );
    }
    let grant = &stub.seen("/oauth2/access_token")[0].body;
    assert_eq!(
        grant,
        &json!({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                "grant_type": "authorization_code", "code": "def502-code", "redirect_uri": REDIRECT})
    );

    // A code works once.
    let out = pbxgate(
        dir.path(),
        &["--config", config, "kommo", "auth", "--code", "def502-code"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("works once"), "{stderr}");

    // A code of another account.
    let out = pbxgate(
        dir.path(),
        &[
            "--config",
            config,
            "kommo",
            "auth",
            "--code",
            &format!("{REDIRECT}?code=other&referer=other.kommo.com"),
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("kommo.base_url"), "{stderr}");

    let store = Store::open(&store_path).unwrap();
    let tokens = stored(&store.crm_state().unwrap());
    assert_eq!(tokens["access_token"], "acc-1");
    assert_eq!(tokens["refresh_token"], "ref-1");
    assert!(tokens["expires_at"].as_i64().unwrap() > jiff::Timestamp::now().as_second());
    stub.stop().await;
}
