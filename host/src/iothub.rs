//! A connection's own `$iothub/...` topics, as the IoT Hub device SDKs use
//! them: the requests a client may send (twin GET, reported patch, method
//! response) and the topics the hub answers on (twin responses, desired
//! patches, method calls).
//!
//! Pure parsing and formatting, shared by `auth::authz` (what a client may
//! subscribe to), the sessions (which hand each [`Request`] to the service
//! that answers it) and the services that answer. Nothing on `$iothub/...`
//! is ever routed between clients: an answer goes back to the one
//! connection that asked. (Telemetry topics are `message::dialect`'s.)

/// The root every `$iothub` topic starts with.
pub const ROOT: &str = "$iothub/";

/// The subscriptions through which a client receives what the hub sends it
/// on `$iothub/...`; nothing else under `$iothub/` can be subscribed to.
pub const ANSWER_ROOTS: [&str; 3] = [
    "$iothub/twin/res",
    "$iothub/twin/PATCH/properties/desired",
    "$iothub/methods/POST",
];

/// The longest request id echoed back.
const MAX_RID: usize = 128;

/// What a client asks on `$iothub/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `$iothub/twin/GET/?$rid={rid}`: the whole twin.
    TwinGet { rid: String },
    /// `$iothub/twin/PATCH/properties/reported/?$rid={rid}`: a reported
    /// patch in the body.
    ReportedPatch { rid: String },
    /// `$iothub/methods/res/{status}/?$rid={rid}`: the answer to a method
    /// call the hub delivered, with its body.
    MethodResponse { status: u16, rid: String },
}

/// Why a `$iothub` topic is not a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotARequest {
    #[error("{0:?} is a topic the hub sends, never a client")]
    HubTopic(String),
    #[error("{0:?} is not an IoT Hub request topic")]
    Unknown(String),
    #[error("{0:?} has no usable $rid (1 to 128 characters, no '/', '+', '#' or '&')")]
    BadRid(String),
    #[error("{0:?} has no status code between 100 and 999")]
    BadStatus(String),
}

impl Request {
    /// Parses a topic under [`ROOT`].
    pub fn parse(topic: &str) -> Result<Request, NotARequest> {
        let rest = topic
            .strip_prefix(ROOT)
            .ok_or_else(|| NotARequest::Unknown(topic.into()))?;
        if ANSWER_ROOTS
            .iter()
            .any(|r| topic == *r || topic.starts_with(&format!("{r}/")))
        {
            return Err(NotARequest::HubTopic(topic.into()));
        }
        let (path, query) = rest.split_once("/?").unwrap_or((rest, ""));
        let rid = || rid_of(query).ok_or_else(|| NotARequest::BadRid(topic.into()));
        match path.split('/').collect::<Vec<_>>()[..] {
            ["twin", "GET"] => Ok(Request::TwinGet { rid: rid()? }),
            ["twin", "PATCH", "properties", "reported"] => {
                Ok(Request::ReportedPatch { rid: rid()? })
            }
            ["methods", "res", status] => {
                let status = status
                    .parse::<u16>()
                    .ok()
                    .filter(|s| (100..1000).contains(s))
                    .ok_or_else(|| NotARequest::BadStatus(topic.into()))?;
                Ok(Request::MethodResponse {
                    status,
                    rid: rid()?,
                })
            }
            _ => Err(NotARequest::Unknown(topic.into())),
        }
    }
}

/// The `$rid` of a query string (`$rid=5&...`), if it is one the hub can
/// echo in a topic.
fn rid_of(query: &str) -> Option<String> {
    let rid = query.split('&').find_map(|kv| kv.strip_prefix("$rid="))?;
    let usable =
        !rid.is_empty() && rid.len() <= MAX_RID && !rid.contains(['/', '+', '#', '\0', '&']);
    usable.then(|| rid.to_string())
}

/// `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]`.
pub fn twin_response(status: u16, rid: &str, version: Option<u64>) -> String {
    match version {
        Some(v) => format!("$iothub/twin/res/{status}/?$rid={rid}&$version={v}"),
        None => format!("$iothub/twin/res/{status}/?$rid={rid}"),
    }
}

/// `$iothub/twin/PATCH/properties/desired/?$version={v}`.
pub fn desired_patch(version: u64) -> String {
    format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
}

/// `$iothub/methods/POST/{name}/?$rid={rid}`.
pub fn method_call(name: &str, rid: &str) -> String {
    format!("$iothub/methods/POST/{name}/?$rid={rid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdk_requests_parse_with_their_request_ids() {
        assert_eq!(
            Request::parse("$iothub/twin/GET/?$rid=0d0b0c1e-2a"),
            Ok(Request::TwinGet {
                rid: "0d0b0c1e-2a".into()
            })
        );
        assert_eq!(
            Request::parse("$iothub/twin/PATCH/properties/reported/?$rid=7"),
            Ok(Request::ReportedPatch { rid: "7".into() })
        );
        assert_eq!(
            Request::parse("$iothub/methods/res/200/?$rid=12"),
            Ok(Request::MethodResponse {
                status: 200,
                rid: "12".into()
            })
        );
        assert_eq!(
            Request::parse("$iothub/twin/PATCH/properties/reported/?$version=3&$rid=x"),
            Ok(Request::ReportedPatch { rid: "x".into() })
        );
    }

    #[test]
    fn topics_the_hub_sends_are_never_requests() {
        for t in [
            "$iothub/twin/res/200/?$rid=1",
            "$iothub/twin/PATCH/properties/desired/?$version=9",
            "$iothub/methods/POST/reboot/?$rid=7",
            "$iothub/twin/res",
        ] {
            assert!(
                matches!(Request::parse(t), Err(NotARequest::HubTopic(_))),
                "{t}"
            );
        }
    }

    #[test]
    fn unknown_topics_bad_request_ids_and_bad_statuses_are_named() {
        for t in [
            "$iothub/twin/GET",
            "$iothub/twin/GET/?rid=1",
            "$iothub/twin/GET/?$rid=",
            "$iothub/twin/GET/?$rid=a/b",
        ] {
            assert!(
                matches!(Request::parse(t), Err(NotARequest::BadRid(_))),
                "{t}"
            );
        }
        let long = format!("$iothub/twin/GET/?$rid={}", "r".repeat(129));
        assert!(matches!(Request::parse(&long), Err(NotARequest::BadRid(_))));
        for t in [
            "$iothub/twin/DELETE/?$rid=1",
            "$iothub/other",
            "$iothub/twin/PATCH/properties/reported/extra/?$rid=1",
        ] {
            assert!(
                matches!(Request::parse(t), Err(NotARequest::Unknown(_))),
                "{t}"
            );
        }
        for t in [
            "$iothub/methods/res/abc/?$rid=1",
            "$iothub/methods/res/99/?$rid=1",
        ] {
            assert!(
                matches!(Request::parse(t), Err(NotARequest::BadStatus(_))),
                "{t}"
            );
        }
    }

    #[test]
    fn answer_topics_are_built_as_the_sdks_parse_them() {
        assert_eq!(
            twin_response(200, "5", None),
            "$iothub/twin/res/200/?$rid=5"
        );
        assert_eq!(
            twin_response(204, "5", Some(3)),
            "$iothub/twin/res/204/?$rid=5&$version=3"
        );
        assert_eq!(
            desired_patch(4),
            "$iothub/twin/PATCH/properties/desired/?$version=4"
        );
        assert_eq!(
            method_call("reboot", "9"),
            "$iothub/methods/POST/reboot/?$rid=9"
        );
    }
}
