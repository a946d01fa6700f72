"""The unchanged Azure IoT device SDK for Node.js (`azure-iot-device` and
`azure-iot-device-mqtt`, pinned in tests/node_sdk/package.json) against the
hub, offline where the cloud is not part of the scenario: twins (getTwin,
reported patches, a desired patch set in the cloud), a direct method
(`onDeviceMethod('reboot')`, called from the cloud and, with the upstream
down, by a module through the hub's HTTPS API) and cloud-to-device messages
stored for the device and completed by it with the upstream down.

The SDK is installed once per machine with ``npm ci`` from
tests/node_sdk/package-lock.json into pytest's cache folder
(``.pytest_cache/d/azure-iot-node-<versions>``; reused while package.json and
the lock are unchanged; ``EDGEHUB_NODE_SDK`` puts it elsewhere; without the
cache provider, into a temporary folder). Each scenario is a small script of
tests/node_sdk/ run by node with ``NODE_PATH`` at that install; it prints one
JSON line per event, which ``NodeRun`` collects so a test can await an
event with a deadline.

The device connects with a SAS connection string whose ``GatewayHostName``
is ``localhost:<port>`` of the hub's TLS listener: unlike the Python SDK
(fixed to 8883), the Node SDK's MQTT transport takes the gateway host as the
authority of its ``mqtts://`` URL, so a port there is honoured and these
tests need no fixed port. The hub's test CA is given with the SDK's ``ca``
option (``client.setOptions``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from authkit import (
    EDGE_ID,
    Identity,
    auth_args,
    make_certs,
    publish_retained,
    publish_scope,
    wait_scope,
    wait_tls_listener,
)
from helpers import free_port, port_accepts, tail, wait_until
from test_c2d import Cloud as C2dCloud
from test_methods import Cloud as MethodsCloud
from test_methods_api import api_call

NODE_DIR = Path(__file__).resolve().parent / "node_sdk"
INSTALL_FILES = ("package.json", "package-lock.json")


# --------------------------------------------------------------------------
# the SDK, installed once
# --------------------------------------------------------------------------


def sdk_pins() -> dict[str, str]:
    return json.loads((NODE_DIR / "package.json").read_text())["dependencies"]


def ensure_node_sdk(base: Path) -> Path:
    """Installs (once) tests/node_sdk's locked packages with ``npm ci`` into
    ``base``; returns its node_modules."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (apt-get install nodejs npm); the Node SDK tests need it",
                        pytrace=False)
    base = Path(os.environ.get("EDGEHUB_NODE_SDK") or base)
    base.mkdir(parents=True, exist_ok=True)
    stamp = hashlib.sha256(b"".join((NODE_DIR / f).read_bytes() for f in INSTALL_FILES)).hexdigest()
    marker = base / ".edgehub-node-sdk-ok"
    modules = base / "node_modules"
    if marker.exists() and marker.read_text().strip() == stamp \
            and all((modules / name / "package.json").exists() for name in sdk_pins()):
        return modules
    marker.unlink(missing_ok=True)
    for f in INSTALL_FILES:
        shutil.copyfile(NODE_DIR / f, base / f)
    r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
                       cwd=base, capture_output=True, timeout=900, stdin=subprocess.DEVNULL,
                       env=dict(os.environ, npm_config_update_notifier="false"))
    assert r.returncode == 0, (
        f"npm ci in {base} failed (the npm registry is needed once):\n"
        f"{r.stdout.decode(errors='replace')[-3000:]}\n{r.stderr.decode(errors='replace')[-3000:]}"
    )
    marker.write_text(stamp + "\n")
    return modules


@pytest.fixture(scope="session")
def node_sdk(request, tmp_path_factory) -> Path:
    """node_modules holding the pinned Node SDK (installed once, cached)."""
    name = "azure-iot-node-" + "-".join(v for _, v in sorted(sdk_pins().items()))
    cache = getattr(request.config, "cache", None)
    base = cache.mkdir(name) if cache is not None else tmp_path_factory.mktemp(name)
    return ensure_node_sdk(base)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("node-sdk-certs"))


# --------------------------------------------------------------------------
# one scenario script, its events
# --------------------------------------------------------------------------


class NodeRun:
    """A scenario script of tests/node_sdk/ run by node for one identity. Its
    stdout JSON lines are collected as events (``{"event": name, ...}``);
    the SDK's debug output (stderr) goes to ``log``."""

    def __init__(self, modules: Path, script: str, ident: Identity, ca: Path, tls_port: int, log: Path,
                 timeout: float = 60.0, **args):
        self.script = script
        self.log = Path(log)
        self.args = {"cs": ident.connection_string(gateway=f"localhost:{tls_port}"), "ca": str(ca),
                     "timeout": timeout, **args}
        self.events: list[dict] = []
        self.ended = False
        self.cond = threading.Condition()
        self._stderr = open(self.log, "wb")
        # the hub listens on 127.0.0.1 only: "localhost" must not resolve to ::1 first
        node_options = f"{os.environ.get('NODE_OPTIONS', '')} --dns-result-order=ipv4first".strip()
        env = dict(os.environ, NODE_PATH=str(modules), NODE_OPTIONS=node_options, DEBUG="azure-iot-*",
                   DEBUG_COLORS="no")
        self.proc = subprocess.Popen(["node", str(NODE_DIR / script), json.dumps(self.args)], cwd=NODE_DIR,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "stdout", "line": line}
            with self.cond:
                self.events.append(event)
                self.cond.notify_all()
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def describe(self) -> str:
        with self.cond:
            events = "\n".join(json.dumps(e) for e in self.events)
        return (f"{self.script} exit={self.proc.poll()} events:\n{events}\n"
                f"SDK debug log ({self.log}) tail:\n{tail(self.log, 6000)}")

    def poll(self, pred: Callable[[dict], bool], timeout: float, desc: str) -> dict | None:
        """The first event for which ``pred`` holds, waiting up to ``timeout``
        seconds; None if there is none by then. Fails at once when the script
        reported an error or ended without one."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for e in self.events:
                    if e.get("event") == "error":
                        raise AssertionError(f"the Node SDK failed before {desc}:\n{self.describe()}")
                    if pred(e):
                        return e
                if self.ended:
                    raise AssertionError(f"the Node SDK script ended without {desc}:\n{self.describe()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def wait(self, name: str, timeout: float, desc: str) -> dict:
        e = self.poll(lambda e: e.get("event") == name, timeout, desc)
        assert e is not None, f"no {desc} from the Node SDK within {timeout} s:\n{self.describe()}"
        return e

    def finish(self, timeout: float) -> None:
        """Waits until the script ends; it must end with ``done`` and exit 0."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.script} did not end within {timeout} s:\n{self.describe()}") from None
        self._reader.join(10)
        assert self.proc.returncode == 0 and self.named("done"), f"{self.script} failed:\n{self.describe()}"

    def named(self, name: str) -> list[dict]:
        with self.cond:
            return [e for e in self.events if e.get("event") == name]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._stderr.close()


@pytest.fixture
def node(node_sdk, certs, tmp_path):
    """node(script, identity, tls_port, **args) -> a started NodeRun; every
    run is ended at teardown."""
    runs: list[NodeRun] = []

    def run(script: str, ident: Identity, tls_port: int, **args) -> NodeRun:
        r = NodeRun(node_sdk, script, ident, certs["ca"], tls_port,
                    tmp_path / f"node-{len(runs)}-{Path(script).stem}-{ident.device_id}.log", **args)
        runs.append(r)
        return r

    yield run
    for r in runs:
        r.close()


def start_gateway(hub_factory, upstream, certs, extra_args: list[str] = ()):
    """A hub with a TLS listener on a free port; returns (hub, that port)."""
    tls_port = free_port()
    hub = hub_factory(upstream, edge_id=EDGE_ID,
                      extra_args=[*auth_args(tls=certs, tls_port=tls_port), *extra_args])
    wait_tls_listener(hub, tls_port)
    return hub, tls_port


def stop_upstream(upstream, hub) -> None:
    upstream.stop()
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 0, 15, "the upstream disconnected")


# --------------------------------------------------------------------------
# twins
# --------------------------------------------------------------------------


def test_a_node_sdk_device_gets_its_twin_and_patches_reported_offline_and_a_second_get_shows_the_patches(
    node, certs, upstream, hub_factory
):
    child1, child2 = Identity.child("child1"), Identity.child("child2")
    hub, tls_port = start_gateway(hub_factory, upstream, certs)
    publish_scope(upstream, [child1, child2])
    wait_scope(hub, 2)
    stop_upstream(upstream, hub)

    run = node("twin.js", child1, tls_port, steps=[
        {"op": "get"},
        {"op": "patch", "patch": {"fw": "1.0", "cfg": {"rate": 5, "mode": "eco"}}},
        {"op": "patch", "patch": {"cfg": {"rate": None}}},
        {"op": "get"},
    ])
    run.finish(60)
    twins = run.named("twin")
    assert (twins[0]["desired"], twins[0]["reported"]) == ({"$version": 1}, {"$version": 1}), run.describe()
    assert [e["patch"] for e in run.named("patched")] == [
        {"fw": "1.0", "cfg": {"rate": 5, "mode": "eco"}}, {"cfg": {"rate": None}}], run.describe()
    # $version 3 is the hub's: the SDK merges a patch it sent without a version
    assert twins[1]["reported"] == {"fw": "1.0", "cfg": {"mode": "eco"}, "$version": 3}, run.describe()

    # a new client (a new SDK process) gets the patched twin from the hub; another device its own
    again = node("twin.js", child1, tls_port, steps=[{"op": "get"}])
    again.finish(60)
    assert again.named("twin")[0]["reported"] == {"fw": "1.0", "cfg": {"mode": "eco"}, "$version": 3}, \
        again.describe()
    other = node("twin.js", child2, tls_port, steps=[{"op": "get"}])
    other.finish(60)
    assert other.named("twin")[0]["reported"] == {"$version": 1}, other.describe()


def test_a_node_sdk_device_receives_a_desired_patch_set_in_the_cloud(node, certs, upstream, hub_factory):
    child1 = Identity.child("child1")
    hub, tls_port = start_gateway(hub_factory, upstream, certs)
    publish_scope(upstream, [child1])
    wait_scope(hub, 1)

    run = node("twin.js", child1, tls_port, timeout=120,
               steps=[{"op": "get"}, {"op": "desired", "until": "rate"}])
    run.wait("listening", 60, "its desired handler set")
    assert run.named("twin")[0]["desired"] == {"$version": 1}, run.describe()

    def with_rate(e: dict) -> bool:
        return e.get("event") == "desired" and "rate" in e["desired"]

    # The SDK subscribes when the handler is set and has asked for its twin
    # again since: the first change should reach it. Should its SUBSCRIBE
    # still be on its way, a later change does (one a second, at most 60).
    version, patch = 1, None
    while patch is None and version <= 61:
        version += 1
        publish_retained(upstream.port, "devices/child1/twin/desired",
                         json.dumps({"rate": version, "$version": version}).encode())
        patch = run.poll(with_rate, 1.0, "a desired patch")
    assert patch is not None, f"no desired patch reached the SDK:\n{run.describe()}"
    run.finish(30)
    version = patch["desired"]["$version"]
    assert patch["desired"]["rate"] == version >= 2, run.describe()
    # it came as a patch on the topic (the SDK raises the same event for a GET's desired)
    assert f"message received on $iothub/twin/PATCH/properties/desired/?$version={version}" \
        in run.log.read_text(errors="replace"), run.describe()


# --------------------------------------------------------------------------
# direct methods
# --------------------------------------------------------------------------


def test_a_node_sdk_device_answers_reboot_called_from_the_cloud_and_with_the_upstream_down_by_a_module_through_the_api(
    node, certs, upstream, hub_factory
):
    child1, mod1 = Identity.child("child1"), Identity.module("mod1")
    api_port = free_port()
    hub, tls_port = start_gateway(hub_factory, upstream, certs, ["--api-listen", f"127.0.0.1:{api_port}"])
    wait_until(lambda: port_accepts(api_port), 20, "the API listener")
    publish_scope(upstream, [child1, mod1])
    wait_scope(hub, 2)

    run = node("method.js", child1, tls_port, timeout=150, method="reboot", status=200, count=2)
    run.wait("registered", 60, "its method handler set")
    cloud = MethodsCloud(upstream)
    try:
        # the connect timeout covers the SDK's SUBSCRIBE still on its way
        rid = cloud.call("devices/child1", "reboot",
                         {"payload": {"delay": 5}, "responseTimeoutInSeconds": 30, "connectTimeoutInSeconds": 60})
        status, payload = cloud.answer("devices/child1", rid, 90)
    finally:
        cloud.close()
    assert (status, payload) == (200, {"done": "reboot", "request": {"delay": 5}}), run.describe()

    stop_upstream(upstream, hub)
    status, body = api_call(api_port, certs["ca"], "/twins/child1/methods",
                            {"methodName": "reboot", "payload": {"delay": 1}, "responseTimeoutInSeconds": 30},
                            mod1)
    assert (status, body) == (200, {"status": 200, "payload": {"done": "reboot", "request": {"delay": 1}}}), \
        run.describe()
    run.finish(30)
    assert [(e["name"], e["payload"]) for e in run.named("method")] == [
        ("reboot", {"delay": 5}), ("reboot", {"delay": 1})], run.describe()
    assert [e["status"] for e in run.named("answered")] == [200, 200]


# --------------------------------------------------------------------------
# cloud-to-device messages
# --------------------------------------------------------------------------


def test_a_node_sdk_device_receives_and_completes_the_messages_stored_for_it_with_the_upstream_down(
    node, certs, upstream, hub_factory
):
    child1 = Identity.child("child1")
    hub, tls_port = start_gateway(hub_factory, upstream, certs)
    publish_scope(upstream, [child1])
    wait_scope(hub, 1)
    cloud = C2dCloud(upstream)
    try:
        cloud.send("child1", b'{"cmd": "on"}', "%24.mid=m1&color=red")
        cloud.send("child1", b'{"cmd": "off"}', "%24.mid=m2&color=blue")
        hub.wait_metric("edgehub_c2d_queued", lambda v: v == 2, 15, "two messages stored for child1")
    finally:
        cloud.close()
    stop_upstream(upstream, hub)

    run = node("c2d.js", child1, tls_port, count=2)
    run.finish(60)
    assert [(e["data"], e["messageId"], e["properties"]) for e in run.named("message")] == [
        ('{"cmd": "on"}', "m1", {"color": "red"}),
        ('{"cmd": "off"}', "m2", {"color": "blue"}),
    ], run.describe()
    assert [e["messageId"] for e in run.named("completed")] == ["m1", "m2"], run.describe()
    hub.wait_metric("edgehub_c2d_queued", lambda v: v == 0, 15, "both acknowledged by the Node SDK")
