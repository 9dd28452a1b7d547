//! pbxgate connects an Asterisk PBX to retailCRM's telephony API (v5, integration module).
//!
//! Modules, one concern each:
//! - [`config`]: layered configuration (defaults < TOML file < `PBXGATE__*` env), validation.
//! - [`secret`]: strings that never print.
//! - [`store`]: the sled database behind a small API.
//! - [`crm`]: the retailCRM API v5 client (wire types, errors, rate limiting, retries).
//! - [`outbox`]: the durable call-history queue and its uploader (`calls/upload`).
//! - [`records`]: recordings: signed `recordUrl` links, the endpoint serving them, mp3 conversion.
//! - [`registration`]: the integration-module registration.
//! - [`phone`]: number normalisation (original, base, canonical, variants; FMC numbers).
//! - [`rules`]: the registration rules (which calls reach the CRM).
//! - [`routing`]: incoming calls to the responsible manager (HTTP and FastAGI).
//! - [`http`]: the HTTP server (retailCRM callbacks, health, admin page).
//! - [`ami`]: the Asterisk Manager Interface (frame parser and client).
//! - [`calls`]: the call model (AMI events → live events and finished call records).
//! - [`click_to_call`]: `makeCallUrl` → AMI Originate, with dedupe and rate limits.
//! - [`manager_status`]: `changeUserStatusUrl` → stored status → queue pause on the PBX.
//! - [`app`]: startup and shutdown of everything above.
//! - [`backfill`]: past calls from Asterisk's CDR CSV into the outbox.
//! - [`check`], [`cli`], [`telemetry`]: operator-facing entry points and logging.

pub mod ami;
pub mod app;
pub mod backfill;
pub mod calls;
pub mod check;
pub mod cli;
pub mod click_to_call;
pub mod config;
pub mod crm;
pub mod http;
pub mod manager_status;
pub mod outbox;
pub mod phone;
pub mod records;
pub mod registration;
pub mod routing;
pub mod rules;
pub mod secret;
pub mod store;
pub mod telemetry;
