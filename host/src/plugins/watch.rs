//! Reads the plugins folder, then watches it and reloads it when files
//! change.
//!
//! The first read (compiling every plugin, which takes seconds for a large
//! one on a cold cache) runs on the watcher's thread, so the hub serves
//! devices meanwhile; the registry tells routes waiting for a plugin when it
//! is done. Events are debounced (a copy in progress fires many) and then the
//! whole folder is compared with what is loaded, so a missed or merged event
//! cannot leave a stale plugin. Owns only the watcher thread.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio_util::sync::CancellationToken;

use super::Registry;

/// Quiet time after the last event before the folder is read.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Starts reading and watching `dir`; the thread ends after `shutdown`.
pub fn spawn(
    dir: PathBuf,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<std::thread::JoinHandle<()>, notify::Error> {
    let (tx, rx) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let _ = tx.send(event.is_ok());
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(std::thread::Builder::new()
        .name("plugin-watch".into())
        .spawn(move || {
            let _watcher = watcher;
            // (Changes during the first read are events queued for after it.)
            registry.sync_folder(&dir);
            registry.set_first_read();
            tracing::info!(folder = %dir.display(), loaded = ?registry.names(), "plugins folder read and watched");
            while !shutdown.is_cancelled() {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(_) => {
                        while rx.recv_timeout(DEBOUNCE).is_ok() {}
                        registry.sync_folder(&dir);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        })
        .expect("spawn plugin watcher"))
}
