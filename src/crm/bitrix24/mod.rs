//! The Bitrix24 adapter (external telephony REST): the client with the portal's leaky bucket,
//! typed errors and OAuth tokens ([`client`], [`limiter`], [`error`], [`oauth`]); the user
//! directory ([`directory`]); the mapping of calls to `register`/`finish` ([`mapping`]); the
//! portal's customisation points ([`points`]); the events it posts ([`events`]); and the port's
//! implementation ([`adapter`]).

pub mod adapter;
pub mod client;
pub mod directory;
pub mod error;
pub mod events;
pub mod limiter;
pub mod mapping;
pub mod oauth;
pub mod points;

pub use adapter::Bitrix24;
pub use client::B24Client;
pub use error::B24Error;
