//! A device-to-cloud message as routes and plugins see it: its source
//! (`/messages/devices/{d}`, `/messages/modules/{m}/outputs/{o}`), application
//! and system properties and body, built from an MQTT publish; and the way
//! back, the upstream or module-input topic of a (possibly changed) message.
//!
//! Owns the mapping between IoT Hub property-bag keys (`$.ct`, `$.mid`, …)
//! and system property names (`$contentType`, `$messageId`, …).

use std::cell::OnceCell;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::rules::Fields;
use crate::mqtt::dialect::Telemetry;
use crate::plugins::Message;
use crate::topic;

/// Property-bag keys and the system property each stands for.
const SYSTEM: [(&str, &str); 8] = [
    ("$.ct", "$contentType"),
    ("$.ce", "$contentEncoding"),
    ("$.mid", "$messageId"),
    ("$.cid", "$correlationId"),
    ("$.uid", "$userId"),
    ("$.to", "$to"),
    ("$.on", "$outputName"),
    ("$.exp", "$expiryTimeUtc"),
];

/// Characters kept as they are in a property bag (as the IoT Hub SDKs do).
const BAG: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'$');

/// Builds the routed view of a publish on `topic_name`. A plain (non IoT
/// Hub) topic gets the source of the client that sent it and no properties.
pub fn from_publish(topic_name: &str, body: &[u8], client_id: &str, now_ms: u64) -> Message {
    let mut properties = Vec::new();
    let mut system_properties = Vec::new();
    let source = match Telemetry::parse(topic_name) {
        Some(t) => {
            let mut output = None;
            for (k, v) in t.properties() {
                if k == "$.on" {
                    output = Some(v.clone());
                }
                // The connection properties are the hub's to set, never the sender's.
                if k.starts_with("$.connection") {
                    continue;
                }
                match SYSTEM.iter().find(|(bag, _)| *bag == k) {
                    Some((_, name)) => system_properties.push((name.to_string(), v)),
                    None if k.starts_with("$.") => {
                        system_properties.push((format!("${}", &k[2..]), v))
                    }
                    None => properties.push((k, v)),
                }
            }
            system_properties.push(("$connectionDeviceId".into(), t.device.to_string()));
            match t.module {
                Some(m) => {
                    system_properties.push(("$connectionModuleId".into(), m.to_string()));
                    match output {
                        Some(o) => format!("/messages/modules/{m}/outputs/{o}"),
                        None => format!("/messages/modules/{m}"),
                    }
                }
                None => format!("/messages/devices/{}", t.device),
            }
        }
        None => {
            let device = client_id.split('/').next().unwrap_or(client_id);
            system_properties.push(("$connectionDeviceId".into(), device.to_string()));
            format!("/messages/devices/{device}")
        }
    };
    Message {
        source,
        topic: topic_name.to_string(),
        properties,
        system_properties,
        body: body.to_vec(),
        enqueued_ms: now_ms,
    }
}

/// The property bag of `m` (application and system properties, except the
/// connection ones, which the topic carries).
fn bag(m: &Message) -> String {
    let mut out = String::new();
    let mut push = |k: &str, v: &str| {
        if !out.is_empty() {
            out.push('&');
        }
        out.extend(utf8_percent_encode(k, BAG));
        out.push('=');
        out.extend(utf8_percent_encode(v, BAG));
    };
    for (k, v) in &m.system_properties {
        if k == "$connectionDeviceId" || k == "$connectionModuleId" {
            continue;
        }
        match SYSTEM.iter().find(|(_, name)| name == k) {
            Some((key, _)) => push(key, v),
            None => match k.strip_prefix('$') {
                Some(rest) => push(&format!("$.{rest}"), v),
                None => push(k, v),
            },
        }
    }
    for (k, v) in &m.properties {
        push(k, v);
    }
    out
}

/// The topic `m` is stored and sent upstream on. Telemetry topics are
/// rebuilt from the message's properties (a filter may have changed them);
/// plain topics are kept as published.
pub fn upstream_topic(m: &Message) -> String {
    match Telemetry::parse(&m.topic) {
        Some(t) => {
            let mut topic = match t.module {
                Some(module) => format!("devices/{}/modules/{module}/messages/events/", t.device),
                None => format!("devices/{}/messages/events/", t.device),
            };
            topic.push_str(&bag(m));
            topic
        }
        None => m.topic.clone(),
    }
}

/// The topic a module receives `m` on, at its input `input`.
pub fn module_input_topic(edge_id: &str, module: &str, input: &str, m: &Message) -> String {
    format!(
        "devices/{edge_id}/modules/{module}/inputs/{input}/{}",
        bag(m)
    )
}

/// Whether `name` is a valid topic segment for a module or an input.
pub fn valid_segment(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '+', '#']) && topic::valid_name(name)
}

/// A message as condition evaluation reads it; the JSON body is parsed at
/// most once, and only when a condition asks for it.
pub struct MessageFields<'a> {
    pub message: &'a Message,
    body: OnceCell<Option<serde_json::Value>>,
}

impl<'a> MessageFields<'a> {
    pub fn new(message: &'a Message) -> Self {
        Self {
            message,
            body: OnceCell::new(),
        }
    }
}

impl Fields for MessageFields<'_> {
    fn app_property(&self, name: &str) -> Option<&str> {
        let p = &self.message.properties;
        p.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn system_property(&self, name: &str) -> Option<&str> {
        let p = &self.message.system_properties;
        p.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn body_json(&self) -> Option<&serde_json::Value> {
        self.body
            .get_or_init(|| serde_json::from_slice(&self.message.body).ok())
            .as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_properties_split_into_application_and_system() {
        let m = from_publish(
            "devices/d1/modules/m1/messages/events/%24.ct=application%2Fjson&%24.on=out1&temp=21",
            b"{}",
            "d1/m1",
            5,
        );
        assert_eq!(m.source, "/messages/modules/m1/outputs/out1");
        assert_eq!(m.properties, vec![("temp".into(), "21".into())]);
        let f = MessageFields::new(&m);
        assert_eq!(f.system_property("$contentType"), Some("application/json"));
        assert_eq!(f.system_property("$connectionModuleId"), Some("m1"));
        assert_eq!(f.system_property("$outputName"), Some("out1"));
    }

    #[test]
    fn a_sender_cannot_claim_another_connection_identity() {
        let m = from_publish(
            "devices/d1/messages/events/%24.connectionDeviceId=boss&%24.connectionModuleId=m9",
            b"",
            "d1",
            0,
        );
        let f = MessageFields::new(&m);
        assert_eq!(f.system_property("$connectionDeviceId"), Some("d1"));
        assert_eq!(f.system_property("$connectionModuleId"), None);
    }

    #[test]
    fn the_upstream_topic_is_rebuilt_from_changed_properties() {
        let mut m = from_publish("devices/d1/messages/events/%24.mid=7&a=1", b"x", "d1", 0);
        assert_eq!(m.source, "/messages/devices/d1");
        m.properties.push(("alert".into(), "a b/c".into()));
        assert_eq!(
            upstream_topic(&m),
            "devices/d1/messages/events/$.mid=7&a=1&alert=a%20b%2Fc"
        );
    }

    #[test]
    fn plain_topics_keep_their_name_and_take_the_client_as_source() {
        let m = from_publish("sensors/t1", b"1", "dev9", 0);
        assert_eq!(m.source, "/messages/devices/dev9");
        assert_eq!(upstream_topic(&m), "sensors/t1");
    }

    #[test]
    fn module_inputs_carry_the_property_bag() {
        let m = from_publish("devices/d1/messages/events/a=1", b"x", "d1", 0);
        assert_eq!(
            module_input_topic("edge", "alerts", "in1", &m),
            "devices/edge/modules/alerts/inputs/in1/a=1"
        );
    }
}
