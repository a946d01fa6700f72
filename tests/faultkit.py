"""Pieces of the random fault loop (tests/test_fault_loop.py): a durable
subscriber on the upstream broker, devices that keep publishing across
faults, and reading what the subscriber recorded.

- ``DurableSink`` starts this file as a separate process (``sink_main``): a
  paho client on the upstream broker with a persistent session
  (clean_session off, a fixed client id, QoS 1) and ``manual_ack``.  Each
  message is appended to a file and fsynced *before* its PUBACK goes, so the
  harness cannot lose what the hub delivered: a message the broker counts
  as delivered is on disk.  It reconnects with the same client id when the
  broker restarts, and records each CONNACK's session-present flag.
- ``Device`` is one device: a thread publishing QoS 1 with a pipelined
  window (helpers.Publisher) at a bounded rate.  When its connection drops
  (the hub was killed) it drops that client, connects a new one with the
  same client id and goes on with the next sequence number; only publishes
  that got a PUBACK count as acknowledged.

What this module does not do: choose or inject faults, or decide what is
correct (the test does both).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from helpers import LOOPBACK, Publisher, WaitTimeout, tail, wait_until

TELEMETRY = "devices/+/messages/events/#"


def device_topic(device: str) -> str:
    # no '.' in it: NATS refuses MQTT topics holding one
    return f"devices/{device}/messages/events/fault=1"


def device_of(topic: str) -> str:
    return topic.split("/", 2)[1]


# --------------------------------------------------------------------------
# the durable subscriber (a separate process)
# --------------------------------------------------------------------------
#
# Its file, one record a line:
#   C <session_present 0|1>     a CONNACK accepted
#   S                           the subscription's SUBACK (first connect only)
#   M <topic> <payload hex> <dup 0|1>
#                               a message, written and fsynced before its PUBACK


def sink_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="durable QoS 1 subscriber for the fault loop")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--filter", default=TELEMETRY)
    args = ap.parse_args(argv)

    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(line: str) -> None:
        os.write(fd, line.encode() + b"\n")
        os.fsync(fd)

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            return
        record(f"C {1 if flags.session_present else 0}")
        if not flags.session_present:
            client.subscribe(args.filter, 1)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        if all(not rc.is_failure for rc in reason_codes):
            record("S")

    def on_message(client, userdata, msg):
        record(f"M {msg.topic} {bytes(msg.payload).hex()} {1 if msg.dup else 0}")
        # durable first, then acknowledged
        client.ack(msg.mid, msg.qos)

    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=args.client_id,
        clean_session=False,
        protocol=mqtt.MQTTv311,
        manual_ack=True,
    )
    c.reconnect_delay_set(min_delay=0.05, max_delay=0.5)
    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message

    def stop(signum, frame):
        c.disconnect()

    signal.signal(signal.SIGTERM, stop)
    # keepalive 60 s: a broker stopped (SIGSTOP) for a few seconds does not
    # make this client give up its connection
    c.connect(LOOPBACK, args.port, keepalive=60)
    c.loop_forever(retry_first_connection=True)
    os.close(fd)


class DurableSink:
    """The test's handle on the durable subscriber process and its file."""

    def __init__(self, workdir: Path, port: int, client_id: str = "fault-sink"):
        self.port = port
        self.client_id = client_id
        self.path = Path(workdir) / f"{client_id}.records"
        self.log_path = Path(workdir) / f"{client_id}.log"
        self.proc: subprocess.Popen | None = None
        self._offset = 0
        self._partial = b""
        self.records = 0  # message records read so far (duplicates included)
        self.seqs: dict[str, list[int]] = {}  # device -> sequence numbers in arrival order
        self.distinct: dict[str, set[int]] = {}
        # messages whose first copy here was a redelivery (DUP): the broker
        # had sent them before and they did not arrive
        self.first_redelivered: dict[str, set[int]] = {}
        self.max_seq: dict[str, int] = {}
        self.connacks: list[int] = []  # session-present flag of each connection
        self.subscribed = False

    def start(self, timeout: float = 15.0) -> "DurableSink":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--port", str(self.port), "--client-id", self.client_id,
                 "--out", str(self.path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=Path(__file__).resolve().parent,
            )

        def ready():
            assert self.proc.poll() is None, f"the durable subscriber exited:\n{tail(self.log_path)}"
            self.refresh()
            return self.subscribed

        wait_until(ready, timeout, "the durable subscriber's SUBACK on the upstream broker")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def refresh(self) -> None:
        """Reads the records written since the last call (whole lines only)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            kind, _, rest = line.decode().partition(" ")
            if kind == "M":
                topic, payload_hex, dup = rest.split(" ")
                device, seq = device_of(topic), int(bytes.fromhex(payload_hex))
                self.records += 1
                self.seqs.setdefault(device, []).append(seq)
                seen = self.distinct.setdefault(device, set())
                if seq not in seen and dup == "1":
                    self.first_redelivered.setdefault(device, set()).add(seq)
                seen.add(seq)
                if seq > self.max_seq.get(device, -1):
                    self.max_seq[device] = seq
            elif kind == "C":
                self.connacks.append(int(rest))
            elif kind == "S":
                self.subscribed = True

    def delivered_count(self) -> int:
        return sum(len(s) for s in self.distinct.values())

    def sessions_lost(self) -> int:
        """Reconnections that found no session on the broker (its queue for
        this subscriber was lost)."""
        return sum(1 for present in self.connacks[1:] if not present)

    def stop(self) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    close = stop


# --------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------


class Device(threading.Thread):
    """Publishes 0, 1, 2, ... (the payload is the sequence number) on its
    telemetry topic at QoS 1, at most ``rate`` a second and at most
    ``window`` unacknowledged, until stopped or ``max_count`` are published.
    A dropped connection is replaced by a new one (same client id, clean
    session) and the load goes on with the next number; what the old one
    had in flight without a PUBACK is not counted as acknowledged."""

    def __init__(self, name: str, port: int, rate: float, window: int = 100, max_count: int = 1_000_000):
        super().__init__(daemon=True, name=f"device-{name}")
        self.device = name
        self.port = port
        self.topic = device_topic(name)
        self.rate = rate
        self.window = window
        self.max_count = max_count
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.next_seq = 0
        self.acked: set[int] = set()  # from finished connections
        self.refused: dict[int, int] = {}
        self.connections = 0
        self.error: BaseException | None = None
        self._pub: Publisher | None = None

    def acked_count(self) -> int:
        with self.lock:
            pub = self._pub
            n = len(self.acked)
        return n + (pub.acked_count() if pub else 0)

    def _connect(self) -> Publisher | None:
        """A new connection, retried while the hub is down."""
        while not self.halt.is_set():
            pub = Publisher(self.port, client_id=f"fault-{self.device}", inflight=self.window)
            try:
                return pub.connect(timeout=10)
            except (OSError, AssertionError):
                pub.close()
                self.halt.wait(0.05)  # the hub is restarting: try again shortly
        return None

    def _retire(self, pub: Publisher) -> None:
        pub.client.loop_stop()  # before paho reconnects this client by itself
        try:
            pub.client.disconnect()
        except Exception:  # noqa: BLE001
            pass
        with pub.lock, self.lock:
            self.acked.update(pub.acked)
            self.refused.update({k: rc for k, rc in pub.results.items() if rc >= 0x80})
            self._pub = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def _run(self) -> None:
        start = time.monotonic()
        sent_at_start = 0
        while not self.halt.is_set() and self.next_seq < self.max_count:
            pub = self._connect()
            if pub is None:
                return
            with self.lock:
                self._pub = pub
                self.connections += 1
            first = self.next_seq
            while not self.halt.is_set() and self.next_seq < self.max_count:
                if pub.disconnected.is_set():
                    break
                with pub.lock:
                    # the pipelined window: at most `window` without a PUBACK
                    if self.next_seq - first - len(pub.results) >= self.window:
                        pub.lock.wait(0.05)
                        continue
                # the rate: the n-th message not before start + n / rate
                due = start + (self.next_seq - sent_at_start) / self.rate
                now = time.monotonic()
                if due > now:
                    if self.halt.wait(min(due - now, 0.05)):
                        break
                    continue
                if due < now - 1.0:
                    # far behind (the hub was down): no burst to catch up
                    start, sent_at_start = now, self.next_seq
                pub.publish(self.topic, str(self.next_seq).encode(), qos=1, key=self.next_seq)
                self.next_seq += 1
            self._retire(pub)

    def stop(self) -> None:
        self.halt.set()
        self.join(30)
        assert not self.is_alive(), f"device {self.device} did not stop"
        if self.error is not None:
            raise AssertionError(f"device {self.device} failed: {self.error!r}") from self.error


def wait_devices_acked(devices: list[Device], counts: list[int], more: int, timeout: float, desc: str) -> None:
    """Waits until every device has ``more`` acknowledgements beyond ``counts``."""
    try:
        wait_until(lambda: all(d.acked_count() >= c + more for d, c in zip(devices, counts)), timeout, desc,
                   interval=0.02)
    except WaitTimeout as exc:
        now = [d.acked_count() for d in devices]
        raise WaitTimeout(f"{exc}; acknowledged before {counts}, now {now}") from None


if __name__ == "__main__":
    sink_main(sys.argv[1:])
