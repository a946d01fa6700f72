//! Counters and gauges, and the Prometheus text endpoint that serves them.
//!
//! Owns the numbers only; each module bumps its own. Queue depth, bytes and
//! age are read from the store at scrape time. The endpoint is a minimal
//! HTTP/1.1 responder (any request gets the metrics page), enough for
//! Prometheus and curl without pulling in an HTTP stack.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::store::{self, Store};

#[derive(Default)]
pub struct Metrics {
    clients_connected: AtomicI64,
    received: AtomicU64,
    forwarded: AtomicU64,
    expired: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
    upstream_connected: AtomicI64,
    scope_identities: AtomicI64,
    auth_refused: AtomicU64,
    authz_refused: AtomicU64,
    plugin_calls: AtomicU64,
    plugin_failures: AtomicU64,
    plugin_reloads: AtomicU64,
    plugin_rejected: AtomicU64,
    filtered_out: AtomicU64,
    dead_lettered: AtomicU64,
    dead_letters: AtomicU64,
    invalid_topics: AtomicU64,
    plugin_log_dropped: AtomicU64,
}

impl Metrics {
    pub fn client_connected(&self, delta: i64) {
        self.clients_connected.fetch_add(delta, Ordering::Relaxed);
    }
    pub fn received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
    }
    pub fn forwarded(&self, n: u64) {
        self.forwarded.fetch_add(n, Ordering::Relaxed);
    }
    pub fn expired(&self, n: u64) {
        self.expired.fetch_add(n, Ordering::Relaxed);
    }
    pub fn dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }
    pub fn refused(&self, n: u64) {
        self.refused.fetch_add(n, Ordering::Relaxed);
    }
    pub fn set_scope_identities(&self, n: usize) {
        self.scope_identities.store(n as i64, Ordering::Relaxed);
    }
    pub fn authz_refused(&self, n: u64) {
        self.authz_refused.fetch_add(n, Ordering::Relaxed);
    }
    pub fn auth_refused(&self, n: u64) {
        self.auth_refused.fetch_add(n, Ordering::Relaxed);
    }
    pub fn plugin_calls(&self, n: u64) {
        self.plugin_calls.fetch_add(n, Ordering::Relaxed);
    }
    pub fn plugin_failed(&self) {
        self.plugin_failures.fetch_add(1, Ordering::Relaxed);
    }
    pub fn plugin_reloaded(&self) {
        self.plugin_reloads.fetch_add(1, Ordering::Relaxed);
    }
    pub fn plugin_rejected(&self) {
        self.plugin_rejected.fetch_add(1, Ordering::Relaxed);
    }
    pub fn filtered_out(&self, n: u64) {
        self.filtered_out.fetch_add(n, Ordering::Relaxed);
    }
    pub fn dead_lettered(&self, n: u64) {
        self.dead_lettered.fetch_add(n, Ordering::Relaxed);
    }
    pub fn dead_letter(&self, _reason: &str, n: u64) {
        self.dead_letters.fetch_add(n, Ordering::Relaxed);
    }
    pub fn invalid_topic(&self, _reason: &str, _route: &str) {
        self.invalid_topics.fetch_add(1, Ordering::Relaxed);
    }
    /// Lines of `plugin`'s `host.log` dropped by its rate limit.
    pub fn plugin_log_dropped(&self, _plugin: &str, n: u64) {
        self.plugin_log_dropped.fetch_add(n, Ordering::Relaxed);
    }
    pub fn set_upstream_connected(&self, up: bool) {
        self.upstream_connected.store(up as i64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, store: &Store) -> String {
        let stats = store.stats().ok();
        let age = stats
            .and_then(|s| s.oldest_ms)
            .map(|ms| store::now_ms().saturating_sub(ms) as f64 / 1000.0)
            .unwrap_or(0.0);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rows: [(&str, &str, &str, String); 22] = [
            ("edgehub_clients_connected", "gauge", "Downstream MQTT connections.", self.clients_connected.load(Ordering::Relaxed).to_string()),
            ("edgehub_messages_received_total", "counter", "PUBLISH packets received from downstream clients.", load(&self.received).to_string()),
            ("edgehub_queue_depth", "gauge", "Messages in the upstream queue.", stats.map_or(0, |s| s.depth).to_string()),
            ("edgehub_queue_bytes", "gauge", "Bytes of queued messages (the quota counts these).", stats.map_or(0, |s| s.bytes).to_string()),
            ("edgehub_queue_oldest_age_seconds", "gauge", "Age of the oldest queued message.", format!("{age:.3}")),
            ("edgehub_messages_forwarded_total", "counter", "Messages acknowledged by the upstream broker.", load(&self.forwarded).to_string()),
            ("edgehub_messages_expired_total", "counter", "Messages dropped because they outlived their time-to-live.", load(&self.expired).to_string()),
            ("edgehub_messages_dropped_total", "counter", "Messages dropped: QoS 0 refused by a full store, slow local subscribers, full offline queues.", load(&self.dropped).to_string()),
            ("edgehub_messages_refused_total", "counter", "Publishes refused because the storage quota was full.", load(&self.refused).to_string()),
            ("edgehub_upstream_connected", "gauge", "1 while connected to the upstream broker.", self.upstream_connected.load(Ordering::Relaxed).to_string()),
            ("edgehub_scope_identities", "gauge", "Identities in the device scope (0: no scope yet).", self.scope_identities.load(Ordering::Relaxed).to_string()),
            ("edgehub_auth_refused_total", "counter", "Connections refused by authentication.", load(&self.auth_refused).to_string()),
            ("edgehub_authz_refused_total", "counter", "Publishes and subscriptions refused by authorization.", load(&self.authz_refused).to_string()),
            ("edgehub_plugin_calls_total", "counter", "Messages handed to Wasm plugins.", load(&self.plugin_calls).to_string()),
            ("edgehub_plugin_failures_total", "counter", "Plugin calls that failed (timeout, memory, trap, bad result); each instance is replaced.", load(&self.plugin_failures).to_string()),
            ("edgehub_plugin_reloads_total", "counter", "Plugins loaded or replaced while running.", load(&self.plugin_reloads).to_string()),
            ("edgehub_plugin_rejected_total", "counter", "Plugin files refused (corrupt, wrong world, cannot start).", load(&self.plugin_rejected).to_string()),
            ("edgehub_messages_filtered_total", "counter", "Messages dropped by a filter plugin, a router plugin or a route's drop policy.", load(&self.filtered_out).to_string()),
            ("edgehub_dead_letters_total", "counter", "Messages moved to the store's dead-letter area (the upstream refused them).", load(&self.dead_letters).to_string()),
            ("edgehub_invalid_topics_total", "counter", "Messages whose topic could not be stored (empty, NUL, wildcard, too long).", load(&self.invalid_topics).to_string()),
            ("edgehub_messages_dead_lettered_total", "counter", "Messages sent to the dead-letter topic after a plugin failure.", load(&self.dead_lettered).to_string()),
            ("edgehub_plugin_log_dropped_total", "counter", "Plugin log lines (host.log) dropped by the per-plugin rate limit.", load(&self.plugin_log_dropped).to_string()),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        out
    }
}

/// Serves the metrics page on `addr` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    store: Store,
    shutdown: CancellationToken,
) {
    loop {
        let (mut sock, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => { tracing::warn!(error = %e, "metrics accept failed"); continue; }
            },
        };
        let body = metrics.render(&store);
        tokio::spawn(async move {
            let mut req = [0u8; 2048];
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut req)).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// Binds the metrics address (so a bad address fails start-up, not later).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
