"""Routes (`[routes]`): which upstream-bound messages go where, with and
without plugins on the way."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import hub_env, wait_until
from pluginkit import (  # noqa: F401 - fixtures
    bag_dict,
    connect_publisher,
    hub_config_text,
    plugin_hub,
    plugins_dist,
    publish_all,
    sentinel_hub,
    split_telemetry,
)

EDGE = "edge-r"


def check_config(edgehub_bin, cfg) -> tuple[int, str]:
    """Runs `edgehub check-config`; returns (exit code, stdout and stderr)."""
    r = subprocess.run([edgehub_bin, "check-config", str(cfg)], capture_output=True, timeout=30, env=hub_env())
    return r.returncode, (r.stdout + r.stderr).decode("utf-8", "replace")


def received_at_input(sub, payload: bytes, desc: str) -> list[tuple[str, bytes]]:
    """Waits until ``payload`` reached ``sub``; returns (topic, payload) of
    everything it received by then."""
    msgs = sub.wait_for(lambda ms: any(m.payload == payload for m in ms), 20, desc)
    return [(m.topic, bytes(m.payload)) for m in msgs]


# --------------------------------------------------------------------------
# no routes, conditions, endpoints, fan-in
# --------------------------------------------------------------------------


def test_without_routes_every_telemetry_message_goes_upstream_unchanged(
    upstream, collector_factory, plugin_hub, clients  # noqa: F811
):
    collector = collector_factory(upstream)
    # a config file with a [plugins] section but no [routes]
    ph = plugin_hub(upstream, routes=None, edge_id=EDGE)
    pub = connect_publisher(ph.port, clients)
    sent = [
        ("devices/d1/messages/events/%24.ct=application%2Fjson&temp=21", b'{"temp":21}'),
        ("devices/d2/messages/events/", b"\x00\xffraw"),
        (f"devices/{EDGE}/modules/m1/messages/events/%24.on=out1&k=a%20b", b"module"),
        ("devices/d1/messages/events/level=debug", b'{"level":"debug"}'),
    ]
    publish_all(pub, sent)
    got = collector.wait_for(lambda ms: all(s in ms for s in sent), 20, "all messages upstream")
    assert sorted(got) == sorted(sent), f"upstream got {got}"


ROUTE_CASES = {
    # application property, numeric comparison of the property string
    "app-property": (
        "FROM /messages/* WHERE temp > 30 INTO $upstream",
        [
            ("devices/d1/messages/events/temp=25", False),
            ("devices/d1/messages/events/temp=31", True),
            ("devices/d1/messages/events/temp=100", True),  # as text "100" < "30"
            ("devices/d1/messages/events/temp=hot", False),
            ("devices/d1/messages/events/other=99", False),
            ("devices/d1/modules/m1/messages/events/%24.on=o1&temp=40", True),
        ],
    ),
    # system properties from the topic and from the property bag
    "system-properties": (
        "FROM /messages/* WHERE $connectionDeviceId = 'd1' AND $contentType = 'application/json'"
        " AND $messageId != 'skip' INTO $upstream",
        [
            ("devices/d1/messages/events/%24.ct=application%2Fjson&%24.mid=m1", True),
            ("devices/d2/messages/events/%24.ct=application%2Fjson&%24.mid=m2", False),
            ("devices/d1/messages/events/%24.ct=text%2Fplain&%24.mid=m3", False),
            ("devices/d1/messages/events/%24.ct=application%2Fjson&%24.mid=skip", False),
            ("devices/d1/messages/events/%24.ct=application%2Fjson&%24.mid=m5&x=1", True),
        ],
    ),
    # the JSON body
    "body": (
        "FROM /messages/devices/* WHERE $body.level = 'critical' OR $body.reading.value >= 10 INTO $upstream",
        [
            ("devices/d1/messages/events/", {"level": "critical"}),
            ("devices/d1/messages/events/", {"level": "info"}),
            ("devices/d1/messages/events/", {"reading": {"value": 10}}),
            ("devices/d1/messages/events/", {"reading": {"value": 9.5}}),
            ("devices/d1/messages/events/", "level critical (not json)"),
            ("devices/d1/messages/events/", {"level": "CRITICAL"}),
        ],
    ),
    # IS_DEFINED, NOT, a module output source
    "logic-and-source": (
        "FROM /messages/modules/sensor/outputs/* WHERE IS_DEFINED(alarm) AND NOT (alarm = 'test') INTO $upstream",
        [
            (f"devices/{EDGE}/modules/sensor/messages/events/%24.on=out1&alarm=fire", True),
            (f"devices/{EDGE}/modules/sensor/messages/events/%24.on=out2&alarm=test", False),
            (f"devices/{EDGE}/modules/sensor/messages/events/%24.on=out1", False),
            (f"devices/{EDGE}/modules/other/messages/events/%24.on=out1&alarm=fire", False),
            ("devices/d1/messages/events/alarm=fire", False),
            (f"devices/{EDGE}/modules/sensor/messages/events/%24.on=out9&alarm=flood", True),
        ],
    ),
}

BODY_MATCH = [True, False, True, False, False, False]


@pytest.mark.parametrize("case", list(ROUTE_CASES))
def test_a_where_condition_sends_only_matching_messages_upstream(sentinel_hub, case):  # noqa: F811
    route, items = ROUTE_CASES[case]
    ph = sentinel_hub(routes={"r": route}, edge_id=EDGE)
    sent = []
    for i, (topic, spec) in enumerate(items):
        if case == "body":
            body = spec if isinstance(spec, str) else json.dumps(spec)
            payload = f"{body}".encode()
            match = BODY_MATCH[i]
        else:
            payload = f"{case}-{i}".encode()
            match = spec
        sent.append((topic, payload, match))
    want = [(t, p) for t, p, m in sent if m]
    before = ph.publish_then_sentinel([(t, p) for t, p, _ in sent], b"sentinel-" + case.encode())
    assert before == want, (
        f"route {route!r}:\nexpected upstream {want}\ngot {before}"
    )


def test_brokered_endpoint_delivers_to_a_module_input_on_the_hub(sentinel_hub):  # noqa: F811
    ph = sentinel_hub(
        routes={
            "alarm": 'FROM /messages/modules/sensor/outputs/* WHERE temp > 30 INTO BrokeredEndpoint("/modules/alarm/inputs/hot")',
        },
        edge_id=EDGE,
    )
    sub = ph.subscribe_module_inputs("alarm")
    hot_topic = f"devices/{EDGE}/modules/sensor/messages/events/%24.on=out1&temp=35"
    publish_all(ph.pub, [
        (f"devices/{EDGE}/modules/sensor/messages/events/%24.on=out1&temp=20", b"cool"),
        (hot_topic, b"hot"),
    ])
    got = received_at_input(sub, b"hot", "the hot message at the module input")
    hot = [t for t, p in got if p == b"hot"]
    assert len(hot) == 1, got
    prefix, bag = split_telemetry(hot[0])
    assert prefix == f"devices/{EDGE}/modules/alarm/inputs/hot/", hot[0]
    assert ("temp", "35") in bag, f"the property bag was not carried to the input: {hot[0]}"
    assert dict(bag).get("$.on") == "out1", hot[0]
    # nothing went upstream (the only route for these is the endpoint)
    assert ph.upstream_before_sentinel(b"sentinel-be") == []
    assert [p for _, p in sub.received()] == [b"hot"], f"cool message reached the input: {sub.received()}"


def test_several_matching_routes_send_one_copy_upstream(upstream, collector_factory, plugin_hub, clients):  # noqa: F811
    collector = collector_factory(upstream)
    ph = plugin_hub(
        upstream,
        routes={
            "a": "FROM /messages/* INTO $upstream",
            "b": "FROM /messages/devices/* INTO $upstream",
            "c": {"route": "FROM /messages/devices/d1 WHERE n >= 0 INTO $upstream", "priority": 3},
            "d": "FROM /* INTO $UPSTREAM",
        },
        edge_id=EDGE,
    )
    pub = connect_publisher(ph.port, clients)
    items = [(f"devices/d1/messages/events/n={i}", f"copy-{i}".encode()) for i in range(10)]
    items.append(("devices/d2/messages/events/n=10", b"copy-10"))
    items.append(("devices/d1/messages/events/n=99", b"last"))
    publish_all(pub, items)
    # messages of one client arrive in order: when the last is there, all are
    got = collector.wait_payload(b"last", 20)
    assert got == items, f"duplicates or losses upstream: {got}"


# --------------------------------------------------------------------------
# plugins in routes
# --------------------------------------------------------------------------


def test_field_filter_route_sends_only_hot_messages_upstream_marked_alert(sentinel_hub, plugins_dist):  # noqa: F811
    ph = sentinel_hub(
        plugins={"field-filter": plugins_dist / "field-filter.wasm"},
        settings={"field-filter": {"config": {"field": "temperature", "above": 25}}},
        routes={
            "hot": {
                "route": "FROM /messages/devices/* WHERE $connectionDeviceId = 'd1' "
                         'INTO plugin("field-filter") THEN $upstream',
                "onError": "drop",
            },
        },
        edge_id=EDGE,
    )
    topic = "devices/d1/messages/events/%24.ct=application%2Fjson&unit=C"
    bodies = [
        ({"temperature": 20}, False),
        ({"temperature": 30.5, "n": 1}, True),
        ({"temperature": "hot"}, False),
        ({"temperature": 25}, False),
        ({"humidity": 90}, False),
        ({"temperature": 26, "n": 5}, True),
    ]
    items = [(topic, json.dumps(b).encode()) for b, _ in bodies]
    items.append((topic, b"not json"))
    items.append(("devices/d2/messages/events/", json.dumps({"temperature": 99}).encode()))  # no route for d2
    filtered_before = ph.metric("edgehub_messages_filtered_total")
    got = ph.publish_then_sentinel(items, b"sentinel-ff")
    want_payloads = [json.dumps(b).encode() for b, keep in bodies if keep]
    assert [p for _, p in got] == want_payloads, f"upstream got {got}"
    for t, _ in got:
        assert t == "devices/d1/messages/events/$.ct=application%2Fjson&unit=C&alert=true", (
            f"topic of a filtered message not rebuilt with system properties first and alert=true last: {t}"
        )
        assert bag_dict(t) == {"$.ct": "application/json", "unit": "C", "alert": "true"}
    ph.wait_metric("edgehub_messages_filtered_total", lambda v: v >= filtered_before + 5, 10, "+5")
    assert ph.metric("edgehub_plugin_calls_total") >= 7
    assert ph.metric("edgehub_plugin_failures_total") == 0


def test_plugin_settings_from_the_config_reach_the_plugin(sentinel_hub, plugins_dist):  # noqa: F811
    ph = sentinel_hub(
        plugins={"ff": plugins_dist / "field-filter.wasm"},
        settings={"ff": {"config": {"field": "rpm", "above": 5000}}},
        routes={"r": 'FROM /messages/devices/* INTO plugin("ff")'},
        edge_id=EDGE,
    )
    items = [
        ("devices/m/messages/events/", b'{"temperature": 99}'),
        ("devices/m/messages/events/", b'{"rpm": 4000}'),
        ("devices/m/messages/events/", b'{"rpm": 7000}'),
    ]
    got = ph.publish_then_sentinel(items, b"sentinel-settings")
    assert got == [("devices/m/messages/events/alert=true", b'{"rpm": 7000}')], got


def test_content_router_sends_critical_upstream_and_to_the_alerts_module_and_drops_debug(
    sentinel_hub, plugins_dist  # noqa: F811
):
    ph = sentinel_hub(
        plugins={"content-router": plugins_dist / "content-router.wasm"},
        routes={"cr": 'FROM /messages/devices/* INTO plugin("content-router")'},
        edge_id=EDGE,
    )
    sub = ph.subscribe_module_inputs("alerts")
    topic = "devices/d7/messages/events/%24.ct=application%2Fjson&site=north"
    crit = json.dumps({"level": "critical", "msg": "boiler"}).encode()
    debug = json.dumps({"level": "debug", "msg": "noise"}).encode()
    info = json.dumps({"level": "info", "msg": "ok"}).encode()
    filtered_before = ph.metric("edgehub_messages_filtered_total")
    got = ph.publish_then_sentinel([(topic, debug), (topic, crit), (topic, info)], b"sentinel-cr")
    assert [p for _, p in got] == [crit, info], f"upstream got {got}"
    for t, _ in got:
        assert bag_dict(t) == {"$.ct": "application/json", "site": "north"}, t
        assert t.startswith("devices/d7/messages/events/"), t
    local = received_at_input(sub, crit, "critical at alerts/input1")
    assert local == [
        (f"devices/{EDGE}/modules/alerts/inputs/input1/$.ct=application%2Fjson&site=north", crit)
    ], f"module input got {local}"
    ph.wait_metric("edgehub_messages_filtered_total", lambda v: v >= filtered_before + 1, 10, "+1 (debug)")
    assert sub.received() == [(local[0][0], crit)], "debug or info reached the module input"


def test_a_plugin_chain_ends_at_a_module_input(sentinel_hub, plugins_dist):  # noqa: F811
    """dedup THEN field-filter THEN BrokeredEndpoint: repeats are dropped by
    the first plugin, cold readings by the second, the rest reach the module
    input marked alert=true; nothing goes upstream."""
    ph = sentinel_hub(
        plugins={"dedup": plugins_dist / "dedup.wasm", "field-filter": plugins_dist / "field-filter.wasm"},
        routes={
            "chain": 'FROM /messages/devices/* INTO plugin("dedup") THEN plugin("field-filter") '
                     'THEN BrokeredEndpoint("/modules/alarm/inputs/in1")',
        },
        edge_id=EDGE,
    )
    sub = ph.subscribe_module_inputs("alarm")
    t = "devices/d3/messages/events/%24.mid={}"
    items = [
        (t.format("m1"), b'{"temperature": 30}'),
        (t.format("m1"), b'{"temperature": 31}'),  # repeat id: dropped by dedup
        (t.format("m2"), b'{"temperature": 5}'),  # cold: dropped by field-filter
        (t.format("m3"), b'{"temperature": 50}'),
    ]
    filtered_before = ph.metric("edgehub_messages_filtered_total")
    assert ph.publish_then_sentinel(items, b"sentinel-chain") == []
    got = received_at_input(sub, b'{"temperature": 50}', "m3 at the input")
    prefix = f"devices/{EDGE}/modules/alarm/inputs/in1/"
    assert got == [
        (prefix + "$.mid=m1&alert=true", b'{"temperature": 30}'),
        (prefix + "$.mid=m3&alert=true", b'{"temperature": 50}'),
    ], got
    ph.wait_metric("edgehub_messages_filtered_total", lambda v: v >= filtered_before + 2, 10, "+2")


def test_view_filters_keep_messages_as_published_and_their_drops_and_replacements_take_effect(
    sentinel_hub, plugins_dist  # noqa: F811
):
    """passthrough and field-filter both export the view-filter world:
    passthrough keeps every message (nothing copied back), field-filter
    drops cold or non-JSON readings and replaces hot ones with a copy marked
    alert=true. A kept module message goes upstream byte for byte as
    published; the device messages come out of the chain as field-filter
    said, in order."""
    ph = sentinel_hub(
        plugins={"passthrough": plugins_dist / "passthrough.wasm", "field-filter": plugins_dist / "field-filter.wasm"},
        routes={
            "alerts": 'FROM /messages/devices/* INTO plugin("passthrough") THEN plugin("field-filter") THEN $upstream',
            "modules": 'FROM /messages/modules/* INTO plugin("passthrough")',
        },
        edge_id=EDGE,
    )
    for name in ("passthrough", "field-filter"):
        assert "view-filter" in ph.wait_loaded(name), f"{name} is not loaded as a view filter"
    device = "devices/d4/messages/events/"
    module = f"devices/{EDGE}/modules/m1/messages/events/%24.on=out1&k=a%20b&%24.ct=application%2Fjson"
    items = [
        (device + "%24.mid=a1&site=north", b'{"temperature": 30}'),
        (module, b"\x00\xffmodule bytes"),
        (device + "site=south", b'{"temperature": 5}'),  # cold: dropped
        (device, b"not json"),  # dropped
        (device, b'{"temperature": 99.5}'),
    ]
    filtered_before = ph.metric("edgehub_messages_filtered_total")
    got = ph.publish_then_sentinel(items, b"sentinel-view")
    assert [m for m in got if m[0].startswith(f"devices/{EDGE}/")] == [items[1]], got
    from_devices = [(split_telemetry(t), p) for t, p in got if t.startswith(device)]
    assert from_devices == [
        ((device, [("$.mid", "a1"), ("site", "north"), ("alert", "true")]), b'{"temperature": 30}'),
        ((device, [("alert", "true")]), b'{"temperature": 99.5}'),
    ], got
    ph.wait_metric("edgehub_messages_filtered_total", lambda v: v >= filtered_before + 2, 10, "+2 (cold, not json)")


# --------------------------------------------------------------------------
# config errors and per-route time to live
# --------------------------------------------------------------------------


def test_check_config_and_run_point_at_the_column_of_a_bad_route(edgehub_bin, tmp_path, free_port_factory):
    bad_route = "FROM /messages/devices/* WHERE temp > 30 INTO $upstrem"
    cfg = tmp_path / "bad-route.toml"
    cfg.write_text(hub_config_text(routes={"good": "FROM /messages/* INTO $upstream", "bad": bad_route}))
    column = bad_route.index("$upstrem") + 1

    rc, out = check_config(edgehub_bin, cfg)
    assert rc != 0, f"check-config accepted a bad route:\n{out}"
    assert f"routes.bad: column {column}:" in out, out
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip() == bad_route)
    caret = lines[i + 1]
    assert caret.strip() == "^" and caret.index("^") == column - 1, f"caret not under column {column}:\n{out}"
    assert "routes.good" not in out, out

    port = free_port_factory()
    r = subprocess.run(
        [edgehub_bin, "run", "--listen", f"127.0.0.1:{port}", "--storage", str(tmp_path / "st"), "--config", str(cfg)],
        capture_output=True, timeout=30, env=hub_env(),
    )
    out = (r.stdout + r.stderr).decode("utf-8", "replace")
    assert r.returncode != 0, f"edgehub run started with a bad route:\n{out}"
    assert f"routes.bad: column {column}:" in out, out

    # a bad route entry (not the text) is reported too
    cfg.write_text(hub_config_text(routes={"p": {"route": "FROM /* INTO $upstream", "onError": "retry"}}))
    rc, out = check_config(edgehub_bin, cfg)
    assert rc != 0 and "routes.p:" in out and "onError" in out, out


def test_per_route_time_to_live_expires_only_that_routes_messages(offline_upstream, plugin_hub, clients):  # noqa: F811
    up, collector = offline_upstream()
    ph = plugin_hub(
        up,
        routes={
            "short": {"route": "FROM /messages/devices/short INTO $upstream", "timeToLiveSecs": 1},
            "long": "FROM /messages/devices/long INTO $upstream",
        },
        edge_id=EDGE,
    )
    hub = ph.hub
    n = 20
    pub = connect_publisher(ph.port, clients)
    for i in range(n):
        pub.publish("devices/short/messages/events/", f"short-{i}".encode(), key=("s", i))
        pub.publish("devices/long/messages/events/", f"long-{i}".encode(), key=("l", i))
    pub.wait_results(2 * n, 30)
    assert len(pub.acked) == 2 * n, pub.results
    wait_until(
        lambda: hub.queue_stats()["oldest_age_secs"] >= 1.5 or hub.metric("edgehub_messages_expired_total") >= n,
        20, "queued messages older than 1.5 s (or the short ones expired)", interval=0.1,
    )
    assert collector.count() == 0

    up.start()
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 30, "== 1")
    assert pub.publish_and_wait("devices/long/messages/events/", b"fresh") < 0x80
    msgs = collector.wait_payload(b"fresh", 30)
    want = [f"long-{i}".encode() for i in range(n)] + [b"fresh"]
    assert [p for _, p in msgs] == want, (
        f"expected only the long route's messages then 'fresh'; got {[p for _, p in msgs]}"
    )
    expired = hub.wait_metric("edgehub_messages_expired_total", lambda v: v >= n, 20, f">= {n}")
    assert expired == n, f"edgehub_messages_expired_total = {expired}, expected {n}"
    hub.wait_queue_depth(0, 20)
