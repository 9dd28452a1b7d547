//! retailCRM's own customisation points and the follow-up task point, end to end: the
//! service with a hook configured (a real python3 child process), what reaches the strict
//! fake CRM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pbxgate::config::HookConfig;
use pbxgate::outbox::Drain;
use serde_json::Value;

use crate::retailcrm_tasks::{manual_app, missed};
use crate::support::{capture_body, lab_app};

const EVENT: &str = "/api/v5/telephony/call/event";
const TASKS: &str = "/api/v5/tasks/create";

fn hook(c: &mut pbxgate::config::Config, point: &str, script: &Path) {
    c.hooks.0.insert(
        point.into(),
        HookConfig {
            command: vec!["python3".into(), script.display().to_string()],
            url: String::new(),
            timeout: Duration::from_secs(5),
        },
    );
}

/// A hook that appends each input to `inputs` (one JSON line each) and answers `data`
/// (a Python expression over `call`, the input).
fn script(dir: &Path, data: &str) -> (PathBuf, PathBuf) {
    let inputs = dir.join("inputs.jsonl");
    let path = dir.join("hook.py");
    std::fs::write(
        &path,
        format!(
            "import json, sys\n\
             call = json.load(sys.stdin)\n\
             open({inputs:?}, 'a').write(json.dumps(call) + '\\n')\n\
             print(json.dumps({{'state': 'success', 'data': {data}}}))\n",
            inputs = inputs.display().to_string()
        ),
    )
    .unwrap();
    (path, inputs)
}

fn inputs(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn process_task_creation_params_changes_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let (path, seen) = script(
        dir.path(),
        "{'text': 'VIP: ' + call['text'], 'responsible_id': 2, 'due': '2030-01-02 03:04:05'}",
    );
    let app = manual_app(|c| {
        c.crm.missed_call_tasks = true;
        hook(c, "process_task_creation_params", &path);
    })
    .await;
    app.state.outbox.enqueue(missed("pbx-t1")).await.unwrap();
    assert_eq!(app.state.outbox.drain().await, Drain::Done);
    let tasks = app.crm.tasks();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["text"], "VIP: Missed call from +79991234567");
    assert_eq!(tasks[0]["performerId"], 2);
    // The hook's local time (the PBX host's) in the account's zone.
    let expected = jiff::civil::datetime(2030, 1, 2, 3, 4, 5, 0)
        .to_zoned(jiff::tz::TimeZone::system())
        .unwrap()
        .with_time_zone(jiff::tz::TimeZone::get("Europe/Moscow").unwrap())
        .strftime("%Y-%m-%d %H:%M")
        .to_string();
    assert_eq!(tasks[0]["datetime"], Value::from(expected));
    let input = &inputs(&seen)[0];
    assert_eq!(input["point"], "process_task_creation_params");
    assert_eq!(input["call_stage"], "call_ended");
    assert_eq!(input["responsible_id"], 1);
    assert_eq!(input["phone"], "+79991234567");
    assert_eq!(input["call_full"]["channel"]["was_answered"], false);
    assert!(
        jiff::civil::DateTime::strptime("%Y-%m-%d %H:%M:%S", input["due"].as_str().unwrap())
            .is_ok(),
        "{input}"
    );
}

#[tokio::test]
async fn process_task_creation_params_may_say_there_is_no_task() {
    let dir = tempfile::tempdir().unwrap();
    let (path, seen) = script(dir.path(), "{'create': False}");
    let app = manual_app(|c| {
        c.crm.missed_call_tasks = true;
        hook(c, "process_task_creation_params", &path);
    })
    .await;
    app.state.outbox.enqueue(missed("pbx-t2")).await.unwrap();
    assert_eq!(app.state.outbox.drain().await, Drain::Done);
    assert_eq!(inputs(&seen).len(), 1);
    assert!(app.crm.calls().contains_key("pbx-t2"));
    assert!(app.crm.requests_to(TASKS).is_empty());
}

#[tokio::test]
async fn process_upload_params_changes_what_reaches_the_crm_but_not_into_something_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let (path, seen) = script(
        dir.path(),
        "{'site': 'shop2', 'durationWaiting': 7, 'result': 'declined', 'date': 'yesterday'}",
    );
    let app = manual_app(|c| hook(c, "process_upload_params", &path)).await;
    app.state.outbox.enqueue(missed("pbx-u1")).await.unwrap();
    assert_eq!(app.state.outbox.drain().await, Drain::Done);
    let call = &app.crm.calls()["pbx-u1"];
    assert_eq!(call["site"], "shop2", "{call}");
    assert_eq!(call["durationWaiting"], 7, "{call}");
    assert_eq!(call["result"], "no answer", "{call}");
    assert_eq!(call["date"], "2026-11-21 13:00:00", "{call}");
    let input = &inputs(&seen)[0];
    assert_eq!(input["point"], "process_upload_params");
    assert_eq!(input["call_stage"], "call_ended");
    assert_eq!(input["externalId"], "pbx-u1");
    assert_eq!(input["site"], "shop1");
    assert_eq!(input["recordUrl"], Value::Null);
    assert_eq!(input["call_full"]["channel"]["id"], "pbx-u1");
    let ready = app.ready().await;
    assert_eq!(
        ready["hooks"]["process_upload_params"]["changed"], 1,
        "{ready}"
    );
}

#[tokio::test]
async fn process_upload_params_may_not_change_the_external_id() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = script(dir.path(), "{'externalId': 'other', 'site': 'shop2'}");
    let app = manual_app(|c| hook(c, "process_upload_params", &path)).await;
    app.state.outbox.enqueue(missed("pbx-u2")).await.unwrap();
    assert_eq!(app.state.outbox.drain().await, Drain::Done);
    let calls = app.crm.calls();
    assert!(!calls.contains_key("other"), "{calls:?}");
    assert_eq!(calls["pbx-u2"]["site"], "shop1");
    let ready = app.ready().await;
    assert_eq!(
        ready["hooks"]["process_upload_params"]["failed"], 1,
        "{ready}"
    );
}

#[tokio::test]
async fn process_call_event_params_changes_a_live_event() {
    let dir = tempfile::tempdir().unwrap();
    let (path, seen) = script(
        dir.path(),
        "({'site': 'shop2'} if call['type'] == 'in' else {'hangupStatus': 'cancel'})",
    );
    let app = lab_app(|c| hook(c, "process_call_event_params", &path)).await;
    app.ami.send(&capture_body("09_inbound_missed"));
    // The pop-ups (both extensions of the ring group ring), then the hangup.
    let mut n = 2;
    let events = loop {
        app.crm.wait_for_requests(EVENT, n).await;
        let events = app.crm.events();
        if events.iter().any(|e| e["type"] == "hangup") {
            break events;
        }
        n += 1;
    };
    let pop_up = events.iter().find(|e| e["type"] == "in").unwrap();
    assert_eq!(pop_up["site"], "shop2", "{events:?}");
    let hangup = events.iter().find(|e| e["type"] == "hangup").unwrap();
    assert_eq!(hangup["hangupStatus"], "cancel", "{events:?}");
    let seen = inputs(&seen);
    let ringing = seen.iter().find(|i| i["type"] == "in").unwrap();
    assert_eq!(ringing["point"], "process_call_event_params");
    assert_eq!(ringing["call_stage"], "conversation_requested");
    assert_eq!(ringing["call_full"], Value::Null);
    assert_eq!(ringing["callExternalId"], "lab-1795264721.70");
    assert!(ringing["codes"].is_array(), "{ringing}");
    let ended = seen.iter().find(|i| i["type"] == "hangup").unwrap();
    assert_eq!(ended["call_stage"], "call_ended");
    assert_eq!(ended["hangupStatus"], "no answered");
}
