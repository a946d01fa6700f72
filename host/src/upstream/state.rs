//! The upstream MQTT session as a pure state machine: no socket, no clock,
//! no channels.
//!
//! Owns what one connection knows: which packet id carries which tagged
//! publish, the keepalive ping, the cloud's QoS 1 publishes waiting for
//! their consumers (acknowledged in the order they arrived, as MQTT
//! requires), and the generation that tells one connection from the next.
//! It encodes what must be sent into a buffer and returns what happened;
//! the link actor (`link.rs`) does the I/O and the waiting.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;

use super::wire::{Incoming, Wire};
use crate::packet_id::PacketIds;
use crate::store::Record;

/// A publish handed to the link. `tag` is the caller's name for it (the
/// forwarder uses store keys) and comes back in [`Inbound::Acked`].
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub tag: u64,
    pub content: Content,
    pub qos: QoS,
    pub retain: bool,
}

/// Where a publish's topic and payload live. Nothing is copied until the
/// packet is encoded.
#[derive(Debug, Clone)]
pub enum Content {
    Owned {
        topic: String,
        payload: Bytes,
    },
    /// A stored record, read in place.
    Stored(crate::store::Stored),
    /// Record `.1` of a batch from the store's live feed.
    Live(Arc<Vec<Record>>, usize),
}

impl Content {
    /// The topic and payload to encode.
    fn parts(&self) -> Result<(&str, &[u8]), StateError> {
        Ok(match self {
            Content::Owned { topic, payload } => (topic, payload),
            Content::Stored(s) => {
                let r = s
                    .record()
                    .map_err(|e| StateError::Corrupt(format!("key {}: {e}", s.key)))?;
                (r.topic, r.payload)
            }
            Content::Live(batch, i) => {
                let r = batch
                    .get(*i)
                    .ok_or_else(|| StateError::Corrupt(format!("no live record {i}")))?;
                (&r.topic, &r.payload)
            }
        })
    }
}

/// What one packet from the cloud meant.
#[derive(Debug, PartialEq)]
pub enum Inbound {
    /// The publish tagged `tag` is acknowledged.
    Acked(u64),
    /// The cloud refused the publish tagged `tag` (a v5 PUBACK with
    /// `reason` 0x80 or above): it is not delivered.
    Refused { tag: u64, reason: u8 },
    /// The cloud published; `pkid` is set for QoS 1 (acknowledge it with
    /// [`LinkState::consumed`] once its consumer has it).
    Cloud {
        topic: String,
        payload: Bytes,
        pkid: Option<u16>,
    },
    /// The cloud refused these subscriptions.
    SubscribeRefused(Vec<String>),
    /// Nothing for anyone (PINGRESP, a stray acknowledgement).
    Nothing,
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum StateError {
    #[error("upstream keepalive expired (no PINGRESP)")]
    KeepAlive,
    #[error("all 65535 packet ids are in flight")]
    NoPacketId,
    #[error("a stored record cannot be sent: {0}")]
    Corrupt(String),
}

/// Entries the in-flight map keeps allocated once it empties.
const KEEP_INFLIGHT: usize = 1024;

/// One connection's protocol state. A new connection starts a new state
/// with the next generation.
pub struct LinkState {
    generation: u64,
    wire: Wire,
    ids: PacketIds,
    /// Tag of each QoS 1 publish awaiting its PUBACK, by packet id.
    inflight: HashMap<u16, u64>,
    /// Subscriptions sent on connect, under this packet id.
    /// SUBSCRIBEs and UNSUBSCRIBEs sent and not yet answered, by packet id
    /// (the filters of a SUBSCRIBE, to name the refused ones).
    subscribing: HashMap<u16, Vec<String>>,
    unsubscribing: HashMap<u16, Vec<String>>,
    ping_outstanding: bool,
    /// The cloud's QoS 1 publishes in arrival order: (packet id, consumed).
    cloud: VecDeque<(u16, bool)>,
}

impl LinkState {
    pub fn new(generation: u64, wire: Wire) -> Self {
        Self {
            generation,
            wire,
            ids: PacketIds::default(),
            inflight: HashMap::new(),
            subscribing: HashMap::new(),
            unsubscribing: HashMap::new(),
            ping_outstanding: false,
            cloud: VecDeque::new(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Publishes awaiting their PUBACK.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Cloud publishes not yet acknowledged to the cloud.
    pub fn unconsumed(&self) -> usize {
        self.cloud.len()
    }

    /// Queues a SUBSCRIBE for `filters` (after every CONNACK, and when a
    /// consumer's filters grow).
    pub fn subscribe(&mut self, filters: &[String], out: &mut BytesMut) {
        if filters.is_empty() {
            return;
        }
        let Some(pkid) = self.next_id() else { return };
        self.wire.subscribe(pkid, filters, out);
        self.subscribing.insert(pkid, filters.to_vec());
    }

    /// Queues an UNSUBSCRIBE for `filters` (a consumer's filters shrank).
    pub fn unsubscribe(&mut self, filters: &[String], out: &mut BytesMut) {
        if filters.is_empty() {
            return;
        }
        let Some(pkid) = self.next_id() else { return };
        self.wire.unsubscribe(pkid, filters, out);
        self.unsubscribing.insert(pkid, filters.to_vec());
    }

    /// Filters of UNSUBSCRIBEs not answered (the connection ended first):
    /// to unsubscribe again on the next one.
    pub fn unanswered_unsubscribes(&mut self) -> Vec<String> {
        self.unsubscribing.drain().flat_map(|(_, f)| f).collect()
    }

    /// Encodes `o` into `out`; QoS 1 publishes are tracked until acknowledged.
    pub fn publish(&mut self, o: &Outgoing, out: &mut BytesMut) -> Result<(), StateError> {
        let (topic, payload) = o.content.parts()?;
        let pkid = match o.qos {
            QoS::AtMostOnce => 0,
            _ => {
                let id = self.next_id().ok_or(StateError::NoPacketId)?;
                self.inflight.insert(id, o.tag);
                id
            }
        };
        self.wire.publish(out, topic, payload, pkid, o.retain);
        Ok(())
    }

    /// What a packet from the cloud means.
    pub fn receive(&mut self, packet: Incoming) -> Inbound {
        match packet {
            Incoming::PubAck { pkid, reason } => {
                let tag = self.inflight.remove(&pkid);
                // All acknowledged: give back what a full window's map took
                // (32768 entries are about 1 MiB).
                if self.inflight.is_empty() && self.inflight.capacity() > KEEP_INFLIGHT {
                    self.inflight.shrink_to(KEEP_INFLIGHT);
                }
                match tag {
                    Some(tag) if reason >= 0x80 => Inbound::Refused { tag, reason },
                    Some(tag) => Inbound::Acked(tag),
                    None => Inbound::Nothing,
                }
            }
            Incoming::PingResp => {
                self.ping_outstanding = false;
                Inbound::Nothing
            }
            Incoming::Publish {
                topic,
                payload,
                qos,
                pkid,
            } => {
                let pkid = match qos {
                    0 => None,
                    // QoS 2 is answered as QoS 1 would be; the hub
                    // subscribes at QoS 1, so a broker sends no QoS 2.
                    _ => {
                        self.cloud.push_back((pkid, false));
                        Some(pkid)
                    }
                };
                Inbound::Cloud {
                    topic,
                    payload,
                    pkid,
                }
            }
            Incoming::UnsubAck { pkid } => {
                self.unsubscribing.remove(&pkid);
                Inbound::Nothing
            }
            Incoming::SubAck { pkid, refused } => {
                let Some(filters) = self.subscribing.remove(&pkid) else {
                    return Inbound::Nothing;
                };
                let refused: Vec<String> = filters
                    .into_iter()
                    .zip(refused)
                    .filter(|(_, r)| *r)
                    .map(|(f, _)| f)
                    .collect();
                if refused.is_empty() {
                    Inbound::Nothing
                } else {
                    Inbound::SubscribeRefused(refused)
                }
            }
            _ => Inbound::Nothing,
        }
    }

    /// The consumer of the cloud publish `pkid` (received on connection
    /// `generation`) has it: queues the PUBACKs now due, in arrival order.
    /// One from an earlier connection is ignored (the cloud sends it again).
    pub fn consumed(&mut self, generation: u64, pkid: u16, out: &mut BytesMut) {
        if generation != self.generation {
            return;
        }
        if let Some(entry) = self
            .cloud
            .iter_mut()
            .find(|(id, done)| *id == pkid && !done)
        {
            entry.1 = true;
        }
        while let Some(&(id, true)) = self.cloud.front() {
            self.cloud.pop_front();
            self.wire.puback(id, out);
        }
    }

    /// The keepalive interval passed: queues a PINGREQ, or fails when the
    /// previous one is still unanswered.
    pub fn keepalive_due(&mut self, out: &mut BytesMut) -> Result<(), StateError> {
        if self.ping_outstanding {
            return Err(StateError::KeepAlive);
        }
        self.ping_outstanding = true;
        self.wire.pingreq(out);
        Ok(())
    }

    /// The connection ended: the tags that were never acknowledged, in the
    /// order they were sent is not kept (callers sort if they care).
    pub fn close(self) -> Vec<u64> {
        self.inflight.into_values().collect()
    }

    fn next_id(&mut self) -> Option<u16> {
        let (inflight, subs, unsubs) = (&self.inflight, &self.subscribing, &self.unsubscribing);
        self.ids.next(|id| {
            inflight.contains_key(&id) || subs.contains_key(&id) || unsubs.contains_key(&id)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MqttVersion;
    use rumqttc::mqttbytes::{self as m, v4};
    use rumqttc::v5::mqttbytes::v5;

    fn owned(tag: u64, topic: &str, qos: QoS) -> Outgoing {
        Outgoing {
            tag,
            content: Content::Owned {
                topic: topic.into(),
                payload: Bytes::from_static(b"body"),
            },
            qos,
            retain: false,
        }
    }

    fn read_all(buf: &mut BytesMut) -> Vec<v4::Packet> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            out.push(v4::Packet::read(buf, usize::MAX).unwrap());
        }
        out
    }

    fn puback(pkid: u16) -> v4::Packet {
        v4::Packet::PubAck(v4::PubAck::new(pkid))
    }

    const V3: Wire = Wire(MqttVersion::V311);
    const V5: Wire = Wire(MqttVersion::V5);

    /// What the link reads when the cloud sends `p` (3.1.1).
    fn inc(p: v4::Packet) -> Incoming {
        let mut buf = BytesMut::new();
        p.write(&mut buf, usize::MAX).unwrap();
        V3.read(&mut buf).unwrap().unwrap()
    }

    #[test]
    fn a_puback_releases_the_tag_its_publish_was_sent_under() {
        let mut s = LinkState::new(1, V3);
        let mut out = BytesMut::new();
        s.publish(&owned(42, "a/b", QoS::AtLeastOnce), &mut out)
            .unwrap();
        s.publish(&owned(43, "a/c", QoS::AtLeastOnce), &mut out)
            .unwrap();
        let sent = read_all(&mut out);
        let pkids: Vec<u16> = sent
            .iter()
            .map(|p| match p {
                v4::Packet::Publish(p) => p.pkid,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(s.receive(inc(puback(pkids[1]))), Inbound::Acked(43));
        assert_eq!(
            s.receive(inc(puback(pkids[1]))),
            Inbound::Nothing,
            "only once"
        );
        assert_eq!(s.inflight(), 1);
        assert_eq!(s.close(), vec![42], "the unacknowledged one is reported");
    }

    #[test]
    fn qos0_publishes_are_not_tracked_and_carry_the_retain_flag() {
        let mut s = LinkState::new(1, V3);
        let mut out = BytesMut::new();
        let mut o = owned(1, "twin/reported", QoS::AtMostOnce);
        o.retain = true;
        s.publish(&o, &mut out).unwrap();
        match &read_all(&mut out)[..] {
            [v4::Packet::Publish(p)] => {
                assert!(p.retain);
                assert_eq!(p.qos, m::QoS::AtMostOnce);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.inflight(), 0);
    }

    #[test]
    fn cloud_publishes_are_acknowledged_only_once_consumed_and_in_arrival_order() {
        let mut s = LinkState::new(7, V3);
        let mut out = BytesMut::new();
        for pkid in [5u16, 6, 7] {
            let mut p = v4::Publish::new("edges/e/scope", QoS::AtLeastOnce, "{}");
            p.pkid = pkid;
            assert!(matches!(
                s.receive(inc(v4::Packet::Publish(p))),
                Inbound::Cloud { pkid: Some(id), .. } if id == pkid
            ));
        }
        s.consumed(7, 6, &mut out);
        assert!(out.is_empty(), "6 waits for 5: PUBACKs go out in order");
        s.consumed(6, 5, &mut out);
        assert!(
            out.is_empty(),
            "an ack from an earlier connection is ignored"
        );
        s.consumed(7, 5, &mut out);
        let acks: Vec<_> = read_all(&mut out);
        assert_eq!(acks, vec![puback(5), puback(6)]);
        assert_eq!(s.unconsumed(), 1);
    }

    #[test]
    fn an_unanswered_ping_ends_the_connection() {
        let mut s = LinkState::new(1, V3);
        let mut out = BytesMut::new();
        s.keepalive_due(&mut out).unwrap();
        assert_eq!(read_all(&mut out), vec![v4::Packet::PingReq]);
        assert_eq!(s.keepalive_due(&mut out), Err(StateError::KeepAlive));
        let mut s = LinkState::new(1, V3);
        s.keepalive_due(&mut out).unwrap();
        s.receive(inc(v4::Packet::PingResp));
        assert!(s.keepalive_due(&mut out).is_ok(), "answered: ping again");
    }

    #[test]
    fn refused_subscriptions_are_named() {
        let mut s = LinkState::new(1, V3);
        let mut out = BytesMut::new();
        s.subscribe(&["a".into(), "b".into()], &mut out);
        let pkid = match &read_all(&mut out)[..] {
            [v4::Packet::Subscribe(sub)] => sub.pkid,
            other => panic!("{other:?}"),
        };
        let ack = v4::SubAck::new(
            pkid,
            vec![
                v4::SubscribeReasonCode::Success(QoS::AtLeastOnce),
                v4::SubscribeReasonCode::Failure,
            ],
        );
        assert_eq!(
            s.receive(inc(v4::Packet::SubAck(ack))),
            Inbound::SubscribeRefused(vec!["b".into()])
        );
    }

    #[test]
    fn the_hand_encoded_publish_reads_back_with_the_codec() {
        for payload_len in [0usize, 5, 200, 20_000, 3_000_000] {
            let payload = vec![7u8; payload_len];
            let mut buf = BytesMut::new();
            V3.publish(
                &mut buf,
                "devices/d1/messages/events/a=b",
                &payload,
                4242,
                false,
            );
            match v4::Packet::read(&mut buf, usize::MAX).unwrap() {
                v4::Packet::Publish(p) => {
                    assert_eq!(p.topic, "devices/d1/messages/events/a=b");
                    assert_eq!(p.pkid, 4242);
                    assert_eq!(p.qos, m::QoS::AtLeastOnce);
                    assert!(!p.dup && !p.retain);
                    assert_eq!(&p.payload[..], &payload[..]);
                }
                other => panic!("{other:?}"),
            }
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn a_v5_puback_with_an_error_reason_refuses_the_publish_and_a_low_one_acknowledges_it() {
        let mut s = LinkState::new(1, V5);
        let mut out = BytesMut::new();
        for tag in [1, 2] {
            s.publish(&owned(tag, "a/b", QoS::AtLeastOnce), &mut out)
                .unwrap();
        }
        let mut pkids = Vec::new();
        while !out.is_empty() {
            match v5::Packet::read(&mut out, None).unwrap() {
                v5::Packet::Publish(p) => {
                    assert_eq!((&p.topic[..], &p.payload[..]), (&b"a/b"[..], &b"body"[..]));
                    pkids.push(p.pkid);
                }
                other => panic!("{other:?}"),
            }
        }
        let ack = |pkid, reason| {
            let mut buf = BytesMut::new();
            let mut a = v5::PubAck::new(pkid, None);
            a.reason = reason;
            v5::Packet::PubAck(a).write(&mut buf, None).unwrap();
            V5.read(&mut buf).unwrap().unwrap()
        };
        assert_eq!(
            s.receive(ack(pkids[0], v5::PubAckReason::NotAuthorized)),
            Inbound::Refused {
                tag: 1,
                reason: 0x87
            }
        );
        assert_eq!(
            s.receive(ack(pkids[1], v5::PubAckReason::NoMatchingSubscribers)),
            Inbound::Acked(2),
            "0x10 is a success"
        );
        assert_eq!(s.inflight(), 0);
    }

    #[test]
    fn v5_control_packets_read_back_with_the_v5_codec() {
        let mut s = LinkState::new(1, V5);
        let mut out = BytesMut::new();
        s.subscribe(&["edges/e/#".into()], &mut out);
        s.keepalive_due(&mut out).unwrap();
        let mut p = v5::Publish::new("c2d", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, "x", None);
        p.pkid = 9;
        let mut buf = BytesMut::new();
        v5::Packet::Publish(p).write(&mut buf, None).unwrap();
        let cloud = V5.read(&mut buf).unwrap().unwrap();
        assert!(matches!(
            s.receive(cloud),
            Inbound::Cloud { pkid: Some(9), .. }
        ));
        s.consumed(1, 9, &mut out);
        let mut kinds = Vec::new();
        while !out.is_empty() {
            kinds.push(match v5::Packet::read(&mut out, None).unwrap() {
                v5::Packet::Subscribe(sub) => format!("subscribe {}", sub.filters[0].path),
                v5::Packet::PingReq(_) => "ping".into(),
                v5::Packet::PubAck(a) => format!("puback {}", a.pkid),
                other => panic!("{other:?}"),
            });
        }
        assert_eq!(kinds, ["subscribe edges/e/#", "ping", "puback 9"]);
    }
}
