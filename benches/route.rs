//! Routing latency: RATE (default 500) requests per second for SECONDS (default 10), open loop,
//! of numbers whose manager is cached, through `GET /pbx/route` (keep-alive HTTP, as the
//! dialplan's CURL() with a shared connection) and through FastAGI (a new TCP connection per
//! call, as Asterisk's AGI() does), to `pbxgate serve` running as its own process (the release
//! binary, default log level) with the fake CRM and a scripted AMI server in this process.
//! Latency is the round trip the caller sees: from sending a request (for FastAGI: from
//! connecting) to its full answer; how far the generator fell behind its schedule is printed
//! too, so a stall cannot hide. Prints p50/p90/p99/max and pbxgate's own RSS. Run with
//! `scripts/bench-route.sh`.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "support/serve.rs"]
mod serve;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serve::{mb, PeakRss, Served};
use support::{fake_crm, FakeAmi, FakeCrm};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const TOKEN: &str = "bench-token-0123456789";
const NUMBERS: usize = 1000;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn number(i: usize) -> String {
    format!("+7916{i:07}")
}

fn report(label: &str, mut lat: Vec<Duration>, errors: usize, wall: Duration) {
    lat.sort();
    let pct = |p: f64| {
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i].as_secs_f64() * 1000.0
    };
    println!(
        "{label}: {} requests in {:.1} s ({:.0}/s), {errors} errors; latency p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        lat.len(),
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
}

/// Runs `one(i)` at `rate` per second for `seconds`, each from its scheduled time.
async fn open_loop<F, Fut>(rate: u64, seconds: u64, one: F) -> (Vec<Duration>, usize, Duration)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let one = Arc::new(one);
    let total = (rate * seconds) as usize;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let scheduled = started + period * i as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let one = one.clone();
        tasks.push(tokio::spawn(async move {
            // tokio's timer has a 1 ms grain: the request's clock starts when it is sent, and
            // how late that was behind its schedule is reported on its own.
            let sent = Instant::now();
            let ok = one(i).await;
            (sent.elapsed(), sent.duration_since(scheduled), ok)
        }));
    }
    let mut lat = Vec::with_capacity(total);
    let mut errors = 0;
    let mut lag = Duration::ZERO;
    for t in tasks {
        let (d, late, ok) = t.await.unwrap();
        if !ok {
            errors += 1;
        }
        lag = lag.max(late);
        lat.push(d);
    }
    println!(
        "  (the load generator sent its latest request {:.1} ms behind schedule)",
        lag.as_secs_f64() * 1000.0
    );
    (lat, errors, started.elapsed())
}

#[tokio::main]
async fn main() {
    let rate = env("RATE", 500);
    let seconds = env("SECONDS", 10);
    let crm = FakeCrm::start().await;
    for i in 0..NUMBERS {
        crm.set_manager(
            &number(i),
            1 + (i % 50) as i64,
            &format!("{}", 101 + i % 50),
        );
    }
    let ami = FakeAmi::start("pbxgate", "ami-secret").await;
    let store = tempfile::tempdir().unwrap();
    let agi_port = serve::free_port();
    let mut app = Served::start(
        &store.path().join("store"),
        &[
            ("CRM__URL", crm.url.clone()),
            ("CRM__API_KEY", fake_crm::API_KEY.into()),
            ("CRM__REGISTER_ON_START", "false".into()),
            ("PBX__TOKEN", TOKEN.into()),
            ("PHONE__COUNTRY_CODE", "7".into()),
            ("PHONE__NATIONAL_PREFIX", "8".into()),
            ("PHONE__NATIONAL_LENGTH", "10".into()),
            ("ROUTING__AGI_LISTEN", format!("127.0.0.1:{agi_port}")),
            ("AMI__PORT", ami.addr.port().to_string()),
            ("AMI__SECRET", "ami-secret".into()),
        ],
    );
    let startup = app.healthy().await;
    let pid = app.pid;
    println!(
        "pbxgate serve ({}), pid {pid}: answering after {:.0} ms, RSS {:.1} MB; {} cores",
        serve::binary().display(),
        startup.as_secs_f64() * 1000.0,
        mb(app.rss_kb()),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    // Fill the cache: every number once.
    for i in 0..NUMBERS {
        let body = client
            .get(app.url("/pbx/route"))
            .query(&[("phone", number(i).as_str()), ("token", TOKEN)])
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, format!("{}", 101 + i % 50));
    }
    let lookups = crm.requests_to("/api/v5/telephony/manager").len();
    println!("  {NUMBERS} numbers cached: RSS {:.1} MB", mb(app.rss_kb()));

    let url = app.url("/pbx/route");
    let peak = PeakRss::start(move || serve::rss_kb(pid));
    let (lat, errors, wall) = open_loop(rate, seconds, move |i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            // National format: normalised, then found in the cache.
            let phone = format!("8916{:07}", i % NUMBERS);
            match client
                .get(&url)
                .query(&[("phone", phone.as_str()), ("token", TOKEN)])
                .send()
                .await
            {
                Ok(r) => r.status() == 200 && !r.text().await.unwrap_or_default().is_empty(),
                Err(_) => false,
            }
        }
    })
    .await;
    report(
        &format!("route over HTTP, {rate}/s of cache hits"),
        lat,
        errors,
        wall,
    );
    println!(
        "  pbxgate RSS peak {:.1} MB, after {:.1} MB",
        mb(peak.finish()),
        mb(app.rss_kb())
    );

    let agi = std::net::SocketAddr::from(([127, 0, 0, 1], agi_port));
    let peak = PeakRss::start(move || serve::rss_kb(pid));
    let (lat, errors, wall) = open_loop(rate, seconds, move |i| async move {
        let Ok(stream) = TcpStream::connect(agi).await else {
            return false;
        };
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let env = format!(
            "agi_network: yes\nagi_network_script: route\nagi_callerid: 8916{:07}\nagi_dnid: 4951112233\n\n",
            i % NUMBERS
        );
        if w.write_all(env.as_bytes()).await.is_err() {
            return false;
        }
        let mut set = 0;
        let mut line = String::new();
        while let Ok(n) = r.read_line(&mut line).await {
            if n == 0 {
                break;
            }
            if line.starts_with("SET VARIABLE") {
                set += 1;
            }
            line.clear();
            if w.write_all(b"200 result=1\n").await.is_err() {
                break;
            }
        }
        set == 2
    })
    .await;
    report(
        &format!("route over FastAGI (a connection per call), {rate}/s of cache hits"),
        lat,
        errors,
        wall,
    );
    println!(
        "  pbxgate RSS peak {:.1} MB, after {:.1} MB",
        mb(peak.finish()),
        mb(app.rss_kb())
    );
    let extra = crm.requests_to("/api/v5/telephony/manager").len() - lookups;
    println!("CRM lookups during the runs: {extra} (every answer came from the cache)");
    app.ready().await;
    app.stop();
}
