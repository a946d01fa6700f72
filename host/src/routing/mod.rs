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
//! - `rules/`: the route language and the route table.
//! - `message.rs`: the routed view of a publish, and topics back from it.
//! - `table.rs`: the live route table and the hub's default time to live.

pub mod message;
pub mod rules;
pub mod table;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use self::message::MessageFields;
use self::rules::{OnError, Route, Sink};
use crate::broker::{BrokerHandle, Delivery};
use crate::metrics::Metrics;
use crate::mqtt::codec::Publish;
use crate::mqtt::dialect::Telemetry;
use crate::plugins::{CallFailure, Endpoint, Message, Outcome, PluginPool, Registry};
use crate::store::{self, AppendError, Appender, Record};
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
    module_inputs: Vec<Delivery>,
    /// Messages a plugin worker never answered for (it died): the batch is
    /// then refused, so the publisher sends it again.
    unanswered: usize,
}

impl Router {
    pub fn new(
        forward_topics: Vec<String>,
        appender: Appender,
        broker: BrokerHandle,
        edge_id: &str,
        routes: Routes,
        plugins: Option<PluginHost>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            forward_topics: Arc::new(forward_topics),
            appender,
            broker,
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

    /// Whether a message on `topic` is bound upstream (before routes).
    pub fn upstream_bound(&self, topic: &str) -> bool {
        Telemetry::parse(topic).is_some()
            || self.forward_topics.iter().any(|f| topic::matches(f, topic))
    }

    /// Sends `local` and `upstream` to local subscribers and routes
    /// `upstream` (published by `client_id`). Returns the durability outcome
    /// when anything went to the store.
    pub async fn dispatch(
        &self,
        client_id: &str,
        local: Vec<Publish>,
        upstream: Vec<Publish>,
    ) -> Option<Durable> {
        let now = store::now_ms();
        let out = match self.routes.table() {
            None => {
                let mut out = Deliveries::default();
                for p in &upstream {
                    self.store_upstream(&mut out, "", &p.topic, p.payload.clone(), now, None);
                }
                out
            }
            Some(table) => self.route(&table, client_id, &upstream, now).await,
        };
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
        let mut all: Vec<Delivery> = local.into_iter().chain(upstream).map(delivery).collect();
        all.extend(out.module_inputs);
        if !all.is_empty() {
            self.broker.publish(all).await;
        }
        if out.records.is_empty() {
            return None;
        }
        match self.appender.append_later(out.records).await {
            Ok(rx) => Some(rx),
            Err(e) => {
                // The caller accounts for the refusal, as for a late one.
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(Err(e));
                Some(rx)
            }
        }
    }

    /// Applies the route table to a batch. The messages of the batch bound
    /// for the same plugin route go to its worker as one job (a batch filter
    /// gets them in one call); jobs are submitted first and awaited after.
    async fn route(
        &self,
        table: &rules::RouteTable,
        client_id: &str,
        upstream: &[Publish],
        now: u64,
    ) -> Deliveries {
        let mut out = Deliveries::default();
        // Per plugin route (in table order): the messages it takes.
        let mut jobs: Vec<(&Route, Vec<Message>)> = Vec::new();
        for p in upstream {
            let m = message::from_publish(&p.topic, &p.payload, client_id, now);
            let fields = MessageFields::new(&m);
            let mut sent_upstream = false;
            let mut sent_inputs: Vec<(&str, &str)> = Vec::new();
            let matching = table.routes().iter();
            for route in matching.filter(|r| r.matches(&m.source, &fields)) {
                match &route.sink {
                    // The same message to the same endpoint once, however
                    // many routes lead there.
                    Sink::Upstream if !sent_upstream => {
                        sent_upstream = true;
                        let (name, ttl) = (&route.name, route.ttl_secs);
                        self.store_upstream(&mut out, name, &p.topic, p.payload.clone(), now, ttl);
                    }
                    Sink::ModuleInput { module, input }
                        if !sent_inputs.contains(&(module.as_str(), input.as_str())) =>
                    {
                        sent_inputs.push((module, input));
                        self.to_module(&mut out, module, input, &m);
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
            out.unanswered += sent - answers.len();
            for (m, answer) in answers {
                self.after_plugin(&mut out, route, &route.sink, m, answer)
                    .await;
            }
        }
        out
    }

    /// Hands `messages` to plugin `name`; one answer each, in order, with
    /// the message it answers.
    fn submit(
        &self,
        name: &str,
        messages: Vec<Message>,
    ) -> impl std::future::Future<Output = Vec<(Message, Result<Outcome, CallFailure>)>> {
        let plugin = self.plugins.as_ref().and_then(|h| h.registry.get(name));
        let pending = match (plugin, &self.plugins) {
            (Some(p), Some(h)) => Ok(h.pool.submit(p, messages)),
            _ => Err(messages),
        };
        async move {
            match pending {
                // The pool answers every job while routers exist; a worker
                // that died would drop its reply, and then there are no
                // messages to hand back.
                Ok(rx) => rx.await.unwrap_or_default(),
                Err(messages) => messages
                    .into_iter()
                    .map(|m| (m, Err(CallFailure::NotLoaded)))
                    .collect(),
            }
        }
    }

    /// Sends on what a plugin returned, or applies the route's failure policy.
    async fn after_plugin(
        &self,
        out: &mut Deliveries,
        route: &Route,
        sink: &Sink,
        input: Message,
        result: Result<Outcome, CallFailure>,
    ) {
        let Sink::Plugin { name, then } = sink else {
            return;
        };
        let next = then.as_deref().unwrap_or(&Sink::Upstream);
        // A filtered message bound upstream must have a topic that can be
        // stored and sent: one that cannot is the plugin's bad result, and
        // the route's failure policy decides (never the store).
        let result = match result {
            Ok(Outcome::Filtered(Some(m))) if matches!(next, Sink::Upstream) => {
                match topic::check_name(&message::upstream_topic(&m), self.max_topic_bytes) {
                    Ok(()) => Ok(Outcome::Filtered(Some(m))),
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
            Ok(Outcome::Filtered(Some(m))) => Box::pin(self.deliver(out, route, next, m)).await,
            Ok(Outcome::Filtered(None)) => self.metrics.filtered_out(1),
            Ok(Outcome::Routed(endpoints)) => {
                if endpoints.is_empty() {
                    self.metrics.filtered_out(1);
                }
                for e in endpoints {
                    match e {
                        Endpoint::Upstream => self.to_upstream(out, route, &input),
                        Endpoint::ModuleInput((module, inp)) => {
                            self.to_module(out, &module, &inp, &input)
                        }
                        Endpoint::Drop => self.metrics.filtered_out(1),
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
                self.store_upstream(
                    out,
                    &route.name,
                    &dead.topic,
                    dead.payload,
                    dead.enqueued_ms,
                    dead.ttl_secs,
                );
            }
        }
    }

    /// Sends `m` to `sink` (after a filter plugin).
    async fn deliver(&self, out: &mut Deliveries, route: &Route, sink: &Sink, m: Message) {
        match sink {
            Sink::Upstream => self.to_upstream(out, route, &m),
            Sink::ModuleInput { module, input } => self.to_module(out, module, input, &m),
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
        let topic = message::upstream_topic(m);
        let body = Bytes::copy_from_slice(&m.body);
        self.store_upstream(
            out,
            &route.name,
            &topic,
            body,
            m.enqueued_ms,
            route.ttl_secs,
        );
    }

    /// Queues a record for the store, if its topic can be stored and sent
    /// upstream; otherwise the message is refused here, logged and counted,
    /// so no message can poison the queue.
    fn store_upstream(
        &self,
        out: &mut Deliveries,
        route: &str,
        topic: &str,
        payload: Bytes,
        enqueued_ms: u64,
        ttl_secs: Option<u32>,
    ) {
        match topic::check_name(topic, self.max_topic_bytes) {
            Ok(()) => out.records.push(Record {
                enqueued_ms,
                topic: topic.to_string(),
                payload,
                ttl_secs,
            }),
            Err(e) => {
                self.metrics.invalid_topic(e.reason(), route);
                let shown: String = topic.chars().take(128).collect();
                tracing::warn!(route, topic = %shown.escape_debug(), error = %e, "message not stored: its topic cannot be sent upstream");
            }
        }
    }

    fn to_module(&self, out: &mut Deliveries, module: &str, input: &str, m: &Message) {
        if !message::valid_segment(module) || !message::valid_segment(input) {
            tracing::warn!(module, input, "not a deliverable module input (wildcards or slashes); message not delivered there");
            return;
        }
        out.module_inputs.push(Delivery {
            topic: message::module_input_topic(&self.edge_id, module, input, m),
            payload: Bytes::copy_from_slice(&m.body),
            qos: 1,
            retain: false,
            dup: false,
        });
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
        let mut dead = Message {
            source: String::new(),
            topic: format!("devices/{}/modules/$edgeHub/messages/events/", self.edge_id),
            properties: m.properties.clone(),
            // Content type, message id… stay; the output is the dead-letter one.
            system_properties: m
                .system_properties
                .iter()
                .filter(|(k, _)| k != "$outputName")
                .cloned()
                .chain([("$outputName".to_string(), "deadletter".to_string())])
                .collect(),
            body: Vec::new(),
            enqueued_ms: m.enqueued_ms,
        };
        dead.properties.extend([
            ("deadLetterRoute".to_string(), route.name.clone()),
            (
                "deadLetterReason".to_string(),
                format!("plugin {plugin:?} {failure}"),
            ),
            ("originalSource".to_string(), m.source.clone()),
            // Cut, so a long original cannot make the dead letter unsendable.
            (
                "originalTopic".to_string(),
                m.topic.chars().take(512).collect(),
            ),
        ]);
        Record {
            enqueued_ms: m.enqueued_ms,
            topic: message::upstream_topic(&dead),
            payload: Bytes::copy_from_slice(&m.body),
            ttl_secs: route.ttl_secs,
        }
    }
}

/// A received publish as the local broker delivers it.
fn delivery(p: Publish) -> Delivery {
    Delivery {
        topic: p.topic,
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        dup: false,
    }
}
