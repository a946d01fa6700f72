"""What the cloud sends is acknowledged only once the hub has dealt with it.

The cloud publishes device scope documents (QoS 1) far faster than the hub
applies them (each is parsed, encrypted and fsynced to the scope cache): the
hub's link holds back its PUBACKs, the broker's flow control holds the rest,
and every document is applied, in order. None is acknowledged and dropped.
"""

from __future__ import annotations

import re
import threading
import uuid

import paho.mqtt.client as mqtt

from authkit import EDGE_ID, Identity, auth_args, scope_doc, scope_topic
from helpers import LOOPBACK, wait_until

DOCS = 300


def test_a_flood_of_cloud_messages_is_applied_in_full_in_order(upstream, hub_factory):
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 20, "== 1")
    identities = [Identity.child(f"d{i}") for i in range(3)]

    cloud = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"cloud-{uuid.uuid4().hex[:8]}",
                        protocol=mqtt.MQTTv311)
    cloud.max_inflight_messages_set(DOCS)
    connected = threading.Event()
    cloud.on_connect = lambda *a: connected.set()
    cloud.connect(LOOPBACK, upstream.port, keepalive=30)
    cloud.loop_start()
    try:
        assert connected.wait(10), "the cloud client could not connect"
        sent = [cloud.publish(scope_topic(), scope_doc(identities, version=v), qos=1) for v in range(1, DOCS + 1)]
        for info in sent:
            info.wait_for_publish(30)
            assert info.is_published(), "the broker took every document"
    finally:
        cloud.disconnect()
        cloud.loop_stop()

    applied_re = re.compile(r"device scope applied[^\n]*version=(\d+)")

    def applied() -> list[int]:
        return [int(v) for v in applied_re.findall(hub.log_path.read_text(errors="replace"))]

    wait_until(lambda: DOCS in applied(), 60, f"scope version {DOCS} to be applied")
    versions = applied()
    firsts = list(dict.fromkeys(versions))
    assert firsts == list(range(1, DOCS + 1)), (
        f"every document applied once, in order; missing {sorted(set(range(1, DOCS + 1)) - set(versions))[:20]}"
    )
    assert "cloud message dropped" not in hub.log_path.read_text(errors="replace")
