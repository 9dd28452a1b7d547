//! `[history]`: when and how finished calls are uploaded to the CRM.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use validator::Validate;

use super::checks::backoff;

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Upload shortly after each call (after `batch_window`, or at once when a batch is full).
    pub immediate: bool,
    #[serde(with = "humantime_serde")]
    pub batch_window: Duration,
    /// The scheduler uploads whatever is pending this often (drains backlogs).
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub interval: Duration,
    /// Calls per `calls/upload` request (retailCRM takes at most 50).
    #[validate(range(min = 1, max = 50, message = "must be between 1 and 50"))]
    pub batch_size: usize,
    /// How long uploaded call ids are remembered (duplicates, admin view).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// A recording modified within this time is still being written: its call waits.
    #[serde(with = "humantime_serde")]
    pub record_settle: Duration,
    /// ...but never longer than this.
    #[serde(with = "humantime_serde")]
    pub record_wait_max: Duration,
    /// Backoff after a failed upload (exponential with jitter between these bounds).
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub retry_base: Duration,
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "backoff"))]
    pub retry_max: Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            immediate: true,
            batch_window: Duration::from_secs(1),
            interval: Duration::from_secs(600),
            batch_size: 50,
            retention: Duration::from_secs(7 * 24 * 3600),
            record_settle: Duration::from_secs(5),
            record_wait_max: Duration::from_secs(120),
            retry_base: Duration::from_secs(5),
            retry_max: Duration::from_secs(300),
        }
    }
}
