//! The call models, pure: PBX events in (AMI frames for [`model`], posted events for
//! [`webhook`]), live events for the CRM's pop-ups and finished, CRM-neutral call records
//! ([`record`]) out. No I/O and no CRM: the pipeline runs them.

pub(crate) mod classify;
pub mod full;
pub(crate) mod model;
pub mod record;
pub mod webhook;

pub use classify::Classifier;
pub use model::{CallModel, LiveCall, Millis, Output};
pub use record::{
    CallRecord, ChannelKind, ClickToCall, Conversation, Direction, LiveEvent, MainChannel, Outcome,
};
