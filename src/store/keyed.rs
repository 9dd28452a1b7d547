//! A sled tree with text keys: the shape the live-call journal and the CRM adapter's state
//! share.

use super::StoreError;

/// Cheap to clone.
#[derive(Clone)]
pub struct Keyed {
    tree: sled::Tree,
}

impl Keyed {
    pub(super) fn open(db: &sled::Db, name: &str) -> Result<Keyed, StoreError> {
        Ok(Keyed {
            tree: db.open_tree(name)?,
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

    /// Every entry whose key starts with `prefix`, as (key without the prefix, value).
    pub fn all(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.tree
            .scan_prefix(prefix.as_bytes())
            .map(|item| {
                let (k, v) = item?;
                let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                Ok((key, v.to_vec()))
            })
            .collect()
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.tree.flush_async().await?;
        Ok(())
    }
}
