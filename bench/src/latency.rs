//! The latency phase: with the upstream connected and a light load, how long
//! a message takes from a device's PUBLISH to a subscriber on the upstream.
//!
//! One QoS 1 publisher sends at a fixed rate, paced by the clock (one message
//! per period, never a catch-up burst), into the system under test (edgehub,
//! the Mosquitto bridge, or the upstream itself as the floor); a QoS 1
//! subscriber on the upstream acknowledges each delivery at once. Every
//! payload carries the sequence number and its send time on this process's
//! monotonic clock (both ends are in this process), so each delivery gives
//! one receive time − send time sample. The first `warmup` messages are not
//! measured.
//!
//! This module owns the paced publisher (on its own OS thread: a thread
//! sleep wakes within tens of microseconds, tokio's timer only on a
//! millisecond tick), the timing subscriber and the percentiles. Starting
//! and stopping processes is `systems`' and `scenario`'s job; printing is
//! `report`'s.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish};
use rumqttc::mqttbytes::{Error as CodecError, QoS};

use crate::load::{self, Conn, MAX_PACKET};
use crate::procstat;
use crate::scenario::{self, Settings, Started, Sut};
use crate::systems::{self, Proc};
use crate::timing::{nanos, parse_stamp, percentiles, stamped_payload, subscribe, Percentiles};

/// Client id of the timing subscriber (clean session on the upstream).
const SUBSCRIBER_ID: &str = "edgehub-bench-latency-sub";
/// The publisher's client id and topic (a device, as in the throughput phase).
const PUBLISHER_ID: &str = "bench0";
const TOPIC: &str = "devices/bench0/messages/events/";
/// Until the first delivery, a probe message is published this often: the
/// paced run starts only once the system under test forwards.
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// How long a blocking write or read of the publisher may take.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What the latency phase sends.
#[derive(Debug, Clone)]
pub struct LatencySettings {
    /// Paced messages per system and run.
    pub messages: u64,
    /// Messages per second.
    pub rate: u32,
    /// Leading messages not measured.
    pub warmup: u64,
    /// Payload bytes (at least `STAMP_BYTES`).
    pub payload: usize,
}

/// Where the publisher sends.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// A store-and-forward system, itself connected to the upstream.
    Sut(Sut),
    /// The upstream broker directly: the floor.
    Upstream,
}

impl Target {
    pub fn label(self) -> &'static str {
        match self {
            Target::Sut(sut) => sut.label(),
            Target::Upstream => UPSTREAM_LABEL,
        }
    }

    fn dir_name(self) -> &'static str {
        match self {
            Target::Sut(sut) => sut.dir_name(),
            Target::Upstream => "upstream",
        }
    }
}

/// Row label of the upstream floor.
pub const UPSTREAM_LABEL: &str = "upstream alone (floor)";

/// Result of one system in one run (one cell group of the latency table).
#[derive(Debug, Clone)]
pub struct LatencyRun {
    pub label: String,
    /// Paced messages sent and acknowledged by the system under test.
    pub sent: u64,
    pub acked: u64,
    /// The publishing rate achieved (first to last paced send).
    pub publish_rate: Option<f64>,
    /// Distinct paced messages the subscriber received, and repeats.
    pub received: u64,
    pub duplicates: u64,
    /// Samples after the warm-up, and how many there should have been.
    pub measured: u64,
    pub expected_measured: u64,
    pub percentiles: Option<Percentiles>,
    /// What the system under test's process used over the paced run (from
    /// the publisher's start to its last PUBACK), per message sent; none for
    /// the upstream alone.
    pub per_message: Option<procstat::PerMessage>,
    pub warnings: Vec<String>,
    /// Why the run stopped early, if it did.
    pub error: Option<String>,
}

impl LatencyRun {
    fn new(label: &str) -> LatencyRun {
        LatencyRun {
            label: label.to_string(),
            sent: 0,
            acked: 0,
            publish_rate: None,
            received: 0,
            duplicates: 0,
            measured: 0,
            expected_measured: 0,
            percentiles: None,
            per_message: None,
            warnings: Vec::new(),
            error: None,
        }
    }

    /// Percentiles only if every paced message arrived and nothing failed.
    pub fn complete_percentiles(&self) -> Option<Percentiles> {
        (self.error.is_none() && self.measured == self.expected_measured)
            .then_some(self.percentiles)
            .flatten()
    }
}

/// One latency run against `target`: start the upstream and the subscriber,
/// then the system under test, wait until it forwards, publish the paced
/// messages, collect the samples, stop everything.
pub async fn measure(s: &Settings, l: &LatencySettings, target: Target) -> LatencyRun {
    let mut run = LatencyRun::new(target.label());
    run.expected_measured = l.messages.saturating_sub(l.warmup);
    if let Err(e) = measure_into(s, l, target, &mut run).await {
        run.error = Some(format!("{e:#}"));
    }
    run
}

async fn measure_into(
    s: &Settings,
    l: &LatencySettings,
    target: Target,
    run: &mut LatencyRun,
) -> Result<()> {
    let dir = s.work.join(format!("latency-{}", target.dir_name()));
    let upstream_port = systems::free_port()?;
    let config = systems::upstream_config(upstream_port, &dir.join("upstream"), s.as_root);
    let mut upstream =
        systems::start_mosquitto(&s.mosquitto, "upstream", &dir.join("upstream"), &config)?;
    let mut sut: Option<Proc> = None;
    let outcome = async {
        upstream.wait_ready(upstream_port, s.deadline()).await?;
        let deadline = s.deadline();
        let addr = systems::loopback(upstream_port);
        let sub = subscribe(addr, SUBSCRIBER_ID, load::SUBSCRIBER_FILTER, deadline).await?;
        let port = match target {
            Target::Upstream => upstream_port,
            Target::Sut(kind) => {
                let port = systems::free_port()?;
                let Started { proc, .. } =
                    scenario::start_sut(s, kind, &dir, port, upstream_port).await?;
                sut = Some(proc);
                port
            }
        };
        let publisher = Conn::connect(systems::loopback(port), PUBLISHER_ID, true)
            .await?
            .into_std()?;

        let forwarding = Arc::new(AtomicBool::new(false));
        let subscriber = tokio::spawn(timing_subscriber(
            sub,
            l.messages,
            forwarding.clone(),
            deadline,
            s.idle_timeout,
        ));
        let pid = sut.as_ref().map(|p| p.pid);
        let before = pid.map(procstat::sample).transpose()?;
        let settings = l.clone();
        let paced = std::thread::spawn(move || {
            paced_publisher(publisher, &settings, &forwarding, deadline)
        });
        let timing = subscriber.await.context("subscriber task panicked")?;
        let paced = tokio::task::spawn_blocking(move || paced.join())
            .await?
            .map_err(|_| anyhow::anyhow!("publisher thread panicked"))?;
        if let (Some(pid), Some(before)) = (pid, before) {
            let used = procstat::sample(pid)?.since(&before);
            run.per_message = procstat::PerMessage::of(used, paced.sent);
        }

        run.sent = paced.sent;
        run.acked = paced.acked;
        if let (Some(first), Some(last)) = (paced.first_send, paced.last_send) {
            let secs = (last - first).as_secs_f64();
            if secs > 0.0 && paced.sent > 1 {
                run.publish_rate = Some((paced.sent - 1) as f64 / secs);
            }
        }
        run.received = timing.distinct;
        run.duplicates = timing.duplicates;
        let samples: Vec<u64> = timing
            .latency_ns
            .iter()
            .skip(l.warmup as usize)
            .flatten()
            .copied()
            .collect();
        run.measured = samples.len() as u64;
        run.percentiles = percentiles(samples);
        if let Some(e) = paced.error {
            bail!("publisher: {e}");
        }
        if let Some(e) = timing.error {
            bail!("subscriber: {e}");
        }
        if timing.distinct < l.messages {
            bail!(
                "subscriber received {} of {} messages ({})",
                timing.distinct,
                l.messages,
                if timing.timed_out {
                    "timeout"
                } else {
                    "stalled"
                }
            );
        }
        anyhow::Ok(())
    }
    .await;
    if let Some(proc) = sut.as_mut() {
        scenario::stop(proc, &mut run.warnings).await;
    }
    scenario::stop(&mut upstream, &mut run.warnings).await;
    outcome
}

/// What the timing subscriber saw.
struct Timing {
    /// Receive − send time per sequence number, once received.
    latency_ns: Vec<Option<u64>>,
    distinct: u64,
    duplicates: u64,
    timed_out: bool,
    error: Option<String>,
}

/// Receives until all `count` paced messages arrived, nothing new arrived
/// for `idle`, or `deadline`; acknowledges every delivery at once. Sets
/// `forwarding` on the first delivery of anything (a probe, usually).
async fn timing_subscriber(
    mut conn: Conn,
    count: u64,
    forwarding: Arc<AtomicBool>,
    deadline: Instant,
    idle: Duration,
) -> Timing {
    let mut timing = Timing {
        latency_ns: vec![None; count as usize],
        distinct: 0,
        duplicates: 0,
        timed_out: false,
        error: None,
    };
    if let Err(e) = receive(&mut conn, &forwarding, deadline, idle, &mut timing).await {
        timing.error = Some(format!("{e:#}"));
    } else {
        let _ = conn.disconnect().await;
    }
    timing
}

async fn receive(
    conn: &mut Conn,
    forwarding: &AtomicBool,
    deadline: Instant,
    idle: Duration,
    timing: &mut Timing,
) -> Result<()> {
    let count = timing.latency_ns.len() as u64;
    let mut last_new = Instant::now();
    let mut packets = Vec::new();
    while timing.distinct < count {
        let now = Instant::now();
        if now >= deadline {
            timing.timed_out = true;
            return Ok(());
        }
        // Before the first delivery the probe loop bounds the wait; after
        // it, any delivery (a probe too) counts as progress.
        if forwarding.load(Ordering::Relaxed) && now - last_new >= idle {
            return Ok(());
        }
        packets.clear();
        let wait = (deadline - now).min(Duration::from_millis(500));
        if !conn.read_packets(&mut packets, wait).await? {
            conn.keep_alive().await?;
            continue;
        }
        let received_ns = nanos(Instant::now());
        for packet in packets.drain(..) {
            match packet {
                Packet::Publish(publish) => {
                    if publish.qos != QoS::AtMostOnce {
                        conn.queue(Packet::PubAck(PubAck::new(publish.pkid)))?;
                    }
                    // The hub's own twin reports (retained) are not load.
                    if publish.topic.contains("/$edgeHub/twin/") {
                        continue;
                    }
                    forwarding.store(true, Ordering::Relaxed);
                    last_new = Instant::now();
                    let Some((seq, sent_ns)) =
                        parse_stamp(&publish.payload).filter(|&(seq, _)| seq < count)
                    else {
                        continue; // a probe
                    };
                    let slot = &mut timing.latency_ns[seq as usize];
                    if slot.is_some() {
                        timing.duplicates += 1;
                    } else {
                        *slot = Some(received_ns.saturating_sub(sent_ns));
                        timing.distinct += 1;
                    }
                }
                Packet::SubAck(_) | Packet::PingResp => {}
                Packet::Disconnect => bail!("broker sent DISCONNECT"),
                other => bail!("unexpected packet for the subscriber: {other:?}"),
            }
        }
        conn.flush().await?;
    }
    Ok(())
}

/// What the paced publisher did.
struct Paced {
    sent: u64,
    acked: u64,
    first_send: Option<Instant>,
    last_send: Option<Instant>,
    error: Option<String>,
}

/// Publishes probes until `forwarding`, then `l.messages` stamped QoS 1
/// messages at `l.rate`, then waits for the last PUBACK. Blocking: runs on
/// its own thread, with a second thread reading the PUBACKs.
fn paced_publisher(
    stream: TcpStream,
    l: &LatencySettings,
    forwarding: &AtomicBool,
    deadline: Instant,
) -> Paced {
    let mut paced = Paced {
        sent: 0,
        acked: 0,
        first_send: None,
        last_send: None,
        error: None,
    };
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = match stream.try_clone() {
        Ok(r) => r,
        Err(e) => {
            paced.error = Some(format!("cloning the socket: {e}"));
            return paced;
        }
    };
    let reader = {
        let (acked, stop) = (acked.clone(), stop.clone());
        std::thread::spawn(move || read_acks(reader, &acked, &stop, deadline))
    };
    let mut probes = 0;
    let result = publish_paced(stream, l, forwarding, deadline, &mut paced, &mut probes).and_then(
        |stream| {
            // Every publish (probes too) acknowledged, or the deadline.
            while acked.load(Ordering::Relaxed) < paced.sent + probes {
                if Instant::now() >= deadline {
                    bail!("timeout waiting for PUBACKs");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(stream)
        },
    );
    stop.store(true, Ordering::Relaxed);
    let read = reader.join();
    paced.acked = acked.load(Ordering::Relaxed).saturating_sub(probes);
    match (result, read) {
        (Ok(mut stream), Ok(Ok(()))) => {
            let mut buf = BytesMut::new();
            if Packet::Disconnect.write(&mut buf, MAX_PACKET).is_ok() {
                let _ = stream.write_all(&buf);
            }
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        (Err(e), _) => paced.error = Some(format!("{e:#}")),
        (_, Ok(Err(e))) => paced.error = Some(format!("reading PUBACKs: {e:#}")),
        (_, Err(_)) => paced.error = Some("PUBACK reader panicked".into()),
    }
    paced
}

/// The writing half of [`paced_publisher`]; gives the socket back.
fn publish_paced(
    mut stream: TcpStream,
    l: &LatencySettings,
    forwarding: &AtomicBool,
    deadline: Instant,
    paced: &mut Paced,
    probes: &mut u64,
) -> Result<TcpStream> {
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = BytesMut::with_capacity(256);
    let mut pkid: u16 = 0;
    let mut send = |stream: &mut TcpStream, payload: Bytes| -> Result<()> {
        // Ids wrap after 65,535: at the rates used here every earlier use
        // was acknowledged long before.
        pkid = pkid.checked_add(1).unwrap_or(1);
        let mut publish = Publish::from_bytes(TOPIC, QoS::AtLeastOnce, payload);
        publish.pkid = pkid;
        buf.clear();
        Packet::Publish(publish)
            .write(&mut buf, MAX_PACKET)
            .map_err(|e| anyhow::anyhow!("encoding PUBLISH: {e}"))?;
        stream.write_all(&buf).context("writing PUBLISH")?;
        Ok(())
    };

    // Probes until the system under test forwards to the upstream.
    'probe: while !forwarding.load(Ordering::Relaxed) {
        if Instant::now() >= deadline {
            bail!("timeout: nothing reached the upstream subscriber");
        }
        send(&mut stream, Bytes::from_static(b"probe"))?;
        *probes += 1;
        let until = Instant::now() + PROBE_EVERY;
        while Instant::now() < until {
            if forwarding.load(Ordering::Relaxed) {
                break 'probe;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    // Message i is due at start + i * period; a late message goes out at
    // once and the schedule restarts from it, so delays never turn into a
    // burst of catch-up messages.
    let period = Duration::from_secs(1) / l.rate.max(1);
    let mut due = Instant::now();
    for seq in 0..l.messages {
        let now = Instant::now();
        if now >= deadline {
            bail!("timeout: {seq} of {} paced messages sent", l.messages);
        }
        if due > now {
            std::thread::sleep(due - now);
        } else if now - due > period {
            due = now;
        }
        let sent_at = Instant::now();
        send(&mut stream, stamped_payload(seq, nanos(sent_at), l.payload))?;
        paced.sent += 1;
        paced.first_send.get_or_insert(sent_at);
        paced.last_send = Some(sent_at);
        due += period;
    }
    Ok(stream)
}

/// Counts PUBACKs until `stop` or `deadline`.
fn read_acks(
    mut stream: TcpStream,
    acked: &AtomicU64,
    stop: &AtomicBool,
    deadline: Instant,
) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut rbuf = BytesMut::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) => bail!("connection closed by broker"),
            Ok(n) => rbuf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e.into()),
        }
        loop {
            match Packet::read(&mut rbuf, MAX_PACKET) {
                Ok(Packet::PubAck(_)) => {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Packet::PingResp) => {}
                Ok(other) => bail!("unexpected packet for a publisher: {other:?}"),
                Err(CodecError::InsufficientBytes(_)) => break,
                Err(e) => bail!("malformed packet from broker: {e}"),
            }
        }
    }
    Ok(())
}
