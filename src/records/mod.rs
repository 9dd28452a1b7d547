//! Recordings: the signed links uploaded as `recordUrl` and the files behind them.
//!
//! A link is `{public_url}/records/{token}.{ext}`. Nothing in it is a path: the token is
//! `base64url(id ‖ expiry ‖ HMAC-SHA256(key, id ‖ call id ‖ file ‖ ext ‖ expiry))`, where `id` is
//! 16 random bytes naming a [`LinkEntry`] in the store and `key` is `records.secret` (generated and
//! kept in the store when empty). Checking a link: decode the token, load the entry by id,
//! recompute the MAC over the extension the request names and compare in constant time (any
//! mismatch → 404), then the expiry and `records.keep_days` (→ 410). Links made before the
//! extension was signed (entry version 1) stay valid with their own extension only. A call has one link, made once, durably, before the upload that carries it, so every
//! re-upload sends the same URL.
//!
//! Only regular files inside `records.dir` are linked or served: paths are canonicalised (symlinks
//! resolved) and must stay under the canonical directory, when the link is made and again at
//! every request. When `records.convert = "mp3"`, the outbox holds a call until its recording is
//! converted (see [`convert`]); the link then points at the mp3, or at the original if the encoder
//! failed or timed out.
//!
//! A `process_record_file_path` hook ([`hook`]) may name another file for the link, once, just
//! before the link is made: the same checks apply to its answer, and the file it chose is the
//! one the link stores (and signs), so it is served across restarts without asking it again.
//! With `records.convert = "mp3"` the file found is converted beforehand; a file the hook
//! chose is served as it is, or as its `.mp3` copy if one exists beside it.

pub(crate) mod convert;
pub mod hook;
pub(crate) mod serve;
pub(crate) mod sniff;

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::base::secret::Secret;
use crate::calls::full::call_full;
use crate::calls::{CallRecord, Outcome};
use crate::config::{Config, PhoneConfig, RecordsConfig};
use crate::hooks::{HookResult, Hooks};
use crate::phone::PhoneBook;
use crate::store::records::LINK_ID_LEN;
use crate::store::{unix_now, LinkEntry, LinkId, LinkStore, StoreError};

/// Path prefix of the links.
pub const PATH_PREFIX: &str = "/records/";
/// Expired links answer 410 for this long, then their entries are deleted (and they answer 404).
pub const LINK_GRACE: Duration = Duration::from_secs(30 * 86400);

const MAC_LEN: usize = 32;
const TOKEN_BYTES: usize = LINK_ID_LEN + 8 + MAC_LEN;
/// Characters in a token: 56 bytes in unpadded base64url.
pub const TOKEN_LEN: usize = (TOKEN_BYTES * 4).div_ceil(3);
/// Entries made now: the MAC covers the URL's extension.
const LINK_VERSION: u32 = 2;
const MAC_CONTEXT: &[u8] = b"pbxgate recording link v2\0";
/// Entries of version 1 (the MAC does not cover the extension; it must equal the entry's).
const MAC_CONTEXT_V1: &[u8] = b"pbxgate recording link v1\0";
const DAY_MS: i64 = 86_400_000;

/// Why a token does not lead to a file.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Malformed, forged, unknown, or the file is gone or outside `records.dir`.
    #[error("{0}")]
    NotFound(&'static str),
    /// A genuine link past its expiry or past `records.keep_days`.
    #[error("this recording link has expired")]
    Expired,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A verified link and the file to serve for it.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub entry: LinkEntry,
    pub file: PathBuf,
    /// The original recording when `file` is its converted copy: served instead if the copy
    /// turns out unusable.
    pub original: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conversion {
    Running,
    /// Done without producing a copy (failed, timed out, or not needed): serve the original.
    Settled,
}

/// What `/ready` shows.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub dir: String,
    /// Whether `records.dir` exists (otherwise calls are uploaded without a recording).
    pub linking: bool,
    pub convert: String,
    pub conversions_running: u64,
    pub converted: u64,
    pub conversion_failures: u64,
}

struct Inner {
    config: RecordsConfig,
    public_base: String,
    /// The canonical `records.dir`, once it exists.
    dir: OnceLock<PathBuf>,
    missing_dir_logged: AtomicBool,
    key: Secret,
    links: LinkStore,
    conversions: Mutex<HashMap<PathBuf, Conversion>>,
    /// One encoder at a time.
    encoder: tokio::sync::Semaphore,
    running: AtomicU64,
    converted: AtomicU64,
    failures: AtomicU64,
    hooks: Hooks,
    phone: PhoneConfig,
    /// For the hook's `call_full`, made when first needed.
    phones: OnceLock<PhoneBook>,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct Records {
    inner: Arc<Inner>,
}

impl Records {
    /// `key` is `records.secret` or the one generated in the store ([`crate::store::Store::records_secret`]).
    pub fn new(config: &Config, links: LinkStore, key: Secret) -> Records {
        Records::with_hooks(config, links, key, Hooks::none())
    }

    /// As [`Records::new`], asking `hooks`' `process_record_file_path` for the file to link.
    pub fn with_hooks(config: &Config, links: LinkStore, key: Secret, hooks: Hooks) -> Records {
        let records = Records {
            inner: Arc::new(Inner {
                config: config.records.clone(),
                public_base: config.http.public_base().to_string(),
                dir: OnceLock::new(),
                missing_dir_logged: AtomicBool::new(false),
                key,
                links,
                conversions: Mutex::default(),
                encoder: tokio::sync::Semaphore::new(1),
                running: AtomicU64::new(0),
                converted: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                hooks,
                phone: config.phone.clone(),
                phones: OnceLock::new(),
            }),
        };
        // Says once at startup whether recordings will be linked.
        let _ = records.dir();
        records
    }

    /// The canonical recordings directory, or None (logged once) while it does not exist.
    pub fn dir(&self) -> Option<&Path> {
        if let Some(dir) = self.inner.dir.get() {
            return Some(dir);
        }
        match std::fs::canonicalize(&self.inner.config.dir) {
            Ok(dir) if dir.is_dir() => Some(self.inner.dir.get_or_init(|| dir)),
            result => {
                if !self.inner.missing_dir_logged.swap(true, Ordering::Relaxed) {
                    let why = result
                        .err()
                        .map_or("not a directory".to_string(), |e| e.to_string());
                    tracing::warn!(dir = %self.inner.config.dir.display(), reason = %why,
                        "records.dir is not usable: calls are uploaded without recordings until it exists");
                }
                None
            }
        }
    }

    /// A recording path from a call (absolute, or relative to `records.dir`) as a canonical
    /// regular file inside `records.dir`; None for anything else.
    fn locate(&self, raw: &str) -> Option<PathBuf> {
        locate_in(self.dir()?, raw)
    }

    /// A stored (canonical) path, checked again: still canonical, inside the directory, a file.
    fn recheck(&self, stored: &str) -> Option<PathBuf> {
        let dir = self.dir()?;
        let canonical = std::fs::canonicalize(stored).ok()?;
        (canonical.as_os_str() == stored && canonical.starts_with(dir) && canonical.is_file())
            .then_some(canonical)
    }

    /// The recording a call's link is made for (see [`recording_in`]).
    fn choose(&self, record: &CallRecord) -> Option<PathBuf> {
        recording_in(self.dir()?, record)
    }

    /// For the outbox, before it uploads a call whose recording has settled: with conversion on,
    /// starts converting (in the background; `on_done` runs when it has finished) and answers
    /// false while it runs. True when there is nothing to wait for.
    pub fn conversion_ready(
        &self,
        record: &CallRecord,
        on_done: impl FnOnce() + Send + 'static,
    ) -> bool {
        if self.inner.config.convert != "mp3" {
            return true;
        }
        // A call linked already keeps its link, and so its format.
        if !matches!(self.inner.links.for_call(&record.external_id), Ok(None)) {
            // Or it has one that cannot be read, and will get none.
            return true;
        }
        let Some(path) = self.choose(record) else {
            return true;
        };
        if convert::converted_path(&path).is_file() {
            return true;
        }
        {
            let mut conversions = self.lock_conversions();
            match conversions.get(&path) {
                Some(Conversion::Running) => return false,
                Some(Conversion::Settled) => return true,
                None => {}
            }
            conversions.insert(path.clone(), Conversion::Running);
        }
        let this = self.clone();
        let call_id = record.external_id.clone();
        tokio::spawn(async move {
            this.convert(&call_id, path).await;
            on_done();
        });
        false
    }

    async fn convert(&self, call_id: &str, path: PathBuf) {
        let inner = &self.inner;
        let Ok(_permit) = inner.encoder.acquire().await else {
            return;
        };
        inner.running.fetch_add(1, Ordering::Relaxed);
        let probe = path.clone();
        let format = tokio::task::spawn_blocking(move || sniff::sniff_file(&probe))
            .await
            .ok()
            .and_then(Result::ok);
        // None: the mp3 copy exists now.
        let outcome = if format == Some(sniff::Format::Mp3) {
            tracing::debug!(call = %call_id, "recording is mp3 already");
            Some(Conversion::Settled)
        } else {
            match convert::to_mp3(
                &inner.config.convert_command,
                &path,
                inner.config.convert_timeout,
            )
            .await
            {
                Ok(_) => {
                    inner.converted.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(call = %call_id, "recording converted to mp3");
                    None
                }
                Err(e) => {
                    inner.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(call = %call_id, error = %convert::mask_digit_runs(&e.to_string()),
                        "converting the recording to mp3 failed; the original is served");
                    Some(Conversion::Settled)
                }
            }
        };
        inner.running.fetch_sub(1, Ordering::Relaxed);
        let mut conversions = self.lock_conversions();
        match outcome {
            Some(settled) => conversions.insert(path, settled),
            None => conversions.remove(&path),
        };
    }

    fn lock_conversions(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Conversion>> {
        self.inner
            .conversions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The call's link, made (not yet flushed) if it has none and a recording can be linked, as
    /// if at unix second `now`. Returns the link and whether it was made now. The hook is not
    /// asked here ([`Records::ensure_links`] asks it).
    pub fn link_at(
        &self,
        record: &CallRecord,
        tz: &jiff::tz::TimeZone,
        now: u64,
    ) -> Result<Option<(LinkId, LinkEntry, bool)>, StoreError> {
        self.link_file(record, tz, now, None)
    }

    /// Whether the call, past `records.keep_days` at unix second `now`, gets no link.
    fn past_retention(&self, record: &CallRecord, now: u64) -> bool {
        let keep_days = i64::from(self.inner.config.keep_days);
        let now_ms = i64::try_from(now).unwrap_or(i64::MAX).saturating_mul(1000);
        keep_days > 0 && record.start.saturating_add(keep_days * DAY_MS) <= now_ms
    }

    /// The recording a link would be made for now: None when the call has a link (or an
    /// unreadable one), or cannot have one.
    fn to_link(&self, record: &CallRecord, now: u64) -> Option<PathBuf> {
        if !matches!(self.inner.links.for_call(&record.external_id), Ok(None)) {
            return None;
        }
        if self.past_retention(record, now) {
            return None;
        }
        self.choose(record)
    }

    /// `process_record_file_path`: the file the call's link is made for, `found` unless the
    /// hook named another that passes [`hook::check`].
    async fn ask_hook(&self, record: &CallRecord, found: PathBuf) -> PathBuf {
        let inner = &self.inner;
        let phones = inner.phones.get_or_init(|| PhoneBook::new(&inner.phone));
        let full = call_full(record, phones, &jiff::tz::TimeZone::system());
        let input = hook::input(&found, full, &record.external_id);
        let point = hook::PROCESS_RECORD_FILE_PATH;
        let HookResult::Changed(data) = inner.hooks.call(point, input, hook::FIELDS).await else {
            return found;
        };
        let Some(dir) = self.dir() else {
            return found;
        };
        let (path, refused) = hook::decide(dir, &found, &data);
        if let Some((answered, why)) = refused {
            tracing::warn!(hook = point, call = %record.external_id,
                path = %convert::mask_digit_runs(&answered), reason = %why,
                "the hook's recording path is not used; the file found is linked");
        }
        path
    }

    /// [`Records::link_at`], linking `picked` (checked already) instead of the file found.
    fn link_file(
        &self,
        record: &CallRecord,
        tz: &jiff::tz::TimeZone,
        now: u64,
        picked: Option<PathBuf>,
    ) -> Result<Option<(LinkId, LinkEntry, bool)>, StoreError> {
        match self.inner.links.for_call(&record.external_id) {
            Ok(Some((id, entry))) => return Ok(Some((id, entry, false))),
            Ok(None) => {}
            Err(e) => return unreadable_link(&record.external_id, e),
        }
        let Some(found) = self.choose(record) else {
            return Ok(None);
        };
        if self.past_retention(record, now) {
            return Ok(None);
        }
        let path = picked.unwrap_or_else(|| found.clone());
        let served = (self.inner.config.convert == "mp3")
            .then(|| convert::converted_path(&path))
            .filter(|c| c.is_file())
            .and_then(|c| self.locate(c.to_str()?));
        let Ok(format) = sniff::sniff_file(served.as_deref().unwrap_or(&path)) else {
            return Ok(None);
        };
        let ttl = self.inner.config.link_ttl.as_secs();
        let mut id = [0u8; LINK_ID_LEN];
        rand::rng().fill_bytes(&mut id);
        // `locate` gives only UTF-8 paths.
        let Some(path_text) = path.to_str() else {
            return Ok(None);
        };
        let entry = LinkEntry {
            v: LINK_VERSION,
            call_id: record.external_id.clone(),
            path: path_text.to_owned(),
            served: served.as_deref().and_then(Path::to_str).map(str::to_owned),
            ext: format.ext().to_string(),
            filename: download_name(record, tz, format.ext()),
            created_at: now,
            expires_at: if ttl == 0 { 0 } else { now.saturating_add(ttl) },
            call_start: record.start,
        };
        let made = match self.inner.links.insert(id, &entry) {
            Ok(made) => made,
            Err(e) => return unreadable_link(&record.external_id, e),
        };
        self.lock_conversions().remove(&found);
        Ok(Some(made))
    }

    /// Makes the links of these calls (those that can have one) and flushes them: after this,
    /// [`Records::url_for`] gives each call's URL and the URL survives a crash. A call about to
    /// get its link is first shown to the `process_record_file_path` hook (the calls' hooks run
    /// side by side).
    pub async fn ensure_links<'a>(
        &self,
        records: impl IntoIterator<Item = &'a CallRecord>,
        tz: &jiff::tz::TimeZone,
    ) -> Result<(), StoreError> {
        let now = unix_now();
        let records: Vec<&CallRecord> = records.into_iter().collect();
        let picks: Vec<Option<PathBuf>> = if self
            .inner
            .hooks
            .is_configured(hook::PROCESS_RECORD_FILE_PATH)
        {
            futures_util::future::join_all(records.iter().map(|r| async move {
                match self.to_link(r, now) {
                    Some(found) => Some(self.ask_hook(r, found).await),
                    None => None,
                }
            }))
            .await
        } else {
            vec![None; records.len()]
        };
        let mut linked = false;
        for (record, picked) in records.into_iter().zip(picks) {
            linked |= self.link_file(record, tz, now, picked)?.is_some();
        }
        // Also when every link was there already: one made by an earlier attempt that failed
        // before its flush is not durable yet. Cheap when nothing is left to write.
        if linked {
            self.inner.links.flush().await?;
        }
        Ok(())
    }

    /// One call's link, made durably if needed: its URL, or None without a linkable recording.
    pub async fn ensure_link(
        &self,
        record: &CallRecord,
        tz: &jiff::tz::TimeZone,
    ) -> Result<Option<String>, StoreError> {
        self.ensure_links([record], tz).await?;
        Ok(self.url_for(record))
    }

    /// The URL for a call's `recordUrl`: its link if it has one, else a recording that is a URL
    /// already (a PBX webhook's `record`), else None.
    pub fn url_for(&self, record: &CallRecord) -> Option<String> {
        match self.inner.links.for_call(&record.external_id) {
            Ok(Some((id, entry))) => return Some(self.url(&id, &entry)),
            Ok(None) => {}
            // Logged when the drain tried to link the call.
            Err(e @ StoreError::Decode { .. }) => {
                tracing::debug!(call = %record.external_id, error = %e, "unreadable recording link");
            }
            Err(e) => tracing::error!(error = %e, "reading a recording link failed"),
        }
        if record.outcome != Outcome::Answered {
            return None;
        }
        record.recordings.iter().find(|r| is_url(r)).cloned()
    }

    pub fn url(&self, id: &LinkId, entry: &LinkEntry) -> String {
        format!(
            "{}{PATH_PREFIX}{}",
            self.inner.public_base,
            self.name(id, entry)
        )
    }

    /// The link's last path segment: `{token}.{ext}`.
    pub fn name(&self, id: &LinkId, entry: &LinkEntry) -> String {
        format!("{}.{}", self.token(id, entry), entry.ext)
    }

    fn token(&self, id: &LinkId, entry: &LinkEntry) -> String {
        let mut bytes = Vec::with_capacity(TOKEN_BYTES);
        bytes.extend_from_slice(id);
        bytes.extend_from_slice(&entry.expires_at.to_be_bytes());
        bytes.extend_from_slice(&self.mac(id, entry, &entry.ext, entry.expires_at));
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The MAC of a link to `entry` with extension `ext` (not covered by version 1 entries).
    fn mac(&self, id: &LinkId, entry: &LinkEntry, ext: &str, expires_at: u64) -> [u8; MAC_LEN] {
        // HMAC accepts keys of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(self.inner.key.expose().as_bytes())
            .expect("HMAC takes any key length");
        let v1 = entry.v < LINK_VERSION;
        mac.update(if v1 { MAC_CONTEXT_V1 } else { MAC_CONTEXT });
        mac.update(id);
        let ext = if v1 { None } else { Some(ext.as_bytes()) };
        for field in [
            Some(entry.call_id.as_bytes()),
            Some(entry.path.as_bytes()),
            ext,
        ]
        .into_iter()
        .flatten()
        {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        mac.update(&expires_at.to_be_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Checks a link's last path segment (`{token}.{ext}`) at unix second `now` and finds the
    /// file to serve. The extension is signed: any other (or none) is not found. Blocking (store
    /// and file system): run it off the async threads.
    pub fn resolve(&self, name: &str, now: u64) -> Result<Resolved, LinkError> {
        const NO_SUCH: LinkError = LinkError::NotFound("no such recording");
        let Some((token, ext)) = name.split_once('.') else {
            return Err(NO_SUCH);
        };
        if token.len() != TOKEN_LEN {
            return Err(NO_SUCH);
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| NO_SUCH)?;
        if bytes.len() != TOKEN_BYTES {
            return Err(NO_SUCH);
        }
        let (id, rest) = bytes.split_at(LINK_ID_LEN);
        let (expiry, given) = rest.split_at(8);
        let id: LinkId = id.try_into().map_err(|_| NO_SUCH)?;
        let expires_at = u64::from_be_bytes(expiry.try_into().map_err(|_| NO_SUCH)?);
        // An unknown id and a wrong MAC look the same from outside.
        let Some(entry) = self.inner.links.get(&id)? else {
            return Err(NO_SUCH);
        };
        let expected = self.mac(&id, &entry, ext, expires_at);
        // Version 1 MACs do not cover the extension: it must be the entry's own.
        let ext_ok = entry.v >= LINK_VERSION || ext == entry.ext;
        if !bool::from(expected.as_slice().ct_eq(given)) || !ext_ok {
            return Err(NO_SUCH);
        }
        if expires_at != 0 && now >= expires_at {
            return Err(LinkError::Expired);
        }
        let keep_days = i64::from(self.inner.config.keep_days);
        let now_ms = i64::try_from(now).unwrap_or(i64::MAX).saturating_mul(1000);
        if keep_days > 0 && entry.call_start.saturating_add(keep_days * DAY_MS) <= now_ms {
            return Err(LinkError::Expired);
        }
        let copy = entry.served.as_deref().and_then(|s| self.recheck(s));
        let original = self.recheck(&entry.path);
        let (file, original) = match (copy, original) {
            (Some(copy), original) => (copy, original),
            (None, Some(original)) => (original, None),
            (None, None) => return Err(LinkError::NotFound("the recording is not available")),
        };
        Ok(Resolved {
            entry,
            file,
            original,
        })
    }

    /// Deletes links that stopped working more than [`LINK_GRACE`] before unix second `now`, and
    /// the mp3 copies made for them. Returns how many.
    pub fn purge(&self, now: u64) -> Result<usize, StoreError> {
        let grace = LINK_GRACE.as_secs();
        let keep_ms = i64::from(self.inner.config.keep_days) * DAY_MS;
        let now_ms = i64::try_from(now).unwrap_or(i64::MAX).saturating_mul(1000);
        let grace_ms = i64::try_from(grace).unwrap_or(0) * 1000;
        let purged = self.inner.links.purge(|e| {
            let link_over = e.expires_at != 0 && e.expires_at.saturating_add(grace) <= now;
            let kept_over =
                keep_ms > 0 && e.call_start.saturating_add(keep_ms + grace_ms) <= now_ms;
            link_over || kept_over
        })?;
        for entry in &purged {
            // Only our own copy, never what Asterisk wrote.
            if let Some(served) = &entry.served {
                let ours = convert::converted_path(Path::new(&entry.path));
                if Path::new(served) == ours && self.recheck(served).is_some() {
                    if let Err(e) = std::fs::remove_file(&ours) {
                        tracing::warn!(call = %entry.call_id, error = %e, "cannot delete an expired mp3 copy");
                    }
                }
            }
        }
        Ok(purged.len())
    }

    /// Purges expired links every hour; runs until aborted.
    pub async fn run_maintenance(self) {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.purge(unix_now())).await {
                Ok(Ok(n)) if n > 0 => tracing::info!(purged = n, "expired recording links deleted"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "purging recording links failed"),
                Err(e) => tracing::error!(error = %e, "purging recording links panicked"),
            }
        }
    }

    pub fn status(&self) -> Status {
        Status {
            dir: self.inner.config.dir.display().to_string(),
            linking: self.dir().is_some(),
            convert: self.inner.config.convert.clone(),
            conversions_running: self.inner.running.load(Ordering::Relaxed),
            converted: self.inner.converted.load(Ordering::Relaxed),
            conversion_failures: self.inner.failures.load(Ordering::Relaxed),
        }
    }
}

/// A call's link entry that cannot be decoded counts as no link, so that the call is uploaded
/// without `recordUrl` rather than holding up the queue; other store errors stand.
fn unreadable_link(
    call_id: &str,
    e: StoreError,
) -> Result<Option<(LinkId, LinkEntry, bool)>, StoreError> {
    match e {
        StoreError::Decode { .. } => {
            tracing::warn!(call = %call_id, error = %e,
                "the call's recording link is unreadable; the call is uploaded without recordUrl");
            Ok(None)
        }
        e => Err(e),
    }
}

/// A recording path from a call (absolute, or relative to `dir`, the canonical `records.dir`) as
/// a canonical regular file inside `dir`; None for anything else.
fn locate_in(dir: &Path, raw: &str) -> Option<PathBuf> {
    if raw.is_empty() || raw.contains('\0') {
        return None;
    }
    let canonical = std::fs::canonicalize(dir.join(raw)).ok()?;
    if !(canonical.starts_with(dir) && canonical.is_file()) {
        return None;
    }
    // Links store paths as text: a name that is not UTF-8 could never be found again.
    if canonical.to_str().is_none() {
        tracing::warn!(path = %convert::mask_digit_runs(&canonical.to_string_lossy()),
            "a recording whose path is not UTF-8 is not linked");
        return None;
    }
    Some(canonical)
}

/// The recording a call's link is made for, in `dir` (the canonical `records.dir`): only
/// answered calls have one, and only the first of its files inside the directory that holds
/// sound (a call that never connected leaves a header-only WAV).
pub fn recording_in(dir: &Path, record: &CallRecord) -> Option<PathBuf> {
    if record.outcome != Outcome::Answered {
        return None;
    }
    record
        .recordings
        .iter()
        .filter(|r| !is_url(r))
        .filter_map(|r| locate_in(dir, r))
        .find(|p| sniff::holds_audio(p))
}

/// Opens a file for reading only if it is a regular file: not through a symlink in the last
/// component (`O_NOFOLLOW`), and without waiting for a writer if a FIFO was swapped in
/// (`O_NONBLOCK`, cleared again once the file is known to be regular).
pub(crate) fn open_regular(path: &Path) -> io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let fd = file.as_raw_fd();
    // SAFETY: fcntl(2) on a descriptor we own, reading then setting its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

fn is_url(recording: &str) -> bool {
    recording.starts_with("https://") || recording.starts_with("http://")
}

/// `<call date>-<phone>.<ext>` in the CRM's time zone, e.g. `2026-11-21_13-00-00-79991234567.mp3`.
fn download_name(record: &CallRecord, tz: &jiff::tz::TimeZone, ext: &str) -> String {
    let date = jiff::Timestamp::from_millisecond(record.start)
        .map(|t| {
            t.to_zoned(tz.clone())
                .strftime("%Y-%m-%d_%H-%M-%S")
                .to_string()
        })
        .unwrap_or_else(|_| "call".into());
    let phone: String = record
        .customer_number
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == '+')
        .take(32)
        .collect();
    if phone.is_empty() {
        format!("{date}.{ext}")
    } else {
        format!("{date}-{phone}.{ext}")
    }
}

#[cfg(test)]
mod tests {
    use super::sniff::samples::{wav_header, MP3_FRAME};
    use super::*;
    use crate::store::Store;

    /// 2026-11-21 10:00:00 UTC.
    const T0_MS: i64 = 1_795_255_200_000;
    const NOW: u64 = 1_795_255_300;

    struct Fixture {
        records: Records,
        dir: PathBuf,
        _tmp: tempfile::TempDir,
    }

    fn fixture(tweak: impl FnOnce(&mut Config)) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("monitor");
        std::fs::create_dir(&dir).unwrap();
        let mut config = Config::default();
        config.records.dir = dir.clone();
        config.http.public_url = "https://pbx.example.com/".into();
        tweak(&mut config);
        let store = Store::open(&tmp.path().join("db")).unwrap();
        let records = Records::new(
            &config,
            store.records().unwrap(),
            Secret::new("0123456789abcdef0123456789abcdef"),
        );
        Fixture {
            records,
            dir: std::fs::canonicalize(dir).unwrap(),
            _tmp: tmp,
        }
    }

    fn record(id: &str, recordings: Vec<String>) -> CallRecord {
        CallRecord {
            customer_number: "+7 (999) 123-45-67".into(),
            start: T0_MS,
            end: T0_MS + 60_000,
            recordings,
            ..CallRecord::sample(id)
        }
    }

    impl Fixture {
        fn wav(&self, name: &str) -> String {
            let path = self.dir.join(name);
            let mut data = wav_header(1, 1000);
            data.resize(1044, 0);
            std::fs::write(&path, data).unwrap();
            path.to_string_lossy().into_owned()
        }

        fn link(&self, record: &CallRecord, now: u64) -> (LinkId, LinkEntry) {
            let (id, entry, _) = self
                .records
                .link_at(record, &jiff::tz::TimeZone::UTC, now)
                .unwrap()
                .expect("linked");
            (id, entry)
        }
    }

    fn name_of(url: &str) -> &str {
        url.rsplit('/').next().unwrap()
    }

    fn token_of(url: &str) -> &str {
        name_of(url).split('.').next().unwrap()
    }

    #[test]
    fn a_link_round_trips_to_its_file_and_stays_the_same_for_the_call() {
        let f = fixture(|_| {});
        let path = f.wav("in-1.wav");
        let r = record("pbx-1", vec![path.clone()]);
        let (id, entry) = f.link(&r, NOW);
        assert_eq!(entry.ext, "wav");
        assert_eq!(entry.filename, "2026-11-21_10-00-00-+79991234567.wav");
        assert_eq!(entry.expires_at, NOW + 365 * 86400);
        let url = f.records.url_for(&r).unwrap();
        assert!(url.starts_with("https://pbx.example.com/records/"), "{url}");
        assert!(url.ends_with(".wav"), "{url}");
        let token = token_of(&url);
        assert_eq!(token.len(), TOKEN_LEN);
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let resolved = f.records.resolve(name_of(&url), NOW + 1).unwrap();
        assert_eq!(resolved.file, PathBuf::from(&path));
        // Linking again (a re-upload) gives the same link.
        let (again, _) = f.link(&r, NOW + 1000);
        assert_eq!(again, id);
        assert_eq!(f.records.url_for(&r).unwrap(), url);
    }

    #[test]
    fn a_changed_character_anywhere_in_the_token_is_not_found() {
        let f = fixture(|_| {});
        let r = record("pbx-2", vec![f.wav("in-2.wav")]);
        f.link(&r, NOW);
        let url = f.records.url_for(&r).unwrap();
        let token = token_of(&url).to_string();
        for i in 0..token.len() {
            let mut bytes = token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let tampered = String::from_utf8(bytes).unwrap();
            assert!(
                matches!(
                    f.records.resolve(&format!("{tampered}.wav"), NOW),
                    Err(LinkError::NotFound(_))
                ),
                "position {i}"
            );
        }
        for bad in ["", "short", &token[1..], &format!("{token}A")] {
            assert!(matches!(
                f.records.resolve(&format!("{bad}.wav"), NOW),
                Err(LinkError::NotFound(_))
            ));
        }
        // Another key does not accept the token.
        let other = Records::new(
            &Config::default(),
            f.records.inner.links.clone(),
            Secret::new("another-key-another-key-another"),
        );
        assert!(matches!(
            other.resolve(name_of(&url), NOW),
            Err(LinkError::NotFound(_))
        ));
    }

    #[test]
    fn the_extension_is_part_of_the_link() {
        let f = fixture(|_| {});
        let r = record("pbx-16", vec![f.wav("in-16.wav")]);
        f.link(&r, NOW);
        let url = f.records.url_for(&r).unwrap();
        let token = token_of(&url);
        assert!(f.records.resolve(&format!("{token}.wav"), NOW).is_ok());
        for other in ["", ".", ".mp3", ".WAV", ".wav.mp3", ".wav.", ".anything"] {
            assert!(
                matches!(
                    f.records.resolve(&format!("{token}{other}"), NOW),
                    Err(LinkError::NotFound(_))
                ),
                "{other:?}"
            );
        }
    }

    #[test]
    fn links_made_before_the_extension_was_signed_work_with_their_own_extension_only() {
        let f = fixture(|_| {});
        let r = record("pbx-17", vec![f.wav("in-17.wav")]);
        let (id, mut entry) = f.link(&r, NOW);
        // A version 1 entry, as stored by earlier releases, and its link (MAC without the
        // extension).
        entry.v = 1;
        let stored = serde_json::to_vec(&entry).unwrap();
        f.records
            .inner
            .links
            .insert_raw(id, &entry.call_id, &stored);
        let name = f.records.name(&id, &entry);
        assert_ne!(
            name,
            f.records.name(
                &id,
                &LinkEntry {
                    v: 2,
                    ..entry.clone()
                }
            ),
            "the two versions sign differently"
        );
        assert!(f.records.resolve(&name, NOW).is_ok());
        let token = name.split('.').next().unwrap();
        for other in ["", ".mp3", ".wav.x", ".anything"] {
            assert!(matches!(
                f.records.resolve(&format!("{token}{other}"), NOW),
                Err(LinkError::NotFound(_))
            ));
        }
    }

    #[test]
    fn expiry_and_retention_answer_gone() {
        let f = fixture(|c| c.records.link_ttl = Duration::from_secs(60));
        let r = record("pbx-3", vec![f.wav("in-3.wav")]);
        let (id, entry) = f.link(&r, NOW);
        let token = f.records.name(&id, &entry);
        assert!(f.records.resolve(&token, NOW + 59).is_ok());
        assert!(matches!(
            f.records.resolve(&token, NOW + 60),
            Err(LinkError::Expired)
        ));

        let f = fixture(|c| {
            c.records.link_ttl = Duration::ZERO;
            c.records.keep_days = 2;
        });
        let r = record("pbx-4", vec![f.wav("in-4.wav")]);
        let (id, entry) = f.link(&r, NOW);
        assert_eq!(entry.expires_at, 0);
        let token = f.records.name(&id, &entry);
        assert!(f.records.resolve(&token, NOW + 86400).is_ok());
        let past_retention = (T0_MS / 1000) as u64 + 2 * 86400;
        assert!(matches!(
            f.records.resolve(&token, past_retention),
            Err(LinkError::Expired)
        ));
        // A call already past retention gets no link at all.
        let old = record("pbx-5", vec![f.wav("in-5.wav")]);
        assert!(f
            .records
            .link_at(&old, &jiff::tz::TimeZone::UTC, past_retention)
            .unwrap()
            .is_none());
        // Purged after the grace period, with nothing else touched.
        assert_eq!(f.records.purge(past_retention).unwrap(), 0);
        let purge_at = past_retention + LINK_GRACE.as_secs();
        assert_eq!(f.records.purge(purge_at).unwrap(), 1);
        assert!(matches!(
            f.records.resolve(&token, NOW),
            Err(LinkError::NotFound(_))
        ));
        assert!(f.dir.join("in-4.wav").exists());
    }

    #[test]
    fn only_files_inside_the_directory_are_linked_or_served() {
        let f = fixture(|_| {});
        let outside = f.dir.parent().unwrap().join("secret.wav");
        std::fs::write(&outside, wav_header(1, 0)).unwrap();
        std::os::unix::fs::symlink(&outside, f.dir.join("link.wav")).unwrap();
        std::fs::create_dir(f.dir.join("sub")).unwrap();
        for raw in [
            outside.to_string_lossy().into_owned(),
            f.dir.join("link.wav").to_string_lossy().into_owned(),
            f.dir.join("../secret.wav").to_string_lossy().into_owned(),
            "../secret.wav".into(),
            f.dir.join("sub").to_string_lossy().into_owned(),
            f.dir.join("missing.wav").to_string_lossy().into_owned(),
            String::new(),
        ] {
            let r = record("pbx-x", vec![raw.clone()]);
            assert!(
                f.records
                    .link_at(&r, &jiff::tz::TimeZone::UTC, NOW)
                    .unwrap()
                    .is_none(),
                "{raw}"
            );
        }
        // Relative to the directory, and the first usable one of several.
        let inner = f.wav("sub/in-6.wav");
        let r = record(
            "pbx-6",
            vec![outside.display().to_string(), "sub/in-6.wav".into()],
        );
        let (id, entry) = f.link(&r, NOW);
        assert_eq!(entry.path, inner);
        let token = f.records.name(&id, &entry);
        // Replaced by a symlink pointing outside after the link was made: refused.
        std::fs::remove_file(&inner).unwrap();
        std::os::unix::fs::symlink(&outside, &inner).unwrap();
        assert!(matches!(
            f.records.resolve(&token, NOW),
            Err(LinkError::NotFound(_))
        ));
        // Gone: not found either.
        std::fs::remove_file(&inner).unwrap();
        assert!(matches!(
            f.records.resolve(&token, NOW),
            Err(LinkError::NotFound(_))
        ));
    }

    #[test]
    fn a_recording_given_as_a_url_is_passed_through() {
        let f = fixture(|_| {});
        let r = record("pbx-7", vec!["https://pbx.example.com/rec/7.mp3".into()]);
        assert!(f
            .records
            .link_at(&r, &jiff::tz::TimeZone::UTC, NOW)
            .unwrap()
            .is_none());
        assert_eq!(
            f.records.url_for(&r).as_deref(),
            Some("https://pbx.example.com/rec/7.mp3")
        );
    }

    #[test]
    fn a_converted_copy_is_linked_with_its_format() {
        let f = fixture(|c| c.records.convert = "mp3".into());
        let path = f.wav("in-8.wav");
        let mut mp3 = MP3_FRAME.to_vec();
        mp3.resize(417, 0);
        std::fs::write(format!("{path}.mp3"), mp3).unwrap();
        let r = record("pbx-8", vec![path]);
        assert!(f.records.conversion_ready(&r, || {}), "the copy exists");
        let (id, entry) = f.link(&r, NOW);
        assert_eq!(entry.ext, "mp3");
        assert!(entry.filename.ends_with(".mp3"));
        let resolved = f
            .records
            .resolve(&f.records.name(&id, &entry), NOW)
            .unwrap();
        assert!(resolved.file.to_string_lossy().ends_with("in-8.wav.mp3"));
    }

    #[test]
    fn a_call_whose_link_entry_is_unreadable_is_uploaded_without_one() {
        let f = fixture(|c| c.records.convert = "mp3".into());
        let r = record("pbx-10", vec![f.wav("in-10.wav")]);
        f.records
            .inner
            .links
            .insert_raw([9; 16], "pbx-10", b"\xff not json");
        assert!(f
            .records
            .link_at(&r, &jiff::tz::TimeZone::UTC, NOW)
            .unwrap()
            .is_none());
        // What the outbox does before an upload: no error (that would hold up every upload), no
        // recordUrl for this call, and no conversion waited for.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let other = record("pbx-11", vec![f.wav("in-11.wav")]);
        rt.block_on(
            f.records
                .ensure_links([&r, &other], &jiff::tz::TimeZone::UTC),
        )
        .unwrap();
        assert_eq!(f.records.url_for(&r), None);
        assert!(f.records.url_for(&other).is_some());
        assert!(f.records.conversion_ready(&r, || {}));
        // A URL given by the PBX is still passed through.
        let with_url = CallRecord {
            recordings: vec!["https://pbx.example.com/rec/10.mp3".into()],
            ..r
        };
        assert_eq!(
            f.records.url_for(&with_url).as_deref(),
            Some("https://pbx.example.com/rec/10.mp3")
        );
    }

    #[test]
    fn a_recording_whose_path_is_not_utf8_is_not_linked() {
        use std::os::unix::ffi::OsStrExt;
        let f = fixture(|_| {});
        let name = std::ffi::OsStr::from_bytes(b"in-\xff.wav");
        std::fs::write(f.dir.join(name), wav_header(1, 0)).unwrap();
        // Reached through a UTF-8 name, it resolves to the other one.
        std::os::unix::fs::symlink(f.dir.join(name), f.dir.join("in-12.wav")).unwrap();
        let r = record(
            "pbx-12",
            vec![f.dir.join("in-12.wav").display().to_string()],
        );
        assert!(f
            .records
            .link_at(&r, &jiff::tz::TimeZone::UTC, NOW)
            .unwrap()
            .is_none());
        // The next usable recording of the call is linked instead.
        let usable = f.wav("in-13.wav");
        let r = record(
            "pbx-13",
            vec![
                f.dir.join("in-12.wav").display().to_string(),
                usable.clone(),
            ],
        );
        assert_eq!(f.link(&r, NOW).1.path, usable);
    }

    #[test]
    fn a_converted_copy_resolves_with_its_original_as_the_fallback() {
        let f = fixture(|c| c.records.convert = "mp3".into());
        let path = f.wav("in-14.wav");
        std::fs::write(format!("{path}.mp3"), MP3_FRAME).unwrap();
        let r = record("pbx-14", vec![path.clone()]);
        let (id, entry) = f.link(&r, NOW);
        let token = f.records.name(&id, &entry);
        let resolved = f.records.resolve(&token, NOW).unwrap();
        assert_eq!(resolved.file, PathBuf::from(format!("{path}.mp3")));
        assert_eq!(resolved.original, Some(PathBuf::from(&path)));
        // Without the copy, the original is the file, with nothing behind it.
        std::fs::remove_file(format!("{path}.mp3")).unwrap();
        let resolved = f.records.resolve(&token, NOW).unwrap();
        assert_eq!(resolved.file, PathBuf::from(&path));
        assert_eq!(resolved.original, None);
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let f = fixture(|_| {});
        let fifo = f.dir.join("in-15.wav");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo(3) with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send((
                open_regular(&fifo).is_err(),
                sniff::sniff_file(&fifo).is_err(),
            ));
        });
        let refused = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("opening a FIFO does not block");
        assert_eq!(refused, (true, true));
        // A regular file opens, and reads normally.
        let path = f.wav("in-16.wav");
        let file = open_regular(Path::new(&path)).unwrap();
        let mut head = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut head, 0).unwrap();
        assert_eq!(&head, b"RIFF");
    }

    #[tokio::test]
    async fn the_file_a_hook_chose_is_kept_with_the_link_across_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::fs::canonicalize(tmp.path()).unwrap().join("monitor");
        std::fs::create_dir(&dir).unwrap();
        let mut config = Config::default();
        config.records.dir = dir.clone();
        config.hooks.0.insert(
            hook::PROCESS_RECORD_FILE_PATH.into(),
            crate::config::HookConfig {
                command: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    r#"cat >/dev/null; echo '{"state":"success","data":{"path":"mixed.wav"}}'"#
                        .into(),
                ],
                url: String::new(),
                timeout: Duration::from_secs(10),
            },
        );
        let key = || Secret::new("0123456789abcdef0123456789abcdef");
        let mut sound = wav_header(1, 100);
        sound.resize(144, 1);
        std::fs::write(dir.join("in-1.wav"), &sound).unwrap();
        std::fs::write(dir.join("mixed.wav"), &sound).unwrap();
        let r = record("pbx-h1", vec![dir.join("in-1.wav").display().to_string()]);
        let url = {
            let store = Store::open(&tmp.path().join("db")).unwrap();
            let hooks = Hooks::new(&config.hooks, reqwest::Client::new());
            let records = Records::with_hooks(&config, store.records().unwrap(), key(), hooks);
            let url = records.ensure_link(&r, &jiff::tz::TimeZone::UTC).await;
            let counts = records.inner.hooks.stats()[hook::PROCESS_RECORD_FILE_PATH];
            assert_eq!(counts.changed, 1);
            url.unwrap().expect("linked")
        };
        // Another process, without the hook: the link still serves the file it chose.
        let store = Store::open(&tmp.path().join("db")).unwrap();
        let records = Records::new(&config, store.records().unwrap(), key());
        let resolved = records.resolve(name_of(&url), unix_now()).unwrap();
        assert_eq!(resolved.file, dir.join("mixed.wav"));
        assert_eq!(
            resolved.entry.path,
            dir.join("mixed.wav").display().to_string()
        );
    }

    #[test]
    fn missing_directory_links_nothing() {
        let f = fixture(|c| c.records.dir = PathBuf::from("/nonexistent/pbxgate/monitor"));
        let r = record("pbx-9", vec![f.wav("in-9.wav")]);
        assert!(f.records.dir().is_none());
        assert!(!f.records.status().linking);
        assert!(f
            .records
            .link_at(&r, &jiff::tz::TimeZone::UTC, NOW)
            .unwrap()
            .is_none());
        assert!(f.records.url_for(&r).is_none());
    }
}
