//! Asterisk Manager Interface: the wire format ([`frame`]) and the client ([`client`]).

pub(crate) mod client;
pub mod frame;

pub use client::{Action, AmiClient, AmiError, AmiEvent, LinkState, Reply};
pub use frame::Frame;
