//! The Bitrix24 client against a small local stub of a portal and its OAuth server (webhook
//! and OAuth routes, the JSON envelope, scripted errors, one-shot refresh tokens), over real
//! HTTP on loopback, with a real sled store for the tokens; and `pbxgate bitrix24 auth`.

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
use pbxgate::crm::bitrix24::client::php_query;
use pbxgate::crm::bitrix24::error::AuthRefusal;
use pbxgate::crm::bitrix24::oauth::TOKENS_KEY;
use pbxgate::crm::bitrix24::{B24Client, B24Error};
use pbxgate::store::crm_state::CrmState;
use pbxgate::store::Store;

const SECRET: &str = "whsecret0123456789";
const CLIENT_ID: &str = "local.test.1";
const CLIENT_SECRET: &str = "appsecret9876543210";
const MEMBER: &str = "member0123";

// ---------------------------------------------------------------------------------------------
// The stub

/// One request as the stub saw it.
#[derive(Debug, Clone)]
struct Seen {
    /// The REST method, or `oauth/token`.
    method: String,
    body: Value,
    query: BTreeMap<String, String>,
    accept: Option<String>,
    user_agent: Option<String>,
    at: Instant,
}

#[derive(Default)]
struct State {
    url: String,
    seen: Vec<Seen>,
    /// The next answers to a method: (method, status, body).
    script: VecDeque<(String, u16, Value)>,
    valid: HashSet<String>,
    expired: HashSet<String>,
    /// Refresh tokens that still work (once each).
    refresh: HashSet<String>,
    codes: HashSet<String>,
    issued: u32,
    refreshes: u32,
    /// How long the OAuth server takes to answer.
    token_delay: Duration,
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
        let state = Arc::new(Mutex::new(State {
            url: url.clone(),
            ..State::default()
        }));
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

    fn script(&self, method: &str, status: u16, body: Value) {
        self.lock()
            .script
            .push_back((method.to_string(), status, body));
    }

    fn seen(&self, method: &str) -> Vec<Seen> {
        self.lock()
            .seen
            .iter()
            .filter(|s| s.method == method)
            .cloned()
            .collect()
    }

    fn refreshes(&self) -> u32 {
        self.lock().refreshes
    }

    fn webhook(&self) -> String {
        format!("{}/rest/1/{SECRET}/", self.url)
    }

    async fn stop(&self) {
        self.handle.stop(false).await;
    }
}

fn answer(status: u16, body: Value) -> HttpResponse {
    HttpResponse::build(StatusCode::from_u16(status).unwrap())
        .content_type("application/json")
        .body(body.to_string())
}

fn envelope(result: Value) -> Value {
    json!({"result": result, "time": {"start": 1.0, "finish": 1.01, "duration": 0.01,
           "operating": 0, "operating_reset_at": 1_800_000_000}})
}

fn error(code: &str, description: &str) -> Value {
    json!({"error": code, "error_description": description})
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
    let (method, oauth) = if path == "/oauth/token/" {
        ("oauth/token".to_string(), None)
    } else if let Some(rest) = path.strip_prefix("/rest/1/") {
        let (secret, method) = rest.split_once('/').unwrap_or((rest, ""));
        (method.to_string(), Some(secret == SECRET))
    } else if let Some(method) = path.strip_prefix("/rest/") {
        (method.to_string(), None)
    } else {
        return answer(404, error("NOT_FOUND", "no such path"));
    };
    let delay = {
        let mut s = state.lock().unwrap();
        s.seen.push(Seen {
            method: method.clone(),
            body: json.clone(),
            query: query.clone(),
            accept: header("accept"),
            user_agent: header("user-agent"),
            at: Instant::now(),
        });
        s.token_delay
    };
    if method == "oauth/token" {
        tokio::time::sleep(delay).await;
        return token(&mut state.lock().unwrap(), &query);
    }
    let mut s = state.lock().unwrap();
    match oauth {
        Some(false) => return answer(401, error("NO_AUTH_FOUND", "Wrong authorization data")),
        Some(true) => {}
        None => {
            let auth = json.get("auth").and_then(Value::as_str).unwrap_or_default();
            if s.expired.contains(auth) {
                return answer(
                    401,
                    error("expired_token", "The access token provided has expired."),
                );
            }
            if !s.valid.contains(auth) {
                return answer(
                    401,
                    error("invalid_token", "The access token provided is invalid."),
                );
            }
        }
    }
    if let Some(i) = s
        .script
        .iter()
        .position(|(m, _, _)| m.eq_ignore_ascii_case(&method))
    {
        let (_, status, body) = s.script.remove(i).unwrap();
        return answer(status, body);
    }
    match method.to_ascii_lowercase().as_str() {
        "profile" => answer(200, envelope(json!({"ID": 1, "ADMIN": true}))),
        "echo" => {
            let mut params = json;
            if let Some(map) = params.as_object_mut() {
                map.remove("auth");
            }
            answer(200, envelope(params))
        }
        "user.get" => {
            let mut v = envelope(json!([{"ID": "1", "UF_PHONE_INNER": "101"}]));
            v["total"] = json!(120);
            v["next"] = json!(50);
            answer(200, v)
        }
        "batch" => {
            let mut results = serde_json::Map::new();
            let mut errors = serde_json::Map::new();
            // A list of commands, as the client sends them: answered by position (PHP keeps
            // the positions as the keys of sparse arrays).
            let list = json["cmd"].as_array().cloned().unwrap_or_default();
            for (key, cmd) in list
                .into_iter()
                .enumerate()
                .map(|(i, c)| (i.to_string(), c))
            {
                let cmd = cmd.as_str().unwrap_or_default().to_string();
                let (m, q) = cmd.split_once('?').unwrap_or((&cmd, ""));
                if m == "fail" {
                    errors.insert(
                        key,
                        error(
                            "",
                            "Call is not found (call should be registered prior to finishing",
                        ),
                    );
                } else {
                    results.insert(key, json!({"method": m, "query": q}));
                }
            }
            let errors = if errors.is_empty() {
                json!([])
            } else {
                Value::Object(errors)
            };
            answer(
                200,
                envelope(json!({"result": results, "result_error": errors,
                                "result_total": [], "result_next": [], "result_time": {}})),
            )
        }
        _ => answer(404, error("ERROR_METHOD_NOT_FOUND", "Method not found!")),
    }
}

/// The OAuth server: one-shot refresh tokens and authorisation codes.
fn token(s: &mut State, q: &BTreeMap<String, String>) -> HttpResponse {
    if q.get("client_id").map(String::as_str) != Some(CLIENT_ID)
        || q.get("client_secret").map(String::as_str) != Some(CLIENT_SECRET)
    {
        return answer(401, error("invalid_client", "Invalid client"));
    }
    let ok = match q.get("grant_type").map(String::as_str) {
        Some("refresh_token") => {
            let ok = q.get("refresh_token").is_some_and(|r| s.refresh.remove(r));
            if ok {
                s.refreshes += 1;
            }
            ok
        }
        Some("authorization_code") => q.get("code").is_some_and(|c| s.codes.remove(c)),
        _ => false,
    };
    if !ok {
        return answer(400, error("invalid_grant", "Invalid grant"));
    }
    s.issued += 1;
    let (access, refresh) = (format!("acc-{}", s.issued), format!("ref-{}", s.issued));
    s.valid.insert(access.clone());
    s.refresh.insert(refresh.clone());
    let now = jiff::Timestamp::now().as_second();
    answer(
        200,
        json!({
            "access_token": access, "refresh_token": refresh, "expires": now + 3600,
            "expires_in": 3600, "scope": "telephony,crm,user", "domain": "oauth.stub",
            "server_endpoint": format!("{}/rest/", s.url), "client_endpoint": format!("{}/rest/", s.url),
            "member_id": MEMBER, "status": "L", "user_id": 7
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn base_config() -> Config {
    let mut c = Config::default();
    c.crm.retry_base = Duration::from_millis(5);
    c.crm.retry_max = Duration::from_millis(50);
    c.crm.max_retries = 3;
    c.crm.timeout = Duration::from_secs(5);
    c.bitrix24.rps = 50;
    c.bitrix24.burst = 100;
    c
}

fn webhook_client(stub: &Stub) -> B24Client {
    crate::support::init_logs();
    let mut c = base_config();
    c.bitrix24.webhook_url = Secret::new(stub.webhook());
    B24Client::new(&c, None).unwrap()
}

fn oauth_config(stub: &Stub, dir: &tempfile::TempDir) -> Config {
    let mut c = base_config();
    c.bitrix24.portal = stub.url.clone();
    c.bitrix24.client_id = CLIENT_ID.into();
    c.bitrix24.client_secret = Secret::new(CLIENT_SECRET);
    c.bitrix24.oauth_server = stub.url.clone();
    c.storage.path = dir.path().join("store");
    c
}

/// An OAuth client whose stored access token the portal already takes for expired
/// (`expires_in` seconds left by our clock), with a refresh token that still works once.
fn oauth_setup(
    stub: &Stub,
    dir: &tempfile::TempDir,
    expires_in: i64,
) -> (B24Client, CrmState, Store) {
    crate::support::init_logs();
    let config = oauth_config(stub, dir);
    let store = Store::open(&config.storage.path).unwrap();
    let state = store.crm_state().unwrap();
    let tokens = json!({
        "v": 1, "access_token": "acc-old", "refresh_token": "ref-0",
        "expires": jiff::Timestamp::now().as_second() + expires_in,
        "client_endpoint": format!("{}/rest/", stub.url),
        "server_endpoint": format!("{}/rest/", stub.url), "member_id": MEMBER, "user_id": 7
    });
    state
        .put(TOKENS_KEY, tokens.to_string().as_bytes())
        .unwrap();
    {
        let mut s = stub.lock();
        s.expired.insert("acc-old".into());
        s.refresh.insert("ref-0".into());
    }
    let client = B24Client::new(&config, Some(state.clone())).unwrap();
    (client, state, store)
}

fn stored(state: &CrmState) -> Value {
    serde_json::from_slice(&state.get(TOKENS_KEY).unwrap().expect("stored tokens")).unwrap()
}

/// The highest level the portal's leaky bucket (`burst`, draining `rps`) reaches with
/// requests arriving at `times`.
fn portal_level(times: &[Instant], rps: f64) -> f64 {
    let (mut level, mut max) = (0.0f64, 0.0f64);
    let mut last = times[0];
    for t in times {
        level = (level - t.duration_since(last).as_secs_f64() * rps).max(0.0) + 1.0;
        last = *t;
        max = max.max(level);
    }
    max
}

// ---------------------------------------------------------------------------------------------
// Webhook

#[tokio::test]
async fn a_webhook_call_posts_json_and_returns_the_result() {
    let stub = Stub::start().await;
    let client = webhook_client(&stub);
    assert!(client.is_configured());
    assert_eq!(client.portal(), stub.url);
    assert!(!format!("{client:?}").contains(SECRET));

    let result = client
        .call(
            "echo",
            json!({"A": 1, "B": {"C": [true]}, "auth": "not-yours"}),
        )
        .await
        .unwrap();
    assert_eq!(result, json!({"A": 1, "B": {"C": [true]}}));
    let seen = &stub.seen("echo")[0];
    assert_eq!(seen.accept.as_deref(), Some("application/json"));
    assert!(seen.user_agent.as_deref().unwrap().starts_with("pbxgate/"));

    let page = client
        .call_page("user.get", json!({"start": 0}))
        .await
        .unwrap();
    assert_eq!((page.total, page.next), (Some(120), Some(50)));
    assert_eq!(page.result[0]["UF_PHONE_INNER"], "101");

    let timings = client.requests().unwrap().snapshot();
    assert!(
        timings
            .iter()
            .any(|(m, s, h)| *m == "user.get" && *s == Some(200) && h.count == 1),
        "{timings:?}"
    );
    assert!(
        timings.iter().any(|(m, _, _)| *m == "other"),
        "echo is not a known method"
    );
    stub.stop().await;
}

#[tokio::test]
async fn no_error_string_carries_the_webhook_secret() {
    let stub = Stub::start().await;
    let mut c = base_config();
    let wrong = "wrongsecret5550123";
    c.bitrix24.webhook_url = Secret::new(format!("{}/rest/1/{wrong}/", stub.url));
    let client = B24Client::new(&c, None).unwrap();
    let e = client.call("profile", json!({})).await.unwrap_err();
    assert_eq!(e.refusal(), Some(AuthRefusal::NoAuthFound));
    assert!(
        e.to_string()
            .starts_with("Bitrix24 refused the webhook (NO_AUTH_FOUND)"),
        "{e}"
    );
    assert_eq!(stub.seen("profile").len(), 1, "a refusal is not retried");
    let rejected = client
        .requests()
        .unwrap()
        .rejected()
        .expect("marked rejected");
    for text in [
        e.to_string(),
        e.failure().message,
        format!("{e:?}"),
        rejected,
    ] {
        assert!(!text.contains(wrong), "{text}");
    }

    // No answer at all: reqwest's message would name the URL.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    c.bitrix24.webhook_url = Secret::new(format!("http://127.0.0.1:{port}/rest/1/{SECRET}/"));
    c.crm.max_retries = 1;
    let client = B24Client::new(&c, None).unwrap();
    let e = client.call("profile", json!({})).await.unwrap_err();
    assert!(matches!(e, B24Error::Transport { .. }), "{e:?}");
    for text in [e.to_string(), e.failure().message, format!("{e:?}")] {
        assert!(!text.contains(SECRET), "{text}");
    }
    stub.stop().await;
}

#[tokio::test]
async fn a_full_portal_bucket_is_retried_and_a_validation_error_is_not() {
    let stub = Stub::start().await;
    let client = webhook_client(&stub);
    stub.script(
        "profile",
        503,
        error("QUERY_LIMIT_EXCEEDED", "Too many requests"),
    );
    let result = client.call("profile", json!({})).await.unwrap();
    assert_eq!(result["ID"], 1);
    assert_eq!(stub.seen("profile").len(), 2);

    stub.script(
        "telephony.externalcall.finish",
        400,
        error(
            "",
            "Call is not found (call should be registered prior to finishing",
        ),
    );
    let e = client
        .call(
            "telephony.externalcall.finish",
            json!({"CALL_ID": "x", "USER_ID": 1}),
        )
        .await
        .unwrap_err();
    assert!(e.is_call_not_found(), "{e:?}");
    assert_eq!(e.code(), Some(""));
    assert_eq!(e.status(), Some(400));
    assert_eq!(stub.seen("telephony.externalcall.finish").len(), 1);

    // An error in a 200 answer is an error too.
    stub.script(
        "profile",
        200,
        error(
            "ACCESS_DENIED",
            "REST is available only on commercial plans",
        ),
    );
    let e = client.call("profile", json!({})).await.unwrap_err();
    assert_eq!(e.refusal(), Some(AuthRefusal::AccessDenied), "{e:?}");
    assert!(client.requests().unwrap().rejected().is_some());
    client.call("profile", json!({})).await.unwrap();
    assert_eq!(
        client.requests().unwrap().rejected(),
        None,
        "cleared by a success"
    );

    // At most crm.max_retries retries.
    for _ in 0..5 {
        stub.script("scope", 500, error("INTERNAL_SERVER_ERROR", "boom"));
    }
    let e = client.call("scope", json!({})).await.unwrap_err();
    assert_eq!(e.code(), Some("INTERNAL_SERVER_ERROR"));
    assert_eq!(stub.seen("scope").len(), 4);
    stub.stop().await;
}

#[tokio::test]
async fn an_exhausted_method_budget_waits_for_its_reset_within_retry_max() {
    let stub = Stub::start().await;
    let mut c = base_config();
    c.bitrix24.webhook_url = Secret::new(stub.webhook());
    c.crm.retry_base = Duration::from_millis(1);
    c.crm.retry_max = Duration::from_millis(400);
    let client = B24Client::new(&c, None).unwrap();
    let reset = jiff::Timestamp::now().as_second() + 30;
    stub.script(
        "profile",
        429,
        json!({"error": "OPERATION_TIME_LIMIT", "error_description": "Method is blocked due to operation time limit.",
               "time": {"operating": 480.5, "operating_reset_at": reset}}),
    );
    client.call("profile", json!({})).await.unwrap();
    let seen = stub.seen("profile");
    assert_eq!(seen.len(), 2);
    let gap = seen[1].at - seen[0].at;
    // The backoff alone would be at most 1 ms; the reset is 30 s away, bounded by retry_max.
    assert!(gap >= Duration::from_millis(350), "{gap:?}");
    assert!(gap < Duration::from_secs(5), "{gap:?}");
    stub.stop().await;
}

#[tokio::test]
async fn raw_passes_the_answer_through_unchanged() {
    let stub = Stub::start().await;
    let client = webhook_client(&stub);
    let body = error(
        "",
        "Call is not found (call should be registered prior to finishing",
    );
    stub.script("telephony.externalcall.finish", 400, body.clone());
    let (status, bytes) = client
        .raw("telephony.externalcall.finish", json!({"CALL_ID": "x"}))
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert_eq!(bytes, body.to_string().into_bytes());

    stub.script(
        "profile",
        503,
        error("QUERY_LIMIT_EXCEEDED", "Too many requests"),
    );
    let (status, bytes) = client.raw("profile", json!({})).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&bytes).unwrap()["result"]["ID"],
        1
    );
    assert_eq!(
        stub.seen("profile").len(),
        2,
        "the request was not run: sent again"
    );

    let e = client.raw("../profile", json!({})).await.unwrap_err();
    assert!(matches!(e, B24Error::BadRequest { .. }), "{e:?}");
    stub.stop().await;
}

#[tokio::test]
async fn a_batch_is_one_request_with_php_encoded_commands() {
    let stub = Stub::start().await;
    let client = webhook_client(&stub);
    let cmds = vec![
        (
            "show".to_string(),
            "telephony.externalcall.show".to_string(),
            json!({"CALL_ID": "externalCall.1 x", "USER_ID": [1, 2]}),
        ),
        ("gone".to_string(), "fail".to_string(), json!({})),
    ];
    let out = client.batch(&cmds, false).await.unwrap();
    assert_eq!(
        out.results["show"],
        json!({"method": "telephony.externalcall.show",
               "query": "CALL_ID=externalCall.1%20x&USER_ID[0]=1&USER_ID[1]=2"})
    );
    assert!(out.errors["gone"].is_call_not_found(), "{:?}", out.errors);
    assert_eq!(out.errors["gone"].status(), Some(400));
    let seen = stub.seen("batch");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body["halt"], 0);

    let many: Vec<_> = (0..51)
        .map(|i| (format!("c{i}"), "profile".to_string(), json!({})))
        .collect();
    let e = client.batch(&many, true).await.unwrap_err();
    assert_eq!(e, B24Error::TooManyCommands { got: 51, max: 50 });
    assert_eq!(stub.seen("batch").len(), 1, "refused before sending");
    stub.stop().await;
}

#[test]
fn batch_parameters_are_encoded_as_php_brackets() {
    assert_eq!(
        php_query(&json!({"USER_ID": [1, 2], "FILTER": {"ACTIVE": true}, "X": null})),
        "FILTER[ACTIVE]=1&USER_ID[0]=1&USER_ID[1]=2"
    );
    assert_eq!(
        php_query(&json!({"PHONE_NUMBER": "+7 999 123-45-67", "SHOW": false})),
        "PHONE_NUMBER=%2B7%20999%20123-45-67&SHOW=0"
    );
}

#[tokio::test]
async fn the_bucket_spaces_requests_as_the_portal_drains() {
    let stub = Stub::start().await;
    let mut c = base_config();
    c.bitrix24.webhook_url = Secret::new(stub.webhook());
    c.bitrix24.rps = 5;
    c.bitrix24.burst = 3;
    let client = B24Client::new(&c, None).unwrap();
    let calls = (0..10).map(|_| client.call("profile", json!({})));
    for r in futures_util::future::join_all(calls).await {
        r.unwrap();
    }
    let times: Vec<Instant> = stub.seen("profile").iter().map(|s| s.at).collect();
    assert_eq!(times.len(), 10, "no request was refused and sent again");
    // What the portal's bucket (3, draining 5/s) saw never overflowed it.
    let level = portal_level(&times, 5.0);
    assert!(level <= 3.0 + 1e-9, "the portal's bucket reached {level}");
    let span = times[9].duration_since(times[0]);
    assert!(span >= Duration::from_millis(1200), "{span:?}");
    stub.stop().await;
}

// ---------------------------------------------------------------------------------------------
// OAuth

#[tokio::test]
async fn an_expired_token_is_refreshed_once_and_the_new_pair_stored() {
    let stub = Stub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (client, state, _store) = oauth_setup(&stub, &dir, 3600);
    assert!(client.uses_oauth());
    let result = client.call("profile", json!({})).await.unwrap();
    assert_eq!(result["ID"], 1);
    assert_eq!(stub.refreshes(), 1);
    let sent: Vec<Value> = stub
        .seen("profile")
        .iter()
        .map(|s| s.body["auth"].clone())
        .collect();
    assert_eq!(sent, vec![json!("acc-old"), json!("acc-1")]);
    let tokens = stored(&state);
    assert_eq!(
        (
            tokens["access_token"].as_str(),
            tokens["refresh_token"].as_str()
        ),
        (Some("acc-1"), Some("ref-1"))
    );
    assert_eq!(tokens["member_id"], MEMBER);

    // The refresh went to the OAuth server with the application's keys; the portal never saw
    // the client secret or a refresh token.
    let refresh = &stub.seen("oauth/token")[0];
    assert_eq!(
        refresh.query.get("grant_type").map(String::as_str),
        Some("refresh_token")
    );
    assert_eq!(
        refresh.query.get("refresh_token").map(String::as_str),
        Some("ref-0")
    );
    for s in stub.seen("profile") {
        let body = s.body.to_string();
        assert!(
            !body.contains(CLIENT_SECRET) && !body.contains("ref-"),
            "{body}"
        );
    }

    // The next call goes with the new token directly.
    client.call("profile", json!({})).await.unwrap();
    assert_eq!(stub.refreshes(), 1);
    assert_eq!(stub.seen("profile")[2].body["auth"], "acc-1");
    stub.stop().await;
}

#[tokio::test]
async fn concurrent_requests_with_an_expired_token_refresh_once() {
    let stub = Stub::start().await;
    stub.lock().token_delay = Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    let (client, state, _store) = oauth_setup(&stub, &dir, 3600);
    let other = client.clone();
    let (a, b, c) = tokio::join!(
        client.call("profile", json!({})),
        client.call("echo", json!({"n": 2})),
        other.call("profile", json!({})),
    );
    a.unwrap();
    assert_eq!(b.unwrap(), json!({"n": 2}));
    c.unwrap();
    assert_eq!(
        stub.refreshes(),
        1,
        "the refresh token works once: one refresh"
    );
    assert_eq!(stub.seen("oauth/token").len(), 1);
    assert_eq!(stored(&state)["refresh_token"], "ref-1");
    stub.stop().await;
}

#[tokio::test]
async fn a_token_about_to_expire_is_refreshed_before_it_is_sent() {
    let stub = Stub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (client, state, _store) = oauth_setup(&stub, &dir, 60);
    let (a, b) = tokio::join!(
        client.call("profile", json!({})),
        client.call("profile", json!({}))
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(stub.refreshes(), 1);
    let sent: Vec<Value> = stub
        .seen("profile")
        .iter()
        .map(|s| s.body["auth"].clone())
        .collect();
    assert_eq!(sent, vec![json!("acc-1"), json!("acc-1")]);
    assert_eq!(stored(&state)["access_token"], "acc-1");
    stub.stop().await;
}

#[tokio::test]
async fn a_dead_refresh_token_is_a_typed_error_that_says_what_to_do() {
    let stub = Stub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (client, state, _store) = oauth_setup(&stub, &dir, 3600);
    stub.lock().refresh.clear();
    let e = client.call("profile", json!({})).await.unwrap_err();
    assert!(matches!(e, B24Error::GrantExpired { .. }), "{e:?}");
    assert!(
        e.to_string().contains("run `pbxgate bitrix24 auth` again"),
        "{e}"
    );
    let rejected = client
        .requests()
        .unwrap()
        .rejected()
        .expect("marked rejected");
    assert!(rejected.contains("invalid_grant"), "{rejected}");
    assert!(!rejected.contains(CLIENT_SECRET) && !e.to_string().contains("ref-0"));
    assert_eq!(stored(&state)["refresh_token"], "ref-0", "nothing to store");
    assert_eq!(stub.seen("profile").len(), 1);
    stub.stop().await;
}

#[tokio::test]
async fn a_token_still_refused_after_a_refresh_marks_the_portal_rejecting() {
    let stub = Stub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (client, _state, _store) = oauth_setup(&stub, &dir, 3600);
    stub.lock().expired.clear();
    stub.lock().valid.insert("acc-old".into());
    for _ in 0..2 {
        stub.script(
            "profile",
            401,
            error("invalid_token", "The access token provided is invalid."),
        );
    }
    let e = client.call("profile", json!({})).await.unwrap_err();
    assert_eq!(e.refusal(), Some(AuthRefusal::InvalidToken), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("Bitrix24 refused the OAuth token (invalid_token)"),
        "{e}"
    );
    assert_eq!(stub.refreshes(), 1);
    assert!(client
        .requests()
        .unwrap()
        .rejected()
        .unwrap()
        .contains("pbxgate bitrix24 auth"));
    client.call("profile", json!({})).await.unwrap();
    assert_eq!(client.requests().unwrap().rejected(), None);
    stub.stop().await;
}

#[tokio::test]
async fn oauth_without_a_grant_asks_for_one() {
    let stub = Stub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = oauth_config(&stub, &dir);
    let store = Store::open(&config.storage.path).unwrap();
    let client = B24Client::new(&config, Some(store.crm_state().unwrap())).unwrap();
    let e = client.call("profile", json!({})).await.unwrap_err();
    assert_eq!(e, B24Error::NotAuthorized);
    assert!(stub.lock().seen.is_empty());
    stub.stop().await;
}

// ---------------------------------------------------------------------------------------------
// `pbxgate bitrix24 auth`

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
    stub.lock().codes.insert("code-42".into());
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[crm]\nkind = \"bitrix24\"\ntimeout = \"5s\"\n\
             [bitrix24]\nportal = \"{url}\"\nclient_id = \"{CLIENT_ID}\"\n\
             client_secret = \"{CLIENT_SECRET}\"\noauth_server = \"{url}\"\n\
             [storage]\npath = \"{}\"\n",
            store_path.display(),
            url = stub.url
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    let out = pbxgate(dir.path(), &["--config", config, "bitrix24", "auth"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "{}/oauth/authorize/?client_id={CLIENT_ID}",
            stub.url
        )),
        "{stdout}"
    );
    assert!(stdout.contains("--code"), "{stdout}");

    // While the service holds the store.
    {
        let held = Store::open(&store_path).unwrap();
        let out = pbxgate(
            dir.path(),
            &["--config", config, "bitrix24", "auth", "--code", "code-42"],
        )
        .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("stop the service first"), "{stderr}");
        drop(held);
    }
    assert!(
        stub.seen("oauth/token").is_empty(),
        "nothing sent while the store is held"
    );

    let redirect = format!("https://handler.example/b24?code=code-42&domain=x&member_id={MEMBER}");
    let out = pbxgate(
        dir.path(),
        &["--config", config, "bitrix24", "auth", "--code", &redirect],
    )
    .await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(MEMBER) && stdout.contains("user 7"),
        "{stdout}"
    );
    for text in [&stdout, &stderr] {
        assert!(
            !text.contains("acc-1") && !text.contains("ref-1") && !text.contains(CLIENT_SECRET),
            "{text}"
        );
    }
    let grant = &stub.seen("oauth/token")[0];
    assert_eq!(
        grant.query.get("grant_type").map(String::as_str),
        Some("authorization_code")
    );
    assert_eq!(grant.query.get("code").map(String::as_str), Some("code-42"));

    // A code works once.
    let out = pbxgate(
        dir.path(),
        &["--config", config, "bitrix24", "auth", "--code", "code-42"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("invalid_grant"), "{stderr}");

    let store = Store::open(&store_path).unwrap();
    let tokens = stored(&store.crm_state().unwrap());
    assert_eq!(tokens["access_token"], "acc-1");
    assert_eq!(tokens["refresh_token"], "ref-1");
    assert_eq!(tokens["user_id"], 7);
    stub.stop().await;
}
