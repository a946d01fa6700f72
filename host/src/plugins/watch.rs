//! Reads the plugins folder, then watches it and reloads it when files
//! change.
//!
//! The first read (compiling every plugin, which takes seconds for a large
//! one on a cold cache) runs on the watcher's thread, so the hub serves
//! devices meanwhile; the registry tells routes waiting for a plugin when it
//! is done. Events are debounced (a copy in progress fires many) and then the
//! whole folder is compared with what is loaded, so a missed or merged event
//! cannot leave a stale plugin. The thread sleeps until an event or the
//! hub's shutdown (no polling). Owns only the watcher thread.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio_util::sync::CancellationToken;

use super::Registry;

/// Quiet time after the last event before the folder is read.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Whether `event` may have changed what the folder holds. Opening or
/// reading a file or the folder is not a change: reading the folder after
/// an event opens it, and counting that as a change would read it again
/// and again, for ever. (A watch error may hide a change: read again.)
fn may_change_folder(event: &notify::Result<notify::Event>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match event {
        Ok(e) => match e.kind {
            EventKind::Access(kind) => kind == AccessKind::Close(AccessMode::Write),
            _ => true,
        },
        Err(_) => true,
    }
}

/// Why the watcher's thread wakes.
#[derive(PartialEq)]
enum Wake {
    Changed,
    Stop,
}

/// Starts reading and watching `dir`; the thread ends after `shutdown`.
pub fn spawn(
    dir: PathBuf,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<std::thread::JoinHandle<()>, notify::Error> {
    let (tx, rx) = mpsc::channel();
    let stop = tx.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if may_change_folder(&event) {
            let _ = tx.send(Wake::Changed);
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let stopping = shutdown.clone();
    tokio::spawn(async move {
        stopping.cancelled().await;
        let _ = stop.send(Wake::Stop);
    });
    Ok(std::thread::Builder::new()
        .name("plugin-watch".into())
        .spawn(move || {
            let _watcher = watcher;
            // (Changes during the first read are events queued for after it.)
            registry.sync_folder(&dir);
            registry.set_first_read();
            tracing::info!(folder = %dir.display(), loaded = ?registry.names(), "plugins folder read and watched");
            while let Ok(Wake::Changed) = rx.recv() {
                while let Ok(wake) = rx.recv_timeout(DEBOUNCE) {
                    if wake == Wake::Stop {
                        return;
                    }
                }
                if shutdown.is_cancelled() {
                    return;
                }
                registry.sync_folder(&dir);
            }
        })
        .expect("spawn plugin watcher"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RemoveKind};

    #[test]
    fn opening_or_reading_the_folder_is_not_a_change_but_writing_creating_and_removing_are() {
        let event = |kind| Ok(notify::Event::new(kind));
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ] {
            assert!(!may_change_folder(&event(kind)), "{kind:?}");
        }
        for kind in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Any),
            EventKind::Remove(RemoveKind::File),
        ] {
            assert!(may_change_folder(&event(kind)), "{kind:?}");
        }
        assert!(may_change_folder(&Err(notify::Error::generic("lost"))));
    }
}
