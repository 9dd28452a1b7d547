//! Backfill from the real lab's CDR CSV (../shared/ami-captures/cdr/Master.csv).

use pbxgate::calls::Direction;
use pbxgate::pbx::cdr::read_rows;
use pbxgate::pipeline::recovery::build;
use serde_json::Value;

#[test]
fn the_lab_cdr_gives_the_calls_of_the_ground_truth() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/ami-captures");
    let file = read_rows(&dir.join("cdr/Master.csv")).unwrap();
    assert!(file.skipped.is_empty(), "{:?}", file.skipped);
    let rows = file.rows;
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
    let rows = read_rows(&dir.join("cdr/Master.csv")).unwrap().rows;
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

/// `pbxgate backfill` for the lab's day on `cdr`, with its store in `dir`.
async fn backfill(dir: &std::path::Path, cdr: &std::path::Path) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_pbxgate"))
        .args([
            "backfill",
            "--from",
            "2026-11-21",
            "--to",
            "2026-11-21",
            "--cdr",
        ])
        .arg(cdr)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "PBXGATE__STORAGE__PATH",
            dir.join("store").display().to_string(),
        )
        .env("PBXGATE__CALLS__INBOUND_CONTEXTS", "[\"from-trunk\"]")
        .output()
        .await
        .expect("run pbxgate")
}

/// The calls the command queued: external id → recording links.
async fn queued(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<String>> {
    let store = pbxgate::store::Store::open(&dir.join("store")).unwrap();
    let queue = pbxgate::outbox::store::OutboxStore::of(&store).unwrap();
    let calls = queue
        .list_pending(1000)
        .unwrap()
        .into_iter()
        .map(|e| (e.id, e.record.recordings))
        .collect();
    queue.close().unwrap();
    calls
}

fn lab_cdr() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/ami-captures/cdr/Master.csv")
}

#[tokio::test]
async fn the_binary_backfills_the_same_calls_with_or_without_the_userfield_column() {
    // 18 columns: the lab's file as Asterisk wrote it (loguniqueid and loguserfield).
    let with = tempfile::tempdir().unwrap();
    let out = backfill(with.path(), &lab_cdr()).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("19 call(s) queued"));
    assert!(
        err.contains("67 row(s) read, 18 columns (with userfield)") && !err.contains("skipped"),
        "{err}"
    );
    let with_calls = queued(with.path()).await;

    // 17 columns: the same rows without the userfield (loguserfield=no).
    let without = tempfile::tempdir().unwrap();
    let cdr17 = without.path().join("Master.csv");
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(lab_cdr())
        .unwrap();
    let mut writer = csv::Writer::from_path(&cdr17).unwrap();
    for rec in reader.records() {
        let rec = rec.unwrap();
        assert_eq!(rec.len(), 18);
        writer.write_record(rec.iter().take(17)).unwrap();
    }
    writer.flush().unwrap();
    let out = backfill(without.path(), &cdr17).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("19 call(s) queued"));
    assert!(
        err.contains("67 row(s) read, 17 columns (without userfield)"),
        "{err}"
    );
    let without_calls = queued(without.path()).await;

    assert_eq!(with_calls.len(), 19);
    assert_eq!(
        with_calls.keys().collect::<Vec<_>>(),
        without_calls.keys().collect::<Vec<_>>()
    );
    // Only the userfield carries the recording links.
    assert!(with_calls.values().any(|r| !r.is_empty()), "{with_calls:?}");
    assert!(
        without_calls.values().all(Vec::is_empty),
        "{without_calls:?}"
    );
}

#[tokio::test]
async fn skipped_rows_are_counted_by_reason_and_a_file_of_garbage_fails() {
    let dir = tempfile::tempdir().unwrap();
    // Some rows skipped: the others are backfilled, exit 0, the skipped ones reported.
    let lab = std::fs::read_to_string(lab_cdr()).unwrap();
    let mixed = dir.path().join("mixed.csv");
    std::fs::write(&mixed, format!("accountcode,src,dst\n{lab}not,a,cdr,row\n")).unwrap();
    let out = backfill(dir.path(), &mixed).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("19 call(s) queued"));
    assert!(
        err.contains("67 row(s) read, 18 columns (with userfield); 2 row(s) skipped:")
            && err.contains("wrong column count: 2 row(s) (3 columns, 4 columns; cdr_csv writes 17, 18, 20 or 21), lines 1, 69"),
        "{err}"
    );

    // Nothing but garbage: exit 1, and why.
    let garbage = dir.path().join("garbage.csv");
    let good = lab.lines().next().unwrap();
    std::fs::write(
        &garbage,
        format!(
            "hello,world\n{}\n{}\n\"\",\"x\"\n",
            good.replace("\"2026-11-21 12:34:21\"", "\"21/11/2026\""),
            good.replace("\"1795264461.5\"", "\"\"")
        ),
    )
    .unwrap();
    let out = backfill(dir.path(), &garbage).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    assert!(
        err.contains("all 4 row(s) skipped, nothing to backfill")
            && err.contains("wrong column count: 2 row(s) (2 columns; cdr_csv writes 17, 18, 20 or 21), lines 1, 4")
            && err.contains("bad date: 1 row(s) (start), line 2")
            && err.contains("no uniqueid: 1 row(s) (cdr.conf [csv] needs loguniqueid=yes), line 3"),
        "{err}"
    );

    // An empty file: nothing read either.
    let empty = dir.path().join("empty.csv");
    std::fs::write(&empty, "").unwrap();
    let out = backfill(dir.path(), &empty).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no CDR rows in the file"));
}
