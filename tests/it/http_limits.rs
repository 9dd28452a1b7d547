//! Slow clients and connection limits: nobody can hold the server's connections for free.
//! Clients come from other loopback addresses (127.0.0.2, ...) than the test's own HTTP client,
//! so that the per-address limit sets them apart.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::TestApp;

/// Bounds every wait on the server: far above what any step needs.
const PATIENCE: Duration = Duration::from_secs(30);

async fn app_with(tweak: impl FnOnce(&mut pbxgate::config::Config)) -> TestApp {
    let app = TestApp::spawn(|c| {
        c.crm.register_on_start = false;
        c.click_to_call.per_extension_per_minute = 0;
        c.click_to_call.global_per_minute = 0;
        c.http.client_timeout = Duration::from_secs(1);
        tweak(c);
    })
    .await;
    app.ami_connected().await;
    app
}

fn server_addr(app: &TestApp) -> SocketAddr {
    app.base.strip_prefix("http://").unwrap().parse().unwrap()
}

/// A connection from `from` (every 127.x address is this machine's).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.expect("connect")
}

/// Everything the server sends until it closes the connection (a reset counts as closed).
async fn read_until_closed(read: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match read.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The status and JSON body of one HTTP/1.1 answer at the start of `raw`.
fn parse_answer(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(body.len());
    (status, serde_json::from_str(&body[..len]).unwrap())
}

/// Reads one answer to a request on a connection that stays open.
async fn read_answer(stream: &mut TcpStream) -> (u16, Value) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before a whole answer");
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + len {
                return parse_answer(&got);
            }
        }
    }
}

/// How a slow client's connection ended.
#[derive(Debug)]
enum End {
    /// Closed without an answer (refused by a connection limit).
    Closed,
    /// Answered, then closed.
    Answered(u16, Value),
}

/// A click-to-call head announcing a 60,000-byte body, then one byte every `pause`, until the
/// server closes the connection.
async fn slow_body(stream: TcpStream, pause: Duration) -> End {
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let head = "POST /crm/make-call HTTP/1.1\r\nHost: pbxgate\r\n\
                    Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 60000\r\n\r\n";
        if write.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        while write.write_all(b"a").await.is_ok() {
            tokio::time::sleep(pause).await;
        }
    });
    let got = read_until_closed(&mut read).await;
    writer.abort();
    if got.is_empty() {
        End::Closed
    } else {
        let (status, body) = parse_answer(&got);
        End::Answered(status, body)
    }
}

#[tokio::test]
async fn eleven_hundred_slow_clients_do_not_starve_the_server() {
    const SLOW: usize = 1100;
    const PER_IP: usize = 100;
    let app = app_with(|c| c.http.max_connections_per_ip = PER_IP).await;
    let to = server_addr(&app);
    let mut clients = Vec::with_capacity(SLOW);
    for _ in 0..SLOW {
        let stream = connect_from("127.0.0.2", to).await;
        clients.push(tokio::spawn(slow_body(stream, Duration::from_secs(5))));
    }

    // Everyone else is still served: health, and a click-to-call that reaches the PBX.
    let r = app.http.get(app.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .http
        .get(app.url("/crm/make-call"))
        .query(&[
            ("clientId", app.client_id().as_str()),
            ("code", "101"),
            ("phone", "+79991234567"),
            ("userId", "1"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.ami.wait_for_actions("Originate", 1).await;
    // The slow client never had more than its share (plus the test's own client).
    let (open, refused) = app.state.connections.counts();
    assert!(open <= PER_IP + 1, "{open} connections open");
    assert!(refused > 0);

    // Every slow connection is closed by the server: at once over the limit, else after a 408
    // once its body is late.
    let ends = tokio::time::timeout(PATIENCE, futures_util::future::join_all(clients))
        .await
        .expect("the server closes every slow connection");
    let (mut closed, mut timed_out) = (0, 0);
    for end in ends {
        match end.unwrap() {
            End::Closed => closed += 1,
            End::Answered(status, body) => {
                assert_eq!(status, 408, "{body}");
                assert_eq!(body["success"], false);
                assert!(
                    body["errorMsg"].as_str().unwrap().contains("body"),
                    "{body}"
                );
                timed_out += 1;
            }
        }
    }
    assert!(timed_out >= 1, "{timed_out} timed out, {closed} refused");
    assert!(closed >= SLOW - 2 * PER_IP, "{closed} refused");
    let ready = app.ready().await;
    assert_eq!(ready["http"]["maxConnectionsPerIp"], PER_IP);
    assert!(
        ready["http"]["refusedConnections"].as_u64().unwrap() >= closed as u64,
        "{ready}"
    );
}

#[tokio::test]
async fn connections_over_the_total_are_closed_at_once() {
    const MAX: usize = 20;
    let app = app_with(|c| {
        c.http.max_connections = MAX;
        c.http.max_connections_per_ip = 0;
        c.http.client_timeout = Duration::from_secs(20);
    })
    .await;
    let to = server_addr(&app);
    // MAX keep-alive connections, each answered once (so admitted) and kept open.
    let mut held = Vec::new();
    for i in 0..MAX {
        let mut s = connect_from(&format!("127.0.1.{}", i + 1), to).await;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: pbxgate\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_answer(&mut s).await.0, 200);
        held.push(s);
    }
    // One more, from yet another address: closed without an answer.
    let mut extra = connect_from("127.0.2.1", to).await;
    let _ = extra
        .write_all(b"GET /health HTTP/1.1\r\nHost: pbxgate\r\n\r\n")
        .await;
    let got = tokio::time::timeout(PATIENCE, read_until_closed(&mut extra))
        .await
        .expect("closed");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    // The held ones are still served.
    held[0]
        .write_all(b"GET /health HTTP/1.1\r\nHost: pbxgate\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut held[0]).await.0, 200);
    assert_eq!(app.state.connections.counts().0, MAX);
}

#[tokio::test]
async fn a_slow_head_is_cut_off_on_a_kept_alive_connection_too() {
    let app = app_with(|_| {}).await;
    let stream = connect_from("127.0.0.3", server_addr(&app)).await;
    let (mut read, mut write) = stream.into_split();
    write
        .write_all(b"GET /health HTTP/1.1\r\nHost: pbxgate\r\n\r\n")
        .await
        .unwrap();
    let mut first = Vec::new();
    while !first.ends_with(b"}") {
        let mut buf = [0u8; 1024];
        let n = read.read(&mut buf).await.unwrap();
        assert!(n > 0);
        first.extend_from_slice(&buf[..n]);
    }
    assert_eq!(parse_answer(&first).0, 200);
    // The next head never ends: one header byte every 300 ms.
    let writer = tokio::spawn(async move {
        if write
            .write_all(b"GET /health HTTP/1.1\r\nX-Slow: ")
            .await
            .is_err()
        {
            return;
        }
        while write.write_all(b"a").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let rest = tokio::time::timeout(PATIENCE, read_until_closed(&mut read))
        .await
        .expect("the server closes the connection");
    writer.abort();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}

#[tokio::test]
async fn a_body_nobody_reads_cannot_keep_the_connection() {
    let app = app_with(|_| {}).await;
    let stream = connect_from("127.0.0.4", server_addr(&app)).await;
    let (mut read, mut write) = stream.into_split();
    // `/health` answers without reading the body; the chunked body then trickles in.
    let writer = tokio::spawn(async move {
        let head = "GET /health HTTP/1.1\r\nHost: pbxgate\r\nTransfer-Encoding: chunked\r\n\r\n";
        if write.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        while write.write_all(b"1\r\na\r\n").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let got = tokio::time::timeout(PATIENCE, read_until_closed(&mut read))
        .await
        .expect("the server closes the connection");
    writer.abort();
    let (status, body) = parse_answer(&got);
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_slow_chunked_body_gets_408() {
    let app = app_with(|_| {}).await;
    let stream = connect_from("127.0.0.5", server_addr(&app)).await;
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let head = "POST /crm/activity HTTP/1.1\r\nHost: pbxgate\r\n\
                    Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n";
        if write.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        while write.write_all(b"1\r\na\r\n").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let got = tokio::time::timeout(PATIENCE, read_until_closed(&mut read))
        .await
        .expect("the server closes the connection");
    writer.abort();
    let (status, body) = parse_answer(&got);
    assert_eq!(status, 408, "{body}");
    assert_eq!(body["success"], false);
    assert_eq!(app.state.store.activity().unwrap().updated_at, 0);
}

#[tokio::test]
async fn the_service_under_a_1024_open_files_limit_survives_eleven_hundred_slow_clients() {
    const SLOW: usize = 1100;
    // This process holds the clients' ends.
    pbxgate::app::raise_open_files_limit();
    let dir = tempfile::tempdir().unwrap();
    let crm = crate::support::FakeCrm::start().await;
    let ami = crate::support::FakeAmi::start("pbxgate", "s").await;
    let mut env = crate::cli::env_for(dir.path(), &crm, &ami, "s");
    env.extend([
        ("PBXGATE__HTTP__LISTEN", "127.0.0.1:0".to_string()),
        ("PBXGATE__HTTP__CLIENT_TIMEOUT", "1s".to_string()),
        ("PBXGATE__CRM__REGISTER_ON_START", "false".to_string()),
        (
            "PBXGATE__CRM__CLIENT_ID",
            "client-id-0123456789abcdef".to_string(),
        ),
        ("PBXGATE__LOG__LEVEL", "info".to_string()),
        (
            "PBXGATE__USERS",
            r#"[{user_id = 1, code = "101"}]"#.to_string(),
        ),
    ]);
    // The usual limits of a shell: 1024 descriptors at most, 256 unless raised.
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.args([
        "-c",
        r#"ulimit -Sn 256 && ulimit -Hn 1024 && exec "$0" serve"#,
        env!("CARGO_BIN_EXE_pbxgate"),
    ]);
    let (_child, base) = crate::cli::spawn_serving(cmd, dir.path(), &env).await;
    let to: SocketAddr = base.strip_prefix("http://").unwrap().parse().unwrap();
    let http = reqwest::Client::new();
    let ready: Value = http
        .get(format!("{base}/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Raised to the hard limit; connections fitted to it.
    assert_eq!(ready["http"]["openFilesLimit"], 1024, "{ready}");
    assert_eq!(ready["http"]["maxConnections"], (1024 - 256) / 2, "{ready}");
    tokio::time::timeout(PATIENCE, ami.wait_for_logins(1))
        .await
        .unwrap();

    let mut clients = Vec::with_capacity(SLOW);
    for _ in 0..SLOW {
        let stream = connect_from("127.0.0.6", to).await;
        clients.push(tokio::spawn(slow_body(stream, Duration::from_secs(5))));
    }
    let r = http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(format!("{base}/crm/make-call"))
        .query(&[
            ("clientId", "client-id-0123456789abcdef"),
            ("code", "101"),
            ("phone", "+79991234567"),
            ("userId", "1"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    ami.wait_for_actions("Originate", 1).await;

    let ends = tokio::time::timeout(PATIENCE, futures_util::future::join_all(clients))
        .await
        .expect("the server closes every slow connection");
    assert!(ends
        .into_iter()
        .all(|e| matches!(e.unwrap(), End::Closed | End::Answered(408, _))));
    let r = http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn an_answer_slower_than_the_client_timeout_is_not_cut_off() {
    let app = app_with(|c| c.ami.action_timeout = Duration::from_secs(3)).await;
    // Asterisk never answers the Originate: the request waits for ami.action_timeout, three
    // times http.client_timeout, on a connection that has nothing more to read.
    app.ami
        .set_reply("Originate", crate::support::fake_ami::Reply::Silent);
    let r = app
        .http
        .get(app.url("/crm/make-call"))
        .query(&[
            ("clientId", app.client_id().as_str()),
            ("code", "101"),
            ("phone", "+79991234567"),
            ("userId", "1"),
        ])
        .send()
        .await
        .expect("answered, not cut off");
    assert_eq!(r.status(), 504);
    assert_eq!(r.json::<Value>().await.unwrap()["success"], false);
}

#[tokio::test]
async fn a_busy_kept_alive_connection_is_not_cut_off() {
    let app = app_with(|_| {}).await;
    let mut s = connect_from("127.0.0.7", server_addr(&app)).await;
    // Requests back to back on one connection, well past http.client_timeout and the longest
    // a connection may wait for a request (keep-alive plus client_timeout).
    let started = tokio::time::Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(7) {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: pbxgate\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_answer(&mut s).await.0, 200, "after {answered}");
        answered += 1;
    }
    assert_eq!(app.state.connections.counts().0, 1);
}
