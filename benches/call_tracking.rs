//! Call tracking throughput and memory: every real capture, copied COPIES times (default 500)
//! with rewritten unique ids and bridge ids, interleaved frame by frame so that all copies'
//! calls are live at once (≥ 10,000 concurrent calls), then fed through the frame parser and
//! the call model on one core. Prints events/s and heap bytes per live call at the peak
//! (measured by a counting allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use pbxgate::calls::{CallModel, Classifier, Output};
use pbxgate::config::Config;
use pbxgate::pbx::ami::frame::{Item, Limits, Parser};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// The frames of every capture, as text (one string per frame, CRLF, blank line included),
/// one list per capture.
fn base_frames() -> Vec<Vec<String>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/ami-captures");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "raw"))
        .collect();
    names.sort();
    let mut frames = Vec::new();
    for p in names {
        let text = String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned();
        let body: String = text
            .split_inclusive('\n')
            .filter(|l| !l.starts_with("Asterisk Call Manager/"))
            .collect();
        frames.push(
            body.split_inclusive("\r\n\r\n")
                .map(str::to_string)
                .collect(),
        );
    }
    frames
}

fn main() {
    let copies: usize = std::env::var("COPIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let base = base_frames();
    let base_len: usize = base.iter().map(Vec::len).sum();
    let longest = base.iter().map(Vec::len).max().unwrap_or(0);
    // Every (copy, capture) pair is an independent stream; round i carries frame i of each, so
    // all the calls of all copies are live at the same time.
    let bytes: usize = base.iter().flatten().map(String::len).sum::<usize>() * copies;
    let mut stream = Vec::with_capacity(bytes + 64);
    stream.extend_from_slice(b"Asterisk Call Manager/11.0.0\r\n");
    for i in 0..longest {
        for (k, frame) in
            (0..copies).flat_map(|k| base.iter().filter_map(move |c| c.get(i).map(|f| (k, f))))
        {
            // Unique per copy: Uniqueids/Linkedids (all start with the capture epoch) and bridges.
            let f = frame.replace("179526", &format!("{k:06}"));
            for line in f.split_inclusive("\r\n") {
                if let Some(id) = line.strip_prefix("BridgeUniqueid: ") {
                    stream.extend_from_slice(format!("BridgeUniqueid: {k}-{}", id).as_bytes());
                } else {
                    stream.extend_from_slice(line.as_bytes());
                }
            }
        }
    }
    let mut config = Config::default();
    config.calls.inbound_contexts = vec!["from-trunk".into()];
    let mut model = CallModel::new(Classifier::new(&config), "bench");
    let mut parser = Parser::new(Limits::default());
    let mut out = Vec::new();

    let baseline = LIVE.load(Ordering::Relaxed);
    let (mut peak_calls, mut peak_bytes) = (0usize, 0usize);
    let (mut events, mut finished) = (0u64, 0u64);
    let mut t = 1_795_264_400_000i64;
    let started = Instant::now();
    for chunk in stream.chunks(64 * 1024) {
        parser.push(chunk);
        while let Some(item) = parser.next_item() {
            if let Item::Frame(f) = item {
                events += 1;
                t += 1;
                model.on_event(&f, t, &mut out);
                for o in out.drain(..) {
                    if matches!(o, Output::Finished(_)) {
                        finished += 1;
                    }
                }
            }
        }
        let live = model.live_calls();
        if live > peak_calls {
            peak_calls = live;
            peak_bytes = LIVE.load(Ordering::Relaxed).saturating_sub(baseline);
        }
    }
    model.flush(&mut out);
    finished += out
        .iter()
        .filter(|o| matches!(o, Output::Finished(_)))
        .count() as u64;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "call_tracking: {} frames ({:.1} MB) from {copies} copies of {} capture frames, {finished} calls finished",
        events,
        stream.len() as f64 / 1e6,
        base_len
    );
    println!(
        "  parser + call model: {:.0} events/s on one core ({secs:.2} s)",
        events as f64 / secs
    );
    println!(
        "  peak: {peak_calls} live calls, {:.1} MB heap over baseline = {:.0} bytes per live call (incl. parser buffer)",
        peak_bytes as f64 / 1e6,
        peak_bytes as f64 / peak_calls.max(1) as f64
    );
}
