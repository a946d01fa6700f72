"""Shared helpers for the plugin and route tests: where the example plugins
are, hub config files with ``[plugins]`` and ``[routes]``, atomic plugin
installs, waiting for hub log lines, publishing with a sentinel, and reading
IoT Hub property bags.

Test modules import the fixtures they use from here (``plugins_dist``,
``compile_cache``, ``plugin_hub``, ``sentinel_hub``) so that pytest finds them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterable
from urllib.parse import unquote

import pytest

from helpers import Collector, Hub, Publisher, Subscriber, Upstream, WaitTimeout, tail

REPO = Path(__file__).resolve().parent.parent
TESTDATA = REPO / "plugins" / "testdata"

EXAMPLE_PLUGINS = ("field-filter", "dedup", "content-router", "hostile", "hostile-view", "passthrough", "wrong-world")

# the languages of the field-filter example (Rust is field-filter.wasm)
LANGS = ("rust", "c", "python", "js")

SENTINEL_TOPIC = "devices/sentinel/messages/events/"
SENTINEL_ROUTE = "FROM /messages/devices/sentinel INTO $upstream"


# --------------------------------------------------------------------------
# the example plugins
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def plugins_dist() -> Path:
    """The folder with the built example plugins ($EDGEHUB_PLUGINS, default
    plugins/dist). The Rust examples must all be there."""
    path = Path(os.environ.get("EDGEHUB_PLUGINS", REPO / "plugins" / "dist"))
    missing = [p for p in EXAMPLE_PLUGINS if not (path / f"{p}.wasm").is_file()]
    if missing:
        pytest.fail(
            f"example plugins {missing} not found in {path}; build them "
            "(bash plugins/build.sh rust) or set EDGEHUB_PLUGINS",
            pytrace=False,
        )
    return path


def field_filter_wasm(plugins_dist: Path, lang: str) -> Path:
    """The field-filter built from ``lang``. A missing one skips the test,
    unless it is the Rust one or $EDGEHUB_REQUIRE_ALL_LANGS is set: then it
    fails."""
    wasm = plugins_dist / ("field-filter.wasm" if lang == "rust" else f"field-filter-{lang}.wasm")
    if not wasm.is_file():
        if lang != "rust" and not os.environ.get("EDGEHUB_REQUIRE_ALL_LANGS"):
            pytest.skip(f"{wasm.name} not built (set EDGEHUB_REQUIRE_ALL_LANGS to make this a failure)")
        pytest.fail(f"{wasm} is missing", pytrace=False)
    return wasm


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> Path:
    """A compiled-code cache shared by every test of the session
    (interpreted-language plugins take seconds to compile): ``edgehub plugin
    test --cache`` uses it, and hubs get a copy (``storage_with_cache``).
    One folder for the session whichever module asks (each module that
    imports this fixture gets its own instance of it)."""
    path = tmp_path_factory.getbasetemp() / "compiled-plugins"
    path.mkdir(exist_ok=True)
    return path


def storage_with_cache(storage: Path, cache: Path) -> Path:
    """A new storage folder whose compiled-plugin cache holds what ``cache``
    holds (the hub and `plugin test` share the engine, so its entries fit)."""
    target = Path(storage) / "plugin-cache"
    target.mkdir(parents=True)
    for f in Path(cache).glob("*.cwasm*"):  # entries and their checksums
        shutil.copy2(f, target / f.name)
    return Path(storage)


def keep_compiled(storage: Path, cache: Path) -> None:
    """Copies what a hub compiled into the shared ``cache``."""
    for f in (Path(storage) / "plugin-cache").glob("*.cwasm*"):
        if not (Path(cache) / f.name).exists():
            shutil.copy2(f, Path(cache) / f.name)


def corrupt_bytes(valid: bytes | None = None) -> bytes:
    """Bytes that are no WebAssembly component: the start of a valid one cut
    short when given (right magic, broken body), else random bytes."""
    if valid is not None:
        return valid[: len(valid) // 3]
    return os.urandom(2048)


# --------------------------------------------------------------------------
# config files
# --------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def toml_value(v) -> str:
    """A TOML value for str/int/float/bool/list/dict (dicts as inline tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML form for {v!r}")


def hub_config_text(
    *,
    folder: Path | None = None,
    routes: dict | None = None,
    settings: dict[str, dict] | None = None,
    timeout_ms: int | None = None,
    memory_mb: int | None = None,
) -> str:
    """``[plugins]`` (folder, limits, ``settings.<name>``) and ``[routes]``.
    ``routes``: name -> route text, or name -> {route, priority,
    timeToLiveSecs, onError}. ``settings``: name -> {config, timeout_ms, ...}."""
    lines = ["[plugins]"]
    if folder is not None:
        lines.append(f"folder = {toml_value(str(folder))}")
    if timeout_ms is not None:
        lines.append(f"timeout_ms = {timeout_ms}")
    if memory_mb is not None:
        lines.append(f"memory_mb = {memory_mb}")
    for name, s in (settings or {}).items():
        lines.append("")
        lines.append(f"[plugins.settings.{_key(name)}]")
        for k, v in s.items():
            lines.append(f"{_key(k)} = {toml_value(v)}")
    if routes is not None:
        lines.append("")
        lines.append("[routes]")
        for name, r in routes.items():
            lines.append(f"{_key(name)} = {toml_value(r)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# plugin files
# --------------------------------------------------------------------------


def install_plugin(folder: Path, name: str, source: Path | bytes) -> Path:
    """Puts ``source`` (a file or bytes) at ``folder/name.wasm`` atomically:
    written to a hidden temporary file first, then renamed over."""
    folder = Path(folder)
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    tmp = folder / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_bytes(data)
    target = folder / f"{name}.wasm"
    os.replace(tmp, target)
    return target


def remove_plugin(folder: Path, name: str) -> None:
    (Path(folder) / f"{name}.wasm").unlink()


# --------------------------------------------------------------------------
# hub logs
# --------------------------------------------------------------------------


class LogWatch:
    """Reads a hub's log from a mark on: ``mark()`` then ``wait(regex)``."""

    def __init__(self, hub: Hub):
        self.hub = hub
        self.offset = 0

    def size(self) -> int:
        try:
            return self.hub.log_path.stat().st_size
        except OSError:
            return 0

    def mark(self) -> "LogWatch":
        self.offset = self.size()
        return self

    def text(self, since_mark: bool = True) -> str:
        data = Path(self.hub.log_path).read_bytes()
        if since_mark:
            data = data[self.offset:]
        return data.decode("utf-8", "replace")

    def wait(self, pattern: str, timeout: float, desc: str | None = None) -> re.Match:
        """Waits until a line after the mark matches ``pattern`` (a regex)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text())
            if m:
                return m
            if not self.hub.alive():
                raise AssertionError(f"the hub died while waiting for {desc or pattern!r}:\n{tail(self.hub.log_path)}")
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"timed out after {timeout}s waiting for log line {desc or pattern!r}; log since mark:\n"
                    f"{self.text()[-4000:]}"
                )
            time.sleep(0.02)


def loaded_re(name: str) -> str:
    return rf'plugin loaded plugin="{re.escape(name)}"[^\n]*'


def refused_re(name: str) -> str:
    return rf'plugin file refused plugin="{re.escape(name)}"[^\n]*'


def unloaded_re(name: str) -> str:
    return rf'plugin unloaded plugin="{re.escape(name)}"[^\n]*'


# --------------------------------------------------------------------------
# clients and the sentinel
# --------------------------------------------------------------------------


def connect_publisher(port: int, clients: list, **kw) -> Publisher:
    """A Publisher connected to the hub on ``port``, closed at teardown
    (``clients`` is the fixture of that name)."""
    pub = Publisher(port, **kw)
    clients.append(pub.connect())
    return pub


def subscribe_module_inputs(port: int, clients: list, edge_id: str, module: str) -> Subscriber:
    """A Subscriber to every input of ``module`` on the hub ``edge_id``."""
    sub = Subscriber(port)
    clients.append(sub.connect())
    sub.subscribe(f"devices/{edge_id}/modules/{module}/inputs/#", qos=1)
    return sub


def publish_all(pub: Publisher, items, timeout: float = 10.0) -> None:
    """Publishes (topic, payload) pairs one by one, each acknowledged (and so
    routed by the hub) before the next."""
    for topic, payload in items:
        rc = pub.publish_and_wait(topic, payload, timeout=timeout)
        assert rc < 0x80, f"publish on {topic} refused with {rc:#x}"


def upstream_before_sentinel(pub: Publisher, collector: Collector, tag: bytes, timeout: float = 20.0):
    """Publishes a sentinel ``tag`` on SENTINEL_TOPIC (routed upstream by
    SENTINEL_ROUTE) and returns everything that had arrived upstream before
    it: messages of one client are routed and forwarded in order, so nothing
    ``pub`` published earlier can still be on its way."""
    assert pub.publish_and_wait(SENTINEL_TOPIC, tag) < 0x80
    msgs = collector.wait_payload(tag, timeout)
    return msgs[: next(i for i, (_, p) in enumerate(msgs) if p == tag)]


def publish_then_sentinel(pub: Publisher, collector: Collector, items, tag: bytes, *,
                          timeout: float = 20.0, publish_timeout: float = 10.0):
    """``publish_all(items)``, then ``upstream_before_sentinel(tag)``."""
    publish_all(pub, items, timeout=publish_timeout)
    return upstream_before_sentinel(pub, collector, tag, timeout)


def dead_letter_prefix(edge_id: str) -> str:
    return f"devices/{edge_id}/modules/$edgeHub/messages/events/"


def dead_letter_props(topic: str, edge_id: str) -> dict[str, str]:
    """The property bag of a dead letter of hub ``edge_id``; fails when
    ``topic`` is not on that hub's dead-letter output."""
    prefix, bag = split_telemetry(topic)
    assert prefix == dead_letter_prefix(edge_id), f"not a dead letter of {edge_id}: {topic}"
    return dict(bag)


# --------------------------------------------------------------------------
# hubs with plugins and routes
# --------------------------------------------------------------------------


class PluginHub:
    """A hub started with a config file and its own plugins folder."""

    def __init__(self, hub: Hub, folder: Path, config_path: Path, edge_id: str):
        self.hub = hub
        self.folder = folder
        self.config_path = config_path
        self.edge_id = edge_id
        self.log = LogWatch(hub)

    @property
    def port(self) -> int:
        return self.hub.port

    def install(self, name: str, source: Path | bytes) -> Path:
        return install_plugin(self.folder, name, source)

    def remove(self, name: str) -> None:
        remove_plugin(self.folder, name)

    def metric(self, name: str) -> float:
        return self.hub.metric(name)

    def wait_metric(self, name, pred, timeout, desc):
        return self.hub.wait_metric(name, pred, timeout, desc)

    def rejected(self, plugin: str, reason: str) -> float:
        """Refusals of ``plugin``'s files for ``reason`` (0 before the first)."""
        series = f'edgehub_plugin_rejected_total{{plugin="{plugin}",reason="{reason}"}} '
        for line in self.hub.metrics_text().splitlines():
            if line.startswith(series):
                return float(line[len(series):])
        return 0.0

    def wait_loaded(self, name: str, timeout: float = 10.0, desc: str | None = None) -> str:
        """Waits for the log line (after the mark) saying plugin ``name`` was
        loaded; returns the line."""
        return self.log.wait(loaded_re(name), timeout, desc).group(0)

    def wait_refused(self, name: str, timeout: float = 10.0, desc: str | None = None) -> str:
        """Waits for the log line (after the mark) saying the file of plugin
        ``name`` was refused; returns the line."""
        return self.log.wait(refused_re(name), timeout, desc).group(0)

    def wait_unloaded(self, name: str, timeout: float = 10.0, desc: str | None = None) -> str:
        return self.log.wait(unloaded_re(name), timeout, desc).group(0)


@pytest.fixture
def plugin_hub(hub_factory, tmp_path):
    """make(upstream, routes=..., plugins={name: path-or-bytes}, settings=...,
    timeout_ms=..., memory_mb=..., edge_id=..., start=True, **Hub kwargs) ->
    PluginHub. The plugins are in the folder before the hub starts."""
    count = [0]

    def make(
        upstream: Upstream | str | None,
        *,
        routes: dict | None = None,
        plugins: dict[str, Path | bytes] | None = None,
        settings: dict[str, dict] | None = None,
        timeout_ms: int | None = None,
        memory_mb: int | None = None,
        edge_id: str = "edge-p",
        start: bool = True,
        **kw,
    ) -> PluginHub:
        count[0] += 1
        folder = tmp_path / f"plugins-{count[0]}"
        folder.mkdir()
        for name, src in (plugins or {}).items():
            install_plugin(folder, name, src)
        cfg = tmp_path / f"hub-{count[0]}.toml"
        cfg.write_text(
            hub_config_text(folder=folder, routes=routes, settings=settings, timeout_ms=timeout_ms,
                            memory_mb=memory_mb)
        )
        extra = list(kw.pop("extra_args", ())) + ["--config", str(cfg)]
        hub = hub_factory(upstream, start=start, edge_id=edge_id, extra_args=extra, **kw)
        return PluginHub(hub, folder, cfg, edge_id)

    return make


class SentinelHub(PluginHub):
    """A PluginHub whose routes end with SENTINEL_ROUTE, with a collector on
    its upstream and a connected publisher."""

    def __init__(self, ph: PluginHub, collector: Collector, pub: Publisher, clients: list):
        super().__init__(ph.hub, ph.folder, ph.config_path, ph.edge_id)
        self.collector = collector
        self.pub = pub
        self.clients = clients

    def publish_then_sentinel(self, items, tag: bytes, **kw):
        """Publishes ``items`` then the sentinel ``tag``; returns what arrived
        upstream before the sentinel (see ``publish_then_sentinel``)."""
        return publish_then_sentinel(self.pub, self.collector, items, tag, **kw)

    def upstream_before_sentinel(self, tag: bytes, timeout: float = 20.0):
        return upstream_before_sentinel(self.pub, self.collector, tag, timeout)

    def subscribe_module_inputs(self, module: str) -> Subscriber:
        return subscribe_module_inputs(self.port, self.clients, self.edge_id, module)


@pytest.fixture
def sentinel_hub(upstream, collector_factory, plugin_hub, clients):  # noqa: F811
    """make(routes=..., **plugin_hub kwargs) -> SentinelHub on ``upstream``:
    the collector is made first, then the hub with ``routes`` plus the
    sentinel route, then the publisher."""

    def make(*, routes: dict, **kw) -> SentinelHub:
        collector = collector_factory(upstream)
        ph = plugin_hub(upstream, routes={**routes, "sentinel": SENTINEL_ROUTE}, **kw)
        return SentinelHub(ph, collector, connect_publisher(ph.port, clients), clients)

    return make


# --------------------------------------------------------------------------
# topics and property bags
# --------------------------------------------------------------------------


def split_telemetry(topic: str) -> tuple[str, list[tuple[str, str]]]:
    """``devices/d/messages/events/a=1&b=2`` -> (``devices/d/messages/events/``,
    [(a, 1), (b, 2)]), keys and values percent-decoded."""
    m = re.match(r"^(devices/[^/]+/(?:modules/[^/]+/)?(?:messages/events|inputs/[^/]+)/)(.*)$", topic)
    assert m, f"not a telemetry or module-input topic: {topic!r}"
    return m.group(1), parse_bag(m.group(2))


def parse_bag(bag: str) -> list[tuple[str, str]]:
    out = []
    for part in bag.split("&") if bag else []:
        k, _, v = part.partition("=")
        out.append((unquote(k), unquote(v)))
    return out


def bag_dict(topic: str) -> dict[str, str]:
    return dict(split_telemetry(topic)[1])


def only(items: Iterable, what: str):
    items = list(items)
    assert len(items) == 1, f"expected exactly one {what}, got {len(items)}: {items}"
    return items[0]
