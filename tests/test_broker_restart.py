"""The local broker forgets nothing across hub restarts (SIGTERM and kill -9):
a persistent session keeps its subscriptions and the QoS 1 messages queued
for it while it was away (delivered in order when it comes back, without
subscribing again); a subscription is durable once its SUBACK is sent;
retained messages, and a retained delete, survive; a clean session discards
a stored one for good; session expiry (MQTT 5's interval, the configured
`[mqtt] session_expiry_secs` for 3.1.1) is honoured.

What is durable is read from the gauges
``edgehub_broker_stored{kind="sessions"|"queued"|"retained"}`` (updated after
each group commit): a kill -9 comes only once they count what the test needs.
A SIGTERM flushes everything, so the SIGTERM cases do not wait for them."""

from __future__ import annotations

import re
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from helpers import LOOPBACK, Publisher, Subscriber, WaitTimeout, wait_until

STOPS = ["sigterm", "kill9"]
PROTOCOLS = [mqtt.MQTTv311, mqtt.MQTTv5]
PROTOCOL_IDS = ["v311", "v5"]
KEEP = 3600  # an MQTT 5 session expiry interval that does not run out during a test


@pytest.fixture
def hub(hub_factory):
    return hub_factory(None, edge_id="edge-restart")


class V5Session(Subscriber):
    """helpers.Subscriber over MQTT 5 with a session expiry interval in its
    CONNECT (0: the session ends with the connection)."""

    def __init__(self, port: int, expiry: int, **kw):
        super().__init__(port, protocol=mqtt.MQTTv5, **kw)
        self.expiry = expiry

    def connect(self, timeout: float = 10.0) -> "V5Session":
        props = Properties(PacketTypes.CONNECT)
        if self.expiry:
            props.SessionExpiryInterval = self.expiry
        self.client.connect(LOOPBACK, self.port, keepalive=30, clean_start=self._clean, properties=props)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise AssertionError("subscriber could not connect to the hub")
        return self


def session(hub, clients, client_id: str, protocol=mqtt.MQTTv311, clean: bool = False,
            expiry: int = KEEP) -> Subscriber:
    """A connected subscriber: MQTT 3.1.1 with clean_session=``clean``, or
    MQTT 5 with clean start=``clean`` and ``expiry`` (0 when ``clean``)."""
    if protocol == mqtt.MQTTv5:
        s = V5Session(hub.port, 0 if clean else expiry, client_id=client_id, clean=clean)
    else:
        s = Subscriber(hub.port, client_id=client_id, clean=clean)
    clients.append(s)
    return s.connect()


def publisher(hub, clients) -> Publisher:
    p = Publisher(hub.port)
    clients.append(p)
    return p.connect()


def publish_all(p: Publisher, messages: list[tuple[str, bytes]], retain: bool = False) -> None:
    """Publishes at QoS 1, in order, and waits until each is acknowledged."""
    before = len(p.results)
    for topic, payload in messages:
        p.publish(topic, payload, qos=1, retain=retain)
    p.wait_results(before + len(messages), 10)
    refused = {k: rc for k, rc in p.results.items() if rc >= 0x80}
    assert not refused, f"publishes refused: {refused}"


def stored(hub, kind: str) -> float:
    """The gauge ``edgehub_broker_stored{kind=...}``."""
    m = re.search(rf'^edgehub_broker_stored\{{[^}}]*kind="{kind}"[^}}]*\}}\s+(\S+)', hub.metrics_text(), re.M)
    if m is None:
        raise AssertionError(f'edgehub_broker_stored{{kind="{kind}"}} missing from /metrics')
    return float(m.group(1))


def wait_stored(hub, kind: str, n: int, timeout: float = 15.0) -> None:
    """Waits until the hub says exactly ``n`` of ``kind`` are durable."""
    box = {}

    def check():
        box["v"] = stored(hub, kind)
        return box["v"] == n

    try:
        wait_until(check, timeout, f'edgehub_broker_stored{{kind="{kind}"}} == {n}')
    except WaitTimeout as exc:
        raise WaitTimeout(f"{exc}; last value {box.get('v')}") from None


def restart(hub, how: str, durable: dict[str, int] | None = None) -> None:
    """Stops the hub and starts it again (same storage, port and arguments).
    ``kill9``: once the gauges count exactly ``durable`` ({kind: n}).
    ``sigterm``: at once; the hub writes everything on its way out."""
    if how == "kill9":
        for kind, n in (durable or {}).items():
            wait_stored(hub, kind, n)
        hub.kill9()
    else:
        assert hub.terminate() == 0, "the hub did not exit cleanly on SIGTERM"
    hub.start()


def received_after_sentinel(s: Subscriber, p: Publisher, topic: str) -> list[tuple[str, bytes]]:
    """Publishes a sentinel on ``topic`` (which ``s`` subscribes to) and
    returns what ``s`` received up to and including it: anything the hub
    would deliver on connect or subscribe has arrived by then."""
    publish_all(p, [(topic, b"sentinel")])
    s.wait_topic(topic)
    return s.received()


# --------------------------------------------------------------------------
# persistent sessions
# --------------------------------------------------------------------------


@pytest.mark.parametrize("how", STOPS)
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_a_persistent_session_gets_what_was_queued_while_it_was_away_in_order_after_a_restart_and_keeps_its_subscriptions(
    hub, clients, protocol, how
):
    cid = "keeper"
    s1 = session(hub, clients, cid, protocol)
    assert not s1.session_present
    s1.subscribe("local/keep/a/#", qos=1)
    s1.subscribe("local/keep/b/+", qos=1)
    s1.close()

    p = publisher(hub, clients)
    queued = [(f"local/keep/{'a/x' if i % 2 == 0 else 'b/y'}", f"away-{i}".encode()) for i in range(20)]
    publish_all(p, queued[:10] + [("local/keep/c/z", b"nobody subscribed")] + queued[10:])
    p.close()

    restart(hub, how, durable={"sessions": 1, "queued": 20})

    s2 = session(hub, clients, cid, protocol)
    assert s2.session_present, "session_present=0 after the restart: the session was not kept"
    msgs = s2.wait_for(lambda ms: len(ms) >= 20, 15, "the 20 messages queued while it was away")
    assert [(m.topic, bytes(m.payload)) for m in msgs[:20]] == queued, "not the queued messages, in order"
    assert all(m.qos == 1 for m in msgs[:20])

    # without subscribing again, new messages on its old subscriptions
    p2 = publisher(hub, clients)
    publish_all(p2, [("local/keep/c/z", b"still nobody"), ("local/keep/b/after", b"after")])
    s2.wait_topic("local/keep/b/after")
    assert s2.received() == queued + [("local/keep/b/after", b"after")]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_a_subscription_whose_suback_was_sent_is_kept_through_a_kill_9_right_after_it(hub, clients, protocol):
    s1 = session(hub, clients, "quick", protocol)
    s1.subscribe("local/suback/#", qos=1)
    hub.kill9()  # no wait: the SUBACK itself says the subscription is durable
    s1.close()
    hub.start()

    s2 = session(hub, clients, "quick", protocol)
    assert s2.session_present, "the session acknowledged before the kill -9 is gone"
    p = publisher(hub, clients)
    publish_all(p, [("local/suback/x", b"on the kept subscription")])
    assert s2.wait_topic("local/suback/x").payload == b"on the kept subscription"


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_a_clean_session_with_the_same_client_id_discards_a_restored_session_for_good(hub, clients, protocol):
    cid = "cleaned"
    s1 = session(hub, clients, cid, protocol)
    s1.subscribe("local/clean/#", qos=1)
    s1.close()
    p = publisher(hub, clients)
    publish_all(p, [("local/clean/a", b"queued before the clean start")])
    p.close()
    restart(hub, "kill9", durable={"sessions": 1, "queued": 1})

    # MQTT 3.1.1 clean_session=1; MQTT 5 clean start with no expiry interval
    c = session(hub, clients, cid, protocol, clean=True)
    assert not c.session_present, "a clean session was told its old session is present"
    c.close()
    restart(hub, "kill9", durable={"sessions": 0, "queued": 0})

    s3 = session(hub, clients, cid, protocol)
    assert not s3.session_present, "the session discarded by the clean start came back"
    s3.subscribe("local/clean/#", qos=1)
    got = received_after_sentinel(s3, publisher(hub, clients), "local/clean/sentinel")
    assert got == [("local/clean/sentinel", b"sentinel")], "a message queued for the discarded session arrived"


# --------------------------------------------------------------------------
# session expiry
# --------------------------------------------------------------------------


@pytest.mark.parametrize("while_hub", ["running", "stopped"])
def test_an_mqtt5_session_whose_expiry_interval_ran_out_while_it_was_away_is_gone_after_a_restart(
    hub, clients, while_hub
):
    """Two MQTT 5 sessions away with a message queued for each: one with a
    1 s expiry interval, one with an hour. The interval runs out while the
    hub runs, or while it is stopped; after the restart only the second is
    there, with its message."""
    short = session(hub, clients, "short-lived", mqtt.MQTTv5, expiry=1)
    long_ = session(hub, clients, "long-lived", mqtt.MQTTv5, expiry=KEEP)
    for s in (short, long_):
        s.subscribe("local/expiry/#", qos=1)
        s.close()
    p = publisher(hub, clients)
    publish_all(p, [("local/expiry/a", b"while away")])
    p.close()

    # The one wait on time in this file: an expiry interval is a duration,
    # so 2 s must pass for the 1 s interval to run out (bounded, short).
    if while_hub == "running":
        time.sleep(2)
        assert hub.terminate() == 0
    else:
        assert hub.terminate() == 0
        time.sleep(2)
    hub.start()

    kept = session(hub, clients, "long-lived", mqtt.MQTTv5, expiry=KEEP)
    assert kept.session_present, "the session with an hour to live is gone (control)"
    assert kept.wait_topic("local/expiry/a").payload == b"while away"

    gone = session(hub, clients, "short-lived", mqtt.MQTTv5, expiry=1)
    assert not gone.session_present, "the session whose 1 s expiry interval ran out is still there"
    gone.subscribe("local/expiry/#", qos=1)
    got = received_after_sentinel(gone, publisher(hub, clients), "local/expiry/sentinel")
    assert got == [("local/expiry/sentinel", b"sentinel")], "the expired session's queued message was delivered"


def test_an_mqtt311_session_lives_as_long_as_the_configured_session_expiry_secs(hub_factory, clients, tmp_path):
    """`[mqtt] session_expiry_secs = 1`: a 3.1.1 session away for 2 s is
    gone after a restart; an MQTT 5 session in the same hub that asked for an
    hour (MQTT 5 clients say their own) is kept (control)."""
    cfg = tmp_path / "expiry.toml"
    cfg.write_text("[mqtt]\nsession_expiry_secs = 1\n")
    hub = hub_factory(None, edge_id="edge-expiry", extra_args=["--config", str(cfg)])
    v311 = session(hub, clients, "short-311", mqtt.MQTTv311)
    v5 = session(hub, clients, "hour-v5", mqtt.MQTTv5, expiry=KEEP)
    for s in (v311, v5):
        s.subscribe("local/cfg/#", qos=1)
        s.close()
    p = publisher(hub, clients)
    publish_all(p, [("local/cfg/a", b"while away")])
    p.close()

    # The one wait on time here: the configured 1 s must run out (bounded, short).
    time.sleep(2)
    restart(hub, "sigterm")

    kept = session(hub, clients, "hour-v5", mqtt.MQTTv5, expiry=KEEP)
    assert kept.session_present, "the MQTT 5 session with an hour to live is gone (control)"
    assert kept.wait_topic("local/cfg/a").payload == b"while away"

    gone = session(hub, clients, "short-311", mqtt.MQTTv311)
    assert not gone.session_present, "the 3.1.1 session outlived session_expiry_secs = 1"
    gone.subscribe("local/cfg/#", qos=1)
    got = received_after_sentinel(gone, publisher(hub, clients), "local/cfg/sentinel")
    assert got == [("local/cfg/sentinel", b"sentinel")], "the expired session's queued message was delivered"


# --------------------------------------------------------------------------
# retained messages
# --------------------------------------------------------------------------


@pytest.mark.parametrize("how", STOPS)
def test_retained_messages_survive_a_restart_and_a_deleted_one_does_not_come_back(hub, clients, how):
    p = publisher(hub, clients)
    publish_all(p, [
        ("local/ret/replaced", b"v1"),
        ("local/ret/replaced", b"v2"),
        ("local/ret/kept", b"kept"),
        ("local/ret/deleted", b"old"),
    ], retain=True)
    if how == "kill9":
        wait_stored(hub, "retained", 3)  # the delete below comes after a durable message
    publish_all(p, [("local/ret/deleted", b"")], retain=True)  # empty payload: delete
    p.close()

    restart(hub, how, durable={"retained": 2})

    s = session(hub, clients, "late-reader", clean=True)
    s.subscribe("local/ret/#", qos=1)
    s.wait_for(lambda ms: {m.topic for m in ms} >= {"local/ret/replaced", "local/ret/kept"}, 10,
               "the retained messages after the restart")
    with s.cond:
        retained = {m.topic: (bytes(m.payload), m.retain) for m in s.messages}
    assert retained == {"local/ret/replaced": (b"v2", True), "local/ret/kept": (b"kept", True)}
    got = received_after_sentinel(s, publisher(hub, clients), "local/ret/sentinel")
    assert "local/ret/deleted" not in {t for t, _ in got}, "the deleted retained message came back"
