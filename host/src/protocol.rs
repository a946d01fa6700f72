//! The upstream protocol's topics and bodies, in one place: each edge's
//! device scope, identities' twins (the hub's own `$edgeHub` twin among
//! them) and direct methods. The hub uses them, and so does the cloud's
//! side (`edgehub cloud`); docs/upstream-protocol.md describes them.
//!
//! An identity is `{d}` (a child device) or `{edge}/{m}` (a module of this
//! edge); its topics are `devices/{d}/...` or `devices/{edge}/modules/{m}/...`.
//! Pure functions and serde types; no I/O.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The topic of an edge's device scope document (retained).
pub fn scope_topic(edge: &str) -> String {
    format!("edges/{edge}/scope")
}

/// The edge a scope topic names.
pub fn edge_of_scope(topic: &str) -> Option<&str> {
    topic
        .strip_prefix("edges/")?
        .strip_suffix("/scope")
        .filter(|e| !e.is_empty() && !e.contains('/'))
}

/// The identity of an edge's own hub twin, `{edge}/$edgeHub`.
pub fn hub_twin_identity(edge: &str) -> String {
    format!("{edge}/$edgeHub")
}

/// Whether `identity` is a hub's own twin (no identity of a scope has a
/// `$` in its name).
pub fn is_hub_twin(identity: &str) -> bool {
    identity.ends_with("/$edgeHub")
}

/// The topic root of an identity: `devices/{d}` or `devices/{edge}/modules/{m}`.
pub fn identity_root(identity: &str) -> String {
    match identity.split_once('/') {
        Some((device, module)) => format!("devices/{device}/modules/{module}"),
        None => format!("devices/{identity}"),
    }
}

/// Splits `devices/{d}/{rest}` or `devices/{d}/modules/{m}/{rest}` into the
/// identity and `rest`.
pub fn split_identity(topic: &str) -> Option<(String, &str)> {
    let rest = topic.strip_prefix("devices/")?;
    let (device, rest) = rest.split_once('/')?;
    if let Some(rest) = rest.strip_prefix("modules/") {
        let (module, rest) = rest.split_once('/')?;
        return Some((format!("{device}/{module}"), rest));
    }
    Some((device.to_string(), rest))
}

/// One topic (or filter) per identity, sorted: the subscriptions that
/// follow the device scope.
pub fn per_identity<S: AsRef<str>>(
    identities: impl IntoIterator<Item = S>,
    topic: impl Fn(&str) -> String,
) -> Vec<String> {
    let mut out: Vec<String> = identities
        .into_iter()
        .map(|id| topic(id.as_ref()))
        .collect();
    out.sort();
    out
}

/// `{root}/twin/{section}` (`desired` from the cloud, `reported` from the hub).
pub fn twin_topic(identity: &str, section: &str) -> String {
    format!("{}/twin/{section}", identity_root(identity))
}

/// A twin document's topic read back: whose twin, and which section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TwinTopic {
    Desired(String),
    Reported(String),
}

impl TwinTopic {
    pub fn parse(topic: &str) -> Option<Self> {
        match split_identity(topic)? {
            (id, "twin/desired") => Some(TwinTopic::Desired(id)),
            (id, "twin/reported") => Some(TwinTopic::Reported(id)),
            _ => None,
        }
    }

    pub fn identity(&self) -> &str {
        match self {
            TwinTopic::Desired(id) | TwinTopic::Reported(id) => id,
        }
    }
}

/// The filter of every method call to an identity: `{root}/methods/+/+`
/// (a method name and a request id; answers have three levels, so they do
/// not match).
pub fn method_calls_filter(identity: &str) -> String {
    format!("{}/methods/+/+", identity_root(identity))
}

/// A method call read from its topic `{root}/methods/{name}/{rid}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodCallTopic {
    pub identity: String,
    pub method: String,
    pub rid: String,
}

impl MethodCallTopic {
    pub fn parse(topic: &str) -> Option<Self> {
        let (identity, rest) = split_identity(topic)?;
        let rest = rest.strip_prefix("methods/")?;
        let (method, rid) = rest.split_once('/')?;
        let valid = |s: &str| !s.is_empty() && !s.contains('/');
        (valid(method) && valid(rid) && method != "res").then(|| MethodCallTopic {
            identity,
            method: method.to_string(),
            rid: rid.to_string(),
        })
    }

    /// Where the answer goes: `{root}/methods/res/{status}/{rid}`.
    pub fn answer_topic(&self, status: u16) -> String {
        format!(
            "{}/methods/res/{status}/{}",
            identity_root(&self.identity),
            self.rid
        )
    }
}

/// The body of a method call (as IoT Hub's service API and edgeHub's
/// local API take it; `methodName` is in the topic upstream, in the body
/// locally).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MethodRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method_name: Option<String>,
    #[serde(default)]
    pub payload: Value,
    #[serde(default = "default_response_timeout")]
    pub response_timeout_in_seconds: u64,
    #[serde(default)]
    pub connect_timeout_in_seconds: u64,
}

fn default_response_timeout() -> u64 {
    30
}

impl MethodRequest {
    /// The timeouts within IoT Hub's bounds: response 5 to 300 s, connect
    /// 0 to 300 s.
    pub fn check(&self) -> Result<(), String> {
        if !(5..=300).contains(&self.response_timeout_in_seconds) {
            Err("responseTimeoutInSeconds must be 5 to 300".into())
        } else if self.connect_timeout_in_seconds > 300 {
            Err("connectTimeoutInSeconds must be 0 to 300".into())
        } else {
            Ok(())
        }
    }

    pub fn response_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.response_timeout_in_seconds)
    }

    pub fn connect_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.connect_timeout_in_seconds)
    }
}

/// The answer to a method call: the device's status and payload, or the
/// hub's (404 not connected, 504 timed out, 400 bad request).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodResponse {
    pub status: u16,
    pub payload: Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_topics_name_their_edge_and_the_hub_twin_is_a_module_of_it() {
        assert_eq!(edge_of_scope(&scope_topic("e1")), Some("e1"));
        assert_eq!(edge_of_scope("edges/a/b/scope"), None);
        assert_eq!(edge_of_scope("edges//scope"), None);
        assert_eq!(
            twin_topic(&hub_twin_identity("e1"), "desired"),
            "devices/e1/modules/$edgeHub/twin/desired"
        );
    }

    #[test]
    fn identity_topics_are_built_and_read_back() {
        assert_eq!(twin_topic("d1", "desired"), "devices/d1/twin/desired");
        assert_eq!(
            twin_topic("edge/m1", "reported"),
            "devices/edge/modules/m1/twin/reported"
        );
        assert_eq!(
            TwinTopic::parse("devices/d1/twin/desired"),
            Some(TwinTopic::Desired("d1".into()))
        );
        assert_eq!(
            TwinTopic::parse("devices/edge/modules/m1/twin/reported"),
            Some(TwinTopic::Reported("edge/m1".into()))
        );
        for t in [
            "devices/d1/twin/other",
            "devices/a/b/twin/desired",
            "edges/e/scope",
        ] {
            assert_eq!(TwinTopic::parse(t), None, "{t}");
        }
    }

    #[test]
    fn method_calls_parse_and_answers_never_look_like_calls() {
        let c = MethodCallTopic::parse("devices/edge/modules/m1/methods/reboot/42").unwrap();
        assert_eq!(
            (c.identity.as_str(), c.method.as_str(), c.rid.as_str()),
            ("edge/m1", "reboot", "42")
        );
        assert_eq!(
            c.answer_topic(200),
            "devices/edge/modules/m1/methods/res/200/42"
        );
        assert_eq!(method_calls_filter("d1"), "devices/d1/methods/+/+");
        for t in [
            "devices/d1/methods/res/200/42",
            "devices/d1/methods/reboot",
            "devices/d1/methods/res/7",
            "devices/d1/twin/desired",
        ] {
            assert_eq!(MethodCallTopic::parse(t), None, "{t}");
        }
    }

    #[test]
    fn a_method_request_body_has_the_service_api_defaults() {
        let r: MethodRequest = serde_json::from_str(r#"{"payload":{"a":1}}"#).unwrap();
        assert_eq!(r.response_timeout_in_seconds, 30);
        assert_eq!(r.connect_timeout_in_seconds, 0);
        assert!(serde_json::from_str::<MethodRequest>(r#"{"bogus":1}"#).is_err());
    }
}
