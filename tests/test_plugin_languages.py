"""The field filter written in each language (Rust, C, Python, JavaScript)
works inside a running hub: dropped into its plugins folder, given its
settings by the config file, it filters telemetry on its way upstream as
`edgehub plugin test` says it does (plugins/testdata).

A hub that starts with a plugin still to compile (the Python one takes
seconds on a cold cache) serves devices at once; a message for the plugin's
route waits for it, and goes through it, rather than meeting the route's
policy for a plugin that is not loaded."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import pytest

from pluginkit import (  # noqa: F401 - fixtures
    LANGS,
    SENTINEL_ROUTE,
    TESTDATA,
    compile_cache,
    connect_publisher,
    field_filter_wasm,
    keep_compiled,
    plugin_hub,
    loaded_re,
    plugins_dist,
    sentinel_hub,
    split_telemetry,
    storage_with_cache,
    upstream_before_sentinel,
)

EDGE = "edge-lang"
DEVICE = "ff"
# the humidity settings of the field filter's README, and their expected results
CONFIG = {"field": "humidity", "above": 40.5}
EXPECTED = TESTDATA / "field-filter.humidity.expected.jsonl"
# Python and JavaScript components take seconds to compile (more on a busy
# machine); the first call of a fresh instance starts their runtime
LOAD_TIMEOUT = 180
CALL_TIMEOUT_MS = 5000


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def bag(props: dict) -> str:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in props.items())


def telemetry(messages) -> list[tuple[str, bytes]]:
    """The test messages as (topic, payload) of DEVICE, application
    properties in the topic's property bag."""
    return [
        (f"devices/{DEVICE}/messages/events/{bag(m.get('properties', {}))}", m["body"].encode())
        for m in messages
    ]


def expected_upstream(messages) -> list[tuple[bytes, dict]]:
    """What the filter with CONFIG passes of ``messages``: (body, properties)."""
    expected = read_jsonl(EXPECTED)
    assert [e["index"] for e in expected] == list(range(len(messages)))
    return [(e["message"]["body"].encode(), e["message"]["properties"]) for e in expected if e["result"] == "pass"]


def upstream_seen(got, lang: str) -> list[tuple[bytes, dict]]:
    """(body, properties) of what arrived upstream; each must be DEVICE's telemetry."""
    seen = []
    for topic, payload in got:
        prefix, props = split_telemetry(topic)
        assert prefix == f"devices/{DEVICE}/messages/events/", f"{lang}: unexpected upstream message {topic}"
        seen.append((payload, dict(props)))
    return seen


@pytest.mark.parametrize("lang", LANGS)
def test_the_field_filter_of_each_language_filters_telemetry_inside_a_running_hub(
    sentinel_hub, plugins_dist, compile_cache, tmp_path, lang  # noqa: F811
):
    wasm = field_filter_wasm(plugins_dist, lang)
    name = f"field-filter-{lang}"
    storage = storage_with_cache(tmp_path / "storage", compile_cache)
    ph = sentinel_hub(
        routes={DEVICE: {"route": f'FROM /messages/devices/{DEVICE} INTO plugin("{name}")'}},
        settings={name: {"config": CONFIG, "timeout_ms": CALL_TIMEOUT_MS}},
        edge_id=EDGE,
        storage=storage,
    )

    # dropped into the folder of the running hub
    ph.log.mark()
    ph.install(name, wasm)
    line = ph.wait_loaded(name, LOAD_TIMEOUT, f"{name} loaded")
    assert "kind=" in line, line
    keep_compiled(storage, compile_cache)

    messages = read_jsonl(TESTDATA / "messages.jsonl")
    want = expected_upstream(messages)
    assert 0 < len(want) < len(messages), "the test data should pass some messages and drop others"

    got = ph.publish_then_sentinel(telemetry(messages), f"sentinel-{lang}".encode(), timeout=60,
                                   publish_timeout=60)
    # only what passed, in order, marked alert=true by the filter: no dead
    # letters (a failed call would be one), nothing unfiltered
    seen = upstream_seen(got, lang)
    assert seen == want, f"{lang}: upstream got {seen}, expected {want}"
    assert ph.metric("edgehub_plugin_failures_total") == 0
    assert ph.metric("edgehub_messages_filtered_total") == len(messages) - len(want)


def test_a_hub_starting_with_a_plugin_to_compile_serves_devices_at_once_and_the_route_waits_for_the_plugin(
    upstream, collector_factory, plugin_hub, plugins_dist, clients  # noqa: F811
):
    # the Python filter: seconds to compile, and this hub's storage has no
    # compiled copy (a first start)
    wasm = field_filter_wasm(plugins_dist, "python")
    name = "field-filter-python"
    collector = collector_factory(upstream)
    ph = plugin_hub(
        upstream,
        routes={DEVICE: {"route": f'FROM /messages/devices/{DEVICE} INTO plugin("{name}")'},
                "sentinel": SENTINEL_ROUTE},
        plugins={name: wasm},
        settings={name: {"config": CONFIG, "timeout_ms": CALL_TIMEOUT_MS}},
        edge_id=EDGE,
    )
    loaded = re.compile(loaded_re(name))

    # the hub listens, and a device is served, before the plugin is loaded
    pub = connect_publisher(ph.port, clients, inflight=1000)
    assert not loaded.search(ph.log.text(since_mark=False)), "the plugin was loaded before a device was served"

    # messages for its route: the first is taken while the plugin compiles
    # (the session then waits for the plugin before it reads on)
    messages = read_jsonl(TESTDATA / "messages.jsonl")
    for topic, payload in telemetry(messages):
        pub.publish(topic, payload)
    ph.wait_metric("edgehub_messages_received_total", lambda v: v >= 1, 30, ">= 1 (a message taken)")
    assert not loaded.search(ph.log.text(since_mark=False)), \
        "the plugin was loaded before the hub took a message: nothing here waited for it"

    # they waited for the plugin and went through it: what it passes, in
    # order, and no dead letter of a plugin "not loaded"
    pub.wait_results(len(messages), LOAD_TIMEOUT)
    assert all(rc == 0 for rc in pub.results.values()), pub.results
    assert loaded.search(ph.log.text(since_mark=False))
    got = upstream_before_sentinel(pub, collector, b"sentinel-first-start", timeout=60)
    assert upstream_seen(got, "python") == expected_upstream(messages)
    assert ph.metric("edgehub_plugin_failures_total") == 0
    assert ph.metric("edgehub_messages_dead_lettered_total") == 0
