//! The CRM side of pbxgate: the port ([`port`]) that everything else talks to, the neutral
//! registration loop, and one adapter per CRM ([`retailcrm`]). `crm.kind` selects the adapter.

pub mod port;
pub mod registration;
pub mod retailcrm;

use std::sync::Arc;

pub use port::{Crm, CrmFailure, Delivery, Finished, Published, Responsible, UserStatus};

use crate::base::secret::Secret;
use crate::config::{Config, CrmKind};

/// The adapter `crm.kind` names, ready to use.
pub fn connect(config: Arc<Config>, client_id: Secret) -> Result<Arc<dyn Crm>, CrmFailure> {
    match config.crm.kind {
        CrmKind::RetailCrm => {
            let crm = retailcrm::RetailCrm::new(config, client_id).map_err(|e| e.failure())?;
            Ok(Arc::new(crm))
        }
    }
}
