//! The IoT Hub topic dialect: which topics are telemetry
//! (`devices/{d}[/modules/{m}]/messages/events/{bag}`), their URL-encoded
//! property bags, and the topics built back from a (possibly changed)
//! message: upstream telemetry and module inputs.
//!
//! Owns the mapping between property-bag keys (`$.ct`, `$.mid`, …) and
//! system property names (`$contentType`, `$messageId`, …). What happens to
//! telemetry is the router's business.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::{Headers, Message};
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

/// Telemetry parsed from `devices/{d}/messages/events/{bag}` or
/// `devices/{d}/modules/{m}/messages/events/{bag}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Telemetry<'a> {
    pub device: &'a str,
    pub module: Option<&'a str>,
    /// The property bag as sent (still URL-encoded).
    pub raw_properties: &'a str,
}

impl<'a> Telemetry<'a> {
    pub fn parse(topic: &'a str) -> Option<Self> {
        let rest = topic.strip_prefix("devices/")?;
        let (device, rest) = rest.split_once('/')?;
        let (module, rest) = match rest.strip_prefix("modules/") {
            Some(r) => {
                let (m, r) = r.split_once('/')?;
                (Some(m), r)
            }
            None => (None, rest),
        };
        let raw_properties = rest.strip_prefix("messages/events")?;
        let raw_properties = match raw_properties {
            "" => "",
            r => r.strip_prefix('/')?,
        };
        if device.is_empty() || module == Some("") {
            return None;
        }
        Some(Self {
            device,
            module,
            raw_properties,
        })
    }

    /// Decoded properties in the order sent (system properties start with `$.`).
    pub fn properties(&self) -> Vec<(String, String)> {
        url::form_urlencoded::parse(self.raw_properties.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }
}

/// A cloud-to-device topic: `devices/{d}/messages/devicebound/{properties}`.
pub struct DeviceBound;

impl DeviceBound {
    /// When a message on `topic` expires (Unix ms): its `$.exp` property,
    /// an RFC 3339 time (as IoT Hub sends it); `None` when absent or not a
    /// time.
    pub fn expiry_ms(topic: &str) -> Option<u64> {
        let (_, bag) = topic.split_once("/messages/devicebound/")?;
        let (_, exp) = url::form_urlencoded::parse(bag.as_bytes()).find(|(k, _)| k == "$.exp")?;
        let rfc3339 = &time::format_description::well_known::Rfc3339;
        let at = time::OffsetDateTime::parse(&exp, rfc3339).ok()?;
        u64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
    }
}

/// The headers of a message published on `topic` by `publisher`. A plain
/// (non IoT Hub) topic gets the publisher's device as source and no
/// properties.
pub fn headers(topic: &str, publisher: &str) -> Headers {
    let mut properties = Vec::new();
    let mut system_properties = Vec::new();
    let source = match Telemetry::parse(topic) {
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
            let device = publisher.split('/').next().unwrap_or(publisher);
            system_properties.push(("$connectionDeviceId".into(), device.to_string()));
            format!("/messages/devices/{device}")
        }
    };
    Headers {
        source,
        properties,
        system_properties,
    }
}

/// Appends `k=v` to a property bag, URL-encoded as the IoT Hub SDKs do.
pub fn push_property(bag: &mut String, k: &str, v: &str) {
    if !bag.is_empty() {
        bag.push('&');
    }
    bag.extend(utf8_percent_encode(k, BAG));
    bag.push('=');
    bag.extend(utf8_percent_encode(v, BAG));
}

/// The property bag of `m` (application and system properties, except the
/// connection ones, which the topic carries).
fn bag(m: &Message) -> String {
    let mut out = String::new();
    let mut push = |k: &str, v: &str| push_property(&mut out, k, v);
    for (k, v) in m.system_properties() {
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
    for (k, v) in m.properties() {
        push(k, v);
    }
    out
}

/// The topic `m` is stored and sent upstream on after a plugin changed it.
/// Telemetry topics are rebuilt from the message's properties (a filter may
/// have changed them); plain topics are kept as published.
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;

    fn published(topic: &str, publisher: &str) -> Message {
        Message::published(
            Arc::from(publisher),
            topic.to_string(),
            Bytes::from_static(b"{}"),
            1,
            false,
            5,
        )
    }

    fn property<'a>(p: &'a [(String, String)], name: &str) -> Option<&'a str> {
        p.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn device_telemetry_with_a_property_bag_is_parsed() {
        let t = Telemetry::parse("devices/d1/messages/events/%24.ct=application%2Fjson&temp=21")
            .unwrap();
        assert_eq!(t.device, "d1");
        assert_eq!(t.module, None);
        assert_eq!(
            t.properties(),
            vec![
                ("$.ct".to_string(), "application/json".to_string()),
                ("temp".to_string(), "21".to_string())
            ]
        );
    }

    #[test]
    fn module_telemetry_without_properties_is_parsed() {
        for topic in [
            "devices/d1/modules/m1/messages/events/",
            "devices/d1/modules/m1/messages/events",
        ] {
            let t = Telemetry::parse(topic).unwrap();
            assert_eq!((t.device, t.module), ("d1", Some("m1")));
            assert!(t.properties().is_empty());
        }
    }

    #[test]
    fn other_topics_are_not_telemetry() {
        for topic in [
            "devices/d1/messages/devicebound/",
            "sensors/t",
            "devices//messages/events/",
            "devices/d1/messages/eventsx",
        ] {
            assert_eq!(Telemetry::parse(topic), None, "{topic}");
        }
    }

    #[test]
    fn telemetry_properties_split_into_application_and_system() {
        let m = published(
            "devices/d1/modules/m1/messages/events/%24.ct=application%2Fjson&%24.on=out1&temp=21",
            "d1/m1",
        );
        assert_eq!(m.source(), "/messages/modules/m1/outputs/out1");
        assert_eq!(m.properties(), [("temp".into(), "21".into())]);
        let system = m.system_properties();
        assert_eq!(property(system, "$contentType"), Some("application/json"));
        assert_eq!(property(system, "$connectionDeviceId"), Some("d1"));
        assert_eq!(property(system, "$connectionModuleId"), Some("m1"));
        assert_eq!(property(system, "$outputName"), Some("out1"));
    }

    #[test]
    fn unknown_system_keys_keep_their_name_with_a_dollar() {
        let m = published("devices/d1/messages/events/%24.custom=x", "d1");
        assert_eq!(property(m.system_properties(), "$custom"), Some("x"));
        assert!(m.properties().is_empty());
    }

    #[test]
    fn a_sender_cannot_claim_another_connection_identity() {
        let m = published(
            "devices/d1/messages/events/%24.connectionDeviceId=boss&%24.connectionModuleId=m9",
            "d1",
        );
        let system = m.system_properties();
        assert_eq!(property(system, "$connectionDeviceId"), Some("d1"));
        assert_eq!(property(system, "$connectionModuleId"), None);
    }

    #[test]
    fn the_upstream_topic_is_rebuilt_from_changed_properties() {
        let m = published("devices/d1/messages/events/%24.mid=7&a=1", "d1");
        assert_eq!(m.source(), "/messages/devices/d1");
        let mut headers = m.headers().clone();
        headers.properties.push(("alert".into(), "a b/c".into()));
        let changed = m.derived(m.topic.clone(), m.body.clone(), m.enqueued_ms, headers);
        assert_eq!(
            upstream_topic(&changed),
            "devices/d1/messages/events/$.mid=7&a=1&alert=a%20b%2Fc"
        );
    }

    #[test]
    fn plain_topics_keep_their_name_and_take_the_publisher_as_source() {
        let m = published("sensors/t1", "dev9/mod2");
        assert_eq!(m.source(), "/messages/devices/dev9");
        assert_eq!(
            m.system_properties(),
            [("$connectionDeviceId".into(), "dev9".into())]
        );
        assert!(m.properties().is_empty());
        assert_eq!(upstream_topic(&m), "sensors/t1");
    }

    #[test]
    fn module_inputs_carry_the_property_bag() {
        let m = published("devices/d1/messages/events/a=1", "d1");
        assert_eq!(
            module_input_topic("edge", "alerts", "in1", &m),
            "devices/edge/modules/alerts/inputs/in1/a=1"
        );
    }

    #[test]
    fn a_device_bound_message_expires_at_its_own_exp_and_a_bad_one_has_none() {
        let topic = "devices/d1/messages/devicebound/%24.mid=1&%24.exp=2026-11-29T12%3A00%3A00.5000000Z&k=v";
        assert_eq!(DeviceBound::expiry_ms(topic), Some(1_795_953_600_500));
        assert_eq!(
            DeviceBound::expiry_ms("devices/d1/messages/devicebound/k=v"),
            None
        );
        assert_eq!(
            DeviceBound::expiry_ms("devices/d1/messages/devicebound/%24.exp=soon"),
            None
        );
    }
}
