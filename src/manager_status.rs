//! Managers' statuses from retailCRM (`changeUserStatusUrl`): stored durably per user, and
//! mirrored on the PBX as queue pauses (`QueuePause`), re-applied after every AMI reconnect.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::base::ident::ExtensionCode;
use crate::config::Config;
use crate::crm::port::UserStatus;
use crate::pbx::ami::{Action, AmiClient, LinkState};
use crate::store::{unix_now, Store, StoreError, StoredUserStatus};

/// A manager's new status, its fields already checked by whoever received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    /// The CRM user (positive).
    pub user_id: i64,
    /// The user's extension: its queue member interface is paused or unpaused.
    pub code: ExtensionCode,
    pub status: UserStatus,
}

/// Why a status change was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ManagerStatusError {
    /// It could not be stored (the PBX is never updated with a status that is not stored).
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone)]
pub struct ManagerStatus {
    config: Arc<Config>,
    store: Store,
    ami: AmiClient,
    apply: mpsc::UnboundedSender<i64>,
    /// The last PBX failure per user (cleared by the next success), for `/ready`.
    failures: Arc<Mutex<BTreeMap<i64, String>>>,
}

impl ManagerStatus {
    /// Creates the service and its worker task (which applies statuses in order, one at a time).
    pub fn start(
        config: Arc<Config>,
        store: Store,
        ami: AmiClient,
    ) -> (ManagerStatus, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let service = ManagerStatus {
            config,
            store,
            ami,
            apply: tx,
            failures: Arc::default(),
        };
        let worker = tokio::spawn(service.clone().run(rx));
        (service, worker)
    }

    /// Stores a status change; the PBX is updated in the background (its failure does not fail
    /// the CRM's request: the CRM could not act on it).
    pub async fn change(&self, change: StatusChange) -> Result<(), ManagerStatusError> {
        let StatusChange {
            user_id,
            code,
            status,
        } = change;
        let record = StoredUserStatus {
            v: 1,
            user_id,
            code: code.into_string(),
            status,
            since: unix_now(),
        };
        self.store.put_user_status(&record).await?;
        tracing::info!(user_id, code = %record.code, status = status.as_str(), "manager status changed");
        let _ = self.apply.send(user_id);
        Ok(())
    }

    /// Users whose last PBX update failed, with the reason.
    pub fn failures(&self) -> BTreeMap<i64, String> {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn run(self, mut rx: mpsc::UnboundedReceiver<i64>) {
        // The link state, not the event bus: a burst of events cannot make us miss a new
        // session, nor re-apply every status for nothing.
        let mut link = self.ami.watch_state();
        link.mark_changed();
        let mut applied: Option<u64> = None;
        loop {
            tokio::select! {
                user = rx.recv() => match user {
                    Some(id) => match self.store.user_status(id) {
                        Ok(Some(s)) => self.apply(&s).await,
                        Ok(None) => {}
                        Err(e) => tracing::error!(user_id = id, error = %e, "cannot read stored status"),
                    },
                    None => return,
                },
                changed = link.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let session = match &*link.borrow_and_update() {
                        LinkState::Connected { session, .. } => Some(*session),
                        _ => None,
                    };
                    if let Some(session) = session.filter(|s| applied != Some(*s)) {
                        applied = Some(session);
                        tracing::info!(session, "applying managers' statuses on the PBX");
                        self.apply_all().await;
                    }
                }
            }
        }
    }

    async fn apply_all(&self) {
        match self.store.user_statuses() {
            Ok(all) => {
                for s in all {
                    self.apply(&s).await;
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read stored statuses"),
        }
    }

    /// The `QueuePause` actions for one status (one per configured queue, or one for all).
    pub fn actions(config: &Config, status: &StoredUserStatus) -> Vec<Action> {
        let ms = &config.manager_status;
        let interface = ms.queue_interface.replace("{code}", &status.code);
        let paused = ms
            .pause_statuses
            .iter()
            .any(|p| p == status.status.as_str());
        let queues: Vec<Option<&String>> = if ms.queues.is_empty() {
            vec![None]
        } else {
            ms.queues.iter().map(Some).collect()
        };
        queues
            .into_iter()
            .map(|queue| {
                let mut a = Action::new("QueuePause")
                    .header("Interface", &interface)
                    .header("Paused", if paused { "true" } else { "false" });
                if let Some(q) = queue {
                    a = a.header("Queue", q);
                }
                if paused {
                    a = a.header("Reason", status.status.as_str());
                }
                a
            })
            .collect()
    }

    async fn apply(&self, status: &StoredUserStatus) {
        if !self.ami.state().is_connected() {
            // Applied on the next Connected.
            return;
        }
        let mut failure = None;
        for action in Self::actions(&self.config, status) {
            let interface = action
                .headers()
                .iter()
                .find(|(k, _)| k == "Interface")
                .map(|(_, v)| v.clone());
            let queue = action
                .headers()
                .iter()
                .find(|(k, _)| k == "Queue")
                .map(|(_, v)| v.clone());
            if let Err(e) = self.ami.send(action).await {
                let iface = interface.unwrap_or_default();
                tracing::warn!(user_id = status.user_id, interface = %iface, queue = ?queue, error = %e,
                    "QueuePause failed; the manager's queue state on the PBX does not follow the CRM");
                failure = Some(format!("{iface}: {e}"));
            }
        }
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match failure {
            Some(f) => failures.insert(status.user_id, f),
            None => failures.remove(&status.user_id),
        };
    }
}
