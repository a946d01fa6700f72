//! One loaded plugin ([`Plugin`]: compiled, linked, with its settings) and its
//! live instances ([`Instance`]: a wasmtime store with the guest in it).
//!
//! Owns the sandbox: what a guest may reach (nothing by default), how long a
//! call may run and how much memory an instance may use. An instance whose
//! call failed is poisoned: its owner drops it and instantiates a fresh one.
//! A guest's `host.log` lines go through the plugin's [`PluginLog`], which
//! limits them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{ResourceLimiter, Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::{
    batch_filter, filter, host_api, router, view_api, view_filter, Endpoint, Message, ViewVerdict,
};
use super::engine::{PluginEngine, Ticker, EPOCH_TICK};
use super::log_limit::{LogLimit, PluginLog};
use super::{CallFailure, PluginError};
use crate::message::Message as HubMessage;

/// What a plugin may use, from the hub's config (never from the cloud).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Longest a single call may run.
    pub timeout: Duration,
    /// Most linear memory one instance may have.
    pub memory_bytes: usize,
    /// Largest result (all bodies, topics and properties of one call).
    pub max_output_bytes: usize,
    /// How much it may write to the hub's log through `host.log`.
    pub log: LogLimit,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(100),
            memory_bytes: 64 << 20,
            max_output_bytes: 1 << 20,
            log: LogLimit::default(),
        }
    }
}

/// Capabilities a plugin gets only when the hub's config grants them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grants {
    /// Environment variables visible to the guest.
    pub env: Vec<(String, String)>,
    /// Host folders the guest may read, mounted at the same path.
    pub read_dirs: Vec<PathBuf>,
    /// Whether the guest's stdout/stderr reach the hub's stderr.
    pub stdio: bool,
}

/// Everything about a plugin besides its code.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    /// What `host.config()` returns: a JSON document.
    pub config_json: Arc<str>,
    pub limits: Limits,
    pub grants: Grants,
}

/// Which world a plugin exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Filter,
    BatchFilter,
    ViewFilter,
    Router,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Filter => "filter",
            Kind::BatchFilter => "batch-filter",
            Kind::ViewFilter => "view-filter",
            Kind::Router => "router",
        }
    }
    pub fn is_filter(self) -> bool {
        matches!(self, Kind::Filter | Kind::BatchFilter | Kind::ViewFilter)
    }
}

#[derive(Clone)]
enum Pre {
    Filter(filter::FilterPre<PluginState>),
    BatchFilter(batch_filter::BatchFilterPre<PluginState>),
    ViewFilter(view_filter::ViewFilterPre<PluginState>),
    Router(router::RouterPre<PluginState>),
}

/// A compiled, linked plugin: cheap to instantiate many times.
pub struct Plugin {
    pub name: String,
    /// Short content hash of the `.wasm` file.
    pub digest: String,
    /// Changes whenever the code or the settings change.
    pub generation: u64,
    pub kind: Kind,
    pub settings: Settings,
    /// Its compiled form on disk, when the engine caches.
    pub cache_file: Option<PathBuf>,
    /// Where its `host.log` lines go (shared with its other versions).
    log: Arc<PluginLog>,
    pre: Pre,
    engine: PluginEngine,
}

/// The linker every plugin is linked with: WASI (denied by default through
/// the context), the `host` interface and the `view` interface.
pub fn linker(engine: &PluginEngine) -> Result<Linker<PluginState>, PluginError> {
    let mut linker = Linker::new(&engine.engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(PluginError::engine)?;
    host_api::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |s| s)
        .map_err(PluginError::engine)?;
    view_api::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |s| s)
        .map_err(PluginError::engine)?;
    Ok(linker)
}

impl Plugin {
    /// Compiles (or loads from the cache) and links `wasm`, finding out which
    /// world it exports; its guest logs through `log`. Returns the plugin and
    /// whether the cache was used.
    pub fn load(
        engine: &PluginEngine,
        linker: &Linker<PluginState>,
        name: &str,
        wasm: &[u8],
        settings: Settings,
        generation: u64,
        log: Arc<PluginLog>,
    ) -> Result<(Plugin, bool), PluginError> {
        let (component, cached) = engine.compile(wasm)?;
        let instance_pre = linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Link(format!("{e:#}")))?;
        let pre = if let Ok(p) = batch_filter::BatchFilterPre::new(instance_pre.clone()) {
            Pre::BatchFilter(p)
        } else if let Ok(p) = view_filter::ViewFilterPre::new(instance_pre.clone()) {
            Pre::ViewFilter(p)
        } else if let Ok(p) = filter::FilterPre::new(instance_pre.clone()) {
            Pre::Filter(p)
        } else if let Ok(p) = router::RouterPre::new(instance_pre) {
            Pre::Router(p)
        } else {
            return Err(PluginError::WrongWorld);
        };
        let kind = match pre {
            Pre::Filter(_) => Kind::Filter,
            Pre::BatchFilter(_) => Kind::BatchFilter,
            Pre::ViewFilter(_) => Kind::ViewFilter,
            Pre::Router(_) => Kind::Router,
        };
        let plugin = Plugin {
            name: name.to_string(),
            digest: super::engine::digest(wasm),
            generation,
            kind,
            settings,
            cache_file: engine.cache_file(wasm),
            log,
            pre,
            engine: engine.clone(),
        };
        // Fail now, not on the first message, if it cannot start.
        plugin.instantiate()?;
        Ok((plugin, cached))
    }

    /// The same code with other settings (a new generation).
    pub fn with_settings(&self, settings: Settings, generation: u64) -> Plugin {
        Plugin {
            name: self.name.clone(),
            digest: self.digest.clone(),
            generation,
            kind: self.kind,
            settings,
            cache_file: self.cache_file.clone(),
            log: self.log.clone(),
            pre: self.pre.clone(),
            engine: self.engine.clone(),
        }
    }

    /// A fresh instance in its own store.
    pub fn instantiate(&self) -> Result<Instance, PluginError> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.wall_clock(CoarseWallClock)
            .monotonic_clock(CoarseMonotonicClock::default())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let grants = &self.settings.grants;
        wasi.envs(&grants.env);
        if grants.stdio {
            wasi.inherit_stdout().inherit_stderr();
        }
        for dir in &grants.read_dirs {
            let guest = dir.to_string_lossy().into_owned();
            wasi.preopened_dir(dir, guest, FsPerms::ReadOnly)
                .map_err(|e| PluginError::Grant(format!("{}: {e}", dir.display())))?;
        }
        let state = PluginState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max_memory: self.settings.limits.memory_bytes,
                exceeded: false,
            },
            log: self.log.clone(),
            log_limit: self.settings.limits.log,
            config_json: self.settings.config_json.clone(),
            lent: Vec::new(),
        };
        let mut store = Store::new(&self.engine.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(deadline_ticks(self.settings.limits.timeout));
        let running = self.engine.ticker.enter();
        let exports = match &self.pre {
            Pre::Filter(p) => p.instantiate(&mut store).map(Exports::Filter),
            Pre::BatchFilter(p) => p.instantiate(&mut store).map(Exports::BatchFilter),
            Pre::ViewFilter(p) => p.instantiate(&mut store).map(Exports::ViewFilter),
            Pre::Router(p) => p.instantiate(&mut store).map(Exports::Router),
        }
        .map_err(|e| PluginError::Instantiate(describe(&store, &e)))?;
        drop(running);
        Ok(Instance {
            store,
            exports,
            ticker: self.engine.ticker.clone(),
            limits: self.settings.limits.clone(),
            generation: self.generation,
        })
    }
}

enum Exports {
    Filter(filter::Filter),
    BatchFilter(batch_filter::BatchFilter),
    ViewFilter(view_filter::ViewFilter),
    Router(router::Router),
}

/// A live guest. Not shared between threads; dropped after a failed call.
pub struct Instance {
    store: Store<PluginState>,
    /// Woken for each call, so the call's deadline passes.
    ticker: Arc<Ticker>,
    exports: Exports,
    limits: Limits,
    pub generation: u64,
}

impl Instance {
    /// Filters one message.
    pub fn filter(&mut self, m: &Message) -> Result<Option<Message>, CallFailure> {
        self.arm();
        let out = match &self.exports {
            Exports::Filter(f) => {
                let _running = self.ticker.enter();
                f.call_filter(&mut self.store, m)
            }
            Exports::BatchFilter(f) => {
                let _running = self.ticker.enter();
                f.call_filter(&mut self.store, m)
            }
            Exports::ViewFilter(_) => {
                let mut verdicts = self.filter_views(vec![HubMessage::from(m.clone())]).1?;
                return Ok(match verdicts.pop() {
                    Some(ViewVerdict::Keep) => Some(m.clone()),
                    Some(ViewVerdict::Replace(r)) => Some(r),
                    _ => None,
                });
            }
            Exports::Router(_) => return Err(CallFailure::NotA("filter")),
        }
        .map_err(|e| self.failure(e))?;
        self.check_size(out.iter().map(size_of_message).sum())?;
        Ok(out)
    }

    /// Filters several messages in one call when the plugin has the batch
    /// entry point, else one call each.
    pub fn filter_batch(&mut self, ms: &[Message]) -> Result<Vec<Option<Message>>, CallFailure> {
        self.arm();
        let out = match &self.exports {
            Exports::BatchFilter(f) => {
                let _running = self.ticker.enter();
                f.call_filter_batch(&mut self.store, ms)
            }
            .map_err(|e| self.failure(e))?,
            _ => return ms.iter().map(|m| self.filter(m)).collect(),
        };
        if out.len() != ms.len() {
            return Err(CallFailure::BadOutput(format!(
                "filter-batch returned {} results for {} messages",
                out.len(),
                ms.len()
            )));
        }
        self.check_size(out.iter().flatten().map(size_of_message).sum())?;
        Ok(out)
    }

    /// Lends `ms` to a view filter for one call: one verdict per message,
    /// in order. The messages come back whatever the call did.
    pub fn filter_views(
        &mut self,
        ms: Vec<HubMessage>,
    ) -> (Vec<HubMessage>, Result<Vec<ViewVerdict>, CallFailure>) {
        self.arm();
        let Exports::ViewFilter(f) = &self.exports else {
            return (ms, Err(CallFailure::NotA("view-filter")));
        };
        let n = ms.len();
        let Ok(count) = u32::try_from(n) else {
            return (ms, Err(CallFailure::BadOutput("batch too large".into())));
        };
        self.store.data_mut().lent = ms;
        let running = self.ticker.enter();
        let out = f.call_filter_views(&mut self.store, count);
        drop(running);
        let ms = std::mem::take(&mut self.store.data_mut().lent);
        let out = match out {
            Ok(out) => out,
            Err(e) => return (ms, Err(self.failure(e))),
        };
        if out.len() != n {
            let why = format!(
                "filter-views returned {} results for {n} messages",
                out.len()
            );
            return (ms, Err(CallFailure::BadOutput(why)));
        }
        let size = out
            .iter()
            .map(|v| match v {
                ViewVerdict::Replace(m) => size_of_message(m),
                _ => 0,
            })
            .sum();
        (ms, self.check_size(size).map(|()| out))
    }

    /// Routes one message.
    pub fn route(&mut self, m: &Message) -> Result<Vec<Endpoint>, CallFailure> {
        self.arm();
        let out = match &self.exports {
            Exports::Router(r) => {
                let _running = self.ticker.enter();
                r.call_route(&mut self.store, m)
            }
            _ => return Err(CallFailure::NotA("router")),
        }
        .map_err(|e| self.failure(e))?;
        let size = out
            .iter()
            .map(|e| match e {
                Endpoint::ModuleInput((m, i)) => 16 + m.len() + i.len(),
                _ => 16,
            })
            .sum();
        self.check_size(size)?;
        Ok(out)
    }

    fn arm(&mut self) {
        self.store
            .set_epoch_deadline(deadline_ticks(self.limits.timeout));
    }

    fn check_size(&self, size: usize) -> Result<(), CallFailure> {
        if size > self.limits.max_output_bytes {
            return Err(CallFailure::BadOutput(format!(
                "result of {size} bytes is over the limit of {} bytes",
                self.limits.max_output_bytes
            )));
        }
        Ok(())
    }

    fn failure(&self, e: wasmtime::Error) -> CallFailure {
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return CallFailure::Timeout(self.limits.timeout);
        }
        if self.store.data().limiter.exceeded {
            return CallFailure::Memory(self.limits.memory_bytes);
        }
        CallFailure::Trap(describe(&self.store, &e))
    }
}

fn describe(store: &Store<PluginState>, e: &wasmtime::Error) -> String {
    if store.data().limiter.exceeded {
        return "memory limit exceeded".into();
    }
    if let Some(trap) = e.downcast_ref::<Trap>() {
        return trap.to_string();
    }
    // The root cause names the problem; the wasm backtrace is noise here.
    let text = e.root_cause().to_string();
    text.lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(500)
        .collect()
}

fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
}

fn size_of_message(m: &Message) -> usize {
    let props = |p: &Vec<(String, String)>| p.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    m.body.len()
        + m.topic.len()
        + m.source.len()
        + props(&m.properties)
        + props(&m.system_properties)
}

/// The state of one store: the guest's WASI context, its resource table,
/// its memory limiter, its log and what `host.config()` returns.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    log: Arc<PluginLog>,
    log_limit: LogLimit,
    config_json: Arc<str>,
    /// The messages lent to a view filter during a call (empty between calls).
    lent: Vec<HubMessage>,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl host_api::Host for PluginState {
    fn log(&mut self, level: u8, text: String) {
        self.log.write(&self.log_limit, level, &text);
    }

    fn config(&mut self) -> String {
        self.config_json.to_string()
    }

    fn now_ms(&mut self) -> u64 {
        crate::clock::wall_ms()
    }
}

impl super::bindings::filter::edgehub::plugin::types::Host for PluginState {}

/// A view filter's reads of the messages lent to it.
impl view_api::Host for PluginState {
    fn source(&mut self, i: u32) -> wasmtime::Result<String> {
        Ok(self.lent(i)?.source().to_owned())
    }
    fn topic(&mut self, i: u32) -> wasmtime::Result<String> {
        Ok(self.lent(i)?.topic.clone())
    }
    fn property(&mut self, i: u32, name: String) -> wasmtime::Result<Option<String>> {
        Ok(find(self.lent(i)?.properties(), &name))
    }
    fn system_property(&mut self, i: u32, name: String) -> wasmtime::Result<Option<String>> {
        Ok(find(self.lent(i)?.system_properties(), &name))
    }
    fn properties(&mut self, i: u32) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.lent(i)?.properties().to_vec())
    }
    fn system_properties(&mut self, i: u32) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.lent(i)?.system_properties().to_vec())
    }
    fn body_len(&mut self, i: u32) -> wasmtime::Result<u32> {
        Ok(u32::try_from(self.lent(i)?.body.len()).unwrap_or(u32::MAX))
    }
    fn body(&mut self, i: u32) -> wasmtime::Result<Vec<u8>> {
        Ok(self.lent(i)?.body.to_vec())
    }
    fn enqueued_ms(&mut self, i: u32) -> wasmtime::Result<u64> {
        Ok(self.lent(i)?.enqueued_ms)
    }
    fn to_message(&mut self, i: u32) -> wasmtime::Result<Message> {
        Ok(Message::from(self.lent(i)?))
    }
}

impl PluginState {
    /// Message `i` of the batch lent for this call; past it, the call traps.
    fn lent(&self, i: u32) -> wasmtime::Result<&HubMessage> {
        self.lent.get(i as usize).ok_or_else(|| {
            wasmtime::Error::msg(format!(
                "view: message {i} is past the {} lent for this call",
                self.lent.len()
            ))
        })
    }
}

fn find(pairs: &[(String, String)], name: &str) -> Option<String> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

/// Bounds linear memory and tables; remembers that the bound was hit so the
/// failure is reported as what it is.
struct MemoryLimiter {
    max_memory: usize,
    exceeded: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.exceeded = true;
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} bytes exceeded",
                self.max_memory
            )));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// Wall clock with millisecond resolution: no high-resolution timer for
/// timing side channels.
struct CoarseWallClock;

impl wasmtime_wasi::HostWallClock for CoarseWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }
    fn now(&self) -> Duration {
        Duration::from_millis(crate::clock::wall_ms())
    }
}

/// Monotonic clock with millisecond resolution.
struct CoarseMonotonicClock(std::time::Instant);

impl Default for CoarseMonotonicClock {
    fn default() -> Self {
        Self(std::time::Instant::now())
    }
}

impl wasmtime_wasi::HostMonotonicClock for CoarseMonotonicClock {
    fn resolution(&self) -> u64 {
        1_000_000
    }
    fn now(&self) -> u64 {
        let ms = self.0.elapsed().as_millis() as u64;
        ms * 1_000_000
    }
}
