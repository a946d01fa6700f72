//! The on-disk form of one queued message.
//!
//! Layout (version 1): `[1u8][enqueued_ms: u64 BE][topic_len: u16 BE][topic][payload]`.

use bytes::Bytes;

const VERSION: u8 = 1;
const HEADER: usize = 1 + 8 + 2;

/// One upstream-bound message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Wall-clock milliseconds since the Unix epoch when the hub received it.
    pub enqueued_ms: u64,
    /// The topic it is published on upstream (property bag included).
    pub topic: String,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error)]
#[error("corrupt queue record: {0}")]
pub struct CorruptRecord(&'static str);

impl Record {
    pub fn encoded_len(&self) -> usize {
        HEADER + self.topic.len() + self.payload.len()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(VERSION);
        out.extend_from_slice(&self.enqueued_ms.to_be_bytes());
        out.extend_from_slice(&(self.topic.len() as u16).to_be_bytes());
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
        })
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
}

impl<'a> RecordRef<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, CorruptRecord> {
        if bytes.len() < HEADER {
            return Err(CorruptRecord("shorter than its header"));
        }
        if bytes[0] != VERSION {
            return Err(CorruptRecord("unknown version"));
        }
        let enqueued_ms = Record::enqueued_ms_of(bytes)?;
        let topic_len = u16::from_be_bytes([bytes[9], bytes[10]]) as usize;
        let topic = bytes
            .get(HEADER..HEADER + topic_len)
            .ok_or(CorruptRecord("topic runs past the end"))?;
        let topic = std::str::from_utf8(topic).map_err(|_| CorruptRecord("topic is not UTF-8"))?;
        Ok(Self {
            enqueued_ms,
            topic,
            payload: &bytes[HEADER + topic_len..],
        })
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
        };
        let bytes = r.encode();
        assert_eq!(bytes.len(), r.encoded_len());
        assert_eq!(Record::decode(&bytes).unwrap(), r);
    }

    #[test]
    fn truncated_records_are_refused_not_panicked_on() {
        let r = Record {
            enqueued_ms: 1,
            topic: "t/opic".into(),
            payload: Bytes::new(),
        };
        let bytes = r.encode();
        for cut in 0..bytes.len() - 1 {
            assert!(Record::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
