"""Shared helpers for the edgehub end-to-end tests.

Everything here that waits does so on a condition with a deadline; nothing
uses a bare sleep as synchronisation.  Polling loops (``wait_until``) sleep a
few milliseconds between checks of a real condition, always bounded by a
deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Iterable

import paho.mqtt.client as mqtt

LOOPBACK = "127.0.0.1"

# Environment variables the hub reads; tests start the hub without them unless
# a test sets them on purpose.
HUB_ENV_VARS = (
    "storageFolder", "UpstreamProtocol", "timeToLiveSecs",
    "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY",
)


def hub_env(**extra: str) -> dict[str, str]:
    """The test runner's environment without any variable the hub reads."""
    env = {
        k: v for k, v in os.environ.items() if k not in HUB_ENV_VARS and not k.startswith("EDGEHUB_")
    }
    env.update(extra)
    return env


# --------------------------------------------------------------------------
# generic waiting
# --------------------------------------------------------------------------


class WaitTimeout(AssertionError):
    pass


def wait_until(pred: Callable[[], object], timeout: float, desc: str, interval: float = 0.02):
    """Poll ``pred`` until it returns a truthy value or ``timeout`` elapses."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - remembered for the message
            last_exc = exc
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {desc}{extra}")
        time.sleep(interval)


def wait_value(get: Callable[[], object], pred: Callable[[object], object], timeout: float, desc: str,
               interval: float = 0.1, shown: str = "the last value"):
    """Reads ``get()`` until ``pred`` holds for it and returns it; on timeout
    the message shows the last value read (as ``shown``)."""
    box: dict = {}

    def check():
        box["v"] = get()
        return pred(box["v"])

    try:
        wait_until(check, timeout, desc, interval=interval)
    except WaitTimeout as exc:
        raise WaitTimeout(f"{exc}; {shown}: {box.get('v')!r}") from None
    return box["v"]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never one this test run has handed out before.

    The kernel may offer a port it has just offered again once the probing
    socket is closed; two calls in a row (a hub's listener and its metrics
    port) then got the same port and the hub failed with "address in use".
    """
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no loopback port left that this run has not handed out already")


def port_accepts(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path, max_bytes: int = 20000) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    if len(data) > max_bytes:
        data = b"...<truncated>...\n" + data[-max_bytes:]
    return data.decode("utf-8", "replace")


# --------------------------------------------------------------------------
# upstream broker (mosquitto)
# --------------------------------------------------------------------------


class Upstream:
    """A Mosquitto broker on a fixed loopback port that can be stopped and
    restarted on the same port, keeping its persistent sessions (it is always
    stopped with SIGTERM, which makes mosquitto write its persistence file)."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: Iterable[str] = ()):
        self.port = port or free_port()
        self.dir = Path(workdir) / f"mosquitto-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"
        lines = [
            f"listener {self.port} {LOOPBACK}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.data_dir}/",
            # never drop QoS 1 messages queued for a persistent session
            "max_queued_messages 0",
            "max_queued_bytes 0",
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.append("user root")
        lines += list(extra_conf)
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"mqtt://{LOOPBACK}:{self.port}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        assert not self.running(), "upstream already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== mosquitto start #{self.starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                ["mosquitto", "-c", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"mosquitto exited with {self.proc.returncode} on start:\n{tail(self.log_path)}"
                )
            if port_accepts(self.port):
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"mosquitto did not listen on {self.port}:\n{tail(self.log_path)}")
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop (SIGTERM): mosquitto saves its persistence file."""
        if not self.running():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError("mosquitto did not stop on SIGTERM")
        # wait until the port is really closed
        wait_until(lambda: not port_accepts(self.port), 10, "upstream port to close")

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        if self.running():
            self.proc.kill()
            self.proc.wait(timeout=10)


# --------------------------------------------------------------------------
# collector on the upstream broker
# --------------------------------------------------------------------------

TELEMETRY_FILTERS = (
    "devices/+/messages/events/#",
    "devices/+/modules/+/messages/events/#",
)


class Collector:
    """Subscribes on the upstream broker with QoS 1 and a persistent session
    (clean_session=False, fixed client id) and records (topic, payload) in
    arrival order.  Reconnects by itself when the broker restarts."""

    def __init__(self, upstream: Upstream, filters: Iterable[str] = TELEMETRY_FILTERS, client_id: str | None = None):
        self.upstream = upstream
        self.filters = list(filters)
        self.client_id = client_id or f"collector-{uuid.uuid4().hex[:10]}"
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.subscribed = threading.Event()
        self.connects = 0
        self.session_lost = False  # a reconnect found no session on the broker
        self._pending_sub_mid = None
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        c.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self.client = c

    # callbacks --------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            return
        self.connects += 1
        if self.connects > 1 and not flags.session_present:
            # The broker lost our session: messages may have been lost there.
            self.session_lost = True
        if not flags.session_present:
            result, mid = client.subscribe([(f, 1) for f in self.filters])
            self._pending_sub_mid = mid

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        if mid == self._pending_sub_mid:
            for rc in reason_codes:
                assert not rc.is_failure, f"collector subscribe refused: {rc}"
            self.subscribed.set()

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.cond.notify_all()

    # api --------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> "Collector":
        self.client.connect(LOOPBACK, self.upstream.port, keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            raise AssertionError("collector did not subscribe on the upstream broker")
        return self

    def close(self) -> None:
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001
            pass
        self.client.loop_stop()

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self.cond:
            return list(self.messages)

    def count(self) -> int:
        with self.cond:
            return len(self.messages)

    def wait_for(self, pred: Callable[[list[tuple[str, bytes]]], bool], timeout: float, desc: str):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(
                        f"timed out after {timeout:.1f}s waiting for {desc}; "
                        f"collector has {len(self.messages)} messages"
                        f"{' (its session was lost on the upstream broker!)' if self.session_lost else ''}"
                    )
                self.cond.wait(min(remaining, 0.5))
            return list(self.messages)

    def wait_count(self, n: int, timeout: float) -> list[tuple[str, bytes]]:
        return self.wait_for(lambda m: len(m) >= n, timeout, f"{n} messages upstream")

    def wait_distinct_payloads(self, payloads: set[bytes], timeout: float) -> list[tuple[str, bytes]]:
        """Wait until every payload in ``payloads`` has arrived at least once."""
        state = {"seen": set(), "idx": 0}
        want = set(payloads)

        def pred(msgs):
            seen = state["seen"]
            for _, p in msgs[state["idx"]:]:
                if p in want:
                    seen.add(p)
            state["idx"] = len(msgs)
            return len(seen) >= len(want)

        return self.wait_for(pred, timeout, f"{len(want)} distinct payloads upstream (have {len(state['seen'])})")

    def wait_payload(self, payload: bytes, timeout: float) -> list[tuple[str, bytes]]:
        # Looks only at what arrived since the last wake-up: a scan of every
        # message at each of 20,000 arrivals took 25 s.
        return self.wait_distinct_payloads({payload}, timeout)


def first_occurrences(values: Iterable) -> list:
    seen = set()
    out = []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def assert_strictly_increasing(seq: list[int], what: str) -> None:
    for i in range(1, len(seq)):
        if seq[i] <= seq[i - 1]:
            window = seq[max(0, i - 5): i + 5]
            raise AssertionError(
                f"{what}: order broken at index {i}: {seq[i - 1]} followed by {seq[i]} (around: {window})"
            )


# --------------------------------------------------------------------------
# the hub process
# --------------------------------------------------------------------------


class Hub:
    """An ``edgehub run`` process.  stderr (and stdout) go to a log file that
    the test report prints when a test fails."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        storage: Path | None = None,
        upstream: str | None = None,
        *,
        port: int | None = None,
        metrics_port: int | None = None,
        metrics: bool = True,
        edge_id: str | None = None,
        ttl_secs: int | None = None,
        max_queue_bytes: int | None = None,
        max_message_bytes: int | None = None,
        forward_topics: Iterable[str] = (),
        extra_args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        use_storage_arg: bool = True,
        name: str = "hub",
    ):
        self.binary = binary
        self.workdir = Path(workdir)
        self.name = name
        self.port = port or free_port()
        self.metrics_port = (metrics_port or free_port()) if metrics else None
        # Ports picked here may be taken by another process before the hub
        # binds them; a first start that finds one taken tries fresh ones.
        self._picked_ports = port is None and (metrics_port is None or not metrics)
        self.storage = Path(storage) if storage else self.workdir / f"{name}-storage"
        self.upstream = upstream
        self.log_path = self.workdir / f"{name}-{self.port}.stderr.log"
        args = [binary, "run", "--listen", f"{LOOPBACK}:{self.port}"]
        if use_storage_arg:
            args += ["--storage", str(self.storage)]
        if upstream:
            args += ["--upstream", upstream]
        if edge_id:
            args += ["--edge-id", edge_id]
        if ttl_secs is not None:
            args += ["--ttl-secs", str(ttl_secs)]
        if self.metrics_port:
            args += ["--metrics", f"{LOOPBACK}:{self.metrics_port}"]
        if max_queue_bytes is not None:
            args += ["--max-queue-bytes", str(max_queue_bytes)]
        if max_message_bytes is not None:
            args += ["--max-message-bytes", str(max_message_bytes)]
        for f in forward_topics:
            args += ["--forward-topic", f]
        args += list(extra_args)
        self.args = args
        base_env = hub_env()
        base_env.setdefault("RUST_BACKTRACE", "1")
        if env:
            base_env.update(env)
        self.env = base_env
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> "Hub":
        for attempt in range(3):
            try:
                return self._start(wait_ready, timeout)
            except AssertionError as e:
                taken = "Address already in use" in str(e)
                if not (taken and self._picked_ports and self.starts == attempt + 1 and attempt < 2):
                    raise
                self._repick_ports()
        raise AssertionError("unreachable")

    def _repick_ports(self) -> None:
        old = [f"{LOOPBACK}:{self.port}", f"{LOOPBACK}:{self.metrics_port}"]
        self.port = free_port()
        if self.metrics_port:
            self.metrics_port = free_port()
        new = [f"{LOOPBACK}:{self.port}", f"{LOOPBACK}:{self.metrics_port}"]
        self.args = [new[old.index(a)] if a in old else a for a in self.args]
        self.log_path = self.workdir / f"{self.name}-{self.port}.stderr.log"

    def _start(self, wait_ready: bool, timeout: float) -> "Hub":
        assert not self.alive(), "hub already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== edgehub start #{self.starts}: {' '.join(self.args)} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                cwd=self.workdir,
            )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"edgehub exited with code {self.proc.returncode} before listening:\n{tail(self.log_path)}"
                )
            if port_accepts(self.port):
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"edgehub did not listen on {self.port} within {timeout}s")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.alive(), "hub is not running"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int:
        if not self.alive():
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError("edgehub did not exit on SIGTERM")

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=10)

    # observability ----------------------------------------------------
    def metrics_text(self, timeout: float = 5.0) -> str:
        assert self.metrics_port, "hub started without --metrics"
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.metrics_port}/metrics", timeout=timeout) as r:
            assert r.status == 200, f"GET /metrics returned {r.status}"
            return r.read().decode("utf-8", "replace")

    def metrics(self) -> dict[str, float]:
        return parse_prometheus(self.metrics_text())

    def metric(self, name: str) -> float:
        m = self.metrics()
        if name not in m:
            raise AssertionError(f"metric {name} missing from /metrics; have {sorted(m)}")
        return m[name]

    def wait_metric(self, name: str, pred: Callable[[float], bool], timeout: float, desc: str,
                    interval: float = 0.05) -> float:
        box = {}

        def check():
            box["v"] = self.metric(name)
            return pred(box["v"])

        try:
            wait_until(check, timeout, f"{name} {desc}", interval=interval)
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}; last value {box.get('v')}") from None
        return box["v"]

    def queue_stats(self, as_json: bool = False) -> dict:
        return queue_stats(self.binary, self.storage, as_json=as_json)

    def wait_queue_stats(self, pred: Callable[[dict], bool], timeout: float, desc: str, as_json: bool = False) -> dict:
        """Polls `queue stats` (a running hub refreshes what it reports about
        once a second) until ``pred`` holds."""
        box = {}

        def check():
            box["s"] = self.queue_stats(as_json=as_json)
            return pred(box["s"])

        try:
            wait_until(check, timeout, f"queue stats {desc}", interval=0.1)
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}; last stats {box.get('s')}") from None
        return box["s"]

    def wait_queue_depth(self, depth: int, timeout: float = 10.0, as_json: bool = False) -> dict:
        return self.wait_queue_stats(lambda s: s["depth"] == depth, timeout, f"depth == {depth}", as_json=as_json)


def parse_prometheus(text: str) -> dict[str, float]:
    """name -> value; samples of one metric with labels are summed."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m:
            continue
        name, _labels, value = m.groups()
        try:
            v = float(value)
        except ValueError:
            continue
        out[name] = out.get(name, 0.0) + v
    return out


def queue_stats(binary: str, storage: Path, as_json: bool = False, timeout: float = 30.0) -> dict:
    args = [binary, "queue", "stats", "--storage", str(storage)]
    if as_json:
        args.append("--json")
    r = subprocess.run(args, capture_output=True, timeout=timeout, env=hub_env())
    out = r.stdout.decode("utf-8", "replace")
    assert r.returncode == 0, (
        f"`{' '.join(args)}` exited {r.returncode}\nstdout:\n{out}\nstderr:\n{r.stderr.decode('utf-8', 'replace')}"
    )
    if as_json:
        return json.loads(out.strip())
    stats: dict = {}
    for line in out.splitlines():
        m = re.match(r"^\s*(depth|oldest_age_secs|bytes):\s*(\S+)\s*$", line)
        if m:
            key, val = m.groups()
            stats[key] = float(val) if key == "oldest_age_secs" else int(val)
    for key in ("depth", "oldest_age_secs", "bytes"):
        assert key in stats, f"`queue stats` output lacks `{key}: ...`:\n{out}"
    return stats


# --------------------------------------------------------------------------
# paho clients
# --------------------------------------------------------------------------


def paho_client(client_id: str, protocol, transport: str = "tcp", ssl_context: ssl.SSLContext | None = None,
                **kwargs) -> mqtt.Client:
    """A paho 2.x client over ``transport`` ("tcp" or "websockets", paho's
    default path /mqtt and subprotocol mqtt), with TLS when ``ssl_context``
    is given."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, transport=transport,
                    **kwargs)
    if ssl_context is not None:
        c.tls_set_context(ssl_context)
    return c


class Publisher:
    """A paho client connected to the hub that records which publishes got
    their acknowledgement and with which reason code."""

    def __init__(self, port: int, protocol=mqtt.MQTTv311, client_id: str | None = None, inflight: int = 100,
                 clean: bool = True, will: tuple[str, bytes, int] | None = None, transport: str = "tcp",
                 ssl_context: ssl.SSLContext | None = None):
        self.port = port
        self.protocol = protocol
        self.client_id = client_id or f"pub-{uuid.uuid4().hex[:10]}"
        kwargs = {}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = clean
        self._clean = clean
        c = paho_client(self.client_id, protocol, transport, ssl_context, **kwargs)
        c.max_inflight_messages_set(inflight)
        c.max_queued_messages_set(0)
        if will:
            c.will_set(will[0], will[1], qos=will[2])
        self.lock = threading.Condition()
        self.mid_to_key: dict[int, object] = {}
        self.acked: list[object] = []  # keys in ack order
        self.results: dict[object, int] = {}  # key -> reason code value
        self._early: dict[int, int] = {}
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack_rc = None
        self.disconnect_rc = None
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        self.client = c

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack_rc = reason_code
        if not reason_code.is_failure:
            self.disconnected.clear()
            self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnect_rc = reason_code
        self.connected.clear()
        self.disconnected.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        # Called by paho with its own out-message lock held: never call into
        # paho while holding self.lock (lock order: paho -> self.lock).
        rc = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
        with self.lock:
            key = self.mid_to_key.pop(mid, None)
            if key is None:
                # the acknowledgement beat publish() returning its mid
                self._early[mid] = rc
                return
            self._record(key, rc)

    def _record(self, key, rc):
        self.results[key] = rc
        if rc < 0x80:
            self.acked.append(key)
        self.lock.notify_all()

    def connect(self, timeout: float = 10.0) -> "Publisher":
        if self.protocol == mqtt.MQTTv5:
            self.client.connect(LOOPBACK, self.port, keepalive=30, clean_start=self._clean)
        else:
            self.client.connect(LOOPBACK, self.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise AssertionError(f"client could not connect to the hub (connack {self.connack_rc})")
        return self

    def publish(self, topic: str, payload: bytes, qos: int = 1, key: object = None, retain: bool = False):
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            raise AssertionError(f"paho publish failed: {mqtt.error_string(info.rc)}")
        if qos > 0:
            key = key if key is not None else info.mid
            with self.lock:
                if info.mid in self._early:
                    self._record(key, self._early.pop(info.mid))
                else:
                    self.mid_to_key[info.mid] = key
        else:
            with self.lock:
                self._early.pop(info.mid, None)
        return info

    def wait_results(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.results) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(
                        f"timed out after {timeout}s waiting for {n} acknowledgements; got {len(self.results)}"
                    )
                self.lock.wait(min(remaining, 0.5))

    def publish_and_wait(self, topic: str, payload: bytes, qos: int = 1, key: object = None, timeout: float = 10.0) -> int:
        """Publish one message and wait for its acknowledgement; returns the
        reason code (0 for success)."""
        key = key if key is not None else object()
        self.publish(topic, payload, qos=qos, key=key)
        deadline = time.monotonic() + timeout
        with self.lock:
            while key not in self.results:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(f"no acknowledgement for publish on {topic!r} within {timeout}s")
                if self.disconnected.is_set():
                    raise AssertionError(f"connection closed before the acknowledgement (rc {self.disconnect_rc})")
                self.lock.wait(min(remaining, 0.2))
            return self.results[key]

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def close(self) -> None:
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001
            pass
        self.client.loop_stop()


class Subscriber:
    """A paho client connected to the hub that records what it receives."""

    def __init__(self, port: int, protocol=mqtt.MQTTv311, client_id: str | None = None, clean: bool = True,
                 transport: str = "tcp", ssl_context: ssl.SSLContext | None = None):
        self.port = port
        self.protocol = protocol
        self.client_id = client_id or f"sub-{uuid.uuid4().hex[:10]}"
        self._clean = clean
        kwargs = {}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = clean
        c = paho_client(self.client_id, protocol, transport, ssl_context, **kwargs)
        self.cond = threading.Condition()
        self.messages: list[mqtt.MQTTMessage] = []
        self.connected = threading.Event()
        self.session_present = None
        self.suback = {}
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            self.session_present = flags.session_present
            self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.suback[mid] = reason_codes
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def connect(self, timeout: float = 10.0) -> "Subscriber":
        if self.protocol == mqtt.MQTTv5:
            self.client.connect(LOOPBACK, self.port, keepalive=30, clean_start=self._clean)
        else:
            self.client.connect(LOOPBACK, self.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise AssertionError("subscriber could not connect to the hub")
        return self

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 10.0) -> int:
        result, mid = self.client.subscribe(topic_filter, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        deadline = time.monotonic() + timeout
        with self.cond:
            while mid not in self.suback:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(f"no SUBACK for {topic_filter!r}")
                self.cond.wait(remaining)
            for rc in self.suback[mid]:
                assert not rc.is_failure, f"subscription to {topic_filter!r} refused: {rc}"
            return self.suback[mid][0].value  # granted QoS

    def wait_for(self, pred: Callable[[list], bool], timeout: float, desc: str) -> list:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = [(m.topic, bytes(m.payload)) for m in self.messages]
                    raise WaitTimeout(f"timed out after {timeout}s waiting for {desc}; received {got}")
                self.cond.wait(min(remaining, 0.5))
            return list(self.messages)

    def wait_topic(self, topic: str, timeout: float = 10.0) -> mqtt.MQTTMessage:
        msgs = self.wait_for(lambda ms: any(m.topic == topic for m in ms), timeout, f"a message on {topic!r}")
        return next(m for m in msgs if m.topic == topic)

    def received(self) -> list[tuple[str, bytes]]:
        with self.cond:
            return [(m.topic, bytes(m.payload)) for m in self.messages]

    def close(self) -> None:
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001
            pass
        self.client.loop_stop()


# --------------------------------------------------------------------------
# raw MQTT packets (for bad input and precise protocol checks)
# --------------------------------------------------------------------------

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, DISCONNECT = 1, 2, 3, 4, 8, 9, 14


def decode_varint(data: bytes, i: int) -> tuple[int, int] | None:
    """The MQTT variable byte integer at ``data[i:]``: (value, the index
    after it); None when ``data`` ends first. Raises when it runs past four
    bytes (malformed)."""
    value, mult = 0, 1
    for _ in range(4):
        if i >= len(data):
            return None
        b = data[i]
        i += 1
        value += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            return value, i
    raise AssertionError(f"a malformed variable byte integer: {data[:8]!r}")


def split_packet(buf: bytes) -> tuple[int, bytes, bytes] | None:
    """(header byte, body, the rest) of the first whole MQTT packet in
    ``buf``; None when it has not all arrived yet."""
    got = decode_varint(buf, 1) if buf else None
    if got is None or len(buf) < got[1] + got[0]:
        return None
    length, i = got
    return buf[0], buf[i:i + length], buf[i + length:]


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        if n:
            byte |= 0x80
        out.append(byte)
        if not n:
            return bytes(out)


def mqtt_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + encode_varint(len(body)) + body


def connect_packet(client_id: str, level: int = 4, clean: bool = True, keepalive: int = 60,
                   will: tuple[str, bytes, int] | None = None, proto_name: str = "MQTT") -> bytes:
    flags = 0x02 if clean else 0
    if will:
        flags |= 0x04 | (will[2] << 3)
    var = mqtt_str(proto_name) + bytes([level, flags]) + struct.pack("!H", keepalive)
    if level == 5:
        var += b"\x00"  # no properties
    payload = mqtt_str(client_id)
    if will:
        if level == 5:
            payload += b"\x00"  # no will properties
        payload += mqtt_str(will[0]) + mqtt_str(will[1])
    return packet(CONNECT, 0, var + payload)


def publish_packet(topic: str, payload: bytes, qos: int = 0, packet_id: int = 1, v5: bool = False,
                   retain: bool = False) -> bytes:
    var = mqtt_str(topic)
    if qos:
        var += struct.pack("!H", packet_id)
    if v5:
        var += b"\x00"
    return packet(PUBLISH, (qos << 1) | (1 if retain else 0), var + payload)


class RawClient:
    """A bare TCP connection speaking hand-built MQTT packets."""

    def __init__(self, port: int, timeout: float = 10.0, rcvbuf: int | None = None):
        """``rcvbuf``: a receive buffer this small (set before connecting)."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((LOOPBACK, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.closed = False
        self.reset = False

    def send(self, data: bytes) -> bool:
        """Returns False if the peer had already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout("timed out reading from the hub")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise WaitTimeout("timed out reading from the hub") from None
        except ConnectionResetError:
            self.closed = True
            self.reset = True
            return False
        if not data:
            self.closed = True
            return False
        self.buf += data
        return True

    def read_packet(self, timeout: float = 10.0):
        """Returns (type, flags, body) or None if the connection closed."""
        deadline = time.monotonic() + timeout
        while True:
            got = split_packet(self.buf)
            if got is not None:
                header, body, self.buf = got
                return header >> 4, header & 0x0F, body
            if self.closed or not self._fill(deadline):
                return None

    def read_until_closed(self, timeout: float = 10.0) -> list:
        """Read packets until the hub closes the connection; returns them."""
        packets = []
        deadline = time.monotonic() + timeout
        while True:
            p = self.read_packet(max(0.001, deadline - time.monotonic()))
            if p is None:
                return packets
            packets.append(p)

    def connect(self, client_id: str | None = None, level: int = 4, **kw) -> tuple:
        self.send(connect_packet(client_id or f"raw-{uuid.uuid4().hex[:8]}", level=level, **kw))
        p = self.read_packet()
        assert p is not None, "hub closed the connection instead of sending CONNACK"
        assert p[0] == CONNACK, f"expected CONNACK, got packet type {p[0]}"
        return p

    def close(self, abort: bool = False) -> None:
        if abort:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        try:
            self.sock.close()
        except OSError:
            pass


class Relay:
    """A TCP relay on loopback in front of a port: the link between the hub
    and its upstream, which a test can cut (every connection closed, new
    ones refused at once) and restore, while both ends keep running."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind((LOOPBACK, 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.url = f"mqtt://{LOOPBACK}:{self.port}"
        self.lock = threading.Lock()
        self.open = True
        self.socks: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name=f"relay-{self.port}").start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                if not self.open:
                    client.close()
                    continue
                try:
                    upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=5)
                except OSError:
                    client.close()
                    continue
                self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            self.open = False
            for s in self.socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self.socks.clear()

    def restore(self) -> None:
        with self.lock:
            self.open = True

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.server.close()
