//! Bitrix24 as the CRM: real AMI captures and PBX webhooks through the call model, the
//! pipeline and the outbox to the strict fake portal, which checks every request as the real
//! one does. Each test says what the portal must end up holding.

use std::time::Duration;

use pbxgate::base::secret::Secret;
use pbxgate::config::{Config, CrmKind, ShowCard};
use pbxgate::crm::registration::RegistrationState;
use serde_json::{json, Value};

use crate::support::fake_bitrix24::{FakeCall, APP_TOKEN};
use crate::support::{capture_body, finished, lab_app, FakeBitrix24, TestApp};

const PBX_TOKEN: &str = "b24-pbx-token-0123456789";
const WAIT: Duration = Duration::from_secs(15);

pub struct B24 {
    pub app: TestApp,
    pub portal: FakeBitrix24,
}

/// pbxgate on the lab's settings with Bitrix24 as its CRM (webhook auth, users from
/// `user.get`: 101 → 11, 102 → 12, 103 → 13), registered and AMI up.
pub async fn b24_app(tweak: impl FnOnce(&mut Config)) -> B24 {
    let portal = FakeBitrix24::start().await;
    b24_app_with(portal, tweak).await
}

pub async fn b24_app_with(portal: FakeBitrix24, tweak: impl FnOnce(&mut Config)) -> B24 {
    let webhook = portal.webhook_url();
    let app = lab_app(|c| {
        c.crm.kind = CrmKind::Bitrix24;
        c.crm.register_on_start = true;
        c.crm.timezone = "Europe/Moscow".into();
        c.bitrix24.webhook_url = Secret::new(webhook);
        c.bitrix24.application_token = Secret::new(APP_TOKEN);
        c.users.clear();
        c.pbx.token = Secret::new(PBX_TOKEN);
        tweak(c);
    })
    .await;
    let state = tokio::time::timeout(
        WAIT,
        app.state
            .registration
            .wait_for(|s| !matches!(s, RegistrationState::Pending | RegistrationState::Failed(_))),
    )
    .await
    .expect("registered with Bitrix24");
    assert_eq!(state, RegistrationState::Registered);
    B24 { app, portal }
}

impl B24 {
    /// Posts PBX webhook events.
    pub async fn events(&self, body: Value) {
        let r = self
            .app
            .http
            .post(self.app.url("/pbx/events"))
            .bearer_auth(PBX_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    /// Waits until the portal has a finished call whose EXTERNAL_CALL_ID (or CALL_ID) is `id`.
    pub async fn finished_call(&self, what: &str, pick: impl Fn(&FakeCall) -> bool) -> FakeCall {
        self.portal
            .wait_for(WAIT, what, |p| {
                p.calls()
                    .into_iter()
                    .find(|c| pick(c) && c.finished.is_some())
            })
            .await
    }

    /// The one call the portal has for our externalId, once finished (and recorded, when the
    /// call had audio to attach).
    pub async fn finished_ext(&self, id: &str) -> FakeCall {
        let id = id.to_string();
        self.finished_call(&format!("{id} finished"), |c| {
            c.external_call_id.as_deref() == Some(id.as_str())
        })
        .await
    }

    /// Waits until the outbox holds nothing pending or in flight.
    pub async fn queue_settled(&self) {
        tokio::time::timeout(
            WAIT,
            self.app
                .state
                .outbox
                .wait_until(|s| s.pending == 0 && s.in_flight == 0),
        )
        .await
        .expect("outbox settled");
    }
}

/// A number the portal got as a number or (through a batch) as a string.
fn int(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// `DURATION` of an answered call: its talk time, at least a second (0 would read as missed).
fn talk(r: &pbxgate::calls::CallRecord) -> i64 {
    r.talk_seconds.max(1) as i64
}

fn registered_for(portal: &FakeBitrix24, ext_id: &str) -> Vec<FakeCall> {
    portal
        .calls()
        .into_iter()
        .filter(|c| c.external_call_id.as_deref() == Some(ext_id))
        .collect()
}

#[tokio::test]
async fn an_answered_inbound_call_is_registered_once_shown_and_finished_by_its_talker() {
    let b = b24_app(|_| {}).await;
    b.app.ami.send(&capture_body("03_inbound_from_trunk"));
    let record = finished(&b.app, 1).await.remove(0);
    let call = b.finished_ext("lab-1795264488.20").await;
    // Registered when 101 rang (ring group 101 & 102), for 101's user, with the DID as the
    // line and the start with its offset.
    assert_eq!((call.kind, call.user_id), (2, 11));
    assert_eq!(call.phone, "+491701234567");
    assert_eq!(call.line.as_deref(), Some("+4930111000"));
    assert!(!call.start_offset_missing, "{}", call.start);
    assert!(call.start.ends_with("+03:00"), "{}", call.start);
    assert!(call.crm_create);
    // Both ringing phones saw the card; 102's closed when 101 answered, 101's at the finish.
    assert!(
        call.shown_ever.contains(&11) && call.shown_ever.contains(&12),
        "{:?}",
        call.card_log
    );
    let fin = call.finished.as_ref().unwrap();
    assert_eq!(int(&fin["USER_ID"]), Some(11));
    assert_eq!(fin["STATUS_CODE"], "200");
    assert_eq!(int(&fin["DURATION"]), Some(talk(&record)));
    assert_eq!(call.finish_count, 1);
    assert_eq!(registered_for(&b.portal, "lab-1795264488.20").len(), 1);
    b.queue_settled().await;
    assert!(
        b.portal.open_cards().is_empty(),
        "{:?}",
        b.portal.open_cards()
    );
}

#[tokio::test]
async fn a_missed_call_with_three_phones_ringing_shows_three_cards_and_is_finished_once_as_missed()
{
    let b = b24_app(|_| {}).await;
    b.events(json!([
        {"call_id": "m3", "event": "start", "direction": "in", "phone": "+79991234567", "did": "+74951234567", "at": "2026-11-21T10:00:00Z"},
        {"call_id": "m3", "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"},
        {"call_id": "m3", "event": "ringing", "extension": "102", "at": "2026-11-21T10:00:01Z"},
        {"call_id": "m3", "event": "ringing", "extension": "103", "at": "2026-11-21T10:00:01Z"}
    ]))
    .await;
    // While they ring, all three cards are open.
    let open = b
        .portal
        .wait_for(WAIT, "three cards open", |p| {
            let c = p.calls().into_iter().next()?;
            (c.visible.len() == 3).then_some(c.visible)
        })
        .await;
    assert_eq!(open.into_iter().collect::<Vec<_>>(), vec![11, 12, 13]);
    b.events(json!([{"call_id": "m3", "event": "hangup", "result": "no_answer", "at": "2026-11-21T10:00:09Z"}]))
        .await;
    let call = b.finished_ext("lab-m3").await;
    let fin = call.finished.as_ref().unwrap();
    assert_eq!(fin["STATUS_CODE"], "304");
    assert_eq!(int(&fin["DURATION"]), Some(0));
    // Finished once, by the first phone that rang; every other card was hidden before.
    assert_eq!(int(&fin["USER_ID"]), Some(11));
    assert_eq!(call.finish_count, 1);
    assert_eq!(b.portal.calls().len(), 1);
    assert!(b.portal.open_cards().is_empty(), "{:?}", call.card_log);
}

#[tokio::test]
async fn an_outbound_call_is_registered_as_outgoing_for_the_extension_that_dialled() {
    let b = b24_app(|_| {}).await;
    b.app.ami.send(&capture_body("02_originate_outbound"));
    let record = finished(&b.app, 1).await.remove(0);
    let call = b.finished_ext(&record.external_id).await;
    assert_eq!((call.kind, call.user_id), (1, 11));
    assert_eq!(call.phone, "+4930123456");
    let fin = call.finished.as_ref().unwrap();
    assert_eq!(
        (fin["STATUS_CODE"].as_str(), int(&fin["USER_ID"])),
        (Some("200"), Some(11))
    );
    assert_eq!(int(&fin["DURATION"]), Some(talk(&record)));
}

#[tokio::test]
async fn a_busy_customer_is_finished_486() {
    let b = b24_app(|_| {}).await;
    b.app
        .ami
        .send(&capture_body("14c_click2call_customer_busy"));
    let record = finished(&b.app, 1).await.remove(0);
    let call = b.finished_ext(&record.external_id).await;
    assert_eq!(call.kind, 1);
    let fin = call.finished.as_ref().unwrap();
    assert_eq!(
        (fin["STATUS_CODE"].as_str(), int(&fin["DURATION"])),
        (Some("486"), Some(0))
    );
}

#[tokio::test]
async fn a_blind_transfer_keeps_one_call_and_finishes_with_who_talked_last() {
    let b = b24_app(|_| {}).await;
    b.app.ami.send(&capture_body("07_inbound_blind_transfer"));
    let record = finished(&b.app, 1).await.remove(0);
    let call = b.finished_ext("lab-1795264605.55").await;
    assert_eq!(call.user_id, 11, "registered for 101, who answered first");
    let fin = call.finished.as_ref().unwrap();
    assert_eq!(int(&fin["USER_ID"]), Some(12), "102 talked last");
    assert_eq!(int(&fin["DURATION"]), Some(talk(&record)));
    assert_eq!(
        b.portal.calls().len(),
        1,
        "one Bitrix24 call for the whole call"
    );
    // The card went to 102 with the transfer and every card is closed at the end.
    assert!(call.shown_ever.contains(&12), "{:?}", call.card_log);
    b.queue_settled().await;
    assert!(b.portal.open_cards().is_empty(), "{:?}", call.card_log);
}

#[tokio::test]
async fn an_attended_transfer_moves_the_card_and_finishes_with_the_second_manager() {
    let b = b24_app(|_| {}).await;
    b.events(json!([
        {"call_id": "at1", "event": "start", "direction": "in", "phone": "+79991234567", "at": "2026-11-21T10:00:00Z"},
        {"call_id": "at1", "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"},
        {"call_id": "at1", "event": "answer", "extension": "101", "at": "2026-11-21T10:00:03Z"},
        {"call_id": "at1", "event": "transfer", "extension": "102", "at": "2026-11-21T10:00:20Z"},
        {"call_id": "at1", "event": "answer", "extension": "102", "at": "2026-11-21T10:00:25Z"},
        {"call_id": "at1", "event": "hangup", "at": "2026-11-21T10:01:25Z"}
    ]))
    .await;
    let call = b.finished_ext("lab-at1").await;
    let fin = call.finished.as_ref().unwrap();
    assert_eq!(
        (int(&fin["USER_ID"]), fin["STATUS_CODE"].as_str()),
        (Some(12), Some("200"))
    );
    assert_eq!(int(&fin["DURATION"]), Some(82));
    assert_eq!(b.portal.calls().len(), 1);
    assert!(
        call.shown_ever.contains(&12),
        "the card went to 102: {:?}",
        call.card_log
    );
    assert!(b.portal.open_cards().is_empty(), "{:?}", call.card_log);
}

#[tokio::test]
async fn show_card_answered_opens_only_the_answering_managers_card() {
    let b = b24_app(|c| c.bitrix24.show_card = ShowCard::Answered).await;
    b.app.ami.send(&capture_body("03_inbound_from_trunk"));
    let call = b.finished_ext("lab-1795264488.20").await;
    assert!(!call.show, "registered without a card");
    assert_eq!(
        call.shown_ever.iter().copied().collect::<Vec<_>>(),
        vec![11],
        "{:?}",
        call.card_log
    );
}

#[tokio::test]
async fn show_card_none_registers_and_finishes_without_cards() {
    let b = b24_app(|c| c.bitrix24.show_card = ShowCard::None).await;
    b.app.ami.send(&capture_body("03_inbound_from_trunk"));
    let call = b.finished_ext("lab-1795264488.20").await;
    assert!(!call.show);
    assert!(call.shown_ever.is_empty(), "{:?}", call.card_log);
    assert!(b
        .portal
        .requests_of("telephony.externalcall.show")
        .is_empty());
}

#[tokio::test]
async fn every_capture_reaches_the_portal_once_with_a_valid_finish() {
    let b = b24_app(|_| {}).await;
    let names = [
        "02_originate_outbound",
        "03_inbound_from_trunk",
        "04_queue_pause_and_call",
        "07_inbound_blind_transfer",
        "09_inbound_missed",
        "10_inbound_abandoned",
        "14c_click2call_customer_busy",
    ];
    for name in names {
        b.app.ami.send(&capture_body(name));
    }
    let records = finished(&b.app, names.len() as u64).await;
    b.queue_settled().await;
    for r in records
        .iter()
        .filter(|r| r.direction != pbxgate::calls::Direction::Internal)
    {
        let calls = registered_for(&b.portal, &r.external_id);
        assert_eq!(calls.len(), 1, "{}: {calls:?}", r.external_id);
        let c = &calls[0];
        let fin = c
            .finished
            .as_ref()
            .unwrap_or_else(|| panic!("{} not finished", r.external_id));
        assert_eq!(c.finish_count, 1, "{}", r.external_id);
        let answered = r.outcome == pbxgate::calls::Outcome::Answered;
        assert_eq!(
            fin["STATUS_CODE"] == "200",
            answered,
            "{}: {fin}",
            r.external_id
        );
        assert_eq!(
            int(&fin["DURATION"]),
            Some(if answered { talk(r) } else { 0 })
        );
        assert!(!c.start_offset_missing);
    }
    assert!(
        b.portal.open_cards().is_empty(),
        "{:?}",
        b.portal.open_cards()
    );
    assert_eq!(b.portal.rejected(), 0);
}

#[tokio::test]
async fn click_to_call_by_event_is_placed_once_and_finished_under_the_portals_call_id() {
    let b = b24_app(|_| {}).await;
    let handler = b.app.url("/bitrix24/events");
    let (call_id, status) = b.portal.click_to_call(&handler, 11, "+4930123456").await;
    assert_eq!(status, 200);
    let originate = &b.app.ami.wait_for_actions("Originate", 1).await[0];
    assert!(
        originate.get("Channel").unwrap().contains("101"),
        "{originate:?}"
    );
    assert_eq!(originate.get("Exten"), Some("+4930123456"));
    // Bitrix24 delivers events twice: the second is answered and not placed again.
    let form = b.portal.event_form(
        "ONEXTERNALCALLSTART",
        &[
            ("USER_ID", "11"),
            ("PHONE_NUMBER", "+4930123456"),
            ("CALL_ID", &call_id),
        ],
        APP_TOKEN,
    );
    assert_eq!(b.portal.post_event(&handler, &form).await, 200);
    // Asterisk's side: capture 02 (101 answers, the far end answers, 6 s) with our ChannelId.
    let channel_id = originate.get("ChannelId").unwrap().to_string();
    let body = String::from_utf8(capture_body("02_originate_outbound"))
        .unwrap()
        .replace("1795264459.0", &channel_id);
    b.app.ami.send(body.as_bytes());
    let call = b
        .finished_call("the portal's call finished", |c| c.call_id == call_id)
        .await;
    let fin = call.finished.as_ref().unwrap();
    assert_eq!(
        (int(&fin["USER_ID"]), fin["STATUS_CODE"].as_str()),
        (Some(11), Some("200"))
    );
    assert_eq!(b.portal.calls().len(), 1, "not registered again");
    assert_eq!(b.app.ami.actions("Originate").len(), 1);
    assert_eq!(call.finish_count, 1);
}

#[tokio::test]
async fn a_click_to_call_that_cannot_be_placed_is_finished_anyway() {
    let b = b24_app(|_| {}).await;
    b.app.ami.set_reply(
        "Originate",
        crate::support::fake_ami::Reply::Error("Extension does not exist.".into()),
    );
    let handler = b.app.url("/bitrix24/events");
    let (call_id, status) = b.portal.click_to_call(&handler, 11, "+4930123456").await;
    assert_eq!(status, 200);
    let call = b
        .finished_call("the unplaced call finished", |c| c.call_id == call_id)
        .await;
    let fin = call.finished.as_ref().unwrap();
    assert_eq!(
        (fin["STATUS_CODE"].as_str(), int(&fin["DURATION"])),
        (Some("503"), Some(0))
    );
    assert_eq!(b.portal.calls().len(), 1);
    // A user without an extension: nothing to ring, the portal's call is finished too.
    let (call_id, status) = b.portal.click_to_call(&handler, 15, "+4930123457").await;
    assert_eq!(status, 200);
    b.finished_call("the extensionless call finished", |c| c.call_id == call_id)
        .await;
    assert_eq!(b.app.ami.actions("Originate").len(), 1);
}

#[tokio::test]
async fn an_event_without_the_application_token_is_403_and_nothing_is_placed() {
    let b = b24_app(|_| {}).await;
    let handler = b.app.url("/bitrix24/events");
    let form = b.portal.event_form(
        "ONEXTERNALCALLSTART",
        &[
            ("USER_ID", "11"),
            ("PHONE_NUMBER", "+4930123456"),
            (
                "CALL_ID",
                "externalCall.0123456789abcdef0123456789abcdef.1795255200",
            ),
        ],
        "wrong-token",
    );
    assert_eq!(b.portal.post_event(&handler, &form).await, 403);
    let without: Vec<(String, String)> = form
        .into_iter()
        .filter(|(k, _)| k != "auth[application_token]")
        .collect();
    assert_eq!(b.portal.post_event(&handler, &without).await, 403);
    // A genuine one with a broken field is 400 naming it.
    let bad = b
        .portal
        .event_form("ONEXTERNALCALLSTART", &[("USER_ID", "x")], APP_TOKEN);
    let r = b.app.http.post(&handler).form(&bad).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["errors"]["data[USER_ID]"].is_string(), "{body}");
    assert!(b.app.ami.actions("Originate").is_empty());
}

#[tokio::test]
async fn a_call_during_an_outage_is_registered_later_without_a_card_and_finished_once() {
    let b = b24_app(|_| {}).await;
    b.portal.set_outage(true);
    b.events(json!([
        {"call_id": "o1", "event": "start", "direction": "in", "phone": "+79991234567", "at": "2026-11-21T10:00:00Z"},
        {"call_id": "o1", "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"},
        {"call_id": "o1", "event": "answer", "extension": "101", "at": "2026-11-21T10:00:03Z"},
        {"call_id": "o1", "event": "hangup", "at": "2026-11-21T10:00:33Z"}
    ]))
    .await;
    tokio::time::timeout(
        WAIT,
        b.app.state.outbox.wait_until(|s| s.failed_attempts > 0),
    )
    .await
    .expect("a failed delivery");
    assert!(b.portal.calls().is_empty());
    b.portal.set_outage(false);
    let call = b.finished_ext("lab-o1").await;
    assert!(!call.show, "registered from the history: no card");
    assert!(
        call.start.starts_with("2026-11-21T13:00:00+03:00"),
        "{}",
        call.start
    );
    let fin = call.finished.as_ref().unwrap();
    assert_eq!(
        (int(&fin["USER_ID"]), int(&fin["DURATION"])),
        (Some(11), Some(30))
    );
    assert_eq!(b.portal.calls().len(), 1);
    assert_eq!(call.finish_count, 1);
}

#[tokio::test]
async fn a_finish_whose_answer_was_lost_is_not_sent_twice() {
    let b = b24_app(|c| {
        c.history.immediate = false;
        c.history.interval = Duration::from_secs(3600);
    })
    .await;
    b.events(json!([
        {"call_id": "l1", "event": "start", "direction": "in", "phone": "+79991234567", "at": "2026-11-21T10:00:00Z"},
        {"call_id": "l1", "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"},
        {"call_id": "l1", "event": "answer", "extension": "101", "at": "2026-11-21T10:00:03Z"},
        {"call_id": "l1", "event": "hangup", "at": "2026-11-21T10:00:33Z"}
    ]))
    .await;
    let registered = b
        .portal
        .wait_for(WAIT, "registered live", |p| p.calls().into_iter().next())
        .await;
    // The portal finished the call but pbxgate never saw the answer (a timeout, a crash).
    let (status, done) = b
        .portal
        .call_webhook(
            "telephony.externalcall.finish",
            &json!({"CALL_ID": registered.call_id, "USER_ID": 11, "DURATION": 30}),
        )
        .await;
    assert_eq!(status, 200, "{done}");
    finished(&b.app, 1).await;
    b.app.state.outbox.kick();
    b.queue_settled().await;
    let call = b.portal.call(&registered.call_id).unwrap();
    assert_eq!(b.portal.calls().len(), 1, "not registered again");
    assert_eq!(call.finish_count, 2, "one refused attempt, nothing else");
    assert_eq!(b.app.state.outbox.status().dead, 0);
}

#[tokio::test]
async fn the_responsible_manager_of_a_number_routes_the_call() {
    let b = b24_app(|_| {}).await;
    b.portal.add_contact("+79990001122", 12);
    let r = b
        .app
        .http
        .get(b.app.url("/pbx/route"))
        .bearer_auth(PBX_TOKEN)
        .query(&[("phone", "+79990001122")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "102");
    assert_eq!(
        b.portal
            .requests_of("telephony.externalcall.searchcrmentities")
            .len(),
        1
    );
}

#[tokio::test]
async fn a_recording_is_attached_as_our_link_and_the_portal_can_fetch_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let wav = dir.join("r1.wav");
    let mut bytes = b"RIFF\x24\x10\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x40\x1f\x00\x00\x80\x3e\x00\x00\x02\x00\x10\x00data\x00\x10\x00\x00".to_vec();
    bytes.extend(std::iter::repeat_n(7u8, 4096));
    std::fs::write(&wav, &bytes).unwrap();
    let records_dir = dir.clone();
    let b = b24_app(move |c| {
        c.records.dir = records_dir;
        c.history.record_settle = Duration::ZERO;
    })
    .await;
    b.events(json!([
        {"call_id": "r1", "event": "start", "direction": "in", "phone": "+79991234567", "at": "2026-11-21T10:00:00Z"},
        {"call_id": "r1", "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"},
        {"call_id": "r1", "event": "answer", "extension": "101", "at": "2026-11-21T10:00:03Z"},
        {"call_id": "r1", "event": "hangup", "at": "2026-11-21T10:00:33Z", "record": wav.to_string_lossy()}
    ]))
    .await;
    let call = b
        .finished_call("recorded", |c| {
            c.external_call_id.as_deref() == Some("lab-r1") && !c.records.is_empty()
        })
        .await;
    let rec = &call.records[0];
    assert_eq!(rec["FILENAME"], "r1.wav");
    assert_eq!(rec["fetched_status"], 200, "{rec}");
    assert_eq!(rec["fetched_bytes"], bytes.len());
    assert_eq!(rec["fetched_type"], "audio/wav");
    assert!(rec["RECORD_URL"].as_str().unwrap().starts_with(&b.app.base));
}

#[tokio::test]
async fn a_callgate_dialplan_drives_bitrix24_calls_and_passes_methods_through() {
    const UKEY: &str = "cg-ukey-0123456789abcdef";
    let b = b24_app(|c| c.callgate.ukey = Secret::new(UKEY)).await;
    let get = |method: &str, params: Vec<(&str, &str)>| {
        let mut q = vec![("ukey", UKEY)];
        q.extend(params);
        b.app
            .http
            .get(b.app.url(&format!("/rest/{method}/")))
            .query(&q)
            .send()
    };
    // The dialplan announces the call to 101 and 102 and keeps Bitrix24's CALL_ID.
    let r = get(
        "find_assignee",
        vec![
            ("phone", "+79991234567"),
            ("telephony_show", "y"),
            ("internal_phone", "101|102"),
            ("return_only_call_id", "y"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let call_id = r.text().await.unwrap();
    assert!(call_id.starts_with("externalCall."), "{call_id}");
    let call = b.portal.call(&call_id).expect("registered in the portal");
    assert_eq!((call.kind, call.user_id), (2, 11));
    b.portal
        .wait_for(WAIT, "both cards open", |p| {
            (p.call(&call_id)?.visible.len() == 2).then_some(())
        })
        .await;
    // 101 answered: the other card goes; then the call ends after 30 s of talk.
    let r = get(
        "telephony_hide",
        vec![("call_id", &call_id), ("internal_phone_answered", "101")],
    )
    .await
    .unwrap();
    assert_eq!(r.text().await.unwrap(), "true");
    let r = get(
        "telephony_finish",
        vec![
            ("call_id", &call_id),
            ("internal_phone_answered", "101"),
            ("duration", "30"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let call = b
        .finished_call("the CallGate call finished", |c| c.call_id == call_id)
        .await;
    let fin = call.finished.as_ref().unwrap();
    assert_eq!(
        (int(&fin["USER_ID"]), int(&fin["DURATION"])),
        (Some(11), Some(30))
    );
    assert_eq!(fin["STATUS_CODE"], "200");
    assert_eq!(b.portal.calls().len(), 1);
    b.queue_settled().await;
    assert!(b.portal.open_cards().is_empty(), "{:?}", call.card_log);

    // bitrix_api: the portal's answer, unchanged.
    let r = b
        .app
        .http
        .post(b.app.url("/rest/bitrix_api/"))
        .query(&[("ukey", UKEY), ("method", "user.get")])
        .json(&json!({"FILTER": {"UF_PHONE_INNER": "102"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["result"][0]["ID"], "12", "{v}");
    assert!(v["time"].is_object(), "{v}");
}
