//! The Wasm plugin host: filters and routers written in any language that
//! compiles to a WebAssembly component of the worlds in `wit/plugin.wit`.
//!
//! - `bindings`: the WIT worlds as Rust types.
//! - `boundary`: the hub's messages in, verdicts out: the only place that
//!   converts to and from the WIT message record.
//! - `engine`: the wasmtime engine, call deadlines, the compiled-code cache.
//! - `instance`: one plugin's code and settings, its sandbox and its instances.
//! - `log_limit`: the rate and length limits of a plugin's `host.log` lines.
//! - `registry`: the plugins loaded now, swapped atomically on reload.
//! - `pool`: the threads that run plugin calls off the async runtime.
//! - `watch`: reloads the plugins folder when files change.
//! - `jsonl`: messages as JSON lines (for `edgehub plugin test`).
//!
//! This module does not decide which messages reach a plugin, nor what
//! happens to a message when a plugin fails (the router does both).

pub mod bindings;
pub mod boundary;
pub mod engine;
pub mod instance;
pub mod jsonl;
pub mod log_limit;
pub mod pool;
pub mod registry;
pub mod watch;

use std::path::PathBuf;
use std::time::Duration;

/// The WIT records, for the plugin host's own use (the rest of the hub
/// uses `crate::message::Message`, converted in `boundary`).
pub use bindings::{Endpoint, Message, ViewVerdict};
pub use boundary::{Destination, Outcome, Verdict};
pub use engine::PluginEngine;
pub use instance::{Grants, Instance, Kind, Limits, Plugin, Settings};
pub use log_limit::{LogLimit, PluginLog};
pub use pool::PluginPool;
pub use registry::Registry;

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin engine: {0}")]
    Engine(String),
    #[error("not a valid WebAssembly component: {0}")]
    Compile(String),
    #[error("compiling took longer than {} s, the limit (plugins.compile_timeout_secs); the compiler's process was stopped", .0.as_secs_f64())]
    CompileTimeout(std::time::Duration),
    #[error("cannot link: {0}")]
    Link(String),
    #[error("exports none of the worlds filter, batch-filter, view-filter or router of edgehub:plugin@0.1.0")]
    WrongWorld,
    #[error("cannot start: {0}")]
    Instantiate(String),
    #[error("grant refused: {0}")]
    Grant(String),
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("the file is {size} bytes, over the limit of {max} bytes (plugins.max_file_mb)")]
    FileTooLarge { size: u64, max: u64 },
    #[error("compiled-plugin cache {path}: {message}")]
    Cache { path: PathBuf, message: String },
}

impl PluginError {
    /// The `reason` label of `edgehub_plugin_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Engine(_) => "engine",
            Self::Compile(_) => "not_a_component",
            Self::CompileTimeout(_) => "compile_timeout",
            Self::Link(_) => "cannot_link",
            Self::WrongWorld => "wrong_world",
            Self::Instantiate(_) => "cannot_start",
            Self::Grant(_) => "grant_refused",
            Self::Read { .. } => "cannot_read",
            Self::FileTooLarge { .. } => "file_too_large",
            Self::Cache { .. } => "cache",
        }
    }

    fn engine(e: wasmtime::Error) -> Self {
        Self::Engine(format!("{e:#}"))
    }
    fn compile(e: wasmtime::Error) -> Self {
        // One line: parser errors may hold pretty-printed byte lists.
        let text = format!("{e:#}");
        Self::Compile(text.split_whitespace().collect::<Vec<_>>().join(" "))
    }
}

/// Why one call of a plugin failed. The instance is replaced after any of these.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallFailure {
    #[error("ran longer than its limit of {0:?}")]
    Timeout(Duration),
    #[error("needed more than its memory limit of {0} bytes")]
    Memory(usize),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("bad result: {0}")]
    BadOutput(String),
    #[error("is not a {0}")]
    NotA(&'static str),
    #[error("could not be started: {0}")]
    Start(String),
    #[error("is not loaded")]
    NotLoaded,
    #[error("plugin host is shutting down")]
    Closed,
}

impl CallFailure {
    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            CallFailure::Timeout(_) => "timeout",
            CallFailure::Memory(_) => "memory",
            CallFailure::Trap(_) => "trap",
            CallFailure::BadOutput(_) => "bad_output",
            CallFailure::NotA(_) => "wrong_kind",
            CallFailure::Start(_) => "start",
            CallFailure::NotLoaded => "not_loaded",
            CallFailure::Closed => "closed",
        }
    }
}
