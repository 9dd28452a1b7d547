//! The Kommo (amoCRM) adapter (API v4): the client with its rate limit, typed errors and
//! tokens ([`client`], [`limiter`], [`error`], [`oauth`]); the mapping of calls to Kommo's
//! bodies ([`mapping`]); Kommo's customisation points ([`points`]); the widget's token check
//! ([`widget`]); and the port's implementation ([`adapter`]).

pub mod adapter;
pub mod client;
pub mod error;
pub mod limiter;
pub mod mapping;
pub mod oauth;
pub mod points;
pub mod widget;

pub use adapter::Kommo;
pub use client::KommoClient;
pub use error::KommoError;
