//! `[storage]`: the local store and its stall watchdog.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use validator::Validate;

use super::checks::non_empty_path;

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    #[validate(custom(function = "non_empty_path"))]
    pub path: PathBuf,
    /// A store write + flush that takes longer than this means the store is stuck: the process
    /// exits so that its supervisor restarts it (0 = never).
    #[serde(with = "humantime_serde")]
    pub stall_limit: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("data/pbxgate.sled"),
            stall_limit: Duration::from_secs(120),
        }
    }
}
