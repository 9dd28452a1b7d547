//! `[manager_status]`: how a manager's CRM status pauses him in the PBX queues.

use serde::{Deserialize, Serialize};
use validator::Validate;

use super::checks::{channel_template, user_statuses};

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct ManagerStatusConfig {
    /// Statuses that pause the manager in the queues (`QueuePause Paused=true Reason=<status>`);
    /// any other status unpauses.
    #[validate(custom(function = "user_statuses"))]
    pub pause_statuses: Vec<String>,
    /// The queue member interface of a manager; `{code}` is the extension.
    #[validate(custom(function = "channel_template"))]
    pub queue_interface: String,
    /// Queues to act on; empty = all queues.
    pub queues: Vec<String>,
}

impl Default for ManagerStatusConfig {
    fn default() -> Self {
        ManagerStatusConfig {
            pause_statuses: vec!["dinner".into(), "break".into()],
            queue_interface: "PJSIP/{code}".into(),
            queues: Vec::new(),
        }
    }
}
