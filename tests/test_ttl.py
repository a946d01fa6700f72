"""--ttl-secs: messages older than the time-to-live are not sent, and are counted."""

from helpers import Publisher, wait_until


def test_messages_older_than_ttl_are_not_sent_and_are_counted_as_expired(
    offline_upstream, hub_factory, clients
):
    up, collector = offline_upstream()
    hub = hub_factory(up, ttl_secs=1, edge_id="edge-ttl")
    n = 50
    old_topic = "devices/d1/messages/events/age=old"
    fresh_topic = "devices/d1/messages/events/age=fresh"

    pub = Publisher(hub.port)
    clients.append(pub.connect())
    for i in range(n):
        pub.publish(old_topic, f"old-{i}".encode(), qos=1, key=i)
    pub.wait_results(n, timeout=30)
    assert sorted(pub.acked) == list(range(n)), f"not all old messages accepted: {pub.results}"

    # Wait until the messages are clearly older than the TTL: the queue says
    # so, or the hub already expired them while offline (also allowed).
    wait_until(
        lambda: hub.queue_stats()["oldest_age_secs"] >= 1.5
        or hub.metric("edgehub_messages_expired_total") >= n,
        20,
        "queue oldest_age_secs >= 1.5 (or all messages expired)",
        interval=0.1,
    )
    assert collector.count() == 0

    up.start()
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 30, "== 1 after the upstream started")

    assert pub.publish_and_wait(fresh_topic, b"fresh", qos=1) < 0x80
    msgs = collector.wait_payload(b"fresh", 20)
    assert msgs == [(fresh_topic, b"fresh")], f"expired messages were sent upstream: {msgs[:5]} ... ({len(msgs)} total)"

    expired = hub.wait_metric(
        "edgehub_messages_expired_total", lambda v: v >= n, 20, f">= {n}"
    )
    assert expired == n, f"edgehub_messages_expired_total = {expired}, expected {n}"
    hub.wait_queue_depth(0, 20)
    assert collector.snapshot() == [(fresh_topic, b"fresh")]
