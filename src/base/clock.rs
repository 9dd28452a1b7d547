//! The wall clock, one place: Unix milliseconds for call times, Unix seconds for stored stamps.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix milliseconds (call events, records and queue entries are stamped with these).
pub type Millis = i64;

/// Now, in Unix milliseconds.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Now, in Unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
