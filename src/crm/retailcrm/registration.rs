//! Registers pbxgate in retailCRM as a telephony integration module.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::base::secret::Secret;
use crate::config::Config;
use crate::crm::{
    AdditionalCode, CrmClient, CrmError, ExternalPhoneCode, IntegrationModule, Integrations,
    ModuleEditInfo, TelephonyConfiguration,
};
use crate::http::paths;

/// The module as we register it: every URL absolute under `http.public_url`, except the
/// `actions`, which retailCRM resolves against `baseUrl`.
pub fn module(cfg: &Config, client_id: &Secret) -> IntegrationModule {
    let base = cfg.http.public_base();
    let users = cfg
        .users
        .iter()
        .map(|u| AdditionalCode {
            user_id: i64::try_from(u.user_id).unwrap_or(i64::MAX),
            code: u.code.clone(),
        })
        .collect();
    let phones = cfg
        .external_phones
        .iter()
        .map(|p| ExternalPhoneCode {
            site_code: p.site.clone(),
            external_phone: p.number.clone(),
        })
        .collect();
    IntegrationModule {
        code: Some(cfg.crm.module_code.clone()),
        integration_code: Some(cfg.crm.module_code.clone()),
        active: Some(true),
        name: Some(cfg.crm.module_name.clone()),
        logo: Some(format!("{base}{}", paths::LOGO)),
        client_id: Some(client_id.expose().to_string()),
        base_url: Some(base.to_string()),
        actions: Some(BTreeMap::from([(
            "activity".to_string(),
            paths::ACTIVITY.to_string(),
        )])),
        integrations: Some(Integrations {
            telephony: Some(TelephonyConfiguration {
                make_call_url: Some(format!("{base}{}", paths::MAKE_CALL)),
                change_user_status_url: Some(format!("{base}{}", paths::USER_STATUS)),
                allow_edit: Some(cfg.crm.allow_edit),
                input_event_supported: Some(true),
                output_event_supported: Some(true),
                hangup_event_supported: Some(true),
                additional_codes: Some(users),
                external_phones: Some(phones),
            }),
        }),
        ..IntegrationModule::default()
    }
}

/// Sends the registration once and logs what retailCRM did not recognise.
pub async fn register(
    crm: &CrmClient,
    cfg: &Config,
    client_id: &Secret,
) -> Result<ModuleEditInfo, CrmError> {
    let answer = crm.integration_module_edit(&module(cfg, client_id)).await?;
    let info = answer.info.unwrap_or_default();
    if !info.not_exist_users_ids.is_empty() {
        tracing::warn!(user_ids = ?info.not_exist_users_ids,
            "retailCRM has no users with these ids; fix [[users]] user_id in the config");
    }
    if !info.not_exist_site_codes.is_empty() {
        tracing::warn!(sites = ?info.not_exist_site_codes,
            "retailCRM has no shops with these codes; fix [[external_phones]] site in the config");
    }
    tracing::info!(module = %cfg.crm.module_code, users = cfg.users.len(),
        external_phones = cfg.external_phones.len(), "registered in retailCRM");
    Ok(info)
}

/// Registration at startup: keeps trying through CRM outages (with capped backoff), gives up
/// only on errors that retrying cannot fix (wrong key, rejected data). Reports to `status`.
pub async fn register_until_done(
    crm: CrmClient,
    cfg: std::sync::Arc<Config>,
    client_id: Secret,
    status: RegistrationStatus,
) {
    let mut attempt: u32 = 0;
    // Another CRM request getting through ends the wait; when that early try fails too, the
    // next wait is served in full (as in the outbox).
    let mut crm_ok = crm.successes();
    let mut may_end_early = true;
    loop {
        match register(&crm, &cfg, &client_id).await {
            Ok(_) => {
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
                tracing::error!(error = %e, "registration refused by retailCRM; fix the config and restart");
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
