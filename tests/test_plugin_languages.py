"""The field filter written in each language (Rust, C, Python, JavaScript)
works inside a running hub: dropped into its plugins folder, given its
settings by the config file, it filters telemetry on its way upstream as
`edgehub plugin test` says it does (plugins/testdata)."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from pluginkit import (  # noqa: F401 - fixtures
    LANGS,
    TESTDATA,
    compile_cache,
    field_filter_wasm,
    keep_compiled,
    plugin_hub,
    plugins_dist,
    sentinel_hub,
    split_telemetry,
    storage_with_cache,
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
    expected = read_jsonl(EXPECTED)
    assert [e["index"] for e in expected] == list(range(len(messages)))
    want = [
        (e["message"]["body"].encode(), e["message"]["properties"])
        for e in expected
        if e["result"] == "pass"
    ]
    assert 0 < len(want) < len(messages), "the test data should pass some messages and drop others"

    got = ph.publish_then_sentinel(telemetry(messages), f"sentinel-{lang}".encode(), timeout=60,
                                   publish_timeout=60)
    # only what passed, in order, marked alert=true by the filter: no dead
    # letters (a failed call would be one), nothing unfiltered
    seen = []
    for topic, payload in got:
        prefix, props = split_telemetry(topic)
        assert prefix == f"devices/{DEVICE}/messages/events/", f"{lang}: unexpected upstream message {topic}"
        seen.append((payload, dict(props)))
    assert seen == want, f"{lang}: upstream got {seen}, expected {want}"
    assert ph.metric("edgehub_plugin_failures_total") == 0
    assert ph.metric("edgehub_messages_filtered_total") == len(messages) - len(want)
