"""`edgehub plugin test`: a plugin over JSON-lines messages, without a hub."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from helpers import hub_env
from pluginkit import LANGS, TESTDATA, compile_cache, corrupt_bytes, field_filter_wasm, plugins_dist  # noqa: F401

CONFIGS = {
    "temperature": (None, "field-filter.expected.jsonl"),
    "humidity": ('{"field":"humidity","above":40.5}', "field-filter.humidity.expected.jsonl"),
}


def plugin_test(edgehub_bin, wasm, input_path, *args, timeout=60):
    """Runs `edgehub plugin test`; returns (rc, parsed stdout lines, stdout, stderr)."""
    cmd = [edgehub_bin, "plugin", "test", str(wasm), "--input", str(input_path), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, timeout=timeout, env=hub_env())
    out = r.stdout.decode("utf-8", "replace")
    err = r.stderr.decode("utf-8", "replace")
    lines = []
    for line in out.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"stdout line is not JSON: {line!r}\nstdout:\n{out}\nstderr:\n{err}") from None
    return r.returncode, lines, out, err


def write_jsonl(path: Path, messages) -> Path:
    path.write_text("".join(json.dumps(m) + "\n" for m in messages))
    return path


def plugin_test_on(edgehub_bin, wasm, tmp_path: Path, messages, *args):
    """``plugin_test`` over ``messages`` written to a JSON-lines file."""
    return plugin_test(edgehub_bin, wasm, write_jsonl(tmp_path / "in.jsonl", messages), *args)


def field_filter_expecting(edgehub_bin, plugins_dist, expect_file: Path):  # noqa: F811
    """Rust field-filter over testdata/messages.jsonl with ``--expect expect_file``."""
    return plugin_test(edgehub_bin, plugins_dist / "field-filter.wasm", TESTDATA / "messages.jsonl",
                       "--expect", expect_file)


def summary(total: int, passed: int = 0, dropped: int = 0, routed: int = 0, failed: int = 0) -> str:
    """The count line `edgehub plugin test` writes to stderr."""
    return f"{total} messages: {passed} passed, {dropped} dropped, {routed} routed, {failed} failed"


def normalized(m: dict) -> dict:
    """An input message as the tool prints it back (every key present)."""
    return {
        "source": m.get("source", ""),
        "topic": m.get("topic", ""),
        "properties": dict(m.get("properties", {})),
        "systemProperties": dict(m.get("systemProperties", {})),
        "body": m.get("body", ""),
        "enqueuedMs": m.get("enqueuedMs", 0),
    }


def results(lines):
    return [(line["index"], line["result"]) for line in lines]


# --------------------------------------------------------------------------
# field-filter in every language
# --------------------------------------------------------------------------


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("lang", LANGS)
def test_field_filter_in_every_language_gives_the_expected_output(
    edgehub_bin, plugins_dist, compile_cache, lang, config_name  # noqa: F811
):
    wasm = field_filter_wasm(plugins_dist, lang)
    config, expected_name = CONFIGS[config_name]
    expected = TESTDATA / expected_name
    args = ["--expect", expected, "--cache", compile_cache, "--timeout-ms", "5000"]
    if config:
        args += ["--config", config]
    rc, lines, out, err = plugin_test(edgehub_bin, wasm, TESTDATA / "messages.jsonl", *args, timeout=300)
    assert rc == 0, f"{lang}/{config_name}: exit {rc}\nstdout:\n{out}\nstderr:\n{err}"
    want = expected.read_text().splitlines()
    assert out.splitlines() == want, (
        f"{lang}/{config_name}: output differs from {expected.name}:\n" + out
    )
    assert "output matches" in err, err
    passed = sum(1 for w in want if '"result":"pass"' in w)
    assert summary(len(want), passed=passed, dropped=len(want) - passed) in err, err


# --------------------------------------------------------------------------
# content-router and dedup, outputs worked out from their sources
# --------------------------------------------------------------------------

ALERTS = 'BrokeredEndpoint("/modules/alerts/inputs/input1")'


def test_content_router_default_settings(edgehub_bin, plugins_dist, tmp_path):  # noqa: F811
    msgs = [
        {"source": "/messages/devices/d1", "body": json.dumps({"level": "critical", "v": 1})},
        {"source": "/messages/devices/d1", "body": json.dumps({"level": "debug"})},
        {"source": "/messages/devices/d1", "body": json.dumps({"level": "info"})},
        {"source": "/messages/devices/d1", "body": "level=critical, not json"},
        {"source": "/messages/devices/d1", "body": json.dumps({"level": 5})},
        {"source": "/messages/devices/d1", "body": json.dumps({"severity": "critical"})},
        {"source": "/messages/devices/d1", "body": json.dumps({"nested": {"level": "critical"}})},
        {"source": "/messages/devices/d1", "body": "  {\"level\" : \"critical\"}  "},
    ]
    rc, lines, out, err = plugin_test_on(edgehub_bin, plugins_dist / "content-router.wasm", tmp_path, msgs)
    assert rc == 0, f"exit {rc}\n{out}\n{err}"
    want = [
        ["$upstream", ALERTS],
        [],
        ["$upstream"],
        ["$upstream"],
        ["$upstream"],
        ["$upstream"],
        ["$upstream"],
        ["$upstream", ALERTS],
    ]
    assert [line for line in lines] == [
        {"index": i, "result": "route", "endpoints": e} for i, e in enumerate(want)
    ], out
    assert summary(8, routed=8) in err, err


def test_content_router_with_its_own_settings(edgehub_bin, plugins_dist, tmp_path):  # noqa: F811
    config = {"field": "sev", "routes": {"x": ["drop", "m/i"], "y": ["upstream", "bogus"]}, "default": []}
    msgs = [
        {"body": json.dumps({"sev": "x"})},
        {"body": json.dumps({"sev": "y"})},
        {"body": json.dumps({"sev": "z"})},
        {"body": json.dumps({"level": "critical"})},
    ]
    rc, lines, out, err = plugin_test_on(edgehub_bin, plugins_dist / "content-router.wasm", tmp_path, msgs,
                                         "--config", json.dumps(config))
    assert rc == 0, f"exit {rc}\n{out}\n{err}"
    # "bogus" has no '/', so the plugin makes it `drop`
    want = [
        ["$drop", 'BrokeredEndpoint("/modules/m/inputs/i")'],
        ["$upstream", "$drop"],
        [],
        [],
    ]
    assert [line.get("endpoints") for line in lines] == want, out
    assert results(lines) == [(i, "route") for i in range(4)], out


def dedup_messages():
    def m(i, mid=None, body=None, source="/messages/devices/d1"):
        sp = {"$connectionDeviceId": "d1"}
        if mid is not None:
            sp["$messageId"] = mid
        return {
            "source": source,
            "topic": "devices/d1/messages/events/",
            "properties": {"n": str(i)},
            "systemProperties": sp,
            "body": body if body is not None else f"body-{i}",
            "enqueuedMs": 1700000000000 + i,
        }

    return [
        m(0, "a"),
        m(1, "b"),
        m(2, "a"),  # repeat of 0 by id (different body)
        m(3),  # no id: passes
        m(4),  # no id: passes
        m(5, "c", body="body-0"),  # new id, same body as 0
        m(6, "b"),  # repeat of 1
        m(7, "c"),  # repeat of 5
        m(8, "d", body="body-0", source="/messages/devices/d2"),
        m(9, "d"),  # immediate repeat of 8
    ]


@pytest.mark.parametrize(
    "config, want",
    [
        # by $messageId (the default)
        (None, ["pass", "pass", "drop", "pass", "pass", "pass", "drop", "drop", "pass", "drop"]),
        # by source and body: 5 repeats 0's body from the same source; 8 is from d2
        ('{"by":"body"}', ["pass", "pass", "pass", "pass", "pass", "drop", "pass", "pass", "pass", "pass"]),
        # remembers only the last key: only the immediate repeat (9) is dropped
        ('{"capacity":1}', ["pass", "pass", "pass", "pass", "pass", "pass", "pass", "pass", "pass", "drop"]),
    ],
    ids=["by-message-id", "by-body", "capacity-1"],
)
def test_dedup_drops_repeats(edgehub_bin, plugins_dist, tmp_path, config, want):  # noqa: F811
    msgs = dedup_messages()
    args = ["--config", config] if config else []
    rc, lines, out, err = plugin_test_on(edgehub_bin, plugins_dist / "dedup.wasm", tmp_path, msgs, *args)
    assert rc == 0, f"exit {rc}\n{out}\n{err}"
    assert results(lines) == list(enumerate(want)), out
    for line, m in zip(lines, msgs):
        if line["result"] == "pass":
            # a filter that passes a message unchanged gives it back exactly
            assert line["message"] == normalized(m), line
        else:
            assert set(line) == {"index", "result"}, line
    n_pass = want.count("pass")
    assert summary(len(want), passed=n_pass, dropped=len(want) - n_pass) in err, err


def test_bench_and_stdin_input(edgehub_bin, plugins_dist, tmp_path):  # noqa: F811
    """--bench N times the plugin after the normal output; --input - reads stdin."""
    data = (TESTDATA / "messages.jsonl").read_bytes()
    r = subprocess.run(
        [edgehub_bin, "plugin", "test", str(plugins_dist / "field-filter.wasm"), "--input", "-", "--bench", "20",
         "--expect", str(TESTDATA / "field-filter.expected.jsonl")],
        input=data, capture_output=True, timeout=120, env=hub_env(),
    )
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0, err
    assert r.stdout.decode() == (TESTDATA / "field-filter.expected.jsonl").read_text(), r.stdout
    m = re.search(r"bench: (\d+) ns per call \((\d+) calls", err)
    assert m, f"no bench line on stderr:\n{err}"
    assert int(m.group(2)) == 20 * 10, err
    assert int(m.group(1)) > 0, err


# --------------------------------------------------------------------------
# misbehaving plugins, refused files, bad input
# --------------------------------------------------------------------------


def test_hostile_plugin_each_misbehaviour_is_an_error_line_and_the_next_message_passes(
    edgehub_bin, plugins_dist, tmp_path  # noqa: F811
):
    modes = {
        "loop": "ran longer than its limit of 500ms",
        "alloc": f"needed more than its memory limit of {16 << 20} bytes",
        "trap": "trapped:",
        "huge": "bad result:",
        "recurse": "",  # a stack overflow: any error
    }
    msgs = []
    for mode in modes:
        msgs.append({"properties": {"hostile": mode}, "body": f"hostile-{mode}"})
        msgs.append({"properties": {"after": mode}, "body": f"fine-after-{mode}"})
    started = time.monotonic()
    rc, lines, out, err = plugin_test_on(edgehub_bin, plugins_dist / "hostile.wasm", tmp_path, msgs,
                                         "--timeout-ms", "500", "--memory-mb", "16")
    elapsed = time.monotonic() - started
    assert rc == 1, f"a failed call must make the exit code 1, got {rc}\n{out}\n{err}"
    assert len(lines) == len(msgs), out
    for i, (mode, text) in enumerate(modes.items()):
        bad, good = lines[2 * i], lines[2 * i + 1]
        assert bad["index"] == 2 * i and bad["result"] == "error", f"{mode}: {bad}"
        assert text in bad["error"], f"{mode}: error {bad['error']!r} does not say {text!r}"
        assert good == {"index": 2 * i + 1, "result": "pass", "message": normalized(msgs[2 * i + 1])}, (
            f"the message after `{mode}` did not pass through a fresh instance: {good}"
        )
    assert summary(len(msgs), passed=5, failed=5) in err, err
    # The time limit leaves the allocation bomb ample time to reach the memory
    # limit first on a loaded machine; it still bounds the endless loop.
    assert elapsed < 30, f"plugin test took {elapsed:.1f}s"


def test_a_corrupt_file_is_refused(edgehub_bin, plugins_dist, tmp_path):  # noqa: F811
    inp = write_jsonl(tmp_path / "in.jsonl", [{"body": "x"}])
    valid = (plugins_dist / "field-filter.wasm").read_bytes()
    for name, data in [("random", corrupt_bytes()), ("truncated", corrupt_bytes(valid)), ("empty", b"")]:
        f = tmp_path / f"{name}.wasm"
        f.write_bytes(data)
        rc, lines, out, err = plugin_test(edgehub_bin, f, inp)
        assert rc == 1, f"{name}: exit {rc}\n{out}\n{err}"
        assert "not a valid WebAssembly component" in err, f"{name}: {err}"
        assert lines == [], f"{name}: a refused plugin produced output: {out}"


def test_a_component_of_the_wrong_world_is_refused(edgehub_bin, plugins_dist, tmp_path):  # noqa: F811
    inp = write_jsonl(tmp_path / "in.jsonl", [{"body": "x"}])
    rc, lines, out, err = plugin_test(edgehub_bin, plugins_dist / "wrong-world.wasm", inp)
    assert rc == 1, f"exit {rc}\n{out}\n{err}"
    assert "exports none of the worlds" in err, err
    assert lines == [], out


def test_expect_mismatch_exits_1(edgehub_bin, plugins_dist, tmp_path):  # noqa: F811
    expected = (TESTDATA / "field-filter.expected.jsonl").read_text().splitlines()
    # line 2 says pass where the plugin drops
    changed = list(expected)
    changed[1] = changed[0].replace('"index":0', '"index":1')
    wrong = tmp_path / "wrong.expected.jsonl"
    wrong.write_text("\n".join(changed) + "\n")
    rc, lines, out, err = field_filter_expecting(edgehub_bin, plugins_dist, wrong)
    assert rc == 1, f"exit {rc}\n{err}"
    assert "line 2 differs" in err, err
    assert len(lines) == len(expected), "the output is still printed"

    short = tmp_path / "short.expected.jsonl"
    short.write_text("\n".join(expected[:-1]) + "\n")
    rc, _, _, err = field_filter_expecting(edgehub_bin, plugins_dist, short)
    assert rc == 1, f"an expect file with a line missing was accepted:\n{err}"
    assert "lines" in err, err

    # the right file still passes with another config's expectations refused
    rc, _, _, err = field_filter_expecting(edgehub_bin, plugins_dist, TESTDATA / "field-filter.humidity.expected.jsonl")
    assert rc == 1, f"default config matched the humidity expectations?\n{err}"


@pytest.mark.parametrize(
    "bad_line",
    ["{not json", '{"bogus": 1}', '{"body": "a", "bodyBase64": "YQ=="}', '{"bodyBase64": "***"}', "[1,2]"],
    ids=["syntax", "unknown-key", "both-bodies", "bad-base64", "not-an-object"],
)
def test_a_bad_input_line_is_reported_with_its_number(edgehub_bin, plugins_dist, tmp_path, bad_line):  # noqa: F811
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"body": "{\\"temperature\\": 30}"}\n\n{"body": "ok"}\n' + bad_line + "\n{}\n")
    rc, lines, out, err = plugin_test(edgehub_bin, plugins_dist / "field-filter.wasm", inp)
    assert rc == 1, f"exit {rc}\n{out}\n{err}"
    assert "line 4:" in err, f"error does not name line 4 (blank lines count):\n{err}"
    assert lines == [], f"output printed for a file with a bad line: {out}"


def test_plugin_compile_writes_the_cache_entry_plugin_test_loads_and_a_corrupt_file_exits_3(
    edgehub_bin, plugins_dist, tmp_path  # noqa: F811
):
    """`edgehub plugin compile` is what the hub runs in a child process for a
    plugin not yet compiled: its cache entry is the one the engine loads."""
    cache = tmp_path / "cache"
    wasm = plugins_dist / "field-filter.wasm"
    r = subprocess.run([edgehub_bin, "plugin", "compile", str(wasm), "--cache", str(cache)],
                       capture_output=True, text=True, timeout=120, env=hub_env())
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    report = json.loads(r.stdout)
    entry = Path(report["cache"])
    assert entry.parent == cache and entry.suffix == ".cwasm" and entry.stat().st_size > 0, report
    assert report["peak_rss_mib"] > 0 and report["ms"] >= 0, report

    rc, lines, out, err = plugin_test(edgehub_bin, wasm, TESTDATA / "messages.jsonl", "--cache", cache)
    assert rc == 0, f"exit {rc}\n{out}\n{err}"
    assert "loaded from cache" in err, err

    bad = subprocess.run([edgehub_bin, "plugin", "compile", "-", "--cache", str(cache)],
                         input=corrupt_bytes(wasm.read_bytes()), capture_output=True, timeout=60, env=hub_env())
    why = bad.stderr.decode("utf-8", "replace").strip()
    assert bad.returncode == 3, f"exit {bad.returncode}: {why}"
    assert why and "\n" not in why, f"the reason is one line: {why!r}"
    assert bad.stdout == b""
    assert sorted(cache.glob("*.cwasm")) == [entry], "a plugin that does not compile left a cache entry"
