//! Opening a store that bit rot or a worn card damaged: the gateway starts
//! anyway, with every record that can still be read.
//!
//! Owns the checks around opening the fjall database, and nothing about what
//! its records mean:
//! - before it opens, a scan of its journals. fjall refuses to open when a
//!   batch's checksum fails, and cuts a journal at its first undecodable
//!   byte, so one flipped byte would stop the hub or silently lose every
//!   batch after it. A batch that is damaged but followed by intact ones is
//!   cut out of its journal instead ([`journal`]); damage with nothing
//!   intact after it is a torn last write, which fjall drops as it should;
//! - after it opens, a read of every keyspace to its end. A keyspace that
//!   cannot be read through (a damaged block in a table file) is copied, as
//!   far as it reads from either end, into a new database that replaces the
//!   damaged one;
//! - a database that does not open at all (its version or a table's index
//!   damaged) is read file by file into a new one ([`super::salvage`]),
//!   or, if even that fails, replaced by an empty one.
//!
//! Whatever is damaged is first set aside, as it was, under `damaged/` in
//! the storage folder, for the operator to inspect and delete.

use std::path::{Path, PathBuf};

use fjall::{Database, KeyspaceCreateOptions, PersistMode};

use super::{count_records, journal, recovery_io, StoreError};

/// What opening found and did; all zero for an intact store.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Recovery {
    /// Records kept from a damaged store.
    pub recovered: u64,
    /// Records known to be lost (at least this many).
    pub lost: u64,
    /// Where the damaged files were set aside.
    pub set_aside: Vec<PathBuf>,
}

impl Recovery {
    pub fn found_damage(&self) -> bool {
        !self.set_aside.is_empty()
    }
}

/// Opens the database in `dir` with `open`, first repairing what damage it
/// can; `open` is called again on the repaired or replaced database.
pub fn open(
    dir: &Path,
    open: impl Fn(&Path) -> Result<Database, fjall::Error>,
) -> Result<(Database, Recovery), StoreError> {
    let mut recovery = Recovery::default();
    let rebuild = rebuild_dir(dir);
    if rebuild.exists() {
        if dir.exists() {
            // A rebuild that was interrupted: the damaged store is still in
            // place, to be read again.
            std::fs::remove_dir_all(&rebuild).map_err(|e| recovery_io(&rebuild, e))?;
        } else {
            // A rebuild that was done (and synced), the damaged store set
            // aside, and the new one not yet moved in place.
            std::fs::rename(&rebuild, dir).map_err(|e| recovery_io(dir, e))?;
        }
    }
    let damaged = journal::find_damage(dir)?;
    if !damaged.is_empty() {
        let aside = set_aside(dir, true)?;
        for (path, damage) in &damaged {
            tracing::error!(
                journal = %path.display(),
                batches = damage.batches,
                bytes = damage.bytes,
                records = damage.records,
                set_aside = %aside.display(),
                "the store's journal is damaged; its damaged batches are cut out and every intact one is kept"
            );
            journal::cut(path, damage).map_err(|e| recovery_io(path, e))?;
            recovery.lost += damage.records;
        }
        recovery.set_aside.push(aside);
    }
    let db = match open(dir) {
        Ok(db) => db,
        Err(e) if is_damage(&e) => {
            // Read from the store where it is (an interruption leaves it in
            // place, to be read again), then set it aside.
            match super::salvage::salvage(dir, &rebuild, &open) {
                Ok(salvaged) => {
                    let aside = set_aside(dir, false)?;
                    std::fs::rename(&rebuild, dir).map_err(|e| recovery_io(dir, e))?;
                    tracing::error!(
                        error = %e,
                        recovered = salvaged.kept,
                        lost = salvaged.lost,
                        set_aside = %aside.display(),
                        "the store cannot be opened (its version files or a table's index are damaged); every record its tables and journals still hold was read into a new store"
                    );
                    recovery.recovered = salvaged.kept;
                    recovery.lost += salvaged.lost;
                    recovery.set_aside.push(aside);
                }
                Err(salvaging) => {
                    if rebuild.exists() {
                        std::fs::remove_dir_all(&rebuild).map_err(|e| recovery_io(&rebuild, e))?;
                    }
                    let aside = set_aside(dir, false)?;
                    tracing::error!(
                        error = %e,
                        salvage_error = %salvaging,
                        set_aside = %aside.display(),
                        "the store cannot be opened and its records could not be read out; it is set aside and the hub starts with an empty store"
                    );
                    recovery.lost += 1;
                    recovery.set_aside.push(aside);
                }
            }
            return Ok((open(dir)?, recovery));
        }
        Err(e) => return Err(e.into()),
    };
    if readable(&db)? {
        if recovery.found_damage() {
            recovery.recovered = count_records(&db)?;
        }
        return Ok((db, recovery));
    }
    let (copied, lost) = copy_readable(&db, &rebuild, &open)?;
    drop(db);
    let aside = set_aside(dir, false)?;
    std::fs::rename(&rebuild, dir).map_err(|e| recovery_io(dir, e))?;
    tracing::error!(
        recovered = copied,
        lost,
        set_aside = %aside.display(),
        "the store has damaged blocks; every record that could be read was copied into a new store"
    );
    recovery.recovered = copied;
    recovery.lost += lost;
    recovery.set_aside.push(aside);
    Ok((open(dir)?, recovery))
}

/// Whether an error opening or reading the database means damaged files (as
/// opposed to a lock, a permission or a full disk, which are not repaired).
pub(super) fn is_damage(e: &fjall::Error) -> bool {
    use std::io::ErrorKind;
    // (A damaged offset in a table's table of contents makes a read past
    // any file: EINVAL.)
    let io_damage = |e: &std::io::Error| {
        matches!(
            e.kind(),
            ErrorKind::UnexpectedEof | ErrorKind::InvalidData | ErrorKind::InvalidInput
        )
    };
    match e {
        fjall::Error::Io(e) => io_damage(e),
        fjall::Error::Storage(fjall::LsmError::Io(e)) => io_damage(e),
        fjall::Error::Storage(_)
        | fjall::Error::JournalRecovery(_)
        | fjall::Error::InvalidVersion(_)
        | fjall::Error::Decompress(_)
        | fjall::Error::InvalidTrailer
        | fjall::Error::InvalidTag(_)
        | fjall::Error::Unrecoverable => true,
        _ => false,
    }
}

/// Whether every keyspace reads to its end.
fn readable(db: &Database) -> Result<bool, StoreError> {
    for name in db.list_keyspace_names() {
        let keyspace = db.keyspace(&name, KeyspaceCreateOptions::default)?;
        for guard in keyspace.iter() {
            match guard.into_inner() {
                Ok(_) => {}
                Err(e) if is_damage(&e) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(true)
}

/// Copies every record of `db` that reads into a new database at `to`:
/// each keyspace forwards until a damaged block, then backwards from its end
/// down to that block. Returns the records copied and an estimate of those
/// lost: the keys between the two ends for queues (8-byte sequence keys,
/// both ends in one lane), else one per damaged keyspace.
fn copy_readable(
    db: &Database,
    to: &Path,
    open: &impl Fn(&Path) -> Result<Database, fjall::Error>,
) -> Result<(u64, u64), StoreError> {
    let new = open(to)?;
    let (mut copied, mut lost) = (0u64, 0u64);
    for name in db.list_keyspace_names() {
        let old = db.keyspace(&name, KeyspaceCreateOptions::default)?;
        let target = new.keyspace(&name, KeyspaceCreateOptions::default)?;
        let mut batch = new.batch();
        let mut last_forward: Option<fjall::Slice> = None;
        let mut broken = false;
        for guard in old.iter() {
            match guard.into_inner() {
                Ok((k, v)) => {
                    batch.insert(&target, k.clone(), v);
                    last_forward = Some(k);
                    copied += 1;
                }
                Err(_) => {
                    broken = true;
                    break;
                }
            }
            if batch.len() >= 4096 {
                std::mem::replace(&mut batch, new.batch()).commit()?;
            }
        }
        if broken {
            let mut first_backward: Option<fjall::Slice> = None;
            for guard in old.iter().rev() {
                let Ok((k, v)) = guard.into_inner() else {
                    break;
                };
                if last_forward.as_ref().is_some_and(|last| k <= *last) {
                    break;
                }
                batch.insert(&target, k.clone(), v);
                first_backward = Some(k);
                copied += 1;
                if batch.len() >= 4096 {
                    std::mem::replace(&mut batch, new.batch()).commit()?;
                }
            }
            lost += match (last_forward.as_deref(), first_backward.as_deref()) {
                (Some(a), Some(b)) if a.len() == 8 && b.len() == 8 && a[0] == b[0] => {
                    // Keys of one lane ([`super::lane`]) are consecutive.
                    let key = |s: &[u8]| u64::from_be_bytes(s.try_into().unwrap_or_default());
                    key(b).saturating_sub(key(a)).saturating_sub(1).max(1)
                }
                _ => 1,
            };
            tracing::warn!(keyspace = %name.as_ref(), "keyspace has a damaged block; what reads around it is kept");
        }
        batch.commit()?;
    }
    new.persist(PersistMode::SyncAll)?;
    Ok((copied, lost))
}

fn rebuild_dir(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".rebuild");
    dir.with_file_name(name)
}

/// Moves (or, with `copy`, copies) `dir` to `damaged/<name>-<unix seconds>`
/// beside it and returns where it went.
fn set_aside(dir: &Path, copy: bool) -> Result<PathBuf, StoreError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let folder = parent.join("damaged");
    std::fs::create_dir_all(&folder).map_err(|e| recovery_io(&folder, e))?;
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let secs = crate::clock::wall_ms() / 1000;
    let mut target = folder.join(format!("{name}-{secs}"));
    let mut n = 1;
    while target.exists() {
        target = folder.join(format!("{name}-{secs}.{n}"));
        n += 1;
    }
    if copy {
        copy_dir(dir, &target).map_err(|e| recovery_io(&target, e))?;
    } else {
        std::fs::rename(dir, &target).map_err(|e| recovery_io(dir, e))?;
    }
    Ok(target)
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORDS: u64 = 3000;

    fn open_db(dir: &Path) -> Result<Database, fjall::Error> {
        Database::builder(dir).open()
    }

    /// A database with `RECORDS` records, one batch each, in its journal
    /// (and, with `flush`, in a table file too).
    fn fill(dir: &Path, flush: bool) {
        let db = open_db(dir).unwrap();
        let ks = db
            .keyspace("queue", KeyspaceCreateOptions::default)
            .unwrap();
        for i in 0..RECORDS {
            ks.insert(i.to_be_bytes(), vec![b'x'; 100]).unwrap();
        }
        if flush {
            ks.rotate_memtable_and_wait().unwrap();
        }
        db.persist(PersistMode::SyncAll).unwrap();
    }

    fn files(dir: &Path, pick: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(files(&path, pick));
            } else if pick(&path) {
                out.push(path);
            }
        }
        out.sort();
        out
    }

    /// Flips 4 bytes at `at` (a fraction) of the written part of `path`.
    fn flip(path: &Path, at: f64) {
        let mut bytes = std::fs::read(path).unwrap();
        let written = bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
        let pos = (written as f64 * at) as usize;
        for b in &mut bytes[pos..pos + 4] {
            *b ^= 0xFF;
        }
        std::fs::write(path, bytes).unwrap();
    }

    fn keys(db: &Database) -> Vec<u64> {
        let ks = db
            .keyspace("queue", KeyspaceCreateOptions::default)
            .unwrap();
        ks.iter()
            .map(|g| u64::from_be_bytes(g.key().unwrap()[..].try_into().unwrap()))
            .collect()
    }

    fn journal(dir: &Path) -> PathBuf {
        files(dir, &|p| p.extension().is_some_and(|e| e == "jnl"))
            .pop()
            .unwrap()
    }

    #[test]
    fn an_intact_store_opens_with_nothing_recovered_or_set_aside() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("queue");
        fill(&dir, false);
        let (db, recovery) = open(&dir, open_db).unwrap();
        assert_eq!(recovery, Recovery::default());
        assert_eq!(keys(&db).len() as u64, RECORDS);
        assert!(!root.path().join("damaged").exists());
    }

    #[test]
    fn a_damaged_journal_batch_is_cut_out_and_every_batch_after_it_is_kept() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("queue");
        fill(&dir, false);
        flip(&journal(&dir), 0.5);
        // As fjall alone sees it: the hub would not start, or would lose
        // every batch after the damage.
        let copy = root.path().join("copy");
        copy_dir(&dir, &copy).unwrap();
        let alone = open_db(&copy).map(|db| keys(&db).len() as u64);
        assert!(!matches!(alone, Ok(n) if n >= RECORDS - 1), "{alone:?}");

        let (db, recovery) = open(&dir, open_db).unwrap();
        let kept = keys(&db);
        assert!(kept.len() as u64 >= RECORDS - 2, "kept {}", kept.len());
        assert!(kept.contains(&0) && kept.contains(&(RECORDS - 1)));
        assert!((1..=2).contains(&recovery.lost), "{recovery:?}");
        assert_eq!(recovery.recovered, kept.len() as u64);
        assert_eq!(recovery.set_aside.len(), 1);
        assert!(recovery.set_aside[0].starts_with(root.path().join("damaged")));
        assert!(journal(&recovery.set_aside[0]).exists());
    }

    #[test]
    fn a_torn_last_write_is_not_damage() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("queue");
        fill(&dir, false);
        let path = journal(&dir);
        let mut bytes = std::fs::read(&path).unwrap();
        let written = bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
        // The last batch stops half-way, the rest of the file unwritten.
        for b in &mut bytes[written - 60..] {
            *b = 0;
        }
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(journal::scan(&bytes), journal::Damage::default());
        let (db, recovery) = open(&dir, open_db).unwrap();
        assert_eq!(recovery, Recovery::default());
        assert_eq!(keys(&db).len() as u64, RECORDS - 1);
    }

    #[test]
    fn a_damaged_last_batch_is_cut_and_counted() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("queue");
        fill(&dir, false);
        flip(&journal(&dir), 0.9999);
        let (db, recovery) = open(&dir, open_db).unwrap();
        assert_eq!(keys(&db).len() as u64, RECORDS - 1);
        assert_eq!(recovery.lost, 1, "{recovery:?}");
        assert_eq!(recovery.set_aside.len(), 1);
    }

    #[test]
    fn a_damaged_table_block_is_read_around_into_a_new_store() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("queue");
        fill(&dir, true);
        let tables = files(&dir, &|p| {
            p.parent().is_some_and(|d| d.ends_with("tables"))
                && std::fs::metadata(p).unwrap().len() > 100_000
        });
        assert_eq!(tables.len(), 1, "{tables:?}");
        flip(&tables[0], 0.5);
        let (db, recovery) = open(&dir, open_db).unwrap();
        let kept = keys(&db);
        let missing = RECORDS - kept.len() as u64;
        assert!((1..100).contains(&missing), "{missing} missing");
        assert!(kept.contains(&0) && kept.contains(&(RECORDS - 1)));
        assert_eq!(recovery.lost, missing, "{recovery:?}");
        assert_eq!(recovery.recovered, kept.len() as u64);
        assert_eq!(recovery.set_aside.len(), 1);
        assert!(!rebuild_dir(&dir).exists());
        // The new store is whole: it opens again with nothing to recover.
        drop(db);
        let (_, again) = open(&dir, open_db).unwrap();
        assert_eq!(again, Recovery::default());
    }

    fn version_files(dir: &Path) -> Vec<PathBuf> {
        files(dir, &|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with('v') && name[1..].parse::<u64>().is_ok()
        })
    }

    fn tables(dir: &Path, keyspace: &str) -> Vec<PathBuf> {
        files(
            &dir.join("keyspaces").join(keyspace).join("tables"),
            &|_| true,
        )
    }

    /// A store of `RECORDS` records under `root` whose version files are
    /// all damaged.
    fn filled_with_damaged_versions(root: &Path) -> PathBuf {
        let dir = root.join("queue");
        fill(&dir, true);
        for version in version_files(&dir) {
            flip(&version, 0.5);
        }
        dir
    }

    #[test]
    fn a_store_whose_version_files_are_damaged_is_read_from_its_tables_into_a_new_one() {
        let root = tempfile::tempdir().unwrap();
        let dir = filled_with_damaged_versions(root.path());
        assert!(open_db(&dir).is_err(), "the damage did not stop fjall");
        let (db, recovery) = open(&dir, open_db).unwrap();
        assert_eq!(keys(&db), (0..RECORDS).collect::<Vec<_>>());
        assert_eq!(recovery.recovered, RECORDS);
        assert_eq!(recovery.lost, 0);
        assert_eq!(recovery.set_aside.len(), 1);
        assert!(recovery.set_aside[0].join("keyspaces").exists());
        assert!(!rebuild_dir(&dir).exists());
        drop(db);
        let (db, again) = open(&dir, open_db).unwrap();
        assert_eq!(again, Recovery::default(), "the new store is whole");
        assert_eq!(
            db.list_keyspace_names().len(),
            1,
            "no keyspace of the salvage's own"
        );
    }

    #[test]
    fn a_store_whose_table_tail_is_damaged_is_read_block_by_block() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("queue");
        fill(&dir, true);
        let meta = dir.join("keyspaces").join("0");
        let table = files(&dir.join("keyspaces"), &|p| {
            p.parent().is_some_and(|t| t.ends_with("tables")) && !p.starts_with(&meta)
        })
        .pop()
        .expect("a table of the queue");
        // The table's tail (index, meta, table of contents): the first 4
        // bytes from its end whose flipping stops fjall.
        let whole = std::fs::read(&table).unwrap();
        let n = whole.len();
        let stops = (8..1024).step_by(4).find(|back| {
            let mut bytes = whole.clone();
            for b in &mut bytes[n - back..n - back + 4] {
                *b ^= 0xFF;
            }
            std::fs::write(&table, bytes).unwrap();
            open_db(&dir).is_err()
        });
        assert!(stops.is_some(), "no damage to the table's tail stops fjall");
        let (db, recovery) = open(&dir, open_db).unwrap();
        assert_eq!(keys(&db), (0..RECORDS).collect::<Vec<_>>());
        assert_eq!(recovery.lost, 0);
    }

    #[test]
    fn a_store_that_does_not_open_keeps_its_journal_writes_and_deletions_over_its_tables() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("queue");
        fill(&dir, true);
        {
            // after the flush, in the journal only: deletions and new records
            let db = open_db(&dir).unwrap();
            let ks = db
                .keyspace("queue", KeyspaceCreateOptions::default)
                .unwrap();
            for i in 0..1000u64 {
                ks.remove(i.to_be_bytes()).unwrap();
            }
            for i in RECORDS..RECORDS + 500 {
                // one value large enough for the journal to compress it
                let value = if i == RECORDS {
                    vec![b'y'; 8192]
                } else {
                    vec![b'y'; 10]
                };
                ks.insert(i.to_be_bytes(), value).unwrap();
            }
            db.persist(PersistMode::SyncAll).unwrap();
        }
        for version in version_files(&dir) {
            flip(&version, 0.5);
        }
        let (db, recovery) = open(&dir, open_db).unwrap();
        assert_eq!(keys(&db), (1000..RECORDS + 500).collect::<Vec<_>>());
        assert_eq!(recovery.recovered, RECORDS + 500 - 1000);
        let ks = db
            .keyspace("queue", KeyspaceCreateOptions::default)
            .unwrap();
        assert_eq!(ks.get(RECORDS.to_be_bytes()).unwrap().unwrap().len(), 8192);
    }

    #[test]
    fn a_rebuild_done_but_not_yet_moved_in_place_is_moved_in_at_the_next_start() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("queue");
        fill(&rebuild_dir(&dir), true);
        let (db, recovery) = open(&dir, open_db).unwrap();
        assert_eq!(keys(&db), (0..RECORDS).collect::<Vec<_>>());
        assert_eq!(recovery, Recovery::default());
        assert!(!rebuild_dir(&dir).exists());
    }

    #[test]
    fn a_store_whose_keyspace_names_cannot_be_read_starts_empty_and_counts_a_loss() {
        let root = tempfile::tempdir().unwrap();
        let dir = filled_with_damaged_versions(root.path());
        for table in tables(&dir, "0") {
            flip(&table, 0.1);
        }
        let (db, recovery) = open(&dir, open_db).unwrap();
        assert!(keys(&db).is_empty());
        assert_eq!(recovery.set_aside.len(), 1);
        assert!(recovery.lost >= 1);
    }
}
