//! How many publishes may be unacknowledged upstream: as many as the broker
//! acknowledges in a quarter of a keepalive, measured on the link, within
//! `upstream.max_inflight`.
//!
//! A broker that reads one client's packets in order (a NATS node stores
//! each QoS 1 publish in JetStream before it reads the next packet) reads
//! the hub's PINGREQ only after every publish sent before it. With more in
//! flight than it stores in a keepalive, the ping goes unanswered, the hub
//! takes the link for dead and sends the same window again on another node,
//! whose session takeover closes the first: churn through which nothing
//! gets. Keeping the window to what the broker acknowledged in a quarter of
//! a keepalive keeps the ping answered while the broker works, even if it
//! slows to a quarter of the rate measured, and leaves a broker that stops
//! acknowledging to the keepalive to judge. (Half a keepalive was not
//! enough: a NATS node under load answers a whole read buffer's publishes
//! at once, 2 to 7 s apart, and the hub dropped a working link every three
//! keepalives.) The pipelining needs only a round trip's worth, far less.
//!
//! A new link starts with a small window ([`FIRST_WINDOW`]) and opens it
//! after its first measure: a broker that acknowledges as fast as the hub
//! sends gets the whole of `max_inflight` after [`PERIOD`]. The rate is
//! measured while something is in flight, over periods of at least
//! [`PERIOD`]; an idle link measures nothing and keeps its window. Never
//! over less: a NATS node answers a read buffer's publishes in one burst,
//! and a measure taken within the burst (a thousand acknowledgements in a
//! millisecond) opened the whole of `max_inflight` to a node storing a few
//! hundred a second.
//!
//! Pure: the caller passes the time. Owns no connection and no window of
//! messages (the forwarder's [`super::window`]).

use std::time::Duration;

use tokio::time::Instant;

/// The window of a new link, before its first measure.
pub const FIRST_WINDOW: usize = 64;
/// The smallest window a measure gives.
const FLOOR: usize = 16;
/// The longest a measure waits for a window's worth of acknowledgements.
const PERIOD: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub struct AckRate {
    max: usize,
    /// A quarter of the keepalive, in seconds: the time the broker may take
    /// to work through the window at the rate measured.
    horizon: f64,
    window: usize,
    /// Start of the period being measured (`None`: nothing in flight).
    since: Option<Instant>,
    acked: usize,
}

impl AckRate {
    pub fn new(max_inflight: usize, keep_alive: Duration) -> Self {
        let max = max_inflight.max(1);
        Self {
            max,
            horizon: keep_alive.as_secs_f64() / 4.0,
            window: FIRST_WINDOW.min(max),
            since: None,
            acked: 0,
        }
    }

    /// How many publishes may be in flight now.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Publishes were handed to the link.
    pub fn sent(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    /// `n` publishes were acknowledged, and `idle`: none is in flight any
    /// more. Returns the new window when this measure changed it.
    pub fn acked(&mut self, n: usize, idle: bool, now: Instant) -> Option<usize> {
        let since = self.since?;
        self.acked += n;
        let elapsed = now.saturating_duration_since(since);
        let mut changed = None;
        if elapsed >= PERIOD {
            let rate = self.acked as f64 / elapsed.as_secs_f64();
            let window = ((rate * self.horizon) as usize).clamp(FLOOR.min(self.max), self.max);
            if window != self.window {
                self.window = window;
                changed = Some(window);
            }
            self.since = Some(now);
            self.acked = 0;
        }
        if idle {
            self.since = None;
            self.acked = 0;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEPALIVE: Duration = Duration::from_secs(5);

    fn ms(t: Instant, ms: u64) -> Instant {
        t + Duration::from_millis(ms)
    }

    /// Acknowledges the whole window every `rtt_ms` for `rounds` rounds.
    fn rounds(r: &mut AckRate, t: &mut Instant, rtt_ms: u64, rounds: usize) {
        for _ in 0..rounds {
            r.sent(*t);
            *t = ms(*t, rtt_ms);
            let n = r.window();
            r.acked(n, false, *t);
        }
    }

    #[test]
    fn a_new_link_starts_small_and_a_fast_broker_opens_the_whole_window_after_one_period() {
        let mut r = AckRate::new(32_768, KEEPALIVE);
        assert_eq!(r.window(), FIRST_WINDOW);
        let mut t = Instant::now();
        rounds(&mut r, &mut t, 1, 249);
        assert_eq!(r.window(), FIRST_WINDOW, "no measure before a period");
        rounds(&mut r, &mut t, 1, 1);
        assert_eq!(r.window(), 32_768);
    }

    #[test]
    fn a_broker_that_answers_in_bursts_is_measured_across_the_gaps_not_within_a_burst() {
        let mut r = AckRate::new(32_768, KEEPALIVE);
        let mut t = Instant::now();
        r.sent(t);
        // 1,000 acknowledgements every 3 s, in two reads a millisecond apart.
        for _ in 0..5 {
            t = ms(t, 3000);
            r.acked(200, false, t);
            t = ms(t, 1);
            r.acked(800, false, t);
            assert!(r.window() <= 500, "window {} for 333/s", r.window());
        }
        assert!(r.window() >= 400, "window {} for 333/s", r.window());
    }

    #[test]
    fn a_broker_that_stores_slowly_gets_what_it_acknowledges_in_a_quarter_of_a_keepalive() {
        let mut r = AckRate::new(32_768, KEEPALIVE);
        let mut t = Instant::now();
        rounds(&mut r, &mut t, 1, 250);
        assert_eq!(r.window(), 32_768);
        // The broker now acknowledges 400 a second, one by one.
        r.sent(t);
        for _ in 0..100 {
            t = ms(t, 10);
            r.acked(4, false, t);
        }
        assert_eq!(r.window(), 500, "400/s for 1.25 s");
    }

    #[test]
    fn a_broker_that_crawls_keeps_a_floor_and_one_that_is_silent_keeps_its_window() {
        let mut r = AckRate::new(32_768, KEEPALIVE);
        let mut t = Instant::now();
        r.sent(t);
        t = ms(t, 2000);
        assert_eq!(r.acked(1, false, t), Some(FLOOR));
        // Silence: no acknowledgement, no measure.
        r.sent(t);
        assert_eq!(r.window(), FLOOR);
    }

    #[test]
    fn an_idle_link_measures_nothing_so_a_burst_after_a_pause_is_not_taken_for_a_slow_broker() {
        let mut r = AckRate::new(32_768, KEEPALIVE);
        let mut t = Instant::now();
        rounds(&mut r, &mut t, 1, 250);
        // One message, acknowledged, then nothing for a minute.
        r.sent(t);
        t = ms(t, 1);
        r.acked(1, true, t);
        t = ms(t, 60_000);
        r.sent(t);
        t = ms(t, 1);
        r.acked(32_768, false, t);
        assert_eq!(r.window(), 32_768);
    }

    #[test]
    fn the_window_stays_within_max_inflight_and_never_reaches_zero() {
        let mut r = AckRate::new(8, KEEPALIVE);
        assert_eq!(r.window(), 8);
        let mut t = Instant::now();
        r.sent(t);
        t = ms(t, 100_000);
        r.acked(1, false, t);
        assert_eq!(r.window(), 8, "the floor is no larger than the maximum");
        let mut r = AckRate::new(0, KEEPALIVE);
        assert_eq!(r.window(), 1);
        r.sent(t);
        r.acked(1, false, ms(t, 1));
        assert_eq!(r.window(), 1);
    }
}
