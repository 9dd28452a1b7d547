//! Trying a hook on one call (`pbxgate hooks test`): each point's input, built by the same code
//! as when the service calls the point, and the calls of an AMI capture replayed through the call
//! model and the gate, as the tracker would have finished them.
//!
//! A point is tried once it has an entry in [`POINTS`]: its name and a function building its
//! input from a finished call.

use std::path::Path;

use serde_json::{Map, Value};

use crate::calls::full::call_full;
use crate::calls::model::{Millis, Output};
use crate::calls::{CallModel, CallRecord, Classifier};
use crate::config::Config;
use crate::crm::tasks;
use crate::hooks::FieldKind;
use crate::hooks::{phone_points, Stage};
use crate::pbx::ami::frame::{Item, Limits, Parser};
use crate::phone::PhoneBook;
use crate::pipeline::gate::Gate;
use crate::pipeline::{points, registration_points};
use crate::records::{self, hook as record_hook};

/// What a point's input is built from besides the call.
pub struct Context<'a> {
    pub config: &'a Config,
    pub phones: &'a PhoneBook,
    /// The call's recording link, when it has one already.
    pub record_url: Option<String>,
}

/// A point's input for one call.
pub struct PointInput {
    pub input: Value,
    /// The fields the hook may return.
    pub fields: &'static [(&'static str, FieldKind)],
    /// Where this input differs from what the service would send.
    pub notes: Vec<String>,
    /// What the point makes of the fields the hook returned, beyond their types: one line each
    /// (nothing when the fields are used as they are).
    pub settle: fn(&Value, &Map<String, Value>, &Context) -> Vec<String>,
}

type Build = fn(&CallRecord, &Context) -> Result<PointInput, String>;

/// The points that can be tried.
const POINTS: &[(&str, Build)] = &[
    (registration_points::NEED_REGISTRATION, need_registration),
    (phone_points::PROCESS_CLIENT_PHONE, client_phone),
    (phone_points::PROCESS_USER_PHONE, user_phone),
    (points::PROCESS_CALL_PARAMS, call_params),
    (record_hook::PROCESS_RECORD_FILE_PATH, record_file_path),
    (tasks::PROCESS_TASK_CREATION_PARAMS, task_creation_params),
    (registration_points::POST_REGISTRATION, post_registration),
];

/// Why there is no input to try.
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    #[error("the point {0:?} cannot be tried; the points that can: {list}", list = supported().join(", "))]
    Unsupported(String),
    #[error("{0}")]
    NoInput(String),
}

/// The points that can be tried, in order.
pub fn supported() -> Vec<&'static str> {
    POINTS.iter().map(|(name, _)| *name).collect()
}

/// The input `point` receives for `record`.
pub fn input_for(
    point: &str,
    record: &CallRecord,
    context: &Context,
) -> Result<PointInput, TrialError> {
    let (_, build) = POINTS
        .iter()
        .find(|(name, _)| *name == point)
        .ok_or_else(|| TrialError::Unsupported(point.to_string()))?;
    build(record, context).map_err(TrialError::NoInput)
}

fn settle_nothing(_: &Value, _: &Map<String, Value>, _: &Context) -> Vec<String> {
    Vec::new()
}

fn full(r: &CallRecord, c: &Context) -> Value {
    call_full(r, c.phones, &jiff::tz::TimeZone::system())
}

fn need_registration(r: &CallRecord, c: &Context) -> Result<PointInput, String> {
    Ok(PointInput {
        input: registration_points::input(full(r, c), Stage::CallEnded),
        fields: registration_points::RESULT,
        notes: vec![
            "the service asks at the call's first stage: conversation_requested when it had a \
             live event"
                .into(),
        ],
        settle: settle_nothing,
    })
}

fn post_registration(r: &CallRecord, c: &Context) -> Result<PointInput, String> {
    Ok(PointInput {
        input: registration_points::input(full(r, c), Stage::CallEnded),
        fields: &[],
        notes: vec!["a notification: the service uses nothing of the answer".into()],
        settle: settle_nothing,
    })
}

fn client_phone(r: &CallRecord, c: &Context) -> Result<PointInput, String> {
    Ok(PointInput {
        input: phone_points::input(&r.customer_number, &full(r, c), Stage::CallEnded),
        fields: phone_points::PHONE,
        notes: Vec::new(),
        settle: settle_nothing,
    })
}

fn user_phone(r: &CallRecord, c: &Context) -> Result<PointInput, String> {
    let code = r
        .code
        .as_deref()
        .ok_or("the call has no manager's extension: the point is not called for it")?;
    Ok(PointInput {
        input: phone_points::input(code, &full(r, c), Stage::CallEnded),
        fields: phone_points::PHONE,
        notes: Vec::new(),
        settle: settle_nothing,
    })
}

fn task_creation_params(r: &CallRecord, c: &Context) -> Result<PointInput, String> {
    let mut notes = Vec::new();
    if !tasks::is_missed(r) {
        notes.push("the call is not a missed inbound call: the service creates no task".into());
    }
    if !c.config.crm.missed_call_tasks {
        notes.push("crm.missed_call_tasks is off: the service creates no task".into());
    }
    let draft = tasks::draft(&c.config.crm, r, &r.customer_number, r.user_id);
    Ok(PointInput {
        input: tasks::task_input(&draft, &full(r, c)),
        fields: tasks::TASK_PARAMS,
        notes,
        settle: settle_nothing,
    })
}

fn call_params(r: &CallRecord, c: &Context) -> Result<PointInput, String> {
    Ok(PointInput {
        input: points::call_params_input(c.phones, r, c.record_url.as_deref()),
        fields: points::CALL_PARAMS,
        notes: Vec::new(),
        settle: settle_nothing,
    })
}

fn record_file_path(r: &CallRecord, c: &Context) -> Result<PointInput, String> {
    let configured = &c.config.records.dir;
    let dir = std::fs::canonicalize(configured)
        .ok()
        .filter(|d| d.is_dir());
    let mut notes = Vec::new();
    let found = match dir.as_deref().and_then(|d| records::recording_in(d, r)) {
        Some(found) => found,
        None => {
            // Not a file here: the path as the call names it, so that a hook can still be tried
            // on a call from another host.
            let named = r
                .recordings
                .iter()
                .find(|p| !(p.starts_with("https://") || p.starts_with("http://")))
                .ok_or("the call has no recording file: the point is not called for it")?;
            notes.push(format!(
                "{named} is not a recording with sound inside records.dir ({}): the service \
                 would not call the point for this call",
                configured.display()
            ));
            configured.join(named)
        }
    };
    let full = call_full(r, c.phones, &jiff::tz::TimeZone::system());
    Ok(PointInput {
        input: record_hook::input(&found, full, &r.external_id),
        fields: record_hook::FIELDS,
        notes,
        settle: settle_record_file_path,
    })
}

fn settle_record_file_path(input: &Value, data: &Map<String, Value>, c: &Context) -> Vec<String> {
    if !data.contains_key("path") {
        return Vec::new();
    }
    let found = Path::new(input["path"].as_str().unwrap_or_default());
    let Some(dir) = std::fs::canonicalize(&c.config.records.dir).ok() else {
        return vec![format!(
            "path: not used: records.dir ({}) does not exist",
            c.config.records.dir.display()
        )];
    };
    match record_hook::decide(&dir, found, data) {
        (path, None) => vec![format!("path: the link serves {}", path.display())],
        (_, Some((_, why))) => vec![format!(
            "path: not used ({why}); the link serves {}",
            found.display()
        )],
    }
}

/// The finished calls of an AMI capture, in the order they finished: either what Asterisk sent
/// (the raw stream, replayed as if it arrived now) or an annotated capture, whose `### <<<
/// +0.002s` blocks are what Asterisk sent and when (after the `epoch` of its `### ---` lines).
pub fn replay(config: &Config, capture: &[u8]) -> Vec<CallRecord> {
    let text = String::from_utf8_lossy(capture);
    let mut model = CallModel::new(Classifier::new(config), &config.pbx.system_id);
    let mut gate = Gate::new(config);
    let mut parser = Parser::new(Limits::default());
    let mut out = Vec::new();
    let mut finished = Vec::new();
    let mut last = crate::base::clock::now_ms();
    let mut feed = |bytes: &[u8], at: Millis, out: &mut Vec<Output>| {
        parser.push(bytes);
        while let Some(item) = parser.next_item() {
            if let Item::Frame(frame) = item {
                model.on_event(&frame, at, out);
                gate.apply(out);
                collect(out, &mut finished);
            }
        }
    };
    if text.starts_with("### ") || text.contains("\n### ") {
        for (at, frame) in annotated_frames(&text) {
            last = at;
            feed(frame.as_bytes(), at, &mut out);
        }
    } else {
        let body: String = text
            .split_inclusive('\n')
            .filter(|l| !l.starts_with("Asterisk Call Manager/"))
            .collect();
        feed(body.as_bytes(), last, &mut out);
        // A stream cut short of its last blank line still ends its last frame.
        feed(b"\r\n\r\n", last, &mut out);
    }
    // Calls still in their grace period finish as at the end of a replay.
    model.tick(last.saturating_add(crate::calls::model::GRACE), &mut out);
    model.flush(&mut out);
    gate.apply(&mut out);
    collect(&mut out, &mut finished);
    finished
}

fn collect(out: &mut Vec<Output>, finished: &mut Vec<CallRecord>) {
    for o in out.drain(..) {
        if let Output::Finished(r) = o {
            finished.push(*r);
        }
    }
}

/// The frames Asterisk sent in an annotated capture, each with its time (unix ms), as CRLF text.
fn annotated_frames(text: &str) -> Vec<(Millis, String)> {
    let mut frames = Vec::new();
    let mut epoch_ms: Millis = 0;
    let mut current: Option<(Millis, Vec<&str>)> = None;
    let mut finish = |current: &mut Option<(Millis, Vec<&str>)>| {
        if let Some((at, lines)) = current.take() {
            let lines: Vec<&str> = lines
                .into_iter()
                .filter(|l| !l.starts_with("Asterisk Call Manager/"))
                .collect();
            let body = lines.join("\r\n");
            let body = body.trim_end();
            if !body.is_empty() {
                frames.push((at, format!("{body}\r\n\r\n")));
            }
        }
    };
    for line in text.lines() {
        let Some(header) = line.strip_prefix("### ") else {
            if let Some((_, lines)) = current.as_mut() {
                lines.push(line);
            }
            continue;
        };
        finish(&mut current);
        if let Some(epoch) = header.split("epoch ").nth(1) {
            let seconds = epoch.trim_end_matches(')').trim();
            if let Ok(s) = seconds.parse::<f64>() {
                epoch_ms = (s * 1000.0).round() as Millis;
            }
        }
        if let Some(rest) = header.strip_prefix("<<< ") {
            current = Some((epoch_ms.saturating_add(offset_ms(rest)), Vec::new()));
        }
    }
    finish(&mut current);
    frames
}

/// `+0.002s ...` → 2.
fn offset_ms(header: &str) -> Millis {
    header
        .split_whitespace()
        .next()
        .and_then(|t| t.strip_prefix('+'))
        .and_then(|t| t.strip_suffix('s'))
        .and_then(|t| t.parse::<f64>().ok())
        .map_or(0, |s| (s * 1000.0).round() as Millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../shared/ami-captures/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(path).unwrap()
    }

    fn lab() -> Config {
        let mut config = Config::default();
        config.calls.inbound_contexts = vec!["from-trunk".into()];
        config.pbx.system_id = "lab".into();
        config
    }

    #[test]
    fn an_annotated_capture_and_its_raw_stream_give_the_same_call() {
        let config = lab();
        let from_txt = replay(&config, &capture("03_inbound_from_trunk.txt"));
        let from_raw = replay(&config, &capture("03_inbound_from_trunk.raw"));
        assert_eq!(from_txt.len(), 1, "{from_txt:?}");
        assert_eq!(from_raw.len(), 1, "{from_raw:?}");
        let (t, r) = (&from_txt[0], &from_raw[0]);
        assert_eq!(t.external_id, r.external_id);
        assert!(t.external_id.starts_with("lab-"), "{}", t.external_id);
        assert_eq!(t.outcome, r.outcome);
        assert_eq!(t.recordings, r.recordings);
        // The annotated one keeps the capture's times: 101 answers after about 2 s.
        assert!(t.wait_seconds >= 1, "{t:?}");
        assert!(
            t.start >= 1_795_264_488_000 && t.start < 1_795_264_490_000,
            "{}",
            t.start
        );
    }

    #[test]
    fn an_unknown_point_names_the_ones_that_can_be_tried() {
        let config = lab();
        let phones = PhoneBook::new(&config.phone);
        let context = Context {
            config: &config,
            phones: &phones,
            record_url: None,
        };
        let record = CallRecord::sample("x");
        let err = input_for("process_originate_params", &record, &context)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("process_call_params"), "{err}");
        assert!(err.contains("process_record_file_path"), "{err}");
        let input = input_for("process_call_params", &record, &context).unwrap();
        assert_eq!(input.input["call_stage"], "call_ended");
        assert_eq!(input.fields.len(), points::CALL_PARAMS.len());
    }

    #[test]
    fn offsets_are_read_from_block_headers() {
        assert_eq!(offset_ms("+0.002s Event: Newchannel"), 2);
        assert_eq!(offset_ms("+20.513s banner"), 20_513);
        assert_eq!(offset_ms("banner"), 0);
    }
}
