"""Bad input closes only the offending connection; the hub keeps serving."""

import uuid

import pytest

from helpers import (
    CONNACK,
    DISCONNECT,
    PUBACK,
    Publisher,
    RawClient,
    connect_packet,
    publish_packet,
)

MAX_MESSAGE_BYTES = 4096
CLOSE_TIMEOUT = 5.0


@pytest.fixture
def served(upstream, collector_factory, hub_factory, clients):
    collector = collector_factory(upstream)
    hub = hub_factory(upstream, max_message_bytes=MAX_MESSAGE_BYTES, edge_id="edge-bad")

    def raw():
        r = RawClient(hub.port)
        clients.append(r)
        return r

    def still_serves():
        assert hub.alive(), "the hub process died"
        tag = f"still-ok-{uuid.uuid4().hex[:8]}".encode()
        p = Publisher(hub.port)
        clients.append(p.connect())
        assert p.publish_and_wait("devices/good/messages/events/", tag) < 0x80
        collector.wait_payload(tag, 20)
        p.close()
        assert hub.alive(), "the hub process died"
        return collector.snapshot()

    return hub, raw, still_serves


def assert_closed_without(r: RawClient, forbidden_types, what: str):
    packets = r.read_until_closed(CLOSE_TIMEOUT)
    assert r.closed, f"{what}: connection not closed"
    bad = [p for p in packets if p[0] in forbidden_types]
    assert not bad, f"{what}: unexpected packets before close: {bad}"
    return packets


def test_garbage_bytes_close_the_connection_and_the_hub_keeps_serving(served):
    hub, raw, still_serves = served
    r = raw()
    r.send(b"\x00\xff\xfe\xfdthis is not mqtt at all\r\n" * 4)
    assert_closed_without(r, {CONNACK}, "garbage")

    r = raw()
    # 'G' reads as a PUBACK header and 'E' as a 69-byte length: send a
    # request long enough that the bogus "packet" is complete
    r.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\nUser-Agent: edgehub-tests/1.0 (not an MQTT client)\r\n\r\n")
    assert_closed_without(r, {CONNACK}, "HTTP request on the MQTT port")
    still_serves()


def test_connect_with_unsupported_protocol_level_gets_connack_1_then_close(served):
    hub, raw, still_serves = served
    r = raw()
    r.send(connect_packet("level9", level=9))
    packets = r.read_until_closed(CLOSE_TIMEOUT)
    assert r.closed, "connection not closed after unsupported protocol level"
    assert packets, "no CONNACK before close"
    ptype, _flags, body = packets[0]
    assert ptype == CONNACK, f"first packet is type {ptype}, expected CONNACK"
    assert body[:2] == b"\x00\x01", f"CONNACK body {body!r}, expected return code 1 (unacceptable protocol version)"
    still_serves()


def test_publish_as_first_packet_closes_the_connection_and_is_not_stored(served):
    hub, raw, still_serves = served
    r = raw()
    r.send(publish_packet("devices/sneaky/messages/events/", b"sneaky-no-connect", qos=1, packet_id=7))
    assert_closed_without(r, {PUBACK, CONNACK}, "PUBLISH before CONNECT")
    seen = still_serves()
    assert not any(p == b"sneaky-no-connect" for _, p in seen), "a publish sent without CONNECT went upstream"


def test_malformed_packet_after_connect_closes_only_that_connection(served):
    hub, raw, still_serves = served
    bystander = Publisher(hub.port).connect()
    try:
        r = raw()
        _, _, body = r.connect(level=4)
        assert body[1] == 0, f"CONNACK return code {body[1]}"
        # PUBLISH QoS 1 whose topic length (16) runs past the packet's end (3 bytes)
        r.send(b"\x32\x03\x00\x10a")
        assert_closed_without(r, {PUBACK}, "malformed PUBLISH")
        assert bystander.connected.is_set(), "another client was disconnected by someone else's bad packet"
        assert bystander.publish_and_wait("devices/bystander/messages/events/", b"bystander-ok") < 0x80
    finally:
        bystander.close()
    still_serves()


def test_oversized_publish_from_v311_client_closes_its_connection_and_is_not_forwarded(served):
    hub, raw, still_serves = served
    r = raw()
    _, _, body = r.connect(level=4)
    assert body[1] == 0, f"CONNACK return code {body[1]}"
    big = b"B" * (MAX_MESSAGE_BYTES * 2)
    r.send(publish_packet("devices/big/messages/events/", big, qos=1, packet_id=1))
    assert_closed_without(r, {PUBACK}, "oversized PUBLISH (3.1.1)")
    seen = still_serves()
    assert not any(p == big for _, p in seen), "the oversized message was forwarded"


def test_oversized_publish_from_v5_client_gets_disconnect_0x95_then_close(served):
    hub, raw, still_serves = served
    r = raw()
    _, _, body = r.connect(level=5)
    assert body[1] == 0, f"CONNACK reason code {body[1]:#x}"
    big = b"C" * (MAX_MESSAGE_BYTES * 2)
    r.send(publish_packet("devices/big5/messages/events/", big, qos=1, packet_id=1, v5=True))
    packets = assert_closed_without(r, {PUBACK}, "oversized PUBLISH (v5)")
    disconnects = [p for p in packets if p[0] == DISCONNECT]
    assert disconnects, f"no DISCONNECT before close (got {packets}, reset={r.reset})"
    assert disconnects[0][2][:1] == b"\x95", f"DISCONNECT reason {disconnects[0][2][:1]!r}, expected 0x95"
    still_serves()


def test_a_publish_just_under_the_size_limit_is_accepted(served):
    hub, raw, still_serves = served
    p = Publisher(hub.port).connect()
    try:
        topic = "devices/edge/messages/events/"
        payload = b"D" * (MAX_MESSAGE_BYTES - 200)
        assert p.publish_and_wait(topic, payload) < 0x80
    finally:
        p.close()
    still_serves()
