//! `pbxgate demo` as a newcomer runs it: the binary in a child process, on a free port. Calls
//! from the simulated Asterisk reach the sandbox CRM within 15 s, a click-to-call becomes an
//! outbound call there, the sandbox checks the API key, and the temporary store is removed at
//! exit.
//!
//! The demo runs in another process: its sandbox is polled (every 200 ms, bounded).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub(crate) struct Demo {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub(crate) base: String,
    make_call: String,
    store: PathBuf,
    started: Instant,
}

/// Starts the demo on a free port and reads what it prints.
pub(crate) async fn start() -> Demo {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pbxgate"))
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("pbxgate demo starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut base, mut make_call, mut store) = (None, None, None);
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let value = |prefix: &str| {
                line.trim()
                    .strip_prefix(prefix)
                    .map(|v| v.trim().to_string())
            };
            if let Some(url) = value("dashboard:") {
                base = Some(url.trim_end_matches('/').to_string());
            } else if let Some(curl) = value("click-to-call:") {
                make_call = Some(
                    curl.trim_start_matches("curl ")
                        .trim_matches('\'')
                        .to_string(),
                );
            } else if let Some(dir) = value("store:") {
                store = Some(PathBuf::from(dir.split(' ').next().unwrap()));
            }
            if base.is_some() && make_call.is_some() && store.is_some() {
                return;
            }
        }
        panic!("the demo ended before printing its addresses");
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the demo prints its addresses");
    Demo {
        child,
        base: base.unwrap(),
        make_call: make_call.unwrap(),
        store: store.unwrap(),
        started,
    }
}

impl Demo {
    async fn received(&self) -> Value {
        reqwest::get(format!("{}/sandbox/received", self.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls the sandbox until a call it received satisfies `cond`, until `deadline` after
    /// the demo started.
    async fn wait_for_call(&self, deadline: Duration, cond: impl Fn(&Value) -> bool) -> Value {
        loop {
            let received = self.received().await;
            if let Some(call) = received["calls"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| cond(c))
            {
                return call.clone();
            }
            assert!(
                self.started.elapsed() < deadline,
                "no such call reached the sandbox CRM within {deadline:?}; it received: {received}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test]
async fn the_demo_brings_calls_and_a_click_to_call_to_its_sandbox_crm_and_cleans_up() {
    let mut demo = start().await;
    assert!(demo.store.is_dir(), "{}", demo.store.display());

    // The dashboard is served.
    let page = reqwest::get(format!("{}/", demo.base)).await.unwrap();
    assert_eq!(page.status(), 200);

    // A replayed call reaches the CRM, with the demo's extension and a customer number.
    let call = demo
        .wait_for_call(Duration::from_secs(15), |c| {
            c["externalId"]
                .as_str()
                .is_some_and(|id| id.starts_with("pbx-"))
        })
        .await;
    assert_eq!(call["type"], "in", "{call}");
    assert!(
        call["phone"].as_str().unwrap().starts_with("+49170"),
        "{call}"
    );
    assert!(call["code"].is_string(), "{call}");
    let received = demo.received().await;
    assert!(
        received["events"].as_array().unwrap().len() >= 2,
        "pop-ups and hangups: {received}"
    );
    assert_eq!(
        received["module"]["code"], "pbxgate",
        "registered: {received}"
    );
    assert_eq!(received["module"]["clientId"], "***");

    // Click-to-call through the makeCall callback the CRM would call, for another number.
    let url = demo.make_call.replace("%2B4930555123", "%2B4930777888");
    let answer: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(answer["success"], true, "{answer}");
    let call_id = answer["callId"].as_str().unwrap().to_string();
    let clicked = demo
        .wait_for_call(demo.started.elapsed() + Duration::from_secs(20), |c| {
            c["externalId"]
                .as_str()
                .is_some_and(|id| id.ends_with(&call_id))
        })
        .await;
    assert_eq!(
        (
            &clicked["type"],
            &clicked["phone"],
            &clicked["result"],
            &clicked["userId"]
        ),
        (
            &Value::from("out"),
            &Value::from("+4930777888"),
            &Value::from("answered"),
            &Value::from(1)
        ),
        "{clicked}"
    );
    assert!(clicked["recordUrl"].is_string(), "{clicked}");
    let recording = reqwest::get(clicked["recordUrl"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(recording.status(), 200);
    assert!(recording.bytes().await.unwrap().len() > 1000);

    // The sandbox answers like retailCRM: a wrong key is refused.
    let refused = reqwest::Client::new()
        .post(format!(
            "{}/sandbox/crm/api/v5/telephony/calls/upload",
            demo.base
        ))
        .header("X-API-KEY", "not-the-demo-key")
        .form(&[("calls", "[]")])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);

    // SIGTERM stops it in order and removes the temporary store.
    let pid = demo.child.id().unwrap() as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(20), demo.child.wait())
        .await
        .expect("the demo stops")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(!demo.store.exists(), "{} is left", demo.store.display());
}
