"""Local clients talk to each other through the hub with no upstream at all."""

import paho.mqtt.client as mqtt
import pytest

from helpers import Publisher, RawClient, Subscriber


@pytest.fixture
def hub(hub_factory):
    return hub_factory(None, edge_id="edge-local")


def sub(hub, clients, **kw):
    s = Subscriber(hub.port, **kw)
    clients.append(s)
    return s.connect()


def pub(hub, clients, **kw):
    p = Publisher(hub.port, **kw)
    clients.append(p)
    return p.connect()


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["v311", "v5"])
def test_retained_message_is_delivered_to_a_later_subscriber(hub, clients, protocol):
    p = pub(hub, clients, protocol=protocol)
    p.publish("local/ret/room1", b"22.5", qos=1, retain=True)
    p.wait_results(1, 10)
    assert p.results and all(rc < 0x80 for rc in p.results.values())

    s = sub(hub, clients, protocol=protocol)
    s.subscribe("local/ret/#", qos=1)
    m = s.wait_topic("local/ret/room1")
    assert m.payload == b"22.5"
    assert m.retain, "retained message delivered without the retain flag"


def test_will_message_is_delivered_when_a_client_socket_drops_without_disconnect(hub, clients):
    s = sub(hub, clients)
    s.subscribe("local/will/#", qos=1)

    dying = RawClient(hub.port)
    clients.append(dying)
    _, _, body = dying.connect(client_id="dying-device", level=4, will=("local/will/dying-device", b"gone", 1))
    assert body[1] == 0
    dying.close(abort=True)  # RST, no DISCONNECT

    m = s.wait_topic("local/will/dying-device", timeout=15)
    assert m.payload == b"gone"


def test_will_message_is_not_sent_after_a_clean_disconnect(hub, clients):
    s = sub(hub, clients)
    s.subscribe("local/will/#", qos=1)

    polite = RawClient(hub.port)
    clients.append(polite)
    _, _, body = polite.connect(client_id="polite-device", level=4, will=("local/will/polite-device", b"gone", 1))
    assert body[1] == 0
    polite.send(b"\xe0\x00")  # DISCONNECT
    polite.read_until_closed(10)

    p = pub(hub, clients)
    assert p.publish_and_wait("local/will/sentinel", b"sentinel") < 0x80
    s.wait_topic("local/will/sentinel")
    assert ("local/will/polite-device", b"gone") not in s.received(), "will published after a clean DISCONNECT"


def test_single_and_multi_level_wildcards_match_the_right_topics(hub, clients):
    plus = sub(hub, clients)
    plus.subscribe("sensors/+/temp", qos=1)
    hash_ = sub(hub, clients, protocol=mqtt.MQTTv5)
    hash_.subscribe("sensors/#", qos=1)

    p = pub(hub, clients)
    topics = ["sensors/a/temp", "sensors/a/b/temp", "sensors/b/humidity", "sensors", "other/a/temp"]
    for t in topics:
        assert p.publish_and_wait(t, t.encode()) < 0x80
    p.publish("sensors/z/temp", b"qos0-last", qos=0)

    want_plus = {"sensors/a/temp", "sensors/z/temp"}
    # "sensors/#" also matches the parent level "sensors"
    want_hash = {"sensors/a/temp", "sensors/a/b/temp", "sensors/b/humidity", "sensors", "sensors/z/temp"}
    plus.wait_for(lambda ms: {m.topic for m in ms} >= want_plus, 10, f"{want_plus} via +")
    hash_.wait_for(lambda ms: {m.topic for m in ms} >= want_hash, 10, f"{want_hash} via #")

    assert sorted(t for t, _ in plus.received()) == sorted(want_plus)
    assert sorted(t for t, _ in hash_.received()) == sorted(want_hash)


def test_qos2_publish_completes_and_is_delivered_once_at_the_granted_qos(hub, clients):
    s = sub(hub, clients)
    granted = s.subscribe("local/q2/#", qos=2)
    assert granted in (1, 2), f"granted QoS {granted}"
    p = pub(hub, clients)
    rc = p.publish_and_wait("local/q2/x", b"exactly-once", qos=2)
    assert rc < 0x80
    assert p.publish_and_wait("local/q2/sentinel", b"sentinel", qos=2) < 0x80

    msgs = s.wait_for(lambda ms: any(m.topic == "local/q2/sentinel" for m in ms), 10, "sentinel")
    got = [m for m in msgs if m.topic == "local/q2/x"]
    assert len(got) == 1, f"QoS 2 message delivered {len(got)} times"
    assert got[0].payload == b"exactly-once"
    # delivered at min(publish QoS, granted QoS); a server may grant less than 2
    assert got[0].qos == granted, f"delivered at QoS {got[0].qos}, subscription granted {granted}"


def test_persistent_session_gets_messages_published_while_it_was_away(hub, clients):
    cid = "persistent-sub-1"
    s1 = Subscriber(hub.port, client_id=cid, clean=False)
    s1.connect()
    s1.subscribe("local/persist/#", qos=1)
    s1.close()

    p = pub(hub, clients)
    assert p.publish_and_wait("local/persist/a", b"while-away") < 0x80

    s2 = sub(hub, clients, client_id=cid, clean=False)
    assert s2.session_present, "session not present on reconnect with clean_session=False"
    m = s2.wait_topic("local/persist/a", timeout=10)
    assert m.payload == b"while-away"


def test_clean_session_does_not_keep_subscriptions(hub, clients):
    cid = "clean-sub-1"
    s1 = Subscriber(hub.port, client_id=cid, clean=True)
    s1.connect()
    s1.subscribe("local/clean/#", qos=1)
    s1.close()

    p = pub(hub, clients)
    assert p.publish_and_wait("local/clean/a", b"nobody-home") < 0x80

    s2 = sub(hub, clients, client_id=cid, clean=True)
    assert not s2.session_present
    assert p.publish_and_wait("local/clean/sentinel", b"s") < 0x80
    # s2 has no subscription: it must receive nothing, not even the sentinel
    s3 = sub(hub, clients)
    s3.subscribe("local/clean/#", qos=1)
    assert p.publish_and_wait("local/clean/sentinel2", b"s2") < 0x80
    s3.wait_topic("local/clean/sentinel2")
    assert s2.received() == []
