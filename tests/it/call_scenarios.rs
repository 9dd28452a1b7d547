//! The call model against every real capture and its ground truth (../shared/ami-captures/truth).
//! Frames are fed with the times they arrived at (the `.txt` annotations), so durations are real.

use std::path::PathBuf;

use pbxgate::calls::{CallModel, CallRecord, Classifier, Direction, LiveEvent, Outcome, Output};
use pbxgate::config::Config;
use pbxgate::pbx::ami::frame::{Item, Limits, Parser};
use pbxgate::pbx::ami::Frame;
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

pub fn check_against_truth(truth_name: &str, records: &[CallRecord], shift: i64) {
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
        close(
            r.start - shift,
            ms(&t["start_time"]).unwrap(),
            "start",
            &ctx,
        );
        close(r.end - shift, ms(&t["end_time"]).unwrap(), "end", &ctx);
        if let Some(a) = ms(&t["answer_time"]) {
            close(r.answer.unwrap() - shift, a, "answer", &ctx);
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
        assert!(
            (r.connected_seconds as f64 - secs("connected_seconds")).abs() <= 1.0,
            "{ctx}: connected {} vs {}",
            r.connected_seconds,
            secs("connected_seconds")
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
        check_against_truth(truth, &records, 0);
    }
}

/// The constructed reference stream (inbound queue call, click-to-call, missed call, and an
/// attended transfer by SIP REFER), frames 50 ms apart.
fn constructed() -> Vec<(i64, Frame)> {
    let path = dir().join("../reference/ami-constructed-frames.txt");
    let text = std::fs::read_to_string(path).unwrap();
    let stream: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\r\n"))
        .collect();
    let mut p = Parser::new(Limits::default());
    p.push(stream.as_bytes());
    let mut t = 1_716_801_000_000i64;
    std::iter::from_fn(|| p.next_item())
        .filter_map(|i| {
            if let Item::Frame(f) = i {
                Some(f)
            } else {
                None
            }
        })
        .map(|f| {
            t += 50;
            (t, f)
        })
        .collect()
}

#[test]
fn the_constructed_stream_with_an_attended_transfer() {
    let (records, out) = run(&constructed());
    let by_id = |id: &str| {
        records
            .iter()
            .find(|r| r.linkedid == id)
            .unwrap_or_else(|| panic!("{id}: {records:#?}"))
    };
    // (a) inbound via queue, 101 answers.
    let a = by_id("1716801000.0");
    assert_eq!(
        (a.direction, a.answered_by.as_deref(), a.outcome),
        (Direction::In, Some("101"), Outcome::Answered)
    );
    // (b) click-to-call through Local/101 with preassigned ids.
    let b = by_id("c2c-42-a");
    assert_eq!(
        (
            b.direction,
            b.customer_number.as_str(),
            b.answered_by.as_deref()
        ),
        (Direction::Out, "79001234567", Some("101"))
    );
    // (c) missed: both rang, nobody answered.
    let c = by_id("1716801120.5");
    assert_eq!(
        (c.direction, c.outcome, c.rings.len()),
        (Direction::In, Outcome::NoAnswer, 2)
    );
    // (d) attended transfer: the customer's call ends with 102; the consultation is internal.
    let d = by_id("1716801180.8");
    assert_eq!(
        (d.direction, d.final_extension.as_deref()),
        (Direction::In, Some("102"))
    );
    let consult = by_id("1716801192.10");
    assert_eq!(consult.direction, Direction::Internal);
    assert_eq!(
        records
            .iter()
            .filter(|r| r.direction != Direction::Internal)
            .count(),
        4
    );
    // Live events: the inbound calls announced both ringing phones, the click-to-call its manager.
    let ringing = out
        .iter()
        .filter(|o| matches!(o, Output::Live(LiveEvent::Ringing { .. })))
        .count();
    assert_eq!(ringing, 4);
    assert!(out.iter().any(|o| matches!(o, Output::Live(LiveEvent::Dialing { codes, .. }) if codes == &vec!["101".to_string()])));
}

/// Shifts every time by `delta` ms.
fn shifted(frames: Vec<(i64, Frame)>, delta: i64) -> Vec<(i64, Frame)> {
    frames.into_iter().map(|(t, f)| (t + delta, f)).collect()
}

#[test]
fn interleaved_calls_are_tracked_independently() {
    // Pairs of captures made to overlap in time, merged by time (each keeps its own order).
    for (a, b) in [(2, 6), (3, 9), (5, 10), (0, 4), (8, 10)] {
        let (ca, ta) = SCENARIOS[a];
        let (cb, tb) = SCENARIOS[b];
        let fa = timed_frames(ca);
        let fb = timed_frames(cb);
        let delta = fa[fa.len() / 3].0 - fb[0].0;
        let mut merged: Vec<(i64, u8, Frame)> = fa.into_iter().map(|(t, f)| (t, 0, f)).collect();
        merged.extend(shifted(fb, delta).into_iter().map(|(t, f)| (t, 1, f)));
        merged.sort_by_key(|(t, src, _)| (*t, *src));
        let frames: Vec<(i64, Frame)> = merged.into_iter().map(|(t, _, f)| (t, f)).collect();
        let (records, _) = run(&frames);
        check_against_truth(ta, &records, 0);
        check_against_truth(tb, &records, delta);
    }
}

#[test]
fn duplicated_frames_change_nothing() {
    for (capture, truth) in SCENARIOS {
        let doubled: Vec<(i64, Frame)> = timed_frames(capture)
            .into_iter()
            .flat_map(|x| [x.clone(), x])
            .collect();
        let (records, _) = run(&doubled);
        check_against_truth(truth, &records, 0);
    }
}

#[test]
fn a_gap_in_the_event_stream_is_healed_by_resync() {
    // The AMI link drops in the middle of the blind-transfer call (07) and comes back 5 s later:
    // the events in between are lost. A resync tells the model which channels still exist.
    let frames = timed_frames("07_inbound_blind_transfer");
    let t0 = frames
        .iter()
        .find(|(_, f)| f.event() == Some("BridgeEnter"))
        .unwrap()
        .0
        + 1000;
    let t1 = t0 + 5000;
    let mut model = CallModel::new(Classifier::new(&lab_config()), "lab");
    let mut out = Vec::new();
    let mut alive = std::collections::HashSet::new();
    let mut resynced = false;
    for (at, f) in &frames {
        // What CoreShowChannels would list at t1: created before t1, not hung up before t1.
        if *at < t1 {
            match f.event() {
                Some("Newchannel") => {
                    alive.insert(f.get("Uniqueid").unwrap().to_string());
                }
                Some("Hangup") => {
                    alive.remove(f.get("Uniqueid").unwrap());
                }
                _ => {}
            }
        }
        if *at >= t0 && *at < t1 {
            continue;
        }
        if *at >= t1 && !resynced {
            model.resync(&alive, *at, &mut out);
            resynced = true;
        }
        model.on_event(f, *at, &mut out);
    }
    model.flush(&mut out);
    let records: Vec<&CallRecord> = out
        .iter()
        .filter_map(|o| {
            if let Output::Finished(r) = o {
                Some(&**r)
            } else {
                None
            }
        })
        .collect();
    let call = records
        .iter()
        .find(|r| r.linkedid == "1795264605.55")
        .expect("the call is still reported");
    assert_eq!(call.direction, Direction::In);
    assert_eq!(call.customer_number, "+491701234567");
    assert_eq!(call.answered_by.as_deref(), Some("101"));
    assert_eq!(call.outcome, Outcome::Answered);
    assert_eq!(model.live_calls(), 0, "nothing left behind");
}

#[test]
fn a_call_whose_channels_vanished_is_reaped() {
    let frames = timed_frames("03_inbound_from_trunk");
    // Stop 3 s into the conversation: the hangups never arrive.
    let talking = frames
        .iter()
        .find(|(_, f)| f.event() == Some("BridgeEnter"))
        .unwrap()
        .0
        + 3000;
    let cut = frames.iter().position(|(t, _)| *t > talking).unwrap();
    let mut model = CallModel::new(Classifier::new(&lab_config()), "lab");
    let mut out = Vec::new();
    for (at, f) in &frames[..cut] {
        model.on_event(f, *at, &mut out);
    }
    let last = frames[cut - 1].0;
    model.reap(last + 10_000, 60_000, &mut out);
    assert!(
        out.iter().all(|o| !matches!(o, Output::Finished(_))),
        "not yet stale"
    );
    model.reap(last + 61_000, 60_000, &mut out);
    let r = out
        .iter()
        .find_map(|o| {
            if let Output::Finished(r) = o {
                Some(r)
            } else {
                None
            }
        })
        .expect("reaped");
    assert!(r.reaped);
    assert_eq!(
        (r.direction, r.answered_by.as_deref()),
        (Direction::In, Some("101"))
    );
    assert_eq!(model.live_calls(), 0);
}

/// Each captured scenario told as PBX webhooks (what a non-AMI PBX would post) gives the same
/// record as the AMI model did.
#[test]
fn the_scenarios_as_webhooks_give_the_same_records() {
    use pbxgate::calls::webhook::{parse_events, WebhookModel};
    for (capture, truth_name) in SCENARIOS {
        let truth: Value = serde_json::from_str(
            &std::fs::read_to_string(dir().join(format!("truth/{truth_name}.json"))).unwrap(),
        )
        .unwrap();
        let (ami_records, _) = run(&timed_frames(capture));
        for t in truth["calls"].as_array().unwrap() {
            let dir_s = t["direction"].as_str().unwrap();
            if dir_s == "internal" {
                continue;
            }
            let id = t["linkedid"].as_str().unwrap();
            let mut evs: Vec<(i64, Value)> = Vec::new();
            let start = ms(&t["start_time"]).unwrap();
            evs.push((
                start,
                serde_json::json!({"call_id": id, "event": "start", "direction": dir_s,
                "phone": t["customer_number"], "did": t["did"], "at": t["start_time"]}),
            ));
            for r in t["rang"].as_array().unwrap() {
                evs.push((
                    ms(&r["ring_start"]).unwrap(),
                    serde_json::json!({"call_id": id, "event": "ringing",
                    "extension": r["extension"], "at": r["ring_start"]}),
                ));
            }
            let segments: Vec<(String, Value)> = match t["talk_segments"].as_array() {
                Some(segs) => segs
                    .iter()
                    .map(|s| {
                        (
                            s["extension"].as_str().unwrap().to_string(),
                            s["start"].clone(),
                        )
                    })
                    .collect(),
                None if t["answered"] == true => vec![(
                    t["answered_by"].as_str().unwrap().to_string(),
                    t["answer_time"].clone(),
                )],
                None => vec![],
            };
            for (i, (ext, at)) in segments.iter().enumerate() {
                let kind = if i == 0 { "answer" } else { "transfer" };
                evs.push((
                    ms(at).unwrap(),
                    serde_json::json!({"call_id": id, "event": kind, "extension": ext, "at": at}),
                ));
            }
            evs.push((
                ms(&t["end_time"]).unwrap() + 1,
                serde_json::json!({"call_id": id, "event": "hangup", "at": t["end_time"]}),
            ));
            evs.sort_by_key(|(at, _)| *at);
            let body =
                serde_json::to_vec(&evs.into_iter().map(|(_, v)| v).collect::<Vec<_>>()).unwrap();
            let parsed = parse_events(&body).unwrap_or_else(|e| panic!("{truth_name}/{id}: {e:?}"));
            let mut model = WebhookModel::new("lab");
            let mut out = Vec::new();
            for e in &parsed {
                model.apply(e, 0, &mut out);
            }
            let web = out
                .iter()
                .find_map(|o| {
                    if let Output::Finished(r) = o {
                        Some(r)
                    } else {
                        None
                    }
                })
                .unwrap();
            let ami = ami_records.iter().find(|r| r.linkedid == id).unwrap();
            let ctx = format!("{truth_name}/{id}");
            assert_eq!(web.direction, ami.direction, "{ctx}");
            assert_eq!(web.customer_number, ami.customer_number, "{ctx}");
            assert_eq!(web.did, ami.did, "{ctx}");
            assert_eq!(web.answered_by, ami.answered_by, "{ctx}");
            assert_eq!(web.final_extension, ami.final_extension, "{ctx}");
            close(web.start, ami.start, "start", &ctx);
            close(web.end, ami.end, "end", &ctx);
            assert!(
                web.wait_seconds.abs_diff(ami.wait_seconds) <= 1,
                "{ctx}: wait {} vs {}",
                web.wait_seconds,
                ami.wait_seconds
            );
            assert!(
                web.talk_seconds.abs_diff(ami.talk_seconds) <= 1,
                "{ctx}: talk {} vs {}",
                web.talk_seconds,
                ami.talk_seconds
            );
            assert_eq!(
                web.external_id, ami.external_id,
                "{ctx}: the same stable id"
            );
        }
    }
}

/// The truth's channel with this name or Uniqueid.
fn truth_channel<'a>(t: &'a Value, key: &str, value: &str) -> Option<&'a Value> {
    t["channels"]
        .as_array()?
        .iter()
        .find(|c| c[key].as_str() == Some(value))
}

fn close_opt(a: Option<i64>, b: Option<i64>, what: &str, ctx: &str) {
    match (a, b) {
        (Some(a), Some(b)) => close(a, b, what, ctx),
        (a, b) => assert_eq!(
            a.is_some(),
            b.is_some(),
            "{ctx}: {what} {a:?} vs truth {b:?}"
        ),
    }
}

#[test]
fn every_capture_gives_the_main_channel_and_the_conversations_of_its_ground_truth() {
    use pbxgate::calls::record::ChannelKind;
    for (capture, truth_name) in SCENARIOS {
        let (records, _) = run(&timed_frames(capture));
        let truth: Value = serde_json::from_str(
            &std::fs::read_to_string(dir().join(format!("truth/{truth_name}.json"))).unwrap(),
        )
        .unwrap();
        for t in truth["calls"].as_array().unwrap() {
            let linkedid = t["linkedid"].as_str().unwrap();
            let ctx = format!("{truth_name}/{linkedid}");
            let r = records.iter().find(|r| r.linkedid == linkedid).unwrap();
            // The main channel is the one whose Uniqueid is the Linkedid.
            let main = r
                .main_channel
                .as_ref()
                .unwrap_or_else(|| panic!("{ctx}: no main"));
            let root = truth_channel(t, "uniqueid", linkedid).unwrap();
            assert_eq!(main.id, linkedid, "{ctx}");
            assert_eq!(main.name, root["name"].as_str().unwrap(), "{ctx}: name");
            let kind = match t["direction"].as_str().unwrap() {
                "in" => ChannelKind::Incoming,
                "out" => ChannelKind::Outgoing,
                _ => ChannelKind::Local,
            };
            assert_eq!(main.kind, kind, "{ctx}: type");
            close(
                main.start,
                ms(&root["created"]).unwrap(),
                "main start",
                &ctx,
            );
            close_opt(main.answer, ms(&root["up"]), "main answer", &ctx);
            close_opt(main.end, ms(&root["hangup"]), "main end", &ctx);
            // One conversation per phone rung, named by that phone's channel.
            let talked: Vec<&str> = match t["talk_segments"].as_array() {
                Some(segs) => segs
                    .iter()
                    .map(|s| s["extension"].as_str().unwrap())
                    .collect(),
                None => t["answered_by"].as_str().into_iter().collect(),
            };
            let rang = t["rang"].as_array().unwrap();
            assert_eq!(
                r.conversations.len(),
                rang.len(),
                "{ctx}: {:#?}",
                r.conversations
            );
            for ring in rang {
                let ext = ring["extension"].as_str().unwrap();
                let name = ring["channel"].as_str().unwrap();
                let c = r
                    .conversations
                    .iter()
                    .find(|c| c.extension.as_deref() == Some(ext))
                    .unwrap_or_else(|| panic!("{ctx}: no conversation of {ext}"));
                assert_eq!(c.channel_name, name, "{ctx}: {ext}");
                if let Some(ch) = truth_channel(t, "name", name) {
                    assert_eq!(c.channel, ch["uniqueid"].as_str().unwrap(), "{ctx}: {ext}");
                }
                assert!(!c.parked, "{ctx}: {ext}");
                close(
                    c.start,
                    ms(&ring["ring_start"]).unwrap(),
                    "ring start",
                    &ctx,
                );
                assert_eq!(
                    c.answer.is_some(),
                    talked.contains(&ext),
                    "{ctx}: {ext} answered"
                );
                if c.answer.is_some() {
                    // Connected with the customer (internal calls: the caller).
                    let customer = match t["customer_channel"]["uniqueid"].as_str() {
                        Some(u) => u,
                        None => linkedid,
                    };
                    assert_eq!(c.customer_channel, customer, "{ctx}: {ext}");
                }
            }
            if let Some(a) = ms(&t["answer_time"]) {
                let first = r.conversations.iter().filter_map(|c| c.answer).min();
                close(first.unwrap(), a, "first conversation answer", &ctx);
            }
        }
    }
}

fn only(capture: &str) -> CallRecord {
    let (records, _) = run(&timed_frames(capture));
    assert_eq!(records.len(), 1, "{capture}");
    records.into_iter().next().unwrap()
}

/// `(extension, channel, answered)` of every conversation.
fn legs(r: &CallRecord) -> Vec<(Option<&str>, &str, bool)> {
    r.conversations
        .iter()
        .map(|c| {
            (
                c.extension.as_deref(),
                c.channel.as_str(),
                c.answer.is_some(),
            )
        })
        .collect()
}

#[test]
fn an_answered_inbound_call_carries_its_numbers_channels_and_result() {
    let r = only("03_inbound_from_trunk");
    assert_eq!(
        (r.from_number.as_deref(), r.to_number.as_deref()),
        (Some("+491701234567"), Some("+4930111000"))
    );
    assert_eq!(r.outcome.sip_code(), 200);
    let main = r.main_channel.as_ref().unwrap();
    assert_eq!(
        (main.id.as_str(), main.name.as_str()),
        ("1795264488.20", "Local/+4930111000@from-trunk-0000000a;1")
    );
    // The ring group rang both; 101 answered.
    assert_eq!(
        legs(&r),
        vec![
            (Some("101"), "1795264488.22", true),
            (Some("102"), "1795264488.24", false)
        ]
    );
    // A conversation ends with its last connection, a ring with its ring.
    assert_eq!(r.conversations[0].end, r.talk[0].end);
    assert_eq!(r.conversations[1].end, r.rings[1].end);
}

#[test]
fn a_blind_transfer_gives_two_conversations_with_their_channels() {
    let r = only("07_inbound_blind_transfer");
    assert_eq!(
        legs(&r),
        vec![
            (Some("101"), "1795264605.56", true),
            (Some("102"), "1795264612.57", true)
        ]
    );
    let names: Vec<&str> = r
        .conversations
        .iter()
        .map(|c| c.channel_name.as_str())
        .collect();
    assert_eq!(names, vec!["PJSIP/101-00000006", "PJSIP/102-00000007"]);
    // Each from its ring to its end; both with the same customer channel (the trunk).
    let (a, b) = (&r.conversations[0], &r.conversations[1]);
    assert_eq!(
        (a.start, a.answer, a.end),
        (r.rings[0].start, Some(r.talk[0].start), r.talk[0].end)
    );
    assert_eq!(
        (b.start, b.answer, b.end),
        (r.rings[1].start, Some(r.talk[1].start), r.talk[1].end)
    );
    assert!(r
        .conversations
        .iter()
        .all(|c| c.customer_channel == "1795264605.55" && !c.parked));
    assert_eq!(r.main_channel.unwrap().name, "PJSIP/trunk-00000005");
    assert_eq!(r.trunk.as_deref(), Some("PJSIP/trunk"));
}

#[test]
fn an_unanswered_call_has_only_unanswered_conversations() {
    let r = only("09_inbound_missed");
    assert_eq!(
        legs(&r),
        vec![
            (Some("101"), "1795264721.71", false),
            (Some("102"), "1795264721.72", false)
        ]
    );
    assert_eq!(r.outcome.sip_code(), 480);
    let main = r.main_channel.unwrap();
    assert_eq!((main.answer, main.end), (None, Some(r.end)));
    // Outbound: from the placing extension to the number dialled, busy.
    let (records, _) = run(&timed_frames("02b_outbound_busy_noanswer_failure"));
    let busy = records
        .iter()
        .find(|r| r.linkedid == "1795264472.6")
        .unwrap();
    assert_eq!(
        (busy.from_number.as_deref(), busy.to_number.as_deref()),
        (Some("101"), Some("030555486"))
    );
    assert_eq!(busy.outcome.sip_code(), 486);
}

#[test]
fn a_call_journaled_by_the_previous_version_resumes() {
    // Capture 07 journaled just before the blind transfer by the version before conversations
    // and main channels existed.
    const SNAPSHOT: &str = r#"{"v":1,"call":{"key":"1795264605.55","start":1795264605423,"last_event":1795264612437,"live":["1795264605.55","1795264605.56"],"customer":"1795264605.55","inbound":true,"customer_number":"+491701234567","did":"+4930111101","customer_end":null,"customer_dial_status":null,"placed_by":null,"root_extension":null,"originated":false,"originate_exten":null,"originate_failed":false,"click_to_call":null,"rings":[{"extension":"101","start":1795264605425,"end":1795264607435,"status":"ANSWER"}],"ring_by_dest":{"1795264605.56":0},"talk":[{"extension":"101","start":1795264607435,"end":null,"customer_channel":"1795264605.55","extension_channel":"1795264605.56","hold_ms":0}],"recordings":["/var/spool/asterisk/monitor/20261121-123645_in_+491701234567_to_+4930111101_1795264605.55.wav"],"announced":["101"],"last_hangup":1795264605423,"reaped":false,"customer_cause":null,"external_line":null,"holds":[],"trunk":"PJSIP/trunk"},"channels":[["1795264605.55",{"call":"1795264605.55","role":"Trunk","customer":true,"caller_num":"+491701234567","bridge":"80ca55e1-d56e-4a04-b0c7-1c9bf5f7dad1"}],["1795264605.56",{"call":"1795264605.55","role":{"Extension":"101"},"customer":false,"caller_num":"101","bridge":"80ca55e1-d56e-4a04-b0c7-1c9bf5f7dad1"}]],"closing":false}"#;
    let frames = timed_frames("07_inbound_blind_transfer");
    let cut = frames
        .iter()
        .position(|(_, f)| f.get("Event") == Some("BlindTransfer"))
        .unwrap();
    let mut model = CallModel::new(Classifier::new(&lab_config()), "lab");
    model.restore(SNAPSHOT.as_bytes(), frames[cut].0).unwrap();
    let mut out = Vec::new();
    for (at, f) in &frames[cut..] {
        model.on_event(f, *at, &mut out);
    }
    model.flush(&mut out);
    let resumed = out
        .iter()
        .find_map(|o| match o {
            Output::Finished(r) => Some(r),
            _ => None,
        })
        .unwrap();
    let whole = only("07_inbound_blind_transfer");
    // The same record, but for what that version did not journal: the main channel and the
    // name of the channel that was already talking.
    assert_eq!(resumed.main_channel, None);
    assert_eq!(resumed.conversations[0].channel_name, "");
    let mut expected = whole.clone();
    expected.main_channel = None;
    expected.conversations[0].channel_name = String::new();
    assert_eq!(**resumed, expected);
}

/// The `Progress` events of a capture: (ringing, talking) after each change.
fn progress_of(out: &[Output]) -> Vec<(Vec<String>, Vec<String>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Live(LiveEvent::Progress {
                ringing, talking, ..
            }) => Some((ringing.clone(), talking.clone())),
            _ => None,
        })
        .collect()
}

fn v(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn progress_follows_who_rings_and_who_talks() {
    // Ring group 101 & 102; 101 answers (102's ring ends); the call ends with a hangup.
    let (_, out) = run(&timed_frames("03_inbound_from_trunk"));
    let p = progress_of(&out);
    assert_eq!(p.first(), Some(&(v(&["101"]), v(&[]))), "{p:?}");
    assert!(p.contains(&(v(&["101", "102"]), v(&[]))), "{p:?}");
    assert_eq!(p.last(), Some(&(v(&[]), v(&["101"]))), "{p:?}");
    // Nothing but changes: no two equal states in a row.
    assert!(p.windows(2).all(|w| w[0] != w[1]), "{p:?}");

    // Blind transfer: 101 talks, then 102 rings and talks.
    let (_, out) = run(&timed_frames("07_inbound_blind_transfer"));
    let p = progress_of(&out);
    assert!(p.contains(&(v(&[]), v(&["101"]))), "{p:?}");
    assert_eq!(p.last(), Some(&(v(&[]), v(&["102"]))), "{p:?}");

    // An internal call is never announced: no progress either.
    let (_, out) = run(&timed_frames("12_internal_101_to_102"));
    assert!(progress_of(&out).is_empty());
}
