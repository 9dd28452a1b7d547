//! Call tracking: one call model fed by AMI events (see [`model`]), producing live events for
//! the CRM's pop-ups and finished call records for the history.

pub(crate) mod classify;
pub(crate) mod model;
pub mod record;
pub mod webhook;

pub use classify::Classifier;
pub use model::{CallModel, Millis, Output};
pub use record::{
    CallRecord, ChannelKind, ClickToCall, Conversation, Direction, LiveEvent, MainChannel, Outcome,
};
