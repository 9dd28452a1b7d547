//! Missed-call follow-up tasks in retailCRM (`tasks/create`) against the strict fake: which
//! calls get one, for whom and when, and that each gets exactly one across transient failures,
//! re-deliveries and restarts.

use std::sync::Arc;
use std::time::Duration;

use pbxgate::calls::{CallRecord, Outcome};
use pbxgate::crm::{Delivery, Finished};
use pbxgate::hooks::Hooks;
use pbxgate::outbox::Drain;
use pbxgate::store::Store;
use serde_json::Value;

use crate::support::{
    call_record, capture_body, finished, lab_app, test_config, FakeCrm, TestApp, T0,
};

const TASKS: &str = "/api/v5/tasks/create";
const UPLOAD: &str = "/api/v5/telephony/calls/upload";

/// An app whose uploader only runs when a test calls `drain()`.
pub(crate) async fn manual_app(tweak: impl FnOnce(&mut pbxgate::config::Config)) -> TestApp {
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.crm.max_retries = 0;
        c.history.immediate = false;
        c.history.interval = Duration::from_secs(3600);
        tweak(c);
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), app.state.outbox.wait_changes(1))
        .await
        .expect("startup drain");
    app
}

/// An inbound call on extension 101 (user 1) nobody answered: 65 s of ringing.
pub(crate) fn missed(id: &str) -> CallRecord {
    CallRecord {
        answer: None,
        outcome: Outcome::NoAnswer,
        wait_seconds: 65,
        talk_seconds: 0,
        connected_seconds: 0,
        answered_by: None,
        ..call_record(id, T0)
    }
}

/// `end + 1h` in Europe/Moscow (the fake account's zone), as `tasks/create` takes it.
fn due(end_ms: i64) -> String {
    jiff::Timestamp::from_millisecond(end_ms + 3_600_000)
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::get("Europe/Moscow").unwrap())
        .strftime("%Y-%m-%d %H:%M")
        .to_string()
}

#[tokio::test]
async fn a_missed_inbound_call_becomes_one_task_for_its_manager_after_the_call() {
    let app = lab_app(|c| c.crm.missed_call_tasks = true).await;
    app.ami.send(&capture_body("09_inbound_missed"));
    let record = finished(&app, 1).await.remove(0);
    let tasks = app.crm.wait_for_tasks(1, Duration::from_secs(15)).await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let task = &tasks[0];
    assert_eq!(task["performerId"], 1, "{task}");
    assert_eq!(
        task["text"],
        Value::from(format!("Missed call from {}", record.customer_number)),
        "{task}"
    );
    assert_eq!(task["phone"], Value::from(record.customer_number.clone()));
    assert_eq!(task["datetime"], Value::from(due(record.end)), "{task}");
    assert!(
        task["commentary"]
            .as_str()
            .is_some_and(|c| c.contains(&record.external_id)),
        "{task}"
    );
    // Created after the call itself reached the CRM.
    let order: Vec<String> = app.crm.requests().into_iter().map(|r| r.path).collect();
    let upload = order.iter().position(|p| p == UPLOAD).unwrap();
    let created = order.iter().position(|p| p == TASKS).unwrap();
    assert!(upload < created, "{order:?}");
    assert!(app.crm.calls().contains_key(&record.external_id));
}

#[tokio::test]
async fn answered_calls_get_no_task_and_missed_ones_in_the_same_batch_do() {
    let app = manual_app(|c| c.crm.missed_call_tasks = true).await;
    let outbox = &app.state.outbox;
    outbox
        .enqueue(call_record("pbx-answered", T0))
        .await
        .unwrap();
    outbox.enqueue(missed("pbx-missed")).await.unwrap();
    let mut busy_out = missed("pbx-out-busy");
    busy_out.direction = pbxgate::calls::Direction::Out;
    busy_out.outcome = Outcome::Busy;
    outbox.enqueue(busy_out).await.unwrap();
    assert_eq!(outbox.drain().await, Drain::Done);
    let tasks = app.crm.tasks();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert!(
        tasks[0]["commentary"]
            .as_str()
            .unwrap()
            .contains("pbx-missed"),
        "{tasks:?}"
    );
    assert_eq!(tasks[0]["datetime"], Value::from(due(missed("x").end)));
    assert_eq!(app.crm.calls().len(), 3);
}

#[tokio::test]
async fn with_tasks_off_a_missed_call_gets_none() {
    let app = manual_app(|_| {}).await;
    let outbox = &app.state.outbox;
    outbox.enqueue(missed("pbx-off")).await.unwrap();
    assert_eq!(outbox.drain().await, Drain::Done);
    assert!(app.crm.calls().contains_key("pbx-off"));
    assert!(app.crm.requests_to(TASKS).is_empty());
}

#[tokio::test]
async fn the_configured_performer_gets_the_task_and_a_call_without_user_gets_none() {
    let app = manual_app(|c| {
        c.crm.missed_call_tasks = true;
        c.crm.missed_call_task_performer = 7;
        c.crm.missed_call_task_text = "Call back {phone} today".into();
        c.crm.missed_call_task_due = Duration::from_secs(30 * 60);
    })
    .await;
    let outbox = &app.state.outbox;
    outbox.enqueue(missed("pbx-p")).await.unwrap();
    assert_eq!(outbox.drain().await, Drain::Done);
    let tasks = app.crm.tasks();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["performerId"], 7);
    assert_eq!(tasks[0]["text"], "Call back +79991234567 today");
    // 10:01:05 UTC + 30 min, in Moscow.
    assert_eq!(tasks[0]["datetime"], "2026-11-21 13:31");

    // Extension 109 is nobody's: with the manager as performer, no task.
    let app = manual_app(|c| c.crm.missed_call_tasks = true).await;
    let mut nobody = missed("pbx-nobody");
    nobody.code = Some("109".into());
    app.state.outbox.enqueue(nobody).await.unwrap();
    assert_eq!(app.state.outbox.drain().await, Drain::Done);
    assert!(app.crm.calls().contains_key("pbx-nobody"));
    assert!(app.crm.requests_to(TASKS).is_empty());
}

#[tokio::test]
async fn a_task_that_failed_transiently_is_created_once_after_recovery() {
    let app = manual_app(|c| {
        c.crm.missed_call_tasks = true;
        // The tasks' retry schedule is the history's.
        c.history.retry_base = Duration::from_millis(20);
        c.history.retry_max = Duration::from_millis(200);
    })
    .await;
    let outbox = &app.state.outbox;
    app.crm.set_tasks_down(true);
    outbox.enqueue(missed("pbx-503")).await.unwrap();
    // An outage of tasks alone does not hold the history up: the call is delivered.
    assert_eq!(outbox.drain().await, Drain::Done);
    assert!(app.crm.calls().contains_key("pbx-503"));
    assert!(app.crm.tasks().is_empty());
    assert_eq!(app.crm.requests_to(TASKS).len(), 1);
    assert_eq!(outbox.status().pending, 0);

    // The adapter tries the task again once its backoff has passed (the history scheduler
    // calls this after every drain).
    app.crm.set_tasks_down(false);
    let retry = app.state.config.history.retry_base;
    tokio::time::timeout(Duration::from_secs(10), async {
        while app.crm.tasks().is_empty() {
            app.state.crm.maintain().await;
            tokio::time::sleep(retry).await;
        }
    })
    .await
    .expect("the task was created after recovery");
    assert_eq!(app.crm.upload_counts()["pbx-503"], 1);

    // Tried again and drained again: no second task.
    app.state.crm.maintain().await;
    assert_eq!(outbox.drain().await, Drain::Done);
    assert_eq!(app.crm.tasks().len(), 1, "{:?}", app.crm.tasks());
}

/// The retailCRM adapter on the store at `dir`, as the service builds it.
fn adapter(crm: &FakeCrm, dir: &tempfile::TempDir) -> (Arc<dyn pbxgate::crm::Crm>, Store) {
    let mut config = test_config(&crm.url, dir);
    config.crm.missed_call_tasks = true;
    config.crm.max_retries = 0;
    let store = Store::open(&config.storage.path).unwrap();
    let crm = pbxgate::crm::connect(
        Arc::new(config),
        pbxgate::base::secret::Secret::new("client-id-0123456789abcdef"),
        Some(store.crm_state().unwrap()),
        Hooks::none(),
    )
    .unwrap();
    (crm, store)
}

async fn deliver(crm: &dyn pbxgate::crm::Crm, record: &CallRecord) -> Delivery {
    let f = Finished {
        record,
        record_url: None,
    };
    crm.deliver(&[f]).await.remove(0)
}

#[tokio::test]
async fn after_a_restart_a_call_delivered_again_gets_no_second_task_and_an_owed_one_is_created() {
    let fake = FakeCrm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let done = missed("pbx-r1");
    let owed = missed("pbx-r2");
    {
        let (crm, store) = adapter(&fake, &dir);
        assert_eq!(deliver(crm.as_ref(), &done).await, Delivery::Delivered);
        assert_eq!(fake.tasks().len(), 1);
        fake.set_tasks_down(true);
        assert_eq!(deliver(crm.as_ref(), &owed).await, Delivery::Delivered);
        assert_eq!(fake.tasks().len(), 1);
        fake.set_tasks_down(false);
        drop(crm);
        drop(store);
    }
    // The service starts again on the same store; the outbox sends both calls again (it had
    // not noted the first one as done before it stopped).
    let (crm, _store) = adapter(&fake, &dir);
    assert_eq!(deliver(crm.as_ref(), &done).await, Delivery::Duplicate);
    assert_eq!(fake.tasks().len(), 1, "{:?}", fake.tasks());
    assert_eq!(deliver(crm.as_ref(), &owed).await, Delivery::Duplicate);
    let tasks = fake.tasks();
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    assert!(tasks[1]["commentary"].as_str().unwrap().contains("pbx-r2"));
    assert_eq!(deliver(crm.as_ref(), &owed).await, Delivery::Duplicate);
    assert_eq!(fake.tasks().len(), 2);
}
