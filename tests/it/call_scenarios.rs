//! The call model against every real capture and its ground truth (../shared/ami-captures/truth).
//! Frames are fed with the times they arrived at (the `.txt` annotations), so durations are real.

use std::path::PathBuf;

use pbxgate::ami::frame::{Item, Limits, Parser};
use pbxgate::ami::Frame;
use pbxgate::calls::{CallModel, CallRecord, Classifier, Direction, Output};
use pbxgate::config::Config;
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/ami-captures")
}

/// The frames Asterisk sent, with arrival times in ms since the epoch.
pub fn timed_frames(name: &str) -> Vec<(i64, Frame)> {
    let txt = std::fs::read_to_string(dir().join(format!("{name}.txt"))).unwrap();
    let epoch_ms = txt
        .lines()
        .next()
        .and_then(|l| l.split("= epoch ").nth(1))
        .and_then(|e| e.trim_end_matches(')').parse::<f64>().ok())
        .map(|e| (e * 1000.0).round() as i64)
        .expect("connect time in the first line");
    let mut out = Vec::new();
    let mut lines = txt.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("### <<< +") else {
            continue;
        };
        if rest.ends_with(" banner") {
            continue;
        }
        let offset: f64 = rest.split('s').next().unwrap().parse().unwrap();
        let mut text = String::new();
        while let Some(l) = lines.peek() {
            if l.is_empty() {
                break;
            }
            text.push_str(l);
            text.push_str("\r\n");
            lines.next();
        }
        text.push_str("\r\n");
        let mut p = Parser::without_banner(Limits::default());
        p.push(text.as_bytes());
        while let Some(item) = p.next_item() {
            if let Item::Frame(f) = item {
                out.push((epoch_ms + (offset * 1000.0).round() as i64, f));
            }
        }
    }
    out
}

pub fn lab_config() -> Config {
    let mut c = Config::default();
    c.calls.inbound_contexts = vec!["from-trunk".into()];
    c.calls.trunk_endpoints = vec!["trunk".into()];
    c
}

pub fn run(frames: &[(i64, Frame)]) -> (Vec<CallRecord>, Vec<Output>) {
    let mut model = CallModel::new(Classifier::new(&lab_config()), "lab");
    let mut out = Vec::new();
    for (at, f) in frames {
        model.on_event(f, *at, &mut out);
    }
    model.flush(&mut out);
    let records = out
        .iter()
        .filter_map(|o| {
            if let Output::Finished(r) = o {
                Some((**r).clone())
            } else {
                None
            }
        })
        .collect();
    (records, out)
}

fn ms(iso: &Value) -> Option<i64> {
    let s = iso.as_str()?;
    let t = humantime::parse_rfc3339(s).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64)
}

fn close(a: i64, b: i64, what: &str, ctx: &str) {
    assert!((a - b).abs() <= 1000, "{ctx}: {what} {a} vs truth {b}");
}

const SCENARIOS: &[(&str, &str)] = &[
    ("02_originate_outbound", "02"),
    ("02b_outbound_busy_noanswer_failure", "02b"),
    ("03_inbound_from_trunk", "03"),
    ("04_queue_pause_and_call", "04"),
    ("06_live_channels_status_hangup", "06"),
    ("07_inbound_blind_transfer", "07"),
    ("09_inbound_missed", "09"),
    ("10_inbound_abandoned", "10"),
    ("12_internal_101_to_102", "12"),
    ("14_click2call_manager_noanswer", "14"),
    ("14c_click2call_customer_busy", "14c"),
];

pub fn check_against_truth(truth_name: &str, records: &[CallRecord]) {
    let truth: Value = serde_json::from_str(
        &std::fs::read_to_string(dir().join(format!("truth/{truth_name}.json"))).unwrap(),
    )
    .unwrap();
    for t in truth["calls"].as_array().unwrap() {
        let linkedid = t["linkedid"].as_str().unwrap();
        let ctx = format!("{truth_name}/{linkedid}");
        let r = records
            .iter()
            .find(|r| r.linkedid == linkedid)
            .unwrap_or_else(|| panic!("{ctx}: no record; got {records:#?}"));
        let dir = match t["direction"].as_str().unwrap() {
            "in" => Direction::In,
            "out" => Direction::Out,
            _ => Direction::Internal,
        };
        assert_eq!(r.direction, dir, "{ctx}: direction");
        if dir != Direction::Internal {
            assert_eq!(
                r.customer_number,
                t["customer_number"].as_str().unwrap(),
                "{ctx}: customer number"
            );
        }
        if let Some(did) = t["did"].as_str() {
            assert_eq!(r.did.as_deref(), Some(did), "{ctx}: did");
        }
        assert_eq!(
            r.answer.is_some(),
            t["answered"].as_bool().unwrap(),
            "{ctx}: answered"
        );
        assert_eq!(
            r.answered_by.as_deref(),
            t["answered_by"].as_str(),
            "{ctx}: answered_by"
        );
        assert_eq!(
            r.final_extension.as_deref(),
            t["final_extension"].as_str(),
            "{ctx}: final extension"
        );
        close(r.start, ms(&t["start_time"]).unwrap(), "start", &ctx);
        close(r.end, ms(&t["end_time"]).unwrap(), "end", &ctx);
        if let Some(a) = ms(&t["answer_time"]) {
            close(r.answer.unwrap(), a, "answer", &ctx);
        }
        let secs = |k: &str| t[k].as_f64().unwrap();
        assert!(
            (r.wait_seconds as f64 - secs("wait_seconds")).abs() <= 1.0,
            "{ctx}: wait {} vs {}",
            r.wait_seconds,
            secs("wait_seconds")
        );
        assert!(
            (r.talk_seconds as f64 - secs("talk_seconds")).abs() <= 1.0,
            "{ctx}: talk {} vs {}",
            r.talk_seconds,
            secs("talk_seconds")
        );
        // Every phone rung, with its final status.
        let mut want: Vec<(String, Option<String>)> = t["rang"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                (
                    x["extension"].as_str().unwrap().to_string(),
                    x["dial_status"].as_str().map(String::from),
                )
            })
            .collect();
        let mut got: Vec<(String, Option<String>)> = r
            .rings
            .iter()
            .map(|x| (x.extension.clone(), x.status.clone()))
            .collect();
        want.sort();
        got.sort();
        got.dedup();
        assert_eq!(got, want, "{ctx}: rings");
        if let Some(segments) = t["talk_segments"].as_array() {
            let exts: Vec<&str> = segments
                .iter()
                .map(|s| s["extension"].as_str().unwrap())
                .collect();
            let got: Vec<&str> = r.talk.iter().map(|s| s.extension.as_str()).collect();
            assert_eq!(got, exts, "{ctx}: talk segments");
        }
        let mut want_rec: Vec<&str> = t["recordings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["file"].as_str().unwrap().rsplit('/').next().unwrap())
            .collect();
        let mut got_rec: Vec<&str> = r
            .recordings
            .iter()
            .map(|f| f.rsplit('/').next().unwrap())
            .collect();
        want_rec.sort();
        got_rec.sort();
        assert_eq!(got_rec, want_rec, "{ctx}: recordings");
    }
}

#[test]
fn every_capture_matches_its_ground_truth() {
    for (capture, truth) in SCENARIOS {
        let (records, _) = run(&timed_frames(capture));
        check_against_truth(truth, &records);
    }
}

#[test]
#[ignore]
fn debug_dump() {
    let name = std::env::var("CAPTURE").unwrap();
    let frames = timed_frames(&name);
    let mut model = CallModel::new(Classifier::new(&lab_config()), "lab");
    let mut sink = Vec::new();
    for (at, f) in &frames {
        model.on_event(f, *at, &mut sink);
    }
    println!("left: {:?}", model.summary());
    let (records, out) = run(&frames);
    for o in &out {
        if let Output::Live(l) = o {
            println!("{l:?}");
        }
    }
    for r in records {
        println!("{} {:?} cust={} did={:?} code={:?} ans={:?} by={:?} final={:?} wait={} talk={} outcome={:?} rings={:?} talk={:?} cds={:?} placed={:?}",
            r.linkedid, r.direction, r.customer_number, r.did, r.code, r.answer, r.answered_by, r.final_extension, r.wait_seconds, r.talk_seconds, r.outcome,
            r.rings.iter().map(|x| (x.extension.clone(), x.status.clone())).collect::<Vec<_>>(), r.talk.iter().map(|t| t.extension.clone()).collect::<Vec<_>>(), r.customer_dial_status, r.placed_by);
    }
}
