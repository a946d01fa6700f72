"""The device scope synced from the cloud (a retained document on
`edges/{edge_id}/scope` upstream): which identities it accepts, key rotation
and removal on re-sync, and re-reading it on every upstream (re)connect."""

from __future__ import annotations

import paho.mqtt.client as mqtt

from authkit import (
    EDGE_ID,
    V3_ACCEPTED,
    V3_BAD_CREDENTIALS,
    V3_NOT_AUTHORIZED,
    V5_BAD_CREDENTIALS,
    V5_NOT_AUTHORIZED,
    Identity,
    auth_args,
    log_since,
    log_size,
    publish_scope,
    refused,
    try_connect,
    wait_log,
    wait_scope,
)


def test_a_resynced_scope_rotates_keys_at_once_and_removes_a_device_closing_its_open_connection(
    upstream, hub_factory, clients
):
    child1, child2, mod1 = Identity.child("child1"), Identity.child("child2"), Identity.module("mod1")
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(upstream, [child1, child2, mod1])
    wait_scope(hub, 3)

    rc, c1 = try_connect(hub.port, clients, **child1.credentials())
    assert rc == V3_ACCEPTED, f"child1 with its key: CONNACK {rc}"
    c1.close()
    rc, c2 = try_connect(hub.port, clients, **child2.credentials())
    assert rc == V3_ACCEPTED, f"child2 with its key: CONNACK {rc}"
    assert c2.publish_result("devices/child2/messages/events/", b"before removal") == 0
    rc, m1 = try_connect(hub.port, clients, protocol=mqtt.MQTTv5, **mod1.credentials())
    assert rc == 0, f"mod1 (v5) with its key: CONNACK {rc:#x}"
    # child1 stays connected with its old key across the rotation (what happens to it is not specified)
    rc, c1_old = try_connect(hub.port, clients, **child1.credentials())
    assert rc == V3_ACCEPTED

    # the cloud rotates child1's keys and removes child2
    new1 = child1.rotated()
    before = refused(hub)
    publish_scope(upstream, [new1])
    wait_scope(hub, 1)

    c2.wait_closed(15, "the hub to close the connection of child2, removed from the scope")
    m1.wait_closed(15, "the hub to close the (v5) connection of module mod1, removed from the scope")
    # docs/auth.md: MQTT 5 sessions of removed identities get DISCONNECT 0x87
    rc = getattr(m1.disconnect_rc, "value", m1.disconnect_rc)
    assert rc == 0x87, f"mod1 (v5) was disconnected with {m1.disconnect_rc!r}, expected DISCONNECT 0x87"
    print(f"child1's connection made with the old key before the rotation: "
          f"{'closed' if c1_old.closed.is_set() else 'still open'} after the re-sync")

    results = {}
    results["child2 reconnects (v3.1.1)"] = (try_connect(hub.port, clients, **child2.credentials())[0],
                                            V3_NOT_AUTHORIZED)
    results["child2 reconnects (v5)"] = (try_connect(hub.port, clients, protocol=mqtt.MQTTv5,
                                                     **child2.credentials())[0], V5_NOT_AUTHORIZED)
    results["mod1 reconnects (v3.1.1)"] = (try_connect(hub.port, clients, **mod1.credentials())[0],
                                          V3_NOT_AUTHORIZED)
    results["child1 old primary key (v3.1.1)"] = (try_connect(hub.port, clients, **child1.credentials())[0],
                                                 V3_BAD_CREDENTIALS)
    results["child1 old secondary key (v3.1.1)"] = (
        try_connect(hub.port, clients, **child1.credentials(secondary=True))[0], V3_BAD_CREDENTIALS)
    results["child1 old primary key (v5)"] = (try_connect(hub.port, clients, protocol=mqtt.MQTTv5,
                                                          **child1.credentials())[0], V5_BAD_CREDENTIALS)
    bad = {k: f"got {got:#x}, expected {want:#x}" for k, (got, want) in results.items() if got != want}
    assert not bad, f"refusals after the re-sync are wrong: {bad}"
    n = len(results)
    hub.wait_metric("edgehub_auth_refused_total", lambda v: v >= before + n, 10, f"counts {n} refusals")
    assert refused(hub) == before + n, f"refusal counter {before} -> {refused(hub)}, expected +{n}"

    for secondary in (False, True):
        rc, c = try_connect(hub.port, clients, **new1.credentials(secondary=secondary))
        assert rc == V3_ACCEPTED, f"child1 with its new {'secondary' if secondary else 'primary'} key: CONNACK {rc}"
        assert c.publish_result("devices/child1/messages/events/", b"new key") == 0
        c.close()
    assert hub.alive()


def test_an_edge_identity_or_a_child_of_another_parent_is_rejected_while_the_rest_of_the_scope_applies(
    upstream, hub_factory, clients
):
    child1, mod1 = Identity.child("child1"), Identity.module("mod1")
    edge2 = Identity("edge2", parent=EDGE_ID, edge=True)
    stranger = Identity.child("child9", edge_id="some-other-edge")
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    offset = log_size(hub)
    publish_scope(upstream, [child1, edge2, stranger, mod1])
    wait_scope(hub, 2)
    wait_log(hub, offset, r"edge2", 10, "a log line naming the rejected edge identity edge2")

    assert try_connect(hub.port, clients, **child1.credentials())[0] == V3_ACCEPTED
    assert try_connect(hub.port, clients, **mod1.credentials())[0] == V3_ACCEPTED
    got = try_connect(hub.port, clients, **edge2.credentials())[0]
    assert got == V3_NOT_AUTHORIZED, f"edge device edge2 as a child: CONNACK {got}, expected 5"
    got = try_connect(hub.port, clients, **stranger.credentials())[0]
    assert got == V3_NOT_AUTHORIZED, f"child of another parent: CONNACK {got}, expected 5"
    print("hub log about the scope:\n" + "\n".join(
        ln for ln in log_since(hub, offset).splitlines() if "scope" in ln.lower() or "edge2" in ln))


def test_the_scope_is_read_again_on_every_upstream_reconnect(upstream_factory, hub_factory, clients):
    """Two nodes of the cloud hold different scopes; the hub fails over from
    the first to the second and must apply the second's document."""
    child1, child2, child3 = (Identity.child(f"child{i}") for i in (1, 2, 3))
    a, b = upstream_factory(), upstream_factory()
    b.start()
    publish_scope(b, [child1, child2, child3])  # retained on b (saved in its persistence)
    b.stop()
    a.start()
    publish_scope(a, [child1])

    hub = hub_factory(f"{a.url},{b.url}", edge_id=EDGE_ID, extra_args=auth_args())
    wait_scope(hub, 1)
    assert try_connect(hub.port, clients, **child3.credentials())[0] == V3_NOT_AUTHORIZED

    b.start()
    a.stop()
    wait_scope(hub, 3, timeout=40)
    assert try_connect(hub.port, clients, **child3.credentials())[0] == V3_ACCEPTED
