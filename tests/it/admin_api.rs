//! The admin API over plain HTTP: access (open on loopback, the token as Bearer or cookie, the
//! header cookie-authorised changes need), the views of calls and of the queue, and the
//! operator's actions.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{call_record, TestApp, T0};

const TOKEN: &str = "admin-token-0123456789";
const PBX_TOKEN: &str = "pbx-token-0123456789";

async fn app_with_token() -> TestApp {
    TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.admin.token = pbxgate::base::secret::Secret::new(TOKEN);
        c.pbx.token = pbxgate::base::secret::Secret::new(PBX_TOKEN);
    })
    .await
}

async fn open_app() -> TestApp {
    TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.pbx.token = pbxgate::base::secret::Secret::new(PBX_TOKEN);
    })
    .await
}

/// A call the CRM rejected, set aside as dead (after the start-up drain, so that the uploader
/// does not see it pending first).
pub(crate) async fn dead_call(app: &TestApp, id: &str) {
    app.state.outbox.wait_changes(1).await;
    let store = app.state.outbox.store();
    store.insert(call_record(id, T0)).unwrap();
    let (_, env) = store.find(id).unwrap().unwrap();
    store
        .mark_dead(&env.unwrap(), "phone: This value should not be blank.")
        .unwrap();
}

/// A webhook call: rings 101, answered, hung up.
pub(crate) async fn webhook_call(app: &TestApp, call_id: &str, phone: &str) {
    let r = app
        .http
        .post(app.url("/pbx/events"))
        .bearer_auth(PBX_TOKEN)
        .json(&json!([
            {"call_id": call_id, "event": "start", "direction": "in", "phone": phone, "extension": "101"},
            {"call_id": call_id, "event": "answer", "extension": "101"},
            {"call_id": call_id, "event": "hangup"}
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

fn post(app: &TestApp, path: &str) -> reqwest::RequestBuilder {
    app.http.post(app.url(path)).header("X-Pbxgate-Admin", "1")
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_token_is_required_as_bearer_or_cookie_and_changes_by_cookie_need_the_header() {
    let app = app_with_token().await;
    let status = app.url("/admin/api/status");
    let (code, body) = json_of(app.http.get(&status).send().await.unwrap()).await;
    assert_eq!(code, 401, "{body}");
    assert!(
        body["errorMsg"].as_str().unwrap().contains("admin token"),
        "{body}"
    );
    let wrong = app.http.get(&status).bearer_auth("admin-token-0123456780");
    assert_eq!(wrong.send().await.unwrap().status(), 401);
    let (code, body) = json_of(
        app.http
            .get(&status)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(body["ready"], true, "the /ready body: {body}");
    // The other routes are guarded the same way.
    for path in [
        "/admin/api/calls",
        "/admin/api/queue",
        "/admin/api/config",
        "/admin/events",
    ] {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = post(&app, "/admin/api/queue/x/retry").send().await.unwrap();
    assert_eq!(r.status(), 401);

    // The login form.
    let login = app.url("/admin/login");
    let r = app
        .http
        .post(&login)
        .json(&json!({"token": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let r = app
        .http
        .post(&login)
        .json(&json!({"token": TOKEN}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    assert!(
        !set.contains(TOKEN),
        "the cookie is derived, not the token: {set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    let r = app
        .http
        .get(&status)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .http
        .get(&status)
        .header("cookie", "pbxgate_admin=forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A change by cookie without the header is refused (another site's form could send it).
    let r = app
        .http
        .post(app.url("/admin/api/queue/none/retry"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let (code, body) = json_of(r).await;
    assert_eq!(code, 403, "{body}");
    assert!(body["errors"]["x-pbxgate-admin"].is_string(), "{body}");
    let r = post(&app, "/admin/api/queue/none/retry")
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "authorised, and the call is unknown");
    // Bearer needs no header.
    let r = app
        .http
        .post(app.url("/admin/api/queue/none/retry"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Logging out clears the cookie.
    let r = app
        .http
        .post(app.url("/admin/logout"))
        .send()
        .await
        .unwrap();
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));

    // The effective config never shows a secret.
    let r = app
        .http
        .get(app.url("/admin/api/config"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    let config: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(config["admin"]["token"], "***");
    assert_eq!(config["crm"]["api_key"], "***");
    assert_eq!(config["pbx"]["token"], "***");
    for secret in [TOKEN, PBX_TOKEN, app.crm.api_key(), "ami-secret"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

#[tokio::test]
async fn without_a_token_on_loopback_admin_is_open_but_changes_need_the_header() {
    let app = open_app().await;
    let r = app
        .http
        .get(app.url("/admin/api/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .http
        .post(app.url("/admin/api/register"))
        .send()
        .await
        .unwrap();
    let (code, body) = json_of(r).await;
    assert_eq!(code, 403, "{body}");
    assert!(body["errors"]["x-pbxgate-admin"].is_string(), "{body}");
}

#[tokio::test]
async fn calls_show_masked_numbers_and_what_the_crm_answered() {
    let app = open_app().await;
    webhook_call(&app, "adm1", "+79991234567").await;
    app.crm
        .wait_for_call("pbx-adm1", Duration::from_secs(10))
        .await
        .expect("uploaded");
    tokio::time::timeout(
        Duration::from_secs(10),
        app.state.outbox.wait_until(|s| s.done == 1),
    )
    .await
    .expect("done");
    let (_, body) = json_of(
        app.http
            .get(app.url("/admin/api/calls"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let call = body["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["external_id"] == "pbx-adm1")
        .cloned()
        .unwrap_or_else(|| panic!("{body}"));
    assert_eq!(call["state"], "finished");
    assert_eq!(call["direction"], "in");
    assert_eq!(call["phone"], "+799******67", "{call}");
    assert_eq!(call["code"], "101");
    assert_eq!(call["result"], "answered");
    assert_eq!(call["crm"]["state"], "done", "{call}");
    assert!(!body.to_string().contains("+79991234567"), "{body}");

    // A call in progress: ringing, then talking.
    let r = app
        .http
        .post(app.url("/pbx/events"))
        .bearer_auth(PBX_TOKEN)
        .json(&json!([{"call_id": "adm2", "event": "start", "direction": "in", "phone": "+79990000002", "extension": "102"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, body) = json_of(
        app.http
            .get(app.url("/admin/api/calls"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let live = &body["calls"][0];
    assert_eq!(live["external_id"], "pbx-adm2", "{body}");
    assert_eq!(live["state"], "live");
    assert_eq!(live["ringing"], json!(["102"]), "{live}");
    assert_eq!(live["phone"], "+799******02");
}

#[tokio::test]
async fn numbers_are_shown_when_configured() {
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.pbx.token = pbxgate::base::secret::Secret::new(PBX_TOKEN);
        c.admin.show_numbers = true;
    })
    .await;
    webhook_call(&app, "adm3", "+79991234567").await;
    let (_, body) = json_of(
        app.http
            .get(app.url("/admin/api/calls"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(body["calls"][0]["phone"], "+79991234567", "{body}");
}

#[tokio::test]
async fn a_dead_call_is_retried_or_discarded_and_unknown_ids_are_named() {
    let app = open_app().await;
    dead_call(&app, "pbx-d1").await;
    dead_call(&app, "pbx-d2").await;
    let (_, queue) = json_of(
        app.http
            .get(app.url("/admin/api/queue"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let items = queue["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{queue}");
    assert_eq!(items[0]["state"], "dead");
    assert!(
        items[0]["reason"].as_str().unwrap().contains("phone"),
        "{queue}"
    );
    assert_eq!(queue["status"]["dead"], 2);

    let (code, body) = json_of(
        post(&app, "/admin/api/queue/pbx-d1/retry")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((code, &body["state"]), (200, &json!("pending")), "{body}");
    app.crm
        .wait_for_call("pbx-d1", Duration::from_secs(10))
        .await
        .expect("the retried call reaches the CRM");

    let (code, body) = json_of(
        post(&app, "/admin/api/queue/pbx-d2/discard")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((code, &body["state"]), (200, &json!("discarded")), "{body}");
    let (code, body) = json_of(
        post(&app, "/admin/api/queue/pbx-d2/discard")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 409, "{body}");
    let (code, body) = json_of(
        post(&app, "/admin/api/queue/pbx-d2/retry")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 409, "{body}");
    let (_, queue) = json_of(
        app.http
            .get(app.url("/admin/api/queue"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(queue["items"], json!([]), "{queue}");
    assert_eq!(queue["status"]["dead"], 0);
    assert!(!app.crm.uploaded_ids().contains(&"pbx-d2".to_string()));

    for path in [
        "/admin/api/queue/pbx-nope/retry",
        "/admin/api/queue/pbx-nope/discard",
        "/admin/api/calls/pbx-nope/resend",
    ] {
        let (code, body) = json_of(post(&app, path).send().await.unwrap()).await;
        assert_eq!(code, 404, "{path}: {body}");
        assert!(
            body["errors"]["external_id"]
                .as_str()
                .unwrap()
                .contains("pbx-nope"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn a_finished_call_is_sent_again_on_request() {
    let app = open_app().await;
    webhook_call(&app, "rs1", "+79991234567").await;
    app.crm
        .wait_for_call("pbx-rs1", Duration::from_secs(10))
        .await
        .expect("uploaded");
    let outbox = &app.state.outbox;
    tokio::time::timeout(Duration::from_secs(10), outbox.wait_until(|s| s.done == 1))
        .await
        .expect("done");
    assert_eq!(app.crm.upload_counts().get("pbx-rs1"), Some(&1));
    let (code, body) = json_of(
        post(&app, "/admin/api/calls/pbx-rs1/resend")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((code, &body["how"]), (200, &json!("queued")), "{body}");
    assert_eq!(outbox.status().done, 0, "queued anew");
    tokio::time::timeout(
        Duration::from_secs(10),
        outbox.wait_until(|s| s.done == 1 && s.pending == 0),
    )
    .await
    .expect("uploaded again");
    assert_eq!(app.crm.upload_counts().get("pbx-rs1"), Some(&2));
}

#[tokio::test]
async fn check_and_register_answer_with_their_lines() {
    let app = open_app().await;
    let (code, body) = json_of(post(&app, "/admin/api/check").send().await.unwrap()).await;
    assert_eq!(code, 200, "{body}");
    let lines = body["lines"].as_array().unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l["text"].as_str().unwrap().starts_with("store writable")),
        "{body}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["text"].as_str().unwrap().starts_with("AMI ")),
        "{body}"
    );
    let (code, body) = json_of(post(&app, "/admin/api/register").send().await.unwrap()).await;
    assert_eq!(
        (code, &body["registration"]),
        (200, &json!("registered")),
        "{body}"
    );
    assert!(app.crm.module().is_some(), "the module reached the CRM");
    let ready = app.ready().await;
    assert_eq!(ready["crm"]["registration"], "registered", "{ready}");
}

#[tokio::test]
async fn live_updates_stream_a_snapshot_and_are_bounded() {
    let app = open_app().await;
    let mut r = app.http.get(app.url("/admin/events")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let first = String::from_utf8(r.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    assert!(first.contains("event: snapshot\ndata: {"), "{first}");
    // A finished call is pushed.
    webhook_call(&app, "sse1", "+79991234567").await;
    let pushed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let chunk = r.chunk().await.unwrap().unwrap();
            let text = String::from_utf8(chunk.to_vec()).unwrap();
            if text.contains("pbx-sse1") {
                return text;
            }
        }
    })
    .await
    .expect("the call is pushed");
    assert!(!pushed.contains("+79991234567"));
    // At most 32 streams; one more is refused.
    let mut open = Vec::new();
    for _ in 0..31 {
        let s = app.http.get(app.url("/admin/events")).send().await.unwrap();
        assert_eq!(s.status(), 200);
        open.push(s);
    }
    let r2 = app.http.get(app.url("/admin/events")).send().await.unwrap();
    assert_eq!(r2.status(), 503);
    drop(r);
    drop(open);
}

#[tokio::test]
async fn click_to_call_from_the_dashboard_originates_from_the_extension() {
    let app = open_app().await;
    app.ami_connected().await;
    let url = app.url("/admin/api/call");
    // Changes need the page's header, also on an open loopback admin.
    let r = app
        .http
        .post(&url)
        .json(&json!({"code": "101", "phone": "+4930555123"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = app
        .http
        .post(&url)
        .header("X-Pbxgate-Admin", "1")
        .json(&json!({"code": "101", "phone": "12"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["errors"]["phone"].is_string(), "{body}");
    // No CRM user has 109: the answer names userId.
    let r = app
        .http
        .post(&url)
        .header("X-Pbxgate-Admin", "1")
        .json(&json!({"code": "109", "phone": "+4930555123"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["errors"]["userId"].is_string(), "{body}");
    assert!(app.ami.actions("Originate").is_empty());

    let r = app
        .http
        .post(&url)
        .header("X-Pbxgate-Admin", "1")
        .json(&json!({"code": "101", "phone": "+49 30 555123"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["success"], true, "{body}");
    let o = &app.ami.wait_for_actions("Originate", 1).await[0];
    assert_eq!(o.get("Channel"), Some("Local/101@from-internal"));
    assert_eq!(o.get("Exten"), Some("+4930555123"));
    // The extension's CRM user (from [[users]]) asked.
    assert!(
        o.get_all("Variable")
            .any(|v| v.ends_with("PBXGATE_USER_ID=1")),
        "{o:?}"
    );
}
