//! Hub settings: the TOML file format, its defaults, and validation.
//!
//! Owns turning text into a checked [`Config`]. It does not read flags or the
//! environment (the binary layers those over the file) and it does not open
//! anything the settings name.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

/// Default time-to-live of a stored message, as edgeHub's `timeToLiveSecs`.
pub const DEFAULT_TTL_SECS: u64 = 7200;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Syntax(String),
    #[error("line {line}: {message}")]
    Invalid { line: usize, message: String },
    #[error("{0}")]
    Value(String),
}

/// Everything the hub needs to run. Field comments name the TOML keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `edge_id`: this hub's device id upstream (its client id and topic prefix).
    pub edge_id: String,
    /// `listen`: downstream MQTT listener addresses.
    pub listen: Vec<SocketAddr>,
    /// `storage`: the one folder holding everything durable.
    pub storage: PathBuf,
    /// `metrics`: address of the Prometheus text endpoint, off when absent.
    pub metrics: Option<SocketAddr>,
    pub upstream: UpstreamConfig,
    pub store: StoreConfig,
    pub mqtt: MqttConfig,
    pub tls: TlsConfig,
    pub auth: crate::auth::AuthConfig,
    pub plugins: PluginsConfig,
    /// `[routes]`: `name = "FROM … INTO …"` or `name = { route = "…",
    /// priority = 0, timeToLiveSecs = 60, onError = "drop" }`. Absent: every
    /// upstream-bound message goes upstream. The hub twin's `routes` win.
    pub routes: Option<std::collections::BTreeMap<String, serde_json::Value>>,
}

/// The Wasm plugin host (section `[plugins]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// `folder`: where `.wasm` plugins are loaded from and watched
    /// (default: `<storage>/plugins`).
    pub folder: Option<PathBuf>,
    /// `workers`: threads that run plugin calls.
    pub workers: usize,
    /// `timeout_ms`, `memory_mb`, `max_output_bytes`: limits of every plugin
    /// unless its own settings say otherwise.
    pub timeout_ms: u64,
    pub memory_mb: usize,
    pub max_output_bytes: usize,
    /// `log_lines_per_sec`, `log_burst`, `log_max_line_bytes`: how much one
    /// plugin may write to the hub's log (`host.log`): a token bucket of
    /// lines per second with a burst, shared by all its instances, and the
    /// longest line (longer ones are cut).
    pub log_lines_per_sec: u32,
    pub log_burst: u32,
    pub log_max_line_bytes: usize,
    /// `[plugins.settings.<name>]`: one plugin's config document, limits
    /// and grants.
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
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// `listen`: TLS listener addresses (the IoT Hub device SDKs use 8883).
    pub listen: Vec<SocketAddr>,
    /// `cert_file`: PEM server certificate chain.
    pub cert_file: Option<PathBuf>,
    /// `key_file`: PEM private key of the server certificate.
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `addresses`: `mqtt://host:port`, `mqtts://host:port`,
    /// `ws://host:port/path` or `wss://host:port/path` (MQTT over WebSocket,
    /// path `/mqtt` when absent), tried in turn (the nodes of one cluster).
    /// Empty means no upstream: store only.
    pub addresses: Vec<Spanned<String>>,
    /// `proxy`: `http://[user:password@]host:port`, an HTTP proxy that
    /// tunnels every upstream connection with CONNECT. Absent: the
    /// `https_proxy` / `HTTPS_PROXY` environment variables; empty: none.
    pub proxy: Option<String>,
    /// `protocol`: only `MQTT` is implemented.
    pub protocol: String,
    /// `ca_file`: PEM CA bundle that verifies an `mqtts://` upstream.
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// `sas_key`: the edge device's own symmetric key (base64); with
    /// `hub_name`, the hub signs in with a fresh SAS token per connection.
    pub sas_key: Option<String>,
    /// `hub_name`: the IoT hub host name used in the SAS username and token.
    pub hub_name: Option<String>,
    /// `cert_file` / `key_file`: a client certificate for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// `max_inflight`: QoS 1 publishes sent upstream but not yet acknowledged.
    pub max_inflight: usize,
    /// `keep_alive_secs` of the upstream connection.
    pub keep_alive_secs: u16,
    /// `max_backoff_ms`: ceiling of the reconnect back-off.
    pub max_backoff_ms: u64,
    /// `refusals_before_dead_letter`: how many times in a row the upstream
    /// may refuse the same message before it is moved to the dead-letter area.
    pub refusals_before_dead_letter: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `ttl_secs`: messages older than this are not sent and are counted.
    pub ttl_secs: u64,
    /// `max_queue_bytes`: quota on queued message bytes; new upstream-bound
    /// messages are refused while it is reached.
    pub max_queue_bytes: u64,
    /// `max_batch`: most messages written by one group commit.
    pub max_batch: usize,
    /// `max_topic_bytes`: the longest topic the hub stores (at most 65535).
    pub max_topic_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `max_message_bytes`: largest accepted MQTT packet.
    pub max_message_bytes: usize,
    /// `forward_topics`: topic filters of plain (non IoT Hub) topics that go
    /// upstream too. IoT Hub telemetry topics always do.
    pub forward_topics: Vec<String>,
    /// `max_connections`: downstream connections served at once.
    pub max_connections: usize,
    /// `offline_queue`: messages kept for a disconnected persistent session.
    pub offline_queue: usize,
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
            max_inflight: 1000,
            keep_alive_secs: 30,
            max_backoff_ms: 2000,
            refusals_before_dead_letter: 3,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            ttl_secs: DEFAULT_TTL_SECS,
            max_queue_bytes: 1 << 30,
            max_batch: 4096,
            max_topic_bytes: crate::mqtt::topic::MAX_LEN,
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
        }
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
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Checks what the type system cannot; run again after flags are layered on.
    pub fn validate(&self) -> Result<(), ConfigError> {
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
        for addr in self.upstream_addresses()? {
            if addr.tls && self.upstream.ca_file.is_none() {
                return bad(format!("upstream {addr} uses TLS: set upstream.ca_file"));
            }
        }
        if let Some(proxy) = self.upstream.proxy.as_deref().filter(|p| !p.is_empty()) {
            ProxyAddr::parse(proxy)
                .map_err(|e| ConfigError::Value(format!("upstream.proxy: {e}")))?;
        }
        if self.upstream.sas_key.is_some() != self.upstream.hub_name.is_some() {
            return bad("upstream.sas_key and upstream.hub_name go together".into());
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
        if self.upstream.cert_file.is_some() != self.upstream.key_file.is_some() {
            return bad("upstream.cert_file and upstream.key_file go together".into());
        }
        if self.upstream.max_inflight == 0 || self.upstream.max_inflight > 32_768 {
            return bad("upstream.max_inflight must be within 1..=32768".into());
        }
        if !self.tls.listen.is_empty()
            && (self.tls.cert_file.is_none() || self.tls.key_file.is_none())
        {
            return bad("tls.listen needs tls.cert_file and tls.key_file".into());
        }
        if self.store.ttl_secs == 0 {
            return bad("store.ttl_secs must be at least 1".into());
        }
        if self.store.max_batch == 0 {
            return bad("store.max_batch must be at least 1".into());
        }
        if self.mqtt.max_message_bytes < 64 {
            return bad("mqtt.max_message_bytes must be at least 64".into());
        }
        if self.plugins.workers == 0 || self.plugins.timeout_ms == 0 || self.plugins.memory_mb == 0
        {
            return bad("plugins.workers, timeout_ms and memory_mb must be at least 1".into());
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
        self.route_table()?;
        for filter in &self.mqtt.forward_topics {
            if !crate::mqtt::topic::valid_filter(filter) {
                return bad(format!(
                    "mqtt.forward_topics: {filter:?} is not a valid topic filter"
                ));
            }
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
