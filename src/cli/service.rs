//! The running service, as the operator commands reach it: its admin API at `http.listen`
//! (an unspecified address such as `0.0.0.0` is reached on loopback), authorised with
//! `admin.token`. `pbxgate outbox` and `pbxgate check` use it when it answers and open the store
//! themselves only when no service runs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::base::secret::Secret;
use crate::config::Config;

/// How long the probe waits for a connection, and for its answer.
const PROBE_CONNECT: Duration = Duration::from_secs(1);
const PROBE_TOTAL: Duration = Duration::from_secs(2);
/// An operation's answer (the check talks to the CRM and the PBX: longer).
const REQUEST_TOTAL: Duration = Duration::from_secs(30);
pub const CHECK_TOTAL: Duration = Duration::from_secs(120);

/// The running service's admin API.
pub struct Service {
    pub base: String,
    token: Secret,
    http: reqwest::Client,
}

/// Whether the commands use the service or the store.
pub enum Found {
    Running(Service),
    /// No service of this store answers; why, for a message if the store turns out locked.
    NotRunning(String),
}

/// Where the service listening on `listen` is reached from this machine.
pub fn connect_addr(listen: &str) -> Option<SocketAddr> {
    let mut addr: SocketAddr = listen.parse().ok()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Some(addr)
}

/// An error answer's text: the API's `errorMsg`, else the status.
fn error_text(status: reqwest::StatusCode, body: &Value) -> String {
    body.get("errorMsg")
        .and_then(Value::as_str)
        .map_or_else(|| status.to_string(), str::to_string)
}

/// Whether the service's `storage.path` (as its config gives it) is the store `ours`.
fn same_store(ours: &Path, theirs: &str) -> bool {
    let theirs = Path::new(theirs);
    ours == theirs
        || matches!((ours.canonicalize(), theirs.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// Finds the service of `config`'s store. A service that refuses the token is an error (exit
/// 1, the reason printed): the store it holds could not be opened either.
pub async fn find(config: &Config) -> Result<Found, ExitCode> {
    let Some(addr) = connect_addr(&config.http.listen) else {
        return Ok(Found::NotRunning(format!(
            "http.listen ({}) is not an address to connect to",
            config.http.listen
        )));
    };
    let base = format!("http://{addr}");
    let http = match reqwest::Client::builder()
        .connect_timeout(PROBE_CONNECT)
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(e) => return Ok(Found::NotRunning(format!("HTTP client: {e}"))),
    };
    let service = Service {
        base,
        token: config.admin.token.clone(),
        http,
    };
    let answer = service
        .request(reqwest::Method::GET, "/admin/api/config")
        .timeout(PROBE_TOTAL)
        .send()
        .await;
    let res = match answer {
        Ok(r) => r,
        Err(e) => {
            return Ok(Found::NotRunning(format!(
                "nothing answers at {}: {e}",
                service.base
            )))
        }
    };
    let status = res.status();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    match status.as_u16() {
        200 => {}
        401 => {
            eprintln!(
                "pbxgate: the service at {} refuses the admin token: {}\n\
                 Set admin.token (or PBXGATE__ADMIN__TOKEN) for this command to the running \
                 service's token.",
                service.base,
                error_text(status, &body)
            );
            return Err(ExitCode::from(1));
        }
        403 => {
            eprintln!(
                "pbxgate: the service at {} refuses its admin API: {}\n\
                 Set admin.token (or PBXGATE__ADMIN__TOKEN) in the service's configuration and \
                 for this command.",
                service.base,
                error_text(status, &body)
            );
            return Err(ExitCode::from(1));
        }
        _ => {
            return Ok(Found::NotRunning(format!(
                "{} answered {status}: not a pbxgate admin API",
                service.base
            )))
        }
    }
    let theirs = body
        .pointer("/storage/path")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !same_store(&config.storage.path, theirs) {
        return Ok(Found::NotRunning(format!(
            "the pbxgate at {} uses another store ({theirs})",
            service.base
        )));
    }
    Ok(Found::Running(service))
}

impl Service {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(REQUEST_TOTAL)
            // Asked of every change not authorised by a Bearer token (the open loopback mode).
            .header("X-Pbxgate-Admin", "1");
        if !self.token.is_empty() {
            req = req.bearer_auth(self.token.expose());
        }
        req
    }

    /// Sends a request: the answer's status and JSON body, or why there is none.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(reqwest::StatusCode, Value), String> {
        let res = req
            .send()
            .await
            .map_err(|e| format!("the service at {}: {e}", self.base))?;
        let status = res.status();
        let body = res
            .json()
            .await
            .map_err(|e| format!("the service at {} answered {status}: {e}", self.base))?;
        Ok((status, body))
    }

    /// `GET path`: the JSON body of a success, else the API's reason.
    pub async fn get(&self, path: &str) -> Result<Value, String> {
        match self.send(self.request(reqwest::Method::GET, path)).await? {
            (s, body) if s.is_success() => Ok(body),
            (s, body) => Err(error_text(s, &body)),
        }
    }

    /// `POST path` (no body): the status and the JSON body, success or not.
    pub async fn post(
        &self,
        path: &str,
        timeout: Option<Duration>,
    ) -> Result<(reqwest::StatusCode, Value), String> {
        let mut req = self.request(reqwest::Method::POST, path);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        self.send(req).await
    }

    /// An error answer's text.
    pub fn reason(status: reqwest::StatusCode, body: &Value) -> String {
        error_text(status, body)
    }
}

/// `pbxgate check` through the running service: the same lines; whether all passed.
pub async fn check(service: &Service, out: &mut dyn std::io::Write) -> Result<bool, String> {
    let (status, body) = service.post("/admin/api/check", Some(CHECK_TOTAL)).await?;
    if !status.is_success() {
        return Err(error_text(status, &body));
    }
    let lines = body
        .get("lines")
        .and_then(Value::as_array)
        .ok_or_else(|| "the service's check answered without lines".to_string())?;
    let mut all_ok = true;
    for l in lines {
        let line = crate::check::CheckLine {
            ok: l.get("ok").and_then(Value::as_bool).unwrap_or(false),
            warning: l.get("warning").and_then(Value::as_bool).unwrap_or(false),
            text: l
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        };
        all_ok &= line.ok;
        let _ = writeln!(out, "{line}");
    }
    Ok(all_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_listen_address_is_reached_on_loopback() {
        assert_eq!(
            connect_addr("0.0.0.0:8088"),
            Some("127.0.0.1:8088".parse().unwrap())
        );
        assert_eq!(
            connect_addr("[::]:9000"),
            Some("[::1]:9000".parse().unwrap())
        );
        assert_eq!(
            connect_addr("192.0.2.7:80"),
            Some("192.0.2.7:80".parse().unwrap())
        );
        assert_eq!(connect_addr("nowhere"), None);
    }

    #[test]
    fn the_store_is_the_same_by_its_path_or_its_canonical_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        std::fs::create_dir(&store).unwrap();
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        assert!(same_store(&store, store.to_str().unwrap()));
        let roundabout = dir.path().join("other/../store");
        assert!(same_store(&store, roundabout.to_str().unwrap()));
        assert!(!same_store(&store, other.to_str().unwrap()));
        assert!(!same_store(&store, ""));
    }
}
