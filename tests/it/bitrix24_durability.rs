//! Bitrix24 with the real `pbxgate serve` binary: calls across kill -9 and a portal outage
//! reach the portal exactly once (register, finish), OAuth tokens refreshed by the running
//! service survive a restart, and refused credentials or missing scopes are named by
//! `pbxgate check` and `/ready`.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::Command;

use pbxgate::base::secret::Secret;
use pbxgate::config::CrmKind;
use pbxgate::crm::bitrix24::oauth::TOKENS_KEY;
use pbxgate::crm::registration::RegistrationState;

use crate::cli::{serve, serve_logged};
use crate::support::fake_bitrix24::{FakeCall, CLIENT_ID, CLIENT_SECRET, WEBHOOK_SECRET};
use crate::support::{lab_app, FakeAmi, FakeBitrix24};

const TOKEN: &str = "b24-durability-token-0123456789";
const WAIT: Duration = Duration::from_secs(30);

/// What every `pbxgate serve` here shares: Bitrix24 as the CRM, the store in `dir`, the fake
/// AMI, webhooks with [`TOKEN`] (system id `pbx`), quick retries.
fn base_env(dir: &Path, ami: &FakeAmi) -> Vec<(&'static str, String)> {
    vec![
        ("PBXGATE__CRM__KIND", "bitrix24".to_string()),
        ("PBXGATE__CRM__RETRY_BASE", "50ms".to_string()),
        ("PBXGATE__CRM__RETRY_MAX", "200ms".to_string()),
        ("PBXGATE__CRM__MAX_RETRIES", "1".to_string()),
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

/// [`base_env`] with the portal's inbound webhook.
fn webhook_env(dir: &Path, ami: &FakeAmi, webhook: &str) -> Vec<(&'static str, String)> {
    let mut env = base_env(dir, ami);
    env.push(("PBXGATE__BITRIX24__WEBHOOK_URL", webhook.to_string()));
    env
}

/// [`base_env`] with the portal's local application (OAuth, no webhook).
fn oauth_env(dir: &Path, ami: &FakeAmi, portal: &FakeBitrix24) -> Vec<(&'static str, String)> {
    let mut env = base_env(dir, ami);
    env.extend([
        ("PBXGATE__BITRIX24__PORTAL", portal.url.clone()),
        ("PBXGATE__BITRIX24__CLIENT_ID", CLIENT_ID.to_string()),
        (
            "PBXGATE__BITRIX24__CLIENT_SECRET",
            CLIENT_SECRET.to_string(),
        ),
        ("PBXGATE__BITRIX24__OAUTH_SERVER", portal.url.clone()),
    ]);
    env
}

/// Runs a pbxgate command (not `serve`) with exactly `env`.
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

/// `/ready`'s body (whatever its status).
async fn ready(base: &str) -> Value {
    reqwest::get(format!("{base}/ready"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls `/ready` until `ok` holds for its `history` (at most [`WAIT`]).
async fn history_until(base: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let history = ready(base).await["history"].clone();
        if ok(&history) {
            return history;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {what} within {WAIT:?}: {history}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the service's outbox holds nothing pending or in flight: the calls the portal
/// took are marked done on our side too (a kill before that is the documented crash window,
/// where a finish is sent again and answered "Call is not found").
async fn settled(base: &str) {
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ready: Value = http
            .get(format!("{base}/ready"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let h = &ready["history"];
        if h["pending"] == 0 && h["inFlight"] == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "outbox never settled: {h}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn kill(child: &mut tokio::process::Child) {
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

/// An answered inbound call from +79991234567 taken by 101: 3 s ringing, `talk` s talking.
fn answered(id: &str, talk: u32) -> Value {
    json!([
        {"call_id": id, "event": "start", "direction": "in", "phone": "+79991234567", "did": "+74951234567", "at": "2026-11-21T10:00:00Z"},
        {"call_id": id, "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:00Z"},
        {"call_id": id, "event": "answer", "extension": "101", "at": "2026-11-21T10:00:03Z"},
        {"call_id": id, "event": "hangup", "at": format!("2026-11-21T10:{:02}:{:02}Z", (3 + talk) / 60, (3 + talk) % 60)}
    ])
}

/// A call from +79997654321 that rang 101 and 102 and nobody took.
fn missed(id: &str) -> Value {
    json!([
        {"call_id": id, "event": "start", "direction": "in", "phone": "+79997654321", "at": "2026-11-21T10:00:00Z"},
        {"call_id": id, "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"},
        {"call_id": id, "event": "ringing", "extension": "102", "at": "2026-11-21T10:00:01Z"},
        {"call_id": id, "event": "hangup", "result": "no_answer", "at": "2026-11-21T10:00:09Z"}
    ])
}

/// A small WAV file (what Asterisk's MixMonitor writes, shortened).
fn wav_bytes() -> Vec<u8> {
    let mut bytes = b"RIFF\x24\x10\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x40\x1f\x00\x00\x80\x3e\x00\x00\x02\x00\x10\x00data\x00\x10\x00\x00".to_vec();
    bytes.extend(std::iter::repeat_n(7u8, 4096));
    bytes
}

/// The portal's calls registered with EXTERNAL_CALL_ID `id`.
fn calls_of(portal: &FakeBitrix24, id: &str) -> Vec<FakeCall> {
    portal
        .calls()
        .into_iter()
        .filter(|c| c.external_call_id.as_deref() == Some(id))
        .collect()
}

/// Successful `register` requests that carried EXTERNAL_CALL_ID `id`.
fn registers_of(portal: &FakeBitrix24, id: &str) -> usize {
    portal
        .requests_of("telephony.externalcall.register")
        .iter()
        .filter(|r| r.status == 200 && r.params["EXTERNAL_CALL_ID"] == id)
        .count()
}

/// Waits until the portal has a finished call for each of `ids`.
async fn all_finished(portal: &FakeBitrix24, ids: &[&str]) {
    portal
        .wait_for(WAIT, &format!("finished calls {ids:?}"), |p| {
            ids.iter()
                .all(|id| calls_of(p, id).iter().any(FakeCall::is_finished))
                .then_some(())
        })
        .await;
}

/// A number the portal got as a number or (through a batch) as a string.
fn int(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// The one call the portal has for `id`: registered once, finished once.
fn once(portal: &FakeBitrix24, id: &str) -> FakeCall {
    let calls = calls_of(portal, id);
    assert_eq!(calls.len(), 1, "{id}: {calls:#?}");
    let call = calls.into_iter().next().unwrap();
    assert_eq!(call.dedup_hits, 0, "{id} registered again: {call:#?}");
    assert_eq!(registers_of(portal, id), 1, "{id}");
    assert!(call.is_finished(), "{id} not finished: {call:#?}");
    assert_eq!(call.finish_count, 1, "{id}: {call:#?}");
    call
}

fn finish_of(call: &FakeCall) -> (Option<&str>, Option<i64>, Option<i64>) {
    let fin = call.finished.as_ref().unwrap();
    (
        fin["STATUS_CODE"].as_str(),
        int(&fin["USER_ID"]),
        int(&fin["DURATION"]),
    )
}

// ---------------------------------------------------------------------------------------------
// kill -9 and outages

#[tokio::test]
async fn calls_across_a_kill_during_a_portal_outage_reach_bitrix24_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let portal = FakeBitrix24::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    let records = std::fs::canonicalize(dir.path()).unwrap().join("records");
    std::fs::create_dir(&records).unwrap();
    let wav = records.join("r1.wav");
    std::fs::write(&wav, wav_bytes()).unwrap();
    let mut env = webhook_env(dir.path(), &ami, &portal.webhook_url());
    env.extend([
        ("PBXGATE__RECORDS__DIR", records.display().to_string()),
        ("PBXGATE__HISTORY__RECORD_SETTLE", "0s".to_string()),
        ("PBXGATE__BITRIX24__RECORD_UPLOAD", "file".to_string()),
    ]);

    let (mut first, base) = serve(dir.path(), &env).await;
    // With the portal up: two whole calls, and one answered and still talking.
    post(&base, answered("a1", 30)).await;
    post(&base, missed("a2")).await;
    post(
        &base,
        json!([
            {"call_id": "p1", "event": "start", "direction": "in", "phone": "+79990001111", "at": "2026-11-21T10:00:00Z"},
            {"call_id": "p1", "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:00Z"},
            {"call_id": "p1", "event": "answer", "extension": "101", "at": "2026-11-21T10:00:03Z"}
        ]),
    )
    .await;
    all_finished(&portal, &["pbx-a1", "pbx-a2"]).await;
    let p1 = portal
        .wait_for(WAIT, "p1 registered live", |p| {
            calls_of(p, "pbx-p1").into_iter().next()
        })
        .await;
    assert!(p1.show && !p1.is_finished(), "{p1:#?}");

    // The portal goes down: three more whole calls (one recorded) and one ringing; their
    // registers and finishes fail, and pbxgate is killed while they wait for their next try.
    portal.set_outage(true);
    post(&base, answered("b1", 45)).await;
    post(&base, missed("b2")).await;
    post(
        &base,
        json!([
            {"call_id": "r1", "event": "start", "direction": "in", "phone": "+79990003333", "at": "2026-11-21T10:00:00Z"},
            {"call_id": "r1", "event": "ringing", "extension": "103", "at": "2026-11-21T10:00:00Z"},
            {"call_id": "r1", "event": "answer", "extension": "103", "at": "2026-11-21T10:00:02Z"},
            {"call_id": "r1", "event": "hangup", "at": "2026-11-21T10:00:17Z", "record": wav.display().to_string()}
        ]),
    )
    .await;
    post(
        &base,
        json!([
            {"call_id": "p2", "event": "start", "direction": "in", "phone": "+79990002222", "at": "2026-11-21T10:00:00Z"},
            {"call_id": "p2", "event": "ringing", "extension": "102", "at": "2026-11-21T10:00:00Z"}
        ]),
    )
    .await;
    history_until(&base, "failed delivery during the outage", |h| {
        h["failedAttempts"].as_u64() > Some(0)
    })
    .await;
    kill(&mut first).await;

    // Started again with the portal still down: the calls in progress end.
    let (_second, base) = serve(dir.path(), &env).await;
    post(
        &base,
        json!([{"call_id": "p1", "event": "hangup", "at": "2026-11-21T10:01:03Z"}]),
    )
    .await;
    post(
        &base,
        json!([
            {"call_id": "p2", "event": "answer", "extension": "102", "at": "2026-11-21T10:00:05Z"},
            {"call_id": "p2", "event": "hangup", "at": "2026-11-21T10:00:25Z"}
        ]),
    )
    .await;
    history_until(&base, "failed delivery after the restart", |h| {
        h["failedAttempts"].as_u64() > Some(0)
    })
    .await;
    assert!(
        calls_of(&portal, "pbx-p2").is_empty() && calls_of(&portal, "pbx-b1").is_empty(),
        "nothing gets through an outage: {:#?}",
        portal.calls()
    );

    // The portal is back: everything arrives, once.
    portal.set_outage(false);
    let ids = [
        "pbx-a1", "pbx-a2", "pbx-p1", "pbx-b1", "pbx-b2", "pbx-r1", "pbx-p2",
    ];
    all_finished(&portal, &ids).await;
    let history = history_until(&base, "an empty queue", |h| {
        h["pending"] == 0 && h["inFlight"] == 0
    })
    .await;
    assert_eq!(history["dead"], 0, "{history}");
    for id in ids {
        once(&portal, id);
    }
    assert_eq!(portal.calls().len(), ids.len(), "{:#?}", portal.calls());

    assert_eq!(
        finish_of(&once(&portal, "pbx-a1")),
        (Some("200"), Some(11), Some(30))
    );
    assert_eq!(finish_of(&once(&portal, "pbx-a2")).0, Some("304"));
    // The call talking at the kill: finished under the CALL_ID it got before, with its whole
    // talk time (answered before the kill, hung up after it).
    let p1_after = once(&portal, "pbx-p1");
    assert_eq!(p1_after.call_id, p1.call_id);
    assert_eq!(finish_of(&p1_after), (Some("200"), Some(11), Some(60)));
    // Calls whose live register met the outage are registered from the history, without a
    // card (the customer is long gone).
    let b1 = once(&portal, "pbx-b1");
    assert_eq!(finish_of(&b1), (Some("200"), Some(11), Some(45)));
    let b2 = once(&portal, "pbx-b2");
    assert_eq!(finish_of(&b2).0, Some("304"));
    let p2 = once(&portal, "pbx-p2");
    assert_eq!(finish_of(&p2), (Some("200"), Some(12), Some(20)));
    let r1 = once(&portal, "pbx-r1");
    assert_eq!(finish_of(&r1), (Some("200"), Some(13), Some(15)));
    assert_eq!(r1.records.len(), 1, "{:?}", r1.records);
    assert_eq!(r1.records[0]["FILENAME"], "r1.wav");
    assert_eq!(portal.record_bytes(&r1.call_id), Some(wav_bytes()));
    for c in [&b1, &b2, &r1, &p2] {
        assert!(!c.show, "{c:#?}");
        assert!(c.shown_ever.is_empty(), "{:?}", c.card_log);
    }
    assert!(portal.open_cards().is_empty(), "{:?}", portal.open_cards());
}

#[tokio::test]
async fn a_kill_right_after_the_live_register_finishes_the_call_under_the_same_call_id() {
    let dir = tempfile::tempdir().unwrap();
    let portal = FakeBitrix24::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    let env = webhook_env(dir.path(), &ami, &portal.webhook_url());

    let (mut first, base, mut log) = serve_logged(dir.path(), &env).await;
    post(
        &base,
        json!([
            {"call_id": "k1", "event": "start", "direction": "in", "phone": "+79991234567", "at": "2026-11-21T10:00:00Z"},
            {"call_id": "k1", "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"}
        ]),
    )
    .await;
    // Killed as soon as it says the CALL_ID is kept (the card is still open on the portal).
    tokio::time::timeout(WAIT, async {
        while let Some(line) = log.recv().await {
            if line.contains("call registered in Bitrix24") {
                return;
            }
        }
        panic!("pbxgate ended before registering the call");
    })
    .await
    .expect("the live register");
    kill(&mut first).await;
    let registered = calls_of(&portal, "pbx-k1");
    assert_eq!(registered.len(), 1, "{registered:#?}");
    let call_id = registered[0].call_id.clone();
    assert!(!registered[0].is_finished());

    let (_second, base) = serve(dir.path(), &env).await;
    post(
        &base,
        json!([
            {"call_id": "k1", "event": "answer", "extension": "101", "at": "2026-11-21T10:00:04Z"},
            {"call_id": "k1", "event": "hangup", "at": "2026-11-21T10:00:34Z"}
        ]),
    )
    .await;
    all_finished(&portal, &["pbx-k1"]).await;
    let call = once(&portal, "pbx-k1");
    assert_eq!(call.call_id, call_id, "finished under the CALL_ID kept");
    assert_eq!(finish_of(&call), (Some("200"), Some(11), Some(30)));
    assert_eq!(portal.calls().len(), 1);
    assert!(portal.open_cards().is_empty(), "{:?}", portal.open_cards());
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

#[tokio::test]
async fn the_running_service_refreshes_an_expired_token_once_and_keeps_the_rotated_pair() {
    let dir = tempfile::tempdir().unwrap();
    let portal = FakeBitrix24::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    let env = oauth_env(dir.path(), &ami, &portal);

    let out = pbxgate(
        dir.path(),
        &["bitrix24", "auth", "--code", &portal.issue_code()],
        &env,
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let granted = stored_tokens(dir.path());

    let (mut first, base) = serve(dir.path(), &env).await;
    post(&base, answered("o1", 10)).await;
    all_finished(&portal, &["pbx-o1"]).await;
    assert_eq!(once(&portal, "pbx-o1").registered_via, "oauth");
    assert_eq!(portal.refreshes(), 0);

    // The access token expires while the service runs: the next call's requests refresh it,
    // once, and go through.
    portal.expire_access_tokens();
    post(&base, answered("o2", 20)).await;
    all_finished(&portal, &["pbx-o2"]).await;
    let o2 = once(&portal, "pbx-o2");
    assert_eq!(o2.registered_via, "oauth");
    assert_eq!(finish_of(&o2), (Some("200"), Some(11), Some(20)));
    assert_eq!(portal.refreshes(), 1);

    // Killed: the rotated pair is in the store (the refresh token granted first is dead now).
    settled(&base).await;
    kill(&mut first).await;
    let rotated = stored_tokens(dir.path());
    assert_ne!(rotated["access_token"], granted["access_token"]);
    assert_ne!(rotated["refresh_token"], granted["refresh_token"]);

    // Started again, it works with the stored pair: its access token first, then its refresh
    // token when that expires too.
    let (_second, base) = serve(dir.path(), &env).await;
    post(&base, answered("o3", 30)).await;
    all_finished(&portal, &["pbx-o3"]).await;
    assert_eq!(portal.refreshes(), 1, "the stored access token was used");
    portal.expire_access_tokens();
    post(&base, answered("o4", 40)).await;
    all_finished(&portal, &["pbx-o4"]).await;
    assert_eq!(portal.refreshes(), 2);
    for id in ["pbx-o1", "pbx-o2", "pbx-o3", "pbx-o4"] {
        assert_eq!(once(&portal, id).registered_via, "oauth", "{id}");
    }
    let refused: Vec<_> = portal
        .oauth_requests()
        .into_iter()
        .filter(|r| r.status != 200)
        .collect();
    assert!(refused.is_empty(), "{refused:#?}");
}

// ---------------------------------------------------------------------------------------------
// `pbxgate check` and `/ready`

/// `pbxgate check --offline`: (exit code, stdout).
async fn check(dir: &Path, env: &[(&str, String)]) -> (Option<i32>, String) {
    let out = pbxgate(dir, &["check", "--offline"], env).await;
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The line of `check`'s output about Bitrix24.
fn bitrix24_line(stdout: &str) -> &str {
    stdout
        .lines()
        .find(|l| l.contains("Bitrix24"))
        .unwrap_or_else(|| panic!("no Bitrix24 line: {stdout}"))
}

#[tokio::test]
async fn check_names_a_refused_webhook_and_missing_scopes_and_passes_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let portal = FakeBitrix24::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;

    let wrong = format!("{}/rest/1/wrongsecret0123456789/", portal.url);
    let (code, stdout) = check(dir.path(), &webhook_env(dir.path(), &ami, &wrong)).await;
    assert_eq!(code, Some(1), "{stdout}");
    let line = bitrix24_line(&stdout);
    assert!(
        line.starts_with('✗') && line.contains("NO_AUTH_FOUND"),
        "{stdout}"
    );
    assert!(line.contains("webhook_url"), "says what to fix: {stdout}");
    assert!(
        !stdout.contains("wrongsecret"),
        "no secret printed: {stdout}"
    );

    let good = webhook_env(dir.path(), &ami, &portal.webhook_url());
    portal.set_scopes(&["telephony"]);
    let (code, stdout) = check(dir.path(), &good).await;
    assert_eq!(code, Some(1), "{stdout}");
    let line = bitrix24_line(&stdout);
    assert!(
        line.starts_with('✗') && line.contains("scopes crm, user"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(WEBHOOK_SECRET),
        "no secret printed: {stdout}"
    );

    portal.set_scopes(&["telephony", "crm", "user"]);
    let (code, stdout) = check(dir.path(), &good).await;
    assert_eq!(code, Some(0), "{stdout}");
    let line = bitrix24_line(&stdout);
    assert!(
        line.starts_with('✓') && line.contains("credentials accepted"),
        "{stdout}"
    );
    assert!(stdout.lines().all(|l| !l.starts_with('✗')), "{stdout}");
    assert!(
        !stdout.contains(WEBHOOK_SECRET),
        "no secret printed: {stdout}"
    );
}

#[tokio::test]
async fn check_says_to_run_the_auth_command_when_oauth_has_no_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let portal = FakeBitrix24::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    let (code, stdout) = check(dir.path(), &oauth_env(dir.path(), &ami, &portal)).await;
    assert_eq!(code, Some(1), "{stdout}");
    let line = bitrix24_line(&stdout);
    assert!(
        line.starts_with('✗') && line.contains("pbxgate bitrix24 auth"),
        "{stdout}"
    );
    assert!(
        portal.requests().is_empty(),
        "nothing sent without a token: {:?}",
        portal.requests()
    );
}

#[tokio::test]
async fn ready_is_503_naming_the_refused_webhook_after_a_refused_request() {
    let portal = FakeBitrix24::start().await;
    let wrong = format!("{}/rest/1/wrongsecret0123456789/", portal.url);
    let app = lab_app(|c| {
        c.crm.kind = CrmKind::Bitrix24;
        c.crm.register_on_start = true;
        c.bitrix24.webhook_url = Secret::new(wrong);
        c.users.clear();
    })
    .await;
    let state = tokio::time::timeout(
        WAIT,
        app.state
            .registration
            .wait_for(|s| matches!(s, RegistrationState::Failed(_))),
    )
    .await
    .expect("registration refused");
    assert!(
        matches!(&state, RegistrationState::Failed(e) if e.contains("NO_AUTH_FOUND")),
        "{state:?}"
    );
    let r = app.http.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    let reasons: Vec<&str> = body["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("refused the webhook") && r.contains("NO_AUTH_FOUND")),
        "{body}"
    );
    assert!(
        body["crm"]["refused"]
            .as_str()
            .is_some_and(|r| r.contains("NO_AUTH_FOUND")),
        "{body}"
    );
    assert!(!body.to_string().contains("wrongsecret"), "{body}");
}

// ---------------------------------------------------------------------------------------------
// A server error of one command of the finish batch

#[tokio::test]
async fn a_server_error_of_the_finish_inside_the_batch_is_retried_not_given_up() {
    let b = crate::bitrix24::b24_app(|_| {}).await;
    // The portal fails the finish itself (HTTP 500 on its own; inside a batch the item's error
    // comes without a status).
    b.portal.fail_next(
        "telephony.externalcall.finish",
        500,
        "INTERNAL_SERVER_ERROR",
        "Internal server error",
    );
    b.events(json!([
        {"call_id": "e1", "event": "start", "direction": "in", "phone": "+79991234567", "at": "2026-11-21T10:00:00Z"},
        {"call_id": "e1", "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"},
        {"call_id": "e1", "event": "answer", "extension": "101", "at": "2026-11-21T10:00:03Z"},
        {"call_id": "e1", "event": "hangup", "at": "2026-11-21T10:00:33Z"}
    ]))
    .await;
    b.portal
        .wait_for(WAIT, "the refused finish", |p| {
            (!p.requests_of("telephony.externalcall.finish").is_empty()).then_some(())
        })
        .await;
    b.queue_settled().await;
    let status = b.app.state.outbox.status();
    assert_eq!(
        status.dead, 0,
        "the call was given up after a server error: {:?}",
        status.last_error
    );
    let call = b.finished_ext("lab-e1").await;
    assert!(call.finished.is_some());
    assert_eq!(
        b.portal.requests_of("telephony.externalcall.finish").len(),
        2,
        "one refused attempt, one taken"
    );
    assert_eq!(b.portal.calls().len(), 1);
}

#[tokio::test]
async fn a_server_error_of_attach_record_inside_the_batch_sends_the_recording_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let wav = dir.join("e2.wav");
    std::fs::write(&wav, wav_bytes()).unwrap();
    let records_dir = dir.clone();
    let b = crate::bitrix24::b24_app(move |c| {
        c.records.dir = records_dir;
        c.history.record_settle = Duration::ZERO;
        c.bitrix24.record_upload = pbxgate::config::RecordUpload::File;
    })
    .await;
    b.portal.fail_next(
        "telephony.externalCall.attachRecord",
        500,
        "INTERNAL_SERVER_ERROR",
        "Internal server error",
    );
    b.events(json!([
        {"call_id": "e2", "event": "start", "direction": "in", "phone": "+79991234567", "at": "2026-11-21T10:00:00Z"},
        {"call_id": "e2", "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"},
        {"call_id": "e2", "event": "answer", "extension": "101", "at": "2026-11-21T10:00:03Z"},
        {"call_id": "e2", "event": "hangup", "at": "2026-11-21T10:00:33Z", "record": wav.to_string_lossy()}
    ]))
    .await;
    let call = b.finished_ext("lab-e2").await;
    b.portal
        .wait_for(WAIT, "the recording attached", |p| {
            p.call(&call.call_id).filter(|c| !c.records.is_empty())
        })
        .await;
    b.queue_settled().await;
    let call = b.portal.call(&call.call_id).unwrap();
    assert_eq!(
        call.finish_count, 1,
        "finished once; only the record is sent again"
    );
    assert_eq!(call.records.len(), 1, "{:?}", call.records);
    assert_eq!(b.portal.record_bytes(&call.call_id), Some(wav_bytes()));
    assert_eq!(
        b.portal
            .requests_of("telephony.externalCall.attachRecord")
            .len(),
        2
    );
}
