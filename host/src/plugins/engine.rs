//! The one wasmtime [`Engine`] of the hub: its settings, the epoch ticker that
//! bounds every call, and compilation with an on-disk cache of compiled
//! components.
//!
//! Owns compiling; it does not instantiate or call plugins (see `instance`).

use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine};

use super::PluginError;

/// How often the epoch advances: the granularity of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The shared engine plus where compiled components are cached.
#[derive(Clone)]
pub struct PluginEngine {
    pub engine: Engine,
    cache_dir: Option<PathBuf>,
}

impl PluginEngine {
    /// Builds the engine and starts its epoch ticker (a thread that ends when
    /// the last clone of the engine is dropped).
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, PluginError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        // Guest stacks are bounded; deep recursion traps instead of crashing.
        config.max_wasm_stack(512 * 1024);
        let engine = Engine::new(&config).map_err(PluginError::engine)?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir).map_err(|e| PluginError::Cache {
                path: dir.clone(),
                message: e.to_string(),
            })?;
        }
        Ok(Self { engine, cache_dir })
    }

    /// Compiles `wasm`, or loads the compiled form cached by an earlier run.
    /// Returns the component and whether it came from the cache.
    ///
    /// Compiling takes tens of MiB of short-lived allocations. They are made
    /// on the threads of a pool that lives only for this call: on the
    /// process-wide pool, whose threads then idle forever, the allocator kept
    /// them as those threads' free pages (about 37 MiB of a hub's resident
    /// memory after loading one small plugin; see docs/benchmarks.md).
    pub fn compile(&self, wasm: &[u8]) -> Result<(Component, bool), PluginError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("plugin-compile-{i}"))
            .build()
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        pool.install(|| self.compile_here(wasm))
    }

    fn compile_here(&self, wasm: &[u8]) -> Result<(Component, bool), PluginError> {
        let Some(path) = self.cache_file(wasm) else {
            return Ok((self.compile_fresh(wasm)?, false));
        };
        if path.exists() {
            // SAFETY: the file was written by `precompile_component` of an
            // engine with the same compatibility hash (it is in the name),
            // into a folder only the hub writes.
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(c) => return Ok((c, true)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "compiled plugin cache entry unusable; recompiling");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let compiled = self
            .engine
            .precompile_component(wasm)
            .map_err(PluginError::compile)?;
        // Loaded unchecked later: never leave a torn file under this name.
        if let Err(e) = crate::durable_file::replace(&path, &compiled) {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache compiled plugin");
        }
        // SAFETY: `compiled` was produced by this engine just now.
        let component = unsafe { Component::deserialize(&self.engine, &compiled) }
            .map_err(PluginError::compile)?;
        Ok((component, false))
    }

    /// Where the compiled form of `wasm` is cached (`None`: no cache).
    pub fn cache_file(&self, wasm: &[u8]) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        Some(dir.join(format!("{}.cwasm", self.cache_key(wasm))))
    }

    /// Deletes cached compiled code other than `keep` (the versions that
    /// run now), so replaced versions do not pile up on disk.
    pub fn prune_cache(&self, keep: &[PathBuf]) {
        let Some(dir) = &self.cache_dir else { return };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().is_some_and(|e| e == "cwasm") && !keep.contains(&path) {
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::debug!(path = %path.display(), "stale compiled plugin removed")
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove stale compiled plugin")
                    }
                }
            }
        }
    }

    fn compile_fresh(&self, wasm: &[u8]) -> Result<Component, PluginError> {
        Component::new(&self.engine, wasm).map_err(PluginError::compile)
    }

    /// Content hash of the wasm plus everything about the engine that makes
    /// compiled code incompatible (version, settings, CPU features).
    fn cache_key(&self, wasm: &[u8]) -> String {
        let mut h = ShaHasher(Sha256::new());
        h.0.update(b"edgehub-plugin-cache-v1");
        std::hash::Hash::hash(&self.engine.precompile_compatibility_hash(), &mut h);
        h.0.update(Sha256::digest(wasm));
        hex(&h.0.finalize())
    }
}

/// Content digest of a plugin file, as shown in logs and reported properties.
pub fn digest(wasm: &[u8]) -> String {
    hex(&Sha256::digest(wasm)[..8])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds `Hash` output into SHA-256 (std's hashers are not stable across runs).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// The compiled-component cache folder under the storage folder.
pub fn cache_dir(storage: &Path) -> PathBuf {
    storage.join("plugin-cache")
}
