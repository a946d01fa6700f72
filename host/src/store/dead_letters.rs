//! The dead-letter area: queued messages the upstream would not take.
//!
//! Owns the `dead-letters` keyspace of the queue's database. A message is
//! moved here from the head of the queue, in one fsynced batch, when the
//! forwarder has seen the upstream refuse it too many times in a row; the
//! queue behind it then flows on. Entries keep their queue key (so they
//! list in store order), the reason and when it happened, and the record as
//! it was queued. They leave only by `replay` (appended again at the tail,
//! with a fresh enqueue time) or `purge`. Deciding what to move is the
//! forwarder's job, not this module's.
//!
//! Entry layout: `[reason_len: u16 BE][reason][dead_ms: u64 BE][record]`.

use std::sync::atomic::Ordering;

use fjall::PersistMode;

use super::record::{CorruptRecord, Record};
use super::{key_of, lane, Store, StoreError};

/// One dead letter as listed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// Its key in the queue when it was moved.
    pub key: u64,
    pub reason: String,
    /// When it was moved (ms since the Unix epoch).
    pub dead_ms: u64,
    pub enqueued_ms: u64,
    pub topic: String,
    pub payload_bytes: usize,
}

/// Which dead letters an operation applies to.
#[derive(Debug, Clone)]
pub enum Selection {
    All,
    Keys(Vec<u64>),
}

impl Selection {
    fn contains(&self, key: u64) -> bool {
        match self {
            Selection::All => true,
            Selection::Keys(keys) => keys.contains(&key),
        }
    }
}

fn encode(reason: &str, dead_ms: u64, record: &[u8]) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(2 + reason.len() + 8 + record.len());
    out.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    out.extend_from_slice(reason);
    out.extend_from_slice(&dead_ms.to_be_bytes());
    out.extend_from_slice(record);
    out
}

pub(crate) fn decode(bytes: &[u8]) -> Result<(String, u64, &[u8]), CorruptRecord> {
    let short = CorruptRecord("dead letter shorter than its header");
    let len = u16::from_be_bytes(bytes.get(..2).ok_or(short)?.try_into().expect("2")) as usize;
    let reason = bytes.get(2..2 + len).ok_or(short)?;
    let dead = bytes.get(2 + len..10 + len).ok_or(short)?;
    Ok((
        String::from_utf8_lossy(reason).into_owned(),
        u64::from_be_bytes(dead.try_into().expect("8")),
        &bytes[10 + len..],
    ))
}

impl Store {
    /// Moves the message at the head of its lane (which must be `key`) to
    /// the dead-letter area, durably, and advances the lane's head past it.
    /// Returns false when `key` is not the head (nothing is moved).
    pub fn move_head_to_dead_letters(&self, key: u64, reason: &str) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let lane = lane::lane_of(key);
        if key != self.head(lane) {
            return Ok(false);
        }
        let Some(value) = inner.queue.get(key.to_be_bytes())? else {
            return Ok(false);
        };
        let mut batch = inner.db.batch().durability(Some(PersistMode::SyncData));
        let entry = encode(reason, crate::clock::now_ms(), &value);
        let entry_len = entry.len() as u64;
        batch.insert(&inner.dead, key.to_be_bytes(), entry);
        let head = lane::meta_key(super::HEAD, lane);
        batch.insert(&inner.meta, head, (key + 1).to_be_bytes());
        batch.commit()?;
        inner.head.set(lane, key + 1);
        let size = value.len() as u64;
        inner
            .bytes
            .fetch_sub(size.min(self.bytes()), Ordering::AcqRel);
        inner.dead_count.fetch_add(1, Ordering::AcqRel);
        inner.dead_bytes.fetch_add(entry_len, Ordering::AcqRel);
        Ok(true)
    }

    /// Bytes the dead letters hold (they count against the quota).
    pub fn dead_letter_bytes(&self) -> u64 {
        self.inner.dead_bytes.load(Ordering::Acquire)
    }

    /// How many dead letters there are.
    pub fn dead_letter_count(&self) -> u64 {
        self.inner.dead_count.load(Ordering::Acquire)
    }

    /// The dead letters in store order (at most `limit`).
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let mut out = Vec::new();
        for guard in self.inner.dead.iter().take(limit) {
            let (k, v) = guard.into_inner()?;
            let (reason, dead_ms, record) = decode(&v)?;
            let r = super::record::RecordRef::parse(record)?;
            out.push(DeadLetter {
                key: key_of(&k),
                reason,
                dead_ms,
                enqueued_ms: r.enqueued_ms,
                topic: r.topic.to_string(),
                payload_bytes: r.payload.len(),
            });
        }
        Ok(out)
    }

    /// The selected dead letters as records to queue again, enqueued at
    /// `now_ms` (their time to live starts again) in the lane they were
    /// in, with their keys.
    pub fn dead_letter_records(
        &self,
        which: &Selection,
        now_ms: u64,
    ) -> Result<Vec<(u64, Record)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.inner.dead.iter() {
            let (k, v) = guard.into_inner()?;
            let key = key_of(&k);
            if !which.contains(key) {
                continue;
            }
            let (_, _, record) = decode(&v)?;
            let mut record = Record::decode(record)?;
            record.enqueued_ms = now_ms;
            record.priority = lane::lane_of(key) as u8;
            out.push((key, record));
        }
        Ok(out)
    }

    /// Deletes the selected dead letters, durably; returns how many.
    pub fn purge_dead_letters(&self, which: &Selection) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let mut batch = inner.db.batch().durability(Some(PersistMode::SyncData));
        let mut n = 0;
        let mut bytes = 0;
        for guard in inner.dead.iter() {
            let (k, v) = guard.into_inner()?;
            if which.contains(key_of(&k)) {
                batch.remove(&inner.dead, k);
                n += 1;
                bytes += v.len() as u64;
            }
        }
        if n > 0 {
            batch.commit()?;
            inner.dead_count.fetch_sub(n, Ordering::AcqRel);
            inner.dead_bytes.fetch_sub(bytes, Ordering::AcqRel);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{writer, AppendError};
    use bytes::Bytes;

    fn rec(i: u64) -> Record {
        Record {
            enqueued_ms: 1000 + i,
            topic: format!("t/{i}"),
            payload: Bytes::from(vec![b'x'; i as usize]),
            ttl_secs: None,
            priority: 0,
        }
    }

    #[tokio::test]
    async fn dead_letters_count_against_the_quota_until_purged_and_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let quota = rec(1).encoded_len() as u64 * 4;
        {
            let store = Store::open(dir.path()).unwrap();
            let (appender, join) = writer::spawn(store.clone(), quota, 64);
            appender.append((1..=3).map(rec).collect()).await.unwrap();
            assert!(store
                .move_head_to_dead_letters(store.head(0), "refused")
                .unwrap());
            assert!(store
                .move_head_to_dead_letters(store.head(0), "refused")
                .unwrap());
            assert!(store.dead_letter_bytes() > 2 * rec(1).encoded_len() as u64);
            let err = appender.append(vec![rec(4), rec(5)]).await.unwrap_err();
            assert!(
                matches!(err, AppendError::QuotaExceeded { .. }),
                "one queued and two dead leave no room for two: {err}"
            );
            drop(appender);
            join.join().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let dead_bytes = store.dead_letter_bytes();
        assert!(dead_bytes > 0, "recounted on open");
        let (appender, join) = writer::spawn(store.clone(), quota, 64);
        assert!(appender.append(vec![rec(4), rec(5)]).await.is_err());
        assert_eq!(store.purge_dead_letters(&Selection::All).unwrap(), 2);
        assert_eq!(store.dead_letter_bytes(), 0);
        appender.append(vec![rec(4), rec(5)]).await.unwrap();
        drop(appender);
        join.join().unwrap();
    }

    #[tokio::test]
    async fn a_dead_letter_leaves_the_queue_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let (appender, join) = writer::spawn(store.clone(), u64::MAX, 64);
            appender.append((1..=3).map(rec).collect()).await.unwrap();
            let head = store.head(0);
            assert!(
                !store
                    .move_head_to_dead_letters(head + 1, "not the head")
                    .unwrap(),
                "only the head moves"
            );
            let bytes_before = store.bytes();
            assert!(store.move_head_to_dead_letters(head, "refused").unwrap());
            assert_eq!(store.head(0), head + 1);
            assert_eq!(store.bytes(), bytes_before - rec(1).encoded_len() as u64);
            drop(appender);
            join.join().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.stats().unwrap().depth, 2, "the rest stays queued");
        assert_eq!(store.dead_letter_count(), 1);
        let dead = store.dead_letters(10).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].topic.as_str(), dead[0].reason.as_str()),
            ("t/1", "refused")
        );
        assert_eq!(dead[0].payload_bytes, 1);
    }

    #[tokio::test]
    async fn dead_letters_are_replayed_with_a_fresh_time_and_purged_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (appender, join) = writer::spawn(store.clone(), u64::MAX, 64);
        appender.append((1..=3).map(rec).collect()).await.unwrap();
        let first = store.head(0);
        for key in first..first + 3 {
            assert!(store.move_head_to_dead_letters(key, "r").unwrap());
        }
        let replay = store
            .dead_letter_records(&Selection::Keys(vec![first + 1]), 99_999)
            .unwrap();
        assert_eq!(replay.len(), 1);
        assert_eq!(replay[0].1.topic, "t/2");
        assert_eq!(replay[0].1.enqueued_ms, 99_999);
        assert_eq!(
            store
                .purge_dead_letters(&Selection::Keys(vec![first + 1]))
                .unwrap(),
            1
        );
        assert_eq!(store.dead_letter_count(), 2);
        assert_eq!(store.purge_dead_letters(&Selection::All).unwrap(), 2);
        assert!(store.dead_letters(10).unwrap().is_empty());
        drop(appender);
        join.join().unwrap();
    }
}
