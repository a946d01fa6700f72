//! Sends the stored queue upstream, in store order, at least once.
//!
//! Owns the send window (which stored keys are in flight, which are done)
//! and the refusal count that decides when a message the upstream will not
//! take is moved to the dead-letter area. It reads the queue from its head,
//! keeps at most `max_inflight` QoS 1 publishes unacknowledged (through the
//! link, which owns the connection and its packet ids), and removes
//! messages from the store only through the contiguous prefix that is
//! acknowledged (or expired). After any disconnect it starts again from the
//! lowest unacknowledged key, so a lost connection can cause duplicates but
//! never a gap or a reordering of first deliveries. While no upstream is
//! reachable it sweeps expired messages off the head of the queue; every
//! second it has the store give back the disk removed messages took.
//!
//! While connected it follows the store's live feed: a message appended
//! while the forwarder is caught up is sent from memory at once, in parallel
//! with its fsync, and removed from the store only once it is durable.
//!
//! It runs on a thread of its own with the link's actor
//! ([`Forwarder::spawn`]), on a single-threaded runtime: its store reads,
//! removals and moves block that thread only, never the hub's async
//! runtime, and the hand-offs to the link cost no cross-thread wake-up. (Handing each of them to the
//! blocking pool instead cost about 2 us of CPU per forwarded message and
//! 13 % of the drain rate.)

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::mqttbytes::QoS;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::link::{LinkActor, LinkEvent, LinkHandle};
use super::pace::Pace;
use super::state::{Content, Outgoing};
use super::wire::{Limits, Wire};
use crate::metrics::Metrics;
use crate::store::{LiveFeed, Store, StoreError};

/// How often expired messages are swept while offline, and the store's
/// disk given back ([`Store::give_back`]).
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Free window slots worth a store read.
const REFILL_CHUNK: usize = 4;
/// Acknowledged messages removed from the store in one batch.
const REMOVE_CHUNK: u64 = 256;
/// Most stored messages read at once.
const READ_CHUNK: usize = 256;
/// Most bytes of stored messages in flight (read, handed to the link, not
/// yet acknowledged), whatever `max_inflight` allows: a window of large
/// messages must not take the gateway's memory.
const MAX_INFLIGHT_BYTES: u64 = 16 << 20;

pub struct Forwarder {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub link: LinkHandle,
    pub events: mpsc::UnboundedReceiver<LinkEvent>,
    pub max_inflight: usize,
    /// The hub's default time to live in ms (the hub twin may change it live).
    pub ttl_ms: Arc<AtomicU64>,
    /// Refusals in a row after which a message is dead-lettered.
    pub refusals_before_dead_letter: u32,
    /// Bytes of stored messages sent a second at most (0: no cap).
    pub max_bytes_per_sec: u64,
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
    /// Sizes of the slots sent and not done.
    inflight_bytes: u64,
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
            inflight_bytes: 0,
            removable: 0,
            removable_bytes: 0,
        }
    }

    /// Whether another message may be sent: fewer than `limit` in the
    /// window and fewer than [`MAX_INFLIGHT_BYTES`] in flight.
    fn has_room(&self, limit: usize) -> bool {
        self.slots.len() < limit && self.inflight_bytes < MAX_INFLIGHT_BYTES
    }

    /// Appends the message stored under `key`, sent or (expired) not.
    fn push(&mut self, key: u64, size: u64, sent: bool) {
        while self.next < key {
            // A hole in the keys: nothing stored there to send.
            self.slots.push_back(Slot {
                size: 0,
                done: true,
            });
            self.next += 1;
        }
        self.slots.push_back(Slot { size, done: !sent });
        if sent {
            self.inflight_bytes += size;
        }
        self.next = key + 1;
    }

    /// Marks the message stored under `key` as acknowledged; false when it
    /// is not in the window or already done.
    fn ack(&mut self, key: u64) -> bool {
        if key < self.base {
            return false;
        }
        match self.slots.get_mut((key - self.base) as usize) {
            Some(slot) if !slot.done => {
                slot.done = true;
                self.inflight_bytes -= slot.size;
                true
            }
            _ => false,
        }
    }

    /// Whether `key` was sent and is not acknowledged yet.
    fn is_in_flight(&self, key: u64) -> bool {
        key >= self.base
            && self
                .slots
                .get((key - self.base) as usize)
                .is_some_and(|s| !s.done)
    }

    /// Marks `key` done with nothing left to remove (it was moved out of
    /// the queue).
    fn forget(&mut self, key: u64) {
        if self.ack(key) {
            self.slots[(key - self.base) as usize].size = 0;
        }
    }

    /// The first sent message not yet acknowledged.
    fn lowest_unacked(&self) -> Option<u64> {
        self.slots
            .iter()
            .position(|s| !s.done)
            .map(|i| self.base + i as u64)
    }

    /// Whether enough of the window is free to be worth a read. Pops the
    /// done prefix below `durable` first, so room freed by the last acks
    /// counts.
    fn should_refill(&mut self, max_inflight: usize, durable: u64) -> bool {
        self.pop_done(durable);
        let free = max_inflight.saturating_sub(self.slots.len());
        self.has_room(max_inflight)
            && (self.slots.is_empty() || free >= REFILL_CHUNK.min(max_inflight))
    }

    /// Pops the done prefix of the window below `durable` (to be removed
    /// from the store). A message sent from the live feed may be
    /// acknowledged before it is durable: it stays until it is, as a
    /// removal must never come before the write it removes.
    fn pop_done(&mut self, durable: u64) {
        while self.base < durable && self.slots.front().is_some_and(|s| s.done) {
            self.removable_bytes += self.slots.pop_front().expect("front").size;
            self.removable += 1;
            self.base += 1;
        }
    }

    /// The popped prefix to remove from the store now, as `(end, bytes)`:
    /// in chunks, as removal is a batch of tombstones, or all of it when
    /// `all` or idle.
    fn take_removable(&mut self, all: bool) -> Option<(u64, u64)> {
        let idle = self.slots.is_empty();
        if self.removable >= REMOVE_CHUNK || (self.removable > 0 && (all || idle)) {
            let out = (self.base, self.removable_bytes);
            self.removable = 0;
            self.removable_bytes = 0;
            Some(out)
        } else {
            None
        }
    }
}

/// Counts how often in a row the upstream refused the same message: by
/// dropping the connection while it was the only message in flight, or by
/// answering it with an MQTT 5 error. A drop with a full window (a node
/// that died, a network that failed) says nothing about which message is to
/// blame: it only makes the first unacknowledged one a suspect, sent alone
/// (a window of one) until it is acknowledged, so that the next drop is its
/// own and counts.
struct Refusals {
    limit: u32,
    suspect: Option<(u64, u32)>,
    /// Messages answered with an error reason, by key: refusals in a row.
    answered: HashMap<u64, u32>,
}

/// What to do with a message the upstream answered with an error.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Send it again.
    Resend,
    /// The upstream is over its quota (0x97), not refusing this message:
    /// send it again after a pause, without counting it against it.
    Pause,
    /// Refused this many times in a row: dead-letter it.
    DeadLetter(u32),
}

impl Refusals {
    fn new(limit: u32) -> Self {
        Self {
            limit: limit.max(1),
            suspect: None,
            answered: HashMap::new(),
        }
    }

    /// How many messages may be in flight now.
    fn window(&self, max_inflight: usize) -> usize {
        if self.suspect.is_some() {
            1
        } else {
            max_inflight
        }
    }

    fn acked(&mut self, key: u64) {
        if self.suspect.is_some_and(|(k, _)| k == key) {
            self.suspect = None;
        }
        if !self.answered.is_empty() {
            self.answered.remove(&key);
        }
    }

    /// The upstream answered the message at `key` with `reason` (>= 0x80).
    fn answered(&mut self, key: u64, reason: u8) -> Verdict {
        if reason == QUOTA_EXCEEDED {
            return Verdict::Pause;
        }
        let strikes = self.answered.entry(key).or_insert(0);
        *strikes += 1;
        if *strikes >= self.limit {
            let n = *strikes;
            self.answered.remove(&key);
            Verdict::DeadLetter(n)
        } else {
            Verdict::Resend
        }
    }

    /// The connection dropped with `lowest_unacked` first in line: the key
    /// to dead-letter, when it has been refused `limit` times in a row. Only
    /// a drop while it was a suspect (alone in flight) counts against it.
    fn connection_lost(&mut self, lowest_unacked: Option<u64>) -> Option<(u64, u32)> {
        let key = lowest_unacked?;
        let strikes = match self.suspect {
            Some((k, n)) if k == key => n + 1,
            _ => 0,
        };
        if strikes >= self.limit {
            self.suspect = None;
            Some((key, strikes))
        } else {
            self.suspect = Some((key, strikes));
            None
        }
    }
}

/// MQTT 5 reason code: the receiver is over a quota (its, not the message's).
const QUOTA_EXCEEDED: u8 = 0x97;
/// How long sending pauses after the upstream says it is over its quota.
const QUOTA_PAUSE: Duration = Duration::from_secs(1);

/// The name of an MQTT 5 PUBACK reason code, for the dead letter's reason.
fn reason_name(code: u8) -> &'static str {
    match code {
        0x80 => "unspecified error",
        0x83 => "implementation specific error",
        0x87 => "not authorized",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x97 => "quota exceeded",
        0x99 => "payload format invalid",
        _ => "error",
    }
}

/// The connection the forwarder is sending on.
struct Online {
    generation: u64,
    window: Window,
    /// Refused keys to send again (once durable, read from the store).
    resend: BTreeSet<u64>,
    /// Refused keys to dead-letter once they are first in line, with why.
    condemned: BTreeMap<u64, String>,
    /// No sending until then (the upstream is over its quota, or the pace
    /// of `upstream.max_bytes_per_sec` is reached).
    paused_until: Option<Instant>,
    /// What the upstream's CONNACK asked for.
    limits: Limits,
}

impl Online {
    fn new(generation: u64, head: u64, limits: Limits) -> Self {
        Self {
            generation,
            window: Window::new(head),
            resend: BTreeSet::new(),
            condemned: BTreeMap::new(),
            paused_until: None,
            limits,
        }
    }

    /// How many messages may be in flight: the configured window, the
    /// upstream's Receive Maximum, one while a suspect is being tried.
    fn limit(&self, max_inflight: usize, refusals: &Refusals) -> usize {
        refusals
            .window(max_inflight)
            .min(self.limits.receive_max.map_or(usize::MAX, usize::from))
    }

    /// Why the upstream cannot take a message of this topic and payload
    /// (larger than its Maximum Packet Size), if it cannot.
    fn too_large(&self, topic: &str, payload: &[u8]) -> Option<String> {
        let max = self.limits.max_packet_size? as usize;
        // Only an MQTT 5 broker announces a Maximum Packet Size.
        let size = Wire(crate::config::MqttVersion::V5).publish_len(topic.len(), payload.len());
        (size > max).then(|| {
            format!("upstream_refused: the message is a {size}-byte packet, larger than the upstream's Maximum Packet Size of {max} bytes")
        })
    }
}

impl Forwarder {
    /// Runs the forwarder and the link's actor together on a thread of
    /// their own until `shutdown`: every hand-off between them (a batch to
    /// send, the acknowledgements back) stays on that thread, with no
    /// cross-thread wake-up per message.
    pub fn spawn(
        self,
        link: LinkActor,
        shutdown: CancellationToken,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("upstream".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(async {
                        let link = tokio::spawn(link.run(shutdown.clone()));
                        self.run(shutdown).await;
                        let _ = link.await;
                    }),
                    Err(e) => tracing::error!(error = %e, "cannot start the upstream thread"),
                }
            })
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut online: Option<Online> = None;
        let mut refusals = Refusals::new(self.refusals_before_dead_letter);
        let mut pace = Pace::new(self.max_bytes_per_sec, Instant::now());
        let mut tail = self.store.watch_tail();
        let mut live = self.store.follow_live();
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        loop {
            if let Some(on) = &mut online {
                self.bury(on).await;
                let limit = on.limit(self.max_inflight, &refusals);
                if let Err(e) = self.fill(on, &mut live, &mut pace, limit).await {
                    tracing::error!(error = %e, "reading the queue failed");
                }
                // A message found too large on the way may be first in line.
                self.bury(on).await;
                self.remove(&mut on.window, false).await;
            }
            let room = online
                .as_ref()
                .is_some_and(|on| on.window.has_room(on.limit(self.max_inflight, &refusals)));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = self.events.recv() => match event {
                    None => break,
                    Some(LinkEvent::Connected { generation, limits, .. }) => {
                        tracing::info!(queued = self.store.tail() - self.store.head(), "forwarding the queue upstream");
                        online = Some(Online::new(generation, self.store.head(), limits));
                        live.want(true);
                    }
                    Some(LinkEvent::Acked(keys)) => {
                        if let Some(on) = &mut online {
                            let mut n = 0;
                            for key in keys {
                                if on.window.ack(key) {
                                    refusals.acked(key);
                                    n += 1;
                                }
                            }
                            self.metrics.forwarded(n);
                        }
                    }
                    Some(LinkEvent::Refused { tag, reason }) => {
                        if let Some(on) = &mut online {
                            if on.window.is_in_flight(tag) {
                                self.refused(on, &mut refusals, tag, reason);
                            }
                        }
                    }
                    Some(LinkEvent::Disconnected { generation, .. }) => {
                        if let Some(mut on) = online.take_if(|on| on.generation == generation) {
                            live.want(false);
                            let suspect = on.window.lowest_unacked();
                            // What was acknowledged (and is durable) leaves
                            // the store even though the link failed, so a
                            // reconnect resends only what was not.
                            on.window.pop_done(self.store.tail());
                            self.remove(&mut on.window, true).await;
                            if let Some((key, strikes)) = refusals.connection_lost(suspect) {
                                let reason = format!("upstream_refused: the upstream closed the connection after this message {strikes} times in a row");
                                self.dead_letter(key, &reason).await;
                            }
                        }
                    }
                },
                // Durable messages to read, or acknowledged ones now durable
                // enough to remove.
                _ = tail.changed(), if online.is_some() => { tail.borrow_and_update(); }
                _ = live.recv(), if room => {}
                _ = sleep_until(online.as_ref().and_then(|on| on.paused_until)), if online.as_ref().is_some_and(|on| on.paused_until.is_some()) => {
                    if let Some(on) = &mut online {
                        on.paused_until = None;
                    }
                }
                _ = sweep.tick() => {
                    if online.is_none() {
                        let ttl = self.ttl_ms.load(Ordering::Relaxed);
                        match sweep_expired(&self.store, ttl) {
                            Ok(n) => self.metrics.expired(n),
                            Err(e) => tracing::error!(error = %e, "expiry sweep failed"),
                        }
                    }
                    if let Err(e) = self.store.give_back() {
                        tracing::warn!(error = %e, "giving the disk back failed; trying again in a second");
                    }
                }
            }
        }
        if let Some(mut on) = online {
            on.window.pop_done(self.store.tail());
            self.remove(&mut on.window, true).await;
        }
    }

    /// Fills the window and hands the PUBLISHes to the link: the next key
    /// from the live feed when it has it (caught up: no disk on the way),
    /// else from the store, in chunks (a range read has a fixed cost, so it
    /// waits until `REFILL_CHUNK` slots are free or the window is empty).
    async fn fill(
        &self,
        on: &mut Online,
        live: &mut LiveFeed,
        pace: &mut Pace,
        limit: usize,
    ) -> Result<(), StoreError> {
        if on.paused_until.is_some() {
            return Ok(());
        }
        let mut batch = Vec::new();
        let durable = self.store.tail();
        while let Some(key) = on.resend.first().copied().filter(|k| *k < durable) {
            on.resend.pop_first();
            if let Some(stored) = self.store.read_from(key, 1)?.pop().filter(|s| s.key == key) {
                batch.push(outgoing(key, Content::Stored(stored)));
            }
        }
        if !on.window.should_refill(limit, durable) {
            if !batch.is_empty() {
                self.link.publish(on.generation, batch).await;
            }
            return Ok(());
        }
        let now = crate::clock::now_ms();
        let default_ttl = self.ttl_ms.load(Ordering::Relaxed);
        let clock = Instant::now();
        'fill: while on.window.has_room(limit) {
            if let Some((records, i)) = live.take(on.window.next) {
                let record = &records[i];
                let key = on.window.next;
                let fresh = !record.as_view().expired(now, default_ttl);
                let size = record.encoded_len() as u64;
                if fresh {
                    if let Err(at) = pace.take(size, clock) {
                        on.paused_until = Some(at);
                        break 'fill;
                    }
                }
                on.window.push(key, size, fresh);
                if !fresh {
                    self.metrics.expired(1);
                } else if let Some(why) = on.too_large(&record.topic, &record.payload) {
                    on.condemned.insert(key, why);
                } else {
                    batch.push(outgoing(key, Content::Live(records, i)));
                }
                continue;
            }
            if on.window.next >= self.store.tail() {
                break;
            }
            let want = (limit - on.window.slots.len()).min(READ_CHUNK);
            let read = self.store.read_from(on.window.next, want)?;
            if read.is_empty() {
                break;
            }
            for stored in read {
                let (key, size) = (stored.key, stored.size());
                match stored.record() {
                    Err(e) => {
                        // Not sendable; skipping it keeps the rest flowing.
                        tracing::error!(key, error = %e, "dropping a corrupt queued message");
                        self.metrics
                            .messages_dropped(crate::metrics::DropReason::CorruptRecord, 1);
                        on.window.push(key, size, false);
                    }
                    Ok(r) if r.expired(now, default_ttl) => {
                        self.metrics.expired(1);
                        on.window.push(key, size, false);
                    }
                    Ok(r) => {
                        if let Err(at) = pace.take(size, clock) {
                            // Read again from here once the pace allows.
                            on.paused_until = Some(at);
                            break 'fill;
                        }
                        // In flight until it is dead-lettered from the head.
                        on.window.push(key, size, true);
                        match on.too_large(r.topic, r.payload) {
                            Some(why) => {
                                on.condemned.insert(key, why);
                            }
                            None => batch.push(outgoing(key, Content::Stored(stored))),
                        }
                    }
                }
            }
        }
        if !batch.is_empty() {
            self.link.publish(on.generation, batch).await;
        }
        Ok(())
    }

    /// The upstream answered the message at `key` with an error.
    fn refused(&self, on: &mut Online, refusals: &mut Refusals, key: u64, reason: u8) {
        let name = reason_name(reason);
        match refusals.answered(key, reason) {
            Verdict::Resend => {
                tracing::warn!(
                    key,
                    reason = format!("0x{reason:02x} {name}"),
                    "the upstream refused a message; sending it again"
                );
                on.resend.insert(key);
            }
            Verdict::Pause => {
                tracing::warn!(
                    key,
                    pause_ms = QUOTA_PAUSE.as_millis() as u64,
                    "the upstream is over its quota; pausing"
                );
                on.resend.insert(key);
                on.paused_until = Some(Instant::now() + QUOTA_PAUSE);
            }
            Verdict::DeadLetter(strikes) => {
                on.condemned.insert(key, format!(
                    "upstream_refused: the upstream answered this message 0x{reason:02x} ({name}) {strikes} times in a row"
                ));
            }
        }
    }

    /// Dead-letters the refused messages that are now first in line: the
    /// dead-letter area takes a message from the head of the queue only,
    /// so everything before it is removed first.
    async fn bury(&self, on: &mut Online) {
        while let Some((&key, _)) = on.condemned.first_key_value() {
            if on.window.lowest_unacked() != Some(key) {
                return;
            }
            on.window.pop_done(self.store.tail());
            self.remove(&mut on.window, true).await;
            if self.store.head() != key || key >= self.store.tail() {
                // It, or what is before it, is not durable yet (a message
                // sent from the live feed can be refused, or found too
                // large, before its write is done): the next tail change
                // comes back here. Moving it now would find nothing to move.
                return;
            }
            let (_, reason) = on.condemned.pop_first().expect("first");
            self.dead_letter(key, &reason).await;
            on.window.forget(key);
        }
    }

    /// Removes what the window has done with from the store.
    async fn remove(&self, window: &mut Window, all: bool) {
        if let Some((end, bytes)) = window.take_removable(all) {
            if let Err(e) = self.store.remove_before(end, bytes) {
                tracing::error!(error = %e, "removing forwarded messages failed; they will be sent again");
            }
        }
    }

    /// Moves the message at `key` (the head) to the dead-letter area.
    async fn dead_letter(&self, key: u64, reason: &str) {
        match self.store.move_head_to_dead_letters(key, reason) {
            Ok(true) => {
                self.metrics.dead_letter("upstream_refused", 1);
                tracing::error!(key, %reason, "message moved to the dead-letter area; the queue flows on (see `edgehub queue dead-letters`)");
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(key, error = %e, "cannot move a refused message to the dead-letter area")
            }
        }
    }
}

fn outgoing(key: u64, content: Content) -> Outgoing {
    Outgoing {
        tag: key,
        content,
        qos: QoS::AtLeastOnce,
        retain: false,
    }
}

/// Sleeps until `at`; forever when there is no `at`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Removes the expired prefix of the queue; returns how many expired.
fn sweep_expired(store: &Store, default_ttl: u64) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let head = store.head();
        let batch = store.read_from(head, 1024)?;
        let now = crate::clock::now_ms();
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
        store.remove_before(end, bytes)?;
        total += n;
        if (n as usize) < batch.len() {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_out_of_order_release_only_the_contiguous_prefix() {
        let mut w = Window::new(10);
        for key in 10..15 {
            w.push(key, 100, true);
        }
        assert!(w.ack(11) && w.ack(12));
        w.pop_done(u64::MAX);
        assert_eq!(
            (w.base, w.slots.len()),
            (10, 5),
            "key 10 is still unacknowledged"
        );
        assert!(w.ack(10));
        w.pop_done(u64::MAX);
        assert_eq!(
            (w.base, w.slots.len(), w.removable, w.removable_bytes),
            (13, 2, 3, 300)
        );
        assert!(!w.ack(10), "a repeated ack is ignored");
        assert!(!w.ack(99), "an ack for a key never sent is ignored");
    }

    #[test]
    fn a_window_whose_every_message_is_acknowledged_asks_for_more() {
        // Regression: room freed by the last acknowledgements must count,
        // or the forwarder waits for acks that will never come.
        let mut w = Window::new(1);
        for k in 1..=256 {
            w.push(k, 1, true);
        }
        assert!(
            !w.should_refill(256 + REFILL_CHUNK - 1, u64::MAX),
            "fewer free slots than a chunk are not worth a read"
        );
        for k in 1..=256 {
            w.ack(k);
        }
        assert!(w.should_refill(256 + REFILL_CHUNK - 1, u64::MAX));
        assert!(w.slots.is_empty());
        assert_eq!(w.next, 257);
    }

    #[test]
    fn a_reconnect_resends_from_the_lowest_unacknowledged_key() {
        let mut w = Window::new(5);
        for k in 5..10 {
            w.push(k, 1, true);
        }
        w.ack(5);
        w.ack(7);
        assert_eq!(w.lowest_unacked(), Some(6));
        w.pop_done(u64::MAX);
        assert_eq!(w.take_removable(true), Some((6, 1)));
        // The store's head is now 6: a new window starts there, so 6..10
        // are sent again (7 twice: at least once, never a gap).
    }

    #[test]
    fn expired_messages_are_done_without_being_sent() {
        let mut w = Window::new(1);
        w.push(1, 10, false);
        w.push(3, 10, true);
        assert_eq!(w.lowest_unacked(), Some(3), "1 expired, 2 is a hole");
        w.pop_done(u64::MAX);
        assert_eq!(w.base, 3);
    }

    #[test]
    fn the_window_holds_no_more_than_its_bytes_in_flight_whatever_the_count() {
        let mut w = Window::new(1);
        let big = MAX_INFLIGHT_BYTES / 4;
        for k in 1..=4 {
            assert!(w.has_room(1000));
            w.push(k, big, true);
        }
        assert!(!w.has_room(1000), "16 MiB in flight in 4 messages");
        assert!(!w.should_refill(1000, u64::MAX));
        w.ack(2);
        assert!(w.has_room(1000), "an acknowledgement frees its bytes");
        w.push(5, 10, false);
        w.forget(3);
        assert_eq!(
            w.inflight_bytes,
            2 * big,
            "expired and forgotten ones are not in flight"
        );
    }

    #[test]
    fn the_upstreams_receive_maximum_caps_the_window_and_its_packet_size_condemns() {
        let refusals = Refusals::new(3);
        let mut on = Online::new(1, 1, Limits::default());
        assert_eq!(on.limit(1000, &refusals), 1000);
        assert_eq!(
            on.too_large("t", &[0; 100_000]),
            None,
            "3.1.1: no size announced"
        );
        on.limits = Limits {
            receive_max: Some(10),
            max_packet_size: Some(2000),
        };
        assert_eq!(on.limit(1000, &refusals), 10);
        assert_eq!(on.limit(4, &refusals), 4, "the smaller of the two");
        // 1 + 2 (length) + 2 + 1 (topic) + 2 (id) + 1 (properties) = 9 bytes
        // besides the payload.
        assert_eq!(on.too_large("t", &[0; 1991]), None);
        let why = on.too_large("t", &[0; 1992]).expect("one byte over");
        assert!(why.contains("2001-byte") && why.contains("2000"), "{why}");
    }

    #[test]
    fn a_message_refused_three_times_in_a_row_is_dead_lettered() {
        let mut r = Refusals::new(3);
        assert_eq!(r.window(256), 256);
        // A drop with a full window only makes the first in line a suspect.
        assert_eq!(r.connection_lost(Some(40)), None);
        assert_eq!(r.window(256), 1, "a suspect is sent alone");
        assert_eq!(r.connection_lost(Some(40)), None);
        assert_eq!(r.connection_lost(Some(40)), None);
        assert_eq!(r.connection_lost(Some(40)), Some((40, 3)));
        assert_eq!(r.window(256), 256, "the queue behind flows on");
    }

    #[test]
    fn an_acknowledged_suspect_is_cleared_and_other_drops_start_a_new_count() {
        let mut r = Refusals::new(3);
        r.connection_lost(Some(40));
        r.acked(40);
        assert_eq!(r.window(256), 256);
        r.connection_lost(Some(41));
        r.connection_lost(Some(41));
        assert_eq!(
            r.connection_lost(Some(42)),
            None,
            "a different message first in line starts a new count"
        );
        assert_eq!(
            r.connection_lost(None),
            None,
            "nothing in flight: no strike"
        );
        assert_eq!(r.window(256), 1);
    }

    #[test]
    fn a_message_answered_with_an_error_is_resent_then_dead_lettered_and_a_quota_only_pauses() {
        let mut r = Refusals::new(3);
        assert_eq!(r.answered(7, 0x87), Verdict::Resend);
        assert_eq!(r.answered(7, 0x87), Verdict::Resend);
        assert_eq!(r.answered(8, 0x90), Verdict::Resend, "counted per message");
        assert_eq!(
            r.answered(7, QUOTA_EXCEEDED),
            Verdict::Pause,
            "not the message's fault"
        );
        assert_eq!(r.answered(7, 0x87), Verdict::DeadLetter(3));
        r.acked(8);
        assert_eq!(r.answered(8, 0x90), Verdict::Resend, "an ack ends the run");
        assert_eq!(
            r.window(256),
            256,
            "answered refusals do not shrink the window"
        );
    }

    #[test]
    fn a_forgotten_key_is_done_with_nothing_to_remove() {
        let mut w = Window::new(1);
        for k in 1..=3 {
            w.push(k, 10, true);
        }
        assert!(w.is_in_flight(2));
        w.forget(1);
        w.ack(2);
        assert!(!w.is_in_flight(2));
        w.pop_done(u64::MAX);
        assert_eq!(w.take_removable(true), Some((3, 10)), "only key 2's bytes");
    }

    /// The forwarder, the link and a real store, with an in-memory broker
    /// that drops the connection whenever it reads a publish on `poison`.
    #[tokio::test]
    async fn a_message_the_upstream_keeps_refusing_is_dead_lettered_and_the_rest_arrive_in_order() {
        use crate::store::{writer, Record};
        use rumqttc::mqttbytes::v4;

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (appender, writer) = writer::spawn(store.clone(), u64::MAX, 64);
        let topics: Vec<String> = (0..40)
            .map(|i| {
                if i == 17 {
                    "poison".to_string()
                } else {
                    format!("t/{i}")
                }
            })
            .collect();
        let records = topics
            .iter()
            .map(|t| Record {
                enqueued_ms: crate::clock::now_ms(),
                topic: t.clone(),
                payload: bytes::Bytes::from_static(b"x"),
                ttl_secs: None,
            })
            .collect();
        appender.append(records).await.unwrap();

        let (mut conns, shutdown, fwd, link_task) = start(&store);

        // The broker: acknowledges everything but `poison`, on which it
        // drops the connection (as a broker does with a packet it refuses).
        let mut first_copies: Vec<String> = Vec::new();
        let mut drops = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while first_copies.len() < topics.len() - 1 {
            let (_, mut peer) = tokio::time::timeout_at(deadline, conns.recv())
                .await
                .expect("the link reconnects")
                .unwrap();
            peer.accept().await;
            loop {
                let packet = tokio::time::timeout_at(deadline, peer.read())
                    .await
                    .expect("the queue keeps flowing");
                let Some(v4::Packet::Publish(p)) = packet else {
                    if packet.is_none() {
                        break;
                    } else {
                        continue;
                    }
                };
                if p.topic == "poison" {
                    drops += 1;
                    break;
                }
                if !first_copies.contains(&p.topic) {
                    first_copies.push(p.topic.clone());
                }
                peer.write(v4::Packet::PubAck(v4::PubAck::new(p.pkid)))
                    .await;
                if first_copies.len() == topics.len() - 1 {
                    break;
                }
            }
        }
        let expected: Vec<String> = topics.iter().filter(|t| *t != "poison").cloned().collect();
        assert_eq!(
            first_copies, expected,
            "every other message, first copies in order"
        );
        assert_eq!(
            drops, 4,
            "a suspect after the first drop, refused three times in a row alone, then set aside"
        );
        let dead = store.dead_letters(10).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].topic, "poison");
        assert!(
            dead[0].reason.starts_with("upstream_refused"),
            "{}",
            dead[0].reason
        );

        shutdown.cancel();
        fwd.await.unwrap();
        link_task.await.unwrap();
        drop(appender);
        writer.join().unwrap();
    }

    type Connections =
        tokio::sync::mpsc::UnboundedReceiver<(String, super::super::link::fake::Peer)>;

    /// The forwarder (window 8, 3 refusals) and the link on `store`, to an
    /// in-memory broker whose connections the test plays.
    fn start(
        store: &Store,
    ) -> (
        Connections,
        CancellationToken,
        tokio::task::JoinHandle<()>,
        tokio::task::JoinHandle<()>,
    ) {
        use super::super::link::fake::{config, Upstream};
        use super::super::link::Link;
        let (up, conns) = Upstream::new();
        let link = Link::new(config(&["cloud"]), Arc::new(up), Arc::default());
        let shutdown = CancellationToken::new();
        let (handle, events, link_task) = link.spawn(shutdown.clone());
        let forwarder = Forwarder {
            store: store.clone(),
            metrics: Arc::default(),
            link: handle,
            events,
            max_inflight: 8,
            ttl_ms: Arc::new(AtomicU64::new(u64::MAX)),
            refusals_before_dead_letter: 3,
            max_bytes_per_sec: 0,
        };
        let fwd = tokio::spawn(forwarder.run(shutdown.clone()));
        (conns, shutdown, fwd, link_task)
    }

    /// Waits (bounded) for a condition another task brings about.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting: {what}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn a_message_appended_while_caught_up_is_sent_before_its_fsync_and_removed_only_after() {
        use crate::store::{writer, Record};
        use rumqttc::mqttbytes::v4;

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // The writer does not run yet: nothing appended becomes durable.
        let (appender, writer) = writer::channel(store.clone(), u64::MAX);
        let (mut conns, shutdown, fwd, link_task) = start(&store);
        let (_, mut peer) = conns.recv().await.unwrap();
        peer.accept().await;
        until("the forwarder follows the live feed", || {
            store.live_wanted()
        })
        .await;

        let durable = appender
            .append_later(vec![Record {
                enqueued_ms: crate::clock::now_ms(),
                topic: "t/live".into(),
                payload: bytes::Bytes::from_static(b"x"),
                ttl_secs: None,
            }])
            .await
            .unwrap();
        let publish = loop {
            match tokio::time::timeout(Duration::from_secs(10), peer.read()).await {
                Ok(Some(v4::Packet::Publish(p))) => break p,
                Ok(Some(_)) => continue,
                other => panic!("no publish: {other:?}"),
            }
        };
        assert_eq!(publish.topic, "t/live");
        assert_eq!(store.tail(), 1, "sent while not yet durable");
        peer.write(v4::Packet::PubAck(v4::PubAck::new(publish.pkid)))
            .await;

        let writer = writer.spawn(64);
        durable.await.unwrap().unwrap();
        assert_eq!(store.tail(), 2);
        until("the acknowledged message is removed once durable", || {
            store.head() == 2
        })
        .await;
        assert!(
            store.read_from(0, 10).unwrap().is_empty(),
            "removed after its write, so it stays removed"
        );

        shutdown.cancel();
        fwd.await.unwrap();
        link_task.await.unwrap();
        drop(appender);
        writer.join().unwrap();
    }
}
