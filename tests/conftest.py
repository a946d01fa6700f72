"""Fixtures for the edgehub end-to-end tests.

The tests start the real ``edgehub`` binary, a real Mosquitto as the upstream
("cloud") broker and real MQTT clients (paho-mqtt 2.x), all on free loopback
ports.  When a test fails, the stderr of every hub and broker it started is
attached to the report.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import Collector, Hub, Upstream, free_port, tail  # noqa: E402

# The vendored Eclipse Paho suite is run by test_paho_interop.py, one
# subprocess per test; its client_test.py matches pytest's `*_test.py` but
# needs the globals its `__main__` block sets, so it is not collected here.
collect_ignore = ["paho_interop"]

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------
# report: attach logs of failed tests
# --------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for kind, obj in getattr(item, "_edgehub_logs", []):
            report.sections.append((f"{kind} log: {obj.log_path}", tail(obj.log_path)))


def _track(request, kind: str, obj) -> None:
    if not hasattr(request.node, "_edgehub_logs"):
        request.node._edgehub_logs = []
    request.node._edgehub_logs.append((kind, obj))


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def edgehub_bin() -> str:
    path = Path(os.environ.get("EDGEHUB_BIN", REPO / "target" / "release" / "edgehub"))
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"edgehub binary not found or not executable at {path}; "
            "build it (cargo build --release) or set EDGEHUB_BIN",
            pytrace=False,
        )
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def _mosquitto_installed():
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto mosquitto-clients)", pytrace=False)


@pytest.fixture
def free_port_factory():
    """Returns a function giving a free loopback TCP port."""
    return free_port


@pytest.fixture
def upstream_factory(tmp_path, request):
    """make_upstream(port=None, extra_conf=()) -> a not yet started Upstream
    (Mosquitto); ``extra_conf``: more lines for its config file."""
    made: list[Upstream] = []

    def make(port: int | None = None, extra_conf=()) -> Upstream:
        up = Upstream(tmp_path, port, extra_conf=extra_conf)
        made.append(up)
        _track(request, "mosquitto", up)
        return up

    yield make
    for up in made:
        up.close()


@pytest.fixture
def upstream(upstream_factory) -> Upstream:
    """A running upstream broker."""
    up = upstream_factory()
    up.start()
    return up


@pytest.fixture
def collector_factory():
    """make_collector(upstream, filters=...) -> a connected, subscribed Collector.
    The upstream must be running when it is made."""
    made: list[Collector] = []

    def make(up: Upstream, **kw) -> Collector:
        c = Collector(up, **kw)
        made.append(c)
        c.connect()
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def offline_upstream(upstream_factory, collector_factory):
    """An upstream broker that is *stopped*, on a known port, with a collector
    whose persistent session (subscription) is already stored on it.  When the
    broker is started, messages the hub forwards are queued for the collector
    even if the hub reconnects before the collector does."""

    def make(**collector_kw):
        up = upstream_factory()
        up.start()
        c = collector_factory(up, **collector_kw)
        up.stop()
        return up, c

    return make


@pytest.fixture
def hub_factory(edgehub_bin, tmp_path, request):
    """make_hub(upstream=None, start=True, **Hub kwargs) -> Hub."""
    made: list[Hub] = []

    def make(upstream: Upstream | str | None = None, start: bool = True, **kw) -> Hub:
        url = upstream.url if isinstance(upstream, Upstream) else upstream
        kw.setdefault("name", f"hub{len(made)}")
        hub = Hub(edgehub_bin, tmp_path, upstream=url, **kw)
        made.append(hub)
        _track(request, "edgehub", hub)
        if start:
            hub.start()
        return hub

    yield make
    for hub in made:
        hub.close()


@pytest.fixture
def clients():
    """A list to which tests append paho wrappers / raw clients; all closed at teardown."""
    made: list = []
    yield made
    for c in made:
        try:
            c.close()
        except Exception:  # noqa: BLE001
            pass


@pytest.fixture(scope="session")
def sdk_python(request, tmp_path_factory):
    """The python of a virtualenv holding azure-iot-device (made once, cached)."""
    from authkit import SDK_VERSION, ensure_sdk_venv

    cache = getattr(request.config, "cache", None)
    base = cache.mkdir(f"azure-iot-device-venv-{SDK_VERSION}") if cache is not None \
        else tmp_path_factory.mktemp("azure-iot-device-venv")
    return ensure_sdk_venv(base)
