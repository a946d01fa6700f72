"""Direct methods from the cloud: a call published on the upstream broker
(`devices/{d}[/modules/{m}]/methods/{name}/{rid}`) reaches the connected
identity on its own `$iothub/methods/POST/...`, and its answer comes back on
`.../methods/res/{status}/{rid}`; not connected -> 404, silent -> 504, a bad
call -> 400; an answer from anyone but the identity called is ignored; an
answer given while the upstream is down reaches the caller once the link is
back (the hub publishes answers at QoS 1 until the cloud has them). With
paho for the exact topics, and the unchanged Azure IoT device SDK for Python
answering a call."""

from __future__ import annotations

import json
import threading
import uuid

import pytest

from authkit import (
    EDGE_ID,
    Identity,
    auth_args,
    describe_sdk,
    hub_publishes,
    make_certs,
    publish_scope,
    run_sdk,
    start_gateway,
    try_connect,
    wait_scope,
)
from helpers import LOOPBACK, Subscriber

import paho.mqtt.client as mqtt


class Cloud:
    """The cloud side on the upstream broker: publishes calls, reads answers."""

    def __init__(self, upstream, persistent: bool = False):
        """``persistent``: the caller's session (clean session off, its
        subscriptions to answers at QoS 1) outlives a restart of the upstream
        broker, which keeps the answers that come while the caller is away;
        it reconnects by itself."""
        self.sub = Subscriber(upstream.port, clean=not persistent)
        self.sub.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        self.sub.connect()
        self.sub.subscribe("devices/+/methods/res/#")
        self.sub.subscribe("devices/+/modules/+/methods/res/#")
        self.pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"cloud-{uuid.uuid4().hex[:8]}")
        self.pub.connect(LOOPBACK, upstream.port)
        self.pub.loop_start()

    def call(self, root: str, method: str, body: dict | bytes) -> str:
        rid = uuid.uuid4().hex[:12]
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        info = self.pub.publish(f"{root}/methods/{method}/{rid}", payload, qos=1)
        info.wait_for_publish(10)
        return rid

    def answer(self, root: str, rid: str, timeout: float) -> tuple[int, dict]:
        """(status, payload) of the first answer to call ``rid``."""
        self.sub.wait_for(lambda ms: any(self._answers_to(root, rid, [m]) for m in ms), timeout,
                          f"the answer to call {rid}")
        return self.answers(root, rid)[0]

    def answers(self, root: str, rid: str) -> list[tuple[int, dict]]:
        """(status, payload) of every answer to call ``rid`` received so far."""
        with self.sub.cond:
            return self._answers_to(root, rid, self.sub.messages)

    @staticmethod
    def _answers_to(root: str, rid: str, msgs) -> list[tuple[int, dict]]:
        prefix = f"{root}/methods/res/"
        out = []
        for m in msgs:
            if m.topic.startswith(prefix) and m.topic.endswith(f"/{rid}"):
                status = int(m.topic[len(prefix):].split("/")[0])
                body = json.loads(m.payload)
                assert body["status"] == status, (m.topic, body)
                out.append((status, body["payload"]))
        return out

    def close(self):
        self.sub.close()
        self.pub.loop_stop()
        self.pub.disconnect()


@pytest.fixture
def cloud(upstream):
    c = Cloud(upstream)
    yield c
    c.close()


def call_received(c, timeout: float = 15.0) -> tuple[str, str, bytes]:
    """(method, rid, payload) of the next call a paho device received."""
    prefix = "$iothub/methods/POST/"
    c._wait(lambda: any(t.startswith(prefix) for t, _ in c.messages), timeout, "a method call")
    with c.cond:
        i = next(i for i, (t, _) in enumerate(c.messages) if t.startswith(prefix))
        topic, payload = c.messages.pop(i)
    method, query = topic[len(prefix):].split("/?", 1)
    return method, query.split("$rid=", 1)[1], payload


def test_a_cloud_call_reaches_the_device_and_its_answer_goes_back_and_no_one_else_can_answer_it(
    upstream, cloud, hub_factory, clients
):
    child1, child2 = Identity.child("child1"), Identity.child("child2")
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(upstream, [child1, child2])
    wait_scope(hub, 2)
    rc, d1 = try_connect(hub.port, clients, **child1.credentials())
    assert rc == 0 and d1.subscribe_result(["$iothub/methods/POST/#"]) in ([0], [1])
    rc, d2 = try_connect(hub.port, clients, protocol=mqtt.MQTTv5, **child2.credentials())
    assert rc == 0 and d2.subscribe_result(["$iothub/methods/POST/#"]) in ([0], [1])

    rid = cloud.call("devices/child1", "reboot", {"payload": {"delay": 5}, "responseTimeoutInSeconds": 30})
    method, hub_rid, payload = call_received(d1)
    assert (method, json.loads(payload)) == ("reboot", {"delay": 5})
    # child2 tries to answer child1's call first: ignored (v5: still acknowledged)
    assert d2.publish_result(f"$iothub/methods/res/500/?$rid={hub_rid}", b'{"fake": true}') == 0
    # and the answer to a call that never happened changes nothing either
    assert d1.publish_result("$iothub/methods/res/200/?$rid=never", b"{}") == 0
    assert d1.publish_result(f"$iothub/methods/res/201/?$rid={hub_rid}", b'{"done": true}') == 0
    assert cloud.answer("devices/child1", rid, 15) == (201, {"done": True})
    assert not [t for t, _ in d2.messages if t.startswith("$iothub/methods/POST/")], "child2 saw child1's call"
    assert not d1.closed.is_set() and not d2.closed.is_set()


def test_a_call_to_an_identity_away_is_404_to_a_silent_one_504_and_a_bad_call_400(
    upstream, cloud, hub_factory, clients
):
    child1, mod1 = Identity.child("child1"), Identity.module("mod1")
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(upstream, [child1, mod1])
    wait_scope(hub, 2)
    rc, d1 = try_connect(hub.port, clients, **child1.credentials())
    assert rc == 0 and d1.subscribe_result(["$iothub/methods/POST/#"]) in ([0], [1])

    away = cloud.call(f"devices/{EDGE_ID}/modules/mod1", "m", {"payload": None})
    status, payload = cloud.answer(f"devices/{EDGE_ID}/modules/mod1", away, 15)
    assert status == 404 and "not connected" in payload["message"]

    for body, why in [
        ({"payload": 1, "responseTimeoutInSeconds": 1}, "responseTimeoutInSeconds"),
        ({"payload": 1, "connectTimeoutInSeconds": 301}, "connectTimeoutInSeconds"),
        (b"not json", "not a method request"),
        ({"payload": 1, "unknown": 2}, "not a method request"),
    ]:
        rid = cloud.call("devices/child1", "m", body)
        status, payload = cloud.answer("devices/child1", rid, 15)
        assert status == 400 and why in payload["message"], (body, payload)

    silent = cloud.call("devices/child1", "slow", {"payload": {}, "responseTimeoutInSeconds": 5})
    assert call_received(d1)[0] == "slow"
    status, payload = cloud.answer("devices/child1", silent, 30)
    assert status == 504 and "did not answer" in payload["message"]
    assert hub.proc.poll() is None



def test_an_sdk_device_answers_a_cloud_call_through_the_gateway(
    sdk_python, upstream, cloud, hub_factory, tmp_path_factory, tmp_path
):
    certs = make_certs(tmp_path_factory.mktemp("method-certs"))
    child1 = Identity.child("child1")
    hub = start_gateway(hub_factory, upstream, certs)
    publish_scope(upstream, [child1])
    wait_scope(hub, 1)

    result: dict = {}
    sdk = threading.Thread(target=lambda: result.update(run_sdk(
        sdk_python, child1, certs["ca"], log=tmp_path / "sdk-methods.log",
        steps=[{"op": "serve_methods", "count": 1, "timeout": 60}])))
    sdk.start()
    try:
        # the connect timeout covers the SDK connecting and subscribing
        rid = cloud.call("devices/child1", "getStatus",
                         {"payload": {"verbose": True}, "responseTimeoutInSeconds": 30,
                          "connectTimeoutInSeconds": 60})
        status, payload = cloud.answer("devices/child1", rid, 90)
    finally:
        sdk.join(120)
    assert status == 200, payload
    assert payload == {"echo": {"verbose": True}, "name": "getStatus"}, describe_sdk(result)
    assert result["steps"][0]["ok"], describe_sdk(result)


def test_an_answer_given_while_the_upstream_is_down_reaches_the_caller_once_the_link_is_back(
    upstream_factory, hub_factory, clients
):
    """The call is taken, the upstream broker stops, and only then does the
    device answer: the hub keeps the answer (QoS 1) and sends it once it is
    connected again. The caller's persistent session on the broker (which
    keeps its sessions across the restart) holds the answer for it. The
    broker logs every packet, so the test sees the QoS of the hub's answer."""
    upstream = upstream_factory(extra_conf=["log_type all"])
    upstream.start()
    child1 = Identity.child("child1")
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(upstream, [child1])
    wait_scope(hub, 1)
    rc, d1 = try_connect(hub.port, clients, **child1.credentials())
    assert rc == 0 and d1.subscribe_result(["$iothub/methods/POST/#"]) in ([0], [1])
    caller = Cloud(upstream, persistent=True)
    clients.append(caller)

    rid = caller.call("devices/child1", "reboot", {"payload": {"delay": 5}, "responseTimeoutInSeconds": 120})
    method, hub_rid, payload = call_received(d1)
    assert (method, json.loads(payload)) == ("reboot", {"delay": 5})

    upstream.stop()
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 0, 15, "== 0 (the upstream gone)")
    assert d1.publish_result(f"$iothub/methods/res/201/?$rid={hub_rid}", b'{"rebooted": true}') == 0
    upstream.start()

    device_answer = (201, {"rebooted": True})
    assert caller.answer("devices/child1", rid, 60) == device_answer
    # QoS 1 may bring it twice, never anything else (a 504 from the hub)
    others = [a for a in caller.answers("devices/child1", rid) if a != device_answer]
    assert others == [], f"the caller got another answer too: {others}"
    sent = hub_publishes(upstream, f"devices/child1/methods/res/201/{rid}")
    assert sent and {(qos, retain) for qos, retain, _ in sent} == {(1, 0)}, \
        f"the answer did not go up at QoS 1, not retained: (QoS, retain, mid) {sent}"
    assert hub.alive() and not d1.closed.is_set()
