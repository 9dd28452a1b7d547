//! Calls in progress across a restart of the service (SIGTERM and kill -9): what was answered
//! 200 (webhooks) or seen on AMI must survive, and the call must reach the CRM once, whole.

use serde_json::Value;

use crate::cli::{env_for, serve};
use crate::support::{FakeAmi, FakeCrm};

const TOKEN: &str = "restart-token-0123456789";

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

/// Waits until the CRM holds `id` (at most 20 s).
async fn in_crm(crm: &FakeCrm, id: &str) -> Value {
    crm.wait_for_call(id, std::time::Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("{id} never reached the CRM"))
}

async fn webhook_call_survives(kill: bool) {
    let dir = tempfile::tempdir().unwrap();
    let crm = FakeCrm::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    let mut env = env_for(dir.path(), &crm, &ami, "s");
    env.extend([
        ("PBXGATE__HTTP__LISTEN", "127.0.0.1:0".to_string()),
        ("PBXGATE__CRM__REGISTER_ON_START", "false".to_string()),
        ("PBXGATE__PBX__TOKEN", TOKEN.to_string()),
        ("PBXGATE__PBX__SYSTEM_ID", "pbx".to_string()),
        ("PBXGATE__HISTORY__BATCH_WINDOW", "20ms".to_string()),
    ]);
    let (mut first, base) = serve(dir.path(), &env).await;
    post(
        &base,
        serde_json::json!([
            {"call_id": "r1", "event": "start", "direction": "in", "phone": "+79991234567",
             "did": "+74951234567", "at": "2026-11-21T10:00:00Z"},
            {"call_id": "r1", "event": "ringing", "extension": "101", "at": "2026-11-21T10:00:01Z"}
        ]),
    )
    .await;
    if kill {
        first.start_kill().unwrap();
    } else {
        let pid = first.id().unwrap();
        std::process::Command::new("kill")
            .arg(pid.to_string())
            .status()
            .unwrap();
    }
    first.wait().await.unwrap();

    let (_second, base) = serve(dir.path(), &env).await;
    post(
        &base,
        serde_json::json!([
            {"call_id": "r1", "event": "answer", "extension": "101", "at": "2026-11-21T10:00:05Z"},
            {"call_id": "r1", "event": "hangup", "at": "2026-11-21T10:01:05Z"}
        ]),
    )
    .await;
    let call = in_crm(&crm, "pbx-r1").await;
    assert_eq!(
        (&call["phone"], &call["code"], &call["result"]),
        (
            &Value::from("+79991234567"),
            &Value::from("101"),
            &Value::from("answered")
        ),
        "{call}"
    );
    assert_eq!(
        (&call["durationWaiting"], &call["duration"]),
        (&Value::from(5), &Value::from(60)),
        "{call}"
    );
    assert_eq!(call["externalPhone"], "+74951234567");
}

#[tokio::test]
async fn a_webhook_call_in_progress_survives_a_kill() {
    webhook_call_survives(true).await;
}

#[tokio::test]
async fn a_webhook_call_in_progress_survives_a_restart() {
    webhook_call_survives(false).await;
}

/// pbxgate's AMI calls across a kill: env for a lab-like PBX (system id `lab`, `from-trunk`).
fn lab_env(dir: &std::path::Path, crm: &FakeCrm, ami: &FakeAmi) -> Vec<(&'static str, String)> {
    let mut env = env_for(dir, crm, ami, "s");
    env.extend([
        ("PBXGATE__HTTP__LISTEN", "127.0.0.1:0".to_string()),
        ("PBXGATE__CRM__REGISTER_ON_START", "false".to_string()),
        ("PBXGATE__PBX__SYSTEM_ID", "lab".to_string()),
        (
            "PBXGATE__CALLS__INBOUND_CONTEXTS",
            r#"["from-trunk"]"#.to_string(),
        ),
        ("PBXGATE__HISTORY__BATCH_WINDOW", "20ms".to_string()),
    ]);
    env
}

/// Waits until the service's journal holds everything up to its `n`-th AMI event.
async fn journaled(base: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let ready: Value = reqwest::get(format!("{base}/ready"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let calls = &ready["calls"];
        if calls["amiEvents"].as_u64() >= Some(n) && calls["eventsJournaled"].as_u64() >= Some(n) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "journal behind: {calls}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Capture 03 cut after the customer and 101 are bridged: (before, after, frames before).
fn capture_03_cut() -> (String, String, u64) {
    let body = String::from_utf8(crate::support::capture_body("03_inbound_from_trunk")).unwrap();
    let second_bridge = body
        .match_indices("Event: BridgeEnter")
        .nth(1)
        .expect("two BridgeEnter")
        .0;
    let cut = second_bridge + body[second_bridge..].find("\r\n\r\n").unwrap() + 4;
    let (before, after) = body.split_at(cut);
    let frames = before.matches("Event: ").count() as u64;
    (before.to_string(), after.to_string(), frames)
}

/// What Asterisk answers to CoreShowChannels at the cut: the customer bridged with 101.
fn channels_at_the_cut() -> String {
    let bridge = "349a56bd-5392-41e6-abbc-8bf6315b03b2";
    let mut out = String::from(
        "Response: Success\r\nActionID: {id}\r\nEventList: start\r\nMessage: Channels will follow\r\n\r\n",
    );
    for (name, uid, b) in [
        (
            "Local/+4930111000@from-trunk-0000000a;1",
            "1795264488.20",
            "",
        ),
        (
            "Local/+4930111000@from-trunk-0000000a;2",
            "1795264488.21",
            bridge,
        ),
        ("Local/101@sim-phones-0000000b;1", "1795264488.22", bridge),
        ("Local/101@sim-phones-0000000b;2", "1795264488.23", ""),
    ] {
        out.push_str(&format!(
            "Event: CoreShowChannel\r\nActionID: {{id}}\r\nChannel: {name}\r\nChannelState: 6\r\n\
             ChannelStateDesc: Up\r\nUniqueid: {uid}\r\nLinkedid: 1795264488.20\r\n\
             Duration: 00:00:03\r\nBridgeId: {b}\r\n\r\n"
        ));
    }
    out.push_str("Event: CoreShowChannelsComplete\r\nActionID: {id}\r\nEventList: Complete\r\nListItems: 4\r\n\r\n");
    out
}

#[tokio::test]
async fn an_ami_call_answered_before_a_kill_is_recorded_answered_once() {
    let dir = tempfile::tempdir().unwrap();
    let crm = FakeCrm::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    let env = lab_env(dir.path(), &crm, &ami);
    let (before, after, frames) = capture_03_cut();

    let (mut first, base) = serve(dir.path(), &env).await;
    ami.wait_for_actions("CoreShowChannels", 1).await;
    ami.send(before.as_bytes());
    journaled(&base, frames).await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();

    ami.set_reply(
        "CoreShowChannels",
        crate::support::fake_ami::Reply::Raw(channels_at_the_cut()),
    );
    let (_second, _) = serve(dir.path(), &env).await;
    ami.wait_for_actions("CoreShowChannels", 2).await;
    ami.send(after.as_bytes());
    let call = in_crm(&crm, "lab-1795264488.20").await;
    assert_eq!(
        (&call["type"], &call["code"], &call["result"]),
        (
            &Value::from("in"),
            &Value::from("101"),
            &Value::from("answered")
        ),
        "{call}"
    );
    assert_eq!(call["phone"], "+491701234567");
    assert_eq!(crm.upload_counts()["lab-1795264488.20"], 1);
}

/// Rows of the lab's CDR file whose line holds any of `needles`.
fn cdr_rows(needles: &[&str]) -> Vec<String> {
    let all = std::fs::read_to_string(format!(
        "{}/../shared/ami-captures/cdr/Master.csv",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    all.lines()
        .filter(|l| needles.iter().any(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

fn cdr_time(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .unwrap()
        .strftime("%Y-%m-%d %H:%M:%S")
        .to_string()
}

#[tokio::test]
async fn calls_that_ended_while_the_service_was_down_come_from_the_cdr_once_with_true_times() {
    let dir = tempfile::tempdir().unwrap();
    let crm = FakeCrm::start().await;
    let ami = FakeAmi::start("pbxgate", "s").await;
    let cdr = dir.path().join("Master.csv");
    let mut env = lab_env(dir.path(), &crm, &ami);
    env.push(("PBXGATE__BACKFILL__CDR_CSV", cdr.display().to_string()));
    let (before, _after, frames) = capture_03_cut();

    let (mut first, base) = serve(dir.path(), &env).await;
    ami.wait_for_actions("CoreShowChannels", 1).await;
    ami.send(before.as_bytes());
    journaled(&base, frames).await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();

    // While it is down: call 03 ends (its CDR rows are written), and a whole missed call comes
    // and goes.
    let now = pbxgate::base::clock::now_ms();
    let mut rows = cdr_rows(&["1795264488.2"]);
    rows.extend(cdr_rows(&["1795264721.70"]).into_iter().map(|l| {
        l.replace("2026-11-21 12:38:41", &cdr_time(now + 1_000))
            .replace("2026-11-21 12:38:49", &cdr_time(now + 9_000))
            .replace("1795264721.70", "1795999999.70")
    }));
    std::fs::write(&cdr, rows.join("\n") + "\n").unwrap();

    // Asterisk has no channel left (the fake's default answer).
    let (_second, _) = serve(dir.path(), &env).await;
    let answered = in_crm(&crm, "lab-1795264488.20").await;
    assert_eq!(
        (&answered["code"], &answered["result"]),
        (&Value::from("101"), &Value::from("answered")),
        "{answered}"
    );
    // The truth: 2.0 s waiting, 15.5 s talking (the CDR has whole seconds).
    let talk = answered["duration"].as_i64().unwrap();
    let wait = answered["durationWaiting"].as_i64().unwrap();
    assert!((14..=17).contains(&talk), "{answered}");
    assert!((1..=3).contains(&wait), "{answered}");
    let missed = in_crm(&crm, "lab-1795999999.70").await;
    assert_eq!(
        (&missed["type"], &missed["code"], &missed["result"]),
        (
            &Value::from("in"),
            &Value::from("101"),
            &Value::from("no answer")
        ),
        "{missed}"
    );
    assert_eq!(missed["durationWaiting"], 8);
    let counts = crm.upload_counts();
    assert_eq!(
        (counts["lab-1795264488.20"], counts["lab-1795999999.70"]),
        (1, 1)
    );
}

/// Waits until the service has handled its first `n` AMI events.
async fn handled(base: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let ready: Value = reqwest::get(format!("{base}/ready"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ready["calls"]["amiEvents"].as_u64() >= Some(n) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events not handled: {}",
            ready["calls"]
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `pbxgate outbox list --state pending`'s lines.
async fn pending(dir: &std::path::Path, env: &[(&str, String)]) -> Vec<String> {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pbxgate"));
    cmd.args(["outbox", "list", "--state", "pending"])
        .current_dir(dir)
        .env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn a_call_that_hung_up_just_before_sigterm_is_stored_and_uploaded_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let crm = FakeCrm::start().await;
    // Nothing can be uploaded before the restart: the call must be in the queue.
    crm.start_outage_on(
        "/api/v5/telephony/calls/upload",
        crate::support::fake_crm::Fault::Status(500),
    );
    let ami = FakeAmi::start("pbxgate", "s").await;
    let env = lab_env(dir.path(), &crm, &ami);
    let body = crate::support::capture_body("03_inbound_from_trunk");
    let frames = String::from_utf8_lossy(&body).matches("Event: ").count() as u64;

    let (mut first, base) = serve(dir.path(), &env).await;
    ami.wait_for_actions("CoreShowChannels", 1).await;
    // The whole call, its hangups last; SIGTERM as soon as pbxgate has read them (well within
    // the grace a hung-up call waits for late events).
    ami.send(&body);
    handled(&base, frames).await;
    let pid = first.id().unwrap();
    std::process::Command::new("kill")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), first.wait())
        .await
        .expect("pbxgate stops")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");

    let queued = pending(dir.path(), &env).await;
    assert!(
        queued.len() == 1 && queued[0].starts_with("lab-1795264488.20\tIn\t"),
        "{queued:?}"
    );

    crm.end_outage();
    let (_second, _) = serve(dir.path(), &env).await;
    let call = in_crm(&crm, "lab-1795264488.20").await;
    assert_eq!(
        (&call["type"], &call["code"], &call["result"]),
        (
            &Value::from("in"),
            &Value::from("101"),
            &Value::from("answered")
        ),
        "{call}"
    );
    assert_eq!(crm.upload_counts()["lab-1795264488.20"], 1);
}
