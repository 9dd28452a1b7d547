//! Kommo behind the CRM port. (Skeleton; the call life follows.)

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use super::KommoClient;
use crate::calls::LiveEvent;
use crate::config::Config;
use crate::crm::port::{
    Crm, CrmFailure, Delivery, DirectoryEntry, Finished, Published, Responsible,
};
use crate::hooks::Hooks;
use crate::store::crm_state::CrmState;

pub struct Kommo {
    client: KommoClient,
    config: Arc<Config>,
    #[allow(dead_code)]
    state: Option<CrmState>,
    #[allow(dead_code)]
    hooks: Hooks,
    origin: String,
}

impl Kommo {
    pub fn new(
        config: Arc<Config>,
        state: Option<CrmState>,
        hooks: Hooks,
    ) -> Result<Kommo, CrmFailure> {
        let client = KommoClient::new(&config, state.clone()).map_err(|e| e.failure())?;
        Ok(Kommo {
            client,
            origin: config.kommo.origin(),
            config,
            state,
            hooks,
        })
    }
}

impl Crm for Kommo {
    fn name(&self) -> &'static str {
        "Kommo"
    }

    fn url(&self) -> &str {
        &self.origin
    }

    fn is_configured(&self) -> bool {
        self.client.is_configured()
    }

    fn unconfigured(&self) -> &'static str {
        "kommo.long_lived_token is empty (or, for OAuth, kommo.client_id, client_secret, redirect_uri)"
    }

    fn successes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.client.successes()
    }

    fn publish<'a>(
        &'a self,
        _event: &'a LiveEvent,
    ) -> BoxFuture<'a, Result<Published, CrmFailure>> {
        async move { Ok(Published::Skipped) }.boxed()
    }

    fn batch_limit(&self) -> usize {
        1
    }

    fn deliver<'a>(&'a self, calls: &'a [Finished<'a>]) -> BoxFuture<'a, Vec<Delivery>> {
        async move {
            calls
                .iter()
                .map(|_| Delivery::RetryLater("not yet".into()))
                .collect()
        }
        .boxed()
    }

    fn shape(&self) -> String {
        let c = &self.config;
        format!("{:?}|{:?}|{:?}", c.users, c.phone, c.kommo.unknown_caller)
    }

    fn timezone(&self) -> BoxFuture<'_, jiff::tz::TimeZone> {
        async move { jiff::tz::TimeZone::UTC }.boxed()
    }

    fn responsible<'a>(
        &'a self,
        _phone: &'a str,
        _ignore_status: bool,
    ) -> BoxFuture<'a, Result<Option<Responsible>, CrmFailure>> {
        async move { Ok(None) }.boxed()
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
        async move { Ok(()) }.boxed()
    }

    fn check(&self) -> BoxFuture<'_, Result<String, String>> {
        async move { Err("Kommo: not yet".to_string()) }.boxed()
    }
}
