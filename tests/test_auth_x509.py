"""X.509: devices authenticating with a TLS client certificate whose
thumbprint is in the scope, and the hub's own client certificate upstream."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

from authkit import (
    EDGE_ID,
    V3_ACCEPTED,
    V3_BAD_CREDENTIALS,
    auth_args,
    make_certs,
    publish_scope,
    try_connect,
    username_for,
    wait_scope,
    wait_tls_listener,
)
from helpers import Collector, Publisher, free_port, wait_until
from test_upstream_tls_and_failover import TlsUpstream


def openssl(d: Path, *args: str) -> str:
    r = subprocess.run(["openssl", *args], capture_output=True, cwd=d, timeout=60, text=True)
    assert r.returncode == 0, f"openssl {' '.join(args)} failed:\n{r.stderr}"
    return r.stdout


def self_signed(d: Path, name: str) -> tuple[Path, Path, str]:
    """A device's self-signed certificate, its key and its SHA-1 thumbprint."""
    openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.pem")
    fp = openssl(d, "x509", "-in", f"{name}.pem", "-noout", "-fingerprint", "-sha1")
    return d / f"{name}.pem", d / f"{name}.key", fp.strip().split("=", 1)[1]


def device_tls(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def test_a_device_whose_certificate_thumbprint_is_in_scope_connects_and_others_are_refused(
    tmp_path, upstream, collector_factory, hub_factory, clients
):
    certs = make_certs(tmp_path / "server")
    cam_cert, cam_key, cam_print = self_signed(tmp_path, "cam1")
    other_cert, other_key, _ = self_signed(tmp_path, "impostor")
    collector = collector_factory(upstream)
    tls_port = free_port()
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args(tls=certs, tls_port=tls_port))
    wait_tls_listener(hub, tls_port)
    publish_scope(upstream, [{"deviceId": "cam1", "parent": EDGE_ID,
                              "auth": {"type": "x509Thumbprint", "primaryThumbprint": cam_print}}])
    wait_scope(hub, 1)

    creds = {"client_id": "cam1", "username": username_for("cam1")}
    rc, cam = try_connect(tls_port, clients, ssl_context=device_tls(certs["ca"], cam_cert, cam_key), **creds)
    assert rc == V3_ACCEPTED, f"cam1 with its certificate: CONNACK {rc}"
    assert cam.publish_result("devices/cam1/messages/events/kind=x509", b"seen by cam1") == 0
    got = collector.wait_payload(b"seen by cam1", 20)
    assert ("devices/cam1/messages/events/kind=x509", b"seen by cam1") in got

    rc, _ = try_connect(tls_port, clients, ssl_context=device_tls(certs["ca"], other_cert, other_key), **creds)
    assert rc == V3_BAD_CREDENTIALS, f"another certificate: CONNACK {rc}"
    rc, _ = try_connect(tls_port, clients, ssl_context=device_tls(certs["ca"]), **creds)
    assert rc == V3_BAD_CREDENTIALS, f"no certificate: CONNACK {rc}"
    assert hub.alive()


class MutualTlsUpstream(TlsUpstream):
    """Mosquitto whose TLS listener requires a client certificate from the CA."""

    def __init__(self, workdir: Path, certs: dict[str, Path]):
        super().__init__(workdir, certs)
        self.conf.write_text(self.conf.read_text() + "require_certificate true\n")


def test_the_hub_signs_in_upstream_with_its_client_certificate(tmp_path, hub_factory, clients, request):
    from test_upstream_tls_and_failover import make_ca_and_server_cert

    certs = make_ca_and_server_cert(tmp_path)
    # the edge's client certificate, signed by the upstream's CA
    openssl(tmp_path, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={EDGE_ID}",
            "-keyout", "edge.key", "-out", "edge.csr")
    (tmp_path / "client.ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    openssl(tmp_path, "x509", "-req", "-in", "edge.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "client.ext", "-out", "edge.pem")
    up = MutualTlsUpstream(tmp_path, certs)
    request.addfinalizer(up.close)
    up.start()
    collector = Collector(up).connect()
    request.addfinalizer(collector.close)
    target = f"mqtts://127.0.0.1:{up.tls_port}"

    without = hub_factory(target, name="nocert", extra_args=["--upstream-ca", str(certs["ca"])])
    with_cert = hub_factory(target, name="cert", extra_args=[
        "--upstream-ca", str(certs["ca"]),
        "--upstream-cert", str(tmp_path / "edge.pem"), "--upstream-key", str(tmp_path / "edge.key")])
    for hub, payload in [(without, b"no client cert"), (with_cert, b"with client cert")]:
        pub = Publisher(hub.port)
        clients.append(pub.connect())
        assert pub.publish_and_wait("devices/e1/messages/events/", payload, qos=1) < 0x80

    collector.wait_payload(b"with client cert", 20)
    with_cert.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 10, "connected with a certificate")
    wait_until(lambda: "upstream" in without.log_path.read_text(errors="replace"), 10, "a log line")
    assert without.metric("edgehub_upstream_connected") == 0
    assert without.metric("edgehub_queue_depth") == 1
    assert b"no client cert" not in {p for _, p in collector.snapshot()}


def test_a_device_with_a_certificate_from_the_configured_ca_and_its_own_name_connects(
    tmp_path, upstream, collector_factory, hub_factory, clients
):
    certs = make_certs(tmp_path / "server")
    d = tmp_path / "devices"
    d.mkdir()
    # the device CA, and certificates it signs for dev1 (right) and dev2 (another device)
    openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=device CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
            "-keyout", "dca.key", "-out", "dca.pem")
    (d / "client.ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    for name in ("dev1", "dev2"):
        openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr")
        openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "dca.pem", "-CAkey", "dca.key", "-CAcreateserial",
                "-days", "2", "-extfile", "client.ext", "-out", f"{name}.pem")
    stranger_cert, stranger_key, _ = self_signed(d, "dev1-selfsigned")

    collector = collector_factory(upstream)
    tls_port = free_port()
    hub = hub_factory(upstream, edge_id=EDGE_ID,
                      extra_args=auth_args(tls=certs, tls_port=tls_port) + ["--device-ca", str(d / "dca.pem")])
    wait_tls_listener(hub, tls_port)
    publish_scope(upstream, [{"deviceId": "dev1", "parent": EDGE_ID, "auth": {"type": "x509Ca"}}])
    wait_scope(hub, 1)

    creds = {"client_id": "dev1", "username": username_for("dev1")}
    rc, dev1 = try_connect(tls_port, clients, ssl_context=device_tls(certs["ca"], d / "dev1.pem", d / "dev1.key"),
                           **creds)
    assert rc == V3_ACCEPTED, f"dev1 with its CA-signed certificate: CONNACK {rc}"
    assert dev1.publish_result("devices/dev1/messages/events/", b"ca-signed") == 0
    collector.wait_payload(b"ca-signed", 20)

    for what, cert, key in [("dev2's certificate", d / "dev2.pem", d / "dev2.key"),
                            ("a self-signed certificate named dev1", stranger_cert, stranger_key)]:
        rc, _ = try_connect(tls_port, clients, ssl_context=device_tls(certs["ca"], cert, key), **creds)
        assert rc == V3_BAD_CREDENTIALS, f"dev1 with {what}: CONNACK {rc}"
