//! The hub's two clocks.
//!
//! - [`now_ms`], the hub clock, for everything measured against a stored
//!   time: message ages and TTLs, session and queue expiry, back-offs. It is
//!   the wall clock read once when the hub starts, then advanced by the
//!   monotonic clock, and never earlier than the latest hub time the store
//!   has recorded ([`not_before`]). So a wall clock that jumps while the hub
//!   runs (NTP arriving on a board that booted without a real-time clock
//!   in 1970, an operator setting the date) changes no age and expires
//!   nothing; and a restart on a clock that went back does not make stored
//!   messages younger than they are, nor new ones older after the clock
//!   comes right.
//! - [`wall_ms`], the wall clock as it is now, for what must agree with the
//!   outside world: SAS tokens minted for the cloud and checked from devices,
//!   the time plugins see, names of folders for people.
//!
//! Owns the reading of time; not what is measured with it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::Instant;

/// The hub clock of this process, started at first use.
static HUB: LazyLock<Clock> = LazyLock::new(Clock::start);

/// Milliseconds since the Unix epoch on the hub clock.
pub fn now_ms() -> u64 {
    HUB.now_ms()
}

/// Milliseconds since the Unix epoch on the wall clock, now.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The hub clock will not read earlier than `floor_ms` plus the time since
/// it started (a start on a wall clock behind what the store recorded).
pub fn not_before(floor_ms: u64) {
    if let Some(behind_ms) = HUB.not_before(floor_ms) {
        tracing::warn!(
            behind_secs = behind_ms / 1000,
            "the wall clock is behind the latest time the store recorded; ages and TTLs are measured from the store's time"
        );
    }
}

struct Clock {
    /// The wall clock when the monotonic clock read `at`.
    wall: u64,
    at: Instant,
    /// The latest hub time the store recorded before this start.
    floor: AtomicU64,
}

impl Clock {
    fn start() -> Self {
        Self {
            wall: wall_ms(),
            at: Instant::now(),
            floor: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        let base = self.wall.max(self.floor.load(Ordering::Acquire));
        base + self.at.elapsed().as_millis() as u64
    }

    /// Raises the floor; how far the start's wall clock was behind it, if
    /// this raised it above the wall clock.
    fn not_before(&self, floor_ms: u64) -> Option<u64> {
        let before = self.floor.fetch_max(floor_ms, Ordering::AcqRel);
        (floor_ms > self.wall && floor_ms > before).then(|| floor_ms - self.wall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_clock_moves_forward_and_never_before_a_floor_it_was_given() {
        let clock = Clock::start();
        let a = clock.now_ms();
        assert!(clock.now_ms() >= a);
        assert!(a.abs_diff(wall_ms()) < 60_000);
        let ahead = wall_ms() + 3_600_000;
        assert!(clock
            .not_before(ahead)
            .is_some_and(|behind| behind >= 3_599_000));
        assert!(clock.now_ms() >= ahead);
        // A lower floor changes nothing.
        assert_eq!(clock.not_before(1), None);
        assert!(clock.now_ms() >= ahead);
    }
}
