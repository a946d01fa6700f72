//! What the status page shows: the metrics now, what the hub is (edge id,
//! version, upstream addresses, plugins, routes), the sessions of the local
//! broker and the last hour of the queue and the upstream connection,
//! sampled every [`SAMPLE_EVERY`].
//!
//! Owns that history (kept in memory: a restart starts it again). Reads the
//! metrics, the store, the broker's session list, the route table and the
//! plugin registry; changes none of them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use crate::broker::{BrokerHandle, Clients};
use crate::metrics::Metrics;
use crate::mqtt::listener::Slots;
use crate::plugins::Registry;
use crate::routing::Routes;
use crate::store::Store;

/// How often the history is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Sessions listed at most (all are counted).
pub const SESSIONS_LISTED: usize = 200;
/// Samples kept: one hour.
const KEEP: usize = 360;

/// One point of the history.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct Sample {
    /// Wall clock, Unix ms.
    t: u64,
    depth: u64,
    oldest_age_seconds: f64,
    connected: bool,
    received: u64,
    forwarded: u64,
}

/// What the status page reads.
pub struct Sources {
    pub metrics: Arc<Metrics>,
    pub store: Store,
    pub broker: BrokerHandle,
    pub routes: Routes,
    pub plugins: Option<Arc<Registry>>,
    /// The listeners' `max_connections` slots.
    pub slots: Slots,
}

/// The hub as its operator sees it.
pub struct Seen {
    pub(super) metrics: Arc<Metrics>,
    pub(super) store: Store,
    pub(super) broker: BrokerHandle,
    routes: Routes,
    plugins: Option<Arc<Registry>>,
    slots: Slots,
    edge_id: String,
    upstream: Vec<String>,
    history: Mutex<VecDeque<Sample>>,
    started_ms: u64,
}

impl Seen {
    pub fn new(sources: Sources, edge_id: String, upstream: Vec<String>) -> Self {
        let Sources {
            metrics,
            store,
            broker,
            routes,
            plugins,
            slots,
        } = sources;
        Seen {
            metrics,
            store,
            broker,
            routes,
            plugins,
            slots,
            edge_id,
            upstream,
            history: Mutex::new(VecDeque::with_capacity(KEEP)),
            started_ms: crate::clock::wall_ms(),
        }
    }

    /// The OpenMetrics text, with the gauges read at scrape time read now.
    /// Reads the store: call it off the async runtime.
    pub fn metrics_text(&self) -> String {
        self.metrics
            .set_connection_slots(self.slots.held(), self.slots.max());
        self.metrics.render(&self.store)
    }

    fn plugin_names(&self) -> Vec<String> {
        self.plugins.as_ref().map_or_else(Vec::new, |r| r.names())
    }

    /// Adds a point to the history (dropping the oldest past an hour).
    /// Reads the store: call it off the async runtime.
    pub fn sample(&self) {
        let now = self.metrics.snapshot(&self.store, &[], &[]);
        self.push(Sample {
            t: crate::clock::wall_ms(),
            depth: now.queue_depth,
            oldest_age_seconds: now.queue_oldest_age_seconds,
            connected: now.upstream_connected,
            received: now.received,
            forwarded: now.forwarded,
        });
    }

    fn push(&self, sample: Sample) {
        let mut history = self.history.lock().expect("history");
        if history.len() == KEEP {
            history.pop_front();
        }
        history.push_back(sample);
    }

    /// `/status.json`, with `sessions` from the broker. Reads the store:
    /// call it off the async runtime.
    pub fn status_json(&self, sessions: Clients) -> String {
        let table = self.routes.table();
        let routes: Vec<_> = table
            .as_ref()
            .map_or(&[][..], |t| t.routes())
            .iter()
            .collect();
        let names: Vec<String> = routes.iter().map(|r| r.name.clone()).collect();
        let now = self
            .metrics
            .snapshot(&self.store, &self.plugin_names(), &names);
        let wall = crate::clock::wall_ms();
        let history: Vec<Sample> = self
            .history
            .lock()
            .expect("history")
            .iter()
            .copied()
            .collect();
        let plugins = self
            .plugins
            .as_ref()
            .map(|r| serde_json::to_value(r.status()).unwrap_or_default());
        json!({
            "edgeId": self.edge_id,
            "version": env!("CARGO_PKG_VERSION"),
            "time": wall,
            "uptimeSeconds": wall.saturating_sub(self.started_ms) / 1000,
            "upstream": {"addresses": self.upstream},
            "now": now,
            "plugins": plugins,
            "routes": routes
                .iter()
                .map(|r| json!({"name": r.name, "text": r.text, "priority": r.priority}))
                .collect::<Vec<_>>(),
            "sessions": sessions,
            "sampleEverySeconds": SAMPLE_EVERY.as_secs(),
            "history": history,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(dir: &std::path::Path) -> Seen {
        let store = Store::open(dir).unwrap();
        let metrics = Arc::new(Metrics::new());
        let (broker, _) = crate::broker::spawn(16, metrics.clone());
        let routes = serde_json::json!({"up": "FROM /messages/* INTO $upstream"});
        let table = crate::routing::rules::RouteTable::from_json(&routes).unwrap();
        let sources = Sources {
            metrics,
            store,
            broker,
            routes: Routes::new(Some(table)),
            plugins: None,
            slots: crate::mqtt::listener::Slots::new(4),
        };
        Seen::new(sources, "edge1".into(), vec!["mqtt://cloud:1883".into()])
    }

    #[tokio::test]
    async fn the_history_keeps_the_last_hour_of_samples_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = seen(dir.path());
        for t in 0..(KEEP as u64 + 5) {
            s.push(Sample {
                t,
                depth: t,
                oldest_age_seconds: 0.0,
                connected: false,
                received: 0,
                forwarded: 0,
            });
        }
        let h = s.history.lock().unwrap();
        assert_eq!(h.len(), KEEP);
        assert_eq!(
            (h.front().unwrap().t, h.back().unwrap().t),
            (5, KEEP as u64 + 4)
        );
    }

    #[tokio::test]
    async fn the_status_json_names_the_hub_and_carries_its_numbers_routes_sessions_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let s = seen(dir.path());
        s.metrics.received(4);
        s.metrics.route_matched("up", 3);
        s.sample();
        let (outbox, _inbox) = crate::broker::outbox(4);
        s.broker
            .connect("dev1", 1, crate::broker::SESSION_ENDS, false, outbox)
            .await
            .unwrap();
        let sessions = s.broker.clients(SESSIONS_LISTED).await;
        let v: serde_json::Value = serde_json::from_str(&s.status_json(sessions)).unwrap();
        assert_eq!(v["routes"][0]["name"], "up");
        assert_eq!(v["routes"][0]["text"], "FROM /messages/* INTO $upstream");
        assert_eq!(v["now"]["routes"][0]["messages"], 3);
        assert_eq!(v["sessions"]["connected"], 1);
        assert_eq!(v["sessions"]["sessions"][0]["clientId"], "dev1");
        assert_eq!(v["edgeId"], "edge1");
        assert_eq!(v["upstream"]["addresses"][0], "mqtt://cloud:1883");
        assert_eq!(v["now"]["received"], 4);
        assert_eq!(v["now"]["queueDepth"], 0);
        assert_eq!(v["history"].as_array().unwrap().len(), 1);
        assert_eq!(v["history"][0]["received"], 4);
    }
}
