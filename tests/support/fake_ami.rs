//! A scripted Asterisk Manager Interface peer on 127.0.0.1:0: sends the real banner, answers
//! `Login` (plain secret) with the real Success/Error messages, answers `Logoff`, CRLF framing.
#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

pub const BANNER: &str = "Asterisk Call Manager/11.0.0";

pub struct FakeAmi {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl FakeAmi {
    /// Accepts any number of sessions; `username`/`secret` are the only valid credentials.
    pub async fn start(username: &str, secret: &str) -> FakeAmi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake AMI");
        let addr = listener.local_addr().unwrap();
        let (user, pass) = (username.to_string(), secret.to_string());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (user, pass) = (user.clone(), pass.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    if write
                        .write_all(format!("{BANNER}\r\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let mut msg: Vec<(String, String)> = Vec::new();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let line = line.trim_end_matches('\r').to_string();
                        if !line.is_empty() {
                            if let Some((k, v)) = line.split_once(':') {
                                msg.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                            }
                            continue;
                        }
                        let get = |k: &str| {
                            msg.iter()
                                .find(|(key, _)| key == k)
                                .map(|(_, v)| v.clone())
                                .unwrap_or_default()
                        };
                        let id = get("actionid");
                        let reply = match get("action").to_ascii_lowercase().as_str() {
                            "login" if get("username") == user && get("secret") == pass => format!(
                                "Response: Success\r\nActionID: {id}\r\nMessage: Authentication accepted\r\n\r\n\
                                 Event: FullyBooted\r\nPrivilege: system,all\r\nStatus: Fully Booted\r\n\r\n"
                            ),
                            "login" => format!("Response: Error\r\nActionID: {id}\r\nMessage: Authentication failed\r\n\r\n"),
                            "logoff" => {
                                let _ = write
                                    .write_all(format!("Response: Goodbye\r\nActionID: {id}\r\nMessage: Thanks for all the fish.\r\n\r\n").as_bytes())
                                    .await;
                                return;
                            }
                            _ => format!("Response: Error\r\nActionID: {id}\r\nMessage: Invalid/unknown command\r\n\r\n"),
                        };
                        if write.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                        msg.clear();
                    }
                });
            }
        });
        FakeAmi { addr, task }
    }
}

impl Drop for FakeAmi {
    fn drop(&mut self) {
        self.task.abort();
    }
}
