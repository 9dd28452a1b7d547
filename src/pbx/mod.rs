//! Where calls come from: the Asterisk Manager Interface, the FastAGI routing server and
//! Asterisk's CDR files (backfill). PBX webhooks are parsed by [`crate::calls::webhook`].

pub(crate) mod agi;
pub mod ami;
pub mod cdr;
