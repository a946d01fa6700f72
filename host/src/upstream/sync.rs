//! Cloud sync: what the cloud publishes to this hub, applied here, and the
//! hub twin's reported properties kept published.
//!
//! Owns the consumers of the link for the device scope (`edges/{edge}/scope`,
//! retained; to `auth`) and the hub twin's desired properties (retained; to
//! `twin`). Each has its own subscription and channel on the link and
//! acknowledges a message only once it is applied (and cached durably) or
//! refused, so nothing the cloud sends is acknowledged and then lost.
//! Methods and cloud-to-device messages will be consumers of their own.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::link::{CloudMessage, Link, LinkHandle};
use crate::auth::Auth;
use crate::protocol::scope_topic;
use crate::twin::{self, HubTwin};

/// Cloud messages a consumer's channel holds before the link waits.
const CHANNEL: usize = 16;

/// The consumers of what the cloud sends to this hub.
pub struct CloudSync {
    scope: mpsc::Receiver<CloudMessage>,
    desired: mpsc::Receiver<CloudMessage>,
}

impl CloudSync {
    /// Subscribes this hub's consumers on `link` (before it starts).
    pub fn subscribe(link: &mut Link, edge_id: &str) -> Self {
        Self {
            scope: link.subscribe(scope_topic(edge_id), CHANNEL),
            desired: link.subscribe(twin::desired_topic(edge_id), CHANNEL),
        }
    }

    /// Applies scope and hub twin updates until `shutdown`.
    pub async fn run(
        mut self,
        auth: Arc<Auth>,
        hub_twin: Arc<HubTwin>,
        shutdown: CancellationToken,
    ) {
        // Plugins come and go with the folder: keep the reported state fresh.
        let mut refresh = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = refresh.tick() => hub_twin.report(),
                Some(msg) = self.scope.recv() => {
                    let auth = auth.clone();
                    let topic = msg.topic.clone();
                    apply(msg, move |doc| auth.apply(doc).map(|_| ()), "device scope", &topic).await;
                }
                Some(msg) = self.desired.recv() => {
                    // Stored by `twins` off the runtime, then put in force.
                    if let Err(e) = hub_twin.apply(&msg.payload).await {
                        tracing::error!(topic = %msg.topic, error = %e, "hub twin desired properties refused; the previous one stays");
                    }
                    msg.ack();
                }
                else => return,
            }
        }
    }
}

/// Applies one cloud document off the runtime (parsing, caching with fsync,
/// key decoding), then acknowledges it: applied, refused or even panicked
/// on, it has been dealt with (sent again, it would only fail again, and an
/// unacknowledged message holds back the PUBACKs of every later one).
async fn apply<E: std::fmt::Display + Send + 'static>(
    msg: CloudMessage,
    f: impl FnOnce(&[u8]) -> Result<(), E> + Send + 'static,
    what: &'static str,
    topic: &str,
) {
    let payload = msg.payload.clone();
    match tokio::task::spawn_blocking(move || f(&payload)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(%topic, error = %e, "{what} refused; the previous one stays"),
        Err(e) => tracing::error!(%topic, error = %e, "{what} update failed"),
    }
    msg.ack();
}

/// Keeps the hub twin's reported document published upstream (retained,
/// QoS 0, re-sent by the link after every reconnect): a status, sent again
/// rather than acknowledged, so a broker slow to store retained QoS 1
/// messages never holds the link up for it.
pub async fn report(
    link: LinkHandle,
    topic: String,
    mut reported: watch::Receiver<Option<serde_json::Value>>,
    shutdown: CancellationToken,
) {
    loop {
        let doc = reported.borrow_and_update().clone();
        if let Some(doc) = doc {
            link.keep_published(topic.clone(), Bytes::from(doc.to_string()))
                .await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = reported.changed() => if changed.is_err() { return },
        }
    }
}
