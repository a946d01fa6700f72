"""A full disk is survived: the hub's storage on a small file system (a
size-limited tmpfs the test mounts) that fills up while the cloud is away.

Publishers get a clear refusal (MQTT 5: PUBACK 0x97 quota exceeded; 3.1.1: the
connection closes), the hub keeps running and answering, nothing acknowledged
is lost, and it takes messages again by itself as soon as space returns."""

import os
import subprocess
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from helpers import Publisher, assert_strictly_increasing, first_occurrences, wait_until

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
