//! `customize_autodistribution` and `process_client_phone` on the routing of incoming calls:
//! `/pbx/route` and FastAGI with a real child process or a local HTTP hook, against the strict
//! fake CRM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pbxgate::base::secret::Secret;
use pbxgate::config::{Config, HookConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::support::{FakeCrm, TestApp};

const TOKEN: &str = "route-token-0123456789";
const MANAGER: &str = "/api/v5/telephony/manager";
const POINT: &str = "customize_autodistribution";

/// A command hook at `point` running `argv`.
pub(crate) fn command_hook(c: &mut Config, point: &str, argv: &[&str], timeout: Duration) {
    c.hooks.0.insert(
        point.into(),
        HookConfig {
            command: argv.iter().map(|s| s.to_string()).collect(),
            url: String::new(),
            timeout,
        },
    );
}

/// An HTTP hook at `point`.
pub(crate) fn url_hook(c: &mut Config, point: &str, url: &str, timeout: Duration) {
    c.hooks.0.insert(
        point.into(),
        HookConfig {
            command: Vec::new(),
            url: url.to_string(),
            timeout,
        },
    );
}

/// A Python script in `dir` that has the hook's input as `d` and answers `print(...)` itself.
pub(crate) fn python(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!("import json, sys, time\nd = json.load(sys.stdin)\n{body}"),
    )
    .unwrap();
    path
}

/// A Python hook that appends each input to `seen` (one JSON per line) and answers `data`
/// (a Python expression over `d`).
pub(crate) fn recording_python(dir: &Path, seen: &Path, data: &str) -> PathBuf {
    python(
        dir,
        "hook.py",
        &format!(
            "open({seen:?}, 'a').write(json.dumps(d) + '\\n')\n\
             print(json.dumps({{'state': 'success', 'data': {data}}}))\n",
            seen = seen.display().to_string()
        ),
    )
}

/// The inputs a [`recording_python`] hook saw.
pub(crate) fn inputs(seen: &Path) -> Vec<Value> {
    std::fs::read_to_string(seen)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// How the local HTTP hook answers a request's JSON body: a status and a body.
pub(crate) type Answer = Arc<dyn Fn(&Value) -> (u16, String) + Send + Sync>;

/// A hand-written HTTP/1.1 hook on 127.0.0.1 (one request per connection): every request
/// line and JSON body is reported on the channel; `answer` gives the reply.
pub(crate) async fn http_hook(
    answer: Answer,
) -> (String, mpsc::UnboundedReceiver<(String, Value)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (answer, tx) = (answer.clone(), tx.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                while buf.len() < end + length {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body: Value =
                    serde_json::from_slice(&buf[end..end + length]).unwrap_or(Value::Null);
                let (status, text) = answer(&body);
                let _ = tx.send((head.lines().next().unwrap_or("").to_string(), body));
                let reply = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    (format!("http://{addr}/hook"), rx)
}

/// The service with Russian numbering, fallback 100, the manager 7/101 for +79161234567,
/// FastAGI on, and a generous route deadline (a Python hook's start is in it).
async fn app(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let crm = FakeCrm::start().await;
    crm.set_manager("+79161234567", 7, "101");
    TestApp::spawn_with(crm, |c| {
        c.crm.register_on_start = false;
        c.pbx.token = Secret::new(TOKEN);
        c.phone.country_code = "7".into();
        c.phone.national_prefix = "8".into();
        c.phone.national_length = 10;
        c.routing.fallback_code = "100".into();
        c.routing.timeout = Duration::from_secs(10);
        c.routing.agi_listen = "127.0.0.1:0".into();
        c.routing.agi_timeout = Duration::from_secs(10);
        tweak(c);
    })
    .await
}

/// `GET /pbx/route` as CURL() does it: (code, X-Route-Source).
async fn route_text(app: &TestApp, query: &str) -> (String, String) {
    let r = app
        .http
        .get(app.url(&format!("/pbx/route?{query}&token={TOKEN}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let source = r.headers()["x-route-source"].to_str().unwrap().to_string();
    (r.text().await.unwrap(), source)
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

/// Plays Asterisk on the FastAGI port: sends the environment, answers every command with
/// `200 result=1`, returns the commands seen until the server closes.
async fn agi_route(app: &TestApp, callerid: &str) -> Vec<String> {
    let addr = app.state.agi_addr.expect("FastAGI listens");
    let stream = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let env = format!(
        "agi_network: yes\nagi_network_script: route\nagi_channel: PJSIP/trunk-00000012\n\
         agi_uniqueid: 1795264721.70\nagi_callerid: {callerid}\nagi_dnid: 4951112233\n\
         agi_context: from-trunk\nagi_extension: 4951112233\n\n"
    );
    w.write_all(env.as_bytes()).await.unwrap();
    let mut commands = Vec::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(15), r.read_line(&mut line))
            .await
            .expect("the server answers")
            .unwrap();
        if n == 0 {
            return commands;
        }
        commands.push(line.trim_end().to_string());
        w.write_all(b"200 result=1\n").await.unwrap();
    }
}

#[tokio::test]
async fn the_hook_changes_the_extension_on_fresh_and_cached_answers() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen.jsonl");
    let script = recording_python(
        dir.path(),
        &seen,
        "{'number': '105', 'name': 'Important caller!'}",
    );
    let app = app(|c| {
        command_hook(
            c,
            POINT,
            &["python3", &script.display().to_string()],
            Duration::from_secs(10),
        )
    })
    .await;

    let (code, source) = route_text(&app, "phone=8%20(916)%20123-45-67&did=84951234567").await;
    assert_eq!((code.as_str(), source.as_str()), ("105", "hook"));
    let input = &inputs(&seen)[0];
    assert_eq!(
        input,
        &json!({
            "point": POINT,
            "call_full": null,
            "call_stage": "conversation_requested",
            "number": "101",
            "name": "",
            "from": "+79161234567",
            "did": "+74951234567",
            "source": "crm",
            "user": {"id": 7, "code": "101"},
            "entity": null,
            "error": "",
        })
    );

    // The cached answer goes through the hook too; the name is cut to 20 characters.
    let again = route_json(&app, "phone=%2B79161234567").await;
    assert_eq!(
        (&again["code"], &again["source"], &again["name"]),
        (&json!("105"), &json!("hook"), &json!("Important caller!"))
    );
    assert_eq!(inputs(&seen)[1]["source"], "cache");
    assert_eq!(inputs(&seen)[1]["number"], "101");
    assert_eq!(app.crm.requests_to(MANAGER).len(), 1);

    // FastAGI asks the same router: the name is set for the dialplan's CALLERID(name).
    assert_eq!(
        agi_route(&app, "89161234567").await,
        vec![
            "SET VARIABLE PBXGATE_ROUTE \"105\"",
            "SET VARIABLE PBXGATE_ROUTE_SOURCE \"hook\"",
            "SET VARIABLE PBXGATE_ROUTE_NAME \"Important caller!\"",
        ]
    );

    let ready = app.ready().await;
    assert_eq!(ready["hooks"][POINT]["changed"], 3, "{ready}");
    assert_eq!(ready["routing"]["stats"]["hookChanges"], 3, "{ready}");
    assert_eq!(ready["routing"]["stats"]["fallbacks"], 0, "{ready}");
}

#[tokio::test]
async fn a_hook_choosing_nobody_gets_the_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen.jsonl");
    let script = recording_python(
        dir.path(),
        &seen,
        "{'number': None if d['from'].endswith('67') else ''}",
    );
    let app = app(|c| {
        command_hook(
            c,
            POINT,
            &["python3", &script.display().to_string()],
            Duration::from_secs(10),
        )
    })
    .await;
    app.crm.set_manager("+79162222222", 8, "102");
    for phone in ["89161234567", "89162222222"] {
        let r = route_json(&app, &format!("phone={phone}")).await;
        assert_eq!(
            (&r["code"], &r["source"], &r["reason"]),
            (
                &json!("100"),
                &json!("fallback"),
                &json!("the hook chose nobody")
            ),
            "{phone}: {r}"
        );
    }
    // Routing itself found nobody: the hook is told so, and its "nobody" keeps the fallback.
    let r = route_json(&app, "phone=89260000000").await;
    assert_eq!(
        (&r["code"], &r["reason"]),
        (&json!("100"), &json!("no responsible manager"))
    );
    let last = inputs(&seen).pop().unwrap();
    assert_eq!(
        (&last["number"], &last["user"], &last["source"]),
        (&json!(""), &Value::Null, &json!("fallback"))
    );
    assert_eq!(last["error"], "");
    assert_eq!(app.ready().await["routing"]["stats"]["fallbacks"], 3);
}

#[tokio::test]
async fn a_failing_hook_leaves_the_crm_answer_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let script = python(
        dir.path(),
        "hook.py",
        "tail = d['from'][-2:]\n\
         if tail == '01':\n    sys.stderr.write('boom')\n    sys.exit(3)\n\
         elif tail == '02':\n    print('not json')\n\
         elif tail == '03':\n    print(json.dumps({'state': 'success', 'data': {'number': 105}}))\n\
         elif tail == '04':\n    time.sleep(30)\n\
         else:\n    print(json.dumps({'state': 'success', 'data': {'number': '10a'}}))\n",
    );
    let app = app(|c| {
        command_hook(
            c,
            POINT,
            &["python3", &script.display().to_string()],
            Duration::from_millis(1500),
        )
    })
    .await;
    for n in 1..=5 {
        app.crm.set_manager(&format!("+7916000000{n}"), 7, "101");
    }
    for n in 1..=5 {
        let started = Instant::now();
        let r = route_json(&app, &format!("phone=8916000000{n}")).await;
        assert_eq!(
            (&r["code"], &r["source"]),
            (&json!("101"), &json!("crm")),
            "{n}: {r}"
        );
        // The sleeping hook is cut off at its own timeout, well before the route deadline.
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{n}: {:?}",
            started.elapsed()
        );
    }
    let ready = app.ready().await;
    let counts = &ready["hooks"][POINT];
    // Exit 3, not JSON, a number that is not a string; an invalid extension is an answer
    // (counted changed) that routing does not take.
    assert_eq!(
        (&counts["failed"], &counts["timeout"], &counts["changed"]),
        (&json!(3), &json!(1), &json!(1)),
        "{ready}"
    );
    assert_eq!(ready["routing"]["stats"]["hookChanges"], 0, "{ready}");
}

#[tokio::test]
async fn a_hook_slower_than_the_route_deadline_leaves_routing_s_answer() {
    let dir = tempfile::tempdir().unwrap();
    let script = python(dir.path(), "hook.py", "time.sleep(30)\n");
    let app = app(|c| {
        c.routing.timeout = Duration::from_secs(1);
        command_hook(
            c,
            POINT,
            &["python3", &script.display().to_string()],
            Duration::from_secs(20),
        )
    })
    .await;
    let started = Instant::now();
    let r = route_json(&app, "phone=89161234567").await;
    let took = started.elapsed();
    assert_eq!(
        (&r["code"], &r["source"]),
        (&json!("101"), &json!("crm")),
        "{r}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(app.ready().await["routing"]["stats"]["hookLate"], 1);
}

#[tokio::test]
async fn the_crm_is_asked_with_the_number_process_client_phone_gives() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen.jsonl");
    let script = recording_python(
        dir.path(),
        &seen,
        "{'phone': '+79165550000'} if d['phone'] == '+79161234567' else {}",
    );
    let app = app(|c| {
        command_hook(
            c,
            "process_client_phone",
            &["python3", &script.display().to_string()],
            Duration::from_secs(10),
        )
    })
    .await;
    app.crm.set_manager("+79165550000", 9, "109");
    let r = route_json(&app, "phone=89161234567").await;
    assert_eq!(
        (&r["code"], &r["userId"]),
        (&json!("109"), &json!(9)),
        "{r}"
    );
    let asked = app.crm.requests_to(MANAGER);
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].query["phone"], "+79165550000");
    let input = &inputs(&seen)[0];
    assert_eq!(
        (
            &input["point"],
            &input["phone"],
            &input["call_stage"],
            &input["call_full"]
        ),
        (
            &json!("process_client_phone"),
            &json!("+79161234567"),
            &json!("conversation_requested"),
            &Value::Null
        )
    );
    // The cache is keyed by the caller's number: the next call asks neither the hook nor the CRM.
    let r = route_json(&app, "phone=%2B79161234567").await;
    assert_eq!((&r["code"], &r["source"]), (&json!("109"), &json!("cache")));
    assert_eq!(inputs(&seen).len(), 1);
    assert_eq!(app.crm.requests_to(MANAGER).len(), 1);
}

#[tokio::test]
async fn an_http_hook_routes_a_call_the_crm_could_not_answer() {
    let (url, mut seen) = http_hook(Arc::new(|input: &Value| {
        let number = if input["error"].as_str().is_some_and(|e| !e.is_empty()) {
            "105"
        } else {
            ""
        };
        (
            200,
            json!({"state": "success", "data": {"number": number}}).to_string(),
        )
    }))
    .await;
    let app = app(|c| {
        // Nothing listens there.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        c.crm.url = format!("http://{}", dead.local_addr().unwrap());
        drop(dead);
        c.crm.max_retries = 0;
        url_hook(c, POINT, &url, Duration::from_secs(10));
    })
    .await;
    let (code, source) = route_text(&app, "phone=89161234567").await;
    assert_eq!((code.as_str(), source.as_str()), ("105", "hook"));
    let (line, body) = seen.recv().await.unwrap();
    assert_eq!(line, "POST /hook HTTP/1.1");
    assert_eq!(
        (
            &body["point"],
            &body["error"],
            &body["number"],
            &body["from"]
        ),
        (
            &json!(POINT),
            &json!("the CRM lookup failed"),
            &json!(""),
            &json!("+79161234567")
        )
    );
    assert_eq!(app.ready().await["hooks"][POINT]["changed"], 1);
}

#[tokio::test]
async fn the_shipped_vip_route_hook_sends_listed_callers_to_one_extension() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("vip.txt");
    std::fs::write(
        &list,
        "# our best customers\n8 (916) 123-45-67   # the boss\n\n+7 926 000 00 01\n",
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hooks/vip_route.py");
    let app = app(|c| {
        command_hook(
            c,
            POINT,
            &[
                "python3",
                &script.display().to_string(),
                &list.display().to_string(),
                "105",
                "VIP",
            ],
            Duration::from_secs(10),
        )
    })
    .await;
    app.crm.set_manager("+79162222222", 8, "102");
    // Listed, with a manager in the CRM: the VIP extension.
    let r = route_json(&app, "phone=%2B79161234567").await;
    assert_eq!(
        (&r["code"], &r["source"], &r["name"]),
        (&json!("105"), &json!("hook"), &json!("VIP")),
        "{r}"
    );
    // Listed, nobody responsible: the VIP extension instead of the fallback.
    let (code, _) = route_text(&app, "phone=89260000001").await;
    assert_eq!(code, "105");
    // Not listed: what routing chose.
    let r = route_json(&app, "phone=89162222222").await;
    assert_eq!(
        (&r["code"], &r["source"]),
        (&json!("102"), &json!("crm")),
        "{r}"
    );
    assert!(r.get("name").is_none(), "{r}");
    // FastAGI too.
    assert_eq!(
        agi_route(&app, "+7 916 123 45 67").await,
        vec![
            "SET VARIABLE PBXGATE_ROUTE \"105\"",
            "SET VARIABLE PBXGATE_ROUTE_SOURCE \"hook\"",
            "SET VARIABLE PBXGATE_ROUTE_NAME \"VIP\"",
        ]
    );
    assert_eq!(
        agi_route(&app, "89162222222").await,
        vec![
            "SET VARIABLE PBXGATE_ROUTE \"102\"",
            "SET VARIABLE PBXGATE_ROUTE_SOURCE \"cache\"",
        ]
    );
}
