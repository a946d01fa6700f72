//! Starting, probing and stopping the processes under test: the upstream
//! Mosquitto, the Mosquitto bridge and edgehub.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::load::Conn;

/// How long a graceful stop (SIGTERM) may take before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// A free loopback port: bind `127.0.0.1:0`, note the port, release it.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Whether we run with effective uid 0 (then Mosquitto needs `user root`,
/// or it drops to the `mosquitto` user and cannot write its persistence file).
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// A child process with its working directory and log file.
pub struct Proc {
    pub name: String,
    pub pid: u32,
    /// Where the process logs (Mosquitto's `log_dest file`, edgehub's stderr).
    pub log: PathBuf,
    /// The process's stdout/stderr.
    pub console: PathBuf,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, dir: &Path, log: PathBuf) -> Result<Proc> {
        let console = dir.join(format!("{name}.console.log"));
        let out = std::fs::File::create(&console)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child.id().context("child has no pid")?;
        Ok(Proc {
            name: name.to_string(),
            pid,
            log,
            console,
            child,
        })
    }

    /// Polls until `port` accepts an MQTT connection (CONNECT/CONNACK, then
    /// DISCONNECT, so no broker logs a broken connection); fails early if the
    /// process exits.
    pub async fn wait_ready(&mut self, port: u16, deadline: Instant) -> Result<()> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before accepting MQTT on {port}; console:\n{}",
                    self.name,
                    tail(&self.console, 20)
                );
            }
            let probe = Conn::connect(loopback(port), "edgehub-bench-probe", true);
            if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(2), probe).await {
                let _ = conn.disconnect().await;
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("timeout: {} does not accept MQTT on {port}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, wait up to `STOP_GRACE`, then SIGKILL. Returns the exit status
    /// text. Mosquitto writes its persistence file on SIGTERM.
    pub async fn stop(&mut self) -> Result<String> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(format!("had already exited: {status}"));
        }
        // No libc dependency: `kill` is a standard utility.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        match tokio::time::timeout(STOP_GRACE, self.child.wait()).await {
            Ok(status) => Ok(status?.to_string()),
            Err(_) => {
                self.child.kill().await?;
                Ok(format!(
                    "did not stop within {} s of SIGTERM; killed",
                    STOP_GRACE.as_secs()
                ))
            }
        }
    }
}

/// Last `n` lines of a text file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Lines of a log that mention errors or warnings, minus the expected noise:
/// "upstream is down" during the outage, and Mosquitto's advice against
/// `user root` (which it needs here to write its persistence file).
pub fn log_problems(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            (lower.contains("error") || lower.contains("warn"))
                && !lower.contains("connection refused")
                && !lower.contains("error creating bridge")
                && !lower.contains("should not be run as root")
        })
        .map(str::to_string)
        .collect()
}

/// Bytes a file, or the regular files under a directory, take on disk.
pub fn disk_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    // Allocated blocks, not lengths: fjall's journals are sparse files of
    // their full size from the start.
    let on_disk = |m: &std::fs::Metadata| m.blocks() * 512;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => return on_disk(&m),
        Ok(_) => {}
        Err(_) => return 0,
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => disk_size(&e.path()),
            Ok(_) => e.metadata().map(|m| on_disk(&m)).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// Knobs of the Mosquitto bridge under test.
#[derive(Debug, Clone)]
pub struct BridgeSettings {
    /// `autosave_interval`: seconds between full snapshots of the in-memory store.
    pub autosave_interval: u32,
    /// `max_inflight_messages` (0 = unlimited); also bounds what the bridge
    /// has unacknowledged towards the upstream.
    pub max_inflight: u32,
}

/// Settings shared by every Mosquitto we start.
fn common_config(port: u16, dir: &Path, as_root: bool) -> String {
    let mut c = String::new();
    let dir = dir.display();
    writeln!(c, "listener {port} 127.0.0.1").unwrap();
    writeln!(c, "allow_anonymous true").unwrap();
    writeln!(c, "log_dest file {dir}/mosquitto.log").unwrap();
    for t in ["error", "warning", "notice", "information"] {
        writeln!(c, "log_type {t}").unwrap();
    }
    if as_root {
        writeln!(c, "user root").unwrap();
    }
    c
}

/// A plain Mosquitto broker without persistence (the local-broker peer).
pub fn plain_config(port: u16, dir: &Path, as_root: bool) -> String {
    common_config(port, dir, as_root)
}

/// The upstream broker. Persistence is on only so the subscriber's session
/// survives the restart between "seed the session" and "drain"; autosave is
/// effectively off (snapshots happen only at shutdown).
pub fn upstream_config(port: u16, dir: &Path, as_root: bool) -> String {
    let mut c = common_config(port, dir, as_root);
    writeln!(c, "persistence true").unwrap();
    writeln!(c, "persistence_location {}/", dir.display()).unwrap();
    writeln!(c, "autosave_interval 0").unwrap();
    // Unlimited queue for the (possibly briefly offline) subscriber and
    // unlimited in-flight towards it, so the upstream is not the limiter.
    writeln!(c, "max_queued_messages 0").unwrap();
    writeln!(c, "max_inflight_messages 0").unwrap();
    c
}

/// Mosquitto as a persistent store-and-forward bridge to `upstream_port`.
pub fn bridge_config(
    port: u16,
    upstream_port: u16,
    dir: &Path,
    as_root: bool,
    settings: &BridgeSettings,
) -> String {
    let mut c = common_config(port, dir, as_root);
    writeln!(c, "persistence true").unwrap();
    writeln!(c, "persistence_location {}/", dir.display()).unwrap();
    writeln!(c, "autosave_interval {}", settings.autosave_interval).unwrap();
    writeln!(c, "autosave_on_changes false").unwrap();
    writeln!(c, "max_queued_messages 0").unwrap();
    writeln!(c, "max_queued_bytes 0").unwrap();
    writeln!(c, "max_inflight_messages {}", settings.max_inflight).unwrap();
    writeln!(c).unwrap();
    writeln!(c, "connection up").unwrap();
    writeln!(c, "address 127.0.0.1:{upstream_port}").unwrap();
    writeln!(c, "topic devices/# out 1").unwrap();
    writeln!(c, "cleansession false").unwrap();
    writeln!(c, "bridge_protocol_version mqttv311").unwrap();
    writeln!(c, "restart_timeout 1").unwrap();
    c
}

/// Writes `config` to `dir/mosquitto.conf` and starts `mosquitto -c` on it.
pub fn start_mosquitto(bin: &Path, name: &str, dir: &Path, config: &str) -> Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, config)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(&conf).current_dir(dir);
    Proc::spawn(name, cmd, dir, dir.join("mosquitto.log"))
}

/// Whether Mosquitto left a persistence file in `dir`.
pub fn has_persistence_file(dir: &Path) -> bool {
    dir.join("mosquitto.db").is_file()
}

/// `edgehub run --listen … --storage … --upstream … --metrics …`.
pub fn start_edgehub(
    bin: &Path,
    dir: &Path,
    port: u16,
    upstream_port: u16,
    metrics_port: u16,
    config: Option<&Path>,
    args: &[String],
) -> Result<Proc> {
    let storage = dir.join("storage");
    std::fs::create_dir_all(&storage)?;
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--storage")
        .arg(&storage)
        .arg("--upstream")
        .arg(format!("mqtt://127.0.0.1:{upstream_port}"))
        .arg("--metrics")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .current_dir(dir);
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    cmd.args(args);
    // Only the command line configures the hub under test.
    for var in [
        "EDGEHUB_CONFIG",
        "EDGEHUB_LISTEN",
        "EDGEHUB_UPSTREAM",
        "EDGEHUB_STORAGE",
        "EDGEHUB_METRICS",
        "EDGEHUB_MAX_QUEUE_BYTES",
        "EDGEHUB_MAX_MESSAGE_BYTES",
        "storageFolder",
        "timeToLiveSecs",
    ] {
        cmd.env_remove(var);
    }
    let console = dir.join("edgehub.console.log");
    Proc::spawn("edgehub", cmd, dir, console)
}

/// A hub config that routes every message through one Rust example plugin:
/// `filter` is the deduplicator keyed by body (every bench message is new,
/// so all pass, after hashing and remembering each one); `passthrough`
/// returns every message unchanged (the cost of the plugin path alone);
/// `router` is the content router (bench payloads are not JSON: each takes
/// the default, upstream). Returns the config file's path.
pub fn plugin_config(dir: &Path, plugins: &Path, kind: &str) -> Result<PathBuf> {
    let (file, route) = match kind {
        "filter" => (
            "dedup",
            r#"FROM /messages/* INTO plugin("dedup") THEN $upstream"#,
        ),
        "passthrough" => (
            "passthrough",
            r#"FROM /messages/* INTO plugin("passthrough") THEN $upstream"#,
        ),
        _ => (
            "content-router",
            r#"FROM /messages/* INTO plugin("content-router")"#,
        ),
    };
    let src = plugins.join(format!("{file}.wasm"));
    let folder = dir.join("plugins");
    std::fs::create_dir_all(&folder)?;
    std::fs::copy(&src, folder.join(format!("{file}.wasm"))).with_context(|| {
        format!(
            "copy {} (build the plugins: bash plugins/build.sh rust)",
            src.display()
        )
    })?;
    let config = format!(
        "[plugins]\nfolder = {folder:?}\n[plugins.settings.dedup]\nconfig = {{ by = \"body\", capacity = 10000 }}\n[routes]\nall = '{route}'\n"
    );
    let path = dir.join("edgehub.toml");
    std::fs::write(&path, config)?;
    Ok(path)
}

/// `GET path` over plain HTTP/1.0; returns the body (used for edgehub's
/// Prometheus endpoint, kept for diagnosis).
pub async fn http_get(port: u16, path: &str) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(loopback(port)).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await??;
    let text = String::from_utf8_lossy(&response).into_owned();
    Ok(match text.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_string(),
        None => text,
    })
}
