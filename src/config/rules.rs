//! `[[rules]]`: which calls reach the CRM (the conditions are compiled by `pipeline::rules`).

use serde::{Deserialize, Serialize};

use super::one_or_many;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Ignore,
    Register,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub action: RuleAction,
    /// A label for logs; the rule's index is used otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `in`, `out`, `internal` (one or a list).
    #[serde(default, deserialize_with = "one_or_many")]
    pub direction: Vec<String>,
    /// Extension code patterns: any extension of the call matching one.
    #[serde(default, deserialize_with = "one_or_many")]
    pub extension: Vec<String>,
    /// Trunk patterns on the channel (`PJSIP/trunk`) or endpoint (`trunk`).
    #[serde(default, deserialize_with = "one_or_many")]
    pub trunk: Vec<String>,
    /// Patterns on the dialled number (any of its forms).
    #[serde(default, deserialize_with = "one_or_many")]
    pub did: Vec<String>,
    /// Patterns on the customer's number (any of its forms).
    #[serde(default, deserialize_with = "one_or_many")]
    pub phone: Vec<String>,
}

impl RuleConfig {
    /// A rule with this action and no condition yet (it matches every call).
    pub fn new(action: RuleAction) -> RuleConfig {
        RuleConfig {
            action,
            name: None,
            direction: Vec::new(),
            extension: Vec::new(),
            trunk: Vec::new(),
            did: Vec::new(),
            phone: Vec::new(),
        }
    }
}
