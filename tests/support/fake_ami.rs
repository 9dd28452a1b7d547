//! A scripted Asterisk Manager Interface server on 127.0.0.1:0 with real framing: the banner,
//! CRLF frames, `Login` (plain and MD5 challenge) with Asterisk's own answers, `Ping`, `Logoff`,
//! `Originate`, `QueuePause`, event lists. Every action received is recorded. Tests can make it
//! answer differently, push events or whole capture files (optionally one byte per write),
//! drop every connection, or stall (stop reading and answering, like a hung Asterisk).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use pbxgate::pbx::ami::frame::{Frame, Item, Limits, Parser};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

pub const BANNER: &str = "Asterisk Call Manager/11.0.0";
pub const CHALLENGE: &str = "840212581";

/// How to answer an action instead of the default.
#[derive(Debug, Clone)]
pub enum Reply {
    /// `Response: Error` with this message.
    Error(String),
    /// Never answer.
    Silent,
    /// Exactly this text; `{id}` is replaced by the ActionID.
    Raw(String),
}

enum Control {
    Send(Vec<u8>, bool),
    Drop,
    Stall,
}

#[derive(Default)]
struct State {
    received: Vec<(usize, Instant, Frame)>,
    replies: HashMap<String, Reply>,
    conns: Vec<mpsc::UnboundedSender<Control>>,
    accepted: usize,
    logins: usize,
    md5_only: bool,
}

pub struct FakeAmi {
    pub addr: SocketAddr,
    pub username: String,
    pub secret: String,
    state: Arc<Mutex<State>>,
    seen: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeAmi {
    /// Accepts any number of sessions; `username`/`secret` are the only valid credentials.
    pub async fn start(username: &str, secret: &str) -> FakeAmi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake AMI");
        Self::serve(
            listener,
            username,
            secret,
            Arc::default(),
            watch::Sender::new(0),
        )
    }

    /// Starts again on the same address (after [`FakeAmi::shutdown`]), keeping the records.
    pub async fn restart(self) -> FakeAmi {
        let listener = TcpListener::bind(self.addr).await.expect("rebind fake AMI");
        let (u, s, st, seen) = (
            self.username.clone(),
            self.secret.clone(),
            self.state.clone(),
            self.seen.clone(),
        );
        self.task.abort();
        Self::serve(listener, &u, &s, st, seen)
    }

    fn serve(
        listener: TcpListener,
        username: &str,
        secret: &str,
        state: Arc<Mutex<State>>,
        seen: watch::Sender<u64>,
    ) -> FakeAmi {
        let addr = listener.local_addr().unwrap();
        let (user, pass) = (username.to_string(), secret.to_string());
        let (st, sn) = (state.clone(), seen.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // Like Asterisk's manager, which writes each answer as it goes: with Nagle on,
                // the second answer to a batch of actions waits for our delayed ACK (40 ms).
                let _ = stream.set_nodelay(true);
                let (tx, rx) = mpsc::unbounded_channel();
                let conn = {
                    let mut s = st.lock().unwrap();
                    s.accepted += 1;
                    s.conns.push(tx);
                    s.accepted
                };
                sn.send_modify(|n| *n += 1);
                tokio::spawn(connection(
                    stream,
                    conn,
                    user.clone(),
                    pass.clone(),
                    st.clone(),
                    sn.clone(),
                    rx,
                ));
            }
        });
        FakeAmi {
            addr,
            username: username.into(),
            secret: secret.into(),
            state,
            seen,
            task,
        }
    }

    /// Stops accepting and drops every connection (the port is free to rebind).
    pub fn shutdown(&self) {
        self.task.abort();
        self.drop_all();
    }

    /// Refuse plain logins (only MD5 works).
    pub fn require_md5(&self) {
        self.state.lock().unwrap().md5_only = true;
    }

    pub fn set_reply(&self, action: &str, reply: Reply) {
        self.state
            .lock()
            .unwrap()
            .replies
            .insert(action.to_ascii_lowercase(), reply);
    }

    pub fn clear_reply(&self, action: &str) {
        self.state
            .lock()
            .unwrap()
            .replies
            .remove(&action.to_ascii_lowercase());
    }

    /// Every action received with this name, in order.
    pub fn actions(&self, name: &str) -> Vec<Frame> {
        self.actions_timed(name)
            .into_iter()
            .map(|(_, f)| f)
            .collect()
    }

    /// Like [`FakeAmi::actions`], with the instant each frame was read off the socket.
    pub fn actions_timed(&self, name: &str) -> Vec<(Instant, Frame)> {
        let s = self.state.lock().unwrap();
        s.received
            .iter()
            .filter(|(_, _, f)| is_action(f, name))
            .map(|(_, at, f)| (*at, f.clone()))
            .collect()
    }

    pub fn accepted(&self) -> usize {
        self.state.lock().unwrap().accepted
    }

    pub fn logins(&self) -> usize {
        self.state.lock().unwrap().logins
    }

    async fn wait(&self, what: &str, mut cond: impl FnMut(&State) -> bool) {
        let mut rx = self.seen.subscribe();
        let state = self.state.clone();
        let ok = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|_| cond(&state.lock().unwrap())),
        )
        .await;
        assert!(ok.is_ok(), "fake AMI: timed out waiting for {what}");
    }

    /// Waits (at most 10 s) until `n` actions named `name` arrived; returns them.
    pub async fn wait_for_actions(&self, name: &str, n: usize) -> Vec<Frame> {
        let lname = name.to_string();
        self.wait(&format!("{n} × {name}"), |s| {
            s.received
                .iter()
                .filter(|(_, _, f)| is_action(f, &lname))
                .count()
                >= n
        })
        .await;
        self.actions(name)
    }

    /// Waits until `n` logins succeeded in total.
    pub async fn wait_for_logins(&self, n: usize) {
        self.wait(&format!("{n} logins"), |s| s.logins >= n).await;
    }

    fn control(&self, make: impl Fn() -> Control) {
        let mut s = self.state.lock().unwrap();
        s.conns.retain(|c| c.send(make()).is_ok());
    }

    /// Sends raw bytes (frames) to every live connection.
    pub fn send(&self, bytes: &[u8]) {
        let b = bytes.to_vec();
        self.control(|| Control::Send(b.clone(), false));
    }

    /// Sends raw bytes one byte per write.
    pub fn send_split(&self, bytes: &[u8]) {
        let b = bytes.to_vec();
        self.control(|| Control::Send(b.clone(), true));
    }

    /// Sends one event given as `Key: Value` pairs.
    pub fn send_event(&self, pairs: &[(&str, &str)]) {
        self.send(
            Frame::from_pairs(pairs.iter().copied())
                .to_wire()
                .as_bytes(),
        );
    }

    pub fn drop_all(&self) {
        self.control(|| Control::Drop);
    }

    pub fn stall_all(&self) {
        self.control(|| Control::Stall);
    }
}

impl Drop for FakeAmi {
    fn drop(&mut self) {
        self.task.abort();
        self.drop_all();
    }
}

fn is_action(frame: &Frame, name: &str) -> bool {
    frame
        .get("Action")
        .is_some_and(|a| a.eq_ignore_ascii_case(name))
}

fn reply(id: &str, lines: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (k, v) in lines {
        if *k == "ActionID" {
            out.push_str(&format!("ActionID: {id}\r\n"));
        } else {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    out.push_str("\r\n");
    out
}

async fn connection(
    stream: tokio::net::TcpStream,
    conn: usize,
    user: String,
    pass: String,
    state: Arc<Mutex<State>>,
    seen: watch::Sender<u64>,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let (mut read, mut write) = stream.into_split();
    if write
        .write_all(format!("{BANNER}\r\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let mut parser = Parser::without_banner(Limits::default());
    let mut buf = vec![0u8; 16384];
    let mut logged_in = false;
    let mut stalled = false;
    loop {
        tokio::select! {
            c = control.recv() => match c {
                None | Some(Control::Drop) => return,
                Some(Control::Stall) => stalled = true,
                Some(Control::Send(bytes, split)) => {
                    if split {
                        for b in bytes {
                            if write.write_all(&[b]).await.is_err() { return; }
                            let _ = write.flush().await;
                        }
                    } else if write.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            },
            n = read.read(&mut buf), if !stalled => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                parser.push(&buf[..n]);
                while let Some(item) = parser.next_item() {
                    let Item::Frame(frame) = item else { continue };
                    state.lock().unwrap().received.push((conn, Instant::now(), frame.clone()));
                    seen.send_modify(|n| *n += 1);
                    let (out, close) = answer(&frame, &user, &pass, &mut logged_in, &state);
                    if logged_in && frame.get("Action").is_some_and(|a| a.eq_ignore_ascii_case("login")) && !close {
                        state.lock().unwrap().logins += 1;
                        seen.send_modify(|n| *n += 1);
                    }
                    if !out.is_empty() && write.write_all(out.as_bytes()).await.is_err() {
                        return;
                    }
                    if close {
                        return;
                    }
                }
            }
        }
    }
}

fn answer(
    frame: &Frame,
    user: &str,
    pass: &str,
    logged_in: &mut bool,
    state: &Arc<Mutex<State>>,
) -> (String, bool) {
    let id = frame.action_id().unwrap_or("").to_string();
    let action = frame.get("Action").unwrap_or("").to_ascii_lowercase();
    let custom = state.lock().unwrap().replies.get(&action).cloned();
    if let Some(r) = custom {
        return match r {
            Reply::Error(msg) => (
                reply(
                    &id,
                    &[("Response", "Error"), ("ActionID", ""), ("Message", &msg)],
                ),
                false,
            ),
            Reply::Silent => (String::new(), false),
            Reply::Raw(text) => (text.replace("{id}", &id), false),
        };
    }
    match action.as_str() {
        "challenge" => (
            reply(
                &id,
                &[
                    ("Response", "Success"),
                    ("ActionID", ""),
                    ("Challenge", CHALLENGE),
                ],
            ),
            false,
        ),
        "login" => {
            let md5_only = state.lock().unwrap().md5_only;
            let ok = frame.get("Username") == Some(user)
                && match frame.get("AuthType") {
                    Some(t) if t.eq_ignore_ascii_case("md5") => {
                        let key: String = Md5::digest(format!("{CHALLENGE}{pass}").as_bytes())
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect();
                        frame.get("Key") == Some(key.as_str())
                    }
                    _ => !md5_only && frame.get("Secret") == Some(pass),
                };
            if ok {
                *logged_in = true;
                let mut out = reply(
                    &id,
                    &[
                        ("Response", "Success"),
                        ("ActionID", ""),
                        ("Message", "Authentication accepted"),
                    ],
                );
                out.push_str("Event: FullyBooted\r\nPrivilege: system,all\r\nUptime: 1\r\nLastReload: 1\r\nStatus: Fully Booted\r\n\r\n");
                (out, false)
            } else {
                (
                    reply(
                        &id,
                        &[
                            ("Response", "Error"),
                            ("ActionID", ""),
                            ("Message", "Authentication failed"),
                        ],
                    ),
                    true,
                )
            }
        }
        "logoff" => (
            reply(
                &id,
                &[
                    ("Response", "Goodbye"),
                    ("ActionID", ""),
                    ("Message", "Thanks for all the fish."),
                ],
            ),
            true,
        ),
        _ if !*logged_in => (
            reply(
                &id,
                &[
                    ("Response", "Error"),
                    ("ActionID", ""),
                    ("Message", "Permission denied"),
                ],
            ),
            false,
        ),
        "ping" => (
            reply(
                &id,
                &[
                    ("Response", "Success"),
                    ("ActionID", ""),
                    ("Ping", "Pong"),
                    ("Timestamp", "1795264458.556255"),
                ],
            ),
            false,
        ),
        "originate" => (
            reply(
                &id,
                &[
                    ("Response", "Success"),
                    ("ActionID", ""),
                    ("Message", "Originate successfully queued"),
                ],
            ),
            false,
        ),
        "queuepause" => {
            let paused = frame
                .get("Paused")
                .is_some_and(|p| p.eq_ignore_ascii_case("true"));
            let msg = if paused {
                "Interface paused successfully"
            } else {
                "Interface unpaused successfully"
            };
            (
                reply(
                    &id,
                    &[("Response", "Success"), ("ActionID", ""), ("Message", msg)],
                ),
                false,
            )
        }
        "coreshowchannels" => {
            let mut out = reply(
                &id,
                &[
                    ("Response", "Success"),
                    ("ActionID", ""),
                    ("EventList", "start"),
                    ("Message", "Channels will follow"),
                ],
            );
            out.push_str(&format!("Event: CoreShowChannelsComplete\r\nActionID: {id}\r\nEventList: Complete\r\nListItems: 0\r\n\r\n"));
            (out, false)
        }
        _ => (
            reply(
                &id,
                &[
                    ("Response", "Error"),
                    ("ActionID", ""),
                    ("Message", "Invalid/unknown command"),
                ],
            ),
            false,
        ),
    }
}
