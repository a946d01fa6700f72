"""A long random fault loop: nothing acknowledged is lost and first copies
stay in order, whatever faults hit the hub and its upstream, in any order.

One ``random.Random(seed)`` chooses the faults and their timings, among:

- ``hub_kill``: the hub is killed (-9) and started again on the same
  storage after a random while; the devices reconnect and go on;
- ``upstream_restart`` (a Mosquitto upstream): it stops (SIGTERM: it saves
  its persistence file, so what it queued for the subscriber survives),
  stays down a random while, and starts again;
- ``upstream_stall`` (Mosquitto): it stops acknowledging without closing
  (SIGSTOP for a random while, then SIGCONT); the hub's keepalive (2 s
  here, 5 s against the cluster) notices it or not, depending on how long
  it lasts;
- ``node_kill`` (a 3-node NATS JetStream cluster, tests/natskit.py): the
  node the hub is connected to is killed (-9) and, after a random while,
  started again on its store;
- ``node_stall`` (NATS): the hub's node is frozen (SIGSTOP) a random while.

Devices publish QoS 1, pipelined, all along.  A durable subscriber on the
upstream (tests/faultkit.py) fsyncs each message before it acknowledges it.
After the faults: every message a device got a PUBACK for was delivered,
each device's first copies arrived in the order it sent them (leaving out
first copies the cluster marked DUP: it had sent them before and lost
that sending itself), the hub is alive and its queue drains to 0.

Parameters (environment):
  EDGEHUB_FAULT_SEED  the seed (default a fixed one); every failure names it
  EDGEHUB_FAULTS      how many faults per test (default: 6 against
                      Mosquitto, each kind twice; 3 against the cluster)
  EDGEHUB_FAULT_RATE  messages a second per device (default 200). A load
                      above what the upstream stores between faults (the
                      NATS cluster here, under kills and stalls, about 400
                      msg/s for all three devices) grows the backlog with
                      every fault, so a long run against the cluster uses
                      a lower one

The long runs and their figures are in docs/reliability.md.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections import Counter
from statistics import median

from faultkit import Device, DurableSink, wait_devices_acked
from helpers import WaitTimeout, assert_strictly_increasing, first_occurrences
from natskit import _module_nats_cluster, nats_cluster  # noqa: F401 (fixtures)

DEFAULT_SEED = 20261129
SEED = int(os.environ.get("EDGEHUB_FAULT_SEED", DEFAULT_SEED))
FAULTS = os.environ.get("EDGEHUB_FAULTS")

DEVICES = 3
RATE = int(os.environ.get("EDGEHUB_FAULT_RATE", 200))  # messages a second per device
WINDOW = 100  # unacknowledged publishes per device
EDGE_ID = "edge-fault"


def log_count(path, pattern: str) -> int:
    try:
        return len(re.findall(pattern, path.read_text(errors="replace")))
    except FileNotFoundError:
        return 0


def stall(proc, secs: float) -> None:
    """Freezes a process (SIGSTOP) for ``secs``: its sockets stay open and
    nothing is answered."""
    proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(secs)  # the fault's length: frozen this long
    finally:
        proc.send_signal(signal.SIGCONT)


class MosquittoUpstream:
    """One Mosquitto: restarted (SIGTERM, persistence saved) or frozen."""

    kinds = ("upstream_restart", "upstream_stall")
    keepalive = 2  # the hub's upstream keepalive, seconds
    # Mosquitto sends a message again (DUP) only after the subscriber
    # reconnects, before anything newer: every first copy is order-checked
    late_redeliveries = False
    # the longest the subscriber may go without a new message after a
    # fault, seconds (a hang detector, not a timing goal)
    recovery_bound = 60

    def __init__(self, up):
        self.up = up
        self.hub_url = up.url
        self.sink_port = up.port

    def inject(self, kind: str, rng: random.Random) -> str:
        up = self.up
        if kind == "upstream_restart":
            down = rng.uniform(0.0, 2.0)
            saves = log_count(up.log_path, r"Saving in-memory database to ")
            up.stop()
            assert log_count(up.log_path, r"Saving in-memory database to ") == saves + 1, \
                "the upstream did not save its persistence file on SIGTERM"
            assert (up.data_dir / "mosquitto.db").is_file(), "no persistence file after the upstream stopped"
            time.sleep(down)  # the fault's length: the upstream stays down this long
            up.start()
            return f"upstream_restart(down {down:.2f}s)"
        if kind == "upstream_stall":
            secs = rng.uniform(0.5, 3.0 * self.keepalive)
            stall(up.proc, secs)
            return f"upstream_stall({secs:.2f}s)"
        raise AssertionError(f"unknown fault kind {kind}")

    def check_running(self, what: str) -> None:
        assert self.up.running(), f"the upstream broker died after {what}"

    def logs(self) -> str:
        return ""

    def resume(self) -> None:
        if self.up.running():
            self.up.proc.send_signal(signal.SIGCONT)


class ClusterUpstream:
    """Three NATS nodes: the hub has n0 and n1 as its addresses, the durable
    subscriber's session is on n2, which no fault touches (a node killed
    or frozen is always the hub's, and it is back before the next fault, so
    two of three nodes keep JetStream's quorum)."""

    kinds = ("node_kill", "node_stall")
    # the hub's upstream keepalive, seconds: NATS can take 4 s to take over
    # an MQTT session while JetStream is busy, and a 2 s keepalive then
    # drops every new link before its first PINGRESP, again and again
    keepalive = 5
    # NATS sends an unacknowledged QoS 1 message again after its ack_wait
    # (30 s) when the node that sent it died, after newer ones
    late_redeliveries = True
    # Seen once in about ten runs: after a node kill, the two nodes left
    # took the hub's connections (CONNACK) and answered nothing for over a
    # minute, though the restarted node had passed its readiness probe.
    # (Waiting longer on such a connection before trying the other node
    # made recovery slower, not faster: 26 to 35 s median against 16.) The
    # bound is a hang detector, not a timing goal: recovery times are
    # printed in the summary.
    recovery_bound = 180

    def __init__(self, cluster):
        self.cluster = cluster
        n0, n1, n2 = cluster.nodes
        self.hub_url = f"{n0.url},{n1.url}"
        self.sink_port = n2.port

    def inject(self, kind: str, rng: random.Random) -> str:
        node = self.cluster.wait_node_of(EDGE_ID, lambda n: True, 20, "a node")
        if kind == "node_kill":
            down = rng.uniform(0.0, 2.0)
            node.kill9()
            time.sleep(down)  # the fault's length: the node stays dead this long
            # A re-election after a kill can take NATS 2.9 over a minute
            # when the meta leader itself was killed.
            self.cluster.restart(node, timeout=120)
            return f"node_kill({node.name}, down {down:.2f}s)"
        if kind == "node_stall":
            secs = rng.uniform(0.5, 3.0 * self.keepalive)
            stall(node.proc, secs)
            return f"node_stall({node.name}, {secs:.2f}s)"
        raise AssertionError(f"unknown fault kind {kind}")

    def check_running(self, what: str) -> None:
        down = [n.name for n in self.cluster.nodes if not n.running()]
        assert not down, f"cluster nodes {down} died after {what}"

    def logs(self) -> str:
        return "\n" + self.cluster.logs()

    def resume(self) -> None:
        for n in self.cluster.nodes:
            if n.running():
                n.proc.send_signal(signal.SIGCONT)


def fault_kinds(rng: random.Random, kinds: tuple[str, ...], n: int) -> list[str]:
    """``n`` kinds in random order, each kind once in every run of
    len(kinds), so that even a short loop has every kind."""
    out: list[str] = []
    while len(out) < n:
        block = list(kinds)
        rng.shuffle(block)
        out += block
    return out[:n]


def test_acknowledged_messages_survive_a_seeded_random_loop_of_hub_kills_upstream_restarts_and_stalls_in_order(
    upstream_factory, hub_factory, tmp_path, request
):
    up = upstream_factory()
    up.start()
    fault_loop(MosquittoUpstream(up), int(FAULTS or 6), hub_factory, tmp_path, request)


def test_acknowledged_messages_survive_a_seeded_random_loop_of_hub_kills_and_cluster_node_kills_and_stalls_in_order(
    nats_cluster, hub_factory, tmp_path, request  # noqa: F811 (fixture)
):
    fault_loop(ClusterUpstream(nats_cluster), int(FAULTS or 3), hub_factory, tmp_path, request)


def fault_loop(target, faults: int, hub_factory, tmp_path, request) -> None:
    rng = random.Random(SEED)
    history: list[str] = []
    replay = f"EDGEHUB_FAULT_SEED={SEED} EDGEHUB_FAULTS={faults} EDGEHUB_FAULT_RATE={RATE} pytest {request.node.nodeid}"
    t0 = time.monotonic()

    sink = DurableSink(tmp_path, target.sink_port)
    request.node._edgehub_logs = getattr(request.node, "_edgehub_logs", []) + [("durable subscriber", sink)]
    devices: list[Device] = []
    try:
        sink.start(timeout=30)
        hub = hub_factory(target.hub_url, edge_id=EDGE_ID,
                          extra_args=["--upstream-keep-alive-secs", str(target.keepalive)])
        hub.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 30, "== 1")
        devices = [Device(f"fd{k}", hub.port, rate=RATE, window=WINDOW) for k in range(DEVICES)]
        for d in devices:
            d.start()
        try:
            summary = run_loop(rng, target, faults, hub, sink, devices, history, t0)
        except AssertionError as exc:
            raise AssertionError(f"[replay: {replay}] {exc}\nfaults so far: {history}{target.logs()}") from None
        print(f"\nfault loop ({type(target).__name__}): seed={SEED} {summary}")
    finally:
        for d in devices:
            d.halt.set()
        target.resume()
        sink.stop()


def run_loop(rng, target, faults: int, hub, sink: DurableSink, devices: list[Device], history: list[str],
             t0: float) -> str:
    # the load is flowing end to end before the first fault
    wait_devices_acked(devices, [0] * len(devices), 50, 30, "the first acknowledgements")
    wait_delivered_from(sink, {d.device: 0 for d in devices}, 30, "the first deliveries upstream")

    kinds = fault_kinds(rng, ("hub_kill",) + target.kinds, faults)
    stalls_noticed = 0
    recovery: list[float] = []  # from each fault's end to a message sent after it of every device through
    for i, kind in enumerate(kinds, 1):
        # a random stretch of load between faults, counted in acknowledgements
        more = rng.randint(100, 600)
        wait_devices_acked(devices, [d.acked_count() for d in devices], more, 60,
                           f"{more} more acknowledgements per device before fault {i}")
        reconnects = hub.metric("edgehub_upstream_reconnects_total")

        if kind == "hub_kill":
            down = rng.uniform(0.0, 1.0)
            hub.kill9()
            time.sleep(down)  # the fault's length: the hub stays dead this long
            hub.start()
            what = f"hub_kill(down {down:.2f}s)"
        else:
            what = target.inject(kind, rng)
        history.append(what)

        # recovered: everything runs, and every device's messages sent after
        # the fault reach the subscriber
        assert hub.alive(), f"the hub died after fault {i} {what}"
        target.check_running(f"fault {i} {what}")
        assert sink.alive(), f"the durable subscriber died after fault {i} {what}"
        marks = {d.device: d.next_seq for d in devices}
        ended = time.monotonic()
        # What queued meanwhile drains first, at the upstream's pace, which
        # under faults can be below the load's: the wait fails when
        # deliveries stop, not when a backlog takes long (the next fault
        # waits for it: that paces the faults).
        wait_delivered_from(sink, marks, target.recovery_bound, f"messages sent after fault {i} {what} upstream")
        recovery.append(time.monotonic() - ended)
        # progress of a long run (shown with -s)
        print(f"fault {i}/{faults} {what}: messages sent after it through after {recovery[-1]:.1f}s, "
              f"queue {hub.metric('edgehub_queue_depth'):.0f}, {time.monotonic() - t0:.0f}s in", flush=True)
        if kind.endswith("_stall") and hub.metric("edgehub_upstream_reconnects_total") > reconnects:
            stalls_noticed += 1
            history[-1] += " [hub reconnected]"

    # the load stops; everything acknowledged must arrive
    for d in devices:
        d.stop()
    acked = {d.device: set(d.acked) for d in devices}
    refused = {d.device: d.refused for d in devices if d.refused}
    assert not refused, f"publishes refused: { {k: list(v.items())[:5] for k, v in refused.items()} }"
    total_acked = sum(len(s) for s in acked.values())

    def all_delivered():
        sink.refresh()
        return all(acked[dev] <= sink.distinct.get(dev, set()) for dev in acked)

    try:
        wait_progressing(sink, all_delivered, target.recovery_bound, "every acknowledged message at the subscriber")
    except WaitTimeout:
        missing = {dev: sorted(acked[dev] - sink.distinct.get(dev, set())) for dev in acked}
        lost = sum(len(m) for m in missing.values())
        raise AssertionError(
            f"{lost} of {total_acked} acknowledged messages never arrived, e.g. "
            f"{ {dev: m[:10] for dev, m in missing.items() if m} }; "
            f"dead-letter depth {dead_letter_depth(hub)}; subscriber sessions lost {sink.sessions_lost()}"
        ) from None

    # First copies in the order each device sent them. Against a broker
    # that redelivers late, a first copy that came with DUP set is left out:
    # the broker had sent it to the subscriber before and lost that sending
    # itself, so where it lands says nothing about the order the hub sent in.
    for dev, seqs in sink.seqs.items():
        redelivered = sink.first_redelivered.get(dev, set()) if target.late_redeliveries else set()
        firsts = [s for s in first_occurrences(seqs) if s not in redelivered]
        try:
            assert_strictly_increasing(firsts, f"device {dev}: first copies upstream")
        except AssertionError as exc:
            dup = sink.first_redelivered.get(dev, set())
            late = [b for a, b in zip(firsts, firsts[1:]) if b <= a]
            raise AssertionError(
                f"{exc}; {len([s for s in late if s in dup])} of the {len(late)} late first copies came with "
                f"DUP set (the broker had sent them before): {late[:10]}"
            ) from None
    redelivered_firsts = sum(len(s) for s in sink.first_redelivered.values())
    assert sink.sessions_lost() == 0, "the upstream lost the durable subscriber's session (test setup problem)"
    assert hub.alive(), "the hub is not running at the end"
    hub.wait_queue_depth(0, timeout=60)
    # An honest limit of the poison-message policy (docs/architecture.md):
    # a link dropped `refusals_before_dead_letter` times in a row while a
    # suspect is alone in flight sets that message aside. It is reported,
    # not failed: what counts is that it was delivered (checked above).
    dead_letters = int(hub.metric("edgehub_dead_letter_depth"))

    by_kind = Counter(h.split("(")[0] for h in history)
    delivered = sink.delivered_count()
    return (
        f"faults={len(history)} ({', '.join(f'{k}={n}' for k, n in sorted(by_kind.items()))}; "
        f"stalls after which the hub had reconnected={stalls_noticed}) "
        f"acked={total_acked} delivered={delivered} duplicates={sink.records - delivered} "
        f"first_copies_redelivered_by_the_broker={redelivered_firsts} "
        f"dead_letters={dead_letters} device_connections={sum(d.connections for d in devices)} "
        f"recovery_s(median/max)={median(recovery or [0]):.1f}/{max(recovery, default=0):.1f} "
        f"elapsed={time.monotonic() - t0:.1f}s"
    )


# However long a backlog takes to drain, no wait is longer than this.
DRAIN_CAP = 1800


def wait_progressing(sink: DurableSink, done, stall_bound: float, desc: str, cap: float = DRAIN_CAP) -> None:
    """Waits until ``done()`` (which refreshes ``sink``) holds while the
    subscriber keeps receiving: fails when ``stall_bound`` seconds pass
    without a new record, or after ``cap``."""
    start = time.monotonic()
    records, at = sink.records, start
    while not done():
        now = time.monotonic()
        if sink.records > records:
            records, at = sink.records, now
        if now - at > stall_bound:
            raise WaitTimeout(f"no new message at the subscriber for {stall_bound:.0f}s while waiting for {desc}")
        if now - start > cap:
            raise WaitTimeout(f"still receiving but not done after {cap:.0f}s waiting for {desc}")
        time.sleep(0.05)


def wait_delivered_from(sink: DurableSink, marks: dict[str, int], stall_bound: float, desc: str) -> None:
    """Waits until each device has a message numbered at least its mark at
    the subscriber (the path from that device to the upstream works), while
    deliveries go on (see ``wait_progressing``)."""
    def check():
        sink.refresh()
        return all(sink.max_seq.get(dev, -1) >= mark for dev, mark in marks.items())

    try:
        wait_progressing(sink, check, stall_bound, desc)
    except WaitTimeout as exc:
        raise WaitTimeout(f"{exc}; wanted {marks}, highest delivered {sink.max_seq}") from None


def dead_letter_depth(hub) -> float | None:
    """For failure messages: the hub may be down."""
    try:
        return hub.metric("edgehub_dead_letter_depth")
    except Exception:  # noqa: BLE001
        return None
