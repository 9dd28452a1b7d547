//! `process_record_file_path` end to end: a real python3 hook names the file a call's recording
//! link serves; what is served over HTTP is that file, or the one found when the answer escapes
//! `records.dir` or the hook fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pbxgate::calls::CallRecord;
use pbxgate::config::HookConfig;
use pbxgate::outbox::Drain;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::support::{call_record, TestApp, T0};

const POINT: &str = "process_record_file_path";

/// The hook: answers `answers.json`'s entry for the call (`"FAIL"`: exits 1; missing: changes
/// nothing) and keeps each input it was given in `inputs/<external_id>.json`.
const HOOK: &str = r#"
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
call = json.load(sys.stdin)
os.makedirs(os.path.join(here, "inputs"), exist_ok=True)
with open(os.path.join(here, "inputs", call["external_id"] + ".json"), "w") as f:
    json.dump(call, f)
answers = json.load(open(os.path.join(here, "answers.json")))
answer = answers.get(call["external_id"])
if answer == "FAIL":
    sys.stderr.write("cannot decide")
    sys.exit(1)
data = {} if answer is None else {"path": answer}
print(json.dumps({"state": "success", "data": data}))
"#;

struct Lab {
    app: TestApp,
    /// The canonical `records.dir`.
    dir: PathBuf,
    /// Where the hook lives, outside `records.dir`.
    hook_dir: PathBuf,
    _tmp: TempDir,
}

async fn lab() -> Lab {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("monitor");
    std::fs::create_dir(&dir).unwrap();
    let dir = std::fs::canonicalize(dir).unwrap();
    let hook_dir = std::fs::canonicalize(tmp.path()).unwrap().join("hook");
    std::fs::create_dir(&hook_dir).unwrap();
    std::fs::write(hook_dir.join("hook.py"), HOOK).unwrap();
    std::fs::write(hook_dir.join("answers.json"), "{}").unwrap();
    let (records_dir, script) = (dir.clone(), hook_dir.join("hook.py"));
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.crm.max_retries = 0;
        c.history.immediate = false;
        c.history.interval = Duration::from_secs(3600);
        c.history.record_settle = Duration::ZERO;
        c.records.dir = records_dir;
        c.hooks.0.insert(
            POINT.into(),
            HookConfig {
                command: vec!["python3".into(), script.display().to_string()],
                url: String::new(),
                timeout: Duration::from_secs(10),
            },
        );
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), app.state.outbox.wait_changes(1))
        .await
        .expect("startup drain");
    Lab {
        app,
        dir,
        hook_dir,
        _tmp: tmp,
    }
}

/// A PCM WAV of 2,000 bytes whose sound is `fill`: every file of a test differs.
fn wav(fill: u8) -> Vec<u8> {
    let len: u32 = 2000 - 44;
    let mut h = Vec::new();
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&(36 + len).to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&8000u32.to_le_bytes());
    h.extend_from_slice(&16000u32.to_le_bytes());
    h.extend_from_slice(&2u16.to_le_bytes());
    h.extend_from_slice(&16u16.to_le_bytes());
    h.extend_from_slice(b"data");
    h.extend_from_slice(&len.to_le_bytes());
    h.resize(2000, fill);
    h
}

impl Lab {
    fn write(&self, at: &Path, data: &[u8]) -> String {
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::write(at, data).unwrap();
        at.display().to_string()
    }

    fn answer(&self, answers: Value) {
        std::fs::write(self.hook_dir.join("answers.json"), answers.to_string()).unwrap();
    }

    fn input(&self, id: &str) -> Value {
        let text = std::fs::read_to_string(self.hook_dir.join(format!("inputs/{id}.json")))
            .unwrap_or_else(|e| panic!("the hook was not asked about {id}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    /// Queues the calls, drains the outbox: the recordUrl each was uploaded with.
    async fn upload(&self, calls: &[(&str, &str)]) -> Vec<String> {
        let outbox = &self.app.state.outbox;
        for (id, path) in calls {
            let record = CallRecord {
                recordings: vec![path.to_string()],
                ..call_record(id, T0)
            };
            outbox.enqueue(record).await.unwrap();
        }
        assert_eq!(outbox.drain().await, Drain::Done);
        let uploaded = self.app.crm.calls();
        calls
            .iter()
            .map(|(id, _)| {
                uploaded[*id]["recordUrl"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{id} uploaded without recordUrl"))
                    .to_string()
            })
            .collect()
    }

    async fn served(&self, url: &str) -> Vec<u8> {
        let res = self.app.http.get(url).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{url}");
        res.bytes().await.unwrap().to_vec()
    }

    async fn counts(&self) -> Value {
        self.app.ready().await["hooks"][POINT].clone()
    }
}

#[tokio::test]
async fn the_file_the_hook_names_is_the_one_served_and_stays_so() {
    let lab = lab().await;
    let asterisk = lab.write(&lab.dir.join("in-1.wav"), &wav(1));
    let mixed = lab.write(&lab.dir.join("mixed/in-1-stereo.wav"), &wav(2));
    let other = lab.write(&lab.dir.join("in-2.wav"), &wav(3));
    let relative = lab.write(&lab.dir.join("mixed/in-2-stereo.wav"), &wav(4));
    lab.answer(json!({"hr-1": mixed, "hr-2": "mixed/in-2-stereo.wav"}));

    let urls = lab
        .upload(&[("hr-1", asterisk.as_str()), ("hr-2", other.as_str())])
        .await;
    assert_eq!(lab.served(&urls[0]).await, wav(2), "the absolute answer");
    assert_eq!(lab.served(&urls[1]).await, wav(4), "{relative}, relative");

    let input = lab.input("hr-1");
    assert_eq!(input["point"], POINT);
    assert_eq!(input["path"], asterisk.as_str());
    assert_eq!(input["call_stage"], "call_ended");
    assert_eq!(input["external_id"], "hr-1");
    assert_eq!(input["call_full"]["result"], 200, "{input}");
    assert_eq!(lab.counts().await["changed"], 2);

    // The choice is the link's: the hook is not asked again, whatever it would answer now.
    lab.answer(json!({"hr-1": asterisk, "hr-2": "FAIL"}));
    let again = lab
        .app
        .state
        .records
        .ensure_link(
            &CallRecord {
                recordings: vec![asterisk.clone()],
                ..call_record("hr-1", T0)
            },
            &jiff::tz::TimeZone::UTC,
        )
        .await
        .unwrap();
    assert_eq!(again.as_deref(), Some(urls[0].as_str()));
    assert_eq!(lab.served(&urls[0]).await, wav(2));
    assert_eq!(lab.served(&urls[1]).await, wav(4));
    let counts = lab.counts().await;
    assert_eq!(
        (&counts["changed"], &counts["failed"]),
        (&json!(2), &json!(0))
    );

    // The chosen file is still checked at every request: swapped for a symlink out, refused.
    let outside = lab.write(&lab.hook_dir.join("secret.wav"), &wav(9));
    std::fs::remove_file(&mixed).unwrap();
    std::os::unix::fs::symlink(&outside, &mixed).unwrap();
    let res = lab.app.http.get(&urls[0]).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_answer_outside_records_dir_or_a_failing_hook_leaves_the_file_found() {
    let lab = lab().await;
    let outside = lab.write(&lab.hook_dir.join("secret.wav"), &wav(9));
    std::os::unix::fs::symlink(&outside, lab.dir.join("link-out.wav")).unwrap();
    std::fs::create_dir(lab.dir.join("sub")).unwrap();
    let cases: Vec<(&str, Value)> = vec![
        ("esc-1", json!("../../etc/passwd")),
        ("esc-2", json!("/etc/passwd")),
        ("esc-3", json!(outside)),
        ("esc-4", json!("../hook/secret.wav")),
        ("esc-5", json!("link-out.wav")),
        (
            "esc-6",
            json!(lab.dir.join("link-out.wav").display().to_string()),
        ),
        ("esc-7", json!("sub")),
        ("esc-8", json!("missing.wav")),
        ("esc-9", json!("")),
        ("fail-1", json!("FAIL")),
        ("wrong-1", json!(42)),
    ];
    let mut calls = Vec::new();
    for (i, (id, _)) in cases.iter().enumerate() {
        let path = lab.write(&lab.dir.join(format!("{id}.wav")), &wav(i as u8 + 10));
        calls.push((*id, path));
    }
    lab.answer(Value::Object(
        cases
            .iter()
            .map(|(id, answer)| (id.to_string(), answer.clone()))
            .collect(),
    ));
    let pairs: Vec<(&str, &str)> = calls.iter().map(|(id, p)| (*id, p.as_str())).collect();
    let urls = lab.upload(&pairs).await;
    for (i, ((id, answer), url)) in cases.iter().zip(&urls).enumerate() {
        assert_eq!(
            lab.served(url).await,
            wav(i as u8 + 10),
            "{id}: {answer} must leave the file found"
        );
        assert_eq!(lab.input(id)["external_id"], *id);
    }
    // Every hook was asked: nine answered a path (refused), two failed (exit 1, wrong type).
    let counts = lab.counts().await;
    assert_eq!(
        (&counts["changed"], &counts["failed"]),
        (&json!(9), &json!(2)),
        "{counts}"
    );
}
