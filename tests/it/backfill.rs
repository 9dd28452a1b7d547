//! Backfill from the real lab's CDR CSV (../shared/ami-captures/cdr/Master.csv).

use pbxgate::calls::Direction;
use pbxgate::pbx::cdr::read_rows;
use pbxgate::pipeline::recovery::build;
use serde_json::Value;

#[test]
fn the_lab_cdr_gives_the_calls_of_the_ground_truth() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/ami-captures");
    let (rows, problems) = read_rows(&dir.join("cdr/Master.csv")).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(rows.len(), 67);
    let config = crate::call_scenarios::lab_config();
    let mut config = config;
    config.pbx.system_id = "lab".into();
    let day: jiff::civil::Date = "2026-11-21".parse().unwrap();
    let calls = build(&config, &rows, day, day, &jiff::tz::TimeZone::UTC);
    assert!(calls.iter().all(|c| c.direction != Direction::Internal));
    let mut checked = 0;
    for entry in std::fs::read_dir(dir.join("truth")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let truth: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for t in truth["calls"].as_array().unwrap() {
            let id = t["linkedid"].as_str().unwrap();
            // Calls that never reached a customer leave nothing in the CDR to tell their direction.
            if t["direction"] == "internal" || t["customer_dialled"] == false {
                continue;
            }
            let c = calls
                .iter()
                .find(|c| c.linkedid == id)
                .unwrap_or_else(|| panic!("{id} missing"));
            assert_eq!(
                c.external_id,
                format!("lab-{id}"),
                "the live model's id: no double upload"
            );
            let dir = if t["direction"] == "in" {
                Direction::In
            } else {
                Direction::Out
            };
            assert_eq!(c.direction, dir, "{id}");
            assert_eq!(
                c.customer_number,
                t["customer_number"].as_str().unwrap(),
                "{id}"
            );
            assert_eq!(c.answer.is_some(), t["answered"].as_bool().unwrap(), "{id}");
            if let Some(ext) = t["final_extension"].as_str() {
                assert_eq!(c.code.as_deref(), Some(ext), "{id}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 10);
    // Outside the period: nothing.
    let other: jiff::civil::Date = "2026-11-20".parse().unwrap();
    assert!(build(&config, &rows, other, other, &jiff::tz::TimeZone::UTC).is_empty());
}

#[test]
fn backfilled_calls_carry_their_main_channel_conversations_and_numbers() {
    use pbxgate::calls::record::ChannelKind;
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/ami-captures");
    let (rows, _) = read_rows(&dir.join("cdr/Master.csv")).unwrap();
    let config = crate::call_scenarios::lab_config();
    let calls = pbxgate::pbx::cdr::calls_of(&config, &rows, &jiff::tz::TimeZone::UTC);
    let at = |s: &str| pbxgate::pbx::cdr::cdr_time(s, &jiff::tz::TimeZone::UTC);
    let by_id = |id: &str| calls.iter().find(|c| c.linkedid == id).unwrap();

    // The blind transfer 101 -> 102: the trunk channel for the whole call, a conversation each.
    let c = by_id("1795264605.55");
    let main = c.main_channel.as_ref().unwrap();
    assert_eq!(
        (main.name.as_str(), main.kind),
        ("PJSIP/trunk-00000005", ChannelKind::Incoming)
    );
    assert_eq!(
        (main.start, main.answer, main.end),
        (
            at("2026-11-21 12:36:45").unwrap(),
            at("2026-11-21 12:36:47"),
            at("2026-11-21 12:37:05")
        )
    );
    let legs: Vec<(Option<&str>, &str, Option<i64>, &str)> = c
        .conversations
        .iter()
        .map(|x| {
            (
                x.extension.as_deref(),
                x.channel_name.as_str(),
                x.answer,
                x.customer_channel.as_str(),
            )
        })
        .collect();
    assert_eq!(
        legs,
        vec![
            (
                Some("101"),
                "PJSIP/101-00000006",
                at("2026-11-21 12:36:47"),
                "1795264605.55"
            ),
            (
                Some("102"),
                "PJSIP/102-00000007",
                at("2026-11-21 12:36:52"),
                "1795264605.55"
            ),
        ]
    );
    assert_eq!(
        (c.from_number.as_deref(), c.to_number.as_deref()),
        (Some("+491701234567"), Some("102"))
    );

    // A queue call: the phone's channel names the conversation, not the queue's Local half.
    let q = by_id("1795264767.80");
    let legs: Vec<(Option<&str>, &str, bool)> = q
        .conversations
        .iter()
        .map(|x| {
            (
                x.extension.as_deref(),
                x.channel_name.as_str(),
                x.answer.is_some(),
            )
        })
        .collect();
    assert_eq!(
        legs,
        vec![
            (Some("101"), "PJSIP/101-0000001d", false),
            (Some("102"), "PJSIP/102-0000001e", true)
        ]
    );

    // Outbound: the placing extension's own row gives its channel.
    let o = by_id("1795264459.0");
    assert_eq!(
        (o.from_number.as_deref(), o.to_number.as_deref()),
        (Some("101"), Some("+4930123456"))
    );
    assert_eq!(o.conversations.len(), 1);
    assert_eq!(
        (
            o.conversations[0].channel.as_str(),
            o.conversations[0].extension.as_deref()
        ),
        ("1795264459.0", Some("101"))
    );
    assert_eq!(o.main_channel.as_ref().unwrap().kind, ChannelKind::Outgoing);
}
