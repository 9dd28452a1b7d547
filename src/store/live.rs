//! The journal of calls in progress (tree `live_calls`): what the call tracker knows of each
//! call that has not finished, so that a restart (SIGTERM or kill -9) resumes it instead of
//! losing it. Keys are `<source>:<call id>` (`a:` AMI Linkedid, `w:` webhook `call_id`); values
//! are the tracker's own JSON. `meta` keeps when the tracker was last alive, which bounds the
//! gap a restart recovers from Asterisk's CDR.
//!
//! Webhook answers flush the store before they say 200; the AMI journal is written and flushed
//! once a second.

use super::keyed::Keyed;
use super::StoreError;

const TREE: &str = "live_calls";
const KEY_LAST_ALIVE: &[u8] = b"tracker_last_alive";

/// Cheap to clone. The journal itself is a [`Keyed`] tree (`put`, `remove`, `all`, `flush`).
#[derive(Clone)]
pub struct LiveStore {
    calls: Keyed,
    meta: sled::Tree,
}

impl std::ops::Deref for LiveStore {
    type Target = Keyed;

    fn deref(&self) -> &Keyed {
        &self.calls
    }
}

impl LiveStore {
    pub(super) fn open(db: &sled::Db, meta: sled::Tree) -> Result<LiveStore, StoreError> {
        Ok(LiveStore {
            calls: Keyed::open(db, TREE)?,
            meta,
        })
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
