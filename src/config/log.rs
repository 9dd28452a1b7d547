//! `[log]`: the log filter and format.

use serde::{Deserialize, Serialize};
use validator::Validate;

use super::checks::{log_filter, log_format};

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `debug`, `pbxgate=debug,sled=warn`, ...
    #[validate(custom(function = "log_filter"))]
    pub level: String,
    /// `text` or `json`.
    #[validate(custom(function = "log_format"))]
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}
