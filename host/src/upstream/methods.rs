//! Direct method calls from the cloud to the identities of the scope.
//!
//! Owns the link consumer for calls (`{identity}/methods/{name}/{rid}`, one
//! filter per identity of the scope), checking each call's body, running
//! it through `methods` (at most [`MAX_CALLS`] at once) and publishing the
//! answer on `{identity}/methods/res/{status}/{rid}`. A call is
//! acknowledged to the cloud once it is taken: its answer is the answer.
//! It does not deliver calls to connections (`methods` does).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::link::{CloudMessage, Link, LinkHandle};
use super::scoped::ScopedConsumer;
use crate::auth::{Auth, Scope};
use crate::methods::{Methods, Outcome};
use crate::metrics::Metrics;
use crate::protocol::{
    method_calls_filter, per_identity, MethodCallTopic, MethodRequest, MethodResponse,
};

/// Calls in flight at once; beyond, a call is answered 429 at once.
pub const MAX_CALLS: usize = 64;

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
                    let Some((call, request)) = check(&msg, scoped.scope(), &link, &metrics).await else {
                        msg.ack();
                        continue;
                    };
                    msg.ack();
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        metrics.cloud_refused("method", "busy");
                        let busy = Outcome::hub(429, format!("{MAX_CALLS} method calls are already in flight"));
                        answer(&link, &call, busy).await;
                        continue;
                    };
                    let (link, methods) = (link.clone(), methods.clone());
                    running.spawn(async move {
                        let outcome = methods
                            .invoke(
                                &call.identity,
                                &call.method,
                                &request.payload,
                                Duration::from_secs(request.response_timeout_in_seconds),
                                Duration::from_secs(request.connect_timeout_in_seconds),
                            )
                            .await;
                        answer(&link, &call, outcome).await;
                        drop(slot);
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

/// The call a cloud message carries, if it is one to take; a bad one is
/// answered 400 here (or ignored, when it is not for this scope).
async fn check(
    msg: &CloudMessage,
    scope: Option<&Scope>,
    link: &LinkHandle,
    metrics: &Metrics,
) -> Option<(MethodCallTopic, MethodRequest)> {
    let Some(call) = MethodCallTopic::parse(&msg.topic) else {
        tracing::warn!(topic = %msg.topic, "not a method call topic; ignored");
        metrics.cloud_refused("method", "not_for_the_hub");
        return None;
    };
    if scope.is_none_or(|s| s.get(&call.identity).is_none()) {
        tracing::warn!(topic = %msg.topic, "a method call for an identity outside the device scope; ignored");
        metrics.cloud_refused("method", "outside_scope");
        return None;
    }
    let request = serde_json::from_slice::<MethodRequest>(&msg.payload)
        .map_err(|e| format!("the call's body is not a method request: {e}"))
        .and_then(|r| r.check().map(|()| r));
    match request {
        Ok(r) => Some((call, r)),
        Err(why) => {
            tracing::warn!(topic = %msg.topic, reason = %why, "method call refused");
            metrics.cloud_refused("method", "invalid");
            let bad = Outcome::hub(400, why);
            answer(link, &call, bad).await;
            None
        }
    }
}

async fn answer(link: &LinkHandle, call: &MethodCallTopic, outcome: Outcome) {
    let body = MethodResponse {
        status: outcome.status,
        payload: outcome.payload,
    };
    let body = Bytes::from(serde_json::to_vec(&body).expect("a response serializes"));
    link.send(call.answer_topic(outcome.status), body).await;
}
