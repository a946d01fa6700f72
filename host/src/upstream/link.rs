//! The upstream link: one actor that owns the connection to the cloud.
//!
//! Owns the socket (through [`Connection`]), the cluster's addresses,
//! failover between them and fail-back to the first (probed while connected
//! elsewhere; see [`LinkConfig::failback`]), the reconnect back-off, keepalive, packet ids
//! (through [`LinkState`]), the cloud-side subscriptions, its own QoS 1
//! publishes ([`Reliable`]: method answers, device twin documents), sent on
//! every connection until acknowledged, and documents kept published at
//! QoS 0 (the hub twin's status, re-sent after every reconnect). Everything
//! else talks to
//! it through a [`LinkHandle`] and the channels [`Link::spawn`] returns:
//!
//! - publishers hand it [`Outgoing`] batches for the connection generation
//!   they were told about, and get [`LinkEvent`]s back (connected,
//!   acknowledged tags, disconnected); a batch for an older generation is
//!   dropped, so nothing meant for a dead connection leaks into the next;
//! - consumers register before the link starts, with a topic filter fixed
//!   for the link's life ([`Link::subscribe`]) or a set of filters that
//!   changes as it runs ([`Link::consumer`], [`LinkHandle::set_filters`]:
//!   one subscription per identity of the device scope, say), and receive
//!   [`CloudMessage`]s on their own bounded channel. A QoS 1 message is
//!   acknowledged to the cloud only once its consumer calls
//!   [`CloudMessage::ack`]. When a consumer is slow its messages wait here
//!   and, past [`MAX_WAITING`], the link stops reading the socket: the
//!   cloud's own flow control holds the rest. Nothing is acknowledged and
//!   then dropped.
//!
//! It does not know what is stored or why a message is sent (the forwarder
//! does), nor what a cloud message means (its consumer does).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::connection::{Connection, Login};
use super::error::UpstreamError;
use super::reliable::{self, Delivered, Pending, Reliable};
use super::sleep_until;
use super::state::{Content, Inbound, LinkState, Outgoing, StateError};
use super::transport::Connect;
use super::wire::{Incoming, Limits};
use crate::config::UpstreamAddr;
use crate::metrics::Metrics;
use crate::topic;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// A connection that lasted this long was a recovery: the next failure is
/// retried from the shortest back-off. One that a broker closes sooner
/// (it takes connections, then drops them) keeps backing off.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// A subscription the upstream refused is asked for again after this long,
/// doubling up to [`RESUBSCRIBE_MAX`] (a cluster electing its leaders, an
/// authorization not yet in place), for as long as a consumer wants it.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(5);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(60);
/// Cloud messages waiting for slow consumers before the socket is not read.
pub const MAX_WAITING: usize = 256;
/// Commands taken in one go before the write buffer is flushed.
const COMMAND_BATCH: usize = 64;

/// What the link tells its publisher.
#[derive(Debug, PartialEq)]
pub enum LinkEvent {
    /// A connection is up; publish with this generation, within `limits`.
    Connected {
        generation: u64,
        address: String,
        limits: Limits,
    },
    /// These tags are acknowledged by the cloud.
    Acked(Vec<u64>),
    /// The cloud refused the publish tagged `tag` (MQTT 5 reason code
    /// `reason`, 0x80 or above) and keeps the connection: it is not
    /// delivered, the publisher decides what next.
    Refused { tag: u64, reason: u8 },
    /// The connection of `generation` ended; nothing sent on it that was not
    /// acknowledged will be. `by_upstream`: the upstream ended it (see
    /// [`UpstreamError::closed_by_upstream`]), not the hub.
    Disconnected {
        generation: u64,
        error: String,
        by_upstream: bool,
    },
}

/// A publish from the cloud, for the consumer whose filter it matched.
#[derive(Debug)]
pub struct CloudMessage {
    pub topic: String,
    pub payload: Bytes,
    ack: Option<Ack>,
}

#[derive(Debug)]
struct Ack {
    generation: u64,
    pkid: u16,
    tx: mpsc::UnboundedSender<(u64, u16)>,
}

impl CloudMessage {
    /// A message made here, for consumers' tests.
    pub fn unacknowledged(topic: &str, payload: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            ack: None,
        }
    }

    /// The consumer has it (applied, or stored where it must last): the
    /// cloud may forget it. A message dropped without `ack` is never
    /// acknowledged and comes again after the next reconnect; until then it
    /// holds back the PUBACKs of every later one, so consumers ack every
    /// message they have dealt with, refused ones included.
    pub fn ack(mut self) {
        if let Some(a) = self.ack.take() {
            let _ = a.tx.send((a.generation, a.pkid));
        }
    }
}

enum Command {
    Publish {
        generation: u64,
        batch: Vec<Outgoing>,
    },
    Deliver {
        msg: Reliable,
        done: Option<oneshot::Sender<Delivered>>,
    },
    Keep {
        topic: String,
        payload: Bytes,
    },
    Filters {
        consumer: usize,
        filters: Vec<String>,
    },
}

/// A consumer whose filters change at run time (see [`Link::consumer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerId(usize);

/// How publishers reach the link. Cheap to clone.
#[derive(Clone)]
pub struct LinkHandle {
    tx: mpsc::Sender<Command>,
}

impl LinkHandle {
    /// Sends `batch` on the connection of `generation` (from
    /// [`LinkEvent::Connected`]); dropped if that connection is gone.
    pub async fn publish(&self, generation: u64, batch: Vec<Outgoing>) {
        let _ = self.tx.send(Command::Publish { generation, batch }).await;
    }

    /// Keeps `payload` published, retained at QoS 0, on `topic`: now if
    /// connected and again after every reconnect. For a status whose loss
    /// costs nothing: a broker may hold a connection up until a QoS 1
    /// retained publish is stored (NATS waits for its retained-message
    /// stream's leader), which [`LinkHandle::deliver`] would wait for on
    /// every connection.
    pub async fn keep_published(&self, topic: String, payload: Bytes) {
        let _ = self.tx.send(Command::Keep { topic, payload }).await;
    }

    /// Publishes `msg` at QoS 1 on the current connection and, if that
    /// one ends first, on the next ones, until the cloud acknowledges it
    /// or its time runs out; the receiver hears how it ended (nothing if
    /// the link stops first).
    pub async fn deliver(&self, msg: Reliable) -> oneshot::Receiver<Delivered> {
        let (done, rx) = oneshot::channel();
        let _ = self
            .tx
            .send(Command::Deliver {
                msg,
                done: Some(done),
            })
            .await;
        rx
    }

    /// Replaces the filters of `consumer`: new ones are subscribed and gone
    /// ones unsubscribed, now if connected, else on the next connection.
    pub async fn set_filters(&self, consumer: ConsumerId, filters: Vec<String>) {
        let cmd = Command::Filters {
            consumer: consumer.0,
            filters,
        };
        let _ = self.tx.send(cmd).await;
    }
}

struct Consumer {
    filters: Vec<String>,
    tx: mpsc::Sender<CloudMessage>,
}

/// Filters per SUBSCRIBE: a scope of thousands of identities is
/// subscribed in several packets.
const FILTERS_PER_PACKET: usize = 100;

/// Settings of the link.
pub struct LinkConfig {
    pub addresses: Vec<UpstreamAddr>,
    pub login: Login,
    pub max_backoff: Duration,
    /// While connected to any address but the first, the first is probed
    /// this often: a CONNECT as `{client id}-probe` with a clean session,
    /// then a DISCONNECT. It is up when it answers with a CONNACK that is
    /// not "server unavailable" or "busy" (a refusal of the probe's
    /// identity still shows an MQTT server at work; a node that accepts
    /// TCP but has no storage ready does not). After [`FAILBACK_PROBES`]
    /// probes in a row find it up, the link disconnects cleanly and
    /// connects to it. `None`: stay until the connection fails.
    pub failback: Option<Duration>,
}

/// Probes in a row that must find the first address up before failing
/// back to it: one node that restarts and falls again is not chased.
pub const FAILBACK_PROBES: u32 = 2;

/// How long a fail-back probe may take, from opening the transport to the
/// CONNACK.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The link before it runs: consumers subscribe here.
pub struct Link {
    config: LinkConfig,
    connector: Arc<dyn Connect>,
    consumers: Vec<Consumer>,
    metrics: Arc<Metrics>,
}

/// The running actor's state between connections.
struct Actor {
    config: LinkConfig,
    connector: Arc<dyn Connect>,
    consumers: Vec<Consumer>,
    metrics: Arc<Metrics>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::UnboundedSender<LinkEvent>,
    acks_tx: mpsc::UnboundedSender<(u64, u16)>,
    acks: mpsc::UnboundedReceiver<(u64, u16)>,
    /// Own publishes not yet acknowledged.
    pending: Pending,
    /// Documents kept published at QoS 0, by topic.
    kept: BTreeMap<String, Bytes>,
    /// Filters dropped while disconnected: unsubscribed on the next
    /// connection (the cloud keeps a persistent session's subscriptions).
    dropped: BTreeSet<String>,
    /// Cloud messages waiting for their consumer's channel to have room.
    waiting: VecDeque<(usize, CloudMessage)>,
    generation: u64,
}

impl Link {
    pub fn new(config: LinkConfig, connector: Arc<dyn Connect>, metrics: Arc<Metrics>) -> Self {
        let addresses: Vec<String> = config.addresses.iter().map(ToString::to_string).collect();
        metrics.upstream_addresses(&addresses);
        Self {
            config,
            connector,
            consumers: Vec::new(),
            metrics,
        }
    }

    /// Subscribes to `filter` on every connection; matching cloud messages
    /// arrive on the returned channel (the first matching consumer wins).
    pub fn subscribe(&mut self, filter: String, capacity: usize) -> mpsc::Receiver<CloudMessage> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.consumers.push(Consumer {
            filters: vec![filter],
            tx,
        });
        rx
    }

    /// A consumer with no filter yet: [`LinkHandle::set_filters`] gives it
    /// its filters while the link runs.
    pub fn consumer(&mut self, capacity: usize) -> (ConsumerId, mpsc::Receiver<CloudMessage>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.consumers.push(Consumer {
            filters: Vec::new(),
            tx,
        });
        (ConsumerId(self.consumers.len() - 1), rx)
    }

    /// Builds the actor without running it: the handle and the events
    /// exist at once, the actor runs wherever [`LinkActor::run`] is polled
    /// (the forwarder's thread, so their hand-offs stay on one thread).
    /// Events are unbounded: at most one `Acked` per read and one pair of
    /// connect/disconnect per connection, and the publisher bounds what is
    /// in flight.
    pub fn start(self) -> (LinkHandle, mpsc::UnboundedReceiver<LinkEvent>, LinkActor) {
        let (tx, commands) = mpsc::channel(256);
        let (events, events_rx) = mpsc::unbounded_channel();
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let actor = Actor {
            config: self.config,
            connector: self.connector,
            consumers: self.consumers,
            metrics: self.metrics,
            commands,
            events,
            acks_tx,
            acks,
            pending: Pending::default(),
            kept: BTreeMap::new(),
            dropped: BTreeSet::new(),
            waiting: VecDeque::new(),
            generation: 0,
        };
        (LinkHandle { tx }, events_rx, LinkActor(actor))
    }

    /// [`Link::start`], with the actor spawned on the current runtime.
    pub fn spawn(
        self,
        shutdown: CancellationToken,
    ) -> (
        LinkHandle,
        mpsc::UnboundedReceiver<LinkEvent>,
        JoinHandle<()>,
    ) {
        let (handle, events, actor) = self.start();
        (handle, events, tokio::spawn(actor.run(shutdown)))
    }
}

/// The link's actor, built and not yet running.
pub struct LinkActor(Actor);

impl LinkActor {
    /// Runs the link until `shutdown` (or until every handle is dropped).
    pub async fn run(self, shutdown: CancellationToken) {
        self.0.run(shutdown).await
    }
}

impl Actor {
    async fn run(mut self, shutdown: CancellationToken) {
        if self.config.addresses.is_empty() {
            tracing::info!(
                "no upstream configured: storing upstream-bound messages until one is set"
            );
        }
        let mut attempt = 0usize;
        let mut backoff = MIN_BACKOFF;
        loop {
            if !self.config.addresses.is_empty() {
                let addr = self.config.addresses[attempt % self.config.addresses.len()].clone();
                let opened = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = Connection::open(&*self.connector, &addr, &self.config.login) => r,
                };
                match opened {
                    Ok(conn) => {
                        let connected_at = Instant::now();
                        self.generation += 1;
                        let generation = self.generation;
                        tracing::info!(
                            upstream = %addr,
                            generation,
                            receive_maximum = conn.limits.receive_max,
                            maximum_packet_size = conn.limits.max_packet_size,
                            "upstream connected"
                        );
                        self.metrics.set_upstream(Some(&addr.to_string()));
                        if generation > 1 {
                            self.metrics.upstream_reconnects();
                        }
                        let _ = self.events.send(LinkEvent::Connected {
                            generation,
                            address: addr.to_string(),
                            limits: publisher_limits(conn.limits),
                        });
                        let failback = (!attempt.is_multiple_of(self.config.addresses.len()))
                            .then(|| self.config.addresses[0].clone())
                            .zip(self.config.failback);
                        let result = self.session(conn, failback, &shutdown).await;
                        self.metrics.set_upstream(None);
                        if connected_at.elapsed() >= STABLE_AFTER {
                            backoff = MIN_BACKOFF;
                        }
                        let (error, by_upstream) = match &result {
                            Ok(()) => ("shut down".to_string(), false),
                            Err(e) => (e.to_string(), e.closed_by_upstream()),
                        };
                        let _ = self.events.send(LinkEvent::Disconnected {
                            generation,
                            error,
                            by_upstream,
                        });
                        match result {
                            Ok(()) => return,
                            Err(UpstreamError::FailBack(first)) => {
                                tracing::info!(upstream = %addr, first = %first, "the first upstream address is back: failing back to it");
                                attempt = 0;
                            }
                            Err(e) => {
                                tracing::warn!(upstream = %addr, error = %e, "upstream connection lost");
                                // A broker that takes connections but does
                                // not answer (a cluster node stuck electing
                                // leaders) is left for the next address.
                                if matches!(e, UpstreamError::State(StateError::KeepAlive)) {
                                    attempt += 1;
                                }
                            }
                        }
                    }
                    Err(e @ UpstreamError::Unusable(_)) => {
                        tracing::error!(upstream = %addr, error = %e, retry_in_ms = backoff.as_millis() as u64, "upstream not used; check its settings");
                        attempt += 1;
                    }
                    Err(e) => {
                        tracing::warn!(upstream = %addr, error = %e, retry_in_ms = backoff.as_millis() as u64, "upstream unreachable");
                        attempt += 1;
                    }
                }
            }
            // Between connections: keep taking commands (documents to keep;
            // publishes for a dead generation are dropped) until the wait ends.
            let until = Instant::now() + backoff;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(until), if !self.config.addresses.is_empty() => break,
                    cmd = self.commands.recv() => match cmd {
                        Some(Command::Deliver { msg, done }) => {
                            self.pending.push(msg, done);
                            self.pending.expire(Instant::now());
                        }
                        Some(Command::Keep { topic, payload }) => {
                            self.kept.insert(topic, payload);
                        }
                        Some(Command::Filters { consumer, filters }) => {
                            let (_, gone) = self.set_filters(consumer, filters);
                            self.dropped.extend(gone);
                        }
                        Some(Command::Publish { .. }) => {}
                        None => return,
                    },
                }
            }
            backoff = (backoff * 2).min(self.config.max_backoff.max(MIN_BACKOFF));
        }
    }

    /// Replaces a consumer's filters; returns the filters added and gone.
    fn set_filters(&mut self, consumer: usize, filters: Vec<String>) -> (Vec<String>, Vec<String>) {
        let Some(c) = self.consumers.get_mut(consumer) else {
            return Default::default();
        };
        let old: BTreeSet<String> = c.filters.iter().cloned().collect();
        let new: BTreeSet<String> = filters.into_iter().collect();
        c.filters = new.iter().cloned().collect();
        let still = |f: &String| self.consumers.iter().any(|c| c.filters.contains(f));
        let added: Vec<String> = new.difference(&old).cloned().collect();
        let gone: Vec<String> = old
            .difference(&new)
            .filter(|f| !still(f))
            .cloned()
            .collect();
        for f in &added {
            self.dropped.remove(f);
        }
        (added, gone)
    }

    /// Sends what of the own publishes the connection has room for.
    fn send_pending(
        &mut self,
        state: &mut LinkState,
        conn: &mut Connection,
    ) -> Result<(), UpstreamError> {
        for o in self.pending.due(Instant::now()) {
            state.publish(&o, &mut conn.write_buf)?;
        }
        Ok(())
    }

    /// Runs one connection until it fails (`Err`) or `shutdown` (`Ok`).
    async fn session(
        &mut self,
        conn: Connection,
        failback: Option<(UpstreamAddr, Duration)>,
        shutdown: &CancellationToken,
    ) -> Result<(), UpstreamError> {
        let mut state = LinkState::new(self.generation, conn.wire());
        let result = self.serve(conn, &mut state, failback, shutdown).await;
        // The cloud may never have seen them: unsubscribe on the next one,
        // unless a consumer wants the filter again by then.
        for f in state.unanswered_unsubscribes() {
            if !self.consumers.iter().any(|c| c.filters.contains(&f)) {
                self.dropped.insert(f);
            }
        }
        result
    }

    /// [`Actor::session`]'s loop.
    async fn serve(
        &mut self,
        mut conn: Connection,
        state: &mut LinkState,
        failback: Option<(UpstreamAddr, Duration)>,
        shutdown: &CancellationToken,
    ) -> Result<(), UpstreamError> {
        // Messages waiting for consumers came from the previous connection:
        // they are delivered but their acknowledgements are stale, so the
        // cloud (persistent session) sends them again.
        let filters: Vec<String> = self
            .consumers
            .iter()
            .flat_map(|c| c.filters.iter().cloned())
            .collect();
        for chunk in filters.chunks(FILTERS_PER_PACKET) {
            state.subscribe(chunk, &mut conn.write_buf);
        }
        let dropped: Vec<String> = std::mem::take(&mut self.dropped).into_iter().collect();
        for chunk in dropped.chunks(FILTERS_PER_PACKET) {
            state.unsubscribe(chunk, &mut conn.write_buf);
        }
        for (topic, payload) in &self.kept {
            state.publish(&kept(topic, payload), &mut conn.write_buf)?;
        }
        self.pending.connected(own_in_flight(conn.limits));
        self.send_pending(state, &mut conn)?;
        let keep_alive = Duration::from_secs(self.config.login.keep_alive.max(1) as u64);
        let mut ping_due = Instant::now() + keep_alive;
        let mut probe = Probe::new(failback, &self.config.login);
        let mut refused = Refused::default();
        loop {
            conn.flush().await?;
            let probe_due = probe.due;
            let resubscribe_due = refused.due;
            let reading = self.waiting.len() < MAX_WAITING;
            let front = self
                .waiting
                .front()
                .map(|(i, _)| self.consumers[*i].tx.clone());
            tokio::select! {
                _ = shutdown.cancelled() => {
                    conn.wire().disconnect(&mut conn.write_buf);
                    let _ = conn.flush().await;
                    return Ok(());
                }
                cmd = self.commands.recv() => {
                    let Some(cmd) = cmd else { return Ok(()) };
                    self.command(cmd, state, &mut conn)?;
                    for _ in 0..COMMAND_BATCH {
                        match self.commands.try_recv() {
                            Ok(cmd) => self.command(cmd, state, &mut conn)?,
                            Err(_) => break,
                        }
                    }
                }
                Some((generation, pkid)) = self.acks.recv() => {
                    state.consumed(generation, pkid, &mut conn.write_buf);
                    while let Ok((generation, pkid)) = self.acks.try_recv() {
                        state.consumed(generation, pkid, &mut conn.write_buf);
                    }
                }
                permit = async { front.expect("guarded").reserve_owned().await }, if front.is_some() => {
                    if let (Ok(permit), Some((_, msg))) = (permit, self.waiting.pop_front()) {
                        permit.send(msg);
                    }
                    self.deliver_waiting();
                }
                packet = conn.next(), if reading => {
                    let mut acked = Vec::new();
                    let mut packet = Some(packet?);
                    while let Some(p) = packet {
                        if let Incoming::Disconnect { reason } = p {
                            return Err(UpstreamError::Disconnected(reason));
                        }
                        refused.add(self.receive(state, p, &mut acked, &mut conn));
                        if self.waiting.len() >= MAX_WAITING {
                            break;
                        }
                        packet = conn.try_next()?;
                    }
                    if !acked.is_empty() {
                        let _ = self.events.send(LinkEvent::Acked(acked));
                    }
                    // Acknowledgements made room for more.
                    self.send_pending(state, &mut conn)?;
                }
                _ = tokio::time::sleep_until(ping_due) => {
                    state.keepalive_due(&mut conn.write_buf)?;
                    ping_due = Instant::now() + keep_alive;
                }
                _ = sleep_until(resubscribe_due), if resubscribe_due.is_some() => {
                    let wanted: Vec<String> = refused
                        .take()
                        .filter(|f| self.consumers.iter().any(|c| c.filters.contains(f)))
                        .collect();
                    for chunk in wanted.chunks(FILTERS_PER_PACKET) {
                        state.subscribe(chunk, &mut conn.write_buf);
                    }
                }
                _ = tokio::time::sleep_until(probe_due), if probe.idle() => probe.start(&self.connector),
                up = probe.result(), if probe.running() => {
                    if let Some(first) = probe.finished(up) {
                        conn.wire().disconnect(&mut conn.write_buf);
                        let _ = conn.flush().await;
                        return Err(UpstreamError::FailBack(first.to_string()));
                    }
                }
            }
        }
    }

    fn command(
        &mut self,
        cmd: Command,
        state: &mut LinkState,
        conn: &mut Connection,
    ) -> Result<(), UpstreamError> {
        match cmd {
            Command::Publish { generation, batch } => {
                if generation != state.generation() {
                    return Ok(());
                }
                for o in &batch {
                    state.publish(o, &mut conn.write_buf)?;
                }
            }
            Command::Deliver { msg, done } => {
                self.pending.push(msg, done);
                self.send_pending(state, conn)?;
            }
            Command::Keep { topic, payload } => {
                state.publish(&kept(&topic, &payload), &mut conn.write_buf)?;
                self.kept.insert(topic, payload);
            }
            Command::Filters { consumer, filters } => {
                let (added, gone) = self.set_filters(consumer, filters);
                for chunk in added.chunks(FILTERS_PER_PACKET) {
                    state.subscribe(chunk, &mut conn.write_buf);
                }
                for chunk in gone.chunks(FILTERS_PER_PACKET) {
                    state.unsubscribe(chunk, &mut conn.write_buf);
                }
            }
        }
        Ok(())
    }

    /// Takes one packet from the upstream; returns the filters it refused.
    fn receive(
        &mut self,
        state: &mut LinkState,
        packet: Incoming,
        acked: &mut Vec<u64>,
        conn: &mut Connection,
    ) -> Vec<String> {
        match state.receive(packet) {
            Inbound::Acked(tag) if Pending::owns(tag) => self.pending.answered(tag, None),
            Inbound::Refused { tag, reason } if Pending::owns(tag) => {
                tracing::error!(reason, "the upstream refused a publish of the hub's own");
                self.pending.answered(tag, Some(reason));
            }
            Inbound::Acked(tag) => acked.push(tag),
            Inbound::Refused { tag, reason } => {
                // Acknowledgements before it go first: order is kept.
                if !acked.is_empty() {
                    let _ = self.events.send(LinkEvent::Acked(std::mem::take(acked)));
                }
                let _ = self.events.send(LinkEvent::Refused { tag, reason });
            }
            Inbound::Cloud {
                topic,
                payload,
                pkid,
            } => {
                let consumer = self
                    .consumers
                    .iter()
                    .position(|c| c.filters.iter().any(|f| topic::matches(f, &topic)));
                let Some(index) = consumer else {
                    tracing::debug!(%topic, "cloud message on a topic nothing consumes");
                    if let Some(pkid) = pkid {
                        state.consumed(state.generation(), pkid, &mut conn.write_buf);
                    }
                    return Vec::new();
                };
                let msg = CloudMessage {
                    topic,
                    payload,
                    ack: pkid.map(|pkid| Ack {
                        generation: state.generation(),
                        pkid,
                        tx: self.acks_tx.clone(),
                    }),
                };
                self.waiting.push_back((index, msg));
                self.deliver_waiting();
            }
            Inbound::SubscribeRefused(filters) => {
                for filter in &filters {
                    tracing::error!(%filter, "upstream refused the subscription; asking again later");
                }
                return filters;
            }
            Inbound::Nothing => {}
        }
        Vec::new()
    }

    /// Hands waiting cloud messages to their consumers while they have room,
    /// in arrival order.
    fn deliver_waiting(&mut self) {
        while let Some((index, _)) = self.waiting.front() {
            let tx = &self.consumers[*index].tx;
            match tx.try_reserve() {
                Ok(permit) => {
                    let (_, msg) = self.waiting.pop_front().expect("front");
                    permit.send(msg);
                }
                Err(mpsc::error::TrySendError::Full(())) => return,
                Err(mpsc::error::TrySendError::Closed(())) => {
                    let (_, msg) = self.waiting.pop_front().expect("front");
                    tracing::warn!(topic = %msg.topic, "cloud message consumer is gone; not acknowledged");
                }
            }
        }
    }
}

/// Subscriptions the upstream refused on this connection, to ask for again.
struct Refused {
    filters: BTreeSet<String>,
    /// When to ask; `None` while nothing waits.
    due: Option<Instant>,
    /// The wait before the next ask.
    delay: Duration,
}

impl Default for Refused {
    fn default() -> Self {
        Self {
            filters: BTreeSet::new(),
            due: None,
            delay: RESUBSCRIBE_AFTER,
        }
    }
}

impl Refused {
    fn add(&mut self, filters: Vec<String>) {
        if filters.is_empty() {
            return;
        }
        self.filters.extend(filters);
        if self.due.is_none() {
            self.due = Some(Instant::now() + self.delay);
            self.delay = (self.delay * 2).min(RESUBSCRIBE_MAX);
        }
    }

    /// The filters to ask for again now.
    fn take(&mut self) -> impl Iterator<Item = String> {
        self.due = None;
        std::mem::take(&mut self.filters).into_iter()
    }
}

/// Fail-back probes of the first address while connected to another.
struct Probe {
    target: Option<(UpstreamAddr, Duration)>,
    /// The hub's login under a client id of the probe's own (never taking
    /// the hub's session over), with a clean session.
    login: Login,
    due: Instant,
    running: Option<tokio::task::JoinHandle<bool>>,
    /// Probes in a row that found the first address up.
    streak: u32,
}

impl Probe {
    fn new(target: Option<(UpstreamAddr, Duration)>, login: &Login) -> Self {
        let every = target.as_ref().map_or(Duration::ZERO, |(_, every)| *every);
        let login = Login {
            client_id: format!("{}-probe", login.client_id),
            clean_session: true,
            ..login.clone()
        };
        Self {
            target,
            login,
            due: Instant::now() + every,
            running: None,
            streak: 0,
        }
    }

    fn idle(&self) -> bool {
        self.target.is_some() && self.running.is_none()
    }

    fn running(&self) -> bool {
        self.running.is_some()
    }

    /// Connects to the first address on a task of its own, so the
    /// connection keeps being served meanwhile.
    fn start(&mut self, connector: &Arc<dyn Connect>) {
        let Some((addr, _)) = self.target.clone() else {
            return;
        };
        let (connector, login) = (connector.clone(), self.login.clone());
        self.running = Some(tokio::spawn(async move {
            let opened = Connection::open(&*connector, &addr, &login);
            match tokio::time::timeout(PROBE_TIMEOUT, opened).await {
                Ok(Ok(mut conn)) => {
                    conn.wire().disconnect(&mut conn.write_buf);
                    let _ = conn.flush().await;
                    true
                }
                Ok(Err(UpstreamError::Refused(r))) => !r.unavailable,
                _ => false,
            }
        }));
    }

    async fn result(&mut self) -> bool {
        match self.running.as_mut() {
            Some(task) => task.await.unwrap_or(false),
            None => std::future::pending().await,
        }
    }

    /// Takes a probe's outcome; the address to fail back to once enough
    /// probes in a row found it up.
    fn finished(&mut self, up: bool) -> Option<&UpstreamAddr> {
        self.running = None;
        let (addr, every) = self.target.as_ref()?;
        self.due = Instant::now() + *every;
        self.streak = if up { self.streak + 1 } else { 0 };
        (self.streak >= FAILBACK_PROBES).then_some(addr)
    }
}

/// A kept document's publish: retained, QoS 0.
fn kept(topic: &str, payload: &Bytes) -> Outgoing {
    Outgoing {
        tag: 0,
        content: Content::Owned {
            topic: topic.to_string(),
            payload: payload.clone(),
        },
        qos: QoS::AtMostOnce,
        retain: true,
    }
}

/// The link's own publishes in flight at once under `limits`: a share of
/// the upstream's receive maximum, half of it at most.
fn own_in_flight(limits: Limits) -> usize {
    match limits.receive_max {
        Some(max) => (usize::from(max) / 2).clamp(1, reliable::MAX_IN_FLIGHT),
        None => reliable::MAX_IN_FLIGHT,
    }
}

/// `limits` as the publisher sees them: the receive maximum less what the
/// link's own publishes may take (an upstream that allows a single one
/// in flight is shared: one more may then be in flight).
fn publisher_limits(limits: Limits) -> Limits {
    let receive_max = limits.receive_max.map(|max| {
        let own = own_in_flight(limits) as u16;
        max.saturating_sub(own).max(1)
    });
    Limits {
        receive_max,
        ..limits
    }
}

/// An in-memory upstream for tests: the link connects through it and the
/// test plays the broker on the other end of each connection.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::HashSet;
    use std::sync::Mutex;

    use bytes::BytesMut;
    use rumqttc::mqttbytes::v4;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::sync::mpsc;

    use crate::config::UpstreamAddr;
    use crate::upstream::error::UpstreamError;
    use crate::upstream::transport::{Connect, Connecting, Io};

    /// A link to `hosts` (port 1883), signing in as `edge1`.
    pub fn config(hosts: &[&str]) -> crate::upstream::LinkConfig {
        crate::upstream::LinkConfig {
            addresses: hosts
                .iter()
                .map(|h| UpstreamAddr::parse(&format!("mqtt://{h}:1883")).unwrap())
                .collect(),
            login: crate::upstream::Login {
                client_id: "edge1".into(),
                username: None,
                password: None,
                sas: None,
                keep_alive: 60,
                clean_session: false,
                version: crate::config::MqttVersion::V311,
            },
            max_backoff: std::time::Duration::from_millis(100),
            failback: Some(std::time::Duration::from_millis(50)),
        }
    }

    /// Hands each connection's broker end to the test.
    pub struct Upstream {
        pub down: Mutex<HashSet<String>>,
        tx: mpsc::UnboundedSender<(String, Peer)>,
    }

    impl Upstream {
        pub fn new() -> (Self, mpsc::UnboundedReceiver<(String, Peer)>) {
            let (tx, rx) = mpsc::unbounded_channel();
            let up = Self {
                down: Mutex::new(HashSet::new()),
                tx,
            };
            (up, rx)
        }
    }

    impl Connect for Upstream {
        fn connect<'a>(&'a self, addr: &'a UpstreamAddr) -> Connecting<'a> {
            Box::pin(async move {
                if self.down.lock().unwrap().contains(&addr.host) {
                    return Err(UpstreamError::Connect {
                        addr: addr.to_string(),
                        error: std::io::ErrorKind::ConnectionRefused.into(),
                    });
                }
                let (link_end, broker_end) = tokio::io::duplex(1 << 20);
                let peer = Peer {
                    io: broker_end,
                    buf: BytesMut::new(),
                };
                let _ = self.tx.send((addr.host.clone(), peer));
                Ok(Box::new(link_end) as Box<dyn Io>)
            })
        }
    }

    /// The broker's end of one connection.
    pub struct Peer {
        io: DuplexStream,
        buf: BytesMut,
    }

    impl Peer {
        /// The next packet, or `None` when the link closed the connection.
        pub async fn read(&mut self) -> Option<v4::Packet> {
            loop {
                match v4::Packet::read(&mut self.buf, usize::MAX) {
                    Ok(p) => return Some(p),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("the link sent a bad packet: {e:?}"),
                }
                if self.io.read_buf(&mut self.buf).await.ok()? == 0 {
                    return None;
                }
            }
        }

        pub async fn write(&mut self, p: v4::Packet) {
            let mut out = BytesMut::new();
            p.write(&mut out, usize::MAX).unwrap();
            self.io.write_all(&out).await.unwrap();
        }

        /// Reads the CONNECT and accepts it.
        pub async fn accept(&mut self) -> v4::Connect {
            let Some(v4::Packet::Connect(c)) = self.read().await else {
                panic!("expected CONNECT")
            };
            self.write(v4::Packet::ConnAck(v4::ConnAck::new(
                v4::ConnectReturnCode::Success,
                false,
            )))
            .await;
            c
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{config, Peer, Upstream};
    use super::*;
    use rumqttc::mqttbytes::v4;
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(10);

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(WAIT, f).await.expect("timed out")
    }

    fn cloud_publish(pkid: u16, topic: &str, body: &str) -> v4::Packet {
        let mut p = v4::Publish::new(topic, QoS::AtLeastOnce, body.to_string());
        p.pkid = pkid;
        v4::Packet::Publish(p)
    }

    fn owned(tag: u64, topic: &str) -> Outgoing {
        Outgoing {
            tag,
            content: Content::Owned {
                topic: topic.into(),
                payload: Bytes::from_static(b"x"),
            },
            qos: QoS::AtLeastOnce,
            retain: false,
        }
    }

    /// Reads packets until a SUBSCRIBE, answering it; returns what came before.
    async fn until_subscribed(peer: &mut Peer) -> Vec<v4::Packet> {
        let mut before = Vec::new();
        loop {
            match within(peer.read()).await.expect("open") {
                v4::Packet::Subscribe(s) => {
                    let codes = s
                        .filters
                        .iter()
                        .map(|_| v4::SubscribeReasonCode::Success(QoS::AtLeastOnce))
                        .collect();
                    peer.write(v4::Packet::SubAck(v4::SubAck::new(s.pkid, codes)))
                        .await;
                    return before;
                }
                other => before.push(other),
            }
        }
    }

    #[tokio::test]
    async fn a_consumer_s_filters_change_while_the_link_runs_and_are_restored_after_a_reconnect() {
        let (up, mut conns) = Upstream::new();
        let mut link = Link::new(config(&["a"]), Arc::new(up), Arc::default());
        let mut scope = link.subscribe("edges/edge1/scope".into(), 4);
        let (twins, mut desired) = link.consumer(4);
        let shutdown = CancellationToken::new();
        let (handle, _events, task) = link.spawn(shutdown.clone());
        let (_, mut peer) = within(conns.recv()).await.unwrap();
        peer.accept().await;
        until_subscribed(&mut peer).await;

        let filters = |ids: &[&str]| {
            ids.iter()
                .map(|d| format!("devices/{d}/twin/desired"))
                .collect()
        };
        handle.set_filters(twins, filters(&["d1", "d2"])).await;
        let Some(v4::Packet::Subscribe(s)) = within(peer.read()).await else {
            panic!("expected a SUBSCRIBE for the new filters")
        };
        let got: Vec<&str> = s.filters.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(got, ["devices/d1/twin/desired", "devices/d2/twin/desired"]);
        peer.write(cloud_publish(1, "devices/d2/twin/desired", "{}"))
            .await;
        let m = within(desired.recv()).await.unwrap();
        assert_eq!(m.topic, "devices/d2/twin/desired");
        m.ack();

        handle.set_filters(twins, filters(&["d2"])).await;
        loop {
            match within(peer.read()).await.expect("open") {
                v4::Packet::Unsubscribe(u) => {
                    assert_eq!(u.topics, ["devices/d1/twin/desired"]);
                    peer.write(v4::Packet::UnsubAck(v4::UnsubAck { pkid: u.pkid }))
                        .await;
                    break;
                }
                v4::Packet::PubAck(_) | v4::Packet::SubAck(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        // A message after the UNSUBACK: once it is consumed, the UNSUBACK
        // has been read.
        peer.write(cloud_publish(2, "edges/edge1/scope", "{}"))
            .await;
        within(scope.recv()).await.unwrap().ack();

        // The connection drops; d2 goes and d3 comes meanwhile: the next
        // connection subscribes to what is current and unsubscribes d2
        // (d1's UNSUBSCRIBE was answered: not again).
        drop(peer);
        handle.set_filters(twins, filters(&["d3"])).await;
        let (_, mut peer) = within(conns.recv()).await.unwrap();
        peer.accept().await;
        let (mut subscribed, mut unsubscribed) = (Vec::new(), Vec::new());
        while subscribed.len() < 2 || unsubscribed.is_empty() {
            match within(peer.read()).await.expect("open") {
                v4::Packet::Subscribe(s) => {
                    subscribed.extend(s.filters.into_iter().map(|f| f.path))
                }
                v4::Packet::Unsubscribe(u) => unsubscribed.extend(u.topics),
                _ => {}
            }
        }
        subscribed.sort();
        assert_eq!(subscribed, ["devices/d3/twin/desired", "edges/edge1/scope"]);
        assert_eq!(unsubscribed, ["devices/d2/twin/desired"]);
        shutdown.cancel();
        within(task).await.unwrap();
    }

    #[tokio::test]
    async fn cloud_messages_are_acknowledged_only_after_their_consumer_takes_them() {
        let (up, mut conns) = Upstream::new();
        let mut link = Link::new(config(&["a"]), Arc::new(up), Arc::default());
        let mut scope = link.subscribe("edges/edge1/scope".into(), 1);
        let shutdown = CancellationToken::new();
        let (_handle, _events, task) = link.spawn(shutdown.clone());
        let (_, mut peer) = within(conns.recv()).await.unwrap();
        assert!(!peer.accept().await.clean_session, "a persistent session");
        until_subscribed(&mut peer).await;

        // Far more than the consumer's channel and the link's waiting room.
        let sent = MAX_WAITING as u16 + 100;
        let broker = tokio::spawn(async move {
            for pkid in 1..=sent {
                peer.write(cloud_publish(pkid, "edges/edge1/scope", &pkid.to_string()))
                    .await;
            }
            let mut acks = Vec::new();
            while acks.len() < sent as usize {
                match peer.read().await {
                    Some(v4::Packet::PubAck(a)) => acks.push(a.pkid),
                    Some(_) => {}
                    None => break,
                }
            }
            acks
        });
        // Nothing is acknowledged while the consumer holds the messages.
        let first = within(scope.recv()).await.unwrap();
        assert_eq!(&first.payload[..], b"1");
        tokio::task::yield_now().await;
        let mut got = vec![first];
        for _ in 1..sent {
            let m = within(scope.recv()).await.unwrap();
            got.push(m);
        }
        assert!(!broker.is_finished(), "no PUBACK before any ack");
        for (i, m) in got.into_iter().enumerate() {
            assert_eq!(m.payload, (i + 1).to_string(), "in order, none lost");
            m.ack();
        }
        let acks = within(broker).await.unwrap();
        assert_eq!(acks, (1..=sent).collect::<Vec<_>>(), "every one, in order");
        shutdown.cancel();
        within(task).await.unwrap();
    }

    #[tokio::test]
    async fn a_slow_consumer_stops_the_link_reading_instead_of_dropping() {
        let (up, mut conns) = Upstream::new();
        let mut link = Link::new(config(&["a"]), Arc::new(up), Arc::default());
        let mut twin = link.subscribe("twin/#".into(), 1);
        let shutdown = CancellationToken::new();
        let (handle, mut events, task) = link.spawn(shutdown.clone());
        let (_, mut peer) = within(conns.recv()).await.unwrap();
        peer.accept().await;
        until_subscribed(&mut peer).await;
        let Some(LinkEvent::Connected { generation, .. }) = within(events.recv()).await else {
            panic!("expected Connected")
        };
        for pkid in 1..=(MAX_WAITING as u16 + 10) {
            peer.write(cloud_publish(pkid, "twin/x", "d")).await;
        }
        // The link stops reading: a PUBACK for our publish is not seen until
        // the consumer catches up.
        handle.publish(generation, vec![owned(7, "t/1")]).await;
        let Some(v4::Packet::Publish(p)) = within(peer.read()).await else {
            panic!("expected the publish")
        };
        peer.write(v4::Packet::PubAck(v4::PubAck::new(p.pkid)))
            .await;
        let early = tokio::time::timeout(Duration::from_millis(200), events.recv()).await;
        assert!(early.is_err(), "the link is not reading: {early:?}");
        let mut taken = 0;
        while taken < MAX_WAITING + 10 {
            within(twin.recv()).await.unwrap().ack();
            taken += 1;
        }
        assert_eq!(within(events.recv()).await, Some(LinkEvent::Acked(vec![7])));
        shutdown.cancel();
        within(task).await.unwrap();
    }

    #[tokio::test]
    async fn failover_reconnects_to_the_next_address_and_a_dead_connections_batch_is_not_sent() {
        let (up, mut conns) = Upstream::new();
        up.down.lock().unwrap().insert("a".into());
        let mut link = Link::new(config(&["a", "b"]), Arc::new(up), Arc::default());
        let _scope = link.subscribe("s".into(), 4);
        let shutdown = CancellationToken::new();
        let (handle, mut events, task) = link.spawn(shutdown.clone());
        let mut delivered = handle
            .deliver(Reliable {
                topic: "twin/reported".into(),
                payload: Bytes::from_static(b"{}"),
                retain: true,
                until: None,
            })
            .await;

        let (host, mut peer) = within(conns.recv()).await.unwrap();
        assert_eq!(host, "b", "a is down: the link fails over to b");
        peer.accept().await;
        let before = until_subscribed(&mut peer).await;
        let Some(LinkEvent::Connected { generation: g1, .. }) = within(events.recv()).await else {
            panic!()
        };
        let retained_seen = |ps: &[v4::Packet]| {
            ps.iter().any(
                |p| matches!(p, v4::Packet::Publish(p) if p.retain && p.topic == "twin/reported"),
            )
        };
        let mut seen = before;
        if !retained_seen(&seen) {
            seen.push(within(peer.read()).await.unwrap());
        }
        assert!(retained_seen(&seen), "the document is published");

        drop(peer);
        assert!(matches!(
            within(events.recv()).await,
            Some(LinkEvent::Disconnected { generation, .. }) if generation == g1
        ));
        // A batch for the dead connection is dropped, not sent on the next.
        handle.publish(g1, vec![owned(1, "old")]).await;
        let (_, mut peer) = within(conns.recv()).await.unwrap();
        peer.accept().await;
        let before = until_subscribed(&mut peer).await;
        let Some(LinkEvent::Connected { generation: g2, .. }) = within(events.recv()).await else {
            panic!()
        };
        assert!(g2 > g1);
        handle.publish(g2, vec![owned(2, "new")]).await;
        let mut seen = before;
        loop {
            let p = within(peer.read()).await.unwrap();
            if let v4::Packet::Publish(p) = &p {
                if p.topic == "new" {
                    peer.write(v4::Packet::PubAck(v4::PubAck::new(p.pkid)))
                        .await;
                    break;
                }
            }
            seen.push(p);
        }
        assert!(
            retained_seen(&seen),
            "not acknowledged: sent again after the reconnect"
        );
        assert!(delivered.try_recv().is_err(), "not acknowledged yet");
        for p in &seen {
            if let v4::Packet::Publish(p) = p {
                if p.topic == "twin/reported" {
                    assert_eq!(p.qos, QoS::AtLeastOnce);
                    peer.write(v4::Packet::PubAck(v4::PubAck::new(p.pkid)))
                        .await;
                }
            }
        }
        assert_eq!(within(delivered).await, Ok(Delivered::Acked));
        assert!(
            !seen
                .iter()
                .any(|p| matches!(p, v4::Packet::Publish(p) if p.topic == "old")),
            "the old batch never reaches the new connection"
        );
        assert_eq!(within(events.recv()).await, Some(LinkEvent::Acked(vec![2])));
        shutdown.cancel();
        within(task).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_subscription_is_asked_for_again_while_it_is_wanted() {
        let (up, mut conns) = Upstream::new();
        let mut link = Link::new(config(&["a"]), Arc::new(up), Arc::default());
        let _scope = link.subscribe("edges/edge1/scope".into(), 4);
        let shutdown = CancellationToken::new();
        let (_handle, _events, task) = link.spawn(shutdown.clone());
        let (_, mut peer) = within(conns.recv()).await.unwrap();
        peer.accept().await;
        let mut asked = Vec::new();
        // Refused twice (a cluster still electing), then taken.
        for code in [None, None, Some(QoS::AtLeastOnce)] {
            let s = loop {
                let read = tokio::time::timeout(RESUBSCRIBE_MAX, peer.read()).await;
                if let Some(v4::Packet::Subscribe(s)) = read.expect("asked again") {
                    break s;
                }
            };
            asked.push(Instant::now());
            assert_eq!(s.filters[0].path, "edges/edge1/scope");
            let code = code.map_or(
                v4::SubscribeReasonCode::Failure,
                v4::SubscribeReasonCode::Success,
            );
            peer.write(v4::Packet::SubAck(v4::SubAck::new(s.pkid, vec![code])))
                .await;
        }
        let gaps: Vec<Duration> = asked.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps[0] >= RESUBSCRIBE_AFTER && gaps[1] >= RESUBSCRIBE_AFTER * 2,
            "{gaps:?}"
        );
        // Taken: not asked again.
        let quiet = tokio::time::timeout(RESUBSCRIBE_MAX * 2, async {
            loop {
                match peer.read().await {
                    Some(v4::Packet::Subscribe(_)) | None => return,
                    Some(v4::Packet::PingReq) => peer.write(v4::Packet::PingResp).await,
                    Some(_) => {}
                }
            }
        });
        assert!(
            quiet.await.is_err(),
            "a subscription taken is not asked for again"
        );
        shutdown.cancel();
        within(task).await.unwrap();
    }

    /// A link to `a` whose back-off may grow to 60 s, running (its handle
    /// and events kept, or it stops).
    #[allow(clippy::type_complexity)]
    fn slow_backoff_link() -> (
        tokio::sync::mpsc::UnboundedReceiver<(String, Peer)>,
        CancellationToken,
        JoinHandle<()>,
        (LinkHandle, mpsc::UnboundedReceiver<LinkEvent>),
    ) {
        let (up, conns) = Upstream::new();
        let mut cfg = config(&["a"]);
        cfg.max_backoff = Duration::from_secs(60);
        let link = Link::new(cfg, Arc::new(up), Arc::default());
        let shutdown = CancellationToken::new();
        let (handle, events, task) = link.spawn(shutdown.clone());
        (conns, shutdown, task, (handle, events))
    }

    #[tokio::test(start_paused = true)]
    async fn a_broker_that_drops_every_connection_at_once_is_retried_ever_more_slowly() {
        let (mut conns, shutdown, task, _link) = slow_backoff_link();
        let mut arrivals = Vec::new();
        for _ in 0..6 {
            let (_, mut peer) = within(conns.recv()).await.unwrap();
            arrivals.push(Instant::now());
            peer.accept().await;
            drop(peer);
        }
        let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
        for w in gaps.windows(2) {
            assert!(w[1] >= w[0] * 2 - Duration::from_millis(5), "{gaps:?}");
        }
        assert!(gaps[4] >= Duration::from_millis(1600), "{gaps:?}");
        shutdown.cancel();
        within(task).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_held_is_retried_at_once_when_it_fails() {
        let (mut conns, shutdown, task, _link) = slow_backoff_link();
        for _ in 0..4 {
            let (_, mut peer) = within(conns.recv()).await.unwrap();
            peer.accept().await;
            drop(peer);
        }
        // The fifth connection holds (within its keep-alive), then drops.
        let (_, mut peer) = within(conns.recv()).await.unwrap();
        peer.accept().await;
        tokio::time::sleep(STABLE_AFTER).await;
        drop(peer);
        let dropped = Instant::now();
        within(conns.recv()).await.unwrap();
        assert!(dropped.elapsed() <= MIN_BACKOFF, "{:?}", dropped.elapsed());
        shutdown.cancel();
        within(task).await.unwrap();
    }

    #[tokio::test]
    async fn a_broker_that_stops_answering_pings_is_left_for_the_next_address() {
        let (up, mut conns) = Upstream::new();
        let mut cfg = config(&["a", "b"]);
        cfg.login.keep_alive = 1;
        cfg.failback = None;
        let mut link = Link::new(cfg, Arc::new(up), Arc::default());
        let _scope = link.subscribe("s".into(), 4);
        let shutdown = CancellationToken::new();
        let (_handle, mut events, task) = link.spawn(shutdown.clone());

        let (host, mut peer) = within(conns.recv()).await.unwrap();
        assert_eq!(host, "a");
        peer.accept().await;
        until_subscribed(&mut peer).await;
        // The broker keeps the connection open and never answers a ping
        // (a cluster node stuck electing its leaders).
        let Some(LinkEvent::Connected { generation, .. }) = within(events.recv()).await else {
            panic!("expected Connected")
        };
        let Some(LinkEvent::Disconnected {
            generation: gone,
            error,
            by_upstream,
        }) = within(events.recv()).await
        else {
            panic!("expected Disconnected")
        };
        assert_eq!(gone, generation);
        assert!(error.contains("keep"), "{error}");
        assert!(!by_upstream, "the hub left; the broker did not close");
        let (host, _peer) = within(conns.recv()).await.unwrap();
        assert_eq!(host, "b", "the next connection goes to the next address");
        drop(peer);
        shutdown.cancel();
        within(task).await.unwrap();
    }

    #[tokio::test]
    async fn the_link_fails_back_to_the_first_address_once_probes_find_it_serving_again_not_just_listening(
    ) {
        let (up, mut conns) = Upstream::new();
        let up = Arc::new(up);
        up.down.lock().unwrap().insert("a".into());
        let link = Link::new(config(&["a", "b"]), up.clone(), Arc::default());
        let shutdown = CancellationToken::new();
        let (_handle, mut events, task) = link.spawn(shutdown.clone());

        let (host, mut on_b) = within(conns.recv()).await.unwrap();
        assert_eq!(host, "b");
        on_b.accept().await;
        assert!(
            matches!(within(events.recv()).await, Some(LinkEvent::Connected { address, .. }) if address.contains("b:"))
        );

        // a accepts TCP again but is not serving yet: probes (a CONNECT of
        // their own, clean session) get "server unavailable", and the link
        // stays on b however many there are.
        up.down.lock().unwrap().remove("a");
        for _ in 0..FAILBACK_PROBES + 2 {
            let (host, mut peer) = within(conns.recv()).await.unwrap();
            assert_eq!(host, "a", "only a is probed");
            let Some(v4::Packet::Connect(c)) = within(peer.read()).await else {
                panic!("expected a probe's CONNECT")
            };
            let unavailable = v4::ConnectReturnCode::ServiceUnavailable;
            peer.write(v4::Packet::ConnAck(v4::ConnAck::new(unavailable, false)))
                .await;
            assert_eq!(
                c.client_id, "edge1-probe",
                "a probe under the hub's client id"
            );
            assert!(c.clean_session, "a probe leaves no session behind");
        }
        // a serves: after two probes in a row find it up, the link leaves
        // b cleanly for a.
        let mut probes = 0;
        let mut on_a = loop {
            let (host, mut peer) = within(conns.recv()).await.unwrap();
            assert_eq!(host, "a", "only a is probed, and reconnected to");
            match within(peer.read()).await {
                Some(v4::Packet::Connect(c)) if c.client_id == "edge1-probe" => {
                    peer.write(v4::Packet::ConnAck(v4::ConnAck::new(
                        v4::ConnectReturnCode::Success,
                        false,
                    )))
                    .await;
                    assert!(matches!(
                        within(peer.read()).await,
                        Some(v4::Packet::Disconnect)
                    ));
                    probes += 1;
                }
                Some(v4::Packet::Connect(_)) => break peer,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(probes, FAILBACK_PROBES as usize, "{probes} probes");
        assert!(matches!(
            within(on_b.read()).await,
            Some(v4::Packet::Disconnect)
        ));
        on_a.write(v4::Packet::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::Success,
            false,
        )))
        .await;
        assert!(matches!(
            within(events.recv()).await,
            Some(LinkEvent::Disconnected { .. })
        ));
        assert!(
            matches!(within(events.recv()).await, Some(LinkEvent::Connected { address, .. }) if address.contains("a:"))
        );

        // On the first address there is nothing to fail back to: no probes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            conns.try_recv().is_err(),
            "probed while on the first address"
        );
        shutdown.cancel();
        within(task).await.unwrap();
    }
}
