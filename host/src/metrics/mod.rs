//! The hub's metrics, declared once in a `prometheus-client` registry.
//!
//! Owns the metric families (name, type, help, labels: each declared in
//! [`Metrics::new`] and nowhere else), their OpenMetrics text and a
//! [`Snapshot`] of their values for the status page. Does not own what is
//! counted (each module calls the method for its event) or the listener
//! that serves them (`monitor`). Queue depth, bytes and age are read from
//! the store at scrape time.
//!
//! The page is OpenMetrics text (counters get the `_total` suffix, the
//! registry prefixes every name with `edgehub_`). The names, types and labels
//! are listed in docs/architecture.md ("Metrics").
//!
//! - `latency.rs`: the latency histogram of routes and plugins.

mod latency;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::store::Store;
pub use latency::{Latency, LatencySummary};

/// Why a message was dropped (the `reason` label of
/// `edgehub_messages_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A QoS 0 upstream-bound message the store did not take (quota full or
    /// store closed); QoS 1 ones are refused to the sender instead.
    StoreRefused,
    /// A connected local subscriber that did not keep up (outbox full).
    SlowSubscriber,
    /// The oldest message of a disconnected persistent session's full queue.
    OfflineQueueFull,
    /// A queued record that could not be decoded (skipped, not sent).
    CorruptRecord,
    /// A cloud-to-device message refused: its device's queue was full (or
    /// it was not for a device of the scope).
    DeviceQueueFull,
    /// A message routed to a module input whose queue was full.
    ModuleInputFull,
    /// A message for a persistent session that is away, not kept: the
    /// disk is at the floor kept free (or the store at its size limit).
    NoRoom,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::StoreRefused,
        DropReason::SlowSubscriber,
        DropReason::OfflineQueueFull,
        DropReason::CorruptRecord,
        DropReason::DeviceQueueFull,
        DropReason::ModuleInputFull,
        DropReason::NoRoom,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::StoreRefused => "store_refused",
            DropReason::SlowSubscriber => "slow_subscriber",
            DropReason::OfflineQueueFull => "offline_queue_full",
            DropReason::CorruptRecord => "corrupt_record",
            DropReason::DeviceQueueFull => "device_queue_full",
            DropReason::ModuleInputFull => "module_input_full",
            DropReason::NoRoom => "no_room",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    plugin: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloudRefusedLabels {
    kind: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AddressLabels {
    address: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginRejectedLabels {
    plugin: String,
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InvalidTopicLabels {
    reason: String,
    route: String,
}

/// Every metric of the hub. Cheap to bump from any thread.
pub struct Metrics {
    registry: Registry,
    clients_connected: Gauge,
    received: Counter,
    queue_depth: Gauge,
    queue_bytes: Gauge,
    queue_oldest_age: Gauge<f64, AtomicU64>,
    forwarded: Counter,
    expired: Counter,
    dropped: Family<DropLabels, Counter>,
    refused: Counter,
    upstream_connected: Gauge,
    upstream_address: Family<AddressLabels, Gauge>,
    upstream_reconnects: Counter,
    upstream_window: Gauge,
    scope_identities: Gauge,
    scope_version: Gauge,
    scope_synced: Gauge<f64, AtomicU64>,
    auth_refused: Counter,
    connections_refused: Counter,
    connection_slots_held: Gauge,
    connection_slots: Gauge,
    authz_refused: Counter,
    plugin_calls: Counter,
    plugin_failures: Family<PluginLabels, Counter>,
    plugin_reloads: Counter,
    plugin_rejected: Family<PluginRejectedLabels, Counter>,
    plugin_log_dropped: Family<PluginLabels, Counter>,
    plugin_seconds: Family<PluginLabels, Latency>,
    route_messages: Family<RouteLabels, Counter>,
    route_seconds: Family<RouteLabels, Latency>,
    filtered_out: Counter,
    dead_lettered: Counter,
    dead_letters: Family<ReasonLabels, Counter>,
    dead_letter_depth: Gauge,
    c2d_queued: Gauge,
    module_inputs_queued: Gauge,
    broker_stored: Family<KindLabels, Gauge>,
    invalid_topics: Family<InvalidTopicLabels, Counter>,
    cloud_refused: Family<CloudRefusedLabels, Counter>,
    store_recovered: Counter,
    store_lost: Counter,
    /// The configured upstream addresses (the labels of `upstream_address`).
    addresses: std::sync::RwLock<Vec<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Creates a metric, registers it under `name` and returns the handle.
fn reg<M: prometheus_client::registry::Metric + Clone + Default>(
    r: &mut Registry,
    name: &str,
    help: &str,
) -> M {
    let m = M::default();
    r.register(name, help, m.clone());
    m
}

/// As [`reg`], for a metric in seconds (its name gets `_seconds`).
fn reg_seconds<M: prometheus_client::registry::Metric + Clone + Default>(
    r: &mut Registry,
    name: &str,
    help: &str,
) -> M {
    let m = M::default();
    r.register_with_unit(name, help, Unit::Seconds, m.clone());
    m
}

impl Metrics {
    /// The registry: every metric's name, type and help text is here.
    /// (Help texts get their full stop from the registry.)
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("edgehub");
        let m = Metrics {
            clients_connected: reg(&mut r, "clients_connected", "Downstream MQTT connections"),
            received: reg(&mut r, "messages_received", "PUBLISH packets received from downstream clients"),
            queue_depth: reg(&mut r, "queue_depth", "Messages in the upstream queue"),
            queue_bytes: reg(&mut r, "queue_bytes", "Bytes of queued messages (the quota counts these)"),
            queue_oldest_age: reg_seconds(&mut r, "queue_oldest_age", "Age of the oldest queued message"),
            forwarded: reg(&mut r, "messages_forwarded", "Messages acknowledged by the upstream broker"),
            expired: reg(&mut r, "messages_expired", "Messages dropped because they outlived their time-to-live"),
            dropped: reg(&mut r, "messages_dropped", "Messages dropped, by reason: store_refused (QoS 0 the store did not take), slow_subscriber, offline_queue_full, corrupt_record, device_queue_full (a cloud-to-device message refused: its device's queue was full), module_input_full"),
            refused: reg(&mut r, "messages_refused", "Publishes refused because the storage quota was full"),
            upstream_connected: reg(&mut r, "upstream_connected", "1 while connected to the upstream broker"),
            upstream_address: reg(&mut r, "upstream_address", "Each configured upstream address: 1 for the one the hub is connected to, 0 for the others"),
            upstream_reconnects: reg(&mut r, "upstream_reconnects", "Connections to the upstream broker made after the first one"),
            upstream_window: reg(&mut r, "upstream_window", "Publishes that may be unacknowledged upstream now: what the upstream acknowledged in a quarter of a keepalive, within upstream.max_inflight"),
            scope_identities: reg(&mut r, "scope_identities", "Identities in the device scope (0: no scope yet)"),
            scope_version: reg(&mut r, "scope_version", "Version of the device scope in force (0: no scope yet)"),
            scope_synced: reg_seconds(&mut r, "scope_synced_timestamp", "When the device scope in force came from the cloud, Unix time (0: no scope yet)"),
            auth_refused: reg(&mut r, "auth_refused", "Connections refused by authentication"),
            connections_refused: reg(&mut r, "connections_refused", "Connections refused because the hub served max_connections clients already"),
            connection_slots_held: reg(&mut r, "connection_slots_held", "Connections holding one of the max_connections slots: clients served and connections still opening (TLS handshake, WebSocket upgrade, CONNECT)"),
            connection_slots: reg(&mut r, "connection_slots", "The max_connections setting"),
            authz_refused: reg(&mut r, "authz_refused", "Publishes and subscriptions refused by authorization"),
            plugin_calls: reg(&mut r, "plugin_calls", "Messages handed to Wasm plugins"),
            plugin_failures: reg(&mut r, "plugin_failures", "Plugin calls that failed (timeout, memory, trap, bad result, not loaded), by plugin; each instance is replaced"),
            plugin_reloads: reg(&mut r, "plugin_reloads", "Plugins loaded, replaced or unloaded while running"),
            plugin_rejected: reg(&mut r, "plugin_rejected", "Plugin files refused, by plugin and reason (not_a_component, wrong_world, cannot_start, compile_timeout, file_too_large, ...)"),
            plugin_log_dropped: reg(&mut r, "plugin_log_dropped", "Lines a plugin logged beyond its log rate limit, by plugin"),
            plugin_seconds: reg_seconds(&mut r, "plugin", "Time a plugin took per message, by plugin (a batch call's time shared among its messages); its count is the messages it was handed"),
            route_messages: reg(&mut r, "route_messages", "Messages each route matched, by route"),
            route_seconds: reg_seconds(&mut r, "route_plugin_wait", "Time messages of a plugin route waited for its plugin's answer (queueing for a worker and the call), by route"),
            filtered_out: reg(&mut r, "messages_filtered", "Messages dropped by a filter plugin, a router plugin or a route's drop policy"),
            dead_lettered: reg(&mut r, "messages_dead_lettered", "Messages sent to the dead-letter topic after a plugin failure"),
            dead_letters: reg(&mut r, "dead_letters", "Messages moved to the store's dead-letter area, by reason (upstream_refused, ...)"),
            dead_letter_depth: reg(&mut r, "dead_letter_depth", "Messages in the store's dead-letter area"),
            c2d_queued: reg(&mut r, "c2d_queued", "Cloud-to-device messages stored for devices, not yet acknowledged by them"),
            module_inputs_queued: reg(&mut r, "module_inputs_queued", "Messages routed to module inputs, stored and not yet acknowledged by a module"),
            broker_stored: reg(&mut r, "broker_stored", "What the local broker has made durable, by kind: sessions (persistent), queued (messages kept for sessions away), retained"),
            invalid_topics: reg(&mut r, "invalid_topics", "Messages whose topic could not be stored (empty, NUL, wildcard, too long, ...), by reason and route"),
            cloud_refused: reg(&mut r, "cloud_refused", "Messages from the cloud the hub refused or ignored, by kind (desired, reported, method, c2d) and reason (outside_scope, invalid, not_for_the_hub, busy, queue_full, no_room, not_stored)"),
            store_recovered: reg(&mut r, "store_recovered", "Records kept from a damaged store when the hub started (see docs/store.md)"),
            store_lost: reg(&mut r, "store_lost", "Records a damaged store could not give back when the hub started (at least this many)"),
            registry: r,
            addresses: Default::default(),
        };
        // Every known reason is on the page from the start, at 0.
        for reason in DropReason::ALL {
            let _ = m.dropped.get_or_create(&DropLabels {
                reason: reason.as_str(),
            });
        }
        m
    }

    /// What opening the store found damaged and kept.
    pub fn store_recovered(&self, recovery: &crate::store::Recovery) {
        self.store_recovered.inc_by(recovery.recovered);
        self.store_lost.inc_by(recovery.lost);
    }
    pub fn client_connected(&self, delta: i64) {
        self.clients_connected.inc_by(delta);
    }
    pub fn received(&self, n: u64) {
        self.received.inc_by(n);
    }
    pub fn forwarded(&self, n: u64) {
        self.forwarded.inc_by(n);
    }
    pub fn expired(&self, n: u64) {
        self.expired.inc_by(n);
    }
    pub fn messages_dropped(&self, reason: DropReason, n: u64) {
        self.dropped
            .get_or_create(&DropLabels {
                reason: reason.as_str(),
            })
            .inc_by(n);
    }
    pub fn refused(&self, n: u64) {
        self.refused.inc_by(n);
    }
    pub fn set_scope_identities(&self, n: usize) {
        self.scope_identities.set(n as i64);
    }
    /// The scope in force: its version and when it came from the cloud
    /// (Unix ms).
    pub fn set_scope_synced(&self, version: u64, synced_ms: u64) {
        self.scope_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        self.scope_synced.set(synced_ms as f64 / 1000.0);
    }
    pub fn authz_refused(&self, n: u64) {
        self.authz_refused.inc_by(n);
    }
    pub fn set_connection_slots(&self, held: usize, max: usize) {
        self.connection_slots_held.set(held as i64);
        self.connection_slots.set(max as i64);
    }
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }
    pub fn auth_refused(&self, n: u64) {
        self.auth_refused.inc_by(n);
    }
    pub fn plugin_calls(&self, n: u64) {
        self.plugin_calls.inc_by(n);
    }
    pub fn plugin_failed(&self, plugin: &str) {
        self.plugin_failures
            .get_or_create(&plugin_labels(plugin))
            .inc();
    }
    /// A plugin was loaded, replaced or unloaded; its per-plugin series are
    /// on the page from then on (at 0 until something happens).
    pub fn plugin_reloaded(&self, plugin: &str) {
        self.plugin_reloads.inc();
        let labels = plugin_labels(plugin);
        let _ = self.plugin_failures.get_or_create(&labels);
        let _ = self.plugin_log_dropped.get_or_create(&labels);
        let _ = self.plugin_seconds.get_or_create(&labels);
    }
    pub fn plugin_rejected(&self, plugin: &str, reason: &str) {
        self.plugin_rejected
            .get_or_create(&PluginRejectedLabels {
                plugin: plugin.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }
    pub fn plugin_log_dropped(&self, plugin: &str, n: u64) {
        self.plugin_log_dropped
            .get_or_create(&plugin_labels(plugin))
            .inc_by(n);
    }
    /// `n` messages took `each` in `plugin`.
    pub fn plugin_took(&self, plugin: &str, each: Duration, n: u64) {
        self.plugin_seconds
            .get_or_create(&plugin_labels(plugin))
            .observe_n(each, n);
    }
    /// Route `route` matched `n` messages.
    pub fn route_matched(&self, route: &str, n: u64) {
        self.route_messages
            .get_or_create(&route_labels(route))
            .inc_by(n);
    }
    /// `n` messages of plugin route `route` waited `each` for its plugin.
    pub fn route_waited(&self, route: &str, each: Duration, n: u64) {
        self.route_seconds
            .get_or_create(&route_labels(route))
            .observe_n(each, n);
    }
    pub fn filtered_out(&self, n: u64) {
        self.filtered_out.inc_by(n);
    }
    pub fn dead_lettered(&self, n: u64) {
        self.dead_lettered.inc_by(n);
    }
    pub fn dead_letter(&self, reason: &str, n: u64) {
        self.dead_letters
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc_by(n);
    }
    pub fn set_c2d_queued(&self, n: usize) {
        self.c2d_queued.set(n as i64);
    }
    pub fn set_module_inputs_queued(&self, n: usize) {
        self.module_inputs_queued.set(n as i64);
    }
    pub fn set_broker_stored(&self, kind: &'static str, n: usize) {
        self.broker_stored
            .get_or_create(&KindLabels { kind })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    pub fn set_dead_letter_depth(&self, n: u64) {
        self.dead_letter_depth
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    pub fn invalid_topic(&self, reason: &str, route: &str) {
        self.invalid_topics
            .get_or_create(&InvalidTopicLabels {
                reason: reason.to_owned(),
                route: route.to_owned(),
            })
            .inc();
    }
    /// Every configured upstream address, each at 0 until connected to.
    pub fn upstream_addresses(&self, addresses: &[String]) {
        for a in addresses {
            let _ = self.upstream_address.get_or_create(&address_labels(a));
        }
        *self.addresses.write().expect("addresses") = addresses.to_vec();
    }
    /// Connected to `address`, or (`None`) to no upstream.
    /// A message from the cloud refused or ignored: `kind` (desired,
    /// method, c2d), `reason` (outside_scope, invalid, not_for_the_hub,
    /// busy, queue_full, no_room, not_stored).
    pub fn cloud_refused(&self, kind: &'static str, reason: &'static str) {
        self.cloud_refused
            .get_or_create(&CloudRefusedLabels { kind, reason })
            .inc();
    }
    pub fn set_upstream(&self, address: Option<&str>) {
        for a in self.addresses.read().expect("addresses").iter() {
            let up = Some(a.as_str()) == address;
            self.upstream_address
                .get_or_create(&address_labels(a))
                .set(up as i64);
        }
        self.upstream_connected.set(address.is_some() as i64);
    }
    pub fn upstream_reconnects(&self) {
        self.upstream_reconnects.inc();
    }
    pub fn upstream_window(&self, window: usize) {
        self.upstream_window.set(window as i64);
    }

    /// The values the status page shows, with the queue gauges read from
    /// `store` now; `plugins` and `routes`: the loaded plugins and the
    /// routes in force (in table order), whose numbers it gives. Reads the
    /// store: call it off the async runtime.
    pub fn snapshot(&self, store: &Store, plugins: &[String], routes: &[String]) -> Snapshot {
        self.read_store(store);
        let synced = self.scope_synced.get();
        Snapshot {
            clients: self.clients_connected.get().max(0) as u64,
            queue_depth: self.queue_depth.get().max(0) as u64,
            queue_bytes: self.queue_bytes.get().max(0) as u64,
            queue_oldest_age_seconds: self.queue_oldest_age.get(),
            dead_letters: self.dead_letter_depth.get().max(0) as u64,
            upstream_connected: self.upstream_connected.get() == 1,
            upstream_address: self
                .addresses
                .read()
                .expect("addresses")
                .iter()
                .find(|a| {
                    self.upstream_address
                        .get(&address_labels(a))
                        .is_some_and(|g| g.get() == 1)
                })
                .cloned(),
            upstream_reconnects: self.upstream_reconnects.get(),
            scope_identities: self.scope_identities.get().max(0) as u64,
            scope_version: self.scope_version.get().max(0) as u64,
            scope_synced_ms: (synced > 0.0).then_some((synced * 1000.0) as u64),
            received: self.received.get(),
            forwarded: self.forwarded.get(),
            expired: self.expired.get(),
            dropped: DropReason::ALL
                .iter()
                .map(|r| {
                    self.dropped
                        .get_or_create(&DropLabels { reason: r.as_str() })
                        .get()
                })
                .sum(),
            refused: self.refused.get(),
            auth_refused: self.auth_refused.get(),
            authz_refused: self.authz_refused.get(),
            connections_refused: self.connections_refused.get(),
            plugin_calls: self.plugin_calls.get(),
            filtered: self.filtered_out.get(),
            plugin_numbers: plugins
                .iter()
                .map(|p| {
                    let labels = plugin_labels(p);
                    let numbers = PluginNumbers {
                        failures: self.plugin_failures.get_or_create(&labels).get(),
                        took: self.plugin_seconds.get_or_create(&labels).summary(),
                    };
                    (p.clone(), numbers)
                })
                .collect(),
            routes: routes
                .iter()
                .map(|r| {
                    let labels = route_labels(r);
                    RouteNumbers {
                        name: r.clone(),
                        messages: self.route_messages.get_or_create(&labels).get(),
                        plugin_wait: self.route_seconds.get_or_create(&labels).summary(),
                    }
                })
                .collect(),
            c2d_queued: self.c2d_queued.get().max(0) as u64,
            module_inputs_queued: self.module_inputs_queued.get().max(0) as u64,
        }
    }

    fn read_store(&self, store: &Store) {
        if let Ok(stats) = store.stats() {
            let age = stats
                .oldest_ms
                .map(|ms| crate::clock::now_ms().saturating_sub(ms) as f64 / 1000.0)
                .unwrap_or(0.0);
            self.queue_depth
                .set(i64::try_from(stats.depth).unwrap_or(i64::MAX));
            self.queue_bytes
                .set(i64::try_from(stats.bytes).unwrap_or(i64::MAX));
            self.queue_oldest_age.set(age);
        }
        self.set_dead_letter_depth(store.dead_letter_count());
    }

    /// The OpenMetrics text of every metric, with the queue gauges read from
    /// `store` now. Reads the store: call it off the async runtime.
    pub fn render(&self, store: &Store) -> String {
        self.read_store(store);
        self.encode()
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The metrics' values at one moment, as the status page shows them.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub clients: u64,
    pub queue_depth: u64,
    pub queue_bytes: u64,
    pub queue_oldest_age_seconds: f64,
    pub dead_letters: u64,
    pub upstream_connected: bool,
    /// The address connected to.
    pub upstream_address: Option<String>,
    pub upstream_reconnects: u64,
    pub scope_identities: u64,
    pub scope_version: u64,
    /// When the scope in force came from the cloud (Unix ms).
    pub scope_synced_ms: Option<u64>,
    pub received: u64,
    pub forwarded: u64,
    pub expired: u64,
    /// Every reason of `edgehub_messages_dropped_total`, summed.
    pub dropped: u64,
    pub refused: u64,
    pub auth_refused: u64,
    pub authz_refused: u64,
    pub connections_refused: u64,
    pub plugin_calls: u64,
    pub filtered: u64,
    /// Each loaded plugin's numbers.
    #[serde(rename = "plugins")]
    pub plugin_numbers: BTreeMap<String, PluginNumbers>,
    /// Each route's numbers, in table order.
    pub routes: Vec<RouteNumbers>,
    pub c2d_queued: u64,
    pub module_inputs_queued: u64,
}

/// A plugin's numbers on the status page.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginNumbers {
    /// Calls that failed.
    pub failures: u64,
    /// Time per message (its count: the messages it was handed).
    pub took: LatencySummary,
}

/// A route's numbers on the status page.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteNumbers {
    pub name: String,
    /// Messages it matched.
    pub messages: u64,
    /// Waiting for its plugin's answer, per message (a route without a
    /// plugin: no observation).
    pub plugin_wait: LatencySummary,
}

fn route_labels(route: &str) -> RouteLabels {
    RouteLabels {
        route: route.to_owned(),
    }
}

fn address_labels(address: &str) -> AddressLabels {
    AddressLabels {
        address: address.to_owned(),
    }
}

fn plugin_labels(plugin: &str) -> PluginLabels {
    PluginLabels {
        plugin: plugin.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// name{labels} -> value, from OpenMetrics text.
    fn samples(text: &str) -> std::collections::BTreeMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (name, value) = l.rsplit_once(' ').expect("sample line has a value");
                (name.to_string(), value.parse().expect("value is a number"))
            })
            .collect()
    }

    #[test]
    fn a_labelled_counter_renders_one_sample_per_label_value() {
        let m = Metrics::new();
        m.messages_dropped(DropReason::SlowSubscriber, 2);
        m.messages_dropped(DropReason::OfflineQueueFull, 1);
        m.messages_dropped(DropReason::SlowSubscriber, 1);
        m.plugin_failed("dedup");
        m.dead_letter("upstream_refused", 4);
        m.invalid_topic("nul", "r1");
        m.received(7);
        let text = m.encode();
        let s = samples(&text);
        assert_eq!(
            s["edgehub_messages_dropped_total{reason=\"slow_subscriber\"}"], 3.0,
            "{text}"
        );
        assert_eq!(
            s["edgehub_messages_dropped_total{reason=\"offline_queue_full\"}"], 1.0,
            "{text}"
        );
        assert_eq!(
            s["edgehub_messages_dropped_total{reason=\"store_refused\"}"], 0.0,
            "{text}"
        );
        assert_eq!(
            s["edgehub_messages_dropped_total{reason=\"corrupt_record\"}"], 0.0,
            "{text}"
        );
        assert_eq!(
            s["edgehub_plugin_failures_total{plugin=\"dedup\"}"], 1.0,
            "{text}"
        );
        assert_eq!(
            s["edgehub_dead_letters_total{reason=\"upstream_refused\"}"], 4.0,
            "{text}"
        );
        assert_eq!(
            s["edgehub_invalid_topics_total{reason=\"nul\",route=\"r1\"}"], 1.0,
            "{text}"
        );
        assert_eq!(s["edgehub_messages_received_total"], 7.0, "{text}");
        assert!(
            text.contains("# TYPE edgehub_messages_dropped counter\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn gauges_and_unlabelled_counters_render_under_their_documented_names() {
        let m = Metrics::new();
        m.client_connected(2);
        m.client_connected(-1);
        m.upstream_addresses(&["mqtt://a:1883".into(), "mqtt://cloud:1883".into()]);
        m.set_upstream(Some("mqtt://cloud:1883"));
        m.set_dead_letter_depth(5);
        m.upstream_reconnects();
        m.plugin_log_dropped("noisy", 10);
        m.plugin_rejected("big", "file_too_large");
        m.plugin_rejected("big", "file_too_large");
        let s = samples(&m.encode());
        assert_eq!(
            s["edgehub_plugin_rejected_total{plugin=\"big\",reason=\"file_too_large\"}"],
            2.0
        );
        assert_eq!(s["edgehub_clients_connected"], 1.0);
        assert_eq!(s["edgehub_upstream_connected"], 1.0);
        assert_eq!(
            s["edgehub_upstream_address{address=\"mqtt://cloud:1883\"}"],
            1.0
        );
        assert_eq!(
            s["edgehub_upstream_address{address=\"mqtt://a:1883\"}"],
            0.0
        );
        m.set_upstream(None);
        let after = samples(&m.encode());
        assert_eq!(
            after["edgehub_upstream_address{address=\"mqtt://cloud:1883\"}"],
            0.0
        );
        assert_eq!(after["edgehub_upstream_connected"], 0.0);
        assert_eq!(s["edgehub_dead_letter_depth"], 5.0);
        assert_eq!(s["edgehub_upstream_reconnects_total"], 1.0);
        assert_eq!(
            s["edgehub_plugin_log_dropped_total{plugin=\"noisy\"}"],
            10.0
        );
        assert_eq!(s["edgehub_queue_oldest_age_seconds"], 0.0);
    }

    #[test]
    fn a_loaded_plugin_has_its_failure_series_at_zero() {
        let m = Metrics::new();
        m.plugin_reloaded("filter-a");
        let s = samples(&m.encode());
        assert_eq!(s["edgehub_plugin_failures_total{plugin=\"filter-a\"}"], 0.0);
        assert_eq!(
            s["edgehub_plugin_log_dropped_total{plugin=\"filter-a\"}"],
            0.0
        );
        assert_eq!(s["edgehub_plugin_reloads_total"], 1.0);
    }

    #[test]
    fn the_queue_gauges_are_read_from_the_store_at_render_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let m = Metrics::new();
        let s = samples(&m.render(&store));
        assert_eq!(s["edgehub_queue_depth"], 0.0);
        assert_eq!(s["edgehub_queue_bytes"], 0.0);
    }

    #[test]
    fn a_snapshot_reads_the_counters_the_page_shows_and_each_plugins_failures() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let m = Metrics::new();
        m.received(5);
        m.messages_dropped(DropReason::SlowSubscriber, 2);
        m.messages_dropped(DropReason::StoreRefused, 1);
        m.plugin_failed("a");
        m.upstream_addresses(&["mqtt://other:1883".into(), "mqtt://cloud:1883".into()]);
        m.set_upstream(Some("mqtt://cloud:1883"));
        m.plugin_took("a", Duration::from_micros(30), 4);
        m.route_matched("r1", 4);
        m.route_waited("r1", Duration::from_millis(2), 4);
        m.set_scope_synced(7, 1_700_000_000_123);
        let s = m.snapshot(
            &store,
            &["a".into(), "b".into()],
            &["r1".into(), "r2".into()],
        );
        assert_eq!((s.received, s.dropped, s.queue_depth), (5, 3, 0));
        assert!(s.upstream_connected);
        assert_eq!(s.upstream_address.as_deref(), Some("mqtt://cloud:1883"));
        assert_eq!(s.plugin_numbers["a"].failures, 1);
        assert_eq!(s.plugin_numbers["a"].took.count, 4);
        assert_eq!(s.plugin_numbers["b"], PluginNumbers::default());
        assert_eq!(s.routes[0].name, "r1");
        assert_eq!(
            (s.routes[0].messages, s.routes[0].plugin_wait.count),
            (4, 4)
        );
        assert_eq!(
            (s.routes[1].messages, s.routes[1].plugin_wait.count),
            (0, 0)
        );
        assert_eq!(
            (s.scope_version, s.scope_synced_ms),
            (7, Some(1_700_000_000_123))
        );
    }
}
