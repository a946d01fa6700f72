"""Credential-less clients: welcome before any scope exists (as before the
feature), refused once a scope exists (3.1.1 return code 5, MQTT 5 0x87),
unless the hub runs with --allow-anonymous."""

from __future__ import annotations

import paho.mqtt.client as mqtt

from authkit import (
    EDGE_ID,
    V3_ACCEPTED,
    V3_BAD_CREDENTIALS,
    V3_NOT_AUTHORIZED,
    V5_NOT_AUTHORIZED,
    Identity,
    auth_args,
    new_key,
    publish_scope,
    raw_connect,
    refused,
    sas_token,
    try_connect,
    wait_scope,
)
from helpers import Publisher


def test_before_any_scope_anyone_connects_and_once_a_scope_arrives_credential_less_clients_are_refused(
    upstream, collector_factory, hub_factory, clients
):
    collector = collector_factory(upstream)
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 15, "upstream connected (no scope published)")
    assert hub.metric("edgehub_scope_identities") == 0

    assert raw_connect(hub.port, clients, "anon-v3") == V3_ACCEPTED
    assert raw_connect(hub.port, clients, "anon-v5", level=5) == 0
    # "anyone", as before the feature: credentials are not checked yet either
    assert raw_connect(hub.port, clients, "whoever", "some user", "some password") == V3_ACCEPTED
    pub = Publisher(hub.port, client_id="anon-sensor")
    clients.append(pub.connect())
    assert pub.publish_and_wait("devices/anon-sensor/messages/events/", b"pre-scope") == 0
    collector.wait_payload(b"pre-scope", 20)
    pub.close()
    # a credential-less session open when the first scope arrives (no automatic reconnect)
    rc, early = try_connect(hub.port, clients, client_id="anon-early")
    assert rc == V3_ACCEPTED

    child1 = Identity.child("child1")
    publish_scope(upstream, [child1])
    wait_scope(hub, 1)
    before = refused(hub)
    # docs/auth.md: existing credential-less sessions are closed when the first scope arrives
    early.wait_closed(15, "the hub to close a credential-less session once the scope exists")

    rc3 = raw_connect(hub.port, clients, "anon-v3")
    rc5 = raw_connect(hub.port, clients, "anon-v5", level=5)
    assert (rc3, rc5) == (V3_NOT_AUTHORIZED, V5_NOT_AUTHORIZED), (
        f"credential-less CONNECT after the scope: v3.1.1 {rc3}, v5 {rc5 if rc5 is None else hex(rc5)}; "
        f"expected 5 and 0x87"
    )
    hub.wait_metric("edgehub_auth_refused_total", lambda v: v >= before + 2, 10, "counts both refusals")
    assert raw_connect(hub.port, clients, "child1", child1.username, child1.token()) == V3_ACCEPTED
    assert hub.alive()


def test_with_allow_anonymous_credential_less_clients_still_connect_once_a_scope_exists_but_bad_credentials_do_not(
    upstream, collector_factory, hub_factory, clients
):
    collector = collector_factory(upstream)
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args(allow_anonymous=True))
    child1 = Identity.child("child1")
    publish_scope(upstream, [child1])
    wait_scope(hub, 1)

    assert raw_connect(hub.port, clients, "anon-v3") == V3_ACCEPTED
    assert raw_connect(hub.port, clients, "anon-v5", level=5) == 0
    assert raw_connect(hub.port, clients, "child1", child1.username, child1.token()) == V3_ACCEPTED
    # credentials that are presented are checked
    rc = raw_connect(hub.port, clients, "child1", child1.username, sas_token(new_key(), "child1"))
    assert rc == V3_BAD_CREDENTIALS, f"a forged token with --allow-anonymous: CONNACK {rc}, expected 4"
    ghost = Identity.child("ghost")
    rc = raw_connect(hub.port, clients, "ghost", ghost.username, ghost.token())
    assert rc == V3_NOT_AUTHORIZED, f"an identity outside the scope with --allow-anonymous: CONNACK {rc}, expected 5"

    # docs/auth.md: an anonymous client may use plain topics only
    rc, anon = try_connect(hub.port, clients, protocol=mqtt.MQTTv5, client_id="anon-plain")
    assert rc == 0
    assert anon.publish_result("sensors/room1/temp", b"21") == 0, "anonymous publish to a plain topic"
    got = anon.publish_result("devices/child1/messages/events/", b"posing as child1")
    assert got == V5_NOT_AUTHORIZED, f"anonymous publish as child1: {got}, expected PUBACK 0x87"
    codes = anon.subscribe_result(["sensors/#", "devices/child1/messages/devicebound/#", "#"])
    assert codes is not None and codes[0] < 0x80 and codes[1:] == [V5_NOT_AUTHORIZED, V5_NOT_AUTHORIZED], codes
    assert anon.publish_result("sensors/room1/temp", b"22") == 0
    rc, real = try_connect(hub.port, clients, **child1.credentials())
    assert rc == V3_ACCEPTED
    assert real.publish_result("devices/child1/messages/events/", b"the real child1") == 0
    got = collector.wait_payload(b"the real child1", 20)
    assert all(p != b"posing as child1" for _, p in got), "the anonymous client's refused telemetry went upstream"
    assert hub.alive()
