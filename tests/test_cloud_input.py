"""Hostile or misaddressed input from the cloud: desired documents and direct
method calls that arrive over the upstream broker (here, the test's
Mosquitto stands in for the cloud).

What the code does (host/src/upstream/twins.rs, twins/document.rs,
upstream/methods.rs, upstream/protocol.rs), and what is asserted here:

- A desired document is checked before it is stored: JSON, an object, a
  ``$version`` that is a whole number >= 1, and the limits of a reported
  patch (names, nesting, string and integer sizes, no null in arrays, at
  most 32 KiB). A refused one writes an error line ``desired properties
  refused identity=... error=<reason>``, is acknowledged, changes nothing
  (neither the document nor its version) and is pushed to no one; an older
  ``$version`` is silently ignored.
- The hub subscribes upstream to one desired topic and one method-call
  filter per identity of its scope, never a wildcard, so a document or a
  call for any other identity never reaches it. The upstream Mosquitto runs
  with ``log_type subscribe`` so the test reads the hub's subscriptions
  (client id = the edge id) from the broker's own log.
- A call on an in-scope identity's filter that is not a call (``.../methods/
  res/{x}``, an empty request id) is ignored with a warning and no answer;
  a call to an identity of the scope that is not connected is answered 404
  with ``{"message": ...}``; an identity outside the scope gets no answer at
  all (the hub never sees the call; the cloud's caller times out).

"Nothing arrived" is shown with a sentinel published after the probes and
awaited (a desired patch or a method answer that does arrive), and with the
hub's and the broker's logs; no sleeps.
"""

from __future__ import annotations

import json
import re

import paho.mqtt.client as mqtt

from authkit import (
    EDGE_ID,
    Identity,
    auth_args,
    log_since,
    log_size,
    publish_retained,
    publish_scope,
    try_connect,
    wait_log,
    wait_scope,
)
from helpers import wait_until
from test_methods import Cloud, call_received
from test_twins import wait_answer

DESIRED = "$iothub/twin/PATCH/properties/desired/"
METHOD_POST = "$iothub/methods/POST/"


def logged_upstream(upstream_factory):
    """A running upstream Mosquitto that logs every SUBSCRIBE/UNSUBSCRIBE."""
    up = upstream_factory(extra_conf=["log_type subscribe", "log_type unsubscribe"])
    up.start()
    return up


def scoped_hub(upstream_factory, hub_factory):
    """A logged upstream, and a hub whose scope (published there and
    received) is two child devices and a module: (upstream, hub,
    (child1, child2, mod1))."""
    up = logged_upstream(upstream_factory)
    identities = Identity.child("child1"), Identity.child("child2"), Identity.module("mod1")
    hub = hub_factory(up, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(up, list(identities))
    wait_scope(hub, 3)
    return up, hub, identities


def hub_subscriptions(up) -> set[str]:
    """Every filter the hub (client id = the edge id) subscribed to on the
    upstream broker, from Mosquitto's ``<time>: <client> <qos> <filter>``
    lines."""
    rx = re.compile(rf"^\d+: {re.escape(EDGE_ID)} \d (\S+)\s*$")
    text = up.log_path.read_text(errors="replace")
    return {m.group(1) for m in map(rx.match, text.splitlines()) if m}


def wait_subscribed(up, filters: set[str], timeout: float = 15.0) -> set[str]:
    wait_until(lambda: filters <= hub_subscriptions(up), timeout,
               f"the hub subscribed upstream to {sorted(filters)}")
    return hub_subscriptions(up)


def unwanted(filters: set[str], topics: list[str]) -> list[tuple[str, str]]:
    """(filter, topic) for each of the hub's filters that matches a topic it
    must not receive."""
    return [(f, t) for f in filters for t in topics if mqtt.topic_matches_sub(f, t)]


def line_with(*fragments: str) -> str:
    """A regex for one log line holding every fragment, in any order."""
    return "".join(rf"(?=[^\n]*{re.escape(f)})" for f in fragments)


def on_topic(c, prefix: str) -> list[tuple[str, bytes]]:
    with c.cond:
        return [(t, p) for t, p in c.messages if t.startswith(prefix)]


def get_twin(c, rid: str) -> dict:
    assert c.publish_result(f"$iothub/twin/GET/?$rid={rid}", b"") == 0
    _, body = wait_answer(c, f"$iothub/twin/res/200/?$rid={rid}", f"the twin ({rid})")
    return json.loads(body)


def nested(levels: int) -> dict | int:
    doc: dict | int = 1
    for _ in range(levels):
        doc = {"d": doc}
    return doc


# Each malformed desired document, with a fragment of the reason the hub
# logs. The ones that parse carry a $version above the one held, so a
# refusal that still moved the version would show in the valid one after.
MALFORMED_DESIRED = [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'"a string"', "not a JSON object"),
    (b'{"rate": 6}', "no $version"),
    (b'{"rate": 6, "$version": 0}', "not a whole number of at least 1"),
    (b'{"rate": 6, "$version": -4}', "not a whole number of at least 1"),
    (b'{"rate": 6, "$version": "40"}', "not a whole number of at least 1"),
    (b'{"rate": 6, "$version": 40.5}', "not a whole number of at least 1"),
    (b'{"a.b": 1, "$version": 41}', "contains '.'"),
    (b'{"x": {"$v": 1}, "$version": 42}', "contains '$'"),
    (b'{"list": [1, null], "$version": 43}', "arrays may not hold null"),
    (b'{"n": 4503599627370497, "$version": 44}', "+/- 2^52"),
    (json.dumps({"s": "x" * 5000, "$version": 45}).encode(), "over the limit of 4096"),
    (json.dumps({"deep": nested(11), "$version": 46}).encode(), "deeper than 10"),
    (json.dumps({**{f"k{i}": "x" * 4000 for i in range(9)}, "$version": 47}).encode(),
     "over the limit of 32768"),
]


def test_a_malformed_desired_document_from_the_cloud_is_refused_and_logged_and_the_twin_keeps_its_last_good_one(
    upstream, hub_factory, clients
):
    child1 = Identity.child("child1")
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(upstream, [child1])
    wait_scope(hub, 1)
    rc, c = try_connect(hub.port, clients, **child1.credentials())
    assert rc == 0
    assert c.subscribe_result(["$iothub/twin/res/#", f"{DESIRED}#"]) == [1, 1]
    topic_desired = "devices/child1/twin/desired"

    publish_retained(upstream.port, topic_desired, b'{"rate": 5, "mode": "eco", "$version": 2}')
    topic, body = wait_answer(c, DESIRED, "the first desired patch")
    assert (topic, json.loads(body)) == (f"{DESIRED}?$version=2", {"rate": 5, "mode": "eco", "$version": 2})

    for doc, reason in MALFORMED_DESIRED:
        offset = log_size(hub)
        publish_retained(upstream.port, topic_desired, doc)
        wait_log(hub, offset, line_with("desired properties refused", "identity=child1", reason), 15,
                 f"the refusal of {doc[:60]!r} ({reason})")
    assert hub.alive(), "the hub exited on a malformed desired document"
    refused = f'edgehub_cloud_refused_total{{kind="desired",reason="invalid"}} {len(MALFORMED_DESIRED)}\n'
    assert refused in hub.metrics_text(), "the refused desired documents are not counted as such"
    assert not c.closed.is_set(), "the device lost its connection"
    assert on_topic(c, DESIRED) == [], "a refused document was pushed to the device"
    assert get_twin(c, "after-refusals")["desired"] == {"rate": 5, "mode": "eco", "$version": 2}, \
        "a refused document changed the cached desired properties"

    # An older version is ignored without a word; then a valid document, whose
    # $version (3) is below every refused one's, is applied and pushed as the
    # diff with the last good document.
    publish_retained(upstream.port, topic_desired, b'{"rate": 1, "$version": 1}')
    publish_retained(upstream.port, topic_desired, b'{"rate": 7, "$version": 3}')
    topic, body = wait_answer(c, DESIRED, "the desired patch after the refusals")
    assert (topic, json.loads(body)) == (f"{DESIRED}?$version=3", {"rate": 7, "mode": None, "$version": 3})
    assert on_topic(c, DESIRED) == [], "the older document was pushed too"
    assert get_twin(c, "after-valid")["desired"] == {"rate": 7, "$version": 3}
    assert hub.alive() and not c.closed.is_set()


def test_a_desired_document_for_an_identity_outside_the_scope_reaches_no_one_and_the_hub_never_subscribes_to_it(
    upstream_factory, hub_factory, clients
):
    up, hub, (child1, child2, mod1) = scoped_hub(upstream_factory, hub_factory)
    devices = {}
    for ident in (child1, child2, mod1):
        rc, c = try_connect(hub.port, clients, **ident.credentials())
        assert rc == 0
        assert c.subscribe_result(["$iothub/twin/res/#", f"{DESIRED}#"]) == [1, 1]
        devices[ident.client_id] = c
    in_scope = {
        "devices/child1/twin/desired",
        "devices/child2/twin/desired",
        f"devices/{EDGE_ID}/modules/mod1/twin/desired",
    }
    wait_subscribed(up, in_scope)

    offset = log_size(hub)
    outsiders = [
        "devices/stranger/twin/desired",  # a device not in the scope
        f"devices/{EDGE_ID}/modules/ghost/twin/desired",  # a module of this edge not in the scope
        "devices/child1/modules/ghost/twin/desired",  # a module of an in-scope child device
        f"devices/{EDGE_ID}/twin/desired",  # the edge device itself, not an identity of the scope
    ]
    for topic in outsiders:
        publish_retained(up.port, topic, b'{"outsider": true, "$version": 9}')
    # the sentinels, published after: each identity of the scope gets its own patch
    publish_retained(up.port, "devices/child1/twin/desired", b'{"rate": 1, "$version": 2}')
    publish_retained(up.port, f"devices/{EDGE_ID}/modules/mod1/twin/desired", b'{"level": 3, "$version": 2}')
    _, body = wait_answer(devices["child1"], DESIRED, "child1's own desired patch")
    assert json.loads(body) == {"rate": 1, "$version": 2}
    _, body = wait_answer(devices[f"{EDGE_ID}/mod1"], DESIRED, "mod1's own desired patch")
    assert json.loads(body) == {"level": 3, "$version": 2}

    for who, c in devices.items():
        assert on_topic(c, DESIRED) == [], f"{who} got a desired patch meant for another identity"
        assert not c.closed.is_set()
    assert get_twin(devices["child1"], "g1")["desired"] == {"rate": 1, "$version": 2}
    assert get_twin(devices["child2"], "g2")["desired"] == {"$version": 1}, "child2's twin took an outsider's document"
    log = log_since(hub, offset)
    applied = re.findall(r"desired properties changed[^\n]*identity=(\S+)", log)
    assert sorted(applied) == sorted(["child1", f"{EDGE_ID}/mod1"]), f"desired documents applied: {applied}"
    assert not re.search(r"stranger|ghost|outsider", log), f"the hub saw an outsider's document:\n{log}"

    subscribed = hub_subscriptions(up)
    desired_filters = {f for f in subscribed if f.endswith("/twin/desired")}
    assert desired_filters == in_scope | {f"devices/{EDGE_ID}/modules/$edgeHub/twin/desired"}, \
        f"the hub's desired subscriptions are not one per identity of the scope: {sorted(desired_filters)}"
    assert not unwanted(subscribed, outsiders), sorted(subscribed)
    assert hub.alive()


def test_a_cloud_call_outside_the_scope_is_answered_by_no_one_and_reaches_no_client_and_one_to_an_identity_away_is_404(
    upstream_factory, hub_factory, clients
):
    up, hub, (child1, child2, mod1) = scoped_hub(upstream_factory, hub_factory)
    devices = {}
    for ident in (child1, child2):
        rc, c = try_connect(hub.port, clients, **ident.credentials())
        assert rc == 0 and c.subscribe_result([f"{METHOD_POST}#"]) in ([0], [1])
        devices[ident.client_id] = c
    # mod1 is in the scope but never connects
    in_scope = {
        "devices/child1/methods/+/+",
        "devices/child2/methods/+/+",
        f"devices/{EDGE_ID}/modules/mod1/methods/+/+",
    }
    wait_subscribed(up, in_scope)
    cloud = Cloud(up)
    clients.append(cloud)
    offset = log_size(hub)

    # calls for identities outside the scope: the hub never gets them
    outsider_roots = ["devices/stranger", f"devices/{EDGE_ID}/modules/ghost", "devices/child1/modules/ghost",
                      f"devices/{EDGE_ID}"]
    outsider_rids = [cloud.call(root, "reboot", {"payload": {"outsider": True}, "responseTimeoutInSeconds": 5})
                     for root in outsider_roots]
    # on child1's call filter but not a call: ignored with a line, never answered
    for topic in ("devices/child1/methods/res/notacall", "devices/child1/methods/reboot/"):
        cloud.pub.publish(topic, b'{"payload": {"outsider": true}}', qos=1).wait_for_publish(10)
        wait_log(hub, offset, line_with("ignored", f"topic={topic}"), 15, f"the hub ignoring {topic}")

    # the sentinel: a call to mod1, in the scope and away, is answered 404
    away = cloud.call(f"devices/{EDGE_ID}/modules/mod1", "reboot", {"payload": None})
    status, payload = cloud.answer(f"devices/{EDGE_ID}/modules/mod1", away, 15)
    assert status == 404 and "not connected" in payload["message"], payload

    answers = [t for t, _ in cloud.sub.received()
               if "/methods/res/" in t and t != "devices/child1/methods/res/notacall"]
    assert answers == [f"devices/{EDGE_ID}/modules/mod1/methods/res/404/{away}"], \
        f"answers for calls the hub should not have taken: {answers} (outsider rids {outsider_rids})"
    for who, c in devices.items():
        assert on_topic(c, METHOD_POST) == [], f"{who} got a call meant for another identity"
        assert not c.closed.is_set()
    log = log_since(hub, offset)
    assert not re.search(r"stranger|ghost", log), f"the hub saw a call outside its scope:\n{log}"
    counted = hub.metrics_text()
    assert 'edgehub_cloud_refused_total{kind="method",reason="not_for_the_hub"} 2\n' in counted, \
        "the two messages that are not calls are not counted as ignored"
    assert 'reason="outside_scope"' not in counted, "a call outside the scope reached the hub"
    subscribed = hub_subscriptions(up)
    method_filters = {f for f in subscribed if "/methods/" in f}
    assert method_filters == in_scope, \
        f"the hub's method subscriptions are not one per identity of the scope: {sorted(method_filters)}"
    assert not unwanted(subscribed, [f"{root}/methods/reboot/{rid}" for root, rid in zip(outsider_roots, outsider_rids)]), \
        sorted(subscribed)

    # child1's subscription does work: a call to it arrives and its answer goes back
    ping = cloud.call("devices/child1", "ping", {"payload": {"n": 1}, "responseTimeoutInSeconds": 10})
    method, hub_rid, body = call_received(devices["child1"])
    assert (method, json.loads(body)) == ("ping", {"n": 1})
    assert devices["child1"].publish_result(f"$iothub/methods/res/200/?$rid={hub_rid}", b'{"pong": 1}') == 0
    assert cloud.answer("devices/child1", ping, 15) == (200, {"pong": 1})
    assert on_topic(devices["child1"], METHOD_POST) == [] and on_topic(devices["child2"], METHOD_POST) == []
    assert hub.alive()
