//! Prometheus metrics (`GET /metrics`, text format 0.0.4), every family prefixed `pbxgate_`.
//!
//! Most numbers are the counters the modules keep anyway (the ones `/ready` shows): they are
//! read when Prometheus scrapes, never counted twice. What nobody counted before is counted
//! here ([`Metrics`]: finished calls by direction and outcome, recording bytes served; the
//! outbox's [`UploadCounts`]) or next to the code it measures ([`Histogram`]s of routing
//! lookups, the CRM client's [`CrmRequests`]). All of it is atomics: the AMI ingest and the
//! routing lookup take no lock for metrics.
//!
//! Labels are bounded: directions, outcomes, sources, configured hook points, endpoint path
//! templates and HTTP statuses; never a phone number, an id or a key.
//!
//! The encoding is `prometheus-client`'s: one registry per scrape, holding a collector of the
//! values read (so that several services in one process, as in the tests, never mix numbers).

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub use crate::base::latency::{CrmRequests, Histogram, HistogramSnapshot, LATENCY_BOUNDS};

use crate::calls::{CallRecord, Direction, Outcome};
use crate::crm::Crm;
use crate::hooks::Hooks;
use crate::outbox::Outbox;
use crate::pbx::ami::AmiClient;
use crate::pipeline::{CallSink, TrackerStats};
use crate::records::Records;
use crate::routing::{Router, Source};

/// The `Content-Type` of what [`render`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

const DIRECTIONS: [Direction; 3] = [Direction::In, Direction::Out, Direction::Internal];
const OUTCOMES: [Outcome; 6] = [
    Outcome::Answered,
    Outcome::NoAnswer,
    Outcome::Busy,
    Outcome::Failed,
    Outcome::NotAllowed,
    Outcome::Unknown,
];

fn direction_label(d: Direction) -> &'static str {
    match d {
        Direction::In => "in",
        Direction::Out => "out",
        Direction::Internal => "internal",
    }
}

fn outcome_label(o: Outcome) -> &'static str {
    match o {
        Outcome::Answered => "answered",
        Outcome::NoAnswer => "no_answer",
        Outcome::Busy => "busy",
        Outcome::Failed => "failed",
        Outcome::NotAllowed => "not_allowed",
        Outcome::Unknown => "unknown",
    }
}

/// What the service counts for metrics alone. A [`CallSink`]: every finished call passes it.
#[derive(Debug, Default)]
pub struct Metrics {
    calls: [[AtomicU64; OUTCOMES.len()]; DIRECTIONS.len()],
    /// Finished calls kept from the CRM (rules, `need_registration`, employees' mobiles).
    calls_ignored: AtomicU64,
    record_bytes: AtomicU64,
}

impl Metrics {
    /// Bytes of recordings sent to clients.
    pub fn record_bytes_served(&self, n: u64) {
        self.record_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Finished calls of this direction and outcome so far.
    pub fn calls_finished(&self, direction: Direction, outcome: Outcome) -> u64 {
        self.calls[direction as usize][outcome as usize].load(Ordering::Relaxed)
    }
}

impl CallSink for Metrics {
    fn accept(&self, record: CallRecord) {
        self.calls[record.direction as usize][record.outcome as usize]
            .fetch_add(1, Ordering::Relaxed);
        if record.ignored {
            self.calls_ignored.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Everything a scrape reads.
pub struct Sources<'a> {
    pub metrics: &'a Metrics,
    pub ami: &'a AmiClient,
    pub tracker: &'a TrackerStats,
    pub outbox: &'a Outbox,
    /// The outbox's status, as read for this scrape.
    pub history: &'a crate::outbox::Status,
    pub router: &'a Router,
    pub hooks: &'a Hooks,
    pub records: &'a Records,
    pub crm: &'a dyn Crm,
    /// Client connections open, and refused so far.
    pub connections: (usize, u64),
    pub uptime_seconds: u64,
    /// What `/ready` answers now.
    pub ready: bool,
}

/// The metrics in Prometheus' text format.
pub fn render(s: &Sources<'_>) -> String {
    let mut families = Families::default();
    let relaxed = |n: &AtomicU64| n.load(Ordering::Relaxed);

    families.gauge(
        "build_info",
        "The running version (always 1)",
        vec![(vec![("version", env!("CARGO_PKG_VERSION").to_string())], 1)],
    );
    families.gauge1(
        "uptime_seconds",
        "Seconds since the service started",
        s.uptime_seconds,
    );
    families.gauge1(
        "ready",
        "1 when /ready answers 200, 0 when 503",
        u64::from(s.ready),
    );

    // The AMI link and its events.
    let ami = s.ami.counters();
    let backlog = s.ami.backlog();
    families.gauge1(
        "ami_link_up",
        "1 while the AMI session is logged in",
        u64::from(s.ami.state().is_connected()),
    );
    families.counter1(
        "ami_sessions",
        "AMI sessions logged in (the first and every reconnect)",
        relaxed(&ami.sessions),
    );
    families.counter1(
        "ami_reconnects",
        "AMI sessions logged in after the first one",
        relaxed(&ami.sessions).saturating_sub(1),
    );
    families.counter1(
        "ami_disconnects",
        "AMI sessions that were lost",
        relaxed(&ami.disconnects),
    );
    families.counter1(
        "ami_connect_failures",
        "AMI connection or login attempts that failed",
        relaxed(&ami.connect_failures),
    );
    families.counter1(
        "ami_events_read",
        "AMI events read from Asterisk",
        relaxed(&ami.events),
    );
    families.counter1(
        "ami_events_handled",
        "AMI events the call tracker handled",
        relaxed(&s.tracker.ami_events),
    );
    families.counter1(
        "ami_events_dropped",
        "AMI events dropped because the backlog was full (ami.max_backlog)",
        backlog.dropped,
    );
    families.counter1(
        "ami_skipped_frames",
        "AMI frames skipped as malformed or oversized",
        relaxed(&ami.skipped_frames),
    );
    families.gauge1(
        "ami_backlog",
        "AMI events read and waiting for the call tracker",
        backlog.waiting,
    );
    families.counter1(
        "call_resyncs",
        "Times the call tracker resynced with CoreShowChannels",
        relaxed(&s.tracker.resyncs),
    );

    // Calls.
    let mut finished = Vec::new();
    for d in DIRECTIONS {
        for o in OUTCOMES {
            finished.push((
                vec![
                    ("direction", direction_label(d).to_string()),
                    ("outcome", outcome_label(o).to_string()),
                ],
                s.metrics.calls_finished(d, o),
            ));
        }
    }
    families.counter(
        "calls_finished",
        "Calls finished, by direction and outcome",
        finished,
    );
    families.counter1(
        "calls_ignored",
        "Finished calls kept from the CRM (registration rules, need_registration)",
        relaxed(&s.metrics.calls_ignored),
    );
    families.gauge1(
        "calls_live",
        "Calls in progress",
        relaxed(&s.tracker.live_calls),
    );
    families.counter1(
        "live_events_sent",
        "Live call events (pop-ups, hangups) the CRM took",
        relaxed(&s.tracker.live_events_sent),
    );
    families.counter(
        "live_events_dropped",
        "Live call events not delivered, by reason",
        vec![
            (
                vec![("reason", "late".into())],
                relaxed(&s.tracker.live_events_late),
            ),
            (
                vec![("reason", "failed".into())],
                relaxed(&s.tracker.live_events_failed),
            ),
            (
                vec![("reason", "queue_full".into())],
                relaxed(&s.tracker.live_events_dropped),
            ),
            (
                vec![("reason", "no_popup".into())],
                relaxed(&s.tracker.hangups_without_popup),
            ),
        ],
    );

    // The call history queue.
    let status = s.history;
    families.counter(
        "uploads",
        "Finished calls handed to the CRM, by what became of each",
        s.outbox
            .upload_counts()
            .all()
            .into_iter()
            .map(|(outcome, n)| (vec![("outcome", outcome.to_string())], n))
            .collect(),
    );
    families.gauge1(
        "queue_pending",
        "Calls waiting to be uploaded",
        status.pending,
    );
    families.gauge1(
        "queue_in_flight",
        "Calls in the upload under way",
        status.in_flight,
    );
    families.gauge1(
        "queue_dead",
        "Calls set aside (refused or held)",
        status.dead,
    );
    families.gauge1(
        "queue_oldest_pending_age_seconds",
        "Age of the oldest call waiting to be uploaded (0 when none waits)",
        status.oldest_pending_age_seconds.unwrap_or(0).max(0) as u64,
    );
    families.gauge1(
        "queue_blocked",
        "1 while uploading is stopped for a reason only an operator can fix",
        u64::from(status.blocked.is_some()),
    );

    // The CRM.
    families.gauge1(
        "crm_configured",
        "1 when a CRM API key is configured",
        u64::from(s.crm.is_configured()),
    );
    let requests = s.crm.requests();
    families.gauge1(
        "crm_key_rejected",
        "1 while the CRM's last answer refused the API key or the account",
        u64::from(requests.is_some_and(|r| r.rejected().is_some())),
    );
    families.histogram(
        "crm_request_duration_seconds",
        "CRM API requests, by endpoint (path template) and HTTP status (none: no answer)",
        requests
            .map(|r| r.snapshot())
            .unwrap_or_default()
            .into_iter()
            .map(|(endpoint, status, h)| {
                let status = status.map_or_else(|| "none".to_string(), |s| s.to_string());
                (
                    vec![("endpoint", endpoint.to_string()), ("status", status)],
                    h,
                )
            })
            .collect(),
    );

    // Routing.
    let route = s.router.stats();
    families.histogram(
        "route_lookup_duration_seconds",
        "Routing lookups (/pbx/route, FastAGI), by the answer's source; _count is the number",
        Source::ALL
            .iter()
            .map(|src| {
                (
                    vec![("source", src.as_str().to_string())],
                    route.latency[*src as usize].snapshot(),
                )
            })
            .collect(),
    );
    families.counter1(
        "route_crm_failures",
        "Routing lookups whose CRM request failed",
        relaxed(&route.crm_failures),
    );
    families.counter1(
        "route_late_answers",
        "CRM answers that came after routing.timeout",
        relaxed(&route.late_answers),
    );

    // Recordings.
    families.counter1(
        "record_served_bytes",
        "Bytes of recordings sent to clients",
        relaxed(&s.metrics.record_bytes),
    );
    let records = s.records.status();
    families.counter(
        "record_conversions",
        "Recording conversions, by outcome",
        vec![
            (vec![("outcome", "converted".into())], records.converted),
            (
                vec![("outcome", "failed".into())],
                records.conversion_failures,
            ),
        ],
    );

    // Hooks.
    let mut hooks = Vec::new();
    for (point, c) in s.hooks.stats() {
        for (outcome, n) in [
            ("changed", c.changed),
            ("unchanged", c.unchanged),
            ("timeout", c.timeout),
            ("failed", c.failed),
        ] {
            hooks.push((
                vec![("point", point.clone()), ("outcome", outcome.to_string())],
                n,
            ));
        }
    }
    families.counter(
        "hook_calls",
        "Customisation hook calls, by configured point and outcome",
        hooks,
    );

    // HTTP.
    families.gauge1(
        "http_connections",
        "Client connections open",
        s.connections.0 as u64,
    );
    families.counter1(
        "http_refused_connections",
        "Client connections refused by the connection limits",
        s.connections.1,
    );

    let mut registry = Registry::with_prefix("pbxgate");
    registry.register_collector(Box::new(families));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
enum Samples {
    Counter(Vec<(Labels, u64)>),
    Gauge(Vec<(Labels, u64)>),
    Histogram(Vec<(Labels, HistogramSnapshot)>),
}

/// The families of one scrape, as read.
#[derive(Debug, Default)]
struct Families(Vec<(&'static str, &'static str, Samples)>);

impl Families {
    fn counter(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, u64)>) {
        self.0.push((name, help, Samples::Counter(samples)));
    }

    fn counter1(&mut self, name: &'static str, help: &'static str, n: u64) {
        self.counter(name, help, vec![(Vec::new(), n)]);
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, u64)>) {
        self.0.push((name, help, Samples::Gauge(samples)));
    }

    fn gauge1(&mut self, name: &'static str, help: &'static str, n: u64) {
        self.gauge(name, help, vec![(Vec::new(), n)]);
    }

    fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        samples: Vec<(Labels, HistogramSnapshot)>,
    ) {
        self.0.push((name, help, Samples::Histogram(samples)));
    }
}

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, samples) in &self.0 {
            let kind = match samples {
                Samples::Counter(_) => MetricType::Counter,
                Samples::Gauge(_) => MetricType::Gauge,
                Samples::Histogram(_) => MetricType::Histogram,
            };
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            match samples {
                Samples::Counter(all) => {
                    for (labels, n) in all {
                        if labels.is_empty() {
                            family.encode_counter::<NoLabelSet, _, u64>(n, None)?;
                        } else {
                            family
                                .encode_family(labels)?
                                .encode_counter::<NoLabelSet, _, u64>(n, None)?;
                        }
                    }
                }
                Samples::Gauge(all) => {
                    for (labels, n) in all {
                        if labels.is_empty() {
                            family.encode_gauge(n)?;
                        } else {
                            family.encode_family(labels)?.encode_gauge(n)?;
                        }
                    }
                }
                Samples::Histogram(all) => {
                    for (labels, h) in all {
                        family
                            .encode_family(labels)?
                            .encode_histogram::<NoLabelSet>(
                                h.sum_seconds,
                                h.count,
                                &h.buckets,
                                None,
                            )?;
                    }
                }
            }
        }
        Ok(())
    }
}
