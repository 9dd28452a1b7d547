//! Call records from Asterisk's standard CDR CSV (`cdr-csv/Master.csv`): for a past period
//! (`pbxgate backfill`, in `cli::backfill`) and for the time the service was away
//! ([`CdrRecovery`]), shaped like the live model's records.
//!
//! The CSV has no Linkedid (only `newcdrcolumns` adds one), so the rows of one call are grouped
//! by how their channels are connected: a row links its channel to the channel it dialled, and
//! the two halves of a Local channel (`…-0000000a;1` / `;2`) are one. The call's id is its
//! oldest Uniqueid, which is the Linkedid the live model uses: a call already uploaded live is
//! recognised, not sent twice.
//! Direction and roles use the same classifier as the live model.

use std::collections::{BTreeMap, HashMap};

use crate::calls::classify::{parse_name, Role};
use crate::calls::record::{ChannelKind, Conversation, MainChannel};
use crate::calls::{CallRecord, Classifier, Direction, Outcome};
use crate::config::Config;

/// One CDR row: the columns the call model uses.
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
    /// Empty in the layouts without it.
    pub userfield: String,
}

/// The column layouts cdr_csv writes with a Uniqueid. Its columns are always accountcode, src,
/// dst, dcontext, clid, channel, dstchannel, lastapp, lastdata, start, answer, end, duration,
/// billsec, disposition, amaflags (16); then, by cdr.conf `[csv]`: uniqueid (`loguniqueid`),
/// userfield (`loguserfield`), and peeraccount, linkedid, sequence (`newcdrcolumns`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layout {
    /// 17 columns: uniqueid, no userfield.
    Uniqueid,
    /// 18 columns: uniqueid and userfield.
    UniqueidUserfield,
    /// 20 columns: uniqueid, then peeraccount, linkedid, sequence.
    UniqueidNewColumns,
    /// 21 columns: uniqueid, userfield, then peeraccount, linkedid, sequence.
    UniqueidUserfieldNewColumns,
}

impl Layout {
    fn of(columns: usize) -> Option<Layout> {
        match columns {
            17 => Some(Layout::Uniqueid),
            18 => Some(Layout::UniqueidUserfield),
            20 => Some(Layout::UniqueidNewColumns),
            21 => Some(Layout::UniqueidUserfieldNewColumns),
            _ => None,
        }
    }

    pub fn columns(self) -> usize {
        match self {
            Layout::Uniqueid => 17,
            Layout::UniqueidUserfield => 18,
            Layout::UniqueidNewColumns => 20,
            Layout::UniqueidUserfieldNewColumns => 21,
        }
    }

    fn has_userfield(self) -> bool {
        matches!(
            self,
            Layout::UniqueidUserfield | Layout::UniqueidUserfieldNewColumns
        )
    }

    /// `18 columns (with userfield)`.
    pub fn describe(self) -> String {
        let what = match self {
            Layout::Uniqueid => "without userfield",
            Layout::UniqueidUserfield => "with userfield",
            Layout::UniqueidNewColumns => "without userfield, with newcdrcolumns",
            Layout::UniqueidUserfieldNewColumns => "with userfield and newcdrcolumns",
        };
        format!("{} columns ({what})", self.columns())
    }
}

/// Why a row was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// A column count no cdr_csv layout has.
    Columns(usize),
    /// No Uniqueid: empty, not shaped like one, or a layout without the column (16 or 19
    /// columns: cdr.conf `loguniqueid=no`).
    NoUniqueid,
    /// A time that is not `YYYY-MM-DD HH:MM:SS` (the column named; start must be present).
    BadDate(&'static str),
    /// The CSV itself could not be read from here on.
    Unreadable(String),
}

impl SkipReason {
    /// The group the reason is reported under.
    pub fn kind(&self) -> &'static str {
        match self {
            SkipReason::Columns(_) => "wrong column count",
            SkipReason::NoUniqueid => "no uniqueid",
            SkipReason::BadDate(_) => "bad date",
            SkipReason::Unreadable(_) => "unreadable",
        }
    }
}

/// A row not read, by its line in the file (1-based; a quoted field may span lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub line: u64,
    pub reason: SkipReason,
}

/// What a CDR file gave: its rows, the rows skipped and why, and how many rows of each layout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CdrFile {
    pub rows: Vec<CdrRow>,
    pub skipped: Vec<Skipped>,
    pub layouts: BTreeMap<Layout, usize>,
}

/// How many line numbers a reason lists.
const LINES_SHOWN: usize = 5;

impl CdrFile {
    /// `67 row(s) read (18 columns (with userfield))`.
    pub fn read_summary(&self) -> String {
        let layouts: Vec<String> = self
            .layouts
            .iter()
            .map(|(l, n)| {
                if self.layouts.len() == 1 {
                    l.describe()
                } else {
                    format!("{n} of {}", l.describe())
                }
            })
            .collect();
        if layouts.is_empty() {
            format!("{} row(s) read", self.rows.len())
        } else {
            format!("{} row(s) read, {}", self.rows.len(), layouts.join(", "))
        }
    }

    /// One line per reason, most frequent first: how many rows, the details, the first lines.
    /// Empty when nothing was skipped.
    pub fn skipped_summary(&self) -> Vec<String> {
        let mut groups: Vec<(&'static str, Vec<&Skipped>)> = Vec::new();
        for s in &self.skipped {
            match groups.iter_mut().find(|(k, _)| *k == s.reason.kind()) {
                Some((_, v)) => v.push(s),
                None => groups.push((s.reason.kind(), vec![s])),
            }
        }
        groups.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
        groups
            .into_iter()
            .map(|(kind, v)| {
                let mut details: Vec<String> = Vec::new();
                for s in &v {
                    let d = match &s.reason {
                        SkipReason::Columns(n) => format!("{n} columns"),
                        SkipReason::NoUniqueid => continue,
                        SkipReason::BadDate(col) => (*col).to_string(),
                        SkipReason::Unreadable(e) => e.clone(),
                    };
                    if !details.contains(&d) {
                        details.push(d);
                    }
                }
                let hint = match kind {
                    "wrong column count" => "; cdr_csv writes 17, 18, 20 or 21",
                    "no uniqueid" => "cdr.conf [csv] needs loguniqueid=yes",
                    _ => "",
                };
                let mut lines: Vec<String> = v
                    .iter()
                    .take(LINES_SHOWN)
                    .map(|s| s.line.to_string())
                    .collect();
                if v.len() > LINES_SHOWN {
                    lines.push("…".into());
                }
                format!(
                    "{kind}: {} row(s) ({}{hint}), line{} {}",
                    v.len(),
                    details.join(", "),
                    if v.len() == 1 { "" } else { "s" },
                    lines.join(", ")
                )
            })
            .collect()
    }
}

/// Asterisk's Uniqueid: `[systemname-]seconds.sequence`.
fn is_uniqueid(s: &str) -> bool {
    let tail = s.rsplit('-').next().unwrap_or(s);
    tail.split_once('.').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.bytes().all(|c| c.is_ascii_digit())
    })
}

fn is_cdr_time(s: &str) -> bool {
    s.trim().parse::<jiff::civil::DateTime>().is_ok()
}

/// One record of the CSV → a row, or why not.
pub fn parse_row(fields: &[String]) -> Result<(CdrRow, Layout), SkipReason> {
    let layout = match Layout::of(fields.len()) {
        Some(l) => l,
        None if fields.len() == 16 || fields.len() == 19 => return Err(SkipReason::NoUniqueid),
        None => return Err(SkipReason::Columns(fields.len())),
    };
    let f = |i: usize| fields[i].clone();
    let uniqueid = f(16);
    // 17 or 20 columns are also what `loguserfield=yes` with `loguniqueid=no` writes.
    if !is_uniqueid(uniqueid.trim()) {
        return Err(SkipReason::NoUniqueid);
    }
    if !is_cdr_time(&fields[9]) {
        return Err(SkipReason::BadDate("start"));
    }
    for (i, name) in [(10, "answer"), (11, "end")] {
        if !fields[i].trim().is_empty() && !is_cdr_time(&fields[i]) {
            return Err(SkipReason::BadDate(name));
        }
    }
    let row = CdrRow {
        src: f(1),
        dst: f(2),
        dcontext: f(3),
        channel: f(5),
        dstchannel: f(6),
        start: f(9),
        answer: f(10),
        end: f(11),
        disposition: f(14),
        uniqueid: uniqueid.trim().to_string(),
        userfield: if layout.has_userfield() {
            f(17)
        } else {
            String::new()
        },
    };
    Ok((row, layout))
}

/// Reads cdr_csv records (no header) from `input`: each row by its own column count, so a file
/// whose cdr.conf changed midway is read whole. Text that is not UTF-8 is read lossily.
pub fn read_from(input: impl std::io::Read) -> CdrFile {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(input);
    let mut file = CdrFile::default();
    let mut record = csv::ByteRecord::new();
    loop {
        let line = reader.position().line();
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let line = record.position().map_or(line, csv::Position::line);
                let fields: Vec<String> = record
                    .iter()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .collect();
                match parse_row(&fields) {
                    Ok((row, layout)) => {
                        file.rows.push(row);
                        *file.layouts.entry(layout).or_default() += 1;
                    }
                    Err(reason) => file.skipped.push(Skipped { line, reason }),
                }
            }
            Err(e) => {
                // Nothing after an I/O error can be trusted to line up.
                file.skipped.push(Skipped {
                    line,
                    reason: SkipReason::Unreadable(e.to_string()),
                });
                break;
            }
        }
    }
    file
}

/// Reads a CDR CSV file; see [`read_from`]. An error only when the file cannot be opened.
pub fn read_rows(path: &std::path::Path) -> Result<CdrFile, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(read_from(std::io::BufReader::new(f)))
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

#[cfg(test)]
mod tests {
    use super::*;

    // Two rows of one inbound call as cdr_csv writes them with loguniqueid and loguserfield
    // (the caller id name holds a comma and quotes).
    const WITH_USERFIELD: &str = concat!(
        r#""","+491701234567","200","from-trunk","""Doe, John"" <+491701234567>","PJSIP/trunk-00000005","PJSIP/101-00000006","Dial","PJSIP/101,20","2026-11-21 12:36:45","2026-11-21 12:36:47","2026-11-21 12:37:05",20,18,"ANSWERED","DOCUMENTATION","1795264605.55","rec:/var/spool/asterisk/monitor/a.wav""#,
        "\n",
        r#""","+491701234567","200","from-trunk","""Doe, John"" <+491701234567>","PJSIP/trunk-00000005","PJSIP/102-00000007","Dial","PJSIP/102,20","2026-11-21 12:36:45",,"2026-11-21 12:36:52",7,0,"NO ANSWER","DOCUMENTATION","1795264605.55","""#,
        "\n"
    );

    /// The same rows without the last column (loguserfield=no).
    fn without_userfield() -> String {
        WITH_USERFIELD
            .lines()
            .map(|l| format!("{}\n", &l[..l.rfind(',').unwrap()]))
            .collect()
    }

    #[test]
    fn eighteen_columns_are_read_with_the_userfield() {
        let file = read_from(WITH_USERFIELD.as_bytes());
        assert_eq!(file.skipped, vec![]);
        assert_eq!(
            file.layouts,
            BTreeMap::from([(Layout::UniqueidUserfield, 2)])
        );
        let r = &file.rows[0];
        assert_eq!(
            (
                r.src.as_str(),
                r.channel.as_str(),
                r.dstchannel.as_str(),
                r.start.as_str(),
                r.disposition.as_str(),
                r.uniqueid.as_str(),
                r.userfield.as_str()
            ),
            (
                "+491701234567",
                "PJSIP/trunk-00000005",
                "PJSIP/101-00000006",
                "2026-11-21 12:36:45",
                "ANSWERED",
                "1795264605.55",
                "rec:/var/spool/asterisk/monitor/a.wav"
            )
        );
        assert_eq!(file.rows[1].answer, "");
        assert_eq!(file.rows[1].disposition, "NO ANSWER");
        assert_eq!(
            file.read_summary(),
            "2 row(s) read, 18 columns (with userfield)"
        );
    }

    #[test]
    fn seventeen_columns_are_read_without_the_userfield() {
        let file = read_from(without_userfield().as_bytes());
        assert_eq!(file.skipped, vec![]);
        assert_eq!(file.layouts, BTreeMap::from([(Layout::Uniqueid, 2)]));
        let with = read_from(WITH_USERFIELD.as_bytes());
        for (a, b) in file.rows.iter().zip(&with.rows) {
            assert_eq!(a.userfield, "");
            assert_eq!(
                CdrRow {
                    userfield: b.userfield.clone(),
                    ..a.clone()
                },
                *b
            );
        }
    }

    #[test]
    fn newcdrcolumns_rows_are_read_past_their_extra_columns() {
        let extra: String = WITH_USERFIELD
            .lines()
            .map(|l| format!("{l},\"\",\"1795264605.55\",3\n"))
            .collect();
        let file = read_from(extra.as_bytes());
        assert_eq!(file.skipped, vec![]);
        assert_eq!(
            file.layouts,
            BTreeMap::from([(Layout::UniqueidUserfieldNewColumns, 2)])
        );
        assert_eq!(
            file.rows[0].userfield,
            "rec:/var/spool/asterisk/monitor/a.wav"
        );
        let extra: String = without_userfield()
            .lines()
            .map(|l| format!("{l},\"\",\"1795264605.55\",3\n"))
            .collect();
        let file = read_from(extra.as_bytes());
        assert_eq!(
            file.layouts,
            BTreeMap::from([(Layout::UniqueidNewColumns, 2)])
        );
        assert_eq!(file.rows[0].uniqueid, "1795264605.55");
    }

    #[test]
    fn malformed_rows_are_skipped_with_their_line_and_reason() {
        let good = WITH_USERFIELD.lines().next().unwrap();
        let bad_date = good.replace("\"2026-11-21 12:36:45\"", "\"yesterday\"");
        let bad_end = good.replace("\"2026-11-21 12:37:05\"", "\"12:37\"");
        // loguniqueid=no, loguserfield=yes: 17 columns, the last one is no Uniqueid.
        let no_uniqueid = good.replace(",\"1795264605.55\"", "");
        let input =
            format!("a,b,c\n{good}\n{bad_date}\n\"unclosed, quote\",x\n{no_uniqueid}\n{bad_end}\n");
        let file = read_from(input.as_bytes());
        assert_eq!(file.rows.len(), 1);
        let skipped: Vec<(u64, SkipReason)> = file
            .skipped
            .iter()
            .map(|s| (s.line, s.reason.clone()))
            .collect();
        assert_eq!(
            skipped,
            vec![
                (1, SkipReason::Columns(3)),
                (3, SkipReason::BadDate("start")),
                (4, SkipReason::Columns(2)),
                (5, SkipReason::NoUniqueid),
                (6, SkipReason::BadDate("end")),
            ]
        );
        assert_eq!(
            file.skipped_summary(),
            vec![
                "wrong column count: 2 row(s) (3 columns, 2 columns; cdr_csv writes 17, 18, 20 or 21), lines 1, 4",
                "bad date: 2 row(s) (start, end), lines 3, 6",
                "no uniqueid: 1 row(s) (cdr.conf [csv] needs loguniqueid=yes), line 5",
            ]
        );
    }

    #[test]
    fn many_skipped_rows_list_the_first_lines_only() {
        let input = "x\n".repeat(8);
        let file = read_from(input.as_bytes());
        assert_eq!(
            file.skipped_summary(),
            vec!["wrong column count: 8 row(s) (1 columns; cdr_csv writes 17, 18, 20 or 21), lines 1, 2, 3, 4, 5, …"]
        );
    }

    #[test]
    fn a_system_name_prefix_is_part_of_the_uniqueid() {
        assert!(is_uniqueid("pbx-east-1795264605.55"));
        assert!(is_uniqueid("1795264605.55"));
        assert!(!is_uniqueid(""));
        assert!(!is_uniqueid("rec:/x.wav"));
        assert!(!is_uniqueid("1795264605"));
    }
}
