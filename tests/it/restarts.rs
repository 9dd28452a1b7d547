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
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(c) = crm.calls().get(id) {
            return c.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never reached the CRM"
        );
        let seen = crm.requests_to("/api/v5/telephony/calls/upload").len();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            crm.wait_for_requests("/api/v5/telephony/calls/upload", seen + 1),
        )
        .await;
    }
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
