//! Sends the stored queue upstream, in store order, at least once.
//!
//! Owns the upstream session state: which stored keys are in flight under
//! which packet id, the reconnect back-off, and the TTL checks. It reads the
//! queue from its head, keeps at most `max_inflight` QoS 1 publishes
//! unacknowledged, and removes messages from the store only through the
//! contiguous prefix that is acknowledged (or expired). After any
//! disconnect it starts again from the lowest unacknowledged key, so a lost
//! connection can cause duplicates but never a gap or a reordering of first
//! deliveries. While no upstream is reachable it sweeps expired messages off
//! the head of the queue.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::mqttbytes::{v4, QoS};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::connection::{Connection, Login, UpstreamError};
use crate::config::UpstreamAddr;
use crate::metrics::Metrics;
use crate::store::{self, Store};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// How often expired messages are swept while offline.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Free window slots worth a store read.
const REFILL_CHUNK: usize = 4;
/// Acknowledged messages removed from the store in one batch.
const REMOVE_CHUNK: u64 = 256;

pub struct Forwarder {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub addresses: Vec<UpstreamAddr>,
    pub login: Login,
    pub max_inflight: usize,
    /// The hub's default time to live in ms (the hub twin may change it live).
    pub ttl_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub max_backoff: Duration,
    /// Cloud topics subscribed to on every connection (the device scope).
    pub subscriptions: Vec<String>,
    /// Where publishes from the cloud go (see `sync`).
    pub inbound: mpsc::Sender<CloudMessage>,
    /// A retained document to publish on a topic whenever it changes and
    /// after every (re)connect: the hub twin's reported properties.
    pub reported: Option<(
        String,
        tokio::sync::watch::Receiver<Option<serde_json::Value>>,
    )>,
}

/// A publish received from the upstream broker.
#[derive(Debug, Clone)]
pub struct CloudMessage {
    pub topic: String,
    pub payload: bytes::Bytes,
}

/// One stored message in the send window.
struct Slot {
    size: u64,
    /// Acknowledged upstream, or expired and never sent.
    done: bool,
}

/// The messages between the store's head and the next one to read: sent and
/// awaiting acknowledgement, or done and awaiting removal from the store.
struct Window {
    /// Store key of `slots[0]`.
    base: u64,
    /// Next store key to read.
    next: u64,
    slots: VecDeque<Slot>,
    /// Store key sent under each packet id (0: free); indexed by packet id.
    by_pkid: Vec<u64>,
    next_pkid: u16,
    /// Done slots popped from the front but not yet removed from the store.
    removable: u64,
    removable_bytes: u64,
}

impl Window {
    fn new(head: u64) -> Self {
        Self {
            base: head,
            next: head,
            slots: VecDeque::new(),
            by_pkid: vec![0; 1 << 16],
            next_pkid: 1,
            removable: 0,
            removable_bytes: 0,
        }
    }

    /// Appends the message stored under `key`; `pkid` is `None` when it
    /// is not sent (expired).
    fn push(&mut self, key: u64, size: u64, pkid: Option<u16>) {
        while self.next < key {
            // A hole in the keys: nothing stored there to send.
            self.slots.push_back(Slot {
                size: 0,
                done: true,
            });
            self.next += 1;
        }
        if let Some(pkid) = pkid {
            self.by_pkid[pkid as usize] = key;
        }
        self.slots.push_back(Slot {
            size,
            done: pkid.is_none(),
        });
        self.next = key + 1;
    }

    /// A packet id for something other than a stored message (never freed
    /// on this connection).
    fn reserve_pkid(&mut self) -> u16 {
        let id = self.alloc_pkid();
        self.by_pkid[id as usize] = u64::MAX;
        id
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if self.by_pkid[id as usize] == 0 {
                return id;
            }
        }
    }

    /// Marks the message sent under `pkid` as acknowledged.
    fn ack(&mut self, pkid: u16) -> bool {
        let key = std::mem::take(&mut self.by_pkid[pkid as usize]);
        if key == 0 {
            return false;
        }
        match self.slots.get_mut((key - self.base) as usize) {
            Some(slot) => {
                slot.done = true;
                true
            }
            None => false,
        }
    }

    /// Whether enough of the window is free to be worth a store read. Pops
    /// the done prefix first, so room freed by the last acks counts.
    fn should_refill(&mut self, max_inflight: usize) -> bool {
        self.pop_done();
        let free = max_inflight.saturating_sub(self.slots.len());
        self.slots.is_empty() || free >= REFILL_CHUNK.min(max_inflight)
    }

    /// Pops the done prefix of the window (to be removed from the store).
    fn pop_done(&mut self) {
        while self.slots.front().is_some_and(|s| s.done) {
            self.removable_bytes += self.slots.pop_front().expect("front").size;
            self.removable += 1;
            self.base += 1;
        }
    }

    /// Removes the popped prefix from the store: in chunks, as removal is a
    /// batch of tombstones, or all of it when `all` or idle.
    fn remove_popped(&mut self, store: &Store, all: bool) -> Result<(), store::StoreError> {
        let idle = self.slots.is_empty();
        if self.removable >= REMOVE_CHUNK || (self.removable > 0 && (all || idle)) {
            store.remove_before(self.base, self.removable_bytes)?;
            self.removable = 0;
            self.removable_bytes = 0;
        }
        Ok(())
    }
}

impl Forwarder {
    pub async fn run(self, shutdown: CancellationToken) {
        if self.addresses.is_empty() {
            tracing::info!(
                "no upstream configured: storing upstream-bound messages until one is set"
            );
        }
        let mut attempt = 0usize;
        let mut backoff = MIN_BACKOFF;
        loop {
            if let Err(e) = self.sweep() {
                tracing::error!(error = %e, "expiry sweep failed");
            }
            if !self.addresses.is_empty() {
                let addr = &self.addresses[attempt % self.addresses.len()];
                let opened = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = Connection::open(addr, &self.login) => r,
                };
                match opened {
                    Ok(conn) => {
                        tracing::info!(upstream = %addr, queued = self.store.tail() - self.store.head(), "upstream connected");
                        self.metrics.set_upstream_connected(true);
                        backoff = MIN_BACKOFF;
                        let result = self.pump(conn, &shutdown).await;
                        self.metrics.set_upstream_connected(false);
                        match result {
                            Ok(()) => return,
                            Err(e) => {
                                tracing::warn!(upstream = %addr, error = %e, "upstream connection lost")
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(upstream = %addr, error = %e, retry_in_ms = backoff.as_millis() as u64, "upstream unreachable");
                        attempt += 1;
                    }
                }
            }
            let wait = if self.addresses.is_empty() {
                SWEEP_EVERY
            } else {
                backoff
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(self.max_backoff.max(MIN_BACKOFF));
        }
    }

    /// Streams the queue over one connection until it fails or `shutdown`.
    async fn pump(
        &self,
        mut conn: Connection,
        shutdown: &CancellationToken,
    ) -> Result<(), UpstreamError> {
        let mut window = Window::new(self.store.head());
        let result = self.pump_window(&mut conn, &mut window, shutdown).await;
        // What was acknowledged leaves the store even when the link failed,
        // so a reconnect resends only what was not.
        window.pop_done();
        window.remove_popped(&self.store, true)?;
        result
    }

    async fn pump_window(
        &self,
        conn: &mut Connection,
        window: &mut Window,
        shutdown: &CancellationToken,
    ) -> Result<(), UpstreamError> {
        let mut tail = self.store.watch_tail();
        let keep_alive = Duration::from_secs(self.login.keep_alive.max(1) as u64);
        let mut ping_due = Instant::now() + keep_alive;
        let mut ping_outstanding = false;
        let mut reported = self.reported.clone();
        if let Some((topic, rx)) = &mut reported {
            let doc = rx.borrow_and_update().clone();
            publish_retained(conn, topic, doc);
        }
        if !self.subscriptions.is_empty() {
            let filters: Vec<v4::SubscribeFilter> = self
                .subscriptions
                .iter()
                .map(|f| v4::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce))
                .collect();
            let mut subscribe = v4::Subscribe::new_many(filters);
            subscribe.pkid = window.reserve_pkid();
            conn.send(v4::Packet::Subscribe(subscribe));
        }
        loop {
            tail.borrow_and_update();
            self.fill(conn, window)?;
            conn.flush().await?;
            window.remove_popped(&self.store, false)?;

            let room = window.slots.len() < self.max_inflight;
            tokio::select! {
                _ = shutdown.cancelled() => {
                    conn.send(v4::Packet::Disconnect);
                    let _ = conn.flush().await;
                    return Ok(());
                }
                packet = conn.next() => {
                    let mut packet = Some(packet?);
                    while let Some(p) = packet {
                        match p {
                            v4::Packet::PubAck(ack) => {
                                if window.ack(ack.pkid) {
                                    self.metrics.forwarded(1);
                                }
                            }
                            v4::Packet::PingResp => ping_outstanding = false,
                            v4::Packet::Publish(p) => {
                                if p.qos == QoS::AtLeastOnce {
                                    conn.send(v4::Packet::PubAck(v4::PubAck::new(p.pkid)));
                                }
                                let msg = CloudMessage { topic: p.topic, payload: p.payload };
                                if let Err(e) = self.inbound.try_send(msg) {
                                    tracing::warn!(topic = %e.into_inner().topic, "cloud message dropped: the sync task is behind");
                                }
                            }
                            v4::Packet::SubAck(ack) => {
                                for (filter, code) in self.subscriptions.iter().zip(&ack.return_codes) {
                                    if matches!(code, v4::SubscribeReasonCode::Failure) {
                                        tracing::error!(%filter, "upstream refused the subscription");
                                    }
                                }
                            }
                            other => tracing::debug!(packet = ?other, "ignored upstream packet"),
                        }
                        packet = conn.try_next()?;
                    }
                }
                _ = tail.changed(), if room => {}
                Ok(()) = async {
                    match &mut reported {
                        Some((_, rx)) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some((topic, rx)) = &mut reported {
                        let doc = rx.borrow_and_update().clone();
                        publish_retained(conn, topic, doc);
                    }
                }
                _ = tokio::time::sleep_until(ping_due) => {
                    if ping_outstanding {
                        return Err(UpstreamError::KeepAlive);
                    }
                    conn.send(v4::Packet::PingReq);
                    ping_outstanding = true;
                    ping_due = Instant::now() + keep_alive;
                }
            }
        }
    }

    /// Reads stored messages into the window and queues their PUBLISHes, in
    /// chunks: a range read has a fixed cost, so it waits until
    /// `REFILL_CHUNK` slots are free (or the window is empty).
    fn fill(&self, conn: &mut Connection, window: &mut Window) -> Result<(), UpstreamError> {
        if !window.should_refill(self.max_inflight) {
            return Ok(());
        }
        while window.slots.len() < self.max_inflight && window.next < self.store.tail() {
            let batch = self
                .store
                .read_from(window.next, self.max_inflight - window.slots.len())?;
            if batch.is_empty() {
                break;
            }
            let now = store::now_ms();
            for stored in batch {
                let record = match stored.record() {
                    Ok(r) => r,
                    Err(e) => {
                        // Not sendable; skipping it keeps the rest flowing.
                        tracing::error!(key = stored.key, error = %e, "dropping a corrupt queued message");
                        self.metrics.dropped(1);
                        window.push(stored.key, stored.size(), None);
                        continue;
                    }
                };
                if record.expired(now, self.ttl_ms.load(std::sync::atomic::Ordering::Relaxed)) {
                    self.metrics.expired(1);
                    window.push(stored.key, stored.size(), None);
                } else {
                    let pkid = window.alloc_pkid();
                    conn.send_publish(record.topic, record.payload, pkid);
                    window.push(stored.key, stored.size(), Some(pkid));
                }
            }
        }
        Ok(())
    }

    /// Removes the expired prefix of the queue; returns how many expired.
    fn sweep(&self) -> Result<u64, store::StoreError> {
        let mut total = 0;
        loop {
            let head = self.store.head();
            let batch = self.store.read_from(head, 1024)?;
            let now = store::now_ms();
            let default_ttl = self.ttl_ms.load(std::sync::atomic::Ordering::Relaxed);
            let mut end = head;
            let mut bytes = 0;
            for s in &batch {
                // A corrupt record stops the sweep; the forwarder reports it.
                match s.record() {
                    Ok(r) if r.expired(now, default_ttl) => {}
                    _ => break,
                }
                end = s.key + 1;
                bytes += s.size();
            }
            let n = end - head;
            if n == 0 {
                return Ok(total);
            }
            self.store.remove_before(end, bytes)?;
            self.metrics.expired(n);
            total += n;
            if (n as usize) < batch.len() {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_out_of_order_release_only_the_contiguous_prefix() {
        let mut w = Window::new(10);
        let pkids: Vec<u16> = (10..15)
            .map(|key| {
                let id = w.alloc_pkid();
                w.push(key, 100, Some(id));
                id
            })
            .collect();
        assert!(w.ack(pkids[1]) && w.ack(pkids[2]));
        w.pop_done();
        assert_eq!(
            (w.base, w.slots.len()),
            (10, 5),
            "key 10 is still unacknowledged"
        );
        assert!(w.ack(pkids[0]));
        w.pop_done();
        assert_eq!(
            (w.base, w.slots.len(), w.removable, w.removable_bytes),
            (13, 2, 3, 300)
        );
        assert!(!w.ack(pkids[0]), "a repeated ack is ignored");
    }

    #[test]
    fn a_window_whose_every_message_is_acknowledged_asks_for_more() {
        // Regression: room freed by the last acknowledgements must count,
        // or the forwarder waits for acks that will never come.
        let mut w = Window::new(1);
        let ids: Vec<u16> = (1..=256)
            .map(|k| {
                let id = w.alloc_pkid();
                w.push(k, 1, Some(id));
                id
            })
            .collect();
        assert!(
            !w.should_refill(256 + REFILL_CHUNK - 1),
            "fewer free slots than a chunk are not worth a read"
        );
        for id in ids {
            w.ack(id);
        }
        assert!(w.should_refill(256 + REFILL_CHUNK - 1));
        assert!(w.slots.is_empty());
        assert_eq!(w.next, 257);
    }

    #[test]
    fn packet_ids_in_flight_are_not_reused() {
        let mut w = Window::new(1);
        let first = w.alloc_pkid();
        w.push(1, 1, Some(first));
        for k in 2..70_000u64 {
            let id = w.alloc_pkid();
            assert_ne!(id, first);
            assert_ne!(id, 0);
            w.push(k, 1, Some(id));
            w.ack(id);
        }
    }
}

/// Queues a retained QoS 0 PUBLISH of a JSON document (sent again after
/// every reconnect, so at-most-once is enough).
fn publish_retained(conn: &mut Connection, topic: &str, doc: Option<serde_json::Value>) {
    let Some(doc) = doc else { return };
    let mut p = v4::Publish::new(topic, QoS::AtMostOnce, doc.to_string());
    p.retain = true;
    conn.send(v4::Packet::Publish(p));
}
