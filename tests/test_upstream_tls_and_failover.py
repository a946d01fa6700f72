"""The upstream connection: TLS with a CA file, and fail-over between a
cluster's addresses."""

import subprocess
from pathlib import Path

import pytest

from helpers import Collector, Publisher, Upstream, free_port, wait_until


def make_ca_and_server_cert(d: Path) -> dict[str, Path]:
    """A throw-away CA and a server certificate for localhost / 127.0.0.1."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=edgehub test CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "san.ext", "-out", "server.pem")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=some other CA",
        "-keyout", "other.key", "-out", "other-ca.pem")
    return {n: d / f for n, f in
            [("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"), ("other_ca", "other-ca.pem")]}


class TlsUpstream(Upstream):
    """Mosquitto with a TLS listener for the hub and a plain one for the collector."""

    def __init__(self, workdir: Path, certs: dict[str, Path]):
        super().__init__(workdir)
        self.tls_port = free_port()
        extra = [
            f"listener {self.tls_port} 127.0.0.1",
            f"cafile {certs['ca']}",
            f"certfile {certs['cert']}",
            f"keyfile {certs['key']}",
        ]
        self.conf.write_text(self.conf.read_text() + "\n".join(extra) + "\n")

    def start(self, timeout: float = 15.0) -> None:
        super().start(timeout)
        from helpers import port_accepts
        wait_until(lambda: port_accepts(self.tls_port), timeout, "TLS listener")


@pytest.fixture
def tls_upstream(tmp_path, request):
    """(upstream with a TLS listener, its collector, the certificates)."""
    certs = make_ca_and_server_cert(tmp_path)
    up = TlsUpstream(tmp_path, certs)
    request.addfinalizer(up.close)
    up.start()
    collector = Collector(up).connect()
    request.addfinalizer(collector.close)
    return up, collector, certs


def test_telemetry_reaches_an_upstream_over_tls_verified_with_the_ca_file(tls_upstream, hub_factory, clients):
    up, collector, certs = tls_upstream
    hub = hub_factory(f"mqtts://127.0.0.1:{up.tls_port}", extra_args=["--upstream-ca", str(certs["ca"])])
    pub = Publisher(hub.port)
    clients.append(pub.connect())
    topic = "devices/tls1/messages/events/secure=yes"
    assert pub.publish_and_wait(topic, b"over tls", qos=1) < 0x80
    got = collector.wait_payload(b"over tls", 20)
    assert (topic, b"over tls") in got
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 10, "upstream connected over TLS")


def test_an_upstream_whose_certificate_does_not_chain_to_the_ca_is_not_used_and_messages_stay_queued(
    tls_upstream, hub_factory, clients
):
    up, collector, certs = tls_upstream
    hub = hub_factory(f"mqtts://127.0.0.1:{up.tls_port}", extra_args=["--upstream-ca", str(certs["other_ca"])])
    pub = Publisher(hub.port)
    clients.append(pub.connect())
    assert pub.publish_and_wait("devices/tls2/messages/events/", b"kept", qos=1) < 0x80
    wait_until(lambda: "TLS" in hub.log_path.read_text(errors="replace"), 20, "a TLS error in the hub log")
    assert hub.alive()
    assert hub.metric("edgehub_upstream_connected") == 0
    assert hub.metric("edgehub_queue_depth") == 1
    assert collector.count() == 0


def test_the_hub_fails_over_to_the_next_cluster_address_and_back_without_losing_messages(
    upstream_factory, collector_factory, hub_factory, clients
):
    a = upstream_factory()
    b = upstream_factory()
    a.start()
    b.start()
    ca = collector_factory(a)
    cb = collector_factory(b)
    hub = hub_factory(f"{a.url},{b.url}")
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 15, "upstream connected")

    pub = Publisher(hub.port, inflight=100)
    clients.append(pub.connect())
    topic = "devices/c1/messages/events/"
    n = 3000
    for i in range(n):
        if i == 1000:
            # the node the hub uses goes away mid-load; the hub must move on
            a.stop()
        pub.publish(topic, str(i).encode(), qos=1, key=i)
    pub.wait_results(n, timeout=120)
    assert all(rc < 0x80 for rc in pub.results.values())

    want = {str(i).encode() for i in range(n)}
    # What node a acknowledged before it stopped is a's to deliver: bring it
    # back so its persistent collector session gets it.
    a.start()

    def have():
        got = {p for _, p in ca.snapshot()} | {p for _, p in cb.snapshot()}
        return want <= got

    wait_until(have, 60, "every message on one of the cluster's nodes")
    assert cb.count() > 0, "nothing went to the second node"
