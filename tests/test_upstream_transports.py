"""The upstream link over other transports: MQTT over WebSocket (ws://,
wss://) and through an HTTP CONNECT proxy (Debian's tinyproxy, started on
loopback), with basic authentication, from the setting or from https_proxy."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import _track
from helpers import LOOPBACK, Collector, Publisher, free_port, port_accepts, tail, wait_until
from test_upstream_tls_and_failover import make_ca_and_server_cert


class TinyProxy:
    """A tinyproxy on a free loopback port that lets 127.0.0.1 open CONNECT
    tunnels to ``connect_ports`` only, with basic authentication."""

    def __init__(self, workdir: Path, connect_ports, user: str = "user", password: str = "pass"):
        self.port = free_port()
        self.dir = Path(workdir) / f"tinyproxy-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "tinyproxy.conf"
        self.log_path = self.dir / "tinyproxy.log"
        lines = [
            f"Port {self.port}",
            f"Listen {LOOPBACK}",
            f"Allow {LOOPBACK}",
            "Timeout 600",
            "MaxClients 20",
            "LogLevel Info",
            f"BasicAuth {user} {password}",
        ]
        lines += [f"ConnectPort {p}" for p in connect_ports]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def url(self, user: str | None = "user", password: str = "pass") -> str:
        if user is None:
            return f"http://{LOOPBACK}:{self.port}"
        return f"http://{user}:{password}@{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 15.0) -> "TinyProxy":
        with open(self.log_path, "ab") as log:
            # -d: stay in the foreground and log to stdout
            self.proc = subprocess.Popen(
                ["tinyproxy", "-d", "-c", str(self.conf)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        wait_until(lambda: self.proc.poll() is not None or port_accepts(self.port), timeout, "tinyproxy to listen")
        assert self.proc.poll() is None, f"tinyproxy exited on start:\n{tail(self.log_path)}"
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def proxy_factory(tmp_path, request):
    """make_proxy(connect_ports) -> a running TinyProxy."""
    if shutil.which("tinyproxy") is None:
        pytest.fail("tinyproxy is not installed (apt-get install tinyproxy)", pytrace=False)
    made: list[TinyProxy] = []

    def make(connect_ports) -> TinyProxy:
        proxy = TinyProxy(tmp_path, connect_ports)
        made.append(proxy)
        _track(request, "tinyproxy", proxy)
        return proxy.start()

    yield make
    for proxy in made:
        proxy.close()


def websocket_upstream(upstream_factory, tls: dict[str, Path] | None = None):
    """A running Mosquitto with a plain listener (for the collector) and a
    WebSocket one (for the hub), with TLS when ``tls`` has certificates."""
    ws_port = free_port()
    extra = [f"listener {ws_port} {LOOPBACK}", "protocol websockets"]
    if tls:
        extra += [f"cafile {tls['ca']}", f"certfile {tls['cert']}", f"keyfile {tls['key']}"]
    up = upstream_factory(extra_conf=extra)
    up.start()
    wait_until(lambda: port_accepts(ws_port), 15, f"mosquitto's WebSocket listener on {ws_port}")
    return up, ws_port


def publish_all(hub, clients, topic: str, payloads: list[bytes]) -> None:
    pub = Publisher(hub.port)
    clients.append(pub.connect())
    for p in payloads:
        assert pub.publish_and_wait(topic, p, qos=1) < 0x80, "the hub refused a message"


def test_telemetry_reaches_an_upstream_over_websocket(upstream_factory, collector_factory, hub_factory, clients):
    up, ws_port = websocket_upstream(upstream_factory)
    collector = collector_factory(up)
    hub = hub_factory(f"ws://{LOOPBACK}:{ws_port}/mqtt", edge_id="ws-edge")
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 20, "upstream connected over WebSocket")
    topic = "devices/ws1/messages/events/"
    publish_all(hub, clients, topic, [b"over websocket 1", b"over websocket 2"])
    got = collector.wait_count(2, 20)
    assert got[:2] == [(topic, b"over websocket 1"), (topic, b"over websocket 2")]
    # the broker saw the hub arrive on its WebSocket listener
    assert "as ws-edge" in up.log_path.read_text(errors="replace")


def test_telemetry_reaches_the_upstream_through_an_http_connect_proxy_with_basic_auth(
    upstream, collector_factory, proxy_factory, hub_factory, clients
):
    collector = collector_factory(upstream)
    proxy = proxy_factory([upstream.port])
    hub = hub_factory(upstream, extra_args=["--upstream-proxy", proxy.url()])
    topic = "devices/px1/messages/events/"
    publish_all(hub, clients, topic, [b"through the proxy"])
    assert collector.wait_payload(b"through the proxy", 20)[0] == (topic, b"through the proxy")
    assert f"CONNECT {LOOPBACK}:{upstream.port} HTTP/1.1" in proxy.log()
    assert "proxy" in hub.log_path.read_text(errors="replace")


def test_missing_or_wrong_proxy_credentials_are_a_clear_error_and_messages_stay_queued_until_they_are_right(
    upstream, collector_factory, proxy_factory, hub_factory, clients
):
    collector = collector_factory(upstream)
    proxy = proxy_factory([upstream.port])
    topic = "devices/px2/messages/events/"
    payloads = [b"queued 0", b"queued 1", b"queued 2"]
    refused = f"proxy http://{LOOPBACK}:{proxy.port} refused CONNECT to {LOOPBACK}:{upstream.port}: HTTP"

    # No credentials: the proxy asks for them (407).
    hub = hub_factory(upstream, name="anonymous", extra_args=["--upstream-proxy", proxy.url(user=None)])
    publish_all(hub, clients, topic, payloads)
    wait_until(lambda: f"{refused} 407 Proxy Authentication Required" in hub.log_path.read_text(errors="replace"),
               20, "the proxy's 407 in the hub log")
    assert hub.metric("edgehub_queue_depth") == len(payloads)
    assert hub.terminate() == 0

    # A wrong password: tinyproxy answers 401 to credentials it does not take.
    hub = hub_factory(upstream, name="wrong", storage=hub.storage,
                      extra_args=["--upstream-proxy", proxy.url(password="not-it")])
    wait_until(lambda: refused in hub.log_path.read_text(errors="replace"), 20, "the proxy's refusal in the hub log")
    # (the test helper's own "===== edgehub start" line shows the command line)
    hub_lines = [ln for ln in hub.log_path.read_text(errors="replace").splitlines() if not ln.startswith("=====")]
    assert not any("not-it" in ln for ln in hub_lines), "the proxy password is never logged"
    assert hub.alive()
    assert hub.metric("edgehub_upstream_connected") == 0
    assert hub.metric("edgehub_queue_depth") == len(payloads)
    assert collector.count() == 0
    assert hub.terminate() == 0

    fixed = hub_factory(upstream, name="fixed", storage=hub.storage, extra_args=["--upstream-proxy", proxy.url()])
    got = collector.wait_count(len(payloads), 30)
    assert [p for _, p in got] == payloads, "the queued messages arrive, in order"
    fixed.wait_metric("edgehub_queue_depth", lambda v: v == 0, 20, "queue drained")


def test_https_proxy_is_used_when_no_proxy_is_set_and_no_proxy_exempts_the_broker(
    upstream, collector_factory, proxy_factory, hub_factory, clients
):
    collector = collector_factory(upstream)
    proxy = proxy_factory([upstream.port])
    via_env = hub_factory(upstream, name="via-env", env={"https_proxy": proxy.url()})
    publish_all(via_env, clients, "devices/px3/messages/events/", [b"via https_proxy"])
    collector.wait_payload(b"via https_proxy", 20)
    assert f"CONNECT {LOOPBACK}:{upstream.port}" in proxy.log()
    assert via_env.terminate() == 0

    # A proxy nobody listens on, but the broker's host is exempt: direct.
    dead_proxy = f"http://{LOOPBACK}:{free_port()}"
    exempt = hub_factory(upstream, name="exempt", env={"HTTPS_PROXY": dead_proxy, "no_proxy": f"localhost,{LOOPBACK}"})
    publish_all(exempt, clients, "devices/px4/messages/events/", [b"no_proxy: direct"])
    collector.wait_payload(b"no_proxy: direct", 20)
    assert proxy.log().count(f"CONNECT {LOOPBACK}:{upstream.port}") == 1, "only the first hub used the proxy"


def test_wss_through_the_proxy_uses_the_ca_file(
    tmp_path, upstream_factory, collector_factory, proxy_factory, hub_factory, clients
):
    certs_dir = tmp_path / "certs"
    certs_dir.mkdir()
    certs = make_ca_and_server_cert(certs_dir)
    up, wss_port = websocket_upstream(upstream_factory, tls=certs)
    collector = collector_factory(up)
    proxy = proxy_factory([wss_port])
    hub = hub_factory(
        f"wss://{LOOPBACK}:{wss_port}/mqtt",
        extra_args=["--upstream-ca", str(certs["ca"]), "--upstream-proxy", proxy.url()],
    )
    topic = "devices/wss1/messages/events/"
    publish_all(hub, clients, topic, [b"wss in a tunnel"])
    assert collector.wait_payload(b"wss in a tunnel", 20)[0] == (topic, b"wss in a tunnel")
    assert f"CONNECT {LOOPBACK}:{wss_port} HTTP/1.1" in proxy.log()
