"""`edgehub cloud` against a clustered broker that is not Mosquitto: a
3-node NATS JetStream cluster with MQTT listeners (natskit). Each command
talks to a different node than the hub and the one before it, so what the
CLI publishes retained (scope documents) must be replicated by the cluster
and what it subscribes to (telemetry) must cross it.

NATS 2.9 refuses MQTT topics with a `.` (its subject separator), so the ids
and property names here have none (docs/own-broker.md).
"""

from __future__ import annotations

from authkit import V3_ACCEPTED, V3_BAD_CREDENTIALS, auth_args, try_connect, wait_scope
from cloudkit import (  # noqa: F401 (_cloud_binary: the autouse fixture)
    Tail,
    _cloud_binary,
    cloud,
    creds,
    published_version,
    scope_list,
    token,
)
from helpers import RawClient
from natskit import _module_nats_cluster, nats_cluster  # noqa: F401

EDGE = "gw-nats"
# the client id every scope change connects with (cloud::SCOPE_WRITER)
SCOPE_WRITER = "edgehub-cloud-scope-writer"


def test_the_cli_provisions_an_edge_and_tails_its_telemetry_through_a_nats_cluster_one_node_per_command(
    nats_cluster, hub_factory, clients
):
    n0, n1, n2 = nats_cluster.nodes
    assert "scope version 1 published" in cloud(n0, "scope", "add-edge", EDGE).stderr
    r = cloud(n1, "scope", "add", "sensor-n", "--parent", EDGE)
    assert published_version(r, EDGE) == 2
    cloud(n2, "scope", "add", f"{EDGE}/filter")
    listed = sorted((e["identity"], e["parent"], e["version"]) for e in scope_list(n0, "--edge", EDGE))
    assert listed == [(f"{EDGE}/filter", None, 3), ("sensor-n", EDGE, 3)], listed

    hub = hub_factory(n1.url, edge_id=EDGE, extra_args=auth_args())
    wait_scope(hub, 2)
    old_token = token(n2, "sensor-n")
    rc, device = try_connect(hub.port, clients, **creds("sensor-n", old_token))
    assert rc == V3_ACCEPTED, f"sensor-n with the token the CLI printed: CONNACK {rc}"

    telemetry = Tail(n0, "--device", "sensor-n", "--count", "2", "--for-secs", "60")
    try:
        telemetry.wait_listening()
        assert device.publish_result("devices/sensor-n/messages/events/site=north", b'{"temp": 19}') == 0
        assert device.publish_result("devices/sensor-n/messages/events/", b"second") == 0
        code, lines = telemetry.finish(timeout=60)
    finally:
        telemetry.close()
    assert code == 0, telemetry.stderr
    assert [(ln["device"], ln["module"], ln.get("body"), ln["properties"]) for ln in lines] == [
        ("sensor-n", None, '{"temp": 19}', {"site": "north"}),
        ("sensor-n", None, "second", {}),
    ], lines

    # a key rotated through yet another node reaches the hub: the old
    # token stops working, a new one works
    r = cloud(n2, "scope", "rotate-key", "sensor-n", "--which", "both")
    assert published_version(r, EDGE) == 4
    hub.wait_metric("edgehub_scope_version", lambda v: v == 4, 30, "== 4 (the rotated scope applied)")
    assert try_connect(hub.port, clients, **creds("sensor-n", old_token))[0] == V3_BAD_CREDENTIALS
    assert try_connect(hub.port, clients, **creds("sensor-n", token(n0, "sensor-n")))[0] == V3_ACCEPTED
    assert hub.alive()


def test_a_scope_change_whose_connect_the_broker_closes_is_tried_again_and_lands(nats_cluster, clients):
    """NATS holds a CONNECT for a client id that was taken over less than a
    second before, then closes it without a CONNACK; a node that learns late
    that the session moved to it does the same. Two connections with the
    writer's client id, the second taking over the first, put the id in that
    state: the change's first CONNECT is closed, and it lands on the next."""
    n0 = nats_cluster.nodes[0]
    first, second = RawClient(n0.port), RawClient(n0.port)
    clients.extend([first, second])
    assert first.connect(SCOPE_WRITER)[2][1] == 0
    assert second.connect(SCOPE_WRITER)[2][1] == 0
    first.read_until_closed(timeout=10)
    assert first.closed, "NATS did not close the client whose id was taken over"

    r = cloud(n0, "scope", "add-edge", "gw-nats-jailed")
    assert "closed the scope writer's session" in r.stderr and "trying again" in r.stderr, (
        f"the first CONNECT was not closed (the test did not reach the case):\n{r.stderr}"
    )
    assert published_version(r, "gw-nats-jailed") == 1
    listed = scope_list(nats_cluster.nodes[1], "--edge", "gw-nats-jailed")
    assert [(e["edge"], e["version"]) for e in listed] == [("gw-nats-jailed", 1)], listed
