"""Device and module twins answered by the hub itself, with the unchanged
Azure IoT device SDK for Python (get_twin, patch_twin_reported_properties)
and with paho for the exact topics and bodies: offline, after a restart
while offline, each identity its own twin, and bad patches refused with a
reason while the twin stays as it was. With the cloud: reported documents go
up retained at QoS 1 and only until the cloud acknowledged them, a newer one
the cloud holds is read back, and the one of an identity removed from the
scope is cleared there. What the cloud holds is read as a fresh subscriber
on the upstream broker sees it (``retained_doc``); what the hub sent, from
the upstream Mosquitto's own log (``log_type all``)."""

from __future__ import annotations

import json
import re
import uuid

import paho.mqtt.client as mqtt
import pytest

from authkit import (
    EDGE_ID,
    SDK_PORT,
    Identity,
    auth_args,
    broker_log,
    describe_sdk,
    hub_publishes,
    log_size,
    make_certs,
    publish_retained,
    publish_scope,
    require_port_free,
    run_sdk,
    scope_doc,
    start_gateway,
    try_connect,
    wait_log,
    wait_scope,
    wait_tls_listener,
)
from helpers import Relay, Subscriber, wait_until, wait_value

PATCH_REPORTED = "$iothub/twin/PATCH/properties/reported/?$rid={rid}"



@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("twin-certs"))



def twin_steps(out: dict) -> list[dict]:
    assert out.get("error") is None and out.get("connected"), f"the SDK failed:\n{describe_sdk(out)}"
    return out["steps"]


def test_an_sdk_device_gets_and_patches_its_twin_offline_and_finds_it_again_after_a_restart(
    sdk_python, certs, upstream_factory, hub_factory, tmp_path
):
    up = upstream_factory()
    up.start()
    child1, child2 = Identity.child("child1"), Identity.child("child2")
    hub = start_gateway(hub_factory, up, certs)
    publish_scope(up, [child1, child2])
    wait_scope(hub, 2)
    up.stop()
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 0, 15, "upstream disconnected")

    out = run_sdk(sdk_python, child1, certs["ca"], log=tmp_path / "sdk-twin-1.log", steps=[
        {"op": "get"},
        {"op": "patch", "patch": {"fw": "1.0", "cfg": {"rate": 5, "mode": "eco"}}},
        {"op": "patch", "patch": {"cfg": {"rate": None}}},
        {"op": "get"},
    ])
    steps = twin_steps(out)
    assert steps[0].get("twin") == {"desired": {"$version": 1}, "reported": {"$version": 1}}, describe_sdk(out)
    assert steps[1].get("ok") and steps[2].get("ok"), describe_sdk(out)
    assert steps[3]["twin"]["reported"] == {"fw": "1.0", "cfg": {"mode": "eco"}, "$version": 3}, describe_sdk(out)

    # the gateway restarts while still offline: the twin comes back from the store
    hub.terminate()
    require_port_free(SDK_PORT)
    hub.start()
    wait_tls_listener(hub, SDK_PORT)
    wait_scope(hub, 2, timeout=15)
    out = run_sdk(sdk_python, child1, certs["ca"], log=tmp_path / "sdk-twin-2.log", steps=[{"op": "get"}])
    assert twin_steps(out)[0]["twin"]["reported"] == {"fw": "1.0", "cfg": {"mode": "eco"}, "$version": 3}

    # another identity has its own twin
    out = run_sdk(sdk_python, child2, certs["ca"], log=tmp_path / "sdk-twin-3.log", steps=[{"op": "get"}])
    assert twin_steps(out)[0]["twin"]["reported"] == {"$version": 1}, describe_sdk(out)


def test_a_module_gets_its_own_twin_with_the_upstream_up(sdk_python, certs, upstream, hub_factory, tmp_path):
    mod1 = Identity.module("mod1")
    hub = start_gateway(hub_factory, upstream, certs)
    publish_scope(upstream, [mod1])
    wait_scope(hub, 1)
    out = run_sdk(sdk_python, mod1, certs["ca"], log=tmp_path / "sdk-twin-mod.log", steps=[
        {"op": "patch", "patch": {"status": "running"}},
        {"op": "get"},
    ])
    steps = twin_steps(out)
    assert steps[1]["twin"]["reported"] == {"status": "running", "$version": 2}, describe_sdk(out)


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["mqtt311", "mqtt5"])
def test_a_bad_reported_patch_is_answered_400_with_its_reason_and_changes_nothing(
    protocol, upstream, hub_factory, clients
):
    child1 = Identity.child("child1")
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(upstream, [child1])
    wait_scope(hub, 1)
    rc, c = try_connect(hub.port, clients, protocol=protocol, **child1.credentials())
    assert rc == 0
    assert c.subscribe_result(["$iothub/twin/res/#"]) in ([1], [0])

    def answer(rid: str) -> tuple[str, bytes]:
        prefix = "$iothub/twin/res/"
        c._wait(lambda: any(t.startswith(prefix) and f"$rid={rid}" in t for t, _ in c.messages), 10,
                      f"the answer to request {rid}")
        with c.cond:
            return next((t, p) for t, p in c.messages if t.startswith(prefix) and f"$rid={rid}" in t)

    cases = {
        "1": b'{"a.b": 1}',
        "2": b"not json",
        "3": b'{"list": [1, null]}',
        "4": json.dumps({"s": "x" * 5000}).encode(),
        "5": b"[1, 2]",
    }
    for rid, body in cases.items():
        assert c.publish_result(f"$iothub/twin/PATCH/properties/reported/?$rid={rid}", body) == 0
    for rid in cases:
        topic, payload = answer(rid)
        assert topic == f"$iothub/twin/res/400/?$rid={rid}", topic
        assert json.loads(payload)["message"], payload
    assert "'.'" in json.loads(answer("1")[1])["message"]

    c.publish_result("$iothub/twin/GET/?$rid=get1", b"")
    topic, payload = answer("get1")
    assert topic == "$iothub/twin/res/200/?$rid=get1"
    assert json.loads(payload) == {"desired": {"$version": 1}, "reported": {"$version": 1}}

    c.publish_result("$iothub/twin/PATCH/properties/reported/?$rid=ok", b'{"ok": true}')
    assert answer("ok")[0] == "$iothub/twin/res/204/?$rid=ok&$version=2"
    assert not c.closed.is_set(), "the hub kept the connection through every bad patch"


def twin_request(c, topic: str, body: bytes, rid: str) -> tuple[str, dict | None]:
    """Sends a twin request and returns its answer's topic and JSON body."""
    assert c.publish_result(topic.format(rid=rid), body) == 0
    prefix = "$iothub/twin/res/"
    c._wait(lambda: any(t.startswith(prefix) and f"$rid={rid}" in t for t, _ in c.messages), 10,
            f"the answer to request {rid}")
    with c.cond:
        t, p = next((t, p) for t, p in c.messages if t.startswith(prefix) and f"$rid={rid}" in t)
    return t, (json.loads(p) if p else None)


def wait_twin(c, pred, timeout: float, desc: str) -> dict:
    """Asks for the twin (GET, a fresh $rid each time) until ``pred`` holds
    for it; returns it."""
    def get():
        return twin_request(c, "$iothub/twin/GET/?$rid={rid}", b"", f"poll{uuid.uuid4().hex[:8]}")[1]

    return wait_value(get, pred, timeout, desc, shown="the last twin")


def retained_doc(up, topic: str, timeout: float = 10.0) -> dict | None:
    """The JSON document the upstream broker holds retained on ``topic``, as
    a fresh subscriber gets it; None when it holds none. The subscriber then
    publishes a sentinel to itself: the broker sends it after any retained
    message, so "none" needs no waiting for something that never comes."""
    w = Subscriber(up.port).connect()
    try:
        sentinel = f"sentinel/{uuid.uuid4().hex}"
        w.subscribe(topic)
        w.subscribe(sentinel)
        w.client.publish(sentinel, b"s", qos=1)
        w.wait_topic(sentinel, timeout)
        with w.cond:
            held = [bytes(m.payload) for m in w.messages if m.topic == topic and m.retain]
    finally:
        w.close()
    return json.loads(held[-1]) if held else None


def wait_retained(up, topic: str, pred, timeout: float, desc: str) -> dict | None:
    """Reads ``retained_doc`` until ``pred`` holds for it; returns it."""
    return wait_value(lambda: retained_doc(up, topic), pred, timeout, desc, interval=0.2,
                      shown=f"the broker holds on {topic}")


def test_the_twin_of_an_identity_removed_from_the_scope_is_deleted_and_it_starts_afresh_when_added_again(
    upstream, hub_factory, clients
):
    child1, child2 = Identity.child("child1"), Identity.child("child2")
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(upstream, scope_doc([child1, child2], version=1))
    wait_scope(hub, 2)
    for ident in (child1, child2):
        rc, c = try_connect(hub.port, clients, **ident.credentials())
        assert rc == 0 and c.subscribe_result(["$iothub/twin/res/#"]) == [1]
        topic, _ = twin_request(c, "$iothub/twin/PATCH/properties/reported/?$rid={rid}",
                                json.dumps({"who": ident.device_id}).encode(), f"r-{ident.device_id}")
        assert topic == f"$iothub/twin/res/204/?$rid=r-{ident.device_id}&$version=2", topic
        c.close()
    for ident in (child1, child2):
        doc = wait_retained(upstream, f"devices/{ident.device_id}/twin/reported", lambda d: d is not None, 15,
                            f"{ident.device_id}'s reported document on the cloud")
        assert doc == {"who": ident.device_id, "$version": 2}, doc

    offset = log_size(hub)
    publish_scope(upstream, scope_doc([child1], version=2))
    wait_log(hub, offset, r"twins of identities removed from the device scope deleted\b.*\btwins=1\b", 20,
             "child2's twin deleted with it")
    # the document the hub published for child2 is cleared on the cloud too, child1's stays
    wait_retained(upstream, "devices/child2/twin/reported", lambda d: d is None, 20,
                  "child2's reported document cleared on the cloud")
    assert retained_doc(upstream, "devices/child1/twin/reported") == {"who": "child1", "$version": 2}
    # gone for good: not back after a restart, nor when child2 is added again
    assert hub.terminate() == 0
    hub.start()
    publish_scope(upstream, scope_doc([child1, child2], version=3))
    wait_scope(hub, 2)
    docs = {}
    for ident in (child1, child2):
        rc, c = try_connect(hub.port, clients, **ident.credentials())
        assert rc == 0 and c.subscribe_result(["$iothub/twin/res/#"]) == [1]
        topic, docs[ident.device_id] = twin_request(c, "$iothub/twin/GET/?$rid={rid}", b"", f"g-{ident.device_id}")
        assert topic == f"$iothub/twin/res/200/?$rid=g-{ident.device_id}", topic
    assert docs["child1"]["reported"] == {"who": "child1", "$version": 2}, docs
    assert docs["child2"]["reported"] == {"$version": 1}, f"child2's old twin came back: {docs}"
    assert hub.alive()


# --------------------------------------------------------------------------
# with the cloud: desired documents in, reported documents out
# --------------------------------------------------------------------------


def wait_answer(c, prefix: str, desc: str, timeout: float = 15.0) -> tuple[str, bytes]:
    """The first message on a topic starting with ``prefix`` (and drops it)."""
    c._wait(lambda: any(t.startswith(prefix) for t, _ in c.messages), timeout, desc)
    with c.cond:
        i = next(i for i, (t, _) in enumerate(c.messages) if t.startswith(prefix))
        return c.messages.pop(i)


def cloud_watcher(upstream) -> Subscriber:
    """The cloud's view: a client on the upstream broker reading reported documents."""
    w = Subscriber(upstream.port).connect()
    w.subscribe("devices/#")
    return w


def latest(w: Subscriber, topic: str, pred, timeout: float, desc: str) -> dict:
    def found(msgs):
        docs = [json.loads(m.payload) for m in msgs if m.topic == topic]
        return docs and pred(docs[-1])
    msgs = w.wait_for(found, timeout, desc)
    return [json.loads(m.payload) for m in msgs if m.topic == topic][-1]


def test_desired_set_in_the_cloud_reaches_the_twin_and_a_subscribed_device_as_patches_and_reported_goes_up(
    upstream, hub_factory, clients
):
    child1, mod1 = Identity.child("child1"), Identity.module("mod1")
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(upstream, [child1, mod1])
    wait_scope(hub, 2)
    rc, c = try_connect(hub.port, clients, **child1.credentials())
    assert rc == 0
    assert c.subscribe_result(["$iothub/twin/res/#", "$iothub/twin/PATCH/properties/desired/#"]) == [1, 1]
    rc, m = try_connect(hub.port, clients, **mod1.credentials())
    assert rc == 0
    assert m.subscribe_result(["$iothub/twin/PATCH/properties/desired/#"]) == [1]
    watcher = cloud_watcher(upstream)
    clients.append(watcher)

    publish_retained(upstream.port, "devices/child1/twin/desired", b'{"rate": 5, "mode": "eco", "$version": 2}')
    topic, body = wait_answer(c, "$iothub/twin/PATCH/properties/desired/", "the first desired patch")
    assert topic == "$iothub/twin/PATCH/properties/desired/?$version=2"
    assert json.loads(body) == {"rate": 5, "mode": "eco", "$version": 2}

    publish_retained(upstream.port, "devices/child1/twin/desired", b'{"rate": 7, "$version": 3}')
    topic, body = wait_answer(c, "$iothub/twin/PATCH/properties/desired/", "the second desired patch")
    assert topic == "$iothub/twin/PATCH/properties/desired/?$version=3"
    assert json.loads(body) == {"rate": 7, "mode": None, "$version": 3}, "a removed key is null"

    c.publish_result("$iothub/twin/GET/?$rid=g1", b"")
    _, body = wait_answer(c, "$iothub/twin/res/200/?$rid=g1", "the twin")
    assert json.loads(body)["desired"] == {"rate": 7, "$version": 3}

    c.publish_result("$iothub/twin/PATCH/properties/reported/?$rid=r1", b'{"fw": "2.0"}')
    assert wait_answer(c, "$iothub/twin/res/", "the 204")[0] == "$iothub/twin/res/204/?$rid=r1&$version=2"
    doc = latest(watcher, "devices/child1/twin/reported", lambda d: d.get("fw") == "2.0", 15,
                 "child1's reported document upstream")
    assert doc == {"fw": "2.0", "$version": 2}

    # the module's twin is its own; child1 got none of its patches
    publish_retained(upstream.port, f"devices/{EDGE_ID}/modules/mod1/twin/desired", b'{"level": 1, "$version": 1}')
    topic, body = wait_answer(m, "$iothub/twin/PATCH/properties/desired/", "the module's desired patch")
    assert json.loads(body) == {"level": 1, "$version": 1}
    # a desired document of an identity outside the scope is not taken
    publish_retained(upstream.port, "devices/stranger/twin/desired", b'{"x": 1, "$version": 1}')
    c.publish_result("$iothub/twin/GET/?$rid=g2", b"")
    wait_answer(c, "$iothub/twin/res/200/?$rid=g2", "the twin again")
    assert not [t for t, _ in c.messages if "desired" in t], "child1 got another identity's patch"


def test_after_an_outage_desired_changed_in_the_cloud_reaches_a_connected_device_and_reported_changed_offline_goes_up(
    upstream, hub_factory, clients
):
    child1 = Identity.child("child1")
    relay = Relay(upstream.port)
    hub = hub_factory(relay.url, edge_id=EDGE_ID, extra_args=auth_args())
    try:
        publish_scope(upstream, [child1])
        wait_scope(hub, 1)
        rc, c = try_connect(hub.port, clients, **child1.credentials())
        assert rc == 0
        # subscribed to desired patches, and never asks for the twin
        assert c.subscribe_result(["$iothub/twin/res/#", "$iothub/twin/PATCH/properties/desired/#"]) == [1, 1]
        publish_retained(upstream.port, "devices/child1/twin/desired", b'{"rate": 1, "$version": 1}')
        topic, _ = wait_answer(c, "$iothub/twin/PATCH/properties/desired/", "the desired patch before the outage")
        assert topic.endswith("?$version=1")
        watcher = cloud_watcher(upstream)
        clients.append(watcher)

        relay.cut()
        hub.wait_metric("edgehub_upstream_connected", lambda v: v == 0, 15, "the link cut")
        c.publish_result("$iothub/twin/PATCH/properties/reported/?$rid=off", b'{"offline": true}')
        topic, _ = wait_answer(c, "$iothub/twin/res/", "the 204 while offline")
        assert topic.startswith("$iothub/twin/res/204/?$rid=off&$version=")
        publish_retained(upstream.port, "devices/child1/twin/desired", b'{"rate": 9, "extra": "x", "$version": 4}')

        relay.restore()
        topic, body = wait_answer(c, "$iothub/twin/PATCH/properties/desired/", "the reconciled desired patch", 30)
        assert topic == "$iothub/twin/PATCH/properties/desired/?$version=4"
        assert json.loads(body) == {"rate": 9, "extra": "x", "$version": 4}, "the diff of the two documents"
        doc = latest(watcher, "devices/child1/twin/reported", lambda d: d.get("offline") is True, 30,
                     "the reported document changed offline, upstream")
        assert doc["offline"] is True
    finally:
        relay.close()


def test_a_reported_document_the_cloud_acknowledged_is_not_sent_again_after_a_restart_but_an_unacknowledged_one_is(
    upstream_factory, hub_factory, clients
):
    """child1 reports with the upstream up (the cloud acknowledges its
    document), child2 with the upstream down; the hub restarts before the
    upstream is back. Then only child2's document goes up: the upstream
    Mosquitto logs every packet, so its log shows each PUBLISH of the hub."""
    up = upstream_factory(extra_conf=["log_type all"])
    up.start()
    child1, child2 = Identity.child("child1"), Identity.child("child2")
    hub = hub_factory(up, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(up, [child1, child2])
    wait_scope(hub, 2)
    devices = {}
    for ident in (child1, child2):
        rc, c = try_connect(hub.port, clients, **ident.credentials())
        assert rc == 0 and c.subscribe_result(["$iothub/twin/res/#"]) == [1]
        devices[ident.device_id] = c
    topic1, topic2 = "devices/child1/twin/reported", "devices/child2/twin/reported"

    topic, _ = twin_request(devices["child1"], PATCH_REPORTED, b'{"fw": "1.0"}', "online")
    assert topic == "$iothub/twin/res/204/?$rid=online&$version=2", topic
    sent = wait_until(lambda: hub_publishes(up, topic1), 15, "child1's reported document upstream")
    assert [(qos, retain) for qos, retain, _ in sent] == [(1, 1)], \
        f"child1's document did not go up once, retained at QoS 1: (QoS, retain, mid) {sent}"
    wait_until(lambda: f"Sending PUBACK to {EDGE_ID} (m{sent[0][2]}, rc0)" in broker_log(up), 10,
               "the broker's PUBACK of child1's document")
    assert retained_doc(up, topic1) == {"fw": "1.0", "$version": 2}

    up.stop()
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 0, 15, "== 0 (the upstream gone)")
    since = up.log_path.stat().st_size
    topic, _ = twin_request(devices["child2"], PATCH_REPORTED, b'{"fw": "2.0"}', "offline")
    assert topic == "$iothub/twin/res/204/?$rid=offline&$version=2", topic
    assert hub.terminate() == 0
    hub.start()
    up.start()

    doc = wait_retained(up, topic2, lambda d: d is not None, 30,
                        "child2's unacknowledged document sent after the restart")
    assert doc == {"fw": "2.0", "$version": 2}
    again = hub_publishes(up, topic2, since)
    assert again and {(qos, retain) for qos, retain, _ in again} == {(1, 1)}, again
    assert hub_publishes(up, topic1, since) == [], \
        "child1's document, which the cloud had acknowledged, was sent again after the restart"
    assert retained_doc(up, topic1) == {"fw": "1.0", "$version": 2}
    assert hub.alive()


def test_a_newer_reported_document_on_the_cloud_is_read_back_and_the_next_patch_continues_its_version(
    upstream, hub_factory, clients
):
    """child1 reported through another edge before it moved to this one: the
    cloud holds its reported document at version 7 before this hub ever
    connects."""
    child1 = Identity.child("child1")
    topic = "devices/child1/twin/reported"
    publish_retained(upstream.port, topic, b'{"fw": "9.9", "$version": 7}')
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(upstream, [child1])
    wait_scope(hub, 1)
    rc, c = try_connect(hub.port, clients, **child1.credentials())
    assert rc == 0 and c.subscribe_result(["$iothub/twin/res/#"]) == [1]

    twin = wait_twin(c, lambda t: t["reported"] != {"$version": 1}, 20,
                     "the twin to take the cloud's reported document")
    assert twin == {"desired": {"$version": 1}, "reported": {"fw": "9.9", "$version": 7}}, twin

    topic_204, _ = twin_request(c, PATCH_REPORTED, b'{"mode": "eco"}', "next")
    assert topic_204 == "$iothub/twin/res/204/?$rid=next&$version=8", topic_204
    doc = wait_retained(upstream, topic, lambda d: d != {"fw": "9.9", "$version": 7}, 20,
                        "the cloud's reported document after the patch")
    assert doc == {"fw": "9.9", "mode": "eco", "$version": 8}, doc
    _, twin = twin_request(c, "$iothub/twin/GET/?$rid={rid}", b"", "after")
    assert twin["reported"] == {"fw": "9.9", "mode": "eco", "$version": 8}, twin
    assert hub.alive()


def test_an_sdk_device_receives_a_desired_patch_set_in_the_cloud(
    sdk_python, certs, upstream, hub_factory, tmp_path
):
    import threading

    child1 = Identity.child("child1")
    hub = start_gateway(hub_factory, upstream, certs)
    publish_scope(upstream, [child1])
    wait_scope(hub, 1)
    result: dict = {}
    sdk = threading.Thread(target=lambda: result.update(run_sdk(
        sdk_python, child1, certs["ca"], log=tmp_path / "sdk-desired.log",
        steps=[{"op": "wait_desired", "timeout": 60}])))
    sdk.start()
    # The SDK subscribes when its handler is set; a desired change made
    # before that reaches only its twin. Change desired until the SDK has a
    # patch (bounded: one change per second, for at most 60 s).
    version = 1
    while sdk.is_alive() and version <= 61:
        version += 1
        publish_retained(upstream.port, "devices/child1/twin/desired",
                         json.dumps({"rate": version, "$version": version}).encode())
        sdk.join(1)
    sdk.join(30)
    assert result.get("error") is None and result["steps"][0]["ok"], describe_sdk(result)
    patch = result["steps"][0]["patches"][0]
    assert patch["rate"] == patch["$version"] >= 2, patch


def test_an_sdk_device_subscribed_to_desired_patches_gets_one_set_in_the_cloud_after_a_hub_restart_without_subscribing_again(
    sdk_python, certs, upstream, hub_factory, tmp_path
):
    """The unchanged SDK subscribes to desired patches when its handler is
    set, once per client: a fresh SDK process always subscribes anew, so one
    SDK process stays alive across the hub's restart (SIGTERM) and reconnects
    by itself (its connection_retry, every second) with clean session off,
    without subscribing again; its DEBUG log (paho's lines) shows its one
    SUBSCRIBE and the CONNACKs. The cloud changes desired once the SDK is
    back, so the patch can only reach it on the subscription the hub kept."""
    import re
    import threading

    child1 = Identity.child("child1")
    hub = start_gateway(hub_factory, upstream, certs)
    publish_scope(upstream, [child1])
    wait_scope(hub, 1)
    log = tmp_path / "sdk-desired-restart.log"

    def sdk_log() -> str:
        return log.read_text(errors="replace") if log.exists() else ""

    result: dict = {}
    sdk = threading.Thread(target=lambda: result.update(run_sdk(
        sdk_python, child1, certs["ca"], log=log, retry_secs=1, timeout=150,
        steps=[{"op": "wait_desired", "timeout": 120}])))
    sdk.start()
    try:
        wait_until(lambda: "Successfully enabled feature:twin_patches" in sdk_log(), 60,
                   "the SDK subscribed to desired patches")
        assert hub.terminate() == 0
        require_port_free(SDK_PORT)
        hub.start()
        wait_tls_listener(hub, SDK_PORT)
        wait_until(lambda: len(re.findall(r"Received CONNACK", sdk_log())) >= 2, 30,
                   "the SDK connected again by itself")
        publish_retained(upstream.port, "devices/child1/twin/desired", b'{"rate": 2, "$version": 2}')
    finally:
        sdk.join(150)
    assert not sdk.is_alive(), "the SDK driver did not finish"
    assert result.get("error") is None and result["steps"][0]["ok"], describe_sdk(result)
    patch = result["steps"][0]["patches"][0]
    assert (patch.get("rate"), patch.get("$version")) == (2, 2), describe_sdk(result)
    text = sdk_log()
    # On a reconnect the SDK also asks for its twin and makes up a patch when
    # desired's $version moved; this one came from the hub, on the topic.
    assert re.search(r"Received PUBLISH .*'\$iothub/twin/PATCH/properties/desired/\?\$version=2'", text), \
        "the patch did not come from the hub on $iothub/twin/PATCH/properties/desired/"
    subscribes = [ln for ln in text.splitlines()
                  if "Sending SUBSCRIBE" in ln and "twin/PATCH/properties/desired" in ln]
    assert len(subscribes) == 1, "the SDK subscribed again, so this no longer shows the kept subscription:\n" \
        + "\n".join(subscribes)
    connacks = re.findall(r"Received CONNACK \((\d+), (\d+)\)", text)
    assert connacks[-1] == ("1", "0"), \
        f"the SDK's reconnect was not told its session is present: CONNACK (flags, code) {connacks}"
