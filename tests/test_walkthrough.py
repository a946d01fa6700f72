"""The offline walkthrough (examples/offline-walkthrough/run), run as a user
runs it: one command that starts its own Mosquitto ("the cloud") and hub,
plays the four steps (configure, sync once, offline, reconnect and re-sync)
and reports. It must pass every step, its counts must add up (everything sent
offline is delivered or expired, some of it expired), and it must leave
nothing running behind it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "offline-walkthrough" / "run"
# The walkthrough takes seconds with the Rust plugin; a Python or JavaScript
# plugin is compiled on the hub's first start (10-40 s on a busy 2-core machine).
TIMEOUT_SECS = 240
FILTER_PLUGINS = ("field-filter", "field-filter-c", "field-filter-js", "field-filter-python")


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def test_the_offline_walkthrough_passes_every_step_and_delivers_everything_sent_offline_that_did_not_expire(
    edgehub_bin, tmp_path
):
    plugins = Path(os.environ.get("EDGEHUB_PLUGINS", REPO / "plugins" / "dist"))
    if not any((plugins / f"{name}.wasm").is_file() for name in FILTER_PLUGINS):
        pytest.fail(f"no field-filter plugin in {plugins}: build one (bash plugins/build.sh rust) "
                    "or set EDGEHUB_PLUGINS", pytrace=False)
    env = dict(os.environ, EDGEHUB_BIN=edgehub_bin, EDGEHUB_PLUGINS=str(plugins))
    # its own process group, so a run that hangs can be stopped whole
    proc = subprocess.Popen([sys.executable, str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, cwd=tmp_path, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_SECS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the script stops what it started on SIGTERM
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=10)
        pytest.fail(f"the walkthrough did not finish within {TIMEOUT_SECS} s:\n"
                    f"{out.decode(errors='replace')[-8000:]}", pytrace=False)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"the walkthrough failed (exit {proc.returncode}):\n{text[-8000:]}"

    lines = [line for line in text.splitlines() if line.startswith("summary: ")]
    assert len(lines) == 1, f"one `summary: {{...}}` line in the report:\n{text[-4000:]}"
    s = json.loads(lines[0][len("summary: "):])
    assert s["passed"] is True and set(s["steps"].values()) == {"PASS"}, s["steps"]
    assert s["sent_offline"] == s["readings"] + s["alerts"] + s["heartbeats"] > 0, s
    assert s["expired"] > 0, f"some messages expire during the outage: {s}"
    assert s["expired"] == s["heartbeats"], f"exactly the short-lived heartbeats expire: {s}"
    assert s["delivered"] >= s["sent_offline"] - s["expired"], f"everything else reaches the cloud: {s}"
    assert s["lost"] == 0 and s["duplicates"] >= 0, s
    assert s["filtered"] > 0 and s["plugin"], f"the filter plugin kept the cold readings from the module: {s}"
    assert s["local_messages"] >= 1 and s["method_calls"] >= 2, s
    for i, step in enumerate(("configure", "sync once", "offline, keep working", "reconnect and re-sync"), 1):
        assert f"[{i}/4] {step}: " in text, f"step {i} is narrated"

    # it cleaned up: the work folder is gone and nothing it started still runs
    m = re.search(r"\(work folder (\S+)\)", text)
    assert m, "the walkthrough names its work folder"
    workdir = m.group(1)
    assert not Path(workdir).exists(), f"{workdir} was removed after a passing run"
    assert processes_mentioning(workdir) == [], "every process the walkthrough started has stopped"
