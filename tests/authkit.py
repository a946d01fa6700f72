"""Helpers for the offline-authentication end-to-end tests (tests/test_auth_*.py).

What is here: SAS tokens and IoT Hub usernames, scope documents and their
publication (retained) on the upstream broker, a throw-away CA and server
certificate for the hub's TLS listener, MQTT clients that authenticate (paho
and raw packets, for exact CONNACK / PUBACK / SUBACK codes), and a driver for
the Azure IoT device SDK for Python.

The Azure IoT device SDK runs in its own virtualenv
-----------------------------------------------------
``azure-iot-device`` 2.x (2.14.0, the newest 2.x) requires
``paho-mqtt>=1.6.1,<2.0.0`` while this suite uses paho-mqtt 2.x
(tests/requirements.txt), so the two cannot share one environment.  The
session fixture ``sdk_python`` (see ``ensure_sdk_venv``) creates a virtualenv
with ``python3 -m venv`` and ``pip install azure-iot-device==2.14.0`` once,
under pytest's cache folder (``.pytest_cache/d/azure-iot-device-venv-2.14.0``;
reused by later runs when it still imports the right version; set
``EDGEHUB_SDK_VENV`` to put it elsewhere).  A test drives the SDK by running
``SDK_DRIVER`` (a small script, written next to the venv) with that venv's
python as a subprocess: it connects one device or module client, sends the
messages it was given, shuts the client down and prints one JSON line with
what happened (connected or the exception chain, messages sent, SDK version).
Every subprocess run has a deadline.

The SDK has no port setting: it always connects to port 8883 of
``GatewayHostName``, so the SDK tests give the hub ``--tls-listen
127.0.0.1:8883`` and fail at once with a clear message if 8883 is taken
(with its websockets option, 443: see test_websockets.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Iterable

import paho.mqtt.client as mqtt

from helpers import (
    CONNACK,
    CONNECT,
    LOOPBACK,
    PUBACK,
    SUBACK,
    SUBSCRIBE,
    RawClient,
    WaitTimeout,
    mqtt_str,
    packet,
    paho_client,
    port_accepts,
    publish_packet,
    tail,
    wait_until,
)

HUB_NAME = "myhub.azure-devices.net"
EDGE_ID = "gw1"
API_VERSION = "2021-04-12"
SDK_PORT = 8883
SDK_VERSION = "2.14.0"
SDK_REQUIREMENT = f"azure-iot-device=={SDK_VERSION}"

# MQTT 3.1.1 CONNACK return codes / MQTT 5 reason codes used by the feature
V3_ACCEPTED, V3_BAD_CREDENTIALS, V3_NOT_AUTHORIZED = 0, 4, 5
V5_BAD_CREDENTIALS, V5_NOT_AUTHORIZED = 0x86, 0x87
SUBACK_FAILURE_V3 = 0x80

# paho 2.x reports MQTT 3.1.1 CONNACK return codes as MQTT 5 reason codes
_PAHO_V3_RC = {0: 0, 0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x87: 5}


# --------------------------------------------------------------------------
# keys, SAS tokens, usernames
# --------------------------------------------------------------------------


def new_key() -> str:
    """A random 32-byte symmetric key, base64 (as IoT Hub makes them)."""
    return base64.b64encode(os.urandom(32)).decode()


def resource_uri(device_id: str, module_id: str | None = None, hub: str = HUB_NAME) -> str:
    uri = f"{hub}/devices/{device_id}"
    if module_id:
        uri += f"/modules/{module_id}"
    return uri


def sas_token(key_b64: str, device_id: str, module_id: str | None = None, *, hub: str = HUB_NAME,
              ttl: int = 3600, expiry: int | str | None = None, sr: str | None = None,
              sig: str | None = None) -> str:
    """``SharedAccessSignature sr=...&sig=...&se=...`` as the IoT SDKs make it:
    sig = urlencode(base64(HMAC-SHA256(base64decode(key), sr_as_sent + "\\n" + se))).
    ``expiry``/``sr``/``sig`` override the computed parts (for bad tokens)."""
    se = str(expiry if expiry is not None else int(time.time()) + ttl)
    sr_sent = sr if sr is not None else urllib.parse.quote(resource_uri(device_id, module_id, hub), safe="")
    if sig is None:
        mac = hmac.new(base64.b64decode(key_b64), f"{sr_sent}\n{se}".encode(), hashlib.sha256).digest()
        sig = urllib.parse.quote(base64.b64encode(mac).decode(), safe="")
    return f"SharedAccessSignature sr={sr_sent}&sig={sig}&se={se}"


def username_for(device_id: str, module_id: str | None = None, hub: str = HUB_NAME) -> str:
    who = f"{device_id}/{module_id}" if module_id else device_id
    return f"{hub}/{who}/?api-version={API_VERSION}"


def client_id_for(device_id: str, module_id: str | None = None) -> str:
    return f"{device_id}/{module_id}" if module_id else device_id


class Identity:
    """One identity of a scope document with its two keys."""

    def __init__(self, device_id: str, module_id: str | None = None, *, parent: str | None = None,
                 edge: bool = False, primary: str | None = None, secondary: str | None = None):
        self.device_id = device_id
        self.module_id = module_id
        self.parent = parent
        self.edge = edge
        self.primary = primary or new_key()
        self.secondary = secondary or new_key()

    @classmethod
    def child(cls, device_id: str, edge_id: str = EDGE_ID, **kw) -> "Identity":
        return cls(device_id, parent=edge_id, **kw)

    @classmethod
    def module(cls, module_id: str, edge_id: str = EDGE_ID, **kw) -> "Identity":
        return cls(edge_id, module_id, **kw)

    def rotated(self) -> "Identity":
        return Identity(self.device_id, self.module_id, parent=self.parent, edge=self.edge)

    @property
    def client_id(self) -> str:
        return client_id_for(self.device_id, self.module_id)

    @property
    def username(self) -> str:
        return username_for(self.device_id, self.module_id)

    def token(self, secondary: bool = False, **kw) -> str:
        return sas_token(self.secondary if secondary else self.primary, self.device_id, self.module_id, **kw)

    def credentials(self, secondary: bool = False, **kw) -> dict:
        """kwargs for the clients below: client_id, username, password."""
        return {"client_id": self.client_id, "username": self.username, "password": self.token(secondary, **kw)}

    def doc(self) -> dict:
        d: dict = {"deviceId": self.device_id}
        if self.module_id:
            d["moduleId"] = self.module_id
        if self.parent:
            d["parent"] = self.parent
        if self.edge:
            d["edge"] = True
        d["auth"] = {"type": "sas", "primaryKey": self.primary, "secondaryKey": self.secondary}
        return d

    def connection_string(self, gateway: str = "localhost", key: str | None = None) -> str:
        cs = f"HostName={HUB_NAME};DeviceId={self.device_id};"
        if self.module_id:
            cs += f"ModuleId={self.module_id};"
        return cs + f"SharedAccessKey={key or self.primary};GatewayHostName={gateway}"


def scope_doc(identities: Iterable[Identity | dict], version: int = 1) -> bytes:
    return json.dumps({
        "version": version,
        "identities": [i.doc() if isinstance(i, Identity) else i for i in identities],
    }).encode()


def scope_topic(edge_id: str = EDGE_ID) -> str:
    return f"edges/{edge_id}/scope"


def publish_retained(upstream_port: int, topic: str, payload: bytes, timeout: float = 10.0) -> None:
    """Publishes a retained QoS 1 message on the upstream broker (as the cloud
    does with a scope document) and waits for the broker's PUBACK."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"cloud-{uuid.uuid4().hex[:8]}",
                    protocol=mqtt.MQTTv311)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect(LOOPBACK, upstream_port, keepalive=30)
    c.loop_start()
    try:
        if not connected.wait(timeout):
            raise AssertionError(f"could not connect to the upstream broker on {upstream_port}")
        info = c.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise AssertionError(f"upstream broker did not acknowledge the retained message on {topic}")
    finally:
        c.disconnect()
        c.loop_stop()


def publish_scope(upstream, identities_or_payload, edge_id: str = EDGE_ID) -> bytes:
    payload = identities_or_payload if isinstance(identities_or_payload, (bytes, bytearray)) \
        else scope_doc(identities_or_payload)
    publish_retained(upstream.port, scope_topic(edge_id), bytes(payload))
    return bytes(payload)


# --------------------------------------------------------------------------
# the hub
# --------------------------------------------------------------------------


def auth_args(*, hub_names: Iterable[str] = (HUB_NAME,), tls: dict | None = None, tls_port: int | None = None,
              allow_anonymous: bool = False, master_key_file: Path | None = None) -> list[str]:
    args: list[str] = []
    for h in hub_names:
        args += ["--hub-name", h]
    if tls:
        args += ["--tls-listen", f"{LOOPBACK}:{tls_port}", "--tls-cert", str(tls["cert"]),
                 "--tls-key", str(tls["key"])]
    if allow_anonymous:
        args.append("--allow-anonymous")
    if master_key_file is not None:
        args += ["--master-key-file", str(master_key_file)]
    return args


def wait_scope(hub, n: int, timeout: float = 20.0) -> float:
    """Waits until the hub reports ``n`` accepted identities."""
    return hub.wait_metric("edgehub_scope_identities", lambda v: v == n, timeout, f"== {n} (scope applied)")


def refused(hub) -> float:
    return hub.metric("edgehub_auth_refused_total")


def log_size(hub) -> int:
    try:
        return hub.log_path.stat().st_size
    except OSError:
        return 0


def log_since(hub, offset: int) -> str:
    with open(hub.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def wait_log(hub, offset: int, pattern: str, timeout: float, desc: str) -> re.Match:
    rx = re.compile(pattern, re.IGNORECASE)
    try:
        return wait_until(lambda: rx.search(log_since(hub, offset)), timeout, desc, interval=0.05)
    except WaitTimeout as exc:
        raise WaitTimeout(f"{exc}\nhub log since then:\n{log_since(hub, offset)[-4000:]}") from None


REFUSAL_LOG = r"refus|reject|denied|deny|unauthori[sz]|not authori[sz]|invalid|expired|bad|fail|unknown|not allowed|forbidden|mismatch"


def refusal_lines(text: str) -> list[str]:
    rx = re.compile(REFUSAL_LOG, re.IGNORECASE)
    return [line for line in text.splitlines() if rx.search(line)]


def require_port_free(port: int) -> None:
    """Fails the test clearly when ``port`` (8883 for the SDK) is taken."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((LOOPBACK, port))
    except OSError as exc:
        who = subprocess.run(["ss", "-ltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
        raise AssertionError(
            f"port {port} on {LOOPBACK} is busy ({exc}); the Azure IoT SDK can only connect to 8883, "
            f"so this test needs it free.\n{who}"
        ) from None
    finally:
        s.close()


def wait_tls_listener(hub, port: int, timeout: float = 20.0) -> None:
    def up():
        if not hub.alive():
            raise AssertionError(f"edgehub exited with {hub.proc.returncode}:\n{tail(hub.log_path)}")
        return port_accepts(port)

    wait_until(up, timeout, f"the hub's TLS listener on {port}")


def storage_files_containing(folder: Path, needles: Iterable[bytes]) -> list[tuple[str, bytes]]:
    """(file, needle) for each needle found in any file under ``folder``."""
    hits = []
    needles = [n for n in needles if n]
    for p in Path(folder).rglob("*"):
        if not p.is_file():
            continue
        try:
            data = p.read_bytes()
        except OSError:
            continue
        for n in needles:
            if n in data:
                hits.append((str(p), n))
    return hits


def secret_needles(identities: Iterable[Identity]) -> list[bytes]:
    """Every key of the identities as base64 text and as raw bytes."""
    out = []
    for i in identities:
        for k in (i.primary, i.secondary):
            out.append(k.encode())
            out.append(base64.b64decode(k))
    return out


# --------------------------------------------------------------------------
# certificates
# --------------------------------------------------------------------------


def make_certs(d: Path) -> dict[str, Path]:
    """A throw-away CA and a server certificate (SAN DNS:localhost, IP:127.0.0.1)."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=edgehub auth test CA",
             "-keyout", "ca.key", "-out", "ca.pem")
    (d / "san.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    cert, key = issue_server_cert(d, "server")
    return {"ca": d / "ca.pem", "cert": cert, "key": key, "dir": d}


def issue_server_cert(d: Path, name: str) -> tuple[Path, Path]:
    """Another server certificate (``<name>.pem``, fresh key ``<name>.key``)
    from the CA that ``make_certs`` made in ``d``: a renewal."""
    _openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", f"{name}.key",
             "-out", f"{name}.csr")
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "san.ext", "-out", f"{name}.pem")
    return d / f"{name}.pem", d / f"{name}.key"


def _openssl(d: Path, *args: str) -> None:
    r = subprocess.run(["openssl", *args], capture_output=True, cwd=d, timeout=60)
    assert r.returncode == 0, f"openssl {' '.join(args)} failed:\n{r.stderr.decode(errors='replace')}"


def client_ssl_context(ca: Path, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if version is not None:
        ctx.minimum_version = version
        ctx.maximum_version = version
    return ctx


# --------------------------------------------------------------------------
# paho client that authenticates (no automatic reconnect)
# --------------------------------------------------------------------------


class DeviceClient:
    """A paho 2.x client with credentials.  Its network loop runs in its own
    thread and never reconnects, so one ``connect`` is one CONNECT seen by the
    hub (the refusal counter stays exact) and a connection the hub closes
    stays closed (``closed`` is set)."""

    def __init__(self, port: int, client_id: str, username: str | None = None, password: str | None = None,
                 protocol=mqtt.MQTTv311, ssl_context: ssl.SSLContext | None = None, server_hostname: str = LOOPBACK,
                 transport: str = "tcp"):
        self.port = port
        self.protocol = protocol
        self.client_id = client_id
        kwargs = {"clean_session": True} if protocol != mqtt.MQTTv5 else {}
        c = paho_client(client_id, protocol, transport, ssl_context, **kwargs)
        if username is not None or password is not None:
            c.username_pw_set(username, password)
        self.server_hostname = server_hostname
        c.max_queued_messages_set(0)
        self.cond = threading.Condition()
        self.connack: int | None = None  # v3.1.1: CONNACK return code; v5: reason code
        self.closed = threading.Event()
        self.disconnect_rc = None
        self.pubacks: dict[int, int] = {}  # mid -> reason code (v3.1.1: 0)
        self.subacks: dict[int, list[int]] = {}  # mid -> per filter codes
        self.messages: list[tuple[str, bytes]] = []
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self.client = c
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # paho writes from the calling thread when its own loop thread is
        # not used, and an ssl socket read in one thread while written in
        # another can crash the interpreter: every use of the socket holds
        # this lock, and the loop thread steps aside while a caller waits.
        self._io = threading.Lock()
        self._callers = 0

    # callbacks
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        v = reason_code.value
        if self.protocol != mqtt.MQTTv5:
            v = _PAHO_V3_RC.get(v, v)
        with self.cond:
            self.connack = v
            self.cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.disconnect_rc = reason_code
            self.closed.set()
            self.cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self.cond:
            self.pubacks[mid] = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.subacks[mid] = [rc.value for rc in reason_codes]
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.cond.notify_all()

    def _socket(self):
        """Holds the socket for a caller (see ``_io``)."""
        outer = self

        class Hold:
            def __enter__(self):
                outer._callers += 1
                outer._io.acquire()

            def __exit__(self, *exc):
                outer._io.release()
                outer._callers -= 1

        return Hold()

    def _loop(self):
        while not self._stop.is_set():
            with self._io:
                rc = self.client.loop(timeout=0.05)
            while self._callers and not self._stop.is_set():
                time.sleep(0.001)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                with self.cond:
                    self.closed.set()
                    self.cond.notify_all()
                return

    def _wait(self, pred, timeout: float, desc: str):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(f"timed out after {timeout}s waiting for {desc} ({self.client_id})")
                self.cond.wait(min(remaining, 0.2))

    # api
    def connect(self, timeout: float = 10.0) -> int:
        """Sends CONNECT; returns the CONNACK code (v3.1.1 return code or v5
        reason code) or raises if the hub closed without a CONNACK."""
        if self.protocol == mqtt.MQTTv5:
            self.client.connect(LOOPBACK, self.port, keepalive=30, clean_start=True)
        else:
            self.client.connect(LOOPBACK, self.port, keepalive=30)
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"paho-{self.client_id}")
        self._thread.start()
        self._wait(lambda: self.connack is not None or self.closed.is_set(), timeout, "CONNACK")
        if self.connack is None:
            raise AssertionError(f"{self.client_id}: the hub closed the connection without a CONNACK")
        return self.connack

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        with self._socket():
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return info.mid

    def publish_result(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 10.0):
        """Returns the PUBACK reason code, or None if the hub closed the
        connection instead of acknowledging."""
        mid = self.publish(topic, payload, qos)
        self._wait(lambda: mid in self.pubacks or self.closed.is_set(), timeout, f"PUBACK or close after {topic!r}")
        with self.cond:
            if mid in self.pubacks:
                return self.pubacks[mid]
        return None

    def subscribe_result(self, filters: list[str], qos: int = 1, timeout: float = 10.0) -> list[int] | None:
        """Per-filter SUBACK codes of one SUBSCRIBE, or None if the hub closed."""
        with self._socket():
            result, mid = self.client.subscribe([(f, qos) for f in filters])
        assert result == mqtt.MQTT_ERR_SUCCESS, f"paho subscribe failed: {result}"
        self._wait(lambda: mid in self.subacks or self.closed.is_set(), timeout, f"SUBACK for {filters}")
        with self.cond:
            return self.subacks.get(mid)

    def wait_closed(self, timeout: float, desc: str = "the hub to close the connection") -> None:
        self._wait(self.closed.is_set, timeout, desc)

    def close(self) -> None:
        try:
            if not self.closed.is_set():
                with self._socket():
                    self.client.disconnect()
                deadline = time.monotonic() + 2
                while not self.closed.is_set() and time.monotonic() < deadline:
                    self.closed.wait(0.05)
        except Exception:  # noqa: BLE001
            pass
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.client.socket() and self.client.socket().close()
        except Exception:  # noqa: BLE001
            pass


def try_connect(port: int, clients: list, protocol=mqtt.MQTTv311, **creds) -> tuple[int, DeviceClient]:
    c = DeviceClient(port, protocol=protocol, **creds)
    clients.append(c)
    rc = c.connect()
    return rc, c


# --------------------------------------------------------------------------
# raw MQTT with credentials (exact return codes, oversized fields)
# --------------------------------------------------------------------------


def auth_connect_packet(client_id: str, username: str | bytes | None = None, password: str | bytes | None = None,
                        level: int = 4, keepalive: int = 60) -> bytes:
    flags = 0x02
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    var = mqtt_str("MQTT") + bytes([level, flags]) + struct.pack("!H", keepalive)
    if level == 5:
        var += b"\x00"
    payload = mqtt_str(client_id)
    if username is not None:
        payload += mqtt_str(username)
    if password is not None:
        payload += mqtt_str(password)
    return packet(CONNECT, 0, var + payload)


def subscribe_packet(filters: list[str], packet_id: int = 1, v5: bool = False, qos: int = 1) -> bytes:
    body = struct.pack("!H", packet_id)
    if v5:
        body += b"\x00"
    for f in filters:
        body += mqtt_str(f) + bytes([qos])
    return packet(SUBSCRIBE, 0x02, body)


def _skip_props(body: bytes, i: int) -> int:
    length, mult = 0, 1
    while True:
        b = body[i]
        i += 1
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    return i + length


class RawAuth(RawClient):
    """helpers.RawClient, optionally over TLS, with credentialed CONNECT."""

    def __init__(self, port: int, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str = "localhost"):
        super().__init__(port, timeout)
        if ssl_context is not None:
            self.sock = ssl_context.wrap_socket(self.sock, server_hostname=server_hostname)

    def connect_auth(self, client_id: str, username=None, password=None, level: int = 4,
                     timeout: float = 10.0) -> int | None:
        """The CONNACK code (v3.1.1 return code / v5 reason code), or None if
        the hub closed the connection without one."""
        if not self.send(auth_connect_packet(client_id, username, password, level)):
            return None
        p = self.read_packet(timeout)
        if p is None:
            return None
        assert p[0] == CONNACK, f"expected CONNACK, got packet type {p[0]}"
        return p[2][1]

    def puback_or_close(self, topic: str, payload: bytes, packet_id: int, level: int = 4,
                        timeout: float = 10.0) -> int | None:
        self.send(publish_packet(topic, payload, qos=1, packet_id=packet_id, v5=(level == 5)))
        while True:
            p = self.read_packet(timeout)
            if p is None:
                return None
            if p[0] == PUBACK:
                pid = struct.unpack("!H", p[2][:2])[0]
                if pid == packet_id:
                    return p[2][2] if len(p[2]) > 2 else 0

    def suback(self, filters: list[str], packet_id: int, level: int = 4, timeout: float = 10.0) -> list[int] | None:
        self.send(subscribe_packet(filters, packet_id, v5=(level == 5)))
        while True:
            p = self.read_packet(timeout)
            if p is None:
                return None
            if p[0] == SUBACK:
                body = p[2]
                i = 2
                if level == 5:
                    i = _skip_props(body, i)
                return list(body[i:])


def raw_connect(port: int, clients: list, client_id: str, username=None, password=None, level: int = 4,
                ssl_context=None) -> int | None:
    r = RawAuth(port, ssl_context=ssl_context)
    clients.append(r)
    return r.connect_auth(client_id, username, password, level)


# --------------------------------------------------------------------------
# the Azure IoT device SDK (in its own virtualenv)
# --------------------------------------------------------------------------

SDK_DRIVER = r'''
"""Drives one azure-iot-device client; prints one JSON line (the last line)."""
import json, logging, sys, time, traceback
args = json.loads(sys.argv[1])
out = {"connected": False, "sent": [], "steps": [], "error": None, "error_chain": []}
if args.get("log"):
    logging.basicConfig(filename=args["log"], level=logging.DEBUG,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
try:
    import azure.iot.device as sdk
    from azure.iot.device import IoTHubDeviceClient, IoTHubModuleClient, Message
    out["sdk_version"] = getattr(sdk, "__version__", None)
    try:
        import importlib.metadata as md
        out["sdk_version"] = md.version("azure-iot-device")
        out["paho_version"] = md.version("paho-mqtt")
    except Exception:
        pass
    cls = IoTHubModuleClient if args.get("module") else IoTHubDeviceClient
    with open(args["ca"]) as f:
        ca = f.read()
    retry = args.get("retry_secs")  # None: a lost connection stays lost
    client = cls.create_from_connection_string(
        args["cs"], server_verification_cert=ca, connection_retry=bool(retry),
        connection_retry_interval=retry or 10, keep_alive=30,
        websockets=bool(args.get("websockets")))
    try:
        t0 = time.monotonic()
        client.connect()
        out["connected"] = True
        out["connect_secs"] = round(time.monotonic() - t0, 3)
        for i, p in enumerate(args.get("messages", [])):
            m = Message(p)
            m.message_id = "mid-%d" % i
            m.content_type = "application/json"
            m.content_encoding = "utf-8"
            for k, v in args.get("properties", {}).items():
                m.custom_properties[k] = v
            client.send_message(m)
            out["sent"].append(p)
        for step in args.get("steps", []):
            # One entry per step: the twin got, "ok" for a patch, the methods
            # served, or the error.
            try:
                if step["op"] == "get":
                    out["steps"].append({"op": "get", "twin": client.get_twin()})
                elif step["op"] == "patch":
                    client.patch_twin_reported_properties(step["patch"])
                    out["steps"].append({"op": "patch", "ok": True})
                elif step["op"] == "serve_methods":
                    import threading
                    from azure.iot.device import MethodResponse
                    served, done = [], threading.Event()
                    def handler(req):
                        served.append({"name": req.name, "payload": req.payload})
                        client.send_method_response(MethodResponse.create_from_method_request(
                            req, 200, {"echo": req.payload, "name": req.name}))
                        if len(served) >= step["count"]:
                            done.set()
                    client.on_method_request_received = handler
                    ok = done.wait(step.get("timeout", 30))
                    out["steps"].append({"op": "serve_methods", "served": served, "ok": ok})
                elif step["op"] == "receive_messages":
                    import threading
                    got, done = [], threading.Event()
                    def on_message(m):
                        got.append({"data": m.data.decode(errors="replace"), "message_id": m.message_id,
                                    "properties": dict(m.custom_properties)})
                        if len(got) >= step["count"]:
                            done.set()
                    client.on_message_received = on_message
                    ok = done.wait(step.get("timeout", 30))
                    out["steps"].append({"op": "receive_messages", "messages": got, "ok": ok})
                elif step["op"] == "wait_desired":
                    import threading
                    patches, done = [], threading.Event()
                    def on_patch(p):
                        patches.append(p)
                        done.set()
                    client.on_twin_desired_properties_patch_received = on_patch
                    ok = done.wait(step.get("timeout", 30))
                    out["steps"].append({"op": "wait_desired", "patches": patches, "ok": ok})
            except Exception as e:  # noqa
                out["steps"].append({"op": step["op"], "error": type(e).__name__, "message": str(e)})
    finally:
        try:
            client.shutdown()
        except Exception as e:  # noqa
            out["shutdown_error"] = repr(e)
except BaseException as e:  # noqa
    out["error"] = type(e).__name__
    chain, cur = [], e
    while cur is not None and len(chain) < 8:
        chain.append("%s: %s" % (type(cur).__name__, cur))
        cur = cur.__cause__ or cur.__context__
    out["error_chain"] = chain
    out["traceback"] = traceback.format_exc()[-3000:]
print(json.dumps(out), flush=True)
'''


def ensure_sdk_venv(base: Path) -> Path:
    """Creates (once) a virtualenv with azure-iot-device; returns its python."""
    venv = Path(os.environ.get("EDGEHUB_SDK_VENV") or base)
    py = venv / "bin" / "python"
    marker = venv / ".edgehub-sdk-ok"
    if py.exists() and marker.exists() and marker.read_text().strip() == SDK_REQUIREMENT:
        r = subprocess.run([str(py), "-c", "import azure.iot.device"], capture_output=True, timeout=120)
        if r.returncode == 0:
            (venv / "sdk_driver.py").write_text(SDK_DRIVER)
            return py
    r = subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], capture_output=True, timeout=300)
    assert r.returncode == 0, f"python3 -m venv {venv} failed:\n{r.stdout.decode()}\n{r.stderr.decode()}"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", SDK_REQUIREMENT],
                       capture_output=True, timeout=900)
    assert r.returncode == 0, (
        f"pip install {SDK_REQUIREMENT} into {venv} failed (PyPI needed):\n"
        f"{r.stdout.decode(errors='replace')}\n{r.stderr.decode(errors='replace')}"
    )
    marker.write_text(SDK_REQUIREMENT + "\n")
    (venv / "sdk_driver.py").write_text(SDK_DRIVER)
    return py


def run_sdk(python: Path, ident: Identity, ca: Path, *, key: str | None = None, messages: list[str] = (),
            properties: dict | None = None, log: Path | None = None, timeout: float = 90.0,
            steps: list[dict] = (), retry_secs: int | None = None, websockets: bool = False) -> dict:
    """Runs the SDK driver for one identity; returns its JSON result (plus
    ``stderr`` and ``log`` for messages). ``steps`` run after the messages:
    ``{"op": "get"}`` (the twin), ``{"op": "patch", "patch": {...}}``
    (reported properties), ``{"op": "serve_methods", "count": n, "timeout":
    s}`` (answer n method calls with 200 and ``{"echo", "name"}``),
    ``{"op": "receive_messages", "count": n, "timeout": s}`` (cloud-to-device
    messages), ``{"op": "wait_desired", "timeout": s}`` (the first desired
    patch); their results are in ``out["steps"]``. ``retry_secs``: the SDK
    reconnects by itself after a lost connection, trying every ``retry_secs``
    (its ``connection_retry``); by default it does not. ``websockets``: MQTT
    over a secure WebSocket, which the SDK opens on port 443 only."""
    args = {
        "steps": list(steps),
        "cs": ident.connection_string(key=key),
        "module": bool(ident.module_id),
        "ca": str(ca),
        "messages": list(messages),
        "properties": properties or {},
        "log": str(log) if log else None,
        "retry_secs": retry_secs,
        "websockets": websockets,
    }
    driver = Path(python).parent.parent / "sdk_driver.py"
    try:
        r = subprocess.run([str(python), str(driver), json.dumps(args)], capture_output=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"the SDK driver for {ident.client_id} did not finish within {timeout}s\n"
            f"SDK log tail:\n{tail(log, 6000) if log else ''}"
        ) from exc
    lines = [ln for ln in r.stdout.decode(errors="replace").splitlines() if ln.strip().startswith("{")]
    assert lines, (
        f"the SDK driver printed no result (exit {r.returncode})\nstdout:\n{r.stdout.decode(errors='replace')}\n"
        f"stderr:\n{r.stderr.decode(errors='replace')[-4000:]}"
    )
    out = json.loads(lines[-1])
    out["stderr"] = r.stderr.decode(errors="replace")[-4000:]
    out["log_tail"] = tail(log, 6000) if log else ""
    return out


def describe_sdk(out: dict) -> str:
    keep = {k: v for k, v in out.items() if k not in ("stderr", "log_tail", "traceback")}
    return (f"SDK result: {json.dumps(keep, indent=1)}\ntraceback: {out.get('traceback')}\n"
            f"SDK log tail:\n{out.get('log_tail', '')[-3000:]}")


# --------------------------------------------------------------------------
# more on DeviceClient: retained publishes, awaited messages, an abrupt end
# --------------------------------------------------------------------------


def publish_outcome(c: DeviceClient, topic: str, payload: bytes, *, retain: bool = False,
                    timeout: float = 10.0) -> int | None:
    """One QoS 1 publish (retained or not): the PUBACK reason code, or None
    if the hub closed the connection instead of acknowledging."""
    mid = c.publish(topic, payload, qos=1, retain=retain)
    c._wait(lambda: mid in c.pubacks or c.closed.is_set(), timeout, f"PUBACK or close after {topic!r}")
    with c.cond:
        return c.pubacks.get(mid)


def wait_message(c: DeviceClient, payload: bytes, timeout: float = 10.0) -> list[tuple[str, bytes]]:
    """Waits until ``c`` received a message with ``payload``; returns every
    message it received so far, in order."""
    c._wait(lambda: any(p == payload for _, p in c.messages), timeout, f"a message {payload!r}")
    with c.cond:
        return list(c.messages)


def abort(c: DeviceClient) -> None:
    """Ends the connection without a DISCONNECT (as a lost link does), so the
    hub publishes the client's will if it has one."""
    c._stop.set()
    if c._thread is not None:
        c._thread.join(timeout=5)
    sock = c.client.socket()
    if sock is not None:
        sock.close()
    c.closed.set()


def start_gateway(hub_factory, upstream, certs, **kw):
    """A hub with --tls-listen 127.0.0.1:8883, the SDK's port (fails clearly
    if 8883 is taken)."""
    require_port_free(SDK_PORT)
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args(tls=certs, tls_port=SDK_PORT), **kw)
    wait_tls_listener(hub, SDK_PORT)
    return hub


def broker_log(up, since: int = 0) -> str:
    """The upstream Mosquitto's log from byte ``since`` on."""
    with open(up.log_path, "rb") as f:
        f.seek(since)
        return f.read().decode("utf-8", "replace")


def hub_publishes(up, topic: str, since: int = 0) -> list[tuple[int, int, int]]:
    """(QoS, retain, message id) of every PUBLISH the hub (client id = the
    edge id) made on ``topic``, as the upstream Mosquitto logged it (it
    needs ``log_type all``) from byte ``since`` of its log on."""
    rx = re.compile(rf"^\d+: Received PUBLISH from {re.escape(EDGE_ID)} \(d\d, q(\d), r(\d), m(\d+), '([^']*)',")
    return [(int(m[1]), int(m[2]), int(m[3]))
            for m in map(rx.match, broker_log(up, since).splitlines()) if m and m[4] == topic]
