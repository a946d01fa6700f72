"""A gateway's clock lies: boards without a real-time clock boot in 1970 and
jump when NTP arrives; operators set the date by hand.  Ages and TTLs are
measured on the hub clock (the wall clock read at start, then the monotonic
clock, never before what the store recorded), so a jump expires nothing.

The hub runs under libfaketime (Debian's libfaketime) with its offset read
from a file on every call, so the test moves the hub's wall clock while it
runs; the monotonic clock is left alone, as NTP leaves it."""

from pathlib import Path

import pytest

from helpers import Publisher, wait_until

TOPIC = "devices/d1/messages/events/"
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


@pytest.fixture
def fake_clock(tmp_path):
    """(env for the hub, set(offset)): the hub's wall clock is the real one
    plus the offset last set, e.g. "+5h" or "-5h"."""
    if not LIBFAKETIME.exists():
        pytest.fail(f"{LIBFAKETIME} is missing: install Debian's libfaketime (tests/run-all.sh does)")
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    env = {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    return env, lambda value: offset.write_text(value + "\n")


def publish(hub, clients, first: int, n: int) -> None:
    pub = Publisher(hub.port, inflight=100)
    clients.append(pub.connect())
    for i in range(first, first + n):
        pub.publish(TOPIC, str(i).encode(), qos=1, key=i)
    pub.wait_results(n, timeout=30)
    assert len(pub.acked) == n, f"refused: {[k for k, rc in pub.results.items() if rc >= 0x80][:5]}"
    pub.close()


def delivered(collector, n: int) -> list[int]:
    msgs = collector.wait_distinct_payloads({str(i).encode() for i in range(n)}, timeout=60)
    return [int(p) for _, p in msgs]


def test_a_wall_clock_that_jumps_hours_ahead_while_the_hub_runs_expires_no_stored_message(
    fake_clock, offline_upstream, hub_factory, clients
):
    env, set_offset = fake_clock
    up, collector = offline_upstream()
    hub = hub_factory(up, edge_id="edge-clock", ttl_secs=3600, env=env)
    publish(hub, clients, 0, 100)
    hub.wait_queue_depth(100)

    set_offset("+5h")  # NTP arrives, or someone sets the date
    publish(hub, clients, 100, 10)
    up.start()
    assert sorted(set(delivered(collector, 110))) == list(range(110))
    hub.wait_queue_depth(0, timeout=30)
    assert hub.metric("edgehub_messages_expired_total") == 0


def test_a_hub_restarted_on_a_clock_hours_behind_expires_nothing_when_the_clock_comes_right(
    fake_clock, offline_upstream, hub_factory, clients
):
    env, set_offset = fake_clock
    up, collector = offline_upstream()
    hub = hub_factory(up, edge_id="edge-clock", ttl_secs=3600, env=env)
    publish(hub, clients, 0, 50)
    hub.wait_queue_depth(50)
    assert hub.terminate() == 0

    # The board reboots without a real-time clock: its clock is behind.
    set_offset("-5h")
    hub.start()
    assert "wall clock is behind" in hub.log_path.read_text()
    publish(hub, clients, 50, 50)
    hub.wait_queue_depth(100)

    set_offset("+0")  # NTP arrives: the clock jumps 5 hours ahead
    up.start()
    assert sorted(set(delivered(collector, 100))) == list(range(100))
    hub.wait_queue_depth(0, timeout=30)
    assert hub.metric("edgehub_messages_expired_total") == 0


def test_messages_do_outlive_their_ttl_on_the_hub_clock(fake_clock, offline_upstream, hub_factory, clients):
    """The counterpart: a TTL still expires what is old on the hub clock, so
    the two tests above would fail if TTLs were not applied at all."""
    env, _ = fake_clock
    up, collector = offline_upstream()
    hub = hub_factory(up, edge_id="edge-clock", ttl_secs=1, env=env)
    publish(hub, clients, 0, 20)
    hub.wait_metric("edgehub_messages_expired_total", lambda v: v == 20, 30, "== 20")
    up.start()
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 30, "== 1")
    publish(hub, clients, 1000, 1)
    collector.wait_payload(b"1000", timeout=30)
    assert not [p for _, p in collector.snapshot() if p != b"1000"]
