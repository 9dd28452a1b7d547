//! Live call events (pop-ups) against a slow CRM: a pop-up is never shown after its deadline,
//! counted from when the call did it, and a hangup goes only to calls whose pop-up got through.

use std::time::Duration;

use pbxgate::base::secret::Secret;
use serde_json::Value;

use crate::support::lab_app;

const TOKEN: &str = "live-token-0123456789";
const EVENT: &str = "/api/v5/telephony/call/event";

#[tokio::test]
async fn pop_ups_queued_behind_a_slow_crm_expire_instead_of_arriving_late() {
    let app = lab_app(|c| {
        c.pbx.token = Secret::new(TOKEN);
        c.calls.live_event_deadline = Duration::from_secs(1);
        c.calls.unassigned_code = "100".into();
    })
    .await;
    // Every call/event takes 400 ms: at most three pop-ups fit in the first second.
    app.crm.slow_down(EVENT, Duration::from_millis(400));
    let calls: Vec<Value> = (0..30)
        .flat_map(|i| {
            let id = format!("slow{i}");
            [
                serde_json::json!({"call_id": id, "event": "start", "direction": "in",
                    "phone": "+491701234567", "extension": "101"}),
                serde_json::json!({"call_id": id, "event": "hangup"}),
            ]
        })
        .collect();
    let r = app
        .http
        .post(app.url("/pbx/events"))
        .bearer_auth(TOKEN)
        .json(&calls)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // All 60 events handled: every pop-up sent, failed or expired, every hangup sent or not.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (late, orphans) = loop {
        let ready = app.ready().await;
        let c = &ready["calls"];
        let late = c["liveEventsLate"].as_u64().unwrap();
        let orphans = c["hangupsWithoutPopup"].as_u64().unwrap();
        let sent = c["liveEventsSent"].as_u64().unwrap();
        let failed = c["liveEventsFailed"].as_u64().unwrap();
        if late + orphans + sent + failed >= 60 {
            break (late, orphans);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "late {late}, orphan hangups {orphans}, sent {sent}, failed {failed}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let sent = app.crm.requests_to(EVENT);
    assert!(
        sent.len() <= 12,
        "{} live events reached the CRM after their deadline passed",
        sent.len()
    );
    assert!(late >= 20, "late {late}");
    // Each hangup sent belongs to a call whose pop-up was delivered first.
    let evs: Vec<Value> = sent.iter().map(|r| r.form_json("event")).collect();
    for (i, e) in evs.iter().enumerate() {
        if e["type"] == "hangup" {
            assert!(
                evs[..i]
                    .iter()
                    .any(|p| p["type"] == "in" && p["callExternalId"] == e["callExternalId"]),
                "hangup without its pop-up: {evs:?}"
            );
        }
    }
    assert!(orphans >= 20, "orphan hangups {orphans}");
}
