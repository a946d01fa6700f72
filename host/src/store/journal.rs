//! fjall's journal files, read as fjall 3 writes them: batches of
//! `Start(count, seqno)`, `count` items, `End(xxh3 of the items, magic)`.
//!
//! Owns the reading of their bytes: where a batch is damaged ([`scan`],
//! [`cut`]) and what an intact one holds ([`for_each_item`]).

use std::ops::Range;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use super::StoreError;

const START: u8 = 1;
const ITEM: u8 = 2;
const END: u8 = 3;
const CLEAR: u8 = 4;
const MAGIC: &[u8] = b"FJL\x03";

/// The damaged parts of one journal: byte ranges followed by an intact
/// batch.
#[derive(Debug, Default, PartialEq)]
pub struct Damage {
    pub ranges: Vec<Range<usize>>,
    pub batches: u64,
    pub bytes: u64,
    /// Records the damaged batches say they held (one for a batch whose
    /// own header is unreadable).
    pub records: u64,
}

/// The journals in `dir` that have damage followed by intact batches.
pub fn find_damage(dir: &Path) -> Result<Vec<(PathBuf, Damage)>, StoreError> {
    let mut found = Vec::new();
    for path in files(dir)? {
        let bytes = std::fs::read(&path).map_err(|e| super::recovery_io(&path, e))?;
        let damage = scan(&bytes);
        if !damage.ranges.is_empty() {
            found.push((path, damage));
        }
    }
    Ok(found)
}

/// The journal files in `dir`, oldest first.
pub fn files(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(found);
    };
    for entry in entries {
        let path = entry.map_err(|e| super::recovery_io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "jnl") {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// One write of an intact batch.
pub struct Item<'a> {
    pub keyspace: u64,
    pub key: &'a [u8],
    pub value: &'a [u8],
    /// The batch's sequence number.
    pub seqno: u64,
    pub value_type: lsm_tree::ValueType,
}

/// Calls `f` on each item of each intact batch of the journal `bytes`
/// (damaged stretches are stepped over, as [`scan`] finds them).
/// Returns the items that could not be decoded (an unknown value type,
/// an lz4 value that does not decompress). A keyspace's clearing is not
/// replayed: the hub never clears one.
pub fn for_each_item(bytes: &[u8], mut f: impl FnMut(Item<'_>)) -> u64 {
    let mut skipped = 0;
    let mut pos = 0;
    while pos < bytes.len() {
        if let Parse::Intact(end) = parse(bytes, pos) {
            skipped += items(&bytes[pos..end], &mut f);
            pos = end;
            continue;
        }
        match (pos + 1..bytes.len())
            .find(|&p| bytes[p] == START && matches!(parse(bytes, p), Parse::Intact(_)))
        {
            Some(next) => pos = next,
            None => break,
        }
    }
    skipped
}

/// The items of one intact batch (`batch`: its bytes, start to end).
fn items(batch: &[u8], f: &mut impl FnMut(Item<'_>)) -> u64 {
    let mut r = Reader {
        bytes: batch,
        pos: 1 + 4, // START, count
        short: false,
    };
    let Some(seqno) = r.u64() else { return 0 };
    let mut skipped = 0;
    loop {
        match r.u8() {
            Some(ITEM) => {
                let (Some(kind), Some(compression), Some(keyspace), Some(key_len)) =
                    (r.u8(), r.u8(), r.u64(), r.u16())
                else {
                    return skipped + 1;
                };
                let (Some(plain_len), Some(len)) = (r.u32(), r.u32()) else {
                    return skipped + 1;
                };
                let (Some(key), Some(value)) = (r.take(usize::from(key_len)), r.take(len as usize))
                else {
                    return skipped + 1;
                };
                let value = match compression {
                    0 => std::borrow::Cow::Borrowed(value),
                    1 => match lz4_flex::decompress(value, plain_len as usize) {
                        Ok(v) => std::borrow::Cow::Owned(v),
                        Err(_) => {
                            skipped += 1;
                            continue;
                        }
                    },
                    _ => {
                        skipped += 1;
                        continue;
                    }
                };
                let Ok(value_type) = lsm_tree::ValueType::try_from(kind) else {
                    skipped += 1;
                    continue;
                };
                f(Item {
                    keyspace,
                    key,
                    value: &value,
                    seqno,
                    value_type,
                });
            }
            Some(CLEAR) => {
                let _ = r.skip(8);
            }
            _ => return skipped,
        }
    }
}

/// Rewrites the journal at `path` without its damaged ranges.
pub fn cut(path: &Path, damage: &Damage) -> std::io::Result<()> {
    let bytes = std::fs::read(path)?;
    let mut kept = Vec::with_capacity(bytes.len());
    let mut from = 0;
    for range in &damage.ranges {
        kept.extend_from_slice(&bytes[from..range.start]);
        from = range.end;
    }
    kept.extend_from_slice(&bytes[from..]);
    crate::durable_file::replace(path, &kept)
}

/// Finds each run of bytes that is not an intact batch: damage followed
/// by an intact batch, or a last batch that is complete but does not
/// check (bit rot, not a crash). A torn last write (a batch that stops
/// where the journal's zeroed, unwritten space begins) is left alone:
/// fjall drops it, and it was never acknowledged.
pub fn scan(bytes: &[u8]) -> Damage {
    let mut damage = Damage::default();
    let mut pos = 0;
    while pos < bytes.len() {
        let parsed = parse(bytes, pos);
        if let Parse::Intact(end) = parsed {
            pos = end;
            continue;
        }
        let next = (pos + 1..bytes.len())
            .find(|&p| bytes[p] == START && matches!(parse(bytes, p), Parse::Intact(_)));
        let end = match (next, parsed) {
            (Some(next), _) => next,
            (None, Parse::Torn) => break,
            (None, _) => bytes.len(),
        };
        damage.batches += 1;
        damage.bytes += (end - pos) as u64;
        damage.records += claimed_count(bytes, pos, end);
        damage.ranges.push(pos..end);
        pos = end;
    }
    damage
}

/// The item count a damaged batch's header gives, if it is readable
/// and fits its bytes; else one.
fn claimed_count(bytes: &[u8], pos: usize, end: usize) -> u64 {
    let mut r = Reader {
        bytes,
        pos,
        short: false,
    };
    match (r.u8(), r.u32()) {
        // An item takes at least 23 bytes.
        (Some(START), Some(n)) if (n as usize) * 23 <= end - pos => u64::from(n.max(1)),
        _ => 1,
    }
}

enum Parse {
    /// An intact batch, ending there.
    Intact(usize),
    /// Nothing but the unwritten end of the journal, or a batch that
    /// runs into it or past the end of the file.
    Torn,
    Broken,
}

fn parse(bytes: &[u8], pos: usize) -> Parse {
    let mut r = Reader {
        bytes,
        pos,
        short: false,
    };
    match batch(&mut r) {
        Some(Some(end)) => Parse::Intact(end),
        Some(None) => Parse::Broken,
        None if r.short || bytes[r.pos..].iter().all(|&b| b == 0) => Parse::Torn,
        None => Parse::Broken,
    }
}

/// Reads the batch at `r`: `Some(Some(end))` if intact, `Some(None)` if
/// complete but not intact, `None` where it stops making sense (`r` is
/// left there).
fn batch(r: &mut Reader<'_>) -> Option<Option<usize>> {
    if r.u8()? != START {
        r.pos -= 1;
        return None;
    }
    let count = r.u32()?;
    r.skip(8)?; // seqno
    let body = r.pos;
    let mut items = 0u32;
    loop {
        let at = r.pos;
        match r.u8()? {
            ITEM => {
                r.skip(1 + 1 + 8)?; // value type, compression, keyspace id
                let key = usize::from(r.u16()?);
                r.skip(4)?; // value length before compression
                let value = r.u32()? as usize;
                r.skip(key.checked_add(value)?)?;
                items = items.checked_add(1)?;
            }
            CLEAR => r.skip(8)?,
            END => {
                let sum = r.u64()?;
                let magic = r.take(MAGIC.len())?;
                let intact = items == count && magic == MAGIC && xxh3_64(&r.bytes[body..at]) == sum;
                return Some(intact.then_some(r.pos));
            }
            _ => {
                r.pos = at;
                return None;
            }
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// A read ran past the end of the journal.
    short: bool,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self
            .pos
            .checked_add(n)
            .and_then(|end| self.bytes.get(self.pos..end));
        let Some(s) = s else {
            self.short = true;
            return None;
        };
        let end = self.pos + n;
        self.pos = end;
        Some(s)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(drop)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|s| u32::from_le_bytes(s.try_into().unwrap_or_default()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
    }
}
