//! Bitrix24 behind the CRM port. (Skeleton; the call life follows.)

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use super::B24Client;
use crate::calls::LiveEvent;
use crate::config::Config;
use crate::crm::port::{
    Crm, CrmFailure, Delivery, DirectoryEntry, Finished, Published, Responsible,
};
use crate::hooks::Hooks;
use crate::store::crm_state::CrmState;

pub struct Bitrix24 {
    client: B24Client,
    config: Arc<Config>,
    #[allow(dead_code)]
    state: Option<CrmState>,
    #[allow(dead_code)]
    hooks: Hooks,
    portal: String,
}

impl Bitrix24 {
    pub fn new(
        config: Arc<Config>,
        state: Option<CrmState>,
        hooks: Hooks,
    ) -> Result<Bitrix24, CrmFailure> {
        let client = B24Client::new(&config, state.clone()).map_err(|e| e.failure())?;
        Ok(Bitrix24 {
            client,
            portal: config.bitrix24.portal_origin(),
            config,
            state,
            hooks,
        })
    }
}

impl Crm for Bitrix24 {
    fn name(&self) -> &'static str {
        "Bitrix24"
    }

    fn url(&self) -> &str {
        &self.portal
    }

    fn is_configured(&self) -> bool {
        self.client.is_configured()
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
        10
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
        format!(
            "{:?}|{:?}|{:?}",
            c.users, c.phone, c.bitrix24.default_user_id
        )
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
        Vec::new()
    }

    fn register(&self) -> BoxFuture<'_, Result<(), CrmFailure>> {
        async move { Ok(()) }.boxed()
    }

    fn check(&self) -> BoxFuture<'_, Result<String, String>> {
        async move { Err("Bitrix24: not yet".to_string()) }.boxed()
    }
}
