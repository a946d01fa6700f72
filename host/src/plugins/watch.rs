//! Reads the plugins folder, then watches it and reloads it when files
//! change.
//!
//! The first read (compiling every plugin, which takes seconds for a large
//! one on a cold cache) runs on the watcher's thread, so the hub serves
//! devices meanwhile; the registry tells routes waiting for a plugin when it
//! is done. Events are debounced (a copy in progress fires many) and then the
//! whole folder is compared with what is loaded, so a missed or merged event
//! cannot leave a stale plugin. The thread sleeps until an event or the
//! hub's shutdown (no polling). The folder's parent is watched too, for the
//! folder itself: one removed and made again (a deployment replacing it
//! whole) is watched again, and the plugins it holds then are loaded; while
//! it is missing, the loaded plugins run on. Owns only the watcher thread.

use std::path::{Path, PathBuf};
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

/// Whether `event` is about the folder or what is in it, not about the
/// rest of its parent (the storage folder, for the default folder).
fn is_about(event: &notify::Result<notify::Event>, folder: &Path) -> bool {
    match event {
        Ok(e) => e.paths.iter().any(|p| p.starts_with(folder)),
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
    // (Events name paths under the watched ones, as watched: canonical.)
    let watched = std::fs::canonicalize(&dir).map_err(notify::Error::io)?;
    let ours = watched.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if is_about(&event, &ours) && may_change_folder(&event) {
            let _ = tx.send(Wake::Changed);
        }
    })?;
    watcher.watch(&watched, RecursiveMode::NonRecursive)?;
    if let Some(parent) = watched.parent() {
        if let Err(e) = watcher.watch(parent, RecursiveMode::NonRecursive) {
            tracing::warn!(folder = %parent.display(), error = %e, "cannot watch the plugins folder's parent: a plugins folder removed and made again will not be followed");
        }
    }
    let stopping = shutdown.clone();
    tokio::spawn(async move {
        stopping.cancelled().await;
        let _ = stop.send(Wake::Stop);
    });
    Ok(std::thread::Builder::new()
        .name("plugin-watch".into())
        .spawn(move || {
            let mut watcher = watcher;
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
                // A folder made again is a new one to watch (a no-op for the
                // same folder; an error while it is missing).
                let _ = watcher.watch(&watched, RecursiveMode::NonRecursive);
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

    #[test]
    fn of_the_parent_only_events_about_the_folder_itself_count() {
        let folder = Path::new("/var/lib/edgehub/plugins");
        let about = |path: &str| {
            let event =
                notify::Event::new(EventKind::Create(CreateKind::Any)).add_path(path.into());
            is_about(&Ok(event), folder)
        };
        assert!(about("/var/lib/edgehub/plugins"));
        assert!(about("/var/lib/edgehub/plugins/filter.wasm"));
        assert!(!about("/var/lib/edgehub/queue-stats.json"));
        assert!(!about("/var/lib/edgehub/plugins-old"));
    }
}
