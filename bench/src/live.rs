//! Live messages during a WAN drain: how long fresh data waits behind a
//! backlog.
//!
//! While the system under test drains what it queued during the outage, one
//! device publishes stamped QoS 1 messages at a fixed rate on a topic of its
//! own, and a subscriber on the upstream (subscribed to that topic only)
//! takes each one's receive − send time. The drain's subscriber leaves these
//! out ([`load::LIVE_PREFIX`]). Only messages published once the system under test
//! delivers again count ([`LiveOutcome::since`]): one published before is
//! part of the backlog. Starting processes is `scenario`'s job; printing is
//! `report`'s.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish};
use rumqttc::mqttbytes::QoS;

use crate::load::Conn;
use crate::timing::{self, parse_stamp, percentiles, stamped_payload, Percentiles};

const TOPIC: &str = "devices/live/messages/events/";
const FILTER: &str = "devices/live/#";
const PUBLISHER_ID: &str = "live";
const SUBSCRIBER_ID: &str = "edgehub-bench-live-sub";

/// What the live messages saw.
#[derive(Debug, Clone, Default)]
pub struct LiveOutcome {
    /// Send time of each message published ([`timing::nanos`]).
    pub sent_ns: Vec<u64>,
    /// Send time and latency of each message received (first copies).
    pub received: Vec<(u64, u64)>,
    pub error: Option<String>,
}

impl LiveOutcome {
    /// Of the messages published at or after `t0`: how many were sent, how
    /// many arrived, and their latency.
    pub fn since(&self, t0: Instant) -> (u64, u64, Option<Percentiles>) {
        let t0 = timing::nanos(t0);
        let sent = self.sent_ns.iter().filter(|&&t| t >= t0).count() as u64;
        let samples: Vec<u64> = self
            .received
            .iter()
            .filter(|(t, _)| *t >= t0)
            .map(|(_, l)| *l)
            .collect();
        (sent, samples.len() as u64, percentiles(samples))
    }
}

/// Publishes `rate` live messages a second into `sut` until `drained` is
/// set, and times their arrival at a subscriber on `upstream`; ends once
/// every message sent arrived, or at `deadline`.
pub async fn during_drain(
    sut: SocketAddr,
    upstream: SocketAddr,
    rate: u32,
    payload: usize,
    drained: Arc<AtomicBool>,
    deadline: Instant,
) -> LiveOutcome {
    let payload = payload.max(timing::STAMP_BYTES);
    let sent = Arc::new(AtomicU64::new(0));
    let stopped = Arc::new(AtomicBool::new(false));
    let mut out = LiveOutcome::default();
    let sub = match timing::subscribe(upstream, SUBSCRIBER_ID, FILTER, deadline).await {
        Ok(sub) => sub,
        Err(e) => {
            out.error = Some(format!("live subscriber: {e:#}"));
            return out;
        }
    };
    let publisher = tokio::spawn(publish(
        sut,
        rate,
        payload,
        drained,
        (sent.clone(), stopped.clone()),
        deadline,
    ));
    match receive(sub, &stopped, &sent, deadline).await {
        Ok(r) => out.received = r,
        Err(e) => out.error = Some(format!("live subscriber: {e:#}")),
    }
    match publisher.await {
        Ok(Ok(sent_ns)) => out.sent_ns = sent_ns,
        Ok(Err(e)) => out.error = Some(format!("live publisher: {e:#}")),
        Err(e) => out.error = Some(format!("live publisher: {e}")),
    }
    out
}

/// One stamped message every `1 / rate` s until `drained` or `deadline`,
/// counted in `sent`; sets `stopped` when it sends no more. Returns the
/// send times.
async fn publish(
    sut: SocketAddr,
    rate: u32,
    payload: usize,
    drained: Arc<AtomicBool>,
    (sent, stopped): (Arc<AtomicU64>, Arc<AtomicBool>),
    deadline: Instant,
) -> Result<Vec<u64>> {
    let outcome = publish_until(sut, rate, payload, &drained, &sent, deadline).await;
    stopped.store(true, Ordering::Relaxed);
    outcome
}

async fn publish_until(
    sut: SocketAddr,
    rate: u32,
    payload: usize,
    drained: &AtomicBool,
    sent: &AtomicU64,
    deadline: Instant,
) -> Result<Vec<u64>> {
    let mut conn = Conn::connect(sut, PUBLISHER_ID, true).await?;
    let mut sent_ns = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acks = Vec::new();
    let mut seq = 0u64;
    while !drained.load(Ordering::Relaxed) && Instant::now() < deadline {
        tick.tick().await;
        let stamp = timing::nanos(Instant::now());
        let mut p = Publish::from_bytes(
            TOPIC,
            QoS::AtLeastOnce,
            stamped_payload(seq, stamp, payload),
        );
        p.pkid = (seq % u64::from(u16::MAX)) as u16 + 1;
        conn.queue(Packet::Publish(p))?;
        conn.flush().await?;
        sent_ns.push(stamp);
        seq += 1;
        sent.store(seq, Ordering::Relaxed);
        // PUBACKs only need reading so they do not pile up.
        acks.clear();
        conn.read_packets(&mut acks, Duration::ZERO).await?;
    }
    let _ = conn.disconnect().await;
    Ok(sent_ns)
}

/// Send time and latency of each live message, until the publisher has
/// `stopped` and all it sent arrived, or `deadline`.
async fn receive(
    mut conn: Conn,
    stopped: &AtomicBool,
    sent: &AtomicU64,
    deadline: Instant,
) -> Result<Vec<(u64, u64)>> {
    let mut samples = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut packets = Vec::new();
    loop {
        if stopped.load(Ordering::Relaxed) && seen.len() as u64 >= sent.load(Ordering::Relaxed) {
            return Ok(samples);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(samples);
        }
        packets.clear();
        let wait = (deadline - now).min(Duration::from_millis(100));
        if !conn.read_packets(&mut packets, wait).await? {
            conn.keep_alive().await?;
            continue;
        }
        let received = timing::nanos(Instant::now());
        for packet in packets.drain(..) {
            match packet {
                Packet::Publish(p) => {
                    if p.qos != QoS::AtMostOnce {
                        conn.queue(Packet::PubAck(PubAck::new(p.pkid)))?;
                    }
                    if let Some((seq, sent_ns)) = parse_stamp(&p.payload) {
                        if seen.insert(seq) {
                            samples.push((sent_ns, received.saturating_sub(sent_ns)));
                        }
                    }
                }
                Packet::SubAck(_) | Packet::PingResp => {}
                other => bail!("unexpected packet for the live subscriber: {other:?}"),
            }
        }
        conn.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::load;

    #[test]
    fn the_drains_subscriber_leaves_the_live_messages_out() {
        assert!(TOPIC.starts_with(load::LIVE_PREFIX));
        assert!(!"devices/bench0/messages/events/".starts_with(load::LIVE_PREFIX));
    }
}
