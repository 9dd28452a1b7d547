//! The AMI client against the scripted AMI server over real TCP.

use std::time::Duration;

use pbxgate::base::secret::Secret;
use pbxgate::config::{AmiAuth, AmiConfig};
use pbxgate::pbx::ami::{Action, AmiClient, AmiError, AmiEvent, LinkState};
use tokio::sync::broadcast::error::RecvError;

use crate::support::fake_ami::Reply;
use crate::support::FakeAmi;

fn config(ami: &FakeAmi) -> AmiConfig {
    AmiConfig {
        host: "127.0.0.1".into(),
        port: ami.addr.port(),
        username: ami.username.clone(),
        secret: Secret::new(ami.secret.clone()),
        reconnect_min: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(100),
        ..AmiConfig::default()
    }
}

async fn connected(ami: &FakeAmi, tweak: impl FnOnce(&mut AmiConfig)) -> AmiClient {
    crate::support::init_logs();
    let mut cfg = config(ami);
    tweak(&mut cfg);
    let client = AmiClient::start(cfg);
    tokio::time::timeout(Duration::from_secs(10), client.wait_connected())
        .await
        .expect("AMI connects");
    client
}

/// Next event frame with this name (skipping others), at most 10 s.
async fn next_event(
    rx: &mut tokio::sync::broadcast::Receiver<AmiEvent>,
    name: &str,
) -> pbxgate::pbx::ami::Frame {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(AmiEvent::Event(f)) = rx.recv().await {
                if f.event() == Some(name) {
                    return (*f).clone();
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {name} event"))
}

#[tokio::test]
async fn plain_login_then_actions_are_answered() {
    let ami = FakeAmi::start("pbxgate", "s3cret").await;
    let client = connected(&ami, |_| {}).await;
    let reply = client.send(Action::new("Ping")).await.unwrap();
    assert_eq!(reply.response.get("Ping"), Some("Pong"));
    let login = &ami.actions("Login")[0];
    assert_eq!(
        (
            login.get("Username"),
            login.get("Secret"),
            login.get("Events")
        ),
        (Some("pbxgate"), Some("s3cret"), Some("on"))
    );
    assert!(matches!(
        client.state(),
        LinkState::Connected { session: 1, .. }
    ));
}

#[tokio::test]
async fn md5_login_keeps_the_secret_off_the_wire() {
    let ami = FakeAmi::start("pbxgate", "s3cret").await;
    ami.require_md5();
    let client = connected(&ami, |c| c.auth = AmiAuth::Md5).await;
    client.send(Action::new("Ping")).await.unwrap();
    assert_eq!(ami.actions("Challenge")[0].get("AuthType"), Some("MD5"));
    let login = &ami.actions("Login")[0];
    assert_eq!(login.get("AuthType"), Some("MD5"));
    assert_eq!(login.get("Secret"), None);
    assert_eq!(login.get("Key").map(str::len), Some(32));
}

#[tokio::test]
async fn a_refused_login_waits_ami_auth_retry_and_says_why() {
    let ami = FakeAmi::start("pbxgate", "s3cret").await;
    let client = AmiClient::start(AmiConfig {
        secret: Secret::new("nope"),
        auth_retry: Duration::from_secs(3600),
        ..config(&ami)
    });
    ami.wait_for_actions("Login", 1).await;
    let mut states = client.watch_state();
    let text = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let LinkState::Connecting {
                last_error: Some(e),
                ..
            } = client.state()
            {
                return e;
            }
            states.changed().await.unwrap();
        }
    })
    .await
    .expect("the link says why it is down");
    assert!(text.contains("Authentication failed"), "{text}");
    assert!(text.contains("next try in 1h"), "{text}");
    assert!(text.contains("fail2ban"), "{text}");
    // The network failure's backoff (at most 200 ms here) would have tried again long ago.
    let pings = client.send(Action::new("Ping")).await;
    assert!(matches!(pings, Err(AmiError::NotConnected(_))), "{pings:?}");
    assert_eq!(ami.actions("Login").len(), 1);
}

#[tokio::test]
async fn a_wrong_secret_keeps_the_link_down_with_the_reason() {
    let ami = FakeAmi::start("pbxgate", "s3cret").await;
    let client = AmiClient::start(AmiConfig {
        secret: Secret::new("nope"),
        auth_retry: Duration::from_millis(50),
        ..config(&ami)
    });
    ami.wait_for_actions("Login", 2).await;
    match client.state() {
        LinkState::Connecting {
            last_error: Some(e),
            ..
        } => assert!(e.contains("Authentication failed"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        client.send(Action::new("Ping")).await,
        Err(AmiError::NotConnected(_))
    ));
    client.stop();
}

#[tokio::test]
async fn answers_are_matched_by_action_id_among_interleaved_events() {
    let ami = FakeAmi::start("u", "p").await;
    let client = connected(&ami, |_| {}).await;
    let mut rx = client.subscribe();
    // The first action is held; the second one is answered with events before its response.
    ami.set_reply("Getvar", Reply::Silent);
    let slow = {
        let c = client.clone();
        tokio::spawn(async move { c.send(Action::new("Getvar").header("Variable", "X")).await })
    };
    let held = ami.wait_for_actions("Getvar", 1).await;
    let held_id = held[0].action_id().unwrap().to_string();
    ami.set_reply(
        "Status",
        Reply::Raw(
            "Event: Newchannel\r\nActionID: someone-else\r\nUniqueid: 1.1\r\n\r\n\
             Event: OriginateResponse\r\nActionID: {id}\r\nResponse: Failure\r\nReason: 3\r\n\r\n\
             Response: Success\r\nActionID: {id}\r\nMessage: done\r\n\r\n"
                .into(),
        ),
    );
    let reply = client.send(Action::new("Status")).await.unwrap();
    assert_eq!(reply.response.get("Message"), Some("done"));
    // Events, even one carrying our ActionID (OriginateResponse), go to subscribers.
    assert_eq!(
        next_event(&mut rx, "Newchannel").await.get("Uniqueid"),
        Some("1.1")
    );
    assert_eq!(
        next_event(&mut rx, "OriginateResponse").await.get("Reason"),
        Some("3")
    );
    // Now answer the held one.
    ami.send(format!("Response: Success\r\nActionID: {held_id}\r\nValue: 42\r\n\r\n").as_bytes());
    let r = slow.await.unwrap().unwrap();
    assert_eq!(r.response.get("Value"), Some("42"));
}

#[tokio::test]
async fn error_responses_carry_asterisks_message() {
    let ami = FakeAmi::start("u", "p").await;
    let client = connected(&ami, |_| {}).await;
    ami.set_reply(
        "Originate",
        Reply::Error("Extension does not exist.".into()),
    );
    let err = client.send(Action::new("Originate")).await.unwrap_err();
    assert_eq!(err, AmiError::Refused("Extension does not exist.".into()));
}

#[tokio::test]
async fn event_lists_are_collected_into_one_reply() {
    let ami = FakeAmi::start("u", "p").await;
    let client = connected(&ami, |_| {}).await;
    let mut rx = client.subscribe();
    let mut list = String::from("Response: Success\r\nActionID: {id}\r\nEventList: start\r\nMessage: Channels will follow\r\n\r\n");
    for i in 1..=3 {
        list.push_str(&format!(
            "Event: CoreShowChannel\r\nActionID: {{id}}\r\nUniqueid: 10.{i}\r\n\r\n"
        ));
        list.push_str("Event: Newstate\r\nPrivilege: call,all\r\nUniqueid: 99.1\r\n\r\n");
    }
    list.push_str("Event: CoreShowChannelsComplete\r\nActionID: {id}\r\nEventList: Complete\r\nListItems: 3\r\n\r\n");
    ami.set_reply("CoreShowChannels", Reply::Raw(list));
    let reply = client.send(Action::new("CoreShowChannels")).await.unwrap();
    let ids: Vec<_> = reply
        .events
        .iter()
        .map(|e| e.get("Uniqueid").unwrap())
        .collect();
    assert_eq!(ids, vec!["10.1", "10.2", "10.3"]);
    assert_eq!(reply.complete.unwrap().get("ListItems"), Some("3"));
    assert_eq!(
        next_event(&mut rx, "Newstate").await.get("Uniqueid"),
        Some("99.1")
    );
}

#[tokio::test]
async fn a_drop_fails_pending_actions_without_resending_and_reconnects() {
    let ami = FakeAmi::start("u", "p").await;
    let client = connected(&ami, |_| {}).await;
    let mut rx = client.subscribe();
    ami.set_reply("Originate", Reply::Silent);
    let pending = {
        let c = client.clone();
        tokio::spawn(async move {
            c.send(Action::new("Originate").header("Channel", "PJSIP/101"))
                .await
        })
    };
    ami.wait_for_actions("Originate", 1).await;
    ami.drop_all();
    assert_eq!(pending.await.unwrap().unwrap_err(), AmiError::Disconnected);
    // Disconnected, then a fresh session.
    let mut saw_down = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            AmiEvent::Disconnected { .. } => saw_down = true,
            AmiEvent::Connected { session } => {
                assert_eq!(session, 2);
                break;
            }
            AmiEvent::Event(_) => {}
        }
    }
    assert!(saw_down);
    ami.wait_for_logins(2).await;
    client.send(Action::new("Ping")).await.unwrap();
    assert_eq!(
        ami.actions("Originate").len(),
        1,
        "the Originate was not sent again"
    );
}

#[tokio::test]
async fn a_silent_asterisk_is_detected_by_missed_pongs() {
    let ami = FakeAmi::start("u", "p").await;
    let client = connected(&ami, |c| {
        c.ping_interval = Duration::from_millis(200);
        c.ping_timeout = Duration::from_millis(150);
    })
    .await;
    ami.stall_all();
    ami.wait_for_logins(2).await;
    client.wait_connected().await;
    assert!(ami.accepted() >= 2);
    client.send(Action::new("Ping")).await.unwrap();
}

#[tokio::test]
async fn actions_time_out_when_asterisk_does_not_answer() {
    let ami = FakeAmi::start("u", "p").await;
    let client = connected(&ami, |_| {}).await;
    ami.set_reply("Getvar", Reply::Silent);
    let err = client
        .send_with_timeout(Action::new("Getvar"), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(err, AmiError::Timeout(Duration::from_millis(300)));
}

#[tokio::test]
async fn garbage_and_oversized_frames_are_skipped() {
    let ami = FakeAmi::start("u", "p").await;
    let client = connected(&ami, |_| {}).await;
    let mut rx = client.subscribe();
    let mut junk = b"\x00\x01\x02 not a header\r\n\r\n".to_vec();
    junk.extend_from_slice(b"Event: Huge\r\nValue: ");
    junk.extend(std::iter::repeat_n(b'x', 100_000));
    junk.extend_from_slice(b"\r\n\r\nEvent: AfterJunk\r\nN: 1\r\n\r\n");
    ami.send(&junk);
    assert_eq!(next_event(&mut rx, "AfterJunk").await.get("N"), Some("1"));
    assert!(
        client
            .counters()
            .skipped_frames
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    client.send(Action::new("Ping")).await.unwrap();
}

#[tokio::test]
async fn a_capture_sent_one_byte_at_a_time_arrives_whole() {
    let ami = FakeAmi::start("u", "p").await;
    let client = connected(&ami, |_| {}).await;
    let mut rx = client.subscribe();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/ami-captures/14_click2call_manager_noanswer.raw"
    );
    let raw = std::fs::read(path).unwrap();
    // Strip the capture's banner lines: this session already has one.
    let text = String::from_utf8_lossy(&raw).to_string();
    let frames: String = text
        .lines()
        .skip_while(|l| l.starts_with("Asterisk Call Manager"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    let expected = frames
        .split("\r\n\r\n")
        .filter(|f| f.starts_with("Event:"))
        .count();
    ami.send_split(frames.as_bytes());
    ami.send(b"Event: EndOfReplay\r\n\r\n");
    let mut got = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            AmiEvent::Event(f) if f.event() == Some("EndOfReplay") => break,
            AmiEvent::Event(_) => got += 1,
            _ => {}
        }
    }
    assert_eq!(got, expected);
}

#[tokio::test]
async fn a_slow_subscriber_is_told_it_lagged_and_the_reader_keeps_going() {
    let ami = FakeAmi::start("u", "p").await;
    let client = connected(&ami, |c| c.event_buffer = 16).await;
    let mut slow = client.subscribe();
    let mut burst = String::new();
    for i in 0..500 {
        burst.push_str(&format!("Event: VarSet\r\nValue: {i}\r\n\r\n"));
    }
    ami.send(burst.as_bytes());
    // The link still answers while nobody reads the events.
    client.send(Action::new("Ping")).await.unwrap();
    match slow.recv().await {
        Err(RecvError::Lagged(n)) => assert!(n > 0),
        other => panic!("expected Lagged, got {other:?}"),
    }
}

#[tokio::test]
async fn no_server_means_backoff_and_a_clear_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let cfg = AmiConfig {
        port,
        reconnect_min: Duration::from_millis(10),
        reconnect_max: Duration::from_millis(40),
        ..AmiConfig::default()
    };
    let client = AmiClient::start(cfg);
    let mut changes = client.watch_state();
    let reached = tokio::time::timeout(
        Duration::from_secs(10),
        changes.wait_for(|s| matches!(s, LinkState::Connecting { attempt, last_error: Some(_) } if *attempt >= 3)),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    let LinkState::Connecting {
        last_error: Some(mut state),
        ..
    } = reached
    else {
        unreachable!()
    };
    state.make_ascii_lowercase();
    assert!(state.contains("refused"), "{state}");
    assert!(matches!(
        client.send(Action::new("Ping")).await,
        Err(AmiError::NotConnected(_))
    ));
    client.stop();
}
