//! Calls tracked end to end: capture bytes from the scripted AMI server (or PBX webhooks) into
//! the service, live events out to the fake CRM, finished calls into the history sink.

use pbxgate::calls::{Direction, Outcome};
use serde_json::Value;

use crate::support::{capture_body, finished, lab_app, TestApp};

const EVENT: &str = "/api/v5/telephony/call/event";

fn events(app: &TestApp) -> Vec<Value> {
    app.crm
        .requests_to(EVENT)
        .iter()
        .map(|r| r.form_json("event"))
        .collect()
}

#[tokio::test]
async fn an_inbound_ring_group_call_pops_up_and_is_recorded() {
    let app = lab_app(|_| {}).await;
    app.ami.send(&capture_body("03_inbound_from_trunk"));
    let calls = finished(&app, 1).await;
    let r = &calls[0];
    assert_eq!(r.external_id, "lab-1795264488.20");
    assert_eq!(
        (r.direction, r.customer_number.as_str(), r.did.as_deref()),
        (Direction::In, "+491701234567", Some("+4930111000"))
    );
    assert_eq!(
        (r.answered_by.as_deref(), r.outcome),
        (Some("101"), Outcome::Answered)
    );
    assert_eq!(r.recordings.len(), 1);

    app.crm.wait_for_requests(EVENT, 3).await;
    let evs = events(&app);
    let kinds: Vec<(&str, Value)> = evs
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["codes"].clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("in", serde_json::json!(["101"])),
            ("in", serde_json::json!(["102"])),
            ("hangup", serde_json::json!(["101"]))
        ]
    );
    for e in &evs {
        assert_eq!(e["phone"], "+491701234567");
        assert_eq!(e["callExternalId"], "lab-1795264488.20");
    }
    assert_eq!(evs[0]["externalPhone"], "+4930111000");
    assert_eq!(evs[2]["hangupStatus"], "answered");
}

#[tokio::test]
async fn a_missed_call_ends_with_no_answered_and_internal_calls_stay_out_of_the_crm() {
    let app = lab_app(|_| {}).await;
    app.ami.send(&capture_body("12_internal_101_to_102"));
    app.ami.send(&capture_body("09_inbound_missed"));
    let calls = finished(&app, 1).await;
    assert!(
        calls.iter().all(|c| c.direction != Direction::Internal),
        "internal calls stay out of the history"
    );
    let missed = &calls[0];
    assert_eq!(
        (missed.direction, missed.outcome),
        (Direction::In, Outcome::NoAnswer)
    );
    assert_eq!(
        app.state
            .tracker_stats
            .finished
            .load(std::sync::atomic::Ordering::Relaxed),
        2,
        "both were tracked"
    );
    // in 101, in 102, hangup; nothing for the internal call.
    app.crm.wait_for_requests(EVENT, 3).await;
    let evs = events(&app);
    assert!(
        evs.iter()
            .all(|e| e["callExternalId"] == "lab-1795264721.70"),
        "{evs:?}"
    );
    assert_eq!(evs.last().unwrap()["hangupStatus"], "no answered");
}

#[tokio::test]
async fn nothing_is_pushed_while_the_module_is_inactive() {
    let app = lab_app(|_| {}).await;
    app.state
        .store
        .set_activity(&pbxgate::store::Activity::new(false, false, None))
        .await
        .unwrap();
    app.ami.send(&capture_body("10_inbound_abandoned"));
    finished(&app, 1).await;
    // Active again: the next call's events arrive; the live queue is processed in order, so the
    // first call's events were already handled (and skipped) by then.
    app.state
        .store
        .set_activity(&pbxgate::store::Activity::new(true, false, None))
        .await
        .unwrap();
    app.ami.send(&capture_body("09_inbound_missed"));
    finished(&app, 2).await;
    app.crm.wait_for_requests(EVENT, 3).await;
    assert!(
        events(&app)
            .iter()
            .all(|e| e["callExternalId"] == "lab-1795264721.70"),
        "{:?}",
        events(&app)
    );
}

#[tokio::test]
async fn our_click_to_call_is_attributed_even_when_the_manager_does_not_answer() {
    let app = lab_app(|_| {}).await;
    let id = app.client_id();
    let r = app
        .http
        .get(app.url("/crm/make-call"))
        .query(&[
            ("clientId", id.as_str()),
            ("code", "101"),
            ("phone", "+79991234567"),
            ("userId", "7"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let originate = &app.ami.wait_for_actions("Originate", 1).await[0];
    let channel_id = originate.get("ChannelId").unwrap().to_string();
    // Asterisk's side of it: capture 14 (PJSIP/101 rings, nobody answers), with our ChannelId.
    let body = String::from_utf8(capture_body("14_click2call_manager_noanswer"))
        .unwrap()
        .replace("1795264790.87", &channel_id);
    app.ami.send(body.as_bytes());
    let calls = finished(&app, 1).await;
    let c = &calls[0];
    assert!(c.click_to_call);
    assert_eq!(c.external_id, format!("lab-{channel_id}"));
    assert_eq!(
        (c.direction, c.customer_number.as_str()),
        (Direction::Out, "+79991234567")
    );
    assert_eq!(
        (c.code.as_deref(), c.user_id, c.outcome),
        (Some("101"), Some(7), Outcome::NoAnswer)
    );
    // The customer was never dialled, so no `out` pop-up went to the CRM: nor does a hangup.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while app.ready().await["calls"]["hangupsWithoutPopup"] != 1 {
        assert!(tokio::time::Instant::now() < deadline, "hangup not handled");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(app.crm.requests_to(EVENT).is_empty());
}

#[tokio::test]
async fn pbx_webhooks_feed_the_same_model() {
    let token = "webhook-token-0123456789";
    let app = lab_app(|c| c.pbx.token = pbxgate::base::secret::Secret::new(token)).await;
    let post = |body: Value, auth: &str| {
        app.http
            .post(app.url("/pbx/events"))
            .header("Authorization", format!("Bearer {auth}"))
            .json(&body)
            .send()
    };
    let call = serde_json::json!([
        {"call_id": "w1", "event": "start", "direction": "in", "phone": "+7 999 123-45-67", "did": "+74951234567", "at": "2026-11-21T10:00:00Z"},
        {"call_id": "w1", "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"},
        {"call_id": "w1", "event": "answer", "extension": "101", "at": "2026-11-21T10:00:05Z"},
        {"call_id": "w1", "event": "hangup", "at": "2026-11-21T10:01:05Z", "record": "/rec/w1.wav"}
    ]);
    let r = post(call.clone(), "wrong-token-000000000").await.unwrap();
    assert_eq!(r.status(), 401);
    let r = post(
        serde_json::json!({"call_id": "w2", "event": "explode"}),
        token,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.unwrap()["errors"]["event"].is_string());
    let r = post(call, token).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["accepted"], 4);

    let calls = finished(&app, 1).await;
    let c = &calls[0];
    assert_eq!(
        (
            c.external_id.as_str(),
            c.direction,
            c.customer_number.as_str()
        ),
        ("lab-w1", Direction::In, "+79991234567")
    );
    assert_eq!(
        (c.wait_seconds, c.talk_seconds, c.answered_by.as_deref()),
        (5, 60, Some("101"))
    );
    assert_eq!(c.recordings, vec!["/rec/w1.wav".to_string()]);
    app.crm.wait_for_requests(EVENT, 2).await;
    let evs = events(&app);
    assert_eq!(
        (evs[0]["type"].as_str(), evs[0]["site"].as_str()),
        (Some("in"), Some("shop1")),
        "the DID maps to its shop"
    );
    assert_eq!(evs[1]["hangupStatus"], "answered");
}

#[tokio::test]
async fn webhooks_are_off_without_a_token() {
    let app = lab_app(|_| {}).await;
    let r = app
        .http
        .post(app.url("/pbx/events"))
        .json(&serde_json::json!({"call_id": "x", "event": "start", "phone": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn a_call_cut_off_by_an_ami_outage_is_closed_after_the_resync() {
    let app = lab_app(|_| {}).await;
    let frames = crate::call_scenarios::timed_frames("03_inbound_from_trunk");
    // Up to the answer; the rest (the hangups) happens while the link is down.
    let answered = frames
        .iter()
        .rposition(|(_, f)| f.event() == Some("BridgeEnter"))
        .unwrap();
    let part: String = frames[..=answered]
        .iter()
        .map(|(_, f)| f.to_wire())
        .collect();
    app.ami.send(part.as_bytes());
    // Make sure the tracker has seen the call before the link drops.
    app.crm.wait_for_requests(EVENT, 2).await;
    app.ami.drop_all();
    // One at each login.
    app.ami.wait_for_actions("CoreShowChannels", 2).await;
    let calls = finished(&app, 1).await;
    let c = &calls[0];
    assert!(c.reaped, "closed by the resync, not by its own hangups");
    assert_eq!(
        (c.direction, c.answered_by.as_deref()),
        (Direction::In, Some("101"))
    );
    let ready: Value = app.ready().await;
    // One at the first login (calls resumed from the journal are checked), one after the
    // reconnect.
    assert_eq!(ready["calls"]["resyncs"], 2);
    assert_eq!(ready["calls"]["live"], 0);
}

#[tokio::test]
async fn past_max_backlog_events_are_dropped_counted_and_the_calls_resynced() {
    use crate::support::captures::{capture_frames, count_events, multiplied_from};
    use crate::support::fake_ami::Reply;
    let app = lab_app(|c| {
        c.ami.max_backlog = 1000;
        c.ami.action_timeout = std::time::Duration::from_secs(120);
    })
    .await;
    // After a reconnect the tracker waits for its CoreShowChannels, which goes unanswered.
    app.ami.set_reply("CoreShowChannels", Reply::Silent);
    app.ami.drop_all();
    let asked = app.ami.wait_for_actions("CoreShowChannels", 2).await;
    let id = asked[1].get("ActionID").unwrap().to_string();
    app.ami.clear_reply("CoreShowChannels");

    // Meanwhile a burst arrives: the reader takes all of it, the tracker's backlog stops at
    // ami.max_backlog.
    let mut bus = app.state.ami.subscribe();
    let mut burst = multiplied_from(&capture_frames(), 0..5);
    let sent = count_events(&burst) as u64 + 1;
    burst.extend_from_slice(b"Event: EndOfBurst\r\n\r\n");
    let before: Value = app.ready().await;
    app.ami.send(&burst);
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        loop {
            if let Ok(pbxgate::pbx::ami::AmiEvent::Event(f)) = bus.recv().await {
                if f.event() == Some("EndOfBurst") {
                    return;
                }
            }
        }
    })
    .await
    .expect("the reader got the whole burst");
    let full: Value = app.ready().await;
    let calls = &full["calls"];
    let dropped = calls["amiEventsDropped"].as_u64().unwrap();
    assert!(dropped >= sent - 1000, "{sent} sent: {calls}");
    assert_eq!(calls["amiBacklogOverflows"], 1, "{calls}");
    assert!(calls["amiBacklogPeak"].as_u64().unwrap() <= 1000, "{calls}");

    // Asterisk answers: the tracker handles what it kept, learns of the gap, resyncs, and
    // tracks the next call as usual.
    app.ami.send(
        format!(
            "Response: Success\r\nActionID: {id}\r\nEventList: start\r\nMessage: Channels will follow\r\n\r\n\
             Event: CoreShowChannelsComplete\r\nActionID: {id}\r\nEventList: Complete\r\nListItems: 0\r\n\r\n"
        )
        .as_bytes(),
    );
    app.ami.wait_for_actions("CoreShowChannels", 3).await;
    app.ami.send(&capture_body("09_inbound_missed"));
    // Calls closed by the resync finish too; wait for this one.
    let recent = &app.state.recent_calls;
    let mut seen = recent.count();
    let next = loop {
        let all = recent.all();
        if let Some(c) = all.iter().find(|c| c.external_id == "lab-1795264721.70") {
            break c.clone();
        }
        seen += 1;
        tokio::time::timeout(std::time::Duration::from_secs(15), recent.wait_for(seen))
            .await
            .expect("the next call finished");
    };
    assert!(!next.reaped, "tracked from its own events");

    let ready: Value = app.ready().await;
    let grew = |path: [&str; 2]| {
        ready[path[0]][path[1]].as_u64().unwrap() - before[path[0]][path[1]].as_u64().unwrap()
    };
    assert_eq!(
        grew(["calls", "amiEvents"]) + grew(["calls", "amiEventsDropped"]),
        grew(["ami", "events"]),
        "every event read was either tracked or counted as dropped: {ready}"
    );
    assert_eq!(
        ready["calls"]["amiEventsDropped"], dropped,
        "no more dropped"
    );
    assert_eq!(
        ready["calls"]["resyncs"], 3,
        "logins and the gap: {}",
        ready["calls"]
    );
}
