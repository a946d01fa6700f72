//! The local broker under many clients, edgehub against a plain Mosquitto
//! in the same run: what idle connections cost in memory, and fan-out (one
//! publisher to many subscribers of one topic; many publishers to one
//! subscriber on `#`). Every phase starts a fresh broker; every client
//! speaks MQTT 3.1.1 at QoS 1 on plain (non-device) topics, which both
//! brokers deliver locally without storing.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Publish};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::load::{self, Conn, PublisherSpec, SubscriberStats};
use crate::rss;
use crate::scenario::Settings;
use crate::systems::{self, Proc};

/// What the local-broker comparison does.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// Idle clients connected at once (edgehub's default `max_connections`
    /// is 10,000).
    pub connections: usize,
    /// Subscribers of the one-to-many phase and publishers of the
    /// many-to-one phase.
    pub fanout: usize,
    /// Messages the one publisher sends (each reaches every subscriber).
    pub one_to_many_messages: u64,
    /// Rounds of the many-to-one phase (in each, every publisher sends one
    /// message).
    pub rounds: u64,
}

/// Both brokers may keep this many QoS 1 deliveries unacknowledged per
/// client (edgehub's own figure; Mosquitto's default is 20). edgehub
/// queues 1,024 more for a client that is behind; Mosquitto's queue is
/// unlimited here (with 1,024 it dropped messages of the many-to-one
/// rounds, which fit in it).
const INFLIGHT: usize = 256;
/// Keep-alive of the idle clients: long enough that none pings while the
/// broker's memory is read.
const IDLE_KEEP_ALIVE_SECS: u16 = 900;
/// Connections opened at once while the idle clients connect.
const CONNECTING: usize = 64;
/// The one-to-many topic; the many-to-one publishers use `fan/in/{i}`.
const FAN_TOPIC: &str = "fan/out";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    Edgehub,
    Mosquitto,
}

impl Broker {
    fn label(self) -> &'static str {
        match self {
            Broker::Edgehub => "edgehub",
            Broker::Mosquitto => "mosquitto",
        }
    }
}

/// Memory held by idle connected clients.
#[derive(Debug, Clone, Copy)]
pub struct Idle {
    pub connections: usize,
    /// RSS before the clients connect, and with all of them connected.
    pub before_kib: u64,
    pub after_kib: u64,
}

impl Idle {
    pub fn per_connection_bytes(&self) -> f64 {
        (self.after_kib.saturating_sub(self.before_kib) * 1024) as f64 / self.connections as f64
    }
}

/// One fan-out phase: distinct deliveries over the time from the first
/// publish to the last delivery.
#[derive(Debug, Clone, Copy)]
pub struct Fan {
    pub expected: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub secs: f64,
}

impl Fan {
    pub fn rate(&self) -> f64 {
        self.delivered as f64 / self.secs.max(1e-9)
    }
}

/// What one broker did in one run; a phase that failed says why.
pub struct LocalRun {
    pub broker: Broker,
    pub idle: Result<Idle>,
    pub one_to_many: Result<Fan>,
    pub many_to_one: Result<Fan>,
}

/// Runs every phase on each broker, `repeat` times interleaved, and prints
/// the table.
pub async fn compare(s: &Settings, local: &LocalSettings, repeat: usize) {
    println!("edgehub local broker benchmark (MQTT 3.1.1, QoS 1, plain topics, in-flight {INFLIGHT} per client on both)");
    println!(
        "  idle: {} connected clients; one-to-many: 1 publisher, {} subscribers, {} messages; many-to-one: {} publishers, 1 subscriber on #, {} rounds of one message each\n",
        local.connections, local.fanout, local.one_to_many_messages, local.fanout, local.rounds
    );
    let mut brokers = Vec::new();
    if s.edgehub.is_some() {
        brokers.push(Broker::Edgehub);
    } else {
        println!("skipping edgehub: no binary (build it or set EDGEHUB_BIN)");
    }
    brokers.push(Broker::Mosquitto);
    let mut runs: Vec<LocalRun> = Vec::new();
    for run in 0..repeat.max(1) {
        for &broker in &brokers {
            let dir = s.work.join(format!("local{run}-{}", broker.label()));
            let r = LocalRun {
                broker,
                idle: phase(s, broker, &dir.join("idle"), |p, port| {
                    idle(p.pid, port, local.connections)
                })
                .await,
                one_to_many: phase(s, broker, &dir.join("one-to-many"), |_, port| {
                    one_to_many(s, port, local.fanout, local.one_to_many_messages)
                })
                .await,
                many_to_one: phase(s, broker, &dir.join("many-to-one"), |_, port| {
                    many_to_one(s, port, local.fanout, local.rounds)
                })
                .await,
            };
            print_progress(&r);
            runs.push(r);
        }
    }
    print_table(&brokers, &runs);
}

/// Starts `broker` in `dir`, runs `measure` against it, stops it.
async fn phase<'a, F, Fut, T>(s: &'a Settings, broker: Broker, dir: &Path, measure: F) -> Result<T>
where
    F: FnOnce(&Proc, u16) -> Fut,
    Fut: std::future::Future<Output = Result<T>> + 'a,
{
    let port = systems::free_port()?;
    let mut proc = match broker {
        Broker::Edgehub => {
            let bin = s.edgehub.as_deref().context("no edgehub binary")?;
            // Nothing listens on the upstream port: the hub runs offline.
            let upstream = systems::free_port()?;
            let config = dir.join("edgehub.toml");
            std::fs::create_dir_all(dir)?;
            std::fs::write(&config, "[mqtt]\nmax_connections = 20000\n")?;
            systems::start_edgehub(
                bin,
                dir,
                port,
                upstream,
                systems::free_port()?,
                Some(&config),
                &[],
            )?
        }
        Broker::Mosquitto => {
            let mut config = systems::plain_config(port, dir, s.as_root);
            config.push_str(&format!(
                "max_inflight_messages {INFLIGHT}\nmax_queued_messages 0\n"
            ));
            systems::start_mosquitto(&s.mosquitto, "mosquitto", dir, &config)?
        }
    };
    proc.wait_ready(port, Instant::now() + Duration::from_secs(60))
        .await?;
    let result = measure(&proc, port).await;
    let _ = proc.stop().await;
    result.with_context(|| format!("{} (logs in {})", broker.label(), dir.display()))
}

/// Connects `n` idle clients and reads the broker's RSS before and after.
async fn idle(pid: u32, port: u16, n: usize) -> Result<Idle> {
    let addr = systems::loopback(port);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_kib = rss::read_status(pid).context("broker gone")?.rss_kib;
    let mut clients = Vec::with_capacity(n);
    let mut connecting = JoinSet::new();
    let mut next = 0;
    while clients.len() < n {
        while next < n && connecting.len() < CONNECTING {
            connecting.spawn(connect_idle(addr, format!("idle-{next}")));
            next += 1;
        }
        match connecting.join_next().await {
            Some(joined) => clients.push(joined??),
            None => break,
        }
    }
    // Let the broker finish what connecting started (allocator, logs).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_kib = rss::read_status(pid).context("broker gone")?.rss_kib;
    drop(clients);
    Ok(Idle {
        connections: n,
        before_kib,
        after_kib,
    })
}

/// One client that connects (clean session) and then says nothing.
async fn connect_idle(addr: SocketAddr, id: String) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut connect = Connect::new(id);
    connect.keep_alive = IDLE_KEEP_ALIVE_SECS;
    let mut buf = BytesMut::new();
    Packet::Connect(connect)
        .write(&mut buf, load::MAX_PACKET)
        .map_err(|e| anyhow::anyhow!("encoding CONNECT: {e}"))?;
    stream.write_all(&buf).await?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut connack))
        .await
        .context("no CONNACK within 30 s")??;
    if connack[0] != 0x20 || connack[3] != 0 {
        bail!("connection refused: CONNACK {connack:02x?}");
    }
    Ok(stream)
}

/// Connects `count` subscribers of `filter`, each expecting `expected`
/// messages, and waits for every SUBACK.
async fn subscribers(
    s: &Settings,
    addr: SocketAddr,
    count: usize,
    filter: &'static str,
    expected: u64,
    deadline: Instant,
) -> Result<JoinSet<SubscriberStats>> {
    let mut set = JoinSet::new();
    for i in 0..count {
        let conn = Conn::connect(addr, &format!("fan-sub-{i}"), true).await?;
        let (tx, rx) = oneshot::channel();
        set.spawn(load::run_subscriber(
            conn,
            filter,
            expected,
            deadline,
            s.idle_timeout,
            Some(tx),
        ));
        rx.await.context("a subscriber got no SUBACK")?;
    }
    Ok(set)
}

/// Sums what the subscribers saw; fails on any subscriber's error.
async fn gather(mut set: JoinSet<SubscriberStats>, start: Instant) -> Result<Fan> {
    let mut fan = Fan {
        expected: 0,
        delivered: 0,
        duplicates: 0,
        secs: 0.0,
    };
    while let Some(stats) = set.join_next().await {
        let stats = stats?;
        if let Some(e) = stats.error {
            bail!("subscriber: {e}");
        }
        fan.expected += stats.expected;
        fan.delivered += stats.distinct;
        fan.duplicates += stats.duplicates;
        if let Some(last) = stats.last {
            fan.secs = fan.secs.max((last - start).as_secs_f64());
        }
    }
    Ok(fan)
}

/// One publisher, `subscribers` subscribers of its topic.
async fn one_to_many(s: &Settings, port: u16, subscribers: usize, messages: u64) -> Result<Fan> {
    let addr = systems::loopback(port);
    let deadline = s.deadline();
    let set = self::subscribers(s, addr, subscribers, FAN_TOPIC, messages, deadline).await?;
    let publisher = Conn::connect(addr, "fan-pub", true).await?;
    let spec = PublisherSpec {
        topic: FAN_TOPIC.into(),
        first_seq: 0,
        count: messages,
        payload_len: s.payload,
        window: INFLIGHT,
    };
    let start = Instant::now();
    let published = load::run_publisher(publisher, spec, deadline).await;
    if let Some(e) = published.error {
        bail!("publisher: {e}");
    }
    gather(set, start).await
}

/// `publishers` publishers on topics of their own, one subscriber on `#`,
/// in rounds: every publisher sends one message at once, and the next
/// round starts when the subscriber has them all. A round fits both
/// brokers' queue for the subscriber, so a loss is a broker's, not the
/// load's; a round that stalls for the idle timeout ends the phase.
async fn many_to_one(s: &Settings, port: u16, publishers: usize, rounds: u64) -> Result<Fan> {
    let addr = systems::loopback(port);
    let deadline = s.deadline();
    let expected = publishers as u64 * rounds;
    let subscriber = Conn::connect(addr, "fan-sub", true).await?;
    let (progress_tx, mut progress) = watch::channel(0u64);
    let (subscribed_tx, subscribed) = oneshot::channel();
    let counting = tokio::spawn(count_deliveries(
        subscriber,
        expected,
        deadline,
        progress_tx,
        subscribed_tx,
    ));
    subscribed.await.context("the subscriber got no SUBACK")?;
    let (round_tx, round) = watch::channel(None::<u64>);
    let mut sending = JoinSet::new();
    for i in 0..publishers {
        let conn = Conn::connect(addr, &format!("fan-pub-{i}"), true).await?;
        let topic = format!("fan/in/{i}");
        sending.spawn(publish_rounds(
            conn,
            topic,
            i as u64,
            publishers as u64,
            s.payload,
            round.clone(),
        ));
    }
    let start = Instant::now();
    let mut end = start;
    for r in 0..rounds {
        round_tx.send_replace(Some(r));
        let want = (r + 1) * publishers as u64;
        let done = tokio::time::timeout(s.idle_timeout, progress.wait_for(|&n| n >= want)).await;
        if !matches!(done, Ok(Ok(_))) {
            break;
        }
        end = Instant::now();
    }
    drop(round_tx);
    drop(progress);
    while let Some(published) = sending.join_next().await {
        published??;
    }
    let (delivered, duplicates) = counting.await??;
    Ok(Fan {
        expected,
        delivered,
        duplicates,
        secs: (end - start).as_secs_f64(),
    })
}

/// One many-to-one publisher: for each round `r` it is told, one QoS 1
/// message with sequence number `r * publishers + index`, and its PUBACK.
async fn publish_rounds(
    mut conn: Conn,
    topic: String,
    index: u64,
    publishers: u64,
    payload: usize,
    mut round: watch::Receiver<Option<u64>>,
) -> Result<()> {
    let mut packets = Vec::new();
    while round.changed().await.is_ok() {
        let Some(r) = *round.borrow_and_update() else {
            continue;
        };
        let seq = r * publishers + index;
        let mut publish = Publish::from_bytes(
            topic.as_str(),
            QoS::AtLeastOnce,
            load::make_payload(seq, payload),
        );
        publish.pkid = (r % 60_000 + 1) as u16;
        conn.queue(Packet::Publish(publish))?;
        conn.flush().await?;
        loop {
            packets.clear();
            if !conn
                .read_packets(&mut packets, Duration::from_secs(30))
                .await?
            {
                bail!("no PUBACK within 30 s");
            }
            if packets.iter().any(|p| matches!(p, Packet::PubAck(_))) {
                break;
            }
        }
    }
    conn.disconnect().await
}

/// The many-to-one subscriber: subscribes to `#`, acknowledges every
/// delivery, and reports the distinct sequence numbers seen so far.
/// Returns (distinct, duplicates) once all arrived, the watcher is gone or
/// the deadline passed.
async fn count_deliveries(
    mut conn: Conn,
    expected: u64,
    deadline: Instant,
    progress: watch::Sender<u64>,
    subscribed: oneshot::Sender<()>,
) -> Result<(u64, u64)> {
    let mut seen = vec![false; expected as usize];
    let (mut distinct, mut duplicates) = (0u64, 0u64);
    let mut subscribed = Some(subscribed);
    let mut packets = Vec::new();
    conn.queue(Packet::Subscribe(load::subscribe_packet("#")))?;
    conn.flush().await?;
    while distinct < expected && Instant::now() < deadline && !progress.is_closed() {
        packets.clear();
        if !conn
            .read_packets(&mut packets, Duration::from_millis(500))
            .await?
        {
            conn.keep_alive().await?;
            continue;
        }
        for packet in packets.drain(..) {
            match packet {
                Packet::Publish(p) => {
                    conn.queue(Packet::PubAck(PubAck::new(p.pkid)))?;
                    match load::parse_seq(&p.payload).and_then(|s| seen.get_mut(s as usize)) {
                        Some(s) if *s => duplicates += 1,
                        Some(s) => {
                            *s = true;
                            distinct += 1;
                        }
                        None => bail!("a delivery without a sequence number"),
                    }
                }
                Packet::SubAck(_) => {
                    if let Some(tx) = subscribed.take() {
                        let _ = tx.send(());
                    }
                }
                _ => {}
            }
        }
        conn.flush().await?;
        progress.send_replace(distinct);
    }
    Ok((distinct, duplicates))
}

fn print_progress(r: &LocalRun) {
    let show = |name: &str, fan: &Result<Fan>| match fan {
        Ok(f) => format!(
            "{name} {:.0} msg/s ({} of {} delivered)",
            f.rate(),
            f.delivered,
            f.expected
        ),
        Err(e) => format!("{name} failed: {e:#}"),
    };
    let idle = match &r.idle {
        Ok(i) => format!(
            "idle {:.2} KiB/connection ({} -> {} KiB)",
            i.per_connection_bytes() / 1024.0,
            i.before_kib,
            i.after_kib
        ),
        Err(e) => format!("idle failed: {e:#}"),
    };
    println!(
        "{:<10} {idle}; {}; {}",
        r.broker.label(),
        show("one-to-many", &r.one_to_many),
        show("many-to-one", &r.many_to_one)
    );
}

/// Median of the successful runs' figures.
fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn print_table(brokers: &[Broker], runs: &[LocalRun]) {
    type Figure = fn(&LocalRun) -> Option<f64>;
    let rows: [(&str, Figure); 5] = [
        ("idle RSS per connection (KiB)", |r| {
            r.idle
                .as_ref()
                .ok()
                .map(|i| i.per_connection_bytes() / 1024.0)
        }),
        ("one-to-many deliveries/s", |r| {
            r.one_to_many.as_ref().ok().map(Fan::rate)
        }),
        ("one-to-many lost", |r| {
            r.one_to_many
                .as_ref()
                .ok()
                .map(|f| (f.expected - f.delivered) as f64)
        }),
        ("many-to-one deliveries/s", |r| {
            r.many_to_one.as_ref().ok().map(Fan::rate)
        }),
        ("many-to-one lost", |r| {
            r.many_to_one
                .as_ref()
                .ok()
                .map(|f| (f.expected - f.delivered) as f64)
        }),
    ];
    println!();
    print!("{:<32}", "median of runs");
    for b in brokers {
        print!("{:>14}", b.label());
    }
    println!("{:>22}", "edgehub / mosquitto");
    for (name, figure) in rows {
        print!("{name:<32}");
        let values: Vec<Option<f64>> = brokers
            .iter()
            .map(|b| {
                median(
                    runs.iter()
                        .filter(|r| r.broker == *b)
                        .filter_map(figure)
                        .collect(),
                )
            })
            .collect();
        for v in &values {
            match v {
                Some(v) if *v >= 100.0 => print!("{v:>14.0}"),
                Some(v) => print!("{v:>14.2}"),
                None => print!("{:>14}", "-"),
            }
        }
        match (values.first(), values.get(1), brokers.len()) {
            (Some(Some(e)), Some(Some(m)), 2) if *m > 0.0 => println!("{:>21.2}x", e / m),
            _ => println!(),
        }
    }
}
