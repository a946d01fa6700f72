//! Device and module twins between the hub and the cloud: each identity's
//! desired document comes in on its own subscription, its reported document
//! goes out retained.
//!
//! Owns the link consumer for desired documents (its filters follow the
//! device scope: one per identity), handing each document to `twins` and
//! pushing what changed to the identity's connections, keeping every
//! reported document published, and deleting the twins of identities the
//! scope no longer has. It does not hold twins (`twins` does) nor
//! speak to the socket (the link does).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::link::{CloudMessage, Link, LinkHandle};
use super::scoped::ScopedConsumer;
use crate::auth::{Auth, Scope};
use crate::broker::{BrokerHandle, Delivery};
use crate::iothub;
use crate::metrics::Metrics;
use crate::protocol::{identity_of_desired, per_identity, twin_topic};
use crate::twins::{self, Twins};

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
                    desired(msg, scoped.scope(), &twins, &broker, &metrics).await;
                }
                reported = twins.next_reported() => {
                    for (id, doc) in reported {
                        let body = Bytes::from(doc.to_string());
                        link.keep_published(twin_topic(&id, "reported"), Some(body)).await;
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
    match twins.forget_all_but(|id| scope.get(id).is_some()).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            twins = n,
            "twins of identities removed from the device scope deleted"
        ),
        Err(e) => tracing::error!(error = %e, "twins of removed identities could not be deleted"),
    }
}

/// One desired-document subscription per identity of the scope.
fn filters(scope: &Scope) -> Vec<String> {
    per_identity(scope.identities.keys(), |id| twin_topic(id, "desired"))
}

/// Takes one desired document: stored, then the change pushed to the
/// identity's connections that subscribed to desired patches, then
/// acknowledged to the cloud (a refused one too: sent again, it would be
/// refused again).
async fn desired(
    msg: CloudMessage,
    scope: Option<&Scope>,
    twins: &Twins,
    broker: &BrokerHandle,
    metrics: &Metrics,
) {
    let id =
        identity_of_desired(&msg.topic).filter(|id| scope.is_some_and(|s| s.get(id).is_some()));
    let Some(id) = id else {
        tracing::warn!(topic = %msg.topic, "desired properties for an identity outside the device scope; ignored");
        metrics.cloud_refused("desired", "outside_scope");
        msg.ack();
        return;
    };
    match twins.apply_desired(&id, &msg.payload).await {
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
            broker.send_to(&id, patch).await;
        }
        Ok(None) => {}
        Err(e) => {
            metrics.cloud_refused("desired", "invalid");
            tracing::error!(identity = %id, error = %e, "desired properties refused")
        }
    }
    msg.ack();
}
