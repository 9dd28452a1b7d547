//! pbxgate connects an Asterisk PBX to a CRM (retailCRM's telephony API v5 today).
//! The README's "Architecture" section maps the modules.

pub mod admin;
pub mod app;
pub mod base;
pub mod callgate;
pub mod calls;
pub mod check;
pub mod cli;
pub(crate) mod click_to_call;
pub mod config;
pub mod crm;
pub mod demo;
pub mod hooks;
pub mod http;
pub(crate) mod manager_status;
pub mod metrics;
pub mod outbox;
pub mod pbx;
pub(crate) mod phone;
pub mod pipeline;
pub mod records;
pub mod routing;
pub mod store;
pub(crate) mod telemetry;
