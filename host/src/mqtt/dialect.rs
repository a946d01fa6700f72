//! The IoT Hub device topic dialect: which topics are telemetry, and their
//! URL-encoded property bags.
//!
//! Owns parsing only; what happens to telemetry is the router's business.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
