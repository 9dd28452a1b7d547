//! Which Bitrix24 user has which extension: `user.get` (`UF_PHONE_INNER`, active users only),
//! overridden by `[[users]]`. The last snapshot the portal gave is kept in the adapter's state,
//! so a restart during an outage still knows the managers; a failed or empty reload never
//! replaces a good snapshot (one failed `user.get` must not hide every manager).

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{B24Client, B24Error};
use crate::config::UserCode;
use crate::store::crm_state::CrmState;

const STATE_KEY: &str = "bitrix24:users";
/// Most pages of 50 users read in one reload.
const MAX_PAGES: u64 = 200;
/// An unknown extension asks for a reload at most this often.
const ON_DEMAND_EVERY: Duration = Duration::from_secs(60);

pub struct Directory {
    /// From `[[users]]`: extension → user; wins over the portal.
    overrides: BTreeMap<String, i64>,
    /// From the portal: extension → user.
    portal: RwLock<BTreeMap<String, i64>>,
    loaded: RwLock<Option<Instant>>,
    asked: RwLock<Option<Instant>>,
    state: Option<CrmState>,
}

impl Directory {
    pub fn new(users: &[UserCode], state: Option<CrmState>) -> Directory {
        let overrides = users
            .iter()
            .map(|u| (u.code.clone(), i64::try_from(u.user_id).unwrap_or(i64::MAX)))
            .collect();
        let saved: BTreeMap<String, i64> = state
            .as_ref()
            .and_then(|s| s.get(STATE_KEY).ok().flatten())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Directory {
            overrides,
            portal: RwLock::new(saved),
            loaded: RwLock::new(None),
            asked: RwLock::new(None),
            state,
        }
    }

    /// The user of an extension.
    pub fn user_of(&self, code: &str) -> Option<i64> {
        if let Some(u) = self.overrides.get(code) {
            return Some(*u);
        }
        read(&self.portal).get(code).copied()
    }

    /// The extension of a user.
    pub fn code_of(&self, user_id: i64) -> Option<String> {
        if let Some((c, _)) = self.overrides.iter().find(|(_, u)| **u == user_id) {
            return Some(c.clone());
        }
        let portal = read(&self.portal);
        let found = portal.iter().find(|(_, u)| **u == user_id);
        found.map(|(c, _)| c.clone())
    }

    /// Every (user, extension), overrides first.
    pub fn entries(&self) -> Vec<(i64, String)> {
        let mut out: Vec<(i64, String)> = self
            .overrides
            .iter()
            .map(|(c, u)| (*u, c.clone()))
            .collect();
        for (c, u) in read(&self.portal).iter() {
            if !self.overrides.contains_key(c) {
                out.push((*u, c.clone()));
            }
        }
        out
    }

    /// Never loaded from the portal since start (a snapshot from the store may be in use).
    pub fn never_loaded(&self) -> bool {
        read(&self.loaded).is_none()
    }

    /// Whether a reload is due (never loaded, or older than `every`).
    pub fn stale(&self, every: Duration) -> bool {
        read(&self.loaded).is_none_or(|at| at.elapsed() >= every)
    }

    /// An extension nobody has: worth a reload, at most once a minute.
    pub fn ask_reload(&self) -> bool {
        let mut asked = self.asked.write().unwrap_or_else(|p| p.into_inner());
        if asked.is_some_and(|at| at.elapsed() < ON_DEMAND_EVERY) {
            return false;
        }
        *asked = Some(Instant::now());
        true
    }

    /// Reads every active user with an extension; returns how many.
    pub async fn reload(&self, client: &B24Client) -> Result<usize, B24Error> {
        let mut found = BTreeMap::new();
        let mut start = 0u64;
        for _ in 0..MAX_PAGES {
            let page = client
                .call_page(
                    "user.get",
                    json!({"FILTER": {"ACTIVE": true}, "start": start}),
                )
                .await?;
            for u in page.result.as_array().into_iter().flatten() {
                if let (Some(id), Some(code)) = (id_of(&u["ID"]), extension(u)) {
                    found.entry(code).or_insert(id);
                }
            }
            match page.next {
                Some(n) if n > start => start = n,
                _ => break,
            }
        }
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let n = found.len();
        if found.is_empty() && !read(&self.portal).is_empty() {
            tracing::warn!("Bitrix24 lists no active user with an extension (UF_PHONE_INNER); keeping the previous list");
            return Ok(0);
        }
        if let Some(state) = &self.state {
            if let Ok(bytes) = serde_json::to_vec(&found) {
                let _ = state.put(STATE_KEY, &bytes);
            }
        }
        *self.portal.write().unwrap_or_else(|p| p.into_inner()) = found;
        tracing::info!(users = n, "Bitrix24 user directory loaded");
        Ok(n)
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

/// Bitrix24 ids come as strings or numbers.
pub fn id_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|id| *id > 0)
}

fn extension(u: &Value) -> Option<String> {
    if u["ACTIVE"] == Value::Bool(false) || u["ACTIVE"] == "N" {
        return None;
    }
    let code = match &u["UF_PHONE_INNER"] {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    (!code.is_empty() && code.len() <= 32).then_some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_and_ids_parse_from_strings() {
        let d = Directory::new(
            &[UserCode {
                user_id: 7,
                code: "101".into(),
            }],
            None,
        );
        d.portal
            .write()
            .unwrap()
            .extend([("101".to_string(), 11), ("102".to_string(), 12)]);
        assert_eq!(d.user_of("101"), Some(7));
        assert_eq!(d.user_of("102"), Some(12));
        assert_eq!(d.code_of(12).as_deref(), Some("102"));
        assert_eq!(id_of(&json!("15")), Some(15));
        assert_eq!(id_of(&json!(0)), None);
        assert_eq!(
            extension(&json!({"ACTIVE": true, "UF_PHONE_INNER": "103"})).as_deref(),
            Some("103")
        );
        assert_eq!(
            extension(&json!({"ACTIVE": false, "UF_PHONE_INNER": "104"})),
            None
        );
    }
}
