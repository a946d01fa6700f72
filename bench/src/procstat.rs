//! What a process has used so far, from `/proc`: the CPU time of all its
//! threads (`/proc/<pid>/task/*/schedstat`, nanoseconds on a CPU) and how
//! often they were woken (`voluntary_ctxt_switches` plus
//! `nonvoluntary_...`). Two samples make a window; the idle and latency
//! phases each read one.

use std::time::Duration;

use anyhow::{Context, Result};

/// CPU time and wake-ups of every thread of `pid` so far.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sample {
    pub cpu_ns: u64,
    pub wakeups: u64,
    pub threads: usize,
}

pub fn sample(pid: u32) -> Result<Sample> {
    let mut s = Sample::default();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).context("reading /proc")?;
    for task in tasks.flatten() {
        // A thread that ended meanwhile is left out.
        let (Ok(sched), Ok(status)) = (
            std::fs::read_to_string(task.path().join("schedstat")),
            std::fs::read_to_string(task.path().join("status")),
        ) else {
            continue;
        };
        s.cpu_ns += sched
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        s.wakeups += status
            .lines()
            .filter(|l| l.contains("voluntary_ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
        s.threads += 1;
    }
    Ok(s)
}

/// What a process used between two samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Used {
    pub cpu: Duration,
    pub wakeups: u64,
}

impl Sample {
    /// What was used from `before` to this sample.
    pub fn since(&self, before: &Sample) -> Used {
        Used {
            cpu: Duration::from_nanos(self.cpu_ns.saturating_sub(before.cpu_ns)),
            wakeups: self.wakeups.saturating_sub(before.wakeups),
        }
    }
}

/// CPU time and wake-ups per message of a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerMessage {
    pub cpu_us: f64,
    pub wakeups: f64,
}

impl PerMessage {
    /// `used` spread over `messages`; none for no message.
    pub fn of(used: Used, messages: u64) -> Option<PerMessage> {
        (messages > 0).then(|| PerMessage {
            cpu_us: used.cpu.as_secs_f64() * 1e6 / messages as f64,
            wakeups: used.wakeups as f64 / messages as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_spread_over_its_messages_and_no_message_gives_nothing() {
        let before = Sample {
            cpu_ns: 1_000,
            wakeups: 10,
            threads: 4,
        };
        let after = Sample {
            cpu_ns: 5_001_000,
            wakeups: 2_010,
            threads: 4,
        };
        let per = PerMessage::of(after.since(&before), 1_000).expect("1,000 messages");
        assert_eq!((per.cpu_us, per.wakeups), (5.0, 2.0));
        assert_eq!(PerMessage::of(after.since(&before), 0), None);
    }

    #[test]
    fn this_process_has_used_some_cpu_and_has_a_thread() {
        let s = sample(std::process::id()).expect("reading /proc/self");
        assert!(s.threads >= 1 && s.cpu_ns > 0, "{s:?}");
    }
}
