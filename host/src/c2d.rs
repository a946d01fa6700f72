//! Cloud-to-device messages for child devices: kept durably per device
//! until the device acknowledges them, delivered in order whenever it is
//! connected and subscribed, and their completion sent upstream.
//!
//! Owns the devices' mailboxes (the store's `c2d` keyspace through
//! [`Mailboxes`], bounded per device, each message expiring at its own
//! `$.exp` or after the hub's time to live) and what a device's
//! acknowledgement means: its PUBACK removes the message and queues a
//! completion upstream (`devices/{d}/messages/completed`, through the store
//! like telemetry). Unlike edgeHub, which drops a cloud-to-device message
//! for a device that is not connected, a message waits here. It does not
//! decide which messages are the device's (the cloud side does) nor speak
//! MQTT.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::BrokerHandle;
use crate::mailbox::{Bounds, Fate, MailboxError, Mailboxes, Reach, Setup};
use crate::message::dialect::DeviceBound;
use crate::metrics::{DropReason, Metrics};
use crate::store::{Appender, Record, Store, StoreError};

/// Messages a device's queue holds (IoT Hub's own limit per device) and
/// their bytes: the defaults of `store.c2d_max_messages` and
/// `store.c2d_max_bytes`.
pub const DEFAULT_BOUNDS: Bounds = Bounds {
    messages: 50,
    bytes: 1 << 20,
};

pub type C2dError = MailboxError;

pub struct CloudToDevice {
    mailboxes: Arc<Mailboxes>,
    appender: Appender,
    metrics: Arc<Metrics>,
}

/// Takes the devices' acknowledgements (see [`CloudToDevice::open`]).
pub struct Completions {
    c2d: Arc<CloudToDevice>,
    fates: mpsc::UnboundedReceiver<Fate>,
}

impl CloudToDevice {
    /// Loads every stored message; the returned [`Completions`] must run.
    pub fn open(
        store: &Store,
        broker: BrokerHandle,
        appender: Appender,
        ttl_ms: Arc<AtomicU64>,
        bounds: Bounds,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Self>, Completions), StoreError> {
        let setup = Setup {
            keyspace: "c2d",
            reach: Reach::Client,
            bounds,
            ttl_ms,
            metrics: metrics.clone(),
            gauge: Metrics::set_c2d_queued,
        };
        let (mailboxes, fates) = Mailboxes::open(store, broker, setup)?;
        let c2d = Arc::new(CloudToDevice {
            mailboxes,
            appender,
            metrics,
        });
        let completions = Completions {
            c2d: c2d.clone(),
            fates,
        };
        Ok((c2d, completions))
    }

    /// Queues a message from the cloud for `device`, durably, then delivers
    /// what the device can take now. Its `$.exp` (an RFC 3339 time in the
    /// topic's properties), when given, is when it expires.
    pub async fn accept(
        &self,
        device: &str,
        topic: String,
        payload: Bytes,
    ) -> Result<(), C2dError> {
        let now = crate::clock::now_ms();
        let ttl_secs = DeviceBound::expiry_ms(&topic)
            .map(|exp| u32::try_from(exp.saturating_sub(now) / 1000).unwrap_or(u32::MAX));
        let record = Record {
            enqueued_ms: now,
            topic,
            payload,
            ttl_secs,
            priority: 0,
        };
        let mut reservation = self.mailboxes.reserve(vec![(device.to_string(), record)]);
        if let Some(refused) = reservation.refused.pop() {
            return Err(refused);
        }
        self.mailboxes.store(reservation).await?;
        self.push(device).await;
        Ok(())
    }

    /// Delivers, in order, every message of `device` not out with it yet,
    /// if it is connected and subscribed.
    pub async fn push(&self, device: &str) {
        self.mailboxes.push(device).await
    }
}

impl Completions {
    /// Removes what devices acknowledged (queueing its completion upstream)
    /// and marks lost deliveries to be sent again, until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let fate = tokio::select! {
                _ = shutdown.cancelled() => return,
                f = self.fates.recv() => match f { Some(f) => f, None => return },
            };
            if let Some((device, record)) = self.c2d.mailboxes.settle(fate).await {
                self.completed(&device, record).await;
            }
        }
    }

    async fn completed(&self, device: &str, record: Record) {
        let body = json!({ "topic": record.topic, "enqueuedMs": record.enqueued_ms });
        let completion = Record {
            enqueued_ms: crate::clock::now_ms(),
            topic: format!("devices/{device}/messages/completed"),
            payload: Bytes::from(body.to_string()),
            ttl_secs: None,
            priority: 0,
        };
        if let Err(e) = self.c2d.appender.append_later(vec![completion]).await {
            self.c2d
                .metrics
                .messages_dropped(DropReason::StoreRefused, 1);
            tracing::warn!(%device, error = %e, "the completion of a cloud-to-device message could not be queued upstream");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_delivery_lost_with_its_connection_goes_out_again_and_an_acknowledged_one_completes()
    {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (appender, _writer) = crate::store::writer::spawn(store.clone(), u64::MAX, 64);
        let (broker, _task) = crate::broker::spawn(16, Arc::default());
        let ttl = Arc::new(AtomicU64::new(3_600_000));
        let (c2d, completions) = CloudToDevice::open(
            &store,
            broker.clone(),
            appender,
            ttl,
            DEFAULT_BOUNDS,
            Arc::default(),
        )
        .unwrap();
        let shutdown = CancellationToken::new();
        let done = tokio::spawn(completions.run(shutdown.clone()));

        c2d.accept(
            "d1",
            "devices/d1/messages/devicebound/".into(),
            Bytes::from_static(b"a"),
        )
        .await
        .unwrap();
        let filters = [("devices/d1/messages/devicebound/#", 1)];
        let mut inbox = crate::broker::subscribed_client(&broker, "d1", 1, &filters).await;
        c2d.push("d1").await;
        let first = inbox.recv().await.unwrap();
        assert_eq!(&first.payload[..], b"a");
        c2d.push("d1").await;
        assert!(inbox.try_recv().is_none(), "not sent twice while out");
        // The connection ends before the PUBACK: the delivery is dropped.
        drop(first);
        let again = loop {
            c2d.push("d1").await;
            if let Ok(d) = tokio::time::timeout(Duration::from_millis(50), inbox.recv()).await {
                break d.unwrap();
            }
        };
        assert_eq!(&again.payload[..], b"a");
        again.receipt.as_ref().unwrap().acknowledged();
        let mut tail = store.watch_tail();
        let completed = tail.wait_for(|_| store.tail(0) == 2);
        tokio::time::timeout(Duration::from_secs(10), completed)
            .await
            .expect("a completion is queued upstream")
            .unwrap();
        let stored = store.read_from(1, 10).unwrap();
        let r = stored[0].record().unwrap();
        assert_eq!(r.topic, "devices/d1/messages/completed");
        assert!(
            c2d.mailboxes.recipients().is_empty(),
            "the message left its queue"
        );
        shutdown.cancel();
        done.await.unwrap();
    }
}
