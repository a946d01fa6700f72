"""--max-queue-bytes: when the queue is full new upstream-bound publishes are
refused, nothing stored is lost, and publishes are accepted again after the
queue drains."""

import paho.mqtt.client as mqtt

from helpers import PUBACK, Publisher, RawClient, publish_packet

QUOTA = 20_000
TOPIC = "devices/q1/messages/events/%24.ct=text%2Fplain"


def test_full_queue_refuses_with_0x97_for_v5_disconnects_v311_and_recovers_after_drain(
    offline_upstream, hub_factory, clients
):
    up, collector = offline_upstream()
    hub = hub_factory(up, max_queue_bytes=QUOTA, edge_id="edge-quota")

    v5 = Publisher(hub.port, protocol=mqtt.MQTTv5)
    clients.append(v5.connect())
    payload_pad = b"x" * 150
    accepted = []
    refused_at = None
    for i in range(2000):  # 2000 * 150 bytes is 15x the quota: must hit it
        rc = v5.publish_and_wait(TOPIC, str(i).encode() + b":" + payload_pad, key=i)
        if rc == 0x97:
            refused_at = i
            break
        assert rc < 0x80, f"publish {i}: unexpected reason code {rc:#x}"
        accepted.append(i)
    assert refused_at is not None, "no PUBACK 0x97 (quota exceeded) within 2000 publishes"
    assert accepted, "the very first publish was refused"
    assert v5.connected.is_set(), "v5 client should stay connected after a 0x97 PUBACK"

    stats = hub.wait_queue_depth(len(accepted))
    assert stats["bytes"] <= QUOTA, f"queue bytes {stats['bytes']} above quota {QUOTA}"

    # a 3.1.1 client has no way to be told "quota exceeded": it is disconnected
    r = RawClient(hub.port)
    clients.append(r)
    _, _, body = r.connect(level=4)
    assert body[1] == 0
    r.send(publish_packet(TOPIC, b"v311-over-quota", qos=1, packet_id=1))
    packets = r.read_until_closed(10)
    assert r.closed, "3.1.1 client not disconnected when publishing into a full queue"
    assert not [p for p in packets if p[0] == PUBACK], f"3.1.1 client got a PUBACK for a refused message: {packets}"

    # QoS 0 upstream-bound publishes are dropped and counted
    dropped_before = hub.metric("edgehub_messages_dropped_total")
    v5.publish(TOPIC, b"qos0-over-quota", qos=0)
    hub.wait_metric("edgehub_messages_dropped_total", lambda v: v >= dropped_before + 1, 10, "to count the QoS 0 drop")
    assert hub.metric("edgehub_messages_refused_total") >= 1

    assert hub.alive()
    hub.wait_queue_depth(len(accepted))  # stored messages unchanged while refusing

    up.start()
    expected = [str(i).encode() + b":" + payload_pad for i in accepted]
    msgs = collector.wait_count(len(accepted), 60)
    hub.wait_queue_depth(0, 30)
    msgs = collector.snapshot()
    assert [p for _, p in msgs] == expected, (
        f"upstream got {len(msgs)} messages, expected exactly the {len(expected)} accepted ones in order"
    )

    # accepted again after the drain, and forwarded
    rc = v5.publish_and_wait(TOPIC, b"after-drain", key="after")
    assert rc < 0x80, f"publish after drain refused with {rc:#x}"
    msgs = collector.wait_payload(b"after-drain", 20)
    payloads = [p for _, p in msgs]
    assert b"v311-over-quota" not in payloads, "a refused 3.1.1 message was stored and forwarded"
    assert b"qos0-over-quota" not in payloads, "a dropped QoS 0 message was forwarded"
    assert str(refused_at).encode() + b":" + payload_pad not in payloads, "a 0x97-refused message was forwarded"
    assert payloads == expected + [b"after-drain"]
