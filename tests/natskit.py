"""A 3-node NATS JetStream cluster with MQTT listeners on loopback: a real
clustered upstream for the end-to-end tests.

Owns the nodes: their config files (``server_name``, ``jetstream {
store_dir }``, ``cluster { name, listen, routes }``, ``mqtt { listen }`` and a
monitoring port), their free loopback ports, their processes and logs (one
file per node in pytest's tmp dir, attached to a failed test's report and
quoted in natskit's own assertion messages), kill -9 and restart of one node
on the same ports and store, and the readiness probe: a QoS 1 publish through a
node's MQTT listener is acknowledged and received by a QoS 1 subscriber
(paho) on another node. JetStream has to elect its meta leader and make the
MQTT streams before a QoS 1 session works, so an open port is not readiness.

It does not own the hub, nor the collectors that check what arrived
(``helpers.Hub``, ``helpers.Collector``: a node has a ``port``, its MQTT
port, so a Collector can use it as its upstream).

The ``nats_cluster`` fixture gives a started, ready cluster, one per test
module; a test module imports it with the fixture it stands on
(``from natskit import _module_nats_cluster, nats_cluster``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from helpers import LOOPBACK, WaitTimeout, free_port, port_accepts, tail, wait_until

NATS_SERVER = os.environ.get("NATS_SERVER", "nats-server")
CLUSTER_NAME = "edgehub-test"


class NatsNode:
    """One ``nats-server`` of the cluster. ``port`` is its MQTT port."""

    def __init__(self, workdir: Path, name: str, ports: dict[str, int], route_ports: list[int]):
        self.name = name
        self.client_port = ports["client"]
        self.cluster_port = ports["cluster"]
        self.port = ports["mqtt"]
        self.http_port = ports["http"]
        self.dir = Path(workdir) / f"nats-{name}"
        self.store_dir = self.dir / "jetstream"
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "nats.conf"
        self.log_path = self.dir / "nats.log"
        routes = ", ".join(f"nats-route://{LOOPBACK}:{p}" for p in route_ports)
        self.conf.write_text(
            f"""server_name: {name}
listen: {LOOPBACK}:{self.client_port}
http: {LOOPBACK}:{self.http_port}
jetstream {{
  store_dir: "{self.store_dir}"
}}
cluster {{
  name: {CLUSTER_NAME}
  listen: {LOOPBACK}:{self.cluster_port}
  routes: [{routes}]
}}
mqtt {{
  listen: {LOOPBACK}:{self.port}
  # the MQTT streams (sessions, QoS 1 messages, retained messages) on all
  # three nodes; left alone, NATS uses as many nodes as it sees when it
  # makes them, which can be 2, and then one node down loses the quorum
  stream_replicas: 3
}}
"""
        )
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def __repr__(self) -> str:
        return f"<nats node {self.name} mqtt={self.port}>"

    @property
    def url(self) -> str:
        return f"mqtt://{LOOPBACK}:{self.port}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        """Starts the process and waits for its MQTT and monitoring ports
        (not for JetStream: see ``NatsCluster.wait_ready``)."""
        assert not self.running(), f"{self.name} already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== nats-server {self.name} start #{self.starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(self.conf)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while not (port_accepts(self.port) and port_accepts(self.http_port)):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"nats-server {self.name} exited with {self.proc.returncode}:\n{tail(self.log_path)}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"nats-server {self.name} did not listen within {timeout}s:\n{tail(self.log_path)}"
                )
            time.sleep(0.02)

    def kill9(self) -> None:
        assert self.running(), f"{self.name} is not running"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.running():
            self.proc.kill()
            self.proc.wait(timeout=10)

    # monitoring --------------------------------------------------------
    def connz(self) -> dict:
        url = f"http://{LOOPBACK}:{self.http_port}/connz?subs=1&limit=1024"
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())

    def health(self) -> str:
        """"ok" once JetStream has its meta leader and every stream and
        consumer on this node is current, else NATS's reason."""
        url = f"http://{LOOPBACK}:{self.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                doc = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            doc = json.loads(exc.read())
        return "ok" if doc.get("status") == "ok" else doc.get("error", str(doc))

    def js_request(self, subject: str, body: bytes = b"", timeout: float = 10.0) -> dict:
        """One JetStream API request over the node's NATS client port (the
        NATS protocol by hand: CONNECT, SUB to an inbox, PUB with it as the
        reply subject, the first MSG back)."""
        inbox = f"_INBOX.{uuid.uuid4().hex}"
        with socket.create_connection((LOOPBACK, self.client_port), timeout=timeout) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"INFO "), f"{self.name}: no INFO on the client port"
            s.sendall(
                b'CONNECT {"verbose":false,"pedantic":false}\r\n'
                + f"SUB {inbox} 1\r\nPUB {subject} {inbox} {len(body)}\r\n".encode()
                + body + b"\r\n"
            )
            while True:
                line = f.readline()
                assert line, f"{self.name} closed the connection before answering {subject}"
                if line.startswith(b"PING"):
                    s.sendall(b"PONG\r\n")
                elif line.startswith(b"-ERR"):
                    raise AssertionError(f"{self.name} refused {subject}: {line!r}")
                elif line.startswith(b"MSG "):
                    size = int(line.split()[-1])
                    return json.loads(f.read(size + 2)[:size])

    def mqtt_clients(self) -> dict[str, list[str]]:
        """MQTT client id -> the NATS subjects it subscribes to, for the
        clients connected to this node."""
        return {
            c["mqtt_client"]: c.get("subscriptions_list", [])
            for c in self.connz().get("connections", [])
            if c.get("mqtt_client")
        }


def _client(client_id: str) -> mqtt.Client:
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                       protocol=mqtt.MQTTv311)


def probe(via: NatsNode, to: NatsNode, timeout: float) -> None:
    """One attempt: a QoS 1 publish through ``via`` is acknowledged (PUBACK)
    and received by a QoS 1 subscriber on ``to``. Raises on failure."""
    topic = f"probe/{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + timeout
    events = {k: threading.Event() for k in ("sub_conn", "suback", "pub_conn", "puback", "msg")}
    refused: list[str] = []

    def on_connect(name):
        def cb(client, userdata, flags, reason_code, properties):
            if reason_code.is_failure:
                refused.append(f"{name} CONNACK {reason_code}")
            else:
                events[name].set()
        return cb

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        if any(rc.is_failure for rc in reason_codes):
            refused.append(f"SUBACK {reason_codes}")
        else:
            events["suback"].set()

    sub = _client(f"probe-sub-{uuid.uuid4().hex[:8]}")
    sub.on_connect = on_connect("sub_conn")
    sub.on_subscribe = on_subscribe
    sub.on_message = lambda c, u, m: m.topic == topic and events["msg"].set()
    pub = _client(f"probe-pub-{uuid.uuid4().hex[:8]}")
    pub.on_connect = on_connect("pub_conn")
    pub.on_publish = lambda c, u, mid, rc, p: events["puback"].set()

    def wait(name: str, what: str) -> None:
        while not events[name].wait(0.05):
            if refused:
                raise AssertionError(f"{what}: {refused}")
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"{what}: nothing within {timeout:.0f}s")

    try:
        sub.connect(LOOPBACK, to.port, keepalive=10)
        sub.loop_start()
        wait("sub_conn", f"subscriber's CONNACK from {to.name}")
        sub.subscribe(topic, 1)
        wait("suback", f"SUBACK from {to.name}")
        pub.connect(LOOPBACK, via.port, keepalive=10)
        pub.loop_start()
        wait("pub_conn", f"publisher's CONNACK from {via.name}")
        pub.publish(topic, b"ready?", qos=1)
        wait("puback", f"PUBACK from {via.name}")
        wait("msg", f"the probe on {to.name}")
    finally:
        for c in (pub, sub):
            try:
                c.disconnect()
            except Exception:  # noqa: BLE001
                pass
            c.loop_stop()


class NatsCluster:
    """Three ``NatsNode``s routed to each other, each with JetStream (the
    MQTT listener keeps sessions, QoS 1 messages and retained messages in
    JetStream streams replicated on the three nodes)."""

    def __init__(self, workdir: Path, size: int = 3):
        taken: set[int] = set()

        def port() -> int:
            while True:
                p = free_port()
                if p not in taken:
                    taken.add(p)
                    return p

        ports = [{k: port() for k in ("client", "cluster", "mqtt", "http")} for _ in range(size)]
        self.nodes = [
            NatsNode(workdir, f"n{i}", ports[i], [p["cluster"] for j, p in enumerate(ports) if j != i])
            for i in range(size)
        ]

    def logs(self) -> str:
        return "\n".join(f"----- {n.name} ({n.log_path}) -----\n{tail(n.log_path, 6000)}" for n in self.nodes)

    def start(self, timeout: float = 60.0) -> "NatsCluster":
        for n in self.nodes:
            n.start()
        for n in self.nodes:
            self.wait_ready(n, timeout)
        return self

    def wait_ready(self, node: NatsNode, timeout: float = 60.0) -> None:
        """Until a QoS 1 publish through ``node`` reaches a QoS 1 subscriber
        on another running node (retried: a node that has just started
        refuses MQTT sessions or does not answer until JetStream is ready)."""
        peers = [n for n in self.nodes if n is not node and n.running()]
        assert peers, "no other node is running"
        deadline = time.monotonic() + timeout
        # A probe sent before JetStream has its meta leader and the node's
        # streams are current waits for NATS's own 4 s API timeout; the
        # health endpoint says when it is worth trying. Its consumer checks
        # are not waited for: after a restart, 2.9.10 can call a node's
        # replica of the MQTT retained-message consumers "not current" for
        # minutes while sessions, publishes and subscriptions work.
        health = {}

        def streams_current():
            health["last"] = node.health()
            return health["last"] == "ok" or health["last"].startswith("JetStream consumer ")

        try:
            wait_until(streams_current, timeout, f"{node.name}'s /healthz", interval=0.2)
        except WaitTimeout as exc:
            raise AssertionError(f"{exc}: {health.get('last')}\n{self.logs()}") from None
        attempt = 0
        while True:
            to = peers[attempt % len(peers)]
            attempt += 1
            try:
                probe(node, to, min(15.0, max(1.0, deadline - time.monotonic())))
                return
            except AssertionError as exc:  # WaitTimeout included
                last = exc
            except OSError as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{node.name} not ready after {timeout:.0f}s ({attempt} probes; last: {last})\n{self.logs()}"
                )
            time.sleep(0.2)

    def restart(self, node: NatsNode, timeout: float = 60.0) -> None:
        """Starts a killed node again (same ports, same JetStream store) and
        waits until it is ready."""
        node.start()
        self.wait_ready(node, timeout)

    def node_of(self, client_id: str) -> NatsNode | None:
        """The running node an MQTT client is connected to, if any."""
        for n in self.nodes:
            if n.running():
                try:
                    if client_id in n.mqtt_clients():
                        return n
                except OSError:
                    continue
        return None

    def wait_node_of(self, client_id: str, pred, timeout: float, desc: str) -> NatsNode:
        box: dict = {}

        def check():
            box["n"] = self.node_of(client_id)
            return box["n"] is not None and pred(box["n"])

        try:
            wait_until(check, timeout, f"{client_id} connected to {desc}", interval=0.05)
        except WaitTimeout as exc:
            raise AssertionError(f"{exc}; it is on {box.get('n')}\n{self.logs()}") from None
        return box["n"]

    def lead_consumers_from(self, node: NatsNode, client_id: str, timeout: float = 60.0) -> list[str]:
        """Moves the leaders of ``client_id``'s QoS 1 consumers to ``node``
        (leader step-downs until ``node`` has drawn them all); returns their
        names. A consumer delivers from its leader: a message in flight from
        a leader that is killed reaches the subscriber only when JetStream
        sends it again, after its ack wait, behind newer messages. A
        subscriber whose consumers lead from a node that stays up sees the
        stream's order."""
        prefix = nats_hash(client_id) + "_"
        last: dict = {}

        def leaders() -> dict[str, str | None]:
            doc = node.js_request(f"$JS.API.CONSUMER.LIST.{MQTT_MSGS}", b"{}")
            return {
                c["name"]: c.get("cluster", {}).get("leader")
                for c in doc.get("consumers") or []
                if c["name"].startswith(prefix)
            }

        def all_on_node() -> bool:
            last.update(leaders())
            away = [name for name, leader in last.items() if leader != node.name]
            for name in away:
                if last[name] is not None:  # (None: an election under way)
                    node.js_request(f"$JS.API.CONSUMER.LEADER.STEPDOWN.{MQTT_MSGS}.{name}")
            return bool(last) and not away

        try:
            wait_until(all_on_node, timeout, f"{client_id}'s consumers led from {node.name}", interval=0.5)
        except WaitTimeout as exc:
            raise AssertionError(f"{exc}: leaders {last}") from None
        return sorted(last)

    def close(self) -> None:
        for n in self.nodes:
            n.close()


# The stream NATS keeps QoS 1 messages in for MQTT subscribers.
MQTT_MSGS = "$MQTT_msgs"


def nats_hash(name: str) -> str:
    """NATS's 8-character hash of a name (``getHash``), which prefixes the
    names of an MQTT session's consumers."""
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    return "".join(digits[b % len(digits)] for b in hashlib.sha256(name.encode()).digest()[:8])


@pytest.fixture(scope="module")
def _module_nats_cluster(tmp_path_factory):
    """One cluster per test module: starting one takes seconds (JetStream
    elects its leaders and makes the MQTT streams)."""
    if shutil.which(NATS_SERVER) is None:
        pytest.fail(f"{NATS_SERVER} is not installed (apt-get install nats-server)", pytrace=False)
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"))
    try:
        yield cluster.start()
    finally:
        cluster.close()


@pytest.fixture
def nats_cluster(_module_nats_cluster, request) -> NatsCluster:
    """The module's 3-node NATS JetStream cluster with every node running and
    ready (a node an earlier test left down is started again); its logs are
    attached to the report of a failed test. Tests share its JetStream
    state, so each uses its own client ids."""
    from conftest import _track

    cluster = _module_nats_cluster
    for n in cluster.nodes:
        _track(request, f"nats-server {n.name}", n)
    for n in cluster.nodes:
        if not n.running():
            cluster.restart(n)
    return cluster
