//! The durable store: one sled database per process, opened once, hidden behind this API.
//!
//! Trees: `meta` (the generated clientId and recordings key, the module's activity state). Later
//! concerns get their own trees through methods here, so no other module touches sled types.
//! Values are JSON with a version field, so a field added later does not break old data.

use std::path::{Path, PathBuf};

use rand::distr::{Alphanumeric, SampleString};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::base::secret::Secret;

pub mod crm_state;
pub mod keyed;
pub(crate) mod live;
pub(crate) mod records;
pub(crate) mod watchdog;
pub use live::LiveStore;
pub use records::{LinkEntry, LinkId, LinkStore};

const META_TREE: &str = "meta";
/// sled's page cache: bounds the store's memory whatever the queue length.
const CACHE_BYTES: u64 = 8 * 1024 * 1024;
/// How long `open` waits for a lock held by a handle that is being dropped.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const USER_STATUS_TREE: &str = "user_status";
const KEY_CLIENT_ID: &str = "client_id";
const KEY_RECORDS_SECRET: &str = "records_secret";
const KEY_ACTIVITY: &str = "activity";
const KEY_PROBE: &str = "probe";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path} is locked by another process (is pbxgate already running?)")]
    Locked { path: PathBuf },
    #[error("store {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: cannot decode {key}: {source}")]
    Decode {
        key: String,
        source: serde_json::Error,
    },
}

/// Cheap to clone: sled's handles are reference-counted.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    user_status: sled::Tree,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// The module's state as retailCRM last told us through the activity callback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Activity {
    #[serde(default = "version_1")]
    pub v: u32,
    pub active: bool,
    pub freeze: bool,
    /// The account's current address, as sent in `systemUrl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_url: Option<String>,
    /// Unix seconds of the callback; 0 for the assumed initial state.
    #[serde(default)]
    pub updated_at: u64,
}

fn version_1() -> u32 {
    1
}

impl Default for Activity {
    /// Before retailCRM says anything, the module is as we registered it: active.
    fn default() -> Self {
        Activity {
            v: 1,
            active: true,
            freeze: false,
            system_url: None,
            updated_at: 0,
        }
    }
}

impl Activity {
    pub fn new(active: bool, freeze: bool, system_url: Option<String>) -> Self {
        Activity {
            v: 1,
            active,
            freeze,
            system_url,
            updated_at: unix_now(),
        }
    }

    /// Whether we may push events and uploads to the CRM.
    pub fn may_push(&self) -> bool {
        self.active && !self.freeze
    }
}

/// sled reports a held lock as an I/O error wrapping `WouldBlock`.
fn is_lock_error(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock
        || e.raw_os_error() == Some(11)
        || e.to_string().contains("could not acquire lock")
}

/// A manager's availability as the CRM reports it (pauses their queues on the PBX).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserStatus {
    Free,
    Busy,
    Dinner,
    Break,
}

impl UserStatus {
    pub fn parse(s: &str) -> Option<UserStatus> {
        match s {
            "free" => Some(UserStatus::Free),
            "busy" => Some(UserStatus::Busy),
            "dinner" => Some(UserStatus::Dinner),
            "break" => Some(UserStatus::Break),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            UserStatus::Free => "free",
            UserStatus::Busy => "busy",
            UserStatus::Dinner => "dinner",
            UserStatus::Break => "break",
        }
    }
}

/// A manager's status as retailCRM last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredUserStatus {
    #[serde(default = "version_1")]
    pub v: u32,
    pub user_id: i64,
    pub code: String,
    pub status: UserStatus,
    /// Unix seconds when this status was set.
    pub since: u64,
}

pub use crate::base::clock::unix_now;

impl Store {
    /// Opens (creating if needed) the database at `path`. Only one process may hold it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::Open {
                path: path.to_path_buf(),
                source: sled::Error::Io(e),
            })?;
        }
        // sled releases its file lock from a background thread after the last handle of a
        // previous open is dropped, so a reopen right after a close may briefly see it held.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match sled::Config::new()
                .path(path)
                .cache_capacity(CACHE_BYTES)
                .open()
            {
                Ok(db) => break db,
                Err(sled::Error::Io(ref io)) if is_lock_error(io) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(StoreError::Locked {
                            path: path.to_path_buf(),
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(other) => {
                    return Err(StoreError::Open {
                        path: path.to_path_buf(),
                        source: other,
                    })
                }
            }
        };
        let meta = db.open_tree(META_TREE)?;
        let user_status = db.open_tree(USER_STATUS_TREE)?;
        Ok(Store {
            db,
            meta,
            user_status,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database, for the stores of other modules (the call-history queue).
    pub(crate) fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The journal of calls in progress.
    pub fn live(&self) -> Result<LiveStore, StoreError> {
        LiveStore::open(&self.db, self.meta.clone())
    }

    /// What the CRM adapter keeps across restarts.
    pub fn crm_state(&self) -> Result<crm_state::CrmState, StoreError> {
        keyed::Keyed::open(&self.db, crm_state::TREE)
    }

    /// The recording links.
    pub fn records(&self) -> Result<LinkStore, StoreError> {
        LinkStore::open(&self.db)
    }

    /// One small write and a flush: what the watchdog checks still completes.
    pub fn probe(&self) -> Result<(), StoreError> {
        self.meta.insert(b"watchdog", &unix_now().to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// Makes every write so far durable (across a process crash; see sled's own caveats).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// The clientId retailCRM must echo in its callbacks: the configured one, else the one
    /// generated on first start and kept here ever after.
    pub async fn client_id(&self, configured: &Secret) -> Result<Secret, StoreError> {
        if !configured.is_empty() {
            return Ok(configured.clone());
        }
        self.generated_once(KEY_CLIENT_ID, 32).await
    }

    /// The key of the recordings' signed links: the configured one, else one generated on first
    /// start and kept here (links stay valid across restarts).
    pub async fn records_secret(&self, configured: &Secret) -> Result<Secret, StoreError> {
        if !configured.is_empty() {
            return Ok(configured.clone());
        }
        // 43 alphanumeric characters: more than 256 bits.
        self.generated_once(KEY_RECORDS_SECRET, 43).await
    }

    /// A random value stored under `key` the first time, durably; the same value ever after.
    async fn generated_once(&self, key: &str, len: usize) -> Result<Secret, StoreError> {
        let fresh = Alphanumeric.sample_string(&mut rand::rng(), len);
        // Compare-and-swap so two racing callers agree on one value.
        let stored = match self
            .meta
            .compare_and_swap(key, None::<&[u8]>, Some(fresh.as_bytes()))?
        {
            Ok(()) => {
                self.flush().await?;
                fresh
            }
            Err(cas) => {
                String::from_utf8_lossy(cas.current.as_deref().unwrap_or_default()).into_owned()
            }
        };
        Ok(Secret::new(stored))
    }

    pub fn activity(&self) -> Result<Activity, StoreError> {
        Ok(self.get_json(&self.meta, KEY_ACTIVITY)?.unwrap_or_default())
    }

    /// Persists the activity state durably before returning.
    pub async fn set_activity(&self, activity: &Activity) -> Result<(), StoreError> {
        self.put_json(&self.meta, KEY_ACTIVITY, activity)?;
        self.flush().await
    }

    /// Stores a manager's status durably (one record per CRM user).
    pub async fn put_user_status(&self, status: &StoredUserStatus) -> Result<(), StoreError> {
        self.put_json(&self.user_status, &status.user_id.to_string(), status)?;
        self.flush().await
    }

    pub fn user_status(&self, user_id: i64) -> Result<Option<StoredUserStatus>, StoreError> {
        self.get_json(&self.user_status, &user_id.to_string())
    }

    /// Every stored manager status; unreadable records are logged and skipped.
    pub fn user_statuses(&self) -> Result<Vec<StoredUserStatus>, StoreError> {
        let mut out = Vec::new();
        for item in self.user_status.iter() {
            let (key, value) = item?;
            match serde_json::from_slice(&value) {
                Ok(s) => out.push(s),
                Err(e) => {
                    tracing::error!(key = %String::from_utf8_lossy(&key), error = %e, "unreadable stored user status skipped")
                }
            }
        }
        Ok(out)
    }

    /// Writes, reads back and flushes a probe value: proves the store is usable.
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        let stamp = unix_now().to_be_bytes();
        self.meta.insert(KEY_PROBE, &stamp)?;
        self.flush().await?;
        match self.meta.get(KEY_PROBE)? {
            Some(v) if v.as_ref() == stamp => Ok(()),
            _ => Err(StoreError::Sled(sled::Error::ReportableBug(
                "probe value did not read back".into(),
            ))),
        }
    }

    /// A cheap read proving the database answers (for `/ready`).
    pub fn is_readable(&self) -> bool {
        self.meta.get(KEY_ACTIVITY).is_ok()
    }

    fn get_json<T: DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        match tree.get(key)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| StoreError::Decode {
                        key: key.to_string(),
                        source,
                    })
            }
        }
    }

    fn put_json<T: Serialize>(
        &self,
        tree: &sled::Tree,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Decode {
            key: key.to_string(),
            source,
        })?;
        tree.insert(key, bytes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn what_a_crm_adapter_writes_survives_a_reopen_and_is_its_own() {
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
        assert_eq!(store.live().unwrap().all("call:").unwrap().len(), 1);
    }

    #[tokio::test]
    async fn client_id_is_generated_once_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let first = {
            let store = Store::open(&path).unwrap();
            let a = store.client_id(&Secret::default()).await.unwrap();
            let b = store.client_id(&Secret::default()).await.unwrap();
            assert_eq!(a.expose(), b.expose());
            assert_eq!(a.expose().len(), 32);
            a
        };
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.client_id(&Secret::default()).await.unwrap().expose(),
            first.expose()
        );
        let configured = Secret::new("configured-client-id-0001");
        assert_eq!(
            store.client_id(&configured).await.unwrap().expose(),
            configured.expose()
        );
    }

    #[tokio::test]
    async fn records_secret_is_generated_once_apart_from_the_client_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let first = {
            let store = Store::open(&path).unwrap();
            let s = store.records_secret(&Secret::default()).await.unwrap();
            let id = store.client_id(&Secret::default()).await.unwrap();
            assert_eq!(s.expose().len(), 43);
            assert_ne!(s.expose(), id.expose());
            s
        };
        let store = Store::open(&path).unwrap();
        let again = store.records_secret(&Secret::default()).await.unwrap();
        assert_eq!(again.expose(), first.expose());
    }

    #[tokio::test]
    async fn activity_defaults_to_active_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = Store::open(&path).unwrap();
            assert!(store.activity().unwrap().may_push());
            let a = Activity::new(true, true, Some("https://x.retailcrm.ru".into()));
            store.set_activity(&a).await.unwrap();
        }
        let store = Store::open(&path).unwrap();
        let a = store.activity().unwrap();
        assert!(a.active && a.freeze && !a.may_push());
        assert_eq!(a.system_url.as_deref(), Some("https://x.retailcrm.ru"));
    }

    #[test]
    fn a_second_open_reports_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _held = Store::open(&path).unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    }

    #[tokio::test]
    async fn probe_writes_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        store.check_writable().await.unwrap();
        assert!(store.is_readable());
    }
}
