//! What a plugin's `host.log` lines become: each line is cut to a length
//! limit and passes a token bucket of lines per second shared by every
//! instance of that plugin ([`PluginLog`], one per plugin name, kept across
//! reloads). Lines over the rate are dropped and counted
//! (`edgehub_plugin_log_dropped_total`), and summarised in one log line.
//!
//! The bucket itself ([`LineBudget`]) is a pure type: the caller passes the
//! time. This module does not choose the limits (the hub's config does) and
//! does not format log lines (tracing does).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::Level;

use crate::metrics::Metrics;

/// Fewest seconds between two "lines dropped" summaries of one plugin.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(1);

/// How much one plugin may write to the hub's log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogLimit {
    /// Lines per second, sustained.
    pub lines_per_sec: u32,
    /// Lines that may come at once after a quiet time (the bucket's size).
    pub burst: u32,
    /// Longest line, in bytes; longer lines are cut (with a marker).
    pub max_line_bytes: usize,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self {
            lines_per_sec: 100,
            burst: 200,
            max_line_bytes: 1024,
        }
    }
}

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Write it; first write the summary of the lines dropped before it,
    /// when one is due.
    Write(Option<Dropped>),
    /// Drop it (it is counted towards the next summary).
    Drop,
}

/// Lines dropped since the last summary, and over how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropped {
    pub lines: u64,
    /// From the first of these drops to now.
    pub over: Duration,
}

/// A token bucket of log lines plus the count of lines it refused since
/// the last summary. Starts full.
#[derive(Debug, Default)]
pub struct LineBudget {
    tokens: f64,
    /// When `tokens` was last brought up to date (`None`: never used).
    updated: Option<Instant>,
    dropped: u64,
    first_drop: Option<Instant>,
    last_summary: Option<Instant>,
}

impl LineBudget {
    /// Takes one line's token at `now`, under `limit`.
    pub fn admit(&mut self, limit: &LogLimit, now: Instant) -> Verdict {
        let burst = f64::from(limit.burst);
        self.tokens = match self.updated {
            None => burst,
            Some(t) => {
                let refill =
                    now.saturating_duration_since(t).as_secs_f64() * f64::from(limit.lines_per_sec);
                (self.tokens + refill).min(burst)
            }
        };
        self.updated = Some(now);
        if self.tokens < 1.0 {
            self.dropped += 1;
            self.first_drop.get_or_insert(now);
            return Verdict::Drop;
        }
        self.tokens -= 1.0;
        let due = self
            .last_summary
            .is_none_or(|t| now.saturating_duration_since(t) >= SUMMARY_EVERY);
        let summary = match self.first_drop {
            Some(first) if due => {
                let d = Dropped {
                    lines: self.dropped,
                    over: now.saturating_duration_since(first),
                };
                self.dropped = 0;
                self.first_drop = None;
                self.last_summary = Some(now);
                Some(d)
            }
            _ => None,
        };
        Verdict::Write(summary)
    }
}

/// `text` cut to at most `max` bytes (on a character boundary), followed by
/// a marker saying how many bytes were cut off; unchanged when it fits.
pub fn cut(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (cut, {} bytes)", &text[..end], text.len() - end).into()
}

/// One plugin's log: its name, its budget (shared by all its instances and
/// versions) and where dropped lines are counted.
pub struct PluginLog {
    plugin: String,
    budget: Mutex<LineBudget>,
    metrics: Arc<Metrics>,
}

impl PluginLog {
    pub fn new(plugin: &str, metrics: Arc<Metrics>) -> Self {
        Self {
            plugin: plugin.to_string(),
            budget: Mutex::default(),
            metrics,
        }
    }

    /// Writes one line of the guest at `level` (0 error, 1 warn, 2 info,
    /// 3 debug, else trace), within `limit`. Lines at a level the hub does
    /// not log are skipped before they use any of the budget.
    pub fn write(&self, limit: &LogLimit, level: u8, text: &str) {
        let level = match level {
            0 => Level::ERROR,
            1 => Level::WARN,
            2 => Level::INFO,
            3 => Level::DEBUG,
            _ => Level::TRACE,
        };
        if level > tracing::level_filters::LevelFilter::current() {
            return;
        }
        let verdict = self
            .budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(limit, Instant::now());
        let plugin = self.plugin.as_str();
        match verdict {
            Verdict::Drop => self.metrics.plugin_log_dropped(plugin, 1),
            Verdict::Write(summary) => {
                if let Some(d) = summary {
                    let seconds = d.over.as_secs_f64();
                    tracing::warn!(
                        plugin,
                        dropped = d.lines,
                        "plugin log rate limited: dropped {} lines in the last {seconds:.1}s",
                        d.lines
                    );
                }
                let text = cut(text, limit.max_line_bytes);
                match level {
                    Level::ERROR => tracing::error!(plugin, "{text}"),
                    Level::WARN => tracing::warn!(plugin, "{text}"),
                    Level::INFO => tracing::info!(plugin, "{text}"),
                    Level::DEBUG => tracing::debug!(plugin, "{text}"),
                    _ => tracing::trace!(plugin, "{text}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: LogLimit = LogLimit {
        lines_per_sec: 10,
        burst: 5,
        max_line_bytes: 8,
    };

    fn admit_n(b: &mut LineBudget, n: usize, now: Instant) -> Vec<Verdict> {
        (0..n).map(|_| b.admit(&LIMIT, now)).collect()
    }

    fn written(v: &[Verdict]) -> usize {
        v.iter().filter(|v| matches!(v, Verdict::Write(_))).count()
    }

    #[test]
    fn a_full_bucket_lets_the_burst_through_then_drops() {
        let t0 = Instant::now();
        let mut b = LineBudget::default();
        let v = admit_n(&mut b, 8, t0);
        assert_eq!(written(&v), 5);
        assert!(v[..5].iter().all(|v| *v == Verdict::Write(None)), "{v:?}");
        assert!(v[5..].iter().all(|v| *v == Verdict::Drop), "{v:?}");
    }

    #[test]
    fn the_bucket_refills_at_the_rate_and_never_above_the_burst() {
        let t0 = Instant::now();
        let mut b = LineBudget::default();
        admit_n(&mut b, 5, t0);
        // 10 lines/s: 0.3 s later three lines fit, the fourth does not
        let v = admit_n(&mut b, 4, t0 + Duration::from_millis(300));
        assert_eq!(written(&v), 3, "{v:?}");
        // an hour of quiet fills it to the burst, not more
        let v = admit_n(&mut b, 20, t0 + Duration::from_secs(3600));
        assert_eq!(written(&v), 5, "{v:?}");
    }

    #[test]
    fn a_flood_over_ten_seconds_writes_burst_plus_rate_times_time() {
        let t0 = Instant::now();
        let mut b = LineBudget::default();
        let mut n = 0;
        for ms in 0..10_000u64 {
            for _ in 0..50 {
                if matches!(
                    b.admit(&LIMIT, t0 + Duration::from_millis(ms)),
                    Verdict::Write(_)
                ) {
                    n += 1;
                }
            }
        }
        // 5 at once, then 10 per second for 9.999 s
        assert_eq!(n, 5 + 99);
    }

    #[test]
    fn dropped_lines_are_summarised_once_with_the_next_line_written() {
        let t0 = Instant::now();
        let mut b = LineBudget::default();
        admit_n(&mut b, 5, t0);
        let drops = admit_n(&mut b, 7, t0 + Duration::from_millis(20));
        assert!(drops.iter().all(|v| *v == Verdict::Drop));
        let v = b.admit(&LIMIT, t0 + Duration::from_millis(120));
        assert_eq!(
            v,
            Verdict::Write(Some(Dropped {
                lines: 7,
                over: Duration::from_millis(100)
            }))
        );
        // nothing dropped since: no summary
        assert_eq!(
            b.admit(&LIMIT, t0 + Duration::from_millis(500)),
            Verdict::Write(None)
        );
    }

    #[test]
    fn summaries_come_at_most_once_a_second() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut b = LineBudget::default();
        admit_n(&mut b, 6, at(0));
        assert!(matches!(b.admit(&LIMIT, at(100)), Verdict::Write(Some(_))));
        // dropped again right away: summarised only a second after the last summary
        assert_eq!(b.admit(&LIMIT, at(100)), Verdict::Drop);
        assert_eq!(b.admit(&LIMIT, at(200)), Verdict::Write(None));
        assert_eq!(b.admit(&LIMIT, at(200)), Verdict::Drop);
        assert_eq!(
            b.admit(&LIMIT, at(1100)),
            Verdict::Write(Some(Dropped {
                lines: 2,
                over: Duration::from_millis(1000)
            }))
        );
    }

    #[test]
    fn the_limit_may_change_between_lines() {
        let t0 = Instant::now();
        let mut b = LineBudget::default();
        admit_n(&mut b, 5, t0);
        let wider = LogLimit {
            lines_per_sec: 1000,
            ..LIMIT
        };
        assert!(matches!(
            b.admit(&wider, t0 + Duration::from_millis(2)),
            Verdict::Write(_)
        ));
    }

    #[test]
    fn long_lines_are_cut_on_a_character_boundary_with_a_marker() {
        assert_eq!(cut("short", 8), "short");
        assert_eq!(cut("exactly8", 8), "exactly8");
        assert_eq!(cut("0123456789", 8), "01234567… (cut, 2 bytes)");
        // "é" is two bytes: the cut falls before it rather than inside it
        assert_eq!(cut("abcdefgé", 8), "abcdefg… (cut, 2 bytes)");
    }
}
