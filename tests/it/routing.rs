//! Routing incoming calls: `/pbx/route` over HTTP and the FastAGI server, against the fake CRM.

use std::time::Duration;

use pbxgate::base::secret::Secret;
use pbxgate::config::{Config, StaticRoute};
use pbxgate::crm::retailcrm::UserStatus;
use pbxgate::store::StoredUserStatus;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::support::{FakeCrm, TestApp};

const TOKEN: &str = "route-token-0123456789";
const MANAGER: &str = "/api/v5/telephony/manager";

fn russia(c: &mut Config) {
    c.crm.register_on_start = false;
    c.pbx.token = Secret::new(TOKEN);
    c.phone.country_code = "7".into();
    c.phone.national_prefix = "8".into();
    c.phone.national_length = 10;
    c.routing.fallback_code = "100".into();
}

async fn app(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let crm = FakeCrm::start().await;
    crm.set_manager("+79161234567", 7, "101");
    TestApp::spawn_with(crm, |c| {
        russia(c);
        tweak(c);
    })
    .await
}

/// `GET /pbx/route` as the dialplan's CURL() does it: the code as text.
async fn route_text(app: &TestApp, query: &str) -> (u16, String) {
    let r = app
        .http
        .get(app.url(&format!("/pbx/route?{query}&token={TOKEN}")))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn route_json(app: &TestApp, query: &str) -> Value {
    let r = app
        .http
        .get(app.url(&format!("/pbx/route?{query}")))
        .bearer_auth(TOKEN)
        .header("Accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn a_cache_miss_asks_the_crm_once_and_later_calls_hit_the_cache() {
    let app = app(|_| {}).await;
    let first = route_json(&app, "phone=8%20(916)%20123-45-67&did=84951234567").await;
    assert_eq!(
        (&first["code"], &first["userId"], &first["source"]),
        (&Value::from("101"), &Value::from(7), &Value::from("crm"))
    );
    // The CRM was asked with the canonical number.
    let asked = app.crm.requests_to(MANAGER);
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].query["phone"], "+79161234567");
    assert_eq!(asked[0].query["ignoreStatus"], "1");

    // Another form of the same number: the cache answers.
    let (status, body) = route_text(&app, "phone=%2B79161234567").await;
    assert_eq!((status, body.as_str()), (200, "101"));
    let again = route_json(&app, "phone=9161234567").await;
    assert_eq!(again["source"], "cache");
    assert_eq!(app.crm.requests_to(MANAGER).len(), 1);

    // /ready counts them.
    let ready: Value = app.ready().await;
    let stats = &ready["routing"]["stats"];
    assert_eq!(
        (
            &stats["requests"],
            &stats["cacheHits"],
            &stats["crmLookups"]
        ),
        (&Value::from(3), &Value::from(2), &Value::from(1)),
        "{ready}"
    );
    assert_eq!(ready["routing"]["cached"], 1);
}

#[tokio::test]
async fn nobody_responsible_is_cached_as_a_negative_answer() {
    let app = app(|_| {}).await;
    for _ in 0..3 {
        let r = route_json(&app, "phone=89260000000").await;
        assert_eq!(
            (&r["code"], &r["source"]),
            (&Value::from("100"), &Value::from("fallback"))
        );
    }
    assert_eq!(app.crm.requests_to(MANAGER).len(), 1);
}

#[tokio::test]
async fn a_slow_crm_gets_the_fallback_and_its_late_answer_fills_the_cache() {
    let app = app(|c| c.routing.timeout = Duration::from_millis(100)).await;
    app.crm.slow_down(MANAGER, Duration::from_millis(1500));
    let r = route_json(&app, "phone=89161234567").await;
    assert_eq!(
        (&r["code"], &r["source"]),
        (&Value::from("100"), &Value::from("fallback"))
    );
    assert_eq!(r["reason"], "the CRM did not answer in time");
    // The lookup goes on in the background and fills the cache.
    tokio::time::timeout(Duration::from_secs(10), app.state.router.idle())
        .await
        .expect("lookup finished");
    let r = route_json(&app, "phone=89161234567").await;
    assert_eq!(
        (&r["code"], &r["source"]),
        (&Value::from("101"), &Value::from("cache"))
    );
    assert_eq!(app.crm.requests_to(MANAGER).len(), 1);
}

#[tokio::test]
async fn concurrent_lookups_of_one_number_share_one_request() {
    let app = app(|_| {}).await;
    app.crm.slow_down(MANAGER, Duration::from_millis(300));
    let answers =
        futures_util::future::join_all((0..8).map(|_| route_json(&app, "phone=89161234567"))).await;
    for a in &answers {
        assert_eq!(a["code"], "101", "{a}");
    }
    assert_eq!(app.crm.requests_to(MANAGER).len(), 1);
}

#[tokio::test]
async fn a_crm_that_is_down_gets_the_fallback() {
    let app = app(|c| {
        // Nothing listens there.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        c.crm.url = format!("http://{}", dead.local_addr().unwrap());
        drop(dead);
        c.crm.max_retries = 0;
    })
    .await;
    let r = route_json(&app, "phone=89161234567").await;
    assert_eq!(
        (&r["code"], &r["source"]),
        (&Value::from("100"), &Value::from("fallback"))
    );
    let (_, body) = route_text(&app, "phone=89161234567").await;
    assert_eq!(body, "100");
}

/// Manager 7 (extension 101) reports `status` through changeUserStatusUrl.
async fn set_status(app: &TestApp, status: UserStatus) {
    app.state
        .store
        .put_user_status(&StoredUserStatus {
            v: 1,
            user_id: 7,
            code: "101".into(),
            status,
            since: 0,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_manager_on_break_is_passed_over() {
    let app = app(|_| {}).await;
    set_status(&app, UserStatus::Break).await;
    let r = route_json(&app, "phone=89161234567").await;
    assert_eq!(
        (&r["code"], &r["source"], &r["managerStatus"], &r["userId"]),
        (
            &Value::from("100"),
            &Value::from("fallback"),
            &Value::from("break"),
            &Value::from(7)
        )
    );
    // Back at work: routed again, from the cache, with the status shown.
    set_status(&app, UserStatus::Free).await;
    let r = route_json(&app, "phone=89161234567").await;
    assert_eq!(
        (&r["code"], &r["source"], &r["managerStatus"]),
        (
            &Value::from("101"),
            &Value::from("cache"),
            &Value::from("free")
        )
    );
}

#[tokio::test]
async fn static_entries_answer_before_the_crm() {
    let app = app(|c| {
        c.routing.r#static = vec![
            StaticRoute {
                phone: vec![],
                did: vec![r"\+74951112233".into()],
                code: "150".into(),
            },
            StaticRoute {
                phone: vec!["8916.*".into()],
                did: vec![],
                code: "151".into(),
            },
        ];
    })
    .await;
    let r = route_json(&app, "phone=89261234567&did=8%20495%20111-22-33").await;
    assert_eq!(
        (&r["code"], &r["source"]),
        (&Value::from("150"), &Value::from("static"))
    );
    let (_, body) = route_text(&app, "phone=%2B79161234567").await;
    assert_eq!(body, "151");
    assert!(app.crm.requests_to(MANAGER).is_empty());
}

#[tokio::test]
async fn anonymous_and_internal_callers_get_the_fallback_without_asking_the_crm() {
    let app = app(|_| {}).await;
    for q in ["phone=", "phone=anonymous", "phone=102"] {
        let r = route_json(&app, q).await;
        assert_eq!(r["source"], "fallback", "{q}");
        assert_eq!(r["code"], "100", "{q}");
    }
    assert!(app.crm.requests_to(MANAGER).is_empty());
}

#[tokio::test]
async fn the_endpoint_needs_the_token_and_valid_parameters() {
    let app = app(|_| {}).await;
    let get = |url: String| app.http.get(url).send();
    let r = get(app.url("/pbx/route?phone=89161234567")).await.unwrap();
    assert_eq!(r.status(), 401);
    let r = get(app.url("/pbx/route?phone=89161234567&token=wrong-token-0000000000"))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["success"], false);

    let r = get(app.url(&format!("/pbx/route?token={TOKEN}")))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["errors"]["phone"].is_string(), "{body}");

    let long = "9".repeat(65);
    let r = get(app.url(&format!("/pbx/route?token={TOKEN}&phone=1&did={long}")))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["errors"]["did"].is_string(), "{body}");

    // A repeated parameter is ambiguous: 400 naming it, not one of the values.
    for (query, field) in [
        ("phone=89161234567&phone=89991234567", "phone"),
        ("phone=89161234567&did=1&did=2", "did"),
        (&format!("phone=89161234567&token={TOKEN}") as &str, "token"),
    ] {
        let r = get(app.url(&format!("/pbx/route?token={TOKEN}&{query}")))
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query}");
        let body: Value = r.json().await.unwrap();
        assert!(
            body["errors"][field]
                .as_str()
                .is_some_and(|e| e.contains("more than once")),
            "{body}"
        );
    }
    assert!(app.crm.requests_to(MANAGER).is_empty());
}

#[tokio::test]
async fn the_endpoint_is_off_without_a_token() {
    let app = app(|c| c.pbx.token = Secret::default()).await;
    let r = app
        .http
        .get(app.url("/pbx/route?phone=89161234567&token="))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

// ---------------------------------------------------------------------------------------------
// FastAGI

async fn agi_app(tweak: impl FnOnce(&mut Config)) -> (TestApp, std::net::SocketAddr) {
    let app = app(|c| {
        c.routing.agi_listen = "127.0.0.1:0".into();
        c.routing.agi_timeout = Duration::from_millis(300);
        tweak(c);
    })
    .await;
    let addr = app.state.agi_addr.expect("FastAGI listens");
    (app, addr)
}

fn agi_env(callerid: &str, dnid: &str) -> String {
    format!(
        "agi_network: yes\nagi_network_script: route\nagi_request: agi://127.0.0.1:4573/route\n\
         agi_channel: PJSIP/trunk-00000012\nagi_language: en\nagi_type: PJSIP\n\
         agi_uniqueid: 1795264721.70\nagi_callerid: {callerid}\nagi_calleridname: unknown\n\
         agi_dnid: {dnid}\nagi_context: from-trunk\nagi_extension: 4951112233\nagi_priority: 1\n\n"
    )
}

/// Plays Asterisk: sends the environment, answers each command, returns the commands seen.
async fn agi_session(addr: std::net::SocketAddr, env: &str, hangup_first: bool) -> Vec<String> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    w.write_all(env.as_bytes()).await.unwrap();
    let mut commands = Vec::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
            .await
            .expect("server answers")
            .unwrap();
        if n == 0 {
            return commands;
        }
        commands.push(line.trim_end().to_string());
        if hangup_first && commands.len() == 1 {
            w.write_all(b"HANGUP\n").await.unwrap();
        }
        w.write_all(b"200 result=1\n").await.unwrap();
    }
}

#[tokio::test]
async fn fastagi_sets_the_route_variables() {
    let (app, addr) = agi_app(|_| {}).await;
    let cmds = agi_session(addr, &agi_env("89161234567", "4951112233"), false).await;
    assert_eq!(
        cmds,
        vec![
            "SET VARIABLE PBXGATE_ROUTE \"101\"",
            "SET VARIABLE PBXGATE_ROUTE_SOURCE \"crm\""
        ]
    );
    // The caller hung up meanwhile: the HANGUP line is skipped, the session still ends cleanly.
    let cmds = agi_session(addr, &agi_env("+7 916 123 45 67", "unknown"), true).await;
    assert_eq!(
        cmds,
        vec![
            "SET VARIABLE PBXGATE_ROUTE \"101\"",
            "SET VARIABLE PBXGATE_ROUTE_SOURCE \"cache\""
        ]
    );
    // An unknown caller: the fallback.
    let cmds = agi_session(addr, &agi_env("unknown", "unknown"), false).await;
    assert_eq!(
        cmds,
        vec![
            "SET VARIABLE PBXGATE_ROUTE \"100\"",
            "SET VARIABLE PBXGATE_ROUTE_SOURCE \"fallback\""
        ]
    );
    assert_eq!(app.crm.requests_to(MANAGER).len(), 1);
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("the server closes the connection");
        match n {
            // Closed; a reset (unread bytes were left behind) is a close too.
            Ok(0) | Err(_) => return String::from_utf8_lossy(&buf).into_owned(),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test]
async fn fastagi_cuts_off_garbage_and_silent_clients() {
    let (app, addr) = agi_app(|_| {}).await;
    // Not AGI at all.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_to_close(&mut s).await, "");
    // A client that never sends the blank line.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"agi_network: yes\nagi_callerid: 89161234567\n")
        .await
        .unwrap();
    assert_eq!(read_to_close(&mut s).await, "");
    // A line without end.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(&vec![b'9'; 10_000]).await;
    assert_eq!(read_to_close(&mut s).await, "");
    // A client that stops answering after the first command is cut off too.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(agi_env("89161234567", "").as_bytes())
        .await
        .unwrap();
    assert_eq!(
        read_to_close(&mut s).await,
        "SET VARIABLE PBXGATE_ROUTE \"101\"\n"
    );
    // The server still serves well-behaved clients.
    let cmds = agi_session(addr, &agi_env("89161234567", ""), false).await;
    assert_eq!(cmds.len(), 2);
    drop(app);
}
