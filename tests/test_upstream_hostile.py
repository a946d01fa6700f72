"""Hostile bytes from the cloud broker never crash the hub nor lose a stored
message, over an MQTT 3.1.1 and an MQTT 5 upstream connection.

The upstream here is ``FakeCloud``, a small broker written in this file (a
TCP server on 127.0.0.1, one thread per connection, every loop bounded in
count and time). Each connection reads the hub's CONNECT (its protocol level
byte says 3.1.1 or 5) and answers a valid CONNACK. On each of the first N
connections -- one per hostile case -- it answers the hub's SUBSCRIBE, waits
for the hub's first telemetry PUBLISH (so messages are in flight, never
acknowledged), then sends one hand-built hostile packet sequence and only
reads from then on. If the hub has not closed it after a short hold, it
acknowledges the telemetry it took on that connection and closes (a broker
that closed again and again with a message unacknowledged would be refusing
it, which the hub rightly dead-letters after three times). From
connection N+1 on it is an honest minimal broker (SUBACK granting QoS 1,
PUBACK to each QoS 1 PUBLISH, PINGRESP) that records every PUBLISH it gets.

A device publishes QoS 1 telemetry before the fake broker listens (queued),
while the hostile connections happen, and after the honest phase began; every
acknowledged message must reach the honest phase, first copies in publish
order, with the hub alive, reconnecting after each hostile connection, saying
so in its log, and never growing its memory to the 200 MB a hostile PUBLISH
declares (its peak RSS, VmHWM in /proc/<pid>/status, stays under 200 MiB).
The hub runs with its default dead-letter policy (three refusals of one
message in a row): hostile bytes from the broker are no refusal of the
message in flight, so every acknowledged message must still arrive.
"""

from __future__ import annotations

import json
import random
import re
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import (LOOPBACK, Publisher, WaitTimeout, decode_varint, encode_varint, first_occurrences, hub_env,
                     split_packet, wait_until)

EDGE = "edge-hostile"
DEVICE = "d1"
TELEMETRY = f"devices/{DEVICE}/messages/events/"
# A topic the hub subscribes to upstream: hostile PUBLISHes use it so they
# reach the code that handles what the cloud sends.
DESIRED = f"devices/{EDGE}/modules/$edgeHub/twin/desired"
BATCHES = (70, 65, 65)  # before the broker listens, during the hostile phase, after it
HUGE = 200 * 1024 * 1024  # the remaining length one hostile PUBLISH declares
RSS_LIMIT = 200 * 1024 * 1024
HOSTILE_HOLD = 1.5  # seconds a hostile connection stays open unless the hub closes it
FIRST_PUBLISH_WAIT = 0.5  # seconds a hostile connection waits for a telemetry PUBLISH
MAX_CONNECTIONS = 200
MAX_PACKETS_PER_CONNECTION = 50_000
LIFETIME = 300.0  # no thread of the fake broker runs longer than this


# --------------------------------------------------------------------------
# hand-built packets
# --------------------------------------------------------------------------


def s16(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def fixed(header: int, body: bytes) -> bytes:
    return bytes([header]) + encode_varint(len(body)) + body


def unused_packet_id(seen: set[int]) -> bytes:
    pid = 0xEAEA
    while pid in seen:
        pid -= 1
    return struct.pack("!H", pid)


@dataclass
class Hostile:
    name: str
    build: object  # (v5: bool, seen_packet_ids: set[int]) -> bytes
    stream_huge: bool = False  # after the bytes, stream the rest of a 200 MB body


def cases(v5: bool) -> list[Hostile]:
    props = b"\x00" if v5 else b""  # an empty property list (MQTT 5 only)
    topic = s16(DESIRED.encode())
    common = [
        Hostile("remaining length that never ends", lambda v5, seen: b"\x30\xff\xff\xff\xff\x7f" + b"x" * 16),
        Hostile("packet type 0", lambda v5, seen: b"\x00\x00"),
        # 15 is reserved in 3.1.1 and AUTH in 5: reason 0x18 (continue), then
        # a property length of 4 over bytes that are no properties.
        Hostile("packet type 15 with garbage",
                lambda v5, seen: fixed(0xF0, b"\x18\x04\xff\xfe\xfd\xfc") if v5 else b"\xf0\x00"),
        Hostile("PUBLISH whose topic length runs past the packet", lambda v5, seen: b"\x30\x04\x00\x50ab"),
        Hostile("PUBLISH with an invalid UTF-8 topic",
                lambda v5, seen: fixed(0x30, s16(b"devices/\xc3\x28/\xff\xfe") + props + b"{}")),
        Hostile("PUBLISH with QoS 3", lambda v5, seen: fixed(0x36, topic + b"\x00\x07" + props + b"{}")),
        Hostile("PUBACK for a packet id never used",
                lambda v5, seen: fixed(0x40, unused_packet_id(seen) + (b"\x00" if v5 else b""))),
        Hostile("SUBACK for a packet id never used",
                lambda v5, seen: fixed(0x90, unused_packet_id(seen) + props + b"\x01")),
        Hostile("PUBLISH declaring a 200 MB remaining length",
                lambda v5, seen: b"\x30" + encode_varint(HUGE) + topic + props, stream_huge=True),
        Hostile("random bytes", lambda v5, seen: random.Random(0x5EED).randbytes(4096)),
    ]
    if not v5:
        return common
    return common + [
        # property 0xFF does not exist
        Hostile("PUBLISH with property id 0xFF", lambda v5, seen: fixed(0x30, topic + b"\x02\xff\x00" + b"{}")),
        # Topic Alias (0x23) 0 is a protocol error
        Hostile("PUBLISH with topic alias 0", lambda v5, seen: fixed(0x30, topic + b"\x03\x23\x00\x00" + b"{}")),
        # reason 0x8E (session taken over), then 5 bytes that are no properties
        Hostile("DISCONNECT 0x8E with garbage properties",
                lambda v5, seen: fixed(0xE0, b"\x8e\x05\xff\x01\x02\x03\x04")),
    ]


# --------------------------------------------------------------------------
# the fake cloud broker
# --------------------------------------------------------------------------


class PeerClosed(Exception):
    pass


class Reader:
    """Reads whole MQTT packets from a socket with short timeouts."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def packet(self, deadline: float):
        """(header byte, body), None when ``deadline`` passed; raises
        PeerClosed when the peer closed or reset the connection."""
        while True:
            got = split_packet(self.buf)
            if got is not None:
                header, body, self.buf = got
                return header, body
            if time.monotonic() >= deadline:
                return None
            self.sock.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as exc:
                raise PeerClosed(repr(exc)) from None
            if not data:
                raise PeerClosed("EOF")
            self.buf += data


def read_varint(data: bytes, i: int) -> tuple[int, int]:
    got = decode_varint(data, i)
    assert got is not None, f"the hub sent a truncated variable byte integer: {data!r}"
    return got


@dataclass
class Conn:
    index: int
    case: str  # the hostile case, or "honest"
    level: int | None = None
    unacked_telemetry: int = 0  # telemetry PUBLISHes the hub sent into a hostile connection
    hostile_sent: bool = False
    hub_closed: str | None = None  # how the hub ended the connection, if it did
    closed_after: float | None = None  # seconds from the hostile bytes to the end
    huge_bytes_sent: int = 0
    error: str | None = None
    # QoS 1 telemetry taken on a hostile connection the hub kept: (packet id, topic, payload)
    held: list = field(default_factory=list)


class FakeCloud:
    """A fake upstream broker: hostile on its first len(cases) connections,
    honest after. The port is bound at once but only listens on start(), so
    the hub's connections are refused until then."""

    def __init__(self, hostile: list[Hostile], v5: bool, hub_pid=None):
        self.hostile = hostile
        self.v5 = v5
        self.hub_pid = hub_pid  # a callable giving the hub's pid, for the memory samples
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind((LOOPBACK, 0))
        self.port = self.server.getsockname()[1]
        self.url = f"mqtt://{LOOPBACK}:{self.port}"
        self.lock = threading.Lock()
        self.conns: list[Conn] = []
        self.received: list[tuple[str, bytes]] = []  # honest phase, in arrival order
        self.rss_samples: list[tuple[str, int]] = []
        self.closed = False
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.born = time.monotonic()

    # api --------------------------------------------------------------
    def start(self) -> "FakeCloud":
        self.server.listen(16)
        self.server.settimeout(0.2)
        t = threading.Thread(target=self._accept, daemon=True, name=f"fake-cloud-{self.port}")
        t.start()
        self.threads.append(t)
        return self

    def snapshot(self) -> tuple[list[Conn], list[tuple[str, bytes]]]:
        with self.lock:
            return list(self.conns), list(self.received)

    def honest_connections(self) -> int:
        with self.lock:
            return sum(1 for c in self.conns if c.case == "honest")

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.received if t == TELEMETRY]

    def close(self) -> None:
        self.closed = True
        try:
            self.server.close()
        except OSError:
            pass
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        for t in self.threads:
            t.join(timeout=5)

    # internals --------------------------------------------------------
    def _expired(self) -> bool:
        return self.closed or time.monotonic() - self.born > LIFETIME

    def _accept(self) -> None:
        for index in range(MAX_CONNECTIONS):
            sock = None
            while sock is None:
                if self._expired():
                    return
                try:
                    sock, _ = self.server.accept()
                except socket.timeout:
                    continue
                except OSError:
                    return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(index, self.hostile[index].name if index < len(self.hostile) else "honest")
            with self.lock:
                self.conns.append(conn)
                self.socks.append(sock)
            t = threading.Thread(target=self._serve, args=(sock, conn), daemon=True,
                                 name=f"fake-cloud-{self.port}-{index}")
            t.start()
            self.threads.append(t)

    def _serve(self, sock: socket.socket, conn: Conn) -> None:
        try:
            self._session(sock, conn)
        except PeerClosed as exc:
            conn.hub_closed = conn.hub_closed or str(exc)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            conn.error = repr(exc)
        finally:
            try:
                sock.close()
            except OSError:
                pass
            if conn.case != "honest":
                self._sample_rss(f"after: {conn.case}")

    def _session(self, sock: socket.socket, conn: Conn) -> None:
        reader = Reader(sock)
        first = reader.packet(time.monotonic() + 10)
        if first is None:
            raise AssertionError("no CONNECT from the hub within 10 s")
        header, body = first
        if header >> 4 != 1:
            raise AssertionError(f"first packet is type {header >> 4}, not CONNECT")
        proto_len = struct.unpack("!H", body[:2])[0]
        conn.level = body[2 + proto_len]
        sock.sendall(b"\x20\x03\x00\x00\x00" if conn.level == 5 else b"\x20\x02\x00\x00")

        hostile = self.hostile[conn.index] if conn.case != "honest" else None
        seen_ids: set[int] = set()
        trigger = time.monotonic() + FIRST_PUBLISH_WAIT
        hostile_at = None
        for _ in range(MAX_PACKETS_PER_CONNECTION):
            if self._expired():
                return
            now = time.monotonic()
            if hostile is not None and not conn.hostile_sent and (now >= trigger or conn.unacked_telemetry):
                self._send_hostile(sock, conn, hostile, seen_ids)
                hostile_at = time.monotonic()
            if hostile_at is not None and time.monotonic() - hostile_at >= HOSTILE_HOLD:
                # The hub took the bytes without closing: we close, as a
                # broker going away would, but first take what the hub sent
                # (a broker closing again and again after the same message
                # is refusing it, and the hub rightly dead-letters that).
                self._take_and_close(sock, reader, conn)
                return
            if hostile is None:
                deadline = now + 0.2
            elif hostile_at is None:
                deadline = min(trigger, now + 0.2)
            else:
                deadline = min(hostile_at + HOSTILE_HOLD, now + 0.2)
            try:
                pkt = reader.packet(deadline)
            except PeerClosed:
                if hostile_at is not None:
                    conn.closed_after = time.monotonic() - hostile_at
                raise
            if pkt is None:
                continue
            self._handle(sock, conn, pkt, seen_ids, answer=not conn.hostile_sent)

    def _take_and_close(self, sock: socket.socket, reader: "Reader", conn: Conn) -> None:
        """Reads what the hub still sends for a moment, then acknowledges
        every telemetry PUBLISH of this connection (they count as received)."""
        end = time.monotonic() + 0.2
        for _ in range(MAX_PACKETS_PER_CONNECTION):
            try:
                pkt = reader.packet(end)
            except PeerClosed:
                break
            if pkt is None:
                break
            self._handle(sock, conn, pkt, set(), answer=False)
        with self.lock:
            taken, conn.held = conn.held, []
            self.received.extend((topic, payload) for _, topic, payload in taken)
        for pid, _, _ in taken:
            sock.sendall((b"\x40\x03" + pid + b"\x00") if self.v5 else (b"\x40\x02" + pid))

    def _send_hostile(self, sock: socket.socket, conn: Conn, hostile: Hostile, seen_ids: set[int]) -> None:
        conn.hostile_sent = True
        try:
            sock.sendall(hostile.build(self.v5, seen_ids))
            if hostile.stream_huge:
                self._stream_huge(sock, conn)
        except OSError as exc:
            raise PeerClosed(f"while sending the hostile bytes: {exc!r}") from None

    def _stream_huge(self, sock: socket.socket, conn: Conn) -> None:
        """Sends the declared 200 MB body 1 MiB at a time (at most 15 s), as
        long as the hub reads it, sampling the hub's memory as it goes."""
        chunk = b"\x00" * (1024 * 1024)
        sock.settimeout(2.0)
        deadline = time.monotonic() + 15
        try:
            while conn.huge_bytes_sent + len(chunk) < HUGE - 64 and time.monotonic() < deadline and not self.closed:
                sock.sendall(chunk)
                conn.huge_bytes_sent += len(chunk)
                if conn.huge_bytes_sent % (16 * len(chunk)) == 0:
                    self._sample_rss(f"{conn.huge_bytes_sent >> 20} MiB of the 200 MB body sent")
        except socket.timeout:
            pass  # the hub stopped reading without closing: the hold then ends it
        self._sample_rss(f"{conn.huge_bytes_sent >> 20} MiB of the 200 MB body sent (end)")

    def _sample_rss(self, label: str) -> None:
        if self.hub_pid is None:
            return
        try:
            rss = proc_status_kib(self.hub_pid(), "VmRSS") * 1024
        except (OSError, KeyError):
            return
        with self.lock:
            self.rss_samples.append((label, rss))

    def _handle(self, sock: socket.socket, conn: Conn, pkt, seen_ids: set[int], answer: bool) -> None:
        header, body = pkt
        ptype = header >> 4
        if ptype == 3:  # PUBLISH
            qos = (header >> 1) & 3
            tlen = struct.unpack("!H", body[:2])[0]
            topic = body[2:2 + tlen].decode("utf-8", "replace")
            i = 2 + tlen
            pid = None
            if qos:
                pid = body[i:i + 2]
                seen_ids.add(struct.unpack("!H", pid)[0])
                i += 2
            if self.v5:
                plen, i = read_varint(body, i)
                i += plen
            payload = bytes(body[i:])
            if conn.case != "honest":
                if topic == TELEMETRY:
                    conn.unacked_telemetry += 1
                    if qos == 1:
                        conn.held.append((pid, topic, payload))
                return  # a hostile connection acknowledges nothing (until it closes)
            with self.lock:
                self.received.append((topic, payload))
            if qos == 1:
                sock.sendall((b"\x40\x03" + pid + b"\x00") if self.v5 else (b"\x40\x02" + pid))
            elif qos == 2:
                sock.sendall(b"\x50\x02" + pid)
        elif ptype == 6 and answer:  # PUBREL
            sock.sendall(b"\x70\x02" + body[:2])
        elif ptype == 8 and answer:  # SUBSCRIBE: grant QoS 1 to every filter
            pid, i = body[:2], 2
            seen_ids.add(struct.unpack("!H", pid)[0])
            if self.v5:
                plen, i = read_varint(body, i)
                i += plen
            granted = 0
            while i < len(body):
                i += 2 + struct.unpack("!H", body[i:i + 2])[0] + 1
                granted += 1
            sock.sendall(fixed(0x90, pid + (b"\x00" if self.v5 else b"") + b"\x01" * granted))
        elif ptype == 10 and answer:  # UNSUBSCRIBE
            pid = body[:2]
            if self.v5:
                plen, i = read_varint(body, 2)
                count, i = 0, i + plen
                while i < len(body):
                    i += 2 + struct.unpack("!H", body[i:i + 2])[0]
                    count += 1
                sock.sendall(fixed(0xB0, pid + b"\x00" + b"\x00" * count))
            else:
                sock.sendall(b"\xb0\x02" + pid)
        elif ptype == 12 and answer:  # PINGREQ
            sock.sendall(b"\xd0\x00")
        elif ptype == 14:  # DISCONNECT
            raise PeerClosed("DISCONNECT")


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@pytest.fixture
def fake_cloud_factory():
    made: list[FakeCloud] = []

    def make(hostile: list[Hostile], v5: bool, hub_pid=None) -> FakeCloud:
        cloud = FakeCloud(hostile, v5, hub_pid)
        made.append(cloud)
        return cloud

    yield make
    for cloud in made:
        cloud.close()


# --------------------------------------------------------------------------
# the test
# --------------------------------------------------------------------------


def dead_letters(hub) -> list[dict]:
    r = subprocess.run(
        [hub.binary, "queue", "dead-letters", "list", "--json", "--storage", str(hub.storage)],
        capture_output=True, timeout=30, env=hub_env(),
    )
    assert r.returncode == 0, f"dead-letters list exited {r.returncode}: {r.stderr.decode()}"
    return [json.loads(line) for line in r.stdout.decode().splitlines() if line.strip()]


def publish_batch(pub: Publisher, payloads: list[bytes], done_before: int) -> None:
    for p in payloads:
        pub.publish(TELEMETRY, p, qos=1, key=p)
    pub.wait_results(done_before + len(payloads), timeout=30)
    with pub.lock:
        refused = {k: rc for k, rc in pub.results.items() if rc >= 0x80}
    assert not refused, f"the hub refused messages from the device: {refused}"


@pytest.mark.parametrize("version", ["3.1.1", "5"], ids=["mqtt311", "mqtt5"])
def test_hostile_bytes_from_the_upstream_never_crash_the_hub_nor_lose_a_stored_message(
    version, hub_factory, fake_cloud_factory, clients
):
    v5 = version == "5"
    hostile = cases(v5)
    n = len(hostile)
    box: dict = {}
    cloud = fake_cloud_factory(hostile, v5, hub_pid=lambda: box["hub"].proc.pid)
    hub = hub_factory(
        cloud.url, edge_id=EDGE,
        extra_args=["--upstream-mqtt-version", version, "--upstream-max-backoff-ms", "200",
                    "--upstream-keep-alive-secs", "5"],
    )
    box["hub"] = hub
    pid = hub.proc.pid
    pub = Publisher(hub.port, client_id=DEVICE, inflight=100)
    clients.append(pub.connect())

    payloads = [f"hostile-{version} seq={i}".encode() for i in range(sum(BATCHES))]
    a, b, _ = BATCHES
    # Queued while the broker refuses connections: the hostile connections
    # get them in flight.
    publish_batch(pub, payloads[:a], 0)
    cloud.start()
    publish_batch(pub, payloads[a:a + b], a)  # while the hostile connections happen
    wait_until(lambda: cloud.honest_connections() >= 1 or not hub.alive(), 90,
               f"the hub to come back after {n} hostile connections")
    assert hub.alive(), f"the hub exited with {hub.proc.returncode} during the hostile connections"
    publish_batch(pub, payloads[a + b:], a + b)  # once the broker is honest

    with pub.lock:
        acked = list(pub.acked)
    assert len(acked) == len(payloads) and set(acked) == set(payloads)

    def settled():
        if set(acked) <= set(cloud.payloads()) or not hub.alive():
            return True
        # Fail fast when nothing is left to send but messages were set aside.
        m = hub.metrics()
        return m.get("edgehub_queue_depth", 1) == 0 and m.get("edgehub_dead_letters_total", 0) > 0

    try:
        wait_until(settled, 90, "every acknowledged message at the honest broker")
    except WaitTimeout as exc:
        timed_out = str(exc)
    else:
        timed_out = None
    conns, received = cloud.snapshot()
    summary = "\n".join(
        f"  #{c.index} {c.case}: level={c.level} unacked_telemetry={c.unacked_telemetry} "
        f"hub_closed={c.hub_closed} after={c.closed_after and round(c.closed_after, 3)} "
        f"huge_sent={c.huge_bytes_sent} error={c.error}"
        for c in conns
    )
    print(f"fake cloud connections ({len(conns)}):\n{summary}\nrss samples: {cloud.rss_samples}")

    # The hub never died (it is the process started, still running) and never panicked.
    assert hub.alive(), f"the hub exited with {hub.proc.returncode}"
    assert hub.proc.pid == pid
    log = hub.log_path.read_text(errors="replace")
    assert "panicked" not in log

    # Every connection spoke the version asked for; each hostile case had
    # its own connection, and the hub came back after each one.
    assert [c.level for c in conns] == [5 if v5 else 4] * len(conns)
    assert len(conns) >= n + 1, f"only {len(conns)} connections for {n} hostile cases"
    assert [c.case for c in conns[:n]] == [h.name for h in hostile]
    assert all(c.hostile_sent for c in conns[:n]), [c.case for c in conns[:n] if not c.hostile_sent]
    assert all(c.error is None for c in conns), [(c.case, c.error) for c in conns if c.error]
    # The resend path was exercised: telemetry was in flight when the
    # hostile bytes came.
    assert sum(c.unacked_telemetry for c in conns[:n]) > 0
    assert hub.metric("edgehub_upstream_reconnects_total") >= n

    # The hub said so: a warning per lost connection, and one naming the bad
    # packet for each hostile connection it closed itself.
    lost = re.findall(r"WARN edgehub::upstream::link: upstream connection lost .*", log)
    bad = [ln for ln in lost if "error=upstream sent a bad packet: " in ln]
    closed_by_hub = [c.case for c in conns[:n] if c.hub_closed]
    assert len(lost) >= n, f"{len(lost)} 'upstream connection lost' warnings for {n} hostile connections"
    assert len(bad) >= len(closed_by_hub), (closed_by_hub, bad)

    # It never took the 200 MB the hostile PUBLISH declared.
    peak = proc_status_kib(pid, "VmHWM") * 1024
    assert peak < RSS_LIMIT, f"the hub's peak RSS reached {peak >> 20} MiB; samples {cloud.rss_samples}"
    for label, rss in cloud.rss_samples:
        assert rss < RSS_LIMIT, f"RSS {rss >> 20} MiB at {label}"

    # Nothing acknowledged is lost; first copies in publish order.
    got = [p for t, p in received if t == TELEMETRY]
    missing = [p for p in payloads if p not in set(got)]
    assert not missing, (
        f"{len(missing)} acknowledged messages never reached the honest broker ({timed_out or 'queue empty'}): "
        f"{missing}; dead letters: {dead_letters(hub)}; hub log:\n"
        + "\n".join(ln for ln in log.splitlines() if "dead-letter" in ln or "connection lost" in ln)
    )
    assert first_occurrences(p for p in got if p in set(payloads)) == payloads
