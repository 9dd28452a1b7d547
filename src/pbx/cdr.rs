//! Call records from Asterisk's standard CDR CSV (`cdr-csv/Master.csv`): for a past period
//! (`pbxgate backfill`, in `cli::backfill`) and for the time the service was away
//! ([`CdrRecovery`]), shaped like the live model's records.
//!
//! The CSV has no Linkedid, so the rows of one call are grouped by how their channels are
//! connected: a row links its channel to the channel it dialled, and the two halves of a Local
//! channel (`…-0000000a;1` / `;2`) are one. The call's id is its oldest Uniqueid, which is the
//! Linkedid the live model uses: a call already uploaded live is recognised, not sent twice.
//! Direction and roles use the same classifier as the live model.

use std::collections::{BTreeMap, HashMap};

use crate::calls::classify::{parse_name, Role};
use crate::calls::record::{ChannelKind, Conversation, MainChannel};
use crate::calls::{CallRecord, Classifier, Direction, Outcome};
use crate::config::Config;

/// One CDR row (cdr_csv column order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CdrRow {
    pub src: String,
    pub dst: String,
    pub dcontext: String,
    pub channel: String,
    pub dstchannel: String,
    pub start: String,
    pub answer: String,
    pub end: String,
    pub disposition: String,
    pub uniqueid: String,
    pub userfield: String,
}

/// Parses the CSV; rows that do not have the 18 cdr_csv columns are reported and skipped.
pub fn read_rows(path: &std::path::Path) -> Result<(Vec<CdrRow>, Vec<String>), String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_path(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    for (i, rec) in reader.records().enumerate() {
        match rec {
            Ok(r) if r.len() >= 18 => rows.push(CdrRow {
                src: r[1].to_string(),
                dst: r[2].to_string(),
                dcontext: r[3].to_string(),
                channel: r[5].to_string(),
                dstchannel: r[6].to_string(),
                start: r[9].to_string(),
                answer: r[10].to_string(),
                end: r[11].to_string(),
                disposition: r[14].to_string(),
                uniqueid: r[16].to_string(),
                userfield: r[17].to_string(),
            }),
            Ok(r) => problems.push(format!("line {}: {} columns, expected 18", i + 1, r.len())),
            Err(e) => problems.push(format!("line {}: {e}", i + 1)),
        }
    }
    Ok((rows, problems))
}

/// The channel a Local half belongs with: both halves map to the same key.
fn node(name: &str) -> String {
    if name.starts_with("Local/") {
        name.rsplit_once(';').map_or(name, |(b, _)| b).to_string()
    } else {
        name.to_string()
    }
}

fn find(parent: &mut HashMap<String, String>, x: &str) -> String {
    let mut cur = x.to_string();
    while let Some(p) = parent.get(&cur).filter(|p| **p != cur).cloned() {
        cur = p;
    }
    // Path compression.
    let mut y = x.to_string();
    while let Some(p) = parent.get(&y).filter(|p| **p != y).cloned() {
        parent.insert(y, cur.clone());
        y = p;
    }
    cur
}

/// Groups rows into calls (connected channels).
pub fn group(rows: &[CdrRow]) -> Vec<Vec<CdrRow>> {
    let mut parent: HashMap<String, String> = HashMap::new();
    for r in rows {
        let a = node(&r.channel);
        parent.entry(a.clone()).or_insert_with(|| a.clone());
        if !r.dstchannel.is_empty() {
            let b = node(&r.dstchannel);
            parent.entry(b.clone()).or_insert_with(|| b.clone());
            let (ra, rb) = (find(&mut parent, &a), find(&mut parent, &b));
            if ra != rb {
                parent.insert(ra, rb);
            }
        }
    }
    let mut groups: BTreeMap<String, Vec<CdrRow>> = BTreeMap::new();
    for r in rows {
        let root = find(&mut parent, &node(&r.channel));
        groups.entry(root).or_default().push(r.clone());
    }
    groups.into_values().collect()
}

fn uniqueid_key(u: &str) -> (u64, u64) {
    let (a, b) = u
        .rsplit('-')
        .next()
        .unwrap_or(u)
        .split_once('.')
        .unwrap_or((u, "0"));
    (a.parse().unwrap_or(u64::MAX), b.parse().unwrap_or(u64::MAX))
}

/// Builds the record of one call from its rows; `to_ms` turns a CDR time into milliseconds.
pub fn record(
    rows: &[CdrRow],
    classifier: &Classifier,
    system_id: &str,
    to_ms: &dyn Fn(&str) -> Option<i64>,
) -> Option<CallRecord> {
    let first = rows.iter().min_by_key(|r| uniqueid_key(&r.uniqueid))?;
    let start = rows.iter().filter_map(|r| to_ms(&r.start)).min()?;
    let end = rows
        .iter()
        .filter_map(|r| to_ms(&r.end))
        .max()
        .unwrap_or(start);
    let role = |name: &str| classifier.role(name);
    let is_ext = |name: &str| matches!(role(name), Role::Extension(_));
    let ext_of = |name: &str| match role(name) {
        Role::Extension(code) => Some(code),
        _ => None,
    };
    // Inbound: a row that runs in an inbound context on a channel that is not a phone.
    // A trunk channel that dials is a call from the carrier (after a transfer the CDR rewrites
    // its context, so the context alone is not enough).
    let inbound = rows.iter().find(|r| {
        role(&r.channel) == Role::Trunk
            || (classifier.is_inbound_context(&r.dcontext)
                && !is_ext(&r.channel)
                && parse_name(&r.channel).half != Some(1))
    });
    // Outbound: a row that dialled an external leg.
    let outbound = rows.iter().find(|r| {
        !r.dstchannel.is_empty() && matches!(role(&r.dstchannel), Role::Trunk | Role::External(_))
    });
    let direction = if inbound.is_some() {
        Direction::In
    } else if outbound.is_some() {
        Direction::Out
    } else {
        Direction::Internal
    };
    // Who answered: a row connecting the customer side with a phone, answered.
    let answered_rows: Vec<&CdrRow> = rows
        .iter()
        .filter(|r| r.disposition == "ANSWERED" && !r.answer.is_empty())
        .filter(|r| match direction {
            Direction::In => is_ext(&r.dstchannel),
            Direction::Out => matches!(role(&r.dstchannel), Role::Trunk | Role::External(_)),
            Direction::Internal => is_ext(&r.dstchannel),
        })
        .collect();
    let answer = answered_rows.iter().filter_map(|r| to_ms(&r.answer)).min();
    let (from_number, to_number) = match direction {
        Direction::In => inbound.map(|r| (r.src.clone(), r.dst.clone())),
        Direction::Out => outbound.map(|r| {
            let placed = ext_of(&r.channel).unwrap_or_else(|| r.src.clone());
            let number = match role(&r.dstchannel) {
                Role::External(n) => n,
                _ => r.dst.clone(),
            };
            (placed, number)
        }),
        Direction::Internal => Some((first.src.clone(), first.dst.clone())),
    }
    .unwrap_or_default();
    let (customer_number, did, code) = match direction {
        Direction::In => {
            let r = inbound?;
            let by = answered_rows
                .iter()
                .max_by_key(|r| to_ms(&r.answer))
                .and_then(|r| ext_of(&r.dstchannel));
            (r.src.clone(), Some(r.dst.clone()), by)
        }
        Direction::Out => {
            let r = outbound?;
            let number = match role(&r.dstchannel) {
                Role::External(n) => n,
                _ => r.dst.clone(),
            };
            let placed = ext_of(&r.channel)
                .or_else(|| Some(r.src.clone()).filter(|s| classifier.is_extension(s)));
            (number, None, placed)
        }
        Direction::Internal => (
            first.src.clone(),
            None,
            answered_rows.first().and_then(|r| ext_of(&r.dstchannel)),
        ),
    };
    let outcome = if answer.is_some() {
        Outcome::Answered
    } else {
        let worst = rows
            .iter()
            .map(|r| r.disposition.as_str())
            .collect::<Vec<_>>();
        if worst.contains(&"BUSY") {
            Outcome::Busy
        } else if worst.iter().any(|d| *d == "FAILED" || *d == "CONGESTION") {
            Outcome::Failed
        } else {
            Outcome::NoAnswer
        }
    };
    let mut recordings: Vec<String> = rows
        .iter()
        .filter_map(|r| r.userfield.strip_prefix("rec:").map(str::to_string))
        .collect();
    recordings.sort();
    recordings.dedup();
    // Every phone a row dialled rang (in CSV order; one ring per extension).
    let mut rings: Vec<crate::calls::record::Ring> = Vec::new();
    for r in rows {
        let Some(ext) = ext_of(&r.dstchannel) else {
            continue;
        };
        if rings.iter().any(|x| x.extension == ext) {
            continue;
        }
        let Some(ring_start) = to_ms(&r.start) else {
            continue;
        };
        let status = match r.disposition.as_str() {
            "ANSWERED" => "ANSWER",
            "BUSY" => "BUSY",
            "FAILED" | "CONGESTION" => "CHANUNAVAIL",
            _ => "NOANSWER",
        };
        rings.push(crate::calls::record::Ring {
            extension: ext,
            start: ring_start,
            end: to_ms(&r.answer).or_else(|| to_ms(&r.end)),
            status: Some(status.to_string()),
        });
    }
    let placed_by = (direction == Direction::Out)
        .then(|| code.clone())
        .flatten();
    let linkedid = first.uniqueid.clone();
    // The main channel: the first one; its rows span its life (a transfer adds a row).
    let own: Vec<&CdrRow> = rows.iter().filter(|r| r.channel == first.channel).collect();
    let main_channel = MainChannel {
        id: linkedid.clone(),
        name: first.channel.clone(),
        kind: ChannelKind::from(direction),
        start: own
            .iter()
            .filter_map(|r| to_ms(&r.start))
            .min()
            .unwrap_or(start),
        answer: own.iter().filter_map(|r| to_ms(&r.answer)).min(),
        end: own.iter().filter_map(|r| to_ms(&r.end)).max(),
    };
    let conversations = conversations(rows, direction, inbound.or(outbound), classifier, to_ms);
    Some(CallRecord {
        external_id: format!("{system_id}-{linkedid}"),
        linkedid,
        direction,
        customer_number,
        did: did.clone(),
        code: code.clone(),
        user_id: None,
        external_phone: did,
        start,
        answer,
        end,
        wait_seconds: u64::try_from((answer.unwrap_or(end) - start) / 1000).unwrap_or(0),
        talk_seconds: answer.map_or(0, |a| u64::try_from((end - a) / 1000).unwrap_or(0)),
        connected_seconds: answer.map_or(0, |a| u64::try_from((end - a) / 1000).unwrap_or(0)),
        outcome,
        answered_by: if answer.is_some() { code.clone() } else { None },
        final_extension: if answer.is_some() { code } else { None },
        placed_by,
        click_to_call: false,
        rings,
        talk: Vec::new(),
        recordings,
        customer_dial_status: None,
        reaped: false,
        trunk: None,
        phone_original: None,
        registration: None,
        ignored: false,
        main_channel: Some(main_channel),
        conversations,
        from_number: Some(from_number).filter(|n| !n.is_empty()),
        to_number: Some(to_number).filter(|n| !n.is_empty()),
    })
}

/// The conversations of one call's rows. Outbound: the placing extension's leg (its own row
/// names its channel). Otherwise one per extension dialled (like the rings), over all the rows
/// that dialled it (a queue dials a Local half, which dials the phone); the CSV has no Uniqueid
/// for a dialled channel, so only its name is known.
fn conversations(
    rows: &[CdrRow],
    direction: Direction,
    customer_row: Option<&CdrRow>,
    classifier: &Classifier,
    to_ms: &dyn Fn(&str) -> Option<i64>,
) -> Vec<Conversation> {
    let ext_of = |name: &str| match classifier.role(name) {
        Role::Extension(code) => Some(code),
        _ => None,
    };
    if direction == Direction::Out {
        return customer_row
            .and_then(|r| {
                Some(Conversation {
                    channel: r.uniqueid.clone(),
                    channel_name: r.channel.clone(),
                    customer_channel: String::new(),
                    extension: Some(ext_of(&r.channel)?),
                    start: to_ms(&r.start)?,
                    answer: to_ms(&r.answer),
                    end: to_ms(&r.end),
                    parked: false,
                })
            })
            .into_iter()
            .collect();
    }
    let customer = match (direction, customer_row) {
        (Direction::In, Some(r)) => r.uniqueid.clone(),
        _ => String::new(),
    };
    let mut out: Vec<Conversation> = Vec::new();
    for r in rows {
        let (Some(ext), Some(start)) = (ext_of(&r.dstchannel), to_ms(&r.start)) else {
            continue;
        };
        let answer = to_ms(&r.answer).filter(|_| r.disposition == "ANSWERED");
        let end = to_ms(&r.end);
        let c = match out
            .iter_mut()
            .find(|c| c.extension.as_deref() == Some(&ext))
        {
            Some(c) => c,
            None => {
                out.push(Conversation {
                    channel: String::new(),
                    channel_name: r.dstchannel.clone(),
                    customer_channel: String::new(),
                    extension: Some(ext),
                    start,
                    answer: None,
                    end,
                    parked: false,
                });
                out.last_mut().expect("just pushed")
            }
        };
        // The phone rather than a Local half standing for it.
        if c.channel_name.starts_with("Local/") && !r.dstchannel.starts_with("Local/") {
            c.channel_name = r.dstchannel.clone();
        }
        c.start = c.start.min(start);
        c.end = c.end.max(end);
        if let Some(a) = answer {
            c.answer = Some(c.answer.map_or(a, |x| x.min(a)));
            c.customer_channel.clone_from(&customer);
        }
    }
    out.sort_by_key(|c| c.start);
    out
}

/// CDR time (`2026-11-21 12:34:21`, in `tz`) → Unix milliseconds.
pub fn cdr_time(s: &str, tz: &jiff::tz::TimeZone) -> Option<i64> {
    let dt: jiff::civil::DateTime = s.trim().parse().ok()?;
    Some(dt.to_zoned(tz.clone()).ok()?.timestamp().as_millisecond())
}

/// Every call of the CDR rows, as the live model would have recorded it (numbers as the PBX
/// gave them; internal calls only if configured).
pub fn calls_of(config: &Config, rows: &[CdrRow], tz: &jiff::tz::TimeZone) -> Vec<CallRecord> {
    let classifier = Classifier::new(config);
    let to_ms = |s: &str| cdr_time(s, tz);
    group(rows)
        .iter()
        .filter_map(|g| record(g, &classifier, &config.pbx.system_id, &to_ms))
        .filter(|r| r.direction != Direction::Internal || config.calls.send_internal)
        .collect()
}
