"""The plugin sandbox in a running hub: a misbehaving plugin costs one call,
the route's onError policy decides what happens to that message, and the hub
keeps serving. Files that are not plugins are refused."""

from __future__ import annotations

import re

from helpers import Publisher
from pluginkit import (  # noqa: F401 - fixtures
    corrupt_bytes,
    loaded_re,
    plugin_hub,
    plugins_dist,
    refused_re,
    split_telemetry,
)

EDGE = "edge-s"
SENTINEL_TOPIC = "devices/sentinel/messages/events/"
DEAD_LETTER_PREFIX = f"devices/{EDGE}/modules/$edgeHub/messages/events/"

# mode of the hostile plugin -> what the dead letter's reason must name
MODES = {
    "loop": r"(?i)longer than|timeout|time limit",
    "alloc": r"(?i)memory",
    "trap": r"(?i)trap",
    "huge": r"(?i)bad result",
    "recurse": r"(?i)trap|stack",
}


def routes_for(device: str, on_error: str | None, plugin: str = "hostile") -> dict:
    entry = {"route": f'FROM /messages/devices/{device} INTO plugin("{plugin}")'}
    if on_error:
        entry["onError"] = on_error
    return {device: entry, "sentinel": "FROM /messages/devices/sentinel INTO $upstream"}


def start(plugin_hub, upstream, plugins_dist, routes, **kw):  # noqa: F811
    kw.setdefault("plugins", {"hostile": plugins_dist / "hostile.wasm"})
    ph = plugin_hub(upstream, routes=routes, edge_id=EDGE, **kw)
    for name in kw["plugins"]:
        ph.log.wait(loaded_re(name), 10)
    return ph


def hostile_then_good(device: str):
    """(topic, payload) pairs: each misbehaviour followed by a normal message."""
    items = []
    for i, mode in enumerate(MODES):
        items.append((f"devices/{device}/messages/events/hostile={mode}&seq={i}", f"bad-{mode}".encode()))
        items.append((f"devices/{device}/messages/events/seq={i}", f"good-{mode}".encode()))
    return items


def publish_then_sentinel(pub, collector, items, tag: bytes, timeout: float = 30):
    """Publishes ``items`` (waiting for each acknowledgement), then a
    sentinel; returns what arrived upstream before the sentinel."""
    for topic, payload in items:
        rc = pub.publish_and_wait(topic, payload, timeout=timeout)
        assert rc < 0x80, f"publish on {topic} refused with {rc:#x}"
    assert pub.publish_and_wait(SENTINEL_TOPIC, tag) < 0x80
    msgs = collector.wait_payload(tag, timeout)
    return msgs[: next(i for i, (_, p) in enumerate(msgs) if p == tag)]


def metrics_delta(ph, before: dict, names) -> dict:
    now = ph.hub.metrics()
    return {n: now[n] - before[n] for n in names}


COUNTERS = (
    "edgehub_plugin_failures_total",
    "edgehub_messages_dead_lettered_total",
    "edgehub_messages_filtered_total",
)


def test_hostile_calls_are_dead_lettered_with_the_reason(
    upstream, collector_factory, plugin_hub, plugins_dist, clients  # noqa: F811
):
    collector = collector_factory(upstream)
    # deadletter is the default policy; the limits come from the config:
    # [plugins] for every plugin, [plugins.settings.hostile] overriding one
    ph = start(plugin_hub, upstream, plugins_dist, routes_for("dl", None), timeout_ms=100, memory_mb=32,
               settings={"hostile": {"timeout_ms": 60}})
    pub = Publisher(ph.port)
    clients.append(pub.connect())
    before = ph.hub.metrics()
    items = hostile_then_good("dl")
    got = publish_then_sentinel(pub, collector, items, b"sentinel-dl")

    assert len(got) == len(items), f"expected {len(items)} messages upstream, got {got}"
    for i, mode in enumerate(MODES):
        (dl_topic, dl_payload), (good_topic, good_payload) = got[2 * i], got[2 * i + 1]
        orig_topic = items[2 * i][0]
        assert dl_payload == f"bad-{mode}".encode(), f"{mode}: dead letter carries {dl_payload[:60]!r}"
        prefix, bag = split_telemetry(dl_topic)
        assert prefix == DEAD_LETTER_PREFIX, f"{mode}: dead letter on {dl_topic}"
        props = dict(bag)
        assert props.get("$.on") == "deadletter", f"{mode}: {dl_topic}"
        assert props.get("deadLetterRoute") == "dl", f"{mode}: {dl_topic}"
        assert re.search(MODES[mode], props.get("deadLetterReason", "")), (
            f"{mode}: reason {props.get('deadLetterReason')!r} does not name the failure"
        )
        if mode == "loop":
            assert "60ms" in props["deadLetterReason"], f"per-plugin timeout_ms not applied: {props}"
        if mode == "alloc":
            assert str(32 << 20) in props["deadLetterReason"], f"[plugins] memory_mb not applied: {props}"
        assert props.get("originalSource") == "/messages/devices/dl", dl_topic
        assert props.get("originalTopic") == orig_topic, dl_topic
        assert props.get("hostile") == mode and props.get("seq") == str(i), (
            f"{mode}: the message's own properties are not in the dead letter: {dl_topic}"
        )
        # the instance was replaced: the next message went through the plugin
        assert (good_topic, good_payload) == (items[2 * i + 1][0], f"good-{mode}".encode()), got[2 * i + 1]

    d = metrics_delta(ph, before, COUNTERS)
    assert d["edgehub_plugin_failures_total"] == len(MODES), d
    assert d["edgehub_messages_dead_lettered_total"] == len(MODES), d
    assert ph.hub.alive()


def test_hostile_calls_with_on_error_pass_deliver_the_original(
    upstream, collector_factory, plugin_hub, plugins_dist, clients  # noqa: F811
):
    collector = collector_factory(upstream)
    ph = start(plugin_hub, upstream, plugins_dist, routes_for("ps", "pass"))
    pub = Publisher(ph.port)
    clients.append(pub.connect())
    before = ph.hub.metrics()
    items = hostile_then_good("ps")
    got = publish_then_sentinel(pub, collector, items, b"sentinel-ps")
    # the original of each failed call, unchanged, then the good one
    assert got == items, f"upstream got {[(t, p[:40]) for t, p in got]}"
    d = metrics_delta(ph, before, COUNTERS)
    assert d["edgehub_plugin_failures_total"] == len(MODES), d
    assert d["edgehub_messages_dead_lettered_total"] == 0, d
    assert ph.hub.alive()


def test_hostile_calls_with_on_error_drop_deliver_nothing_and_the_hub_keeps_passing_messages(
    upstream, collector_factory, plugin_hub, plugins_dist, clients  # noqa: F811
):
    collector = collector_factory(upstream)
    ph = start(plugin_hub, upstream, plugins_dist, routes_for("dr", "drop"))
    pub = Publisher(ph.port)
    clients.append(pub.connect())
    before = ph.hub.metrics()
    items = hostile_then_good("dr")
    got = publish_then_sentinel(pub, collector, items, b"sentinel-dr-1")
    assert got == items[1::2], f"expected only the good messages upstream, got {[(t, p[:40]) for t, p in got]}"
    d = metrics_delta(ph, before, COUNTERS)
    assert d["edgehub_plugin_failures_total"] == len(MODES), d
    assert d["edgehub_messages_filtered_total"] == len(MODES), f"dropped messages not counted: {d}"
    assert d["edgehub_messages_dead_lettered_total"] == 0, d

    # a burst of normal messages still goes through the same plugin
    n = 200
    for i in range(n):
        pub.publish(f"devices/dr/messages/events/burst={i}", f"burst-{i}".encode(), key=i)
    pub.wait_results(n + len(items) + 1, 30)
    want = [f"burst-{i}".encode() for i in range(n)]
    msgs = collector.wait_distinct_payloads(set(want), 30)
    assert [p for _, p in msgs if p.startswith(b"burst-")] == want
    assert ph.hub.alive()


def test_a_route_to_a_plugin_that_is_not_loaded_dead_letters(
    upstream, collector_factory, plugin_hub, plugins_dist, clients  # noqa: F811
):
    collector = collector_factory(upstream)
    routes = routes_for("nl", None, plugin="absent")
    routes.update({"np": {"route": 'FROM /messages/devices/np INTO plugin("absent")', "onError": "pass"}})
    ph = start(plugin_hub, upstream, plugins_dist, routes)
    pub = Publisher(ph.port)
    clients.append(pub.connect())
    items = [("devices/nl/messages/events/k=v", b"nobody-home"), ("devices/np/messages/events/k=w", b"passes")]
    got = publish_then_sentinel(pub, collector, items, b"sentinel-nl")
    assert len(got) == 2, got
    prefix, bag = split_telemetry(got[0][0])
    props = dict(bag)
    assert prefix == DEAD_LETTER_PREFIX and got[0][1] == b"nobody-home", got[0]
    assert props.get("deadLetterRoute") == "nl", props
    assert "not loaded" in props.get("deadLetterReason", ""), props
    assert props.get("originalTopic") == "devices/nl/messages/events/k=v", props
    assert got[1] == items[1], f"onError=pass did not send the original on: {got[1]}"
    assert ph.hub.metric("edgehub_messages_dead_lettered_total") == 1


def test_corrupt_and_wrong_world_files_are_refused_while_other_plugins_load(
    upstream, collector_factory, plugin_hub, plugins_dist, clients  # noqa: F811
):
    collector = collector_factory(upstream)
    valid = (plugins_dist / "field-filter.wasm").read_bytes()
    routes = routes_for("ff", None, plugin="field-filter")
    ph = plugin_hub(
        upstream,
        routes=routes,
        edge_id=EDGE,
        plugins={
            "corrupt": corrupt_bytes(),
            "field-filter": plugins_dist / "field-filter.wasm",
            "hostile": plugins_dist / "hostile.wasm",
            "wrong-world": plugins_dist / "wrong-world.wasm",
        },
    )
    log = ph.log
    m = log.wait(refused_re("corrupt"), 10)
    assert "not a valid WebAssembly component" in m.group(0), m.group(0)
    m = log.wait(refused_re("wrong-world"), 10)
    assert "exports none of the worlds" in m.group(0), m.group(0)
    log.wait(loaded_re("field-filter"), 10)
    log.wait(loaded_re("hostile"), 10)
    assert ph.hub.metric("edgehub_plugin_rejected_total") == 2

    # dropped in while running: refused as well
    log.mark()
    ph.install("truncated", corrupt_bytes(valid))
    m = log.wait(refused_re("truncated"), 10)
    assert "not a valid WebAssembly component" in m.group(0), m.group(0)
    ph.hub.wait_metric("edgehub_plugin_rejected_total", lambda v: v == 3, 10, "== 3")
    assert not re.search(r"plugin loaded", log.text()), log.text()

    # the good plugin works
    pub = Publisher(ph.port)
    clients.append(pub.connect())
    items = [("devices/ff/messages/events/", b'{"temperature": 10}'), ("devices/ff/messages/events/", b'{"temperature": 40}')]
    got = publish_then_sentinel(pub, collector, items, b"sentinel-ff")
    assert got == [("devices/ff/messages/events/alert=true", b'{"temperature": 40}')], got
    assert ph.hub.alive()
