"""MQTT over WebSockets: the hub's ws:// (``--ws-listen``) and wss://
(``--tls-ws-listen``, the TLS listener's certificate) listeners, with paho's
``transport="websockets"`` (path /mqtt) and the Azure IoT device SDK's
``websockets=True`` (path /$iothub/websocket, port 443 only), authenticated as
on TCP and TLS."""

from __future__ import annotations

import errno
import socket

import paho.mqtt.client as mqtt
import pytest

from authkit import (
    EDGE_ID,
    V3_ACCEPTED,
    V3_BAD_CREDENTIALS,
    V5_BAD_CREDENTIALS,
    DeviceClient,
    Identity,
    auth_args,
    client_ssl_context,
    describe_sdk,
    make_certs,
    publish_scope,
    refused,
    run_sdk,
    wait_scope,
    wait_tls_listener,
)
from helpers import LOOPBACK, Publisher, Subscriber, free_port
from test_auth_x509 import device_tls, self_signed

SDK_WEBSOCKET_PORT = 443


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("ws-certs"))


def ws_args(certs, ws_port: int, wss_port: int) -> list[str]:
    return ["--ws-listen", f"{LOOPBACK}:{ws_port}", "--tls-ws-listen", f"{LOOPBACK}:{wss_port}",
            "--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"])]


def ws_hub(hub_factory, upstream, certs, extra_args=(), **kw):
    """A hub with a ws:// and a wss:// listener; returns (hub, ws port, wss port)."""
    ws_port, wss_port = free_port(), free_port()
    hub = hub_factory(upstream, extra_args=[*ws_args(certs, ws_port, wss_port), *extra_args], **kw)
    wait_tls_listener(hub, ws_port)
    wait_tls_listener(hub, wss_port)
    return hub, ws_port, wss_port


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["v311", "v5"])
@pytest.mark.parametrize("secure", [False, True], ids=["ws", "wss"])
def test_a_paho_websocket_client_publishes_upstream_with_qos_1_and_receives_local_messages(
    secure, protocol, certs, upstream, collector_factory, hub_factory, clients
):
    collector = collector_factory(upstream)
    hub, ws_port, wss_port = ws_hub(hub_factory, upstream, certs, edge_id="edge-ws")
    port = wss_port if secure else ws_port
    tls = client_ssl_context(certs["ca"]) if secure else None

    sub = Subscriber(port, protocol=protocol, transport="websockets", ssl_context=tls)
    clients.append(sub)
    sub.connect()
    assert sub.subscribe("plant/line1/#", qos=1) == 1
    pub = Publisher(port, protocol=protocol, transport="websockets", ssl_context=tls)
    clients.append(pub)
    pub.connect()
    # the socket under paho really is a WebSocket (and TLS on wss)
    sock = pub.client.socket()
    assert type(sock).__name__ == "_WebsocketWrapper", type(sock)
    assert hasattr(sock._socket, "version") == secure

    topic = "devices/d1/messages/events/%24.ct=application%2Fjson&via=ws"
    payload = b'{"over":"websocket"}' * 200  # several KiB: more than one read
    assert pub.publish_and_wait(topic, payload, qos=1) == 0
    got = collector.wait_payload(payload, 20)
    assert (topic, payload) in got

    # local delivery both ways: a plain TCP client to the WebSocket
    # subscriber, and the WebSocket publisher to it as well
    tcp = Publisher(hub.port, protocol=protocol)
    clients.append(tcp)
    tcp.connect()
    assert tcp.publish_and_wait("plant/line1/temp", b"21.5", qos=1) == 0
    assert pub.publish_and_wait("plant/line1/rpm", b"1200", qos=1) == 0
    sub.wait_for(lambda ms: {(m.topic, bytes(m.payload)) for m in ms} >=
                 {("plant/line1/temp", b"21.5"), ("plant/line1/rpm", b"1200")}, 10, "both local messages")
    assert hub.alive()


def test_a_bad_sas_is_refused_over_websockets_as_over_tcp_and_the_right_one_connects(
    certs, upstream, collector_factory, hub_factory, clients
):
    collector = collector_factory(upstream)
    child1 = Identity.child("child1")
    hub, ws_port, wss_port = ws_hub(hub_factory, upstream, certs, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(upstream, [child1])
    wait_scope(hub, 1)
    before = refused(hub)

    wrong = {**child1.credentials(), "password": Identity.child("child1").token()}
    for port, tls in ((ws_port, None), (wss_port, client_ssl_context(certs["ca"]))):
        for protocol, code in ((mqtt.MQTTv311, V3_BAD_CREDENTIALS), (mqtt.MQTTv5, V5_BAD_CREDENTIALS)):
            bad = DeviceClient(port, protocol=protocol, ssl_context=tls, transport="websockets", **wrong)
            clients.append(bad)
            assert bad.connect() == code, f"a wrong SAS on {port}"
    # as on TCP
    bad_tcp = DeviceClient(hub.port, **wrong)
    clients.append(bad_tcp)
    assert bad_tcp.connect() == V3_BAD_CREDENTIALS
    hub.wait_metric("edgehub_auth_refused_total", lambda v: v >= before + 5, 10, "five refusals counted")

    good = DeviceClient(wss_port, ssl_context=client_ssl_context(certs["ca"]), transport="websockets",
                        **child1.credentials())
    clients.append(good)
    assert good.connect() == V3_ACCEPTED
    assert good.publish_result("devices/child1/messages/events/", b"child1 over wss") == 0
    collector.wait_payload(b"child1 over wss", 20)


def test_a_device_with_its_x509_certificate_connects_over_wss_and_another_certificate_is_refused(
    tmp_path, certs, upstream, collector_factory, hub_factory, clients
):
    collector = collector_factory(upstream)
    cam_cert, cam_key, cam_print = self_signed(tmp_path, "cam1")
    other_cert, other_key, _ = self_signed(tmp_path, "impostor")
    hub, _, wss_port = ws_hub(hub_factory, upstream, certs, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(upstream, [{"deviceId": "cam1", "parent": EDGE_ID,
                              "auth": {"type": "x509Thumbprint", "primaryThumbprint": cam_print}}])
    wait_scope(hub, 1)

    creds = {"client_id": "cam1", "username": Identity.child("cam1").username}
    cam = DeviceClient(wss_port, ssl_context=device_tls(certs["ca"], cam_cert, cam_key), transport="websockets",
                       **creds)
    clients.append(cam)
    assert cam.connect() == V3_ACCEPTED
    assert cam.publish_result("devices/cam1/messages/events/", b"cam1 over wss") == 0
    collector.wait_payload(b"cam1 over wss", 20)

    impostor = DeviceClient(wss_port, ssl_context=device_tls(certs["ca"], other_cert, other_key),
                            transport="websockets", **creds)
    clients.append(impostor)
    assert impostor.connect() == V3_BAD_CREDENTIALS


def sdk_port_or_skip() -> None:
    """Skips the test when 127.0.0.1:443 (the SDK's only WebSocket port)
    cannot be bound here."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((LOOPBACK, SDK_WEBSOCKET_PORT))
    except OSError as exc:
        why = "it is taken" if exc.errno == errno.EADDRINUSE else "this user may not bind it"
        pytest.skip(f"the Azure IoT SDK's websockets option connects to port 443 only, and {why} ({exc})")
    finally:
        s.close()


def test_the_azure_iot_sdk_with_websockets_sends_telemetry_through_the_wss_listener_on_443(
    sdk_python, certs, upstream, collector_factory, hub_factory, tmp_path
):
    sdk_port_or_skip()
    collector = collector_factory(upstream)
    child1 = Identity.child("child1")
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=[
        *auth_args(), "--tls-ws-listen", f"{LOOPBACK}:{SDK_WEBSOCKET_PORT}",
        "--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"])])
    wait_tls_listener(hub, SDK_WEBSOCKET_PORT)
    publish_scope(upstream, [child1])
    wait_scope(hub, 1)

    # Nothing listens on 8883: the SDK can only have come through the
    # WebSocket listener.
    msgs = ['{"n":1,"via":"websockets"}', '{"n":2,"via":"websockets"}']
    out = run_sdk(sdk_python, child1, certs["ca"], messages=msgs, properties={"marker": "sdk-ws"},
                  log=tmp_path / "sdk-ws.log", websockets=True)
    assert out.get("error") is None and out.get("connected"), f"the SDK could not connect:\n{describe_sdk(out)}"
    assert out.get("sent") == msgs, f"the SDK did not send everything:\n{describe_sdk(out)}"
    want = {m.encode() for m in msgs}
    got = collector.wait_distinct_payloads(want, 30)
    topics = {t for t, p in got if p in want}
    assert topics and all(t.startswith("devices/child1/messages/events/") and "marker=sdk-ws" in t
                          for t in topics), topics


def upgrade_status(port: int, origin: str | None) -> tuple[int, str]:
    """Sends a WebSocket upgrade for /mqtt (subprotocol mqtt), with an
    ``Origin`` header when given; returns the HTTP status and the body."""
    head = (f"GET /mqtt HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: mqtt\r\n")
    if origin is not None:
        head += f"Origin: {origin}\r\n"
    with socket.create_connection((LOOPBACK, port), timeout=10) as s:
        s.sendall((head + "\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer and len(answer) < 65536:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
        status = int(answer.split(b" ", 2)[1])
        body = b""
        if status != 101:
            s.settimeout(5)
            try:
                while len(body) < 65536 and (chunk := s.recv(4096)):
                    body += chunk
            except OSError:
                pass
        return status, (answer.split(b"\r\n\r\n", 1)[1] + body).decode(errors="replace")


def test_a_web_page_from_an_origin_not_allowed_is_refused_with_403_and_an_allowed_one_or_a_non_browser_is_served(
    certs, upstream, hub_factory, clients
):
    allowed = "https://dash.plant.example"
    hub, ws_port, wss_port = ws_hub(hub_factory, upstream, certs, edge_id="edge-ws-origin",
                                    extra_args=["--ws-allowed-origin", allowed])
    assert upgrade_status(ws_port, None)[0] == 101, "a client that is not a browser (no Origin) was refused"
    assert upgrade_status(ws_port, allowed)[0] == 101, "the allowed origin was refused"
    assert upgrade_status(ws_port, "HTTPS://DASH.PLANT.EXAMPLE")[0] == 101, "origins compare without case"
    for origin in ("https://evil.example", "https://dash.plant.example.evil.example", "null", "http://dash.plant.example"):
        status, body = upgrade_status(ws_port, origin)
        assert status == 403, f"{origin}: {status}"
        assert "mqtt.ws_allowed_origins" in body, body
    # the hub serves on: a paho client (no Origin header) still connects
    pub = Publisher(ws_port, transport="websockets")
    clients.append(pub)
    pub.connect()
    assert pub.publish_and_wait("plant/line1/temp", b"21", qos=1) == 0
    assert hub.alive()


def test_with_no_origin_allowed_every_other_sites_page_is_refused(certs, upstream, hub_factory):
    hub, ws_port, _ = ws_hub(hub_factory, upstream, certs, edge_id="edge-ws-no-origin")
    assert upgrade_status(ws_port, f"http://{LOOPBACK}:{hub.port}")[0] == 403, "a page on another port"
    assert upgrade_status(ws_port, "https://intranet.example")[0] == 403
    assert upgrade_status(ws_port, None)[0] == 101
    # the hub's own address, as paho sends it
    assert upgrade_status(ws_port, f"http://{LOOPBACK}:{ws_port}")[0] == 101
