//! The far ends of `pbxgate demo` (the command itself is `cli::demo`): a simulated Asterisk
//! serving real AMI on 127.0.0.1 ([`asterisk`], replaying the bundled captures ([`captures`])
//! with fresh ids and current times, a new call every few seconds, answering click-to-call
//! Originates), and a sandbox CRM ([`sandbox_crm`], retailCRM's API on pbxgate's own HTTP
//! server, keeping what it received).

pub mod asterisk;
pub mod captures;
pub mod sandbox_crm;
