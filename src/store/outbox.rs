//! Persistence of the call-history outbox (sled trees, hidden from the rest of the code).
//!
//! Trees: `outbox_pending` (sequence number, big-endian → envelope: arrival order is key order),
//! `outbox_dead` (sequence → envelope with the reason), `outbox_ids` (externalId → where the
//! record is: pending, done or dead; makes enqueue idempotent and keeps done ids for the
//! retention period). Every state change is one sled transaction over the trees it touches.
//! Counters are kept in memory (sled's `len` walks the tree).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use tokio::sync::{mpsc, oneshot};

use super::StoreError;
use crate::calls::CallRecord;

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
}

/// Cheap to clone.
#[derive(Clone)]
pub struct OutboxStore {
    db: sled::Db,
    pending: sled::Tree,
    dead: sled::Tree,
    ids: sled::Tree,
    counts: Arc<Counts>,
    flush: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
}

fn now_ms() -> i64 {
    crate::calls::tracker::now_ms()
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
    pub(super) fn open(db: &sled::Db) -> Result<OutboxStore, StoreError> {
        let pending = db.open_tree("outbox_pending")?;
        let dead = db.open_tree("outbox_dead")?;
        let ids = db.open_tree("outbox_ids")?;
        let counts = Arc::new(Counts::default());
        counts
            .pending
            .store(pending.len() as u64, Ordering::Relaxed);
        counts.dead.store(dead.len() as u64, Ordering::Relaxed);
        let done = ids
            .iter()
            .values()
            .filter_map(Result::ok)
            .filter(|v| serde_json::from_slice::<IdEntry>(v).is_ok_and(|e| e.state == State::Done))
            .count();
        counts.done.store(done as u64, Ordering::Relaxed);
        // Group commit: one flush serves every enqueue waiting at that moment.
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<Result<(), String>>>();
        let flusher = db.clone();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut waiters = vec![first];
                while let Ok(more) = rx.try_recv() {
                    waiters.push(more);
                }
                let result = flusher
                    .flush_async()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string());
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
            counts,
            flush: tx,
        })
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Stores a record (idempotent by externalId). Not yet durable: see [`OutboxStore::flush`].
    pub fn insert(&self, record: CallRecord) -> Result<Enqueued, StoreError> {
        let id = record.external_id.clone();
        if self.ids.contains_key(id.as_bytes())? {
            return Ok(Enqueued::Duplicate);
        }
        let seq = self.db.generate_id()?;
        let now = now_ms();
        let env = Envelope {
            v: 1,
            seq,
            id: id.clone(),
            enqueued_at: now,
            attempts: 0,
            last_error: None,
            dead_at: None,
            record,
        };
        let env_bytes = encode(&env)?;
        let id_bytes = encode(&IdEntry {
            state: State::Pending,
            seq,
            at: now,
        })?;
        let result = (&self.pending, &self.ids).transaction(|(p, i)| {
            if i.get(id.as_bytes())?.is_some() {
                return Ok(Enqueued::Duplicate);
            }
            p.insert(&seq.to_be_bytes(), env_bytes.as_slice())?;
            i.insert(id.as_bytes(), id_bytes.as_slice())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(Enqueued::Queued(seq))
        });
        let outcome = result.map_err(tx_err)?;
        if matches!(outcome, Enqueued::Queued(_)) {
            self.counts.pending.fetch_add(1, Ordering::Relaxed);
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
        let removed = (&self.pending, &self.ids)
            .transaction(|(p, i)| {
                let mut removed = 0u64;
                for (seq, id, entry) in &entries {
                    if p.remove(&seq.to_be_bytes())?.is_some() {
                        removed += 1;
                    }
                    i.insert(id.as_bytes(), entry.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(removed)
            })
            .map_err(tx_err)?;
        self.counts.pending.fetch_sub(
            removed.min(self.counts.pending.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        self.counts.done.fetch_add(removed, Ordering::Relaxed);
        Ok(())
    }

    /// A record the CRM will never accept: set aside with the reason, kept for an operator.
    pub fn mark_dead(&self, env: &Envelope, reason: &str) -> Result<(), StoreError> {
        let now = now_ms();
        let mut dead = env.clone();
        dead.last_error = Some(reason.to_string());
        dead.dead_at = Some(now);
        let bytes = encode(&dead)?;
        let entry = encode(&IdEntry {
            state: State::Dead,
            seq: env.seq,
            at: now,
        })?;
        let moved = (&self.pending, &self.dead, &self.ids)
            .transaction(|(p, d, i)| {
                let was = p.remove(&env.seq.to_be_bytes())?.is_some();
                d.insert(&env.seq.to_be_bytes(), bytes.as_slice())?;
                i.insert(env.id.as_bytes(), entry.as_slice())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(was)
            })
            .map_err(tx_err)?;
        if moved {
            self.counts.pending.fetch_sub(1, Ordering::Relaxed);
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
        let targets: Vec<Envelope> = match id {
            Some(id) => self
                .dead(usize::MAX)?
                .into_iter()
                .filter(|e| e.id == id)
                .collect(),
            None => self.dead(usize::MAX)?,
        };
        let now = now_ms();
        for env in &targets {
            let mut back = env.clone();
            back.dead_at = None;
            back.attempts = 0;
            let bytes = encode(&back)?;
            let entry = encode(&IdEntry {
                state: State::Pending,
                seq: env.seq,
                at: now,
            })?;
            (&self.pending, &self.dead, &self.ids)
                .transaction(|(p, d, i)| {
                    d.remove(&env.seq.to_be_bytes())?;
                    p.insert(&env.seq.to_be_bytes(), bytes.as_slice())?;
                    i.insert(env.id.as_bytes(), entry.as_slice())?;
                    Ok::<_, ConflictableTransactionError<StoreError>>(())
                })
                .map_err(tx_err)?;
            self.counts.dead.fetch_sub(1, Ordering::Relaxed);
            self.counts.pending.fetch_add(1, Ordering::Relaxed);
        }
        Ok(targets.len())
    }

    /// Where a record is, by externalId.
    pub fn state_of(&self, id: &str) -> Result<Option<State>, StoreError> {
        Ok(match self.ids.get(id.as_bytes())? {
            Some(v) => Some(decode::<IdEntry>("outbox_ids", &v)?.state),
            None => None,
        })
    }

    /// Forgets done ids older than `older_than_ms` (the retention); returns how many.
    pub fn purge_done(&self, older_than_ms: i64) -> Result<u64, StoreError> {
        let cutoff = now_ms() - older_than_ms;
        let mut purged = 0;
        for item in self.ids.iter() {
            let (k, v) = item?;
            let entry: IdEntry = decode("outbox_ids", &v)?;
            if entry.state == State::Done && entry.at < cutoff {
                // Only if unchanged meanwhile.
                if self
                    .ids
                    .compare_and_swap(&k, Some(v), None::<&[u8]>)?
                    .is_ok()
                {
                    purged += 1;
                }
            }
        }
        self.counts.done.fetch_sub(
            purged.min(self.counts.done.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        Ok(purged)
    }
}
