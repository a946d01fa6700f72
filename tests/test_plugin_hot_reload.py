"""Plugins are reloaded while the hub runs: files replaced, refused, deleted
and added in the plugins folder take effect within about a second, without
losing or duplicating messages."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from helpers import assert_strictly_increasing, wait_until
from pluginkit import (  # noqa: F401 - fixtures
    SENTINEL_TOPIC,
    SentinelHub,
    corrupt_bytes,
    dead_letter_props,
    plugin_hub,
    plugins_dist,
    sentinel_hub,
    split_telemetry,
)

EDGE = "edge-h"
RELOAD_TIMEOUT = 10  # "about a second", with room for a slow machine


def upstream_since_last_sentinel(ph: SentinelHub, items, tag: bytes):
    """Publishes ``items`` then a sentinel ``tag`` (b"sentinel-..."); returns
    what arrived upstream between the previous sentinel and this one (one
    client's messages are routed and forwarded in order)."""
    before = ph.publish_then_sentinel(items, tag)
    prev = [i for i, (_, p) in enumerate(before) if p.startswith(b"sentinel-")]
    return before[(prev[-1] + 1 if prev else 0):]


def install_and_wait_loaded(ph, name: str, source, desc: str | None = None) -> str:
    """Puts ``source`` in the plugins folder as ``name`` while the hub runs
    and waits until the hub logs it loaded; returns that log line."""
    ph.log.mark()
    ph.install(name, source)
    return ph.wait_loaded(name, RELOAD_TIMEOUT, desc)


def remove_and_wait_unloaded(ph, name: str) -> None:
    ph.log.mark()
    ph.remove(name)
    ph.wait_unloaded(name, RELOAD_TIMEOUT, f"{name} unloaded")


@contextmanager
def one_reload(ph):
    """The block changes the plugins folder: edgehub_plugin_reloads_total must
    go up by exactly one."""
    reloads = ph.hub.metric("edgehub_plugin_reloads_total")
    yield
    ph.hub.wait_metric("edgehub_plugin_reloads_total", lambda v: v == reloads + 1, 10, f"== {reloads + 1}")


def digest_of(log_line: str) -> str:
    m = re.search(r"version=(\w+)", log_line)
    assert m, f"no version in {log_line!r}"
    return m.group(1)


def start_with_field_filter(sentinel_hub, plugins_dist, name: str, routes: dict, **kw):  # noqa: F811
    """A SentinelHub with ``routes`` and field-filter installed as plugin
    ``name``, once that is loaded; returns it and the loaded version's digest."""
    ph = sentinel_hub(plugins={name: plugins_dist / "field-filter.wasm"}, routes=routes, edge_id=EDGE, **kw)
    return ph, digest_of(ph.wait_loaded(name))


HOT = b'{"temperature": 40}'
COLD = b'{"temperature": 10}'


def test_replacing_a_plugin_under_a_continuous_stream_loses_and_duplicates_nothing(
    sentinel_hub, plugins_dist  # noqa: F811
):
    """Version 1 of plugin "p" is field-filter set to pass everything (it adds
    alert=true); version 2 is dedup (passes these messages unchanged)."""
    ph, v1 = start_with_field_filter(
        sentinel_hub, plugins_dist, "p",
        routes={"r": 'FROM /messages/devices/stream INTO plugin("p")'},
        settings={"p": {"config": {"field": "seq", "above": -1}}},
    )
    topic = "devices/stream/messages/events/%24.ct=application%2Fjson"

    max_messages, window, after_reload = 10_000, 200, 500
    deadline = time.monotonic() + 20
    pub = ph.pub  # inflight 100
    stop = threading.Event()
    sent = [0]
    errors = []

    def produce():
        try:
            i = 0
            while i < max_messages and not stop.is_set() and time.monotonic() < deadline:
                # at most `window` unacknowledged: the stream runs at the
                # hub's pace and spans the reload instead of sitting in paho
                with pub.lock:
                    pub.lock.wait_for(lambda: i - len(pub.acked) < window or stop.is_set(), timeout=10)
                pub.publish(topic, json.dumps({"seq": i}).encode(), key=i)
                i += 1
                sent[0] = i
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    producer = threading.Thread(target=produce, name="stream", daemon=True)
    producer.start()
    try:
        wait_until(lambda: pub.acked_count() >= 500, 20, "500 messages acknowledged before the swap")
        line = install_and_wait_loaded(ph, "p", plugins_dist / "dedup.wasm", "version 2 of p loaded")
        assert f"replaced={v1}" in line or f'replaced="{v1}"' in line, line
        assert producer.is_alive(), (
            f"the stream ({sent[0]} messages) ended before the reload; make it longer"
        )
        at_reload = pub.acked_count()
        wait_until(lambda: pub.acked_count() >= at_reload + after_reload or not producer.is_alive(), 20,
                   f"{after_reload} more messages after the reload")
    finally:
        stop.set()
        producer.join(10)
    assert not errors, errors
    n = sent[0]
    pub.wait_results(n, 30)
    assert len(pub.acked) == n, f"{n - len(pub.acked)} publishes refused"

    assert pub.publish_and_wait(SENTINEL_TOPIC, b"sentinel-stream") < 0x80
    msgs = ph.collector.wait_payload(b"sentinel-stream", 60)
    stream = [(t, json.loads(p)["seq"]) for t, p in msgs if t.startswith("devices/stream/")]
    others = [(t, p) for t, p in msgs if not t.startswith("devices/stream/") and p != b"sentinel-stream"]
    assert not others, f"unexpected upstream messages (dead letters?): {others[:3]}"

    counts = Counter(seq for _, seq in stream)
    missing = [s for s in range(n) if counts[s] == 0]
    dups = {s: c for s, c in counts.items() if c > 1}
    assert not missing and not dups and set(counts) == set(range(n)), (
        f"{n} sent, {len(stream)} arrived; missing {missing[:10]} ({len(missing)}), duplicated {list(dups.items())[:10]}"
    )
    version = {}
    for t, seq in stream:
        _, bag = split_telemetry(t)
        if bag == [("$.ct", "application/json"), ("alert", "true")]:
            version[seq] = 1
        elif bag == [("$.ct", "application/json")]:
            version[seq] = 2
        else:
            raise AssertionError(f"message {seq} came out of neither version: {t}")
    v1_count = sum(1 for v in version.values() if v == 1)
    assert 0 < v1_count < n, f"both versions must have handled messages: v1 {v1_count}, v2 {n - v1_count} of {n}"
    # the registry hands each message the version current when it is routed:
    # in publish order, version 1 then version 2, never back
    switch = [version[s] for s in range(n)]
    first_v2 = switch.index(2)
    assert all(v == 2 for v in switch[first_v2:]), (
        f"version 1 handled messages after version 2 did: {[s for s in range(first_v2, n) if switch[s] == 1][:10]}"
    )
    assert_strictly_increasing([seq for _, seq in stream], "upstream order of the stream")
    assert ph.hub.metric("edgehub_plugin_failures_total") == 0
    assert ph.hub.alive()


def test_a_corrupt_or_wrong_world_file_replacing_a_plugin_leaves_the_old_version_running(
    sentinel_hub, plugins_dist  # noqa: F811
):
    ph, v1 = start_with_field_filter(
        sentinel_hub, plugins_dist, "field-filter", {"r": 'FROM /messages/devices/d1 INTO plugin("field-filter")'}
    )
    t = "devices/d1/messages/events/"
    got = upstream_since_last_sentinel(ph, [(t, COLD), (t, HOT)], b"sentinel-0")
    assert got == [(t + "alert=true", HOT)], got

    valid = (plugins_dist / "field-filter.wasm").read_bytes()
    for i, (what, data, reason, label) in enumerate([
        ("corrupt", corrupt_bytes(valid), "not a valid WebAssembly component", "not_a_component"),
        ("wrong world", (plugins_dist / "wrong-world.wasm").read_bytes(), "exports none of the worlds", "wrong_world"),
    ]):
        ph.log.mark()
        rejected = ph.rejected("field-filter", label)
        filtered = ph.hub.metric("edgehub_messages_filtered_total")
        ph.install("field-filter", data)
        line = ph.wait_refused("field-filter", RELOAD_TIMEOUT, f"{what} file refused")
        assert reason in ph.log.text(), f"{what}: refusal does not say {reason!r}:\n{ph.log.text()}"
        assert f'still_running="{v1}"' in ph.log.text() or f"still_running={v1}" in ph.log.text(), (
            f"{what}: the log does not say the old version keeps running: {line}"
        )
        wait_until(lambda: ph.rejected("field-filter", label) == rejected + 1, 10,
                   f"edgehub_plugin_rejected_total{{plugin=field-filter,reason={label}}} == {rejected + 1}")
        assert "plugin unloaded" not in ph.log.text() and "plugin loaded" not in ph.log.text(), ph.log.text()

        # the old version still filters
        got = upstream_since_last_sentinel(ph, [(t, COLD), (t, HOT)], f"sentinel-{i + 1}".encode())
        assert got == [(t + "alert=true", HOT)], f"after the {what} file: {got}"
        ph.hub.wait_metric("edgehub_messages_filtered_total", lambda v: v >= filtered + 1, 10, "+1")
    assert ph.hub.metric("edgehub_messages_dead_lettered_total") == 0
    assert ph.hub.alive()


def test_deleting_a_plugin_file_unloads_it_and_routes_apply_their_error_policy(
    sentinel_hub, plugins_dist  # noqa: F811
):
    ph, _ = start_with_field_filter(sentinel_hub, plugins_dist, "ff", {
        "dl": 'FROM /messages/devices/a INTO plugin("ff")',
        "ps": {"route": 'FROM /messages/devices/b INTO plugin("ff")', "onError": "pass"},
        "dr": {"route": 'FROM /messages/devices/c INTO plugin("ff")', "onError": "drop"},
    })
    items = [(f"devices/{d}/messages/events/", HOT) for d in "abc"]
    got = upstream_since_last_sentinel(ph, items, b"sentinel-0")
    assert got == [(f"devices/{d}/messages/events/alert=true", HOT) for d in "abc"], got

    with one_reload(ph):
        remove_and_wait_unloaded(ph, "ff")

    filtered = ph.hub.metric("edgehub_messages_filtered_total")
    items = [(f"devices/{d}/messages/events/k={d}", HOT) for d in "abc"]
    got = upstream_since_last_sentinel(ph, items, b"sentinel-1")
    assert len(got) == 2, f"expected a dead letter (a) and the original (b), got {got}"
    props = dead_letter_props(got[0][0], EDGE)
    assert got[0][1] == HOT, got[0]
    assert props.get("deadLetterRoute") == "dl" and "not loaded" in props.get("deadLetterReason", ""), props
    assert got[1] == ("devices/b/messages/events/k=b", HOT), f"onError=pass: {got[1]}"
    ph.hub.wait_metric("edgehub_messages_filtered_total", lambda v: v >= filtered + 1, 10, "+1 (onError=drop)")
    assert ph.hub.metric("edgehub_messages_dead_lettered_total") == 1

    # the same file put back is loaded again
    install_and_wait_loaded(ph, "ff", plugins_dist / "field-filter.wasm", "ff loaded again")
    items = [(f"devices/{d}/messages/events/", HOT) for d in "abc"]
    got = upstream_since_last_sentinel(ph, items, b"sentinel-2")
    assert got == [(f"devices/{d}/messages/events/alert=true", HOT) for d in "abc"], got
    assert ph.hub.metric("edgehub_messages_dead_lettered_total") == 1
    assert ph.hub.alive()


def test_a_plugin_dropped_in_while_running_becomes_usable_by_its_route(
    sentinel_hub, plugins_dist  # noqa: F811
):
    ph = sentinel_hub(
        plugins={},
        routes={"late": 'FROM /messages/devices/d1 INTO plugin("late")'},
        edge_id=EDGE,
    )
    t = "devices/d1/messages/events/"
    got = upstream_since_last_sentinel(ph, [(t, HOT)], b"sentinel-0")
    assert len(got) == 1, f"before: expected a dead letter, got {got}"
    assert "not loaded" in dead_letter_props(got[0][0], EDGE).get("deadLetterReason", ""), got

    with one_reload(ph):
        install_and_wait_loaded(ph, "late", plugins_dist / "field-filter.wasm")

    got = upstream_since_last_sentinel(ph, [(t, COLD), (t, HOT)], b"sentinel-1")
    assert got == [(t + "alert=true", HOT)], f"after: {got}"
    assert ph.hub.metric("edgehub_messages_dead_lettered_total") == 1
    assert ph.hub.alive()


def test_a_new_plugin_is_compiled_in_a_child_process_and_the_hub_loads_the_entry_it_wrote(
    upstream, plugin_hub, plugins_dist  # noqa: F811
):
    ph = plugin_hub(upstream, plugins={"p": plugins_dist / "field-filter.wasm"}, edge_id=EDGE)
    ph.wait_loaded("p")
    compiled = [ln for ln in ph.hub.log_path.read_text().splitlines() if "plugin compiled in a child process" in ln]
    assert len(compiled) == 1, "\n".join(compiled) or "no compile in a child process logged"
    peak = re.search(r"compiler_peak_rss_mib=([0-9.]+)", compiled[0])
    assert peak and float(peak.group(1)) > 0, compiled[0]
    assert len(list((ph.hub.storage / "plugin-cache").glob("*.cwasm"))) == 1


def test_compiled_code_of_replaced_and_removed_versions_is_not_kept(
    upstream, plugin_hub, plugins_dist  # noqa: F811
):
    ph = plugin_hub(
        upstream,
        plugins={"p": plugins_dist / "field-filter.wasm", "q": plugins_dist / "dedup.wasm"},
        edge_id=EDGE,
    )
    ph.wait_loaded("p")
    ph.wait_loaded("q")
    cache = ph.hub.storage / "plugin-cache"

    def compiled() -> list[str]:
        return sorted(f.name for f in cache.glob("*.cwasm"))

    wait_until(lambda: len(compiled()) == 2, 10, "one compiled file per loaded plugin")
    first = compiled()
    install_and_wait_loaded(ph, "p", plugins_dist / "content-router.wasm")  # a new version of p
    wait_until(lambda: len(compiled()) == 2 and compiled() != first, 10,
               "the replaced version's compiled code removed, the new one kept")
    remove_and_wait_unloaded(ph, "q")
    wait_until(lambda: len(compiled()) == 1, 10, "the removed plugin's compiled code removed")
    # the kept entry has its checksum beside it, and no other checksum is left
    # (the prune may still be between an entry and its checksum)
    kept = compiled()[0]
    wait_until(lambda: sorted(f.name for f in cache.iterdir()) == [kept, kept + ".sum"], 10,
               "only the kept entry and its checksum in the cache")


# --------------------------------------------------------------------------
# an idle hub sleeps
# --------------------------------------------------------------------------


def thread_wakeups(pid: int) -> Counter:
    """Voluntary context switches (times a thread went to sleep and was woken)
    of each of the process's threads, summed by thread name."""
    counts: Counter = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            status = (task / "status").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        counts[name] += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))
    return counts


def test_an_idle_hub_neither_rereads_its_plugins_folder_nor_ticks_its_plugin_clock(sentinel_hub, plugins_dist):  # noqa: F811
    """Reading the plugins folder opens it, and the watcher once took that as
    a change: it read and hashed every plugin file again, about seven times a
    second, for ever (18 % of a CPU with the four example field filters in the
    folder). The epoch ticker that bounds plugin calls woke 100 times a second
    with no call running. Both now sleep while nothing happens, and a plugin
    added afterwards is still loaded and called."""
    ph = sentinel_hub(
        plugins={"passthrough": plugins_dist / "passthrough.wasm", "field-filter": plugins_dist / "field-filter.wasm"},
        routes={"hot": 'FROM /messages/devices/* INTO plugin("field-filter") THEN $upstream'},
    )
    for name in ("passthrough", "field-filter"):
        ph.wait_loaded(name)
    hot = ("devices/d1/messages/events/", b'{"temperature": 40}')
    assert [p for _, p in upstream_since_last_sentinel(ph, [hot], b"sentinel-before")] == [hot[1]]
    pid = ph.hub.proc.pid
    before = thread_wakeups(pid)
    time.sleep(3)  # the window itself: nothing happens in it to wait for
    woke = thread_wakeups(pid) - before
    assert woke["plugin-watch"] == 0, f"the folder watcher woke {woke['plugin-watch']} times in 3 s: {woke}"
    # (It runs on for 100 ms, 10 ticks, after the last call.)
    assert woke["plugin-epoch"] <= 12, f"the plugin clock ticked {woke['plugin-epoch']} times in 3 s: {woke}"
    ph.log.mark()
    ph.install("dedup", plugins_dist / "dedup.wasm")
    ph.wait_loaded("dedup", RELOAD_TIMEOUT)
    assert [p for _, p in upstream_since_last_sentinel(ph, [hot], b"sentinel-after")] == [hot[1]]


def test_a_plugins_folder_removed_and_made_again_is_still_watched(sentinel_hub, plugins_dist):  # noqa: F811
    """A deployment that replaces the plugins folder whole (rm -rf, mkdir,
    copy) left the hub watching a folder that no longer existed: plugins put
    in the new one were never loaded. The loaded ones run on while the folder
    is missing, and those in the new folder replace them."""
    ph = sentinel_hub(
        plugins={"field-filter": plugins_dist / "field-filter.wasm"},
        routes={"hot": 'FROM /messages/devices/* INTO plugin("field-filter") THEN $upstream'},
    )
    ph.wait_loaded("field-filter")
    hot = ("devices/d1/messages/events/", b'{"temperature": 40}')
    ph.log.mark()
    shutil.rmtree(ph.folder)
    ph.log.wait(r"cannot read plugins folder", RELOAD_TIMEOUT, "the hub saw the folder go")
    assert [p for _, p in upstream_since_last_sentinel(ph, [hot], b"sentinel-gone")] == [hot[1]], \
        "the loaded filter stopped when its folder went"
    ph.log.mark()
    ph.folder.mkdir()
    ph.install("passthrough", plugins_dist / "passthrough.wasm")
    ph.wait_loaded("passthrough", RELOAD_TIMEOUT, "a plugin in the folder made again")
    ph.wait_unloaded("field-filter", RELOAD_TIMEOUT, "field-filter, not in the new folder")
