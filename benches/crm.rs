//! Throughput of the retailCRM client against the fake CRM enforcing the real limits.
//!
//! Sends `call/event` (40 rps limit) and a general method (10 rps) from many concurrent tasks
//! for a fixed number of seconds each, with retries off so every 503 is counted, and prints
//! the achieved rate as a share of the limit. Run with `scripts/bench-crm.sh`.

#[path = "../tests/support/fake_crm.rs"]
mod fake_crm;

use std::time::{Duration, Instant};

use fake_crm::FakeCrm;
use pbxgate::base::secret::Secret;
use pbxgate::config::CrmConfig;
use pbxgate::crm::retailcrm::{CallEvent, CallEventType, CrmClient, CrmError, UserStatus};

const CONCURRENCY: usize = 16;

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let crm = FakeCrm::start().await;
    crm.enforce_rate_limit(10, 40);
    let client = CrmClient::new(&CrmConfig {
        url: crm.url.clone(),
        api_key: Secret::new(fake_crm::API_KEY),
        max_retries: 0,
        ..CrmConfig::default()
    })
    .unwrap();

    println!("pbxgate CRM client vs fake retailCRM enforcing 10 rps / 40 rps (telephony), {CONCURRENCY} concurrent callers, {seconds} s each");
    let telephony = run(&client, seconds, 40, |c| async move {
        c.call_event(&CallEvent::new(CallEventType::In, "+79990000000"))
            .await
            .map(|_| ())
    })
    .await;
    let general = run(&client, seconds, 10, |c| async move {
        c.user_status(1, UserStatus::Free).await
    })
    .await;
    println!(
        "{:<22} {:>9} {:>10} {:>12} {:>8}",
        "endpoint", "requests", "rps", "% of limit", "503s"
    );
    for (name, r) in [
        ("telephony/call/event", telephony),
        ("users/{id}/status", general),
    ] {
        println!(
            "{name:<22} {:>9} {:>10.2} {:>11.1}% {:>8}",
            r.ok + r.limited,
            r.rps,
            r.rps / r.limit * 100.0,
            r.limited
        );
    }
    println!(
        "fake CRM answered 503 to {} requests in total",
        crm.rate_limited_count()
    );
}

struct Outcome {
    ok: usize,
    limited: usize,
    rps: f64,
    limit: f64,
}

async fn run<F, Fut>(client: &CrmClient, seconds: u64, limit: u32, call: F) -> Outcome
where
    F: Fn(CrmClient) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), CrmError>> + Send,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (c, call) = (client.clone(), call.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut limited) = (0usize, 0usize);
            while Instant::now() < deadline {
                match call(c.clone()).await {
                    Ok(()) => ok += 1,
                    Err(CrmError::RateLimited { .. }) => limited += 1,
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            (ok, limited)
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (o, l) = t.await.unwrap();
        ok += o;
        limited += l;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Outcome {
        ok,
        limited,
        rps: ok as f64 / elapsed,
        limit: f64::from(limit),
    }
}
