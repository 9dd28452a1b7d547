//! Between the call model and the CRM: the tracker runs the model on the PBX's events, the gate
//! applies the registration rules and decides who is credited, and the live sender publishes
//! pop-ups through the CRM port. Finished calls go on to the outbox.

pub(crate) mod gate;
pub(crate) mod live;
pub(crate) mod points;
pub mod recovery;
pub mod registration_points;
pub(crate) mod rules;
pub(crate) mod tracker;
pub(crate) mod trial;

pub use tracker::{CallSink, CallTracker, RecentCalls, TrackerStats};
