//! Registration at startup, for any CRM: keeps trying through outages (capped backoff), gives
//! up only on errors that retrying cannot fix (wrong key, rejected data); `/ready` shows the
//! state.

use std::sync::Arc;
use std::time::Duration;

use super::port::Crm;

/// Registration at startup: keeps trying through CRM outages (with capped backoff), gives up
/// only on errors that retrying cannot fix (wrong key, rejected data). Reports to `status`.
pub async fn register_until_done(crm: Arc<dyn Crm>, status: RegistrationStatus) {
    let mut attempt: u32 = 0;
    // Another CRM request getting through ends the wait; when that early try fails too, the
    // next wait is served in full (as in the outbox).
    let mut crm_ok = crm.successes();
    let mut may_end_early = true;
    loop {
        match crm.register().await {
            Ok(()) => {
                status.set(RegistrationState::Registered);
                return;
            }
            Err(e) if e.is_retriable() => {
                let delay = crate::base::backoff::backoff(
                    attempt,
                    Duration::from_secs(1),
                    Duration::from_secs(300),
                )
                .max(Duration::from_secs(1));
                tracing::warn!(error = %e, retry_in_s = delay.as_secs(), "registration failed, will retry");
                status.set(RegistrationState::Failed(e.to_string()));
                crm_ok.mark_unchanged();
                let ended_early = tokio::select! {
                    _ = tokio::time::sleep(delay) => false,
                    Ok(()) = crm_ok.changed(), if may_end_early => true,
                };
                may_end_early = !ended_early;
                attempt = attempt.saturating_add(1);
            }
            Err(e) => {
                tracing::error!(error = %e, "registration refused by {}; fix the config and restart", crm.name());
                status.set(RegistrationState::Failed(e.to_string()));
                return;
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    Disabled(&'static str),
    Pending,
    Registered,
    Failed(String),
}

/// Shared, observable registration state (for `/ready`, and for whoever waits for it).
#[derive(Debug, Clone)]
pub struct RegistrationStatus(std::sync::Arc<tokio::sync::watch::Sender<RegistrationState>>);

impl RegistrationStatus {
    pub fn new(initial: RegistrationState) -> Self {
        RegistrationStatus(std::sync::Arc::new(tokio::sync::watch::Sender::new(
            initial,
        )))
    }

    pub fn get(&self) -> RegistrationState {
        self.0.borrow().clone()
    }

    pub fn set(&self, state: RegistrationState) {
        self.0.send_replace(state);
    }

    /// Waits until the state satisfies `done` and returns it.
    pub async fn wait_for(
        &self,
        done: impl FnMut(&RegistrationState) -> bool,
    ) -> RegistrationState {
        let mut rx = self.0.subscribe();
        let state = match rx.wait_for(done).await {
            Ok(s) => s.clone(),
            // The sender lives in `self`, so the channel cannot close while we wait.
            Err(_) => self.get(),
        };
        state
    }
}
