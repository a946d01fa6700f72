//! Where a message goes: upstream (through the durable store), to local
//! subscribers, or both.
//!
//! Owns the routing decision and hands messages on; it keeps no message
//! state. Today the rule is fixed: IoT Hub telemetry topics and the
//! configured `forward_topics` go upstream, and every message is offered to
//! local subscribers.

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::mqtt::broker::BrokerHandle;
use crate::mqtt::codec::Publish;
use crate::mqtt::dialect::Telemetry;
use crate::mqtt::topic;
use crate::store::{self, AppendError, Appender, Record};

/// The outcome of making a batch durable.
pub type Durable = oneshot::Receiver<Result<(), AppendError>>;

#[derive(Clone)]
pub struct Router {
    forward_topics: Arc<Vec<String>>,
    appender: Appender,
    broker: BrokerHandle,
}

impl Router {
    pub fn new(forward_topics: Vec<String>, appender: Appender, broker: BrokerHandle) -> Self {
        Self {
            forward_topics: Arc::new(forward_topics),
            appender,
            broker,
        }
    }

    /// Whether a message on `topic` is bound upstream.
    pub fn upstream_bound(&self, topic: &str) -> bool {
        Telemetry::parse(topic).is_some()
            || self.forward_topics.iter().any(|f| topic::matches(f, topic))
    }

    /// Sends `local` to local subscribers and `upstream` to the store.
    /// Returns the durability outcome when anything went to the store.
    pub async fn dispatch(&self, local: Vec<Publish>, upstream: Vec<Publish>) -> Option<Durable> {
        let now = store::now_ms();
        let records: Vec<Record> = upstream
            .iter()
            .map(|p| Record {
                enqueued_ms: now,
                topic: p.topic.clone(),
                payload: p.payload.clone(),
            })
            .collect();
        let mut all = local;
        all.extend(upstream);
        if !all.is_empty() {
            self.broker.publish(all).await;
        }
        if records.is_empty() {
            return None;
        }
        match self.appender.append_later(records).await {
            Ok(rx) => Some(rx),
            Err(e) => {
                // The caller accounts for the refusal, as for a late one.
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(Err(e));
                Some(rx)
            }
        }
    }
}
