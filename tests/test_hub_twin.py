"""The hub twin: routes, the default time to live and plugin settings from
the desired properties the cloud keeps (retained) on
`devices/{edge}/modules/$edgeHub/twin/desired`, applied whole or not at all,
kept in the store (encrypted, with every twin) for offline restarts, and reported back
(retained) on `devices/{edge}/modules/$edgeHub/twin/reported`."""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass

import pytest

from authkit import publish_retained
from helpers import Collector, Hub, Publisher, Upstream, WaitTimeout, first_occurrences, tail, wait_until
from pluginkit import bag_dict, connect_publisher, plugin_hub, plugins_dist  # noqa: F401 - fixtures

DEFAULT_TTL = 7200
OVER_30 = "FROM /messages/* WHERE temp > 30 INTO $upstream"
UNDER_20 = "FROM /messages/* WHERE temp < 20 INTO $upstream"


def desired_topic(edge_id: str) -> str:
    return f"devices/{edge_id}/modules/$edgeHub/twin/desired"


def reported_topic(edge_id: str) -> str:
    return f"devices/{edge_id}/modules/$edgeHub/twin/reported"


def telemetry_topic(device: str, **props) -> str:
    return f"devices/{device}/messages/events/{urllib.parse.urlencode(props)}"


class TwinCloud:
    """The cloud side of one hub's twin on one upstream broker: publishes
    desired documents (retained, as the cloud does) and watches the reported
    ones the hub publishes."""

    def __init__(self, upstream: Upstream, edge_id: str, collector_factory, hub: Hub | None = None):
        self.upstream = upstream
        self.edge_id = edge_id
        self.hub = hub
        self.reported: Collector = collector_factory(upstream, filters=[reported_topic(edge_id)])

    def publish_desired(self, doc: dict | bytes) -> bytes:
        payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        publish_retained(self.upstream.port, desired_topic(self.edge_id), payload)
        return payload

    def latest(self) -> dict | None:
        msgs = self.reported.snapshot()
        if not msgs:
            return None
        topic, payload = msgs[-1]
        assert topic == reported_topic(self.edge_id), topic
        return json.loads(payload)

    def wait(self, pred, timeout: float, desc: str) -> dict:
        """Waits until the newest reported document satisfies ``pred``."""
        box = {}

        def check():
            if self.hub is not None and not self.hub.alive():
                raise AssertionError(f"the hub died:\n{tail(self.hub.log_path)}")
            box["doc"] = self.latest()
            return box["doc"] is not None and pred(box["doc"])

        try:
            wait_until(check, timeout, f"reported properties where {desc}", interval=0.05)
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}; newest reported document: {json.dumps(box.get('doc'))}") from None
        return box["doc"]

    def wait_status(self, code: int, version, timeout: float = 15.0) -> dict:
        return self.wait(
            lambda d: d.get("lastDesiredStatus", {}).get("code") == code and d.get("lastDesiredVersion") == version,
            timeout,
            f"lastDesiredStatus.code == {code} and lastDesiredVersion == {version!r}",
        )

    def apply(self, doc: dict) -> dict:
        """Publishes a desired document that must be accepted and waits until
        the hub reports it applied (code 200, its $version); returns that
        reported document."""
        self.publish_desired(doc)
        return self.wait_status(200, doc["$version"])


def route_texts(doc: dict) -> dict[str, str]:
    return {name: r.get("route") for name, r in (doc.get("routes") or {}).items()}


def send_all(pub: Publisher, messages: list[tuple[str, bytes]]) -> None:
    """Publishes one by one, each acknowledged before the next: when the
    PUBACK comes, the hub has routed the message (and queued it or not)."""
    for topic, payload in messages:
        rc = pub.publish_and_wait(topic, payload, qos=1)
        assert rc < 0x80, f"hub refused {payload!r} on {topic}: {rc:#x}"


def arrived(collector: Collector, prefix: bytes) -> list[tuple[str, bytes]]:
    return [(t, p) for t, p in collector.snapshot() if p.startswith(prefix)]


def temp_messages(tag: str, temps: list[int], device: str = "d1") -> list[tuple[str, bytes]]:
    return [(telemetry_topic(device, temp=t), f"{tag}-{i}-t{t}".encode()) for i, t in enumerate(temps)]


def assert_exactly(collector: Collector, tag: str, sent: list[tuple[str, bytes]], want_temps, timeout=15.0):
    """The messages of ``sent`` whose temp is in ``want_temps`` arrive
    upstream, in order, and no other message tagged ``tag`` does. The last
    message sent must be one of those expected: the upstream queue is FIFO,
    so once it arrived anything queued before it has arrived too."""
    expected = [(t, p) for t, p in sent if int(bag_dict(t)["temp"]) in want_temps]
    assert expected and expected[-1] == sent[-1], "test bug: the last message sent must be expected upstream"
    collector.wait_distinct_payloads({p for _, p in expected}, timeout)
    got = first_occurrences(arrived(collector, f"{tag}-".encode()))
    assert got == expected, (
        f"{tag}: upstream got {[p.decode() for _, p in got]}, expected exactly {[p.decode() for _, p in expected]}"
    )


@dataclass
class TwinHub:
    """A hub, the cloud side of its twin, the collector of its telemetry
    upstream and a publisher connected to it."""

    hub: Hub
    cloud: TwinCloud
    telemetry: Collector
    pub: Publisher

    def send_and_expect(self, tag: str, temps: list[int], want_temps, timeout: float = 15.0):
        """Sends ``temp_messages(tag, temps)``; exactly those with a temp in
        ``want_temps`` must arrive upstream (see ``assert_exactly``)."""
        sent = temp_messages(tag, temps)
        send_all(self.pub, sent)
        assert_exactly(self.telemetry, tag, sent, want_temps, timeout)


@pytest.fixture
def twin_hub(upstream, hub_factory, collector_factory, clients):
    """make(edge_id) -> TwinHub on ``upstream``. The collector is made first:
    its persistent session is kept across a restart of the broker."""

    def make(edge_id: str) -> TwinHub:
        telemetry = collector_factory(upstream)
        hub = hub_factory(upstream, edge_id=edge_id)
        cloud = TwinCloud(upstream, edge_id, collector_factory, hub)
        return TwinHub(hub, cloud, telemetry, connect_publisher(hub.port, clients))

    return make


# --------------------------------------------------------------------------
# 1. routes applied live
# --------------------------------------------------------------------------


def test_routes_from_desired_properties_are_applied_live_and_reported(twin_hub):
    th = twin_hub("edge-twin-live")
    cloud, telemetry = th.cloud, th.telemetry

    first = cloud.wait_status(200, None)
    assert first["routes"] is None, f"no route table yet, but reported {first}"
    assert first["storeAndForwardConfiguration"] == {"timeToLiveSecs": DEFAULT_TTL}, first
    assert first["schemaVersion"] == "1.1", first

    temps = [10, 40, 30, 25, 31]
    th.send_and_expect("before", temps, set(temps))  # no routes: everything goes upstream

    doc = cloud.apply({
        "$version": 3,
        "schemaVersion": "1.1",
        "routes": {"r1": OVER_30},
    })
    assert doc["lastDesiredStatus"] == {"code": 200, "description": ""}, doc
    assert doc["routes"] == {"r1": {"route": OVER_30, "priority": 0, "onError": "deadletter"}}, doc
    assert doc["storeAndForwardConfiguration"] == {"timeToLiveSecs": DEFAULT_TTL}, doc

    th.send_and_expect("after", [10, 35, 30, -5, 31, 29, 50, 20, 45], {35, 31, 50, 45})
    # topics (property bags) are unchanged on the way up
    assert all(t == telemetry_topic("d1", temp=int(bag_dict(t)["temp"])) for t, _ in arrived(telemetry, b"after-"))

    # a document without routes falls back to the hub's own (none: everything upstream)
    doc = cloud.apply({"$version": 4, "schemaVersion": "1.1"})
    assert route_texts(doc) == {}, doc
    temps = [10, 35, 30]
    th.send_and_expect("fallback", temps, set(temps))
    assert th.hub.alive()


# --------------------------------------------------------------------------
# 2. a bad route refuses the whole document
# --------------------------------------------------------------------------


def test_a_desired_document_with_a_bad_route_is_refused_whole_and_the_previous_routes_stay(twin_hub):
    th = twin_hub("edge-twin-bad-route")
    cloud = th.cloud
    cloud.apply({"$version": 1, "routes": {"r1": OVER_30}})

    broken = "FROM /messages/* WHERE temp > 5 INTO $nowhere"
    column = broken.index("$nowhere") + 1  # 1-based column of the bad sink
    cloud.publish_desired({
        "$version": 2,
        "routes": {"low": UNDER_20, "broken": broken},
        "storeAndForwardConfiguration": {"timeToLiveSecs": 5},
    })
    doc = cloud.wait_status(400, 2)
    desc = doc["lastDesiredStatus"]["description"]
    assert "routes.broken" in desc and f"column {column}" in desc, (
        f"the refusal should name routes.broken and column {column}: {desc!r}"
    )
    assert "routes.low" not in desc, f"the good route is not an error: {desc!r}"
    # nothing of the refused document is in force
    assert route_texts(doc) == {"r1": OVER_30}, doc
    assert doc["storeAndForwardConfiguration"] == {"timeToLiveSecs": DEFAULT_TTL}, doc

    # ...and the previous routes still route: cold messages (the refused
    # `low` route would take them) do not go upstream, hot ones do.
    th.send_and_expect("refused", [10, 40, 15, 25, 33], {40, 33})

    # a good document is applied again
    doc = cloud.apply({"$version": 3, "routes": {"low": UNDER_20}})
    assert doc["lastDesiredStatus"]["description"] == "", doc
    assert route_texts(doc) == {"low": UNDER_20}, doc
    th.send_and_expect("good", [40, 10, 33, 15], {10, 15})


# --------------------------------------------------------------------------
# 3. the cached twin survives an offline restart
# --------------------------------------------------------------------------


def test_routes_from_the_twin_survive_a_restart_without_the_cloud(
    upstream, offline_upstream, hub_factory, collector_factory, clients
):
    edge = "edge-twin-cache"
    first = hub_factory(upstream, edge_id=edge, name="online")
    cloud = TwinCloud(upstream, edge, collector_factory, first)
    desired = {"$version": 5, "routes": {"hot": OVER_30}}
    cloud.apply(desired)

    # kept in the store with every twin, encrypted: no file in plain text
    assert not (first.storage / "hub-twin.json").exists()
    assert first.terminate() == 0
    in_plain = [p for p in first.storage.rglob("*") if p.is_file() and OVER_30.encode() in p.read_bytes()]
    assert in_plain == [], f"the hub twin is stored in plain text in {in_plain}"
    upstream.stop()

    # A fresh cloud broker that never had the desired document (only the
    # collector's persistent subscription), stopped: the hub starts offline,
    # with the same storage, and keeps retrying this broker's port.
    fresh, telemetry = offline_upstream()
    hub = hub_factory(fresh, edge_id=edge, storage=first.storage, name="offline")
    pub = connect_publisher(hub.port, clients)
    temps = [12, 41, 30, 22, 37, 5, 88]
    queued = temp_messages("offline", temps)
    send_all(pub, queued)
    # only the messages the cached route takes were queued
    hub.wait_queue_depth(3, timeout=10)
    assert telemetry.count() == 0

    fresh.start()
    assert_exactly(telemetry, "offline", queued, {41, 37, 88}, timeout=30)
    reported = TwinCloud(fresh, edge, collector_factory, hub)
    doc = reported.wait_status(200, 5)
    assert route_texts(doc) == {"hot": OVER_30}, doc
    hub.wait_queue_depth(0, timeout=10)


# --------------------------------------------------------------------------
# 4. the default time to live from the twin
# --------------------------------------------------------------------------


def test_the_time_to_live_from_the_twin_expires_queued_messages(upstream, twin_hub):
    th = twin_hub("edge-twin-ttl")  # the collector's persistent session is kept across the broker restart
    hub, cloud, telemetry, pub = th.hub, th.cloud, th.telemetry, th.pub
    assert cloud.wait_status(200, None)["storeAndForwardConfiguration"] == {"timeToLiveSecs": DEFAULT_TTL}

    doc = cloud.apply({"$version": 1, "storeAndForwardConfiguration": {"timeToLiveSecs": 1}})
    assert doc["storeAndForwardConfiguration"] == {"timeToLiveSecs": 1}, doc
    assert route_texts(doc) == {}, doc

    topic = telemetry_topic("d1", kind="ttl")
    send_all(pub, [(topic, b"online")])
    telemetry.wait_payload(b"online", 10)

    upstream.stop()
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 0, 15, "== 0 after the upstream stopped")
    expired_before = hub.metric("edgehub_messages_expired_total")
    n = 20
    send_all(pub, [(topic, f"old-{i}".encode()) for i in range(n)])
    # The time to live is real time: wait on the queue until the messages are
    # clearly older than the 1 s the twin set (or already expired), bounded.
    wait_until(
        lambda: hub.queue_stats()["oldest_age_secs"] >= 1.5
        or hub.metric("edgehub_messages_expired_total") >= expired_before + n,
        15,
        "queued messages older than 1.5 s (or expired)",
        interval=0.1,
    )

    upstream.start()
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 30, "== 1 after the upstream started")
    send_all(pub, [(topic, b"fresh")])
    telemetry.wait_payload(b"fresh", 15)
    got = [p for _, p in telemetry.snapshot()]
    assert got == [b"online", b"fresh"], f"expired messages went upstream: {got}"
    expired = hub.wait_metric(
        "edgehub_messages_expired_total", lambda v: v >= expired_before + n, 15, f">= {expired_before + n}"
    )
    assert expired == expired_before + n, f"edgehub_messages_expired_total {expired}, expected {expired_before + n}"
    # reported again after the reconnect, still with the twin's TTL
    assert cloud.wait_status(200, 1)["storeAndForwardConfiguration"] == {"timeToLiveSecs": 1}


# --------------------------------------------------------------------------
# 5. plugin settings from the twin
# --------------------------------------------------------------------------


def test_plugin_config_from_the_twin_changes_what_the_filter_passes(
    upstream, plugin_hub, plugins_dist, collector_factory, clients  # noqa: F811
):
    edge = "edge-twin-plugin"
    telemetry = collector_factory(upstream)
    ph = plugin_hub(upstream, edge_id=edge, plugins={"field-filter": plugins_dist / "field-filter.wasm"})
    cloud = TwinCloud(upstream, edge, collector_factory, ph.hub)
    route = 'FROM /messages/* INTO plugin("field-filter")'
    cloud.publish_desired({"$version": 1, "routes": {"ff": route}})
    doc = cloud.wait(
        lambda d: d["lastDesiredVersion"] == 1 and "field-filter" in (d.get("plugins") or {}),
        15, "version 1 and field-filter loaded",
    )
    assert doc["lastDesiredStatus"]["code"] == 200, doc
    assert doc["plugins"]["field-filter"].get("kind") == "view-filter", doc
    assert doc["plugins"]["field-filter"].get("version"), doc
    assert route_texts(doc) == {"ff": route}, doc
    assert "warning" not in doc["routes"]["ff"], doc

    # A route naming a plugin that is not in the folder is applied, and the
    # reported properties say what is missing.
    absent = 'FROM /messages/* INTO plugin("field-filter") THEN plugin("absent")'
    cloud.publish_desired({"$version": 9, "routes": {"ff": absent}})
    doc = cloud.wait(lambda d: d["lastDesiredVersion"] == 9, 15, "version 9 reported")
    assert doc["lastDesiredStatus"]["code"] == 200, doc
    assert doc["routes"]["ff"].get("warning") == 'plugin "absent" is not loaded', doc
    cloud.publish_desired({"$version": 10, "routes": {"ff": route}})
    cloud.wait(lambda d: d["lastDesiredVersion"] == 10 and "warning" not in d["routes"]["ff"], 15,
               "version 10, the first route back, without the warning")

    pub = connect_publisher(ph.port, clients)

    def batch(tag, temps):
        return [(telemetry_topic("d1", n=i), json.dumps({"temperature": t, "tag": tag}).encode())
                for i, t in enumerate(temps)]

    def passed(tag):
        out = []
        for t, p in first_occurrences(telemetry.snapshot()):
            body = json.loads(p)
            if body.get("tag") == tag:
                assert bag_dict(t).get("alert") == "true", f"no alert=true on {t}"
                out.append(body["temperature"])
        return out

    # default threshold 25: 28 passes
    default = batch("default", [20, 28, 25, 40])
    send_all(pub, default)
    telemetry.wait_distinct_payloads({default[1][1], default[3][1]}, 15)
    assert passed("default") == [28, 40]

    cloud.apply({
        "$version": 11,
        "routes": {"ff": route},
        "plugins": {"field-filter": {"config": {"above": 30}}},
    })
    raised = batch("raised", [28, 20, 31, 30, 45])
    send_all(pub, raised)
    telemetry.wait_distinct_payloads({raised[2][1], raised[4][1]}, 15)
    assert passed("raised") == [31, 45], "28 passed the filter after the twin raised `above` to 30"

    # without `plugins` the plugin falls back to its default settings (above 25)
    cloud.apply({"$version": 12, "routes": {"ff": route}})
    back = batch("back", [20, 28, 31])
    send_all(pub, back)
    telemetry.wait_distinct_payloads({back[1][1], back[2][1]}, 15)
    assert passed("back") == [28, 31], "the twin's `above` 30 stayed after the twin dropped `plugins`"


# --------------------------------------------------------------------------
# 6. payloads that are no desired document
# --------------------------------------------------------------------------


def test_bad_json_non_objects_and_unknown_keys_are_refused_and_the_hub_keeps_routing(twin_hub):
    th = twin_hub("edge-twin-junk")
    cloud = th.cloud

    # (payload, what it is, the $version reported for it (None: the previous
    # good one), a word the refusal must name)
    bad = [
        (b'{"$version": 9, "routes": ', "not valid JSON", None, "JSON"),
        (b"[1, 2, 3]", "a JSON array", None, "object"),
        (b'"routes"', "a JSON string", None, "object"),
        (json.dumps({"$version": 9, "routes": {"low": UNDER_20}, "colour": "blue"}).encode(),
         "an unknown key", 9, "colour"),
        (json.dumps({"$version": 10, "routes": {"low": UNDER_20},
                     "storeAndForwardConfiguration": {"timeToLiveSecs": 0}}).encode(),
         "a zero time to live", 10, "timeToLiveSecs"),
    ]
    version = 0
    for i, (payload, what, refused_version, named) in enumerate(bad):
        # a good document first (a new version each time), so every refusal
        # is a visible change of the reported properties
        version += 1
        cloud.apply({"$version": version, "routes": {"hot": OVER_30}})

        cloud.publish_desired(payload)
        doc = cloud.wait_status(400, refused_version or version)
        desc = doc["lastDesiredStatus"]["description"]
        assert named in desc, f"{what}: the refusal should name {named!r}: {desc!r}"
        assert route_texts(doc) == {"hot": OVER_30}, f"{what}: {doc}"
        assert doc["storeAndForwardConfiguration"] == {"timeToLiveSecs": DEFAULT_TTL}, f"{what}: {doc}"
        assert th.hub.alive(), f"the hub died on {what}"

        th.send_and_expect(f"junk{i}", [10, 45, 15, 31], {45, 31})
