//! `/metrics` read by a Prometheus text-format parser after real traffic, and `/ready`'s 503s:
//! the AMI link down past `ami.ready_grace`, the CRM refusing the key.

use std::time::{Duration, Instant};

use pbxgate::base::secret::Secret;
use pbxgate::crm::registration::RegistrationState;
use prometheus_parse::{Sample, Scrape, Value};

use crate::support::{capture_body, fake_crm, lab_app, TestApp};

const MISSED: &str = "lab-1795264721.70";
const TOKEN: &str = "route-token-0123456789";

async fn metrics_text(base: &str, http: &reqwest::Client) -> String {
    let r = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let kind = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    r.text().await.unwrap()
}

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
}

/// The samples named `metric` whose labels include all of `labels`.
fn samples<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect()
}

/// The one value of a counter, gauge or untyped sample.
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let found = samples(scrape, metric, labels);
    assert_eq!(found.len(), 1, "one {metric} {labels:?}: {found:?}");
    match &found[0].value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{metric} is not a single value: {other:?}"),
    }
}

async fn ready(base: &str, http: &reqwest::Client) -> (u16, serde_json::Value) {
    let r = http.get(format!("{base}/ready")).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Asks `/ready` until its status is `want` (at most `within`); returns the last body.
async fn ready_becomes(
    base: &str,
    http: &reqwest::Client,
    want: u16,
    within: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = ready(base, http).await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/ready stayed {status}, not {want}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_captured_call_is_counted_in_metrics() {
    let app = lab_app(|c| c.pbx.token = Secret::new(TOKEN)).await;
    app.ami.send(&capture_body("09_inbound_missed"));
    app.crm
        .wait_for_call(MISSED, Duration::from_secs(15))
        .await
        .expect("the call reached the CRM");
    tokio::time::timeout(
        Duration::from_secs(10),
        app.state.outbox.wait_until(|s| s.uploaded_total >= 1),
    )
    .await
    .expect("the upload was answered");
    let r = app
        .http
        .get(app.url(&format!("/pbx/route?phone=79161234567&token={TOKEN}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let text = metrics_text(&app.base, &app.http).await;
    let scrape = parse(&text);
    assert_eq!(
        value(
            &scrape,
            "pbxgate_calls_finished_total",
            &[("direction", "in"), ("outcome", "no_answer")]
        ),
        1.0,
        "{text}"
    );
    let finished: f64 = samples(&scrape, "pbxgate_calls_finished_total", &[])
        .iter()
        .map(|s| match s.value {
            Value::Counter(v) => v,
            _ => panic!("{s:?}"),
        })
        .sum();
    assert_eq!(finished, 1.0, "only that call finished: {text}");
    assert_eq!(
        value(
            &scrape,
            "pbxgate_uploads_total",
            &[("outcome", "delivered")]
        ),
        1.0
    );
    assert_eq!(
        value(&scrape, "pbxgate_uploads_total", &[("outcome", "rejected")]),
        0.0
    );
    assert!(value(&scrape, "pbxgate_ami_events_handled_total", &[]) > 0.0);
    assert!(value(&scrape, "pbxgate_ami_events_read_total", &[]) > 0.0);
    assert_eq!(value(&scrape, "pbxgate_ami_link_up", &[]), 1.0);
    assert_eq!(value(&scrape, "pbxgate_queue_pending", &[]), 0.0);
    assert_eq!(value(&scrape, "pbxgate_ready", &[]), 1.0);
    let upload = [
        ("endpoint", "/api/v5/telephony/calls/upload"),
        ("status", "200"),
    ];
    assert!(
        value(
            &scrape,
            "pbxgate_crm_request_duration_seconds_count",
            &upload
        ) >= 1.0,
        "{text}"
    );
    let buckets = samples(&scrape, "pbxgate_crm_request_duration_seconds", &upload);
    assert_eq!(buckets.len(), 1, "{text}");
    assert!(matches!(&buckets[0].value, Value::Histogram(b) if b.len() == 14));
    let routed: f64 = samples(&scrape, "pbxgate_route_lookup_duration_seconds_count", &[])
        .iter()
        .map(|s| match s.value {
            Value::Untyped(v) => v,
            _ => panic!("{s:?}"),
        })
        .sum();
    assert_eq!(routed, 1.0, "one routing lookup: {text}");

    for line in text.lines() {
        if let Some(family) = line.strip_prefix("# TYPE ") {
            assert!(family.starts_with("pbxgate_"), "{line}");
        } else if !line.starts_with('#') && !line.is_empty() {
            assert!(line.starts_with("pbxgate_"), "{line}");
        }
    }
    assert!(
        scrape
            .samples
            .iter()
            .all(|s| s.metric.starts_with("pbxgate_")),
        "{text}"
    );
    assert!(!text.contains(fake_crm::API_KEY), "no API key in /metrics");
    assert!(!text.contains(&app.client_id()), "no clientId in /metrics");
    assert!(!text.contains("79161234567"), "no phone number in /metrics");
}

#[tokio::test]
async fn ready_is_503_while_ami_is_down_past_the_grace_and_200_once_it_is_back() {
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.ami.ready_grace = Duration::from_millis(300);
    })
    .await;
    app.ami_connected().await;
    let (status, body) = ready(&app.base, &app.http).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reasons"], serde_json::json!([]));

    app.ami.shutdown();
    tokio::time::timeout(Duration::from_secs(5), app.state.ami.wait_disconnected())
        .await
        .expect("the link went down");
    let body = ready_becomes(&app.base, &app.http, 503, Duration::from_secs(5)).await;
    assert_eq!(body["ready"], false);
    let reasons = body["reasons"].as_array().unwrap();
    assert!(
        reasons
            .iter()
            .any(|r| r.as_str().unwrap().contains("AMI link down")),
        "{body}"
    );
    let scrape = parse(&metrics_text(&app.base, &app.http).await);
    assert_eq!(value(&scrape, "pbxgate_ami_link_up", &[]), 0.0);
    assert_eq!(value(&scrape, "pbxgate_ready", &[]), 0.0);
    assert_eq!(value(&scrape, "pbxgate_ami_disconnects_total", &[]), 1.0);
    // /health stays a liveness check.
    let r = app.http.get(app.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let ami = app.ami.restart().await;
    tokio::time::timeout(Duration::from_secs(10), app.state.ami.wait_connected())
        .await
        .expect("the link came back");
    let (status, body) = ready(&app.base, &app.http).await;
    assert_eq!(status, 200, "{body}");
    let scrape = parse(&metrics_text(&app.base, &app.http).await);
    assert_eq!(value(&scrape, "pbxgate_ami_link_up", &[]), 1.0);
    assert_eq!(value(&scrape, "pbxgate_ami_reconnects_total", &[]), 1.0);
    drop(ami);
}

#[tokio::test]
async fn ready_is_503_when_the_crm_refuses_the_key() {
    const WRONG: &str = "wrong-key-0123456789";
    let app = TestApp::spawn(|c| c.crm.api_key = Secret::new(WRONG)).await;
    let state = tokio::time::timeout(
        Duration::from_secs(10),
        app.state
            .registration
            .wait_for(|s| matches!(s, RegistrationState::Failed(_))),
    )
    .await
    .expect("the registration was refused");
    assert!(matches!(state, RegistrationState::Failed(_)));
    let (status, body) = ready(&app.base, &app.http).await;
    assert_eq!(status, 503, "{body}");
    let reasons = body["reasons"].as_array().unwrap();
    assert!(
        reasons
            .iter()
            .any(|r| r.as_str().unwrap().contains("refuses the API key")),
        "{body}"
    );
    assert!(!body.to_string().contains(WRONG), "no key in /ready");
    let text = metrics_text(&app.base, &app.http).await;
    let scrape = parse(&text);
    assert_eq!(value(&scrape, "pbxgate_crm_key_rejected", &[]), 1.0);
    assert!(
        value(
            &scrape,
            "pbxgate_crm_request_duration_seconds_count",
            &[
                ("endpoint", "/api/v5/integration-modules/:code/edit"),
                ("status", "403")
            ]
        ) >= 1.0,
        "{text}"
    );
    assert!(!text.contains(WRONG), "no key in /metrics");
}

#[tokio::test]
async fn without_an_api_key_ready_is_200_with_a_warning() {
    let app = TestApp::spawn(|c| c.crm.api_key = Secret::default()).await;
    app.ami_connected().await;
    let (status, body) = ready(&app.base, &app.http).await;
    assert_eq!(status, 200, "{body}");
    let warnings = body["warnings"].as_array().unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap().contains("crm.api_key is empty")),
        "{body}"
    );
    let scrape = parse(&metrics_text(&app.base, &app.http).await);
    assert_eq!(value(&scrape, "pbxgate_crm_configured", &[]), 0.0);
}
