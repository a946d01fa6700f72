//! The link's own QoS 1 publishes: what consumers hand the link to send
//! until the cloud acknowledges it (method answers, reported twin
//! documents), as opposed to the store's queue, which the forwarder sends.
//!
//! Owns the publishes not yet acknowledged, in the order they were handed
//! over, which of them are on the current connection, and how each ended
//! (told once, on its own channel). A pure state machine: no socket, no
//! clock of its own (the link passes `now`). It does not encode packets
//! (`state.rs` does) nor decide when a connection is up (the link does).

use std::collections::BTreeMap;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::state::{Content, Outgoing};

/// Tags of the link's own publishes carry this bit; the store's keys
/// never do (a key's top byte is its lane, 0 to 9).
const OWN_TAG: u64 = 1 << 63;

/// Own publishes in flight at once on one connection, at most: the rest
/// of an upstream's receive maximum is the forwarder's.
pub const MAX_IN_FLIGHT: usize = 8;

/// A publish to make at QoS 1 until the cloud acknowledges it.
#[derive(Debug, Clone)]
pub struct Reliable {
    pub topic: String,
    pub payload: Bytes,
    /// Retained: a newer one for the same topic replaces one not yet sent.
    pub retain: bool,
    /// Given up after this (a method's caller stops waiting); `None`: never.
    pub until: Option<Instant>,
}

/// How a [`Reliable`] publish ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// The cloud acknowledged it.
    Acked,
    /// The cloud refused it (an MQTT 5 PUBACK with this reason code).
    Refused(u8),
    /// Its time ran out before a connection carried it to the cloud.
    Expired,
    /// A newer retained publish on its topic took its place before it was
    /// sent.
    Replaced,
}

struct Entry {
    msg: Reliable,
    done: Option<oneshot::Sender<Delivered>>,
    /// Sent on the current connection.
    sent: bool,
}

/// The link's own publishes not yet acknowledged.
#[derive(Default)]
pub struct Pending {
    next: u64,
    entries: BTreeMap<u64, Entry>,
    in_flight: usize,
    cap: usize,
}

impl Pending {
    /// Takes `msg`; `done` hears how it ended.
    pub fn push(&mut self, msg: Reliable, done: Option<oneshot::Sender<Delivered>>) {
        if msg.retain {
            let replaced: Vec<u64> = self
                .entries
                .iter()
                .filter(|(_, e)| !e.sent && e.msg.retain && e.msg.topic == msg.topic)
                .map(|(id, _)| *id)
                .collect();
            for id in replaced {
                self.finish(id, Delivered::Replaced);
            }
        }
        self.next += 1;
        let entry = Entry {
            msg,
            done,
            sent: false,
        };
        self.entries.insert(self.next, entry);
    }

    /// A new connection, carrying at most `cap` of them at once: nothing
    /// is on it yet, so everything not acknowledged is sent again.
    pub fn connected(&mut self, cap: usize) {
        self.cap = cap.max(1);
        self.in_flight = 0;
        for e in self.entries.values_mut() {
            e.sent = false;
        }
    }

    /// What to send now on the connection, in order, within its cap;
    /// publishes past their time are dropped first.
    pub fn due(&mut self, now: Instant) -> Vec<Outgoing> {
        self.expire(now);
        let mut out = Vec::new();
        for (id, e) in self.entries.iter_mut() {
            if self.in_flight >= self.cap {
                break;
            }
            if e.sent {
                continue;
            }
            e.sent = true;
            self.in_flight += 1;
            out.push(Outgoing {
                tag: OWN_TAG | id,
                content: Content::Owned {
                    topic: e.msg.topic.clone(),
                    payload: e.msg.payload.clone(),
                },
                qos: QoS::AtLeastOnce,
                retain: e.msg.retain,
            });
        }
        out
    }

    /// Drops the publishes not on a connection whose time has run out.
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.sent && e.msg.until.is_some_and(|u| u <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.finish(id, Delivered::Expired);
        }
    }

    /// Whether `tag` names one of these (not a store key).
    pub fn owns(tag: u64) -> bool {
        tag & OWN_TAG != 0
    }

    /// The cloud answered the publish tagged `tag` (`refused`: with this
    /// reason code).
    pub fn answered(&mut self, tag: u64, refused: Option<u8>) {
        let id = tag & !OWN_TAG;
        if self.entries.get(&id).is_some_and(|e| e.sent) {
            self.in_flight -= 1;
            self.finish(id, refused.map_or(Delivered::Acked, Delivered::Refused));
        }
    }

    /// Publishes not acknowledged yet.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    fn finish(&mut self, id: u64, how: Delivered) {
        if let Some(e) = self.entries.remove(&id) {
            if let Some(done) = e.done {
                let _ = done.send(how);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn msg(topic: &str, retain: bool, until: Option<Instant>) -> Reliable {
        Reliable {
            topic: topic.into(),
            payload: Bytes::from_static(b"x"),
            retain,
            until,
        }
    }

    fn tags(out: &[Outgoing]) -> Vec<u64> {
        out.iter().map(|o| o.tag).collect()
    }

    #[test]
    fn publishes_go_out_in_order_within_the_cap_and_the_rest_follow_as_acks_come() {
        let now = Instant::now();
        let mut p = Pending::default();
        let mut done = Vec::new();
        for i in 0..3 {
            let (tx, rx) = oneshot::channel();
            p.push(msg(&format!("t{i}"), false, None), Some(tx));
            done.push(rx);
        }
        p.connected(2);
        let first = p.due(now);
        assert_eq!(first.len(), 2);
        assert!(first
            .iter()
            .all(|o| Pending::owns(o.tag) && o.qos == QoS::AtLeastOnce));
        assert!(p.due(now).is_empty(), "the cap is full");
        p.answered(first[0].tag, None);
        assert_eq!(done[0].try_recv(), Ok(Delivered::Acked));
        let next = p.due(now);
        assert_eq!(next.len(), 1);
        p.answered(next[0].tag, Some(0x87));
        assert_eq!(done[2].try_recv(), Ok(Delivered::Refused(0x87)));
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn what_a_lost_connection_carried_unacknowledged_is_sent_again_on_the_next() {
        let now = Instant::now();
        let mut p = Pending::default();
        p.push(msg("a", false, None), None);
        p.push(msg("b", false, None), None);
        p.connected(8);
        let sent = p.due(now);
        p.answered(sent[0].tag, None);
        p.connected(8);
        let again = p.due(now);
        assert_eq!(
            tags(&again),
            vec![sent[1].tag],
            "only the unacknowledged one"
        );
        // An acknowledgement for a tag of the old connection that is gone
        // does not count against the new one.
        p.answered(sent[0].tag, None);
        assert_eq!(p.len(), 1);
        assert!(p.due(now).is_empty());
    }

    #[test]
    fn a_publish_past_its_time_is_dropped_unsent_and_told_so() {
        let now = Instant::now();
        let mut p = Pending::default();
        let (tx, mut rx) = oneshot::channel();
        p.push(
            msg("late", false, Some(now + Duration::from_secs(1))),
            Some(tx),
        );
        p.push(msg("forever", false, None), None);
        p.expire(now + Duration::from_secs(2));
        assert_eq!(rx.try_recv(), Ok(Delivered::Expired));
        p.connected(8);
        let out = p.due(now + Duration::from_secs(2));
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0].content, Content::Owned { topic, .. } if topic == "forever"));
    }

    #[test]
    fn a_newer_retained_document_replaces_one_not_yet_sent_but_not_one_in_flight() {
        let now = Instant::now();
        let mut p = Pending::default();
        let (tx1, mut rx1) = oneshot::channel();
        p.push(msg("doc", true, None), Some(tx1));
        p.connected(8);
        let in_flight = p.due(now);
        let (tx2, mut rx2) = oneshot::channel();
        p.push(msg("doc", true, None), Some(tx2));
        let (tx3, _rx3) = oneshot::channel();
        p.push(msg("doc", true, None), Some(tx3));
        assert_eq!(rx2.try_recv(), Ok(Delivered::Replaced));
        assert!(
            rx1.try_recv().is_err(),
            "the one in flight is still awaited"
        );
        assert_eq!(p.len(), 2);
        p.answered(in_flight[0].tag, None);
        assert_eq!(rx1.try_recv(), Ok(Delivered::Acked));
        assert_eq!(p.due(now).len(), 1);
    }
}
