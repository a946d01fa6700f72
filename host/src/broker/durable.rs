//! What the local broker keeps across restarts: persistent sessions (their
//! subscriptions, their expiry, the messages queued while they are away)
//! and retained messages, in three keyspaces of the store (`sessions`,
//! `session_queue`, `retained`).
//!
//! Owns their encoding, reading them back at start, and one writer thread
//! that applies the broker's changes in order and commits them in groups
//! (one fsync per batch, like the queue's writer). A barrier tells a waiter
//! once every change before it is durable (a SUBACK waits for one). It also
//! keeps the `edgehub_broker_stored` gauges. It does not decide what to keep,
//! bound or expire: the broker does, and tells it.

use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::Delivery;
use crate::metrics::Metrics;
use crate::store::record::RecordRef;
use crate::store::{Documents, Record, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the local broker's writer thread: {0}")]
    Thread(std::io::Error),
}

/// A persistent session as kept in the store (its queue is kept apart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    pub subscriptions: Vec<(String, u8)>,
    /// Seconds it lives on once its client is away; `u32::MAX`: for ever.
    pub expiry_secs: u32,
    /// When its client went away (Unix ms); `None`: connected when written.
    pub away_since_ms: Option<u64>,
    /// Packet ids of QoS 2 deliveries waiting for PUBCOMP (PUBREL goes again).
    #[serde(default)]
    pub released: Vec<u16>,
}

/// One change the broker makes to what it keeps.
pub enum Change {
    /// A session written, or removed with everything queued for it.
    Session(String, Option<StoredSession>),
    /// A message queued for a session away (by its sequence number), or
    /// removed from that queue (delivered and acknowledged, or dropped).
    Queued(String, u64, Option<Delivery>),
    /// A queued message its client received (QoS 2 PUBREC) under this
    /// packet id: from now on it is kept as that id only (its PUBREL goes
    /// again after a restart, never the message).
    Received(String, u64, u16),
    /// A retained message set, or cleared.
    Retained(String, Option<Delivery>),
}

enum Op {
    Change(Change),
    Barrier(oneshot::Sender<()>),
}

/// What was kept, read back at start.
#[derive(Default)]
pub struct Restored {
    pub sessions: Vec<RestoredSession>,
    pub retained: Vec<Delivery>,
}

pub struct RestoredSession {
    pub client_id: String,
    pub session: StoredSession,
    /// Its queued messages by sequence number, in order.
    pub queued: Vec<(u64, Delivery)>,
    /// Queued messages it received (QoS 2 PUBREC) and did not complete:
    /// (sequence number, packet id).
    pub received: Vec<(u64, u16)>,
}

/// The broker's side of the writer: cheap to clone (receipts hold one).
#[derive(Clone)]
pub struct Journal {
    tx: std_mpsc::Sender<Op>,
    store: Store,
}

struct Keyspaces {
    sessions: Documents,
    queue: Documents,
    retained: Documents,
}

/// Counts of what is durable, for the gauges.
#[derive(Default)]
struct Counts {
    sessions: usize,
    queued: usize,
    retained: usize,
}

impl Journal {
    /// Reads back what the store holds and starts the writer thread; the
    /// thread ends once every clone of the journal is gone.
    pub fn open(
        store: &Store,
        metrics: Arc<Metrics>,
    ) -> Result<(Journal, Restored, JoinHandle<()>), JournalError> {
        let spaces = Keyspaces {
            sessions: store.documents("sessions")?,
            queue: store.documents("session_queue")?,
            retained: store.documents("retained")?,
        };
        let restored = restore(&spaces)?;
        let counts = Counts {
            sessions: restored.sessions.len(),
            queued: restored.sessions.iter().map(|s| s.queued.len()).sum(),
            retained: restored.retained.len(),
        };
        counts.publish(&metrics);
        let (tx, rx) = std_mpsc::channel();
        let join = std::thread::Builder::new()
            .name("edgehub-broker-journal".into())
            .spawn(move || write_loop(spaces, rx, counts, metrics))
            .map_err(JournalError::Thread)?;
        let journal = Journal {
            tx,
            store: store.clone(),
        };
        Ok((journal, restored, join))
    }

    /// Whether new messages may be kept (see [`Store::room`]): below the
    /// disk's floor the broker keeps no more, so the store's other writers
    /// never meet a full disk.
    pub fn has_room(&self) -> bool {
        self.store.room().is_ok()
    }

    pub fn record(&self, change: Change) {
        let _ = self.tx.send(Op::Change(change));
    }

    /// Resolves once every change recorded before it is durable (or the
    /// writer has stopped).
    pub fn barrier(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Op::Barrier(tx));
        rx
    }
}

impl Counts {
    fn publish(&self, metrics: &Metrics) {
        metrics.set_broker_stored("sessions", self.sessions);
        metrics.set_broker_stored("queued", self.queued);
        metrics.set_broker_stored("retained", self.retained);
    }
}

fn write_loop(
    spaces: Keyspaces,
    rx: std_mpsc::Receiver<Op>,
    mut counts: Counts,
    metrics: Arc<Metrics>,
) {
    while let Ok(first) = rx.recv() {
        let mut waiting = Vec::new();
        let mut op = Some(first);
        while let Some(next) = op.take() {
            match next {
                Op::Barrier(tx) => waiting.push(tx),
                Op::Change(change) => {
                    if let Err(e) = apply(&spaces, &mut counts, change) {
                        tracing::error!(error = %e, "the local broker's state could not be written");
                    }
                }
            }
            op = rx.try_recv().ok();
        }
        if let Err(e) = spaces.sessions.commit() {
            tracing::error!(error = %e, "the local broker's state could not be made durable");
        }
        counts.publish(&metrics);
        for tx in waiting {
            let _ = tx.send(());
        }
    }
}

fn apply(spaces: &Keyspaces, counts: &mut Counts, change: Change) -> Result<(), StoreError> {
    match change {
        Change::Session(client, Some(session)) => {
            let key = client.as_bytes();
            if !spaces.sessions.contains(key)? {
                counts.sessions += 1;
            }
            let doc = serde_json::to_vec(&session).expect("a session serializes");
            spaces.sessions.insert(key, &doc)?;
        }
        Change::Session(client, None) => {
            if spaces.sessions.contains(client.as_bytes())? {
                counts.sessions -= 1;
                spaces.sessions.delete(client.as_bytes())?;
            }
            for key in spaces.queue.keys_with_prefix(&queue_prefix(&client))? {
                counts.queued -= 1;
                spaces.queue.delete(&key)?;
            }
        }
        Change::Queued(client, seq, message) => {
            let key = queue_key(&client, seq);
            let present = spaces.queue.contains(&key)?;
            match message {
                Some(m) => {
                    counts.queued += usize::from(!present);
                    spaces.queue.insert(&key, &encode(&m))?;
                }
                None if present => {
                    counts.queued -= 1;
                    spaces.queue.delete(&key)?;
                }
                None => {}
            }
        }
        Change::Received(client, seq, pkid) => {
            let key = queue_key(&client, seq);
            // (Acknowledged and removed already: nothing to keep.)
            if spaces.queue.contains(&key)? {
                let [hi, lo] = pkid.to_be_bytes();
                spaces.queue.insert(&key, &[RECEIVED, hi, lo])?;
            }
        }
        Change::Retained(topic, message) => {
            let present = spaces.retained.contains(topic.as_bytes())?;
            match message {
                Some(m) => {
                    counts.retained += usize::from(!present);
                    spaces.retained.insert(topic.as_bytes(), &encode(&m))?;
                }
                None if present => {
                    counts.retained -= 1;
                    spaces.retained.delete(topic.as_bytes())?;
                }
                None => {}
            }
        }
    }
    Ok(())
}

fn restore(spaces: &Keyspaces) -> Result<Restored, StoreError> {
    let mut restored = Restored::default();
    let mut queued: std::collections::HashMap<String, Vec<(u64, Delivery)>> = Default::default();
    let mut received: std::collections::HashMap<String, Vec<(u64, u16)>> = Default::default();
    for (key, value) in spaces.queue.entries()? {
        match (parse_queue_key(&key), &value[..]) {
            (Some((client, seq)), &[RECEIVED, hi, lo]) => {
                let pkid = u16::from_be_bytes([hi, lo]);
                received.entry(client).or_default().push((seq, pkid));
                continue;
            }
            (Some((client, seq)), _) => {
                if let Some(m) = decode(&value) {
                    queued.entry(client).or_default().push((seq, m));
                    continue;
                }
            }
            (None, _) => {}
        }
        tracing::warn!(key = %String::from_utf8_lossy(&key), "a corrupt message queued for a session is skipped");
        spaces.queue.delete(&key)?;
    }
    for (key, value) in spaces.sessions.entries()? {
        let client = String::from_utf8_lossy(&key).into_owned();
        match serde_json::from_slice::<StoredSession>(&value) {
            Ok(session) => {
                let mut queued = queued.remove(&client).unwrap_or_default();
                queued.sort_by_key(|(seq, _)| *seq);
                let mut received = received.remove(&client).unwrap_or_default();
                received.sort_by_key(|(seq, _)| *seq);
                restored.sessions.push(RestoredSession {
                    client_id: client,
                    session,
                    queued,
                    received,
                });
            }
            Err(e) => {
                tracing::warn!(%client, error = %e, "a corrupt stored session is dropped");
                spaces.sessions.delete(&key)?;
            }
        }
    }
    // Queued messages whose session is gone (removed before a crash made
    // the removal durable) go too.
    let orphans = queued
        .into_iter()
        .map(|(c, q)| (c, q.into_iter().map(|(s, _)| s).collect::<Vec<_>>()));
    let orphans = orphans.chain(
        received
            .into_iter()
            .map(|(c, r)| (c, r.into_iter().map(|(s, _)| s).collect())),
    );
    for (client, seqs) in orphans {
        for seq in seqs {
            spaces.queue.delete(&queue_key(&client, seq))?;
        }
    }
    for (key, value) in spaces.retained.entries()? {
        match decode(&value) {
            Some(m) => restored.retained.push(m),
            None => {
                tracing::warn!(topic = %String::from_utf8_lossy(&key), "a corrupt retained message is skipped");
                spaces.retained.delete(&key)?;
            }
        }
    }
    spaces.sessions.commit()?;
    Ok(restored)
}

/// A queue key: the client id, a byte that never occurs in UTF-8, then
/// the sequence number big-endian (so keys sort by client, then by order).
fn queue_key(client: &str, seq: u64) -> Vec<u8> {
    let mut key = queue_prefix(client);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn queue_prefix(client: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(client.len() + 9);
    key.extend_from_slice(client.as_bytes());
    key.push(0xFF);
    key
}

pub(crate) fn parse_queue_key(key: &[u8]) -> Option<(String, u64)> {
    let split = key.len().checked_sub(9)?;
    if key[split] != 0xFF {
        return None;
    }
    let client = std::str::from_utf8(&key[..split]).ok()?.to_owned();
    let seq = u64::from_be_bytes(key[split + 1..].try_into().ok()?);
    Some((client, seq))
}

/// The first byte of a queued entry its client received (QoS 2 PUBREC),
/// followed by the packet id big-endian; a message's first byte is its QoS.
const RECEIVED: u8 = 0xFF;

/// A message kept: its QoS, then the queue's record (topic and payload).
fn encode(m: &Delivery) -> Vec<u8> {
    let record = Record {
        enqueued_ms: crate::clock::now_ms(),
        topic: m.topic.clone(),
        payload: m.payload.clone(),
        ttl_secs: None,
        priority: 0,
    };
    let mut out = Vec::with_capacity(1 + record.encoded_len());
    out.push(m.qos);
    out.extend_from_slice(&record.encode());
    out
}

pub(crate) fn decode(bytes: &[u8]) -> Option<Delivery> {
    let (&qos, rest) = bytes.split_first()?;
    let record = RecordRef::parse(rest).ok()?;
    (qos <= 2).then(|| Delivery {
        topic: record.topic.to_owned(),
        payload: bytes::Bytes::copy_from_slice(record.payload),
        qos,
        retain: false,
        dup: false,
        receipt: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &str, payload: &'static [u8]) -> Delivery {
        Delivery {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(payload),
            qos: 1,
            retain: false,
            dup: false,
            receipt: None,
        }
    }

    fn reopen(dir: &std::path::Path) -> (Journal, Restored, JoinHandle<()>) {
        Journal::open(&Store::open(dir).unwrap(), Arc::default()).unwrap()
    }

    #[test]
    fn what_the_broker_keeps_is_read_back_after_a_reopen_in_order_and_a_received_message_as_its_packet_id(
    ) {
        let dir = tempfile::tempdir().unwrap();
        {
            let (journal, restored, join) = reopen(dir.path());
            assert!(restored.sessions.is_empty() && restored.retained.is_empty());
            let session = StoredSession {
                subscriptions: vec![("a/#".into(), 1)],
                expiry_secs: 60,
                away_since_ms: Some(5),
                released: vec![7],
            };
            journal.record(Change::Session("c1".into(), Some(session)));
            journal.record(Change::Queued("c1".into(), 2, Some(message("a/2", b"two"))));
            journal.record(Change::Queued("c1".into(), 1, Some(message("a/1", b"one"))));
            journal.record(Change::Queued(
                "c1".into(),
                3,
                Some(message("a/3", b"three")),
            ));
            journal.record(Change::Queued("c1".into(), 3, None));
            // received (QoS 2 PUBREC): kept as its packet id only; one
            // removed already stays removed
            journal.record(Change::Queued(
                "c1".into(),
                4,
                Some(message("a/4", b"four")),
            ));
            journal.record(Change::Received("c1".into(), 4, 9));
            journal.record(Change::Received("c1".into(), 3, 5));
            journal.record(Change::Retained(
                "r/1".into(),
                Some(message("r/1", b"kept")),
            ));
            journal.record(Change::Retained(
                "r/2".into(),
                Some(message("r/2", b"cleared")),
            ));
            journal.record(Change::Retained("r/2".into(), None));
            drop(journal);
            join.join().unwrap();
        }
        let (_journal, restored, _join) = reopen(dir.path());
        assert_eq!(restored.sessions.len(), 1);
        let kept = &restored.sessions[0];
        assert_eq!(kept.client_id, "c1");
        assert_eq!(kept.session.subscriptions, vec![("a/#".to_string(), 1)]);
        assert_eq!(kept.session.away_since_ms, Some(5));
        assert_eq!(kept.session.released, vec![7]);
        let order: Vec<_> = kept
            .queued
            .iter()
            .map(|(s, m)| (*s, m.payload.clone()))
            .collect();
        assert_eq!(order, vec![(1, "one".into()), (2, "two".into())]);
        assert_eq!(kept.received, vec![(4, 9)]);
        let retained: Vec<_> = restored.retained.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(retained, vec!["r/1"]);
    }

    #[test]
    fn a_removed_session_takes_its_queue_with_it_and_not_its_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (journal, _, join) = reopen(dir.path());
            for client in ["c", "c2"] {
                let session = StoredSession {
                    subscriptions: vec![],
                    expiry_secs: u32::MAX,
                    away_since_ms: None,
                    released: Vec::new(),
                };
                journal.record(Change::Session(client.into(), Some(session)));
                journal.record(Change::Queued(client.into(), 1, Some(message("t", b"x"))));
            }
            journal.record(Change::Session("c".into(), None));
            let barrier = journal.barrier();
            barrier.blocking_recv().unwrap();
            drop(journal);
            join.join().unwrap();
        }
        let (_journal, restored, _join) = reopen(dir.path());
        let names: Vec<_> = restored
            .sessions
            .iter()
            .map(|s| (s.client_id.as_str(), s.queued.len()))
            .collect();
        assert_eq!(names, vec![("c2", 1)]);
    }

    #[test]
    fn a_queue_key_names_its_client_and_sequence_and_nothing_else_parses() {
        let key = queue_key("dev/é", 42);
        assert_eq!(parse_queue_key(&key), Some(("dev/é".to_string(), 42)));
        assert_eq!(parse_queue_key(b"short"), None);
        assert_eq!(parse_queue_key(b"no-separator-here"), None);
        assert!(decode(b"").is_none());
        assert!(decode(&[9, 1, 2, 3]).is_none());
    }
}
