//! Hook round trips: a command hook (a real child process per call) and an HTTP hook (a
//! keep-alive server on loopback in this process), `process_call_params`-shaped input with a
//! `call_full`, one call at a time, then calls per second through the command hook with 8
//! calls in flight; then the history end to end: DRAIN (default 5,000) queued calls through
//! the outbox, `process_call_params` and the retailCRM adapter to the fake CRM (which enforces
//! the 40 rps telephony limit: 2,000 calls/s at most), without and with the command hook.
//! Prints p50/p90/p99/max and calls/s. Run with `scripts/bench-hooks.sh`.
//! Goals: command hook p99 ≤ 5 ms, HTTP hook p99 ≤ 1 ms.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pbxgate::config::{HookConfig, HooksConfig};
use pbxgate::hooks::{FieldKind, HookResult, Hooks};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const FIELDS: &[(&str, FieldKind)] = &[("phone", FieldKind::String)];
const ANSWER: &str = r#"{"state":"success","data":{"phone":"+70000000001"}}"#;

fn input() -> Value {
    json!({
        "call_stage": "call_ended",
        "direction": "in", "phone": "+79991234567", "code": "101", "user_id": 7,
        "result": "answered", "duration": 63, "duration_waiting": 5,
        "record_url": null, "external_phone": "+74950000000",
        "call_full": {
            "channel": {"id": "1795264721.70", "name": "PJSIP/trunk-00000012", "type": "incoming",
                "start_time": "2026-12-01 10:00:00", "answer_time": "2026-12-01 10:00:05",
                "end_time": "2026-12-01 10:01:08", "was_answered": true},
            "conversations": {"1795264721.71": {"is_parked": false, "user": {"code": "101"}}},
            "result": 200
        }
    })
}

fn hooks(hook: HookConfig) -> Hooks {
    let mut config = HooksConfig::default();
    config.0.insert("process_call_params".into(), hook);
    Hooks::new(&config, reqwest::Client::new())
}

/// An HTTP/1.1 server answering every request on a connection with the same hook answer.
async fn http_hook() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            sock.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end().to_ascii_lowercase();
                        if l.is_empty() {
                            break;
                        }
                        if let Some(v) = l.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{ANSWER}",
                        ANSWER.len()
                    );
                    if w.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}/process_call_params")
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what}: {} calls; p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        times.len(),
        ms(at(0.50)),
        ms(at(0.90)),
        ms(at(0.99)),
        ms(*times.last().unwrap())
    );
}

async fn round_trips(hooks: &Hooks, n: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let r = hooks.call("process_call_params", input(), FIELDS).await;
        times.push(started.elapsed());
        assert!(
            matches!(r, HookResult::Changed(ref d) if d.len() == 1),
            "{r:?}"
        );
    }
    times
}

/// Drains `n` queued calls through the outbox to the fake CRM; calls/s.
async fn history(n: usize, hook: Option<HookConfig>) -> f64 {
    let crm = support::fake_crm::FakeCrm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::test_config(&crm.url, &dir);
    if let Some(h) = hook {
        config.hooks.0.insert("process_call_params".into(), h);
    }
    let config = Arc::new(config);
    let hooks = Hooks::new(&config.hooks, reqwest::Client::new());
    let store = pbxgate::store::Store::open(&dir.path().join("db")).unwrap();
    let port = pbxgate::crm::connect(
        config.clone(),
        pbxgate::base::secret::Secret::new(""),
        None,
        hooks.clone(),
    )
    .unwrap();
    let outbox = pbxgate::outbox::Outbox::with_records(
        pbxgate::outbox::store::OutboxStore::of(&store).unwrap(),
        store,
        port,
        config,
        None,
        hooks,
        pbxgate::pipeline::registration_points::Verdicts::default(),
    );
    for i in 0..n {
        let mut r = support::call_record(&format!("hook-{i:06}"), support::T0 + i as i64);
        r.linkedid = format!("1795264400.{i}");
        outbox.store().insert(r).unwrap();
    }
    outbox.store().flush().await.unwrap();
    let started = Instant::now();
    assert_eq!(outbox.drain().await, pbxgate::outbox::Drain::Done);
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(crm.uploaded_ids().len(), n);
    n as f64 / secs
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("CALLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let dir = std::env::temp_dir().join(format!("pbxgate-bench-hooks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The smallest real hook: reads its input, answers. A compiled program would be faster;
    // `sh` is what every machine has.
    let script = dir.join("hook.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\nread -r input\necho '{ANSWER}'\n"),
    )
    .unwrap();
    let timeout = Duration::from_secs(2);
    println!(
        "hook round trips, one at a time, {n} calls each; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let command = hooks(HookConfig {
        command: vec!["/bin/sh".into(), script.display().to_string()],
        url: String::new(),
        timeout,
    });
    round_trips(&command, 50).await; // warm-up
    report(
        "command hook (/bin/sh, a process per call)",
        round_trips(&command, n).await,
    );

    let http = hooks(HookConfig {
        command: Vec::new(),
        url: http_hook().await,
        timeout,
    });
    round_trips(&http, 200).await;
    report(
        "HTTP hook (keep-alive, loopback)",
        round_trips(&http, n).await,
    );

    // Throughput through the command hook, 8 calls in flight.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let h = command.clone();
        let per = n / 8;
        tasks.spawn(async move { round_trips(&h, per).await.len() });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        done += r.unwrap();
    }
    println!(
        "command hook, 8 in flight: {done} calls in {:.2} s = {:.0} calls/s",
        started.elapsed().as_secs_f64(),
        done as f64 / started.elapsed().as_secs_f64()
    );
    let stats = command.stats();
    println!("counts: {stats:?}");

    let drain: usize = std::env::var("DRAIN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    let bare = history(drain, None).await;
    let hooked = history(
        drain,
        Some(HookConfig {
            command: vec!["/bin/sh".into(), script.display().to_string()],
            url: String::new(),
            timeout,
        }),
    )
    .await;
    println!(
        "history end to end, {drain} calls to the fake CRM: {bare:.0} calls/s without a hook, \
         {hooked:.0} calls/s through a process_call_params command hook"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
