//! Persistence of the call-history outbox (sled trees, hidden from the rest of the code).
//!
//! Trees: `outbox_pending` (sequence number, big-endian → envelope: arrival order is key order),
//! `outbox_dead` (sequence → envelope with the reason), `outbox_ids` (externalId → where the
//! record is: pending, done or dead; makes enqueue idempotent and keeps done ids for the
//! retention period), `outbox_done_at` (time done ‖ externalId: the purge reads only the
//! expired end) and `outbox_meta` (a snapshot of the counters). Every state change is one sled
//! transaction over the trees it touches. Nothing walks a whole tree: sled keeps what a walk
//! touches in memory, and a walk over a million records would cost hundreds of MB.
//!
//! The counters live in memory and are written to `outbox_meta` with every group commit (not
//! with every record: a key rewritten by every transaction makes sled free and truncate log
//! segments constantly, which is what exposes sled 0.34's truncation deadlock) and marked clean
//! at shutdown. After a crash, records queued since the last snapshot are counted from the tail
//! of the queue; records uploaded in that last moment may be counted as pending until
//! `pbxgate outbox stats --recount`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use tokio::sync::{mpsc, oneshot};

use crate::calls::CallRecord;
use crate::store::StoreError;

/// A queued call record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(default = "v1")]
    pub v: u32,
    pub seq: u64,
    pub id: String,
    /// Unix milliseconds.
    pub enqueued_at: i64,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Dead records: when and why.
    #[serde(default)]
    pub dead_at: Option<i64>,
    /// Dead records: the configuration they were judged under (a fingerprint); a record set
    /// aside under another configuration is tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// Dead records: set aside by pbxgate itself (the CRM would reject it), not by the CRM.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    pub record: CallRecord,
}

fn v1() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Done,
    Dead,
    /// Taken out of the queue by an operator; the envelope is kept in `outbox_discarded`.
    Discarded,
}

/// What [`OutboxStore::resend`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resent {
    /// Queued again (it was done, discarded, or no longer known).
    Queued(u64),
    /// Still pending: nothing to do.
    AlreadyPending,
    /// It was dead: moved back to pending.
    Retried,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct IdEntry {
    state: State,
    seq: u64,
    /// Unix milliseconds of the last change.
    at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Queued(u64),
    /// Already pending, done or dead under this externalId: stored once.
    Duplicate,
}

#[derive(Debug, Default)]
pub struct Counts {
    pub pending: AtomicU64,
    pub dead: AtomicU64,
    pub done: AtomicU64,
    max_seq: AtomicU64,
}

/// The key of the counters' snapshot in `outbox_meta`.
const SNAPSHOT: &[u8] = b"counters";

/// The counters as last written, and whether the store was closed cleanly after that.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Snapshot {
    #[serde(default = "v1")]
    v: u32,
    pending: u64,
    dead: u64,
    done: u64,
    /// The highest sequence number queued when the snapshot was taken.
    max_seq: u64,
    clean: bool,
}

impl Counts {
    fn snapshot(&self, clean: bool) -> Snapshot {
        Snapshot {
            v: 1,
            pending: self.pending.load(Ordering::Relaxed),
            dead: self.dead.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Relaxed),
            max_seq: self.max_seq.load(Ordering::Relaxed),
            clean,
        }
    }

    fn sub(counter: &AtomicU64, n: u64) {
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
            Some(c.saturating_sub(n))
        });
    }
}

fn write_snapshot(meta: &sled::Tree, snap: &Snapshot) -> Result<(), StoreError> {
    meta.insert(SNAPSHOT, encode(snap)?)?;
    Ok(())
}

/// `outbox_done_at` key: when the record was done, then its id.
fn done_key(at: i64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + id.len());
    k.extend_from_slice(&u64::try_from(at.max(0)).unwrap_or(0).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Cheap to clone.
#[derive(Clone)]
pub struct OutboxStore {
    db: sled::Db,
    pending: sled::Tree,
    dead: sled::Tree,
    ids: sled::Tree,
    done_at: sled::Tree,
    meta: sled::Tree,
    /// seq → envelope an operator discarded.
    discarded: sled::Tree,
    counts: Arc<Counts>,
    flush: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
}

fn now_ms() -> i64 {
    crate::base::clock::now_ms()
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|source| StoreError::Decode {
        key: "outbox".into(),
        source,
    })
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        key: key.to_string(),
        source,
    })
}

fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e),
    }
}

impl OutboxStore {
    /// The call-history queue in `store`. Open it once per process (it starts a group-commit
    /// flusher; needs a tokio runtime).
    pub fn of(store: &crate::store::Store) -> Result<OutboxStore, StoreError> {
        OutboxStore::open(store.db())
    }
}

impl OutboxStore {
    pub(super) fn open(db: &sled::Db) -> Result<OutboxStore, StoreError> {
        let pending = db.open_tree("outbox_pending")?;
        let dead = db.open_tree("outbox_dead")?;
        let ids = db.open_tree("outbox_ids")?;
        let done_at = db.open_tree("outbox_done_at")?;
        let meta = db.open_tree("outbox_meta")?;
        let discarded = db.open_tree("outbox_discarded")?;
        let snap = match meta.get(SNAPSHOT)? {
            Some(v) => {
                let mut snap: Snapshot = decode("outbox_meta", &v)?;
                if !snap.clean {
                    // Records queued after the last snapshot are at the queue's tail.
                    let mut extra = 0u64;
                    for item in pending.range((snap.max_seq.saturating_add(1)).to_be_bytes()..) {
                        let (k, _) = item?;
                        extra += 1;
                        if let Ok(b) = <[u8; 8]>::try_from(k.as_ref()) {
                            snap.max_seq = snap.max_seq.max(u64::from_be_bytes(b));
                        }
                    }
                    snap.pending += extra;
                    tracing::warn!(
                        queued_since_snapshot = extra,
                        "the call history was not closed cleanly; its counters were restored \
                         (records uploaded just before the stop may still count as pending)"
                    );
                }
                snap
            }
            // A new store, or one from before the snapshot existed: count once.
            None => Self::count(&pending, &dead, &ids, &done_at)?,
        };
        // From now on a crash must be recognisable: not clean until `close`.
        write_snapshot(
            &meta,
            &Snapshot {
                clean: false,
                ..snap
            },
        )?;
        db.flush()?;
        let counts = Arc::new(Counts::default());
        counts.pending.store(snap.pending, Ordering::Relaxed);
        counts.dead.store(snap.dead, Ordering::Relaxed);
        counts.done.store(snap.done, Ordering::Relaxed);
        counts.max_seq.store(snap.max_seq, Ordering::Relaxed);
        // Group commit: one flush serves every enqueue waiting at that moment.
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<Result<(), String>>>();
        let flusher = db.clone();
        let (snap_meta, snap_counts) = (meta.clone(), counts.clone());
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut waiters = vec![first];
                while let Ok(more) = rx.try_recv() {
                    waiters.push(more);
                }
                // The counters ride along with the group commit.
                let snapshot = write_snapshot(&snap_meta, &snap_counts.snapshot(false));
                let result = match snapshot {
                    Ok(()) => flusher
                        .flush_async()
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            }
        });
        Ok(OutboxStore {
            db: db.clone(),
            pending,
            dead,
            ids,
            done_at,
            meta,
            discarded,
            counts,
            flush: tx,
        })
    }

    /// Counts every tree once and indexes done ids by time (a new store, or one written before
    /// the snapshot and the index existed).
    fn count(
        pending: &sled::Tree,
        dead: &sled::Tree,
        ids: &sled::Tree,
        done_at: &sled::Tree,
    ) -> Result<Snapshot, StoreError> {
        let mut done = 0u64;
        for item in ids.iter() {
            let (k, v) = item?;
            if let Ok(e) = serde_json::from_slice::<IdEntry>(&v) {
                if e.state == State::Done {
                    done += 1;
                    let id = String::from_utf8_lossy(&k);
                    done_at.insert(done_key(e.at, &id), &[])?;
                }
            }
        }
        let max_seq = match pending.last()? {
            Some((k, _)) => <[u8; 8]>::try_from(k.as_ref()).map_or(0, u64::from_be_bytes),
            None => 0,
        };
        Ok(Snapshot {
            v: 1,
            pending: pending.len() as u64,
            dead: dead.len() as u64,
            done,
            max_seq,
            clean: false,
        })
    }

    /// Counts every record again (walks the trees: for the command line, not the service).
    pub fn recount(&self) -> Result<(), StoreError> {
        let snap = Self::count(&self.pending, &self.dead, &self.ids, &self.done_at)?;
        self.counts.pending.store(snap.pending, Ordering::Relaxed);
        self.counts.dead.store(snap.dead, Ordering::Relaxed);
        self.counts.done.store(snap.done, Ordering::Relaxed);
        write_snapshot(&self.meta, &self.counts.snapshot(false))
    }

    /// Writes the counters as clean; the caller flushes the store next (at shutdown).
    pub fn close(&self) -> Result<(), StoreError> {
        write_snapshot(&self.meta, &self.counts.snapshot(true))
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Stores a record (idempotent by externalId). Not yet durable: see [`OutboxStore::flush`].
    /// A new pending envelope for `record`: its sequence number and the encoded envelope and
    /// id-index entry (written by the caller's transaction).
    fn fresh_pending(
        &self,
        id: &str,
        record: CallRecord,
    ) -> Result<(u64, Vec<u8>, Vec<u8>), StoreError> {
        let seq = self.db.generate_id()?;
        let now = now_ms();
        let env = Envelope {
            v: 1,
            seq,
            id: id.to_string(),
            enqueued_at: now,
            attempts: 0,
            last_error: None,
            dead_at: None,
            config: None,
            held: false,
            record,
        };
        let id_entry = IdEntry {
            state: State::Pending,
            seq,
            at: now,
        };
        Ok((seq, encode(&env)?, encode(&id_entry)?))
    }

    pub fn insert(&self, record: CallRecord) -> Result<Enqueued, StoreError> {
        let id = record.external_id.clone();
        if self.ids.contains_key(id.as_bytes())? {
            return Ok(Enqueued::Duplicate);
        }
        let (seq, env_bytes, id_bytes) = self.fresh_pending(&id, record)?;
        let result = (&self.pending, &self.ids).transaction(|(p, i)| {
            if i.get(id.as_bytes())?.is_some() {
                return Ok(Enqueued::Duplicate);
            }
            p.insert(&seq.to_be_bytes(), env_bytes.as_slice())?;
            i.insert(id.as_bytes(), id_bytes.as_slice())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(Enqueued::Queued(seq))
        });
        let outcome = result.map_err(tx_err)?;
        if let Enqueued::Queued(seq) = outcome {
            self.counts.pending.fetch_add(1, Ordering::Relaxed);
            self.counts.max_seq.fetch_max(seq, Ordering::Relaxed);
        }
        Ok(outcome)
    }

    /// Makes everything written so far durable; concurrent callers share one flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        if self.flush.send(tx).is_err() {
            self.db.flush_async().await?;
            return Ok(());
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Sled(sled::Error::ReportableBug(e))),
            Err(_) => Err(StoreError::Sled(sled::Error::ReportableBug(
                "flusher stopped".into(),
            ))),
        }
    }

    /// Up to `limit` pending envelopes in arrival order, starting after `after` (exclusive),
    /// that `keep` accepts. Reads lazily: never the whole queue.
    pub fn pending(
        &self,
        after: Option<u64>,
        limit: usize,
        mut keep: impl FnMut(&Envelope) -> bool,
    ) -> Result<Vec<Envelope>, StoreError> {
        let start = after.map_or(0, |s| s.saturating_add(1));
        let mut out = Vec::with_capacity(limit.min(64));
        for item in self.pending.range(start.to_be_bytes()..) {
            let (_, v) = item?;
            let env: Envelope = decode("outbox_pending", &v)?;
            if keep(&env) {
                out.push(env);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The oldest pending record's enqueue time.
    pub fn oldest_pending(&self) -> Result<Option<i64>, StoreError> {
        match self.pending.first()? {
            Some((_, v)) => Ok(Some(decode::<Envelope>("outbox_pending", &v)?.enqueued_at)),
            None => Ok(None),
        }
    }

    /// Uploaded (or reported as already known by the CRM): leaves the queue.
    pub fn mark_done(&self, envs: &[Envelope]) -> Result<(), StoreError> {
        let now = now_ms();
        let entries: Vec<(u64, String, Vec<u8>)> = envs
            .iter()
            .map(|e| {
                Ok((
                    e.seq,
                    e.id.clone(),
                    encode(&IdEntry {
                        state: State::Done,
                        seq: e.seq,
                        at: now,
                    })?,
                ))
            })
            .collect::<Result<_, StoreError>>()?;
        let removed = (&self.pending, &self.ids, &self.done_at)
            .transaction(|(p, i, d)| {
                let mut removed = 0u64;
                for (seq, id, entry) in &entries {
                    if p.remove(&seq.to_be_bytes())?.is_some() {
                        removed += 1;
                        i.insert(id.as_bytes(), entry.as_slice())?;
                        d.insert(done_key(now, id), &[])?;
                    }
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(removed)
            })
            .map_err(tx_err)?;
        Counts::sub(&self.counts.pending, removed);
        self.counts.done.fetch_add(removed, Ordering::Relaxed);
        Ok(())
    }

    /// A record the CRM will never accept: set aside with the reason, kept for an operator.
    pub fn mark_dead(&self, env: &Envelope, reason: &str) -> Result<(), StoreError> {
        let mut dead = env.clone();
        dead.last_error = Some(reason.to_string());
        self.set_aside(dead)
    }

    /// Sets a record aside as dead with what `env` says (reason, configuration, held).
    pub fn set_aside(&self, mut dead: Envelope) -> Result<(), StoreError> {
        let now = now_ms();
        let env = &dead.clone();
        dead.dead_at = Some(now);
        let bytes = encode(&dead)?;
        let entry = encode(&IdEntry {
            state: State::Dead,
            seq: env.seq,
            at: now,
        })?;
        let moved = (&self.pending, &self.dead, &self.ids)
            .transaction(|(p, d, i)| {
                if p.remove(&env.seq.to_be_bytes())?.is_none() {
                    return Ok(false);
                }
                d.insert(&env.seq.to_be_bytes(), bytes.as_slice())?;
                i.insert(env.id.as_bytes(), entry.as_slice())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(true)
            })
            .map_err(tx_err)?;
        if moved {
            Counts::sub(&self.counts.pending, 1);
            self.counts.dead.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Counts a failed attempt on records that stay pending.
    pub fn record_failure(&self, envs: &[Envelope], error: &str) -> Result<(), StoreError> {
        for e in envs {
            let mut e = e.clone();
            e.attempts = e.attempts.saturating_add(1);
            e.last_error = Some(error.chars().take(500).collect());
            let bytes = encode(&e)?;
            // Only if still pending (compare-and-swap would be stricter; the uploader is the only writer).
            if self.pending.contains_key(e.seq.to_be_bytes())? {
                self.pending.insert(e.seq.to_be_bytes(), bytes)?;
            }
        }
        Ok(())
    }

    /// Dead records, oldest first.
    pub fn dead(&self, limit: usize) -> Result<Vec<Envelope>, StoreError> {
        self.dead
            .iter()
            .take(limit)
            .map(|i| decode("outbox_dead", &i?.1))
            .collect()
    }

    /// Pending records, oldest first.
    pub fn list_pending(&self, limit: usize) -> Result<Vec<Envelope>, StoreError> {
        self.pending(None, limit, |_| true)
    }

    /// Moves dead records back to pending (all, or the one with this externalId). Returns how many.
    pub fn retry(&self, id: Option<&str>) -> Result<usize, StoreError> {
        self.retry_where(|e| id.is_none_or(|id| e.id == id))
    }

    /// Moves back to pending the dead records judged under another configuration than
    /// `fingerprint`. Returns how many.
    pub fn retry_changed(&self, fingerprint: &str) -> Result<usize, StoreError> {
        self.retry_where(|e| e.config.as_deref() != Some(fingerprint))
    }

    fn retry_where(&self, which: impl Fn(&Envelope) -> bool) -> Result<usize, StoreError> {
        let targets: Vec<Envelope> = self
            .dead(usize::MAX)?
            .into_iter()
            .filter(|e| which(e))
            .collect();
        let now = now_ms();
        for env in &targets {
            let mut back = env.clone();
            back.dead_at = None;
            back.attempts = 0;
            back.config = None;
            back.held = false;
            let bytes = encode(&back)?;
            let entry = encode(&IdEntry {
                state: State::Pending,
                seq: env.seq,
                at: now,
            })?;
            let moved = (&self.pending, &self.dead, &self.ids)
                .transaction(|(p, d, i)| {
                    if d.remove(&env.seq.to_be_bytes())?.is_none() {
                        return Ok(false);
                    }
                    p.insert(&env.seq.to_be_bytes(), bytes.as_slice())?;
                    i.insert(env.id.as_bytes(), entry.as_slice())?;
                    Ok::<_, ConflictableTransactionError<StoreError>>(true)
                })
                .map_err(tx_err)?;
            if moved {
                Counts::sub(&self.counts.dead, 1);
                self.counts.pending.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(targets.len())
    }

    /// Takes a pending or dead record out of the queue for good (an operator's decision): the
    /// envelope is kept as discarded, with `reason`. Returns the state it left, `None` when no
    /// pending or dead record has this id.
    pub fn discard(&self, id: &str, reason: &str) -> Result<Option<State>, StoreError> {
        let Some((state, Some(env))) = self.find(id)? else {
            return Ok(None);
        };
        let from = match state {
            State::Pending => &self.pending,
            State::Dead => &self.dead,
            State::Done | State::Discarded => return Ok(None),
        };
        let now = now_ms();
        let mut kept = env.clone();
        kept.last_error = Some(reason.chars().take(500).collect());
        kept.dead_at = Some(now);
        let bytes = encode(&kept)?;
        let entry = encode(&IdEntry {
            state: State::Discarded,
            seq: env.seq,
            at: now,
        })?;
        let moved = (from, &self.discarded, &self.ids)
            .transaction(|(f, d, i)| {
                if f.remove(&env.seq.to_be_bytes())?.is_none() {
                    return Ok(false);
                }
                d.insert(&env.seq.to_be_bytes(), bytes.as_slice())?;
                i.insert(env.id.as_bytes(), entry.as_slice())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(true)
            })
            .map_err(tx_err)?;
        if !moved {
            return Ok(None);
        }
        match state {
            State::Pending => Counts::sub(&self.counts.pending, 1),
            _ => Counts::sub(&self.counts.dead, 1),
        }
        Ok(Some(state))
    }

    /// Queues a call again on an operator's request, although its id was seen: a done or
    /// discarded record is queued anew (under a new sequence number), a dead one goes back to
    /// pending, a pending one stays as it is. Not yet durable: see [`OutboxStore::flush`].
    pub fn resend(&self, record: CallRecord) -> Result<Resent, StoreError> {
        let id = record.external_id.clone();
        let previous = match self.ids.get(id.as_bytes())? {
            Some(v) => Some(decode::<IdEntry>("outbox_ids", &v)?),
            None => None,
        };
        match previous.as_ref().map(|e| e.state) {
            Some(State::Pending) => return Ok(Resent::AlreadyPending),
            Some(State::Dead) => {
                self.retry(Some(&id))?;
                return Ok(Resent::Retried);
            }
            _ => {}
        }
        let (seq, env_bytes, id_bytes) = self.fresh_pending(&id, record)?;
        let was_done = previous.as_ref().filter(|e| e.state == State::Done);
        let done_entry = was_done.map(|e| done_key(e.at, &id));
        let old_discarded = previous
            .as_ref()
            .filter(|e| e.state == State::Discarded)
            .map(|e| e.seq);
        (&self.pending, &self.ids, &self.done_at, &self.discarded)
            .transaction(|(p, i, d, x)| {
                p.insert(&seq.to_be_bytes(), env_bytes.as_slice())?;
                i.insert(id.as_bytes(), id_bytes.as_slice())?;
                if let Some(k) = &done_entry {
                    d.remove(k.as_slice())?;
                }
                if let Some(old) = old_discarded {
                    x.remove(&old.to_be_bytes())?;
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(tx_err)?;
        if was_done.is_some() {
            Counts::sub(&self.counts.done, 1);
        }
        self.counts.pending.fetch_add(1, Ordering::Relaxed);
        self.counts.max_seq.fetch_max(seq, Ordering::Relaxed);
        Ok(Resent::Queued(seq))
    }

    /// Where a record is, by externalId.
    pub fn state_of(&self, id: &str) -> Result<Option<State>, StoreError> {
        Ok(match self.ids.get(id.as_bytes())? {
            Some(v) => Some(decode::<IdEntry>("outbox_ids", &v)?.state),
            None => None,
        })
    }

    /// A record still held (pending or dead) by externalId, with its state; a done record is
    /// not kept (only its id, as [`State::Done`] with no envelope).
    pub fn find(&self, id: &str) -> Result<Option<(State, Option<Envelope>)>, StoreError> {
        let Some(v) = self.ids.get(id.as_bytes())? else {
            return Ok(None);
        };
        let entry: IdEntry = decode("outbox_ids", &v)?;
        let (tree, name) = match entry.state {
            State::Pending => (&self.pending, "outbox_pending"),
            State::Dead => (&self.dead, "outbox_dead"),
            State::Discarded => (&self.discarded, "outbox_discarded"),
            State::Done => return Ok(Some((State::Done, None))),
        };
        let envelope = match tree.get(entry.seq.to_be_bytes())? {
            Some(bytes) => Some(decode(name, &bytes)?),
            None => None,
        };
        Ok(Some((entry.state, envelope)))
    }

    /// Forgets done ids older than `older_than_ms` (the retention); returns how many. Reads
    /// only the expired end of `outbox_done_at`, in transactions of at most 512 ids.
    pub fn purge_done(&self, older_than_ms: i64) -> Result<u64, StoreError> {
        let cutoff = done_key(now_ms() - older_than_ms, "");
        let mut purged = 0u64;
        loop {
            let keys: Vec<sled::IVec> = self
                .done_at
                .range(..cutoff.as_slice())
                .keys()
                .take(512)
                .collect::<Result<_, _>>()?;
            if keys.is_empty() {
                return Ok(purged);
            }
            let n = (&self.ids, &self.done_at)
                .transaction(|(i, d)| {
                    let mut n = 0u64;
                    for k in &keys {
                        d.remove(k)?;
                        let id = &k[8..];
                        // Only if still done (a done id never changes state, but be sure).
                        let still_done = i.get(id)?.is_some_and(|v| {
                            serde_json::from_slice::<IdEntry>(&v)
                                .is_ok_and(|e| e.state == State::Done)
                        });
                        if still_done {
                            i.remove(id)?;
                            n += 1;
                        }
                    }
                    Ok::<_, ConflictableTransactionError<StoreError>>(n)
                })
                .map_err(tx_err)?;
            Counts::sub(&self.counts.done, n);
            purged += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn record(id: &str) -> CallRecord {
        CallRecord::sample(id)
    }

    /// Opens the store at `path` and queues a record for each id.
    fn open_with(path: &std::path::Path, ids: &[&str]) -> (Store, OutboxStore) {
        let store = Store::open(path).unwrap();
        let q = OutboxStore::of(&store).unwrap();
        for id in ids {
            q.insert(record(id)).unwrap();
        }
        (store, q)
    }

    fn counts(q: &OutboxStore) -> (u64, u64, u64) {
        let c = q.counts();
        (
            c.pending.load(Ordering::Relaxed),
            c.done.load(Ordering::Relaxed),
            c.dead.load(Ordering::Relaxed),
        )
    }

    // Multi-threaded: the dropped store's flusher task must run to release sled's lock.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counters_follow_every_transition_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let (_store, q) = open_with(&path, &["a", "b", "c", "d"]);
            assert_eq!(q.insert(record("a")).unwrap(), Enqueued::Duplicate);
            let envs = q.pending(None, 10, |_| true).unwrap();
            q.mark_done(&envs[..2]).unwrap();
            // Done twice: counted once.
            q.mark_done(&envs[..1]).unwrap();
            q.mark_dead(&envs[2], "bad phone").unwrap();
            assert_eq!(counts(&q), (1, 2, 1));
            q.flush().await.unwrap();
        }
        let store = Store::open(&path).unwrap();
        let q = OutboxStore::of(&store).unwrap();
        assert_eq!(counts(&q), (1, 2, 1), "read back, not recounted");
        assert_eq!(q.retry(None).unwrap(), 1);
        assert_eq!(counts(&q), (2, 2, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_crash_the_queue_tail_is_counted_and_a_recount_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = Store::open(&path).unwrap();
            let q = OutboxStore::of(&store).unwrap();
            q.insert(record("a")).unwrap();
            q.insert(record("b")).unwrap();
            // A group commit writes the counters.
            q.flush().await.unwrap();
            // Then a crash after more records became durable, without a snapshot.
            q.insert(record("c")).unwrap();
            let envs = q.pending(None, 1, |_| true).unwrap();
            q.mark_done(&envs).unwrap();
            store.flush().await.unwrap();
        }
        let store = Store::open(&path).unwrap();
        let q = OutboxStore::of(&store).unwrap();
        // "c" is found at the tail; "a" was uploaded in the last moment: still counted.
        assert_eq!(counts(&q), (3, 0, 0));
        q.recount().unwrap();
        assert_eq!(counts(&q), (2, 1, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clean_close_keeps_exact_counters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let (store, q) = open_with(&path, &["a", "b", "c"]);
            let envs = q.pending(None, 1, |_| true).unwrap();
            q.mark_done(&envs).unwrap();
            q.close().unwrap();
            store.flush().await.unwrap();
        }
        let store = Store::open(&path).unwrap();
        let q = OutboxStore::of(&store).unwrap();
        assert_eq!(counts(&q), (2, 1, 0));
        // Reopened: not clean any more until the next close.
        let snap: Snapshot = decode("meta", &q.meta.get(SNAPSHOT).unwrap().unwrap()).unwrap();
        assert!(!snap.clean);
    }

    #[tokio::test]
    async fn the_purge_forgets_only_expired_done_ids() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, q) = open_with(&dir.path().join("db"), &["a", "b", "c"]);
        let envs = q.pending(None, 10, |_| true).unwrap();
        q.mark_done(&envs[..2]).unwrap();
        assert_eq!(q.purge_done(3_600_000).unwrap(), 0, "not expired yet");
        assert_eq!(q.state_of("a").unwrap(), Some(State::Done));
        // A retention of "minus a minute" puts every done id past it.
        assert_eq!(q.purge_done(-60_000).unwrap(), 2);
        assert_eq!(q.state_of("a").unwrap(), None);
        assert_eq!(q.state_of("c").unwrap(), Some(State::Pending));
        assert_eq!(counts(&q), (1, 0, 0));
        // Forgotten: the same id may be queued again.
        assert!(matches!(
            q.insert(record("a")).unwrap(),
            Enqueued::Queued(_)
        ));
    }

    #[tokio::test]
    async fn discarded_records_leave_the_queue_and_a_resend_queues_any_call_again() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, q) = open_with(&dir.path().join("db"), &["a", "b", "c", "d"]);
        let envs = q.pending(None, 10, |_| true).unwrap();
        q.mark_dead(&envs[1], "bad phone").unwrap();
        q.mark_done(&envs[2..3]).unwrap();
        assert_eq!(counts(&q), (2, 1, 1));
        assert_eq!(q.discard("a", "operator").unwrap(), Some(State::Pending));
        assert_eq!(q.discard("b", "operator").unwrap(), Some(State::Dead));
        assert_eq!(
            q.discard("c", "operator").unwrap(),
            None,
            "done: not queued"
        );
        assert_eq!(q.discard("zz", "operator").unwrap(), None);
        assert_eq!(counts(&q), (1, 1, 0));
        let (state, kept) = q.find("b").unwrap().unwrap();
        assert_eq!(state, State::Discarded);
        assert_eq!(kept.unwrap().last_error.as_deref(), Some("operator"));
        // The plain insert still deduplicates; a resend does not.
        assert_eq!(q.insert(record("c")).unwrap(), Enqueued::Duplicate);
        assert!(matches!(q.resend(record("c")).unwrap(), Resent::Queued(_)));
        assert!(matches!(q.resend(record("b")).unwrap(), Resent::Queued(_)));
        assert_eq!(q.resend(record("d")).unwrap(), Resent::AlreadyPending);
        assert_eq!(counts(&q), (3, 0, 0));
        assert_eq!(q.state_of("b").unwrap(), Some(State::Pending));
        let envs = q.pending(None, 10, |e| e.id == "c").unwrap();
        q.mark_dead(&envs[0], "rejected").unwrap();
        assert_eq!(q.resend(record("c")).unwrap(), Resent::Retried);
        assert_eq!(counts(&q), (3, 0, 0));
        assert_eq!(
            q.purge_done(-60_000).unwrap(),
            0,
            "no stale done index entry"
        );
    }

    // Multi-threaded: the dropped store's flusher task must run to release sled's lock.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_without_counters_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let (store, q) = open_with(&path, &["a", "b", "c"]);
            let envs = q.pending(None, 10, |_| true).unwrap();
            q.mark_done(&envs[..1]).unwrap();
            // As written before the counters' snapshot and the done index existed.
            q.meta.clear().unwrap();
            q.done_at.clear().unwrap();
            store.flush().await.unwrap();
        }
        let store = Store::open(&path).unwrap();
        let q = OutboxStore::of(&store).unwrap();
        assert_eq!(counts(&q), (2, 1, 0));
        assert_eq!(
            q.purge_done(-60_000).unwrap(),
            1,
            "the done index was rebuilt"
        );
    }
}
