//! Persistence of recording links (sled trees, hidden from the rest of the code).
//!
//! Trees: `record_links` (random link id → [`LinkEntry`]) and `record_links_by_call`
//! (externalId → link id). A call has at most one link, so the URL uploaded for it stays the same
//! when the upload is repeated (after a crash, a retry, an operator's `outbox retry`).

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::StoreError;

/// Length of a link id (random bytes).
pub const LINK_ID_LEN: usize = 16;
pub type LinkId = [u8; LINK_ID_LEN];

/// What a link points at. Paths are canonical (symlinks resolved) when the link is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkEntry {
    #[serde(default = "v1")]
    pub v: u32,
    /// The call's externalId.
    pub call_id: String,
    /// The recording as Asterisk wrote it (what the link's MAC covers).
    pub path: String,
    /// A converted copy served instead of `path`, if the conversion succeeded before the link was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<String>,
    /// Extension of the served format (`mp3`, `wav`, `ogg`, ...), the URL's suffix.
    pub ext: String,
    /// The `Content-Disposition` file name.
    pub filename: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds after which the link answers 410; 0 = never.
    pub expires_at: u64,
    /// Unix milliseconds: the call's start (for `records.keep_days`).
    pub call_start: i64,
}

fn v1() -> u32 {
    1
}

/// Cheap to clone.
#[derive(Clone)]
pub struct LinkStore {
    db: sled::Db,
    links: sled::Tree,
    by_call: sled::Tree,
}

fn encode(entry: &LinkEntry) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(entry).map_err(|source| StoreError::Decode {
        key: "record_links".into(),
        source,
    })
}

fn decode(bytes: &[u8]) -> Result<LinkEntry, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        key: "record_links".into(),
        source,
    })
}

fn link_id(bytes: &[u8]) -> Option<LinkId> {
    bytes.try_into().ok()
}

impl LinkStore {
    pub(super) fn open(db: &sled::Db) -> Result<LinkStore, StoreError> {
        Ok(LinkStore {
            db: db.clone(),
            links: db.open_tree("record_links")?,
            by_call: db.open_tree("record_links_by_call")?,
        })
    }

    pub fn get(&self, id: &LinkId) -> Result<Option<LinkEntry>, StoreError> {
        self.links.get(id)?.map(|v| decode(&v)).transpose()
    }

    /// The link of a call, if it has one.
    pub fn for_call(&self, call_id: &str) -> Result<Option<(LinkId, LinkEntry)>, StoreError> {
        let Some(id) = self
            .by_call
            .get(call_id.as_bytes())?
            .and_then(|v| link_id(&v))
        else {
            return Ok(None);
        };
        Ok(self.get(&id)?.map(|e| (id, e)))
    }

    /// Stores a link for `entry.call_id` unless the call has one already (then that one is
    /// returned, and `false`). Not flushed: call [`LinkStore::flush`] before handing it out.
    pub fn insert(
        &self,
        id: LinkId,
        entry: &LinkEntry,
    ) -> Result<(LinkId, LinkEntry, bool), StoreError> {
        let bytes = encode(entry)?;
        let existing = (&self.links, &self.by_call)
            .transaction(|(links, by_call)| {
                if let Some(old) = by_call.get(entry.call_id.as_bytes())? {
                    if let Some(old_id) = link_id(&old) {
                        if let Some(old_entry) = links.get(old_id)? {
                            return Ok(Some((old_id, old_entry)));
                        }
                    }
                }
                links.insert(&id, bytes.as_slice())?;
                by_call.insert(entry.call_id.as_bytes(), &id)?;
                Ok::<_, ConflictableTransactionError<StoreError>>(None)
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => StoreError::Sled(e),
            })?;
        match existing {
            Some((old_id, old)) => Ok((old_id, decode(&old)?, false)),
            None => Ok((id, entry.clone(), true)),
        }
    }

    /// Makes the links stored so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Deletes the links `expired` selects; returns them (their converted copies can go too).
    pub fn purge(
        &self,
        mut expired: impl FnMut(&LinkEntry) -> bool,
    ) -> Result<Vec<LinkEntry>, StoreError> {
        let mut purged = Vec::new();
        for item in self.links.iter() {
            let (key, value) = item?;
            let entry = match decode(&value) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, "unreadable recording link skipped");
                    continue;
                }
            };
            if !expired(&entry) {
                continue;
            }
            (&self.links, &self.by_call)
                .transaction(|(links, by_call)| {
                    links.remove(&key)?;
                    if by_call
                        .get(entry.call_id.as_bytes())?
                        .is_some_and(|id| id == key)
                    {
                        by_call.remove(entry.call_id.as_bytes())?;
                    }
                    Ok::<_, ConflictableTransactionError<StoreError>>(())
                })
                .map_err(|e| match e {
                    TransactionError::Abort(e) => e,
                    TransactionError::Storage(e) => StoreError::Sled(e),
                })?;
            purged.push(entry);
        }
        Ok(purged)
    }

    /// How many links exist (walks the tree: for the operator's view, not hot paths).
    pub fn count(&self) -> usize {
        self.links.len()
    }

    /// Stores `bytes` as the entry of link `id` for `call_id`, as a damaged store would hold it.
    #[cfg(test)]
    pub(crate) fn insert_raw(&self, id: LinkId, call_id: &str, bytes: &[u8]) {
        self.links.insert(id, bytes).unwrap();
        self.by_call.insert(call_id.as_bytes(), &id).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn entry(call: &str, expires_at: u64) -> LinkEntry {
        LinkEntry {
            v: 1,
            call_id: call.into(),
            path: format!("/rec/{call}.wav"),
            served: None,
            ext: "wav".into(),
            filename: "x.wav".into(),
            created_at: 1,
            expires_at,
            call_start: 0,
        }
    }

    #[tokio::test]
    async fn one_link_per_call_survives_reopen_and_purge_drops_both_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let links = Store::open(&path).unwrap().records().unwrap();
            let (id, _, created) = links.insert([1; 16], &entry("c1", 10)).unwrap();
            assert!(created);
            assert_eq!(id, [1; 16]);
            // A second insert for the same call returns the first link.
            let (id, e, created) = links.insert([2; 16], &entry("c1", 99)).unwrap();
            assert!(!created);
            assert_eq!((id, e.expires_at), ([1; 16], 10));
            links.insert([3; 16], &entry("c2", 20)).unwrap();
            links.flush().await.unwrap();
        }
        let links = Store::open(&path).unwrap().records().unwrap();
        assert_eq!(links.for_call("c1").unwrap().unwrap().0, [1; 16]);
        assert_eq!(links.count(), 2);
        let purged = links.purge(|e| e.expires_at < 15).unwrap();
        assert_eq!(purged.len(), 1);
        assert!(links.for_call("c1").unwrap().is_none());
        assert!(links.get(&[1; 16]).unwrap().is_none());
        assert!(links.get(&[3; 16]).unwrap().is_some());
    }

    #[test]
    fn an_undecodable_entry_is_a_decode_error_and_skipped_by_purge() {
        let dir = tempfile::tempdir().unwrap();
        let links = Store::open(&dir.path().join("db"))
            .unwrap()
            .records()
            .unwrap();
        links.insert_raw([7; 16], "c7", b"{not json");
        assert!(matches!(
            links.for_call("c7"),
            Err(StoreError::Decode { .. })
        ));
        assert!(links.purge(|_| true).unwrap().is_empty());
    }
}
