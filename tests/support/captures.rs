//! The real captures multiplied: every capture copied with unique ids and bridge ids, the
//! copies interleaved frame by frame so that all their calls are live at once. Shared by the
//! tests and the benchmarks.
#![allow(dead_code)]

use std::path::PathBuf;

/// The frames of every capture (banner lines removed), as CRLF text with the blank line, one
/// list per capture, in file name order.
pub fn capture_frames() -> Vec<Vec<String>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/ami-captures");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "raw"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|p| {
            let text = String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned();
            let body: String = text
                .split_inclusive('\n')
                .filter(|l| !l.starts_with("Asterisk Call Manager/"))
                .collect();
            body.split_inclusive("\r\n\r\n")
                .map(str::to_string)
                .collect()
        })
        .collect()
}

/// Copy `k` of one frame: Uniqueids and Linkedids (all start with the capture epoch) and
/// bridge ids made unique.
fn copy_frame(frame: &str, k: usize, out: &mut Vec<u8>) {
    let f = frame.replace("179526", &format!("{k:06}"));
    for line in f.split_inclusive("\r\n") {
        if let Some(id) = line.strip_prefix("BridgeUniqueid: ") {
            out.extend_from_slice(format!("BridgeUniqueid: {k}-{id}").as_bytes());
        } else {
            out.extend_from_slice(line.as_bytes());
        }
    }
}

/// The AMI stream of `copies` copies of every capture, interleaved (round `i` carries frame
/// `i` of every copy), without a banner.
pub fn multiplied(copies: usize) -> Vec<u8> {
    multiplied_from(&capture_frames(), 0..copies)
}

/// Copies `ks` of `base`, interleaved.
pub fn multiplied_from(base: &[Vec<String>], ks: std::ops::Range<usize>) -> Vec<u8> {
    let longest = base.iter().map(Vec::len).max().unwrap_or(0);
    let bytes: usize = base.iter().flatten().map(String::len).sum::<usize>() * ks.len();
    let mut stream = Vec::with_capacity(bytes + bytes / 16);
    for i in 0..longest {
        for k in ks.clone() {
            for frame in base.iter().filter_map(|c| c.get(i)) {
                copy_frame(frame, k, &mut stream);
            }
        }
    }
    stream
}

/// How many frames of a stream are events.
pub fn count_events(stream: &[u8]) -> usize {
    let text = String::from_utf8_lossy(stream);
    text.split_inclusive("\r\n\r\n")
        .filter(|f| f.starts_with("Event:"))
        .count()
}
