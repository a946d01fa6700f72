//! Where a message goes: local subscribers, the durable upstream queue,
//! module inputs, and plugins on the way.
//!
//! Owns the routing decision and hands messages on; it keeps no message
//! state. Every message is offered to local subscribers. Upstream-bound
//! messages (IoT Hub telemetry topics and the configured `forward_topics`)
//! then follow the route table: with none configured, they all go upstream;
//! with one, each matching route sends the message to its sink (`$upstream`,
//! a module input, or a plugin and what follows it). When a plugin fails,
//! the route's `onError` policy decides: pass, drop, or dead-letter.
//!
//! Messages arrive as [`Message`]s and leave as the store's [`Record`]s and
//! the broker's [`Delivery`]s, sharing the message's body (no copy); only a
//! plugin call copies it (into the guest, in `plugins::boundary`).
//!
//! - `rules/`: the route language and the route table.
//! - `fields.rs`: a message as route conditions read it.
//! - `table.rs`: the live route table and the hub's default time to live.

pub mod fields;
pub mod rules;
pub mod table;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use self::fields::MessageFields;
use self::rules::{OnError, Route, Sink};
use crate::broker::{BrokerHandle, Delivery};
use crate::inputs::ModuleInputs;
use crate::mailbox::MailboxError;
use crate::message::dialect::{self, Telemetry};
use crate::message::{Headers, Message};
use crate::metrics::Metrics;
use crate::plugins::boundary::Verdicts;
use crate::plugins::{CallFailure, Destination, PluginPool, Registry, Verdict};
use crate::store::{AppendError, Appender, Record};
use crate::topic;

pub use table::Routes;

/// The outcome of making a batch durable.
pub type Durable = oneshot::Receiver<Result<(), AppendError>>;

/// The plugin side of routing: what is loaded and where calls run.
#[derive(Clone)]
pub struct PluginHost {
    pub registry: Arc<Registry>,
    pub pool: PluginPool,
}

#[derive(Clone)]
pub struct Router {
    forward_topics: Arc<Vec<String>>,
    appender: Appender,
    broker: BrokerHandle,
    inputs: Arc<ModuleInputs>,
    edge_id: Arc<str>,
    routes: Routes,
    plugins: Option<PluginHost>,
    metrics: Arc<Metrics>,
    /// The longest topic stored (see [`topic::check_name`]).
    max_topic_bytes: usize,
}

/// What routing one batch produced.
#[derive(Default)]
struct Deliveries {
    records: Vec<Record>,
    /// Every message of the batch, for local subscribers.
    local: Vec<Delivery>,
    /// What routes and plugins sent to module inputs: (endpoint, record).
    module_inputs: Vec<(String, Record)>,
    /// Messages a plugin worker never answered for (it died): the batch is
    /// then refused, so the publisher sends it again.
    unanswered: usize,
}

/// Where routed messages go: the upstream queue, local subscribers,
/// module inputs.
pub struct Sinks {
    pub appender: Appender,
    pub broker: BrokerHandle,
    pub inputs: Arc<ModuleInputs>,
}

impl Router {
    pub fn new(
        forward_topics: Vec<String>,
        sinks: Sinks,
        edge_id: &str,
        routes: Routes,
        plugins: Option<PluginHost>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let Sinks {
            appender,
            broker,
            inputs,
        } = sinks;
        Self {
            forward_topics: Arc::new(forward_topics),
            appender,
            broker,
            inputs,
            edge_id: edge_id.into(),
            routes,
            plugins,
            metrics,
            max_topic_bytes: topic::MAX_LEN,
        }
    }

    /// Stores no topic longer than `max` bytes (at most MQTT's 65,535).
    pub fn with_max_topic_bytes(mut self, max: usize) -> Self {
        self.max_topic_bytes = max.min(topic::MAX_LEN);
        self
    }

    /// The longest topic stored.
    pub fn max_topic_bytes(&self) -> usize {
        self.max_topic_bytes
    }

    /// Whether a message on `topic` is bound upstream (before routes).
    pub fn upstream_bound(&self, topic: &str) -> bool {
        Telemetry::parse(topic).is_some()
            || self.forward_topics.iter().any(|f| topic::matches(f, topic))
    }

    /// Sends `local` and `upstream` to local subscribers and routes
    /// `upstream`. Returns the durability outcome when anything went to the
    /// store.
    pub async fn dispatch(&self, local: Vec<Message>, upstream: Vec<Message>) -> Option<Durable> {
        let out = self.deliveries(local, upstream).await;
        if out.unanswered > 0 {
            tracing::error!(
                messages = out.unanswered,
                "a plugin worker did not answer; the batch is refused"
            );
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(AppendError::Storage("plugin host failed".into())));
            if !out.records.is_empty() {
                let _ = self.appender.append_later(out.records).await;
            }
            return Some(rx);
        }
        if !out.local.is_empty() {
            self.broker.publish(out.local).await;
        }
        // Reserved now, so a sender's module inputs keep its order.
        let inputs = (!out.module_inputs.is_empty()).then(|| {
            let reservation = self.inputs.reserve(out.module_inputs);
            let inputs = self.inputs.clone();
            tokio::spawn(async move { inputs.store(reservation).await })
        });
        let upstream = if out.records.is_empty() {
            None
        } else {
            Some(match self.appender.append_later(out.records).await {
                Ok(rx) => rx,
                Err(e) => {
                    // The caller accounts for the refusal, as for a late one.
                    let (tx, rx) = oneshot::channel();
                    let _ = tx.send(Err(e));
                    rx
                }
            })
        };
        let Some(inputs) = inputs else {
            return upstream;
        };
        // Durable once both the queue and the module inputs are.
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let stored = match inputs.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(MailboxError::NoRoom(no_room))) => Err(AppendError::NoRoom(no_room)),
                Ok(Err(e)) => Err(AppendError::Storage(e.to_string())),
                Err(e) => Err(AppendError::Storage(e.to_string())),
            };
            let outcome = match (stored, upstream) {
                (Err(e), _) => Err(e),
                (Ok(()), None) => Ok(()),
                (Ok(()), Some(upstream)) => upstream.await.unwrap_or(Err(AppendError::Closed)),
            };
            let _ = tx.send(outcome);
        });
        Some(rx)
    }

    /// Everything a batch becomes: records for the store (as the route table
    /// says) and deliveries for local subscribers (the whole batch, module
    /// inputs), each sharing its message's body.
    async fn deliveries(&self, local: Vec<Message>, upstream: Vec<Message>) -> Deliveries {
        let mut out = match self.routes.table() {
            None => {
                let mut out = Deliveries::default();
                for m in &upstream {
                    let (topic, body) = (&m.topic, m.body.clone());
                    self.store_upstream(&mut out, None, topic, body, m.enqueued_ms);
                }
                out
            }
            Some(table) => self.route(&table, &upstream).await,
        };
        out.local = local.into_iter().chain(upstream).map(delivery).collect();
        out
    }

    /// Applies the route table to a batch. The messages of the batch bound
    /// for the same plugin route go to its worker as one job (a batch filter
    /// gets them in one call); jobs are submitted first and awaited after.
    async fn route(&self, table: &rules::RouteTable, upstream: &[Message]) -> Deliveries {
        let mut out = Deliveries::default();
        // Per plugin route (in table order): the messages it takes.
        let mut jobs: Vec<(&Route, Vec<Message>)> = Vec::new();
        // Messages each route matched (by its index in the table).
        let mut matched = vec![0u64; table.routes().len()];
        for m in upstream {
            let fields = MessageFields::new(m);
            let mut sent_upstream = false;
            let mut sent_inputs: Vec<(&str, &str)> = Vec::new();
            let matching = table.routes().iter().zip(matched.iter_mut());
            for (route, count) in matching.filter(|(r, _)| r.matches_lazily(|| m.source(), &fields))
            {
                *count += 1;
                match &route.sink {
                    // The same message to the same endpoint once, however
                    // many routes lead there.
                    Sink::Upstream if !sent_upstream => {
                        sent_upstream = true;
                        let (topic, body) = (&m.topic, m.body.clone());
                        self.store_upstream(&mut out, Some(route), topic, body, m.enqueued_ms);
                    }
                    Sink::ModuleInput { module, input }
                        if !sent_inputs.contains(&(module.as_str(), input.as_str())) =>
                    {
                        sent_inputs.push((module, input));
                        self.to_module(&mut out, module, input, m, route.ttl_secs);
                    }
                    Sink::Plugin { .. } => {
                        match jobs.iter_mut().find(|(r, _)| std::ptr::eq(*r, route)) {
                            Some((_, ms)) => ms.push(m.clone()),
                            None => jobs.push((route, vec![m.clone()])),
                        }
                    }
                    _ => {}
                }
            }
        }
        for (route, n) in table.routes().iter().zip(matched) {
            if n > 0 {
                self.metrics.route_matched(&route.name, n);
            }
        }
        let submitted = std::time::Instant::now();
        let pending: Vec<_> = jobs
            .into_iter()
            .map(|(route, messages)| {
                let Sink::Plugin { name, .. } = &route.sink else {
                    unreachable!("only plugin routes have jobs")
                };
                (route, messages.len(), self.submit(name, messages))
            })
            .collect();
        for (route, sent, answers) in pending {
            let answers = answers.await;
            self.metrics
                .route_waited(&route.name, submitted.elapsed(), sent as u64);
            out.unanswered += sent - answers.len();
            for (m, answer) in answers {
                self.after_plugin(&mut out, route, &route.sink, m, answer)
                    .await;
            }
        }
        out
    }

    /// Hands `messages` to plugin `name`; one answer each, in order, with
    /// the message it answers (fewer when its worker died). A plugin not
    /// loaded while the hub is still reading its plugins folder (compiling
    /// at start) is waited for; one not loaded after that is not loaded.
    fn submit(
        &self,
        name: &str,
        messages: Vec<Message>,
    ) -> impl std::future::Future<Output = Verdicts> {
        let job = match &self.plugins {
            Some(h) => match h.registry.get(name) {
                Some(plugin) => Ok(h.pool.submit(plugin, messages)),
                None => Err((Some((h.clone(), name.to_owned())), messages)),
            },
            None => Err((None, messages)),
        };
        async move {
            let (waiting, messages) = match job {
                Ok(verdicts) => return verdicts.await,
                Err(not_loaded) => not_loaded,
            };
            if let Some((h, name)) = waiting {
                if let Some(plugin) = h.registry.get_when_read(&name).await {
                    return h.pool.submit(plugin, messages).await;
                }
            }
            messages
                .into_iter()
                .map(|m| (m, Err(CallFailure::NotLoaded)))
                .collect()
        }
    }

    /// Sends on what a plugin returned, or applies the route's failure policy.
    async fn after_plugin(
        &self,
        out: &mut Deliveries,
        route: &Route,
        sink: &Sink,
        input: Message,
        result: Result<Verdict, CallFailure>,
    ) {
        let Sink::Plugin { name, then } = sink else {
            return;
        };
        let next = then.as_deref().unwrap_or(&Sink::Upstream);
        // A filtered message bound upstream must have a topic that can be
        // stored and sent: one that cannot is the plugin's bad result, and
        // the route's failure policy decides (never the store).
        let result = match result {
            Ok(Verdict::Filtered(Some(m))) if matches!(next, Sink::Upstream) => {
                match topic::check_name(&dialect::upstream_topic(&m), self.max_topic_bytes) {
                    Ok(()) => Ok(Verdict::Filtered(Some(m))),
                    Err(e) => {
                        self.metrics.invalid_topic(e.reason(), &route.name);
                        tracing::warn!(route = %route.name, plugin = %name, error = %e, policy = ?route.on_error, "plugin returned a topic that cannot be sent upstream");
                        Err(CallFailure::BadOutput(format!("topic refused: {e}")))
                    }
                }
            }
            other => other,
        };
        match result {
            // Unchanged, so bound upstream it is stored on the topic it was
            // published on, as by a route straight to $upstream.
            Ok(Verdict::Kept) if matches!(next, Sink::Upstream) => {
                let (topic, body) = (&input.topic, input.body.clone());
                self.store_upstream(out, Some(route), topic, body, input.enqueued_ms);
            }
            Ok(Verdict::Kept) => Box::pin(self.deliver(out, route, next, input)).await,
            Ok(Verdict::Filtered(Some(m))) => Box::pin(self.deliver(out, route, next, m)).await,
            Ok(Verdict::Filtered(None)) => self.metrics.filtered_out(1),
            Ok(Verdict::Routed(destinations)) => {
                if destinations.is_empty() {
                    self.metrics.filtered_out(1);
                }
                for d in destinations {
                    match d {
                        Destination::Upstream => self.to_upstream(out, route, &input),
                        Destination::ModuleInput { module, input: i } => {
                            self.to_module(out, &module, &i, &input, route.ttl_secs)
                        }
                        Destination::Drop => self.metrics.filtered_out(1),
                    }
                }
            }
            Err(failure) => {
                if matches!(failure, CallFailure::NotLoaded) {
                    // Failures of a running plugin are counted by the pool.
                    self.metrics.plugin_failed(name);
                    tracing::warn!(route = %route.name, plugin = %name, policy = ?route.on_error, "route names a plugin that is not loaded");
                }
                self.on_failure(out, route, name, next, input, failure)
                    .await
            }
        }
    }

    /// Applies the route's `onError` policy to a message its plugin failed on.
    async fn on_failure(
        &self,
        out: &mut Deliveries,
        route: &Route,
        plugin: &str,
        next: &Sink,
        input: Message,
        failure: CallFailure,
    ) {
        match route.on_error {
            OnError::Pass => Box::pin(self.deliver(out, route, next, input)).await,
            OnError::Drop => self.metrics.filtered_out(1),
            OnError::DeadLetter => {
                self.metrics.dead_lettered(1);
                let dead = self.dead_letter(route, plugin, &input, &failure);
                let (topic, payload) = (&dead.topic, dead.payload);
                self.store_upstream(out, Some(route), topic, payload, dead.enqueued_ms);
            }
        }
    }

    /// Sends `m` to `sink` (after a filter plugin).
    async fn deliver(&self, out: &mut Deliveries, route: &Route, sink: &Sink, m: Message) {
        match sink {
            Sink::Upstream => self.to_upstream(out, route, &m),
            Sink::ModuleInput { module, input } => {
                self.to_module(out, module, input, &m, route.ttl_secs)
            }
            Sink::Plugin { name, .. } => {
                let answers = self.submit(name, vec![m]).await;
                out.unanswered += 1 - answers.len();
                for (m, answer) in answers {
                    self.after_plugin(out, route, sink, m, answer).await;
                }
            }
        }
    }

    fn to_upstream(&self, out: &mut Deliveries, route: &Route, m: &Message) {
        let topic = dialect::upstream_topic(m);
        let body = m.body.clone();
        self.store_upstream(out, Some(route), &topic, body, m.enqueued_ms);
    }

    /// Queues a record for the store, if its topic can be stored and sent
    /// upstream; otherwise the message is refused here, logged and counted,
    /// so no message can poison the queue. It waits in the lane of the
    /// route's priority, with the route's time to live (with no route
    /// table: lane 0, the hub's default).
    fn store_upstream(
        &self,
        out: &mut Deliveries,
        route: Option<&Route>,
        topic: &str,
        payload: Bytes,
        enqueued_ms: u64,
    ) {
        match topic::check_name(topic, self.max_topic_bytes) {
            Ok(()) => out.records.push(Record {
                enqueued_ms,
                topic: topic.to_string(),
                payload,
                ttl_secs: route.and_then(|r| r.ttl_secs),
                priority: route.map_or(0, |r| r.priority),
            }),
            Err(e) => {
                let route = route.map_or("", |r| r.name.as_str());
                self.metrics.invalid_topic(e.reason(), route);
                let shown: String = topic.chars().take(128).collect();
                tracing::warn!(route, topic = %shown.escape_debug(), error = %e, "message not stored: its topic cannot be sent upstream");
            }
        }
    }

    fn to_module(
        &self,
        out: &mut Deliveries,
        module: &str,
        input: &str,
        m: &Message,
        ttl_secs: Option<u32>,
    ) {
        if !dialect::valid_segment(module) || !dialect::valid_segment(input) {
            tracing::warn!(module, input, "not a deliverable module input (wildcards or slashes); message not delivered there");
            return;
        }
        let record = Record {
            enqueued_ms: m.enqueued_ms,
            topic: dialect::module_input_topic(&self.edge_id, module, input, m),
            payload: m.body.clone(),
            ttl_secs,
            priority: 0,
        };
        out.module_inputs
            .push((crate::inputs::endpoint(module, input), record));
    }

    /// The dead-letter form of `m`: stored and sent upstream as telemetry of
    /// the hub's own `$edgeHub` module, output `deadletter`, saying which
    /// route failed, why, and where the message came from.
    fn dead_letter(
        &self,
        route: &Route,
        plugin: &str,
        m: &Message,
        failure: &CallFailure,
    ) -> Record {
        let mut headers = Headers {
            source: String::new(),
            properties: m.properties().to_vec(),
            // Content type, message id… stay; the output is the dead-letter one.
            system_properties: m
                .system_properties()
                .iter()
                .filter(|(k, _)| k != "$outputName")
                .cloned()
                .chain([("$outputName".to_string(), "deadletter".to_string())])
                .collect(),
        };
        headers.properties.extend([
            ("deadLetterRoute".to_string(), route.name.clone()),
            (
                "deadLetterReason".to_string(),
                format!("plugin {plugin:?} {failure}"),
            ),
            ("originalSource".to_string(), m.source().to_string()),
            // Cut, so a long original cannot make the dead letter unsendable.
            (
                "originalTopic".to_string(),
                m.topic.chars().take(512).collect(),
            ),
        ]);
        let topic = format!("devices/{}/modules/$edgeHub/messages/events/", self.edge_id);
        let dead = m.derived(topic, m.body.clone(), m.enqueued_ms, headers);
        Record {
            enqueued_ms: m.enqueued_ms,
            topic: dialect::upstream_topic(&dead),
            payload: dead.body,
            ttl_secs: route.ttl_secs,
            priority: route.priority,
        }
    }
}

/// A message as the local broker delivers it (its body shared, not copied).
fn delivery(m: Message) -> Delivery {
    Delivery {
        topic: m.topic,
        payload: m.body,
        qos: m.qos,
        retain: m.retain,
        dup: false,
        receipt: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker;
    use crate::store::{self, Store};

    /// A router over a real store writer and broker, with `routes`.
    fn router_with(routes: Option<&str>) -> (Router, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (appender, _writer) = store::writer::spawn(store.clone(), u64::MAX, 64);
        let metrics = Arc::new(Metrics::new());
        let (broker, _) = broker::spawn(16, metrics.clone());
        let ttl = Arc::new(std::sync::atomic::AtomicU64::new(3_600_000));
        let bounds = crate::inputs::DEFAULT_BOUNDS;
        let (inputs, _settler) =
            ModuleInputs::open(&store, broker.clone(), ttl, bounds, metrics.clone()).unwrap();
        let table = routes.map(|r| rules::RouteTable::new(vec![Route::parse("r", r).unwrap()]));
        let sinks = Sinks {
            appender,
            broker,
            inputs,
        };
        let router = Router::new(Vec::new(), sinks, "edge", Routes::new(table), None, metrics);
        (router, dir)
    }

    fn telemetry(body: &Bytes) -> Message {
        let topic = "devices/d1/messages/events/a=1".to_string();
        Message::published("d1".into(), topic, body.clone(), 1, false, 5)
    }

    #[tokio::test]
    async fn without_routes_the_stored_record_and_local_subscribers_share_the_published_body() {
        let (router, _dir) = router_with(None);
        let body = Bytes::from(vec![7u8; 100]);
        let out = router.deliveries(Vec::new(), vec![telemetry(&body)]).await;
        assert_eq!(out.records.len(), 1);
        assert_eq!(out.records[0].topic, "devices/d1/messages/events/a=1");
        assert_eq!(out.records[0].payload.as_ptr(), body.as_ptr());
        assert_eq!(out.local.len(), 1);
        assert_eq!(out.local[0].payload.as_ptr(), body.as_ptr());
    }

    #[tokio::test]
    async fn routes_without_plugins_send_the_body_on_without_copying_it() {
        let (router, _dir) = router_with(Some("FROM /messages/* INTO $upstream"));
        let body = Bytes::from(vec![7u8; 100]);
        let out = router.deliveries(Vec::new(), vec![telemetry(&body)]).await;
        assert_eq!(out.records.len(), 1);
        assert_eq!(out.records[0].payload.as_ptr(), body.as_ptr());

        let to_module = r#"FROM /messages/* INTO BrokeredEndpoint("/modules/alerts/inputs/in1")"#;
        let (router, _dir) = router_with(Some(to_module));
        let out = router.deliveries(Vec::new(), vec![telemetry(&body)]).await;
        assert!(out.records.is_empty());
        assert_eq!(out.module_inputs.len(), 1);
        assert_eq!(
            out.module_inputs[0].1.topic,
            "devices/edge/modules/alerts/inputs/in1/a=1"
        );
        assert_eq!(out.module_inputs[0].1.payload.as_ptr(), body.as_ptr());
    }
}
