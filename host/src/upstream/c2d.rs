//! Cloud-to-device messages from the cloud, for the child devices of the
//! scope.
//!
//! Owns the link consumer for `devices/{d}/messages/devicebound/#` (one
//! filter per child device of the scope; modules get none), handing each
//! message to `c2d`, which stores it durably before it is acknowledged to
//! the cloud. A message refused (the device's queue is full, or it is not
//! a device of the scope) is acknowledged too, with an error line and a
//! count: the cloud sending it again would not change the answer.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::link::{CloudMessage, Link, LinkHandle};
use super::scoped::ScopedConsumer;
use crate::auth::{Auth, Scope};
use crate::c2d::{C2dError, CloudToDevice};
use crate::metrics::{DropReason, Metrics};
use crate::protocol::{identity_root, per_identity, split_identity};
use crate::topic;

pub struct C2dSync(ScopedConsumer);

impl C2dSync {
    /// Registers the consumer on `link` (before it starts).
    pub fn subscribe(link: &mut Link) -> Self {
        Self(ScopedConsumer::register(link))
    }

    /// Runs until `shutdown`.
    pub async fn run(
        mut self,
        link: LinkHandle,
        auth: Arc<Auth>,
        c2d: Arc<CloudToDevice>,
        metrics: Arc<Metrics>,
        max_message_bytes: usize,
        shutdown: CancellationToken,
    ) {
        let mut scoped = self.0.follow(link, &auth, filters).await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = scoped.changed() => {
                    if !changed {
                        return;
                    }
                    scoped.apply().await;
                }
                Some(msg) = self.0.messages.recv() => {
                    if let Err((reason, why)) = take(&msg, scoped.scope(), &c2d, max_message_bytes).await {
                        if reason == "queue_full" {
                            metrics.messages_dropped(DropReason::DeviceQueueFull, 1);
                        }
                        metrics.cloud_refused("c2d", reason);
                        tracing::warn!(topic = %msg.topic, reason = %why, "cloud-to-device message refused");
                    }
                    msg.ack();
                }
            }
        }
    }
}

/// One filter per child device (not modules) of the scope.
fn filters(scope: &Scope) -> Vec<String> {
    let devices = scope
        .identities
        .iter()
        .filter(|(_, (id, _))| id.module_id.is_none())
        .map(|(k, _)| k);
    per_identity(devices, |d| {
        format!("{}/messages/devicebound/#", identity_root(d))
    })
}

async fn take(
    msg: &CloudMessage,
    scope: Option<&Scope>,
    c2d: &CloudToDevice,
    max_message_bytes: usize,
) -> Result<(), (&'static str, String)> {
    let device = match split_identity(&msg.topic) {
        Some((d, rest)) if !d.contains('/') && rest.starts_with("messages/devicebound") => d,
        _ => return Err(("not_for_the_hub", "not a cloud-to-device topic".into())),
    };
    if scope.is_none_or(|s| s.get(&device).is_none()) {
        let why = format!("{device} is not a device of the scope");
        return Err(("outside_scope", why));
    }
    let invalid = |why: String| ("invalid", why);
    topic::check_name(&msg.topic, topic::MAX_LEN).map_err(|e| invalid(e.to_string()))?;
    if msg.payload.len() > max_message_bytes {
        return Err(invalid(format!(
            "{} bytes, over mqtt.max_message_bytes ({max_message_bytes})",
            msg.payload.len()
        )));
    }
    c2d.accept(&device, msg.topic.clone(), msg.payload.clone())
        .await
        .map_err(|e: C2dError| {
            let reason = match e {
                C2dError::Full { .. } => "queue_full",
                C2dError::NoRoom(_) => "no_room",
                _ => "not_stored",
            };
            (reason, e.to_string())
        })
}
