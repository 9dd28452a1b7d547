//! Asterisk Manager Interface. For now: a login probe used by `pbxgate check`.
//!
//! AMI is line-based over TCP: the server first sends one banner line
//! (`Asterisk Call Manager/<version>`), then messages of `Key: Value` lines ending with an empty
//! line, all CRLF.

pub mod frame;

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::config::AmiConfig;

/// Longest line accepted from the server during the probe.
const MAX_LINE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{0} is not an Asterisk manager (banner {1:?})")]
    Banner(String, String),
    #[error("login refused: {0}")]
    LoginRefused(String),
    #[error("connection: {0}")]
    Io(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Connects, reads the banner, logs in with the plain secret and logs off. Returns the banner.
pub async fn probe_login(cfg: &AmiConfig) -> Result<String, ProbeError> {
    let timeout = cfg.connect_timeout;
    tokio::time::timeout(timeout * 2, probe_inner(cfg))
        .await
        .map_err(|_| ProbeError::Timeout(timeout * 2))?
}

async fn probe_inner(cfg: &AmiConfig) -> Result<String, ProbeError> {
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let stream = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(&addr))
        .await
        .map_err(|_| ProbeError::Connect {
            addr: addr.clone(),
            reason: "timed out".into(),
        })?
        .map_err(|e| ProbeError::Connect {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);

    let banner = read_line(&mut reader).await?;
    if !banner.starts_with("Asterisk Call Manager/") {
        return Err(ProbeError::Banner(addr, banner));
    }

    let login = format!(
        "Action: Login\r\nActionID: pbxgate-check-1\r\nUsername: {}\r\nSecret: {}\r\nEvents: off\r\n\r\n",
        cfg.username.replace(['\r', '\n'], ""),
        cfg.secret.expose().replace(['\r', '\n'], "")
    );
    write
        .write_all(login.as_bytes())
        .await
        .map_err(|e| ProbeError::Io(e.to_string()))?;

    // Skip anything that is not our answer (events before Events: off took effect).
    loop {
        let msg = read_message(&mut reader).await?;
        let get = |k: &str| {
            msg.iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.as_str())
        };
        if get("ActionID") != Some("pbxgate-check-1") {
            continue;
        }
        match get("Response") {
            Some(r) if r.eq_ignore_ascii_case("Success") => break,
            _ => {
                return Err(ProbeError::LoginRefused(
                    get("Message").unwrap_or("no reason given").to_string(),
                ))
            }
        }
    }
    let _ = write
        .write_all(b"Action: Logoff\r\nActionID: pbxgate-check-2\r\n\r\n")
        .await;
    Ok(banner)
}

async fn read_line<R: AsyncBufReadExt + Unpin>(reader: &mut R) -> Result<String, ProbeError> {
    let mut buf = Vec::new();
    let n = (&mut *reader)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|e| ProbeError::Io(e.to_string()))?;
    if n == 0 {
        return Err(ProbeError::Io("closed by the server".into()));
    }
    if !buf.ends_with(b"\n") {
        return Err(ProbeError::Io(format!("line longer than {MAX_LINE} bytes")));
    }
    Ok(String::from_utf8_lossy(&buf)
        .trim_end_matches(['\r', '\n'])
        .to_string())
}

async fn read_message<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
) -> Result<Vec<(String, String)>, ProbeError> {
    let mut fields = Vec::new();
    loop {
        let line = read_line(reader).await?;
        if line.is_empty() {
            if fields.is_empty() {
                continue;
            }
            return Ok(fields);
        }
        if fields.len() > 256 {
            return Err(ProbeError::Io("message has too many lines".into()));
        }
        if let Some((k, v)) = line.split_once(':') {
            fields.push((k.trim().to_string(), v.trim_start().to_string()));
        }
    }
}
