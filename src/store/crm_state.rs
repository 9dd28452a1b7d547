//! What a CRM adapter must remember across restarts (tree `crm_state`), by its own keys: the
//! CRM's id of a call registered at ring time and finished at hang-up, OAuth tokens. Each
//! adapter gets the tree through the CRM port's constructor and owns what it writes there;
//! nothing else reads it. `flush` before acting on a value that must not be lost.

pub type CrmState = super::keyed::Keyed;

pub(super) const TREE: &str = "crm_state";
