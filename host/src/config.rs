//! Hub settings: each declared once, as a field of [`Config`] or one of its
//! sections, and read from the TOML file, the environment and the command
//! line in that order of strength (defaults < file < environment < flags).
//!
//! A field's serde attributes give its file key; its clap attributes give its
//! flag (`--listen`) and, by rule `EDGEHUB_` + the flag, its environment
//! variable, unless the field names an older one (`storageFolder`,
//! `timeToLiveSecs`, `UpstreamProtocol`); its doc comment is its `--help`.
//! The file is parsed with serde so errors name their line; the environment
//! is read one variable at a time so an error names the variable; flags are
//! parsed by clap, whose errors name the flag.
//!
//! This module owns parsing, layering and validation. It does not parse the
//! rest of the command line (the binary flattens [`Flags`] into it) and it
//! does not open anything the settings name.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};
use serde::Deserialize;
use toml::Spanned;

/// Default time-to-live of a stored message, as edgeHub's `timeToLiveSecs`.
pub const DEFAULT_TTL_SECS: u64 = 7200;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {error}")]
    File {
        path: PathBuf,
        error: Box<ConfigError>,
    },
    #[error("{0}")]
    Syntax(String),
    #[error("line {line}: {message}")]
    Invalid { line: usize, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("{flag}: {message}")]
    Flag { flag: String, message: String },
    #[error("{0}")]
    Value(String),
}

/// Everything the hub needs to run.
#[derive(Debug, Clone, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This hub's device id upstream (its client id and topic prefix).
    #[arg(long)]
    pub edge_id: String,
    /// Downstream MQTT listener addresses.
    #[arg(long, value_delimiter = ',')]
    pub listen: Vec<SocketAddr>,
    /// The one folder holding everything durable.
    #[arg(long, env = "storageFolder")]
    pub storage: PathBuf,
    /// Address of the Prometheus endpoint (`/metrics`) and the status page
    /// (`/`), e.g. 127.0.0.1:9600; off when absent.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    #[command(flatten)]
    pub upstream: UpstreamConfig,
    #[command(flatten)]
    pub store: StoreConfig,
    #[command(flatten)]
    pub mqtt: MqttConfig,
    #[command(flatten)]
    pub tls: TlsConfig,
    #[command(flatten)]
    pub auth: crate::auth::AuthConfig,
    #[command(flatten)]
    pub plugins: PluginsConfig,
    /// `[routes]`: `name = "FROM … INTO …"` or `name = { route = "…",
    /// priority = 0, timeToLiveSecs = 60, onError = "drop" }`. Absent: every
    /// upstream-bound message goes upstream. The hub twin's `routes` win.
    #[arg(skip)]
    pub routes: Option<std::collections::BTreeMap<String, serde_json::Value>>,
}

/// The Wasm plugin host (section `[plugins]`).
#[derive(Debug, Clone, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
#[command(next_help_heading = "Plugins ([plugins] in the file)")]
pub struct PluginsConfig {
    /// Where `.wasm` plugins are loaded from and watched
    /// (default: <storage>/plugins).
    #[arg(long = "plugin-folder")]
    pub folder: Option<PathBuf>,
    /// Threads that run plugin calls (default: the number of cores, at most 4).
    #[arg(long = "plugin-workers")]
    pub workers: usize,
    /// Time limit of one plugin call, unless the plugin's settings say
    /// otherwise.
    #[arg(long = "plugin-timeout-ms")]
    pub timeout_ms: u64,
    /// Memory limit of one plugin instance, unless its settings say otherwise.
    #[arg(long = "plugin-memory-mb")]
    pub memory_mb: usize,
    /// Largest result of one plugin call, unless its settings say otherwise.
    #[arg(long = "plugin-max-output-bytes")]
    pub max_output_bytes: usize,
    /// Lines per second one plugin may write to the hub's log (`host.log`):
    /// a token bucket shared by all its instances.
    #[arg(long = "plugin-log-lines-per-sec")]
    pub log_lines_per_sec: u32,
    /// Lines one plugin may log at once before the rate applies.
    #[arg(long = "plugin-log-burst")]
    pub log_burst: u32,
    /// Longest plugin log line, bytes; longer ones are cut.
    #[arg(long = "plugin-log-max-line-bytes")]
    pub log_max_line_bytes: usize,
    /// Largest plugin file; a larger one is refused without being read.
    #[arg(long = "plugin-max-file-mb")]
    pub max_file_mb: u64,
    /// Time limit of compiling one plugin (in a child process); a plugin
    /// whose compile takes longer is refused.
    #[arg(long = "plugin-compile-timeout-secs")]
    pub compile_timeout_secs: u64,
    /// `[plugins.settings.<name>]`: one plugin's config document, limits
    /// and grants.
    #[arg(skip)]
    pub settings: std::collections::BTreeMap<String, PluginSettings>,
}

/// One plugin's settings (`[plugins.settings.<name>]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginSettings {
    /// `config`: what the plugin's `host.config()` returns (as JSON).
    pub config: Option<serde_json::Value>,
    pub timeout_ms: Option<u64>,
    pub memory_mb: Option<usize>,
    pub max_output_bytes: Option<usize>,
    pub log_lines_per_sec: Option<u32>,
    pub log_burst: Option<u32>,
    pub log_max_line_bytes: Option<usize>,
    /// `env`: environment variables the plugin may read.
    pub env: std::collections::BTreeMap<String, String>,
    /// `read_dirs`: host folders the plugin may read (same path inside).
    pub read_dirs: Vec<PathBuf>,
    /// `stdio`: let the plugin's stdout/stderr reach the hub's stderr.
    pub stdio: bool,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        let log = crate::plugins::LogLimit::default();
        Self {
            folder: None,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
            timeout_ms: 100,
            memory_mb: 64,
            max_output_bytes: 1 << 20,
            log_lines_per_sec: log.lines_per_sec,
            log_burst: log.burst,
            log_max_line_bytes: log.max_line_bytes,
            max_file_mb: 256,
            compile_timeout_secs: 300,
            settings: Default::default(),
        }
    }
}

impl PluginsConfig {
    /// The plugins folder for a hub storing in `storage`.
    pub fn folder(&self, storage: &std::path::Path) -> PathBuf {
        self.folder
            .clone()
            .unwrap_or_else(|| storage.join("plugins"))
    }

    /// The default limits, and each configured plugin's own settings.
    pub fn limits_and_settings(
        &self,
    ) -> (
        crate::plugins::Limits,
        std::collections::HashMap<String, crate::plugins::registry::LocalSettings>,
    ) {
        use crate::plugins::{registry::LocalSettings, Grants, Limits, LogLimit};
        let limits = |s: &PluginSettings| Limits {
            timeout: std::time::Duration::from_millis(s.timeout_ms.unwrap_or(self.timeout_ms)),
            memory_bytes: s.memory_mb.unwrap_or(self.memory_mb) << 20,
            max_output_bytes: s.max_output_bytes.unwrap_or(self.max_output_bytes),
            log: LogLimit {
                lines_per_sec: s.log_lines_per_sec.unwrap_or(self.log_lines_per_sec),
                burst: s.log_burst.unwrap_or(self.log_burst),
                max_line_bytes: s.log_max_line_bytes.unwrap_or(self.log_max_line_bytes),
            },
        };
        let settings = self
            .settings
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    LocalSettings {
                        config: s.config.clone(),
                        limits: limits(s),
                        grants: Grants {
                            env: s.env.clone().into_iter().collect(),
                            read_dirs: s.read_dirs.clone(),
                            stdio: s.stdio,
                        },
                    },
                )
            })
            .collect();
        (limits(&PluginSettings::default()), settings)
    }
}

/// The MQTT-over-TLS listener (section `[tls]`).
#[derive(Debug, Clone, Default, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
#[command(next_help_heading = "MQTT over TLS ([tls] in the file)")]
pub struct TlsConfig {
    /// MQTT-over-TLS listener addresses, e.g. 0.0.0.0:8883 (the IoT Hub
    /// device SDKs use 8883).
    #[arg(id = "tls-listen", long, value_delimiter = ',')]
    pub listen: Vec<SocketAddr>,
    /// MQTT over secure WebSocket listener addresses (`wss://`, subprotocol
    /// `mqtt`, any path), e.g. 0.0.0.0:443 (the IoT Hub device SDKs' port
    /// with their websockets option), with the same certificate.
    #[arg(id = "tls-ws-listen", long, value_delimiter = ',')]
    pub ws_listen: Vec<SocketAddr>,
    /// PEM server certificate chain of the TLS listeners (read again when
    /// the file changes: new connections get the new certificate).
    #[arg(id = "tls-cert", long)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the TLS listeners' certificate (read again with
    /// the certificate).
    #[arg(id = "tls-key", long)]
    pub key_file: Option<PathBuf>,
    /// HTTPS listener addresses of the hub's API for modules (direct
    /// method calls between local identities, as edgeHub serves them on
    /// 443), with the same certificate.
    #[arg(id = "api-listen", long, value_delimiter = ',')]
    pub api_listen: Vec<SocketAddr>,
}

impl TlsConfig {
    /// Whether any listener needs the certificate.
    pub fn is_used(&self) -> bool {
        !(self.listen.is_empty() && self.ws_listen.is_empty() && self.api_listen.is_empty())
    }
}

/// The cloud broker (section `[upstream]`).
#[derive(Debug, Clone, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
#[command(next_help_heading = "Upstream ([upstream] in the file)")]
pub struct UpstreamConfig {
    /// Upstream brokers, `mqtt://host:port`, `mqtts://host:port`,
    /// `ws://host:port/path` or `wss://host:port/path` (MQTT over WebSocket,
    /// path `/mqtt` when absent), tried in turn (the nodes of one cluster).
    /// None: store only.
    #[arg(long = "upstream", value_delimiter = ',', value_parser = upstream_address)]
    pub addresses: Vec<Spanned<String>>,
    /// HTTP proxy that tunnels every upstream connection with CONNECT,
    /// `http://[user:password@]host:port`. Absent: the `https_proxy` /
    /// `HTTPS_PROXY` environment variables; empty: none.
    #[arg(long = "upstream-proxy")]
    pub proxy: Option<String>,
    /// Upstream protocol; only MQTT is implemented.
    #[arg(long = "upstream-protocol", env = "UpstreamProtocol")]
    pub protocol: String,
    /// PEM CA bundle that verifies an mqtts:// upstream.
    #[arg(id = "upstream-ca", long)]
    pub ca_file: Option<PathBuf>,
    /// Upstream username.
    #[arg(long = "upstream-username")]
    pub username: Option<String>,
    /// Upstream password.
    #[arg(long = "upstream-password")]
    pub password: Option<String>,
    /// The edge device's own symmetric key (base64): with the hub name, the
    /// hub signs in with a fresh SAS token per connection.
    #[arg(long = "upstream-sas-key")]
    pub sas_key: Option<String>,
    /// The IoT hub host name used in the upstream SAS username and token.
    #[arg(long = "upstream-hub-name")]
    pub hub_name: Option<String>,
    /// PEM client certificate (chain) for mutual TLS upstream.
    #[arg(id = "upstream-cert", long)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the upstream client certificate.
    #[arg(id = "upstream-key", long)]
    pub key_file: Option<PathBuf>,
    /// QoS 1 publishes sent upstream but not yet acknowledged (1..=32768).
    #[arg(long = "upstream-max-inflight")]
    pub max_inflight: usize,
    /// Keep-alive of the upstream connection, seconds.
    #[arg(long = "upstream-keep-alive-secs")]
    pub keep_alive_secs: u16,
    /// Ceiling of the reconnect back-off, milliseconds.
    #[arg(long = "upstream-max-backoff-ms")]
    pub max_backoff_ms: u64,
    /// While connected to any upstream address but the first, probe the
    /// first this often (seconds) and go back to it once two probes in a
    /// row find it up (0: stay until the connection fails).
    #[arg(long = "upstream-failback-secs")]
    pub failback_secs: u64,
    /// Bytes of queued messages sent upstream a second at most, so a drain
    /// after an outage leaves room on a metered or shared link (0: no cap).
    #[arg(long = "upstream-max-bytes-per-sec")]
    pub max_bytes_per_sec: u64,
    /// Percent of the window kept for messages stored since the upstream
    /// connected while those stored before it drain, so fresh data does not
    /// wait behind a backlog (0: none, every lane in store order; at most
    /// 90).
    #[arg(long = "upstream-live-share-percent")]
    pub live_share_percent: u8,
    /// How many times in a row the upstream may refuse the same message
    /// (drop the connection right after it, or answer it with an error)
    /// before it is moved to the dead-letter area (at least 1).
    #[arg(long)]
    pub refusals_before_dead_letter: u32,
    /// MQTT version spoken upstream: `3.1.1` (what IoT Hub speaks) or `5`
    /// (the broker says why it refuses a publish; with 3.1.1 a broker such
    /// as Mosquitto acknowledges a publish it drops for lack of rights).
    #[arg(long = "upstream-mqtt-version", value_parser = mqtt_version)]
    #[serde(deserialize_with = "deserialize_mqtt_version")]
    pub mqtt_version: MqttVersion,
}

/// The MQTT version of the upstream connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MqttVersion {
    #[default]
    V311,
    V5,
}

fn mqtt_version(s: &str) -> Result<MqttVersion, String> {
    match s.trim() {
        "3.1.1" | "3" | "4" => Ok(MqttVersion::V311),
        "5" | "5.0" => Ok(MqttVersion::V5),
        other => Err(format!(
            "MQTT version {other:?} is not supported: use \"3.1.1\" or \"5\""
        )),
    }
}

/// Accepts `"5"`, `5`, `"3.1.1"` (a number or a string).
fn deserialize_mqtt_version<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<MqttVersion, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Float(f64),
        Str(String),
    }
    let text = match Raw::deserialize(d)? {
        Raw::Int(i) => i.to_string(),
        Raw::Float(f) => f.to_string(),
        Raw::Str(s) => s,
    };
    mqtt_version(&text).map_err(serde::de::Error::custom)
}

/// The durable queue (section `[store]`).
#[derive(Debug, Clone, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
#[command(next_help_heading = "Store ([store] in the file)")]
pub struct StoreConfig {
    /// Time-to-live of stored messages, seconds: older ones are not sent and
    /// are counted.
    #[arg(long, env = "timeToLiveSecs")]
    pub ttl_secs: u64,
    /// Quota on queued message bytes; new upstream-bound messages are refused
    /// while it is reached.
    #[arg(long)]
    pub max_queue_bytes: u64,
    /// Free bytes kept on the storage's file system: new upstream-bound
    /// messages are refused while it has no more (0: no floor).
    #[arg(long)]
    pub min_free_bytes: u64,
    /// Most bytes the store's files may take on disk, journals and tables
    /// as allocated (0: no limit).
    #[arg(long)]
    pub max_disk_bytes: u64,
    /// Most messages written by one group commit.
    #[arg(long)]
    pub max_batch: usize,
    /// Longest topic the hub stores, bytes (1..=65535).
    #[arg(long)]
    pub max_topic_bytes: usize,
    /// Cloud-to-device messages one device's queue holds.
    #[arg(long)]
    pub c2d_max_messages: usize,
    /// Bytes one device's cloud-to-device queue holds.
    #[arg(long)]
    pub c2d_max_bytes: usize,
    /// Messages one module input's queue holds.
    #[arg(long)]
    pub module_input_max_messages: usize,
    /// Bytes one module input's queue holds.
    #[arg(long)]
    pub module_input_max_bytes: usize,
}

impl StoreConfig {
    /// How much each child device's cloud-to-device queue holds.
    pub fn c2d_bounds(&self) -> crate::mailbox::Bounds {
        crate::mailbox::Bounds {
            messages: self.c2d_max_messages,
            bytes: self.c2d_max_bytes,
        }
    }

    /// How much each module input's queue holds.
    pub fn module_input_bounds(&self) -> crate::mailbox::Bounds {
        crate::mailbox::Bounds {
            messages: self.module_input_max_messages,
            bytes: self.module_input_max_bytes,
        }
    }
}

/// The downstream MQTT server (section `[mqtt]`).
#[derive(Debug, Clone, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
#[command(next_help_heading = "Downstream MQTT ([mqtt] in the file)")]
pub struct MqttConfig {
    /// Largest accepted MQTT packet, bytes.
    #[arg(long)]
    pub max_message_bytes: usize,
    /// A topic filter whose plain (non IoT Hub) topics go upstream too
    /// (repeatable). IoT Hub telemetry topics always do.
    #[arg(long = "forward-topic")]
    pub forward_topics: Vec<String>,
    /// Downstream connections served at once.
    #[arg(long)]
    pub max_connections: usize,
    /// Messages kept for a disconnected persistent session.
    #[arg(long)]
    pub offline_queue: usize,
    /// Seconds an MQTT 3.1.1 persistent session (clean session off) lives
    /// on once its client is away; MQTT 5 clients say their own.
    #[arg(long)]
    pub session_expiry_secs: u32,
    /// Retained messages kept (across restarts).
    #[arg(long)]
    pub max_retained: usize,
    /// Bytes of retained messages kept (topic and payload).
    #[arg(long)]
    pub max_retained_bytes: usize,
    /// MQTT-over-WebSocket listener addresses (`ws://`, subprotocol `mqtt`,
    /// any path), e.g. 0.0.0.0:80; the TLS ones are `tls.ws_listen`.
    #[arg(long, value_delimiter = ',')]
    pub ws_listen: Vec<SocketAddr>,
    /// Web pages of other sites allowed to open MQTT-over-WebSocket
    /// connections, by their origin (`https://dashboard.plant.example`,
    /// repeatable; `*`: any). A request with no `Origin` header, or with the
    /// hub's own address as its origin (what paho and the SDKs send), is
    /// always served; with none listed, other sites' pages are refused.
    #[arg(long = "ws-allowed-origin", value_delimiter = ',')]
    pub ws_allowed_origins: Vec<String>,
}

impl MqttConfig {
    /// What the local broker keeps.
    pub fn broker_limits(&self) -> crate::broker::Limits {
        crate::broker::Limits {
            offline_queue: self.offline_queue,
            retained_messages: self.max_retained,
            retained_bytes: self.max_retained_bytes,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            edge_id: "edgehub".into(),
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 1883))],
            storage: PathBuf::from("edgehub-data"),
            metrics: None,
            upstream: UpstreamConfig::default(),
            store: StoreConfig::default(),
            mqtt: MqttConfig::default(),
            tls: TlsConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            plugins: PluginsConfig::default(),
            routes: None,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            addresses: Vec::new(),
            proxy: None,
            protocol: "MQTT".into(),
            ca_file: None,
            username: None,
            password: None,
            sas_key: None,
            hub_name: None,
            cert_file: None,
            key_file: None,
            max_inflight: 32_768,
            keep_alive_secs: 30,
            max_backoff_ms: 2000,
            failback_secs: 15,
            max_bytes_per_sec: 0,
            live_share_percent: 0,
            refusals_before_dead_letter: 3,
            mqtt_version: MqttVersion::V311,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            ttl_secs: DEFAULT_TTL_SECS,
            max_queue_bytes: 1 << 30,
            min_free_bytes: 64 << 20,
            max_disk_bytes: 0,
            max_batch: 4096,
            max_topic_bytes: crate::topic::MAX_LEN,
            c2d_max_messages: crate::c2d::DEFAULT_BOUNDS.messages,
            c2d_max_bytes: crate::c2d::DEFAULT_BOUNDS.bytes,
            module_input_max_messages: crate::inputs::DEFAULT_BOUNDS.messages,
            module_input_max_bytes: crate::inputs::DEFAULT_BOUNDS.bytes,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 256 * 1024,
            forward_topics: Vec::new(),
            max_connections: 10_000,
            offline_queue: 1000,
            session_expiry_secs: 7 * 24 * 3600,
            max_retained: crate::broker::Limits::with_offline_queue(0).retained_messages,
            max_retained_bytes: crate::broker::Limits::with_offline_queue(0).retained_bytes,
            ws_listen: Vec::new(),
            ws_allowed_origins: Vec::new(),
        }
    }
}

/// Every setting as a command-line flag, derived from the declarations on
/// [`Config`]: flatten it into a command, then lay it over the file with
/// [`Config::load`]. Clap reads no environment variable through it (they
/// are only named in `--help`): [`Config::with_env`] reads them, so that an
/// error names the variable rather than a flag that was never given.
#[derive(Debug, Clone, Default)]
pub struct Flags(ArgMatches);

impl FromArgMatches for Flags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Self(matches.clone()))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.0 = matches.clone();
        Ok(())
    }
}

impl Args for Flags {
    fn augment_args(cmd: Command) -> Command {
        cmd.args(settings().into_iter().map(|(arg, _)| arg))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

/// Each setting's flag, ready to parse (never required, no default, no
/// environment: what is absent leaves the layer below alone), with the name
/// of its environment variable.
fn settings() -> Vec<(Arg, String)> {
    Config::augment_args(Command::new("settings"))
        .get_arguments()
        .map(|arg| {
            let long = arg.get_long().expect("every setting has a long flag");
            let var = arg.get_env().map_or_else(
                || format!("EDGEHUB_{}", long.to_uppercase().replace('-', "_")),
                |v| v.to_string_lossy().into_owned(),
            );
            let mut arg = arg.clone().required(false).env(None);
            if let Some([name]) = arg.get_value_names() {
                // `id = "tls-listen"` makes the value name `<tls-listen>`.
                let name = name.to_uppercase().replace('-', "_");
                arg = arg.value_name(name);
            }
            if matches!(arg.get_action(), ArgAction::SetTrue) {
                // A switch has an implicit `false` that would always hide the
                // file's value: give it none, and let it be switched off.
                arg = arg
                    .action(ArgAction::Set)
                    .num_args(0..=1)
                    .require_equals(true)
                    .default_missing_value("true")
                    .value_parser(clap::builder::BoolishValueParser::new());
            }
            let with_var = |help: &clap::builder::StyledStr| format!("{help} [env: {var}]");
            if let Some(help) = arg.get_help().map(with_var) {
                arg = arg.help(help);
            }
            if let Some(help) = arg.get_long_help().map(with_var) {
                arg = arg.long_help(help);
            }
            (arg, var)
        })
        .collect()
}

/// A command that parses settings' flags alone (no binary name).
fn parser(settings: &[(Arg, String)]) -> Command {
    Command::new("settings")
        .no_binary_name(true)
        .args(settings.iter().map(|(arg, _)| arg.clone()))
}

fn upstream_address(text: &str) -> Result<Spanned<String>, String> {
    UpstreamAddr::parse(text).map(|_| Spanned::new(0..0, text.to_string()))
}

/// What clap found wrong with a value, without naming a flag (the caller
/// names where the value came from).
fn value_error(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let context = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        Some(ContextValue::Strings(s)) => Some(s.join(", ")),
        _ => None,
    };
    let why = std::error::Error::source(e)
        .map(ToString::to_string)
        .or_else(|| context(ContextKind::ValidValue).map(|v| format!("expected one of {v}")))
        .unwrap_or_else(|| e.kind().to_string());
    match context(ContextKind::InvalidValue) {
        Some(value) => format!("{value:?} is not valid: {why}"),
        None => why,
    }
}

/// An upstream broker address, checked: `mqtt://`, `mqtts://`, `ws://` or
/// `wss://` (MQTT over WebSocket, at `websocket`'s path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAddr {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// MQTT over WebSocket: the HTTP path (with its query) of the endpoint.
    /// `None`: MQTT straight over TCP or TLS.
    pub websocket: Option<String>,
}

/// Path of a `ws://` / `wss://` address given without one.
pub const DEFAULT_WEBSOCKET_PATH: &str = "/mqtt";

impl std::fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match (self.tls, self.websocket.is_some()) {
            (false, false) => "mqtt",
            (true, false) => "mqtts",
            (false, true) => "ws",
            (true, true) => "wss",
        };
        write!(
            f,
            "{scheme}://{}{}",
            self.authority(),
            self.websocket.as_deref().unwrap_or("")
        )
    }
}

impl UpstreamAddr {
    pub fn parse(text: &str) -> Result<Self, String> {
        let url =
            url::Url::parse(text).map_err(|e| format!("bad upstream address {text:?}: {e}"))?;
        let (tls, websocket) = match url.scheme() {
            "mqtt" | "tcp" => (false, false),
            "mqtts" | "ssl" => (true, false),
            "ws" => (false, true),
            "wss" => (true, true),
            other => {
                return Err(format!(
                    "bad upstream address {text:?}: scheme {other:?} is not mqtt://, mqtts://, ws:// or wss://"
                ))
            }
        };
        let host = url
            .host_str()
            .ok_or_else(|| format!("bad upstream address {text:?}: no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let default_port = match (tls, websocket) {
            (false, false) => 1883,
            (true, false) => 8883,
            (false, true) => 80,
            (true, true) => 443,
        };
        // `port()` is `None` for a scheme's own default (ws 80, wss 443).
        let port = url.port().unwrap_or(default_port);
        let websocket = websocket.then(|| {
            // "ws://host:port" names no path (the URL still says "/"), while
            // "ws://host:port/" names the root.
            let named = url.path() != "/" || url.query().is_some() || text.ends_with('/');
            if !named {
                return DEFAULT_WEBSOCKET_PATH.to_string();
            }
            match url.query() {
                Some(q) => format!("{}?{q}", url.path()),
                None => url.path().to_string(),
            }
        });
        Ok(Self {
            host,
            port,
            tls,
            websocket,
        })
    }

    /// `host:port`, with an IPv6 host in brackets.
    pub fn authority(&self) -> String {
        authority(&self.host, self.port)
    }
}

/// `host:port`, with an IPv6 host in brackets.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An HTTP proxy that tunnels the upstream connection (`CONNECT`), checked:
/// `http://[user:password@]host[:port]`, or bare `host:port`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyAddr {
    pub host: String,
    pub port: u16,
    /// Basic authentication, percent-decoded.
    pub credentials: Option<(String, String)>,
}

/// Port of a proxy address given without one (as curl assumes).
pub const DEFAULT_PROXY_PORT: u16 = 1080;

impl ProxyAddr {
    /// Parses a proxy address. Errors never repeat the text: it may hold a
    /// password.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let full = if text.contains("://") {
            text.to_string()
        } else {
            format!("http://{text}")
        };
        let url = url::Url::parse(&full).map_err(|e| format!("bad proxy address: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!(
                "bad proxy address: scheme {:?} is not http:// (the hub speaks plain HTTP CONNECT to its proxy)",
                url.scheme()
            ));
        }
        if url.path() != "/" || url.query().is_some() {
            return Err("bad proxy address: a proxy address has no path".into());
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("bad proxy address: no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        // `port()` hides an explicit ":80"; an address without any port
        // gets the proxy default instead.
        let port = match url.port() {
            Some(port) => port,
            None if full.trim_end_matches('/').ends_with(":80") => 80,
            None => DEFAULT_PROXY_PORT,
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| "bad proxy address: credentials are not UTF-8".to_string())
        };
        let credentials = match (url.username(), url.password()) {
            ("", None) => None,
            (user, password) => Some((decode(user)?, decode(password.unwrap_or(""))?)),
        };
        Ok(Self {
            host,
            port,
            credentials,
        })
    }
}

/// Shows where the proxy is, never its credentials.
impl std::fmt::Display for ProxyAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}", authority(&self.host, self.port))
    }
}

impl std::fmt::Debug for ProxyAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let user = self.credentials.as_ref().map(|(u, _)| u.as_str());
        f.debug_struct("ProxyAddr")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &user)
            .finish()
    }
}

impl Config {
    /// Parses and validates TOML text. Errors carry the line they concern.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config = Self::parse(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a config file on its own.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let config = Self::read(path)?;
        config.validate().map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            error: Box::new(e),
        })?;
        Ok(config)
    }

    /// The settings of a run: the defaults, the file (when there is one), the
    /// environment (`var` looks a variable up) and the flags, each over the
    /// one before. Each setting's own rules are checked as each layer sets
    /// it, the rules between settings once, on the result.
    pub fn load(
        file: Option<&Path>,
        var: impl Fn(&str) -> Option<OsString>,
        flags: &Flags,
    ) -> Result<Self, ConfigError> {
        let config = match file {
            Some(path) => {
                let config = Self::read(path)?;
                config.check_values().map_err(|e| ConfigError::File {
                    path: path.to_path_buf(),
                    error: Box::new(e),
                })?;
                config
            }
            None => Self::default(),
        };
        let config = config.with_env(var)?.with_flags(flags)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without checking the rules between settings.
    fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            match line {
                Some(line) => ConfigError::Invalid {
                    line,
                    message: e.message().to_string(),
                },
                None => ConfigError::Syntax(e.to_string()),
            }
        })?;
        for addr in &config.upstream.addresses {
            UpstreamAddr::parse(addr.get_ref()).map_err(|message| ConfigError::Invalid {
                line: line_of(text, addr.span().start),
                message,
            })?;
        }
        Ok(config)
    }

    fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            error: Box::new(e),
        })
    }

    /// Lays the environment over these settings: each setting's variable
    /// that is set and not empty, read as its flag would be.
    pub fn with_env(mut self, var: impl Fn(&str) -> Option<OsString>) -> Result<Self, ConfigError> {
        let settings = settings();
        let parser = parser(&settings);
        for (arg, name) in &settings {
            if let Some(value) = var(name).filter(|v| !v.is_empty()) {
                self.set(&parser, arg, [value])
                    .map_err(|message| ConfigError::Env {
                        var: name.clone(),
                        message,
                    })?;
            }
        }
        Ok(self)
    }

    /// Lays the flags over these settings: each one given wins.
    pub fn with_flags(mut self, flags: &Flags) -> Result<Self, ConfigError> {
        let settings = settings();
        let parser = parser(&settings);
        for (arg, _) in &settings {
            let id = arg.get_id().as_str();
            if flags.0.value_source(id) != Some(clap::parser::ValueSource::CommandLine) {
                continue;
            }
            let values = flags.0.get_raw(id).into_iter().flatten();
            self.set(&parser, arg, values.map(OsStr::to_os_string))
                .map_err(|message| ConfigError::Flag {
                    flag: format!("--{}", arg.get_long().unwrap_or_default()),
                    message,
                })?;
        }
        Ok(self)
    }

    /// Sets one setting from the values of its flag, and checks it.
    fn set(
        &mut self,
        parser: &Command,
        arg: &Arg,
        values: impl IntoIterator<Item = OsString>,
    ) -> Result<(), String> {
        let long = arg.get_long().unwrap_or_default();
        let argv = values.into_iter().map(|value| {
            let mut flag = OsString::from(format!("--{long}="));
            flag.push(value);
            flag
        });
        let matches = parser
            .clone()
            .try_get_matches_from(argv)
            .map_err(|e| value_error(&e))?;
        self.update_from_arg_matches(&matches)
            .map_err(|e| e.to_string())?;
        self.check_values().map_err(|e| e.to_string())
    }

    /// Checks what the type system cannot: each setting's own rules, then
    /// the rules between settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_values()?;
        let bad = |m: String| Err(ConfigError::Value(m));
        for addr in self.upstream_addresses()? {
            if addr.tls && self.upstream.ca_file.is_none() {
                return bad(format!("upstream {addr} uses TLS: set upstream.ca_file"));
            }
        }
        if self.upstream.sas_key.is_some() != self.upstream.hub_name.is_some() {
            return bad("upstream.sas_key and upstream.hub_name go together".into());
        }
        if self.upstream.cert_file.is_some() != self.upstream.key_file.is_some() {
            return bad("upstream.cert_file and upstream.key_file go together".into());
        }
        if self.tls.is_used() && (self.tls.cert_file.is_none() || self.tls.key_file.is_none()) {
            return bad(
                "tls.listen, tls.ws_listen and tls.api_listen need tls.cert_file and tls.key_file"
                    .into(),
            );
        }
        self.route_table()?;
        Ok(())
    }

    /// The rules of single settings, checked again each time the
    /// environment or a flag sets one, so that an error names its source.
    fn check_values(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Value(m));
        if !self.upstream.protocol.eq_ignore_ascii_case("MQTT") {
            return bad(format!(
                "UpstreamProtocol {:?} is not supported: only MQTT is",
                self.upstream.protocol
            ));
        }
        if self.edge_id.is_empty() || self.edge_id.contains(['/', '+', '#']) {
            return bad(format!(
                "edge_id {:?} must be non-empty without / + #",
                self.edge_id
            ));
        }
        if self.listen.is_empty() {
            return bad("listen: at least one address is needed".into());
        }
        if let Some(proxy) = self.upstream.proxy.as_deref().filter(|p| !p.is_empty()) {
            ProxyAddr::parse(proxy)
                .map_err(|e| ConfigError::Value(format!("upstream.proxy: {e}")))?;
        }
        if let Some(key) = &self.upstream.sas_key {
            use base64::Engine;
            if base64::engine::general_purpose::STANDARD
                .decode(key)
                .map_or(true, |k| k.is_empty())
            {
                return bad("upstream.sas_key is not base64".into());
            }
        }
        if self.upstream.max_inflight == 0 || self.upstream.max_inflight > 32_768 {
            return bad("upstream.max_inflight must be within 1..=32768".into());
        }
        if self.upstream.live_share_percent > 90 {
            return bad("upstream.live_share_percent must be within 0..=90 (the backlog keeps at least 10 % of the window)".into());
        }
        if self.upstream.refusals_before_dead_letter == 0 {
            return bad("upstream.refusals_before_dead_letter must be at least 1".into());
        }
        if self.store.ttl_secs == 0 {
            return bad("store.ttl_secs must be at least 1".into());
        }
        if self.store.max_batch == 0 {
            return bad("store.max_batch must be at least 1".into());
        }
        if !(1..=65535).contains(&self.store.max_topic_bytes) {
            return bad(format!(
                "store.max_topic_bytes must be within 1..=65535 (MQTT's longest topic), not {}",
                self.store.max_topic_bytes
            ));
        }
        if self.mqtt.max_message_bytes < 64 {
            return bad("mqtt.max_message_bytes must be at least 64".into());
        }
        let (default_limits, plugin_limits) = self.plugins.limits_and_settings();
        let logs = std::iter::once(("plugins".to_string(), default_limits.log)).chain(
            plugin_limits
                .into_iter()
                .map(|(name, s)| (format!("plugins.settings.{name}"), s.limits.log)),
        );
        for (section, log) in logs {
            if log.lines_per_sec == 0 || log.burst == 0 || log.max_line_bytes == 0 {
                return bad(format!(
                    "{section}: log_lines_per_sec, log_burst and log_max_line_bytes must be at least 1"
                ));
            }
        }
        for filter in &self.mqtt.forward_topics {
            if !crate::topic::valid_filter(filter) {
                return bad(format!(
                    "mqtt.forward_topics: {filter:?} is not a valid topic filter"
                ));
            }
        }
        let plugins = &self.plugins;
        if [plugins.workers, plugins.memory_mb].contains(&0)
            || [
                plugins.timeout_ms,
                plugins.compile_timeout_secs,
                plugins.max_file_mb,
            ]
            .contains(&0)
        {
            return bad(
                "plugins.workers, timeout_ms, memory_mb, max_file_mb and compile_timeout_secs must be at least 1"
                    .into(),
            );
        }
        Ok(())
    }

    /// The configured route table (`None` when `[routes]` is absent).
    pub fn route_table(&self) -> Result<Option<crate::routing::rules::RouteTable>, ConfigError> {
        let Some(routes) = &self.routes else {
            return Ok(None);
        };
        let json = serde_json::Value::Object(routes.clone().into_iter().collect());
        crate::routing::rules::RouteTable::from_json(&json)
            .map(Some)
            .map_err(|errors| {
                let text = errors
                    .iter()
                    .map(|(name, e)| {
                        let route = routes.get(name).and_then(|r| match r {
                            serde_json::Value::String(s) => Some(s.as_str()),
                            r => r.get("route").and_then(|t| t.as_str()),
                        });
                        match route {
                            Some(text) if e.position > 0 => {
                                format!("routes.{name}: {e}\n{}", e.render(text))
                            }
                            _ => format!("routes.{name}: {e}"),
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                ConfigError::Value(text)
            })
    }

    pub fn upstream_addresses(&self) -> Result<Vec<UpstreamAddr>, ConfigError> {
        self.upstream
            .addresses
            .iter()
            .map(|a| UpstreamAddr::parse(a.get_ref()).map_err(ConfigError::Value))
            .collect()
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_embedded_default() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.store.ttl_secs, DEFAULT_TTL_SECS);
        assert!(c.upstream.addresses.is_empty());
        assert_eq!(c.listen[0].port(), 1883);
    }

    #[test]
    fn routes_and_plugin_settings_are_read_and_bad_routes_point_at_the_error() {
        let c = Config::from_toml(
            "[routes]\nall = \"FROM /messages/* INTO $upstream\"\nhot = { route = \"FROM /messages/* WHERE t > 30 INTO plugin(\\\"f\\\")\", priority = 1, timeToLiveSecs = 60 }\n[plugins.settings.f]\nconfig = { above = 30 }\nmemory_mb = 8\n",
        )
        .unwrap();
        let table = c.route_table().unwrap().unwrap();
        assert_eq!(table.routes().len(), 2);
        let (_, settings) = c.plugins.limits_and_settings();
        assert_eq!(settings["f"].limits.memory_bytes, 8 << 20);
        assert_eq!(settings["f"].config, Some(serde_json::json!({"above": 30})));
        assert_eq!(
            settings["f"].limits.log,
            crate::plugins::LogLimit::default(),
            "log limits default to [plugins]'s"
        );
        let err = Config::from_toml("[routes]\nr = \"FROM /messages/* INTO $upstrem\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("routes.r: column 23"), "{err}");
    }

    #[test]
    fn plugin_log_limits_come_from_plugins_and_each_plugin_may_override_them() {
        let c = Config::from_toml(
            "[plugins]\nlog_lines_per_sec = 5\nlog_burst = 7\n[plugins.settings.chatty]\nlog_lines_per_sec = 50\nlog_max_line_bytes = 64\n",
        )
        .unwrap();
        let (defaults, settings) = c.plugins.limits_and_settings();
        let d = defaults.log;
        assert_eq!((d.lines_per_sec, d.burst, d.max_line_bytes), (5, 7, 1024));
        let p = settings["chatty"].limits.log;
        assert_eq!((p.lines_per_sec, p.burst, p.max_line_bytes), (50, 7, 64));
        let err = Config::from_toml("[plugins.settings.mute]\nlog_burst = 0\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("plugins.settings.mute: log_lines_per_sec"),
            "{err}"
        );
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let err = Config::from_toml("edge_id = \"a\"\n\nstorage = [\n").unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn an_unknown_key_names_its_line() {
        let err = Config::from_toml("edge_id = \"a\"\n[store]\nttl = 5\n").unwrap_err();
        assert!(err.to_string().starts_with("line 3"), "{err}");
    }

    #[test]
    fn a_bad_upstream_address_names_its_line() {
        let text = "[upstream]\naddresses = [\n  \"mqtt://a:1\",\n  \"http://b\",\n]\n";
        let err = Config::from_toml(text).unwrap_err();
        assert!(err.to_string().starts_with("line 4"), "{err}");
    }

    #[test]
    fn only_mqtt_is_an_upstream_protocol() {
        let err = Config::from_toml("[upstream]\nprotocol = \"AMQP\"\n").unwrap_err();
        assert!(err.to_string().contains("UpstreamProtocol"), "{err}");
    }

    /// Flags as `edgehub run` parses them, from words split at spaces.
    fn flags(args: &str) -> Flags {
        let cmd = Flags::augment_args(Command::new("run").no_binary_name(true));
        let matches = cmd.try_get_matches_from(args.split_whitespace()).unwrap();
        Flags::from_arg_matches(&matches).unwrap()
    }

    /// An environment holding only `vars`.
    fn env<'a>(vars: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.into())
    }

    fn layered(file: &str, vars: &[(&str, &str)], args: &str) -> Result<Config, ConfigError> {
        let c = Config::parse(file)?
            .with_env(env(vars))?
            .with_flags(&flags(args))?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn a_file_setting_is_overridden_by_the_environment_and_that_by_a_flag() {
        let file = "edge_id = \"from-file\"\n[store]\nttl_secs = 10\nmax_batch = 7\n";
        let c = layered(file, &[], "").unwrap();
        assert_eq!((c.store.ttl_secs, c.edge_id.as_str()), (10, "from-file"));
        let vars = [("timeToLiveSecs", "20"), ("EDGEHUB_EDGE_ID", "from-env")];
        let c = layered(file, &vars, "").unwrap();
        assert_eq!((c.store.ttl_secs, c.edge_id.as_str()), (20, "from-env"));
        let c = layered(file, &vars, "--ttl-secs 30").unwrap();
        assert_eq!((c.store.ttl_secs, c.edge_id.as_str()), (30, "from-env"));
        assert_eq!(
            c.store.max_batch, 7,
            "a setting no layer above names keeps the file's value"
        );
    }

    #[test]
    fn a_switch_left_out_keeps_the_file_value_and_can_be_switched_either_way() {
        let file = "[auth]\nallow_anonymous = true\n";
        assert!(layered(file, &[], "").unwrap().auth.allow_anonymous);
        let off = layered(file, &[], "--allow-anonymous=false").unwrap();
        assert!(!off.auth.allow_anonymous);
        let off = layered(file, &[("EDGEHUB_ALLOW_ANONYMOUS", "no")], "").unwrap();
        assert!(!off.auth.allow_anonymous);
        let on = layered("", &[], "--allow-anonymous").unwrap();
        assert!(on.auth.allow_anonymous);
    }

    #[test]
    fn the_edgehub_names_and_comma_separated_lists_are_read_from_the_environment() {
        let vars = [
            ("storageFolder", "/data/hub"),
            ("timeToLiveSecs", "60"),
            ("UpstreamProtocol", "mqtt"),
            ("EDGEHUB_UPSTREAM", "mqtt://a:1,mqtt://b:2"),
            ("EDGEHUB_LISTEN", "127.0.0.1:1,127.0.0.1:2"),
            ("EDGEHUB_HUB_NAMES", "one.example,two.example"),
            ("EDGEHUB_METRICS", ""),
        ];
        let c = layered("", &vars, "").unwrap();
        assert_eq!(c.storage, PathBuf::from("/data/hub"));
        assert_eq!(c.store.ttl_secs, 60);
        assert_eq!(c.upstream.protocol, "mqtt");
        let ports: Vec<_> = c
            .upstream_addresses()
            .unwrap()
            .iter()
            .map(|a| a.port)
            .collect();
        assert_eq!(ports, [1, 2]);
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.auth.hub_names, ["one.example", "two.example"]);
        assert_eq!(c.metrics, None, "an empty variable counts as unset");
    }

    #[test]
    fn the_run_flags_keep_their_names() {
        let args = "--listen=127.0.0.1:5 --upstream mqtts://up:9 --upstream-ca ca.pem \
            --storage s --edge-id e --ttl-secs 9 --metrics 127.0.0.1:6 --max-queue-bytes 99 \
            --max-message-bytes 100 --forward-topic a/# --forward-topic b/+ \
            --tls-listen 127.0.0.1:7 --tls-cert c.pem --tls-key k.pem --hub-name h \
            --device-ca d.pem --master-key-file m.key --upstream-protocol MQTT";
        let c = layered("", &[], args).unwrap();
        assert_eq!(c.upstream.addresses[0].get_ref(), "mqtts://up:9");
        assert_eq!(c.mqtt.forward_topics, ["a/#", "b/+"]);
        assert_eq!(c.auth.ca_file, Some(PathBuf::from("d.pem")));
        assert_eq!(c.auth.master_key_file, Some(PathBuf::from("m.key")));
        assert_eq!(c.tls.key_file, Some(PathBuf::from("k.pem")));
        assert_eq!(c.store.max_queue_bytes, 99);
    }

    #[test]
    fn websocket_listeners_come_from_the_file_the_environment_and_flags() {
        let file =
            "[mqtt]\nws_listen = [\"127.0.0.1:80\"]\n[tls]\nws_listen = [\"127.0.0.1:443\"]\n\
            cert_file = \"c.pem\"\nkey_file = \"k.pem\"\n";
        let c = layered(file, &[], "").unwrap();
        assert_eq!(c.mqtt.ws_listen[0].port(), 80);
        assert_eq!(c.tls.ws_listen[0].port(), 443);
        let vars = [
            ("EDGEHUB_WS_LISTEN", "127.0.0.1:81,127.0.0.1:82"),
            ("EDGEHUB_TLS_WS_LISTEN", "127.0.0.1:444"),
        ];
        let c = layered(file, &vars, "--tls-ws-listen 127.0.0.1:445").unwrap();
        assert_eq!(c.mqtt.ws_listen.len(), 2);
        assert_eq!(c.tls.ws_listen[0].port(), 445);
        let err = layered("", &[], "--tls-ws-listen 127.0.0.1:443").unwrap_err();
        assert!(err.to_string().contains("tls.ws_listen"), "{err}");
    }

    #[test]
    fn an_environment_variable_with_a_bad_value_names_the_variable() {
        let err = layered("", &[("timeToLiveSecs", "soon")], "").unwrap_err();
        let err = err.to_string();
        assert!(
            err.starts_with("environment variable timeToLiveSecs: \"soon\""),
            "{err}"
        );
        let err = layered("", &[("EDGEHUB_UPSTREAM", "mqtt://a,http://b")], "").unwrap_err();
        assert!(
            err.to_string().contains("EDGEHUB_UPSTREAM: \"http://b\""),
            "{err}"
        );
        let err = layered("", &[("EDGEHUB_UPSTREAM_MAX_INFLIGHT", "0")], "").unwrap_err();
        let err = err.to_string();
        assert!(
            err.starts_with("environment variable EDGEHUB_UPSTREAM_MAX_INFLIGHT: "),
            "{err}"
        );
        assert!(err.contains("1..=32768"), "{err}");
        let err = layered("", &[("EDGEHUB_UPSTREAM_LIVE_SHARE_PERCENT", "95")], "").unwrap_err();
        assert!(err.to_string().contains("0..=90"), "{err}");
        let ok = layered("", &[("EDGEHUB_UPSTREAM_LIVE_SHARE_PERCENT", "25")], "").unwrap();
        assert_eq!(ok.upstream.live_share_percent, 25);
    }

    #[test]
    fn plugin_file_size_and_compile_time_limits_come_from_every_layer_and_zero_is_refused() {
        assert_eq!(Config::default().plugins.compile_timeout_secs, 300);
        let file = layered("[plugins]\ncompile_timeout_secs = 60\n", &[], "").unwrap();
        assert_eq!(file.plugins.compile_timeout_secs, 60);
        let env = [("EDGEHUB_PLUGIN_COMPILE_TIMEOUT_SECS", "30")];
        let flag = layered("", &env, "--plugin-compile-timeout-secs 10").unwrap();
        assert_eq!(flag.plugins.compile_timeout_secs, 10);
        let err = layered("", &[], "--plugin-compile-timeout-secs 0").unwrap_err();
        assert!(
            err.to_string()
                .contains("compile_timeout_secs must be at least 1"),
            "{err}"
        );
        assert_eq!(Config::default().plugins.max_file_mb, 256);
        let env = [("EDGEHUB_PLUGIN_MAX_FILE_MB", "8")];
        assert_eq!(layered("", &env, "").unwrap().plugins.max_file_mb, 8);
        let err = layered("[plugins]\nmax_file_mb = 0\n", &[], "").unwrap_err();
        assert!(err.to_string().contains("max_file_mb"), "{err}");
    }

    #[test]
    fn a_flag_breaking_a_rule_names_the_flag() {
        let err = layered("", &[], "--max-batch 0").unwrap_err().to_string();
        assert!(
            err.starts_with("--max-batch: store.max_batch must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn the_upstream_mqtt_version_is_3_1_1_unless_5_is_asked_for_in_any_spelling() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.upstream.mqtt_version, MqttVersion::V311);
        for file in [
            "mqtt_version = 5",
            "mqtt_version = \"5\"",
            "mqtt_version = 5.0",
        ] {
            let c = Config::from_toml(&format!("[upstream]\n{file}\n")).unwrap();
            assert_eq!(c.upstream.mqtt_version, MqttVersion::V5, "{file}");
        }
        let c = layered(
            "[upstream]\nmqtt_version = 5\n",
            &[],
            "--upstream-mqtt-version 3.1.1",
        );
        assert_eq!(c.unwrap().upstream.mqtt_version, MqttVersion::V311);
        let err = Config::from_toml("[upstream]\nmqtt_version = \"6\"\n").unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("line 2") && err.contains("use \"3.1.1\" or \"5\""),
            "{err}"
        );
    }

    #[test]
    fn the_topic_limit_and_the_refusals_before_dead_letter_have_defaults_ranges_and_layers() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.store.max_topic_bytes, 65535);
        assert_eq!(c.upstream.refusals_before_dead_letter, 3);
        let file = "[store]\nmax_topic_bytes = 100\n[upstream]\nrefusals_before_dead_letter = 2\n";
        let vars = [
            ("EDGEHUB_MAX_TOPIC_BYTES", "1024"),
            ("EDGEHUB_REFUSALS_BEFORE_DEAD_LETTER", "5"),
        ];
        let c = layered(file, &vars, "").unwrap();
        assert_eq!(c.store.max_topic_bytes, 1024);
        assert_eq!(c.upstream.refusals_before_dead_letter, 5);
        let c = layered(
            file,
            &vars,
            "--max-topic-bytes 512 --refusals-before-dead-letter 1",
        );
        let c = c.unwrap();
        assert_eq!(c.store.max_topic_bytes, 512);
        assert_eq!(c.upstream.refusals_before_dead_letter, 1);

        for file in [
            "[store]\nmax_topic_bytes = 0\n",
            "[store]\nmax_topic_bytes = 65536\n",
        ] {
            let err = Config::from_toml(file).unwrap_err().to_string();
            assert!(
                err.contains("store.max_topic_bytes must be within 1..=65535"),
                "{err}"
            );
        }
        let err = Config::from_toml("[upstream]\nrefusals_before_dead_letter = 0\n").unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("refusals_before_dead_letter must be at least 1"),
            "{err}"
        );
        let err = layered("", &[("EDGEHUB_MAX_TOPIC_BYTES", "70000")], "").unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("EDGEHUB_MAX_TOPIC_BYTES") && err.contains("1..=65535"),
            "{err}"
        );
        let err = layered("", &[], "--refusals-before-dead-letter 0").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--refusals-before-dead-letter: "),
            "{err}"
        );
    }

    #[test]
    fn no_file_no_environment_and_no_flags_give_the_embedded_default() {
        let c = Config::load(None, env(&[]), &flags("")).unwrap();
        assert!(c.upstream.addresses.is_empty());
        assert_eq!(c.storage, Config::default().storage);
    }

    #[test]
    fn every_setting_has_its_own_flag_and_variable() {
        let settings = settings();
        parser(&settings).debug_assert();
        let mut vars: Vec<_> = settings.iter().map(|(_, var)| var.as_str()).collect();
        vars.sort_unstable();
        let count = vars.len();
        vars.dedup();
        assert_eq!(vars.len(), count, "two settings share a variable");
        for derived in ["EDGEHUB_MAX_BATCH", "EDGEHUB_PLUGIN_WORKERS"] {
            assert!(vars.contains(&derived), "no {derived} in {vars:?}");
        }
    }

    #[test]
    fn upstream_addresses_parse_with_default_ports() {
        assert_eq!(
            UpstreamAddr::parse("mqtts://hub.example").unwrap(),
            UpstreamAddr {
                host: "hub.example".into(),
                port: 8883,
                tls: true,
                websocket: None,
            }
        );
        assert_eq!(
            UpstreamAddr::parse("mqtt://[::1]:1999").unwrap().host,
            "::1"
        );
    }

    #[test]
    fn websocket_addresses_parse_with_default_ports_and_the_mqtt_path() {
        let ws = UpstreamAddr::parse("ws://127.0.0.1:9001").unwrap();
        assert_eq!((ws.port, ws.tls), (9001, false));
        assert_eq!(ws.websocket.as_deref(), Some("/mqtt"));
        assert_eq!(ws.to_string(), "ws://127.0.0.1:9001/mqtt");
        let wss = UpstreamAddr::parse("wss://hub.example/mqtt").unwrap();
        assert_eq!((wss.port, wss.tls), (443, true));
        assert_eq!(wss.websocket.as_deref(), Some("/mqtt"));
        assert_eq!(UpstreamAddr::parse("ws://h").unwrap().port, 80);
        assert_eq!(UpstreamAddr::parse("wss://h:8443/x").unwrap().port, 8443);
        assert_eq!(
            UpstreamAddr::parse("wss://h/$iothub/websocket?iothub-no-client-cert=true")
                .unwrap()
                .websocket
                .as_deref(),
            Some("/$iothub/websocket?iothub-no-client-cert=true")
        );
        assert_eq!(
            UpstreamAddr::parse("ws://h:1/")
                .unwrap()
                .websocket
                .as_deref(),
            Some("/"),
            "a trailing slash names the root"
        );
        assert_eq!(
            UpstreamAddr::parse("ws://[::1]:9001/mqtt")
                .unwrap()
                .to_string(),
            "ws://[::1]:9001/mqtt"
        );
        assert_eq!(UpstreamAddr::parse("mqtt://h").unwrap().websocket, None);
        let err = UpstreamAddr::parse("http://h").unwrap_err();
        assert!(err.contains("ws://"), "{err}");
    }

    #[test]
    fn wss_needs_the_ca_file_like_mqtts() {
        let err = Config::from_toml("[upstream]\naddresses = [\"wss://h/mqtt\"]\n").unwrap_err();
        assert!(err.to_string().contains("ca_file"), "{err}");
    }

    #[test]
    fn proxy_addresses_parse_with_credentials_and_default_port() {
        let p = ProxyAddr::parse("http://al%40ce:s3cr%3At@proxy.corp:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        assert_eq!(
            p.credentials,
            Some(("al@ce".to_string(), "s3cr:t".to_string()))
        );
        assert_eq!(p.to_string(), "http://proxy.corp:3128");
        assert!(
            !format!("{p:?}").contains("s3cr"),
            "Debug hides the password"
        );
        let bare = ProxyAddr::parse("10.0.0.1:8080").unwrap();
        assert_eq!((bare.host.as_str(), bare.port), ("10.0.0.1", 8080));
        assert_eq!(bare.credentials, None);
        assert_eq!(ProxyAddr::parse("http://proxy/").unwrap().port, 1080);
        assert_eq!(ProxyAddr::parse("http://proxy:80").unwrap().port, 80);
        let err = ProxyAddr::parse("https://u:hunter2@proxy:3128").unwrap_err();
        assert!(err.contains("http://") && !err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_bad_proxy_setting_is_refused_without_echoing_its_password() {
        let err = Config::from_toml("[upstream]\nproxy = \"socks5://u:hunter2@p:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstream.proxy"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(Config::from_toml("[upstream]\nproxy = \"\"\n").is_ok());
    }
}
