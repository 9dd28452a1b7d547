//! `[http]`: the listening socket, the public URL retailCRM reaches us at, and the limits on
//! every connection and request.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use validator::Validate;

use super::checks::{client_timeout, http_url, socket_addr};

#[derive(Debug, Clone, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    #[validate(custom(function = "socket_addr"))]
    pub listen: String,
    /// The address retailCRM uses to reach us; every URL we register is built from it.
    #[validate(custom(function = "http_url"))]
    pub public_url: String,
    /// Largest request body accepted on any endpoint.
    #[validate(range(
        min = 1024,
        max = 16777216,
        message = "must be between 1024 and 16777216 bytes"
    ))]
    pub max_body_bytes: usize,
    /// Time a client has to send a request's head, and then again its body; a connection that
    /// is slower is closed (after a 408 where the protocol allows one).
    #[serde(with = "humantime_serde")]
    #[validate(custom(function = "client_timeout"))]
    pub client_timeout: Duration,
    /// Most connections open at once; lowered at start to fit the open-files limit.
    #[validate(range(min = 1, max = 1000000, message = "must be between 1 and 1000000"))]
    pub max_connections: usize,
    /// Most connections open at once from one client address; 0 = no limit per address.
    #[validate(range(max = 1000000, message = "must be at most 1000000"))]
    pub max_connections_per_ip: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8088".into(),
            public_url: "http://127.0.0.1:8088".into(),
            max_body_bytes: 64 * 1024,
            client_timeout: Duration::from_secs(5),
            max_connections: 4096,
            max_connections_per_ip: 256,
        }
    }
}

impl HttpConfig {
    /// `public_url` without a trailing slash, ready to have absolute paths appended.
    pub fn public_base(&self) -> &str {
        self.public_url.trim_end_matches('/')
    }
}
