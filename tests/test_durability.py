"""Nothing acknowledged is lost: hub crashes (kill -9) and upstream restarts."""

import threading

import pytest

from helpers import Publisher, assert_strictly_increasing, first_occurrences, wait_until

TOPIC = "devices/d1/messages/events/%24.ct=text%2Fplain&load=1"


class StreamingPublisher:
    """Publishes 0..n-1 (payload = sequence number) from a background thread,
    pipelined, until done or stopped."""

    def __init__(self, pub: Publisher, n: int, topic: str = TOPIC):
        self.pub, self.n, self.topic = pub, n, topic
        self.stop = threading.Event()
        self.published = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        for i in range(self.n):
            if self.stop.is_set():
                return
            # keep at most a few thousand messages buffered inside paho
            while i - self.pub.acked_count() > 2000 and not self.stop.is_set():
                with self.pub.lock:
                    self.pub.lock.wait(0.05)
            if self.stop.is_set():
                return
            self.pub.publish(self.topic, str(i).encode(), qos=1, key=i)
            self.published = i + 1

    def start(self):
        self.thread.start()
        return self

    def join(self, timeout=60):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "publisher thread did not finish"


@pytest.mark.parametrize("upstream_state", ["online", "offline"])
def test_every_acknowledged_message_survives_kill_9_mid_load_and_arrives_upstream_in_store_order(
    upstream_state, upstream_factory, offline_upstream, collector_factory, hub_factory, clients
):
    """online: the hub is forwarding while it is killed.  offline: the upstream
    is down, so every acknowledged message exists only in the hub's store."""
    if upstream_state == "offline":
        up, collector = offline_upstream()
    else:
        up = upstream_factory()
        up.start()
        collector = collector_factory(up)
    hub = hub_factory(up, edge_id="edge-crash")
    n = 40_000

    pub = Publisher(hub.port, inflight=200)
    clients.append(pub.connect())
    stream = StreamingPublisher(pub, n).start()

    wait_until(lambda: pub.acked_count() >= 8000, 60, "8000 acknowledged publishes before the crash")
    hub.kill9()
    assert pub.disconnected.wait(10), "publisher did not notice the hub died"
    stream.stop.set()
    pub.client.loop_stop()
    stream.join()
    with pub.lock:
        acked = set(pub.acked)
        refused = {k: rc for k, rc in pub.results.items() if rc >= 0x80}
    assert not refused, f"publishes refused: {list(refused.items())[:5]}"
    assert stream.published < n, "the load finished before the kill; the crash was not mid-load"

    if upstream_state == "offline":
        # the hub is dead: `queue stats` reads the store itself
        stats = hub.queue_stats()
        assert stats["depth"] >= len(acked), f"after kill -9: {stats}, but {len(acked)} were acknowledged"
        up.start()

    hub.start()  # same storage, same port, same upstream
    msgs = collector.wait_distinct_payloads({str(i).encode() for i in acked}, timeout=120)

    seqs = [int(p) for t, p in msgs if t == TOPIC]
    missing = acked - set(seqs)
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:10]}"
    assert_strictly_increasing(first_occurrences(seqs), "first-occurrence order upstream")
    assert not collector.session_lost


def test_nothing_is_lost_when_the_upstream_broker_restarts_three_times_under_load(
    upstream, collector_factory, hub_factory, clients
):
    """20,000 messages in 4 chunks of 5,000.  Each chunk is published while
    the broker is down (so it is queued in the hub); the broker is then
    started and stopped again while the hub is draining its queue into it
    (some publishes in flight upstream), three times."""
    collector = collector_factory(upstream)
    hub = hub_factory(upstream, edge_id="edge-flappy")
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 30, "== 1")
    chunk, chunks = 5000, 4
    n = chunk * chunks

    pub = Publisher(hub.port, inflight=200)
    clients.append(pub.connect())

    def publish_chunk(k):
        for i in range(k * chunk, (k + 1) * chunk):
            pub.publish(TOPIC, str(i).encode(), qos=1, key=i)
        pub.wait_results((k + 1) * chunk, timeout=60)

    upstream.stop()
    for r in range(chunks - 1):
        publish_chunk(r)  # queued in the hub while the upstream is down
        base = hub.metric("edgehub_messages_forwarded_total")
        upstream.start()
        # stop the broker again part-way through the hub's drain
        hub.wait_metric(
            "edgehub_messages_forwarded_total", lambda v: v >= base + 200, 60, f">= {base + 200}",
            interval=0.002,
        )
        upstream.stop()
    publish_chunk(chunks - 1)
    upstream.start()

    refused = {k: rc for k, rc in pub.results.items() if rc >= 0x80}
    assert not refused, f"publishes refused: {list(refused.items())[:5]}"
    assert len(pub.acked) == n

    msgs = collector.wait_distinct_payloads({str(i).encode() for i in range(n)}, timeout=180)
    seqs = [int(p) for t, p in msgs if t == TOPIC]
    firsts = first_occurrences(seqs)
    assert_strictly_increasing(firsts, "first-occurrence order upstream")
    assert firsts == list(range(n)), f"missing: {sorted(set(range(n)) - set(firsts))[:10]}"
    assert not collector.session_lost, "the upstream broker lost the collector's session (test setup problem)"
    assert upstream.starts == 1 + chunks
    assert hub.alive()
