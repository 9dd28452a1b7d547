//! The Bitrix24 adapter (external telephony REST): the client with the portal's leaky bucket,
//! typed errors and OAuth tokens ([`client`], [`error`], [`oauth`]), and the port's
//! implementation ([`adapter`]).

pub mod adapter;
pub mod client;
pub mod directory;
pub mod error;
pub mod events;
pub mod mapping;
pub mod oauth;
pub mod points;

pub use adapter::Bitrix24;
pub use client::B24Client;
pub use error::B24Error;
