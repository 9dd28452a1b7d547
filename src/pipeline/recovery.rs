//! Calls that ended while pbxgate was away, from Asterisk's CDR file: at startup (the tracker's
//! first resync asks [`CdrRecovery`]) and on demand (`pbxgate backfill`, through [`build`]).
//! The file is read by [`crate::pbx::cdr`]; the registration rules and the crediting of missed
//! calls apply as for live calls (the [`Gate`]).

use crate::calls::{CallRecord, Output};
use crate::config::Config;
use crate::pbx::cdr::{self, CdrRow};
use crate::pipeline::gate::Gate;
use crate::pipeline::tracker::Recovery;

/// `[backfill] cdr_csv` read at startup: the calls that ended while the service was away.
pub struct CdrRecovery {
    config: std::sync::Arc<Config>,
}

impl CdrRecovery {
    /// `None` without `backfill.cdr_csv`.
    pub fn new(config: std::sync::Arc<Config>) -> Option<CdrRecovery> {
        (!config.backfill.cdr_csv.as_os_str().is_empty()).then_some(CdrRecovery { config })
    }
}

impl Recovery for CdrRecovery {
    fn calls(&self, since: i64, ended: &std::collections::HashSet<String>) -> Vec<CallRecord> {
        let b = &self.config.backfill;
        let tz = jiff::tz::TimeZone::get(&b.timezone).unwrap_or(jiff::tz::TimeZone::UTC);
        let file = match cdr::read_rows(&b.cdr_csv) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read backfill.cdr_csv: calls that ended while pbxgate was away are not recovered");
                return Vec::new();
            }
        };
        if !file.skipped.is_empty() {
            tracing::warn!(
                read = file.rows.len(),
                skipped = file.skipped.len(),
                reasons = %file.skipped_summary().join("; "),
                "backfill.cdr_csv: rows skipped"
            );
        }
        let rows = file.rows;
        // CDR times have whole seconds: a little before `since`, deduplicated by the outbox.
        let from = since - 5_000;
        cdr::calls_of(&self.config, &rows, &tz)
            .into_iter()
            .filter(|r| r.start >= from || ended.contains(&r.external_id))
            .collect()
    }
}

/// The calls of a CDR file within [from, to], not internal unless configured, with canonical
/// numbers and without the calls the registration rules ignore (as the live tracker does).
pub fn build(
    config: &Config,
    rows: &[CdrRow],
    from: jiff::civil::Date,
    to: jiff::civil::Date,
    tz: &jiff::tz::TimeZone,
) -> Vec<CallRecord> {
    let mut calls: Vec<CallRecord> = cdr::calls_of(config, rows, tz)
        .into_iter()
        .filter(|r| {
            jiff::Timestamp::from_millisecond(r.start)
                .map(|t| {
                    let d = t.to_zoned(tz.clone()).date();
                    d >= from && d <= to
                })
                .unwrap_or(false)
        })
        .collect();
    calls.sort_by_key(|r| r.start);
    let mut gate = Gate::new(config);
    let mut out: Vec<Output> = calls
        .into_iter()
        .map(|r| Output::Finished(Box::new(r)))
        .collect();
    gate.apply(&mut out);
    out.into_iter()
        .filter_map(|o| match o {
            Output::Finished(r) if !r.ignored => Some(*r),
            _ => None,
        })
        .collect()
}
