//! Frame parser throughput on the concatenated real Asterisk 22 captures (../shared/ami-captures),
//! fed in 64 KiB reads as the AMI client does. Prints frames/s and MB/s.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pbxgate::pbx::ami::frame::{Item, Limits, Parser};

fn corpus() -> (Vec<u8>, usize) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/ami-captures");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("../shared/ami-captures")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "raw"))
        .collect();
    names.sort();
    let mut data = b"Asterisk Call Manager/11.0.0\r\n".to_vec();
    for p in names {
        let raw = std::fs::read(p).unwrap();
        // Drop each capture's banner lines; one banner opens the stream.
        let text = String::from_utf8_lossy(&raw).into_owned();
        for line in text
            .split_inclusive('\n')
            .filter(|l| !l.starts_with("Asterisk Call Manager/"))
        {
            data.extend_from_slice(line.as_bytes());
        }
    }
    let frames = count(&data);
    (data, frames)
}

fn count(data: &[u8]) -> usize {
    let mut p = Parser::new(Limits::default());
    let mut n = 0;
    for chunk in data.chunks(64 * 1024) {
        p.push(chunk);
        while let Some(item) = p.next_item() {
            if matches!(item, Item::Frame(_)) {
                n += 1;
            }
        }
    }
    n
}

fn bench(c: &mut Criterion) {
    let (data, frames) = corpus();
    // A plain figure first, independent of criterion's statistics.
    let start = Instant::now();
    let mut runs = 0;
    while start.elapsed() < Duration::from_secs(3) {
        assert_eq!(count(&data), frames);
        runs += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "ami_parse: {} frames, {} bytes per pass; {:.0} frames/s, {:.1} MB/s (single core, {runs} passes)",
        frames,
        data.len(),
        (frames * runs) as f64 / secs,
        (data.len() * runs) as f64 / secs / 1e6
    );
    let mut group = c.benchmark_group("ami_parse");
    group.throughput(Throughput::Elements(frames as u64));
    group.bench_function("captures_64k_reads", |b| {
        b.iter(|| count(std::hint::black_box(&data)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
