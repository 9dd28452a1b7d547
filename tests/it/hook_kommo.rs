//! Kommo's customisation points end to end, and the CRM-neutral ones as Kommo applies them:
//! PBX webhooks in, a real hook (a python3 child process) at the point, what the strict fake
//! account ends up holding out.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pbxgate::config::{Config, HookConfig, UnknownCaller};
use serde_json::{json, Value};

use crate::kommo::{kommo_app, K};
use crate::support::fake_kommo::{ANNA, BORIS, PIPELINE_ID, VERA};

const WAIT: Duration = Duration::from_secs(15);

/// Every point a call to Kommo can go through.
const KOMMO_POINTS: &[&str] = &[
    "process_call_params",
    "process_contact_creation_params",
    "process_lead_creation_params",
    "process_unsorted_params",
    "process_contact_update_params",
    "process_lead_update_params",
    "process_task_creation_params",
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

fn answered(id: &str, phone: &str, talk: u32) -> Value {
    json!([
        {"call_id": id, "event": "start", "direction": "in", "phone": phone, "did": "+74951234567", "at": "2026-11-21T10:00:00Z"},
        {"call_id": id, "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"},
        {"call_id": id, "event": "answer", "extension": "101", "at": "2026-11-21T10:00:03Z"},
        {"call_id": id, "event": "hangup", "at": format!("2026-11-21T10:00:{:02}Z", 3 + talk)}
    ])
}

fn missed(id: &str, phone: &str) -> Value {
    json!([
        {"call_id": id, "event": "start", "direction": "in", "phone": phone, "did": "+74951234567", "at": "2026-11-21T10:00:00Z"},
        {"call_id": id, "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"},
        {"call_id": id, "event": "hangup", "result": "no_answer", "at": "2026-11-21T10:00:09Z"}
    ])
}

/// Waits until `point` counted `outcome` at least `n` times; `/ready`'s hooks.
async fn counted(k: &K, point: &str, outcome: &str, n: u64) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ready = k.app.ready().await;
        if ready["hooks"][point][outcome].as_u64().unwrap_or(0) >= n {
            return ready["hooks"].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{point} did not count {n} {outcome}: {}",
            ready["hooks"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The body of the one accepted POST to `path` (its first item).
fn posted(k: &K, path: &str) -> Value {
    let sent: Vec<Value> = k
        .kommo
        .requests_to(path)
        .into_iter()
        .filter(|r| r.method == "POST" && r.status == 200)
        .map(|r| r.body)
        .collect();
    assert_eq!(sent.len(), 1, "{path}: {sent:?}");
    sent[0][0].clone()
}

/// The bodies of the PATCHes to `path`.
fn patches(k: &K, path: &str) -> Vec<Value> {
    k.kommo
        .requests_to(path)
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.body)
        .collect()
}

/// The one PHONE value of a contact as the fake shows it.
fn phone_of(contact: &Value) -> Option<&str> {
    contact["custom_fields_values"]
        .as_array()?
        .iter()
        .find(|f| f["field_code"] == "PHONE")?["values"][0]["value"]
        .as_str()
}

// ---- process_contact_creation_params --------------------------------------------------------

#[tokio::test]
async fn process_contact_creation_params_names_the_contact_and_its_manager() {
    let dir = tempfile::tempdir().unwrap();
    let (argv, seen) = script(
        dir.path(),
        "process_contact_creation_params",
        &format!(
            "{{'name': 'Caller ' + call['name'][len('Contact '):], 'responsible_user_id': {VERA}, \
             'Bad Field': 'x'}}"
        ),
    );
    let k = kommo_app(|c| {
        c.kommo.unknown_caller = UnknownCaller::Contact;
        hook(c, "process_contact_creation_params", argv);
    })
    .await;
    k.events(answered("c1", "+79990000002", 15)).await;
    let calls = k.logged("lab-c1").await;
    k.settled().await;
    let contacts = k.kommo.contacts();
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    let c = &contacts[0];
    assert_eq!(c["name"], "Caller +79990000002", "{c}");
    assert_eq!(c["responsible_user_id"], VERA, "{c}");
    assert_eq!(phone_of(c), Some("+79990000002"), "{c}");
    // The field Kommo could not have is not sent at all.
    let body = posted(&k, "/api/v4/contacts");
    assert!(body.get("Bad Field").is_none(), "{body}");
    // The call went to the new contact, still for the user who talked.
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["entity_id"], c["id"]);
    assert_eq!(calls[0]["responsible_user_id"], ANNA);

    let seen = inputs(&seen);
    assert_eq!(seen.len(), 1, "{seen:?}");
    let input = &seen[0];
    assert_eq!(input["point"], "process_contact_creation_params");
    assert_eq!(input["call_stage"], "call_ended");
    assert_eq!(input["name"], "Contact +79990000002");
    assert_eq!(input["responsible_user_id"], ANNA);
    assert_eq!(
        input["custom_fields_values"][0]["values"][0]["value"],
        "+79990000002"
    );
    assert!(input["call_full"].is_object(), "{input}");
    let hooks = counted(&k, "process_contact_creation_params", "changed", 1).await;
    assert_eq!(hooks["process_contact_creation_params"]["failed"], 0);
}

#[tokio::test]
async fn process_contact_creation_params_answer_with_a_null_is_refused_as_a_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (argv, seen) = script(
        dir.path(),
        "process_contact_creation_params",
        "{'name': 'Renamed', 'responsible_user_id': None}",
    );
    let k = kommo_app(|c| {
        c.kommo.unknown_caller = UnknownCaller::Contact;
        hook(c, "process_contact_creation_params", argv);
    })
    .await;
    k.events(answered("c2", "+79990000003", 15)).await;
    k.logged("lab-c2").await;
    k.settled().await;
    let contacts = k.kommo.contacts();
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    assert_eq!(contacts[0]["name"], "Contact +79990000003");
    assert_eq!(contacts[0]["responsible_user_id"], ANNA);
    assert_eq!(inputs(&seen).len(), 1);
    let hooks = counted(&k, "process_contact_creation_params", "failed", 1).await;
    assert_eq!(hooks["process_contact_creation_params"]["changed"], 0);
    assert_eq!(k.app.state.outbox.status().dead, 0);
}

/// Kommo refuses a `null` anywhere in a body, not only at its top: a hook's answer with one
/// inside a field must not cost the call.
#[tokio::test]
async fn process_contact_creation_params_answer_with_a_null_inside_a_field_is_refused_too() {
    let dir = tempfile::tempdir().unwrap();
    let (argv, _) = script(
        dir.path(),
        "process_contact_creation_params",
        "{'name': 'Renamed', 'custom_fields_values': [{'field_code': 'PHONE', \
         'values': [{'value': call['custom_fields_values'][0]['values'][0]['value'], \
         'enum_code': None}]}]}",
    );
    let k = kommo_app(|c| {
        c.kommo.unknown_caller = UnknownCaller::Contact;
        hook(c, "process_contact_creation_params", argv);
    })
    .await;
    k.events(answered("c3", "+79990000004", 15)).await;
    let calls = k
        .kommo
        .wait_for(WAIT, "the call logged or given up", |kk| {
            let calls: Vec<Value> = kk
                .calls()
                .into_iter()
                .filter(|c| c["uniq"] == "lab-c3")
                .collect();
            let dead = k.app.state.outbox.status().dead > 0;
            (!calls.is_empty() || dead).then_some(calls)
        })
        .await;
    k.settled().await;
    assert_eq!(
        k.app.state.outbox.status().dead,
        0,
        "the call was lost:\n{}",
        k.kommo.dump()
    );
    assert_eq!(calls.len(), 1);
    let contacts = k.kommo.contacts();
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    assert_eq!(contacts[0]["name"], "Contact +79990000004");
    let hooks = counted(&k, "process_contact_creation_params", "failed", 1).await;
    assert_eq!(hooks["process_contact_creation_params"]["changed"], 0);
}

#[tokio::test]
async fn the_example_contact_hook_names_the_contact_after_the_line_and_gives_it_its_manager() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hooks/kommo_contact_name.py");
    let argv = vec![
        "python3".to_string(),
        script.display().to_string(),
        "Caller {phone} ({line})".into(),
        format!("8 (495) 123-45-67={BORIS}"),
        format!("+74950000000={VERA}"),
    ];
    let k = kommo_app(|c| {
        c.kommo.unknown_caller = UnknownCaller::Contact;
        hook(c, "process_contact_creation_params", argv);
    })
    .await;
    k.events(answered("e1", "+79990000005", 15)).await;
    k.logged("lab-e1").await;
    k.settled().await;
    let contacts = k.kommo.contacts();
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    assert_eq!(contacts[0]["name"], "Caller +79990000005 (+74951234567)");
    assert_eq!(contacts[0]["responsible_user_id"], BORIS);
    let hooks = counted(&k, "process_contact_creation_params", "changed", 1).await;
    assert_eq!(hooks["process_contact_creation_params"]["failed"], 0);
}

// ---- process_lead_creation_params / process_unsorted_params ---------------------------------

#[tokio::test]
async fn the_incoming_lead_takes_the_lead_contact_and_unsorted_hooks_but_keeps_its_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (lead_argv, lead_seen) = script(
        dir.path(),
        "process_lead_creation_params",
        "{'name': 'Hot: ' + call['name'], 'price': 500}",
    );
    let (contact_argv, _) = script(
        dir.path(),
        "process_contact_creation_params",
        "{'name': 'Walk-in'}",
    );
    let (unsorted_argv, unsorted_seen) = script(
        dir.path(),
        "process_unsorted_params",
        &format!(
            "{{'source_name': 'office line', 'pipeline_id': {PIPELINE_ID}, 'source_uid': 'other', \
             'metadata': dict(call['metadata'], uniq='other', service_code='office')}}"
        ),
    );
    let k = kommo_app(|c| {
        hook(c, "process_lead_creation_params", lead_argv);
        hook(c, "process_contact_creation_params", contact_argv);
        hook(c, "process_unsorted_params", unsorted_argv);
    })
    .await;
    k.events(answered("u1", "+79990000001", 20)).await;
    let item = k
        .kommo
        .wait_for(WAIT, "an incoming lead", |k| {
            k.unsorted().into_iter().next()
        })
        .await;
    k.settled().await;
    assert_eq!(k.kommo.unsorted().len(), 1);
    // The hook's changes...
    assert_eq!(item["source_name"], "office line", "{item}");
    assert_eq!(item["pipeline_id"], PIPELINE_ID, "{item}");
    assert_eq!(item["metadata"]["service_code"], "office", "{item}");
    // ...but what ties the incoming lead to the call stays.
    assert_eq!(item["source_uid"], "lab-u1", "{item}");
    assert_eq!(item["metadata"]["uniq"], "lab-u1", "{item}");
    assert_eq!(item["metadata"]["from"], "+79990000001", "{item}");
    assert_eq!(item["metadata"]["duration"], 20, "{item}");
    // The lead and the contact the account made of it.
    let leads = k.kommo.leads();
    assert_eq!(leads.len(), 1, "{leads:?}");
    assert_eq!(leads[0]["name"], "Hot: +79990000001 - incoming call");
    assert_eq!(leads[0]["price"], 500);
    assert_eq!(leads[0]["responsible_user_id"], ANNA);
    let contacts = k.kommo.contacts();
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    assert_eq!(contacts[0]["name"], "Walk-in");
    assert_eq!(phone_of(&contacts[0]), Some("+79990000001"));

    let seen = inputs(&lead_seen);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["point"], "process_lead_creation_params");
    assert_eq!(seen[0]["call_stage"], "call_ended");
    assert_eq!(seen[0]["name"], "+79990000001 - incoming call");
    assert_eq!(seen[0]["responsible_user_id"], ANNA);
    assert!(seen[0]["call_full"].is_object());
    // The unsorted hook sees the item with the lead and the contact as their hooks left them.
    let seen = inputs(&unsorted_seen);
    assert_eq!(seen.len(), 1, "{seen:?}");
    let input = &seen[0];
    assert_eq!(input["point"], "process_unsorted_params");
    assert_eq!(input["source_uid"], "lab-u1");
    assert_eq!(input["metadata"]["uniq"], "lab-u1");
    assert_eq!(
        input["_embedded"]["leads"][0]["name"],
        "Hot: +79990000001 - incoming call"
    );
    assert_eq!(input["_embedded"]["contacts"][0]["name"], "Walk-in");
    assert!(input["call_full"].is_object());
    for p in [
        "process_lead_creation_params",
        "process_contact_creation_params",
        "process_unsorted_params",
    ] {
        let hooks = counted(&k, p, "changed", 1).await;
        assert_eq!(hooks[p]["failed"], 0, "{p}: {hooks}");
    }
    assert_eq!(k.app.state.outbox.status().dead, 0);
}

// ---- process_contact_update_params / process_lead_update_params -----------------------------

#[tokio::test]
async fn process_contact_update_params_patches_the_contact_the_call_went_to() {
    let dir = tempfile::tempdir().unwrap();
    let (argv, seen) = script(
        dir.path(),
        "process_contact_update_params",
        &format!("{{'responsible_user_id': {VERA}, 'id': 1, 'name': 'Ivan (called)'}}"),
    );
    let k = kommo_app(|c| hook(c, "process_contact_update_params", argv)).await;
    let contact = k.kommo.add_contact("Ivan", "+79991234567", BORIS);
    k.events(answered("p1", "+79991234567", 30)).await;
    k.logged("lab-p1").await;
    k.settled().await;
    let sent = patches(&k, "/api/v4/contacts");
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        sent[0],
        json!([{"id": contact, "responsible_user_id": VERA, "name": "Ivan (called)"}])
    );
    let c = k.kommo.contact(contact).unwrap();
    assert_eq!(c["responsible_user_id"], VERA);
    assert_eq!(c["name"], "Ivan (called)");
    assert!(patches(&k, "/api/v4/leads").is_empty());
    let seen = inputs(&seen);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["point"], "process_contact_update_params");
    assert_eq!(seen[0]["call_stage"], "call_ended");
    assert_eq!(
        seen[0]["entity"],
        json!({"id": contact, "type": "contacts"})
    );
    assert!(seen[0]["call_full"].is_object());
}

#[tokio::test]
async fn process_lead_and_contact_update_params_patch_the_lead_and_its_contact() {
    let dir = tempfile::tempdir().unwrap();
    let (lead_argv, lead_seen) = script(
        dir.path(),
        "process_lead_update_params",
        &format!("{{'responsible_user_id': {VERA}, 'price': 100}}"),
    );
    let (contact_argv, contact_seen) = script(
        dir.path(),
        "process_contact_update_params",
        &format!("{{'responsible_user_id': {VERA}}}"),
    );
    let k = kommo_app(|c| {
        hook(c, "process_lead_update_params", lead_argv);
        hook(c, "process_contact_update_params", contact_argv);
    })
    .await;
    let contact = k.kommo.add_contact("Ivan", "+79991234567", BORIS);
    let lead = k.kommo.add_lead_for(contact, BORIS);
    k.events(answered("p2", "+79991234567", 30)).await;
    let calls = k.logged("lab-p2").await;
    k.settled().await;
    assert_eq!(calls[0]["entity_id"], lead);
    let sent = patches(&k, "/api/v4/leads");
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        sent[0],
        json!([{"id": lead, "responsible_user_id": VERA, "price": 100}])
    );
    let l = k.kommo.lead(lead).unwrap();
    assert_eq!(
        (l["responsible_user_id"].as_i64(), l["price"].as_i64()),
        (Some(VERA), Some(100))
    );
    let seen = inputs(&lead_seen);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["entity"], json!({"id": lead, "type": "leads"}));
    // The lead's contact is the call's contact too: its hook is asked and its fields sent.
    let seen = inputs(&contact_seen);
    assert_eq!(
        seen.len(),
        1,
        "process_contact_update_params was not asked about the lead's contact; PATCHes: {:?}",
        k.kommo
            .requests()
            .iter()
            .filter(|r| r.method == "PATCH")
            .map(|r| (&r.path, &r.body))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        seen[0]["entity"],
        json!({"id": contact, "type": "contacts"})
    );
    let sent = patches(&k, "/api/v4/contacts");
    assert_eq!(
        sent,
        vec![json!([{"id": contact, "responsible_user_id": VERA}])]
    );
    assert_eq!(
        k.kommo.contact(contact).unwrap()["responsible_user_id"],
        VERA
    );
}

#[tokio::test]
async fn update_hooks_without_data_patch_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (lead_argv, lead_seen) = script(dir.path(), "process_lead_update_params", "{}");
    let (contact_argv, contact_seen) = script(dir.path(), "process_contact_update_params", "None");
    let k = kommo_app(|c| {
        hook(c, "process_lead_update_params", lead_argv);
        hook(c, "process_contact_update_params", contact_argv);
    })
    .await;
    // One call goes to a lead, the other to a contact without one.
    let with_lead = k.kommo.add_contact("Ivan", "+79991234567", BORIS);
    k.kommo.add_lead_for(with_lead, BORIS);
    k.kommo.add_contact("Petr", "+79997654321", BORIS);
    k.events(answered("n1", "+79991234567", 30)).await;
    k.events(answered("n2", "+79997654321", 30)).await;
    k.logged("lab-n1").await;
    k.logged("lab-n2").await;
    counted(&k, "process_lead_update_params", "unchanged", 1).await;
    counted(&k, "process_contact_update_params", "unchanged", 1).await;
    k.settled().await;
    assert!(!inputs(&lead_seen).is_empty() && !inputs(&contact_seen).is_empty());
    let sent: Vec<(String, Value)> = k
        .kommo
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| (r.path, r.body))
        .collect();
    assert!(sent.is_empty(), "{sent:?}");
}

// ---- process_call_params (CRM-neutral) ------------------------------------------------------

#[tokio::test]
async fn process_call_params_shapes_the_kommo_call() {
    let dir = tempfile::tempdir().unwrap();
    let (argv, seen) = script(
        dir.path(),
        "process_call_params",
        "({'duration': call['duration'] + 12} if call['result'] == 'answered' \
         else {'result': 'busy'})",
    );
    let k = kommo_app(|c| hook(c, "process_call_params", argv)).await;
    k.kommo.add_contact("Ivan", "+79991234567", BORIS);
    k.kommo.add_contact("Petr", "+79997654321", BORIS);
    k.events(answered("d1", "+79991234567", 30)).await;
    k.events(missed("d2", "+79997654321")).await;
    let talked = k.logged("lab-d1").await;
    let missed = k.logged("lab-d2").await;
    k.settled().await;
    assert_eq!(
        (
            talked[0]["duration"].as_i64(),
            talked[0]["call_status"].as_i64()
        ),
        (Some(42), Some(4)),
        "{}",
        talked[0]
    );
    assert_eq!(
        (
            missed[0]["duration"].as_i64(),
            missed[0]["call_status"].as_i64()
        ),
        (Some(0), Some(7)),
        "{}",
        missed[0]
    );
    let seen = inputs(&seen);
    let input = seen
        .iter()
        .find(|i| i["phone"] == "+79991234567")
        .unwrap_or_else(|| panic!("{seen:?}"));
    assert_eq!(input["point"], "process_call_params");
    assert_eq!(input["call_stage"], "call_ended");
    assert_eq!(input["direction"], "in");
    assert_eq!(input["result"], "answered");
    assert_eq!(input["duration"], 30);
    assert_eq!(input["code"], "101");
    assert!(input["call_full"].is_object());
}

// ---- process_task_creation_params -----------------------------------------------------------

#[tokio::test]
async fn process_task_creation_params_decides_the_task_and_its_text() {
    let dir = tempfile::tempdir().unwrap();
    let (argv, seen) = script(
        dir.path(),
        "process_task_creation_params",
        &format!(
            "({{'create': False}} if call['phone'] == '+79991110001' else \
             {{'text': 'Call back ' + call['phone'] + ' today', 'responsible_id': {VERA}}})"
        ),
    );
    let k = kommo_app(|c| hook(c, "process_task_creation_params", argv)).await;
    k.kommo.add_contact("Ivan", "+79991110001", BORIS);
    let petr = k.kommo.add_contact("Petr", "+79992220002", BORIS);
    k.events(missed("t1", "+79991110001")).await;
    k.events(missed("t2", "+79992220002")).await;
    k.logged("lab-t1").await;
    k.logged("lab-t2").await;
    counted(&k, "process_task_creation_params", "changed", 2).await;
    k.settled().await;
    let tasks = k.kommo.tasks();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let t = &tasks[0];
    assert_eq!(t["text"], "Call back +79992220002 today");
    assert_eq!(t["responsible_user_id"], VERA);
    assert_eq!(
        (t["entity_type"].as_str(), t["entity_id"].as_i64()),
        (Some("contacts"), Some(petr))
    );
    let seen = inputs(&seen);
    assert_eq!(seen.len(), 2, "{seen:?}");
    let input = seen.iter().find(|i| i["phone"] == "+79992220002").unwrap();
    assert_eq!(input["point"], "process_task_creation_params");
    assert_eq!(input["text"], "Missed call from +79992220002");
    assert_eq!(input["responsible_id"], ANNA);
    assert_eq!(input["call_stage"], "call_ended");
}

// ---- failing hooks --------------------------------------------------------------------------

/// What the account holds, without what differs from one run to the next (the times the fake
/// stamps, the incoming lead's uid, the fake's address in links).
fn footprint(k: &K) -> Value {
    let strip = |mut v: Value, keys: &[&str]| {
        if let Some(m) = v.as_object_mut() {
            for key in keys {
                m.remove(*key);
            }
        }
        v
    };
    let stamps = ["created_at", "updated_at"];
    let mut events: Vec<String> = k.kommo.events().iter().map(Value::to_string).collect();
    events.sort();
    let updates: Vec<String> = k
        .kommo
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.path)
        .collect();
    let print = json!({
        "calls": k.kommo.calls(),
        "unsorted": k.kommo.unsorted().into_iter().map(|u| strip(u, &["uid"])).collect::<Vec<_>>(),
        "contacts": k.kommo.contacts().into_iter().map(|c| strip(c, &stamps)).collect::<Vec<_>>(),
        "leads": k.kommo.leads().into_iter().map(|l| strip(l, &stamps)).collect::<Vec<_>>(),
        "tasks": k.kommo.tasks(),
        "events": events,
        "updates": updates,
    });
    // The links name the fake's own address.
    serde_json::from_str(&print.to_string().replace(&k.kommo.url, "http://kommo")).unwrap()
}

/// An unknown caller answered (an incoming lead), then a known contact's missed call (a task),
/// through an app with `hooks` at every Kommo point.
async fn run_calls(hooks: Option<Vec<String>>) -> (K, Value) {
    let k = kommo_app(move |c| {
        if let Some(argv) = hooks {
            for p in KOMMO_POINTS {
                hook(c, p, argv.clone());
            }
        }
    })
    .await;
    k.kommo.add_contact("Ivan", "+79991234567", BORIS);
    k.events(answered("x1", "+79990000001", 20)).await;
    k.kommo
        .wait_for(WAIT, "an incoming lead", |k| {
            k.unsorted().into_iter().next()
        })
        .await;
    k.events(missed("x2", "+79991234567")).await;
    k.logged("lab-x2").await;
    k.kommo
        .wait_for(WAIT, "a task", |k| k.tasks().into_iter().next())
        .await;
    k.settled().await;
    let print = footprint(&k);
    (k, print)
}

#[tokio::test]
async fn a_crashing_hook_at_every_kommo_point_leaves_the_account_as_without_hooks() {
    let dir = tempfile::tempdir().unwrap();
    let crash = dir.path().join("crash.py");
    std::fs::write(
        &crash,
        "import sys\nsys.stdin.read()\nsys.stderr.write('boom')\nsys.exit(2)\n",
    )
    .unwrap();
    let argv = vec!["python3".to_string(), crash.display().to_string()];
    let (plain, without) = run_calls(None).await;
    plain.app.stop().await;
    plain.kommo.stop().await;
    let (k, with) = run_calls(Some(argv)).await;
    assert_eq!(with, without);
    // Both calls went through every point, and each counted its failure.
    for p in KOMMO_POINTS {
        let hooks = counted(&k, p, "failed", 1).await;
        assert_eq!(hooks[p]["changed"], 0, "{p}: {hooks}");
    }
    // The footprint is a real one.
    assert_eq!(with["unsorted"][0]["source_uid"], "lab-x1", "{with}");
    assert_eq!(with["calls"].as_array().unwrap().len(), 1, "{with}");
    assert_eq!(with["tasks"].as_array().unwrap().len(), 1, "{with}");
    assert_eq!(with["contacts"].as_array().unwrap().len(), 2, "{with}");
    assert_eq!(with["updates"], json!([]), "{with}");
    assert_eq!(k.app.state.outbox.status().dead, 0);
}
