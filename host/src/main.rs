//! The `edgehub` command: run the hub, check a config, inspect a queue.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use edgehub::config::{self, Config};
use edgehub::hub::{HubError, Stopped};
use edgehub::store::{self, Store, StoreError};
use tokio_util::sync::CancellationToken;

/// mimalloc: the hot paths allocate many small, short-lived buffers across
/// threads, which glibc's allocator handles with far more CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its `mimalloc.h`; the sys crate
/// names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Has mimalloc give freed memory back to the system at once. By default it
/// waits a second and looks again only on a later allocation, so a hub that
/// goes idle after draining a long queue kept the memory of the drain.
fn purge_freed_memory_at_once() {
    // SAFETY: sets a plain integer option; mimalloc reads it at each purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}

#[derive(Parser)]
#[command(
    name = "edgehub",
    version,
    about = "Offline-first edge hub for IoT gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub (with no options: MQTT on 127.0.0.1:1883, storage in ./edgehub-data, no upstream).
    Run(RunArgs),
    /// Validate a TOML config file and say what is wrong, with the line.
    CheckConfig {
        /// The config file.
        file: PathBuf,
    },
    /// Inspect the upstream queue in a storage folder.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Make credentials: SAS tokens and device scope entries.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// Be the cloud on your own broker: provision identities, deploy routes,
    /// twins, direct methods, cloud-to-device messages, telemetry.
    Cloud(edgehub::cloud::CloudArgs),
    /// Work with Wasm plugins without a hub.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Run a plugin over messages (JSON lines) and print one result line per
    /// message. Exits with 1 when a call failed or --expect differs.
    Test(PluginTestArgs),
    /// Compile a plugin into a compiled-plugin cache folder, as the hub does
    /// (in a child process running this command) before it loads a plugin
    /// for the first time. Prints one JSON line: the cache file, the time
    /// taken and the peak memory. Exits with 3 when the plugin does not
    /// compile, the reason on stderr.
    Compile(PluginCompileArgs),
}

#[derive(Args)]
struct PluginCompileArgs {
    /// The plugin component (.wasm; `-` for stdin).
    file: PathBuf,
    /// The cache folder (a hub's is `<storage>/plugin-cache`).
    #[arg(long)]
    cache: PathBuf,
}

#[derive(Args)]
struct PluginTestArgs {
    /// The plugin component (.wasm).
    file: PathBuf,
    /// Messages, one JSON object per line (`-` for stdin).
    #[arg(long, default_value = "-")]
    input: PathBuf,
    /// The plugin's settings: what `host.config()` returns (JSON).
    #[arg(long, default_value = "{}")]
    config: String,
    /// Compare the output with this file and fail on the first difference.
    #[arg(long)]
    expect: Option<PathBuf>,
    /// Call time limit in milliseconds.
    #[arg(long, default_value_t = 100)]
    timeout_ms: u64,
    /// Memory limit of the instance in MiB.
    #[arg(long, default_value_t = 64)]
    memory_mb: usize,
    /// Also time the plugin: run the messages this many more times and print
    /// the mean cost of one call (per message) to stderr.
    #[arg(long, default_value_t = 0)]
    bench: usize,
    /// Cache compiled code in this folder (Python and JavaScript plugins
    /// take seconds to compile).
    #[arg(long)]
    cache: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AuthCommand {
    /// Print a SAS token, as the IoT Hub device SDKs make it.
    Token {
        /// Cloud hub host name (the `HostName` of the connection string).
        #[arg(long)]
        hub: String,
        #[arg(long)]
        device: String,
        #[arg(long)]
        module: Option<String>,
        /// The identity's symmetric key (base64).
        #[arg(long)]
        key: String,
        /// Seconds until the token expires.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
    /// Print a device scope entry with fresh random keys.
    NewIdentity {
        #[arg(long)]
        device: String,
        /// A module of the edge device (then --device is the edge id).
        #[arg(long)]
        module: Option<String>,
        /// The edge device that is the child's parent.
        #[arg(long)]
        parent: Option<String>,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Depth, oldest age and size of the queue (hub stopped or running).
    Stats {
        /// Storage folder (default: the config's, or ./edgehub-data).
        #[arg(long, env = "storageFolder")]
        storage: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Messages the upstream refused, set aside so the queue flows on.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
        /// Storage folder (default: the config's, or ./edgehub-data).
        #[arg(long, env = "storageFolder", global = true)]
        storage: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// One line per dead letter: key, when, reason, topic, size.
    List {
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
        /// Show at most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Queue dead letters again, at the tail, with a fresh time to live.
    Replay(DeadLetterKeys),
    /// Delete dead letters for good.
    Purge(DeadLetterKeys),
}

#[derive(Args)]
#[group(id = "which", required = true, multiple = false)]
struct DeadLetterKeys {
    /// Keys as `list` shows them.
    #[arg(group = "which")]
    keys: Vec<u64>,
    /// Every dead letter.
    #[arg(long, group = "which")]
    all: bool,
}

impl DeadLetterKeys {
    fn selection(self) -> Option<Vec<u64>> {
        (!self.all).then_some(self.keys)
    }
}

/// `edgehub run`: the config file, then every setting as a flag (declared
/// once, in `edgehub::config`), each with its environment variable.
#[derive(Args)]
struct RunArgs {
    /// TOML config file.
    #[arg(long, env = "EDGEHUB_CONFIG", hide_env_values = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: config::Flags,
}

impl RunArgs {
    /// Defaults < the file < environment variables < flags.
    fn into_config(self) -> Result<Config> {
        Config::load(
            self.config.as_deref(),
            |var| std::env::var_os(var),
            &self.settings,
        )
        .context("invalid settings")
    }
}

fn main() -> std::process::ExitCode {
    purge_freed_memory_at_once();
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Run(args) => run(args.into_config()?),
        Command::CheckConfig { file } => check_config(&file),
        Command::Queue {
            command: QueueCommand::Stats { storage, json },
        } => queue_stats(storage.unwrap_or_else(|| Config::default().storage), json),
        Command::Queue {
            command: QueueCommand::DeadLetters { command, storage },
        } => dead_letters(
            storage.unwrap_or_else(|| Config::default().storage),
            command,
        ),
        Command::Auth { command } => auth_command(command),
        Command::Cloud(args) => cloud_command(args),
        Command::Plugin {
            command: PluginCommand::Test(args),
        } => plugin_test(args),
        Command::Plugin {
            command: PluginCommand::Compile(args),
        } => plugin_compile(args),
    }
}

/// Logs go to stderr: human-readable by default, one JSON object per line
/// with `EDGEHUB_LOG_FORMAT=json`; levels from `RUST_LOG`.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,fjall=warn,lsm_tree=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("EDGEHUB_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

fn run(config: Config) -> Result<()> {
    // Plugins compile in a child process running `edgehub plugin compile`.
    match std::env::current_exe() {
        Ok(me) => edgehub::plugins::engine::compile_with(
            me,
            Duration::from_secs(config.plugins.compile_timeout_secs),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot find this program; plugins compile in the hub")
        }
    }
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signals.cancel();
        });
        let mut pause = Duration::ZERO;
        // After a repair: starts refused because the old store is still held.
        let mut locked = None::<u32>;
        loop {
            let started = std::time::Instant::now();
            let stopped = match edgehub::hub::run(config.clone(), shutdown.clone()).await {
                Ok(stopped) => stopped,
                // A request still being answered when the store broke (a
                // metrics scrape, a control call) may hold it a moment longer.
                Err(HubError::Store(StoreError::Locked { .. }))
                    if locked.is_some_and(|n| n < LOCKED_RETRIES) =>
                {
                    locked = locked.map(|n| n + 1);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => return Err(e).context("hub failed"),
            };
            locked = Some(0);
            if stopped == Stopped::Shutdown {
                return Ok(());
            }
            // The store broke while running: start again, which opens and
            // repairs it. A store that breaks again soon after is given
            // longer each time (a disk that keeps failing writes), up to a
            // minute.
            pause = if started.elapsed() > REPAIRED_AFTER {
                Duration::ZERO
            } else {
                (pause * 2).clamp(Duration::from_secs(1), Duration::from_secs(60))
            };
            tracing::warn!(
                pause_ms = pause.as_millis() as u64,
                "starting again to repair the store"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(pause) => {}
            }
        }
    })
}

/// A hub that ran this long since its store was last repaired starts again
/// at once when the store breaks.
const REPAIRED_AFTER: Duration = Duration::from_secs(300);
/// Seconds a start after a repair waits for the old store to be let go.
const LOCKED_RETRIES: u32 = 30;

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn check_config(file: &Path) -> Result<()> {
    let config = Config::from_file(file)?;
    println!(
        "{}: ok (edge_id {}, {} listener(s), {} upstream address(es), storage {})",
        file.display(),
        config.edge_id,
        config.listen.len(),
        config.upstream.addresses.len(),
        config.storage.display()
    );
    Ok(())
}

fn auth_command(command: AuthCommand) -> Result<()> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    match command {
        AuthCommand::Token {
            hub,
            device,
            module,
            key,
            ttl_secs,
        } => {
            let key = b64.decode(key.trim()).context("--key is not base64")?;
            let resource = match module {
                Some(m) => format!("{hub}/devices/{device}/modules/{m}"),
                None => format!("{hub}/devices/{device}"),
            };
            let expiry = edgehub::clock::wall_ms() / 1000 + ttl_secs;
            println!(
                "{}",
                edgehub::auth::sas::make_token(&key, &resource, expiry)
            );
        }
        AuthCommand::NewIdentity {
            device,
            module,
            parent,
        } => {
            use edgehub::auth::scope::{new_key, AuthDoc, IdentityDoc};
            let entry = IdentityDoc {
                device_id: device,
                module_id: module,
                edge: false,
                parent,
                auth: AuthDoc::Sas {
                    primary_key: new_key(),
                    secondary_key: Some(new_key()),
                },
            };
            println!("{}", serde_json::to_string_pretty(&entry)?);
        }
    }
    Ok(())
}

/// `edgehub cloud ...`: one command on the cloud's broker; exits with the
/// command's status (1 for a method answered with an error status).
fn cloud_command(args: edgehub::cloud::CloudArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let status = runtime.block_on(edgehub::cloud::run(args))?;
    if status != 0 {
        std::process::exit(i32::from(status));
    }
    Ok(())
}

/// Dead letters of the hub storing in `storage`: through its control
/// socket while it runs, from the store itself when it is stopped.
fn dead_letters(storage: PathBuf, command: DeadLetterCommand) -> Result<()> {
    use edgehub::control::{self, Answer, Request};
    if !storage.exists() {
        bail!("storage folder {} does not exist", storage.display());
    }
    let (request, json) = match command {
        DeadLetterCommand::List { json, limit } => (Request::ListDeadLetters { limit }, json),
        DeadLetterCommand::Replay(k) => (
            Request::ReplayDeadLetters {
                keys: k.selection(),
            },
            false,
        ),
        DeadLetterCommand::Purge(k) => (
            Request::PurgeDeadLetters {
                keys: k.selection(),
            },
            false,
        ),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answer = match Store::open(&storage) {
        Ok(store) => {
            let (appender, writer) = store::writer::spawn(store.clone(), u64::MAX, 4096);
            let answer = runtime.block_on(control::execute(&store, &appender, request));
            drop(appender);
            let _ = writer.join();
            store.sync()?;
            answer
        }
        Err(StoreError::Locked { .. }) => runtime
            .block_on(control::ask(&storage, &request))
            .context("the hub is running; asking it through its control socket")?,
        Err(e) => return Err(e).context("open the queue"),
    };
    match answer {
        Answer::DeadLetters(list) => {
            for d in list {
                if json {
                    println!("{}", serde_json::to_string(&d)?);
                } else {
                    let topic: String = d.topic.chars().take(120).collect();
                    println!(
                        "{}\t{}\t{} bytes\t{}\t{}",
                        d.key,
                        d.dead_ms,
                        d.payload_bytes,
                        topic.escape_debug(),
                        d.reason
                    );
                }
            }
        }
        Answer::Replayed(n) => println!("replayed {n}"),
        Answer::Purged(n) => println!("purged {n}"),
        Answer::Error(e) => bail!("{e}"),
    }
    Ok(())
}

fn queue_stats(storage: PathBuf, json: bool) -> Result<()> {
    if !storage.exists() {
        bail!("storage folder {} does not exist", storage.display());
    }
    let (depth, bytes, oldest_ms, source) = match Store::open(&storage) {
        Ok(store) => {
            let s = store.stats()?;
            (s.depth, s.bytes, s.oldest_ms, "store")
        }
        Err(StoreError::Locked { .. }) => {
            let s = store::status::read(&storage).with_context(|| {
                format!(
                    "hub is running but {} is unreadable",
                    store::status::path(&storage).display()
                )
            })?;
            (s.depth, s.bytes, s.oldest_ms, "running hub")
        }
        Err(e) => return Err(e).context("open the queue"),
    };
    let age = oldest_ms.map_or(0.0, |ms| {
        edgehub::clock::now_ms().saturating_sub(ms) as f64 / 1000.0
    });
    if json {
        println!(
            "{}",
            serde_json::json!({"depth": depth, "oldest_age_secs": age, "bytes": bytes, "source": source})
        );
    } else {
        println!("depth: {depth}\noldest_age_secs: {age:.3}\nbytes: {bytes}\nsource: {source}");
    }
    Ok(())
}

fn plugin_compile(args: PluginCompileArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let wasm = if args.file.as_os_str() == "-" {
        let mut wasm = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut wasm)
            .context("cannot read the plugin from stdin")?;
        wasm
    } else {
        std::fs::read(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?
    };
    let engine = edgehub::plugins::PluginEngine::new(Some(args.cache.clone()))?;
    match engine.compile_into_cache(&wasm) {
        Ok(path) => {
            let line = serde_json::json!({
                "cache": path,
                "ms": started.elapsed().as_millis() as u64,
                "peak_rss_mib": peak_rss_mib(),
            });
            println!("{line}");
            Ok(())
        }
        Err(edgehub::plugins::PluginError::Compile(why)) => {
            eprintln!("{why}");
            std::process::exit(edgehub::plugins::engine::COMPILE_REFUSED);
        }
        Err(e) => Err(e.into()),
    }
}

/// This process's peak resident memory (`VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    let kib: f64 = kib.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some((kib / 1024.0 * 10.0).round() / 10.0)
}

fn plugin_test(args: PluginTestArgs) -> Result<()> {
    use edgehub::plugins::{jsonl, Limits, Plugin, PluginEngine, PluginLog, Settings};
    use std::io::BufRead;
    let config: serde_json::Value =
        serde_json::from_str(&args.config).context("--config is not JSON")?;
    let wasm = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let engine = PluginEngine::new(args.cache.clone())?;
    let linker = edgehub::plugins::instance::linker(&engine)?;
    let settings = Settings {
        config_json: config.to_string().into(),
        limits: Limits {
            timeout: std::time::Duration::from_millis(args.timeout_ms),
            memory_bytes: args.memory_mb << 20,
            ..Limits::default()
        },
        grants: Default::default(),
    };
    let name = args
        .file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let started = std::time::Instant::now();
    let log = std::sync::Arc::new(PluginLog::new(&name, Default::default()));
    let (plugin, cached) = Plugin::load(&engine, &linker, &name, &wasm, settings, 1, log)
        .with_context(|| format!("{} refused", args.file.display()))?;
    eprintln!(
        "{}: {} plugin, version {}, {} in {} ms",
        args.file.display(),
        plugin.kind.as_str(),
        plugin.digest,
        if cached {
            "loaded from cache"
        } else {
            "compiled"
        },
        started.elapsed().as_millis()
    );
    let input: Box<dyn BufRead> = if args.input.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(&args.input)
                .with_context(|| format!("cannot read {}", args.input.display()))?,
        ))
    };
    let messages = jsonl::read_messages(input)
        .with_context(|| format!("{} is not valid", args.input.display()))?;
    let mut out = Vec::new();
    let summary = jsonl::run(&plugin, &messages, &mut out)?;
    std::io::Write::write_all(&mut std::io::stdout().lock(), &out)?;
    eprintln!(
        "{} messages: {} passed, {} dropped, {} routed, {} failed",
        summary.messages, summary.passed, summary.dropped, summary.routed, summary.failed
    );
    if args.bench > 0 && !messages.is_empty() {
        let (one, batched) = jsonl::bench(&plugin, &messages, args.bench)?;
        eprintln!(
            "bench: {} ns per call ({} calls, one warm instance)",
            one.as_nanos(),
            args.bench * messages.len()
        );
        if let Some(b) = batched {
            eprintln!(
                "bench: {} ns per message in batches of {}",
                b.as_nanos(),
                messages.len()
            );
        }
    }
    if let Some(expect) = &args.expect {
        let want = std::fs::read_to_string(expect)
            .with_context(|| format!("cannot read {}", expect.display()))?;
        let got = String::from_utf8_lossy(&out);
        for (i, (w, g)) in want.lines().zip(got.lines()).enumerate() {
            if w != g {
                bail!(
                    "line {} differs from {}:\n  expected {w}\n  got      {g}",
                    i + 1,
                    expect.display()
                );
            }
        }
        if want.lines().count() != got.lines().count() {
            bail!(
                "{} has {} lines, the output {}",
                expect.display(),
                want.lines().count(),
                got.lines().count()
            );
        }
        eprintln!("output matches {}", expect.display());
    }
    if summary.failed > 0 {
        bail!("{} call(s) failed", summary.failed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn freed_memory_is_purged_at_once() {
        // 15 must name the purge delay in the mimalloc that is linked: its
        // default there is not 0.
        // SAFETY: reads an integer option.
        let get = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_ne!(get(), 0, "the option is mimalloc's purge delay");
        purge_freed_memory_at_once();
        assert_eq!(get(), 0);
    }
}
