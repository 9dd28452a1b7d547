//! Routing of incoming calls to the customer's responsible manager.
//!
//! The dialplan asks (HTTP `GET /pbx/route` through `CURL()`, or FastAGI, see [`agi`]) while the
//! caller waits, so an answer is always given within `routing.timeout`:
//! 1. `[[routing.static]]` entries (caller or DID patterns) answer first;
//! 2. a caller that is no customer (anonymous, internal, an employee's mobile) gets the fallback;
//! 3. the cache, per canonical number: managers for `cache_ttl`, "nobody" for
//!    `negative_cache_ttl`;
//! 4. `GET telephony/manager` with a hard deadline; a late answer still fills the cache, and
//!    concurrent lookups of one number share one request;
//! 5. a manager whose stored status (`changeUserStatusUrl`) is in `skip_statuses` is passed over.
//!
//! Anything else (CRM down, slow, no API key, a manager without an extension) answers
//! `routing.fallback_code`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use regex::Regex;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::base::ident::ExtensionCode;
use crate::config::{Config, RoutingConfig};
use crate::crm::Crm;
use crate::phone::{anchored, any_variant_matches, Number, PhoneBook};
use crate::store::Store;

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Static,
    Crm,
    Cache,
    Fallback,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Static => "static",
            Source::Crm => "crm",
            Source::Cache => "cache",
            Source::Fallback => "fallback",
        }
    }
}

/// The answer to "who should take this call".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// The extension to ring; `None` when there is no decision and no fallback.
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<i64>,
    pub source: Source,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manager_status: Option<String>,
    /// Why the fallback was answered (for logs and the JSON form).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

/// A manager as the CRM named him.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Manager {
    code: Option<String>,
    user_id: Option<i64>,
}

#[derive(Debug, Clone)]
enum Lookup {
    Found(Manager),
    Nobody,
    Failed,
}

struct Cached {
    manager: Option<Manager>,
    expires: Instant,
}

struct StaticEntry {
    phone: Vec<Regex>,
    did: Vec<Regex>,
    code: String,
}

/// Counters for `/ready` and the benchmark.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteStats {
    pub requests: AtomicU64,
    pub static_hits: AtomicU64,
    pub cache_hits: AtomicU64,
    pub crm_lookups: AtomicU64,
    pub crm_answers: AtomicU64,
    pub crm_failures: AtomicU64,
    pub late_answers: AtomicU64,
    pub fallbacks: AtomicU64,
}

#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    crm: Arc<dyn Crm>,
    store: Store,
    phones: Arc<PhoneBook>,
    statics: Vec<StaticEntry>,
    cache: Mutex<HashMap<String, Cached>>,
    inflight: Mutex<HashMap<String, watch::Receiver<Option<Lookup>>>>,
    stats: RouteStats,
    /// Told every answer: a missed call is credited to the manager routing chose.
    listener: std::sync::OnceLock<Arc<dyn RouteListener>>,
}

/// Who wants to know each extension routing chose (the call tracker: a missed call is credited
/// to the manager the caller was routed to).
pub trait RouteListener: Send + Sync + 'static {
    /// Never waits.
    fn routed(&self, phone: &str, code: &str);
}

/// Reports invalid `[routing]` values, naming the key.
pub fn check_config(c: &RoutingConfig, problems: &mut Vec<String>) {
    if !c.fallback_code.is_empty() && !ExtensionCode::is_valid(&c.fallback_code) {
        problems.push(format!("routing.fallback_code: {}", ExtensionCode::RULE));
    }
    for (i, s) in c.r#static.iter().enumerate() {
        if !ExtensionCode::is_valid(&s.code) {
            problems.push(format!("routing.static[{i}].code: {}", ExtensionCode::RULE));
        }
        if s.phone.is_empty() && s.did.is_empty() {
            problems.push(format!(
                "routing.static[{i}]: needs a phone or a did pattern"
            ));
        }
        for (key, list) in [("phone", &s.phone), ("did", &s.did)] {
            for (j, p) in list.iter().enumerate() {
                if let Err(e) = anchored(p) {
                    problems.push(format!(
                        "routing.static[{i}].{key}[{j}]: invalid pattern {p:?}: {e}"
                    ));
                }
            }
        }
    }
}

impl Router {
    pub fn new(
        config: Arc<Config>,
        crm: Arc<dyn Crm>,
        store: Store,
        phones: Arc<PhoneBook>,
    ) -> Router {
        let statics = config
            .routing
            .r#static
            .iter()
            .map(|s| StaticEntry {
                phone: s.phone.iter().filter_map(|p| anchored(p).ok()).collect(),
                did: s.did.iter().filter_map(|p| anchored(p).ok()).collect(),
                code: s.code.clone(),
            })
            .collect();
        Router {
            inner: Arc::new(Inner {
                config,
                crm,
                store,
                phones,
                statics,
                cache: Mutex::new(HashMap::new()),
                inflight: Mutex::new(HashMap::new()),
                stats: RouteStats::default(),
                listener: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Tells `listener` (the call tracker, for crediting missed calls) every extension chosen.
    pub fn report_to(&self, listener: Arc<dyn RouteListener>) {
        let _ = self.inner.listener.set(listener);
    }

    pub fn stats(&self) -> &RouteStats {
        &self.inner.stats
    }

    /// Numbers in the cache (fresh or not yet evicted).
    pub fn cached(&self) -> usize {
        lock(&self.inner.cache).len()
    }

    /// Who should answer a call from `phone` to `did`. Never takes longer than
    /// `routing.timeout` (plus local work).
    pub async fn route(&self, phone: &str, did: Option<&str>) -> Route {
        let inner = &self.inner;
        inner.stats.requests.fetch_add(1, Ordering::Relaxed);
        let number = inner.phones.normalize(phone, None);
        let did = did.map(|d| inner.phones.normalize(d, None));
        let route = self.decide(&number, did.as_ref()).await;
        if route.source == Source::Fallback {
            inner.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        if let (Some(listener), Some(code)) = (inner.listener.get(), &route.code) {
            listener.routed(phone, code);
        }
        tracing::debug!(phone = %crate::base::ident::mask_number(&number.canonical), source = route.source.as_str(),
            code = ?route.code, reason = ?route.reason, "route");
        route
    }

    async fn decide(&self, number: &Number, did: Option<&Number>) -> Route {
        let inner = &self.inner;
        if let Some(code) = self.static_route(number, did) {
            inner.stats.static_hits.fetch_add(1, Ordering::Relaxed);
            return Route {
                code: Some(code),
                user_id: None,
                source: Source::Static,
                manager_status: None,
                reason: None,
            };
        }
        if !number.is_external() {
            return self.fallback("no customer number", None);
        }
        if inner.phones.fmc(number).is_some() {
            return self.fallback("an employee's mobile", None);
        }
        let key = number.canonical.clone();
        if let Some(hit) = self.cache_get(&key) {
            inner.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return match hit {
                Some(m) => self.to_route(m, Source::Cache),
                None => self.fallback("no responsible manager (cached)", None),
            };
        }
        if !inner.crm.is_configured() {
            return self.fallback("crm.api_key is empty", None);
        }
        let mut rx = self.lookup(key);
        let deadline = inner.config.routing.timeout;
        let answer = match tokio::time::timeout(deadline, rx.wait_for(Option::is_some)).await {
            Ok(Ok(answer)) => answer.clone(),
            Ok(Err(_)) => Some(Lookup::Failed),
            Err(_) => return self.fallback("the CRM did not answer in time", None),
        };
        match answer {
            Some(Lookup::Found(m)) => self.to_route(m, Source::Crm),
            Some(Lookup::Nobody) => self.fallback("no responsible manager", None),
            Some(Lookup::Failed) | None => self.fallback("the CRM lookup failed", None),
        }
    }

    fn static_route(&self, number: &Number, did: Option<&Number>) -> Option<String> {
        self.inner
            .statics
            .iter()
            .find(|s| {
                let phone_ok =
                    s.phone.is_empty() || s.phone.iter().any(|p| any_variant_matches(p, number));
                let did_ok = s.did.is_empty()
                    || did.is_some_and(|d| s.did.iter().any(|p| any_variant_matches(p, d)));
                phone_ok && did_ok
            })
            .map(|s| s.code.clone())
    }

    fn fallback(&self, reason: &'static str, status: Option<String>) -> Route {
        let code = &self.inner.config.routing.fallback_code;
        Route {
            code: Some(code.clone()).filter(|c| !c.is_empty()),
            user_id: None,
            source: Source::Fallback,
            manager_status: status,
            reason: Some(reason),
        }
    }

    /// A manager the CRM named, checked against what we know locally.
    fn to_route(&self, m: Manager, source: Source) -> Route {
        let config = &self.inner.config;
        let status = m
            .user_id
            .and_then(|id| match self.inner.store.user_status(id) {
                Ok(s) => s.map(|s| s.status.as_str().to_string()),
                Err(e) => {
                    tracing::warn!(error = %e, "routing: cannot read the manager's stored status");
                    None
                }
            });
        if let Some(s) = &status {
            if config.routing.skip_statuses.iter().any(|k| k == s) {
                let mut r = self.fallback("the manager is away", Some(s.clone()));
                r.user_id = m.user_id;
                return r;
            }
        }
        // A manager without an extension in the CRM may still have one in the directory
        // (`[[users]]` for retailCRM).
        let code = m.code.filter(|c| ExtensionCode::is_valid(c)).or_else(|| {
            let id = m.user_id?;
            self.inner
                .crm
                .directory()
                .into_iter()
                .find(|u| u.user_id == id)
                .map(|u| u.code)
        });
        match code {
            Some(code) => Route {
                code: Some(code),
                user_id: m.user_id,
                source,
                manager_status: status,
                reason: None,
            },
            None => {
                let mut r = self.fallback("the manager has no extension", status);
                r.user_id = m.user_id;
                r
            }
        }
    }

    fn cache_get(&self, key: &str) -> Option<Option<Manager>> {
        let cache = lock(&self.inner.cache);
        let c = cache.get(key)?;
        (c.expires > Instant::now()).then(|| c.manager.clone())
    }

    fn cache_put(&self, key: String, manager: Option<Manager>) {
        let r = &self.inner.config.routing;
        let ttl = if manager.is_some() {
            r.cache_ttl
        } else {
            r.negative_cache_ttl
        };
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = lock(&self.inner.cache);
        if cache.len() >= r.cache_max && !cache.contains_key(&key) {
            cache.retain(|_, c| c.expires > now);
            if cache.len() >= r.cache_max {
                // Still full of fresh entries: make room for the newest.
                if let Some(victim) = cache.keys().next().cloned() {
                    cache.remove(&victim);
                }
            }
        }
        cache.insert(
            key,
            Cached {
                manager,
                expires: now + ttl,
            },
        );
    }

    /// Joins the lookup in flight for `key`, or starts one in the background (it runs to the
    /// end even when every caller has given up, so that its answer fills the cache).
    fn lookup(&self, key: String) -> watch::Receiver<Option<Lookup>> {
        let mut inflight = lock(&self.inner.inflight);
        if let Some(rx) = inflight.get(&key) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert(key.clone(), rx.clone());
        drop(inflight);
        let this = self.clone();
        tokio::spawn(async move {
            let inner = &this.inner;
            inner.stats.crm_lookups.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let answer = match inner
                .crm
                .responsible(&key, inner.config.routing.ignore_status)
                .await
            {
                Ok(r) => {
                    inner.stats.crm_answers.fetch_add(1, Ordering::Relaxed);
                    let manager = r.map(|m| Manager {
                        code: m.code,
                        user_id: m.user_id,
                    });
                    this.cache_put(key.clone(), manager.clone());
                    match manager {
                        Some(m) => Lookup::Found(m),
                        None => Lookup::Nobody,
                    }
                }
                Err(e) => {
                    inner.stats.crm_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "routing: telephony/manager failed");
                    Lookup::Failed
                }
            };
            if started.elapsed() > inner.config.routing.timeout {
                inner.stats.late_answers.fetch_add(1, Ordering::Relaxed);
            }
            lock(&inner.inflight).remove(&key);
            let _ = tx.send(Some(answer));
        });
        rx
    }

    /// Waits until no lookup is in flight (tests, shutdown).
    pub async fn idle(&self) {
        loop {
            let pending: Vec<_> = lock(&self.inner.inflight).values().cloned().collect();
            if pending.is_empty() {
                return;
            }
            for mut rx in pending {
                let _ = rx.wait_for(Option::is_some).await;
            }
            tokio::task::yield_now().await;
        }
    }

    pub fn timeout(&self) -> Duration {
        self.inner.config.routing.timeout
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
