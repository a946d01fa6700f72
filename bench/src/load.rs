//! Load generation: pipelined QoS 1 publishers and a counting QoS 1 subscriber.
//!
//! Everything here speaks MQTT 3.1.1 directly over a `TcpStream`, using only
//! the packet codec from `rumqttc::mqttbytes::v4`. Writes are batched into one
//! buffer and flushed with a single `write_all`, so the load generator costs
//! as little CPU as possible on the (shared, 2-core) benchmark machine.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// Largest packet we accept or produce.
pub const MAX_PACKET: usize = 1 << 20;
/// Keep-alive announced in CONNECT; we ping after half of it without writes.
const KEEP_ALIVE_SECS: u16 = 60;
/// Every payload starts with the sequence number as this many ASCII digits.
pub const SEQ_DIGITS: usize = 20;
/// The subscriber sends its PUBACKs once this many are due…
const ACK_BATCH: usize = 256;
/// …or once the broker has been silent this long.
const ACK_DELAY: Duration = Duration::from_millis(1);
/// Client id of the counting subscriber (persistent session on the upstream).
pub const SUBSCRIBER_ID: &str = "edgehub-bench-sub";
/// The subscriber's filter. `#` rather than `devices/#` so that a hub which
/// rewrites topics is still counted (`#` does not match `$SYS`).
pub const SUBSCRIBER_FILTER: &str = "#";
/// Topics of the live messages timed during a WAN drain (`live.rs`), which
/// the drain's subscriber leaves out.
pub const LIVE_PREFIX: &str = "devices/live/";

/// One MQTT connection with batched writes and incremental packet parsing.
pub struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Packets parsed but not yet handed out (e.g. queued PUBLISHes that a
    /// broker sends right behind the CONNACK of a persistent session).
    pending: Vec<Packet>,
    last_write: Instant,
}

impl Conn {
    /// Opens a TCP connection, sends CONNECT and waits for a successful CONNACK.
    pub async fn connect(addr: SocketAddr, client_id: &str, clean_session: bool) -> Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(64 * 1024),
            pending: Vec::new(),
            last_write: Instant::now(),
        };
        let mut connect = Connect::new(client_id);
        connect.keep_alive = KEEP_ALIVE_SECS;
        connect.clean_session = clean_session;
        conn.queue(Packet::Connect(connect))?;
        conn.flush().await?;

        let mut packets = Vec::new();
        if !conn
            .read_packets(&mut packets, Duration::from_secs(10))
            .await?
        {
            bail!("no CONNACK from {addr} within 10 s");
        }
        match packets.first() {
            Some(Packet::ConnAck(ConnAck {
                code: ConnectReturnCode::Success,
                ..
            })) => {}
            other => bail!("{addr} refused {client_id}: {other:?}"),
        }
        conn.pending = packets.split_off(1);
        Ok(conn)
    }

    /// Connects, retrying until `deadline` (used while a broker is starting).
    pub async fn connect_retry(
        addr: SocketAddr,
        client_id: &str,
        clean_session: bool,
        deadline: Instant,
    ) -> Result<Conn> {
        loop {
            match Conn::connect(addr, client_id, clean_session).await {
                Ok(conn) => return Ok(conn),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context("timeout: could not connect before the deadline"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// Encodes a packet into the write buffer (nothing is sent yet).
    pub fn queue(&mut self, packet: Packet) -> Result<()> {
        packet
            .write(&mut self.wbuf, MAX_PACKET)
            .map_err(|e| anyhow!("encoding packet: {e}"))?;
        Ok(())
    }

    /// Whether packets are queued but not yet sent.
    pub fn has_queued(&self) -> bool {
        !self.wbuf.is_empty()
    }

    /// Sends everything queued with a single `write_all`.
    pub async fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
            self.last_write = Instant::now();
        }
        Ok(())
    }

    /// Sends a PINGREQ if nothing was written for half the keep-alive.
    pub async fn keep_alive(&mut self) -> Result<()> {
        if self.last_write.elapsed() > Duration::from_secs(KEEP_ALIVE_SECS as u64 / 2) {
            self.queue(Packet::PingReq)?;
            self.flush().await?;
        }
        Ok(())
    }

    /// Appends every complete packet available to `out`, reading from the socket
    /// at most until `wait` elapses. Returns `false` on timeout with nothing read.
    pub async fn read_packets(&mut self, out: &mut Vec<Packet>, wait: Duration) -> Result<bool> {
        if !self.pending.is_empty() {
            out.append(&mut self.pending);
            return Ok(true);
        }
        loop {
            loop {
                match Packet::read(&mut self.rbuf, MAX_PACKET) {
                    Ok(packet) => out.push(packet),
                    Err(CodecError::InsufficientBytes(_)) => break,
                    Err(e) => bail!("malformed packet from broker: {e}"),
                }
            }
            if !out.is_empty() {
                return Ok(true);
            }
            match tokio::time::timeout(wait, self.stream.read_buf(&mut self.rbuf)).await {
                Err(_) => return Ok(false),
                Ok(Ok(0)) => bail!("connection closed by broker"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
            }
        }
    }

    /// The connection as a blocking `std` socket (for a publisher paced on
    /// its own thread). Fails if the broker already sent something we have
    /// not handed out.
    pub fn into_std(self) -> Result<std::net::TcpStream> {
        if !self.rbuf.is_empty() || !self.pending.is_empty() || !self.wbuf.is_empty() {
            bail!("connection has unprocessed packets");
        }
        let stream = self.stream.into_std()?;
        stream.set_nonblocking(false)?;
        Ok(stream)
    }

    /// Sends DISCONNECT and closes the socket.
    pub async fn disconnect(mut self) -> Result<()> {
        self.queue(Packet::Disconnect)?;
        self.flush().await?;
        self.stream.shutdown().await?;
        Ok(())
    }
}

/// Builds a payload of `len` bytes: the sequence number as `SEQ_DIGITS`
/// ASCII digits, then filler.
pub fn make_payload(seq: u64, len: usize) -> Bytes {
    let mut payload = format!("{seq:0width$}", width = SEQ_DIGITS).into_bytes();
    payload.resize(len.max(SEQ_DIGITS), b'.');
    Bytes::from(payload)
}

/// Reverse of [`make_payload`]; `None` if the payload does not start with digits.
pub fn parse_seq(payload: &[u8]) -> Option<u64> {
    let digits = payload.get(..SEQ_DIGITS)?;
    let mut seq: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        seq = seq.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(seq)
}

/// What one publisher sends.
#[derive(Clone, Debug)]
pub struct PublisherSpec {
    pub topic: String,
    /// Sequence numbers `first_seq .. first_seq + count`.
    pub first_seq: u64,
    pub count: u64,
    pub payload_len: usize,
    /// Maximum unacknowledged publishes on the connection.
    pub window: usize,
}

/// Splits `total` messages over `publishers` connections.
pub fn publisher_specs(
    total: u64,
    publishers: usize,
    payload_len: usize,
    window: usize,
) -> Vec<PublisherSpec> {
    let p = publishers as u64;
    (0..p)
        .map(|i| {
            let first_seq = total * i / p;
            let end = total * (i + 1) / p;
            PublisherSpec {
                topic: format!("devices/bench{i}/messages/events/"),
                first_seq,
                count: end - first_seq,
                payload_len,
                window,
            }
        })
        .collect()
}

/// Outcome of one publisher.
#[derive(Debug, Clone)]
pub struct PublisherResult {
    pub acked: u64,
    pub last_ack: Option<Instant>,
    /// `Some(reason)` if the publisher stopped before every message was acked.
    pub error: Option<String>,
}

/// Connects one publisher per spec (clean session), all before any publishing
/// starts, so connection set-up is not part of the measurement. The client id
/// is the device id of the topic (`bench{i}`), as IoT Hub style brokers expect.
pub async fn connect_publishers(addr: SocketAddr, specs: &[PublisherSpec]) -> Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(specs.len());
    for i in 0..specs.len() {
        conns.push(Conn::connect(addr, &format!("bench{i}"), true).await?);
    }
    Ok(conns)
}

/// Publishes `spec.count` QoS 1 messages keeping up to `spec.window` in flight.
pub async fn run_publisher(
    mut conn: Conn,
    spec: PublisherSpec,
    deadline: Instant,
) -> PublisherResult {
    let mut result = PublisherResult {
        acked: 0,
        last_ack: None,
        error: None,
    };
    if let Err(e) = publish_loop(&mut conn, &spec, deadline, &mut result).await {
        result.error = Some(format!("{e:#}"));
    } else {
        let _ = conn.disconnect().await;
    }
    result
}

async fn publish_loop(
    conn: &mut Conn,
    spec: &PublisherSpec,
    deadline: Instant,
    result: &mut PublisherResult,
) -> Result<()> {
    let mut in_flight = vec![false; 1 << 16];
    let mut n_in_flight = 0usize;
    let mut next_pkid: u16 = 1;
    let mut sent = 0u64;
    let mut packets = Vec::new();

    // Refill only once a quarter of the window is free (or the rest fits):
    // brokers acknowledge one PUBLISH at a time, and refilling one slot per
    // PUBACK would cost a write system call per message.
    let refill_at = (spec.window / 4).max(1) as u64;
    while result.acked < spec.count {
        let free = (spec.window - n_in_flight) as u64;
        if free >= refill_at.min(spec.count - sent) {
            // Fill the window, then send it all at once.
            while n_in_flight < spec.window && sent < spec.count {
                while in_flight[next_pkid as usize] {
                    next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                }
                let pkid = next_pkid;
                next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                in_flight[pkid as usize] = true;
                n_in_flight += 1;
                let mut publish = Publish::from_bytes(
                    spec.topic.as_str(),
                    QoS::AtLeastOnce,
                    make_payload(spec.first_seq + sent, spec.payload_len),
                );
                publish.pkid = pkid;
                conn.queue(Packet::Publish(publish))?;
                sent += 1;
            }
            conn.flush().await?;
        }

        let now = Instant::now();
        if now >= deadline {
            bail!("timeout: {} of {} acknowledged", result.acked, spec.count);
        }
        let wait = (deadline - now).min(Duration::from_secs(1));
        packets.clear();
        if !conn.read_packets(&mut packets, wait).await? {
            conn.keep_alive().await?;
            continue;
        }
        let now = Instant::now();
        for packet in packets.drain(..) {
            match packet {
                Packet::PubAck(PubAck { pkid }) if in_flight[pkid as usize] => {
                    in_flight[pkid as usize] = false;
                    n_in_flight -= 1;
                    result.acked += 1;
                    result.last_ack = Some(now);
                }
                Packet::PubAck(_) | Packet::PingResp => {}
                Packet::Disconnect => bail!("broker sent DISCONNECT"),
                other => bail!("unexpected packet for a publisher: {other:?}"),
            }
        }
    }
    Ok(())
}

/// Why the subscriber stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriberEnd {
    /// Every expected sequence number arrived.
    Complete,
    /// Messages had started arriving, then none arrived for the idle period.
    Idle,
    /// The phase deadline passed.
    Timeout,
}

/// What the subscriber saw.
#[derive(Debug, Clone)]
pub struct SubscriberStats {
    pub expected: u64,
    /// PUBLISH packets received (including duplicates).
    pub received: u64,
    /// Distinct sequence numbers in `0..expected`.
    pub distinct: u64,
    pub duplicates: u64,
    /// Payloads without a parsable sequence number, or out of range.
    pub unparsed: u64,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
    pub end: SubscriberEnd,
    pub error: Option<String>,
}

impl SubscriberStats {
    pub fn lost(&self) -> u64 {
        self.expected - self.distinct
    }

    /// Distinct messages per second from the first to the last delivery.
    pub fn rate(&self) -> Option<f64> {
        let secs = (self.last? - self.first?).as_secs_f64();
        (secs > 0.0).then(|| self.distinct as f64 / secs)
    }
}

/// Creates the subscriber's persistent session (clean_session = false) with
/// its QoS 1 subscription, then disconnects. A broker with persistence keeps
/// the session across a restart, so nothing forwarded is dropped before the
/// subscriber reconnects.
pub async fn seed_subscriber_session(addr: SocketAddr, deadline: Instant) -> Result<()> {
    let mut conn = Conn::connect_retry(addr, SUBSCRIBER_ID, false, deadline).await?;
    conn.queue(Packet::Subscribe(subscribe_packet(SUBSCRIBER_FILTER)))?;
    conn.flush().await?;
    let mut packets = Vec::new();
    if !conn
        .read_packets(&mut packets, Duration::from_secs(10))
        .await?
    {
        bail!("no SUBACK within 10 s");
    }
    match packets.first() {
        Some(Packet::SubAck(_)) => {}
        other => bail!("expected SUBACK, got {other:?}"),
    }
    conn.disconnect().await
}

/// SUBSCRIBE to `filter` at QoS 1.
pub fn subscribe_packet(filter: &str) -> Subscribe {
    let mut subscribe = Subscribe::new(filter, QoS::AtLeastOnce);
    subscribe.pkid = 1;
    subscribe
}

/// Subscribes to `filter` at QoS 1, then counts deliveries (acknowledging
/// each one) until all `expected`
/// sequence numbers arrived, nothing new arrived for `idle` after the first
/// message, or `deadline` passed. `subscribed` fires on SUBACK.
pub async fn run_subscriber(
    mut conn: Conn,
    filter: &'static str,
    expected: u64,
    deadline: Instant,
    idle: Duration,
    subscribed: Option<oneshot::Sender<()>>,
) -> SubscriberStats {
    let mut stats = SubscriberStats {
        expected,
        received: 0,
        distinct: 0,
        duplicates: 0,
        unparsed: 0,
        first: None,
        last: None,
        end: SubscriberEnd::Timeout,
        error: None,
    };
    if let Err(e) = subscribe_loop(&mut conn, filter, deadline, idle, subscribed, &mut stats).await
    {
        stats.error = Some(format!("{e:#}"));
    } else {
        let _ = conn.disconnect().await;
    }
    stats
}

async fn subscribe_loop(
    conn: &mut Conn,
    filter: &str,
    deadline: Instant,
    idle: Duration,
    mut subscribed: Option<oneshot::Sender<()>>,
    stats: &mut SubscriberStats,
) -> Result<()> {
    let mut seen = vec![0u64; (stats.expected as usize).div_ceil(64)];
    let mut pending_acks = 0usize;
    let mut packets = Vec::new();
    conn.queue(Packet::Subscribe(subscribe_packet(filter)))?;
    conn.flush().await?;

    while stats.distinct < stats.expected {
        let now = Instant::now();
        if now >= deadline {
            stats.end = SubscriberEnd::Timeout;
            return Ok(());
        }
        if let Some(last) = stats.last {
            if now - last >= idle {
                stats.end = SubscriberEnd::Idle;
                return Ok(());
            }
        }
        // PUBACKs are sent in batches: when many are due, or when the
        // broker pauses for a millisecond (its in-flight window is unlimited,
        // so holding acknowledgements back briefly does not stall it).
        let wait = if conn.has_queued() {
            ACK_DELAY
        } else {
            (deadline - now).min(Duration::from_millis(500))
        };
        packets.clear();
        if !conn.read_packets(&mut packets, wait).await? {
            conn.flush().await?;
            pending_acks = 0;
            conn.keep_alive().await?;
            continue;
        }
        let now = Instant::now();
        for packet in packets.drain(..) {
            match packet {
                Packet::Publish(publish) => {
                    if publish.qos != QoS::AtMostOnce {
                        conn.queue(Packet::PubAck(PubAck::new(publish.pkid)))?;
                        pending_acks += 1;
                    }
                    // The hub's own twin reports (retained) are not load,
                    // nor the live messages of a WAN drain.
                    if publish.topic.contains("/$edgeHub/twin/")
                        || publish.topic.starts_with(LIVE_PREFIX)
                    {
                        continue;
                    }
                    stats.received += 1;
                    match parse_seq(&publish.payload).filter(|&s| s < stats.expected) {
                        None => stats.unparsed += 1,
                        Some(seq) => {
                            let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
                            if seen[word] & bit != 0 {
                                stats.duplicates += 1;
                            } else {
                                seen[word] |= bit;
                                stats.distinct += 1;
                                stats.first.get_or_insert(now);
                                stats.last = Some(now);
                            }
                        }
                    }
                }
                Packet::SubAck(_) => {
                    if let Some(tx) = subscribed.take() {
                        let _ = tx.send(());
                    }
                }
                Packet::PingResp => {}
                Packet::Disconnect => bail!("broker sent DISCONNECT"),
                other => bail!("unexpected packet for the subscriber: {other:?}"),
            }
        }
        if pending_acks >= ACK_BATCH {
            conn.flush().await?;
            pending_acks = 0;
        }
    }
    conn.flush().await?;
    stats.end = SubscriberEnd::Complete;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip() {
        let p = make_payload(123_456, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(parse_seq(&p), Some(123_456));
        assert_eq!(make_payload(7, 4).len(), SEQ_DIGITS);
        assert_eq!(parse_seq(b"{\"x\":1}"), None);
    }

    #[test]
    fn specs_cover_all_sequence_numbers() {
        let specs = publisher_specs(10, 3, 64, 256);
        assert_eq!(specs.iter().map(|s| s.count).sum::<u64>(), 10);
        assert_eq!(specs[0].first_seq, 0);
        assert_eq!(specs[1].first_seq, specs[0].count);
        assert_eq!(specs[2].first_seq + specs[2].count, 10);
    }
}
