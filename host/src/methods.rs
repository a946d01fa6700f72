//! Direct methods: a call to a connected device or module, answered by it
//! within a timeout, whoever calls (the cloud, through the upstream).
//!
//! Owns the calls in flight. Each call gets a request id of its own and is
//! delivered on the target's `$iothub/methods/POST/{name}/?$rid={id}`, to
//! that identity's connection only and only if it subscribed there; the
//! target's session hands the answer back ([`Methods::answer`]), which is
//! taken only from the identity called. Not connected (within the call's
//! connect timeout): 404; no answer within its response timeout: 504; a bad
//! call: 400; each with a JSON body. It does not know who calls nor how an
//! answer travels back to the caller.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::broker::{BrokerHandle, Delivery};
use crate::iothub;

/// The longest method name.
pub const MAX_NAME: usize = 100;
/// The largest payload of a call or an answer, in bytes of JSON.
pub const MAX_PAYLOAD: usize = 128 * 1024;
/// How often a call waiting for its target to connect tries again.
const CONNECT_RETRY: Duration = Duration::from_millis(200);

/// A call's outcome: the target's status and payload, or the hub's.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: u16,
    pub payload: Value,
    /// Whether the identity called answered (else the hub did: 400, 404,
    /// 504).
    pub answered: bool,
}

impl Outcome {
    /// An answer of the hub's own, `{"message": ...}`.
    pub fn hub(status: u16, message: String) -> Self {
        Outcome {
            status,
            payload: json!({ "message": message }),
            answered: false,
        }
    }
}

struct Call {
    identity: String,
    reply: oneshot::Sender<(u16, Bytes)>,
}

pub struct Methods {
    broker: BrokerHandle,
    /// Calls waiting for an answer, by request id.
    calls: Mutex<HashMap<String, Call>>,
    next_rid: AtomicU64,
}

impl Methods {
    pub fn new(broker: BrokerHandle) -> Self {
        Methods {
            broker,
            calls: Mutex::new(HashMap::new()),
            next_rid: AtomicU64::new(1),
        }
    }

    /// Calls `method` on `identity` and waits for its answer.
    pub async fn invoke(
        &self,
        identity: &str,
        method: &str,
        payload: &Value,
        response_timeout: Duration,
        connect_timeout: Duration,
    ) -> Outcome {
        if let Err(why) = check_name(method) {
            return Outcome::hub(400, why);
        }
        let body = payload.to_string();
        if body.len() > MAX_PAYLOAD {
            return Outcome::hub(
                400,
                format!(
                    "the payload is {} bytes, over the limit of {MAX_PAYLOAD}",
                    body.len()
                ),
            );
        }
        let rid = self.next_rid.fetch_add(1, Ordering::Relaxed).to_string();
        let (reply, answer) = oneshot::channel();
        let call = Call {
            identity: identity.to_string(),
            reply,
        };
        self.calls.lock().unwrap().insert(rid.clone(), call);
        let outcome = self
            .deliver_and_wait(
                identity,
                method,
                &rid,
                Bytes::from(body),
                answer,
                response_timeout,
                connect_timeout,
            )
            .await;
        self.calls.lock().unwrap().remove(&rid);
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    async fn deliver_and_wait(
        &self,
        identity: &str,
        method: &str,
        rid: &str,
        body: Bytes,
        answer: oneshot::Receiver<(u16, Bytes)>,
        response_timeout: Duration,
        connect_timeout: Duration,
    ) -> Outcome {
        let connect_by = Instant::now() + connect_timeout;
        loop {
            // QoS 0, as IoT Hub sends calls: a session away does not keep
            // a call for later.
            let call = Delivery {
                topic: iothub::method_call(method, rid),
                payload: body.clone(),
                qos: 0,
                retain: false,
                dup: false,
                receipt: None,
            };
            if self.broker.send_to(identity, call).await {
                break;
            }
            if Instant::now() >= connect_by {
                return Outcome::hub(
                    404,
                    format!("{identity} is not connected or not subscribed to method calls"),
                );
            }
            tokio::time::sleep(CONNECT_RETRY.min(connect_by - Instant::now())).await;
        }
        match tokio::time::timeout(response_timeout, answer).await {
            Ok(Ok((status, body))) => Outcome {
                status,
                payload: answer_payload(&body),
                answered: true,
            },
            _ => Outcome::hub(
                504,
                format!(
                    "{identity} did not answer {method:?} within {} s",
                    response_timeout.as_secs()
                ),
            ),
        }
    }

    /// Hands an answer from `identity` to the call `rid`. False when no
    /// call of that id to that identity is waiting (never made, already
    /// answered or timed out, or made to someone else).
    pub fn answer(&self, identity: &str, rid: &str, status: u16, body: Bytes) -> bool {
        let mut calls = self.calls.lock().unwrap();
        match calls.get(rid) {
            Some(c) if c.identity == identity => {
                let call = calls.remove(rid).expect("present");
                call.reply.send((status, body)).is_ok()
            }
            _ => false,
        }
    }
}

/// A method name IoT Hub takes: 1 to 100 characters, no `/`, `+`, `#`,
/// `?`, NUL or whitespace (it is a topic level of the call).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.chars().count() > MAX_NAME {
        return Err(format!(
            "the method name must be 1 to {MAX_NAME} characters"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#' | '?' | '\0') || c.is_whitespace())
    {
        return Err(format!("the method name {name:?} contains {c:?}"));
    }
    Ok(())
}

/// An answer's body as JSON: parsed when it is JSON, else the text as a
/// JSON string (an empty body is `null`).
fn answer_payload(body: &[u8]) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    async fn connected(broker: &BrokerHandle, id: &str) -> crate::broker::Outbox {
        crate::broker::subscribed_client(broker, id, 1, &[("$iothub/methods/POST/#", 0)]).await
    }

    #[tokio::test]
    async fn a_call_reaches_its_target_and_only_the_target_s_answer_completes_it() {
        let (broker, _task) = crate::broker::spawn(16, Arc::default());
        let methods = Arc::new(Methods::new(broker.clone()));
        let mut d1 = connected(&broker, "d1").await;
        let m = methods.clone();
        let call = tokio::spawn(async move {
            m.invoke(
                "d1",
                "reboot",
                &json!({"delay": 5}),
                Duration::from_secs(10),
                Duration::ZERO,
            )
            .await
        });
        let got = d1.recv().await.unwrap();
        assert!(got.topic.starts_with("$iothub/methods/POST/reboot/?$rid="));
        assert_eq!(&got.payload[..], br#"{"delay":5}"#);
        let rid = got.topic.rsplit("$rid=").next().unwrap().to_string();
        assert!(
            !methods.answer("d2", &rid, 200, Bytes::from_static(b"{}")),
            "not d2's call"
        );
        assert!(
            !methods.answer("d1", "999", 200, Bytes::new()),
            "no such call"
        );
        assert!(methods.answer("d1", &rid, 201, Bytes::from_static(br#"{"ok":true}"#)));
        let outcome = call.await.unwrap();
        assert_eq!(
            outcome,
            Outcome {
                status: 201,
                payload: json!({"ok": true}),
                answered: true
            }
        );
        assert!(
            !methods.answer("d1", &rid, 200, Bytes::new()),
            "answered once"
        );
    }

    #[tokio::test]
    async fn a_target_away_is_404_a_silent_one_504_and_a_bad_call_400() {
        let (broker, _task) = crate::broker::spawn(16, Arc::default());
        let methods = Methods::new(broker.clone());
        let away = methods
            .invoke(
                "d9",
                "m",
                &Value::Null,
                Duration::from_secs(5),
                Duration::ZERO,
            )
            .await;
        assert_eq!((away.status, away.answered), (404, false));
        let _d1 = connected(&broker, "d1").await;
        let silent = methods
            .invoke(
                "d1",
                "m",
                &Value::Null,
                Duration::from_millis(50),
                Duration::ZERO,
            )
            .await;
        assert_eq!(silent.status, 504);
        assert!(
            methods.calls.lock().unwrap().is_empty(),
            "no call left behind"
        );
        for name in ["", "a/b", "a b", &"x".repeat(101)] {
            let bad = methods
                .invoke(
                    "d1",
                    name,
                    &Value::Null,
                    Duration::from_secs(5),
                    Duration::ZERO,
                )
                .await;
            assert_eq!(bad.status, 400, "{name:?}");
        }
        let big = Value::String("x".repeat(MAX_PAYLOAD));
        let bad = methods
            .invoke("d1", "m", &big, Duration::from_secs(5), Duration::ZERO)
            .await;
        assert_eq!(bad.status, 400);
    }

    #[tokio::test]
    async fn a_call_waits_up_to_its_connect_timeout_for_the_target() {
        let (broker, _task) = crate::broker::spawn(16, Arc::default());
        let methods = Arc::new(Methods::new(broker.clone()));
        let m = methods.clone();
        let call = tokio::spawn(async move {
            m.invoke(
                "d1",
                "m",
                &Value::Null,
                Duration::from_secs(10),
                Duration::from_secs(10),
            )
            .await
        });
        let mut d1 = connected(&broker, "d1").await;
        let got = d1.recv().await.unwrap();
        let rid = got.topic.rsplit("$rid=").next().unwrap().to_string();
        assert!(methods.answer("d1", &rid, 200, Bytes::from_static(b"not json")));
        assert_eq!(
            call.await.unwrap(),
            Outcome {
                status: 200,
                payload: json!("not json"),
                answered: true
            }
        );
    }
}
