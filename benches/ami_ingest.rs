//! AMI ingest with every event tracked: a scripted AMI server (real TCP on 127.0.0.1) sends the
//! real captures, copied COPIES times (default 100) with rewritten Uniqueids, Linkedids and
//! bridge ids and interleaved so that all copies' calls are live at once, to `pbxgate serve`
//! (the release binary as its own process; no CRM) and, when `PANORAMISK_PYTHON` and
//! `PANORAMISK_CLIENT` are set (`scripts/bench-peers.sh` sets them), to a panoramisk client that
//! tracks calls by Linkedid (`scripts/panoramisk_ingest.py`). Each run starts its own server and
//! client; the clock runs from the first byte sent until pbxgate's `GET /ready` shows every event
//! handled by the call tracker (nothing waiting), or until the panoramisk client says it has
//! handled every event. pbxgate's calls are then waited for until every one has finished (each
//! is held for the call model's 2 s grace period after its last hangup, not timed). RUNS (default 2) turns each, pbxgate first, taking
//! turns; prints every run, events/s, both processes' RSS and the ratio.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "support/serve.rs"]
mod serve;

use std::time::{Duration, Instant};

use pbxgate::calls::{CallModel, Classifier, Output};
use pbxgate::config::Config;
use pbxgate::pbx::ami::frame::{Item, Limits, Parser};
use serve::{mb, PeakRss, Served};
use support::{captures, FakeAmi};
use tokio::io::{AsyncBufReadExt, BufReader};

const SECRET: &str = "ami-secret";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The config the child gets, as the library sees it: which calls the stream finishes.
fn lab_config() -> Config {
    let mut config = Config::default();
    config.calls.inbound_contexts = vec!["from-trunk".into()];
    config.pbx.system_id = "lab".into();
    config
}

/// How many calls pbxgate's call model finishes on this stream (once their grace period is over).
fn finished_calls(stream: &[u8]) -> u64 {
    let config = lab_config();
    let mut model = CallModel::new(Classifier::new(&config), &config.pbx.system_id);
    let mut parser = Parser::without_banner(Limits::default());
    let mut out = Vec::new();
    for chunk in stream.chunks(64 * 1024) {
        parser.push(chunk);
        while let Some(item) = parser.next_item() {
            if let Item::Frame(f) = item {
                model.on_event(&f, pbxgate::base::clock::now_ms(), &mut out);
            }
        }
    }
    // Those still in their grace period too.
    model.flush(&mut out);
    out.iter()
        .filter(|o| matches!(o, Output::Finished(_)))
        .count() as u64
}

struct Run {
    events_per_s: f64,
    secs: f64,
    rss_before_kb: u64,
    rss_peak_kb: u64,
    detail: String,
}

fn print(name: &str, turn: usize, r: &Run) {
    println!(
        "{name:<10} run {turn}: {:>9.0} events/s ({:.2} s)   RSS {:.1} MB before, {:.1} MB peak   {}",
        r.events_per_s,
        r.secs,
        mb(r.rss_before_kb),
        mb(r.rss_peak_kb),
        r.detail
    );
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

async fn pbxgate_run(stream: &[u8], events: u64, calls: u64) -> Run {
    let ami = FakeAmi::start("pbxgate", SECRET).await;
    let store = tempfile::tempdir().unwrap();
    let mut app = Served::start(
        &store.path().join("store"),
        &[
            ("AMI__HOST", "127.0.0.1".into()),
            ("AMI__PORT", ami.addr.port().to_string()),
            ("AMI__SECRET", SECRET.into()),
            ("PBX__SYSTEM_ID", "lab".into()),
            ("CALLS__INBOUND_CONTEXTS", "[\"from-trunk\"]".into()),
        ],
    );
    app.healthy().await;
    // Logged in and resynced (the CoreShowChannels answer applied): the stream comes after.
    ami.wait_for_actions("CoreShowChannels", 1).await;
    let base = app
        .ready_until(Duration::from_millis(10), Duration::from_secs(30), |r| {
            r["ami"]["connected"] == true
                && n(&r["calls"]["resyncs"]) >= 1
                && n(&r["calls"]["amiBacklog"]) == 0
        })
        .await;
    // Received by the AMI client, handled by the call tracker (which subscribed after the
    // session's first event), finished calls.
    let (events0, tracked0, finished0) = (
        n(&base["ami"]["events"]),
        n(&base["calls"]["amiEvents"]),
        n(&base["calls"]["finished"]),
    );
    let pid = app.pid;
    let rss_before_kb = app.rss_kb();
    let peak = PeakRss::start(move || serve::rss_kb(pid));
    let started = Instant::now();
    ami.send(stream);
    // Done when the tracker has had every event (or dropped some: counted) and nothing waits.
    app.ready_until(Duration::from_millis(10), Duration::from_secs(600), |r| {
        let c = &r["calls"];
        n(&r["ami"]["events"]) >= events0 + events
            && n(&c["amiEvents"]) + n(&c["amiEventsDropped"]) >= tracked0 + events
            && n(&c["amiBacklog"]) == 0
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    // A call whose last channel hung up is held for the grace period (late events), then
    // finished: waited for, not timed.
    let mut settled: Option<(u64, Instant)> = None;
    let last = app
        .ready_until(Duration::from_millis(50), Duration::from_secs(60), |r| {
            let finished = n(&r["calls"]["finished"]);
            if finished >= finished0 + calls {
                return true;
            }
            match settled {
                Some((f, at)) if f == finished => at.elapsed() > Duration::from_secs(5),
                _ => {
                    settled = Some((finished, Instant::now()));
                    false
                }
            }
        })
        .await;
    let finished_after = started.elapsed().as_secs_f64();
    let rss_peak_kb = peak.finish();
    let c = &last["calls"];
    let detail = format!(
        "events tracked {}, calls finished {} ({finished_after:.1} s, grace included), live {}, backlog peak {}, dropped {}, overflows {}",
        n(&c["amiEvents"]) - tracked0,
        n(&c["finished"]) - finished0,
        n(&c["live"]),
        n(&c["amiBacklogPeak"]),
        n(&c["amiEventsDropped"]),
        n(&c["amiBacklogOverflows"]),
    );
    app.stop();
    Run {
        events_per_s: events as f64 / secs,
        secs,
        rss_before_kb,
        rss_peak_kb,
        detail,
    }
}

async fn panoramisk_run(stream: &[u8], events: u64, python: &str, client: &str) -> Run {
    let ami = FakeAmi::start("pbxgate", SECRET).await;
    let mut child = tokio::process::Command::new(python)
        .args([
            client,
            "127.0.0.1",
            &ami.addr.port().to_string(),
            "pbxgate",
            SECRET,
            &events.to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {python} {client}: {e}"));
    let pid = child.id().expect("the client's pid");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the panoramisk client logs in within 30 s")
        .unwrap()
        .unwrap_or_default();
    assert_eq!(line, "ready", "the panoramisk client said {line:?}");
    let rss_before_kb = serve::rss_kb(pid);
    let peak = PeakRss::start(move || serve::rss_kb(pid));
    let started = Instant::now();
    ami.send(stream);
    let line = tokio::time::timeout(Duration::from_secs(900), lines.next_line())
        .await
        .expect("the panoramisk client finishes within 900 s")
        .unwrap()
        .unwrap_or_default();
    let secs = started.elapsed().as_secs_f64();
    let rss_peak_kb = peak.finish();
    let _ = child.wait().await;
    Run {
        events_per_s: events as f64 / secs,
        secs,
        rss_before_kb,
        rss_peak_kb,
        detail: line,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[tokio::main]
async fn main() {
    let copies = env("COPIES", 100);
    let runs = env("RUNS", 2).max(1);
    let stream = captures::multiplied(copies);
    let events = captures::count_events(&stream) as u64;
    let calls = finished_calls(&stream);
    let peer = match (
        std::env::var("PANORAMISK_PYTHON"),
        std::env::var("PANORAMISK_CLIENT"),
    ) {
        (Ok(p), Ok(c)) => Some((p, c)),
        _ => None,
    };
    println!(
        "ami ingest: {copies} copies of the captures, {events} events ({:.1} MB) finishing {calls} calls; pbxgate serve ({}); {} cores; {runs} turns each, pbxgate first",
        stream.len() as f64 / 1e6,
        serve::binary().display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    if peer.is_none() {
        println!("  (PANORAMISK_PYTHON / PANORAMISK_CLIENT not set: pbxgate only; scripts/bench-peers.sh sets them)");
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for turn in 1..=runs {
        let r = pbxgate_run(&stream, events, calls).await;
        print("pbxgate", turn, &r);
        ours.push(r);
        if let Some((python, client)) = &peer {
            let r = panoramisk_run(&stream, events, python, client).await;
            print("panoramisk", turn, &r);
            theirs.push(r);
        }
    }
    let ours_rate = median(ours.iter().map(|r| r.events_per_s).collect());
    if theirs.is_empty() {
        println!("pbxgate: median {ours_rate:.0} events/s");
        return;
    }
    let theirs_rate = median(theirs.iter().map(|r| r.events_per_s).collect());
    let peak = |runs: &[Run]| runs.iter().map(|r| r.rss_peak_kb).max().unwrap_or(0);
    println!(
        "ratio pbxgate/panoramisk events/s: {:.1} (median {ours_rate:.0} vs {theirs_rate:.0}; per turn {})",
        ours_rate / theirs_rate,
        ours.iter()
            .zip(&theirs)
            .map(|(a, b)| format!("{:.1}", a.events_per_s / b.events_per_s))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "ratio pbxgate/panoramisk peak RSS: {:.2} ({:.1} vs {:.1} MB)",
        peak(&ours) as f64 / peak(&theirs).max(1) as f64,
        mb(peak(&ours)),
        mb(peak(&theirs))
    );
}
