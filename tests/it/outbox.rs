//! The call-history outbox against the fake CRM: batching, duplicates, retries, bisecting,
//! pausing, and the order of delivery after an outage.

use std::time::Duration;

use pbxgate::outbox::store::{Enqueued, State};
use pbxgate::outbox::Drain;
use serde_json::Value;

use crate::support::{call_record as record, Fault, TestApp, T0};

const UPLOAD: &str = "/api/v5/telephony/calls/upload";
const TOKEN: &str = "webhook-token-0123456789";

/// An app whose uploader only runs when a test calls `drain()` (no background timing).
async fn manual_app(tweak: impl FnOnce(&mut pbxgate::config::Config)) -> TestApp {
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.crm.max_retries = 0;
        c.history.immediate = false;
        c.history.interval = Duration::from_secs(3600);
        c.pbx.token = pbxgate::base::secret::Secret::new(TOKEN);
        tweak(c);
    })
    .await;
    // The scheduler drains once at startup (a restart's backlog); let that finish first.
    tokio::time::timeout(Duration::from_secs(10), app.state.outbox.wait_changes(1))
        .await
        .expect("startup drain");
    app
}

#[tokio::test]
async fn a_call_is_uploaded_in_the_crm_wire_format_and_its_time_zone() {
    let app = manual_app(|_| {}).await;
    let outbox = &app.state.outbox;
    assert_eq!(
        outbox.enqueue(record("pbx-1", T0)).await.unwrap(),
        Enqueued::Queued(outbox.store().list_pending(1).unwrap()[0].seq)
    );
    assert_eq!(outbox.drain().await, Drain::Done);
    let req = &app.crm.requests_to(UPLOAD)[0];
    let calls = req.form_json("calls");
    assert_eq!(
        calls,
        serde_json::json!([{
            "date": "2026-11-21 13:00:00",
            "type": "in",
            "phone": "+79991234567",
            "code": "101",
            "result": "answered",
            "duration": 60,
            "durationWaiting": 5,
            "externalId": "pbx-1",
            "externalPhone": "+74951234567",
            "site": "shop1"
        }])
    );
    assert_eq!(outbox.store().state_of("pbx-1").unwrap(), Some(State::Done));
    let s = outbox.status();
    assert_eq!((s.pending, s.done, s.uploaded_total), (0, 1, 1));
}

#[tokio::test]
async fn the_same_call_is_stored_once_and_crm_duplicates_count_as_done() {
    let app = manual_app(|_| {}).await;
    let outbox = &app.state.outbox;
    outbox.enqueue(record("pbx-2", T0)).await.unwrap();
    assert_eq!(
        outbox.enqueue(record("pbx-2", T0)).await.unwrap(),
        Enqueued::Duplicate
    );
    assert_eq!(outbox.status().pending, 1);
    outbox.drain().await;
    // Uploaded already (say, before a crash lost our acknowledgement): the CRM reports it.
    outbox.store().retry(None).unwrap();
    let mut again = record("pbx-3", T0);
    again.external_id = "pbx-3".into();
    outbox.enqueue(again.clone()).await.unwrap();
    outbox.drain().await;
    assert_eq!(
        outbox.enqueue(again).await.unwrap(),
        Enqueued::Duplicate,
        "done ids are remembered"
    );
    assert_eq!(app.crm.calls().len(), 2);
}

#[tokio::test]
async fn batches_hold_at_most_fifty_calls_in_arrival_order() {
    let app = manual_app(|_| {}).await;
    for i in 0..120 {
        app.state
            .outbox
            .enqueue(record(&format!("pbx-{i:03}"), T0 + i))
            .await
            .unwrap();
    }
    assert_eq!(app.state.outbox.drain().await, Drain::Done);
    let sizes: Vec<usize> = app
        .crm
        .requests_to(UPLOAD)
        .iter()
        .map(|r| r.form_json("calls").as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, vec![50, 50, 20]);
    let order = app.crm.uploaded_ids();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted);
}

#[tokio::test]
async fn a_503_keeps_the_batch_and_a_later_drain_delivers_it() {
    let app = manual_app(|_| {}).await;
    let outbox = &app.state.outbox;
    outbox.enqueue(record("pbx-r", T0)).await.unwrap();
    app.crm.fail_next_on(UPLOAD, Fault::Status(503));
    assert!(matches!(outbox.drain().await, Drain::Retry(_)));
    assert_eq!(
        outbox.store().state_of("pbx-r").unwrap(),
        Some(State::Pending)
    );
    let env = &outbox.store().list_pending(1).unwrap()[0];
    assert_eq!(env.attempts, 1);
    assert!(env.last_error.as_deref().unwrap().contains("503"));
    assert_eq!(outbox.drain().await, Drain::Done);
    assert_eq!(app.crm.calls().len(), 1);
    assert_eq!(outbox.status().failed_attempts, 1);
}

#[tokio::test]
async fn one_invalid_call_in_fifty_goes_dead_and_the_rest_are_delivered() {
    let app = manual_app(|_| {}).await;
    let outbox = &app.state.outbox;
    for i in 0..50 {
        let mut r = record(&format!("pbx-{i:02}"), T0 + i);
        if i == 17 {
            r.customer_number = String::new(); // the CRM rejects a call without a phone
        }
        outbox.enqueue(r).await.unwrap();
    }
    assert_eq!(outbox.drain().await, Drain::Done);
    let s = outbox.status();
    assert_eq!((s.done, s.dead, s.pending), (49, 1, 0));
    assert_eq!(app.crm.calls().len(), 49);
    let dead = outbox.store().dead(10).unwrap();
    assert_eq!(dead[0].id, "pbx-17");
    assert!(
        dead[0].last_error.as_deref().unwrap().contains("phone"),
        "{:?}",
        dead[0].last_error
    );
    // An operator fixes it and retries: it is pending again.
    assert_eq!(outbox.store().retry(Some("pbx-17")).unwrap(), 1);
    assert_eq!(outbox.status().pending, 1);
}

#[tokio::test]
async fn a_wrong_key_blocks_uploads_loudly_and_drops_nothing() {
    let app = manual_app(|c| c.crm.api_key = pbxgate::base::secret::Secret::new("wrong-key")).await;
    let outbox = &app.state.outbox;
    outbox.enqueue(record("pbx-k", T0)).await.unwrap();
    assert!(matches!(outbox.drain().await, Drain::Blocked(_)));
    let ready: Value = app.ready().await;
    assert!(
        ready["history"]["blocked"]
            .as_str()
            .unwrap()
            .contains("API key"),
        "{ready}"
    );
    assert_eq!(ready["history"]["pending"], 1);
}

#[tokio::test]
async fn nothing_is_sent_while_inactive_and_uploads_resume_on_activation() {
    let app = manual_app(|_| {}).await;
    app.state
        .store
        .set_activity(&pbxgate::store::Activity::new(true, true, None))
        .await
        .unwrap();
    let outbox = &app.state.outbox;
    outbox.enqueue(record("pbx-i", T0)).await.unwrap();
    assert_eq!(
        outbox.drain().await,
        Drain::Paused("module inactive or frozen")
    );
    assert!(app.crm.requests_to(UPLOAD).is_empty());
    // retailCRM unfreezes the module: the uploader wakes by itself.
    let id = app.client_id();
    let r = app
        .http
        .post(app.url("/crm/activity"))
        .form(&[
            ("clientId", id.as_str()),
            ("activity", r#"{"active":true,"freeze":false}"#),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.crm.wait_for_requests(UPLOAD, 1).await;
}

#[tokio::test]
async fn after_an_outage_every_call_arrives_in_order_with_bounded_requests() {
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.crm.max_retries = 0;
        c.history.batch_window = Duration::from_millis(50);
        c.history.retry_base = Duration::from_millis(50);
        c.history.retry_max = Duration::from_millis(200);
        c.pbx.token = pbxgate::base::secret::Secret::new(TOKEN);
    })
    .await;
    // The CRM is down for the first 10 upload attempts.
    for _ in 0..10 {
        app.crm.fail_next_on(UPLOAD, Fault::Status(503));
    }
    for i in 0..120 {
        let body = serde_json::json!([
            {"call_id": format!("o{i:03}"), "event": "start", "direction": "in", "phone": "+79991234567", "extension": "101"},
            {"call_id": format!("o{i:03}"), "event": "hangup"}
        ]);
        let r = app
            .http
            .post(app.url("/pbx/events"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while app.crm.calls().len() < 120 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} calls arrived",
            app.crm.calls().len()
        );
        app.crm
            .wait_for_requests(UPLOAD, app.crm.requests_to(UPLOAD).len() + 1)
            .await;
    }
    let reqs = app.crm.requests_to(UPLOAD);
    let delivered: Vec<String> = reqs
        .iter()
        .filter(|r| r.status == 200)
        .flat_map(|r| {
            r.form_json("calls")
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["externalId"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let expected: Vec<String> = (0..120).map(|i| format!("pbx-o{i:03}")).collect();
    assert_eq!(
        delivered, expected,
        "each call once, in the order the calls ended"
    );
    assert!(reqs.len() <= 10 + 120, "{} requests", reqs.len());
    tokio::time::timeout(
        Duration::from_secs(10),
        app.state.outbox.wait_until(|s| s.pending == 0),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_call_waiting_for_its_recording_does_not_spin_the_scheduler_during_a_backoff() {
    // Nothing listens at the CRM's address: every upload fails and the uploader backs off.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let recordings = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.crm.url = dead_url;
        c.crm.max_retries = 0;
        c.history.batch_window = Duration::from_millis(10);
        c.history.retry_base = Duration::from_secs(4);
        c.history.retry_max = Duration::from_secs(4);
        c.history.record_settle = Duration::from_millis(300);
        c.records.dir = recordings.path().to_path_buf();
    })
    .await;
    let outbox = &app.state.outbox;
    // One call ready to go, one whose recording is still being written (re-checked in 300 ms).
    let fresh = recordings.path().join("b.wav");
    std::fs::write(&fresh, b"RIFF").unwrap();
    let mut held = record("pbx-b", T0 + 1);
    held.recordings = vec![fresh.to_string_lossy().into_owned()];
    outbox.enqueue(held).await.unwrap();
    outbox.enqueue(record("pbx-a", T0)).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        outbox.wait_until(|s| s.failed_attempts >= 1),
    )
    .await
    .expect("the first upload failed");
    // The backoff lasts at least 2 s; the recording's re-check falls inside it. Watch the
    // scheduler for 1 s (an observation window: we measure that nothing happens).
    let before = outbox.status().scheduler_wakeups;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let woke = outbox.status().scheduler_wakeups - before;
    assert!(
        woke <= 2,
        "the scheduler woke {woke} times during its backoff"
    );
    assert_eq!(outbox.status().pending, 2, "nothing dropped");
}

/// An app whose uploader, after a failure, would wait at least `backoff / 2` on its own.
async fn long_backoff_app(backoff: Duration) -> TestApp {
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.crm.max_retries = 0;
        c.crm.timezone = "Europe/Moscow".into();
        c.history.batch_window = Duration::from_millis(10);
        c.history.retry_base = backoff;
        c.history.retry_max = backoff;
        c.pbx.token = pbxgate::base::secret::Secret::new(TOKEN);
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), app.state.outbox.wait_changes(1))
        .await
        .expect("startup drain");
    app
}

/// A call starts ringing: one live event to the CRM, no history.
async fn ring(app: &TestApp, id: &str) {
    let body = serde_json::json!([
        {"call_id": id, "event": "start", "direction": "in", "phone": "+79991234567"},
        {"call_id": id, "event": "ringing", "extension": "101"}
    ]);
    let r = app
        .http
        .post(app.url("/pbx/events"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

const EVENT: &str = "/api/v5/telephony/call/event";

/// The CRM fails with `fault` while a call is queued; once it is back, a live event gets
/// through, and the history follows at once instead of waiting out its backoff (or, for a
/// missing account, `history.retry_max`).
async fn backlog_follows_the_first_success(fault: Fault) {
    let app = long_backoff_app(Duration::from_secs(600)).await;
    let outbox = &app.state.outbox;
    app.crm.start_outage(fault);
    outbox.enqueue(record("pbx-late", T0)).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        outbox.wait_until(|s| s.failed_attempts >= 1),
    )
    .await
    .expect("the upload failed");
    assert_eq!(outbox.status().pending, 1);

    app.crm.end_outage();
    ring(&app, "w-back").await;
    let ok = app.crm.wait_for_requests(EVENT, 1).await;
    assert_eq!(ok.last().unwrap().status, 200);
    tokio::time::timeout(
        Duration::from_secs(10),
        outbox.wait_until(|s| s.pending == 0),
    )
    .await
    .expect("the history went out once the CRM answered again");
    let accepted: Vec<String> = app.crm.calls().into_keys().collect();
    assert_eq!(accepted, vec!["pbx-late".to_string()]);
    assert!(outbox.status().blocked.is_none());
}

#[tokio::test]
async fn after_a_crm_outage_the_history_backlog_goes_out_with_the_first_success() {
    backlog_follows_the_first_success(Fault::Status(500)).await;
}

#[tokio::test]
async fn after_the_account_was_missing_the_history_goes_out_with_the_first_success() {
    backlog_follows_the_first_success(Fault::Html(404)).await;
}

#[tokio::test]
async fn when_only_uploads_fail_other_successes_end_one_backoff_not_every() {
    let app = long_backoff_app(Duration::from_secs(600)).await;
    let outbox = &app.state.outbox;
    app.crm.start_outage_on(UPLOAD, Fault::Status(500));
    outbox.enqueue(record("pbx-stuck", T0)).await.unwrap();
    app.crm.wait_for_requests(UPLOAD, 1).await;
    // The first live event that gets through brings one early retry, which fails too.
    ring(&app, "w1").await;
    app.crm.wait_for_requests(UPLOAD, 2).await;
    // From then on the schedule holds, however many other requests succeed.
    for i in 0..20 {
        ring(&app, &format!("w-more-{i}")).await;
    }
    let events = app.crm.wait_for_requests(EVENT, 21).await;
    assert!(events.iter().all(|r| r.status == 200));
    assert_eq!(app.crm.requests_to(UPLOAD).len(), 2);
    assert_eq!(outbox.status().pending, 1, "nothing dropped");
}
