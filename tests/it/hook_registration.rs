//! `need_registration`, `post_registration`, `process_client_phone` and `process_user_phone`
//! end to end: captured calls in, a real hook (a child process or a local HTTP service), what
//! reaches the strict fake CRM out.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use pbxgate::config::{Config, HookConfig};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::support::{capture_body, finished, lab_app, TestApp};

const EVENT: &str = "/api/v5/telephony/call/event";
const UPLOAD: &str = "/api/v5/telephony/calls/upload";
const TOKEN: &str = "hook-token-0123456789";
/// 09: an inbound call over PJSIP/trunk that rang 101, nobody answered.
const MISSED: &str = "lab-1795264721.70";
const MISSED_KEY: &str = "1795264721.70";

fn command_hook(c: &mut Config, point: &str, argv: &[&str], timeout: Duration) {
    c.hooks.0.insert(
        point.into(),
        HookConfig {
            command: argv.iter().map(|s| s.to_string()).collect(),
            url: String::new(),
            timeout,
        },
    );
}

fn url_hook(c: &mut Config, point: &str, url: &str) {
    c.hooks.0.insert(
        point.into(),
        HookConfig {
            command: Vec::new(),
            url: url.to_string(),
            timeout: Duration::from_secs(5),
        },
    );
}

/// A local HTTP hook: every input is reported on the channel, answered with `data(input)`.
async fn http_hook(
    data: impl Fn(&Value) -> Value + Send + Sync + 'static,
) -> (String, mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = mpsc::unbounded_channel::<Value>();
    let data: Arc<dyn Fn(&Value) -> Value + Send + Sync> = Arc::new(data);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let server = HttpServer::new(move || {
        let (tx, data) = (tx.clone(), data.clone());
        App::new().route(
            "/hook",
            web::post().to(move |body: web::Json<Value>| {
                let (tx, data) = (tx.clone(), data.clone());
                async move {
                    let answer = json!({"state": "success", "data": data(&body)});
                    let _ = tx.send(body.into_inner());
                    HttpResponse::Ok().json(answer)
                }
            }),
        )
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    (url, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the hook was called")
        .expect("hook server running")
}

fn script(name: &str) -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts/hooks")
        .join(name)
        .display()
        .to_string()
}

/// A registered call through the webhook source (no trunk), as `lab-<id>`.
async fn webhook_call(app: &TestApp, id: &str) {
    let r = app
        .http
        .post(app.url("/pbx/events"))
        .bearer_auth(TOKEN)
        .json(&json!([
            {"call_id": id, "event": "start", "direction": "in", "phone": "+79997776655", "extension": "101"},
            {"call_id": id, "event": "answer", "extension": "101"},
            {"call_id": id, "event": "hangup"}
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

fn event_ids(app: &TestApp) -> Vec<String> {
    app.crm
        .requests_to(EVENT)
        .iter()
        .map(|r| {
            r.form_json("event")["callExternalId"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// After a later call reached the CRM: `id` sent nothing, and is still known locally (ignored
/// when it finished, or left out of the history when its upload was due).
async fn kept_from_the_crm(app: &TestApp, id: &str, later: &str) {
    app.crm
        .wait_for_call(later, Duration::from_secs(15))
        .await
        .expect("the later call reached the CRM");
    assert!(
        !event_ids(app).iter().any(|e| e == id),
        "{:?}",
        event_ids(app)
    );
    assert!(
        !app.crm.uploaded_ids().iter().any(|u| u == id),
        "{:?}",
        app.crm.uploaded_ids()
    );
    let local = app.state.recent_calls.all();
    let call = local
        .iter()
        .find(|c| c.external_id == id)
        .expect("the call is kept locally");
    // The fake has the upload before pbxgate has its answer.
    tokio::time::timeout(
        Duration::from_secs(10),
        app.state
            .outbox
            .wait_until(|s| s.pending == 0 && s.in_flight == 0),
    )
    .await
    .expect("the history settled");
    let s = app.state.outbox.status();
    assert!(
        call.ignored || s.not_registered == 1,
        "neither ignored nor left out: {call:?} {s:?}"
    );
    assert_eq!(s.pending + s.dead, 0, "{s:?}");
}

#[tokio::test]
async fn need_registration_false_keeps_a_call_from_the_crm_and_is_asked_once() {
    let (url, mut seen) = http_hook(|input| {
        if input["call_full"]["channel"]["id"] == MISSED_KEY {
            json!({"result": false})
        } else {
            json!({})
        }
    })
    .await;
    let app = lab_app(|c| {
        url_hook(c, "need_registration", &url);
        c.pbx.token = pbxgate::base::secret::Secret::new(TOKEN);
        c.history.batch_window = Duration::from_millis(50);
    })
    .await;
    app.ami.send(&capture_body("09_inbound_missed"));
    let asked = next(&mut seen).await;
    assert_eq!(asked["point"], "need_registration");
    assert_eq!(asked["call_stage"], "conversation_requested");
    assert_eq!(asked["call_full"]["channel"]["type"], "incoming");
    assert_eq!(
        asked["call_full"]["channel"]["trunk"]["original"],
        "PJSIP/trunk"
    );
    finished(&app, 1).await;
    webhook_call(&app, "ok1").await;
    let other = next(&mut seen).await;
    assert_eq!(other["call_full"]["channel"]["id"], "ok1");
    kept_from_the_crm(&app, MISSED, "lab-ok1").await;
    // Once per call: neither the hangup nor the history asked again.
    assert!(seen.try_recv().is_err(), "asked more than once per call");
    let ready = app.ready().await;
    assert_eq!(ready["hooks"]["need_registration"]["changed"], 1, "{ready}");
    assert_eq!(
        ready["hooks"]["need_registration"]["unchanged"], 1,
        "{ready}"
    );
}

#[tokio::test]
async fn the_shipped_blacklist_hook_keeps_calls_over_a_trunk_from_the_crm() {
    let blacklist = script("blacklist.py");
    let app = lab_app(|c| {
        command_hook(
            c,
            "need_registration",
            &["python3", &blacklist, "--trunk", "PJSIP/trunk"],
            Duration::from_secs(5),
        );
        c.pbx.token = pbxgate::base::secret::Secret::new(TOKEN);
        c.history.batch_window = Duration::from_millis(50);
    })
    .await;
    app.ami.send(&capture_body("09_inbound_missed"));
    finished(&app, 1).await;
    webhook_call(&app, "ok2").await;
    kept_from_the_crm(&app, MISSED, "lab-ok2").await;
    assert!(event_ids(&app).iter().any(|e| e == "lab-ok2"));
}

#[tokio::test]
async fn the_shipped_blacklist_hook_matches_a_number_in_any_of_its_forms() {
    let blacklist = script("blacklist.py");
    let app = lab_app(|c| {
        // The webhook gives +79997776655; the list has its national form.
        c.phone.country_code = "7".into();
        c.phone.national_prefix = "8".into();
        command_hook(
            c,
            "need_registration",
            &["python3", &blacklist, "--number", "89997776655"],
            Duration::from_secs(5),
        );
        c.pbx.token = pbxgate::base::secret::Secret::new(TOKEN);
        c.history.batch_window = Duration::from_millis(50);
    })
    .await;
    webhook_call(&app, "spam").await;
    finished(&app, 1).await;
    app.ami.send(&capture_body("09_inbound_missed"));
    kept_from_the_crm(&app, "lab-spam", MISSED).await;
}

#[tokio::test]
async fn process_client_phone_and_process_user_phone_rewrite_what_the_crm_gets() {
    let (client_url, mut client_seen) = http_hook(
        |input| json!({"phone": format!("+7000{}", &input["phone"].as_str().unwrap()[1..])}),
    )
    .await;
    let (user_url, mut user_seen) = http_hook(|input| {
        if input["phone"] == "101" {
            json!({"phone": "102"})
        } else {
            json!({})
        }
    })
    .await;
    let app = lab_app(|c| {
        url_hook(c, "process_client_phone", &client_url);
        url_hook(c, "process_user_phone", &user_url);
    })
    .await;
    app.ami.send(&capture_body("09_inbound_missed"));
    let call = app
        .crm
        .wait_for_call(MISSED, Duration::from_secs(15))
        .await
        .expect("uploaded");
    let first = next(&mut client_seen).await;
    assert_eq!(first["point"], "process_client_phone");
    assert_eq!(first["call_stage"], "conversation_requested");
    let original = first["phone"].as_str().unwrap().to_string();
    let rewritten = format!("+7000{}", &original[1..]);
    assert_eq!(call["phone"], rewritten.as_str(), "{call}");
    assert_eq!(call["code"], "102", "{call}");
    let events = app.crm.wait_for_requests(EVENT, 2).await;
    let popup = events[0].form_json("event");
    assert_eq!(popup["type"], "in", "{popup}");
    assert_eq!(popup["phone"], rewritten.as_str(), "{popup}");
    assert_eq!(popup["codes"], json!(["102"]), "{popup}");
    let user = next(&mut user_seen).await;
    assert_eq!(user["point"], "process_user_phone");
    assert_eq!(user["phone"], "101");
    // The history asks at the end of the call.
    let mut stages = vec![first["call_stage"].clone()];
    while let Ok(v) = client_seen.try_recv() {
        stages.push(v["call_stage"].clone());
    }
    assert!(stages.contains(&json!("call_ended")), "{stages:?}");
    assert_eq!(app.crm.requests_to(UPLOAD).len(), 1);
}

#[tokio::test]
async fn post_registration_is_told_after_the_pop_up_and_after_the_history() {
    let (url, mut seen) = http_hook(|_| json!({})).await;
    let app = lab_app(|c| url_hook(c, "post_registration", &url)).await;
    app.ami.send(&capture_body("09_inbound_missed"));
    let first = next(&mut seen).await;
    let second = next(&mut seen).await;
    for told in [&first, &second] {
        assert_eq!(told["point"], "post_registration");
        assert_eq!(told["call_full"]["channel"]["id"], MISSED_KEY);
    }
    let mut stages = [
        first["call_stage"].as_str().unwrap(),
        second["call_stage"].as_str().unwrap(),
    ];
    stages.sort();
    assert_eq!(stages, ["call_ended", "conversation_requested"]);
    assert!(app.crm.uploaded_ids().contains(&MISSED.to_string()));
}

#[tokio::test]
async fn a_need_registration_hook_that_never_answers_does_not_hold_the_pop_up_back() {
    let dir = tempfile::tempdir().unwrap();
    let hang = dir.path().join("hang.py");
    std::fs::write(&hang, "import time\ntime.sleep(600)\n").unwrap();
    let hang = hang.display().to_string();
    let app = lab_app(|c| {
        // The hook's own limit is past the event's: the live path stops waiting first.
        command_hook(
            c,
            "need_registration",
            &["python3", &hang],
            Duration::from_secs(30),
        );
        c.calls.live_event_deadline = Duration::from_secs(2);
    })
    .await;
    app.ami.send(&capture_body("09_inbound_missed"));
    let events = app.crm.wait_for_requests(EVENT, 1).await;
    assert_eq!(events[0].form_json("event")["type"], "in");
    // Told of the call, the CRM gets its history too, without asking the hook again.
    app.crm
        .wait_for_call(MISSED, Duration::from_secs(15))
        .await
        .expect("uploaded");
    assert_eq!(
        app.state
            .tracker_stats
            .live_events_late
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // Asked once, cut off by the live budget: counted as a timeout, never asked again.
    let ready = app.ready().await;
    let counts = &ready["hooks"]["need_registration"];
    assert_eq!(counts["timeout"], 1, "{counts}");
    let others = (&counts["changed"], &counts["unchanged"], &counts["failed"]);
    assert_eq!(others, (&json!(0), &json!(0), &json!(0)), "{counts}");
}
