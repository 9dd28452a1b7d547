//! `[pbx]`: this PBX's name in call ids and the token of the call-events webhook.

use serde::{Deserialize, Serialize};
use validator::Validate;

use super::checks::{module_code, token};
use crate::base::secret::Secret;

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct PbxConfig {
    /// Names this PBX in call ids (`<system_id>-<linkedid>`), so ids stay unique across PBXs.
    #[validate(custom(function = "module_code"))]
    pub system_id: String,
    /// Bearer token a PBX presents to post call events (`/pbx/events`); empty = endpoint off.
    #[validate(custom(function = "token"))]
    pub token: Secret,
}

impl Default for PbxConfig {
    fn default() -> Self {
        PbxConfig {
            system_id: "pbx".into(),
            token: Secret::default(),
        }
    }
}
