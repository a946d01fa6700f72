//! The pace of the upstream: at most so many bytes a second, so a drain
//! after an outage does not take a metered or shared link whole.
//!
//! A token bucket holding at most one second's worth: each message takes
//! its size; a message is sent while the bucket is not empty, which may
//! take it below zero (a message larger than a second's worth still goes,
//! and the next waits until its debt is paid back). Pure: the caller passes
//! the time. What is paced, and what waits, is the forwarder's concern.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct Pace {
    /// Bytes a second; 0: not paced.
    rate: u64,
    /// Bytes that may go now (negative: owed).
    tokens: f64,
    last: Instant,
}

impl Pace {
    pub fn new(bytes_per_sec: u64, now: Instant) -> Self {
        Self {
            rate: bytes_per_sec,
            tokens: bytes_per_sec as f64,
            last: now,
        }
    }

    /// Takes `bytes` now, or says when a message may go.
    pub fn take(&mut self, bytes: u64, now: Instant) -> Result<(), Instant> {
        if self.rate == 0 {
            return Ok(());
        }
        let rate = self.rate as f64;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.last = now;
        if self.tokens <= 0.0 {
            return Err(now + Duration::from_secs_f64(-self.tokens / rate + 1e-3));
        }
        self.tokens -= bytes as f64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes sent in `secs` seconds of 1,000-byte messages offered as fast
    /// as the pace lets them go.
    fn sent_in(pace: &mut Pace, start: Instant, secs: u64) -> u64 {
        let end = start + Duration::from_secs(secs);
        let (mut now, mut sent) = (start, 0);
        while now < end {
            match pace.take(1000, now) {
                Ok(()) => sent += 1000,
                Err(at) => now = at,
            }
        }
        sent
    }

    #[test]
    fn a_long_drain_goes_at_the_set_rate_after_a_burst_of_one_second() {
        let start = Instant::now();
        let mut pace = Pace::new(50_000, start);
        let sent = sent_in(&mut pace, start, 10);
        // One second's burst, then 50 KB a second (within a message).
        assert!(
            (10 * 50_000 + 50_000..=11 * 50_000 + 1000).contains(&sent),
            "{sent} bytes in 10 s"
        );
    }

    #[test]
    fn a_message_larger_than_a_second_goes_and_the_next_waits_for_its_debt() {
        let start = Instant::now();
        let mut pace = Pace::new(1000, start);
        assert_eq!(pace.take(5000, start), Ok(()));
        let at = pace.take(10, start).unwrap_err();
        assert!(at >= start + Duration::from_secs(4), "{:?}", at - start);
        assert_eq!(pace.take(10, at), Ok(()));
    }

    #[test]
    fn no_rate_is_no_pace() {
        let start = Instant::now();
        let mut pace = Pace::new(0, start);
        for _ in 0..1000 {
            assert_eq!(pace.take(1 << 20, start), Ok(()));
        }
    }
}
