//! Customization hooks: the integrator's own program or HTTP service, called at a fixed point of
//! a call's life, may change what pbxgate decides there. This module runs them; the points are
//! the callers' business (`config::HOOK_POINTS` lists them).
//!
//! Contract:
//! - Input: one JSON object, `{"point": "<name>", ...the caller's fields}` (`call_full`,
//!   `call_stage` and the point's own fields), written as one line to the program's stdin, which
//!   is then closed, or POSTed as the body with `Content-Type: application/json`.
//! - Output: stdout (exit status 0) or a 2xx body `{"state": "success", "data": {...}}`. `data`
//!   (missing or `null`: nothing) holds only the fields the hook changes, each of the type the
//!   point gives it; the rest keeps its default.
//! - Anything else is the point's default behaviour ([`HookResult::Default`]), one warn line
//!   naming the point and the reason, and a count: the timeout (the program's whole process
//!   group is killed, the HTTP request dropped), a failed spawn or request, a non-zero exit
//!   (with stderr's first 200 bytes, on one line), a non-2xx status, output over 1 MiB, output
//!   that is not a JSON object, `state` other than `success`, a `data` field the point does not
//!   have or of the wrong type.
//! - A hook runs in a task of its own: the program through `tokio::process`, the request through
//!   async reqwest, so a slow hook holds back only the caller waiting for it, never a worker.
//!   stdin, stdout and stderr are served concurrently (a hook writing a lot while pbxgate is
//!   still writing cannot deadlock), and the child is always reaped.
//!
//! Counts per point and outcome (`changed`, `unchanged`: success with nothing in `data`,
//! `timeout`, `failed`) are in [`Hooks::stats`].

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::config::HooksConfig;

pub mod phone_points;

/// Where in a call's life a point is called (`call_stage` in its input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// An extension starts ringing (inbound) or the customer is dialled (outbound).
    ConversationRequested,
    /// Someone answered.
    ConversationAccepted,
    /// One conversation of the call ended (a transfer goes on).
    ConversationEnded,
    /// The call is over.
    CallEnded,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::ConversationRequested => "conversation_requested",
            Stage::ConversationAccepted => "conversation_accepted",
            Stage::ConversationEnded => "conversation_ended",
            Stage::CallEnded => "call_ended",
        }
    }
}

/// The most a hook may answer (stdout or response body).
pub const MAX_OUTPUT: usize = 1024 * 1024;
/// How much of a failed program's stderr the log line carries.
pub const STDERR_HEAD: usize = 200;

/// The type a point gives one of the fields a hook may return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Bool,
    String,
    /// A string or `null`.
    OptString,
    /// A whole number that fits an `i64`.
    Integer,
    /// A whole number or `null`.
    OptInteger,
    /// Any JSON number.
    Number,
    Object,
    /// An object or `null`.
    OptObject,
    /// An object whose values are all strings (e.g. channel variables).
    StringMap,
    Array,
    /// Any value with no `null` in it, at any depth (CRMs that refuse nulls: Kommo).
    Any,
}

impl FieldKind {
    fn accepts(self, v: &Value) -> bool {
        let integer = |v: &Value| {
            v.is_i64() || (v.is_u64() && v.as_u64().is_some_and(|n| n <= i64::MAX as u64))
        };
        match self {
            FieldKind::Bool => v.is_boolean(),
            FieldKind::String => v.is_string(),
            FieldKind::OptString => v.is_string() || v.is_null(),
            FieldKind::Integer => integer(v),
            FieldKind::OptInteger => integer(v) || v.is_null(),
            FieldKind::Number => v.is_number(),
            FieldKind::Object => v.is_object(),
            FieldKind::OptObject => v.is_object() || v.is_null(),
            FieldKind::StringMap => v
                .as_object()
                .is_some_and(|m| m.values().all(Value::is_string)),
            FieldKind::Array => v.is_array(),
            FieldKind::Any => !has_null(v),
        }
    }

    fn name(self) -> &'static str {
        match self {
            FieldKind::Bool => "a boolean",
            FieldKind::String => "a string",
            FieldKind::OptString => "a string or null",
            FieldKind::Integer => "an integer",
            FieldKind::OptInteger => "an integer or null",
            FieldKind::Number => "a number",
            FieldKind::Object => "an object",
            FieldKind::OptObject => "an object or null",
            FieldKind::StringMap => "an object of strings",
            FieldKind::Array => "an array",
            FieldKind::Any => "a value with no null in it",
        }
    }
}

/// Why a hook's answer was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookFailure {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot start {program}: {error}")]
    Spawn { program: String, error: String },
    #[error("exited with {status}; stderr: {stderr}")]
    Exit { status: String, stderr: String },
    #[error("request failed: {0}")]
    Request(String),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("output larger than {MAX_OUTPUT} bytes")]
    TooLarge,
    #[error("output is not a JSON object: {0}")]
    NotJson(String),
    #[error("state is {0}, not \"success\"")]
    State(String),
    #[error("data has a field the point does not have: {0:?}")]
    UnknownField(String),
    #[error("data.{field} must be {expected}")]
    WrongType {
        field: String,
        expected: &'static str,
    },
    #[error("the input is not a JSON object")]
    BadInput,
    #[error("{0}")]
    Internal(String),
}

/// What a call of a hook gives the point.
#[derive(Debug, Clone, PartialEq)]
pub enum HookResult {
    /// No hook at this point: the default, at no cost.
    NotConfigured,
    /// The hook answered: the fields it changed (only allowed ones, type-checked; may be empty).
    Changed(Map<String, Value>),
    /// The hook failed (already logged and counted): the default applies.
    Default(HookFailure),
}

/// One call of a hook made to see what it does ([`Hooks::trial`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    /// What the hook answered (stdout or the response body, as text), or why it gave nothing.
    pub raw: Result<String, HookFailure>,
    /// What the point makes of it.
    pub result: HookResult,
}

/// One point's counts, as `/ready` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HookCounts {
    pub changed: u64,
    pub unchanged: u64,
    pub timeout: u64,
    pub failed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    changed: AtomicU64,
    unchanged: AtomicU64,
    timeout: AtomicU64,
    failed: AtomicU64,
}

#[derive(Debug, Clone)]
enum Target {
    Command(Vec<String>),
    Url(String),
}

impl Target {
    /// How the log line names the hook: the program, or the URL without its query.
    fn describe(&self) -> String {
        match self {
            Target::Command(argv) => argv.first().cloned().unwrap_or_default(),
            Target::Url(u) => match url::Url::parse(u) {
                Ok(mut url) => {
                    url.set_query(None);
                    url.set_fragment(None);
                    let _ = url.set_password(None);
                    let _ = url.set_username("");
                    url.to_string()
                }
                Err(_) => "(invalid url)".to_string(),
            },
        }
    }
}

#[derive(Debug)]
struct Point {
    target: Target,
    timeout: Duration,
    counters: Counters,
}

#[derive(Debug)]
struct Inner {
    points: BTreeMap<String, Point>,
    http: reqwest::Client,
}

/// The configured hooks; cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct Hooks {
    inner: Arc<Inner>,
}

impl Hooks {
    /// The hooks `config` describes (already checked by `Config::check`), HTTP ones sent
    /// through `http`.
    pub fn new(config: &HooksConfig, http: reqwest::Client) -> Hooks {
        let points = config
            .iter()
            .map(|(name, hook)| {
                let target = if hook.command.is_empty() {
                    Target::Url(hook.url.clone())
                } else {
                    Target::Command(hook.command.clone())
                };
                let point = Point {
                    target,
                    timeout: hook.timeout,
                    counters: Counters::default(),
                };
                (name.to_string(), point)
            })
            .collect();
        Hooks {
            inner: Arc::new(Inner { points, http }),
        }
    }

    /// No hook anywhere (one-shot tools, tests).
    pub fn none() -> Hooks {
        Hooks::new(&HooksConfig::default(), reqwest::Client::new())
    }

    /// Whether any point has a hook.
    pub fn any_configured(&self) -> bool {
        !self.inner.points.is_empty()
    }

    pub fn is_configured(&self, point: &str) -> bool {
        self.inner.points.contains_key(point)
    }

    /// Calls the hook of `point` with `input` (an object; `point` is added) and keeps from its
    /// `data` the `fields` the point allows. Never fails: a failure is logged, counted and
    /// returned as [`HookResult::Default`].
    pub async fn call(
        &self,
        point: &str,
        input: Value,
        fields: &[(&str, FieldKind)],
    ) -> HookResult {
        match self.attempt(point, input, fields).await {
            Some((_, result)) => result,
            None => HookResult::NotConfigured,
        }
    }

    /// One call of the hook of `point` as [`Hooks::call`] makes it (logged and counted the same
    /// way), with what the hook answered before it was judged: for developing a hook. None when
    /// the point has no hook.
    pub async fn trial(
        &self,
        point: &str,
        input: Value,
        fields: &[(&str, FieldKind)],
    ) -> Option<Trial> {
        let (raw, result) = self.attempt(point, input, fields).await?;
        Some(Trial {
            raw: raw.map(|body| String::from_utf8_lossy(&body).into_owned()),
            result,
        })
    }

    /// Runs the hook and judges its answer: the raw answer (or why there is none) and the result.
    async fn attempt(
        &self,
        point: &str,
        input: Value,
        fields: &[(&str, FieldKind)],
    ) -> Option<(Result<Vec<u8>, HookFailure>, HookResult)> {
        let hook = self.inner.points.get(point)?;
        // A caller that stops waiting (its own deadline) is a timeout too.
        let mut given_up = GivenUp {
            point,
            counters: &hook.counters,
            armed: true,
        };
        let raw = match input {
            Value::Object(mut map) => {
                map.insert("point".into(), Value::String(point.to_string()));
                self.run(point, Value::Object(map)).await
            }
            _ => Err(HookFailure::BadInput),
        };
        given_up.armed = false;
        let judged = match &raw {
            Ok(body) => accept(body, fields),
            Err(failure) => Err(failure.clone()),
        };
        let c = &hook.counters;
        let result = match judged {
            Ok(data) => {
                let counter = if data.is_empty() {
                    &c.unchanged
                } else {
                    &c.changed
                };
                counter.fetch_add(1, Ordering::Relaxed);
                HookResult::Changed(data)
            }
            Err(failure) => {
                let counter = if matches!(failure, HookFailure::Timeout(_)) {
                    &c.timeout
                } else {
                    &c.failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(hook = point, target = %hook.target.describe(), reason = %failure,
                    "hook failed: the default applies");
                HookResult::Default(failure)
            }
        };
        Some((raw, result))
    }

    /// Counts per configured point and outcome.
    pub fn stats(&self) -> BTreeMap<String, HookCounts> {
        self.inner
            .points
            .iter()
            .map(|(name, p)| {
                let c = &p.counters;
                let counts = HookCounts {
                    changed: c.changed.load(Ordering::Relaxed),
                    unchanged: c.unchanged.load(Ordering::Relaxed),
                    timeout: c.timeout.load(Ordering::Relaxed),
                    failed: c.failed.load(Ordering::Relaxed),
                };
                (name.clone(), counts)
            })
            .collect()
    }

    /// Runs the hook in a task of its own; its raw answer.
    async fn run(&self, point: &str, input: Value) -> Result<Vec<u8>, HookFailure> {
        let hook = &self.inner.points[point];
        let mut body =
            serde_json::to_vec(&input).map_err(|e| HookFailure::Internal(e.to_string()))?;
        let timeout = hook.timeout;
        let task = match &hook.target {
            Target::Command(argv) => {
                body.push(b'\n');
                tokio::spawn(run_command(argv.clone(), body, timeout))
            }
            Target::Url(url) => {
                let request = self
                    .inner
                    .http
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body);
                tokio::spawn(run_request(request, timeout))
            }
        };
        task.await
            .unwrap_or_else(|e| Err(HookFailure::Internal(format!("hook task ended: {e}"))))
    }
}

/// Counts a hook call whose caller stopped waiting before it answered (dropped while armed).
struct GivenUp<'a> {
    point: &'a str,
    counters: &'a Counters,
    armed: bool,
}

impl Drop for GivenUp<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.counters.timeout.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                hook = self.point,
                "hook cut off: its caller's deadline passed first; the default applies"
            );
        }
    }
}

/// The fields of a `{"state": "success", "data": {...}}` answer the point allows.
/// A `null` anywhere in the value.
fn has_null(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.iter().any(has_null),
        Value::Object(m) => m.values().any(has_null),
        _ => false,
    }
}

fn accept(body: &[u8], fields: &[(&str, FieldKind)]) -> Result<Map<String, Value>, HookFailure> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        if body.iter().all(u8::is_ascii_whitespace) {
            HookFailure::NotJson("empty output".into())
        } else {
            HookFailure::NotJson(e.to_string())
        }
    })?;
    let Value::Object(mut answer) = value else {
        return Err(HookFailure::NotJson("not an object".into()));
    };
    match answer.get("state") {
        Some(Value::String(s)) if s == "success" => {}
        Some(other) => return Err(HookFailure::State(one_line(&other.to_string(), 100))),
        None => return Err(HookFailure::State("missing".into())),
    }
    let data = match answer.remove("data") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(HookFailure::NotJson("data is not an object".into())),
    };
    for (key, value) in &data {
        // A point that takes any field (a CRM record's fields) lists `*`.
        let named = fields.iter().find(|(name, _)| name == key);
        let Some((_, kind)) = named.or_else(|| fields.iter().find(|(name, _)| *name == "*")) else {
            return Err(HookFailure::UnknownField(one_line(key, 100)));
        };
        if !kind.accepts(value) {
            return Err(HookFailure::WrongType {
                field: one_line(key, 100),
                expected: kind.name(),
            });
        }
    }
    Ok(data)
}

/// `text` cut to `max` bytes (on a character boundary), control characters as spaces.
fn one_line(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

async fn run_command(
    argv: Vec<String>,
    input: Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>, HookFailure> {
    let program = argv.first().cloned().unwrap_or_default();
    let spawn_error = |error: String| HookFailure::Spawn {
        program: program.clone(),
        error,
    };
    if program.is_empty() {
        return Err(spawn_error("empty command".into()));
    }
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[cfg(unix)]
    cmd.process_group(0);
    let mut child = cmd.spawn().map_err(|e| spawn_error(e.to_string()))?;
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let write = async move {
        if let Some(mut stdin) = stdin {
            // A hook that exits without reading its input is judged by its output alone.
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        }
        Ok::<(), HookFailure>(())
    };
    let read_out = async move {
        match stdout {
            Some(s) => read_limited(s, MAX_OUTPUT).await,
            None => Ok(Vec::new()),
        }
    };
    let read_err = async move {
        match stderr {
            Some(s) => Ok(read_head(s, STDERR_HEAD).await),
            None => Ok(Vec::new()),
        }
    };
    let outcome = {
        let wait = async {
            child
                .wait()
                .await
                .map_err(|e| HookFailure::Internal(format!("cannot wait for the hook: {e}")))
        };
        tokio::time::timeout(timeout, async {
            tokio::try_join!(write, read_out, read_err, wait)
        })
        .await
    };
    match outcome {
        Ok(Ok(((), out, err, status))) => {
            if status.success() {
                Ok(out)
            } else {
                Err(HookFailure::Exit {
                    status: status.to_string(),
                    stderr: one_line(&String::from_utf8_lossy(&err), STDERR_HEAD),
                })
            }
        }
        Ok(Err(failure)) => {
            kill_group(&mut child).await;
            Err(failure)
        }
        Err(_) => {
            kill_group(&mut child).await;
            Err(HookFailure::Timeout(timeout))
        }
    }
}

/// Everything `from` gives, or `TooLarge` as soon as it passes `max`.
async fn read_limited(
    mut from: impl AsyncRead + Unpin,
    max: usize,
) -> Result<Vec<u8>, HookFailure> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = from
            .read(&mut buf)
            .await
            .map_err(|e| HookFailure::Internal(format!("cannot read the hook's output: {e}")))?;
        if n == 0 {
            return Ok(out);
        }
        if out.len() + n > max {
            return Err(HookFailure::TooLarge);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// The first `keep` bytes of `from`, read to its end (a full pipe would stall the hook).
async fn read_head(mut from: impl AsyncRead + Unpin, keep: usize) -> Vec<u8> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = keep.saturating_sub(head.len());
        head.extend_from_slice(&buf[..n.min(room)]);
    }
    head
}

/// Kills the hook and anything it started (`sh -c`, its children), then reaps it.
async fn kill_group(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: killpg(2) signals the process group created for the child (pgid = its pid).
        unsafe {
            libc::killpg(pid, libc::SIGKILL);
        }
    }
    let _ = child.kill().await;
}

async fn run_request(
    request: reqwest::RequestBuilder,
    timeout: Duration,
) -> Result<Vec<u8>, HookFailure> {
    let exchange = async {
        let mut response = request
            .send()
            .await
            .map_err(|e| HookFailure::Request(e.without_url().to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(HookFailure::Status(status.as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_OUTPUT as u64)
        {
            return Err(HookFailure::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| HookFailure::Request(e.without_url().to_string()))?
        {
            if body.len() + chunk.len() > MAX_OUTPUT {
                return Err(HookFailure::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(HookFailure::Timeout(timeout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: &[(&str, FieldKind)] = &[
        ("result", FieldKind::Bool),
        ("phone", FieldKind::String),
        ("code", FieldKind::OptString),
        ("duration", FieldKind::Integer),
        ("user_id", FieldKind::OptInteger),
        ("variables", FieldKind::StringMap),
    ];

    #[tokio::test]
    async fn a_caller_that_stops_waiting_counts_a_timeout() {
        let mut config = HooksConfig::default();
        config.0.insert(
            "need_registration".into(),
            crate::config::HookConfig {
                command: vec!["sh".into(), "-c".into(), "sleep 30".into()],
                url: String::new(),
                timeout: Duration::from_secs(60),
            },
        );
        let hooks = Hooks::new(&config, reqwest::Client::new());
        let call = hooks.call("need_registration", serde_json::json!({}), FIELDS);
        assert!(tokio::time::timeout(Duration::from_millis(100), call)
            .await
            .is_err());
        let counts = hooks.stats()["need_registration"];
        assert_eq!((counts.timeout, counts.failed, counts.changed), (1, 0, 0));
    }

    #[test]
    fn only_allowed_fields_of_their_type_are_accepted() {
        let ok = br#"{"state":"success","data":{"phone":"79001234567","code":null,"user_id":7,"variables":{"A":"1"}}}"#;
        let data = accept(ok, FIELDS).unwrap();
        assert_eq!(data.len(), 4);
        assert_eq!(data["phone"], "79001234567");
        assert_eq!(accept(br#"{"state":"success"}"#, FIELDS), Ok(Map::new()));
        assert_eq!(
            accept(br#"{"state":"success","data":{"nope":1}}"#, FIELDS),
            Err(HookFailure::UnknownField("nope".into()))
        );
        for (bad, field) in [
            (r#"{"result":"false"}"#, "result"),
            (r#"{"duration":1.5}"#, "duration"),
            (r#"{"duration":null}"#, "duration"),
            (r#"{"variables":{"A":1}}"#, "variables"),
        ] {
            let body = format!(r#"{{"state":"success","data":{bad}}}"#);
            match accept(body.as_bytes(), FIELDS) {
                Err(HookFailure::WrongType { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(matches!(
            accept(br#"{"state":"error","data":{}}"#, FIELDS),
            Err(HookFailure::State(_))
        ));
        assert!(matches!(accept(b"", FIELDS), Err(HookFailure::NotJson(_))));
        assert!(matches!(
            accept(b"[1]", FIELDS),
            Err(HookFailure::NotJson(_))
        ));
        assert!(matches!(
            accept(br#"{"state":"success","data":[1]}"#, FIELDS),
            Err(HookFailure::NotJson(_))
        ));
    }

    #[test]
    fn one_line_cuts_on_a_character_boundary_and_flattens() {
        assert_eq!(one_line("a\nb\r\nc", 100), "a b  c");
        assert_eq!(one_line("ééé", 3), "é");
    }
}
