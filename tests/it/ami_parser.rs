//! The frame parser against every real Asterisk 22 capture in ../shared/ami-captures.

use std::path::PathBuf;

use pbxgate::pbx::ami::frame::{Frame, Item, Limits, Parser};

fn captures() -> Vec<(String, Vec<u8>, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/ami-captures");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "raw") {
            let raw = std::fs::read(&path).unwrap();
            let txt = std::fs::read_to_string(path.with_extension("txt")).unwrap();
            out.push((
                path.file_name().unwrap().to_string_lossy().into_owned(),
                raw,
                txt,
            ));
        }
    }
    out.sort();
    assert!(out.len() >= 10, "captures not found in {}", dir.display());
    out
}

fn parse(chunks: impl IntoIterator<Item = Vec<u8>>) -> Vec<Item> {
    let mut p = Parser::new(Limits::default());
    let mut items = Vec::new();
    for chunk in chunks {
        p.push(&chunk);
        items.extend(std::iter::from_fn(|| p.next_item()));
    }
    assert_eq!(p.buffered(), 0, "bytes left over");
    items
}

fn frames(items: &[Item]) -> Vec<&Frame> {
    items
        .iter()
        .filter_map(|i| {
            if let Item::Frame(f) = i {
                Some(f)
            } else {
                None
            }
        })
        .collect()
}

#[test]
fn every_frame_of_every_capture_round_trips() {
    let mut total = 0;
    for (name, raw, txt) in captures() {
        let items = parse([raw.clone()]);
        assert!(
            !items.iter().any(|i| matches!(i, Item::Skipped { .. })),
            "{name}: skipped something"
        );
        let received = txt.lines().filter(|l| l.starts_with("### <<<")).count();
        let banners_in_txt = txt
            .lines()
            .filter(|l| l.starts_with("### <<<") && l.ends_with(" banner"))
            .count();
        let f = frames(&items);
        assert_eq!(
            f.len(),
            received - banners_in_txt,
            "{name}: frame count differs from the annotated capture"
        );

        // Re-serialised frames are byte-identical to the capture, banner lines aside.
        let banner_lines: usize = items
            .iter()
            .filter(|i| matches!(i, Item::Banner(_)))
            .count();
        assert!(banner_lines >= 1, "{name}");
        let mut expected = raw.clone();
        for _ in 0..banner_lines {
            let nl = expected.iter().position(|b| *b == b'\n').unwrap();
            expected.drain(..=nl);
        }
        let rebuilt: String = f.iter().map(|f| f.to_wire()).collect();
        if let Some(at) = rebuilt
            .bytes()
            .zip(expected.iter())
            .position(|(a, b)| a != *b)
        {
            let show = |b: &[u8]| {
                String::from_utf8_lossy(&b[at.saturating_sub(80)..(at + 80).min(b.len())])
                    .into_owned()
            };
            panic!(
                "{name}: round trip differs at byte {at}:\n{:?}\nvs\n{:?}",
                show(rebuilt.as_bytes()),
                show(&expected)
            );
        }
        assert_eq!(rebuilt.len(), expected.len(), "{name}: round trip length");
        total += f.len();
    }
    assert!(total > 1500, "{total} frames");
}

#[test]
fn splitting_at_every_byte_gives_the_same_frames() {
    for (name, raw, _) in captures() {
        let whole = parse([raw.clone()]);
        let bytewise = parse(raw.iter().map(|b| vec![*b]));
        assert_eq!(whole, bytewise, "{name}");
        // Irregular chunk sizes that straddle CR/LF pairs.
        let mut chunks = Vec::new();
        let mut rest = &raw[..];
        let mut size = 1;
        while !rest.is_empty() {
            let n = size.min(rest.len());
            chunks.push(rest[..n].to_vec());
            rest = &rest[n..];
            size = size % 97 + 2;
        }
        assert_eq!(whole, parse(chunks), "{name}");
    }
}

#[test]
fn the_constructed_reference_stream_parses() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/reference/ami-constructed-frames.txt");
    let text = std::fs::read_to_string(path).unwrap();
    let stream: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\r\n"))
        .collect();
    let items = parse([stream.into_bytes()]);
    let f = frames(&items);
    assert!(f.iter().any(|f| f.event() == Some("AttendedTransfer")));
    // The annotated 353-frame session: 343 events, 5 responses, the rest actions.
    assert_eq!(f.len(), 353);
    assert_eq!(f.iter().filter(|f| f.event().is_some()).count(), 343);
    assert_eq!(f.iter().filter(|f| f.response().is_some()).count(), 5);
}
