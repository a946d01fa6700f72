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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::mqttbytes::{v4, QoS};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::connection::{Connection, Login, UpstreamError};
use crate::config::UpstreamAddr;
use crate::metrics::Metrics;
use crate::store::{self, Store};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// How often expired messages are swept while offline.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub struct Forwarder {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub addresses: Vec<UpstreamAddr>,
    pub login: Login,
    pub max_inflight: usize,
    pub ttl_ms: u64,
    pub max_backoff: Duration,
}

/// One stored message in the send window.
struct Slot {
    size: u64,
    /// Acknowledged upstream, or expired and never sent.
    done: bool,
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
        let mut window: VecDeque<Slot> = VecDeque::new();
        let mut base = self.store.head();
        let mut next = base;
        let mut by_pkid: HashMap<u16, u64> = HashMap::new();
        let mut next_pkid: u16 = 1;
        let mut tail = self.store.watch_tail();
        let keep_alive = Duration::from_secs(self.login.keep_alive.max(1) as u64);
        let mut ping_due = Instant::now() + keep_alive;
        let mut ping_outstanding = false;
        loop {
            tail.borrow_and_update();
            // Fill the window from the store.
            while window.len() < self.max_inflight && next < self.store.tail() {
                let batch = self
                    .store
                    .read_from(next, self.max_inflight - window.len())?;
                if batch.is_empty() {
                    break;
                }
                let now = store::now_ms();
                for stored in batch {
                    while next < stored.key {
                        window.push_back(Slot {
                            size: 0,
                            done: true,
                        }); // a hole: nothing to send
                        next += 1;
                    }
                    if now.saturating_sub(stored.record.enqueued_ms) > self.ttl_ms {
                        self.metrics.expired(1);
                        window.push_back(Slot {
                            size: stored.size,
                            done: true,
                        });
                    } else {
                        let pkid = loop {
                            let id = next_pkid;
                            next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                            if !by_pkid.contains_key(&id) {
                                break id;
                            }
                        };
                        by_pkid.insert(pkid, stored.key);
                        let mut publish =
                            v4::Publish::new(stored.record.topic, QoS::AtLeastOnce, Vec::new());
                        publish.payload = stored.record.payload;
                        publish.pkid = pkid;
                        conn.send(v4::Packet::Publish(publish));
                        window.push_back(Slot {
                            size: stored.size,
                            done: false,
                        });
                    }
                    next = stored.key + 1;
                }
            }
            conn.flush().await?;

            // Drop the acknowledged prefix from the store.
            let mut removed = 0u64;
            let mut bytes = 0u64;
            while window.front().is_some_and(|s| s.done) {
                bytes += window.pop_front().expect("front").size;
                removed += 1;
            }
            if removed > 0 {
                base += removed;
                self.store.remove_before(base, bytes)?;
            }

            let room = window.len() < self.max_inflight;
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
                                if let Some(key) = by_pkid.remove(&ack.pkid) {
                                    if let Some(slot) = window.get_mut((key - base) as usize) {
                                        slot.done = true;
                                        self.metrics.forwarded(1);
                                    }
                                }
                            }
                            v4::Packet::PingResp => ping_outstanding = false,
                            v4::Packet::Publish(p) if p.qos == QoS::AtLeastOnce => {
                                conn.send(v4::Packet::PubAck(v4::PubAck::new(p.pkid)));
                            }
                            other => tracing::debug!(packet = ?other, "ignored upstream packet"),
                        }
                        packet = conn.try_next()?;
                    }
                }
                _ = tail.changed(), if room => {}
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

    /// Removes the expired prefix of the queue; returns how many expired.
    fn sweep(&self) -> Result<u64, store::StoreError> {
        let mut total = 0;
        loop {
            let head = self.store.head();
            let batch = self.store.read_from(head, 1024)?;
            let now = store::now_ms();
            let mut end = head;
            let mut bytes = 0;
            for s in &batch {
                if now.saturating_sub(s.record.enqueued_ms) <= self.ttl_ms {
                    break;
                }
                end = s.key + 1;
                bytes += s.size;
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
