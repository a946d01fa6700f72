"""A flood on the hub's MQTT-over-WebSocket listener (``--ws-listen``) costs the
flooder its own connection, never the others' service nor what is stored:

- connections that open a WebSocket upgrade and never finish it (slowloris:
  part of the HTTP request then nothing, nothing at all, or a header trickled a
  byte a second) do not keep a real paho WebSocket client from connecting and
  publishing QoS 1 while they are open, and the hub closes each of them by
  itself (``HANDSHAKE_TIMEOUT``, 10 s, in ``mqtt/listener.rs``: a whole
  deadline, not an idle one);
- past ``mqtt.max_connections`` a WebSocket client is answered at once, after
  the upgrade, with a refusing CONNACK (3.1.1: 3 server unavailable, 5: 0x97
  quota exceeded) and the close, never left hanging, and a slot freed serves
  a new one;
- a WebSocket message over ``mqtt.max_message_bytes`` + 64 KiB (``websocket.rs``
  ``MESSAGE_SLACK``), in one frame or in fragments, closes that connection with
  a log line, while a message just under it is served in full; others are
  unaffected;
- a flood of ping frames from a client that never reads the pongs leaves
  another client served meanwhile, the hub's resident memory within a bound
  far below the pongs owed, and the flooder's connection closed, and its will
  published, once its MQTT keepalive runs out (pings are WebSocket frames, not
  MQTT packets), without a panic when the flooder finally resets it.

Raw sockets carry the hostile bytes (hand-built, masked frames); paho's
``transport="websockets"`` is the client that must keep being served. Every
wait has a deadline; nothing sleeps in place of an event (the trickle's pace
is the attack, its waits are on the sockets).
"""

from __future__ import annotations

import os
import selectors
import socket
import struct
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from authkit import DeviceClient, log_since, log_size, wait_log, wait_tls_listener
from helpers import (
    CONNACK,
    PUBACK,
    RawClient,
    LOOPBACK,
    Publisher,
    Subscriber,
    WaitTimeout,
    connect_packet,
    free_port,
    publish_packet,
    split_packet,
    wait_until,
    wait_value,
)

TELEMETRY = "devices/ws-flood/messages/events/"

# --------------------------------------------------------------------------
# a raw WebSocket client (RFC 6455, client side, masked frames)
# --------------------------------------------------------------------------

OP_CONT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x2, 0x8, 0x9, 0xA


def upgrade_request(port: int) -> bytes:
    return (f"GET /mqtt HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: mqtt\r\n\r\n").encode()


def masked(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    mask = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client frame (masked, as RFC 6455 5.3 requires of a client)."""
    key = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + key + masked(payload, key)


def split_frame(buf: bytes) -> tuple[int, bytes, bytes] | None:
    """(opcode, payload, the rest) of the first whole server frame in ``buf``."""
    if len(buf) < 2:
        return None
    n, i = buf[1] & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, i = struct.unpack("!H", buf[2:4])[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, i = struct.unpack("!Q", buf[2:10])[0], 10
    key = b""
    if buf[1] & 0x80:  # a server must not mask; unmask anyway
        key, i = buf[i:i + 4], i + 4
    if len(buf) < i + n:
        return None
    payload = buf[i:i + n]
    return buf[0] & 0x0F, masked(payload, key) if key else payload, buf[i + n:]


class RawWs(RawClient):
    """A bare TCP connection that upgrades to a WebSocket and speaks MQTT in
    hand-built binary frames; ``buf`` holds the bytes read and not yet whole
    frames, ``stream`` the MQTT byte stream read back."""

    def __init__(self, port: int, timeout: float = 10.0, rcvbuf: int | None = None):
        super().__init__(port, timeout, rcvbuf)
        self.port = port
        self.stream = b""  # payloads of binary frames: the MQTT byte stream
        self.close_frame: bytes | None = None

    @property
    def local_port(self) -> int:
        return self.sock.getsockname()[1]

    def upgrade(self, timeout: float = 10.0) -> None:
        self.sock.sendall(upgrade_request(self.port))
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(deadline), f"the hub closed the connection during the upgrade: {self.buf!r}"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.split(b" ", 2)[1] == b"101", f"the upgrade was not served: {head!r}"

    def send_mqtt(self, data: bytes) -> bool:
        return self.send(ws_frame(OP_BINARY, data))

    def _frames(self) -> None:
        while (got := split_frame(self.buf)) is not None:
            opcode, payload, self.buf = got
            if opcode in (OP_BINARY, OP_CONT):
                self.stream += payload
            elif opcode == OP_CLOSE:
                self.close_frame = payload

    def read_packet(self, timeout: float = 10.0) -> tuple[int, int, bytes] | None:
        """(type, flags, body) of the next MQTT packet, or None once the hub
        closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            self._frames()
            got = split_packet(self.stream)
            if got is not None:
                header, body, self.stream = got
                return header >> 4, header & 0x0F, body
            if self.closed or not self._fill(deadline):
                return None

    def connect(self, client_id: str, level: int = 4, keepalive: int = 60) -> int:
        """Upgrades, sends CONNECT; returns the CONNACK code."""
        self.upgrade()
        assert self.send_mqtt(connect_packet(client_id, level=level, keepalive=keepalive))
        p = self.read_packet()
        assert p is not None, "the hub closed the WebSocket instead of sending CONNACK"
        assert p[0] == CONNACK, f"expected CONNACK, got packet type {p[0]}"
        return p[2][1]

    def close(self, abort: bool = True) -> None:
        """A reset: nothing left lingering in the hub's or our buffers."""
        super().close(abort=abort)


# --------------------------------------------------------------------------
# the hub, and what the tests read of it
# --------------------------------------------------------------------------


def ws_hub(hub_factory, upstream, extra_args=(), **kw):
    """A hub with a ws:// listener; returns (hub, its port)."""
    ws_port = free_port()
    hub = hub_factory(upstream, extra_args=["--ws-listen", f"{LOOPBACK}:{ws_port}", *extra_args], **kw)
    wait_tls_listener(hub, ws_port)
    return hub, ws_port


def ws_publisher(port: int, clients: list, **kw) -> Publisher:
    p = Publisher(port, transport="websockets", **kw)
    clients.append(p)
    return p.connect()


def rss(hub) -> int:
    """The hub's resident memory, bytes (VmRSS)."""
    for line in Path(f"/proc/{hub.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{hub.proc.pid}/status")


def hub_end_state(hub_port: int, peer_port: int) -> str | None:
    """The TCP state of the hub's end of the connection from ``peer_port``
    (/proc/net/tcp: "01" established, "04" FIN_WAIT1, ...), None once gone.
    Read here, the client learns of a close without reading its socket."""
    ip = "%08X" % struct.unpack("=I", socket.inet_aton(LOOPBACK))[0]
    local, remote = f"{ip}:{hub_port:04X}", f"{ip}:{peer_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == local and f[2] == remote:
            return f[3]
    return None


# --------------------------------------------------------------------------
# 1. slowloris on the upgrade
# --------------------------------------------------------------------------

HANDSHAKE_TIMEOUT = 10.0  # mqtt/listener.rs
SILENT_PARTIAL, SILENT_EMPTY, TRICKLING = 150, 40, 10  # 200 half-open connections
EOF_BOUND = 30.0


def test_two_hundred_unfinished_websocket_upgrades_leave_a_paho_client_served_and_are_each_closed_by_the_hub(
    upstream, collector_factory, hub_factory, clients
):
    collector = collector_factory(upstream)
    hub, ws_port = ws_hub(hub_factory, upstream, edge_id="edge-ws-slowloris")
    offset = log_size(hub)

    # what a slow client has sent of its request when it stops
    partial = upgrade_request(ws_port).split(b"Sec-WebSocket-Key")[0]
    kinds = ["partial"] * SILENT_PARTIAL + ["empty"] * SILENT_EMPTY + ["trickle"] * TRICKLING
    socks: dict[socket.socket, str] = {}
    sel = selectors.DefaultSelector()
    try:
        opened_at = time.monotonic()
        for kind in kinds:
            s = socket.create_connection((LOOPBACK, ws_port), timeout=5)
            if kind != "empty":
                s.sendall(partial if kind == "partial" else partial + b"X-Slow: ")
            s.setblocking(False)
            socks[s] = kind
            sel.register(s, selectors.EVENT_READ)

        # while every one of them is open, a real WebSocket client is served
        pub = ws_publisher(ws_port, clients)
        payload = f"served during the slowloris {uuid.uuid4().hex[:8]}".encode()
        assert pub.publish_and_wait(TELEMETRY, payload, qos=1, timeout=10) == 0
        served_at = time.monotonic()
        early = [socks[k.fileobj] for k, _ in sel.select(timeout=0)]
        assert not early, (f"{len(early)} half-open connections ended within {served_at - opened_at:.1f}s, "
                           f"before the handshake deadline ({HANDSHAKE_TIMEOUT:.0f}s): {sorted(set(early))}")
        assert served_at - opened_at < HANDSHAKE_TIMEOUT, "the paho client was not served while they were open"
        collector.wait_payload(payload, 20)

        # the hub closes each of them by itself; the trickling ones keep
        # sending a byte a second and are closed all the same
        answered: list[bytes] = []
        deadline = opened_at + EOF_BOUND
        while socks and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
                s = key.fileobj
                try:
                    data = s.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data:
                    answered.append(data)
                    continue
                socks.pop(s)
                sel.unregister(s)
                s.close()
            for s, kind in list(socks.items()):
                if kind == "trickle":
                    try:
                        s.send(b"a")
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        pass  # closed: its EOF or reset is read above
        left = sorted(kind for kind in socks.values())
        assert not left, (f"{len(left)} of {len(kinds)} half-open WebSocket connections still open "
                          f"{EOF_BOUND:.0f}s after they were opened: {sorted(set(left))}")
        assert not any(b" 101 " in a.split(b"\r\n", 1)[0] for a in answered), \
            f"an unfinished upgrade was answered with 101: {answered[:3]}"
    finally:
        for s in list(socks):
            s.close()
        sel.close()

    # each logged (the socket is dropped as the deadline passes, the line follows)
    def timed_out() -> int:
        return sum(1 for line in log_since(hub, offset).splitlines()
                   if "connection not opened" in line and "timed out" in line)

    wait_value(timed_out, lambda n: n >= len(kinds), 10,
               f"a 'connection not opened ... timed out' log line for each of the {len(kinds)}", shown="lines")

    # and the hub serves on, over WebSocket and over TCP
    after = f"served after the slowloris {uuid.uuid4().hex[:8]}".encode()
    assert pub.publish_and_wait(TELEMETRY, after, qos=1) == 0
    tcp = Publisher(hub.port)
    clients.append(tcp)
    assert tcp.connect().publish_and_wait(TELEMETRY, b"tcp " + after, qos=1) == 0
    collector.wait_distinct_payloads({payload, after, b"tcp " + after}, 20)
    assert hub.alive()


# --------------------------------------------------------------------------
# 2. max_connections over WebSocket
# --------------------------------------------------------------------------

MAX_CONNECTIONS = 3
PROMPT = 5.0
# (paho protocol, MQTT level, CONNACK code): 3.1.1 3 server unavailable, 5 0x97 quota exceeded
REFUSALS = [(mqtt.MQTTv311, 4, 0x03), (mqtt.MQTTv5, 5, 0x97)]


def ws_device(port: int, clients: list, protocol, name: str) -> DeviceClient:
    c = DeviceClient(port, client_id=f"{name}-{uuid.uuid4().hex[:6]}", protocol=protocol, transport="websockets")
    clients.append(c)
    return c


@pytest.mark.parametrize("protocol,level,code", REFUSALS, ids=["v311-connack-3", "v5-connack-0x97"])
def test_a_websocket_client_beyond_max_connections_is_refused_at_once_and_one_is_served_once_a_slot_frees(
    hub_factory, clients, protocol, level, code
):
    hub, ws_port = ws_hub(hub_factory, None, edge_id="edge-ws-limit",
                          extra_args=["--max-connections", str(MAX_CONNECTIONS)])

    def hold(i: int):
        # the hub's own readiness probes may hold a slot for a moment
        c = ws_device(ws_port, clients, protocol, f"held{i}")
        if c.connect() == 0:
            return c
        c.close()
        return None

    held = [wait_until(lambda i=i: hold(i), 10, f"WebSocket client {i + 1} of {MAX_CONNECTIONS} served")
            for i in range(MAX_CONNECTIONS)]
    refused_before = hub.metric("edgehub_connections_refused_total")
    offset = log_size(hub)

    # paho over WebSocket: a refusing CONNACK, then the close, both at once
    start = time.monotonic()
    extra = ws_device(ws_port, clients, protocol, "extra")
    got = extra.connect(timeout=PROMPT)
    assert got == code, f"WebSocket client {MAX_CONNECTIONS + 1}: CONNACK {got:#x}, expected {code:#x}"
    extra.wait_closed(PROMPT, "the hub to close the refused WebSocket connection")
    assert time.monotonic() - start < PROMPT

    # the same, frame by frame: the upgrade is served (101), then the CONNACK,
    # then nothing but the close
    start = time.monotonic()
    raw = RawWs(ws_port, timeout=PROMPT)
    clients.append(raw)
    assert raw.connect(f"raw-extra-{uuid.uuid4().hex[:6]}", level=level) == code
    try:
        rest = raw.read_until_closed(PROMPT)
    except WaitTimeout:
        raise AssertionError(f"CONNACK {code:#x} but the WebSocket stayed open for {PROMPT}s") from None
    assert not rest, f"packets after a refusing CONNACK: {rest}"
    assert time.monotonic() - start < PROMPT
    wait_log(hub, offset, r"refused: the hub serves max_connections", 10, "a log line naming max_connections")
    hub.wait_metric("edgehub_connections_refused_total", lambda v: v >= refused_before + 2, 10,
                    "counting both refusals")

    # the ones served still are
    for c in held:
        assert c.publish_result("local/ws-limit/held", b"still served") == 0

    held[0].close()
    newcomer: list[DeviceClient] = []

    def served() -> bool:
        c = ws_device(ws_port, clients, protocol, "newcomer")
        if c.connect(timeout=PROMPT) == 0:
            newcomer.append(c)
            return True
        c.close()
        return False

    wait_until(served, 10, "a WebSocket client served once a slot is free")
    assert newcomer[0].publish_result("local/ws-limit/newcomer", b"served") == 0
    # the limit still holds, the newcomer counted
    again = ws_device(ws_port, clients, protocol, "again")
    assert again.connect(timeout=PROMPT) == code
    assert hub.alive()


# --------------------------------------------------------------------------
# 3. a WebSocket message over the limit
# --------------------------------------------------------------------------

MAX_MESSAGE_BYTES = 4096
MESSAGE_SLACK = 64 * 1024  # websocket.rs
WS_MESSAGE_LIMIT = MAX_MESSAGE_BYTES + MESSAGE_SLACK
PIECE = 3500  # payload of each PUBLISH: every MQTT packet is under max_message_bytes
TOO_LONG = r"session closed.*(message too long|space limit)"


def publishes(tag: str, count: int, first_id: int) -> tuple[bytes, list[bytes]]:
    """``count`` QoS 1 telemetry PUBLISHes back to back, and their payloads."""
    payloads = [f"{tag}-{i:03d}-".encode().ljust(PIECE, b".") for i in range(count)]
    data = b"".join(publish_packet(TELEMETRY, p, qos=1, packet_id=first_id + i) for i, p in enumerate(payloads))
    return data, payloads


@pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragments"])
def test_a_websocket_message_over_the_limit_closes_only_its_connection_and_is_logged_and_one_under_it_is_served(
    upstream, collector_factory, hub_factory, clients, fragmented
):
    collector = collector_factory(upstream)
    hub, ws_port = ws_hub(hub_factory, upstream, edge_id="edge-ws-big", max_message_bytes=MAX_MESSAGE_BYTES)
    other = ws_publisher(ws_port, clients)
    watcher = Subscriber(ws_port, transport="websockets")
    clients.append(watcher)
    watcher.connect().subscribe("local/ws-big/#", qos=1)

    big = RawWs(ws_port)
    clients.append(big)
    assert big.connect(f"big-{uuid.uuid4().hex[:6]}") == 0

    # just under the limit: one message of many packets, all served
    under, under_payloads = publishes("under", 18, 1)
    assert len(under) < WS_MESSAGE_LIMIT
    assert big.send_mqtt(under)
    acks = []
    for _ in under_payloads:
        p = big.read_packet(10)
        assert p is not None, f"the hub closed the connection on a message of {len(under)} bytes, under the limit"
        assert p[0] == PUBACK, f"expected PUBACK, got packet type {p[0]}"
        acks.append(struct.unpack("!H", p[2][:2])[0])
    assert acks == list(range(1, len(under_payloads) + 1))

    # over it: the same kind of packets, one more message's worth
    offset = log_size(hub)
    over, over_payloads = publishes("over", 21, 100)
    assert len(over) > WS_MESSAGE_LIMIT
    if fragmented:
        third = len(over) // 3 + 1
        parts = [over[i:i + third] for i in range(0, len(over), third)]
        assert all(len(p) < WS_MESSAGE_LIMIT for p in parts)
        frames = [ws_frame(OP_BINARY if i == 0 else OP_CONT, p, fin=i == len(parts) - 1) for i, p in enumerate(parts)]
    else:
        frames = [ws_frame(OP_BINARY, over)]
    for f in frames:
        if not big.send(f):
            break  # the hub closed it already, on the frame's header
    try:
        after = big.read_until_closed(10)
    except WaitTimeout:
        raise AssertionError(f"a WebSocket message of {len(over)} bytes (limit {WS_MESSAGE_LIMIT}) "
                             "did not close the connection within 10 s") from None
    assert not [p for p in after if p[0] == PUBACK], f"publishes of the oversized message acknowledged: {after}"
    wait_log(hub, offset, TOO_LONG, 10, "a log line for the oversized WebSocket message")

    # the other client is unaffected; the hub serves on and lost nothing
    sentinel = f"after the oversized message {uuid.uuid4().hex[:8]}".encode()
    assert other.publish_and_wait(TELEMETRY, sentinel, qos=1) == 0
    assert other.publish_and_wait("local/ws-big/check", b"still here", qos=1) == 0
    watcher.wait_topic("local/ws-big/check")
    got = collector.wait_distinct_payloads({*under_payloads, sentinel}, 20)
    assert not {p for _, p in got} & set(over_payloads), "part of the oversized message was forwarded"
    late = ws_publisher(ws_port, clients)
    assert late.publish_and_wait("local/ws-big/late", b"new client", qos=1) == 0
    assert hub.alive()


# --------------------------------------------------------------------------
# 4. a ping flood from a client that never reads
# --------------------------------------------------------------------------

PING = b"p" * 125  # the largest control frame payload: each owes a 127-byte pong
PINGS_PER_CHUNK = 8000  # ~1 MiB written at a time
FLOOD_PINGS = 1_000_000  # ~121 MiB of pongs owed, far past the bound below
FLOOD_PINGS_CAP = 3 * FLOOD_PINGS
FLOOD_SECS = 10.0
RSS_BOUND = 64 * 1024 * 1024
FLOOD_KEEPALIVE = 6  # seconds: MQTT has the hub close the connection 9 s after CONNECT
SERVED_DURING = 3
WILL_TOPIC = "local/ws-pings/will"


def test_a_ping_flood_from_a_client_that_never_reads_leaves_others_served_memory_bounded_and_is_dropped(
    upstream, collector_factory, hub_factory, clients
):
    collector = collector_factory(upstream)
    hub, ws_port = ws_hub(hub_factory, upstream, edge_id="edge-ws-pings")
    other = ws_publisher(ws_port, clients)
    watcher = Subscriber(ws_port, transport="websockets")
    clients.append(watcher)
    watcher.connect().subscribe("local/ws-pings/#", qos=1)

    # a small receive window: the pongs back up in the hub, not in our kernel
    flooder = RawWs(ws_port, rcvbuf=4096)
    clients.append(flooder)
    flooder.upgrade()
    assert flooder.send_mqtt(connect_packet(f"pinger-{uuid.uuid4().hex[:6]}", keepalive=FLOOD_KEEPALIVE,
                                            will=(WILL_TOPIC, b"the flooder is gone", 1)))
    p = flooder.read_packet()
    assert p is not None and p[0] == CONNACK and p[2][1] == 0, f"the flooder was not served: {p}"
    connected_at = time.monotonic()
    flooder_port = flooder.local_port
    assert hub_end_state(ws_port, flooder_port) == "01", "the flooding connection not found in /proc/net/tcp"
    before = rss(hub)
    offset = log_size(hub)

    chunk = ws_frame(OP_PING, PING) * PINGS_PER_CHUNK
    state = {"sent": 0, "served": 0, "peak": before, "end": None}
    done = threading.Event()

    def flood() -> None:
        try:
            flooder.sock.settimeout(5)
            stop_at = time.monotonic() + FLOOD_SECS
            while True:
                if state["sent"] >= FLOOD_PINGS and state["served"] >= SERVED_DURING:
                    state["end"] = "all sent"
                    return
                if state["sent"] >= FLOOD_PINGS_CAP or time.monotonic() > stop_at:
                    state["end"] = "cap reached"
                    return
                try:
                    flooder.sock.sendall(chunk)
                except socket.timeout:
                    state["end"] = "the hub stopped reading"
                    return
                except OSError as exc:
                    state["end"] = f"the hub closed the connection ({exc})"
                    return
                state["sent"] += PINGS_PER_CHUNK
                state["peak"] = max(state["peak"], rss(hub))
        finally:
            done.set()

    flooding = threading.Thread(target=flood, daemon=True, name="ws-ping-flood")
    flooding.start()
    delivered = []
    try:
        # the other client is served while the flood goes on
        for i in range(500):
            if done.is_set():
                break
            payload = f"during the ping flood {i}".encode()
            assert other.publish_and_wait(TELEMETRY, payload, qos=1, timeout=10) == 0, "refused during the flood"
            delivered.append(payload)
            if not done.is_set():
                state["served"] += 1
    finally:
        flooding.join(FLOOD_SECS + 15)
    assert not flooding.is_alive(), "the flood did not end"
    state["peak"] = max(state["peak"], rss(hub))
    summary = f"{state['sent']} pings sent in {time.monotonic() - connected_at:.1f}s, then {state['end']}"
    assert state["served"] >= 1, f"no publish of the other client was acknowledged during the flood ({summary})"

    # What follows is checked in full and reported together: each is a
    # separate way for the flood to cost the hub.
    problems = []
    grown = state["peak"] - before
    if grown >= RSS_BOUND:
        problems.append(f"the hub's resident memory grew by {grown / 2**20:.0f} MiB (bound {RSS_BOUND / 2**20:.0f}) "
                        f"during the flood ({summary}; {before / 2**20:.0f} MiB before)")

    # The pings are not MQTT packets: the keepalive runs out, and the hub
    # closes the connection (and publishes the will) though the flooder
    # reads nothing.
    bound = connected_at + FLOOD_KEEPALIVE * 1.5 + 10 - time.monotonic()
    try:
        wait_until(lambda: hub_end_state(ws_port, flooder_port) != "01", max(bound, 1.0),
                   "the hub to close the flooding connection", interval=0.1)
    except WaitTimeout:
        problems.append(f"the flooding connection was still established {time.monotonic() - connected_at:.0f}s "
                        f"after its CONNECT (keepalive {FLOOD_KEEPALIVE}s), the hub holding "
                        f"{(rss(hub) - before) / 2**20:.0f} MiB more than before the flood")

    # the flooder gives up (a reset): by then at the latest the session is over
    flooder.close()
    try:
        watcher.wait_topic(WILL_TOPIC, timeout=10)
    except WaitTimeout:
        problems.append("the flooder's will was not published, even once it reset its connection")
    panics = [line for line in log_since(hub, offset).splitlines() if "panicked" in line]
    if panics:
        problems.append(f"the hub panicked: {panics[:3]}")
    assert not problems, "a ping flood from a client that reads nothing:\n- " + "\n- ".join(problems)

    # the hub serves on and lost nothing it acknowledged
    after = f"after the ping flood {uuid.uuid4().hex[:8]}".encode()
    assert other.publish_and_wait(TELEMETRY, after, qos=1) == 0
    collector.wait_distinct_payloads({*delivered, after}, 30)
    assert hub.alive()
