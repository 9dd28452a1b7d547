//! `[routing]`: answering the dialplan's "who takes this call" (FastAGI, the CRM lookup, its
//! cache, fallback and fixed routes).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use validator::Validate;

use super::checks::{optional_socket_addr, request_timeout, route_timeout, user_statuses};
use super::one_or_many;

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// FastAGI listen address (`127.0.0.1:4573`); empty = FastAGI off.
    #[validate(custom(function = "optional_socket_addr"))]
    pub agi_listen: String,
    /// Hard deadline of the CRM lookup; past it the fallback is answered.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "route_timeout"))]
    pub timeout: Duration,
    /// The extension answered when there is no decision in time (empty: no extension).
    pub fallback_code: String,
    /// How long a found manager is cached per number.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// How long "no manager for this number" is cached.
    #[serde(with = "humantime_serde")]
    pub negative_cache_ttl: Duration,
    /// Most numbers cached at once.
    #[validate(range(min = 1, max = 10000000, message = "must be between 1 and 10000000"))]
    pub cache_max: usize,
    /// `ignoreStatus` of `telephony/manager`: true asks for the responsible manager whatever
    /// his CRM status, and pbxgate applies `skip_statuses` from the statuses it keeps.
    pub ignore_status: bool,
    /// Managers whose stored status is one of these are not routed to; the fallback is.
    #[validate(custom(function = "user_statuses"))]
    pub skip_statuses: Vec<String>,
    /// A FastAGI client must send its environment within this time.
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "request_timeout"))]
    pub agi_timeout: Duration,
    /// Fixed answers checked before the CRM.
    pub r#static: Vec<StaticRoute>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            agi_listen: String::new(),
            timeout: Duration::from_millis(800),
            fallback_code: String::new(),
            cache_ttl: Duration::from_secs(600),
            negative_cache_ttl: Duration::from_secs(60),
            cache_max: 100_000,
            ignore_status: true,
            skip_statuses: vec!["dinner".into(), "break".into()],
            agi_timeout: Duration::from_secs(5),
            r#static: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StaticRoute {
    /// Pattern(s) on the caller's number (any of its forms); empty = any.
    #[serde(default, deserialize_with = "one_or_many")]
    pub phone: Vec<String>,
    /// Pattern(s) on the dialled number; empty = any.
    #[serde(default, deserialize_with = "one_or_many")]
    pub did: Vec<String>,
    pub code: String,
}
