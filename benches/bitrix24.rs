//! Bitrix24 at the portal's rate limit: calls per second pbxgate delivers to the strict fake
//! portal (tests/support/fake_bitrix24.rs) at its default leaky bucket, 50 requests draining
//! 2 per second, which answers 503 `QUERY_LIMIT_EXCEEDED` above that. pbxgate runs in this
//! process (`Application::build_with_listener`, Bitrix24 webhook auth, the user directory
//! from the portal's `user.get`: 101 → user 11).
//!
//! 1. History: CALLS (default 400) answered inbound calls of extension 101, never announced
//!    live, queued into the outbox at once and drained by the real uploader: each needs a
//!    register (`SHOW = 0`) and then its finish inside one `batch` per delivery of 16 calls.
//! 2. Live: LIVE (default 120) calls through `POST /pbx/events`: start + ringing 101 (the live
//!    register, with the card), then, once the portal has registered it, answer + hangup (its
//!    finish goes through the outbox). The calls are offered in a closed loop: LIVE_AHEAD
//!    (default 3) calls are ringing but not registered yet at any time, so pbxgate always has
//!    work waiting for the bucket while each ringing is still within the 5 s live deadline.
//! 3. Only with LIVE_INTERVAL (seconds, unset by default): the live run again with the history
//!    uploaded every LIVE_INTERVAL s only (`history.immediate = false`): whether the
//!    uploader's schedule alone gets fuller finish batches.
//!
//! Each run starts on an empty portal bucket (a fresh portal, and after the requests of
//! pbxgate's start have drained). Figures: wall time (first call in to last finish), calls/s,
//! the HTTP requests the portal saw (a batch is one), calls per request, rejected requests.
//! "Allowed" is what the portal's bucket lets through in the run's time starting from empty:
//! `50 + 2 × seconds` requests; in calls, what those requests carry at the design's cost of
//! 17 requests per 16 calls (a register each, and one batch finishing 16). pbxgate's own
//! pacing keeps a safety margin (its bucket holds 45 and drains 3 % slower: 1.94/s), shown
//! separately as its ceiling. "Steady" is the part after the initial burst: from the request
//! that left the portal's bucket fullest (replayed from the request times) to the last one,
//! against the 2/s drain. Run with `scripts/bench-bitrix24.sh`.
//! Goal: calls delivered ≥ 95 % of what the limit allows, 0 rejected.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pbxgate::base::secret::Secret;
use pbxgate::config::{Config, CrmKind};
use pbxgate::crm::bitrix24::limiter::LeakyBucket;
use pbxgate::crm::registration::RegistrationState;
use serde_json::json;

use support::fake_bitrix24::{B24Request, FakeCall, APP_TOKEN};
use support::{lab_app, FakeBitrix24, TestApp};

const PBX_TOKEN: &str = "bench-b24-pbx-token-0123456789";
/// The fake portal's bucket (its default, as on most Bitrix24 plans).
const PORTAL_BURST: u32 = 50;
const PORTAL_RPS: f64 = 2.0;
/// pbxgate drains its copy of the bucket this much slower (src/crm/bitrix24/limiter.rs).
const PBXGATE_DRAIN_MARGIN: f64 = 1.03;
/// Calls per finish batch (the adapter's `batch_limit`).
const CALLS_PER_BATCH: f64 = 16.0;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// pbxgate with Bitrix24 as its CRM against `portal`, registered and AMI up.
async fn b24_app(portal: &FakeBitrix24, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let webhook = portal.webhook_url();
    let app = lab_app(|c| {
        c.crm.kind = CrmKind::Bitrix24;
        c.crm.register_on_start = true;
        c.crm.timezone = "Europe/Moscow".into();
        c.bitrix24.webhook_url = Secret::new(webhook);
        c.bitrix24.application_token = Secret::new(APP_TOKEN);
        c.users.clear();
        c.pbx.token = Secret::new(PBX_TOKEN);
        tweak(c);
    })
    .await;
    let state = tokio::time::timeout(
        Duration::from_secs(30),
        app.state
            .registration
            .wait_for(|s| !matches!(s, RegistrationState::Pending | RegistrationState::Failed(_))),
    )
    .await
    .expect("registered with Bitrix24");
    assert_eq!(state, RegistrationState::Registered);
    assert_eq!(
        (
            app.state.config.bitrix24.burst,
            app.state.config.bitrix24.rps
        ),
        (PORTAL_BURST, PORTAL_RPS as u32),
        "pbxgate's bitrix24.burst / rps as the portal's bucket"
    );
    app
}

/// The HTTP requests the portal saw (a batch once, without its sub-calls).
fn http_requests(portal: &FakeBitrix24) -> Vec<B24Request> {
    portal
        .requests()
        .into_iter()
        .filter(|r| !r.in_batch)
        .collect()
}

/// The portal's bucket level just after each request it admitted, replayed from their times
/// (as the fake computes it), and the level now.
fn portal_levels(requests: &[B24Request]) -> (Vec<(Instant, f64)>, f64) {
    let mut level = 0.0f64;
    let mut last: Option<Instant> = None;
    let mut out = Vec::new();
    let admitted = requests
        .iter()
        .filter(|r| r.error.as_deref() != Some("QUERY_LIMIT_EXCEEDED"));
    for r in admitted {
        if let Some(l) = last {
            let drained = r.at.saturating_duration_since(l).as_secs_f64() * PORTAL_RPS;
            level = (level - drained).max(0.0);
        }
        level += 1.0;
        last = Some(r.at);
        out.push((r.at, level));
    }
    let now = last.map_or(0.0, |l| {
        (level - l.elapsed().as_secs_f64() * PORTAL_RPS).max(0.0)
    });
    (out, now)
}

/// Waits until the portal's bucket is empty (the requests of pbxgate's start drained), so that
/// the run gets the whole burst the figures count on.
async fn bucket_empty(portal: &FakeBitrix24) {
    loop {
        let (_, level) = portal_levels(&http_requests(portal));
        if level <= 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_secs_f64(level / PORTAL_RPS + 0.05)).await;
    }
}

/// What one run measured.
struct Run {
    calls: usize,
    /// The run began (the first call went in).
    t0: Instant,
    /// The portal finished the last call.
    t_end: Instant,
    /// The HTTP requests of the run, in arrival order.
    requests: Vec<B24Request>,
    rejected: usize,
    /// Finish sub-calls over all batches.
    finishes_in_batches: usize,
}

impl Run {
    fn of(
        portal: &FakeBitrix24,
        calls: &[FakeCall],
        t0: Instant,
        before: usize,
        rejected_before: usize,
    ) -> Run {
        let all = portal.requests();
        let t_end = calls
            .iter()
            .filter_map(|c| c.finished_at)
            .max()
            .expect("finished calls");
        let run: Vec<B24Request> = all[before..].to_vec();
        Run {
            calls: calls.len(),
            t0,
            t_end,
            finishes_in_batches: run
                .iter()
                .filter(|r| r.in_batch && r.method == "telephony.externalcall.finish")
                .count(),
            requests: run.into_iter().filter(|r| !r.in_batch).collect(),
            rejected: portal.rejected() - rejected_before,
        }
    }

    fn count(&self, method: &str) -> usize {
        self.requests.iter().filter(|r| r.method == method).count()
    }

    fn print(&self, name: &str, pbxgate_burst: u32) {
        let wall = self.t_end.duration_since(self.t0).as_secs_f64();
        let n = self.requests.len();
        let last = self.requests.last().map_or(self.t0, |r| r.at);
        // The portal's allowance over the run (from its start to its last request), from empty.
        let secs = last.duration_since(self.t0).as_secs_f64();
        let allowed = f64::from(PORTAL_BURST) + PORTAL_RPS * secs;
        let ceiling = f64::from(pbxgate_burst) + PORTAL_RPS / PBXGATE_DRAIN_MARGIN * secs;
        let per_call = 1.0 + 1.0 / CALLS_PER_BATCH;
        let allowed_calls = allowed / per_call;
        let registers = self.count("telephony.externalcall.register");
        let batches = self.count("batch");
        let other = n - registers - batches;
        let calls_per_request = self.calls as f64 / n as f64;
        let calls_ratio = self.calls as f64 / allowed_calls * 100.0;
        println!(
            "{name}: {} calls in {wall:.1} s (first call in to last finish) = {:.2} calls/s; rejected {}",
            self.calls,
            self.calls as f64 / wall,
            self.rejected
        );
        println!(
            "  requests at the portal: {n} ({registers} register, {batches} batch carrying {} finishes = {:.1} calls per batch, {other} other) = {calls_per_request:.3} calls per request (the design's best: {:.3})",
            self.finishes_in_batches,
            self.finishes_in_batches as f64 / batches.max(1) as f64,
            1.0 / per_call,
        );
        println!(
            "  allowed in the {secs:.1} s to the last request: {PORTAL_BURST} + {PORTAL_RPS} × {secs:.1} = {allowed:.1} requests; sent {n} = {:.1} %",
            n as f64 / allowed * 100.0
        );
        println!(
            "  pbxgate's ceiling with its margin: {pbxgate_burst} + {:.3} × {secs:.1} = {ceiling:.1} requests ({:.1} % of allowed); sent {:.1} % of it",
            PORTAL_RPS / PBXGATE_DRAIN_MARGIN,
            ceiling / allowed * 100.0,
            n as f64 / ceiling * 100.0
        );
        println!(
            "  calls: {} of the {allowed_calls:.1} the allowed requests carry at 17 requests per 16 calls = {calls_ratio:.1} %",
            self.calls
        );
        // Steady: from when the portal's bucket was fullest (pbxgate's burst spent, and the
        // requests the bucket drained meanwhile caught up) to the last request.
        let (levels, _) = portal_levels(&self.requests);
        let peak = levels
            .iter()
            .enumerate()
            .max_by(|a, b| a.1 .1.total_cmp(&b.1 .1))
            .map(|(i, (at, level))| (i, *at, *level));
        if let Some((i, from, level)) = peak {
            println!(
                "  the portal's bucket peaked at {level:.1} of {PORTAL_BURST} (request #{})",
                i + 1
            );
            let steady = n - 1 - i;
            let steady_secs = last.duration_since(from).as_secs_f64();
            if steady >= 10 && steady_secs > 0.0 {
                let rate = steady as f64 / steady_secs;
                let own = PORTAL_RPS / PBXGATE_DRAIN_MARGIN;
                println!(
                    "  steady (after that peak): {steady} requests in {steady_secs:.1} s = {rate:.3} rps = {:.1} % of the portal's {PORTAL_RPS} rps ({:.1} % of pbxgate's {own:.3}); ≈ {:.2} calls/s at {calls_per_request:.3} calls per request",
                    rate / PORTAL_RPS * 100.0,
                    rate / own * 100.0,
                    rate * calls_per_request
                );
            } else {
                println!("  steady: none (the run fit in the burst)");
            }
        }
        let met = calls_ratio >= 95.0 && self.rejected == 0;
        println!(
            "  goal (calls >= 95 % of what the limit allows, 0 rejected): {}",
            if met { "met" } else { "NOT met" }
        );
    }
}

/// The portal's calls with these external ids, once all are finished (at most `limit`).
async fn all_finished(
    portal: &FakeBitrix24,
    ids: &HashSet<String>,
    limit: Duration,
) -> Vec<FakeCall> {
    let deadline = Instant::now() + limit;
    loop {
        let calls: Vec<FakeCall> = portal
            .calls()
            .into_iter()
            .filter(|c| c.external_call_id.as_ref().is_some_and(|e| ids.contains(e)))
            .collect();
        let done = calls.iter().filter(|c| c.is_finished()).count();
        if done == ids.len() {
            return calls;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {} calls finished within {limit:?} ({} registered, {} rejected)",
            ids.len(),
            calls.len(),
            portal.rejected()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Seconds a run of `requests` requests should take at the portal's drain rate, with room.
fn limit_for(requests: f64) -> Duration {
    Duration::from_secs_f64(requests / PORTAL_RPS * 2.0 + 60.0)
}

async fn history(calls: usize, pbxgate_burst: u32) {
    let portal = FakeBitrix24::start().await;
    let app = b24_app(&portal, |_| {}).await;
    bucket_empty(&portal).await;
    let before = portal.requests().len();
    let rejected_before = portal.rejected();
    let ids: HashSet<String> = (0..calls).map(|i| format!("bench-b24-{i:05}")).collect();
    let t0 = Instant::now();
    // 16 producers: all of them are queued well within the uploader's 1 s batching window.
    let producers = 16;
    let tasks: Vec<_> = (0..producers)
        .map(|p| {
            let outbox = app.state.outbox.clone();
            tokio::spawn(async move {
                for i in (p..calls).step_by(producers) {
                    let mut r = support::call_record(
                        &format!("bench-b24-{i:05}"),
                        support::T0 + i as i64 * 1000,
                    );
                    r.linkedid = format!("1795255200.{i}");
                    outbox.enqueue(r).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let queued = t0.elapsed();
    let done = all_finished(&portal, &ids, limit_for(calls as f64 * 1.1)).await;
    let run = Run::of(&portal, &done, t0, before, rejected_before);
    tokio::time::timeout(
        Duration::from_secs(30),
        app.state
            .outbox
            .wait_until(|s| s.pending == 0 && s.in_flight == 0),
    )
    .await
    .expect("outbox settled");
    let status = app.state.outbox.status();
    println!(
        "\n1. history: {calls} answered inbound calls (extension 101, no live register) queued at once (in {:.2} s), drained by the uploader",
        queued.as_secs_f64()
    );
    run.print("history", pbxgate_burst);
    println!(
        "  outbox: {} uploaded, {} dead, {} failed attempts; {} of {calls} registered with SHOW = 0",
        status.uploaded_total,
        status.dead,
        status.failed_attempts,
        done.iter().filter(|c| !c.show).count()
    );
    app.stop().await;
    portal.stop().await;
}

async fn post(app: &TestApp, body: serde_json::Value) {
    let r = app
        .http
        .post(app.url("/pbx/events"))
        .bearer_auth(PBX_TOKEN)
        .json(&body)
        .send()
        .await
        .expect("POST /pbx/events");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

/// `interval`: upload the history only every so often (`history.immediate = false`).
async fn live(calls: usize, ahead: usize, interval: Option<Duration>, pbxgate_burst: u32) {
    let portal = FakeBitrix24::start().await;
    let app = b24_app(&portal, |c| {
        if let Some(every) = interval {
            c.history.immediate = false;
            c.history.interval = every;
        }
    })
    .await;
    // The directory is loaded before the first event would need it (it counts no request of
    // the run then).
    portal
        .wait_for(Duration::from_secs(10), "user.get", |p| {
            (!p.requests_of("user.get").is_empty()).then_some(())
        })
        .await;
    bucket_empty(&portal).await;
    let before = portal.requests().len();
    let rejected_before = portal.rejected();
    let stats = app.state.tracker_stats.clone();
    let (late0, failed0) = (
        stats.live_events_late.load(Ordering::Relaxed),
        stats.live_events_failed.load(Ordering::Relaxed),
    );
    let id = |i: usize| format!("b24-live-{i:05}");
    let ids: HashSet<String> = (0..calls).map(|i| format!("lab-{}", id(i))).collect();
    let t0 = Instant::now();
    let deadline = t0 + limit_for(calls as f64 * 2.2);
    let mut ringing: VecDeque<usize> = VecDeque::new();
    let mut next = 0;
    let mut most_ahead = 0;
    while next < calls || !ringing.is_empty() {
        let registered: HashSet<String> = portal
            .calls()
            .into_iter()
            .filter_map(|c| c.external_call_id)
            .collect();
        let mut still = VecDeque::new();
        for i in ringing.drain(..) {
            if registered.contains(&format!("lab-{}", id(i))) {
                post(
                    &app,
                    json!([
                        {"call_id": id(i), "event": "answer", "extension": "101"},
                        {"call_id": id(i), "event": "hangup"}
                    ]),
                )
                .await;
            } else {
                still.push_back(i);
            }
        }
        ringing = still;
        while ringing.len() < ahead && next < calls {
            post(
                &app,
                json!([
                    {"call_id": id(next), "event": "start", "direction": "in", "phone": format!("+7999{:07}", next), "did": "+74951234567"},
                    {"call_id": id(next), "event": "ringing", "extension": "101"}
                ]),
            )
            .await;
            ringing.push_back(next);
            next += 1;
        }
        most_ahead = most_ahead.max(ringing.len());
        assert!(
            Instant::now() < deadline,
            "live: {} calls still ringing unregistered after {:?} ({next} offered, {} rejected)",
            ringing.len(),
            t0.elapsed(),
            portal.rejected()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done = all_finished(&portal, &ids, limit_for(calls as f64 * 0.2)).await;
    let run = Run::of(&portal, &done, t0, before, rejected_before);
    let (number, history) = match interval {
        None => ("2", "the history uploaded as calls end (the default)".to_string()),
        Some(every) => (
            "3",
            format!(
                "history.immediate = false, history.interval = {} s (finishes, and the cards they close, wait up to that)",
                every.as_secs_f64()
            ),
        ),
    };
    println!(
        "\n{number}. live: {calls} calls through POST /pbx/events (start + ringing 101, answer + hangup once registered), offered with {ahead} ringing unregistered at a time; {history}"
    );
    run.print("live", pbxgate_burst);
    println!(
        "  live registers (SHOW = 1, card shown): {} of {calls}; by the history path (SHOW = 0): {}; live events late {} / failed {}; most calls ringing unregistered at once: {most_ahead}",
        done.iter().filter(|c| c.show).count(),
        done.iter().filter(|c| !c.show).count(),
        stats.live_events_late.load(Ordering::Relaxed) - late0,
        stats.live_events_failed.load(Ordering::Relaxed) - failed0,
    );
    app.stop().await;
    portal.stop().await;
}

#[tokio::main]
async fn main() {
    let calls = env("CALLS", 400);
    let live_calls = env("LIVE", 120);
    let ahead = env("LIVE_AHEAD", 3).max(1);
    let pbxgate_burst = LeakyBucket::new(PORTAL_RPS as u32, PORTAL_BURST).capacity();
    println!(
        "Bitrix24 at the portal's limit; {} cores. The fake portal's bucket: {PORTAL_BURST} requests, draining {PORTAL_RPS}/s (503 QUERY_LIMIT_EXCEEDED above).",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "pbxgate paces to a bucket of {pbxgate_burst} draining {:.3}/s (10 % of the portal's bucket and 3 % of its rate left to others).",
        PORTAL_RPS / PBXGATE_DRAIN_MARGIN
    );
    println!(
        "\"allowed\": requests the portal's bucket lets through in the run's time from empty = {PORTAL_BURST} + {PORTAL_RPS} × seconds; \
         in calls, what they carry at 17 requests per 16 calls (a register each, one batch finishing 16)."
    );
    if calls > 0 {
        history(calls, pbxgate_burst).await;
    }
    if live_calls > 0 {
        live(live_calls, ahead, None, pbxgate_burst).await;
        let every = env("LIVE_INTERVAL", 0);
        if every > 0 {
            let every = Some(Duration::from_secs(every as u64));
            live(live_calls, ahead, every, pbxgate_burst).await;
        }
    }
}
