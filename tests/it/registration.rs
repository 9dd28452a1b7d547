use pbxgate::config::UserCode;
use pbxgate::crm::registration::RegistrationState;
use pbxgate::crm::retailcrm::registration;
use pbxgate::crm::retailcrm::CrmClient;
use serde_json::json;

use crate::support::{fake_crm, FakeCrm, Fault, TestApp};

const EDIT: &str = "/api/v5/integration-modules/pbxgate/edit";

#[tokio::test]
async fn registers_on_start_with_exactly_the_specified_body() {
    let app = TestApp::spawn(|_| {}).await;
    let reqs = app.crm.wait_for_requests(EDIT, 1).await;
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.api_key.as_deref(), Some(fake_crm::API_KEY));
    assert!(r
        .content_type
        .as_deref()
        .unwrap()
        .starts_with("application/x-www-form-urlencoded"));
    assert_eq!(r.form.keys().collect::<Vec<_>>(), vec!["integrationModule"]);
    let base = &app.base;
    let expected = json!({
        "code": "pbxgate",
        "integrationCode": "pbxgate",
        "active": true,
        "name": "pbxgate",
        "logo": format!("{base}/static/logo.svg"),
        "clientId": app.client_id(),
        "baseUrl": base,
        "actions": {"activity": "/crm/activity"},
        "integrations": {"telephony": {
            "makeCallUrl": format!("{base}/crm/make-call"),
            "changeUserStatusUrl": format!("{base}/crm/user-status"),
            "allowEdit": false,
            "inputEventSupported": true,
            "outputEventSupported": true,
            "hangupEventSupported": true,
            "additionalCodes": [{"userId": 1, "code": "101"}, {"userId": 2, "code": "102"}],
            "externalPhones": [{"siteCode": "shop1", "externalPhone": "+74951234567"}]
        }}
    });
    assert_eq!(r.form_json("integrationModule"), expected);
    assert_eq!(r.status, 201);

    let state = app
        .state
        .registration
        .wait_for(|s| *s != RegistrationState::Pending)
        .await;
    assert_eq!(state, RegistrationState::Registered);
    let ready: serde_json::Value = app.ready().await;
    assert_eq!(ready["crm"]["registration"], "registered");
}

#[tokio::test]
async fn the_logo_url_we_register_serves_an_svg() {
    let app = TestApp::spawn(|c| c.crm.register_on_start = false).await;
    let resp = app
        .http
        .get(app.url("/static/logo.svg"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/svg+xml");
    assert!(resp.text().await.unwrap().starts_with("<svg"));
}

#[tokio::test]
async fn registration_survives_a_crm_outage_at_startup() {
    let crm = FakeCrm::start().await;
    crm.fail_next_on(EDIT, Fault::Status(503));
    crm.fail_next_on(EDIT, Fault::Status(500));
    let app = TestApp::spawn_with(crm, |_| {}).await;
    let state = app
        .state
        .registration
        .wait_for(|s| *s != RegistrationState::Pending)
        .await;
    assert_eq!(state, RegistrationState::Registered);
    let statuses: Vec<u16> = app.crm.requests_to(EDIT).iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![503, 500, 201]);
    assert!(app.crm.module().is_some());
}

#[tokio::test]
async fn unknown_users_and_shops_are_reported() {
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.users.push(UserCode {
            user_id: 99,
            code: "199".into(),
        });
        c.external_phones.push(pbxgate::config::ExternalPhone {
            site: "nosuchshop".into(),
            number: "+74950000000".into(),
        });
    })
    .await;
    let crm = CrmClient::new(&app.state.config.crm).unwrap();
    let info = registration::register(&crm, &app.state.config, &app.state.client_id)
        .await
        .unwrap();
    assert_eq!(info.not_exist_users_ids, vec![99]);
    assert_eq!(info.not_exist_site_codes, vec!["nosuchshop".to_string()]);
}

#[tokio::test]
async fn registration_is_refused_by_a_wrong_key_and_not_retried() {
    let app =
        TestApp::spawn(|c| c.crm.api_key = pbxgate::base::secret::Secret::new("wrong-key")).await;
    let state = app
        .state
        .registration
        .wait_for(|s| *s != RegistrationState::Pending)
        .await;
    match state {
        RegistrationState::Failed(msg) => assert!(msg.contains("API key"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(app.crm.requests_to(EDIT).len(), 1);
}
