//! The queue's single writer: group commit on a dedicated thread.
//!
//! Sessions hand in batches of records and wait for the answer. The writer
//! takes every request that is waiting when it becomes free (up to
//! `max_batch` records), writes them as one fjall batch with the next keys,
//! fsyncs once (`PersistMode::SyncData`) and only then answers. So the
//! commit window is "whatever arrived during the previous fsync": no timer,
//! no added latency when the hub is idle.

use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use fjall::PersistMode;
use tokio::sync::{mpsc, oneshot};

use super::{Record, Store, TAIL_KEY};

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
}

struct Request {
    records: Vec<Record>,
    done: oneshot::Sender<Result<(), AppendError>>,
}

/// Cloneable handle to hand records to the writer.
#[derive(Clone)]
pub struct Appender {
    tx: mpsc::Sender<Request>,
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
    pub async fn append_later(
        &self,
        records: Vec<Record>,
    ) -> Result<oneshot::Receiver<Result<(), AppendError>>, AppendError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Request { records, done })
            .await
            .map_err(|_| AppendError::Closed)?;
        Ok(rx)
    }
}

/// Starts the writer thread. It ends when every [`Appender`] is dropped.
pub fn spawn(store: Store, quota: u64, max_batch: usize) -> (Appender, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(1024);
    let join = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || run(store, rx, quota, max_batch))
        .expect("spawn store writer thread");
    (Appender { tx }, join)
}

fn run(store: Store, mut rx: mpsc::Receiver<Request>, quota: u64, max_batch: usize) {
    let inner = &store.inner;
    let mut failed: Option<String> = None;
    while let Some(first) = rx.blocking_recv() {
        let mut requests = vec![first];
        let mut count = requests[0].records.len();
        while count < max_batch {
            match rx.try_recv() {
                Ok(r) => {
                    count += r.records.len();
                    requests.push(r);
                }
                Err(_) => break,
            }
        }
        if let Some(reason) = &failed {
            for r in requests {
                answer(r.done, Err(AppendError::Storage(reason.clone())));
            }
            continue;
        }

        let mut tail = store.tail();
        let mut added = 0u64;
        let mut batch = inner.db.batch().durability(Some(PersistMode::SyncData));
        let mut accepted = Vec::with_capacity(requests.len());
        for r in requests {
            // The router checks topics first; this keeps the record format
            // (a 16-bit topic length) safe whoever calls.
            if let Some(long) = r.records.iter().find(|x| x.topic.len() > u16::MAX as usize) {
                let len = long.topic.len();
                answer(r.done, Err(AppendError::TopicTooLong(len)));
                continue;
            }
            let size: u64 = r.records.iter().map(|x| x.encoded_len() as u64).sum();
            let queued = store.bytes() + added;
            if queued + size > quota {
                answer(r.done, Err(AppendError::QuotaExceeded { queued, quota }));
                continue;
            }
            for record in &r.records {
                batch.insert(&inner.queue, tail.to_be_bytes(), record.encode());
                tail += 1;
            }
            added += size;
            accepted.push(r.done);
        }
        if accepted.is_empty() {
            continue;
        }
        batch.insert(&inner.meta, TAIL_KEY, tail.to_be_bytes());
        match batch.commit() {
            Ok(()) => {
                inner.bytes.fetch_add(added, Ordering::AcqRel);
                inner.tail.store(tail, Ordering::Release);
                inner.tail_tx.send_replace(tail);
                for done in accepted {
                    answer(done, Ok(()));
                }
            }
            Err(e) => {
                // A failed journal write poisons fjall: refuse everything from
                // now on; what was stored before stays, and a restart recovers.
                tracing::error!(error = %e, "store write failed; refusing further messages");
                let reason = e.to_string();
                for done in accepted {
                    answer(done, Err(AppendError::Storage(reason.clone())));
                }
                failed = Some(reason);
            }
        }
    }
}

fn answer(done: oneshot::Sender<Result<(), AppendError>>, result: Result<(), AppendError>) {
    // A requester that stopped waiting (QoS 0, a closed session) is fine.
    let _ = done.send(result);
}
