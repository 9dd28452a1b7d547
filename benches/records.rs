//! Recordings throughput: `pbxgate serve` (the release binary as its own process; the link made
//! through the library in its store before it starts) and nginx (started by
//! `scripts/bench-records.sh`) serve the same file to the same `wrk` load, taking turns in the
//! same run (pbxgate, nginx, pbxgate, nginx, ...); prints every run, the throughput ratio and
//! both servers' own RSS (pbxgate's process; nginx's master and workers).
//!
//! Environment (set by the script): `RECORDS_DIR` (the directory holding the file), `BENCH_FILE`
//! (its name), `NGINX_URL` (the same file through nginx), `NGINX_PID` (nginx's master process);
//! optional `CONNECTIONS` (50), `DURATION` (seconds, 10), `WRK_THREADS` (2), `RUNS` (turns per
//! server, 2).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "support/serve.rs"]
mod serve;

use std::path::PathBuf;
use std::process::Command;

use pbxgate::calls::CallRecord;
use pbxgate::config::Config;
use pbxgate::records::Records;
use pbxgate::store::Store;
use serve::{mb, PeakRss, Served};
use support::FakeAmi;

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

struct Run {
    requests_per_s: f64,
    mb_per_s: f64,
    rss_before_kb: u64,
    rss_peak_kb: u64,
    rss_after_kb: u64,
    errors: String,
}

/// `wrk` against `url` while a thread samples `rss`.
fn load(url: &str, rss: impl Fn() -> u64 + Send + 'static + Copy) -> Run {
    let connections = env_or("CONNECTIONS", 50);
    let duration = env_or("DURATION", 10);
    let threads = env_or("WRK_THREADS", 2);
    let rss_before_kb = rss();
    let peak = PeakRss::start(rss);
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
    let rss_peak_kb = peak.finish();
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
        rss_peak_kb,
        rss_after_kb: rss(),
        errors,
    }
}

fn record(path: &str) -> CallRecord {
    let now = pbxgate::base::clock::now_ms();
    CallRecord {
        recordings: vec![path.to_string()],
        ..support::call_record("pbx-bench", now)
    }
}

fn print(name: &str, turn: u64, r: &Run) {
    println!(
        "{name:<8} run {turn}: {:>7.1} req/s {:>7.0} MB/s   RSS {:>6.1} MB before, {:>6.1} MB peak (+{:.1} MB), {:>6.1} MB after{}",
        r.requests_per_s,
        r.mb_per_s,
        mb(r.rss_before_kb),
        mb(r.rss_peak_kb),
        mb(r.rss_peak_kb.saturating_sub(r.rss_before_kb)),
        mb(r.rss_after_kb),
        if r.errors.is_empty() {
            String::new()
        } else {
            format!("   [{}]", r.errors)
        }
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Makes the call's link in a fresh store at `path` for a pbxgate answering at `base`, as the
/// outbox does before an upload, then closes the store for `pbxgate serve` to open.
async fn make_link(
    path: &std::path::Path,
    base: &str,
    dir: &std::path::Path,
    file: &str,
) -> String {
    let mut config = Config::default();
    config.http.public_url = base.to_string();
    config.records.dir = dir.to_path_buf();
    let store = Store::open(path).unwrap();
    let key = store.records_secret(&config.records.secret).await.unwrap();
    let records = Records::new(&config, store.records().unwrap(), key);
    let url = records
        .ensure_link(&record(file), &jiff::tz::TimeZone::UTC)
        .await
        .unwrap()
        .expect("the file is linkable");
    store.flush().await.unwrap();
    drop(records);
    drop(store);
    // sled lets go of its lock once its background flusher has stopped.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    url
}

#[tokio::main]
async fn main() {
    let dir = PathBuf::from(env("RECORDS_DIR"));
    let file = dir.join(env("BENCH_FILE"));
    let nginx_url = env("NGINX_URL");
    let nginx_pid: u32 = env("NGINX_PID").parse().expect("NGINX_PID");
    let runs = env_or("RUNS", 2).max(1);
    let size = std::fs::metadata(&file).expect("the bench file").len();

    let store = tempfile::tempdir().unwrap();
    let store_path = store.path().join("store");
    let port = serve::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let url = make_link(&store_path, &base, &dir, &file.to_string_lossy()).await;
    let ami = FakeAmi::start("pbxgate", "ami-secret").await;
    let mut app = Served::start(
        &store_path,
        &[
            ("HTTP__LISTEN", format!("127.0.0.1:{port}")),
            ("RECORDS__DIR", dir.to_string_lossy().into_owned()),
            ("AMI__PORT", ami.addr.port().to_string()),
            ("AMI__SECRET", "ami-secret".into()),
        ],
    );
    app.healthy().await;
    let pid = app.pid;

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
        "file: {} ({:.1} MB); {} connections, {} s each, wrk threads {}; {} cores; {runs} turns each, pbxgate first",
        file.display(),
        size as f64 / 1e6,
        env_or("CONNECTIONS", 50),
        env_or("DURATION", 10),
        env_or("WRK_THREADS", 2),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!(
        "pbxgate serve ({}), pid {pid}; nginx master pid {nginx_pid}",
        serve::binary().display()
    );
    println!("nginx   check: {}", check(&nginx_url));
    println!("pbxgate check: {}", check(&url));

    let (mut pbx_runs, mut nginx_runs) = (Vec::new(), Vec::new());
    for turn in 1..=runs {
        let pbx_url = url.clone();
        let r = tokio::task::spawn_blocking(move || load(&pbx_url, move || serve::rss_kb(pid)))
            .await
            .unwrap();
        print("pbxgate", turn, &r);
        pbx_runs.push(r);
        let n_url = nginx_url.clone();
        let r = tokio::task::spawn_blocking(move || {
            load(&n_url, move || serve::tree_rss_kb(nginx_pid))
        })
        .await
        .unwrap();
        print("nginx", turn, &r);
        nginx_runs.push(r);
    }
    let ratios: Vec<f64> = pbx_runs
        .iter()
        .zip(&nginx_runs)
        .map(|(p, n)| p.mb_per_s / n.mb_per_s)
        .collect();
    let pbx_mb = median(pbx_runs.iter().map(|r| r.mb_per_s).collect());
    let nginx_mb = median(nginx_runs.iter().map(|r| r.mb_per_s).collect());
    let pbx_peak = pbx_runs.iter().map(|r| r.rss_peak_kb).max().unwrap_or(0);
    let nginx_peak = nginx_runs.iter().map(|r| r.rss_peak_kb).max().unwrap_or(0);
    let pbx_growth = pbx_runs
        .iter()
        .map(|r| r.rss_peak_kb.saturating_sub(pbx_runs[0].rss_before_kb))
        .max()
        .unwrap_or(0);
    let nginx_growth = nginx_runs
        .iter()
        .map(|r| r.rss_peak_kb.saturating_sub(nginx_runs[0].rss_before_kb))
        .max()
        .unwrap_or(0);
    println!(
        "ratio pbxgate/nginx throughput: {:.2} (median {pbx_mb:.0} vs {nginx_mb:.0} MB/s; per turn {}) (goal >= 0.80)",
        pbx_mb / nginx_mb,
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "ratio pbxgate/nginx peak RSS: {:.2} ({:.1} vs {:.1} MB); growth under load {:.1} vs {:.1} MB (pbxgate goal < 5 MB)",
        pbx_peak as f64 / nginx_peak.max(1) as f64,
        mb(pbx_peak),
        mb(nginx_peak),
        mb(pbx_growth),
        mb(nginx_growth)
    );
    app.stop();
}
