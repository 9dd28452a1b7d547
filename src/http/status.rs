//! Liveness, readiness, the admin page and static assets (embedded in the binary).

use actix_web::http::header::{self, CacheControl, CacheDirective};
use actix_web::{web, HttpResponse};
use serde_json::json;

use std::time::Duration;

use super::AppState;
use crate::base::clock::now_ms;
use crate::crm::registration::RegistrationState;
use crate::pbx::ami::LinkState;

const ADMIN_PAGE: &str = include_str!("../../static/index.html");
const LOGO_SVG: &str = include_str!("../../static/logo.svg");

/// `GET /health`: the process is alive and serving.
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Why the service is not ready (`/ready` answers 503), and what is degraded without that.
struct Readiness {
    reasons: Vec<String>,
    warnings: Vec<String>,
}

/// Not ready: the store does not answer; the AMI link has been down (or never up) for longer
/// than `ami.ready_grace`; the CRM refuses the API key or the account; the call history upload
/// is stopped for a reason only an operator can fix. A short AMI outage or a CRM outage is not a
/// reason: calls are tracked again after the reconnect and queued meanwhile. No API key is a
/// warning only: the service runs without a CRM (first start, demos) and keeps the calls.
fn readiness(state: &AppState, store_ok: bool, history: &crate::outbox::Status) -> Readiness {
    let mut reasons = Vec::new();
    let mut warnings = Vec::new();
    if !store_ok {
        reasons.push("the store does not answer".to_string());
    }
    let link = state.ami.state();
    if !link.is_connected() {
        let changed_at = state
            .ami
            .counters()
            .link_changed_at
            .load(std::sync::atomic::Ordering::Relaxed);
        let down = Duration::from_millis(u64::try_from(now_ms() - changed_at).unwrap_or(0));
        let grace = state.config.ami.ready_grace;
        if down > grace {
            let why = match &link {
                LinkState::Connecting {
                    last_error: Some(e),
                    ..
                } => e.clone(),
                LinkState::Stopped => "stopped".to_string(),
                _ => "not connected yet".to_string(),
            };
            reasons.push(format!(
                "AMI link down for {}s (more than ami.ready_grace = {}): {}",
                down.as_secs(),
                humantime::format_duration(grace),
                crate::telemetry::one_line(&why, 300)
            ));
        }
    }
    if !state.crm.is_configured() {
        warnings.push(format!(
            "{}: calls are tracked and kept, nothing is sent to a CRM",
            state.crm.unconfigured()
        ));
    }
    let rejected = state.crm.requests().and_then(|r| r.rejected());
    if let Some(why) = &rejected {
        reasons.push(format!(
            "the CRM refuses the API key or the account: {}",
            crate::telemetry::one_line(why, 300)
        ));
    }
    if let (None, Some(why)) = (&rejected, &history.blocked) {
        reasons.push(format!(
            "call history upload stopped until an operator acts: {}",
            crate::telemetry::one_line(why, 300)
        ));
    }
    Readiness { reasons, warnings }
}

/// `GET /ready`: 200 when ready, 503 otherwise (see [`readiness`]); `reasons` says why not,
/// `warnings` what is degraded without making it unready. The body details every dependency
/// (CRM registration, module activity, the AMI link, PBX failures) so operators see what is
/// degraded.
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let store_ok = state.store.is_readable();
    let history = state.outbox.status();
    let readiness = readiness(&state, store_ok, &history);
    let is_ready = readiness.reasons.is_empty();
    let activity = state.store.activity().unwrap_or_default();
    let (registration, registration_error) = match state.registration.get() {
        RegistrationState::Registered => ("registered", None),
        RegistrationState::Pending => ("pending", None),
        RegistrationState::Disabled(why) => ("disabled", Some(why.to_string())),
        RegistrationState::Failed(e) => ("failed", Some(e)),
    };
    let ami = match state.ami.state() {
        LinkState::Connected {
            session,
            banner,
            since,
        } => json!({
            "connected": true, "session": session, "banner": banner, "connectedSeconds": since.elapsed().as_secs(),
        }),
        LinkState::Connecting {
            attempt,
            last_error,
        } => json!({
            "connected": false, "reconnectAttempt": attempt, "lastError": last_error,
        }),
        LinkState::Stopped => json!({"connected": false, "lastError": "stopped"}),
    };
    let counters = state.ami.counters();
    let mut ami = ami;
    ami["events"] = json!(counters.events.load(std::sync::atomic::Ordering::Relaxed));
    ami["skippedFrames"] = json!(counters
        .skipped_frames
        .load(std::sync::atomic::Ordering::Relaxed));
    let backlog = state.ami.backlog();
    let status_failures: serde_json::Map<String, serde_json::Value> = state
        .manager_status
        .failures()
        .into_iter()
        .map(|(user, why)| (user.to_string(), json!(why)))
        .collect();
    let (open_connections, refused_connections) = state.connections.counts();
    let body = json!({
        "ready": is_ready,
        "reasons": readiness.reasons,
        "warnings": readiness.warnings,
        "version": env!("CARGO_PKG_VERSION"),
        "uptimeSeconds": state.started.elapsed().as_secs(),
        "store": { "ok": store_ok },
        "crm": {
            "name": state.crm.name(),
            "configured": state.crm.is_configured(),
            "unconfigured": (!state.crm.is_configured()).then(|| state.crm.unconfigured()),
            "refused": state.crm.requests().and_then(|r| r.rejected()),
            "url": state.crm.url(),
            "registration": registration,
            "registrationError": registration_error,
            "active": activity.active,
            "freeze": activity.freeze,
            "pushing": activity.may_push(),
        },
        "http": {
            "connections": open_connections,
            "maxConnections": state.connections.max(),
            "maxConnectionsPerIp": state.connections.per_ip(),
            "refusedConnections": refused_connections,
            "openFilesLimit": state.open_files,
        },
        "ami": ami,
        "managerStatus": { "pbxFailures": status_failures },
        "history": history,
        "records": state.records.status(),
        "calls": {
            "live": state.tracker_stats.live_calls.load(std::sync::atomic::Ordering::Relaxed),
            "finished": state.tracker_stats.finished.load(std::sync::atomic::Ordering::Relaxed),
            "liveEventsDropped": state.tracker_stats.live_events_dropped.load(std::sync::atomic::Ordering::Relaxed),
            "liveEventsLate": state.tracker_stats.live_events_late.load(std::sync::atomic::Ordering::Relaxed),
            "hangupsWithoutPopup": state.tracker_stats.hangups_without_popup.load(std::sync::atomic::Ordering::Relaxed),
            "liveEventsSent": state.tracker_stats.live_events_sent.load(std::sync::atomic::Ordering::Relaxed),
            "liveEventsFailed": state.tracker_stats.live_events_failed.load(std::sync::atomic::Ordering::Relaxed),
            "journalWrites": state.tracker_stats.journal_writes.load(std::sync::atomic::Ordering::Relaxed),
            "eventsJournaled": state.tracker_stats.events_journaled.load(std::sync::atomic::Ordering::Relaxed),
            "resyncs": state.tracker_stats.resyncs.load(std::sync::atomic::Ordering::Relaxed),
            // What the tracker handled of ami.events, and what waits for it (its lag).
            "amiEvents": state.tracker_stats.ami_events.load(std::sync::atomic::Ordering::Relaxed),
            "amiBacklog": backlog.waiting,
            "amiBacklogPeak": backlog.peak,
            "amiBacklogMax": backlog.max,
            "amiEventsDropped": backlog.dropped,
            "amiBacklogOverflows": backlog.overflows,
            "ignored": state.tracker_stats.ignored.load(std::sync::atomic::Ordering::Relaxed),
        },
        "routing": {
            "stats": state.router.stats(),
            "cached": state.router.cached(),
            "fastAgi": state.agi_addr.map(|a| a.to_string()),
        },
        // Per configured customisation point: how its hook calls ended.
        "hooks": state.hooks.stats(),
    });
    if is_ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// `GET /metrics`: Prometheus' text format (see [`crate::metrics`]). Counts and states only: no
/// number, id, URL or key is in it.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let store_ok = state.store.is_readable();
    let history = state.outbox.status();
    let ready = readiness(&state, store_ok, &history).reasons.is_empty();
    let (open, refused) = state.connections.counts();
    let text = crate::metrics::render(&crate::metrics::Sources {
        metrics: &state.metrics,
        ami: &state.ami,
        tracker: &state.tracker_stats,
        outbox: &state.outbox,
        history: &history,
        router: &state.router,
        hooks: &state.hooks,
        records: &state.records,
        crm: state.crm.as_ref(),
        connections: (open, refused),
        uptime_seconds: state.started.elapsed().as_secs(),
        ready,
    });
    HttpResponse::Ok()
        .content_type(crate::metrics::CONTENT_TYPE)
        .insert_header(CacheControl(vec![CacheDirective::NoStore]))
        .body(text)
}

/// `GET /`: a small status page reading `/ready`.
pub async fn admin_page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(ADMIN_PAGE)
}

/// `GET /static/logo.svg`: the logo retailCRM shows for the module.
pub async fn logo() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("image/svg+xml")
        .insert_header(CacheControl(vec![
            CacheDirective::Public,
            CacheDirective::MaxAge(86400),
        ]))
        .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
        .body(LOGO_SVG)
}
