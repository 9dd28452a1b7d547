//! `pbxgate backfill`: queues the calls of a past period, read from Asterisk's CDR CSV, for
//! upload like live calls (a call already uploaded live is recognised, not sent twice). This is
//! the command's arguments and its run; reading the CSV into call records is `pbx::cdr`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::Config;
use crate::outbox;
use crate::pbx::cdr;

#[derive(Debug, Args)]
pub struct BackfillArgs {
    /// First day (YYYY-MM-DD), by the call's start.
    #[arg(long)]
    pub from: String,
    /// Last day (YYYY-MM-DD), inclusive.
    #[arg(long)]
    pub to: String,
    /// The CDR CSV file (no header; columns as cdr_csv writes them).
    #[arg(long)]
    pub cdr: PathBuf,
    /// Time zone of the CDR times (cdr.conf `usegmtime=no` writes the PBX's local time).
    #[arg(long, default_value = "UTC")]
    pub cdr_timezone: String,
    /// Print what would be queued, queue nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Reads the CDR, then prints (`--dry-run`) or queues the calls of the period.
pub async fn run(config: &Config, args: &BackfillArgs) -> ExitCode {
    let parse_date = |s: &str, what: &str| {
        s.parse::<jiff::civil::Date>()
            .map_err(|_| format!("--{what}: {s:?} is not a date like 2026-11-01"))
    };
    let (from, to) = match (parse_date(&args.from, "from"), parse_date(&args.to, "to")) {
        (Ok(f), Ok(t)) if f <= t => (f, t),
        (Ok(_), Ok(_)) => {
            eprintln!("pbxgate: --from must not be after --to");
            return ExitCode::from(2);
        }
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("pbxgate: {e}");
            return ExitCode::from(2);
        }
    };
    let tz = match jiff::tz::TimeZone::get(&args.cdr_timezone) {
        Ok(tz) => tz,
        Err(_) => {
            eprintln!(
                "pbxgate: --cdr-timezone: {:?} is not a known time zone",
                args.cdr_timezone
            );
            return ExitCode::from(2);
        }
    };
    let file = match cdr::read_rows(&args.cdr) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("pbxgate: {e}");
            return ExitCode::from(1);
        }
    };
    if !report_read(&args.cdr, &file) {
        return ExitCode::from(1);
    }
    let rows = file.rows;
    let calls = crate::pipeline::recovery::build(config, &rows, from, to, &tz);
    if args.dry_run {
        for c in &calls {
            println!(
                "{}\t{:?}\t{}\t{:?}\t{}\twait={}s talk={}s",
                c.external_id,
                c.direction,
                c.customer_number,
                c.outcome,
                c.code.as_deref().unwrap_or("-"),
                c.wait_seconds,
                c.talk_seconds
            );
        }
        println!(
            "{} call(s) would be queued ({} CDR rows read, {} skipped)",
            calls.len(),
            rows.len(),
            file.skipped.len()
        );
        return ExitCode::SUCCESS;
    }
    let store = match super::open_store_for_cli(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let queue = match outbox::store::OutboxStore::of(&store) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("pbxgate: {e}");
            return ExitCode::from(1);
        }
    };
    let (mut queued, mut known) = (0, 0);
    for c in calls {
        match queue.insert(c) {
            Ok(outbox::store::Enqueued::Queued(_)) => queued += 1,
            Ok(outbox::store::Enqueued::Duplicate) => known += 1,
            Err(e) => {
                eprintln!("pbxgate: {e}");
                return ExitCode::from(1);
            }
        }
    }
    if let Err(e) = queue.close() {
        eprintln!("pbxgate: {e}");
        return ExitCode::from(1);
    }
    if let Err(e) = queue.flush().await {
        eprintln!("pbxgate: {e}");
        return ExitCode::from(1);
    }
    println!("{queued} call(s) queued for upload, {known} already known; start the service to upload them");
    ExitCode::SUCCESS
}

/// Says on stderr how many rows were read, in which layout, and which were skipped and why.
/// False when no row was read (all skipped, or an empty file): nothing to backfill.
fn report_read(path: &std::path::Path, file: &cdr::CdrFile) -> bool {
    let name = path.display();
    if file.rows.is_empty() {
        if file.skipped.is_empty() {
            eprintln!("pbxgate: {name}: no CDR rows in the file, nothing to backfill");
        } else {
            eprintln!(
                "pbxgate: {name}: all {} row(s) skipped, nothing to backfill:",
                file.skipped.len()
            );
        }
    } else if file.skipped.is_empty() {
        eprintln!("pbxgate: {name}: {}", file.read_summary());
    } else {
        eprintln!(
            "pbxgate: {name}: {}; {} row(s) skipped:",
            file.read_summary(),
            file.skipped.len()
        );
    }
    for line in file.skipped_summary() {
        eprintln!("pbxgate:   {line}");
    }
    !file.rows.is_empty()
}
