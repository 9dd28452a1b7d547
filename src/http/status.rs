//! Liveness, readiness, the admin page and static assets (embedded in the binary).

use actix_web::http::header::{self, CacheControl, CacheDirective};
use actix_web::{web, HttpResponse};
use serde_json::json;

use super::AppState;
use crate::crm::registration::RegistrationState;
use crate::pbx::ami::LinkState;

const ADMIN_PAGE: &str = include_str!("../../static/index.html");
const LOGO_SVG: &str = include_str!("../../static/logo.svg");

/// `GET /health`: the process is alive and serving.
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// `GET /ready`: 200 when the store answers, 503 otherwise. The body details every dependency
/// (CRM registration, module activity, the AMI link, PBX failures) so operators see what is
/// degraded; a PBX or CRM outage does not make the instance unready, because it keeps
/// accepting callbacks and queueing work meanwhile.
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let store_ok = state.store.is_readable();
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
        "ready": store_ok,
        "version": env!("CARGO_PKG_VERSION"),
        "uptimeSeconds": state.started.elapsed().as_secs(),
        "store": { "ok": store_ok },
        "crm": {
            "configured": state.crm.is_configured(),
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
        "history": state.outbox.status(),
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
    if store_ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
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
