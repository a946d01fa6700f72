"""The TLS certificate renewed while the hub runs: the MQTT-over-TLS, secure
WebSocket and HTTPS API listeners read ``--tls-cert`` / ``--tls-key`` again
when the files change; new connections get the new certificate, open ones
keep working, and a pair that cannot be used is logged while the previous
certificate stays in service."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from authkit import client_ssl_context, issue_server_cert, log_since, log_size, make_certs, wait_log, wait_tls_listener
from helpers import LOOPBACK, Publisher, Subscriber, free_port, wait_until

RELOADED = r"TLS certificate reloaded"
UNUSABLE = r"the TLS certificate files changed but cannot be used"


@pytest.fixture
def certs(tmp_path):
    """The CA and three server certificates it issued (a, b, c), and the
    two files the hub is given (``live.pem``, ``live.key``), holding a."""
    certs = make_certs(tmp_path / "certs")
    d = certs["dir"]
    pairs = {name: issue_server_cert(d, name) for name in ("a", "b", "c")}
    live = {"cert": d / "live.pem", "key": d / "live.key"}
    install(live, pairs["a"])
    return {"ca": certs["ca"], "pairs": pairs, "live": live}


def replace(path: Path, data: bytes) -> None:
    """Replaces a file as renewal tools do: written aside, renamed over."""
    aside = path.with_name(path.name + ".new")
    aside.write_bytes(data)
    os.replace(aside, path)


def install(live: dict, pair: tuple[Path, Path]) -> None:
    replace(live["cert"], pair[0].read_bytes())
    replace(live["key"], pair[1].read_bytes())


def fingerprint_of_pem(path: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(path.read_text())).hexdigest()


def served_fingerprint(port: int, ca: Path) -> str:
    """The SHA-256 fingerprint of the certificate a new TLS connection to
    ``port`` gets (verified against the CA, for localhost)."""
    ctx = client_ssl_context(ca)
    with socket.create_connection((LOOPBACK, port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def tls_hub(hub_factory, upstream, certs):
    """A hub with the three TLS listeners on the live pair; returns it and
    their ports."""
    ports = {"tls": free_port(), "wss": free_port(), "api": free_port()}
    hub = hub_factory(upstream, edge_id="edge-renew", extra_args=[
        "--tls-listen", f"{LOOPBACK}:{ports['tls']}", "--tls-ws-listen", f"{LOOPBACK}:{ports['wss']}",
        "--api-listen", f"{LOOPBACK}:{ports['api']}",
        "--tls-cert", str(certs["live"]["cert"]), "--tls-key", str(certs["live"]["key"])])
    for port in ports.values():
        wait_tls_listener(hub, port)
    return hub, ports


def test_a_renewed_certificate_goes_to_new_connections_while_open_ones_keep_working(
    certs, upstream, collector_factory, hub_factory, clients
):
    collector = collector_factory(upstream)
    hub, ports = tls_hub(hub_factory, upstream, certs)
    old = fingerprint_of_pem(certs["pairs"]["a"][0])
    new = fingerprint_of_pem(certs["pairs"]["b"][0])
    for port in ports.values():
        assert served_fingerprint(port, certs["ca"]) == old

    # clients connected before the renewal, over TLS and secure WebSocket
    tls = client_ssl_context(certs["ca"])
    pub = Publisher(ports["tls"], ssl_context=tls)
    clients.append(pub)
    pub.connect()
    sub = Subscriber(ports["wss"], protocol=mqtt.MQTTv5, transport="websockets", ssl_context=tls)
    clients.append(sub)
    sub.connect()
    sub.subscribe("plant/renewal", qos=1)

    offset = log_size(hub)
    install(certs["live"], certs["pairs"]["b"])
    for name, port in ports.items():
        wait_until(lambda: served_fingerprint(port, certs["ca"]) == new, 10,
                   f"the renewed certificate on the {name} listener")
    wait_log(hub, offset, RELOADED, 5, "the reload logged")

    # the open connections were untouched: same session, old certificate, working
    assert hashlib.sha256(pub.client.socket().getpeercert(binary_form=True)).hexdigest() == old
    assert pub.publish_and_wait("devices/d1/messages/events/", b"after renewal", qos=1) == 0
    assert collector.wait_payload(b"after renewal", 20)
    assert pub.publish_and_wait("plant/renewal", b"still here", qos=1) == 0
    assert sub.wait_topic("plant/renewal").payload == b"still here"
    assert not pub.disconnected.is_set()

    # a client connecting now gets the new certificate and works too
    late = Publisher(ports["tls"], ssl_context=tls)
    clients.append(late)
    late.connect()
    assert hashlib.sha256(late.client.socket().getpeercert(binary_form=True)).hexdigest() == new
    assert late.publish_and_wait("plant/renewal", b"new certificate", qos=1) == 0
    sub.wait_topic("plant/renewal")
    assert hub.alive()


def test_a_broken_replacement_is_logged_and_the_previous_certificate_stays_in_service(
    certs, upstream, hub_factory
):
    hub, ports = tls_hub(hub_factory, upstream, certs)
    a = fingerprint_of_pem(certs["pairs"]["a"][0])
    b = fingerprint_of_pem(certs["pairs"]["b"][0])
    live = certs["live"]

    broken = {
        "a key that is not the certificate's": lambda: install(live, (certs["pairs"]["c"][0], certs["pairs"]["b"][1])),
        "a certificate file that is not PEM": lambda: replace(live["cert"], b"this is not a certificate\n"),
    }
    for what, do in broken.items():
        offset = log_size(hub)
        do()
        # each new handshake may be the one that looks at the files (at most
        # once a second); every one of them still gets the old certificate
        def logged():
            assert served_fingerprint(ports["tls"], certs["ca"]) == a, f"{what}: a new certificate was served"
            return UNUSABLE in log_since(hub, offset)
        wait_until(logged, 10, f"{what}: the warning in the log")
        line = next(ln for ln in log_since(hub, offset).splitlines() if UNUSABLE in ln)
        assert "live.pem" in line and "WARN" in line, line
        for port in ports.values():
            assert served_fingerprint(port, certs["ca"]) == a

    # a good pair afterwards is taken
    offset = log_size(hub)
    install(live, certs["pairs"]["b"])
    wait_until(lambda: served_fingerprint(ports["wss"], certs["ca"]) == b, 10, "the good pair served")
    wait_log(hub, offset, RELOADED, 5, "the reload logged")
    assert hub.alive()
