//! The CRM side of pbxgate: the port ([`port`]) that everything else talks to, the neutral
//! registration loop, and one adapter per CRM ([`retailcrm`], [`bitrix24`], [`kommo`]). `crm.kind` selects the adapter.

pub mod bitrix24;
pub mod kommo;
pub mod port;
pub mod registration;
pub mod retailcrm;
pub mod tasks;

use std::sync::Arc;

pub use port::{Crm, CrmFailure, Delivery, Finished, Published, Responsible, UserStatus};

use crate::base::secret::Secret;
use crate::config::{Config, CrmKind};
use crate::hooks::Hooks;
use crate::store::crm_state::CrmState;

/// The adapter `crm.kind` names, ready to use. `state` is where the adapter keeps what it must
/// remember across restarts (the CRM's ids of calls in progress, tokens); one-shot tools that
/// only check the CRM pass `None`. `hooks` are the adapter's own customisation points.
pub fn connect(
    config: Arc<Config>,
    client_id: Secret,
    state: Option<CrmState>,
    hooks: Hooks,
) -> Result<Arc<dyn Crm>, CrmFailure> {
    match config.crm.kind {
        CrmKind::RetailCrm => {
            // The follow-up tasks of missed calls are kept there, to create each once.
            let crm = retailcrm::RetailCrm::new(config, client_id)
                .map_err(|e| e.failure())?
                .with_hooks(hooks)
                .with_state(state);
            Ok(Arc::new(crm))
        }
        CrmKind::Bitrix24 => Ok(Arc::new(bitrix24::Bitrix24::new(config, state, hooks)?)),
        CrmKind::Kommo => Ok(Arc::new(kommo::Kommo::new(config, state, hooks)?)),
    }
}
