"""Telemetry goes upstream: online pass-through, offline queueing, --forward-topic."""

import paho.mqtt.client as mqtt

from helpers import Publisher, Subscriber, queue_stats


def test_telemetry_from_v311_and_v5_clients_reaches_upstream_with_exact_topic_and_payload(
    upstream, collector_factory, hub_factory, clients
):
    collector = collector_factory(upstream)
    hub = hub_factory(upstream, edge_id="edge-1")

    sent = [
        (mqtt.MQTTv311, "devices/d1/messages/events/%24.ct=application%2Fjson&temp=21", b'{"temp":21}'),
        (mqtt.MQTTv311, "devices/d1/messages/events/", b"\x00\x01\x02binary\xff"),
        (mqtt.MQTTv5, "devices/d2/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8&temp=22", b'{"temp":22}'),
        (mqtt.MQTTv5, "devices/d2/modules/m1/messages/events/%24.on=out1&k=a%20b", b"module says hi"),
    ]
    pubs = {}
    for proto in (mqtt.MQTTv311, mqtt.MQTTv5):
        p = Publisher(hub.port, protocol=proto)
        clients.append(p)
        pubs[proto] = p.connect()
    for proto, topic, payload in sent:
        rc = pubs[proto].publish_and_wait(topic, payload, qos=1)
        assert rc < 0x80, f"publish on {topic} refused with reason code {rc:#x}"

    expected = [(t, p) for _, t, p in sent]
    got = collector.wait_for(
        lambda msgs: all(e in msgs for e in expected), 20, "all telemetry upstream with exact topics"
    )
    assert sorted(set(got)) == sorted(set(expected)), f"unexpected upstream traffic: {got}"


def test_qos0_telemetry_is_forwarded_too(upstream, collector_factory, hub_factory, clients):
    collector = collector_factory(upstream)
    hub = hub_factory(upstream)
    p = Publisher(hub.port)
    clients.append(p.connect())
    topic = "devices/d9/messages/events/q=0"
    p.publish(topic, b"qos0-payload", qos=0)
    got = collector.wait_payload(b"qos0-payload", 20)
    assert (topic, b"qos0-payload") in got


def test_ten_thousand_messages_queued_offline_all_arrive_in_order_when_upstream_appears(
    offline_upstream, hub_factory, clients
):
    up, collector = offline_upstream()
    hub = hub_factory(up, edge_id="edge-offline")
    n = 10_000
    topic = "devices/d1/messages/events/%24.ct=text%2Fplain&batch=offline"

    pub = Publisher(hub.port, inflight=500)
    clients.append(pub.connect())
    for i in range(n):
        pub.publish(topic, str(i).encode(), qos=1, key=i)
    pub.wait_results(n, timeout=120)
    refused = {k: rc for k, rc in pub.results.items() if rc >= 0x80}
    assert not refused, f"some publishes were refused: {list(refused.items())[:5]}"
    assert sorted(pub.acked) == list(range(n))

    stats = hub.wait_queue_depth(n)
    assert stats["bytes"] > 0, f"queue stats: {stats}"
    assert stats["oldest_age_secs"] >= 0, f"queue stats: {stats}"
    js = hub.wait_queue_depth(n, as_json=True)
    assert js["bytes"] == stats["bytes"], f"queue stats --json: {js} vs text: {stats}"
    assert set(js) >= {"depth", "oldest_age_secs", "bytes"}

    # nothing may have gone anywhere yet
    assert collector.count() == 0

    up.start()
    msgs = collector.wait_count(n, timeout=120)
    payloads = [int(p) for _, p in msgs]
    assert payloads == list(range(n)), (
        f"upstream did not receive exactly 0..{n - 1} in order; first mismatch at "
        f"{next((i for i, (a, b) in enumerate(zip(payloads, range(n))) if a != b), len(payloads))}"
    )
    assert all(t == topic for t, _ in msgs), "topic changed on the way upstream"
    assert not collector.session_lost

    hub.wait_queue_depth(0, 30)


def test_queue_stats_works_while_the_hub_is_stopped(hub_factory, clients):
    hub = hub_factory(None)
    pub = Publisher(hub.port)
    clients.append(pub.connect())
    for i in range(5):
        assert pub.publish_and_wait("devices/d1/messages/events/", str(i).encode()) < 0x80
    pub.close()
    hub.terminate()
    stats = queue_stats(hub.binary, hub.storage)
    assert stats["depth"] == 5, stats
    # and the messages are still there after a restart
    hub.start()
    hub.wait_queue_depth(5)


def test_local_topic_matching_forward_topic_is_forwarded_and_others_stay_local(
    upstream, collector_factory, hub_factory, clients
):
    collector = collector_factory(upstream, filters=["plant/#", "local/#"])
    hub = hub_factory(upstream, forward_topics=["plant/+/alarm"])

    local_sub = Subscriber(hub.port)
    clients.append(local_sub.connect())
    local_sub.subscribe("local/#", qos=1)

    pub = Publisher(hub.port)
    clients.append(pub.connect())
    # published first: if these were (wrongly) forwarded they would arrive first
    assert pub.publish_and_wait("local/status", b"stay-here") < 0x80
    assert pub.publish_and_wait("plant/line1/temperature", b"stay-here-too") < 0x80
    assert pub.publish_and_wait("plant/line1/alarm", b"fire") < 0x80

    got = collector.wait_payload(b"fire", 20)
    assert got == [("plant/line1/alarm", b"fire")], f"upstream got {got}"
    # the local-only message is still delivered locally
    assert local_sub.wait_topic("local/status").payload == b"stay-here"
