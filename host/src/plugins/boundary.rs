//! The plugin boundary: the hub's [`Message`] goes in, the plugin's verdict
//! comes out. The conversion to and from the WIT record (`bindings::Message`,
//! whose body is a `list<u8>`) happens here and nowhere else: the body is
//! copied once on the way in (the guest gets its own bytes) and a filter's
//! result keeps the bytes the guest returned, without a second copy.
//!
//! Owns only the conversion (the pool's workers call it); running the call
//! is the pool's, checking what the plugin returned is the instance's
//! (sizes) and the router's (topics).

use std::sync::Arc;

use bytes::Bytes;

use super::bindings;
use super::CallFailure;
use crate::message::{Headers, Message};

/// What a plugin of a record world said about one message, as records.
#[derive(Debug, Clone)]
pub enum Outcome {
    Filtered(Option<bindings::Message>),
    Routed(Vec<bindings::Endpoint>),
}

/// What a plugin said about one message.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// A view filter kept the message as it was.
    Kept,
    /// A filter's result: the message to send on (changed or not), or none.
    Filtered(Option<Message>),
    /// A router's choice of destinations (none: the message is dropped).
    Routed(Vec<Destination>),
}

/// A destination a router plugin chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The upstream queue.
    Upstream,
    /// A module's input on the local broker.
    ModuleInput { module: String, input: String },
    /// Nowhere.
    Drop,
}

/// One verdict per message answered, in order, each with the message it
/// answers (so the caller's failure policy has it).
pub type Verdicts = Vec<(Message, Result<Verdict, CallFailure>)>;

/// A record world's outcome as the hub's verdict on `input`.
pub(super) fn verdict(outcome: Outcome, input: &Message) -> Verdict {
    match outcome {
        Outcome::Filtered(m) => Verdict::Filtered(m.map(|m| returned(m, input))),
        Outcome::Routed(endpoints) => Verdict::Routed(
            endpoints
                .into_iter()
                .map(|e| match e {
                    bindings::Endpoint::Upstream => Destination::Upstream,
                    bindings::Endpoint::ModuleInput((module, input)) => {
                        Destination::ModuleInput { module, input }
                    }
                    bindings::Endpoint::Drop => Destination::Drop,
                })
                .collect(),
        ),
    }
}

/// The message a filter returned, as the hub's: the plugin may change
/// anything the record carries; QoS, retain flag and publisher stay the
/// input's.
fn returned(m: bindings::Message, input: &Message) -> Message {
    let headers = Headers {
        source: m.source,
        properties: m.properties,
        system_properties: m.system_properties,
    };
    input.derived(m.topic, Bytes::from(m.body), m.enqueued_ms, headers)
}

/// A record as a message of the hub's (for running a view filter on
/// records, as `edgehub plugin test` does).
impl From<bindings::Message> for Message {
    fn from(m: bindings::Message) -> Self {
        let publisher = Arc::from("");
        let origin = Message::published(publisher, String::new(), Bytes::new(), 1, false, 0);
        let headers = Headers {
            source: m.source,
            properties: m.properties,
            system_properties: m.system_properties,
        };
        origin.derived(m.topic, Bytes::from(m.body), m.enqueued_ms, headers)
    }
}

impl From<&Message> for bindings::Message {
    fn from(m: &Message) -> Self {
        let h = m.headers();
        Self {
            source: h.source.clone(),
            topic: m.topic.clone(),
            properties: h.properties.clone(),
            system_properties: h.system_properties.clone(),
            body: m.body.to_vec(),
            enqueued_ms: m.enqueued_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_crosses_the_boundary_and_comes_back_whole() {
        let input = Message::published(
            Arc::from("d1/m1"),
            "devices/d1/modules/m1/messages/events/%24.ct=text%2Fplain&a=1".into(),
            Bytes::from_static(b"hello"),
            1,
            true,
            42,
        );
        let record = bindings::Message::from(&input);
        assert_eq!(record.source, "/messages/modules/m1");
        assert_eq!(record.properties, [("a".into(), "1".into())]);
        assert!(record
            .system_properties
            .contains(&("$contentType".into(), "text/plain".into())));
        assert_eq!(
            (record.body.as_slice(), record.enqueued_ms),
            (&b"hello"[..], 42)
        );

        let mut changed = record.clone();
        changed.properties.push(("b".into(), "2".into()));
        changed.body = b"bye".to_vec();
        let back = returned(changed, &input);
        assert_eq!(
            back.properties(),
            [("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert_eq!(back.source(), "/messages/modules/m1");
        assert_eq!(&back.body[..], b"bye");
        assert_eq!(
            (back.qos, back.retain, back.publisher()),
            (1, true, "d1/m1")
        );
    }

    #[test]
    fn a_record_lent_to_a_view_filter_reads_back_as_the_same_record() {
        let record = bindings::Message {
            source: "/messages/modules/m1/outputs/o1".into(),
            topic: "devices/d1/modules/m1/messages/events/".into(),
            properties: vec![("b".into(), "2".into()), ("a".into(), "1".into())],
            system_properties: vec![("$messageId".into(), "x".into())],
            body: b"\x00\xff".to_vec(),
            enqueued_ms: 7,
        };
        let back = bindings::Message::from(&Message::from(record.clone()));
        assert_eq!(format!("{back:?}"), format!("{record:?}"));
    }

    #[test]
    fn a_router_s_endpoints_become_destinations() {
        let input = Message::published(
            Arc::from("d1"),
            "sensors/t".into(),
            Bytes::new(),
            0,
            false,
            0,
        );
        let v = verdict(
            Outcome::Routed(vec![
                bindings::Endpoint::Upstream,
                bindings::Endpoint::ModuleInput(("alerts".into(), "in1".into())),
                bindings::Endpoint::Drop,
            ]),
            &input,
        );
        let Verdict::Routed(destinations) = v else {
            panic!("a router's outcome is routed")
        };
        assert_eq!(
            destinations,
            [
                Destination::Upstream,
                Destination::ModuleInput {
                    module: "alerts".into(),
                    input: "in1".into()
                },
                Destination::Drop
            ]
        );
    }
}
