//! The plugins loaded now, by name (a file's stem), swapped atomically.
//!
//! Readers take a snapshot (`get`) and keep the `Arc<Plugin>` they got for
//! the message at hand, so a message that started on one version finishes on
//! it; the next message sees the new one. A file that fails to load leaves
//! the running version in place. Owns per-plugin settings: the hub config's
//! limits and grants, and the `config` document, which the hub twin may
//! override; and each plugin's log budget, kept by name across versions so
//! a reload does not refill it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use wasmtime::component::Linker;

use super::instance::{linker, PluginState};
use super::{Grants, Limits, Plugin, PluginEngine, PluginError, PluginLog, Settings};
use crate::metrics::Metrics;

/// A plugin's settings from the hub's config file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalSettings {
    pub config: Option<serde_json::Value>,
    pub limits: Limits,
    pub grants: Grants,
}

/// The state of one plugin file, for logs and reported properties.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FileStatus {
    /// Short content hash of the version running now (none when none runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// Why the newest file was refused (the previous version keeps running).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub struct Registry {
    engine: PluginEngine,
    linker: Linker<PluginState>,
    current: ArcSwap<HashMap<String, Arc<Plugin>>>,
    local: HashMap<String, LocalSettings>,
    default_limits: Limits,
    /// `config` documents from the hub twin, by plugin name.
    twin: Mutex<BTreeMap<String, serde_json::Value>>,
    status: Mutex<BTreeMap<String, FileStatus>>,
    /// Digest of the last file tried per name, loaded or refused (or why
    /// it was refused unread).
    tried: Mutex<HashMap<String, String>>,
    /// Largest file read as a plugin.
    max_file_bytes: u64,
    generation: AtomicU64,
    metrics: Arc<Metrics>,
    /// Each plugin's log (with its rate budget), by name, kept across versions.
    logs: Mutex<HashMap<String, Arc<PluginLog>>>,
    /// Held while the loaded set changes (a compiled file swapped in, a
    /// plugin unloaded, settings applied; never across a compile), so a
    /// load never swaps in settings read before a concurrent settings
    /// change.
    changing: Mutex<()>,
    /// Whether the plugins folder has been read once (until then a plugin
    /// missing may only not be compiled yet).
    first_read: tokio::sync::watch::Sender<bool>,
}

impl Registry {
    pub fn new(
        engine: PluginEngine,
        local: HashMap<String, LocalSettings>,
        default_limits: Limits,
        max_file_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Self, PluginError> {
        Ok(Self {
            linker: linker(&engine)?,
            engine,
            current: ArcSwap::default(),
            local,
            default_limits,
            twin: Mutex::default(),
            status: Mutex::default(),
            tried: Mutex::default(),
            max_file_bytes,
            generation: AtomicU64::new(1),
            metrics,
            logs: Mutex::default(),
            changing: Mutex::new(()),
            first_read: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Marks the plugins folder read once: a plugin missing now is missing.
    pub fn set_first_read(&self) {
        self.first_read.send_replace(true);
    }

    /// Plugin `name`, once the plugins folder has been read: a route that
    /// names a plugin still compiling at the hub's start waits for it.
    pub async fn get_when_read(&self, name: &str) -> Option<Arc<Plugin>> {
        if let Some(plugin) = self.get(name) {
            return Some(plugin);
        }
        let mut read = self.first_read.subscribe();
        // (An error: the registry is gone, and so is the plugin.)
        let _ = read.wait_for(|read| *read).await;
        self.get(name)
    }

    /// The version of `name` running now.
    pub fn get(&self, name: &str) -> Option<Arc<Plugin>> {
        self.current.load().get(name).cloned()
    }

    /// Names of the plugins running now.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.current.load().keys().cloned().collect();
        v.sort();
        v
    }

    /// Brings the loaded set in line with the `.wasm` files of `dir`: new and
    /// changed files are loaded, removed files unloaded. Unchanged files (by
    /// content) are left alone. Returns how many plugins changed.
    pub fn sync_folder(&self, dir: &Path) -> usize {
        let mut seen = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(folder = %dir.display(), error = %e, "cannot read plugins folder");
                return 0;
            }
        };
        let mut changed = 0;
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let Some(name) = plugin_name(&path) else {
                continue;
            };
            seen.push(name.clone());
            let wasm = match read_file(&path, self.max_file_bytes) {
                Ok(b) => b,
                Err(e @ PluginError::Read { .. }) => {
                    tracing::warn!(error = %e, "cannot read plugin file");
                    continue;
                }
                Err(e) => {
                    let why = e.to_string();
                    if self.tried.lock().unwrap().insert(name.clone(), why.clone()) != Some(why) {
                        self.refused(&name, &path, &e);
                    }
                    continue;
                }
            };
            let digest = super::engine::digest(&wasm);
            if self.tried.lock().unwrap().get(&name) == Some(&digest) {
                continue;
            }
            self.tried.lock().unwrap().insert(name.clone(), digest);
            if self.load(&name, &wasm, &path).is_ok() {
                changed += 1;
            }
        }
        let gone: Vec<String> = self
            .current
            .load()
            .keys()
            .filter(|n| !seen.contains(n))
            .cloned()
            .collect();
        for name in gone {
            self.unload(&name);
            changed += 1;
        }
        self.tried.lock().unwrap().retain(|n, _| seen.contains(n));
        if changed > 0 {
            let keep: Vec<PathBuf> = self
                .current
                .load()
                .values()
                .filter_map(|p| p.cache_file.clone())
                .collect();
            self.engine.prune_cache(&keep);
        }
        self.status
            .lock()
            .unwrap()
            .retain(|n, s| seen.contains(n) || s.version.is_some());
        changed
    }

    /// Loads (or replaces) plugin `name` from `wasm`. On failure the running
    /// version, if any, stays. Called from one thread (the watcher's, through
    /// [`sync_folder`](Self::sync_folder)): two compiles of one name, done
    /// outside the lock, never race to the swap.
    pub fn load(&self, name: &str, wasm: &[u8], path: &Path) -> Result<Arc<Plugin>, PluginError> {
        let started = std::time::Instant::now();
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        // Compiled outside the lock (seconds for a large plugin), so a
        // settings change meanwhile (the hub twin's, on the async runtime)
        // is not held up; one that came is applied before the swap.
        let loaded = Plugin::load(
            &self.engine,
            &self.linker,
            name,
            wasm,
            self.settings_for(name),
            generation,
            self.log_of(name),
        );
        let _changing = self.changing.lock().unwrap();
        match loaded {
            Ok((plugin, cached)) => {
                let settings = self.settings_for(name);
                let plugin = Arc::new(if settings == plugin.settings {
                    plugin
                } else {
                    plugin.with_settings(settings, self.generation.fetch_add(1, Ordering::Relaxed))
                });
                let replaced = self.swap(name, Some(plugin.clone()));
                tracing::info!(
                    plugin = name,
                    file = %path.display(),
                    version = %plugin.digest,
                    kind = plugin.kind.as_str(),
                    from_cache = cached,
                    millis = started.elapsed().as_millis() as u64,
                    replaced = replaced.map(|p| p.digest.clone()).unwrap_or_default(),
                    "plugin loaded"
                );
                self.metrics.plugin_reloaded(name);
                self.status.lock().unwrap().insert(
                    name.to_string(),
                    FileStatus {
                        version: Some(plugin.digest.clone()),
                        kind: Some(plugin.kind.as_str()),
                        error: None,
                    },
                );
                Ok(plugin)
            }
            Err(e) => {
                self.refused(name, path, &e);
                Err(e)
            }
        }
    }

    /// Logs, counts and reports a file of plugin `name` that was refused;
    /// the running version, if any, stays.
    fn refused(&self, name: &str, path: &Path, e: &PluginError) {
        let running = self.get(name).map(|p| p.digest.clone());
        tracing::error!(
            plugin = name,
            file = %path.display(),
            error = %e,
            still_running = running.as_deref().unwrap_or("none"),
            "plugin file refused"
        );
        self.metrics.plugin_rejected(name, e.reason());
        let mut status = self.status.lock().unwrap();
        let s = status.entry(name.to_string()).or_default();
        s.error = Some(e.to_string());
    }

    /// Stops offering `name` (messages already handed to it finish).
    pub fn unload(&self, name: &str) {
        let _changing = self.changing.lock().unwrap();
        if let Some(old) = self.swap(name, None) {
            tracing::info!(plugin = name, version = %old.digest, "plugin unloaded");
            self.metrics.plugin_reloaded(name);
        }
        self.status.lock().unwrap().remove(name);
    }

    /// Replaces the `config` documents that come from the hub twin; plugins
    /// whose effective settings change are swapped to a new generation.
    pub fn set_twin_configs(&self, configs: BTreeMap<String, serde_json::Value>) {
        let _changing = self.changing.lock().unwrap();
        *self.twin.lock().unwrap() = configs;
        for name in self.names() {
            let Some(old) = self.get(&name) else { continue };
            let settings = self.settings_for(&name);
            if settings != old.settings {
                let generation = self.generation.fetch_add(1, Ordering::Relaxed);
                let new = Arc::new(old.with_settings(settings, generation));
                self.swap(&name, Some(new));
                tracing::info!(plugin = %name, "plugin settings changed");
            }
        }
    }

    /// What runs now and what was refused, by plugin name.
    pub fn status(&self) -> BTreeMap<String, FileStatus> {
        self.status.lock().unwrap().clone()
    }

    fn swap(&self, name: &str, plugin: Option<Arc<Plugin>>) -> Option<Arc<Plugin>> {
        let mut old = None;
        self.current.rcu(|map| {
            let mut map = HashMap::clone(map);
            old = match &plugin {
                Some(p) => map.insert(name.to_string(), p.clone()),
                None => map.remove(name),
            };
            map
        });
        old
    }

    /// The log of plugin `name`: one per name for the life of the hub, so
    /// replacing a plugin that floods its log does not refill its budget.
    fn log_of(&self, name: &str) -> Arc<PluginLog> {
        self.logs
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(PluginLog::new(name, self.metrics.clone())))
            .clone()
    }

    fn settings_for(&self, name: &str) -> Settings {
        let local = self.local.get(name);
        let config = self
            .twin
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .or_else(|| local.and_then(|l| l.config.clone()))
            .unwrap_or_else(|| serde_json::json!({}));
        Settings {
            config_json: config.to_string().into(),
            limits: local
                .map(|l| l.limits.clone())
                .unwrap_or_else(|| self.default_limits.clone()),
            grants: local.map(|l| l.grants.clone()).unwrap_or_default(),
        }
    }
}

/// The plugin name of a file: its stem, when it is a visible `.wasm` file
/// with a name the route language can refer to.
/// A plugin file's bytes, if it holds at most `max`: a larger file is
/// refused before it is read (it may be growing: at most `max` + 1 bytes
/// are read).
fn read_file(path: &Path, max: u64) -> Result<Vec<u8>, PluginError> {
    use std::io::Read;
    let failed = |e: std::io::Error| PluginError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let too_large = |size| Err(PluginError::FileTooLarge { size, max });
    let file = std::fs::File::open(path).map_err(failed)?;
    let size = file.metadata().map_err(failed)?.len();
    if size > max {
        return too_large(size);
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(failed)?;
    match bytes.len() as u64 {
        n if n > max => too_large(n),
        _ => Ok(bytes),
    }
}

pub fn plugin_name(path: &Path) -> Option<String> {
    if path.extension()? != "wasm" || !path.is_file() {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    let ok = !stem.is_empty()
        && !stem.starts_with('.')
        && stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ok.then(|| stem.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_file_is_read_up_to_the_limit_and_refused_beyond_it_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.wasm");
        std::fs::write(&path, vec![7u8; 1000]).unwrap();
        assert_eq!(read_file(&path, 1000).unwrap().len(), 1000);
        let e = read_file(&path, 999).unwrap_err();
        assert!(
            matches!(
                e,
                PluginError::FileTooLarge {
                    size: 1000,
                    max: 999
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("plugins.max_file_mb"), "{e}");
        let e = read_file(&dir.path().join("gone.wasm"), 1000).unwrap_err();
        assert!(matches!(e, PluginError::Read { .. }), "{e}");
    }
}
