//! The journal of calls in progress (tree `live_calls`): what the call tracker knows of each
//! call that has not finished, so that a restart (SIGTERM or kill -9) resumes it instead of
//! losing it. Keys are `<source>:<call id>` (`a:` AMI Linkedid, `w:` webhook `call_id`); values
//! are the tracker's own JSON. `meta` keeps when the tracker was last alive, which bounds the
//! gap a restart recovers from Asterisk's CDR.
//!
//! Webhook answers flush the store before they say 200; the AMI journal is written and flushed
//! once a second.

use super::StoreError;

const TREE: &str = "live_calls";
const KEY_LAST_ALIVE: &[u8] = b"tracker_last_alive";

/// Cheap to clone.
#[derive(Clone)]
pub struct LiveStore {
    calls: sled::Tree,
    meta: sled::Tree,
}

impl LiveStore {
    pub(super) fn open(db: &sled::Db, meta: sled::Tree) -> Result<LiveStore, StoreError> {
        Ok(LiveStore {
            calls: db.open_tree(TREE)?,
            meta,
        })
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.calls.flush_async().await?;
        Ok(())
    }

    pub fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.calls.insert(key.as_bytes(), value)?;
        Ok(())
    }

    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.calls.remove(key.as_bytes())?;
        Ok(())
    }

    /// Every journaled call whose key starts with `prefix`, as (key without the prefix, value).
    pub fn all(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.calls
            .scan_prefix(prefix.as_bytes())
            .map(|item| {
                let (k, v) = item?;
                let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                Ok((key, v.to_vec()))
            })
            .collect()
    }

    /// Unix ms when the tracker was last known to run.
    pub fn last_alive(&self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .meta
            .get(KEY_LAST_ALIVE)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(i64::from_be_bytes))
    }

    pub fn set_last_alive(&self, at: i64) -> Result<(), StoreError> {
        self.meta.insert(KEY_LAST_ALIVE, &at.to_be_bytes())?;
        Ok(())
    }
}
