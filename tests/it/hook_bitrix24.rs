//! Bitrix24's own customisation points end to end: PBX webhooks in, a real hook (a python3
//! child process) at the point, what the strict fake portal ends up holding out.

use std::path::{Path, PathBuf};
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use pbxgate::config::{Config, HookConfig};
use serde_json::{json, Value};

use crate::bitrix24::{b24_app, B24};
use crate::support::fake_bitrix24::FakeCall;

const WAIT: Duration = Duration::from_secs(15);

/// Every point Bitrix24's adapter calls.
const B24_POINTS: &[&str] = &[
    "process_registration_params",
    "customize_show_call_card",
    "process_final_params",
    "customize_attach_record_url",
    "customize_activity",
    "customize_entity",
];

fn hook(c: &mut Config, point: &str, argv: Vec<String>) {
    c.hooks.0.insert(
        point.into(),
        HookConfig {
            command: argv,
            url: String::new(),
            timeout: Duration::from_secs(5),
        },
    );
}

/// A hook for `point` that appends each input to `<point>.jsonl` (one JSON line each) and
/// answers `data`, a Python expression over `call` (the input). Returns (argv, inputs file).
fn script(dir: &Path, point: &str, data: &str) -> (Vec<String>, PathBuf) {
    let inputs = dir.join(format!("{point}.jsonl"));
    let path = dir.join(format!("{point}.py"));
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
    (vec!["python3".into(), path.display().to_string()], inputs)
}

fn inputs(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A number the portal got as a number or (through a batch) as a string.
fn int(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// An answered inbound call `id` from `phone`: 101 (and 102 when `both`) ring, 101 talks 30 s.
fn answered(id: &str, phone: &str, both: bool, record: Option<&Path>) -> Value {
    let mut events = vec![
        json!({"call_id": id, "event": "start", "direction": "in", "phone": phone, "did": "+74951234567", "at": "2026-11-21T10:00:00Z"}),
        json!({"call_id": id, "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"}),
    ];
    if both {
        events.push(json!({"call_id": id, "event": "ringing", "extension": "102", "at": "2026-11-21T10:00:01Z"}));
    }
    events.push(
        json!({"call_id": id, "event": "answer", "extension": "101", "at": "2026-11-21T10:00:03Z"}),
    );
    let mut hangup = json!({"call_id": id, "event": "hangup", "at": "2026-11-21T10:00:33Z"});
    if let Some(r) = record {
        hangup["record"] = json!(r.to_string_lossy());
    }
    events.push(hangup);
    Value::Array(events)
}

/// A short wav file `name` in `dir`; its bytes.
fn wav(dir: &Path, name: &str) -> Vec<u8> {
    let mut bytes = b"RIFF\x24\x10\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x40\x1f\x00\x00\x80\x3e\x00\x00\x02\x00\x10\x00data\x00\x10\x00\x00".to_vec();
    bytes.extend(std::iter::repeat_n(7u8, 4096));
    std::fs::write(dir.join(name), &bytes).unwrap();
    bytes
}

/// A temporary recordings directory (canonical, as the records module wants it).
fn records_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    (tmp, dir)
}

/// The call for our externalId once finished with `n` recordings attached.
async fn recorded(b: &B24, ext_id: &str, n: usize) -> FakeCall {
    b.finished_call(&format!("{ext_id} recorded"), |c| {
        c.external_call_id.as_deref() == Some(ext_id) && c.records.len() >= n
    })
    .await
}

/// Waits until `point` counted `outcome` at least `n` times; `/ready`'s hooks.
async fn counted(b: &B24, point: &str, outcome: &str, n: u64) -> Value {
    let mut ready = b.app.ready().await;
    for _ in 0..200 {
        if ready["hooks"][point][outcome].as_u64().unwrap_or(0) >= n {
            return ready["hooks"].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        ready = b.app.ready().await;
    }
    panic!("{point} did not count {n} {outcome}: {}", ready["hooks"]);
}

// ---- process_registration_params ------------------------------------------------------------

#[tokio::test]
async fn process_registration_params_changes_crm_create_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let (argv, seen) = script(
        dir.path(),
        "process_registration_params",
        "{'CRM_CREATE': 0, 'LINE_NUMBER': '+74950000001', 'CALL_START_DATE': 'yesterday'}",
    );
    let b = b24_app(|c| hook(c, "process_registration_params", argv)).await;
    b.events(answered("g1", "+79991234567", false, None)).await;
    let call = b.finished_ext("lab-g1").await;
    assert!(!call.crm_create, "{}", call.registered);
    assert_eq!(int(&call.registered["CRM_CREATE"]), Some(0));
    assert_eq!(call.line.as_deref(), Some("+74950000001"));
    // A date the portal would refuse is dropped; nothing else changed, and no lead was
    // created for the unknown number.
    assert!(call.start.ends_with("+03:00"), "{}", call.start);
    assert!(!call.start_offset_missing);
    assert_eq!((call.user_id, call.kind), (11, 2));
    assert_eq!(call.phone, "+79991234567");
    assert!(call.show);
    assert!(call.crm_entity.is_none(), "{:?}", call.crm_entity);
    assert!(b.portal.leads().is_empty(), "{:?}", b.portal.leads());
    let seen = inputs(&seen);
    assert_eq!(seen.len(), 1, "one registration: {seen:?}");
    let input = &seen[0];
    assert_eq!(input["point"], "process_registration_params");
    assert_eq!(input["call_stage"], "conversation_requested");
    assert_eq!(input["CRM_CREATE"], 1);
    assert_eq!(input["LINE_NUMBER"], "+74951234567");
    assert_eq!(input["USER_ID"], 11);
    assert_eq!(input["TYPE"], 2);
    assert_eq!(input["SHOW"], 1);
    assert_eq!(input["PHONE_NUMBER"], "+79991234567");
    assert_eq!(input["EXTERNAL_CALL_ID"], "lab-g1");
    assert!(input["call_full"].is_object(), "{input}");
    let hooks = counted(&b, "process_registration_params", "changed", 1).await;
    assert_eq!(hooks["process_registration_params"]["failed"], 0, "{hooks}");
}

#[tokio::test]
async fn process_registration_params_may_not_change_the_external_call_id() {
    let dir = tempfile::tempdir().unwrap();
    let (argv, seen) = script(
        dir.path(),
        "process_registration_params",
        "{'EXTERNAL_CALL_ID': 'other', 'CRM_CREATE': 0}",
    );
    let b = b24_app(|c| hook(c, "process_registration_params", argv)).await;
    b.events(answered("g2", "+79991234567", false, None)).await;
    // The whole answer is refused: the call is registered with the defaults.
    let call = b.finished_ext("lab-g2").await;
    assert_eq!(b.portal.calls().len(), 1);
    assert!(call.crm_create, "{}", call.registered);
    assert_eq!(call.line.as_deref(), Some("+74951234567"));
    assert_eq!(inputs(&seen).len(), 1);
    let hooks = counted(&b, "process_registration_params", "failed", 1).await;
    assert_eq!(
        hooks["process_registration_params"]["changed"], 0,
        "{hooks}"
    );
}

#[tokio::test]
async fn process_registration_params_of_a_call_registered_from_the_history_is_at_call_ended() {
    let dir = tempfile::tempdir().unwrap();
    let (argv, seen) = script(
        dir.path(),
        "process_registration_params",
        "{'LINE_NUMBER': '+74950000002'}",
    );
    let b = b24_app(|c| hook(c, "process_registration_params", argv)).await;
    b.portal.set_outage(true);
    b.events(answered("g3", "+79991234567", false, None)).await;
    tokio::time::timeout(
        WAIT,
        b.app.state.outbox.wait_until(|s| s.failed_attempts > 0),
    )
    .await
    .expect("a failed delivery");
    b.portal.set_outage(false);
    let call = b.finished_ext("lab-g3").await;
    assert_eq!(call.line.as_deref(), Some("+74950000002"));
    assert!(!call.show);
    // The live attempt (refused by the outage) and the one from the history.
    let seen = inputs(&seen);
    let late = seen.last().unwrap();
    assert_eq!(late["call_stage"], "call_ended", "{seen:?}");
    assert_eq!(late["SHOW"], 0);
    assert_eq!(seen[0]["call_stage"], "conversation_requested");
}

// ---- customize_show_call_card ---------------------------------------------------------------

#[tokio::test]
async fn customize_show_call_card_gives_user_12s_card_to_user_13() {
    let dir = tempfile::tempdir().unwrap();
    let (argv, seen) = script(
        dir.path(),
        "customize_show_call_card",
        "({'USER_ID': 13} if call['USER_ID'] == 12 else {})",
    );
    let b = b24_app(|c| hook(c, "customize_show_call_card", argv)).await;
    b.events(answered("s1", "+79991234567", true, None)).await;
    let call = b.finished_ext("lab-s1").await;
    assert!(call.shown_ever.contains(&13), "{:?}", call.card_log);
    assert!(call.shown_ever.contains(&11), "{:?}", call.card_log);
    assert!(!call.shown_ever.contains(&12), "{:?}", call.card_log);
    let fin = call.finished.as_ref().unwrap();
    assert_eq!(int(&fin["USER_ID"]), Some(11));
    b.queue_settled().await;
    assert!(b.portal.open_cards().is_empty(), "{:?}", call.card_log);
    let seen = inputs(&seen);
    let asked = seen
        .iter()
        .find(|i| i["USER_ID"] == 12)
        .expect("asked for 12");
    assert_eq!(asked["point"], "customize_show_call_card");
    assert_eq!(asked["CALL_ID"], call.call_id.as_str());
    assert_eq!(asked["call_stage"], "conversation_requested");
    assert!(asked["call_full"].is_object(), "{asked}");
}

/// The card of the user the call is registered for is a card too: the hook decides who sees
/// it like any other.
#[tokio::test]
async fn customize_show_call_card_decides_the_first_card_too() {
    let dir = tempfile::tempdir().unwrap();
    let (argv, seen) = script(
        dir.path(),
        "customize_show_call_card",
        "({'USER_ID': 13} if call['USER_ID'] == 11 else {})",
    );
    let b = b24_app(|c| hook(c, "customize_show_call_card", argv)).await;
    b.events(json!([
        {"call_id": "s2", "event": "start", "direction": "in", "phone": "+79991234567", "at": "2026-11-21T10:00:00Z"},
        {"call_id": "s2", "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"},
        {"call_id": "s2", "event": "hangup", "result": "no_answer", "at": "2026-11-21T10:00:09Z"}
    ]))
    .await;
    let call = b.finished_ext("lab-s2").await;
    assert!(
        inputs(&seen).iter().any(|i| i["USER_ID"] == 11),
        "the hook was not asked about 11's card; card log {:?}",
        call.card_log
    );
    assert!(call.shown_ever.contains(&13), "{:?}", call.card_log);
    assert!(!call.shown_ever.contains(&11), "{:?}", call.card_log);
}

// ---- process_final_params -------------------------------------------------------------------

#[tokio::test]
async fn process_final_params_changes_the_status_and_the_duration() {
    let dir = tempfile::tempdir().unwrap();
    let (argv, seen) = script(
        dir.path(),
        "process_final_params",
        "{'STATUS_CODE': '603', 'DURATION': call['DURATION'] + 12, 'USER_ID': 13}",
    );
    let b = b24_app(|c| hook(c, "process_final_params", argv)).await;
    b.events(answered("f1", "+79991234567", false, None)).await;
    let call = b.finished_ext("lab-f1").await;
    let fin = call.finished.as_ref().unwrap();
    assert_eq!(fin["STATUS_CODE"], "603", "{fin}");
    assert_eq!(int(&fin["DURATION"]), Some(42), "{fin}");
    assert_eq!(int(&fin["USER_ID"]), Some(13), "{fin}");
    assert_eq!(call.finished_by, Some(13));
    assert_eq!(call.statistic.as_ref().unwrap()["CALL_FAILED_CODE"], "603");
    // The talker's card (11's) was closed with the finish, which now names 13.
    b.queue_settled().await;
    assert!(b.portal.open_cards().is_empty(), "{:?}", call.card_log);
    let seen = inputs(&seen);
    assert_eq!(seen.len(), 1);
    let input = &seen[0];
    assert_eq!(input["point"], "process_final_params");
    assert_eq!(input["call_stage"], "call_ended");
    assert_eq!(input["CALL_ID"], call.call_id.as_str());
    assert_eq!(
        (&input["USER_ID"], &input["DURATION"], &input["STATUS_CODE"]),
        (&json!(11), &json!(30), &json!("200"))
    );
    assert!(input["call_full"].is_object(), "{input}");
}

#[tokio::test]
async fn process_final_params_values_the_portal_would_refuse_are_dropped_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    // Each of the right JSON type, so the hook's answer is taken; three are out of range.
    let (argv, _) = script(
        dir.path(),
        "process_final_params",
        "{'STATUS_CODE': '603', 'USER_ID': 0, 'DURATION': -5, 'ADD_TO_CHAT': 7}",
    );
    let b = b24_app(|c| hook(c, "process_final_params", argv)).await;
    b.events(answered("f2", "+79991234567", false, None)).await;
    let call = b.finished_ext("lab-f2").await;
    let fin = call.finished.as_ref().unwrap();
    assert_eq!(fin["STATUS_CODE"], "603", "{fin}");
    assert_eq!(int(&fin["USER_ID"]), Some(11), "{fin}");
    assert_eq!(int(&fin["DURATION"]), Some(30), "{fin}");
    assert!(fin.get("ADD_TO_CHAT").is_none(), "{fin}");
    assert_eq!(call.finished_by, Some(11));
    assert_eq!(call.finish_count, 1);
}

#[tokio::test]
async fn process_final_params_may_not_change_the_call_id() {
    let dir = tempfile::tempdir().unwrap();
    let (argv, _) = script(
        dir.path(),
        "process_final_params",
        "{'CALL_ID': 'externalCall.other', 'STATUS_CODE': '603'}",
    );
    let b = b24_app(|c| hook(c, "process_final_params", argv)).await;
    b.events(answered("f3", "+79991234567", false, None)).await;
    let call = b.finished_ext("lab-f3").await;
    let fin = call.finished.as_ref().unwrap();
    assert_eq!(fin["CALL_ID"], call.call_id.as_str());
    assert_eq!(
        fin["STATUS_CODE"], "200",
        "the whole answer is refused: {fin}"
    );
    let hooks = counted(&b, "process_final_params", "failed", 1).await;
    assert_eq!(hooks["process_final_params"]["changed"], 0, "{hooks}");
}

#[tokio::test]
async fn the_example_final_hook_finishes_a_too_short_answer_as_missed() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hooks/b24_final.py");
    let argv = vec![
        "python3".to_string(),
        script.display().to_string(),
        "5".into(),
    ];
    let b = b24_app(|c| hook(c, "process_final_params", argv)).await;
    b.events(json!([
        {"call_id": "e1", "event": "start", "direction": "in", "phone": "+79991234567", "at": "2026-11-21T10:00:00Z"},
        {"call_id": "e1", "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"},
        {"call_id": "e1", "event": "answer", "extension": "101", "at": "2026-11-21T10:00:03Z"},
        {"call_id": "e1", "event": "hangup", "at": "2026-11-21T10:00:05Z"}
    ]))
    .await;
    b.events(answered("e2", "+79991234568", false, None)).await;
    let short = b.finished_ext("lab-e1").await;
    let fin = short.finished.as_ref().unwrap();
    assert_eq!(
        (fin["STATUS_CODE"].as_str(), int(&fin["DURATION"])),
        (Some("304"), Some(0)),
        "{fin}"
    );
    let long = b.finished_ext("lab-e2").await;
    let fin = long.finished.as_ref().unwrap();
    assert_eq!(
        (fin["STATUS_CODE"].as_str(), int(&fin["DURATION"])),
        (Some("200"), Some(30)),
        "{fin}"
    );
}

// ---- customize_activity / customize_entity --------------------------------------------------

#[tokio::test]
async fn customize_activity_and_customize_entity_update_the_activity_the_lead_and_the_contact() {
    let dir = tempfile::tempdir().unwrap();
    let (activity_argv, activity_seen) = script(
        dir.path(),
        "customize_activity",
        "{'SUBJECT': 'VIP call ' + str(call['activity']['id']), 'PRIORITY': 3, 'bad field': 'x'}",
    );
    let (entity_argv, entity_seen) = script(
        dir.path(),
        "customize_entity",
        "({'STATUS_ID': 'IN_PROCESS'} if call['entity']['type'] == 'lead' else {'COMMENTS': 'called'})",
    );
    let b = b24_app(|c| {
        hook(c, "customize_activity", activity_argv);
        hook(c, "customize_entity", entity_argv);
    })
    .await;
    let contact = b.portal.add_contact("+79992220002", 12);
    // An unknown number (the portal creates a lead) and a contact's.
    b.events(answered("a1", "+79991110001", false, None)).await;
    let lead_call = b.finished_ext("lab-a1").await;
    b.events(answered("a2", "+79992220002", false, None)).await;
    let contact_call = b.finished_ext("lab-a2").await;
    b.portal
        .wait_for(WAIT, "the updates", |p| {
            (p.requests_of("crm.activity.update").len() >= 2
                && !p.requests_of("crm.lead.update").is_empty()
                && !p.requests_of("crm.contact.update").is_empty())
            .then_some(())
        })
        .await;
    b.queue_settled().await;

    let lead = lead_call.created_lead.expect("a lead was created");
    let activities: Vec<i64> = [&lead_call, &contact_call]
        .iter()
        .map(|c| int(&c.statistic.as_ref().unwrap()["CRM_ACTIVITY_ID"]).unwrap())
        .collect();
    let updates = b.portal.requests_of("crm.activity.update");
    assert_eq!(updates.len(), 2, "{updates:?}");
    for activity in &activities {
        let update = updates
            .iter()
            .find(|u| int(&u.params["id"]) == Some(*activity))
            .unwrap_or_else(|| panic!("no update of activity {activity}: {updates:?}"));
        let p = &update.params;
        assert_eq!(
            p["fields"]["SUBJECT"],
            format!("VIP call {activity}"),
            "{p}"
        );
        assert_eq!(int(&p["fields"]["PRIORITY"]), Some(3), "{p}");
        assert!(p["fields"].get("bad field").is_none(), "{p}");
    }
    let leads = b.portal.requests_of("crm.lead.update");
    assert_eq!(leads.len(), 1, "{leads:?}");
    assert_eq!(int(&leads[0].params["id"]), Some(lead));
    assert_eq!(
        leads[0].params["fields"],
        json!({"STATUS_ID": "IN_PROCESS"})
    );
    let contacts = b.portal.requests_of("crm.contact.update");
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    assert_eq!(int(&contacts[0].params["id"]), Some(contact));
    assert_eq!(contacts[0].params["fields"], json!({"COMMENTS": "called"}));
    assert!(b.portal.requests_of("crm.company.update").is_empty());

    let seen = inputs(&activity_seen);
    assert_eq!(seen.len(), 2);
    let first = seen
        .iter()
        .find(|i| i["activity"]["raw"]["CALL_ID"] == lead_call.call_id.as_str())
        .unwrap_or_else(|| panic!("no input for the lead's call: {seen:?}"));
    assert_eq!(first["point"], "customize_activity");
    assert_eq!(first["call_stage"], "call_ended");
    assert_eq!(first["activity"]["type"], "activity");
    assert_eq!(int(&first["activity"]["id"]), Some(activities[0]));
    assert!(first["call_full"].is_object());
    let seen = inputs(&entity_seen);
    let mut entities: Vec<(String, Option<i64>)> = seen
        .iter()
        .map(|i| {
            let kind = i["entity"]["type"].as_str().unwrap_or("").to_string();
            (kind, int(&i["entity"]["id"]))
        })
        .collect();
    entities.sort();
    assert_eq!(
        entities,
        vec![
            ("contact".into(), Some(contact)),
            ("lead".into(), Some(lead))
        ]
    );
    // Whatever the portal answered the updates, the calls stay delivered.
    let status = b.app.state.outbox.status();
    assert_eq!(status.dead, 0);
    assert_eq!(lead_call.finish_count + contact_call.finish_count, 2);
}

// ---- customize_attach_record_url ------------------------------------------------------------

/// A local archive serving `bytes` as mp3 at any `/archive/...` path; its origin.
fn archive(bytes: Vec<u8>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let server = HttpServer::new(move || {
        let bytes = bytes.clone();
        App::new().route(
            "/archive/{name}",
            web::get().to(move || {
                let bytes = bytes.clone();
                async move { HttpResponse::Ok().content_type("audio/mpeg").body(bytes) }
            }),
        )
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    origin
}

#[tokio::test]
async fn customize_attach_record_url_attaches_the_hooks_link_and_name_if_valid() {
    let (_tmp, rec_dir) = records_dir();
    wav(&rec_dir, "r2.wav");
    let own = wav(&rec_dir, "r3.wav");
    let archived = b"ID3\x03\x00\x00\x00\x00\x00\x00archived".to_vec();
    let origin = archive(archived.clone());
    let hook_dir = tempfile::tempdir().unwrap();
    // r2: a link of the archive's; r3: a link and a name the portal would refuse.
    let (argv, seen) = script(
        hook_dir.path(),
        "customize_attach_record_url",
        &format!(
            "({{'RECORD_URL': '{origin}/archive/r2-vip.mp3', 'FILENAME': 'r2-vip.mp3'}} \
             if call['FILENAME'] == 'r2.wav' else \
             {{'RECORD_URL': 'ftp://example.com/r3.wav', 'FILENAME': '../r3.ogg'}})"
        ),
    );
    let dir = rec_dir.clone();
    let b = b24_app(move |c| {
        c.records.dir = dir;
        c.history.record_settle = Duration::ZERO;
        hook(c, "customize_attach_record_url", argv);
    })
    .await;
    b.events(answered(
        "r2",
        "+79991234567",
        false,
        Some(&rec_dir.join("r2.wav")),
    ))
    .await;
    b.events(answered(
        "r3",
        "+79991234568",
        false,
        Some(&rec_dir.join("r3.wav")),
    ))
    .await;

    let call = recorded(&b, "lab-r2", 1).await;
    let rec = &call.records[0];
    assert_eq!(
        rec["RECORD_URL"],
        format!("{origin}/archive/r2-vip.mp3"),
        "{rec}"
    );
    assert_eq!(rec["FILENAME"], "r2-vip.mp3", "{rec}");
    assert_eq!(rec["fetched_status"], 200, "{rec}");
    assert_eq!(rec["fetched_bytes"], archived.len(), "{rec}");
    assert_eq!(call.records.len(), 1);

    let call = recorded(&b, "lab-r3", 1).await;
    let rec = &call.records[0];
    assert!(
        rec["RECORD_URL"].as_str().unwrap().starts_with(&b.app.base),
        "{rec}"
    );
    assert_eq!(rec["FILENAME"], "r3.wav", "{rec}");
    assert_eq!(rec["fetched_status"], 200, "{rec}");
    assert_eq!(rec["fetched_bytes"], own.len(), "{rec}");

    let seen = inputs(&seen);
    let input = seen.iter().find(|i| i["FILENAME"] == "r2.wav").unwrap();
    assert_eq!(input["point"], "customize_attach_record_url");
    assert_eq!(input["call_stage"], "call_ended");
    assert!(
        input["RECORD_URL"]
            .as_str()
            .unwrap()
            .starts_with(&b.app.base),
        "{input}"
    );
    assert_eq!(input["CALL_ID"], call_id_of(&b, "lab-r2").as_str());
}

fn call_id_of(b: &B24, ext_id: &str) -> String {
    b.portal
        .calls()
        .into_iter()
        .find(|c| c.external_call_id.as_deref() == Some(ext_id))
        .unwrap()
        .call_id
}

// ---- failing hooks --------------------------------------------------------------------------

/// What a call leaves at the portal, without what differs from one run to the next (the
/// portal's CALL_ID, the registration time, the service's address, the link's token) and
/// register's `SHOW`: with `customize_show_call_card` configured every card, the first too,
/// is its own request (the card log shows the same cards either way).
fn footprint(b: &B24, call: &FakeCall) -> Value {
    let mut registered = call.registered.clone();
    let fields = registered.as_object_mut().unwrap();
    fields.remove("CALL_START_DATE");
    fields.remove("SHOW");
    let mut finished = call.finished.clone().unwrap();
    finished.as_object_mut().unwrap().remove("CALL_ID");
    let records: Vec<Value> = call
        .records
        .iter()
        .map(|r| {
            let url = r["RECORD_URL"].as_str().unwrap_or("");
            // Our link: `/records/<token>.<ext>`, the token signed with this run's key.
            let path = url.strip_prefix(&b.app.base).unwrap_or(url);
            let path = path.split('?').next().unwrap_or("");
            let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
            let ext = path.rsplit_once('.').map_or("", |(_, e)| e);
            json!({
                "link": format!("{dir}/*.{ext}"),
                "FILENAME": r["FILENAME"],
                "fetched_status": r["fetched_status"],
                "fetched_bytes": r["fetched_bytes"],
            })
        })
        .collect();
    let updates: Vec<String> = b
        .portal
        .requests()
        .into_iter()
        .filter(|r| r.method.ends_with(".update") && r.method.starts_with("crm."))
        .map(|r| r.method)
        .collect();
    json!({
        "registered": registered,
        "finished": finished,
        "card_log": call.card_log.iter().map(|(what, u)| format!("{what} {u}")).collect::<Vec<_>>(),
        "shown_ever": call.shown_ever,
        "records": records,
        "entity": call.crm_entity.as_ref().map(|(t, _)| t.clone()),
        "updates": updates,
        "calls": b.portal.calls().len(),
    })
}

/// One answered call ringing 101 and 102 with a recording, for a new number (a lead is
/// created), through an app with `hooks` at the Bitrix24 points.
async fn run_call(rec_dir: &Path, hooks: Option<Vec<String>>) -> (B24, Value) {
    let dir = rec_dir.to_path_buf();
    let b = b24_app(move |c| {
        c.records.dir = dir;
        c.history.record_settle = Duration::ZERO;
        if let Some(argv) = hooks {
            for p in B24_POINTS {
                hook(c, p, argv.clone());
            }
        }
    })
    .await;
    b.events(answered(
        "x1",
        "+79991234567",
        true,
        Some(&rec_dir.join("x1.wav")),
    ))
    .await;
    recorded(&b, "lab-x1", 1).await;
    b.queue_settled().await;
    let call = b
        .portal
        .calls()
        .into_iter()
        .find(|c| c.external_call_id.as_deref() == Some("lab-x1"))
        .unwrap();
    let print = footprint(&b, &call);
    (b, print)
}

#[tokio::test]
async fn a_crashing_hook_at_every_bitrix24_point_leaves_the_call_as_without_hooks() {
    let (_tmp, rec_dir) = records_dir();
    wav(&rec_dir, "x1.wav");
    let hook_dir = tempfile::tempdir().unwrap();
    let crash = hook_dir.path().join("crash.py");
    std::fs::write(
        &crash,
        "import sys\nsys.stdin.read()\nsys.stderr.write('boom')\nsys.exit(2)\n",
    )
    .unwrap();
    let argv = vec!["python3".to_string(), crash.display().to_string()];
    let (plain, without) = run_call(&rec_dir, None).await;
    plain.app.stop().await;
    let (b, with) = run_call(&rec_dir, Some(argv)).await;
    assert_eq!(with, without);
    // The call went through every point, and each counted its failure.
    for p in B24_POINTS {
        let hooks = counted(&b, p, "failed", 1).await;
        assert_eq!(hooks[p]["changed"], 0, "{p}: {hooks}");
    }
    // The footprint is a real call's.
    assert_eq!(with["shown_ever"], json!([11, 12]), "{with}");
    assert_eq!(with["entity"], "LEAD", "{with}");
    assert_eq!(with["records"][0]["FILENAME"], "x1.wav", "{with}");
    assert_eq!(with["records"][0]["link"], "/records/*.wav", "{with}");
    assert_eq!(with["finished"]["STATUS_CODE"], "200", "{with}");
    assert_eq!(with["updates"], json!([]), "{with}");
}
