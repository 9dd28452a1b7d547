use serde_json::Value;

use crate::support::TestApp;

async fn quiet_app() -> TestApp {
    TestApp::spawn(|c| c.crm.register_on_start = false).await
}

#[tokio::test]
async fn health_and_ready() {
    let app = quiet_app().await;
    let r = app.http.get(app.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ok");

    let r = app.http.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["ready"], true);
    assert_eq!(body["store"]["ok"], true);
    assert_eq!(body["crm"]["configured"], true);
    assert_eq!(body["crm"]["registration"], "disabled");
    assert_eq!(body["crm"]["pushing"], true);
    assert!(
        !body.to_string().contains(&app.client_id()),
        "no secret in /ready"
    );
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let app = quiet_app().await;
    let r = app.http.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["success"], false);
    assert!(body["errorMsg"].is_string());

    let r = app
        .http
        .delete(app.url("/crm/make-call"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.json::<Value>().await.unwrap()["success"], false);

    let r = app.http.get(app.url("/crm/activity")).send().await.unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_json() {
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.http.max_body_bytes = 4096;
    })
    .await;
    let big = "a".repeat(10_000);
    let r = app
        .http
        .post(app.url("/crm/activity"))
        .form(&[("clientId", big.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["success"], false);
    assert_eq!(app.state.store.activity().unwrap().updated_at, 0);
}

#[tokio::test]
async fn callbacks_check_the_client_id_from_query_or_form() {
    let app = quiet_app().await;
    let id = app.client_id();
    for path in ["/crm/make-call", "/crm/user-status"] {
        // No clientId: 400 naming it.
        let r = app
            .http
            .get(app.url(path))
            .query(&[("code", "101")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
        assert!(r.json::<Value>().await.unwrap()["errors"]["clientId"].is_string());
        // Wrong clientId: 403, by GET and by POST.
        let r = app
            .http
            .get(app.url(path))
            .query(&[("clientId", "wrong")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
        let r = app
            .http
            .post(app.url(path))
            .form(&[("clientId", "wrong")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
        // Right clientId gets past the check to the parameter validation.
        let r = app
            .http
            .get(app.url(path))
            .query(&[("clientId", id.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
        let r = app
            .http
            .post(app.url(path))
            .form(&[("clientId", id.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["success"], false);
        assert!(body["errors"]["code"].is_string(), "{body}");
    }
}

#[tokio::test]
async fn the_admin_page_is_served() {
    let app = quiet_app().await;
    let r = app.http.get(app.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(r.text().await.unwrap().contains("/ready"));
}
