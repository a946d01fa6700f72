//! Cloud-to-device messages for child devices: kept durably per device
//! until the device acknowledges them, delivered in order whenever it is
//! connected and subscribed, and their completion sent upstream.
//!
//! Owns each device's queue (the store's `c2d` documents, one entry per
//! message, bounded per device, expired after the hub's time to live) and
//! which of its messages are out with the device. Unlike edgeHub, which
//! drops a cloud-to-device message for a device that is not connected, a
//! message waits here. A message is delivered through the local broker with
//! a [`Receipt`]: the device's PUBACK removes it and queues a completion
//! upstream (`devices/{d}/messages/completed`, through the store like
//! telemetry); a delivery lost with its connection is sent again on the
//! device's next subscription. It does not decide which messages are the
//! device's (the cloud side does) nor speak MQTT.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::{BrokerHandle, Delivery, Receipt};
use crate::metrics::{DropReason, Metrics};
use crate::store::{self, Appender, Documents, Record, Store, StoreError};

/// Messages a device's queue holds (IoT Hub's own limit per device).
pub const MAX_PER_DEVICE: usize = 50;
/// Bytes a device's queue holds.
pub const MAX_BYTES_PER_DEVICE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum C2dError {
    #[error("the queue of {device} is full ({count} messages, {bytes} bytes; at most {MAX_PER_DEVICE} and {MAX_BYTES_PER_DEVICE}): the message is refused")]
    Full {
        device: String,
        count: usize,
        bytes: usize,
    },
    #[error("the message could not be stored: {0}")]
    Storage(#[from] StoreError),
    #[error("the message could not be stored: {0}")]
    Blocking(String),
}

#[derive(Default)]
struct DeviceQueue {
    pending: BTreeMap<u64, Record>,
    /// Messages out with the device, not yet acknowledged.
    sent: HashSet<u64>,
}

impl DeviceQueue {
    fn bytes(&self) -> usize {
        self.pending.values().map(Record::encoded_len).sum()
    }
}

enum Fate {
    Acknowledged(String, u64),
    Lost(String, u64),
}

pub struct CloudToDevice {
    docs: Documents,
    broker: BrokerHandle,
    appender: Appender,
    /// The hub's default time to live, in ms.
    ttl_ms: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    queues: Mutex<HashMap<String, DeviceQueue>>,
    next_seq: AtomicU64,
    fates: mpsc::UnboundedSender<Fate>,
}

/// Takes the devices' acknowledgements (see [`CloudToDevice::open`]).
pub struct Completions {
    c2d: Arc<CloudToDevice>,
    fates: mpsc::UnboundedReceiver<Fate>,
}

fn key(device: &str, seq: u64) -> String {
    format!("{device}/{seq:016x}")
}

impl CloudToDevice {
    /// Loads every stored message; the returned [`Completions`] must run.
    pub fn open(
        store: &Store,
        broker: BrokerHandle,
        appender: Appender,
        ttl_ms: Arc<AtomicU64>,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Self>, Completions), StoreError> {
        let docs = store.documents("c2d")?;
        let mut queues: HashMap<String, DeviceQueue> = HashMap::new();
        let mut last = 0;
        for (k, v) in docs.all()? {
            let parsed = k
                .rsplit_once('/')
                .and_then(|(d, s)| Some((d.to_string(), u64::from_str_radix(s, 16).ok()?)));
            match (parsed, Record::decode(&v)) {
                (Some((device, seq)), Ok(r)) => {
                    last = last.max(seq);
                    queues.entry(device).or_default().pending.insert(seq, r);
                }
                _ => {
                    tracing::error!(key = %k, "a stored cloud-to-device message cannot be read; left as it is")
                }
            }
        }
        let (tx, fates) = mpsc::unbounded_channel();
        metrics.set_c2d_queued(queues.values().map(|q| q.pending.len()).sum());
        let c2d = Arc::new(CloudToDevice {
            docs,
            broker,
            appender,
            ttl_ms,
            metrics,
            queues: Mutex::new(queues),
            next_seq: AtomicU64::new(last + 1),
            fates: tx,
        });
        let completions = Completions {
            c2d: c2d.clone(),
            fates,
        };
        Ok((c2d, completions))
    }

    /// Queues a message from the cloud for `device`, durably, then delivers
    /// what the device can take now.
    pub async fn accept(
        &self,
        device: &str,
        topic: String,
        payload: Bytes,
    ) -> Result<(), C2dError> {
        let record = Record {
            enqueued_ms: store::now_ms(),
            topic,
            payload,
            ttl_secs: None,
        };
        let seq = {
            let queues = self.queues.lock().unwrap();
            if let Some(q) = queues.get(device) {
                let (count, bytes) = (q.pending.len(), q.bytes());
                if count >= MAX_PER_DEVICE || bytes + record.encoded_len() > MAX_BYTES_PER_DEVICE {
                    return Err(C2dError::Full {
                        device: device.into(),
                        count,
                        bytes,
                    });
                }
            }
            self.next_seq.fetch_add(1, Ordering::Relaxed)
        };
        let (docs, k, bytes) = (self.docs.clone(), key(device, seq), record.encode());
        tokio::task::spawn_blocking(move || docs.put(&k, &bytes))
            .await
            .map_err(|e| C2dError::Blocking(e.to_string()))??;
        {
            let mut queues = self.queues.lock().unwrap();
            let q = queues.entry(device.to_string()).or_default();
            q.pending.insert(seq, record);
            self.count(&queues);
        }
        self.push(device).await;
        Ok(())
    }

    /// Delivers, in order, every message of `device` not out with it yet,
    /// if it is connected and subscribed; stops at the first it cannot take.
    pub async fn push(&self, device: &str) {
        let now = store::now_ms();
        let ttl = self.ttl_ms.load(Ordering::Relaxed);
        let (due, expired) = {
            let mut queues = self.queues.lock().unwrap();
            let Some(q) = queues.get_mut(device) else {
                return;
            };
            let expired: Vec<u64> = q
                .pending
                .iter()
                .filter(|(_, r)| r.as_view().expired(now, ttl))
                .map(|(s, _)| *s)
                .collect();
            for s in &expired {
                q.pending.remove(s);
                q.sent.remove(s);
            }
            let due: Vec<(u64, Record)> = q
                .pending
                .iter()
                .filter(|(s, _)| !q.sent.contains(s))
                .map(|(s, r)| (*s, r.clone()))
                .collect();
            q.sent.extend(due.iter().map(|(s, _)| *s));
            self.count(&queues);
            (due, expired)
        };
        if !expired.is_empty() {
            self.metrics.expired(expired.len() as u64);
            tracing::warn!(%device, messages = expired.len(), "cloud-to-device messages expired before the device took them");
            self.remove(device, &expired).await;
        }
        let mut due = due.into_iter();
        while let Some((seq, record)) = due.next() {
            let fates = self.fates.clone();
            let id = device.to_string();
            let receipt = Receipt::new(move |acked| {
                let fate = if acked {
                    Fate::Acknowledged(id.clone(), seq)
                } else {
                    Fate::Lost(id.clone(), seq)
                };
                let _ = fates.send(fate);
            });
            let delivery = Delivery {
                topic: record.topic,
                payload: record.payload,
                qos: 1,
                retain: false,
                dup: false,
                receipt: Some(receipt),
            };
            // Not taken: its receipt is dropped, so it is marked not sent;
            // the ones after it were never tried.
            if !self.broker.send_to(device, delivery).await {
                let mut queues = self.queues.lock().unwrap();
                if let Some(q) = queues.get_mut(device) {
                    for (s, _) in due {
                        q.sent.remove(&s);
                    }
                }
                break;
            }
        }
    }

    /// Sets the gauge of messages held, for every device.
    fn count(&self, queues: &HashMap<String, DeviceQueue>) {
        let n = queues.values().map(|q| q.pending.len()).sum();
        self.metrics.set_c2d_queued(n);
    }

    async fn remove(&self, device: &str, seqs: &[u64]) {
        let docs = self.docs.clone();
        let keys: Vec<String> = seqs.iter().map(|s| key(device, *s)).collect();
        let removed =
            tokio::task::spawn_blocking(move || keys.iter().try_for_each(|k| docs.remove(k))).await;
        if !matches!(removed, Ok(Ok(()))) {
            tracing::error!(%device, "acknowledged cloud-to-device messages could not be removed; they may be delivered again after a restart");
        }
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
            match fate {
                Fate::Lost(device, seq) => {
                    let mut queues = self.c2d.queues.lock().unwrap();
                    if let Some(q) = queues.get_mut(&device) {
                        q.sent.remove(&seq);
                    }
                }
                Fate::Acknowledged(device, seq) => self.completed(&device, seq).await,
            }
        }
    }

    async fn completed(&self, device: &str, seq: u64) {
        let record = {
            let mut queues = self.c2d.queues.lock().unwrap();
            let Some(q) = queues.get_mut(device) else {
                return;
            };
            q.sent.remove(&seq);
            let record = q.pending.remove(&seq);
            self.c2d.count(&queues);
            record
        };
        let Some(record) = record else { return };
        self.c2d.remove(device, &[seq]).await;
        let body = json!({ "topic": record.topic, "enqueuedMs": record.enqueued_ms });
        let completion = Record {
            enqueued_ms: store::now_ms(),
            topic: format!("devices/{device}/messages/completed"),
            payload: Bytes::from(body.to_string()),
            ttl_secs: None,
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
        let (c2d, completions) =
            CloudToDevice::open(&store, broker.clone(), appender, ttl, Arc::default()).unwrap();
        let shutdown = CancellationToken::new();
        let done = tokio::spawn(completions.run(shutdown.clone()));

        c2d.accept(
            "d1",
            "devices/d1/messages/devicebound/".into(),
            Bytes::from_static(b"a"),
        )
        .await
        .unwrap();
        let (outbox, mut inbox) = mpsc::channel(8);
        broker
            .connect(
                "d1",
                1,
                crate::broker::SESSION_ENDS,
                false,
                outbox,
                CancellationToken::new(),
            )
            .await
            .unwrap();
        broker
            .subscribe("d1", vec![("devices/d1/messages/devicebound/#".into(), 1)])
            .await;
        c2d.push("d1").await;
        let first = inbox.recv().await.unwrap();
        assert_eq!(&first.payload[..], b"a");
        c2d.push("d1").await;
        assert!(inbox.try_recv().is_err(), "not sent twice while out");
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
        let completed = tail.wait_for(|t| *t == 2);
        tokio::time::timeout(Duration::from_secs(10), completed)
            .await
            .expect("a completion is queued upstream")
            .unwrap();
        let stored = store.read_from(1, 10).unwrap();
        let r = stored[0].record().unwrap();
        assert_eq!(r.topic, "devices/d1/messages/completed");
        assert!(c2d.queues.lock().unwrap()["d1"].pending.is_empty());
        shutdown.cancel();
        done.await.unwrap();
    }
}
