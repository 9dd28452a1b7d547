//! Recordings throughput: pbxgate (started in-process, the link made through the library) and
//! nginx (started by `scripts/bench-records.sh`) serve the same file to the same `wrk` load, one
//! after the other in the same run; prints both throughputs, the ratio and both servers' RSS.
//!
//! Environment (set by the script): `RECORDS_DIR` (the directory holding the file), `BENCH_FILE`
//! (its name), `NGINX_URL` (the same file through nginx), `NGINX_PID` (nginx's master process);
//! optional `CONNECTIONS` (50), `DURATION` (seconds, 10), `WRK_THREADS` (2).

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pbxgate::app::Application;
use pbxgate::calls::CallRecord;
use pbxgate::config::Config;

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set (run scripts/bench-records.sh)"))
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// VmRSS of one process, in KB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A process and its children (nginx's master and workers), in KB.
fn tree_rss_kb(pid: u32) -> u64 {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    rss_kb(pid)
        + children
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .map(tree_rss_kb)
            .sum::<u64>()
}

struct Run {
    requests_per_s: f64,
    mb_per_s: f64,
    rss_before_kb: u64,
    rss_peak_kb: u64,
    rss_after_kb: u64,
    errors: String,
}

/// `wrk` against `url` while a thread samples `rss` every 50 ms.
fn load(url: &str, rss: impl Fn() -> u64 + Send + Sync + 'static) -> Run {
    let connections = env_or("CONNECTIONS", 50);
    let duration = env_or("DURATION", 10);
    let threads = env_or("WRK_THREADS", 2);
    let rss = Arc::new(rss);
    let rss_before_kb = rss();
    let peak = Arc::new(AtomicU64::new(rss_before_kb));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (rss, peak, stop) = (rss.clone(), peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let out = Command::new("wrk")
        .args([
            &format!("-t{threads}"),
            &format!("-c{connections}"),
            &format!("-d{duration}s"),
            "--timeout",
            "60s",
            url,
        ])
        .output()
        .expect("run wrk (apt-get install wrk)");
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        panic!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    // "  1234 requests in 10.00s, 60.25GB read"
    let summary = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .unwrap_or_else(|| panic!("unexpected wrk output:\n{text}"));
    let words: Vec<&str> = summary.split_whitespace().collect();
    let requests: f64 = words[0].parse().unwrap();
    let seconds: f64 = words[3].trim_end_matches("s,").parse().unwrap();
    let read = words[4];
    let (number, unit) = read.split_at(read.find(|c: char| c.is_ascii_alphabetic()).unwrap());
    let scale = match unit {
        "B" => 1.0,
        "KB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        "TB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => panic!("unknown unit {other}"),
    };
    let bytes = number.parse::<f64>().unwrap() * scale;
    let errors = text
        .lines()
        .filter(|l| l.contains("errors") || l.contains("Non-2xx"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    Run {
        requests_per_s: requests / seconds,
        mb_per_s: bytes / seconds / 1e6,
        rss_before_kb,
        rss_peak_kb: peak.load(Ordering::Relaxed),
        rss_after_kb: rss(),
        errors,
    }
}

fn record(path: &str) -> CallRecord {
    let now = pbxgate::calls::tracker::now_ms();
    CallRecord {
        recordings: vec![path.to_string()],
        ..support::call_record("pbx-bench", now)
    }
}

fn print(name: &str, r: &Run) {
    println!(
        "{name:<8} {:>9.1} req/s {:>9.0} MB/s   RSS {:>7.1} MB before, {:>7.1} MB peak (+{:.1} MB), {:>7.1} MB after{}",
        r.requests_per_s,
        r.mb_per_s,
        r.rss_before_kb as f64 / 1024.0,
        r.rss_peak_kb as f64 / 1024.0,
        r.rss_peak_kb.saturating_sub(r.rss_before_kb) as f64 / 1024.0,
        r.rss_after_kb as f64 / 1024.0,
        if r.errors.is_empty() {
            String::new()
        } else {
            format!("   [{}]", r.errors)
        }
    );
}

#[tokio::main]
async fn main() {
    let dir = PathBuf::from(env("RECORDS_DIR"));
    let file = dir.join(env("BENCH_FILE"));
    let nginx_url = env("NGINX_URL");
    let nginx_pid: u32 = env("NGINX_PID").parse().expect("NGINX_PID");
    let size = std::fs::metadata(&file).expect("the bench file").len();

    let store = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut config = Config::default();
    config.http.listen = listener.local_addr().unwrap().to_string();
    config.http.public_url = base.clone();
    config.storage.path = store.path().join("store");
    config.records.dir = dir.clone();
    // Nothing listens there: the AMI client just retries in the background.
    config.ami.port = 1;
    config.ami.reconnect_min = Duration::from_secs(30);
    config.ami.reconnect_max = Duration::from_secs(60);
    let app = Application::build_with_listener(config, listener)
        .await
        .expect("pbxgate starts");
    let state = app.state();
    let handle = app.handle();
    let server = tokio::spawn(app.run_until_stopped());
    let url = state
        .records
        .ensure_link(&record(&file.to_string_lossy()), &jiff::tz::TimeZone::UTC)
        .await
        .unwrap()
        .expect("the file is linkable");

    // Same bytes from both, and the file in the page cache before either runs.
    let check = |url: &str| {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download} %{content_type}",
                url,
            ])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    println!(
        "file: {} ({:.1} MB); {} connections, {} s each, wrk threads {}; {} cores",
        file.display(),
        size as f64 / 1e6,
        env_or("CONNECTIONS", 50),
        env_or("DURATION", 10),
        env_or("WRK_THREADS", 2),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!("nginx   check: {}", check(&nginx_url));
    println!("pbxgate check: {}", check(&url));

    let nginx =
        tokio::task::spawn_blocking(move || load(&nginx_url, move || tree_rss_kb(nginx_pid)))
            .await
            .unwrap();
    print("nginx", &nginx);
    let own = std::process::id();
    let pbx_url = url.clone();
    let pbx = tokio::task::spawn_blocking(move || load(&pbx_url, move || rss_kb(own)))
        .await
        .unwrap();
    print("pbxgate", &pbx);
    println!(
        "ratio pbxgate/nginx: {:.2} (goal >= 0.80); pbxgate RSS growth {:.1} MB (goal < 5 MB)",
        pbx.mb_per_s / nginx.mb_per_s,
        pbx.rss_peak_kb.saturating_sub(pbx.rss_before_kb) as f64 / 1024.0
    );

    handle.stop(true).await;
    let _ = server.await;
}
