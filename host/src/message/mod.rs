//! The hub's one message type: what a device published, from its session
//! through the router to the store, the upstream link and local subscribers.
//!
//! Owns what a message is: the topic it was published on, its body (one
//! `Bytes` buffer: the stored record, every local delivery and the message
//! itself share it, nothing copies it), when the hub took it, its QoS and
//! retain flag, and its IoT Hub view ([`Headers`]: the source routes match
//! on, application and system properties). The view is parsed from the
//! topic (see [`dialect`]) when first asked for, so a message that only
//! passes through (no route table, local delivery) never pays for it.
//!
//! It does not own where a message goes (`routing`), how it is stored (the
//! store's `Record`) or delivered (the broker's `Delivery`), nor the plugins'
//! WIT record (converted inside `plugins`).
//!
//! - `dialect`: the IoT Hub topic forms: telemetry topics, their property
//!   bags, and topics built back from a message.

pub mod dialect;

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

/// One message, as received or as a plugin or the router rewrote it.
#[derive(Debug, Clone)]
pub struct Message {
    /// The topic it was published on (or a plugin's replacement).
    pub topic: String,
    pub body: Bytes,
    /// Wall-clock milliseconds since the Unix epoch when the hub received it.
    pub enqueued_ms: u64,
    /// QoS as published (0 to 2) and the retain flag: what local
    /// subscribers get, within what they were granted.
    pub qos: u8,
    pub retain: bool,
    /// The client that published it: its device id is the source of a
    /// message on a plain (non IoT Hub) topic.
    publisher: Arc<str>,
    /// Parsed from `topic` on first use, or set by whoever rewrote it (a
    /// lock, not a cell: the router holds messages across awaits), and
    /// shared by clones (a message routed to several plugins).
    headers: OnceLock<Arc<Headers>>,
}

/// What routes and plugins see of a message besides its topic and body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    /// Where it came from: `/messages/devices/{d}` or
    /// `/messages/modules/{m}[/outputs/{o}]`.
    pub source: String,
    /// Application properties (name, value), in the order they were sent.
    pub properties: Vec<(String, String)>,
    /// System properties (`$contentType`, `$messageId`,
    /// `$connectionDeviceId`, …).
    pub system_properties: Vec<(String, String)>,
}

impl Message {
    /// A message `publisher` published on `topic`, taken at `enqueued_ms`.
    pub fn published(
        publisher: Arc<str>,
        topic: String,
        body: Bytes,
        qos: u8,
        retain: bool,
        enqueued_ms: u64,
    ) -> Self {
        Self {
            topic,
            body,
            enqueued_ms,
            qos,
            retain,
            publisher,
            headers: OnceLock::new(),
        }
    }

    /// A message made from this one (a plugin's result, a dead letter):
    /// same publisher, QoS and retain flag; the given topic, body and
    /// headers.
    pub fn derived(&self, topic: String, body: Bytes, enqueued_ms: u64, headers: Headers) -> Self {
        Self {
            topic,
            body,
            enqueued_ms,
            qos: self.qos,
            retain: self.retain,
            publisher: self.publisher.clone(),
            headers: OnceLock::from(Arc::new(headers)),
        }
    }

    /// The client that published it.
    pub fn publisher(&self) -> &str {
        &self.publisher
    }

    /// Source and properties (parsed from the topic the first time).
    pub fn headers(&self) -> &Headers {
        self.headers
            .get_or_init(|| Arc::new(dialect::headers(&self.topic, &self.publisher)))
    }

    pub fn source(&self) -> &str {
        &self.headers().source
    }

    pub fn properties(&self) -> &[(String, String)] {
        &self.headers().properties
    }

    pub fn system_properties(&self) -> &[(String, String)] {
        &self.headers().system_properties
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_derived_message_keeps_its_origin_and_the_headers_it_was_given() {
        let body = Bytes::from(vec![1u8; 10]);
        let m = Message::published(
            Arc::from("d1/m1"),
            "devices/d1/modules/m1/messages/events/a=1".into(),
            body.clone(),
            1,
            true,
            7,
        );
        assert_eq!(m.body.as_ptr(), body.as_ptr(), "the body is not copied");
        assert_eq!(m.source(), "/messages/modules/m1");
        let headers = Headers {
            source: "/messages/modules/other".into(),
            ..Headers::default()
        };
        let d = m.derived("sensors/x".into(), m.body.clone(), 9, headers.clone());
        assert_eq!(d.headers(), &headers, "not parsed again from the new topic");
        assert_eq!((d.qos, d.retain, d.publisher()), (1, true, "d1/m1"));
        assert_eq!(d.body.as_ptr(), body.as_ptr());
    }
}
