//! Backfill from the real lab's CDR CSV (../shared/ami-captures/cdr/Master.csv).

use pbxgate::calls::Direction;
use pbxgate::pbx::cdr::{build, read_rows};
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
