//! What a CRM adapter must remember across restarts (tree `crm_state`), by its own keys: the
//! CRM's id of a call registered at ring time and finished at hang-up, OAuth tokens. Each
//! adapter gets the tree through the CRM port's constructor and owns what it writes there;
//! nothing else reads it. `flush` before acting on a value that must not be lost.

use super::StoreError;

const TREE: &str = "crm_state";

/// Cheap to clone.
#[derive(Clone)]
pub struct CrmState {
    tree: sled::Tree,
}

impl CrmState {
    pub(super) fn open(db: &sled::Db) -> Result<CrmState, StoreError> {
        Ok(CrmState {
            tree: db.open_tree(TREE)?,
        })
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(key.as_bytes())?.map(|v| v.to_vec()))
    }

    pub fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.tree.insert(key.as_bytes(), value)?;
        Ok(())
    }

    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.tree.remove(key.as_bytes())?;
        Ok(())
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.tree.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::store::Store;

    #[tokio::test]
    async fn what_an_adapter_writes_survives_a_reopen_and_is_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = Store::open(&path).unwrap();
            let state = store.crm_state().unwrap();
            state.put("call:pbx-1", b"CRM-42").unwrap();
            state.put("call:pbx-2", b"CRM-43").unwrap();
            state.remove("call:pbx-2").unwrap();
            state.flush().await.unwrap();
            // The live-call journal is another tree: same keys, no clash.
            store.live().unwrap().put("call:pbx-1", b"journal").unwrap();
        }
        let store = Store::open(&path).unwrap();
        let state = store.crm_state().unwrap();
        assert_eq!(
            state.get("call:pbx-1").unwrap().as_deref(),
            Some(&b"CRM-42"[..])
        );
        assert_eq!(state.get("call:pbx-2").unwrap(), None);
    }
}
