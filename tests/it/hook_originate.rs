//! `process_originate_params` on click-to-call: makeCallUrl in, what the scripted AMI server
//! receives as the Originate, with a real child process or a local HTTP hook.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::hook_routing::{command_hook, http_hook, inputs, python, recording_python, url_hook};
use crate::support::TestApp;

const POINT: &str = "process_originate_params";

async fn app(tweak: impl FnOnce(&mut pbxgate::config::Config)) -> TestApp {
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        tweak(c);
    })
    .await;
    app.ami_connected().await;
    app
}

/// makeCallUrl from extension 101 to `phone`: the status and the body.
async fn make_call(app: &TestApp, phone: &str) -> (u16, Value) {
    let id = app.client_id();
    let r = app
        .http
        .get(app.url("/crm/make-call"))
        .query(&[
            ("clientId", id.as_str()),
            ("code", "101"),
            ("phone", phone),
            ("userId", "7"),
            ("externalPhone", "+74951234567"),
        ])
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn variables(o: &pbxgate::pbx::ami::frame::Frame) -> Vec<String> {
    o.get_all("Variable").map(str::to_string).collect()
}

#[tokio::test]
async fn the_hook_changes_the_originate_fields() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen.jsonl");
    let script = recording_python(
        dir.path(),
        &seen,
        "{'channel': 'PJSIP/' + d['code'], 'context': 'c2c-out', 'exten': '9' + d['exten'][1:], \
         'caller_id': '\"Shop\" <74951234567>', 'timeout': 20000, \
         'variables': {'__SHOP': 'shop1', 'GREETING': 'hello world'}}",
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
    let (status, body) = make_call(&app, "+7 (999) 123-45-67").await;
    assert_eq!(status, 200, "{body}");
    let o = &app.ami.wait_for_actions("Originate", 1).await[0];
    assert_eq!(
        (
            o.get("Channel"),
            o.get("Context"),
            o.get("Exten"),
            o.get("CallerID"),
            o.get("Timeout")
        ),
        (
            Some("PJSIP/101"),
            Some("c2c-out"),
            Some("979991234567"),
            Some("\"Shop\" <74951234567>"),
            Some("20000")
        )
    );
    let call_id = o.get("ChannelId").unwrap();
    assert_eq!(body["callId"], call_id);
    let vars = variables(o);
    for v in [
        "__SHOP=shop1",
        "GREETING=hello world",
        "__PBXGATE_C2C=1",
        "__PBXGATE_CODE=101",
        "__PBXGATE_USER_ID=7",
    ] {
        assert!(vars.iter().any(|x| x == v), "{v} not in {vars:?}");
    }
    assert!(
        vars.contains(&format!("__PBXGATE_CALL_ID={call_id}")),
        "{vars:?}"
    );

    let input = &inputs(&seen)[0];
    assert_eq!(
        input,
        &json!({
            "point": POINT,
            "call_full": null,
            "call_stage": "conversation_requested",
            "channel": "Local/101@from-internal",
            "context": "from-internal",
            "exten": "+79991234567",
            "caller_id": "\"+79991234567\" <+79991234567>",
            "timeout": 30000,
            "variables": {},
            "code": "101",
            "phone": "+79991234567",
            "user_id": 7,
            "external_phone": "+74951234567",
            "call_id": call_id,
        })
    );
    assert_eq!(app.ready().await["hooks"][POINT]["changed"], 1);
}

#[tokio::test]
async fn a_refusal_answers_the_crm_with_the_reason_and_nothing_is_originated() {
    let dir = tempfile::tempdir().unwrap();
    let script = python(
        dir.path(),
        "hook.py",
        "data = {'refuse': 'Calls to this customer are not allowed'} if d['phone'].endswith('67') else {}\n\
         print(json.dumps({'state': 'success', 'data': data}))\n",
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
    let (status, body) = make_call(&app, "+79991234567").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body,
        json!({"success": false, "errorMsg": "Calls to this customer are not allowed", "errors": {}})
    );
    // A second click is asked again (not taken for a duplicate of a call that never rang).
    let (status, body) = make_call(&app, "+79991234567").await;
    assert_eq!(
        (status, &body["errorMsg"]),
        (403, &json!("Calls to this customer are not allowed"))
    );
    // Proof that the PBX saw neither: the next allowed call is the first Originate.
    let (status, _) = make_call(&app, "+79990000001").await;
    assert_eq!(status, 200);
    app.ami.wait_for_actions("Originate", 1).await;
    let originates = app.ami.actions("Originate");
    assert_eq!(originates.len(), 1);
    assert_eq!(originates[0].get("Exten"), Some("+79990000001"));
    let ready = app.ready().await;
    assert_eq!(
        (
            &ready["hooks"][POINT]["changed"],
            &ready["hooks"][POINT]["unchanged"]
        ),
        (&json!(2), &json!(1)),
        "{ready}"
    );
}

#[tokio::test]
async fn a_failing_hook_leaves_the_default_originate_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let script = python(
        dir.path(),
        "hook.py",
        "tail = d['phone'][-1]\n\
         if tail == '1':\n    sys.stderr.write('boom')\n    sys.exit(3)\n\
         elif tail == '2':\n    print('{\"state\": \"success\", \"data\": ')\n\
         elif tail == '3':\n    print(json.dumps({'state': 'success', 'data': {'timeout': '20s', 'exten': '000'}}))\n\
         else:\n    time.sleep(30)\n",
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
    for n in 1..=4 {
        let phone = format!("+7999000000{n}");
        let started = Instant::now();
        let (status, body) = make_call(&app, &phone).await;
        // The sleeping hook delays the call by its timeout, no more.
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{n}: {:?}",
            started.elapsed()
        );
        assert_eq!(status, 200, "{n}: {body}");
        let o = app
            .ami
            .wait_for_actions("Originate", n)
            .await
            .pop()
            .unwrap();
        assert_eq!(
            (
                o.get("Channel"),
                o.get("Context"),
                o.get("Exten"),
                o.get("Timeout")
            ),
            (
                Some("Local/101@from-internal"),
                Some("from-internal"),
                Some(phone.as_str()),
                Some("30000")
            ),
            "{n}"
        );
    }
    let ready = app.ready().await;
    let counts = &ready["hooks"][POINT];
    assert_eq!(
        (&counts["failed"], &counts["timeout"], &counts["changed"]),
        (&json!(3), &json!(1), &json!(0)),
        "{ready}"
    );
}

#[tokio::test]
async fn an_http_hook_changes_the_number_dialled() {
    let (url, mut seen) = http_hook(Arc::new(|input: &Value| {
        let exten = format!(
            "0{}",
            input["exten"]
                .as_str()
                .unwrap_or_default()
                .trim_start_matches('+')
        );
        (
            200,
            json!({"state": "success", "data": {"exten": exten}}).to_string(),
        )
    }))
    .await;
    let app = app(|c| url_hook(c, POINT, &url, Duration::from_secs(10))).await;
    let (status, body) = make_call(&app, "89991234567").await;
    assert_eq!(status, 200, "{body}");
    let o = &app.ami.wait_for_actions("Originate", 1).await[0];
    assert_eq!(o.get("Exten"), Some("089991234567"));
    assert_eq!(o.get("Channel"), Some("Local/101@from-internal"));
    let (line, input) = seen.recv().await.unwrap();
    assert_eq!(line, "POST /hook HTTP/1.1");
    assert_eq!(
        (&input["point"], &input["phone"]),
        (&json!(POINT), &json!("89991234567"))
    );
}
