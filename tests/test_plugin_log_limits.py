"""A plugin cannot flood the hub's log: its ``host.log`` lines pass a token
bucket of lines per second (shared by all its calls and instances) and are
cut to a length limit; what is dropped is counted and summarised, and other
traffic flows."""

from __future__ import annotations

import re
import time

from pluginkit import plugin_hub, plugins_dist, sentinel_hub  # noqa: F401 - fixtures

EDGE = "edge-l"
DEVICE = "chatty"

# [plugins.settings.hostile]: a small budget so the bound below is tight
RATE, BURST, MAX_LINE = 5, 10, 100
HOSTILE_LINE = 1024  # what the hostile plugin's `log` mode writes per line
CUT_MARK = f"… (cut, {HOSTILE_LINE - MAX_LINE} bytes)"
# one written line: the cut text, the marker, a timestamp, level, target and fields
LINE_OVERHEAD = 200
# room for the hub's own lines while the test runs (start-up is before the mark)
OTHER_LINES_BYTES = 64 * 1024

SUMMARY_RE = re.compile(r"plugin log rate limited: dropped (\d+) lines in the last [0-9.]+s")


def topic(props: str) -> str:
    return f"devices/{DEVICE}/messages/events/{props}"


def plugin_lines(text: str) -> list[str]:
    """The lines the hostile plugin got into the log (its text is all 'x')."""
    return [line for line in text.splitlines() if "x" * MAX_LINE in line]


def test_a_plugin_logging_in_a_loop_keeps_the_hub_log_small_and_traffic_flowing(
    sentinel_hub, plugins_dist  # noqa: F811
):
    ph = sentinel_hub(
        routes={DEVICE: {"route": f'FROM /messages/devices/{DEVICE} INTO plugin("hostile")', "onError": "pass"}},
        plugins={"hostile": plugins_dist / "hostile.wasm"},
        settings={"hostile": {"log_lines_per_sec": RATE, "log_burst": BURST, "log_max_line_bytes": MAX_LINE,
                              "timeout_ms": 300}},
        edge_id=EDGE,
    )
    ph.wait_loaded("hostile")
    ph.log.mark()
    started = time.monotonic()

    # each `hostile=log` call writes 1 KiB lines in a loop until its time
    # limit stops it (the original then passes: onError=pass), between
    # normal messages
    items = []
    for i in range(3):
        items.append((topic(f"hostile=log&seq={i}"), f"flood-{i}".encode()))
        items.append((topic(f"seq={i}"), f"normal-{i}".encode()))
    got = ph.publish_then_sentinel(items, b"sentinel-log-1", timeout=60, publish_timeout=60)
    assert got == items, f"upstream got {got}"

    # the drops are summarised with the plugin's next line that gets through
    # (the budget refills at RATE lines/s while a flood runs): flood again
    # until the summary is there
    deadline = time.monotonic() + 60
    n = 0
    while not SUMMARY_RE.search(ph.log.text()):
        assert time.monotonic() < deadline, f"no rate-limit summary in the log:\n{ph.log.text()[-3000:]}"
        n += 1
        more = [(topic(f"hostile=log&more={n}"), f"more-{n}".encode())]
        got = ph.publish_then_sentinel(more, f"sentinel-more-{n}".encode(), timeout=60, publish_timeout=60)
        assert got[-1:] == more, got[-3:]
    elapsed = time.monotonic() - started

    text = ph.log.text()
    lines = plugin_lines(text)
    # whatever the plugin did, at most the burst plus the rate over the time it had
    most = BURST + RATE * elapsed + 1
    assert 0 < len(lines) <= most, f"{len(lines)} plugin lines in {elapsed:.1f}s; the limit allows {most:.0f}"
    assert all(CUT_MARK in line and "x" * (MAX_LINE + 1) not in line for line in lines), lines[:3]
    summaries = [int(m.group(1)) for m in SUMMARY_RE.finditer(text)]
    assert summaries and all(s > 0 for s in summaries), summaries
    # summaries come at most once a second (plus the first)
    assert len(summaries) <= elapsed + 1, f"{len(summaries)} summaries in {elapsed:.1f}s"

    growth = ph.log.size() - ph.log.offset
    bound = most * (MAX_LINE + LINE_OVERHEAD) + len(summaries) * LINE_OVERHEAD + OTHER_LINES_BYTES
    assert growth <= bound, f"the hub log grew by {growth} bytes in {elapsed:.1f}s; the limits allow {bound:.0f}"

    dropped = ph.metric("edgehub_plugin_log_dropped_total")
    assert dropped >= sum(summaries) > 0, f"dropped lines counted {dropped}, summarised {summaries}"
    assert ph.hub.alive()
