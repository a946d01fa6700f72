//! Room on the storage's disk: new messages are refused before the file
//! system fills, and before the store outgrows its size on disk.
//!
//! A write that finds the disk full poisons fjall's database (every later
//! write fails until a restart), so the hub keeps a floor of free space and
//! refuses upstream-bound messages below it: publishers hear "quota
//! exceeded", what is stored stays readable and is delivered, and new
//! messages are taken again as soon as space returns (the readings are
//! refreshed at most every [`REFRESH`], on the next publish). The store's
//! size is what its files really take (allocated blocks; fjall preallocates
//! its journals sparsely). Owns the readings and the check; not the queue's
//! byte quota (the writer's intake) nor how a refusal is told (sessions).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How old a reading may be before it is taken again.
pub const REFRESH: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NoRoom {
    #[error(
        "the storage's file system has {free} bytes free, not more than the {floor} kept free"
    )]
    DiskFull { free: u64, floor: u64 },
    #[error("the store takes {size} bytes on disk, at its limit of {max}")]
    StoreFull { size: u64, max: u64 },
}

/// The limits and the last readings for one storage folder.
pub struct Room {
    dir: PathBuf,
    /// Free bytes kept on the file system; 0: no floor.
    floor: AtomicU64,
    /// Most bytes the store's files may take; 0: no limit.
    max: AtomicU64,
    reading: Mutex<Option<(Instant, Result<(), NoRoom>)>>,
}

impl Room {
    /// No limits until [`Room::limit`] sets them.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            floor: AtomicU64::new(0),
            max: AtomicU64::new(0),
            reading: Mutex::new(None),
        }
    }

    pub fn limit(&self, floor: u64, max: u64) {
        self.floor.store(floor, Ordering::Release);
        self.max.store(max, Ordering::Release);
        *self.reading.lock().expect("disk reading") = None;
    }

    /// Whether there is room for more, from a reading at most [`REFRESH`]
    /// old.
    pub fn check(&self) -> Result<(), NoRoom> {
        let (floor, max) = (
            self.floor.load(Ordering::Acquire),
            self.max.load(Ordering::Acquire),
        );
        if floor == 0 && max == 0 {
            return Ok(());
        }
        let mut reading = self.reading.lock().expect("disk reading");
        if let Some((at, verdict)) = &*reading {
            if at.elapsed() < REFRESH {
                return verdict.clone();
            }
        }
        let verdict = self.read(floor, max);
        if let Err(e) = &verdict {
            let changed = !matches!(&*reading, Some((_, Err(_))));
            if changed {
                tracing::warn!(reason = %e, "storage full: refusing new messages until there is room");
            }
        } else if matches!(&*reading, Some((_, Err(_)))) {
            tracing::info!("storage has room again: taking new messages");
        }
        *reading = Some((Instant::now(), verdict.clone()));
        verdict
    }

    fn read(&self, floor: u64, max: u64) -> Result<(), NoRoom> {
        if floor > 0 {
            // A folder that cannot be read is not a full disk: writes will
            // say what is wrong.
            if let Ok(st) = rustix::fs::statvfs(&self.dir) {
                let free = st.f_bavail.saturating_mul(st.f_frsize);
                if free <= floor {
                    return Err(NoRoom::DiskFull { free, floor });
                }
            }
        }
        if max > 0 {
            let size = allocated(&self.dir);
            if size >= max {
                return Err(NoRoom::StoreFull { size, max });
            }
        }
        Ok(())
    }
}

/// Bytes the files under `dir` take on disk (allocated blocks).
pub fn allocated(dir: &Path) -> u64 {
    allocated_where(dir, &|_| true)
}

/// Bytes the files under `dir` other than fjall's journals take on disk:
/// the tables and their version files.
pub fn allocated_tables(dir: &Path) -> u64 {
    allocated_where(dir, &|p| p.extension().is_none_or(|e| e != "jnl"))
}

fn allocated_where(dir: &Path, counted: &dyn Fn(&Path) -> bool) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => allocated_where(&entry.path(), counted),
            Ok(m) if counted(&entry.path()) => m.blocks() * 512,
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_limits_there_is_always_room() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Room::new(dir.path()).check(), Ok(()));
    }

    #[test]
    fn a_floor_above_the_free_space_refuses_and_a_lower_one_takes_again() {
        let dir = tempfile::tempdir().unwrap();
        let room = Room::new(dir.path());
        room.limit(u64::MAX, 0);
        assert!(matches!(room.check(), Err(NoRoom::DiskFull { .. })));
        room.limit(1, 0);
        assert_eq!(room.check(), Ok(()));
    }

    #[test]
    fn the_store_size_counts_allocated_blocks_not_sparse_length() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = std::fs::File::create(dir.path().join("sparse")).unwrap();
        sparse.set_len(64 << 20).unwrap();
        std::fs::write(dir.path().join("data"), vec![1u8; 100_000]).unwrap();
        let size = allocated(dir.path());
        assert!((100_000..1 << 20).contains(&size), "{size}");
        let room = Room::new(dir.path());
        room.limit(0, size);
        assert!(matches!(room.check(), Err(NoRoom::StoreFull { .. })));
        room.limit(0, size + 4096);
        assert_eq!(room.check(), Ok(()));
    }
}
