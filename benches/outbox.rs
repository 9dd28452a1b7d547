//! Outbox figures: durable enqueues/s with 1 and 32 producers (group commit, the library in
//! this process), memory with PENDING (default 200,000) records pending (inserting them here;
//! then `pbxgate serve` started onto them as its own process, its RSS beside one started on an
//! empty store), and `pbxgate serve` draining DRAIN (default 100,000) queued calls to the fake
//! CRM in this process, which enforces the 40 rps telephony limit (ideal: DRAIN / (40 × 50)
//! seconds). The memory figures of `pbxgate serve` are its own process's: the fake CRM, which
//! keeps every request it saw, lives here.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "support/serve.rs"]
mod serve;

use serve::{mb, PeakRss, Served};
use support::{fake_crm, FakeAmi};

use std::sync::Arc;
use std::time::{Duration, Instant};

use pbxgate::base::secret::Secret;
use pbxgate::calls::CallRecord;
use pbxgate::config::Config;
use pbxgate::outbox::Outbox;
use pbxgate::store::Store;

fn record(i: usize) -> CallRecord {
    let mut r = support::call_record(&format!("bench-{i:08}"), support::T0 + i as i64);
    r.linkedid = format!("1795264400.{i}");
    r
}

fn rss_mb() -> f64 {
    mb(serve::rss_kb(std::process::id()))
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Fills a fresh store at `path` with `n` pending calls and closes it.
async fn fill(path: &std::path::Path, n: usize) -> std::time::Duration {
    let store = Store::open(path).unwrap();
    let queue = pbxgate::outbox::store::OutboxStore::of(&store).unwrap();
    let started = Instant::now();
    for i in 0..n {
        queue.insert(record(i)).unwrap();
        // As in service, where every call is flushed as it is queued (here: every 1000).
        if i % 1000 == 999 {
            queue.flush().await.unwrap();
        }
    }
    queue.flush().await.unwrap();
    let took = started.elapsed();
    drop(queue);
    drop(store);
    // sled lets go of its lock once its background flusher has stopped.
    tokio::time::sleep(Duration::from_millis(500)).await;
    took
}

/// `pbxgate serve` on the store at `path`, against `crm_url`, with a scripted AMI server.
fn serve_on(path: &std::path::Path, crm_url: &str, ami: &FakeAmi) -> Served {
    Served::start(
        path,
        &[
            ("CRM__URL", crm_url.to_string()),
            ("CRM__API_KEY", fake_crm::API_KEY.into()),
            ("CRM__REGISTER_ON_START", "false".into()),
            ("CRM__TIMEZONE", "UTC".into()),
            // Every 503 shows as a failed upload.
            ("CRM__MAX_RETRIES", "0".into()),
            ("AMI__PORT", ami.addr.port().to_string()),
            ("AMI__SECRET", "ami-secret".into()),
        ],
    )
}

fn history(ready: &serde_json::Value, key: &str) -> u64 {
    ready["history"][key].as_u64().unwrap_or(0)
}

/// RSS of `pbxgate serve` started on the store at `path` once the uploader has read its first
/// batch (the CRM answers 503 to every upload, so the batch stays queued).
async fn restart_rss(path: &std::path::Path, ami: &FakeAmi) -> (f64, f64, Duration) {
    let crm = fake_crm::FakeCrm::start().await;
    crm.start_outage_on(
        "/api/v5/telephony/calls/upload",
        support::Fault::Status(503),
    );
    let mut app = serve_on(path, &crm.url, ami);
    let up = app.healthy().await;
    let at_health = mb(app.rss_kb());
    let pending = history(&app.ready().await, "pending");
    if pending > 0 {
        app.ready_until(Duration::from_millis(20), Duration::from_secs(120), |r| {
            history(r, "failedAttempts") >= 1
        })
        .await;
    }
    let after_batch = mb(app.rss_kb());
    app.stop();
    (at_health, after_batch, up)
}

#[tokio::main]
async fn main() {
    let mut config = Config::default();
    // Nothing is uploaded in the enqueue runs; the client just needs a valid address.
    config.crm.url = "http://127.0.0.1:9".into();
    config.crm.api_key = Secret::new(fake_crm::API_KEY);
    config.crm.max_retries = 0;
    config.crm.timezone = "UTC".into();
    let config = Arc::new(config);
    println!(
        "pbxgate serve: {}; {} cores",
        serve::binary().display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // 1. Durable enqueues (the library, in this process).
    for producers in [1usize, 32] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let outbox = Outbox::new(
            pbxgate::outbox::store::OutboxStore::of(&store).unwrap(),
            store.clone(),
            pbxgate::crm::connect(
                config.clone(),
                pbxgate::base::secret::Secret::new(""),
                None,
                pbxgate::hooks::Hooks::none(),
            )
            .unwrap(),
            config.clone(),
        );
        let n = 4000;
        let started = Instant::now();
        let tasks: Vec<_> = (0..producers)
            .map(|p| {
                let o = outbox.clone();
                tokio::spawn(async move {
                    for i in (p..n).step_by(producers) {
                        o.enqueue(record(i)).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        println!("outbox enqueue, {producers:>2} producer(s): {:.0} durable enqueues/s ({n} records, each flushed before returning)", n as f64 / secs);
    }

    let ami = FakeAmi::start("pbxgate", "ami-secret").await;

    // 2. Memory with many pending: inserting them (here), then pbxgate serve opening onto them.
    let pending = env("PENDING", 200_000);
    {
        let empty = tempfile::tempdir().unwrap();
        let (empty_rss, empty_batch, _) = restart_rss(&empty.path().join("db"), &ami).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let before = rss_mb();
        let took = fill(&path, pending).await;
        println!(
            "outbox memory: {pending} pending inserted in {:.1} s; this process's RSS {before:.1} MB → {:.1} MB (+{:.1} MB)",
            took.as_secs_f64(),
            rss_mb(),
            rss_mb() - before
        );
        let (full_rss, full_batch, up) = restart_rss(&path, &ami).await;
        println!(
            "pbxgate serve onto {pending} pending: answering after {:.0} ms, RSS {full_rss:.1} MB, {full_batch:.1} MB after reading the first batch; \
             on an empty store {empty_rss:.1} MB / {empty_batch:.1} MB: +{:.1} MB for the backlog",
            up.as_secs_f64() * 1000.0,
            full_batch - empty_batch
        );
    }

    // 3. pbxgate serve draining DRAIN queued calls to the rate-limited fake CRM.
    let drain = env("DRAIN", 100_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    fill(&path, drain).await;
    let crm_fake = fake_crm::FakeCrm::start().await;
    crm_fake.enforce_rate_limit(10, 40);
    let ideal = drain as f64 / (40.0 * 50.0);
    let mut app = serve_on(&path, &crm_fake.url, &ami);
    let pid = app.pid;
    let peak = PeakRss::start(move || serve::rss_kb(pid));
    app.healthy().await;
    let rss_start = app.rss_kb();
    // The uploader starts on its own at startup; the clock runs from its first batch.
    app.ready_until(Duration::from_millis(10), Duration::from_secs(60), |r| {
        history(r, "uploadedTotal") > 0 || history(r, "inFlight") > 0
    })
    .await;
    let started = Instant::now();
    let rss_first = app.rss_kb();
    let limit = Duration::from_secs_f64(ideal * 3.0 + 60.0);
    let last = app
        .ready_until(Duration::from_millis(20), limit, |r| {
            history(r, "pending") == 0 && history(r, "inFlight") == 0
        })
        .await;
    let secs = started.elapsed().as_secs_f64();
    let rss_peak = peak.finish();
    println!(
        "outbox drain by pbxgate serve: {drain} calls in {secs:.1} s from the first batch vs ideal {ideal:.1} s ({:.1} % of the 40 rps × 50 ceiling); \
         {} calls at the CRM, {} answered 503, {} failed uploads, {} dead",
        ideal / secs * 100.0,
        crm_fake.upload_counts().len(),
        crm_fake.rate_limited_count(),
        history(&last, "failedAttempts"),
        history(&last, "dead"),
    );
    println!(
        "pbxgate serve memory while draining {drain} pending: RSS {:.1} MB at start, {:.1} MB at the first batch, {:.1} MB peak, {:.1} MB at the end",
        mb(rss_start),
        mb(rss_first),
        mb(rss_peak),
        mb(app.rss_kb())
    );
    app.stop();
}
