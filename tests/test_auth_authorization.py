"""What an authenticated device or module may publish and subscribe to.

Allowed: publish to its own telemetry, `$iothub/twin/...`, `$iothub/methods/...`;
subscribe to its own devicebound / module inputs, `$iothub/twin/res/#`,
`$iothub/twin/PATCH/properties/desired/#`, `$iothub/methods/POST/#`.
Anything else: MQTT 3.1.1 publish closes the connection, SUBSCRIBE gets 0x80
for that filter; MQTT 5 publish gets PUBACK 0x87, SUBSCRIBE 0x87."""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest

from authkit import (
    EDGE_ID,
    SUBACK_FAILURE_V3,
    V3_ACCEPTED,
    V5_NOT_AUTHORIZED,
    Identity,
    auth_args,
    publish_scope,
    try_connect,
    wait_message,
    wait_scope,
)

DEV_A, DEV_B = Identity.child("devA"), Identity.child("devB")
MOD_X, MOD_Y = Identity.module("modX"), Identity.module("modY")

OWN_PUBLISH = {
    "devA": ["devices/devA/messages/events/", "devices/devA/messages/events/temp=21&unit=C",
             "$iothub/twin/GET/?$rid=1", "$iothub/twin/PATCH/properties/reported/?$rid=2",
             "$iothub/methods/res/200/?$rid=3", "local/devA/temp", "local/devA"],
    "modX": [f"devices/{EDGE_ID}/modules/modX/messages/events/", "$iothub/twin/GET/?$rid=4",
             f"local/{EDGE_ID}/modX/state"],
}
FOREIGN_PUBLISH = {
    "devA": [
        "devices/devB/messages/events/",                          # as device B
        "devices/devB/messages/events/as=B",
        f"devices/{EDGE_ID}/modules/modX/messages/events/",       # as a module
        f"devices/{EDGE_ID}/modules/modX/inputs/input1",          # into a module's input
        f"devices/{EDGE_ID}/messages/events/",                    # as the edge device
        "devices/devA/messages/devicebound/fake",                 # its own cloud-to-device topic
        "plain/topic",                                            # a plain topic
        "devices/devAB/messages/events/",                         # a device id with devA as prefix
        "devices/devA/messages/eventsX",                          # not the telemetry topic
        "local/devB/temp",                                        # device B's local topics
        "local/devAB/temp",                                       # a device id with devA as prefix
        "local/alarm",                                            # outside any identity's corner
        f"local/{EDGE_ID}/modX/state",                            # a module's local topics
    ],
    "modX": [
        f"devices/{EDGE_ID}/modules/modY/messages/events/",       # as another module
        f"devices/{EDGE_ID}/modules/modY/inputs/input1",
        f"devices/{EDGE_ID}/messages/events/",
        "devices/devA/messages/events/",
        "plain/topic",
        f"devices/{EDGE_ID}/modules/modXY/messages/events/",      # a module id with modX as prefix
        "local/devA/temp",                                        # a device's local topics
        f"local/{EDGE_ID}/modY/state",                            # another module's
    ],
}
# (filter, allowed)
SUBSCRIPTIONS = {
    "devA": [
        ("devices/devA/messages/devicebound/#", True),
        ("devices/devB/messages/devicebound/#", False),
        ("#", False),
        (f"devices/{EDGE_ID}/modules/modX/inputs/#", False),
        ("$iothub/twin/res/#", True),
        ("devices/+/messages/devicebound/#", False),
        ("$iothub/twin/PATCH/properties/desired/#", True),
        ("$iothub/methods/POST/#", True),
        ("plain/#", False),
        ("devices/devB/messages/events/#", False),
        ("devices/devAB/messages/devicebound/#", False),
        ("+/devA/messages/devicebound/#", False),
        ("$iothub/#", False),
        ("local/#", True),
        ("local/+/temp", True),
        ("+/devB/temp", False),
    ],
    "modX": [
        (f"devices/{EDGE_ID}/modules/modX/inputs/#", True),
        (f"devices/{EDGE_ID}/modules/modY/inputs/#", False),
        (f"devices/{EDGE_ID}/modules/+/inputs/#", False),
        ("$iothub/methods/POST/#", True),
        ("$iothub/twin/res/#", True),
        ("devices/devA/messages/devicebound/#", False),
        ("#", False),
        (f"devices/{EDGE_ID}/modules/modXY/inputs/#", False),
        ("local/#", True),
    ],
}
WHO = {"devA": DEV_A, "modX": MOD_X}


@pytest.fixture
def scoped_hub(upstream, collector_factory, hub_factory):
    collector = collector_factory(upstream)
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(upstream, [DEV_A, DEV_B, MOD_X, MOD_Y])
    wait_scope(hub, 4)
    return hub, collector


def own_telemetry(who: str) -> str:
    return OWN_PUBLISH[who][0]


@pytest.mark.parametrize("who", ["devA", "modX"])
def test_v311_publishing_outside_its_own_topics_closes_the_connection_and_nothing_foreign_goes_upstream(
    scoped_hub, clients, who
):
    hub, collector = scoped_hub
    ident = WHO[who]
    refusal_payloads = []
    problems = []
    for i, topic in enumerate(FOREIGN_PUBLISH[who]):
        for qos in (1, 0, 2):
            rc, c = try_connect(hub.port, clients, **ident.credentials())
            assert rc == V3_ACCEPTED, f"{who}: CONNACK {rc}"
            assert c.publish_result(own_telemetry(who), f"ok-{i}-{qos}".encode()) == 0
            payload = f"forbidden-{who}-{i}-{qos}".encode()
            refusal_payloads.append(payload)
            if qos in (1, 2):
                got = c.publish_result(topic, payload, qos=qos)
                if got is not None:
                    problems.append(f"QoS {qos} publish to {topic!r}: acknowledged ({got:#x}) instead of a closed "
                                    "connection")
                    continue
            else:
                c.publish(topic, payload, qos=0)
            try:
                c.wait_closed(10, f"the hub to close the connection after a QoS {qos} publish to {topic!r}")
            except AssertionError as exc:
                problems.append(str(exc))
            c.close()
    assert not problems, "\n".join(problems)

    # its own topics work and keep the connection open
    rc, c = try_connect(hub.port, clients, **ident.credentials())
    assert rc == V3_ACCEPTED
    for j, topic in enumerate(OWN_PUBLISH[who]):
        got = c.publish_result(topic, f"own-{j}".encode())
        assert got is not None and got < 0x80, f"{who}: publish to its own {topic!r}: {got} (None = connection closed)"
    sentinel = f"sentinel-{who}".encode()
    assert c.publish_result(own_telemetry(who), sentinel) == 0
    got = collector.wait_payload(sentinel, 30)
    leaked = [(t, p) for t, p in got if p in refusal_payloads]
    assert not leaked, f"refused publishes reached the upstream: {leaked}"
    assert hub.alive()


@pytest.mark.parametrize("who", ["devA", "modX"])
def test_v5_publishing_outside_its_own_topics_gets_puback_0x87_and_the_connection_stays_open(
    scoped_hub, clients, who
):
    hub, collector = scoped_hub
    ident = WHO[who]
    rc, c = try_connect(hub.port, clients, protocol=mqtt.MQTTv5, **ident.credentials())
    assert rc == 0, f"{who} v5: CONNACK {rc:#x}"
    wrong = {}
    payloads = []
    for i, topic in enumerate(FOREIGN_PUBLISH[who]):
        payload = f"forbidden5-{who}-{i}".encode()
        payloads.append(payload)
        got = c.publish_result(topic, payload)
        if got != V5_NOT_AUTHORIZED:
            wrong[topic] = "connection closed" if got is None else f"PUBACK {got:#x}"
            if got is None:
                break
    assert not wrong, f"{who}: expected PUBACK 0x87 for each foreign topic, got {wrong}"
    assert hub.metric("edgehub_authz_refused_total") == len(FOREIGN_PUBLISH[who])
    for j, topic in enumerate(OWN_PUBLISH[who]):
        got = c.publish_result(topic, f"own5-{j}".encode())
        assert got is not None and got < 0x80, f"{who}: publish to its own {topic!r}: {got} (None = connection closed)"
    sentinel = f"sentinel5-{who}".encode()
    assert c.publish_result(own_telemetry(who), sentinel) == 0
    got = collector.wait_payload(sentinel, 30)
    leaked = [(t, p) for t, p in got if p in payloads]
    assert not leaked, f"refused publishes reached the upstream: {leaked}"


@pytest.mark.parametrize("proto", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["v311", "v5"])
@pytest.mark.parametrize("who", ["devA", "modX"])
def test_subscribing_outside_its_own_topics_is_refused_per_filter(scoped_hub, clients, who, proto):
    hub, _ = scoped_hub
    ident = WHO[who]
    rc, c = try_connect(hub.port, clients, protocol=proto, **ident.credentials())
    assert rc == 0, f"CONNACK {rc:#x}"
    subs = SUBSCRIPTIONS[who]
    codes = c.subscribe_result([f for f, _ in subs])
    assert codes is not None, "the hub closed the connection on SUBSCRIBE"
    assert len(codes) == len(subs), f"SUBACK has {len(codes)} codes for {len(subs)} filters: {codes}"
    refusal = SUBACK_FAILURE_V3 if proto == mqtt.MQTTv311 else V5_NOT_AUTHORIZED
    wrong = []
    for (flt, allowed), code in zip(subs, codes):
        if allowed and code >= 0x80:
            wrong.append(f"{flt!r}: refused with {code:#x}, should be granted")
        if not allowed and code != refusal:
            wrong.append(f"{flt!r}: got {code:#x}, expected {refusal:#x}")
    assert not wrong, f"{who} {'v5' if proto == mqtt.MQTTv5 else 'v3.1.1'} SUBACK: " + "; ".join(wrong)
    # still connected and allowed to publish its own telemetry
    assert c.publish_result(own_telemetry(who), b"after subscribe") == 0


@pytest.mark.parametrize("proto", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["v311", "v5"])
def test_children_of_one_scope_talk_to_each_other_offline_on_local_topics_out_of_the_box(
    scoped_hub, upstream, clients, proto
):
    """No grant configured: device B and module X read what device A
    publishes under its own `local/devA/...`, while the upstream is down."""
    hub, _ = scoped_hub
    upstream.stop()
    readers = []
    for ident in (DEV_B, MOD_X):
        rc, c = try_connect(hub.port, clients, protocol=proto, **ident.credentials())
        assert rc == 0, f"CONNACK {rc:#x}"
        assert c.subscribe_result(["local/#"]) == [1], "local/# refused"
        readers.append(c)
    rc, a = try_connect(hub.port, clients, protocol=proto, **DEV_A.credentials())
    assert rc == 0
    assert a.publish_result("local/devA/temp", b"21.5") == 0
    for r in readers:
        got = wait_message(r, b"21.5", 20)
        assert ("local/devA/temp", b"21.5") in got, got

