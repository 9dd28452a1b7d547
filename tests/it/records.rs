//! Recordings over real HTTP: signed links from the outbox, tampering, expiry, traversal,
//! sniffed content types, ranges, HEAD, conditional requests, a large sparse file with flat
//! memory, and conversion through fake encoders.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pbxgate::calls::CallRecord;
use pbxgate::config::Config;
use pbxgate::outbox::Drain;
use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{call_record, TestApp, T0};

const MP3_FRAME: [u8; 4] = [0xff, 0xfb, 0x90, 0x64];

struct Rec {
    app: TestApp,
    dir: PathBuf,
    _tmp: TempDir,
}

/// pbxgate with `records.dir` in a fresh directory; uploads only when a test drains.
async fn rec_app(tweak: impl FnOnce(&mut Config)) -> Rec {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("monitor");
    std::fs::create_dir(&dir).unwrap();
    let dir = std::fs::canonicalize(dir).unwrap();
    let records_dir = dir.clone();
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.crm.max_retries = 0;
        c.crm.timezone = "Europe/Moscow".into();
        c.history.immediate = false;
        c.history.interval = Duration::from_secs(3600);
        c.history.record_settle = Duration::ZERO;
        c.records.dir = records_dir;
        tweak(c);
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), app.state.outbox.wait_changes(1))
        .await
        .expect("startup drain");
    Rec {
        app,
        dir,
        _tmp: tmp,
    }
}

fn record(id: &str, recordings: Vec<String>) -> CallRecord {
    CallRecord {
        recordings,
        ..call_record(id, T0)
    }
}

/// A RIFF/WAVE header (mono 8 kHz) for `data_len` bytes with this format tag.
fn wav_header(format_tag: u16, data_len: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&(36 + data_len).to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&format_tag.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&8000u32.to_le_bytes());
    h.extend_from_slice(&16000u32.to_le_bytes());
    h.extend_from_slice(&2u16.to_le_bytes());
    h.extend_from_slice(&16u16.to_le_bytes());
    h.extend_from_slice(b"data");
    h.extend_from_slice(&data_len.to_le_bytes());
    h
}

/// A PCM WAV of `len` bytes in all, with a recognisable data pattern.
fn wav_bytes(len: usize) -> Vec<u8> {
    let mut data = wav_header(1, (len - 44) as u32);
    data.extend((0..len - 44).map(|i| (i % 251) as u8));
    data
}

impl Rec {
    fn write(&self, name: &str, data: &[u8]) -> String {
        let path = self.dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
        path.to_string_lossy().into_owned()
    }

    /// Links a call with this recording (as the outbox does before an upload): its URL.
    async fn link(&self, id: &str, path: &str) -> String {
        self.app
            .state
            .records
            .ensure_link(
                &record(id, vec![path.to_string()]),
                &jiff::tz::TimeZone::UTC,
            )
            .await
            .unwrap()
            .expect("linked")
    }

    async fn get(&self, url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self.app.http.get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }
}

fn header<'a>(res: &'a reqwest::Response, name: &str) -> &'a str {
    res.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", res.headers()))
        .to_str()
        .unwrap()
}

async fn json_error(res: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(res.status(), status);
    assert!(header(&res, "content-type").starts_with("application/json"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["success"], false, "{body}");
    body
}

/// Sends `request` as is (no client normalising the path) and reads the whole answer.
async fn raw(app: &TestApp, request: &str) -> String {
    let addr = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("the server closes the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn the_uploaded_record_url_serves_the_recording_with_its_headers() {
    let rec = rec_app(|_| {}).await;
    let data = wav_bytes(10_000);
    let path = rec.write("2026/11/21/in-79991234567-101.wav", &data);
    let outbox = &rec.app.state.outbox;
    outbox.enqueue(record("pbx-1", vec![path])).await.unwrap();
    assert_eq!(outbox.drain().await, Drain::Done);
    let calls = rec.app.crm.calls();
    let url = calls["pbx-1"]["recordUrl"].as_str().unwrap().to_string();
    assert!(
        url.starts_with(&format!("{}/records/", rec.app.base)),
        "{url}"
    );
    assert!(url.ends_with(".wav"), "{url}");
    assert!(
        !url.contains("monitor") && !url.contains("79991234567"),
        "{url}"
    );

    let res = rec.get(&url, &[]).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "content-type"), "audio/wav");
    assert_eq!(header(&res, "content-length"), "10000");
    assert_eq!(header(&res, "accept-ranges"), "bytes");
    assert_eq!(header(&res, "access-control-allow-origin"), "*");
    assert_eq!(
        header(&res, "content-disposition"),
        "inline; filename=\"2026-11-21_13-00-00-+79991234567.wav\""
    );
    assert!(header(&res, "etag").starts_with('"'));
    assert!(header(&res, "last-modified").ends_with(" GMT"));
    assert_eq!(res.bytes().await.unwrap().as_ref(), data.as_slice());

    // The same call linked again (a re-upload after a crash) gets the same URL.
    let again = rec
        .app
        .state
        .records
        .ensure_link(
            &record("pbx-1", vec!["elsewhere.wav".into()]),
            &jiff::tz::TimeZone::UTC,
        )
        .await
        .unwrap();
    assert_eq!(again.as_deref(), Some(url.as_str()));

    // A call without a linkable recording is uploaded without recordUrl.
    outbox
        .enqueue(record("pbx-2", vec!["/nowhere/x.wav".into()]))
        .await
        .unwrap();
    outbox.drain().await;
    assert!(rec.app.crm.calls()["pbx-2"].get("recordUrl").is_none());

    let ready = rec.app.ready().await;
    assert_eq!(ready["records"]["linking"], true, "{ready}");
}

#[tokio::test]
async fn tampered_unknown_and_expired_links_are_refused() {
    let rec = rec_app(|c| c.records.link_ttl = Duration::from_secs(3600)).await;
    let path = rec.write("in-1.wav", &wav_bytes(1000));
    let url = rec.link("pbx-1", &path).await;
    assert_eq!(rec.get(&url, &[]).await.status(), StatusCode::OK);

    // One character changed in the middle of the token (the MAC or the id).
    let token_start = url.rfind('/').unwrap() + 1;
    for at in [token_start + 3, token_start + 30, token_start + 60] {
        let mut bytes = url.clone().into_bytes();
        bytes[at] = if bytes[at] == b'x' { b'y' } else { b'x' };
        let tampered = String::from_utf8(bytes).unwrap();
        let body = json_error(rec.get(&tampered, &[]).await, StatusCode::NOT_FOUND).await;
        assert_eq!(body["errorMsg"], "no such recording");
    }
    json_error(
        rec.get(&rec.app.url("/records/nothing.wav"), &[]).await,
        StatusCode::NOT_FOUND,
    )
    .await;

    // A link made two hours ago with a one-hour lifetime.
    let old = rec.write("in-2.wav", &wav_bytes(1000));
    let state = &rec.app.state;
    let two_hours_ago = pbxgate::store::unix_now() - 7200;
    let (id, entry, _) = state
        .records
        .link_at(
            &record("pbx-2", vec![old]),
            &jiff::tz::TimeZone::UTC,
            two_hours_ago,
        )
        .unwrap()
        .unwrap();
    let expired = state.records.url(&id, &entry);
    let body = json_error(rec.get(&expired, &[]).await, StatusCode::GONE).await;
    assert!(body["errorMsg"].as_str().unwrap().contains("expired"));
    assert_eq!(
        rec.app.http.head(&expired).send().await.unwrap().status(),
        StatusCode::GONE
    );
}

#[tokio::test]
async fn a_link_with_another_extension_is_not_found() {
    let rec = rec_app(|_| {}).await;
    let url = rec
        .link("pbx-1", &rec.write("in-1.wav", &wav_bytes(1000)))
        .await;
    assert!(url.ends_with(".wav"), "{url}");
    assert_eq!(rec.get(&url, &[]).await.status(), StatusCode::OK);
    let stem = url.strip_suffix(".wav").unwrap();
    for other in [".anything", ".mp3", ".WAV", ".wav.mp3", ".wav.", ""] {
        let res = rec.get(&format!("{stem}{other}"), &[]).await;
        let body = json_error(res, StatusCode::NOT_FOUND).await;
        assert_eq!(body["errorMsg"], "no such recording", "{other:?}");
        let head = rec.app.http.head(format!("{stem}{other}")).send().await;
        assert_eq!(head.unwrap().status(), StatusCode::NOT_FOUND, "{other:?}");
    }
}

#[tokio::test]
async fn recordings_past_keep_days_are_gone() {
    let rec = rec_app(|c| c.records.keep_days = 1).await;
    let path = rec.write("in-1.wav", &wav_bytes(1000));
    // A call of three days ago, linked back then.
    let mut r = record("pbx-1", vec![path]);
    let three_days_ago = pbxgate::store::unix_now() - 3 * 86400;
    r.start = (three_days_ago as i64) * 1000;
    let (id, entry, _) = rec
        .app
        .state
        .records
        .link_at(&r, &jiff::tz::TimeZone::UTC, three_days_ago)
        .unwrap()
        .unwrap();
    let url = rec.app.state.records.url(&id, &entry);
    json_error(rec.get(&url, &[]).await, StatusCode::GONE).await;
    // Not linked at all when uploaded after its retention.
    let late = record("pbx-2", vec![rec.write("in-2.wav", &wav_bytes(1000))]);
    assert_eq!(
        rec.app
            .state
            .records
            .ensure_link(
                &CallRecord {
                    start: r.start,
                    ..late
                },
                &jiff::tz::TimeZone::UTC
            )
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn traversal_attempts_are_not_found() {
    let rec = rec_app(|_| {}).await;
    let outside = rec.dir.parent().unwrap().join("outside.wav");
    std::fs::write(&outside, wav_bytes(1000)).unwrap();

    // One segment after /records/ reaches the recordings handler, which finds no such token;
    // anything with more segments matches no route at all.
    const HANDLER: &str = "no such recording";
    const NO_ROUTE: &str = "no such endpoint";
    for (path, why) in [
        ("/records/..%2F..%2Fetc%2Fpasswd", HANDLER),
        ("/records/../../etc/passwd", NO_ROUTE),
        ("/records/%2e%2e/%2e%2e/etc/passwd", NO_ROUTE),
        ("/records//etc/passwd", NO_ROUTE),
        ("/records/%2Fetc%2Fpasswd", HANDLER),
        ("/records/..", HANDLER),
        ("/records/%2e%2e%2foutside.wav", HANDLER),
        (&format!("/records/{}", outside.display()), NO_ROUTE),
    ] {
        let answer = raw(
            &rec.app,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{path}: {answer}");
        assert!(
            answer.contains(&format!("\"success\":false,\"errorMsg\":\"{why}\"")),
            "{path}: {answer}"
        );
        assert!(!answer.contains("root:"), "{path}");
    }

    // Recordings pointing outside the directory are never linked: absolute, `..`, a symlink.
    std::os::unix::fs::symlink(&outside, rec.dir.join("link.wav")).unwrap();
    for raw_path in [
        outside.display().to_string(),
        format!("{}/../outside.wav", rec.dir.display()),
        "../outside.wav".to_string(),
        rec.dir.join("link.wav").display().to_string(),
    ] {
        let r = record("pbx-t", vec![raw_path.clone()]);
        assert_eq!(
            rec.app
                .state
                .records
                .ensure_link(&r, &jiff::tz::TimeZone::UTC)
                .await
                .unwrap(),
            None,
            "{raw_path}"
        );
    }

    // A linked file replaced by a symlink to the outside afterwards is refused.
    let inside = rec.write("in-1.wav", &wav_bytes(1000));
    let url = rec.link("pbx-1", &inside).await;
    let res = rec.get(&url, &[]).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.bytes().await.unwrap().len(), 1000);
    std::fs::remove_file(&inside).unwrap();
    std::os::unix::fs::symlink(&outside, &inside).unwrap();
    let body = json_error(rec.get(&url, &[]).await, StatusCode::NOT_FOUND).await;
    assert_eq!(body["errorMsg"], "the recording is not available");

    // So is one replaced by a FIFO (which would block a reader waiting for a writer).
    let fifo = rec.write("in-2.wav", &wav_bytes(1000));
    let url = rec.link("pbx-2", &fifo).await;
    assert_eq!(rec.get(&url, &[]).await.status(), StatusCode::OK);
    std::fs::remove_file(&fifo).unwrap();
    let c_path = std::ffi::CString::new(fifo).unwrap();
    // SAFETY: mkfifo(3) with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let res = tokio::time::timeout(Duration::from_secs(10), rec.get(&url, &[]))
        .await
        .expect("answered without waiting for a writer");
    let body = json_error(res, StatusCode::NOT_FOUND).await;
    assert_eq!(body["errorMsg"], "the recording is not available");
}

#[tokio::test]
async fn content_type_comes_from_the_bytes_not_the_name() {
    let rec = rec_app(|_| {}).await;
    let mut mp3 = MP3_FRAME.to_vec();
    mp3.resize(417 * 3, 0);
    let mut id3 = b"ID3\x04\x00\x00\x00\x00\x00\x0a".to_vec();
    id3.extend_from_slice(&[0; 10]);
    id3.extend_from_slice(&mp3);
    let mut ogg = b"OggS\x00\x02".to_vec();
    ogg.resize(28, 0);
    let mut opus = ogg.clone();
    opus.extend_from_slice(b"OpusHead\x01\x01\x38\x01");
    let mut vorbis = ogg;
    vorbis.extend_from_slice(b"\x01vorbis\x00\x00\x00\x00");
    let mut gsm = vec![0u8; 33 * 10];
    for frame in gsm.chunks_mut(33) {
        frame[0] = 0xd9;
    }
    let mut wav49 = wav_header(0x31, 65 * 4);
    wav49.resize(44 + 65 * 4, 0);
    // Every file carries a misleading extension.
    let cases: [(&str, Vec<u8>, &str, &str); 8] = [
        ("a.mp3", wav_bytes(2000), "audio/wav", "wav"),
        ("b.wav", mp3, "audio/mpeg", "mp3"),
        ("c.wav", id3, "audio/mpeg", "mp3"),
        ("d.mp3", opus, "audio/ogg", "opus"),
        ("e.wav", vorbis, "audio/ogg", "ogg"),
        ("f.wav", gsm, "audio/x-gsm", "gsm"),
        ("g.gsm", wav49, "audio/x-wav", "wav"),
        (
            "h.wav",
            b"<html>not audio</html>".to_vec(),
            "application/octet-stream",
            "bin",
        ),
    ];
    for (i, (name, data, content_type, ext)) in cases.into_iter().enumerate() {
        let path = rec.write(name, &data);
        let url = rec.link(&format!("pbx-{i}"), &path).await;
        assert!(url.ends_with(&format!(".{ext}")), "{name}: {url}");
        let res = rec.get(&url, &[]).await;
        assert_eq!(res.status(), StatusCode::OK, "{name}");
        assert_eq!(header(&res, "content-type"), content_type, "{name}");
        assert!(
            header(&res, "content-disposition").ends_with(&format!(".{ext}\"")),
            "{name}"
        );
        assert_eq!(header(&res, "x-content-type-options"), "nosniff");
        assert_eq!(res.bytes().await.unwrap().len(), data.len(), "{name}");
    }
}

#[tokio::test]
async fn single_ranges_and_unsatisfiable_ones() {
    let rec = rec_app(|_| {}).await;
    let data = wav_bytes(100_000);
    let url = rec.link("pbx-1", &rec.write("in.wav", &data)).await;

    for (range, start, end) in [
        ("bytes=0-99", 0usize, 100usize),
        ("bytes=40000-40999", 40_000, 41_000),
        ("bytes=-500", 99_500, 100_000),
        ("bytes=99990-", 99_990, 100_000),
        ("bytes=99000-200000", 99_000, 100_000),
    ] {
        let res = rec.get(&url, &[("range", range)]).await;
        assert_eq!(res.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            header(&res, "content-range"),
            format!("bytes {start}-{}/100000", end - 1),
            "{range}"
        );
        assert_eq!(header(&res, "content-length"), (end - start).to_string());
        assert_eq!(header(&res, "content-type"), "audio/wav");
        assert_eq!(
            res.bytes().await.unwrap().as_ref(),
            &data[start..end],
            "{range}"
        );
    }

    for range in ["bytes=100000-", "bytes=200000-300000", "bytes=-0"] {
        let res = rec.get(&url, &[("range", range)]).await;
        assert_eq!(header(&res, "content-range"), "bytes */100000", "{range}");
        json_error(res, StatusCode::RANGE_NOT_SATISFIABLE).await;
    }

    // Several ranges, another unit, nonsense: the whole file.
    for range in ["bytes=0-1,5-6", "items=0-1", "bytes=9-3"] {
        let res = rec.get(&url, &[("range", range)]).await;
        assert_eq!(res.status(), StatusCode::OK, "{range}");
        assert_eq!(res.bytes().await.unwrap().len(), data.len());
    }

    // If-Range: the current ETag keeps the range; another one gets the whole file.
    let etag = header(&rec.get(&url, &[]).await, "etag").to_string();
    let res = rec
        .get(&url, &[("range", "bytes=0-9"), ("if-range", &etag)])
        .await;
    assert_eq!(res.status(), StatusCode::PARTIAL_CONTENT);
    let res = rec
        .get(&url, &[("range", "bytes=0-9"), ("if-range", "\"other\"")])
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn head_has_the_headers_and_no_body() {
    let rec = rec_app(|_| {}).await;
    let url = rec
        .link("pbx-1", &rec.write("in.wav", &wav_bytes(50_000)))
        .await;
    let path = &url[rec.app.base.len()..];
    let answer = raw(
        &rec.app,
        &format!("HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    for line in [
        "content-length: 50000",
        "content-type: audio/wav",
        "accept-ranges: bytes",
        "access-control-allow-origin: *",
        "etag: \"",
        "last-modified: ",
        "content-disposition: inline; filename=",
    ] {
        assert!(head.contains(line), "{line} missing in {head}");
    }
    assert!(body.is_empty(), "HEAD sent {} body bytes", body.len());

    let answer = raw(
        &rec.app,
        &format!(
            "HEAD {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=100-199\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 206"), "{head}");
    assert!(
        head.contains("content-range: bytes 100-199/50000"),
        "{head}"
    );
    assert!(head.contains("content-length: 100"), "{head}");
    assert!(body.is_empty());
}

#[tokio::test]
async fn conditional_requests_answer_not_modified() {
    let rec = rec_app(|_| {}).await;
    let url = rec
        .link("pbx-1", &rec.write("in.wav", &wav_bytes(5_000)))
        .await;
    let first = rec.get(&url, &[]).await;
    let etag = header(&first, "etag").to_string();
    let modified = header(&first, "last-modified").to_string();

    for headers in [
        vec![("if-none-match", etag.as_str())],
        vec![("if-none-match", &format!("\"nope\", {etag}"))],
        vec![("if-none-match", "*")],
        vec![("if-none-match", &format!("W/{etag}"))],
        vec![("if-modified-since", modified.as_str())],
        vec![("if-modified-since", "Fri, 01 Jan 2100 00:00:00 GMT")],
    ] {
        let res = rec.get(&url, &headers).await;
        assert_eq!(res.status(), StatusCode::NOT_MODIFIED, "{headers:?}");
        assert_eq!(header(&res, "etag"), etag);
        assert_eq!(header(&res, "access-control-allow-origin"), "*");
        assert!(res.bytes().await.unwrap().is_empty());
    }
    for headers in [
        vec![("if-none-match", "\"other\"")],
        vec![("if-modified-since", "Sat, 01 Jan 2000 00:00:00 GMT")],
        vec![("if-modified-since", "garbage")],
        // If-None-Match wins over If-Modified-Since.
        vec![
            ("if-none-match", "\"other\""),
            ("if-modified-since", modified.as_str()),
        ],
    ] {
        let res = rec.get(&url, &headers).await;
        assert_eq!(res.status(), StatusCode::OK, "{headers:?}");
        assert_eq!(res.bytes().await.unwrap().len(), 5_000);
    }
}

#[tokio::test]
async fn a_file_dated_before_1970_is_served_without_last_modified() {
    let rec = rec_app(|_| {}).await;
    let data = wav_bytes(5_000);
    let path = rec.write("in.wav", &data);
    let long_ago = std::time::UNIX_EPOCH - Duration::from_secs(10 * 365 * 86400);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(long_ago)
        .unwrap();
    assert!(std::fs::metadata(&path).unwrap().modified().unwrap() < std::time::UNIX_EPOCH);
    let url = rec.link("pbx-1", &path).await;

    let res = rec.get(&url, &[]).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().get("last-modified").is_none(), "{res:?}");
    let etag = header(&res, "etag").to_string();
    assert_eq!(res.bytes().await.unwrap().as_ref(), data.as_slice());
    let head = rec.app.http.head(&url).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert!(head.headers().get("last-modified").is_none());

    // Dates cannot validate it; the ETag still does.
    let since = rec
        .get(
            &url,
            &[("if-modified-since", "Fri, 01 Jan 2100 00:00:00 GMT")],
        )
        .await;
    assert_eq!(since.status(), StatusCode::OK);
    let if_range = rec
        .get(
            &url,
            &[
                ("range", "bytes=0-9"),
                ("if-range", "Thu, 01 Jan 1970 00:00:00 GMT"),
            ],
        )
        .await;
    assert_eq!(if_range.status(), StatusCode::OK);
    assert_eq!(if_range.bytes().await.unwrap().len(), data.len());
    let tagged = rec.get(&url, &[("if-none-match", &etag)]).await;
    assert_eq!(tagged.status(), StatusCode::NOT_MODIFIED);
    let ranged = rec
        .get(&url, &[("range", "bytes=0-9"), ("if-range", &etag)])
        .await;
    assert_eq!(ranged.status(), StatusCode::PARTIAL_CONTENT);
}

#[tokio::test]
async fn a_missing_recording_is_a_json_not_found() {
    let rec = rec_app(|_| {}).await;
    let path = rec.write("in.wav", &wav_bytes(1_000));
    let url = rec.link("pbx-1", &path).await;
    std::fs::remove_file(&path).unwrap();
    let body = json_error(rec.get(&url, &[]).await, StatusCode::NOT_FOUND).await;
    assert_eq!(body["errorMsg"], "the recording is not available");
    assert_eq!(
        rec.app.http.head(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test]
async fn a_200_mb_sparse_file_streams_with_flat_memory() {
    const LEN: u64 = 200 * 1024 * 1024;
    const SECRET: &str = "records-secret-for-the-memory-test";
    let tmp = tempfile::tempdir().unwrap();
    let monitor = tmp.path().join("monitor");
    std::fs::create_dir(&monitor).unwrap();
    let path = monitor.join("big.wav");
    {
        let file = std::fs::File::create(&path).unwrap();
        std::os::unix::fs::FileExt::write_at(&file, &wav_header(1, (LEN - 44) as u32), 0).unwrap();
        std::os::unix::fs::FileExt::write_at(&file, b"end!", LEN - 4).unwrap();
        file.set_len(LEN).unwrap(); // the rest is a hole
    }
    // The link is made through the library, then the binary serves it: its memory is measured
    // alone, whatever the other tests in this process do.
    let link_path = {
        let store = pbxgate::store::Store::open(&tmp.path().join("store")).unwrap();
        let mut config = Config::default();
        config.records.dir = monitor.clone();
        let records = pbxgate::records::Records::new(
            &config,
            store.records().unwrap(),
            pbxgate::base::secret::Secret::new(SECRET),
        );
        let url = records
            .ensure_link(
                &record("pbx-big", vec![path.to_string_lossy().into_owned()]),
                &jiff::tz::TimeZone::UTC,
            )
            .await
            .unwrap()
            .unwrap();
        url[url.find("/records/").unwrap()..].to_string()
    };
    let env = [
        ("PBXGATE__HTTP__LISTEN", "127.0.0.1:0".to_string()),
        ("PBXGATE__AMI__PORT", "1".to_string()),
        (
            "PBXGATE__STORAGE__PATH",
            tmp.path().join("store").to_string_lossy().into_owned(),
        ),
        (
            "PBXGATE__RECORDS__DIR",
            monitor.to_string_lossy().into_owned(),
        ),
        ("PBXGATE__RECORDS__SECRET", SECRET.to_string()),
        ("PBXGATE__LOG__LEVEL", "warn,pbxgate=info".to_string()),
    ];
    let (child, base) = crate::cli::serve(tmp.path(), &env).await;
    let pid = child.id().unwrap();
    let client = reqwest::Client::new();
    // Warm up: the first requests allocate the server's per-worker buffers.
    for _ in 0..2 {
        let res = client
            .get(format!("{base}{link_path}"))
            .header("range", "bytes=0-1048575")
            .send()
            .await
            .unwrap();
        assert_eq!(res.bytes().await.unwrap().len(), 1 << 20);
    }
    let before = rss_bytes(pid);
    let mut peak = before;
    let mut res = client
        .get(format!("{base}{link_path}"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&res, "content-length"), LEN.to_string());
    let mut received = 0u64;
    let mut last = Vec::new();
    let mut chunks = 0u64;
    while let Some(chunk) = res.chunk().await.unwrap() {
        received += chunk.len() as u64;
        last = chunk.to_vec();
        chunks += 1;
        if chunks % 64 == 0 {
            peak = peak.max(rss_bytes(pid));
        }
    }
    peak = peak.max(rss_bytes(pid));
    assert_eq!(received, LEN);
    assert!(last.ends_with(b"end!"));
    // A sanity bound, not a benchmark: buffering the file would take 200 MB.
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 16 * 1024 * 1024,
        "the server's RSS grew by {} KB while streaming 200 MB",
        growth / 1024
    );
}

/// A fake encoder: a shell script run as `sh <script> {input} {output}`.
fn encoder(dir: &Path, name: &str, body: &str) -> Vec<String> {
    let script = dir.join(name);
    std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
    vec![
        "sh".into(),
        script.to_string_lossy().into_owned(),
        "{input}".into(),
        "{output}".into(),
    ]
}

/// Queues a call with a WAV recording, lets the outbox convert and upload it, and returns the
/// uploaded recordUrl and the recording's path.
async fn convert_and_upload(rec: &Rec) -> (String, String) {
    let path = rec.write("in-79991234567.wav", &wav_bytes(4_000));
    let outbox = &rec.app.state.outbox;
    outbox
        .enqueue(record("pbx-c", vec![path.clone()]))
        .await
        .unwrap();
    // The first drain starts the conversion and holds the call back; the uploader drains again
    // by itself when the conversion has finished.
    assert_eq!(outbox.drain().await, Drain::Done);
    tokio::time::timeout(Duration::from_secs(20), outbox.wait_until(|s| s.done == 1))
        .await
        .expect("uploaded after the conversion");
    let url = rec.app.crm.calls()["pbx-c"]["recordUrl"]
        .as_str()
        .unwrap()
        .to_string();
    (url, path)
}

#[tokio::test]
async fn a_converted_mp3_is_cached_next_to_the_original_and_served() {
    let scripts = tempfile::tempdir().unwrap();
    let command = encoder(
        scripts.path(),
        "ok.sh",
        r"printf '\377\373\220\144' > $2 && head -c 413 /dev/zero >> $2",
    );
    let rec = rec_app(|c| {
        c.records.convert = "mp3".into();
        c.records.convert_command = command;
    })
    .await;
    let (url, path) = convert_and_upload(&rec).await;
    assert!(url.ends_with(".mp3"), "{url}");
    let copy = format!("{path}.mp3");
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), 417);
    let res = rec.get(&url, &[]).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "content-type"), "audio/mpeg");
    assert!(header(&res, "content-disposition").ends_with(".mp3\""));
    let body = res.bytes().await.unwrap();
    assert_eq!(&body[..4], &MP3_FRAME);
    // No temporary files left behind.
    let names: Vec<String> = std::fs::read_dir(&rec.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(rec.app.state.records.status().converted, 1);
}

#[tokio::test]
async fn a_failing_encoder_leaves_the_original_served() {
    let scripts = tempfile::tempdir().unwrap();
    let command = encoder(
        scripts.path(),
        "fail.sh",
        "echo \"cannot encode $1\" >&2; : > $2; exit 1",
    );
    let rec = rec_app(|c| {
        c.records.convert = "mp3".into();
        c.records.convert_command = command;
    })
    .await;
    let (url, path) = convert_and_upload(&rec).await;
    assert!(url.ends_with(".wav"), "{url}");
    assert!(!Path::new(&format!("{path}.mp3")).exists());
    let res = rec.get(&url, &[]).await;
    assert_eq!(header(&res, "content-type"), "audio/wav");
    assert_eq!(res.bytes().await.unwrap().len(), 4_000);
    assert_eq!(rec.app.state.records.status().conversion_failures, 1);
    assert_eq!(
        std::fs::read_dir(&rec.dir).unwrap().count(),
        1,
        "the partial output is removed"
    );
}

/// Whether process `pid` has ended: no longer in /proc, or a zombie (dead, only waiting for
/// its parent, or for an init that may not reap in a container, to collect its status).
fn has_ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

#[tokio::test]
async fn an_encoder_past_its_timeout_is_killed_and_the_original_served() {
    let scripts = tempfile::tempdir().unwrap();
    let pids = scripts.path().join("pids");
    // The encoder's shell and a background child of its own: both must go.
    let command = encoder(
        scripts.path(),
        "slow.sh",
        &format!(
            "sleep 30 &\necho \"$$ $!\" > {0}.tmp && mv {0}.tmp {0}\nwait",
            pids.display()
        ),
    );
    let rec = rec_app(|c| {
        c.records.convert = "mp3".into();
        c.records.convert_command = command;
        c.records.convert_timeout = Duration::from_secs(1);
    })
    .await;
    let (url, _) = convert_and_upload(&rec).await;
    assert!(url.ends_with(".wav"), "{url}");
    let res = rec.get(&url, &[]).await;
    assert_eq!(header(&res, "content-type"), "audio/wav");
    assert_eq!(rec.app.state.records.status().conversion_failures, 1);

    let pids: Vec<u32> = std::fs::read_to_string(&pids)
        .expect("the encoder wrote its pids before the timeout")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    // Killed together with the SIGKILL to the group; their teardown takes a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !pids.iter().all(|&pid| has_ended(pid)) {
        assert!(
            std::time::Instant::now() < deadline,
            "still running: {:?}",
            pids.iter().filter(|&&p| !has_ended(p)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_unusable_mp3_copy_is_passed_over_for_the_original() {
    let rec = rec_app(|c| c.records.convert = "mp3".into()).await;
    let data = wav_bytes(3_000);
    let path = rec.write("in.wav", &data);
    let copy = format!("{path}.mp3");
    let mut mp3 = MP3_FRAME.to_vec();
    mp3.resize(417, 0);
    std::fs::write(&copy, &mp3).unwrap();
    let url = rec.link("pbx-1", &path).await;
    assert!(url.ends_with(".mp3"), "{url}");
    let res = rec.get(&url, &[]).await;
    assert_eq!(header(&res, "content-type"), "audio/mpeg");
    assert_eq!(res.bytes().await.unwrap().as_ref(), mp3.as_slice());

    for broken in [&b""[..], b"<html>not mp3</html>"] {
        std::fs::write(&copy, broken).unwrap();
        let res = rec.get(&url, &[]).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header(&res, "content-type"), "audio/wav");
        assert!(header(&res, "content-disposition").ends_with(".wav\""));
        assert_eq!(res.bytes().await.unwrap().as_ref(), data.as_slice());
    }
}
