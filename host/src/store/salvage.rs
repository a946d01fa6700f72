//! Reading the records out of a fjall database that does not open (its
//! version files or a table's index damaged), into a new one.
//!
//! Owns the walk over the old folder's files, as fjall 3 and lsm-tree 3
//! write them, and nothing about what the records mean:
//! - each table file is read block by block from its start: its data
//!   blocks come first, each with its own checksum, so a damaged index,
//!   filter or trailer after them does not matter. A damaged data block
//!   ends that table's read (the rest of that table is counted lost);
//! - the keyspaces' names come from the meta keyspace's tables (keyspace 0);
//! - each journal's intact batches give what was not in a table yet.
//!
//! A key found in several places keeps its newest version (the highest
//! sequence number), and a key whose newest version is a deletion is
//! dropped. What is kept is written into the new database through fjall.
//! Without the version files there is no telling a live table from one a
//! compaction had just replaced and not yet deleted (after a crash), so a
//! record deleted since can come back: upstream, a duplicate, which
//! at-least-once allows.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use fjall::{Database, KeyspaceCreateOptions, PersistMode};
use lsm_tree::coding::Decode;
use lsm_tree::table::block::decoder::ParsedItem;
use lsm_tree::table::block::{BlockType, Header};
use lsm_tree::table::{Block, DataBlock};
use lsm_tree::{CompressionType, ValueType};

use super::journal;
use super::StoreError;

/// The meta keyspace's id, and its key prefix for a keyspace's name.
const META: u64 = 0;
const NAME_PREFIX: u8 = b'n';
/// The new database's own keyspace of each key's newest sequence number,
/// deleted once done.
const SEEN: &str = "salvage-seen";

/// What a salvage kept and could not.
#[derive(Debug, Default, PartialEq)]
pub struct Salvaged {
    /// Records in the new database.
    pub kept: u64,
    /// Records known lost, at least (one per table read only in part, one
    /// per record that could not be decoded).
    pub lost: u64,
}

/// One version of a key, as found in a table or a journal.
struct Version<'a> {
    keyspace: u64,
    key: &'a [u8],
    value: &'a [u8],
    seqno: u64,
    value_type: ValueType,
}

/// Reads every record that can be read out of the database folder `old`
/// into a new database at `to` (made with `open`).
pub fn salvage(
    old: &Path,
    to: &Path,
    open: &impl Fn(&Path) -> Result<Database, fjall::Error>,
) -> Result<Salvaged, StoreError> {
    let mut lost = 0u64;
    let names = keyspace_names(old, &mut lost);
    let db = open(to)?;
    let seen = db.keyspace(SEEN, KeyspaceCreateOptions::default)?;
    let mut targets = HashMap::new();
    let mut keep = |v: Version<'_>| -> Result<(), StoreError> {
        let Some(name) = names.get(&v.keyspace) else {
            return Ok(());
        };
        let mut seen_key = v.keyspace.to_be_bytes().to_vec();
        seen_key.extend_from_slice(v.key);
        if let Some(newest) = seen.get(&seen_key)? {
            let newest = u64::from_be_bytes(newest[..8].try_into().unwrap_or_default());
            if newest >= v.seqno {
                return Ok(());
            }
        }
        seen.insert(&seen_key, v.seqno.to_be_bytes())?;
        if !targets.contains_key(&v.keyspace) {
            let t = db.keyspace(name, KeyspaceCreateOptions::default)?;
            targets.insert(v.keyspace, t);
        }
        let target = &targets[&v.keyspace];
        match v.value_type {
            ValueType::Value => target.insert(v.key, v.value)?,
            // A value kept in a blob file: the hub's stores keep none.
            ValueType::Indirection => {
                target.remove(v.key)?;
                lost += 1;
            }
            ValueType::Tombstone | ValueType::WeakTombstone => target.remove(v.key)?,
        }
        Ok(())
    };
    let mut table_lost = 0;
    for (keyspace, table) in table_files(old) {
        if keyspace == META {
            continue;
        }
        let file = std::fs::File::open(&table).map_err(|e| super::recovery_io(&table, e))?;
        let whole = for_each_in_table(file, keyspace, &mut keep)?;
        if !whole {
            tracing::warn!(table = %table.display(), "a table file has a damaged data block; what reads before it is kept");
            table_lost += 1;
        }
    }
    for path in journal::files(old)? {
        let bytes = std::fs::read(&path).map_err(|e| super::recovery_io(&path, e))?;
        let mut result = Ok(());
        let skipped = journal::for_each_item(&bytes, |item| {
            if result.is_ok() {
                result = keep(Version {
                    keyspace: item.keyspace,
                    key: item.key,
                    value: item.value,
                    seqno: item.seqno,
                    value_type: item.value_type,
                });
            }
        });
        result?;
        table_lost += skipped;
    }
    drop(keep);
    drop(targets);
    db.delete_keyspace(seen)?;
    db.persist(PersistMode::SyncAll)?;
    let kept = super::count_records(&db)?;
    Ok(Salvaged {
        kept,
        lost: lost + table_lost,
    })
}

/// The keyspaces' names, from the meta keyspace's tables: `'n' + id` ->
/// name, newest version of each.
fn keyspace_names(old: &Path, lost: &mut u64) -> HashMap<u64, String> {
    let mut newest: HashMap<Vec<u8>, (u64, Option<Vec<u8>>)> = HashMap::new();
    for (keyspace, table) in table_files(old) {
        if keyspace != META {
            continue;
        }
        let Ok(file) = std::fs::File::open(&table) else {
            *lost += 1;
            continue;
        };
        let whole = for_each_in_table(file, META, &mut |v: Version<'_>| {
            let value = (v.value_type == ValueType::Value).then(|| v.value.to_vec());
            match newest.get(v.key) {
                Some((seqno, _)) if *seqno >= v.seqno => {}
                _ => {
                    newest.insert(v.key.to_vec(), (v.seqno, value));
                }
            }
            Ok::<_, StoreError>(())
        });
        if !matches!(whole, Ok(true)) {
            *lost += 1;
        }
    }
    newest
        .into_iter()
        .filter_map(|(key, (_, value))| {
            let (&prefix, id) = key.split_first()?;
            let id: [u8; 8] = id.try_into().ok()?;
            let name = String::from_utf8(value?).ok()?;
            let valid = !name.is_empty() && name.len() <= usize::from(u8::MAX) && name != SEEN;
            (prefix == NAME_PREFIX && valid).then(|| (u64::from_be_bytes(id), name))
        })
        .collect()
}

/// Every table file in `old`, with its keyspace's id.
fn table_files(old: &Path) -> Vec<(u64, PathBuf)> {
    let mut found = Vec::new();
    let Ok(keyspaces) = std::fs::read_dir(old.join("keyspaces")) else {
        return found;
    };
    for keyspace in keyspaces.flatten() {
        let Some(id) = keyspace.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(tables) = std::fs::read_dir(keyspace.path().join("tables")) else {
            continue;
        };
        for table in tables.flatten() {
            if table.file_type().is_ok_and(|t| t.is_file()) {
                found.push((id, table.path()));
            }
        }
    }
    found.sort();
    found
}

/// Calls `f` on each record of a table file, data block after data block
/// from its start (one block in memory at a time); `Ok(false)` when a
/// damaged block stopped the read before the table's first block of
/// another kind.
fn for_each_in_table<E>(
    file: impl Read,
    keyspace: u64,
    f: &mut impl FnMut(Version<'_>) -> Result<(), E>,
) -> Result<bool, E> {
    let mut reader = std::io::BufReader::new(file);
    loop {
        let block = match next_data_block(&mut reader) {
            Next::Data(block) => block,
            Next::Done => return Ok(true),
            Next::Damaged => return Ok(false),
        };
        let data = DataBlock::new(block);
        let slice = data.as_slice().clone();
        // The block's checksum held; a decoder that trips all the same costs
        // this table's rest, not the start.
        let items = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            data.iter()
                .map(|item| item.materialize(&slice))
                .collect::<Vec<_>>()
        }));
        let Ok(items) = items else {
            return Ok(false);
        };
        for item in &items {
            f(Version {
                keyspace,
                key: &item.key.user_key[..],
                value: &item.value[..],
                seqno: item.key.seqno,
                value_type: item.key.value_type,
            })?;
        }
    }
}

enum Next {
    Data(Block),
    /// The end of the file, or a block of another kind: the data blocks
    /// are done.
    Done,
    /// A block that does not check, or a file that ends inside one.
    Damaged,
}

/// A block is at most this long: a few KiB, or one large message's value.
const MAX_BLOCK: u32 = 64 << 20;

fn next_data_block(reader: &mut impl Read) -> Next {
    let mut head = vec![0u8; Header::serialized_len()];
    let mut got = 0;
    while got < head.len() {
        match reader.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Next::Done,
            Ok(0) | Err(_) => return Next::Damaged,
            Ok(n) => got += n,
        }
    }
    let Ok(header) = Header::decode_from(&mut &head[..]) else {
        return Next::Damaged;
    };
    if header.block_type != BlockType::Data {
        return Next::Done;
    }
    if header.data_length > MAX_BLOCK || header.uncompressed_length > MAX_BLOCK {
        return Next::Damaged;
    }
    let mut data = vec![0u8; header.data_length as usize];
    if reader.read_exact(&mut data).is_err() {
        return Next::Damaged;
    }
    // Compressed blocks (lz4, the deeper levels) are shorter than their
    // data; lz4 never makes a block exactly as long as it was.
    let compression = if header.data_length == header.uncompressed_length {
        CompressionType::None
    } else {
        CompressionType::Lz4
    };
    match Block::from_reader(&mut head.as_slice().chain(data.as_slice()), compression) {
        Ok(block) => Next::Data(block),
        Err(_) => Next::Damaged,
    }
}
