//! The hook runner against real child processes and a real HTTP hook on loopback: what a hook
//! answers is used only when it keeps the contract; every other answer is the default, counted.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pbxgate::config::{HookConfig, HooksConfig};
use pbxgate::hooks::{FieldKind, HookCounts, HookFailure, HookResult, Hooks};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Which failure a case expects.
type Expect = fn(&HookFailure) -> bool;

const PHONE: &[(&str, FieldKind)] = &[("phone", FieldKind::String)];

fn command(argv: &[&str], timeout: Duration) -> HookConfig {
    HookConfig {
        command: argv.iter().map(|s| s.to_string()).collect(),
        url: String::new(),
        timeout,
    }
}

fn url(url: &str, timeout: Duration) -> HookConfig {
    HookConfig {
        command: Vec::new(),
        url: url.to_string(),
        timeout,
    }
}

fn hooks(points: Vec<(&str, HookConfig)>) -> Hooks {
    let config = HooksConfig(
        points
            .into_iter()
            .map(|(p, h)| (p.to_string(), h))
            .collect(),
    );
    Hooks::new(&config, reqwest::Client::new())
}

/// A `sh` script in `dir`, as a hook's argv.
fn script(dir: &Path, name: &str, body: &str) -> Vec<String> {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    vec!["sh".into(), path.to_string_lossy().into_owned()]
}

fn sh_hook(dir: &Path, body: &str, timeout: Duration) -> HookConfig {
    HookConfig {
        command: script(dir, "hook.sh", body),
        url: String::new(),
        timeout,
    }
}

fn input() -> Value {
    json!({
        "call_stage": "call_ended",
        "call_full": {"channel": {"id": "1700000000.1", "type": "incoming", "was_answered": false}},
        "phone": "79001234567",
    })
}

fn counts(hooks: &Hooks, point: &str) -> HookCounts {
    hooks.stats()[point]
}

/// One hook at `process_client_phone` running `body`: what its call gives, and the counts.
async fn run_sh(body: &str) -> (HookResult, HookCounts) {
    let dir = tempfile::tempdir().unwrap();
    let h = hooks(vec![(
        "process_client_phone",
        sh_hook(dir.path(), body, Duration::from_secs(10)),
    )]);
    let result = h.call("process_client_phone", input(), PHONE).await;
    (result, counts(&h, "process_client_phone"))
}

fn failed_once() -> HookCounts {
    HookCounts {
        failed: 1,
        ..HookCounts::default()
    }
}

#[tokio::test]
async fn a_changed_field_is_returned_and_the_input_reaches_the_hook_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("stdin.json");
    let body = format!(
        "cat > '{}'\nprintf '%s' '{{\"state\": \"success\", \"data\": {{\"phone\": \"+79001234567\"}}}}'\n",
        seen.display()
    );
    let h = hooks(vec![(
        "process_client_phone",
        sh_hook(dir.path(), &body, Duration::from_secs(10)),
    )]);
    let result = h.call("process_client_phone", input(), PHONE).await;
    let HookResult::Changed(data) = result else {
        panic!("{result:?}");
    };
    assert_eq!(data.len(), 1);
    assert_eq!(data["phone"], "+79001234567");

    let written = std::fs::read(&seen).unwrap();
    let mut expected = input();
    expected["point"] = json!("process_client_phone");
    let mut line = serde_json::to_vec(&expected).unwrap();
    line.push(b'\n');
    assert_eq!(
        String::from_utf8_lossy(&written),
        String::from_utf8_lossy(&line)
    );
    assert_eq!(
        counts(&h, "process_client_phone"),
        HookCounts {
            changed: 1,
            ..HookCounts::default()
        }
    );
}

#[tokio::test]
async fn a_python_hook_reads_its_input_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hook.py");
    std::fs::write(
        &path,
        "import json, sys\nd = json.load(sys.stdin)\nprint(json.dumps({'state': 'success', 'data': {'phone': d['point'] + ':' + d['phone']}}))\n",
    )
    .unwrap();
    let h = hooks(vec![(
        "process_client_phone",
        command(
            &["python3", &path.to_string_lossy()],
            Duration::from_secs(30),
        ),
    )]);
    let result = h.call("process_client_phone", input(), PHONE).await;
    let HookResult::Changed(data) = result else {
        panic!("{result:?}");
    };
    assert_eq!(data["phone"], "process_client_phone:79001234567");
}

#[tokio::test]
async fn success_with_nothing_changed_is_counted_unchanged() {
    let (result, counts) =
        run_sh("cat >/dev/null\necho '{\"state\":\"success\",\"data\":{}}'\n").await;
    assert_eq!(result, HookResult::Changed(Default::default()));
    assert_eq!(
        counts,
        HookCounts {
            unchanged: 1,
            ..HookCounts::default()
        }
    );
    let (result, _) = run_sh("echo '{\"state\":\"success\"}'\n").await;
    assert_eq!(result, HookResult::Changed(Default::default()));
}

#[tokio::test]
async fn an_unconfigured_point_costs_nothing() {
    let h = hooks(vec![]);
    assert!(!h.is_configured("need_registration"));
    let result = h
        .call("need_registration", input(), &[("result", FieldKind::Bool)])
        .await;
    assert_eq!(result, HookResult::NotConfigured);
    assert!(h.stats().is_empty());
}

/// Whether `pid` has exited (gone, or a zombie waiting for its new parent to reap it).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn the_timeout_kills_the_hook_and_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("grandchild.pid");
    let ready = dir.path().join("ready");
    let body = format!(
        "sleep 30 &\necho $! > '{}'\ntouch '{}'\nwait\n",
        pid_file.display(),
        ready.display()
    );
    let timeout = Duration::from_secs(2);
    let h = hooks(vec![(
        "process_client_phone",
        sh_hook(dir.path(), &body, timeout),
    )]);
    let started = Instant::now();
    let result = h.call("process_client_phone", input(), PHONE).await;
    assert_eq!(result, HookResult::Default(HookFailure::Timeout(timeout)));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(ready.exists(), "the hook never got to start its child");
    let grandchild: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SIGKILL is delivered asynchronously: wait (bounded) for the kernel to finish it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exited(grandchild) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(exited(grandchild), "grandchild {grandchild} still runs");
    assert_eq!(
        counts(&h, "process_client_phone"),
        HookCounts {
            timeout: 1,
            ..HookCounts::default()
        }
    );
}

#[tokio::test]
async fn a_crash_is_reported_with_the_head_of_stderr_on_one_line() {
    let (result, counts) =
        run_sh("echo 'boom: no such customer' >&2\necho 'second line' >&2\nexit 3\n").await;
    let HookResult::Default(HookFailure::Exit { status, stderr }) = result else {
        panic!("{result:?}");
    };
    assert!(status.contains('3'), "{status}");
    assert_eq!(stderr, "boom: no such customer second line");
    assert_eq!(counts, failed_once());

    let (result, _) = run_sh("head -c 5000 /dev/zero | tr '\\0' x >&2\nexit 1\n").await;
    let HookResult::Default(HookFailure::Exit { stderr, .. }) = result else {
        panic!("{result:?}");
    };
    assert_eq!(stderr, "x".repeat(200));
}

#[tokio::test]
async fn garbage_a_wrong_type_an_unknown_field_and_a_failed_state_fall_back() {
    let cases: [(&str, Expect); 5] = [
        ("echo 'this is not json'", |f| {
            matches!(f, HookFailure::NotJson(_))
        }),
        ("true", |f| matches!(f, HookFailure::NotJson(_))),
        (
            "echo '{\"state\":\"success\",\"data\":{\"phone\":79001234567}}'",
            |f| matches!(f, HookFailure::WrongType { field, .. } if field == "phone"),
        ),
        (
            "echo '{\"state\":\"success\",\"data\":{\"phone\":\"1\",\"user_id\":3}}'",
            |f| matches!(f, HookFailure::UnknownField(field) if field == "user_id"),
        ),
        (
            "echo '{\"state\":\"error\",\"data\":{\"phone\":\"1\"}}'",
            |f| matches!(f, HookFailure::State(_)),
        ),
    ];
    for (body, expected) in cases {
        let (result, counts) = run_sh(body).await;
        match &result {
            HookResult::Default(f) => assert!(expected(f), "{body}: {f:?}"),
            other => panic!("{body}: {other:?}"),
        }
        assert_eq!(counts, failed_once(), "{body}");
    }
}

#[tokio::test]
async fn too_much_output_and_a_missing_program_fall_back() {
    let (result, counts) = run_sh("head -c 2000000 /dev/zero | tr '\\0' x\n").await;
    assert_eq!(result, HookResult::Default(HookFailure::TooLarge));
    assert_eq!(counts, failed_once());

    let h = hooks(vec![(
        "process_client_phone",
        command(&["/nonexistent/pbxgate-hook"], Duration::from_secs(5)),
    )]);
    let result = h.call("process_client_phone", input(), PHONE).await;
    assert!(
        matches!(&result, HookResult::Default(HookFailure::Spawn { program, .. }) if program == "/nonexistent/pbxgate-hook"),
        "{result:?}"
    );
    assert_eq!(counts_of(&h), failed_once());
}

fn counts_of(h: &Hooks) -> HookCounts {
    counts(h, "process_client_phone")
}

#[tokio::test]
async fn large_input_and_large_stderr_do_not_deadlock() {
    // The hook fills stderr before it reads a large input: both pipes must be served at once.
    let mut big = input();
    big["call_full"]["padding"] = json!("p".repeat(900_000));
    let dir = tempfile::tempdir().unwrap();
    let body = "head -c 300000 /dev/zero >&2\ncat >/dev/null\necho '{\"state\":\"success\",\"data\":{\"phone\":\"ok\"}}'\n";
    let h = hooks(vec![(
        "process_client_phone",
        sh_hook(dir.path(), body, Duration::from_secs(20)),
    )]);
    let result = h.call("process_client_phone", big.clone(), PHONE).await;
    let HookResult::Changed(data) = result else {
        panic!("{result:?}");
    };
    assert_eq!(data["phone"], "ok");

    // A hook that answers without reading its input is judged by its answer.
    let body = "echo '{\"state\":\"success\",\"data\":{\"phone\":\"unread\"}}'\n";
    let h = hooks(vec![(
        "process_client_phone",
        sh_hook(dir.path(), body, Duration::from_secs(20)),
    )]);
    let result = h.call("process_client_phone", big, PHONE).await;
    let HookResult::Changed(data) = result else {
        panic!("{result:?}");
    };
    assert_eq!(data["phone"], "unread");
}

/// On a single-threaded runtime: a hook that hangs holds back neither the runtime nor a hook at
/// another point.
#[tokio::test(flavor = "current_thread")]
async fn a_slow_hook_does_not_delay_another_hooks_call() {
    let dir = tempfile::tempdir().unwrap();
    let slow_timeout = Duration::from_secs(5);
    let h = hooks(vec![
        ("need_registration", command(&["sleep", "30"], slow_timeout)),
        (
            "process_client_phone",
            sh_hook(
                dir.path(),
                "echo '{\"state\":\"success\",\"data\":{\"phone\":\"fast\"}}'",
                Duration::from_secs(5),
            ),
        ),
    ]);
    let slow = tokio::spawn({
        let h = h.clone();
        async move {
            h.call("need_registration", input(), &[("result", FieldKind::Bool)])
                .await
        }
    });
    let fast = h.call("process_client_phone", input(), PHONE).await;
    assert!(
        matches!(&fast, HookResult::Changed(d) if d["phone"] == "fast"),
        "{fast:?}"
    );
    assert!(
        !slow.is_finished(),
        "the slow hook ended before the fast one"
    );
    assert_eq!(
        slow.await.unwrap(),
        HookResult::Default(HookFailure::Timeout(slow_timeout))
    );
    let stats = h.stats();
    assert_eq!(stats["need_registration"].timeout, 1);
    assert_eq!(stats["process_client_phone"].changed, 1);
}

/// What the local HTTP hook saw of one request.
struct Seen {
    head: String,
    body: Vec<u8>,
}

/// How the local HTTP hook answers: `None` holds the connection open without answering.
type Answer = Arc<dyn Fn() -> Option<(u16, String)> + Send + Sync>;

/// A hand-written HTTP/1.1 hook on 127.0.0.1: each request is reported on the channel, and
/// `dropped` gets a message when a client closes a connection that was never answered.
async fn http_hook(
    answer: Answer,
) -> (
    String,
    mpsc::UnboundedReceiver<Seen>,
    mpsc::UnboundedReceiver<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let (dropped_tx, dropped_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (answer, seen_tx, dropped_tx) =
                (answer.clone(), seen_tx.clone(), dropped_tx.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                while buf.len() < end + length {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = buf[end..end + length].to_vec();
                let _ = seen_tx.send(Seen { head, body });
                match answer() {
                    Some((status, text)) => {
                        let reply = format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                            text.len()
                        );
                        let _ = conn.write_all(reply.as_bytes()).await;
                        let _ = conn.shutdown().await;
                    }
                    None => {
                        // Wait for the client to give up: a read of 0 bytes (or an error).
                        while let Ok(n) = conn.read(&mut chunk).await {
                            if n == 0 {
                                break;
                            }
                        }
                        let _ = dropped_tx.send(());
                    }
                }
            });
        }
    });
    (format!("http://{addr}/hook"), seen_rx, dropped_rx)
}

fn answer(status: u16, body: &str) -> Answer {
    let body = body.to_string();
    Arc::new(move || Some((status, body.clone())))
}

#[tokio::test]
async fn an_http_hook_gets_the_input_as_a_json_post_and_its_answer_is_used() {
    let (address, mut seen, _) = http_hook(answer(
        200,
        r#"{"state":"success","data":{"phone":"+7 900"}}"#,
    ))
    .await;
    let h = hooks(vec![(
        "process_call_params",
        url(&address, Duration::from_secs(10)),
    )]);
    let result = h.call("process_call_params", input(), PHONE).await;
    let HookResult::Changed(data) = result else {
        panic!("{result:?}");
    };
    assert_eq!(data["phone"], "+7 900");
    let request = seen.recv().await.unwrap();
    assert!(
        request.head.starts_with("POST /hook HTTP/1.1\r\n"),
        "{}",
        request.head
    );
    assert!(
        request
            .head
            .to_ascii_lowercase()
            .contains("\r\ncontent-type: application/json\r\n"),
        "{}",
        request.head
    );
    let mut expected = input();
    expected["point"] = json!("process_call_params");
    assert_eq!(
        serde_json::from_slice::<Value>(&request.body).unwrap(),
        expected
    );
    assert_eq!(counts(&h, "process_call_params").changed, 1);
}

#[tokio::test]
async fn an_http_hook_failing_falls_back_and_is_counted() {
    let cases: [(u16, &str, Expect); 4] = [
        (500, r#"{"state":"success","data":{"phone":"1"}}"#, |f| {
            *f == HookFailure::Status(500)
        }),
        (200, "<html>oops</html>", |f| {
            matches!(f, HookFailure::NotJson(_))
        }),
        (200, r#"{"state":"success","data":{"phone":true}}"#, |f| {
            matches!(f, HookFailure::WrongType { .. })
        }),
        (200, r#"{"state":"failure"}"#, |f| {
            matches!(f, HookFailure::State(_))
        }),
    ];
    for (status, body, expected) in cases {
        let (address, _seen, _) = http_hook(answer(status, body)).await;
        let h = hooks(vec![(
            "process_call_params",
            url(&address, Duration::from_secs(10)),
        )]);
        match h.call("process_call_params", input(), PHONE).await {
            HookResult::Default(f) => assert!(expected(&f), "{status} {body}: {f:?}"),
            other => panic!("{status} {body}: {other:?}"),
        }
        assert_eq!(counts(&h, "process_call_params").failed, 1);
    }

    // Nobody listening.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let h = hooks(vec![(
        "process_call_params",
        url(
            &format!("http://127.0.0.1:{port}/hook"),
            Duration::from_secs(10),
        ),
    )]);
    let result = h.call("process_call_params", input(), PHONE).await;
    assert!(
        matches!(result, HookResult::Default(HookFailure::Request(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn an_http_hook_past_its_timeout_is_dropped() {
    let (address, mut seen, mut dropped) = http_hook(Arc::new(|| None)).await;
    let timeout = Duration::from_millis(300);
    let h = hooks(vec![("process_call_params", url(&address, timeout))]);
    let result = h.call("process_call_params", input(), PHONE).await;
    assert_eq!(result, HookResult::Default(HookFailure::Timeout(timeout)));
    assert!(seen.recv().await.is_some());
    tokio::time::timeout(Duration::from_secs(10), dropped.recv())
        .await
        .expect("the request was not dropped")
        .unwrap();
    assert_eq!(counts(&h, "process_call_params").timeout, 1);
}
