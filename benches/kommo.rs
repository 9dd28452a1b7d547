//! Kommo at the account's rate limit: calls per second pbxgate delivers to the strict fake
//! account (tests/support/fake_kommo.rs) at its default limit, 7 admitted API requests in any
//! sliding second, which answers 429 above that. pbxgate runs in this process
//! (`Application::build_with_listener`, a long-lived token, 101 → Anna, 102 → Boris).
//!
//! 1. History: CALLS (default 300) answered inbound calls of extension 101 from a number a
//!    contact has, queued into the outbox at once and drained by the real uploader: each call
//!    is exactly one `POST /api/v4/calls` (the adapter sends one call per request).
//! 2. Live: LIVE (default 100) calls through `POST /pbx/events`, each from its own number that
//!    a contact has: start + ringing 101 (a pop-up, `POST /api/v2/events`, to Anna), then, once
//!    the account has the pop-up, answer + hangup (its `POST /api/v4/calls` through the
//!    outbox): two requests per call. The calls are offered in a closed loop: LIVE_AHEAD
//!    (default 3) calls are ringing without their pop-up at any time, so pbxgate always has
//!    work waiting for its window while each pop-up is still within the 5 s live deadline.
//!
//! KOMMO_RPS (default 7, the account's limit) sets pbxgate's `kommo.rps`; the fake account
//! keeps its 7 per second whatever it is (to see what a higher setting gives, and whether it
//! is refused).
//!
//! Each run starts on a fresh account whose window is empty (pbxgate's start request more than
//! a window ago). Figures: wall time (first call in to the last call logged), calls/s, the
//! requests the account saw by kind, rejected (429) requests. "Allowed" is what a sliding
//! 1-second window of 7 admits from empty between the run's first and last request:
//! `7 × (⌊seconds⌋ + 1)`. pbxgate's own limiter (src/crm/kommo/limiter.rs) sends at most
//! `kommo.rps − 1` requests in any 1.05 s, i.e. 6/1.05 = 5.714 rps for 7: its ceiling, shown
//! separately. "Steady" leaves out the first window (its burst): from the first request
//! pbxgate's window held back (#L+1, L = its window's limit) over whole windows of L to the
//! last such point, so the span starts and ends at the same point of the pattern. "Tightest":
//! the shortest span of 8 admitted requests (the account refuses the 8th below 1 s); its excess
//! over a second is the room that was left for the network to bunch requests up.
//! Run with `scripts/bench-kommo.sh`.
//! Goal: requests (so calls) delivered at ≥ 95 % of the 7 rps limit, 0 rejected.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pbxgate::base::secret::Secret;
use pbxgate::config::{Config, CrmKind, UserCode};
use pbxgate::crm::kommo::limiter::{Window, WINDOW};
use pbxgate::crm::registration::RegistrationState;
use serde_json::json;

use support::fake_kommo::{last10, KommoRequest, ANNA, BORIS, CLIENT_SECRET, LONG_LIVED_TOKEN};
use support::{lab_app, FakeKommo, TestApp};

const PBX_TOKEN: &str = "bench-kommo-pbx-token-0123456789";
/// The fake account's limit (its default, Kommo's documented 7 per second).
const ACCOUNT_RPS: usize = 7;
/// The number every history call comes from (`support::call_record`).
const HISTORY_PHONE: &str = "+79991234567";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// pbxgate with Kommo as its CRM against `kommo`, registered and AMI up.
async fn kommo_app(kommo: &FakeKommo, rps: u32) -> TestApp {
    let base = kommo.url.clone();
    let app = lab_app(|c: &mut Config| {
        c.crm.kind = CrmKind::Kommo;
        c.crm.register_on_start = true;
        c.kommo.base_url = base;
        c.kommo.long_lived_token = Secret::new(LONG_LIVED_TOKEN);
        c.kommo.client_secret = Secret::new(CLIENT_SECRET);
        c.kommo.rps = rps;
        c.users = vec![
            UserCode {
                user_id: ANNA as u64,
                code: "101".into(),
            },
            UserCode {
                user_id: BORIS as u64,
                code: "102".into(),
            },
        ];
        c.pbx.token = Secret::new(PBX_TOKEN);
    })
    .await;
    let state = tokio::time::timeout(
        Duration::from_secs(30),
        app.state
            .registration
            .wait_for(|s| !matches!(s, RegistrationState::Pending | RegistrationState::Failed(_))),
    )
    .await
    .expect("registered with Kommo");
    assert_eq!(state, RegistrationState::Registered);
    assert_eq!(app.state.config.kommo.rps, rps);
    app
}

/// The API requests the account saw (the ones its window counts).
fn api_requests(kommo: &FakeKommo) -> Vec<KommoRequest> {
    kommo
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/api/"))
        .collect()
}

/// Waits until both windows are empty: the account's (1 s) and pbxgate's (1.05 s) since the
/// last API request, so the run starts on a clean slate.
async fn windows_empty(kommo: &FakeKommo) {
    loop {
        let Some(last) = api_requests(kommo).last().map(|r| r.at) else {
            return;
        };
        let quiet = WINDOW + Duration::from_millis(50);
        let since = last.elapsed();
        if since >= quiet {
            return;
        }
        tokio::time::sleep(quiet - since).await;
    }
}

/// The most requests of `at` (sorted) in any sliding second.
fn most_in_a_second(at: &[Instant]) -> usize {
    let mut most = 0;
    let mut from = 0;
    for (i, t) in at.iter().enumerate() {
        while t.duration_since(at[from]) >= Duration::from_secs(1) {
            from += 1;
        }
        most = most.max(i + 1 - from);
    }
    most
}

/// The shortest time `at` (sorted) took for `ACCOUNT_RPS + 1` requests: below a second the
/// account refuses the last of them, so this minus a second is the margin that was left.
fn tightest_span(at: &[Instant]) -> Option<Duration> {
    at.windows(ACCOUNT_RPS + 1)
        .map(|w| w[ACCOUNT_RPS].duration_since(w[0]))
        .min()
}

/// What one run measured.
struct Run {
    calls: usize,
    /// The run began (the first call went in).
    t0: Instant,
    /// The account logged the last call (the arrival of its admitted request).
    t_end: Instant,
    /// The run's API requests, in arrival order (refused ones included).
    requests: Vec<KommoRequest>,
    rejected: usize,
    /// pbxgate's `kommo.rps` and its window's limit (requests per [`WINDOW`]).
    rps: u32,
    limit: usize,
}

impl Run {
    fn of(kommo: &FakeKommo, calls: usize, t0: Instant, before: usize, rps: u32) -> Run {
        let requests: Vec<KommoRequest> = kommo.requests()[before..]
            .iter()
            .filter(|r| r.path.starts_with("/api/"))
            .cloned()
            .collect();
        let t_end = requests
            .iter()
            .filter(|r| r.path == "/api/v4/calls" && r.status == 200)
            .map(|r| r.at)
            .max()
            .expect("calls logged");
        Run {
            calls,
            t0,
            t_end,
            rejected: requests.iter().filter(|r| r.status == 429).count(),
            requests,
            rps,
            limit: Window::new(rps).limit(),
        }
    }

    fn count(&self, path: &str) -> usize {
        self.requests.iter().filter(|r| r.path == path).count()
    }

    fn print(&self, name: &str) {
        let wall = self.t_end.duration_since(self.t0).as_secs_f64();
        let n = self.requests.len();
        let calls_per_request = self.calls as f64 / n as f64;
        println!(
            "{name}: {} calls in {wall:.1} s (first call in to the last call logged) = {:.2} calls/s; rejected (429) {}",
            self.calls,
            self.calls as f64 / wall,
            self.rejected
        );
        let logged = self.count("/api/v4/calls");
        let popups = self.count("/api/v2/events");
        println!(
            "  requests at the account: {n} ({logged} POST /api/v4/calls, {popups} POST /api/v2/events, {} other) = {calls_per_request:.3} calls per request",
            n - logged - popups
        );
        let (Some(first), Some(last)) = (self.requests.first(), self.requests.last()) else {
            return;
        };
        let secs = last.at.duration_since(first.at).as_secs_f64();
        println!(
            "  first call in to the first request: {:.2} s{}; first to last request: {secs:.1} s = {:.3} rps",
            first.at.duration_since(self.t0).as_secs_f64(),
            if first.path == "/api/v4/calls" {
                " (the uploader's batching window)"
            } else {
                ""
            },
            (n - 1) as f64 / secs
        );
        let allowed = ACCOUNT_RPS * (secs.floor() as usize + 1);
        let ceiling = self.limit as f64 / WINDOW.as_secs_f64();
        println!(
            "  allowed from empty in those {secs:.1} s: {ACCOUNT_RPS} × ({} + 1) = {allowed} requests; sent {n} = {:.1} %",
            secs.floor(),
            n as f64 / allowed as f64 * 100.0
        );
        let admitted: Vec<Instant> = self
            .requests
            .iter()
            .filter(|r| r.status != 429)
            .map(|r| r.at)
            .collect();
        println!(
            "  most admitted in any sliding second: {} of the account's {ACCOUNT_RPS}; pbxgate's window (kommo.rps = {}): {} per {:.2} s = {ceiling:.3} rps ceiling = {:.1} % of {ACCOUNT_RPS} rps",
            most_in_a_second(&admitted),
            self.rps,
            self.limit,
            WINDOW.as_secs_f64(),
            ceiling / ACCOUNT_RPS as f64 * 100.0
        );
        if let Some(span) = tightest_span(&admitted) {
            println!(
                "  tightest {} admitted requests: {:.0} ms apart (the account refuses the last of them below 1000 ms): a margin of {:.0} ms",
                ACCOUNT_RPS + 1,
                span.as_secs_f64() * 1000.0,
                (span.as_secs_f64() - 1.0) * 1000.0
            );
        }
        // Steady: whole windows of `limit` from the first request the window held back.
        let l = self.limit;
        let q = (n - 1) / l;
        let steady_rate = if q >= 3 {
            let (from, to) = (self.requests[l].at, self.requests[l * q].at);
            let count = l * (q - 1);
            let span = to.duration_since(from).as_secs_f64();
            let rate = count as f64 / span;
            println!(
                "  steady (request #{} to #{}, {} whole windows of {l}): {count} requests in {span:.1} s = {rate:.3} rps = {:.1} % of the account's {ACCOUNT_RPS} rps ({:.1} % of pbxgate's {ceiling:.3}); ≈ {:.2} calls/s at {calls_per_request:.3} calls per request",
                l + 1,
                l * q + 1,
                q - 1,
                rate / ACCOUNT_RPS as f64 * 100.0,
                rate / ceiling * 100.0,
                rate * calls_per_request
            );
            Some(rate)
        } else {
            println!("  steady: none (the run fit in a few windows)");
            None
        };
        let ratio = steady_rate.map_or(0.0, |r| r / ACCOUNT_RPS as f64 * 100.0);
        let met = ratio >= 95.0 && self.rejected == 0;
        println!(
            "  goal (steady requests >= 95 % of {ACCOUNT_RPS} rps, 0 rejected): {}{}",
            if met { "met" } else { "NOT met" },
            if !met && self.rejected == 0 && ceiling / (ACCOUNT_RPS as f64) < 0.95 {
                format!(
                    " — pbxgate's own ceiling at kommo.rps = {} is {:.1} % of the limit",
                    self.rps,
                    ceiling / ACCOUNT_RPS as f64 * 100.0
                )
            } else {
                String::new()
            }
        );
    }
}

/// Waits until the account logged a call for each of `ids` (its `uniq`), at most `limit`.
async fn all_logged(kommo: &FakeKommo, ids: &HashSet<String>, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let calls = kommo.calls();
        let done = calls
            .iter()
            .filter_map(|c| c["uniq"].as_str())
            .filter(|u| ids.contains(*u))
            .count();
        if done >= ids.len() {
            assert_eq!(done, ids.len(), "a call was logged twice");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {} calls logged within {limit:?} ({} rejected)",
            ids.len(),
            kommo.rejected()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Seconds a run of `requests` requests should take at pbxgate's pace, with room.
fn limit_for(requests: f64, limit: usize) -> Duration {
    Duration::from_secs_f64(requests / limit as f64 * WINDOW.as_secs_f64() * 2.0 + 30.0)
}

async fn settled(app: &TestApp) {
    tokio::time::timeout(
        Duration::from_secs(30),
        app.state
            .outbox
            .wait_until(|s| s.pending == 0 && s.in_flight == 0),
    )
    .await
    .expect("outbox settled");
}

async fn history(calls: usize, rps: u32) {
    let kommo = FakeKommo::start().await;
    let contact = kommo.add_contact("Ivan", HISTORY_PHONE, BORIS);
    let app = kommo_app(&kommo, rps).await;
    windows_empty(&kommo).await;
    let before = kommo.requests().len();
    let ids: HashSet<String> = (0..calls).map(|i| format!("bench-kommo-{i:05}")).collect();
    let t0 = Instant::now();
    let producers = 16;
    let tasks: Vec<_> = (0..producers)
        .map(|p| {
            let outbox = app.state.outbox.clone();
            tokio::spawn(async move {
                for i in (p..calls).step_by(producers) {
                    let mut r = support::call_record(
                        &format!("bench-kommo-{i:05}"),
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
    let limit = Window::new(rps).limit();
    all_logged(&kommo, &ids, limit_for(calls as f64, limit)).await;
    let run = Run::of(&kommo, calls, t0, before, rps);
    settled(&app).await;
    let status = app.state.outbox.status();
    let on_contact = kommo
        .calls()
        .iter()
        .filter(|c| c["entity_type"] == "contacts" && c["entity_id"] == contact)
        .count();
    println!(
        "\n1. history: {calls} answered inbound calls (extension 101, from {HISTORY_PHONE}, a contact's number) queued at once (in {:.2} s), drained by the uploader",
        queued.as_secs_f64()
    );
    run.print("history");
    println!(
        "  outbox: {} uploaded, {} dead, {} failed attempts; {on_contact} of {calls} calls on the contact",
        status.uploaded_total, status.dead, status.failed_attempts
    );
    app.stop().await;
    kommo.stop().await;
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

fn live_phone(i: usize) -> String {
    format!("+7998{i:07}")
}

async fn live(calls: usize, ahead: usize, rps: u32) {
    let kommo = FakeKommo::start().await;
    for i in 0..calls {
        kommo.add_contact(&format!("Client {i}"), &live_phone(i), BORIS);
    }
    let app = kommo_app(&kommo, rps).await;
    windows_empty(&kommo).await;
    let before = kommo.requests().len();
    let stats = app.state.tracker_stats.clone();
    let (late0, failed0) = (
        stats.live_events_late.load(Ordering::Relaxed),
        stats.live_events_failed.load(Ordering::Relaxed),
    );
    let id = |i: usize| format!("kommo-live-{i:05}");
    let ids: HashSet<String> = (0..calls).map(|i| format!("lab-{}", id(i))).collect();
    let limit = Window::new(rps).limit();
    let t0 = Instant::now();
    let deadline = t0 + limit_for(calls as f64 * 2.0, limit);
    let mut ringing: VecDeque<usize> = VecDeque::new();
    let mut next = 0;
    let mut most_ahead = 0;
    while next < calls || !ringing.is_empty() {
        let popped: HashSet<String> = kommo
            .events()
            .iter()
            .filter_map(|e| e["phone_number"].as_str().map(last10))
            .collect();
        let mut still = VecDeque::new();
        for i in ringing.drain(..) {
            if popped.contains(&last10(&live_phone(i))) {
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
                    {"call_id": id(next), "event": "start", "direction": "in", "phone": live_phone(next), "did": "+74951234567"},
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
            "live: {} calls still ringing without a pop-up after {:?} ({next} offered, {} rejected)",
            ringing.len(),
            t0.elapsed(),
            kommo.rejected()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    all_logged(&kommo, &ids, limit_for(calls as f64, limit)).await;
    let run = Run::of(&kommo, calls, t0, before, rps);
    settled(&app).await;
    println!(
        "\n2. live: {calls} calls through POST /pbx/events (start + ringing 101, answer + hangup once the pop-up is in), each from its own contact's number, offered with {ahead} ringing without a pop-up at a time"
    );
    run.print("live");
    let popups = kommo.events().len();
    println!(
        "  pop-ups at the account: {popups} of {calls} (all to Anna: {}); live events late {} / failed {}; most calls ringing without a pop-up at once: {most_ahead}",
        kommo.events().iter().all(|e| e["users"] == json!([ANNA])),
        stats.live_events_late.load(Ordering::Relaxed) - late0,
        stats.live_events_failed.load(Ordering::Relaxed) - failed0,
    );
    app.stop().await;
    kommo.stop().await;
}

#[tokio::main]
async fn main() {
    let calls = env("CALLS", 300);
    let live_calls = env("LIVE", 100);
    let ahead = env("LIVE_AHEAD", 3).max(1);
    let rps = u32::try_from(env("KOMMO_RPS", ACCOUNT_RPS)).unwrap_or(7);
    let window = Window::new(rps);
    let ceiling = window.limit() as f64 / WINDOW.as_secs_f64();
    println!(
        "Kommo at the account's limit; {} cores. The fake account admits {ACCOUNT_RPS} API requests in any sliding second (429 above).",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "pbxgate (kommo.rps = {rps}) sends at most {} requests in any {:.2} s = {ceiling:.3} rps = {:.1} % of {ACCOUNT_RPS} rps.",
        window.limit(),
        WINDOW.as_secs_f64(),
        ceiling / ACCOUNT_RPS as f64 * 100.0
    );
    println!(
        "\"allowed\": what a sliding second of {ACCOUNT_RPS} admits from empty between a run's first and last request = {ACCOUNT_RPS} × (⌊seconds⌋ + 1)."
    );
    if calls > 0 {
        history(calls, rps).await;
    }
    if live_calls > 0 {
        live(live_calls, ahead, rps).await;
    }
}
