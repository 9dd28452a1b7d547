//! A simulated Asterisk: a real Asterisk Manager Interface over TCP on 127.0.0.1, in the
//! framing pbxgate's AMI client reads from a real one (banner, CRLF frames, ActionID echo,
//! event lists).
//!
//! It answers what pbxgate sends: `Login` (plain, or MD5 after `Challenge`) with the
//! configured user, `Ping`, `Logoff`, `CoreShowChannels` (the channels of the calls in
//! progress, then `CoreShowChannelsComplete`), `QueuePause` and `Originate`. Once the first
//! session has resynced, it replays the bundled captures (see [`super::captures`]) one after
//! the other, a new call every `interval`, each with fresh ids and a new customer number,
//! to every logged-in session that asked for events. An `Originate` is answered at once and
//! then played out as the click-to-call capture: the requested ChannelId, extension, context
//! and number, the Originate's variables, and an OriginateResponse with its ActionID.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::captures::{self, Capture, IdSource, OriginateRequest, Replay, Step};
use crate::base::secret::Secret;
use crate::pbx::ami::frame::{Frame, Item, Limits, Parser};

pub const BANNER: &str = "Asterisk Call Manager/11.0.0";

/// What the simulator needs to know.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub username: String,
    pub secret: Secret,
    /// Where the replayed calls' recordings are written (pbxgate's `records.dir`).
    pub records_dir: PathBuf,
    /// A new call this often.
    pub interval: Duration,
}

/// Channels in progress, as `CoreShowChannels` lists them.
#[derive(Debug, Clone)]
struct Channel {
    fields: BTreeMap<String, String>,
    since: Instant,
}

/// The fields of a channel snapshot carried into `CoreShowChannel` rows.
const SNAPSHOT: &[&str] = &[
    "Channel",
    "ChannelState",
    "ChannelStateDesc",
    "CallerIDNum",
    "CallerIDName",
    "ConnectedLineNum",
    "ConnectedLineName",
    "Language",
    "AccountCode",
    "Context",
    "Exten",
    "Priority",
    "Uniqueid",
    "Linkedid",
];

struct Shared {
    cfg: SimConfig,
    /// Event frames in wire form, to every logged-in session (in emission order).
    events: broadcast::Sender<Arc<str>>,
    /// Taken while emitting, so that a `CoreShowChannels` answer and the events are in order.
    channels: Mutex<BTreeMap<String, Channel>>,
    ids: IdSource,
    /// Set once a session's `CoreShowChannels` was answered: the replays may start.
    resynced: watch::Sender<bool>,
    calls: AtomicU64,
    originates: AtomicU64,
}

/// The running simulator; stops (and drops every session) when dropped.
pub struct Asterisk {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Asterisk {
    /// Serves AMI on `listener` and starts the replays once pbxgate has resynced.
    pub fn start(listener: TcpListener, cfg: SimConfig) -> std::io::Result<Asterisk> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            cfg,
            events: broadcast::channel(16384).0,
            channels: Mutex::new(BTreeMap::new()),
            ids: IdSource::default(),
            resynced: watch::Sender::new(false),
            calls: AtomicU64::new(0),
            originates: AtomicU64::new(0),
        });
        let accept = {
            let shared = shared.clone();
            tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            tokio::spawn(session(stream, shared.clone()));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "simulated Asterisk: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
        };
        let schedule = tokio::spawn(schedule(shared.clone()));
        Ok(Asterisk {
            addr,
            shared,
            tasks: vec![accept, schedule],
        })
    }

    /// Calls replayed so far (click-to-calls not counted).
    pub fn calls_started(&self) -> u64 {
        self.shared.calls.load(Ordering::Relaxed)
    }

    /// Originates answered so far.
    pub fn originates(&self) -> u64 {
        self.shared.originates.load(Ordering::Relaxed)
    }
}

impl Drop for Asterisk {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Shared {
    /// Sends one event to every session and keeps the channel table current.
    fn emit(&self, frame: &Frame) {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(uid) = frame.get("Uniqueid").filter(|u| !u.is_empty()) {
            match frame.event() {
                Some("Hangup") => {
                    channels.remove(uid);
                }
                Some(event) => {
                    let known = channels.contains_key(uid);
                    if known || event == "Newchannel" {
                        let ch = channels.entry(uid.to_string()).or_insert_with(|| Channel {
                            fields: BTreeMap::new(),
                            since: Instant::now(),
                        });
                        for key in SNAPSHOT {
                            if let Some(v) = frame.get(key) {
                                ch.fields.insert(key.to_string(), v.to_string());
                            }
                        }
                        match event {
                            "BridgeEnter" => {
                                let b = frame.get("BridgeUniqueid").unwrap_or_default();
                                ch.fields.insert("BridgeId".into(), b.to_string());
                            }
                            "BridgeLeave" => {
                                ch.fields.insert("BridgeId".into(), String::new());
                            }
                            "Newexten" => {
                                for (from, to) in [
                                    ("Application", "Application"),
                                    ("AppData", "ApplicationData"),
                                ] {
                                    let v = frame.get(from).unwrap_or_default();
                                    ch.fields.insert(to.into(), v.to_string());
                                }
                            }
                            _ => {}
                        }
                    }
                }
                None => {}
            }
        }
        // No session yet: the event is lost, as with a real Asterisk.
        let _ = self.events.send(Arc::from(frame.to_wire()));
    }

    /// `CoreShowChannel` rows for `action_id`, with the events already emitted but not yet
    /// taken by `rx` (they go to the wire first).
    fn show_channels(&self, action_id: &str, rx: &mut broadcast::Receiver<Arc<str>>) -> String {
        let channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        loop {
            match rx.try_recv() {
                Ok(ev) => out.push_str(&ev),
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
        out.push_str(&reply(
            action_id,
            &[
                ("Response", "Success"),
                ("EventList", "start"),
                ("Message", "Channels will follow"),
            ],
        ));
        for ch in channels.values() {
            let age = ch.since.elapsed().as_secs();
            let mut pairs: Vec<(String, String)> = vec![("Event".into(), "CoreShowChannel".into())];
            pairs.push(("ActionID".into(), action_id.to_string()));
            for (k, v) in &ch.fields {
                pairs.push((k.clone(), v.clone()));
            }
            pairs.push((
                "Duration".into(),
                format!("{:02}:{:02}:{:02}", age / 3600, age / 60 % 60, age % 60),
            ));
            out.push_str(&Frame::from_pairs(pairs).to_wire());
        }
        out.push_str(&format!(
            "Event: CoreShowChannelsComplete\r\nActionID: {action_id}\r\nEventList: Complete\r\nListItems: {}\r\n\r\n",
            channels.len()
        ));
        out
    }

    fn write_recording(&self, path: &PathBuf) {
        if let Err(e) = std::fs::write(path, captures::tone_wav(3)) {
            tracing::warn!(path = %path.display(), error = %e, "simulated Asterisk: cannot write a recording");
        }
    }

    /// Plays `steps` out in real time through `replay`; `adjust` may replace a rewritten
    /// frame by others (the Originate's variables and ActionID).
    async fn play(
        &self,
        steps: &[Step],
        mut replay: Replay<'_>,
        adjust: impl Fn(&Frame) -> Vec<Frame>,
    ) {
        let start = tokio::time::Instant::now();
        for step in steps {
            tokio::time::sleep_until(start + step.at).await;
            let frame = replay.rewrite(&step.frame);
            for path in replay.take_new_recordings() {
                self.write_recording(&path);
            }
            for frame in adjust(&frame) {
                self.emit(&frame);
            }
        }
    }
}

/// A new call every `interval`, round the schedule, once pbxgate has resynced.
async fn schedule(shared: Arc<Shared>) {
    let mut resynced = shared.resynced.subscribe();
    let _ = resynced.wait_for(|r| *r).await;
    let parsed: Arc<Vec<(&'static Capture, Vec<Step>)>> = Arc::new(
        captures::SCHEDULE
            .iter()
            .map(|c| (c, c.steps(false)))
            .collect(),
    );
    let mut ticker = tokio::time::interval(shared.cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for k in 0.. {
        ticker.tick().await;
        let shared = shared.clone();
        let parsed = parsed.clone();
        let n = shared.calls.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::spawn(async move {
            let (capture, steps) = &parsed[k % parsed.len()];
            let customer = customer_number(capture.customer);
            tracing::info!(
                call = n,
                scenario = capture.name,
                "simulated Asterisk: {}",
                capture.what
            );
            let replay = Replay::new(&shared.ids, &shared.cfg.records_dir)
                .with_customer(capture.customer, &customer);
            shared.play(steps, replay, |f| vec![f.clone()]).await;
        });
    }
}

/// A random customer number like the capture's (same country and length).
fn customer_number(template: &str) -> String {
    if template.len() < 7 {
        return template.to_string();
    }
    let keep = template.len() - 6;
    let tail: String = (0..6)
        .map(|_| char::from(b'0' + rand::random_range(0..10u8)))
        .collect();
    format!("{}{tail}", &template[..keep])
}

fn reply(action_id: &str, lines: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let mut lines = lines.iter();
    if let Some((k, v)) = lines.next() {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !action_id.is_empty() {
        out.push_str(&format!("ActionID: {action_id}\r\n"));
    }
    for (k, v) in lines {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out
}

fn error(action_id: &str, message: &str) -> String {
    reply(action_id, &[("Response", "Error"), ("Message", message)])
}

/// One manager session.
async fn session(stream: TcpStream, shared: Arc<Shared>) {
    let (mut read, mut write) = stream.into_split();
    if write
        .write_all(format!("{BANNER}\r\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let challenge = format!("{:09}", rand::random_range(0..1_000_000_000u32));
    let mut parser = Parser::without_banner(Limits::default());
    let mut buf = vec![0u8; 16384];
    let mut events: Option<broadcast::Receiver<Arc<str>>> = None;
    let mut logged_in = false;
    loop {
        tokio::select! {
            n = read.read(&mut buf) => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                parser.push(&buf[..n]);
                while let Some(item) = parser.next_item() {
                    let Item::Frame(action) = item else { continue };
                    let id = action.action_id().unwrap_or("").to_string();
                    let name = action.get("Action").unwrap_or("").to_ascii_lowercase();
                    let (out, close) = match name.as_str() {
                        "challenge" => (reply(&id, &[("Response", "Success"), ("Challenge", &challenge)]), false),
                        "login" => {
                            let cfg = &shared.cfg;
                            let ok = action.get("Username") == Some(cfg.username.as_str())
                                && match action.get("AuthType") {
                                    Some(t) if t.eq_ignore_ascii_case("md5") => {
                                        let key: String = Md5::digest(format!("{challenge}{}", cfg.secret.expose()).as_bytes())
                                            .iter().map(|b| format!("{b:02x}")).collect();
                                        action.get("Key").is_some_and(|k| Secret::new(key.clone()).matches(k))
                                    }
                                    _ => action.get("Secret").is_some_and(|s| cfg.secret.matches(s)),
                                };
                            if ok {
                                logged_in = true;
                                let off = action.get("Events").is_some_and(|e| e.eq_ignore_ascii_case("off"));
                                if !off {
                                    events = Some(shared.events.subscribe());
                                }
                                let mut out = reply(&id, &[("Response", "Success"), ("Message", "Authentication accepted")]);
                                out.push_str("Event: FullyBooted\r\nPrivilege: system,all\r\nUptime: 1\r\nLastReload: 1\r\nStatus: Fully Booted\r\n\r\n");
                                (out, false)
                            } else {
                                tracing::warn!("simulated Asterisk: a login with a wrong user or secret was refused");
                                (error(&id, "Authentication failed"), true)
                            }
                        }
                        "logoff" => (reply(&id, &[("Response", "Goodbye"), ("Message", "Thanks for all the fish.")]), true),
                        _ if !logged_in => (error(&id, "Permission denied"), false),
                        "ping" => (reply(&id, &[("Response", "Success"), ("Ping", "Pong"), ("Timestamp", &captures::timestamp_now())]), false),
                        "coreshowchannels" => {
                            let out = match events.as_mut() {
                                Some(rx) => shared.show_channels(&id, rx),
                                None => shared.show_channels(&id, &mut shared.events.subscribe()),
                            };
                            shared.resynced.send_replace(true);
                            (out, false)
                        }
                        "queuepause" => match action.get("Interface").filter(|i| !i.is_empty()) {
                            None => (error(&id, "Need 'Interface' parameter"), false),
                            Some(_) => {
                                let paused = action.get("Paused").is_some_and(|p| p.eq_ignore_ascii_case("true"));
                                let msg = if paused { "Interface paused successfully" } else { "Interface unpaused successfully" };
                                (reply(&id, &[("Response", "Success"), ("Message", msg)]), false)
                            }
                        },
                        "originate" => match originate_request(&action) {
                            Err(msg) => (error(&id, msg), false),
                            Ok(req) => {
                                shared.originates.fetch_add(1, Ordering::Relaxed);
                                tracing::info!(channel = %req.channel, "simulated Asterisk: originate queued; the manager answers in 2 s, the customer 2 s later");
                                tokio::spawn(originate(shared.clone(), req));
                                (reply(&id, &[("Response", "Success"), ("Message", "Originate successfully queued")]), false)
                            }
                        },
                        _ => (error(&id, "Invalid/unknown command"), false),
                    };
                    if write.write_all(out.as_bytes()).await.is_err() || close {
                        return;
                    }
                }
            }
            ev = async { events.as_mut().expect("guarded").recv().await }, if events.is_some() => {
                match ev {
                    Ok(ev) => {
                        if write.write_all(ev.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(events = n, "simulated Asterisk: a slow session missed events");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }
}

fn originate_request(action: &Frame) -> Result<OriginateRequest, &'static str> {
    let channel = action
        .get("Channel")
        .filter(|c| !c.is_empty())
        .ok_or("Channel not specified")?;
    let exten = action.get("Exten").unwrap_or_default();
    if exten.is_empty() && action.get("Application").is_none() {
        return Err("Exten not specified");
    }
    Ok(OriginateRequest {
        action_id: action.action_id().unwrap_or_default().to_string(),
        channel: channel.to_string(),
        context: action.get("Context").unwrap_or_default().to_string(),
        exten: exten.to_string(),
        channel_id: action.get("ChannelId").unwrap_or_default().to_string(),
        variables: action.get_all("Variable").map(str::to_string).collect(),
    })
}

/// The click-to-call capture, played for `req`.
async fn originate(shared: Arc<Shared>, req: OriginateRequest) {
    let steps = captures::ORIGINATE.steps(true);
    let replay = Replay::new(&shared.ids, &shared.cfg.records_dir).for_originate(&req);
    shared
        .play(&steps, replay, |f| {
            if captures::is_capture_variable(f) {
                return req
                    .variables
                    .iter()
                    .map(|v| captures::variable_like(f, v))
                    .collect();
            }
            if f.event() == Some("OriginateResponse") {
                return vec![Frame::from_pairs(f.iter().map(|(k, v)| {
                    if k == "ActionID" {
                        (k, req.action_id.as_str())
                    } else {
                        (k, v)
                    }
                }))];
            }
            vec![f.clone()]
        })
        .await;
}
