//! Registers pbxgate in retailCRM as a telephony integration module.

use std::collections::BTreeMap;

use super::paths;
use super::wire::{
    AdditionalCode, ExternalPhoneCode, IntegrationModule, Integrations, ModuleEditInfo,
    TelephonyConfiguration,
};
use super::{CrmClient, CrmError};
use crate::base::secret::Secret;
use crate::config::Config;

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
