//! Durable mailboxes: a queue of messages per recipient (a child device's
//! cloud-to-device messages, a module input's routed messages), kept in a
//! keyspace of the store until the recipient acknowledges them, delivered
//! in order through the local broker whenever it can take them.
//!
//! Owns the queues (bounded per recipient in count and bytes, expired after
//! the message's own time to live or the hub's), which messages are out with
//! a client, and their [`Receipt`]s: a client's PUBACK settles a message as
//! acknowledged (removed from the store), a delivery lost with its
//! connection is sent again on the next [`Mailboxes::push`]. A batch put is
//! made durable with one fsync before the call returns. It does not decide
//! who a message is for, nor what an acknowledgement means upstream (the
//! owners, `c2d` and `inputs`, do).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::broker::{BrokerHandle, Delivery, Receipt};
use crate::metrics::Metrics;
use crate::store::disk::NoRoom;
use crate::store::{Documents, Record, Store, StoreError};

/// How much one recipient's mailbox holds.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub messages: usize,
    pub bytes: usize,
}

/// Who takes a mailbox's messages.
#[derive(Debug, Clone, Copy)]
pub enum Reach {
    /// The client whose id is the recipient (a child device).
    Client,
    /// Any client subscribed to the message's topic (a module input).
    Subscribers,
}

#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    #[error("the queue of {recipient} is full ({count} messages, {bytes} bytes; at most {} and {}): the message is refused", bounds.messages, bounds.bytes)]
    Full {
        recipient: String,
        count: usize,
        bytes: usize,
        bounds: Bounds,
    },
    #[error("the message could not be stored: {0}")]
    Storage(#[from] StoreError),
    #[error("the message could not be stored: {0}")]
    Blocking(String),
    #[error("the message is refused: {0}")]
    NoRoom(#[from] NoRoom),
}

/// What became of a delivery; feed each to [`Mailboxes::settle`].
pub enum Fate {
    Acknowledged(String, u64),
    Lost(String, u64),
}

#[derive(Default)]
struct Queue {
    pending: BTreeMap<u64, Record>,
    bytes: usize,
    /// Messages reserved and not yet durable: neither they nor any after
    /// them go out.
    unstored: HashSet<u64>,
    /// Messages out with a client, not yet acknowledged.
    sent: HashSet<u64>,
}

/// Messages taken into queues by [`Mailboxes::reserve`], to be stored.
#[derive(Default)]
pub struct Reservation {
    entries: Vec<(String, Vec<u8>)>,
    taken: Vec<(String, u64)>,
    /// The messages refused, each with why.
    pub refused: Vec<MailboxError>,
}

pub struct Mailboxes {
    store: Store,
    docs: Documents,
    broker: BrokerHandle,
    reach: Reach,
    bounds: Bounds,
    /// The hub's default time to live, in ms.
    ttl_ms: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    /// Sets the gauge of messages held (all recipients).
    gauge: fn(&Metrics, usize),
    queues: Mutex<HashMap<String, Queue>>,
    /// One push at a time, so a queue's messages go out in order.
    pushing: tokio::sync::Mutex<()>,
    next_seq: AtomicU64,
    fates: mpsc::UnboundedSender<Fate>,
}

/// Messages of one queue out with clients at once: the rest follow as
/// these are acknowledged (a client's outbox is not flooded).
const MAX_OUT: usize = 256;

fn key(recipient: &str, seq: u64) -> String {
    format!("{recipient}/{seq:016x}")
}

/// How a [`Mailboxes`] is set up.
pub struct Setup {
    /// The store's keyspace.
    pub keyspace: &'static str,
    pub reach: Reach,
    pub bounds: Bounds,
    pub ttl_ms: Arc<AtomicU64>,
    pub metrics: Arc<Metrics>,
    pub gauge: fn(&Metrics, usize),
}

impl Mailboxes {
    /// Loads every stored message; the fates received must be settled.
    pub fn open(
        store: &Store,
        broker: BrokerHandle,
        setup: Setup,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Fate>), StoreError> {
        let docs = store.documents(setup.keyspace)?;
        let mut queues: HashMap<String, Queue> = HashMap::new();
        let mut last = 0;
        for (k, v) in docs.all()? {
            let parsed = k
                .rsplit_once('/')
                .and_then(|(d, s)| Some((d.to_string(), u64::from_str_radix(s, 16).ok()?)));
            match (parsed, Record::decode(&v)) {
                (Some((recipient, seq)), Ok(r)) => {
                    last = last.max(seq);
                    let q = queues.entry(recipient).or_default();
                    q.bytes += r.encoded_len();
                    q.pending.insert(seq, r);
                }
                _ => {
                    tracing::error!(keyspace = setup.keyspace, key = %k, "a stored message cannot be read; left as it is")
                }
            }
        }
        let (tx, fates) = mpsc::unbounded_channel();
        let mailboxes = Mailboxes {
            store: store.clone(),
            docs,
            broker,
            reach: setup.reach,
            bounds: setup.bounds,
            ttl_ms: setup.ttl_ms,
            metrics: setup.metrics,
            gauge: setup.gauge,
            queues: Mutex::new(queues),
            pushing: tokio::sync::Mutex::new(()),
            next_seq: AtomicU64::new(last + 1),
            fates: tx,
        };
        mailboxes.count(&mailboxes.queues.lock().unwrap());
        Ok((Arc::new(mailboxes), fates))
    }

    /// Takes `messages` into their recipients' queues, in this order (each
    /// refused when its queue is full), not yet durable nor deliverable:
    /// [`Mailboxes::store`] the reservation next.
    pub fn reserve(&self, messages: Vec<(String, Record)>) -> Reservation {
        let mut reservation = Reservation::default();
        let mut queues = self.queues.lock().unwrap();
        for (recipient, record) in messages {
            let q = queues.entry(recipient.clone()).or_default();
            let (count, bytes) = (q.pending.len(), q.bytes);
            if count >= self.bounds.messages || bytes + record.encoded_len() > self.bounds.bytes {
                reservation.refused.push(MailboxError::Full {
                    recipient,
                    count,
                    bytes,
                    bounds: self.bounds,
                });
                continue;
            }
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            q.bytes += record.encoded_len();
            q.unstored.insert(seq);
            reservation
                .entries
                .push((key(&recipient, seq), record.encode()));
            q.pending.insert(seq, record);
            reservation.taken.push((recipient, seq));
        }
        reservation
    }

    /// Makes a reservation durable (one fsync) and its messages
    /// deliverable; on failure they leave the queues. Returns the
    /// recipients it filled.
    pub async fn store(&self, reservation: Reservation) -> Result<Vec<String>, MailboxError> {
        let Reservation { entries, taken, .. } = reservation;
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        let docs = self.docs.clone();
        let written = match self.store.room() {
            Err(no_room) => Err(MailboxError::NoRoom(no_room)),
            Ok(()) => tokio::task::spawn_blocking(move || {
                for (k, v) in &entries {
                    docs.insert(k.as_bytes(), v)?;
                }
                docs.commit()
            })
            .await
            .map_err(|e| MailboxError::Blocking(e.to_string()))
            .and_then(|r| r.map_err(MailboxError::from)),
        };
        let mut queues = self.queues.lock().unwrap();
        let mut filled = Vec::new();
        for (recipient, seq) in taken {
            let Some(q) = queues.get_mut(&recipient) else {
                continue;
            };
            q.unstored.remove(&seq);
            if written.is_err() {
                if let Some(r) = q.pending.remove(&seq) {
                    q.bytes -= r.encoded_len();
                }
            }
            if !filled.contains(&recipient) {
                filled.push(recipient);
            }
        }
        self.count(&queues);
        written.map(|()| filled)
    }

    /// Recipients with messages waiting.
    pub fn recipients(&self) -> Vec<String> {
        let queues = self.queues.lock().unwrap();
        let waiting = queues.iter().filter(|(_, q)| !q.pending.is_empty());
        waiting.map(|(r, _)| r.clone()).collect()
    }

    /// Delivers, in order, every message of `recipient` not out with a
    /// client yet, if one can take it; stops at the first that no client
    /// takes. Drops expired messages first.
    pub async fn push(&self, recipient: &str) {
        let _one = self.pushing.lock().await;
        let now = crate::clock::now_ms();
        let ttl = self.ttl_ms.load(Ordering::Relaxed);
        let (due, expired) = {
            let mut queues = self.queues.lock().unwrap();
            let Some(q) = queues.get_mut(recipient) else {
                return;
            };
            let expired: Vec<u64> = q
                .pending
                .iter()
                .filter(|(_, r)| r.as_view().expired(now, ttl))
                .map(|(s, _)| *s)
                .collect();
            for s in &expired {
                if let Some(r) = q.pending.remove(s) {
                    q.bytes -= r.encoded_len();
                }
                q.sent.remove(s);
            }
            let room = MAX_OUT.saturating_sub(q.sent.len());
            let due: Vec<(u64, Record)> = q
                .pending
                .iter()
                .take_while(|(s, _)| !q.unstored.contains(s))
                .filter(|(s, _)| !q.sent.contains(s))
                .take(room)
                .map(|(s, r)| (*s, r.clone()))
                .collect();
            q.sent.extend(due.iter().map(|(s, _)| *s));
            self.count(&queues);
            (due, expired)
        };
        if !expired.is_empty() {
            self.metrics.expired(expired.len() as u64);
            tracing::warn!(%recipient, messages = expired.len(), "messages expired before their recipient took them");
            self.remove(recipient, &expired).await;
        }
        let mut due = due.into_iter();
        while let Some((seq, record)) = due.next() {
            let fates = self.fates.clone();
            let id = recipient.to_string();
            let receipt = Receipt::new(move |acked| {
                let fate = if acked {
                    Fate::Acknowledged(id.clone(), seq)
                } else {
                    Fate::Lost(id.clone(), seq)
                };
                let _ = fates.send(fate);
            });
            let delivery = Delivery {
                topic: record.topic,
                payload: record.payload,
                qos: 1,
                retain: false,
                dup: false,
                receipt: Some(receipt),
            };
            let taken = match self.reach {
                Reach::Client => self.broker.send_to(recipient, delivery).await,
                Reach::Subscribers => self.broker.offer(delivery).await,
            };
            // Not taken (no client, or its outbox is full): neither it nor
            // the ones after it are out; an acknowledgement, a subscription
            // or a new message tries again.
            if !taken {
                let mut queues = self.queues.lock().unwrap();
                if let Some(q) = queues.get_mut(recipient) {
                    q.sent.remove(&seq);
                    for (s, _) in due {
                        q.sent.remove(&s);
                    }
                }
                break;
            }
        }
    }

    /// Applies what became of a delivery: a lost one is marked to be sent
    /// again; an acknowledged one leaves the store and is returned, and
    /// what waited behind it goes out.
    pub async fn settle(&self, fate: Fate) -> Option<(String, Record)> {
        match fate {
            Fate::Lost(recipient, seq) => {
                let mut queues = self.queues.lock().unwrap();
                if let Some(q) = queues.get_mut(&recipient) {
                    q.sent.remove(&seq);
                }
                None
            }
            Fate::Acknowledged(recipient, seq) => {
                let (record, waiting) = {
                    let mut queues = self.queues.lock().unwrap();
                    let q = queues.get_mut(&recipient)?;
                    q.sent.remove(&seq);
                    let record = q.pending.remove(&seq)?;
                    q.bytes -= record.encoded_len();
                    let waiting = q.pending.len() > q.sent.len();
                    self.count(&queues);
                    (record, waiting)
                };
                self.remove(&recipient, &[seq]).await;
                if waiting {
                    self.push(&recipient).await;
                }
                Some((recipient, record))
            }
        }
    }

    /// Sets the gauge of messages held, for every recipient.
    fn count(&self, queues: &HashMap<String, Queue>) {
        let n = queues.values().map(|q| q.pending.len()).sum();
        (self.gauge)(&self.metrics, n);
    }

    async fn remove(&self, recipient: &str, seqs: &[u64]) {
        let docs = self.docs.clone();
        let keys: Vec<String> = seqs.iter().map(|s| key(recipient, *s)).collect();
        let removed =
            tokio::task::spawn_blocking(move || keys.iter().try_for_each(|k| docs.remove(k))).await;
        if !matches!(removed, Ok(Ok(()))) {
            tracing::error!(%recipient, "acknowledged messages could not be removed; they may be delivered again after a restart");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &'static [u8]) -> Record {
        Record {
            enqueued_ms: crate::clock::now_ms(),
            topic: "in/x".into(),
            payload: bytes::Bytes::from_static(payload),
            ttl_secs: None,
            priority: 0,
        }
    }

    #[tokio::test]
    async fn messages_go_out_in_reservation_order_only_once_stored_and_a_full_queue_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (broker, _task) = crate::broker::spawn(16, Arc::default());
        let setup = Setup {
            keyspace: "test",
            reach: Reach::Subscribers,
            bounds: Bounds {
                messages: 3,
                bytes: 1 << 20,
            },
            ttl_ms: Arc::new(AtomicU64::new(3_600_000)),
            metrics: Arc::default(),
            gauge: Metrics::set_module_inputs_queued,
        };
        let (mailboxes, _fates) = Mailboxes::open(&store, broker.clone(), setup).unwrap();
        let mut inbox = crate::broker::subscribed_client(&broker, "m", 1, &[("in/#", 1)]).await;

        let first = mailboxes.reserve(vec![("e".into(), record(b"1"))]);
        let second =
            mailboxes.reserve(vec![("e".into(), record(b"2")), ("e".into(), record(b"3"))]);
        let full = mailboxes.reserve(vec![("e".into(), record(b"4"))]);
        assert_eq!(full.refused.len(), 1, "a fourth message is past the bound");
        mailboxes.store(second).await.unwrap();
        mailboxes.push("e").await;
        assert!(
            inbox.try_recv().is_none(),
            "nothing goes before the first is stored"
        );
        mailboxes.store(first).await.unwrap();
        mailboxes.push("e").await;
        let got: Vec<_> = std::iter::from_fn(|| inbox.try_recv())
            .map(|d| d.payload)
            .collect();
        assert_eq!(got, vec!["1", "2", "3"]);
    }
}
