//! Who a call is credited to in the CRM, the line it used and its recording, end to end against
//! a CRM as strict as retailCRM: a record without `code` or `userId` is refused there, so pbxgate
//! must never send one.

use std::sync::Arc;
use std::time::Duration;

use pbxgate::base::secret::Secret;
use pbxgate::config::{Config, MissedOwner};
use pbxgate::outbox::{Drain, Outbox};
use serde_json::Value;

use crate::support::{call_record, capture_body, lab_app, FakeCrm, TestApp, T0};

const TOKEN: &str = "credit-token-0123456789";
const UPLOAD: &str = "/api/v5/telephony/calls/upload";

/// Waits until the CRM holds the call `id` (at most 15 s) and returns it as uploaded.
async fn uploaded(app: &TestApp, id: &str) -> Value {
    match app.crm.wait_for_call(id, Duration::from_secs(15)).await {
        Some(call) => call,
        None => panic!(
            "{id} never reached the CRM; outbox {:?}, dead {:?}",
            app.state.outbox.status(),
            app.state.outbox.store().dead(10).unwrap()
        ),
    }
}

async fn post_events(app: &TestApp, body: Value) {
    let r = app
        .http
        .post(app.url("/pbx/events"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

fn with_token(c: &mut Config) {
    c.pbx.token = Secret::new(TOKEN);
}

#[tokio::test]
async fn a_ring_group_nobody_answered_is_credited_to_the_first_phone_that_rang() {
    let app = lab_app(|_| {}).await;
    app.ami.send(&capture_body("09_inbound_missed"));
    let call = uploaded(&app, "lab-1795264721.70").await;
    assert_eq!(
        (&call["code"], &call["result"], &call["type"]),
        (
            &Value::from("101"),
            &Value::from("no answer"),
            &Value::from("in")
        ),
        "{call}"
    );
    assert_eq!(app.state.outbox.status().dead, 0);
    // Both phones had a pop-up: the hangup is for both.
    let hangup = app
        .crm
        .requests_to("/api/v5/telephony/call/event")
        .iter()
        .map(|r| r.form_json("event"))
        .find(|e| e["type"] == "hangup")
        .expect("a hangup event");
    assert_eq!(hangup["codes"], serde_json::json!(["101", "102"]));
}

#[tokio::test]
async fn a_missed_call_goes_to_the_manager_routing_chose_when_that_phone_rang() {
    let crm = FakeCrm::start().await;
    crm.set_manager("+491701234567", 2, "102");
    let app = TestApp::spawn_with(crm, |c| {
        c.crm.register_on_start = false;
        c.calls.inbound_contexts = vec!["from-trunk".into()];
        c.pbx.system_id = "lab".into();
        with_token(c);
    })
    .await;
    app.ami_connected().await;
    let r = app
        .http
        .get(app.url(&format!(
            "/pbx/route?phone=%2B491701234567&did=%2B4930111000&token={TOKEN}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "102");
    app.ami.send(&capture_body("09_inbound_missed"));
    let call = uploaded(&app, "lab-1795264721.70").await;
    assert_eq!(call["code"], "102", "{call}");
}

#[tokio::test]
async fn missed_owner_last_rung_credits_the_last_phone_that_rang() {
    let app = lab_app(|c| c.calls.missed_owner = MissedOwner::LastRung).await;
    app.ami.send(&capture_body("09_inbound_missed"));
    let call = uploaded(&app, "lab-1795264721.70").await;
    assert_eq!(call["code"], "102", "{call}");
}

#[tokio::test]
async fn webhook_calls_follow_the_same_rule_as_ami_calls() {
    let app = lab_app(with_token).await;
    post_events(
        &app,
        serde_json::json!([
            {"call_id": "w1", "event": "start", "direction": "in", "phone": "+491701234567", "did": "+4930111000"},
            {"call_id": "w1", "event": "ringing", "extension": "101"},
            {"call_id": "w1", "event": "ringing", "extension": "102"},
            {"call_id": "w1", "event": "hangup"}
        ]),
    )
    .await;
    let call = uploaded(&app, "lab-w1").await;
    assert_eq!(
        (&call["code"], &call["result"]),
        (&Value::from("101"), &Value::from("no answer")),
        "{call}"
    );
}

#[tokio::test]
async fn the_extension_on_start_places_an_outbound_call_and_is_the_first_to_ring_inbound() {
    let app = lab_app(with_token).await;
    post_events(
        &app,
        serde_json::json!([
            {"call_id": "o1", "event": "start", "direction": "out", "phone": "+4930123456", "extension": "102"},
            {"call_id": "o1", "event": "hangup", "result": "busy"},
            {"call_id": "i1", "event": "start", "direction": "in", "phone": "+491701234567", "extension": "103"},
            {"call_id": "i1", "event": "hangup"}
        ]),
    )
    .await;
    let out = uploaded(&app, "lab-o1").await;
    assert_eq!(
        (&out["type"], &out["code"], &out["result"]),
        (
            &Value::from("out"),
            &Value::from("102"),
            &Value::from("busy")
        ),
        "{out}"
    );
    let inbound = uploaded(&app, "lab-i1").await;
    assert_eq!(inbound["code"], "103", "{inbound}");
    // The outbound start announced the call to the extension placing it.
    let live: Vec<Value> = app
        .crm
        .wait_for_requests("/api/v5/telephony/call/event", 2)
        .await
        .iter()
        .map(|r| r.form_json("event"))
        .collect();
    assert!(
        live.iter()
            .any(|e| e["type"] == "out" && e["codes"] == serde_json::json!(["102"])),
        "{live:?}"
    );
}

#[tokio::test]
async fn calls_nobody_took_go_to_the_unassigned_code_or_user() {
    let app = lab_app(|c| {
        with_token(c);
        c.calls.unassigned_code = "100".into();
    })
    .await;
    post_events(
        &app,
        serde_json::json!([
            {"call_id": "ivr1", "event": "start", "direction": "in", "phone": "+491701234567"},
            {"call_id": "ivr1", "event": "hangup"}
        ]),
    )
    .await;
    let call = uploaded(&app, "lab-ivr1").await;
    assert_eq!(call["code"], "100", "{call}");

    let app = lab_app(|c| {
        with_token(c);
        c.calls.unassigned_code = "user:7".into();
    })
    .await;
    post_events(
        &app,
        serde_json::json!([
            {"call_id": "ivr2", "event": "start", "direction": "in", "phone": "+491701234567"},
            {"call_id": "ivr2", "event": "hangup"}
        ]),
    )
    .await;
    let call = uploaded(&app, "lab-ivr2").await;
    assert_eq!((call.get("code"), &call["userId"]), (None, &Value::from(7)));
}

#[tokio::test]
async fn a_call_the_crm_must_refuse_is_held_and_sent_once_the_configuration_allows_it() {
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.history.immediate = false;
        c.history.interval = Duration::from_secs(3600);
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), app.state.outbox.wait_changes(1))
        .await
        .expect("startup drain");
    let outbox = &app.state.outbox;
    let mut nobody = call_record("pbx-ivr", T0);
    nobody.code = None;
    nobody.answer = None;
    nobody.rings.clear();
    outbox.enqueue(nobody).await.unwrap();
    outbox.enqueue(call_record("pbx-ok", T0)).await.unwrap();
    assert_eq!(outbox.drain().await, Drain::Done);
    // Only the valid call was sent; the other is held with pbxgate's own reason.
    let sent: Vec<Value> = app
        .crm
        .requests_to(UPLOAD)
        .iter()
        .flat_map(|r| r.form_json("calls").as_array().unwrap().clone())
        .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["externalId"], "pbx-ok");
    let dead = outbox.store().dead(10).unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].held, "{dead:?}");
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("calls.unassigned_code"),
        "{dead:?}"
    );

    // The service again with the same configuration: still held, nothing sent.
    let store = app.state.store.clone();
    let reopen = |config: Config| {
        Outbox::new(
            pbxgate::outbox::store::OutboxStore::of(&store).unwrap(),
            store.clone(),
            app.state.crm.clone(),
            Arc::new(config),
        )
    };
    let same = reopen((*app.state.config).clone());
    assert_eq!(same.revive_changed().await, 0);
    // ...and with `calls.unassigned_code` set: tried again, delivered.
    let mut fixed = (*app.state.config).clone();
    fixed.calls.unassigned_code = "100".into();
    let fixed = reopen(fixed);
    assert_eq!(fixed.revive_changed().await, 1);
    assert_eq!(fixed.drain().await, Drain::Done);
    assert_eq!(app.crm.calls()["pbx-ivr"]["code"], "100");
    assert!(fixed.store().dead(10).unwrap().is_empty());
}

/// A PCM WAV (mono 8 kHz) with `data_len` bytes of sound; 0 is what MixMonitor leaves when the
/// call never connected.
fn wav(data_len: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&(36 + data_len).to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&8000u32.to_le_bytes());
    h.extend_from_slice(&16000u32.to_le_bytes());
    h.extend_from_slice(&2u16.to_le_bytes());
    h.extend_from_slice(&16u16.to_le_bytes());
    h.extend_from_slice(b"data");
    h.extend_from_slice(&data_len.to_le_bytes());
    h.extend((0..data_len).map(|i| (i % 251) as u8));
    h
}

#[tokio::test]
async fn only_answered_calls_whose_file_holds_sound_get_a_recording_link() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let records_dir = dir.clone();
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.history.immediate = false;
        c.history.interval = Duration::from_secs(3600);
        c.history.record_settle = Duration::ZERO;
        c.records.dir = records_dir;
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), app.state.outbox.wait_changes(1))
        .await
        .expect("startup drain");
    let sound = dir.join("sound.wav");
    let header_only = dir.join("empty.wav");
    std::fs::write(&sound, wav(16_000)).unwrap();
    std::fs::write(&header_only, wav(0)).unwrap();
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();

    let mut answered = call_record("pbx-talk", T0);
    answered.recordings = vec![path(&sound)];
    let mut busy = call_record("pbx-busy", T0);
    busy.direction = pbxgate::calls::Direction::Out;
    busy.answer = None;
    busy.talk_seconds = 0;
    busy.outcome = pbxgate::calls::Outcome::Busy;
    busy.recordings = vec![path(&sound)];
    let mut silent = call_record("pbx-silent", T0);
    silent.recordings = vec![path(&header_only)];
    for r in [answered, busy, silent] {
        app.state.outbox.enqueue(r).await.unwrap();
    }
    assert_eq!(app.state.outbox.drain().await, Drain::Done);
    let calls = app.crm.calls();
    let url = calls["pbx-talk"]["recordUrl"].as_str().expect("linked");
    assert!(url.starts_with(&app.url("/records/")), "{url}");
    assert_eq!(calls["pbx-busy"].get("recordUrl"), None, "{calls:?}");
    assert_eq!(calls["pbx-silent"].get("recordUrl"), None, "{calls:?}");
}

#[tokio::test]
async fn an_outbound_call_names_the_company_line_never_the_customers_number() {
    // Click-to-call from the lab: the customer leg presents extension 101, no company line.
    let app = lab_app(|_| {}).await;
    app.ami.send(&capture_body("02_originate_outbound"));
    let call = uploaded(&app, "lab-1795264459.0").await;
    assert_eq!(
        (&call["type"], &call["phone"]),
        (&Value::from("out"), &Value::from("+4930123456"))
    );
    assert_eq!(call.get("externalPhone"), None, "{call}");

    // With `calls.outbound_line` for this trunk, that is the line.
    let app = lab_app(|c| {
        c.calls.outbound_line = pbxgate::config::OutboundLine::PerTrunk(
            [
                ("other".to_string(), "+4930999999".to_string()),
                ("*".to_string(), "+4930111000".to_string()),
            ]
            .into(),
        );
    })
    .await;
    app.ami.send(&capture_body("02_originate_outbound"));
    let call = uploaded(&app, "lab-1795264459.0").await;
    assert_eq!(call["externalPhone"], "+4930111000", "{call}");
}

#[tokio::test]
async fn the_readmes_webhook_example_produces_a_call_in_the_crm() {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("### PBX webhooks")
        .nth(1)
        .expect("the webhook section");
    let body = section
        .split("-d '")
        .nth(1)
        .and_then(|s| s.split("' \\").next())
        .expect("a curl -d body");
    let events: Value = serde_json::from_str(body).expect("the example is JSON");
    let app = lab_app(with_token).await;
    post_events(&app, events).await;
    let call = uploaded(&app, "lab-42").await;
    assert_eq!(
        (&call["type"], &call["code"], &call["result"]),
        (
            &Value::from("in"),
            &Value::from("101"),
            &Value::from("answered")
        ),
        "{call}"
    );
}

/// One capture replayed into a fresh service: every non-internal call of its truth reaches the
/// CRM with a manager and its direction, and nothing is dead.
async fn accepted_by_a_strict_crm(capture: &str, truth: &str) {
    let truth: Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{}/../shared/ami-captures/truth/{truth}.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
    .unwrap();
    let app = lab_app(|c| c.history.batch_window = Duration::from_millis(20)).await;
    app.ami.send(&capture_body(capture));
    for t in truth["calls"].as_array().unwrap() {
        if t["direction"] == "internal" {
            continue;
        }
        let id = format!("lab-{}", t["linkedid"].as_str().unwrap());
        let call = uploaded(&app, &id).await;
        assert!(
            call.get("code").is_some() || call.get("userId").is_some(),
            "{capture}: {call}"
        );
        assert_eq!(call["type"], t["direction"], "{capture}: {call}");
    }
    assert_eq!(app.state.outbox.status().dead, 0, "{capture}");
}

#[tokio::test]
async fn every_captured_call_is_accepted_by_a_strict_crm() {
    let scenarios = [
        ("02_originate_outbound", "02"),
        ("02b_outbound_busy_noanswer_failure", "02b"),
        ("03_inbound_from_trunk", "03"),
        ("04_queue_pause_and_call", "04"),
        ("06_live_channels_status_hangup", "06"),
        ("07_inbound_blind_transfer", "07"),
        ("09_inbound_missed", "09"),
        ("10_inbound_abandoned", "10"),
        ("14_click2call_manager_noanswer", "14"),
        ("14c_click2call_customer_busy", "14c"),
    ];
    for (capture, truth) in scenarios {
        accepted_by_a_strict_crm(capture, truth).await;
    }
}
