"""Cloud-to-device messages: published by the cloud on
`devices/{d}/messages/devicebound/{props}`, stored by the hub for a device
that is away (across a kill -9), delivered in order when it subscribes, only
to that device, and its PUBACK sent upstream as a completion; a flood past a
device's bound is refused with a count while the first messages stay."""

from __future__ import annotations

import json

import paho.mqtt.client as mqtt
import pytest

from authkit import (
    EDGE_ID,
    Identity,
    auth_args,
    describe_sdk,
    make_certs,
    publish_scope,
    run_sdk,
    start_gateway,
    try_connect,
    wait_scope,
)
from helpers import LOOPBACK, Subscriber
from test_cloud_cli import wait_hub_subscribed

BOUND = 50  # c2d::MAX_PER_DEVICE


class Cloud:
    def __init__(self, upstream):
        self.sub = Subscriber(upstream.port).connect()
        self.sub.subscribe("devices/+/messages/completed")
        self.pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cloud-c2d")
        self.pub.connect(LOOPBACK, upstream.port)
        self.pub.loop_start()

    def send(self, device: str, body: bytes, props: str = "") -> None:
        info = self.pub.publish(f"devices/{device}/messages/devicebound/{props}", body, qos=1)
        info.wait_for_publish(10)

    def completions(self, device: str) -> list[dict]:
        return [json.loads(m.payload) for m in self.sub.messages if m.topic == f"devices/{device}/messages/completed"]

    def close(self):
        self.sub.close()
        self.pub.loop_stop()
        self.pub.disconnect()


def received(c, prefix: str) -> list[bytes]:
    with c.cond:
        return [p for t, p in c.messages if t.startswith(prefix)]


@pytest.fixture
def sub_upstream(upstream_factory):
    """A running upstream broker that logs every subscription."""
    up = upstream_factory(extra_conf=["log_type subscribe"])
    up.start()
    return up


def wait_devicebound_subscribed(up, device: str) -> None:
    """Waits until the hub has subscribed upstream (``up``: a `sub_upstream`)
    to ``device``'s cloud-to-device topics, which it does only after it
    applied the scope: a message the cloud sends before that is dropped by
    the broker (no subscriber)."""
    wait_hub_subscribed(up, f"devices/{device}/messages/devicebound/#")


def test_messages_for_a_device_away_wait_across_a_kill_and_arrive_in_order_and_complete_upstream(
    sub_upstream, hub_factory, clients
):
    child1, child2 = Identity.child("child1"), Identity.child("child2")
    hub = hub_factory(sub_upstream, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(sub_upstream, [child1, child2])
    wait_scope(hub, 2)
    wait_devicebound_subscribed(sub_upstream, "child1")
    cloud = Cloud(sub_upstream)
    try:
        rc, d2 = try_connect(hub.port, clients, **child2.credentials())
        assert rc == 0 and d2.subscribe_result(["devices/child2/messages/devicebound/#"]) == [1]

        bodies = [f"c2d-{i}".encode() for i in range(5)]
        for i, b in enumerate(bodies):
            cloud.send("child1", b, f"%24.mid=m{i}&k=v")
        hub.wait_metric("edgehub_c2d_queued", lambda v: v == 5, 15, "five messages stored for child1")
        hub.kill9()
        hub.start()
        hub.wait_metric("edgehub_c2d_queued", lambda v: v == 5, 15, "the five still stored after a kill -9")

        rc, d1 = try_connect(hub.port, clients, **child1.credentials())
        assert rc == 0 and d1.subscribe_result(["devices/child1/messages/devicebound/#"]) == [1]
        prefix = "devices/child1/messages/devicebound/"
        d1._wait(lambda: len(received(d1, prefix)) >= 5, 15, "child1's messages")
        assert received(d1, prefix) == bodies, "in the order the cloud sent them"
        with d1.cond:
            topics = [t for t, _ in d1.messages if t.startswith(prefix)]
        assert topics[0] == "devices/child1/messages/devicebound/%24.mid=m0&k=v", "the cloud's property bag as sent"
        hub.wait_metric("edgehub_c2d_queued", lambda v: v == 0, 15, "every acknowledged message removed")
        done = cloud.sub.wait_for(lambda ms: len(cloud.completions("child1")) >= 5, 30, "five completions upstream")
        assert [c["topic"] for c in cloud.completions("child1")] == topics
        assert not received(d2, "devices/"), "child2 got child1's messages"
    finally:
        cloud.close()


def test_a_flood_to_a_device_away_keeps_its_first_messages_and_refuses_the_rest_with_a_count(
    sub_upstream, hub_factory, clients
):
    child1 = Identity.child("child1")
    hub = hub_factory(sub_upstream, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(sub_upstream, [child1])
    wait_scope(hub, 1)
    wait_devicebound_subscribed(sub_upstream, "child1")
    cloud = Cloud(sub_upstream)
    try:
        # (summed over reasons; nothing else is dropped here)
        before = hub.metric("edgehub_messages_dropped_total")
        for i in range(BOUND + 5):
            cloud.send("child1", f"flood-{i}".encode())
        hub.wait_metric("edgehub_messages_dropped_total", lambda v: v == before + 5, 20, "five refused")
        assert 'edgehub_messages_dropped_total{reason="device_queue_full"} 5' in hub.metrics_text()
        assert 'edgehub_cloud_refused_total{kind="c2d",reason="queue_full"} 5\n' in hub.metrics_text()
        assert hub.metric("edgehub_c2d_queued") == BOUND
        rc, d1 = try_connect(hub.port, clients, **child1.credentials())
        assert rc == 0 and d1.subscribe_result(["devices/child1/messages/devicebound/#"]) == [1]
        prefix = "devices/child1/messages/devicebound/"
        d1._wait(lambda: len(received(d1, prefix)) >= BOUND, 20, "the kept messages")
        assert received(d1, prefix) == [f"flood-{i}".encode() for i in range(BOUND)]
        hub.wait_metric("edgehub_c2d_queued", lambda v: v == 0, 15, "all acknowledged")
        assert hub.proc.poll() is None
    finally:
        cloud.close()


def test_an_sdk_device_receives_the_messages_stored_for_it_with_their_properties(
    sdk_python, sub_upstream, hub_factory, tmp_path_factory, tmp_path
):
    certs = make_certs(tmp_path_factory.mktemp("c2d-certs"))
    child1 = Identity.child("child1")
    hub = start_gateway(hub_factory, sub_upstream, certs)
    publish_scope(sub_upstream, [child1])
    wait_scope(hub, 1)
    wait_devicebound_subscribed(sub_upstream, "child1")
    cloud = Cloud(sub_upstream)
    try:
        cloud.send("child1", b'{"cmd": "on"}', "%24.mid=m1&color=red")
        cloud.send("child1", b'{"cmd": "off"}', "%24.mid=m2&color=blue")
        hub.wait_metric("edgehub_c2d_queued", lambda v: v == 2, 15, "two messages stored for child1")
        out = run_sdk(sdk_python, child1, certs["ca"], log=tmp_path / "sdk-c2d.log",
                      steps=[{"op": "receive_messages", "count": 2, "timeout": 30}])
        assert out.get("error") is None and out["steps"][0]["ok"], describe_sdk(out)
        got = out["steps"][0]["messages"]
        assert [(m["data"], m["message_id"], m["properties"]) for m in got] == [
            ('{"cmd": "on"}', "m1", {"color": "red"}),
            ('{"cmd": "off"}', "m2", {"color": "blue"}),
        ], describe_sdk(out)
        hub.wait_metric("edgehub_c2d_queued", lambda v: v == 0, 15, "both acknowledged by the SDK")
        cloud.sub.wait_for(lambda ms: len(cloud.completions("child1")) >= 2, 30, "two completions upstream")
    finally:
        cloud.close()


def test_an_sdk_device_that_reconnects_by_itself_after_a_hub_restart_gets_the_messages_stored_while_it_was_away_without_subscribing_again(
    sdk_python, sub_upstream, hub_factory, tmp_path_factory, tmp_path
):
    """The unchanged SDK subscribes to its cloud-to-device topic when its
    handler is set, once per client: a fresh SDK process always subscribes
    anew (every feature starts off), so it cannot show that the hub kept the
    subscription. One SDK process therefore stays alive across the restarts
    and reconnects by itself (its connection_retry, every second) with clean
    session off and, as the SDK does, without subscribing again; its DEBUG log
    (paho's lines) shows its one SUBSCRIBE and the CONNACKs.

    The device is away while a hub runs on the same storage without a
    listener on 8883 (the only port the SDK can reach): the cloud sends two
    messages then, they are stored, the upstream stops, that hub is killed
    (-9) and the gateway comes back on 8883 with the upstream down."""
    import re
    import threading

    from authkit import SDK_PORT, require_port_free, wait_tls_listener
    from helpers import wait_until

    certs = make_certs(tmp_path_factory.mktemp("c2d-restart-certs"))
    child1 = Identity.child("child1")
    gateway = start_gateway(hub_factory, sub_upstream, certs)
    publish_scope(sub_upstream, [child1])
    wait_scope(gateway, 1)
    # The hub's upstream session is persistent (same client id for both hubs
    # here): this subscription stays on the broker across the kill -9 below.
    wait_devicebound_subscribed(sub_upstream, "child1")
    unreachable = hub_factory(sub_upstream, start=False, edge_id=EDGE_ID, extra_args=auth_args(),
                              storage=gateway.storage, name="hub-without-8883")
    log = tmp_path / "sdk-c2d-restart.log"

    def sdk_log() -> str:
        return log.read_text(errors="replace") if log.exists() else ""

    result: dict = {}
    sdk = threading.Thread(target=lambda: result.update(run_sdk(
        sdk_python, child1, certs["ca"], log=log, retry_secs=1, timeout=150,
        steps=[{"op": "receive_messages", "count": 2, "timeout": 120}])))
    sdk.start()
    cloud = None
    try:
        wait_until(lambda: "Successfully enabled feature:c2d" in sdk_log(), 60,
                   "the SDK subscribed to its cloud-to-device messages")
        gateway.kill9()  # the device is away from here on
        unreachable.start()
        wait_scope(unreachable, 1)
        cloud = Cloud(sub_upstream)
        cloud.send("child1", b'{"cmd": "on"}', "%24.mid=m1&color=red")
        cloud.send("child1", b'{"cmd": "off"}', "%24.mid=m2&color=blue")
        unreachable.wait_metric("edgehub_c2d_queued", lambda v: v == 2, 15, "two messages stored for child1")
        sub_upstream.stop()
        unreachable.kill9()
        require_port_free(SDK_PORT)
        gateway.start()
        wait_tls_listener(gateway, SDK_PORT)
    finally:
        sdk.join(150)
        if cloud is not None:
            cloud.close()
    assert not sdk.is_alive(), "the SDK driver did not finish"
    assert result.get("error") is None and result["steps"][0]["ok"], describe_sdk(result)
    got = result["steps"][0]["messages"]
    assert [(m["data"], m["message_id"], m["properties"]) for m in got] == [
        ('{"cmd": "on"}', "m1", {"color": "red"}),
        ('{"cmd": "off"}', "m2", {"color": "blue"}),
    ], describe_sdk(result)
    text = sdk_log()
    subscribes = [ln for ln in text.splitlines() if "Sending SUBSCRIBE" in ln and "devicebound" in ln]
    assert len(subscribes) == 1, "the SDK subscribed again, so this no longer shows the kept subscription:\n" \
        + "\n".join(subscribes)
    connacks = re.findall(r"Received CONNACK \((\d+), (\d+)\)", text)
    assert len(connacks) >= 2 and connacks[-1] == ("1", "0"), \
        f"the SDK's reconnect was not told its session is present: CONNACK (flags, code) {connacks}"
    gateway.wait_metric("edgehub_c2d_queued", lambda v: v == 0, 15, "both acknowledged by the SDK")


def iothub_time(at) -> str:
    """An RFC 3339 UTC time as IoT Hub writes `$.exp` (seven fractional
    digits), percent-encoded for a property bag."""
    from urllib.parse import quote

    return quote(at.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z", safe="")


def test_a_message_past_its_expiry_is_not_delivered_to_a_device_that_connects_and_one_still_valid_is(
    sub_upstream, hub_factory, clients
):
    from datetime import datetime, timedelta, timezone

    from helpers import wait_until

    child1 = Identity.child("child1")
    hub = hub_factory(sub_upstream, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(sub_upstream, [child1])
    wait_scope(hub, 1)
    wait_devicebound_subscribed(sub_upstream, "child1")
    cloud = Cloud(sub_upstream)
    try:
        expired_before = hub.metric("edgehub_messages_expired_total")
        now = datetime.now(timezone.utc)
        cloud.send("child1", b"stale", f"%24.mid=old&%24.exp={iothub_time(now - timedelta(hours=1))}")
        cloud.send("child1", b"fresh", f"%24.mid=new&%24.exp={iothub_time(now + timedelta(hours=1))}")

        def taken_in() -> bool:
            # each either stored or already dropped as expired
            m = hub.metrics()
            return m["edgehub_c2d_queued"] + m["edgehub_messages_expired_total"] - expired_before == 2

        wait_until(taken_in, 15, "both messages taken in")
        rc, d1 = try_connect(hub.port, clients, **child1.credentials())
        assert rc == 0 and d1.subscribe_result(["devices/child1/messages/devicebound/#"]) == [1]
        prefix = "devices/child1/messages/devicebound/"
        d1._wait(lambda: b"fresh" in received(d1, prefix), 15, "the message still valid")
        hub.wait_metric("edgehub_c2d_queued", lambda v: v == 0, 15, "nothing left for child1")
        assert hub.metric("edgehub_messages_expired_total") == expired_before + 1, "the stale one counted as expired"
        assert received(d1, prefix) == [b"fresh"], "the expired message was delivered"
        cloud.sub.wait_for(lambda ms: len(cloud.completions("child1")) >= 1, 30, "a completion upstream")
        assert ["%24.mid=new" in c["topic"] for c in cloud.completions("child1")] == [True]
    finally:
        cloud.close()


def test_the_bound_of_a_devices_queue_is_configured_by_c2d_max_messages(sub_upstream, hub_factory, clients):
    child1 = Identity.child("child1")
    hub = hub_factory(sub_upstream, edge_id=EDGE_ID, extra_args=[*auth_args(), "--c2d-max-messages", "3"])
    publish_scope(sub_upstream, [child1])
    wait_scope(hub, 1)
    wait_devicebound_subscribed(sub_upstream, "child1")
    cloud = Cloud(sub_upstream)
    try:
        for i in range(5):
            cloud.send("child1", f"bounded-{i}".encode())
        hub.wait_metric("edgehub_messages_dropped_total", lambda v: v == 2, 20, "two refused")
        assert 'edgehub_messages_dropped_total{reason="device_queue_full"} 2' in hub.metrics_text()
        assert hub.metric("edgehub_c2d_queued") == 3
        rc, d1 = try_connect(hub.port, clients, **child1.credentials())
        assert rc == 0 and d1.subscribe_result(["devices/child1/messages/devicebound/#"]) == [1]
        prefix = "devices/child1/messages/devicebound/"
        d1._wait(lambda: len(received(d1, prefix)) >= 3, 15, "the kept messages")
        hub.wait_metric("edgehub_c2d_queued", lambda v: v == 0, 15, "all acknowledged")
        assert received(d1, prefix) == [f"bounded-{i}".encode() for i in range(3)]
    finally:
        cloud.close()
