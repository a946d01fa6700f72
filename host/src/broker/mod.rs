//! Local publish/subscribe between downstream clients: a destination of
//! routed messages, beside the store.
//!
//! Owns subscriptions, retained messages and the state of persistent
//! sessions (their expiry, the messages kept while they are away), as one
//! actor fed by a bounded channel, and keeps them across restarts through
//! [`durable`] (the store's `sessions`, `session_queue` and `retained`
//! keyspaces; a SUBACK waits until the subscription is durable, a kept
//! message leaves the store when its client acknowledges it); sessions hold
//! a [`BrokerHandle`]. Delivery to a session is a `try_send` into its bounded
//! outbox: a subscriber that does not keep up loses messages (counted as
//! dropped) rather than stalling everyone. It deals in [`Delivery`] (topic,
//! payload, QoS, flags), not in MQTT packets: writing them to a connection
//! (packet ids, acknowledgements) is the session's business, deciding what
//! is bound upstream the router's. `$iothub/...` is never shared: a publish
//! there is not delivered, and the hub's answers to one client go through
//! [`BrokerHandle::send_to`].

pub(crate) mod durable;
mod index;
mod outbox;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

pub use durable::JournalError;
use durable::{Change, Journal, Restored, StoredSession};
pub use outbox::{channel as outbox, Outbox, OutboxSender};

use crate::iothub;
use crate::metrics::{DropReason, Metrics};
use crate::store::Store;
use crate::topic;

/// Capacity of each session's outbox.
pub const OUTBOX: usize = 1024;

/// One message on its way to local subscribers (or kept for them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub topic: String,
    /// Shared with every other copy of the message (store record,
    /// other subscribers): cloning it copies no bytes.
    pub payload: Bytes,
    /// As published; each subscriber gets at most the QoS it was granted.
    pub qos: u8,
    pub retain: bool,
    /// Sent before and not acknowledged (redelivered to a resumed session).
    pub dup: bool,
    /// For a message its owner keeps durably (cloud-to-device): told when
    /// the client acknowledges it. Such a message is never kept here for a
    /// session away: the owner delivers it again.
    pub receipt: Option<Receipt>,
}

/// Tells a message's owner its fate: acknowledged by the client (its
/// PUBACK; at QoS 0, once written to the connection), or lost (every copy
/// dropped unacknowledged: the connection ended, the outbox was full, a
/// session away). Each is told once.
#[derive(Clone)]
pub struct Receipt(Arc<ReceiptInner>);

struct ReceiptInner {
    acknowledged: std::sync::atomic::AtomicBool,
    /// `true`: acknowledged; `false`: lost.
    tell: Box<dyn Fn(bool) + Send + Sync>,
    /// QoS 2: told the packet id once the client has the message (its
    /// PUBREC), before the PUBREL goes; gives what tells when that is
    /// durable, for a kept message.
    release: Option<Box<dyn Fn(u16) -> Option<oneshot::Receiver<()>> + Send + Sync>>,
}

impl Receipt {
    pub fn new(tell: impl Fn(bool) + Send + Sync + 'static) -> Self {
        Receipt(Arc::new(ReceiptInner {
            acknowledged: std::sync::atomic::AtomicBool::new(false),
            tell: Box::new(tell),
            release: None,
        }))
    }

    /// A receipt also told when a QoS 2 delivery is received (PUBREC).
    fn releasing(
        tell: impl Fn(bool) + Send + Sync + 'static,
        release: impl Fn(u16) -> Option<oneshot::Receiver<()>> + Send + Sync + 'static,
    ) -> Self {
        Receipt(Arc::new(ReceiptInner {
            acknowledged: std::sync::atomic::AtomicBool::new(false),
            tell: Box::new(tell),
            release: Some(Box::new(release)),
        }))
    }

    /// QoS 2: the client has the message (PUBREC) under `pkid`; from now
    /// on only its PUBREL may go again, never the PUBLISH. For a message
    /// kept across restarts, what resolves once the store knows it: the
    /// PUBREL waits for it, or a restart could send the PUBLISH again to a
    /// client that has completed it.
    pub fn released(&self, pkid: u16) -> Option<oneshot::Receiver<()>> {
        self.0.release.as_ref().and_then(|release| release(pkid))
    }

    pub fn acknowledged(&self) {
        if !self.0.acknowledged.swap(true, Ordering::AcqRel) {
            (self.0.tell)(true)
        }
    }
}

impl Drop for ReceiptInner {
    fn drop(&mut self) {
        if !*self.acknowledged.get_mut() {
            (self.tell)(false)
        }
    }
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Receipt")
    }
}

impl PartialEq for Receipt {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Receipt {}

/// What the broker tells a connected session.
pub struct Attached {
    pub session_present: bool,
    /// Messages kept while the persistent session was away, oldest first.
    pub queued: Vec<Delivery>,
    /// QoS 2 deliveries the client received and was told to release
    /// (PUBREL sent), not yet completed: their packet ids get PUBREL again.
    pub released: Vec<Released>,
}

/// The packet id of a QoS 2 delivery waiting for its PUBCOMP, with its
/// receipt when its owner keeps it.
pub type Released = (u16, Option<Receipt>);

/// How much the broker keeps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages kept for one persistent session away (the oldest go first).
    pub offline_queue: usize,
    /// Retained messages kept, and their bytes (topic and payload): past
    /// either, a retained message on a new topic is delivered, not kept.
    pub retained_messages: usize,
    pub retained_bytes: usize,
}

impl Limits {
    /// The defaults, with `offline_queue` messages per session.
    pub fn with_offline_queue(offline_queue: usize) -> Self {
        Limits {
            offline_queue,
            retained_messages: 10_000,
            retained_bytes: 64 << 20,
        }
    }
}

/// How long a session outlives its connection.
pub const SESSION_ENDS: u32 = 0;
/// A session that never expires.
pub const SESSION_NEVER_EXPIRES: u32 = u32::MAX;

enum Command {
    Connect {
        client_id: String,
        conn_id: u64,
        /// Seconds the session lives on once its client is away
        /// ([`SESSION_ENDS`], [`SESSION_NEVER_EXPIRES`]).
        expiry_secs: u32,
        resume: bool,
        outbox: OutboxSender,
        reply: oneshot::Sender<Attached>,
    },
    Disconnect {
        client_id: String,
        conn_id: u64,
        unacked: Vec<Delivery>,
        released: Vec<Released>,
    },
    Subscribe {
        client_id: String,
        filters: Vec<(String, u8)>,
        reply: oneshot::Sender<(Vec<Delivery>, Option<oneshot::Receiver<()>>)>,
    },
    Unsubscribe {
        client_id: String,
        filters: Vec<String>,
    },
    Publish(Vec<Delivery>),
    SendTo {
        client_id: String,
        delivery: Delivery,
        reply: oneshot::Sender<bool>,
    },
    Offer {
        delivery: Delivery,
        reply: oneshot::Sender<bool>,
    },
    Clients {
        limit: usize,
        reply: oneshot::Sender<Clients>,
    },
}

/// The sessions the broker holds, as the status page lists them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Clients {
    /// Clients connected now.
    pub connected: usize,
    /// Persistent sessions whose client is away.
    pub away: usize,
    /// Connected ones first, each group by client id; at most the limit asked.
    pub sessions: Vec<ClientView>,
}

/// One session of [`Clients`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientView {
    pub client_id: String,
    pub connected: bool,
    /// Connected since, or away since (Unix ms on the hub clock).
    pub since_ms: u64,
    pub persistent: bool,
    pub subscriptions: usize,
    /// Messages kept for it while away.
    pub queued: usize,
}

#[derive(Clone)]
pub struct BrokerHandle {
    tx: mpsc::Sender<Command>,
    interest: Arc<Interest>,
}

/// Whether any local subscription exists, so a publish nobody can receive
/// (and that keeps nothing retained) skips the actor: no hop, no wake-up.
#[derive(Default)]
struct Interest {
    /// Subscriptions held (by the actor's count, after each change).
    held: AtomicUsize,
    /// Subscribe requests sent and not yet applied: a publish sent after a
    /// subscribe request goes through the actor, after it.
    pending: AtomicUsize,
}

impl Interest {
    fn any(&self) -> bool {
        self.held.load(Ordering::Acquire) + self.pending.load(Ordering::Acquire) > 0
    }
}

impl BrokerHandle {
    /// Attaches a session; an older connection with the same client id is
    /// kicked. `expiry_secs`: how long the session outlives the connection.
    pub async fn connect(
        &self,
        client_id: &str,
        conn_id: u64,
        expiry_secs: u32,
        resume: bool,
        outbox: OutboxSender,
    ) -> Option<Attached> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Connect {
            client_id: client_id.to_string(),
            conn_id,
            expiry_secs,
            resume,
            outbox,
            reply,
        };
        self.tx.send(cmd).await.ok()?;
        rx.await.ok()
    }

    /// Detaches a session; a persistent one keeps `unacked` (sent again)
    /// and `released` (their PUBREL sent again) for its next connection.
    pub async fn disconnect(
        &self,
        client_id: &str,
        conn_id: u64,
        unacked: Vec<Delivery>,
        released: Vec<Released>,
    ) {
        let cmd = Command::Disconnect {
            client_id: client_id.to_string(),
            conn_id,
            unacked,
            released,
        };
        let _ = self.tx.send(cmd).await;
    }

    /// Adds subscriptions and returns the retained messages they match,
    /// once the subscriptions of a persistent session are durable.
    pub async fn subscribe(&self, client_id: &str, filters: Vec<(String, u8)>) -> Vec<Delivery> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Subscribe {
            client_id: client_id.to_string(),
            filters,
            reply,
        };
        self.interest.pending.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(cmd).await.is_err() {
            self.interest.pending.fetch_sub(1, Ordering::AcqRel);
            return Vec::new();
        }
        let (retained, durable) = rx.await.unwrap_or_default();
        if let Some(durable) = durable {
            let _ = durable.await;
        }
        retained
    }

    pub async fn unsubscribe(&self, client_id: &str, filters: Vec<String>) {
        let cmd = Command::Unsubscribe {
            client_id: client_id.to_string(),
            filters,
        };
        let _ = self.tx.send(cmd).await;
    }

    pub async fn publish(&self, mut messages: Vec<Delivery>) {
        if !self.interest.any() {
            messages.retain(|m| m.retain);
            if messages.is_empty() {
                return;
            }
        }
        let _ = self.tx.send(Command::Publish(messages)).await;
    }

    /// Sends a message the hub addresses to one client (an answer on its
    /// own `$iothub/...`), if one of its subscriptions matches; a
    /// persistent session away keeps it (at QoS 1), as for a publish.
    /// Returns whether a connected client took it.
    pub async fn send_to(&self, client_id: &str, delivery: Delivery) -> bool {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::SendTo {
            client_id: client_id.to_string(),
            delivery,
            reply,
        };
        if self.tx.send(cmd).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// The sessions held: counts, and the first `limit` of them.
    pub async fn clients(&self, limit: usize) -> Clients {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::Clients { limit, reply })
            .await
            .is_err()
        {
            return Clients::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Publishes a message its owner keeps (with a receipt) to every
    /// matching subscriber; returns whether a connected one took it.
    pub async fn offer(&self, delivery: Delivery) -> bool {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::Offer { delivery, reply })
            .await
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

struct Client {
    conn_id: u64,
    /// The connection that started this session (a resumption keeps it; 0:
    /// restored): an older connection of the same session that was taken
    /// over hands what it had on to the newer one.
    session_from: u64,
    expiry_secs: u32,
    /// When its latest connection was made (Unix ms; 0: restored away).
    connected_ms: u64,
    /// When its client went away (Unix ms); `None` while connected.
    away_since_ms: Option<u64>,
    /// Dropped, it tells the session its connection is over (taken over).
    outbox: Option<OutboxSender>,
    subscriptions: BTreeMap<String, u8>,
    /// What it keeps for its client; `None` while there is nothing (a
    /// connected client's usual case: the table entry stays small).
    kept: Option<Box<Kept>>,
}

/// What a persistent session keeps for its client beyond its
/// subscriptions.
#[derive(Default)]
struct Kept {
    /// Messages kept while away, by sequence number (their order).
    offline: BTreeMap<u64, Delivery>,
    /// QoS 2 deliveries waiting for PUBCOMP while away.
    released: Vec<Released>,
}

impl Kept {
    /// `None` when there is nothing to keep.
    fn boxed(offline: BTreeMap<u64, Delivery>, released: Vec<Released>) -> Option<Box<Kept>> {
        (!offline.is_empty() || !released.is_empty()).then(|| Box::new(Kept { offline, released }))
    }
}

impl Client {
    fn kept(&mut self) -> &mut Kept {
        self.kept.get_or_insert_with(Box::default)
    }

    /// How many messages wait for its client.
    fn queued(&self) -> usize {
        self.kept.as_ref().map_or(0, |k| k.offline.len())
    }

    fn persistent(&self) -> bool {
        self.expiry_secs != SESSION_ENDS
    }

    fn expired(&self, now_ms: u64) -> bool {
        match self.away_since_ms {
            Some(since) if self.expiry_secs != SESSION_NEVER_EXPIRES => {
                now_ms >= since.saturating_add(u64::from(self.expiry_secs) * 1000)
            }
            _ => false,
        }
    }

    /// The QoS of its best subscription matching `topic`, if any.
    fn granted(&self, topic: &str) -> Option<u8> {
        self.subscriptions
            .iter()
            .filter(|(f, _)| topic::matches(f, topic))
            .map(|(_, q)| *q)
            .max()
    }

    fn stored(&self) -> StoredSession {
        let mut subscriptions: Vec<_> = self
            .subscriptions
            .iter()
            .map(|(f, q)| (f.clone(), *q))
            .collect();
        subscriptions.sort();
        StoredSession {
            subscriptions,
            expiry_secs: self.expiry_secs,
            away_since_ms: self.away_since_ms,
            released: self
                .kept
                .iter()
                .flat_map(|k| &k.released)
                .map(|(pkid, _)| *pkid)
                .collect(),
        }
    }
}

/// Keeps `deliveries` (in order) in `client`'s offline queue for its next
/// resumption, written to the journal as queued.
fn keep_offline(
    client: &mut Client,
    journal: &Option<Journal>,
    next_seq: &mut u64,
    client_id: &str,
    deliveries: impl IntoIterator<Item = Delivery>,
) {
    for p in deliveries {
        let seq = *next_seq;
        *next_seq += 1;
        if let Some(journal) = journal {
            journal.record(Change::Queued(client_id.to_string(), seq, Some(p.clone())));
        }
        client.kept().offline.insert(seq, p);
    }
}

/// A message of a resumed session, lost with its connection before the
/// client acknowledged it: it goes back into the session's queue.
struct Requeue {
    client_id: String,
    /// The connection it was handed to.
    conn_id: u64,
    seq: u64,
    delivery: Delivery,
    /// QoS 2: the packet id it was received under (PUBREC) before the
    /// connection was lost: only its PUBREL goes again.
    released: Option<u16>,
}

struct Broker {
    interest: Arc<Interest>,
    /// Boxed: the table of 10,000 mostly idle clients stays small.
    clients: HashMap<String, Box<Client>>,
    /// The clients' subscriptions by filter (kept in step with them).
    index: index::Index,
    retained: HashMap<String, Delivery>,
    retained_bytes: usize,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Where what the broker keeps is written; `None`: kept in memory only.
    journal: Option<Journal>,
    requeue: mpsc::UnboundedSender<Requeue>,
    /// The next queued message's sequence number (across all sessions).
    next_seq: u64,
}

/// How often sessions away are checked for expiry.
const EXPIRY_SWEEP: Duration = Duration::from_secs(30);

/// Starts the broker actor, keeping everything in memory; it ends when
/// every handle is dropped.
pub fn spawn(
    offline_cap: usize,
    metrics: Arc<Metrics>,
) -> (BrokerHandle, tokio::task::JoinHandle<()>) {
    start(Limits::with_offline_queue(offline_cap), None, metrics)
}

/// Starts the broker actor with the sessions and retained messages the
/// store kept, keeping them there as they change. The task ends when every
/// handle is dropped and what the broker keeps is durable.
pub fn spawn_durable(
    limits: Limits,
    store: &Store,
    metrics: Arc<Metrics>,
) -> Result<(BrokerHandle, tokio::task::JoinHandle<()>), JournalError> {
    let (journal, restored, writer) = Journal::open(store, metrics.clone())?;
    tracing::info!(
        sessions = restored.sessions.len(),
        queued = restored
            .sessions
            .iter()
            .map(|s| s.queued.len())
            .sum::<usize>(),
        retained = restored.retained.len(),
        "local broker state restored"
    );
    let (handle, actor) = start(limits, Some((journal, restored)), metrics);
    let task = tokio::spawn(async move {
        let _ = actor.await;
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    });
    Ok((handle, task))
}

fn start(
    limits: Limits,
    durable: Option<(Journal, Restored)>,
    metrics: Arc<Metrics>,
) -> (BrokerHandle, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel(4096);
    let (requeue, mut requeued) = mpsc::unbounded_channel();
    let interest = Arc::new(Interest::default());
    let mut broker = Broker {
        interest: interest.clone(),
        clients: HashMap::new(),
        index: index::Index::default(),
        retained: HashMap::new(),
        retained_bytes: 0,
        limits,
        metrics,
        journal: None,
        requeue,
        next_seq: 1,
    };
    if let Some((journal, restored)) = durable {
        broker.journal = Some(journal);
        broker.restore(restored);
    }
    broker
        .interest
        .held
        .store(broker.index.len(), Ordering::Release);
    let join = tokio::spawn(async move {
        let mut sweep = tokio::time::interval(EXPIRY_SWEEP);
        loop {
            let cmd = tokio::select! {
                biased;
                Some(lost) = requeued.recv() => {
                    broker.requeue(lost);
                    continue;
                }
                _ = sweep.tick() => {
                    broker.expire(crate::clock::now_ms());
                    continue;
                }
                cmd = rx.recv() => match cmd {
                    Some(cmd) => cmd,
                    None => break,
                },
            };
            let changes = !matches!(
                cmd,
                Command::Publish(_)
                    | Command::SendTo { .. }
                    | Command::Offer { .. }
                    | Command::Clients { .. }
            );
            let subscribing = matches!(cmd, Command::Subscribe { .. });
            broker.handle(cmd);
            if changes {
                broker
                    .interest
                    .held
                    .store(broker.index.len(), Ordering::Release);
            }
            if subscribing {
                broker.interest.pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    });
    (BrokerHandle { tx, interest }, join)
}

impl Broker {
    /// Adds a client and its subscriptions to the index.
    fn insert_client(&mut self, client_id: String, client: Client) {
        self.remove_client(&client_id);
        for (filter, &qos) in &client.subscriptions {
            self.index.insert(filter, &client_id, qos);
        }
        self.clients.insert(client_id, Box::new(client));
    }

    /// Removes a client and its subscriptions from the index.
    fn remove_client(&mut self, client_id: &str) -> Option<Client> {
        let client = *self.clients.remove(client_id)?;
        for filter in client.subscriptions.keys() {
            self.index.remove(filter, client_id);
        }
        Some(client)
    }

    fn record(&self, change: Change) {
        if let Some(journal) = &self.journal {
            journal.record(change);
        }
    }

    /// Takes back what the store kept: every session away (a session that
    /// was connected when the hub stopped is away since now).
    fn restore(&mut self, restored: Restored) {
        let now = crate::clock::now_ms();
        for durable::RestoredSession {
            client_id,
            session,
            queued,
            received,
        } in restored.sessions
        {
            let last = queued.iter().map(|(seq, _)| *seq);
            if let Some(last) = last.chain(received.iter().map(|(seq, _)| *seq)).max() {
                self.next_seq = self.next_seq.max(last + 1);
            }
            // Kept messages the client received (PUBREC): their PUBREL goes
            // again, and their PUBCOMP removes them from the store.
            let mut released: Vec<Released> = session
                .released
                .into_iter()
                .filter(|p| !received.iter().any(|(_, r)| r == p))
                .map(|p| (p, None))
                .collect();
            for (seq, pkid) in received {
                released.push((pkid, received_receipt(&self.journal, &client_id, seq)));
            }
            let client = Client {
                conn_id: 0,
                session_from: 0,
                expiry_secs: session.expiry_secs,
                connected_ms: 0,
                away_since_ms: Some(session.away_since_ms.unwrap_or(now)),
                outbox: None,
                subscriptions: session.subscriptions.into_iter().collect(),
                kept: Kept::boxed(queued.into_iter().collect(), released),
            };
            self.insert_client(client_id, client);
        }
        for message in restored.retained {
            self.retained_bytes += message.topic.len() + message.payload.len();
            self.retained.insert(message.topic.clone(), message);
        }
        self.expire(now);
    }

    /// Ends every session whose client has been away longer than its expiry.
    fn expire(&mut self, now_ms: u64) {
        let expired: Vec<String> = self
            .clients
            .iter()
            .filter(|(_, c)| c.expired(now_ms))
            .map(|(id, _)| id.clone())
            .collect();
        for client_id in expired {
            if let Some(client) = self.remove_client(&client_id) {
                tracing::info!(client = %client_id, queued = client.queued(), "persistent session expired");
            }
            self.record(Change::Session(client_id, None));
        }
    }

    fn requeue(&mut self, lost: Requeue) {
        let Some(client) = self.clients.get_mut(&lost.client_id) else {
            return;
        };
        if !client.persistent() {
            return;
        }
        if let Some(pkid) = lost.released {
            // Received (PUBREC) before it was lost: its PUBREL goes again on
            // the next resumption, never the PUBLISH.
            let receipt = received_receipt(&self.journal, &lost.client_id, lost.seq);
            client.kept().released.push((pkid, receipt));
            return;
        }
        match &client.outbox {
            Some(outbox) if client.conn_id != lost.conn_id => {
                // A newer connection took the session over: it gets it now
                // (it stays stored until acknowledged).
                let receipt = resumed_receipt(
                    &self.journal,
                    &self.requeue,
                    &lost.client_id,
                    client.conn_id,
                    lost.seq,
                    &lost.delivery,
                );
                let delivery = Delivery {
                    receipt,
                    ..lost.delivery
                };
                if outbox.try_send(delivery).is_err() {
                    self.metrics.messages_dropped(DropReason::SlowSubscriber, 1);
                }
            }
            // Away, or lost by the connection it was handed to: it waits
            // for the session's next resumption.
            _ => {
                client.kept().offline.insert(lost.seq, lost.delivery);
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Connect {
                client_id,
                conn_id,
                expiry_secs,
                resume,
                outbox,
                reply,
            } => {
                // Dropping an older connection's outbox kicks it.
                let previous = self.remove_client(&client_id).map(|old| Client {
                    outbox: None,
                    ..old
                });
                let now = crate::clock::now_ms();
                let kept = previous.filter(|old| old.persistent() && !old.expired(now));
                let had_stored = kept.is_some();
                let (session_from, subscriptions, offline, released) = match kept {
                    Some(old) if resume => {
                        let kept = old.kept.map(|k| *k).unwrap_or_default();
                        (
                            Some(old.session_from),
                            old.subscriptions,
                            kept.offline,
                            kept.released,
                        )
                    }
                    _ => (None, BTreeMap::new(), BTreeMap::new(), Vec::new()),
                };
                let session_present = session_from.is_some();
                if had_stored && !session_present {
                    self.record(Change::Session(client_id.clone(), None));
                }
                let client = Client {
                    conn_id,
                    session_from: session_from.unwrap_or(conn_id),
                    expiry_secs,
                    connected_ms: now,
                    away_since_ms: None,
                    outbox: Some(outbox),
                    subscriptions,
                    kept: None,
                };
                if client.persistent() {
                    self.record(Change::Session(client_id.clone(), Some(client.stored())));
                } else if session_present {
                    // Resumed, but ends with this connection: nothing is kept.
                    self.record(Change::Session(client_id.clone(), None));
                }
                // A message kept for the session stays stored until the
                // client acknowledges it.
                let queued = offline
                    .into_iter()
                    .map(|(seq, d)| {
                        let receipt = if client.persistent() {
                            resumed_receipt(
                                &self.journal,
                                &self.requeue,
                                &client_id,
                                conn_id,
                                seq,
                                &d,
                            )
                        } else {
                            None
                        };
                        Delivery { receipt, ..d }
                    })
                    .collect();
                self.insert_client(client_id, client);
                let _ = reply.send(Attached {
                    session_present,
                    queued,
                    released,
                });
            }
            Command::Disconnect {
                client_id,
                conn_id,
                unacked,
                released,
            } => {
                let Some(client) = self.clients.get_mut(&client_id) else {
                    return;
                };
                if client.conn_id != conn_id {
                    // Taken over by a newer connection. If that one resumed
                    // this session, what the old one had sent unacknowledged
                    // or had waiting goes on to it (those with a receipt
                    // come back through their owner); a clean start
                    // discarded the session, and with it all of this.
                    if client.persistent() && conn_id >= client.session_from {
                        if !released.is_empty() {
                            client.kept().released.extend(released);
                        }
                        let lost = unacked
                            .into_iter()
                            .filter(|p| p.receipt.is_none())
                            .map(|p| Delivery { dup: true, ..p });
                        let mut left = Vec::new();
                        for p in lost {
                            match &client.outbox {
                                Some(outbox) => {
                                    if let Err(p) = outbox.try_send(p) {
                                        left.push(p);
                                    }
                                }
                                None => left.push(p),
                            }
                        }
                        // What its outbox has no room for, or all of it when
                        // the newer connection has ended too, waits for the
                        // session's next resumption.
                        keep_offline(client, &self.journal, &mut self.next_seq, &client_id, left);
                    }
                    return;
                }
                if client.persistent() {
                    // Queued for it as it ended: never sent, kept like the
                    // unacknowledged ones, after them.
                    let unsent = client
                        .outbox
                        .take()
                        .map(|o| o.take_back())
                        .unwrap_or_default();
                    client.away_since_ms = Some(crate::clock::now_ms());
                    // (What it holds while connected was lost by an older
                    // connection after its PUBREC.)
                    if !released.is_empty() {
                        client.kept().released.extend(released);
                    }
                    let stored = client.stored();
                    if let Some(journal) = &self.journal {
                        journal.record(Change::Session(client_id.clone(), Some(stored)));
                    }
                    // Sent before and not acknowledged (those with a
                    // receipt come back through their owner).
                    let unacked = unacked.into_iter().map(|p| Delivery { dup: true, ..p });
                    let lost = unacked.chain(unsent).filter(|p| p.receipt.is_none());
                    keep_offline(client, &self.journal, &mut self.next_seq, &client_id, lost);
                } else {
                    self.remove_client(&client_id);
                }
            }
            Command::Subscribe {
                client_id,
                filters,
                reply,
            } => {
                let mut retained = Vec::new();
                let mut durable = None;
                if let Some(client) = self.clients.get_mut(&client_id) {
                    for (filter, qos) in filters {
                        for (topic, msg) in &self.retained {
                            if topic::matches(&filter, topic) {
                                retained.push(Delivery {
                                    qos: msg.qos.min(qos),
                                    ..msg.clone()
                                });
                            }
                        }
                        self.index.insert(&filter, &client_id, qos);
                        client.subscriptions.insert(filter, qos);
                    }
                    if let (true, Some(journal)) = (client.persistent(), &self.journal) {
                        journal.record(Change::Session(client_id.clone(), Some(client.stored())));
                        durable = Some(journal.barrier());
                    }
                }
                let _ = reply.send((retained, durable));
            }
            Command::Unsubscribe { client_id, filters } => {
                if let Some(client) = self.clients.get_mut(&client_id) {
                    for f in filters {
                        if client.subscriptions.remove(&f).is_some() {
                            self.index.remove(&f, &client_id);
                        }
                    }
                    if client.persistent() {
                        let stored = client.stored();
                        self.record(Change::Session(client_id, Some(stored)));
                    }
                }
            }
            Command::Publish(messages) => {
                for msg in messages {
                    if msg.topic.starts_with(iothub::ROOT) {
                        // Sessions answer `$iothub` themselves; nothing
                        // there is shared between clients.
                        tracing::error!(topic = %msg.topic, "a publish on $iothub reached the local broker; not delivered");
                        continue;
                    }
                    self.publish(msg);
                }
            }
            Command::Offer { delivery, reply } => {
                let _ = reply.send(self.publish(delivery));
            }
            Command::Clients { limit, reply } => {
                let _ = reply.send(self.list(limit));
            }
            Command::SendTo {
                client_id,
                delivery,
                reply,
            } => {
                let client = self.clients.get_mut(&client_id);
                let granted = client.as_ref().and_then(|c| c.granted(&delivery.topic));
                let taken = match (client, granted) {
                    (Some(client), Some(granted)) => deliver(
                        &client_id,
                        client,
                        granted,
                        delivery,
                        &mut self.next_seq,
                        &self.journal,
                        self.limits.offline_queue,
                        &self.metrics,
                    ),
                    _ => false,
                };
                let _ = reply.send(taken);
            }
        }
    }

    /// Counts the sessions and lists the first `limit` (connected ones
    /// first, each group by client id).
    fn list(&self, limit: usize) -> Clients {
        let connected = self
            .clients
            .values()
            .filter(|c| c.away_since_ms.is_none())
            .count();
        let mut ids: Vec<(bool, &String)> = self
            .clients
            .iter()
            .map(|(id, c)| (c.away_since_ms.is_some(), id))
            .collect();
        let limit = limit.min(ids.len());
        if limit > 0 && limit < ids.len() {
            ids.select_nth_unstable(limit - 1);
        }
        ids.truncate(limit);
        ids.sort_unstable();
        let sessions = ids
            .into_iter()
            .map(|(away, id)| {
                let c = &self.clients[id];
                ClientView {
                    client_id: id.clone(),
                    connected: !away,
                    since_ms: c.away_since_ms.unwrap_or(c.connected_ms),
                    persistent: c.persistent(),
                    subscriptions: c.subscriptions.len(),
                    queued: c.queued(),
                }
            })
            .collect();
        Clients {
            connected,
            away: self.clients.len() - connected,
            sessions,
        }
    }

    /// Delivers `msg` to every matching client; returns whether a
    /// connected one took it.
    fn publish(&mut self, msg: Delivery) -> bool {
        if msg.retain {
            self.retain(&msg);
        }
        let mut matched = HashMap::new();
        self.index.matches(&msg.topic, &mut matched);
        let mut taken = false;
        for (client_id, granted) in matched {
            let Some(client) = self.clients.get_mut(client_id) else {
                continue;
            };
            taken |= deliver(
                client_id,
                client,
                granted,
                msg.clone(),
                &mut self.next_seq,
                &self.journal,
                self.limits.offline_queue,
                &self.metrics,
            );
        }
        taken
    }

    /// Keeps (or clears, for an empty payload) the retained message of
    /// `msg.topic`, within the limits.
    fn retain(&mut self, msg: &Delivery) {
        let size = |m: &Delivery| m.topic.len() + m.payload.len();
        let old = self.retained.get(&msg.topic).map(size);
        if msg.payload.is_empty() {
            if let Some(old) = old {
                self.retained.remove(&msg.topic);
                self.retained_bytes -= old;
                self.record(Change::Retained(msg.topic.clone(), None));
            }
            return;
        }
        if self.journal.as_ref().is_some_and(|j| !j.has_room()) {
            tracing::warn!(topic = %msg.topic, "the disk is at the floor kept free: this retained message is delivered, not kept");
            // The one kept before is older than what was just said: a new
            // subscriber gets nothing rather than a stale value.
            if let Some(old) = old {
                self.retained.remove(&msg.topic);
                self.retained_bytes -= old;
                self.record(Change::Retained(msg.topic.clone(), None));
            }
            return;
        }
        let bytes = self.retained_bytes - old.unwrap_or(0) + size(msg);
        let count = self.retained.len() + usize::from(old.is_none());
        if count > self.limits.retained_messages || bytes > self.limits.retained_bytes {
            tracing::warn!(
                topic = %msg.topic,
                retained = self.retained.len(),
                bytes = self.retained_bytes,
                "retained messages are at their limit: this one is delivered, not kept"
            );
            return;
        }
        self.retained_bytes = bytes;
        let kept = Delivery {
            receipt: None,
            dup: false,
            ..msg.clone()
        };
        self.record(Change::Retained(msg.topic.clone(), Some(kept.clone())));
        self.retained.insert(msg.topic.clone(), kept);
    }
}

/// The receipt of a kept message handed to its resumed session: the
/// client's acknowledgement removes it from the store; losing it with the
/// connection puts it back into the session's queue.
fn resumed_receipt(
    journal: &Option<Journal>,
    requeue: &mpsc::UnboundedSender<Requeue>,
    client_id: &str,
    conn_id: u64,
    seq: u64,
    delivery: &Delivery,
) -> Option<Receipt> {
    let journal = journal.clone()?;
    let requeue = requeue.clone();
    let client_id = client_id.to_string();
    let again = Delivery {
        dup: true,
        receipt: None,
        ..delivery.clone()
    };
    // 0: not received; else the packet id it was received under, plus one.
    let received = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let release = {
        let (journal, client_id, received) = (journal.clone(), client_id.clone(), received.clone());
        move |pkid: u16| {
            received.store(u32::from(pkid) + 1, Ordering::Release);
            journal.record(Change::Received(client_id.clone(), seq, pkid));
            Some(journal.barrier())
        }
    };
    let tell = move |acknowledged| {
        if acknowledged {
            journal.record(Change::Queued(client_id.clone(), seq, None));
        } else {
            let released = match received.load(Ordering::Acquire) {
                0 => None,
                n => u16::try_from(n - 1).ok(),
            };
            let _ = requeue.send(Requeue {
                client_id: client_id.clone(),
                conn_id,
                seq,
                delivery: again.clone(),
                released,
            });
        }
    };
    Some(Receipt::releasing(tell, release))
}

/// The receipt of a kept message its client received (PUBREC) and has not
/// completed: its PUBCOMP removes it from the store; lost, it stays there
/// (and its PUBREL goes again after a restart).
fn received_receipt(journal: &Option<Journal>, client_id: &str, seq: u64) -> Option<Receipt> {
    let journal = journal.clone()?;
    let client_id = client_id.to_string();
    Some(Receipt::new(move |acknowledged| {
        if acknowledged {
            journal.record(Change::Queued(client_id.clone(), seq, None));
        }
    }))
}

/// Hands `msg` to a client at the QoS its best matching subscription
/// grants. Returns whether the connected client took it.
#[allow(clippy::too_many_arguments)]
fn deliver(
    client_id: &str,
    client: &mut Client,
    granted: u8,
    msg: Delivery,
    next_seq: &mut u64,
    journal: &Option<Journal>,
    offline_cap: usize,
    metrics: &Metrics,
) -> bool {
    let out = Delivery {
        qos: msg.qos.min(granted),
        retain: false,
        dup: false,
        ..msg
    };
    let Some(outbox) = &client.outbox else {
        // Away: a persistent session keeps QoS 1 messages (not those with
        // a receipt: their owner delivers them again).
        if out.qos > 0 && out.receipt.is_none() {
            if journal.as_ref().is_some_and(|j| !j.has_room()) {
                metrics.messages_dropped(DropReason::NoRoom, 1);
                return false;
            }
            let offline = &mut client.kept().offline;
            if offline.len() >= offline_cap {
                if let Some((oldest, _)) = offline.pop_first() {
                    if let Some(journal) = journal {
                        journal.record(Change::Queued(client_id.to_string(), oldest, None));
                    }
                }
                metrics.messages_dropped(DropReason::OfflineQueueFull, 1);
            }
            let seq = *next_seq;
            *next_seq += 1;
            if let Some(journal) = journal {
                journal.record(Change::Queued(
                    client_id.to_string(),
                    seq,
                    Some(out.clone()),
                ));
            }
            offline.insert(seq, out);
        }
        return false;
    };
    match outbox.try_send(out) {
        Ok(()) => true,
        Err(refused) => {
            // A message its owner keeps is not lost: the owner sends it again.
            if refused.receipt.is_none() {
                metrics.messages_dropped(DropReason::SlowSubscriber, 1);
            }
            false
        }
    }
}

/// A clean-session client attached to `broker` and subscribed to
/// `filters`: what it receives (for tests of the broker's users).
#[cfg(test)]
pub(crate) async fn subscribed_client(
    broker: &BrokerHandle,
    id: &str,
    conn: u64,
    filters: &[(&str, u8)],
) -> Outbox {
    let (outbox, inbox) = outbox(16);
    let attached = broker.connect(id, conn, SESSION_ENDS, false, outbox);
    attached.await.expect("the broker is running");
    let filters = filters.iter().map(|(f, q)| (f.to_string(), *q)).collect();
    broker.subscribe(id, filters).await;
    inbox
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(topic: &str, retain: bool) -> Delivery {
        Delivery {
            topic: topic.into(),
            payload: Bytes::from_static(b"x"),
            qos: 1,
            retain,
            dup: false,
            receipt: None,
        }
    }

    #[tokio::test]
    async fn with_no_subscriber_only_retained_messages_are_kept_and_a_new_subscription_is_served_at_once(
    ) {
        let (broker, task) = spawn(16, Arc::default());
        broker
            .publish(vec![delivery("a/1", false), delivery("a/r", true)])
            .await;
        let (outbox, mut inbox) = outbox(16);
        let attached = broker.connect("c", 1, SESSION_ENDS, false, outbox);
        attached.await.unwrap();
        let retained = broker.subscribe("c", vec![("a/#".into(), 1)]).await;
        assert_eq!(
            retained
                .iter()
                .map(|d| d.topic.as_str())
                .collect::<Vec<_>>(),
            ["a/r"],
            "the retained message was kept though nobody listened"
        );
        broker.publish(vec![delivery("a/2", false)]).await;
        assert_eq!(inbox.recv().await.unwrap().topic, "a/2");
        broker.unsubscribe("c", vec!["a/#".into()]).await;
        broker.publish(vec![delivery("a/3", false)]).await;
        broker.disconnect("c", 1, Vec::new(), Vec::new()).await;
        drop(broker);
        task.await.unwrap();
        assert!(
            inbox.recv().await.is_none(),
            "nothing after the unsubscribe"
        );
    }

    #[tokio::test]
    async fn an_iothub_publish_reaches_nobody_and_an_answer_reaches_only_its_client() {
        let (broker, task) = spawn(16, Arc::default());
        let mut inboxes = Vec::new();
        for (conn, c) in ["a", "b"].into_iter().enumerate() {
            let filters = [("$iothub/twin/res/#", 1)];
            inboxes.push(subscribed_client(&broker, c, conn as u64, &filters).await);
        }
        broker
            .publish(vec![delivery("$iothub/twin/res/200/?$rid=1", true)])
            .await;
        assert!(
            broker
                .send_to("a", delivery("$iothub/twin/res/200/?$rid=2", false))
                .await
        );
        assert!(
            !broker
                .send_to("b", delivery("$iothub/other/?$rid=3", false))
                .await,
            "no subscription of b matches"
        );
        assert!(
            !broker
                .send_to("nobody", delivery("$iothub/twin/res/200/?$rid=4", false))
                .await
        );
        drop(broker);
        task.await.unwrap();
        let a: Vec<_> = std::iter::from_fn(|| inboxes[0].try_recv()).collect();
        let b: Vec<_> = std::iter::from_fn(|| inboxes[1].try_recv()).collect();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].topic, "$iothub/twin/res/200/?$rid=2");
        assert!(
            b.is_empty(),
            "b got {b:?}: not its answer, nor one it subscribed to"
        );
    }

    async fn attach(broker: &BrokerHandle, id: &str, conn: u64, expiry: u32) -> (Attached, Outbox) {
        let (outbox, inbox) = outbox(16);
        let attached = broker
            .connect(id, conn, expiry, true, outbox)
            .await
            .unwrap();
        (attached, inbox)
    }

    #[tokio::test]
    async fn deliveries_that_cross_a_persistent_session_s_end_are_kept_for_its_return_in_order() {
        let (broker, _task) = spawn(16, Arc::new(Metrics::default()));
        let (_, inbox) = attach(&broker, "p", 1, SESSION_NEVER_EXPIRES).await;
        broker.subscribe("p", vec![("t/#".into(), 1)]).await;
        // The session has drained its outbox and is ending: one delivery
        // reaches its outbox unread, one comes after the session's end is
        // gone, both before the broker hears that the session is over.
        broker.publish(vec![delivery("t/1", false)]).await;
        broker.clients(1).await;
        drop(inbox);
        broker.publish(vec![delivery("t/2", false)]).await;
        broker.disconnect("p", 1, Vec::new(), Vec::new()).await;
        let (attached, _inbox) = attach(&broker, "p", 2, SESSION_NEVER_EXPIRES).await;
        let topics: Vec<_> = attached.queued.iter().map(|d| d.topic.as_str()).collect();
        assert_eq!(
            topics,
            ["t/1", "t/2"],
            "the deliveries the session never read"
        );
    }

    #[tokio::test]
    async fn a_connection_taken_over_by_a_resumption_hands_its_unacknowledged_and_waiting_deliveries_to_the_new_one(
    ) {
        let (broker, _task) = spawn(16, Arc::new(Metrics::default()));
        let (_, mut old) = attach(&broker, "p", 1, SESSION_NEVER_EXPIRES).await;
        broker.subscribe("p", vec![("t/#".into(), 1)]).await;
        broker
            .publish(vec![delivery("t/1", false), delivery("t/2", false)])
            .await;
        broker.clients(1).await;
        // The old connection has sent t/1 (unacknowledged); t/2 waits.
        let in_flight = old.try_recv().expect("t/1 handed to the old connection");
        // The client comes back on a new connection before the old one ends
        // (a half-open TCP connection): it resumes the session.
        let (attached, mut new) = attach(&broker, "p", 2, SESSION_NEVER_EXPIRES).await;
        assert!(attached.session_present);
        broker.publish(vec![delivery("t/3", false)]).await;
        // The old session ends as it does: what it sent, then what waited.
        let mut unacked = vec![in_flight];
        unacked.extend(std::iter::from_fn(|| old.try_recv()));
        broker.disconnect("p", 1, unacked, Vec::new()).await;
        broker.clients(1).await;
        let got: Vec<(String, bool)> = std::iter::from_fn(|| new.try_recv())
            .map(|d| (d.topic, d.dup))
            .collect();
        assert_eq!(
            got,
            [
                ("t/3".to_string(), false),
                ("t/1".to_string(), true),
                ("t/2".to_string(), true)
            ],
            "nothing the old connection had is lost"
        );

        // A clean start discards the session: a connection it took over
        // hands nothing on.
        let (outbox3, mut clean) = outbox(16);
        let attached = broker
            .connect("p", 3, SESSION_NEVER_EXPIRES, false, outbox3)
            .await
            .unwrap();
        assert!(!attached.session_present);
        broker
            .disconnect("p", 2, vec![delivery("t/4", false)], Vec::new())
            .await;
        broker.clients(1).await;
        assert!(
            clean.try_recv().is_none(),
            "the discarded session's delivery came through"
        );
    }

    #[tokio::test]
    async fn the_session_list_counts_everyone_and_shows_the_connected_first_up_to_its_limit() {
        let (broker, _task) = spawn(16, Arc::new(Metrics::default()));
        let (_, _b) = attach(&broker, "b", 1, SESSION_ENDS).await;
        let (_, _a) = attach(&broker, "a", 2, SESSION_NEVER_EXPIRES).await;
        let (_, _z) = attach(&broker, "z", 3, SESSION_NEVER_EXPIRES).await;
        broker.subscribe("z", vec![("t/#".into(), 1)]).await;
        broker.disconnect("a", 2, Vec::new(), Vec::new()).await;
        broker.disconnect("z", 3, Vec::new(), Vec::new()).await;
        broker.publish(vec![delivery("t/1", false)]).await;
        broker.disconnect("b", 1, Vec::new(), Vec::new()).await;
        let (_, _c) = attach(&broker, "c", 4, SESSION_ENDS).await;

        let all = broker.clients(10).await;
        assert_eq!((all.connected, all.away), (1, 2), "{all:?}");
        let shown: Vec<(&str, bool)> = all
            .sessions
            .iter()
            .map(|c| (c.client_id.as_str(), c.connected))
            .collect();
        assert_eq!(shown, [("c", true), ("a", false), ("z", false)]);
        let z = &all.sessions[2];
        assert_eq!((z.persistent, z.subscriptions, z.queued), (true, 1, 1));
        let first = broker.clients(2).await;
        assert_eq!((first.connected, first.away), (1, 2));
        assert_eq!(first.sessions.len(), 2);
        assert_eq!(first.sessions[0].client_id, "c");
        assert_eq!(first.sessions[1].client_id, "a");
    }

    #[tokio::test]
    async fn a_persistent_session_and_a_retained_message_outlive_the_broker_and_a_kept_message_leaves_the_store_once_acknowledged(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let limits = Limits::with_offline_queue(16);
        let metrics = Arc::new(Metrics::default());
        {
            let (broker, task) = spawn_durable(limits, &store, metrics.clone()).unwrap();
            let (attached, _inbox) = attach(&broker, "c", 1, 3600).await;
            assert!(!attached.session_present);
            broker.subscribe("c", vec![("a/#".into(), 1)]).await;
            broker.disconnect("c", 1, Vec::new(), Vec::new()).await;
            broker
                .publish(vec![
                    delivery("a/1", false),
                    delivery("a/2", false),
                    delivery("a/r", true),
                ])
                .await;
            drop(broker);
            task.await.unwrap();
        }
        let (broker, task) = spawn_durable(limits, &store, metrics.clone()).unwrap();
        let (attached, _inbox) = attach(&broker, "c", 2, 3600).await;
        assert!(attached.session_present, "the session was not kept");
        let topics: Vec<_> = attached.queued.iter().map(|d| d.topic.as_str()).collect();
        assert_eq!(topics, ["a/1", "a/2", "a/r"], "kept messages, in order");
        let mut queued = attached.queued.into_iter();
        queued.next().unwrap().receipt.unwrap().acknowledged();
        // The other two are lost with the connection: they go back.
        drop(queued);
        broker.disconnect("c", 2, Vec::new(), Vec::new()).await;
        let retained = broker.subscribe("c", vec![("a/r".into(), 1)]).await;
        drop(retained);
        drop(broker);
        task.await.unwrap();

        let (broker, task) = spawn_durable(limits, &store, metrics).unwrap();
        let (attached, _inbox) = attach(&broker, "c", 3, 3600).await;
        let topics: Vec<_> = attached.queued.iter().map(|d| d.topic.as_str()).collect();
        assert_eq!(
            topics,
            ["a/2", "a/r"],
            "the acknowledged one left the store"
        );
        let (_, _new_inbox) = attach(&broker, "other", 4, SESSION_ENDS).await;
        let retained = broker.subscribe("other", vec![("a/#".into(), 1)]).await;
        assert_eq!(
            retained.len(),
            1,
            "the retained message outlived two restarts"
        );
        drop(attached);
        drop(broker);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_kept_qos_2_delivery_is_stored_as_received_before_its_pubrel_may_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let limits = Limits::with_offline_queue(16);
        let (broker, task) = spawn_durable(limits, &store, Arc::default()).unwrap();
        attach(&broker, "c", 1, 3600).await;
        broker.subscribe("c", vec![("a/#".into(), 2)]).await;
        broker.disconnect("c", 1, Vec::new(), Vec::new()).await;
        let mut kept = delivery("a/1", false);
        kept.qos = 2;
        broker.publish(vec![kept]).await;
        let (attached, _inbox) = attach(&broker, "c", 2, 3600).await;
        let receipt = attached.queued[0].receipt.clone().unwrap();
        let stored = receipt
            .released(7)
            .expect("a kept delivery says when it is stored");
        stored.await.unwrap();

        // What a restart right now would find, read while the first broker
        // still runs: the PUBREL to send again, not the message.
        let (again, task_again) = spawn_durable(limits, &store, Arc::default()).unwrap();
        let (after, _inbox) = attach(&again, "c", 1, 3600).await;
        let released: Vec<u16> = after.released.iter().map(|(pkid, _)| *pkid).collect();
        assert_eq!(released, [7]);
        assert!(after.queued.is_empty(), "the message would go again");
        drop((again, after, broker, attached, receipt));
        task_again.await.unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_clean_start_or_an_expired_session_leaves_nothing_to_resume() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let limits = Limits::with_offline_queue(16);
        let (broker, task) = spawn_durable(limits, &store, Arc::default()).unwrap();
        for (id, expiry) in [("clean", 3600), ("brief", 1)] {
            attach(&broker, id, 1, expiry).await;
            broker.subscribe(id, vec![("a/#".into(), 1)]).await;
            broker.disconnect(id, 1, Vec::new(), Vec::new()).await;
        }
        broker.publish(vec![delivery("a/1", false)]).await;
        // A clean start throws the kept session away.
        let (outbox, _inbox) = outbox(16);
        let attached = broker
            .connect("clean", 2, SESSION_ENDS, false, outbox)
            .await
            .unwrap();
        assert!(!attached.session_present && attached.queued.is_empty());
        drop(broker);
        task.await.unwrap();

        let (broker, task) = spawn_durable(limits, &store, Arc::default()).unwrap();
        let (attached, _inbox) = attach(&broker, "clean", 3, 3600).await;
        assert!(
            !attached.session_present,
            "a clean start's session came back"
        );
        let mut broker_state = Broker {
            interest: Arc::default(),
            clients: HashMap::new(),
            index: index::Index::default(),
            retained: HashMap::new(),
            retained_bytes: 0,
            limits,
            metrics: Arc::default(),
            journal: None,
            requeue: mpsc::unbounded_channel().0,
            next_seq: 1,
        };
        let brief = Client {
            conn_id: 0,
            session_from: 0,
            expiry_secs: 1,
            connected_ms: 0,
            away_since_ms: Some(1_000),
            outbox: None,
            subscriptions: BTreeMap::new(),
            kept: None,
        };
        assert!(!brief.expired(1_999) && brief.expired(2_000));
        broker_state.clients.insert("brief".into(), Box::new(brief));
        broker_state.expire(2_000);
        assert!(
            broker_state.clients.is_empty(),
            "the expired session stayed"
        );
        drop(broker);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn retained_messages_past_their_limit_are_delivered_but_not_kept() {
        let limits = Limits {
            offline_queue: 4,
            retained_messages: 2,
            retained_bytes: 1 << 20,
        };
        let (broker, task) = start(limits, None, Arc::default());
        broker
            .publish(vec![
                delivery("r/1", true),
                delivery("r/2", true),
                delivery("r/3", true),
                delivery("r/1", true),
            ])
            .await;
        let (_, mut inbox) = attach(&broker, "c", 1, SESSION_ENDS).await;
        let retained = broker.subscribe("c", vec![("r/#".into(), 1)]).await;
        let mut topics: Vec<_> = retained.iter().map(|d| d.topic.clone()).collect();
        topics.sort();
        assert_eq!(
            topics,
            ["r/1", "r/2"],
            "a replaced topic fits; a third does not"
        );
        broker.publish(vec![delivery("r/4", true)]).await;
        assert_eq!(
            inbox.recv().await.unwrap().topic,
            "r/4",
            "delivered all the same"
        );
        drop(broker);
        task.await.unwrap();
    }
}
