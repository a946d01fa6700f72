//! Device and module twins between the hub and the cloud: each identity's
//! desired document comes in on its own subscription, its reported document
//! goes out retained (and is read back: the cloud's may be newer).
//!
//! Owns the link consumer for twin documents (its filters follow the
//! device scope: desired and reported, per identity), handing each
//! document to `twins` and pushing what changed to the identity's
//! connections; publishing reported documents (QoS 1, retained) and
//! telling `twins` which the cloud acknowledged; clearing the documents of
//! identities the scope no longer has. It does not hold twins (`twins`
//! does) nor speak to the socket (the link does).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::link::{CloudMessage, Link, LinkHandle};
use super::reliable::{Delivered, Reliable};
use super::scoped::ScopedConsumer;
use crate::auth::{Auth, Scope};
use crate::broker::{BrokerHandle, Delivery};
use crate::iothub;
use crate::metrics::Metrics;
use crate::protocol::{self, per_identity, twin_topic, TwinTopic};
use crate::twins::{self, ToCloud, Twins};

pub struct TwinSync(ScopedConsumer);

impl TwinSync {
    /// Registers the desired-document consumer on `link` (before it starts);
    /// its filters are set from the scope once running.
    pub fn subscribe(link: &mut Link) -> Self {
        Self(ScopedConsumer::register(link))
    }

    /// Runs until `shutdown`.
    pub async fn run(
        mut self,
        link: LinkHandle,
        auth: Arc<Auth>,
        twins: Arc<Twins>,
        broker: BrokerHandle,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut scoped = self.0.follow(link.clone(), &auth, filters).await;
        forget_removed(scoped.scope(), &twins).await;
        // Reported documents on their way: (identity, version, outcome).
        let mut sending = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = scoped.changed() => {
                    if !changed {
                        return;
                    }
                    scoped.apply().await;
                    forget_removed(scoped.scope(), &twins).await;
                }
                Some(msg) = self.0.messages.recv() => {
                    let twin = TwinTopic::parse(&msg.topic)
                        .filter(|t| scoped.scope().is_some_and(|s| s.get(t.identity()).is_some()));
                    match twin {
                        Some(TwinTopic::Desired(id)) => desired(msg, &id, &twins, &broker, &metrics).await,
                        Some(TwinTopic::Reported(id)) => read_back(msg, &id, &twins, &metrics).await,
                        None => {
                            tracing::warn!(topic = %msg.topic, "a twin document for an identity outside the device scope; ignored");
                            metrics.cloud_refused("desired", "outside_scope");
                            msg.ack();
                        }
                    }
                }
                reported = twins.next_reported() => {
                    for doc in reported {
                        let done = link.deliver(reliable(&doc)).await;
                        sending.spawn(async move { (doc.id, doc.version, done.await) });
                    }
                }
                Some(Ok((id, version, how))) = sending.join_next(), if !sending.is_empty() => {
                    match how {
                        Ok(Delivered::Acked) => {
                            if let Err(e) = twins.acknowledged(&id, version).await {
                                tracing::error!(identity = %id, error = %e, "the cloud's acknowledgement of a reported document could not be stored");
                            }
                        }
                        Ok(Delivered::Refused(reason)) => {
                            tracing::error!(identity = %id, version, reason, "the upstream refused a reported document; sent again at the next change or start");
                        }
                        // Replaced by a newer one, or the link stopped.
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Deletes the twins of identities no longer in `scope` (with no scope,
/// the hub is an open broker and keeps every twin).
async fn forget_removed(scope: Option<&Scope>, twins: &Twins) {
    let Some(scope) = scope else { return };
    // The hub's own twin is no identity of the scope, and stays.
    let keep = |id: &str| scope.get(id).is_some() || protocol::is_hub_twin(id);
    match twins.forget_all_but(keep).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            twins = n,
            "twins of identities removed from the device scope deleted"
        ),
        Err(e) => tracing::error!(error = %e, "twins of removed identities could not be deleted"),
    }
}

/// The reported document to publish, or its clearing (an empty retained
/// message).
fn reliable(doc: &ToCloud) -> Reliable {
    Reliable {
        topic: twin_topic(&doc.id, "reported"),
        payload: doc
            .doc
            .as_ref()
            .map_or_else(Bytes::new, |d| Bytes::from(d.to_string())),
        retain: true,
        until: None,
    }
}

/// Two subscriptions per identity of the scope: its desired document, and
/// its reported one read back.
fn filters(scope: &Scope) -> Vec<String> {
    let mut f = per_identity(scope.identities.keys(), |id| twin_topic(id, "desired"));
    f.extend(per_identity(scope.identities.keys(), |id| {
        twin_topic(id, "reported")
    }));
    f
}

/// Takes a reported document read back from the cloud (see
/// [`Twins::cloud_reported`]); acknowledged whatever came of it.
async fn read_back(msg: CloudMessage, id: &str, twins: &Twins, metrics: &Metrics) {
    match twins.cloud_reported(id, &msg.payload).await {
        Ok(true) => {
            tracing::info!(identity = %id, "a newer reported document read back from the cloud")
        }
        Ok(false) => {}
        Err(e) => {
            metrics.cloud_refused("reported", "invalid");
            tracing::error!(identity = %id, error = %e, "a reported document read back from the cloud refused")
        }
    }
    msg.ack();
}

/// Takes one desired document: stored, then the change pushed to the
/// identity's connections that subscribed to desired patches, then
/// acknowledged to the cloud (a refused one too: sent again, it would be
/// refused again).
async fn desired(
    msg: CloudMessage,
    id: &str,
    twins: &Twins,
    broker: &BrokerHandle,
    metrics: &Metrics,
) {
    match twins.apply_desired(id, &msg.payload).await {
        Ok(Some(change)) if change.patch.is_empty() => {
            tracing::debug!(identity = %id, version = change.version, "desired properties unchanged but for their version");
        }
        Ok(Some(change)) => {
            tracing::info!(identity = %id, version = change.version, "desired properties changed");
            let body = twins::with_version(&change.patch, change.version);
            let patch = Delivery {
                topic: iothub::desired_patch(change.version),
                payload: Bytes::from(Value::to_string(&body)),
                qos: 1,
                retain: false,
                dup: false,
                receipt: None,
            };
            broker.send_to(id, patch).await;
        }
        Ok(None) => {}
        Err(e) => {
            metrics.cloud_refused("desired", "invalid");
            tracing::error!(identity = %id, error = %e, "desired properties refused")
        }
    }
    msg.ack();
}
