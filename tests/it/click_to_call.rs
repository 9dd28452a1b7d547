//! makeCallUrl → exactly one Originate on the scripted AMI server.

use std::time::Duration;

use serde_json::Value;

use crate::support::fake_ami::Reply;
use crate::support::TestApp;

async fn app_with(tweak: impl FnOnce(&mut pbxgate::config::Config)) -> TestApp {
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        tweak(c);
    })
    .await;
    app.ami_connected().await;
    app
}

async fn call(app: &TestApp, params: &[(&str, &str)]) -> (u16, Value) {
    let id = app.client_id();
    let mut q: Vec<(&str, &str)> = vec![("clientId", id.as_str())];
    q.extend_from_slice(params);
    let r = app
        .http
        .get(app.url("/crm/make-call"))
        .query(&q)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

const OK: &[(&str, &str)] = &[
    ("code", "101"),
    ("phone", "+7 (999) 123-45-67"),
    ("userId", "7"),
    ("externalPhone", "+74951234567"),
];

#[tokio::test]
async fn make_call_originates_once_with_the_expected_fields() {
    let app = app_with(|_| {}).await;
    let (status, body) = call(&app, OK).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true);
    let originates = app.ami.wait_for_actions("Originate", 1).await;
    assert_eq!(originates.len(), 1);
    let o = &originates[0];
    assert_eq!(o.get("Channel"), Some("Local/101@from-internal"));
    assert_eq!(o.get("Context"), Some("from-internal"));
    assert_eq!(o.get("Exten"), Some("+79991234567"));
    assert_eq!(o.get("Priority"), Some("1"));
    assert_eq!(o.get("CallerID"), Some("\"+79991234567\" <+79991234567>"));
    assert_eq!(o.get("Timeout"), Some("30000"));
    assert_eq!(o.get("Async"), Some("true"));
    let call_id = o.get("ChannelId").unwrap();
    assert!(
        call_id.starts_with("pbxgate-c2c-") && call_id.len() < 150,
        "{call_id}"
    );
    assert_eq!(body["callId"], call_id);
    let vars: Vec<&str> = o.get_all("Variable").collect();
    assert!(vars.contains(&"__PBXGATE_C2C=1"), "{vars:?}");
    assert!(vars.contains(&"__PBXGATE_USER_ID=7"), "{vars:?}");
    assert!(vars.contains(&"__PBXGATE_CODE=101"), "{vars:?}");
    assert!(
        vars.contains(&"__PBXGATE_EXTERNAL_PHONE=+74951234567"),
        "{vars:?}"
    );
    assert!(
        vars.contains(&format!("__PBXGATE_CALL_ID={call_id}").as_str()),
        "{vars:?}"
    );
}

#[tokio::test]
async fn a_pjsip_channel_template_and_post_form_work() {
    let app = app_with(|c| {
        c.ami.originate_channel = "PJSIP/{code}".into();
        c.ami.outbound_context = "outbound".into();
    })
    .await;
    let id = app.client_id();
    let r = app
        .http
        .post(app.url("/crm/make-call"))
        .form(&[
            ("clientId", id.as_str()),
            ("code", "102"),
            ("phone", "89991234567"),
            ("userId", "2"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let o = &app.ami.wait_for_actions("Originate", 1).await[0];
    assert_eq!(
        (o.get("Channel"), o.get("Context"), o.get("Exten")),
        (Some("PJSIP/102"), Some("outbound"), Some("89991234567"))
    );
}

#[tokio::test]
async fn a_wrong_client_id_is_403_and_nothing_is_sent() {
    let app = app_with(|_| {}).await;
    let r = app
        .http
        .get(app.url("/crm/make-call"))
        .query(&[
            ("clientId", "forged"),
            ("code", "101"),
            ("phone", "+79991234567"),
            ("userId", "7"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // A valid request afterwards is the first Originate the PBX sees.
    let (status, _) = call(&app, OK).await;
    assert_eq!(status, 200);
    app.ami.wait_for_actions("Originate", 1).await;
    assert_eq!(app.ami.actions("Originate").len(), 1);
    assert_eq!(
        app.ami.actions("Originate")[0].get("Exten"),
        Some("+79991234567")
    );
}

#[tokio::test]
async fn invalid_parameters_are_400_naming_each_field_and_nothing_is_sent() {
    let app = app_with(|_| {}).await;
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (
            &[("code", "10a"), ("phone", "+79991234567"), ("userId", "7")],
            &["code"],
        ),
        (
            &[("code", "101"), ("phone", "12"), ("userId", "7")],
            &["phone"],
        ),
        (
            &[("code", "101"), ("phone", "+7999abc"), ("userId", "7")],
            &["phone"],
        ),
        (
            &[("code", "101"), ("phone", "+79991234567"), ("userId", "0")],
            &["userId"],
        ),
        (
            &[("code", "101"), ("phone", "+79991234567"), ("userId", "x")],
            &["userId"],
        ),
        (
            &[
                ("code", "101"),
                ("phone", "+79991234567"),
                ("userId", "7"),
                ("externalPhone", "nope"),
            ],
            &["externalPhone"],
        ),
        (
            &[
                ("code", "12345678901234567"),
                ("phone", "1"),
                ("userId", "-1"),
            ],
            &["code", "phone", "userId"],
        ),
        (
            &[
                ("code", "101\r\nAction: Originate"),
                ("phone", "+79991234567"),
                ("userId", "7"),
            ],
            &["code"],
        ),
        (&[], &["code", "phone", "userId"]),
    ];
    for (params, fields) in cases {
        let (status, body) = call(&app, params).await;
        assert_eq!(status, 400, "{params:?}: {body}");
        for f in *fields {
            assert!(
                body["errors"][f].is_string(),
                "{params:?}: {f} not named in {body}"
            );
        }
    }
    // Proof that the PBX saw none of them: the next valid call is the first Originate.
    call(&app, OK).await;
    app.ami.wait_for_actions("Originate", 1).await;
    assert_eq!(app.ami.actions("Originate").len(), 1);
}

#[tokio::test]
async fn a_double_click_originates_once() {
    let app = app_with(|_| {}).await;
    let (a, b) = tokio::join!(call(&app, OK), call(&app, OK));
    assert_eq!((a.0, b.0), (200, 200));
    let (c, body) = call(&app, OK).await;
    assert_eq!(c, 200);
    assert_eq!(body["duplicate"], true);
    // Another number from the same extension is a new call.
    let (d, _) = call(
        &app,
        &[("code", "101"), ("phone", "+79990000001"), ("userId", "7")],
    )
    .await;
    assert_eq!(d, 200);
    app.ami.wait_for_actions("Originate", 2).await;
    let exts: Vec<String> = app
        .ami
        .actions("Originate")
        .iter()
        .map(|o| o.get("Exten").unwrap().to_string())
        .collect();
    assert_eq!(exts, vec!["+79991234567", "+79990000001"]);
}

#[tokio::test]
async fn the_dedupe_window_expires() {
    let app = app_with(|c| c.click_to_call.dedupe_window = Duration::from_millis(1)).await;
    call(&app, OK).await;
    app.ami.wait_for_actions("Originate", 1).await;
    tokio::time::sleep(Duration::from_millis(5)).await; // let the 1 ms window pass (not synchronisation)
    call(&app, OK).await;
    app.ami.wait_for_actions("Originate", 2).await;
}

#[tokio::test]
async fn rate_limits_answer_429() {
    let app = app_with(|c| {
        c.click_to_call.per_extension_per_minute = 2;
        c.click_to_call.global_per_minute = 3;
    })
    .await;
    let phone = |n: u32| format!("+7999000000{n}");
    for n in 0..2 {
        let (s, _) = call(
            &app,
            &[("code", "101"), ("phone", &phone(n)), ("userId", "7")],
        )
        .await;
        assert_eq!(s, 200);
    }
    let (s, body) = call(
        &app,
        &[("code", "101"), ("phone", &phone(2)), ("userId", "7")],
    )
    .await;
    assert_eq!(s, 429, "{body}");
    assert!(body["errors"]["code"].is_string());
    let (s, _) = call(
        &app,
        &[("code", "102"), ("phone", &phone(3)), ("userId", "2")],
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = call(
        &app,
        &[("code", "103"), ("phone", &phone(4)), ("userId", "3")],
    )
    .await;
    assert_eq!(s, 429, "global limit");
    app.ami.wait_for_actions("Originate", 3).await;
    assert_eq!(app.ami.actions("Originate").len(), 3);
}

#[tokio::test]
async fn asterisk_refusing_is_502_with_its_message_and_a_retry_is_allowed() {
    let app = app_with(|_| {}).await;
    app.ami.set_reply(
        "Originate",
        Reply::Error("Extension does not exist.".into()),
    );
    let (s, body) = call(&app, OK).await;
    assert_eq!(s, 502);
    assert!(
        body["errorMsg"]
            .as_str()
            .unwrap()
            .contains("Extension does not exist."),
        "{body}"
    );
    app.ami.clear_reply("Originate");
    let (s, _) = call(&app, OK).await;
    assert_eq!(s, 200, "a failed attempt does not count as the first click");
    assert_eq!(app.ami.wait_for_actions("Originate", 2).await.len(), 2);
}

#[tokio::test]
async fn ami_down_is_503_and_nothing_is_queued_for_later() {
    let app = app_with(|c| {
        c.ami.reconnect_min = Duration::from_secs(30);
        c.ami.reconnect_max = Duration::from_secs(60);
    })
    .await;
    app.ami.shutdown();
    app.state.ami.wait_disconnected().await;
    let (s, body) = call(&app, OK).await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["success"], false);
    assert!(app.ami.actions("Originate").is_empty());
}

/// A request body: its content type and the bytes.
type Body<'a> = Option<(&'a str, String)>;

/// A raw `GET /crm/make-call?{query}`, or with a body, a POST to that URL.
async fn raw_call(app: &TestApp, query: &str, body: Body<'_>) -> (u16, Value) {
    let url = app.url(&format!("/crm/make-call?{query}"));
    let r = match body {
        None => app.http.get(url).send().await.unwrap(),
        Some((content_type, body)) => app
            .http
            .post(url)
            .header("Content-Type", content_type)
            .body(body)
            .send()
            .await
            .unwrap(),
    };
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn ambiguous_parameters_are_400_naming_them_and_nothing_is_sent() {
    let app = app_with(|_| {}).await;
    let id = app.client_id();
    let rest = "phone=%2B79991234567&userId=7";
    const FORM: &str = "application/x-www-form-urlencoded";
    let cases: Vec<(&str, String, Body)> = vec![
        // The same parameter twice: no value is picked.
        (
            "code",
            format!("clientId={id}&code=101&code=103&{rest}"),
            None,
        ),
        (
            "clientId",
            format!("clientId=wrong&clientId={id}&code=101&{rest}"),
            None,
        ),
        (
            "code",
            String::new(),
            Some((FORM, format!("clientId={id}&code=101&{rest}&code=103"))),
        ),
        // In the query string and in the body.
        (
            "code",
            "code=103".to_string(),
            Some((FORM, format!("clientId={id}&code=101&{rest}"))),
        ),
        (
            "clientId",
            format!("clientId={id}"),
            Some((FORM, format!("clientId=wrong&code=101&{rest}"))),
        ),
        // Repeated in a JSON object.
        (
            "code",
            String::new(),
            Some((
                "application/json",
                format!(
                    r#"{{"clientId":"{id}","code":"101","code":"103","phone":"+79991234567","userId":"7"}}"#
                ),
            )),
        ),
        // A clientId with white space around it is not ours.
        (
            "clientId",
            format!("clientId=%20{id}&code=101&{rest}"),
            None,
        ),
        (
            "clientId",
            String::new(),
            Some((FORM, format!("clientId={id}%0A&code=101&{rest}"))),
        ),
    ];
    for (field, query, body) in cases {
        let what = format!("{query} / {body:?}");
        let (status, answer) = raw_call(&app, &query, body).await;
        assert_eq!(status, 400, "{what}: {answer}");
        assert_eq!(answer["success"], false);
        let problem = answer["errors"][field].as_str().unwrap_or_default();
        assert!(
            problem.contains("more than once")
                || problem.contains("both in the query string and in the body")
                || problem.contains("white space"),
            "{what}: {answer}"
        );
        assert!(
            !answer.to_string().contains(&id),
            "no secret in the answer: {answer}"
        );
    }
    assert!(app.ami.actions("Originate").is_empty());

    // Different parameters in the two places are not ambiguous.
    let (status, answer) = raw_call(
        &app,
        &format!("clientId={id}"),
        Some((FORM, format!("code=101&{rest}"))),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(app.ami.wait_for_actions("Originate", 1).await.len(), 1);
}
