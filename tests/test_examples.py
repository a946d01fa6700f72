"""The deployment examples work with the hub they ship with.

examples/grafana/edgehub-dashboard.json must only query metrics a live hub
serves on /metrics, each the way Prometheus stores it (a counter `x` is the
series `x_total`), rate counters only, and group by labels those series
have. examples/systemd/edgehub.service must be a unit systemd accepts, start
the hub with flags it has, and keep its sandbox tight (systemd-analyze
security's exposure level at most 2.5).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import Publisher, hub_env
from pluginkit import plugin_hub, plugins_dist  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "examples" / "grafana" / "edgehub-dashboard.json"
UNIT = REPO / "examples" / "systemd" / "edgehub.service"
UNIT_BINARY = "/usr/local/bin/edgehub"
MAX_EXPOSURE = 2.5

# Labels Prometheus adds to every series it scrapes (not on /metrics).
TARGET_LABELS = {"instance", "job"}
# Suffixes of the samples of an OpenMetrics family, by type.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


# --------------------------------------------------------------------------
# the Grafana dashboard
# --------------------------------------------------------------------------


def exposed_series(text: str) -> dict[str, dict]:
    """Sample name -> {"family", "type", "labels"} of an OpenMetrics page."""
    types: dict[str, str] = {}
    out: dict[str, dict] = {}
    for line in text.splitlines():
        m = re.match(r"^# TYPE (\S+) (\S+)$", line)
        if m:
            types[m.group(1)] = m.group(2)
            continue
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s", line)
        assert m, f"unparsable sample line: {line!r}"
        name, labels = m.group(1), m.group(2) or ""
        family = next(
            (f for f, t in types.items() for s in SUFFIXES.get(t, ("",)) if s and name == f + s or not s and name == f),
            None,
        )
        assert family is not None, f"sample {name} has no # TYPE line before it"
        entry = out.setdefault(name, {"family": family, "type": types[family], "labels": set()})
        entry["labels"] |= set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', labels))
    return out


def queries(dashboard: dict) -> list[tuple[str, str, str]]:
    """(where, PromQL, legend) of every panel target and templating query."""
    out = []
    for panel in all_panels(dashboard):
        for t in panel.get("targets", []):
            out.append((f"panel {panel.get('title')!r} target {t.get('refId')}", t.get("expr", ""),
                        t.get("legendFormat", "")))
    for var in dashboard.get("templating", {}).get("list", []):
        q = var.get("query")
        if isinstance(q, dict):
            q = q.get("query", "")
        if var.get("type") == "query" and q:
            out.append((f"variable {var.get('name')!r}", q, ""))
    return out


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel that draws something (rows' nested panels included, rows not)."""
    out = []
    for p in dashboard.get("panels", []):
        if p.get("type") == "row":
            out += p.get("panels", [])
        else:
            out.append(p)
    return out


@pytest.fixture
def live_metrics(upstream_factory, plugin_hub, plugins_dist, clients):  # noqa: F811
    """The /metrics page of a hub in which every family has a series: some
    appear only once something happened to them (a plugin loaded, a message
    dead-lettered, a route matched), so this hub has a plugin, a route
    through it and one without, and an MQTT 5 upstream taking packets of at
    most 2000 bytes, and a device sent it one of 3000."""
    up = upstream_factory(extra_conf=["max_packet_size 2000"])
    up.start()
    ph = plugin_hub(
        up, edge_id="edge-dashboard",
        plugins={"field-filter": plugins_dist / "field-filter.wasm"},
        routes={
            "filtered": {"route": 'FROM /messages/* INTO plugin("field-filter") THEN $upstream',
                         "onError": "drop"},
            "all": "FROM /messages/* INTO $upstream",
        },
        extra_args=["--upstream-mqtt-version", "5"],
    )
    hub = ph.hub
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 30, "== 1")
    hub.wait_metric("edgehub_plugin_reloads_total", lambda v: v >= 1, 60, "field-filter loaded")
    pub = Publisher(hub.port, client_id="d1")
    clients.append(pub.connect())
    assert pub.publish_and_wait("devices/d1/messages/events/", b"x" * 3000) < 0x80
    hub.wait_metric("edgehub_dead_letters_total", lambda v: v == 1, 30, "the big message dead-lettered")
    return hub.metrics_text()


def test_the_grafana_dashboard_queries_only_metrics_a_live_hub_serves_the_way_prometheus_stores_them(
    live_metrics
):
    dashboard = json.loads(DASHBOARD.read_text())
    series = exposed_series(live_metrics)
    families = {v["family"]: v["type"] for v in series.values()}

    used: set[str] = set()
    problems = []
    for where, expr, legend in queries(dashboard):
        names = set(re.findall(r"\bedgehub_[a-zA-Z0-9_:]+", expr))
        if not names:
            problems.append(f"{where}: no edgehub_ metric in {expr!r}")
        used |= names
        for name in sorted(names):
            if name not in series:
                hint = ""
                if name in families:
                    hint = f" (a {families[name]}: its samples are {name}{SUFFIXES[families[name]][0]}...)"
                problems.append(f"{where}: {name} is not on /metrics{hint}")
        for fn, name in re.findall(r"\b(rate|irate|increase)\(\s*(edgehub_[a-zA-Z0-9_:]+)", expr):
            rates = series.get(name, {}).get("type") == "counter" or (
                series.get(name, {}).get("type") == "histogram" and name.endswith(("_sum", "_count", "_bucket")))
            if name in series and not rates:
                problems.append(f"{where}: {fn}() of {name}, a {series[name]['type']}, not a counter")
        for name in re.findall(r"\bdelta\(\s*(edgehub_[a-zA-Z0-9_:]+)", expr):
            if name in series and series[name]["type"] == "counter":
                problems.append(f"{where}: delta() of the counter {name} (use increase)")
        wanted = set()
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            wanted |= {label.strip() for label in group.split(",") if label.strip()}
        wanted |= set(re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", legend))
        for label in sorted(wanted - TARGET_LABELS):
            for name in sorted(names & set(series)):
                if label not in series[name]["labels"]:
                    problems.append(f"{where}: {name} has no label {label!r} (has {sorted(series[name]['labels'])})")
        if expr.count("(") != expr.count(")") or expr.count("[") != expr.count("]") or expr.count("{") != expr.count("}"):
            problems.append(f"{where}: unbalanced brackets in {expr!r}")
    assert not problems, "\n".join(problems)
    # the core of the hub is on the dashboard
    for core in ("edgehub_queue_depth", "edgehub_queue_oldest_age_seconds", "edgehub_upstream_connected",
                 "edgehub_messages_received_total", "edgehub_messages_forwarded_total"):
        assert core in used, f"the dashboard does not show {core}"


def test_every_dashboard_panel_has_the_prometheus_data_source_chosen_on_import_and_a_query():
    dashboard = json.loads(DASHBOARD.read_text())
    inputs = {i["name"]: i for i in dashboard.get("__inputs", [])}
    assert inputs.get("DS_PROMETHEUS", {}).get("pluginId") == "prometheus", \
        f"no Prometheus data source input for the import dialog: {dashboard.get('__inputs')}"
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    panels = all_panels(dashboard)
    assert panels, "the dashboard has no panels"
    ids = [p.get("id") for p in panels]
    assert len(set(ids)) == len(ids), f"panel ids repeat: {ids}"
    for p in panels:
        title = p.get("title")
        assert title, f"panel {p.get('id')} has no title"
        assert p.get("datasource") == ds, f"panel {title!r}: datasource {p.get('datasource')}"
        targets = p.get("targets") or []
        assert targets, f"panel {title!r} has no target"
        refs = [t.get("refId") for t in targets]
        assert len(set(refs)) == len(refs), f"panel {title!r}: refIds repeat: {refs}"
        for t in targets:
            assert t.get("expr", "").strip(), f"panel {title!r} target {t.get('refId')} has no expr"
            assert t.get("datasource", ds) == ds, f"panel {title!r} target {t.get('refId')}: {t.get('datasource')}"
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            assert var.get("datasource") == ds, f"variable {var.get('name')}: datasource {var.get('datasource')}"


# --------------------------------------------------------------------------
# the systemd unit
# --------------------------------------------------------------------------


@pytest.fixture
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return path


def unit_for(binary: str, tmp_path: Path) -> Path:
    """The example unit, as edgehub.service in ``tmp_path``, starting
    ``binary`` (verify checks that ExecStart's program exists)."""
    text = UNIT.read_text()
    assert f"ExecStart={UNIT_BINARY} " in text, f"ExecStart does not start {UNIT_BINARY}"
    unit = tmp_path / "edgehub.service"
    unit.write_text(text.replace(UNIT_BINARY, binary))
    return unit


def exec_start(text: str) -> list[str]:
    lines = [line.split("=", 1)[1].split() for line in text.splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, f"{len(lines)} ExecStart= lines"
    return lines[0]


def test_the_systemd_unit_passes_systemd_analyze_verify(systemd_analyze, edgehub_bin, tmp_path):
    unit = unit_for(edgehub_bin, tmp_path)
    r = subprocess.run([systemd_analyze, "verify", str(unit)], capture_output=True, timeout=60, cwd=tmp_path)
    out = (r.stdout + r.stderr).decode("utf-8", "replace")
    assert r.returncode == 0, f"systemd-analyze verify exited {r.returncode}:\n{out}"
    # An unknown or misspelt setting is only a warning: none may be printed.
    about_unit = [line for line in out.splitlines() if "edgehub.service" in line]
    assert not about_unit, "systemd-analyze verify warns:\n" + "\n".join(about_unit)


def test_the_systemd_unit_sandbox_has_an_exposure_level_of_at_most_2_5(systemd_analyze, edgehub_bin, tmp_path):
    unit = unit_for(edgehub_bin, tmp_path)
    r = subprocess.run(
        [systemd_analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, timeout=60, cwd=tmp_path,
    )
    out = (r.stdout + r.stderr).decode("utf-8", "replace")
    m = re.search(r"Overall exposure level for edgehub\.service: (\d+(?:\.\d+)?)", out)
    assert m, f"no overall exposure level in (exit {r.returncode}):\n{out}"
    level = float(m.group(1))
    assert level <= MAX_EXPOSURE, f"exposure level {level} > {MAX_EXPOSURE}:\n{out}"


def test_the_systemd_unit_starts_the_hub_with_flags_it_has_and_its_install_steps_name_real_files(edgehub_bin):
    text = UNIT.read_text()
    argv = exec_start(text)
    assert argv[0] == UNIT_BINARY and argv[1] == "run", argv
    r = subprocess.run([edgehub_bin, "run", "--help"], capture_output=True, timeout=30, env=hub_env())
    assert r.returncode == 0, r.stderr.decode()
    help_text = r.stdout.decode()
    for flag in (a for a in argv[2:] if a.startswith("--")):
        assert re.search(rf"(^|\s){re.escape(flag)}[\s=<]", help_text), f"`edgehub run` has no {flag}"
    # the storage and config paths are the ones systemd creates for the unit
    settings = dict(line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Za-z]+=", line))
    storage = argv[argv.index("--storage") + 1]
    config = argv[argv.index("--config") + 1]
    assert storage == f"/var/lib/{settings.get('StateDirectory')}", (storage, settings.get("StateDirectory"))
    assert config.startswith(f"/etc/{settings.get('ConfigurationDirectory')}/"), (config, settings.get("ConfigurationDirectory"))
    # every repository file the header's install commands copy exists
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    copied = re.findall(r"install -m \d+ (\S+) ", header)
    assert copied, "the header has no install commands"
    for src in copied:
        if src.startswith("target/"):
            continue  # built by cargo
        assert (REPO / src).is_file(), f"the install steps copy {src}, which is not in the repository"
