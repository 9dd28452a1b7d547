//! `[backfill]`: recovering, from Asterisk's CDR CSV, calls that ended while pbxgate was down.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use validator::Validate;

use super::checks::timezone;

/// Asterisk's CDR CSV, read at startup for the calls that ended while pbxgate was not running.
#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct BackfillConfig {
    /// `cdr-csv/Master.csv` (cdr_csv's 18 columns, `loguniqueid=yes`); empty = no recovery.
    pub cdr_csv: PathBuf,
    /// The time zone of the CDR times (`usegmtime=no` writes the PBX's local time).
    #[validate(custom(function = "timezone"))]
    pub timezone: String,
    /// How far back a restart looks at most (a service stopped for a week recovers a week).
    #[serde(with = "humantime_serde")]
    pub max_gap: Duration,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            cdr_csv: PathBuf::new(),
            timezone: "UTC".into(),
            max_gap: Duration::from_secs(7 * 24 * 3600),
        }
    }
}
