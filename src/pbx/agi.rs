//! A FastAGI server for `AGI(agi://host:4573/route)`.
//!
//! The protocol: Asterisk connects, sends its environment as `agi_key: value` lines ended by a
//! blank line, then waits for commands, one per line, each answered by a line such as
//! `200 result=1` (or `HANGUP` when the caller hung up; further lines may follow it). We read the
//! environment, route the caller (`agi_callerid`) and the dialled number (`agi_dnid`, else
//! `agi_extension`), set `PBXGATE_ROUTE` (the extension, or empty), `PBXGATE_ROUTE_SOURCE` and,
//! when a hook gave one, `PBXGATE_ROUTE_NAME` (a caller-id name) with `SET VARIABLE`, and close
//! the connection, which ends the AGI cleanly.
//!
//! A client cannot hurt the server: lines are limited in length and number, the environment must
//! arrive within `routing.agi_timeout`, every answer within the same time, and connections beyond
//! [`MAX_CONNECTIONS`] are closed at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::routing::{Route, Router};

/// Longest line accepted from a client.
pub const MAX_LINE: usize = 2048;
/// Most environment lines accepted.
pub const MAX_ENV_LINES: usize = 128;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum AgiError {
    #[error("timed out")]
    Timeout,
    #[error("line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("more than {MAX_ENV_LINES} environment lines")]
    TooManyLines,
    #[error("connection closed before the environment ended")]
    Closed,
    #[error("not an AGI environment line: {0:?}")]
    Garbage(String),
    #[error("unknown AGI script {0:?} (expected \"route\")")]
    UnknownScript(String),
    #[error("Asterisk refused a command: {0:?}")]
    Refused(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Serves FastAGI on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, router: Router, timeout: Duration) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "FastAGI accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "FastAGI: too many connections, closing this one");
            continue;
        };
        let router = router.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match handle(stream, &router, timeout).await {
                Ok(route) => {
                    tracing::debug!(%peer, code = ?route.code, source = route.source.as_str(), "FastAGI route")
                }
                Err(e) => tracing::warn!(%peer, error = %e, "FastAGI request failed"),
            }
        });
    }
}

/// Reads one line (without its `\n`/`\r\n`), refusing lines over [`MAX_LINE`].
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<String>, AgiError> {
    let mut buf = Vec::new();
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(AgiError::Closed)
            };
        }
        let (chunk, done) = match memchr::memchr(b'\n', available) {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        if buf.len() + chunk.len() > MAX_LINE {
            return Err(AgiError::LineTooLong);
        }
        buf.extend_from_slice(chunk);
        let n = chunk.len();
        r.consume(n);
        if done {
            while matches!(buf.last(), Some(b'\n' | b'\r')) {
                buf.pop();
            }
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
    }
}

/// Reads the environment up to its blank line.
async fn read_env<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<HashMap<String, String>, AgiError> {
    let mut env = HashMap::new();
    for _ in 0..=MAX_ENV_LINES {
        let Some(line) = read_line(r).await? else {
            return Err(AgiError::Closed);
        };
        if line.is_empty() {
            return Ok(env);
        }
        let Some((k, v)) = line.split_once(':') else {
            return Err(AgiError::Garbage(line.chars().take(40).collect()));
        };
        let k = k.trim();
        if !k.starts_with("agi_") {
            return Err(AgiError::Garbage(line.chars().take(40).collect()));
        }
        env.insert(k.to_string(), v.trim().to_string());
    }
    Err(AgiError::TooManyLines)
}

/// A variable value for `SET VARIABLE`, quoted; our values are codes and words, but quotes and
/// backslashes are escaped all the same.
fn quote(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars().filter(|c| !c.is_control()) {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

fn usable(v: Option<&String>) -> Option<&str> {
    v.map(String::as_str)
        .filter(|s| !s.is_empty() && !s.eq_ignore_ascii_case("unknown"))
}

async fn handle(stream: TcpStream, router: &Router, timeout: Duration) -> Result<Route, AgiError> {
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(4096, r);
    let env = tokio::time::timeout(timeout, read_env(&mut r))
        .await
        .map_err(|_| AgiError::Timeout)??;
    // `agi://host/route` → agi_network_script = "route" (a query string may follow).
    let script = env
        .get("agi_network_script")
        .map(|s| s.split(['?', '/']).next().unwrap_or(""))
        .unwrap_or("");
    if !script.is_empty() && script != "route" {
        return Err(AgiError::UnknownScript(script.chars().take(40).collect()));
    }
    let phone = usable(env.get("agi_callerid")).unwrap_or("");
    let did = usable(env.get("agi_dnid")).or_else(|| usable(env.get("agi_extension")));
    let route = router.route(phone, did).await;
    let code = route.code.clone().unwrap_or_default();
    // One command at a time: Asterisk reads commands through a buffered stream and waits for
    // its socket to be readable before each, so a second command sent before the first answer
    // may sit unread in its buffer.
    let mut vars = vec![
        ("PBXGATE_ROUTE", code.as_str()),
        ("PBXGATE_ROUTE_SOURCE", route.source.as_str()),
    ];
    if let Some(name) = &route.name {
        vars.push(("PBXGATE_ROUTE_NAME", name.as_str()));
    }
    for (name, value) in vars {
        let cmd = format!("SET VARIABLE {name} {}\n", quote(value));
        w.write_all(cmd.as_bytes()).await?;
        let answer = tokio::time::timeout(timeout, async {
            loop {
                match read_line(&mut r).await? {
                    // The caller hung up; the commands still work until the channel is gone.
                    Some(l) if l.trim() == "HANGUP" => continue,
                    Some(l) => return Ok(l),
                    None => return Err(AgiError::Closed),
                }
            }
        })
        .await
        .map_err(|_| AgiError::Timeout)??;
        if !answer.starts_with("200") {
            return Err(AgiError::Refused(answer.chars().take(80).collect()));
        }
    }
    let _ = w.shutdown().await;
    Ok(route)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn environment_lines_are_parsed_and_limited() {
        let text = b"agi_network: yes\r\nagi_callerid: 89161234567\nagi_dnid: unknown\n\n";
        let mut r = BufReader::new(&text[..]);
        let env = read_env(&mut r).await.unwrap();
        assert_eq!(env["agi_callerid"], "89161234567");
        assert_eq!(usable(env.get("agi_dnid")), None);

        let long = format!("agi_x: {}\n\n", "9".repeat(MAX_LINE));
        let mut r = BufReader::new(long.as_bytes());
        assert!(matches!(read_env(&mut r).await, Err(AgiError::LineTooLong)));

        let many = "agi_x: 1\n".repeat(MAX_ENV_LINES + 1) + "\n";
        let mut r = BufReader::new(many.as_bytes());
        assert!(matches!(
            read_env(&mut r).await,
            Err(AgiError::TooManyLines)
        ));

        let mut r = BufReader::new(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert!(matches!(read_env(&mut r).await, Err(AgiError::Garbage(_))));

        let mut r = BufReader::new(&b"agi_x: 1\n"[..]);
        assert!(matches!(read_env(&mut r).await, Err(AgiError::Closed)));
    }

    #[test]
    fn values_are_quoted() {
        assert_eq!(quote("101"), "\"101\"");
        assert_eq!(quote(""), "\"\"");
        assert_eq!(quote("a\"b\\c\n"), "\"a\\\"b\\\\c\"");
    }
}
