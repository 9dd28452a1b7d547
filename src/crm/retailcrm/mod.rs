//! The retailCRM adapter (API v5, telephony integration module): the client with its rate
//! limits and retries ([`client`]), the wire types ([`wire`]), the mapping of pbxgate's calls to
//! them ([`mapping`]), the module registration ([`registration`]) and the port's implementation
//! ([`adapter`]).

pub(crate) mod adapter;
pub(crate) mod client;
pub(crate) mod error;
pub(crate) mod lenient;
pub(crate) mod limiter;
pub(crate) mod mapping;
pub mod points;
pub mod registration;
pub mod wire;

pub use adapter::RetailCrm;
pub use client::CrmClient;
pub use error::CrmError;
pub use wire::*;

/// The paths retailCRM calls back on (under `http.public_url`); registration announces them
/// and `http` serves them.
pub mod paths {
    pub const MAKE_CALL: &str = "/crm/make-call";
    pub const USER_STATUS: &str = "/crm/user-status";
    /// Relative to `baseUrl`, as retailCRM's `actions` expect.
    pub const ACTIVITY: &str = "/crm/activity";
    pub const LOGO: &str = "/static/logo.svg";
}
