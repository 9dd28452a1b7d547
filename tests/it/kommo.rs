//! Kommo as the CRM: captures and PBX webhooks through the call model, the pipeline and the
//! outbox to the strict fake account. Each test says what the account must end up holding.

use std::time::Duration;

use pbxgate::base::secret::Secret;
use pbxgate::config::{Config, CrmKind, UnknownCaller, UserCode};
use pbxgate::crm::registration::RegistrationState;
use serde_json::{json, Value};

use crate::support::fake_kommo::{ANNA, BORIS, CLIENT_SECRET, LONG_LIVED_TOKEN};
use crate::support::{capture_body, finished, lab_app, FakeKommo, TestApp};

const PBX_TOKEN: &str = "kommo-pbx-token-0123456789";
const WAIT: Duration = Duration::from_secs(15);

pub struct K {
    pub app: TestApp,
    pub kommo: FakeKommo,
}

/// pbxgate on the lab's settings with Kommo as its CRM (long-lived token; 101 → Anna,
/// 102 → Boris), registered, AMI up.
pub async fn kommo_app(tweak: impl FnOnce(&mut Config)) -> K {
    let kommo = FakeKommo::start().await;
    kommo_app_with(kommo, tweak).await
}

pub async fn kommo_app_with(kommo: FakeKommo, tweak: impl FnOnce(&mut Config)) -> K {
    let base = kommo.url.clone();
    let app = lab_app(|c| {
        c.crm.kind = CrmKind::Kommo;
        c.crm.register_on_start = true;
        c.kommo.base_url = base;
        c.kommo.long_lived_token = Secret::new(LONG_LIVED_TOKEN);
        c.kommo.client_secret = Secret::new(CLIENT_SECRET);
        c.users = vec![
            UserCode {
                user_id: ANNA as u64,
                code: "101".into(),
            },
            UserCode {
                user_id: BORIS as u64,
                code: "102".into(),
            },
        ];
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
    .expect("registered with Kommo");
    assert_eq!(state, RegistrationState::Registered);
    K { app, kommo }
}

impl K {
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

    /// The calls Kommo holds with `uniq` = `id`, once there is one.
    pub async fn logged(&self, id: &str) -> Vec<Value> {
        let id = id.to_string();
        self.kommo
            .wait_for(WAIT, &format!("{id} logged"), |k| {
                let found: Vec<Value> = k.calls().into_iter().filter(|c| c["uniq"] == id).collect();
                (!found.is_empty()).then_some(found)
            })
            .await
    }

    pub async fn settled(&self) {
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

fn answered(id: &str, phone: &str, talk: u32) -> Value {
    json!([
        {"call_id": id, "event": "start", "direction": "in", "phone": phone, "did": "+74951234567", "at": "2026-11-21T10:00:00Z"},
        {"call_id": id, "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"},
        {"call_id": id, "event": "answer", "extension": "101", "at": "2026-11-21T10:00:03Z"},
        {"call_id": id, "event": "hangup", "at": format!("2026-11-21T10:00:{:02}Z", 3 + talk)}
    ])
}

fn missed(id: &str, phone: &str) -> Value {
    json!([
        {"call_id": id, "event": "start", "direction": "in", "phone": phone, "did": "+74951234567", "at": "2026-11-21T10:00:00Z"},
        {"call_id": id, "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"},
        {"call_id": id, "event": "hangup", "result": "no_answer", "at": "2026-11-21T10:00:09Z"}
    ])
}

#[tokio::test]
async fn an_answered_inbound_call_is_logged_once_on_the_contacts_lead() {
    let k = kommo_app(|_| {}).await;
    let contact = k.kommo.add_contact("Ivan", "+79991234567", BORIS);
    let lead = k.kommo.add_lead_for(contact, BORIS);
    k.events(answered("a1", "+79991234567", 30)).await;
    let calls = k.logged("lab-a1").await;
    k.settled().await;
    assert_eq!(k.kommo.calls().len(), 1, "{:?}", k.kommo.calls());
    let c = &calls[0];
    assert_eq!(c["direction"], "inbound");
    assert_eq!(c["duration"], 30);
    assert_eq!(c["call_status"], 4);
    assert_eq!(c["source"], "pbxgate");
    assert_eq!(
        (c["responsible_user_id"].as_i64(), c["created_by"].as_i64()),
        (Some(ANNA), Some(ANNA))
    );
    // The call's start (10:00:00 UTC), not when it was logged.
    assert_eq!(c["created_at"], 1_795_255_200);
    assert_eq!(
        (c["entity_type"].as_str(), c["entity_id"].as_i64()),
        (Some("leads"), Some(lead))
    );
    // The ringing phone's user got the pop-up.
    let events = k.kommo.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["users"], json!([ANNA]));
    // Answered: no task.
    assert!(k.kommo.tasks().is_empty());
}

#[tokio::test]
async fn a_missed_call_gets_one_task_for_the_manager() {
    let k = kommo_app(|_| {}).await;
    let contact = k.kommo.add_contact("Ivan", "+79991234567", BORIS);
    k.events(missed("m1", "+79991234567")).await;
    let calls = k.logged("lab-m1").await;
    assert_eq!(
        (
            calls[0]["call_status"].as_i64(),
            calls[0]["duration"].as_i64()
        ),
        (Some(6), Some(0))
    );
    let tasks = k
        .kommo
        .wait_for(WAIT, "a task", |k| {
            let t = k.tasks();
            (!t.is_empty()).then_some(t)
        })
        .await;
    k.settled().await;
    // Resending the call (an operator's resend) creates neither a call nor a task again.
    let r = k
        .app
        .http
        .post(k.app.url("/admin/api/calls/lab-m1/resend"))
        .header("X-Pbxgate-Admin", "1")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    k.app.state.outbox.kick();
    k.settled().await;
    assert_eq!(k.kommo.tasks().len(), 1, "{tasks:?}");
    assert_eq!(k.kommo.calls().len(), 1);
    let t = &k.kommo.tasks()[0];
    assert_eq!(t["responsible_user_id"], ANNA);
    assert_eq!(t["task_type_id"], 1);
    assert_eq!(
        (t["entity_type"].as_str(), t["entity_id"].as_i64()),
        (Some("contacts"), Some(contact))
    );
    assert!(t["text"].as_str().unwrap().contains("+79991234567"), "{t}");
    // Due an hour after the call ended (10:00:09).
    assert_eq!(t["complete_till"], 1_795_255_209 + 3600);
}

#[tokio::test]
async fn an_unknown_inbound_caller_becomes_an_incoming_lead() {
    let k = kommo_app(|_| {}).await;
    k.events(answered("u1", "+79990000001", 20)).await;
    let item = k
        .kommo
        .wait_for(WAIT, "an incoming lead", |k| {
            k.unsorted().into_iter().next()
        })
        .await;
    k.settled().await;
    assert_eq!(item["source_uid"], "lab-u1");
    assert_eq!(item["metadata"]["uniq"], "lab-u1");
    assert_eq!(item["metadata"]["from"], "+79990000001");
    assert_eq!(item["metadata"]["duration"], 20);
    assert_eq!(item["metadata"]["is_call_event_needed"], true);
    // No call item was accepted (the first was refused: no contact has the number).
    assert!(k.kommo.calls().is_empty());
    assert_eq!(k.kommo.unsorted().len(), 1);
    assert_eq!(k.app.state.outbox.status().dead, 0);
}

#[tokio::test]
async fn an_unknown_caller_gets_a_contact_first_when_configured() {
    let k = kommo_app(|c| c.kommo.unknown_caller = UnknownCaller::Contact).await;
    k.events(answered("c1", "+79990000002", 15)).await;
    let calls = k.logged("lab-c1").await;
    k.settled().await;
    let contacts = k.kommo.contacts();
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    assert_eq!(calls[0]["entity_type"], "contacts");
    assert_eq!(calls[0]["entity_id"], contacts[0]["id"]);
    assert_eq!(k.kommo.calls().len(), 1);
}

#[tokio::test]
async fn an_unknown_caller_is_kept_not_sent_when_skipped() {
    let k = kommo_app(|c| c.kommo.unknown_caller = UnknownCaller::Skip).await;
    k.events(answered("s1", "+79990000003", 15)).await;
    finished(&k.app, 1).await;
    tokio::time::timeout(
        WAIT,
        k.app
            .state
            .outbox
            .wait_until(|s| s.dead == 1 && s.pending == 0),
    )
    .await
    .expect("held");
    assert!(
        k.kommo.calls().is_empty()
            && k.kommo.unsorted().is_empty()
            && k.kommo.contacts().is_empty()
    );
}

#[tokio::test]
async fn an_outbound_call_is_logged_outbound_for_who_dialled() {
    let k = kommo_app(|_| {}).await;
    k.kommo.add_contact("Far end", "+4930123456", BORIS);
    k.app.ami.send(&capture_body("02_originate_outbound"));
    let record = finished(&k.app, 1).await.remove(0);
    let calls = k.logged(&record.external_id).await;
    let c = &calls[0];
    assert_eq!(c["direction"], "outbound");
    assert_eq!(c["responsible_user_id"], ANNA);
    assert_eq!(c["call_status"], 4);
    assert_eq!(c["duration"].as_u64(), Some(record.talk_seconds));
}

#[tokio::test]
async fn calls_during_an_outage_reach_kommo_once_when_it_is_back() {
    let k = kommo_app(|_| {}).await;
    k.kommo.add_contact("Ivan", "+79991234567", BORIS);
    k.kommo.set_outage(true);
    k.events(answered("o1", "+79991234567", 10)).await;
    k.events(missed("o2", "+79991234567")).await;
    tokio::time::timeout(
        WAIT,
        k.app.state.outbox.wait_until(|s| s.failed_attempts > 0),
    )
    .await
    .expect("a failed delivery");
    k.kommo.set_outage(false);
    k.logged("lab-o1").await;
    k.logged("lab-o2").await;
    k.kommo
        .wait_for(WAIT, "the task", |k| (!k.tasks().is_empty()).then_some(()))
        .await;
    k.settled().await;
    assert_eq!(k.kommo.calls().len(), 2, "{:?}", k.kommo.calls());
    assert_eq!(k.kommo.tasks().len(), 1);
    assert_eq!(k.app.state.outbox.status().dead, 0);
}

#[tokio::test]
async fn a_blocked_account_raises_the_alarm_and_is_not_hammered() {
    let k = kommo_app(|_| {}).await;
    k.kommo.add_contact("Ivan", "+79991234567", BORIS);
    k.kommo.set_blocked(true);
    k.events(answered("b1", "+79991234567", 10)).await;
    // The first request to meet the block (the pop-up) raises the alarm.
    k.kommo
        .wait_for(WAIT, "a refused request", |k| {
            k.requests().into_iter().find(|r| r.status == 403)
        })
        .await;
    // /ready names it; the dashboard's CRM card shows it.
    let deadline = tokio::time::Instant::now() + WAIT;
    let body = loop {
        let body = k.app.ready().await;
        if body["crm"]["refused"].is_string() {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        body["reasons"].to_string().contains("block")
            || body["crm"]["refused"].as_str().unwrap().contains("block"),
        "{body}"
    );
    // More calls: nothing more reaches the account while the alarm is up.
    let before = k.kommo.requests().len();
    for i in 0..5 {
        k.events(answered(&format!("b{}", i + 2), "+79991234567", 10))
            .await;
    }
    finished(&k.app, 6).await;
    let attempts = k.app.state.outbox.status().failed_attempts;
    k.app.state.outbox.kick();
    tokio::time::timeout(
        WAIT,
        k.app
            .state
            .outbox
            .wait_until(|s| s.failed_attempts > attempts),
    )
    .await
    .expect("another delivery tried");
    assert!(
        k.kommo.requests().len() <= before + 1,
        "{} requests after the block",
        k.kommo.requests().len() - before
    );
    assert_eq!(
        k.app.state.outbox.status().dead,
        0,
        "calls are kept, not given up"
    );
}

#[tokio::test]
async fn the_responsible_manager_of_a_number_routes_the_call() {
    let k = kommo_app(|_| {}).await;
    k.kommo.add_contact("Ivan", "+79990001122", BORIS);
    // A contact whose other field merely contains the digits is not taken.
    let r = k
        .app
        .http
        .get(k.app.url("/pbx/route"))
        .bearer_auth(PBX_TOKEN)
        .query(&[("phone", "+79990001122")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "102");
}
