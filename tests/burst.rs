//! A burst of real captured calls over TCP, hundreds of thousands of events at once. Its own
//! test binary: it keeps both cores busy for a while, and the timing tests of the others run
//! before or after it, not beside it.

#[path = "support/mod.rs"]
mod support;

use serde_json::Value;

use support::{lab_app, TestApp};

/// Calls one copy of `stream` makes, fed straight into a call model like the app's: finished
/// by their events (and the grace after them), and how many stay open at the end.
fn calls_of(app: &TestApp, stream: &[u8]) -> (u64, u64) {
    use pbxgate::calls::{CallModel, Classifier, Output};
    use pbxgate::pbx::ami::frame::{Item, Limits, Parser};
    let mut model = CallModel::new(Classifier::new(&app.state.config), "lab");
    let mut parser = Parser::without_banner(Limits::default());
    parser.push(stream);
    let (mut out, mut t) = (Vec::new(), 1_795_264_400_000i64);
    while let Some(item) = parser.next_item() {
        if let Item::Frame(f) = item {
            t += 1;
            model.on_event(&f, t, &mut out);
        }
    }
    model.tick(t + 60_000, &mut out);
    let finished = out
        .iter()
        .filter(|o| matches!(o, Output::Finished(_)))
        .count();
    out.clear();
    model.flush(&mut out);
    let open = out
        .iter()
        .filter(|o| matches!(o, Output::Finished(_)))
        .count();
    (finished as u64, open as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_captured_calls_over_tcp_loses_no_event_and_no_call() {
    use support::captures::{capture_frames, count_events, multiplied_from};
    const COPIES: usize = 200;
    let app = lab_app(|c| c.calls.send_internal = true).await;
    let base = capture_frames();
    let (per_copy, open) = calls_of(&app, &multiplied_from(&base, 0..1));
    assert!(
        per_copy >= 10 && open == 0,
        "{per_copy} calls, {open} left open"
    );
    let stream = multiplied_from(&base, 0..COPIES);
    let sent = count_events(&stream) as u64;
    assert!(sent > 250_000, "{sent} events");
    let before: Value = app.ready().await;

    // All at once, as fast as loopback TCP takes it: far more than the tracker handles meanwhile.
    app.ami.send(&stream);
    let expected = per_copy * COPIES as u64;
    let all = tokio::time::timeout(
        std::time::Duration::from_secs(240),
        app.state.recent_calls.wait_for(expected),
    )
    .await;
    let ready: Value = app.ready().await;
    let calls = &ready["calls"];
    assert!(all.is_ok(), "not every call finished: {calls}");
    assert_eq!(calls["finished"], expected, "{calls}");
    let grew = |path: [&str; 2]| {
        ready[path[0]][path[1]].as_u64().unwrap() - before[path[0]][path[1]].as_u64().unwrap()
    };
    assert_eq!(grew(["ami", "events"]), sent, "all read: {ready}");
    assert_eq!(grew(["calls", "amiEvents"]), sent, "all tracked: {calls}");
    assert_eq!(
        (
            &calls["amiEventsDropped"],
            &calls["amiBacklogOverflows"],
            &calls["amiBacklog"]
        ),
        (&Value::from(0), &Value::from(0), &Value::from(0)),
        "{calls}"
    );
    assert_eq!(calls["resyncs"], 1, "only the login's: {calls}");
    assert_eq!(calls["live"], 0, "{calls}");
    assert!(
        calls["amiBacklogPeak"].as_u64().unwrap() > 8192,
        "the tracker was behind by more than a broadcast buffer holds: {calls}"
    );
}
