//! The live feed: messages handed to the forwarder from memory, as they are
//! appended, before they are durable.
//!
//! Owns the tap the appender offers each accepted batch to, and the
//! forwarder's end of it. The feed only speeds the path up: the forwarder
//! takes a message from it when it is the very next key it needs, and reads
//! the store otherwise. So a batch the feed drops (the forwarder is behind,
//! offline, or the channel is full) costs a store read later, never a
//! message. Batches are kept per lane ([`super::lane`]): each lane's keys
//! are taken in its own order. Durability is not this module's concern:
//! the device is still acknowledged after the fsync, and the forwarder
//! removes only what is durable ([`super::Store::tail`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::lane::{lane_of, LANES};
use super::Record;

/// Batches the feed holds before it drops (the forwarder reads them from
/// the store instead).
const CAPACITY: usize = 256;

/// Records of one lane appended together, the first under key `first`.
#[derive(Debug, Clone)]
pub struct LiveBatch {
    pub first: u64,
    pub records: Arc<Vec<Record>>,
}

/// The appender's side: offers batches while a follower wants them.
#[derive(Default)]
pub(super) struct Tap {
    wanted: Arc<AtomicBool>,
    tx: Mutex<Option<mpsc::Sender<LiveBatch>>>,
}

impl Tap {
    /// Called in key order (under the appender's intake lock).
    pub(super) fn offer(&self, first: u64, records: &Arc<Vec<Record>>) {
        if !self.wanted.load(Ordering::Acquire) {
            return;
        }
        if let Some(tx) = self.tx.lock().expect("live tap").as_ref() {
            let _ = tx.try_send(LiveBatch {
                first,
                records: records.clone(),
            });
        }
    }

    #[cfg(test)]
    pub(super) fn wanted(&self) -> bool {
        self.wanted.load(Ordering::Acquire)
    }

    /// Connects a follower; a previous one is disconnected.
    pub(super) fn follow(&self) -> LiveFeed {
        let (tx, rx) = mpsc::channel(CAPACITY);
        *self.tx.lock().expect("live tap") = Some(tx);
        self.wanted.store(false, Ordering::Release);
        LiveFeed {
            rx,
            wanted: self.wanted.clone(),
            pending: Default::default(),
            held: 0,
        }
    }
}

/// The forwarder's side of the feed.
pub struct LiveFeed {
    rx: mpsc::Receiver<LiveBatch>,
    wanted: Arc<AtomicBool>,
    /// Received and not yet taken, per lane in key order.
    pending: [VecDeque<LiveBatch>; LANES],
    /// Batches in `pending`.
    held: usize,
}

impl LiveFeed {
    /// Whether appends are offered from now on. The forwarder wants them
    /// while it is caught up with the store; offering costs the appender a
    /// clone of an `Arc` and a channel send.
    pub fn want(&mut self, on: bool) {
        self.wanted.store(on, Ordering::Release);
        if !on {
            self.pending.iter_mut().for_each(VecDeque::clear);
            self.held = 0;
            while self.rx.try_recv().is_ok() {}
        }
    }

    /// Waits for the next batch (forever once another follower took over).
    pub async fn recv(&mut self) {
        match self.rx.recv().await {
            Some(b) => self.hold(b),
            None => std::future::pending().await,
        }
        self.receive();
    }

    fn hold(&mut self, batch: LiveBatch) {
        self.pending[lane_of(batch.first)].push_back(batch);
        self.held += 1;
    }

    /// Moves what has arrived into `pending`, up to [`CAPACITY`] batches
    /// (the rest wait in the channel, and what does not fit there is
    /// dropped: the follower is behind and reads the store).
    fn receive(&mut self) {
        while self.held < CAPACITY {
            match self.rx.try_recv() {
                Ok(b) => self.hold(b),
                Err(_) => return,
            }
        }
    }

    /// The record appended under `key`, if the feed has it. Everything
    /// of its lane before `key` is forgotten: the caller has moved past it.
    pub fn take(&mut self, key: u64) -> Option<(Arc<Vec<Record>>, usize)> {
        self.receive();
        let pending = &mut self.pending[lane_of(key)];
        while let Some(b) = pending.front() {
            if b.first + b.records.len() as u64 <= key {
                pending.pop_front();
                self.held -= 1;
                continue;
            }
            if b.first > key {
                return None;
            }
            return Some((b.records.clone(), (key - b.first) as usize));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn recs(n: usize) -> Arc<Vec<Record>> {
        Arc::new(
            (0..n)
                .map(|i| Record {
                    enqueued_ms: i as u64,
                    topic: format!("t/{i}"),
                    payload: Bytes::new(),
                    ttl_secs: None,
                    priority: 0,
                })
                .collect(),
        )
    }

    #[test]
    fn nothing_is_offered_until_the_follower_wants_it() {
        let tap = Tap::default();
        let mut feed = tap.follow();
        tap.offer(1, &recs(2));
        assert!(feed.take(1).is_none());
        feed.want(true);
        tap.offer(3, &recs(2));
        let (batch, i) = feed.take(4).expect("key 4 is the second of the batch at 3");
        assert_eq!((batch[i].topic.as_str(), i), ("t/1", 1));
    }

    #[test]
    fn taking_a_key_forgets_everything_before_it() {
        let tap = Tap::default();
        let mut feed = tap.follow();
        feed.want(true);
        tap.offer(1, &recs(3));
        tap.offer(4, &recs(3));
        assert!(feed.take(5).is_some());
        assert!(
            feed.take(1).is_none(),
            "keys behind the last taken are gone"
        );
        assert!(feed.take(6).is_some());
        assert!(feed.take(7).is_none());
    }

    #[test]
    fn a_dropped_batch_shows_as_a_gap_to_read_from_the_store() {
        let tap = Tap::default();
        let mut feed = tap.follow();
        feed.want(true);
        tap.offer(10, &recs(2));
        assert!(
            feed.take(8).is_none(),
            "keys 8 and 9 never came: read them from the store"
        );
        assert!(feed.take(10).is_some());
    }

    #[test]
    fn each_lane_is_taken_in_its_own_order() {
        let tap = Tap::default();
        let mut feed = tap.follow();
        feed.want(true);
        let five = crate::store::lane::start(5);
        tap.offer(five + 1, &recs(2));
        tap.offer(1, &recs(2));
        tap.offer(five + 3, &recs(1));
        assert!(
            feed.take(five + 3).is_some(),
            "lane 5 moved past its first batch"
        );
        assert!(
            feed.take(1).is_some(),
            "lane 0 is kept whatever lane 5 took"
        );
        assert!(feed.take(2).is_some());
        assert!(feed.take(five + 1).is_none(), "forgotten in its own lane");
    }

    #[test]
    fn not_wanting_the_feed_empties_it() {
        let tap = Tap::default();
        let mut feed = tap.follow();
        feed.want(true);
        tap.offer(1, &recs(2));
        feed.want(false);
        feed.want(true);
        assert!(feed.take(1).is_none());
    }
}
