//! Resource use of the processes under test: memory sampled from
//! `/proc/PID/status`, CPU time read from `/proc/PID/stat`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// User + system CPU time consumed so far by `pid` (all threads).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall, in USER_HZ (100 per second on Linux).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Resident-set figures of one process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Status {
    /// `VmRSS`: current resident set.
    pub rss_kib: u64,
    /// `VmHWM`: peak resident set since the process started.
    pub hwm_kib: u64,
    /// `RssAnon`: the anonymous (heap) part of `VmRSS`; the rest is mapped
    /// files and shared memory.
    pub anon_kib: u64,
}

/// Reads `VmRSS` and `VmHWM` of `pid`; `None` once the process is gone.
pub fn read_status(pid: u32) -> Option<Status> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some(Status {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
        anon_kib: field("RssAnon:").unwrap_or(0),
    })
}

#[derive(Default)]
struct Samples {
    rss: Vec<(Instant, Status)>,
    hwm_kib: u64,
}

/// Statistics of the samples in a time window.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub min_kib: u64,
    pub max_kib: u64,
    pub max_anon_kib: u64,
    pub samples: usize,
}

/// Polls a process's memory in the background until dropped.
pub struct RssSampler {
    samples: Arc<Mutex<Samples>>,
    task: JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32, interval: Duration) -> RssSampler {
        let samples = Arc::new(Mutex::new(Samples::default()));
        let shared = samples.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let Some(status) = read_status(pid) else {
                    return;
                };
                let mut s = shared.lock().unwrap();
                s.rss.push((Instant::now(), status));
                s.hwm_kib = s.hwm_kib.max(status.hwm_kib);
            }
        });
        RssSampler { samples, task }
    }

    /// Peak resident set seen so far (max of VmHWM and every VmRSS sample).
    pub fn peak_kib(&self) -> u64 {
        let s = self.samples.lock().unwrap();
        s.rss
            .iter()
            .map(|(_, st)| st.rss_kib)
            .fold(s.hwm_kib, u64::max)
    }

    /// VmRSS statistics of the samples taken in `[from, to]`.
    pub fn window(&self, from: Instant, to: Instant) -> Option<Window> {
        let s = self.samples.lock().unwrap();
        let within: Vec<Status> = s
            .rss
            .iter()
            .filter(|&&(t, _)| t >= from && t <= to)
            .map(|&(_, st)| st)
            .collect();
        Some(Window {
            min_kib: within.iter().map(|st| st.rss_kib).min()?,
            max_kib: within.iter().map(|st| st.rss_kib).max()?,
            max_anon_kib: within.iter().map(|st| st.anon_kib).max()?,
            samples: within.len(),
        })
    }

    /// The sample nearest to `at`.
    pub fn at(&self, at: Instant) -> Option<Status> {
        let s = self.samples.lock().unwrap();
        let distance = |t: Instant| t.max(at) - t.min(at);
        s.rss
            .iter()
            .min_by_key(|&&(t, _)| distance(t))
            .map(|&(_, st)| st)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Formats KiB as MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}
