//! Sends the stored queue upstream, lane by lane in priority order and in
//! store order within a lane, at least once.
//!
//! Owns the send windows ([`super::window`]) and the refusal count that
//! decides when a message the upstream will not take is moved to the
//! dead-letter area. It fills the window from the first lane (priority 0)
//! that has messages to send, then the next, keeps at most as many QoS 1
//! publishes unacknowledged over all lanes as the upstream acknowledges in
//! a quarter of a keepalive, within `max_inflight` ([`super::ack_rate`]; through
//! the link, which owns the connection and its packet ids), and removes messages from a
//! lane only through the contiguous prefix that is acknowledged (or
//! expired). After any disconnect it starts again from each lane's lowest
//! unacknowledged key, so a lost connection can cause duplicates but never
//! a gap or a reordering of first deliveries within a lane. While no upstream is
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::mqttbytes::QoS;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ack_rate::AckRate;
use super::link::{LinkActor, LinkEvent, LinkHandle};
use super::pace::Pace;
use super::sleep_until;
use super::state::{Content, Outgoing};
use super::window::{Part, Windows};
use super::wire::{Limits, Wire};
use crate::metrics::Metrics;
use crate::store::lane::{lane_of, LANES};
use crate::store::record::RecordRef;
use crate::store::{LiveFeed, Store, StoreError};

/// How often expired messages are swept while offline, and the store's
/// disk given back ([`Store::give_back`]).
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Most stored messages read at once.
const READ_CHUNK: usize = 256;

pub struct Forwarder {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub link: LinkHandle,
    pub events: mpsc::UnboundedReceiver<LinkEvent>,
    pub max_inflight: usize,
    /// The upstream keepalive: the window is what the upstream acknowledges
    /// in half of it.
    pub keep_alive: Duration,
    /// The hub's default time to live in ms (the hub twin may change it live).
    pub ttl_ms: Arc<AtomicU64>,
    /// Refusals in a row after which a message is dead-lettered.
    pub refusals_before_dead_letter: u32,
    /// Bytes of stored messages sent a second at most (0: no cap).
    pub max_bytes_per_sec: u64,
    /// Percent of the window kept for messages stored since the connection
    /// while those stored before it drain (0: none, one order per lane).
    pub live_share: u8,
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

    /// The lane of the message being tried alone: nothing else is sent.
    fn suspect_lane(&self) -> Option<usize> {
        self.suspect.map(|(key, _)| lane_of(key))
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

/// What becomes of a message read to be sent: a message the upstream
/// cannot take costs none of the pace.
enum Fate {
    Expired,
    /// Larger than the upstream takes: dead-lettered once first in line.
    TooLarge(String),
    Send,
}

/// The connection the forwarder is sending on.
struct Online {
    generation: u64,
    windows: Windows,
    /// Refused keys to send again (once durable, read from the store).
    resend: BTreeSet<u64>,
    /// Refused keys to dead-letter once they are first in line, with why.
    condemned: BTreeMap<u64, String>,
    /// No sending until then (the upstream is over its quota, or the pace
    /// of `upstream.max_bytes_per_sec` is reached).
    paused_until: Option<Instant>,
    /// What the upstream's CONNACK asked for.
    limits: Limits,
    /// The window the upstream's acknowledgements allow.
    acks: AckRate,
}

impl Online {
    fn new(generation: u64, windows: Windows, limits: Limits, acks: AckRate) -> Self {
        Self {
            generation,
            windows,
            resend: BTreeSet::new(),
            condemned: BTreeMap::new(),
            paused_until: None,
            limits,
            acks,
        }
    }

    /// How many messages may be in flight: what the upstream acknowledges
    /// in a quarter of a keepalive within the configured window, the upstream's
    /// Receive Maximum, one while a suspect is being tried.
    fn limit(&self, max_inflight: usize, refusals: &Refusals) -> usize {
        refusals
            .window(max_inflight)
            .min(self.acks.window())
            .min(self.limits.receive_max.map_or(usize::MAX, usize::from))
    }

    /// What becomes of a message read to be sent.
    fn fate(&self, r: &RecordRef<'_>, now_ms: u64, default_ttl_ms: u64) -> Fate {
        if r.expired(now_ms, default_ttl_ms) {
            return Fate::Expired;
        }
        match self.too_large(r.topic, r.payload) {
            Some(why) => Fate::TooLarge(why),
            None => Fate::Send,
        }
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
                let lanes = refusals.suspect_lane();
                if let Err(e) = self.fill(on, &mut live, &mut pace, limit, lanes).await {
                    tracing::error!(error = %e, "reading the queue failed");
                }
                // A message found too large on the way may be first in line.
                self.bury(on).await;
                self.remove(&mut on.windows, false);
            }
            let room = online.as_ref().is_some_and(|on| {
                on.windows
                    .has_room(on.limit(self.max_inflight, &refusals), Part::Live)
            });
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = self.events.recv() => match event {
                    None => break,
                    Some(LinkEvent::Connected { generation, limits, .. }) => {
                        tracing::info!(queued = self.store.depth(), "forwarding the queue upstream");
                        let windows = Windows::new(self.store.heads(), self.store.tails(), self.live_share);
                        let acks = AckRate::new(self.max_inflight, self.keep_alive);
                        self.metrics.upstream_window(acks.window());
                        online = Some(Online::new(generation, windows, limits, acks));
                        live.want(true);
                    }
                    Some(LinkEvent::Acked(keys)) => {
                        if let Some(on) = &mut online {
                            let mut n = 0;
                            for key in keys {
                                if on.windows.ack(key) {
                                    refusals.acked(key);
                                    n += 1;
                                }
                            }
                            self.metrics.forwarded(n);
                            if let Some(w) = on.acks.acked(n as usize, on.windows.idle(), Instant::now()) {
                                self.metrics.upstream_window(w);
                            }
                        }
                    }
                    Some(LinkEvent::Refused { tag, reason }) => {
                        if let Some(on) = &mut online {
                            if on.windows.is_in_flight(tag) {
                                self.refused(on, &mut refusals, tag, reason);
                            }
                        }
                    }
                    Some(LinkEvent::Disconnected { generation, by_upstream, .. }) => {
                        if let Some(mut on) = online.take_if(|on| on.generation == generation) {
                            live.want(false);
                            let suspect = on.windows.first_unacked();
                            // What was acknowledged (and is durable) leaves
                            // the store even though the link failed, so a
                            // reconnect resends only what was not.
                            on.windows.pop_done(&self.store.tails());
                            self.remove(&mut on.windows, true);
                            // Only the upstream's own closing counts against
                            // the message first in line: not the hub leaving
                            // over the broker's bad bytes or a fail-back.
                            let lost = by_upstream.then(|| refusals.connection_lost(suspect)).flatten();
                            if let Some((key, strikes)) = lost {
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
            on.windows.pop_done(&self.store.tails());
            self.remove(&mut on.windows, true);
        }
    }

    /// Fills the window and hands the PUBLISHes to the link, lane by lane
    /// (`only` the suspect's lane while one is tried alone, its backlog
    /// first): within a lane, its live messages first, then its backlog
    /// (the same with no live share: one window from the head); within a
    /// part, the next key from the live feed when it has it (caught up: no
    /// disk on the way), else from the store, in chunks (a range read has a
    /// fixed cost, so it waits until `REFILL_CHUNK` slots are free or the
    /// window is empty).
    async fn fill(
        &self,
        on: &mut Online,
        live: &mut LiveFeed,
        pace: &mut Pace,
        limit: usize,
        only: Option<usize>,
    ) -> Result<(), StoreError> {
        if on.paused_until.is_some() {
            return Ok(());
        }
        let mut batch = Vec::new();
        let durable = self.store.tails();
        while let Some(key) = on
            .resend
            .first()
            .copied()
            .filter(|k| *k < durable[lane_of(*k)])
        {
            on.resend.pop_first();
            if let Some(stored) = self.store.read_from(key, 1)?.pop().filter(|s| s.key == key) {
                batch.push(outgoing(key, Content::Stored(stored)));
            }
        }
        if on.windows.should_refill(limit, &durable) {
            let lanes = only.map_or(0..LANES, |l| l..l + 1);
            let parts = match only {
                Some(_) => [Part::Backlog, Part::Live],
                None => [Part::Live, Part::Backlog],
            };
            'lanes: for lane in lanes {
                for part in parts {
                    if !self.fill_part(on, (lane, part), live, pace, limit, &mut batch)? {
                        break 'lanes;
                    }
                }
            }
        }
        if !batch.is_empty() {
            on.acks.sent(Instant::now());
            self.link.publish(on.generation, batch).await;
        }
        Ok(())
    }

    /// Fills the window from one part of a lane into `batch`; false when
    /// sending must stop (the pace is reached).
    fn fill_part(
        &self,
        on: &mut Online,
        (lane, part): (usize, Part),
        live: &mut LiveFeed,
        pace: &mut Pace,
        limit: usize,
        batch: &mut Vec<Outgoing>,
    ) -> Result<bool, StoreError> {
        let now = crate::clock::now_ms();
        let default_ttl = self.ttl_ms.load(Ordering::Relaxed);
        let clock = Instant::now();
        let split = on.windows.split(lane);
        loop {
            let room = on.windows.room(limit, part);
            if room == 0 {
                break;
            }
            let next = on.windows.part(lane, part).next;
            let taken = match part {
                Part::Live => live.take(next),
                Part::Backlog => None,
            };
            if let Some((records, i)) = taken {
                let size = records[i].encoded_len() as u64;
                let fate = on.fate(&records[i].as_view(), now, default_ttl);
                let content = || Content::Live(records.clone(), i);
                if !self.admit(
                    on,
                    (lane, part, next, size),
                    fate,
                    (pace, clock),
                    batch,
                    content,
                ) {
                    return Ok(false);
                }
                continue;
            }
            let end = match part {
                Part::Live => self.store.tail(lane),
                Part::Backlog => split,
            };
            if next >= end {
                break;
            }
            let mut read = self.store.read_from(next, room.min(READ_CHUNK))?;
            read.retain(|s| s.key < end);
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
                        on.windows.part(lane, part).push(key, size, false);
                    }
                    Ok(r) => {
                        let fate = on.fate(&r, now, default_ttl);
                        let content = move || Content::Stored(stored);
                        // Not admitted: read again from here once the pace allows.
                        if !self.admit(
                            on,
                            (lane, part, key, size),
                            fate,
                            (pace, clock),
                            batch,
                            content,
                        ) {
                            return Ok(false);
                        }
                    }
                }
            }
        }
        Ok(true)
    }

    /// Takes the message `(lane, part, key, size)` into the window by its
    /// `fate`: into `batch` to send (if the pace allows: false when it does
    /// not, and nothing is taken), condemned (in flight until it is
    /// dead-lettered from the head), or expired (done, never sent).
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &self,
        on: &mut Online,
        (lane, part, key, size): (usize, Part, u64, u64),
        fate: Fate,
        (pace, clock): (&mut Pace, Instant),
        batch: &mut Vec<Outgoing>,
        content: impl FnOnce() -> Content,
    ) -> bool {
        if let Fate::Send = fate {
            if let Err(at) = pace.take(size, clock) {
                on.paused_until = Some(at);
                return false;
            }
        }
        on.windows
            .part(lane, part)
            .push(key, size, !matches!(fate, Fate::Expired));
        match fate {
            Fate::Expired => self.metrics.expired(1),
            Fate::TooLarge(why) => {
                on.condemned.insert(key, why);
            }
            Fate::Send => batch.push(outgoing(key, content())),
        }
        true
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

    /// Dead-letters the refused messages that are now first in their
    /// lane: the dead-letter area takes a message from the head of a lane
    /// only, so everything before it is removed first.
    async fn bury(&self, on: &mut Online) {
        let first_in_line = |on: &Online| {
            on.condemned
                .keys()
                .copied()
                .find(|&key| on.windows.is_first_in_line(key))
        };
        while let Some(key) = first_in_line(on) {
            let lane = lane_of(key);
            on.windows.pop_done(&self.store.tails());
            self.remove(&mut on.windows, true);
            if self.store.head(lane) != key || key >= self.store.tail(lane) {
                // It, or what is before it, is not durable yet (a message
                // sent from the live feed can be refused, or found too
                // large, before its write is done): the next tail change
                // comes back here. Moving it now would find nothing to move.
                return;
            }
            let reason = on.condemned.remove(&key).expect("condemned");
            self.dead_letter(key, &reason).await;
            on.windows.forget(key);
        }
    }

    /// Removes from the store what the windows have done with.
    fn remove(&self, windows: &mut Windows, all: bool) {
        for (end, bytes) in windows.take_removable(all) {
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

/// Removes the expired prefix of every lane; returns how many expired.
fn sweep_expired(store: &Store, default_ttl: u64) -> Result<u64, StoreError> {
    let mut total = 0;
    for lane in 0..LANES {
        total += sweep_lane(store, lane, default_ttl)?;
    }
    Ok(total)
}

fn sweep_lane(store: &Store, lane: usize, default_ttl: u64) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let head = store.head(lane);
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
    fn the_upstreams_receive_maximum_caps_the_window_and_its_packet_size_condemns() {
        let refusals = Refusals::new(3);
        // A link whose upstream acknowledged its first window at once, in
        // the first period.
        let mut acks = AckRate::new(1000, Duration::from_secs(60));
        let t = Instant::now();
        acks.sent(t);
        acks.acked(64, false, t + Duration::from_millis(250));
        let mut on = Online::new(
            1,
            Windows::new([1; LANES], [1; LANES], 0),
            Limits::default(),
            acks,
        );
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

    /// The forwarder, the link and a real store, with an in-memory broker
    /// that drops the connection whenever it reads a publish on `poison`.
    #[tokio::test]
    async fn a_message_the_upstream_keeps_refusing_is_dead_lettered_and_the_rest_arrive_in_order() {
        use rumqttc::mqttbytes::v4;

        let mut rig = Rig::new(0);
        let topics: Vec<String> = (0..40)
            .map(|i| {
                if i == 17 {
                    "poison".to_string()
                } else {
                    format!("t/{i}")
                }
            })
            .collect();
        let records = topics.iter().map(|t| record(t, 0)).collect();
        rig.appender.append(records).await.unwrap();

        // The broker: acknowledges everything but `poison`, on which it
        // drops the connection (as a broker does with a packet it refuses).
        let mut first_copies: Vec<String> = Vec::new();
        let mut drops = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while first_copies.len() < topics.len() - 1 {
            let (_, mut peer) = tokio::time::timeout_at(deadline, rig.conns.recv())
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
        let dead = rig.store.dead_letters(10).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].topic, "poison");
        assert!(
            dead[0].reason.starts_with("upstream_refused"),
            "{}",
            dead[0].reason
        );
        rig.stop().await;
    }

    #[tokio::test]
    async fn after_an_outage_every_priority_0_message_goes_before_the_priority_5_ones_stored_earlier(
    ) {
        use rumqttc::mqttbytes::v4;

        let mut rig = Rig::new(0);
        let low: Vec<String> = (0..30).map(|i| format!("low/{i}")).collect();
        let high: Vec<String> = (0..30).map(|i| format!("high/{i}")).collect();
        for (topics, priority) in [(&low, 5), (&high, 0)] {
            for t in topics {
                rig.appender
                    .append(vec![record(t, priority)])
                    .await
                    .unwrap();
            }
        }

        let (_, mut peer) = rig.conns.recv().await.unwrap();
        peer.accept().await;
        let mut arrived = Vec::new();
        while arrived.len() < 60 {
            let p = next_publish(&mut peer).await;
            arrived.push(p.topic.clone());
            peer.write(v4::Packet::PubAck(v4::PubAck::new(p.pkid)))
                .await;
        }
        let expected: Vec<String> = high.iter().chain(&low).cloned().collect();
        assert_eq!(arrived, expected, "priority 0 first, each lane in order");
        until("both lanes are removed", || rig.store.depth() == 0).await;
        rig.stop().await;
    }

    #[tokio::test]
    async fn with_a_live_share_a_message_stored_after_the_connection_overtakes_the_backlog() {
        use rumqttc::mqttbytes::v4;

        // Window 8, half of it kept for live messages.
        let mut rig = Rig::new(50);
        let backlog: Vec<String> = (0..40).map(|i| format!("backlog/{i}")).collect();
        let records = backlog.iter().map(|t| record(t, 0)).collect();
        rig.appender.append(records).await.unwrap();

        let (_, mut peer) = rig.conns.recv().await.unwrap();
        peer.accept().await;
        let mut unacked = Vec::new();
        for want in &backlog[..4] {
            let p = next_publish(&mut peer).await;
            assert_eq!(&p.topic, want, "the backlog takes its half, in order");
            unacked.push(p.pkid);
        }
        until("the forwarder follows the live feed", || {
            rig.store.live_wanted()
        })
        .await;
        rig.appender
            .append(vec![record("live/0", 0)])
            .await
            .unwrap();
        let p = next_publish(&mut peer).await;
        assert_eq!(p.topic, "live/0", "sent while 36 of the backlog wait");
        unacked.push(p.pkid);

        let mut rest = Vec::new();
        while rest.len() < 36 {
            for pkid in unacked.drain(..) {
                peer.write(v4::Packet::PubAck(v4::PubAck::new(pkid))).await;
            }
            let p = next_publish(&mut peer).await;
            rest.push(p.topic.clone());
            unacked.push(p.pkid);
        }
        for pkid in unacked.drain(..) {
            peer.write(v4::Packet::PubAck(v4::PubAck::new(pkid))).await;
        }
        assert_eq!(rest, backlog[4..], "the rest of the backlog, in order");
        until(
            "everything is removed, the live message after the backlog",
            || rig.store.depth() == 0,
        )
        .await;
        rig.stop().await;
    }

    /// A store and its writer, with the forwarder and the link on it.
    struct Rig {
        _dir: tempfile::TempDir,
        store: Store,
        appender: crate::store::Appender,
        writer: std::thread::JoinHandle<()>,
        conns: Connections,
        shutdown: CancellationToken,
        tasks: [tokio::task::JoinHandle<()>; 2],
    }

    impl Rig {
        /// With a forwarder of window 8 and `live_share` percent.
        fn new(live_share: u8) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let (appender, writer) = crate::store::writer::spawn(store.clone(), u64::MAX, 64);
            let (conns, shutdown, fwd, link) = start(&store, live_share);
            Self {
                _dir: dir,
                store,
                appender,
                writer,
                conns,
                shutdown,
                tasks: [fwd, link],
            }
        }

        async fn stop(self) {
            self.shutdown.cancel();
            for task in self.tasks {
                task.await.unwrap();
            }
            drop(self.appender);
            self.writer.join().unwrap();
        }
    }

    fn record(topic: &str, priority: u8) -> crate::store::Record {
        crate::store::Record {
            enqueued_ms: crate::clock::now_ms(),
            topic: topic.to_string(),
            payload: bytes::Bytes::from_static(b"x"),
            ttl_secs: None,
            priority,
        }
    }

    /// The next PUBLISH the forwarder sends (bounded wait).
    async fn next_publish(
        peer: &mut super::super::link::fake::Peer,
    ) -> rumqttc::mqttbytes::v4::Publish {
        use rumqttc::mqttbytes::v4;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), peer.read()).await {
                Ok(Some(v4::Packet::Publish(p))) => return p,
                Ok(Some(_)) => continue,
                other => panic!("no publish: {other:?}"),
            }
        }
    }

    type Connections =
        tokio::sync::mpsc::UnboundedReceiver<(String, super::super::link::fake::Peer)>;

    /// The forwarder (window 8, 3 refusals, `live_share` percent) and the
    /// link on `store`, to an in-memory broker whose connections the test
    /// plays.
    fn start(
        store: &Store,
        live_share: u8,
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
            keep_alive: Duration::from_secs(60),
            ttl_ms: Arc::new(AtomicU64::new(u64::MAX)),
            refusals_before_dead_letter: 3,
            max_bytes_per_sec: 0,
            live_share,
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
        use crate::store::writer;
        use rumqttc::mqttbytes::v4;

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // The writer does not run yet: nothing appended becomes durable.
        let (appender, writer) = writer::channel(store.clone(), u64::MAX);
        let (mut conns, shutdown, fwd, link_task) = start(&store, 0);
        let (_, mut peer) = conns.recv().await.unwrap();
        peer.accept().await;
        until("the forwarder follows the live feed", || {
            store.live_wanted()
        })
        .await;

        let durable = appender
            .append_later(vec![record("t/live", 0)])
            .await
            .unwrap();
        let publish = next_publish(&mut peer).await;
        assert_eq!(publish.topic, "t/live");
        assert_eq!(store.tail(0), 1, "sent while not yet durable");
        peer.write(v4::Packet::PubAck(v4::PubAck::new(publish.pkid)))
            .await;

        let writer = writer.spawn(64);
        durable.await.unwrap().unwrap();
        assert_eq!(store.tail(0), 2);
        until("the acknowledged message is removed once durable", || {
            store.head(0) == 2
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
