use std::time::{Duration, Instant};

use pbxgate::base::secret::Secret;
use pbxgate::config::CrmConfig;
use pbxgate::crm::retailcrm::{
    Call, CallEvent, CallEventType, CallResult, CallType, CrmClient, CrmError, HangupStatus,
    UserStatus,
};
use serde_json::json;

use crate::support::{fake_crm, FakeCrm, Fault};

const EVENT: &str = "/api/v5/telephony/call/event";
const UPLOAD: &str = "/api/v5/telephony/calls/upload";
const MANAGER: &str = "/api/v5/telephony/manager";

fn config(crm: &FakeCrm) -> CrmConfig {
    CrmConfig {
        url: crm.url.clone(),
        api_key: Secret::new(fake_crm::API_KEY),
        retry_base: Duration::from_millis(5),
        retry_max: Duration::from_millis(20),
        max_retries: 3,
        ..CrmConfig::default()
    }
}

async fn setup() -> (FakeCrm, CrmClient) {
    crate::support::init_logs();
    let crm = FakeCrm::start().await;
    let client = CrmClient::new(&config(&crm)).unwrap();
    (crm, client)
}

fn call(id: &str) -> Call {
    Call {
        date: "2026-11-20 10:15:00".into(),
        kind: CallType::In,
        phone: "+79991234567".into(),
        code: Some("101".into()),
        user_id: None,
        result: CallResult::Answered,
        duration: Some(42),
        duration_waiting: Some(7),
        external_id: id.into(),
        record_url: None,
        source: None,
        external_phone: Some("+74951234567".into()),
        site: Some("shop1".into()),
        client_id: None,
    }
}

fn raw(status: u16, body: serde_json::Value) -> Fault {
    Fault::Raw {
        status,
        content_type: "application/json",
        body: body.to_string(),
    }
}

#[tokio::test]
async fn call_event_wire_format() {
    let (crm, client) = setup().await;
    let mut e = CallEvent::new(CallEventType::Hangup, "+79991234567");
    e.codes = Some(vec!["101".into()]);
    e.hangup_status = Some(HangupStatus::NoAnswered);
    e.call_external_id = Some("1700000000.1".into());
    let r = client.call_event(&e).await.unwrap();
    assert_eq!(
        r.not_exist_codes,
        vec!["101".to_string()],
        "no module registered, so 101 is unknown"
    );
    let req = &crm.requests_to(EVENT)[0];
    assert_eq!(req.api_key.as_deref(), Some(fake_crm::API_KEY));
    assert_eq!(
        req.form_json("event"),
        json!({"phone": "+79991234567", "type": "hangup", "codes": ["101"], "hangupStatus": "no answered",
               "callExternalId": "1700000000.1"})
    );
}

#[tokio::test]
async fn calls_upload_reports_duplicates_and_refuses_51() {
    let (crm, client) = setup().await;
    let r = client.calls_upload(&[call("a"), call("b")]).await.unwrap();
    assert_eq!(r.processed_calls_count, Some(2));
    let r = client.calls_upload(&[call("b"), call("c")]).await.unwrap();
    assert_eq!(r.duplicate_calls, vec!["b".to_string()]);
    assert_eq!(crm.calls().len(), 3);

    let many: Vec<Call> = (0..51).map(|i| call(&format!("x{i}"))).collect();
    let err = client.calls_upload(&many).await.unwrap_err();
    assert!(
        matches!(err, CrmError::TooManyCalls { got: 51, max: 50 }),
        "{err}"
    );
    assert_eq!(
        crm.requests_to(UPLOAD).len(),
        2,
        "a 51-call batch is never sent"
    );
    client.calls_upload(&many[..50]).await.unwrap();
}

#[tokio::test]
async fn validation_errors_are_typed_and_not_retried() {
    let (crm, client) = setup().await;
    let mut bad = call("bad");
    bad.date = "20.11.2026 10:15".into();
    let err = client.calls_upload(&[call("good"), bad]).await.unwrap_err();
    match &err {
        CrmError::Validation {
            status: 400,
            errors,
            ..
        } => {
            assert!(errors.contains_key("calls[1][date]"), "{errors:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(crm.requests_to(UPLOAD).len(), 1);
}

#[tokio::test]
async fn a_503_then_success_is_retried() {
    let (crm, client) = setup().await;
    crm.fail_next(Fault::Status(503));
    crm.fail_next(Fault::Status(502));
    client
        .call_event(&CallEvent::new(CallEventType::In, "+79991234567"))
        .await
        .unwrap();
    let statuses: Vec<u16> = crm.requests_to(EVENT).iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![503, 502, 200]);
}

#[tokio::test]
async fn retries_stop_after_max_retries() {
    let (crm, client) = setup().await;
    for _ in 0..10 {
        crm.fail_next(Fault::Status(503));
    }
    let err = client.credentials().await.unwrap_err();
    assert!(
        matches!(err, CrmError::RateLimited { status: 503, .. }),
        "{err}"
    );
    assert_eq!(crm.requests().len(), 4, "1 attempt + 3 retries");
}

#[tokio::test]
async fn a_wrong_key_is_an_auth_error_and_not_retried() {
    let crm = FakeCrm::start().await;
    let client = CrmClient::new(&CrmConfig {
        api_key: Secret::new("wrong"),
        ..config(&crm)
    })
    .unwrap();
    let err = client.credentials().await.unwrap_err();
    assert!(matches!(err, CrmError::Auth { status: 403, .. }), "{err}");
    assert_eq!(crm.requests().len(), 1);
    assert!(
        !err.to_string().contains("wrong"),
        "the key never appears in errors: {err}"
    );
}

#[tokio::test]
async fn an_empty_key_sends_nothing() {
    let crm = FakeCrm::start().await;
    let client = CrmClient::new(&CrmConfig {
        api_key: Secret::default(),
        ..config(&crm)
    })
    .unwrap();
    assert!(matches!(
        client.credentials().await.unwrap_err(),
        CrmError::NotConfigured
    ));
    assert!(crm.requests().is_empty());
}

#[tokio::test]
async fn html_and_garbage_answers_are_typed_errors() {
    let (crm, client) = setup().await;
    crm.fail_next(Fault::Html(405));
    let err = client.user_status(1, UserStatus::Busy).await.unwrap_err();
    assert!(
        matches!(err, CrmError::AccountNotFound { status: 405, .. }),
        "{err}"
    );

    let garbage = "x".repeat(500);
    crm.fail_next(Fault::Raw {
        status: 200,
        content_type: "text/plain",
        body: garbage,
    });
    match client.credentials().await.unwrap_err() {
        CrmError::Decode { status, body, .. } => {
            assert_eq!(status, 200);
            assert_eq!(body.len(), 200, "first 200 bytes of the body");
        }
        other => panic!("{other:?}"),
    }

    crm.fail_next(raw(
        200,
        json!({"success": true, "processedCallsCount": {"not": "a number"}}),
    ));
    let err = client.calls_upload(&[call("z")]).await.unwrap_err();
    assert!(matches!(err, CrmError::Decode { status: 200, .. }), "{err}");
}

#[tokio::test]
async fn a_slow_crm_times_out_and_is_retried() {
    let crm = FakeCrm::start().await;
    let cfg = CrmConfig {
        timeout: Duration::from_millis(300),
        max_retries: 0,
        ..config(&crm)
    };
    let client = CrmClient::new(&cfg).unwrap();
    crm.fail_next(Fault::Delay(Duration::from_secs(3)));
    let err = client.credentials().await.unwrap_err();
    assert!(
        matches!(err, CrmError::Transport { timeout: true, .. }),
        "{err}"
    );

    let client = CrmClient::new(&CrmConfig {
        max_retries: 1,
        ..cfg
    })
    .unwrap();
    crm.fail_next(Fault::Delay(Duration::from_secs(3)));
    client.credentials().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_crm_is_a_transport_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let cfg = CrmConfig {
        url,
        api_key: Secret::new("k"),
        max_retries: 1,
        retry_base: Duration::from_millis(1),
        ..CrmConfig::default()
    };
    let err = CrmClient::new(&cfg)
        .unwrap()
        .credentials()
        .await
        .unwrap_err();
    assert!(
        matches!(err, CrmError::Transport { timeout: false, .. }),
        "{err}"
    );
    assert!(err.is_retriable());
}

#[tokio::test]
async fn lenient_parsing_of_documented_variants() {
    let (crm, client) = setup().await;
    // errors as an array
    crm.fail_next(raw(400, json!({"success": false, "errorMsg": "Validation error", "errors": ["phone is bad", "type is bad"]})));
    match client
        .call_event(&CallEvent::new(CallEventType::In, "1"))
        .await
        .unwrap_err()
    {
        CrmError::Validation {
            errors, message, ..
        } => {
            assert_eq!(message, "Validation error");
            assert_eq!(errors["0"], "phone is bad");
            assert_eq!(errors["1"], "type is bad");
        }
        other => panic!("{other:?}"),
    }
    // errors as an object
    crm.fail_next(raw(400, json!({"success": false, "errorMsg": "Errors in the entity format", "errors": {"phone": "blank"}})));
    match client
        .call_event(&CallEvent::new(CallEventType::In, "1"))
        .await
        .unwrap_err()
    {
        CrmError::Validation { errors, .. } => assert_eq!(errors["phone"], "blank"),
        other => panic!("{other:?}"),
    }
    // manager as an empty array, ids as strings, links as []
    crm.fail_next(raw(
        200,
        json!({"success": true, "manager": [], "links": []}),
    ));
    let r = client
        .telephony_manager("+79991234567", false, true)
        .await
        .unwrap();
    assert!(r.manager.is_none());
    crm.fail_next(raw(200, json!({"success": "true", "manager": {"id": "12", "code": 101}, "customer": {"id": 5, "phones": [{"number": "8800"}]}})));
    let r = client
        .telephony_manager("+79991234567", true, false)
        .await
        .unwrap();
    assert_eq!(r.manager.as_ref().unwrap().id, Some(12));
    assert_eq!(r.manager.as_ref().unwrap().code.as_deref(), Some("101"));
    assert_eq!(
        r.customer.unwrap().phones[0].number.as_deref(),
        Some("8800")
    );
    let q = &crm.requests_to(MANAGER)[1].query;
    assert_eq!(
        (
            q["phone"].as_str(),
            q["details"].as_str(),
            q["ignoreStatus"].as_str()
        ),
        ("+79991234567", "1", "0")
    );
    // info as [] and duplicates as an object
    crm.fail_next(raw(
        200,
        json!({"success": true, "processedCallsCount": "1", "duplicateCalls": {"0": "q"}}),
    ));
    let r = client.calls_upload(&[call("q")]).await.unwrap();
    assert_eq!(
        (r.processed_calls_count, r.duplicate_calls),
        (Some(1), vec!["q".to_string()])
    );
    // success:false with a 200 status is an error too
    crm.fail_next(raw(
        200,
        json!({"success": false, "errorMsg": "Telephony not enabled"}),
    ));
    let err = client
        .call_event(&CallEvent::new(CallEventType::In, "1"))
        .await
        .unwrap_err();
    assert!(matches!(err, CrmError::Api { status: 200, .. }), "{err}");
}

#[tokio::test]
async fn module_get_and_user_status_round_trip() {
    let (crm, client) = setup().await;
    assert!(matches!(
        client.integration_module("pbxgate").await.unwrap_err(),
        CrmError::Api { status: 404, .. }
    ));
    client.user_status(2, UserStatus::Dinner).await.unwrap();
    assert_eq!(crm.statuses(), vec![(2, "dinner".to_string())]);
    let req = &crm.requests_to("/api/v5/users/2/status")[0];
    assert_eq!(req.form.get("status").map(String::as_str), Some("dinner"));
    let creds = client.credentials().await.unwrap();
    assert!(creds.scopes.iter().any(|s| s == "telephony_write"));
}

/// Counts, for each request, how many requests of the same class arrived within the following
/// second (a sliding window, stricter than the CRM's fixed ones).
/// The most requests that arrived within any window of a second, less 100 ms: arrivals are
/// seen at the fake CRM, after the scheduler and loopback, and on a loaded machine requests the
/// client spaced evenly can arrive bunched by some tens of milliseconds. A limiter letting an
/// eighth more through still shows here.
fn max_per_second(times: &[Instant]) -> usize {
    let mut sorted = times.to_vec();
    sorted.sort();
    (0..sorted.len())
        .map(|i| {
            sorted[i..]
                .iter()
                .take_while(|t| t.duration_since(sorted[i]) < Duration::from_millis(900))
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limiter_never_exceeds_the_limits_in_a_3s_burst() {
    let (crm, client) = setup().await;
    let mut tasks = Vec::new();
    // 3 s worth at each limit, all asked for at once.
    for i in 0..30 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.user_status(1 + (i % 3), UserStatus::Free)
                .await
                .map(|_| ())
        }));
    }
    for _ in 0..120 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.call_event(&CallEvent::new(CallEventType::In, "+79990000000"))
                .await
                .map(|_| ())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let reqs = crm.requests();
    let general: Vec<Instant> = reqs
        .iter()
        .filter(|r| !r.path.starts_with("/api/v5/telephony/"))
        .map(|r| r.at)
        .collect();
    let telephony: Vec<Instant> = reqs
        .iter()
        .filter(|r| r.path.starts_with("/api/v5/telephony/"))
        .map(|r| r.at)
        .collect();
    assert_eq!(
        (general.len(), telephony.len()),
        (30, 120),
        "every request made it, none retried"
    );
    let (g, t) = (max_per_second(&general), max_per_second(&telephony));
    assert!(g <= 10, "general: {g} requests in one second");
    assert!(t <= 40, "telephony: {t} requests in one second");
}
