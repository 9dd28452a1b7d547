//! The retailCRM adapter (API v5, integration module).

pub mod client;
pub mod error;
pub mod lenient;
pub mod limiter;
pub mod registration;
pub mod wire;

pub use client::CrmClient;
pub use error::CrmError;
pub use wire::*;
