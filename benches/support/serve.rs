//! `pbxgate serve` as its own process for the benchmarks: the release binary (`PBXGATE_BIN`, as
//! the scripts set it to the one `cargo build --release` made; else the one cargo built beside
//! the benchmark), configured through `PBXGATE__*` variables only, in an empty working directory
//! (no `config.toml`), its log in a file. `PBXGATE__*` variables in the benchmark's environment
//! are passed on and win over the benchmark's own (`PBXGATE__LOG__LEVEL=warn`). Its memory is
//! read from `/proc/<pid>/status`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The binary run: `PBXGATE_BIN`, or cargo's release-profile build of this package's binary.
pub fn binary() -> PathBuf {
    std::env::var_os("PBXGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pbxgate")))
}

/// A free port on 127.0.0.1 (bound, then released for the child to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// VmRSS of one process, in KB (0 once it is gone).
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A process and its children (nginx's master and workers), in KB.
pub fn tree_rss_kb(pid: u32) -> u64 {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    rss_kb(pid)
        + children
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .map(tree_rss_kb)
            .sum::<u64>()
}

pub fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Samples a memory figure every 20 ms on its own thread and keeps the peak.
pub struct PeakRss {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    pub fn start(sample: impl Fn() -> u64 + Send + 'static) -> PeakRss {
        let peak = Arc::new(AtomicU64::new(sample()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(sample(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        PeakRss {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the peak in KB.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A running `pbxgate serve`; killed when dropped.
pub struct Served {
    child: Child,
    pub pid: u32,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    pub http_port: u16,
    pub log: PathBuf,
    pub started: Instant,
    http: reqwest::Client,
    _cwd: tempfile::TempDir,
}

impl Served {
    /// Starts `pbxgate serve` with the store at `store` and these `PBXGATE__*` settings (names
    /// without the prefix: `("CRM__URL", ..)`); the HTTP listener and `http.public_url` are set
    /// here unless given (`HTTP__LISTEN` then must name the port as `127.0.0.1:<port>`).
    pub fn start(store: &Path, settings: &[(&str, String)]) -> Served {
        let cwd = tempfile::tempdir().expect("a working directory");
        let log = cwd.path().join("pbxgate.log");
        let given = |key: &str| settings.iter().find(|(k, _)| *k == key).map(|(_, v)| v);
        let http_port = match given("HTTP__LISTEN") {
            Some(listen) => listen
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("HTTP__LISTEN as 127.0.0.1:<port>"),
            None => free_port(),
        };
        let base = format!("http://127.0.0.1:{http_port}");
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .current_dir(cwd.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("PBXGATE__STORAGE__PATH", store)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("the log file"))
            .stderr(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&log)
                    .expect("the log file"),
            );
        if given("HTTP__LISTEN").is_none() {
            cmd.env("PBXGATE__HTTP__LISTEN", format!("127.0.0.1:{http_port}"));
        }
        if given("HTTP__PUBLIC_URL").is_none() {
            cmd.env("PBXGATE__HTTP__PUBLIC_URL", &base);
        }
        for (k, v) in settings {
            cmd.env(format!("PBXGATE__{k}"), v);
        }
        for (k, v) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("PBXGATE__") {
                cmd.env(k, v);
            }
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary().display()));
        Served {
            pid: child.id(),
            child,
            base,
            http_port,
            log,
            started,
            http: reqwest::Client::new(),
            _cwd: cwd,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn rss_kb(&self) -> u64 {
        rss_kb(self.pid)
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "pbxgate serve exited ({status}); its log:\n{}",
                self.log_tail()
            );
        }
    }

    /// Waits (at most 60 s) until `GET /health` answers.
    pub async fn healthy(&mut self) -> Duration {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.check_alive();
            if let Ok(r) = self.http.get(self.url("/health")).send().await {
                if r.status().is_success() {
                    return self.started.elapsed();
                }
            }
            assert!(
                Instant::now() < deadline,
                "pbxgate serve did not answer /health within 60 s; its log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /ready`'s body.
    pub async fn ready(&mut self) -> serde_json::Value {
        self.check_alive();
        self.http
            .get(self.url("/ready"))
            .send()
            .await
            .expect("GET /ready")
            .json()
            .await
            .expect("/ready is JSON")
    }

    /// Polls `/ready` every `every` until `done` holds (at most `limit`); the body that held.
    pub async fn ready_until(
        &mut self,
        every: Duration,
        limit: Duration,
        mut done: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let body = self.ready().await;
            if done(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "pbxgate: not done within {limit:?}; /ready: {body}\nits log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(every).await;
        }
    }

    /// SIGTERM, then waits (at most 10 s, then SIGKILL).
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signalling our own child by its pid.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.terminate();
    }
}
