//! The bundled AMI captures (real Asterisk 22 sessions, `captures/*.raw`) and how the simulated
//! Asterisk replays them: each replay gets fresh Uniqueids/Linkedids, channel name suffixes,
//! bridge ids and recording paths, the customer's number chosen for it, and a `Timestamp:`
//! of the moment it is sent (as with `timestampevents = yes`).
//!
//! `captures/<name>.times` holds, one per line, when each frame of the `.raw` file arrived
//! (milliseconds since the capture's connect, taken from the annotated capture log), so that
//! a replay rings, talks and hangs up with the durations of the real call.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;

use crate::pbx::ami::frame::{Frame, Item, Limits, Parser};

/// One capture: its AMI bytes and the arrival time of each frame.
pub struct Capture {
    pub name: &'static str,
    /// What happens in it, for the logs.
    pub what: &'static str,
    raw: &'static [u8],
    times: &'static str,
    /// The customer's number in the capture, replaced in every replay.
    pub customer: &'static str,
}

macro_rules! capture {
    ($name:literal, $what:literal, $customer:literal) => {
        Capture {
            name: $name,
            what: $what,
            raw: include_bytes!(concat!("captures/", $name, ".raw")),
            times: include_str!(concat!("captures/", $name, ".times")),
            customer: $customer,
        }
    };
}

/// The calls replayed one after the other, in this order, round and round.
pub static SCHEDULE: &[Capture] = &[
    capture!(
        "10_inbound_abandoned",
        "inbound call, the caller gives up after 2 s of ringing",
        "+491705551234"
    ),
    capture!(
        "03_inbound_from_trunk",
        "inbound call to 101 & 102, 101 answers",
        "+491701234567"
    ),
    capture!(
        "02_originate_outbound",
        "outbound call from 101, answered",
        "+4930123456"
    ),
    capture!(
        "09_inbound_missed",
        "inbound call to 101 & 102, nobody answers",
        "+491701234567"
    ),
    capture!(
        "07_inbound_blind_transfer",
        "inbound call to 101, transferred to 102",
        "+491701234567"
    ),
    capture!("12_internal_101_to_102", "internal call 101 → 102", ""),
];

/// The click-to-call template: an Originate of `Local/101@internal` to `+4930123456`; 101
/// answers after 2 s, the customer 2 s later, 6 s of talk.
pub static ORIGINATE: Capture = capture!("02_originate_outbound", "click-to-call", "+4930123456");
/// The originated channel of [`ORIGINATE`] and its other half.
const ORIGINATE_UID: (&str, &str) = ("1795264459.0", "1795264459.1");
/// How the capture's Originate named the manager's leg, its context and extension.
const ORIGINATE_CHANNEL: &str = "Local/101@internal";
const ORIGINATE_CONTEXT: &str = "internal";
const ORIGINATE_CODE: &str = "101";

/// Session events that belong to the capture's own connection, not to a call.
const SESSION_EVENTS: &[&str] = &[
    "FullyBooted",
    "SuccessfulAuth",
    "ChallengeSent",
    "FailedACL",
    "InvalidPassword",
];

/// One frame to send, `at` after the replay starts.
#[derive(Debug, Clone)]
pub struct Step {
    pub at: Duration,
    pub frame: Frame,
}

impl Capture {
    /// Every frame of the capture with its arrival time since connect.
    fn frames(&self) -> Vec<(Duration, Frame)> {
        let mut parser = Parser::new(Limits::default());
        parser.push(self.raw);
        let mut frames = Vec::new();
        while let Some(item) = parser.next_item() {
            if let Item::Frame(f) = item {
                frames.push(f);
            }
        }
        let mut times = self
            .times
            .lines()
            .map(|l| Duration::from_millis(l.trim().parse().unwrap_or(0)));
        frames
            .into_iter()
            .map(|f| (times.next().unwrap_or_default(), f))
            .collect()
    }

    /// The events of the capture's calls, timed from the first one: the answers to the
    /// capture's own actions, events carrying their ActionIDs (`keep_originate`: except the
    /// OriginateResponse) and session events are left out.
    pub fn steps(&self, keep_originate: bool) -> Vec<Step> {
        let kept: Vec<(Duration, Frame)> = self
            .frames()
            .into_iter()
            .filter(|(_, f)| match f.event() {
                None => false,
                Some(e) if SESSION_EVENTS.contains(&e) => false,
                Some("OriginateResponse") => keep_originate,
                Some(_) => f.action_id().is_none(),
            })
            .collect();
        let first = kept.first().map(|(t, _)| *t).unwrap_or_default();
        kept.into_iter()
            .map(|(t, frame)| Step {
                at: t.saturating_sub(first),
                frame,
            })
            .collect()
    }
}

/// Fresh ids for every replay, shared by all of them: Asterisk's channel counter and the
/// sequence of its Uniqueids.
#[derive(Debug, Default)]
pub struct IdSource {
    uniqueid: AtomicU64,
    channel: AtomicU64,
    file: AtomicU64,
}

impl IdSource {
    fn uniqueid(&self) -> String {
        let n = self.uniqueid.fetch_add(1, Ordering::Relaxed);
        format!("{}.{n}", now_secs())
    }

    fn channel_suffix(&self) -> String {
        format!("{:08x}", self.channel.fetch_add(1, Ordering::Relaxed))
    }

    fn file(&self) -> u64 {
        self.file.fetch_add(1, Ordering::Relaxed) + 1
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `Timestamp:` as Asterisk writes it: seconds since the epoch with microseconds.
pub fn timestamp_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:06}", d.as_secs(), d.subsec_micros())
}

static UNIQUEID: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\b\d{10}\.\d{1,6}\b").unwrap());
static BRIDGE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b").unwrap()
});
static CHANNEL_SUFFIX: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"-([0-9a-f]{8})\b").unwrap());
static RECORDING: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#"/var/spool/asterisk/monitor/[^\s,|)"']+"#).unwrap());

/// The rewriting of one replay: every old id always becomes the same new one.
pub struct Replay<'a> {
    ids: &'a IdSource,
    records_dir: PathBuf,
    uniqueids: HashMap<String, String>,
    suffixes: HashMap<String, String>,
    bridges: HashMap<String, String>,
    recordings: HashMap<String, PathBuf>,
    /// Substrings replaced in every value (numbers, channel names), in order.
    replace: Vec<(String, String)>,
    /// Values replaced when they are exactly this.
    exact: Vec<(String, String)>,
    /// Recording files named so far, to be written by the caller.
    new_recordings: Vec<PathBuf>,
}

/// What a click-to-call's Originate asked for.
#[derive(Debug, Clone, Default)]
pub struct OriginateRequest {
    pub action_id: String,
    /// The manager's leg (`Local/101@from-internal`).
    pub channel: String,
    pub context: String,
    /// The customer's number.
    pub exten: String,
    /// The Uniqueid asked for (pbxgate's call id).
    pub channel_id: String,
    /// `Variable` headers (`NAME=value`).
    pub variables: Vec<String>,
}

impl<'a> Replay<'a> {
    pub fn new(ids: &'a IdSource, records_dir: &Path) -> Replay<'a> {
        Replay {
            ids,
            records_dir: records_dir.to_path_buf(),
            uniqueids: HashMap::new(),
            suffixes: HashMap::new(),
            bridges: HashMap::new(),
            recordings: HashMap::new(),
            replace: Vec::new(),
            exact: Vec::new(),
            new_recordings: Vec::new(),
        }
    }

    /// The capture's customer number becomes `number` everywhere.
    pub fn with_customer(mut self, old: &str, number: &str) -> Self {
        if !old.is_empty() && !number.is_empty() {
            self.replace.push((old.to_string(), number.to_string()));
        }
        self
    }

    /// Set up for answering `req` with [`ORIGINATE`]: its ids, the manager's channel and
    /// extension, the context and the number asked for.
    pub fn for_originate(mut self, req: &OriginateRequest) -> Self {
        if !req.channel_id.is_empty() {
            self.uniqueids
                .insert(ORIGINATE_UID.0.into(), req.channel_id.clone());
            self.uniqueids
                .insert(ORIGINATE_UID.1.into(), format!("{};2", req.channel_id));
        }
        let code = originate_code(&req.channel).unwrap_or(ORIGINATE_CODE.to_string());
        if !req.channel.is_empty() {
            self.replace
                .push((format!("{ORIGINATE_CHANNEL}-"), format!("{}-", req.channel)));
        }
        self.replace
            .push((format!("Local/{ORIGINATE_CODE}@"), format!("Local/{code}@")));
        self.replace
            .push((format!("PJSIP/{ORIGINATE_CODE}"), format!("PJSIP/{code}")));
        self.exact.push((ORIGINATE_CODE.into(), code));
        if !req.context.is_empty() {
            self.exact
                .push((ORIGINATE_CONTEXT.into(), req.context.clone()));
        }
        self.with_customer(ORIGINATE.customer, &req.exten)
    }

    /// Recording files named since the last call (to be written before the frame is sent).
    pub fn take_new_recordings(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.new_recordings)
    }

    /// The frame as this replay sends it, stamped now.
    pub fn rewrite(&mut self, frame: &Frame) -> Frame {
        let mut pairs: Vec<(String, String)> = Vec::with_capacity(frame.len() + 1);
        for (k, v) in frame.iter() {
            let v = self.value(v);
            pairs.push((k.to_string(), v));
            if k == "Privilege" {
                pairs.push(("Timestamp".into(), timestamp_now()));
            }
        }
        Frame::from_pairs(pairs)
    }

    fn value(&mut self, v: &str) -> String {
        if let Some((_, new)) = self.exact.iter().find(|(old, _)| old == v) {
            return new.clone();
        }
        let mut s = v.to_string();
        if s.contains("/var/spool/asterisk/monitor/") {
            s = RECORDING
                .replace_all(&s, |c: &regex::Captures| {
                    let old = c[0].to_string();
                    if let Some(p) = self.recordings.get(&old) {
                        return p.display().to_string();
                    }
                    let ext = Path::new(&old)
                        .extension()
                        .and_then(|e| e.to_str())
                        .unwrap_or("wav")
                        .to_string();
                    let path = self
                        .records_dir
                        .join(format!("demo-{:04}.{ext}", self.ids.file()));
                    self.recordings.insert(old, path.clone());
                    self.new_recordings.push(path.clone());
                    path.display().to_string()
                })
                .into_owned();
        }
        for (old, new) in &self.replace {
            if s.contains(old.as_str()) {
                s = s.replace(old.as_str(), new);
            }
        }
        let ids = self.ids;
        // Before the Uniqueids: pbxgate's own ids (ChannelId) may end like a channel suffix.
        s = CHANNEL_SUFFIX
            .replace_all(&s, |c: &regex::Captures| {
                let new = self
                    .suffixes
                    .entry(c[1].to_string())
                    .or_insert_with(|| ids.channel_suffix());
                format!("-{new}")
            })
            .into_owned();
        s = UNIQUEID
            .replace_all(&s, |c: &regex::Captures| {
                self.uniqueids
                    .entry(c[0].to_string())
                    .or_insert_with(|| ids.uniqueid())
                    .clone()
            })
            .into_owned();
        BRIDGE
            .replace_all(&s, |c: &regex::Captures| {
                self.bridges
                    .entry(c[0].to_string())
                    .or_insert_with(new_bridge_id)
                    .clone()
            })
            .into_owned()
    }
}

/// The extension of a `Local/<code>@<context>` or `<tech>/<code>` channel.
fn originate_code(channel: &str) -> Option<String> {
    let rest = channel.split_once('/')?.1;
    let code = rest.split(['@', '-', ';']).next()?;
    (!code.is_empty()).then(|| code.to_string())
}

fn new_bridge_id() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The VarSet events Asterisk sends for an Originate's `Variable`s on `channel`, in place of
/// the capture's own (`ORIGIN=ami-test`).
pub fn is_capture_variable(frame: &Frame) -> bool {
    frame.event() == Some("VarSet") && frame.get("Variable") == Some("ORIGIN")
}

/// `frame` (a VarSet of the originated channel) setting `name=value` instead.
pub fn variable_like(frame: &Frame, assignment: &str) -> Frame {
    let (name, value) = assignment.split_once('=').unwrap_or((assignment, ""));
    Frame::from_pairs(frame.iter().map(|(k, v)| match k {
        "Variable" => (k, name),
        "Value" => (k, value),
        _ => (k, v),
    }))
}

/// A short recording: `seconds` of a quiet two-tone signal, 8 kHz 16-bit mono PCM WAV.
pub fn tone_wav(seconds: u32) -> Vec<u8> {
    const RATE: u32 = 8000;
    let samples = RATE * seconds;
    let data_len = samples * 2;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&RATE.to_le_bytes());
    out.extend_from_slice(&(RATE * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for i in 0..samples {
        let t = i as f32 / RATE as f32;
        // Alternating 440/480 Hz every half second, like a distant ring-back.
        let f = if (t * 2.0) as u32 % 2 == 0 {
            440.0
        } else {
            480.0
        };
        let s = (t * f * std::f32::consts::TAU).sin() * 6000.0;
        out.extend_from_slice(&(s as i16).to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_capture_has_a_time_for_each_frame_and_calls_in_it() {
        for c in SCHEDULE.iter().chain([&ORIGINATE]) {
            assert_eq!(c.frames().len(), c.times.lines().count(), "{}", c.name);
            let steps = c.steps(false);
            assert!(
                steps.iter().any(|s| s.frame.event() == Some("Hangup")),
                "{}",
                c.name
            );
            assert!(steps.windows(2).all(|w| w[0].at <= w[1].at), "{}", c.name);
            assert!(steps.iter().all(|s| s.frame.action_id().is_none()));
            // The number each replay replaces is the capture's customer.
            let text = String::from_utf8_lossy(c.raw);
            assert!(
                text.contains(&format!("CallerIDNum: {}", c.customer)) || c.customer.is_empty(),
                "{}",
                c.name
            );
        }
        assert!(ORIGINATE
            .steps(true)
            .iter()
            .any(|s| s.frame.event() == Some("OriginateResponse")));
    }

    #[test]
    fn a_replay_maps_every_id_consistently_and_freshly() {
        let ids = IdSource::default();
        let dir = Path::new("/tmp/rec");
        let mut a = Replay::new(&ids, dir).with_customer("+491701234567", "+491709999999");
        let steps = SCHEDULE[1].steps(false);
        let out: Vec<Frame> = steps.iter().map(|s| a.rewrite(&s.frame)).collect();
        let text: String = out.iter().map(Frame::to_wire).collect();
        assert!(!text.contains("179526"), "an old id is left");
        assert!(!text.contains("+491701234567"));
        assert!(text.contains("+491709999999"));
        assert!(!text.contains("/var/spool/asterisk"));
        assert!(out
            .iter()
            .filter(|f| f.get("Privilege").is_some())
            .all(|f| f.get("Timestamp").is_some()));
        // The same old channel is the same new one in every frame.
        let linked: std::collections::BTreeSet<_> =
            out.iter().filter_map(|f| f.get("Linkedid")).collect();
        assert_eq!(linked.len(), 1, "{linked:?}");
        // A second replay of the same capture shares no id with the first.
        let mut b = Replay::new(&ids, dir);
        let again: Vec<Frame> = steps.iter().map(|s| b.rewrite(&s.frame)).collect();
        let first = out.iter().find_map(|f| f.get("Uniqueid")).unwrap();
        let second = again.iter().find_map(|f| f.get("Uniqueid")).unwrap();
        assert_ne!(first, second);
        assert!(!a.take_new_recordings().is_empty());
    }

    #[test]
    fn an_originate_replay_takes_the_requested_ids_extension_and_number() {
        let ids = IdSource::default();
        let req = OriginateRequest {
            action_id: "7".into(),
            channel: "Local/102@from-internal".into(),
            context: "from-internal".into(),
            exten: "+79991234567".into(),
            channel_id: "pbxgate-c2c-1-abc".into(),
            variables: vec!["__PBXGATE_C2C=1".into()],
        };
        let mut r = Replay::new(&ids, Path::new("/tmp")).for_originate(&req);
        let out: Vec<Frame> = ORIGINATE
            .steps(true)
            .iter()
            .map(|s| r.rewrite(&s.frame))
            .collect();
        let first = &out[0];
        assert_eq!(first.get("Uniqueid"), Some("pbxgate-c2c-1-abc"));
        assert!(first
            .get("Channel")
            .unwrap()
            .starts_with("Local/102@from-internal-"));
        let text: String = out.iter().map(Frame::to_wire).collect();
        assert!(text.contains("+79991234567") && !text.contains("+4930123456"));
        assert!(text.contains("pbxgate-c2c-1-abc;2"));
        assert!(!text.contains("Local/101@"));
    }

    #[test]
    fn the_tone_is_a_wav_with_sound() {
        let w = tone_wav(1);
        assert_eq!(&w[0..4], b"RIFF");
        assert_eq!(w.len(), 44 + 16000);
        assert!(w[44..].iter().any(|b| *b != 0));
    }
}
