"""The plugin sandbox in a running hub: a misbehaving plugin costs one call,
the route's onError policy decides what happens to that message, and the hub
keeps serving. Files that are not plugins are refused."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pluginkit import (  # noqa: F401 - fixtures
    corrupt_bytes,
    dead_letter_props,
    field_filter_wasm,
    plugin_hub,
    plugins_dist,
    sentinel_hub,
)

EDGE = "edge-s"

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
    return {device: entry}


def start(sentinel_hub, plugins_dist, routes, **kw):  # noqa: F811
    """A SentinelHub with ``routes`` (plus the sentinel route) and the hostile
    plugin unless ``plugins`` says otherwise, once every plugin is loaded."""
    kw.setdefault("plugins", {"hostile": plugins_dist / "hostile.wasm"})
    ph = sentinel_hub(routes=routes, edge_id=EDGE, **kw)
    for name in kw["plugins"]:
        ph.wait_loaded(name)
    return ph


def hostile_then_good(device: str):
    """(topic, payload) pairs: each misbehaviour followed by a normal message."""
    items = []
    for i, mode in enumerate(MODES):
        items.append((f"devices/{device}/messages/events/hostile={mode}&seq={i}", f"bad-{mode}".encode()))
        items.append((f"devices/{device}/messages/events/seq={i}", f"good-{mode}".encode()))
    return items


def upstream_before_sentinel(ph, items, tag: bytes):
    """Publishes ``items`` (waiting for each acknowledgement), then a
    sentinel; returns what arrived upstream before the sentinel. 30 s bounds
    leave time for the calls that misbehave."""
    return ph.publish_then_sentinel(items, tag, timeout=30, publish_timeout=30)


def assert_the_field_filter_serves(ph, tag: bytes) -> None:
    """Two readings through the field filter's route: only the hot one
    arrives upstream, marked by the filter."""
    items = [("devices/ff/messages/events/", b'{"temperature": 10}'),
             ("devices/ff/messages/events/", b'{"temperature": 40}')]
    got = upstream_before_sentinel(ph, items, tag)
    assert got == [("devices/ff/messages/events/alert=true", b'{"temperature": 40}')], got


def compile_into_cache(edgehub_bin: str, wasm: Path, cache: Path) -> None:
    """`edgehub plugin compile`: the cache entry a hub would write."""
    r = subprocess.run([edgehub_bin, "plugin", "compile", str(wasm), "--cache", str(cache)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def metrics_delta(ph, before: dict, names) -> dict:
    now = ph.hub.metrics()
    return {n: now[n] - before[n] for n in names}


COUNTERS = (
    "edgehub_plugin_failures_total",
    "edgehub_messages_dead_lettered_total",
    "edgehub_messages_filtered_total",
)


def run_hostile_then_good(ph, device: str, tag: bytes):
    """Sends ``hostile_then_good(device)`` through the hub; returns (the
    messages sent, what arrived upstream, how much COUNTERS went up)."""
    before = ph.hub.metrics()
    items = hostile_then_good(device)
    got = upstream_before_sentinel(ph, items, tag)
    return items, got, metrics_delta(ph, before, COUNTERS)


def test_hostile_calls_are_dead_lettered_with_the_reason(sentinel_hub, plugins_dist):  # noqa: F811
    # deadletter is the default policy; the limits come from the config:
    # [plugins] for every plugin, [plugins.settings.hostile] overriding one
    ph = start(sentinel_hub, plugins_dist, routes_for("dl", None), timeout_ms=100, memory_mb=32,
               settings={"hostile": {"timeout_ms": 400}})
    items, got, d = run_hostile_then_good(ph, "dl", b"sentinel-dl")

    assert len(got) == len(items), f"expected {len(items)} messages upstream, got {got}"
    for i, mode in enumerate(MODES):
        (dl_topic, dl_payload), (good_topic, good_payload) = got[2 * i], got[2 * i + 1]
        orig_topic = items[2 * i][0]
        assert dl_payload == f"bad-{mode}".encode(), f"{mode}: dead letter carries {dl_payload[:60]!r}"
        props = dead_letter_props(dl_topic, EDGE)
        assert props.get("$.on") == "deadletter", f"{mode}: {dl_topic}"
        assert props.get("deadLetterRoute") == "dl", f"{mode}: {dl_topic}"
        assert re.search(MODES[mode], props.get("deadLetterReason", "")), (
            f"{mode}: reason {props.get('deadLetterReason')!r} does not name the failure"
        )
        if mode == "loop":
            assert "400ms" in props["deadLetterReason"], f"per-plugin timeout_ms not applied: {props}"
        if mode == "alloc":
            assert str(32 << 20) in props["deadLetterReason"], f"[plugins] memory_mb not applied: {props}"
        assert props.get("originalSource") == "/messages/devices/dl", dl_topic
        assert props.get("originalTopic") == orig_topic, dl_topic
        assert props.get("hostile") == mode and props.get("seq") == str(i), (
            f"{mode}: the message's own properties are not in the dead letter: {dl_topic}"
        )
        # the instance was replaced: the next message went through the plugin
        assert (good_topic, good_payload) == (items[2 * i + 1][0], f"good-{mode}".encode()), got[2 * i + 1]

    assert d["edgehub_plugin_failures_total"] == len(MODES), d
    assert d["edgehub_messages_dead_lettered_total"] == len(MODES), d
    assert ph.hub.alive()


def test_hostile_calls_with_on_error_pass_deliver_the_original(sentinel_hub, plugins_dist):  # noqa: F811
    ph = start(sentinel_hub, plugins_dist, routes_for("ps", "pass"))
    items, got, d = run_hostile_then_good(ph, "ps", b"sentinel-ps")
    # the original of each failed call, unchanged, then the good one
    assert got == items, f"upstream got {[(t, p[:40]) for t, p in got]}"
    assert d["edgehub_plugin_failures_total"] == len(MODES), d
    assert d["edgehub_messages_dead_lettered_total"] == 0, d
    assert ph.hub.alive()


def test_hostile_calls_with_on_error_drop_deliver_nothing_and_the_hub_keeps_passing_messages(
    sentinel_hub, plugins_dist  # noqa: F811
):
    ph = start(sentinel_hub, plugins_dist, routes_for("dr", "drop"))
    items, got, d = run_hostile_then_good(ph, "dr", b"sentinel-dr-1")
    assert got == items[1::2], f"expected only the good messages upstream, got {[(t, p[:40]) for t, p in got]}"
    assert d["edgehub_plugin_failures_total"] == len(MODES), d
    assert d["edgehub_messages_filtered_total"] == len(MODES), f"dropped messages not counted: {d}"
    assert d["edgehub_messages_dead_lettered_total"] == 0, d

    # a burst of normal messages still goes through the same plugin
    n = 200
    for i in range(n):
        ph.pub.publish(f"devices/dr/messages/events/burst={i}", f"burst-{i}".encode(), key=i)
    ph.pub.wait_results(n + len(items) + 1, 30)
    want = [f"burst-{i}".encode() for i in range(n)]
    msgs = ph.collector.wait_distinct_payloads(set(want), 30)
    assert [p for _, p in msgs if p.startswith(b"burst-")] == want
    assert ph.hub.alive()


# mode of the hostile-view plugin -> what the dead letter's reason must name
VIEW_MODES = {
    "past": r"past the 1 lent",
    "short": r"(?i)bad result: filter-views returned 0 results for 1 messages",
    "huge": r"(?i)bad result: result of \d+ bytes is over the limit",
    "topic-nul": r"(?i)topic refused",
}


def test_a_view_filter_that_reads_past_its_batch_or_answers_wrongly_fails_only_the_message_at_fault(
    sentinel_hub, plugins_dist  # noqa: F811
):
    """What a view filter does wrong (reading a message it was not lent, too
    few verdicts, a replacement over the output limit or on a topic no
    broker takes) fails the call of the message at fault: it is
    dead-lettered with the reason, and the messages around it, in the same
    batch, go upstream as published."""
    ph = start(sentinel_hub, plugins_dist, routes_for("hv", None, "hostile-view"),
               plugins={"hostile-view": plugins_dist / "hostile-view.wasm"})
    items = []
    for i, mode in enumerate(VIEW_MODES):
        items.append((f"devices/hv/messages/events/hostile={mode}&seq={i}", f"bad-{mode}".encode()))
        items.append((f"devices/hv/messages/events/seq={i}", f"good-{mode}".encode()))
    before = ph.hub.metrics()
    got = upstream_before_sentinel(ph, items, b"sentinel-hv")
    d = metrics_delta(ph, before, COUNTERS)
    assert len(got) == len(items), f"expected {len(items)} messages upstream, got {[(t, p[:40]) for t, p in got]}"
    for i, mode in enumerate(VIEW_MODES):
        (dl_topic, dl_payload), good = got[2 * i], got[2 * i + 1]
        assert dl_payload == f"bad-{mode}".encode(), f"{mode}: {dl_payload[:60]!r}"
        props = dead_letter_props(dl_topic, EDGE)
        assert re.search(VIEW_MODES[mode], props.get("deadLetterReason", "")), (
            f"{mode}: reason {props.get('deadLetterReason')!r} does not name the failure"
        )
        assert props.get("originalTopic") == items[2 * i][0], dl_topic
        assert good == items[2 * i + 1], f"{mode}: the kept message changed: {good}"
    assert d["edgehub_messages_dead_lettered_total"] == len(VIEW_MODES), d
    assert ph.hub.alive()


def test_a_route_to_a_plugin_that_is_not_loaded_dead_letters(sentinel_hub, plugins_dist):  # noqa: F811
    routes = {**routes_for("nl", None, plugin="absent"), **routes_for("np", "pass", plugin="absent")}
    ph = start(sentinel_hub, plugins_dist, routes)
    items = [("devices/nl/messages/events/k=v", b"nobody-home"), ("devices/np/messages/events/k=w", b"passes")]
    got = upstream_before_sentinel(ph, items, b"sentinel-nl")
    assert len(got) == 2, got
    props = dead_letter_props(got[0][0], EDGE)
    assert got[0][1] == b"nobody-home", got[0]
    assert props.get("deadLetterRoute") == "nl", props
    assert "not loaded" in props.get("deadLetterReason", ""), props
    assert props.get("originalTopic") == "devices/nl/messages/events/k=v", props
    assert got[1] == items[1], f"onError=pass did not send the original on: {got[1]}"
    assert ph.hub.metric("edgehub_messages_dead_lettered_total") == 1


def test_corrupt_and_wrong_world_files_are_refused_while_other_plugins_load(
    sentinel_hub, plugins_dist  # noqa: F811
):
    valid = (plugins_dist / "field-filter.wasm").read_bytes()
    ph = sentinel_hub(
        routes=routes_for("ff", None, plugin="field-filter"),
        edge_id=EDGE,
        plugins={
            "corrupt": corrupt_bytes(),
            "field-filter": plugins_dist / "field-filter.wasm",
            "hostile": plugins_dist / "hostile.wasm",
            "wrong-world": plugins_dist / "wrong-world.wasm",
        },
    )
    line = ph.wait_refused("corrupt")
    assert "not a valid WebAssembly component" in line, line
    line = ph.wait_refused("wrong-world")
    assert "exports none of the worlds" in line, line
    ph.wait_loaded("field-filter")
    ph.wait_loaded("hostile")
    assert ph.hub.metric("edgehub_plugin_rejected_total") == 2
    assert (ph.rejected("corrupt", "not_a_component"), ph.rejected("wrong-world", "wrong_world")) == (1, 1)

    # dropped in while running: refused as well
    ph.log.mark()
    ph.install("truncated", corrupt_bytes(valid))
    line = ph.wait_refused("truncated")
    assert "not a valid WebAssembly component" in line, line
    ph.hub.wait_metric("edgehub_plugin_rejected_total", lambda v: v == 3, 10, "== 3")
    assert ph.rejected("truncated", "not_a_component") == 1
    assert not re.search(r"plugin loaded", ph.log.text()), ph.log.text()

    # the good plugin works
    assert_the_field_filter_serves(ph, b"sentinel-ff")
    assert ph.hub.alive()


def compiler_children(hub_pid: int) -> list[str]:
    """Command lines of the hub's child processes that compile a plugin."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = int(re.search(r"^PPid:\s*(\d+)", status.read_text(), re.M).group(1))
            cmdline = (status.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, AttributeError):
            continue  # the process ended meanwhile
        if ppid == hub_pid and "plugin compile" in cmdline:
            found.append(cmdline)
    return found


def test_a_plugin_whose_compile_outlasts_the_time_limit_is_refused_its_compiler_stopped_and_other_plugins_serve(
    sentinel_hub, plugins_dist, edgehub_bin, tmp_path  # noqa: F811
):
    # The Python field filter takes seconds to compile (a 18 MiB component);
    # the limit is one second. The Rust field filter is compiled into the
    # hub's cache beforehand, so it loads without a compile.
    slow = field_filter_wasm(plugins_dist, "python")
    storage = tmp_path / "storage"
    compile_into_cache(edgehub_bin, plugins_dist / "field-filter.wasm", storage / "plugin-cache")
    ph = sentinel_hub(
        routes=routes_for("ff", None, plugin="field-filter"),
        edge_id=EDGE,
        storage=storage,
        plugins={"field-filter": plugins_dist / "field-filter.wasm", "slow": slow},
        extra_args=["--plugin-compile-timeout-secs", "1"],
    )
    line = ph.wait_refused("slow", 60, "the slow plugin refused")
    assert "compiling took longer than 1 s" in line, line
    assert compiler_children(ph.hub.proc.pid) == [], "the compiler's process is still running"
    ph.wait_loaded("field-filter")
    assert ph.hub.metric("edgehub_plugin_rejected_total") == 1
    assert ph.rejected("slow", "compile_timeout") == 1
    assert not re.search(r"plugin=slow.*plugin loaded|plugin loaded.*plugin=slow", ph.log.text(False))

    assert_the_field_filter_serves(ph, b"sentinel-slow")
    assert ph.hub.alive()


def test_a_plugin_file_over_the_size_limit_is_refused_unread_and_the_running_version_stays(
    sentinel_hub, plugins_dist  # noqa: F811
):
    over = b"\0asm" + b"\xff" * (2 << 20)  # 2 MiB, against a 1 MiB limit
    ph = sentinel_hub(
        routes=routes_for("ff", None, plugin="field-filter"),
        edge_id=EDGE,
        plugins={"field-filter": plugins_dist / "field-filter.wasm", "big": over},
        extra_args=["--plugin-max-file-mb", "1"],
    )
    line = ph.wait_refused("big")
    assert f"the file is {len(over)} bytes, over the limit of 1048576 bytes" in line, line
    ph.wait_loaded("field-filter")

    # a replacement over the limit leaves the running version in place
    ph.log.mark()
    ph.install("field-filter", over)
    line = ph.wait_refused("field-filter")
    assert "over the limit" in line and "still_running=" in line and "still_running=none" not in line, line
    ph.hub.wait_metric("edgehub_plugin_rejected_total", lambda v: v == 2, 10, "== 2")
    assert (ph.rejected("big", "file_too_large"), ph.rejected("field-filter", "file_too_large")) == (1, 1)
    assert_the_field_filter_serves(ph, b"sentinel-big")
    assert ph.hub.alive()


def test_a_damaged_compiled_plugin_in_the_cache_is_compiled_again_not_run(
    sentinel_hub, plugins_dist, edgehub_bin, tmp_path  # noqa: F811
):
    storage = tmp_path / "storage"
    cache = storage / "plugin-cache"
    compile_into_cache(edgehub_bin, plugins_dist / "field-filter.wasm", cache)
    [entry] = cache.glob("*.cwasm")
    assert entry.with_name(entry.name + ".sum").is_file(), sorted(p.name for p in cache.iterdir())
    # A worn flash card damages the compiled code: the middle half of the
    # entry, where its machine code is, overwritten with trap instructions
    # (run as it is, it stops the hub with SIGTRAP as the plugin loads).
    damaged = bytearray(entry.read_bytes())
    n = len(damaged)
    damaged[n // 4:3 * n // 4] = b"\xcc" * (3 * n // 4 - n // 4)
    entry.write_bytes(bytes(damaged))

    ph = sentinel_hub(
        routes=routes_for("ff", None, plugin="field-filter"),
        edge_id=EDGE,
        storage=storage,
        plugins={"field-filter": plugins_dist / "field-filter.wasm"},
    )
    line = ph.wait_loaded("field-filter", 60)
    assert "from_cache=false" in line, line
    log = ph.log.text(False)
    assert re.search(r"compiled plugin cache entry unusable; recompiling.*checksum does not match", log), log
    assert entry.read_bytes() != bytes(damaged), "the damaged entry was not replaced"

    assert_the_field_filter_serves(ph, b"sentinel-cache")
    assert ph.hub.alive()
