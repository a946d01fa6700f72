//! Small durable documents beside the queue (device and module twins, the
//! local broker's sessions and retained messages): a keyspace
//! `key -> bytes` in the store's database.
//!
//! Owns only reading and writing them: [`Documents::put`] is fsynced before
//! it returns; [`Documents::insert`] and [`Documents::delete`] are not, and
//! [`Documents::commit`] makes every earlier write durable at once (a group
//! commit). All of it blocks: call it off the async runtime. What a
//! document holds (and whether it is encrypted) is its owner's business.

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::{Store, StoreError};

/// One entry: its raw key and value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// One named keyspace of documents.
#[derive(Clone)]
pub struct Documents {
    db: Database,
    keyspace: Keyspace,
}

impl Store {
    /// The documents kept under `name` (created on first use).
    pub fn documents(&self, name: &str) -> Result<Documents, StoreError> {
        let db = self.inner.db.clone();
        let keyspace = db.keyspace(name, KeyspaceCreateOptions::default)?;
        Ok(Documents { db, keyspace })
    }
}

impl Documents {
    /// Every document, by key order.
    pub fn all(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let entries = self.entries()?.into_iter();
        Ok(entries
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .collect())
    }

    /// Removes the document under `key` (made durable with the next write
    /// or the journal's own flush: a crash may bring it back).
    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        Ok(self.keyspace.remove(key.as_bytes())?)
    }

    /// Every entry with its raw key, by key order.
    pub fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        for guard in self.keyspace.iter() {
            let (k, v) = guard.into_inner()?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// The keys starting with `prefix`, by key order.
    pub fn keys_with_prefix(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        for guard in self.keyspace.prefix(prefix) {
            out.push(guard.key()?.to_vec());
        }
        Ok(out)
    }

    /// Whether an entry is under `key`.
    pub fn contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.keyspace.contains_key(key)?)
    }

    /// Writes `value` under `key`, durable with the next [`Documents::commit`].
    pub fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        Ok(self.keyspace.insert(key, value)?)
    }

    /// Removes the entry under `key`, durable with the next [`Documents::commit`].
    pub fn delete(&self, key: &[u8]) -> Result<(), StoreError> {
        Ok(self.keyspace.remove(key)?)
    }

    /// Makes every earlier write durable (blocks for the fsync).
    pub fn commit(&self) -> Result<(), StoreError> {
        Ok(self.db.persist(PersistMode::SyncAll)?)
    }

    /// Replaces the document under `key`, durably (blocks for the fsync).
    pub fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.keyspace.insert(key.as_bytes(), value)?;
        Ok(self.db.persist(PersistMode::SyncAll)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_written_is_there_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let docs = store.documents("twins").unwrap();
            docs.put("d1", b"one").unwrap();
            docs.put("d2/m", b"two").unwrap();
            docs.put("d1", b"three").unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let all = store.documents("twins").unwrap().all().unwrap();
        assert_eq!(
            all,
            vec![
                ("d1".to_string(), b"three".to_vec()),
                ("d2/m".to_string(), b"two".to_vec())
            ]
        );
    }
}
