"""A damaged store does not take the gateway down.

20,000 messages are queued while the cloud is away, the hub is killed, and 4
bytes are flipped in the middle of the written part of the store's journal
(or of a table file): the hub must start, set the damaged files aside, count
what it kept and what it lost, deliver every intact message in order and keep
serving."""

from pathlib import Path

import pytest

from helpers import Publisher, assert_strictly_increasing, first_occurrences, wait_until

TOPIC = "devices/d1/messages/events/"
N = 20_000


def flip_middle(path: Path) -> int:
    """Flips 4 bytes in the middle of the written (non-zero) part of a file."""
    data = bytearray(path.read_bytes())
    written = len(data.rstrip(b"\0"))
    pos = written // 2
    for i in range(4):
        data[pos + i] ^= 0xFF
    path.write_bytes(bytes(data))
    return pos


def queue_dir(hub) -> Path:
    return hub.storage / "queue"


def journals(hub) -> list[Path]:
    return sorted(queue_dir(hub).glob("*.jnl"))


def tables(hub) -> list[Path]:
    return sorted(p for p in queue_dir(hub).glob("keyspaces/*/tables/*") if p.is_file())


def fill(hub, clients, payload_bytes: int) -> None:
    pub = Publisher(hub.port, inflight=500)
    clients.append(pub.connect())
    pad = b"." * payload_bytes
    for i in range(N):
        pub.publish(TOPIC, b"%d " % i + pad, qos=1, key=i)
    pub.wait_results(N, timeout=120)
    refused = {k: rc for k, rc in pub.results.items() if rc >= 0x80}
    assert not refused, f"publishes refused: {list(refused.items())[:5]}"
    pub.close()


@pytest.mark.parametrize("damaged", ["journal", "table"])
def test_a_hub_with_flipped_bytes_in_its_store_starts_and_delivers_every_intact_message(
    damaged, offline_upstream, hub_factory, clients
):
    up, collector = offline_upstream()
    # Small payloads stay in the journal; larger ones fill a memtable
    # (8 MiB) that is flushed to a table file.
    hub = hub_factory(up, edge_id="edge-rot")
    fill(hub, clients, payload_bytes=20 if damaged == "journal" else 600)
    hub.wait_queue_depth(N)
    hub.kill9()

    if damaged == "journal":
        assert journals(hub), "no journal file"
        target = max(journals(hub), key=lambda p: len(p.read_bytes().rstrip(b"\0")))
    else:
        assert tables(hub), "no table file: the queue was never flushed"
        target = max(tables(hub), key=lambda p: p.stat().st_size)
    flip_middle(target)

    hub.start()
    log = hub.log_path.read_text()
    assert "damaged" in log, log[-3000:]
    recovered = hub.metric("edgehub_store_recovered_total")
    lost = hub.metric("edgehub_store_lost_total")
    # One group commit's batch, or one table block, is lost.
    assert 1 <= lost <= N // 10, f"recovered {recovered}, lost {lost}"
    assert recovered >= N - lost, f"recovered {recovered}, lost {lost}"
    aside = list((hub.storage / "damaged").iterdir())
    assert len(aside) == 1 and (aside[0] / target.relative_to(queue_dir(hub))).exists(), aside

    # The hub keeps serving: a message published now is taken and delivered.
    pub = Publisher(hub.port)
    clients.append(pub.connect())
    assert pub.publish_and_wait(TOPIC, b"after", qos=1) == 0
    # (The depth counts from the first key to the last, lost stretch included.)
    hub.wait_queue_stats(lambda s: N - lost + 1 <= s["depth"] <= N + 1, 10, "the new message queued")

    up.start()
    collector.wait_payload(b"after", timeout=120)
    hub.wait_queue_depth(0, timeout=60)
    seqs = [int(p.split(b" ")[0]) for t, p in collector.snapshot() if p != b"after"]
    delivered = set(seqs)
    missing = sorted(set(range(N)) - delivered)
    # What is missing is one damaged stretch, counted as lost; everything
    # stored before and after it arrives, in order.
    assert missing, "nothing is missing, so the damage was not where the test put it"
    assert len(missing) <= lost, f"{len(missing)} missing but {lost} counted lost: {missing[:10]}"
    assert missing == list(range(missing[0], missing[-1] + 1)), f"missing is not one stretch: {missing[:20]}"
    assert missing[0] > 0 and missing[-1] < N - 1, f"missing {missing[0]}..{missing[-1]}"
    assert_strictly_increasing(first_occurrences(seqs), "first-occurrence order upstream")


def test_a_store_that_does_not_open_is_read_file_by_file_into_a_new_one_and_every_message_is_delivered(
    offline_upstream, hub_factory, clients
):
    """fjall cannot open a store whose version files (which tables make up
    each keyspace) are damaged; the records are all still there, in the
    tables' data blocks and the journal. (A damaged table index or table of
    contents: store::recovery's unit tests.)"""
    up, collector = offline_upstream()
    hub = hub_factory(up, edge_id="edge-rot")
    fill(hub, clients, payload_bytes=600)
    hub.wait_queue_depth(N)
    hub.kill9()
    versions = [p for p in queue_dir(hub).glob("keyspaces/*/v*") if p.name[1:].isdigit()]
    assert versions, "no version file"
    for v in versions:
        flip_middle(v)

    hub.start()
    assert "every record its tables and journals still hold was read into a new store" in hub.log_path.read_text()
    assert len(list((hub.storage / "damaged").iterdir())) == 1
    recovered = hub.metric("edgehub_store_recovered_total")
    assert recovered >= N, f"recovered {recovered} of {N}"
    assert hub.metric("edgehub_store_lost_total") == 0
    pub = Publisher(hub.port)
    clients.append(pub.connect())
    assert pub.publish_and_wait(TOPIC, b"after", qos=1) == 0

    up.start()
    collector.wait_payload(b"after", timeout=120)
    hub.wait_queue_depth(0, timeout=60)
    seqs = [int(p.split(b" ")[0]) for t, p in collector.snapshot() if p != b"after"]
    missing = sorted(set(range(N)) - set(seqs))
    assert not missing, f"{len(missing)} messages not delivered: {missing[:10]}"
    assert_strictly_increasing(first_occurrences(seqs), "first-occurrence order upstream")


def test_damage_found_while_the_hub_runs_is_repaired_by_opening_the_store_again_without_a_restart(
    offline_upstream, hub_factory, clients
):
    """Bytes flipped in a table file while the hub runs are found when the
    forwarder reads the queue: the hub stops everything, opens the store
    again (which repairs it) and goes on, in the same process. Before, the
    forwarder's read failed and was retried for ever, and nothing more was
    delivered until someone restarted the hub."""
    up, collector = offline_upstream()
    hub = hub_factory(up, edge_id="edge-rot")
    fill(hub, clients, payload_bytes=600)
    hub.wait_queue_depth(N)
    wait_until(lambda: tables(hub), 30, "the queue flushed to a table file")
    target = max(tables(hub), key=lambda p: p.stat().st_size)
    flip_middle(target)
    pid = hub.proc.pid

    up.start()
    wait_until(lambda: "opened again to repair it" in hub.log_path.read_text(), 60,
               "the damage found while running")
    wait_until(lambda: hub.log_path.read_text().count("store opened") == 2, 60, "the store opened again")
    hub.wait_ready()
    assert hub.alive() and hub.proc.pid == pid, "the hub process itself must not have ended"
    lost = hub.wait_metric("edgehub_store_lost_total", lambda v: v >= 1, 10, ">= 1")
    assert lost <= N // 10, f"lost {lost}"
    assert list((hub.storage / "damaged").iterdir()), "nothing set aside under damaged/"

    # It keeps serving, and delivers everything but the damaged stretch, in order.
    pub = Publisher(hub.port)
    clients.append(pub.connect())
    assert pub.publish_and_wait(TOPIC, b"after", qos=1) == 0
    collector.wait_payload(b"after", timeout=120)
    hub.wait_queue_depth(0, timeout=60)
    seqs = [int(p.split(b" ")[0]) for t, p in collector.snapshot() if p != b"after"]
    missing = sorted(set(range(N)) - set(seqs))
    assert missing, "nothing is missing, so the damaged block was never read"
    assert len(missing) <= lost, f"{len(missing)} missing but {lost} counted lost: {missing[:10]}"
    assert missing == list(range(missing[0], missing[-1] + 1)), f"missing is not one stretch: {missing[:20]}"
    assert_strictly_increasing(first_occurrences(seqs), "first-occurrence order upstream")
