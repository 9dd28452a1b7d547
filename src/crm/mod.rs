//! The CRM port: what the rest of pbxgate knows about a CRM. One adapter per CRM below it.

pub mod retailcrm;

pub use retailcrm::*;
