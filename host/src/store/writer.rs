//! The queue's single writer: group commit on a dedicated thread.
//!
//! Sessions hand in batches of records and wait for the answer. The writer
//! takes every request that is waiting when it becomes free (up to
//! `max_batch` records), writes them as one fjall batch with the next keys,
//! fsyncs once (`PersistMode::SyncData`) and only then answers. So the
//! commit window is "whatever arrived during the previous fsync": no timer,
//! no added latency when the hub is idle.
//!
//! Keys are given at the intake ([`Appender::append_later`]), before the
//! write, so a batch can be offered to the live feed ([`super::live`]) while
//! it is being written; the store's tail moves only once it is durable.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use fjall::PersistMode;
use tokio::sync::{mpsc, oneshot};

use super::{lane, Record, Store, CLOCK_KEY, LANES, TAIL};
use crate::doorbell::Doorbell;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    #[error("storage quota full: {queued} of {quota} bytes queued")]
    QuotaExceeded { queued: u64, quota: u64 },
    #[error("storage failed: {0}")]
    Storage(String),
    #[error("store is shut down")]
    Closed,
    #[error("a record's topic is {0} bytes, more than a record can hold")]
    TopicTooLong(usize),
    #[error(transparent)]
    NoRoom(#[from] super::disk::NoRoom),
}

impl AppendError {
    /// A refusal for want of room (quota, disk): the publisher may retry
    /// later, and MQTT 5 calls it "quota exceeded".
    pub fn is_full(&self) -> bool {
        matches!(self, Self::QuotaExceeded { .. } | Self::NoRoom(_))
    }
}

struct Request {
    /// The records by lane, each run under consecutive keys from `first`.
    runs: Vec<Run>,
    /// Encoded size of `records`, counted as pending until written.
    size: u64,
    done: oneshot::Sender<Result<(), AppendError>>,
}

/// Records of one lane under consecutive keys.
struct Run {
    /// Key of `records[0]`; the rest follow.
    first: u64,
    records: Arc<Vec<Record>>,
}

/// `records` split by lane, keeping their order within a lane (one run,
/// not copied, when they share a lane, as they mostly do).
fn by_lane(records: Vec<Record>) -> Vec<(usize, Vec<Record>)> {
    let lane_of = |r: &Record| lane::of_priority(r.priority);
    let first = records.first().map_or(0, lane_of);
    if records.iter().all(|r| lane_of(r) == first) {
        return vec![(first, records)];
    }
    let mut runs: Vec<(usize, Vec<Record>)> = Vec::new();
    for r in records {
        let lane = lane_of(&r);
        match runs.iter_mut().find(|(l, _)| *l == lane) {
            Some((_, run)) => run.push(r),
            None => runs.push((lane, vec![r])),
        }
    }
    runs.sort_by_key(|(lane, _)| *lane);
    runs
}

/// Cloneable handle to hand records to the writer.
#[derive(Clone)]
pub struct Appender {
    tx: mpsc::Sender<Request>,
    store: Store,
    quota: u64,
}

impl Appender {
    /// Appends `records` atomically and returns once they are durable.
    pub async fn append(&self, records: Vec<Record>) -> Result<(), AppendError> {
        self.append_later(records)
            .await?
            .await
            .map_err(|_| AppendError::Closed)?
    }

    /// Queues `records` and returns a receiver for the outcome, so a session
    /// can keep reading while the batch commits.
    ///
    /// This is the intake: it checks the records (a topic a record can
    /// hold, the quota counting what is still being written), gives them
    /// their keys in the lanes of their priorities and offers them to the
    /// live feed, all in one order under one lock, so keys reach the writer
    /// in order.
    pub async fn append_later(
        &self,
        records: Vec<Record>,
    ) -> Result<oneshot::Receiver<Result<(), AppendError>>, AppendError> {
        // The router checks topics first; this keeps the record format
        // (a 16-bit topic length) safe whoever calls.
        if let Some(long) = records.iter().find(|x| x.topic.len() > u16::MAX as usize) {
            return Err(AppendError::TopicTooLong(long.topic.len()));
        }
        let size: u64 = records.iter().map(|x| x.encoded_len() as u64).sum();
        let slot = self.tx.reserve().await.map_err(|_| AppendError::Closed)?;
        let inner = &self.store.inner;
        let (done, rx) = oneshot::channel();
        let mut next = inner.intake.lock().expect("store intake");
        // Dead letters are on the same disk: they count until purged.
        let queued = self.store.bytes()
            + self.store.dead_letter_bytes()
            + inner.pending.load(Ordering::Acquire);
        if queued + size > self.quota {
            return Err(AppendError::QuotaExceeded {
                queued,
                quota: self.quota,
            });
        }
        self.store.room()?;
        inner.pending.fetch_add(size, Ordering::AcqRel);
        let runs = by_lane(records)
            .into_iter()
            .map(|(lane, records)| {
                let first = next[lane];
                next[lane] += records.len() as u64;
                let records = Arc::new(records);
                inner.live.offer(first, &records);
                Run { first, records }
            })
            .collect();
        slot.send(Request { runs, size, done });
        Ok(rx)
    }
}

/// Starts the writer thread. It ends when every [`Appender`] is dropped.
pub fn spawn(store: Store, quota: u64, max_batch: usize) -> (Appender, JoinHandle<()>) {
    let (appender, writer) = channel(store, quota);
    (appender, writer.spawn(max_batch))
}

/// The writer's end of the intake, before its thread starts.
pub struct Writer {
    store: Store,
    rx: mpsc::Receiver<Request>,
}

/// An appender and the writer it feeds, not yet running: appends get
/// their keys (and reach the live feed) and wait to be written.
pub fn channel(store: Store, quota: u64) -> (Appender, Writer) {
    let (tx, rx) = mpsc::channel(1024);
    let writer = Writer {
        store: store.clone(),
        rx,
    };
    (Appender { tx, store, quota }, writer)
}

impl Writer {
    /// Runs the writer on its own thread, taking up to `max_batch` records
    /// per fsync.
    pub fn spawn(self, max_batch: usize) -> JoinHandle<()> {
        // Answers reach the sessions through the runtime's I/O driver.
        let answers = Doorbell::new(answer);
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run(self.store, self.rx, max_batch, answers))
            .expect("spawn store writer thread")
    }
}

/// What the writer tells an appender, and whom.
type Answer = (
    oneshot::Sender<Result<(), AppendError>>,
    Result<(), AppendError>,
);

fn run(store: Store, mut rx: mpsc::Receiver<Request>, max_batch: usize, answers: Doorbell<Answer>) {
    let inner = &store.inner;
    let mut failed: Option<String> = None;
    while let Some(first) = rx.blocking_recv() {
        let records = |r: &Request| r.runs.iter().map(|run| run.records.len()).sum::<usize>();
        let mut count = records(&first);
        let mut requests = vec![first];
        while count < max_batch {
            match rx.try_recv() {
                Ok(r) => {
                    count += records(&r);
                    requests.push(r);
                }
                Err(_) => break,
            }
        }
        let added: u64 = requests.iter().map(|r| r.size).sum();
        if let Some(reason) = &failed {
            inner.pending.fetch_sub(added, Ordering::AcqRel);
            refuse(&answers, requests, reason);
            continue;
        }

        let mut tails: [Option<u64>; LANES] = [None; LANES];
        let mut batch = inner.db.batch().durability(Some(PersistMode::SyncData));
        for run in requests.iter().flat_map(|r| &r.runs) {
            // Keys come in order from the intake; `first` can only be above
            // the lane's tail after a refused batch left a gap.
            let mut key = run.first;
            for record in run.records.iter() {
                batch.insert(&inner.queue, key.to_be_bytes(), record.encode());
                key += 1;
            }
            tails[lane::lane_of(run.first)] = Some(key);
        }
        for (lane, tail) in tails.iter().enumerate() {
            if let Some(tail) = tail {
                batch.insert(&inner.meta, lane::meta_key(TAIL, lane), tail.to_be_bytes());
            }
        }
        batch.insert(&inner.meta, CLOCK_KEY, crate::clock::now_ms().to_be_bytes());
        match batch.commit() {
            Ok(()) => {
                inner.bytes.fetch_add(added, Ordering::AcqRel);
                inner.pending.fetch_sub(added, Ordering::AcqRel);
                for (lane, tail) in tails.iter().enumerate() {
                    if let Some(tail) = *tail {
                        inner.tail.set(lane, tail);
                    }
                }
                inner.tail_tx.send_modify(|commits| *commits += 1);
                answers.ring(requests.into_iter().map(|r| (r.done, Ok(()))));
            }
            Err(e) => {
                // A failed journal write poisons fjall: refuse everything from
                // now on; what was stored before stays, and opening the store
                // again (the hub does it at once) recovers.
                store.report_broken("store write failed; refusing further messages", &e);
                inner.pending.fetch_sub(added, Ordering::AcqRel);
                let reason = e.to_string();
                refuse(&answers, requests, &reason);
                failed = Some(reason);
            }
        }
    }
}

/// Answers every request of a batch that could not be written.
fn refuse(answers: &Doorbell<Answer>, requests: Vec<Request>, reason: &str) {
    let refused = |r: Request| (r.done, Err(AppendError::Storage(reason.to_string())));
    answers.ring(requests.into_iter().map(refused));
}

fn answer((done, result): Answer) {
    // A requester that stopped waiting (QoS 0, a closed session) is fine.
    let _ = done.send(result);
}
