"""A full disk is survived: the hub's storage on a small file system (a
size-limited tmpfs the test mounts) that fills up while the cloud is away.

Publishers get a clear refusal (MQTT 5: PUBACK 0x97 quota exceeded; 3.1.1: the
connection closes), the hub keeps running and answering, nothing acknowledged
is lost, and it takes messages again by itself as soon as space returns.
The other writers of new messages keep the same floor: a message routed to a
module input is refused like an upstream-bound one, a QoS 1 message for a
persistent session that is away is dropped (and counted), a retained
message is delivered but not kept, and a cloud-to-device message from the
cloud is refused (counted, logged and acknowledged upstream, so it is gone);
all are taken again once space returns."""

import os
import re
import subprocess
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from authkit import EDGE_ID, Identity, auth_args, publish_scope, try_connect, wait_scope
from helpers import Publisher, Subscriber, assert_strictly_increasing, first_occurrences, wait_until
from pluginkit import hub_config_text
from test_c2d import Cloud, received
from test_cloud_cli import wait_hub_subscribed

TOPIC = "devices/d1/messages/events/"
DISK_MIB = 64
FLOOR = 20 << 20  # above what a memtable flush writes (8 MiB) plus compaction
PAYLOAD = 4096


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of DISK_MIB MiB, unmounted at teardown."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def publish_until_refused(pub: Publisher, start: int, limit: int) -> int:
    """Publishes one at a time until the hub refuses one; returns the index
    of the refused message."""
    for i in range(start, start + limit):
        if pub.protocol == mqtt.MQTTv5:
            rc = pub.publish_and_wait(TOPIC, b"%d " % i + b"." * PAYLOAD, qos=1, key=i)
            if rc != 0:
                assert rc == 0x97, f"message {i} refused with {rc:#x}, not 0x97 quota exceeded"
                return i
        else:
            try:
                pub.publish_and_wait(TOPIC, b"%d " % i + b"." * PAYLOAD, qos=1, key=i)
            except AssertionError as e:
                assert "connection closed" in str(e), e
                return i
    raise AssertionError(f"{limit} messages of {PAYLOAD} bytes were all taken by a {DISK_MIB} MiB disk")


def test_a_full_disk_refuses_publishers_keeps_what_is_stored_and_takes_messages_again_when_space_returns(
    small_disk, offline_upstream, hub_factory, clients
):
    up, collector = offline_upstream()
    # Other files on the same disk (logs, say) take a good part of it.
    logs = small_disk / "logs"
    logs.write_bytes(b"\0" * (24 << 20))
    hub = hub_factory(
        up, edge_id="edge-full", storage=small_disk / "storage",
        extra_args=["--min-free-bytes", str(FLOOR)],
    )
    limit = (DISK_MIB << 20) // PAYLOAD
    v5 = Publisher(hub.port, protocol=mqtt.MQTTv5)
    clients.append(v5.connect())
    refused_at = publish_until_refused(v5, 0, limit)
    assert refused_at > 100, f"refused after only {refused_at} messages"
    assert free_bytes(small_disk) <= FLOOR + (1 << 20), "refused while the disk still had room"
    acked = set(v5.acked)
    assert acked == set(range(refused_at)), "a message was refused before the disk filled"

    # An MQTT 3.1.1 publisher cannot be told in a PUBACK: its connection closes.
    v3 = Publisher(hub.port, protocol=mqtt.MQTTv311)
    clients.append(v3.connect())
    publish_until_refused(v3, 10**6, 1)
    assert hub.alive(), "the hub died on a full disk"
    assert hub.metric("edgehub_messages_refused_total") >= 2

    # Someone else takes the rest of the disk, to the last byte.
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    assert free_bytes(small_disk) < (1 << 20)
    assert v5.publish_and_wait(TOPIC, b"while full", qos=1) == 0x97
    assert hub.alive()

    # Space returns (the logs and the filler are deleted): the hub takes
    # messages again by itself.
    filler.unlink()
    logs.unlink()
    def taken():
        return v5.publish_and_wait(TOPIC, b"room again", qos=1) == 0
    wait_until(taken, 10, "a publish taken once space returned", interval=0.3)

    # Nothing acknowledged was lost or damaged: the cloud returns and
    # receives every message, in order.
    up.start()
    msgs = collector.wait_payload(b"room again", timeout=120)
    seqs = [int(p.split(b" ")[0]) for t, p in msgs if p not in (b"room again", b"while full")]
    assert set(seqs) >= acked, f"{len(acked - set(seqs))} acknowledged messages lost"
    assert b"while full" not in {p for _, p in msgs}
    assert_strictly_increasing(first_occurrences(seqs), "first-occurrence order upstream")
    assert hub.metric("edgehub_store_lost_total") == 0


# --------------------------------------------------------------------------
# the other writers of new messages keep the same floor
# --------------------------------------------------------------------------

EDGE = "edge-floor"
MODULE_INPUT_FILTER = f"devices/{EDGE}/modules/filter/inputs/#"
TO_INPUT = "devices/d1/messages/events/kind=input"  # routed to the module input only
TO_CLOUD = "devices/d1/messages/events/kind=cloud"  # routed upstream only
AWAY_TOPIC = "local/away"
RETAINED_TOPIC = "local/retained"
NOT_KEPT = "the disk is at the floor kept free: this retained message is delivered, not kept"


def sample(hub, name: str, **labels: str) -> float:
    """The value of ``name{labels...}`` on /metrics (0 when the sample is absent)."""
    for line in hub.metrics_text().splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def wait_sample(hub, name: str, want: float, timeout: float, **labels: str) -> None:
    box = {}

    def check():
        box["v"] = sample(hub, name, **labels)
        return box["v"] == want

    try:
        wait_until(check, timeout, f"{name}{labels} == {want}", interval=0.05)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last value {box.get('v')}") from None


def publish_retained(pub: Publisher, payload: bytes) -> int:
    """A retained QoS 1 publish on RETAINED_TOPIC; returns its reason code."""
    key = object()
    pub.publish(RETAINED_TOPIC, payload, qos=1, key=key, retain=True)
    wait_until(lambda: key in pub.results, 10, f"the PUBACK of {payload!r}")
    return pub.results[key]


def fill_to_below(mnt: Path, free: int) -> Path:
    """A file that takes the disk's free space down to about ``free`` bytes."""
    filler = mnt / "filler"
    todo = free_bytes(mnt) - free
    assert todo > 0, f"only {free_bytes(mnt)} bytes free before filling"
    with open(filler, "wb") as f:
        while todo > 0:
            n = min(todo, 1 << 20)
            f.write(b"\0" * n)
            todo -= n
        f.flush()
        os.fsync(f.fileno())
    return filler


def fill_below_the_floor(mnt: Path) -> Path:
    """Takes the disk below FLOOR with a few MiB still free (so nothing
    meets a full disk); returns the file that did it."""
    filler = fill_to_below(mnt, FLOOR - (2 << 20))
    assert FLOOR - (4 << 20) < free_bytes(mnt) < FLOOR
    return filler


def test_at_the_disk_floor_module_inputs_away_sessions_and_retained_messages_are_not_stored_and_are_again_once_space_returns(
    small_disk, offline_upstream, hub_factory, clients, tmp_path
):
    up, _collector = offline_upstream()  # the cloud stays away: nothing drains
    cfg = tmp_path / "routes.toml"
    cfg.write_text(hub_config_text(routes={
        "to-input": 'FROM /messages/* WHERE kind = \'input\' INTO BrokeredEndpoint("/modules/filter/inputs/in1")',
        "to-cloud": "FROM /messages/* WHERE NOT IS_DEFINED(kind) OR kind != 'input' INTO $upstream",
    }))
    hub = hub_factory(
        up, edge_id=EDGE, storage=small_disk / "storage",
        extra_args=["--config", str(cfg), "--min-free-bytes", str(FLOOR)],
    )
    pub = Publisher(hub.port, protocol=mqtt.MQTTv5)
    clients.append(pub.connect())

    # Before the floor, each of them is stored: a message for the module
    # input (the module is away), a QoS 1 message for a persistent session
    # that is away, a retained message.
    assert pub.publish_and_wait(TO_INPUT, b"input before") == 0
    wait_until(lambda: hub.metric("edgehub_module_inputs_queued") == 1, 10, "the module input message stored")
    away = Subscriber(hub.port, client_id="away-session", clean=False)
    away.connect()
    away.subscribe(AWAY_TOPIC, qos=1)
    away.close()
    assert pub.publish_and_wait(AWAY_TOPIC, b"away before") == 0
    wait_sample(hub, "edgehub_broker_stored", 1, 10, kind="queued")
    assert publish_retained(pub, b"retained before") == 0
    wait_sample(hub, "edgehub_broker_stored", 1, 10, kind="retained")
    watcher = Subscriber(hub.port)  # a current subscriber of the retained topic
    clients.append(watcher.connect())
    watcher.subscribe(RETAINED_TOPIC, qos=1)
    watcher.wait_for(lambda ms: any(m.payload == b"retained before" for m in ms), 10, "the retained message")
    assert sample(hub, "edgehub_messages_dropped_total", reason="no_room") == 0

    # Another file takes the disk below the floor (with a few MiB still
    # free, so nothing meets a full disk).
    filler = fill_below_the_floor(small_disk)
    wait_until(lambda: pub.publish_and_wait(TO_CLOUD, b"cloud at the floor") == 0x97, 10,
               "an upstream-bound publish refused at the floor", interval=0.1)

    # (1) A message the routes send only to the module input is refused to
    # its sender, like an upstream-bound one.
    rc = pub.publish_and_wait(TO_INPUT, b"input at the floor")
    assert rc == 0x97, f"a module input message at the floor got {rc:#x}, not 0x97 quota exceeded"
    assert hub.metric("edgehub_module_inputs_queued") == 1

    # (2) A QoS 1 message for the persistent session that is away is not
    # kept: dropped and counted as no_room.
    assert pub.publish_and_wait(AWAY_TOPIC, b"away at the floor") == 0
    wait_sample(hub, "edgehub_messages_dropped_total", 1, 10, reason="no_room")
    assert sample(hub, "edgehub_broker_stored", kind="queued") == 1

    # (3) A retained message reaches the current subscriber but is not
    # kept, and the one kept before it is cleared (it is stale now): a new
    # subscriber gets no retained message.
    assert publish_retained(pub, b"retained at the floor") == 0
    watcher.wait_for(lambda ms: any(m.payload == b"retained at the floor" for m in ms), 10,
                     "the retained message published at the floor, live")
    wait_until(lambda: NOT_KEPT in hub.log_path.read_text(errors="replace"), 10, f"the warning {NOT_KEPT!r}")
    wait_sample(hub, "edgehub_broker_stored", 0, 10, kind="retained")
    late = Subscriber(hub.port)
    clients.append(late.connect())
    late.subscribe(RETAINED_TOPIC, qos=1)
    # The broker sends retained messages before a later live one: once the
    # sentinel is in, anything retained would be too.
    late.subscribe("local/sentinel", qos=1)
    assert pub.publish_and_wait("local/sentinel", b"s") == 0
    late.wait_topic("local/sentinel")
    with late.cond:
        got = [bytes(m.payload) for m in late.messages if m.topic == RETAINED_TOPIC]
    assert got == [], f"a new subscriber got {got} as the retained message"
    assert hub.alive(), "the hub died at the floor"

    # Space returns: each of them is taken again, by itself.
    filler.unlink()
    assert free_bytes(small_disk) > FLOOR + (16 << 20)
    wait_until(lambda: pub.publish_and_wait(TO_INPUT, b"input after") == 0, 10,
               "a module input message taken once space returned", interval=0.3)
    wait_until(lambda: hub.metric("edgehub_module_inputs_queued") == 2, 10, "the module input message stored")

    assert pub.publish_and_wait(AWAY_TOPIC, b"away after") == 0
    wait_sample(hub, "edgehub_broker_stored", 2, 10, kind="queued")

    assert publish_retained(pub, b"retained after") == 0
    watcher.wait_for(lambda ms: any(m.payload == b"retained after" for m in ms), 10, "the new retained message, live")
    newer = Subscriber(hub.port)
    clients.append(newer.connect())
    newer.subscribe(RETAINED_TOPIC, qos=1)
    m = newer.wait_topic(RETAINED_TOPIC)
    assert bytes(m.payload) == b"retained after", f"a new subscriber got {bytes(m.payload)!r} as the retained message"

    module = Subscriber(hub.port, client_id="filter")
    clients.append(module.connect())
    module.subscribe(MODULE_INPUT_FILTER, qos=1)
    module.wait_for(lambda ms: any(m.payload == b"input after" for m in ms), 15, "the module input message")
    assert first_occurrences(p for _, p in module.received()) == [b"input before", b"input after"]

    back = Subscriber(hub.port, client_id="away-session", clean=False)
    clients.append(back.connect())
    assert back.session_present, "the persistent session was lost"
    back.wait_for(lambda ms: any(m.payload == b"away after" for m in ms), 15, "the message kept for the session")
    assert first_occurrences(p for _, p in back.received()) == [b"away before", b"away after"]
    assert sample(hub, "edgehub_messages_dropped_total", reason="no_room") == 1
    assert hub.alive()


# --------------------------------------------------------------------------
# a cloud-to-device message from the cloud at the floor
# --------------------------------------------------------------------------

DEVICEBOUND = "devices/child1/messages/devicebound/"
PROBE_TOPIC = "devices/child2/messages/events/"  # upstream-bound telemetry: tells when the hub sees the floor


def acked_upstream(up, mid_prop: str) -> bool:
    """Whether the upstream Mosquitto (``log_type all``) sent the hub the
    cloud-to-device message whose property bag holds ``mid_prop`` and the
    hub acknowledged it (a PUBACK of its message id after it)."""
    log = Path(up.log_path).read_text(errors="replace")
    sent = re.search(rf"Sending PUBLISH to {re.escape(EDGE_ID)} \(d\d, q1, r\d, m(\d+), "
                     rf"'{re.escape(DEVICEBOUND)}[^']*{re.escape(mid_prop)}[^']*'", log)
    return bool(sent) and re.search(
        rf"Received PUBACK from {re.escape(EDGE_ID)} \(Mid: {sent[1]}\b", log[sent.end():]) is not None


def test_at_the_disk_floor_a_cloud_to_device_message_is_refused_and_counted_and_one_sent_once_space_returns_reaches_its_device(
    small_disk, upstream_factory, hub_factory, clients
):
    up = upstream_factory(extra_conf=["log_type all"])  # logs the hub's SUBSCRIBEs and PUBACKs
    up.start()
    child1, child2 = Identity.child("child1"), Identity.child("child2")
    hub = hub_factory(
        up, edge_id=EDGE_ID, storage=small_disk / "storage",
        extra_args=[*auth_args(), "--min-free-bytes", str(FLOOR)],
    )
    publish_scope(up, [child1, child2])
    wait_scope(hub, 2)
    wait_hub_subscribed(up, DEVICEBOUND + "#")
    cloud = Cloud(up)
    try:
        # Before the floor, a message for child1 (away) is stored.
        cloud.send("child1", b"c2d before", "%24.mid=before")
        hub.wait_metric("edgehub_c2d_queued", lambda v: v == 1, 15, "the message stored for child1")
        # child2 only publishes telemetry, to see when the hub meets the floor.
        rc, probe = try_connect(hub.port, clients, protocol=mqtt.MQTTv5, **child2.credentials())
        assert rc == 0
        assert probe.publish_result(PROBE_TOPIC, b"telemetry before") == 0
        assert sample(hub, "edgehub_cloud_refused_total", kind="c2d", reason="no_room") == 0

        filler = fill_below_the_floor(small_disk)
        wait_until(lambda: probe.publish_result(PROBE_TOPIC, b"telemetry at the floor") == 0x97, 10,
                   "an upstream-bound publish refused at the floor", interval=0.1)

        # At the floor, a message from the cloud for child1 is refused: not
        # stored, counted, logged, and acknowledged to the cloud (gone).
        cloud.send("child1", b"c2d at the floor", "%24.mid=floor")
        wait_sample(hub, "edgehub_cloud_refused_total", 1, 15, kind="c2d", reason="no_room")
        assert hub.metric("edgehub_c2d_queued") == 1, "the message refused at the floor was stored"
        refusal = re.compile(r"WARN .*cloud-to-device message refused topic=devices/child1/messages/devicebound/"
                             r"\S*mid=floor.* kept free")
        wait_until(lambda: refusal.search(hub.log_path.read_text(errors="replace")), 10,
                   "the warning that the message was refused for want of room")
        wait_until(lambda: acked_upstream(up, "mid=floor"), 10, "the refused message acknowledged to the cloud")
        assert hub.alive(), "the hub died at the floor"

        # Space returns: a new message from the cloud is stored again.
        filler.unlink()
        assert free_bytes(small_disk) > FLOOR + (16 << 20)
        wait_until(lambda: probe.publish_result(PROBE_TOPIC, b"telemetry after") == 0, 10,
                   "an upstream-bound publish taken once space returned", interval=0.3)
        cloud.send("child1", b"c2d after", "%24.mid=after")
        hub.wait_metric("edgehub_c2d_queued", lambda v: v == 2, 15, "the message sent once space returned stored")

        # child1 connects and receives, in order, what was stored: never the
        # message refused at the floor.
        rc, d1 = try_connect(hub.port, clients, **child1.credentials())
        assert rc == 0 and d1.subscribe_result([DEVICEBOUND + "#"]) == [1]
        d1._wait(lambda: b"c2d after" in received(d1, DEVICEBOUND), 15, "the message sent once space returned")
        assert received(d1, DEVICEBOUND) == [b"c2d before", b"c2d after"]
        hub.wait_metric("edgehub_c2d_queued", lambda v: v == 0, 15, "both acknowledged by child1")
        cloud.sub.wait_for(lambda ms: len(cloud.completions("child1")) >= 2, 30, "two completions upstream")
        assert [c["topic"].rsplit("=", 1)[1] for c in cloud.completions("child1")] == ["before", "after"]
        assert sample(hub, "edgehub_cloud_refused_total", kind="c2d", reason="no_room") == 1
        assert hub.alive()
    finally:
        cloud.close()
