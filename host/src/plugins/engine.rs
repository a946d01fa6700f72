//! The one wasmtime [`Engine`] of the hub: its settings, the epoch ticker that
//! bounds every call, and compilation with an on-disk cache of compiled
//! components.
//!
//! The ticker advances the epoch every [`EPOCH_TICK`] while plugins are
//! called and sleeps once none has been for [`TICKER_IDLE`], so an idle
//! gateway is not woken 100 times a second for nothing; the next call
//! wakes it ([`Ticker::enter`]).
//!
//! A plugin missing from the cache is compiled in a child process when the
//! binary names one ([`compile_with`]: the hub's own `edgehub plugin
//! compile`), which writes the cache entry and exits; the hub then maps the
//! compiled code from the file. The compiler's tens of MiB of allocations
//! and its own code pages never enter the hub's memory, a compile that
//! crashes or runs out of memory ends the child, not the hub, and one that
//! runs past the time limit is stopped and the plugin refused. Each cache
//! entry has its checksum beside it (`<entry>.cwasm.sum`); an entry whose
//! content does not match is deleted and compiled again, never run.
//!
//! Owns compiling; it does not instantiate or call plugins (see `instance`).

use std::hash::Hasher;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::Thread;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine};

use super::PluginError;

/// How often the epoch advances: the granularity of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);
/// How long the ticker runs on with no call in progress before it sleeps.
pub const TICKER_IDLE: Duration = Duration::from_millis(100);

/// The shared engine plus where compiled components are cached.
#[derive(Clone)]
pub struct PluginEngine {
    pub engine: Engine,
    pub ticker: Arc<Ticker>,
    cache_dir: Option<PathBuf>,
}

/// The epoch ticker's state, shared by the engine, every instance and the
/// ticker's thread (which holds it only weakly: the thread ends once the
/// last engine and instance are gone).
#[derive(Default)]
pub struct Ticker {
    /// Calls in progress.
    calls: AtomicUsize,
    /// The thread is asleep, or about to be: a call must wake it.
    asleep: AtomicBool,
    thread: OnceLock<Thread>,
}

/// A call in progress: the epoch advances until it is dropped.
pub struct Running<'a>(&'a Ticker);

impl Ticker {
    /// Starts `engine`'s ticker thread.
    fn start(engine: &Engine) -> std::io::Result<Arc<Ticker>> {
        let ticker = Arc::new(Ticker::default());
        let (weak_ticker, weak_engine) = (Arc::downgrade(&ticker), engine.weak());
        let thread = std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || Self::run(&weak_ticker, &weak_engine))?;
        let _ = ticker.thread.set(thread.thread().clone());
        Ok(ticker)
    }

    /// Marks a guest call as running (before it starts): wakes the ticker
    /// if it sleeps, so the call's deadline passes.
    pub fn enter(&self) -> Running<'_> {
        self.calls.fetch_add(1, SeqCst);
        // (A ticker going to sleep sets `asleep`, then reads `calls`: one of
        // the two sees the other's write.)
        if self.asleep.load(SeqCst) {
            self.wake();
        }
        Running(self)
    }

    fn wake(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    fn run(ticker: &Weak<Ticker>, engine: &wasmtime::EngineWeak) {
        let idle_ticks = (TICKER_IDLE.as_millis() / EPOCH_TICK.as_millis()).max(1);
        let mut quiet = 0;
        loop {
            let (Some(t), Some(engine)) = (ticker.upgrade(), engine.upgrade()) else {
                return;
            };
            engine.increment_epoch();
            drop(engine);
            quiet = if t.calls.load(SeqCst) == 0 {
                quiet + 1
            } else {
                0
            };
            if quiet < idle_ticks {
                drop(t);
                std::thread::sleep(EPOCH_TICK);
                continue;
            }
            t.asleep.store(true, SeqCst);
            let called = t.calls.load(SeqCst) != 0;
            // Held only weakly while asleep: the last owner's drop wakes it.
            drop(t);
            if !called {
                std::thread::park();
            }
            if let Some(t) = ticker.upgrade() {
                t.asleep.store(false, SeqCst);
            }
            quiet = 0;
        }
    }

    /// Whether the ticker thread is asleep (for tests).
    pub fn is_asleep(&self) -> bool {
        self.asleep.load(SeqCst)
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.wake();
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, SeqCst);
    }
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
        let ticker = Ticker::start(&engine).map_err(|e| PluginError::Engine(e.to_string()))?;
        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir).map_err(|e| PluginError::Cache {
                path: dir.clone(),
                message: e.to_string(),
            })?;
        }
        Ok(Self {
            engine,
            ticker,
            cache_dir,
        })
    }

    /// Compiles `wasm`, or loads the compiled form cached by an earlier run.
    /// Returns the component and whether it came from the cache. With a
    /// cache folder and a [`compile_with`] program, the compile runs in a
    /// child process; else here, on a pool of its own ([`in_own_pool`]).
    pub fn compile(&self, wasm: &[u8]) -> Result<(Component, bool), PluginError> {
        let (Some(dir), Some(path)) = (&self.cache_dir, self.cache_file(wasm)) else {
            return in_own_pool(|| Ok((self.compile_fresh(wasm)?, false)));
        };
        if let Some(component) = self.load_cached(&path) {
            return Ok((component, true));
        }
        if let Some(compiler) = COMPILER.get() {
            let program = &compiler.program;
            let started = std::time::Instant::now();
            match compile_elsewhere(compiler, wasm, dir) {
                Ok(peak_rss_mib) => {
                    if let Some(component) = self.load_cached(&path) {
                        tracing::info!(
                            ms = started.elapsed().as_millis() as u64,
                            compiler_peak_rss_mib = peak_rss_mib,
                            "plugin compiled in a child process"
                        );
                        return Ok((component, false));
                    }
                    // (a binary replaced by another version since the hub
                    // started compiles for another engine)
                    tracing::warn!(program = %program.display(), "the child process wrote no cache entry this hub can load; compiling the plugin in the hub");
                }
                Err(Elsewhere::Refused(e)) => return Err(e),
                Err(Elsewhere::NotRun(why)) => {
                    tracing::warn!(program = %program.display(), error = %why, "cannot compile the plugin in a child process; compiling it in the hub")
                }
            }
        }
        in_own_pool(|| {
            let compiled = self.precompile_into(wasm, &path)?;
            // SAFETY: `compiled` was produced by this engine just now.
            let component = unsafe { Component::deserialize(&self.engine, &compiled) }
                .map_err(PluginError::compile)?;
            Ok((component, false))
        })
    }

    /// Compiles `wasm` into its cache entry, here (`edgehub plugin
    /// compile`, the child process of [`Self::compile`]). Returns the entry.
    pub fn compile_into_cache(&self, wasm: &[u8]) -> Result<PathBuf, PluginError> {
        let path = self.cache_file(wasm).ok_or_else(|| {
            PluginError::Engine("no compiled-plugin cache folder to compile into".into())
        })?;
        self.precompile_into(wasm, &path)?;
        if !path.exists() {
            return Err(PluginError::Cache {
                path,
                message: "the compiled plugin could not be written".into(),
            });
        }
        Ok(path)
    }

    /// The cached compiled form at `path`, if there is a usable one (an
    /// unusable one is deleted).
    fn load_cached(&self, path: &Path) -> Option<Component> {
        if !path.exists() {
            return None;
        }
        let forget = |why: &dyn std::fmt::Display| {
            tracing::warn!(path = %path.display(), error = %why, "compiled plugin cache entry unusable; recompiling");
            let _ = std::fs::remove_file(path);
            let _ = std::fs::remove_file(sum_file(path));
            None
        };
        // Compiled code runs unchecked: a flipped bit on a worn SD card must
        // cost a compile, not a crash.
        match intact(path) {
            Ok(true) => {}
            Ok(false) => return forget(&"damaged: its checksum does not match"),
            Err(e) => return forget(&format!("no checksum to check it against ({e})")),
        }
        // SAFETY: the file was written by `precompile_component` of an
        // engine with the same compatibility hash (it is in the name), into
        // a folder only the hub writes, and its content is what was written.
        match unsafe { Component::deserialize_file(&self.engine, path) } {
            Ok(c) => Some(c),
            Err(e) => forget(&e),
        }
    }

    /// Compiles `wasm` here and writes the result to `path` (a failure to
    /// write is logged: the compiled form is still returned).
    fn precompile_into(&self, wasm: &[u8], path: &Path) -> Result<Vec<u8>, PluginError> {
        let compiled = self
            .engine
            .precompile_component(wasm)
            .map_err(PluginError::compile)?;
        // Loaded unchecked later: never leave a torn file under this name,
        // and keep its checksum beside it (written second: an entry without
        // one is not used).
        let written = crate::durable_file::replace(path, &compiled).and_then(|()| {
            crate::durable_file::replace(&sum_file(path), checksum(&compiled[..])?.as_bytes())
        });
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache compiled plugin");
        }
        Ok(compiled)
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
            let entry = match path.extension() {
                Some(e) if e == "cwasm" => path.clone(),
                Some(e) if e == "sum" => path.with_extension(""),
                _ => continue,
            };
            if entry.extension().is_some_and(|e| e == "cwasm") && !keep.contains(&entry) {
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

/// The file beside cache entry `entry` that holds its checksum.
fn sum_file(entry: &Path) -> PathBuf {
    entry.with_extension("cwasm.sum")
}

/// A cache entry's checksum (xxh3-128, hex), read in chunks: a compiled
/// plugin can be tens of MiB.
fn checksum(mut content: impl Read) -> std::io::Result<String> {
    struct Hashing(xxhash_rust::xxh3::Xxh3);
    impl Write for Hashing {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.update(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut hashing = Hashing(xxhash_rust::xxh3::Xxh3::new());
    std::io::copy(&mut content, &mut hashing)?;
    Ok(format!("{:032x}", hashing.0.digest128()))
}

/// Whether the cache entry at `path` holds what was written.
fn intact(path: &Path) -> std::io::Result<bool> {
    let want = std::fs::read_to_string(sum_file(path))?;
    Ok(checksum(std::fs::File::open(path)?)? == want.trim())
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

/// The program that compiles plugins in a child process (`program plugin
/// compile - --cache DIR`, the wasm on its stdin), and how long a compile
/// may take. Set once, by the binary (itself); unset, plugins compile in
/// this process.
static COMPILER: OnceLock<Compiler> = OnceLock::new();

struct Compiler {
    program: PathBuf,
    time_limit: Duration,
}

/// The exit status of `edgehub plugin compile` for a plugin that does not
/// compile (the reason is its last line on stderr).
pub const COMPILE_REFUSED: i32 = 3;

/// Compile plugins with `program` in a child process from now on, each
/// within `time_limit`.
pub fn compile_with(program: PathBuf, time_limit: Duration) {
    let _ = COMPILER.set(Compiler {
        program,
        time_limit,
    });
}

/// Why a compile in a child process gave no cache entry.
enum Elsewhere {
    /// The child did not run or did not finish: compile here instead.
    NotRun(String),
    /// The child refused the plugin: its error.
    Refused(PluginError),
}

/// Runs `program plugin compile - --cache cache_dir` on `wasm`; returns the
/// child's peak memory in MiB, as it reported it.
fn compile_elsewhere(compiler: &Compiler, wasm: &[u8], cache_dir: &Path) -> Result<f64, Elsewhere> {
    let mut child = Command::new(&compiler.program)
        .args(["plugin", "compile", "-", "--cache"])
        .arg(cache_dir)
        .env("RUST_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Elsewhere::NotRun(e.to_string()))?;
    // Its input and output go through threads of their own while this one
    // waits, with the limit, for the child to end: a child that stops
    // reading or writes much cannot hold the hub past the limit.
    let (status, fed, stdout, stderr, late) = std::thread::scope(|scope| {
        let stdin = child.stdin.take();
        let fed = scope.spawn(move || stdin.map(|mut stdin| stdin.write_all(wasm)));
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            scope.spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut bytes);
                }
                bytes
            })
        };
        let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
        let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
        let late = !ends_within(&child, compiler.time_limit);
        if late {
            let _ = child.kill();
        }
        let status = child.wait();
        let output = |h: std::thread::ScopedJoinHandle<'_, Vec<u8>>| h.join().unwrap_or_default();
        let fed = fed.join().ok().flatten();
        (status, fed, output(stdout), output(stderr), late)
    });
    if late {
        return Err(Elsewhere::Refused(PluginError::CompileTimeout(
            compiler.time_limit,
        )));
    }
    let status = status.map_err(|e| Elsewhere::NotRun(e.to_string()))?;
    let stderr = String::from_utf8_lossy(&stderr);
    let why = stderr.lines().rev().find(|l| !l.trim().is_empty());
    match (status.code(), fed) {
        (Some(0), _) => {
            let report: serde_json::Value = serde_json::from_slice(&stdout).unwrap_or_default();
            Ok(report["peak_rss_mib"].as_f64().unwrap_or(f64::NAN))
        }
        // It ran and said why not: the plugin does not compile.
        (Some(COMPILE_REFUSED), _) => Err(Elsewhere::Refused(PluginError::Compile(
            why.unwrap_or("no message").trim().to_string(),
        ))),
        (Some(code), fed) => Err(Elsewhere::NotRun(format!(
            "exit status {code}{}: {}",
            fed.and_then(Result::err)
                .map(|e| format!(" (input: {e})"))
                .unwrap_or_default(),
            why.unwrap_or("no message")
        ))),
        // Killed: a compile that crashes the compiler would crash the hub
        // too; do not try it here.
        (None, _) => Err(Elsewhere::Refused(PluginError::Engine(format!(
            "the compiler's process died ({}){}",
            status,
            why.map(|w| format!(": {w}")).unwrap_or_default()
        )))),
    }
}

/// Whether `child` ends within `limit` (it is not reaped: its status is
/// left for `wait`). Waits on a pidfd; where the kernel has none (before
/// Linux 5.3), it waits without a limit.
fn ends_within(child: &std::process::Child, limit: Duration) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use rustix::process::{pidfd_open, Pid, PidfdFlags};
    let pidfd = match pidfd_open(Pid::from_child(child), PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the compiler's process; its compile has no time limit");
            return true;
        }
    };
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let timeout = Timespec::try_from(left).unwrap_or(Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        });
        let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the compiler's process; its compile has no time limit");
                return true;
            }
        }
    }
}

/// Runs `f` on the threads of a pool that lives only for this call.
/// Compiling takes tens of MiB of short-lived allocations: on the
/// process-wide pool, whose threads then idle forever, the allocator kept
/// them as those threads' free pages (about 37 MiB of a hub's resident
/// memory after loading one small plugin; see docs/benchmarks.md).
fn in_own_pool<T: Send>(
    f: impl FnOnce() -> Result<T, PluginError> + Send,
) -> Result<T, PluginError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("plugin-compile-{i}"))
        .build()
        .map_err(|e| PluginError::Engine(e.to_string()))?;
    pool.install(f)
}

/// The compiled-component cache folder under the storage folder.
pub fn cache_dir(storage: &Path) -> PathBuf {
    storage.join("plugin-cache")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core module whose export `spin` loops forever.
    const SPIN: &[u8] = &[
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
        0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type: () -> ()
        0x03, 0x02, 0x01, 0x00, // one function of that type
        0x07, 0x08, 0x01, 0x04, b's', b'p', b'i', b'n', 0x00, 0x00, // export "spin"
        0x0a, 0x09, 0x01, 0x07, 0x00, 0x03, 0x40, 0x0c, 0x00, 0x0b, 0x0b, // loop { br 0 }
    ];

    #[test]
    fn the_ticker_sleeps_while_nothing_runs_and_a_call_still_meets_its_deadline() {
        let engine = PluginEngine::new(None).unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !engine.ticker.is_asleep() {
            assert!(std::time::Instant::now() < until, "the ticker never slept");
            std::thread::sleep(EPOCH_TICK);
        }
        let module = wasmtime::Module::new(&engine.engine, SPIN).unwrap();
        let mut store = wasmtime::Store::new(&engine.engine, ());
        store.epoch_deadline_trap();
        store.set_epoch_deadline(2);
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        let spin = instance
            .get_typed_func::<(), ()>(&mut store, "spin")
            .unwrap();
        // If the ticker stayed asleep, the watchdog ends the call instead.
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let watchdog = {
            let engine = engine.engine.clone();
            std::thread::spawn(move || {
                let stuck = finished.recv_timeout(Duration::from_secs(10)).is_err();
                if stuck {
                    (0..10).for_each(|_| engine.increment_epoch());
                }
                stuck
            })
        };
        let running = engine.ticker.enter();
        let result = spin.call(&mut store, ());
        assert!(!engine.ticker.is_asleep());
        drop(running);
        let _ = done.send(());
        assert!(
            !watchdog.join().unwrap(),
            "the call ran on until the watchdog ended it"
        );
        let trap = result.unwrap_err();
        assert_eq!(
            trap.downcast_ref::<wasmtime::Trap>(),
            Some(&wasmtime::Trap::Interrupt)
        );
    }

    #[test]
    fn a_cache_entry_is_intact_only_while_its_content_matches_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let entry = dir.path().join("k.cwasm");
        let content = vec![0x5au8; 200_000];
        std::fs::write(&entry, &content).unwrap();
        let e = intact(&entry).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "no checksum: {e}");
        std::fs::write(sum_file(&entry), checksum(&content[..]).unwrap()).unwrap();
        assert!(intact(&entry).unwrap());
        let mut flipped = content.clone();
        flipped[123_456] ^= 1;
        std::fs::write(&entry, &flipped).unwrap();
        assert!(!intact(&entry).unwrap(), "one flipped bit goes unnoticed");
    }

    #[test]
    fn pruning_the_cache_keeps_the_entries_that_run_with_their_checksums() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "a.cwasm",
            "a.cwasm.sum",
            "b.cwasm",
            "b.cwasm.sum",
            "c.cwasm.sum",
            "notes.txt",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let engine = PluginEngine::new(Some(dir.path().to_path_buf())).unwrap();
        engine.prune_cache(&[dir.path().join("a.cwasm")]);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["a.cwasm", "a.cwasm.sum", "notes.txt"]);
    }
}
