//! The bottom layer: helpers every other module may use, importing nothing of pbxgate.

pub mod backoff;
pub mod clock;
pub mod ident;
pub mod secret;
