//! Kommo with the real `pbxgate serve` binary: calls across kill -9 and an outage reach the
//! account exactly once (Kommo does not deduplicate), each missed call gets one task, OAuth
//! tokens rotated by the running service survive a kill right after the refresh, an unpaid
//! account raises the alarm without being hammered, and `pbxgate check` / `pbxgate kommo
//! widget` do what they say.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::Command;

use pbxgate::crm::kommo::oauth::TOKENS_KEY;

use crate::cli::{serve, serve_logged};
use crate::support::fake_kommo::{
    ANNA, BORIS, CLIENT_ID, CLIENT_SECRET, LONG_LIVED_TOKEN, REDIRECT_URI,
};
use crate::support::{FakeAmi, FakeKommo};

const TOKEN: &str = "kommo-durability-token-0123456789";
const WAIT: Duration = Duration::from_secs(30);

/// `[[users]]` (101 → Anna, 102 → Boris) in `dir/config.toml`: lists do not come from the
/// environment.
fn write_users(dir: &Path) {
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "[[users]]\nuser_id = {ANNA}\ncode = \"101\"\n\n[[users]]\nuser_id = {BORIS}\ncode = \"102\"\n"
        ),
    )
    .unwrap();
}

/// What every `pbxgate serve` here shares: Kommo as the CRM at `kommo`, the store in `dir`,
/// the fake AMI, webhooks with [`TOKEN`] (system id `pbx`), quick retries.
fn base_env(dir: &Path, ami: &FakeAmi, kommo: &FakeKommo) -> Vec<(&'static str, String)> {
    write_users(dir);
    vec![
        ("PBXGATE__CRM__KIND", "kommo".to_string()),
        ("PBXGATE__CRM__RETRY_BASE", "50ms".to_string()),
        ("PBXGATE__CRM__RETRY_MAX", "200ms".to_string()),
        ("PBXGATE__CRM__MAX_RETRIES", "1".to_string()),
        ("PBXGATE__KOMMO__BASE_URL", kommo.url.clone()),
        ("PBXGATE__AMI__HOST", "127.0.0.1".to_string()),
        ("PBXGATE__AMI__PORT", ami.addr.port().to_string()),
        ("PBXGATE__AMI__SECRET", "s".to_string()),
        (
            "PBXGATE__STORAGE__PATH",
            dir.join("store").display().to_string(),
        ),
        ("PBXGATE__HTTP__LISTEN", "127.0.0.1:0".to_string()),
        ("PBXGATE__PBX__TOKEN", TOKEN.to_string()),
        ("PBXGATE__PBX__SYSTEM_ID", "pbx".to_string()),
        ("PBXGATE__HISTORY__BATCH_WINDOW", "20ms".to_string()),
        ("PBXGATE__HISTORY__RETRY_BASE", "100ms".to_string()),
        ("PBXGATE__HISTORY__RETRY_MAX", "1s".to_string()),
        ("PBXGATE__LOG__LEVEL", "info".to_string()),
    ]
}

/// [`base_env`] with a private integration's long-lived token `token`.
fn long_lived_env(
    dir: &Path,
    ami: &FakeAmi,
    kommo: &FakeKommo,
    token: &str,
) -> Vec<(&'static str, String)> {
    let mut env = base_env(dir, ami, kommo);
    env.extend([
        ("PBXGATE__KOMMO__LONG_LIVED_TOKEN", token.to_string()),
        ("PBXGATE__KOMMO__CLIENT_SECRET", CLIENT_SECRET.to_string()),
    ]);
    env
}

/// [`base_env`] with the account's OAuth integration (no long-lived token).
fn oauth_env(dir: &Path, ami: &FakeAmi, kommo: &FakeKommo) -> Vec<(&'static str, String)> {
    let mut env = base_env(dir, ami, kommo);
    env.extend([
        ("PBXGATE__KOMMO__CLIENT_ID", CLIENT_ID.to_string()),
        ("PBXGATE__KOMMO__CLIENT_SECRET", CLIENT_SECRET.to_string()),
        ("PBXGATE__KOMMO__REDIRECT_URI", REDIRECT_URI.to_string()),
    ]);
    env
}

/// Runs a pbxgate command (not `serve`) in `dir` with exactly `env`.
async fn pbxgate(dir: &Path, args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pbxgate"));
    cmd.args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().await.expect("run pbxgate")
}

fn output(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn post(base: &str, body: Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/pbx/events"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// `/ready`: its status and body.
async fn ready(base: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{base}/ready")).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Polls `/ready` until `ok` holds for its body (at most [`WAIT`]).
async fn ready_until(base: &str, what: &str, ok: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = ready(base).await;
        if ok(status, &body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {what} within {WAIT:?}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `/ready` until `ok` holds for its `history`.
async fn history_until(base: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    ready_until(base, what, |_, body| ok(&body["history"])).await["history"].clone()
}

/// The outbox holds nothing pending or in flight: what Kommo took is marked done on our side
/// too. Its history then.
async fn settled(base: &str) -> Value {
    history_until(base, "a settled outbox", |h| {
        h["pending"] == 0 && h["inFlight"] == 0
    })
    .await
}

fn failed_attempts(history: &Value) -> u64 {
    history["failedAttempts"].as_u64().unwrap_or(0)
}

async fn kill(child: &mut tokio::process::Child) {
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

/// Waits for a line of pbxgate's log containing `what`.
async fn log_line(log: &mut tokio::sync::mpsc::UnboundedReceiver<String>, what: &str) {
    tokio::time::timeout(WAIT, async {
        while let Some(line) = log.recv().await {
            if line.contains(what) {
                return;
            }
        }
        panic!("pbxgate ended before logging {what:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no {what:?} logged within {WAIT:?}"));
}

/// `2026-11-21T10:MM:SSZ`, `secs` after 10:00:00.
fn at(secs: u32) -> String {
    format!("2026-11-21T10:{:02}:{:02}Z", secs / 60, secs % 60)
}

/// The start and the ringing of `ext` of an inbound call from `phone`.
fn ringing(id: &str, phone: &str, ext: &str) -> Vec<Value> {
    vec![
        json!({"call_id": id, "event": "start", "direction": "in", "phone": phone, "did": "+74951234567", "at": at(0)}),
        json!({"call_id": id, "event": "ringing", "extension": ext, "at": at(1)}),
    ]
}

/// An inbound call from `phone` taken by `ext` at 10:00:03, `talk` s of talk.
fn answered(id: &str, phone: &str, ext: &str, talk: u32) -> Value {
    let mut events = ringing(id, phone, ext);
    events.push(json!({"call_id": id, "event": "answer", "extension": ext, "at": at(3)}));
    events.push(json!({"call_id": id, "event": "hangup", "at": at(3 + talk)}));
    Value::Array(events)
}

/// An inbound call from `phone` that rang 101, and nobody took.
fn missed(id: &str, phone: &str) -> Value {
    let mut events = ringing(id, phone, "101");
    events.push(json!({"call_id": id, "event": "hangup", "result": "no_answer", "at": at(9)}));
    Value::Array(events)
}

/// The account's calls with `uniq` = `id` (duplicates kept: Kommo does not dedupe).
fn calls_of(kommo: &FakeKommo, id: &str) -> Vec<Value> {
    kommo
        .calls()
        .into_iter()
        .filter(|c| c["uniq"] == id)
        .collect()
}

/// The account's incoming leads (`leads/unsorted/sip`) of call `id`.
fn unsorted_of(kommo: &FakeKommo, id: &str) -> Vec<Value> {
    kommo
        .unsorted()
        .into_iter()
        .filter(|u| u["source_uid"] == id)
        .collect()
}

/// The account's tasks on entity `entity_id`.
fn tasks_on(kommo: &FakeKommo, entity_id: i64) -> Vec<Value> {
    kommo
        .tasks()
        .into_iter()
        .filter(|t| t["entity_id"].as_i64() == Some(entity_id))
        .collect()
}

/// The one call Kommo has for `id`.
fn once(kommo: &FakeKommo, id: &str) -> Value {
    let calls = calls_of(kommo, id);
    assert_eq!(calls.len(), 1, "{id}: {calls:#?}");
    calls.into_iter().next().unwrap()
}

/// Waits until Kommo has a call for each of `ids`.
async fn all_logged(kommo: &FakeKommo, ids: &[&str]) {
    kommo
        .wait_for(WAIT, &format!("calls {ids:?}"), |k| {
            ids.iter()
                .all(|id| !calls_of(k, id).is_empty())
                .then_some(())
        })
        .await;
}

/// (duration, call_status, responsible_user_id) of a call item.
fn shape(call: &Value) -> (Option<i64>, Option<i64>, Option<i64>) {
    (
        call["duration"].as_i64(),
        call["call_status"].as_i64(),
        call["responsible_user_id"].as_i64(),
    )
}

// ---------------------------------------------------------------------------------------------
// kill -9 and outages

#[tokio::test]
async fn calls_across_a_kill_during_a_kommo_outage_reach_the_account_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let kommo = FakeKommo::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    let ivan = kommo.add_contact("Ivan", "+79991234567", BORIS);
    let ivan_lead = kommo.add_lead_for(ivan, BORIS);
    let petr = kommo.add_contact("Petr", "+79997654321", BORIS);
    let olga = kommo.add_contact("Olga", "+79995550000", BORIS);
    let env = long_lived_env(dir.path(), &ami, &kommo, LONG_LIVED_TOKEN);

    let (mut first, base) = serve(dir.path(), &env).await;
    // With Kommo up: an answered call, a missed one, an unknown caller, and a call still
    // talking.
    post(&base, answered("a1", "+79991234567", "101", 30)).await;
    post(&base, missed("m1", "+79997654321")).await;
    post(&base, answered("u1", "+79990000001", "101", 20)).await;
    let mut p1 = ringing("p1", "+79991234567", "101");
    p1.push(json!({"call_id": "p1", "event": "answer", "extension": "101", "at": at(3)}));
    post(&base, Value::Array(p1)).await;
    all_logged(&kommo, &["pbx-a1", "pbx-m1"]).await;
    kommo
        .wait_for(WAIT, "u1's incoming lead and m1's task", |k| {
            (!unsorted_of(k, "pbx-u1").is_empty() && !tasks_on(k, petr).is_empty()).then_some(())
        })
        .await;
    let before = settled(&base).await;

    // Kommo goes down: an answered call, a missed one, an unknown caller, and one ringing;
    // their requests fail, and pbxgate is killed while they wait for their next try.
    kommo.set_outage(true);
    post(&base, answered("b1", "+79991234567", "101", 45)).await;
    post(&base, missed("b2", "+79995550000")).await;
    post(&base, answered("u2", "+79990000002", "102", 25)).await;
    post(&base, Value::Array(ringing("p2", "+79991234567", "102"))).await;
    history_until(&base, "failed deliveries during the outage", |h| {
        h["pending"].as_u64() >= Some(3) && failed_attempts(h) > failed_attempts(&before)
    })
    .await;
    kill(&mut first).await;

    // Started again with Kommo still down: the calls in progress end.
    let (_second, base) = serve(dir.path(), &env).await;
    post(
        &base,
        json!([{"call_id": "p1", "event": "hangup", "at": at(63)}]),
    )
    .await;
    post(
        &base,
        json!([
            {"call_id": "p2", "event": "answer", "extension": "102", "at": at(5)},
            {"call_id": "p2", "event": "hangup", "at": at(25)}
        ]),
    )
    .await;
    history_until(&base, "failed deliveries after the restart", |h| {
        h["pending"].as_u64() >= Some(5) && failed_attempts(h) > 0
    })
    .await;
    assert_eq!(kommo.calls().len(), 2, "nothing gets through an outage");
    assert_eq!(kommo.unsorted().len(), 1);
    assert_eq!(kommo.tasks().len(), 1);

    // Kommo is back: everything arrives, once.
    kommo.set_outage(false);
    let ids = ["pbx-a1", "pbx-m1", "pbx-p1", "pbx-b1", "pbx-b2", "pbx-p2"];
    all_logged(&kommo, &ids).await;
    kommo
        .wait_for(WAIT, "u2's incoming lead and b2's task", |k| {
            (!unsorted_of(k, "pbx-u2").is_empty() && !tasks_on(k, olga).is_empty()).then_some(())
        })
        .await;
    let history = settled(&base).await;
    assert_eq!(history["dead"], 0, "{history}");

    for id in ids {
        once(&kommo, id);
    }
    assert_eq!(kommo.calls().len(), ids.len(), "{}", kommo.dump());
    for id in ["pbx-u1", "pbx-u2"] {
        let leads = unsorted_of(&kommo, id);
        assert_eq!(leads.len(), 1, "{id}: {leads:#?}");
    }
    assert_eq!(kommo.unsorted().len(), 2, "{}", kommo.dump());
    // One task per missed call, none for the others.
    assert_eq!(tasks_on(&kommo, petr).len(), 1, "{}", kommo.dump());
    assert_eq!(tasks_on(&kommo, olga).len(), 1, "{}", kommo.dump());
    assert_eq!(kommo.tasks().len(), 2, "{}", kommo.dump());

    let a1 = once(&kommo, "pbx-a1");
    assert_eq!(shape(&a1), (Some(30), Some(4), Some(ANNA)));
    assert_eq!(a1["entity_id"].as_i64(), Some(ivan_lead));
    assert_eq!(shape(&once(&kommo, "pbx-m1")).1, Some(6));
    // The call talking at the kill: its whole talk time (answered before, hung up after).
    assert_eq!(
        shape(&once(&kommo, "pbx-p1")),
        (Some(60), Some(4), Some(ANNA))
    );
    assert_eq!(
        shape(&once(&kommo, "pbx-b1")),
        (Some(45), Some(4), Some(ANNA))
    );
    let b2 = once(&kommo, "pbx-b2");
    assert_eq!(shape(&b2).1, Some(6));
    assert_eq!(b2["entity_id"].as_i64(), Some(olga));
    // Ringing at the kill, answered by Boris after it.
    assert_eq!(
        shape(&once(&kommo, "pbx-p2")),
        (Some(20), Some(4), Some(BORIS))
    );
    let u2 = unsorted_of(&kommo, "pbx-u2").remove(0);
    assert_eq!(u2["metadata"]["from"], "+79990000002");
    assert_eq!(u2["metadata"]["duration"], 25);
}

#[tokio::test]
async fn a_missed_calls_task_owed_at_a_kill_is_created_once_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let kommo = FakeKommo::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    let petr = kommo.add_contact("Petr", "+79997654321", BORIS);
    let env = long_lived_env(dir.path(), &ami, &kommo, LONG_LIVED_TOKEN);

    // Kommo takes the call but fails its task (a server error: a POST is not resent at once,
    // Kommo does not deduplicate): the task is owed.
    kommo.fail_next("/api/v4/tasks", 503, json!("<html>503</html>"));
    let (mut first, base, mut log) = serve_logged(dir.path(), &env).await;
    post(&base, missed("t1", "+79997654321")).await;
    log_line(&mut log, "missed-call task not created yet").await;
    kill(&mut first).await;
    once(&kommo, "pbx-t1");
    assert_eq!(kommo.requests_to("/api/v4/tasks").len(), 1);
    assert!(kommo.tasks().is_empty());

    // Started again: the owed task is created (the outbox's drain at start, or the next
    // call's, tries owed tasks again), once; the call is not sent again.
    let (_second, base) = serve(dir.path(), &env).await;
    // The owed task's retry is due a second after its failure (the retry schedule is by
    // time); the next call's drain sweeps it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    post(&base, answered("t2", "+79997654321", "102", 10)).await;
    all_logged(&kommo, &["pbx-t2"]).await;
    let tasks = kommo
        .wait_for(WAIT, "the owed task", |k| {
            let t = tasks_on(k, petr);
            (!t.is_empty()).then_some(t)
        })
        .await;
    settled(&base).await;
    assert_eq!(tasks.len(), 1, "{tasks:#?}");
    assert_eq!(kommo.tasks().len(), 1, "{}", kommo.dump());
    assert_eq!(tasks[0]["responsible_user_id"], ANNA);
    once(&kommo, "pbx-t1");
    once(&kommo, "pbx-t2");
    assert_eq!(kommo.calls().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// OAuth

/// The grant in the store at `dir` (the service must not be running).
fn stored_tokens(dir: &Path) -> Value {
    let store = pbxgate::store::Store::open(&dir.join("store")).unwrap();
    let state = store.crm_state().unwrap();
    let bytes = state.get(TOKENS_KEY).unwrap().expect("stored tokens");
    serde_json::from_slice(&bytes).unwrap()
}

/// `pbxgate kommo auth --code` with a fresh code; its output.
async fn authorise(dir: &Path, kommo: &FakeKommo, env: &[(&str, String)]) -> String {
    let out = pbxgate(dir, &["kommo", "auth", "--code", &kommo.issue_code()], env).await;
    let text = output(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    text
}

#[tokio::test]
async fn a_kill_right_after_a_token_refresh_keeps_the_rotated_pair() {
    let dir = tempfile::tempdir().unwrap();
    let kommo = FakeKommo::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    kommo.add_contact("Ivan", "+79991234567", BORIS);
    let env = oauth_env(dir.path(), &ami, &kommo);

    let said = authorise(dir.path(), &kommo, &env).await;
    let granted = stored_tokens(dir.path());
    for t in ["access_token", "refresh_token"] {
        let t = granted[t].as_str().unwrap();
        assert!(!said.contains(t), "a token printed: {said}");
    }

    let (mut first, base, mut log) = serve_logged(dir.path(), &env).await;
    post(&base, answered("o1", "+79991234567", "101", 10)).await;
    all_logged(&kommo, &["pbx-o1"]).await;
    assert_eq!(kommo.refreshes(), 0);
    settled(&base).await;

    // The access token expires while the service runs: the next call's requests (its pop-up
    // and its item, side by side) refresh it, once. Kommo then fails the call for a while, so
    // the kill right after the refresh lands before Kommo took it.
    kommo.expire_access_tokens();
    for _ in 0..6 {
        kommo.fail_next("/api/v4/calls", 503, json!("<html>503</html>"));
    }
    post(&base, answered("o2", "+79991234567", "101", 20)).await;
    log_line(&mut log, "refreshed the Kommo OAuth token").await;
    kill(&mut first).await;
    assert_eq!(kommo.refreshes(), 1, "{}", kommo.dump());

    // The rotated pair is in the store: the first refresh token is dead now (the fake
    // refuses it, and the access token it came with), so a restart with it would be locked
    // out.
    let rotated = stored_tokens(dir.path());
    assert_ne!(rotated["access_token"], granted["access_token"]);
    assert_ne!(rotated["refresh_token"], granted["refresh_token"]);

    // Started again, it works with the stored pair: its access token first...
    let (_second, base) = serve(dir.path(), &env).await;
    all_logged(&kommo, &["pbx-o2"]).await;
    settled(&base).await;
    assert_eq!(kommo.refreshes(), 1, "the stored access token was used");
    // ...then its refresh token when that expires too.
    kommo.expire_access_tokens();
    post(&base, answered("o3", "+79991234567", "101", 30)).await;
    all_logged(&kommo, &["pbx-o3"]).await;
    let history = settled(&base).await;
    assert_eq!(kommo.refreshes(), 2);
    assert_eq!(history["dead"], 0, "{history}");
    for (id, talk) in [("pbx-o1", 10), ("pbx-o2", 20), ("pbx-o3", 30)] {
        assert_eq!(once(&kommo, id)["duration"], talk, "{id}");
    }
    assert_eq!(kommo.calls().len(), 3, "{}", kommo.dump());
    let grants = kommo.requests_to("/oauth2/access_token");
    assert_eq!(grants.len(), 3, "the code, then two refreshes: {grants:#?}");
    assert!(grants.iter().all(|g| g.status == 200), "{grants:#?}");
    let (status, body) = ready(&base).await;
    assert!(body["crm"]["refused"].is_null(), "{status} {body}");
}

#[tokio::test]
async fn a_revoked_grant_is_named_by_ready_and_the_call_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let kommo = FakeKommo::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    kommo.add_contact("Ivan", "+79991234567", BORIS);
    let env = oauth_env(dir.path(), &ami, &kommo);
    authorise(dir.path(), &kommo, &env).await;
    let granted = stored_tokens(dir.path());

    let (_serving, base) = serve(dir.path(), &env).await;
    ready_until(&base, "readiness", |status, _| status == 200).await;
    // The integration is disconnected in Kommo: access and refresh tokens are dead.
    kommo.revoke_oauth_tokens();
    post(&base, answered("r1", "+79991234567", "101", 10)).await;
    let body = ready_until(&base, "the refusal named", |status, body| {
        status == 503 && body["crm"]["refused"].is_string()
    })
    .await;
    let refused = body["crm"]["refused"].as_str().unwrap();
    assert!(
        refused.contains("pbxgate kommo auth") && refused.contains("401"),
        "{body}"
    );
    assert!(
        body["reasons"].to_string().contains("pbxgate kommo auth"),
        "{body}"
    );
    let history = history_until(&base, "the call kept", |h| {
        h["pending"] == 1 && failed_attempts(h) > 0
    })
    .await;
    assert_eq!(history["dead"], 0, "{history}");
    assert!(kommo.calls().is_empty());
    // Each API request refused with 401 refreshes at most once (a refresh refused is final
    // for that request), and no token is in what /ready says.
    let api_401 = kommo
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/api/") && r.status == 401)
        .count();
    let refreshes = kommo.requests_to("/oauth2/access_token").len() - 1;
    assert!(
        refreshes >= 1 && refreshes <= api_401,
        "{refreshes} refreshes for {api_401} refused requests"
    );
    for t in ["access_token", "refresh_token"] {
        assert!(
            !body.to_string().contains(granted[t].as_str().unwrap()),
            "{body}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 402: the account unpaid

#[tokio::test]
async fn an_unpaid_account_raises_the_alarm_keeps_the_calls_and_is_not_hammered() {
    let dir = tempfile::tempdir().unwrap();
    let kommo = FakeKommo::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    let ivan = kommo.add_contact("Ivan", "+79991234567", BORIS);
    let env = long_lived_env(dir.path(), &ami, &kommo, LONG_LIVED_TOKEN);

    let (mut first, base) = serve(dir.path(), &env).await;
    ready_until(&base, "readiness", |status, _| status == 200).await;
    // The account stops being paid for while a call rings (its pop-up went out): the call's
    // item is the first request to meet the 402, and raises the alarm.
    post(&base, Value::Array(ringing("n1", "+79991234567", "101"))).await;
    kommo
        .wait_for(WAIT, "n1's pop-up", |k| {
            (k.events().len() == 1).then_some(())
        })
        .await;
    kommo.set_unpaid(true);
    post(
        &base,
        json!([
            {"call_id": "n1", "event": "answer", "extension": "101", "at": at(3)},
            {"call_id": "n1", "event": "hangup", "at": at(13)}
        ]),
    )
    .await;
    let refused = kommo
        .wait_for(WAIT, "a 402", |k| {
            k.requests().into_iter().find(|r| r.status == 402)
        })
        .await;
    assert_eq!(refused.path, "/api/v4/calls");
    // /ready names it.
    let body = ready_until(&base, "the alarm", |status, body| {
        status == 503 && body["crm"]["refused"].is_string()
    })
    .await;
    let refused = body["crm"]["refused"].as_str().unwrap();
    assert!(refused.contains("402"), "{body}");
    assert!(body["reasons"].to_string().contains("402"), "{body}");

    // More calls: nothing reaches the account while the alarm is up (the cooldown is 10
    // minutes, not configurable), though the outbox keeps trying.
    let seen = kommo.requests().len();
    post(&base, answered("n2", "+79991234567", "101", 20)).await;
    post(&base, answered("n3", "+79991234567", "102", 30)).await;
    post(&base, missed("n4", "+79991234567")).await;
    let kept = history_until(&base, "the calls kept", |h| h["pending"] == 4).await;
    let history = history_until(&base, "two more tries", |h| {
        failed_attempts(h) >= failed_attempts(&kept) + 2
    })
    .await;
    assert_eq!(
        history["dead"], 0,
        "calls are kept, not given up: {history}"
    );
    assert_eq!(history["pending"], 4, "{history}");
    assert_eq!(
        kommo.requests().len(),
        seen,
        "requests after the alarm:\n{}",
        kommo.dump()
    );
    assert_eq!(
        kommo.requests().iter().filter(|r| r.status == 402).count(),
        1,
        "one refused request raised the alarm:\n{}",
        kommo.dump()
    );

    // Paid again: the running service still waits out its cooldown...
    kommo.set_unpaid(false);
    let paid = failed_attempts(&history);
    history_until(&base, "two more tries", |h| failed_attempts(h) >= paid + 2).await;
    assert_eq!(kommo.requests().len(), seen, "{}", kommo.dump());
    // ...and a restart sends the kept calls at once, each once.
    kill(&mut first).await;
    let (_second, base) = serve(dir.path(), &env).await;
    all_logged(&kommo, &["pbx-n1", "pbx-n2", "pbx-n3", "pbx-n4"]).await;
    kommo
        .wait_for(WAIT, "n4's task", |k| {
            (!tasks_on(k, ivan).is_empty()).then_some(())
        })
        .await;
    let history = settled(&base).await;
    assert_eq!(history["dead"], 0, "{history}");
    for id in ["pbx-n1", "pbx-n2", "pbx-n3", "pbx-n4"] {
        once(&kommo, id);
    }
    assert_eq!(kommo.calls().len(), 4);
    assert_eq!(kommo.tasks().len(), 1);
    let body = ready_until(&base, "readiness", |status, _| status == 200).await;
    assert!(body["crm"]["refused"].is_null(), "{body}");
}

// ---------------------------------------------------------------------------------------------
// `pbxgate check` and `pbxgate kommo widget`

/// `pbxgate check --offline`: (exit code, stdout).
async fn check(dir: &Path, env: &[(&str, String)]) -> (Option<i32>, String) {
    let out = pbxgate(dir, &["check", "--offline"], env).await;
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The line of `check`'s output about Kommo.
fn kommo_line(stdout: &str) -> &str {
    stdout
        .lines()
        .find(|l| l.contains("Kommo"))
        .unwrap_or_else(|| panic!("no Kommo line: {stdout}"))
}

#[tokio::test]
async fn check_names_a_refused_long_lived_token_and_passes_the_good_one() {
    const WRONG: &str = "wrong-long-lived-token-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let kommo = FakeKommo::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;

    let (code, stdout) = check(dir.path(), &long_lived_env(dir.path(), &ami, &kommo, WRONG)).await;
    assert_eq!(code, Some(1), "{stdout}");
    let line = kommo_line(&stdout);
    assert!(
        line.starts_with('✗') && line.contains("401") && line.contains("long-lived token"),
        "{stdout}"
    );
    assert!(
        line.contains("kommo.long_lived_token"),
        "says what to fix: {stdout}"
    );
    assert!(!stdout.contains(WRONG), "no token printed: {stdout}");

    let (code, stdout) = check(
        dir.path(),
        &long_lived_env(dir.path(), &ami, &kommo, LONG_LIVED_TOKEN),
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}");
    let line = kommo_line(&stdout);
    assert!(
        line.starts_with('✓') && line.contains("token accepted"),
        "{stdout}"
    );
    assert!(stdout.lines().all(|l| !l.starts_with('✗')), "{stdout}");
    assert!(
        !stdout.contains(LONG_LIVED_TOKEN),
        "no token printed: {stdout}"
    );
}

#[tokio::test]
async fn check_says_to_run_the_auth_command_when_oauth_has_no_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let kommo = FakeKommo::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    let (code, stdout) = check(dir.path(), &oauth_env(dir.path(), &ami, &kommo)).await;
    assert_eq!(code, Some(1), "{stdout}");
    let line = kommo_line(&stdout);
    assert!(
        line.starts_with('✗') && line.contains("pbxgate kommo auth"),
        "{stdout}"
    );
    assert!(
        kommo.requests().is_empty(),
        "nothing sent without a token: {:?}",
        kommo.requests()
    );
}

/// The files of a zip archive, by name.
fn unzip(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).unwrap();
    let mut zip = zip::ZipArchive::new(file).unwrap();
    (0..zip.len())
        .map(|i| {
            let mut f = zip.by_index(i).unwrap();
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).unwrap();
            (f.name().to_string(), bytes)
        })
        .collect()
}

#[tokio::test]
async fn the_widget_command_writes_a_zip_for_the_configured_address() {
    let dir = tempfile::tempdir().unwrap();
    let kommo = FakeKommo::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    let mut env = long_lived_env(dir.path(), &ami, &kommo, LONG_LIVED_TOKEN);
    env.push((
        "PBXGATE__HTTP__PUBLIC_URL",
        "https://pbx.example.com:8443/".to_string(),
    ));
    let zip_path = dir.path().join("widget.zip");
    let out = pbxgate(
        dir.path(),
        &["kommo", "widget", "--out", zip_path.to_str().unwrap()],
        &env,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", output(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("widget.zip"),
        "{}",
        output(&out)
    );

    let files = unzip(&zip_path);
    let manifest: Value =
        serde_json::from_slice(files.get("manifest.json").expect("manifest.json")).unwrap();
    assert!(manifest["widget"].is_object(), "{manifest}");
    let script = String::from_utf8(files.get("script.js").expect("script.js").clone()).unwrap();
    assert!(
        script.contains("var BAKED_URL = \"https://pbx.example.com:8443\";"),
        "the address is not in script.js"
    );
    assert!(!script.contains("var BAKED_URL = '';"));
    assert!(kommo.requests().is_empty(), "the widget needs no Kommo");

    // An address the widget cannot use: named, and no archive written.
    let bad_path = dir.path().join("bad.zip");
    env.push((
        "PBXGATE__HTTP__PUBLIC_URL",
        "ftp://pbx.example.com".to_string(),
    ));
    let out = pbxgate(
        dir.path(),
        &["kommo", "widget", "--out", bad_path.to_str().unwrap()],
        &env,
    )
    .await;
    assert_ne!(out.status.code(), Some(0), "{}", output(&out));
    assert!(output(&out).contains("http.public_url"), "{}", output(&out));
    assert!(!bad_path.exists());
}
