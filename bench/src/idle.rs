//! The idle phase: what each system costs while nothing happens. The system
//! starts connected to a fresh upstream, with no device, settles, and then,
//! over a window, the bench reads from `/proc` how much CPU all its threads
//! used (`/proc/<pid>/task/*/schedstat`, nanoseconds on a CPU) and how often
//! they were woken (`voluntary_ctxt_switches` plus `nonvoluntary_...`).
//! A gateway's hub spends most of its life like this: every wake-up costs
//! power and every busy loop a share of a small CPU.
//!
//! Owns the sampling; starting and stopping processes is `scenario`'s job,
//! printing is `report`'s.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::procstat;
use crate::scenario::{self, Settings, Started, Sut};
use crate::systems;

/// How long a system runs before the window opens (a hub reads and compiles
/// its plugins folder meanwhile).
const SETTLE: Duration = Duration::from_secs(3);

/// One system's idle window.
#[derive(Debug, Clone)]
pub struct IdleRun {
    pub label: &'static str,
    pub window: Duration,
    /// CPU time of all its threads over the window.
    pub cpu: Duration,
    /// Times its threads were woken over the window.
    pub wakeups: u64,
    pub threads: usize,
    pub error: Option<String>,
}

/// Runs `sut` idle for `window` and measures it.
pub async fn measure(s: &Settings, sut: Sut, window: Duration) -> IdleRun {
    let mut run = IdleRun {
        label: sut.label(),
        window,
        cpu: Duration::ZERO,
        wakeups: 0,
        threads: 0,
        error: None,
    };
    let dir = s.work.join(format!("idle-{}", sut.dir_name()));
    if let Err(e) = measure_into(s, sut, &dir, &mut run).await {
        run.error = Some(format!("{e:#}"));
    }
    run
}

async fn measure_into(s: &Settings, sut: Sut, dir: &Path, run: &mut IdleRun) -> Result<()> {
    let upstream_port = systems::free_port()?;
    let config = systems::upstream_config(upstream_port, &dir.join("upstream"), s.as_root);
    let mut upstream =
        systems::start_mosquitto(&s.mosquitto, "upstream", &dir.join("upstream"), &config)?;
    let mut warnings = Vec::new();
    let mut started: Option<Started> = None;
    let outcome = async {
        upstream.wait_ready(upstream_port, s.deadline()).await?;
        let port = systems::free_port()?;
        let system = started.insert(scenario::start_sut(s, sut, dir, port, upstream_port).await?);
        tokio::time::sleep(SETTLE).await;
        let before = procstat::sample(system.proc.pid)?;
        tokio::time::sleep(run.window).await;
        let after = procstat::sample(system.proc.pid)?;
        let used = after.since(&before);
        run.cpu = used.cpu;
        run.wakeups = used.wakeups;
        run.threads = after.threads;
        anyhow::Ok(())
    }
    .await;
    if let Some(system) = started.as_mut() {
        scenario::stop(&mut system.proc, &mut warnings).await;
    }
    scenario::stop(&mut upstream, &mut warnings).await;
    outcome
}
