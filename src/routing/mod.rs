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
//!
//! Customisation points (see [`Hooks`]):
//! - `process_client_phone` rewrites the caller's number before `telephony/manager` carries it
//!   (once per lookup; the cache stays keyed by the number as the PBX gave it);
//! - `customize_autodistribution` sees every answer, static, cached, fresh or fallback (its
//!   decision may depend on the time of day, so a cached answer is no reason to skip it), and
//!   may give another extension (`number`), nobody (an empty string or null: the fallback) or a
//!   caller-id name (`name`, at most [`MAX_ROUTE_NAME`] characters). Its time counts against
//!   `routing.timeout`, measured from the request: when the deadline passes first, or the hook
//!   fails, routing's own answer stands (the fallback when the CRM was what ran out the time).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use regex::Regex;
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::base::ident::ExtensionCode;
use crate::config::{Config, RoutingConfig};
use crate::crm::Crm;
use crate::hooks::phone_points::client_phone;
use crate::hooks::{FieldKind, HookResult, Hooks, Stage};
use crate::phone::{anchored, any_variant_matches, Number, PhoneBook};
use crate::store::Store;

pub const CUSTOMIZE_AUTODISTRIBUTION: &str = "customize_autodistribution";
/// Longest caller-id name a hook may give (what phones show; longer names are cut).
pub const MAX_ROUTE_NAME: usize = 20;

const AUTODISTRIBUTION: &[(&str, FieldKind)] = &[
    ("number", FieldKind::OptString),
    ("name", FieldKind::OptString),
];

/// The fallback reasons that mean the lookup itself failed (`error` at the hook).
/// Why a route is the fallback: the texts of [`Route::reason`], for callers that tell the
/// cases apart (the CallGate API answers `[]` for nobody, `no_internal_numbers` for a manager
/// without an extension).
pub mod reason {
    pub const NO_NUMBER: &str = "no customer number";
    pub const EMPLOYEE_MOBILE: &str = "an employee's mobile";
    pub const NOBODY: &str = "no responsible manager";
    pub const NOBODY_CACHED: &str = "no responsible manager (cached)";
    pub const HOOK_NOBODY: &str = "the hook chose nobody";
    pub const NO_EXTENSION: &str = "the manager has no extension";
    /// Every reason meaning that nobody is responsible for the number.
    pub const NOBODY_AT_ALL: &[&str] = &[
        NOBODY,
        NOBODY_CACHED,
        NO_NUMBER,
        EMPLOYEE_MOBILE,
        HOOK_NOBODY,
    ];
}

const LOOKUP_FAILED: &str = "the CRM lookup failed";
const LOOKUP_LATE: &str = "the CRM did not answer in time";
const NO_API_KEY: &str = "crm.api_key is empty";

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Static,
    Crm,
    Cache,
    Fallback,
    /// `customize_autodistribution` chose the extension.
    Hook,
}

impl Source {
    /// Every source, in declaration order (`source as usize` indexes it).
    pub const ALL: [Source; 5] = [
        Source::Static,
        Source::Crm,
        Source::Cache,
        Source::Fallback,
        Source::Hook,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Static => "static",
            Source::Crm => "crm",
            Source::Cache => "cache",
            Source::Fallback => "fallback",
            Source::Hook => "hook",
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
    /// A caller-id name for the extension's phone (given by `customize_autodistribution`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
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
    /// Answers `customize_autodistribution` changed.
    pub hook_changes: AtomicU64,
    /// Hook calls cut off by `routing.timeout` (routing's own answer was given).
    pub hook_late: AtomicU64,
    /// How long lookups took, by the answer's source (indexed by `source as usize`).
    #[serde(skip)]
    pub latency: [crate::base::latency::Histogram; Source::ALL.len()],
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
    hooks: Hooks,
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
        hooks: Hooks,
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
                hooks,
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
    /// `routing.timeout` (plus local work), hooks included.
    pub async fn route(&self, phone: &str, did: Option<&str>) -> Route {
        let started = Instant::now();
        let inner = &self.inner;
        inner.stats.requests.fetch_add(1, Ordering::Relaxed);
        let number = inner.phones.normalize(phone, None);
        let did = did.map(|d| inner.phones.normalize(d, None));
        let route = self.decide(&number, did.as_ref()).await;
        let route = self.customize(route, &number, did.as_ref(), started).await;
        if route.source == Source::Fallback {
            inner.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        inner.stats.latency[route.source as usize].observe(started.elapsed());
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
                name: None,
            };
        }
        if !number.is_external() {
            return self.fallback(reason::NO_NUMBER, None);
        }
        if inner.phones.fmc(number).is_some() {
            return self.fallback(reason::EMPLOYEE_MOBILE, None);
        }
        let key = number.canonical.clone();
        if let Some(hit) = self.cache_get(&key) {
            inner.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return match hit {
                Some(m) => self.to_route(m, Source::Cache),
                None => self.fallback(reason::NOBODY_CACHED, None),
            };
        }
        if !inner.crm.is_configured() {
            return self.fallback(NO_API_KEY, None);
        }
        let mut rx = self.lookup(key);
        let deadline = inner.config.routing.timeout;
        let answer = match tokio::time::timeout(deadline, rx.wait_for(Option::is_some)).await {
            Ok(Ok(answer)) => answer.clone(),
            Ok(Err(_)) => Some(Lookup::Failed),
            Err(_) => return self.fallback(LOOKUP_LATE, None),
        };
        match answer {
            Some(Lookup::Found(m)) => self.to_route(m, Source::Crm),
            Some(Lookup::Nobody) => self.fallback(reason::NOBODY, None),
            Some(Lookup::Failed) | None => self.fallback(LOOKUP_FAILED, None),
        }
    }

    /// `customize_autodistribution`: routing's answer as the hook leaves it, within what
    /// remains of `routing.timeout` since `started`.
    async fn customize(
        &self,
        route: Route,
        number: &Number,
        did: Option<&Number>,
        started: Instant,
    ) -> Route {
        let inner = &self.inner;
        if !inner.hooks.is_configured(CUSTOMIZE_AUTODISTRIBUTION) {
            return route;
        }
        static LATE_LOG: crate::telemetry::RateLimit =
            crate::telemetry::RateLimit::new(Duration::from_secs(10));
        let late = || {
            inner.stats.hook_late.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = LATE_LOG.check() {
                tracing::warn!(
                    hook = CUSTOMIZE_AUTODISTRIBUTION,
                    suppressed,
                    "no answer from the hook within routing.timeout: routing's answer is given"
                );
            }
        };
        let left = inner
            .config
            .routing
            .timeout
            .saturating_sub(started.elapsed());
        if left.is_zero() {
            late();
            return route;
        }
        let input = autodistribution_input(&route, number, did);
        let call = inner
            .hooks
            .call(CUSTOMIZE_AUTODISTRIBUTION, input, AUTODISTRIBUTION);
        let data = match tokio::time::timeout(left, call).await {
            Ok(HookResult::Changed(data)) => data,
            Ok(_) => return route,
            Err(_) => {
                late();
                return route;
            }
        };
        let customized = self.apply_autodistribution(route.clone(), &data);
        if customized != route {
            inner.stats.hook_changes.fetch_add(1, Ordering::Relaxed);
        }
        customized
    }

    /// What `customize_autodistribution` answered, checked, applied to `route`.
    fn apply_autodistribution(&self, mut route: Route, data: &Map<String, Value>) -> Route {
        let chosen = chosen_code(&route).map(str::to_string);
        if let Some(value) = data.get("number") {
            let code = value.as_str().map(str::trim).unwrap_or_default();
            if code.is_empty() {
                if route.source != Source::Fallback {
                    route = self.fallback(reason::HOOK_NOBODY, None);
                }
            } else if !ExtensionCode::is_valid(code) {
                tracing::warn!(
                    hook = CUSTOMIZE_AUTODISTRIBUTION,
                    "number {}; routing's answer kept",
                    ExtensionCode::RULE
                );
            } else if chosen.as_deref() != Some(code) {
                route = Route {
                    code: Some(code.to_string()),
                    user_id: None,
                    source: Source::Hook,
                    manager_status: None,
                    reason: None,
                    name: None,
                };
            }
        }
        if let Some(value) = data.get("name") {
            route.name = value.as_str().and_then(route_name);
        }
        route
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
            name: None,
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
                name: None,
            },
            None => {
                let mut r = self.fallback(reason::NO_EXTENSION, status);
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
            let asked = client_phone(
                &inner.hooks,
                &key,
                &Value::Null,
                Stage::ConversationRequested,
            )
            .await;
            let answer = match inner
                .crm
                .responsible(&asked, inner.config.routing.ignore_status)
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

/// The extension routing chose itself (none when it fell back).
fn chosen_code(route: &Route) -> Option<&str> {
    match route.source {
        Source::Fallback => None,
        _ => route.code.as_deref(),
    }
}

/// `customize_autodistribution`'s input: what routing decided and what it knew.
fn autodistribution_input(route: &Route, number: &Number, did: Option<&Number>) -> Value {
    let chosen = chosen_code(route);
    let user = match (route.user_id, chosen) {
        (None, None) => Value::Null,
        (id, code) => json!({"id": id, "code": code}),
    };
    let error = route
        .reason
        .filter(|r| [LOOKUP_FAILED, LOOKUP_LATE, NO_API_KEY].contains(r))
        .unwrap_or_default();
    json!({
        "call_full": null,
        "call_stage": Stage::ConversationRequested.as_str(),
        "number": chosen.unwrap_or_default(),
        "name": "",
        "from": number.canonical,
        "did": did.map(|d| d.canonical.as_str()).unwrap_or_default(),
        "source": route.source.as_str(),
        "user": user,
        "entity": null,
        "error": error,
    })
}

/// A caller-id name as a hook gave it: one line, trimmed, at most [`MAX_ROUTE_NAME`]
/// characters (longer is cut); empty is none.
fn route_name(name: &str) -> Option<String> {
    let clean: String = name
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let clean = clean.trim();
    if clean.chars().count() > MAX_ROUTE_NAME {
        tracing::warn!(
            hook = CUSTOMIZE_AUTODISTRIBUTION,
            "name longer than {MAX_ROUTE_NAME} characters; cut"
        );
    }
    let cut: String = clean.chars().take(MAX_ROUTE_NAME).collect();
    let cut = cut.trim_end();
    (!cut.is_empty()).then(|| cut.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_names_are_one_line_and_cut() {
        assert_eq!(route_name("  VIP  "), Some("VIP".into()));
        assert_eq!(route_name("a\nb"), Some("a b".into()));
        assert_eq!(route_name("   "), None);
        assert_eq!(
            route_name("Очень важный клиент номер один"),
            Some("Очень важный клиент".into())
        );
        assert_eq!(route_name(&"x".repeat(25)), Some("x".repeat(20)));
    }
}
