//! Every point of a call's life with a hook that fails — a crash, garbage, a wrong type, a
//! non-2xx answer, no answer in time — as a child process and as a local HTTP service: the
//! call reaches the strict fake CRM as it would without hooks, and each point counts the
//! failure.

use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use pbxgate::config::{Config, HookConfig};
use serde_json::Value;

use crate::support::{capture_body, lab_app, TestApp};

const EVENT: &str = "/api/v5/telephony/call/event";
/// 09: an inbound call that rang 101, nobody answered.
const MISSED: &str = "lab-1795264721.70";

/// The points a missed inbound call passes (with follow-up tasks on).
const POINTS: &[&str] = &[
    "need_registration",
    "process_client_phone",
    "process_user_phone",
    "process_call_event_params",
    "process_call_params",
    "process_upload_params",
    "process_task_creation_params",
    "post_registration",
];

fn every_point(c: &mut Config, hook: HookConfig) {
    for p in POINTS {
        c.hooks.0.insert((*p).into(), hook.clone());
    }
    c.crm.missed_call_tasks = true;
}

fn command(source: &str, dir: &std::path::Path, timeout: Duration) -> HookConfig {
    let script = dir.join("hook.py");
    std::fs::write(&script, source).unwrap();
    HookConfig {
        command: vec!["python3".into(), script.display().to_string()],
        url: String::new(),
        timeout,
    }
}

/// The call went out as without hooks: pop-up, hangup, history, task.
async fn as_without_hooks(app: &TestApp) -> Value {
    let call = app
        .crm
        .wait_for_call(MISSED, Duration::from_secs(20))
        .await
        .expect("the call reached the CRM");
    assert_eq!(
        (&call["code"], &call["result"], &call["type"]),
        (
            &Value::from("101"),
            &Value::from("no answer"),
            &Value::from("in")
        ),
        "{call}"
    );
    let events = app.crm.wait_for_requests(EVENT, 2).await;
    assert_eq!(
        events[0].form_json("event")["codes"],
        serde_json::json!(["101"])
    );
    let tasks = app.crm.wait_for_tasks(1, Duration::from_secs(20)).await;
    assert_eq!(tasks.len(), 1, "the follow-up task was created");
    call
}

/// Waits until every point counted `outcome` at least once (post_registration runs after the
/// upload, in a task of its own).
async fn counted(app: &TestApp, outcome: &str) -> Value {
    let mut ready = app.ready().await;
    for _ in 0..200 {
        if POINTS
            .iter()
            .all(|p| ready["hooks"][p][outcome].as_u64().unwrap_or(0) >= 1)
        {
            return ready;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        ready = app.ready().await;
    }
    panic!("not every point counted {outcome}: {}", ready["hooks"]);
}

#[tokio::test]
async fn a_crashing_hook_at_every_point_changes_nothing_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let hook = command(
        "import sys\nsys.stdin.read()\nsys.stderr.write('boom')\nsys.exit(2)\n",
        dir.path(),
        Duration::from_secs(5),
    );
    let app = lab_app(|c| every_point(c, hook)).await;
    app.ami.send(&capture_body("09_inbound_missed"));
    as_without_hooks(&app).await;
    let ready = counted(&app, "failed").await;
    for p in POINTS {
        assert_eq!(ready["hooks"][p]["changed"], 0, "{p}: {}", ready["hooks"]);
    }
}

#[tokio::test]
async fn garbage_and_wrong_types_at_every_point_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Not JSON for some, a field of the wrong type for the others.
    let hook = command(
        "import json, sys\n\
         call = json.load(sys.stdin)\n\
         if call['point'] in ('need_registration', 'process_client_phone', 'process_upload_params'):\n\
         \x20   print('<html>oops</html>')\n\
         else:\n\
         \x20   print(json.dumps({'state': 'success', 'data': {'phone': 5, 'result': 'no', 'text': 1, 'code': 7, 'codes': 'x', 'duration': 'long'}}))\n",
        dir.path(),
        Duration::from_secs(5),
    );
    let app = lab_app(|c| every_point(c, hook)).await;
    app.ami.send(&capture_body("09_inbound_missed"));
    as_without_hooks(&app).await;
    let ready = counted(&app, "failed").await;
    for p in POINTS {
        assert_eq!(ready["hooks"][p]["changed"], 0, "{p}: {}", ready["hooks"]);
    }
}

#[tokio::test]
async fn an_http_hook_answering_500_at_every_point_changes_nothing() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let server = HttpServer::new(|| {
        App::new().route(
            "/hook",
            web::post().to(|| async { HttpResponse::InternalServerError().body("down") }),
        )
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    let hook = HookConfig {
        command: Vec::new(),
        url,
        timeout: Duration::from_secs(5),
    };
    let app = lab_app(|c| every_point(c, hook)).await;
    app.ami.send(&capture_body("09_inbound_missed"));
    as_without_hooks(&app).await;
    counted(&app, "failed").await;
}

#[tokio::test]
async fn a_hook_that_never_answers_at_every_point_costs_only_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let hook = command(
        "import time\ntime.sleep(600)\n",
        dir.path(),
        Duration::from_millis(300),
    );
    let app = lab_app(|c| every_point(c, hook)).await;
    app.ami.send(&capture_body("09_inbound_missed"));
    as_without_hooks(&app).await;
    counted(&app, "timeout").await;
}
