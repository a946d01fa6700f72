//! What the local broker keeps across restarts (persistent sessions, the
//! messages queued for them, retained messages) may be found corrupt in the
//! store (a bug of an older version, a hand edit, damage the store's own
//! checksums do not see): the real hub, restarted on such a store, skips and
//! logs each corrupt entry and serves everything intact, to real MQTT
//! clients. The entries are written with the store's own API while the hub
//! is stopped, since no client can make the hub write a corrupt one.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgehub::store::Store;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};

const WAIT: Duration = Duration::from_secs(15);

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The real `edgehub run` on loopback, its log in `log`.
fn start_hub(storage: &Path, port: u16, log: &Path) -> Child {
    let log = File::options().create(true).append(true).open(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_edgehub"))
        .args(["run", "--listen", &format!("127.0.0.1:{port}"), "--storage"])
        .arg(storage)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the hub did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// SIGTERM, then waits for the hub to finish its shutdown.
fn stop_hub(mut child: Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the hub exited with {status}");
            return;
        }
        assert!(Instant::now() < deadline, "the hub did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects `id`; returns the client, its event loop and whether the hub
/// had a session for it.
async fn connect(port: u16, id: &str, clean: bool) -> (AsyncClient, EventLoop, bool) {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_clean_session(clean);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 16);
    let present = next(&mut events, "the CONNACK", |p| match p {
        Packet::ConnAck(ack) => Some(ack.session_present),
        _ => None,
    })
    .await;
    (client, events, present)
}

/// Polls `events` until `pick` takes a packet the hub sent.
async fn next<T>(
    events: &mut EventLoop,
    what: &str,
    mut pick: impl FnMut(Packet) -> Option<T>,
) -> T {
    let polling = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(p)) => {
                    if let Some(t) = pick(p) {
                        return t;
                    }
                }
                Ok(Event::Outgoing(_)) => {}
                Err(e) => panic!("connection failed waiting for {what}: {e}"),
            }
        }
    };
    tokio::time::timeout(WAIT, polling)
        .await
        .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
}

async fn next_publish(events: &mut EventLoop, what: &str) -> Publish {
    next(events, what, |p| match p {
        Packet::Publish(p) => Some(p),
        _ => None,
    })
    .await
}

async fn subscribe(client: &AsyncClient, events: &mut EventLoop, filter: &str) {
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    next(events, "the SUBACK", |p| {
        matches!(p, Packet::SubAck(_)).then_some(())
    })
    .await;
}

async fn publish(
    client: &AsyncClient,
    events: &mut EventLoop,
    topic: &str,
    retain: bool,
    body: &str,
) {
    client
        .publish(topic, QoS::AtLeastOnce, retain, body.as_bytes().to_vec())
        .await
        .unwrap();
    next(events, "the PUBACK", |p| {
        matches!(p, Packet::PubAck(_)).then_some(())
    })
    .await;
}

/// Publishes to `topic`, which the client is subscribed to, and checks that
/// this is the next message it gets: nothing (no corrupt `what`) came first.
async fn sentinel_is_next(client: &AsyncClient, events: &mut EventLoop, topic: &str, what: &str) {
    client
        .publish(topic, QoS::AtLeastOnce, false, "s")
        .await
        .unwrap();
    let next = next_publish(events, "the sentinel").await;
    assert_eq!(next.topic, topic, "the corrupt {what} was delivered");
}

fn queue_key(client: &str, seq: u64) -> Vec<u8> {
    let mut key = client.as_bytes().to_vec();
    key.push(0xFF);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_sessions_queued_messages_and_retained_messages_are_skipped_with_a_warning_and_the_rest_is_served(
) {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let log = dir.path().join("hub.log");

    // A persistent session away, a message queued for it, a retained message.
    let port = free_port();
    let hub = start_hub(&storage, port, &log);
    let (keeper, mut keeper_events, _) = connect(port, "keeper", false).await;
    subscribe(&keeper, &mut keeper_events, "local/q/#").await;
    keeper.disconnect().await.unwrap();
    let _ = tokio::time::timeout(WAIT, keeper_events.poll()).await;
    drop((keeper, keeper_events));
    let (publisher, mut events, _) = connect(port, "publisher", true).await;
    publish(&publisher, &mut events, "local/ret/good", true, "kept").await;
    publish(&publisher, &mut events, "local/q/1", false, "queued").await;
    drop((publisher, events));
    stop_hub(hub);

    // Corrupt entries beside them, written as the hub's store would.
    {
        let store = Store::open(&storage).unwrap();
        let sessions = store.documents("sessions").unwrap();
        sessions.insert(b"garbage", b"{not a session").unwrap();
        let queue = store.documents("session_queue").unwrap();
        queue
            .insert(&queue_key("keeper", 999), b"\x07junk")
            .unwrap();
        queue.insert(b"no separator", b"\x01junk").unwrap();
        let retained = store.documents("retained").unwrap();
        retained.insert(b"local/ret/bad", b"\x01\x02").unwrap();
        retained.commit().unwrap();
    }

    let port = free_port();
    let hub = start_hub(&storage, port, &log);
    let text = std::fs::read_to_string(&log).unwrap();
    for warning in [
        "a corrupt stored session is dropped",
        "a corrupt message queued for a session is skipped",
        "a corrupt retained message is skipped",
    ] {
        assert!(text.contains(warning), "no '{warning}' in the log:\n{text}");
    }

    // The intact session is back with its one queued message, nothing else:
    // its own sentinel is the next thing it gets.
    let (keeper, mut keeper_events, present) = connect(port, "keeper", false).await;
    assert!(present, "the keeper's session was not restored");
    let queued = next_publish(&mut keeper_events, "the queued message").await;
    assert_eq!(
        (queued.topic.as_str(), &queued.payload[..]),
        ("local/q/1", &b"queued"[..])
    );
    sentinel_is_next(
        &keeper,
        &mut keeper_events,
        "local/q/sentinel",
        "queued entry",
    )
    .await;

    // The corrupt session is gone.
    let (_garbage, _garbage_events, present) = connect(port, "garbage", false).await;
    assert!(!present, "a corrupt session was restored");

    // The intact retained message is delivered, the corrupt one never is:
    // retained messages come right after the SUBACK, before a live sentinel.
    let (reader, mut events, _) = connect(port, "reader", true).await;
    subscribe(&reader, &mut events, "local/ret/#").await;
    let kept = next_publish(&mut events, "the retained message").await;
    assert_eq!(
        (kept.topic.as_str(), &kept.payload[..], kept.retain),
        ("local/ret/good", &b"kept"[..], true)
    );
    sentinel_is_next(&reader, &mut events, "local/ret/sentinel", "retained entry").await;

    stop_hub(hub);
}
