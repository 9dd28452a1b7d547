//! changeUserStatusUrl → stored status → QueuePause on the PBX, re-applied after reconnects.

use serde_json::Value;

use crate::support::fake_ami::Reply;
use crate::support::TestApp;

async fn set_status(app: &TestApp, user: &str, code: &str, status: &str) -> (u16, Value) {
    let id = app.client_id();
    let r = app
        .http
        .post(app.url("/crm/user-status"))
        .form(&[
            ("clientId", id.as_str()),
            ("userId", user),
            ("code", code),
            ("status", status),
        ])
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn break_pauses_and_free_unpauses() {
    let app = TestApp::spawn(|c| c.crm.register_on_start = false).await;
    app.ami_connected().await;
    let (s, body) = set_status(&app, "7", "101", "break").await;
    assert_eq!((s, body["success"].as_bool()), (200, Some(true)));
    let p = &app.ami.wait_for_actions("QueuePause", 1).await[0];
    assert_eq!(
        (p.get("Interface"), p.get("Paused"), p.get("Reason")),
        (Some("PJSIP/101"), Some("true"), Some("break"))
    );
    assert_eq!(p.get("Queue"), None, "all queues");

    set_status(&app, "7", "101", "free").await;
    let p = &app.ami.wait_for_actions("QueuePause", 2).await[1];
    assert_eq!((p.get("Paused"), p.get("Reason")), (Some("false"), None));

    let stored = app.state.store.user_status(7).unwrap().unwrap();
    assert_eq!(
        (stored.code.as_str(), stored.status.as_str()),
        ("101", "free")
    );
}

#[tokio::test]
async fn configured_queues_get_one_action_each() {
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.manager_status.queues = vec!["support".into(), "sales".into()];
        c.manager_status.queue_interface = "Local/{code}@queue-agents/n".into();
    })
    .await;
    app.ami_connected().await;
    set_status(&app, "2", "102", "dinner").await;
    let ps = app.ami.wait_for_actions("QueuePause", 2).await;
    let queues: Vec<_> = ps.iter().map(|p| p.get("Queue").unwrap()).collect();
    assert_eq!(queues, vec!["support", "sales"]);
    assert!(ps
        .iter()
        .all(|p| p.get("Interface") == Some("Local/102@queue-agents/n")
            && p.get("Reason") == Some("dinner")));
}

#[tokio::test]
async fn invalid_input_is_400_naming_fields() {
    let app = TestApp::spawn(|c| c.crm.register_on_start = false).await;
    for (user, code, status, field) in [
        ("0", "101", "free", "userId"),
        ("7", "abc", "free", "code"),
        ("7", "101", "asleep", "status"),
        ("", "101", "free", "userId"),
    ] {
        let (s, body) = set_status(&app, user, code, status).await;
        assert_eq!(s, 400, "{body}");
        assert!(body["errors"][field].is_string(), "{field}: {body}");
    }
    assert!(app.state.store.user_statuses().unwrap().is_empty());
    let id = "forged";
    let r = app
        .http
        .get(app.url("/crm/user-status"))
        .query(&[
            ("clientId", id),
            ("userId", "7"),
            ("code", "101"),
            ("status", "break"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(app.state.store.user_statuses().unwrap().is_empty());
}

#[tokio::test]
async fn a_failed_queue_pause_is_reported_in_ready_not_to_the_crm() {
    let app = TestApp::spawn(|c| c.crm.register_on_start = false).await;
    app.ami_connected().await;
    app.ami
        .set_reply("QueuePause", Reply::Error("Interface not found".into()));
    let (s, _) = set_status(&app, "7", "105", "break").await;
    assert_eq!(s, 200);
    app.ami.wait_for_actions("QueuePause", 1).await;
    // The failure is recorded right after the answer is processed; wait for /ready to show it.
    let ready = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let r: Value = app.ready().await;
            if r["managerStatus"]["pbxFailures"]["7"].is_string() {
                return r;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    let why = ready["managerStatus"]["pbxFailures"]["7"].as_str().unwrap();
    assert!(
        why.contains("PJSIP/105") && why.contains("Interface not found"),
        "{why}"
    );
}

#[tokio::test]
async fn statuses_are_reapplied_after_a_reconnect() {
    let app = TestApp::spawn(|c| c.crm.register_on_start = false).await;
    app.ami_connected().await;
    set_status(&app, "7", "101", "break").await;
    set_status(&app, "2", "102", "dinner").await;
    app.ami.wait_for_actions("QueuePause", 2).await;

    // The link drops: after the new login both statuses are applied again.
    app.ami.drop_all();
    app.ami.wait_for_logins(2).await;
    let ps = app.ami.wait_for_actions("QueuePause", 4).await;
    let mut again: Vec<_> = ps[2..]
        .iter()
        .map(|p| (p.get("Interface").unwrap(), p.get("Reason").unwrap()))
        .collect();
    again.sort();
    assert_eq!(again, vec![("PJSIP/101", "break"), ("PJSIP/102", "dinner")]);
}
