//! The Bitrix24 adapter (external telephony REST): the client with the portal's leaky bucket,
//! typed errors and OAuth tokens ([`client`], [`limiter`], [`error`], [`oauth`]), and the port's
//! implementation ([`adapter`]).

pub mod adapter;
pub mod client;
pub mod error;
pub mod limiter;
pub mod oauth;

pub use adapter::Bitrix24;
pub use client::B24Client;
pub use error::B24Error;
