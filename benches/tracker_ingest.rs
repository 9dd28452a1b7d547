//! AMI ingest over TCP with every event tracked: every real capture copied COPIES times
//! (default 550, about a million events) with rewritten ids, interleaved so that all copies'
//! calls are live at once, sent by a minimal AMI server on 127.0.0.1 to the real AMI client and
//! call tracker (release build, 2 runtime threads). All at once by default, or paced at RATE
//! events/s. Prints the reader's and the tracker's rates, calls finished / expected, the
//! tracker's backlog (peak, dropped, overflows) and memory (heap by a counting allocator, RSS).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pbxgate::base::secret::Secret;
use pbxgate::calls::{CallModel, Classifier, Output};
use pbxgate::config::Config;
use pbxgate::pbx::ami::frame::{Item, Limits, Parser};
use pbxgate::pbx::ami::AmiClient;
use pbxgate::pipeline::{CallSink, CallTracker, RecentCalls, TrackerStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

#[path = "../tests/support/captures.rs"]
mod captures;

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

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Peak resident set size of this process, from /proc (kB → MB).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The stream cut into pieces of about 64 KiB that end on frame boundaries (answers to actions
/// go in between, as Asterisk interleaves them).
fn pieces(stream: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < stream.len() {
        let mut end = (start + 64 * 1024).min(stream.len());
        if end < stream.len() {
            end = memchr::memmem::find(&stream[end..], b"\r\n\r\n")
                .map_or(stream.len(), |i| end + i + 4);
        }
        out.push(stream[start..end].to_vec());
        start = end;
    }
    out
}

fn answer(frame: &pbxgate::pbx::ami::frame::Frame) -> String {
    let id = frame.action_id().unwrap_or("");
    match frame.get("Action").unwrap_or("").to_ascii_lowercase().as_str() {
        "login" => format!("Response: Success\r\nActionID: {id}\r\nMessage: Authentication accepted\r\n\r\n"),
        "ping" => format!("Response: Success\r\nActionID: {id}\r\nPing: Pong\r\n\r\n"),
        "coreshowchannels" => format!(
            "Response: Success\r\nActionID: {id}\r\nEventList: start\r\nMessage: Channels will follow\r\n\r\n\
             Event: CoreShowChannelsComplete\r\nActionID: {id}\r\nEventList: Complete\r\nListItems: 0\r\n\r\n"
        ),
        _ => format!("Response: Error\r\nActionID: {id}\r\nMessage: Invalid/unknown command\r\n\r\n"),
    }
}

/// One AMI session: the banner, answers to actions, and once the tracker's login resync is
/// answered (an empty list, true before the stream) the whole stream, paced at `bytes_per_s`
/// if given. Tells when the stream began.
async fn serve(
    listener: TcpListener,
    pieces: Arc<Vec<Vec<u8>>>,
    bytes_per_s: Option<f64>,
    began: tokio::sync::oneshot::Sender<Instant>,
) {
    let (sock, _) = listener.accept().await.unwrap();
    let _ = sock.set_nodelay(true);
    let (mut rd, mut wr) = sock.into_split();
    let (answers_tx, mut answers) = mpsc::unbounded_channel::<String>();
    let (synced_tx, synced) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut parser = Parser::without_banner(Limits::default());
        let mut buf = vec![0u8; 16 * 1024];
        let mut synced_tx = Some(synced_tx);
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            parser.push(&buf[..n]);
            while let Some(item) = parser.next_item() {
                if let Item::Frame(f) = item {
                    let _ = answers_tx.send(answer(&f));
                    if f.get("Action")
                        .is_some_and(|a| a.eq_ignore_ascii_case("coreshowchannels"))
                    {
                        if let Some(tx) = synced_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
            }
        }
    });
    wr.write_all(b"Asterisk Call Manager/11.0.0\r\n")
        .await
        .unwrap();
    let mut synced = Some(synced);
    // Answers until the first resync, then the stream with answers in between.
    while let Some(rx) = synced.as_mut() {
        tokio::select! {
            Some(a) = answers.recv() => wr.write_all(a.as_bytes()).await.unwrap(),
            _ = rx => synced = None,
        }
    }
    while let Ok(a) = answers.try_recv() {
        wr.write_all(a.as_bytes()).await.unwrap();
    }
    let start = Instant::now();
    let _ = began.send(start);
    let mut sent = 0usize;
    for piece in pieces.iter() {
        while let Ok(a) = answers.try_recv() {
            wr.write_all(a.as_bytes()).await.unwrap();
        }
        if let Some(rate) = bytes_per_s {
            let due = start + Duration::from_secs_f64(sent as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        wr.write_all(piece).await.unwrap();
        sent += piece.len();
    }
    // Keep answering (pings, resyncs) until the client goes.
    while let Some(a) = answers.recv().await {
        if wr.write_all(a.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn main() {
    let copies = env_num("COPIES").unwrap_or(550) as usize;
    let rate = env_num("RATE");
    let base = captures::capture_frames();

    let mut config = Config::default();
    config.calls.inbound_contexts = vec!["from-trunk".into()];
    config.calls.send_internal = true;
    config.pbx.system_id = "bench".into();
    if let Some(max) = env_num("MAX_BACKLOG") {
        config.ami.max_backlog = max as usize;
    }

    // Calls one copy makes, straight through a call model.
    let per_copy = {
        let one = captures::multiplied_from(&base, 0..1);
        let mut model = CallModel::new(Classifier::new(&config), "bench");
        let mut parser = Parser::without_banner(Limits::default());
        parser.push(&one);
        let (mut out, mut t) = (Vec::new(), 0i64);
        while let Some(item) = parser.next_item() {
            if let Item::Frame(f) = item {
                t += 1;
                model.on_event(&f, t, &mut out);
            }
        }
        model.tick(t + 60_000, &mut out);
        out.iter()
            .filter(|o| matches!(o, Output::Finished(_)))
            .count() as u64
    };
    let stream = captures::multiplied_from(&base, 0..copies);
    let events = captures::count_events(&stream) as u64;
    let expected = per_copy * copies as u64;
    let mb = stream.len() as f64 / 1e6;
    let bytes_per_s = rate.map(|r| r as f64 * stream.len() as f64 / events as f64);
    let pieces = Arc::new(pieces(&stream));
    drop(stream);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        config.ami.port = listener.local_addr().unwrap().port();
        config.ami.secret = Secret::new("bench");
        let (began_tx, began) = tokio::sync::oneshot::channel();
        tokio::spawn(serve(listener, pieces, bytes_per_s, began_tx));

        let baseline = LIVE.load(Ordering::Relaxed);
        let ami = AmiClient::start(config.ami.clone());
        let (live_tx, mut live_rx) = mpsc::channel(1024);
        tokio::spawn(async move { while live_rx.recv().await.is_some() {} });
        let sink = RecentCalls::new(16);
        let stats = Arc::new(TrackerStats::default());
        let (_tracker, _task) = CallTracker::start(
            &config,
            ami.clone(),
            live_tx,
            Arc::new(sink.clone()) as Arc<dyn CallSink>,
            stats.clone(),
            None,
            None,
        );
        let start = began.await.unwrap();
        let read_before = ami.counters().events.load(Ordering::Relaxed);

        // Sample every millisecond until the tracker has handled every event.
        let (mut read_done, mut peak_heap) = (None, 0usize);
        let tracked_done = loop {
            peak_heap = peak_heap.max(LIVE.load(Ordering::Relaxed).saturating_sub(baseline));
            let read = ami.counters().events.load(Ordering::Relaxed) - read_before;
            if read_done.is_none() && read >= events {
                read_done = Some(start.elapsed());
            }
            let b = ami.backlog();
            if stats.ami_events.load(Ordering::Relaxed) + b.dropped >= events + read_before
                && read >= events
                && b.waiting == 0
            {
                break start.elapsed();
            }
            assert!(start.elapsed() < Duration::from_secs(600), "stuck");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        // Calls end 2 s after their last hangup (late events): wait for them, at most 30 s.
        let _ = tokio::time::timeout(Duration::from_secs(30), sink.wait_for(expected)).await;
        let backlog = ami.backlog();
        let read_s = read_done.unwrap_or(tracked_done).as_secs_f64();
        let tracked_s = tracked_done.as_secs_f64();
        println!(
            "ami_ingest: {events} events ({mb:.1} MB) from {copies} copies of the captures over TCP, {}",
            match rate {
                Some(r) => format!("paced at {r} events/s"),
                None => "all at once".to_string(),
            }
        );
        println!(
            "  reader: {:.0} events/s ({read_s:.2} s); tracker: {:.0} events/s, every event handled after {tracked_s:.2} s",
            events as f64 / read_s,
            events as f64 / tracked_s
        );
        println!(
            "  calls finished {} / expected {expected}; events tracked {}, dropped {}, backlog overflows {}, resyncs {}",
            sink.count(),
            stats.ami_events.load(Ordering::Relaxed),
            backlog.dropped,
            backlog.overflows,
            stats.resyncs.load(Ordering::Relaxed)
        );
        println!(
            "  backlog peak {} events (max {}); heap peak {:.1} MB over baseline ({:.0} bytes per waiting event, model included); peak RSS {:.1} MB (the sent stream included)",
            backlog.peak,
            backlog.max,
            peak_heap as f64 / 1e6,
            peak_heap as f64 / backlog.peak.max(1) as f64,
            peak_rss_mb()
        );
        ami.stop();
    });
}
