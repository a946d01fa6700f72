//! The measured scenarios: upstream ceiling, store-and-forward (edgehub or the
//! Mosquitto bridge) and the long-queue RSS profile of edgehub.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::oneshot;

use crate::load::{self, Conn, PublisherSpec, SubscriberStats, SUBSCRIBER_ID};
use crate::rss::{self, RssSampler, Status, Window};
use crate::systems::{self, BridgeSettings, Proc};
use crate::wan::{self, LinkSpec};

/// Everything a scenario needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    pub messages: u64,
    pub publishers: usize,
    pub payload: usize,
    pub window: usize,
    /// Global deadline for each phase (ingest, drain).
    pub phase_timeout: Duration,
    /// The subscriber gives up after this long without a new message.
    pub idle_timeout: Duration,
    /// Pause between the last PUBACK and starting the upstream.
    pub settle: Duration,
    /// Time the system under test keeps running after the drain (RSS profile).
    pub linger: Duration,
    pub mosquitto: PathBuf,
    pub edgehub: Option<PathBuf>,
    pub bridge: BridgeSettings,
    pub as_root: bool,
    pub work: PathBuf,
    pub rss_interval: Duration,
    /// Where the built example plugins are (for the plugin systems).
    pub plugins: PathBuf,
    /// A slow, far link between the system under test and the upstream
    /// (the WAN drain); `None`: loopback.
    pub link: Option<LinkSpec>,
    /// Live messages during the WAN drain, and the edgehub that keeps a
    /// share of its window for them.
    pub live: Option<LiveSettings>,
}

/// Live messages during the WAN drain ([`crate::live`]).
#[derive(Debug, Clone, Copy)]
pub struct LiveSettings {
    /// Messages a second.
    pub rate: u32,
    /// `upstream.live_share_percent` of [`Sut::EdgehubLive`].
    pub share: u8,
    /// `upstream.max_bytes_per_sec` of [`Sut::EdgehubLive`] (0: none).
    pub max_bytes_per_sec: u64,
}

impl Settings {
    fn specs(&self) -> Vec<PublisherSpec> {
        load::publisher_specs(self.messages, self.publishers, self.payload, self.window)
    }

    pub fn deadline(&self) -> Instant {
        Instant::now() + self.phase_timeout
    }
}

/// The store-and-forward systems under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sut {
    Edgehub,
    /// edgehub with every message routed through a Rust filter plugin.
    EdgehubFilter,
    /// edgehub with every message through a Rust filter that returns it unchanged.
    EdgehubPassthrough,
    /// edgehub with every message routed through a Rust router plugin.
    EdgehubRouter,
    /// edgehub keeping a share of its window for live messages.
    EdgehubLive,
    Bridge,
}

impl Sut {
    pub fn label(self) -> &'static str {
        match self {
            Sut::Edgehub => "edgehub",
            Sut::EdgehubFilter => "edgehub + Rust filter",
            Sut::EdgehubPassthrough => "edgehub + Rust pass-through",
            Sut::EdgehubRouter => "edgehub + Rust router",
            Sut::EdgehubLive => "edgehub, live share",
            Sut::Bridge => "mosquitto bridge",
        }
    }

    pub fn dir_name(self) -> &'static str {
        match self {
            Sut::Edgehub => "edgehub",
            Sut::EdgehubFilter => "edgehub-filter",
            Sut::EdgehubPassthrough => "edgehub-passthrough",
            Sut::EdgehubRouter => "edgehub-router",
            Sut::EdgehubLive => "edgehub-live",
            Sut::Bridge => "bridge",
        }
    }
}

/// Publisher-side measurement.
#[derive(Debug, Clone)]
pub struct Ingest {
    pub expected: u64,
    pub acked: u64,
    /// First publish to last PUBACK over all publishers.
    pub elapsed: Duration,
    pub errors: Vec<String>,
}

impl Ingest {
    pub fn complete(&self) -> bool {
        self.acked == self.expected && self.errors.is_empty()
    }

    pub fn rate(&self) -> Option<f64> {
        let secs = self.elapsed.as_secs_f64();
        (self.complete() && secs > 0.0).then(|| self.expected as f64 / secs)
    }
}

/// Result of one system (one table row).
#[derive(Debug, Clone)]
pub struct SystemResult {
    pub label: String,
    pub ingest: Option<Ingest>,
    /// Subscriber view: the drain after the outage, or for the ceiling the
    /// deliveries while publishing.
    pub delivery: Option<SubscriberStats>,
    /// Upstream start to first delivery (reconnect + back-off); not part of the drain rate.
    pub first_delivery_after: Option<Duration>,
    /// Live messages published during a WAN drain, and their latency.
    pub live: Option<crate::live::LiveOutcome>,
    pub peak_rss_kib: Option<u64>,
    /// Bytes of the store on disk when the upstream is started.
    pub store_bytes: Option<u64>,
    /// Bytes of the store on disk once everything was delivered (after the
    /// linger period in the RSS profile).
    pub store_bytes_drained: Option<u64>,
    /// CPU time of the system under test while ingesting.
    pub ingest_cpu: Option<Duration>,
    /// CPU time of the system under test from upstream start to the last delivery.
    pub drain_cpu: Option<Duration>,
    /// CPU time of the upstream Mosquitto during the drain (for the
    /// ceiling: while receiving and delivering everything).
    pub upstream_cpu: Option<Duration>,
    /// CPU time of this process (publishers and subscriber) during ingest
    /// and during drain (ceiling: both during the one phase, as ingest).
    pub loadgen_cpu: (Option<Duration>, Option<Duration>),
    pub warnings: Vec<String>,
    /// Why the scenario stopped early, if it did.
    pub error: Option<String>,
}

impl SystemResult {
    fn new(label: &str) -> SystemResult {
        SystemResult {
            label: label.to_string(),
            ingest: None,
            delivery: None,
            first_delivery_after: None,
            live: None,
            peak_rss_kib: None,
            store_bytes: None,
            store_bytes_drained: None,
            ingest_cpu: None,
            drain_cpu: None,
            upstream_cpu: None,
            loadgen_cpu: (None, None),
            warnings: Vec::new(),
            error: None,
        }
    }
}

/// Connects every publisher, then publishes concurrently and times the
/// first publish to the last PUBACK.
async fn ingest(addr: SocketAddr, specs: Vec<PublisherSpec>, deadline: Instant) -> Result<Ingest> {
    let expected = specs.iter().map(|s| s.count).sum();
    let conns = load::connect_publishers(addr, &specs).await?;
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .zip(specs)
        .map(|(conn, spec)| tokio::spawn(load::run_publisher(conn, spec, deadline)))
        .collect();
    let mut result = Ingest {
        expected,
        acked: 0,
        elapsed: Duration::ZERO,
        errors: Vec::new(),
    };
    for (i, task) in tasks.into_iter().enumerate() {
        let r = task.await.context("publisher task panicked")?;
        result.acked += r.acked;
        if let Some(last) = r.last_ack {
            result.elapsed = result.elapsed.max(last - start);
        }
        if let Some(e) = r.error {
            result.errors.push(format!("publisher {i}: {e}"));
        }
    }
    Ok(result)
}

/// CPU time `pid` used since the reading `before`.
fn cpu_since(pid: u32, before: Option<Duration>) -> Option<Duration> {
    Some(rss::cpu_time(pid)?.saturating_sub(before?))
}

/// Log lines of a finished process that mention errors, as warnings. Both
/// its log and its console are read: Mosquitto reports a log file it cannot
/// open (e.g. without `user root`) only on the console.
fn collect_log_warnings(proc: &Proc, out: &mut Vec<String>) {
    let mut paths = vec![&proc.log];
    if proc.console != proc.log {
        paths.push(&proc.console);
    }
    for path in paths {
        let problems = systems::log_problems(path);
        if let Some(first) = problems.first() {
            out.push(format!(
                "{} logged {} error/warning line(s) in {}, e.g.: {first}",
                proc.name,
                problems.len(),
                path.display(),
            ));
        }
    }
}

pub(crate) async fn stop(proc: &mut Proc, warnings: &mut Vec<String>) {
    match proc.stop().await {
        Ok(status) if status.contains("killed") || status.contains("already") => {
            warnings.push(format!("{} {status}", proc.name))
        }
        Ok(_) => {}
        Err(e) => warnings.push(format!("stopping {}: {e:#}", proc.name)),
    }
    collect_log_warnings(proc, warnings);
}

/// (c) The upstream's ceiling: publishers straight into the upstream
/// Mosquitto with the QoS 1 subscriber attached.
pub async fn ceiling(s: &Settings) -> SystemResult {
    let mut result = SystemResult::new("upstream ceiling (direct)");
    let dir = s.work.join("ceiling");
    let outcome = async {
        let port = systems::free_port()?;
        let config = systems::upstream_config(port, &dir, s.as_root);
        let mut upstream = systems::start_mosquitto(&s.mosquitto, "upstream", &dir, &config)?;
        let run = async {
            upstream.wait_ready(port, s.deadline()).await?;
            let sampler = RssSampler::start(upstream.pid, s.rss_interval);
            let sub =
                Conn::connect_retry(systems::loopback(port), SUBSCRIBER_ID, false, s.deadline())
                    .await?;
            let (tx, rx) = oneshot::channel();
            let deadline = s.deadline();
            let subscriber = tokio::spawn(load::run_subscriber(
                sub,
                load::SUBSCRIBER_FILTER,
                s.messages,
                deadline,
                s.idle_timeout,
                Some(tx),
            ));
            tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .context("no SUBACK within 10 s")??;
            let cpu_before = rss::cpu_time(upstream.pid);
            let own_before = rss::cpu_time(std::process::id());
            result.ingest = Some(ingest(systems::loopback(port), s.specs(), deadline).await?);
            result.delivery = Some(subscriber.await?);
            result.upstream_cpu = cpu_since(upstream.pid, cpu_before);
            result.loadgen_cpu.0 = cpu_since(std::process::id(), own_before);
            result.peak_rss_kib = Some(sampler.peak_kib());
            anyhow::Ok(())
        }
        .await;
        stop(&mut upstream, &mut result.warnings).await;
        run
    }
    .await;
    if let Err(e) = outcome {
        result.error = Some(format!("{e:#}"));
    }
    result
}

/// Starts the system under test, listening on `port`, forwarding to the
/// (not yet listening) `upstream_port`.
pub(crate) async fn start_sut(
    s: &Settings,
    sut: Sut,
    dir: &Path,
    port: u16,
    upstream_port: u16,
) -> Result<Started> {
    let mut metrics_port = None;
    let (mut proc, store) = match sut {
        Sut::Edgehub
        | Sut::EdgehubFilter
        | Sut::EdgehubPassthrough
        | Sut::EdgehubRouter
        | Sut::EdgehubLive => {
            let bin = s
                .edgehub
                .as_deref()
                .context("edgehub binary not available")?;
            let metrics = systems::free_port()?;
            metrics_port = Some(metrics);
            let config = match sut {
                Sut::EdgehubFilter => Some(systems::plugin_config(dir, &s.plugins, "filter")?),
                Sut::EdgehubPassthrough => {
                    Some(systems::plugin_config(dir, &s.plugins, "passthrough")?)
                }
                Sut::EdgehubRouter => Some(systems::plugin_config(dir, &s.plugins, "router")?),
                _ => None,
            };
            let mut args = Vec::new();
            if let (Sut::EdgehubLive, Some(live)) = (sut, s.live) {
                args.push(format!("--upstream-live-share-percent={}", live.share));
                args.push(format!(
                    "--upstream-max-bytes-per-sec={}",
                    live.max_bytes_per_sec
                ));
            }
            let config = config.as_deref();
            let proc =
                systems::start_edgehub(bin, dir, port, upstream_port, metrics, config, &args)?;
            (proc, dir.join("storage"))
        }
        Sut::Bridge => {
            let config = systems::bridge_config(port, upstream_port, dir, s.as_root, &s.bridge);
            let proc = systems::start_mosquitto(&s.mosquitto, "bridge", dir, &config)?;
            (proc, dir.join("mosquitto.db"))
        }
    };
    proc.wait_ready(port, s.deadline()).await?;
    Ok(Started {
        proc,
        store,
        metrics_port,
    })
}

/// A started system under test.
pub(crate) struct Started {
    pub proc: Proc,
    /// File or directory holding its queue on disk.
    pub store: PathBuf,
    /// edgehub's Prometheus endpoint.
    pub metrics_port: Option<u16>,
}

/// Creates the subscriber's persistent session in the upstream's
/// persistence directory (via a throw-away port), so the later drain cannot
/// lose messages that arrive before the subscriber has reconnected.
async fn seed_upstream(s: &Settings, dir: &Path) -> Result<()> {
    let port = systems::free_port()?;
    let config = systems::upstream_config(port, dir, s.as_root);
    let mut upstream = systems::start_mosquitto(&s.mosquitto, "upstream-seed", dir, &config)?;
    let seeded = async {
        upstream.wait_ready(port, s.deadline()).await?;
        load::seed_subscriber_session(systems::loopback(port), s.deadline()).await
    }
    .await;
    let stopped = upstream.stop().await?;
    seeded?;
    if !systems::has_persistence_file(dir) {
        bail!(
            "upstream did not save its persistence file ({stopped}); log:\n{}",
            systems::tail(&upstream.log, 10)
        );
    }
    Ok(())
}

/// Phase boundaries of one outage run, for the RSS profile.
struct Outage {
    ingest_start: Instant,
    ingest_end: Instant,
    upstream_start: Instant,
    drain_end: Instant,
    linger_end: Instant,
}

/// (a)/(b): ingest with the upstream down (pure store), then start the
/// upstream and measure the drain to the subscriber.
pub async fn store_and_forward(s: &Settings, sut: Sut) -> SystemResult {
    let mut result = SystemResult::new(sut.label());
    if let Err(e) = run_outage(s, sut, &mut result, None).await {
        result.error = Some(format!("{e:#}"));
    }
    result
}

/// The outage run shared by the comparison and the RSS profile: fills
/// `result`, optionally hands back the RSS sampler, returns the phase times.
async fn run_outage(
    s: &Settings,
    sut: Sut,
    result: &mut SystemResult,
    keep_sampler: Option<&mut Option<RssSampler>>,
) -> Result<Outage> {
    let dir = s.work.join(sut.dir_name());
    let upstream_dir = dir.join("upstream");
    std::fs::create_dir_all(&upstream_dir)?;
    seed_upstream(s, &upstream_dir).await?;

    let port = systems::free_port()?;
    // Reserved for the upstream but nobody listens there until the drain.
    let upstream_port = systems::free_port()?;
    // The system under test reaches the upstream through the emulated link
    // when there is one (it too listens only from the drain on).
    let link_port = match s.link {
        Some(_) => systems::free_port()?,
        None => upstream_port,
    };
    let Started {
        mut proc,
        store,
        metrics_port,
    } = start_sut(s, sut, &dir, port, link_port).await?;
    let sampler = RssSampler::start(proc.pid, s.rss_interval);
    let mut upstream: Option<Proc> = None;

    let run = async {
        // Ingest: upstream down, so this is pure store.
        let ingest_start = Instant::now();
        let cpu_before = rss::cpu_time(proc.pid);
        let own_before = rss::cpu_time(std::process::id());
        let ing = ingest(systems::loopback(port), s.specs(), s.deadline()).await?;
        let ingest_end = Instant::now();
        result.ingest_cpu = cpu_since(proc.pid, cpu_before);
        result.loadgen_cpu.0 = cpu_since(std::process::id(), own_before);
        let complete = ing.complete();
        let summary = ing.errors.first().cloned();
        result.ingest = Some(ing);
        if !complete {
            bail!(
                "ingest incomplete: {}",
                summary.unwrap_or_else(|| "unknown".into())
            );
        }
        tokio::time::sleep(s.settle).await;
        result.store_bytes = Some(systems::disk_size(&store));

        // Drain: start the upstream, reconnect the subscriber's session.
        let config = systems::upstream_config(upstream_port, &upstream_dir, s.as_root);
        let _link = match s.link {
            Some(spec) => Some(
                wan::start(
                    systems::loopback(link_port),
                    systems::loopback(upstream_port),
                    spec,
                )
                .await?,
            ),
            None => None,
        };
        let upstream_start = Instant::now();
        let cpu_before = rss::cpu_time(proc.pid);
        let own_before = rss::cpu_time(std::process::id());
        upstream = Some(systems::start_mosquitto(
            &s.mosquitto,
            "upstream",
            &upstream_dir,
            &config,
        )?);
        let deadline = s.deadline();
        // Live messages during a WAN drain, on a task of their own.
        let drained = Arc::new(AtomicBool::new(false));
        let live = match (s.link, s.live) {
            (Some(_), Some(l)) => Some(tokio::spawn(crate::live::during_drain(
                systems::loopback(port),
                systems::loopback(upstream_port),
                l.rate,
                s.payload,
                drained.clone(),
                deadline,
            ))),
            _ => None,
        };
        let sub = Conn::connect_retry(
            systems::loopback(upstream_port),
            SUBSCRIBER_ID,
            false,
            deadline,
        )
        .await?;
        let stats = load::run_subscriber(
            sub,
            load::SUBSCRIBER_FILTER,
            s.messages,
            deadline,
            s.idle_timeout,
            None,
        )
        .await;
        let drain_end = Instant::now();
        drained.store(true, Ordering::Relaxed);
        if let Some(live) = live {
            result.live = live.await.ok();
        }
        result.drain_cpu = cpu_since(proc.pid, cpu_before);
        result.loadgen_cpu.1 = cpu_since(std::process::id(), own_before);
        result.upstream_cpu = upstream.as_ref().and_then(|u| rss::cpu_time(u.pid));
        result.first_delivery_after = stats.first.map(|f| f - upstream_start);
        result.delivery = Some(stats);
        tokio::time::sleep(s.linger).await;
        result.store_bytes_drained = Some(systems::disk_size(&store));
        anyhow::Ok(Outage {
            ingest_start,
            ingest_end,
            upstream_start,
            drain_end,
            linger_end: Instant::now(),
        })
    }
    .await;

    result.peak_rss_kib = Some(sampler.peak_kib());
    if let Some(port) = metrics_port {
        // For diagnosis only (kept with --keep).
        if let Ok(text) = systems::http_get(port, "/metrics").await {
            let _ = std::fs::write(dir.join("metrics-after-drain.txt"), text);
        }
    }
    stop(&mut proc, &mut result.warnings).await;
    if let Some(up) = upstream.as_mut() {
        stop(up, &mut result.warnings).await;
    }
    if sut == Sut::Bridge && !systems::has_persistence_file(&dir) {
        result.warnings.push(format!(
            "the bridge wrote no persistence file in {} (is `user root` needed?)",
            dir.display()
        ));
    }
    if let Some(slot) = keep_sampler {
        *slot = Some(sampler);
    }
    run
}

/// RSS samples of one phase: statistics and a few evenly spaced values.
#[derive(Debug, Clone)]
pub struct PhaseRss {
    pub phase: &'static str,
    pub window: Window,
    /// Samples at 0 %, 10 %, ... 100 % of the phase.
    pub profile: Vec<Status>,
}

/// Result of `--rss-messages`.
#[derive(Debug, Clone)]
pub struct RssProfile {
    pub system: SystemResult,
    pub phases: Vec<PhaseRss>,
}

/// Builds a long queue in edgehub with the upstream down, then drains it,
/// sampling RSS throughout.
pub async fn rss_profile(s: &Settings) -> RssProfile {
    let mut system = SystemResult::new("edgehub");
    let mut sampler = None;
    let outage = run_outage(s, Sut::Edgehub, &mut system, Some(&mut sampler)).await;
    let mut phases = Vec::new();
    match outage {
        Err(e) => system.error = Some(format!("{e:#}")),
        Ok(o) => {
            let sampler = sampler.expect("sampler kept");
            let windows = [
                ("queue build (ingest)", o.ingest_start, o.ingest_end),
                ("idle with full queue", o.ingest_end, o.upstream_start),
                ("drain", o.upstream_start, o.drain_end),
                ("idle after drain", o.drain_end, o.linger_end),
            ];
            for (phase, from, to) in windows {
                if let Some(window) = sampler.window(from, to) {
                    let profile = (0..=10)
                        .filter_map(|i| sampler.at(from + (to - from) * i / 10))
                        .collect();
                    phases.push(PhaseRss {
                        phase,
                        window,
                        profile,
                    });
                }
            }
        }
    }
    RssProfile { system, phases }
}
