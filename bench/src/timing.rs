//! Timing a message from its PUBLISH to a subscriber, both ends in this
//! process: the payload carries its sequence number and send time on the
//! bench's monotonic clock; percentiles of the samples. Shared by the
//! latency phase (`latency`) and the live messages of the WAN drain
//! (`live`); what is measured is theirs.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::Packet;

use crate::load::{self, Conn, SEQ_DIGITS};

/// Bytes of a stamped payload's header: sequence number, then send time.
pub const STAMP_BYTES: usize = 2 * SEQ_DIGITS;
/// Latency percentiles of one run.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// Nearest-rank percentiles of some samples (nanoseconds); `None` if empty.
pub fn percentiles(mut samples: Vec<u64>) -> Option<Percentiles> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let n = samples.len();
    let at = |p: f64| {
        let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
        Duration::from_nanos(samples[rank - 1])
    };
    Some(Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: Duration::from_nanos(samples[n - 1]),
    })
}

/// Nanoseconds of `t` on the bench's monotonic clock.
pub fn nanos(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    t.saturating_duration_since(epoch).as_nanos() as u64
}

/// `len` bytes: the sequence number and the send time (ns), each as
/// `SEQ_DIGITS` ASCII digits, then filler.
pub fn stamped_payload(seq: u64, sent_ns: u64, len: usize) -> Bytes {
    let mut payload = BytesMut::from(&load::make_payload(seq, len.max(STAMP_BYTES))[..]);
    let stamp = format!("{sent_ns:0width$}", width = SEQ_DIGITS);
    payload[SEQ_DIGITS..STAMP_BYTES].copy_from_slice(stamp.as_bytes());
    payload.freeze()
}

/// Reverse of [`stamped_payload`]: `(seq, sent_ns)`.
pub fn parse_stamp(payload: &[u8]) -> Option<(u64, u64)> {
    Some((
        load::parse_seq(payload)?,
        load::parse_seq(payload.get(SEQ_DIGITS..)?)?,
    ))
}

/// Connects a timing subscriber (clean session) to `filter` and waits for
/// its SUBACK.
pub async fn subscribe(
    addr: SocketAddr,
    client_id: &str,
    filter: &str,
    deadline: Instant,
) -> Result<Conn> {
    let mut conn = Conn::connect_retry(addr, client_id, true, deadline).await?;
    conn.queue(Packet::Subscribe(load::subscribe_packet(filter)))?;
    conn.flush().await?;
    let mut packets = Vec::new();
    if !conn
        .read_packets(&mut packets, Duration::from_secs(10))
        .await?
    {
        bail!("no SUBACK within 10 s");
    }
    match packets.first() {
        Some(Packet::SubAck(_)) => Ok(conn),
        other => bail!("expected SUBACK, got {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamped_payload_gives_back_its_sequence_number_and_send_time() {
        let p = stamped_payload(4_321, 987_654_321, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(parse_stamp(&p), Some((4_321, 987_654_321)));
        assert_eq!(stamped_payload(1, 2, 8).len(), STAMP_BYTES);
        assert_eq!(parse_stamp(b"probe"), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = percentiles((1..=1000).collect()).unwrap();
        assert_eq!(p.p50, Duration::from_nanos(500));
        assert_eq!(p.p90, Duration::from_nanos(900));
        assert_eq!(p.p99, Duration::from_nanos(990));
        assert_eq!(p.max, Duration::from_nanos(1000));
        assert_eq!(percentiles(vec![7]).unwrap().p99, Duration::from_nanos(7));
        assert!(percentiles(Vec::new()).is_none());
    }
}
