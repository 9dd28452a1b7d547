use serde_json::Value;

use crate::support::TestApp;

async fn post_activity(app: &TestApp, form: &[(&str, &str)]) -> (u16, Value) {
    let resp = app
        .http
        .post(app.url("/crm/activity"))
        .form(form)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn wrong_client_id_is_403_and_changes_nothing() {
    let app = TestApp::spawn(|c| c.crm.register_on_start = false).await;
    let before = app.state.store.activity().unwrap();
    let (status, body) = post_activity(
        &app,
        &[
            ("clientId", "not-our-client-id"),
            ("activity", r#"{"active":false,"freeze":true}"#),
        ],
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(body["success"], false);
    assert!(body["errors"]["clientId"].is_string(), "{body}");
    assert_eq!(app.state.store.activity().unwrap(), before);

    let (status, body) =
        post_activity(&app, &[("activity", r#"{"active":false,"freeze":true}"#)]).await;
    assert_eq!(status, 400);
    assert!(body["errors"]["clientId"].is_string(), "{body}");
    assert_eq!(app.state.store.activity().unwrap(), before);
}

#[tokio::test]
async fn activity_is_stored_durably() {
    let app = TestApp::spawn(|c| c.crm.register_on_start = false).await;
    let id = app.client_id();
    assert!(app.state.store.activity().unwrap().may_push());
    let (status, body) = post_activity(
        &app,
        &[
            ("clientId", &id),
            ("activity", r#"{"active":true,"freeze":true}"#),
            ("systemUrl", "https://acme.retailcrm.ru"),
        ],
    )
    .await;
    assert_eq!((status, body["success"].as_bool()), (200, Some(true)));
    let a = app.state.store.activity().unwrap();
    assert!(a.active && a.freeze && !a.may_push());
    assert_eq!(a.system_url.as_deref(), Some("https://acme.retailcrm.ru"));

    let ready: Value = app.ready().await;
    assert_eq!(ready["crm"]["pushing"], false);

    // String booleans, as PHP may send them.
    let (status, _) = post_activity(
        &app,
        &[
            ("clientId", &id),
            ("activity", r#"{"active":"true","freeze":"false"}"#),
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert!(app.state.store.activity().unwrap().may_push());
}

#[tokio::test]
async fn malformed_activity_names_the_field() {
    let app = TestApp::spawn(|c| c.crm.register_on_start = false).await;
    let id = app.client_id();
    for bad in [
        "",
        "not json",
        r#"{"active":true}"#,
        r#"{"active":"maybe","freeze":false}"#,
    ] {
        let (status, body) = post_activity(&app, &[("clientId", &id), ("activity", bad)]).await;
        assert_eq!(status, 400, "{bad}");
        assert!(body["errors"]["activity"].is_string(), "{bad}: {body}");
    }
    let (status, body) = post_activity(
        &app,
        &[
            ("clientId", &id),
            ("activity", r#"{"active":true,"freeze":false}"#),
            ("systemUrl", "javascript:x"),
        ],
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["errors"]["systemUrl"].is_string(), "{body}");
    assert_eq!(
        app.state.store.activity().unwrap().updated_at,
        0,
        "nothing was stored"
    );
}
