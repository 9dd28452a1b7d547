//! The CallGate-compatible API (`/rest/...`) against the fake retailCRM and the scripted AMI:
//! dialplans written for CallGate route, show, hide and finish calls through pbxgate.

use std::time::Duration;

use pbxgate::base::secret::Secret;
use pbxgate::calls::{Direction, Outcome};
use pbxgate::config::Config;
use serde_json::{json, Value};

use crate::support::{finished, FakeCrm, TestApp};

const UKEY: &str = "cg-ukey-0123456789abcdef";
const EVENT: &str = "/api/v5/telephony/call/event";
const MANAGER: &str = "/api/v5/telephony/manager";

async fn app(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let crm = FakeCrm::start().await;
    crm.set_manager("+79161234567", 7, "101");
    // A manager with no extension in the CRM, and none in `[[users]]` either.
    crm.set_manager("+79162222222", 9, "");
    TestApp::spawn_with(crm, |c| {
        c.crm.register_on_start = false;
        c.callgate.ukey = Secret::new(UKEY);
        c.phone.country_code = "7".into();
        c.phone.national_prefix = "8".into();
        c.phone.national_length = 10;
        c.routing.fallback_code = "100".into();
        tweak(c);
    })
    .await
}

/// `GET /rest/{method}/?ukey=...&...`: status and body.
async fn get(app: &TestApp, method: &str, params: &[(&str, &str)]) -> (u16, String) {
    let mut q = vec![("ukey", UKEY)];
    q.extend_from_slice(params);
    let r = app
        .http
        .get(app.url(&format!("/rest/{method}/")))
        .query(&q)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn get_json(app: &TestApp, method: &str, params: &[(&str, &str)]) -> (u16, Value) {
    let (status, body) = get(app, method, params).await;
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body:?}: {e}"));
    (status, v)
}

#[tokio::test]
async fn every_route_refuses_a_missing_or_wrong_ukey() {
    let app = app(|_| {}).await;
    app.ami_connected().await;
    let bad = json!({"error": "bad_ukey"});
    for ukey in [None, Some("cg-ukey-0123456789abcdeX"), Some("")] {
        let q = |rest: &str| match ukey {
            Some(k) => format!("?ukey={k}&{rest}"),
            None => format!("?{rest}"),
        };
        let requests = [
            app.http
                .get(app.url(&format!("/rest/find_assignee/{}", q("phone=89161234567")))),
            app.http
                .get(app.url(&format!("/rest/find_assignee{}", q("phone=89161234567")))),
            app.http.get(app.url(&format!(
                "/rest/register_call/{}",
                q("phone=89161234567&direction=incoming")
            ))),
            app.http
                .get(app.url(&format!("/rest/telephony_hide/{}", q("call_id=x")))),
            app.http
                .get(app.url(&format!("/rest/telephony_finish{}", q("call_id=x")))),
            app.http
                .post(app.url(&format!(
                    "/rest/telephony_predial/{}",
                    q("internal_phone=101")
                )))
                .form(&[("data[PHONE_NUMBER]", "89161234567")]),
            app.http.get(app.url(&format!(
                "/rest/telephony_predial{}",
                q("internal_phone=101&data[PHONE_NUMBER]=89161234567")
            ))),
            app.http
                .post(app.url(&format!("/rest/bitrix_api/{}", q("method=user.current")))),
        ];
        for req in requests {
            let r = req.send().await.unwrap();
            let url = r.url().path().to_string();
            assert_eq!(r.status(), 403, "{url} with {ukey:?}");
            assert_eq!(r.json::<Value>().await.unwrap(), bad, "{url}");
        }
    }
    // CallGate's own form, the parameters after `/&`: the wrong key there too.
    let r = app
        .http
        .post(app.url("/rest/telephony_predial/&ukey=nope&internal_phone=101"))
        .form(&[("data[PHONE_NUMBER]", "89161234567")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Nothing reached the CRM or the PBX.
    assert!(app.crm.requests_to(MANAGER).is_empty());
    assert!(app.ami.actions("Originate").is_empty());
    assert!(app.state.recent_calls.all().is_empty());
}

#[tokio::test]
async fn an_empty_ukey_turns_the_api_off() {
    let app = app(|c| c.callgate.ukey = Secret::default()).await;
    for ukey in ["", UKEY] {
        let r = app
            .http
            .get(app.url("/rest/find_assignee/"))
            .query(&[("ukey", ukey), ("phone", "89161234567")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(r.json::<Value>().await.unwrap()["error"], "bad_ukey");
    }
}

#[tokio::test]
async fn find_assignee_answers_the_manager_nobody_or_no_internal_numbers() {
    let app = app(|_| {}).await;
    // CallGate's own example writes `+` unencoded (decoded as a space): still the number.
    let r = app
        .http
        .get(app.url(&format!(
            "/rest/find_assignee/?ukey={UKEY}&phone=+7%20916%20123-45-67"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"internal_number": "101", "error": 0})
    );
    assert_eq!(
        app.crm.requests_to(MANAGER)[0].query["phone"],
        "+79161234567"
    );

    // Nobody responsible: `[]`, although /pbx/route would give the fallback.
    let (status, body) = get(&app, "find_assignee", &[("phone", "89260000000")]).await;
    assert_eq!((status, body.as_str()), (200, "[]"));
    // The manager has no extension.
    let (status, v) = get_json(&app, "find_assignee", &[("phone", "89162222222")]).await;
    assert_eq!((status, v), (200, json!({"error": "no_internal_numbers"})));
    // An anonymous caller.
    let (_, body) = get(&app, "find_assignee", &[("phone", "")]).await;
    assert_eq!(body, "[]");

    // Bad input names the field; nothing started.
    let (status, v) = get_json(&app, "find_assignee", &[]).await;
    assert_eq!(status, 400);
    assert!(v["errors"]["phone"].is_string(), "{v}");
    let (status, v) = get_json(
        &app,
        "find_assignee",
        &[
            ("phone", "89161234567"),
            ("telephony_show", "y"),
            ("internal_phone", "101|10x"),
            ("external_call_id", "has space"),
        ],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(v["error"], "bad_param");
    assert!(
        v["errors"]["internal_phone"].is_string() && v["errors"]["external_call_id"].is_string(),
        "{v}"
    );
    let many = vec!["101"; 21].join("|");
    let (status, v) = get_json(
        &app,
        "find_assignee",
        &[("phone", "89161234567"), ("internal_phone", &many)],
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(app.state.recent_calls.all().is_empty());
    assert!(app.crm.requests_to(EVENT).is_empty());
}

#[tokio::test]
async fn a_shown_call_rings_is_hidden_and_finished_at_the_crm() {
    let app = app(|_| {}).await;
    let id = "1795264605.55";
    let external_id = format!("pbx-{id}");
    // As CallGate's example: plaintext call id (retailCRM keeps no id of its own: ours).
    let (status, body) = get(
        &app,
        "find_assignee",
        &[
            ("phone", "89161234567"),
            ("telephony_show", "y"),
            ("internal_phone", "101|102"),
            ("external_call_id", id),
            ("return_only_call_id", "y"),
        ],
    )
    .await;
    assert_eq!((status, body.as_str()), (200, id));
    // One pop-up per internal phone.
    let events = app.crm.wait_for_requests(EVENT, 2).await;
    let pops: Vec<Value> = events.iter().map(|r| r.form_json("event")).collect();
    let mut codes: Vec<&str> = pops
        .iter()
        .map(|e| {
            assert_eq!(
                (&e["type"], &e["phone"], &e["callExternalId"]),
                (&json!("in"), &json!("+79161234567"), &json!(external_id))
            );
            e["codes"][0].as_str().unwrap()
        })
        .collect();
    codes.sort();
    assert_eq!(codes, ["101", "102"]);

    // 102 answered: 101's card is hidden, 102's kept.
    let (status, body) = get(
        &app,
        "telephony_hide",
        &[("call_id", id), ("internal_phone_answered", "102")],
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "true"));
    let (_, body) = get(
        &app,
        "telephony_hide",
        &[("call_id", id), ("internal_phone", "101")],
    )
    .await;
    assert_eq!(body, "false", "nothing left to hide");
    let (_, body) = get(&app, "telephony_hide", &[("call_id", "unknown.1")]).await;
    assert_eq!(body, "false");

    let record = "https://user:pass@rec.example.com/sound.mp3";
    let (status, v) = get_json(
        &app,
        "telephony_finish",
        &[
            ("call_id", id),
            ("internal_phone_answered", "102"),
            ("duration", "30"),
            ("record_url", record),
        ],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (
            &v["error"],
            &v["id"],
            &v["duration"],
            &v["status"],
            &v["internal_phone_answered"]
        ),
        (
            &json!(0),
            &json!(external_id),
            &json!(30),
            &json!("answered"),
            &json!("102")
        ),
        "{v}"
    );

    let calls = finished(&app, 1).await;
    let c = &calls[0];
    assert_eq!(
        (
            c.external_id.as_str(),
            c.direction,
            c.customer_number.as_str()
        ),
        (external_id.as_str(), Direction::In, "+79161234567")
    );
    assert_eq!(
        (c.answered_by.as_deref(), c.talk_seconds, c.outcome),
        (Some("102"), 30, Outcome::Answered)
    );
    let rings: Vec<(&str, Option<&str>)> = c
        .rings
        .iter()
        .map(|r| (r.extension.as_str(), r.status.as_deref()))
        .collect();
    assert_eq!(rings, [("101", Some("CANCEL")), ("102", Some("ANSWER"))]);
    assert_eq!(c.recordings, [record.to_string()]);

    // The history at the CRM: the manager who talked, the talk time, the recording as given.
    let up = app
        .crm
        .wait_for_call(&external_id, Duration::from_secs(15))
        .await
        .expect("uploaded");
    assert_eq!(
        (
            &up["code"],
            &up["duration"],
            &up["result"],
            &up["recordUrl"]
        ),
        (
            &json!("102"),
            &json!(30),
            &json!("answered"),
            &json!(record)
        ),
        "{up}"
    );
    // The pop-ups were closed by the hangup, for the manager.
    let events = app.crm.wait_for_requests(EVENT, 3).await;
    let hangup = events[2].form_json("event");
    assert_eq!(
        (&hangup["type"], &hangup["codes"], &hangup["hangupStatus"]),
        (&json!("hangup"), &json!(["102"]), &json!("answered")),
        "{hangup}"
    );

    // Finished once: again, it says so (and cannot attach a recording any more).
    let (_, v) = get_json(
        &app,
        "telephony_finish",
        &[("call_id", id), ("record_url", record)],
    )
    .await;
    assert_eq!(v["error"], "already_finished");
    let (_, v) = get_json(&app, "telephony_finish", &[("call_id", "unknown.1")]).await;
    assert_eq!(v, json!({"error": "call_not_found"}));
    assert_eq!(app.state.recent_calls.count(), 1);
}

#[tokio::test]
async fn finish_without_a_duration_counts_from_find_assignee() {
    let app = app(|_| {}).await;
    let (_, v) = get_json(
        &app,
        "find_assignee",
        &[("phone", "89161234567"), ("telephony_show", "")],
    )
    .await;
    // Without internal phones the assignee's rings; the answer names our call.
    assert_eq!(v["internal_number"], "101");
    let id = v["call_id"].as_str().expect("a call id").to_string();
    app.crm.wait_for_requests(EVENT, 1).await;
    let (_, v) = get_json(
        &app,
        "telephony_finish",
        &[("call_id", &id), ("internal_phone_answered", "101")],
    )
    .await;
    assert_eq!((&v["error"], &v["status"]), (&json!(0), &json!("answered")));
    let c = &finished(&app, 1).await[0];
    assert_eq!(
        (c.answered_by.as_deref(), c.wait_seconds, c.outcome),
        (Some("101"), 0, Outcome::Answered)
    );
    assert!(c.talk_seconds <= 2, "{}", c.talk_seconds);
}

#[tokio::test]
async fn register_call_lookup_makes_no_call_and_a_registered_call_is_finished() {
    let app = app(|_| {}).await;
    let (status, v) = get_json(
        &app,
        "register_call",
        &[("phone", "+79161234567"), ("lookup", "")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        (&v["error"], &v["action"], &v["internal_number"], &v["id"]),
        (&json!(0), &json!("lookup"), &json!("101"), &json!(7)),
        "{v}"
    );
    let (_, body) = get(
        &app,
        "register_call",
        &[("phone", "+79260000000"), ("lookup", "")],
    )
    .await;
    assert_eq!(body, "[]");
    assert!(
        app.state
            .tracker_stats
            .live_calls
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
    );
    assert!(app.crm.requests_to(EVENT).is_empty());

    // Bad input names the field.
    let (status, v) = get_json(
        &app,
        "register_call",
        &[
            ("phone", "+79161234567"),
            ("direction", "sideways"),
            ("tz", "99"),
        ],
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        v["errors"]["direction"].is_string() && v["errors"]["tz"].is_string(),
        "{v}"
    );

    // An outgoing call placed by 101, answered by the customer, then finished.
    let (status, v) = get_json(
        &app,
        "register_call",
        &[
            ("phone", "+7 916 123-45-67"),
            ("direction", "outgoing"),
            ("internal_phone", "101"),
            ("call_id", "out.1"),
            ("comment", "Recalling after meeting"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v,
        json!({"error": 0, "target": "call", "action": "new", "id": "pbx-out.1", "call_id": "out.1"})
    );
    let (_, v) = get_json(
        &app,
        "register_call",
        &[
            ("phone", "+79161234567"),
            ("direction", "outgoing"),
            ("call_id", "out.1"),
        ],
    )
    .await;
    assert_eq!(v["action"], "update");
    let (_, v) = get_json(
        &app,
        "telephony_finish",
        &[
            ("call_id", "out.1"),
            ("internal_phone_answered", "101"),
            ("duration", "12"),
        ],
    )
    .await;
    assert_eq!(v["duration"], 12, "{v}");
    // A missed incoming call, registered once it is over.
    let (_, v) = get_json(
        &app,
        "register_call",
        &[
            ("phone", "+79161234567"),
            ("direction", "incoming"),
            ("internal_phone", "102"),
            ("no_answer", ""),
        ],
    )
    .await;
    assert_eq!(v["action"], "new");
    let missed_id = v["id"].as_str().unwrap().to_string();

    let calls = finished(&app, 2).await;
    let out = calls.iter().find(|c| c.external_id == "pbx-out.1").unwrap();
    assert_eq!(
        (
            out.direction,
            out.placed_by.as_deref(),
            out.talk_seconds,
            out.outcome
        ),
        (Direction::Out, Some("101"), 12, Outcome::Answered)
    );
    let missed = calls.iter().find(|c| c.external_id == missed_id).unwrap();
    assert_eq!(
        (missed.direction, missed.outcome, missed.code.as_deref()),
        (Direction::In, Outcome::NoAnswer, Some("102"))
    );
    let up = app
        .crm
        .wait_for_call("pbx-out.1", Duration::from_secs(15))
        .await
        .expect("uploaded");
    assert_eq!((&up["type"], &up["code"]), (&json!("out"), &json!("101")));
}

#[tokio::test]
async fn predial_originates_from_the_users_extension() {
    let app = app(|_| {}).await;
    app.ami_connected().await;
    // Bitrix24's event: user 2 is 102 in the directory (`[[users]]`).
    let r = app
        .http
        .post(app.url(&format!("/rest/telephony_predial/?ukey={UKEY}")))
        .form(&[
            ("event", "ONEXTERNALCALLSTART"),
            ("data[PHONE_NUMBER]", "8 (916) 123-45-67"),
            ("data[USER_ID]", "2"),
            ("data[CALL_ID]", "externalCall.abc"),
            ("auth[domain]", "acme.bitrix24.ru"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (&v["error"], &v["internal_number"]),
        (&json!(0), &json!("102")),
        "{v}"
    );
    let o = &app.ami.wait_for_actions("Originate", 1).await[0];
    assert_eq!(o.get("Channel"), Some("Local/102@from-internal"));
    assert_eq!(o.get("Exten"), Some("89161234567"));
    assert_eq!(
        o.get("Context"),
        Some(app.state.config.ami.outbound_context.as_str())
    );
    assert_eq!(v["call_id"].as_str(), o.get("ChannelId"));
    assert!(o.get_all("Variable").any(|v| v == "__PBXGATE_USER_ID=2"));

    // CallGate's URL form (`/&...`), internal_phone as the fallback for an event without a user.
    let r = app
        .http
        .post(app.url(&format!(
            "/rest/telephony_predial/&ukey={UKEY}&internal_phone=101&sip_context=ring-group"
        )))
        .form(&[("data[PHONE_NUMBER]", "555-55-55")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let o = &app.ami.wait_for_actions("Originate", 2).await[1];
    assert_eq!(
        (o.get("Channel"), o.get("Exten"), o.get("Context")),
        (
            Some("Local/101@from-internal"),
            Some("5555555"),
            Some("ring-group")
        )
    );

    // A user with no extension and no fallback; a number that is none.
    let (status, v) = get_json(
        &app,
        "telephony_predial",
        &[
            ("data[PHONE_NUMBER]", "89161234567"),
            ("data[USER_ID]", "77"),
        ],
    )
    .await;
    assert_eq!((status, v), (200, json!({"error": "no_internal_numbers"})));
    let (status, v) = get_json(
        &app,
        "telephony_predial",
        &[("data[PHONE_NUMBER]", "x"), ("internal_phone", "101")],
    )
    .await;
    assert_eq!(status, 400);
    assert!(v["errors"]["data[PHONE_NUMBER]"].is_string(), "{v}");
    assert_eq!(app.ami.actions("Originate").len(), 2);
}

#[tokio::test]
async fn bitrix_api_with_retailcrm_names_the_crm() {
    let app = app(|_| {}).await;
    let post = |query: String, body: &'static str| {
        app.http
            .post(app.url(&format!("/rest/bitrix_api/?ukey={UKEY}&{query}")))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
    };
    let r = post(
        "method=crm.lead.list".into(),
        r#"{"filter":{"PHONE":"555-55-55"}}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 501);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "not_supported");
    assert!(v["message"].as_str().unwrap().contains("retailCRM"), "{v}");
    let r = post("method=crm/lead".into(), "").await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.unwrap()["errors"]["method"].is_string());
    let r = post(format!("method={}", "a".repeat(101)), "")
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = post("method=user.current".into(), "not json")
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.unwrap()["errors"]["body"].is_string());
    let r = post("method=user.current".into(), "[1]").await.unwrap();
    assert_eq!(r.status(), 400);
}
