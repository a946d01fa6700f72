//! The durable upstream queue: messages bound upstream, in arrival order
//! within each lane (a route's priority, [`lane`]).
//!
//! Owns the fjall database under the storage folder. Keys are monotonic
//! big-endian `u64`s within their lane, given at the intake of the single
//! writer ([`writer`]),
//! which group-commits appends and fsyncs once per batch before anyone is
//! told the messages are durable; meanwhile the live feed ([`live`]) may
//! hand them to the forwarder from memory. Removal is done only by the
//! upstream forwarder, always of a lane's prefix (acknowledged or expired
//! messages), by moving the lane's head: no tombstones. What is below a
//! head is dropped from disk a whole table
//! at a time, and from tables that are compacted anyway by a compaction
//! filter ([`Store::give_back`]). The highest key ever assigned is kept in
//! a meta keyspace so keys are never reused. What is sent, when, and to
//! whom is not this module's concern.
//!
//! Layout: `queue` keyspace `key -> record` ([`record`]), `meta` keyspace
//! `"tail" -> next key` and `"head" -> first key not removed` per lane
//! (`"tail.3"` for lane 3),
//! `dead-letters` keyspace `key -> entry` ([`dead_letters`]), and small
//! durable documents such as twins ([`documents`]).

pub mod dead_letters;
pub mod disk;
pub mod documents;
mod journal;
pub mod lane;
pub mod live;
pub mod record;
pub mod recovery;
mod salvage;
pub mod status;
pub mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fjall::compaction::filter as compaction;
use fjall::{AbstractTree, Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

pub use dead_letters::{DeadLetter, Selection};
pub use documents::Documents;
pub use lane::LANES;
pub use live::{LiveBatch, LiveFeed};
pub use record::Record;
pub use recovery::Recovery;
pub use writer::{AppendError, Appender};

/// A lane's next key ([`lane::meta_key`]).
const TAIL: &str = "tail";
/// Everything in the lane below it is removed (sent, expired or
/// dead-lettered).
const HEAD: &str = "head";
/// Bytes an empty queue may leave on disk before its memtables are
/// flushed so the journals can be deleted.
const EMPTY_SLACK: u64 = 4 << 20;
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
    /// Per lane, the lowest key that may still be present; everything
    /// below is removed (shared with the compaction filter that drops it).
    head: Arc<lane::PerLane>,
    /// Per lane, everything below is durable (or a gap the writer refused).
    tail: lane::PerLane,
    /// Per lane, the next key the intake gives; at or above `tail`.
    intake: Mutex<[u64; LANES]>,
    /// Encoded bytes given keys and not yet written, for the quota.
    pending: AtomicU64,
    /// Appends offered to the forwarder before they are durable.
    live: live::Tap,
    /// Sum of encoded record sizes in every lane's `head..tail`, for the
    /// quota.
    bytes: AtomicU64,
    /// Wakes the forwarder when a `tail` moves: counts the commits.
    tail_tx: watch::Sender<u64>,
    /// What opening found damaged and kept.
    recovery: Recovery,
    /// Room left on the storage's disk, checked at the intake.
    room: disk::Room,
    /// What [`Store::give_back`] did last.
    give_back: Mutex<GiveBack>,
    /// The database's folder.
    dir: std::path::PathBuf,
    /// Cancelled once damage or a failed write is found while running
    /// ([`Store::broken`]).
    broken: CancellationToken,
}

struct GiveBack {
    /// Per lane, the head the last table drop was up to.
    dropped_below: [u64; LANES],
    step: Step,
    /// The database's write sequence number and the size of its tables when
    /// the folder was last found with nothing to give back: while both stay
    /// the same, nothing was written, flushed or compacted, and the folder
    /// is not read again (an idle hub would otherwise read it every second).
    settled_at: Option<(u64, u64)>,
    /// Times the folder was read.
    #[cfg(test)]
    reads: u64,
    /// Times the memtables were flushed to give an empty queue's disk back.
    #[cfg(test)]
    flushes: u64,
}

/// Where giving back an empty queue's disk is.
#[derive(Clone, Copy)]
enum Step {
    Idle,
    /// Memtables are being flushed, so the journals can go.
    Flushing,
    /// Tables were dropped; their files go at the next rotation.
    Collecting,
}

/// Drops the queue's records below their lane's head whenever fjall
/// compacts a table: what is removed leaves the disk without a tombstone.
struct BelowHead(Arc<lane::PerLane>);

impl compaction::Factory for BelowHead {
    fn name(&self) -> &str {
        "below-head"
    }

    fn make_filter(&self, _: &compaction::Context) -> Box<dyn compaction::CompactionFilter> {
        Box::new(BelowHeadFilter(self.0.all()))
    }
}

struct BelowHeadFilter([u64; LANES]);

impl compaction::CompactionFilter for BelowHeadFilter {
    fn filter_item(
        &mut self,
        item: compaction::ItemAccessor<'_>,
        _: &compaction::Context,
    ) -> compaction::CompactionFilterResult {
        let key = key_of(item.key());
        Ok(if key < self.0[lane::lane_of(key)] {
            compaction::Verdict::Remove
        } else {
            compaction::Verdict::Keep
        })
    }
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
        // Nothing is dropped until the head is known.
        let shared_head = Arc::new(lane::PerLane::new([0; LANES]));
        let filter: Arc<dyn compaction::Factory> = Arc::new(BelowHead(shared_head.clone()));
        let open = |dir: &Path| {
            let filter = filter.clone();
            Database::builder(dir)
                .cache_size(4 << 20)
                .max_journaling_size(64 << 20)
                .with_compaction_filter_factories(Arc::new(move |name: &str| {
                    (name == "queue").then(|| filter.clone())
                }))
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
        let (mut tails, mut bytes) = ([0; LANES], 0u64);
        for (lane, tail) in tails.iter_mut().enumerate() {
            let (head, t, b) = scan_lane(&queue, &meta, lane)?;
            *tail = t;
            bytes += b;
            shared_head.set(lane, head);
        }
        if let Some(v) = meta.get(CLOCK_KEY)? {
            crate::clock::not_before(key_of(&v));
        }
        let (tail_tx, _) = watch::channel(0);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                queue,
                meta,
                dead,
                dead_count: AtomicU64::new(dead_count),
                dead_bytes: AtomicU64::new(dead_bytes),
                head: shared_head,
                tail: lane::PerLane::new(tails),
                intake: Mutex::new(tails),
                pending: AtomicU64::new(0),
                live: live::Tap::default(),
                bytes: AtomicU64::new(bytes),
                tail_tx,
                recovery,
                room: disk::Room::new(path),
                dir: path.join("queue"),
                broken: CancellationToken::new(),
                give_back: Mutex::new(GiveBack {
                    // What an earlier run left below the head goes first.
                    dropped_below: [0; LANES],
                    step: Step::Idle,
                    settled_at: None,
                    #[cfg(test)]
                    reads: 0,
                    #[cfg(test)]
                    flushes: 0,
                }),
            }),
        })
    }

    /// Refuse new messages while the storage's file system has no more than
    /// `floor` bytes free, or the store takes `max` bytes on disk (0: no
    /// such limit).
    pub fn limit_disk(&self, floor: u64, max: u64) {
        self.inner.room.limit(floor, max);
    }

    /// Whether new messages may be stored (the disk's floor and the
    /// store's size on disk, see [`Store::limit_disk`]). Every writer of
    /// new messages asks: a write that meets a full disk would stop them
    /// all.
    pub fn room(&self) -> Result<(), disk::NoRoom> {
        self.inner.room.check()
    }

    /// Resolves once damage (a block whose checksum fails, say) or a
    /// failed write has been found while the hub runs. The database cannot
    /// be trusted until it is opened again, and opening repairs what can
    /// be repaired ([`recovery`]): its owner stops everything that holds
    /// the store and opens it again.
    pub fn broken(&self) -> WaitForCancellationFutureOwned {
        self.inner.broken.clone().cancelled_owned()
    }

    /// Says the store is broken ([`Store::broken`]), once, with why.
    pub(crate) fn report_broken(&self, what: &str, error: &dyn std::fmt::Display) {
        if !self.inner.broken.is_cancelled() {
            tracing::error!(%error, "{what}: the store is damaged or cannot be written, and is opened again to repair it");
            self.inner.broken.cancel();
        }
    }

    /// Passes `result` on, first reporting the store broken when its error
    /// says the data on disk is damaged (a checksum, a block that does not
    /// decode) or the database refuses everything (poisoned by a failed
    /// write). Any other error (a lock, a full disk) is passed on only.
    fn checked<T>(&self, what: &str, result: Result<T, fjall::Error>) -> Result<T, StoreError> {
        result.map_err(|e| {
            if recovery::is_damage(&e) || matches!(e, fjall::Error::Poisoned) {
                self.report_broken(what, &e);
            }
            StoreError::Fjall(e)
        })
    }

    /// What opening found damaged, set aside and kept.
    pub fn recovery(&self) -> &Recovery {
        &self.inner.recovery
    }

    /// The first key of `lane` not removed.
    pub fn head(&self, lane: usize) -> u64 {
        self.inner.head.get(lane)
    }

    /// Every key of `lane` below it is durable.
    pub fn tail(&self, lane: usize) -> u64 {
        self.inner.tail.get(lane)
    }

    pub fn heads(&self) -> [u64; LANES] {
        self.inner.head.all()
    }

    pub fn tails(&self) -> [u64; LANES] {
        self.inner.tail.all()
    }

    /// Messages queued, in every lane.
    pub fn depth(&self) -> u64 {
        (0..LANES).map(|l| self.tail(l) - self.head(l)).sum()
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

    /// Reads up to `max` messages with keys in `from..tail` of `from`'s
    /// lane (and not below its head), in key order.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<Stored>, StoreError> {
        let lane = lane::lane_of(from);
        let from = from.max(self.head(lane));
        let end = self.tail(lane);
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
            let (k, v) = self.checked("reading the queue", guard.into_inner())?;
            out.push(Stored {
                key: key_of(&k),
                value: v,
            });
        }
        Ok(out)
    }

    /// Removes every message of `end`'s lane with a key below `end` (a
    /// prefix the forwarder has had acknowledged or expired) by moving the
    /// lane's head there; `bytes` is their total size. Not fsynced: after a
    /// crash they are sent again, which at-least-once allows. (A compaction
    /// may drop them from disk before the new head is durable: then the
    /// first key left is the head.)
    pub fn remove_before(&self, end: u64, bytes: u64) -> Result<(), StoreError> {
        let lane = lane::lane_of(end);
        if end <= self.head(lane) {
            return Ok(());
        }
        self.inner
            .meta
            .insert(lane::meta_key(HEAD, lane), end.to_be_bytes())?;
        self.inner.head.set(lane, end);
        self.inner
            .bytes
            .fetch_sub(bytes.min(self.bytes()), Ordering::AcqRel);
        Ok(())
    }

    /// Depth, bytes and the age of the oldest message, over every lane.
    pub fn stats(&self) -> Result<QueueStats, StoreError> {
        let mut oldest_ms: Option<u64> = None;
        for lane in 0..LANES {
            let (head, tail) = (self.head(lane), self.tail(lane));
            if head == tail {
                continue;
            }
            let range = head.to_be_bytes()..tail.to_be_bytes();
            if let Some(guard) = self.inner.queue.range(range).next() {
                let ms = Record::enqueued_ms_of(&guard.value()?)?;
                oldest_ms = Some(oldest_ms.map_or(ms, |o| o.min(ms)));
            }
        }
        Ok(QueueStats {
            depth: self.depth(),
            bytes: self.bytes(),
            oldest_ms,
        })
    }

    /// Gives back the disk that removed messages take. While the queue
    /// drains, tables holding only removed messages are dropped whole. Once
    /// it is empty, the memtables are flushed (so the journals, which hold
    /// every message written, can be deleted) and the queue is compacted,
    /// which the compaction filter empties of everything below the head and
    /// which deletes the dropped tables' files. The forwarder calls it about
    /// once a second.
    pub fn give_back(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let heads = self.heads();
        let mut state = inner.give_back.lock().expect("give back");
        let drop_below = |lane: usize, head: u64| {
            let (start, head) = (lane::start(lane).to_be_bytes(), head.to_be_bytes());
            inner
                .queue
                .tree
                .drop_range::<&[u8], _>(&start[..]..&head[..])
                .map_err(fjall::Error::from)
        };
        for (lane, &head) in heads.iter().enumerate() {
            if head != state.dropped_below[lane] && inner.queue.table_count() > 0 {
                drop_below(lane, head)?;
                state.dropped_below[lane] = head;
            }
        }
        state.step = match state.step {
            Step::Idle if self.depth() == 0 => {
                // fjall's next sequence number (doc-hidden, but what every
                // write moves) and what its tables take.
                let mark = inner.db.disk_space().ok().map(|s| (inner.db.seqno(), s));
                if mark.is_some() && mark == state.settled_at {
                    Step::Idle
                } else {
                    #[cfg(test)]
                    {
                        state.reads += 1;
                    }
                    // Only the queue's own tables: the dead letters and the
                    // broker's keyspaces in the same database are kept on
                    // purpose, and counting them made an empty queue flush
                    // and compact again every few seconds once they passed
                    // the slack.
                    let own = [&inner.queue, &inner.meta]
                        .map(|k| disk::allocated_tables(k.path()))
                        .iter()
                        .sum::<u64>();
                    if own > EMPTY_SLACK {
                        for keyspace in [&inner.queue, &inner.meta, &inner.dead] {
                            keyspace.rotate_memtable()?;
                        }
                        #[cfg(test)]
                        {
                            state.flushes += 1;
                        }
                        Step::Flushing
                    } else {
                        if inner.db.outstanding_flushes() == 0 {
                            state.settled_at = mark;
                        }
                        Step::Idle
                    }
                }
            }
            Step::Flushing if inner.db.outstanding_flushes() == 0 => {
                for (lane, &head) in heads.iter().enumerate() {
                    drop_below(lane, head)?;
                }
                inner.queue.major_compact()?;
                // fjall deletes the files of dropped tables once a newer
                // write moves its sequence number past them, at the next
                // rotation.
                inner
                    .meta
                    .insert(CLOCK_KEY, crate::clock::now_ms().to_be_bytes())?;
                Step::Collecting
            }
            Step::Collecting => {
                inner.meta.rotate_memtable()?;
                Step::Idle
            }
            step => step,
        };
        Ok(())
    }

    /// Bytes the queue's files (journals and tables) take on disk.
    pub fn disk_space(&self) -> u64 {
        disk::allocated(&self.inner.dir)
    }

    /// Flushes the journal; called on shutdown so removals are not replayed.
    pub fn sync(&self) -> Result<(), StoreError> {
        Ok(self.inner.db.persist(PersistMode::SyncAll)?)
    }
}

/// A lane's head, tail and bytes as the store holds them. A lane without a
/// stored head (lane 0 of a store written before the head was kept, which
/// removed with tombstones) has its first key as its head.
fn scan_lane(
    queue: &Keyspace,
    meta: &Keyspace,
    lane: usize,
) -> Result<(u64, u64, u64), StoreError> {
    let first = lane::start(lane) + 1;
    let saved_head = match meta.get(lane::meta_key(HEAD, lane))? {
        Some(v) => key_of(&v),
        None => first,
    };
    let (mut head, mut last, mut bytes) = (None, None, 0u64);
    for guard in queue.range(saved_head.to_be_bytes()..lane::end(lane).to_be_bytes()) {
        let (k, v) = guard.into_inner()?;
        let key = key_of(&k);
        head.get_or_insert(key);
        last = Some(key);
        bytes += v.len() as u64;
    }
    let saved_tail = meta
        .get(lane::meta_key(TAIL, lane))?
        .map(|v| key_of(&v))
        .unwrap_or(first)
        .max(saved_head);
    let tail = last.map_or(saved_tail, |last| saved_tail.max(last + 1));
    Ok((head.unwrap_or(tail), tail, bytes))
}

fn key_of(bytes: &[u8]) -> u64 {
    let mut k = [0u8; 8];
    let n = bytes.len().min(8);
    k[8 - n..].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(k)
}

/// An I/O error while opening a damaged store, naming the path.
fn recovery_io(path: &std::path::Path, source: std::io::Error) -> StoreError {
    StoreError::Recovery {
        path: path.display().to_string(),
        source,
    }
}

/// The records in every keyspace of `db`.
fn count_records(db: &fjall::Database) -> Result<u64, StoreError> {
    let mut n = 0;
    for name in db.list_keyspace_names() {
        n += db
            .keyspace(&name, fjall::KeyspaceCreateOptions::default)?
            .len()? as u64;
    }
    Ok(n)
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
            priority: 0,
        }
    }

    #[test]
    fn damage_or_a_poisoned_database_marks_the_store_broken_and_other_errors_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let broken = || store.inner.broken.is_cancelled();
        for e in [
            fjall::Error::Io(std::io::Error::other("no space left")),
            fjall::Error::Locked,
        ] {
            assert!(store.checked("reading", Err::<(), _>(e)).is_err());
            assert!(!broken());
        }
        assert!(store.checked("reading", Ok(())).is_ok());
        assert!(!broken());
        let damage = fjall::Error::InvalidTrailer;
        assert!(store.checked("reading", Err::<(), _>(damage)).is_err());
        assert!(broken());
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let poisoned = fjall::Error::Poisoned;
        assert!(store.checked("writing", Err::<(), _>(poisoned)).is_err());
        assert!(store.inner.broken.is_cancelled());
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
        let all = store.read_from(store.head(0), 1000).unwrap();
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
            let all = store.read_from(store.head(0), 100).unwrap();
            let bytes = all.iter().map(|s| s.size()).sum();
            store.remove_before(store.tail(0), bytes).unwrap();
            assert_eq!(store.stats().unwrap().depth, 0);
            assert_eq!(store.bytes(), 0);
            drop(appender);
            join.join().unwrap();
            store.sync().unwrap();
            store.tail(0)
        };
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.tail(0), first_tail);
        assert_eq!(store.head(0), first_tail);
        assert!(store.read_from(0, 100).unwrap().is_empty());
    }

    /// Reads and removes everything queued, as the forwarder does.
    fn drain(store: &Store) -> u64 {
        let mut n = 0;
        loop {
            let batch = store.read_from(store.head(0), 500).unwrap();
            let Some(last) = batch.last() else {
                return n;
            };
            let bytes = batch.iter().map(|s| s.size()).sum();
            store.remove_before(last.key + 1, bytes).unwrap();
            n += batch.len() as u64;
        }
    }

    #[tokio::test]
    async fn a_drained_queue_gives_its_disk_back_and_forgets_nothing_it_still_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (appender, join) = writer::spawn(store.clone(), u64::MAX, 4096);
        let big = |i: u64| Record {
            payload: Bytes::from(vec![b'x'; 1000 + (i % 7) as usize]),
            ..rec(i)
        };
        for chunk in 0..30 {
            appender
                .append((chunk * 1000..(chunk + 1) * 1000).map(big).collect())
                .await
                .unwrap();
        }
        let full = disk::allocated_tables(&dir.path().join("queue"));
        assert!(
            full > 25_000_000,
            "30,000 messages of 1 KB: {full} bytes in tables"
        );
        assert_eq!(drain(&store), 30_000);

        // The journal is fjall's: it is deleted only once it reaches 64 MB.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while disk::allocated_tables(&dir.path().join("queue")) > full / 10
            && std::time::Instant::now() < deadline
        {
            store.give_back().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let left = disk::allocated_tables(&dir.path().join("queue"));
        assert!(
            left <= full / 10,
            "{left} of {full} bytes of tables left after the drain"
        );

        // What comes next is kept, across a reopen, and nothing removed
        // comes back.
        appender.append(vec![big(30_000)]).await.unwrap();
        drop(appender);
        join.join().unwrap();
        store.sync().unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let all = store.read_from(0, 10).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(Record::decode(&all[0].value).unwrap(), big(30_000));
        assert_eq!(store.stats().unwrap().depth, 1);
    }

    #[tokio::test]
    async fn an_empty_queue_with_nothing_written_since_is_not_read_again_every_second() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (appender, join) = writer::spawn(store.clone(), u64::MAX, 64);
        let reads = || store.inner.give_back.lock().unwrap().reads;
        for round in 1..=2 {
            appender.append(vec![rec(round)]).await.unwrap();
            assert_eq!(drain(&store), 1);
            for _ in 0..5 {
                store.give_back().unwrap();
            }
            assert_eq!(
                reads(),
                round,
                "read once after round {round}'s write, then left alone"
            );
        }
        drop(appender);
        join.join().unwrap();
    }

    #[tokio::test]
    async fn dead_letters_and_retained_messages_do_not_make_an_empty_queue_flush_again_and_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (appender, join) = writer::spawn(store.clone(), u64::MAX, 4096);
        // Incompressible, so that what is kept takes its size on disk.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        // 6 MB of dead letters, and 6 MB of another owner's keyspace in the
        // same database (the broker's retained messages).
        for chunk in 0..6u64 {
            let records = (chunk * 1000..(chunk + 1) * 1000)
                .map(|i| Record {
                    payload: Bytes::from(noise(1000)),
                    ..rec(i)
                })
                .collect();
            appender.append(records).await.unwrap();
        }
        for _ in 0..6000 {
            let key = store.head(0);
            assert!(store.move_head_to_dead_letters(key, "refused").unwrap());
        }
        let retained = store
            .inner
            .db
            .keyspace("retained", KeyspaceCreateOptions::default)
            .unwrap();
        for i in 0..6000u32 {
            retained.insert(i.to_be_bytes(), noise(1000)).unwrap();
        }
        retained.rotate_memtable_and_wait().unwrap();
        store.inner.dead.rotate_memtable_and_wait().unwrap();
        assert_eq!(store.depth(), 0);

        // Give-back steps, waiting for each flush it starts to end.
        let flushes = || store.inner.give_back.lock().unwrap().flushes;
        for _ in 0..12 {
            store.give_back().unwrap();
            while store.inner.db.outstanding_flushes() > 0 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        assert!(
            flushes() <= 1,
            "an empty queue flushed {} times in 12 give-backs: what others keep is not the queue's to give back",
            flushes()
        );
        assert_eq!(store.dead_letter_count(), 6000, "the dead letters stay");
        drop(appender);
        join.join().unwrap();
    }

    #[tokio::test]
    async fn each_priority_is_a_lane_of_its_own_kept_in_order_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let at = |i: u64, priority: u8| Record { priority, ..rec(i) };
        {
            let store = Store::open(dir.path()).unwrap();
            let (appender, join) = writer::spawn(store.clone(), u64::MAX, 64);
            appender
                .append((0..4).map(|i| at(i, 5)).collect())
                .await
                .unwrap();
            // One append of both priorities, interleaved.
            appender
                .append(
                    (4..10)
                        .map(|i| at(i, if i % 2 == 0 { 0 } else { 5 }))
                        .collect(),
                )
                .await
                .unwrap();
            assert_eq!(store.depth(), 10);
            assert_eq!(
                store.stats().unwrap().oldest_ms,
                Some(1000),
                "lane 5 holds the oldest"
            );
            // Lane 5's first two leave; lane 0 is untouched.
            let five = store.read_from(store.head(5), 2).unwrap();
            let bytes = five.iter().map(|s| s.size()).sum();
            store.remove_before(five[1].key + 1, bytes).unwrap();
            drop(appender);
            join.join().unwrap();
            store.sync().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let topics = |lane: usize| -> Vec<String> {
            let read = store.read_from(lane::start(lane), 100).unwrap();
            read.iter()
                .map(|s| s.record().unwrap().topic.to_string())
                .collect()
        };
        let names = |ns: &[u64]| -> Vec<String> { ns.iter().map(|&i| rec(i).topic).collect() };
        assert_eq!(topics(0), names(&[4, 6, 8]));
        assert_eq!(topics(5), names(&[2, 3, 5, 7, 9]));
        assert_eq!(store.depth(), 8);
        assert_eq!(store.stats().unwrap().bytes, store.bytes());
        assert_eq!(lane::lane_of(store.head(5)), 5);
        assert_eq!(store.tail(5) - store.head(5), 5);
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
        let all = store.read_from(store.head(0), 10).unwrap();
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
