//! edgehub store-and-forward benchmark.
//!
//! Compares, in one run:
//! (a) edgehub, (b) Mosquitto configured as a persistent bridge, both
//! ingesting with the upstream down and then draining to it, and
//! (c) the upstream Mosquitto's own ceiling (publishers straight into it);
//! then, with the upstream connected, the end-to-end latency of a light
//! paced load through each of them.
//!
//! `cargo run --release -p edgehub-bench -- --help`

mod idle;
mod latency;
mod live;
mod load;
mod local;
mod plugin_calls;
mod procstat;
mod report;
mod rss;
mod scenario;
mod systems;
mod timing;
mod wan;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, ValueEnum};

use scenario::{Settings, Sut};
use systems::BridgeSettings;
use wan::LinkSpec;

#[derive(Parser, Debug)]
#[command(about = "Store-and-forward benchmark: edgehub vs. a Mosquitto bridge vs. the upstream")]
struct Args {
    /// Total messages per system [default: 200000, or 20000 with --quick,
    /// or 100000 with --wan].
    #[arg(long)]
    messages: Option<u64>,
    /// Publisher connections.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Payload bytes per message (at least 20: the sequence number is 20 ASCII digits).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Small run (20,000 messages) to check the set-up.
    #[arg(long)]
    quick: bool,
    /// Unacknowledged QoS 1 publishes per publisher connection.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Systems to measure, comma separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [System::Edgehub, System::Bridge, System::Upstream])]
    systems: Vec<System>,
    /// Global deadline per phase in seconds [default: 120, or 600 with
    /// --rss-messages, or 60 with --wan].
    #[arg(long)]
    timeout: Option<u64>,
    /// The subscriber stops after this many seconds without a new message.
    #[arg(long, default_value_t = 15)]
    idle_timeout: u64,
    /// Instead of the comparison: queue this many messages in edgehub, drain
    /// them, and report RSS during build and drain (e.g. 1000000).
    #[arg(long)]
    rss_messages: Option<u64>,
    /// The edgehub binary [default: <workspace>/target/release/edgehub].
    #[arg(long, env = "EDGEHUB_BIN")]
    edgehub_bin: Option<PathBuf>,
    /// The Mosquitto binary.
    #[arg(long, env = "MOSQUITTO_BIN", default_value = "/usr/sbin/mosquitto")]
    mosquitto_bin: PathBuf,
    /// Bridge `autosave_interval` in seconds (how often Mosquitto snapshots
    /// its whole in-memory store to disk; its default is 1800).
    #[arg(long, default_value_t = 1)]
    bridge_autosave: u32,
    /// Bridge `max_inflight_messages` (0 = unlimited) [default: 1000; with
    /// --wan, 20, Mosquitto's own default]. It bounds what Mosquitto sends
    /// its clients, not what its bridge sends the upstream.
    #[arg(long)]
    bridge_inflight: Option<u32>,
    /// Run every system this many times (interleaved) and report medians.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// The built example plugins [default: <workspace>/plugins/dist].
    #[arg(long)]
    plugins: Option<PathBuf>,
    /// Instead of the comparison: the cost of one call of each example
    /// filter (every language built in the plugins folder), via
    /// `edgehub plugin test --bench`.
    #[arg(long)]
    plugin_calls: bool,
    /// Only the latency phase (upstream connected, one paced QoS 1
    /// publisher); without this flag it runs after the throughput comparison.
    #[arg(long)]
    latency: bool,
    /// Instead of the comparison: each system idle (upstream connected, no
    /// device) for `--idle-secs`: its CPU time and how often it is woken.
    #[arg(long)]
    idle: bool,
    /// Length of the idle window, per system and run.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Messages per second of the latency phase's publisher.
    #[arg(long, default_value_t = 1000)]
    latency_rate: u32,
    /// Messages per system and run in the latency phase (the first 200 are
    /// not measured).
    #[arg(long, default_value_t = 5000)]
    latency_messages: u64,
    /// Instead of the comparison: the local broker against a plain
    /// Mosquitto (idle connections' memory, one-to-many and many-to-one
    /// fan-out).
    #[arg(long)]
    local: bool,
    /// Idle clients of the local comparison [default: 10000, or 1000 with --quick].
    #[arg(long)]
    connections: Option<usize>,
    /// Subscribers (one-to-many) and publishers (many-to-one) of the local
    /// comparison [default: 1000, or 100 with --quick].
    #[arg(long)]
    fanout: Option<usize>,
    /// Instead of the comparison: the drain of edgehub and the Mosquitto
    /// bridge, each with its default settings, over an emulated slow, far
    /// link to the upstream (one run per round trip in --wan-rtt-ms).
    #[arg(long)]
    wan: bool,
    /// Round trips of the WAN drain, in ms, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [100, 500])]
    wan_rtt_ms: Vec<u64>,
    /// Bandwidth of the emulated link in kbit/s each way (0: not limited).
    #[arg(long, default_value_t = 0)]
    wan_kbit: u64,
    /// Live messages a second published by one more device while the WAN
    /// drain runs, each timed to the upstream (0: none).
    #[arg(long, default_value_t = 10)]
    wan_live_rate: u32,
    /// With live messages: a second edgehub with this
    /// upstream.live_share_percent joins the WAN drain (0: none).
    #[arg(long, default_value_t = 10)]
    wan_live_share: u8,
    /// The second edgehub's upstream.max_bytes_per_sec (0: no cap).
    #[arg(long, default_value_t = 0)]
    wan_max_bytes_per_sec: u64,
    /// Keep the working directory (configs, logs, stores) afterwards.
    #[arg(long)]
    keep: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum System {
    Edgehub,
    /// edgehub routing every message through a Rust filter plugin.
    EdgehubFilter,
    /// edgehub routing every message through a Rust filter that returns it
    /// unchanged (what the plugin path itself costs).
    EdgehubPassthrough,
    /// edgehub routing every message through a Rust router plugin.
    EdgehubRouter,
    Bridge,
    Upstream,
}

/// Leading messages of each latency run that are not measured.
const LATENCY_WARMUP: u64 = 200;

impl System {
    /// The store-and-forward system it names; `None` for the upstream alone.
    fn sut(self) -> Option<Sut> {
        match self {
            System::Edgehub => Some(Sut::Edgehub),
            System::EdgehubFilter => Some(Sut::EdgehubFilter),
            System::EdgehubPassthrough => Some(Sut::EdgehubPassthrough),
            System::EdgehubRouter => Some(Sut::EdgehubRouter),
            System::Bridge => Some(Sut::Bridge),
            System::Upstream => None,
        }
    }
}

fn workspace_dir() -> PathBuf {
    let bench_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    bench_dir.parent().unwrap_or(bench_dir).to_path_buf()
}

fn default_edgehub_bin() -> PathBuf {
    workspace_dir().join("target/release/edgehub")
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.payload < load::SEQ_DIGITS {
        bail!("--payload must be at least {} bytes", load::SEQ_DIGITS);
    }
    if args.publishers == 0 || args.window == 0 {
        bail!("--publishers and --window must be positive");
    }
    if args.latency_rate == 0 || args.latency_messages <= LATENCY_WARMUP {
        bail!("--latency-rate must be positive and --latency-messages above {LATENCY_WARMUP}");
    }
    if args.window > 60_000 {
        bail!("--window must leave packet identifiers free (at most 60000)");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let edgehub_bin = args.edgehub_bin.clone().unwrap_or_else(default_edgehub_bin);
    let edgehub = edgehub_bin.is_file().then(|| edgehub_bin.clone());
    let work = std::env::temp_dir().join(format!("edgehub-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;

    let rss_mode = args.rss_messages.is_some();
    let messages = args.rss_messages.or(args.messages).unwrap_or(match () {
        _ if args.quick => 20_000,
        _ if args.wan => 100_000,
        _ => 200_000,
    });
    let timeout = args.timeout.unwrap_or(match () {
        _ if rss_mode => 600,
        _ if args.wan => 60,
        _ => 120,
    });
    // Removes the working directory on every exit path unless --keep.
    let _cleanup = CleanUp {
        dir: work.clone(),
        keep: args.keep,
    };
    let settings = Settings {
        messages,
        publishers: args.publishers,
        payload: args.payload,
        window: args.window,
        phase_timeout: Duration::from_secs(timeout),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        settle: Duration::from_secs(2),
        linger: Duration::from_secs(if rss_mode { 60 } else { 0 }),
        mosquitto: args.mosquitto_bin.clone(),
        edgehub,
        bridge: BridgeSettings {
            autosave_interval: args.bridge_autosave,
            max_inflight: args
                .bridge_inflight
                .unwrap_or(if args.wan { 20 } else { 1000 }),
        },
        as_root: systems::running_as_root(),
        work: work.clone(),
        rss_interval: Duration::from_millis(100),
        plugins: args
            .plugins
            .clone()
            .unwrap_or_else(|| workspace_dir().join("plugins/dist")),
        link: None,
        live: (args.wan && args.wan_live_rate > 0).then_some(scenario::LiveSettings {
            rate: args.wan_live_rate,
            share: args.wan_live_share,
            max_bytes_per_sec: args.wan_max_bytes_per_sec,
        }),
    };
    let latency = latency::LatencySettings {
        messages: args.latency_messages,
        rate: args.latency_rate,
        warmup: LATENCY_WARMUP,
        payload: args.payload.max(timing::STAMP_BYTES),
    };
    let comparison = !(args.plugin_calls || rss_mode || args.local || args.wan || args.idle);
    if args.local {
        let local = local::LocalSettings {
            connections: args
                .connections
                .unwrap_or(if args.quick { 1000 } else { 10_000 }),
            fanout: args.fanout.unwrap_or(if args.quick { 100 } else { 1000 }),
            one_to_many_messages: if args.quick { 200 } else { 1000 },
            rounds: if args.quick { 20 } else { 100 },
        };
        local::compare(&settings, &local, args.repeat).await;
        return Ok(());
    }
    report::print_header(
        &settings,
        &edgehub_bin,
        !(comparison && args.latency),
        comparison.then_some(&latency),
    );

    if args.plugin_calls {
        return plugin_calls::run(&edgehub_bin, &settings.plugins, &work);
    }
    if args.idle {
        let window = Duration::from_secs(if args.quick { 3 } else { args.idle_secs.max(1) });
        idle_phase(&settings, &args.systems, window, args.repeat).await;
        return Ok(());
    }
    if args.wan {
        let bandwidth = (args.wan_kbit > 0).then_some(args.wan_kbit * 1000 / 8);
        let links: Vec<LinkSpec> = args
            .wan_rtt_ms
            .iter()
            .map(|&ms| LinkSpec {
                rtt: Duration::from_millis(ms),
                bytes_per_sec: bandwidth,
            })
            .collect();
        wan_drain(&settings, &links, args.repeat).await;
    } else if rss_mode {
        if settings.edgehub.is_none() {
            bail!("--rss-messages needs edgehub at {}", edgehub_bin.display());
        }
        let profile = scenario::rss_profile(&settings).await;
        report::print_load("at end");
        report::print_rss_profile(&settings, &profile);
    } else {
        let mut systems: Vec<System> = Vec::new();
        for s in &args.systems {
            if !systems.contains(s) {
                systems.push(*s);
            }
        }
        if settings.edgehub.is_none() && systems.contains(&System::Edgehub) {
            println!(
                "skipping edgehub: {} does not exist (build it or set EDGEHUB_BIN)\n",
                edgehub_bin.display()
            );
            systems.retain(|&s| s != System::Edgehub);
        }
        if !args.latency {
            throughput(&settings, &systems, args.repeat).await;
        }
        latency_phase(&settings, &latency, &systems, args.repeat).await;
    }

    Ok(())
}

/// The store-and-forward comparison: one group of runs per system;
/// repetitions are interleaved so background load affects every system alike.
async fn throughput(settings: &Settings, systems: &[System], repeat: usize) {
    let mut groups: Vec<Vec<scenario::SystemResult>> = vec![Vec::new(); systems.len()];
    for run in 0..repeat.max(1) {
        for (system, group) in systems.iter().zip(groups.iter_mut()) {
            let settings = Settings {
                work: settings.work.join(format!("run{run}")),
                ..settings.clone()
            };
            let result = match system.sut() {
                Some(sut) => scenario::store_and_forward(&settings, sut).await,
                None => scenario::ceiling(&settings).await,
            };
            report::print_progress(&result);
            group.push(result);
        }
    }
    report::print_load("at end");
    report::print_table(settings, &groups);
}

/// The WAN drain: edgehub and the bridge over each emulated link,
/// repetitions interleaved.
async fn wan_drain(settings: &Settings, links: &[LinkSpec], repeat: usize) {
    // What the upstream itself takes on loopback bounds every drain.
    let ceiling = scenario::ceiling(&Settings {
        work: settings.work.join("ceiling"),
        ..settings.clone()
    })
    .await;
    report::print_progress(&ceiling);
    let mut suts = vec![Sut::Edgehub, Sut::Bridge];
    if settings.live.is_some_and(|l| l.share > 0) {
        suts.insert(1, Sut::EdgehubLive);
    }
    let mut groups: Vec<(LinkSpec, Vec<Vec<scenario::SystemResult>>)> = links
        .iter()
        .map(|&l| (l, vec![Vec::new(); suts.len()]))
        .collect();
    for run in 0..repeat.max(1) {
        for (link, group) in groups.iter_mut() {
            for (sut, runs) in suts.iter().zip(group.iter_mut()) {
                let settings = Settings {
                    work: settings
                        .work
                        .join(format!("run{run}-rtt{}", link.rtt.as_millis())),
                    link: Some(*link),
                    ..settings.clone()
                };
                let result = scenario::store_and_forward(&settings, *sut).await;
                print!("  {}: ", link.describe());
                report::print_progress(&result);
                runs.push(result);
            }
        }
    }
    report::print_load("at end");
    // The bench does not set the hub's window: its default, unless the
    // environment (which the hub reads) says otherwise.
    let window = std::env::var("EDGEHUB_UPSTREAM_MAX_INFLIGHT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(EDGEHUB_MAX_INFLIGHT);
    report::print_wan_table(settings, window, &ceiling, &groups);
}

/// edgehub's default `upstream.max_inflight`.
const EDGEHUB_MAX_INFLIGHT: usize = 32_768;

/// The latency phase, interleaved like the comparison.
async fn latency_phase(
    settings: &Settings,
    latency: &latency::LatencySettings,
    systems: &[System],
    repeat: usize,
) {
    println!();
    let mut groups: Vec<Vec<latency::LatencyRun>> = vec![Vec::new(); systems.len()];
    for run in 0..repeat.max(1) {
        for (system, group) in systems.iter().zip(groups.iter_mut()) {
            let settings = Settings {
                work: settings.work.join(format!("run{run}")),
                ..settings.clone()
            };
            let target = system
                .sut()
                .map_or(latency::Target::Upstream, latency::Target::Sut);
            let result = latency::measure(&settings, latency, target).await;
            report::print_latency_progress(&result);
            group.push(result);
        }
    }
    report::print_load("at end");
    report::print_latency_table(latency, &groups);
}

/// Each system idle, runs interleaved.
async fn idle_phase(settings: &Settings, systems: &[System], window: Duration, repeat: usize) {
    let suts: Vec<Sut> = systems.iter().filter_map(|s| s.sut()).collect();
    let mut groups: Vec<Vec<idle::IdleRun>> = vec![Vec::new(); suts.len()];
    for run in 0..repeat.max(1) {
        for (&sut, group) in suts.iter().zip(groups.iter_mut()) {
            let settings = Settings {
                work: settings.work.join(format!("run{run}")),
                ..settings.clone()
            };
            let result = idle::measure(&settings, sut, window).await;
            report::print_idle_progress(&result);
            group.push(result);
        }
    }
    report::print_idle_table(&groups);
}

/// Deletes the working directory when dropped, or says where it is.
struct CleanUp {
    dir: PathBuf,
    keep: bool,
}

impl Drop for CleanUp {
    fn drop(&mut self) {
        if self.keep {
            println!("\nworking directory kept: {}", self.dir.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("cannot remove {}: {e}", self.dir.display());
        }
    }
}
