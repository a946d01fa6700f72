"""What goes upstream first after an outage: what a priority-0 route queues
before what a priority-5 route queued earlier, in order within each
priority, across a hub killed while it waits; and with a live share, a
message stored after the upstream came back before the rest of the
backlog."""

from __future__ import annotations

from helpers import Publisher
from pluginkit import plugin_hub  # noqa: F401 - fixture

EDGE = "edge-prio"
ROUTES = {
    "alarms": {"route": "FROM /messages/* WHERE kind = 'alarm' INTO $upstream", "priority": 0},
    "bulk": {"route": "FROM /messages/* WHERE kind = 'bulk' INTO $upstream", "priority": 5},
}


def publish_acked(pub: Publisher, messages: list[tuple[str, bytes]], already: int) -> None:
    for i, (topic, payload) in enumerate(messages):
        pub.publish(topic, payload, qos=1, key=already + i)
    pub.wait_results(already + len(messages), timeout=60)
    assert sorted(pub.acked) == list(range(already + len(messages))), f"not all stored: {pub.results}"


def first_copies(received: list[tuple[str, bytes]]) -> list[bytes]:
    seen, out = set(), []
    for _, payload in received:
        if payload not in seen:
            seen.add(payload)
            out.append(payload)
    return out


def test_after_an_outage_every_priority_0_message_arrives_before_any_priority_5_message_stored_earlier(
    offline_upstream, plugin_hub, clients  # noqa: F811
):
    up, collector = offline_upstream()
    ph = plugin_hub(up, routes=ROUTES, edge_id=EDGE)
    pub = Publisher(ph.port)
    clients.append(pub.connect())
    n = 300
    bulk = [(f"devices/d1/messages/events/kind=bulk&i={i}", f"bulk-{i}".encode()) for i in range(n)]
    alarms = [(f"devices/d1/messages/events/kind=alarm&i={i}", f"alarm-{i}".encode()) for i in range(n)]

    # The upstream is away: the bulk data is stored first, the alarms after.
    publish_acked(pub, bulk, 0)
    publish_acked(pub, alarms, n)
    ph.hub.wait_queue_depth(2 * n, 20)
    assert collector.count() == 0

    # Each priority's queue is durable: a kill -9 forgets neither.
    pub.close()
    ph.hub.kill9()
    ph.log.mark()
    ph.hub.start()
    ph.log.wait(rf"store opened .*depth={2 * n}\b", 20, "the store reopened with both priorities' messages")

    up.start()
    received = collector.wait_count(2 * n, 60)
    order = first_copies(received)
    assert len(order) == 2 * n, f"missing: {2 * n - len(order)}"
    alarm_payloads = [p for _, p in alarms]
    bulk_payloads = [p for _, p in bulk]
    assert order[:n] == alarm_payloads, f"alarms not first and in order: {order[:10]} ..."
    assert order[n:] == bulk_payloads, f"bulk not after, in order: {order[n:n + 10]} ..."
    ph.hub.wait_queue_depth(0, 30)


def test_a_message_routed_at_two_priorities_is_queued_once_at_the_higher(
    offline_upstream, plugin_hub, clients  # noqa: F811
):
    """Several direct routes to $upstream keep one copy: the first route in
    table order, which is the highest priority."""
    up, collector = offline_upstream()
    routes = {
        **ROUTES,
        "everything-late": {"route": "FROM /messages/* INTO $upstream", "priority": 9},
    }
    ph = plugin_hub(up, routes=routes, edge_id=EDGE)
    pub = Publisher(ph.port)
    clients.append(pub.connect())
    late = [(f"devices/d1/messages/events/kind=other&i={i}", f"other-{i}".encode()) for i in range(50)]
    alarms = [(f"devices/d1/messages/events/kind=alarm&i={i}", f"alarm-{i}".encode()) for i in range(50)]
    publish_acked(pub, late, 0)
    publish_acked(pub, alarms, 50)
    ph.hub.wait_queue_depth(100, 20)  # one copy each

    up.start()
    order = first_copies(collector.wait_count(100, 60))
    assert order == [p for _, p in alarms] + [p for _, p in late]
    ph.hub.wait_queue_depth(0, 30)


def test_with_a_live_share_a_message_stored_after_the_upstream_returns_overtakes_the_backlog(
    offline_upstream, plugin_hub, clients  # noqa: F811
):
    """The drain is paced (4,000 B/s, about 60 records a second) so the
    backlog is still draining when the live message is published."""
    up, collector = offline_upstream()
    ph = plugin_hub(
        up,
        routes={"all": "FROM /messages/* INTO $upstream"},
        edge_id=EDGE,
        extra_args=["--upstream-live-share-percent", "50", "--upstream-max-bytes-per-sec", "4000"],
    )
    pub = Publisher(ph.port)
    clients.append(pub.connect())
    n = 200
    backlog = [(f"devices/d1/messages/events/kind=bulk&i={i}", f"bulk-{i}".encode()) for i in range(n)]
    publish_acked(pub, backlog, 0)
    ph.hub.wait_queue_depth(n, 20)

    up.start()
    ph.hub.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 30, "== 1 after the upstream started")
    assert pub.publish_and_wait("devices/d1/messages/events/kind=live", b"live", qos=1) < 0x80
    order = first_copies(collector.wait_count(n + 1, 60))
    assert len(order) == n + 1
    where = order.index(b"live")
    assert where < n, f"the live message waited behind the whole backlog (position {where} of {n + 1})"
    rest = [p for p in order if p != b"live"]
    assert rest == [p for _, p in backlog], "the backlog still in order"
    ph.hub.wait_queue_depth(0, 30)
