"""Module inputs: what a route sends to `BrokeredEndpoint("/modules/{m}/inputs/{i}")`
is stored before the sender's PUBACK, waits for a module that is away (also
across a kill -9), reaches it in order on
`devices/{edge}/modules/{m}/inputs/{i}/{properties}` once it subscribes, and
leaves the store only on the module's PUBACK; an endpoint past its bound
drops (and counts) what comes next without refusing the sender; expired
messages are not delivered."""

from __future__ import annotations

import re
import struct
import uuid

from authkit import subscribe_packet
from helpers import (
    PUBLISH,
    Publisher,
    RawClient,
    Subscriber,
    WaitTimeout,
    assert_strictly_increasing,
    first_occurrences,
    wait_until,
)
from pluginkit import hub_config_text

EDGE = "edge-mi"
MODULE = "filter"
INPUT = "in1"
INPUT_FILTER = f"devices/{EDGE}/modules/{MODULE}/inputs/#"
INPUT_PREFIX = f"devices/{EDGE}/modules/{MODULE}/inputs/{INPUT}/"
TO_INPUT = f'FROM /messages/* INTO BrokeredEndpoint("/modules/{MODULE}/inputs/{INPUT}")'
QUEUED = "edgehub_module_inputs_queued"
EXPIRED = "edgehub_messages_expired_total"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def inputs_hub(hub_factory, tmp_path, routes: dict, upstream=None, extra_args=(), store: str = "", **kw):
    """A hub (edge id EDGE, no device scope: anonymous clients) whose config
    file holds ``routes`` (and ``store``, lines of its ``[store]`` table)."""
    cfg = tmp_path / f"routes-{uuid.uuid4().hex[:8]}.toml"
    cfg.write_text(hub_config_text(routes=routes) + (f"\n[store]\n{store}\n" if store else ""))
    return hub_factory(upstream, edge_id=EDGE, extra_args=["--config", str(cfg), *extra_args], **kw)


def reading(i: int) -> tuple[str, bytes]:
    """Message ``i`` of device d1: (topic, payload)."""
    return f"devices/d1/messages/events/seq={i}", f"reading-{i:04d}".encode()


def publish_acknowledged(port: int, clients: list, items: list[tuple[str, bytes]], timeout: float = 60.0) -> None:
    """Publishes ``items`` at QoS 1, pipelined, and waits until every one is
    acknowledged with success."""
    pub = Publisher(port, inflight=100)
    clients.append(pub.connect())
    for i, (topic, payload) in enumerate(items):
        pub.publish(topic, payload, key=i)
    pub.wait_results(len(items), timeout)
    refused = {k: rc for k, rc in pub.results.items() if rc != 0}
    assert not refused, f"publishes refused (index: reason code): {refused}"
    pub.close()


def connect_module(port: int, clients: list, client_id: str = MODULE) -> Subscriber:
    """The module: a clean-session client subscribed at QoS 1 to its inputs."""
    sub = Subscriber(port, client_id=client_id)
    clients.append(sub.connect())
    assert sub.subscribe(INPUT_FILTER, qos=1) == 1
    return sub


def payloads(sub: Subscriber) -> list[bytes]:
    return [p for _, p in sub.received()]


def wait_payloads(hub, sub: Subscriber, n: int, timeout: float, desc: str) -> list[bytes]:
    """Waits until ``sub`` received ``n`` distinct payloads; returns every
    payload it received, in order."""
    seen: set[bytes] = set()
    looked = [0]  # messages already looked at: each wake-up looks only at new ones

    def enough(ms) -> bool:
        seen.update(bytes(m.payload) for m in ms[looked[0]:])
        looked[0] = len(ms)
        return len(seen) >= n

    try:
        sub.wait_for(enough, timeout, desc)
    except WaitTimeout:
        got = first_occurrences(payloads(sub))
        raise WaitTimeout(
            f"timed out after {timeout}s waiting for {desc}: {len(got)} distinct received"
            f" (the last {got[-1:]}); {QUEUED} = {hub.metric(QUEUED)},"
            f" dropped as slow_subscriber: {dropped(hub, 'slow_subscriber')},"
            f" as module_input_full: {dropped(hub, 'module_input_full')}"
        ) from None
    return payloads(sub)


def dropped(hub, reason: str) -> float:
    m = re.search(
        r'^edgehub_messages_dropped_total\{reason="' + re.escape(reason) + r'"\} (\S+)$',
        hub.metrics_text(),
        re.MULTILINE,
    )
    return float(m.group(1)) if m else 0.0


def read_publish(raw: RawClient, timeout: float = 10.0) -> tuple[int, str, int, bytes]:
    """Reads packets until a PUBLISH; returns (qos, topic, packet id, payload)."""
    while True:
        p = raw.read_packet(timeout)
        assert p is not None, "the hub closed the connection before a PUBLISH"
        kind, flags, body = p
        if kind != PUBLISH:
            continue
        qos = (flags >> 1) & 3
        (n,) = struct.unpack("!H", body[:2])
        topic = body[2:2 + n].decode()
        i = 2 + n
        pid = 0
        if qos:
            (pid,) = struct.unpack("!H", body[i:i + 2])
            i += 2
        return qos, topic, pid, body[i:]


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


def test_a_module_away_gets_everything_routed_to_it_in_order_once_it_subscribes(hub_factory, tmp_path, clients):
    hub = inputs_hub(hub_factory, tmp_path, {"to-filter": TO_INPUT})
    items = [reading(i) for i in range(200)]
    publish_acknowledged(hub.port, clients, items)
    hub.wait_metric(QUEUED, lambda v: v == 200, 10, "== 200 while the module is away")

    module = connect_module(hub.port, clients)
    got = wait_payloads(hub, module, 200, 30, "the 200 messages at the module")
    assert got == [p for _, p in items], "every message once, in the order the device sent them"
    topics = [t for t, _ in module.received()]
    assert topics == [f"{INPUT_PREFIX}seq={i}" for i in range(200)], "on the input topic with the property bag"
    hub.wait_metric(QUEUED, lambda v: v == 0, 15, "== 0 once the module acknowledged them all")


def test_a_module_away_gets_a_backlog_of_thousands_in_full_once_it_subscribes(hub_factory, tmp_path, clients):
    """More than one connection's worth of deliveries at once (well inside
    the endpoint's bound of 10000): the module gets all of them, without
    another message or subscription to push the rest, and nothing is
    counted as dropped."""
    hub = inputs_hub(hub_factory, tmp_path, {"to-filter": TO_INPUT})
    n = 3000
    items = [reading(i) for i in range(n)]
    publish_acknowledged(hub.port, clients, items)
    hub.wait_metric(QUEUED, lambda v: v == n, 10, f"== {n} while the module is away")

    module = connect_module(hub.port, clients)
    got = wait_payloads(hub, module, n, 30, f"the {n} messages at the module")
    assert got == [p for _, p in items], "every message once, in order"
    hub.wait_metric(QUEUED, lambda v: v == 0, 15, "== 0 once the module acknowledged them all")
    assert hub.metric("edgehub_messages_dropped_total") == 0, hub.metrics_text()


def test_module_input_messages_acknowledged_to_the_sender_survive_a_kill_9_and_arrive_in_order(
    hub_factory, tmp_path, clients
):
    # no upstream: what is acknowledged exists only in the hub's store
    hub = inputs_hub(hub_factory, tmp_path, {"to-filter": TO_INPUT})
    items = [reading(i) for i in range(100)]
    publish_acknowledged(hub.port, clients, items)
    hub.kill9()
    hub.start()
    hub.wait_metric(QUEUED, lambda v: v == 100, 15, "== 100 after the restart")

    module = connect_module(hub.port, clients)
    got = wait_payloads(hub, module, 100, 30, "the 100 messages at the module after the restart")
    assert got == [p for _, p in items], "every message once, in order"
    hub.wait_metric(QUEUED, lambda v: v == 0, 15, "== 0 once the module acknowledged them all")


def test_a_message_leaves_the_module_input_only_on_the_modules_puback(hub_factory, tmp_path, clients):
    hub = inputs_hub(hub_factory, tmp_path, {"to-filter": TO_INPUT})
    publish_acknowledged(hub.port, clients, [("devices/d1/messages/events/k=v", b"unacknowledged")])

    # a module that reads the message and never acknowledges it
    raw = RawClient(hub.port)
    clients.append(raw)
    raw.connect(MODULE)
    raw.send(subscribe_packet([INPUT_FILTER], packet_id=1))
    qos, topic, _, payload = read_publish(raw)
    assert (qos, topic, payload) == (1, f"{INPUT_PREFIX}k=v", b"unacknowledged")
    assert hub.metric(QUEUED) == 1, "removed before the module's PUBACK"
    raw.close(abort=True)

    # the module comes back: the message is sent again and acknowledged
    module = connect_module(hub.port, clients)
    module.wait_for(lambda ms: any(m.payload == b"unacknowledged" for m in ms), 15, "the message again")
    hub.wait_metric(QUEUED, lambda v: v == 0, 15, "== 0 after the PUBACK")
    module.close()

    # and once acknowledged it is not sent again: a later message comes first
    module = connect_module(hub.port, clients)
    publish_acknowledged(hub.port, clients, [("devices/d1/messages/events/k=w", b"later")])
    module.wait_for(lambda ms: any(m.payload == b"later" for m in ms), 15, "the later message")
    assert payloads(module) == [b"later"], "the acknowledged message was delivered again"


def test_a_full_module_input_keeps_its_first_messages_drops_the_rest_with_a_count_and_the_sender_and_upstream_see_all(
    upstream, collector_factory, hub_factory, tmp_path, clients
):
    collector = collector_factory(upstream)
    hub = inputs_hub(
        hub_factory, tmp_path,
        {"to-filter": TO_INPUT, "to-cloud": "FROM /messages/* INTO $upstream"},
        upstream=upstream,
        extra_args=["--module-input-max-messages", "5"],
    )
    items = [reading(i) for i in range(8)]
    publish_acknowledged(hub.port, clients, items)  # all eight: success
    wait_until(lambda: dropped(hub, "module_input_full") == 3, 10, "three counted as module_input_full")
    assert hub.metric(QUEUED) == 5
    got = collector.wait_distinct_payloads({p for _, p in items}, 20)
    assert first_occurrences(p for _, p in got) == [p for _, p in items], "the upstream copy of all eight"

    module = connect_module(hub.port, clients)
    wait_payloads(hub, module, 5, 15, "the five kept")
    hub.wait_metric(QUEUED, lambda v: v == 0, 15, "== 0 once acknowledged")
    # room again: the next message is taken; the three dropped never come
    publish_acknowledged(hub.port, clients, [reading(8)])
    module.wait_for(lambda ms: any(m.payload == reading(8)[1] for m in ms), 15, "the ninth message")
    assert payloads(module) == [p for _, p in items[:5]] + [reading(8)[1]]
    assert dropped(hub, "module_input_full") == 3


def test_a_module_input_message_past_its_routes_time_to_live_is_not_delivered_and_is_counted(
    hub_factory, tmp_path, clients
):
    hub = inputs_hub(hub_factory, tmp_path, {
        "fresh": 'FROM /messages/* INTO BrokeredEndpoint("/modules/filter/inputs/fresh")',
        "stale": {
            "route": 'FROM /messages/* INTO BrokeredEndpoint("/modules/filter/inputs/stale")',
            "timeToLiveSecs": 0,
        },
    })
    expired_before = hub.metric(EXPIRED)
    publish_acknowledged(hub.port, clients, [("devices/d1/messages/events/", b"both")])
    module = connect_module(hub.port, clients)
    hub.wait_metric(EXPIRED, lambda v: v == expired_before + 1, 15, "+1 (the copy for the stale input)")
    hub.wait_metric(QUEUED, lambda v: v == 0, 15, "== 0: one acknowledged, one expired")
    assert [t for t, _ in module.received()] == [f"devices/{EDGE}/modules/filter/inputs/fresh/"]


def test_a_module_that_subscribes_while_a_device_streams_receives_every_message_in_the_order_sent(
    hub_factory, tmp_path, clients
):
    """The module subscribes with thousands of messages waiting while the
    device keeps publishing (pipelined, 100 in flight): the waiting messages
    and the new ones reach it in one order, the device's. The input's bound
    is above the whole stream: a module slower than the device would
    otherwise see the newest dropped once 10,000 wait (the bound has a test
    of its own)."""
    n = 20_000
    hub = inputs_hub(hub_factory, tmp_path, {"to-filter": TO_INPUT}, store=f"module_input_max_messages = {2 * n}")
    items = [reading(i) for i in range(n)]
    pub = Publisher(hub.port, inflight=100)
    clients.append(pub.connect())
    for i, (topic, payload) in enumerate(items[:5000]):
        pub.publish(topic, payload, key=i)
    pub.wait_results(2000, 60)
    module = connect_module(hub.port, clients)
    for i, (topic, payload) in enumerate(items[5000:], 5000):
        pub.publish(topic, payload, key=i)
    pub.wait_results(n, 120)
    assert all(rc == 0 for rc in pub.results.values()), "a publish was refused"

    got = wait_payloads(hub, module, n, 60, f"the {n} messages at the module")
    seqs = [int(p.split(b"-")[1]) for p in first_occurrences(got)]
    assert sorted(seqs) == list(range(n)), "messages lost"
    assert_strictly_increasing(seqs, "first deliveries at the module")
    hub.wait_metric(QUEUED, lambda v: v == 0, 15, "== 0 once the module acknowledged them all")
