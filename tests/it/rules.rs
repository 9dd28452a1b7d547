//! Registration rules and number normalisation end to end: real captures (or webhooks) in, what
//! reaches the fake CRM out.

use std::time::Duration;

use pbxgate::base::secret::Secret;
use pbxgate::calls::CallRecord;
use pbxgate::config::{Config, FmcNumber, RuleAction, RuleConfig};
use serde_json::{json, Value};

use crate::support::{capture_body, finished, lab_app, TestApp};

const EVENT: &str = "/api/v5/telephony/call/event";
const UPLOAD: &str = "/api/v5/telephony/calls/upload";

fn rule(action: RuleAction) -> RuleConfig {
    RuleConfig::new(action)
}

fn event_ids(app: &TestApp) -> Vec<String> {
    app.crm
        .requests_to(EVENT)
        .iter()
        .map(|r| {
            r.form_json("event")["callExternalId"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn by_id<'a>(calls: &'a [CallRecord], id: &str) -> &'a CallRecord {
    calls.iter().find(|c| c.external_id == id).unwrap()
}

/// 06: a click-to-call placed by extension 103; 03: an inbound call ringing 101 and 102.
const C06: &str = "lab-1795264533.32";
const C03: &str = "lab-1795264488.20";
/// 09: an inbound call over PJSIP/trunk.
const C09: &str = "lab-1795264721.70";

#[tokio::test]
async fn a_call_of_an_ignored_extension_sends_nothing_to_the_crm() {
    let app = lab_app(|c| {
        c.history.batch_window = Duration::from_millis(50);
        c.rules = vec![RuleConfig {
            extension: vec!["103".into()],
            ..rule(RuleAction::Ignore)
        }];
    })
    .await;
    app.ami
        .send(&capture_body("06_live_channels_status_hangup"));
    app.ami.send(&capture_body("03_inbound_from_trunk"));
    let calls = finished(&app, 2).await;
    let ignored = by_id(&calls, C06);
    assert!(ignored.ignored);
    assert_eq!(ignored.registration.as_deref(), Some("ignore by rules[0]"));
    let kept = by_id(&calls, C03);
    assert!(!kept.ignored);
    assert_eq!(kept.registration.as_deref(), Some("register by default"));

    // Live events go out in order: once the second call's hangup is there, the first call's
    // events would have been sent before it.
    app.crm.wait_for_requests(EVENT, 3).await;
    assert!(
        event_ids(&app).iter().all(|id| id == C03),
        "{:?}",
        event_ids(&app)
    );
    // The history holds only the registered call.
    app.crm.wait_for_requests(UPLOAD, 1).await;
    assert_eq!(app.crm.uploaded_ids(), vec![C03.to_string()]);
    let s = app.state.outbox.status();
    assert_eq!(s.pending + s.done + s.dead, 1, "{s:?}");
    assert_eq!(
        app.state
            .tracker_stats
            .ignored
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn a_white_list_by_trunk_and_direction() {
    let app = lab_app(|c| {
        c.history.batch_window = Duration::from_millis(50);
        c.rules = vec![
            RuleConfig {
                name: Some("main trunk".into()),
                trunk: vec!["trunk".into()],
                ..rule(RuleAction::Register)
            },
            RuleConfig {
                direction: vec!["in".into()],
                ..rule(RuleAction::Ignore)
            },
        ];
    })
    .await;
    // 03 arrives over a Local channel in from-trunk, 09 over PJSIP/trunk.
    app.ami.send(&capture_body("03_inbound_from_trunk"));
    app.ami.send(&capture_body("09_inbound_missed"));
    let calls = finished(&app, 2).await;
    assert_eq!(by_id(&calls, C09).trunk.as_deref(), Some("PJSIP/trunk"));
    assert_eq!(
        by_id(&calls, C09).registration.as_deref(),
        Some("register by rules[0] (main trunk)")
    );
    assert_eq!(
        by_id(&calls, C03).registration.as_deref(),
        Some("ignore by rules[1]")
    );
    app.crm.wait_for_requests(EVENT, 3).await;
    assert!(
        event_ids(&app).iter().all(|id| id == C09),
        "{:?}",
        event_ids(&app)
    );
    app.crm.wait_for_requests(UPLOAD, 1).await;
    assert_eq!(app.crm.uploaded_ids(), vec![C09.to_string()]);
}

#[tokio::test]
async fn numbers_reach_the_crm_in_canonical_form_and_employees_mobiles_stay_out() {
    let token = "webhook-token-0123456789";
    let app = lab_app(|c| {
        c.pbx.token = Secret::new(token);
        c.phone.country_code = "7".into();
        c.phone.national_prefix = "8".into();
        c.phone.national_length = 10;
        c.phone.fmc = vec![FmcNumber {
            number: "+7 916 000-00-01".into(),
            code: "101".into(),
        }];
    })
    .await;
    let post = |body: Value| {
        app.http
            .post(app.url("/pbx/events"))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    // First the employee calling from her mobile, then a customer in national format.
    let r = post(json!([
        {"call_id": "fmc", "event": "start", "direction": "in", "phone": "89160000001", "did": "84951234567", "at": "2026-11-21T10:00:00Z"},
        {"call_id": "fmc", "event": "ringing", "extension": "102", "at": "2026-11-21T10:00:01Z"},
        {"call_id": "fmc", "event": "hangup", "at": "2026-11-21T10:00:09Z"},
        {"call_id": "c1", "event": "start", "direction": "in", "phone": "8 (999) 123-45-67", "did": "84951234567", "at": "2026-11-21T10:01:00Z"},
        {"call_id": "c1", "event": "ringing", "extension": "101", "at": "2026-11-21T10:01:01Z"},
        {"call_id": "c1", "event": "answer", "extension": "101", "at": "2026-11-21T10:01:05Z"},
        {"call_id": "c1", "event": "hangup", "at": "2026-11-21T10:02:05Z"}
    ]))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let calls = finished(&app, 2).await;
    let fmc = by_id(&calls, "lab-fmc");
    assert!(fmc.ignored);
    assert!(
        fmc.registration.as_deref().unwrap().contains("phone.fmc"),
        "{:?}",
        fmc.registration
    );
    let c1 = by_id(&calls, "lab-c1");
    assert_eq!(c1.customer_number, "+79991234567");
    assert_eq!(c1.phone_original.as_deref(), Some("89991234567"));
    assert_eq!(c1.did.as_deref(), Some("+74951234567"));

    app.crm.wait_for_requests(EVENT, 2).await;
    let evs: Vec<Value> = app
        .crm
        .requests_to(EVENT)
        .iter()
        .map(|r| r.form_json("event"))
        .collect();
    assert!(
        evs.iter().all(|e| e["callExternalId"] == "lab-c1"),
        "{evs:?}"
    );
    assert_eq!(evs[0]["phone"], "+79991234567");
    assert_eq!(evs[0]["externalPhone"], "+74951234567");
    assert_eq!(evs[0]["site"], "shop1", "the canonical DID finds its shop");
    app.crm.wait_for_requests(UPLOAD, 1).await;
    let uploaded = app.crm.requests_to(UPLOAD)[0].form_json("calls");
    assert_eq!(uploaded.as_array().unwrap().len(), 1);
    assert_eq!(uploaded[0]["phone"], "+79991234567");
    assert_eq!(uploaded[0]["externalId"], "lab-c1");
}

#[test]
fn invalid_rules_fail_at_start_naming_the_rule() {
    let text = r#"
[[rules]]
action = "ignore"
extension = "101"

[[rules]]
action = "ignore"
phone = ["+7916.*", "("]
"#;
    let err = Config::from_toml_and_env(text, Vec::<(String, String)>::new()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("rules[1].phone[0]"), "{msg}");
    assert!(msg.contains("rules[1].phone[1]"), "{msg}");
    assert!(!msg.contains("rules[0]"), "{msg}");
}
