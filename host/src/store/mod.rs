//! The durable upstream queue: messages bound upstream, in arrival order.
//!
//! Owns the fjall database under the storage folder. Keys are monotonic
//! big-endian `u64`s given at the intake of the single writer ([`writer`]),
//! which group-commits appends and fsyncs once per batch before anyone is
//! told the messages are durable; meanwhile the live feed ([`live`]) may
//! hand them to the forwarder from memory. Removal is done only by the upstream forwarder, always
//! of a prefix (acknowledged or expired messages), with weak tombstones. The
//! highest key ever assigned is kept in a meta keyspace so keys are never
//! reused. What is sent, when, and to whom is not this module's concern.
//!
//! Layout: `queue` keyspace `key -> record` ([`record`]), `meta` keyspace
//! `"tail" -> next key`, `dead-letters` keyspace `key -> entry`
//! ([`dead_letters`]), and small durable documents such as twins
//! ([`documents`]).

pub mod dead_letters;
pub mod disk;
pub mod documents;
pub mod live;
pub mod record;
pub mod recovery;
pub mod status;
pub mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tokio::sync::watch;

pub use dead_letters::{DeadLetter, Selection};
pub use documents::Documents;
pub use live::{LiveBatch, LiveFeed};
pub use record::Record;
pub use recovery::Recovery;
pub use writer::{AppendError, Appender};

const TAIL_KEY: &[u8] = b"tail";
/// The hub clock at the last write ([`crate::clock`]).
const CLOCK_KEY: &[u8] = b"clock";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage folder {path} is in use by a running hub")]
    Locked { path: String },
    #[error("storage error: {0}")]
    Fjall(#[from] fjall::Error),
    #[error(transparent)]
    Corrupt(#[from] record::CorruptRecord),
    #[error("cannot recover the damaged store at {path}: {source}")]
    Recovery {
        path: String,
        source: std::io::Error,
    },
}

/// A cloneable handle on the queue. Appends go through an [`Appender`].
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    queue: Keyspace,
    meta: Keyspace,
    /// Messages the upstream refused ([`dead_letters`]).
    dead: Keyspace,
    /// Entries in `dead`.
    dead_count: AtomicU64,
    /// Bytes of the entries in `dead`, counted in the quota.
    dead_bytes: AtomicU64,
    /// Lowest key that may still be present; everything below is removed.
    head: AtomicU64,
    /// Everything below is durable (or a gap the writer refused).
    tail: AtomicU64,
    /// The next key the intake gives; at or above `tail`.
    intake: Mutex<u64>,
    /// Encoded bytes given keys and not yet written, for the quota.
    pending: AtomicU64,
    /// Appends offered to the forwarder before they are durable.
    live: live::Tap,
    /// Sum of encoded record sizes in `head..tail`, for the quota.
    bytes: AtomicU64,
    /// Wakes the forwarder when `tail` moves.
    tail_tx: watch::Sender<u64>,
    /// What opening found damaged and kept.
    recovery: Recovery,
    /// Room left on the storage's disk, checked at the intake.
    room: disk::Room,
}

/// What `edgehub queue stats` and the metrics report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueStats {
    pub depth: u64,
    pub bytes: u64,
    /// Enqueue time of the oldest queued message.
    pub oldest_ms: Option<u64>,
}

/// One queued message as read back.
#[derive(Debug, Clone)]
pub struct Stored {
    pub key: u64,
    /// The encoded record, as fjall holds it (not copied).
    pub value: fjall::Slice,
}

impl Stored {
    pub fn size(&self) -> u64 {
        self.value.len() as u64
    }

    pub fn record(&self) -> Result<record::RecordRef<'_>, record::CorruptRecord> {
        record::RecordRef::parse(&self.value)
    }
}

impl Store {
    /// Opens (creating if needed) the queue under `path` and recovers its
    /// head, tail and byte count by one scan.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // Memory is bounded whatever the queue length: small memtables
        // (flushed to tables when full), a small block cache, and a journal
        // cap that forces flushes so old journals are deleted.
        let open = |dir: &Path| {
            Database::builder(dir)
                .cache_size(16 << 20)
                .max_journaling_size(64 << 20)
                .open()
        };
        let (db, recovery) = recovery::open(&path.join("queue"), open).map_err(|e| match e {
            StoreError::Fjall(fjall::Error::Locked) => StoreError::Locked {
                path: path.display().to_string(),
            },
            e => e,
        })?;
        let queue = db.keyspace("queue", || {
            KeyspaceCreateOptions::default().max_memtable_size(8 << 20)
        })?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        let dead = db.keyspace("dead-letters", KeyspaceCreateOptions::default)?;
        let (mut dead_count, mut dead_bytes) = (0u64, 0u64);
        for guard in dead.iter() {
            let (_, v) = guard.into_inner()?;
            dead_count += 1;
            dead_bytes += v.len() as u64;
        }
        let mut head = None;
        let mut last = 0;
        let mut bytes = 0u64;
        for guard in queue.iter() {
            let (k, v) = guard.into_inner()?;
            let key = key_of(&k);
            head.get_or_insert(key);
            last = key;
            bytes += v.len() as u64;
        }
        let saved_tail = meta.get(TAIL_KEY)?.map(|v| key_of(&v)).unwrap_or(1);
        if let Some(v) = meta.get(CLOCK_KEY)? {
            crate::clock::not_before(key_of(&v));
        }
        let tail = saved_tail.max(last + 1);
        let head = head.unwrap_or(tail);
        let (tail_tx, _) = watch::channel(tail);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                queue,
                meta,
                dead,
                dead_count: AtomicU64::new(dead_count),
                dead_bytes: AtomicU64::new(dead_bytes),
                head: AtomicU64::new(head),
                tail: AtomicU64::new(tail),
                intake: Mutex::new(tail),
                pending: AtomicU64::new(0),
                live: live::Tap::default(),
                bytes: AtomicU64::new(bytes),
                tail_tx,
                recovery,
                room: disk::Room::new(path),
            }),
        })
    }

    /// Refuse new messages while the storage's file system has no more than
    /// `floor` bytes free, or the store takes `max` bytes on disk (0: no
    /// such limit).
    pub fn limit_disk(&self, floor: u64, max: u64) {
        self.inner.room.limit(floor, max);
    }

    /// What opening found damaged, set aside and kept.
    pub fn recovery(&self) -> &Recovery {
        &self.inner.recovery
    }

    pub fn head(&self) -> u64 {
        self.inner.head.load(Ordering::Acquire)
    }

    pub fn tail(&self) -> u64 {
        self.inner.tail.load(Ordering::Acquire)
    }

    pub fn bytes(&self) -> u64 {
        self.inner.bytes.load(Ordering::Acquire)
    }

    /// Follows appends as they come, before they are durable (see
    /// [`live`]); one follower at a time.
    pub fn follow_live(&self) -> LiveFeed {
        self.inner.live.follow()
    }

    /// Whether the live follower wants appends now (tests wait for it).
    #[cfg(test)]
    pub(crate) fn live_wanted(&self) -> bool {
        self.inner.live.wanted()
    }

    /// A receiver that changes whenever new messages become durable.
    pub fn watch_tail(&self) -> watch::Receiver<u64> {
        self.inner.tail_tx.subscribe()
    }

    /// Reads up to `max` messages with keys in `from..tail`, in key order.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<Stored>, StoreError> {
        let end = self.tail();
        let mut out = Vec::with_capacity(max.min((end.saturating_sub(from)) as usize));
        if from >= end {
            return Ok(out);
        }
        for guard in self
            .inner
            .queue
            .range(from.to_be_bytes()..end.to_be_bytes())
            .take(max)
        {
            let (k, v) = guard.into_inner()?;
            out.push(Stored {
                key: key_of(&k),
                value: v,
            });
        }
        Ok(out)
    }

    /// Removes every message with a key below `end` (a prefix the forwarder
    /// has had acknowledged or expired); `bytes` is their total size. Not
    /// fsynced: after a crash they are sent again, which at-least-once allows.
    pub fn remove_before(&self, end: u64, bytes: u64) -> Result<(), StoreError> {
        let head = self.head();
        if end <= head {
            return Ok(());
        }
        let mut batch = self.inner.db.batch();
        for key in head..end {
            batch.remove_weak(&self.inner.queue, key.to_be_bytes());
        }
        batch.commit()?;
        self.inner.head.store(end, Ordering::Release);
        self.inner
            .bytes
            .fetch_sub(bytes.min(self.bytes()), Ordering::AcqRel);
        Ok(())
    }

    /// Depth, bytes and the age of the oldest message.
    pub fn stats(&self) -> Result<QueueStats, StoreError> {
        let head = self.head();
        let oldest_ms = match self.inner.queue.range(head.to_be_bytes()..).next() {
            Some(guard) => Some(Record::enqueued_ms_of(&guard.value()?)?),
            None => None,
        };
        Ok(QueueStats {
            depth: self.tail() - head,
            bytes: self.bytes(),
            oldest_ms,
        })
    }

    /// Flushes the journal; called on shutdown so removals are not replayed.
    pub fn sync(&self) -> Result<(), StoreError> {
        Ok(self.inner.db.persist(PersistMode::SyncAll)?)
    }
}

fn key_of(bytes: &[u8]) -> u64 {
    let mut k = [0u8; 8];
    let n = bytes.len().min(8);
    k[8 - n..].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rec(i: u64) -> Record {
        Record {
            enqueued_ms: 1000 + i,
            topic: format!("devices/d/messages/events/n={i}"),
            payload: Bytes::from(i.to_string()),
            ttl_secs: None,
        }
    }

    #[tokio::test]
    async fn appended_messages_are_read_back_in_order_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let (appender, join) = writer::spawn(store.clone(), u64::MAX, 64);
            for chunk in (0..100).collect::<Vec<u64>>().chunks(7) {
                appender
                    .append(chunk.iter().map(|&i| rec(i)).collect())
                    .await
                    .unwrap();
            }
            drop(appender);
            join.join().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let all = store.read_from(store.head(), 1000).unwrap();
        assert_eq!(all.len(), 100);
        for (i, s) in all.iter().enumerate() {
            assert_eq!(Record::decode(&s.value).unwrap(), rec(i as u64));
        }
        assert_eq!(store.stats().unwrap().depth, 100);
        assert_eq!(store.stats().unwrap().oldest_ms, Some(1000));
    }

    #[tokio::test]
    async fn removed_keys_are_never_reused_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first_tail = {
            let store = Store::open(dir.path()).unwrap();
            let (appender, join) = writer::spawn(store.clone(), u64::MAX, 64);
            appender.append((0..10).map(rec).collect()).await.unwrap();
            let all = store.read_from(store.head(), 100).unwrap();
            let bytes = all.iter().map(|s| s.size()).sum();
            store.remove_before(store.tail(), bytes).unwrap();
            assert_eq!(store.stats().unwrap().depth, 0);
            assert_eq!(store.bytes(), 0);
            drop(appender);
            join.join().unwrap();
            store.sync().unwrap();
            store.tail()
        };
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.tail(), first_tail);
        assert_eq!(store.head(), first_tail);
        assert!(store.read_from(0, 100).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_topic_too_long_for_a_record_is_refused_and_the_store_stays_readable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (appender, join) = writer::spawn(store.clone(), u64::MAX, 64);
        let mut long = rec(1);
        long.topic = "x".repeat(70_000);
        let err = appender.append(vec![rec(0), long]).await.unwrap_err();
        assert!(matches!(err, AppendError::TopicTooLong(70_000)), "{err}");
        appender.append(vec![rec(2)]).await.unwrap();
        let all = store.read_from(store.head(), 10).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(Record::decode(&all[0].value).unwrap(), rec(2));
        drop(appender);
        join.join().unwrap();
    }

    #[tokio::test]
    async fn a_full_quota_refuses_the_whole_append_and_keeps_what_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let quota = rec(0).encoded_len() as u64 * 5;
        let (appender, join) = writer::spawn(store.clone(), quota, 64);
        appender.append((0..5).map(rec).collect()).await.unwrap();
        let err = appender.append(vec![rec(5)]).await.unwrap_err();
        assert!(matches!(err, AppendError::QuotaExceeded { .. }), "{err}");
        assert_eq!(store.stats().unwrap().depth, 5);
        drop(appender);
        join.join().unwrap();
    }
}
