//! Cloud sync: what the cloud publishes to this hub, applied here.
//!
//! Owns the mapping from cloud topics to the modules that act on them. The
//! device scope (`edges/{edge}/scope`, retained) goes to `auth`; the
//! forwarder subscribes on every connection, so the scope is re-read after
//! each reconnect. The hub twin's desired properties (retained) go to
//! `twin`. Methods and cloud-to-device messages will join here.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::forwarder::CloudMessage;
use crate::auth::Auth;
use crate::twin::{self, HubTwin};

/// The cloud topic carrying this hub's device scope.
pub fn scope_topic(edge_id: &str) -> String {
    format!("edges/{edge_id}/scope")
}

/// The topics the upstream connection subscribes to.
pub fn subscriptions(edge_id: &str) -> Vec<String> {
    vec![scope_topic(edge_id), twin::desired_topic(edge_id)]
}

pub async fn run(
    mut inbound: mpsc::Receiver<CloudMessage>,
    auth: Arc<Auth>,
    hub_twin: Arc<HubTwin>,
    shutdown: CancellationToken,
) {
    let scope = scope_topic(auth.edge_id());
    let desired = twin::desired_topic(auth.edge_id());
    // Plugins come and go with the folder: keep the reported state fresh.
    let mut refresh = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = refresh.tick() => {
                hub_twin.report();
                continue;
            }
            m = inbound.recv() => match m {
                Some(m) => m,
                None => return,
            },
        };
        if msg.topic == scope {
            let auth = auth.clone();
            // Parsing, caching (fsync) and key decoding stay off the runtime.
            let applied = tokio::task::spawn_blocking(move || auth.apply(&msg.payload)).await;
            match applied {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(topic = %scope, error = %e, "device scope refused; the previous one stays")
                }
                Err(e) => tracing::error!(error = %e, "device scope update failed"),
            }
        } else if msg.topic == desired {
            let t = hub_twin.clone();
            let applied = tokio::task::spawn_blocking(move || t.apply(&msg.payload)).await;
            match applied {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(topic = %desired, error = %e, "hub twin desired properties refused; the previous settings stay")
                }
                Err(e) => tracing::error!(error = %e, "hub twin update failed"),
            }
        } else {
            tracing::debug!(topic = %msg.topic, "cloud message on a topic nothing handles yet");
        }
    }
}
