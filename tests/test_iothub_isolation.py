"""Each connection's `$iothub` is its own: no client reaches another's.

Two SAS child devices of one scope, devA (the spoofer) and devB (the
victim).  devB subscribes to its own `$iothub/twin/res/#`,
`$iothub/twin/PATCH/properties/desired/#`, `$iothub/methods/POST/#` and
`devices/devB/messages/devicebound/#`; devA tries every way to put something
there, over MQTT 3.1.1 and MQTT 5: a publish (QoS 0 and 1, retained or not),
a will (retained or not) and a subscription to devB's or everyone's topics.
The `$iothub/twin/res/...`, `.../PATCH/properties/desired/...` and
`$iothub/methods/POST/...` topics are the hub's to send, never a client's.

Expected: devB receives none of it, neither live nor as a retained message
when it subscribes afresh; each attempt is refused (a publish: MQTT 5 PUBACK
0x87 and the connection stays, MQTT 3.1.1 the connection is closed; a will:
CONNACK 5 / 0x87; a subscription: SUBACK 0x80 / 0x87), writes a log line
with "refused" and adds one to `edgehub_authz_refused_total`.  A client's own
twin GET and reported patch are accepted, and devB never sees their answers.

"Nothing arrives" is proven with a barrier, not a sleep: the config grants
devA the plain topics `barrier/#` to publish and devB the filter `barrier/#`
to subscribe.  devA publishes its barrier (QoS 1, retained) after its probes;
messages from one publisher reach a subscriber in the order they were
routed, so once devB has the barrier, anything routed before it has arrived.
For the retained check a fresh devB connection subscribes to its own topics
first and to `barrier/#` in a second SUBSCRIBE: the hub serves the retained
messages of one SUBSCRIBE before it reads the next, so once the retained
barrier has arrived, so has every retained message on devB's topics.

One hub serves the whole module.  Every probe's payload carries the test's
tag and only tagged messages count as a leak of that test, so a retained
leak of one test is reported there and not again by the tests after it.
"""

from __future__ import annotations

import re
import uuid

import paho.mqtt.client as mqtt
import pytest

from authkit import (
    EDGE_ID,
    SUBACK_FAILURE_V3,
    V3_NOT_AUTHORIZED,
    V5_NOT_AUTHORIZED,
    DeviceClient,
    Identity,
    abort,
    auth_args,
    log_since,
    log_size,
    publish_outcome,
    publish_scope,
    try_connect,
    wait_message,
    wait_scope,
)
from helpers import Hub, Upstream, WaitTimeout, wait_until

DEV_A, DEV_B = Identity.child("devA"), Identity.child("devB")

# What devB subscribes to: its own topics (all granted) ...
B_OWN = [
    "$iothub/twin/res/#",
    "$iothub/twin/PATCH/properties/desired/#",
    "$iothub/methods/POST/#",
    "devices/devB/messages/devicebound/#",
]
# ... and the barrier the config grants it.
BARRIER_FILTER = "barrier/#"

# The topics devA must not reach: key -> topic
SPOOFED = {
    "twin-res": "$iothub/twin/res/200/?$rid=1",
    "desired-patch": "$iothub/twin/PATCH/properties/desired/?$version=9",
    "method-call": "$iothub/methods/POST/reboot/?$rid=7",
    "devicebound": "devices/devB/messages/devicebound/x=1",
}
# Filters devA must not get
FOREIGN_FILTERS = [
    "devices/devB/messages/devicebound/#",
    "devices/+/messages/devicebound/#",
    "$iothub/#",
    "#",
]

PROTOCOLS = {"v311": mqtt.MQTTv311, "v5": mqtt.MQTTv5}
REFUSED_COUNTER = "edgehub_authz_refused_total"

GRANTS = """\
[auth.grants."devA"]
publish = ["barrier/#"]

[auth.grants."devB"]
subscribe = ["barrier/#"]
"""


# --------------------------------------------------------------------------
# one hub for the module
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iso(edgehub_bin, tmp_path_factory):
    """(hub, upstream): a hub whose scope holds devA and devB, with the
    barrier grants; the scope comes from the upstream broker as in
    production."""
    d = tmp_path_factory.mktemp("iothub-isolation")
    cfg = d / "edgehub.toml"
    cfg.write_text(GRANTS)
    up = Upstream(d)
    hub = Hub(edgehub_bin, d, upstream=up.url, edge_id=EDGE_ID,
              extra_args=auth_args() + ["--config", str(cfg)])
    try:
        up.start()
        hub.start()
        publish_scope(up, [DEV_A, DEV_B])
        wait_scope(hub, 2)
        yield hub, up
    finally:
        hub.close()
        up.close()


@pytest.fixture
def hub(iso, request):
    """The module's hub; its log and the broker's go into a failed test's report."""
    hub, up = iso
    request.node._edgehub_logs = [("edgehub", hub), ("mosquitto", up)]
    assert hub.alive(), "the hub of this module has exited"
    return hub


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def connect_with_will(hub, clients, ident: Identity, proto, topic: str, payload: bytes,
                      retain: bool) -> tuple[int, DeviceClient]:
    """Connects ``ident`` with a QoS 1 will; returns the CONNACK code."""
    c = DeviceClient(hub.port, protocol=proto, **ident.credentials())
    clients.append(c)
    c.client.will_set(topic, payload, qos=1, retain=retain)
    return c.connect(), c


def connect_ok(hub, clients, ident: Identity, proto) -> DeviceClient:
    rc, c = try_connect(hub.port, clients, protocol=proto, **ident.credentials())
    assert rc == 0, f"{ident.client_id}: CONNACK {rc:#x}"
    return c


def subscribe_ok(c: DeviceClient, filters: list[str]) -> None:
    codes = c.subscribe_result(filters)
    assert codes is not None, f"the hub closed {c.client_id}'s connection on SUBSCRIBE {filters}"
    refused = {f: f"{code:#x}" for f, code in zip(filters, codes) if code >= 0x80}
    assert not refused, f"{c.client_id}: its own subscriptions were refused: {refused}"


def victim(hub, clients, proto) -> DeviceClient:
    """devB, subscribed to its own topics and the barrier."""
    b = connect_ok(hub, clients, DEV_B, proto)
    subscribe_ok(b, B_OWN + [BARRIER_FILTER])
    return b


def refusals(hub) -> float:
    return hub.metric(REFUSED_COUNTER)


def refused_lines(hub, offset: int) -> list[str]:
    return [ln for ln in log_since(hub, offset).splitlines() if re.search("refused", ln, re.IGNORECASE)]


def check_counted_and_logged(hub, before: float, offset: int, n: int, what: str) -> list[str]:
    """Problems, if ``n`` refusals since (``before``, ``offset``) did not add
    exactly ``n`` to the counter and write at least ``n`` log lines with
    "refused".  Called once the client has seen the refusal (the hub counts
    and logs it before it answers); both are waited for briefly all the same."""
    problems = []
    try:
        got = hub.wait_metric(REFUSED_COUNTER, lambda v: v >= before + n, 2, f">= {before + n}")
        if got != before + n:
            problems.append(f"{what}: {REFUSED_COUNTER} went {before:g} -> {got:g}, expected +{n}")
    except WaitTimeout:
        problems.append(f"{what}: {REFUSED_COUNTER} stayed at {refusals(hub):g}, expected +{n}")
    try:
        wait_until(lambda: len(refused_lines(hub, offset)) >= n, 2, "refusal log lines", interval=0.05)
    except WaitTimeout:
        problems.append(f"{what}: {len(refused_lines(hub, offset))} log lines containing 'refused' "
                        f"since, expected at least {n}")
    return problems


def send_barrier(hub, clients, a: DeviceClient | None, proto, b: DeviceClient, tag: str) -> DeviceClient:
    """devA publishes the barrier (QoS 1, retained) and devB receives it.
    On devA's probe connection while it is open (one connection's publishes
    are routed in order); else from a fresh connection: the hub closed that
    one (MQTT 3.1.1 refusal, or a will probe), and had handled all it sent
    before closing it, so a publish made after the close is routed after it."""
    if a is None or a.closed.is_set():
        a = connect_ok(hub, clients, DEV_A, proto)
    payload = barrier_payload(tag)
    code = publish_outcome(a, f"barrier/AB/{tag}", payload, retain=True)
    assert code is not None and code < 0x80, (
        f"devA's barrier (granted by config) was not accepted: "
        f"{'connection closed' if code is None else f'PUBACK {code:#x}'}"
    )
    wait_message(b, payload)
    return a


def barrier_payload(tag: str) -> bytes:
    return f"barrier-{tag}".encode()


def tagged(msgs: list[tuple[str, bytes]], tag: str) -> list[tuple[str, bytes]]:
    return [(t, p) for t, p in msgs if not t.startswith("barrier/") and p.startswith(tag.encode())]


def leaks_live_and_retained(hub, clients, proto, b: DeviceClient, tag: str) -> list[str]:
    """What devB got of ``tag``'s probes: live (up to the barrier, already
    received) and as retained messages on a fresh subscription."""
    with b.cond:
        live = list(b.messages)
    problems = [f"devB received live: {t!r} {p!r}" for t, p in tagged(live, tag)]
    b2 = connect_ok(hub, clients, DEV_B, proto)
    subscribe_ok(b2, B_OWN)
    subscribe_ok(b2, [BARRIER_FILTER])  # its retained barrier comes after B_OWN's retained messages
    msgs = wait_message(b2, barrier_payload(tag))
    problems += [f"devB got as retained on a fresh subscription: {t!r} {p!r}" for t, p in tagged(msgs, tag)]
    return problems


def expected_publish_refusal(proto) -> str:
    return "PUBACK 0x87, connection open" if proto == mqtt.MQTTv5 else "connection closed"


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(SPOOFED))
@pytest.mark.parametrize("proto_name", list(PROTOCOLS))
def test_a_publish_to_another_identitys_iothub_or_devicebound_topic_is_refused_counted_logged_and_never_delivered(
    hub, clients, proto_name, key
):
    proto, topic = PROTOCOLS[proto_name], SPOOFED[key]
    tag = f"pub-{proto_name}-{key}"
    b = victim(hub, clients, proto)
    a = None
    problems = []
    for qos in (0, 1):
        for retain in (False, True):
            what = f"{proto_name} QoS {qos} {'retained ' if retain else ''}publish to {topic!r}"
            if a is None or a.closed.is_set():
                # MQTT 3.1.1: the last refusal closed the connection; the next probe needs a new one
                a = connect_ok(hub, clients, DEV_A, proto)
            before, offset = refusals(hub), log_size(hub)
            payload = f"{tag}/q{qos}/r{int(retain)}".encode()
            if qos == 1:
                code = publish_outcome(a, topic, payload, retain=retain)
            else:
                a.publish(topic, payload, qos=0, retain=retain)
                # A QoS 1 publish on a granted topic right after it: its PUBACK
                # says the hub has handled the QoS 0 probe (MQTT 5); over 3.1.1
                # the connection is closed before it is acknowledged.
                code = publish_outcome(a, f"barrier/AB/{tag}/sync", b"sync")
            if proto == mqtt.MQTTv5:
                want = V5_NOT_AUTHORIZED if qos == 1 else 0
                if code != want:
                    problems.append(f"{what}: {'connection closed' if code is None else f'PUBACK {code:#x}'}"
                                    f"{' (of the QoS 1 publish after it)' if qos == 0 else ''}, "
                                    f"expected {expected_publish_refusal(proto)}")
                    continue
                if qos == 0 and refusals(hub) == before and not refused_lines(hub, offset):
                    # MQTT 5 has no answer to a QoS 0 publish: the counter
                    # and the log are all that say it was refused.
                    problems.append(f"{what}: accepted ({REFUSED_COUNTER} unchanged, no log line), "
                                    f"expected refused")
                    continue
            else:
                if code is not None:
                    problems.append(f"{what}: accepted (PUBACK {code:#x}"
                                    f"{' of the QoS 1 publish after it' if qos == 0 else ''}), "
                                    f"expected {expected_publish_refusal(proto)}")
                    continue
                a.wait_closed(10, "the hub to close the connection")
            problems += check_counted_and_logged(hub, before, offset, 1, what)
    a = send_barrier(hub, clients, a, proto, b, tag)
    problems += leaks_live_and_retained(hub, clients, proto, b, tag)
    assert not problems, f"devA's publishes to devB's {topic!r}:\n" + "\n".join(problems)


@pytest.mark.parametrize("key", list(SPOOFED))
@pytest.mark.parametrize("proto_name", list(PROTOCOLS))
def test_a_will_on_another_identitys_iothub_or_devicebound_topic_is_refused_at_connect_and_never_delivered(
    hub, clients, proto_name, key
):
    proto, topic = PROTOCOLS[proto_name], SPOOFED[key]
    tag = f"will-{proto_name}-{key}"
    want = V5_NOT_AUTHORIZED if proto == mqtt.MQTTv5 else V3_NOT_AUTHORIZED
    b = victim(hub, clients, proto)
    problems = []
    for retain in (False, True):
        what = f"{proto_name} CONNECT with a {'retained ' if retain else ''}will on {topic!r}"
        connected = hub.metric("edgehub_clients_connected")
        before, offset = refusals(hub), log_size(hub)
        payload = f"{tag}/r{int(retain)}".encode()
        rc, a = connect_with_will(hub, clients, DEV_A, proto, topic, payload, retain)
        if rc == want:
            problems += check_counted_and_logged(hub, before, offset, 1, what)
            continue
        problems.append(f"{what}: CONNACK {rc:#x}, expected {want:#x}")
        if rc == 0:
            # Accepted: lose the link so the hub publishes the will.  The hub
            # publishes it right after it stops counting the client, so the
            # barrier (a new connection after that) is routed after it.
            abort(a)
            hub.wait_metric("edgehub_clients_connected", lambda v: v == connected, 10,
                            f"== {connected:g} (devA's will connection gone)")
    send_barrier(hub, clients, None, proto, b, tag)
    problems += leaks_live_and_retained(hub, clients, proto, b, tag)
    assert not problems, f"devA's wills on devB's {topic!r}:\n" + "\n".join(problems)


@pytest.mark.parametrize("proto_name", list(PROTOCOLS))
def test_subscribing_to_another_identitys_devicebound_or_to_every_iothub_topic_is_refused_per_filter_counted_and_logged(
    hub, clients, proto_name
):
    proto = PROTOCOLS[proto_name]
    want = V5_NOT_AUTHORIZED if proto == mqtt.MQTTv5 else SUBACK_FAILURE_V3
    a = connect_ok(hub, clients, DEV_A, proto)
    before, offset = refusals(hub), log_size(hub)
    codes = a.subscribe_result(FOREIGN_FILTERS)
    assert codes is not None, "the hub closed the connection on SUBSCRIBE instead of refusing per filter"
    assert len(codes) == len(FOREIGN_FILTERS), f"SUBACK has {len(codes)} codes for {len(FOREIGN_FILTERS)} filters"
    problems = [f"{proto_name} SUBSCRIBE {f!r}: SUBACK {code:#x}, expected {want:#x}"
                for f, code in zip(FOREIGN_FILTERS, codes) if code != want]
    n = sum(1 for code in codes if code >= 0x80)
    if n:
        problems += check_counted_and_logged(hub, before, offset, n, f"{proto_name} SUBSCRIBE {FOREIGN_FILTERS}")
    # the refusal leaves the connection open
    code = publish_outcome(a, f"barrier/AB/sub-{proto_name}", b"still here")
    if code != 0:
        problems.append(f"after the refused SUBSCRIBE devA's granted publish got "
                        f"{'connection closed' if code is None else f'PUBACK {code:#x}'}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("proto_name", list(PROTOCOLS))
def test_a_clients_own_twin_get_and_reported_patch_are_accepted_and_another_client_never_sees_their_answers(
    hub, clients, proto_name
):
    proto = PROTOCOLS[proto_name]
    tag = f"own-{proto_name}"
    b = victim(hub, clients, proto)
    a = connect_ok(hub, clients, DEV_A, proto)
    subscribe_ok(a, ["$iothub/twin/res/#"])
    rid_get, rid_patch = uuid.uuid4().hex, uuid.uuid4().hex
    before = refusals(hub)
    own = [(f"$iothub/twin/GET/?$rid={rid_get}", b""),
           (f"$iothub/twin/PATCH/properties/reported/?$rid={rid_patch}", b'{"isolation": 1}')]
    for topic, body in own:
        code = publish_outcome(a, topic, body)
        assert code is not None and code < 0x80, (
            f"devA's own {topic!r}: {'connection closed' if code is None else f'PUBACK {code:#x}'}, expected accepted"
        )
    assert refusals(hub) == before, f"{REFUSED_COUNTER} counted devA's own twin requests"

    def answers_to_a(msgs):
        return [(t, p) for t, p in msgs if rid_get in t or rid_patch in t]

    send_barrier(hub, clients, a, proto, b, tag)
    with a.cond:
        a_answered = bool(answers_to_a(a.messages))
    if a_answered:
        # devA has an answer: any copy of it for devB was routed before the
        # next barrier is.
        send_barrier(hub, clients, a, proto, b, tag + "-2")
    with b.cond:
        seen = answers_to_a(b.messages)
    assert not seen, f"devB received answers meant for devA: {seen}"
