//! Lanes: the queue's delivery priorities, one FIFO each, in one keyspace.
//!
//! A route's `priority` (0 first ... 9 last) is the lane its upstream
//! copies are queued in. A queue key carries its lane in its top byte and
//! its place within the lane below it, so every lane is a contiguous key
//! range with its own head and tail, and lane 0's keys are the keys of a
//! store written before there were lanes. This module owns only that
//! arithmetic and the names of a lane's meta keys; what is sent first is
//! the forwarder's choice.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lanes, one per route priority.
pub const LANES: usize = 10;

const SHIFT: u32 = 56;

/// The lane a key belongs to (a key that cannot be one of ours maps to the
/// last lane, where it matches no head).
pub fn lane_of(key: u64) -> usize {
    ((key >> SHIFT) as usize).min(LANES - 1)
}

/// The lowest key of `lane`.
pub fn start(lane: usize) -> u64 {
    (lane as u64) << SHIFT
}

/// The first key above `lane`.
pub fn end(lane: usize) -> u64 {
    start(lane + 1)
}

/// The lane a record of this priority is queued in.
pub fn of_priority(priority: u8) -> usize {
    usize::from(priority).min(LANES - 1)
}

/// The meta key that keeps `name` (`head`, `tail`) of `lane`: lane 0 keeps
/// the names it had before there were lanes.
pub fn meta_key(name: &str, lane: usize) -> Vec<u8> {
    match lane {
        0 => name.as_bytes().to_vec(),
        n => format!("{name}.{n}").into_bytes(),
    }
}

/// A position per lane, shared between threads.
pub struct PerLane([AtomicU64; LANES]);

impl PerLane {
    pub fn new(values: [u64; LANES]) -> Self {
        Self(values.map(AtomicU64::new))
    }

    pub fn get(&self, lane: usize) -> u64 {
        self.0[lane].load(Ordering::Acquire)
    }

    pub fn set(&self, lane: usize, value: u64) {
        self.0[lane].store(value, Ordering::Release);
    }

    pub fn all(&self) -> [u64; LANES] {
        std::array::from_fn(|lane| self.get(lane))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lanes_keys_lie_between_its_start_and_the_next_lanes() {
        for lane in 0..LANES {
            assert_eq!(lane_of(start(lane)), lane);
            assert_eq!(lane_of(end(lane) - 1), lane);
            assert!(start(lane).to_be_bytes() < end(lane).to_be_bytes());
        }
        assert_eq!(
            start(0),
            0,
            "lane 0 is the key space of a store without lanes"
        );
        assert_eq!(lane_of(u64::MAX), LANES - 1);
        assert_eq!(of_priority(200), LANES - 1);
        assert_eq!(meta_key("head", 0), b"head");
        assert_eq!(meta_key("head", 7), b"head.7");
    }
}
