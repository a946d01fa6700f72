//! What an authenticated client may publish and subscribe to.
//!
//! A device (or module) may use only its own IoT Hub topics, plus the plain
//! topics the config grants it; an anonymous client (allowed by config once
//! a scope exists) only plain topics; before any scope exists everything is
//! open.

use super::Principal;
use crate::topic;

/// Topics under these roots belong to identities, never to anonymous clients.
const IDENTITY_ROOTS: [&str; 2] = ["devices/", "$iothub/"];

pub fn may_publish(p: &Principal, edge_id: &str, name: &str) -> bool {
    match p {
        Principal::Open => true,
        Principal::Anonymous => !IDENTITY_ROOTS.iter().any(|r| name.starts_with(r)),
        Principal::Identity(id, grant) => {
            let own = match &id.module_id {
                None => format!("devices/{}/messages/events", id.device_id),
                Some(m) => format!("devices/{edge_id}/modules/{m}/messages/events"),
            };
            under(name, &own)
                || name.starts_with("$iothub/twin/")
                || name.starts_with("$iothub/methods/res/")
                || granted(&grant.publish, name)
        }
    }
}

pub fn may_subscribe(p: &Principal, edge_id: &str, filter: &str) -> bool {
    match p {
        Principal::Open => true,
        // A leading wildcard could match identities' topics.
        Principal::Anonymous => {
            !(filter.starts_with('+')
                || filter.starts_with('#')
                || IDENTITY_ROOTS.iter().any(|r| filter.starts_with(r)))
        }
        Principal::Identity(id, grant) => {
            let own = match &id.module_id {
                None => format!("devices/{}/messages/devicebound", id.device_id),
                Some(m) => format!("devices/{edge_id}/modules/{m}/inputs"),
            };
            under(filter, &own)
                || under(filter, "$iothub/twin/res")
                || under(filter, "$iothub/twin/PATCH/properties/desired")
                || under(filter, "$iothub/methods/POST")
                || grant.subscribe.iter().any(|g| g == filter)
        }
    }
}

/// `name` is `root` or below it (a filter below it can only match below it).
fn under(name: &str, root: &str) -> bool {
    name == root
        || name
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn granted(filters: &[String], name: &str) -> bool {
    filters.iter().any(|f| topic::matches(f, name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Grant, Identity};

    fn device(d: &str) -> Principal {
        Principal::Identity(
            Identity {
                device_id: d.into(),
                module_id: None,
            },
            Grant::default(),
        )
    }

    fn module(m: &str) -> Principal {
        Principal::Identity(
            Identity {
                device_id: "edge".into(),
                module_id: Some(m.into()),
            },
            Grant::default(),
        )
    }

    #[test]
    fn a_device_publishes_only_its_own_telemetry() {
        let d1 = device("d1");
        assert!(may_publish(&d1, "edge", "devices/d1/messages/events/a=b"));
        assert!(may_publish(&d1, "edge", "devices/d1/messages/events"));
        assert!(may_publish(
            &d1,
            "edge",
            "$iothub/twin/PATCH/properties/reported/?$rid=1"
        ));
        assert!(!may_publish(&d1, "edge", "devices/d2/messages/events/"));
        assert!(!may_publish(&d1, "edge", "devices/d1/messages/eventsX"));
        assert!(!may_publish(
            &d1,
            "edge",
            "devices/d1/messages/devicebound/"
        ));
        assert!(!may_publish(&d1, "edge", "sensors/t"));
        assert!(!may_publish(
            &d1,
            "edge",
            "devices/edge/modules/m1/messages/events/"
        ));
    }

    #[test]
    fn a_module_uses_its_own_outputs_and_inputs() {
        let m1 = module("m1");
        assert!(may_publish(
            &m1,
            "edge",
            "devices/edge/modules/m1/messages/events/%24.on=out1"
        ));
        assert!(!may_publish(
            &m1,
            "edge",
            "devices/edge/modules/m2/messages/events/"
        ));
        assert!(may_subscribe(
            &m1,
            "edge",
            "devices/edge/modules/m1/inputs/#"
        ));
        assert!(!may_subscribe(
            &m1,
            "edge",
            "devices/edge/modules/m2/inputs/#"
        ));
        assert!(!may_subscribe(
            &m1,
            "edge",
            "devices/edge/modules/+/inputs/#"
        ));
    }

    #[test]
    fn a_device_subscribes_only_to_its_own_topics() {
        let d1 = device("d1");
        for ok in [
            "devices/d1/messages/devicebound/#",
            "$iothub/twin/res/#",
            "$iothub/methods/POST/#",
            "$iothub/twin/PATCH/properties/desired/#",
        ] {
            assert!(may_subscribe(&d1, "edge", ok), "{ok}");
        }
        for no in [
            "#",
            "+/#",
            "devices/+/messages/devicebound/#",
            "devices/d2/messages/devicebound/#",
            "devices/#",
            "$iothub/#",
            "sensors/#",
        ] {
            assert!(!may_subscribe(&d1, "edge", no), "{no}");
        }
    }

    #[test]
    fn grants_open_plain_topics_and_anonymous_clients_get_only_plain_topics() {
        let g = Principal::Identity(
            Identity {
                device_id: "d1".into(),
                module_id: None,
            },
            Grant {
                publish: vec!["sensors/d1/#".into()],
                subscribe: vec!["alerts/#".into()],
            },
        );
        assert!(may_publish(&g, "edge", "sensors/d1/t"));
        assert!(!may_publish(&g, "edge", "sensors/d2/t"));
        assert!(may_subscribe(&g, "edge", "alerts/#"));
        let a = Principal::Anonymous;
        assert!(may_publish(&a, "edge", "sensors/x"));
        assert!(!may_publish(&a, "edge", "devices/d1/messages/events/"));
        assert!(!may_subscribe(&a, "edge", "#"));
        assert!(may_subscribe(&a, "edge", "sensors/#"));
    }
}
