//! The bottom layer: helpers every other module may use, importing nothing of pbxgate.

pub(crate) mod backoff;
pub mod clock;
pub(crate) mod ident;
pub mod latency;
pub mod secret;
