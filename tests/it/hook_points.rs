//! Customisation points end to end: the service with a hook configured, a real child process,
//! captured calls in, what reaches the strict fake CRM.

use std::time::Duration;

use pbxgate::config::HookConfig;
use serde_json::Value;

use crate::support::{capture_body, lab_app, TestApp};

const MISSED: &str = "lab-1795264721.70";

fn hook(c: &mut pbxgate::config::Config, point: &str, script: &std::path::Path) {
    c.hooks.0.insert(
        point.into(),
        HookConfig {
            command: vec!["python3".into(), script.display().to_string()],
            url: String::new(),
            timeout: Duration::from_secs(5),
        },
    );
}

async fn uploaded(app: &TestApp, id: &str) -> Value {
    app.crm
        .wait_for_call(id, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| {
            panic!(
                "{id} never reached the CRM: {:?}",
                app.state.outbox.status()
            )
        })
}

#[tokio::test]
async fn process_call_params_changes_what_reaches_the_crm() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("input.json");
    let script = dir.path().join("hook.py");
    std::fs::write(
        &script,
        format!(
            "import json, sys\n\
             data = json.load(sys.stdin)\n\
             open({seen:?}, 'w').write(json.dumps(data))\n\
             print(json.dumps({{'state': 'success', 'data': {{'phone': '+70000000001', 'code': '102'}}}}))\n",
            seen = seen.display().to_string()
        ),
    )
    .unwrap();
    let app = lab_app(|c| hook(c, "process_call_params", &script)).await;
    app.ami.send(&capture_body("09_inbound_missed"));
    let call = uploaded(&app, MISSED).await;
    assert_eq!(
        (&call["phone"], &call["code"], &call["result"]),
        (
            &Value::from("+70000000001"),
            &Value::from("102"),
            &Value::from("no answer")
        ),
        "{call}"
    );
    let input: Value = serde_json::from_str(&std::fs::read_to_string(&seen).unwrap()).unwrap();
    assert_eq!(input["point"], "process_call_params");
    assert_eq!(input["call_stage"], "call_ended");
    assert_eq!(input["direction"], "in");
    assert_eq!(input["code"], "101");
    assert_eq!(input["result"], "no answer");
    assert_eq!(input["call_full"]["channel"]["id"], "1795264721.70");
    assert_eq!(input["call_full"]["channel"]["type"], "incoming");
    assert_eq!(input["call_full"]["result"], 480);
    assert_eq!(input["call_full"]["channel"]["was_answered"], false);
    let ready = app.ready().await;
    assert_eq!(
        ready["hooks"]["process_call_params"]["changed"], 1,
        "{ready}"
    );
}

#[tokio::test]
async fn a_failing_hook_leaves_the_call_as_it_was_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("hook.py");
    std::fs::write(
        &script,
        "import sys\nsys.stderr.write('boom')\nsys.exit(3)\n",
    )
    .unwrap();
    let app = lab_app(|c| hook(c, "process_call_params", &script)).await;
    app.ami.send(&capture_body("09_inbound_missed"));
    let call = uploaded(&app, MISSED).await;
    assert_eq!(call["code"], "101", "{call}");
    assert_ne!(call["phone"], "+70000000001", "{call}");
    let ready = app.ready().await;
    assert_eq!(
        ready["hooks"]["process_call_params"]["failed"], 1,
        "{ready}"
    );
    assert_eq!(
        ready["hooks"]["process_call_params"]["changed"], 0,
        "{ready}"
    );
}

#[tokio::test]
async fn the_shipped_phone_format_hook_puts_national_numbers_in_international_form() {
    const TOKEN: &str = "hook-token-0123456789";
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hooks/phone_format.py");
    let app = lab_app(|c| {
        hook(c, "process_call_params", &script);
        c.pbx.token = pbxgate::base::secret::Secret::new(TOKEN);
    })
    .await;
    let r = app
        .http
        .post(app.url("/pbx/events"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!([
            {"call_id": "nat1", "event": "start", "direction": "in", "phone": "89991234567", "extension": "101"},
            {"call_id": "nat1", "event": "answer", "extension": "101"},
            {"call_id": "nat1", "event": "hangup"}
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let call = uploaded(&app, "lab-nat1").await;
    assert_eq!(call["phone"], "+79991234567", "{call}");
    let ready = app.ready().await;
    assert_eq!(
        ready["hooks"]["process_call_params"]["changed"], 1,
        "{ready}"
    );
}
