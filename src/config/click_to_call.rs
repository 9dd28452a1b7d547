//! `[click_to_call]`: the limits on originating calls from the CRM.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use validator::Validate;

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct ClickToCallConfig {
    /// The same (extension, number) again within this window is answered but not dialled twice.
    #[serde(with = "humantime_serde")]
    pub dedupe_window: Duration,
    /// Originates allowed per extension per minute (0 = no limit).
    pub per_extension_per_minute: u32,
    /// Originates allowed in total per minute (0 = no limit).
    pub global_per_minute: u32,
}

impl Default for ClickToCallConfig {
    fn default() -> Self {
        ClickToCallConfig {
            dedupe_window: Duration::from_secs(5),
            per_extension_per_minute: 10,
            global_per_minute: 120,
        }
    }
}
