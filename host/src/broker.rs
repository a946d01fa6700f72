//! Local publish/subscribe between downstream clients: a destination of
//! routed messages, beside the store.
//!
//! Owns subscriptions, retained messages and the state of persistent
//! sessions (in memory), as one actor fed by a bounded channel; sessions hold
//! a [`BrokerHandle`]. Delivery to a session is a `try_send` into its bounded
//! outbox: a subscriber that does not keep up loses messages (counted as
//! dropped) rather than stalling everyone. It deals in [`Delivery`] (topic,
//! payload, QoS, flags), not in MQTT packets: writing them to a connection
//! (packet ids, acknowledgements) is the session's business, deciding what
//! is bound upstream the router's. `$iothub/...` is never shared: a publish
//! there is not delivered, and the hub's answers to one client go through
//! [`BrokerHandle::send_to`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::iothub;
use crate::metrics::{DropReason, Metrics};
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
}

impl Receipt {
    pub fn new(tell: impl Fn(bool) + Send + Sync + 'static) -> Self {
        Receipt(Arc::new(ReceiptInner {
            acknowledged: std::sync::atomic::AtomicBool::new(false),
            tell: Box::new(tell),
        }))
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
}

enum Command {
    Connect {
        client_id: String,
        conn_id: u64,
        persistent: bool,
        resume: bool,
        outbox: mpsc::Sender<Delivery>,
        kick: CancellationToken,
        reply: oneshot::Sender<Attached>,
    },
    Disconnect {
        client_id: String,
        conn_id: u64,
        unacked: Vec<Delivery>,
    },
    Subscribe {
        client_id: String,
        filters: Vec<(String, u8)>,
        reply: oneshot::Sender<Vec<Delivery>>,
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
    /// Attaches a session; an older connection with the same client id is kicked.
    pub async fn connect(
        &self,
        client_id: &str,
        conn_id: u64,
        persistent: bool,
        resume: bool,
        outbox: mpsc::Sender<Delivery>,
        kick: CancellationToken,
    ) -> Option<Attached> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Connect {
            client_id: client_id.to_string(),
            conn_id,
            persistent,
            resume,
            outbox,
            kick,
            reply,
        };
        self.tx.send(cmd).await.ok()?;
        rx.await.ok()
    }

    pub async fn disconnect(&self, client_id: &str, conn_id: u64, unacked: Vec<Delivery>) {
        let cmd = Command::Disconnect {
            client_id: client_id.to_string(),
            conn_id,
            unacked,
        };
        let _ = self.tx.send(cmd).await;
    }

    /// Adds subscriptions and returns the retained messages they match.
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
        rx.await.unwrap_or_default()
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
}

struct Client {
    conn_id: u64,
    persistent: bool,
    outbox: Option<mpsc::Sender<Delivery>>,
    kick: Option<CancellationToken>,
    subscriptions: HashMap<String, u8>,
    offline: VecDeque<Delivery>,
}

struct Broker {
    interest: Arc<Interest>,
    clients: HashMap<String, Client>,
    retained: HashMap<String, Delivery>,
    offline_cap: usize,
    metrics: Arc<Metrics>,
}

/// Starts the broker actor; it ends when every handle is dropped.
pub fn spawn(
    offline_cap: usize,
    metrics: Arc<Metrics>,
) -> (BrokerHandle, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel(4096);
    let interest = Arc::new(Interest::default());
    let mut broker = Broker {
        interest: interest.clone(),
        clients: HashMap::new(),
        retained: HashMap::new(),
        offline_cap,
        metrics,
    };
    let join = tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            let changes = !matches!(cmd, Command::Publish(_) | Command::SendTo { .. });
            let subscribing = matches!(cmd, Command::Subscribe { .. });
            broker.handle(cmd);
            if changes {
                let held = broker.clients.values().map(|c| c.subscriptions.len()).sum();
                broker.interest.held.store(held, Ordering::Release);
            }
            if subscribing {
                broker.interest.pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    });
    (BrokerHandle { tx, interest }, join)
}

impl Broker {
    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Connect {
                client_id,
                conn_id,
                persistent,
                resume,
                outbox,
                kick,
                reply,
            } => {
                let previous = self.clients.remove(&client_id);
                if let Some(old) = previous.as_ref().and_then(|c| c.kick.as_ref()) {
                    old.cancel();
                }
                let (session_present, subscriptions, offline) = match previous {
                    Some(old) if resume && old.persistent => (true, old.subscriptions, old.offline),
                    _ => (false, HashMap::new(), VecDeque::new()),
                };
                self.clients.insert(
                    client_id,
                    Client {
                        conn_id,
                        persistent,
                        outbox: Some(outbox),
                        kick: Some(kick),
                        subscriptions,
                        offline: VecDeque::new(),
                    },
                );
                let _ = reply.send(Attached {
                    session_present,
                    queued: offline.into(),
                });
            }
            Command::Disconnect {
                client_id,
                conn_id,
                unacked,
            } => {
                let Some(client) = self.clients.get_mut(&client_id) else {
                    return;
                };
                if client.conn_id != conn_id {
                    return; // already taken over by a newer connection
                }
                if client.persistent {
                    client.outbox = None;
                    client.kick = None;
                    for p in unacked.into_iter().rev().filter(|p| p.receipt.is_none()) {
                        client.offline.push_front(Delivery { dup: true, ..p });
                    }
                } else {
                    self.clients.remove(&client_id);
                }
            }
            Command::Subscribe {
                client_id,
                filters,
                reply,
            } => {
                let mut retained = Vec::new();
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
                        client.subscriptions.insert(filter, qos);
                    }
                }
                let _ = reply.send(retained);
            }
            Command::Unsubscribe { client_id, filters } => {
                if let Some(client) = self.clients.get_mut(&client_id) {
                    for f in filters {
                        client.subscriptions.remove(&f);
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
            Command::SendTo {
                client_id,
                delivery,
                reply,
            } => {
                let (metrics, cap) = (&self.metrics, self.offline_cap);
                let taken = match self.clients.get_mut(&client_id) {
                    Some(client) => client.deliver(delivery, cap, metrics),
                    None => false,
                };
                let _ = reply.send(taken);
            }
        }
    }

    fn publish(&mut self, msg: Delivery) {
        if msg.retain {
            if msg.payload.is_empty() {
                self.retained.remove(&msg.topic);
            } else {
                self.retained.insert(msg.topic.clone(), msg.clone());
            }
        }
        for client in self.clients.values_mut() {
            let _ = client.deliver(msg.clone(), self.offline_cap, &self.metrics);
        }
    }
}

impl Client {
    /// Hands `msg` to this client at the QoS its best matching
    /// subscription grants; nothing when none matches. Returns whether the
    /// connected client took it.
    fn deliver(&mut self, msg: Delivery, offline_cap: usize, metrics: &Metrics) -> bool {
        let granted = self
            .subscriptions
            .iter()
            .filter(|(f, _)| topic::matches(f, &msg.topic))
            .map(|(_, q)| *q)
            .max();
        let Some(granted) = granted else {
            return false;
        };
        let out = Delivery {
            qos: msg.qos.min(granted),
            retain: false,
            dup: false,
            ..msg
        };
        let Some(outbox) = &self.outbox else {
            // Disconnected: a persistent session keeps QoS 1 messages
            // (not those with a receipt: their owner delivers them again).
            if out.qos > 0 && out.receipt.is_none() {
                if self.offline.len() >= offline_cap {
                    self.offline.pop_front();
                    metrics.messages_dropped(DropReason::OfflineQueueFull, 1);
                }
                self.offline.push_back(out);
            }
            return false;
        };
        if outbox.try_send(out).is_err() {
            metrics.messages_dropped(DropReason::SlowSubscriber, 1);
            return false;
        }
        true
    }
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
        let (outbox, mut inbox) = mpsc::channel(16);
        broker
            .connect("c", 1, false, false, outbox, CancellationToken::new())
            .await
            .unwrap();
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
        broker.disconnect("c", 1, Vec::new()).await;
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
            let (outbox, inbox) = mpsc::channel(16);
            broker
                .connect(
                    c,
                    conn as u64,
                    false,
                    false,
                    outbox,
                    CancellationToken::new(),
                )
                .await
                .unwrap();
            broker
                .subscribe(c, vec![("$iothub/twin/res/#".into(), 1)])
                .await;
            inboxes.push(inbox);
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
        let a: Vec<_> = std::iter::from_fn(|| inboxes[0].try_recv().ok()).collect();
        let b: Vec<_> = std::iter::from_fn(|| inboxes[1].try_recv().ok()).collect();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].topic, "$iothub/twin/res/200/?$rid=2");
        assert!(
            b.is_empty(),
            "b got {b:?}: not its answer, nor one it subscribed to"
        );
    }
}
