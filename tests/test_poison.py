"""No message can stall or corrupt the upstream queue.

A filter plugin that rewrites topics into forms no broker takes (NUL,
wildcards, empty, over 64 KiB) never gets them into the store: the route's
onError policy decides (here the default, a dead letter sent upstream on the
hub's own `$edgeHub` output). A message the upstream refuses (Mosquitto drops
the connection on a packet over its `max_packet_size`) is moved to the
store's dead-letter area after three refusals in a row, and everything
behind it arrives in order. The dead letters are listed, replayed and purged
with `edgehub queue dead-letters`, on a running hub and on a stopped one.
"""

from __future__ import annotations

import json
import subprocess

import paho.mqtt.client as mqtt

from helpers import Publisher, first_occurrences, hub_env, wait_until
from pluginkit import LogWatch, connect_publisher, dead_letter_props, plugin_hub, plugins_dist, publish_all  # noqa: F401

EDGE = "edge-poison"
MAX_PACKET = 20_000
# message index -> what the hostile plugin does to its topic
BAD_TOPICS = {5: "topic-nul", 10: "topic-wildcard", 15: "topic-empty", 20: "topic-long"}
BIG = 25  # over the upstream's max_packet_size: refused by the broker
COUNT = 40


def body(i: int) -> bytes:
    if i in BAD_TOPICS:
        return f"hostile={BAD_TOPICS[i]} seq={i}".encode()
    if i == BIG:
        return f"big seq={i} ".encode() + b"x" * (MAX_PACKET + 10_000)
    return f"seq={i}".encode()


def dead_letters(hub, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [hub.binary, "queue", "dead-letters", *args, "--storage", str(hub.storage)],
        capture_output=True, timeout=30, env=hub_env(),
    )
    assert r.returncode == 0, f"dead-letters {args} exited {r.returncode}: {r.stderr.decode()}"
    return r


def listed(hub) -> list[dict]:
    out = dead_letters(hub, "list", "--json").stdout.decode()
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_poison_topics_and_refused_messages_never_stall_the_queue(
    upstream_factory, collector_factory, plugin_hub, plugins_dist, clients  # noqa: F811
):
    up = upstream_factory(extra_conf=[f"max_packet_size {MAX_PACKET}"])
    up.start()
    collector = collector_factory(up, filters=["plain/#", "devices/+/modules/+/messages/events/#"])
    ph = plugin_hub(
        up,
        routes={"all": 'FROM /messages/* INTO plugin("hostile") THEN $upstream'},
        plugins={"hostile": plugins_dist / "hostile.wasm"},
        edge_id=EDGE,
        forward_topics=["plain/#"],
    )
    ph.wait_loaded("hostile")
    pub = connect_publisher(ph.port, clients)
    publish_all(pub, [("plain/seq", body(i)) for i in range(COUNT)], timeout=30)

    good = [body(i) for i in range(COUNT) if i not in BAD_TOPICS and i != BIG]
    msgs = collector.wait_for(
        lambda ms: set(good) <= {p for _, p in ms}
        and sum(1 for t, _ in ms if t.startswith(f"devices/{EDGE}/")) >= len(BAD_TOPICS),
        timeout=60, desc="every good message and a dead letter per bad topic",
    )
    firsts = first_occurrences(p for t, p in msgs if t == "plain/seq")
    assert firsts == good, "every other message arrives, first copies in order"
    assert all(len(t) < 2000 and "\0" not in t for t, _ in msgs)

    # Each unsendable topic became a dead letter upstream, naming why.
    reasons = [dead_letter_props(t, EDGE)["deadLetterReason"] for t, _ in msgs if t.startswith(f"devices/{EDGE}/")]
    assert len(reasons) == len(BAD_TOPICS), reasons
    for word in ("NUL", "wildcard", "empty", "over the limit"):
        assert any(word in r for r in reasons), f"no dead letter says {word!r}: {reasons}"
    assert ph.hub.metric("edgehub_invalid_topics_total") == len(BAD_TOPICS)

    # The refused one is in the store's dead-letter area, counted; the queue is empty.
    entries = listed(ph.hub)
    assert [(e["topic"], e["payload_bytes"]) for e in entries] == [("plain/seq", len(body(BIG)))]
    assert entries[0]["reason"].startswith("upstream_refused"), entries
    assert ph.hub.metric("edgehub_dead_letters_total") == 1
    assert ph.hub.metric("edgehub_dead_letter_depth") == 1
    ph.hub.wait_queue_depth(0, timeout=10)
    assert b"big" not in b"".join(p for _, p in msgs)

    # Replayed on the running hub, it is refused again and set aside again.
    assert dead_letters(ph.hub, "replay", "--all").stdout.strip() == b"replayed 1"
    ph.hub.wait_metric("edgehub_dead_letters_total", lambda v: v == 2, 30, "after the replay")
    again = listed(ph.hub)
    assert len(again) == 1 and again[0]["key"] > entries[0]["key"], again

    # A stopped hub's dead letters are read from the store itself.
    assert ph.hub.terminate() == 0
    assert [e["topic"] for e in listed(ph.hub)] == ["plain/seq"]
    assert dead_letters(ph.hub, "purge", "--all").stdout.strip() == b"purged 1"
    assert listed(ph.hub) == []


def test_dead_letter_commands_refuse_unknown_input_clearly(hub_factory):
    hub = hub_factory()
    r = subprocess.run(
        [hub.binary, "queue", "dead-letters", "replay", "--storage", str(hub.storage)],
        capture_output=True, timeout=30, env=hub_env(),
    )
    assert r.returncode != 0 and b"--all" in r.stderr, r.stderr
    r = dead_letters(hub, "replay", "12345")
    assert r.stdout.strip() == b"replayed 0"
    assert listed(hub) == []
    wait_until(hub.alive, 1, "the hub runs on")


def test_a_message_an_mqtt5_upstream_refuses_is_dead_lettered_and_the_rest_arrive_in_order(
    upstream_factory, collector_factory, hub_factory, clients, tmp_path
):
    # Mosquitto answers a publish its ACL denies with PUBACK 0x87 to an MQTT
    # 5 client (to a 3.1.1 client it acknowledges it and drops it unseen).
    acl = tmp_path / "upstream.acl"
    acl.write_text("topic deny plain/secret\ntopic readwrite #\n")
    up = upstream_factory(extra_conf=[f"acl_file {acl}"])
    up.start()
    collector = collector_factory(up, filters=["plain/#"])
    hub = hub_factory(
        up, edge_id="edge-v5", forward_topics=["plain/#"],
        extra_args=["--upstream-mqtt-version", "5"],
    )
    pub = connect_publisher(hub.port, clients)
    items = [("plain/secret" if i == 7 else "plain/seq", f"seq={i}".encode()) for i in range(20)]
    publish_all(pub, items, timeout=30)

    good = [p for t, p in items if t == "plain/seq"]
    msgs = collector.wait_for(lambda ms: set(good) <= {p for _, p in ms}, timeout=60, desc="every allowed message")
    assert first_occurrences(p for _, p in msgs) == good, "first copies in order, the refused one never"

    hub.wait_metric("edgehub_dead_letters_total", lambda v: v == 1, 30, "the refused message dead-lettered")
    entries = listed(hub)
    assert [(e["topic"], e["payload_bytes"]) for e in entries] == [("plain/secret", len(b"seq=7"))]
    assert "0x87" in entries[0]["reason"] and "3 times" in entries[0]["reason"], entries
    hub.wait_queue_depth(0, timeout=10)
    assert hub.alive()


def test_a_device_topic_over_the_hubs_limit_is_refused_to_the_device_not_acknowledged(
    upstream, collector_factory, hub_factory, clients
):
    collector = collector_factory(upstream)
    hub = hub_factory(upstream, edge_id="edge-limit", extra_args=["--max-topic-bytes", "64"])
    long_topic = "devices/d5/messages/events/" + "k=" + "v" * 60
    v5 = Publisher(hub.port, protocol=mqtt.MQTTv5, client_id="d5")
    clients.append(v5.connect())
    assert v5.publish_and_wait(long_topic, b"too long", timeout=10) == 0x90, "topic name invalid"
    assert v5.publish_and_wait("devices/d5/messages/events/", b"short", timeout=10) < 0x80
    collector.wait_payload(b"short", timeout=30)
    assert b"too long" not in {p for _, p in collector.snapshot()}

    # 3.1.1 has no negative PUBACK: the hub closes the connection instead.
    v3 = Publisher(hub.port, client_id="d6")
    clients.append(v3.connect())
    v3.publish(long_topic.replace("d5", "d6"), b"too long, 3.1.1")
    assert v3.disconnected.wait(10), "the 3.1.1 publisher was disconnected"
    v3.client.loop_stop()
    assert hub.metric("edgehub_invalid_topics_total") == 2
    assert hub.alive()


def test_an_mqtt5_upstreams_receive_maximum_and_packet_size_are_kept(
    upstream_factory, collector_factory, hub_factory, clients
):
    # Mosquitto announces both in its CONNACK to an MQTT 5 client: Receive
    # Maximum 5 (its max_inflight_messages) and Maximum Packet Size 2000.
    up = upstream_factory(extra_conf=["max_inflight_messages 5", "max_packet_size 2000"])
    up.start()
    collector = collector_factory(up, filters=["plain/#"])
    hub = hub_factory(
        up, edge_id="edge-limits", forward_topics=["plain/#"],
        extra_args=["--upstream-mqtt-version", "5"],
    )
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 30, "the upstream connected")
    pub = connect_publisher(hub.port, clients)
    big = 150
    items = [("plain/seq", f"seq={i} ".encode() + (b"x" * 3000 if i == big else b"")) for i in range(300)]
    publish_all(pub, items, timeout=60)

    good = [p for i, (_, p) in enumerate(items) if i != big]
    msgs = collector.wait_for(lambda ms: set(good) <= {p for _, p in ms}, timeout=60, desc="every message but the big one")
    assert first_occurrences(p for _, p in msgs) == good, "first copies in order, the big one never"

    # The big one is set aside at once (never sent, so never refused), and
    # the hub never exceeded what the upstream takes: not one reconnect.
    hub.wait_metric("edgehub_dead_letters_total", lambda v: v == 1, 30, "the big message dead-lettered")
    entries = listed(hub)
    assert [e["payload_bytes"] for e in entries] == [len(items[big][1])], entries
    assert "Maximum Packet Size of 2000" in entries[0]["reason"], entries
    assert hub.metric("edgehub_upstream_reconnects_total") == 0
    hub.wait_queue_depth(0, timeout=10)


def test_an_upstream_announcing_a_tiny_maximum_packet_size_is_not_used_and_the_queue_waits_for_it_to_be_fixed(
    upstream_factory, collector_factory, hub_factory, clients
):
    # The collector's session is made first; the same port keeps it.
    first = upstream_factory()
    first.start()
    collector = collector_factory(first, filters=["plain/#"])
    first.stop()
    tiny = upstream_factory(port=first.port, extra_conf=["max_packet_size 100"])
    tiny.start()
    hub = hub_factory(
        tiny, edge_id="edge-tiny", forward_topics=["plain/#"],
        extra_args=["--upstream-mqtt-version", "5", "--upstream-max-backoff-ms", "500"],
    )
    log = LogWatch(hub)
    log.wait(r"Maximum Packet Size of 100 bytes", 30, "the hub refuses the upstream, saying why")
    pub = connect_publisher(hub.port, clients)
    # Each larger than the 100 bytes the broker announces.
    items = [("plain/seq", f"seq={i} ".encode() + b"x" * 200) for i in range(20)]
    publish_all(pub, items, timeout=30)
    hub.wait_queue_depth(len(items), 20)
    assert hub.metric("edgehub_upstream_connected") == 0
    assert hub.metrics().get("edgehub_dead_letters_total", 0) == 0, "nothing condemned by the broker's setting"

    # The broker is fixed: everything queued arrives, in order.
    tiny.stop()
    fixed = upstream_factory(port=first.port)
    fixed.start()
    msgs = collector.wait_count(len(items), 60)
    assert first_occurrences(p for _, p in msgs) == [p for _, p in items]
    assert not collector.session_lost
    hub.wait_queue_depth(0, 30)
