//! What an authenticated client may publish and subscribe to.
//!
//! A device (or module) may use only its own IoT Hub topics, its own
//! corner of [`LOCAL`] (every identity of the scope reads all of it, so
//! children talk to each other offline out of the box), plus the plain
//! topics the config grants it; an anonymous client (allowed by config once
//! a scope exists) only plain topics; before any scope exists everything is
//! open, except `$iothub/...`.
//!
//! `$iothub/...` belongs to each connection: no client may publish there
//! (its requests are answered by the hub, see [`crate::iothub`], never
//! routed), leave a will there, or subscribe to anything there but the
//! roots the hub answers on. A grant never opens an identity's topics.

use super::Principal;
use crate::iothub;
use crate::topic;

/// The plain topics identities share: each publishes under
/// `local/{device}/...` (a module: `local/{edge}/{module}/...`) and may
/// subscribe to anything under `local/`.
pub const LOCAL: &str = "local";

/// Topics under these roots belong to identities, never to anonymous clients.
const IDENTITY_ROOTS: [&str; 2] = ["devices/", iothub::ROOT];

/// Whether a client may publish (or leave a will) on `name`. `$iothub/...`
/// requests are not publishes: the session answers them before asking.
pub fn may_publish(p: &Principal, edge_id: &str, name: &str) -> bool {
    if name.starts_with(iothub::ROOT) {
        return false;
    }
    match p {
        Principal::Open => true,
        Principal::Anonymous => !in_identity_root(name),
        Principal::Identity(id, grant) => {
            let (own, local) = match &id.module_id {
                None => (
                    format!("devices/{}/messages/events", id.device_id),
                    format!("{LOCAL}/{}", id.device_id),
                ),
                Some(m) => (
                    format!("devices/{edge_id}/modules/{m}/messages/events"),
                    format!("{LOCAL}/{edge_id}/{m}"),
                ),
            };
            under(name, &own)
                || under(name, &local)
                || (!in_identity_root(name) && granted(&grant.publish, name))
        }
    }
}

/// Whether `name` is one of the identities' topics.
fn in_identity_root(name: &str) -> bool {
    IDENTITY_ROOTS.iter().any(|r| name.starts_with(r))
}

/// Whether a filter could match one of the identities' topics (a leading
/// wildcard, or an identity root).
fn reaches_identity_roots(filter: &str) -> bool {
    filter.starts_with('+') || filter.starts_with('#') || in_identity_root(filter)
}

/// Whether `filter` lies under a root the hub answers a connection on.
fn answer_filter(filter: &str) -> bool {
    iothub::ANSWER_ROOTS.iter().any(|r| under(filter, r))
}

pub fn may_subscribe(p: &Principal, edge_id: &str, filter: &str) -> bool {
    if filter.starts_with(iothub::ROOT) {
        // Only the answers to this connection: the hub sends nothing else
        // there, and no client can publish there.
        return !matches!(p, Principal::Anonymous) && answer_filter(filter);
    }
    match p {
        Principal::Open => true,
        Principal::Anonymous => !reaches_identity_roots(filter),
        Principal::Identity(id, grant) => {
            let own = match &id.module_id {
                None => format!("devices/{}/messages/devicebound", id.device_id),
                Some(m) => format!("devices/{edge_id}/modules/{m}/inputs"),
            };
            under(filter, &own)
                || under(filter, LOCAL)
                || (!reaches_identity_roots(filter) && grant.subscribe.iter().any(|g| g == filter))
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
    fn identities_write_only_their_own_local_corner_and_read_all_of_local() {
        let (d1, m1) = (device("d1"), module("m1"));
        assert!(may_publish(&d1, "edge", "local/d1/temp"));
        assert!(may_publish(&d1, "edge", "local/d1"));
        assert!(!may_publish(&d1, "edge", "local/d2/temp"));
        assert!(!may_publish(&d1, "edge", "local/d10/temp"));
        assert!(!may_publish(&d1, "edge", "local/alarm"));
        assert!(may_publish(&m1, "edge", "local/edge/m1/state"));
        assert!(!may_publish(&m1, "edge", "local/edge/m2/state"));
        for p in [&d1, &m1] {
            assert!(may_subscribe(p, "edge", "local/#"));
            assert!(may_subscribe(p, "edge", "local/+/temp"));
            assert!(!may_subscribe(p, "edge", "+/d1/temp"));
            assert!(!may_subscribe(p, "edge", "localx/#"));
        }
    }

    #[test]
    fn a_device_publishes_only_its_own_telemetry() {
        let d1 = device("d1");
        assert!(may_publish(&d1, "edge", "devices/d1/messages/events/a=b"));
        assert!(may_publish(&d1, "edge", "devices/d1/messages/events"));
        assert!(
            !may_publish(
                &d1,
                "edge",
                "$iothub/twin/PATCH/properties/reported/?$rid=1"
            ),
            "requests are answered, never published"
        );
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
            "$iothub/+/res/#",
            "$iothub/twin/GET/#",
            "sensors/#",
        ] {
            assert!(!may_subscribe(&d1, "edge", no), "{no}");
        }
    }

    #[test]
    fn nobody_publishes_or_leaves_a_will_on_iothub_and_grants_never_open_identity_topics() {
        let wide = Principal::Identity(
            Identity {
                device_id: "d1".into(),
                module_id: None,
            },
            Grant {
                publish: vec!["#".into()],
                subscribe: vec!["#".into(), "+/#".into(), "devices/#".into()],
            },
        );
        for p in [
            &Principal::Open,
            &Principal::Anonymous,
            &device("d1"),
            &wide,
        ] {
            for t in [
                "$iothub/twin/res/200/?$rid=1",
                "$iothub/twin/PATCH/properties/desired/?$version=9",
                "$iothub/methods/POST/reboot/?$rid=7",
            ] {
                assert!(!may_publish(p, "edge", t), "{p:?} {t}");
            }
        }
        assert!(may_publish(&wide, "edge", "sensors/x"));
        for t in [
            "devices/d2/messages/devicebound/x=1",
            "devices/d2/messages/events/",
            "devices/edge/modules/m1/inputs/i1/",
        ] {
            assert!(!may_publish(&wide, "edge", t), "{t}");
        }
        for f in ["#", "+/#", "devices/#"] {
            assert!(!may_subscribe(&wide, "edge", f), "{f}");
        }
        assert!(!may_subscribe(&Principal::Open, "edge", "$iothub/#"));
        assert!(may_subscribe(
            &Principal::Open,
            "edge",
            "$iothub/twin/res/#"
        ));
        assert!(!may_subscribe(
            &Principal::Anonymous,
            "edge",
            "$iothub/twin/res/#"
        ));
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
