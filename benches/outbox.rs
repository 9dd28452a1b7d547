//! Outbox figures: durable enqueues/s with 1 and 32 producers (group commit), memory with
//! PENDING (default 200,000) records pending, and draining DRAIN (default 100,000) calls to the
//! fake CRM enforcing its 40 rps telephony limit (ideal: DRAIN / (40 × 50) seconds).

#[path = "../tests/support/mod.rs"]
mod support;

use support::fake_crm;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pbxgate::calls::CallRecord;
use pbxgate::config::Config;
use pbxgate::crm::CrmClient;
use pbxgate::outbox::{Drain, Outbox};
use pbxgate::secret::Secret;
use pbxgate::store::Store;

fn record(i: usize) -> CallRecord {
    let mut r = support::call_record(&format!("bench-{i:08}"), support::T0 + i as i64);
    r.linkedid = format!("1795264400.{i}");
    r
}

fn rss_mb() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / 1e6
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Set to a store path: open it, read the first batch, print the memory it took, exit.
const REOPEN: &str = "OUTBOX_BENCH_REOPEN";

async fn reopen(path: &str) {
    let before = rss_mb();
    let started = Instant::now();
    let store = Store::open(std::path::Path::new(path)).unwrap();
    println!("  sled opened: RSS {:.1} MB", rss_mb());
    let queue = store.outbox().unwrap();
    let opened = rss_mb();
    let batch = queue.pending(None, 50, |_| true).unwrap();
    println!(
        "outbox memory after a restart onto {} pending: RSS {before:.1} MB → {opened:.1} MB opened ({:.1} s) → {:.1} MB after reading the first batch of {} (+{:.1} MB)",
        queue.counts().pending.load(std::sync::atomic::Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        rss_mb(),
        batch.len(),
        rss_mb() - before
    );
}

#[tokio::main]
async fn main() {
    if let Ok(path) = std::env::var(REOPEN) {
        return reopen(&path).await;
    }
    let crm_fake = fake_crm::FakeCrm::start().await;
    crm_fake.enforce_rate_limit(10, 40);
    let mut config = Config::default();
    config.crm.url = crm_fake.url.clone();
    config.crm.api_key = Secret::new(fake_crm::API_KEY);
    config.crm.max_retries = 0;
    config.crm.timezone = "UTC".into();
    let config = Arc::new(config);

    // 1. Durable enqueues.
    for producers in [1usize, 32] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let outbox = Outbox::new(
            store.outbox().unwrap(),
            store.clone(),
            CrmClient::new(&config.crm).unwrap(),
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

    // 2. Memory with many pending.
    let pending = env("PENDING", 200_000);
    {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let queue = store.outbox().unwrap();
        let before = rss_mb();
        let started = Instant::now();
        for i in 0..pending {
            queue.insert(record(i)).unwrap();
            // As in service, where every call is flushed as it is queued (here: every 1000).
            if i % 1000 == 999 {
                queue.flush().await.unwrap();
            }
        }
        queue.flush().await.unwrap();
        let after_insert = rss_mb();
        // The uploader's read path: the first batch, never the whole queue.
        let batch = queue.pending(None, 50, |_| true).unwrap();
        // A restart with that backlog, in a fresh process (freed heap is never given back, so
        // only a new process shows what opening onto the backlog costs).
        let path = store.path().to_path_buf();
        drop(queue);
        drop(store);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .env(REOPEN, &path)
            .output()
            .unwrap();
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        println!(
            "outbox memory: {pending} pending inserted in {:.1} s; RSS {before:.1} MB → {after_insert:.1} MB (+{:.1} MB); \
             first batch read: {} records",
            started.elapsed().as_secs_f64(),
            after_insert - before,
            batch.len()
        );
    }

    // 3. Drain against the rate-limited fake CRM.
    let drain = env("DRAIN", 100_000);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db")).unwrap();
    let queue = store.outbox().unwrap();
    for i in 0..drain {
        queue.insert(record(i)).unwrap();
    }
    queue.flush().await.unwrap();
    let outbox = Outbox::new(
        queue,
        store.clone(),
        CrmClient::new(&config.crm).unwrap(),
        config.clone(),
    );
    let ideal = drain as f64 / (40.0 * 50.0);
    let rss_before_drain = rss_mb();
    let started = Instant::now();
    loop {
        match outbox.drain().await {
            Drain::Done => break,
            other => {
                println!("  drain interrupted: {other:?}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "outbox drain: {drain} calls in {secs:.1} s vs ideal {ideal:.1} s ({:.1} % of the 40 rps × 50 ceiling), {} calls at the CRM, {} answered 503",
        ideal / secs * 100.0,
        crm_fake.calls().len(),
        crm_fake.rate_limited_count()
    );
    println!(
        "outbox memory while draining {drain} pending: RSS {rss_before_drain:.1} MB → {:.1} MB",
        rss_mb()
    );
}
