//! Click-to-call latency: concurrent makeCallUrl requests against pbxgate wired to the scripted
//! AMI server; for each request, the time from sending the HTTP request to the Originate frame
//! arriving at the AMI server, and the HTTP round trip. Prints p50/p90/p99/max.
//! Run with `scripts/bench-click-to-call.sh` (CONCURRENCY and REQUESTS override the defaults).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::TestApp;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let concurrency = env("CONCURRENCY", 200);
    let requests = env("REQUESTS", 4000).max(concurrency);
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.click_to_call.per_extension_per_minute = 0;
        c.click_to_call.global_per_minute = 0;
        c.log.level = "warn".into();
    })
    .await;
    app.ami_connected().await;
    let app = Arc::new(app);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        // Below the server's keep-alive (5 s): never reuse a connection it is closing.
        .pool_idle_timeout(Duration::from_secs(4))
        .build()
        .unwrap();
    let id = app.client_id();

    // Warm-up: open the connections.
    let warm: Vec<_> = (0..concurrency)
        .map(|i| {
            let (c, url, id) = (client.clone(), app.url("/crm/make-call"), id.clone());
            tokio::spawn(async move {
                let phone = format!("+7800{i:07}");
                c.get(url)
                    .query(&[
                        ("clientId", id.as_str()),
                        ("code", "101"),
                        ("phone", &phone),
                        ("userId", "1"),
                    ])
                    .send()
                    .await
                    .unwrap();
            })
        })
        .collect();
    for w in warm {
        w.await.unwrap();
    }
    app.ami.wait_for_actions("Originate", concurrency).await;

    // Phase 1, closed loop: CONCURRENCY clients, each sends its next request when the last is answered
    // (saturation: latency is mostly queueing). Phase 2, open loop: requests arrive at RATE per second
    // over the same CONCURRENCY connections (the realistic shape: many users, independent clicks).
    let rate = env("RATE", 1000);
    let mut next_phone = 0usize;
    for phase in ["closed loop (saturation)", "open loop"] {
        let started = Instant::now();
        let before = app.ami.actions("Originate").len();
        let results = if phase.starts_with("closed") {
            closed_loop(
                &client,
                &app,
                &id,
                concurrency,
                requests / concurrency,
                &mut next_phone,
            )
            .await
        } else {
            open_loop(
                &client,
                &app,
                &id,
                concurrency,
                requests,
                rate,
                &mut next_phone,
            )
            .await
        };
        let wall = started.elapsed();
        report(&app, phase, &results, wall, before, concurrency, rate).await;
    }
}

type Sample = (String, Instant, Duration);

async fn closed_loop(
    client: &reqwest::Client,
    app: &TestApp,
    id: &str,
    concurrency: usize,
    per_worker: usize,
    next: &mut usize,
) -> Vec<Sample> {
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (c, url, id) = (client.clone(), app.url("/crm/make-call"), id.to_string());
        let first = *next + w * per_worker;
        workers.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per_worker);
            for k in 0..per_worker {
                out.push(one(&c, &url, &id, first + k).await);
            }
            out
        }));
    }
    *next += concurrency * per_worker;
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    all
}

async fn open_loop(
    client: &reqwest::Client,
    app: &TestApp,
    id: &str,
    concurrency: usize,
    total: usize,
    rate: usize,
    next: &mut usize,
) -> Vec<Sample> {
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate as f64)).await;
        let permit = gate.clone().acquire_owned().await.unwrap();
        let (c, url, id, n) = (
            client.clone(),
            app.url("/crm/make-call"),
            id.to_string(),
            *next + i,
        );
        tasks.push(tokio::spawn(async move {
            let r = one(&c, &url, &id, n).await;
            drop(permit);
            r
        }));
    }
    *next += total;
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    all
}

async fn one(c: &reqwest::Client, url: &str, id: &str, n: usize) -> Sample {
    let phone = format!("+7900{n:07}");
    let sent = Instant::now();
    let r = c
        .get(url)
        .query(&[
            ("clientId", id),
            ("code", "101"),
            ("phone", phone.as_str()),
            ("userId", "1"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rt = sent.elapsed();
    (phone, sent, rt)
}

async fn report(
    app: &TestApp,
    phase: &str,
    results: &[Sample],
    wall: Duration,
    before: usize,
    concurrency: usize,
    rate: usize,
) {
    let total = results.len();
    let sent: std::collections::HashMap<&str, Instant> =
        results.iter().map(|(p, at, _)| (p.as_str(), *at)).collect();
    let mut http: Vec<Duration> = results.iter().map(|r| r.2).collect();
    let frames = app.ami.wait_for_actions("Originate", before + total).await;
    assert_eq!(frames.len(), before + total, "one Originate per request");
    let mut to_frame: Vec<Duration> = app
        .ami
        .actions_timed("Originate")
        .into_iter()
        .filter_map(|(at, f)| {
            sent.get(f.get("Exten")?)
                .map(|s| at.saturating_duration_since(*s))
        })
        .collect();
    to_frame.sort();
    http.sort();
    let shape = if phase.starts_with("open") {
        format!("{rate} req/s offered")
    } else {
        "back to back".into()
    };
    let (open, refused) = app.state.connections.counts();
    println!(
        "\nclick-to-call, {phase}: {total} requests over {concurrency} connections, {shape}, {:.0} req/s achieved \
         (server: {open} connections open, {refused} refused so far)",
        total as f64 / wall.as_secs_f64()
    );
    println!(
        "{:<28} {:>8} {:>8} {:>8} {:>8}",
        "latency (ms)", "p50", "p90", "p99", "max"
    );
    for (name, v) in [
        ("HTTP request → Originate", &to_frame),
        ("HTTP round trip", &http),
    ] {
        println!(
            "{name:<28} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
            pct(v, 0.5),
            pct(v, 0.9),
            pct(v, 0.99),
            v.last().unwrap().as_secs_f64() * 1000.0
        );
    }
}
