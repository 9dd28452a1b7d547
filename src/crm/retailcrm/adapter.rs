//! retailCRM behind the CRM port: live events are `telephony/call/event`, finished calls go
//! to `telephony/calls/upload` in batches of at most 50 (a batch refused for its content is
//! halved until the refused calls are found; the others go through), the responsible manager
//! is `telephony/manager`, registration is the integration module.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::OnceCell;

use super::mapping::{to_call, to_call_event};
use super::wire::{Call, MAX_CALLS_PER_UPLOAD};
use super::{registration, CrmClient, CrmError};
use crate::base::secret::Secret;
use crate::calls::LiveEvent;
use crate::config::Config;
use crate::crm::port::{
    Crm, CrmFailure, Delivery, DirectoryEntry, FailureKind, Finished, Published, Responsible,
};
use crate::hooks::Hooks;

/// The retailCRM adapter. Cheap to share.
pub struct RetailCrm {
    client: CrmClient,
    config: Arc<Config>,
    /// The module's clientId, presented back by retailCRM in its callbacks.
    client_id: Secret,
    tz: OnceCell<jiff::tz::TimeZone>,
    /// retailCRM's own customisation points (`process_call_event_params`, `process_upload_params`).
    hooks: Hooks,
}

impl RetailCrm {
    pub fn new(config: Arc<Config>, client_id: Secret) -> Result<RetailCrm, CrmError> {
        Ok(Self::with_client(
            CrmClient::new(&config.crm)?,
            config,
            client_id,
        ))
    }

    pub fn with_client(client: CrmClient, config: Arc<Config>, client_id: Secret) -> RetailCrm {
        RetailCrm {
            client,
            config,
            client_id,
            tz: OnceCell::new(),
            hooks: Hooks::none(),
        }
    }

    /// The customisation points this adapter calls.
    pub fn with_hooks(mut self, hooks: Hooks) -> RetailCrm {
        self.hooks = hooks;
        self
    }

    /// The API client underneath (the CLI's and the tests' direct calls).
    pub fn client(&self) -> &CrmClient {
        &self.client
    }

    /// Uploads calls that retailCRM should take; on a validation error, halves the batch to
    /// find the calls it refuses.
    fn upload<'a>(&'a self, calls: &'a [Call]) -> BoxFuture<'a, Vec<Delivery>> {
        async move {
            match self.client.calls_upload(calls).await {
                Ok(answer) => {
                    if !answer.duplicate_calls.is_empty() {
                        tracing::info!(
                            duplicates = answer.duplicate_calls.len(),
                            "retailCRM already had some calls of the batch"
                        );
                    }
                    // `duplicateCalls` lists the externalIds retailCRM already had.
                    calls
                        .iter()
                        .map(|c| {
                            if answer.duplicate_calls.contains(&c.external_id) {
                                Delivery::Duplicate
                            } else {
                                Delivery::Delivered
                            }
                        })
                        .collect()
                }
                Err(e @ CrmError::Validation { .. }) => {
                    if calls.len() == 1 {
                        tracing::warn!(id = %calls[0].external_id, error = %e, "call rejected by retailCRM; set aside as dead");
                        return vec![Delivery::Rejected(e.to_string())];
                    }
                    let (left, right) = calls.split_at(calls.len() / 2);
                    let mut out = self.upload(left).await;
                    if out.iter().any(|d| matches!(d, Delivery::RetryLater(_) | Delivery::Blocked(_))) {
                        // The CRM stopped taking calls: the other half waits too.
                        let why = out.iter().find_map(|d| match d {
                            Delivery::RetryLater(w) => Some(Delivery::RetryLater(w.clone())),
                            Delivery::Blocked(w) => Some(Delivery::Blocked(w.clone())),
                            _ => None,
                        });
                        out.extend(right.iter().map(|_| why.clone().unwrap_or(Delivery::RetryLater(String::new()))));
                        return out;
                    }
                    out.extend(self.upload(right).await);
                    out
                }
                Err(
                    e @ (CrmError::Auth { .. }
                    | CrmError::AccountNotFound { .. }
                    | CrmError::NotConfigured
                    | CrmError::Api { .. }),
                ) => vec![Delivery::Blocked(e.to_string()); calls.len()],
                Err(e) => vec![Delivery::RetryLater(e.to_string()); calls.len()],
            }
        }
        .boxed()
    }
}

impl CrmError {
    /// The class of a failure, as the CRM port states it.
    pub fn failure(&self) -> CrmFailure {
        let kind = match self {
            CrmError::NotConfigured => FailureKind::NotConfigured,
            CrmError::Transport { .. } | CrmError::RateLimited { .. } | CrmError::Server { .. } => {
                FailureKind::Transient
            }
            CrmError::Auth { .. } | CrmError::AccountNotFound { .. } | CrmError::Api { .. } => {
                FailureKind::Blocked
            }
            CrmError::Validation { .. }
            | CrmError::Decode { .. }
            | CrmError::TooManyCalls { .. } => FailureKind::Refused,
        };
        CrmFailure {
            kind,
            message: self.to_string(),
        }
    }
}

impl Crm for RetailCrm {
    fn name(&self) -> &'static str {
        "retailCRM"
    }

    fn url(&self) -> &str {
        self.client.base_url()
    }

    fn is_configured(&self) -> bool {
        self.client.is_configured()
    }

    fn successes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.client.successes()
    }

    fn publish<'a>(&'a self, event: &'a LiveEvent) -> BoxFuture<'a, Result<Published, CrmFailure>> {
        async move {
            let event = to_call_event(&self.config, event);
            let answer = self.client.call_event(&event).await.map_err(|e| e.failure())?;
            if !answer.not_exist_codes.is_empty() {
                tracing::warn!(codes = ?answer.not_exist_codes, "retailCRM knows no users with these extension codes");
            }
            Ok(Published::Sent)
        }
        .boxed()
    }

    fn batch_limit(&self) -> usize {
        MAX_CALLS_PER_UPLOAD
    }

    fn deliver<'a>(&'a self, calls: &'a [Finished<'a>]) -> BoxFuture<'a, Vec<Delivery>> {
        async move {
            let tz = self.timezone().await;
            let mut out: Vec<Option<Delivery>> = vec![None; calls.len()];
            let mut sendable = Vec::with_capacity(calls.len());
            let mut at = Vec::with_capacity(calls.len());
            for (i, f) in calls.iter().enumerate() {
                let call = to_call(&self.config, f.record, f.record_url, &tz);
                match call.problem() {
                    Some(why) => {
                        tracing::warn!(id = %f.record.external_id, reason = %why, "call held: retailCRM would reject it");
                        out[i] = Some(Delivery::Held(why));
                    }
                    None => {
                        sendable.push(call);
                        at.push(i);
                    }
                }
            }
            if !sendable.is_empty() {
                for (i, d) in at.into_iter().zip(self.upload(&sendable).await) {
                    out[i] = Some(d);
                }
            }
            out.into_iter()
                .map(|d| d.unwrap_or(Delivery::RetryLater("not attempted".into())))
                .collect()
        }
        .boxed()
    }

    fn shape(&self) -> String {
        // In this order since the first fingerprints were stored: another order would give
        // every dead call another try at the next start.
        let c = &self.config;
        format!(
            "{:?}|{:?}|{:?}|{}|{}|{}",
            c.users, c.external_phones, c.phone, c.crm.url, c.crm.site, c.crm.module_code
        )
    }

    fn timezone(&self) -> BoxFuture<'_, jiff::tz::TimeZone> {
        async move {
            self.tz
                .get_or_init(|| async {
                    let configured = self.config.crm.timezone.trim();
                    let name = if configured.is_empty() {
                        match self.client.settings().await {
                            Ok(s) => s.timezone().unwrap_or_default(),
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot read the CRM's time zone; using UTC (set crm.timezone)");
                                String::new()
                            }
                        }
                    } else {
                        configured.to_string()
                    };
                    if name.is_empty() {
                        return jiff::tz::TimeZone::UTC;
                    }
                    jiff::tz::TimeZone::get(&name).unwrap_or_else(|e| {
                        tracing::warn!(timezone = %name, error = %e, "unknown time zone; using UTC");
                        jiff::tz::TimeZone::UTC
                    })
                })
                .await
                .clone()
        }
        .boxed()
    }

    fn responsible<'a>(
        &'a self,
        phone: &'a str,
        ignore_status: bool,
    ) -> BoxFuture<'a, Result<Option<Responsible>, CrmFailure>> {
        async move {
            let answer = self
                .client
                .telephony_manager(phone, false, ignore_status)
                .await
                .map_err(|e| e.failure())?;
            Ok(answer.manager.map(|m| Responsible {
                code: m.code.filter(|c| !c.is_empty()),
                user_id: m.id,
            }))
        }
        .boxed()
    }

    fn directory(&self) -> Vec<DirectoryEntry> {
        self.config
            .users
            .iter()
            .map(|u| DirectoryEntry {
                user_id: i64::try_from(u.user_id).unwrap_or(i64::MAX),
                code: u.code.clone(),
            })
            .collect()
    }

    fn register(&self) -> BoxFuture<'_, Result<(), CrmFailure>> {
        async move {
            registration::register(&self.client, &self.config, &self.client_id)
                .await
                .map(|_| ())
                .map_err(|e| e.failure())
        }
        .boxed()
    }

    fn check(&self) -> BoxFuture<'_, Result<String, String>> {
        async move {
            let url = &self.config.crm.url;
            if !self.client.is_configured() {
                return Err(format!("CRM {url}: crm.api_key is empty"));
            }
            let c = self
                .client
                .credentials()
                .await
                .map_err(|e| format!("CRM {url}: {e}"))?;
            let mut granted: Vec<&str> = c.scopes.iter().map(String::as_str).collect();
            if granted.is_empty() {
                granted = c.credentials.iter().map(String::as_str).collect();
            }
            let telephony = granted.iter().any(|s| s.contains("telephony"));
            let modules = granted.iter().any(|s| s.contains("integration"));
            let mut text = format!(
                "CRM {url} reachable, key accepted; scopes: {}",
                granted.join(", ")
            );
            if !c.sites_available.is_empty() {
                text.push_str(&format!("; shops: {}", c.sites_available.join(", ")));
            }
            if telephony && modules {
                return Ok(text);
            }
            text.push_str("; missing access to");
            if !telephony {
                text.push_str(" telephony");
            }
            if !modules {
                text.push_str(" integration modules");
            }
            Err(text)
        }
        .boxed()
    }
}
