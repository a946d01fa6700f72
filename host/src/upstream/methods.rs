//! Direct method calls from the cloud to the identities of the scope.
//!
//! Owns the link consumer for calls (`{identity}/methods/{name}/{rid}`, one
//! filter per identity of the scope), checking each call's body, running
//! it through `methods` (at most [`MAX_CALLS`] at once) and publishing the
//! answer on `{identity}/methods/res/{status}/{rid}` (QoS 1, sent again
//! after a reconnect for as long as the caller waits). A call is
//! acknowledged to the cloud once it is taken: its answer is the answer.
//! It does not deliver calls to connections (`methods` does).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::link::{CloudMessage, Link, LinkHandle};
use super::reliable::{Delivered, Reliable};
use super::scoped::ScopedConsumer;
use crate::auth::{Auth, Scope};
use crate::methods::{Methods, Outcome};
use crate::metrics::Metrics;
use crate::protocol::{
    method_calls_filter, per_identity, MethodCallTopic, MethodRequest, MethodResponse,
};

/// Calls in flight at once; beyond, a call is answered 429 at once.
pub const MAX_CALLS: usize = 64;

/// How long the hub's own answer to a call it could not take (400, 429)
/// is kept for the caller: IoT Hub's default response timeout.
const HUB_ANSWER_WAIT: Duration = Duration::from_secs(30);

/// An answer is kept this long past the call's own timeouts: the hub's
/// 504 comes exactly when the response timeout ends, and a caller waits a
/// little longer than that for it.
const ANSWER_GRACE: Duration = Duration::from_secs(10);

pub struct MethodSync(ScopedConsumer);

impl MethodSync {
    /// Registers the calls consumer on `link` (before it starts).
    pub fn subscribe(link: &mut Link) -> Self {
        Self(ScopedConsumer::register(link))
    }

    /// Runs until `shutdown`; calls still waiting then are abandoned.
    pub async fn run(
        mut self,
        link: LinkHandle,
        auth: Arc<Auth>,
        methods: Arc<Methods>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut scoped = self.0.follow(link.clone(), &auth, filters).await;
        let slots = Arc::new(Semaphore::new(MAX_CALLS));
        let mut running = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = scoped.changed() => {
                    if !changed {
                        break;
                    }
                    scoped.apply().await;
                }
                Some(_) = running.join_next(), if !running.is_empty() => {}
                Some(msg) = self.0.messages.recv() => {
                    let taken = Instant::now();
                    let checked = check(&msg, scoped.scope(), &metrics);
                    msg.ack();
                    // The hub's own answers are sent from the tasks too:
                    // an answer waits for the cloud, this loop does not.
                    let (call, request) = match checked {
                        Ok(call) => call,
                        Err(Some((call, bad))) => {
                            running.spawn(answer(link.clone(), call, bad, taken + HUB_ANSWER_WAIT));
                            continue;
                        }
                        Err(None) => continue,
                    };
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        metrics.cloud_refused("method", "busy");
                        let busy = Outcome::hub(429, format!("{MAX_CALLS} method calls are already in flight"));
                        running.spawn(answer(link.clone(), call, busy, taken + HUB_ANSWER_WAIT));
                        continue;
                    };
                    let (link, methods) = (link.clone(), methods.clone());
                    // The caller waits about this long from its call (the
                    // hub cannot see when it was made): its answer is kept
                    // until then.
                    let until = taken + request.connect_timeout() + request.response_timeout() + ANSWER_GRACE;
                    running.spawn(async move {
                        let outcome = methods
                            .invoke(
                                &call.identity,
                                &call.method,
                                &request.payload,
                                request.response_timeout(),
                                request.connect_timeout(),
                            )
                            .await;
                        drop(slot);
                        answer(link, call, outcome, until).await;
                    });
                }
            }
        }
        running.shutdown().await;
    }
}

fn filters(scope: &Scope) -> Vec<String> {
    per_identity(scope.identities.keys(), method_calls_filter)
}

/// A call to take, a bad one to answer (400) or, when it is not for this
/// scope, `Err(None)`: ignored.
type Checked = Result<(MethodCallTopic, MethodRequest), Option<(MethodCallTopic, Outcome)>>;

/// The call a cloud message carries, checked.
fn check(msg: &CloudMessage, scope: Option<&Scope>, metrics: &Metrics) -> Checked {
    let Some(call) = MethodCallTopic::parse(&msg.topic) else {
        tracing::warn!(topic = %msg.topic, "not a method call topic; ignored");
        metrics.cloud_refused("method", "not_for_the_hub");
        return Err(None);
    };
    if scope.is_none_or(|s| s.get(&call.identity).is_none()) {
        tracing::warn!(topic = %msg.topic, "a method call for an identity outside the device scope; ignored");
        metrics.cloud_refused("method", "outside_scope");
        return Err(None);
    }
    let request = serde_json::from_slice::<MethodRequest>(&msg.payload)
        .map_err(|e| format!("the call's body is not a method request: {e}"))
        .and_then(|r| r.check().map(|()| r));
    match request {
        Ok(r) => Ok((call, r)),
        Err(why) => {
            tracing::warn!(topic = %msg.topic, reason = %why, "method call refused");
            metrics.cloud_refused("method", "invalid");
            Err(Some((call, Outcome::hub(400, why))))
        }
    }
}

/// Publishes the answer to `call`, at QoS 1 until the cloud has it or
/// `until`, when its caller has stopped waiting.
async fn answer(link: LinkHandle, call: MethodCallTopic, outcome: Outcome, until: Instant) {
    let body = MethodResponse {
        status: outcome.status,
        payload: outcome.payload,
    };
    let body = Bytes::from(serde_json::to_vec(&body).expect("a response serializes"));
    let msg = Reliable {
        topic: call.answer_topic(outcome.status),
        payload: body,
        retain: false,
        until: Some(until),
    };
    match link.deliver(msg).await.await {
        Ok(Delivered::Acked) => {}
        Ok(how) => {
            tracing::warn!(identity = %call.identity, method = %call.method, outcome = ?how, "a method's answer did not reach the cloud")
        }
        Err(_) => {}
    }
}
