"""The local broker speaks the whole of MQTT that clients rely on:

- an MQTT 5 DISCONNECT of remaining length 0 (MQTT 5 3.14.2.1: reason 0x00,
  no properties; paho 2.x sends it) is a normal disconnect: no will, no
  "malformed" log line; a DISCONNECT with reason 0x04 (disconnect with will
  message) does publish the will;
- at ``mqtt.max_connections`` a new client is refused at once (MQTT 3.1.1
  CONNACK 0x03 server unavailable, MQTT 5 CONNACK 0x97 quota exceeded), the
  connection closed and the refusal logged with the limit; a freed slot serves
  a new client again; a TLS handshake never finished holds its slot only
  until the handshake deadline (10 s), then the hub closes it, logs it, and
  the slot serves a client again;
- a subscriber that asks for QoS 2 gets QoS 2 deliveries (PUBLISH, PUBREC,
  PUBREL, PUBCOMP) of QoS 2 publishes, min(publish QoS, granted QoS) in
  general; a persistent session keeps a QoS 2 message while it is away and
  delivers it at QoS 2, and a QoS 2 delivery interrupted after PUBREC goes on
  with PUBREL when the session resumes;
- keepalive: a client silent for 1.5 times its keepalive is closed (MQTT 5:
  DISCONNECT 0x8D) and its will published; one that pings is kept; a hub
  that shuts down tells MQTT 5 clients so (DISCONNECT 0x8B).

Nothing here sleeps: a will that must not come is checked against a sentinel
published, on a new connection, once the hub counts the dying connection as
gone (``edgehub_clients_connected``); the hub publishes a will as it ends the
session, before the sentinel's connection is even opened.
"""

from __future__ import annotations

import signal
import socket
import struct
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from authkit import client_ssl_context, log_since, log_size, make_certs, subscribe_packet, wait_log, wait_tls_listener
from helpers import (
    CONNACK,
    LOOPBACK,
    PUBLISH,
    SUBACK,
    Publisher,
    RawClient,
    Subscriber,
    WaitTimeout,
    connect_packet,
    free_port,
    packet,
    publish_packet,
    wait_until,
)

PUBACK, PUBREC, PUBREL, PUBCOMP, PINGRESP = 4, 5, 6, 7, 13
PROTOCOLS = [mqtt.MQTTv311, mqtt.MQTTv5]
PROTOCOL_IDS = ["v311", "v5"]


@pytest.fixture
def hub(hub_factory):
    return hub_factory(None, edge_id="edge-mqtt")


def sub(hub, clients, **kw) -> Subscriber:
    s = Subscriber(hub.port, **kw)
    clients.append(s)
    return s.connect()


def pub(hub, clients, **kw) -> Publisher:
    p = Publisher(hub.port, **kw)
    clients.append(p)
    return p.connect()


def raw(hub, clients, timeout: float = 10.0) -> RawClient:
    r = RawClient(hub.port, timeout=timeout)
    clients.append(r)
    return r


def packet_id(body: bytes) -> int:
    return struct.unpack("!H", body[:2])[0]


def ack(ptype: int, pid: int) -> bytes:
    """PUBREC / PUBREL (flags 0b0010, MQTT 3.1.1 3.6.1) / PUBCOMP for ``pid``."""
    return packet(ptype, 0x02 if ptype == PUBREL else 0, struct.pack("!H", pid))


def parse_publish(flags: int, body: bytes) -> tuple[str, int, int | None, bytes]:
    """(topic, qos, packet id, payload) of an MQTT 3.1.1 PUBLISH."""
    qos = (flags >> 1) & 0x03
    n = struct.unpack("!H", body[:2])[0]
    topic, i = body[2:2 + n].decode(), 2 + n
    pid = None
    if qos:
        pid, i = packet_id(body[i:]), i + 2
    return topic, qos, pid, body[i:]


def expect(r: RawClient, ptype: int, what: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """The next packet from the hub, which must be of type ``ptype``: (flags, body)."""
    p = r.read_packet(timeout)
    assert p is not None, f"the hub closed the connection instead of sending {what}"
    assert p[0] == ptype, f"expected {what} (type {ptype}), got packet type {p[0]} {p[2]!r}"
    return p[1], p[2]


def raw_subscribe(r: RawClient, topic_filter: str, qos: int, pid: int = 1) -> int:
    """SUBSCRIBE (MQTT 3.1.1) to one filter; returns the granted QoS."""
    r.send(subscribe_packet([topic_filter], packet_id=pid, qos=qos))
    _, body = expect(r, SUBACK, "SUBACK")
    assert packet_id(body) == pid
    return body[2]


# --------------------------------------------------------------------------
# the MQTT 5 DISCONNECT of remaining length 0
# --------------------------------------------------------------------------


def leave_raw(hub, clients, will_topic: str, disconnect: bytes) -> None:
    """An MQTT 5 client with a will sends ``disconnect``; returns once the hub closed it."""
    r = raw(hub, clients)
    _, _, body = r.connect(client_id=f"leaver-{uuid.uuid4().hex[:6]}", level=5, will=(will_topic, b"gone", 1))
    assert body[1] == 0, f"CONNACK reason {body[1]:#x}"
    hub.wait_metric("edgehub_clients_connected", lambda v: v == 2, 10, "== 2 (the watcher and the leaver)")
    assert r.send(disconnect)
    try:
        r.read_until_closed(10)
    except WaitTimeout:
        raise AssertionError(f"the hub did not close the connection within 10 s of DISCONNECT {disconnect!r}") from None


def leave_paho(hub, clients, will_topic: str) -> None:
    """paho 2.x over MQTT 5 with a will calls disconnect() (a DISCONNECT of length 0)."""
    p = pub(hub, clients, protocol=mqtt.MQTTv5, will=(will_topic, b"gone", 1))
    hub.wait_metric("edgehub_clients_connected", lambda v: v == 2, 10, "== 2 (the watcher and the leaver)")
    p.client.disconnect()
    assert p.disconnected.wait(10), "paho did not finish its disconnect"
    p.client.loop_stop()


@pytest.mark.parametrize("client", ["raw socket", "paho 2"])
def test_an_mqtt5_disconnect_of_length_zero_ends_the_session_normally_without_the_will(hub, clients, client):
    watcher = sub(hub, clients)
    watcher.subscribe("local/will/#", qos=1)
    hub.wait_metric("edgehub_clients_connected", lambda v: v == 1, 10, "== 1 (the will watcher)")
    offset = log_size(hub)

    will_topic = "local/will/zero-length"
    if client == "raw socket":
        leave_raw(hub, clients, will_topic, b"\xe0\x00")
    else:
        leave_paho(hub, clients, will_topic)
    # the session has ended once the hub no longer counts the connection
    hub.wait_metric("edgehub_clients_connected", lambda v: v == 1, 10, "== 1 (the leaver is gone)")

    assert pub(hub, clients).publish_and_wait("local/will/sentinel", b"sentinel") < 0x80
    watcher.wait_topic("local/will/sentinel")
    assert will_topic not in {t for t, _ in watcher.received()}, \
        "the will was published after an MQTT 5 DISCONNECT of length 0 (a normal disconnect)"
    log = log_since(hub, offset)
    assert "malformed" not in log.lower(), f"an MQTT 5 DISCONNECT of length 0 was logged as malformed:\n{log}"


def test_an_mqtt5_disconnect_with_reason_0x04_publishes_the_will(hub, clients):
    watcher = sub(hub, clients)
    watcher.subscribe("local/will/#", qos=1)
    # reason 0x04 (disconnect with will message) and no properties (3.14.2.2.1)
    leave_raw(hub, clients, "local/will/with-will", b"\xe0\x01\x04")
    assert watcher.wait_topic("local/will/with-will", timeout=10).payload == b"gone"


# --------------------------------------------------------------------------
# max_connections
# --------------------------------------------------------------------------

MAX_CONNECTIONS = 3
LIMIT_LOG = r"max[_ -]?connections|connection limit"
# (MQTT level, CONNACK code): 3.1.1 return code 3 "server unavailable", MQTT 5 0x97 "quota exceeded"
REFUSALS = [(4, 0x03), (5, 0x97)]


def connack_code(hub, clients, level: int, timeout: float = 5.0) -> int | None:
    """A raw CONNECT: the CONNACK code, or None if the hub closed without one.
    A hub that neither answers nor closes fails the test (no hanging)."""
    r = raw(hub, clients, timeout=timeout)
    assert r.send(connect_packet(f"c-{uuid.uuid4().hex[:8]}", level=level))
    try:
        p = r.read_packet(timeout)
    except WaitTimeout:
        raise AssertionError(f"no CONNACK and no close within {timeout}s: the hub left the client hanging") from None
    if p is None:
        return None
    assert p[0] == CONNACK, f"expected CONNACK, got packet type {p[0]}"
    code = p[2][1]
    if code != 0:
        try:
            rest = r.read_until_closed(timeout)
        except WaitTimeout:
            raise AssertionError(f"CONNACK {code:#x} but the connection stayed open for {timeout}s") from None
        assert not rest, f"packets after a refusing CONNACK: {rest}"
    return code


@pytest.mark.parametrize("level,code", REFUSALS, ids=["v311-connack-3", "v5-connack-0x97"])
def test_a_client_beyond_max_connections_is_refused_at_once_and_served_once_a_slot_frees(
    hub_factory, clients, level, code
):
    hub = hub_factory(None, edge_id="edge-limit", extra_args=["--max-connections", str(MAX_CONNECTIONS)])
    served = []
    for i in range(MAX_CONNECTIONS):
        r = raw(hub, clients)
        _, _, body = r.connect(client_id=f"held-{i}", level=level)
        assert body[1] == 0, f"connection {i + 1} of {MAX_CONNECTIONS} refused: {body[1]:#x}"
        served.append(r)

    offset = log_size(hub)
    got = connack_code(hub, clients, level)
    assert got == code, f"connection {MAX_CONNECTIONS + 1}: CONNACK {got!r}, expected {code:#x}"
    wait_log(hub, offset, LIMIT_LOG, 10, "a log line naming the connection limit")

    # the ones served still are
    for r in served:
        assert r.send(b"\xc0\x00")  # PINGREQ
        expect(r, PINGRESP, "PINGRESP")

    served[0].send(b"\xe0\x00")
    served[0].read_until_closed(10)
    wait_until(lambda: connack_code(hub, clients, level) == 0, 10, "a client served once a slot is free")
    # and the limit still holds with the new client counted
    got = connack_code(hub, clients, level)
    assert got == code, f"connection {MAX_CONNECTIONS + 1} after the slot was reused: CONNACK {got!r}"
    assert hub.alive()


SLOTS_HELD = "edgehub_connection_slots_held"


def test_a_client_accepted_while_every_slot_is_held_is_served_if_one_frees_before_its_connect(
    hub_factory, clients
):
    """A connection is admitted again when its CONNECT arrives: one whose TCP
    connection was queued behind a client on its way out is served."""
    hub = hub_factory(None, edge_id="edge-limit-late", extra_args=["--max-connections", "1"])
    hub.wait_metric(SLOTS_HELD, lambda v: v == 0, 10, "every slot free once the probes are gone")
    held = raw(hub, clients)
    assert held.connect(client_id="held")[2][1] == 0
    assert hub.metric(SLOTS_HELD) == 1

    # a client connects over TCP while the slot is held, and waits; the one
    # after it is refused, so the hub has accepted both (in order) by then
    late = raw(hub, clients)
    assert connack_code(hub, clients, 4) == 0x03
    held.send(b"\xe0\x00")  # DISCONNECT
    held.read_until_closed(10)
    hub.wait_metric(SLOTS_HELD, lambda v: v == 0, 10, "the slot freed by the client that left")

    _, _, body = late.connect(client_id="late")
    assert body[1] == 0, f"a client whose CONNECT came after the slot freed was refused: {body[1]:#x}"
    assert hub.metric(SLOTS_HELD) == 1
    # and the limit holds with it counted
    assert connack_code(hub, clients, 4) == 0x03
    assert hub.alive()


HANDSHAKE_TIMEOUT = 10.0  # mqtt/listener.rs
HANDSHAKE_EOF_BOUND = 30.0


def tls_connack(port: int, ca) -> int:
    """A TLS client's CONNECT (MQTT 3.1.1): the CONNACK's return code."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as plain:
        with client_ssl_context(ca).wrap_socket(plain, server_hostname="localhost") as tls:
            tls.sendall(connect_packet(f"tls-{uuid.uuid4().hex[:8]}", level=4))
            got = b""
            while len(got) < 4:
                chunk = tls.recv(4 - len(got))
                assert chunk, f"the hub closed a TLS client without a CONNACK (after {got!r})"
                got += chunk
            assert got[0] >> 4 == CONNACK, f"expected CONNACK, got {got!r}"
            return got[3]


def test_a_tls_handshake_never_finished_holds_its_slot_only_until_the_handshake_deadline(
    hub_factory, clients, tmp_path
):
    certs = make_certs(tmp_path / "certs")
    tls_port = free_port()
    hub = hub_factory(None, edge_id="edge-limit-tls", extra_args=[
        "--max-connections", "1", "--tls-listen", f"{LOOPBACK}:{tls_port}",
        "--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"])])
    wait_tls_listener(hub, tls_port)
    # the readiness probes' connections have ended: no slot is held
    hub.wait_metric(SLOTS_HELD, lambda v: v == 0, 10, "every slot free once the probes are gone")
    offset = log_size(hub)

    # a TLS client that connects and never sends its ClientHello
    silent = socket.create_connection((LOOPBACK, tls_port), timeout=5)
    opened = [time.monotonic()]
    hub.wait_metric(SLOTS_HELD, lambda v: v == 1, 10, "the only slot held by the unfinished handshake")
    try:
        # while it holds the slot, TLS and plain TCP clients are refused
        assert tls_connack(tls_port, certs["ca"]) == 0x03
        # refused over plain TCP as well, while it holds the slot
        assert connack_code(hub, clients, 4) == 0x03
        # until the hub closes it, at the handshake deadline
        silent.settimeout(HANDSHAKE_EOF_BOUND)
        try:
            rest = silent.recv(4096)
        except socket.timeout:
            raise AssertionError(f"an unfinished TLS handshake still open after {HANDSHAKE_EOF_BOUND:.0f}s") from None
        except ConnectionResetError:
            rest = b""
        closed = time.monotonic() - opened[0]
        assert rest == b"", f"the hub sent {rest!r} to a client that never sent a ClientHello"
        assert closed >= HANDSHAKE_TIMEOUT - 1, f"closed after {closed:.1f}s, before the handshake deadline"
    finally:
        silent.close()
    wait_log(hub, offset, r"connection not opened.*timed out", 10, "a log line for the handshake that timed out")

    # and the slot serves a client again
    wait_until(lambda: tls_connack(tls_port, certs["ca"]) == 0, 10, "a client served once the handshake's slot is free")
    assert hub.alive()


# --------------------------------------------------------------------------
# QoS 2
# --------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_each_subscriber_gets_a_message_at_the_lesser_of_the_publish_qos_and_its_granted_qos_up_to_2(
    hub, clients, protocol
):
    subs = {}
    for q in (0, 1, 2):
        s = sub(hub, clients, protocol=protocol)
        granted = s.subscribe("local/qos/#", qos=q)
        assert granted == q, f"subscription at QoS {q} granted QoS {granted}"
        subs[q] = s

    p = pub(hub, clients, protocol=protocol)
    p.publish("local/qos/pub0", b"at most once", qos=0)
    assert p.publish_and_wait("local/qos/pub1", b"at least once", qos=1) < 0x80
    assert p.publish_and_wait("local/qos/pub2", b"exactly once", qos=2) < 0x80

    topics = {f"local/qos/pub{q}" for q in (0, 1, 2)}
    for sq, s in subs.items():
        msgs = s.wait_for(lambda ms: {m.topic for m in ms} >= topics, 10, "the three messages")
        got = {m.topic: m.qos for m in msgs}
        want = {f"local/qos/pub{pq}": min(pq, sq) for pq in (0, 1, 2)}
        assert got == want, f"subscriber at QoS {sq}: delivered at {got}, expected {want}"
        assert len(msgs) == 3, f"subscriber at QoS {sq} got duplicates: {[(m.topic, m.qos) for m in msgs]}"


def test_a_qos2_message_goes_through_pubrec_pubrel_pubcomp_on_both_sides_and_arrives_once(hub, clients):
    s = raw(hub, clients)
    assert s.connect(client_id="q2-raw-sub")[2][1] == 0
    assert raw_subscribe(s, "local/q2raw/#", qos=2) == 2

    p = raw(hub, clients)
    assert p.connect(client_id="q2-raw-pub")[2][1] == 0

    def publish_exactly_once(topic: str, payload: bytes, pid: int) -> None:
        p.send(publish_packet(topic, payload, qos=2, packet_id=pid))
        _, body = expect(p, PUBREC, "PUBREC")
        assert packet_id(body) == pid
        p.send(ack(PUBREL, pid))
        _, body = expect(p, PUBCOMP, "PUBCOMP")
        assert packet_id(body) == pid

    def receive_exactly_once() -> tuple[str, bytes]:
        flags, body = expect(s, PUBLISH, "PUBLISH")
        topic, qos, pid, payload = parse_publish(flags, body)
        assert qos == 2, f"{topic} delivered at QoS {qos} to a QoS 2 subscription"
        s.send(ack(PUBREC, pid))
        flags, body = expect(s, PUBREL, "PUBREL (the hub's answer to PUBREC)")
        assert flags == 0x02, f"PUBREL with flags {flags:#x}"
        assert packet_id(body) == pid, f"PUBREL for {packet_id(body)}, PUBREC was for {pid}"
        s.send(ack(PUBCOMP, pid))
        return topic, payload

    publish_exactly_once("local/q2raw/a", b"exactly once", 7)
    assert receive_exactly_once() == ("local/q2raw/a", b"exactly once")
    # the flow is complete: the next delivery is the next message, not the first again
    publish_exactly_once("local/q2raw/sentinel", b"sentinel", 8)
    assert receive_exactly_once() == ("local/q2raw/sentinel", b"sentinel")


def test_a_persistent_session_away_keeps_a_qos2_message_and_gets_it_at_qos2_when_it_comes_back(hub, clients):
    cid = "q2-away"
    s1 = Subscriber(hub.port, client_id=cid, clean=False)
    clients.append(s1.connect())
    assert s1.subscribe("local/q2away/#", qos=2) == 2
    s1.close()

    p = pub(hub, clients)
    assert p.publish_and_wait("local/q2away/a", b"kept at QoS 2", qos=2) < 0x80
    assert p.publish_and_wait("local/q2away/b", b"kept at QoS 1", qos=1) < 0x80

    s2 = sub(hub, clients, client_id=cid, clean=False)
    assert s2.session_present, "the persistent session was not kept"
    msgs = s2.wait_for(lambda ms: len(ms) >= 2, 10, "the two messages kept while it was away")
    # (MQTT orders messages per QoS level only: compared as a set)
    assert sorted((m.topic, bytes(m.payload), m.qos) for m in msgs) == [
        ("local/q2away/a", b"kept at QoS 2", 2),
        ("local/q2away/b", b"kept at QoS 1", 1),
    ]
    assert p.publish_and_wait("local/q2away/sentinel", b"sentinel", qos=2) < 0x80
    s2.wait_topic("local/q2away/sentinel")
    assert len(s2.received()) == 3, f"duplicates: {s2.received()}"


def test_a_qos2_delivery_interrupted_after_pubrec_goes_on_with_pubrel_when_the_session_resumes(hub, clients):
    """MQTT 3.1.1 4.4: on resumption the server re-sends unacknowledged PUBREL
    packets with their packet ids; the message was received (PUBREC), so it is
    not sent again."""
    cid = "q2-resume"
    s1 = raw(hub, clients)
    assert s1.connect(client_id=cid, clean=False)[2][1] == 0
    assert raw_subscribe(s1, "local/q2resume/#", qos=2) == 2

    p = pub(hub, clients)
    assert p.publish_and_wait("local/q2resume/a", b"once only", qos=2) < 0x80
    flags, body = expect(s1, PUBLISH, "PUBLISH")
    topic, qos, pid, payload = parse_publish(flags, body)
    assert (topic, qos, payload) == ("local/q2resume/a", 2, b"once only")
    s1.send(ack(PUBREC, pid))
    expect(s1, PUBREL, "PUBREL")
    s1.close(abort=True)  # gone before its PUBCOMP
    hub.wait_metric("edgehub_clients_connected", lambda v: v == 1, 10, "== 1 (the publisher)")

    s2 = raw(hub, clients)
    _, _, body = s2.connect(client_id=cid, clean=False)
    assert body == b"\x01\x00", f"CONNACK {body!r}, expected session present and accepted"
    flags, body = expect(s2, PUBREL, "the PUBREL re-sent on resumption")
    assert packet_id(body) == pid, f"PUBREL for {packet_id(body)}, the interrupted delivery was {pid}"
    s2.send(ack(PUBCOMP, pid))

    assert p.publish_and_wait("local/q2resume/sentinel", b"sentinel", qos=2) < 0x80
    flags, body = expect(s2, PUBLISH, "the sentinel")
    topic, qos, pid2, payload = parse_publish(flags, body)
    assert (topic, payload) == ("local/q2resume/sentinel", b"sentinel"), \
        f"after the PUBREL the hub sent {topic!r} {payload!r}, expected the sentinel"
    s2.send(ack(PUBREC, pid2))
    expect(s2, PUBREL, "PUBREL")
    s2.send(ack(PUBCOMP, pid2))
    s2.send(b"\xe0\x00")
    assert [pk for pk in s2.read_until_closed(10) if pk[0] == PUBLISH] == []


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_a_queued_qos2_message_received_before_a_restart_gets_its_pubrel_again_and_never_the_publish(
    hub, clients, how
):
    """A persistent QoS 2 subscriber away gets a message kept for it, receives
    it (PUBREC; the hub answers PUBREL) and goes before its PUBCOMP; the hub
    stops (SIGTERM, or kill -9 once a SUBACK says what came before is durable)
    and starts again; on resumption the subscriber gets the PUBREL again and
    never the PUBLISH: exactly once."""
    cid = "q2-restart"
    s1 = raw(hub, clients)
    assert s1.connect(client_id=cid, clean=False)[2][1] == 0
    assert raw_subscribe(s1, "local/q2restart/#", qos=2) == 2
    s1.send(b"\xe0\x00")
    s1.read_until_closed(10)

    p = pub(hub, clients)
    assert p.publish_and_wait("local/q2restart/a", b"once only", qos=2) < 0x80
    p.close()

    s2 = raw(hub, clients)
    assert s2.connect(client_id=cid, clean=False)[2] == b"\x01\x00"
    flags, body = expect(s2, PUBLISH, "the kept message")
    topic, qos, pid, payload = parse_publish(flags, body)
    assert (topic, qos, payload) == ("local/q2restart/a", 2, b"once only")
    s2.send(ack(PUBREC, pid))
    expect(s2, PUBREL, "PUBREL")
    s2.close(abort=True)  # gone before its PUBCOMP
    hub.wait_metric("edgehub_clients_connected", lambda v: v == 0, 10, "== 0")

    if how == "kill9":
        # The broker's journal is written in order: a persistent session's
        # SUBACK (sent once durable) says the PUBREC before it is too.
        marker = raw(hub, clients)
        assert marker.connect(client_id=f"{cid}-marker", clean=False)[2][1] == 0
        raw_subscribe(marker, "local/q2restart-marker", qos=1)
        hub.kill9()
    else:
        assert hub.terminate() == 0, "the hub did not exit cleanly on SIGTERM"
    hub.start()

    s3 = raw(hub, clients)
    assert s3.connect(client_id=cid, clean=False)[2] == b"\x01\x00", "the session was not kept"
    flags, body = expect(s3, PUBREL, "the PUBREL re-sent after the restart")
    assert packet_id(body) == pid
    s3.send(ack(PUBCOMP, pid))
    p2 = pub(hub, clients)
    assert p2.publish_and_wait("local/q2restart/sentinel", b"sentinel", qos=1) < 0x80
    seen = []
    while True:
        flags, body = expect(s3, PUBLISH, "the sentinel")
        seen.append(parse_publish(flags, body))
        if seen[-1][0] == "local/q2restart/sentinel":
            break
        s3.send(ack(PUBREC, seen[-1][2]))
    assert [t for t, *_ in seen] == ["local/q2restart/sentinel"], f"sent again after the restart: {seen}"


# --------------------------------------------------------------------------
# taking a session over
# --------------------------------------------------------------------------


@pytest.mark.parametrize("level", [4, 5], ids=["v311", "v5"])
def test_a_second_connection_with_the_same_client_id_takes_over_and_the_first_is_closed(hub, clients, level):
    """MQTT 3.1.4-3: the server closes the existing connection of a client id
    that connects again (MQTT 5: DISCONNECT 0x8E, session taken over); the
    new connection is served and gets what is published afterwards."""
    client_id = f"taker-{uuid.uuid4().hex[:6]}"
    first = raw(hub, clients)
    _, _, body = first.connect(client_id=client_id, level=level)
    assert body[1] == 0, f"first CONNACK {body[1]:#x}"

    second = raw(hub, clients)
    _, _, body = second.connect(client_id=client_id, level=level)
    assert body[1] == 0, f"second CONNACK {body[1]:#x}"

    before_close = first.read_until_closed(10)
    assert first.closed, "the first connection is still open 10 s after the takeover"
    if level == 5:
        reasons = [p[2][:1] for p in before_close if p[0] == 14]
        assert reasons == [b"\x8e"], f"expected DISCONNECT 0x8E before the close, got {before_close!r}"

    assert second.send(b"\xc0\x00")  # PINGREQ
    expect(second, PINGRESP, "PINGRESP on the connection that took over")
    if level == 4:
        raw_subscribe(second, "local/takeover/#", 1)
        p = pub(hub, clients)
        assert p.publish_and_wait("local/takeover/x", b"after", qos=1) < 0x80
        flags, body = expect(second, PUBLISH, "the message published after the takeover")
        assert parse_publish(flags, body)[0] == "local/takeover/x"
    assert hub.alive()


def test_a_connection_that_resumes_a_session_it_takes_over_gets_what_the_old_one_had_unacknowledged(hub, clients):
    """A client's first connection (clean session off, QoS 1 subscription)
    receives messages and acknowledges none, as a half-open connection would;
    the client comes back on a second connection with the same client id and
    resumes the session. Every message reaches the second connection again
    (DUP set): the takeover loses nothing."""
    client_id = f"handover-{uuid.uuid4().hex[:6]}"
    first = raw(hub, clients)
    first.connect(client_id=client_id, clean=False)
    raw_subscribe(first, "local/handover/#", 1)
    p = pub(hub, clients)
    sent = [f"local/handover/{i}" for i in range(5)]
    for t in sent:
        assert p.publish_and_wait(t, t.encode(), qos=1) < 0x80
    on_first = [parse_publish(*expect(first, PUBLISH, f"{t} on the first connection"))[0] for t in sent]
    assert on_first == sent

    second = raw(hub, clients)
    _, _, body = second.connect(client_id=client_id, clean=False)
    assert body[0] & 0x01, "the second connection did not resume the session"
    first.read_until_closed(10)
    assert first.closed, "the first connection is still open 10 s after the takeover"
    again = []
    for _ in sent:
        flags, body = expect(second, PUBLISH, f"the {len(again) + 1}th unacknowledged message again")
        topic, qos, pid, payload = parse_publish(flags, body)
        assert second.send(ack(PUBACK, pid))
        again.append((topic, qos, bool(flags & 0x08), payload))
    assert sorted(again) == [(t, 1, True, t.encode()) for t in sent], again
    assert hub.alive()


# --------------------------------------------------------------------------
# keepalive and shutdown
# --------------------------------------------------------------------------


@pytest.mark.parametrize("level", [4, 5], ids=["v311", "v5"])
def test_a_client_silent_past_its_keepalive_is_closed_and_its_will_published_while_one_that_pings_stays(
    hub, clients, level
):
    """MQTT 3.1.1 3.1.2.10: a client that sends nothing for 1.5 times its
    keepalive is disconnected as if it had dropped (its will goes)."""
    watcher = sub(hub, clients)
    watcher.subscribe("local/keepalive/#", qos=1)
    tag = uuid.uuid4().hex[:6]

    pinger = raw(hub, clients)
    _, _, body = pinger.connect(client_id=f"pinger-{tag}", level=level, keepalive=1,
                                will=(f"local/keepalive/pinger-{tag}", b"gone", 1))
    assert body[1] == 0
    silent = raw(hub, clients, timeout=15)
    _, _, body = silent.connect(client_id=f"silent-{tag}", level=level, keepalive=1,
                                will=(f"local/keepalive/silent-{tag}", b"gone", 1))
    assert body[1] == 0

    # the pinger pings every half keepalive until the silent one is closed
    # (after 1.5 s of silence, and within a few checks of the hub's)
    pings, packets = 0, []
    while not silent.closed:
        assert pinger.send(b"\xc0\x00")  # PINGREQ
        expect(pinger, PINGRESP, "PINGRESP")
        pings += 1
        assert pings < 40, "the silent client was not closed within 20 s of a 1 s keepalive"
        try:
            while (p := silent.read_packet(0.5)) is not None:
                packets.append(p)
        except WaitTimeout:
            continue
    if level == 5:
        reasons = [p[2][:1] for p in packets if p[0] == 14]
        assert reasons == [b"\x8d"], f"expected DISCONNECT 0x8D (keepalive timeout), got {packets!r}"
    else:
        assert not packets, f"packets before the close: {packets!r}"
    assert pings >= 2, f"closed after {pings} pings of the other client: before its 1.5 s had passed"
    assert watcher.wait_topic(f"local/keepalive/silent-{tag}", timeout=10).payload == b"gone"

    # the pinger was kept all along, its will not published
    assert pinger.send(b"\xc0\x00")
    expect(pinger, PINGRESP, "PINGRESP after the silent client was closed")
    assert pub(hub, clients).publish_and_wait("local/keepalive/sentinel", b"s") < 0x80
    watcher.wait_topic("local/keepalive/sentinel")
    assert f"local/keepalive/pinger-{tag}" not in {t for t, _ in watcher.received()}


def test_a_hub_shutting_down_tells_mqtt5_clients_with_disconnect_0x8b_and_exits_cleanly(hub, clients):
    r = raw(hub, clients)
    _, _, body = r.connect(client_id=f"stayer-{uuid.uuid4().hex[:6]}", level=5, keepalive=60)
    assert body[1] == 0
    hub.wait_metric("edgehub_clients_connected", lambda v: v == 1, 10, "== 1")
    hub.proc.send_signal(signal.SIGTERM)
    packets = r.read_until_closed(15)
    reasons = [p[2][:1] for p in packets if p[0] == 14]
    assert reasons == [b"\x8b"], f"expected DISCONNECT 0x8B (server shutting down), got {packets!r}"
    assert hub.proc.wait(15) == 0, "the hub did not exit cleanly on SIGTERM"
