"""`edgehub cloud`: the cloud's part played on the user's own MQTT broker.

Each test runs the real CLI (a subprocess with a deadline) against a real
Mosquitto, with a real hub on the same broker where the outcome is the
hub's to show: identities provisioned with `scope ...` sign in at the hub
with the connection string and token the CLI prints (and stop signing in
after `rotate-key`, `remove`, `set-parent`), refused scope changes publish
nothing, `deploy` reaches the hub's routing (and a bad manifest is refused
with its file, line and column), `twin set`/`twin get` meet a paho device's
desired patches and reported properties, `invoke` meets a paho device's
method answers (200, 404, 504), `c2d` reaches a paho device with its
properties and message id, and `tail` prints the telemetry devices send
through the hub.

The hub subscribes to an identity's method and cloud-to-device topics when
the scope naming it is applied, a moment after `edgehub_scope_identities`
moves; a call or message sent before that would be lost on the broker. So
the tests that need those subscriptions run Mosquitto with `log_type
subscribe` and wait for the hub's SUBSCRIBE in its log.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from authkit import (
    EDGE_ID,
    HUB_NAME,
    V3_ACCEPTED,
    V3_BAD_CREDENTIALS,
    V3_NOT_AUTHORIZED,
    auth_args,
    log_size,
    publish_retained,
    sas_token,
    try_connect,
    wait_log,
    wait_scope,
)
from cloudkit import (  # noqa: F401 (_cloud_binary: the autouse fixture)
    CLI_TIMEOUT,
    _BIN,
    Tail,
    _cloud_binary,
    cloud,
    cloud_cmd,
    connection_string,
    creds,
    describe,
    published_version,
    scope_list,
    token,
    twin_get,
    wait_twin,
)
from helpers import Subscriber, WaitTimeout, hub_env, tail, wait_until
from pluginkit import connect_publisher, parse_bag

EDGE2 = "edge2"

# --------------------------------------------------------------------------
# the hub
# --------------------------------------------------------------------------


def wait_applied(hub, offset: int, version: int) -> None:
    """Waits until the hub logs that it applied scope ``version``."""
    wait_log(hub, offset, rf"device scope applied\b.*\bversion={version}\b", 20, f"the hub to apply scope {version}")


def wait_hub_subscribed(upstream, topic_filter: str, timeout: float = 20.0) -> None:
    """Waits for the hub's SUBSCRIBE to ``topic_filter`` in the log of a
    Mosquitto started with `log_type subscribe` (line `<client> <qos> <filter>`)."""
    rx = re.compile(rf"^\d+: {re.escape(EDGE_ID)} \d {re.escape(topic_filter)}$", re.MULTILINE)
    try:
        wait_until(lambda: rx.search(Path(upstream.log_path).read_text(errors="replace")), timeout,
                   f"the hub to subscribe to {topic_filter} upstream", interval=0.05)
    except WaitTimeout as exc:
        raise WaitTimeout(f"{exc}\nbroker log:\n{tail(upstream.log_path, 4000)}") from None


@pytest.fixture
def sub_upstream(upstream_factory):
    """A running upstream broker that logs every subscription."""
    up = upstream_factory(extra_conf=["log_type subscribe"])
    up.start()
    return up


def provisioned_hub(up, hub_factory, *identities: str):
    """Registers EDGE_ID with the CLI, adds ``identities`` (`d`: a child
    device; `EDGE_ID/m`: a module) and starts a hub that has applied them."""
    cloud(up, "scope", "add-edge", EDGE_ID)
    for ident in identities:
        cloud(up, "scope", "add", ident, *([] if "/" in ident else ["--parent", EDGE_ID]))
    hub = hub_factory(up, edge_id=EDGE_ID, extra_args=auth_args())
    wait_scope(hub, len(identities))
    return hub


def connect(hub, up, clients, identity: str, subscribe: list[str] = ()):
    """A paho device signed in with the token the CLI prints, subscribed to
    ``subscribe``."""
    rc, c = try_connect(hub.port, clients, **creds(identity, token(up, identity)))
    assert rc == V3_ACCEPTED, f"{identity} with the CLI's token: CONNACK {rc}"
    if subscribe:
        assert c.subscribe_result(list(subscribe)) == [1] * len(subscribe)
    return c


# --------------------------------------------------------------------------
# 1. provisioning
# --------------------------------------------------------------------------


def test_identities_added_with_the_cli_sign_in_at_the_hub_and_rotate_key_remove_and_set_parent_take_effect_there(
    upstream, hub_factory, clients
):
    up = upstream
    assert "scope version 1 published" in cloud(up, "scope", "add-edge", EDGE_ID).stderr
    cloud(up, "scope", "add-edge", EDGE2)
    hub = hub_factory(up, edge_id=EDGE_ID, extra_args=auth_args())
    cloud(up, "scope", "add", "child1", "--parent", EDGE_ID)
    cloud(up, "scope", "add", f"{EDGE_ID}/mod1")
    wait_scope(hub, 2)

    listed = scope_list(up, "--edge", EDGE_ID)
    assert sorted((e["identity"], e["parent"], e["auth"], e["edge"]) for e in listed) == [
        ("child1", EDGE_ID, "sas", EDGE_ID), (f"{EDGE_ID}/mod1", None, "sas", EDGE_ID)], listed

    # the connection string: its key signs a token the hub takes
    cs = connection_string(up, "child1", "--gateway", "localhost")
    assert (cs["HostName"], cs["DeviceId"], cs["GatewayHostName"]) == (HUB_NAME, "child1", "localhost"), cs
    assert "ModuleId" not in cs
    assert connection_string(up, "child1")["GatewayHostName"] == EDGE_ID, "default gateway: the device's edge"
    key = cs["SharedAccessKey"]
    assert key not in json.dumps(scope_list(up)), "scope list printed a key"
    rc, _ = try_connect(hub.port, clients, **creds("child1", sas_token(key, "child1")))
    assert rc == V3_ACCEPTED, f"child1 with a token signed by its connection string's key: CONNACK {rc}"
    mcs = connection_string(up, f"{EDGE_ID}/mod1")
    assert (mcs["DeviceId"], mcs["ModuleId"]) == (EDGE_ID, "mod1"), mcs
    rc, _ = try_connect(hub.port, clients, **creds(f"{EDGE_ID}/mod1",
                                                   sas_token(mcs["SharedAccessKey"], EDGE_ID, "mod1")))
    assert rc == V3_ACCEPTED, f"mod1 with its connection string's key: CONNACK {rc}"

    # the token the CLI prints is accepted too, and its lifetime is --ttl-secs
    before = int(time.time())
    primary_token = token(up, "child1", "--ttl-secs", "600")
    se = int(re.search(r"&se=(\d+)$", primary_token).group(1))
    assert before + 600 <= se <= int(time.time()) + 600, f"se={se} is not now + 600 s: {primary_token}"
    secondary_token = token(up, "child1", "--secondary")
    for which, pw in (("primary", primary_token), ("secondary", secondary_token)):
        rc, c = try_connect(hub.port, clients, **creds("child1", pw))
        assert rc == V3_ACCEPTED, f"child1 with the CLI's {which} token: CONNACK {rc}"
        assert c.publish_result("devices/child1/messages/events/", b"signed in") == 0
        c.close()

    # rotate-key (primary by default): the old primary is refused, the secondary still works
    offset = log_size(hub)
    version = published_version(cloud(up, "scope", "rotate-key", "child1"), EDGE_ID)
    wait_applied(hub, offset, version)
    assert try_connect(hub.port, clients, **creds("child1", primary_token))[0] == V3_BAD_CREDENTIALS, \
        "the rotated primary key still signs in"
    assert try_connect(hub.port, clients, **creds("child1", secondary_token))[0] == V3_ACCEPTED, \
        "rotating the primary key changed the secondary"
    new_token = token(up, "child1")
    assert new_token != primary_token
    assert try_connect(hub.port, clients, **creds("child1", new_token))[0] == V3_ACCEPTED, \
        "the new primary key is refused"
    # --which both: neither old key signs in any more
    offset = log_size(hub)
    version = published_version(cloud(up, "scope", "rotate-key", "child1", "--which", "both"), EDGE_ID)
    wait_applied(hub, offset, version)
    for which, pw in (("primary", new_token), ("secondary", secondary_token)):
        got = try_connect(hub.port, clients, **creds("child1", pw))[0]
        assert got == V3_BAD_CREDENTIALS, f"old {which} key after rotating both: CONNACK {got}"
    assert try_connect(hub.port, clients, **creds("child1", token(up, "child1", "--secondary")))[0] == V3_ACCEPTED

    # remove: the module's open connection is closed and it is refused
    m = connect(hub, up, clients, f"{EDGE_ID}/mod1")
    mod_token = token(up, f"{EDGE_ID}/mod1")
    cloud(up, "scope", "remove", f"{EDGE_ID}/mod1")
    wait_scope(hub, 1)
    m.wait_closed(15, "the hub to close the connection of mod1, removed with the CLI")
    got = try_connect(hub.port, clients, **creds(f"{EDGE_ID}/mod1", mod_token))[0]
    assert got == V3_NOT_AUTHORIZED, f"removed module: CONNACK {got}"
    assert [e["identity"] for e in scope_list(up, "--edge", EDGE_ID)] == ["child1"]

    # set-parent: child1 moves to edge2 with its keys; this hub refuses it from then on
    key_before = connection_string(up, "child1")["SharedAccessKey"]
    moved_token = token(up, "child1")
    offset = log_size(hub)
    r = cloud(up, "scope", "set-parent", "child1", EDGE2)
    wait_applied(hub, offset, published_version(r, EDGE_ID))
    published_version(r, EDGE2)
    got = try_connect(hub.port, clients, **creds("child1", moved_token))[0]
    assert got == V3_NOT_AUTHORIZED, f"child1 moved to {EDGE2}, at {EDGE_ID}'s hub: CONNACK {got}"
    after = connection_string(up, "child1")
    assert after["SharedAccessKey"] == key_before, "set-parent changed the device's key"
    assert after["GatewayHostName"] == EDGE2, after
    assert [(e["edge"], e["identity"], e["parent"]) for e in scope_list(up)] == [
        (EDGE2, "child1", EDGE2), (EDGE_ID, None, None)], "an edge with no identity is listed as such"
    assert hub.alive()


def test_scope_adds_to_one_edge_made_at_the_same_time_all_land_or_are_refused(upstream):
    """Twelve `scope add`s to one edge at once; every one that exits 0 must be
    in the scope. A lost update needs the runs to overlap, so up to three
    rounds (a fresh edge each) are tried."""
    up = upstream
    for attempt in range(3):
        edge = f"busy{attempt}"
        cloud(up, "scope", "add-edge", edge)
        ids = [f"{edge}-d{i}" for i in range(12)]
        procs = {i: subprocess.Popen(cloud_cmd(up, "scope", "add", i, "--parent", edge), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=hub_env(), stdin=subprocess.DEVNULL)
                 for i in ids}
        said: dict[str, str] = {}
        codes: dict[str, int] = {}
        for i, p in procs.items():
            try:
                _, said[i] = p.communicate(timeout=CLI_TIMEOUT)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
            codes[i] = p.returncode
        succeeded = {i for i, code in codes.items() if code == 0}
        assert len(succeeded) >= len(ids) // 2, f"round {attempt}: most changes gave up: {said}"
        listed = {e["identity"] for e in scope_list(up, "--edge", edge)}
        assert succeeded <= listed, (
            f"round {attempt}: exit 0 but not in the scope: {sorted(succeeded - listed)}; "
            f"what each said: {said}")


def test_refused_scope_changes_exit_1_with_the_reason_and_publish_nothing(upstream):
    up = upstream
    cloud(up, "scope", "add-edge", "edge1")
    cloud(up, "scope", "add-edge", EDGE2)
    cloud(up, "scope", "add", "child1", "--parent", "edge1")
    cloud(up, "scope", "add", "child2", "--parent", EDGE2)
    versions = {e["edge"]: e["version"] for e in scope_list(up)}
    assert versions == {"edge1": 2, EDGE2: 2}, versions

    watcher = Subscriber(up.port).connect()
    try:
        watcher.subscribe("edges/#")
        # the retained scopes arrive first
        watcher.wait_for(lambda ms: len(ms) >= 2, 10, "the two retained scopes")
        seen = len(watcher.received())

        refusals = [
            (("scope", "add", "child1", "--parent", EDGE2),
             ["already a child of edge1", "set-parent"]),
            (("scope", "add", "child1", "--parent", "edge1"), ["already a child of edge1"]),
            (("scope", "add", EDGE2, "--parent", "edge1"), ["is an edge device"]),
            (("scope", "add", "ghost", "--parent", "nowhere"), ["no edge nowhere"]),
            (("scope", "add", "nowhere/mod1"), ["no edge nowhere"]),
            (("scope", "add-edge", "edge1"), ["edge1 already exists"]),
            (("scope", "rotate-key", "ghost"), ["ghost is in no edge's scope"]),
            (("scope", "remove", "ghost"), ["ghost is in no edge's scope"]),
            (("scope", "set-parent", "ghost", EDGE2), ["ghost is in no edge's scope"]),
            (("scope", "set-parent", "child1", "nowhere"), ["no edge nowhere"]),
        ]
        wrong = []
        for args, reasons in refusals:
            r = cloud(up, *args, rc=None)
            if r.returncode != 1 or r.stdout or not all(why in r.stderr for why in reasons):
                wrong.append(f"{' '.join(args)}: expected exit 1, no output and {reasons} on stderr; {describe(r)}")
        assert not wrong, "\n\n".join(wrong)

        # A change that is taken is the barrier: once its document arrives,
        # anything the refusals published would have arrived before it.
        barrier = cloud(up, "scope", "add", "child3", "--parent", EDGE2)
        assert published_version(barrier, EDGE2) == 3
        msgs = watcher.wait_for(lambda ms: len(ms) > seen, 10, "the barrier's scope document")
        new = [(m.topic, json.loads(m.payload)["version"]) for m in msgs[seen:]]
        assert new == [(f"edges/{EDGE2}/scope", 3)], f"refused changes published {new[:-1]}"
    finally:
        watcher.close()
    versions = {e["edge"]: e["version"] for e in scope_list(up)}
    assert versions == {"edge1": 2, EDGE2: 3}, versions
    assert [e["parent"] for e in scope_list(up, "--edge", "edge1")] == ["edge1"]
    # the broker may come from the environment instead of --broker
    by_env = subprocess.run([_BIN[0], "cloud", "scope", "list", "--edge", EDGE2], capture_output=True, text=True,
                            timeout=CLI_TIMEOUT, env=hub_env(EDGEHUB_CLOUD_BROKER=up.url), stdin=subprocess.DEVNULL)
    assert by_env.returncode == 0, describe(by_env)
    assert sorted(json.loads(ln)["identity"] for ln in by_env.stdout.splitlines()) == ["child2", "child3"], \
        describe(by_env)


def retained_raw(up, edge: str) -> bytes:
    """The bytes the broker holds retained on ``edge``'s scope topic."""
    watcher = Subscriber(up.port).connect()
    try:
        watcher.subscribe(f"edges/{edge}/scope")
        msgs = watcher.wait_for(lambda ms: len(ms) >= 1, 10, f"the retained scope of {edge}")
        return bytes(msgs[0].payload)
    finally:
        watcher.close()


def retained_scope(up, edge: str) -> dict:
    """The scope document the broker holds retained for ``edge``."""
    return json.loads(retained_raw(up, edge))


def test_an_interrupted_set_parent_is_finished_by_running_it_again_and_a_garbled_scope_blocks_only_its_own_edge(
    upstream,
):
    up = upstream
    cloud(up, "scope", "add-edge", "edge1")
    cloud(up, "scope", "add-edge", EDGE2)
    cloud(up, "scope", "add", "child1", "--parent", "edge1")
    # an edge with no identity is listed too
    empty = {"edge": EDGE2, "version": 1, "identity": None, "parent": None, "auth": None}
    assert empty in scope_list(up), scope_list(up)

    # A set-parent that published the new parent's document and not the
    # old one's: child1 is in both scopes, with the same keys.
    edge1 = retained_scope(up, "edge1")
    entry = dict(next(i for i in edge1["identities"] if i["deviceId"] == "child1"), parent=EDGE2)
    publish_retained(up.port, f"edges/{EDGE2}/scope", json.dumps({"version": 2, "identities": [entry]}).encode())
    listed = [(e["edge"], e["identity"]) for e in scope_list(up)]
    assert listed == [("edge1", "child1"), (EDGE2, "child1")], listed

    for args in (("scope", "rotate-key", "child1"), ("scope", "set-parent", "child1", "edge3")):
        r = cloud(up, *args, rc=1)
        assert "edge1 and edge2" in r.stderr and "set-parent child1" in r.stderr, describe(r)
    r = cloud(up, "scope", "set-parent", "child1", EDGE2)
    assert published_version(r, "edge1") == edge1["version"] + 1
    assert f"{EDGE2}: scope version" not in r.stderr, describe(r)
    listed = [(e["edge"], e["identity"]) for e in scope_list(up)]
    assert listed == [("edge1", None), (EDGE2, "child1")], listed
    kept = next(i for i in retained_scope(up, EDGE2)["identities"] if i["deviceId"] == "child1")
    assert kept["auth"] == entry["auth"], "the device lost its keys in the move"

    # Whatever sits retained on an edge's scope topic: its edge is named as
    # unreadable, edits of it are refused, the other edges are unaffected.
    publish_retained(up.port, "edges/bad/scope", b"\xff{ not json")
    r = cloud(up, "scope", "list", rc=1)
    lines = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [ln["edge"] for ln in lines] == ["edge1", EDGE2, "bad"], describe(r)
    assert lines[-1]["error"], describe(r)
    assert "mosquitto_pub -r -n -t edges/bad/scope" in r.stderr, describe(r)
    for args in (("scope", "add", "child9", "--parent", "bad"), ("scope", "add", "bad/mod1"),
                 ("scope", "add-edge", "bad")):
        r = cloud(up, *args, rc=1)
        assert "edges/bad/scope is not valid" in r.stderr and not r.stdout, describe(r)
    assert retained_raw(up, "bad") == b"\xff{ not json", "a refused edit published over the garbled document"
    r = cloud(up, "scope", "add", "child9", "--parent", "edge1")
    assert published_version(r, "edge1") == edge1["version"] + 2
    assert ("edge1", "child9") in [(e["edge"], e.get("identity")) for e in scope_list(up, "--edge", "edge1")]


# --------------------------------------------------------------------------
# 2. deploy
# --------------------------------------------------------------------------

HOT = "FROM /messages/* WHERE temp > 30 INTO $upstream"
ALARM = "FROM /messages/* WHERE alarm = 'yes' INTO $upstream"
COLD = "FROM /messages/* WHERE temp < 20 INTO $upstream"


def position_of(text: str, word: str, line_containing: str) -> tuple[int, int]:
    """1-based (line, column) of ``word`` on the first line of ``text`` that
    contains ``line_containing``."""
    for n, line in enumerate(text.splitlines(), 1):
        if line_containing in line:
            return n, line.index(word) + 1
    raise AssertionError(f"test bug: no line with {line_containing!r}")


def send_temps(pub, tag: str, temps: list[int]) -> list[bytes]:
    """One message per temperature, each acknowledged (routed) before the next."""
    sent = []
    for i, t in enumerate(temps):
        payload = f"{tag}-{i}-t{t}".encode()
        assert pub.publish_and_wait(f"devices/d1/messages/events/temp={t}", payload) == 0
        sent.append(payload)
    return sent


def upstream_exactly(collector, tag: str, expected: list[bytes]) -> None:
    """``expected`` (its last one last sent) arrive; nothing else tagged
    ``tag`` does. The upstream queue is FIFO: once the last message sent
    arrived, every one routed before it has arrived too."""
    collector.wait_distinct_payloads(set(expected), 15)
    got = [p for _, p in collector.snapshot() if p.startswith(f"{tag}-".encode())]
    assert got == expected, f"{tag}: upstream got {got}, expected exactly {expected}"


def test_a_deployed_manifest_is_applied_by_the_hub_and_a_bad_route_or_bad_json_is_refused_at_its_line_and_column(
    upstream, hub_factory, collector_factory, clients, tmp_path
):
    up = upstream
    telemetry = collector_factory(up)
    hub = hub_factory(up, edge_id=EDGE_ID)
    hub_twin = f"{EDGE_ID}/$edgeHub"
    pub = connect_publisher(hub.port, clients)

    manifest = tmp_path / "deployment.json"
    manifest.write_text(json.dumps({"modulesContent": {
        "$edgeAgent": {"properties.desired": {"schemaVersion": "1.1", "modules": {}}},
        "$edgeHub": {"properties.desired": {
            "schemaVersion": "1.1",
            "routes": {"hot": HOT, "alarm": {"route": ALARM, "priority": 1, "timeToLiveSecs": 60}},
            "storeAndForwardConfiguration": {"timeToLiveSecs": 3600},
        }},
    }}, indent=2))
    # the hub's devices connect without credentials: it has no scope, which
    # the CLI notes (a typo in --edge would look the same) but deploys
    r = cloud(up, "deploy", str(manifest), "--edge", EDGE_ID)
    assert f"note: {EDGE_ID} has no scope" in r.stderr, describe(r)
    assert "$version 1" in r.stdout + r.stderr, describe(r)
    twin = wait_twin(up, hub_twin, lambda t: (t["reported"] or {}).get("lastDesiredVersion") == 1, 20,
                     "the hub to report $version 1 applied")
    assert twin["desired"]["$version"] == 1 and twin["desired"]["routes"]["hot"] == HOT, twin
    reported = twin["reported"]
    assert reported["lastDesiredStatus"]["code"] == 200, reported
    assert reported["routes"] == {
        "hot": {"route": HOT, "priority": 0, "onError": "deadletter"},
        "alarm": {"route": ALARM, "priority": 1, "timeToLiveSecs": 60, "onError": "deadletter"},
    }, reported
    assert reported["storeAndForwardConfiguration"] == {"timeToLiveSecs": 3600}, reported
    sent = send_temps(pub, "v1", [10, 40, 25, 31])
    upstream_exactly(telemetry, "v1", [sent[1], sent[3]])

    # the `properties.desired` object alone is a manifest too: the next $version
    bare = tmp_path / "hub-only.json"
    bare.write_text(json.dumps({"schemaVersion": "1.1", "routes": {"cold": COLD}}, indent=2))
    cloud(up, "deploy", str(bare), "--edge", EDGE_ID)
    twin = wait_twin(up, hub_twin, lambda t: (t["reported"] or {}).get("lastDesiredVersion") == 2, 20,
                     "the hub to report $version 2 applied")
    assert twin["desired"] == {"$version": 2, "schemaVersion": "1.1", "routes": {"cold": COLD}}, twin
    assert set(twin["reported"]["routes"]) == {"cold"}, twin["reported"]
    sent = send_temps(pub, "v2", [40, 12, 31, 5])
    upstream_exactly(telemetry, "v2", [sent[1], sent[3]])

    # a route syntax error: exit 1 naming the file, line and column of the bad word
    broken = tmp_path / "broken-route.json"
    broken.write_text(json.dumps({"modulesContent": {"$edgeHub": {"properties.desired": {
        "schemaVersion": "1.1",
        "routes": {"fine": HOT, "broken": "FROM /messages/* WHERE temp > 30 INTOO $upstream"},
    }}}}, indent=2))
    line, col = position_of(broken.read_text(), "INTOO", '"broken"')
    r = cloud(up, "deploy", str(broken), "--edge", EDGE_ID, rc=1)
    assert f"{broken}:{line}:{col}: routes.broken: " in r.stderr, \
        f"expected `{broken}:{line}:{col}: routes.broken: ...`: {describe(r)}"
    assert "INTOO" in r.stderr and "routes.fine" not in r.stderr, r.stderr

    # malformed JSON (a missing comma): exit 1 naming where the parser stopped
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{\n  "schemaVersion": "1.1"\n  "routes": {"r": "FROM /messages/* INTO $upstream"}\n}\n')
    r = cloud(up, "deploy", str(bad_json), "--edge", EDGE_ID, rc=1)
    assert f"{bad_json}:3:3: " in r.stderr, f"expected `{bad_json}:3:3: ...`: {describe(r)}"

    # neither was published: the broker holds $version 2, the hub still routes by it
    twin = twin_get(up, hub_twin)
    assert twin["desired"] == {"$version": 2, "schemaVersion": "1.1", "routes": {"cold": COLD}}, twin
    assert twin["reported"]["lastDesiredVersion"] == 2, twin
    sent = send_temps(pub, "v2-still", [40, 12])
    upstream_exactly(telemetry, "v2-still", [sent[1]])
    assert hub.alive()


def test_a_route_error_column_counts_the_escaped_characters_on_the_manifests_line(upstream, tmp_path):
    manifest = tmp_path / "escaped.json"
    manifest.write_text('{"schemaVersion": "1.1",\n "routes": {\n'
                        '  "obj": {"route": "FROM /messages/* WHERE a = \\"x\\" INTOO $upstream", "priority": 2}\n'
                        ' }\n}\n')
    line, col = position_of(manifest.read_text(), "INTOO", '"obj"')
    assert (line, col) == (3, 54)
    r = cloud(upstream, "deploy", str(manifest), "--edge", EDGE_ID, rc=1)
    assert "routes.obj: " in r.stderr, describe(r)
    assert f"{manifest}:{line}:{col}: routes.obj: " in r.stderr, \
        f"expected `{manifest}:{line}:{col}: routes.obj: ...`: {describe(r)}"


# --------------------------------------------------------------------------
# 3. twins
# --------------------------------------------------------------------------


def test_twin_set_reaches_a_connected_device_as_desired_patches_and_twin_get_shows_what_it_reported(
    upstream, hub_factory, clients
):
    up = upstream
    hub = provisioned_hub(up, hub_factory, "child1")
    c = connect(hub, up, clients, "child1", ["$iothub/twin/res/#", "$iothub/twin/PATCH/properties/desired/#"])
    patches = "$iothub/twin/PATCH/properties/desired/"

    def next_patch(n: int) -> tuple[str, dict]:
        c._wait(lambda: sum(t.startswith(patches) for t, _ in c.messages) >= n, 15, f"desired patch #{n}")
        with c.cond:
            t, p = [(t, p) for t, p in c.messages if t.startswith(patches)][n - 1]
        return t, json.loads(p)

    assert twin_get(up, "child1") == {"desired": None, "reported": None}
    cloud(up, "twin", "set", "child1", "--desired", '{"rate": 5, "mode": "eco", "cfg": {"a": 1}}')
    assert next_patch(1) == (f"{patches}?$version=1", {"rate": 5, "mode": "eco", "cfg": {"a": 1}, "$version": 1})
    # a JSON merge patch: null removes a key, objects merge
    r = cloud(up, "twin", "set", "child1", "--desired", '{"mode": null, "cfg": {"b": 2}}')
    assert "$version 2" in r.stdout + r.stderr, describe(r)
    topic, body = next_patch(2)
    assert topic == f"{patches}?$version=2", topic
    assert body["mode"] is None and body["$version"] == 2 and body["cfg"]["b"] == 2, body
    assert twin_get(up, "child1")["desired"] == {"rate": 5, "cfg": {"a": 1, "b": 2}, "$version": 2}

    assert c.publish_result("$iothub/twin/PATCH/properties/reported/?$rid=1", b'{"fw": "2.0", "ok": true}') == 0
    c._wait(lambda: any(t.startswith("$iothub/twin/res/204/?$rid=1") for t, _ in c.messages), 15, "the 204")
    twin = wait_twin(up, "child1", lambda t: (t["reported"] or {}).get("fw") == "2.0", 20,
                     "child1's reported properties in `twin get`")
    assert twin == {"desired": {"rate": 5, "cfg": {"a": 1, "b": 2}, "$version": 2},
                    "reported": {"fw": "2.0", "ok": True, "$version": 2}}, twin
    assert not c.closed.is_set()


# --------------------------------------------------------------------------
# 4. direct methods
# --------------------------------------------------------------------------


def test_invoke_prints_the_devices_answer_and_exits_0_and_exits_1_on_an_error_answer_a_404_and_a_504(
    sub_upstream, hub_factory, clients
):
    up = sub_upstream
    module = f"{EDGE_ID}/mod1"
    hub = provisioned_hub(up, hub_factory, "child1", module)
    wait_hub_subscribed(up, "devices/child1/methods/+/+")
    wait_hub_subscribed(up, f"devices/{EDGE_ID}/modules/mod1/methods/+/+")

    def invoke(*args: str) -> subprocess.Popen:
        return subprocess.Popen(cloud_cmd(up, "invoke", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=hub_env(), stdin=subprocess.DEVNULL)

    def outcome(p: subprocess.Popen, timeout: float = 40.0) -> tuple[int, dict, str]:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate(timeout=10)
            raise AssertionError(f"invoke did not finish within {timeout}s: {out!r} {err!r}") from None
        assert out.strip(), f"invoke printed nothing (exit {p.returncode}); stderr {err!r}"
        return p.returncode, json.loads(out), err

    # the call is made before child1 connects: --connect-timeout covers that
    call = invoke("child1", "reboot", "--payload", '{"delay": 3}', "--timeout", "20", "--connect-timeout", "20")
    try:
        d = connect(hub, up, clients, "child1", ["$iothub/methods/POST/#"])
        prefix = "$iothub/methods/POST/"

        def take_call(name: str) -> tuple[str, bytes]:
            d._wait(lambda: any(t.startswith(f"{prefix}{name}/") for t, _ in d.messages), 15, f"the call {name}")
            with d.cond:
                return next((t, p) for t, p in d.messages if t.startswith(f"{prefix}{name}/"))

        topic, payload = take_call("reboot")
        assert json.loads(payload) == {"delay": 3}
        rid = topic.split("?$rid=", 1)[1]
        assert d.publish_result(f"$iothub/methods/res/200/?$rid={rid}", b'{"rebooting": true}') == 0
        assert outcome(call)[:2] == (0, {"status": 200, "payload": {"rebooting": True}})
    finally:
        if call.poll() is None:
            call.kill()

    # the device's own error status is printed as it is, with exit 1
    call = invoke("child1", "fail", "--timeout", "20")
    topic, _ = take_call("fail")
    rid = topic.split("?$rid=", 1)[1]
    assert d.publish_result(f"$iothub/methods/res/500/?$rid={rid}", b'{"error": "disk"}') == 0
    assert outcome(call)[:2] == (1, {"status": 500, "payload": {"error": "disk"}})

    # a module not connected: the hub's 404
    code, answer, err = outcome(invoke(module, "ping"))
    assert (code, answer["status"]) == (1, 404), (answer, err)
    assert "not connected" in answer["payload"]["message"], answer

    # a device that takes the call and never answers: the hub's 504 after --timeout
    started = time.monotonic()
    silent = invoke("child1", "slow", "--timeout", "5")
    take_call("slow")
    code, answer, err = outcome(silent)
    elapsed = time.monotonic() - started
    assert (code, answer["status"]) == (1, 504), (answer, err)
    assert "did not answer" in answer["payload"]["message"], answer
    assert 5 <= elapsed < 15, f"the 504 came after {elapsed:.1f}s with --timeout 5"
    assert not d.closed.is_set() and hub.alive()


# --------------------------------------------------------------------------
# 5. cloud-to-device messages
# --------------------------------------------------------------------------


def test_c2d_reaches_the_device_with_its_properties_and_the_message_id_it_printed(
    sub_upstream, hub_factory, clients
):
    up = sub_upstream
    hub = provisioned_hub(up, hub_factory, "child1", "child2")
    wait_hub_subscribed(up, "devices/child1/messages/devicebound/#")
    d1 = connect(hub, up, clients, "child1", ["devices/child1/messages/devicebound/#"])
    d2 = connect(hub, up, clients, "child2", ["devices/child2/messages/devicebound/#"])

    sent_at = datetime.now(timezone.utc)
    r = cloud(up, "c2d", "child1", "switch on", "--prop", "k=v", "--prop", "path=a/b&c", "--expiry-secs", "600")
    mid = r.stdout.strip()
    assert re.fullmatch(r"\S+", mid), f"expected one message id: {describe(r)}"
    prefix = "devices/child1/messages/devicebound/"
    d1._wait(lambda: any(t.startswith(prefix) for t, _ in d1.messages), 15, "the cloud-to-device message")
    with d1.cond:
        [(topic, body)] = [(t, p) for t, p in d1.messages if t.startswith(prefix)]
    assert body == b"switch on"
    bag = dict(parse_bag(topic[len(prefix):]))
    assert (bag.get("$.mid"), bag.get("k"), bag.get("path")) == (mid, "v", "a/b&c"), topic
    assert topic.count("/") == prefix.count("/"), f"a property put a '/' in the topic: {topic}"
    expiry = datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", bag["$.exp"]).replace("Z", "+00:00"))
    assert 590 <= (expiry - sent_at).total_seconds() <= 610, f"$.exp {bag['$.exp']} is not now + 600 s"
    hub.wait_metric("edgehub_c2d_queued", lambda v: v == 0, 15, "the message acknowledged by child1")
    assert not [t for t, _ in d2.messages if "devicebound" in t], "child2 got child1's message"

    r = cloud(up, "c2d", f"{EDGE_ID}/mod1", "x", rc=1)
    assert "not modules" in r.stderr and not r.stdout, describe(r)


# --------------------------------------------------------------------------
# 6. tail
# --------------------------------------------------------------------------


def test_tail_prints_the_telemetry_devices_send_through_the_hub_and_device_filters_out_the_others(
    upstream, hub_factory, clients
):
    up = upstream
    module = f"{EDGE_ID}/mod1"
    hub = provisioned_hub(up, hub_factory, "child1", "child2", module)
    d1 = connect(hub, up, clients, "child1")
    d2 = connect(hub, up, clients, "child2")
    m = connect(hub, up, clients, module)

    everything = Tail(up, "--count", "4", "--for-secs", "30")
    only_child1 = Tail(up, "--device", "child1", "--count", "2", "--for-secs", "30")
    try:
        everything.wait_listening()
        only_child1.wait_listening()
        # child2 first: a --device filter that let it through would print it first
        assert d2.publish_result("devices/child2/messages/events/k=other", b"from child2") == 0
        assert d1.publish_result("devices/child1/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8&k=v%20w",
                                 b'{"temp": 21}') == 0
        assert d1.publish_result("devices/child1/messages/events/", b"\xff\x00bin") == 0
        assert m.publish_result(f"devices/{EDGE_ID}/modules/mod1/messages/events/x=1", b"from mod1") == 0

        code, lines = only_child1.finish()
        assert code == 0, only_child1.stderr
        assert lines == [
            {"device": "child1", "module": None, "body": '{"temp": 21}',
             "properties": {"$.ct": "application/json", "$.ce": "utf-8", "k": "v w"}},
            {"device": "child1", "module": None, "bodyBase64": "/wBiaW4=", "properties": {}},
        ], lines
        code, lines = everything.finish()
        assert code == 0, everything.stderr
        assert [(ln["device"], ln["module"], ln.get("body"), ln["properties"]) for ln in lines] == [
            ("child2", None, "from child2", {"k": "other"}),
            ("child1", None, '{"temp": 21}', {"$.ct": "application/json", "$.ce": "utf-8", "k": "v w"}),
            ("child1", None, None, {}),
            (EDGE_ID, "mod1", "from mod1", {"x": "1"}),
        ], lines
    finally:
        everything.close()
        only_child1.close()
    assert hub.alive()
