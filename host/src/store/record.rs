//! The on-disk form of one queued message.
//!
//! Layout, version 1 (the hub's default time to live applies):
//! `[1u8][enqueued_ms: u64 BE][topic_len: u16 BE][topic][payload]`;
//! version 2 (a route's own time to live):
//! `[2u8][enqueued_ms: u64 BE][topic_len: u16 BE][ttl_secs: u32 BE][topic][payload]`.

use bytes::Bytes;

const VERSION: u8 = 1;
const VERSION_TTL: u8 = 2;
const HEADER: usize = 1 + 8 + 2;

/// One upstream-bound message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Wall-clock milliseconds since the Unix epoch when the hub received it.
    pub enqueued_ms: u64,
    /// The topic it is published on upstream (property bag included).
    pub topic: String,
    pub payload: Bytes,
    /// The route's time to live; `None`: the hub's default.
    pub ttl_secs: Option<u32>,
    /// The route's priority (0 first ... 9), which is the lane of the
    /// upstream queue it waits in ([`super::lane`]). Not encoded: a stored
    /// record's lane is its key's, and a decoded record says 0.
    pub priority: u8,
}

#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("corrupt queue record: {0}")]
pub struct CorruptRecord(pub(super) &'static str);

impl Record {
    pub fn encoded_len(&self) -> usize {
        HEADER + self.ttl_secs.map_or(0, |_| 4) + self.topic.len() + self.payload.len()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(if self.ttl_secs.is_some() {
            VERSION_TTL
        } else {
            VERSION
        });
        out.extend_from_slice(&self.enqueued_ms.to_be_bytes());
        out.extend_from_slice(&(self.topic.len() as u16).to_be_bytes());
        if let Some(ttl) = self.ttl_secs {
            out.extend_from_slice(&ttl.to_be_bytes());
        }
        out.extend_from_slice(self.topic.as_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CorruptRecord> {
        let view = RecordRef::parse(bytes)?;
        Ok(Self {
            enqueued_ms: view.enqueued_ms,
            topic: view.topic.to_string(),
            payload: Bytes::copy_from_slice(view.payload),
            ttl_secs: view.ttl_secs,
            priority: 0,
        })
    }

    /// The record as the forwarder reads a stored one.
    pub fn as_view(&self) -> RecordRef<'_> {
        RecordRef {
            enqueued_ms: self.enqueued_ms,
            topic: &self.topic,
            payload: &self.payload,
            ttl_secs: self.ttl_secs,
        }
    }

    /// Reads only the timestamp (for TTL sweeps and queue age).
    pub fn enqueued_ms_of(bytes: &[u8]) -> Result<u64, CorruptRecord> {
        let ts = bytes
            .get(1..9)
            .ok_or(CorruptRecord("shorter than its header"))?;
        Ok(u64::from_be_bytes(ts.try_into().expect("8 bytes")))
    }
}

/// A record read in place, without copying (the forwarder's hot path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub enqueued_ms: u64,
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub ttl_secs: Option<u32>,
}

impl<'a> RecordRef<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, CorruptRecord> {
        if bytes.len() < HEADER {
            return Err(CorruptRecord("shorter than its header"));
        }
        let (ttl_secs, start) = match bytes[0] {
            VERSION => (None, HEADER),
            VERSION_TTL => {
                let ttl = bytes
                    .get(HEADER..HEADER + 4)
                    .ok_or(CorruptRecord("shorter than its header"))?;
                let ttl = u32::from_be_bytes(ttl.try_into().expect("4 bytes"));
                (Some(ttl), HEADER + 4)
            }
            _ => return Err(CorruptRecord("unknown version")),
        };
        let enqueued_ms = Record::enqueued_ms_of(bytes)?;
        let topic_len = u16::from_be_bytes([bytes[9], bytes[10]]) as usize;
        let topic = bytes
            .get(start..start + topic_len)
            .ok_or(CorruptRecord("topic runs past the end"))?;
        let topic = std::str::from_utf8(topic).map_err(|_| CorruptRecord("topic is not UTF-8"))?;
        Ok(Self {
            enqueued_ms,
            topic,
            payload: &bytes[start + topic_len..],
            ttl_secs,
        })
    }

    /// Whether this record outlived its time to live (its own, or the
    /// hub's `default_ttl_ms`) at `now_ms`.
    pub fn expired(&self, now_ms: u64, default_ttl_ms: u64) -> bool {
        let ttl = self
            .ttl_secs
            .map_or(default_ttl_ms, |s| u64::from(s) * 1000);
        now_ms.saturating_sub(self.enqueued_ms) > ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_encoding() {
        let r = Record {
            enqueued_ms: 1_700_000_000_123,
            topic: "devices/d1/messages/events/a=b".into(),
            payload: Bytes::from_static(b"\x00hello\xff"),
            ttl_secs: None,
            priority: 0,
        };
        let bytes = r.encode();
        assert_eq!(bytes.len(), r.encoded_len());
        assert_eq!(Record::decode(&bytes).unwrap(), r);
        let r = Record {
            ttl_secs: Some(30),
            ..r
        };
        let bytes = r.encode();
        assert_eq!(bytes.len(), r.encoded_len());
        assert_eq!(Record::decode(&bytes).unwrap(), r);
        let view = RecordRef::parse(&bytes).unwrap();
        assert!(!view.expired(r.enqueued_ms + 30_000, 0));
        assert!(view.expired(r.enqueued_ms + 30_001, u64::MAX));
    }

    #[test]
    fn truncated_records_are_refused_not_panicked_on() {
        let r = Record {
            enqueued_ms: 1,
            topic: "t/opic".into(),
            payload: Bytes::new(),
            ttl_secs: Some(1),
            priority: 0,
        };
        let bytes = r.encode();
        for cut in 0..bytes.len() - 1 {
            assert!(Record::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
