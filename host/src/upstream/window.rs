//! The send window: which stored messages are in flight upstream, which
//! are done, and what may leave the store.
//!
//! A pure state machine, no I/O: a [`Window`] is a contiguous range of one
//! lane's keys ([`crate::store::lane`]); each lane has two, its backlog
//! (stored before the connection) and its live messages (since), the
//! backlog empty without a live share; [`Windows`] holds them all, sharing
//! the forwarder's limit on messages and bytes in flight, and keeping a
//! share of it from the backlog. Acknowledgements may come in any order; a
//! lane's messages leave the store only as the contiguous prefix that is
//! done and durable. What to send next and when is the forwarder's
//! concern.

use std::collections::VecDeque;

use crate::store::lane::{self, LANES};

/// Free window slots worth a store read.
const REFILL_CHUNK: usize = 4;
/// Acknowledged messages removed from the store in one batch.
const REMOVE_CHUNK: u64 = 256;
/// Most bytes of stored messages in flight (read, handed to the link, not
/// yet acknowledged), whatever `max_inflight` allows: a window of large
/// messages must not take the gateway's memory.
const MAX_INFLIGHT_BYTES: u64 = 16 << 20;

/// One stored message in the send window.
struct Slot {
    size: u64,
    /// Acknowledged upstream, or expired and never sent.
    done: bool,
}

/// Slots an empty window keeps allocated.
const KEEP_SLOTS: usize = 1024;

/// The messages of one lane between the store's head and the next one to
/// read: sent and awaiting acknowledgement, or done and awaiting removal
/// from the store.
pub(super) struct Window {
    /// Store key of `slots[0]`.
    base: u64,
    /// Next store key to read.
    pub(super) next: u64,
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

    /// Appends the message stored under `key`, sent or (expired) not.
    pub(super) fn push(&mut self, key: u64, size: u64, sent: bool) {
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
        // A drained window gives back what a full one took (32768 slots
        // of a far cloud's window are half a MiB per lane).
        if self.slots.is_empty() && self.slots.capacity() > KEEP_SLOTS {
            self.slots.shrink_to(KEEP_SLOTS);
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

/// Which part of a lane a message is in: stored before the connection
/// (the backlog) or since (live).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    Backlog,
    Live,
}

/// One lane's windows: its backlog `[head, split)`, sent in order, and its
/// live messages from `split` on. Without a live share `split` is the
/// head, so the live window is the whole lane.
struct Lane {
    backlog: Window,
    split: u64,
    live: Window,
}

impl Lane {
    fn new(head: u64, split: u64) -> Self {
        let split = split.max(head);
        Self {
            backlog: Window::new(head),
            split,
            live: Window::new(split),
        }
    }

    fn part(&self, key: u64) -> &Window {
        if key < self.split {
            &self.backlog
        } else {
            &self.live
        }
    }

    fn part_mut(&mut self, key: u64) -> &mut Window {
        if key < self.split {
            &mut self.backlog
        } else {
            &mut self.live
        }
    }

    /// Whether the backlog is sent, acknowledged and popped: the live
    /// window's done prefix may then leave the store.
    fn backlog_done(&self) -> bool {
        self.backlog.base >= self.split
    }
}

/// The lanes' windows, sharing one limit on messages and bytes in flight,
/// and keeping a share of it for live messages while a backlog remains.
/// Which lane and part is read first is the forwarder's choice; this keeps
/// the count.
pub(super) struct Windows {
    lanes: [Lane; LANES],
    /// Percent of the limit the backlog may not take.
    live_share: u8,
}

impl Windows {
    /// Windows starting at each lane's head. With a `live_share` (percent),
    /// what is stored below `tails` is each lane's backlog.
    pub(super) fn new(heads: [u64; LANES], tails: [u64; LANES], live_share: u8) -> Self {
        let split = |lane: usize| match live_share {
            0 => heads[lane],
            _ => tails[lane],
        };
        Self {
            lanes: std::array::from_fn(|l| Lane::new(heads[l], split(l))),
            live_share: live_share.min(MAX_LIVE_SHARE),
        }
    }

    /// One part of a lane, to read into.
    pub(super) fn part(&mut self, lane: usize, part: Part) -> &mut Window {
        let lane = &mut self.lanes[lane];
        match part {
            Part::Backlog => &mut lane.backlog,
            Part::Live => &mut lane.live,
        }
    }

    /// The first key past `lane`'s backlog.
    pub(super) fn split(&self, lane: usize) -> u64 {
        self.lanes[lane].split
    }

    fn windows(&self) -> impl Iterator<Item = &Window> {
        self.lanes.iter().flat_map(|l| [&l.backlog, &l.live])
    }

    /// Slots in every lane: sent, or done and not yet popped.
    pub(super) fn len(&self) -> usize {
        self.windows().map(|w| w.slots.len()).sum()
    }

    fn inflight_bytes(&self) -> u64 {
        self.windows().map(|w| w.inflight_bytes).sum()
    }

    /// How many more messages may be sent from `part`: what `limit` leaves
    /// free (none once [`MAX_INFLIGHT_BYTES`] are in flight), and for the
    /// backlog, also what its part of `limit` leaves (all of it without a
    /// live share).
    pub(super) fn room(&self, limit: usize, part: Part) -> usize {
        if self.inflight_bytes() >= MAX_INFLIGHT_BYTES {
            return 0;
        }
        let free = limit.saturating_sub(self.len());
        match part {
            Part::Live => free,
            Part::Backlog => {
                let share = (limit * usize::from(100 - self.live_share) / 100).max(1);
                let backlog: usize = self.lanes.iter().map(|l| l.backlog.slots.len()).sum();
                free.min(share.saturating_sub(backlog))
            }
        }
    }

    /// Nothing sent is waiting for its acknowledgement.
    pub(super) fn idle(&self) -> bool {
        self.inflight_bytes() == 0
    }

    pub(super) fn has_room(&self, limit: usize, part: Part) -> bool {
        self.room(limit, part) > 0
    }

    /// Whether enough of the windows is free to be worth a read. Pops the
    /// done prefixes below `durable` first, so room freed by the last acks
    /// counts.
    pub(super) fn should_refill(&mut self, limit: usize, durable: &[u64; LANES]) -> bool {
        self.pop_done(durable);
        let len = self.len();
        let free = limit.saturating_sub(len);
        self.has_room(limit, Part::Live) && (len == 0 || free >= REFILL_CHUNK.min(limit))
    }

    pub(super) fn pop_done(&mut self, durable: &[u64; LANES]) {
        for (lane, &durable) in self.lanes.iter_mut().zip(durable) {
            lane.backlog.pop_done(durable.min(lane.split));
            lane.live.pop_done(durable);
        }
    }

    /// Marks `key` acknowledged; false when it is not in flight.
    pub(super) fn ack(&mut self, key: u64) -> bool {
        self.lanes[lane::lane_of(key)].part_mut(key).ack(key)
    }

    pub(super) fn is_in_flight(&self, key: u64) -> bool {
        self.lanes[lane::lane_of(key)].part(key).is_in_flight(key)
    }

    pub(super) fn forget(&mut self, key: u64) {
        self.lanes[lane::lane_of(key)].part_mut(key).forget(key)
    }

    /// Whether `key` is the first unacknowledged message of its lane.
    pub(super) fn is_first_in_line(&self, key: u64) -> bool {
        let lane = &self.lanes[lane::lane_of(key)];
        lane.backlog.lowest_unacked().or(lane.live.lowest_unacked()) == Some(key)
    }

    /// The first message sent and not yet acknowledged: the lowest of the
    /// first lane with one (lanes are sent in order).
    pub(super) fn first_unacked(&self) -> Option<u64> {
        self.windows().find_map(Window::lowest_unacked)
    }

    /// Each lane's popped prefix to remove from the store now, as
    /// `(end, bytes)` ([`Window::take_removable`]): the backlog's, and the
    /// live window's once the backlog is done (a lane is removed as a
    /// prefix only).
    pub(super) fn take_removable(&mut self, all: bool) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.lanes.iter_mut().flat_map(move |lane| {
            let backlog = lane.backlog.take_removable(all);
            let live = if lane.backlog_done() {
                lane.live.take_removable(all)
            } else {
                None
            };
            backlog.into_iter().chain(live)
        })
    }
}

/// The most of the window a live share may keep from the backlog, percent
/// (the configuration refuses more).
const MAX_LIVE_SHARE: u8 = 90;

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
        let mut w = windows();
        for k in 1..=256 {
            w.part(0, Part::Live).push(k, 1, true);
        }
        assert!(
            !w.should_refill(256 + REFILL_CHUNK - 1, &DURABLE),
            "fewer free slots than a chunk are not worth a read"
        );
        for k in 1..=256 {
            w.ack(k);
        }
        assert!(w.should_refill(256 + REFILL_CHUNK - 1, &DURABLE));
        assert!(w.part(0, Part::Live).slots.is_empty());
        assert_eq!(w.part(0, Part::Live).next, 257);
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
        let mut w = windows();
        let big = MAX_INFLIGHT_BYTES / 4;
        for k in 1..=4 {
            assert!(w.has_room(1000, Part::Live));
            w.part(0, Part::Live).push(k, big, true);
        }
        assert!(
            !w.has_room(1000, Part::Live),
            "16 MiB in flight in 4 messages"
        );
        assert!(!w.should_refill(1000, &DURABLE));
        w.ack(2);
        assert!(
            w.has_room(1000, Part::Live),
            "an acknowledgement frees its bytes"
        );
        w.part(0, Part::Live).push(5, 10, false);
        w.forget(3);
        assert_eq!(
            w.inflight_bytes(),
            2 * big,
            "expired and forgotten ones are not in flight"
        );
    }

    /// Every lane durable to its end.
    const DURABLE: [u64; LANES] = [u64::MAX; LANES];

    fn windows() -> Windows {
        let starts = std::array::from_fn(|l| lane::start(l) + 1);
        Windows::new(starts, starts, 0)
    }

    #[test]
    fn the_lanes_share_one_limit_and_each_releases_its_own_prefix() {
        let mut w = windows();
        let (a, b) = (lane::start(0) + 1, lane::start(5) + 1);
        for i in 0..3 {
            w.part(5, Part::Live).push(b + i, 10, true);
        }
        w.part(0, Part::Live).push(a, 10, true);
        assert!(!w.has_room(4, Part::Live), "four in flight over two lanes");
        assert_eq!(w.first_unacked(), Some(a), "lane 0 goes first");
        assert!(w.ack(b) && w.ack(b + 1) && !w.ack(b + 1));
        assert!(w.is_first_in_line(b + 2) && !w.is_first_in_line(b + 1));
        assert!(
            w.should_refill(2 + REFILL_CHUNK, &DURABLE),
            "two acknowledged slots freed"
        );
        let removable: Vec<_> = w.take_removable(true).collect();
        assert_eq!(removable, vec![(b + 2, 20)], "lane 5's done prefix only");
        w.forget(a);
        assert_eq!(w.first_unacked(), Some(b + 2));
    }

    #[test]
    fn with_a_live_share_the_backlog_keeps_out_of_its_part_of_the_window() {
        let (head, tail) = (lane::start(0) + 1, lane::start(0) + 101);
        let mut heads = [0; LANES];
        let mut tails = [0; LANES];
        (heads[0], tails[0]) = (head, tail);
        let mut w = Windows::new(heads, tails, 25);
        assert_eq!(w.split(0), tail, "what was stored before the connection");
        for k in head..head + 6 {
            assert!(w.has_room(8, Part::Backlog));
            w.part(0, Part::Backlog).push(k, 10, true);
        }
        assert!(
            !w.has_room(8, Part::Backlog),
            "6 of 8 is the backlog's 75 %"
        );
        assert!(
            w.has_room(8, Part::Live),
            "the rest is kept for live messages"
        );
        w.part(0, Part::Live).push(tail, 10, true);
        w.part(0, Part::Live).push(tail + 1, 10, true);
        assert!(!w.has_room(8, Part::Live));
        assert!(w.is_first_in_line(head) && !w.is_first_in_line(tail));
        assert_eq!(w.first_unacked(), Some(head));

        // Live messages acknowledged first wait for the backlog to go.
        assert!(w.ack(tail) && w.ack(tail + 1));
        w.pop_done(&DURABLE);
        assert_eq!(
            w.take_removable(true).count(),
            0,
            "the backlog is still ahead"
        );
        for k in head..head + 6 {
            assert!(w.ack(k));
        }
        w.pop_done(&DURABLE);
        assert_eq!(
            w.take_removable(true).collect::<Vec<_>>(),
            vec![(head + 6, 60)]
        );
        // The rest of the backlog is read, sent and acknowledged.
        for k in head + 6..tail {
            w.part(0, Part::Backlog).push(k, 10, true);
            w.ack(k);
        }
        w.pop_done(&DURABLE);
        assert_eq!(
            w.take_removable(true).collect::<Vec<_>>(),
            vec![(tail, 940), (tail + 2, 20)],
            "the backlog's prefix, then the live one behind it"
        );
    }

    #[test]
    fn without_a_live_share_the_whole_lane_is_one_window() {
        let starts: [u64; LANES] = std::array::from_fn(|l| lane::start(l) + 1);
        let tails = starts.map(|s| s + 100);
        let w = Windows::new(starts, tails, 0);
        assert_eq!(w.split(0), starts[0], "no backlog part");
    }

    #[test]
    fn an_acknowledged_message_is_not_removed_before_it_is_durable() {
        let mut w = windows();
        let b = lane::start(5) + 1;
        w.part(5, Part::Live).push(b, 10, true);
        w.ack(b);
        let mut durable = DURABLE;
        durable[5] = b;
        w.pop_done(&durable);
        assert_eq!(w.take_removable(true).count(), 0);
        w.pop_done(&DURABLE);
        assert_eq!(
            w.take_removable(true).collect::<Vec<_>>(),
            vec![(b + 1, 10)]
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
}
